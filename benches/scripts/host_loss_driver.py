#!/usr/bin/env python3
"""One run of host_loss.sh: submit, wait for the first checkpoint, SIGKILL a gang host's agent, and
timestamp the recovery (see host_loss.sh). Prints one JSON object of seconds since the kill."""
import glob, json, os, re, signal, subprocess, sys, time, urllib.request

bin_, addr, job_file, data_dir = sys.argv[1:5]
base = f"http://{addr}"


def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.load(r)


def start_ticks(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


# /proc gives a process's start in clock ticks since boot, and /proc/stat's btime is whole seconds:
# calibrate the tick clock against time.time() with a process started now (error ~1 tick, 10 ms).
_t = time.time()
_p = subprocess.Popen(["sleep", "0.2"])
_offset = _t - start_ticks(_p.pid) / os.sysconf("SC_CLK_TCK")
_p.wait()


def proc_start(pid):
    """Wall-clock start time of a process."""
    ticks = start_ticks(pid)
    return None if ticks is None else _offset + ticks / os.sysconf("SC_CLK_TCK")


out = subprocess.run([bin_, "submit", job_file, "--addr", addr, "-o", "json"], check=True,
                     capture_output=True, text=True).stdout
job_id = json.loads(out)["id"]
deadline = time.time() + 60
while True:
    job = get(f"/v1/jobs/{job_id}")
    if job.get("checkpoints"):
        break
    if time.time() > deadline:
        sys.exit(f"no checkpoint within 60 s: {json.dumps(job)[:2000]}")
    time.sleep(0.05)
victim = next(a["node"] for a in job["allocation"] if a["group_rank"] == 1)
pids = subprocess.run(["pgrep", "-f", f"agent .*--name {victim} "], capture_output=True, text=True).stdout.split()
if len(pids) != 1:
    sys.exit(f"expected one agent process for {victim}, found {pids}")
first_ckpt_step = job["checkpoints"][0]["step"] if isinstance(job["checkpoints"][0], dict) else None
os.kill(int(pids[0]), signal.SIGKILL)
t_kill = time.time()

res = {"job": job_id, "victim": victim, "checkpoint_step_before_kill": first_ckpt_step}
step_re = re.compile(r"^step \d+/")
seen_disk = {}
while time.time() < t_kill + 60:
    job = get(f"/v1/jobs/{job_id}")
    att = {a["attempt"]: a for a in job["attempts"]}
    if "detected" not in res and att.get(0, {}).get("ended_at_ms"):
        res["detected"] = att[0]["ended_at_ms"] / 1000 - t_kill
        res["attempt0_end"] = att[0]["end"]
    if "placed" not in res and 1 in att:
        res["placed"] = att[1]["started_at_ms"] / 1000 - t_kill
        res["new_nodes"] = att[1]["nodes"]
    if "started" not in res and job["attempt"] == 1 and job["ranks"] and all(r.get("pid") for r in job["ranks"]):
        starts = [proc_start(r["pid"]) for r in job["ranks"]]
        if None not in starts:
            res["started"] = max(starts) - t_kill
    if "stepped" not in res:
        for path in glob.glob(f"{data_dir}/*/runs/*/job-{job_id}/attempt-1/rank-*.log"):
            try:
                text = open(path, errors="replace").read()
            except OSError:
                continue
            if "(attempt 1)" in text and any(step_re.match(l) for l in text.splitlines()):
                res["stepped"] = time.time() - t_kill
                res["stepped_file"] = path
                break
    if "shipped" not in res and job["attempt"] == 1:
        lines = get(f"/v1/jobs/{job_id}/logs?attempt=1").get("lines", [])
        for l in lines:
            m = re.match(r"resumed from .* at step (\d+)", l["text"])
            if m:
                res["resumed_step"] = int(m[1])
        if any(step_re.match(l["text"]) for l in lines):
            res["shipped"] = time.time() - t_kill
    if all(k in res for k in ("detected", "placed", "started", "stepped", "shipped")):
        break
    time.sleep(0.01)
subprocess.run([bin_, "cancel", job_id, "--addr", addr], capture_output=True)
print(json.dumps(res))
