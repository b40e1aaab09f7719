//! A lagging coordinator catching up from a snapshot of a large state: a state of 100 000 finished
//! jobs (each a gang of 8 ranks that ran and exited 0 on one of 64 hosts) is built into a snapshot
//! file by one `StateMachineStore`, streamed in openraft-sized chunks
//! (`SNAPSHOT_CHUNK_BYTES`) into a second store's receiving file, and installed there; then a third
//! store opens the installed snapshot from disk, as a restarted coordinator does.
//!
//! Reported: seconds to build, to install (stream + decode + fsync + switch) and to load at open;
//! the snapshot's bytes; the largest JSON body an `InstallSnapshotRequest` of one chunk makes (the
//! Raft RPC's body limit must hold it); and the peak RSS (VmHWM) of each step. Each step runs in a
//! child process of its own and resets its peak (`/proc/self/clear_refs`) once its fixture is
//! ready, so a peak is that step's alone: the build's includes the state it serializes (which the
//! coordinator holds anyway), the install's and the load's the state they decode.
//!
//! Run: `cargo bench -p trainctl-benches --bench snapshot_install`.
//! `TRAINCTL_BENCH_JOBS=10000` picks another number of finished jobs.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use openraft::raft::InstallSnapshotRequest;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Vote};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use trainctl_benches::fixtures;
use trainctl_coordinator::logs::LogStore;
use trainctl_coordinator::raft::state_machine::{StateMachineStore, SNAPSHOT_CHUNK_BYTES};
use trainctl_coordinator::raft::TypeConfig;
use trainctl_coordinator::scheduler;
use trainctl_coordinator::state::{Command, CommandOutcome, JobId, RankPhase};
use trainctl_jobs::JobSpec;

/// Finished jobs in the state, unless `TRAINCTL_BENCH_JOBS` says otherwise.
const DEFAULT_JOBS: usize = 100_000;
/// Hosts the jobs run on (one job per host at a time).
const HOSTS: usize = 64;
const AT_MS: u64 = 1_700_000_000_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--step") {
        let step = args.get(i + 1).context("--step STEP DIR")?;
        let dir = PathBuf::from(args.get(i + 2).context("--step STEP DIR")?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(async {
            match step.as_str() {
                "build" => build(&dir).await,
                "install" => install(&dir).await,
                "load" => load(&dir),
                other => bail!("no step {other}"),
            }
        });
    }
    let jobs: usize = match std::env::var("TRAINCTL_BENCH_JOBS") {
        Ok(n) => n.parse().context("TRAINCTL_BENCH_JOBS")?,
        Err(_) => DEFAULT_JOBS,
    };
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    println!("snapshot_install: {jobs} finished jobs (8 ranks each, {HOSTS} hosts)");
    for step in ["build", "install", "load"] {
        let status = Process::new(&exe)
            .args(["--step", step])
            .arg(dir.path())
            .env("TRAINCTL_BENCH_JOBS", jobs.to_string())
            .status()
            .with_context(|| format!("run step {step}"))?;
        ensure!(status.success(), "step {step} failed: {status}");
    }
    Ok(())
}

fn jobs() -> usize {
    std::env::var("TRAINCTL_BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_JOBS)
}

/// The store of data dir `dir` (its snapshots and rank logs where a coordinator keeps them).
fn open(dir: &Path) -> anyhow::Result<StateMachineStore> {
    std::fs::create_dir_all(dir)?;
    let db = Arc::new(redb::Database::create(dir.join("state.redb"))?);
    StateMachineStore::open(db, dir.join("snapshots"), LogStore::new(dir.join("logs")))
}

/// Applies `command` as the next log entry.
async fn apply(
    sm: &mut StateMachineStore,
    index: &mut u64,
    command: Command,
) -> anyhow::Result<CommandOutcome> {
    *index += 1;
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), *index),
        payload: EntryPayload::Normal(command),
    };
    Ok(sm.apply([entry]).await?.remove(0))
}

/// Kilobytes of the process's memory: `VmHWM` (peak) or `VmRSS` (now).
fn memory_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} in /proc/self/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("a number")?
        .parse()?)
}

/// Starts a new peak: VmHWM becomes VmRSS.
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("reset the peak RSS (clear_refs)")
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// A 1-host gang of 8 ranks with 8 GPUs, the benches' realistic spec otherwise.
fn spec(seq: usize) -> anyhow::Result<JobSpec> {
    let mut value: serde_json::Value = serde_json::from_str(&trainctl_benches::job_spec_json(seq))?;
    value["resources"]["nodes"] = 1.into();
    Ok(JobSpec::from_json(&value.to_string(), "bench")?)
}

async fn build(dir: &Path) -> anyhow::Result<()> {
    let jobs = jobs();
    let mut sm = open(&dir.join("leader"))?;
    let mut index = 0;
    let started = Instant::now();
    for i in 0..HOSTS {
        apply(&mut sm, &mut index, fixtures::register_node(i, AT_MS)).await?;
    }
    let mut submitted = 0;
    while submitted < jobs {
        let round = HOSTS.min(jobs - submitted);
        let mut submits = Vec::new();
        for _ in 0..round {
            submits.push(Command::SubmitJob {
                spec: spec(submitted)?,
                at_ms: AT_MS,
                secret: String::new(),
                resume_from_job: None,
            });
            submitted += 1;
        }
        let outcome = apply(&mut sm, &mut index, Command::Batch(submits)).await?;
        let CommandOutcome::Batch(outcomes) = outcome else {
            bail!("submit: {outcome:?}")
        };
        let ids: Vec<JobId> = outcomes
            .iter()
            .map(|o| match o {
                CommandOutcome::JobSubmitted { job } => Ok(*job),
                other => Err(anyhow::anyhow!("submit: {other:?}")),
            })
            .collect::<Result<_, _>>()?;
        for &job in &ids {
            let placement =
                sm.read(|s| scheduler::plan(&s.cluster_snapshot(), &s.jobs[&job].spec.resources));
            let placement = placement.map_err(|e| anyhow::anyhow!("plan job {job}: {e:?}"))?;
            let outcome = apply(
                &mut sm,
                &mut index,
                Command::PlaceJob {
                    job,
                    placement,
                    at_ms: AT_MS,
                },
            )
            .await?;
            ensure!(outcome == CommandOutcome::Done, "place {job}: {outcome:?}");
        }
        let reports =
            sm.read(|s| fixtures::rank_reports(s, &ids, RankPhase::Exited, Some(0), AT_MS + 1));
        apply(&mut sm, &mut index, Command::Batch(reports)).await?;
    }
    let finished = sm.read(|s| s.jobs.values().filter(|j| j.state.is_terminal()).count());
    ensure!(finished == jobs, "{finished} of {jobs} jobs finished");
    let fixture = started.elapsed();

    let state_rss = memory_kib("VmRSS")?;
    reset_peak()?;
    let started = Instant::now();
    let snapshot = sm.build_snapshot().await?;
    let took = started.elapsed();
    let peak = memory_kib("VmHWM")?;
    let bytes = std::fs::metadata(current_file(&dir.join("leader"))?)?.len();
    std::fs::write(dir.join("meta.json"), serde_json::to_vec(&snapshot.meta)?)?;
    println!(
        "  fixture: {finished} finished jobs applied through the state machine in {:.1} s; RSS {}",
        fixture.as_secs_f64(),
        mib(state_rss)
    );
    println!(
        "  build:   {:.2} s, {:.1} MiB snapshot file; peak RSS {} (state {} + {} for the build)",
        took.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64,
        mib(peak),
        mib(state_rss),
        mib(peak.saturating_sub(state_rss)),
    );
    Ok(())
}

/// The snapshot file of data dir `dir` (the only one there after a build or an install).
fn current_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir.join("snapshots"))? {
        files.push(entry?.path());
    }
    ensure!(files.len() == 1, "one snapshot file: {files:?}");
    Ok(files.remove(0))
}

async fn install(dir: &Path) -> anyhow::Result<()> {
    let meta: openraft::SnapshotMeta<u64, openraft::BasicNode> =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)?;
    let path = current_file(&dir.join("leader"))?;
    let chunk_bytes = SNAPSHOT_CHUNK_BYTES as usize;

    // Untimed: the largest Raft message a chunk makes, as the network sends it (JSON).
    let mut source = std::fs::File::open(&path)?;
    let mut largest_body = 0;
    let mut chunks = 0;
    loop {
        let mut data = Vec::with_capacity(chunk_bytes);
        (&mut source)
            .take(chunk_bytes as u64)
            .read_to_end(&mut data)?;
        if data.is_empty() {
            break;
        }
        let request = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            meta: meta.clone(),
            offset: (chunks * chunk_bytes) as u64,
            data,
            done: false,
        };
        largest_body = largest_body.max(serde_json::to_vec(&request)?.len());
        chunks += 1;
    }

    let mut follower = open(&dir.join("follower"))?;
    source.seek(SeekFrom::Start(0))?;
    reset_peak()?;
    let started = Instant::now();
    // As openraft's chunked transport does: a chunk read at its offset into a buffer of its own,
    // written at its offset into the receiving file; then `install_snapshot`.
    let mut receiving = follower.begin_receiving_snapshot().await?;
    let mut offset = 0u64;
    loop {
        let mut data = Vec::with_capacity(chunk_bytes);
        (&mut source)
            .take(chunk_bytes as u64)
            .read_to_end(&mut data)?;
        if data.is_empty() {
            break;
        }
        receiving.seek(SeekFrom::Start(offset)).await?;
        receiving.write_all(&data).await?;
        offset += data.len() as u64;
    }
    receiving.shutdown().await?;
    follower.install_snapshot(&meta, receiving).await?;
    let took = started.elapsed();
    let peak = memory_kib("VmHWM")?;
    let jobs = follower.read(|s| s.jobs.len());
    ensure!(jobs == self::jobs(), "installed {jobs} jobs");
    println!(
        "  install: {:.2} s for {chunks} chunks of {} KiB (stream, fsync, decode, switch); peak RSS {}",
        took.as_secs_f64(),
        chunk_bytes / 1024,
        mib(peak)
    );
    println!(
        "           largest Raft message of one chunk: {largest_body} bytes of JSON ({:.2} x the chunk)",
        largest_body as f64 / chunk_bytes as f64
    );
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<()> {
    reset_peak()?;
    let started = Instant::now();
    let restarted = open(&dir.join("follower"))?;
    let took = started.elapsed();
    let peak = memory_kib("VmHWM")?;
    let jobs = restarted.read(|s| s.jobs.len());
    ensure!(jobs == self::jobs(), "loaded {jobs} jobs");
    println!(
        "  load:    {:.2} s to open the installed snapshot from disk (a restart); peak RSS {}",
        took.as_secs_f64(),
        mib(peak)
    );
    Ok(())
}
