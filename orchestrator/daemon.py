"""Running a pipeline under a supervisor, in the foreground or as a daemon.

:func:`supervise` is the one way a run happens: it serves the control socket
from the supervisor's loop and leaves ``report.json`` behind.  ``orchestrator
run`` calls it directly; ``orchestrator up`` first turns a child into a
daemon (:func:`start`) and waits, on a pipe, for it to say that every stage
is ready or why it is not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import psutil

from . import config, files, report, rundir
from .control import ControlServer, retired_entry
from .errors import OrchestratorError
from .output import LOG_BACKUPS, LOG_BYTES
from .replicastate import Replica
from .supervisor import Supervisor

log = logging.getLogger(__name__)

# An orphaned stage gets this long to go after SIGTERM before SIGKILL.
ORPHAN_GRACE_S = 2.0
# On top of every start group's ready timeout: imports, forks, a slow disk.
UP_MARGIN_S = 10.0

# Attaches what a caller wants on the loop (display, metrics) before it runs.
Prepare = Callable[[Supervisor], None]


class DaemonFailed(OrchestratorError):
    """The daemon did not get every stage ready."""


def acquire(lock: rundir.Lock, directory: Path) -> list[str]:
    """Take the pipeline's lock; clean up after a supervisor that was killed.

    Returns notes for the user about what was cleaned up.
    """
    previous = lock.holder()
    lock.acquire()  # raises AlreadyRunning while a supervisor holds it
    notes = []
    if previous is not None and previous != os.getpid():
        notes.append(f"removed a stale pidfile (supervisor pid {previous} is gone)")
    orphans = stop_orphans(directory / "run")
    if orphans:
        notes.append(f"stopped {len(orphans)} orphaned stage process(es): {orphans}")
    return notes


def stop_orphans(run_dir: Path) -> list[int]:
    """Stop processes left from an earlier run of this pipeline.

    Stages die with their supervisor (PR_SET_PDEATHSIG), but a ``command``
    stage's own children do not; every process of a run carries
    ``ORCHESTRATOR_RUN_DIR`` in its environment, so that is how we find them.
    """
    wanted = str(run_dir)
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.pid != os.getpid()
                and proc.environ().get("ORCHESTRATOR_RUN_DIR") == wanted
            ):
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=ORPHAN_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in found]


def supervise(
    loaded: config.Pipeline,
    directory: Path,
    timeout: float | None,
    *,
    on_output: Callable[[Replica, str], None] | None = None,
    on_ready: Callable[[dict[str, Any] | None], None] | None = None,
    prepare: Prepare | None = None,
) -> dict[str, Any]:
    """Run ``loaded`` under supervision, serving the control socket.

    ``on_ready`` is called once: with None when every stage is ready, or with
    the final report when the run ended before that.
    """
    # The last run's report goes now, not when this one ends: a run that is
    # killed leaves none, and must not pass the one before off as its own.
    (directory / "report.json").unlink(missing_ok=True)
    supervisor = Supervisor(
        loaded, rundir.fresh_run_dir(directory), directory / "logs", on_output
    )
    if prepare is not None:  # before the control socket: it may fail
        prepare(supervisor)
    server = ControlServer(supervisor, directory / "control.sock")
    told = False

    def watch_ready() -> None:
        nonlocal told
        if not told and supervisor.status == "running":
            told = True
            if on_ready is not None:
                on_ready(None)

    supervisor.hooks.append(watch_ready)
    try:
        supervisor.run(timeout)
    finally:
        result = report.build(supervisor)
        result["signal"] = supervisor.signal_received
        result["supervisor_pid"] = os.getpid()
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result["retired"] = [retired_entry(r) for r in server.retired]
        if server.stop_requested:
            result["stopped_by"] = "orchestrator stop"
        write_report(directory / "report.json", result)
        server.finish(result)
    if not told and on_ready is not None:
        on_ready(result)
    return result


def write_report(path: Path, result: dict[str, Any]) -> None:
    files.write_text(path, json.dumps(result, default=str))


# -- the daemon ------------------------------------------------------------------


def start(
    loaded: config.Pipeline,
    directory: Path,
    lock: rundir.Lock,
    timeout: float | None,
    prepare: Prepare | None = None,
) -> dict[str, Any]:
    """Start a daemon supervising ``loaded``; return once every stage is ready.

    The caller holds ``lock``; the daemon inherits it (a ``flock`` belongs to
    the open file, which the fork shares) and writes its own pid into it.
    Raises :class:`DaemonFailed` with the reason when the stages do not all
    get ready.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the daemon, measured by the tests
        os.close(read_fd)
        _become_daemon(loaded, directory, lock, timeout, prepare, write_fd)
    os.close(write_fd)
    os.waitpid(pid, 0)  # the intermediate child exits at once
    budget = loaded.ready_timeout * len(loaded.stages) + UP_MARGIN_S
    answer = _read_answer(read_fd, budget)
    if answer is None:
        raise DaemonFailed(
            f"the daemon did not report within {budget:g} s; "
            f"see {directory / 'supervisor.log'}"
        )
    if not answer.get("ok"):
        raise DaemonFailed(answer.get("error") or "the daemon failed to start")
    return answer


def _read_answer(fd: int, budget: float) -> dict[str, Any] | None:
    import selectors

    data = b""
    deadline = time.monotonic() + budget
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    os.close(fd)
    try:
        answer = json.loads(data.decode())
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _become_daemon(
    loaded: config.Pipeline,
    directory: Path,
    lock: rundir.Lock,
    timeout: float | None,
    prepare: Prepare | None,
    ready_fd: int,
) -> None:  # pragma: no cover - runs in the daemon
    """The classic double fork: no controlling terminal can ever come back."""
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        lock.write_pid(os.getpid())
        _detach_stdio(directory)
        _daemon_logging(directory)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with contextlib.suppress(ImportError):
            import setproctitle

            setproctitle.setproctitle(f"orchestrator-daemon: {loaded.name}")
        log.info("pipeline %s: daemon pid %d", loaded.name, os.getpid())

        def tell(result: dict[str, Any] | None) -> None:
            nonlocal ready_fd
            if ready_fd < 0:
                return
            answer: dict[str, Any]
            if result is None:
                answer = {"ok": True, "pid": os.getpid()}
            elif result["status"] == "completed":  # too short to be seen running
                answer = {"ok": True, "pid": os.getpid(), "completed": True}
            else:
                answer = {"ok": False, "error": result.get("failure") or "stopped"}
            with contextlib.suppress(OSError):
                os.write(ready_fd, json.dumps(answer).encode())
            os.close(ready_fd)
            ready_fd = -1

        result = supervise(loaded, directory, timeout, on_ready=tell, prepare=prepare)
        code = report.exit_code(result)
        log.info("pipeline %s: %s", loaded.name, result["status"])
    except BaseException as exc:
        log.exception("the daemon failed")
        traceback.print_exc()
        if ready_fd >= 0:
            with contextlib.suppress(OSError):
                reason = str(exc) if isinstance(exc, OrchestratorError) else repr(exc)
                message = f"the daemon failed: {reason}"
                os.write(ready_fd, json.dumps({"ok": False, "error": message}).encode())
    finally:
        with contextlib.suppress(BaseException):
            lock.release()
            logging.shutdown()
        os._exit(code)


def _detach_stdio(directory: Path) -> None:
    """stdin from /dev/null; stdout and stderr (tracebacks, stray prints) to a file.

    This also lets go of the pipes of whoever ran `up`, so that a caller
    reading our output sees its end when `up` exits.
    """
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(
        directory / "supervisor.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _daemon_logging(directory: Path) -> None:
    handler = RotatingFileHandler(
        directory / "supervisor.log",
        maxBytes=LOG_BYTES,
        backupCount=LOG_BACKUPS,
        encoding="utf-8",
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
