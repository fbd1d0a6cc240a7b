"""The classic example's producer: one JSON message per number, sent at once.

Python 3 version of the tutorial's ``producer.py``: a PUSH socket bound to
the work endpoint, ``send_json({"num": n})`` for each number.  Start the
collector and the consumers first, as the tutorial says.
"""

from __future__ import annotations

import argparse

import zmq


def produce(endpoint: str, messages: int) -> None:
    context = zmq.Context()
    sender = context.socket(zmq.PUSH)
    sender.bind(endpoint)
    for num in range(messages):
        sender.send_json({"num": num})
    # The tutorial's script ends here and lets the interpreter flush; linger
    # makes that explicit (the default, -1, waits for every message).
    sender.close(linger=-1)
    context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="tcp://127.0.0.1:5557")
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    produce(args.work, args.messages)


if __name__ == "__main__":
    main()
