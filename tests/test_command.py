"""Readiness of command stages, read from the connections of a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator import command
from orchestrator.config import Socket, Stage
from tests.conftest import wait_for

# Opens its sockets only when told to (a line on stdin), then waits.
PROGRAM = """
import sys, zmq
ctx = zmq.Context()
sys.stdin.readline()
pull = ctx.socket(zmq.PULL)
pull.linger = 0
pull.bind(sys.argv[1])
push = ctx.socket(zmq.PUSH)
push.linger = 0
push.connect(sys.argv[2])
print(pull.last_endpoint.decode(), flush=True)
sys.stdin.readline()
"""


def _worker(pull: str, push: str) -> Stage:
    return Stage(
        name="w",
        call=None,
        command=("prog",),
        replicas=1,
        pull=Socket(bind=pull),
        push=Socket(connect=(push,)),
        params={},
        env={},
        restart="on-failure",
        max_restarts=1,
        restart_window=1.0,
        backoff=0.0,
        backoff_max=0.0,
        heartbeat_timeout=1.0,
        max_rss=None,
        max_cpu=None,
    )


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cmd-") as path:  # short: ipc paths
        yield Path(path)


def _start(pull: str, push: str, environ: bool = True) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if environ:
        env["ORCHESTRATOR_CONTROL_FD"] = "-1"
    return subprocess.Popen(
        [sys.executable, "-c", PROGRAM, pull, push],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def test_ipc_stage_is_ready_once_bound_and_connected(tmp: Path) -> None:
    import zmq

    ctx = zmq.Context()
    downstream = ctx.socket(zmq.PULL)
    downstream.linger = 0
    downstream.bind(f"ipc://{tmp}/down.sock")
    stage = _worker(f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock")
    proc = _start(f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock")
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert not command.is_ready(proc.pid, stage)  # nothing opened yet
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        wait_for(lambda: command.is_ready(proc.pid, stage), message="ready")
    finally:
        _stop(proc)
        downstream.close()
        ctx.term()


def test_tcp_stage_is_ready_once_listening_and_connected(tmp: Path) -> None:
    import zmq

    ctx = zmq.Context()
    downstream = ctx.socket(zmq.PULL)
    downstream.linger = 0
    port = downstream.bind_to_random_port("tcp://127.0.0.1")
    push = f"tcp://127.0.0.1:{port}"
    proc = _start("tcp://127.0.0.1:*", push)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        bound = proc.stdout.readline().strip()
        # The port it listens on, and a port nobody listens on.
        assert wait_for(lambda: command.is_ready(proc.pid, _worker(bound, push)))
        assert not command.is_ready(proc.pid, _worker("tcp://127.0.0.1:1", push))
    finally:
        _stop(proc)
        downstream.close()
        ctx.term()


def test_a_process_not_yet_execd_is_not_ready(tmp: Path) -> None:
    # Without the stage's environment this is still the supervisor's fork.
    stage = _worker(f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock")
    proc = _start(f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock", environ=False)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        assert not command.is_ready(proc.pid, stage)
    finally:
        _stop(proc)


def test_a_dead_process_is_not_ready() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    assert not command.is_ready(proc.pid, _worker("ipc:///tmp/x", "ipc:///tmp/y"))


def test_a_wrapper_script_is_ready_when_its_child_is(tmp: Path) -> None:
    import zmq

    ctx = zmq.Context()
    downstream = ctx.socket(zmq.PULL)
    downstream.linger = 0
    downstream.bind(f"ipc://{tmp}/down.sock")
    up, down = f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock"
    env = dict(os.environ, ORCHESTRATOR_CONTROL_FD="-1", PROGRAM=PROGRAM)
    # "; exit $?" keeps the shell from replacing itself with the program.
    script = f'{sys.executable} -c "$PROGRAM" "$0" "$1"; exit $?'
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script, up, down],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        wait_for(lambda: command.is_ready(proc.pid, _worker(up, down)))
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        _stop(proc)
        downstream.close()
        ctx.term()
