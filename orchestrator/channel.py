"""The control channel between the supervisor and one stage process.

A Unix stream socket pair made before the fork, carrying length-prefixed
msgpack maps: readiness, heartbeats with counters, errors and the final
summary upwards; redelivery notices downwards.  It is deliberately not a
ZeroMQ socket: the supervisor then owns no ZeroMQ context at all, so it can
fork at any moment without a context leaking into a child.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

_HEADER = struct.Struct("!I")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

Message = dict[str, Any]


class Channel:
    """One end of a control connection; reads never block, writes are queued."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._inbox = bytearray()
        self._outbox = bytearray()
        self.closed = False

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(parent), cls(child)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message) -> None:
        """Queue ``message`` and write as much as the socket takes now."""
        payload = _encode(message)
        self._outbox += _HEADER.pack(len(payload)) + payload
        self.flush()

    def send_blocking(self, message: Message) -> None:
        """Send ``message`` completely; for stage processes, whose peer always reads."""
        self.send(message)
        while self._outbox and not self.closed:
            self.sock.setblocking(True)
            try:
                self.flush()
            finally:
                self.sock.setblocking(False)

    def flush(self) -> None:
        while self._outbox and not self.closed:
            try:
                sent = self.sock.send(self._outbox)
            except BlockingIOError:
                return
            except OSError:  # the peer is gone; its reaping will tell why
                self.closed = True
                self._outbox.clear()
                return
            del self._outbox[:sent]

    @property
    def pending(self) -> bool:
        return bool(self._outbox)

    # A bound on one message's size, for peers we do not trust; None: none.
    max_message: int | None = None
    too_large = False  # a peer sent a message over the bound
    eof = False  # the peer shut its side

    def receive(self) -> list[Message]:
        """Every complete message available now; notes EOF and oversize."""
        while not self.closed and not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._at_eof()
                break
            self._inbox += chunk
        messages = []
        while len(self._inbox) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._inbox)
            if self.max_message is not None and size > self.max_message:
                self.too_large = True
                break
            end = _HEADER.size + size
            if len(self._inbox) < end:
                break
            payload = bytes(self._inbox[_HEADER.size : end])
            del self._inbox[:end]
            messages.append(self._decode_payload(payload))
        return messages

    def _at_eof(self) -> None:
        """A stage's channel at EOF is done with: its process is gone."""
        self.eof = True
        self.closed = True

    def _decode_payload(self, payload: bytes) -> Message:
        try:
            return _decode(payload)  # type: ignore[no-any-return,unused-ignore]
        except msgspec.DecodeError:  # a command stage may write anything
            return {"t": None, "undecodable": payload[:40]}

    def close(self) -> None:
        self.closed = True
        self.sock.close()
