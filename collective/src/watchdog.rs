//! The watchdog of a GPU or RDMA collective: a dead or stuck peer must never hang the gang.
//!
//! A rank blocked in NCCL (or polling an RDMA completion queue) learns nothing when a peer dies:
//! NCCL may wait forever. So each rank keeps, beside its data path, the TCP ring that the
//! ordinary rendezvous built (the *control ring*, which also carried the NCCL unique id), and two
//! threads:
//!
//! - the **heartbeat** thread all-reduces two counters around the control ring every
//!   [`HEARTBEAT_INTERVAL_MS`]: how many ranks are finishing, how many have failed. A peer that
//!   exits or crashes closes its connections, so its neighbours' round fails at once and, as the
//!   ring shuts its own connections on a failure, so does everybody's; a peer that is frozen
//!   stops answering and the round fails after [`WatchdogLimits::heartbeat_timeout`]. When every
//!   rank is finishing, the rounds stop on all ranks in the same round, so an orderly end is never
//!   mistaken for a death.
//! - the **poller** thread, every [`POLL_INTERVAL_MS`], gathers an [`Observation`] (how long the
//!   current operation has run, NCCL's asynchronous error, what the heartbeat said) and asks the
//!   pure [`decide`] whether to abort. On an abort it records the reason, aborts the watched
//!   communicator (`ncclCommAbort`, which makes the blocked operation return) and raises this
//!   rank's failed flag, so the next heartbeat round tells the others, who abort too.
//!
//! Before the communicator exists (inside a blocking `ncclCommInitRank`) there is nothing to abort;
//! the caller then chooses what an abort means (the NCCL backend ends the process, the only way
//! out of a blocked init; the agent restarts the gang).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::Secs;
use crate::{Collective, CollectiveError, TcpRing};

/// Pause between two heartbeat rounds.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
/// How often the poller looks at the operation clock, NCCL's asynchronous error and the
/// heartbeat.
pub const POLL_INTERVAL_MS: u64 = 10;

/// The watchdog's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogLimits {
    /// Longest one operation may take from its start to its completion; `None`: no limit (a dead
    /// peer is still caught by the heartbeat).
    pub op_timeout: Option<Duration>,
    /// Longest one heartbeat round may take before the peers count as stuck.
    pub heartbeat_timeout: Duration,
}

/// What the last heartbeat round said about the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Every rank answered; not all are finishing.
    Alive,
    /// Every rank is finishing: the heartbeat has stopped everywhere, in the same round.
    AllFinished,
    /// This many other ranks raised their failed flag.
    Failed {
        /// How many.
        count: u32,
    },
    /// A heartbeat round failed: a peer exited, crashed, or stopped answering.
    Lost {
        /// The control ring's error.
        detail: String,
    },
}

/// What the poller sees at one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// How long the current operation has run; `None` between operations.
    pub op_running_for: Option<Duration>,
    /// The watched communicator's asynchronous error (`ncclCommGetAsyncError`), if any.
    pub async_error: Option<String>,
    /// The heartbeat's last word.
    pub peers: Peers,
}

/// What to do about an [`Observation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is wrong.
    Continue,
    /// Abort the communicator, for this reason.
    Abort(String),
}

/// The watchdog's decision, pure: abort on NCCL's asynchronous error, on another rank's failure,
/// on a lost peer, or on an operation past its timeout (in that order of precedence, which is
/// the order of how much each reason says about the cause); otherwise continue.
pub fn decide(obs: &Observation, limits: &WatchdogLimits) -> Verdict {
    if let Some(e) = &obs.async_error {
        return Verdict::Abort(format!("NCCL reported an asynchronous error: {e}"));
    }
    match &obs.peers {
        Peers::Failed { count } => {
            return Verdict::Abort(format!(
                "{count} other rank(s) failed (their watchdog or their operation reported an error)"
            ))
        }
        Peers::Lost { detail } => {
            return Verdict::Abort(format!(
                "a peer is gone or stuck: the heartbeat failed ({detail})"
            ))
        }
        Peers::Alive | Peers::AllFinished => {}
    }
    match (obs.op_running_for, limits.op_timeout) {
        (Some(ran), Some(limit)) if ran > limit => Verdict::Abort(format!(
            "an operation has run for {}, past the operation timeout of {}",
            Secs(Duration::from_millis(ran.as_millis() as u64)),
            Secs(limit)
        )),
        _ => Verdict::Continue,
    }
}

/// Reads one heartbeat round's sums (`[finishing ranks, failed ranks]` over a world of `world`),
/// not counting this rank's own failed flag.
pub fn heartbeat_round(sums: [i64; 2], world: u32, self_failed: bool) -> Peers {
    let others_failed = sums[1] - i64::from(self_failed);
    if others_failed > 0 {
        Peers::Failed {
            count: u32::try_from(others_failed).unwrap_or(u32::MAX),
        }
    } else if sums[0] >= i64::from(world) {
        Peers::AllFinished
    } else {
        Peers::Alive
    }
}

/// What the watchdog aborts: an NCCL communicator, or an RDMA ring's queue pairs.
pub(crate) trait Watched: Send + Sync {
    /// An error the library met in the background, if any.
    fn async_error(&self) -> Option<String>;
    /// Stops every pending and later operation; called at most once.
    fn abort(&self);
}

/// What an abort does while nothing is watched yet (during a blocking init).
pub(crate) type AbortWithoutTarget = fn(&str);

struct Shared {
    limits: WatchdogLimits,
    world: u32,
    finishing: AtomicBool,
    failed: AtomicBool,
    stop: AtomicBool,
    peers: Mutex<Peers>,
    op_started: Mutex<Option<Instant>>,
    abort_reason: Mutex<Option<String>>,
    target: OnceLock<Arc<dyn Watched>>,
    without_target: AbortWithoutTarget,
}

impl Shared {
    fn abort(&self, reason: &str) {
        {
            let mut slot = self
                .abort_reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if slot.is_some() {
                return;
            }
            *slot = Some(reason.to_owned());
        }
        self.failed.store(true, Ordering::SeqCst);
        match self.target.get() {
            Some(target) => target.abort(),
            None => (self.without_target)(reason),
        }
    }
}

/// A running watchdog (module docs). Dropping it without [`Watchdog::finish`] stops its
/// threads after their current round; the peers then see this rank as lost.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    heartbeat: Option<JoinHandle<()>>,
    poller: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the heartbeat over `control` and the poller.
    pub(crate) fn start(
        mut control: TcpRing,
        limits: WatchdogLimits,
        without_target: AbortWithoutTarget,
    ) -> Result<Watchdog, CollectiveError> {
        control.set_op_timeout(Some(limits.heartbeat_timeout))?;
        let shared = Arc::new(Shared {
            limits,
            world: control.world_size(),
            finishing: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            peers: Mutex::new(Peers::Alive),
            op_started: Mutex::new(None),
            abort_reason: Mutex::new(None),
            target: OnceLock::new(),
            without_target,
        });
        let rank = control.rank();
        let spawn_err = |e| CollectiveError::Io {
            context: "start the collective's watchdog thread",
            source: e,
        };
        let hb_shared = Arc::clone(&shared);
        let heartbeat = thread::Builder::new()
            .name(format!("collective-heartbeat-r{rank}"))
            .spawn(move || heartbeat_loop(control, &hb_shared))
            .map_err(spawn_err)?;
        let poll_shared = Arc::clone(&shared);
        let poller = thread::Builder::new()
            .name(format!("collective-watchdog-r{rank}"))
            .spawn(move || poll_loop(&poll_shared))
            .map_err(spawn_err)?;
        Ok(Watchdog {
            shared,
            heartbeat: Some(heartbeat),
            poller: Some(poller),
        })
    }

    /// From now on, an abort aborts `target`. If an abort was decided before (while nothing was
    /// watched), `target` is aborted at once.
    pub(crate) fn watch(&self, target: Arc<dyn Watched>) {
        let target = Arc::clone(self.shared.target.get_or_init(|| target));
        if self.aborted().is_some() {
            target.abort();
        }
    }

    /// Starts the operation clock.
    pub(crate) fn op_started(&self) {
        *self.lock_op() = Some(Instant::now());
    }

    /// Stops the operation clock.
    pub(crate) fn op_finished(&self) {
        *self.lock_op() = None;
    }

    fn lock_op(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.shared
            .op_started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The reason of the abort, once one happened.
    pub(crate) fn aborted(&self) -> Option<String> {
        self.shared
            .abort_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A closure that aborts through this watchdog, for an [`crate::AbortHandle`].
    pub(crate) fn abort_fn(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move |reason| shared.abort(reason)
    }

    /// This rank failed (an operation returned an error): the next heartbeat tells the others.
    pub(crate) fn fail(&self) {
        self.shared.failed.store(true, Ordering::SeqCst);
    }

    /// This rank is done: waits up to `wait` for every rank to be done too, then stops both
    /// threads. True when every rank finished in order; false when a peer was lost or failed,
    /// or `wait` passed first.
    pub(crate) fn finish(mut self, wait: Duration) -> bool {
        self.shared.finishing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && self.heartbeat.as_ref().is_some_and(|h| !h.is_finished())
        {
            thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
        let all = *self
            .shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == Peers::AllFinished;
        self.stop();
        all
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        // The heartbeat thread ends after its current round (at most the heartbeat timeout); it
        // is not waited for, so that dropping a collective never blocks.
        self.heartbeat.take();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn heartbeat_loop(mut control: TcpRing, shared: &Shared) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let failed = shared.failed.load(Ordering::SeqCst);
        let mut sums = [
            i64::from(shared.finishing.load(Ordering::SeqCst)),
            i64::from(failed),
        ];
        let peers = match control.all_reduce_sum_i64(&mut sums) {
            Ok(()) => heartbeat_round(sums, shared.world, failed),
            Err(e) => Peers::Lost {
                detail: e.to_string(),
            },
        };
        let end = !matches!(peers, Peers::Alive);
        *shared.peers.lock().unwrap_or_else(PoisonError::into_inner) = peers;
        if end {
            return;
        }
        thread::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
    }
}

fn poll_loop(shared: &Shared) {
    loop {
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let peers = shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let obs = Observation {
            op_running_for: shared
                .op_started
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(|t| t.elapsed()),
            async_error: shared.target.get().and_then(|t| t.async_error()),
            peers,
        };
        match decide(&obs, &shared.limits) {
            Verdict::Continue if obs.peers == Peers::AllFinished => return,
            Verdict::Continue => {}
            Verdict::Abort(reason) => {
                shared.abort(&reason);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WatchdogLimits = WatchdogLimits {
        op_timeout: Some(Duration::from_secs(10)),
        heartbeat_timeout: Duration::from_secs(30),
    };

    fn obs(op_ms: Option<u64>, async_error: Option<&str>, peers: Peers) -> Observation {
        Observation {
            op_running_for: op_ms.map(Duration::from_millis),
            async_error: async_error.map(str::to_owned),
            peers,
        }
    }

    #[test]
    fn decide_aborts_for_each_reason_in_order_of_precedence() {
        let lost = || Peers::Lost {
            detail: "lost the connection to rank 1".to_owned(),
        };
        let cases: Vec<(&str, Observation, WatchdogLimits, Option<&str>)> = vec![
            (
                "idle and healthy",
                obs(None, None, Peers::Alive),
                LIMITS,
                None,
            ),
            (
                "short operation",
                obs(Some(9_999), None, Peers::Alive),
                LIMITS,
                None,
            ),
            (
                "operation past its timeout",
                obs(Some(10_001), None, Peers::Alive),
                LIMITS,
                Some("an operation has run for 10001ms, past the operation timeout of 10s"),
            ),
            (
                "no operation timeout set",
                obs(Some(3_600_000), None, Peers::Alive),
                WatchdogLimits {
                    op_timeout: None,
                    ..LIMITS
                },
                None,
            ),
            (
                "NCCL's asynchronous error",
                obs(None, Some("ncclRemoteError"), Peers::Alive),
                LIMITS,
                Some("NCCL reported an asynchronous error: ncclRemoteError"),
            ),
            (
                "another rank failed",
                obs(None, None, Peers::Failed { count: 2 }),
                LIMITS,
                Some("2 other rank(s) failed"),
            ),
            (
                "a peer is lost",
                obs(None, None, lost()),
                LIMITS,
                Some(
                    "a peer is gone or stuck: the heartbeat failed (lost the connection to rank 1)",
                ),
            ),
            (
                "the asynchronous error wins over a lost peer and a timeout",
                obs(Some(60_000), Some("ncclSystemError"), lost()),
                LIMITS,
                Some("NCCL reported an asynchronous error: ncclSystemError"),
            ),
            (
                "a lost peer wins over a timeout",
                obs(Some(60_000), None, lost()),
                LIMITS,
                Some("a peer is gone or stuck"),
            ),
            (
                "every rank finished",
                obs(None, None, Peers::AllFinished),
                LIMITS,
                None,
            ),
        ];
        for (name, o, limits, want) in cases {
            match (decide(&o, &limits), want) {
                (Verdict::Continue, None) => {}
                (Verdict::Abort(reason), Some(prefix)) => {
                    assert!(reason.starts_with(prefix), "{name}: {reason}")
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn heartbeat_rounds_read_the_counters() {
        let cases = [
            ([0, 0], 4, false, Peers::Alive),
            ([3, 0], 4, false, Peers::Alive),
            ([4, 0], 4, false, Peers::AllFinished),
            ([1, 0], 1, false, Peers::AllFinished),
            ([0, 1], 4, true, Peers::Alive),
            ([0, 1], 4, false, Peers::Failed { count: 1 }),
            ([4, 3], 4, true, Peers::Failed { count: 2 }),
        ];
        for (sums, world, self_failed, want) in cases {
            assert_eq!(
                heartbeat_round(sums, world, self_failed),
                want,
                "{sums:?} of {world}, self failed {self_failed}"
            );
        }
    }

    mod shell {
        use std::sync::atomic::AtomicUsize;

        use super::super::*;
        use crate::testing::{run_ranks, Path};

        /// A watched thing that counts its aborts and may report an asynchronous error.
        #[derive(Default)]
        struct Fake {
            aborts: AtomicUsize,
            async_error: Mutex<Option<String>>,
        }

        impl Watched for Fake {
            fn async_error(&self) -> Option<String> {
                self.async_error.lock().unwrap().clone()
            }
            fn abort(&self) {
                self.aborts.fetch_add(1, Ordering::SeqCst);
            }
        }

        fn no_target(reason: &str) {
            panic!("aborted before anything was watched: {reason}");
        }

        const FAST: WatchdogLimits = WatchdogLimits {
            op_timeout: Some(Duration::from_secs(30)),
            heartbeat_timeout: Duration::from_secs(5),
        };

        /// Waits up to 20 s for `cond`.
        fn eventually(cond: impl Fn() -> bool) -> bool {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if cond() {
                    return true;
                }
                thread::sleep(Duration::from_millis(10));
            }
            false
        }

        #[test]
        fn every_rank_finishing_ends_the_heartbeat_without_an_abort() {
            for path in [Path::RankZero, Path::Store] {
                let results = run_ranks(3, path, |ring| {
                    let rank = ring.rank();
                    let fake = Arc::new(Fake::default());
                    let w = Watchdog::start(ring, FAST, no_target).unwrap();
                    w.watch(fake.clone());
                    // Ranks finish at different times; the heartbeat waits for the last.
                    thread::sleep(Duration::from_millis(50 * u64::from(rank)));
                    let all = w.finish(Duration::from_secs(20));
                    (all, fake.aborts.load(Ordering::SeqCst))
                });
                assert_eq!(results, vec![(true, 0); 3], "{path:?}");
            }
        }

        #[test]
        fn a_peer_that_dies_makes_every_other_rank_abort() {
            let results = run_ranks(3, Path::Store, |ring| {
                let rank = ring.rank();
                let fake = Arc::new(Fake::default());
                let w = Watchdog::start(ring, FAST, no_target).unwrap();
                w.watch(fake.clone());
                // Rank 2 stops its heartbeat and closes its connections, as a crash would.
                if rank == 2 {
                    drop(w);
                    return (rank, true, String::new());
                }
                w.op_started(); // blocked in a collective that will never complete
                let aborted = eventually(|| fake.aborts.load(Ordering::SeqCst) == 1);
                (rank, aborted, w.aborted().unwrap_or_default())
            });
            for (rank, aborted, reason) in &results[..2] {
                assert!(aborted, "rank {rank} did not abort");
                assert!(
                    reason.contains("a peer is gone or stuck"),
                    "rank {rank}: {reason}"
                );
            }
        }

        #[test]
        fn a_rank_that_fails_tells_the_others_who_abort() {
            let results = run_ranks(3, Path::RankZero, |ring| {
                let rank = ring.rank();
                let fake = Arc::new(Fake::default());
                let w = Watchdog::start(ring, FAST, no_target).unwrap();
                w.watch(fake.clone());
                if rank == 1 {
                    *fake.async_error.lock().unwrap() = Some("ncclRemoteError".to_owned());
                }
                let aborted = eventually(|| fake.aborts.load(Ordering::SeqCst) == 1);
                let reason = w.aborted().unwrap_or_default();
                // Keep answering heartbeats until everybody has decided.
                thread::sleep(Duration::from_millis(500));
                (aborted, reason)
            });
            assert!(
                results[1]
                    .1
                    .starts_with("NCCL reported an asynchronous error"),
                "{:?}",
                results[1]
            );
            for rank in [0, 2] {
                let (aborted, reason) = &results[rank];
                assert!(aborted, "rank {rank}");
                assert!(
                    reason.starts_with("1 other rank(s) failed")
                        || reason.contains("gone or stuck"),
                    "rank {rank}: {reason}"
                );
            }
        }

        #[test]
        fn an_operation_past_its_timeout_is_aborted() {
            let limits = WatchdogLimits {
                op_timeout: Some(Duration::from_millis(100)),
                ..FAST
            };
            let results = run_ranks(1, Path::RankZero, move |ring| {
                let fake = Arc::new(Fake::default());
                let w = Watchdog::start(ring, limits, no_target).unwrap();
                w.watch(fake.clone());
                w.op_started();
                let aborted = eventually(|| fake.aborts.load(Ordering::SeqCst) == 1);
                (aborted, w.aborted().unwrap_or_default())
            });
            let (aborted, reason) = &results[0];
            assert!(aborted);
            assert!(
                reason.contains("past the operation timeout of 100ms"),
                "{reason}"
            );
        }

        static EXITS: AtomicUsize = AtomicUsize::new(0);

        fn count_exit(_reason: &str) {
            EXITS.fetch_add(1, Ordering::SeqCst);
        }

        #[test]
        fn an_abort_before_the_target_exists_takes_the_init_path_then_aborts_the_target() {
            let results = run_ranks(1, Path::RankZero, |ring| {
                let w = Watchdog::start(ring, FAST, count_exit).unwrap();
                w.abort_fn()("rank 3 is gone");
                let fake = Arc::new(Fake::default());
                w.watch(fake.clone());
                (
                    EXITS.load(Ordering::SeqCst),
                    fake.aborts.load(Ordering::SeqCst),
                    w.aborted(),
                )
            });
            assert_eq!(results[0], (1, 1, Some("rank 3 is gone".to_owned())));
        }
    }
}
