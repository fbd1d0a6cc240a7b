"""A real Ray cluster of two nodes on this machine, for tests and benchmarks.

The nodes listen on 127.0.0.2 (head) and 127.0.0.3: Ray would replace
127.0.0.1 with the machine's outward address, which we must not use.  The
cluster requires a token (``RAY_AUTH_MODE=token``).  It is stopped through the
processes started here, never with ``ray stop``, which kills every Ray
process on the machine.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
# Starting a node takes 5-10 s on two cores; give it room, but not forever.
NODE_START_S = 60.0
# `ray start --block` stops its node's processes on SIGTERM; this long.
NODE_STOP_S = 20.0


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]  # what a driver needs: the token, the auth mode
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_in: float = 0.0

    def stop(self) -> None:
        """Stop the worker nodes, then the head."""
        for index in reversed(range(len(self.nodes))):
            self.stop_node(index)

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's whole process tree at once, as if its host died."""
        node = self.nodes[index]
        try:
            tree = psutil.Process(node.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for proc in [psutil.Process(node.pid), *tree]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait()
        psutil.wait_procs(tree, timeout=5)

    def stop_node(self, index: int) -> None:
        """SIGTERM a `ray start --block` we started (it stops its node's
        processes), then SIGKILL whatever is left of its process tree."""
        node = self.nodes[index]
        try:
            ours = psutil.Process(node.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ours = []
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=NODE_STOP_S)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        _gone, alive = psutil.wait_procs(ours, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _start_node(
    args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).parent / "ray"
    with open(log, "wb") as out:
        node = subprocess.Popen(
            [str(ray), "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the tests is not for it
        )
    deadline = time.monotonic() + NODE_START_S
    while b"Ray runtime started" not in log.read_bytes():
        if node.poll() is not None or time.monotonic() > deadline:
            node.kill()
            node.wait()
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return node


def start_cluster(cpus: int = 2) -> RayCluster:
    """Head on 127.0.0.2, one worker node on 127.0.0.3, token auth on."""
    started = time.monotonic()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    port = free_port(HEAD)
    cluster = RayCluster(f"{HEAD}:{port}", env, temp_dir)
    common = [f"--num-cpus={cpus}", "--disable-usage-stats"]
    head = [
        "--head",
        f"--node-ip-address={HEAD}",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
    ]
    worker = [f"--address={cluster.address}", f"--node-ip-address={WORKER}"]
    try:
        cluster.nodes.append(_start_node(head + common, env, temp_dir / "head.log"))
        cluster.nodes.append(_start_node(worker + common, env, temp_dir / "worker.log"))
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - started
    return cluster
