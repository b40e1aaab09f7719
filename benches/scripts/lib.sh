# Shared by the failure benches (restart_vs_torchrun.sh, host_loss.sh, checkpoint_commit_latency.sh);
# sourced, not run. Picks the trainctl binary, the Python environment, a work dir, and starts/stops a
# `trainctl dev` cluster on loopback. Everything started here is stopped by `bench_cleanup` (EXIT trap).

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD
# The binary: TRAINCTL_BIN if set, else target/release/trainctl, else target/debug/trainctl (no build:
# a release build takes minutes). It is copied, so a rebuild by someone else mid-run changes nothing.
work=$(mktemp -d "${TMPDIR:-/tmp}/trainctl-bench.XXXXXX")
src_bin=${TRAINCTL_BIN:-}
if [ -z "$src_bin" ]; then
    if [ -x target/release/trainctl ]; then src_bin=target/release/trainctl; else src_bin=target/debug/trainctl; fi
fi
[ -x "$src_bin" ] || { echo "no trainctl binary (run cargo build, or set TRAINCTL_BIN)" >&2; exit 1; }
case "$src_bin" in *release*) profile=release ;; *debug*) profile=debug ;; *) profile=custom ;; esac
cp "$src_bin" "$work/trainctl"
bin=$work/trainctl
py=$(scripts/python-env.sh)
export PATH="$(dirname "$py"):$PATH"   # python3 and torchrun of the venv, for us and for the agents
export OMP_NUM_THREADS=1
dev_pid=
bench_cleanup() {
    if [ -n "$dev_pid" ]; then kill -TERM "$dev_pid" 2>/dev/null; wait "$dev_pid" 2>/dev/null; fi
    if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$work"; else echo "work dir kept: $work" >&2; fi
}
trap bench_cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_dev AGENTS [extra dev flags...]: a cluster on a free port; sets $addr and $dev_pid.
start_dev() {
    local agents=$1; shift
    addr=127.0.0.1:$(free_port)
    "$bin" dev --agents "$agents" --listen "$addr" --data-dir "$work/dev" -o json "$@" >"$work/dev.out" 2>&1 &
    dev_pid=$!
    for _ in $(seq 1 600); do grep -q coordinator "$work/dev.out" 2>/dev/null && break; sleep 0.1; done
    grep -q coordinator "$work/dev.out" || { echo "trainctl dev did not come up: $(cat "$work/dev.out")" >&2; exit 1; }
}
