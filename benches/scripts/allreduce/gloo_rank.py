#!/usr/bin/env python3
"""One rank of the all-reduce benchmark, torch's side: the same work as trainctl's rank program
(benches/src/bin/ring_allreduce.rs), with torch.distributed's gloo backend.

    RANK=R WORLD_SIZE=N MASTER_ADDR=A MASTER_PORT=P python3 gloo_rank.py --bytes B --warmup W --iters I

`init_process_group("gloo", init_method="env://")` (rank 0 serves the TCPStore at MASTER_ADDR:MASTER_PORT,
the path torchrun's ranks take). Before each all-reduce the buffer is refilled with this rank's known
input and the ranks pass `dist.barrier()`; only `dist.all_reduce(buf)` (SUM, f32, CPU tensor) is timed.
After each call, warm-up included, the whole buffer is compared with the exact expected sum; the inputs
and the sum are those of benches/src/allreduce.rs: rank r's element i is (r + 1) * (i % 65521 + 1).

Prints one JSON line on stdout:
{"impl":"gloo","rank":R,"world_size":N,"bytes":B,"warmup":W,"times_s":[...],"cpu_s":[...]}: per timed
call, its wall time and the CPU time of this process (every thread: gloo reduces on its own threads).
Exits 1 with the reason on stderr on any failure."""
import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

CHECK_PERIOD = 65521  # benches/src/allreduce.rs CHECK_PERIOD
MAX_CHECKED_WORLD_SIZE = 16
RENDEZVOUS_TIMEOUT_S = 120


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=64 << 20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if args.bytes <= 0 or args.bytes % 4 or args.iters < 1 or args.warmup < 0:
        sys.exit(f"gloo_rank: --bytes {args.bytes} --warmup {args.warmup} --iters {args.iters} is not valid: "
                 "expected a positive multiple of 4, a whole number and a whole number of at least 1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > MAX_CHECKED_WORLD_SIZE:
        sys.exit(f"gloo_rank: WORLD_SIZE={world} is too large: the exact-sum check holds up to "
                 f"{MAX_CHECKED_WORLD_SIZE} ranks")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    n = args.bytes // 4
    pattern = torch.arange(n, dtype=torch.int64) % CHECK_PERIOD + 1
    inp = (pattern * (rank + 1)).to(torch.float32)
    want = (pattern * (world * (world + 1) // 2)).to(torch.float32)
    del pattern
    buf = torch.empty_like(inp)
    times_s, cpu_s = [], []
    for i in range(args.warmup + args.iters):
        buf.copy_(inp)
        dist.barrier()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        took = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if not torch.equal(buf, want):  # NaN never equals: a NaN fails too
            at = int((buf != want).nonzero()[0])
            sys.exit(f"gloo_rank: all-reduce {i} on rank {rank}: element {at} is {float(buf[at])}, "
                     f"expected {float(want[at])}")
        if i >= args.warmup:
            times_s.append(took)
            cpu_s.append(cpu)
    dist.destroy_process_group()
    print(json.dumps({"impl": "gloo", "rank": rank, "world_size": world, "bytes": args.bytes,
                      "warmup": args.warmup, "times_s": times_s, "cpu_s": cpu_s}), flush=True)


if __name__ == "__main__":
    main()
