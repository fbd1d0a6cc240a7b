"""Writing a run's output files in one step, without clobbering what is there."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from orchestrator import files


def test_a_symlink_is_followed_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)

    files.write_text(link, "new")

    assert link.is_symlink()
    assert target.read_text() == "new"


@pytest.mark.timeout(10)
def test_a_fifo_is_written_to_not_replaced_by_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()

    files.write_text(fifo, "the report")
    reader.join(timeout=5)

    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert got == ["the report"]


def test_a_failed_write_leaves_neither_half_a_file_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    target.write_text("good")

    def refuse(self: Path, other: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.raises(OSError):
        files.write_text(target, "new")

    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
