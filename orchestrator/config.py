"""The pipeline's configuration: typed, frozen, validated once from the TOML.

:func:`load` reads the file, applies overrides, checks every key and value,
then the wiring (:mod:`orchestrator.topology`), and raises one
:class:`~orchestrator.errors.ConfigError` listing every problem it found.
Nothing is started before this has passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tomlfile
from .errors import ConfigError, Problem

KeyPath = tuple[str, ...]

DELIVERY_MODES = ("exactly-once", "at-most-once")
RESTART_POLICIES = ("on-failure", "always", "never")
CODECS = ("msgpack", "json")
BACKENDS = ("local", "ray")
# Each replica is a whole process, and the supervisor's single loop forks all
# the replicas of a stage (or of a `scale`) in one turn: past this, a typo
# such as replicas = 1000 would fork-bomb the machine instead of failing.
MAX_REPLICAS = 128

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_ENDPOINT = re.compile(
    r"^(?:tcp://(?P<host>[^:/]+|\[[^\]]+\]):(?P<port>\d+|\*)|ipc://.+)$"
)
# TCP ports are 16 bits; ZeroMQ takes a larger number modulo 2**16 silently.
MAX_PORT = 65535


@dataclass(frozen=True)
class Socket:
    """One side of a stage's data connection: it binds one endpoint or connects."""

    bind: str | None = None
    connect: tuple[str, ...] = ()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.bind,) if self.bind else self.connect


@dataclass(frozen=True)
class Placement:
    """Where the ray backend puts a stage's replicas (ignored when local)."""

    node: str | None = None  # the address of one Ray node
    resource: str | None = None  # a custom resource some nodes offer
    spread: bool = False  # one replica per node, round the nodes


@dataclass(frozen=True)
class Stage:
    name: str
    call: str | None
    command: tuple[str, ...] | None
    replicas: int
    pull: Socket | None
    push: Socket | None
    params: Mapping[str, Any]
    env: Mapping[str, str]
    restart: str
    max_restarts: int
    restart_window: float
    backoff: float
    backoff_max: float
    heartbeat_timeout: float
    max_rss: int | None
    max_cpu: float | None
    placement: Placement | None = None  # where the ray backend runs it

    @property
    def role(self) -> str:
        """``source`` only sends, ``sink`` only receives, ``worker`` does both."""
        if self.pull and self.push:
            return "worker"
        return "source" if self.push else "sink"


@dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    stages: tuple[Stage, ...]
    delivery: str = "exactly-once"
    window: int = 50_000
    batch: int = 1000
    flush_ms: float = 2.0
    codec: str = "msgpack"
    backend: str = "local"
    grace_period: float = 5.0
    ready_timeout: float = 10.0
    health_interval: float = 0.5
    heartbeat_interval: float = 0.1
    redelivery_timeout: float = 10.0
    max_attempts: int = 3
    max_quarantined: int = 10
    overrides: tuple[str, ...] = field(default=())
    ray_address: str = "auto"
    curve: bool = False

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"


def parse_size(value: Any) -> int | None:
    """Bytes from ``512MiB``, ``1.5 GB`` or a plain integer; None if unreadable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    found = _SIZE.match(value)
    if not found:
        return None
    unit = (found[2] or "B").lower()
    return int(float(found[1]) * _SIZE_UNITS[unit])


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


class _Checker:
    """Collects problems while reading one table; never stops at the first."""

    def __init__(self, source: tomlfile.PipelineSource) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def fail(self, path: KeyPath, message: str) -> None:
        self.problems.append(self.source.problem(path, message))

    def table(self, value: Any, path: KeyPath, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_describe(value)}")
            return {}
        for key in value:
            if key not in allowed:
                hint = _closest(key, allowed)
                extra = f" (did you mean {hint!r}?)" if hint else ""
                self.fail(path + (key,), f"unknown key{extra}")
        return value

    def integer(
        self,
        table: dict[str, Any],
        path: KeyPath,
        default: int,
        minimum: int = 0,
        maximum: int | None = None,
    ) -> int:
        value = table.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_describe(value)}")
            return default
        if value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.fail(path, f"must be at most {maximum}, got {value}")
            return default
        return value

    def number(
        self,
        table: dict[str, Any],
        path: KeyPath,
        default: float,
        positive: bool = False,
    ) -> float:
        value = table.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"expected a number, got {_describe(value)}")
            return default
        if value < 0 or (positive and value == 0):
            self.fail(path, f"must be {'above' if positive else 'at least'} 0")
            return default
        return float(value)

    def choice(
        self,
        table: dict[str, Any],
        path: KeyPath,
        default: str,
        choices: tuple[str, ...],
    ) -> str:
        value = table.get(path[-1], default)
        if value not in choices:
            options = ", ".join(f'"{c}"' for c in choices)
            self.fail(path, f"expected one of {options}, got {_describe(value)}")
            return default
        return str(value)

    def string(self, table: dict[str, Any], path: KeyPath) -> str | None:
        value = table.get(path[-1])
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {_describe(value)}")
            return None
        return value


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


_PIPELINE_KEYS = {
    "name",
    "delivery",
    "window",
    "batch",
    "flush_ms",
    "codec",
    "backend",
    "grace_period",
    "ready_timeout",
    "health_interval",
    "heartbeat_interval",
    "redelivery_timeout",
    "max_attempts",
    "max_quarantined",
    "ray_address",
    "curve",
}
_STAGE_KEYS = {
    "call",
    "command",
    "replicas",
    "pull",
    "push",
    "params",
    "env",
    "restart",
    "max_restarts",
    "restart_window",
    "backoff",
    "backoff_max",
    "heartbeat_timeout",
    "max_rss",
    "max_cpu",
    "placement",
}


def load(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resolve: Callable[[Pipeline, tomlfile.PipelineSource], list[Problem]] | None = None,
) -> Pipeline:
    """Read, override and validate a pipeline file; raise ConfigError on any problem.

    ``resolve`` checks what needs imports (stage callables and their
    parameters); the CLI passes :func:`orchestrator.stagefn.check_calls`.
    """
    from . import topology

    source = tomlfile.read(Path(path), overrides)
    check = _Checker(source)
    top = check.table(source.data, (), {"pipeline", "stages"})
    pipeline = _pipeline(check, top, source, tuple(overrides))
    # Report every problem at once: the wiring can be judged unless a socket
    # or a whole stage is itself broken, and imports can always be tried.
    if not any(_breaks_wiring(p) for p in check.problems):
        check.problems.extend(topology.validate(pipeline, source))
    if not check.problems and pipeline.backend == "ray":
        check.problems.extend(_ray_problems(pipeline, source))
    elif pipeline.curve and pipeline.backend != "ray":
        check.fail(
            ("pipeline", "curve"),
            'CURVE secures traffic between hosts: it needs backend = "ray"',
        )
    if resolve is not None:
        check.problems.extend(resolve(pipeline, source))
    if check.problems:
        raise ConfigError(sorted(check.problems, key=_reading_order))
    return pipeline


def _breaks_wiring(problem: Problem) -> bool:
    """Whether the stages' wiring cannot be judged after this problem.

    A missing or broken stage, or a broken socket, can make the wiring look
    wrong where it is not; a bad ``[pipeline]`` setting cannot.
    """
    parts = problem.key.split(".") if problem.key else []
    if parts and parts[0] == "pipeline":
        return False
    return len(parts) <= 2 or parts[2] in ("pull", "push")


def _reading_order(problem: Problem) -> tuple[bool, int]:
    return problem.source.startswith("--set"), problem.line or 0


def _pipeline(
    check: _Checker,
    top: dict[str, Any],
    source: tomlfile.PipelineSource,
    overrides: tuple[str, ...],
) -> Pipeline:
    table = check.table(top.get("pipeline", {}), ("pipeline",), _PIPELINE_KEYS)
    at: Callable[[str], KeyPath] = lambda key: ("pipeline", key)  # noqa: E731
    name = check.string(table, at("name")) or source.path.stem
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        check.fail(at("name"), "use letters, digits, '-', '_' and '.' only")

    stages_table = top.get("stages")
    stages: list[Stage] = []
    if stages_table is None:
        check.fail(("stages",), "missing: a pipeline needs at least one stage")
    elif not isinstance(stages_table, dict):
        check.fail(("stages",), f"expected a table, got {_describe(stages_table)}")
    else:
        for stage_name, value in stages_table.items():
            stage = _stage(check, stage_name, value)
            if stage is not None:
                stages.append(stage)
        if not stages_table:
            check.fail(("stages",), "a pipeline needs at least one stage")

    return Pipeline(
        name=name,
        path=source.path.resolve(),
        stages=tuple(stages),
        delivery=check.choice(table, at("delivery"), "exactly-once", DELIVERY_MODES),
        window=check.integer(table, at("window"), 50_000, minimum=1),
        batch=check.integer(table, at("batch"), 1000, minimum=1),
        flush_ms=check.number(table, at("flush_ms"), 2.0),
        codec=check.choice(table, at("codec"), "msgpack", CODECS),
        backend=check.choice(table, at("backend"), "local", BACKENDS),
        grace_period=check.number(table, at("grace_period"), 5.0),
        ready_timeout=check.number(table, at("ready_timeout"), 10.0, positive=True),
        health_interval=check.number(table, at("health_interval"), 0.5, positive=True),
        heartbeat_interval=check.number(
            table, at("heartbeat_interval"), 0.1, positive=True
        ),
        redelivery_timeout=check.number(
            table, at("redelivery_timeout"), 10.0, positive=True
        ),
        max_attempts=check.integer(table, at("max_attempts"), 3, minimum=1),
        max_quarantined=check.integer(table, at("max_quarantined"), 10, minimum=0),
        overrides=overrides,
        ray_address=check.string(table, at("ray_address")) or "auto",
        curve=_flag(check, table, at("curve")),
    )


def _stage(check: _Checker, name: str, value: Any) -> Stage | None:
    base: KeyPath = ("stages", name)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        check.fail(base, "stage names use letters, digits, '-' and '_' only")
    table = check.table(value, base, _STAGE_KEYS)
    if not isinstance(value, dict):
        return None
    at: Callable[[str], KeyPath] = lambda key: base + (key,)  # noqa: E731

    call = check.string(table, at("call"))
    if call is not None and not re.fullmatch(r"[\w.]+:[\w.]+", call):
        check.fail(at("call"), f'expected "module:function", got "{call}"')
    command = _command(check, table.get("command"), at("command"))
    if ("call" in table) == ("command" in table):
        check.fail(base, 'needs exactly one of "call" or "command"')

    pull = _socket(check, table.get("pull"), at("pull"))
    push = _socket(check, table.get("push"), at("push"))
    if "pull" not in table and "push" not in table:
        check.fail(base, 'needs a "pull" or a "push" socket (or both)')
    elif command is not None and ("pull" not in table or "push" not in table):
        # Sources number the inputs, sinks count and acknowledge them and
        # write the summary: only the runtime does that (docs/stages.md).
        check.fail(
            at("command"),
            'a command stage must be a worker, with both "pull" and "push"; '
            'write sources and sinks as functions ("call"), see docs/stages.md',
        )

    params = table.get("params", {})
    if not isinstance(params, dict):
        check.fail(at("params"), f"expected a table, got {_describe(params)}")
        params = {}
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        check.fail(at("env"), "expected a table of strings")
        env = {}

    max_rss = None
    if "max_rss" in table:
        max_rss = parse_size(table["max_rss"])
        if max_rss is None:
            check.fail(
                at("max_rss"),
                f'expected a size such as "512MiB", got {_describe(table["max_rss"])}',
            )
    max_cpu = None
    if "max_cpu" in table:
        max_cpu = check.number(table, at("max_cpu"), 0.0, positive=True) or None

    return Stage(
        name=name,
        call=call,
        command=command,
        replicas=check.integer(
            table, at("replicas"), 1, minimum=1, maximum=MAX_REPLICAS
        ),
        pull=pull,
        push=push,
        params=params,
        env=env,
        restart=check.choice(table, at("restart"), "on-failure", RESTART_POLICIES),
        max_restarts=check.integer(table, at("max_restarts"), 10),
        restart_window=check.number(table, at("restart_window"), 60.0, positive=True),
        backoff=check.number(table, at("backoff"), 0.05),
        backoff_max=check.number(table, at("backoff_max"), 5.0),
        heartbeat_timeout=check.number(
            table, at("heartbeat_timeout"), 5.0, positive=True
        ),
        max_rss=max_rss,
        max_cpu=max_cpu,
        placement=_placement(check, table.get("placement"), at("placement")),
    )


def _command(check: _Checker, value: Any, path: KeyPath) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(part, str) for part in value)
    ):
        check.fail(
            path, f"expected a non-empty array of strings, got {_describe(value)}"
        )
        return None
    return tuple(value)


def _socket(check: _Checker, value: Any, path: KeyPath) -> Socket | None:
    if value is None:
        return None
    table = check.table(value, path, {"bind", "connect"})
    if not isinstance(value, dict):
        return None
    bind = table.get("bind")
    connect = table.get("connect", [])
    if isinstance(connect, str):
        connect = [connect]
    if (bind is None) == (not connect):
        check.fail(path, 'needs exactly one of "bind" or "connect"')
        return None
    if bind is not None:
        problem = _endpoint_problem(bind)
        if problem is not None:
            check.fail(path + ("bind",), problem)
            return None
        return Socket(bind=bind)
    if not isinstance(connect, list) or not all(isinstance(e, str) for e in connect):
        check.fail(path + ("connect",), "expected an endpoint or an array of them")
        return None
    found = [_connect_problem(endpoint) for endpoint in connect]
    for problem in filter(None, found):
        check.fail(path + ("connect",), problem)
    return None if any(found) else Socket(connect=tuple(connect))


def _endpoint_problem(value: Any) -> str | None:
    """Why ``value`` is not an endpoint a stage can use, or None if it is."""
    found = _ENDPOINT.match(value) if isinstance(value, str) else None
    if found is None:
        return _endpoint_hint(value)
    port = found["port"]
    if port is None or port == "*":
        return None
    if int(port) == 0:
        return (
            "port 0 lets the OS pick a free port, which the stages on the other "
            f"side could not know; use a port from 1 to {MAX_PORT}"
        )
    if int(port) > MAX_PORT:
        return f"port must be from 1 to {MAX_PORT}, got {int(port)}"
    return None


def _connect_problem(endpoint: str) -> str | None:
    if endpoint.endswith(":*"):  # "any port" means nothing to a connect
        return _endpoint_hint(endpoint)
    return _endpoint_problem(endpoint)


def _endpoint_hint(value: Any) -> str:
    return (
        f'expected an endpoint such as "tcp://127.0.0.1:5557" or '
        f'"ipc:///tmp/name", got {_describe(value)}'
    )


def _flag(check: _Checker, table: dict[str, Any], path: KeyPath) -> bool:
    value = table.get(path[-1], False)
    if not isinstance(value, bool):
        check.fail(path, f"expected true or false, got {_describe(value)}")
        return False
    return value


def _placement(check: _Checker, value: Any, path: KeyPath) -> Placement | None:
    if value is None:
        return None
    table = check.table(value, path, {"node", "resource", "spread"})
    if not isinstance(value, dict):
        return None
    placement = Placement(
        node=check.string(table, path + ("node",)),
        resource=check.string(table, path + ("resource",)),
        spread=_flag(check, table, path + ("spread",)),
    )
    if placement.node and (placement.resource or placement.spread):
        check.fail(
            path, '"node" pins a stage: it goes with neither "resource" nor "spread"'
        )
    return placement


def _ray_problems(pipeline: Pipeline, source: tomlfile.PipelineSource) -> list[Problem]:
    """What the ray backend cannot run: data must cross hosts over TCP."""
    problems = []
    for stage in pipeline.stages:
        base: KeyPath = ("stages", stage.name)
        if stage.command is not None:
            # exec would replace the Ray worker process the replica runs in.
            problems.append(
                source.problem(
                    base + ("command",), 'the ray backend runs "call" stages only'
                )
            )
        for side in ("pull", "push"):
            socket = getattr(stage, side)
            for endpoint in socket.endpoints if socket else ():
                found = _ENDPOINT.match(endpoint)
                if not found or not found["port"] or found["port"] == "*":
                    key = "bind" if socket.bind else "connect"
                    problems.append(
                        source.problem(
                            base + (side, key),
                            f"the ray backend needs tcp:// endpoints with a port, "
                            f"got {_describe(endpoint)}",
                        )
                    )
    return problems
