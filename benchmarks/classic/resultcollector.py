"""The classic example's collector: count the results per consumer.

Python 3 version of the tutorial's ``resultcollector.py``: PULL on the
results endpoint, ``recv_json`` a known number of results, count them per
consumer and print the counts.  For the benchmark it also prints, as a last
JSON line, when the first and the last result arrived (``time.time()``) and
how many came.  The classic pipeline has no acknowledgements: a message can
be lost (a consumer's connection dropped with its queue), and the tutorial's
collector would then wait forever; ``--give-up-after`` ends the wait after
that many seconds without a result.
"""

from __future__ import annotations

import argparse
import json
import pprint
import time

import zmq


def collect(endpoint: str, expected: int, give_up_after: float) -> None:
    context = zmq.Context()
    receiver = context.socket(zmq.PULL)
    receiver.bind(endpoint)
    print("collector ready", flush=True)
    per_consumer: dict[int, int] = {}
    first = last = 0.0
    count = 0
    while count < expected:
        if give_up_after and count and not receiver.poll(give_up_after * 1000):
            break
        result = receiver.recv_json()
        last = time.time()
        if count == 0:
            first = last
        count += 1
        consumer = result["consumer"]  # type: ignore[index]
        per_consumer[consumer] = per_consumer.get(consumer, 0) + 1
    pprint.pprint(per_consumer)
    print(json.dumps({"first": first, "last": last, "results": count}))
    receiver.close(linger=0)
    context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="tcp://127.0.0.1:5558")
    parser.add_argument("--expected", type=int, default=1000)
    parser.add_argument("--give-up-after", type=float, default=0.0)
    args = parser.parse_args()
    collect(args.results, args.expected, args.give_up_after)


if __name__ == "__main__":
    main()
