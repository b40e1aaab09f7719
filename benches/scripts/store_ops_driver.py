#!/usr/bin/env python3
"""Store operations/s with torch's own client: `trainctl store` next to torch's libuv TCPStore server.

Run by store_ops.sh (which picks the trainctl binary and the Python environment):
    python3 store_ops_driver.py TRAINCTL_BIN ROUNDS ITERS CLIENTS

CLIENTS client processes (default 4) each hold one `torch.distributed.TCPStore(..., is_master=False)`
connection and, on a signal, run ITERS iterations of the same fixed mix with keys of their own:
    set  c{C}/k{i} <64 bytes>;  get c{C}/k{i} (checked);  add c{C}/n 1 (checked: i + 1)
that is 3 * ITERS operations each. `set` is one-way in torch's protocol (no reply), `get` and `add` are
round trips. The clients are started once (import torch takes seconds) and connect to each server in
turn. Each measurement uses a fresh server process:
    trainctl: `trainctl store --listen 127.0.0.1:0 -o json` (the release binary, a copy);
    torch:    store/torch_server.py, `TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
              use_libuv=True)` in a Python process of its own.
Each client connects and warms up (100 iterations on other keys) before the signal; the measurement
runs from the earliest client's first operation to the latest client's last (CLOCK_MONOTONIC is shared
by processes). ops/s = all clients' operations / that span. The server process's CPU time over the
span (utime + stime from /proc/PID/stat) is reported per 1 000 operations: with the clients on the same
2 cores, ops/s is bounded by the Python clients too, the CPU per operation is the server's own cost.

The servers alternate (trainctl first in odd rounds, torch first in even rounds), ROUNDS rounds each;
the summary gives the median of each and the ratio of the medians. The load average is printed at the
start and the end. Human-readable lines go to stderr, the summary to stdout."""
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VALUE = b"v" * 64
WARMUP_ITERS = 100
CONNECT_TIMEOUT_S = 60


def client_main(cid):
    """One client process: commands on stdin, answers on stdout."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "connect":
            port = int(cmd[1])
            store = TCPStore("127.0.0.1", port, is_master=False,
                             timeout=timedelta(seconds=CONNECT_TIMEOUT_S))
            for i in range(WARMUP_ITERS):
                store.set(f"warm/c{cid}/k{i}", VALUE)
                store.get(f"warm/c{cid}/k{i}")
                store.add(f"warm/c{cid}/n", 1)
            print("ready", flush=True)
        elif cmd[0] == "go":
            iters = int(cmd[1])
            s, g, a = store.set, store.get, store.add
            t0 = time.monotonic()
            for i in range(iters):
                key = f"c{cid}/k{i}"
                s(key, VALUE)
                if g(key) != VALUE:
                    raise SystemExit(f"client {cid}: get {key} returned another value")
                if a(f"c{cid}/n", 1) != i + 1:
                    raise SystemExit(f"client {cid}: add c{cid}/n did not return {i + 1}")
            t1 = time.monotonic()
            store = None  # close the connection before the server is stopped
            print(f"done {t0} {t1} {3 * iters}", flush=True)
        elif cmd[0] == "quit":
            return


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def start_server(kind, trainctl_bin):
    if kind == "trainctl":
        argv = [trainctl_bin, "store", "--listen", "127.0.0.1:0", "--max-connections", "16384", "-o", "json"]
    else:
        argv = [sys.executable, os.path.join(HERE, "store", "torch_server.py"), "127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"{kind} server did not start ({argv})")
    return proc, json.loads(line)["port"]


def stop_server(proc):
    proc.kill()
    proc.wait()


def measure(kind, trainctl_bin, clients, iters):
    server, port = start_server(kind, trainctl_bin)
    try:
        for c in clients:
            c.stdin.write(f"connect {port}\n")
            c.stdin.flush()
        for c in clients:
            if c.stdout.readline().strip() != "ready":
                raise SystemExit(f"a client did not connect to the {kind} server")
        cpu0 = cpu_seconds(server.pid)
        for c in clients:
            c.stdin.write(f"go {iters}\n")
            c.stdin.flush()
        spans, ops = [], 0
        for c in clients:
            answer = c.stdout.readline().split()
            if not answer or answer[0] != "done":
                raise SystemExit(f"a client failed against the {kind} server")
            spans.append((float(answer[1]), float(answer[2])))
            ops += int(answer[3])
        cpu = cpu_seconds(server.pid) - cpu0
    finally:
        stop_server(server)
    span = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    return {"ops_per_s": ops / span, "span_s": span, "ops": ops,
            "server_cpu_ms_per_kop": cpu * 1e3 / (ops / 1e3)}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]))
        return
    trainctl_bin, rounds, iters, nclients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    load_start = loadavg()
    clients = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", str(c)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for c in range(nclients)]
    results = {"trainctl": [], "torch": []}
    try:
        for r in range(1, rounds + 1):
            order = ["trainctl", "torch"] if r % 2 == 1 else ["torch", "trainctl"]
            for kind in order:
                m = measure(kind, trainctl_bin, clients, iters)
                results[kind].append(m)
                print(f"round {r}/{rounds} {kind:<8}: {m['ops_per_s']:9.0f} ops/s "
                      f"({m['ops']} ops in {m['span_s']:.2f} s), server CPU "
                      f"{m['server_cpu_ms_per_kop']:.1f} ms per 1 000 ops; load {loadavg()}",
                      file=sys.stderr)
    finally:
        for c in clients:
            try:
                c.stdin.write("quit\n")
                c.stdin.flush()
            except BrokenPipeError:
                pass
            c.wait()
    load_end = loadavg()

    med = {k: statistics.median(m["ops_per_s"] for m in v) for k, v in results.items()}
    cpu = {k: statistics.median(m["server_cpu_ms_per_kop"] for m in v) for k, v in results.items()}
    print(f"\nstore ops/s, torch's TCPStore client: {nclients} client processes x {iters} x (set, get, add), "
          f"{rounds} rounds per server, alternating")
    print(f"load average at start {load_start}, at end {load_end}")
    print(f"{'server':<10} {'median ops/s':>13} {'min':>9} {'max':>9} {'server CPU ms / 1k ops':>23}")
    for k in ("trainctl", "torch"):
        xs = [m["ops_per_s"] for m in results[k]]
        print(f"{k:<10} {med[k]:13.0f} {min(xs):9.0f} {max(xs):9.0f} {cpu[k]:23.1f}")
    print(f"trainctl / torch: {med['trainctl'] / med['torch']:.2f}x ops/s (goal: at least 1.5x); "
          f"server CPU per op: {cpu['trainctl'] / cpu['torch']:.2f}x of torch's")


if __name__ == "__main__":
    main()
