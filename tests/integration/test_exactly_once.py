"""Exactly-once results: kill any process at any moment, the counts stay exact.

The collector's sink (teststages.count) sums the numbers it counts, so a
number counted twice, or a lost one replaced by a duplicate, shows up even
when the count of results looks right.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from typing import Any

import psutil
import pytest

from stages import classic
from tests.conftest import Workspace, stage_processes, wait_for

RATE = 100_000  # inputs per second: long enough a run to kill things in


def even_sum(messages: int) -> int:
    return sum(range(0, messages, 2))


def chaos_pipeline(ws: Workspace, messages: int, **kw: Any) -> Any:
    return (
        ws.classic(
            messages=messages,
            worker_extra=kw.pop("worker_extra", "max_restarts = 1000"),
            **kw,
        )
        .read_text()
        .replace(
            f"params = {{ messages = {messages} }}",
            f"params = {{ messages = {messages}, rate = {RATE} }}",
        )
    )


def start(ws: Workspace, text: str) -> subprocess.Popen[str]:
    path = ws.write(text)
    return ws.popen("run", "--json", str(path))


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return dict(json.loads(out))
    except ValueError as exc:
        raise AssertionError(f"exit {proc.returncode}, no report:\n{err}") from exc


def replicas_of(proc: subprocess.Popen[str], stage: str) -> list[psutil.Process]:
    found = []
    for child in stage_processes(proc.pid):
        try:
            if f" {stage}." in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def kill(process: psutil.Process) -> bool:
    """SIGKILL ``process``; False if it had already gone (a restart races us)."""
    try:
        process.kill()
    except psutil.NoSuchProcess:
        return False
    return True


def wait_for_replicas(proc: subprocess.Popen[str], stage: str, count: int) -> None:
    """Wait until ``count`` replicas of ``stage`` run; fail at once if the run ended."""

    def there() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the run ended early (exit {proc.returncode}):\n{err[-3000:]}"
            )
        return len(replicas_of(proc, stage)) >= count

    wait_for(there, timeout=30, message=f"{count} {stage} replicas")


def assert_exact(report: dict[str, Any], messages: int) -> None:
    assert report["status"] == "completed", report.get("failure")
    assert report["produced"] == messages
    assert report["collected"] == messages // 2
    assert report["summary"]["results"] == messages // 2
    assert report["summary"]["sum"] == even_sum(messages)
    assert report["lost"] == 0


@pytest.mark.timeout(120)
def test_random_consumer_killed_every_300_ms_counts_stay_exact(ws: Workspace) -> None:
    messages = 200_000
    proc = start(ws, chaos_pipeline(ws, messages))
    wait_for_replicas(proc, "consumer", 2)
    kills = 0
    rng = random.Random(1)
    while proc.poll() is None:
        time.sleep(0.3)
        victims = replicas_of(proc, "consumer")
        if victims and proc.poll() is None and kill(rng.choice(victims)):
            kills += 1
    report = finish(proc)

    assert_exact(report, messages)
    assert kills >= 5
    consumers = [w for w in report["workers"] if w["stage"] == "consumer"]
    # A restart is counted when the replacement is spawned: a kill whose
    # replacement still waited out its back-off when the run finished shows
    # as a replica in "backoff"; the last kill may also land during the stop.
    restarts = sum(w["restarts"] for w in consumers)
    waiting = sum(w["state"] == "backoff" for w in consumers)
    assert kills - 1 <= restarts + waiting <= kills
    assert all(set(w["restart_reasons"]) <= {"SIGKILL"} for w in consumers)
    assert report["quarantined"] == 0
    assert proc.returncode == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["collector", "producer"])
def test_collector_or_producer_killed_mid_run_counts_stay_exact(
    ws: Workspace, victim: str
) -> None:
    messages = 200_000
    proc = start(ws, chaos_pipeline(ws, messages))
    wait_for_replicas(proc, "producer", 1)
    time.sleep(0.7)  # mid-run: about a third of the stream is through
    replicas_of(proc, victim)[0].kill()
    report = finish(proc)

    assert_exact(report, messages)
    stage = next(w for w in report["workers"] if w["stage"] == victim)
    assert stage["restarts"] == 1
    assert stage["restart_reasons"] == ["SIGKILL"]


@pytest.mark.timeout(90)
def test_a_restarted_source_that_resumes_starts_after_what_was_delivered(
    ws: Workspace,
) -> None:
    messages = 200_000
    text = chaos_pipeline(ws, messages).replace(
        '"teststages:numbers"', '"teststages:numbers_resuming"'
    )
    proc = start(ws, text)
    wait_for_replicas(proc, "producer", 1)
    time.sleep(0.7)  # mid-run: about a third of the stream is through
    replicas_of(proc, "producer")[0].kill()
    report = finish(proc)

    assert_exact(report, messages)
    starts = [
        int(n) for n in next(ws.path.glob("home/*/run/starts")).read_text().split()
    ]
    assert len(starts) == 2 and starts[0] == 0
    # Not from 0 again: from the end of what the collector had counted.
    assert 0 < starts[1] < messages


def test_classic_producer_starts_where_it_is_told_at_once() -> None:
    class Resumed:
        def resume(self) -> int:
            return 500

    started = time.monotonic()
    numbers = classic.produce(Resumed(), messages=1000, rate=0.01)  # type: ignore[arg-type]
    first = next(iter(numbers))

    assert first == {"num": 500}
    assert time.monotonic() - started < 10  # not 500 x 100 s of pacing first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker", ["teststages:raise_on", "teststages:exit_on"])
def test_poison_input_is_quarantined_once_and_the_rest_is_exact(
    ws: Workspace, worker: str
) -> None:
    messages, poison = 20_000, 7_778
    path = ws.classic(
        messages=messages, worker=worker, worker_params=f"poison = {poison}"
    )
    code, report = ws.run_json(str(path))

    assert code == 0, report.get("failure")
    assert report["status"] == "completed"
    assert report["quarantined"] == 1
    assert report["collected"] == messages // 2 - 1
    assert report["summary"]["sum"] == even_sum(messages) - poison
    assert report["lost"] == 0
    dead = (ws.path / "home").glob("*/run/dead-letter.jsonl")
    entries = [json.loads(line) for f in dead for line in f.read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["record"] == {"num": poison}
    assert entries[0]["attempts"] == 3
    assert entries[0]["failed_in"] in ("consumer.0", "consumer.1")
    if worker.endswith("raise_on"):
        assert "ValueError: cannot handle 7778" in entries[0]["detail"]
        assert entries[0]["raised"] == "ValueError: cannot handle 7778"
    else:
        assert entries[0]["error"] == "exit 3"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["raise", "exit"])
def test_more_poison_inputs_than_max_restarts_are_all_quarantined(
    ws: Workspace, how: str
) -> None:
    # 8 poison inputs, 3 crashes each: 24 crashes, well past max_restarts
    # (10 by default), and still the data's fault, not the stage's.
    messages, every, offset = 2000, 250, 6
    poison = list(range(offset, messages, every))
    path = ws.classic(
        messages=messages,
        worker="teststages:poison_every",
        worker_params=f'every = {every}, offset = {offset}, how = "{how}"',
    )
    code, report = ws.run_json(str(path), timeout=80)

    assert code == 0, report.get("failure")
    assert report["quarantined"] == len(poison)
    assert report["collected"] == messages // 2 - len(poison)
    assert report["summary"]["sum"] == even_sum(messages) - sum(poison)
    assert report["lost"] == 0
    dead = (ws.path / "home").glob("*/run/dead-letter.jsonl")
    entries = [json.loads(line) for f in dead for line in f.read_text().splitlines()]
    assert sorted(e["record"]["num"] for e in entries) == poison


@pytest.mark.timeout(60)
def test_a_death_holding_many_inputs_strikes_none_of_them(ws: Workspace) -> None:
    # The first death holds a frame of 1000 inputs, most of which never ran:
    # only deaths on a single input count as attempts.
    messages, every, offset = 2000, 250, 6
    poison = list(range(offset, messages, every))
    path = ws.classic(
        messages=messages,
        worker="teststages:poison_every",
        worker_params=f'every = {every}, offset = {offset}, how = "exit"',
        pipeline_extra="max_attempts = 1",
    )
    code, report = ws.run_json(str(path), timeout=50)

    assert code == 0, report.get("failure")
    assert report["quarantined"] == len(poison)
    dead = (ws.path / "home").glob("*/run/dead-letter.jsonl")
    entries = [json.loads(line) for f in dead for line in f.read_text().splitlines()]
    assert sorted(e["record"]["num"] for e in entries) == poison
    assert {e["attempts"] for e in entries} == {1}


@pytest.mark.timeout(60)
def test_a_stage_failing_on_many_inputs_fails_the_run_past_max_quarantined(
    ws: Workspace,
) -> None:
    path = ws.classic(
        messages=2000,
        worker="teststages:poison_every",
        worker_params="every = 50, offset = 6",
        # Small frames: most of them hold no poison, so the stage is seen to
        # make progress between its crashes.
        pipeline_extra="max_quarantined = 3\nbatch = 10",
    )
    code, report = ws.run_json(str(path), timeout=50)

    assert code == 1
    assert report["status"] == "failed"
    assert "more than pipeline.max_quarantined = 3" in report["failure"]


@pytest.mark.timeout(60)
def test_a_stage_that_fails_on_every_input_still_meets_the_restart_limit(
    ws: Workspace,
) -> None:
    # Every crash is pinned on one input, but the stage never finished any:
    # it is broken, and restart intensity stops it long before quarantine.
    path = ws.classic(messages=2000, worker="teststages:raise_always")
    code, report = ws.run_json(str(path), timeout=50)

    assert code == 1
    assert "giving up" in report["failure"]
    assert report["quarantined"] < 10


@pytest.mark.timeout(60)
def test_a_sink_that_raises_on_every_record_fails_the_run_naming_it(
    ws: Workspace,
) -> None:
    path = ws.classic(messages=2000)
    path.write_text(
        path.read_text().replace('"teststages:count"', '"teststages:count_never"')
    )
    code, report = ws.run_json(str(path), timeout=50)

    assert code == 1
    assert report["failure"].startswith("collector.0: exit 1 (RuntimeError: sink")
    assert "giving up" in report["failure"]
    assert report["failed_stage"]["stage"] == "collector"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delivery", ["exactly-once", "at-most-once"])
def test_a_failed_run_does_not_let_even_a_careless_sink_write_its_output(
    ws: Workspace, delivery: str
) -> None:
    output = ws.path / "out.txt"
    output.write_text("good")
    path = ws.classic(
        messages=20_000,
        worker="teststages:raise_on",
        worker_params="poison = 7",
        pipeline_extra=f'delivery = "{delivery}"\nmax_quarantined = 0',
    )
    path.write_text(
        path.read_text().replace(
            'call = "teststages:count"',
            f'call = "teststages:write_count_whatever_happens"\n'
            f'params = {{ output = "{output}" }}',
        )
    )
    code, report = ws.run_json(str(path), timeout=50)

    assert code == 1, report
    assert report["status"] == "failed"
    assert output.read_text() == "good"
    assert report["summary"] is None


def test_accounting_off_reports_loss_honestly(ws: Workspace) -> None:
    messages = 200_000
    text = chaos_pipeline(ws, messages, pipeline_extra='delivery = "at-most-once"')
    proc = start(ws, text)
    wait_for_replicas(proc, "consumer", 2)
    time.sleep(0.5)
    replicas_of(proc, "consumer")[0].kill()
    report = finish(proc)

    assert report["delivery"] == "at-most-once"
    counted = report["counted_inputs"]
    assert report["lost"] == messages - counted
    if report["lost"]:
        assert report["status"] == "failed"
        assert proc.returncode == 1
    else:  # the kill found the worker empty-handed
        assert report["status"] == "completed"


def peak_rss(ws: Workspace, messages: int) -> dict[str, int]:
    """Peak RSS of the producer and the collector over a run, sampled."""
    proc = ws.popen("run", "--json", str(ws.classic(messages=messages)))
    peaks = {"producer": 0, "collector": 0}
    while proc.poll() is None:
        for stage in peaks:
            for child in replicas_of(proc, stage):
                try:
                    peaks[stage] = max(peaks[stage], child.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.01)
    report = finish(proc)
    assert report["status"] == "completed"
    return peaks


@pytest.mark.timeout(120)
def test_memory_is_bounded_by_the_window_not_the_stream(ws: Workspace) -> None:
    small = peak_rss(ws, 200_000)
    large = peak_rss(ws, 2_000_000)

    for stage in ("producer", "collector"):
        assert large[stage] - small[stage] < 8 * 2**20, (stage, small, large)


@pytest.mark.timeout(90)
def test_two_worker_stages_with_fan_out_stay_exact_under_kills(ws: Workspace) -> None:
    messages = 100_000
    work, middle, results = (ws.endpoint(n) for n in ("work", "middle", "results"))
    path = ws.write(f"""
[stages.producer]
call = "teststages:numbers"
push = {{ bind = "{work}" }}
params = {{ messages = {messages}, rate = {RATE} }}

[stages.split]
call = "teststages:fan_out"
max_restarts = 1000
pull = {{ connect = "{work}" }}
push = {{ bind = "{middle}" }}

[stages.consumer]
call = "teststages:keep_even"
replicas = 2
max_restarts = 1000
pull = {{ connect = "{middle}" }}
push = {{ connect = "{results}" }}

[stages.collector]
call = "teststages:count"
pull = {{ bind = "{results}" }}
""")
    proc = ws.popen("run", "--json", str(path))
    wait_for_replicas(proc, "consumer", 2)
    rng = random.Random(2)
    kills = 0
    while proc.poll() is None and kills < 6:
        time.sleep(0.2)
        victims = replicas_of(proc, "consumer") + replicas_of(proc, "split")
        if victims and proc.poll() is None and kill(rng.choice(victims)):
            kills += 1
    report = finish(proc)

    evens = [n for n in range(messages) if n % 2 == 0]
    assert report["status"] == "completed", report.get("failure")
    assert report["collected"] == sum(n % 3 for n in evens)
    assert report["summary"]["sum"] == sum(n * (n % 3) for n in evens)
    assert report["lost"] == 0


@pytest.mark.timeout(60)
def test_undecodable_message_goes_to_the_dead_letter_file(ws: Workspace) -> None:
    import zmq

    text = chaos_pipeline(ws, 100_000)
    proc = start(ws, text)
    wait_for_replicas(proc, "producer", 1)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.linger = 1000
        push.connect(ws.endpoint("results"))
        push.send(b"\xc1 not a frame")
        push.close()
    finally:
        ctx.term()
    report = finish(proc)

    assert_exact(report, 100_000)
    dead = next((ws.path / "home").glob("*/run/dead-letter.jsonl"))
    entries = [json.loads(line) for line in dead.read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["stage"] == "collector"
    assert "undecodable" in entries[0]["error"]


@pytest.mark.timeout(90)
def test_a_collector_replaying_a_long_ledger_is_not_taken_for_hung(
    ws: Workspace,
) -> None:
    # Small frames keep each frame's work far below the heartbeat timeout;
    # the replay of all of them together takes far longer than it.
    messages = 10_000
    text = chaos_pipeline(ws, messages, pipeline_extra="batch = 50").replace(
        'call = "teststages:count"',
        'call = "teststages:slow_count"\nheartbeat_timeout = 0.5\n'
        "params = { delay = 0.0005 }",
    )
    proc = start(ws, text)
    wait_for_replicas(proc, "producer", 1)
    time.sleep(2.5)  # over a thousand results counted: over 0.5 s to replay
    replicas_of(proc, "collector")[0].kill()
    report = finish(proc)

    assert_exact(report, messages)
    collector = next(w for w in report["workers"] if w["stage"] == "collector")
    assert collector["restart_reasons"] == ["SIGKILL"]  # and never "hung"


@pytest.mark.timeout(60)
def test_a_worker_blocked_downstream_waits_without_spinning(ws: Workspace) -> None:
    path = ws.classic(
        messages=50_000_000,
        pipeline_extra='delivery = "at-most-once"',
    )
    path.write_text(
        path.read_text().replace(
            'call = "teststages:count"',
            'call = "teststages:count"\nheartbeat_timeout = 60',
        )
    )
    proc = ws.popen("run", str(path))
    try:
        wait_for_replicas(proc, "collector", 1)
        wait_for_replicas(proc, "consumer", 2)
        time.sleep(1.0)
        collector = replicas_of(proc, "collector")[0]
        collector.suspend()  # its queue fills; the workers' sends block
        time.sleep(1.0)
        consumers = replicas_of(proc, "consumer")
        for consumer in consumers:
            consumer.cpu_percent()
        time.sleep(1.5)
        busy = [consumer.cpu_percent() for consumer in consumers]
        collector.resume()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert max(busy) < 30, busy
