"""The ``orchestrator`` command line.

This module is the one place that turns errors into messages and exit codes:

    0    the run completed and every input is accounted for
    1    the run failed (a stage failed, inputs were lost, timeout, mismatch)
    2    bad configuration or usage; nothing was started
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__, config, report, rundir, stagefn, topology
from .errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, OrchestratorError
from .supervisor import Replica, Supervisor

EXAMPLES = """
Examples:

  orchestrator run                          # ./pipeline.toml, report at the end
  orchestrator run --json > report.json     # machine-readable report on stdout
  orchestrator run --set stages.producer.params.messages=1000000
  orchestrator check pipeline.toml          # validate and print the plan

Exit codes: 0 completed, 1 failed, 2 bad configuration or usage,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
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


def fail(exc: OrchestratorError) -> typer.Exit:
    err_console.print(
        f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True
    )
    return typer.Exit(exc.exit_code)


@app.command()
def check(
    pipeline: PipelineArg = Path("pipeline.toml"), set_: SetOption = None
) -> None:
    """Validate a pipeline file and print the plan; exit 2 if it is invalid."""
    try:
        loaded = load_pipeline(pipeline, set_)
    except OrchestratorError as exc:
        raise fail(exc) from exc
    print("\n".join(topology.describe(loaded)))
    print("ok")


@app.command()
def run(
    pipeline: PipelineArg = Path("pipeline.toml"),
    set_: SetOption = None,
    json_output: JsonOption = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Fail the run (exit 1) if it has not finished after this many seconds."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run a pipeline in the foreground until it finishes; print the report."""
    setup_logging(quiet or json_output)
    try:
        loaded = load_pipeline(pipeline, set_)
        result = run_pipeline(loaded, timeout)
    except OrchestratorError as exc:
        raise fail(exc) from exc

    if json_output:
        print(json.dumps(result, default=str))
    else:
        report.render(result, Console())
    raise typer.Exit(final_exit_code(result))


def run_pipeline(loaded: config.Pipeline, timeout: float | None) -> dict[str, Any]:
    """Run ``loaded`` under this process's supervision and return its report."""
    directory = rundir.pipeline_dir(loaded)
    lock = rundir.Lock(directory, loaded.name)
    lock.acquire()
    try:
        supervisor = Supervisor(
            loaded,
            rundir.fresh_run_dir(directory),
            directory / "logs",
            on_output=_echo_output,
        )
        supervisor.run(timeout)
        result = report.build(supervisor)
        result["signal"] = supervisor.signal_received
        (directory / "report.json").write_text(json.dumps(result, default=str))
        return result
    finally:
        lock.release()


def final_exit_code(result: dict[str, Any]) -> int:
    if result["status"] == "interrupted":
        return EXIT_SIGTERM if result.get("signal") == signal.SIGTERM else EXIT_SIGINT
    return report.exit_code(result)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before the supervisor took over the signal
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["EXIT_USAGE", "app", "main"]
