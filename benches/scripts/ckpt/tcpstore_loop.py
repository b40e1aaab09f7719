#!/usr/bin/env python3
"""Reference for checkpoint_commit_latency.sh: N `set` calls on a PyTorch TCPStore served in this
process (torch.distributed.TCPStore, is_master=True, a client connection to it on 127.0.0.1),
each a ~100-byte value like a commit body. The store is in memory: nothing is written to disk.
A TCPStore `set` is one-way (the client writes the request and returns; the server sends no reply),
so it does not even prove the server has the value: a `set` followed by a `get` of the same key is
also timed, the round trip that does. Prints `SET_MS i ms` and `SETGET_MS i ms` lines."""
import json
import sys
import time
from datetime import timedelta

import torch.distributed as dist

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=30), wait_for_workers=False)
client = dist.TCPStore("127.0.0.1", server.port, 2, False, timeout=timedelta(seconds=30))
for i in range(1, n + 1):
    value = json.dumps({"path": f"/tmp/ckpt/step-{i}", "step": i, "metrics": {"loss": 1.0 / i}})
    t = time.perf_counter()
    client.set(f"checkpoint/{i}", value)
    print(f"SET_MS {i} {(time.perf_counter() - t) * 1000:.3f}")
for i in range(1, n + 1):
    value = json.dumps({"path": f"/tmp/ckpt/step-{i}", "step": i, "metrics": {"loss": 1.0 / i}})
    t = time.perf_counter()
    client.set(f"checkpoint-rt/{i}", value)
    assert client.get(f"checkpoint-rt/{i}") == value.encode()
    print(f"SETGET_MS {i} {(time.perf_counter() - t) * 1000:.3f}")
