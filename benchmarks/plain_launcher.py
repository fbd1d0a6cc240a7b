"""The baseline for the latency benchmarks: a plain ``subprocess.Popen`` launcher.

Four fresh interpreters wired like the default pipeline (a producer binding
PUSH, two consumers connecting PULL and PUSH, a collector binding PULL),
started with ``subprocess.Popen`` the way a hand-written launcher would.
Each child imports zmq, makes its sockets and prints ``ready`` by the same
rule as our stages: once its PUSH socket (if any) has handshaken with every
peer it expects.  A consumer prints ``first <wall-clock time>`` when its
first message arrives.  The producer paces itself, so consumers always have
work to receive.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time
import zmq
from zmq.utils.monitor import recv_monitor_message

role, work, results, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ctx = zmq.Context()

def push_ready(sock, peers):
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    return monitor, peers

def wait_peers(monitor, peers):
    seen = 0
    while seen < peers:
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            seen += 1

def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()

if role == "producer":
    push = ctx.socket(zmq.PUSH); push.linger = 0
    monitor, peers = push_ready(push, 2)
    push.bind(work)
    wait_peers(monitor, peers)
    say("ready")
    sent, start = 0, time.monotonic()
    while True:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            push.send(b"%d" % sent)
            sent += 1
        time.sleep(0.001)
elif role == "consumer":
    pull = ctx.socket(zmq.PULL); pull.linger = 0
    push = ctx.socket(zmq.PUSH); push.linger = 0
    monitor, peers = push_ready(push, 1)
    pull.connect(work)
    push.connect(results)
    wait_peers(monitor, peers)
    say("ready")
    first = True
    while True:
        data = pull.recv()
        if first:
            say("first %.6f" % time.time())
            first = False
        push.send(data)
else:
    pull = ctx.socket(zmq.PULL); pull.linger = 0
    pull.bind(results)
    say("ready")
    while True:
        pull.recv()
"""


class PlainLauncher:
    """Start, kill and restart the four baseline processes with Popen."""

    def __init__(self, directory: Path, rate: float = 20_000) -> None:
        self.work = f"ipc://{directory}/plain-work"
        self.results = f"ipc://{directory}/plain-results"
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def spawn(self, name: str) -> subprocess.Popen[str]:
        role = name.split(".")[0]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                role,
                self.work,
                self.results,
                str(self.rate),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs[name] = proc
        return proc

    def start_all(self) -> float:
        """Launch all four at once; seconds until every one said ready."""
        started = time.monotonic()
        names = ["collector.0", "consumer.0", "consumer.1", "producer.0"]
        for name in names:
            self.spawn(name)
        for name in names:
            self.expect(name, "ready")
        return time.monotonic() - started

    def expect(self, name: str, word: str) -> str:
        stdout = self.procs[name].stdout
        assert stdout is not None
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"{name} ended before saying {word!r}")
            if line.startswith(word):
                return line.strip()

    def restart(self, name: str, killed_at: float) -> tuple[float, float]:
        """After ``name`` was killed: wait for it, start a new one.

        Returns seconds from ``killed_at`` (wall clock) until the replacement
        said ready, and until it received its first message.
        """
        self.procs[name].wait()  # a plain launcher's blocking wait
        self.procs[name].stdout.close()  # type: ignore[union-attr]
        self.spawn(name)
        self.expect(name, "ready")
        ready = time.time() - killed_at
        first = float(self.expect(name, "first").split()[1]) - killed_at
        return ready, first

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()
