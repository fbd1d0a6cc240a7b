"""An optional Prometheus endpoint: per-stage inputs, outputs, restarts, RSS
and replica states (``--metrics 127.0.0.1:PORT``).

prometheus_client serves from its own thread.  The gauges are set from a
supervisor hook, in the supervisor's thread, so the server thread only ever
reads prometheus_client's own values and never the supervisor's state.  The
supervisor still forks stages while that thread runs; a child gets only the
forking thread, and may inherit a lock the server thread held, but a stage
never touches prometheus_client, the runtime replaces stdout and stderr, and
logging re-creates its locks after a fork, so no child waits on such a lock.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import EndpointInUse, UsageError
from .supervisor import Supervisor

# Scrapes come every 15 s or so; updating faster only costs the loop.
UPDATE_S = 1.0
# Always exported, even at 0, so that an alert on them has a series to watch.
STATES = ("starting", "ready", "backoff", "stopping", "stopped", "exited")


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


class Metrics:
    def __init__(self, address: str) -> None:
        self.host, self.port = parse_address(address)
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise UsageError(
                "--metrics needs prometheus_client: "
                "pip install 'zmq-orchestrator[metrics]'"
            ) from exc
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        labels = ["pipeline", "stage"]
        self.inputs = Gauge(
            "orchestrator_stage_inputs",
            "Inputs received by a stage (produced, for a source), all replicas",
            labels,
            registry=self.registry,
        )
        self.outputs = Gauge(
            "orchestrator_stage_outputs",
            "Records a stage emitted (for a sink: results collected)",
            labels,
            registry=self.registry,
        )
        self.restarts = Gauge(
            "orchestrator_stage_restarts",
            "Restarts of a stage's replicas",
            labels,
            registry=self.registry,
        )
        self.rss = Gauge(
            "orchestrator_stage_rss_bytes",
            "Resident memory of a stage's live replicas",
            labels,
            registry=self.registry,
        )
        self.replicas = Gauge(
            "orchestrator_stage_replicas",
            "A stage's replicas by state",
            [*labels, "state"],
            registry=self.registry,
        )
        self._next = 0.0
        self._procs: dict[int, Any] = {}
        self._states: set[str] = set(STATES)

    def start(self) -> None:
        from prometheus_client import start_http_server

        try:
            start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise EndpointInUse(f"http://{self.host}:{self.port}/metrics") from exc

    def attach(self, supervisor: Supervisor) -> None:
        self.start()
        supervisor.hooks.append(lambda: self.update(supervisor))

    def update(self, sup: Supervisor) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + UPDATE_S
        name = sup.pipeline.name
        for stage in sup.pipeline.stages:
            members = [r for r in sup.replicas if r.stage is stage]
            inputs_key = "produced" if stage.role == "source" else "received"
            outputs_key = {"source": "produced", "worker": "emitted"}.get(
                stage.role, "results"
            )
            self.inputs.labels(name, stage.name).set(
                sum(int(r.total(inputs_key) or 0) for r in members)
            )
            self.outputs.labels(name, stage.name).set(
                sum(int(r.total(outputs_key) or 0) for r in members)
            )
            self.restarts.labels(name, stage.name).set(
                sum(len(r.restarts) for r in members)
            )
            self.rss.labels(name, stage.name).set(
                sum(self._rss(r.pid) for r in members if r.pid is not None)
            )
            self._states.update(r.state for r in members)
            for state in self._states:
                count = sum(1 for r in members if r.state == state)
                self.replicas.labels(name, stage.name, state).set(count)
        alive = {r.pid for r in sup.replicas}
        for pid in [p for p in self._procs if p not in alive]:
            del self._procs[pid]

    def _rss(self, pid: int) -> int:
        import psutil

        try:
            proc = self._procs.get(pid) or psutil.Process(pid)
            self._procs[pid] = proc
            return int(proc.memory_info().rss)
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0
