"""The default pipeline and the foundation's promises, with real processes."""

from __future__ import annotations

import json
import re
import signal
import time

import psutil
import pytest

from tests.conftest import (
    ROOT,
    Workspace,
    orchestrator_processes,
    stage_processes,
    wait_for,
)


def _private_endpoints(ws: Workspace) -> list[str]:
    work, results = ws.endpoint("work"), ws.endpoint("results")
    return [
        "--set",
        f"stages.producer.push.bind={work}",
        "--set",
        f"stages.consumer.pull.connect={work}",
        "--set",
        f"stages.consumer.push.connect={results}",
        "--set",
        f"stages.collector.pull.bind={results}",
    ]


def test_default_pipeline_completes_with_balanced_inputs(ws: Workspace) -> None:
    code, report = ws.run_json(str(ROOT / "pipeline.toml"), *_private_endpoints(ws))

    assert code == 0, report
    assert report["status"] == "completed"
    assert report["produced"] == 20_000
    assert report["collected"] == 10_000
    assert report["lost"] == 0
    consumers = [w for w in report["workers"] if w["stage"] == "consumer"]
    assert len(consumers) == 2
    for consumer in consumers:
        assert abs(consumer["received"] - 10_000) <= 1
    assert sum(report["per_consumer"].values()) == 10_000
    assert report["summary"]["sum"] == sum(range(0, 20_000, 2))


def test_report_json_has_the_documented_fields(ws: Workspace) -> None:
    code, report = ws.run_json(str(ws.classic(messages=2000)))

    assert code == 0
    for key in (
        "status",
        "produced",
        "collected",
        "per_consumer",
        "workers",
        "duration_s",
        "lost",
    ):
        assert key in report
    for worker in report["workers"]:
        for key in (
            "stage",
            "replica",
            "pid",
            "received",
            "emitted",
            "restarts",
            "exit",
        ):
            assert key in worker
    assert {w["stage"] for w in report["workers"]} == {
        "producer",
        "consumer",
        "collector",
    }


def test_every_field_of_a_report_is_one_expect_knows(ws: Workspace) -> None:
    from orchestrator.report import FIELDS

    code, report = ws.run_json(str(ws.classic(messages=100)), "--expect", "lost=0")

    assert code == 0, report
    assert set(report) - {"expectations"} <= set(FIELDS)


def test_stages_start_collector_first_then_consumers_then_producer(
    ws: Workspace,
) -> None:
    result = ws.cli("run", str(ws.classic(messages=100)))

    assert result.returncode == 0, result.stderr
    ready = re.findall(r"(\w+)\.\d+ pid \d+ ready", result.stderr)
    assert ready[0] == "collector"
    assert ready[1:3] == ["consumer", "consumer"]
    assert ready[3] == "producer"


def test_table_shows_inputs_and_results_per_consumer(ws: Workspace) -> None:
    result = ws.cli("run", str(ws.classic(messages=2000)))

    assert result.returncode == 0, result.stderr
    assert "consumer.0" in result.stdout and "consumer.1" in result.stdout
    assert "completed" in result.stdout
    assert "collected 1000" in result.stdout


def test_python_dash_m_and_version(ws: Workspace) -> None:
    result = ws.cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("orchestrator ")


def test_help_shows_examples_and_exit_codes(ws: Workspace) -> None:
    result = ws.cli("--help")
    assert result.returncode == 0
    assert "orchestrator run" in result.stdout
    assert "130" in result.stdout


def _start_long_run(ws: Workspace) -> psutil.Process:
    path = ws.classic(messages=10_000_000, worker_params="delay = 0.001")
    proc = ws.popen("run", str(path))
    supervisor = psutil.Process(proc.pid)
    wait_for(lambda: len(stage_processes(proc.pid)) == 4, message="4 stages")
    return supervisor


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_everything_with_its_exit_code(
    ws: Workspace, signum: int, code: int
) -> None:
    path = ws.classic(messages=10_000_000, worker_params="delay = 0.001")
    proc = ws.popen("run", str(path))
    wait_for(lambda: len(stage_processes(proc.pid)) == 4, message="4 stages")
    children = stage_processes(proc.pid)
    time.sleep(0.3)  # let work flow, so the stop interrupts a busy pipeline

    proc.send_signal(signum)
    proc.communicate(timeout=20)

    assert proc.returncode == code
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_a_stop_during_the_start_is_not_a_crash_of_the_waiting_stages(
    ws: Workspace,
) -> None:
    # The consumers wait for a collector that keeps dying; stopping the run
    # then finds them waiting for their peers, which is no crash.
    path = ws.classic(messages=1000, pipeline_extra="ready_timeout = 30")
    path.write_text(
        path.read_text().replace(
            '"teststages:count"',
            '"teststages:count_without_its_module"\nmax_restarts = 1000',
        )
    )
    proc = ws.popen("run", "--json", str(path))

    def consumers_started() -> bool:
        for child in stage_processes(proc.pid):
            try:
                if " consumer." in " ".join(child.cmdline()):
                    return True
            except psutil.Error:  # a collector that just died
                continue
        return False

    wait_for(consumers_started, message="the consumers to start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 143
    report = json.loads(out)
    consumers = [w for w in report["workers"] if w["stage"] == "consumer"]
    assert [w["exit"] for w in consumers] == ["exit 0", "exit 0"], err
    assert "Stopping" not in err


def test_killed_supervisor_leaves_no_stage_behind(ws: Workspace) -> None:
    path = ws.classic(messages=10_000_000, worker_params="delay = 0.001")
    proc = ws.popen("run", str(path))
    wait_for(lambda: len(stage_processes(proc.pid)) == 4, message="4 stages")
    children = stage_processes(proc.pid)

    proc.kill()
    proc.communicate(timeout=10)

    def all_gone() -> bool:
        return not any(
            c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
        )

    wait_for(all_gone, timeout=2.0, message="stage processes to exit")


def test_stage_processes_carry_a_title(ws: Workspace) -> None:
    path = ws.classic(messages=10_000_000, worker_params="delay = 0.001", name="titled")
    proc = ws.popen("run", str(path))
    try:
        wait_for(lambda: len(stage_processes(proc.pid)) == 4, message="4 stages")

        def titles() -> list[str]:
            found = sorted(
                " ".join(p.cmdline()).strip() for p in stage_processes(proc.pid)
            )
            expected = {"consumer.0", "consumer.1", "collector.0", "producer.0"}
            named = {t.rsplit(" ", 1)[-1] for t in found if "titled" in t}
            return found if named == expected else []

        found = wait_for(titles, message="every stage's title")
        assert "orchestrator: titled consumer.1" in found
        assert "orchestrator: titled collector.0" in found
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_busy_port_is_reported_with_its_endpoint(ws: Workspace) -> None:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = ws.classic(messages=100, name=f"busy{port}")
        result = ws.cli(
            "run",
            str(path),
            "--set",
            f"stages.collector.pull.bind=tcp://127.0.0.1:{port}",
            "--set",
            f"stages.consumer.push.connect=tcp://127.0.0.1:{port}",
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"tcp://127.0.0.1:{port}" in result.stderr + result.stdout
    assert "in use" in (result.stderr + result.stdout).lower()
    assert not orchestrator_processes(f"orchestrator: busy{port} ")


def test_crashing_stage_fails_the_run_naming_it_and_its_exit_code(
    ws: Workspace,
) -> None:
    path = ws.classic(
        messages=1000,
        worker="teststages:exit_at_once",
        worker_extra='restart = "never"',
    )
    code, report = ws.run_json(str(path), timeout=30)

    assert code == 1
    assert report["status"] == "failed"
    assert "consumer." in report["failure"]
    assert "exit 1" in report["failure"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["collector", "consumer"])
def test_a_stage_crashing_during_the_start_is_named_not_just_the_late_ones(
    ws: Workspace, victim: str
) -> None:
    # A crashing collector makes the consumers late; a crashing command
    # consumer is late itself. Either way the report names the crash.
    path = ws.classic(messages=1000, pipeline_extra="ready_timeout = 2")
    text = path.read_text()
    if victim == "collector":
        text = text.replace(
            '"teststages:count"',
            '"teststages:count_without_its_module"\nmax_restarts = 3',
        )
        said = "exit 1 (ModuleNotFoundError: No module named 'no_such_module_here')"
    else:
        text = text.replace(
            'call = "teststages:keep_even"',
            'command = ["sh", "-c", "echo cannot start; exit 4"]',
        )
        said = "exit 4"
    path.write_text(text)
    code, report = ws.run_json(str(path), timeout=25)

    assert code == 1
    assert re.match(rf"{victim}\.[01]: {re.escape(said)}", report["failure"])
    assert report["failed_stage"]["stage"] == victim
    if victim == "consumer":  # never ready: the start is what fails
        assert f"{said} before the pipeline was ready" in report["failure"]
        assert "not ready within 2 s" in report["failure"]
        assert "cannot start" in report["failed_stage"]["tail"]
    # The collector is ready, then its function fails: the consumers may
    # give up on it during the start, or the start may complete and its
    # restarts run out; either way the collector is named, not a consumer.


def test_an_ipc_endpoint_in_use_is_refused_not_stolen(ws: Workspace) -> None:
    import socket

    path = ws.endpoint("results").removeprefix("ipc://")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(path)
    holder.listen()
    try:
        result = ws.cli("run", str(ws.classic(messages=100, name="ipcbusy")))
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"cannot bind {ws.endpoint('results')}: Address already in use" in (
        result.stderr + result.stdout
    )
    assert not orchestrator_processes("orchestrator: ipcbusy ")


def test_bound_ipc_socket_files_are_removed_after_a_run(ws: Workspace) -> None:
    code, report = ws.run_json(str(ws.classic(messages=100)))
    assert code == 0, report
    assert not list(ws.path.glob("*.sock"))


def test_a_negative_message_count_fails_the_run_with_a_message(ws: Workspace) -> None:
    args = ["--set", "stages.producer.params.messages=-5", *_private_endpoints(ws)]
    code, report = ws.run_json(str(ROOT / "pipeline.toml"), *args)

    assert code == 1
    assert report["status"] == "failed"
    assert "messages must be 0 (endless) or more" in report["failed_stage"]["traceback"]
