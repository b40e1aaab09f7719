#!/usr/bin/env python3
"""All-reduce of f32 on loopback: trainctl's TCP ring next to torch's gloo, side by side in one run.

Run by allreduce_vs_gloo.sh (which builds the rank program and picks the Python environment):
    python3 allreduce_driver.py RING_BIN WORLDS ROUNDS BYTES WARMUP ITERS

For each world size in WORLDS (comma-separated, default 2,4), ROUNDS rounds (default 5 in the script); each round starts every
rank of each side as a fresh process group, the sides taking turns (trainctl first in odd rounds, gloo
first in even rounds):
    trainctl: RING_BIN (benches/src/bin/ring_allreduce.rs) per rank, meeting through rank 0 at
              MASTER_ADDR=127.0.10.41 (TRAINCTL_NODE_ADDR=127.0.10.41 for the ring's data listeners);
    gloo:     allreduce/gloo_rank.py per rank, init_process_group("gloo", "env://") with rank 0's
              TCPStore at MASTER_ADDR=127.0.10.42; GLOO_SOCKET_IFNAME=lo, so gloo's connections use
              lo's address (127.0.0.1: gloo takes the interface's address, not MASTER_ADDR).
Every rank runs WARMUP untimed and ITERS timed all-reduces of BYTES bytes (refill, barrier, then the
timed call), and checks every result against the exact sum: a wrong sum fails the run.

A call's time is the slowest rank's (as nccl-tests report); the table gives, per side and world size,
the median, min and max over all rounds' timed calls, and from the median:
    algbw = BYTES / time                 (GB/s, 1e9 bytes)
    busbw = algbw * 2 (n - 1) / n        (nccl-tests' bus bandwidth for all-reduce: what each rank's
                                          link carries, comparable across world sizes)
and the CPU time one call used, summed over the ranks (median), against the wall time: near
cores x wall, the call was CPU-bound. speed ratio = gloo median / trainctl median (goal: at least 1.2).
On a machine shared with other work, a run's calls are slowed by whatever else runs meanwhile (with
sched_autogroup, another busy session takes a core from the whole benchmark), so the table also gives
each side's best run (the lowest per-run median: the run least disturbed) and the ratio of those, and
the CPU per call, which other work hardly changes.
Progress goes to stderr, the summary to stdout."""
import json
import os
import socket
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINCTL_ADDR = "127.0.10.41"
GLOO_ADDR = "127.0.10.42"
RUN_TIMEOUT_S = 600
GOAL_RATIO = 1.2


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port(addr):
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def rank_argv(kind, ring_bin, nbytes, warmup, iters):
    flags = ["--bytes", str(nbytes), "--warmup", str(warmup), "--iters", str(iters)]
    if kind == "trainctl":
        return [ring_bin] + flags
    return [sys.executable, os.path.join(HERE, "allreduce", "gloo_rank.py")] + flags


def measure(kind, world, ring_bin, nbytes, warmup, iters):
    """One process group of `world` ranks; returns (per-call wall s, per-call CPU s summed over ranks)."""
    addr = TRAINCTL_ADDR if kind == "trainctl" else GLOO_ADDR
    port = free_port(addr)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR=addr, MASTER_PORT=str(port))
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        if kind == "trainctl":
            env["TRAINCTL_NODE_ADDR"] = addr
        else:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        procs.append(subprocess.Popen(rank_argv(kind, ring_bin, nbytes, warmup, iters), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, failures = [], []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=RUN_TIMEOUT_S)
            if p.returncode != 0:
                failures.append(f"{kind} rank {rank} exited {p.returncode}: {err.strip()[-2000:]}")
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failures:
        raise SystemExit("\n".join(failures))
    for r in results:
        if (r["impl"], r["world_size"], r["bytes"], len(r["times_s"])) != (kind, world, nbytes, iters):
            raise SystemExit(f"{kind} rank {r['rank']} reported another run: {r}")
    walls = [max(r["times_s"][i] for r in results) for i in range(iters)]
    cpus = [sum(r["cpu_s"][i] for r in results) for i in range(iters)]
    return walls, cpus


def main():
    ring_bin, worlds = sys.argv[1], [int(w) for w in sys.argv[2].split(",")]
    rounds, nbytes, warmup, iters = (int(a) for a in sys.argv[3:7])
    kinds = ("trainctl", "gloo")
    load_start = loadavg()
    walls = {(k, w): [] for k in kinds for w in worlds}
    cpus = {(k, w): [] for k in kinds for w in worlds}
    run_medians = {(k, w): [] for k in kinds for w in worlds}
    for world in worlds:
        for r in range(1, rounds + 1):
            for kind in (kinds if r % 2 == 1 else kinds[::-1]):
                w, c = measure(kind, world, ring_bin, nbytes, warmup, iters)
                walls[(kind, world)] += w
                cpus[(kind, world)] += c
                run_medians[(kind, world)].append(statistics.median(w))
                print(f"{world} ranks, round {r}/{rounds}, {kind:<8}: median {statistics.median(w) * 1e3:8.1f} ms "
                      f"(min {min(w) * 1e3:.1f}, max {max(w) * 1e3:.1f}), CPU {statistics.median(c) * 1e3:.0f} ms "
                      f"per call over all ranks; load {loadavg()}", file=sys.stderr)
    cores = os.cpu_count()
    print(f"\nall-reduce (sum) of {nbytes / 2**20:g} MiB of f32 on loopback, {warmup} warm-up + {iters} timed calls "
          f"per run, {rounds} runs per side and world size, alternating; {cores} cores")
    print(f"load average at start {load_start}, at end {loadavg()}")
    print("| ranks | implementation | median ms | min ms | max ms | algbw GB/s | busbw GB/s "
          "| best run: median ms | best run: busbw GB/s | CPU ms per call, all ranks | CPU / (cores x wall) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for world in worlds:
        for kind in kinds:
            xs, cs = walls[(kind, world)], cpus[(kind, world)]
            med = statistics.median(xs)
            algbw = nbytes / med / 1e9
            busbw = algbw * 2 * (world - 1) / world
            cpu = statistics.median(cs)
            best = min(run_medians[(kind, world)])
            best_busbw = nbytes / best / 1e9 * 2 * (world - 1) / world
            print(f"| {world} | {kind} | {med * 1e3:.1f} | {min(xs) * 1e3:.1f} | {max(xs) * 1e3:.1f} | {algbw:.2f} "
                  f"| {busbw:.2f} | {best * 1e3:.1f} | {best_busbw:.2f} | {cpu * 1e3:.0f} | {cpu / (cores * med):.2f} |")
    print()
    for world in worlds:
        ratio = statistics.median(walls[("gloo", world)]) / statistics.median(walls[("trainctl", world)])
        best = min(run_medians[("gloo", world)]) / min(run_medians[("trainctl", world)])
        cpu = statistics.median(cpus[("gloo", world)]) / statistics.median(cpus[("trainctl", world)])
        verdict = "met" if ratio >= GOAL_RATIO else "not met"
        print(f"{world} ranks: trainctl {ratio:.2f}x gloo's speed (gloo median / trainctl median; "
              f"goal {GOAL_RATIO}x: {verdict}); best runs {best:.2f}x; CPU per call: gloo's / trainctl's {cpu:.2f}x")


if __name__ == "__main__":
    main()
