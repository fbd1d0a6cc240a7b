"""Where a pipeline keeps its runtime files, and the lock that makes it one.

Layout (``ORCHESTRATOR_HOME`` overrides the base; otherwise
``$XDG_RUNTIME_DIR/orchestrator`` or ``/tmp/orchestrator-<uid>``)::

    <base>/<pipeline>-<hash of the pipeline file's path>/   mode 0700
        supervisor.pid     the lock: the pid of the supervisor holding it
        control.sock       the daemon's control socket, mode 0600
        report.json        the last run's report
        logs/<stage>.<replica>.log
        run/               wiped at each start: ledger, dead letters, sockets
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from .config import Pipeline
from .errors import AlreadyRunning


def base() -> Path:
    explicit = os.environ.get("ORCHESTRATOR_HOME")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "orchestrator"
    return Path(f"/tmp/orchestrator-{os.getuid()}")


def pipeline_dir(pipeline: Pipeline) -> Path:
    digest = hashlib.sha1(str(pipeline.path).encode()).hexdigest()[:8]
    path = base() / f"{pipeline.name}-{digest}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    (path / "logs").mkdir(mode=0o700, exist_ok=True)
    return path


def fresh_run_dir(pipeline_path: Path) -> Path:
    run = pipeline_path / "run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(mode=0o700)
    return run


class Lock:
    """An exclusive ``flock`` on the pidfile, held for the supervisor's life.

    The kernel drops the lock when its holder dies, however it dies, so a
    pidfile left by a killed supervisor is stale exactly when it is unlocked.
    """

    def __init__(self, directory: Path, pipeline: str) -> None:
        self.path = directory / "supervisor.pid"
        self.pipeline = pipeline
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(self.pipeline, self.holder() or 0) from exc
            raise
        self._fd = fd
        self.write_pid(os.getpid())

    def write_pid(self, pid: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def holder(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
