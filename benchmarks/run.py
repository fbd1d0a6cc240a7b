"""Side-by-side throughput: the orchestrator against the classic pipeline,
multiprocessing.Pool and raw pyzmq, in one run, several rounds, medians.

    python benchmarks/run.py                  # 1M messages, 3 rounds
    python benchmarks/run.py --with-10m       # also the 10M growth point
    python benchmarks/run.py --quick          # tiny sizes: a smoke test

Each round runs every variant once, one after the other, so that a noisy
neighbour slows all of them alike; the ratios are taken within a round and
their median is reported.  Rates are inputs (records produced) per second:

* e2e: from launching the command to its exit, start-up and shutdown
  included (``orchestrator run``; ``python pool.py``; for the classic
  pipeline, from launching the producer, the collector and consumers being
  up already, to the last result collected);
* steady: while records flow (the orchestrator's run without its start-up,
  from its report's ``duration_s - ready_s``; the Pool from creating it to
  joining it; the classic pipeline from its first result to its last).
"""

from __future__ import annotations

import argparse
import compileall
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import HERE, ROOT, Endpoints, median

# Consumers of the classic example print their id and then connect; the
# tutorial's reader starts the producer by hand seconds later.  This much
# lets the connections complete, so the producer does not give everything to
# the first consumer that happens to be attached.
CLASSIC_SETTLE_S = 0.3
# Without acknowledgements a lost message would leave the collector waiting
# forever; after this long without a result it stops and reports the loss.
CLASSIC_GIVE_UP_S = 3.0
KINDS = {"producer": "source", "consumer": "worker", "collector": "sink"}
MiB = 2**20
# The pool's chunk size for the sizes beyond --messages (10M): the best one
# at 1M on this machine, usually.
LARGE_POOL_CHUNK = 10_000


def orchestrator(
    ends: Endpoints, messages: int, workers: int = 2, delivery: str = "exactly-once"
) -> dict[str, Any]:
    """One ``orchestrator run`` of the default pipeline on private endpoints."""
    work, results = ends.new(), ends.new()
    overrides = {
        "stages.producer.params.messages": messages,
        "stages.producer.push.bind": f'"{work}"',
        "stages.consumer.pull.connect": f'"{work}"',
        "stages.consumer.push.connect": f'"{results}"',
        "stages.collector.pull.bind": f'"{results}"',
        "stages.consumer.replicas": workers,
        "pipeline.delivery": f'"{delivery}"',
    }
    args = [sys.executable, "-m", "orchestrator", "run", "--json"]
    args.append(str(ROOT / "pipeline.toml"))
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    with tempfile.TemporaryDirectory(prefix="bench-") as home:
        env = harness.child_env()
        env["ORCHESTRATOR_HOME"] = home
        started = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
        with harness.sampling(proc.pid, KINDS) as peak:
            out, _ = proc.communicate(timeout=harness.VARIANT_TIMEOUT_S)
        wall = time.perf_counter() - started
    report = json.loads(out)
    expected = messages // 2 + messages % 2
    if report["status"] != "completed" or report["collected"] != expected:
        raise RuntimeError(f"orchestrator run failed: {report}")
    running = report["duration_s"] - (report["ready_s"] or 0.0)
    return {
        "wall": wall,
        "e2e": messages / wall,
        "steady": messages / max(running, 1e-9),
        "ready_s": report["ready_s"],
        "duration_s": report["duration_s"],
        "rss": dict(peak.peaks),
    }


def classic(ends: Endpoints, messages: int) -> dict[str, Any]:
    """The tutorial's scripts: collector, two consumers, then the producer."""
    work, results = ends.new(), ends.new()
    expected = messages // 2 + messages % 2
    env = harness.child_env()
    here = HERE / "classic"

    def start(script: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(here / script), *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    collector = start(
        "resultcollector.py",
        *("--results", results, "--expected", str(expected)),
        *("--give-up-after", str(CLASSIC_GIVE_UP_S)),
    )
    consumers: list[subprocess.Popen[str]] = []
    producer: subprocess.Popen[str] | None = None
    try:
        harness.wait_for_line(collector, "collector ready", 30)
        for _ in range(2):
            consumers.append(start("consumer.py", "--work", work, "--results", results))
        for consumer in consumers:
            harness.wait_for_line(consumer, "I am consumer", 30)
        time.sleep(CLASSIC_SETTLE_S)
        launched = time.time()
        producer = start(
            "producer.py", "--work", work, "--messages", str(messages), "--stay"
        )
        out, _ = collector.communicate(timeout=harness.VARIANT_TIMEOUT_S)
        producer.communicate(timeout=harness.VARIANT_TIMEOUT_S)  # closes its stdin
    finally:
        for proc in [collector, *consumers, *([producer] if producer else [])]:
            harness.stop(proc)
    times = json.loads(out.strip().splitlines()[-1])
    return {
        "lost": expected - times["results"],
        "wall": times["last"] - launched,
        "e2e": messages / (times["last"] - launched),
        "steady": messages / max(times["last"] - times["first"], 1e-9),
    }


def pool(messages: int, chunksize: int) -> dict[str, Any]:
    script = str(HERE / "pool.py")
    args = [script, "--messages", str(messages), "--chunksize", str(chunksize)]
    started = time.perf_counter()
    result = harness.run_json(args)
    wall = time.perf_counter() - started
    return {"wall": wall, "e2e": messages / wall, "steady": result["rate"]}


def raw(ends: Endpoints, messages: int) -> dict[str, Any]:
    args = [str(HERE / "raw_zmq.py"), "--endpoint", ends.new()]
    result = harness.run_json(args + ["--messages", str(messages)])
    return {"steady": result["rate"], "e2e": float("nan"), "wall": result["seconds"]}


class Bench:
    """Runs the variants round after round and keeps every measurement."""

    def __init__(self, args: argparse.Namespace, ends: Endpoints) -> None:
        self.args = args
        self.ends = ends
        self.results: dict[str, list[dict[str, Any]]] = {}

    def measure(self, name: str, result: dict[str, Any]) -> None:
        self.results.setdefault(name, []).append(result)
        print(
            f"  {name:<28} e2e {result['e2e']:>12,.0f}/s  "
            f"steady {result['steady']:>12,.0f}/s",
            file=sys.stderr,
            flush=True,
        )

    def round(self) -> None:
        a, ends = self.args, self.ends
        self.measure("orchestrator", orchestrator(ends, a.messages))
        self.measure(
            "orchestrator at-most-once",
            orchestrator(ends, a.messages, delivery="at-most-once"),
        )
        self.measure("classic", classic(ends, a.classic_messages))
        for chunk in a.chunks:
            self.measure(f"pool chunksize {chunk}", pool(a.messages, chunk))
        self.measure("raw pyzmq", raw(ends, a.raw_messages))
        for workers in a.workers:
            if workers != 2:
                self.measure(
                    f"workers {workers}", orchestrator(ends, a.messages, workers)
                )
        for size in a.sizes:
            if size != a.messages:
                self.measure(f"messages {size}", orchestrator(ends, size))
            if size > a.messages:
                # Where start-up weighs little: the pool at the same size.
                self.measure(f"pool {size}", pool(size, LARGE_POOL_CHUNK))

    def med(self, name: str, key: str) -> float:
        return median([r[key] for r in self.results[name]])

    def ratio(self, top: str, bottom: str | list[str], key: str) -> float:
        """The median over rounds of top/bottom, both measured in one round."""
        bottoms = [bottom] if isinstance(bottom, str) else bottom
        ratios = []
        for i, result in enumerate(self.results[top]):
            best = max(self.results[b][i][key] for b in bottoms)
            ratios.append(result[key] / best)
        return median(ratios)


def _rate(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"


def report(bench: Bench) -> str:
    a = bench.args
    pools = [f"pool chunksize {c}" for c in a.chunks]
    best_pool = max(pools, key=lambda p: bench.med(p, "steady"))
    rows = [
        ("orchestrator", f"orchestrator, {a.messages:,} msgs, exactly-once"),
        (
            "orchestrator at-most-once",
            f"orchestrator, {a.messages:,} msgs, at-most-once",
        ),
        ("classic", f"classic send_json per message, {a.classic_messages:,} msgs"),
        *((p, f"multiprocessing.Pool(2), {p.split()[-1]} per chunk") for p in pools),
        ("raw pyzmq", f"raw pyzmq PUSH/PULL, 16 B, {a.raw_messages:,} msgs"),
    ]
    lines = [
        f"{'variant':<52} {'e2e rec/s':>12} {'steady rec/s':>13}",
        "-" * 79,
    ]
    for name, label in rows:
        e2e, steady = bench.med(name, "e2e"), bench.med(name, "steady")
        lines.append(f"{label:<52} {_rate(e2e):>12} {_rate(steady):>13}")
    lines.append("")
    lines.append(f"ratios (median of per-round ratios, {a.runs} rounds)   e2e   steady")
    for label, top, bottom, goal in [
        ("orchestrator / classic (goal >= 25)", "orchestrator", "classic", 25.0),
        ("orchestrator / best Pool (goal >= 1.2)", "orchestrator", pools, 1.2),
        (
            "accounting on / off (goal >= 0.8)",
            "orchestrator",
            "orchestrator at-most-once",
            0.8,
        ),
    ]:
        e2e, steady = (
            bench.ratio(top, bottom, "e2e"),
            bench.ratio(top, bottom, "steady"),
        )
        verdict = (
            "met"
            if min(e2e, steady) >= goal
            else ("met steady only" if steady >= goal else "NOT met")
        )
        lines.append(f"  {label:<44} {e2e:>6.2f} {steady:>7.2f}  {verdict}")
    lines.append(f"  (best Pool chunk size by steady rate: {best_pool.split()[-1]})")
    lost = [r["lost"] for r in bench.results["classic"] if r["lost"]]
    if lost:
        lines.append(
            f"  (the classic pipeline lost results in {len(lost)} of {a.runs} "
            f"rounds: {', '.join(map(str, lost))}; it has no acknowledgements)"
        )
    for size in (s for s in a.sizes if s > a.messages):
        top, bottom = f"messages {size}", f"pool {size}"
        e2e = bench.ratio(top, bottom, "e2e")
        steady = bench.ratio(top, bottom, "steady")
        label = f"at {size:,} msgs: orchestrator / Pool({LARGE_POOL_CHUNK})"
        verdict = "met" if min(e2e, steady) >= 1.2 else "NOT met"
        lines.append(f"  {label:<44} {e2e:>6.2f} {steady:>7.2f}  {verdict}")
    lines.append("")
    lines += _growth(bench)
    return "\n".join(lines)


def _growth(bench: Bench) -> list[str]:
    """Scaling over workers and sizes: time, rates and peak RSS per kind."""
    a = bench.args
    header = (
        f"{'run':<30} {'wall s':>7} {'e2e rec/s':>11} {'steady rec/s':>13}  "
        "peak RSS MiB: supervisor/source/worker/sink"
    )
    lines = [header, "-" * len(header)]
    runs = [
        (
            f"workers {w}" if w != 2 else "orchestrator",
            f"{a.messages:,} msgs, {w} workers",
        )
        for w in a.workers
    ]
    runs += [
        (
            f"messages {s}" if s != a.messages else "orchestrator",
            f"{s:,} msgs, 2 workers",
        )
        for s in a.sizes
    ]
    done = set()
    for name, label in runs:
        if label in done:
            continue
        done.add(label)
        results = bench.results[name]
        rss = [
            median([r["rss"].get(kind, 0) for r in results]) / MiB
            for kind in ("supervisor", "source", "worker", "sink")
        ]
        e2e, steady = _rate(bench.med(name, "e2e")), _rate(bench.med(name, "steady"))
        lines.append(
            f"{label:<30} {bench.med(name, 'wall'):>7.2f} {e2e:>11} {steady:>13}  "
            + "/".join(f"{m:.0f}" for m in rss)
        )
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument(
        "--classic-messages", type=int, default=None, help="default: --messages"
    )
    parser.add_argument("--raw-messages", type=int, default=1_000_000)
    parser.add_argument(
        "--runs", type=int, default=3, help="rounds; medians are reported"
    )
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1000, 10_000, 100_000]
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--with-10m", action="store_true", help="add 10M to --sizes")
    parser.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.raw_messages, args.runs = 2000, 2000, 1
        args.classic_messages, args.chunks, args.sizes = 2000, [100, 1000], [500, 4000]
    if args.classic_messages is None:
        args.classic_messages = args.messages
    if args.with_10m:
        args.sizes.append(10_000_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # An installed package has its bytecode cached; a checkout run with
    # PYTHONDONTWRITEBYTECODE (as on the machines we measure on) would
    # compile the orchestrator anew on every start, about 0.1 s of each e2e.
    compileall.compile_dir(ROOT / "orchestrator", quiet=1)
    compileall.compile_dir(ROOT / "stages", quiet=1)
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        bench = Bench(args, Endpoints(args.transport, Path(directory)))
        for number in range(args.runs):
            print(f"round {number + 1} of {args.runs}", file=sys.stderr, flush=True)
            bench.round()
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1))
    print(report(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
