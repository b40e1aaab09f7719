#!/usr/bin/env python3
"""Minimal real torch.distributed data-parallel job (gloo, CPU) for trainctl.

Reads the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
and calls init_process_group(backend="gloo", init_method="env://"). With TORCHELASTIC_USE_AGENT_STORE
unset or not "True", rank 0 hosts the TCPStore; under torchrun the agent's store is used.

Checks (all exact; any failure makes every rank exit 1 with a TORCH_DDP_FAIL line on stderr):
  * all_reduce(SUM) of a tensor filled with rank+1 equals W*(W+1)/2
  * all_gather of the ranks equals [0, 1, ..., W-1]
  * after DDP training, the parameters are bit-identical on every rank

Checkpoints (the trainctl contract, standard library + torch only): every --checkpoint-every N steps (default 2
when TRAINCTL_CHECKPOINT_DIR is set, else off) rank 0 writes model + optimizer state and the step with torch.save
to $TRAINCTL_CHECKPOINT_DIR/step-N/state.pt atomically (a temp dir renamed into place), every rank waits at a
barrier, then rank 0 commits it: POST $TRAINCTL_AGENT_URL/v1/checkpoints with the job token. When
TRAINCTL_RESUME_FROM is set every rank loads that state and continues with the next step. The data of step k
depends only on (seed, k, rank), so an interrupted and resumed run ends with the same parameters (checksum) as
an uninterrupted one of the same world size. The checkpoint dir must be visible to every host that may resume
(shared storage; on one machine, any local dir).

Machine-checkable output:
  every rank:  RANK_JOINED rank=R world_size=W
  every rank:  RESUMED from=<path> step=<N> attempt=<A>          (only when resuming)
  rank 0:      CHECKPOINT_COMMITTED step=<N> path=<path>
  rank 0:      TORCH_DDP_OK world_size=W allreduce=<value> ranks=<comma list> checksum=<hex>
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request

T0 = time.monotonic()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

try:
    # DDP.__init__ lazily imports torch._dynamo (~1.5 s of CPU on a small machine). Pay for it here, before
    # joining the process group, so ranks reach rendezvous and the collectives together and the timings
    # printed below measure distributed work rather than imports.
    import torch._dynamo  # noqa: E402,F401
except Exception:  # pragma: no cover - only an optimisation
    pass

SEED = 1234
IN_FEATURES = 16
HIDDEN = 32
BATCH_PER_RANK = 64


class CheckFailed(Exception):
    pass


def out(line, stream=None):
    """Write one whole line with a single write, so lines of ranks sharing a terminal don't interleave."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def log(rank, msg):
    out(f"[rank {rank} +{time.monotonic() - T0:.2f}s] {msg}")


def env_int(name, default=None):
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise SystemExit(f"TORCH_DDP_FAIL: required environment variable {name} is not set "
                             f"(start this script with trainctl or torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"TORCH_DDP_FAIL: environment variable {name}={value!r} is not an integer")


def agree(ok, what, rank):
    """Make every rank agree on a check outcome so that all of them fail together (no rank left hanging)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() != 0:
        if ok:
            raise CheckFailed(f"{what}: failed on another rank")
        raise CheckFailed(what)


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(torch.float32).contiguous()


def checksum_hex(flat):
    # Exact bytes of the float32 values (no numpy needed); first 16 hex digits of sha256.
    data = struct.pack(f"<{flat.numel()}f", *flat.tolist())
    return hashlib.sha256(data).hexdigest()[:16]


def step_generator(seed, step, rank):
    """The data of step `step` on `rank` depends on nothing else (so a resumed run draws the same batches)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank + 1)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir, step, model, opt, loss):
    """Rank 0: write step-N/state.pt atomically (temp dir, then rename) and return the final directory."""
    final = os.path.join(ckpt_dir, f"step-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=ckpt_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        path = os.path.join(tmp, "state.pt")
        with open(path, "wb") as f:
            torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "loss": loss}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.exists(final):
            # Left by an attempt that stopped before committing it (a committed one would have been resumed).
            trash = tempfile.mkdtemp(prefix=f".old-step-{step}-", dir=ckpt_dir)
            os.replace(final, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def commit_checkpoint(path, step, metrics, deadline_s=60.0):
    """Rank 0: tell the agent the checkpoint is complete; returns once the commit is durable (2xx)."""
    url = os.environ["TRAINCTL_AGENT_URL"].rstrip("/") + "/v1/checkpoints"
    body = json.dumps({"path": path, "step": step, "metrics": metrics}).encode()
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {os.environ.get('TRAINCTL_JOB_TOKEN', '')}"}
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=30):
                return
        except (urllib.error.URLError, OSError) as e:
            code = getattr(e, "code", None)
            retry = code is None or code == 503  # unreachable, or the coordinator is (503)
            if not retry or time.monotonic() > end:
                detail = e.read().decode(errors="replace") if hasattr(e, "read") else ""
                raise CheckFailed(f"checkpoint commit of step {step} failed: {e} {detail}".strip())
            time.sleep(0.5)


def load_checkpoint(path):
    file = os.path.join(path, "state.pt") if os.path.isdir(path) else path
    with open(file, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=SEED, help=f"model and data seed (default {SEED})")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="checkpoint every N steps (default 2 when TRAINCTL_CHECKPOINT_DIR is set, else 0 = off)")
    parser.add_argument("--step-delay-ms", type=int, default=0, help="sleep this long in every step (testing)")
    parser.add_argument("--inject-mismatch", type=int, default=None, metavar="RANK",
                        help="testing only: perturb one parameter on RANK after training, so the "
                             "cross-rank parameter check must fail (exit 1)")
    args = parser.parse_args()
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    ckpt_dir = os.environ.get("TRAINCTL_CHECKPOINT_DIR") or None
    if args.checkpoint_every is None:
        args.checkpoint_every = 2 if ckpt_dir else 0
    if args.checkpoint_every < 0 or args.step_delay_ms < 0:
        parser.error("--checkpoint-every and --step-delay-ms must be >= 0")
    if args.checkpoint_every and not ckpt_dir:
        parser.error("--checkpoint-every needs TRAINCTL_CHECKPOINT_DIR (a [checkpoint] dir in the job file)")
    resume_from = os.environ.get("TRAINCTL_RESUME_FROM") or None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    rank = env_int("RANK")
    world = env_int("WORLD_SIZE")
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", 1)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise SystemExit(f"TORCH_DDP_FAIL: required environment variable {name} is not set")
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "")

    out(f"rank {rank}/{world} local_rank {local_rank} host {socket.gethostname()} master {master} "
        f"local_world_size {local_world} pid {os.getpid()} torch {torch.__version__} "
        f"threads {torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')} "
        f"agent_store={agent_store or '<unset>'} restart={os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} "
        f"import_s={time.monotonic() - T0:.2f}")

    torch.manual_seed(args.seed)

    timeout = datetime.timedelta(seconds=env_int("TRAINCTL_DDP_TIMEOUT_S", 120))
    t_init = time.monotonic()
    dist.init_process_group(backend="gloo", init_method="env://", timeout=timeout)
    try:
        if dist.get_rank() != rank or dist.get_world_size() != world:
            raise CheckFailed(f"process group says rank {dist.get_rank()}/{dist.get_world_size()}, "
                              f"environment says {rank}/{world}")
        log(rank, f"process group up (gloo) in {time.monotonic() - t_init:.2f}s")
        out(f"RANK_JOINED rank={rank} world_size={world}")

        # 1. all_reduce: sum of (r+1) over r in 0..W-1 == W*(W+1)/2, exactly (small ints are exact in float32).
        t = torch.full((1024,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        expected_sum = world * (world + 1) // 2
        ok = bool(torch.all(t == float(expected_sum)))
        allreduce_value = int(t[0].item())
        agree(ok, f"all_reduce: got {t[0].item()} (min {t.min().item()}, max {t.max().item()}), "
                  f"expected {expected_sum}", rank)

        # 2. all_gather of the ranks == [0, 1, ..., W-1].
        gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([rank], dtype=torch.int64))
        ranks = [int(g.item()) for g in gathered]
        agree(ranks == list(range(world)), f"all_gather: got ranks {ranks}, expected {list(range(world))}", rank)

        log(rank, f"collectives ok: all_reduce={allreduce_value} all_gather={ranks}")

        # 3. DDP training on synthetic regression data, sharded by rank.
        model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        start = 0
        if resume_from:
            state = load_checkpoint(resume_from)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
            announced = os.environ.get("TRAINCTL_RESUME_STEP")
            if announced not in (None, "") and int(announced) != start:
                raise CheckFailed(f"TRAINCTL_RESUME_STEP={announced} but {resume_from} holds step {start}")
            out(f"RESUMED from={resume_from} step={start} attempt={attempt}")
        ddp = DDP(model)
        log(rank, "model wrapped in DistributedDataParallel")
        loss_fn = nn.MSELoss()

        # The target function is shared (same generator seed); each rank draws its own shard of inputs.
        g_true = torch.Generator().manual_seed(args.seed)
        w_true = torch.randn(IN_FEATURES, 1, generator=g_true)

        first_loss = last_loss = None
        for step in range(start, args.steps):
            g_data = step_generator(args.seed, step + 1, rank)
            x = torch.randn(BATCH_PER_RANK, IN_FEATURES, generator=g_data)
            y = x @ w_true + 0.01 * torch.randn(BATCH_PER_RANK, 1, generator=g_data)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()  # DDP all-reduces (averages) gradients here
            opt.step()
            # Global mean loss for a readable, rank-independent number.
            gl = loss.detach().clone()
            dist.all_reduce(gl, op=dist.ReduceOp.SUM)
            gl = gl.item() / world
            first_loss = gl if first_loss is None else first_loss
            last_loss = gl
            log(rank, f"step {step + 1}/{args.steps} local_loss {loss.item():.6f} global_loss {gl:.6f}")
            if args.step_delay_ms:
                time.sleep(args.step_delay_ms / 1000)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                done = step + 1
                path = save_checkpoint(ckpt_dir, done, model, opt, gl) if rank == 0 else None
                dist.barrier()  # every rank finished this step; rank 0's files are complete
                if rank == 0:
                    commit_checkpoint(path, done, {"loss": gl})
                    out(f"CHECKPOINT_COMMITTED step={done} path={path}")

        # 4. Parameters bit-identical across ranks: compare with rank 0's copy, and gather checksums.
        if args.inject_mismatch == rank:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1e-3
            log(rank, "--inject-mismatch: perturbed one parameter on this rank")
        flat = flat_params(model)
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        same = torch.equal(flat, ref)
        mine = checksum_hex(flat)
        sums = [None] * world
        dist.all_gather_object(sums, mine)
        agree(same and all(s == mine for s in sums),
              f"parameters differ across ranks after training: torch.equal(rank {rank}, rank 0)={same}, "
              f"checksums {sums}", rank)
        log(rank, f"params {flat.numel()} checksum {mine} identical on all {world} ranks"
                  + (f"; global loss {first_loss:.6f} -> {last_loss:.6f}" if last_loss is not None else ""))

        dist.barrier()
        if rank == 0:
            out(f"TORCH_DDP_OK world_size={world} allreduce={allreduce_value} "
                f"ranks={','.join(str(r) for r in ranks)} checksum={mine}")
        code = 0
    except CheckFailed as e:
        out(f"TORCH_DDP_FAIL rank={rank}: {e}", sys.stderr)
        code = 1
    finally:
        dist.destroy_process_group()
    log(rank, f"done exit={code} total_s={time.monotonic() - T0:.2f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
