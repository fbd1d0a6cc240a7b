"""`orchestrator init`'s files: valid names, usable endpoints, no overwrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config, scaffold, stagefn
from orchestrator.errors import WouldOverwrite


@pytest.mark.parametrize(
    "directory, name",
    [("my pipeline", "my-pipeline"), ("été.2026", "t-.2026"), ("---", "pipeline")],
)
def test_the_pipeline_is_named_after_its_directory(
    tmp_path: Path, directory: str, name: str
) -> None:
    found = scaffold.pipeline_name(tmp_path / directory)
    assert found == name
    assert found and all(c.isalnum() or c in "_.-" for c in found)


def test_written_files_validate_with_their_stage_module(tmp_path: Path) -> None:
    target = tmp_path / ("a-very-long-directory-name-" * 6)
    scaffold.init(target)

    pipeline = config.load(target / "pipeline.toml", resolve=stagefn.check_calls)

    assert [s.role for s in pipeline.stages] == ["source", "worker", "sink"]
    for stage in pipeline.stages:
        for socket in (stage.pull, stage.push):
            for endpoint in socket.endpoints if socket else ():
                # A Unix socket path holds at most 107 bytes.
                assert len(endpoint.removeprefix("ipc://").encode()) <= 107


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "my_stages.py").write_text("# mine\n")

    with pytest.raises(WouldOverwrite) as info:
        scaffold.init(tmp_path)

    assert info.value.exit_code == 2
    assert not (tmp_path / "pipeline.toml").exists()
    assert (tmp_path / "my_stages.py").read_text() == "# mine\n"
    scaffold.init(tmp_path, force=True)
    assert "def transform" in (tmp_path / "my_stages.py").read_text()
