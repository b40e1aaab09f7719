//! The leader's supervision of running gangs, as pure decisions: is a gang hung, should an elastic
//! gang grow. The loop in `server.rs` gathers the observations (leader-local progress clocks, the
//! state) and writes the commands these functions return.

use std::time::Duration;

use trainctl_jobs::Resources;

use crate::scheduler::{self, ClusterSnapshot};
use crate::state::{AttemptEnd, Command, Job, JobState, State};

/// Longest an elastic job that could grow waits for its next checkpoint commit before it restarts at
/// the larger size anyway (capped by its own `[checkpoint] grace`).
pub const GROW_WAIT_MAX_MS: u64 = 60_000;

/// Whether a rank failure may be applied now. A lost host makes its peers fail within milliseconds
/// (their connections break), long before the host is declared lost; applied at once, that failure
/// would spend a restart and restart the gang in place on the dead host. So a failure first seen
/// `seen_for` ago waits until every other host of the gang has shown it is alive since
/// (`peers_alive`): then the failure is the job's own. If a peer stays silent it is declared lost
/// within the node timeout, the gang is placed again for free, and the failure no longer applies;
/// past `node_timeout` plus a margin the failure applies regardless, so none waits forever.
pub fn failure_may_apply(peers_alive: bool, seen_for: Duration, node_timeout: Duration) -> bool {
    peers_alive || seen_for >= node_timeout + node_timeout / 2
}

/// "10m", "1m30s", "45s", "800ms".
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = ms / 1_000;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// The command that restarts `job` when no rank of its current attempt made progress for its
/// `hang_timeout`; `silent_for` is how long since the last progress (or since the attempt started,
/// as this leader saw it), `step` the newest step reported.
pub fn hang_decision(
    job: &Job,
    silent_for: Duration,
    step: Option<u64>,
    at_ms: u64,
) -> Option<Command> {
    let timeout = Duration::from_millis(job.spec.failure.hang_timeout_ms?);
    if !matches!(job.state, JobState::Starting | JobState::Running) || silent_for < timeout {
        return None;
    }
    let since = match step {
        Some(step) => format!("since step {step}"),
        None => format!("since attempt {} started", job.attempt),
    };
    Some(Command::RestartJob {
        job: job.id,
        attempt: job.attempt,
        reason: format!("hung: no progress for {} {since}", human_duration(timeout)),
        end: AttemptEnd::Hung,
        at_ms,
    })
}

/// What an elastic job below its maximum size should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grow {
    /// Nothing: not elastic, at its maximum, other jobs wait, no room, or no checkpoints to resume from.
    No,
    /// Room for `extra_nodes` more hosts; waiting for the next checkpoint commit.
    Wait { extra_nodes: u32 },
    /// Restart now at the larger size.
    Now(Box<Command>),
}

/// How many more hosts of this job's shape fit on the nodes it does not use.
fn extra_hosts_that_fit(snapshot: &ClusterSnapshot, job: &Job, want: u32) -> u32 {
    let used: Vec<_> = job
        .allocation
        .iter()
        .flat_map(|a| a.nodes.iter().map(|na| na.node.clone()))
        .collect();
    let others = ClusterSnapshot {
        nodes: snapshot
            .nodes
            .iter()
            .filter(|n| !used.contains(&n.node))
            .cloned()
            .collect(),
    };
    (1..=want)
        .rev()
        .find(|&k| {
            let res = Resources {
                nodes: k,
                min_nodes: k,
                ..job.spec.resources.clone()
            };
            scheduler::plan(&others, &res).is_ok()
        })
        .unwrap_or(0)
}

/// Whether a running elastic job should grow. `waiting_since_ms` is when the leader first saw room
/// (None: it had not), `now_ms` the wall clock. Growing never jumps the queue (only with no job
/// pending), only happens to jobs that checkpoint (a restart without one would lose all work), and
/// waits for the next commit, at most `[checkpoint] grace` (capped at [`GROW_WAIT_MAX_MS`]).
pub fn grow_decision(
    state: &State,
    snapshot: &ClusterSnapshot,
    job: &Job,
    waiting_since_ms: Option<u64>,
    now_ms: u64,
) -> Grow {
    let (_, max) = job.spec.resources.node_range();
    let Some(allocation) = &job.allocation else {
        return Grow::No;
    };
    let size = allocation.nodes.len() as u32;
    let Some(policy) = &job.spec.checkpoint else {
        return Grow::No;
    };
    if job.state != JobState::Running || size >= max || !state.queue.is_empty() {
        return Grow::No;
    }
    let extra = extra_hosts_that_fit(snapshot, job, max - size);
    if extra == 0 {
        return Grow::No;
    }
    let Some(since) = waiting_since_ms else {
        return Grow::Wait { extra_nodes: extra };
    };
    let committed_since = job.checkpoints.last().is_some_and(|c| c.at_ms >= since);
    let waited_enough = now_ms.saturating_sub(since) >= policy.grace_ms.min(GROW_WAIT_MAX_MS);
    if committed_since || waited_enough {
        Grow::Now(Box::new(Command::RestartJob {
            job: job.id,
            attempt: job.attempt,
            reason: format!(
                "growing from {size} to {} host{}: capacity returned{}",
                size + extra,
                if size + extra == 1 { "" } else { "s" },
                if committed_since {
                    " and a checkpoint was committed"
                } else {
                    ""
                }
            ),
            end: AttemptEnd::Resize,
            at_ms: now_ms,
        }))
    } else {
        Grow::Wait { extra_nodes: extra }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_waits_for_silent_peers_but_never_past_the_node_timeout() {
        let timeout = Duration::from_millis(2_000);
        let ms = Duration::from_millis;
        // (peers alive since, seen for, applies)
        let cases = [
            (true, ms(0), true),
            (false, ms(0), false),
            (false, ms(1_900), false),
            (false, ms(2_999), false),
            (false, ms(3_000), true),
        ];
        for (alive, seen, applies) in cases {
            assert_eq!(
                failure_may_apply(alive, seen, timeout),
                applies,
                "{alive} {seen:?}"
            );
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        for (ms, text) in [
            (800, "800ms"),
            (1_000, "1s"),
            (45_000, "45s"),
            (90_000, "1m30s"),
            (600_000, "10m"),
            (3_600_000, "1h"),
        ] {
            assert_eq!(human_duration(Duration::from_millis(ms)), text);
        }
    }
}
