//! How long `scheduler::plan` takes to place a 64-host x 8-GPU gang on 1 000, 10 000 and 50 000
//! hosts of 8 GPUs, empty, half busy and 90% busy; and, separately, what building the snapshot from
//! the replicated `State` costs (the scheduling loop and every submission build one).
//!
//! Run: `cargo bench -p trainctl-benches --bench scheduler`.
//! `TRAINCTL_BENCH_HOSTS=1000,10000` picks other sizes; `TRAINCTL_BENCH_CASE_MS` the time spent
//! measuring each case (default 1500 ms).

use std::hint::black_box;
use std::time::Duration;

use anyhow::{ensure, Context};
use trainctl_benches::fixtures::{self, Fill};
use trainctl_benches::{micros, time_case, Summary};
use trainctl_coordinator::scheduler;

/// Sizes measured unless `TRAINCTL_BENCH_HOSTS` says otherwise.
const DEFAULT_HOSTS: [usize; 3] = [1_000, 10_000, 50_000];
/// Time spent measuring one case, unless `TRAINCTL_BENCH_CASE_MS` says otherwise.
const DEFAULT_CASE_MS: u64 = 1_500;

struct Row {
    hosts: usize,
    fill: Fill,
    plan: Summary,
    snapshot: Summary,
}

fn main() -> anyhow::Result<()> {
    let hosts = match std::env::var("TRAINCTL_BENCH_HOSTS") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("TRAINCTL_BENCH_HOSTS: `{s}` is not a number"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => DEFAULT_HOSTS.to_vec(),
    };
    let case_budget = Duration::from_millis(match std::env::var("TRAINCTL_BENCH_CASE_MS") {
        Ok(ms) => ms
            .parse()
            .context("TRAINCTL_BENCH_CASE_MS is not a number of milliseconds")?,
        Err(_) => DEFAULT_CASE_MS,
    });
    let gang = fixtures::gang_64x8();
    println!(
        "scheduler::plan for a {}-host x {}-GPU gang ({} CPUs per host); hosts have {} GPUs, {} CPUs",
        gang.nodes,
        gang.gpus_per_node,
        gang.cpus_per_node,
        fixtures::GPUS_PER_HOST,
        fixtures::CPUS_PER_HOST
    );

    let mut rows = Vec::new();
    for &n in &hosts {
        for fill in Fill::ALL {
            let state = fixtures::state(n, fill);
            let snapshot = state.cluster_snapshot();
            let placement = scheduler::plan(&snapshot, &gang)
                .map_err(|e| anyhow::anyhow!("{n} hosts, {fill}: the gang did not fit: {e}"))?;
            ensure!(
                placement.nodes.len() == gang.nodes as usize,
                "placed {} hosts",
                placement.nodes.len()
            );

            let plan = time_case(case_budget, || {
                black_box(scheduler::plan(black_box(&snapshot), black_box(&gang))).ok();
            });
            let snap = time_case(case_budget, || {
                black_box(black_box(&state).cluster_snapshot());
            });
            rows.push(Row {
                hosts: n,
                fill,
                plan,
                snapshot: snap,
            });
            eprintln!("  measured {n} hosts, {fill}");
        }
    }

    println!();
    println!(
        "{:>7}  {:<20}  {:>12}  {:>12}  {:>15}  {:>15}  {:>7}",
        "hosts",
        "fill",
        "plan med us",
        "plan p99 us",
        "snapshot med us",
        "snapshot p99 us",
        "samples"
    );
    for r in &rows {
        println!(
            "{:>7}  {:<20}  {:>12}  {:>12}  {:>15}  {:>15}  {:>7}",
            r.hosts,
            r.fill.to_string(),
            micros(r.plan.median),
            micros(r.plan.p99),
            micros(r.snapshot.median),
            micros(r.snapshot.p99),
            r.plan.count
        );
    }

    println!();
    println!("growth of the median (x hosts -> ratio of time):");
    println!("{:<20}  {:>26}  {:>26}", "fill", "plan", "snapshot");
    for fill in Fill::ALL {
        let of = |n: usize| rows.iter().find(|r| r.hosts == n && r.fill == fill);
        let mut plan_growth = Vec::new();
        let mut snap_growth = Vec::new();
        for pair in hosts.windows(2) {
            if let (Some(a), Some(b)) = (of(pair[0]), of(pair[1])) {
                let label = format!("{}k/{}k", pair[1] / 1000, pair[0] / 1000);
                plan_growth.push(format!(
                    "{label} {:.1}x",
                    ratio(b.plan.median, a.plan.median)
                ));
                snap_growth.push(format!(
                    "{label} {:.1}x",
                    ratio(b.snapshot.median, a.snapshot.median)
                ));
            }
        }
        println!(
            "{:<20}  {:>26}  {:>26}",
            fill.to_string(),
            plan_growth.join(", "),
            snap_growth.join(", ")
        );
    }
    Ok(())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}
