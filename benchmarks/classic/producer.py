"""The classic example's producer: one JSON message per number, sent at once.

Python 3 version of the tutorial's ``producer.py``: a PUSH socket bound to
the work endpoint, ``send_json({"num": n})`` for each number.  Start the
collector and the consumers first, as the tutorial says.
"""

from __future__ import annotations

import argparse
import sys

import zmq


def produce(endpoint: str, messages: int, stay: bool) -> None:
    context = zmq.Context()
    sender = context.socket(zmq.PUSH)
    sender.bind(endpoint)
    for num in range(messages):
        sender.send_json({"num": num})
    if stay:
        # Measured here (pyzmq 27, libzmq 4.3.5): closing with linger -1 and
        # exiting at once can still drop the last few thousand messages.
        # The tutorial's script just ends; for a benchmark that must count
        # every result, the harness keeps us alive until it has them.
        sys.stdin.read()
    sender.close(linger=-1)
    context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="tcp://127.0.0.1:5557")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--stay", action="store_true", help="after sending, wait for stdin to close"
    )
    args = parser.parse_args()
    produce(args.work, args.messages, args.stay)


if __name__ == "__main__":
    main()
