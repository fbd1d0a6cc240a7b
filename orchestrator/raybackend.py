"""The ray backend: each stage replica runs in a Ray actor; data stays on ZeroMQ.

The supervisor does not change: it still spawns, signals and reaps "pids"
through a launcher, and talks to each replica over a :class:`Channel`.  This
module is that launcher for a Ray cluster:

* spawn: the replica runs :func:`orchestrator.replica.run_replica` inside an
  actor's own process.  The actor dials back to a listener on the
  supervisor's node twice, saying hello with the run's token: one connection
  carries the control channel, the other the replica's stdout and stderr up
  and signal numbers down (SIGTERM for a graceful stop, as locally).  A relay
  thread copies the control connection to the socket pair the supervisor
  made, so the supervisor reads it exactly as it reads a forked child's.
* reap: a waiter thread watches each actor's ``run`` task with ``ray.wait``;
  its end (an exit code, or the actor lost with its process or its node) is
  queued, and the supervisor is woken with a SIGCHLD, as for a child.
* endpoints: a stage that binds is pinned to one node before anything
  starts, so every ``tcp://`` endpoint can be rewritten to the address of the
  node that binds it; connecting stages go wherever their placement says.

Ray is imported here only; the local backend never loads this module.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from .channel import Channel
from .config import Pipeline, Socket, Stage
from .curve import RunKeys
from .errors import ClusterError
from .replica import run_replica
from .runtime import ReplicaSpec

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ClusterError(
        "(none)", 'the ray backend needs Ray: pip install "zmq-orchestrator[ray]"'
    ) from exc

log = logging.getLogger(__name__)

# An accepted connection that has not said who it is by then is dropped.
HELLO_TIMEOUT_S = 10.0
# After an actor's task ended, how long its connections may take to deliver
# their last bytes (a final heartbeat, a traceback) before we stop waiting.
# A node that vanished never closes its connections; this bounds that case.
DRAIN_S = 2.0
# The first actors start new Python workers (each imports Ray: seconds on a
# busy host); placement was checked before, so waiting longer is safe.
# A restart blocks the supervisor's loop: it waits ready_timeout at most.
FIRST_START_S = 60.0
# How long the cluster's address may take to accept a TCP connection.
PROBE_S = 5.0
# ray.wait timeout of the waiter thread, so it picks up new actors promptly.
WAIT_POLL_S = 0.1
# What a replica asks of a custom resource: a sliver, so the label decides
# where it goes without limiting how many replicas fit on a node.
RESOURCE_SHARE = 0.001
# Linux pids stay below 2**22.  A replica on another host gets an id above
# it: the supervisor (its health checks) must not take its pid for the pid
# of a process here.
PID_LIMIT = 2**22
# Ids of starts that never got an actor: above those of any host's replicas.
FAILED_IDS = PID_LIMIT * 2**10

_HEADER = struct.Struct("!I")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


# -- inside the actor ----------------------------------------------------------


@ray.remote(max_restarts=0, max_task_retries=0)
class ReplicaActor:
    """One incarnation of a replica.  Restarts are the supervisor's, not Ray's:
    they follow the stage's restart policy and back-off, as locally."""

    def hello(self) -> tuple[int, str, str]:
        return os.getpid(), ray.util.get_node_ip_address(), _boot_id()

    def run(
        self, fields: dict[str, Any], listener: tuple[str, int], token: bytes
    ) -> int:
        return _run_in_actor(fields, listener, token)


def _dial(listener: tuple[str, int], hello: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(listener)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = _encode(hello)
    sock.sendall(_HEADER.pack(len(payload)) + payload)
    return sock


def _free_endpoint(endpoint: str) -> str:
    """``tcp://host:0`` with a port that is free on this node now."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"tcp://{host}:{probe.getsockname()[1]}"


def _obey_signals(conn: socket.socket) -> None:
    """Signal numbers from the supervisor, delivered to this process."""
    while True:
        try:
            data = conn.recv(64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            os.kill(os.getpid(), signum)


def _run_in_actor(
    fields: dict[str, Any], listener: tuple[str, int], token: bytes
) -> int:
    from .launcher import stage_environment

    name = f"{fields['stage'].name}.{fields['replica']}"
    if fields["ack_endpoint"] and fields["ack_endpoint"].endswith(":0"):
        fields["ack_endpoint"] = _free_endpoint(fields["ack_endpoint"])
    hello = {"token": token, "replica": name, "epoch": fields["epoch"]}
    output = _dial(listener, {**hello, "kind": "output"})
    control = _dial(
        listener, {**hello, "kind": "control", "ack": fields["ack_endpoint"]}
    )
    Path(fields["run_dir"]).mkdir(parents=True, exist_ok=True)
    spec = ReplicaSpec(channel=Channel(control), slot=None, **fields)

    # The replica's output goes to the supervisor, as a forked child's does.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    threading.Thread(target=_obey_signals, args=(output,), daemon=True).start()
    old_term = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    old_handlers, old_level = list(root.handlers), root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    os.environ.update(stage_environment(spec))
    code = 1
    try:
        code = run_replica(spec)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        # Hand the process back to Ray as we found it; the supervisor ends
        # the actor next, but a stray signal must not hit our handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, old_term)
        root.handlers[:] = old_handlers
        root.setLevel(old_level)
        spec.channel.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        with contextlib.suppress(OSError):
            output.shutdown(socket.SHUT_WR)
    return code


# -- in the supervisor ---------------------------------------------------------


@dataclass
class _Incarnation:
    """One start of one replica, as the launcher tracks it."""

    name: str
    epoch: int
    actor: Any
    pid: int
    node: str
    channel: socket.socket  # our copy of the replica's end of the channel pair
    output_w: int  # write end of the pipe the supervisor reads output from
    ident: int = 0
    ref: Any = None
    output: socket.socket | None = None
    control: socket.socket | None = None
    pending_signals: bytearray = field(default_factory=bytearray)
    killed: bool = False  # we sent SIGKILL: its loss is no news
    abandoned: bool = False  # ended before it connected; refuse it later
    relays: int = 0  # relays still copying
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, kind: str, conn: socket.socket) -> bool:
        with self.lock:
            if self.abandoned or getattr(self, kind) is not None:
                return False
            setattr(self, kind, conn)
            self.relays += 1
            return True

    def relay_ended(self) -> None:
        with self.lock:
            self.relays -= 1
            both = self.output is not None and self.control is not None
            if both and self.relays == 0:
                self.done.set()


@dataclass(frozen=True)
class _Placement:
    options: dict[str, Any]
    node: str | None  # the node a binding stage is pinned to


class RayLauncher:
    """Replicas as Ray actors; see the module's docstring."""

    def __init__(self, pipeline: Pipeline, run_dir: Path) -> None:
        self.pipeline = pipeline
        self.run_dir = run_dir
        self.address = pipeline.ray_address
        self._connect()
        self.driver_node = ray.util.get_node_ip_address()
        self.boot_id = _boot_id()
        self.nodes = self._live_nodes()
        self.placements = {s.name: self._place(s) for s in pipeline.stages}
        self.endpoints = self._resolve_endpoints()
        self.stages = {s.name: self._resolved(s) for s in pipeline.stages}
        self.keys = RunKeys.generate() if pipeline.curve else None
        sink = next((s for s in pipeline.stages if s.role == "sink"), None)
        self.ack_endpoint: str | None = None
        if pipeline.exactly_once and sink is not None:
            self.ack_endpoint = f"tcp://{self.placements[sink.name].node}:0"

        self.token = secrets.token_bytes(32)
        self.listener = socket.create_server((self.driver_node, 0), backlog=64)
        self.lock = threading.Lock()
        self.by_ident: dict[int, _Incarnation] = {}
        self.pending: dict[tuple[str, int], _Incarnation] = {}
        self.running: dict[Any, _Incarnation] = {}
        self.ended: list[tuple[int, int]] = []
        self.failed_starts = itertools.count(1)
        self.nodes_of: dict[int, str] = {}  # for the report, after exits too
        self.closed = False
        self._threads = [
            threading.Thread(target=self._accept, name="ray-accept", daemon=True),
            threading.Thread(target=self._wait, name="ray-wait", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.warm = self._warm_up()

    # -- connecting and placing -----------------------------------------------

    def _connect(self) -> None:
        kwargs: dict[str, Any] = {
            "address": self.address,
            "log_to_driver": False,  # replica output reaches us directly
            "logging_level": logging.WARNING,
        }
        self._probe()
        node_ip = local_address_of(self.address)
        if node_ip is not None:
            # Ray would otherwise pick this machine's outward address.
            kwargs["_node_ip_address"] = node_ip
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(self.address, f"cannot connect: {exc}") from exc

    def _probe(self) -> None:
        """Fail at once on a wrong address: ray.init retries for minutes."""
        if self.address in ("auto", "local") or "://" in self.address:
            return
        host, _, port = self.address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_S).close()
        except (OSError, ValueError) as exc:
            raise ClusterError(self.address, f"nothing answers there ({exc})") from exc

    def _live_nodes(self) -> dict[str, dict[str, Any]]:
        return {
            n["NodeManagerAddress"]: n for n in ray.nodes() if n.get("Alive", False)
        }

    def _node_id(self, ip: str, what: str) -> str:
        node = self.nodes.get(ip)
        if node is None:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise ClusterError(self.address, f"{what}: no live node at {ip} ({known})")
        return str(node["NodeID"])

    def _place(self, stage: Stage) -> _Placement:
        """Ray options for a stage's actors; binding stages get a fixed node."""
        want = stage.placement
        what = f"stages.{stage.name}.placement"
        options: dict[str, Any] = {}
        node = want.node if want else None
        if want and want.resource:
            options["resources"] = {want.resource: RESOURCE_SHARE}
            offering = [
                ip
                for ip, n in sorted(self.nodes.items())
                if n["Resources"].get(want.resource, 0) > 0
            ]
            if not offering:
                raise ClusterError(
                    self.address, f"{what}: no node offers resource {want.resource!r}"
                )
            if _must_pin(self.pipeline, stage):
                node = offering[0]
        if want and want.spread:
            options["scheduling_strategy"] = "SPREAD"
        if node is None and _must_pin(self.pipeline, stage):
            node = self.driver_node  # beside the supervisor, by default
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                self._node_id(node, what), soft=False
            )
        return _Placement(options, node)

    def _resolve_endpoints(self) -> dict[str, str]:
        """Each endpoint on the address of the node whose stage binds it."""
        resolved = {}
        for stage in self.pipeline.stages:
            for side in (stage.pull, stage.push):
                if side is not None and side.bind:
                    port = side.bind.rsplit(":", 1)[1]
                    node = self.placements[stage.name].node
                    resolved[side.bind] = f"tcp://{node}:{port}"
        return resolved

    def _resolved(self, stage: Stage) -> Stage:
        def move(side: Socket | None) -> Socket | None:
            if side is None:
                return None
            if side.bind:
                return Socket(bind=self.endpoints[side.bind])
            return Socket(connect=tuple(self.endpoints[e] for e in side.connect))

        return replace(stage, pull=move(stage.pull), push=move(stage.push))

    def _warm_up(self) -> dict[tuple[str, int], tuple[Any, int, str, str]]:
        """Create every replica's first actor at once: Ray starts them in
        parallel, where spawning them one by one would add their start-ups."""
        wanted = [
            (stage, index)
            for stage in self.pipeline.stages
            for index in range(stage.replicas)
        ]
        actors = [self._new_actor(stage) for stage, _ in wanted]
        names = [f"{s.name}.{i}" for s, i in wanted]
        hellos = self._hello(
            actors, names, max(FIRST_START_S, self.pipeline.ready_timeout)
        )
        return {
            (stage.name, index): (actor, *hello)
            for (stage, index), actor, hello in zip(wanted, actors, hellos, strict=True)
        }

    def _new_actor(self, stage: Stage) -> Any:
        options = self.placements[stage.name].options
        actor_class: Any = ReplicaActor  # ray.remote made it an ActorClass
        return actor_class.options(**options).remote()

    def _hello(
        self, actors: list[Any], names: list[str], timeout: float
    ) -> list[tuple[int, str, str]]:
        try:
            return list(ray.get([a.hello.remote() for a in actors], timeout=timeout))
        except ray.exceptions.GetTimeoutError as exc:
            for actor in actors:
                ray.kill(actor)
            raise ClusterError(
                self.address,
                f"{', '.join(names)}: no actor started within {timeout:g} s "
                "(does the placement fit the cluster?)",
            ) from exc
        except ray.exceptions.RayError as exc:
            for actor in actors:
                ray.kill(actor)
            raise ClusterError(self.address, f"{', '.join(names)}: {exc}") from exc

    # -- the launcher ---------------------------------------------------------

    def spawn(self, spec: ReplicaSpec, supervisor_pid: int) -> tuple[int, int]:
        stage = spec.stage
        name = f"{stage.name}.{spec.replica}"
        found = self.warm.pop((stage.name, spec.replica), None)
        if found is None:
            actor = self._new_actor(stage)
            try:
                hello = self._hello([actor], [name], self.pipeline.ready_timeout)
                found = (actor, *hello[0])
            except ClusterError as exc:
                return self._failed_start(name, exc)
        actor, pid, node, boot = found

        read_fd, write_fd = os.pipe()
        inc = _Incarnation(
            name, spec.epoch, actor, pid, node, spec.channel.sock.dup(), write_fd
        )
        fields = {
            "pipeline": spec.pipeline,
            "stage": self.stages[stage.name],
            "replica": spec.replica,
            "run_dir": spec.run_dir,
            "src_id": spec.src_id,
            "ack_endpoint": self.ack_endpoint,
            "expected_peers": spec.expected_peers,
            "epoch": spec.epoch,
            "curve": self._curve(self.stages[stage.name]),
        }
        with self.lock:
            inc.ident = pid if boot == self.boot_id else pid + PID_LIMIT
            while inc.ident in self.by_ident:  # the same pid on another host
                inc.ident += PID_LIMIT
            self.by_ident[inc.ident] = inc
            self.nodes_of[inc.ident] = node
            self.pending[(name, spec.epoch)] = inc
            listener = self.listener.getsockname()[:2]
            inc.ref = actor.run.remote(fields, listener, self.token)
            self.running[inc.ref] = inc
        here = "" if inc.ident == pid else f" (id {inc.ident} here)"
        log.info("%s pid %d on node %s%s", name, pid, node, here)
        return inc.ident, read_fd

    def _failed_start(self, name: str, exc: ClusterError) -> tuple[int, int]:
        """A restart whose actor could not start (its node was dying, the
        cluster is full): an immediate exit 1, so that the stage's restart
        policy and back-off decide what comes next, as for a crash."""
        log.warning("%s: no actor started: %s", name, exc.reason)
        read_fd, write_fd = os.pipe()
        os.close(write_fd)  # no output: EOF at once
        with self.lock:
            ident = FAILED_IDS + next(self.failed_starts)
            self.ended.append((ident, 1 << 8))
        os.kill(os.getpid(), signal.SIGCHLD)
        return ident, read_fd

    def _curve(self, stage: Stage) -> Any:
        if self.keys is None:
            return None
        sides = [s for s in (stage.pull, stage.push) if s is not None]
        binds = any(s.bind for s in sides) or (
            self.pipeline.exactly_once and stage.role == "sink"
        )
        connects = any(s.connect for s in sides) or (
            self.pipeline.exactly_once and stage.role == "source"
        )
        return self.keys.for_stage(binds=binds, connects=connects)

    def signal(self, pid: int, signum: int) -> None:
        inc = self.by_ident.get(pid)
        if inc is None:
            return
        if signum == signal.SIGKILL:
            inc.killed = True
            ray.kill(inc.actor, no_restart=True)
            return
        with inc.lock:
            if inc.output is None:  # not connected yet: deliver on hello
                inc.pending_signals.append(signum)
                return
            with contextlib.suppress(OSError):
                inc.output.sendall(bytes([signum]))

    def node(self, pid: int | None) -> str | None:
        return self.nodes_of.get(pid or 0)

    def reap(self) -> list[tuple[int, int]]:
        with self.lock:
            ended, self.ended = self.ended, []
        return ended

    def close(self) -> None:
        with self.lock:
            self.closed = True
            live = [inc.actor for inc in self.by_ident.values()]
            live += [found[0] for found in self.warm.values()]
            self.warm.clear()
        for actor in live:
            with contextlib.suppress(Exception):  # already gone is fine
                ray.kill(actor, no_restart=True)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        for thread in self._threads:
            # The waiter may be draining a replica; Ray must outlive its calls.
            thread.join(timeout=2 * DRAIN_S + WAIT_POLL_S + 1.0)
        ray.shutdown()

    # -- exits ----------------------------------------------------------------

    def _wait(self) -> None:
        """Watch the actors' run tasks; queue each end and wake the supervisor."""
        while not self.closed:
            with self.lock:
                refs = list(self.running)
            if not refs:
                time.sleep(WAIT_POLL_S)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=WAIT_POLL_S)
            for ref in done:
                if self.closed:  # the supervisor has stopped reaping
                    return
                with self.lock:
                    inc = self.running.pop(ref)
                    self.pending.pop((inc.name, inc.epoch), None)
                status = self._status(ref, inc)
                self._drain(inc)
                with contextlib.suppress(Exception):
                    ray.kill(inc.actor, no_restart=True)
                with self.lock:
                    self.by_ident.pop(inc.ident, None)
                    self.ended.append((inc.ident, status))
                os.kill(os.getpid(), signal.SIGCHLD)  # as a child's exit would

    def _status(self, ref: Any, inc: _Incarnation) -> int:
        """The end of a run task as a wait status, for the supervisor."""
        try:
            code = int(ray.get(ref))
        except ray.exceptions.RayActorError as exc:
            # The process or its node is gone: like a kill -9 for the
            # supervisor's restart policy; the reason is Ray's.
            reason = (str(exc).strip().splitlines() or [""])[0]
            if not inc.killed:
                log.warning("%s pid %d: actor lost: %s", inc.name, inc.pid, reason)
            return int(signal.SIGKILL)
        except ray.exceptions.RayError as exc:
            log.warning("%s pid %d: %s", inc.name, inc.pid, exc)
            return 1 << 8
        return (code & 0xFF) << 8

    def _drain(self, inc: _Incarnation) -> None:
        """Let the replica's last output and messages reach the supervisor."""
        if not inc.done.wait(DRAIN_S):
            for conn in (inc.output, inc.control):
                if conn is not None:  # a lost node never sends its FIN
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            inc.done.wait(DRAIN_S)
        with inc.lock:
            inc.abandoned = True
            never_output = inc.output is None
            never_control = inc.control is None
        # What never connected has no relay to close it: EOF to the supervisor.
        if never_output:
            os.close(inc.output_w)
        if never_control:
            inc.channel.close()

    # -- connections from the actors ------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the run is over
                return
            threading.Thread(
                target=self._greet, args=(conn,), name="ray-greet", daemon=True
            ).start()

    def _greet(self, conn: socket.socket) -> None:
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            (size,) = _HEADER.unpack(_recv_exactly(conn, _HEADER.size))
            hello = _decode(_recv_exactly(conn, min(size, 4096)))
        except (OSError, ValueError, struct.error, msgspec.DecodeError):
            conn.close()
            return
        conn.settimeout(None)
        token = hello.get("token") if isinstance(hello, dict) else None
        if not isinstance(token, bytes) or not hmac.compare_digest(token, self.token):
            log.warning("refused a control connection without this run's token")
            conn.close()
            return
        with self.lock:
            inc = self.pending.get((hello.get("replica"), hello.get("epoch")))
        if inc is None:
            conn.close()
            return
        if hello.get("kind") == "control":
            if hello.get("ack"):
                self.ack_endpoint = hello["ack"]  # the sink chose its port
            self._relay_control(inc, conn)
        elif hello.get("kind") == "output":
            self._relay_output(inc, conn)
        else:
            conn.close()

    def _relay_control(self, inc: _Incarnation, conn: socket.socket) -> None:
        """Replica to supervisor on this thread, the other way on another."""
        if not inc.attach("control", conn):
            conn.close()
            return
        inc.channel.setblocking(True)
        down = threading.Thread(
            target=_copy_down, args=(inc.channel, conn), name="ray-down", daemon=True
        )
        down.start()
        try:
            while data := _recv(conn):
                inc.channel.sendall(data)
        except OSError:
            pass
        finally:
            # EOF to the supervisor, as when a child's end closes; it also
            # ends the copy downwards.
            with contextlib.suppress(OSError):
                inc.channel.shutdown(socket.SHUT_RDWR)
            down.join()
            inc.channel.close()
            conn.close()
            inc.relay_ended()

    def _relay_output(self, inc: _Incarnation, conn: socket.socket) -> None:
        """Output up into the supervisor's pipe; signals go down meanwhile."""
        if not inc.attach("output", conn):
            conn.close()
            return
        with inc.lock:  # signals sent before the replica connected
            pending, inc.pending_signals = bytes(inc.pending_signals), bytearray()
        if pending:
            with contextlib.suppress(OSError):
                conn.sendall(pending)
        try:
            while data := _recv(conn):
                view = memoryview(data)
                while view:
                    view = view[os.write(inc.output_w, view) :]
        except OSError:
            pass
        finally:
            os.close(inc.output_w)
            conn.close()
            inc.relay_ended()


def _copy_down(channel: socket.socket, conn: socket.socket) -> None:
    """Supervisor to replica: redelivery notices, until either side ends."""
    try:
        while data := _recv(channel):
            conn.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(65536)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("closed before the hello was complete")
        data += chunk
    return data


def _boot_id() -> str:
    """Which running kernel this is: pids mean the same only under one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - not Linux
        return socket.gethostname()


def _must_pin(pipeline: Pipeline, stage: Stage) -> bool:
    """Stages whose node must be known before anything starts: the binders
    (others connect to their address) and, with exactly-once delivery, the
    sink (its ledger is a file on its node; its ack endpoint an address)."""
    binds = any(s is not None and s.bind for s in (stage.pull, stage.push))
    return binds or (pipeline.exactly_once and stage.role == "sink")


def local_address_of(address: str) -> str | None:
    """The cluster address's host, if it is an address of this machine.

    The driver must be given its node's address: Ray's own guess is the
    machine's outward address, which is no Ray node when the cluster runs
    on loopback addresses such as 127.0.0.2.
    """
    if address in ("auto", "local") or "://" in address:
        return None
    host = address.rsplit(":", 1)[0]
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
    except OSError:
        return None
    return host


__all__ = ["RayLauncher", "ReplicaActor", "local_address_of"]
