//! One rank of the all-reduce benchmark, trainctl's side (`scripts/allreduce_vs_gloo.sh` starts
//! WORLD_SIZE of them): meets the other ranks the way `trainctl example-train` does
//! (`rendezvous_config_from_env`: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, optional
//! `TRAINCTL_NODE_ADDR`), builds a [`TcpRing`], then runs `--warmup` untimed and `--iters` timed
//! `all_reduce_sum_f32` calls on a buffer of `--bytes` bytes (defaults: 64 MiB, 2, 10).
//!
//! Before each call the buffer is refilled with this rank's known input and the ranks pass a
//! barrier; only the all-reduce itself is timed. After each call, warm-up included, the whole
//! buffer is compared with the exact expected sum (`trainctl_benches::allreduce`), so a broken
//! all-reduce fails the run instead of looking fast.
//!
//! Prints one JSON line on stdout:
//! `{"impl":"trainctl","rank":R,"world_size":N,"bytes":B,"warmup":W,"times_s":[...],"cpu_s":[...]}`:
//! per timed call, its wall time and the CPU time (user + system, every thread of this process,
//! `CLOCK_PROCESS_CPUTIME_ID`: the caller and the ring's sender threads, exited ones included) it used.
//! Exits 1 with the reason on stderr on any failure.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use trainctl_benches::allreduce::{self, MAX_CHECKED_WORLD_SIZE};
use trainctl_benches::cpu::process_cpu;
use trainctl_collective::{rendezvous_config_from_env, Collective, TcpRing};

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ring_allreduce: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = allreduce::parse_args(&args)?;
    let cfg = rendezvous_config_from_env(|k| std::env::var(k).ok())?;
    if cfg.world_size > MAX_CHECKED_WORLD_SIZE {
        bail!(
            "WORLD_SIZE={} is too large: the exact-sum check holds up to {MAX_CHECKED_WORLD_SIZE} ranks",
            cfg.world_size
        );
    }
    let (rank, world_size) = (cfg.rank, cfg.world_size);
    let len = args.bytes / 4;
    let input = allreduce::input(rank, len);
    let want = allreduce::expected(world_size, len);
    let mut buf = vec![0f32; len];
    let mut ring = TcpRing::connect(cfg).context("rendezvous")?;

    let mut times_s = Vec::with_capacity(args.iters);
    let mut cpu_s = Vec::with_capacity(args.iters);
    let cpu_now = || process_cpu().context("read this process's CPU time");
    for i in 0..args.warmup + args.iters {
        buf.copy_from_slice(&input);
        ring.barrier().context("barrier before an all-reduce")?;
        let cpu_before = cpu_now()?;
        let start = Instant::now();
        ring.all_reduce_sum_f32(&mut buf)
            .with_context(|| format!("all-reduce {i}"))?;
        let took = start.elapsed();
        let cpu = cpu_now()?.saturating_sub(cpu_before);
        if let Some((at, got, expected)) = allreduce::first_mismatch(&buf, &want) {
            bail!("all-reduce {i} on rank {rank}: element {at} is {got}, expected {expected}");
        }
        if i >= args.warmup {
            times_s.push(took.as_secs_f64());
            cpu_s.push(cpu.as_secs_f64());
        }
    }
    Ok(serde_json::json!({
        "impl": "trainctl",
        "rank": rank,
        "world_size": world_size,
        "bytes": args.bytes,
        "warmup": args.warmup,
        "times_s": times_s,
        "cpu_s": cpu_s,
    })
    .to_string())
}
