//! How long the control plane takes writes again after its leader dies: three `trainctl
//! coordinator` processes (3 voters, `--insecure`), a steady submission load, and the leader
//! SIGKILLed, over and over.
//!
//! Each round:
//! 1. the load runs for a while; the leader is found with `GET /v1/cluster?local` on the members;
//! 2. it is SIGKILLed (`kill -9`); the clock starts just before the signal;
//! 3. **failover** = from the kill to the first 2xx of a `POST /v1/jobs` *sent after the kill*
//!    (the earliest acknowledgement among all submitters, each retry counted as a new send);
//! 4. the killed coordinator is started again on its data dir with the same flags (no `--join`:
//!    its data dir holds `server.json`), and the round ends when the leader lists 3 voters with no
//!    lag (**rejoin**, from the restart).
//!
//! The load: `TRAINCTL_BENCH_SUBMITTERS` (default 4) tasks, each submitting job after job, each
//! request to the next member round-robin. A submission carries an `Idempotency-Key` of its own and
//! is retried with the same key and body, on the next member after 10 ms, on any transport error,
//! timeout (2 s) or 5xx (503 during an election; `Retry-After` is not waited for), until a 201.
//!
//! At the end every acknowledged submission must exist **exactly once**, with the id it was
//! acknowledged with, in `GET /v1/jobs` on the leader, and every member must hold as many jobs
//! (`?stale`, after they caught up). The bench fails loudly otherwise.
//!
//! Run: `cargo build --release -p trainctl && cargo bench -p trainctl-benches --bench leader_failover`
//! (about 2 min). Knobs: `TRAINCTL_BENCH_ROUNDS` (default 20), `TRAINCTL_BENCH_SUBMITTERS`
//! (default 4), `TRAINCTL_BIN`, `TRAINCTL_BENCH_KEEP=1` (keep data and logs).
//!
//! Coordinators listen on 127.0.10.31 to .33, on free ports.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use trainctl_benches::job_spec_json;
use trainctl_benches::load::{self, Connections};
use trainctl_benches::procs::{self, percentile, BenchDir, Group};

const DEFAULT_ROUNDS: usize = 20;
const DEFAULT_SUBMITTERS: usize = 4;
const MEMBERS: usize = 3;
const NODE_COUNT: usize = 4;
/// One request's limit before it is retried elsewhere.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a retry (on the next member).
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Steady load between rounds, before the next kill.
const STEADY: Duration = Duration::from_millis(1_500);
/// Entries a member may be behind and count as caught up, under the load.
const CAUGHT_UP_LAG: u64 = 8;
/// A failover slower than this fails the round (and the bench).
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// An acknowledged submission.
#[derive(Debug, Clone)]
struct Ack {
    seq: usize,
    id: String,
    /// When the attempt that was acknowledged was sent, and when its 201 arrived.
    sent: Instant,
    acked: Instant,
    attempts: usize,
    replayed: bool,
}

#[derive(Default)]
struct Shared {
    acks: Mutex<Vec<Ack>>,
    /// Failed attempts by kind.
    errors: Mutex<BTreeMap<String, usize>>,
    /// Submissions given up (a 4xx other than 429): a bug in one of the two programs.
    refused: Mutex<Vec<String>>,
    stop: AtomicBool,
    next_seq: AtomicUsize,
}

impl Shared {
    fn error(&self, kind: String) {
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }
}

fn main() -> anyhow::Result<()> {
    let rounds = load::env_count("TRAINCTL_BENCH_ROUNDS", DEFAULT_ROUNDS)?;
    let submitters = load::env_count("TRAINCTL_BENCH_SUBMITTERS", DEFAULT_SUBMITTERS)?;
    let dir = BenchDir::new("leader-failover-")?;
    let bin = procs::trainctl_binary(&dir.path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(&dir.path, &bin, rounds, submitters))
}

struct Round {
    killed: usize,
    new_leader: Option<usize>,
    failover: Option<Duration>,
    rejoin: Duration,
    /// Failed attempts (sent after the kill) before the first acknowledgement.
    failed_attempts: usize,
}

async fn run(dir: &Path, bin: &Path, rounds: usize, submitters: usize) -> anyhow::Result<()> {
    let group_dir = dir.join("coordinators");
    std::fs::create_dir_all(&group_dir)?;
    let mut group = Group::new(bin, &group_dir, MEMBERS, 31)?;
    group.start_all().await.context("start 3 coordinators")?;
    group.register_fake_nodes(NODE_COUNT).await?;
    println!(
        "3 coordinators up (logs in {}); {submitters} submitters, {rounds} rounds",
        group_dir.display()
    );

    let shared = Arc::new(Shared::default());
    let client = load::client_builder(Connections::KeepAlive)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let attempts_after = Arc::new(Mutex::new(None::<Instant>));
    let failed_after = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..submitters {
        let (shared, client, bases) = (shared.clone(), client.clone(), group.bases.clone());
        let (attempts_after, failed_after) = (attempts_after.clone(), failed_after.clone());
        tasks.push(tokio::spawn(async move {
            let mut member = k % bases.len();
            while !shared.stop.load(Ordering::Relaxed) {
                let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
                let key = format!("failover-{}-{seq}", std::process::id());
                let body = job_spec_json(seq);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let base = &bases[member];
                    member = (member + 1) % bases.len();
                    let sent = Instant::now();
                    let result = client
                        .post(format!("{base}/v1/jobs"))
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .header("Idempotency-Key", &key)
                        .body(body.clone())
                        .send()
                        .await;
                    let failed = |shared: &Shared, kind: String| {
                        shared.error(kind);
                        if attempts_after.lock().unwrap().is_some_and(|t| sent >= t) {
                            failed_after.fetch_add(1, Ordering::Relaxed);
                        }
                    };
                    match result {
                        Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                            let replayed = response
                                .headers()
                                .get("idempotent-replayed")
                                .is_some_and(|v| v == "true");
                            match response.json::<serde_json::Value>().await {
                                Ok(answer) => {
                                    let acked = Instant::now();
                                    shared.acks.lock().unwrap().push(Ack {
                                        seq,
                                        id: answer["id"].as_str().unwrap_or("?").to_string(),
                                        sent,
                                        acked,
                                        attempts,
                                        replayed,
                                    });
                                    break;
                                }
                                Err(e) => failed(&shared, format!("201, body unread: {e}")),
                            }
                        }
                        Ok(response) => {
                            let status = response.status();
                            let text = response.text().await.unwrap_or_default();
                            if status.is_server_error()
                                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                            {
                                failed(&shared, format!("HTTP {}", status.as_u16()));
                            } else {
                                shared.error(format!("HTTP {} (given up)", status.as_u16()));
                                shared
                                    .refused
                                    .lock()
                                    .unwrap()
                                    .push(format!("seq {seq} key {key}: {status}: {text}"));
                                break;
                            }
                        }
                        Err(e) if e.is_timeout() => failed(&shared, "timeout".into()),
                        Err(e) if e.is_connect() => failed(&shared, "connect refused".into()),
                        Err(_) => failed(&shared, "connection broken".into()),
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }));
    }

    let mut results = Vec::new();
    let outcome = async {
        for r in 0..rounds {
            tokio::time::sleep(STEADY).await;
            group.check_alive()?;
            let leader = group.wait_leader().await?;
            let acks_before = shared.acks.lock().unwrap().len();
            failed_after.store(0, Ordering::Relaxed);
            let kill_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let t_kill = Instant::now();
            *attempts_after.lock().unwrap() = Some(t_kill);
            group.kill(leader);
            // The earliest acknowledgement of an attempt sent after the kill.
            let failover = loop {
                let first = shared.acks.lock().unwrap()[acks_before..]
                    .iter()
                    .filter(|a| a.sent >= t_kill)
                    .map(|a| a.acked)
                    .min();
                if let Some(acked) = first {
                    // Later pushes may hold an earlier acknowledgement: look once more.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let first = shared.acks.lock().unwrap()[acks_before..]
                        .iter()
                        .filter(|a| a.sent >= t_kill)
                        .map(|a| a.acked)
                        .min()
                        .unwrap_or(acked);
                    break Some(first - t_kill);
                }
                if t_kill.elapsed() > FAILOVER_LIMIT {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let failed_attempts = failed_after.load(Ordering::Relaxed);
            *attempts_after.lock().unwrap() = None;
            let new_leader = group.leader().await;
            let t_restart = Instant::now();
            group.start_member(leader, None)?;
            group.wait_voters_within(MEMBERS, CAUGHT_UP_LAG).await?;
            let rejoin = t_restart.elapsed();
            println!(
                "round {:>2}: killed c{leader} at unix {kill_unix:.3}, new leader {}, first ack after the kill {} ms \
                 ({failed_attempts} failed attempts before it), c{leader} restarted and caught up \
                 in {:.2} s",
                r + 1,
                new_leader.map_or("?".into(), |l| format!("c{l}")),
                failover.map_or("NONE".into(), |f| format!("{:.0}", f.as_secs_f64() * 1e3)),
                rejoin.as_secs_f64()
            );
            results.push(Round {
                killed: leader,
                new_leader,
                failover,
                rejoin,
                failed_attempts,
            });
            if failover.is_none() {
                bail!("no write acknowledged within {FAILOVER_LIMIT:?} of killing c{leader}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    shared.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        // A submitter finishes (retries until acknowledged) the submission it is on.
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .context("a submitter did not finish within 60 s")?
            .context("submitter task")?;
    }
    outcome?;

    report(&results, &shared);
    check_exactly_once(&mut group, &shared).await
}

fn report(results: &[Round], shared: &Shared) {
    let mut failovers: Vec<Duration> = results.iter().filter_map(|r| r.failover).collect();
    failovers.sort_unstable();
    let mut rejoins: Vec<Duration> = results.iter().map(|r| r.rejoin).collect();
    rejoins.sort_unstable();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
    println!(
        "\nleader kill -> first acknowledged write sent after the kill, {} rounds:",
        failovers.len()
    );
    println!(
        "  p50 {} ms, p99 {} ms, max {} ms, min {} ms",
        ms(percentile(&failovers, 50)),
        ms(percentile(&failovers, 99)),
        ms(percentile(&failovers, 100)),
        ms(failovers.first().copied().unwrap_or_default())
    );
    println!(
        "killed coordinator restarted -> voter and caught up: p50 {} ms, max {} ms",
        ms(percentile(&rejoins, 50)),
        ms(percentile(&rejoins, 100))
    );
    let kept = results
        .iter()
        .filter(|r| r.new_leader.is_some_and(|l| l != r.killed))
        .count();
    let failed: usize = results.iter().map(|r| r.failed_attempts).sum();
    println!(
        "  a new leader seen in {kept} of {} rounds; {failed} failed attempts sent after kills in all",
        results.len()
    );
    let acks = shared.acks.lock().unwrap();
    let retried = acks.iter().filter(|a| a.attempts > 1).count();
    let replayed = acks.iter().filter(|a| a.replayed).count();
    let slowest = acks
        .iter()
        .map(|a| a.acked - a.sent)
        .max()
        .unwrap_or_default();
    println!(
        "submissions acknowledged: {} ({retried} after a retry, {replayed} answered as a replay of \
         an earlier attempt); slowest single attempt {} ms",
        acks.len(),
        ms(slowest)
    );
    println!(
        "failed attempts by kind: {:?}",
        shared.errors.lock().unwrap()
    );
}

/// Every acknowledged submission exists exactly once, under its acknowledged id, on the leader and
/// on every member.
async fn check_exactly_once(group: &mut Group, shared: &Shared) -> anyhow::Result<()> {
    group.wait_voters(MEMBERS).await?;
    let leader = group.wait_leader().await?;
    let jobs: serde_json::Value = group
        .client
        .get(format!("{}/v1/jobs", group.bases[leader]))
        .send()
        .await?
        .json()
        .await?;
    let jobs = jobs.as_array().context("GET /v1/jobs: not a list")?;
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for job in jobs {
        by_name
            .entry(job["name"].as_str().unwrap_or("?").to_string())
            .or_default()
            .push(job["id"].as_str().unwrap_or("?").to_string());
    }
    let acks = shared.acks.lock().unwrap().clone();
    let mut problems = Vec::new();
    let mut acked_seqs = BTreeMap::new();
    for a in &acks {
        if let Some(previous) = acked_seqs.insert(a.seq, a.id.clone()) {
            problems.push(format!(
                "seq {} acknowledged twice ({previous}, {})",
                a.seq, a.id
            ));
        }
        let name = format!("bench-{:08}", a.seq);
        match by_name.get(&name) {
            None => problems.push(format!(
                "LOST: {name} acknowledged as job {} (attempt {}, replayed {}) is not in the leader's list",
                a.id, a.attempts, a.replayed
            )),
            Some(ids) if ids.len() > 1 => problems.push(format!(
                "DOUBLED: {name} acknowledged as job {} exists {} times: {ids:?}",
                a.id,
                ids.len()
            )),
            Some(ids) if ids[0] != a.id => problems.push(format!(
                "MISMATCH: {name} acknowledged as job {} but listed as job {}",
                a.id, ids[0]
            )),
            Some(_) => {}
        }
    }
    let unacked: Vec<&String> = by_name
        .keys()
        .filter(|n| {
            n.strip_prefix("bench-")
                .and_then(|s| s.parse::<usize>().ok())
                .is_none_or(|seq| !acked_seqs.contains_key(&seq))
        })
        .collect();
    for (name, ids) in &by_name {
        if ids.len() > 1 && !problems.iter().any(|p| p.contains(name.as_str())) {
            problems.push(format!("DOUBLED (never acknowledged): {name}: {ids:?}"));
        }
    }
    let mut counts = Vec::new();
    for base in &group.bases {
        let stale: serde_json::Value = group
            .client
            .get(format!("{base}/v1/jobs?stale"))
            .send()
            .await?
            .json()
            .await?;
        counts.push(stale.as_array().map_or(0, Vec::len));
    }
    let refused = shared.refused.lock().unwrap().clone();
    println!(
        "\nexactly-once check: {} acknowledged, {} jobs on the leader ({} never acknowledged: {:?}), \
         jobs per member (?stale) {counts:?}, {} submissions refused with a 4xx",
        acks.len(),
        jobs.len(),
        unacked.len(),
        unacked.iter().take(5).collect::<Vec<_>>(),
        refused.len()
    );
    for p in problems.iter().take(50) {
        println!("  {p}");
    }
    for r in refused.iter().take(20) {
        println!("  refused: {r}");
    }
    ensure!(
        problems.is_empty(),
        "{} acknowledged submissions are lost, doubled or renamed (see above)",
        problems.len()
    );
    ensure!(
        refused.is_empty(),
        "{} submissions were refused",
        refused.len()
    );
    ensure!(
        counts.iter().all(|&c| c == jobs.len()),
        "members hold different job counts: {counts:?}, the leader lists {}",
        jobs.len()
    );
    println!("every acknowledged submission exists exactly once, on every member");
    Ok(())
}
