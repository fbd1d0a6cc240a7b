"""Daemon mode, the control CLI and CI smoke runs, with real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Workspace, stage_processes, wait_for

# A stream that outlives any test: the tests stop it.
ENDLESS = 10**9


def _paced(path: Path, messages: int, rate: int) -> Path:
    """Give the test producer of ``path`` a rate (messages per second)."""
    old, new = f"messages = {messages} ", f"messages = {messages}, rate = {rate} "
    path.write_text(path.read_text().replace(old, new))
    return path


def _endless(ws: Workspace, rate: int = 2000, **kwargs: Any) -> Path:
    return _paced(ws.classic(messages=ENDLESS, **kwargs), ENDLESS, rate)


def _pidfile(ws: Workspace) -> Path | None:
    found = sorted((ws.path / "home").glob("*/supervisor.pid"))
    return found[0] if found else None


def _daemon_pid(ws: Workspace) -> int | None:
    path = _pidfile(ws)
    try:
        return int(path.read_text()) if path else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _status(ws: Workspace, path: Path) -> tuple[int, dict[str, Any]]:
    result = ws.cli("status", str(path), "--json", timeout=20)
    return result.returncode, json.loads(result.stdout)


def _consumers(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in report["workers"] if w["stage"] == "consumer"]


@pytest.fixture
def daemons(ws: Workspace) -> Iterator[list[int]]:
    """Pids of daemons a test started; whatever is still alive is killed."""
    started: list[int] = []
    yield started
    pid = _daemon_pid(ws)
    for candidate in {*started, *([pid] if pid else [])}:
        if _alive(candidate):
            os.kill(candidate, signal.SIGKILL)


def _up(ws: Workspace, path: Path, daemons: list[int], *extra: str) -> int:
    result = ws.cli("up", str(path), "--json", *extra, timeout=30)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    daemons.append(info["supervisor_pid"])
    return int(info["supervisor_pid"])


GATED = """
import os
import time


def until_released(ctx, release, rate=3000.0):
    \"\"\"Paced numbers until the file ``release`` exists: the test decides
    when the stream ends, however slow the machine.\"\"\"
    started = time.monotonic()
    num = 0
    while num % 100 or not os.path.exists(release):
        ahead = started + num / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        yield {"num": num}
        num += 1
"""


def test_up_status_scale_restart_wait_cycle_loses_nothing(
    ws: Workspace, daemons: list[int]
) -> None:
    ws.write(GATED, "gated.py")
    release = ws.path / "release"
    # Workers slower than the stream, so that each holds queued work when it
    # is removed; a small window keeps the backlog (and the drain) short, and
    # its latency (about 1 s) well under the redelivery timeout (10 s).
    path = ws.classic(
        messages=1000, worker_params="delay = 0.001", pipeline_extra="window = 2000"
    )
    text = path.read_text().replace('"teststages:numbers"', '"gated:until_released"')
    params = f'params = {{ release = "{release}", rate = 6000 }}'
    path.write_text(text.replace("params = { messages = 1000 }", params))
    pid = _up(ws, path, daemons)

    code, report = _status(ws, path)
    assert code == 0, report
    assert report["status"] == "running"
    assert report["supervisor_pid"] == pid
    assert {w["state"] for w in report["workers"]} == {"ready"}
    for key in ("pid", "uptime_s", "restarts", "last_exit", "rss", "rate"):
        assert key in report["workers"][0]
    others = {w["pid"] for w in report["workers"] if w["stage"] != "consumer"}

    scaled = ws.cli("scale", "consumer=4", "-p", str(path), timeout=30)
    assert scaled.returncode == 0, scaled.stderr
    assert "consumer: 2 -> 4 replicas, all ready" in scaled.stdout

    def new_ones_busy() -> bool:
        _, now = _status(ws, path)
        return len(_consumers(now)) == 4 and all(
            w["received"] > 0 for w in _consumers(now)
        )

    wait_for(new_ones_busy, timeout=10, message="consumers 2 and 3 to get work")
    # A restart of a replica that is removed later still counts.
    _, now = _status(ws, path)
    os.kill(_consumers(now)[3]["pid"], signal.SIGKILL)

    def replaced() -> bool:
        _, now = _status(ws, path)
        return _consumers(now)[3]["restarts"] == 1 and all(
            w["state"] == "ready" for w in _consumers(now)
        )

    wait_for(replaced, timeout=10, message="consumer.3 to be restarted")

    scaled = ws.cli("scale", "consumer=2", "-p", str(path), timeout=30)
    assert scaled.returncode == 0, scaled.stderr
    assert "consumer: 4 -> 2 replicas, all ready" in scaled.stdout
    restarted = ws.cli("restart", "consumer.1", "-p", str(path), "--json", timeout=30)
    assert restarted.returncode == 0, restarted.stderr
    pids = json.loads(restarted.stdout)["consumer.1"]
    assert pids["pid"] != pids["old_pid"]
    code, report = _status(ws, path)
    assert code == 0 and report["status"] == "running"  # still streaming

    release.touch()
    waited = ws.cli("wait", str(path), "--json", timeout=60)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    final = json.loads(waited.stdout)
    assert final["status"] == "completed"
    produced = final["produced"]
    assert produced % 100 == 0 and produced > 0
    assert final["collected"] == produced // 2
    assert final["lost"] == 0
    assert final["summary"]["sum"] == sum(range(0, produced, 2))
    assert final["redelivered"] > 0  # what the removed replicas held came back
    assert set(final["per_consumer"]) == {"0", "1", "2", "3"}
    retired = sorted((w["stage"], w["replica"]) for w in final["retired"])
    assert retired == [("consumer", 2), ("consumer", 3)]
    assert all(w["received"] > 0 and w["exit"] == "exit 0" for w in final["retired"])
    reasons = {w["replica"]: w["restart_reasons"] for w in final["retired"]}
    assert reasons == {2: [], 3: ["SIGKILL"]}
    assert final["restarts"] == 2  # consumer.3's, retired since, and consumer.1's
    assert [w["replica"] for w in _consumers(final)] == [0, 1]
    assert _consumers(final)[1]["restart_reasons"] == ["requested"]
    # Scaling and restarting touched nothing else.
    untouched = [w for w in final["workers"] if w["stage"] != "consumer"]
    assert {w["pid"] for w in untouched} == others
    assert all(w["restarts"] == 0 for w in untouched)
    wait_for(lambda: not _alive(pid), timeout=10, message="the daemon to exit")
    # The final report stays available.
    code, after = _status(ws, path)
    assert code == 3
    assert after["last_run"]["status"] == "completed"


def test_stop_ends_an_endless_pipeline_and_status_says_not_running(
    ws: Workspace, daemons: list[int]
) -> None:
    path = _endless(ws)
    pid = _up(ws, path, daemons)
    # A source restarted after a scale waits for the workers there are now.
    assert ws.cli("scale", "consumer=1", "-p", str(path), timeout=30).returncode == 0
    restarted = ws.cli("restart", "producer", "-p", str(path), timeout=30)
    assert restarted.returncode == 0, restarted.stderr
    stages = stage_processes(pid)
    assert len(stages) == 3

    stopped = ws.cli("stop", str(path), "--timeout", "5", timeout=30)

    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped pipeline t (supervisor pid {pid})" in stopped.stdout
    assert not _alive(pid) or wait_for(lambda: not _alive(pid), timeout=5)
    assert not any(_alive(p.pid) for p in stages)
    status = ws.cli("status", str(path), timeout=20)
    assert status.returncode == 3
    assert "no daemon is running pipeline 't'" in status.stderr
    assert "last run: interrupted" in status.stderr
    logs = ws.cli("logs", "-p", str(path), timeout=20)
    assert logs.returncode == 0
    assert "supervisor | " in logs.stdout and "all stages ready" in logs.stdout
    logs = ws.cli("logs", "supervisor", "-p", str(path), "--json", timeout=20)
    records = [json.loads(line) for line in logs.stdout.splitlines()]
    assert {r["replica"] for r in records} == {"supervisor"}
    assert any("stop requested" in r["line"] for r in records)


def test_killed_daemon_leaves_no_stage_and_the_next_up_cleans_its_pidfile(
    ws: Workspace, daemons: list[int]
) -> None:
    path = _endless(ws)
    pid = _up(ws, path, daemons)
    stages = stage_processes(pid)

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), timeout=5, message="the daemon to die")
    wait_for(
        lambda: not any(_alive(p.pid) for p in stages),
        timeout=5,
        message="its stages to die",
    )
    assert _daemon_pid(ws) == pid  # the pidfile is stale, not gone
    wait = ws.cli("wait", str(path), timeout=20)
    assert wait.returncode == 3  # no daemon, and the killed one left no report

    # A process of the old run that survived (a command stage's own child,
    # say) carries the run directory in its environment.
    run_dir = next((ws.path / "home").glob("*/run"))
    survivor = subprocess.Popen(
        ["sleep", "60"], env={**ws.env, "ORCHESTRATOR_RUN_DIR": str(run_dir)}
    )

    again = ws.cli("up", str(path), timeout=30)
    assert again.returncode == 0, again.stderr
    assert f"stale pidfile (supervisor pid {pid} is gone)" in again.stderr
    assert f"stopped 1 orphaned stage process(es): [{survivor.pid}]" in again.stderr
    assert survivor.wait(timeout=5) == -signal.SIGTERM
    new_pid = _daemon_pid(ws)
    assert new_pid is not None and new_pid != pid
    daemons.append(new_pid)
    assert ws.cli("status", str(path), timeout=20).returncode == 0
    second = ws.cli("up", str(path), timeout=30)
    assert second.returncode == 1
    assert f"already running under supervisor pid {new_pid}" in second.stderr
    assert ws.cli("stop", str(path), timeout=30).returncode == 0


def test_a_killed_daemon_does_not_pass_off_the_run_before_as_its_own(
    ws: Workspace, daemons: list[int]
) -> None:
    path = _endless(ws)
    finite = ws.cli("run", str(path), "--set", "stages.producer.params.messages=100")
    assert finite.returncode == 0, finite.stderr
    pid = _up(ws, path, daemons)

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), timeout=5, message="the daemon to die")

    status = ws.cli("status", str(path), timeout=20)
    assert status.returncode == 3
    assert "last run: completed" not in status.stderr
    assert ws.cli("wait", str(path), timeout=20).returncode == 3


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _raw(control: Path, data: bytes) -> bytes:
    """Send raw bytes to the control socket; what came back before it closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(control))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def test_malformed_control_messages_are_rejected_and_logged(
    ws: Workspace, daemons: list[int]
) -> None:
    import msgspec

    path = _endless(ws)
    _up(ws, path, daemons)
    control = next((ws.path / "home").glob("*/control.sock"))
    assert control.stat().st_mode & 0o777 == 0o600
    assert control.parent.stat().st_mode & 0o777 == 0o700

    _raw(control, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # absurd length prefix
    _raw(control, os.urandom(64))
    _raw(control, _frame(b"\xc1\xc1\xc1"))  # not msgpack
    answer = _raw(control, _frame(msgspec.msgpack.encode([1, 2, 3])))
    assert b"malformed request" in answer
    answer = _raw(control, _frame(msgspec.msgpack.encode({"cmd": "rm -rf"})))
    assert b"unknown command" in answer
    request = {"cmd": "scale", "stage": "producer", "replicas": "lots"}
    answer = _raw(control, _frame(msgspec.msgpack.encode(request)))
    assert b"replicas must be >= 1" in answer
    bad_scale = ws.cli("scale", "collector=3", "-p", str(path), timeout=20)
    assert bad_scale.returncode == 2  # a request that cannot be done: usage
    assert "only workers scale" in bad_scale.stderr
    assert "scale: scale:" not in bad_scale.stderr  # said once, not twice

    code, report = _status(ws, path)
    assert code == 0 and report["status"] == "running"
    log = next((ws.path / "home").glob("*/supervisor.log")).read_text()
    assert "rejected a request over" in log
    assert "rejected a malformed request" in log
    assert ws.cli("stop", str(path), timeout=30).returncode == 0


def test_scale_beyond_the_replica_limit_is_refused(
    ws: Workspace, daemons: list[int]
) -> None:
    import msgspec

    path = _endless(ws)
    _up(ws, path, daemons)
    control = next((ws.path / "home").glob("*/control.sock"))

    # 129 first: without the limit it forks a bounded number, not 2**63.
    for wanted in (129, 2**63, True, 2.0):
        request = {"cmd": "scale", "stage": "consumer", "replicas": wanted}
        raw = _raw(control, _frame(msgspec.msgpack.encode(request)))
        answer = msgspec.msgpack.decode(raw[4:])  # past the length prefix
        assert answer["ok"] is False, wanted
        assert "replicas must be >= 1 and <= 128" in answer["error"]
    by_cli = ws.cli("scale", "consumer=1000", "-p", str(path), timeout=20)
    assert by_cli.returncode == 2
    assert "N must be from 1 to 128" in by_cli.stderr

    code, report = _status(ws, path)
    assert code == 0 and len(_consumers(report)) == 2
    assert ws.cli("stop", str(path), timeout=30).returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_endpoint_serves_per_stage_counters(
    ws: Workspace, daemons: list[int]
) -> None:
    pytest.importorskip("prometheus_client")
    path = _endless(ws)
    port = _free_port()
    _up(ws, path, daemons, "--metrics", f"127.0.0.1:{port}")

    def scraped() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
        wanted = 'orchestrator_stage_inputs{pipeline="t",stage="consumer"}'
        line = next((x for x in text.splitlines() if x.startswith(wanted)), "")
        return text if line and float(line.split()[-1]) > 0 else None

    text = wait_for(scraped, timeout=10, message="consumer inputs in the metrics")
    assert (
        'orchestrator_stage_replicas{pipeline="t",stage="consumer",state="ready"}'
        " 2.0" in text
    )
    assert "orchestrator_stage_rss_bytes" in text
    assert "orchestrator_stage_restarts" in text
    assert ws.cli("stop", str(path), timeout=30).returncode == 0


def test_expect_mismatch_fails_with_a_message_a_report_and_junit(
    ws: Workspace,
) -> None:
    path = ws.classic(messages=2000)
    result = ws.cli(
        "run",
        str(path),
        "--quiet",
        "--expect",
        "collected=999",
        "--expect",
        "lost=0",
        "--report",
        "out.json",
        "--junit",
        "junit.xml",
    )

    assert result.returncode == 1
    assert "expected collected=999, got collected=1000" in result.stderr
    saved = json.loads((ws.path / "out.json").read_text())
    assert saved["expectations"] == {
        "collected=999": "expected collected=999, got collected=1000",
        "lost=0": "ok",
    }
    suite = ET.parse(ws.path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    failed = [c.get("name") for c in suite if c.find("failure") is not None]
    assert failed == ["expect collected=999"]

    ok = ws.cli(
        "run",
        str(path),
        "--quiet",
        "--expect",
        "collected=1000",
        "--expect",
        "lost<=0",
        "--expect",
        "status=completed",
    )
    assert ok.returncode == 0, ok.stderr


def test_timeout_stops_everything_and_exits_1(ws: Workspace) -> None:
    path = _endless(ws)
    result = ws.cli(
        "run", str(path), "--quiet", "--timeout", "1.5", "--junit", "j.xml", timeout=30
    )

    assert result.returncode == 1
    assert "timeout: the run did not finish within 1.5 s" in result.stderr
    assert "every stage was stopped" in result.stderr
    suite = ET.parse(ws.path / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"


def test_bad_expect_is_a_usage_error(ws: Workspace) -> None:
    result = ws.cli("run", str(ws.classic(messages=10)), "--expect", "collected")
    assert result.returncode == 2
    assert "use FIELD=VALUE" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--timeout", "-1", "--timeout -1: must be above 0 seconds"),
        ("--timeout", "0", "--timeout 0: must be above 0 seconds"),
        ("--expect", "nosuch=1", "the report has no field 'nosuch'"),
        ("--expect", "collected=abc", "'abc' is not a number"),
    ],
)
def test_options_no_run_could_meet_are_refused_before_it_starts(
    ws: Workspace, option: str, value: str, message: str
) -> None:
    result = ws.cli("run", str(ws.classic(messages=10)), f"{option}={value}")

    assert result.returncode == 2
    assert message in result.stderr
    assert not list((ws.path / "home").glob("*/logs/*.log"))  # nothing started


def test_up_refuses_a_timeout_below_zero(ws: Workspace, daemons: list[int]) -> None:
    result = ws.cli("up", str(_endless(ws)), "--timeout=-1")

    assert result.returncode == 2
    assert "--timeout -1: must be above 0 seconds" in result.stderr
    assert _pidfile(ws) is None


@pytest.mark.parametrize("option", ["--report", "--junit"])
def test_output_in_a_missing_directory_is_refused_before_the_run(
    ws: Workspace, option: str
) -> None:
    result = ws.cli("run", str(ws.classic(messages=10)), option, "/nonexistent/r.x")

    assert result.returncode == 2
    assert f"{option} /nonexistent/r.x: directory /nonexistent does not exist" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not list((ws.path / "home").glob("*/logs/*.log"))  # nothing started


REMOVER = """
import os


def remove_then_count(ctx, path, messages=10):
    os.rmdir(path)  # the run's report directory, gone before the run ends
    for num in range(messages):
        yield {"num": num}
"""


def test_report_that_cannot_be_written_at_the_end_is_a_clean_error(
    ws: Workspace,
) -> None:
    ws.write(REMOVER, "remover.py")
    out = ws.path / "out"
    out.mkdir()
    path = ws.classic(messages=10)
    path.write_text(
        path.read_text()
        .replace("teststages:numbers", "remover:remove_then_count")
        .replace("messages = 10 ", f'messages = 10, path = "{out}" ')
    )

    result = ws.cli("run", str(path), "--json", "--report", str(out / "r.json"))

    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "completed"
    assert f"--report {out}/r.json: could not write it: No such file" in (result.stderr)
    assert "Traceback" not in result.stderr


def test_junit_on_a_full_disk_is_a_clean_error(ws: Workspace) -> None:
    result = ws.cli("run", str(ws.classic(messages=10)), "--junit", "/dev/full")

    assert result.returncode == 1
    assert "pipeline t: completed" in result.stdout  # the report is still shown
    assert "--junit /dev/full: could not write it: No space left" in result.stderr
    assert "Traceback" not in result.stderr


def test_live_display_in_a_terminal(ws: Workspace) -> None:
    pexpect = pytest.importorskip("pexpect")
    path = _paced(ws.classic(messages=6000), 6000, 3000)
    env = {**ws.env, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "orchestrator", "run", str(path)],
        cwd=str(ws.path),
        env=env,
        dimensions=(30, 100),
        encoding="utf-8",
        timeout=30,
    )
    child.expect("produced [0-9,]+ of 6,000 +processed")
    child.expect("2/2 ready")
    child.expect("ETA")
    child.expect(pexpect.EOF)
    child.close()

    assert child.exitstatus == 0
    output = child.before or ""
    assert "\x1b[" in output  # styled for the terminal
    assert "collected 3000" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)


def test_plain_progress_when_piped(ws: Workspace) -> None:
    path = _paced(ws.classic(messages=4000), 4000, 2000)
    result = ws.cli("run", str(path), timeout=30)

    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    progress = [line for line in result.stdout.splitlines() if " running: " in line]
    assert progress, result.stdout
    assert "consumer 2/2 ready" in progress[0]
