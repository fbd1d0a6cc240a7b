"""Batching must not cost latency: a trickle of records is not held back.

The runtime packs records into frames of ``pipeline.batch``; a source that
yields slowly must still see each record reach the sink within a few flush
intervals, not when a frame fills up (which, here, would be never: the
source's last record would carry the whole stream's wait).
"""

from __future__ import annotations

from tests.conftest import Workspace

STAGES = """
import time


def trickle(ctx, count, gap):
    for num in range(count):
        time.sleep(gap)
        yield {"num": num, "sent": time.time()}


def same(record, ctx):
    return record


def latencies(records, ctx):
    waits = [time.time() - record["sent"] for record in records]
    return {"count": len(waits), "max": max(waits), "waits": waits}
"""


def test_a_slow_source_gets_each_record_to_the_sink_without_waiting_for_a_batch(
    ws: Workspace,
) -> None:
    ws.write(STAGES, "trickle.py")
    # 30 records, one per 50 ms: a runtime that waited for a full frame (1000
    # records) would hold the first one back for the whole 1.5 s stream.
    path = ws.write(f"""
[pipeline]
name = "trickle"

[stages.source]
call = "trickle:trickle"
params = {{ count = 30, gap = 0.05 }}
push = {{ bind = "{ws.endpoint("work")}" }}

[stages.worker]
call = "trickle:same"
pull = {{ connect = "{ws.endpoint("work")}" }}
push = {{ connect = "{ws.endpoint("results")}" }}

[stages.sink]
call = "trickle:latencies"
pull = {{ bind = "{ws.endpoint("results")}" }}
""")

    code, report = ws.run_json(str(path), timeout=60)

    assert code == 0, report
    summary = report["summary"]
    assert summary["count"] == 30
    # Generous on purpose (a loaded machine may stall a process for a while);
    # waiting for a batch would take about 1.5 s.
    assert summary["max"] < 0.5, summary["waits"]
