"""What people watch: the live display of `run`, its plain-text twin, and the
`status` table.

The live display is driven from a supervisor hook, in the supervisor's one
thread, at most :data:`REFRESH_S` apart: rich's own refresh thread is not
used, because the supervisor forks stages at any moment and a thread that
holds the console's lock across a fork is a thread too many.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .control import expected_total
from .supervisor import Supervisor

# 4 Hz: smooth enough to read a rate, cheap next to the supervision loop.
REFRESH_S = 0.25
# Piped output gets one line this often (and one when the stages are ready).
PLAIN_EVERY_S = 2.0
# Rates are measured over this much time, so one slow turn does not show.
RATE_WINDOW_S = 2.0


class Progress:
    """Counts of a live run, and the rate at which inputs are accounted for."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.total = expected_total(supervisor)
        self._marks: list[tuple[float, int]] = []

    def snapshot(self) -> dict[str, Any]:
        sup = self.supervisor
        counted = sup.counted()
        now = time.monotonic()
        self._marks.append((now, counted))
        while len(self._marks) > 2 and now - self._marks[1][0] > RATE_WINDOW_S:
            self._marks.pop(0)
        then, before = self._marks[0]
        rate = (counted - before) / (now - then) if now > then else 0.0
        eta = None
        if self.total is not None and rate > 0:
            eta = max(0.0, (self.total - counted) / rate)
        processed = sum(
            int(r.total("received") or 0)
            for r in sup.replicas
            if r.stage.role == "worker"
        )
        return {
            "status": sup.status,
            "produced": sup.produced(),
            "processed": processed,
            "collected": sum(int(r.total("results") or 0) for r in sup.sinks),
            "counted": counted,
            "total": self.total,
            "rate": rate,
            "eta": eta,
            "elapsed": (sup.clock() - sup.started_at) if sup.started_at else 0.0,
            "stages": stage_states(sup),
        }


def stage_states(sup: Supervisor) -> list[tuple[str, str]]:
    """Each stage with a summary of its replicas' states: ``2/2 ready``."""
    rows = []
    for stage in sup.pipeline.stages:
        replicas = [r for r in sup.replicas if r.stage is stage]
        states: dict[str, int] = {}
        for replica in replicas:
            states[replica.state] = states.get(replica.state, 0) + 1
        ready = states.pop("ready", 0)
        text = f"{ready}/{len(replicas)} ready"
        if states:
            text += (
                " (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"
            )
        rows.append((stage.name, text))
    return rows


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plain_line(snap: dict[str, Any]) -> str:
    of = f"/{snap['total']}" if snap["total"] else ""
    stages = ", ".join(f"{name} {text}" for name, text in snap["stages"])
    return (
        f"{time.strftime('%H:%M:%S')} {snap['status']}: produced {snap['produced']}"
        f"{of} processed {snap['processed']} collected {snap['collected']} "
        f"rate {snap['rate']:,.0f}/s eta {_eta(snap['eta'])} | {stages}"
    )


def live_view(snap: dict[str, Any], pipeline: str) -> Group:
    of = f" of {snap['total']:,}" if snap["total"] else ""
    head = Text.assemble(
        (f"pipeline {pipeline}: ", "bold"),
        (snap["status"], "green" if snap["status"] == "running" else "yellow"),
        f"   {snap['elapsed']:.1f} s",
    )
    counts = Text(
        f"produced {snap['produced']:,}{of}   processed {snap['processed']:,}   "
        f"collected {snap['collected']:,}   rate {snap['rate']:,.0f} inputs/s   "
        f"ETA {_eta(snap['eta'])}"
    )
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("stage")
    table.add_column("replicas")
    for name, text in snap["stages"]:
        style = "green" if text.split("/")[0] == text.split("/")[1].split()[0] else ""
        table.add_row(name, Text(text, style=style))
    return Group(head, counts, table)


class LiveDisplay:
    """The terminal display of a foreground run."""

    def __init__(self, supervisor: Supervisor, console: Console) -> None:
        self.progress = Progress(supervisor)
        self.name = supervisor.pipeline.name
        self.console = console
        self.live = Live(
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._next = 0.0
        self._moved: list[tuple[logging.StreamHandler[Any], Any]] = []
        supervisor.hooks.append(self.tick)

    def start(self) -> None:
        self.live.start()
        # Log lines must go through rich's proxy to print above the display.
        for handler in logging.getLogger().handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and handler.stream is sys.__stderr__
            ):
                self._moved.append((handler, handler.stream))
                handler.setStream(sys.stderr)

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + REFRESH_S
        self.live.update(live_view(self.progress.snapshot(), self.name), refresh=True)

    def stop(self) -> None:
        for handler, stream in self._moved:
            handler.setStream(stream)
        self.live.stop()


class PlainProgress:
    """One line of progress now and then, for output that is not a terminal."""

    def __init__(self, supervisor: Supervisor, stream: TextIO) -> None:
        self.progress = Progress(supervisor)
        self.stream = stream
        self._next: float | None = None
        supervisor.hooks.append(self.tick)

    def tick(self) -> None:
        now = time.monotonic()
        if self.progress.supervisor.status != "running":
            return
        if self._next is not None and now < self._next:
            return
        self._next = now + PLAIN_EVERY_S
        print(plain_line(self.progress.snapshot()), file=self.stream, flush=True)


# -- `orchestrator status` -------------------------------------------------------


def _size(value: Any) -> str:
    if not value:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}"
        value /= 1024
    return "-"  # pragma: no cover


def _count(value: float) -> str:
    """Short enough for a narrow column: 950, 12.3k, 4.1M."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size * 10:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def render_status(result: dict[str, Any], console: Console) -> None:
    title = (
        f"pipeline {result['pipeline']}: {result['status']} "
        f"(supervisor pid {result.get('supervisor_pid', '-')})"
    )
    # Borderless and tight, so that eleven columns fit in a terminal.
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = "replica state pid uptime restarts exit rss cpu inputs outputs rate"
    for column in columns.split():
        table.add_column(
            column, justify="left" if column in ("replica", "state") else "right"
        )
    for w in result["workers"]:
        state_style = "green" if w["state"] == "ready" else "bold red"
        uptime = w.get("uptime_s")
        cpu = w.get("cpu_percent")
        table.add_row(
            f"{w['stage']}.{w['replica']}",
            Text(w["state"], style=state_style),
            str(w["pid"] or "-"),
            "-" if uptime is None else f"{uptime:.0f}s",
            str(w["restarts"]),
            w.get("last_exit") or "-",
            _size(w.get("rss")),
            "-" if cpu is None else f"{cpu:.0f}%",
            "-" if w["role"] == "source" else _count(w["received"]),
            "-" if w["role"] == "sink" else _count(w["emitted"]),
            f"{_count(w.get('rate') or 0)}/s",
        )
    console.print(table)
    total = result.get("total")
    # While the run goes on, what is produced but not yet counted is on its way.
    lost_label = "in flight" if result["status"] == "running" else "lost"
    progress = f"produced {result['produced']}"
    if total:
        done = 100 * result["counted_inputs"] / total
        progress += f" of {total}  counted {result['counted_inputs']} ({done:.0f}%)"
    console.print(
        f"{progress}  "
        f"collected {result['collected']}  {lost_label} {result['lost']}  "
        f"restarts {result['restarts']}  "
        f"rate {result.get('rates', {}).get('counted', 0):,.0f} inputs/s",
        highlight=False,
    )
    if result.get("failure"):
        # The failure quotes stage output and user values: never markup.
        console.print(
            Text.assemble(
                (f"{result['status']}:", "bold red"), " ", str(result["failure"])
            )
        )
