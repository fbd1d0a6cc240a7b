"""The health monitor's judgement, on fake readings and a fake clock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.config import Stage
from orchestrator.health import (
    CONSECUTIVE,
    HealthMonitor,
    Reading,
    endpoint_holder,
    read_process,
)

MiB = 2**20

STAGE = Stage(
    name="consumer",
    call="m:f",
    command=None,
    replicas=1,
    pull=None,
    push=None,
    params={},
    env={},
    restart="on-failure",
    max_restarts=10,
    restart_window=60.0,
    backoff=0.05,
    backoff_max=5.0,
    heartbeat_timeout=5.0,
    max_rss=100 * MiB,
    max_cpu=90.0,
)


@dataclass
class FakeReplica:
    stage: Stage = STAGE
    pid: int | None = 100
    state: str = "ready"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stage.name}.0"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reading(rss: int = 10 * MiB, cpu: float = 0.0, status: str = "sleeping"):
    return Reading(status=status, rss=rss, cpu_seconds=cpu, fds=12, threads=3)


def monitor_reading(values: dict[int, Reading | None]) -> tuple[HealthMonitor, Clock]:
    clock = Clock()
    return HealthMonitor(0.5, reader=values.get, clock=clock), clock


def test_sample_fills_the_replica_stats() -> None:
    monitor, clock = monitor_reading({100: reading(rss=20 * MiB, cpu=1.0)})
    replica = FakeReplica()

    assert monitor.sample([replica]) == []

    stats = replica.stats
    assert stats["rss"] == stats["rss_peak"] == 20 * MiB
    assert stats["fds"] == 12 and stats["threads"] == 3
    assert stats["status"] == "sleeping"
    assert stats["cpu_percent"] is None  # nothing to compare with yet
    assert monitor.due() == 0.5


def test_cpu_percent_is_cpu_time_over_wall_time() -> None:
    values: dict[int, Reading | None] = {100: reading(cpu=1.0)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()
    monitor.sample([replica])

    clock.now = 0.5
    values[100] = reading(cpu=1.25)
    monitor.sample([replica])

    assert replica.stats["cpu_percent"] == 50.0


def test_rss_over_the_limit_for_consecutive_samples_gets_a_verdict() -> None:
    values: dict[int, Reading | None] = {100: reading(rss=200 * MiB)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()

    verdicts = []
    for turn in range(CONSECUTIVE):
        clock.now = turn * 0.5
        verdicts = monitor.sample([replica])
        if turn < CONSECUTIVE - 1:
            assert verdicts == []

    assert [v.reason for v in verdicts] == ["max_rss"]
    assert "200 MiB over max_rss 100 MiB" in verdicts[0].detail


def test_one_sample_under_the_limit_starts_the_count_over() -> None:
    values: dict[int, Reading | None] = {100: reading(rss=200 * MiB)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()
    pattern = [200, 200, 50, 200, 200]

    for turn, rss in enumerate(pattern):
        clock.now = turn * 0.5
        values[100] = reading(rss=rss * MiB)
        assert monitor.sample([replica]) == []


def test_cpu_over_the_limit_gets_a_verdict() -> None:
    values: dict[int, Reading | None] = {100: reading(cpu=0.0)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()
    verdicts = []
    for turn in range(CONSECUTIVE + 1):  # the first sample has no CPU % yet
        clock.now = turn * 0.5
        values[100] = reading(cpu=turn * 0.49)  # 98% of a core
        verdicts = monitor.sample([replica])

    assert [v.reason for v in verdicts] == ["max_cpu"]


def test_no_limits_no_verdicts() -> None:
    values: dict[int, Reading | None] = {100: reading(rss=10**12)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica(stage=replace(STAGE, max_rss=None, max_cpu=None))
    for turn in range(CONSECUTIVE * 2):
        clock.now = turn * 0.5
        assert monitor.sample([replica]) == []


def test_a_replica_being_stopped_is_not_judged_again_and_is_killed_late() -> None:
    values: dict[int, Reading | None] = {100: reading(rss=200 * MiB)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()
    monitor.stopping(100, grace_period=2.0)

    for turn in range(CONSECUTIVE * 2):
        clock.now = turn * 0.1
        assert monitor.sample([replica]) == []
    assert monitor.overdue() == []
    assert monitor.due() == 1.0  # the next sample comes before the kill

    clock.now = 2.0
    assert monitor.overdue() == [100]
    assert monitor.overdue() == []  # told once


def test_a_new_incarnation_starts_with_fresh_stats() -> None:
    values: dict[int, Reading | None] = {100: reading(rss=90 * MiB)}
    monitor, clock = monitor_reading(values)
    replica = FakeReplica()
    monitor.sample([replica])

    replica.pid = 101
    values[101] = reading(rss=10 * MiB)
    monitor.sample([replica])

    assert replica.stats["pid"] == 101
    assert replica.stats["rss_peak"] == 10 * MiB


def test_zombies_and_vanished_processes_are_noted_not_judged() -> None:
    values: dict[int, Reading | None] = {
        100: reading(rss=500 * MiB, status="zombie"),
        101: None,
    }
    monitor, clock = monitor_reading(values)
    zombie, gone = FakeReplica(pid=100), FakeReplica(pid=101)
    for turn in range(CONSECUTIVE):
        clock.now = turn * 0.5
        assert monitor.sample([zombie, gone]) == []

    assert monitor.zombies_seen == CONSECUTIVE
    assert zombie.stats["status"] == "zombie"
    assert gone.stats["status"] == "gone"


def test_read_process_reads_a_real_child_and_its_zombie() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        live = read_process(child.pid)
        assert live is not None and live.rss > 0 and live.fds >= 3
        assert child.stdin is not None
        child.stdin.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
        dead = read_process(child.pid)
        assert dead is not None and dead.status == "zombie"
    finally:
        child.wait()
    assert read_process(child.pid) is None


def test_endpoint_holder_names_the_pid_listening_on_a_port() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        found = endpoint_holder(f"tcp://127.0.0.1:{port}")
    finally:
        holder.close()

    assert found is not None and found.startswith(f"pid {os.getpid()} (")
    assert endpoint_holder("ipc:///tmp/whatever") is None
