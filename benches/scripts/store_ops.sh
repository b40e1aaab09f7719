#!/usr/bin/env bash
# Store operations/s with torch's own client, side by side in one run: `trainctl store` vs torch's
# libuv TCPStore server, each driven by CLIENTS (default 4) Python processes using torch's
# `TCPStore(..., is_master=False)`, every client ITERS (default 10 000) times set/get/add on keys of its
# own. The servers alternate, ROUNDS (default 3) rounds each, a fresh server process per measurement;
# the summary gives the median ops/s of each, the ratio (goal: trainctl at least 1.5x), the servers'
# CPU per 1 000 operations and the load average. benches/scripts/store_ops_driver.py has the details.
# Does not build: takes TRAINCTL_BIN, else target/release/trainctl (lib.sh). About 1 minute.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rounds=${ROUNDS:-3}
iters=${ITERS:-10000}
clients=${CLIENTS:-4}
echo "trainctl $profile build; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(getconf _NPROCESSORS_ONLN) cores" >&2
python3 "$repo/benches/scripts/store_ops_driver.py" "$bin" "$rounds" "$iters" "$clients"
