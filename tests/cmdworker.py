"""A command stage that knows nothing of the orchestrator's runtime.

It reads the documented environment variables, speaks the documented frame
format with pyzmq and msgspec directly, and doubles every number.  Each
input frame is answered by one result frame under the same (src, key, seq),
so delivery accounting keeps working.
"""

import os
import socket
import struct
import sys

import msgspec
import zmq

env = os.environ
if env["ORCHESTRATOR_CODEC"] == "json":
    encode, decode = msgspec.json.encode, msgspec.json.decode
else:
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
via = f"{env['ORCHESTRATOR_STAGE']}.{env['ORCHESTRATOR_REPLICA']}"
params = msgspec.json.decode(env["ORCHESTRATOR_PARAMS"])
factor = int(params.get("factor", 2))
# die_after: replica 0's first incarnation exits abruptly after that many frames.
die_after = int(params.get("die_after", -1))
died_once = os.path.join(env["ORCHESTRATOR_RUN_DIR"], f"died-{via}")
if env["ORCHESTRATOR_REPLICA"] != "0" or os.path.exists(died_once):
    die_after = -1
# heartbeat: speak the optional control protocol (counters on each frame).
control = None
if params.get("heartbeat"):
    control = socket.socket(fileno=int(env["ORCHESTRATOR_CONTROL_FD"]))
    control.setblocking(True)
counters = {"received": 0, "emitted": 0}
# garbage: first write what a buggy program might to the control fd.
if control is not None and params.get("garbage"):
    for junk in (
        b"\xc1\xc1 not msgpack",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"t": "hb", "c": "lots"}),
        msgspec.msgpack.encode({"t": "hb", "c": {"received": "many"}}),
        msgspec.msgpack.encode({"t": "first_input", "at": "noon"}),
    ):
        control.sendall(struct.pack("!I", len(junk)) + junk)


def tell(message):
    payload = msgspec.msgpack.encode(message)
    control.sendall(struct.pack("!I", len(payload)) + payload)


ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
push = ctx.socket(zmq.PUSH)
for sock, side in ((pull, "PULL"), (push, "PUSH")):
    sock.linger = 500
    if f"ORCHESTRATOR_{side}_BIND" in env:
        sock.bind(env[f"ORCHESTRATOR_{side}_BIND"])
    else:
        for endpoint in env[f"ORCHESTRATOR_{side}_CONNECT"].split():
            sock.connect(endpoint)
print(f"{via} pid {os.getpid()} started", flush=True)


def double(record):
    return {"num": record["num"] * factor}


if control is not None:
    tell({"t": "ready"})
frames = 0
while True:
    # Heartbeats go out while idle too: once one was sent, silence means hung.
    if control is not None and not pull.poll(100):
        tell({"t": "hb", "c": counters})
        continue
    src, key, seq, _via, counts, items = decode(pull.recv())
    if frames == die_after:
        open(died_once, "w").close()
        os._exit(9)
    frames += 1
    if counts is None:  # a source's frame: each item is one input
        counts = [1] * len(items)
    out, out_counts, start = [], [], 0
    for n in counts:  # the records of one input, and how many results came of it
        results = [double(record) for record in items[start : start + n]]
        out += results
        out_counts.append(len(results))
        start += n
    push.send(encode([src, key, seq, via, out_counts, out]))
    if control is not None:
        counters["received"] += len(counts)
        counters["emitted"] += len(out)
        tell({"t": "hb", "c": counters})
    sys.stdout.flush()
