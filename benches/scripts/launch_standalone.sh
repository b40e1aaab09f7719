#!/usr/bin/env bash
# Launch overhead on one host, side by side in one run: the same PyTorch DDP job
# (jobs/examples/ddp-torch/train.py --steps 5: gloo, 1 host x 2 ranks, 5 steps plus the checks) started
#   1. by hand: two python processes with the torchrun environment set directly (the floor);
#   2. by `torchrun --standalone --nproc-per-node 2`;
#   3. by `trainctl run --standalone --nproc-per-node 2` (the drop-in: one word changed);
#   4. on a cluster: `trainctl run --cluster --nproc-per-node 2` against a running
#      `trainctl dev --agents 1`; where `--cluster` does not run the job (a binary from before it
#      existed), the same job as a job file (1 host x procs_per_node 2) with `trainctl submit --wait
#      --follow`, which also streams the output, and the table says which one ran.
# The launchers take turns (run i starts with launcher i mod 4), RUNS rounds (default 5); the table
# shows each launcher's median wall time and its ratio to by hand (goal: trainctl run within 10%).
# `import torch` alone varies by a second or more from process to process here, so the table also
# splits each run: every rank prints `done ... total_s=S` (seconds since its first line ran); the
# slowest rank's S is the ranks' own time, and wall minus that is the time spent outside the ranks
# (starting the interpreter and the launcher, the rendezvous before the ranks run, teardown). By
# hand, that is Python's own start and exit (under a second here); a launcher's cost is its excess.
# Every run must print TORCH_DDP_OK, or the script stops. Does not build: it takes TRAINCTL_BIN, else
# target/release/trainctl (lib.sh). Loopback only; everything started here is stopped at the end.
# About 2 minutes with RUNS=5 (`import torch` dominates: 2 to 5 s a process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs=${RUNS:-5}
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
example=$repo/jobs/examples/ddp-torch
script=$example/train.py

by_hand() {
    local port pids=(); port=$(free_port)
    for r in 0 1; do
        RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 GROUP_RANK=0 GROUP_WORLD_SIZE=1 \
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 python3 -u "$script" --steps 5 >"$work/out-$r.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    cat "$work"/out-[01].log
}
by_torchrun() { torchrun --standalone --nproc-per-node 2 "$script" --steps 5 2>&1; }
by_trainctl_run() { "$bin" run --standalone --nproc-per-node 2 "$script" --steps 5 2>&1; }
by_trainctl_cluster() {
    if [ "$cluster_mode" = run ]; then
        (cd "$example" && "$bin" run --cluster --addr "$addr" --nproc-per-node 2 train.py --steps 5 2>&1)
    else
        "$bin" submit "$work/job.toml" --wait --follow --addr "$addr" 2>&1
    fi
}

start_dev 1
cat >"$work/job.toml" <<TOML
name = "launch-bench"
[launch]
command = ["python3", "-u", "train.py", "--steps", "5"]
workdir = "$example"
env = { PYTHONUNBUFFERED = "1", OMP_NUM_THREADS = "1" }
[resources]
nodes = 1
procs_per_node = 2
gpus_per_node = 0
TOML
python3 -c 'import torch' # warm the page cache once for everyone
# `trainctl run --cluster` if it works here, else `trainctl submit --wait` of the same job.
cluster_mode=run
if ! by_trainctl_cluster >"$work/probe.log" 2>&1 || ! grep -q TORCH_DDP_OK "$work/probe.log"; then
    echo "trainctl run --cluster did not run the job here ($(grep -m1 -i error "$work/probe.log" || tail -1 "$work/probe.log")); measuring trainctl submit --wait instead" >&2
    cluster_mode=submit
fi

launchers=(by_hand by_torchrun by_trainctl_run by_trainctl_cluster)
declare -A times outside
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for i in $(seq 1 "$runs"); do
    for k in 0 1 2 3; do
        launcher=${launchers[$(((i - 1 + k) % 4))]}
        start=$(now); $launcher >"$work/$launcher-$i.log" 2>&1 || true; end=$(now)
        grep -q TORCH_DDP_OK "$work/$launcher-$i.log" || { echo "$launcher run $i failed:" >&2; tail -20 "$work/$launcher-$i.log" >&2; exit 1; }
        times[$launcher]+="$(awk "BEGIN { print $end - $start }") "
        ranks_s=$(grep -o 'total_s=[0-9.]*' "$work/$launcher-$i.log" | cut -d= -f2 | sort -n | tail -1) \
            || { echo "$launcher run $i: no rank printed total_s" >&2; exit 1; }
        outside[$launcher]+="$(awk "BEGIN { print $end - $start - $ranks_s }") "
    done
    echo "run $i/$runs: $(for l in "${launchers[@]}"; do printf '%s %s  ' "$l" "$(echo "${times[$l]}" | awk '{print $NF}')"; done)load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

label_cluster="trainctl run --cluster"
[ "$cluster_mode" = run ] || label_cluster="trainctl submit --wait (cluster)"
echo
echo "launch overhead, ddp-torch 1 host x 2 ranks (gloo), $runs runs each taking turns; trainctl $profile build, commit $(git rev-parse --short HEAD)"
echo "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg); $(getconf _NPROCESSORS_ONLN) cores"
hand=$(echo "${times[by_hand]}" | tr ' ' '\n' | grep . | median)
printf '| %-34s | %8s | %6s | %6s | %8s | %18s |\n' launcher "median s" "min s" "max s" "vs hand" "outside ranks s"
printf '|%s|---:|---:|---:|---:|---:|\n' "------------------------------------"
for launcher in "${launchers[@]}"; do
    case $launcher in
        by_hand) label="by hand" ;; by_torchrun) label="torchrun --standalone" ;;
        by_trainctl_run) label="trainctl run --standalone" ;; by_trainctl_cluster) label=$label_cluster ;;
    esac
    xs=$(echo "${times[$launcher]}" | tr ' ' '\n' | grep .)
    m=$(echo "$xs" | median)
    printf '| %-34s | %8.2f | %6.2f | %6.2f | %8.2f | %18.2f |\n' "$label" "$m" "$(echo "$xs" | sort -n | head -1)" \
        "$(echo "$xs" | sort -n | tail -1)" "$(awk "BEGIN { print $m / $hand }")" \
        "$(echo "${outside[$launcher]}" | tr ' ' '\n' | grep . | median)"
done
