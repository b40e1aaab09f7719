//! A new coordinator joins a group that holds **100 000 finished jobs**: how long until it is a
//! voter, and how much memory it needs on the way. Real processes end to end: three `trainctl
//! coordinator --insecure` processes (3 voters), no agents (4 fake 8-GPU hosts registered over the
//! agent gRPC service, so the 4-host job spec of `trainctl_benches::job_spec_json` fits; the first job is placed on
//! them, the rest queue), 100 000 `POST /v1/jobs` from 64 clients, then `POST
//! /v1/jobs/{id}/cancel` for each (a cancelled job is finished). The leader's log has been
//! snapshotted (every 2 000 entries) and purged by then, so a fourth coordinator started with
//! `--join` receives the state as a snapshot (streamed in 256 KiB chunks), then the log after it.
//!
//! Measured: from starting the 4th process to (a) the leader listing it as a **voter** (`GET
//! /v1/cluster`), (b) no lag; its **peak RSS** (`VmHWM` of `/proc/PID/status`, polled every 20 ms
//! and read once more at the end), next to the leader's. Then the new member must list as many jobs
//! (`GET /v1/jobs?stale` on it) as the leader.
//!
//! The in-process measure of the same snapshot (build, install and load, each step's own peak RSS)
//! is `benches/snapshot_install.rs`; this one adds the network, openraft's transport and the join.
//!
//! Run: `cargo build --release -p trainctl && cargo bench -p trainctl-benches --bench snapshot_join`
//! (about 2 to 3 min). Knobs: `TRAINCTL_BENCH_SNAPSHOT_JOBS` (default 100000),
//! `TRAINCTL_BENCH_CONCURRENCY` (clients for the submissions and cancels, default 64),
//! `TRAINCTL_BIN`, `TRAINCTL_BENCH_KEEP=1`.
//!
//! Coordinators listen on 127.0.10.21 to .24, on free ports.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use trainctl_benches::load::{self, run_level_spread, Connections, Target};
use trainctl_benches::procs::{self, rss_kib, BenchDir, Group, MEMBER_TIMEOUT};

const DEFAULT_JOBS: usize = 100_000;
const DEFAULT_CLIENTS: usize = 64;
const MEMBERS: usize = 3;
const NODE_COUNT: usize = 4;

fn main() -> anyhow::Result<()> {
    let jobs = load::env_count("TRAINCTL_BENCH_SNAPSHOT_JOBS", DEFAULT_JOBS)?;
    let clients = load::env_counts("TRAINCTL_BENCH_CONCURRENCY", &[DEFAULT_CLIENTS])?[0];
    let dir = BenchDir::new("snapshot-join-")?;
    let bin = procs::trainctl_binary(&dir.path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(&dir.path, &bin, jobs, clients))
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

async fn run(dir: &Path, bin: &Path, jobs: usize, clients: usize) -> anyhow::Result<()> {
    let group_dir = dir.join("coordinators");
    std::fs::create_dir_all(&group_dir)?;
    let mut group = Group::new(bin, &group_dir, MEMBERS, 21)?;
    group.start_all().await.context("start 3 coordinators")?;
    group.register_fake_nodes(NODE_COUNT).await?;
    println!("3 coordinators up; logs in {}", group_dir.display());

    // Submit.
    let client = load::http_client(Connections::KeepAlive)?;
    let targets: Vec<Target> = group
        .bases
        .iter()
        .map(|b| Target::Trainctl { base: b.clone() })
        .collect();
    let submitted =
        run_level_spread(std::slice::from_ref(&client), &targets, clients, jobs, 0).await?;
    println!(
        "submitted {jobs} jobs from {clients} clients in {:.1} s ({:.0}/s)",
        submitted.elapsed.as_secs_f64(),
        submitted.per_second()
    );

    // Cancel every one that has not ended.
    let leader = group.wait_leader().await?;
    let listed: serde_json::Value = client
        .get(format!("{}/v1/jobs", group.bases[leader]))
        .send()
        .await?
        .json()
        .await?;
    let ids: Arc<Vec<String>> = Arc::new(
        listed
            .as_array()
            .context("GET /v1/jobs: not a list")?
            .iter()
            .filter_map(|j| j["id"].as_str().map(str::to_string))
            .collect(),
    );
    ensure!(
        ids.len() == jobs,
        "{} jobs listed, {jobs} submitted",
        ids.len()
    );
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (client, ids, next) = (client.clone(), ids.clone(), next.clone());
        let base = group.bases[k % MEMBERS].clone();
        tasks.push(tokio::spawn(async move {
            while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                let url = format!("{base}/v1/jobs/{id}/cancel");
                let response = client.post(&url).send().await?;
                let status = response.status();
                let text = response.text().await?;
                ensure!(status.is_success(), "POST {url}: {status}: {text}");
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "cancelled {} jobs in {:.1} s ({:.0}/s)",
        ids.len(),
        t.elapsed().as_secs_f64(),
        ids.len() as f64 / t.elapsed().as_secs_f64()
    );
    let cancelled = count(
        &client,
        &format!("{}/v1/jobs?state=cancelled", group.bases[leader]),
    )
    .await?;
    println!("jobs cancelled on the leader: {cancelled} of {jobs}");
    group.wait_voters(MEMBERS).await?;
    let leader = group.wait_leader().await?;
    let view = group.cluster_view(leader, true).await?;
    println!(
        "leader before the join: last log index {}, snapshot index {}, term {}",
        view["last_log_index"], view["snapshot_index"], view["term"]
    );
    let leader_pid = group.pid(leader).context("the leader runs")?;
    let leader_rss = rss_kib(leader_pid).unwrap_or_default();
    println!(
        "leader c{leader}: peak RSS {}, RSS now {}",
        mib(leader_rss.0),
        mib(leader_rss.1)
    );
    let data_size = dir_size(&group_dir.join(format!("c{leader}")));
    println!("leader's data dir: {}", mib(data_size / 1024));

    // Join a fourth.
    let new = group.add_slot(24)?;
    let t = Instant::now();
    group.start_member(new, Some(0))?;
    let pid = group.pid(new).context("the new member runs")?;
    let mut peak = 0;
    let mut voter_at = None;
    let caught_up_at = loop {
        group.check_alive()?;
        if let Some((hwm, _)) = rss_kib(pid) {
            peak = peak.max(hwm);
        }
        if voter_at.is_none() && group.is_voter(new).await {
            voter_at = Some(t.elapsed());
        }
        if voter_at.is_some() && group.voters_caught_up(MEMBERS + 1, 0).await {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < MEMBER_TIMEOUT,
            "c{new} not a caught-up voter within {MEMBER_TIMEOUT:?}; see {}",
            group.log(new).display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (hwm, rss) = rss_kib(pid).unwrap_or_default();
    peak = peak.max(hwm);
    let own = group.cluster_view(new, true).await?;
    let on_new = count(&client, &format!("{}/v1/jobs?stale", group.bases[new])).await?;
    let on_leader = count(&client, &format!("{}/v1/jobs?stale", group.bases[leader])).await?;
    println!(
        "\nc{new} joined: voter after {:.2} s, caught up (no lag) after {:.2} s; peak RSS {} (RSS now {}); \
         its snapshot index {}, last applied {}; jobs on it {on_new}, on the leader {on_leader}",
        voter_at.unwrap_or_default().as_secs_f64(),
        caught_up_at.as_secs_f64(),
        mib(peak),
        mib(rss),
        own["snapshot_index"],
        own["last_applied_index"],
    );
    let snapshots = group_dir.join(format!("c{new}")).join("snapshots");
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        for e in entries.flatten() {
            println!(
                "  received snapshot file {} ({})",
                e.file_name().to_string_lossy(),
                mib(e.metadata().map(|m| m.len()).unwrap_or(0) / 1024)
            );
        }
    }
    ensure!(
        on_new == on_leader && on_new == jobs,
        "the new member lists {on_new} jobs, the leader {on_leader}, {jobs} submitted"
    );
    Ok(())
}

async fn count(client: &reqwest::Client, url: &str) -> anyhow::Result<usize> {
    let list: serde_json::Value = client.get(url).send().await?.json().await?;
    Ok(list.as_array().map_or(0, Vec::len))
}

/// Bytes of the files under `path`.
fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
