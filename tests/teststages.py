"""Stage functions that misbehave on purpose, for the tests.

The tests copy this file next to the pipeline files they write, so that
``call = "teststages:..."`` resolves the way a user's own module would.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from orchestrator import StageContext


def numbers(
    ctx: StageContext, messages: int = 1000, rate: float = 0.0
) -> Iterator[dict[str, int]]:
    """``{"num": n}``; with ``rate``, at most that many per second."""
    started = time.monotonic()
    for num in range(messages):
        if rate:
            delay = started + num / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield {"num": num}


def numbers_resuming(
    ctx: StageContext, messages: int = 1000, rate: float = 0.0
) -> Iterator[dict[str, int]]:
    """``numbers`` from where the last incarnation left off; notes each start."""
    start = ctx.resume()
    with open(ctx.run_dir / "starts", "a") as starts:
        starts.write(f"{start}\n")
    return (r for r in numbers(ctx, messages, rate) if r["num"] >= start)


def keep_even(
    record: dict[str, int], ctx: StageContext, delay: float = 0.0
) -> dict[str, int] | None:
    if delay:
        time.sleep(delay)
    if record["num"] % 2 == 0:
        return {"consumer": ctx.replica, "num": record["num"]}
    return None


def raise_on(
    record: dict[str, int], ctx: StageContext, poison: int = -1
) -> dict[str, int] | None:
    if record["num"] == poison:
        raise ValueError(f"cannot handle {poison}")
    return keep_even(record, ctx)


def exit_on(
    record: dict[str, int], ctx: StageContext, poison: int = -1
) -> dict[str, int] | None:
    if record["num"] == poison:
        os._exit(3)
    return keep_even(record, ctx)


def poison_every(
    record: dict[str, int],
    ctx: StageContext,
    every: int = 250,
    offset: int = 7,
    how: str = "raise",
) -> dict[str, int] | None:
    """Fail on every input whose number is ``offset`` modulo ``every``."""
    if record["num"] % every == offset:
        if how == "exit":
            os._exit(3)
        raise ValueError(f"cannot handle {record['num']}")
    return keep_even(record, ctx)


def count_never(records: Iterable[dict[str, Any]], ctx: StageContext) -> None:
    """A sink that raises on the first record it is given, every time."""
    for record in records:
        raise RuntimeError(f"sink cannot take {record}")


def count_without_its_module(
    records: Iterable[dict[str, Any]], ctx: StageContext
) -> None:
    import no_such_module_here  # noqa: F401


def write_count_whatever_happens(
    records: Iterable[dict[str, Any]], ctx: StageContext, output: str
) -> int:
    """A careless sink: it catches everything around its loop, then writes."""
    seen = 0
    try:
        for _ in records:
            seen += 1
    except Exception:
        pass
    with open(output, "w") as out:
        out.write(str(seen))
    return seen


def raise_always(record: Any, ctx: StageContext) -> None:
    raise ValueError("this stage is broken")


def exit_at_once(record: Any, ctx: StageContext) -> None:
    raise SystemExit(1)


def stop_self_on(
    record: dict[str, int], ctx: StageContext, poison: int = -1, replica: int = 0
) -> dict[str, int] | None:
    """SIGSTOP this process when it meets ``poison`` (once, on one replica)."""
    marker = ctx.run_dir / f"stopped-{ctx.stage}"
    if record["num"] == poison and ctx.replica == replica and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGSTOP)
    return keep_even(record, ctx)


_hoard: list[bytes] = []


def grow(
    record: dict[str, int], ctx: StageContext, per_record: int = 100_000
) -> dict[str, int] | None:
    """Leak ``per_record`` bytes per record on replica 0, until restarted."""
    if ctx.replica == 0 and not (ctx.run_dir / "grown").exists():
        _hoard.append(bytes(per_record))
        if len(_hoard) * per_record > 400 * 2**20:
            (ctx.run_dir / "grown").touch()
    return keep_even(record, ctx)


def count(records: Iterable[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
    per_consumer: Counter[int] = Counter()
    total = 0
    seen = 0
    for record in records:
        per_consumer[record["consumer"]] += 1
        total += record["num"]
        seen += 1
    return {"per_consumer": dict(per_consumer), "sum": total, "results": seen}


def fan_out(record: dict[str, int], ctx: StageContext) -> list[dict[str, int]]:
    """0, 1 or 2 records per input (n % 3 of them)."""
    return [{"num": record["num"], "part": i} for i in range(record["num"] % 3)]


_bloating: list[bool] = []  # per process: is this the incarnation that bloats?


def bloat_once(
    record: dict[str, int],
    ctx: StageContext,
    per_record: int = 100_000,
    limit: int = 300 * 2**20,
) -> dict[str, int] | None:
    """Hold ``per_record`` more bytes per record, in replica 0's first incarnation.

    The bytes are written (not calloc'ed zero pages), so they count in RSS;
    ``limit`` caps the growth in case nothing restarts the process.
    """
    if ctx.replica == 0:
        if not _bloating:
            marker = ctx.run_dir / f"bloated-{ctx.stage}"
            _bloating.append(not marker.exists())
            marker.touch()
        if _bloating[0] and len(_hoard) * per_record < limit:
            _hoard.append(b"x" * per_record)
    return keep_even(record, ctx)


def exit_at_once_saying(record: Any, ctx: StageContext) -> None:
    """Exit 1 on the first input, with a last word on stderr."""
    import sys

    print(f"{ctx.stage}.{ctx.replica}: cannot go on, giving up", file=sys.stderr)
    raise SystemExit(1)


def numbers_then_raise(
    ctx: StageContext, messages: int = 1000, fail_at: int = 500, rate: float = 0.0
) -> Iterator[dict[str, int]]:
    """Like ``numbers``, but the generator raises at ``fail_at``, every time."""
    for record in numbers(ctx, messages, rate):
        if record["num"] == fail_at:
            raise RuntimeError(f"source broke at {fail_at}")
        yield record


def chatty(
    record: dict[str, int], ctx: StageContext, delay: float = 0.0
) -> dict[str, int] | None:
    """``keep_even`` that writes a line to stderr for every input."""
    import sys

    print(f"handling {record['num']}", file=sys.stderr)
    return keep_even(record, ctx, delay)


_spinning: list[bool] = []  # per process: is this the incarnation that spins?


def spin_once(record: dict[str, int], ctx: StageContext) -> dict[str, int] | None:
    """``keep_even``; replica 0's first incarnation also starts burning CPU.

    The burning happens in a thread, in hashlib (which lets go of the GIL),
    so the stage itself stays responsive: only its CPU use is wrong.
    """
    if ctx.replica == 0 and not _spinning:
        marker = ctx.run_dir / f"spun-{ctx.stage}"
        _spinning.append(not marker.exists())
        marker.touch()
        if _spinning[0]:
            import threading

            threading.Thread(target=_burn, daemon=True).start()
    return keep_even(record, ctx)


def _burn() -> None:
    import hashlib

    block = bytes(2**20)
    while True:
        hashlib.sha256(block).digest()


def slow_count(
    records: Iterable[dict[str, Any]], ctx: StageContext, delay: float = 0.0001
) -> dict[str, Any]:
    """Like count, at most 1/delay records a second (also while replaying)."""

    def paced() -> Iterator[dict[str, Any]]:
        for record in records:
            time.sleep(delay)
            yield record

    return count(paced(), ctx)
