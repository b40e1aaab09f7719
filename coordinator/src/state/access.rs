//! Who may do what, in the replicated state: API and join tokens, the identities agents were
//! admitted with, and the audit trail of every change a person made.
//!
//! The state holds only a token's SHA-256, never the token; checking a presented token against a
//! record is [`TokenRecord::check`], a pure function the API layer calls with its clock.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{rejected, Command, CommandOutcome, NodeId, State};

/// Most token records (revoked ones included, so the audit keeps their names).
pub const TOKENS_MAX: usize = 10_000;
/// Most admitted agent identities (one per node name).
pub const IDENTITIES_MAX: usize = 65_536;
/// Most audit entries kept; the oldest fall out first.
pub const AUDIT_ENTRIES_MAX: usize = 1_000;
/// Longest token name or namespace, in bytes.
pub const ACCESS_NAME_BYTES_MAX: usize = 63;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: jobs of every namespace, nodes, tokens, the audit trail.
    Admin,
    /// Submit, see and cancel jobs (of its namespace, if it has one), and read nodes.
    Submit,
    /// See jobs (of its namespace, if it has one), their logs without env values, and nodes.
    Read,
    /// Only `POST /v1/join`: an agent trades it once for its own certificate.
    Agent,
}

impl Role {
    /// Every role, in the order the help text lists them.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submit, Role::Read, Role::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`; accepted: admin, submit, read, agent"))
    }
}

/// A token as the state keeps it: its id, what it may do, and the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public part of the token (`tctl_<id>_<secret>`), 16 hex digits.
    pub id: String,
    /// A name people recognise (`ci`, `alice`); shown in the audit trail.
    pub name: String,
    pub role: Role,
    /// Jobs this token submits go into this namespace, and it sees only this namespace's jobs.
    /// `None`: the default namespace for submit and read tokens; every namespace for admin.
    pub namespace: Option<String>,
    /// Lowercase hex SHA-256 of the secret part.
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

/// Why a presented token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the token is malformed (trainctl tokens look like tctl_<16 hex>_<64 hex>)")]
    Malformed,
    #[error("the token is not known to this cluster")]
    Unknown,
    #[error("token `{0}` was revoked")]
    Revoked(String),
    #[error("token `{0}` expired")]
    Expired(String),
}

/// The parts of a token string: `tctl_<id>_<secret>`.
pub fn split_token(token: &str) -> Result<(&str, &str), TokenRefusal> {
    let rest = token.strip_prefix("tctl_").ok_or(TokenRefusal::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(TokenRefusal::Malformed)?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, 16) || !hex(secret, 64) {
        return Err(TokenRefusal::Malformed);
    }
    Ok((id, secret))
}

/// Lowercase hex SHA-256 of `secret`.
pub fn secret_digest(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TokenRecord {
    /// Whether `secret` is this token's secret and the token may be used at `now_ms`.
    pub fn check(&self, secret: &str, now_ms: u64) -> Result<(), TokenRefusal> {
        let presented = secret_digest(secret);
        // Constant time over the digests: a timing difference tells nothing about the secret.
        let differs = presented
            .bytes()
            .zip(self.secret_sha256.bytes())
            .fold(presented.len() ^ self.secret_sha256.len(), |acc, (a, b)| {
                acc | usize::from(a ^ b)
            });
        if differs != 0 {
            return Err(TokenRefusal::Unknown);
        }
        if self.revoked_at_ms.is_some() {
            return Err(TokenRefusal::Revoked(self.name.clone()));
        }
        if self.expires_at_ms.is_some_and(|t| now_ms >= t) {
            return Err(TokenRefusal::Expired(self.name.clone()));
        }
        Ok(())
    }
}

/// The identity an agent was admitted with: the SHA-256 of its client certificate, bound to one
/// node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub node: NodeId,
    /// Lowercase hex SHA-256 of the certificate (DER).
    pub fingerprint: String,
    /// The join token it was admitted with; revoking that token revokes this identity.
    pub token_id: String,
    pub admitted_at_ms: u64,
}

/// Who asked for a change: a token's name (or `coordinator` for the coordinator's own), and the
/// namespace its jobs go to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Actor {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One change a person (or the coordinator on its own behalf) made, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub by: String,
    /// What was asked, in words (`cancel job 3`).
    pub action: String,
    /// `done`, or why it was refused.
    pub outcome: String,
}

/// Whether `name` is acceptable as a token name or namespace: 1 to 63 bytes of `[a-z0-9._-]`,
/// starting with a letter or digit.
pub fn access_name_problem(what: &str, name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= ACCESS_NAME_BYTES_MAX
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    (!ok).then(|| {
        let shown: String = name.escape_debug().take(70).collect();
        format!(
            "`{shown}` is not a valid {what}: use 1 to {ACCESS_NAME_BYTES_MAX} characters of a-z, 0-9, `.`, `_` and `-`, starting with a letter or digit"
        )
    })
}

/// The words an audit entry uses for `command`.
fn describe(command: &Command) -> String {
    match command {
        Command::SubmitJob { spec, .. } => format!("submit job `{}`", spec.name),
        Command::Idempotent { submit, .. } => describe(submit),
        Command::CancelJob { job, .. } => format!("cancel job {job}"),
        Command::RequestCheckpoint { job } => format!("checkpoint job {job} now"),
        Command::RestartJob { job, reason, .. } => format!("restart job {job} ({reason})"),
        Command::SetNodeDrained { node, drained } => {
            format!("{} node {node}", if *drained { "drain" } else { "undrain" })
        }
        Command::RemoveNode { node, .. } => format!("remove node {node}"),
        Command::SetNodeHealth {
            node, unhealthy, ..
        } => match unhealthy {
            Some(reason) => format!("node {node} unhealthy: {reason}"),
            None => format!("node {node} healthy"),
        },
        Command::CreateToken { record } => format!(
            "create token {} `{}` (role {}{})",
            record.id,
            record.name,
            record.role,
            record
                .namespace
                .as_ref()
                .map(|n| format!(", namespace {n}"))
                .unwrap_or_default()
        ),
        Command::RevokeToken { id, .. } => format!("revoke token {id}"),
        Command::AdmitAgent { node, .. } => format!("admit agent {node}"),
        Command::Batch(commands) => commands.iter().map(describe).collect::<Vec<_>>().join("; "),
        // Not the chunks: the Raft state machine takes them out before `apply` sees the command.
        Command::AppendLogs { .. } => "append rank logs".to_string(),
        Command::MembershipChanged { change, .. } => change.clone(),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}

impl State {
    /// Applies `command` on behalf of `actor` and records it in the audit trail. A job it submits
    /// belongs to the actor's namespace.
    pub(super) fn apply_audited(
        &mut self,
        actor: Actor,
        at_ms: u64,
        command: Command,
    ) -> CommandOutcome {
        let action = describe(&command);
        let outcome = match command {
            // Idempotency keys are the submitter's own: scoped by the actor.
            Command::Idempotent {
                key,
                digest,
                submit,
            } => self.apply_idempotent(&actor, key, digest, *submit),
            command => self.apply(command),
        };
        let (action, result) = match &outcome {
            CommandOutcome::JobSubmitted { job } => {
                if let Some(j) = self.job_mut(*job) {
                    j.owner = Some(actor.clone());
                }
                (format!("{action} as job {job}"), "done".to_string())
            }
            CommandOutcome::JobReplayed { job } => (
                format!("{action}, a retry (same idempotency key) of job {job}"),
                "nothing new".to_string(),
            ),
            CommandOutcome::IdempotencyKeyReused { job } => (
                action,
                format!("refused: its idempotency key was used for job {job}, another request"),
            ),
            CommandOutcome::Rejected { reason } => (action, format!("refused: {reason}")),
            _ => (action, "done".to_string()),
        };
        self.audit.push_back(AuditEntry {
            at_ms,
            by: actor.name,
            action,
            outcome: result,
        });
        while self.audit.len() > AUDIT_ENTRIES_MAX {
            self.audit.pop_front();
        }
        outcome
    }

    pub(super) fn create_token(&mut self, record: TokenRecord) -> CommandOutcome {
        if self.tokens.contains_key(&record.id) {
            return rejected(format!("a token with id {} exists", record.id));
        }
        if self.tokens.len() >= TOKENS_MAX {
            return rejected(format!(
                "the cluster holds {TOKENS_MAX} tokens, the most it keeps"
            ));
        }
        if let Some(problem) = access_name_problem("token name", &record.name) {
            return rejected(problem);
        }
        if let Some(problem) = record
            .namespace
            .as_deref()
            .and_then(|n| access_name_problem("namespace", n))
        {
            return rejected(problem);
        }
        self.tokens.insert(record.id.clone(), record);
        CommandOutcome::Done
    }

    /// Revokes a token; agents admitted with it lose their identity and their nodes are drained.
    pub(super) fn revoke_token(&mut self, id: &str, at_ms: u64) -> CommandOutcome {
        let Some(record) = self.tokens.get_mut(id) else {
            return rejected(format!("no token with id {id}"));
        };
        if record.revoked_at_ms.is_some() {
            return rejected(format!("token {id} is already revoked"));
        }
        record.revoked_at_ms = Some(at_ms);
        let nodes: Vec<NodeId> = self
            .identities
            .values()
            .filter(|i| i.token_id == id)
            .map(|i| i.node.clone())
            .collect();
        self.identities.retain(|_, i| i.token_id != id);
        for node in nodes {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.drained = true;
            }
        }
        CommandOutcome::Done
    }

    /// Binds a certificate to a node name, if the join token is good at `at_ms` and the name is
    /// not another identity's.
    pub(super) fn admit_agent(
        &mut self,
        node: NodeId,
        fingerprint: String,
        token_id: String,
        at_ms: u64,
    ) -> CommandOutcome {
        let Some(token) = self.tokens.get(&token_id) else {
            return rejected(format!("no token with id {token_id}"));
        };
        if token.role != Role::Agent {
            return rejected(format!(
                "token `{}` has role {}; agents join with a token of role agent",
                token.name, token.role
            ));
        }
        if token.revoked_at_ms.is_some() || token.expires_at_ms.is_some_and(|t| at_ms >= t) {
            return rejected(format!("token `{}` is revoked or expired", token.name));
        }
        if let Some(held) = self.identities.values().find(|i| i.node == node) {
            if held.fingerprint == fingerprint {
                return CommandOutcome::Done;
            }
            return rejected(format!(
                "node name `{node}` belongs to another agent identity; a host can not take over \
                 another's name. If that host is gone for good, free the name with `trainctl nodes rm {node}`"
            ));
        }
        if self.identities.len() >= IDENTITIES_MAX {
            return rejected(format!(
                "the cluster holds {IDENTITIES_MAX} agent identities, the most it keeps"
            ));
        }
        self.identities.insert(
            fingerprint.clone(),
            AgentIdentity {
                node,
                fingerprint,
                token_id,
                admitted_at_ms: at_ms,
            },
        );
        CommandOutcome::Done
    }

    /// The node a client certificate was admitted for.
    pub fn node_of_identity(&self, fingerprint: &str) -> Option<&NodeId> {
        self.identities.get(fingerprint).map(|i| &i.node)
    }

    /// Forgets every identity bound to `node` (the node was removed: its name is free again).
    pub(super) fn forget_identities_of(&mut self, node: &NodeId) -> bool {
        let before = self.identities.len();
        self.identities.retain(|_, i| &i.node != node);
        self.identities.len() != before
    }
}
