"""The run's report: a JSON-ready dict, and the table people read.

The table puts each replica's inputs next to its results on purpose: with
strict round-robin over an even number of workers every even number can go
to the same worker, so balanced inputs can sit beside lopsided results.  We
show both rather than bend the data to look even.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .supervisor import Supervisor

STATUS_EXIT = {"completed": 0, "failed": 1, "timeout": 1}
# Every top-level field of a finished run's report (build()'s, then those
# daemon.supervise adds), by kind, so that `--expect` can refuse one the
# report cannot have before the run starts.  A "map" is one a dotted key
# (per_consumer.0, summary.words) reaches into; a "number" is always one.
FIELDS = {
    **dict.fromkeys(
        (
            "produced",
            "collected",
            "counted_inputs",
            "lost",
            "redelivered",
            "duplicates_dropped",
            "quarantined",
            "restarts",
            "duration_s",
            "throughput",
            "supervisor_pid",
        ),
        "number",
    ),
    **dict.fromkeys(("per_consumer", "summary", "failed_stage"), "map"),
    **dict.fromkeys(
        (
            "pipeline",
            "status",
            "failure",
            "delivery",
            "workers",
            "ready_s",
            "signal",
            "finished_at",
            "retired",
            "stopped_by",
        ),
        "value",
    ),
}


def build(sup: Supervisor) -> dict[str, Any]:
    end = sup.finished_at or sup.clock()
    duration = max(end - sup.started_at, 1e-9)
    sink = sup.sinks[0] if sup.sinks else None
    per_via: dict[str, int] = {}
    for replica in sup.sinks:
        for via, count in dict(replica.total("per_via") or {}).items():
            per_via[via] = per_via.get(via, 0) + count

    workers = [_replica_entry(r, per_via) for r in sup.replicas]
    for entry, replica in zip(workers, sup.replicas, strict=True):
        entry["node"] = sup.launcher.node(replica.last_pid)  # None when local
    summary = sink.summary if sink is not None else None
    per_consumer: Any = per_via
    if isinstance(summary, dict) and isinstance(summary.get("per_consumer"), dict):
        per_consumer = {str(k): v for k, v in sorted(summary["per_consumer"].items())}

    produced = sup.produced()
    collected = sum(int(r.total("results")) for r in sup.sinks)
    report: dict[str, Any] = {
        "pipeline": sup.pipeline.name,
        "status": sup.status,
        "failure": sup.failure,
        "delivery": sup.pipeline.delivery,
        "produced": produced,
        "collected": collected,
        "counted_inputs": sup.counted(),
        "per_consumer": per_consumer,
        "lost": sup.lost(),
        "redelivered": sum(int(r.total("redelivered")) for r in sup.sources),
        "duplicates_dropped": sum(int(r.total("duplicates")) for r in sup.sinks),
        "quarantined": sup.quarantined(),
        "restarts": sup.retired_restarts + sum(len(r.restarts) for r in sup.replicas),
        "workers": workers,
        "summary": summary,
        "duration_s": round(duration, 4),
        "ready_s": None
        if sup.ready_at is None
        else round(sup.ready_at - sup.started_at, 4),
        "throughput": round(produced / duration, 1),
    }
    if sup.failed_replica is not None:
        failed = sup.failed_replica
        report["failed_stage"] = {
            "stage": failed.stage.name,
            "replica": failed.index,
            "exit": failed.exit,
            "traceback": (failed.error or {}).get("traceback"),
            "tail": list(failed.tail),
        }
    return report


def _replica_entry(replica: Any, per_via: dict[str, int]) -> dict[str, Any]:
    role = replica.stage.role
    received = {
        "source": 0,
        "worker": replica.total("received"),
        "sink": replica.total("results"),
    }[role]
    emitted = (
        replica.total("produced")
        if role == "source"
        else (replica.total("emitted") if role == "worker" else 0)
    )
    return {
        "stage": replica.stage.name,
        "replica": replica.index,
        "role": role,
        "pid": replica.last_pid,
        "state": replica.state,
        "received": int(received),
        "emitted": int(emitted),
        "counted": per_via.get(replica.name, 0),
        "restarts": len(replica.restarts),
        "restart_reasons": [r["reason"] for r in replica.restarts],
        "exit": replica.exit,
        "error": (replica.error or {}).get("message"),
        # The last health sample (RSS, CPU %, fds, threads) of its last process.
        "stats": dict(replica.stats),
    }


def exit_code(report: dict[str, Any]) -> int:
    return STATUS_EXIT.get(report["status"], 1)


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"pipeline {report['pipeline']}: {report['status']}", title_justify="left"
    )
    for column in (
        "replica",
        "pid",
        "received",
        "emitted",
        "counted",
        "restarts",
        "exit",
    ):
        table.add_column(
            column, justify="left" if column in ("replica", "exit") else "right"
        )
    for w in report["workers"]:
        received = "-" if w["role"] == "source" else str(w["received"])
        emitted = "-" if w["role"] == "sink" else str(w["emitted"])
        counted = str(w["counted"]) if w["role"] == "worker" else "-"
        reasons = ", ".join(w["restart_reasons"])
        restarts = f"{w['restarts']} ({reasons})" if w["restarts"] else "0"
        table.add_row(
            f"{w['stage']}.{w['replica']}",
            str(w["pid"] or "-"),
            received,
            emitted,
            counted,
            restarts,
            w["exit"] or "",
        )
    workers = [w for w in report["workers"] if w["role"] == "worker"]
    if workers:
        table.add_section()
        table.add_row(
            "workers total",
            "",
            str(sum(w["received"] for w in workers)),
            str(sum(w["emitted"] for w in workers)),
            str(sum(w["counted"] for w in workers)),
            "",
            "",
        )
    console.print(table)
    console.print(
        f"produced {report['produced']}  collected {report['collected']}  "
        f"lost {report['lost']}  quarantined {report['quarantined']}"
    )
    console.print(
        f"redelivered {report['redelivered']}  "
        f"duplicates dropped {report['duplicates_dropped']}  "
        f"restarts {report['restarts']}"
    )
    console.print(  # per_consumer's keys come from the sink's summary
        f"per consumer {report['per_consumer']}  "
        f"duration {report['duration_s']:.3f} s  "
        f"throughput {report['throughput']:,.0f} inputs/s",
        markup=False,
    )
    if report.get("failure"):
        # The failure quotes stage output and user values: never markup.
        console.print(
            Text.assemble(
                (f"{report['status']}:", "bold red"), " ", str(report["failure"])
            )
        )
    failed = report.get("failed_stage")
    if failed and (failed.get("traceback") or failed.get("tail")):
        console.print("last output of the failed stage:")
        console.print(
            failed.get("traceback") or "\n".join(failed["tail"]),
            markup=False,
            highlight=False,
        )
