"""The source side of the stage runtime: reading the stage function's records,
numbering them, framing them, and keeping the unacknowledged ones until the
sink has counted them (or they are quarantined).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import zmq

from .ledger import Batch, SeqSet, Window
from .runtime import (
    HELLO_RETRY_S,
    PATIENCE,
    REDELIVER_DELAY_S,
    ReplicaSpec,
    Runtime,
    UserError,
    user_traceback,
)
from .stagefn import StageContext

log = logging.getLogger(__name__)

# While the reader is inside a chunk, the main thread looks for records this
# often: they are appended without a wake-up.
TRICKLE_POLL_S = 0.01
_END = object()


class _Reader(threading.Thread):
    """Runs the source function in a thread, handing records over in a list.

    A generator may block (reading a socket, a pipe, a slow file); reading it
    in a thread lets the runtime flush a partial frame after ``flush_ms``
    instead of holding a trickle of records back until a frame fills up.
    """

    def __init__(self, records: Any, batch: int, wake_fd: int) -> None:
        super().__init__(name="source-reader", daemon=True)
        self.records = records
        # A list, not a deque: the reader only appends, and take() removes a
        # whole frame's worth in two slice operations instead of a popleft
        # per record.
        self.queue: list[Any] = []
        self.batch = batch
        self.high = batch * 4
        self.room = threading.Event()
        self.wake_fd = wake_fd
        self.done = False
        self.error: BaseException | None = None
        self.first_at = 0.0  # when the oldest record waiting was read
        self.reading = False  # inside a chunk: records may appear unannounced
        self.taken = 0
        self.active = True
        self._last_cpu = 0.0
        self._busy_at = time.monotonic()

    def observe(self, flush_s: float) -> None:
        """Decide whether the source has gone quiet (blocked in the generator).

        Neither wall time nor the reader's progress tells a quiet source from
        one that merely did not get the CPU (two cores, four busy processes)
        or the GIL.  The kernel does: a reader that is not runnable and has
        used no CPU for ``flush_s`` is waiting inside the generator, and its
        partial frame may go.
        """
        now = time.monotonic()
        cpu = self._cpu_time()
        if cpu != self._last_cpu or self._runnable():
            self._last_cpu = cpu
            self._busy_at = now
        self.active = now - self._busy_at < flush_s

    def _cpu_time(self) -> float:
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.ident or 0))
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            return time.monotonic()

    def _runnable(self) -> bool:
        try:
            with open(f"/proc/self/task/{self.native_id}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # the thread ended, or no /proc
            return False
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"

    def ready(self, flush_s: float) -> bool:
        """Is a full frame waiting, or should a partial one go now?

        A partial frame goes out when the source has gone quiet (a trickle:
        its records then wait about one flush interval) or when its oldest
        record has waited far too long.  A busy source fills every frame,
        which keeps the inputs dealt evenly over the workers.
        """
        size = len(self.queue)
        if size >= self.batch:
            return True
        if size == 0:
            return False
        waited = time.monotonic() - self.first_at
        return self.done or not self.active or waited >= flush_s * PATIENCE

    def run(self) -> None:
        queue, batch, high = self.queue, self.batch, self.high
        records = iter(self.records)
        try:
            while True:
                # The first record of a chunk is read on its own: after a
                # quiet spell the main thread must hear of it at once.
                record = next(records, _END)
                if record is _END:
                    break
                queue.append(record)
                if len(queue) == 1:
                    self.first_at = time.monotonic()
                    self._wake()
                # The rest of the chunk in C, no Python per record.  list.extend
                # appends each record as the generator yields it, so a record
                # read while the generator then blocks is in the queue already
                # and the main thread sees it (it polls while ``reading``).
                self.reading = True
                queue.extend(islice(records, batch - 1))
                self.reading = False
                if len(queue) >= batch:
                    self._wake()  # once per frame, not per record: a system call
                    while len(queue) >= high:
                        self.room.clear()
                        if len(queue) >= high:
                            self.room.wait(0.1)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.reading = False
            self.done = True
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_fd, b"r")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def take(self, limit: int) -> list[Any]:
        queue = self.queue
        # Each step is atomic under the GIL and the reader only appends, so
        # the records deleted are exactly the ones copied, even if the reader
        # added more in between.
        records = queue[:limit]
        del queue[: len(records)]
        self.taken += len(records)
        # What arrives next (or is left) has waited since now at most.
        self.first_at = time.monotonic()
        self.room.set()
        return records


class SourceRuntime(Runtime):
    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self.counters.update(
            produced=0,
            acked=0,
            inflight=0,
            redelivered=0,
            quarantined=0,
            exhausted=False,
            done=False,
        )
        self.window = Window(spec.pipeline.window)
        self.seq = 0
        self.key = spec.epoch << 32  # keys of an earlier incarnation never recur
        self.counted = SeqSet()
        self.skip_below = 0  # inputs below this may be counted already
        self.sink_state: list[list[int]] | None = None
        self.strikes: dict[int, int] = {}
        self.quarantined: set[int] = set()
        self.pending_blame: list[dict[str, Any]] = []
        self.redeliver_at: float | None = None

    def status(self) -> dict[str, Any]:
        self.counters["inflight"] = self.window.size
        return dict(self.counters)

    def context(self) -> StageContext:
        return dataclasses.replace(super().context(), _resume=self._start_later)

    def _start_later(self) -> int:
        """The function's stream starts after the delivered prefix (ctx.resume)."""
        start = 0
        for lo, hi in self.counted.ranges():  # sorted and disjoint
            while start in self.quarantined:
                start += 1
            if lo > start:
                break
            start = max(start, hi)
        while start in self.quarantined:
            start += 1
        # Produced is a position in the stream, as if the prefix were read.
        self.seq = self.counters["produced"] = start
        return start

    def run(self, fn: Callable[..., Any]) -> None:
        if self.exactly_once:
            self._resume()
        try:
            records = fn(self.context(), **self.stage.params)
        except Exception as exc:
            raise UserError(user_traceback(exc), setup=True) from exc
        reader = _Reader(records, self.pipeline.batch, self._wake_w)
        reader.start()
        flush_s = self.pipeline.flush_ms / 1000.0
        while True:
            if self.window.full or not (reader.queue or reader.reading):
                wait_s = self.heartbeat_every  # woken by acks or the reader
            elif not reader.queue:
                wait_s = TRICKLE_POLL_S  # a record may arrive unannounced
            else:
                wait_s = flush_s
            self._service(wait_s * 1000)
            if self.exactly_once:
                self._redeliver()
            if 0 < len(reader.queue) < self.pipeline.batch:
                # Only a partial frame needs to know whether the source went
                # quiet (a read of /proc); a full one goes anyway.
                reader.observe(flush_s)
            while not self.window.full and reader.ready(flush_s):
                self._send_records(reader.take(self.pipeline.batch))
            if reader.error is not None:
                raise UserError(user_traceback(reader.error))
            if reader.done and not reader.queue:
                self._finish_if_done()

    def _finish_if_done(self) -> None:
        if not self.counters["exhausted"]:
            self.counters["exhausted"] = True
            self.heartbeat(force=True)
        if not self.counters["done"] and (
            not self.exactly_once or not self.window.frames
        ):
            self.counters["done"] = True
            self.heartbeat(force=True)

    # delivery ------------------------------------------------------------

    def _resume(self) -> None:
        """Ask the sink what it has counted already, and what we quarantined.

        On the first start the answer is "nothing"; after a crash it lets us
        skip what was delivered instead of sending the whole stream again.
        """
        assert self.acks is not None
        deadline = 0.0
        while self.sink_state is None:
            if time.monotonic() >= deadline:
                self.acks.send(self.codec.encode(["hello", self.spec.src_id]))
                deadline = time.monotonic() + HELLO_RETRY_S
            self._service(50)
        self.counted = SeqSet([(lo, hi) for lo, hi in self.sink_state])
        self.quarantined = self._read_quarantined()
        ranges = self.counted.ranges()
        self.skip_below = max([hi for _, hi in ranges] + list(self.quarantined) + [0])
        done = len(self.counted) + len(self.quarantined)
        self.counters["acked"] = len(self.counted)
        self.counters["quarantined"] = len(self.quarantined)
        if done:
            log.info("%s resumes: %d inputs already delivered", self.name, done)

    def _read_quarantined(self) -> set[int]:
        path = self.spec.run_dir / "dead-letter.jsonl"
        found: set[int] = set()
        if not path.exists():
            return found
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("src") == self.spec.src_id and "seq" in entry:
                found.add(entry["seq"])
        return found

    def on_acks(self) -> None:
        assert self.acks is not None
        while True:
            try:
                data = self.acks.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self.codec.decode(data)
            if message[0] == "state":
                self.sink_state = message[1]
            elif message[0] == "ack":
                for key in message[1]:
                    batch = self.window.ack(key)
                    if batch is not None:
                        self.counters["acked"] += len(batch.records)

    def on_control(self, message: dict[str, Any]) -> None:
        if message.get("t") == "redeliver":
            # Not at once: the dead replica's connection may not be dropped
            # by ZeroMQ's I/O thread yet, and what went into it would wait
            # for the redelivery timeout.
            self.redeliver_at = time.monotonic() + REDELIVER_DELAY_S
            if message.get("blame"):
                self.pending_blame.append(message["blame"])

    def _handle_blame(self) -> None:
        """Strike the inputs a dead replica was working on; quarantine poison.

        When the exact input is known (the function raised, or the frame held
        that input alone) only it is struck.  When only a frame of several is
        known (the process died), its inputs are sent again one per frame,
        without a strike: most of them never ran, and the next death points
        at the one input that causes it.
        """
        while self.pending_blame:
            blame = self.pending_blame.pop()
            if blame.get("src") != self.spec.src_id:
                continue
            batch = self.window.frames.get(blame["key"])
            if batch is None:
                continue
            seq = blame.get("seq")
            if seq is None and len(batch.records) == 1:
                seq = batch.seq
            if seq is not None:
                if not batch.seq <= seq < batch.end:
                    continue
                self.strikes[seq] = self.strikes.get(seq, 0) + 1
                if self.strikes[seq] >= self.pipeline.max_attempts:
                    self._quarantine(blame["key"], batch, seq, blame)
                elif len(batch.records) > 1:
                    self._split(blame["key"], batch)
            else:
                self._split(blame["key"], batch)

    def _split(self, key: int, batch: Batch) -> None:
        self.window.ack(key)
        for offset, record in enumerate(batch.records):
            self._send_frame(batch.seq + offset, [record], redelivered=True)

    def _quarantine(
        self, key: int, batch: Batch, seq: int, blame: dict[str, Any]
    ) -> None:
        self.window.ack(key)
        offset = seq - batch.seq
        record = batch.records[offset]
        self.dead_letter(
            {
                "src": self.spec.src_id,
                "seq": seq,
                "record": record,
                "attempts": self.strikes.pop(seq),
                "error": blame.get("reason", "crashed"),
                "raised": blame.get("raised"),
                "failed_in": blame.get("replica"),
                "detail": blame.get("detail", ""),
            }
        )
        self.quarantined.add(seq)
        self.counters["quarantined"] += 1
        log.warning(
            "%s quarantined input %d after %d attempt(s): %s",
            self.name,
            seq,
            self.pipeline.max_attempts,
            blame.get("reason"),
        )
        before, after = batch.records[:offset], batch.records[offset + 1 :]
        if before:
            self._send_frame(batch.seq, before, redelivered=True)
        if after:
            self._send_frame(seq + 1, after, redelivered=True)

    def _redeliver(self) -> None:
        """Send again what was lost: everything after a death, or what is overdue."""
        if self.redeliver_at is not None and time.monotonic() >= self.redeliver_at:
            self.redeliver_at = None
            self._handle_blame()
            keys = list(self.window.frames)
        else:
            keys = self.window.overdue(self.pipeline.redelivery_timeout)
        for key in keys:
            batch = self.window.ack(key)
            if batch is not None:
                self._send_frame(batch.seq, batch.records, redelivered=True)

    # sending --------------------------------------------------------------

    def _send_records(self, records: list[Any]) -> None:
        start = self.seq
        self.seq += len(records)
        self.counters["produced"] += len(records)
        if not self.exactly_once or start >= self.skip_below:
            self._send_frame(start, records)
            return
        # Resuming: send only the runs of inputs not delivered before.
        for lo, hi in self.counted.gaps(start, self.seq):
            for run_lo, run_hi in _without(lo, hi, self.quarantined):
                self._send_frame(run_lo, records[run_lo - start : run_hi - start])

    def _send_frame(
        self, seq: int, records: list[Any], redelivered: bool = False
    ) -> None:
        key = self.key
        self.key += 1
        data = self.codec.encode([self.spec.src_id, key, seq, self.name, None, records])
        if self.exactly_once:
            self.window.add(key, Batch(seq, records, time.monotonic()))
        if redelivered:
            self.counters["redelivered"] += len(records)
        assert self.push is not None
        while True:
            try:
                self.push.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                # No worker can take it now: wait, still answering control.
                self.wait_writable(self.push)


def _without(lo: int, hi: int, holes: set[int]) -> Iterator[tuple[int, int]]:
    start = lo
    for seq in sorted(s for s in holes if lo <= s < hi):
        if seq > start:
            yield start, seq
        start = seq + 1
    if start < hi:
        yield start, hi
