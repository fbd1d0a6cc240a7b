"""The entry point of a stage process: pick the runtime for the stage's role,
run it, and turn what happened into an exit code and a last message.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import msgspec

from .codec import Unencodable
from .runtime import (
    EXIT_EXCEPTION,
    EXIT_SETUP,
    GC_THRESHOLD,
    ReplicaSpec,
    RunAborted,
    Runtime,
    Stopping,
    UserError,
    user_traceback,
)
from .sink import SinkRuntime
from .source import SourceRuntime
from .stagefn import resolve
from .worker import WorkerRuntime

log = logging.getLogger(__name__)

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
        try:
            runtime.open()
        except Stopping:  # stopped while waiting for its peers: not a crash
            return 0
        runtime.channel.send_blocking({"t": "ready"})
        try:
            summary = runtime.run(fn)  # type: ignore[attr-defined]
        except (Stopping, RunAborted):
            pass
        except Unencodable as exc:  # the function returned what cannot travel
            raise UserError(user_traceback(exc)) from exc
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
        # The counters since the last heartbeat too: the supervisor judges
        # by them whether the stage handles any input at all.
        runtime.channel.send_blocking({"t": "hb", "c": runtime.status()})
        runtime.channel.send_blocking(message)
        print(exc.text, end="", flush=True)
        return EXIT_SETUP if exc.setup else EXIT_EXCEPTION
    finally:
        runtime.close()
