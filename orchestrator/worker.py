"""The worker side of the stage runtime: one frame in, the stage function on
each record, one frame of results out under the same key.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .runtime import (
    HWM_FRAMES,
    Runtime,
    Stopping,
    UserError,
    user_traceback,
)
from .stagefn import StageContext

log = logging.getLogger(__name__)

# A worker's "no result" in its output frame: one shared list, which is safe
# because output frames are only ever encoded, never changed.
_NOTHING: list[Any] = []


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
                    src, key, seq, _via, flat, items = self.codec.decode_frame(data)
                except ValueError as exc:
                    self.dead_letter({"error": str(exc), "frame": repr(data[:200])})
                    continue
                self.mark(src, key)
                out = self._process(call, ctx, src, key, seq, flat, items)
                counters["received"] += len(items)
                counters["processed"] += len(items)
                counters["frames"] += 1
                counters["emitted"] += sum(map(len, out))
                self._send(self.codec.encode([src, key, seq, self.name, False, out]))
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
        flat: bool,
        items: list[Any],
    ) -> list[list[Any]]:
        out: list[list[Any]] = []
        append = out.append
        position = 0
        try:
            if flat:
                # Runs once per record: _as_list is inlined for the two
                # commonest results, none and one dict.
                for position, record in enumerate(items):  # noqa: B007 (read by the handler)
                    result = call(record, ctx)
                    if result is None:
                        append(_NOTHING)
                    elif type(result) is dict:
                        append([result])
                    else:
                        append(_as_list(result))
            else:
                for position, unit in enumerate(items):  # noqa: B007
                    derived: list[Any] = []
                    for record in unit:
                        derived.extend(_as_list(call(record, ctx)))
                    append(derived)
        except Exception as exc:
            raise UserError(user_traceback(exc), (src, key, seq + position)) from exc
        return out

    def _send(self, data: bytes) -> None:
        assert self.push is not None
        while True:
            try:
                self.push.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                # Downstream is full or restarting; keep heartbeating meanwhile.
                self.wait_writable(self.push)
