"""CURVE security for data that crosses hosts: keys per run, roles per socket.

Each run makes two key pairs: one for the side that binds an endpoint (the
CURVE server) and one for the side that connects (the client).  A stage gets
only the secrets its sockets need.  Every public key is public; what keeps a
stranger out is the ZAP handler each binding stage runs, which admits the
run's client key and nothing else.  Encryption alone would let anybody who
knows a server's public key in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

# The handshake events that mean "this peer refused our keys".
REFUSED_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True)
class Curve:
    """The keys one stage gets (z85 text, as pyzmq makes them)."""

    server_public: bytes
    client_public: bytes
    server_secret: bytes | None = None  # for stages that bind
    client_secret: bytes | None = None  # for stages that connect


@dataclass(frozen=True)
class RunKeys:
    """Both key pairs of one run; only the supervisor holds all four keys."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> RunKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_stage(self, binds: bool, connects: bool) -> Curve:
        keys = Curve(self.server_public, self.client_public)
        if binds:
            keys = replace(keys, server_secret=self.server_secret)
        if connects:
            keys = replace(keys, client_secret=self.client_secret)
        return keys


def secure(sock: zmq.Socket[Any], keys: Curve, server: bool) -> None:
    """Set a socket's CURVE role; before its bind or connect, or it is ignored."""
    if server:
        if keys.server_secret is None:
            raise ValueError("this stage was given no server key")
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True
    else:
        if keys.client_secret is None:
            raise ValueError("this stage was given no client key")
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public
        sock.curve_serverkey = keys.server_public


class _RunClients:
    """The ZAP decision: the run's client key, and no other."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.allowed:
            return True
        log.warning("refused a connection with an unknown CURVE key %s", key.decode())
        return False


def authenticator(ctx: zmq.Context[Any], keys: Curve) -> ThreadAuthenticator:
    """Start the ZAP handler of ``ctx``: CURVE servers consult it on handshakes."""
    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve_callback(
        "*", credentials_provider=_RunClients(keys.client_public)
    )
    return auth
