"""A worker for tests/run.rs: prints one line on stdout and one on stderr, naming its local rank."""
import os
import sys

local_rank = os.environ["LOCAL_RANK"]
print(f"out of local rank {local_rank}", flush=True)
print(f"err of local rank {local_rank}", file=sys.stderr, flush=True)
