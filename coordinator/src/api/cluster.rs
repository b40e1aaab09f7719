//! `GET /v1/cluster`: the coordinators of the Raft group as the answering one sees them: members,
//! roles, the leader, the term, log indices and each member's replication lag (in the manner of
//! Nomad's `operator raft list-peers` and etcd's `member list`), and the membership changes
//! (join, add, remove, leadership transfer) of [`crate::membership`], admin only, on the leader
//! (a follower forwards them).

use axum::extract::State;
use axum::Json;
use openraft::{BasicNode, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Ctx, ErrorBody};
use crate::raft::ServerId;

/// A coordinator named by its Raft id and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerRef {
    /// Its Raft server id.
    pub id: ServerId,
    /// The address (host:port) other coordinators reach it at, as recorded in the membership;
    /// empty if the membership does not name it.
    pub address: String,
}

/// One member of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    /// Its Raft server id.
    pub id: ServerId,
    /// The address (host:port) other coordinators reach it at.
    pub address: String,
    /// `leader`, `follower` or `learner` (a non-voting member); the answering server names its own
    /// state, which may also be `candidate` (an election in progress) or `shutdown`.
    pub role: String,
    /// Whether it votes (counts towards the quorum).
    pub voter: bool,
    /// Whether it is the coordinator that answered.
    pub this_server: bool,
    /// The newest log index known to be in its log: the answering server's own last index for
    /// itself, the leader's matched index for the others; `null` where the answering server can not
    /// know (it is not the leader) or the member has nothing yet.
    pub last_log_index: Option<u64>,
    /// The newest log index the leader knows this member holds (its replication progress); only
    /// the leader knows this, so it is `null` on other coordinators, and for the leader itself.
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader's log (the leader's last log index minus its
    /// `last_log_index`); 0 for the leader; `null` where unknown (the answering server is not the
    /// leader, or the leader has not yet heard which entries it holds).
    pub lag: Option<u64>,
}

/// The Raft group of coordinators as the answering one sees it; `trainctl cluster -o json` prints
/// it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    /// The id the first leader gave this cluster's state (agents check it); `null` before it did.
    pub cluster_id: Option<String>,
    /// The Raft id of the coordinator that answered.
    pub this_server: ServerId,
    /// The current leader, or `null` while none is known (an election is under way).
    pub leader: Option<ServerRef>,
    /// The Raft term the answering server is in.
    pub term: u64,
    /// The index of the newest entry in the answering server's log (`null`: an empty log).
    pub last_log_index: Option<u64>,
    /// The index of the newest entry the answering server applied to its state (`null`: none).
    pub last_applied_index: Option<u64>,
    /// The newest log index covered by the answering server's snapshot (`null`: no snapshot).
    pub snapshot_index: Option<u64>,
    /// The log index of the membership configuration in force (`null`: not yet initialized).
    pub membership_index: Option<u64>,
    /// Leader only: milliseconds since a quorum last acknowledged its leadership; `null` on other
    /// coordinators or before the first acknowledgement.
    pub millis_since_quorum_ack: Option<u64>,
    /// Every member of the current membership (voters and learners), by id.
    pub members: Vec<MemberView>,
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// The cluster as `metrics` (this coordinator's Raft metrics) describe it. Pure.
pub fn cluster_view(
    metrics: &RaftMetrics<ServerId, BasicNode>,
    cluster_id: Option<String>,
) -> ClusterView {
    let membership = metrics.membership_config.membership();
    let voters: std::collections::BTreeSet<ServerId> = membership.voter_ids().collect();
    let address = |id: &ServerId| {
        membership
            .get_node(id)
            .map(|n| n.addr.clone())
            .unwrap_or_default()
    };
    let me = metrics.id;
    let leading = metrics.state == ServerState::Leader && metrics.current_leader == Some(me);
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let id = *id;
            let voter = voters.contains(&id);
            let role = if id == me {
                role_name(metrics.state)
            } else if metrics.current_leader == Some(id) {
                "leader"
            } else if voter {
                "follower"
            } else {
                "learner"
            };
            let matched_index = if leading && id != me {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map(|l| l.index)
            } else {
                None
            };
            let last_log_index = if id == me {
                metrics.last_log_index
            } else {
                matched_index
            };
            let lag = match (leading, metrics.last_log_index, last_log_index) {
                (true, Some(leader), Some(member)) => Some(leader.saturating_sub(member)),
                _ => None,
            };
            MemberView {
                id,
                address: node.addr.clone(),
                role: role.to_string(),
                voter,
                this_server: id == me,
                last_log_index,
                matched_index,
                lag,
            }
        })
        .collect();
    ClusterView {
        cluster_id,
        this_server: me,
        leader: metrics.current_leader.map(|id| ServerRef {
            address: address(&id),
            id,
        }),
        term: metrics.current_term,
        last_log_index: metrics.last_log_index,
        last_applied_index: metrics.last_applied.map(|l| l.index),
        snapshot_index: metrics.snapshot.map(|l| l.index),
        membership_index: metrics.membership_config.log_id().map(|l| l.index),
        millis_since_quorum_ack: metrics.millis_since_quorum_ack,
        members,
    }
}

/// The coordinators of the Raft group: members, roles, the leader, the term, log indices and lag,
/// as the answering coordinator sees them (only the leader knows the others' progress).
#[utoipa::path(get, path = "/v1/cluster", security(("bearer" = [])),
    responses((status = 200, body = ClusterView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn cluster(State(c): Ctx) -> Json<ClusterView> {
    let metrics = c.raft.metrics().borrow().clone();
    let cluster_id = c.state.read(|s| s.cluster_id.clone());
    Json(cluster_view(&metrics, cluster_id))
}

/// Records a membership change (or its refusal) in the audit trail; best effort: the change
/// itself already happened or failed.
async fn audit<T>(
    c: &crate::server::Coordinator,
    who: &crate::auth::Principal,
    change: String,
    result: &Result<T, ApiError>,
) {
    let refused = result.as_ref().err().map(|e| e.to_string());
    let command = crate::state::Command::MembershipChanged { change, refused };
    if let Err(e) = c.write_as(who, command).await {
        tracing::warn!(error = %e, "could not record a membership change in the audit trail");
    }
}

fn view_of(c: &crate::server::Coordinator) -> ClusterView {
    let metrics = c.raft.metrics().borrow().clone();
    cluster_view(&metrics, c.state.read(|s| s.cluster_id.clone()))
}

/// A new coordinator's grant (step 1 of `trainctl coordinator --join`): its server id, the cluster
/// id, the cluster CA and the peer secret. The coordinator then serves, and asks to be added.
#[utoipa::path(post, path = "/v1/cluster/join", security(("bearer" = [])),
    request_body = crate::membership::JoinRequest,
    responses((status = 200, body = crate::membership::JoinGrant), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(super) async fn join(
    State(c): Ctx,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    body: Result<Json<crate::membership::JoinRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::membership::JoinGrant>, ApiError> {
    let request = super::access::json_body(body)?;
    let grant = c.grant_join(&request.address).await;
    let change = format!(
        "grant coordinator at {} a place in the cluster",
        request.address
    );
    audit(&c, &who, change, &grant).await;
    let mut grant = grant?;
    grant.members.sort_by_key(|m| m.id);
    Ok(Json(grant))
}

/// Adds the coordinator serving at `address` (started with this cluster's grant) as a learner,
/// waits until it caught up with the log, and makes it a voter. Answers the new membership.
#[utoipa::path(post, path = "/v1/cluster/members", security(("bearer" = [])),
    request_body = crate::membership::AddMemberRequest,
    responses((status = 200, body = ClusterView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(super) async fn add_member(
    State(c): Ctx,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    body: Result<
        Json<crate::membership::AddMemberRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<Json<ClusterView>, ApiError> {
    let request = super::access::json_body(body)?;
    let added = c.add_member(&request.address).await;
    let change = format!("add coordinator at {} as a voter", request.address);
    audit(&c, &who, change, &added).await;
    added?;
    Ok(Json(view_of(&c)))
}

/// Removes member `id` (a dead server, or one going away). Its messages are refused from then on.
#[utoipa::path(delete, path = "/v1/cluster/members/{id}", security(("bearer" = [])),
    params(("id" = u64, Path, description = "the member's server id")),
    responses((status = 200, body = ClusterView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn remove_member(
    State(c): Ctx,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    let id: ServerId = id.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "`{id}` is not a server id (a number; see `trainctl cluster`)"
        ))
    })?;
    let removed = c.remove_member(id).await;
    audit(&c, &who, format!("remove coordinator {id}"), &removed).await;
    removed?;
    Ok(Json(view_of(&c)))
}

/// Hands leadership to voter `id` (before maintenance of the leader's host).
#[utoipa::path(post, path = "/v1/cluster/leader", security(("bearer" = [])),
    request_body = crate::membership::TransferLeaderRequest,
    responses((status = 200, body = ClusterView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(super) async fn transfer_leader(
    State(c): Ctx,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    body: Result<
        Json<crate::membership::TransferLeaderRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<Json<ClusterView>, ApiError> {
    let request = super::access::json_body(body)?;
    // Recorded before: once leadership moved, this coordinator can no longer write.
    let change = format!("hand leadership to coordinator {}", request.id);
    audit(&c, &who, change, &Ok::<(), ApiError>(())).await;
    c.transfer_leadership(request.id).await?;
    Ok(Json(view_of(&c)))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership, Vote};

    use super::*;

    fn log_id(index: u64) -> LogId<ServerId> {
        LogId::new(CommittedLeaderId::new(2, 1), index)
    }

    fn metrics(
        me: ServerId,
        state: ServerState,
        replication: Option<BTreeMap<ServerId, Option<LogId<ServerId>>>>,
    ) -> RaftMetrics<ServerId, BasicNode> {
        let nodes: BTreeMap<ServerId, BasicNode> = (1..=3)
            .map(|i| (i, BasicNode::new(format!("10.0.0.{i}:7470"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        let mut m = RaftMetrics::new_initial(me);
        m.state = state;
        m.current_leader = Some(1);
        m.current_term = 2;
        m.vote = Vote::new_committed(2, 1);
        m.last_log_index = Some(10);
        m.last_applied = Some(log_id(9));
        m.membership_config = Arc::new(StoredMembership::new(Some(log_id(1)), membership));
        m.replication = replication;
        m
    }

    #[test]
    fn the_leader_knows_everyones_lag() {
        let replication = BTreeMap::from([(1, Some(log_id(10))), (2, Some(log_id(7))), (3, None)]);
        let view = cluster_view(
            &metrics(1, ServerState::Leader, Some(replication)),
            Some("c".into()),
        );
        assert_eq!(
            view.leader,
            Some(ServerRef {
                id: 1,
                address: "10.0.0.1:7470".into()
            })
        );
        assert_eq!((view.term, view.last_log_index), (2, Some(10)));
        assert_eq!(view.last_applied_index, Some(9));
        assert_eq!(view.membership_index, Some(1));
        let rows: Vec<_> = view
            .members
            .iter()
            .map(|m| (m.id, m.role.as_str(), m.voter, m.last_log_index, m.lag))
            .collect();
        assert_eq!(
            rows,
            [
                (1, "leader", true, Some(10), Some(0)),
                (2, "follower", true, Some(7), Some(3)),
                (3, "learner", false, None, None),
            ]
        );
    }

    #[test]
    fn a_follower_says_what_it_can_not_know() {
        let view = cluster_view(&metrics(2, ServerState::Follower, None), None);
        assert_eq!(view.this_server, 2);
        assert_eq!(view.leader.as_ref().map(|l| l.id), Some(1));
        let rows: Vec<_> = view
            .members
            .iter()
            .map(|m| {
                (
                    m.id,
                    m.role.as_str(),
                    m.this_server,
                    m.last_log_index,
                    m.lag,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (1, "leader", false, None, None),
                (2, "follower", true, Some(10), None),
                (3, "learner", false, None, None),
            ]
        );
    }
}
