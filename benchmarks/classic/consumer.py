"""The classic example's consumer: keep the even numbers, stamped with an id.

Python 3 version of the tutorial's ``consumer.py``: PULL from the work
endpoint, ``recv_json`` one message at a time, and ``send_json`` a result
for each even number to the collector.  It runs until it is killed.
"""

from __future__ import annotations

import argparse
import random

import zmq


def consume(work: str, results: str) -> None:
    consumer_id = random.randrange(1, 10005)
    print(f"I am consumer #{consumer_id}", flush=True)
    context = zmq.Context()
    receiver = context.socket(zmq.PULL)
    receiver.connect(work)
    sender = context.socket(zmq.PUSH)
    sender.connect(results)
    while True:
        work_message = receiver.recv_json()
        num = work_message["num"]  # type: ignore[index]
        if num % 2 == 0:
            sender.send_json({"consumer": consumer_id, "num": num})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="tcp://127.0.0.1:5557")
    parser.add_argument("--results", default="tcp://127.0.0.1:5558")
    args = parser.parse_args()
    consume(args.work, args.results)


if __name__ == "__main__":
    main()
