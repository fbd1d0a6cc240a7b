"""What the benchmark scripts share: endpoints, child processes, RSS sampling.

Every variant runs in fresh processes started from here, so that one
variant's imports, heap or sockets cannot help or hurt the next.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# How often the stage processes' memory is sampled.  Peaks between two
# samples are missed; 20 ms is well under the life of a frame at 1M records.
SAMPLE_S = 0.02
# A variant that takes longer than this has hung; the run fails loudly.
VARIANT_TIMEOUT_S = 600.0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Endpoints:
    """Fresh endpoints for each variant: tcp on free loopback ports, or ipc."""

    def __init__(self, transport: str, directory: Path) -> None:
        self.transport = transport
        self.directory = directory
        self.count = 0

    def new(self) -> str:
        self.count += 1
        if self.transport == "ipc":
            return f"ipc://{self.directory}/e{self.count}.sock"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return f"tcp://127.0.0.1:{port}"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    return env


def run_json(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a benchmark script that prints one JSON line; return that line."""
    result = subprocess.run(
        [sys.executable, *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=VARIANT_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{result.stderr}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@dataclass
class PeakRss:
    """Peak resident memory per kind of process, sampled in a thread."""

    root: int
    kinds: dict[str, str]  # stage name -> kind (source, worker, sink)
    peaks: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def kind_of(self, proc: psutil.Process) -> str | None:
        if proc.pid == self.root:
            return "supervisor"
        title = " ".join(proc.cmdline())
        if not title.startswith("orchestrator: "):
            return None
        replica = title.split()[-1]  # "consumer.0"
        return self.kinds.get(replica.rsplit(".", 1)[0])

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                kind = self.kind_of(proc)
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            if kind is not None:
                self.peaks[kind] = max(self.peaks.get(kind, 0), rss)

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.sample()


@contextmanager
def sampling(pid: int, kinds: dict[str, str]) -> Iterator[PeakRss]:
    peak = PeakRss(pid, kinds)
    thread = threading.Thread(target=peak.run, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        peak.stop.set()
        thread.join()


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float) -> None:
    """Read ``proc``'s stdout until a line contains ``text``."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited before saying {text!r}")
    raise RuntimeError(f"process {proc.pid} did not say {text!r} in {timeout} s")


def stop(proc: subprocess.Popen[str]) -> None:
    """End a process we started, by its pid."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
