#!/usr/bin/env python3
"""torch's own TCPStore server, on its own in this process: the libuv server (torch's default since
2.4) that `torchrun` and rank 0 host, started as the store benchmarks' reference
(store_ops.sh, benches/benches/store_rendezvous.rs).

Usage: python3 torch_server.py [HOST]   (default 127.0.0.1; port 0: a free one)
Prints one JSON line, {"address": "HOST:PORT", "port": PORT}, as `trainctl store -o json` does,
then serves until its stdin is closed or it is killed. The server runs on torch's own thread; this
thread blocks in a read of stdin (the GIL released), so Python costs the server nothing."""
import json
import resource
import sys
from datetime import timedelta

from torch.distributed import TCPStore

host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
# Each connection is a descriptor, as for `trainctl store` (which raises its soft limit the same way).
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
store = TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                 timeout=timedelta(seconds=300))
print(json.dumps({"address": f"{host}:{store.port}", "port": store.port}), flush=True)
sys.stdin.read()
