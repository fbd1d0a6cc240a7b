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
import selectors
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import topology
from .channel import Channel
from .config import Pipeline, Stage
from .health import HealthMonitor
from .launcher import Launcher, for_pipeline
from .output import OutputReader, log_handler
from .replicastate import Replica, backoff_delay, describe_exit
from .runtime import EXIT_SETUP, SLOT, ReplicaSpec
from .wakeup import WakeupPipe
from .watchdog import HEALTH_REASONS, Watchdog

log = logging.getLogger(__name__)

# Without delivery accounting, a run whose sources are done and whose counts
# have not moved for this long is over, with whatever was lost, lost.
SETTLE_S = 1.0
# How long to wait for reaping after SIGKILL before giving up on a process.
KILL_WAIT_S = 2.0
# Without the sink's ledger (delivery = "at-most-once") these roles cannot
# be restarted without making the run's counts lie.
_NOT_RESTARTABLE = {
    "source": "with at-most-once delivery a restarted source would send its "
    "stream again from the start (duplicates), so it is not restarted",
    "sink": "with at-most-once delivery what the sink had counted died with "
    "it, so it is not restarted",
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
        self.clock = clock
        self.groups = topology.start_order(pipeline)
        self.replicas: list[Replica] = [
            Replica(stage, index, log_handler(logs_dir, stage, index))
            for group in self.groups
            for stage in group
            for index in range(stage.replicas)
        ]
        self.sources = [r for r in self.replicas if r.stage.role == "source"]
        self.sinks = [r for r in self.replicas if r.stage.role == "sink"]
        self.by_pid: dict[int, Replica] = {}
        self.selector = selectors.DefaultSelector()
        self.outputs = OutputReader(self.selector, on_output)
        self.status = "starting"
        self.failure: str | None = None
        self.failed_replica: Replica | None = None
        # Restarts of replicas that `scale` removed since: still restarts.
        self.retired_restarts = 0
        self.signal_received: int | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.finished_at: float | None = None
        self.last_progress = 0.0
        self._progress_mark: tuple[Any, ...] = ()
        self.wakeup = WakeupPipe(self.selector)
        self.hooks: list[Callable[[], None]] = []  # called on every loop turn
        self.health = HealthMonitor(pipeline.health_interval, clock=clock)
        self.watchdog = Watchdog(self)
        # Forked children locally; Ray actors, on a cluster, with "ray".
        self.launcher = launcher or for_pipeline(pipeline, run_dir)

    # -- the run, in phases ---------------------------------------------------

    def run(self, timeout: float | None = None) -> None:
        """Start, supervise until finished or failed, stop; never leaves a child."""
        self.started_at = self.clock()
        deadline = None if timeout is None else self.started_at + timeout
        self.wakeup.install(self._on_wakeup)
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
                self.wakeup.restore()
            # Heartbeats lag; the counts each stage sent as it stopped do not.
            if self.status == "completed" and self.lost():
                self.status = "failed"
                self.failure = self._loss()
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
                    late = ", ".join(r.name for r in members if r.state != "ready")
                    timeout = self.pipeline.ready_timeout
                    self._fail_start(f"not ready within {timeout:g} s: {late}")
                    return False
                self._step(0.05)
        return True

    def _supervise(self, deadline: float | None) -> None:
        self.last_progress = self.clock()
        while not self._should_end(deadline):
            if self._finished():
                # At-most-once, what a crash took is gone: fail now, so the
                # sinks are aborted. (Exactly-once, the sources' "done" may
                # be ahead of the sink's heartbeat; the final counts decide.)
                if not self.pipeline.exactly_once and self.lost():
                    self._fail(self._loss())
                else:
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
        self.watchdog.check()
        self._check_progress()
        self._check_quarantine()
        for hook in self.hooks:
            hook()

    def _on_wakeup(self, fd: Any) -> None:
        data = self.wakeup.read()
        if data is None:
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
                replica.on_message(message, self.clock)
            if channel.closed:
                self._forget_fd(channel)

        return handle

    def _forget_fd(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

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
        self.outputs.watch(replica, output)
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
                replica.on_message(message, self.clock)
            self._forget_fd(replica.channel)
            replica.channel.close()
            replica.channel = None
        self.outputs.drain(replica)
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
            "%s pid %s exited unexpectedly: %s",
            replica.name,
            replica.last_pid,
            _exit_reason(replica, reason),
        )
        pinned = False
        if self.status in ("running", "starting") and replica.stage.role != "source":
            self._redeliver(replica, busy, src, key)
            pinned = (
                self.pipeline.exactly_once
                and replica.stage.role == "worker"
                and ("seq" in error or busy == 1)
                and self._has_progressed(replica.stage)
            )
        self._after_crash(replica, code, reason or "", pinned)

    def _redeliver(self, replica: Replica, busy: int, src: int, key: int) -> None:
        """Tell the sources that what this replica held is lost: send it again."""
        if not self.pipeline.exactly_once:
            return
        blame = replica.blame(busy, src, key)
        for source in self.sources:
            if source.channel is not None:
                source.channel.send({"t": "redeliver", "blame": blame})

    def _after_crash(
        self, replica: Replica, code: int, reason: str, pinned: bool = False
    ) -> None:
        """Restart a replica that exited on its own, or fail the run.

        A worker's crash ``pinned`` on one input (the function raised on it,
        or the process died holding a frame of that input alone) of a stage
        that does handle other inputs is the data's fault, and it is already
        bounded: the input is quarantined after ``max_attempts`` such
        crashes, and the run fails past ``max_quarantined``.  Counting it
        towards the restart intensity too would fail a run over a handful of
        bad records, so it is restarted at once instead.  A stage that has
        not finished a single input (it exits at once, or fails on every
        record) is broken, not fed bad data: its crashes count as usual.  So
        do a sink's: it replays its ledger after each, which proves nothing
        about the record it died on.
        """
        stage = replica.stage
        if self.status not in ("starting", "running"):
            replica.state = "exited"
            return
        why = _exit_reason(replica, reason)
        if code == EXIT_SETUP:
            message = (replica.error or {}).get("message") or replica.exit or ""
            if self.status == "starting":  # its peers may be the ones crashing
                self._fail_start(message, replica)
            else:
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
        failures = replica.note_failure(now)
        if failures > stage.max_restarts:
            self._fail(
                f"{why}; restarted {stage.max_restarts} times within "
                f"{stage.restart_window:g} s, giving up",
                replica,
            )
            return
        delay = backoff_delay(stage, failures)
        replica.state = "backoff"
        replica.restart_at = now + delay
        replica.pending_reason = reason
        log.warning(
            "%s restarting in %.3f s (restart %d of at most %d in %g s)",
            replica.name,
            delay,
            failures,
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

    def _check_progress(self) -> None:
        mark = tuple(r.total("counted") for r in self.sinks) + tuple(
            r.total("produced") for r in self.sources
        )
        if mark != self._progress_mark:
            self._progress_mark = mark
            self.last_progress = self.clock()

    def _has_progressed(self, stage: Stage) -> bool:
        """Whether the worker stage ``stage`` has finished any input yet.

        A replica that crashes soon after it started may never have sent a
        heartbeat with its counters: inputs counted by a sink are proof that
        every stage handled some, and the sinks do not die with the workers.
        """
        if self.counted():
            return True
        return any(r.total("processed") for r in self.replicas if r.stage is stage)

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

    def _fail_start(self, what: str, replica: Replica | None = None) -> None:
        """Fail a start, naming the replica that kept crashing if there is one.

        A stage can be late, or give up waiting for its peers, because
        another one keeps exiting (workers wait for a sink that dies at
        start): that one is the news.
        """
        crashed = [r for r in self.replicas if r.restarts or r.state == "backoff"]
        if not crashed:
            self._fail(what, replica)
            return
        worst = max(crashed, key=lambda r: len(r.restarts))
        where = f"{replica.name}: {what}" if replica else what
        self._fail(
            f"{_exit_reason(worst)} before the pipeline was ready (restarted "
            f"{len(worst.restarts)} times); {where}",
            worst,
        )

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
        replica = Replica(stage, index, log_handler(self.logs_dir, stage, index))
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
            self.retired_restarts += len(replica.restarts)
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

    def _loss(self) -> str:
        """The failure of a run that lost inputs, with the crashes that did it."""
        crashed = [
            f"{r.name} {_exit_reason(r, r.restarts[-1]['reason'])}"
            for r in self.replicas
            if r.restarts
        ]
        cause = f" (crashed: {', '.join(crashed)})" if crashed else ""
        return f"{self.lost()} inputs lost{cause}"

    def lost(self) -> int:
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


def _exit_reason(replica: Replica, reason: str | None = None) -> str:
    """How ``replica`` last ended, with what its function raised if it did."""
    reason = reason or replica.exit or "exited"
    error = replica.error or {}
    if error.get("kind") == "exception" and error.get("message"):
        return f"{reason} ({error['message']})"
    return reason
