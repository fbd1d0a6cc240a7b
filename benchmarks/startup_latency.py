"""Start-up latency: launch -> every stage of the default pipeline ready.

Three measurements of the same four stages (pipeline.toml on private ipc
endpoints), each repeated ``--rounds`` times, medians printed side by side:

* ``orchestrator, warm``: the supervisor in this process, stage modules
  already imported (how a daemon restarts a pipeline); the supervisor's own
  ``ready_at - started_at``, i.e. forks until the last stage said ready.
* ``orchestrator run, cold``: ``python -m orchestrator run`` as a new
  process, from ``Popen`` until its "all stages ready" log line arrives
  (interpreter start-up and imports included).
* ``plain Popen``: four fresh interpreters started with ``subprocess.Popen``
  (see plain_launcher.py), until all four said ready by the same rule.

    python benchmarks/startup_latency.py --rounds 10
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plain_launcher import PlainLauncher

from orchestrator import config, stagefn
from orchestrator.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent


def overrides(directory: Path) -> list[str]:
    work, results = f"ipc://{directory}/work", f"ipc://{directory}/results"
    return [
        f'stages.producer.push.bind="{work}"',
        f'stages.consumer.pull.connect="{work}"',
        f'stages.consumer.push.connect="{results}"',
        f'stages.collector.pull.bind="{results}"',
    ]


def warm(directory: Path) -> float:
    pipeline = config.load(
        ROOT / "pipeline.toml", overrides(directory), resolve=stagefn.check_calls
    )
    run_dir, logs = directory / "run", directory / "logs"
    run_dir.mkdir()
    logs.mkdir()
    supervisor = Supervisor(pipeline, run_dir, logs)
    supervisor.run(timeout=60)
    assert supervisor.ready_at is not None, supervisor.failure
    return supervisor.ready_at - supervisor.started_at


def cold(directory: Path) -> float:
    args = [sys.executable, "-m", "orchestrator", "run", str(ROOT / "pipeline.toml")]
    for item in overrides(directory):
        args += ["--set", item]
    env = dict(os.environ, ORCHESTRATOR_HOME=str(directory / "home"))
    env.pop("COLUMNS", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    ready = None
    for line in proc.stderr:
        if ready is None and "all stages ready" in line:
            ready = time.monotonic() - started
    proc.wait(timeout=60)
    if ready is None:
        raise RuntimeError(f"orchestrator run exited {proc.returncode}, never ready")
    return ready


def plain(directory: Path) -> float:
    launcher = PlainLauncher(directory)
    try:
        return launcher.start_all()
    finally:
        launcher.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    # The kills and restarts are the point here, not news.
    logging.getLogger("orchestrator").setLevel(logging.ERROR)

    variants = {"orchestrator, warm": warm, "orchestrator run, cold": cold}
    variants["plain Popen x4"] = plain
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, measure in variants.items():  # interleaved: same conditions
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                results[name].append(measure(Path(tmp)))

    base = statistics.median(results["plain Popen x4"])
    print(f"start-up to every stage ready, median of {args.rounds} rounds")
    print(f"{'launcher':<26}{'median s':>10}{'min s':>9}{'max s':>9}{'ratio':>8}")
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"{name:<26}{median:>10.4f}{min(values):>9.4f}{max(values):>9.4f}"
            f"{median / base:>8.2f}"
        )
    print("ratio = median / median of plain Popen x4")


if __name__ == "__main__":
    main()
