"""Command stages: any program, told its endpoints by environment variables.

A command stage does not run our runtime, so it sends no ``ready`` and no
heartbeats.  The supervisor reads its readiness from its connections
instead: every endpoint it binds is listening, and its PUSH socket is
connected to every endpoint it connects to (the stages downstream are up
before it starts, so that connection can be made at once).  A PULL socket
that connects is not waited for: the stage it connects to starts later.

A command stage is always a worker.  The ends of a pipeline keep the
books: sources number the inputs and sinks count them, acknowledge them
and write the summary, so they must run the runtime.  A worker in between
keeps delivery accounting intact as long as it answers each input frame
with one result frame under the same ``(src, key, seq)`` (docs/stages.md).
"""

from __future__ import annotations

import os
import re
from socket import AF_UNIX
from typing import Any

import psutil

from .config import Stage

_TCP = re.compile(r"^tcp://(?P<host>[^:/]+|\[[^\]]+\]):(?P<port>\d+|\*)$")


def is_ready(pid: int, stage: Stage) -> bool:
    """Whether the command stage ``pid`` has opened its data connections."""
    try:
        process = psutil.Process(pid)
        environ = process.environ()  # first: connections after the exec only
        connections = _connections([process, *process.children(recursive=True)])
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    if "ORCHESTRATOR_CONTROL_FD" not in environ:
        return False  # forked, not yet exec'd: these are not its connections
    # The control socket it inherited is a Unix socket without an address,
    # like an ipc client: it must not count as one.
    control_fd = int(environ["ORCHESTRATOR_CONTROL_FD"])
    inet = [c for c in connections if c.family != AF_UNIX]
    listening = {c.laddr.port for c in inet if c.status == psutil.CONN_LISTEN}
    remote = {
        c.raddr.port for c in inet if c.raddr and c.status == psutil.CONN_ESTABLISHED
    }
    unix = [c for c in connections if c.family == AF_UNIX]
    unix_paths = {str(c.laddr) for c in unix if c.laddr}
    unix_clients = sum(1 for c in unix if not c.laddr and c.fd != control_fd)

    ipc_connects = 0
    for side in ("pull", "push"):
        sock = getattr(stage, side)
        if sock is None:
            continue
        if sock.bind is not None:
            if not _bound(sock.bind, listening, unix_paths):
                return False
        elif side == "push":
            for endpoint in sock.connect:
                found = _TCP.match(endpoint)
                if found is None:
                    ipc_connects += 1
                elif int(found["port"]) not in remote:
                    return False
    # An ipc client socket has no address of its own, so all we can check is
    # that there are at least as many of them as ipc endpoints to connect to.
    return unix_clients >= ipc_connects


def _connections(processes: list[psutil.Process]) -> list[Any]:
    """The sockets of a program and of its children: a wrapper script may
    leave the sockets to a program it starts (though ``exec`` is better)."""
    found = []
    for process in processes:
        try:
            found += process.net_connections(kind="all")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a child that is gone has no sockets to count
    return found


def _bound(endpoint: str, listening: set[int], unix_paths: set[str]) -> bool:
    found = _TCP.match(endpoint)
    if found is not None:
        # A wildcard port is chosen by the system: any listening port will do.
        return (
            bool(listening) if found["port"] == "*" else int(found["port"]) in listening
        )
    path = endpoint.removeprefix("ipc://")
    return path in unix_paths or os.path.abspath(path) in unix_paths
