"""The ceiling for one message per record: raw pyzmq PUSH -> PULL.

Two processes, no encoding, no work: a sender process PUSHes ``messages``
payloads of ``size`` bytes, this process PULLs them.  Prints one JSON line
with messages/s from the first message received to the last.

    python benchmarks/raw_zmq.py --messages 1000000 --size 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import zmq

# A sender that died leaves the receiver waiting; this much silence ends it.
SILENCE_S = 30.0


def send(endpoint: str, messages: int, size: int) -> None:
    context = zmq.Context()
    sender = context.socket(zmq.PUSH)
    sender.connect(endpoint)
    payload = b"x" * size
    for _ in range(messages):
        sender.send(payload)
    # Closing and exiting at once can drop the last messages, linger or not
    # (measured here); the receiver closes our stdin once it has them all.
    sys.stdin.read()
    sender.close(linger=0)
    context.term()


def run(endpoint: str, messages: int, size: int) -> dict[str, Any]:
    started = time.perf_counter()
    context = zmq.Context()
    receiver = context.socket(zmq.PULL)
    receiver.bind(endpoint)  # before the sender starts: nothing waits to connect
    sender = subprocess.Popen(
        [sys.executable, __file__, "--send", "--endpoint", endpoint]
        + ["--messages", str(messages), "--size", str(size)],
        stdin=subprocess.PIPE,
    )
    try:
        receiver.rcvtimeo = int(SILENCE_S * 1000)
        count = 0
        try:
            receiver.recv()
            first = time.perf_counter()
            for count in range(1, messages):  # noqa: B007 (read by the handler)
                receiver.recv()
            last = time.perf_counter()
        except zmq.Again:
            raise SystemExit(f"raw pyzmq: {count} of {messages} came") from None
        assert sender.stdin is not None
        sender.stdin.close()
        if sender.wait(timeout=SILENCE_S) != 0:
            raise SystemExit(f"raw pyzmq: the sender exited {sender.returncode}")
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        receiver.close(linger=0)
        context.term()
    return {
        "messages": messages,
        "size": size,
        "seconds": time.perf_counter() - started,
        "rate": (messages - 1) / max(last - first, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5599")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--send", action="store_true", help="be the sender")
    args = parser.parse_args()
    if args.send:
        send(args.endpoint, args.messages, args.size)
    else:
        print(json.dumps(run(args.endpoint, args.messages, args.size)))


if __name__ == "__main__":
    main()
