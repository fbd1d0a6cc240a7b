"""The classic filter on ``multiprocessing.Pool(N).imap_unordered``.

The same stage functions as the default pipeline (``stages.classic``): the
parent runs ``produce`` and ``collect``, the pool's processes run
``keep_even`` one record at a time, ``chunksize`` records per task.  Prints
one JSON line: seconds from creating the pool to joining it, and records/s.

    python benchmarks/pool.py --messages 1000000 --chunksize 10000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.classic import collect, keep_even, produce  # noqa: E402


class _Context:
    """The part of StageContext that the classic stage functions read."""

    replica = 0

    def resume(self) -> int:  # a first start: the stream from its beginning
        return 0


_CTX: Any = _Context()


def _name_replica() -> None:
    _CTX.replica = multiprocessing.current_process()._identity[0] - 1


def _keep(record: dict[str, int]) -> dict[str, int] | None:
    return keep_even(record, _CTX)


def run(messages: int, chunksize: int, processes: int = 2) -> dict[str, Any]:
    started = time.perf_counter()
    pool = multiprocessing.Pool(processes, initializer=_name_replica)
    results = pool.imap_unordered(_keep, produce(_CTX, messages), chunksize)
    summary = collect((r for r in results if r is not None), _CTX)
    pool.close()
    pool.join()
    seconds = time.perf_counter() - started
    collected = sum(summary["per_consumer"].values())
    if collected != messages // 2 + messages % 2:
        raise SystemExit(f"pool collected {collected} of {messages} inputs' results")
    return {
        "messages": messages,
        "chunksize": chunksize,
        "seconds": seconds,
        "rate": messages / seconds,
        "collected": collected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--chunksize", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(run(args.messages, args.chunksize, args.processes)))


if __name__ == "__main__":
    main()
