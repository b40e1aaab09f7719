"""A worker for tests/run.rs: prints `PID <local_rank> <pid>` and sleeps until stopped.
With `--ignore-sigterm` it ignores SIGTERM (the launcher must then SIGKILL it after its
shutdown timeout)."""
import os
import signal
import sys
import time

if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"PID {os.environ['LOCAL_RANK']} {os.getpid()}", flush=True)
time.sleep(120)
