"""The classic ZeroMQ pipeline: numbers out, even numbers kept, counted per consumer."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from orchestrator import StageContext


def produce(
    ctx: StageContext, messages: int = 20_000, rate: float = 0.0
) -> Iterator[dict[str, int]]:
    """Yield ``{"num": n}`` for n = 0 .. messages-1; ``messages = 0`` never ends.

    With ``rate`` (messages per second) the stream is paced to that rate,
    which makes an endless pipeline something one can watch and scale.  A
    restarted producer starts after what was delivered (``ctx.resume``)
    instead of making, and waiting for, the delivered numbers again.
    """
    if messages < 0 or rate < 0:  # checked now, not when the stream is read
        raise ValueError(
            f"messages must be 0 (endless) or more and rate 0 (unpaced) or "
            f"more; got messages={messages}, rate={rate}"
        )
    return _numbers(ctx.resume(), messages, rate)


def _numbers(start: int, messages: int, rate: float) -> Iterator[dict[str, int]]:
    numbers = itertools.count(start) if messages == 0 else range(start, messages)
    started = time.monotonic()
    for num in numbers:
        if rate:
            ahead = started + (num - start) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        yield {"num": num}


def keep_even(record: dict[str, int], ctx: StageContext) -> dict[str, int] | None:
    """Pass the even numbers on, stamped with the replica that handled them."""
    num = record["num"]
    if num % 2 == 0:
        return {"consumer": ctx.replica, "num": num}
    return None


def collect(records: Iterable[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
    """Count the results per consumer; the sum lets a test check each number once."""
    per_consumer: Counter[int] = Counter()
    total = 0
    for record in records:
        per_consumer[record["consumer"]] += 1
        total += record["num"]
    return {"per_consumer": dict(per_consumer), "sum": total}
