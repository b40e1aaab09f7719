"""Elastic growth under `trainctl run --nnodes 1:2`: alone, the workers wait to be stopped; once a
second node joins, the gang restarts at world size 4 and all-reduces."""
import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
world, rank = dist.get_world_size(), dist.get_rank()
print(f"GROW restart_count={os.environ['TORCHELASTIC_RESTART_COUNT']} world={world} rank={rank} "
      f"group_world={os.environ['GROUP_WORLD_SIZE']}", flush=True)
if world < 4:
    time.sleep(120)  # stopped by the launcher when the second node arrives
    raise SystemExit(5)
t = torch.tensor([1.0])
dist.all_reduce(t)
print(f"GROWN rank={rank} sum={t.item()}", flush=True)
dist.destroy_process_group()
