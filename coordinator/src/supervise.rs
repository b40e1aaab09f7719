//! The leader's supervision, as pure decisions: which nodes are lost, is a gang hung, should an
//! elastic gang grow. The liveness loop in `server.rs` gathers the observations (leader-local
//! clocks of heartbeats and progress, held heartbeats, the state) and writes the commands these
//! functions return.

use std::time::Duration;

use trainctl_jobs::Resources;

use crate::scheduler::{self, ClusterSnapshot};
use crate::state::{AttemptEnd, Command, Job, JobState, NodeId, NodeStatus, State};

/// What the leader knows of one node's liveness at a pass.
#[derive(Debug, Clone)]
pub struct NodeSeen {
    pub node: NodeId,
    pub status: NodeStatus,
    /// Since this leader last heard from the node (a heartbeat or a registration); `None` if it
    /// never has (every node gets a fresh clock when a coordinator becomes leader, so this is rare).
    pub silent_for: Option<Duration>,
    /// It holds a heartbeat open right now (a long poll): alive, however long ago the beat began.
    pub holding_beat: bool,
}

/// The leader's verdict on the nodes at one liveness pass.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeVerdict {
    /// The pass itself came at least half a node timeout after the one before (an overloaded
    /// coordinator, a long fsync, a suspended process): the silence is the leader's, not the
    /// agents'. Every node gets a fresh clock and none is declared lost.
    PassRanLate,
    /// These nodes are up, hold no heartbeat and were silent for the node timeout or longer: each
    /// is lost ([`node_lost`]). Empty when all is well.
    Lost(Vec<(NodeId, Duration)>),
}

/// Which nodes are lost, given how long since the previous pass (`since_last_pass`) and what was
/// seen of each node. A node already down, or holding a heartbeat, is never lost here.
pub fn node_verdict(
    since_last_pass: Duration,
    node_timeout: Duration,
    nodes: impl IntoIterator<Item = NodeSeen>,
) -> NodeVerdict {
    if since_last_pass >= node_timeout / 2 {
        return NodeVerdict::PassRanLate;
    }
    NodeVerdict::Lost(
        nodes
            .into_iter()
            .filter(|n| n.status == NodeStatus::Up && !n.holding_beat)
            .filter_map(|n| {
                let silent_for = n.silent_for.unwrap_or(node_timeout);
                (silent_for >= node_timeout).then_some((n.node, silent_for))
            })
            .collect(),
    )
}

/// The command that declares `node` lost after `silent_for` without a heartbeat.
pub fn node_lost(node: NodeId, silent_for: Duration, at_ms: u64) -> Command {
    Command::NodeLost {
        node,
        reason: format!("no heartbeat for {:.1}s", silent_for.as_secs_f64()),
        at_ms,
    }
}

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
    fn nodes_are_lost_only_when_up_silent_past_the_timeout_and_not_holding_a_beat() {
        let timeout = Duration::from_millis(2_000);
        let ms = Duration::from_millis;
        let seen = |status, silent_for: Option<u64>, holding_beat| NodeSeen {
            node: NodeId("n".into()),
            status,
            silent_for: silent_for.map(ms),
            holding_beat,
        };
        // (status, silent for ms, holding a beat, lost after ms)
        let cases = [
            (NodeStatus::Up, Some(0), false, None),
            (NodeStatus::Up, Some(1_999), false, None),
            (NodeStatus::Up, Some(2_000), false, Some(2_000)),
            (NodeStatus::Up, Some(9_000), false, Some(9_000)),
            (NodeStatus::Up, Some(9_000), true, None), // a long poll in progress
            (NodeStatus::Up, None, false, Some(2_000)), // never heard by this leader
            (NodeStatus::Down, Some(9_000), false, None), // already lost
        ];
        for (status, silent, holding, lost) in cases {
            let verdict = node_verdict(ms(250), timeout, [seen(status, silent, holding)]);
            let want = NodeVerdict::Lost(
                lost.map(|t| (NodeId("n".into()), ms(t)))
                    .into_iter()
                    .collect(),
            );
            assert_eq!(
                verdict, want,
                "{status:?} silent {silent:?} holding {holding}"
            );
        }
    }

    #[test]
    fn a_late_pass_declares_nobody_lost() {
        let timeout = Duration::from_millis(2_000);
        let silent = NodeSeen {
            node: NodeId("n".into()),
            status: NodeStatus::Up,
            silent_for: Some(Duration::from_secs(60)),
            holding_beat: false,
        };
        for (since_last_pass, late) in [(250, false), (999, false), (1_000, true), (30_000, true)] {
            let verdict = node_verdict(
                Duration::from_millis(since_last_pass),
                timeout,
                [silent.clone()],
            );
            assert_eq!(
                verdict == NodeVerdict::PassRanLate,
                late,
                "{since_last_pass} ms"
            );
        }
        let Command::NodeLost { reason, .. } =
            node_lost(NodeId("n".into()), Duration::from_millis(2_345), 7)
        else {
            panic!("not a NodeLost");
        };
        assert_eq!(reason, "no heartbeat for 2.3s");
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
