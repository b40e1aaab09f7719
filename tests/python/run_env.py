"""A worker for tests/run.rs: joins the gang with init_process_group("gloo") through env://,
all-reduces its rank + 1, and prints one JSON line with its whole environment, the all-reduce
result and its pid: `ENV {...}`."""
import json
import os
import sys

import torch
import torch.distributed as dist


def main():
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    line = {
        "env": dict(os.environ),
        "sum": t.item(),
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv": sys.argv,
    }
    dist.destroy_process_group()
    # One write(2): under torchrun both workers share the launcher's stdout, and `print` under
    # `python -u` writes the text and its newline separately, so lines could interleave.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("ENV " + json.dumps(line, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    main()
