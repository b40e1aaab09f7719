"""A job that checks the agent's store gives every attempt an empty keyspace.

Attempt 0: every rank joins the process group through the store, rank 0 writes a key, all meet
at a barrier, then rank 1 fails (exit 3) so the gang restarts. Attempt 1: every rank joins again
and reports whether attempt 0's key is visible (it must not be), then all succeed.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
store = dist.distributed_c10d._get_default_store()
t = torch.tensor([1.0])
dist.all_reduce(t)
print(f"STORE_ATTEMPT attempt={attempt} rank={rank} world={int(t.item())} "
      f"agent_store={os.environ.get('TORCHELASTIC_USE_AGENT_STORE')}", flush=True)
if attempt == 0:
    if rank == 0:
        store.set("left-by-attempt-0", "stale")
    dist.barrier()
    if rank == 1:
        sys.exit(3)
    # The others wait to be stopped by the agent.
    import time
    time.sleep(120)
    sys.exit(0)
stale = store.check(["left-by-attempt-0"])
print(f"STORE_FRESH attempt={attempt} rank={rank} stale_key_visible={stale}", flush=True)
dist.barrier()
dist.destroy_process_group()
