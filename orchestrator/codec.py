"""Encoding of data frames.

A frame is one ZeroMQ message carrying many records:

    [src, key, seq, via, counts, items]

``src`` is the source replica the inputs came from, ``key`` the frame's key
at that source, ``seq`` the sequence number of the first input, ``via`` the
replica that sent this frame (``"consumer.1"``).  A source's frame has
``counts = None``: ``items[i]`` is the input record ``seq + i``.  A worker's
frame has one count per input: the first ``counts[0]`` of ``items`` derive
from input ``seq``, the next ``counts[1]`` from ``seq + 1``, and so on; a
count of 0 still tells the sink that the input was processed.  Results stay
one flat list, not a list per input, because most inputs yield zero or one
record and a list apiece would cost more to build, encode and decode than
the records themselves.  A program that is not written against the runtime
can take part by reading and writing this format (docs/stages.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec

Count = Annotated[int, msgspec.Meta(ge=0)]
Frame = tuple[int, int, int, str, "list[int] | None", list[Any]]
# What the decoder checks, in C, while it decodes; the records stay untyped.
_FRAME_TYPE = tuple[int, int, int, str, list[Count] | None, list[Any]]


class Unencodable(TypeError):
    """A stage function produced a value the codec has no encoding for."""


def _refuse(value: Any) -> Any:
    # Called by msgspec only for types it cannot encode: no cost otherwise.
    raise Unencodable(
        f"cannot encode a {type(value).__name__} ({value!r:.80}): records are "
        "dicts, lists, strings, numbers, booleans, None or bytes"
    )


class Codec:
    def __init__(self, name: str) -> None:
        self.name = name
        if name == "json":
            self.encode: Callable[[Any], bytes] = msgspec.json.Encoder(
                enc_hook=_refuse
            ).encode
            self._decode: Callable[[bytes], Any] = msgspec.json.Decoder().decode
            self._decode_frame: Callable[[bytes], Any] = msgspec.json.Decoder(
                _FRAME_TYPE
            ).decode
        else:
            self.encode = msgspec.msgpack.Encoder(enc_hook=_refuse).encode
            self._decode = msgspec.msgpack.Decoder().decode
            self._decode_frame = msgspec.msgpack.Decoder(_FRAME_TYPE).decode

    def decode(self, data: bytes) -> Any:
        return self._decode(data)

    def decode_frame(self, data: bytes) -> Frame:
        """A frame, or ValueError if ``data`` is not one."""
        try:
            src, key, seq, via, counts, items = self._decode_frame(data)
        except msgspec.ValidationError as exc:
            raise ValueError(
                f"not a frame [src, key, seq, via, counts, items]: {exc}"
            ) from exc
        except msgspec.DecodeError as exc:
            raise ValueError(f"undecodable frame: {exc}") from exc
        # Checked here so that a command stage's miscount is a dead letter,
        # not a wrong slice deep in the sink's accounting.
        if counts is not None and sum(counts) != len(items):
            raise ValueError(
                f"not a frame: its counts add up to {sum(counts)}, "
                f"but it has {len(items)} items"
            )
        return src, key, seq, via, counts, items


def inputs(counts: list[int] | None, items: list[Any]) -> int:
    """How many inputs a frame stands for."""
    return len(items) if counts is None else len(counts)


def results(counts: list[int] | None, items: list[Any], lo: int, hi: int) -> list[Any]:
    """The records that came of inputs ``lo .. hi - 1`` (frame positions)."""
    if counts is None:
        return items if lo == 0 and hi >= len(items) else items[lo:hi]
    if lo == 0 and hi >= len(counts):  # the whole frame: the usual case
        return items
    start = sum(counts[:lo])
    return items[start : start + sum(counts[lo:hi])]
