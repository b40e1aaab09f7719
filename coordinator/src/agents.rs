//! The gRPC service agents talk to: `Register` once per agent process, then `Heartbeat`.
//!
//! Intent versus observed: a heartbeat carries what the agent sees (rank states, log bytes); the reply
//! carries what the state says should run on that node. Observations that change the state become one
//! `ReportRanks` command; unchanged ones cost no Raft write.
//!
//! Only the Raft leader serves agents: another coordinator answers every RPC `Unavailable`, naming
//! the leader's address in the [`LEADER_METADATA_KEY`] metadata when it knows it, and a heartbeat
//! held on a leader that loses its leadership ends the same way at once. Every heartbeat reply lists
//! all the coordinators of the cluster, so agents follow membership changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics};
use tonic::{Request, Response, Status};
use trainctl_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
use trainctl_proto::agent::{
    Assignment, CommitCheckpointRequest, CommitCheckpointResponse, HeartbeatRequest,
    HeartbeatResponse, HostHealth, LogAck, RankAssignment, RankPhase as WirePhase, RankRef,
    RankReport, RegisterRequest, RegisterResponse, StoreAssignment,
};
use trainctl_proto::LEADER_METADATA_KEY;

use crate::auth::{node_of_peer, PeerCertificate};
use crate::launch::{rank_launches_on, store_launch};
use crate::raft::ServerId;
use crate::server::{now_ms, Coordinator, WriteError};
use crate::state::{
    checkpoint_path_problem, Command, CommandOutcome, JobId, NodeId, NodeStatus, RankObservation,
    RankPhase, State, CHECKPOINT_METRICS_BYTES_MAX,
};

/// Longest a heartbeat reply is held waiting for this node's assignments to change (long poll).
pub const MAX_HEARTBEAT_HOLD_MS: u64 = 2_000;

/// `job_id:attempt` of each assignment: what an agent says it already knows.
pub fn assignment_keys(assignments: &[Assignment]) -> BTreeSet<String> {
    assignments
        .iter()
        .map(|a| format!("{}:{}", a.job_id, a.attempt))
        .collect()
}

/// Most log bytes stored from one heartbeat; the agent sends the rest next time.
pub const MAX_LOG_BYTES_PER_HEARTBEAT: usize = 4 << 20;

/// The routes serving the agent protocol, to merge into the coordinator's router.
pub fn router(coordinator: Arc<Coordinator>) -> axum::Router {
    let service = AgentServiceServer::new(AgentEndpoint { coordinator })
        .max_decoding_message_size(MAX_LOG_BYTES_PER_HEARTBEAT * 2);
    tonic::service::Routes::new(service).into_axum_router()
}

struct AgentEndpoint {
    coordinator: Arc<Coordinator>,
}

fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::NotLeader { leader } => not_leader_status(leader.as_deref()),
        WriteError::Raft(_) => Status::internal(e.to_string()),
        WriteError::Unconfirmed => Status::unavailable(e.to_string()),
    }
}

/// The answer of a coordinator that does not lead: `Unavailable`, with the leader's address
/// (host:port) in the [`LEADER_METADATA_KEY`] metadata when it is known, so the agent goes there
/// at once; without it the agent tries the next coordinator it knows. Pure.
pub fn not_leader_status(leader: Option<&str>) -> Status {
    let value = leader.and_then(|l| tonic::metadata::MetadataValue::try_from(l).ok());
    let mut status = match (leader, &value) {
        (Some(l), Some(_)) => Status::unavailable(format!(
            "this coordinator is not the leader; the leader is at {l}"
        )),
        _ => Status::unavailable(
            "this coordinator is not the leader, and knows no leader now (an election may be \
             under way); try another coordinator",
        ),
    };
    if let Some(value) = value {
        status.metadata_mut().insert(LEADER_METADATA_KEY, value);
    }
    status
}

/// Whether the coordinator whose Raft metrics these are may serve agents: only the leader does;
/// another answers [`not_leader_status`] naming the leader it knows of. Pure.
pub fn serving_check(metrics: &RaftMetrics<ServerId, BasicNode>) -> Result<(), Status> {
    match metrics.current_leader {
        Some(leader) if leader == metrics.id => Ok(()),
        Some(leader) => {
            let address = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.as_str());
            Err(not_leader_status(address))
        }
        None => Err(not_leader_status(None)),
    }
}

/// Every coordinator of the cluster (voters and learners), host:port each, as the membership in
/// `metrics` lists them: what a heartbeat reply tells agents. Pure.
pub fn member_addresses(metrics: &RaftMetrics<ServerId, BasicNode>) -> Vec<String> {
    metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(_, node)| node.addr.clone())
        .collect()
}

/// [`serving_check`] of this coordinator now.
fn check_leader(c: &Coordinator) -> Result<(), Status> {
    serving_check(&c.raft.metrics().borrow())
}

/// [`member_addresses`] of this coordinator now.
fn coordinators(c: &Coordinator) -> Vec<String> {
    member_addresses(&c.raft.metrics().borrow())
}

mod register;
// The limits and checks of registration, public as they were when they lived here.
pub use register::*;

#[tonic::async_trait]
impl AgentService for AgentEndpoint {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        // Before anything else: only the leader's state is current enough to judge an agent (a
        // lagging follower might not know its identity yet, and a refused identity stops its ranks).
        check_leader(&self.coordinator)?;
        let peer = request.extensions().get::<PeerCertificate>().cloned();
        let r = request.into_inner();
        validate_register(&r)?;
        node_of_peer(
            &self.coordinator,
            peer.as_ref(),
            &NodeId(r.node_name.clone()),
        )?;
        if let Some(res) = &r.resources {
            let node = NodeId(r.node_name.clone());
            let held = self
                .coordinator
                .state
                .read(|s| gpu_held_elsewhere(&s.nodes, &node, &res.gpus));
            if let Some(problem) = held {
                return Err(Status::failed_precondition(problem));
            }
        }
        // Empty for the moment between a new cluster's first start and its naming.
        let cluster_id = self
            .coordinator
            .state
            .read(|s| s.cluster_id.clone())
            .unwrap_or_default();
        let res = r.resources.unwrap_or_default();
        let resources = node_resources(res);
        let node = NodeId(r.node_name);
        let at_ms = now_ms();
        let register = Command::RegisterNode {
            node: node.clone(),
            address: r.address,
            instance_id: r.instance_id.clone(),
            resources,
            port_range: (r.port_range_start as u16, r.port_range_end as u16),
            at_ms,
        };
        // The start-up pre-flight's verdict lands in the same log entry: no plan can see the new
        // agent's node without it.
        let command = match r.health.as_ref() {
            Some(h) => Command::Batch(vec![
                register,
                Command::SetNodeHealth {
                    node: node.clone(),
                    instance_id: r.instance_id,
                    unhealthy: unhealthy_reason(h),
                    at_ms,
                },
            ]),
            None => register,
        };
        let outcome = self
            .coordinator
            .write(command)
            .await
            .map_err(write_status)?;
        let outcome = match outcome {
            CommandOutcome::Batch(outcomes) => {
                outcomes.into_iter().next().unwrap_or(CommandOutcome::Done)
            }
            other => other,
        };
        if let CommandOutcome::Rejected { reason } = outcome {
            return Err(Status::invalid_argument(reason));
        }
        self.coordinator.heard_from(&node);
        tracing::info!(%node, "agent registered");
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: self.coordinator.config.heartbeat_interval_ms,
            cluster_id,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let c = &self.coordinator;
        check_leader(c)?;
        let peer = request.extensions().get::<PeerCertificate>().cloned();
        let hb = request.into_inner();
        node_of_peer(c, peer.as_ref(), &NodeId(hb.node_name.clone()))?;
        c.metrics.heartbeats.inc();
        let node = NodeId(hb.node_name.clone());
        let known = c.state.read(|s| {
            s.nodes
                .get(&node)
                .map(|n| n.instance_id == hb.instance_id && n.status == NodeStatus::Up)
        });
        if known != Some(true) {
            // Unknown node, a previous agent process, or a node declared lost: it must register anew.
            return Ok(Response::new(HeartbeatResponse {
                register_again: true,
                coordinators: coordinators(c),
                ..Default::default()
            }));
        }
        c.heard_from(&node);

        // A changed health verdict first: a job waiting to start here moves before anything else.
        if let Some(health) = hb.health.as_ref() {
            let unhealthy = unhealthy_reason(health);
            let changed = c.state.read(|s| {
                s.nodes
                    .get(&node)
                    .is_some_and(|n| n.health.unhealthy != unhealthy)
            });
            if changed {
                match &unhealthy {
                    Some(reason) => {
                        tracing::warn!(%node, %reason, "node failed its pre-flight checks")
                    }
                    None => tracing::info!(%node, "node passes its pre-flight checks again"),
                }
                c.write(Command::SetNodeHealth {
                    node: node.clone(),
                    instance_id: hb.instance_id.clone(),
                    unhealthy,
                    at_ms: now_ms(),
                })
                .await
                .map_err(write_status)?;
            }
        }

        // Logs first: a rank's exit is applied only after the lines it printed are stored.
        let log_acks = store_logs(c, &node, hb.logs).await?;

        for p in &hb.progress {
            if let Ok(job) = p.job_id.parse::<u64>() {
                c.made_progress(JobId(job), p.attempt, (p.step > 0).then_some(p.step));
            }
        }

        let (observations, idle_jobs) = c.state.read(|s| changed_observations(s, &node, &hb.ranks));
        let (observations, deferred) = defer_failures_behind_silent_peers(c, &node, observations);
        let gone_attempts = c.state.read(|s| gone_attempts(s, &node, &hb.ranks));
        if !observations.is_empty() || !idle_jobs.is_empty() || !gone_attempts.is_empty() {
            c.write(Command::ReportRanks {
                node: node.clone(),
                instance_id: hb.instance_id,
                observations,
                idle_jobs,
                at_ms: now_ms(),
                gone_attempts,
            })
            .await
            .map_err(write_status)?;
        }

        // Subscribe before reading, so no change between the two is missed.
        let mut changes = c.state.subscribe();
        let mut raft_metrics = c.raft.metrics();
        // While this beat is held, the node is alive (a dead agent's connection drops the guard).
        let _holding = HoldGuard::new(c, &node);
        let read = || {
            c.state
                .read(|s| assignments_for(s, &node, c.config.stop_grace_ms))
        };
        let mut assignments = read();
        let known: BTreeSet<String> = hb.known_assignments.iter().cloned().collect();
        if hb.wait_ms > 0 && log_acks.is_empty() && assignment_keys(&assignments) == known {
            let wait = Duration::from_millis(u64::from(hb.wait_ms).min(MAX_HEARTBEAT_HOLD_MS));
            let deadline = tokio::time::Instant::now() + wait;
            let me = c.config.server_id;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    // Deposed while holding the beat: send the agent to the new leader now, not
                    // after the hold (its assignments here may already be stale).
                    deposed = raft_metrics.wait_for(|m| m.current_leader != Some(me)) => {
                        let status = deposed.ok().and_then(|m| serving_check(&m).err());
                        return Err(status.unwrap_or_else(|| not_leader_status(None)));
                    }
                }
                assignments = read();
                if assignment_keys(&assignments) != known {
                    break;
                }
            }
        }
        Ok(Response::new(HeartbeatResponse {
            assignments,
            log_acks,
            register_again: false,
            deferred,
            coordinators: coordinators(c),
        }))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<CommitCheckpointRequest>,
    ) -> Result<Response<CommitCheckpointResponse>, Status> {
        let c = &self.coordinator;
        check_leader(c)?;
        let peer = request.extensions().get::<PeerCertificate>().cloned();
        let r = request.into_inner();
        let node = NodeId(r.node_name.clone());
        node_of_peer(c, peer.as_ref(), &node)?;
        let job_id = r
            .job_id
            .parse::<u64>()
            .map(JobId)
            .map_err(|_| Status::invalid_argument(format!("`{}` is not a job id", r.job_id)))?;
        let metrics = if r.metrics_json.is_empty() {
            None
        } else {
            if r.metrics_json.len() > CHECKPOINT_METRICS_BYTES_MAX {
                return Err(Status::invalid_argument(format!(
                    "metrics are {} bytes of JSON; at most {CHECKPOINT_METRICS_BYTES_MAX} are accepted",
                    r.metrics_json.len()
                )));
            }
            match serde_json::from_str::<serde_json::Value>(&r.metrics_json) {
                Ok(v @ serde_json::Value::Object(_)) => Some(v.to_string()),
                _ => {
                    return Err(Status::invalid_argument(
                        "metrics must be a JSON object, e.g. {\"loss\": 0.25}",
                    ))
                }
            }
        };
        // Classify before writing, so the agent can answer the rank with the right status.
        let checked = c.state.read(|s| {
            let agent_ok = s
                .nodes
                .get(&node)
                .is_some_and(|n| n.instance_id == r.instance_id && n.status == NodeStatus::Up);
            if !agent_ok {
                return Err(Status::permission_denied(
                    "this agent is not registered as the node it names",
                ));
            }
            let job = s
                .jobs
                .get(&job_id)
                .ok_or_else(|| Status::not_found(format!("job {job_id} does not exist")))?;
            if !job.ranks.iter().any(|rk| rk.node == node) {
                return Err(Status::permission_denied(format!(
                    "job {job_id} runs no rank on {node}"
                )));
            }
            if job.attempt != r.attempt || job.state.is_terminal() {
                return Err(Status::failed_precondition(format!(
                    "attempt {} of job {job_id} is over (the job is {} on attempt {}); the checkpoint is not recorded",
                    r.attempt,
                    job.state.as_str(),
                    job.attempt
                )));
            }
            if let Some(problem) = checkpoint_path_problem(job, &r.path) {
                return Err(Status::invalid_argument(problem));
            }
            Ok(job.checkpoint_dir().unwrap_or_default())
        });
        let checkpoint_dir = checked?;
        let outcome = c
            .write(Command::CommitCheckpoint {
                job: job_id,
                attempt: r.attempt,
                path: r.path,
                step: r.step,
                metrics,
                at_ms: now_ms(),
            })
            .await
            .map_err(write_status)?;
        match outcome {
            CommandOutcome::CheckpointCommitted { pruned } => {
                c.made_progress(job_id, r.attempt, Some(r.step));
                c.metrics.checkpoints.inc();
                Ok(Response::new(CommitCheckpointResponse {
                    pruned,
                    checkpoint_dir,
                }))
            }
            CommandOutcome::Rejected { reason } => Err(Status::failed_precondition(reason)),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }
}

/// Counts a node's held heartbeat for as long as it lives.
struct HoldGuard<'a> {
    coordinator: &'a Coordinator,
    node: NodeId,
}

impl<'a> HoldGuard<'a> {
    fn new(coordinator: &'a Coordinator, node: &NodeId) -> Self {
        *coordinator
            .holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(node.clone())
            .or_default() += 1;
        HoldGuard {
            coordinator,
            node: node.clone(),
        }
    }
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        let mut holding = self
            .coordinator
            .holding
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = holding.get_mut(&self.node) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Splits off the rank failures that must wait for the gang's other hosts to show they are alive
/// (see [`crate::supervise::failure_may_apply`]); returns the observations to apply now and the
/// deferred ranks.
fn defer_failures_behind_silent_peers(
    c: &Coordinator,
    node: &NodeId,
    observations: Vec<RankObservation>,
) -> (Vec<RankObservation>, Vec<RankRef>) {
    let now = std::time::Instant::now();
    let timeout = Duration::from_millis(c.config.node_timeout_ms);
    let mut apply = Vec::new();
    let mut deferred = Vec::new();
    for obs in observations {
        if !obs.phase.is_failure(obs.exit_code) {
            apply.push(obs);
            continue;
        }
        let key = (obs.job, obs.attempt, obs.rank);
        let first_seen = *c
            .failures_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(now);
        let peers: Vec<NodeId> = c.state.read(|s| {
            s.jobs
                .get(&obs.job)
                .and_then(|j| j.allocation.as_ref())
                .map(|a| {
                    a.nodes
                        .iter()
                        .filter(|na| &na.node != node && !na.released)
                        .map(|na| na.node.clone())
                        .collect()
                })
                .unwrap_or_default()
        });
        let peers_alive = peers.iter().all(|p| c.alive_since(p, first_seen));
        // A failure of the same attempt seen earlier and still waiting is the root cause: this one
        // waits behind it, so the first failure is the one the attempt ends with.
        let earlier_waiting = c
            .failures_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|((job, attempt, rank), seen)| {
                (*job, *attempt) == (obs.job, obs.attempt)
                    && *rank != obs.rank
                    && *seen < first_seen
            });
        if !earlier_waiting
            && crate::supervise::failure_may_apply(peers_alive, now - first_seen, timeout)
        {
            c.failures_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            apply.push(obs);
        } else {
            deferred.push(RankRef {
                job_id: obs.job.to_string(),
                attempt: obs.attempt,
                rank: obs.rank,
            });
        }
    }
    // Forget failures that were never applied (their attempt was replaced meanwhile).
    c.failures_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, seen| now - *seen < timeout * 10);
    (apply, deferred)
}

/// Longest health reason the coordinator keeps (the agent sends at most 1 KiB).
pub const HEALTH_REASON_BYTES_MAX: usize = 2048;

/// An agent's health report as the state keeps it: `None` when healthy, else its reason (cut to
/// [`HEALTH_REASON_BYTES_MAX`] at a character boundary; "no reason given" when empty).
pub fn unhealthy_reason(health: &HostHealth) -> Option<String> {
    if health.healthy {
        return None;
    }
    let reason = health.reason.trim();
    if reason.is_empty() {
        return Some("the agent reports a failed pre-flight check (no reason given)".to_string());
    }
    let mut end = reason.len().min(HEALTH_REASON_BYTES_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Some(reason[..end].to_string())
}

/// Earlier attempts that held a share on `node` and of which the agent reports no running rank: their
/// processes are gone, so their retired shares can be freed.
pub fn gone_attempts(s: &State, node: &NodeId, reports: &[RankReport]) -> Vec<(JobId, u32)> {
    let mut gone = Vec::new();
    for job in s.jobs_holding_on(node) {
        for share in job.retired.iter().filter(|r| &r.node == node) {
            let running = reports.iter().any(|r| {
                r.job_id == job.id.to_string()
                    && r.attempt == share.attempt
                    && wire_phase(r) == Some(RankPhase::Running)
            });
            if !running && !gone.contains(&(job.id, share.attempt)) {
                gone.push((job.id, share.attempt));
            }
        }
    }
    gone
}

/// Stores the log chunks of a heartbeat from `node` through Raft (one `AppendLogs` command) and
/// acks each: stored up to its end, or not stored with the error. Chunks of ranks that did not run
/// on the node are refused; chunks beyond [`MAX_LOG_BYTES_PER_HEARTBEAT`] wait for the next beat.
/// Not the leader: `Unavailable`, and the agent sends them to the leader.
async fn store_logs(
    c: &Coordinator,
    node: &NodeId,
    chunks: Vec<trainctl_proto::agent::LogChunk>,
) -> Result<Vec<LogAck>, Status> {
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    // Only ranks this node runs may write logs.
    let allowed: BTreeSet<(u64, u32, u32)> = c.state.read(|s| {
        chunks
            .iter()
            .filter(|ch| {
                s.jobs
                    .get(&JobId(ch.job_id.parse().unwrap_or(0)))
                    .is_some_and(|j| j.rank_ran_on(ch.attempt, ch.rank, node))
            })
            .map(|ch| (ch.job_id.parse().unwrap_or(0), ch.attempt, ch.rank))
            .collect()
    });
    let mut acks = Vec::new();
    let mut accepted = Vec::new();
    let mut offsets = Vec::new();
    let mut records = Vec::new();
    let mut budget = MAX_LOG_BYTES_PER_HEARTBEAT;
    for ch in chunks {
        let job: u64 = ch.job_id.parse().unwrap_or(0);
        if !allowed.contains(&(job, ch.attempt, ch.rank)) {
            // Not a rank this node ran: say so, so the agent stops offering it (after its
            // bounded retries) instead of holding the rank's end back forever.
            acks.push(LogAck {
                error: format!(
                    "rank {} of attempt {} of job {} did not run on this node",
                    ch.rank, ch.attempt, ch.job_id
                ),
                job_id: ch.job_id,
                attempt: ch.attempt,
                rank: ch.rank,
                stored_until: ch.offset,
            });
            continue;
        }
        if budget < ch.data.len() {
            continue;
        }
        budget -= ch.data.len();
        let stored_until = ch.offset + ch.data.len() as u64;
        records.push(crate::state::LogRecord {
            job: JobId(job),
            attempt: ch.attempt,
            rank: ch.rank,
            offset: ch.offset,
            data: ch.data,
        });
        accepted.push(LogAck {
            job_id: ch.job_id,
            attempt: ch.attempt,
            rank: ch.rank,
            stored_until,
            error: String::new(),
        });
        offsets.push(ch.offset);
    }
    if records.is_empty() {
        return Ok(acks);
    }
    // Through Raft, so every coordinator stores the same logs (the state machine writes the files,
    // idempotent by offset): one command for the whole heartbeat.
    let error = match c.write(Command::AppendLogs { chunks: records }).await {
        Ok(CommandOutcome::Rejected { reason }) => Some(reason),
        Ok(_) => None,
        // The agent goes to the leader and sends the chunks there.
        Err(e @ WriteError::NotLeader { .. }) => return Err(write_status(e)),
        Err(e) => Some(e.to_string()),
    };
    if let Some(error) = &error {
        // The agent retries with a backoff, and gives the lines up after a bounded number of
        // failures; the rest of the heartbeat (reports, cancellations, launches) must not wait on
        // a full or broken disk, or a write Raft could not commit.
        tracing::error!(%node, chunks = accepted.len(), %error, "could not store log chunks");
    }
    let store = c.logs.clone();
    let acks = tokio::task::spawn_blocking(move || {
        for (mut ack, offset) in accepted.into_iter().zip(offsets) {
            if let Some(error) = &error {
                ack.stored_until = offset;
                ack.error = error.clone();
            } else {
                // This leader's own copy may lack the start of the log (it caught up from a
                // snapshot, which carries no logs): the chunk was committed, but the leader's file
                // skipped it. Acknowledging only what the file holds makes the agent resend from
                // there (it keeps every rank's output), so the leader's copy is filled in.
                let job = JobId(ack.job_id.parse().unwrap_or(0));
                let held = store.stored_len(job, ack.attempt, ack.rank);
                ack.stored_until = ack.stored_until.min(held);
            }
            acks.push(ack);
        }
        acks
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    Ok(acks)
}

fn wire_phase(report: &RankReport) -> Option<RankPhase> {
    match WirePhase::try_from(report.phase).ok()? {
        WirePhase::Running => Some(RankPhase::Running),
        WirePhase::Exited => Some(RankPhase::Exited),
        WirePhase::FailedToStart => Some(RankPhase::FailedToStart),
        WirePhase::Unspecified => None,
    }
}

/// The reports that would change the state, and the ended jobs of which the agent runs nothing.
pub fn changed_observations(
    s: &State,
    node: &NodeId,
    reports: &[RankReport],
) -> (Vec<RankObservation>, Vec<JobId>) {
    let mut observations = Vec::new();
    for report in reports {
        let Ok(job_id) = report.job_id.parse::<u64>().map(JobId) else {
            continue;
        };
        let Some(phase) = wire_phase(report) else {
            continue;
        };
        let Some(job) = s.jobs.get(&job_id) else {
            continue;
        };
        if job.attempt != report.attempt {
            continue;
        }
        let Some(rank) = job
            .ranks
            .iter()
            .find(|r| r.rank == report.rank && &r.node == node)
        else {
            continue;
        };
        let exit_code = (phase == RankPhase::Exited).then_some(report.exit_code);
        if rank.phase.is_terminal() || (rank.phase == phase && rank.exit_code == exit_code) {
            continue;
        }
        observations.push(RankObservation {
            job: job_id,
            attempt: report.attempt,
            rank: report.rank,
            phase,
            exit_code,
            message: (!report.message.is_empty()).then(|| report.message.clone()),
            pid: (report.pid != 0).then_some(report.pid),
        });
    }
    let live: BTreeSet<&str> = reports
        .iter()
        .filter(|r| wire_phase(r) == Some(RankPhase::Running))
        .map(|r| r.job_id.as_str())
        .collect();
    let idle_jobs = s
        .jobs_holding_on(node)
        .filter(|j| j.state.is_terminal())
        .filter(|j| {
            j.allocation
                .as_ref()
                .is_some_and(|a| a.nodes.iter().any(|na| &na.node == node && !na.released))
        })
        .filter(|j| !live.contains(j.id.to_string().as_str()))
        .filter(|j| {
            // Only ranks the agent does not report at all are idle; reported exits arrive as observations.
            !reports
                .iter()
                .any(|r| r.job_id == j.id.to_string() && r.attempt == j.attempt)
        })
        .map(|j| j.id)
        .collect();
    (observations, idle_jobs)
}

/// What `node` should run now.
pub fn assignments_for(s: &State, node: &NodeId, stop_grace_ms: u32) -> Vec<Assignment> {
    s.jobs_assigned_to(node)
        .map(|job| Assignment {
            job_id: job.id.to_string(),
            attempt: job.attempt,
            argv: job.spec.launch.command.clone(),
            workdir: job.spec.launch.workdir.clone().unwrap_or_default(),
            job_env: job
                .spec
                .launch
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            token: job.token(),
            checkpoint_dir: job.checkpoint_dir().unwrap_or_default(),
            checkpoint_signal: job
                .spec
                .checkpoint
                .as_ref()
                .and_then(|c| c.signal_number())
                .unwrap_or(0),
            checkpoint_requests: job.checkpoint_signals,
            cpus_per_node: job.spec.resources.cpus_per_node,
            memory_per_node_mib: job.spec.resources.memory_per_node_mib,
            store: store_launch(job, node, |n| s.nodes.get(n).map(|n| n.address.clone())).map(
                |store| StoreAssignment {
                    address: store.address,
                    port: u32::from(store.port),
                    peers: store.peers,
                },
            ),
            ranks: rank_launches_on(job, node, &s.nodes)
                .into_iter()
                .map(|l| RankAssignment {
                    rank: l.rank,
                    local_rank: l.local_rank,
                    env: l.env.into_iter().collect(),
                    env_defaults: l.env_defaults.into_iter().collect(),
                })
                .collect(),
            stop_grace_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use trainctl_jobs::JobSpec;
    use trainctl_proto::agent::HostResources;

    use super::*;
    use crate::scheduler;
    use crate::state::{GpuInfo, JobState, NicAffinity, NodeResources, PcieLink, RdmaGid};

    fn id(name: &str) -> NodeId {
        NodeId(name.to_string())
    }

    /// node-1 (10.0.0.1) and node-2 (10.0.0.2), 4 GPUs each, and one job of 2 nodes x 2 ranks x 2 GPUs,
    /// placed: ranks 0-1 on node-1 (group rank 0), ranks 2-3 on node-2.
    fn cluster_with_job() -> (State, JobId) {
        let mut s = State::default();
        for n in 1..=2 {
            let name = format!("node-{n}");
            let outcome = s.apply(Command::RegisterNode {
                node: id(&name),
                address: format!("10.0.0.{n}"),
                instance_id: format!("{name}-a"),
                resources: NodeResources {
                    containment: String::new(),
                    hostname: name.clone(),
                    cpus: 16,
                    memory_mib: 1 << 16,
                    gpus: (0..4)
                        .map(|index| GpuInfo {
                            index,
                            name: "Test GPU".into(),
                            memory_mib: 1 << 16,
                            uuid: format!("GPU-{n}-{index}"),
                            ..Default::default()
                        })
                        .collect(),
                    rdma_devices: vec![],
                    advertised_interface: String::new(),
                },
                port_range: (29500, 29599),
                at_ms: 1,
            });
            assert_eq!(outcome, CommandOutcome::Done);
        }
        let spec = JobSpec::from_toml(
            "name = \"ddp\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\n\
             [resources]\nnodes = 2\nprocs_per_node = 2\ngpus_per_node = 2\n",
            "test.toml",
        )
        .unwrap();
        let CommandOutcome::JobSubmitted { job } = s.apply(Command::SubmitJob {
            spec,
            at_ms: 2,
            secret: String::new(),
            resume_from_job: None,
        }) else {
            panic!("not submitted")
        };
        let placement =
            scheduler::plan(&s.cluster_snapshot(), &s.jobs[&job].spec.resources).expect("fits");
        assert_eq!(placement.nodes[0].node, id("node-1"), "ties go by name");
        let outcome = s.apply(Command::PlaceJob {
            job,
            placement,
            at_ms: 3,
        });
        assert_eq!(outcome, CommandOutcome::Done);
        (s, job)
    }

    fn wire(job: &str, attempt: u32, rank: u32, phase: WirePhase, exit_code: i32) -> RankReport {
        RankReport {
            job_id: job.to_string(),
            attempt,
            rank,
            phase: phase as i32,
            exit_code,
            message: String::new(),
            pid: 4000 + rank,
        }
    }

    /// Applies what `node`'s agent reported, as the heartbeat handler does.
    fn apply_reports(s: &mut State, node: &str, reports: &[RankReport]) {
        let (observations, idle_jobs) = changed_observations(s, &id(node), reports);
        let outcome = s.apply(Command::ReportRanks {
            gone_attempts: Vec::new(),
            node: id(node),
            instance_id: format!("{node}-a"),
            observations,
            idle_jobs,
            at_ms: 10,
        });
        assert_eq!(outcome, CommandOutcome::Done);
    }

    #[test]
    fn only_reports_that_change_this_nodes_ranks_become_observations() {
        let (mut s, job) = cluster_with_job();
        let j = job.to_string();
        let reports = [
            wire(&j, 0, 0, WirePhase::Running, 0),
            // Not ranks of node-1, not this attempt, not a job, not a phase, not known:
            wire(&j, 0, 2, WirePhase::Running, 0),
            wire(&j, 1, 1, WirePhase::Running, 0),
            wire("abc", 0, 1, WirePhase::Running, 0),
            wire(&j, 0, 1, WirePhase::Unspecified, 0),
            wire("99", 0, 0, WirePhase::Running, 0),
        ];
        let (observations, idle) = changed_observations(&s, &id("node-1"), &reports);
        assert_eq!(
            observations,
            vec![RankObservation {
                job,
                attempt: 0,
                rank: 0,
                phase: RankPhase::Running,
                exit_code: None,
                message: None,
                pid: Some(4000),
            }]
        );
        assert!(idle.is_empty());
        apply_reports(&mut s, "node-1", &reports);
        // The same report again changes nothing, so it costs no Raft write.
        let (observations, _) = changed_observations(&s, &id("node-1"), &reports);
        assert!(observations.is_empty(), "{observations:?}");
        // An exit is a change; the exit code travels only with an exit.
        let exited = [wire(&j, 0, 0, WirePhase::Exited, 3)];
        let (observations, _) = changed_observations(&s, &id("node-1"), &exited);
        assert_eq!(
            (observations[0].phase, observations[0].exit_code),
            (RankPhase::Exited, Some(3))
        );
        let failed = RankReport {
            message: "exec python3: not found".into(),
            ..wire(&j, 0, 1, WirePhase::FailedToStart, 0)
        };
        let (observations, _) = changed_observations(&s, &id("node-1"), &[failed]);
        assert_eq!(observations[0].exit_code, None);
        assert_eq!(
            observations[0].message.as_deref(),
            Some("exec python3: not found")
        );
    }

    #[test]
    fn an_ended_job_is_idle_on_a_node_whose_agent_no_longer_reports_it() {
        let (mut s, job) = cluster_with_job();
        let j = job.to_string();
        let running = [
            wire(&j, 0, 0, WirePhase::Running, 0),
            wire(&j, 0, 1, WirePhase::Running, 0),
        ];
        apply_reports(&mut s, "node-1", &running);
        // A live job is never idle, reported or not.
        assert!(changed_observations(&s, &id("node-2"), &[]).1.is_empty());

        assert_eq!(
            s.apply(Command::CancelJob { job, at_ms: 11 }),
            CommandOutcome::Done
        );
        // Still running there: not idle. Exiting: an observation, not idle.
        assert!(changed_observations(&s, &id("node-1"), &running)
            .1
            .is_empty());
        let exits = [
            wire(&j, 0, 0, WirePhase::Exited, -15),
            wire(&j, 0, 1, WirePhase::Running, 0),
        ];
        let (observations, idle) = changed_observations(&s, &id("node-1"), &exits);
        assert_eq!((observations.len(), idle.len()), (1, 0));
        // Reporting nothing of it: idle, on each node that still holds a share.
        assert_eq!(changed_observations(&s, &id("node-1"), &[]).1, vec![job]);
        assert_eq!(changed_observations(&s, &id("node-2"), &[]).1, vec![job]);
        apply_reports(&mut s, "node-2", &[]);
        assert_eq!(s.nodes[&id("node-2")].usage, Default::default());
        assert!(
            changed_observations(&s, &id("node-2"), &[]).1.is_empty(),
            "a released share is not reported idle again"
        );
        assert_eq!(s.jobs[&job].state, JobState::Cancelled);
    }

    #[test]
    fn assignments_carry_the_torchrun_environment_of_each_rank() {
        let (mut s, job) = cluster_with_job();
        let allocation = s.jobs[&job].allocation.clone().unwrap();
        for (node, group_rank) in [("node-1", 0u32), ("node-2", 1)] {
            let assignments = assignments_for(&s, &id(node), 7000);
            assert_eq!(assignments.len(), 1, "{node}");
            let a = &assignments[0];
            assert_eq!(a.job_id, job.to_string());
            assert_eq!((a.attempt, a.stop_grace_ms), (0, 7000));
            assert_eq!(a.argv, ["python3", "train.py"]);
            let ranks: Vec<(u32, u32)> = a.ranks.iter().map(|r| (r.rank, r.local_rank)).collect();
            assert_eq!(ranks, [(group_rank * 2, 0), (group_rank * 2 + 1, 1)]);
            // The agent of group rank 0 serves the store at MASTER_ADDR:MASTER_PORT, for the
            // job's hosts only; the other agents serve none.
            let store = a
                .store
                .as_ref()
                .map(|s| (s.address.as_str(), s.port, s.peers.clone()));
            if group_rank == 0 {
                let peers = vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()];
                assert_eq!(store, Some(("10.0.0.1", 29500, peers)));
            } else {
                assert_eq!(store, None, "{node}");
            }
            // By UUID (the agent's own ordinals are wrong when it runs with CUDA_VISIBLE_DEVICES set).
            let gpus = &allocation.nodes[group_rank as usize].gpus;
            let visible = gpus
                .iter()
                .map(|index| format!("GPU-{}-{index}", group_rank + 1))
                .collect::<Vec<_>>()
                .join(",");
            for r in &a.ranks {
                let env = |k: &str| r.env.get(k).map(String::as_str);
                assert_eq!(env("RANK"), Some(r.rank.to_string().as_str()));
                assert_eq!(env("LOCAL_RANK"), Some(r.local_rank.to_string().as_str()));
                assert_eq!(env("WORLD_SIZE"), Some("4"));
                assert_eq!(env("LOCAL_WORLD_SIZE"), Some("2"));
                assert_eq!(env("GROUP_RANK"), Some(group_rank.to_string().as_str()));
                assert_eq!(env("MASTER_ADDR"), Some("10.0.0.1"));
                assert_eq!(env("MASTER_PORT"), Some("29500"));
                assert_eq!(env("TORCHELASTIC_USE_AGENT_STORE"), Some("True"));
                assert_eq!(env("CUDA_VISIBLE_DEVICES"), Some(visible.as_str()));
                assert_eq!(env("TRAINCTL_NODE_NAME"), Some(node));
                assert_eq!(
                    r.env_defaults.get("OMP_NUM_THREADS").map(String::as_str),
                    Some("1")
                );
            }
        }
        assert!(assignments_for(&s, &id("node-9"), 7000).is_empty());
        // An ended job is assigned nowhere: the agents stop its ranks.
        s.apply(Command::CancelJob { job, at_ms: 4 });
        assert!(assignments_for(&s, &id("node-1"), 7000).is_empty());
        assert!(assignments_for(&s, &id("node-2"), 7000).is_empty());
    }

    /// A registration of a host with two H200s and one RoCE NIC, every discovery field set.
    fn good_registration() -> RegisterRequest {
        use trainctl_proto::agent::{Gpu, NicAffinity, RdmaDevice, RdmaGid, RdmaPort};
        RegisterRequest {
            node_name: "node-1".into(),
            address: "10.0.0.1".into(),
            instance_id: "i-1".into(),
            resources: Some(HostResources {
                cpus: 64,
                containment: String::new(),
                memory_mib: 1 << 20,
                gpus: (0..2)
                    .map(|index| Gpu {
                        index,
                        name: "NVIDIA H200".into(),
                        memory_mib: 143_771,
                        uuid: format!("GPU-{index}"),
                        pci_bus_id: format!("0000:1{index}:00.0"),
                        numa_node: Some(0),
                        nic_affinity: vec![NicAffinity {
                            rdma_device: "mlx5_0".into(),
                            link: if index == 0 { "PIX" } else { "NODE" }.into(),
                        }],
                        mig_mode: "disabled".into(),
                        ecc_mode: "enabled".into(),
                        nvlink_peers: vec![format!("0000:1{}:00.0", 1 - index)],
                        retired_pages_pending: false,
                        uncorrectable_ecc_errors: 0,
                    })
                    .collect(),
                rdma_devices: vec![RdmaDevice {
                    name: "mlx5_0".into(),
                    ports: vec![RdmaPort {
                        port: 1,
                        state: "ACTIVE".into(),
                        link_layer: "Ethernet".into(),
                        rate: "400 Gb/sec".into(),
                        gid_count: 128,
                        netdev: "eth2".into(),
                        gids: vec![RdmaGid {
                            index: 3,
                            gid: "0000:0000:0000:0000:0000:ffff:0a00:0001".into(),
                            kind: "RoCE v2".into(),
                        }],
                    }],
                    pci_bus_id: "0000:1a:00.0".into(),
                    numa_node: Some(0),
                }],
                hostname: "Node-1.Example".into(),
                advertised_interface: "eth0".into(),
            }),
            port_range_start: 29500,
            port_range_end: 29599,
            agent_version: "test".into(),
            health: None,
        }
    }

    #[test]
    fn health_reports_become_the_states_verdict() {
        let report = |healthy: bool, reason: &str| HostHealth {
            healthy,
            reason: reason.into(),
        };
        let long = "é".repeat(HEALTH_REASON_BYTES_MAX);
        let cases: Vec<(HostHealth, Option<String>)> = vec![
            (report(true, ""), None),
            // A healthy verdict wins over a stray reason.
            (report(true, "ignored"), None),
            (
                report(false, " gpu-copy on GPU-1: slow "),
                Some("gpu-copy on GPU-1: slow".into()),
            ),
            (
                report(false, ""),
                Some("the agent reports a failed pre-flight check (no reason given)".into()),
            ),
            (
                report(false, &long),
                Some("é".repeat(HEALTH_REASON_BYTES_MAX / 2)),
            ),
        ];
        for (health, want) in cases {
            assert_eq!(unhealthy_reason(&health), want, "{health:?}");
        }
    }

    #[test]
    fn a_registration_becomes_the_states_resource_model() {
        let res = node_resources(good_registration().resources.unwrap());
        assert_eq!(res.advertised_interface, "eth0");
        let gpu = &res.gpus[0];
        assert_eq!(gpu.pci_bus_id, "0000:10:00.0");
        assert_eq!(gpu.numa_node, Some(0));
        assert_eq!(
            gpu.nic_affinity,
            [NicAffinity {
                rdma_device: "mlx5_0".into(),
                link: PcieLink::Pix
            }]
        );
        assert_eq!(res.gpus[1].nic_affinity[0].link, PcieLink::Node);
        assert_eq!(
            (gpu.mig_mode.as_str(), gpu.ecc_mode.as_str()),
            ("disabled", "enabled")
        );
        assert_eq!(gpu.nvlink_peers, ["0000:11:00.0"]);
        let nic = &res.rdma_devices[0];
        assert_eq!(
            (nic.pci_bus_id.as_str(), nic.numa_node),
            ("0000:1a:00.0", Some(0))
        );
        assert_eq!(nic.ports[0].netdev, "eth2");
        assert_eq!(
            nic.ports[0].gids,
            [RdmaGid {
                index: 3,
                gid: "0000:0000:0000:0000:0000:ffff:0a00:0001".into(),
                kind: "RoCE v2".into()
            }]
        );
    }

    #[test]
    fn a_gpu_reported_by_another_node_that_is_up_is_refused() {
        use trainctl_proto::agent::Gpu;
        let (mut s, _) = cluster_with_job();
        let gpu = |uuid: &str| Gpu {
            uuid: uuid.into(),
            ..Default::default()
        };
        let cases = [
            (
                "node-3",
                vec![gpu("GPU-1-2")],
                Some("`GPU-1-2` is already reported by node node-1"),
            ),
            ("node-3", vec![gpu("GPU-3-0")], None),
            ("node-1", vec![gpu("GPU-1-2")], None),
            ("node-3", vec![gpu("declared-gpu-0"), gpu("")], None),
        ];
        for (node, gpus, want) in &cases {
            let got = gpu_held_elsewhere(&s.nodes, &id(node), gpus);
            match want {
                Some(words) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(words)),
                    "{node}: {got:?}"
                ),
                None => assert_eq!(got, None, "{node}"),
            }
        }
        // Once node-1 is down its GPUs may register elsewhere (the agent retries).
        s.apply(Command::NodeLost {
            node: id("node-1"),
            reason: "test".into(),
            at_ms: 10,
        });
        assert_eq!(
            gpu_held_elsewhere(&s.nodes, &id("node-3"), &[gpu("GPU-1-2")]),
            None
        );
    }

    #[test]
    fn pci_bus_ids_in_sysfs_form_only() {
        for ok in ["0000:1b:00.0", "0000:db:1f.7", "10000:01:00.0"] {
            assert_eq!(pci_bus_id_problem(ok), None, "{ok}");
        }
        let bad = [
            ("00000000:1B:00.0", "bus"),
            ("0000:1b:00", "`.`"),
            ("1b:00.0", "`:` after the bus"),
            ("000:1b:00.0", "domain"),
            ("0000:1b:20.0", "device"),
            ("0000:1b:00.8", "function"),
            ("", "`:`"),
        ];
        for (id, words) in bad {
            let problem = pci_bus_id_problem(id).unwrap_or_default();
            assert!(problem.contains(words), "{id}: {problem}");
        }
    }

    #[test]
    fn registrations_with_bad_fields_are_refused() {
        let good = good_registration();
        assert!(validate_register(&good).is_ok());
        for name in ["a", "node_1.rack-2", &"x".repeat(NODE_NAME_CHARS_MAX)] {
            assert_eq!(node_name_problem(name), None, "{name}");
        }
        // GPUs without uuids (declared with --gpus) are not duplicates of each other.
        let mut no_uuids = good.clone();
        for g in &mut no_uuids.resources.as_mut().unwrap().gpus {
            g.uuid.clear();
        }
        assert!(validate_register(&no_uuids).is_ok());
        type Break = fn(&mut RegisterRequest);
        fn res(r: &mut RegisterRequest) -> &mut HostResources {
            r.resources.as_mut().unwrap()
        }
        let cases: &[(Break, &str)] = &[
            (|r| r.node_name.clear(), "node_name is empty"),
            (|r| r.node_name = "n".repeat(64), "64 characters"),
            (|r| r.node_name = "Node-1".into(), "--name node-1"),
            (|r| r.node_name = "node\x1b[31m".into(), "\\u{1b}"),
            (|r| r.node_name = "node 1".into(), "node_name"),
            (|r| r.node_name = "-node".into(), "starts or ends"),
            (|r| r.node_name = "node.".into(), "starts or ends"),
            (|r| r.node_name = "nöde".into(), "a-z, 0-9"),
            (|r| r.address = "node-1.example".into(), "not an IP address"),
            (|r| r.instance_id.clear(), "instance_id"),
            (|r| r.instance_id = "i".repeat(129), "instance_id"),
            (|r| r.agent_version = "v\x07".into(), "agent_version"),
            (|r| r.port_range_start = 0, "port range"),
            (|r| r.port_range_end = 70000, "port range"),
            (|r| r.port_range_end = 29000, "port range"),
            (|r| res(r).cpus = u32::MAX, "resources.cpus"),
            (|r| res(r).memory_mib = u64::MAX, "resources.memory_mib"),
            (
                |r| res(r).hostname = "h\x1b]0;pwned\x07".into(),
                "resources.hostname",
            ),
            (|r| res(r).hostname = "h".repeat(254), "resources.hostname"),
            (
                |r| res(r).containment = "cgroup2\x1b[2J".into(),
                "resources.containment",
            ),
            (
                |r| res(r).containment = "c".repeat(513),
                "resources.containment",
            ),
            (
                |r| {
                    let g = res(r).gpus[0].clone();
                    res(r).gpus = vec![g; 100_000];
                },
                "resources.gpus lists 100000",
            ),
            (|r| res(r).gpus[1].index = 0, "index 0 is listed twice"),
            (|r| res(r).gpus[1].index = 5000, "index 5000"),
            (
                |r| res(r).gpus[1].uuid = "GPU-0".into(),
                "uuid `GPU-0` is listed twice",
            ),
            (
                |r| res(r).gpus[0].name = "\x1b[2J".into(),
                "resources.gpus.name",
            ),
            (
                |r| res(r).gpus[0].uuid = "u".repeat(129),
                "resources.gpus.uuid",
            ),
            (
                |r| res(r).gpus[0].memory_mib = u64::MAX,
                "resources.gpus.memory_mib",
            ),
            (
                |r| {
                    let d = res(r).rdma_devices[0].clone();
                    res(r).rdma_devices = vec![d; 257];
                },
                "resources.rdma_devices lists 257",
            ),
            (
                |r| {
                    let d = res(r).rdma_devices[0].clone();
                    res(r).rdma_devices.push(d);
                },
                "listed twice",
            ),
            (
                |r| res(r).rdma_devices[0].name.clear(),
                "resources.rdma_devices.name",
            ),
            (
                |r| {
                    let p = res(r).rdma_devices[0].ports[0].clone();
                    res(r).rdma_devices[0].ports = vec![p; 257];
                },
                "resources.rdma_devices.ports",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].rate = "\n".into(),
                "ports.rate",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].gid_count = u32::MAX,
                "gid_count",
            ),
            (
                |r| res(r).gpus[0].pci_bus_id = "00000000:1B:00.0".into(),
                "resources.gpus.pci_bus_id `00000000:1B:00.0`",
            ),
            (
                |r| res(r).gpus[1].pci_bus_id = "0000:10:00.0".into(),
                "pci_bus_id `0000:10:00.0` is listed twice",
            ),
            (
                |r| res(r).gpus[0].numa_node = Some(5000),
                "resources.gpus.numa_node is 5000",
            ),
            (
                |r| res(r).gpus[0].mig_mode = "m".repeat(33),
                "resources.gpus.mig_mode",
            ),
            (
                |r| res(r).gpus[0].ecc_mode = "on\x1b".into(),
                "resources.gpus.ecc_mode",
            ),
            (
                |r| res(r).gpus[0].nvlink_peers = vec!["0000:11:00.0".into(); 65],
                "nvlink_peers of GPU 0 lists 65",
            ),
            (
                |r| res(r).gpus[0].nvlink_peers = vec![String::new()],
                "empty bus id",
            ),
            (
                |r| res(r).gpus[0].nvlink_peers = vec!["GPU-1".into()],
                "resources.gpus.nvlink_peers `GPU-1`",
            ),
            (
                |r| res(r).gpus[0].nic_affinity[0].link = "NV12".into(),
                "link `NV12` of GPU 0 is not a PCIe link word",
            ),
            (
                |r| res(r).gpus[0].nic_affinity[0].rdma_device = "mlx5_9".into(),
                "names RDMA device `mlx5_9`, which is not in resources.rdma_devices",
            ),
            (
                |r| {
                    let a = res(r).gpus[0].nic_affinity[0].clone();
                    res(r).gpus[0].nic_affinity.push(a);
                },
                "lists RDMA device `mlx5_0` twice",
            ),
            (
                |r| {
                    let a = res(r).gpus[0].nic_affinity[0].clone();
                    res(r).gpus[0].nic_affinity = vec![a; 257];
                },
                "nic_affinity of GPU 0 lists 257",
            ),
            (
                |r| res(r).rdma_devices[0].pci_bus_id = "mlx5".into(),
                "resources.rdma_devices.pci_bus_id",
            ),
            (
                |r| res(r).rdma_devices[0].numa_node = Some(1024),
                "resources.rdma_devices.numa_node is 1024",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].netdev = "eth0:1".into(),
                "resources.rdma_devices.ports.netdev `eth0:1`",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].netdev = "a-very-long-name".into(),
                "resources.rdma_devices.ports.netdev",
            ),
            (
                |r| res(r).advertised_interface = "eth0\n".into(),
                "resources.advertised_interface",
            ),
            (
                |r| {
                    let g = res(r).rdma_devices[0].ports[0].gids[0].clone();
                    res(r).rdma_devices[0].ports[0].gids = vec![g; 257];
                },
                "lists 257 GIDs",
            ),
            (
                |r| {
                    let g = res(r).rdma_devices[0].ports[0].gids[0].clone();
                    res(r).rdma_devices[0].ports[0].gids.push(g);
                },
                "index 3 of `mlx5_0` port 1 is listed twice",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].gids[0].gid = "fe80::1".into(),
                "gid `fe80::1` of `mlx5_0` port 1 is not a GID",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].gids[0].index = 70_000,
                "gids index 70000",
            ),
            (
                |r| res(r).rdma_devices[0].ports[0].gids[0].kind = "RoCE\x07".into(),
                "resources.rdma_devices.ports.gids.kind",
            ),
        ];
        for (make_bad, words) in cases {
            let mut r = good.clone();
            make_bad(&mut r);
            let status = validate_register(&r).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(words), "{}", status.message());
        }
    }
}

#[cfg(test)]
mod register_fuzz;

#[cfg(test)]
mod leader_tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, LogId, Membership, ServerState, StoredMembership};

    use super::*;

    /// Raft metrics of coordinator `me` in a group of voters 1 and 2 and learner 3
    /// (`10.0.0.<id>:7470`), with `leader` as the leader it knows.
    fn metrics(me: ServerId, leader: Option<ServerId>) -> RaftMetrics<ServerId, BasicNode> {
        let nodes: BTreeMap<ServerId, BasicNode> = (1..=3)
            .map(|i| (i, BasicNode::new(format!("10.0.0.{i}:7470"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        let mut m = RaftMetrics::new_initial(me);
        m.state = if leader == Some(me) {
            ServerState::Leader
        } else {
            ServerState::Follower
        };
        m.current_leader = leader;
        let log_id = LogId::new(CommittedLeaderId::new(2, 1), 1);
        m.membership_config = Arc::new(StoredMembership::new(Some(log_id), membership));
        m
    }

    fn leader_hint(status: &Status) -> Option<String> {
        status
            .metadata()
            .get(LEADER_METADATA_KEY)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn only_the_leader_serves_agents_and_the_others_name_it() {
        // (this coordinator, the leader it knows, served?, the hint in the answer)
        let cases: [(ServerId, Option<ServerId>, bool, Option<&str>); 5] = [
            (1, Some(1), true, None),
            (2, Some(1), false, Some("10.0.0.1:7470")),
            (3, Some(2), false, Some("10.0.0.2:7470")),
            (2, None, false, None),
            // A leader id outside the membership this coordinator has seen: no address to give.
            (2, Some(9), false, None),
        ];
        for (me, leader, served, hint) in cases {
            let answer = serving_check(&metrics(me, leader));
            assert_eq!(answer.is_ok(), served, "me {me}, leader {leader:?}");
            if let Err(status) = answer {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(
                    status
                        .message()
                        .starts_with("this coordinator is not the leader"),
                    "{}",
                    status.message()
                );
                assert_eq!(leader_hint(&status).as_deref(), hint, "me {me}");
            }
        }
    }

    #[test]
    fn a_write_refused_for_want_of_leadership_names_the_leader_too() {
        let status = write_status(WriteError::NotLeader {
            leader: Some("10.0.0.2:7470".into()),
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&status).as_deref(), Some("10.0.0.2:7470"));
        assert!(status.message().contains("10.0.0.2:7470"));
        let status = write_status(WriteError::NotLeader { leader: None });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&status), None);
        // An address that cannot be metadata is left out rather than sent broken.
        let status = not_leader_status(Some("bad\naddress"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&status), None);
    }

    #[test]
    fn heartbeats_list_every_member_voters_and_learners() {
        assert_eq!(
            member_addresses(&metrics(2, Some(1))),
            ["10.0.0.1:7470", "10.0.0.2:7470", "10.0.0.3:7470"]
        );
    }
}
