#!/usr/bin/env bash
# Host loss: a host of a running gang dies (its agent is SIGKILLed) -> the gang runs again elsewhere.
#
# A `trainctl dev --agents 3` cluster (3 loopback hosts) runs a 2-host job (procs_per_node 1) of the
# built-in workload, `trainctl example-train --steps 2000 --step-delay-ms 20 --checkpoint-every 50`,
# with a `[checkpoint] dir`. Once the first checkpoint is committed, the agent of the group-rank-1 host
# is SIGKILLed (its pid found with `pgrep -f "agent .*--name node-N "`) and the kill time recorded. The
# job must be placed again on the two live hosts, resume from the checkpoint and step on.
# example-train prints no timestamps, so a poller (this script's Python, GET /v1/jobs/ID every 10 ms
# and the agents' on-disk rank logs, <data-dir>/.../runs/.../rank-N.log, every 10 ms) timestamps:
#   detected:  attempt 0's ended_at_ms in the job record (the coordinator declared the host lost);
#   placed:    attempt 1's started_at_ms (the new gang is in Raft and its hosts are told);
#   started:   the later start time of attempt 1's rank processes (/proc/PID/stat, 10 ms ticks);
#   stepped:   the first `step N/2000` line of attempt 1 in a rank log on disk (a poll, +<=10 ms);
#   shipped:   the first step line of attempt 1 visible through GET /v1/jobs/ID/logs (log shipping).
# All are measured from the kill. RUNS times (default 3), each on a fresh cluster. The node timeout is
# the coordinator's --node-timeout-ms, NODE_TIMEOUT_MS here (default 2000, the dev default).
# Bounded: a run gives up after 60 s; about 1 minute in all with RUNS=3.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs=${RUNS:-3}
node_timeout=${NODE_TIMEOUT_MS:-2000}
for i in $(seq 1 "$runs"); do
    start_dev 3 --node-timeout-ms "$node_timeout"
    cat >"$work/job.toml" <<TOML
name = "host-loss-bench"
[launch]
command = ["$bin", "example-train", "--steps", "2000", "--step-delay-ms", "20", "--checkpoint-every", "50"]
[resources]
nodes = 2
procs_per_node = 1
[failure]
max_restarts = 1
[checkpoint]
dir = "$work/ckpt/{job}"
TOML
    python3 "$repo/benches/scripts/host_loss_driver.py" "$bin" "$addr" "$work/job.toml" "$work/dev" \
        >"$work/run-$i.json" || { echo "run $i failed" >&2; cat "$work/run-$i.json" >&2; exit 1; }
    cat "$work/run-$i.json" >&2
    kill -TERM "$dev_pid" 2>/dev/null; wait "$dev_pid" 2>/dev/null || true; dev_pid=
done
python3 - "$work" "$runs" "$profile" "$node_timeout" <<'PY'
import json, statistics, sys
work, runs, profile, nt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rs = [json.load(open(f"{work}/run-{i}.json")) for i in range(1, runs + 1)]
print(f"\nhost loss -> resumed gang, {runs} runs, trainctl {profile} build, --node-timeout-ms {nt}; seconds from the SIGKILL")
print(f"{'phase':<48} {'p50':>7} {'min':>7} {'max':>7}")
rows = [("detected (attempt 0 ended: host declared lost)", "detected"),
        ("placed (attempt 1 started in Raft)", "placed"),
        ("started (both new rank processes exist)", "started"),
        ("stepped (first step line of attempt 1, disk)", "stepped"),
        ("shipped (that line readable via REST)", "shipped")]
for label, k in rows:
    xs = [r[k] for r in rs if r.get(k) is not None]
    print(f"{label:<48} " + (f"{statistics.median(xs):7.3f} {min(xs):7.3f} {max(xs):7.3f}" if xs else "      -"))
print("resumed at step: " + ", ".join(str(r.get("resumed_step")) for r in rs)
      + "; new hosts: " + "; ".join(",".join(r.get("new_nodes", [])) for r in rs))
PY
