"""User stage functions: finding them, checking them, and what they are given.

A stage is a plain Python function; its role comes from the wiring:

* a **source** ``fn(ctx, **params)`` returns or yields records;
* a **worker** ``fn(record, ctx, **params)`` returns ``None`` (no output),
  one record, or a list or generator of several;
* a **sink** ``fn(records, ctx, **params)`` iterates over the records that
  reach it and returns a summary (any value the codec can encode) that goes
  into the report.

``params`` come from ``[stages.NAME.params]`` as keyword arguments, so a
misspelt parameter is caught by ``orchestrator check`` before anything runs.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Pipeline, Stage
from .errors import Problem
from .tomlfile import PipelineSource

_POSITIONAL = {
    "source": ("ctx",),
    "worker": ("record", "ctx"),
    "sink": ("records", "ctx"),
}


@dataclass(frozen=True)
class StageContext:
    """What a stage function knows about where it runs."""

    pipeline: str
    stage: str
    replica: int
    replicas: int
    params: dict[str, Any]
    run_dir: Path
    log: logging.Logger = field(repr=False)
    _resume: Callable[[], int] | None = field(default=None, repr=False)

    def resume(self) -> int:
        """A source's place in its stream: how many of its first inputs an
        earlier incarnation delivered (0 on a first start).

        A source that calls this must start its stream at that position, and
        the runtime numbers its records from there.  A source that does not
        is read from the start, and the runtime skips what was delivered:
        that costs the time to make those records again, and for a paced
        source (see ``stages.classic.produce``) the pace too.
        """
        if self._resume is None:
            raise RuntimeError("only a source stage has a stream to resume")
        return self._resume()


class ResolveError(Exception):
    pass


def resolve(call: str, base_dir: Path) -> Callable[..., Any]:
    """The function named by ``module:function``, importing relative to ``base_dir``."""
    module_name, _, attr = call.partition(":")
    base = str(base_dir)
    if base not in sys.path:
        sys.path.insert(0, base)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ResolveError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # user code ran at import time and broke
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise ResolveError(f"importing {module_name!r} raised {last}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ResolveError(f"module {module_name!r} has no {attr!r}") from exc
    if not callable(target):
        raise ResolveError(f"{call} is not callable")
    return target  # type: ignore[no-any-return,unused-ignore]


def check_call(fn: Callable[..., Any], stage: Stage) -> str | None:
    """Why ``fn`` cannot be called as ``stage``'s role with its params, or None."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C function: we cannot tell, so we trust it
    positional = _POSITIONAL[stage.role]
    try:
        signature.bind(*positional, **stage.params)
    except TypeError as exc:
        expected = ", ".join(positional) + ", **params"
        return f"{stage.call} cannot be called as a {stage.role} ({expected}): {exc}"
    return None


def check_command(program: str) -> str | None:
    """Why ``program`` cannot be executed, or None; as ``execvp`` will look."""
    if os.sep in program:
        if not os.path.isfile(program):
            return f"{program!r} does not exist (relative to {os.getcwd()})"
        if not os.access(program, os.X_OK):
            return f"{program!r} is not executable"
        return None
    if shutil.which(program) is None:
        return f"{program!r} is not found on PATH"
    return None


def check_calls(pipeline: Pipeline, source: PipelineSource) -> list[Problem]:
    """Import every stage function and check it accepts its role's arguments."""
    problems = []
    for stage in pipeline.stages:
        if stage.command is not None:
            why = check_command(stage.command[0])
            if why:
                problems.append(source.problem(("stages", stage.name, "command"), why))
        if stage.call is None:
            continue
        key = ("stages", stage.name, "call")
        try:
            fn = resolve(stage.call, pipeline.path.parent)
        except ResolveError as exc:
            problems.append(source.problem(key, str(exc)))
            continue
        why = check_call(fn, stage)
        if why:
            problems.append(source.problem(("stages", stage.name, "params"), why))
    return problems
