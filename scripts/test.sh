#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need, then runs every test of the workspace.
#
# Needs: a Rust toolchain (cargo) and python3. Installs by itself: curl and libibverbs1 (Debian packages,
# when root and missing; libibverbs1 is what trainctl-ffi's verbs tests open at run time) and a Python
# virtual environment with CPU-usable torch and NCCL's wheel (scripts/python-env.sh, cached in .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# (grep without -q reads all of ldconfig's output: with pipefail an early exit would fail the pipe)
{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep 'libibverbs\.so\.1 ' >/dev/null \
    || need_apt+=(libibverbs1)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing ${need_apt[*]}" >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
    else
        echo "test.sh: please install: ${need_apt[*]}" >&2
        exit 1
    fi
fi

echo "test.sh: preparing the Python environment with torch and schemathesis (for the PyTorch and OpenAPI fuzz tests)" >&2
scripts/python-env.sh >/dev/null

# Property tests (proptest) explore the same inputs on every run of this command, so a run's result
# does not depend on luck; set PROPTEST_RNG_SEED to explore others.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261130}"

echo "test.sh: cargo test --workspace" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary, the last often a doc-test
# binary with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) ig += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, ig }' "$log"
exit "$status"
