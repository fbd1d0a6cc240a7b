"""`orchestrator init` writes a pipeline that runs unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import Workspace


def test_init_writes_a_pipeline_that_runs_unchanged(ws: Workspace) -> None:
    target = ws.path / "fresh"
    result = ws.cli("init", str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "pipeline.toml").exists()
    # The stage module is clean code to start from.
    ruff = [sys.executable, "-m", "ruff", "check", "--quiet", "my_stages.py"]
    checked = subprocess.run(ruff, cwd=target, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # From another directory: the stage module is found next to the file.
    code, report = ws.run_json(str(target / "pipeline.toml"))

    assert code == 0, report
    kept = [n for n in range(10_000) if n % 3 != 0]
    assert report["summary"] == {
        "records": len(kept),
        "sum_of_squares": sum(n * n for n in kept),
    }
    assert report["lost"] == 0


def test_init_never_overwrites_without_force(ws: Workspace) -> None:
    (ws.path / "pipeline.toml").write_text("# mine\n")

    refused = ws.cli("init")  # the current directory

    assert refused.returncode == 2
    assert "pipeline.toml already exists; use --force" in refused.stderr
    assert (ws.path / "pipeline.toml").read_text() == "# mine\n"
    assert not (ws.path / "my_stages.py").exists()

    forced = ws.cli("init", "--force")

    assert forced.returncode == 0, forced.stderr
    assert "[stages.transform]" in (ws.path / "pipeline.toml").read_text()
    assert ws.cli("check").returncode == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("taken", "error: taken is not a directory"),
        ("taken/sub", "error: cannot write taken/sub: Not a directory"),
    ],
)
def test_init_into_a_file_is_a_clean_error(
    ws: Workspace, target: str, message: str
) -> None:
    (ws.path / "taken").write_text("# a file\n")

    result = ws.cli("init", target)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert (ws.path / "taken").read_text() == "# a file\n"
