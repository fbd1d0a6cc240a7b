"""The benchmark suite still runs: every variant once, at tiny sizes.

A smoke test only: it checks that the scripts work and print their table,
never how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, Workspace


@pytest.mark.timeout(180)
def test_benchmark_entry_point_prints_the_side_by_side_table(ws: Workspace) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--transport",
            "ipc",
            "--workers",
            "1",
            "2",
            "--sizes",
            "2000",
        ],
        cwd=ws.path,
        env=ws.env,
        capture_output=True,
        text=True,
        timeout=170,
    )

    assert result.returncode == 0, result.stderr
    table = result.stdout
    for label in (
        "orchestrator, 2,000 msgs, exactly-once",
        "at-most-once",
        "classic send_json",
        "multiprocessing.Pool(2)",
        "raw pyzmq",
        "orchestrator / classic",
        "orchestrator / best Pool",
        "accounting on / off",
        "at 4,000 msgs: orchestrator / Pool(10000)",
        "2,000 msgs, 1 workers",
        "2,000 msgs, 2 workers",
    ):
        assert label in table
