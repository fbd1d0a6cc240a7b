"""Merging replica log files in time order, and selecting them."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import logs
from orchestrator.errors import UsageError


def _write(directory: Path, name: str, *lines: str) -> None:
    (directory / f"{name}.log").write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    day = "2026-01-01"
    _write(directory, "consumer.0", f"{day} 10:00:01,000 a", f"{day} 10:00:03,000 c")
    _write(directory, "consumer.1", "2026-01-01 10:00:02,000 b", "no stamp")
    _write(directory, "collector.0", "2026-01-01 10:00:00,500 first")
    (tmp_path / "supervisor.log").write_text("2026-01-01 10:00:00,000 INFO start\n")
    return directory


def test_lines_are_merged_in_time_order_with_the_supervisor(logs_dir: Path) -> None:
    merged = logs.read(logs.select(logs_dir, None))
    assert [(line.name, line.text) for line in merged] == [
        ("supervisor", "INFO start"),
        ("collector.0", "first"),
        ("consumer.0", "a"),
        ("consumer.1", "b"),
        ("consumer.1", "no stamp"),  # kept after the line before it
        ("consumer.0", "c"),
    ]
    assert merged[0].time == "10:00:00"


def test_a_stage_or_a_replica_can_be_selected(logs_dir: Path) -> None:
    assert [p.stem for p in logs.select(logs_dir, "consumer")] == [
        "consumer.0",
        "consumer.1",
    ]
    assert [p.stem for p in logs.select(logs_dir, "consumer.1")] == ["consumer.1"]
    assert [p.stem for p in logs.select(logs_dir, "supervisor")] == ["supervisor"]


def test_the_last_lines_only(logs_dir: Path) -> None:
    tail = logs.read(logs.select(logs_dir, None), tail=2)
    assert [line.text for line in tail] == ["no stamp", "c"]


def test_an_unknown_stage_names_the_ones_with_logs(logs_dir: Path) -> None:
    with pytest.raises(UsageError, match="stages with logs: collector, consumer"):
        logs.check_selection(logs_dir, "producer")


def test_follow_prints_new_lines_new_replicas_and_rotated_files(
    logs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "FOLLOW_POLL_S", 0.01)
    seen: list[str] = []
    turns = iter(range(500))  # bounded: 500 polls of 10 ms at most

    def until() -> bool:
        turn = next(turns)
        if turn == 1:
            with open(logs_dir / "consumer.0.log", "a") as fh:
                fh.write("2026-01-01 10:00:04,000 appended\n")
            _write(logs_dir, "consumer.2", "2026-01-01 10:00:05,000 new replica")
        if turn == 3:  # rotation: a new, shorter file under the same name
            (logs_dir / "consumer.1.log").rename(logs_dir / "consumer.1.log.1")
            _write(logs_dir, "consumer.1", "2026-01-01 10:00:06,000 rotated")
        return len(seen) >= 3

    logs.follow(logs_dir, "consumer", lambda line: seen.append(line.text), until=until)

    assert seen == ["appended", "new replica", "rotated"]
