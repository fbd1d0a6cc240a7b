"""Wiring of pipelines of any shape: roles, start order, peers, bad wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config, topology
from orchestrator.errors import ConfigError


def _stage(name: str, pull: str = "", push: str = "", replicas: int = 1) -> str:
    lines = [f"[stages.{name}]", 'call = "stages.classic:keep_even"']
    if replicas != 1:
        lines.append(f"replicas = {replicas}")
    for side, spec in (("pull", pull), ("push", push)):
        if spec:
            verb, _, names = spec.partition(" ")
            endpoints = [f'"ipc:///tmp/topo-{name}"' for name in names.split(",")]
            value = endpoints[0] if verb == "bind" else f"[{', '.join(endpoints)}]"
            lines.append(f"{side} = {{ {verb} = {value} }}")
    return "\n".join(lines) + "\n"


def _load(tmp_path: Path, *stages: str, delivery: str = "exactly-once"):
    path = tmp_path / "pipeline.toml"
    path.write_text(f'[pipeline]\ndelivery = "{delivery}"\n' + "\n".join(stages))
    return config.load(path)


def _problems(tmp_path: Path, *stages: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, *stages)
    return [str(p) for p in info.value.problems]


CHAIN = (
    _stage("read", push="bind lines"),
    _stage("parse", pull="connect lines", push="connect parsed", replicas=2),
    _stage("filter", pull="bind parsed", push="bind kept"),
    _stage("enrich", pull="connect kept", push="connect results", replicas=3),
    _stage("sink", pull="bind results"),
)


def test_a_long_chain_starts_from_the_sink_up(tmp_path: Path) -> None:
    pipeline = _load(tmp_path, *CHAIN)

    order = [[s.name for s in group] for group in topology.start_order(pipeline)]
    assert order == [["sink"], ["enrich"], ["filter"], ["parse"], ["read"]]
    roles = {s.name: s.role for s in pipeline.stages}
    assert roles == {
        "read": "source",
        "parse": "worker",
        "filter": "worker",
        "enrich": "worker",
        "sink": "sink",
    }


def test_a_bound_push_waits_for_every_replica_that_connects(tmp_path: Path) -> None:
    pipeline = _load(tmp_path, *CHAIN)

    peers = {s.name: topology.expected_peers(pipeline, s) for s in pipeline.stages}
    assert peers == {"read": 2, "parse": 1, "filter": 3, "enrich": 1, "sink": 0}


def test_several_sources_feeding_one_worker_start_after_it(tmp_path: Path) -> None:
    pipeline = _load(
        tmp_path,
        _stage("a", push="bind a"),
        _stage("b", push="bind b"),
        _stage("c", push="connect in"),
        _stage("work", pull="bind in", push="connect out"),
        _stage("more", pull="connect a,b", push="connect out", replicas=2),
        _stage("sink", pull="bind out"),
    )

    order = [{s.name for s in group} for group in topology.start_order(pipeline)]
    assert order == [{"sink"}, {"work", "more"}, {"a", "b", "c"}]
    assert topology.expected_peers(pipeline, pipeline.stage("a")) == 2
    assert topology.expected_peers(pipeline, pipeline.stage("b")) == 2
    assert topology.expected_peers(pipeline, pipeline.stage("c")) == 1


def test_a_cycle_in_the_middle_of_a_chain_is_named(tmp_path: Path) -> None:
    found = _problems(
        tmp_path,
        _stage("read", push="bind lines"),
        _stage("a", pull="connect lines", push="connect x"),
        _stage("b", pull="bind x", push="bind y"),
        _stage("c", pull="connect y", push="connect back"),
        _stage("d", pull="bind back", push="connect x"),
    )
    assert any("data flows in a cycle: b -> c -> d -> b" in p for p in found), found


def test_a_stage_feeding_itself_is_a_cycle(tmp_path: Path) -> None:
    found = _problems(
        tmp_path,
        _stage("read", push="connect loop"),
        _stage("self", pull="bind loop", push="connect loop"),
    )
    assert any("cycle" in p and "self -> self" in p for p in found), found


@pytest.mark.parametrize(
    "broken, message",
    [
        (
            _stage("enrich", pull="connect kept", push="connect nowhere"),
            "stages.enrich.push.connect: nobody binds ipc:///tmp/topo-nowhere",
        ),
        (
            _stage("enrich", pull="connect nowhere", push="connect results"),
            "stages.filter.push.bind: nothing pulls from ipc:///tmp/topo-kept",
        ),
    ],
)
def test_a_dangling_endpoint_in_a_chain_is_named(
    tmp_path: Path, broken: str, message: str
) -> None:
    stages = [broken if s.startswith("[stages.enrich]") else s for s in CHAIN]
    found = _problems(tmp_path, *stages)
    assert any(message in p for p in found), found


def test_a_command_stage_must_be_a_worker(tmp_path: Path) -> None:
    source = '[stages.read]\ncommand = ["cat"]\npush = { bind = "ipc:///tmp/t-l" }\n'
    found = _problems(tmp_path, source, _stage("sink", pull="bind l"))
    assert any(
        "stages.read.command: a command stage must be a worker" in p for p in found
    ), found
