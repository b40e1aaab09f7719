#!/usr/bin/env python3
"""Workload of benches/scripts/checkpoint_commit_latency.sh, one rank, standard library only.

Commits N checkpoints (default 200) one after another through the agent: POST
$TRAINCTL_AGENT_URL/v1/checkpoints with the job token, each a path inside $TRAINCTL_CHECKPOINT_DIR
(an empty directory written first, outside the timing). Prints one `COMMIT_MS i ms` line per commit
(request sent -> 2xx read, on one persistent HTTP/1.1 connection), then `COMMIT_DONE`.
"""
import http.client
import json
import os
import sys
import time
import urllib.parse

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
url = urllib.parse.urlsplit(os.environ["TRAINCTL_AGENT_URL"])
ckpt = os.environ["TRAINCTL_CHECKPOINT_DIR"]
headers = {"Content-Type": "application/json", "Authorization": "Bearer " + os.environ["TRAINCTL_JOB_TOKEN"]}
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
out = []
for i in range(1, n + 1):
    path = os.path.join(ckpt, f"step-{i}")
    os.makedirs(path, exist_ok=True)
    body = json.dumps({"path": path, "step": i, "metrics": {"loss": 1.0 / i}})
    t = time.perf_counter()
    conn.request("POST", "/v1/checkpoints", body, headers)
    r = conn.getresponse()
    data = r.read()
    ms = (time.perf_counter() - t) * 1000
    if not 200 <= r.status < 300:
        sys.exit(f"COMMIT_FAIL step {i}: HTTP {r.status} {data[:300]!r}")
    out.append(f"COMMIT_MS {i} {ms:.3f}")
print("\n".join(out), flush=True)
print("COMMIT_DONE", flush=True)
