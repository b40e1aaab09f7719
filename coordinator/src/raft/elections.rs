//! When this coordinator may campaign, beyond openraft's own timers.
//!
//! - **Holds.** Elections are held (openraft's `runtime_config().elect(false)`) while leadership
//!   is handed over (`membership`) and for a moment after a restart. Holds from several causes
//!   extend each other: one ending never cuts a later one short (the rule is [`Hold::extend`]).
//! - **A restarted member waits to hear from the leader.** A coordinator that comes back with an
//!   older log campaigns before the leader's heartbeats reach it again, is refused for its short
//!   log, and disturbs the cluster; worse, openraft 0.9 then remembers it "saw a greater log" and
//!   adds `2 x election_timeout_max` to its next election, which made the next failover that
//!   needed this member take 0.9 to 1.2 s instead of 0.6 s (`benches/README.md`,
//!   `leader_failover`). So a restarted member of a multi-voter group holds its elections until it
//!   hears from a leader, or [`RESTART_HOLD`] passes (the whole group restarted).
//! - **Leader contact.** Each append a leader sends is noted, so a voter that refuses a candidate
//!   for its shorter log can tell whether the leader is really gone (silent for a lease) and
//!   campaign at once (`server::campaign_after_refusing`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Raft;

/// How long a restarted member of a multi-voter group holds its elections at most, waiting to
/// hear from a leader.
pub const RESTART_HOLD: Duration = Duration::from_secs(2);
/// How often a restarted member checks whether a leader's append arrived.
const RESTART_POLL: Duration = Duration::from_millis(20);

/// Until when elections are held; `None`: not held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hold(pub Option<Instant>);

impl Hold {
    /// The hold after asking for one until `until`: the later of the two.
    pub fn extend(self, until: Instant) -> Hold {
        Hold(Some(self.0.map_or(until, |current| current.max(until))))
    }

    /// The hold after the one asked for until `until` ends (at or after `until`): over, unless a
    /// later hold extended it.
    pub fn end(self, until: Instant) -> Hold {
        match self.0 {
            Some(current) if current > until => self,
            _ => Hold(None),
        }
    }
}

/// This coordinator's election holds and its last contact with a leader.
pub struct Elections {
    raft: Raft,
    hold: Mutex<Hold>,
    leader_contact: Mutex<Option<Instant>>,
}

impl Elections {
    pub fn new(raft: Raft) -> Arc<Elections> {
        Arc::new(Elections {
            raft,
            hold: Mutex::new(Hold::default()),
            leader_contact: Mutex::new(None),
        })
    }

    fn hold(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.hold.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds elections for `duration` from now (or longer, if a later hold is in place).
    pub fn hold_for(self: &Arc<Self>, duration: Duration) {
        let until = Instant::now() + duration;
        {
            let mut hold = self.hold();
            *hold = hold.extend(until);
        }
        self.raft.runtime_config().elect(false);
        let elections = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
            elections.end_hold(until);
        });
    }

    /// Ends the hold asked for until `until`, unless a later one extended it.
    fn end_hold(&self, until: Instant) {
        let mut hold = self.hold();
        *hold = hold.end(until);
        if hold.0.is_none() {
            self.raft.runtime_config().elect(true);
        }
    }

    /// After a restart: holds elections until a leader's append arrives, or [`RESTART_HOLD`].
    /// (Not the leader openraft reports: right after a restart that is the one of the stored
    /// vote, which may be long gone.)
    pub fn hold_until_a_leader_is_heard(self: &Arc<Self>) {
        let until = Instant::now() + RESTART_HOLD;
        self.hold_for(RESTART_HOLD);
        let elections = self.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                if elections.leader_heard_within(RESTART_HOLD) {
                    tracing::info!(
                        "heard from the leader after the restart; elections allowed again"
                    );
                    elections.end_hold(until);
                    return;
                }
                tokio::time::sleep(RESTART_POLL).await;
            }
        });
    }

    /// Notes that a leader's append was just answered.
    pub fn heard_from_leader(&self) {
        *self
            .leader_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether a leader's append arrived within `window`.
    pub fn leader_heard_within(&self, window: Duration) -> bool {
        self.leader_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_extend_each_other_and_end_only_when_the_latest_does() {
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        // (hold before, asked until, hold after extending)
        let extend = [
            (Hold(None), s(3), Hold(Some(s(3)))),
            (Hold(Some(s(5))), s(3), Hold(Some(s(5)))),
            (Hold(Some(s(2))), s(3), Hold(Some(s(3)))),
        ];
        for (before, until, after) in extend {
            assert_eq!(
                before.extend(until),
                after,
                "{before:?} extended to {until:?}"
            );
        }
        // (hold before, the hold that ends, hold after)
        let end = [
            (Hold(Some(s(3))), s(3), Hold(None)),
            (Hold(Some(s(5))), s(3), Hold(Some(s(5)))), // a later hold stays
            (Hold(None), s(3), Hold(None)),
            (Hold(Some(s(2))), s(3), Hold(None)),
        ];
        for (before, until, after) in end {
            assert_eq!(before.end(until), after, "{before:?} ending {until:?}");
        }
        // A transfer's hold (5 s) outlives a restart hold (2 s) that ends in between.
        let hold = Hold(None).extend(s(2)).extend(s(5)).end(s(2));
        assert_eq!(hold, Hold(Some(s(5))));
        assert_eq!(hold.end(s(5)), Hold(None));
    }
}
