"""CURVE keys and roles, on loopback in one process (no Ray needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from orchestrator.curve import REFUSED_EVENTS, Curve, RunKeys, authenticator, secure
from tests.conftest import wait_for


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def auth() -> Iterator[list[ThreadAuthenticator]]:
    started: list[ThreadAuthenticator] = []
    yield started
    for handler in started:
        handler.stop()


def _connect(
    ctx: zmq.Context[Any],
    auth: list[ThreadAuthenticator],
    server: Curve,
    client: Curve,
) -> tuple[zmq.Socket[Any], zmq.Socket[Any], zmq.Socket[Any]]:
    """A CURVE-server PULL and a client PUSH; returns them and the client's
    handshake monitor."""
    auth.append(authenticator(ctx, server))
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    secure(pull, server, server=True)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | REFUSED_EVENTS)
    secure(push, client, server=False)
    push.connect(f"tcp://127.0.0.1:{port}")
    return pull, push, monitor


def _handshake(monitor: zmq.Socket[Any]) -> int:
    def event() -> int | None:
        return recv_monitor_message(monitor)["event"] if monitor.poll(50) else None

    return int(wait_for(event, timeout=5, message="a handshake event"))


def test_stage_keys_hold_only_the_secrets_of_their_roles() -> None:
    keys = RunKeys.generate()

    binder = keys.for_stage(binds=True, connects=False)
    connector = keys.for_stage(binds=False, connects=True)

    assert binder.server_secret == keys.server_secret
    assert binder.client_secret is None
    assert connector.client_secret == keys.client_secret
    assert connector.server_secret is None


def test_the_run_keys_let_data_through(
    ctx: zmq.Context[Any], auth: list[ThreadAuthenticator]
) -> None:
    keys = RunKeys.generate()
    server, client = keys.for_stage(True, False), keys.for_stage(False, True)
    pull, push, monitor = _connect(ctx, auth, server, client)

    assert _handshake(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    push.send(b"hello")
    assert pull.poll(5000)
    assert pull.recv() == b"hello"


def test_a_client_key_of_another_run_is_refused(
    ctx: zmq.Context[Any], auth: list[ThreadAuthenticator]
) -> None:
    keys = RunKeys.generate()
    stranger = RunKeys.generate()
    wrong = Curve(
        keys.server_public, stranger.client_public, None, stranger.client_secret
    )
    pull, push, monitor = _connect(ctx, auth, keys.for_stage(True, False), wrong)

    assert _handshake(monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert not pull.poll(200)
