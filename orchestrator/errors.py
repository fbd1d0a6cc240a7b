"""Every error the orchestrator reports to a user, under one base class.

Each error carries the context a user needs to act on it (the TOML key path
and line, the endpoint, the stage and replica) and the exit code the CLI
ends with.  Errors from third-party libraries are translated into these at
the boundary where they happen; the CLI is the one place that prints them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class OrchestratorError(Exception):
    """Base class: a message for the user and the exit code that goes with it."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline file, located as precisely as we can."""

    source: str  # the file, or "--set" for a command-line override
    line: int | None
    key: str  # dotted key path, "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return (
            f"{where}: {self.key}: {self.message}"
            if self.key
            else (f"{where}: {self.message}")
        )


class ConfigError(OrchestratorError):
    """The pipeline file (or an override) is invalid; nothing was started."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the pipeline:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class UsageError(OrchestratorError):
    """The command line itself is wrong."""

    exit_code = EXIT_USAGE


class OutputNotWritten(OrchestratorError):
    """A file asked for on the command line (--report, --junit) could not be
    written at the end of the run."""

    def __init__(self, option: str, path: str, reason: str) -> None:
        self.option = option
        self.path = path
        self.reason = reason
        super().__init__(f"{option} {path}: could not write it: {reason}")


class ClusterError(OrchestratorError):
    """The ray backend cannot use the cluster: unreachable, refused, no room."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"Ray cluster {address}: {reason}")


class AlreadyRunning(OrchestratorError):
    """Another supervisor holds this pipeline's runtime directory."""

    def __init__(self, pipeline: str, pid: int) -> None:
        self.pipeline = pipeline
        self.pid = pid
        super().__init__(
            f"pipeline {pipeline!r} is already running under supervisor pid {pid}"
        )


class StageFailed(OrchestratorError):
    """A stage could not be kept running; the run failed because of it."""

    def __init__(self, stage: str, replica: int, reason: str, tail: str = "") -> None:
        self.stage = stage
        self.replica = replica
        self.reason = reason
        self.tail = tail
        message = f"stage {stage}.{replica} failed: {reason}"
        if tail:
            message += "\nlast lines of its output:\n" + tail
        super().__init__(message)


class WouldOverwrite(OrchestratorError):
    """`orchestrator init` would replace files that exist; nothing was written."""

    exit_code = EXIT_USAGE

    def __init__(self, paths: Iterable[object]) -> None:
        self.paths = [str(path) for path in paths]
        verb = "exists" if len(self.paths) == 1 else "exist"
        super().__init__(
            f"{', '.join(self.paths)} already {verb}; use --force to overwrite"
        )


class EndpointInUse(OrchestratorError):
    """A stage could not bind its endpoint because something else holds it."""

    def __init__(self, endpoint: str, holder: str | None = None) -> None:
        self.endpoint = endpoint
        self.holder = holder
        detail = f" (held by {holder})" if holder else ""
        super().__init__(f"endpoint {endpoint} is already in use{detail}")


EXIT_NOT_RUNNING = 3  # like LSB's "program is not running", for `status`


class NotRunning(OrchestratorError):
    """No daemon answers on this pipeline's control socket."""

    exit_code = EXIT_NOT_RUNNING

    def __init__(self, pipeline: str, socket_path: str) -> None:
        self.pipeline = pipeline
        self.socket_path = socket_path
        super().__init__(
            f"no daemon is running pipeline {pipeline!r} (nothing answers on "
            f"{socket_path}); start it with `orchestrator up`"
        )


class ControlRefused(OrchestratorError):
    """The daemon rejected a control request, or answered nonsense."""

    exit_code = EXIT_USAGE  # what was asked cannot be done: fix the request

    def __init__(self, request: str, reason: str) -> None:
        self.request = request
        self.reason = reason
        super().__init__(f"{request}: {reason}")
