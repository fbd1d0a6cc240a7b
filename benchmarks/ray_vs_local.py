"""Start-up and throughput of one pipeline, locally and on a 2-node Ray
cluster, measured in the same run.

    python benchmarks/ray_vs_local.py            # 1M inputs, 3 rounds
    python benchmarks/ray_vs_local.py --quick    # 20k inputs, 1 round

Needs ``pip install .[ray]``.  The script starts its own cluster (nodes on
127.0.0.2 and 127.0.0.3, token auth, see tests/raycluster.py) and stops it
at the end.  Variants, each run by ``orchestrator run --json``:

* local: forked processes, tcp on 127.0.0.1;
* ray: actors; producer and collector on the head node, the two consumers
  pinned to the other node, so every record crosses nodes twice;
* ray+curve: the same with CURVE encryption and authentication.

Figures (median over rounds, each round runs every variant in turn):

* start-up: wall time of a run of 1 input, from launching the command to
  its exit (connecting, placing, starting, stopping: the fixed cost);
* ready: the report's ``ready_s`` (spawn to all ready, inside the run; for
  Ray after connecting and creating the actors);
* e2e: inputs per second from launch to exit; steady: inputs per second
  while records flow (``duration_s - ready_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.raycluster import HEAD, WORKER, free_port, start_cluster  # noqa: E402

VARIANTS = ("local", "ray", "ray+curve")


def pipeline_text(variant: str, messages: int, address: str) -> str:
    host = "127.0.0.1"
    work, results = free_port(HEAD), free_port(HEAD)
    top = ""
    placement = ""
    if variant != "local":
        top = f'backend = "ray"\nray_address = "{address}"\n'
        top += "curve = true\n" if variant == "ray+curve" else ""
        placement = f'placement = {{ node = "{WORKER}" }}'
    return f"""
[pipeline]
name = "bench"
{top}
[stages.producer]
call = "stages.classic:produce"
push = {{ bind = "tcp://{host}:{work}" }}
params = {{ messages = {messages} }}

[stages.consumer]
call = "stages.classic:keep_even"
replicas = 2
pull = {{ connect = "tcp://{host}:{work}" }}
push = {{ connect = "tcp://{host}:{results}" }}
{placement}

[stages.collector]
call = "stages.classic:collect"
pull = {{ bind = "tcp://{host}:{results}" }}
"""


def run_once(
    variant: str, messages: int, address: str, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    path = tmp / f"{variant.replace('+', '-')}.toml"
    path.write_text(pipeline_text(variant, messages, address))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "--json", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.monotonic() - started
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise RuntimeError(f"{variant}: no report\n{result.stderr[-3000:]}") from None
    if report["status"] != "completed" or report["produced"] != messages:
        raise RuntimeError(f"{variant}: {report['status']} {report.get('failure')}")
    steady = report["duration_s"] - (report["ready_s"] or 0.0)
    return {
        "wall_s": wall,
        "ready_s": report["ready_s"],
        "e2e": messages / wall,
        "steady": messages / steady if steady > 0 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 20_000, 1

    cluster = start_cluster()
    results: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            env = dict(cluster.env, ORCHESTRATOR_HOME=str(Path(tmp) / "home"))
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    start = run_once(variant, 1, cluster.address, env, Path(tmp))
                    flow = run_once(
                        variant, args.messages, cluster.address, env, Path(tmp)
                    )
                    row = results[variant]
                    row.setdefault("startup_s", []).append(start["wall_s"])
                    row.setdefault("ready_s", []).append(start["ready_s"])
                    row.setdefault("e2e", []).append(flow["e2e"])
                    row.setdefault("steady", []).append(flow["steady"])
    finally:
        cluster.stop()

    summary = {
        "messages": args.messages,
        "rounds": args.rounds,
        "cluster_start_s": round(cluster.started_in, 2),
        "cpus": os.cpu_count(),
        "variants": {
            v: {k: round(statistics.median(xs), 3) for k, xs in row.items()}
            for v, row in results.items()
        },
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{args.messages:,} inputs, {args.rounds} round(s), median; "
        f"2-node cluster started in {cluster.started_in:.1f} s"
    )
    header = ("variant", "start-up s", "ready s", "e2e/s", "steady/s")
    print("{:<10} {:>10} {:>8} {:>10} {:>10}".format(*header))
    for variant, row in summary["variants"].items():
        print(
            f"{variant:<10} {row['startup_s']:>10.2f} {row['ready_s']:>8.3f} "
            f"{row['e2e']:>10,.0f} {row['steady']:>10,.0f}"
        )


if __name__ == "__main__":
    main()
