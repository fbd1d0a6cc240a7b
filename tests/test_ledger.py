"""The counted-set, the window and the SQLite ledger, checked against a model."""

from __future__ import annotations

import random
from pathlib import Path

from orchestrator.ledger import Batch, Ledger, SeqSet, Window


def test_seqset_reports_only_new_parts() -> None:
    seen = SeqSet()
    assert seen.add(0, 10) == [(0, 10)]
    assert seen.add(5, 15) == [(10, 15)]
    assert seen.add(20, 30) == [(20, 30)]
    assert seen.add(0, 40) == [(15, 20), (30, 40)]
    assert seen.ranges() == [(0, 40)]
    assert len(seen) == 40


def test_seqset_matches_a_plain_set_under_random_ranges() -> None:
    rng = random.Random(7)
    seen, model = SeqSet(), set()
    for _ in range(2000):
        lo = rng.randrange(0, 5000)
        hi = lo + rng.randrange(0, 50)
        fresh = seen.add(lo, hi)
        expected = sorted(set(range(lo, hi)) - model)
        assert sorted(s for a, b in fresh for s in range(a, b)) == expected
        model |= set(range(lo, hi))
    assert len(seen) == len(model)
    for probe in range(0, 5100, 7):
        assert (probe in seen) == (probe in model)
    # contiguous counting stays compact
    assert len(SeqSet([(i, i + 1) for i in range(10_000)]).ranges()) == 1


def test_gaps_leave_the_set_unchanged() -> None:
    seen = SeqSet([(0, 5), (8, 10)])
    assert seen.gaps(0, 12) == [(5, 8), (10, 12)]
    assert seen.ranges() == [(0, 5), (8, 10)]


def test_window_counts_inputs_in_flight() -> None:
    window = Window(limit=10)
    window.add(1, Batch(0, list(range(6)), 0.0))
    assert not window.full
    window.add(2, Batch(6, list(range(4)), 100.0))
    assert window.full
    assert window.overdue(timeout=50, now=100.0) == [1]
    assert window.ack(1) is not None and window.size == 4
    assert window.ack(1) is None


def test_ledger_replays_only_what_was_committed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.log(0, 0, 10, 0, b"frame-a")
    ledger.commit()
    ledger.log(0, 10, 20, 10, b"frame-b")  # never committed: the process "died"
    ledger.close()

    reopened = Ledger(tmp_path / "l.sqlite")
    assert list(reopened.replay()) == [(0, 0, 10, 0, b"frame-a")]
