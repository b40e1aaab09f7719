#!/usr/bin/env python3
"""NCCL bring-up: trainctl through ffi/ against torch, one rank on the same GPU (issue 9: "not slower").

usage: nccl_init_driver.py NCCL_INIT_BIN [ROUNDS] [--elements N] [--json FILE]

Each round starts one fresh process per side, the two sides taking turns (the first side alternates
from round to round), so that neither always meets a warm driver:
  trainctl: NCCL_INIT_BIN (benches/src/bin/nccl_init.rs): CUDA context, then Nccl::open +
            ncclGetUniqueId + ncclCommInitRank, then the first all-reduce;
  torch:    this script with --torch-sample: torch.cuda.init + set_device + the tensor, then
            init_process_group("nccl") (tcp:// store on loopback), then the first all_reduce
            (where torch creates its NCCL communicator, unless given a device id).
Both print the same JSON stages; the figure compared is bringup_ms = init_ms + first_allreduce_ms
(the CUDA context is shown apart: it is the driver's, not NCCL's). Prints a table of medians and
the ratio torch / trainctl (above 1: trainctl is faster). Exit 0 when both sides ran, 1 otherwise.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

STAGES = ["ctx_ms", "init_ms", "first_allreduce_ms", "bringup_ms", "total_ms"]
SAMPLE_TIMEOUT_S = 120


def torch_sample(elements):
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    torch.cuda.init()
    torch.cuda.set_device(0)
    t = torch.ones(elements, device="cuda")
    torch.cuda.synchronize()
    ctx_ms = (time.perf_counter() - start) * 1e3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    init_ms = (time.perf_counter() - init) * 1e3
    first = time.perf_counter()
    dist.all_reduce(t)
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - first) * 1e3
    total_ms = (time.perf_counter() - start) * 1e3
    assert float(t[0]) == 1.0, f"one-rank sum of 1.0 gave {float(t[0])}"
    print(json.dumps({
        "impl": "torch", "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())), "device": 0, "elements": elements,
        "ctx_ms": ctx_ms, "init_ms": init_ms, "first_allreduce_ms": first_ms,
        "bringup_ms": init_ms + first_ms, "total_ms": total_ms,
    }), flush=True)
    dist.destroy_process_group()


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=SAMPLE_TIMEOUT_S)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv):
    if "--torch-sample" in argv:
        torch_sample(int(argv[argv.index("--torch-sample") + 1]))
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    binary = argv[0]
    rounds = int(argv[1]) if len(argv) > 1 and not argv[1].startswith("-") else 5
    elements = int(argv[argv.index("--elements") + 1]) if "--elements" in argv else 1 << 20
    json_out = argv[argv.index("--json") + 1] if "--json" in argv else None
    sides = {
        "trainctl": [binary, "--elements", str(elements)],
        "torch": [sys.executable, os.path.abspath(__file__), "--torch-sample", str(elements)],
    }
    samples = {"trainctl": [], "torch": []}
    errors = {}
    for r in range(rounds):
        order = ["trainctl", "torch"] if r % 2 == 0 else ["torch", "trainctl"]
        for side in order:
            if side in errors:
                continue
            try:
                samples[side].append(run(sides[side]))
            except Exception as e:  # a side that fails once is reported, not retried
                errors[side] = str(e)
    med = {side: {k: statistics.median(s[k] for s in got) for k in STAGES}
           for side, got in samples.items() if got}
    print(f"NCCL bring-up, one rank, {elements} f32, {rounds} rounds, medians in ms")
    if med:
        print(f"{'stage':<20}" + "".join(f"{side:>12}" for side in med))
        for k in STAGES:
            print(f"{k:<20}" + "".join(f"{med[side][k]:>12.1f}" for side in med))
    for side, got in samples.items():
        if got:
            print(f"{side}: NCCL {got[0]['nccl']}" + (f", torch {got[0]['torch']}" if side == "torch" else ""))
    for side, e in errors.items():
        print(f"{side}: FAILED: {e}")
    ratio = None
    if "trainctl" in med and "torch" in med:
        ratio = med["torch"]["bringup_ms"] / med["trainctl"]["bringup_ms"]
        verdict = "met" if ratio >= 1.0 else "not met"
        print(f"bring-up torch / trainctl = {ratio:.2f}x (goal: not slower, >= 1.00x: {verdict})")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"samples": samples, "medians": med, "errors": errors, "ratio": ratio}, f, indent=1)
    return 0 if not errors and ratio is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
