"""The control socket: how `status`, `scale`, `restart`, `stop` and `wait`
talk to a running supervisor.

A plain Unix stream socket (mode 0600, in the 0700 runtime directory) served
from the supervisor's own selector loop, carrying the same length-prefixed
msgpack maps as the stage channels (:mod:`orchestrator.channel`).  It is not
a ZeroMQ socket for the same reason the stage channels are not: the
supervisor forks stages at any moment and must own no ZeroMQ context.

Requests are maps with a ``cmd`` key; every answer has ``ok`` and either the
result or an ``error``.  A request that is malformed, too large or from
another user is answered with an error (when it can be), logged, and the
connection closed; it never reaches the supervisor's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil

from . import report
from .channel import Channel, Message
from .config import MAX_REPLICAS
from .errors import ControlRefused, NotRunning
from .replicastate import Replica
from .supervisor import Supervisor

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
# Requests are a few dozen bytes; anything this large is not one of ours.
MAX_REQUEST = 64 * 1024
# Enough for a few watching terminals and scripts; more is a runaway client.
MAX_CONNECTIONS = 32
# How often RSS, CPU and rates are sampled for `status` and the metrics.
SAMPLE_S = 1.0
# How long a client waits for an answer to anything but `wait`.
REQUEST_TIMEOUT_S = 10.0


class _Connection(Channel):
    """One client; like a stage channel, but with a bound on message size."""

    max_message = MAX_REQUEST

    def _at_eof(self) -> None:
        # The client shut its side: it may still read the answers to what it
        # sent, so the connection stays open for writing.
        self.eof = True

    def _decode_payload(self, payload: bytes) -> Message:
        message = super()._decode_payload(payload)
        if isinstance(message, dict) and "undecodable" in message and "t" in message:
            return {"cmd": None, "undecodable": message["undecodable"]}
        return message


class Sampler:
    """Per-replica RSS, CPU and input rate, sampled about once a second."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.samples: dict[str, dict[str, Any]] = {}
        self.rates: dict[str, float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[str, tuple[float, int]] = {}
        self._next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + SAMPLE_S
        alive = {r.pid for r in self.supervisor.replicas if r.pid is not None}
        for pid in list(self._procs):
            if pid not in alive:
                del self._procs[pid]
        for replica in self.supervisor.replicas:
            self.samples[replica.name] = self._sample(replica, now)
        sup = self.supervisor
        for name, value in (("produced", sup.produced()), ("counted", sup.counted())):
            self.rates[name] = self._rate(f"pipeline:{name}", value, now)

    def _sample(self, replica: Replica, now: float) -> dict[str, Any]:
        sample: dict[str, Any] = {"rss": None, "cpu_percent": None}
        if replica.pid is not None:
            proc = self._procs.get(replica.pid)
            try:
                if proc is None:
                    proc = self._procs[replica.pid] = psutil.Process(replica.pid)
                sample["rss"] = proc.memory_info().rss
                sample["cpu_percent"] = proc.cpu_percent(None)
            except psutil.Error:  # it just exited; SIGCHLD will tell the loop
                pass
        key = "produced" if replica.stage.role == "source" else "received"
        sample["rate"] = self._rate(replica.name, int(replica.total(key) or 0), now)
        return sample

    def _rate(self, name: str, value: int, now: float) -> float:
        then, before = self._last.get(name, (now, value))
        self._last[name] = (now, value)
        return round((value - before) / (now - then), 1) if now > then else 0.0


def status(supervisor: Supervisor, sampler: Sampler) -> dict[str, Any]:
    """The report, as of now, with what only a live run has: pids' RSS, CPU,
    uptime, rates."""
    result = report.build(supervisor)
    now = supervisor.clock()
    by_name = {r.name: r for r in supervisor.replicas}
    for entry in result["workers"]:
        replica = by_name[f"{entry['stage']}.{entry['replica']}"]
        sample = sampler.samples.get(replica.name, {})
        entry["pid"] = replica.pid
        entry["uptime_s"] = (
            round(now - replica.started_at, 1) if replica.pid is not None else None
        )
        entry["last_exit"] = replica.exit
        entry["rss"] = sample.get("rss")
        entry["cpu_percent"] = sample.get("cpu_percent")
        entry["rate"] = sample.get("rate", 0.0)
    result["supervisor_pid"] = os.getpid()
    result["rates"] = dict(sampler.rates)
    result["total"] = expected_total(supervisor)
    return result


def retired_entry(replica: Replica) -> dict[str, Any]:
    """A replica removed by `scale`, as it ended."""
    return {
        "stage": replica.stage.name,
        "replica": replica.index,
        "pid": replica.last_pid,
        "received": int(replica.total("received") or 0),
        "emitted": int(replica.total("emitted") or 0),
        "restarts": len(replica.restarts),
        "restart_reasons": [r["reason"] for r in replica.restarts],
        "exit": replica.exit,
    }


def expected_total(supervisor: Supervisor) -> int | None:
    """How many inputs the sources will produce, when they say (``messages``)."""
    total = 0
    for stage in supervisor.pipeline.stages:
        if stage.role != "source":
            continue
        messages = stage.params.get("messages")
        if not isinstance(messages, int) or messages <= 0:
            return None
        total += messages * stage.replicas
    return total or None


def all_up(result: dict[str, Any]) -> bool:
    """Is every replica ready, in a run that is still going or completed?"""
    if result["status"] == "completed":
        return True
    return result["status"] == "running" and all(
        w["state"] == "ready" for w in result["workers"]
    )


class ControlServer:
    """Serves the control socket from the supervisor's loop."""

    def __init__(self, supervisor: Supervisor, path: Path) -> None:
        self.supervisor = supervisor
        self.path = path
        self.sampler = Sampler(supervisor)
        self.stop_requested = False
        self.waiters: list[_Connection] = []
        # Replicas removed by `scale`: gone from the supervisor, not from the
        # report (their work counts).
        self.retired: list[Replica] = []
        self.clients: set[_Connection] = set()
        # Replicas we sent SIGTERM for scale/restart: (replica, pid, kill at).
        self._stopping: list[tuple[Replica, int, float]] = []
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a daemon that was killed; the lock is ours
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600, no window with wider rights
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self.sock.listen(16)
        self.sock.setblocking(False)
        supervisor.selector.register(self.sock, selectors.EVENT_READ, self._accept)
        supervisor.hooks.append(self.tick)

    # -- connections ----------------------------------------------------------

    def _accept(self, fileobj: Any) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        if not self._authorised(conn) or len(self.clients) >= MAX_CONNECTIONS:
            log.warning("control: connection refused (other user or too many)")
            conn.close()
            return
        client = _Connection(conn)
        self.clients.add(client)
        self.supervisor.selector.register(
            conn, selectors.EVENT_READ, lambda _: self._on_readable(client)
        )

    def _authorised(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == os.getuid()

    def _on_readable(self, client: _Connection) -> None:
        for message in client.receive():
            if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
                log.warning("control: rejected a malformed request: %.80r", message)
                client.send({"ok": False, "error": "malformed request"})
                self._drop(client)
                return
            try:
                answer = self._handle(client, message)
            except ControlRefused as exc:
                log.warning("control: rejected request: %s", exc)
                answer = {"ok": False, "error": exc.reason}
            except Exception as exc:  # noqa: BLE001
                # A bug in answering one request must not take the pipeline
                # down with it: the supervisor's loop is the stages' lifeline.
                log.exception("control: request %.80r failed", message)
                answer = {"ok": False, "error": f"internal error: {exc!r}"}
            if answer is not None:
                client.send(answer)
        if client.too_large:
            log.warning("control: rejected a request over %d bytes", MAX_REQUEST)
            client.send({"ok": False, "error": "request too large"})
            self._drop(client)
        elif client.closed or client.eof:
            self._drop(client)

    def _drop(self, client: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.supervisor.selector.unregister(client.sock)
        self.clients.discard(client)
        if client in self.waiters:
            self.waiters.remove(client)
        client.close()

    # -- requests -------------------------------------------------------------

    def _handle(self, client: _Connection, message: Message) -> Message | None:
        cmd = message["cmd"]
        handler: Callable[[Message], Message] | None = getattr(
            self, f"_cmd_{cmd}", None
        )
        if cmd == "wait":
            self.waiters.append(client)
            return None
        if handler is None:
            raise ControlRefused(cmd[:40], "unknown command")
        return handler(message)

    def _cmd_status(self, message: Message) -> Message:
        return {"ok": True, "report": status(self.supervisor, self.sampler)}

    def _cmd_stop(self, message: Message) -> Message:
        timeout = message.get("timeout")
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or timeout < 0:
                raise ControlRefused("stop", f"bad timeout {timeout!r:.40}")
            # Stage objects are shared by the copy, so the supervisor's groups
            # still match; only the grace period of this stop changes.
            self.supervisor.pipeline = dataclasses.replace(
                self.supervisor.pipeline, grace_period=float(timeout)
            )
        if self.supervisor.signal_received is None:
            log.info("control: stop requested")
            self.stop_requested = True
            # The same path as SIGTERM: sources first, then workers, then sinks.
            self.supervisor.signal_received = signal.SIGTERM
        return {"ok": True, "pid": os.getpid()}

    def _cmd_scale(self, message: Message) -> Message:
        sup = self.supervisor
        stage = self._stage(message, "scale")
        wanted = message.get("replicas")
        if (
            not isinstance(wanted, int)
            or isinstance(wanted, bool)
            or not 1 <= wanted <= MAX_REPLICAS
        ):
            raise ControlRefused(
                "scale",
                f"replicas must be >= 1 and <= {MAX_REPLICAS}, got {wanted!r:.40}",
            )
        if stage.role != "worker":
            raise ControlRefused(
                "scale", f"{stage.name} is a {stage.role}; only workers scale"
            )
        self._require_running("scale")
        live = sup.live_replicas(stage)
        before = len(live)
        for _ in range(wanted - before):
            sup.add_replica(stage)
        for replica in sorted(live, key=lambda r: r.index)[wanted:]:
            self._stop(replica, "retire")
        log.info("control: scale %s from %d to %d", stage.name, before, wanted)
        return {"ok": True, "stage": stage.name, "before": before, "after": wanted}

    def _cmd_restart(self, message: Message) -> Message:
        sup = self.supervisor
        stage = self._stage(message, "restart")
        index = message.get("replica")
        self._require_running("restart")
        if not sup.pipeline.exactly_once and stage.role != "worker":
            # The supervisor does not restart these either: see _NOT_RESTARTABLE.
            raise ControlRefused(
                "restart",
                f"{stage.name} is a {stage.role}: with at-most-once delivery a "
                "restart would send inputs twice or lose what was counted",
            )
        chosen = [
            r for r in sup.live_replicas(stage) if index is None or r.index == index
        ]
        if not chosen:
            raise ControlRefused("restart", f"no replica {stage.name}.{index}")
        old = {r.name: r.pid for r in chosen}
        for replica in chosen:
            self._stop(replica, "restart")
        log.info("control: restart %s", ", ".join(old))
        return {"ok": True, "replicas": old}

    def _stage(self, message: Message, cmd: str) -> Any:
        name = message.get("stage")
        for stage in self.supervisor.pipeline.stages:
            if stage.name == name:
                return stage
        raise ControlRefused(cmd, f"no stage named {name!r:.40}")

    def _require_running(self, cmd: str) -> None:
        if self.supervisor.status != "running" or self.stop_requested:
            raise ControlRefused(cmd, f"the pipeline is {self.supervisor.status}")

    def _stop(self, replica: Replica, then: str) -> None:
        if then == "retire":
            self.retired.append(replica)
        pid = replica.pid
        self.supervisor.stop_replica(replica, then)
        if pid is not None:
            deadline = time.monotonic() + self.supervisor.pipeline.grace_period
            self._stopping.append((replica, pid, deadline))

    # -- every loop turn ------------------------------------------------------

    def tick(self) -> None:
        self.sampler.tick()
        now = time.monotonic()
        for entry in list(self._stopping):
            replica, pid, deadline = entry
            if replica.pid != pid or replica.last_pid != pid:
                self._stopping.remove(entry)
            elif now > deadline:
                log.warning(
                    "%s pid %d did not stop within %g s: killing it",
                    replica.name,
                    pid,
                    self.supervisor.pipeline.grace_period,
                )
                self.supervisor._signal(replica, signal.SIGKILL)
                self._stopping.remove(entry)

    def finish(self, final: dict[str, Any]) -> None:
        """Hand the final report to every `wait`, then close the socket."""
        payload = msgspec.msgpack.encode({"ok": True, "report": final})
        for client in self.waiters:
            # A waiter that does not read must not hold the exit up for long.
            with contextlib.suppress(OSError):
                client.sock.settimeout(1.0)
                client.sock.sendall(_HEADER.pack(len(payload)) + payload)
        for client in list(self.clients):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self.supervisor.selector.unregister(self.sock)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- the client side -----------------------------------------------------------


class ControlClient:
    """A connection to a running supervisor's control socket."""

    def __init__(self, path: Path, pipeline: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotRunning(pipeline, str(path)) from exc

    def send(self, message: Message) -> None:
        payload = msgspec.msgpack.encode(message)
        self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def receive(self, timeout: float | None = REQUEST_TIMEOUT_S) -> Message | None:
        """The next answer; None when the supervisor closed the connection."""
        self.sock.settimeout(timeout)
        header = self._read(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        payload = self._read(size)
        if payload is None:
            return None
        answer = msgspec.msgpack.decode(payload)
        if not isinstance(answer, dict):
            raise ControlRefused("answer", "not a map")
        return answer

    def _read(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def request(self, message: Message) -> Message:
        """Send ``message``; return the answer, raising if it was refused."""
        self.send(message)
        answer = self.receive()
        if answer is None:
            raise ControlRefused(str(message.get("cmd")), "the supervisor hung up")
        if not answer.get("ok"):
            raise ControlRefused(str(message.get("cmd")), str(answer.get("error")))
        return answer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
