//! The REST endpoints of access control: tokens, the audit trail, `whoami`, and agents joining.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Ctx, ErrorBody};
use crate::agents::node_name_problem;
use crate::auth::{check_token, mint_token, Principal};
use crate::server::now_ms;
use crate::state::{access_name_problem, Command, CommandOutcome, NodeId, Role, TokenRecord};

/// Days an agent's certificate is valid; an agent joins again (with a new token) after that.
pub const AGENT_CERT_VALIDITY_DAYS: u32 = 365;
/// Most bytes of a certificate signing request.
pub const CSR_BYTES_MAX: usize = 16 * 1024;

/// A JSON body, with axum's plain-text rejections turned into [`ApiError`]s.
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// A token to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// A name people recognise (`ci`, `alice`): 1 to 63 characters of a-z, 0-9, `.`, `_`, `-`.
    pub name: String,
    /// `admin`, `submit`, `read` or `agent` (a join token for agents).
    pub role: String,
    /// Confine the token to this namespace's jobs (submit and read tokens; admin tokens with a
    /// namespace see only it).
    #[serde(default)]
    pub namespace: Option<String>,
    /// How long the token works (`"24h"`, `"30m"`); forever when absent.
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub role: String,
    pub namespace: Option<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    /// Nodes whose agents joined with this token.
    pub nodes: Vec<String>,
}

/// A new token: `token` is shown this once and never again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// The bearer token (`tctl_<id>_<secret>`).
    pub token: String,
}

/// One entry of the audit trail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    pub at_ms: u64,
    /// The name of the token that asked (`coordinator` for the coordinator's own changes).
    pub by: String,
    pub action: String,
    /// `done`, or why it was refused.
    pub outcome: String,
}

/// The caller, as its token says.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: String,
    pub namespace: Option<String>,
}

/// An agent asks to join.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// A token of role `agent`.
    pub token: String,
    /// The node name the certificate is bound to.
    pub node: String,
    /// A PEM certificate signing request for the agent's own key (its subject is replaced by the
    /// node name).
    pub csr_pem: String,
}

/// The agent's identity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinResponse {
    /// The agent's client certificate (PEM), its CN the node name.
    pub cert_pem: String,
    /// The cluster CA (PEM) that signs coordinators and agents.
    pub ca_pem: String,
}

fn token_view(s: &crate::state::State, r: &TokenRecord) -> TokenView {
    TokenView {
        id: r.id.clone(),
        name: r.name.clone(),
        role: r.role.to_string(),
        namespace: r.namespace.clone(),
        created_at_ms: r.created_at_ms,
        created_by: r.created_by.clone(),
        expires_at_ms: r.expires_at_ms,
        revoked_at_ms: r.revoked_at_ms,
        nodes: s
            .identities
            .values()
            .filter(|i| i.token_id == r.id)
            .map(|i| i.node.to_string())
            .collect(),
    }
}

/// Create a token. Its secret is in the answer, once.
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateTokenBody, security(("bearer" = [])),
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody, description = "A bad name, role, namespace or ttl"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody, description = "Not an admin token"),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody, description = "Not the leader")))]
pub(super) async fn create_token(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    body: Result<Json<CreateTokenBody>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let body = json_body(body)?;
    let role: Role = body.role.parse().map_err(ApiError::BadRequest)?;
    if let Some(problem) = access_name_problem("token name", &body.name) {
        return Err(ApiError::BadRequest(problem));
    }
    if let Some(problem) = body
        .namespace
        .as_deref()
        .and_then(|n| access_name_problem("namespace", n))
    {
        return Err(ApiError::BadRequest(problem));
    }
    // A namespaced admin hands out only tokens of its own namespace.
    if who.namespace.is_some() && body.namespace != who.namespace {
        return Err(ApiError::Forbidden(format!(
            "token `{}` is confined to namespace {}; it can create tokens of that namespace only",
            who.name,
            who.namespace.as_deref().unwrap_or_default()
        )));
    }
    let now = now_ms();
    let expires_at_ms = match body.ttl.as_deref() {
        None => None,
        Some(ttl) => {
            let ms = trainctl_jobs::parse_duration_ms(ttl).map_err(|e| {
                ApiError::BadRequest(format!(
                    "ttl `{ttl}`: {e} (write it as \"30m\", \"24h\", \"7d\")"
                ))
            })?;
            if ms == 0 {
                return Err(ApiError::BadRequest("ttl must be more than 0".into()));
            }
            Some(now.saturating_add(ms))
        }
    };
    let (record, token) = mint_token(
        body.name,
        role,
        body.namespace,
        expires_at_ms,
        who.name.clone(),
        now,
    );
    let id = record.id.clone();
    match c
        .write_as(
            &who,
            Command::CreateToken {
                record: record.clone(),
            },
        )
        .await?
    {
        CommandOutcome::Rejected { reason } => Err(ApiError::BadRequest(reason)),
        _ => {
            let view = c.state.read(|s| {
                s.tokens
                    .get(&id)
                    .map(|r| token_view(s, r))
                    .unwrap_or_else(|| token_view(s, &record))
            });
            Ok((StatusCode::CREATED, Json(CreatedToken { view, token })))
        }
    }
}

/// List tokens (never their secrets), oldest first.
#[utoipa::path(get, path = "/v1/tokens", security(("bearer" = [])),
    responses((status = 200, body = [TokenView]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn list_tokens(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
) -> Json<Vec<TokenView>> {
    Json(c.state.read(|s| {
        let mut tokens: Vec<TokenView> = s
            .tokens
            .values()
            .filter(|r| who.namespace.is_none() || r.namespace == who.namespace)
            .map(|r| token_view(s, r))
            .collect();
        tokens.sort_by_key(|t| t.created_at_ms);
        tokens
    }))
}

/// Revoke a token: it stops working at once; agents that joined with it lose their identity and
/// their nodes are drained. The answer's `nodes` are the nodes drained.
#[utoipa::path(post, path = "/v1/tokens/{id}/revoke", params(("id" = String, Path, description = "Token id")), security(("bearer" = [])),
    responses((status = 200, body = TokenView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Already revoked"),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody, description = "Not the leader")))]
pub(super) async fn revoke_token(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let visible = c.state.read(|s| {
        s.tokens
            .get(&id)
            .is_some_and(|r| who.namespace.is_none() || r.namespace == who.namespace)
    });
    if !visible {
        return Err(ApiError::NotFound(format!(
            "no token with id `{}` (see `trainctl token list`)",
            id.escape_debug()
        )));
    }
    let drained: Vec<NodeId> = c.state.read(|s| {
        s.identities
            .values()
            .filter(|i| i.token_id == id)
            .map(|i| i.node.clone())
            .collect()
    });
    if let CommandOutcome::Rejected { reason } = c
        .write_as(
            &who,
            Command::RevokeToken {
                id: id.clone(),
                at_ms: now_ms(),
            },
        )
        .await?
    {
        return Err(ApiError::Conflict(reason));
    }
    // The revoked agents' jobs move elsewhere, as a drain moves them.
    for node in &drained {
        super::move_jobs_off(&c, node, "its agent's token was revoked").await?;
    }
    let mut view = c
        .state
        .read(|s| s.tokens.get(&id).map(|r| token_view(s, r)))
        .ok_or_else(|| ApiError::Internal("the revoked token vanished".into()))?;
    // The nodes that had joined with it (their identities are gone now) and were drained.
    view.nodes = drained.iter().map(|n| n.to_string()).collect();
    Ok(Json(view))
}

/// The audit trail: the newest changes people made (at most 1000), oldest first.
#[utoipa::path(get, path = "/v1/audit", security(("bearer" = [])),
    responses((status = 200, body = [AuditView]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn audit(State(c): Ctx) -> Json<Vec<AuditView>> {
    Json(c.state.read(|s| {
        s.audit
            .iter()
            .map(|a| AuditView {
                at_ms: a.at_ms,
                by: a.by.clone(),
                action: a.action.clone(),
                outcome: a.outcome.clone(),
            })
            .collect()
    }))
}

/// Who the caller's token says it is.
#[utoipa::path(get, path = "/v1/whoami", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub(super) async fn whoami(Extension(who): Extension<Principal>) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: who.name,
        role: who.role.to_string(),
        namespace: who.namespace,
    })
}

/// An agent trades a join token for its own client certificate, bound to its node name. A name
/// belongs to one identity: another host can not take it over.
#[utoipa::path(post, path = "/v1/join", request_body = JoinBody,
    responses((status = 200, body = JoinResponse), (status = 400, body = ErrorBody, description = "A bad node name or CSR, or a coordinator without TLS"),
        (status = 401, body = ErrorBody, description = "Unknown, expired or revoked token"),
        (status = 403, body = ErrorBody, description = "Not an agent token, or the node name belongs to another identity"),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody, description = "Not the leader")))]
pub(super) async fn join(
    State(c): Ctx,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let body = json_body(body)?;
    let Some(ca) = c.cluster_ca.clone() else {
        return Err(ApiError::BadRequest(
            "this coordinator runs without TLS (--insecure): agents join without a token".into(),
        ));
    };
    let token = c
        .state
        .read(|s| check_token(s, &body.token, now_ms()).cloned())
        .map_err(|e| ApiError::Unauthorized(format!("join refused: {e}")))?;
    if token.role != Role::Agent {
        return Err(ApiError::Forbidden(format!(
            "token `{}` has role {}; agents join with a token of role agent \
             (`trainctl token create --role agent`)",
            token.name, token.role
        )));
    }
    if let Some(problem) = node_name_problem(&body.node) {
        return Err(ApiError::BadRequest(problem));
    }
    if body.csr_pem.len() > CSR_BYTES_MAX {
        return Err(ApiError::BadRequest(format!(
            "the CSR is over {CSR_BYTES_MAX} bytes"
        )));
    }
    let node = NodeId(body.node.clone());
    let cert_pem = ca
        .sign_csr(&body.csr_pem, &body.node, AGENT_CERT_VALIDITY_DAYS)
        .map_err(|e| ApiError::BadRequest(format!("the certificate signing request: {e}")))?;
    let fingerprint = trainctl_tls::fingerprint_pem(&cert_pem)
        .map_err(|e| ApiError::Internal(format!("fingerprint of a new certificate: {e}")))?;
    let joiner = Principal {
        name: format!("join:{}", token.name),
        role: Role::Agent,
        namespace: None,
    };
    match c
        .write_as(
            &joiner,
            Command::AdmitAgent {
                node,
                fingerprint,
                token_id: token.id.clone(),
                at_ms: now_ms(),
            },
        )
        .await?
    {
        CommandOutcome::Rejected { reason } => Err(ApiError::Forbidden(reason)),
        _ => Ok(Json(JoinResponse {
            cert_pem,
            ca_pem: ca.cert_pem().to_string(),
        })),
    }
}
