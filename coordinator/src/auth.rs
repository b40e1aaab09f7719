//! Authentication and authorisation of REST requests and agents.
//!
//! - REST: every request except the public ones ([`Access::Public`]) carries
//!   `Authorization: Bearer tctl_<id>_<secret>`. [`authenticate`] checks it against the token
//!   records in the replicated state and gives a [`Principal`]; [`required_access`] says, per
//!   method and path, which roles may call it. Both are pure; [`layer`] is the middleware.
//! - Agents: a gRPC call must come over a TLS connection whose client certificate was admitted
//!   for the node it speaks for (`POST /v1/join`); [`node_of_peer`] finds that node.
//! - `--insecure` coordinators skip both: every request is the `anonymous` admin.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;
use crate::server::{now_ms, Coordinator};
use crate::state::{
    secret_digest, split_token, Actor, Job, NodeId, Role, State as ClusterState, TokenRecord,
    TokenRefusal,
};

/// The TLS client certificate of the connection a request came on: the lowercase hex SHA-256 of
/// its DER, put into every request's extensions by the HTTP server. Absent without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub String);

/// Who is asking, once their token was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (`anonymous` on an insecure coordinator).
    pub name: String,
    pub role: Role,
    /// The namespace the token is confined to; `None` is the default namespace (or every namespace
    /// for admins).
    pub namespace: Option<String>,
}

impl Principal {
    /// Everyone on a coordinator started with `--insecure`.
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            role: Role::Admin,
            namespace: None,
        }
    }

    /// Whether this principal may see `job` at all. Others get 404, as if it did not exist.
    pub fn sees(&self, job: &Job) -> bool {
        let namespace = job.owner.as_ref().and_then(|o| o.namespace.as_deref());
        match self.role {
            Role::Admin => self.namespace.is_none() || self.namespace.as_deref() == namespace,
            Role::Submit | Role::Read => self.namespace.as_deref() == namespace,
            Role::Agent => false,
        }
    }

    /// Whether this principal may see the values of `job`'s environment (its secrets): admins and
    /// submitters who see the job; readers see the names only.
    pub fn sees_env_of(&self, job: &Job) -> bool {
        self.sees(job) && matches!(self.role, Role::Admin | Role::Submit)
    }

    /// The actor the audit trail records for this principal's changes.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Anyone: health, the OpenAPI document and its UI, and joining (which checks its own token).
    Public,
    /// Any token but an agent's.
    Read,
    /// Submit or admin tokens.
    Submit,
    /// Admin tokens only.
    Admin,
}

impl Access {
    fn allows(self, role: Role) -> bool {
        match self {
            Access::Public => true,
            Access::Read => role != Role::Agent,
            Access::Submit => matches!(role, Role::Admin | Role::Submit),
            Access::Admin => role == Role::Admin,
        }
    }

    fn roles(self) -> &'static str {
        match self {
            Access::Public => "anyone",
            Access::Read => "admin, submit or read",
            Access::Submit => "admin or submit",
            Access::Admin => "admin",
        }
    }
}

/// Which tokens may call `method path` (a path no route serves is a 404 for everyone, before
/// this is asked; the API's surface is public in `/openapi.json`).
pub fn required_access(method: &Method, path: &str) -> Access {
    let public = matches!(path, "/v1/health" | "/openapi.json" | "/v1/join")
        || path == "/docs"
        || path.starts_with("/docs/");
    if public {
        return Access::Public;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read_method = matches!(*method, Method::GET | Method::HEAD);
    match segments.as_slice() {
        ["v1", "jobs", ..] if read_method => Access::Read,
        ["v1", "jobs", ..] => Access::Submit,
        ["v1", "nodes"] if read_method => Access::Read,
        ["metrics"] => Access::Read,
        ["v1", "whoami"] => Access::Read,
        ["v1", "cluster"] if read_method => Access::Read,
        _ => Access::Admin,
    }
}

/// The token a request presents, if any.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <token>`".into(),
        )),
    }
}

/// The token record a presented token belongs to, if its secret matches and it is usable now.
pub fn check_token<'s>(
    state: &'s ClusterState,
    token: &str,
    now_ms: u64,
) -> Result<&'s TokenRecord, TokenRefusal> {
    let (id, secret) = split_token(token)?;
    let record = state.tokens.get(id).ok_or(TokenRefusal::Unknown)?;
    record.check(secret, now_ms)?;
    Ok(record)
}

/// Who a request with `token` is, checked against `state` at `now_ms`.
pub fn authenticate(
    state: &ClusterState,
    token: Option<&str>,
    now_ms: u64,
) -> Result<Principal, ApiError> {
    let Some(token) = token else {
        return Err(ApiError::Unauthorized(
            "this endpoint needs a token: send `Authorization: Bearer <token>` (the CLI reads it from \
             TRAINCTL_TOKEN, --token or its context file; `trainctl token create` makes one)"
                .into(),
        ));
    };
    let record =
        check_token(state, token, now_ms).map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    Ok(Principal {
        name: record.name.clone(),
        role: record.role,
        namespace: record.namespace.clone(),
    })
}

/// A new token: its record (to write through Raft) and the string to hand to its holder, once.
pub fn mint_token(
    name: String,
    role: Role,
    namespace: Option<String>,
    expires_at_ms: Option<u64>,
    created_by: String,
    at_ms: u64,
) -> (TokenRecord, String) {
    let id = format!("{:016x}", rand::random::<u64>());
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let token = format!("tctl_{id}_{secret}");
    let record = TokenRecord {
        id,
        name,
        role,
        namespace,
        secret_sha256: secret_digest(&secret),
        created_at_ms: at_ms,
        created_by,
        expires_at_ms,
        revoked_at_ms: None,
    };
    (record, token)
}

/// The middleware in front of every REST route: finds the principal (or refuses with 401/403)
/// and puts it into the request's extensions for the handlers. gRPC and Raft requests pass: they
/// are authenticated by their own layers.
pub async fn layer(
    State(coordinator): State<Arc<Coordinator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    if crate::api::is_grpc(request.headers()) || path.starts_with("/internal/") {
        return next.run(request).await;
    }
    if !coordinator.config.secure {
        request.extensions_mut().insert(Principal::anonymous());
        return next.run(request).await;
    }
    let access = required_access(request.method(), &path);
    if access == Access::Public {
        return next.run(request).await;
    }
    let principal = match bearer(request.headers())
        .and_then(|token| coordinator.state.read(|s| authenticate(s, token, now_ms())))
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !access.allows(principal.role) {
        return ApiError::Forbidden(format!(
            "token `{}` has role {}; {} {path} needs {}",
            principal.name,
            principal.role,
            request.method(),
            access.roles()
        ))
        .into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The node the agent on the other end of a gRPC call was admitted as, or why it may not speak.
/// On an insecure coordinator any agent may speak for any node.
pub fn node_of_peer(
    coordinator: &Coordinator,
    peer: Option<&PeerCertificate>,
    claimed: &NodeId,
) -> Result<(), tonic::Status> {
    if !coordinator.config.secure {
        return Ok(());
    }
    let Some(PeerCertificate(fingerprint)) = peer else {
        return Err(tonic::Status::unauthenticated(
            "agents must present their client certificate; join the cluster first \
             (`trainctl agent --join-token ...`)",
        ));
    };
    match coordinator
        .state
        .read(|s| s.node_of_identity(fingerprint).cloned())
    {
        Some(node) if &node == claimed => Ok(()),
        Some(node) => Err(tonic::Status::permission_denied(format!(
            "this agent's certificate was issued for node {node}, not {claimed}"
        ))),
        None => Err(tonic::Status::unauthenticated(
            "this agent's certificate is not (or no longer) admitted to the cluster; \
             its token may have been revoked or its node removed: join again with a new token",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_the_access_it_should() {
        let table: &[(&str, &str, Access)] = &[
            ("GET", "/v1/health", Access::Public),
            ("GET", "/openapi.json", Access::Public),
            ("GET", "/docs/", Access::Public),
            ("POST", "/v1/join", Access::Public),
            ("GET", "/v1/jobs", Access::Read),
            ("GET", "/v1/jobs/3/logs", Access::Read),
            ("POST", "/v1/jobs", Access::Submit),
            ("POST", "/v1/jobs/3/cancel", Access::Submit),
            ("GET", "/v1/nodes", Access::Read),
            ("POST", "/v1/nodes/a/drain", Access::Admin),
            ("DELETE", "/v1/nodes/a", Access::Admin),
            ("GET", "/metrics", Access::Read),
            ("GET", "/v1/tokens", Access::Admin),
            ("POST", "/v1/tokens", Access::Admin),
            ("GET", "/v1/audit", Access::Admin),
            ("GET", "/v1/whoami", Access::Read),
            ("GET", "/v1/cluster", Access::Read),
            ("HEAD", "/v1/cluster", Access::Read),
            ("POST", "/v1/cluster", Access::Admin),
            ("GET", "/v1/cluster/members", Access::Admin),
            ("GET", "/nope", Access::Admin),
            ("GET", "/v1/healthz", Access::Admin),
        ];
        for (method, path, want) in table {
            let method: Method = method.parse().unwrap();
            assert_eq!(required_access(&method, path), *want, "{method} {path}");
        }
    }

    #[test]
    fn roles_allow_what_they_say() {
        use Access::*;
        for (access, role, allowed) in [
            (Public, Role::Agent, true),
            (Read, Role::Read, true),
            (Read, Role::Agent, false),
            (Submit, Role::Read, false),
            (Submit, Role::Submit, true),
            (Admin, Role::Submit, false),
            (Admin, Role::Admin, true),
        ] {
            assert_eq!(access.allows(role), allowed, "{access:?} {role}");
        }
    }

    #[test]
    fn tokens_check_secret_expiry_and_revocation() {
        let (record, token) = mint_token(
            "ci".into(),
            Role::Submit,
            Some("team-a".into()),
            Some(1_000),
            "admin".into(),
            0,
        );
        let mut state = ClusterState::default();
        state.tokens.insert(record.id.clone(), record.clone());
        let principal = authenticate(&state, Some(&token), 10).unwrap();
        assert_eq!(principal.name, "ci");
        assert_eq!(principal.namespace.as_deref(), Some("team-a"));
        assert_eq!(
            check_token(&state, &token, 1_000).unwrap_err(),
            TokenRefusal::Expired("ci".into())
        );
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            check_token(&state, &forged, 10).unwrap_err(),
            TokenRefusal::Unknown
        );
        assert_eq!(
            check_token(&state, "tctl_zz", 10).unwrap_err(),
            TokenRefusal::Malformed
        );
        assert!(authenticate(&state, None, 10).is_err());
        state.tokens.get_mut(&record.id).unwrap().revoked_at_ms = Some(5);
        assert_eq!(
            check_token(&state, &token, 10).unwrap_err(),
            TokenRefusal::Revoked("ci".into())
        );
    }

    #[test]
    fn namespaces_confine_what_a_token_sees() {
        let job = |ns: Option<&str>| {
            let mut state = ClusterState::default();
            let spec = trainctl_jobs::JobSpec::from_toml(
                "name = \"j\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
                "job.toml",
            )
            .unwrap();
            state.apply(crate::state::Command::SubmitJob {
                spec,
                at_ms: 0,
                secret: String::new(),
                resume_from_job: None,
            });
            let mut j = Arc::unwrap_or_clone(state.jobs.into_values().next().unwrap());
            j.owner = Some(Actor {
                name: "x".into(),
                namespace: ns.map(str::to_string),
            });
            j
        };
        let who = |role, ns: Option<&str>| Principal {
            name: "p".into(),
            role,
            namespace: ns.map(str::to_string),
        };
        let team_a = job(Some("a"));
        let default = job(None);
        assert!(who(Role::Admin, None).sees(&team_a));
        assert!(who(Role::Admin, None).sees_env_of(&team_a));
        assert!(!who(Role::Admin, Some("b")).sees(&team_a));
        assert!(who(Role::Submit, Some("a")).sees_env_of(&team_a));
        assert!(!who(Role::Submit, Some("a")).sees(&default));
        assert!(!who(Role::Submit, None).sees(&team_a));
        assert!(who(Role::Read, Some("a")).sees(&team_a));
        assert!(!who(Role::Read, Some("a")).sees_env_of(&team_a));
        assert!(!who(Role::Agent, None).sees(&default));
    }
}
