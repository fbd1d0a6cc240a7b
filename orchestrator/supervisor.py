"""The supervisor: start the stages in order, watch them, restart, finish, stop.

One thread, one loop.  Everything that happens arrives as a readable file
descriptor: the signal wake-up pipe (SIGCHLD, SIGINT, SIGTERM), each stage's
control channel, each stage's output pipe.  Timers (restarts after back-off,
heartbeat deadlines, health samples) bound how long the loop sleeps.  Exits
are noticed through SIGCHLD and reaped with ``waitpid``, never polled for.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from . import command, topology
from .channel import Channel
from .config import Pipeline, Stage
from .health import HealthMonitor
from .launcher import Launcher, for_pipeline
from .runtime import EXIT_SETUP, SLOT, ReplicaSpec

log = logging.getLogger(__name__)

# A replica that has run this long without trouble starts its back-off over.
HEALTHY_AFTER_S = 10.0
# Lines of a stage's output kept to explain its death.
TAIL_LINES = 20
# Without delivery accounting, a run whose sources are done and whose counts
# have not moved for this long is over, with whatever was lost, lost.
SETTLE_S = 1.0
# How long to wait for reaping after SIGKILL before giving up on a process.
KILL_WAIT_S = 2.0
# Why the supervisor itself ended a replica that had not crashed.
HEALTH_REASONS = ("hung", "max_rss", "max_cpu")
# Without the sink's ledger (delivery = "at-most-once") these roles cannot
# be restarted without making the run's counts lie.
_NOT_RESTARTABLE = {
    "source": "with at-most-once delivery a restarted source would send its "
    "stream again from the start (duplicates), so it is not restarted",
    "sink": "with at-most-once delivery what the sink had counted died with "
    "it, so it is not restarted",
}
# Reads of a dead replica's output pipe before closing it regardless.
DRAIN_CHUNKS = 16
# Rotate a replica's log file at this size, keeping this many old ones.
LOG_BYTES = 10 * 2**20
LOG_BACKUPS = 3


@dataclass
class Replica:
    """One process slot of a stage, across all its incarnations."""

    stage: Stage
    index: int
    log_handler: logging.Handler
    pid: int | None = None
    last_pid: int | None = None
    state: str = "pending"
    channel: Channel | None = None
    output: int | None = None
    slot: mmap.mmap | None = None
    epoch: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    failures: deque[float] = field(default_factory=deque)
    exit: str | None = None
    exit_code: int | None = None
    stop_requested: bool = False
    # What a stop we asked for leads to: None (stay stopped), "restart"
    # (orchestrator restart) or "retire" (orchestrator scale, going down).
    after_stop: str | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    partial: bytes = b""
    restart_at: float | None = None
    pending_reason: str | None = None
    summary: Any = None
    error: dict[str, Any] | None = None
    first_input_at: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stage.name}.{self.index}"

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def total(self, key: str) -> Any:
        """A counter over all incarnations of this replica.

        Most counters restart at zero with each incarnation and add up.  A
        source's position in its stream, and what a sink has counted, are
        states: a restarted source resumes from the sink's record and a
        restarted sink replays its ledger (or, without one, has lost what
        it held), so the newest incarnation's value is the truth.
        """
        value = self.counters.get(key)
        if value is None:  # not reported by the current incarnation yet
            return self.totals.get(key, 0)
        if isinstance(value, bool):
            return value
        if key in _STATE_COUNTERS.get(self.stage.role, ()):
            if self.stage.role == "source":  # regenerating from 0 after restart
                return max(value, self.totals.get(key, 0))
            return value
        if isinstance(value, dict):
            merged = dict(self.totals.get(key, {}))
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            return merged
        return self.totals.get(key, 0) + value


_STATE_COUNTERS = {
    "source": {"produced", "acked", "quarantined"},
    "sink": {"counted", "results", "per_via"},
}


class Supervisor:
    def __init__(
        self,
        pipeline: Pipeline,
        run_dir: Path,
        logs_dir: Path,
        on_output: Callable[[Replica, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        launcher: Launcher | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.run_dir = run_dir
        self.logs_dir = logs_dir
        self.on_output = on_output
        self.clock = clock
        self.groups = topology.start_order(pipeline)
        self.replicas: list[Replica] = [
            Replica(stage, index, self._log_handler(stage, index))
            for group in self.groups
            for stage in group
            for index in range(stage.replicas)
        ]
        self.sources = [r for r in self.replicas if r.stage.role == "source"]
        self.sinks = [r for r in self.replicas if r.stage.role == "sink"]
        self.by_pid: dict[int, Replica] = {}
        self.selector = selectors.DefaultSelector()
        self.status = "starting"
        self.failure: str | None = None
        self.failed_replica: Replica | None = None
        self.signal_received: int | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.finished_at: float | None = None
        self.last_progress = 0.0
        self._progress_mark: tuple[Any, ...] = ()
        self._wake_r = -1
        self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self.hooks: list[Callable[[], None]] = []  # called on every loop turn
        self.health = HealthMonitor(pipeline.health_interval, clock=clock)
        # Forked children locally; Ray actors, on a cluster, with "ray".
        self.launcher = launcher or for_pipeline(pipeline, run_dir)

    def _log_handler(self, stage: Stage, index: int) -> logging.Handler:
        handler = RotatingFileHandler(
            self.logs_dir / f"{stage.name}.{index}.log",
            maxBytes=LOG_BYTES,
            backupCount=LOG_BACKUPS,
            encoding="utf-8",
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        return handler

    # -- the run, in phases ---------------------------------------------------

    def run(self, timeout: float | None = None) -> None:
        """Start, supervise until finished or failed, stop; never leaves a child."""
        self.started_at = self.clock()
        deadline = None if timeout is None else self.started_at + timeout
        self._install_signals()
        try:
            if self._start_all(deadline):
                self.status = "running"
                self.ready_at = self.clock()
                log.info(
                    "pipeline %s: all stages ready in %.3f s",
                    self.pipeline.name,
                    self.ready_at - self.started_at,
                )
                self._supervise(deadline)
        finally:
            self.finished_at = self.clock()
            if self.status in ("failed", "timeout"):
                self._abort_sinks()
            try:
                self._stop_all()
            finally:
                # Whatever went wrong while stopping, no child outlives us.
                self._kill_all()
                self.launcher.close()
                self._restore_signals()
            # Heartbeats lag; the counts each stage sent as it stopped do not.
            if self.status == "completed" and self._lost():
                self.status = "failed"
                self.failure = f"{self._lost()} inputs lost"
            for replica in self.replicas:
                replica.log_handler.close()

    def _start_all(self, deadline: float | None) -> bool:
        """Start each group once every stage downstream of it is ready."""
        for group in self.groups:
            members = [r for r in self.replicas if r.stage in group]
            for replica in members:
                self._spawn(replica)
            ready_by = self.clock() + self.pipeline.ready_timeout
            while not all(r.state == "ready" for r in members):
                if self._should_end(deadline):
                    return False
                if self.clock() > ready_by:
                    late = [r.name for r in members if r.state != "ready"]
                    self._fail(
                        f"not ready within {self.pipeline.ready_timeout:g} s: "
                        f"{', '.join(late)}"
                    )
                    return False
                self._step(0.05)
        return True

    def _supervise(self, deadline: float | None) -> None:
        self.last_progress = self.clock()
        while not self._should_end(deadline):
            if self._finished():
                self.status = "completed"  # confirmed by the final counts
                return
            self._step(self._next_timer())

    def _should_end(self, deadline: float | None) -> bool:
        if self.signal_received is not None:
            self.status = "interrupted"
            return True
        if self.status == "failed":
            return True
        if deadline is not None and self.clock() > deadline:
            self.status = "timeout"
            self.failure = "the run did not finish in time"
            return True
        return False

    def _next_timer(self) -> float:
        now = self.clock()
        timers = [now + self.pipeline.health_interval, self.health.due()]
        timers += [r.restart_at for r in self.replicas if r.restart_at is not None]
        return max(0.0, min(timers) - now)

    # -- one turn of the loop -------------------------------------------------

    def _step(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            handler = key.data
            handler(key.fileobj)
        self._restart_due()
        self._check_commands_ready()
        self._check_heartbeats()
        self._check_health()
        self._check_progress()
        self._check_quarantine()
        for hook in self.hooks:
            hook()

    def _on_wakeup(self, fd: Any) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGINT, signal.SIGTERM):
                if self.signal_received is not None:  # asked twice: no more grace
                    self._kill_all()
                self.signal_received = signum
        self._reap()  # a SIGCHLD can coalesce with another signal's byte

    def _on_channel(self, replica: Replica) -> Callable[[Any], None]:
        def handle(fileobj: Any) -> None:
            channel = replica.channel
            if channel is None:
                return
            for message in channel.receive():
                self._on_message(replica, message)
            if channel.closed:
                self._forget_fd(channel)

        return handle

    def _on_output_ready(self, replica: Replica) -> Callable[[Any], None]:
        def handle(fd: Any) -> None:
            self._read_output(replica)

        return handle

    def _read_output(self, replica: Replica, final: bool = False) -> None:
        if replica.output is None:
            return
        try:
            chunk = os.read(replica.output, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data = replica.partial + chunk
        lines = data.split(b"\n")
        replica.partial = lines.pop()
        if (not chunk or final) and replica.partial:
            lines.append(replica.partial)
            replica.partial = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            replica.tail.append(line)
            replica.log_handler.emit(logging.makeLogRecord({"msg": line}))
            if self.on_output is not None:
                self.on_output(replica, line)
        if not chunk:
            self._forget_fd(replica.output)
            os.close(replica.output)
            replica.output = None

    def _drain_output(self, replica: Replica) -> None:
        """Read a dead replica's output to its end, then close the pipe.

        The pipe must not outlive the replica: its handler reads
        ``replica.output``, which the next incarnation replaces, so a pipe
        left open would leak its fd and wake the loop at EOF forever.  A
        process the stage started may still hold it open; what that writes
        later is not read.
        """
        for _ in range(DRAIN_CHUNKS):  # a pipe holds 64 KiB, one or two reads
            if replica.output is None:
                return
            self._read_output(replica, final=True)
        if replica.output is not None:
            self._forget_fd(replica.output)
            os.close(replica.output)
            replica.output = None

    def _forget_fd(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

    # -- messages from stages -------------------------------------------------

    def _on_message(self, replica: Replica, message: Any) -> None:
        # A command stage may write anything to its control fd: what is not
        # a well-formed message is logged and ignored, never fatal.
        if not isinstance(message, dict):
            log.warning(
                "%s sent a malformed control message: %.80r", replica.name, message
            )
            return
        kind = message.get("t")
        if kind in ("hb", "final"):
            counters = _counters(message.get("c"))
            if counters is None:
                log.warning(
                    "%s sent malformed counters: %.80r", replica.name, message.get("c")
                )
                return
            message = {**message, "c": counters}
        if kind == "hb":
            replica.counters = message["c"]
            replica.last_heartbeat = self.clock()
        elif kind == "ready":
            replica.state = "ready"
            replica.ready_at = self.clock()
            replica.last_heartbeat = replica.ready_at
            log.info("%s pid %s ready", replica.name, replica.pid)
        elif kind == "first_input" and isinstance(message.get("at"), (int, float)):
            replica.first_input_at = message["at"]
        elif kind == "final":
            replica.counters = message["c"]
            replica.summary = message.get("summary")
        elif kind == "error":
            replica.error = message
            if message.get("kind") == "exception":
                log.error(
                    "%s pid %s: the stage function raised:\n%s",
                    replica.name,
                    replica.pid,
                    message.get("traceback", "").rstrip(),
                )
            else:
                log.error(
                    "%s pid %s: %s", replica.name, replica.pid, message.get("message")
                )

    # -- processes ------------------------------------------------------------

    def _spawn(self, replica: Replica) -> None:
        parent_end, child_end = Channel.pair()
        if replica.slot is None:
            replica.slot = mmap.mmap(-1, SLOT.size)
        SLOT.pack_into(replica.slot, 0, 0, 0, 0)
        spec = ReplicaSpec(
            pipeline=self.pipeline,
            stage=replica.stage,
            replica=replica.index,
            run_dir=self.run_dir,
            channel=child_end,
            slot=replica.slot,
            src_id=self.sources.index(replica) if replica in self.sources else -1,
            ack_endpoint=self.ack_endpoint(),
            expected_peers=self._expected_peers(replica.stage),
            epoch=replica.epoch,
        )
        pid, output = self.launcher.spawn(spec, os.getpid())
        child_end.close()
        os.set_blocking(output, False)
        replica.pid, replica.channel, replica.output = pid, parent_end, output
        replica.last_pid = pid
        replica.state = "starting"
        replica.started_at = self.clock()
        replica.ready_at = None
        replica.stop_requested = False
        replica.error = None
        replica.counters = {}
        replica.first_input_at = None
        replica.epoch += 1
        self.by_pid[pid] = replica
        self.selector.register(
            parent_end, selectors.EVENT_READ, self._on_channel(replica)
        )
        self.selector.register(
            output, selectors.EVENT_READ, self._on_output_ready(replica)
        )
        log.debug("%s pid %d spawned", replica.name, pid)

    def ack_endpoint(self) -> str | None:
        if not self.pipeline.exactly_once:
            return None
        return f"ipc://{self.run_dir}/ack.sock"

    def _reap(self) -> None:
        for pid, status in self.launcher.reap():
            replica = self.by_pid.pop(pid, None)
            self.health.forget(pid)
            if replica is not None:
                self._on_exit(replica, status)

    def _on_exit(self, replica: Replica, status: int) -> None:
        # Read what the process said before it died: its last heartbeat, its
        # error, the end of its output.
        if replica.channel is not None:
            for message in replica.channel.receive():
                self._on_message(replica, message)
            self._forget_fd(replica.channel)
            replica.channel.close()
            replica.channel = None
        self._drain_output(replica)
        code = os.waitstatus_to_exitcode(status)
        replica.exit_code = code
        replica.exit = describe_exit(code)
        for key, value in replica.counters.items():
            if not isinstance(value, bool):
                replica.totals[key] = replica.total(key)
        replica.counters = {}
        replica.pid = None
        busy, src, key = SLOT.unpack_from(replica.slot) if replica.slot else (0, 0, 0)

        if replica.stop_requested:
            replica.state = "stopped"
            log.debug("%s stopped (%s)", replica.name, replica.exit)
            if replica.after_stop is not None:
                self._after_requested_stop(replica, busy, src, key)
            return
        error = replica.error or {}
        reason = replica.exit
        if error.get("kind") in HEALTH_REASONS:
            reason = error["kind"]
        log.warning(
            "%s pid %s exited unexpectedly: %s%s",
            replica.name,
            replica.last_pid,
            reason,
            f" ({error['message']})" if error.get("kind") == "exception" else "",
        )
        pinned = False
        if self.status in ("running", "starting") and replica.stage.role != "source":
            self._redeliver(replica, busy, src, key)
            pinned = (
                self.pipeline.exactly_once
                and ("seq" in error or busy == 1)
                and self._has_progressed(replica.stage)
            )
        self._after_crash(replica, code, reason or "", pinned)

    def _redeliver(self, replica: Replica, busy: int, src: int, key: int) -> None:
        """Tell the sources that what this replica held is lost: send it again."""
        if not self.pipeline.exactly_once:
            return
        blame = None
        error = replica.error or {}
        if "seq" in error:
            blame = {"src": error["src"], "key": error["key"], "seq": error["seq"]}
        elif busy:
            blame = {"src": src, "key": key}
        if blame is not None:
            blame["reason"] = replica.exit
            blame["detail"] = error.get("traceback") or "\n".join(replica.tail)
        for source in self.sources:
            if source.channel is not None:
                source.channel.send({"t": "redeliver", "blame": blame})

    def _after_crash(
        self, replica: Replica, code: int, reason: str, pinned: bool = False
    ) -> None:
        """Restart a replica that exited on its own, or fail the run.

        A crash ``pinned`` on one input (the function raised on it, or the
        process died holding a frame of that input alone) of a stage that
        does handle other inputs is the data's fault, and it is already
        bounded: the input is quarantined after ``max_attempts`` such
        crashes, and the run fails past ``max_quarantined``.  Counting it
        towards the restart intensity too would fail a run over a handful of
        bad records, so it is restarted at once instead.  A stage that has
        not finished a single input (it exits at once, or fails on every
        record) is broken, not fed bad data: its crashes count as usual.
        """
        stage = replica.stage
        if self.status not in ("starting", "running"):
            replica.state = "exited"
            return
        error = replica.error or {}
        if error.get("kind") == "exception" and error.get("message"):
            why = f"{reason} ({error['message']})"  # what the function raised
        else:
            why = reason
        if code == EXIT_SETUP:
            message = (replica.error or {}).get("message") or replica.exit or ""
            self._fail(message, replica)
            return
        # A replica we stopped for its health exits 0, and is still a failure.
        failed = code != 0 or reason in HEALTH_REASONS
        wanted = stage.restart == "always" or (stage.restart == "on-failure" and failed)
        if not wanted:
            replica.state = "exited"
            if stage.role == "source" and code == 0:
                return
            self._fail(f"{why} (restart = {stage.restart!r})", replica)
            return
        if not self.pipeline.exactly_once and stage.role in _NOT_RESTARTABLE:
            replica.state = "exited"
            self._fail(f"{why}; {_NOT_RESTARTABLE[stage.role]}", replica)
            return

        if pinned:
            self._restart_pinned(replica, reason)
            return

        now = self.clock()
        if replica.ready_at is not None and now - replica.ready_at > HEALTHY_AFTER_S:
            replica.failures.clear()
        replica.failures.append(now)
        while replica.failures and now - replica.failures[0] > stage.restart_window:
            replica.failures.popleft()
        if len(replica.failures) > stage.max_restarts:
            self._fail(
                f"{why}; restarted {stage.max_restarts} times within "
                f"{stage.restart_window:g} s, giving up",
                replica,
            )
            return
        delay = backoff_delay(stage, len(replica.failures))
        replica.state = "backoff"
        replica.restart_at = now + delay
        replica.pending_reason = reason
        log.warning(
            "%s restarting in %.3f s (restart %d of at most %d in %g s)",
            replica.name,
            delay,
            len(replica.failures),
            stage.max_restarts,
            stage.restart_window,
        )

    def _restart_pinned(self, replica: Replica, reason: str) -> None:
        replica.state = "backoff"
        replica.restart_at = self.clock()
        replica.pending_reason = reason
        log.warning(
            "%s restarting at once: the crash is pinned on one input, "
            "which is quarantined after %d attempts",
            replica.name,
            self.pipeline.max_attempts,
        )

    def _restart_due(self) -> None:
        now = self.clock()
        for replica in self.replicas:
            if replica.restart_at is not None and now >= replica.restart_at:
                replica.restart_at = None
                replica.restarts.append(
                    {"at": time.time(), "reason": replica.pending_reason}
                )
                self._spawn(replica)

    def _check_commands_ready(self) -> None:
        """A command stage says nothing: its connections tell when it is ready."""
        for replica in self.replicas:
            if (
                replica.stage.command is not None
                and replica.state == "starting"
                and replica.pid is not None
                and command.is_ready(replica.pid, replica.stage)
            ):
                self._on_message(replica, {"t": "ready"})

    def _check_heartbeats(self) -> None:
        """A replica that stopped sending heartbeats is hung: kill it."""
        now = self.clock()
        for replica in self.replicas:
            if replica.state != "ready" or replica.pid is None:
                continue
            if replica.stage.command is not None and not replica.counters:
                continue  # a command stage that does not send heartbeats
            if now - replica.last_heartbeat > replica.stage.heartbeat_timeout:
                log.warning(
                    "%s pid %d sent no heartbeat for %.1f s: hung, killing it",
                    replica.name,
                    replica.pid,
                    now - replica.last_heartbeat,
                )
                replica.state = "hung"
                replica.error = {"kind": "hung", "message": "hung"}
                self._signal(replica, signal.SIGKILL)

    def _check_health(self) -> None:
        """Sample the stage processes when due; restart those over a limit."""
        for pid in self.health.overdue():
            replica = self.by_pid.get(pid)
            if replica is not None:
                log.warning(
                    "%s pid %d did not stop within %g s: killing it",
                    replica.name,
                    pid,
                    self.pipeline.grace_period,
                )
                self._signal(replica, signal.SIGKILL)
        if not self.health.sample_due(self.clock()):
            return
        self._check_never_ready()
        zombies = self.health.zombies_seen
        verdicts = self.health.sample(self.replicas)
        if self.health.zombies_seen > zombies:  # dead, whatever SIGCHLD said
            self._reap()
        for verdict in verdicts:
            replica = verdict.replica
            if self.status == "running" and replica.state == "ready":
                self._restart_gracefully(replica, verdict.reason, verdict.detail)

    def _check_never_ready(self) -> None:
        """A replacement that never gets ready is hung as well.

        Start-up has its own deadline (``ready_timeout``, failing the run) and
        a stage waiting for its peers gives up by itself (exit 78) after
        ``ready_timeout``; this catches only a process that cannot even do
        that (stopped, deadlocked), so it waits ``heartbeat_timeout`` longer.
        """
        if self.status != "running":
            return
        now = self.clock()
        for replica in self.replicas:
            if replica.state != "starting" or replica.pid is None:
                continue
            limit = self.pipeline.ready_timeout + replica.stage.heartbeat_timeout
            if now - replica.started_at > limit:
                log.warning(
                    "%s pid %d not ready after %.1f s: hung, killing it",
                    replica.name,
                    replica.pid,
                    now - replica.started_at,
                )
                replica.state = "hung"
                replica.error = {"kind": "hung", "message": "never ready"}
                self._signal(replica, signal.SIGKILL)

    def _restart_gracefully(self, replica: Replica, reason: str, detail: str) -> None:
        """SIGTERM now, SIGKILL after the grace period; then a restart as usual."""
        assert replica.pid is not None
        log.warning("%s pid %d %s: restarting it", replica.name, replica.pid, detail)
        replica.state = "terminating"
        replica.error = {"kind": reason, "message": detail}
        self._signal(replica, signal.SIGTERM)
        self.health.stopping(replica.pid, self.pipeline.grace_period)

    def _check_progress(self) -> None:
        mark = tuple(r.total("counted") for r in self.sinks) + tuple(
            r.total("produced") for r in self.sources
        )
        if mark != self._progress_mark:
            self._progress_mark = mark
            self.last_progress = self.clock()

    def _has_progressed(self, stage: Stage) -> bool:
        """Whether ``stage`` has finished any input yet.

        A replica that crashes soon after it started may never have sent a
        heartbeat with its counters: inputs counted by a sink are proof that
        every stage handled some, and the sinks do not die with the workers.
        """
        if self.counted():
            return True
        key = "counted" if stage.role == "sink" else "processed"
        return any(r.total(key) for r in self.replicas if r.stage is stage)

    def _check_quarantine(self) -> None:
        limit = self.pipeline.max_quarantined
        if self.status == "running" and self.quarantined() > limit:
            self._fail(
                f"{self.quarantined()} inputs quarantined, more than "
                f"pipeline.max_quarantined = {limit}: a stage that fails on this "
                "many inputs looks broken rather than fed bad data (see "
                "run/dead-letter.jsonl; raise max_quarantined if the data is "
                "that dirty)"
            )

    def _signal(self, replica: Replica, signum: int) -> None:
        if replica.pid is None:
            return
        self.launcher.signal(replica.pid, signum)

    def _fail(self, reason: str, replica: Replica | None = None) -> None:
        if self.status == "failed":
            return
        self.status = "failed"
        self.failure = f"{replica.name}: {reason}" if replica else reason
        self.failed_replica = replica
        log.error("giving up: %s", self.failure)

    # -- live changes: orchestrator scale and restart ------------------------

    def live_replicas(self, stage: Stage) -> list[Replica]:
        """The replicas of ``stage`` that are not on their way out."""
        return [
            r for r in self.replicas if r.stage is stage and r.after_stop != "retire"
        ]

    def _expected_peers(self, stage: Stage) -> int:
        """``topology.expected_peers``, counting the replicas there are now.

        After `orchestrator scale`, a restarted source must wait for the
        workers that exist, not for the number in the file.
        """
        if stage.push is None or stage.push.bind is None:
            return topology.expected_peers(self.pipeline, stage)
        return sum(
            len(self.live_replicas(other))
            for other in self.pipeline.stages
            if other.pull is not None and stage.push.bind in other.pull.connect
        )

    def add_replica(self, stage: Stage) -> Replica:
        """Spawn one more replica of ``stage`` while the pipeline runs.

        Sources wait for their peers only at start; a new worker connects and
        a PUSH socket deals to it from its handshake on.
        """
        same = [i for i, r in enumerate(self.replicas) if r.stage is stage]
        index = 1 + max(self.replicas[i].index for i in same)
        replica = Replica(stage, index, self._log_handler(stage, index))
        self.replicas.insert(same[-1] + 1, replica)
        self._spawn(replica)
        log.info("%s pid %s added", replica.name, replica.pid)
        return replica

    def stop_replica(self, replica: Replica, then: str | None) -> None:
        """Stop one replica gracefully, then restart it or retire it."""
        replica.after_stop = then
        if replica.pid is None:  # waiting for a restart after a crash
            replica.restart_at = None
            self._after_requested_stop(replica, 0, 0, 0)
            return
        replica.stop_requested = True
        replica.state = "stopping"
        self._signal(replica, signal.SIGTERM)

    def _after_requested_stop(
        self, replica: Replica, busy: int, src: int, key: int
    ) -> None:
        then, replica.after_stop = replica.after_stop, None
        if self.status != "running":
            return
        # What was queued for a stopped worker or sink went with it; with
        # exactly-once delivery the sources send it again (nothing is lost).
        if replica.stage.role != "source":
            self._redeliver(replica, busy, src, key)
        if then == "restart":
            replica.state = "restarting"
            replica.pending_reason = "requested"
            replica.restart_at = self.clock()
        elif then == "retire":
            self.replicas.remove(replica)
            replica.log_handler.close()
            log.info("%s retired", replica.name)

    # -- completion -----------------------------------------------------------

    def produced(self) -> int:
        return sum(int(r.total("produced")) for r in self.sources)

    def counted(self) -> int:
        return sum(int(r.total("counted")) for r in self.sinks)

    def quarantined(self) -> int:
        return sum(int(r.total("quarantined")) for r in self.sources)

    def _finished(self) -> bool:
        if not self.sources or not all(
            r.counters.get("exhausted") or r.totals.get("exhausted")
            for r in self.sources
        ):
            return False
        if self.pipeline.exactly_once:
            return all(r.counters.get("done") for r in self.sources)
        if self.counted() >= self.produced():
            return True
        return self.clock() - self.last_progress > SETTLE_S

    def _lost(self) -> int:
        return max(0, self.produced() - self.counted() - self.quarantined())

    # -- stopping -------------------------------------------------------------

    def _abort_sinks(self) -> None:
        """Tell the sinks that the stream will not complete (see RunAborted)."""
        for replica in self.sinks:
            if replica.channel is not None and replica.pid is not None:
                replica.channel.send({"t": "abort"})

    def _stop_all(self) -> None:
        """Stop sources, then workers, then sinks: SIGTERM, grace, SIGKILL."""
        for replica in self.replicas:
            replica.restart_at = None
        for group in reversed(self.groups):
            members = [r for r in self.replicas if r.stage in group]
            self._stop(members)
        self._kill_all()

    def _stop(self, members: list[Replica]) -> None:
        for replica in members:
            if replica.pid is not None:
                replica.stop_requested = True
                replica.state = "stopping"
                self._signal(replica, signal.SIGTERM)
        deadline = self.clock() + self.pipeline.grace_period
        while any(r.pid is not None for r in members) and self.clock() < deadline:
            self._step(0.05)
        for replica in members:
            if replica.pid is not None:
                log.warning(
                    "%s pid %d did not stop within %g s: killing it",
                    replica.name,
                    replica.pid,
                    self.pipeline.grace_period,
                )
                self._signal(replica, signal.SIGKILL)

    def _kill_all(self) -> None:
        for replica in self.replicas:
            if replica.pid is not None:
                replica.stop_requested = True
                self._signal(replica, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.by_pid and time.monotonic() < deadline:
            self._reap()
            if self.by_pid:
                time.sleep(0.005)

    # -- signals --------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            self._old_handlers[signum] = signal.signal(signum, _note_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._forget_fd(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _counters(value: Any) -> dict[str, Any] | None:
    """Counters as the runtime sends them: numbers, flags, maps of numbers."""
    if not isinstance(value, dict):
        return None
    clean: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, (int, float, bool)):
            clean[str(key)] = item
        elif isinstance(item, dict) and all(
            isinstance(v, (int, float)) for v in item.values()
        ):
            clean[str(key)] = {str(k): v for k, v in item.items()}
    return clean


def _note_signal(signum: int, frame: Any) -> None:
    """The wake-up fd carries the signal; the loop acts on it, not the handler."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def backoff_delay(
    stage: Stage, failures: int, jitter: Callable[[], float] = random.random
) -> float:
    """Exponential back-off with jitter; the first restart is immediate."""
    if failures <= 1:
        return 0.0
    delay = min(stage.backoff * 2 ** (failures - 2), stage.backoff_max)
    return delay * (0.5 + jitter())
