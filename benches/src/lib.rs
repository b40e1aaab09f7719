//! Shared pieces of the trainctl benchmarks: latency summaries, cluster fixtures, the job spec the
//! write-path benchmarks submit, an in-process coordinator and the REST load that drives it.
//!
//! The benchmarks themselves are `[[bench]]` targets with `harness = false` (plain `main`s timed
//! with [`std::time::Instant`]), so they need no benchmarking framework:
//! - `benches/scheduler.rs`: `scheduler::plan` for a 64-host gang on 1 000 to 50 000 hosts.
//! - `benches/write_path.rs`: job submissions through REST and the fsync'd Raft log, next to etcd.
//! - `benches/tls_overhead.rs`: the same submissions, and agents' gRPC heartbeats, over plain
//!   HTTP next to TLS (with tokens, and mutual TLS for agents).
//! - `benches/store_rendezvous.rs`: 4 096 clients rendezvous on `trainctl store`, next to torch's
//!   own TCPStore server.
//!
//! # Layout
//! - [`allreduce`]: the rank side of the all-reduce benchmark (`src/bin/ring_allreduce.rs`, driven
//!   by `scripts/allreduce_vs_gloo.sh` next to torch's gloo): arguments, known inputs, the check.
//! - [`Summary`]: median and p99 of a set of timings.
//! - [`fixtures`]: cluster snapshots and coordinator states of a given size and fill.
//! - [`served`]: a real coordinator served in-process, secure or plain, and its REST clients.
//! - [`load`]: REST write load from N concurrent clients ([`load::run_level`]).
//! - [`procs`]: real `trainctl coordinator` processes forming a Raft group (replication benches).
//! - [`cpu`]: CPU time of a named group of threads (a runtime serving a coordinator).
//! - [`stores`]: TCPStore servers as processes (`trainctl store`, torch's libuv server) and the
//!   open-file limit (`benches/store_rendezvous.rs`).
//! - [`job_spec_json`]: a realistic ~300-byte job spec.
//! - [`base64`]: the few bytes of base64 that etcd's JSON gateway needs.

use std::time::{Duration, Instant};

pub mod allreduce;
pub mod cpu;
pub mod fixtures;
pub mod load;
pub mod procs;
pub mod served;
pub mod stores;

/// Median and p99 of a set of timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub median: Duration,
    pub p99: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted in place); `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        // Nearest-rank percentiles: the smallest sample with at least p% of samples at or below it.
        let rank = |p: usize| (n * p).div_ceil(100).clamp(1, n) - 1;
        Some(Summary {
            count: n,
            median: samples[rank(50)],
            p99: samples[rank(99)],
        })
    }
}

/// Microseconds, with one decimal under 100 us.
pub fn micros(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// Milliseconds with two decimals.
pub fn millis(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// A job spec as a user would POST it: a 4-host gang of 8 GPUs each, with a little environment,
/// about 300 bytes of JSON. `seq` makes each name distinct.
pub fn job_spec_json(seq: usize) -> String {
    serde_json::json!({
        "name": format!("bench-{seq:08}"),
        "launch": {
            "command": ["python3", "train.py", "--config", "configs/llama-8b.yaml", "--steps", "1000"],
            "env": {
                "NCCL_DEBUG": "WARN",
                "WANDB_PROJECT": "trainctl-bench",
                "HF_HOME": "/mnt/cache/hf",
            },
        },
        "resources": {
            "nodes": 4,
            "procs_per_node": 8,
            "gpus_per_node": 8,
            "cpus_per_node": 16,
            "memory_per_node_mib": 65536,
        },
    })
    .to_string()
}

/// Standard base64 with padding (RFC 4648), as etcd's JSON gateway wants keys and values.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Untimed runs of a case before [`time_case`] times it.
pub const CASE_WARMUP_COUNT: usize = 3;
/// Bounds on the timed runs of one case, whatever the time budget says.
pub const CASE_SAMPLES_MIN: usize = 20;
pub const CASE_SAMPLES_MAX: usize = 20_000;

/// Runs `f` a few times untimed, then times it until `budget` is spent (within the sample bounds).
pub fn time_case(budget: Duration, mut f: impl FnMut()) -> Summary {
    for _ in 0..CASE_WARMUP_COUNT {
        f();
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < CASE_SAMPLES_MAX
        && (samples.len() < CASE_SAMPLES_MIN || started.elapsed() < budget)
    {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    Summary::of(&mut samples).expect("at least CASE_SAMPLES_MIN samples")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn summary_uses_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Summary::of(&mut samples).unwrap();
        assert_eq!(
            (s.median, s.p99),
            (Duration::from_micros(50), Duration::from_micros(99))
        );
        assert_eq!(Summary::of(&mut []), None);
    }

    #[test]
    fn job_spec_is_valid_and_about_300_bytes() {
        let json = job_spec_json(7);
        trainctl_jobs::JobSpec::from_json(&json, "bench").unwrap();
        assert!((250..=350).contains(&json.len()), "{} bytes", json.len());
    }
}
