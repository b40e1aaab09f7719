#!/usr/bin/env bash
# All-reduce (sum) of 64 MiB of f32 on loopback, side by side in one run: trainctl's TCP ring
# (collective's TcpRing, `all_reduce_sum_f32`) against torch.distributed's gloo all-reduce, with 2 and
# 4 ranks. Each rank is a process of its own: benches/src/bin/ring_allreduce.rs for trainctl (which
# meets the others through rank 0 from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as
# `trainctl example-train` does) and benches/scripts/allreduce/gloo_rank.py for gloo
# (init_process_group("gloo", "env://")). Each run does WARMUP (default 2) untimed and ITERS (default 10)
# timed all-reduces and checks every result against the exact sum; the sides take turns, ROUNDS
# (default 5) runs each per world size. The table gives medians, algorithm and bus bandwidth (as
# nccl-tests define them), CPU per call, and the speed ratio (goal: trainctl at least 1.2x gloo).
# allreduce_driver.py has the details.
#
# Builds the rank program (release) and makes the Python environment (scripts/python-env.sh, .venv).
# Knobs: WORLDS (default 2,4), ROUNDS, BYTES (default 67108864), WARMUP, ITERS,
# CARGO_TARGET_DIR (where cargo builds; default target/). About 3 minutes once built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet -p trainctl-benches --bin ring_allreduce
work=$(mktemp -d "${TMPDIR:-/tmp}/trainctl-allreduce.XXXXXX")
trap 'rm -rf "$work"' EXIT
# A copy, so a rebuild by someone else mid-run changes nothing.
cp "$target/release/ring_allreduce" "$work/ring_allreduce"
py=$(scripts/python-env.sh)
export OMP_NUM_THREADS=1   # as the other torch benches; gloo's reduction is single-threaded anyway
echo "ring_allreduce release build; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); torch $("$py" -c 'import torch; print(torch.__version__)'); $(getconf _NPROCESSORS_ONLN) cores" >&2
"$py" benches/scripts/allreduce_driver.py "$work/ring_allreduce" "${WORLDS:-2,4}" "${ROUNDS:-5}" \
    "${BYTES:-67108864}" "${WARMUP:-2}" "${ITERS:-10}"
