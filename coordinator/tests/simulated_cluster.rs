//! Coordinators' Raft simulated in one process: several members, each with its real stores (the
//! redb log and state machine, snapshot files on disk) and openraft with the production
//! configuration (`server::raft_config`), joined by a network this test controls: it cuts links in
//! either direction, crashes members (their files stay, as after a `kill -9`) and restarts them
//! from disk. Tokio's clock is paused: virtual time advances only when every task waits, so an
//! election timeout costs no wall time and no assertion waits on the wall clock.
//!
//! What the real-process tests (`tests/replication.rs` at the workspace root) then confirm with
//! real processes, sockets and signals, these explore: many seeded fault schedules, each checked
//! for one leader per term, no acknowledged write lost or doubled, and every member converging to
//! the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ServerState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use trainctl_coordinator::raft::elections::Elections;
use trainctl_coordinator::raft::log_store::LogStore;
use trainctl_coordinator::raft::state_machine::StateMachineStore;
use trainctl_coordinator::raft::{Raft, ServerId, TypeConfig};
use trainctl_coordinator::state::{request_digest, Command, CommandOutcome, JobId, State};
use trainctl_jobs::JobSpec;

/// One-way delay of every message.
const LATENCY: Duration = Duration::from_millis(1);
/// How long a write may take before the client gives up on it (and retries it, same key).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A member that is up: its Raft, and the election rules around it that a coordinator's HTTP
/// routes apply to what arrives (`Elections::receive_append`, `receive_vote`).
#[derive(Clone)]
struct Member {
    raft: Raft,
    elections: Arc<Elections>,
}

/// The network: who is up, and which directed links are cut.
#[derive(Default)]
struct Wires {
    up: BTreeMap<ServerId, Member>,
    cut: BTreeSet<(ServerId, ServerId)>,
}

#[derive(Clone, Default)]
struct SimNet(Arc<Mutex<Wires>>);

impl SimNet {
    fn wires(&self) -> std::sync::MutexGuard<'_, Wires> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `to`, if it is up and `from` reaches it.
    fn reach(&self, from: ServerId, to: ServerId) -> Option<Member> {
        let wires = self.wires();
        if wires.cut.contains(&(from, to)) {
            return None;
        }
        wires.up.get(&to).cloned()
    }

    /// Delivers a request from `from` to `to` and its answer back, each after [`LATENCY`]; a cut
    /// link or a member that is down in either direction loses the message.
    async fn call<Resp, E, Fut>(
        &self,
        from: ServerId,
        to: ServerId,
        handle: impl FnOnce(Member) -> Fut,
    ) -> Result<Resp, RPCError<ServerId, BasicNode, RaftError<ServerId, E>>>
    where
        Fut: std::future::Future<Output = Result<Resp, RaftError<ServerId, E>>>,
        E: std::error::Error,
    {
        let lost = || {
            RPCError::Unreachable(Unreachable::new(&io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("simulated network: {from} -> {to} lost"),
            )))
        };
        tokio::time::sleep(LATENCY).await;
        let target = self.reach(from, to).ok_or_else(lost)?;
        let answer = handle(target).await;
        tokio::time::sleep(LATENCY).await;
        if self.reach(to, from).is_none() {
            return Err(lost());
        }
        match answer {
            Ok(resp) => Ok(resp),
            // A member shutting down answers as a dead one would: not at all.
            Err(RaftError::Fatal(_)) => Err(lost()),
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(to, e))),
        }
    }
}

/// The network as one member sees it.
struct MemberNet {
    net: SimNet,
    me: ServerId,
}

struct Link {
    net: SimNet,
    from: ServerId,
    to: ServerId,
}

impl RaftNetworkFactory<TypeConfig> for MemberNet {
    type Network = Link;

    async fn new_client(&mut self, target: ServerId, _node: &BasicNode) -> Link {
        Link {
            net: self.net.clone(),
            from: self.me,
            to: target,
        }
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<ServerId>, RPCError<ServerId, BasicNode, RaftError<ServerId>>>
    {
        self.net
            .call(self.from, self.to, |to| async move {
                to.elections.receive_append(rpc).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<ServerId>,
        RPCError<ServerId, BasicNode, RaftError<ServerId, InstallSnapshotError>>,
    > {
        self.net
            .call(self.from, self.to, |to| async move {
                to.raft.install_snapshot(rpc).await
            })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ServerId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<ServerId>, RPCError<ServerId, BasicNode, RaftError<ServerId>>> {
        self.net
            .call(self.from, self.to, |to| async move {
                to.elections.receive_vote(rpc).await
            })
            .await
    }
}

/// Members with their data directories, which outlive crashes.
struct Cluster {
    net: SimNet,
    size: u64,
    snapshot_logs: u64,
    dirs: BTreeMap<ServerId, tempfile::TempDir>,
    machines: BTreeMap<ServerId, StateMachineStore>,
    /// Every leader seen, by term: two in one term is split brain.
    leaders: BTreeMap<u64, BTreeSet<ServerId>>,
    /// Submissions sent again (same key) after a timeout or a lost leader.
    retries: u64,
}

impl Cluster {
    /// `size` voters, ids 1 to `size`, snapshotting every `snapshot_logs` entries; member 1
    /// initialises the group.
    async fn start(size: u64, snapshot_logs: u64) -> Cluster {
        let mut cluster = Cluster {
            net: SimNet::default(),
            size,
            snapshot_logs,
            dirs: BTreeMap::new(),
            machines: BTreeMap::new(),
            leaders: BTreeMap::new(),
            retries: 0,
        };
        for id in 1..=size {
            cluster
                .dirs
                .insert(id, tempfile::tempdir().expect("a data dir"));
            cluster.boot(id).await;
        }
        let members: BTreeMap<ServerId, BasicNode> = (1..=size)
            .map(|id| (id, BasicNode::new(format!("sim-{id}"))))
            .collect();
        cluster
            .raft(1)
            .initialize(members)
            .await
            .expect("initialise");
        cluster
    }

    fn raft(&self, id: ServerId) -> Raft {
        self.net.wires().up[&id].raft.clone()
    }

    /// Starts a member that is in no group yet, with an empty data dir.
    async fn add_member(&mut self, id: ServerId) {
        self.dirs
            .insert(id, tempfile::tempdir().expect("a data dir"));
        self.size = self.size.max(id);
        self.boot(id).await;
    }

    /// Starts member `id` from what its data dir holds.
    async fn boot(&mut self, id: ServerId) {
        let dir = self.dirs[&id].path().to_path_buf();
        // The crashed member's last file handles close as its tasks end.
        let db = loop {
            match redb::Database::create(dir.join("state.redb")) {
                Ok(db) => break Arc::new(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("open member {id}'s database: {e}"),
            }
        };
        let log = LogStore::open(db.clone()).expect("open the log");
        let machine = StateMachineStore::open(
            db,
            dir.join("snapshots"),
            trainctl_coordinator::logs::LogStore::new(dir.join("logs")),
        )
        .expect("open the state machine");
        let config = trainctl_coordinator::server::raft_config(self.snapshot_logs)
            .expect("the production raft config");
        let raft = Raft::new(
            id,
            Arc::new(config),
            MemberNet {
                net: self.net.clone(),
                me: id,
            },
            log,
            machine.clone(),
        )
        .await
        .expect("start raft");
        // As `server::open`: a member of a group coming back listens before it campaigns.
        let elections = Elections::start(raft.clone());
        self.machines.insert(id, machine);
        self.net.wires().up.insert(id, Member { raft, elections });
    }

    /// Kills member `id` (`kill -9`: nothing more is sent or stored; its files stay).
    async fn crash(&mut self, id: ServerId) {
        let member = self
            .net
            .wires()
            .up
            .remove(&id)
            .expect("crash a member that is up");
        self.machines.remove(&id);
        member.raft.shutdown().await.expect("stop raft");
    }

    fn cut(&self, a: ServerId, b: ServerId) {
        let mut wires = self.net.wires();
        wires.cut.insert((a, b));
        wires.cut.insert((b, a));
    }

    /// Cuts `id` off from every other member.
    fn isolate(&self, id: ServerId) {
        for other in (1..=self.size).filter(|&o| o != id) {
            self.cut(id, other);
        }
    }

    fn heal(&self) {
        self.net.wires().cut.clear();
    }

    /// Records which members think they lead, per term.
    fn note_leaders(&mut self) {
        let wires = self.net.wires();
        for (id, member) in &wires.up {
            let m = member.raft.metrics().borrow().clone();
            if m.state == ServerState::Leader {
                self.leaders.entry(m.current_term).or_default().insert(*id);
            }
        }
    }

    /// Lets `d` of virtual time pass, noting leaders every 10 ms.
    async fn run_for(&mut self, d: Duration) {
        let step = Duration::from_millis(10);
        let mut left = d;
        while !left.is_zero() {
            let t = step.min(left);
            tokio::time::sleep(t).await;
            left -= t;
            self.note_leaders();
        }
    }

    /// The leader of the highest term among members that are up and reach a majority, waiting
    /// up to `within` of virtual time for one; how long it took.
    async fn leader(&mut self, within: Duration) -> Option<(ServerId, Duration)> {
        let start = tokio::time::Instant::now();
        while start.elapsed() <= within {
            self.note_leaders();
            let found = {
                let wires = self.net.wires();
                wires
                    .up
                    .iter()
                    .map(|(id, member)| (*id, member.raft.metrics().borrow().clone()))
                    .filter(|(_, m)| m.state == ServerState::Leader)
                    .filter(|(id, _)| {
                        let reached = (1..=self.size)
                            .filter(|o| {
                                o == id
                                    || (wires.up.contains_key(o) && !wires.cut.contains(&(*id, *o)))
                            })
                            .count() as u64;
                        reached * 2 > self.size
                    })
                    .max_by_key(|(_, m)| m.current_term)
                    .map(|(id, _)| id)
            };
            if let Some(id) = found {
                return Some((id, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Every member's state, once all that are up have applied the same log index.
    async fn converged_states(&mut self, within: Duration) -> BTreeMap<ServerId, State> {
        let start = tokio::time::Instant::now();
        loop {
            let applied: BTreeSet<Option<u64>> = self
                .net
                .wires()
                .up
                .values()
                .map(|m| m.raft.metrics().borrow().last_applied.map(|l| l.index))
                .collect();
            let logs: BTreeSet<Option<u64>> = self
                .net
                .wires()
                .up
                .values()
                .map(|m| m.raft.metrics().borrow().last_log_index)
                .collect();
            if applied.len() == 1 && logs.len() == 1 && applied == logs {
                return self
                    .machines
                    .iter()
                    .map(|(id, m)| (*id, m.read(State::clone)))
                    .collect();
            }
            assert!(
                start.elapsed() <= within,
                "members did not converge within {within:?}: applied {applied:?}, logs {logs:?}"
            );
            self.run_for(Duration::from_millis(20)).await;
        }
    }

    /// No term had two leaders.
    fn assert_no_split_brain(&self) {
        for (term, ids) in &self.leaders {
            assert!(ids.len() <= 1, "term {term} had leaders {ids:?}");
        }
    }
}

fn spec(name: &str) -> JobSpec {
    JobSpec::from_toml(
        &format!(
            "name = \"{name}\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\n\
             [resources]\nnodes = 1\nprocs_per_node = 1\n"
        ),
        "sim.toml",
    )
    .expect("a valid spec")
}

/// A submission with an idempotency key, as the API writes it.
fn keyed_submission(key: &str, at_ms: u64) -> Command {
    let spec = spec(key);
    Command::Idempotent {
        key: key.to_string(),
        digest: request_digest(&spec, None),
        submit: Box::new(Command::SubmitJob {
            spec,
            at_ms,
            secret: String::new(),
            resume_from_job: None,
        }),
    }
}

impl SimNet {
    /// The member that leads in the highest term, as the members themselves report it (a
    /// client's view: it may be a deposed leader that has not heard yet).
    fn leader_now(&self) -> Option<Raft> {
        self.wires()
            .up
            .values()
            .map(|m| (m.raft.metrics().borrow().clone(), m.raft.clone()))
            .filter(|(m, _)| m.state == ServerState::Leader)
            .max_by_key(|(m, _)| m.current_term)
            .map(|(_, raft)| raft)
    }
}

/// Submits `key` to whichever member leads now, again (same key) after a timeout, a refusal or
/// a lost leader, until one attempt is acknowledged: the job it names, and how many times it was
/// sent again.
async fn submit_via(net: &SimNet, key: &str, at_ms: u64) -> (JobId, u64) {
    let mut sent = 0u64;
    for _ in 0..500 {
        let Some(raft) = net.leader_now() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        sent += 1;
        let write = raft.client_write(keyed_submission(key, at_ms));
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(r)) => match r.data {
                CommandOutcome::JobSubmitted { job } | CommandOutcome::JobReplayed { job } => {
                    return (job, sent - 1)
                }
                other => panic!("submission {key}: {other:?}"),
            },
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("submission {key} was never acknowledged");
}

async fn submit_until_acknowledged(cluster: &mut Cluster, key: &str, at_ms: u64) -> JobId {
    let (job, retries) = submit_via(&cluster.net, key, at_ms).await;
    cluster.retries += retries;
    job
}

/// Submits keys `{prefix}-0`, `{prefix}-1`, ... one after another until `stop`; what was
/// acknowledged goes to `acked`, the retries to the count it returns.
async fn keep_submitting(
    net: SimNet,
    prefix: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, JobId>>>,
) -> u64 {
    let mut retries = 0;
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        let (job, again) = submit_via(&net, &key, i).await;
        retries += again;
        acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, job);
        i += 1;
        // A client's think time: keeps a schedule to a few hundred fsync'd writes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    retries
}

/// Every acknowledged key is one job, with that name, on every member, and no job is there twice.
fn assert_exactly_once(states: &BTreeMap<ServerId, State>, acked: &BTreeMap<String, JobId>) {
    let first = states.values().next().expect("a member");
    for (id, state) in states {
        assert!(
            state == first,
            "member {id}'s state differs from the others'"
        );
    }
    let mut names: BTreeMap<&str, Vec<JobId>> = BTreeMap::new();
    for job in first.jobs.values() {
        names
            .entry(job.spec.name.as_str())
            .or_default()
            .push(job.id);
    }
    for (key, job) in acked {
        assert_eq!(
            names.get(key.as_str()),
            Some(&vec![*job]),
            "acknowledged submission {key}"
        );
    }
    for (name, jobs) in &names {
        assert_eq!(jobs.len(), 1, "{name} made jobs {jobs:?}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_killed_leader_is_replaced_within_a_second_and_nothing_is_lost_or_doubled() {
    let mut cluster = Cluster::start(3, 1_000).await;
    let mut acked = BTreeMap::new();
    let mut failovers = Vec::new();
    for round in 0..5u64 {
        for i in 0..10 {
            let key = format!("r{round}-{i}");
            let job = submit_until_acknowledged(&mut cluster, &key, round * 100 + i).await;
            acked.insert(key, job);
        }
        let (leader, _) = cluster
            .leader(Duration::from_secs(5))
            .await
            .expect("a leader");
        cluster.crash(leader).await;
        let (next, took) = cluster
            .leader(Duration::from_secs(5))
            .await
            .expect("a new leader");
        assert_ne!(next, leader);
        failovers.push(took);
        cluster.boot(leader).await;
    }
    for took in &failovers {
        // Production timers: a follower's lease (election_timeout_max, 300 ms) plus its own
        // election timeout (150 to 300 ms) plus the vote round.
        assert!(
            *took < Duration::from_secs(1),
            "failovers took {failovers:?}"
        );
    }
    let states = cluster.converged_states(Duration::from_secs(10)).await;
    assert_eq!(states.len(), 3);
    assert_exactly_once(&states, &acked);
    cluster.assert_no_split_brain();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_isolated_leader_commits_nothing_and_rejoins_as_a_follower() {
    let mut cluster = Cluster::start(3, 1_000).await;
    let first = submit_until_acknowledged(&mut cluster, "before", 1).await;
    let (old, _) = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader");
    let old_term = cluster.raft(old).metrics().borrow().current_term;
    cluster.isolate(old);

    // The old leader takes a write it can not commit: the client never gets an answer.
    let stranded = cluster.raft(old);
    let write = tokio::spawn(async move {
        tokio::time::timeout(
            WRITE_TIMEOUT,
            stranded.client_write(keyed_submission("lost", 2)),
        )
        .await
    });
    let (new, _) = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("the majority elects a leader");
    assert_ne!(new, old);
    assert!(cluster.raft(new).metrics().borrow().current_term > old_term);
    let during = submit_until_acknowledged(&mut cluster, "during", 3).await;
    match write.await.expect("the stranded write's task") {
        Err(_) => {}     // timed out: never acknowledged
        Ok(Err(_)) => {} // refused once it lost leadership
        Ok(Ok(r)) => panic!("a minority leader acknowledged a write: {:?}", r.data),
    }

    cluster.heal();
    cluster.run_for(Duration::from_secs(2)).await;
    let m = cluster.raft(old).metrics().borrow().clone();
    assert_ne!(m.state, ServerState::Leader, "the old leader stepped down");
    assert_eq!(m.current_leader, Some(new));
    let states = cluster.converged_states(Duration::from_secs(10)).await;
    let acked = BTreeMap::from([
        ("before".to_string(), first),
        ("during".to_string(), during),
    ]);
    assert_exactly_once(&states, &acked);
    assert!(
        !states[&old].jobs.values().any(|j| j.spec.name == "lost"),
        "the write the minority took is gone everywhere"
    );
    cluster.assert_no_split_brain();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_new_member_catches_up_from_a_snapshot_and_every_member_restarts_from_disk() {
    let mut cluster = Cluster::start(3, 20).await;
    let mut acked = BTreeMap::new();
    for i in 0..120 {
        let key = format!("k{i}");
        acked.insert(
            key.clone(),
            submit_until_acknowledged(&mut cluster, &key, i).await,
        );
    }
    let (leader, _) = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader");
    let purged = cluster.raft(leader).metrics().borrow().purged;
    assert!(
        purged.is_some_and(|p| p.index > 20),
        "the leader compacted its log behind snapshots: purged up to {purged:?}"
    );

    // A fourth member joins as a learner, then votes: what it lacks was purged, so it is sent
    // a snapshot (in chunks) and the log after it.
    cluster.add_member(4).await;
    let raft = cluster.raft(leader);
    raft.add_learner(4, BasicNode::new("sim-4"), true)
        .await
        .expect("add the learner");
    raft.change_membership([1, 2, 3, 4], false)
        .await
        .expect("promote it");
    let states = cluster.converged_states(Duration::from_secs(20)).await;
    assert_eq!(states.len(), 4);
    assert_exactly_once(&states, &acked);
    let installed = cluster.raft(4).metrics().borrow().snapshot;
    assert!(
        installed.is_some_and(|s| purged.is_some_and(|p| s.index >= p.index)),
        "member 4 installed a snapshot past the purged log ({installed:?}, purged {purged:?})"
    );

    // Every member restarted from its own files comes back to the same state.
    for id in 1..=4 {
        cluster.crash(id).await;
    }
    for id in 1..=4 {
        cluster.boot(id).await;
    }
    cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader after a full restart");
    let restarted = cluster.converged_states(Duration::from_secs(20)).await;
    assert_exactly_once(&restarted, &acked);
    assert!(
        restarted[&4] == states[&1],
        "the same state after the restart"
    );
    cluster.assert_no_split_brain();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_log_is_compacted_while_a_member_is_down_and_the_member_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(3, 20).await;
    let mut acked = BTreeMap::new();
    acked.insert(
        "first".to_string(),
        submit_until_acknowledged(&mut cluster, "first", 0).await,
    );
    cluster.crash(3).await;
    for i in 1..=150 {
        let key = format!("k{i}");
        acked.insert(
            key.clone(),
            submit_until_acknowledged(&mut cluster, &key, i).await,
        );
    }
    // openraft puts a purge off while a replication to the dead member holds the entries in
    // flight, and purges at its next failed attempt (within the network's backoff).
    cluster.run_for(Duration::from_secs(1)).await;
    let (leader, _) = cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader");
    let m = cluster.raft(leader).metrics().borrow().clone();
    let last = m.last_log_index.expect("a log");
    assert!(
        m.purged.is_some_and(|p| p.index + 40 >= last),
        "the log was compacted behind the snapshots: purged {:?} of {last}",
        m.purged
    );
    cluster.boot(3).await;
    let states = cluster.converged_states(Duration::from_secs(20)).await;
    assert_exactly_once(&states, &acked);
    assert!(
        cluster.raft(3).metrics().borrow().snapshot.is_some(),
        "member 3 caught up from a snapshot: the entries it lacked were purged"
    );
    cluster.assert_no_split_brain();
}

/// What one seeded schedule went through.
#[derive(Debug, Default)]
struct Explored {
    crashes: u64,
    isolations: u64,
    /// Terms in which a leader was seen.
    terms_led: u64,
    /// Submissions acknowledged, and those sent again (same key) after a timeout or a lost leader.
    acknowledged: u64,
    retries: u64,
    /// Virtual time the schedule took.
    virtual_ms: u64,
}

/// Runs one seeded schedule on 5 voters: submissions between faults (a crash, a restart, a cut
/// link, a healing), at most two members down or cut off at a time, so a majority can always
/// form; then heals everything and checks the invariants.
async fn random_faults(seed: u64) -> Explored {
    let mut explored = Explored::default();
    let began = tokio::time::Instant::now();
    let mut dice = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(5, 30).await;
    cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a first leader");
    // Two clients submit all along, racing every fault below.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let clients: Vec<_> = (0..2)
        .map(|c| {
            tokio::spawn(keep_submitting(
                cluster.net.clone(),
                format!("s{seed}-c{c}"),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    let mut down: BTreeSet<ServerId> = BTreeSet::new();
    let mut cut_off: BTreeSet<ServerId> = BTreeSet::new();
    for _ in 0..12 {
        let id = dice.random_range(1..=5);
        let troubled = down.union(&cut_off).count();
        match dice.random_range(0..4) {
            0 if !down.contains(&id) && !cut_off.contains(&id) && troubled < 2 => {
                cluster.crash(id).await;
                down.insert(id);
                explored.crashes += 1;
            }
            1 if !cut_off.contains(&id) && !down.contains(&id) && troubled < 2 => {
                cluster.isolate(id);
                cut_off.insert(id);
                explored.isolations += 1;
            }
            2 => {
                if let Some(&back) = down.iter().next() {
                    cluster.boot(back).await;
                    down.remove(&back);
                }
            }
            _ => {
                cluster.heal();
                cut_off.clear();
            }
        }
        let pause = Duration::from_millis(dice.random_range(0..800));
        cluster.run_for(pause).await;
    }
    for id in std::mem::take(&mut down) {
        cluster.boot(id).await;
    }
    cluster.heal();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        explored.retries += client.await.expect("a client");
    }
    cluster
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader once healed");
    let states = cluster.converged_states(Duration::from_secs(30)).await;
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    explored.acknowledged = acked.len() as u64;
    assert_eq!(states.len(), 5, "seed {seed}");
    assert_exactly_once(&states, &acked);
    cluster.assert_no_split_brain();
    explored.terms_led = cluster.leaders.len() as u64;
    explored.virtual_ms = began.elapsed().as_millis() as u64;
    explored
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn seeded_fault_schedules_keep_one_leader_per_term_and_every_write_exactly_once() {
    let seeds: u64 = std::env::var("TRAINCTL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut total = Explored::default();
    for seed in 0..seeds {
        let explored = random_faults(seed).await;
        eprintln!("seed {seed}: {explored:?}");
        total.crashes += explored.crashes;
        total.isolations += explored.isolations;
        total.terms_led += explored.terms_led;
        total.retries += explored.retries;
        total.acknowledged += explored.acknowledged;
        total.virtual_ms += explored.virtual_ms;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The schedules did what they are for: leaders were lost and replaced, and clients retried.
    assert!(total.crashes > 0 && total.isolations > 0, "{total:?}");
    assert!(total.terms_led > seeds, "leaders changed: {total:?}");
    assert!(total.retries > 0, "some writes raced a fault: {total:?}");
}
