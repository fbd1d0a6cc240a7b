"""Shared fixtures: a private runtime home, pipeline files on ipc endpoints,
and a way to run the real CLI in a real process.

Endpoints are ipc:// files under a fresh temporary directory, so no test can
collide with a pipeline (or another test) running on the same machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


@dataclass
class Workspace:
    """A directory holding pipeline files, their ipc endpoints and a runtime home."""

    path: Path
    env: dict[str, str]

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.path}/{name}.sock"

    def write(self, text: str, name: str = "pipeline.toml") -> Path:
        target = self.path / name
        target.write_text(text)
        return target

    def classic(
        self,
        messages: int = 20_000,
        replicas: int = 2,
        *,
        worker: str = "teststages:keep_even",
        worker_params: str = "",
        worker_extra: str = "",
        pipeline_extra: str = "",
        name: str = "t",
    ) -> Path:
        """The classic three-stage pipeline, on private endpoints."""
        params = f"params = {{ {worker_params} }}" if worker_params else ""
        return self.write(f"""
[pipeline]
name = "{name}"
{pipeline_extra}

[stages.producer]
call = "teststages:numbers"
push = {{ bind = "{self.endpoint("work")}" }}
params = {{ messages = {messages} }}

[stages.consumer]
call = "{worker}"
replicas = {replicas}
pull = {{ connect = "{self.endpoint("work")}" }}
push = {{ connect = "{self.endpoint("results")}" }}
{params}
{worker_extra}

[stages.collector]
call = "teststages:count"
pull = {{ bind = "{self.endpoint("results")}" }}
""")

    def cli(
        self, *args: str, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``orchestrator ARGS`` to completion in a real process."""
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}\n{result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=self.path,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_json(self, *args: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        result = self.cli("run", "--json", *args, timeout=timeout)
        try:
            return result.returncode, json.loads(result.stdout)
        except ValueError as exc:
            raise AssertionError(
                f"no JSON report (exit {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            ) from exc


@pytest.fixture
def ws() -> Iterator[Workspace]:
    # A short path: ipc:// endpoints must fit in a Unix socket address.
    path = Path(tempfile.mkdtemp(prefix="orch-"))
    shutil.copy(HERE / "teststages.py", path / "teststages.py")
    env = dict(os.environ)
    env["ORCHESTRATOR_HOME"] = str(path / "home")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    env.pop("COLUMNS", None)
    yield Workspace(path, env)
    shutil.rmtree(path, ignore_errors=True)


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def stage_processes(supervisor_pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(supervisor_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def orchestrator_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose title or command line mentions ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
