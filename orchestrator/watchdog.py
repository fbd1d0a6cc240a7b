"""What stages do not report themselves: readiness, hangs, limits.

Once a turn of the supervisor's loop, after the restarts that are due: a
command stage is ready when its connections say so; a replica whose
heartbeats stopped, or a replacement that never got ready, is hung and
killed (its exit is then taken as a crash); a replica the health monitor
judged over ``max_rss`` or ``max_cpu`` is stopped gracefully and restarted.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from . import command
from .replicastate import Replica

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

# Why the supervisor itself ended a replica that had not crashed.
HEALTH_REASONS = ("hung", "max_rss", "max_cpu")


class Watchdog:
    """The checks of one supervisor; they act through its signals and reaping."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def check(self) -> None:
        self.check_commands_ready()
        self.check_heartbeats()
        self.check_health()

    def check_commands_ready(self) -> None:
        """A command stage says nothing: its connections tell when it is ready."""
        sup = self.supervisor
        for replica in sup.replicas:
            if (
                replica.stage.command is not None
                and replica.state == "starting"
                and replica.pid is not None
                and command.is_ready(replica.pid, replica.stage)
            ):
                replica.on_message({"t": "ready"}, sup.clock)

    def check_heartbeats(self) -> None:
        """A replica that stopped sending heartbeats is hung: kill it."""
        sup = self.supervisor
        now = sup.clock()
        for replica in sup.replicas:
            if replica.state != "ready" or replica.pid is None:
                continue
            if replica.stage.command is not None and not replica.counters:
                continue  # a command stage that does not send heartbeats
            silent = now - replica.last_heartbeat
            if silent > replica.stage.heartbeat_timeout:
                self._kill_hung(
                    replica, "hung", f"sent no heartbeat for {silent:.1f} s"
                )

    def check_health(self) -> None:
        """Sample the stage processes when due; restart those over a limit."""
        sup = self.supervisor
        for pid in sup.health.overdue():
            replica = sup.by_pid.get(pid)
            if replica is not None:
                log.warning(
                    "%s pid %d did not stop within %g s: killing it",
                    replica.name,
                    pid,
                    sup.pipeline.grace_period,
                )
                sup._signal(replica, signal.SIGKILL)
        if not sup.health.sample_due(sup.clock()):
            return
        self.check_never_ready()
        zombies = sup.health.zombies_seen
        verdicts = sup.health.sample(sup.replicas)
        if sup.health.zombies_seen > zombies:  # dead, whatever SIGCHLD said
            sup._reap()
        for verdict in verdicts:
            replica = verdict.replica
            if sup.status == "running" and replica.state == "ready":
                self.restart_gracefully(replica, verdict.reason, verdict.detail)

    def check_never_ready(self) -> None:
        """A replacement that never gets ready is hung as well.

        Start-up has its own deadline (``ready_timeout``, failing the run) and
        a stage waiting for its peers gives up by itself (exit 78) after
        ``ready_timeout``; this catches only a process that cannot even do
        that (stopped, deadlocked), so it waits ``heartbeat_timeout`` longer.
        """
        sup = self.supervisor
        if sup.status != "running":
            return
        now = sup.clock()
        for replica in sup.replicas:
            if replica.state != "starting" or replica.pid is None:
                continue
            limit = sup.pipeline.ready_timeout + replica.stage.heartbeat_timeout
            starting = now - replica.started_at
            if starting > limit:
                self._kill_hung(
                    replica, "never ready", f"not ready after {starting:.1f} s"
                )

    def _kill_hung(self, replica: Replica, message: str, why: str) -> None:
        log.warning("%s pid %d %s: hung, killing it", replica.name, replica.pid, why)
        replica.state = "hung"
        replica.error = {"kind": "hung", "message": message}
        self.supervisor._signal(replica, signal.SIGKILL)

    def restart_gracefully(self, replica: Replica, reason: str, detail: str) -> None:
        """SIGTERM now, SIGKILL after the grace period; then a restart as usual."""
        sup = self.supervisor
        assert replica.pid is not None
        log.warning("%s pid %d %s: restarting it", replica.name, replica.pid, detail)
        replica.state = "terminating"
        replica.error = {"kind": reason, "message": detail}
        sup._signal(replica, signal.SIGTERM)
        sup.health.stopping(replica.pid, sup.pipeline.grace_period)
