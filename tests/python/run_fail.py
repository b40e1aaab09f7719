"""A worker for tests/run.rs: local rank 1 raises under torch's @record (so its error file holds
the message and traceback); the others sleep until stopped. Prints `PID <local_rank> <pid>`."""
import os
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main():
    local_rank = int(os.environ["LOCAL_RANK"])
    print(f"PID {local_rank} {os.getpid()}", flush=True)
    if local_rank == 1:
        time.sleep(0.5)
        raise ValueError(f"rank {os.environ['RANK']} gave up\nsecond line")
    time.sleep(60)


if __name__ == "__main__":
    sys.exit(main())
