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
import json
import logging
import mmap
import os
import signal
import socket
import struct
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .channel import Channel
from .codec import Codec
from .config import Pipeline, Stage
from .curve import REFUSED_EVENTS, Curve, authenticator, secure
from .health import endpoint_holder
from .stagefn import StageContext

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
# on, so the supervisor can blame that frame when the process dies.  ``busy``
# is the number of inputs in the frame (0: none): a death holding a frame of
# one input is pinned on that input.
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


class RunAborted(BaseException):
    """Raised in a sink's loop over its records when the run failed.

    A requested stop (Ctrl-C, SIGTERM, ``orchestrator stop``) ends the loop
    normally, so the sink returns its summary; a failed or timed-out run
    raises this instead, so the sink does not finish as if its input were
    complete.  Not an ``Exception``, like ``KeyboardInterrupt``: a sink's
    ``except Exception`` around its loop must not swallow it and go on to
    write its output.
    """

    def __init__(self) -> None:
        super().__init__("the run failed: the records end here, before the stream did")


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


def user_traceback(exc: BaseException) -> str:
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

    def wait_writable(self, sock: zmq.Socket[bytes]) -> None:
        """Wait until ``sock`` can take a message, still heartbeating.

        Input is left unwatched meanwhile: pending input would end every poll
        at once and turn the wait into a busy loop.
        """
        if self.pull is not None:
            self.poller.register(self.pull, 0)
        self.poller.register(sock, zmq.POLLOUT)
        try:
            self._service(self.heartbeat_every * 1000)
        finally:
            self.poller.register(sock, 0)
            if self.pull is not None:
                self.poller.register(self.pull, zmq.POLLIN)

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

    def mark(self, src: int, key: int, inputs: int) -> None:
        slot = self.spec.slot
        if slot is not None:
            SLOT.pack_into(slot, 0, max(inputs, 1), src, key)

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
