//! Filling in rank logs this coordinator lacks.
//!
//! Rank logs are replicated through Raft ([`Command::AppendLogs`](crate::state::Command)), so every
//! member that applied the log writes the same files. A member that caught up from a snapshot
//! (a new or replaced server, or one that was down long enough) has no files for the output
//! committed before that snapshot. The state knows how far each log is committed
//! ([`Job::log_bytes`](crate::state::Job)); before a coordinator answers a logs request, it
//! fetches what its own copy lacks from the other members (`/internal/raft/log-read`, signed) and
//! appends it, so `trainctl logs` returns every line from whichever coordinator leads. After each
//! snapshot it installs, a coordinator also fills in every log in the background
//! ([`after_snapshot_installs`]), so the output does not depend on the members that held it
//! staying in the group until someone reads it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::logs::LogStore;
use crate::server::Coordinator;
use crate::state::{JobId, LogRecord};

/// Most bytes one `log-read` returns.
pub const LOG_READ_BYTES_MAX: u64 = 1 << 20;
/// Most bytes fetched while answering one logs request (the rest on the next).
pub const FILL_IN_BYTES_MAX: u64 = 64 << 20;

/// A `log-read` request: bytes of one rank's log from `offset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRange {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub offset: u64,
    pub max: u64,
}

/// Answers a `log-read` from this coordinator's files (at most [`LOG_READ_BYTES_MAX`]).
pub fn serve(store: &LogStore, range: &LogRange) -> std::io::Result<LogRecord> {
    let data = store.read_range(
        range.job,
        range.attempt,
        range.rank,
        range.offset,
        range.max.min(LOG_READ_BYTES_MAX),
    )?;
    Ok(LogRecord {
        job: range.job,
        attempt: range.attempt,
        rank: range.rank,
        offset: range.offset,
        data,
    })
}

/// The ranks of `job`'s `attempt` among `ranks` whose committed output this coordinator's copy
/// lacks: (rank, bytes held here, bytes committed).
fn missing(c: &Coordinator, job: JobId, attempt: u32, ranks: &[u32]) -> Vec<(u32, u64, u64)> {
    let committed: Vec<(u32, u64)> = c.state.read(|s| {
        let Some(by_rank) = s.jobs.get(&job).and_then(|j| j.log_bytes.get(&attempt)) else {
            return Vec::new();
        };
        ranks
            .iter()
            .filter_map(|r| by_rank.get(r).map(|n| (*r, *n)))
            .collect()
    });
    committed
        .into_iter()
        .filter_map(|(rank, committed)| {
            let held = c.logs.stored_len(job, attempt, rank);
            (held < committed).then_some((rank, held, committed))
        })
        .collect()
}

/// Fetches from the other members what this coordinator lacks of the committed output of `ranks`
/// of `job`'s `attempt`. Returns the ranks still incomplete (no reachable member had the bytes).
pub async fn fill_in(c: &Coordinator, job: JobId, attempt: u32, ranks: &[u32]) -> Vec<u32> {
    // Cheap when nothing is missing: a state read and one stat per rank.
    let gaps = missing(c, job, attempt, ranks);
    if gaps.is_empty() {
        return Vec::new();
    }
    let me = c.config.server_id;
    let peers: Vec<String> = c
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != me)
        .map(|(_, n)| n.addr.clone())
        .collect();
    let mut budget = FILL_IN_BYTES_MAX;
    let mut incomplete = Vec::new();
    for (rank, mut held, committed) in gaps {
        'rank: while held < committed && budget > 0 {
            for peer in &peers {
                let range = LogRange {
                    job,
                    attempt,
                    rank,
                    offset: held,
                    max: (committed - held).min(LOG_READ_BYTES_MAX).min(budget),
                };
                let Ok(record) = c
                    .peers
                    .call::<_, LogRecord>(peer, "log-read", &range, Duration::from_secs(10))
                    .await
                else {
                    continue;
                };
                if record.data.is_empty() || record.offset != held {
                    continue;
                }
                let store = c.logs.clone();
                let len = record.data.len() as u64;
                let stored = tokio::task::spawn_blocking(move || {
                    store.append(job, attempt, rank, record.offset, &record.data)
                })
                .await;
                match stored {
                    Ok(Ok(now)) if now > held => {
                        budget = budget.saturating_sub(len);
                        held = now;
                        continue 'rank;
                    }
                    _ => {}
                }
            }
            // No member could give the next bytes.
            break;
        }
        if held < committed {
            tracing::warn!(%job, attempt, rank, held, committed, "could not fill in a rank's log from the other coordinators");
            incomplete.push(rank);
        }
    }
    incomplete
}

/// How often a background pass that could not fill everything in is tried again, and how often.
pub const REPAIR_RETRY: Duration = Duration::from_secs(5);
pub const REPAIR_PASSES_MAX: usize = 60;

/// After every snapshot this coordinator installs, fills in the logs of every job it lacks (in
/// passes, again every [`REPAIR_RETRY`] while another member may still have what is missing).
pub async fn after_snapshot_installs(
    c: Arc<Coordinator>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut installs = c.state.subscribe_installs();
    loop {
        tokio::select! {
            changed = installs.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        for pass in 1..=REPAIR_PASSES_MAX {
            let logs: Vec<(JobId, u32, Vec<u32>)> = c.state.read(|s| {
                s.jobs
                    .values()
                    .flat_map(|j| {
                        j.log_bytes.iter().map(|(attempt, ranks)| {
                            (j.id, *attempt, ranks.keys().copied().collect())
                        })
                    })
                    .collect()
            });
            let mut incomplete = 0;
            for (job, attempt, ranks) in logs {
                if *shutdown.borrow() {
                    return;
                }
                incomplete += fill_in(&c, job, attempt, &ranks).await.len();
            }
            if incomplete == 0 {
                tracing::info!(pass, "rank logs complete after installing a snapshot");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(REPAIR_RETRY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
