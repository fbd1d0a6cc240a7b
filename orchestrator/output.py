"""A replica's output: the pipe the supervisor reads, its log file, its tail.

stdout and stderr of a replica go to one pipe.  Each line read from it goes
to the replica's rotating log file (``orchestrator logs`` reads them), into
its tail (to explain its death) and to ``on_output`` (``run`` echoes it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from .config import Stage
from .replicastate import Replica

# Reads of a dead replica's output pipe before closing it regardless.
DRAIN_CHUNKS = 16
# Rotate a replica's log file at this size, keeping this many old ones.
LOG_BYTES = 10 * 2**20
LOG_BACKUPS = 3


def log_handler(logs_dir: Path, stage: Stage, index: int) -> logging.Handler:
    handler = RotatingFileHandler(
        logs_dir / f"{stage.name}.{index}.log",
        maxBytes=LOG_BYTES,
        backupCount=LOG_BACKUPS,
        encoding="utf-8",
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return handler


class OutputReader:
    """Reads the replicas' output pipes, from the supervisor's selector."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        on_output: Callable[[Replica, str], None] | None = None,
    ) -> None:
        self.selector = selector
        self.on_output = on_output

    def watch(self, replica: Replica, output: int) -> None:
        """Read ``output``, the pipe of ``replica``'s new process, as it comes."""

        def handle(fd: Any) -> None:
            self.read(replica)

        self.selector.register(output, selectors.EVENT_READ, handle)

    def read(self, replica: Replica, final: bool = False) -> None:
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
            self._forget(replica.output)
            os.close(replica.output)
            replica.output = None

    def drain(self, replica: Replica) -> None:
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
            self.read(replica, final=True)
        if replica.output is not None:
            self._forget(replica.output)
            os.close(replica.output)
            replica.output = None

    def _forget(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)
