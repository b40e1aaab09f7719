#!/usr/bin/env bash
# Launch overhead, side by side in one run: the same PyTorch DDP job (jobs/examples/ddp-torch, gloo,
# 2 hosts x 2 ranks, 5 steps) started
#   1. by hand: four python processes with the torchrun environment set directly (the floor);
#   2. by torchrun: two `torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 2` (static rendezvous);
#   3. by trainctl: `trainctl submit --wait` on a running `trainctl dev --agents 2` cluster.
# Each is run RUNS times (default 3); the table shows the median wall time and the ratio to torchrun.
# Only loopback addresses are used; every process started here is stopped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
runs=${RUNS:-3}
cargo build --release -q
bin=$PWD/target/release/trainctl
py=$(scripts/python-env.sh)
venv_bin=$(dirname "$py")
export PATH="$venv_bin:$PATH"
work=$(mktemp -d)
dev_pid=
cleanup() { [ -n "$dev_pid" ] && kill -TERM "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
script=jobs/examples/ddp-torch/train.py

by_hand() {
    local port pids=(); port=$(free_port)
    for r in 0 1 2 3; do
        RANK=$r WORLD_SIZE=4 LOCAL_RANK=$((r % 2)) LOCAL_WORLD_SIZE=2 GROUP_RANK=$((r / 2)) GROUP_WORLD_SIZE=2 \
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 python3 -u $script --steps 5 >"$work/hand-$r.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
}
by_torchrun() {
    local port pids=(); port=$(free_port)
    for n in 0 1; do
        torchrun --nnodes 2 --node-rank $n --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$port" \
            $script --steps 5 >"$work/torchrun-$n.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
}
by_trainctl() {
    "$bin" submit jobs/examples/ddp-torch/ddp-torch.toml --wait --addr "$addr" >"$work/trainctl.log" 2>&1
}

addr=127.0.0.1:$(free_port)
"$bin" dev --agents 2 --listen "$addr" --data-dir "$work/dev" -o json >"$work/dev.out" 2>&1 &
dev_pid=$!
for _ in $(seq 1 600); do grep -q coordinator "$work/dev.out" 2>/dev/null && break; sleep 0.1; done
grep -q coordinator "$work/dev.out" || { echo "trainctl dev did not come up: $(cat "$work/dev.out")" >&2; exit 1; }

python3 -c 'import torch' # warm the page cache once for everyone
declare -A results
for launcher in by_hand by_torchrun by_trainctl; do
    times=()
    for _ in $(seq 1 "$runs"); do
        start=$(now); $launcher; end=$(now)
        times+=("$(awk "BEGIN { print $end - $start }")")
    done
    results[$launcher]=$(printf '%s\n' "${times[@]}" | median)
done
grep -q "TORCH_DDP_OK" "$work/trainctl.log" || grep -q succeeded "$work/trainctl.log" || { echo "trainctl run failed:" >&2; cat "$work/trainctl.log" >&2; exit 1; }
printf '%-28s %10s %14s\n' "launcher ($runs runs)" "median s" "vs torchrun"
for launcher in by_hand by_torchrun by_trainctl; do
    printf '%-28s %10.2f %14.2f\n' "$launcher" "${results[$launcher]}" "$(awk "BEGIN { print ${results[$launcher]} / ${results[by_torchrun]} }")"
done
