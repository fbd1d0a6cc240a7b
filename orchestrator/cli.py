"""The ``orchestrator`` command line.

This module is the one place that turns errors into messages and exit codes:

    0    the run completed and every input is accounted for
    1    the run failed (a stage failed, inputs were lost, timeout, mismatch)
    2    bad configuration or usage; nothing was started
    3    no daemon is running the pipeline (status, stop, scale, ...)
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from . import (
    __version__,
    config,
    control,
    daemon,
    display,
    report,
    rundir,
    smoke,
    stagefn,
    topology,
)
from . import logs as logfiles
from .errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
    NotRunning,
    OrchestratorError,
    OutputNotWritten,
    UsageError,
)
from .metrics import Metrics
from .replicastate import Replica
from .supervisor import Supervisor

# "\b" keeps click from re-flowing a paragraph: one example per line.
EXAMPLES = """
Examples:

\b
  orchestrator run                          # ./pipeline.toml, report at the end
  orchestrator run --json > report.json     # machine-readable report on stdout
  orchestrator run --set stages.producer.params.messages=1000000
  orchestrator check pipeline.toml          # validate and print the plan
  orchestrator run --timeout 120 --expect collected=10000 --junit smoke.xml

\b
  orchestrator up                           # in the background, once ready
  orchestrator status                       # exit 0 only if every stage is up
  orchestrator scale consumer=4             # live, without touching the rest
  orchestrator logs consumer -f
  orchestrator stop

Exit codes: 0 completed, 1 failed, 2 bad configuration or usage,
3 no daemon running, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM or stop).
"""

app = typer.Typer(
    help="Run ZeroMQ PUSH/PULL pipelines under supervision.\n" + EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("orchestrator")
err_console = Console(stderr=True)

PipelineArg = Annotated[
    Path, typer.Argument(help="The pipeline file.", show_default=True)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a value of the file for this run (dotted key, TOML "
        "value); repeatable.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings.")]
ExpectOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="FIELD=VALUE",
        help="Fail (exit 1) unless the report has this value, e.g. "
        "collected=10000 or lost<=0; repeatable.",
    ),
]
MetricsOption = Annotated[
    str | None,
    typer.Option(
        metavar="HOST:PORT",
        help="Serve Prometheus metrics there, e.g. 127.0.0.1:9464.",
    ),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        help="Fail the run (exit 1) if it has not finished after this many seconds."
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"orchestrator {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version."
        ),
    ] = None,
) -> None:
    """Run ZeroMQ PUSH/PULL pipelines under supervision."""


def load_pipeline(path: Path, overrides: list[str] | None) -> config.Pipeline:
    return config.load(path, tuple(overrides or ()), resolve=stagefn.check_calls)


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def _echo_output(replica: Replica, line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {replica.name} | {line}", file=sys.stderr, flush=True)


def print_error(message: str, *, soft_wrap: bool = False) -> None:
    """``error: MESSAGE`` on stderr, the message exactly as written.

    Messages quote the user's paths, endpoints and values; read as rich markup,
    ``[/y]`` in a path would crash the print and ``[bold]`` would vanish.
    """
    line = Text.assemble(("error:", "bold red"), " ", message)
    err_console.print(line, highlight=False, soft_wrap=soft_wrap)


def fail(exc: OrchestratorError) -> typer.Exit:
    print_error(str(exc), soft_wrap=True)
    return typer.Exit(exc.exit_code)


@app.command()
def check(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the plan, or the problems, as JSON."),
    ] = False,
) -> None:
    """Validate a pipeline file and print the plan; exit 2 if it is invalid."""
    try:
        loaded = load_pipeline(pipeline, set_)
    except OrchestratorError as exc:
        if not json_output:
            raise fail(exc) from exc
        print(json.dumps(error_json(exc)))
        raise typer.Exit(exc.exit_code) from exc
    if json_output:
        print(json.dumps(topology.plan(loaded)))
        return
    print("\n".join(topology.describe(loaded)))
    print("ok")


def error_json(exc: OrchestratorError) -> dict[str, Any]:
    """An error as JSON: a ConfigError's problems one by one, located."""
    if not isinstance(exc, ConfigError):
        return {"ok": False, "error": str(exc)}
    problems = [
        {"file": p.source, "line": p.line, "key": p.key, "message": p.message}
        for p in exc.problems
    ]
    return {"ok": False, "problems": problems}


@app.command()
def init(
    directory: Annotated[
        Path, typer.Argument(help="Where to write the new pipeline.")
    ] = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite files that exist.")
    ] = False,
) -> None:
    """Write a new pipeline (pipeline.toml and a stage module) that runs as it is."""
    from . import scaffold

    try:
        written = scaffold.init(directory, force)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    for path in written:
        print(f"wrote {path}")
    print(f"next: orchestrator run {directory / 'pipeline.toml'}")


@app.command()
def run(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
    timeout: TimeoutOption = None,
    quiet: QuietOption = False,
    expect: ExpectOption = None,
    report_file: Annotated[
        Path | None,
        typer.Option("--report", metavar="FILE", help="Also write the JSON report."),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Write a JUnit XML summary for CI."),
    ] = None,
    metrics: MetricsOption = None,
) -> None:
    """Run a pipeline in the foreground until it finishes; print the report.

    In a terminal a live display shows progress; piped, a plain line every few
    seconds; with --json, nothing but the report.
    """
    setup_logging(quiet or json_output)
    shown: list[display.LiveDisplay] = []

    def prepare(supervisor: Supervisor) -> None:
        if exporter is not None:
            exporter.attach(supervisor)
        if json_output or quiet:
            return
        if sys.stdout.isatty():
            live = display.LiveDisplay(supervisor, Console())
            live.start()
            shown.append(live)
        else:
            display.PlainProgress(supervisor, sys.stdout)

    try:
        check_timeout(timeout)
        expectations = smoke.parse(expect)
        for option, path in (("--report", report_file), ("--junit", junit)):
            if path is not None:
                check_writable(option, path)
        loaded = load_pipeline(pipeline, set_)
        exporter = Metrics(metrics) if metrics else None
        result = run_pipeline(loaded, timeout, prepare)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    finally:
        for live in shown:
            live.stop()

    mismatches = smoke.check(result, expectations)
    if expectations:
        result["expectations"] = {
            str(e): mismatches.get(str(e), "ok") for e in expectations
        }
    if json_output:
        print(json.dumps(result, default=str))
    else:
        report.render(result, Console())
    code = final_exit_code(result)
    try:
        write_outputs(report_file, junit, result, expectations, mismatches)
    except OrchestratorError as exc:
        print_error(str(exc), soft_wrap=True)
        code = code or exc.exit_code
    if result["status"] == "timeout":
        print_error(
            f"timeout: the run did not finish within {timeout:g} s; "
            "every stage was stopped"
        )
    for mismatch in mismatches.values():
        print_error(mismatch)
    raise typer.Exit(code or (EXIT_FAILED if mismatches else 0))


def check_timeout(timeout: float | None) -> None:
    # `not > 0` also refuses nan, a deadline no clock ever reaches.
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout {timeout:g}: must be above 0 seconds")


def check_writable(option: str, path: Path) -> None:
    """Refuse, before anything starts, an output file the run could not write."""
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{option} {path}: directory {directory} does not exist")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: directory {directory} is not writable")


def write_outputs(
    report_file: Path | None,
    junit: Path | None,
    result: dict[str, Any],
    expectations: list[smoke.Expectation],
    mismatches: dict[str, str],
) -> None:
    """The files asked for with --report and --junit.

    What the OS refuses at this point (a full disk, a directory removed during
    the run) becomes an error of the run, not a traceback.
    """
    if report_file is not None:
        with _writing("--report", report_file):
            daemon.write_report(report_file, result)
    if junit is not None:
        with _writing("--junit", junit):
            smoke.write_junit(junit, result, expectations, mismatches)


@contextlib.contextmanager
def _writing(option: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputNotWritten(option, str(path), exc.strerror or str(exc)) from exc


def run_pipeline(
    loaded: config.Pipeline,
    timeout: float | None,
    prepare: daemon.Prepare | None = None,
) -> dict[str, Any]:
    """Run ``loaded`` under this process's supervision and return its report."""
    directory = rundir.pipeline_dir(loaded)
    lock = rundir.Lock(directory, loaded.name)
    for note in daemon.acquire(lock, directory):
        log.warning("%s", note)
    try:
        return daemon.supervise(
            loaded, directory, timeout, on_output=_echo_output, prepare=prepare
        )
    finally:
        lock.release()


def final_exit_code(result: dict[str, Any]) -> int:
    if result["status"] == "interrupted":
        return EXIT_SIGTERM if result.get("signal") == signal.SIGTERM else EXIT_SIGINT
    return report.exit_code(result)


# -- the daemon and its control commands ---------------------------------------

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
def up(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
    timeout: TimeoutOption = None,
    quiet: QuietOption = False,
    metrics: MetricsOption = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach/--no-detach",
            help="Run in the background (default) or in the foreground with the "
            "control socket, e.g. under systemd.",
        ),
    ] = True,
) -> None:
    """Start a pipeline in the background; return once every stage is ready."""
    setup_logging(quiet or json_output)
    try:
        check_timeout(timeout)
        loaded = load_pipeline(pipeline, set_)
        exporter = Metrics(metrics) if metrics else None
        directory = rundir.pipeline_dir(loaded)
        lock = rundir.Lock(directory, loaded.name)
        for note in daemon.acquire(lock, directory):
            log.warning("%s", note)

        def prepare(supervisor: Supervisor) -> None:
            if exporter is not None:
                exporter.attach(supervisor)

        if not detach:
            try:
                result = daemon.supervise(
                    loaded, directory, timeout, on_output=_echo_output, prepare=prepare
                )
            finally:
                lock.release()
            report.render(result, Console())
            raise typer.Exit(final_exit_code(result))
        started = time.monotonic()
        answer = daemon.start(loaded, directory, lock, timeout, prepare)
    except OrchestratorError as exc:
        raise fail(exc) from exc

    info = {
        "pipeline": loaded.name,
        "supervisor_pid": answer["pid"],
        "replicas": sum(stage.replicas for stage in loaded.stages),
        "ready_s": round(time.monotonic() - started, 3),
        "runtime_dir": str(directory),
    }
    if answer.get("completed"):
        info["completed"] = True
    if json_output:
        print(json.dumps(info))
        return
    if answer.get("completed"):
        print(f"pipeline {loaded.name} ran to completion already: `orchestrator wait`")
    else:
        print(
            f"pipeline {loaded.name} is up: {info['replicas']} replicas ready in "
            f"{info['ready_s']:.2f} s, supervisor pid {info['supervisor_pid']}"
        )
    print(f"runtime directory: {directory}")


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before the supervisor took over the signal
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["EXIT_USAGE", "app", "main"]
