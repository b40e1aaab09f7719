#!/usr/bin/env bash
# Checkpoint commit latency: a rank's POST $TRAINCTL_AGENT_URL/v1/checkpoints -> 2xx, next to an
# in-memory PyTorch TCPStore write.
#
# On a `trainctl dev --agents 1` cluster, a one-rank job (with a `[checkpoint] dir`) runs
# benches/scripts/ckpt/commit_loop.py: COMMITS (default 200) commits one after another, each timed in
# the rank from sending the request to reading the 2xx. A 2xx means the agent forwarded the commit to the
# coordinator over gRPC and the coordinator wrote it to its Raft log and fsync'd it (durable: a restart
# resumes from it). The reference, benches/scripts/ckpt/tcpstore_loop.py, does the same number of
# torch.distributed.TCPStore `set` calls (and `set` + `get` round trips) on a store served in-process:
# an in-memory write with no durability at all, so it is a floor for a control-plane write, not a
# like-for-like rival. A disk reference (300-byte append + fdatasync in the work dir) is printed too.
# Prints p50/p99/max of each and the ratios. About 30 s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
commits=${COMMITS:-200}
start_dev 1
cat >"$work/job.toml" <<TOML
name = "commit-latency-bench"
[launch]
command = ["python3", "-u", "commit_loop.py", "$commits"]
workdir = "$repo/benches/scripts/ckpt"
[resources]
nodes = 1
procs_per_node = 1
[checkpoint]
dir = "$work/ckpt/{job}"
TOML
id=$("$bin" submit "$work/job.toml" --wait --addr "$addr" -o json | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["id"]) if j["state"]=="succeeded" else sys.exit("job failed: "+str(j.get("reason")))')
"$bin" logs "$id" --addr "$addr" >"$work/commit.log"
grep -q COMMIT_DONE "$work/commit.log" || { echo "the commit job did not finish:" >&2; tail "$work/commit.log" >&2; exit 1; }
python3 benches/scripts/ckpt/tcpstore_loop.py "$commits" >"$work/tcpstore.log"
python3 - "$work" "$commits" "$profile" <<'PY'
import re, sys
work, n, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def col(file, tag):
    return sorted(float(m[1]) for m in re.finditer(rf"{tag} \d+ ([\d.]+)", open(file).read()))
def pct(xs, p):
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
rows = [("trainctl commit (agent -> Raft, fsync'd)", col(f"{work}/commit.log", "COMMIT_MS")),
        ("TCPStore set (in memory, one-way)", col(f"{work}/tcpstore.log", "SET_MS")),
        ("TCPStore set + get (in memory, round trip)", col(f"{work}/tcpstore.log", "SETGET_MS"))]
import os, time
disk = []
with open(f"{work}/fsync-probe", "ab") as f:
    for _ in range(n):
        t = time.perf_counter(); f.write(b"x" * 300); f.flush(); os.fdatasync(f.fileno())
        disk.append((time.perf_counter() - t) * 1000)
rows.append(("disk: 300-byte append + fdatasync", sorted(disk)))
print(f"\ncheckpoint commit latency, {n} sequential writes each, trainctl {profile} build; ms")
print(f"{'write':<44} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}")
for label, xs in rows:
    print(f"{label:<44} {len(xs):>4} {pct(xs, 50):8.3f} {pct(xs, 99):8.3f} {xs[-1]:8.3f}")
c = rows[0][1]
for label, xs in rows[1:3]:
    print(f"commit / {label.split(' (')[0]}: p50 {pct(c, 50) / pct(xs, 50):.0f}x, p99 {pct(c, 99) / pct(xs, 99):.0f}x")
PY
