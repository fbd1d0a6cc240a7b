"""Supervision with real processes: crashed, hung and bloated replicas, restart
intensity, producer and collector crashes, hygiene over many restarts, and the
supervisor itself stopped in the middle of a restart.

The supervisor's log (stderr of ``orchestrator run``, without ``--json``,
which would quieten it) is read line by line in a thread, each line stamped
with the wall-clock time it arrived, so a test can wait for "consumer.0 pid N
ready" instead of sleeping and hoping.  The report is the run's report.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Workspace, orchestrator_processes, stage_processes, wait_for

READY = re.compile(r"(\w+)\.(\d+) pid (\d+) ready")


class Run:
    """``orchestrator run --json`` in a real process, its log read as it comes."""

    def __init__(self, ws: Workspace, path: Path) -> None:
        self.home = ws.path / "home"
        self.proc = ws.popen("run", str(path))
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._out.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append((time.time(), line.rstrip("\n")))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout.append(self.proc.stdout.read())

    def log(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def ready(self, name: str) -> list[tuple[float, int]]:
        """(time, pid) of each "NAME pid N ready" line so far."""
        found = []
        for at, line in self.log():
            match = READY.search(line)
            if match and f"{match[1]}.{match[2]}" == name:
                found.append((at, int(match[3])))
        return found

    def wait_ready(self, name: str, count: int, timeout: float = 30) -> int:
        """Wait for the ``count``-th incarnation of ``name`` to be ready; its pid."""
        found = wait_for(
            lambda: len(self.ready(name)) >= count,
            timeout=timeout,
            message=f"{name} ready {count} time(s)",
        )
        return int(found and self.ready(name)[count - 1][1])

    def count(self, text: str) -> int:
        return sum(text in line for _, line in self.log())

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._out.join(timeout=5)
        try:
            found = next(self.home.glob("*/report.json"))
            return dict(json.loads(found.read_text()))
        except (StopIteration, ValueError) as exc:
            tail = "\n".join(line for _, line in self.log()[-40:])
            raise AssertionError(
                f"exit {self.proc.returncode}, no report:\n{tail}"
            ) from exc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def replica_pid(run: Run, name: str) -> int | None:
    """The pid of the live process titled ``name`` (e.g. consumer.0), if any."""
    for child in stage_processes(run.proc.pid):
        try:
            title = " ".join(child.cmdline()).split()
            if name in title and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
        except psutil.Error:
            continue
    return None


def zmq_threads(pid: int) -> list[str]:
    """Names of libzmq's own threads (``ZMQbg/...``) in process ``pid``."""
    names = (
        task.read_text().strip() for task in Path(f"/proc/{pid}/task").glob("*/comm")
    )
    return [name for name in names if name.startswith("ZMQbg")]


def entry(report: dict[str, Any], name: str) -> dict[str, Any]:
    stage, index = name.split(".")
    return next(
        w
        for w in report["workers"]
        if w["stage"] == stage and w["replica"] == int(index)
    )


def run_dir(ws: Workspace) -> Path:
    return next((ws.path / "home").glob("*/run"))


def with_rate(path: Path, messages: int, rate: int) -> Path:
    """Pace the producer: the run then lasts at least messages / rate seconds."""
    text = path.read_text().replace(
        f"params = {{ messages = {messages} }}",
        f"params = {{ messages = {messages}, rate = {rate} }}",
    )
    path.write_text(text)
    return path


# -- hung, bloated, crashing at once -------------------------------------------


@pytest.mark.timeout(60)
def test_stopped_worker_is_declared_hung_and_replaced_within_the_timeout(
    ws: Workspace,
) -> None:
    timeout = 1.0
    path = ws.classic(
        messages=20_000,
        replicas=1,
        worker="teststages:stop_self_on",
        worker_params="poison = 5000",
        worker_extra=f"heartbeat_timeout = {timeout}",
    )
    run = Run(ws, path)
    try:
        first = run.wait_ready("consumer.0", 1)
        marker = wait_for(
            lambda: list((ws.path / "home").glob("*/run/stopped-consumer")),
            timeout=30,
            message="the worker to stop itself",
        )[0]
        stopped_at = marker.stat().st_mtime  # touched just before SIGSTOP
        second = run.wait_ready("consumer.0", 2, timeout=timeout + 5)
        report = run.finish()
    finally:
        run.stop()

    replaced_at = run.ready("consumer.0")[1][0]
    assert second != first
    assert replaced_at - stopped_at <= timeout + 1.0
    assert run.count(f"consumer.0 pid {first} sent no heartbeat") == 1
    assert report["status"] == "completed"
    assert report["lost"] == 0
    assert report["collected"] == 10_000
    assert entry(report, "consumer.0")["restart_reasons"] == ["hung"]


@pytest.mark.timeout(60)
def test_worker_growing_past_max_rss_is_restarted_gracefully(ws: Workspace) -> None:
    path = with_rate(
        ws.classic(
            messages=20_000,
            worker="teststages:bloat_once",
            pipeline_extra="health_interval = 0.1",
            worker_extra='max_rss = "150MiB"',
        ),
        20_000,
        10_000,
    )
    run = Run(ws, path)
    try:
        report = run.finish()
    finally:
        run.stop()

    bloated = entry(report, "consumer.0")
    assert report["status"] == "completed", report["failure"]
    assert bloated["restart_reasons"] == ["max_rss"]
    assert entry(report, "consumer.1")["restarts"] == 0
    assert report["lost"] == 0
    assert report["collected"] == 10_000
    # Gracefully: SIGTERM was enough, the process exited by itself.
    assert run.count("over max_rss 150 MiB for 3 samples: restarting it") == 1
    assert run.count("did not stop within") == 0
    assert bloated["stats"]["rss"] < 150 * 2**20  # the replacement's last sample
    assert bloated["stats"]["fds"] > 0 and bloated["stats"]["threads"] > 0


@pytest.mark.timeout(60)
def test_worker_spinning_past_max_cpu_is_restarted_gracefully(ws: Workspace) -> None:
    # A slow stream keeps an ordinary worker near 1% of a core; the spinning
    # one uses all the CPU it can get, which is well over the limit even on a
    # machine shared with a dozen other busy processes.
    path = with_rate(
        ws.classic(
            messages=1000,
            replicas=1,
            worker="teststages:spin_once",
            pipeline_extra="health_interval = 0.1",
            worker_extra="max_cpu = 6",
        ),
        1000,
        500,
    )
    run = Run(ws, path)
    try:
        report = run.finish()
    finally:
        run.stop()

    assert report["status"] == "completed", report["failure"]
    assert entry(report, "consumer.0")["restart_reasons"] == ["max_cpu"]
    assert report["lost"] == 0
    assert report["collected"] == 500
    assert run.count("over max_cpu 6% for 3 samples: restarting it") == 1


@pytest.mark.timeout(60)
def test_worker_exiting_at_once_fails_the_run_by_restart_intensity(
    ws: Workspace,
) -> None:
    path = ws.classic(
        messages=20_000,
        worker="teststages:exit_at_once_saying",
        worker_extra="max_restarts = 3",
    )
    started = time.monotonic()
    run = Run(ws, path)
    try:
        report = run.finish()
    finally:
        run.stop()

    assert run.proc.returncode == 1
    assert report["status"] == "failed"
    failure = report["failure"]
    assert re.match(
        r"consumer\.[01]: exit 1; restarted 3 times within 60 s", failure
    ), failure
    failed = report["failed_stage"]
    assert failed["stage"] == "consumer" and failed["exit"] == "exit 1"
    assert any("cannot go on, giving up" in line for line in failed["tail"])
    # No flood: one warning per death, at most max_restarts + 1 per replica.
    assert run.count("exited unexpectedly: exit 1") <= 2 * 4
    assert time.monotonic() - started < 30  # back-off is short; no restart storm


@pytest.mark.timeout(60)
def test_supervisor_answers_sigterm_while_a_replica_waits_in_backoff(
    ws: Workspace,
) -> None:
    path = ws.classic(
        messages=20_000,
        replicas=1,
        worker="teststages:exit_at_once_saying",
        worker_extra="max_restarts = 100\nbackoff = 30.0\nbackoff_max = 30.0",
    )
    run = Run(ws, path)
    try:
        wait_for(
            lambda: run.count("consumer.0 restarting in") >= 2,
            timeout=30,
            message="a back-off",
        )
        children = stage_processes(run.proc.pid)
        run.proc.send_signal(signal.SIGTERM)
        report = run.finish(timeout=20)
    finally:
        run.stop()

    assert run.proc.returncode == 143
    assert report["status"] == "interrupted"
    assert run.count("exited unexpectedly") == 2  # the back-off held
    assert not any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    )


# -- producer and collector crashes ------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["producer.0", "collector.0"])
def test_at_most_once_source_or_sink_crash_fails_the_run_clearly(
    ws: Workspace, victim: str
) -> None:
    path = with_rate(
        ws.classic(messages=200_000, pipeline_extra='delivery = "at-most-once"'),
        200_000,
        100_000,
    )
    run = Run(ws, path)
    try:
        run.wait_ready("producer.0", 1)
        pid = replica_pid(run, victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        report = run.finish(timeout=30)
    finally:
        run.stop()

    assert run.proc.returncode == 1
    assert report["status"] == "failed"
    assert report["failure"].startswith(f"{victim}: SIGKILL; with at-most-once")
    assert "not restarted" in report["failure"]
    assert entry(report, victim)["restarts"] == 0


@pytest.mark.timeout(60)
def test_source_that_fails_on_every_start_fails_the_run_naming_it(
    ws: Workspace,
) -> None:
    path = (
        ws.classic(messages=20_000)
        .read_text()
        .replace(
            'call = "teststages:numbers"', 'call = "teststages:numbers_then_raise"'
        )
        .replace(
            "params = { messages = 20000 }",
            "params = { messages = 20000, fail_at = 5000 }\nmax_restarts = 2",
        )
    )
    run = Run(ws, ws.write(path))
    try:
        report = run.finish()
    finally:
        run.stop()

    assert report["status"] == "failed"
    assert report["failure"].startswith(
        "producer.0: exit 1 (RuntimeError: source broke at 5000); restarted 2 times"
    )
    assert "RuntimeError: source broke at 5000" in report["failed_stage"]["traceback"]
    assert entry(report, "producer.0")["restarts"] == 2


# -- ports -----------------------------------------------------------------------


def test_busy_port_names_the_pid_that_holds_it_and_is_not_restarted(
    ws: Workspace,
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = ws.classic(messages=100)
        result = ws.cli(
            "run",
            str(path),
            "--set",
            f"stages.collector.pull.bind=tcp://127.0.0.1:{port}",
            "--set",
            f"stages.consumer.push.connect=tcp://127.0.0.1:{port}",
        )
    finally:
        holder.close()

    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"tcp://127.0.0.1:{port}" in output
    assert f"held by pid {os.getpid()} (" in output
    assert "restarting in" not in output


# -- hygiene -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fifty_restarts_leave_the_supervisor_flat_and_no_zombies(ws: Workspace) -> None:
    path = ws.classic(
        messages=10_000_000,
        worker_params="delay = 0.001",
        worker_extra="max_restarts = 1000\nbackoff = 0.0",
    )
    run = Run(ws, path)
    try:
        supervisor = psutil.Process(run.proc.pid)
        pid = run.wait_ready("consumer.0", 1)
        run.wait_ready("producer.0", 1)
        before: tuple[int, int] = (0, 0)
        for cycle in range(1, 51):
            os.kill(pid, signal.SIGKILL)
            pid = run.wait_ready("consumer.0", cycle + 1)
            if cycle == 5:  # after warming up: log handlers, caches, the heap
                before = (supervisor.num_fds(), supervisor.memory_info().rss)
        after = (supervisor.num_fds(), supervisor.memory_info().rss)
        zombies = [
            c for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE
        ]
        live = len(stage_processes(run.proc.pid))
        threads = zmq_threads(run.proc.pid)
        run.proc.send_signal(signal.SIGTERM)
        report = run.finish(timeout=30)
    finally:
        run.stop()

    assert after[0] == before[0], f"fds {before[0]} -> {after[0]}"
    assert after[1] - before[1] < 4 * 2**20, f"rss {before[1]} -> {after[1]}"
    assert zombies == []
    assert live == 4
    assert threads == []  # no ZeroMQ context in the supervisor, none to fork
    assert entry(report, "consumer.0")["restarts"] == 50


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_supervisor_stopped_mid_restart_leaves_nothing_running(
    ws: Workspace, signum: int
) -> None:
    path = ws.classic(
        messages=10_000_000,
        worker_params="delay = 0.001",
        name="midrestart",
        worker_extra="max_restarts = 100\nbackoff = 30.0\nbackoff_max = 30.0",
    )
    run = Run(ws, path)
    try:
        pid = run.wait_ready("consumer.0", 1)
        run.wait_ready("producer.0", 1)
        os.kill(pid, signal.SIGKILL)  # restarted at once
        pid = run.wait_ready("consumer.0", 2)
        os.kill(pid, signal.SIGKILL)  # now 15-45 s of back-off
        wait_for(
            lambda: run.count("consumer.0 restarting in") >= 2,
            timeout=30,
            message="the back-off",
        )
        other = replica_pid(run, "consumer.1")
        assert other is not None
        seen = stage_processes(run.proc.pid)
        os.kill(other, signal.SIGKILL)  # restarted at once: a spawn in flight
        run.proc.send_signal(signum)
        run.proc.wait(timeout=20)
    finally:
        run.stop()

    if signum == signal.SIGTERM:
        assert run.proc.returncode == 143
    else:
        assert run.proc.returncode == -signal.SIGKILL

    def nothing_left() -> bool:
        alive = [
            p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        return not alive and not orchestrator_processes("orchestrator: midrestart ")

    wait_for(nothing_left, timeout=10, message="every stage process to be gone")


# -- the done-when run ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_consumers_killed_every_300_ms_all_show_as_restarts_and_counts_are_true(
    ws: Workspace,
) -> None:
    messages, rate = 200_000, 25_000  # the run lasts at least 8 s
    path = with_rate(
        ws.classic(
            messages=messages,
            worker_extra="max_restarts = 1000\nbackoff = 0.01\nbackoff_max = 0.3",
        ),
        messages,
        rate,
    )
    run = Run(ws, path)
    rng = random.Random(3)
    kills: list[int] = []
    try:
        run.wait_ready("producer.0", 1)
        # The producer's stream starts after its ready line: kill only while
        # it cannot possibly be done, so that no kill lands during the final
        # stop (a stop we asked for is not a crash, and is not restarted).
        stop_killing = run.ready("producer.0")[0][0] + 0.8 * messages / rate
        while time.time() < stop_killing and run.proc.poll() is None:
            victims = [
                p
                for p in (replica_pid(run, f"consumer.{i}") for i in (0, 1))
                if p is not None and p not in kills
            ]  # not one dying
            if victims:
                victim = rng.choice(victims)
                os.kill(victim, signal.SIGKILL)
                kills.append(victim)
            time.sleep(0.3)
        report = run.finish(timeout=60)
    finally:
        run.stop()

    consumers = [entry(report, f"consumer.{i}") for i in (0, 1)]
    reasons = [r for c in consumers for r in c["restart_reasons"]]
    assert len(kills) >= 10
    assert reasons == ["SIGKILL"] * len(kills)
    for pid in kills:
        assert run.count(f"pid {pid} exited unexpectedly: SIGKILL") == 1
    assert report["status"] == "completed", report["failure"]
    assert run.proc.returncode == 0
    assert report["produced"] == messages
    assert report["counted_inputs"] == messages
    assert report["collected"] == messages // 2
    assert report["summary"]["results"] == messages // 2
    assert report["summary"]["sum"] == sum(range(0, messages, 2))
    assert report["lost"] == 0
