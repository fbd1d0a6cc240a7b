"""The commands for a pipeline that runs as a daemon (``orchestrator up``).

``status``, ``scale``, ``restart``, ``stop`` and ``wait`` talk to the daemon
over its control socket (``control.ControlClient``); ``logs`` reads the
replicas' log files.  They are registered on the one ``app`` of ``cli.py``,
whose ``fail`` turns their errors into messages and exit codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import config, control, display, report, rundir, topology
from . import logs as logfiles
from .cli import (
    JsonOption,
    PipelineArg,
    SetOption,
    app,
    err_console,
    fail,
    final_exit_code,
    print_error,
)
from .errors import EXIT_FAILED, NotRunning, OrchestratorError, UsageError

PipelineOption = Annotated[
    Path,
    typer.Option("--pipeline", "-p", help="The pipeline file.", show_default=True),
]
# How often scale and restart look whether their replicas are ready yet.
CONTROL_POLL_S = 0.05


def _locate(
    pipeline: Path, overrides: list[str] | None
) -> tuple[config.Pipeline, Path]:
    """The pipeline and its runtime directory (stage calls are not imported)."""
    loaded = config.load(pipeline, tuple(overrides or ()))
    return loaded, rundir.pipeline_dir(loaded)


def _client(loaded: config.Pipeline, directory: Path) -> control.ControlClient:
    return control.ControlClient(directory / "control.sock", loaded.name)


@app.command()
def status(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show every replica; exit 0 only if every stage is up (3: no daemon)."""
    try:
        loaded, directory = _locate(pipeline, set_)
        with _client(loaded, directory) as client:
            result = client.request({"cmd": "status"})["report"]
    except NotRunning as exc:
        last = directory / "report.json"
        last_run = json.loads(last.read_text()) if last.exists() else None
        if json_output:
            print(
                json.dumps(
                    {
                        "pipeline": loaded.name,
                        "status": "not running",
                        "last_run": last_run,
                    }
                )
            )
        if last_run is not None and not json_output:
            err_console.print(
                f"last run: {last_run['status']} (report: {last})",
                markup=False,
                highlight=False,
            )
        raise fail(exc) from exc
    except OrchestratorError as exc:
        raise fail(exc) from exc

    if json_output:
        print(json.dumps(result, default=str))
    else:
        # Piped, rich would assume 80 columns and cut the table's cells.
        width = None if sys.stdout.isatty() else 120
        display.render_status(result, Console(width=width))
    raise typer.Exit(0 if control.all_up(result) else EXIT_FAILED)


@app.command()
def logs(
    which: Annotated[
        str | None,
        typer.Argument(metavar="[STAGE[.N]]", help="One stage, or one replica."),
    ] = None,
    pipeline: PipelineOption = Path("pipeline.toml"),
    set_: SetOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[
        int | None, typer.Option("--lines", "-n", help="Only the last N lines.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per line.")
    ] = False,
) -> None:
    """The replicas' output, merged in time order: `time stage.N | line`."""
    try:
        loaded, directory = _locate(pipeline, set_)
        files = logfiles.check_selection(directory / "logs", which)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    console = Console(highlight=False, soft_wrap=True)
    names = sorted({f.stem for f in logfiles.select(directory / "logs", None)})
    palette = ["cyan", "magenta", "green", "yellow", "blue", "red"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}

    def emit(line: logfiles.Line) -> None:
        if json_output:
            record = {"time": line.stamp, "replica": line.name, "line": line.text}
            print(json.dumps(record), file=console.file)
        else:
            colour = colours.get(line.name, "white")
            console.print(
                f"[dim]{line.time}[/] [{colour}]{line.name}[/] | ", end="", markup=True
            )
            console.print(line.text, markup=False)
        if follow:  # a reader at the other end of a pipe sees it now
            console.file.flush()

    for line in logfiles.read(files, lines):
        emit(line)
    if follow:
        try:
            logfiles.follow(directory / "logs", which, emit)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


def _parse_scale(assignment: str) -> tuple[str, int]:
    stage, sep, count = assignment.partition("=")
    if not sep or not stage or not count.isdigit():
        raise UsageError(f"scale {assignment!r}: expected STAGE=N with N >= 1")
    if not 1 <= int(count) <= config.MAX_REPLICAS:
        raise UsageError(
            f"scale {assignment!r}: N must be from 1 to {config.MAX_REPLICAS}"
        )
    return stage, int(count)


def _poll_status(
    client: control.ControlClient,
    done: Any,
    budget: float,
) -> dict[str, Any] | None:
    """Ask for the status until ``done(status)``; None after ``budget`` s."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        result = client.request({"cmd": "status"})["report"]
        if done(result):
            return dict(result)
        time.sleep(CONTROL_POLL_S)
    return None


@app.command()
def scale(
    assignment: Annotated[str, typer.Argument(metavar="STAGE=N")],
    pipeline: PipelineOption = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change a worker stage's replica count live; return once they are ready."""
    try:
        stage, count = _parse_scale(assignment)
        loaded, directory = _locate(pipeline, set_)
        with _client(loaded, directory) as client:
            answer = client.request({"cmd": "scale", "stage": stage, "replicas": count})

            def settled(result: dict[str, Any]) -> bool:
                mine = [w for w in result["workers"] if w["stage"] == stage]
                return len(mine) == count and all(w["state"] == "ready" for w in mine)

            budget = loaded.ready_timeout + loaded.grace_period + 5
            result = _poll_status(client, settled, budget)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    summary = {
        "stage": stage,
        "before": answer["before"],
        "after": count,
        "settled": result is not None,
    }
    if json_output:
        print(json.dumps(summary))
    elif result is None:
        print_error(
            f"{stage}: asked for {count} replicas, not all "
            f"ready after {budget:g} s; see `orchestrator status`"
        )
    else:
        pids = [w["pid"] for w in result["workers"] if w["stage"] == stage]
        print(
            f"{stage}: {answer['before']} -> {count} replicas, all ready "
            f"(pids {', '.join(map(str, pids))})"
        )
    raise typer.Exit(0 if result is not None else EXIT_FAILED)


@app.command()
def restart(
    target: Annotated[str, typer.Argument(metavar="STAGE[.N]")],
    pipeline: PipelineOption = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Restart a stage's replicas (or one), gracefully; return once ready."""
    stage, _, index = target.partition(".")
    try:
        if index and not index.isdigit():
            raise UsageError(f"restart {target!r}: expected STAGE or STAGE.N")
        loaded, directory = _locate(pipeline, set_)
        with _client(loaded, directory) as client:
            answer = client.request(
                {
                    "cmd": "restart",
                    "stage": stage,
                    "replica": int(index) if index else None,
                }
            )
            old = answer["replicas"]

            def restarted(result: dict[str, Any]) -> bool:
                now = {f"{w['stage']}.{w['replica']}": w for w in result["workers"]}
                return all(
                    name in now
                    and now[name]["pid"] not in (None, pid)
                    and now[name]["state"] == "ready"
                    for name, pid in old.items()
                )

            budget = loaded.ready_timeout + loaded.grace_period + 5
            result = _poll_status(client, restarted, budget)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    if result is None:
        print_error(
            f"{target}: not ready again after {budget:g} s; see `orchestrator status`"
        )
        raise typer.Exit(EXIT_FAILED)
    if json_output:
        now = {f"{w['stage']}.{w['replica']}": w["pid"] for w in result["workers"]}
        print(
            json.dumps({n: {"old_pid": pid, "pid": now[n]} for n, pid in old.items()})
        )
    else:
        print(f"restarted {', '.join(old)}")


@app.command()
def stop(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Grace period per stage group before SIGKILL "
            "(default: the pipeline's grace_period)."
        ),
    ] = None,
) -> None:
    """Stop the daemon gracefully (sources first), then kill what lingers."""
    try:
        loaded, directory = _locate(pipeline, set_)
        with _client(loaded, directory) as client:
            pid = client.request({"cmd": "stop", "timeout": timeout})["pid"]
            client.send({"cmd": "wait"})
            grace = loaded.grace_period if timeout is None else timeout
            budget = grace * len(topology.start_order(loaded)) + 5
            try:
                final = client.receive(timeout=budget)
            except TimeoutError:
                final = None
    except OrchestratorError as exc:
        raise fail(exc) from exc
    if final is None:
        # It did not stop in time: the stages die with it (PR_SET_PDEATHSIG).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        err_console.print(
            f"supervisor pid {pid} did not stop within {budget:g} s: killed it",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    result = final["report"]
    if json_output:
        print(json.dumps(result, default=str))
    else:
        print(
            f"stopped pipeline {loaded.name} (supervisor pid {pid}): "
            f"produced {result['produced']}, collected {result['collected']}"
        )


@app.command()
def wait(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
    timeout: Annotated[
        float | None, typer.Option(help="Give up (exit 1) after this many seconds.")
    ] = None,
) -> None:
    """Block until the run finishes; exit with the run's exit code.

    With no daemon running, report the last run (like `docker wait` on a
    container that has exited), or exit 3 if there was none.
    """
    try:
        loaded, directory = _locate(pipeline, set_)
        last = directory / "report.json"
        if not (directory / "control.sock").exists() and last.exists():
            result = json.loads(last.read_text())
            err_console.print(
                f"no daemon running; the last run ended at "
                f"{result.get('finished_at', '?')}: {result['status']}",
                markup=False,
                highlight=False,
            )
            _print_final(result, json_output)
            raise typer.Exit(final_exit_code(result))
        with _client(loaded, directory) as client:
            pid = client.request({"cmd": "status"})["report"]["supervisor_pid"]
            client.send({"cmd": "wait"})
            try:
                final = client.receive(timeout=timeout)
            except TimeoutError:
                print_error(f"still running after {timeout:g} s")
                raise typer.Exit(EXIT_FAILED) from None
    except OrchestratorError as exc:
        raise fail(exc) from exc
    if final is not None:
        result = final["report"]
    else:  # it hung up without a word: killed, or it ended as we asked
        result = json.loads(last.read_text()) if last.exists() else {}
        if result.get("supervisor_pid") != pid:
            print_error(f"supervisor pid {pid} ended without a report (killed?)")
            raise typer.Exit(EXIT_FAILED)
    _print_final(result, json_output)
    raise typer.Exit(final_exit_code(result))


def _print_final(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print(json.dumps(result, default=str))
    else:
        report.render(result, Console())
