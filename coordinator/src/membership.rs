//! Who this coordinator is in its Raft group, and how the group changes.
//!
//! - **Bootstrap**: the first coordinator of a cluster initialises a one-voter group (server id 1)
//!   and names the cluster.
//! - **Join** (`trainctl coordinator --join ADDR --token ADMIN`): a coordinator with an empty data
//!   dir asks the leader for a grant (`POST /v1/cluster/join`: a server id, the cluster id, the
//!   cluster CA and the peer secret), stores it, starts serving, then asks to be added
//!   (`POST /v1/cluster/members`). The leader checks who answers at that address (a signed
//!   `/internal/raft/identity`: the same cluster, the granted id), adds it as a learner, waits until
//!   it caught up, and promotes it to voter.
//! - **Remove** (`DELETE /v1/cluster/members/{id}`) and **transfer leadership**
//!   (`POST /v1/cluster/leader`).
//!
//! A removed server can not disturb the group: every Raft message must come from a member of the
//! current membership (see `raft::peer_auth`).
//!
//! Who this server is lives in `<data-dir>/server.json` (`{"server_id", "cluster_id"}`).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::cluster::ServerRef;
use crate::api::ApiError;
use crate::raft::peer_auth::{PeerSecret, PEER_HEADER};
use crate::raft::ServerId;
use crate::server::{now_ms, Coordinator};

/// The file in the data dir naming this server (its Raft id and its cluster).
pub const SERVER_FILE: &str = "server.json";

/// Who this coordinator is: its Raft server id and the cluster it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdentity {
    pub server_id: ServerId,
    /// `None` for a bootstrapped server until its cluster is named.
    pub cluster_id: Option<String>,
}

impl ServerIdentity {
    /// Reads `<data_dir>/server.json`; `None` if there is none.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = data_dir.join(SERVER_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not a server identity", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Writes `<data_dir>/server.json` (atomically: a new file renamed over the old).
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join(SERVER_FILE);
        let tmp = data_dir.join(format!("{SERVER_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }
}

/// How a coordinator whose data dir holds no cluster yet starts.
#[derive(Debug, Clone, Default)]
pub enum ClusterStart {
    /// A new cluster with this server as its only voter (`--bootstrap`, and the default).
    #[default]
    Bootstrap,
    /// Join the cluster of these coordinators (`--join`).
    Join(JoinTarget),
}

/// Where and how to join an existing cluster.
#[derive(Debug, Clone)]
pub struct JoinTarget {
    /// URLs of one or more of its coordinators (`https://host:port`, or `http://` for an
    /// `--insecure` cluster).
    pub addresses: Vec<String>,
    /// An admin token of the cluster (needed unless it runs `--insecure`).
    pub token: Option<String>,
    /// The cluster CA certificate (PEM) to trust its coordinators by.
    pub ca_pem: Option<String>,
}

/// `POST /v1/cluster/join`'s body: the address the new coordinator serves at.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// host:port other coordinators and agents reach the new coordinator at.
    pub address: String,
}

/// What a joining coordinator needs to become a member: its id, the cluster's id, the cluster CA
/// (certificate and key, to serve and to admit agents) and the peer secret (to sign Raft
/// messages). Only admins get it, over TLS.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinGrant {
    /// The Raft server id the new coordinator takes.
    pub server_id: ServerId,
    /// The cluster's id.
    pub cluster_id: String,
    /// The cluster CA's certificate (PEM); `null` for an `--insecure` cluster.
    pub ca_cert_pem: Option<String>,
    /// The cluster CA's private key (PEM); `null` for an `--insecure` cluster.
    pub ca_key_pem: Option<String>,
    /// The cluster's peer secret, hex.
    pub peer_secret: String,
    /// The members now.
    pub members: Vec<ServerRef>,
}

/// `POST /v1/cluster/members`'s body: add the coordinator serving at `address`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// host:port of a coordinator started with this cluster's credentials (`--join`).
    pub address: String,
}

/// `POST /v1/cluster/leader`'s body: the member to hand leadership to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferLeaderRequest {
    /// Its server id.
    pub id: ServerId,
}

/// What a coordinator says about itself to a signed `identity` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub server_id: ServerId,
    pub cluster_id: Option<String>,
}

/// `hold-elections`' body: do not start an election for this long.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldElections {
    pub ms: u64,
}

/// Signed HTTP(S) calls to other coordinators (membership messages and forwarded requests).
#[derive(Clone)]
pub struct PeerClient {
    pub http: reqwest::Client,
    /// `https` or `http` (`--insecure`).
    pub scheme: &'static str,
    secret: PeerSecret,
    from: ServerId,
}

impl PeerClient {
    /// A client that trusts `tls` (the cluster CA, presenting this server's certificate), or plain
    /// HTTP without it.
    pub fn new(
        secret: PeerSecret,
        from: ServerId,
        tls: Option<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        let (http, scheme) = match tls {
            Some(config) => (builder.tls_backend_preconfigured(config).build()?, "https"),
            None => (builder.build()?, "http"),
        };
        Ok(PeerClient {
            http,
            scheme,
            secret,
            from,
        })
    }

    /// The base URL of a member recorded as `addr` (host:port, or a URL).
    pub fn base_url(&self, addr: &str) -> String {
        let addr = addr.trim_end_matches('/');
        if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{}://{addr}", self.scheme)
        }
    }

    /// Sends the signed message `kind` (`/internal/raft/{kind}`) with `body` to the member at
    /// `addr`; returns its JSON answer.
    pub async fn call<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        kind: &str,
        body: &Req,
        timeout: Duration,
    ) -> anyhow::Result<Resp> {
        let route = format!("/internal/raft/{kind}");
        let body = serde_json::to_vec(body)?;
        let signature = self.secret.sign(self.from, now_ms(), &route, &body);
        let url = format!("{}{route}", self.base_url(addr));
        let response = self
            .http
            .post(&url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(PEER_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            let text = serde_json::from_slice::<crate::api::ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{url} answered {status}: {text}");
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{url} answered {status} with {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }
}

/// An error with its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A server id never used in this cluster: above every member's and every id granted but not yet
/// added, and above the leader's last log index `log_index` (every removed member's id was granted
/// at a lower index, so a removed server's id is never handed out again).
pub fn next_server_id(
    members: &BTreeSet<ServerId>,
    granted: &BTreeSet<ServerId>,
    log_index: u64,
) -> ServerId {
    let above_known = members.iter().chain(granted).copied().max().unwrap_or(0) + 1;
    above_known.max(log_index + 1)
}

/// How long a joining member may take to catch up before the add fails.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the others hold their elections while leadership moves.
pub const TRANSFER_HOLD: Duration = Duration::from_secs(3);

fn members_of(c: &Coordinator) -> Vec<ServerRef> {
    let metrics = c.raft.metrics().borrow().clone();
    metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| ServerRef {
            id: *id,
            address: node.addr.clone(),
        })
        .collect()
}

impl Coordinator {
    /// On the leader: a grant for a new coordinator serving at `address`.
    pub async fn grant_join(&self, address: &str) -> Result<JoinGrant, ApiError> {
        let address = normalize_address(address)?;
        let members = members_of(self);
        if let Some(m) = members.iter().find(|m| m.address == address) {
            return Err(ApiError::Conflict(format!(
                "server {} is already a member at {address}: to replace it (a wiped or new host), \
                 remove it first with `trainctl cluster remove {}`",
                m.id, m.id
            )));
        }
        let cluster_id = self
            .state
            .read(|s| s.cluster_id.clone())
            .ok_or_else(|| ApiError::Internal("the cluster has no id yet".into()))?;
        let server_id = {
            let mut granted = self.granted_ids.lock().unwrap_or_else(|e| e.into_inner());
            let ids: BTreeSet<ServerId> = members.iter().map(|m| m.id).collect();
            let log_index = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            let id = next_server_id(&ids, &granted, log_index);
            granted.insert(id);
            id
        };
        let (ca_cert_pem, ca_key_pem) = match &self.cluster_ca {
            Some(ca) => (Some(ca.cert_pem().to_string()), Some(ca.key_pem())),
            None => (None, None),
        };
        Ok(JoinGrant {
            server_id,
            cluster_id,
            ca_cert_pem,
            ca_key_pem,
            peer_secret: self.peer_secret.to_hex(),
            members,
        })
    }

    /// On the leader: adds the coordinator serving at `address` as a learner, waits until it has
    /// caught up, and makes it a voter. Adding a voter that is already one at that address is a
    /// no-op.
    pub async fn add_member(&self, address: &str) -> Result<(), ApiError> {
        let address = normalize_address(address)?;
        let identity: PeerIdentity = self
            .peers
            .call(
                &address,
                "identity",
                &serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "could not confirm a coordinator of this cluster at {address}: {e:#} \
                     (start it with `trainctl coordinator --join` and this cluster's admin token)"
                ))
            })?;
        let cluster_id = self.state.read(|s| s.cluster_id.clone());
        if identity.cluster_id.is_some() && identity.cluster_id != cluster_id {
            return Err(ApiError::Conflict(format!(
                "the coordinator at {address} belongs to cluster {}, not this cluster {}",
                identity.cluster_id.unwrap_or_default(),
                cluster_id.unwrap_or_default()
            )));
        }
        let id = identity.server_id;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if let Some(node) = membership.get_node(&id) {
            if node.addr != address {
                return Err(ApiError::Conflict(format!(
                    "server id {id} is already a member at {}; remove it first to add {address}",
                    node.addr
                )));
            }
            if membership.voter_ids().any(|v| v == id) {
                return Ok(());
            }
        }
        let _serial = self.membership_change.lock().await;
        let added = tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            self.raft.add_learner(id, BasicNode::new(&address), true),
        )
        .await
        .map_err(|_| {
            ApiError::Internal(format!(
                "server {id} at {address} did not catch up within {}s",
                CATCH_UP_TIMEOUT.as_secs()
            ))
        })?;
        added.map_err(membership_error)?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        self.granted_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        tracing::info!(id, %address, "added a voter");
        Ok(())
    }

    /// On the leader: removes member `id` (a voter or a learner). The last voter can not go.
    pub async fn remove_member(&self, id: ServerId) -> Result<(), ApiError> {
        let _serial = self.membership_change.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(ApiError::NotFound(format!(
                "server {id} is not a member (see `trainctl cluster`)"
            )));
        }
        let voters: BTreeSet<ServerId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ApiError::Conflict(format!(
                    "server {id} is the only voter; a cluster needs one"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(membership_error)?;
        tracing::info!(id, "removed a member");
        Ok(())
    }

    /// On the leader: hands leadership to voter `to` (maintenance of this server). Writes pause;
    /// the other voters hold their elections for a moment; this leader stops its heartbeats until
    /// their leases run out; then `to` campaigns, with a log at least as new as anyone's.
    pub async fn transfer_leadership(&self, to: ServerId) -> Result<(), ApiError> {
        let me = self.config.server_id;
        if to == me {
            return Ok(());
        }
        let _serial = self.membership_change.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let Some(target) = membership.get_node(&to).cloned() else {
            return Err(ApiError::NotFound(format!("server {to} is not a member")));
        };
        if !membership.voter_ids().any(|v| v == to) {
            return Err(ApiError::Conflict(format!(
                "server {to} is a learner; only a voter can lead"
            )));
        }
        // Pause writes, so nothing new refreshes the followers' leases or outruns `to`'s log.
        let _paused = self.write_pause.write().await;
        let last = self.raft.metrics().borrow().last_log_index;
        let caught_up = self
            .raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&to).cloned().flatten())
                        .map(|l| l.index)
                        >= last
                },
                "the new leader holds the whole log",
            )
            .await;
        if caught_up.is_err() {
            return Err(ApiError::Write(crate::server::WriteError::Raft(format!(
                "server {to} did not catch up with the log within 5s; leadership stays"
            ))));
        }
        let hold = HoldElections {
            ms: TRANSFER_HOLD.as_millis() as u64,
        };
        for (id, node) in membership.nodes() {
            if *id != me && *id != to {
                let _ = self
                    .peers
                    .call::<_, serde_json::Value>(
                        &node.addr,
                        "hold-elections",
                        &hold,
                        Duration::from_secs(1),
                    )
                    .await;
            }
        }
        // Held through the hand-over, and for TRANSFER_HOLD after it (below).
        self.elections
            .hold_for(TRANSFER_HOLD + Duration::from_secs(4));
        self.raft.runtime_config().heartbeat(false);
        // The followers' leases (election_timeout_max) run out without heartbeats.
        tokio::time::sleep(Duration::from_millis(
            self.raft.config().election_timeout_max + 100,
        ))
        .await;
        let asked = self
            .peers
            .call::<_, serde_json::Value>(
                &target.addr,
                "elect",
                &serde_json::json!({}),
                Duration::from_secs(2),
            )
            .await;
        let moved = self
            .raft
            .wait(Some(Duration::from_secs(3)))
            .metrics(|m| m.current_leader == Some(to), "the new leader leads")
            .await;
        self.raft.runtime_config().heartbeat(true);
        self.elections.hold_for(TRANSFER_HOLD);
        match (asked, moved) {
            (_, Ok(_)) => {
                tracing::info!(to, "handed leadership over");
                Ok(())
            }
            (Err(e), Err(_)) => Err(ApiError::Write(crate::server::WriteError::Raft(format!(
                "could not ask server {to} to campaign: {e:#}"
            )))),
            (Ok(_), Err(_)) => Err(ApiError::Write(crate::server::WriteError::Raft(format!(
                "server {to} did not take over within 3s; the cluster elects a leader as usual"
            )))),
        }
    }
}

fn membership_error<E: std::fmt::Display>(e: E) -> ApiError {
    ApiError::Write(crate::server::WriteError::Raft(format!(
        "membership change failed: {e}"
    )))
}

/// `host:port` from what a user or a server wrote (a URL is cut to its authority).
pub fn normalize_address(address: &str) -> Result<String, ApiError> {
    let trimmed = address.trim().trim_end_matches('/');
    let authority = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    let valid = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && !authority.contains('/');
    if !valid {
        return Err(ApiError::BadRequest(format!(
            "`{address}` is not a coordinator address: expected host:port, e.g. 10.0.0.2:7470"
        )));
    }
    Ok(authority.to_string())
}

/// The joining side: a client of the cluster being joined, with the operator's token and CA.
pub struct Joiner {
    http: reqwest::Client,
    target: JoinTarget,
}

impl Joiner {
    pub fn new(target: JoinTarget) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &target.ca_pem {
            trainctl_tls::install_crypto_provider();
            let tls =
                trainctl_tls::client_config(ca, None).context("the cluster CA (--ca-cert)")?;
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(Joiner {
            http: builder.build()?,
            target,
        })
    }

    /// POSTs `body` to `path` on the first listed coordinator that answers; explains failures.
    async fn post<Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<Resp> {
        let mut problems = Vec::new();
        for base in &self.target.addresses {
            let url = format!("{}{path}", base.trim_end_matches('/'));
            let mut request = self.http.post(&url).json(body).timeout(timeout);
            if let Some(token) = &self.target.token {
                request = request.bearer_auth(token);
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    let chain = error_chain(&e);
                    let why = if chain.contains("certificate") || chain.contains("Certificate") {
                        format!("its TLS certificate is not signed by the CA given with --ca-cert ({chain})")
                    } else if chain.contains("wrong version number")
                        || chain.contains("InvalidContentType")
                        || chain.contains("corrupt message")
                    {
                        format!("it does not speak TLS (an --insecure cluster needs an http:// address) ({chain})")
                    } else {
                        format!("cannot reach a coordinator there ({chain})")
                    };
                    problems.push(format!("{base}: {why}"));
                    continue;
                }
            };
            let status = response.status();
            let bytes = response.bytes().await.unwrap_or_default();
            let message = || {
                serde_json::from_slice::<crate::api::ErrorBody>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect())
            };
            if status.is_success() {
                return serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{base} is not a trainctl coordinator (it answered {status}: {})",
                        message()
                    )
                });
            }
            match status.as_u16() {
                401 | 403 => bail!(
                    "{base} refused to let this server join: {} (joining needs an admin token of that cluster: --token or TRAINCTL_TOKEN)",
                    message()
                ),
                404 | 405 => problems.push(format!(
                    "{base} is not a trainctl coordinator that takes joins (it answered {status}: {})",
                    message()
                )),
                400 | 409 | 422 => bail!("{base} refused to let this server join: {}", message()),
                _ => problems.push(format!("{base} answered {status}: {}", message())),
            }
        }
        bail!("could not join: {}", problems.join("; "))
    }

    /// Step 1: this server's grant, for serving at `address`.
    pub async fn grant(&self, address: &str) -> anyhow::Result<JoinGrant> {
        self.post(
            "/v1/cluster/join",
            &serde_json::json!({ "address": address }),
            Duration::from_secs(30),
        )
        .await
    }

    /// Step 2 (this server serves now): be added as a voter.
    pub async fn become_member(&self, address: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .post(
                "/v1/cluster/members",
                &serde_json::json!({ "address": address }),
                CATCH_UP_TIMEOUT + Duration::from_secs(30),
            )
            .await?;
        Ok(())
    }

    /// The cluster id the listed coordinators report (their public health), if any answers.
    pub async fn cluster_id(&self) -> Option<String> {
        for base in &self.target.addresses {
            let url = format!("{}/v1/health", base.trim_end_matches('/'));
            if let Ok(response) = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(3))
                .send()
                .await
            {
                if let Ok(health) = response.json::<serde_json::Value>().await {
                    if let Some(id) = health.get("cluster_id").and_then(|v| v.as_str()) {
                        return Some(id.to_string());
                    }
                }
            }
        }
        None
    }
}

/// Stores a grant in `data_dir`: the CA (tls/ca.pem, tls/ca.key), the peer secret and
/// server.json. Refuses a data dir that already holds another cluster.
pub fn store_grant(data_dir: &Path, grant: &JoinGrant) -> anyhow::Result<ServerIdentity> {
    if let Some(existing) = ServerIdentity::load(data_dir)? {
        if existing.cluster_id.as_deref() != Some(grant.cluster_id.as_str()) {
            bail!(
                "{} already belongs to cluster {}; to join cluster {} start from an empty data dir",
                data_dir.display(),
                existing.cluster_id.unwrap_or_default(),
                grant.cluster_id
            );
        }
    }
    if let (Some(cert), Some(key)) = (&grant.ca_cert_pem, &grant.ca_key_pem) {
        let dir = data_dir.join(crate::server::TLS_DIR);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.pem"), cert)?;
        trainctl_tls::write_private_file(&dir.join("ca.key"), key.as_bytes())?;
    }
    PeerSecret::store_hex(data_dir, &grant.peer_secret)?;
    let identity = ServerIdentity {
        server_id: grant.server_id,
        cluster_id: Some(grant.cluster_id.clone()),
    };
    identity.save(data_dir)?;
    Ok(identity)
}

/// Shared by the leader's membership operations: one change at a time.
pub type MembershipLock = Arc<tokio::sync::Mutex<()>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_above_every_member_grant_and_log_index() {
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<_>>();
        let table = [
            (set(&[]), set(&[]), 0, 1),
            (set(&[1]), set(&[]), 0, 2),
            (set(&[1, 2, 3]), set(&[]), 0, 4),
            (set(&[1, 3]), set(&[]), 0, 4),
            (set(&[1]), set(&[2, 3]), 0, 4),
            (set(&[5]), set(&[2]), 0, 6),
            // Member 3 was removed at index 40: ids come from above the log.
            (set(&[1, 2]), set(&[]), 41, 42),
            (set(&[1, 2, 50]), set(&[]), 41, 51),
        ];
        for (members, granted, log_index, want) in table {
            assert_eq!(
                next_server_id(&members, &granted, log_index),
                want,
                "{members:?} {granted:?} {log_index}"
            );
        }
    }

    #[test]
    fn addresses_are_host_and_port() {
        let ok = [
            ("10.0.0.2:7470", "10.0.0.2:7470"),
            ("https://10.0.0.2:7470/", "10.0.0.2:7470"),
            ("http://c2:1", "c2:1"),
            ("[::1]:7470", "[::1]:7470"),
        ];
        for (given, want) in ok {
            assert_eq!(normalize_address(given).unwrap(), want);
        }
        for bad in [
            "",
            "host",
            ":7470",
            "host:0",
            "host:99999",
            "https://h:1/x",
            "h:port",
        ] {
            let e = normalize_address(bad).unwrap_err().to_string();
            assert!(e.contains("host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn identities_round_trip_and_a_grant_for_another_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ServerIdentity::load(dir.path()).unwrap(), None);
        let grant = JoinGrant {
            server_id: 3,
            cluster_id: "abc".into(),
            ca_cert_pem: None,
            ca_key_pem: None,
            peer_secret: "00ff".into(),
            members: vec![],
        };
        let stored = store_grant(dir.path(), &grant).unwrap();
        assert_eq!(ServerIdentity::load(dir.path()).unwrap(), Some(stored));
        // The same cluster again (a retried join) is fine; another is not.
        store_grant(dir.path(), &grant).unwrap();
        let other = JoinGrant {
            cluster_id: "xyz".into(),
            ..grant
        };
        let e = store_grant(dir.path(), &other).unwrap_err().to_string();
        assert!(e.contains("already belongs to cluster abc"), "{e}");
    }
}
