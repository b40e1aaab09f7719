//! What one agent heartbeat costs the coordinator in reads of the replicated state, on a cluster
//! that has run many jobs: 1 000 hosts, 100 000 finished jobs and one running 1-host job per host.
//!
//! Each heartbeat (`agents.rs`) asks three things of the state for the reporting node: the earlier
//! attempts whose processes are gone (`gone_attempts`), the reports that change something and the
//! ended jobs it runs nothing of (`changed_observations`), and what it should run
//! (`assignments_for`). The leader's supervision loop asks for every live job four times a second
//! (`State::live_jobs`). Both are timed twice in one run: with the job index that `State::apply`
//! keeps (what the coordinator runs), and on the same state loaded from JSON without one, which
//! answers by scanning every job (what the coordinator did before the index).
//!
//! Run: `cargo bench -p trainctl-benches --bench heartbeat`. Knobs: `TRAINCTL_BENCH_JOBS`
//! (finished jobs, default 100 000), `TRAINCTL_BENCH_HOSTS` (default 1 000),
//! `TRAINCTL_BENCH_CASE_MS` (time per case, default 1 500 ms).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use trainctl_benches::{fixtures, micros, time_case};
use trainctl_coordinator::agents::{assignments_for, changed_observations, gone_attempts};
use trainctl_coordinator::scheduler;
use trainctl_coordinator::state::{Command, CommandOutcome, JobId, NodeId, RankPhase, State};
use trainctl_jobs::JobSpec;
use trainctl_proto::agent::{RankPhase as WirePhase, RankReport};

const AT_MS: u64 = 1_700_000_000_000;

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}: `{v}` is not a number")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let finished = env_number("TRAINCTL_BENCH_JOBS", 100_000)?;
    let hosts = env_number("TRAINCTL_BENCH_HOSTS", 1_000)?;
    let budget = Duration::from_millis(env_number("TRAINCTL_BENCH_CASE_MS", 1_500)? as u64);
    let started = Instant::now();
    let indexed = build(hosts, finished)?;
    println!(
        "heartbeat: {hosts} hosts, {finished} finished jobs and {hosts} running (1 host x 8 ranks \
         each), built through State::apply in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let scanning: State = serde_json::from_slice(&serde_json::to_vec(&indexed)?)?;
    ensure!(scanning == indexed, "the loaded state differs");

    // The node in the middle, and what its agent reports: its running job's 8 ranks.
    let node = NodeId(format!("gpu-{:05}", hosts / 2));
    let reports: Vec<RankReport> = indexed
        .jobs_assigned_to(&node)
        .flat_map(|job| {
            job.ranks.iter().map(|r| RankReport {
                job_id: job.id.to_string(),
                attempt: job.attempt,
                rank: r.rank,
                phase: WirePhase::Running as i32,
                exit_code: 0,
                message: String::new(),
                pid: 1000 + r.rank,
            })
        })
        .collect();
    ensure!(reports.len() == 8, "{} reports", reports.len());

    println!(
        "\n{:<32} {:>14} {:>14} {:>14} {:>14} {:>8}",
        "read (us)", "index median", "index p99", "scan median", "scan p99", "speedup"
    );
    let heartbeat = |s: &State| {
        let gone = gone_attempts(s, &node, &reports);
        let (observations, idle) = changed_observations(s, &node, &reports);
        let assignments = assignments_for(s, &node, 7000);
        black_box((gone, observations, idle, assignments));
    };
    let live = |s: &State| {
        black_box(s.live_jobs().count());
    };
    // Both must answer the same before either is timed.
    ensure!(
        assignments_for(&indexed, &node, 7000).len() == 1
            && assignments_for(&scanning, &node, 7000).len() == 1
            && indexed.live_jobs().count() == hosts
            && scanning.live_jobs().count() == hosts,
        "the indexed and scanning states answer differently"
    );
    for (name, read) in [
        ("one heartbeat's reads", &heartbeat as &dyn Fn(&State)),
        ("live jobs (supervision pass)", &live),
    ] {
        let with_index = time_case(budget, || read(&indexed));
        let by_scan = time_case(budget, || read(&scanning));
        println!(
            "{name:<32} {:>14} {:>14} {:>14} {:>14} {:>7.0}x",
            micros(with_index.median),
            micros(with_index.p99),
            micros(by_scan.median),
            micros(by_scan.p99),
            by_scan.median.as_secs_f64() / with_index.median.as_secs_f64().max(1e-12)
        );
    }
    Ok(())
}

/// A 1-host gang of 8 ranks with 8 GPUs, the benches' spec otherwise.
fn spec(seq: usize) -> anyhow::Result<JobSpec> {
    let mut value: serde_json::Value = serde_json::from_str(&trainctl_benches::job_spec_json(seq))?;
    value["resources"]["nodes"] = 1.into();
    Ok(JobSpec::from_json(&value.to_string(), "bench")?)
}

/// Submits `count` jobs and places each; returns their ids.
fn submit_and_place(
    state: &mut State,
    count: usize,
    seq: &mut usize,
) -> anyhow::Result<Vec<JobId>> {
    let mut submits = Vec::new();
    for _ in 0..count {
        submits.push(Command::SubmitJob {
            spec: spec(*seq)?,
            at_ms: AT_MS,
            secret: String::new(),
            resume_from_job: None,
        });
        *seq += 1;
    }
    let CommandOutcome::Batch(outcomes) = state.apply(Command::Batch(submits)) else {
        bail!("a batch of submissions was not answered by a batch");
    };
    let mut ids = Vec::new();
    for outcome in outcomes {
        let CommandOutcome::JobSubmitted { job } = outcome else {
            bail!("submit: {outcome:?}");
        };
        let placement =
            scheduler::plan(&state.cluster_snapshot(), &state.jobs[&job].spec.resources)
                .map_err(|e| anyhow::anyhow!("plan job {job}: {e:?}"))?;
        let outcome = state.apply(Command::PlaceJob {
            job,
            placement,
            at_ms: AT_MS,
        });
        ensure!(outcome == CommandOutcome::Done, "place {job}: {outcome:?}");
        ids.push(job);
    }
    Ok(ids)
}

/// Every rank of each of `jobs` reported in `phase` by its node's agent.
fn report(state: &mut State, jobs: &[JobId], phase: RankPhase, exit_code: Option<i32>) {
    let reports = fixtures::rank_reports(state, jobs, phase, exit_code, AT_MS + 1);
    state.apply(Command::Batch(reports));
}

fn build(hosts: usize, finished: usize) -> anyhow::Result<State> {
    let mut state = State::default();
    for i in 0..hosts {
        state.apply(fixtures::register_node(i, AT_MS));
    }
    let mut seq = 0;
    while seq < finished {
        let round = hosts.min(finished - seq);
        let ids = submit_and_place(&mut state, round, &mut seq)?;
        report(&mut state, &ids, RankPhase::Exited, Some(0));
    }
    let running = submit_and_place(&mut state, hosts, &mut seq)?;
    report(&mut state, &running, RankPhase::Running, None);
    let ended = state
        .jobs
        .values()
        .filter(|j| j.state.is_terminal())
        .count();
    ensure!(ended == finished, "{ended} of {finished} jobs finished");
    Ok(state)
}
