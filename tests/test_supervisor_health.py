"""The supervisor's health decisions, on a fake clock and fake samples, acting on
real (stand-in) processes: graceful restart over a limit, SIGKILL after the
grace period, a replacement that never gets ready.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.health import CONSECUTIVE, HealthMonitor, Reading
from orchestrator.replicastate import Replica
from orchestrator.supervisor import Supervisor

MiB = 2**20
IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ok', flush=True); time.sleep(60)"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[str]]:
    """A process to play a replica: it ignores SIGTERM, as a stuck stage would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ok\n"
    yield proc
    proc.kill()
    proc.wait()


def supervisor(tmp_path: Path, clock: Clock, rss: int) -> Supervisor:
    path = tmp_path / "p.toml"
    path.write_text(f"""
[pipeline]
name = "h"
grace_period = 2.0
ready_timeout = 3.0
health_interval = 0.5

[stages.producer]
call = "m:produce"
push = {{ bind = "ipc://{tmp_path}/w" }}

[stages.consumer]
call = "m:work"
pull = {{ connect = "ipc://{tmp_path}/w" }}
push = {{ connect = "ipc://{tmp_path}/r" }}
max_rss = "100MiB"
heartbeat_timeout = 1.0

[stages.collector]
call = "m:collect"
pull = {{ bind = "ipc://{tmp_path}/r" }}
""")
    (tmp_path / "logs").mkdir()
    sup = Supervisor(config.load(path), tmp_path, tmp_path / "logs", clock=clock)
    reading = Reading("sleeping", rss, 0.0, 10, 2)
    sup.health = HealthMonitor(0.5, reader=lambda pid: reading, clock=clock)
    sup.status = "running"
    return sup


def consumer(sup: Supervisor, pid: int, state: str) -> Replica:
    replica = next(r for r in sup.replicas if r.stage.name == "consumer")
    replica.pid, replica.state = pid, state
    replica.started_at = replica.last_heartbeat = sup.clock()
    sup.by_pid[pid] = replica
    return replica


def test_over_max_rss_gets_sigterm_then_sigkill_after_the_grace_period(
    tmp_path: Path, stand_in: subprocess.Popen[str]
) -> None:
    clock = Clock()
    sup = supervisor(tmp_path, clock, rss=200 * MiB)
    replica = consumer(sup, stand_in.pid, "ready")

    for _ in range(CONSECUTIVE):
        clock.now += 0.5
        replica.last_heartbeat = clock.now
        sup.watchdog.check_health()

    assert replica.state == "terminating"
    assert replica.error is not None and replica.error["kind"] == "max_rss"
    assert stand_in.poll() is None  # SIGTERM ignored: still there

    clock.now += 1.0
    sup.watchdog.check_health()
    assert stand_in.poll() is None  # within the grace period

    clock.now += 1.5
    sup.watchdog.check_health()
    assert stand_in.wait(timeout=10) == -signal.SIGKILL


def test_under_the_limit_nothing_happens(
    tmp_path: Path, stand_in: subprocess.Popen[str]
) -> None:
    clock = Clock()
    sup = supervisor(tmp_path, clock, rss=50 * MiB)
    replica = consumer(sup, stand_in.pid, "ready")

    for _ in range(CONSECUTIVE * 2):
        clock.now += 0.5
        sup.watchdog.check_health()

    assert replica.state == "ready"
    assert replica.stats["rss"] == 50 * MiB
    assert stand_in.poll() is None


def test_replacement_never_ready_is_killed_as_hung(
    tmp_path: Path, stand_in: subprocess.Popen[str]
) -> None:
    clock = Clock()
    sup = supervisor(tmp_path, clock, rss=50 * MiB)
    replica = consumer(sup, stand_in.pid, "starting")

    clock.now += 3.0 + 1.0 - 0.1  # ready_timeout + heartbeat_timeout, nearly
    sup.watchdog.check_health()
    assert replica.state == "starting"

    clock.now += 0.6
    sup.watchdog.check_health()
    assert replica.state == "hung"
    assert replica.error == {"kind": "hung", "message": "never ready"}
    assert stand_in.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("writer_alive", [False, True])
def test_dead_replicas_output_is_read_to_its_end_and_closed(
    tmp_path: Path, writer_alive: bool
) -> None:
    sup = supervisor(tmp_path, Clock(), rss=0)
    replica = consumer(sup, 0, "ready")
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    replica.output = read_fd
    sup.selector.register(read_fd, selectors.EVENT_READ, None)
    os.write(write_fd, b"".join(b"line %d\n" % n for n in range(5000)))
    if not writer_alive:  # else: as if a child of the stage still held it
        os.close(write_fd)

    sup.outputs.drain(replica)

    assert replica.output is None
    assert read_fd not in [key.fd for key in sup.selector.get_map().values()]
    with pytest.raises(OSError):
        os.fstat(read_fd)
    assert replica.tail[-1] == "line 4999"
    if writer_alive:
        os.close(write_fd)
