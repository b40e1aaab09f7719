"""A job for tests/run_cluster.rs (`trainctl run --cluster`): every rank joins the gloo process group
through MASTER_ADDR/MASTER_PORT, all-reduces rank+1 and prints the sum.

Arguments: `--fail-rank R` makes rank R exit 3 after the all-reduce; `--sleep S` keeps every rank
alive S seconds after it (for following a job that is still running).
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()

dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"ALLREDUCE rank={rank} local_rank={os.environ['LOCAL_RANK']} world={world} "
      f"sum={int(t.item())}", flush=True)
dist.destroy_process_group()
if args.fail_rank == rank:
    print(f"FAILING rank={rank}", flush=True)
    sys.exit(3)
time.sleep(args.sleep)
