//! Attempts, restarts, checkpoints and node maintenance: how a job survives failures.
//!
//! An *attempt* is one launch of a job's gang. When an attempt ends without success the job either
//! restarts or fails, decided here, deterministically, from the command and the state:
//!
//! | how the attempt ended | budget | how the gang restarts |
//! |---|---|---|
//! | a rank failed (exit, signal, could not start) | counts | in place: same hosts, new attempt, new port |
//! | the gang hung (leader saw no progress) | counts | in place |
//! | a host was lost | free | placed again (spares first, within `MIN:MAX`) |
//! | the job grows, or its host is drained | free | placed again |
//!
//! A restart in place keeps the allocation: each agent stops the old attempt's ranks and starts the
//! new ones once they are gone, so a restart costs one process start. A restart that places the gang
//! again retires the old shares: they stay held ([`RetiredShare`]) until each agent reports it runs
//! nothing of the old attempt, and the job is placed only after that (except on a lost host, whose
//! share waits for its agent as before).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    rejected, CommandOutcome, Job, JobId, JobState, NodeAllocation, NodeId, NodeStatus, RankPhase,
    State,
};

/// Attempts kept in a job's history; older ones are dropped.
pub const ATTEMPT_HISTORY_MAX: usize = 100;
/// Checkpoint records kept per job when `[checkpoint] keep` is unset (files are not deleted then).
pub const CHECKPOINT_RECORDS_MAX: usize = 100;
/// Longest checkpoint path accepted, in bytes.
pub const CHECKPOINT_PATH_BYTES_MAX: usize = 4096;
/// Largest checkpoint metrics object accepted, in bytes of JSON.
pub const CHECKPOINT_METRICS_BYTES_MAX: usize = 16 << 10;

/// Why an attempt ended, which decides whether it counts against the restart budget and whether the
/// gang restarts on the same hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// A rank exited non-zero, was killed by a signal, or could not start.
    Failed,
    /// No rank made progress for the job's `hang_timeout`.
    Hung,
    /// A host of the gang was lost.
    HostLost,
    /// Capacity returned and an elastic job grows.
    Resize,
    /// An operator drained a host of the gang.
    Drained,
    /// A host of the gang failed its pre-flight checks before the ranks there started.
    Unhealthy,
}

impl AttemptEnd {
    /// Whether this end spends one of the job's `max_restarts` (a membership change does not).
    pub fn counts_against_budget(self) -> bool {
        matches!(self, AttemptEnd::Failed | AttemptEnd::Hung)
    }

    /// Whether the gang restarts on the hosts it has (when they are all healthy).
    fn restarts_in_place(self) -> bool {
        matches!(self, AttemptEnd::Failed | AttemptEnd::Hung)
    }
}

/// One attempt in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    /// The hosts, in group-rank order.
    pub nodes: Vec<NodeId>,
    pub world_size: u32,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Why it ended, in words ("succeeded", "rank 3 on node-2 exited with code 1", ...).
    pub end: Option<String>,
}

/// A checkpoint a rank committed: written completely, recorded in Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub path: String,
    pub step: u64,
    pub at_ms: u64,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The metrics the rank sent, as compact JSON.
    pub metrics: Option<String>,
    /// The job that wrote it (differs from the owner for a `--resume-from` start).
    #[serde(default)]
    pub job: Option<JobId>,
}

/// A node's share of an earlier attempt, held until its agent reports the attempt's processes gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredShare {
    pub attempt: u32,
    pub node: NodeId,
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The rendezvous port it held, on group rank 0's node.
    pub port: Option<u16>,
    /// The node was lost: its agent must answer before this is free.
    pub awaiting_agent: bool,
}

/// The secret a rank of `attempt` presents to its agent (`TRAINCTL_JOB_TOKEN`): derived from the job's
/// secret, so each attempt's token differs and a stale attempt's token is recognised as stale.
pub fn attempt_token(secret: &str, job: JobId, attempt: u32) -> String {
    let digest = Sha256::new()
        .chain_update(secret.as_bytes())
        .chain_update(format!(":{job}:{attempt}").as_bytes())
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lexically normalised absolute form of `path` (relative to `base`); None if it climbs with `..`.
fn normalize(base: &Path, path: &str) -> Option<PathBuf> {
    let joined = base.join(path);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => return None,
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// Why `path` may not be committed as a checkpoint of `job` (None: it may). Checkpoints must lie inside
/// the job's expanded `[checkpoint] dir`, because trainctl deletes old ones (`keep`) and must never
/// delete anything else.
pub fn checkpoint_path_problem(job: &Job, path: &str) -> Option<String> {
    let Some(dir) = job.checkpoint_dir() else {
        return Some(format!(
            "job {} has no [checkpoint] table, so it has nowhere to commit checkpoints (add `[checkpoint] dir = \"...\"` to the job file)",
            job.id
        ));
    };
    if path.is_empty() || path.len() > CHECKPOINT_PATH_BYTES_MAX || path.contains('\0') {
        return Some(format!(
            "the checkpoint path must be 1 to {CHECKPOINT_PATH_BYTES_MAX} bytes without NUL"
        ));
    }
    let dir = PathBuf::from(&dir);
    match normalize(&dir, path) {
        Some(p) if p.starts_with(&dir) && p != dir => None,
        _ => Some(format!(
            "checkpoint path `{path}` is outside the job's checkpoint dir `{}` (accepted: a file or directory inside it, without `..`)",
            dir.display()
        )),
    }
}

impl Job {
    /// The expanded `[checkpoint] dir` (relative dirs resolved against the workdir), if any.
    pub fn checkpoint_dir(&self) -> Option<String> {
        let policy = self.spec.checkpoint.as_ref()?;
        let dir = policy.expand_dir(self.id.0, &self.spec.name);
        if Path::new(&dir).is_absolute() {
            return Some(dir);
        }
        let workdir = self.spec.launch.workdir.as_deref().unwrap_or("/");
        normalize(Path::new(workdir), &dir).map(|p| p.to_string_lossy().into_owned())
    }

    /// The checkpoint the next attempt resumes from: the newest committed, else `--resume-from`'s.
    pub fn resume_point(&self) -> Option<&CheckpointRecord> {
        self.checkpoints.last().or(self.resume_from.as_ref())
    }

    /// Whether `rank` of `attempt` ran on `node`: the current attempt's ranks, or an earlier attempt's
    /// hosts in group-rank order. An earlier attempt's output is still shipped after a restart.
    pub fn rank_ran_on(&self, attempt: u32, rank: u32, node: &NodeId) -> bool {
        if attempt == self.attempt && !self.ranks.is_empty() {
            return self.ranks.iter().any(|r| r.rank == rank && &r.node == node);
        }
        let procs = self.spec.resources.procs_per_node.max(1);
        self.attempts
            .iter()
            .find(|a| a.attempt == attempt)
            .and_then(|a| a.nodes.get((rank / procs) as usize))
            .is_some_and(|n| n == node)
    }

    /// `TRAINCTL_JOB_TOKEN` of the current attempt.
    pub fn token(&self) -> String {
        attempt_token(&self.secret, self.id, self.attempt)
    }

    pub(super) fn record_attempt_start(&mut self, at_ms: u64) {
        let (nodes, world_size) = match &self.allocation {
            Some(a) => (
                a.nodes.iter().map(|na| na.node.clone()).collect(),
                self.ranks.len() as u32,
            ),
            None => (Vec::new(), 0),
        };
        self.attempts.push(AttemptRecord {
            attempt: self.attempt,
            nodes,
            world_size,
            started_at_ms: at_ms,
            ended_at_ms: None,
            end: None,
        });
        if self.attempts.len() > ATTEMPT_HISTORY_MAX {
            let excess = self.attempts.len() - ATTEMPT_HISTORY_MAX;
            self.attempts.drain(..excess);
        }
    }

    pub(super) fn record_attempt_end(&mut self, at_ms: u64, why: &str) {
        if let Some(last) = self
            .attempts
            .last_mut()
            .filter(|a| a.attempt == self.attempt && a.ended_at_ms.is_none())
        {
            last.ended_at_ms = Some(at_ms);
            last.end = Some(why.to_string());
        }
    }
}

impl State {
    /// The current attempt of a live job ended without success: restart the gang, or fail the job
    /// when the restart budget is spent.
    pub(super) fn end_attempt(&mut self, job_id: JobId, why: String, end: AttemptEnd, at_ms: u64) {
        let Some(job) = super::index::job_mut_in(&mut self.index, &mut self.jobs, job_id) else {
            return;
        };
        if job.state.is_terminal() || job.state == JobState::Pending {
            return;
        }
        job.record_attempt_end(at_ms, &why);
        let budget = job.spec.failure.max_restarts;
        if end.counts_against_budget() {
            if job.restarts >= budget {
                job.state = JobState::Failed;
                job.reason = Some(if budget == 0 {
                    why
                } else {
                    format!(
                        "{why}\n(gave up: all {budget} restart{} of the budget were used)",
                        if budget == 1 { "" } else { "s" }
                    )
                });
                job.finished_at_ms = Some(at_ms);
                self.release_finished_allocations(job_id);
                return;
            }
            job.restarts += 1;
        }
        job.reason = Some(format!("restarting: {why}"));
        let hosts_healthy = job.allocation.as_ref().is_some_and(|a| {
            a.nodes.iter().all(|na| {
                !na.released
                    && !na.awaiting_agent
                    && self.nodes.get(&na.node).is_some_and(|n| {
                        n.status == NodeStatus::Up && !n.drained && n.health.unhealthy.is_none()
                    })
            })
        });
        if end.restarts_in_place() && hosts_healthy {
            self.restart_in_place(job_id, at_ms);
        } else {
            self.place_again(job_id);
        }
    }

    /// Next attempt on the same hosts, with a fresh rendezvous port when one is free (the old one
    /// stays held until the old rank 0 is gone, so a straggler of the old gang never meets the new).
    fn restart_in_place(&mut self, job_id: JobId, at_ms: u64) {
        let job = super::index::job_mut_in(&mut self.index, &mut self.jobs, job_id)
            .expect("caller checked");
        let old_attempt = job.attempt;
        job.attempt += 1;
        let allocation = job.allocation.as_mut().expect("caller checked");
        let first = allocation.nodes[0].node.clone();
        let old_port = allocation.master_port;
        if let Some(node) = self.nodes.get_mut(&first) {
            let (lo, hi) = node.port_range;
            if let Some(port) = (lo..=hi).find(|p| *p != old_port && !node.usage.ports.contains(p))
            {
                node.usage.ports.insert(port);
                allocation.master_port = port;
                job.retired.push(RetiredShare {
                    attempt: old_attempt,
                    node: first,
                    gpus: Vec::new(),
                    cpus: 0,
                    memory_mib: 0,
                    port: Some(old_port),
                    awaiting_agent: false,
                });
            }
        }
        for rank in &mut job.ranks {
            rank.phase = RankPhase::Pending;
            rank.exit_code = None;
            rank.message = None;
            rank.pid = None;
        }
        job.state = JobState::Starting;
        job.record_attempt_start(at_ms);
    }

    /// Back to the head of the queue for a new placement. Shares whose ranks have all ended are
    /// released; the others are retired, held until their agents report the processes gone.
    fn place_again(&mut self, job_id: JobId) {
        let job = self.job_mut(job_id).expect("caller checked");
        let old_attempt = job.attempt;
        job.attempt += 1;
        let ranks = std::mem::take(&mut job.ranks);
        let Some(allocation) = job.allocation.take() else {
            job.state = JobState::Pending;
            self.queue.retain(|j| *j != job_id);
            self.queue.push_front(job_id);
            return;
        };
        let mut free_now: Vec<NodeAllocation> = Vec::new();
        for na in allocation.nodes.into_iter().filter(|na| !na.released) {
            let all_ended = ranks
                .iter()
                .filter(|r| r.node == na.node)
                .all(|r| r.phase.is_terminal() && r.phase != RankPhase::Lost);
            let port = (na.group_rank == 0).then_some(allocation.master_port);
            if all_ended && !na.awaiting_agent {
                free_now.push(na);
                continue;
            }
            job.retired.push(RetiredShare {
                attempt: old_attempt,
                node: na.node,
                gpus: na.gpus,
                cpus: na.cpus,
                memory_mib: na.memory_mib,
                port,
                awaiting_agent: na.awaiting_agent,
            });
        }
        job.state = JobState::Pending;
        for na in free_now {
            let port = (na.group_rank == 0).then_some(allocation.master_port);
            self.free_on_node(&na.node, &na.gpus, na.cpus, na.memory_mib, port);
        }
        self.queue.retain(|j| *j != job_id);
        self.queue.push_front(job_id);
    }

    /// Returns resources to a node's free pool.
    pub(super) fn free_on_node(
        &mut self,
        node_id: &NodeId,
        gpus: &[u32],
        cpus: u32,
        memory_mib: u64,
        port: Option<u16>,
    ) {
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.usage.cpus = node.usage.cpus.saturating_sub(cpus);
            node.usage.memory_mib = node.usage.memory_mib.saturating_sub(memory_mib);
            for g in gpus {
                node.usage.gpus.remove(g);
            }
            if let Some(p) = port {
                node.usage.ports.remove(&p);
            }
        }
    }

    /// Frees `job`'s retired shares on `node` that `which` selects.
    pub(super) fn release_retired(
        &mut self,
        job_id: JobId,
        node: &NodeId,
        which: impl Fn(&RetiredShare) -> bool,
    ) {
        let Some(job) = self.job_mut(job_id) else {
            return;
        };
        let (gone, kept): (Vec<RetiredShare>, Vec<RetiredShare>) = std::mem::take(&mut job.retired)
            .into_iter()
            .partition(|r| &r.node == node && which(r));
        job.retired = kept;
        for r in gone {
            self.free_on_node(&r.node, &r.gpus, r.cpus, r.memory_mib, r.port);
        }
    }

    /// Frees every job's retired shares on `node` that `which` selects.
    pub(super) fn release_retired_on(
        &mut self,
        node: &NodeId,
        which: impl Fn(&RetiredShare) -> bool,
    ) {
        let jobs: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.retired.iter().any(|r| &r.node == node))
            .map(|j| j.id)
            .collect();
        for job in jobs {
            self.release_retired(job, node, &which);
        }
    }

    pub(super) fn restart_job(
        &mut self,
        job_id: JobId,
        attempt: u32,
        reason: String,
        end: AttemptEnd,
        at_ms: u64,
    ) -> CommandOutcome {
        let Some(job) = self.jobs.get(&job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if !matches!(job.state, JobState::Starting | JobState::Running) {
            return rejected(format!(
                "job {job_id} is {}, not running",
                job.state.as_str()
            ));
        }
        if job.attempt != attempt {
            return rejected(format!(
                "job {job_id} is on attempt {}, not {attempt}",
                job.attempt
            ));
        }
        self.end_attempt(job_id, reason, end, at_ms);
        CommandOutcome::Done
    }

    pub(super) fn commit_checkpoint(
        &mut self,
        job_id: JobId,
        attempt: u32,
        path: String,
        step: u64,
        metrics: Option<String>,
        at_ms: u64,
    ) -> CommandOutcome {
        let Some(job) = self.job_mut(job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if job.attempt != attempt || job.state == JobState::Pending {
            return rejected(format!(
                "attempt {attempt} of job {job_id} is over (the job is on attempt {}); its checkpoint is not recorded",
                job.attempt
            ));
        }
        if let Some(problem) = checkpoint_path_problem(job, &path) {
            return rejected(problem);
        }
        let record = CheckpointRecord {
            path,
            step,
            at_ms,
            attempt,
            metrics,
            job: Some(job_id),
        };
        // A retried commit (the reply was lost) is recorded once.
        if job.checkpoints.last().is_some_and(|last| {
            last.path == record.path && last.step == record.step && last.attempt == attempt
        }) {
            return CommandOutcome::CheckpointCommitted { pruned: Vec::new() };
        }
        let newest_path = record.path.clone();
        job.checkpoints.retain(|c| c.path != newest_path);
        job.checkpoints.push(record);
        let keep = job
            .spec
            .checkpoint
            .as_ref()
            .and_then(|c| c.keep)
            .map(|k| k as usize);
        let limit = keep.unwrap_or(CHECKPOINT_RECORDS_MAX);
        let mut pruned = Vec::new();
        if job.checkpoints.len() > limit {
            let excess = job.checkpoints.len() - limit;
            let dropped: Vec<CheckpointRecord> = job.checkpoints.drain(..excess).collect();
            // Only `keep` deletes files; the record cap alone just forgets old entries.
            if keep.is_some() {
                pruned = dropped.into_iter().map(|c| c.path).collect();
            }
        }
        CommandOutcome::CheckpointCommitted { pruned }
    }

    pub(super) fn request_checkpoint(&mut self, job_id: JobId) -> CommandOutcome {
        let Some(job) = self.job_mut(job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if !matches!(job.state, JobState::Starting | JobState::Running) {
            return rejected(format!(
                "job {job_id} is {}, not running",
                job.state.as_str()
            ));
        }
        job.checkpoint_signals = job.checkpoint_signals.wrapping_add(1);
        CommandOutcome::Done
    }

    pub(super) fn set_node_drained(&mut self, node: &NodeId, drained: bool) -> CommandOutcome {
        let Some(n) = self.nodes.get_mut(node) else {
            return rejected(format!("no node named {node}"));
        };
        n.drained = drained;
        CommandOutcome::Done
    }

    /// Forgets a node for good. Refused while its agent is up and it is not drained of live work: stop
    /// the agent or drain the node first. Whatever it still held is given up (the operator says the
    /// host is gone), and its live jobs are placed again.
    pub(super) fn remove_node(&mut self, node: &NodeId, at_ms: u64) -> CommandOutcome {
        let Some(n) = self.nodes.get(node) else {
            // A name admitted but never registered: removing it frees the name.
            if self.forget_identities_of(node) {
                return CommandOutcome::Done;
            }
            return rejected(format!("no node named {node}"));
        };
        if n.status == NodeStatus::Up {
            let live: Vec<JobId> = self.jobs_assigned_to(node).map(|j| j.id).collect();
            if !n.drained {
                return rejected(format!(
                    "node {node} is up and not drained; drain it first (`trainctl drain {node}`) or stop its agent"
                ));
            }
            if let Some(job) = live.first() {
                return rejected(format!(
                    "node {node} still runs job {job}; wait for the drain to move it"
                ));
            }
        }
        self.lose_ranks_on(
            node,
            &format!("node {node} was removed from the cluster"),
            at_ms,
            true,
        );
        self.release_retired_on(node, |_| true);
        self.nodes.remove(node);
        self.forget_identities_of(node);
        CommandOutcome::Done
    }
}
