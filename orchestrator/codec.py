"""Encoding of data frames.

A frame is one ZeroMQ message carrying many records:

    [src, key, seq, via, flat, items]

``src`` is the source replica the inputs came from, ``key`` the frame's key
at that source, ``seq`` the sequence number of the first input, ``via`` the
replica that sent this frame (``"consumer.1"``).  If ``flat`` is true,
``items[i]`` is the input record ``seq + i``; otherwise ``items[i]`` is the
list of records derived from input ``seq + i`` (possibly empty, so that the
sink learns the input was processed).  A program that is not written against
the runtime can take part by reading and writing this format (docs/stages.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

Frame = tuple[int, int, int, str, bool, list[Any]]


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
        else:
            self.encode = msgspec.msgpack.Encoder(enc_hook=_refuse).encode
            self._decode = msgspec.msgpack.Decoder().decode

    def decode(self, data: bytes) -> Any:
        return self._decode(data)

    def decode_frame(self, data: bytes) -> Frame:
        """A frame, or ValueError if ``data`` is not one."""
        try:
            value = self._decode(data)
        except msgspec.DecodeError as exc:
            raise ValueError(f"undecodable frame: {exc}") from exc
        if not (
            isinstance(value, list) and len(value) == 6 and isinstance(value[5], list)
        ):
            raise ValueError("not a frame: expected [src, key, seq, via, flat, items]")
        src, key, seq, via, flat, items = value
        return src, key, seq, via, bool(flat), items
