"""The ``orchestrator`` command line.

This module, with the daemon's commands in ``controlcli.py`` registered on
its ``app``, is the one place that turns errors into messages and exit codes:

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
    daemon,
    display,
    report,
    rundir,
    smoke,
    stagefn,
    topology,
)
from .errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
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


# -- the daemon ---------------------------------------------------------------


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


# The commands for a running daemon register themselves on ``app`` here, after
# `up`, so that `--help` lists them in this order.
from . import controlcli  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before the supervisor took over the signal
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["EXIT_USAGE", "app", "main"]
