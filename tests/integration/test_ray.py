"""The ray backend on a real 2-node Ray cluster started on this machine.

The nodes listen on 127.0.0.2 (head) and 127.0.0.3: Ray would replace
127.0.0.1 with the machine's outward address, which these tests must not
use.  The cluster requires a token (``RAY_AUTH_MODE=token``); it is stopped
through the processes the fixture started, never with ``ray stop``, which
kills every Ray process on the machine.

Run with ``pytest -m ray`` (needs ``pip install .[ray]``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Workspace, wait_for
from tests.raycluster import HEAD, WORKER, RayCluster, free_port, start_cluster

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    started = start_cluster()
    try:
        yield started
    finally:
        started.stop()


def _ray_ws(ws: Workspace, cluster: RayCluster) -> Workspace:
    ws.env.update(
        {k: v for k, v in cluster.env.items() if k.startswith("RAY_")},
    )
    return ws


def _ports() -> tuple[int, int]:
    return free_port(HEAD), free_port(HEAD)


def _ray_pipeline(
    ws: Workspace,
    cluster: RayCluster,
    messages: int = 20_000,
    rate: float = 0.0,
    extra: str = "",
) -> Path:
    work, results = _ports()
    return ws.write(f"""
[pipeline]
name = "r"
backend = "ray"
ray_address = "{cluster.address}"
{extra}

[stages.producer]
call = "teststages:numbers"
push = {{ bind = "tcp://127.0.0.1:{work}" }}
params = {{ messages = {messages}, rate = {rate} }}

[stages.consumer]
call = "teststages:keep_even"
replicas = 2
pull = {{ connect = "tcp://127.0.0.1:{work}" }}
push = {{ connect = "tcp://127.0.0.1:{results}" }}
placement = {{ node = "{WORKER}" }}

[stages.collector]
call = "teststages:count"
pull = {{ bind = "tcp://127.0.0.1:{results}" }}
""")


def _report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        return dict(json.loads(result.stdout))
    except ValueError:
        raise AssertionError(
            f"no report (exit {result.returncode}):\n{result.stderr[-4000:]}"
        ) from None


def _assert_exact(report: dict[str, Any], messages: int) -> None:
    assert report["status"] == "completed", report.get("failure")
    assert report["produced"] == messages
    assert report["collected"] == messages // 2
    assert report["lost"] == 0
    assert report["summary"]["sum"] == sum(range(0, messages, 2))


@pytest.mark.timeout(240)
def test_default_pipeline_runs_on_two_nodes_with_exact_counts(
    ws: Workspace, cluster: RayCluster
) -> None:
    ws = _ray_ws(ws, cluster)
    work, results = _ports()
    result = ws.cli(
        "run",
        "--json",
        str(ROOT / "pipeline.toml"),
        "--set", 'pipeline.backend="ray"',
        "--set", f'pipeline.ray_address="{cluster.address}"',
        "--set", f'stages.consumer.placement.node="{WORKER}"',
        "--set", f'stages.producer.push.bind="tcp://127.0.0.1:{work}"',
        "--set", f'stages.consumer.pull.connect="tcp://127.0.0.1:{work}"',
        "--set", f'stages.consumer.push.connect="tcp://127.0.0.1:{results}"',
        "--set", f'stages.collector.pull.bind="tcp://127.0.0.1:{results}"',
        timeout=120,
    )  # fmt: skip
    report = _report(result)

    assert result.returncode == 0, result.stderr
    assert report["status"] == "completed"
    assert report["produced"] == 20_000
    assert report["collected"] == 10_000
    assert report["lost"] == 0
    assert report["summary"]["sum"] == sum(range(0, 20_000, 2))
    consumers = [w for w in report["workers"] if w["stage"] == "consumer"]
    assert [abs(c["received"] - 10_000) <= 1 for c in consumers] == [True, True]
    # The data crossed nodes: consumers on the worker node, the rest on the head.
    nodes = {f"{w['stage']}.{w['replica']}": w["node"] for w in report["workers"]}
    assert nodes == {
        "producer.0": HEAD,
        "consumer.0": WORKER,
        "consumer.1": WORKER,
        "collector.0": HEAD,
    }


@pytest.mark.timeout(240)
def test_killed_worker_actor_is_restarted_and_counts_stay_exact(
    ws: Workspace, cluster: RayCluster
) -> None:
    ws = _ray_ws(ws, cluster)
    messages = 20_000
    path = _ray_pipeline(ws, cluster, messages, 4000)
    # Not --json: the log lines on stderr say which pid each replica has.
    proc = ws.popen("run", "--report", str(ws.path / "report.json"), str(path))
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stderr.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()

    def consumer_pid() -> int | None:
        for line in list(lines):
            if "consumer.0 pid" in line and line.rstrip().endswith("ready"):
                return int(line.split("consumer.0 pid ")[1].split()[0])
        return None

    pid = wait_for(consumer_pid, timeout=90, message="consumer.0 ready")
    time.sleep(1.0)  # let it work a while: the kill must land mid-run
    os.kill(pid, signal.SIGKILL)  # an actor process of our cluster
    proc.wait(timeout=120)
    reader.join(timeout=5)
    report = json.loads((ws.path / "report.json").read_text())

    _assert_exact(report, messages)
    consumer0 = next(
        w for w in report["workers"] if w["stage"] == "consumer" and w["replica"] == 0
    )
    assert consumer0["restarts"] >= 1
    assert consumer0["pid"] != pid
    assert proc.returncode == 0


@pytest.mark.timeout(240)
def test_curve_protected_run_completes(ws: Workspace, cluster: RayCluster) -> None:
    ws = _ray_ws(ws, cluster)
    path = _ray_pipeline(ws, cluster, 20_000, extra="curve = true")

    code, report = ws.run_json(str(path), timeout=120)

    assert code == 0, report.get("failure")
    _assert_exact(report, 20_000)


@pytest.mark.timeout(240)
def test_stage_with_a_wrong_curve_key_is_refused(
    ws: Workspace, cluster: RayCluster, tmp_path: Path
) -> None:
    # In a child process: it becomes a Ray driver, this test process does not.
    ws = _ray_ws(ws, cluster)
    path = _ray_pipeline(ws, cluster, 2000, extra="curve = true")
    script = ws.path / "wrong_key.py"
    script.write_text(WRONG_KEY_SCRIPT)

    result = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path)],
        env=ws.env,
        cwd=ws.path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    saved = tmp_path / "report.json"
    assert saved.exists(), f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    report = json.loads(saved.read_text())

    assert report["status"] == "failed"
    assert "consumer" in report["failure"]
    assert "refused this stage's CURVE keys" in report["failure"]
    assert report["collected"] == 0  # no data flowed
    assert "refused a connection with an unknown CURVE key" in result.stderr


WRONG_KEY_SCRIPT = """
import json, logging, sys
from pathlib import Path

import zmq

from orchestrator import config, report
from orchestrator.curve import Curve
from orchestrator.raybackend import RayLauncher
from orchestrator.supervisor import Supervisor


class WrongKeyLauncher(RayLauncher):
    def _curve(self, stage):
        keys = super()._curve(stage)
        if stage.name != "consumer":
            return keys
        public, secret = zmq.curve_keypair()  # a key the run does not know
        return Curve(keys.server_public, public, None, secret)


logging.basicConfig(level=logging.INFO)
pipeline = config.load(sys.argv[1])
out = Path(sys.argv[2])
(out / "logs").mkdir()
(out / "run").mkdir()
supervisor = Supervisor(
    pipeline, out / "run", out / "logs",
    on_output=lambda r, line: print(r.name, "|", line, file=sys.stderr),
    launcher=WrongKeyLauncher(pipeline, out / "run"),
)
supervisor.run(timeout=60)
(out / "report.json").write_text(json.dumps(report.build(supervisor), default=str))
"""


# Last in the module: it takes the worker node away from the shared cluster.
@pytest.mark.timeout(240)
def test_replicas_of_a_lost_node_are_restarted_on_another(
    ws: Workspace, cluster: RayCluster
) -> None:
    ws = _ray_ws(ws, cluster)
    # Ray declares a node dead after its health checks fail (~15 s here):
    # the run must still be going by then.
    messages = 20_000
    path = _ray_pipeline(ws, cluster, messages, 500)
    # Ray's spread is best effort: four replicas make one on node 2 likely.
    text = (
        path.read_text()
        .replace(
            f'placement = {{ node = "{WORKER}" }}', "placement = { spread = true }"
        )
        .replace("replicas = 2", "replicas = 4")
    )
    path.write_text(text)
    proc = ws.popen("run", "--report", str(ws.path / "report.json"), str(path))
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stderr.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()

    def on_worker_node() -> list[str] | None:
        if not any("all stages ready" in line for line in list(lines)):
            return None
        return [
            line.split()[2]
            for line in list(lines)
            if line.split()[2:3] and line.split()[2].startswith("consumer.")
            and f"on node {WORKER}" in line
        ]  # fmt: skip

    try:
        wait_for(lambda: on_worker_node() is not None, timeout=90, message="ready")
    except AssertionError:
        proc.kill()
        raise AssertionError("".join(lines[-40:])) from None
    lost = on_worker_node()
    if not lost:
        proc.kill()
        proc.wait(timeout=30)
        pytest.skip("Ray placed no consumer on node 2: node loss not exercised")
    time.sleep(1.0)
    cluster.kill_node(1)  # the worker node's host "dies"
    proc.wait(timeout=150)
    reader.join(timeout=5)
    saved = ws.path / "report.json"
    assert saved.exists(), f"exit {proc.returncode}:\n{''.join(lines[-40:])}"
    report = json.loads(saved.read_text())

    _assert_exact(report, messages)
    for name in lost:
        stage, index = name.split(".")
        entry = next(
            w
            for w in report["workers"]
            if w["stage"] == stage and w["replica"] == int(index)
        )
        assert entry["restarts"] >= 1, (entry, "".join(lines[-30:]))
        assert entry["node"] == HEAD
