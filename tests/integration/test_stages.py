"""The stage API: command stages, pipelines of any shape, errors in user code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import HERE, Workspace, wait_for

# Stages for the shapes below; written next to the pipeline files, like a
# user's own module.
CHAIN_STAGES = """
from collections.abc import Iterable, Iterator
from typing import Any


def lines(ctx, count=1000, start=0, fail_at=-1) -> Iterator[str]:
    for n in range(start, start + count):
        if n == fail_at:
            raise ValueError(f"source broke at {n}")
        yield f"{n},{n * n}"


def parse(line: str, ctx) -> dict[str, int]:
    n, square = line.split(",")
    return {"n": int(n), "square": int(square)}


def keep_multiples(record: dict[str, int], ctx, of=3, fail_at=-1):
    if record["n"] == fail_at:
        raise ValueError(f"worker broke at {record['n']}")
    return record if record["n"] % of == 0 else None


def opaque(record: dict[str, int], ctx, at=-1):
    return object() if record["n"] == at else record


def enrich(record: dict[str, int], ctx):
    yield {**record, "cube": record["n"] ** 3, "by": ctx.stage}
    yield {**record, "cube": 0, "by": "copy"}


def total(records: Iterable[dict[str, Any]], ctx, fail_after=-1, opaque=False):
    seen = 0
    sums = {"n": 0, "square": 0, "cube": 0}
    for record in records:
        if seen == fail_after:
            raise ValueError(f"sink broke after {seen}")
        seen += 1
        for key in sums:
            sums[key] += record.get(key, 0)
    return object() if opaque else {"results": seen, **sums}
"""


def _write_stages(ws: Workspace) -> None:
    (ws.path / "chainstages.py").write_text(CHAIN_STAGES)


def _chain(
    ws: Workspace,
    count: int,
    pipeline_extra: str = "",
    source_params: str = "",
    worker_params: str = "",
    sink_params: str = "",
) -> Path:
    _write_stages(ws)
    e = ws.endpoint
    return ws.write(f"""
[pipeline]
name = "chain"
{pipeline_extra}

[stages.read]
call = "chainstages:lines"
push = {{ bind = "{e("lines")}" }}
params = {{ count = {count} {source_params} }}

[stages.parse]
call = "chainstages:parse"
replicas = 2
pull = {{ connect = "{e("lines")}" }}
push = {{ connect = "{e("parsed")}" }}

[stages.filter]
call = "chainstages:keep_multiples"
pull = {{ bind = "{e("parsed")}" }}
push = {{ bind = "{e("kept")}" }}
params = {{ of = 3 {worker_params} }}

[stages.enrich]
call = "chainstages:enrich"
replicas = 2
pull = {{ connect = "{e("kept")}" }}
push = {{ connect = "{e("results")}" }}

[stages.sink]
call = "chainstages:total"
pull = {{ bind = "{e("results")}" }}
params = {{ {sink_params} }}
""")


def test_a_chain_of_three_worker_stages_gives_exact_results(ws: Workspace) -> None:
    count = 30_000
    code, report = ws.run_json(str(_chain(ws, count)))

    assert code == 0, report
    kept = [n for n in range(count) if n % 3 == 0]
    assert report["summary"] == {
        "results": 2 * len(kept),
        "n": 2 * sum(kept),
        "square": 2 * sum(n * n for n in kept),
        "cube": sum(n**3 for n in kept),
    }
    assert report["produced"] == count and report["lost"] == 0
    assert report["duplicates_dropped"] == 0


def test_the_chain_is_exact_at_most_once_too(ws: Workspace) -> None:
    count = 5000
    path = _chain(ws, count, pipeline_extra='delivery = "at-most-once"')
    code, report = ws.run_json(str(path))

    assert code == 0, report
    kept = [n for n in range(count) if n % 3 == 0]
    assert report["summary"]["results"] == 2 * len(kept)
    assert report["summary"]["n"] == 2 * sum(kept)


@pytest.mark.parametrize("worker_binds", [False, True])
def test_several_sources_feed_one_worker_stage(
    ws: Workspace, worker_binds: bool
) -> None:
    _write_stages(ws)
    e = ws.endpoint
    if worker_binds:  # one worker binds, the sources connect to it
        a_push = b_push = f'{{ connect = "{e("in")}" }}'
        pull, replicas = f'{{ bind = "{e("in")}" }}', 1
    else:  # each source binds, every worker replica connects to both
        a_push, b_push = f'{{ bind = "{e("a")}" }}', f'{{ bind = "{e("b")}" }}'
        pull, replicas = f'{{ connect = ["{e("a")}", "{e("b")}"] }}', 2
    path = ws.write(f"""
[pipeline]
name = "fanin"

[stages.a]
call = "chainstages:lines"
push = {a_push}
params = {{ count = 4000 }}

[stages.b]
call = "chainstages:lines"
push = {b_push}
params = {{ count = 3000, start = 100000 }}

[stages.parse]
call = "chainstages:parse"
replicas = {replicas}
pull = {pull}
push = {{ connect = "{e("results")}" }}

[stages.sink]
call = "chainstages:total"
pull = {{ bind = "{e("results")}" }}
""")
    code, report = ws.run_json(str(path))

    assert code == 0, report
    numbers = list(range(4000)) + list(range(100_000, 103_000))
    assert report["summary"]["results"] == 7000
    assert report["summary"]["n"] == sum(numbers)
    assert report["summary"]["square"] == sum(n * n for n in numbers)
    assert report["produced"] == 7000 and report["lost"] == 0


def _command_pipeline(
    ws: Workspace, params: str = "", messages: int = 20_000, pipeline_extra: str = ""
) -> Path:
    """numbers -> a pyzmq program (x2) -> keep_even -> count."""
    shutil.copy(HERE / "cmdworker.py", ws.path / "cmdworker.py")
    e = ws.endpoint
    return ws.write(f"""
[pipeline]
name = "cmd"
{pipeline_extra}

[stages.producer]
call = "teststages:numbers"
push = {{ bind = "{e("work")}" }}
params = {{ messages = {messages} }}

[stages.doubler]
command = ["{sys.executable}", "cmdworker.py"]
replicas = 2
pull = {{ connect = "{e("work")}" }}
push = {{ connect = "{e("doubled")}" }}
params = {{ factor = 2 {params} }}

[stages.consumer]
call = "teststages:keep_even"
pull = {{ bind = "{e("doubled")}" }}
push = {{ connect = "{e("results")}" }}

[stages.collector]
call = "teststages:count"
pull = {{ bind = "{e("results")}" }}
""")


def _run(
    ws: Workspace, path: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = ws.cli("run", "--json", str(path))
    try:
        return result, json.loads(result.stdout)
    except ValueError as exc:
        raise AssertionError(
            f"no report (exit {result.returncode}):\n{result.stderr}"
        ) from exc


def test_command_stage_runs_between_function_stages(ws: Workspace) -> None:
    """A program using pyzmq directly, told everything by environment variables."""
    result, report = _run(ws, _command_pipeline(ws))

    assert result.returncode == 0, result.stderr
    assert report["summary"]["results"] == 20_000
    assert report["summary"]["sum"] == 2 * sum(range(20_000))
    assert report["lost"] == 0
    # Both replicas were started with their identity and got ready.
    assert "doubler.0 pid" in result.stderr and "doubler.1 pid" in result.stderr
    assert "doubler.1 | doubler.1 pid" in result.stderr
    doublers = [w for w in report["workers"] if w["stage"] == "doubler"]
    assert [w["received"] for w in doublers] == [0, 0]  # it reports no counters


def test_command_stage_that_dies_loses_nothing(ws: Workspace) -> None:
    """Speaking the frame format keeps exactly-once working across its crash."""
    result, report = _run(ws, _command_pipeline(ws, ", die_after = 3"))

    assert result.returncode == 0, result.stderr
    doubler0 = next(
        w for w in report["workers"] if (w["stage"], w["replica"]) == ("doubler", 0)
    )
    assert doubler0["restarts"] == 1
    assert report["redelivered"] > 0
    assert report["summary"]["results"] == 20_000
    assert report["summary"]["sum"] == 2 * sum(range(20_000))
    assert report["lost"] == 0


def _processes_running(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            found.append(proc.pid)
    return found


@pytest.mark.timeout(60)
def test_a_wrapped_command_leaves_no_child_behind(ws: Workspace) -> None:
    # The wrapper does not exec: the program runs as its child, and only the
    # wrapper is the supervisor's child. Stopping the stage must stop both.
    path = _command_pipeline(ws)
    worker = ws.path / "cmdworker.py"
    path.write_text(
        path.read_text().replace(
            f'command = ["{sys.executable}", "cmdworker.py"]',
            f'command = ["sh", "-c", "{sys.executable} {worker}; echo done"]',
        )
    )
    result, report = _run(ws, path)

    assert result.returncode == 0, result.stderr
    assert report["summary"]["results"] == 20_000
    wait_for(
        lambda: not _processes_running(str(worker)),
        timeout=5,
        message="the wrapped programs to be gone",
    )


def test_command_stage_may_send_ready_and_heartbeats(ws: Workspace) -> None:
    result, report = _run(ws, _command_pipeline(ws, ", heartbeat = true"))

    assert result.returncode == 0, result.stderr
    doublers = [w for w in report["workers"] if w["stage"] == "doubler"]
    assert sum(w["received"] for w in doublers) == 20_000
    assert sum(w["emitted"] for w in doublers) == 20_000


def test_command_source_is_rejected_with_the_reason(ws: Workspace) -> None:
    path = ws.classic(messages=10)
    result = ws.cli(
        "check",
        str(path),
        "--set",
        f'stages.producer.command=["{sys.executable}", "x.py"]',
        "--set",
        "stages.producer.call=",
    )
    assert result.returncode == 2
    text = result.stdout + result.stderr
    assert "command stage must be a worker" in text


def test_missing_command_program_is_caught_by_check(ws: Workspace) -> None:
    path = ws.classic(messages=10, worker_extra="")
    text = path.read_text().replace(
        'call = "teststages:keep_even"', 'command = ["no-such-program-here"]'
    )
    path.write_text(text)
    result = ws.cli("check", str(path))

    assert result.returncode == 2
    assert "stages.consumer.command" in result.stderr + result.stdout
    assert "not found on PATH" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "stage, params, message",
    [
        ("read", {"source_params": ", fail_at = 700"}, "source broke at 700"),
        ("filter", {"worker_params": ", fail_at = 300"}, "worker broke at 300"),
        ("sink", {"sink_params": "fail_after = 50"}, "sink broke after 50"),
    ],
)
def test_exception_in_user_code_names_stage_replica_and_traceback(
    ws: Workspace, stage: str, params: dict[str, str], message: str
) -> None:
    path = _chain(ws, 2000, **params)
    text = path.read_text().replace(
        f"[stages.{stage}]\n", f'[stages.{stage}]\nrestart = "never"\n'
    )
    path.write_text(text)
    result = ws.cli("run", "--json", str(path))
    report = json.loads(result.stdout)

    assert result.returncode == 1
    assert report["status"] == "failed"
    assert report["failure"].startswith(f"{stage}.0: ")
    failed = report["failed_stage"]
    assert (failed["stage"], failed["replica"]) == (stage, 0)
    assert "Traceback (most recent call last)" in failed["traceback"]
    assert f"ValueError: {message}" in failed["traceback"]
    assert "chainstages.py" in failed["traceback"]
    # The supervisor's log names the replica and its pid, then the traceback.
    assert (
        f"{stage}.0 pid {failed_pid(report, stage)}: the stage function raised"
        in result.stderr
    )
    assert f"ValueError: {message}" in result.stderr
    # And the replica's own log file keeps it.
    logs = list((ws.path / "home").glob(f"chain-*/logs/{stage}.0.log"))
    assert logs and f"ValueError: {message}" in logs[0].read_text()


def failed_pid(report: dict[str, object], stage: str) -> int:
    workers = report["workers"]
    assert isinstance(workers, list)
    return next(w["pid"] for w in workers if w["stage"] == stage)


def test_a_record_that_cannot_be_encoded_is_reported_as_the_stages_error(
    ws: Workspace,
) -> None:
    path = _chain(ws, 2000, worker_params=", at = 300")
    text = path.read_text().replace(
        'call = "chainstages:keep_multiples"',
        'call = "chainstages:opaque"\nrestart = "never"',
    )
    path.write_text(text.replace("of = 3 , at", "at"))
    result, report = _run(ws, path)

    assert result.returncode == 1
    failed = report["failed_stage"]
    assert (failed["stage"], failed["replica"]) == ("filter", 0)
    assert "cannot encode a object (<object object at" in failed["traceback"]
    assert "filter.0 pid" in result.stderr


def test_a_summary_that_cannot_be_encoded_is_reported_as_its_repr(
    ws: Workspace,
) -> None:
    result, report = _run(ws, _chain(ws, 1000, sink_params="opaque = true"))

    assert result.returncode == 0, result.stderr
    assert report["summary"].startswith("<object object at")
    assert "the summary cannot be encoded" in result.stderr


def test_command_stage_that_binds_is_started_before_its_source(ws: Workspace) -> None:
    """Its readiness is its listening socket: the source starts after it."""
    e = ws.endpoint
    path = _command_pipeline(ws)
    text = path.read_text()
    text = text.replace(
        f'push = {{ bind = "{e("work")}" }}', f'push = {{ connect = "{e("work")}" }}'
    )
    text = text.replace(
        f'pull = {{ connect = "{e("work")}" }}', f'pull = {{ bind = "{e("work")}" }}'
    )
    path.write_text(text.replace("replicas = 2", "replicas = 1"))
    result = ws.cli("run", str(path))  # not --json: that quiets the INFO lines

    assert result.returncode == 0, result.stderr
    report = json.loads(next((ws.path / "home").glob("cmd-*/report.json")).read_text())
    assert report["summary"]["sum"] == 2 * sum(range(20_000))
    ready = [
        line.split()[2]
        for line in result.stderr.splitlines()
        if line.endswith(" ready") and " pid " in line
    ]
    assert ready.index("doubler.0") < ready.index("producer.0"), result.stderr


def test_command_stage_without_heartbeats_is_not_taken_for_hung(ws: Workspace) -> None:
    path = _command_pipeline(ws, messages=3000)
    text = path.read_text().replace(
        "params = { messages = 3000 }", "params = { messages = 3000, rate = 2000 }"
    )
    # The run lasts about 1.5 s: five times the doubler's heartbeat timeout.
    path.write_text(
        text.replace("replicas = 2\n", "replicas = 2\nheartbeat_timeout = 0.3\n")
    )
    result, report = _run(ws, path)

    assert result.returncode == 0, result.stderr
    assert report["restarts"] == 0
    assert report["summary"]["sum"] == 2 * sum(range(3000))


def test_garbage_on_a_command_stage_control_fd_is_ignored_not_fatal(
    ws: Workspace,
) -> None:
    path = _command_pipeline(ws, params=", heartbeat = true, garbage = true")
    result, report = _run(ws, path)

    assert result.returncode == 0, result.stderr
    assert report["status"] == "completed" and report["lost"] == 0
    assert "malformed" in result.stderr
