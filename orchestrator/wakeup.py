"""Signals as bytes on a pipe, so the supervisor's selector sees them.

With ``signal.set_wakeup_fd`` the handlers do nothing and each signal's
number is written to a pipe: the loop acts on a signal between two of its
turns, as on any readable file descriptor, never in the middle of one.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM)


class WakeupPipe:
    """The wake-up pipe of one run, registered with the supervisor's selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self._wake_r = -1
        self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}

    def install(self, handler: Callable[[Any], None]) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, _note_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, handler)

    def read(self) -> bytes | None:
        """The signal numbers that arrived, one a byte; None if there are none."""
        try:
            return os.read(self._wake_r, 4096)
        except BlockingIOError:
            return None

    def restore(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _note_signal(signum: int, frame: Any) -> None:
    """The wake-up fd carries the signal; the loop acts on it, not the handler."""
