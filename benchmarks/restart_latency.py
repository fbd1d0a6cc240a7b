"""Restart latency: ``kill -9`` of a consumer -> replacement ready and receiving.

Both launchers run the default pipeline's shape (producer, two consumers,
collector; ipc endpoints) with a producer paced at ``--rate`` inputs/s, so
there is always work waiting for the replacement.  Each round SIGKILLs one
consumer (alternating) and measures, from the kill, until the replacement
said ready and until it received its first input (a wall-clock stamp taken
in the replacement itself).  Medians of ``--kills`` rounds, side by side:

* ``orchestrator``: the supervisor in this process; the kills come from a
  supervisor hook, so the kill time is exact.  The consumers' back-off is
  set to 0 here: the first restart is immediate by default, and this
  measures the mechanism (SIGCHLD, reap, fork, ready), not the back-off
  policy for a replica that keeps dying.
* ``plain Popen``: plain_launcher.py; after the kill the launcher blocks in
  ``wait()`` and then starts a fresh interpreter with ``subprocess.Popen``.

Between "ready" and "receiving" our replacement waits for a frame: the
source sends up to ``batch`` (1000) inputs per frame, so at 20,000 inputs/s
a busy source fills one every 50 ms and deals them in turn to the two
consumers.  The baseline sends one message per input and has no such wait.

    python benchmarks/restart_latency.py --kills 12
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plain_launcher import PlainLauncher

from orchestrator import config, stagefn
from orchestrator.replicastate import Replica
from orchestrator.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
# Let a replacement settle (connect, take a few frames) before the next kill.
SETTLE_S = 0.2


def paced(ctx: Any, rate: float = 20_000) -> Iterator[dict[str, int]]:
    """``{"num": n}`` forever, at most ``rate`` per second."""
    started = time.monotonic()
    num = 0
    while True:
        delay = started + num / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield {"num": num}
        num += 1


def pipeline_file(directory: Path, rate: float) -> Path:
    path = directory / "pipeline.toml"
    path.write_text(f"""
[pipeline]
name = "restart-latency"

[stages.producer]
call = "restart_latency:paced"
push = {{ bind = "ipc://{directory}/work" }}
params = {{ rate = {rate} }}

[stages.consumer]
call = "stages.classic:keep_even"
replicas = 2
pull = {{ connect = "ipc://{directory}/work" }}
push = {{ connect = "ipc://{directory}/results" }}
backoff = 0.0
max_restarts = 1000

[stages.collector]
call = "stages.classic:collect"
pull = {{ bind = "ipc://{directory}/results" }}
""")
    return path


class Killer:
    """A supervisor hook: kill a consumer, wait for its replacement, repeat."""

    def __init__(self, supervisor: Supervisor, kills: int) -> None:
        self.sup = supervisor
        self.kills = kills
        self.ready: list[float] = []
        self.first: list[float] = []
        self.victim: Replica | None = None
        self.old_pid = 0
        self.killed_wall = 0.0
        self.killed_mono = 0.0
        self.calm_until = 0.0

    def __call__(self) -> None:
        if self.sup.status != "running":
            return
        if self.victim is None:
            self._maybe_kill()
        else:
            self._maybe_replaced(self.victim)

    def _maybe_kill(self) -> None:
        consumers = [r for r in self.sup.replicas if r.stage.name == "consumer"]
        victim = consumers[len(self.ready) % 2]
        if time.monotonic() < self.calm_until or victim.state != "ready":
            return
        if victim.first_input_at is None or victim.pid is None:
            return
        self.victim, self.old_pid = victim, victim.pid
        self.killed_wall, self.killed_mono = time.time(), time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)

    def _maybe_replaced(self, victim: Replica) -> None:
        if victim.pid in (None, self.old_pid) or victim.first_input_at is None:
            return
        assert victim.ready_at is not None
        self.ready.append(victim.ready_at - self.killed_mono)
        self.first.append(victim.first_input_at - self.killed_wall)
        self.victim = None
        self.calm_until = time.monotonic() + SETTLE_S
        if len(self.ready) >= self.kills:
            self.sup.signal_received = signal.SIGTERM  # end the run: done


def ours(directory: Path, kills: int, rate: float) -> tuple[list[float], list[float]]:
    pipeline = config.load(pipeline_file(directory, rate), resolve=stagefn.check_calls)
    run_dir, logs = directory / "run", directory / "logs"
    run_dir.mkdir()
    logs.mkdir()
    supervisor = Supervisor(pipeline, run_dir, logs)
    killer = Killer(supervisor, kills)
    supervisor.hooks.append(killer)
    supervisor.run(timeout=120)
    if len(killer.ready) < kills:
        raise RuntimeError(f"run ended early: {supervisor.status} {supervisor.failure}")
    return killer.ready, killer.first


def plain(directory: Path, kills: int, rate: float) -> tuple[list[float], list[float]]:
    launcher = PlainLauncher(directory, rate)
    ready, first = [], []
    try:
        launcher.start_all()
        for name in ("consumer.0", "consumer.1"):
            launcher.expect(name, "first")
        for round_ in range(kills):
            time.sleep(SETTLE_S)
            name = f"consumer.{round_ % 2}"
            killed_at = time.time()
            launcher.procs[name].kill()
            r, f = launcher.restart(name, killed_at)
            ready.append(r)
            first.append(f)
    finally:
        launcher.stop_all()
    return ready, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--rate", type=float, default=20_000)
    args = parser.parse_args()
    # The kills and restarts are the point here, not news.
    logging.getLogger("orchestrator").setLevel(logging.ERROR)
    if args.kills < 10:
        sys.exit("--kills: at least 10, for a median worth the name")

    results = {}
    for name, measure in (("orchestrator", ours), ("plain Popen", plain)):
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            results[name] = measure(Path(tmp), args.kills, args.rate)

    base_ready = statistics.median(results["plain Popen"][0])
    base_first = statistics.median(results["plain Popen"][1])
    print(f"kill -9 of a consumer -> replacement, median of {args.kills} kills")
    print(f"{'launcher':<16}{'ready s':>10}{'receiving s':>13}{'ratio':>8}")
    for name, (ready, first) in results.items():
        r, f = statistics.median(ready), statistics.median(first)
        print(f"{name:<16}{r:>10.4f}{f:>13.4f}{f / base_first:>8.2f}")
    print(
        f"ratio = median to receiving / plain Popen's ({base_first:.4f} s); "
        f"ready ratio {statistics.median(results['orchestrator'][0]) / base_ready:.2f}"
    )


if __name__ == "__main__":
    main()
