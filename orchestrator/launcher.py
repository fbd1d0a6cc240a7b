"""Forking one stage process and turning the child into a clean stage.

The supervisor forks from its own warm interpreter (stage modules already
imported: a replacement is ready in milliseconds, not the ~0.1 s a new
interpreter takes to import zmq).  This is safe because the supervisor never
creates a ZeroMQ context: nothing of ZeroMQ crosses the fork.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .replica import run_replica
from .runtime import ReplicaSpec

if TYPE_CHECKING:
    from .config import Pipeline

_PR_SET_PDEATHSIG = 1

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def spawn(spec: ReplicaSpec, supervisor_pid: int) -> tuple[int, int]:
    """Fork a stage process; returns its pid and the read end of its output."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, measured by the tests
        code = 1
        try:
            os.close(read_fd)
            _become_stage(spec, write_fd, supervisor_pid)
            if spec.stage.command is not None:
                _exec_command(spec)
            code = run_replica(spec)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _become_stage(spec: ReplicaSpec, output_fd: int, supervisor_pid: int) -> None:
    # Die with the supervisor, even if it is killed with SIGKILL; then check
    # it did not die before the request took effect.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        os._exit(1)

    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's

    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    # Holding a sibling's control socket would hide that sibling's death from
    # the supervisor (no EOF while a copy is open), so close all we inherited.
    keep = spec.channel.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    os.environ.update(stage_environment(spec))
    try:
        import setproctitle

        setproctitle.setproctitle(
            f"orchestrator: {spec.pipeline.name} {spec.stage.name}.{spec.replica}"
        )
    except ImportError:  # pragma: no cover - it is a dependency
        pass


def stage_environment(spec: ReplicaSpec) -> dict[str, str]:
    """The documented variables every stage process gets (docs/stages.md)."""
    env = {
        "ORCHESTRATOR_PIPELINE": spec.pipeline.name,
        "ORCHESTRATOR_STAGE": spec.stage.name,
        "ORCHESTRATOR_REPLICA": str(spec.replica),
        "ORCHESTRATOR_REPLICAS": str(spec.stage.replicas),
        "ORCHESTRATOR_RUN_DIR": str(spec.run_dir),
        "ORCHESTRATOR_CODEC": spec.pipeline.codec,
        "ORCHESTRATOR_CONTROL_FD": str(spec.channel.fileno()),
        "ORCHESTRATOR_PARAMS": json.dumps(dict(spec.stage.params), default=str),
    }
    for side in ("pull", "push"):
        socket = getattr(spec.stage, side)
        if socket is None:
            continue
        prefix = f"ORCHESTRATOR_{side.upper()}"
        if socket.bind:
            env[f"{prefix}_BIND"] = socket.bind
        else:
            env[f"{prefix}_CONNECT"] = " ".join(socket.connect)
    env.update(spec.stage.env)
    return env


def _exec_command(spec: ReplicaSpec) -> None:  # pragma: no cover - replaced by exec
    assert spec.stage.command is not None
    _own_group()
    os.set_inheritable(spec.channel.fileno(), True)
    try:
        os.execvp(spec.stage.command[0], list(spec.stage.command))
    except OSError as exc:
        print(f"cannot run {spec.stage.command[0]!r}: {exc.strerror}", flush=True)
        os._exit(127)


def _own_group(pid: int = 0) -> None:
    """Make a command stage the leader of a process group of its own.

    A command may be a wrapper (a shell script) whose real work runs in a
    child: signals go to the whole group, so stopping the stage stops that
    child too instead of leaving it to init.  Both the parent and the child
    call this, so the group exists before either goes on, whichever runs
    first.
    """
    try:
        os.setpgid(pid, pid)
    except (PermissionError, ProcessLookupError):
        pass  # the child already exec'd (it did this itself) or is gone


class Launcher(Protocol):
    """How the supervisor starts, signals and reaps replicas.

    ``spawn`` returns an id the supervisor treats as a pid and the read end
    of the replica's output; ``reap`` returns ``(pid, wait status)`` of
    replicas that ended, after a SIGCHLD woke the supervisor.
    """

    def spawn(self, spec: ReplicaSpec, supervisor_pid: int) -> tuple[int, int]: ...

    def signal(self, pid: int, signum: int) -> None: ...

    def reap(self) -> list[tuple[int, int]]: ...

    def node(self, pid: int | None) -> str | None:
        """The address of the host a replica ran on, if not this one."""

    def close(self) -> None: ...


class ForkLauncher:
    """Replicas as forked children of the supervisor (the local backend)."""

    def __init__(self) -> None:
        self.groups: set[int] = set()  # command stages: pid == pgid

    def spawn(self, spec: ReplicaSpec, supervisor_pid: int) -> tuple[int, int]:
        pid, output = spawn(spec, supervisor_pid)
        if spec.stage.command is not None:
            _own_group(pid)
            self.groups.add(pid)
        return pid, output

    def signal(self, pid: int, signum: int) -> None:
        try:
            if pid in self.groups:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:  # already dead; SIGCHLD will tell us
            pass

    def reap(self) -> list[tuple[int, int]]:
        ended: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return ended
            if pid == 0:
                return ended
            if pid in self.groups:
                self._end_group(pid)
            ended.append((pid, status))

    def _end_group(self, pid: int) -> None:
        """What a command stage left behind in its group dies with it."""
        self.groups.discard(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left: the usual case
            pass

    def node(self, pid: int | None) -> str | None:
        return None

    def close(self) -> None:
        pass


def for_pipeline(pipeline: Pipeline, run_dir: Path) -> Launcher:
    """The launcher of the pipeline's backend; only "ray" imports Ray."""
    if pipeline.backend == "ray":
        from .raybackend import RayLauncher

        return RayLauncher(pipeline, run_dir)
    return ForkLauncher()
