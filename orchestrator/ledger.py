"""Delivery accounting: which inputs are in flight, counted, or quarantined.

Every input gets a sequence number from its source.  Inputs travel in frames
of contiguous sequence numbers, and everything a worker derives from a frame
travels on as one frame under the same key, so the sink always sees an input
frame's results together.  The sink counts each sequence number once
(:class:`SeqSet`), logs what it counted in SQLite and commits before it
acknowledges (:class:`Ledger`); the source keeps unacknowledged frames in a
bounded :class:`Window` and sends them again when a process on their path
dies or they have waited too long.
"""

from __future__ import annotations

import sqlite3
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SeqSet:
    """A set of integers kept as sorted, disjoint, half-open ranges.

    Inputs are counted in runs, so a set of millions of sequence numbers
    stays a handful of ranges; its size is bounded by the reordering a
    bounded window allows, not by the length of the stream.
    """

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for lo, hi in ranges or ():
            self.add(lo, hi)

    def add(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Add ``[lo, hi)`` and return the parts of it that were not yet present."""
        if hi <= lo:
            return []
        first = bisect_left(self._ends, lo)  # an interval ending at lo merges too
        last = first
        fresh: list[tuple[int, int]] = []
        cursor, new_lo, new_hi = lo, lo, hi
        while last < len(self._starts) and self._starts[last] <= hi:
            start, end = self._starts[last], self._ends[last]
            if start > cursor:
                fresh.append((cursor, start))
            cursor = max(cursor, end)
            new_lo, new_hi = min(new_lo, start), max(new_hi, end)
            last += 1
        if cursor < hi:
            fresh.append((cursor, hi))
        self._starts[first:last] = [new_lo]
        self._ends[first:last] = [new_hi]
        return fresh

    def __contains__(self, seq: int) -> bool:
        index = bisect_left(self._ends, seq + 1)
        return index < len(self._starts) and self._starts[index] <= seq

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=False))

    def __len__(self) -> int:
        return sum(end - start for start, end in self.ranges())

    def gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of ``[lo, hi)`` not in the set."""
        probe = SeqSet(self.ranges())
        return probe.add(lo, hi)


@dataclass
class Batch:
    """A frame of inputs sent and not yet acknowledged."""

    seq: int
    records: list[Any]
    sent_at: float
    redelivered: bool = False

    @property
    def end(self) -> int:
        return self.seq + len(self.records)


@dataclass
class Window:
    """The source's frames in flight, bounded by a number of inputs."""

    limit: int
    frames: dict[int, Batch] = field(default_factory=dict)
    size: int = 0

    def add(self, key: int, batch: Batch) -> None:
        self.frames[key] = batch
        self.size += len(batch.records)

    def ack(self, key: int) -> Batch | None:
        batch = self.frames.pop(key, None)
        if batch is not None:
            self.size -= len(batch.records)
        return batch

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        now = time.monotonic() if now is None else now
        return [key for key, b in self.frames.items() if now - b.sent_at > timeout]


class Ledger:
    """The sink's durable record of what it counted, in SQLite.

    Each accepted frame is logged as it arrived (its raw bytes) with the
    ranges of it that were new.  After a crash, replaying the log rebuilds
    both the set of counted inputs and the user's sink state, exactly.
    A commit is in the operating system's hands once ``COMMIT`` returns, so
    it survives the death of the process, which is the failure we guard
    against.  It is never fsynced (``synchronous=OFF``): a run does not
    outlive its machine (the sources' unacknowledged frames are in memory),
    and the checkpoints' fsyncs stalled the sink for half of the ledger's
    time.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counted ("
            " id INTEGER PRIMARY KEY, src INTEGER, lo INTEGER, hi INTEGER,"
            " frame_seq INTEGER, frame BLOB)"
        )
        self._pending: list[tuple[int, int, int, int, bytes]] = []

    def log(self, src: int, lo: int, hi: int, frame_seq: int, frame: bytes) -> None:
        self._pending.append((src, lo, hi, frame_seq, frame))

    def commit(self) -> None:
        if not self._pending:
            return
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO counted (src, lo, hi, frame_seq, frame) VALUES (?,?,?,?,?)",
            self._pending,
        )
        self._db.execute("COMMIT")
        self._pending.clear()

    def replay(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        cursor = self._db.execute(
            "SELECT src, lo, hi, frame_seq, frame FROM counted ORDER BY id"
        )
        yield from cursor

    def close(self) -> None:
        self._db.close()
