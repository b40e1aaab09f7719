//! The agent's decision: given what the coordinator wants on this host and what runs here, what to do.
//!
//! Pure (event in, actions out): the shell in `lib.rs` performs the actions. Tests assert the exact
//! action lists.

use std::collections::{BTreeMap, BTreeSet};

/// Identifies one rank process of one attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankKey {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
}

/// What the agent knows of a rank it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankCondition {
    /// The process runs.
    Running,
    /// The process ended (or never started) and its logs are still being shipped or its final
    /// state not yet acknowledged by the coordinator.
    Ended { acknowledged: bool },
}

/// A rank as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedRank {
    pub condition: RankCondition,
    /// A stop was already asked for.
    pub stopping: bool,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start this rank (index into the desired list's ranks).
    Launch(RankKey),
    /// Stop this rank's process group: SIGTERM, grace, SIGKILL.
    Stop(RankKey),
    /// Drop the record of an ended rank the coordinator knows about.
    Forget(RankKey),
}

/// Decides the actions that make this host run exactly `desired`.
///
/// A new attempt of a job starts on this host only once every rank of its earlier attempts here has
/// ended: the old ranks are stopped first (they are no longer desired), so the new gang never shares
/// GPUs, ports or files with the old one.
pub fn reconcile(
    desired: &BTreeSet<RankKey>,
    tracked: &BTreeMap<RankKey, TrackedRank>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for key in desired {
        let older_running = tracked.iter().any(|(k, r)| {
            k.job_id == key.job_id
                && k.attempt < key.attempt
                && r.condition == RankCondition::Running
        });
        if !tracked.contains_key(key) && !older_running {
            actions.push(Action::Launch(key.clone()));
        }
    }
    for (key, rank) in tracked {
        if desired.contains(key) {
            continue;
        }
        match rank.condition {
            RankCondition::Running if !rank.stopping => actions.push(Action::Stop(key.clone())),
            RankCondition::Ended { acknowledged: true } => {
                actions.push(Action::Forget(key.clone()))
            }
            _ => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: &str, rank: u32) -> RankKey {
        attempt_key(job, 0, rank)
    }

    fn attempt_key(job: &str, attempt: u32, rank: u32) -> RankKey {
        RankKey {
            job_id: job.to_string(),
            attempt,
            rank,
        }
    }

    fn tracked(entries: &[(RankKey, RankCondition, bool)]) -> BTreeMap<RankKey, TrackedRank> {
        entries
            .iter()
            .map(|(k, condition, stopping)| {
                (
                    k.clone(),
                    TrackedRank {
                        condition: condition.clone(),
                        stopping: *stopping,
                    },
                )
            })
            .collect()
    }

    /// (name, desired ranks, tracked ranks, expected actions)
    type Case = (
        &'static str,
        Vec<RankKey>,
        BTreeMap<RankKey, TrackedRank>,
        Vec<Action>,
    );

    #[test]
    fn table() {
        use RankCondition::*;
        let cases: Vec<Case> =
            vec![
            ("nothing to do", vec![], tracked(&[]), vec![]),
            (
                "new assignment launches every rank",
                vec![key("1", 0), key("1", 1)],
                tracked(&[]),
                vec![Action::Launch(key("1", 0)), Action::Launch(key("1", 1))],
            ),
            (
                "running ranks that are still wanted are left alone",
                vec![key("1", 0)],
                tracked(&[(key("1", 0), Running, false)]),
                vec![],
            ),
            (
                "an ended rank that is still wanted is not relaunched (restarts are a new attempt)",
                vec![key("1", 0)],
                tracked(&[(key("1", 0), Ended { acknowledged: true }, false)]),
                vec![],
            ),
            (
                "unwanted running rank is stopped once",
                vec![],
                tracked(&[(key("1", 0), Running, false), (key("2", 0), Running, true)]),
                vec![Action::Stop(key("1", 0))],
            ),
            (
                "ended ranks are forgotten only once the coordinator has their final state",
                vec![],
                tracked(&[
                    (key("1", 0), Ended { acknowledged: false }, false),
                    (key("1", 1), Ended { acknowledged: true }, true),
                ]),
                vec![Action::Forget(key("1", 1))],
            ),
            (
                "a new attempt waits until the old attempt's ranks here are stopped",
                vec![attempt_key("1", 1, 0), attempt_key("1", 1, 1)],
                tracked(&[
                    (attempt_key("1", 0, 0), Running, false),
                    (attempt_key("1", 0, 1), Ended { acknowledged: false }, false),
                ]),
                vec![Action::Stop(attempt_key("1", 0, 0))],
            ),
            (
                "a new attempt starts once the old ranks have ended, even before they are acknowledged",
                vec![attempt_key("1", 1, 0)],
                tracked(&[(attempt_key("1", 0, 0), Ended { acknowledged: false }, true)]),
                vec![Action::Launch(attempt_key("1", 1, 0))],
            ),
            (
                "another job's old attempt does not hold a launch back",
                vec![attempt_key("2", 0, 0)],
                tracked(&[(attempt_key("1", 0, 0), Running, true)]),
                vec![Action::Launch(attempt_key("2", 0, 0))],
            ),
        ];
        for (name, desired, tracked, expected) in cases {
            let desired: BTreeSet<RankKey> = desired.into_iter().collect();
            assert_eq!(reconcile(&desired, &tracked), expected, "{name}");
        }
    }
}
