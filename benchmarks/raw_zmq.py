"""The ceiling for one message per record: raw pyzmq PUSH -> PULL.

Two processes, no encoding, no work: a child process PUSHes ``messages``
payloads of ``size`` bytes, the parent PULLs them.  Prints one JSON line with
messages/s from the first message received to the last.

    python benchmarks/raw_zmq.py --messages 1000000 --size 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from typing import Any

import zmq


def _send(endpoint: str, messages: int, size: int) -> None:
    # The context is made here, after the fork, as every process must.
    context = zmq.Context()
    sender = context.socket(zmq.PUSH)
    sender.connect(endpoint)
    payload = b"x" * size
    for _ in range(messages):
        sender.send(payload)
    sender.close(linger=-1)
    context.term()


def run(endpoint: str, messages: int, size: int) -> dict[str, Any]:
    started = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(
        target=_send, args=(endpoint, messages, size)
    )
    child.start()
    context = zmq.Context()
    receiver = context.socket(zmq.PULL)
    receiver.bind(endpoint)
    receiver.recv()
    first = time.perf_counter()
    for _ in range(messages - 1):
        receiver.recv()
    last = time.perf_counter()
    child.join()
    receiver.close(linger=0)
    context.term()
    steady = (messages - 1) / max(last - first, 1e-9)
    return {
        "messages": messages,
        "size": size,
        "seconds": time.perf_counter() - started,
        "rate": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5599")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(run(args.endpoint, args.messages, args.size)))


if __name__ == "__main__":
    main()
