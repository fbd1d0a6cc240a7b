"""Health monitoring: samples of every stage process, and the limits on them.

The supervisor's loop asks :class:`HealthMonitor` whether a sample is due;
every ``health_interval`` it reads each stage process through psutil (state,
RSS, CPU, open file descriptors, threads) into ``replica.stats``, where the
report and ``orchestrator status`` find them.  A replica over its stage's
``max_rss`` or ``max_cpu`` for :data:`CONSECUTIVE` samples in a row gets a
verdict; the supervisor then restarts it gracefully.

Nothing is read between samples.  A sample costs about 0.2 ms per process
(``/proc`` reads) on a quiet machine, about 1.5 ms on one loaded 7 times
over, so four stages cost the loop 0.2-1.3 % of each half second, and none
of it is on the data path, which runs in the stage processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from .config import Stage

# Samples in a row over a limit before a restart: a single spike (a big frame
# being decoded, a burst of CPU) is not a leak or a runaway loop.
CONSECUTIVE = 3


@dataclass(frozen=True)
class Reading:
    """What one look at a process shows; CPU as seconds used so far."""

    status: str
    rss: int
    cpu_seconds: float
    fds: int
    threads: int


@dataclass(frozen=True)
class Verdict:
    """A replica to restart: which limit it broke, and by how much."""

    replica: Any
    reason: str  # "max_rss" or "max_cpu", the name of the key in pipeline.toml
    detail: str


class Watched(Protocol):
    """The parts of a supervisor's Replica the monitor reads and writes."""

    stage: Stage
    pid: int | None
    state: str
    stats: dict[str, Any]

    @property
    def name(self) -> str: ...


Reader = Callable[[int], Reading | None]


class ProcessReader:
    """Reads stage processes with psutil, keeping one ``psutil.Process`` each.

    Only our own unreaped children are read, so a pid cannot have been
    reused by an unrelated process: a child's pid stays taken until we reap
    it, and :meth:`forget` is called when we do.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def __call__(self, pid: int) -> Reading | None:
        """One look at ``pid``; None if it is gone."""
        try:
            proc = self._procs.get(pid) or psutil.Process(pid)
            self._procs[pid] = proc
            with proc.oneshot():
                cpu = proc.cpu_times()
                return Reading(
                    status=proc.status(),
                    rss=proc.memory_info().rss,
                    cpu_seconds=cpu.user + cpu.system,
                    fds=proc.num_fds(),
                    threads=proc.num_threads(),
                )
        except psutil.ZombieProcess:
            return Reading(psutil.STATUS_ZOMBIE, 0, 0.0, 0, 0)
        except psutil.Error:  # gone (or unreadable): SIGCHLD tells the rest
            self.forget(pid)
            return None

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)


def read_process(pid: int) -> Reading | None:
    """One psutil look at ``pid``, without keeping anything."""
    return ProcessReader()(pid)


class HealthMonitor:
    """Samples replicas every ``interval`` seconds and judges them by limits."""

    def __init__(
        self,
        interval: float,
        reader: Reader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.reader = reader or ProcessReader()
        self.clock = clock
        self.next_at = 0.0
        self.samples = 0
        self.zombies_seen = 0
        # pid -> (cpu seconds, clock) at the previous sample, for CPU %.
        self._cpu: dict[int, tuple[float, float]] = {}
        # pid -> limit -> samples in a row over it.
        self._streaks: dict[int, dict[str, int]] = {}
        # pid -> when a replica asked to stop gracefully gets SIGKILL.
        self._kill_at: dict[int, float] = {}

    # -- timing -----------------------------------------------------------

    def due(self) -> float:
        """The next moment the monitor wants the loop to wake up."""
        return min([self.next_at, *self._kill_at.values()])

    def sample_due(self, now: float) -> bool:
        return now >= self.next_at

    # -- sampling ---------------------------------------------------------

    def sample(self, replicas: Iterable[Watched]) -> list[Verdict]:
        """Read every live replica into ``replica.stats``; judge it by its limits."""
        now = self.clock()
        self.next_at = now + self.interval
        self.samples += 1
        verdicts = []
        live: set[int] = set()
        for replica in replicas:
            pid = replica.pid
            if pid is None:
                continue
            live.add(pid)
            reading = self.reader(pid)
            if reading is None:
                replica.stats["status"] = "gone"
                continue
            if reading.status == psutil.STATUS_ZOMBIE:  # keep its last live figures
                replica.stats["status"] = reading.status
                self.zombies_seen += 1
                continue
            self._record(replica, pid, reading, now)
            verdict = self._judge(replica, pid)
            if verdict is not None:
                verdicts.append(verdict)
        self._forget_all_but(live)
        return verdicts

    def _record(self, replica: Watched, pid: int, reading: Reading, now: float) -> None:
        stats = replica.stats
        if stats.get("pid") != pid:  # a new incarnation: its peak starts over
            stats.clear()
        cpu_percent = None
        before = self._cpu.get(pid)
        if before is not None and now > before[1]:
            cpu_percent = 100.0 * (reading.cpu_seconds - before[0]) / (now - before[1])
        self._cpu[pid] = (reading.cpu_seconds, now)
        stats.update(
            pid=pid,
            status=reading.status,
            rss=reading.rss,
            rss_peak=max(reading.rss, stats.get("rss_peak", 0)),
            cpu_percent=None if cpu_percent is None else round(cpu_percent, 1),
            fds=reading.fds,
            threads=reading.threads,
            sampled_at=time.time(),
        )

    def _judge(self, replica: Watched, pid: int) -> Verdict | None:
        if pid in self._kill_at:  # already on its way out
            return None
        stage, stats = replica.stage, replica.stats
        streaks = self._streaks.setdefault(pid, {})
        over = {
            "max_rss": stage.max_rss is not None and stats["rss"] > stage.max_rss,
            "max_cpu": stage.max_cpu is not None
            and stats["cpu_percent"] is not None
            and stats["cpu_percent"] > stage.max_cpu,
        }
        for limit, exceeded in over.items():
            streaks[limit] = streaks.get(limit, 0) + 1 if exceeded else 0
            if streaks[limit] >= CONSECUTIVE:
                return Verdict(replica, limit, self._describe(limit, stage, stats))
        return None

    @staticmethod
    def _describe(limit: str, stage: Stage, stats: dict[str, Any]) -> str:
        if limit == "max_rss":
            assert stage.max_rss is not None
            return (
                f"RSS {stats['rss'] / 2**20:.0f} MiB over max_rss "
                f"{stage.max_rss / 2**20:.0f} MiB for {CONSECUTIVE} samples"
            )
        return (
            f"CPU {stats['cpu_percent']:.0f}% over max_cpu {stage.max_cpu:g}% "
            f"for {CONSECUTIVE} samples"
        )

    def _forget_all_but(self, live: set[int]) -> None:
        known = set(self._cpu) | set(self._streaks) | set(self._kill_at)
        for pid in known - live:
            self.forget(pid)

    # -- graceful restarts ------------------------------------------------

    def stopping(self, pid: int, grace_period: float) -> None:
        """``pid`` was sent SIGTERM: it gets SIGKILL if alive after the grace."""
        self._kill_at[pid] = self.clock() + grace_period

    def overdue(self) -> list[int]:
        """Pids past their grace period; each is returned once."""
        now = self.clock()
        late = [pid for pid, at in self._kill_at.items() if now >= at]
        for pid in late:
            self._kill_at[pid] = float("inf")  # keep it out of _judge, once
        return late

    def forget(self, pid: int) -> None:
        """``pid`` was reaped."""
        self._cpu.pop(pid, None)
        self._streaks.pop(pid, None)
        self._kill_at.pop(pid, None)
        if isinstance(self.reader, ProcessReader):
            self.reader.forget(pid)


def endpoint_holder(endpoint: str) -> str | None:
    """Who holds a TCP endpoint's port: ``"pid 1234 (python3)"``, if psutil can tell.

    Finding another user's process needs privileges we may not have; then
    (and for ipc:// endpoints, which ZeroMQ takes over rather than refusing)
    the answer is None and the error names the endpoint alone.
    """
    if not endpoint.startswith("tcp://"):
        return None
    try:
        port = int(endpoint.rsplit(":", 1)[1])
    except ValueError:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.pid:
            if conn.status != psutil.CONN_LISTEN:
                continue
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                return f"pid {conn.pid}"
            return f"pid {conn.pid} ({name})"
    return None
