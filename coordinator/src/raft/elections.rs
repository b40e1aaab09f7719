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
//!   campaign at once ([`campaign_after_refusing`]), past the candidate's term
//!   ([`elections_to_outbid`]).
//!
//! Appends and vote requests from other members go through [`Elections::receive_append`] and
//! [`Elections::receive_vote`], which apply these rules around openraft's handlers: the HTTP
//! routes (`server.rs`) and the simulated network of `tests/simulated_cluster.rs` both call them.
//! Time is tokio's clock (the same as the system's, except in tests that pause it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use tokio::time::Instant;

use super::{Raft, ServerId, TypeConfig};

/// How long a restarted member of a multi-voter group holds its elections at most, waiting to
/// hear from a leader.
pub const RESTART_HOLD: Duration = Duration::from_secs(2);

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
    /// The end of the restart's hold, until a leader's first append ends it early.
    restart_hold: Mutex<Option<Instant>>,
}

impl Elections {
    fn new(raft: Raft) -> Arc<Elections> {
        Arc::new(Elections {
            raft,
            hold: Mutex::new(Hold::default()),
            leader_contact: Mutex::new(None),
            restart_hold: Mutex::new(None),
        })
    }

    /// The elections of a coordinator that just started: a member of a multi-voter group coming
    /// back listens before it campaigns ([`Elections::hold_until_a_leader_is_heard`]).
    pub fn start(raft: Raft) -> Arc<Elections> {
        let voters = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        let elections = Elections::new(raft);
        if voters > 1 {
            elections.hold_until_a_leader_is_heard();
        }
        elections
    }

    /// Hands an append from another member to openraft; one it accepts (or answers with a
    /// conflict) came from the leader, which ends a restart's hold.
    pub async fn receive_append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<ServerId>, RaftError<ServerId>> {
        let answer = self.raft.append_entries(rpc).await;
        if matches!(
            answer,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            self.heard_from_leader();
        }
        answer
    }

    /// Hands a vote request to openraft. A voter that refused a candidate whose log is behind
    /// its own, while no leader is alive, then campaigns at once, past the candidate's term.
    pub async fn receive_vote(
        &self,
        rpc: VoteRequest<ServerId>,
    ) -> Result<VoteResponse<ServerId>, RaftError<ServerId>> {
        let candidate_log = rpc.last_log_id;
        let candidate_term = rpc.vote.leader_id.term;
        let answer = self.raft.vote(rpc).await;
        if let Ok(answer) = &answer {
            let metrics = self.raft.metrics().borrow().clone();
            let voter = metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == metrics.id);
            // The leader counts as alive only while it keeps sending appends.
            let leader_alive = metrics.current_leader.is_some()
                && self.leader_heard_within(Duration::from_millis(
                    self.raft.config().election_timeout_max,
                ));
            if campaign_after_refusing(
                answer.vote_granted,
                answer.last_log_id,
                candidate_log,
                leader_alive,
                voter,
            ) {
                // Each election takes the next term; the refused candidate holds its own term's
                // vote, so campaign past it or the two split the vote.
                let rounds = elections_to_outbid(answer.vote.leader_id.term, candidate_term);
                let raft = self.raft.clone();
                tokio::spawn(async move {
                    for _ in 0..rounds {
                        if raft.trigger().elect().await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        answer
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
            tokio::time::sleep_until(until).await;
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
    fn hold_until_a_leader_is_heard(self: &Arc<Self>) {
        *self.restart_hold.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + RESTART_HOLD);
        self.hold_for(RESTART_HOLD);
    }

    /// Notes that a leader's append was just answered; the first one ends a restart's hold.
    fn heard_from_leader(&self) {
        *self
            .leader_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let restart_hold = self
            .restart_hold
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(until) = restart_hold {
            tracing::info!("heard from the leader after the restart; elections allowed again");
            self.end_hold(until);
        }
    }

    /// Whether a leader's append arrived within `window`.
    fn leader_heard_within(&self, window: Duration) -> bool {
        self.leader_contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// Whether a voter that just refused a candidate should campaign at once: the candidate's log
/// is behind its own (so it can never win this voter's vote) and no leader is alive (none known,
/// or the known one sent no append for a lease: it is gone). Without this,
/// openraft waits a full election timeout more, and a failover takes twice as long whenever
/// the first candidate is the one with the shorter log. Pure.
pub fn campaign_after_refusing(
    granted: bool,
    own_log: Option<openraft::LogId<ServerId>>,
    candidate_log: Option<openraft::LogId<ServerId>>,
    leader_alive: bool,
    voter: bool,
) -> bool {
    !granted && voter && !leader_alive && own_log > candidate_log
}

/// How many elections in a row take a voter at `own_term` past a candidate's `candidate_term`
/// (each election takes the next term; the candidate holds its own term's vote, so campaigning in
/// that term only splits the vote). At most [`OUTBID_ELECTIONS_MAX`]. Pure.
pub fn elections_to_outbid(own_term: u64, candidate_term: u64) -> u32 {
    let needed = candidate_term.saturating_sub(own_term).saturating_add(1);
    needed.min(OUTBID_ELECTIONS_MAX as u64) as u32
}

/// Most elections a refusing voter starts in a row to outbid a candidate.
pub const OUTBID_ELECTIONS_MAX: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusing_voter_campaigns_past_the_candidates_term() {
        // (own term, candidate's term, elections)
        let cases = [
            (14, 15, 2),
            (15, 15, 1),
            (16, 15, 1),
            (10, 15, 4),
            (0, u64::MAX, 4),
        ];
        for (own, candidate, rounds) in cases {
            assert_eq!(
                elections_to_outbid(own, candidate),
                rounds,
                "own {own}, candidate {candidate}"
            );
            if rounds < OUTBID_ELECTIONS_MAX {
                assert!(own + rounds as u64 > candidate, "past the candidate's term");
            }
        }
    }

    #[test]
    fn a_voter_campaigns_at_once_only_when_it_refused_a_candidate_with_a_shorter_log() {
        let log = |term: u64, index: u64| {
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(term, 1),
                index,
            ))
        };
        // (granted, own log, candidate's log, leader known, voter, campaign)
        let table = [
            (false, log(2, 10), log(2, 9), false, true, true),
            (false, log(3, 5), log(2, 9), false, true, true),
            // Granted: the candidate will lead.
            (true, log(2, 10), log(2, 9), false, true, false),
            // The candidate's log is as new or newer: refused for another reason.
            (false, log(2, 10), log(2, 10), false, true, false),
            (false, log(2, 9), log(2, 10), false, true, false),
            // A leader is still known (refused because of its lease): no election.
            (false, log(2, 10), log(2, 9), true, true, false),
            // A learner never campaigns.
            (false, log(2, 10), log(2, 9), false, false, false),
            (false, log(2, 1), None, false, true, true),
        ];
        for (granted, own, candidate, leader, voter, want) in table {
            assert_eq!(
                campaign_after_refusing(granted, own, candidate, leader, voter),
                want,
                "{granted} {own:?} {candidate:?} {leader} {voter}"
            );
        }
    }

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
