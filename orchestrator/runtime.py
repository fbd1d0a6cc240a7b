"""The stage runtime: everything that runs inside a stage process.

The runtime owns the ZeroMQ context and sockets, readiness, batching,
counters, heartbeats, delivery accounting and shutdown, so that a stage
author writes a plain function (see :mod:`orchestrator.stagefn`).  It runs in
a freshly forked child: it creates its own context there, sets linger on
every socket, and ends the process with ``os._exit`` so that no code of the
supervisor it was forked from ever runs twice.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import itertools
import json
import logging
import mmap
import os
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .channel import Channel
from .codec import Codec, Unencodable
from .config import Pipeline, Stage
from .curve import REFUSED_EVENTS, Curve, authenticator, secure
from .health import endpoint_holder
from .ledger import Batch, Ledger, SeqSet, Window
from .stagefn import StageContext, resolve

log = logging.getLogger(__name__)

# Exit codes of a stage process, read by the supervisor.
EXIT_EXCEPTION = 1  # the stage function raised; the traceback was reported
EXIT_SETUP = 78  # sysexits' EX_CONFIG: restarting cannot help (port taken, ...)

# A pending message to a peer that is gone must not hold the process past its
# grace period; half a second is ample to flush to a live peer on loopback.
LINGER_MS = 500
# Frames, not records, queue in ZeroMQ; a few dozen keep the pipe full.
HWM_FRAMES = 64
# The default 100 ms reconnect interval would put that much delay between a
# producer binding and the workers that started before it attaching.
RECONNECT_MS = 10
# After a worker or sink dies, wait this long before sending its share again,
# so ZeroMQ has dropped the dead peer's connection (a few ms on loopback).
REDELIVER_DELAY_S = 0.05
# A busy source's partial frame waits at most this many flush intervals.
PATIENCE = 20
# A forced heartbeat (a stage went idle, a source finished) is still spaced
# out by this much, so a bursty stream cannot flood the supervisor.
MIN_HEARTBEAT_GAP_S = 0.01
# Allocations between young collections in a stage process (Python's default
# is 700, less than one frame of records); see _tune_gc.
GC_THRESHOLD = 10_000
# How often a stage re-asks a sink for its state when the sink is not up yet.
HELLO_RETRY_S = 0.2

# The slot in shared memory where a replica says which frame it is working
# on, so the supervisor can blame that frame when the process dies.
SLOT = struct.Struct("qqq")  # busy, src, key


@dataclass
class ReplicaSpec:
    """Everything a stage process is told by the supervisor that forked it."""

    pipeline: Pipeline
    stage: Stage
    replica: int
    run_dir: Path
    channel: Channel
    slot: mmap.mmap | None
    src_id: int  # this replica's id as a source, -1 otherwise
    ack_endpoint: str | None  # the sink's acknowledgement endpoint
    expected_peers: int
    epoch: int  # how many times this replica was started before
    curve: Curve | None = None  # CURVE keys, when data crosses hosts (ray)


def ipc_in_use(endpoint: str) -> bool:
    """Is a process listening on this ipc:// endpoint's socket file?

    Binding an ipc endpoint replaces the file of a live one without an
    error, silently stealing its peers; a TCP port would refuse.  A file
    nobody listens on is a leftover and may be replaced.
    """
    path = endpoint.removeprefix("ipc://")
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def ack_identity(src: int) -> bytes:
    """The routing id of source ``src`` on the sink's acknowledgement socket.

    Fixed rather than random, so that a restarted sink can acknowledge a
    source that never said hello to it.
    """
    return b"src%d" % src


class Stopping(Exception):
    """Raised inside the runtime's loops when the supervisor asked us to stop."""


class UserError(Exception):
    """The stage function raised; carries the formatted traceback."""

    def __init__(
        self,
        text: str,
        where: tuple[int, int, int] | None = None,
        setup: bool = False,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.where = where  # (src, key, seq) of the input, when known
        # Raised before any record (a source rejecting its params): running
        # it again would raise again, so the stage fails instead of looping.
        self.setup = setup


# A worker's "no result" in its output frame: one shared list, which is safe
# because output frames are only ever encoded, never changed.
_NOTHING: list[Any] = []


def _as_list(result: Any) -> list[Any]:
    """A worker's return value as the list of records it stands for."""
    if result is None:
        return []
    if type(result) is list:
        return result
    if isinstance(result, (dict, str, bytes, int, float, tuple)):
        return [result]
    if isinstance(result, Iterator) or hasattr(result, "__next__"):
        return list(result)
    return [result]


def _user_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Runtime:
    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.pipeline = spec.pipeline
        self.stage = spec.stage
        self.name = f"{spec.stage.name}.{spec.replica}"
        self.codec = Codec(spec.pipeline.codec)
        self.channel = spec.channel
        self.exactly_once = spec.pipeline.exactly_once
        self.counters: dict[str, Any] = {
            "received": 0,
            "processed": 0,
            "emitted": 0,
            "frames": 0,
        }
        self.stopping = False
        self.heartbeat_every = spec.pipeline.heartbeat_interval
        self.next_heartbeat = 0.0
        self.first_input_reported = False
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.sockets: list[zmq.Socket[bytes]] = []
        self.pull: zmq.Socket[bytes] | None = None
        self.push: zmq.Socket[bytes] | None = None
        self.acks: zmq.Socket[bytes] | None = None
        self.auth: ThreadAuthenticator | None = None
        self.bound_ipc: list[str] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # -- set-up -----------------------------------------------------------

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.linger = LINGER_MS
        sock.reconnect_ivl = RECONNECT_MS
        if kind == zmq.PUSH:
            sock.sndhwm = HWM_FRAMES
        elif kind == zmq.PULL:
            sock.rcvhwm = HWM_FRAMES
        self.sockets.append(sock)
        return sock

    def _attach(self, sock: zmq.Socket[bytes], side: str) -> None:
        spec = getattr(self.stage, side)
        if self.spec.curve is not None:
            secure(sock, self.spec.curve, server=bool(spec.bind))
        if spec.bind:
            if spec.bind.startswith("ipc://") and ipc_in_use(spec.bind):
                self._fatal(
                    "bind",
                    f"cannot bind {spec.bind}: Address already in use "
                    "(another process is listening on it)",
                    endpoint=spec.bind,
                    errno=errno.EADDRINUSE,
                )
            try:
                sock.bind(spec.bind)
                self.bound_ipc.extend(
                    [spec.bind] if spec.bind.startswith("ipc") else []
                )
            except zmq.ZMQError as exc:
                holder = None
                if exc.errno == errno.EADDRINUSE:
                    holder = endpoint_holder(spec.bind)
                held = f" (held by {holder})" if holder else ""
                self._fatal(
                    "bind",
                    f"cannot bind {spec.bind}: {exc.strerror}{held}",
                    endpoint=spec.bind,
                    errno=exc.errno,
                    holder=holder,
                )
        for endpoint in spec.connect:
            sock.connect(endpoint)

    def _fatal(self, kind: str, message: str, **extra: Any) -> None:
        self.channel.send_blocking(
            {"t": "error", "kind": kind, "message": message, **extra}
        )
        raise SystemExit(EXIT_SETUP)

    def open(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's
        signal.set_wakeup_fd(self._wake_w)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.poller.register(self.channel.fileno(), zmq.POLLIN)
        if self.spec.curve is not None and self.spec.curve.server_secret:
            self.auth = authenticator(self.ctx, self.spec.curve)

        monitor = None
        if self.stage.pull is not None:
            self.pull = self._socket(zmq.PULL)
        if self.stage.push is not None:
            self.push = self._socket(zmq.PUSH)
            # The monitor must exist before bind/connect or it misses events.
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            if self.spec.curve is not None and not self.stage.push.bind:
                events |= REFUSED_EVENTS  # a server refused our keys: say so
            monitor = self.push.get_monitor_socket(events)
            # Closed with the others if we give up waiting: an open socket
            # would hang ctx.term(), and the process with it.
            self.sockets.append(monitor)
        if self.pull is not None:
            self._attach(self.pull, "pull")
            self.poller.register(self.pull, zmq.POLLIN)
        if self.push is not None and monitor is not None:
            self._attach(self.push, "push")
            self._wait_for_peers(monitor)

        if self.exactly_once and self.stage.role == "sink":
            assert self.spec.ack_endpoint is not None
            self.acks = self._socket(zmq.ROUTER)
            if self.spec.curve is not None:
                secure(self.acks, self.spec.curve, server=True)
            self._bind_ack(self.acks, self.spec.ack_endpoint)
            self.poller.register(self.acks, zmq.POLLIN)
        elif self.exactly_once and self.stage.role == "source":
            assert self.spec.ack_endpoint is not None
            self.acks = self._socket(zmq.DEALER)
            self.acks.identity = ack_identity(self.spec.src_id)
            if self.spec.curve is not None:
                secure(self.acks, self.spec.curve, server=False)
            self.acks.connect(self.spec.ack_endpoint)
            self.poller.register(self.acks, zmq.POLLIN)

    def _bind_ack(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        path = endpoint.removeprefix("ipc://")
        if os.path.exists(path):  # left by a previous incarnation of this sink
            os.unlink(path)
        sock.bind(endpoint)

    def _wait_for_peers(self, monitor: zmq.Socket[bytes]) -> None:
        """Block until our PUSH socket has every expected peer attached.

        A PUSH socket deals only to peers already attached, so sending before
        all of them are there hands most of the work to the first one.  The
        handshake event, not the TCP accept, says a peer can take messages.
        """
        expected = self.spec.expected_peers
        # Handshake events carry no peer identity (their value is 0), so the
        # count is handshakes minus disconnections.
        peers = 0
        deadline = time.monotonic() + self.pipeline.ready_timeout
        while peers < expected:
            if monitor.poll(50):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    peers += 1
                elif event["event"] & REFUSED_EVENTS:
                    self._fatal(
                        "curve",
                        f"{event['endpoint'].decode()} refused this stage's "
                        "CURVE keys (the handshake failed)",
                    )
                else:
                    peers = max(0, peers - 1)
            self._service(0)
            if time.monotonic() > deadline:
                assert self.stage.push is not None
                endpoints = ", ".join(self.stage.push.endpoints)
                self._fatal(
                    "ready",
                    f"only {peers} of {expected} peers attached "
                    f"to {endpoints} within {self.pipeline.ready_timeout:g} s",
                )
        assert self.push is not None
        self.push.disable_monitor()
        monitor.close(linger=0)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    # -- the common loop step -----------------------------------------------

    def _service(self, timeout_ms: float) -> set[Any]:
        """Wait up to ``timeout_ms`` for anything; handle control and signals.

        Returns the data sockets that are ready, for the role's loop.
        """
        ready = dict(self.poller.poll(int(timeout_ms)))
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if self.channel.fileno() in ready:
            for message in self.channel.receive():
                self.on_control(message)
            if self.channel.closed:  # the supervisor is gone: so are we
                self.stopping = True
        if self.acks is not None and self.acks in ready:
            self.on_acks()
        self.heartbeat()
        if self.stopping:
            raise Stopping
        return set(ready)

    def on_control(self, message: dict[str, Any]) -> None:
        """Control messages from the supervisor; roles override what they need."""

    def on_acks(self) -> None:
        """Messages on the acknowledgement socket; sources and sinks override."""

    def status(self) -> dict[str, Any]:
        return dict(self.counters)

    def heartbeat(self, force: bool = False, soon: bool = False) -> None:
        """Send counters when due; ``force`` now, ``soon`` unless one just went."""
        now = time.monotonic()
        spaced = now >= self.next_heartbeat - self.heartbeat_every + MIN_HEARTBEAT_GAP_S
        if force or now >= self.next_heartbeat or (soon and spaced):
            self.channel.send_blocking({"t": "hb", "c": self.status()})
            self.next_heartbeat = now + self.heartbeat_every

    def note_first_input(self) -> None:
        if not self.first_input_reported:
            self.first_input_reported = True
            self.channel.send_blocking({"t": "first_input", "at": time.time()})

    def mark(self, src: int, key: int) -> None:
        slot = self.spec.slot
        if slot is not None:
            SLOT.pack_into(slot, 0, 1, src, key)

    def unmark(self) -> None:
        slot = self.spec.slot
        if slot is not None:
            SLOT.pack_into(slot, 0, 0, 0, 0)

    def dead_letter(self, entry: dict[str, Any]) -> None:
        entry = {"stage": self.stage.name, "replica": self.spec.replica, **entry}
        line = json.dumps(entry, default=repr) + "\n"
        with open(self.spec.run_dir / "dead-letter.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line)

    def context(self) -> StageContext:
        return StageContext(
            pipeline=self.pipeline.name,
            stage=self.stage.name,
            replica=self.spec.replica,
            replicas=self.stage.replicas,
            params=dict(self.stage.params),
            run_dir=self.spec.run_dir,
            log=logging.getLogger(f"stage.{self.name}"),
        )

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=LINGER_MS)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        for endpoint in self.bound_ipc:  # ZeroMQ leaves the socket file behind
            with contextlib.suppress(OSError):
                os.unlink(endpoint.removeprefix("ipc://"))


# -- sources -------------------------------------------------------------------


class _Reader(threading.Thread):
    """Runs the source function in a thread, handing records over in a deque.

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
        append = queue.append
        try:
            for record in self.records:
                append(record)
                size = len(queue)
                if size == 1:
                    self.first_at = time.monotonic()
                elif size % batch == 0:
                    # Once per full frame, not per record: a wake-up is a
                    # system call, and a busy source would make one per record.
                    self._wake()
                    while len(queue) >= high:
                        self.room.clear()
                        if len(queue) >= high:
                            self.room.wait(0.1)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
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
        if queue:
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

    def run(self, fn: Callable[..., Any]) -> None:
        if self.exactly_once:
            self._resume()
        try:
            records = fn(self.context(), **self.stage.params)
        except Exception as exc:
            raise UserError(_user_traceback(exc), setup=True) from exc
        reader = _Reader(records, self.pipeline.batch, self._wake_w)
        reader.start()
        flush_s = self.pipeline.flush_ms / 1000.0
        while True:
            idle = not reader.queue or self.window.full
            self._service(self.heartbeat_every * 1000 if idle else flush_s * 1000)
            if self.exactly_once:
                self._redeliver()
            if 0 < len(reader.queue) < self.pipeline.batch:
                # Only a partial frame needs to know whether the source went
                # quiet (a read of /proc); a full one goes anyway.
                reader.observe(flush_s)
            while not self.window.full and reader.ready(flush_s):
                self._send_records(reader.take(self.pipeline.batch))
            if reader.error is not None:
                raise UserError(_user_traceback(reader.error))
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

        When the exact input is known (the function raised) only it is struck.
        When only the frame is known (the process died), the frame's inputs
        are struck once and sent again one per frame, so the next death points
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
                for s in range(batch.seq, batch.end):
                    self.strikes[s] = self.strikes.get(s, 0) + 1
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
                "detail": blame.get("detail", ""),
            }
        )
        self.quarantined.add(seq)
        self.counters["quarantined"] += 1
        log.warning(
            "%s quarantined input %d after %d attempts: %s",
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
        data = self.codec.encode([self.spec.src_id, key, seq, self.name, True, records])
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
                self._service(self.heartbeat_every * 1000)


def _without(lo: int, hi: int, holes: set[int]) -> Iterator[tuple[int, int]]:
    start = lo
    for seq in sorted(s for s in holes if lo <= s < hi):
        if seq > start:
            yield start, seq
        start = seq + 1
    if start < hi:
        yield start, hi


# -- workers -------------------------------------------------------------------


class WorkerRuntime(Runtime):
    def run(self, fn: Callable[..., Any]) -> None:
        ctx = self.context()
        params = self.stage.params
        # Called as call(record, ctx): without params, the user's function
        # itself, which saves a Python frame per record.
        call = functools.partial(fn, **params) if params else fn
        assert self.pull is not None and self.push is not None
        pull, counters = self.pull, self.counters
        while True:
            ready = self._service(self.heartbeat_every * 1000)
            if pull not in ready:
                continue
            for _ in range(HWM_FRAMES):
                try:
                    data = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.note_first_input()
                try:
                    src, key, seq, _via, flat, items = self.codec.decode_frame(data)
                except ValueError as exc:
                    self.dead_letter({"error": str(exc), "frame": repr(data[:200])})
                    continue
                self.mark(src, key)
                out = self._process(call, ctx, src, key, seq, flat, items)
                counters["received"] += len(items)
                counters["processed"] += len(items)
                counters["frames"] += 1
                counters["emitted"] += sum(map(len, out))
                self._send(self.codec.encode([src, key, seq, self.name, False, out]))
                self.unmark()
                # Up to HWM_FRAMES frames go by before _service: a slow but
                # healthy function must still beat once per frame, or the
                # supervisor takes it for hung.
                self.heartbeat()
                if self.stopping:
                    raise Stopping

    def _process(
        self,
        call: Callable[..., Any],
        ctx: StageContext,
        src: int,
        key: int,
        seq: int,
        flat: bool,
        items: list[Any],
    ) -> list[list[Any]]:
        out: list[list[Any]] = []
        append = out.append
        position = 0
        try:
            if flat:
                # Runs once per record: _as_list is inlined for the two
                # commonest results, none and one dict.
                for position, record in enumerate(items):  # noqa: B007 (read by the handler)
                    result = call(record, ctx)
                    if result is None:
                        append(_NOTHING)
                    elif type(result) is dict:
                        append([result])
                    else:
                        append(_as_list(result))
            else:
                for position, unit in enumerate(items):  # noqa: B007
                    derived: list[Any] = []
                    for record in unit:
                        derived.extend(_as_list(call(record, ctx)))
                    append(derived)
        except Exception as exc:
            raise UserError(_user_traceback(exc), (src, key, seq + position)) from exc
        return out

    def _send(self, data: bytes) -> None:
        assert self.push is not None
        while True:
            try:
                self.push.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                # Downstream is full or restarting; keep heartbeating meanwhile.
                self._service(self.heartbeat_every * 1000)


# -- sinks ---------------------------------------------------------------------


class SinkRuntime(Runtime):
    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self.counters.update(counted=0, duplicates=0, results=0, per_via={})
        self.seen: dict[int, SeqSet] = {}
        self.ledger: Ledger | None = None
        self.unacked: dict[int, list[int]] = {}
        if self.exactly_once:
            self.ledger = Ledger(spec.run_dir / f"ledger-{spec.stage.name}.sqlite")

    def run(self, fn: Callable[..., Any]) -> Any:
        # _records() hands over whole frames; chaining them lets the user's
        # loop take each record in C instead of resuming a generator.
        records = itertools.chain.from_iterable(self._records())
        try:
            return fn(records, self.context(), **self.stage.params)
        except Stopping:
            raise
        except Exception as exc:
            raise UserError(_user_traceback(exc)) from exc

    def _records(self) -> Iterator[list[Any]]:
        """The accepted records, a frame's worth at a time."""
        if self.ledger is not None:
            yield from self._replay()
        assert self.pull is not None
        pull = self.pull
        while True:
            try:
                ready = self._service(self.heartbeat_every * 1000)
            except Stopping:
                return
            if pull not in ready:
                continue
            for _ in range(HWM_FRAMES):
                try:
                    data = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.note_first_input()
                accepted: list[Any] = []
                where = self._accept(data, accepted)
                if where is not None:
                    self.mark(*where)
                yield accepted  # resumed once the user has taken them all
                self.unmark()
                self.heartbeat()  # a slow sink function is not a hung one
            # The user has seen the records; make them durable, then say so.
            # A crash before the commit loses nothing: the ledger replays only
            # what was committed, and the sources send the rest again.
            if self.ledger is not None:
                self.ledger.commit()
                self._send_acks()
            self.heartbeat(soon=not self._more(pull))

    def _more(self, pull: zmq.Socket[bytes]) -> bool:
        return bool(pull.poll(0))

    def _accept(self, data: bytes, out: list[Any]) -> tuple[int, int] | None:
        try:
            src, key, seq, via, flat, items = self.codec.decode_frame(data)
        except ValueError as exc:
            self.dead_letter({"error": str(exc), "frame": repr(data[:200])})
            return None
        self.counters["received"] += len(items)
        if self.ledger is None:
            self._take(items, 0, len(items), flat, via, out)
            return src, key
        seen = self.seen.setdefault(src, SeqSet())
        fresh = seen.add(seq, seq + len(items))
        new = 0
        for lo, hi in fresh:
            self.ledger.log(src, lo, hi, seq, data)
            self._take(items, lo - seq, hi - seq, flat, via, out)
            new += hi - lo
        self.counters["duplicates"] += len(items) - new
        self.unacked.setdefault(src, []).append(key)
        return src, key

    def _take(
        self, items: list[Any], lo: int, hi: int, flat: bool, via: str, out: list[Any]
    ) -> None:
        self.counters["counted"] += hi - lo
        before = len(out)
        if flat:
            out.extend(items[lo:hi])
        else:
            out.extend(itertools.chain.from_iterable(items[lo:hi]))
        results = len(out) - before
        self.counters["results"] += results
        per_via = self.counters["per_via"]
        per_via[via] = per_via.get(via, 0) + results

    def _replay(self) -> Iterator[list[Any]]:
        """What the ledger holds, a logged frame at a time, heartbeating.

        A long replay is progress, not a hang; beating between frames, as in
        normal operation, keeps a restarted sink from being killed as hung.
        """
        assert self.ledger is not None
        replayed = 0
        for src, lo, hi, frame_seq, data in self.ledger.replay():
            _, _, _, via, flat, items = self.codec.decode_frame(data)
            self.seen.setdefault(src, SeqSet()).add(lo, hi)
            out: list[Any] = []
            self._take(items, lo - frame_seq, hi - frame_seq, flat, via, out)
            replayed += hi - lo
            yield out
            self.heartbeat()
        if replayed:
            log.info(
                "%s replayed %d counted inputs from its ledger", self.name, replayed
            )

    def on_acks(self) -> None:
        assert self.acks is not None
        while True:
            try:
                identity, data = self.acks.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self.codec.decode(data)
            if message[0] == "hello":
                src = message[1]
                ranges = self.seen.get(src, SeqSet()).ranges()
                self.acks.send_multipart(
                    [identity, self.codec.encode(["state", ranges])]
                )

    def _send_acks(self) -> None:
        assert self.acks is not None
        for src, keys in self.unacked.items():
            message = self.codec.encode(["ack", keys])
            self.acks.send_multipart([ack_identity(src), message])
        self.unacked.clear()


# -- entry point ------------------------------------------------------------------

_RUNTIMES: dict[str, type[Runtime]] = {
    "source": SourceRuntime,
    "worker": WorkerRuntime,
    "sink": SinkRuntime,
}


def _tune_gc() -> None:
    """Keep the garbage collector off the records' hot path.

    A stage process is forked from the supervisor: every full collection
    would walk all the objects it inherited (and touch, so copy, their
    pages).  Freezing moves them out of the collector's sight.  Records come
    a thousand to a frame, so the default threshold (700 allocations) would
    run a young collection more than once per frame; a frame's records die
    young anyway.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def _reportable(summary: Any) -> Any:
    """The sink's summary, or its repr if the control channel cannot carry it."""
    try:
        msgspec.msgpack.encode(summary)
    except (TypeError, OverflowError) as exc:
        log.warning("the summary cannot be encoded (%s): reporting its repr", exc)
        return repr(summary)
    return summary


def run_replica(spec: ReplicaSpec) -> int:
    """Run one stage replica to completion; returns the process's exit code."""
    stage = spec.stage
    assert stage.call is not None
    _tune_gc()
    runtime = _RUNTIMES[stage.role](spec)
    summary: Any = None
    try:
        fn = resolve(stage.call, spec.pipeline.path.parent)
        runtime.open()
        runtime.channel.send_blocking({"t": "ready"})
        try:
            summary = runtime.run(fn)  # type: ignore[attr-defined]
        except Stopping:
            pass
        except Unencodable as exc:  # the function returned what cannot travel
            raise UserError(_user_traceback(exc)) from exc
        runtime.channel.send_blocking(
            {"t": "final", "c": runtime.status(), "summary": _reportable(summary)}
        )
        return 0
    except UserError as exc:
        message: dict[str, Any] = {
            "t": "error",
            "kind": "exception",
            "message": exc.text.strip().splitlines()[-1],
            "traceback": exc.text,
        }
        if exc.where is not None:
            message["src"], message["key"], message["seq"] = exc.where
        runtime.channel.send_blocking(message)
        print(exc.text, end="", flush=True)
        return EXIT_SETUP if exc.setup else EXIT_EXCEPTION
    finally:
        runtime.close()
