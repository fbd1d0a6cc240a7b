"""The worker side of the stage runtime: one frame in, the stage function on
each record, one frame of results out under the same key.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .codec import inputs
from .runtime import (
    HWM_FRAMES,
    Runtime,
    Stopping,
    UserError,
    user_traceback,
)
from .stagefn import StageContext

log = logging.getLogger(__name__)


def _as_list(result: Any) -> list[Any]:
    """A worker's return value as the list of records it stands for."""
    if result is None:
        return []
    if type(result) is list:
        return result
    if isinstance(result, (dict, str, bytes, int, float, tuple)):
        return [result]
    if isinstance(result, Iterator) or hasattr(result, "__next__"):
        return list(result)
    return [result]


class WorkerRuntime(Runtime):
    def run(self, fn: Callable[..., Any]) -> None:
        ctx = self.context()
        params = self.stage.params
        # Called as call(record, ctx): without params, the user's function
        # itself, which saves a Python frame per record.
        call = functools.partial(fn, **params) if params else fn
        assert self.pull is not None and self.push is not None
        pull, counters = self.pull, self.counters
        while True:
            ready = self._service(self.heartbeat_every * 1000)
            if pull not in ready:
                continue
            for _ in range(HWM_FRAMES):
                try:
                    data = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.note_first_input()
                try:
                    src, key, seq, _via, counts, items = self.codec.decode_frame(data)
                except ValueError as exc:
                    self.dead_letter({"error": str(exc), "frame": repr(data[:200])})
                    continue
                self.mark(src, key, inputs(counts, items))
                out, out_counts = self._process(call, ctx, src, key, seq, counts, items)
                counters["received"] += len(out_counts)
                counters["processed"] += len(out_counts)
                counters["frames"] += 1
                counters["emitted"] += len(out)
                frame = [src, key, seq, self.name, out_counts, out]
                self._send(self.codec.encode(frame))
                self.unmark()
                # Up to HWM_FRAMES frames go by before _service: a slow but
                # healthy function must still beat once per frame, or the
                # supervisor takes it for hung.
                self.heartbeat()
                if self.stopping:
                    raise Stopping

    def _process(
        self,
        call: Callable[..., Any],
        ctx: StageContext,
        src: int,
        key: int,
        seq: int,
        counts: list[int] | None,
        items: list[Any],
    ) -> tuple[list[Any], list[int]]:
        """The results of a frame's inputs, and how many came of each."""
        out: list[Any] = []
        out_counts: list[int] = []
        append, extend, count = out.append, out.extend, out_counts.append
        try:
            if counts is None:
                # Runs once per record: _as_list is inlined for the two
                # commonest results, none and one dict.
                for record in items:
                    result = call(record, ctx)
                    if result is None:
                        count(0)
                    elif type(result) is dict:
                        append(result)
                        count(1)
                    else:
                        results = _as_list(result)
                        extend(results)
                        count(len(results))
            else:
                # An upstream worker's frame: counts[i] records came of input i.
                start = 0
                for n in counts:
                    before = len(out)
                    for record in items[start : start + n]:
                        extend(_as_list(call(record, ctx)))
                    start += n
                    count(len(out) - before)
        except Exception as exc:
            # One count per input done: their number is the failing input's
            # position in the frame.
            where = (src, key, seq + len(out_counts))
            raise UserError(user_traceback(exc), where) from exc
        return out, out_counts

    def _send(self, data: bytes) -> None:
        assert self.push is not None
        while True:
            try:
                self.push.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                # Downstream is full or restarting; keep heartbeating meanwhile.
                self.wait_writable(self.push)
