"""The `status` table's totals line."""

from __future__ import annotations

import io

from rich.console import Console

from orchestrator import display


def test_status_totals_say_what_the_percentage_counts() -> None:
    out = io.StringIO()
    result = {
        "pipeline": "p",
        "status": "running",
        "workers": [],
        "produced": 200_000,
        "total": 200_000,
        "counted_inputs": 40_000,
        "collected": 20_000,
        "lost": 160_000,
        "restarts": 0,
        "rates": {"counted": 1000.0},
    }

    display.render_status(result, Console(file=out, width=200))

    line = next(x for x in out.getvalue().splitlines() if x.startswith("produced"))
    assert line.startswith("produced 200000 of 200000  counted 40000 (20%)")
