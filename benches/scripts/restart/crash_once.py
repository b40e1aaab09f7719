#!/usr/bin/env python3
"""Workload of benches/scripts/restart_vs_torchrun.sh: 2 gloo ranks on CPU, one all-reduce, one crash.

Every line the bench reads carries a wall-clock timestamp (time.time(); all ranks run on one machine):
  BENCH_START attempt=A rank=R t=T      first statement, before `import torch` (the process exists)
  BENCH_IMPORTED attempt=A rank=R t=T   torch imported
  BENCH_ALLREDUCE attempt=A rank=R t=T  this rank's first all-reduce of the attempt completed
  BENCH_CRASH attempt=0 rank=1 t=T      rank 1, attempt 0 only, just before exit(1)
Attempt 0: rank 1 crashes after its first all-reduce; rank 0 waits to be stopped by its launcher.
Attempt >= 1: both ranks all-reduce once, meet at a barrier and exit 0.
"""
import os
import sys
import time

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ["RANK"])


def mark(what):
    sys.stdout.write(f"BENCH_{what} attempt={ATTEMPT} rank={RANK} t={time.time():.6f}\n")
    sys.stdout.flush()


mark("START")
import datetime  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

mark("IMPORTED")
timeout_s = int(os.environ.get("BENCH_PG_TIMEOUT_S", "30"))
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
t = torch.ones(4)
dist.all_reduce(t)
mark("ALLREDUCE")
if ATTEMPT == 0:
    if RANK == 1:
        mark("CRASH")
        os._exit(1)  # a crash: no process-group teardown
    time.sleep(120)  # the launcher stops this rank when it sees rank 1 fail
    sys.exit(2)
dist.barrier()
dist.destroy_process_group()
