"""A command stage that knows nothing of the orchestrator's runtime.

It reads the documented environment variables, speaks the documented frame
format with pyzmq and msgspec directly, and doubles every number.  Each
input frame is answered by one result frame under the same (src, key, seq),
so delivery accounting keeps working.
"""

import os
import sys

import msgspec
import zmq

env = os.environ
if env["ORCHESTRATOR_CODEC"] == "json":
    encode, decode = msgspec.json.encode, msgspec.json.decode
else:
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
via = f"{env['ORCHESTRATOR_STAGE']}.{env['ORCHESTRATOR_REPLICA']}"
factor = int(msgspec.json.decode(env["ORCHESTRATOR_PARAMS"]).get("factor", 2))

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


while True:
    src, key, seq, _via, flat, items = decode(pull.recv())
    if flat:
        out = [[double(record)] for record in items]
    else:
        out = [[double(record) for record in unit] for unit in items]
    push.send(encode([src, key, seq, via, False, out]))
    sys.stdout.flush()
