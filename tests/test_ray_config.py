"""What `backend = "ray"` accepts and refuses, checked without a cluster."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Workspace


def test_ray_backend_with_placement_is_valid(ws: Workspace) -> None:
    result = ws.cli(
        "check", str(ROOT / "pipeline.toml"),
        "--set", 'pipeline.backend="ray"',
        "--set", 'pipeline.ray_address="10.0.0.5:6379"',
        "--set", "pipeline.curve=true",
        "--set", "stages.consumer.placement.spread=true",
        "--set", 'stages.collector.placement.node="10.0.0.6"',
    )  # fmt: skip

    assert result.returncode == 0, result.stderr


def test_ray_backend_refuses_ipc_endpoints(ws: Workspace) -> None:
    result = ws.cli("check", str(ws.classic()), "--set", 'pipeline.backend="ray"')

    assert result.returncode == 2
    assert "the ray backend needs tcp:// endpoints with a port" in result.stderr
    assert "stages.producer.push.bind" in result.stderr


def test_curve_without_ray_is_refused(ws: Workspace) -> None:
    pipeline = str(ROOT / "pipeline.toml")
    result = ws.cli("check", pipeline, "--set", "pipeline.curve=true")

    assert result.returncode == 2
    assert 'it needs backend = "ray"' in result.stderr


def test_a_pinned_stage_cannot_also_spread(ws: Workspace) -> None:
    result = ws.cli(
        "check", str(ROOT / "pipeline.toml"),
        "--set", 'stages.consumer.placement.node="10.0.0.6"',
        "--set", "stages.consumer.placement.spread=true",
    )  # fmt: skip

    assert result.returncode == 2
    assert '"node" pins a stage' in result.stderr


def test_the_local_backend_never_imports_ray(ws: Workspace) -> None:
    code = (
        "import sys; from orchestrator import cli, supervisor, launcher, runtime; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], env=ws.env, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
