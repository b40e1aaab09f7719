#!/usr/bin/env bash
# Restart after a rank crash, torchrun vs trainctl, side by side in one run.
#
# The same PyTorch script (benches/scripts/restart/crash_once.py: gloo on CPU, 2 ranks on this machine)
# inits the process group, does one all-reduce and prints a wall-clock timestamp (time.time()) when it
# completes; on attempt 0 (TORCHELASTIC_RESTART_COUNT) rank 1 prints a timestamp and exits 1 right after
# it. It is run RUNS times (default 4) under each launcher:
#   1. torchrun --standalone --nproc-per-node 2 --max-restarts 1 crash_once.py
#   2. trainctl: a job (1 host x procs_per_node 2, [failure] max_restarts = 1, command
#      ["python3", "-u", "crash_once.py"]) submitted to a `trainctl dev --agents 2` cluster; the
#      timestamps are read back with `trainctl logs ID --attempt 0|1`.
# Measured per run, from the crash timestamp:
#   - respawn: until the later of attempt 1's two processes runs its first statement (before
#     `import torch`): what the launcher itself costs (detect the exit, stop the gang, start it again);
#   - first collective: until attempt 1's first all-reduce has completed on both ranks (includes
#     `import torch`, several seconds on a small machine, and the rendezvous). Only for runs whose
#     restart worked; a run whose attempt 1 did not complete an all-reduce counts as a failed restart.
# Prints p50/min/max of each, the ratio torchrun/trainctl, and the failed restarts per launcher.
# Bounded: a run is cut after RUN_TIMEOUT_S (default 60 s); about 3 minutes in all with RUNS=4 on 2 cores
# (`import torch` dominates: 2 to 5 s a process, 7 to 11 s when the machine is loaded).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs=${RUNS:-4}
run_timeout=${RUN_TIMEOUT_S:-60}
wl_dir=$repo/benches/scripts/restart

python3 -c 'import torch' # warm the page cache once for everyone
start_dev 2
cat >"$work/job.toml" <<TOML
name = "restart-bench"
[launch]
command = ["python3", "-u", "crash_once.py"]
workdir = "$wl_dir"
env = { PYTHONUNBUFFERED = "1", OMP_NUM_THREADS = "1", BENCH_PG_TIMEOUT_S = "30" }
[resources]
nodes = 1
procs_per_node = 2
gpus_per_node = 0
[failure]
max_restarts = 1
TOML

for i in $(seq 1 "$runs"); do
    # torchrun: every rank's stdout goes to torchrun's
    ( cd "$wl_dir" && BENCH_PG_TIMEOUT_S=30 timeout -k 5 "$run_timeout" \
        torchrun --standalone --nproc-per-node 2 --max-restarts 1 crash_once.py ) >"$work/torchrun-$i.log" 2>&1 || true
    # trainctl
    id=$(timeout -k 5 "$run_timeout" "$bin" submit "$work/job.toml" --addr "$addr" -o json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    for _ in $(seq 1 $((run_timeout * 10))); do
        state=$("$bin" status "$id" --addr "$addr" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
        case "$state" in succeeded|failed|cancelled) break ;; esac
        sleep 0.1
    done
    [ "$state" = succeeded ] || "$bin" cancel "$id" --addr "$addr" >/dev/null 2>&1 || true
    { "$bin" logs "$id" --attempt 0 --addr "$addr"; "$bin" logs "$id" --attempt 1 --addr "$addr" || true; } >"$work/trainctl-$i.log" 2>&1
    echo "run $i/$runs: torchrun exit $(grep -c 'BENCH_ALLREDUCE attempt=1' "$work/torchrun-$i.log") of 2 ranks restarted; trainctl job $id $state" >&2
done

python3 - "$work" "$runs" "$profile" <<'PY'
import re, statistics, sys
work, runs, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pat = re.compile(r"BENCH_(\w+) attempt=(\d+) rank=(\d+) t=([\d.]+)")
res = {}
for launcher in ("torchrun", "trainctl"):
    respawn, collective, failed = [], [], 0
    for i in range(1, runs + 1):
        ev = {}
        for m in pat.finditer(open(f"{work}/{launcher}-{i}.log", errors="replace").read()):
            ev[(m[1], int(m[2]), int(m[3]))] = float(m[4])
        crash = ev.get(("CRASH", 0, 1))
        starts = [ev.get(("START", 1, r)) for r in (0, 1)]
        reduces = [ev.get(("ALLREDUCE", 1, r)) for r in (0, 1)]
        if crash is None:
            print(f"{launcher} run {i}: no crash line (attempt 0 did not get to its all-reduce)", file=sys.stderr)
            failed += 1
            continue
        if None not in starts:
            respawn.append(max(starts) - crash)
        if None in reduces:
            failed += 1
        else:
            collective.append(max(reduces) - crash)
    res[launcher] = (respawn, collective, failed)

def stats(xs):
    return (f"{statistics.median(xs):8.3f} {min(xs):8.3f} {max(xs):8.3f}" if xs else f"{'-':>8} {'-':>8} {'-':>8}")
print(f"\nrestart after a rank crash, {runs} runs each, trainctl {profile} build; seconds from the crash")
print(f"{'launcher':<10} {'respawn p50':>11} {'min':>8} {'max':>8} | {'1st coll. p50':>13} {'min':>8} {'max':>8} | failed restarts")
for launcher, (respawn, collective, failed) in res.items():
    print(f"{launcher:<10} {stats(respawn):>29} | {stats(collective):>31} | {failed} of {runs}")
t, c = res["torchrun"], res["trainctl"]
for name, k in (("respawn", 0), ("first collective", 1)):
    if t[k] and c[k]:
        print(f"torchrun / trainctl, {name} p50: {statistics.median(t[k]) / statistics.median(c[k]):.2f}")
    else:
        print(f"torchrun / trainctl, {name} p50: n/a (a launcher had no successful run)")
PY
