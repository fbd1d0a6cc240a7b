"""Validation of pipeline files: every problem found, each with its key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config, stagefn
from orchestrator.errors import ConfigError
from orchestrator.tomlfile import KeyLines, parse_value

GOOD = """\
[pipeline]
name = "p"

[stages.producer]
call = "stages.classic:produce"
push = { bind = "ipc:///tmp/x-work" }
params = { messages = 10 }

[stages.consumer]
call = "stages.classic:keep_even"
replicas = 2
pull = { connect = "ipc:///tmp/x-work" }
push = { connect = "ipc:///tmp/x-results" }

[stages.collector]
call = "stages.classic:collect"
pull = { bind = "ipc:///tmp/x-results" }
"""


def load(tmp_path: Path, text: str, *overrides: str) -> config.Pipeline:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return config.load(path, overrides, resolve=stagefn.check_calls)


def problems(tmp_path: Path, text: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, *overrides)
    assert info.value.exit_code == 2
    return [str(p) for p in info.value.problems]


def test_the_good_file_loads(tmp_path: Path) -> None:
    pipeline = load(tmp_path, GOOD)
    assert [s.name for s in pipeline.stages] == ["producer", "consumer", "collector"]
    assert pipeline.stage("consumer").replicas == 2
    assert pipeline.stage("consumer").role == "worker"


def test_misspelled_key_is_named_with_its_line_and_a_suggestion(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("replicas = 2", "replics = 2"))
    assert len(found) == 1
    assert (
        ":11: stages.consumer.replics: unknown key (did you mean 'replicas'?)"
        in (found[0])
    )


def test_wrong_type_says_what_was_expected_and_got(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("replicas = 2", 'replicas = "2"'))
    assert found == [
        f"{tmp_path}/pipeline.toml:11: stages.consumer.replicas: "
        'expected an integer, got "2"'
    ]


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = (
        GOOD.replace("replicas = 2", 'replicas = "2"')
        .replace('name = "p"', 'name = "p"\nbatchh = 3')
        .replace('call = "stages.classic:collect"', "call = 12")
    )
    found = problems(tmp_path, text)
    assert len(found) == 3
    assert any("pipeline.batchh" in p for p in found)
    assert any("stages.consumer.replicas" in p for p in found)
    assert any("stages.collector.call" in p for p in found)


def test_unparsable_toml_points_at_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("replicas = 2", "replicas = = 2"))
    assert found[0].startswith(f"{tmp_path}/pipeline.toml:11: not valid TOML")


def test_duplicate_stage_names_are_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD + '\n[stages.consumer]\ncall = "x:y"\n')
    assert found == [
        f"{tmp_path}/pipeline.toml:19: stages.consumer: declared twice "
        "(first at line 9): duplicate stage name"
    ]


def test_missing_stages_table(tmp_path: Path) -> None:
    found = problems(tmp_path, '[pipeline]\nname = "p"\n')
    assert any("stages: missing" in p for p in found)


def test_endpoint_nobody_binds(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        GOOD.replace('connect = "ipc:///tmp/x-work"', 'connect = "ipc:///tmp/x-other"'),
    )
    assert any(
        "stages.consumer.pull.connect: nobody binds ipc:///tmp/x-other" in p
        for p in found
    )


def test_a_bad_pipeline_setting_does_not_hide_the_wiring_problems(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        GOOD.replace('connect = "ipc:///tmp/x-work"', 'connect = "ipc:///tmp/x-other"'),
        "pipeline.max_attempts=0",
    )
    assert any("pipeline.max_attempts: must be at least 1" in p for p in found)
    assert any("nobody binds ipc:///tmp/x-other" in p for p in found)


def _on_tcp(endpoint: str) -> str:
    """GOOD with the producer's work endpoint on ``endpoint``."""
    return GOOD.replace('"ipc:///tmp/x-work"', f'"{endpoint}"')


def test_tcp_ports_out_of_range_are_refused(tmp_path: Path) -> None:
    endpoint = "tcp://127.0.0.1:99999"
    found = problems(tmp_path, _on_tcp(endpoint))
    assert (
        f"{tmp_path}/pipeline.toml:6: stages.producer.push.bind: "
        "port must be from 1 to 65535, got 99999" in found
    )
    assert (
        f"{tmp_path}/pipeline.toml:12: stages.consumer.pull.connect: "
        "port must be from 1 to 65535, got 99999" in found
    )
    top = "tcp://127.0.0.1:65535"
    pipeline = load(tmp_path, _on_tcp(top))
    assert pipeline.stage("producer").push == config.Socket(bind=top)


def test_tcp_port_0_is_refused_with_the_reason(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD, 'stages.producer.push.bind="tcp://*:0"')
    assert any(
        "stages.producer.push.bind: port 0 lets the OS pick" in p
        and "could not know" in p
        for p in found
    )


def test_endpoint_bound_twice(tmp_path: Path) -> None:
    text = GOOD.replace(
        'push = { connect = "ipc:///tmp/x-results" }',
        'push = { bind = "ipc:///tmp/x-results" }',
    ).replace("replicas = 2", "replicas = 1")
    found = problems(tmp_path, text)
    assert any(
        "is bound twice" in p and "stages.consumer.push.bind" in p for p in found
    )


def test_pull_with_nothing_pushing_to_it(tmp_path: Path) -> None:
    text = (
        GOOD
        + """
[stages.orphan]
call = "stages.classic:collect"
pull = { bind = "ipc:///tmp/x-nobody" }
"""
    )
    found = problems(
        tmp_path,
        text.replace(
            '[pipeline]\nname = "p"',
            '[pipeline]\nname = "p"\ndelivery = "at-most-once"',
        ),
    )
    assert any(
        "stages.orphan.pull.bind: nothing pushes to ipc:///tmp/x-nobody" in p
        for p in found
    )


def test_a_replicated_stage_cannot_bind(tmp_path: Path) -> None:
    text = GOOD.replace(
        'call = "stages.classic:produce"',
        'call = "stages.classic:produce"\nreplicas = 2',
    )
    found = problems(tmp_path, text)
    assert any("2 replicas cannot bind" in p for p in found)


def test_cycles_are_rejected(tmp_path: Path) -> None:
    text = """
[pipeline]
delivery = "at-most-once"
[stages.a]
call = "stages.classic:keep_even"
pull = { bind = "ipc:///tmp/x-a" }
push = { connect = "ipc:///tmp/x-b" }
[stages.b]
call = "stages.classic:keep_even"
pull = { bind = "ipc:///tmp/x-b" }
push = { connect = "ipc:///tmp/x-a" }
"""
    found = problems(tmp_path, text)
    assert any("cycle" in p for p in found)


def test_unknown_module_and_bad_params_are_caught_before_start(tmp_path: Path) -> None:
    text = GOOD.replace("stages.classic:keep_even", "no_such_module:fn").replace(
        "messages = 10", "mesages = 10"
    )
    found = problems(tmp_path, text)
    assert any(
        "stages.consumer.call: cannot import module 'no_such_module'" in p
        for p in found
    )
    assert any("stages.producer.params" in p and "mesages" in p for p in found)


def test_override_changes_a_value(tmp_path: Path) -> None:
    pipeline = load(
        tmp_path,
        GOOD,
        "stages.producer.params.messages=1000000",
        "stages.consumer.replicas=4",
    )
    assert pipeline.stage("producer").params["messages"] == 1_000_000
    assert pipeline.stage("consumer").replicas == 4


def test_override_is_validated_and_named(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD, 'stages.consumer.replicas="2"')
    assert found == [
        '--set stages.consumer.replicas="2": stages.consumer.replicas: '
        'expected an integer, got "2"'
    ]


def test_replicas_above_the_limit_are_refused(tmp_path: Path) -> None:
    limit = config.MAX_REPLICAS
    assert load(tmp_path, GOOD.replace("replicas = 2", f"replicas = {limit}"))
    found = problems(tmp_path, GOOD.replace("replicas = 2", f"replicas = {limit + 1}"))
    assert found == [
        f"{tmp_path}/pipeline.toml:11: stages.consumer.replicas: "
        f"must be at most {limit}, got {limit + 1}"
    ]
    found = problems(tmp_path, GOOD, "stages.consumer.replicas=100000")
    assert found == [
        "--set stages.consumer.replicas=100000: stages.consumer.replicas: "
        f"must be at most {limit}, got 100000"
    ]


def test_override_without_equals_is_a_usage_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD, "stages.consumer.replicas")
    assert "expected KEY=VALUE" in found[0]


def test_key_lines_find_tables_keys_and_inline_keys() -> None:
    lines = KeyLines(GOOD)
    assert lines.line_of(("stages", "consumer")) == 9
    assert lines.line_of(("stages", "consumer", "replicas")) == 11
    assert lines.line_of(("stages", "consumer", "push", "connect")) == 13
    assert lines.line_of(("stages", "consumer", "nothing", "here")) == 9


def test_override_values_parse_as_toml_or_fall_back_to_strings() -> None:
    assert parse_value("3") == 3
    assert parse_value("true") is True
    assert parse_value('"x"') == "x"
    assert parse_value("/tmp/a b.txt") == "/tmp/a b.txt"


def test_sizes_parse() -> None:
    assert config.parse_size("512MiB") == 512 * 2**20
    assert config.parse_size("1.5 GB") == 1_500_000_000
    assert config.parse_size(1024) == 1024
    assert config.parse_size("lots") is None


def test_problems_of_every_kind_are_reported_together_in_line_order(
    tmp_path: Path,
) -> None:
    text = (
        GOOD.replace("replicas = 2", "replics = 2")
        .replace(
            'push = { connect = "ipc:///tmp/x-results" }',
            'push = { connect = "ipc:///tmp/x-elsewhere" }',
        )
        .replace("stages.classic:collect", "stages.classic:no_such_function")
    )
    found = problems(tmp_path, text)
    assert any("stages.consumer.replics: unknown key" in p for p in found)
    assert any("nobody binds ipc:///tmp/x-elsewhere" in p for p in found)
    assert any("nothing pushes to ipc:///tmp/x-results" in p for p in found)
    assert any("no 'no_such_function'" in p for p in found)
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)


def test_a_binary_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value.problems[0]).endswith("cannot read: not UTF-8 text")
