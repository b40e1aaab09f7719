"""A worker for tests/run.rs: in attempt 0 every rank sets a key in the job's store (the default
group's store, as torch workers share state), then local rank 1 fails; in attempt 1 every rank
checks that no key of attempt 0 is visible, all-reduces and succeeds. Prints
`ATTEMPT <n> RANK <r> ...` lines."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main():
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()
    if attempt == 0:
        store.set(f"left_by_attempt0/{rank}", "stale")
        dist.barrier()
        print(f"ATTEMPT 0 RANK {rank} set its key", flush=True)
        if rank == 1:
            sys.exit(7)
        dist.barrier()  # never passes: rank 1 is gone, and the launcher stops this rank
        return
    seen = [store.check([f"left_by_attempt0/{r}"]) for r in range(dist.get_world_size())]
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    print(f"ATTEMPT {attempt} RANK {rank} stale_keys_seen={sum(seen)} sum={t.item()}", flush=True)
    dist.destroy_process_group()
    if any(seen):
        sys.exit(3)


if __name__ == "__main__":
    main()
