"""`orchestrator check`: the plan for a good file, exit 2 and lines for a bad one."""

from __future__ import annotations

import json

from tests.conftest import ROOT, Workspace


def test_check_prints_the_plan_and_start_order(ws: Workspace) -> None:
    result = ws.cli("check", str(ROOT / "pipeline.toml"))

    assert result.returncode == 0, result.stderr
    assert "start order: collector -> consumer -> producer" in result.stdout
    assert "consumer     worker x2" in result.stdout
    assert "push bind tcp://127.0.0.1:5557" in result.stdout


def test_misspelled_key_exits_2_naming_key_and_line(ws: Workspace) -> None:
    text = (ROOT / "pipeline.toml").read_text().replace("replicas = 2", "replica = 2")
    path = ws.write(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "replica = 2" in t)

    result = ws.cli("check", str(path))

    assert result.returncode == 2
    assert f"{path}:{line}: stages.consumer.replica: unknown key" in result.stderr
    assert "did you mean 'replicas'?" in result.stderr


def test_run_with_a_bad_file_starts_nothing_and_exits_2(ws: Workspace) -> None:
    path = ws.write('[stages.producer]\ncall = "nowhere:fn"\npush = { bind = 3 }\n')

    result = ws.cli("run", str(path))

    assert result.returncode == 2
    assert "stages.producer.push.bind" in result.stderr
    assert not (ws.path / "home").exists() or not list(
        (ws.path / "home").glob("*/logs/*.log")
    )


def test_bad_override_exits_2(ws: Workspace) -> None:
    result = ws.cli(
        "check", str(ROOT / "pipeline.toml"), "--set", "stages.consumer.replicas=0"
    )
    assert result.returncode == 2
    assert (
        "--set stages.consumer.replicas=0: stages.consumer.replicas: must be at "
        "least 1" in result.stderr
    )


def test_too_many_replicas_exit_2(ws: Workspace) -> None:
    result = ws.cli(
        "check", str(ROOT / "pipeline.toml"), "--set", "stages.consumer.replicas=100000"
    )
    assert result.returncode == 2
    assert "stages.consumer.replicas: must be at most 128, got 100000" in (
        result.stderr
    )


def test_brackets_in_an_endpoint_are_printed_as_written(ws: Workspace) -> None:
    endpoint = "ipc:///tmp/x[/y].sock"
    result = ws.cli(
        "check",
        str(ROOT / "pipeline.toml"),
        "--set",
        f"stages.consumer.push.connect={endpoint}",
    )
    assert result.returncode == 2, result.stderr
    assert f"stages.consumer.push.connect: nobody binds {endpoint}" in result.stderr


def test_brackets_in_a_value_are_not_read_as_markup(ws: Workspace) -> None:
    result = ws.cli(
        "check",
        str(ROOT / "pipeline.toml"),
        "--set",
        'stages.consumer.replicas="[bold]x[/bold]"',
    )
    assert result.returncode == 2
    assert 'expected an integer, got "[bold]x[/bold]"' in result.stderr


def test_missing_metrics_extra_names_it_in_full(ws: Workspace) -> None:
    # Shadows the real package: the CLI runs in ws.path, first on sys.path.
    ws.write("raise ImportError('hidden by the test')\n", "prometheus_client.py")
    result = ws.cli("run", str(ws.classic(messages=10)), "--metrics", "127.0.0.1:9464")
    assert result.returncode == 2
    assert "pip install 'zmq-orchestrator[metrics]'" in result.stderr


def test_tcp_port_out_of_range_exits_2(ws: Workspace) -> None:
    result = ws.cli(
        "check",
        str(ROOT / "pipeline.toml"),
        "--set",
        "stages.producer.push.bind=tcp://127.0.0.1:99999",
    )
    assert result.returncode == 2
    assert "stages.producer.push.bind: port must be from 1 to 65535, got 99999" in (
        result.stderr
    )


def test_check_json_prints_the_plan_as_one_object(ws: Workspace) -> None:
    result = ws.cli("check", str(ROOT / "pipeline.toml"), "--json")

    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["start_order"] == [["collector"], ["consumer"], ["producer"]]
    stages = {stage["name"]: stage for stage in plan["stages"]}
    assert stages["consumer"]["replicas"] == 2
    assert stages["consumer"]["role"] == "worker"
    assert stages["consumer"]["pull"] == {"connect": ["tcp://127.0.0.1:5557"]}
    assert stages["producer"]["push"] == {"bind": "tcp://127.0.0.1:5557"}
    assert stages["producer"]["pull"] is None


def test_check_json_lists_the_problems_and_exits_2(ws: Workspace) -> None:
    text = (ROOT / "pipeline.toml").read_text().replace("replicas = 2", "replica = 2")
    path = ws.write(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "replica = 2" in t)

    result = ws.cli("check", str(path), "--json")

    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "problems": [
            {
                "file": str(path),
                "line": line,
                "key": "stages.consumer.replica",
                "message": "unknown key (did you mean 'replicas'?)",
            }
        ],
    }
