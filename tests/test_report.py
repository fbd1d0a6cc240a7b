"""The report table people read."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from orchestrator import report

FAILED: dict[str, Any] = {
    "pipeline": "p",
    "status": "failed",
    "failure": "stage sink.0 failed: KeyError('[bold]x[/bold]')",
    "workers": [],
    "produced": 10,
    "collected": 0,
    "lost": 10,
    "quarantined": 0,
    "redelivered": 0,
    "duplicates_dropped": 0,
    "restarts": 0,
    "per_consumer": {"[red]a[/red]": 1},
    "duration_s": 0.5,
    "throughput": 20.0,
}


def test_failure_and_summary_keys_are_printed_as_written() -> None:
    out = io.StringIO()

    report.render(FAILED, Console(file=out, width=200))

    text = out.getvalue()
    assert "failed: stage sink.0 failed: KeyError('[bold]x[/bold]')" in text
    assert "per consumer {'[red]a[/red]': 1}" in text
