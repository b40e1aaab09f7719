#!/usr/bin/env bash
# The device check: what trainctl does on a real GPU host, in one bounded run (about 4 minutes).
#
# Made for the GPU machine some sessions can reach (Ubuntu 24.04, NVIDIA driver 580, CUDA 13, system
# libnccl 2.28, torch with NCCL, libibverbs without an RDMA device, NO cargo): build here in release,
# carry the binaries, run this there from the repository root, read the report it leaves under $OUT.
#
#   cargo build --release --bin trainctl && cargo build --release -p trainctl-benches --bin nccl_init --bin ring_allreduce
#   mkdir -p target-gpu && cp target/release/{trainctl,nccl_init,ring_allreduce} target-gpu/ && strip target-gpu/*
#   # device tool: command "scripts/gpu-check.sh", carry ["target-gpu"]   (/target-* is git-ignored;
#   # the three stripped binaries stay well under the 64 MiB the tool carries)
#
# The binaries are taken from the first of: $1 (a trainctl binary; nccl_init beside it), target-gpu/,
# target/release/, target/debug/.
#
# Steps, each printed as PASS/FAIL/SKIP/INFO with its evidence (the full logs go to $OUT/gpu-check/),
# then a summary table:
#   1. facts: nvidia-smi, the NCCL and ibverbs libraries the loader finds, torch's CUDA and NCCL;
#   2. discovery: an agent of a `trainctl dev` cluster reports the GPUs (count and UUIDs) without --gpus;
#   3. `trainctl preflight` on this host (its checks, and its time against the 10 s goal); a build
#      without the command is reported as SKIP, not as a failure;
#   4. the NCCL example: `trainctl example-train --device cuda`, world size 1 on every GPU at once
#      (NCCL refuses two ranks on one GPU), each ending with the checksum of the CPU run; with two
#      GPUs or more also a 2-rank run (same checksum) and the watchdog: rank 1 is killed mid-run and
#      rank 0 must abort within 30 s instead of hanging;
#   5. a PyTorch NCCL job through trainctl: one rank with gpus_per_node = 1 sees exactly its
#      CUDA_VISIBLE_DEVICES, initialises torch.distributed with NCCL from trainctl's MASTER_ADDR/PORT,
#      all-reduces on the GPU; and the NCCL example as a trainctl job (the agent's GPU by UUID);
#   6. a GPU job that crashes on attempt 0 restarts in place (max_restarts = 1) and succeeds, and no
#      process holds a GPU afterwards;
#   7. the NCCL init benchmark: trainctl's ncclCommInitRank through ffi/ against torch's
#      init_process_group("nccl") + first all-reduce on the same GPU (benches/scripts/nccl_init_driver.py,
#      5 rounds; goal: not slower), reported as INFO with the ratio;
#   8. store ops/s with torch's own client, `trainctl store` next to torch's libuv server
#      (benches/scripts/store_ops_driver.py, 4 clients, 3 rounds), reported as INFO (about 30 s);
#   9. the TCP ring all-reduce against gloo, 64 MiB, 2 and 4 ranks, 3 rounds
#      (benches/scripts/allreduce_driver.py), reported as INFO with the ratios (about 1 minute).
# Exit status: 0 when every step that could run passed, 1 when one failed (or no trainctl binary),
# 2 when there is no GPU (the dry run on a machine without one: it says so and stops).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${1:-}"
if [ -z "$bin" ]; then
    for b in target-gpu/trainctl target/release/trainctl target/debug/trainctl; do
        [ -x "$b" ] && bin="$b" && break
    done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "gpu-check: no trainctl binary (build one here and carry target-gpu/, see the top of this script)" >&2
    exit 1
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
nccl_init="$(dirname "$bin")/nccl_init"
out="${OUT:-/tmp}/gpu-check"
mkdir -p "$out"
python="${TRAINCTL_PYTHON:-python3}"
failed=0
report() { printf '%-6s %s\n' "$1" "$2" | tee -a "$out/report.txt"; [ "$1" = FAIL ] && failed=1; return 0; }
summary() {
    echo
    echo "== gpu-check summary: $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), trainctl $bin =="
    printf '%-6s %s\n' RESULT STEP
    cat "$out/report.txt"
    printf '%s\n' "$(grep -c '^PASS' "$out/report.txt") passed, $(grep -c '^FAIL' "$out/report.txt") failed, $(grep -c '^SKIP' "$out/report.txt") skipped; logs in $out"
}
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
: > "$out/report.txt"

# 1. Facts.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L > "$out/nvidia-smi.txt" 2>&1; then
    report SKIP "no GPU on this host (nvidia-smi absent or failing): nothing to check here"
    summary
    exit 2
fi
report INFO "$(head -1 "$out/nvidia-smi.txt")"
nvidia-smi --query-gpu=name,driver_version,memory.total,uuid --format=csv,noheader >> "$out/nvidia-smi.txt" 2>&1
ldconfig -p 2>/dev/null | grep -E 'libnccl|libibverbs|libnvidia-ml|libcuda\.so' > "$out/libraries.txt"
report INFO "libraries: $(awk '{print $1}' "$out/libraries.txt" | sort -u | tr '\n' ' ')"
if "$python" - > "$out/torch.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), "nccl", ".".join(map(str, torch.cuda.nccl.version())))
assert torch.cuda.is_available()
EOF
then
    report PASS "torch: $(tail -1 "$out/torch.txt")"
    have_torch=1
else
    report FAIL "torch with CUDA not importable by $python (see $out/torch.txt)"
    have_torch=0
fi
expected=$(grep -c '^GPU ' "$out/nvidia-smi.txt" || true)

# 2. Discovery through a real local cluster (one agent; the GPUs are discovered, not declared).
export TRAINCTL_ADDR=http://127.0.0.1:7479
"$bin" dev --agents 1 --listen 127.0.0.1:7479 --data-dir "$out/dev" > "$out/dev.log" 2>&1 &
dev=$!
trap 'kill -INT $dev 2>/dev/null; wait $dev 2>/dev/null' EXIT
for _ in $(seq 1 100); do
    "$bin" nodes -o json > "$out/nodes.json" 2>/dev/null && grep -q '"status": *"up"' "$out/nodes.json" && break
    sleep 0.2
done
"$bin" nodes > "$out/nodes.txt" 2>&1
gpus=$("$python" -c 'import json,sys; n=json.load(open(sys.argv[1])); print(n[0]["gpus"] if n else 0)' "$out/nodes.json" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 1 ] && [ "$gpus" = "$expected" ]; then
    report PASS "discovery: the agent reports $gpus GPU(s): $(tail -n +2 "$out/nodes.txt" | head -1)"
else
    report FAIL "discovery: the agent reports ${gpus:-0} GPU(s), nvidia-smi lists $expected (see $out/nodes.json, $out/dev.log)"
fi
uuid=$(grep -oE 'GPU-[0-9a-f-]{36}' "$out/nvidia-smi.txt" | head -1)
if [ -n "$uuid" ] && "$bin" nodes -o json 2>/dev/null | grep -q "$uuid"; then
    report PASS "discovery: GPU $uuid is reported by UUID"
else
    report INFO "discovery: GPU UUID ${uuid:-?} not found in \`nodes -o json\` (see $out/nodes.json)"
fi

# 3. Pre-flight on this host.
start_ns=$(date +%s%N)
"$bin" preflight > "$out/preflight.txt" 2> "$out/preflight.err"
pf=$?
pf_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
pf_s="$((pf_ms / 1000)).$(printf '%03d' $((pf_ms % 1000)))"
if grep -qiE "unrecognized subcommand|unexpected argument 'preflight'" "$out/preflight.err"; then
    report SKIP "preflight: this trainctl has no \`preflight\` command yet (another change adds it)"
else
    "$bin" preflight -o json > "$out/preflight.json" 2>> "$out/preflight.err"
    checks=$(grep -ciE '\b(pass|ok|fail|skip)' "$out/preflight.txt" || true)
    if [ "$pf" = 0 ]; then
        report PASS "preflight: healthy in ${pf_s}s (goal: under 10 s), $checks check line(s); see $out/preflight.txt"
    else
        report FAIL "preflight: exit $pf after ${pf_s}s: $(grep -iE 'fail' "$out/preflight.txt" | head -3 | tr '\n' ';') (see $out/preflight.txt, .err)"
    fi
fi

# 4. The NCCL example: world size 1 on every GPU at once, each against the CPU run's checksum.
steps=30
ref=$(RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$(free_port)" \
    timeout 60 "$bin" example-train --steps $steps 2> "$out/example-cpu.err" | grep 'final checksum')
pids=()
for i in $(seq 0 $((expected - 1))); do
    CUDA_VISIBLE_DEVICES=$i RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$(free_port)" \
        timeout 120 "$bin" example-train --device cuda --steps $steps \
        > "$out/example-cuda-$i.out" 2> "$out/example-cuda-$i.err" &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    got=$(grep 'final checksum' "$out/example-cuda-$i.out")
    if [ "$rc" = 0 ] && [ -n "$ref" ] && [ "$got" = "$ref" ]; then
        report PASS "example-train --device cuda on GPU $i: ${got#final }, as the CPU run; $(grep -o 'NCCL .*' "$out/example-cuda-$i.err" | head -1)"
    else
        report FAIL "example-train --device cuda on GPU $i: exit $rc, '${got:-no checksum}' vs CPU '${ref:-none}' (see $out/example-cuda-$i.err)"
    fi
done
if [ "$expected" -ge 2 ]; then
    port=$(free_port)
    for r in 0 1; do
        CUDA_VISIBLE_DEVICES=$r RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            timeout 120 "$bin" example-train --device cuda --steps $steps \
            > "$out/example-2rank-$r.out" 2> "$out/example-2rank-$r.err" &
        eval "p$r=\$!"
    done
    wait "$p0"; rc0=$?; wait "$p1"; rc1=$?
    got=$(grep 'final checksum' "$out/example-2rank-0.out")
    if [ "$rc0$rc1" = 00 ] && [ "$got" = "$ref" ]; then
        report PASS "example-train --device cuda, 2 ranks on GPUs 0 and 1: ${got#final }, as the CPU run"
    else
        report FAIL "example-train --device cuda, 2 ranks: exits $rc0/$rc1, '${got:-no checksum}' (see $out/example-2rank-*)"
    fi
    # The watchdog: a rank killed mid-run must not hang its peer. Rank 1 runs without `timeout`, so
    # that $k1 is the rank itself.
    port=$(free_port)
    CUDA_VISIBLE_DEVICES=0 RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        timeout 120 "$bin" example-train --device cuda --steps 1000 --step-delay-ms 20 \
        > "$out/example-kill-0.out" 2> "$out/example-kill-0.err" &
    k0=$!
    CUDA_VISIBLE_DEVICES=1 RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$bin" example-train --device cuda --steps 1000 --step-delay-ms 20 \
        > "$out/example-kill-1.out" 2> "$out/example-kill-1.err" &
    k1=$!
    for _ in $(seq 1 300); do grep -q '^step 20/' "$out/example-kill-0.out" 2>/dev/null && break; sleep 0.1; done
    kill -KILL "$k1" 2>/dev/null
    killed=$(date +%s)
    wait "$k0"; rc0=$?
    wait "$k1" 2>/dev/null
    took=$(( $(date +%s) - killed ))
    if [ "$rc0" != 0 ] && [ "$rc0" != 124 ] && [ "$took" -le 30 ]; then
        report PASS "watchdog: rank 0 stopped ${took}s after rank 1 was killed (exit $rc0): $(tail -1 "$out/example-kill-0.err")"
    else
        report FAIL "watchdog: rank 0 exit $rc0 ${took}s after rank 1 was killed (124: it hung until the timeout; see $out/example-kill-0.err)"
    fi
else
    report SKIP "2-rank NCCL example and watchdog: need two GPUs (this host has $expected)"
fi

# 5. An NCCL all-reduce in a rank placed by trainctl on one GPU.
cat > "$out/nccl_rank.py" <<'EOF'
import os, sys, time, torch, torch.distributed as dist
visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
print("CUDA_VISIBLE_DEVICES", visible, "devices", torch.cuda.device_count(), flush=True)
assert torch.cuda.device_count() == len([v for v in visible.split(",") if v]), "sees other GPUs"
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
if "--crash-first" in sys.argv and attempt == 0:
    torch.ones(1, device="cuda")  # hold the GPU, then die
    print("crashing on attempt 0", flush=True)
    sys.exit(3)
dist.init_process_group("nccl")
t = torch.full((1 << 20,), float(dist.get_rank() + 1), device="cuda")
torch.cuda.synchronize(); start = time.time()
dist.all_reduce(t)
torch.cuda.synchronize()
print("NCCL_ALLREDUCE_OK", float(t[0]), "attempt", attempt, "ms", round((time.time() - start) * 1000, 2), flush=True)
dist.destroy_process_group()
EOF
job() { # name extra-args max_restarts [command: a TOML array, default the torch rank above]
    local cmd="${4:-}"
    [ -n "$cmd" ] || cmd="[\"$python\", \"-u\", \"$out/nccl_rank.py\"$2]"
    cat > "$out/$1.toml" <<EOF
name = "$1"
[launch]
command = $cmd
[resources]
nodes = 1
procs_per_node = 1
gpus_per_node = 1
[failure]
max_restarts = $3
EOF
    timeout 120 "$bin" submit "$out/$1.toml" --wait > "$out/$1.out" 2>&1
    local status=$?
    local id; id=$(grep -oE 'job [0-9]+' "$out/$1.out" | head -1 | cut -d' ' -f2)
    "$bin" status "$id" -o json > "$out/$1.status.json" 2>/dev/null
    "$bin" logs "$id" > "$out/$1.logs" 2>&1
    return $status
}
if [ "$have_torch" = 1 ] && [ "${gpus:-0}" -ge 1 ]; then
    if job nccl-allreduce "" 0 && grep -q NCCL_ALLREDUCE_OK "$out/nccl-allreduce.logs"; then
        report PASS "PyTorch NCCL job through trainctl: $(grep -h NCCL_ALLREDUCE_OK "$out/nccl-allreduce.logs" | head -1)"
    else
        report FAIL "PyTorch NCCL job through trainctl (see $out/nccl-allreduce.out, .logs, .status.json)"
    fi
    # The NCCL example as a trainctl job: the agent's CUDA_VISIBLE_DEVICES (by GPU UUID) and NCCL_*.
    if job nccl-example "" 0 "[\"$bin\", \"example-train\", \"--device\", \"cuda\", \"--steps\", \"$steps\"]" \
        && grep -qF "${ref:-no reference}" "$out/nccl-example.logs"; then
        report PASS "example-train --device cuda as a trainctl job: the CPU run's checksum"
    else
        report FAIL "example-train --device cuda as a trainctl job (see $out/nccl-example.out, .logs)"
    fi
    # 6. A crash on the GPU restarts in place; the GPU is free afterwards.
    if job gpu-restart ', "--crash-first"' 1 && grep -q '"restarts": *1' "$out/gpu-restart.status.json" \
        && grep -q 'NCCL_ALLREDUCE_OK' "$out/gpu-restart.logs"; then
        report PASS "restart in place on the GPU: attempt 1 all-reduced after attempt 0 crashed"
    else
        report FAIL "restart in place on the GPU (see $out/gpu-restart.*)"
    fi
    sleep 1
    left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c . || true)
    if [ "${left:-0}" = 0 ]; then
        report PASS "no process holds a GPU after the jobs"
    else
        report FAIL "$left process(es) still hold a GPU: $(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader | tr '\n' ' ')"
    fi
else
    report SKIP "GPU jobs through trainctl: need torch with CUDA and a discovered GPU"
fi

# 7. NCCL bring-up: trainctl through ffi/ against torch, on the same GPU.
if [ ! -x "$nccl_init" ]; then
    report SKIP "NCCL init benchmark: no nccl_init binary beside $bin (build and carry it, see the top)"
elif [ "$have_torch" = 1 ]; then
    if CUDA_VISIBLE_DEVICES=0 timeout 600 "$python" benches/scripts/nccl_init_driver.py "$nccl_init" 5 \
        --json "$out/nccl-init.json" > "$out/nccl-init.txt" 2>&1; then
        report INFO "NCCL init: $(grep -h 'torch / trainctl' "$out/nccl-init.txt")"
        sed 's/^/       /' "$out/nccl-init.txt" | tee -a "$out/report.txt"
    else
        report FAIL "NCCL init benchmark (see $out/nccl-init.txt)"
    fi
else
    report SKIP "NCCL init benchmark: needs torch with CUDA for its comparison"
fi

# 8. Store ops/s with torch's own client.
if "$python" -c 'import torch.distributed' 2>/dev/null; then
    if timeout 300 "$python" benches/scripts/store_ops_driver.py "$bin" 3 10000 4 \
        > "$out/store-ops.txt" 2> "$out/store-ops.log"; then
        report INFO "store ops/s ($(nproc) cores): $(grep -h 'trainctl / torch' "$out/store-ops.txt")"
    else
        report FAIL "store ops/s benchmark (see $out/store-ops.log)"
    fi
fi
# 9. The TCP ring all-reduce against gloo, 64 MiB, 2 and 4 ranks, where the ranks have cores of
#    their own (the 2-core VM where it is developed shares 2 cores between all ranks).
ring_allreduce="$(dirname "$bin")/ring_allreduce"
if [ ! -x "$ring_allreduce" ]; then
    report SKIP "ring all-reduce against gloo: no ring_allreduce binary beside $bin (build and carry it, see the top)"
elif "$python" -c 'import torch.distributed' 2>/dev/null; then
    if OMP_NUM_THREADS=1 timeout 300 "$python" benches/scripts/allreduce_driver.py "$ring_allreduce" 2,4 3 \
        67108864 2 10 > "$out/allreduce.txt" 2> "$out/allreduce.log"; then
        report INFO "ring all-reduce vs gloo ($(nproc) cores): $(grep -h 'ranks: trainctl' "$out/allreduce.txt" | sed 's/ (gloo median.*//' | paste -sd';')"
        sed 's/^/       /' "$out/allreduce.txt" | tee -a "$out/report.txt"
    else
        report FAIL "ring all-reduce against gloo (see $out/allreduce.log)"
    fi
fi
summary
exit "$failed"
