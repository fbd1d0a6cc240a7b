"""The sink side of the stage runtime: count each input once, log it in the
ledger, hand the records to the stage function, commit, acknowledge.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .codec import inputs, results
from .ledger import Ledger, SeqSet
from .runtime import (
    HWM_FRAMES,
    ReplicaSpec,
    RunAborted,
    Runtime,
    Stopping,
    UserError,
    ack_identity,
    user_traceback,
)

log = logging.getLogger(__name__)


class SinkRuntime(Runtime):
    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self.counters.update(counted=0, duplicates=0, results=0, per_via={})
        self.seen: dict[int, SeqSet] = {}
        self.ledger: Ledger | None = None
        self.unacked: dict[int, list[int]] = {}
        self.aborted = False
        if self.exactly_once:
            self.ledger = Ledger(spec.run_dir / f"ledger-{spec.stage.name}.sqlite")

    def run(self, fn: Callable[..., Any]) -> Any:
        # _records() hands over whole frames; chaining them lets the user's
        # loop take each record in C instead of resuming a generator.
        records = itertools.chain.from_iterable(self._records())
        try:
            return fn(records, self.context(), **self.stage.params)
        except Stopping:
            raise
        except Exception as exc:
            if self.aborted:  # the function wrapped our RunAborted in its own
                raise RunAborted from exc
            raise UserError(user_traceback(exc)) from exc

    def _records(self) -> Iterator[list[Any]]:
        """The accepted records, a frame's worth at a time."""
        if self.ledger is not None:
            yield from self._replay()
        assert self.pull is not None
        pull = self.pull
        while True:
            try:
                ready = self._service(self.heartbeat_every * 1000)
            except Stopping:
                if self.aborted:
                    raise RunAborted from None
                return
            if pull not in ready:
                continue
            for _ in range(HWM_FRAMES):
                try:
                    data = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.note_first_input()
                accepted: list[Any] = []
                where = self._accept(data, accepted)
                if where is not None:
                    self.mark(*where)
                yield accepted  # resumed once the user has taken them all
                self.unmark()
                self.heartbeat()  # a slow sink function is not a hung one
            # The user has seen the records; make them durable, then say so.
            # A crash before the commit loses nothing: the ledger replays only
            # what was committed, and the sources send the rest again.
            if self.ledger is not None:
                self.ledger.commit()
                self._send_acks()
            self.heartbeat(soon=not self._more(pull))

    def _more(self, pull: zmq.Socket[bytes]) -> bool:
        return bool(pull.poll(0))

    def _accept(self, data: bytes, out: list[Any]) -> tuple[int, int, int] | None:
        try:
            src, key, seq, via, counts, items = self.codec.decode_frame(data)
        except ValueError as exc:
            self.dead_letter({"error": str(exc), "frame": repr(data[:200])})
            return None
        size = inputs(counts, items)
        self.counters["received"] += size
        if self.ledger is None:
            self._take(items, counts, 0, size, via, out)
            return src, key, size
        seen = self.seen.setdefault(src, SeqSet())
        fresh = seen.add(seq, seq + size)
        new = 0
        for lo, hi in fresh:
            self.ledger.log(src, lo, hi, seq, data)
            self._take(items, counts, lo - seq, hi - seq, via, out)
            new += hi - lo
        self.counters["duplicates"] += size - new
        self.unacked.setdefault(src, []).append(key)
        return src, key, size

    def _take(
        self,
        items: list[Any],
        counts: list[int] | None,
        lo: int,
        hi: int,
        via: str,
        out: list[Any],
    ) -> None:
        """Add the results of inputs ``lo .. hi - 1`` of a frame to ``out``."""
        self.counters["counted"] += hi - lo
        taken = results(counts, items, lo, hi)
        out.extend(taken)
        self.counters["results"] += len(taken)
        per_via = self.counters["per_via"]
        per_via[via] = per_via.get(via, 0) + len(taken)

    def _replay(self) -> Iterator[list[Any]]:
        """What the ledger holds, a logged frame at a time, heartbeating.

        A long replay is progress, not a hang; beating between frames, as in
        normal operation, keeps a restarted sink from being killed as hung.
        """
        assert self.ledger is not None
        replayed = 0
        for src, lo, hi, frame_seq, data in self.ledger.replay():
            _, _, _, via, counts, items = self.codec.decode_frame(data)
            self.seen.setdefault(src, SeqSet()).add(lo, hi)
            out: list[Any] = []
            self._take(items, counts, lo - frame_seq, hi - frame_seq, via, out)
            replayed += hi - lo
            yield out
            self.heartbeat()
        if replayed:
            log.info(
                "%s replayed %d counted inputs from its ledger", self.name, replayed
            )

    def on_control(self, message: dict[str, Any]) -> None:
        # The run failed or timed out: the records end here, but not as if
        # the stream were complete (a sink writing its output at the end of
        # its loop must not overwrite a good file with a partial one).
        if message.get("t") == "abort":
            self.aborted = True

    def on_acks(self) -> None:
        assert self.acks is not None
        while True:
            try:
                identity, data = self.acks.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self.codec.decode(data)
            if message[0] == "hello":
                src = message[1]
                ranges = self.seen.get(src, SeqSet()).ranges()
                self.acks.send_multipart(
                    [identity, self.codec.encode(["state", ranges])]
                )

    def _send_acks(self) -> None:
        assert self.acks is not None
        for src, keys in self.unacked.items():
            message = self.codec.encode(["ack", keys])
            self.acks.send_multipart([ack_identity(src), message])
        self.unacked.clear()
