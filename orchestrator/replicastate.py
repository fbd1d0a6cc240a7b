"""The supervisor's record of one replica, across all its incarnations.

Its state, its counters added up over restarts, how its last process ended,
its restart intensity and back-off, and what its control messages change.
(``replica.py`` is the other end: the stage process's entry point.)
"""

from __future__ import annotations

import logging
import mmap
import random
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .channel import Channel
from .config import Stage

log = logging.getLogger(__name__)

# A replica that has run this long without trouble starts its back-off over.
HEALTHY_AFTER_S = 10.0
# Lines of a stage's output kept to explain its death.
TAIL_LINES = 20


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

    def note_failure(self, now: float) -> int:
        """Count a crash towards the restart intensity: crashes in the window."""
        if self.ready_at is not None and now - self.ready_at > HEALTHY_AFTER_S:
            self.failures.clear()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.stage.restart_window:
            self.failures.popleft()
        return len(self.failures)

    def blame(self, busy: int, src: int, key: int) -> dict[str, Any] | None:
        """What this replica died holding: the input it failed on, or its frame.

        ``busy``, ``src`` and ``key`` are what its shared-memory slot said.
        """
        blame = None
        error = self.error or {}
        if "seq" in error:
            blame = {"src": error["src"], "key": error["key"], "seq": error["seq"]}
        elif busy:
            blame = {"src": src, "key": key}
        if blame is not None:
            blame["reason"] = self.exit
            blame["detail"] = error.get("traceback") or "\n".join(self.tail)
            blame["replica"] = self.name  # the source writes the dead letter
            if error.get("kind") == "exception":
                blame["raised"] = error.get("message")
        return blame

    def on_message(self, message: Any, clock: Callable[[], float]) -> None:
        """What a control message from the replica changes in this record."""
        # A command stage may write anything to its control fd: what is not
        # a well-formed message is logged and ignored, never fatal.
        if not isinstance(message, dict):
            log.warning(
                "%s sent a malformed control message: %.80r", self.name, message
            )
            return
        kind = message.get("t")
        if kind in ("hb", "final"):
            counters = _counters(message.get("c"))
            if counters is None:
                log.warning(
                    "%s sent malformed counters: %.80r", self.name, message.get("c")
                )
                return
            message = {**message, "c": counters}
        if kind == "hb":
            self.counters = message["c"]
            self.last_heartbeat = clock()
        elif kind == "ready":
            self.state = "ready"
            self.ready_at = clock()
            self.last_heartbeat = self.ready_at
            log.info("%s pid %s ready", self.name, self.pid)
        elif kind == "first_input" and isinstance(message.get("at"), (int, float)):
            self.first_input_at = message["at"]
        elif kind == "final":
            self.counters = message["c"]
            self.summary = message.get("summary")
        elif kind == "error":
            self.error = message
            if message.get("kind") == "exception":
                log.error(
                    "%s pid %s: the stage function raised:\n%s",
                    self.name,
                    self.pid,
                    message.get("traceback", "").rstrip(),
                )
            else:
                log.error("%s pid %s: %s", self.name, self.pid, message.get("message"))


_STATE_COUNTERS = {
    "source": {"produced", "acked", "quarantined"},
    "sink": {"counted", "results", "per_via"},
}


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
