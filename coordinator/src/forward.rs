//! Any coordinator takes any REST request: what reads or changes the cluster is answered by the
//! leader.
//!
//! - On a follower, a `/v1/...` request is forwarded to the leader in one hop (method, path, headers
//!   and body streamed as they came; the leader authenticates the token). A request that arrives
//!   forwarded at a coordinator that does not lead (the leader just changed) is not forwarded
//!   again: it gets 503 with `Retry-After`.
//! - While no leader is known (an election), the request waits up to [`LEADER_WAIT`] for one, then
//!   gets 503 with `Retry-After`.
//! - On the leader, a read first confirms the leadership with a quorum and waits until the state
//!   applied everything committed before it (openraft's read index, `ensure_linearizable`): a
//!   client that got a 2xx for a write sees it on its next read from any coordinator. A leader
//!   cut off from the majority can not confirm, and answers 503, never a stale 200.
//! - `?stale` on a read (the convention of Nomad and Consul) answers from this coordinator's own
//!   state without asking anyone: cheaper, for dashboards, possibly behind.
//! - Served locally always: `/v1/health`, `/metrics`, `/openapi.json`, `/docs`, and
//!   `GET /v1/cluster?local` (this coordinator's own view of the group).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use openraft::error::{CheckIsLeaderError, RaftError};

use crate::api::ApiError;
use crate::raft::ServerId;
use crate::server::Coordinator;

/// The header a forwarded request carries: the id of the coordinator that forwarded it.
pub const FORWARDED_HEADER: &str = "x-trainctl-forwarded-by";
/// Marks a 503 of a request this coordinator did not process at all (no leader known here, or the
/// leader unreachable from here): a client may send it to another coordinator at once.
pub const TRY_ELSEWHERE_HEADER: &str = "x-trainctl-try-another-coordinator";
/// How long a request waits for an election to produce a leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How long the leader may take to confirm its leadership for a read.
pub const LINEARIZE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a forwarded request may take (a drain or a cancel with a checkpoint waits up to a
/// job's grace, at most an hour).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(3700);

/// Where a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Here, from this coordinator's own state, whoever leads.
    Local,
    /// Here, from this coordinator's own state, a read that asked for it (`?stale`).
    Stale,
    /// By the leader, as a read (linearizable).
    LeaderRead,
    /// By the leader, as a write.
    LeaderWrite,
}

/// Where `method path?query` is answered. Pure.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Route {
    let read = matches!(*method, Method::GET | Method::HEAD);
    let has = |name: &str| {
        query.is_some_and(|q| {
            q.split('&')
                .any(|p| p == name || p == format!("{name}=true") || p == format!("{name}=1"))
        })
    };
    if !path.starts_with("/v1/") || path == "/v1/health" {
        return Route::Local;
    }
    if path == "/v1/cluster" && read && has("local") {
        return Route::Local;
    }
    match (read, has("stale")) {
        (true, true) => Route::Stale,
        (true, false) => Route::LeaderRead,
        (false, _) => Route::LeaderWrite,
    }
}

/// `uri` without the `stale` and `local` parameters (the handlers' query types allow only their
/// own).
fn without_routing_params(uri: &Uri) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| {
            let name = p.split('=').next().unwrap_or_default();
            !p.is_empty() && name != "stale" && name != "local"
        })
        .collect();
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    path_and_query.parse().unwrap_or_else(|_| uri.clone())
}

/// The middleware: sends each request where [`route`] says.
pub async fn layer(
    State(c): State<Arc<Coordinator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = route(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    );
    if route != Route::LeaderWrite {
        *request.uri_mut() = without_routing_params(request.uri());
    }
    match route {
        Route::Local | Route::Stale => return next.run(request).await,
        Route::LeaderRead | Route::LeaderWrite => {}
    }
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    let me = c.config.server_id;
    match leader(&c).await {
        None => unprocessed(ApiError::Unavailable(format!(
            "no coordinator leads right now (an election is under way, or this coordinator is cut off \
             from the others); retry in a moment (waited {}s)",
            LEADER_WAIT.as_secs()
        ))),
        Some((id, _)) if id == me => {
            if route == Route::LeaderRead {
                match linearize(&c).await {
                    Ok(()) => {}
                    Err(Confirm::Moved(Some((id, addr)))) if !forwarded && id != me => {
                        return proxy(&c, id, &addr, request).await;
                    }
                    Err(Confirm::Moved(_)) => {
                        return ApiError::Unavailable(
                            "leadership moved while answering; retry".into(),
                        )
                        .into_response()
                    }
                    Err(Confirm::NoQuorum(why)) => {
                        return ApiError::Unavailable(format!(
                            "this coordinator could not confirm with a majority of coordinators that it \
                             still leads ({why}); it will not answer from a state that may be stale: retry, \
                             or add ?stale to read its own state"
                        ))
                        .into_response()
                    }
                }
            }
            next.run(request).await
        }
        Some((id, addr)) if forwarded => unprocessed(ApiError::Unavailable(format!(
            "a coordinator forwarded this request here, but server {id} at {addr} leads now; retry"
        ))),
        Some((id, addr)) => proxy(&c, id, &addr, request).await,
    }
}

/// `refusal` as a response that says the request was not processed here at all.
fn unprocessed(refusal: ApiError) -> Response {
    let mut response = refusal.into_response();
    response.headers_mut().insert(
        HeaderName::from_static(TRY_ELSEWHERE_HEADER),
        axum::http::HeaderValue::from_static("true"),
    );
    response
}

/// The leader's id and address, waiting up to [`LEADER_WAIT`] for an election.
async fn leader(c: &Coordinator) -> Option<(ServerId, String)> {
    let known = |m: &openraft::RaftMetrics<ServerId, openraft::BasicNode>| {
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    };
    if let Some(l) = known(&c.raft.metrics().borrow()) {
        return Some(l);
    }
    let waited = c
        .raft
        .wait(Some(LEADER_WAIT))
        .metrics(|m| known(m).is_some(), "a leader")
        .await
        .ok()?;
    known(&waited)
}

enum Confirm {
    /// Another coordinator leads (if known).
    Moved(Option<(ServerId, String)>),
    NoQuorum(String),
}

/// Confirms this leader's leadership with a quorum and waits until its state applied everything
/// committed before now.
async fn linearize(c: &Coordinator) -> Result<(), Confirm> {
    match tokio::time::timeout(LINEARIZE_TIMEOUT, c.raft.ensure_linearizable()).await {
        Err(_) => Err(Confirm::NoQuorum(format!(
            "no answer within {}s",
            LINEARIZE_TIMEOUT.as_secs()
        ))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(
            Confirm::Moved(f.leader_id.zip(f.leader_node.map(|n| n.addr))),
        ),
        Ok(Err(e)) => Err(Confirm::NoQuorum(e.to_string())),
    }
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

/// Sends `request` to the leader `id` at `addr` and streams its answer back.
async fn proxy(c: &Coordinator, id: ServerId, addr: &str, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let url = format!("{}{path}", c.peers.base_url(addr));
    let mut outgoing = c
        .peers
        .http
        .request(parts.method.clone(), &url)
        .timeout(FORWARD_TIMEOUT);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    outgoing = outgoing.header(FORWARDED_HEADER, c.config.server_id.to_string());
    let outgoing = outgoing.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    match outgoing.send().await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if !hop_by_hop(name) && name != header::CONTENT_LENGTH {
                    response = response.header(name, value);
                }
            }
            response
                .body(axum::body::Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response())
        }
        Err(e) => {
            let refused = ApiError::Unavailable(format!(
                "could not reach the leader (server {id} at {addr}) to forward this request: {}; retry",
                crate::membership::error_chain(&e)
            ));
            if e.is_connect() {
                unprocessed(refused)
            } else {
                refused.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_path_and_parameters() {
        use Route::*;
        let table = [
            ("GET", "/v1/health", None, Local),
            ("GET", "/metrics", None, Local),
            ("GET", "/openapi.json", None, Local),
            ("GET", "/docs/", None, Local),
            ("GET", "/v1/cluster", Some("local"), Local),
            ("GET", "/v1/cluster", None, LeaderRead),
            ("GET", "/v1/jobs", None, LeaderRead),
            ("HEAD", "/v1/jobs/3", None, LeaderRead),
            ("GET", "/v1/jobs/3/logs", Some("cursor=x&stale"), Stale),
            ("GET", "/v1/jobs", Some("stale=true"), Stale),
            ("GET", "/v1/jobs", Some("stale=false"), LeaderRead),
            ("POST", "/v1/jobs", Some("stale"), LeaderWrite),
            ("POST", "/v1/jobs/3/cancel", None, LeaderWrite),
            ("DELETE", "/v1/nodes/n1", None, LeaderWrite),
            ("POST", "/v1/join", None, LeaderWrite),
            ("POST", "/v1/cluster/members", None, LeaderWrite),
        ];
        for (method, path, query, want) in table {
            let method: Method = method.parse().unwrap();
            assert_eq!(
                route(&method, path, query),
                want,
                "{method} {path} {query:?}"
            );
        }
    }

    #[test]
    fn routing_parameters_are_removed_before_the_handlers_see_them() {
        let table = [
            ("/v1/jobs?stale", "/v1/jobs"),
            (
                "/v1/jobs/1/logs?cursor=a&stale=true&rank=2",
                "/v1/jobs/1/logs?cursor=a&rank=2",
            ),
            ("/v1/cluster?local", "/v1/cluster"),
            ("/v1/jobs?cursor=stale", "/v1/jobs?cursor=stale"),
            ("/v1/jobs", "/v1/jobs"),
        ];
        for (given, want) in table {
            let uri: Uri = given.parse().unwrap();
            assert_eq!(without_routing_params(&uri).to_string(), want, "{given}");
        }
    }
}
