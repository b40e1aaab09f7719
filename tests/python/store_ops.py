"""Every TCPStore operation through torch's own client, one JSON line per result.

Usage: store_ops.py HOST PORT          against a server already listening (trainctl's)
       store_ops.py --torch libuv|legacy  against torch's own server, started here
The test runs both and compares the lines: the same client must see the same answers.
"""
import datetime
import json
import sys
import threading
import time

import torch.distributed as dist

T = datetime.timedelta(seconds=10)


def out(op, value):
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, list):
        value = [v.decode("latin-1") if isinstance(v, bytes) else v for v in value]
    print(json.dumps({"op": op, "value": value}), flush=True)


def client(host, port):
    return dist.TCPStore(host, port, is_master=False, timeout=T)


def queues(s, other):
    s.queue_push("q", "first")
    s.queue_push("q", "second")
    out("queue_len", s.queue_len("q"))
    out("queue_pop", s.queue_pop("q"))
    out("queue_pop 2", s.queue_pop("q"))
    out("queue_len empty", s.queue_len("q"))
    try:
        s.queue_pop("q", False)
        out("queue_pop empty nonblocking", "no error")
    except Exception as e:
        out("queue_pop empty nonblocking", type(e).__name__)
    popped = []
    t = threading.Thread(target=lambda: popped.append(other.queue_pop("q2")))
    t.start()
    time.sleep(0.2)
    s.queue_push("q2", "pushed later")
    t.join(10)
    out("blocking queue_pop woken by a push", popped)



def main():
    server = None
    if sys.argv[1] == "--torch":
        backend = sys.argv[2]
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                               timeout=T, use_libuv=(backend == "libuv"))
        host, port, libuv_only = "127.0.0.1", server.port, backend == "libuv"
    else:
        host, port, libuv_only = sys.argv[1], int(sys.argv[2]), True

    s = client(host, port)
    s.set("a", "1")
    s.set("a", "2")
    out("get overwritten", s.get("a"))
    s.set("bin", bytes(range(256)))
    out("get binary", s.get("bin"))
    out("add new", s.add("c", 5))
    out("add negative", s.add("c", -2))
    out("get counter", s.get("c"))
    out("cas absent expected empty", s.compare_set("cas1", "", "d"))
    out("cas absent expected set", s.compare_set("cas2", "e", "d"))
    s.set("cas3", "e")
    out("cas equal", s.compare_set("cas3", "e", "d"))
    out("cas different", s.compare_set("cas3", "x", "y"))
    out("check missing", s.check(["a", "missing"]))
    out("check present", s.check(["a", "c"]))
    s.wait(["a"])
    out("wait present", True)
    try:
        s.wait(["never"], datetime.timedelta(milliseconds=300))
        out("wait timeout", "no timeout")
    except Exception as e:  # torch raises DistStoreError
        out("wait timeout", type(e).__name__)
    s.set("after-timeout", "ok")
    out("usable after a timed-out wait", s.get("after-timeout"))

    # A wait completed by another client's write.
    other = client(host, port)
    woken = []
    t = threading.Thread(target=lambda: (other.wait(["late"]), woken.append(other.get("late"))))
    t.start()
    time.sleep(0.2)
    s.set("late", "here")
    t.join(10)
    out("wait woken by another client", woken)

    out("delete present", s.delete_key("a"))
    out("delete absent", s.delete_key("a"))
    s.append("ap", "x")
    s.append("ap", "yz")
    out("append", s.get("ap"))
    s.multi_set(["m1", "m2"], ["1", "22"])
    out("multi_get", s.multi_get(["m2", "m1"]))

    if libuv_only:  # torch's legacy server has no queues and no LIST_KEYS
        queues(s, other)

    prefixed = dist.PrefixStore("job", s)
    prefixed.set("x", "1")
    out("prefix store", s.get("job/x"))

    results = []
    t = threading.Thread(target=lambda: (other.barrier("bar", 2), results.append("other")))
    t.start()
    s.barrier("bar", 2)
    t.join(10)
    out("barrier of two", sorted(results + ["main"]))

    big = b"v" * (8 * 1024 * 1024)
    s.set("big", big)
    out("8 MiB value", len(s.get("big")))

    out("num_keys", s.num_keys())
    if libuv_only:
        out("list_keys", sorted(s.list_keys()))
    out("done", True)


main()
