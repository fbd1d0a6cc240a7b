"""The wiring between stages: who binds what, who feeds whom, what starts first.

Data flows from a PUSH socket to the PULL sockets on the same endpoint.  On
each endpoint exactly one side binds and the other side connects.  From the
wiring we derive each stage's role, the number of peers each PUSH socket must
see before its first send (the cure for the slow joiner), and the start
order: a stage starts only once every stage downstream of it is ready.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .config import Pipeline, Stage
from .errors import Problem
from .tomlfile import PipelineSource


@dataclass(frozen=True)
class Attachment:
    stage: str
    side: str  # "pull" or "push"
    binds: bool


def _attachments(pipeline: Pipeline) -> dict[str, list[Attachment]]:
    found: dict[str, list[Attachment]] = defaultdict(list)
    for stage in pipeline.stages:
        for side in ("pull", "push"):
            socket = getattr(stage, side)
            if socket is None:
                continue
            for endpoint in socket.endpoints:
                found[endpoint].append(
                    Attachment(stage.name, side, socket.bind is not None)
                )
    return found


def validate(pipeline: Pipeline, source: PipelineSource) -> list[Problem]:
    """Every wiring problem of ``pipeline``, each pointing at the key to fix."""
    problems: list[Problem] = []
    by_name = {stage.name: stage for stage in pipeline.stages}

    def fail(stage: str, side: str, key: str | None, message: str) -> None:
        path = ("stages", stage, side) + ((key,) if key else ())
        problems.append(source.problem(path, message))

    for endpoint, ends in _attachments(pipeline).items():
        binders = [a for a in ends if a.binds]
        connectors = [a for a in ends if not a.binds]
        if len(binders) > 1:
            names = " and ".join(f"{a.stage}.{a.side}" for a in binders)
            for a in binders:
                fail(a.stage, a.side, "bind", f"{endpoint} is bound twice ({names})")
        if not binders:
            for a in connectors:
                fail(a.stage, a.side, "connect", f"nobody binds {endpoint}")
            continue
        binder = binders[0]
        if not connectors:
            other = "pushes to" if binder.side == "pull" else "pulls from"
            fail(binder.stage, binder.side, "bind", f"nothing {other} {endpoint}")
        for a in connectors:
            if a.side == binder.side:
                fail(
                    a.stage,
                    a.side,
                    "connect",
                    f"{endpoint} joins two {a.side.upper()} sockets "
                    f"({binder.stage} and {a.stage}); one side must be the other kind",
                )
        if by_name[binder.stage].replicas > 1:
            fail(
                binder.stage,
                binder.side,
                "bind",
                f"a stage with {by_name[binder.stage].replicas} replicas cannot bind "
                f"one endpoint; let it connect and bind on the other side",
            )

    cycle = _find_cycle(pipeline)
    if cycle:
        loop = " -> ".join(cycle)
        problems.append(
            source.problem(("stages", cycle[0]), f"data flows in a cycle: {loop}")
        )
    if pipeline.exactly_once:
        sinks = [s for s in pipeline.stages if s.role == "sink"]
        replicas = sum(s.replicas for s in sinks)
        if replicas != 1:
            problems.append(
                source.problem(
                    ("pipeline", "delivery"),
                    f"exactly-once delivery needs one sink replica, found {replicas}; "
                    'set pipeline.delivery = "at-most-once" or use one sink',
                )
            )
    return problems


def downstream(pipeline: Pipeline) -> dict[str, set[str]]:
    """For each stage, the stages its PUSH socket feeds."""
    feeds: dict[str, set[str]] = {stage.name: set() for stage in pipeline.stages}
    for ends in _attachments(pipeline).values():
        pushers = {a.stage for a in ends if a.side == "push"}
        pullers = {a.stage for a in ends if a.side == "pull"}
        for stage in pushers:
            feeds[stage] |= pullers
    return feeds


def _find_cycle(pipeline: Pipeline) -> list[str] | None:
    feeds = downstream(pipeline)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(feeds[name]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[name] = 2
        return None

    for stage in pipeline.stages:
        if stage.name not in state and (found := visit(stage.name)):
            return found
    return None


def start_order(pipeline: Pipeline) -> list[list[Stage]]:
    """Groups of stages to start in turn: sinks first, sources last."""
    feeds = downstream(pipeline)
    level: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in level:
            level[name] = 1 + max((depth(n) for n in feeds[name]), default=-1)
        return level[name]

    groups: dict[int, list[Stage]] = defaultdict(list)
    for stage in pipeline.stages:
        groups[depth(stage.name)].append(stage)
    return [groups[key] for key in sorted(groups)]


def expected_peers(pipeline: Pipeline, stage: Stage) -> int:
    """How many PULL peers ``stage``'s PUSH socket must see before it sends.

    A bound PUSH waits for every replica of every stage connecting to it; a
    connecting PUSH waits for one handshake per endpoint it connects to.
    """
    if stage.push is None:
        return 0
    if stage.push.bind is None:
        return len(stage.push.connect)
    return sum(
        other.replicas
        for other in pipeline.stages
        if other.pull is not None and stage.push.bind in other.pull.connect
    )


def describe(pipeline: Pipeline) -> list[str]:
    """The plan as lines of text, for ``orchestrator check``."""
    lines = [
        f"pipeline {pipeline.name} ({pipeline.path})",
        f"delivery: {pipeline.delivery}, batch {pipeline.batch}, "
        f"window {pipeline.window}, codec {pipeline.codec}",
        "stages:",
    ]
    for stage in pipeline.stages:
        what = stage.call or " ".join(stage.command or ())
        lines.append(f"  {stage.name:<12} {stage.role:<6} x{stage.replicas}  {what}")
        for side in ("pull", "push"):
            socket = getattr(stage, side)
            if socket is not None:
                verb = "bind" if socket.bind else "connect"
                lines.append(f"      {side} {verb} {', '.join(socket.endpoints)}")
    order = " -> ".join(
        ", ".join(stage.name for stage in group) for group in start_order(pipeline)
    )
    lines.append(f"start order: {order}")
    return lines


def plan(pipeline: Pipeline) -> dict[str, Any]:
    """The plan as one JSON-ready map, for ``orchestrator check --json``."""
    return {
        "ok": True,
        "pipeline": pipeline.name,
        "path": str(pipeline.path),
        "delivery": pipeline.delivery,
        "batch": pipeline.batch,
        "window": pipeline.window,
        "codec": pipeline.codec,
        "stages": [_stage_plan(stage) for stage in pipeline.stages],
        "start_order": [
            [stage.name for stage in group] for group in start_order(pipeline)
        ],
    }


def _stage_plan(stage: Stage) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": stage.name,
        "role": stage.role,
        "replicas": stage.replicas,
        "call": stage.call,
        "command": list(stage.command) if stage.command else None,
    }
    for side in ("pull", "push"):
        socket = getattr(stage, side)
        if socket is None:
            entry[side] = None
        elif socket.bind:
            entry[side] = {"bind": socket.bind}
        else:
            entry[side] = {"connect": list(socket.connect)}
    return entry
