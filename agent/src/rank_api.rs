//! The agent's HTTP endpoint for its own ranks (`TRAINCTL_AGENT_URL`): checkpoint commits and
//! progress reports, authenticated by the attempt's job token (`TRAINCTL_JOB_TOKEN`).
//!
//! - `POST /v1/checkpoints` `{"path", "step", "metrics"?}`: forwarded to the coordinator, answered 200
//!   only once the commit is durable in its Raft log. Checkpoints that fell out of the job's `keep` are
//!   then deleted here (only inside the job's checkpoint dir).
//! - `POST /v1/progress` `{"step"}`: counts as progress for hang detection, sent with the next beat.
//!
//! Status codes: 401 no or unknown token; 403 a token for another job than the body names; 409 a token
//! of an attempt that is over; 422 a bad body or a path outside the checkpoint dir; 503 coordinator
//! unreachable (retry).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::CommitCheckpointRequest;

/// Largest request body accepted from a rank.
pub const RANK_API_BODY_BYTES_MAX: usize = 64 << 10;
/// Tokens of ended attempts remembered, so their late requests get 409 rather than 401.
pub const STALE_TOKENS_MAX: usize = 1024;

/// What a token grants: one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub job_id: String,
    pub attempt: u32,
    /// Whether the attempt is still the one this host runs.
    pub current: bool,
}

/// Shared between the heartbeat loop (which updates grants) and the HTTP handlers.
#[derive(Debug, Default)]
pub struct RankApiState {
    grants: BTreeMap<String, Grant>,
    /// Steps reported since the last heartbeat, per (job, attempt); `None` = progress without a step.
    pending_progress: BTreeMap<(String, u32), Option<u64>>,
}

impl RankApiState {
    /// Replaces the current grants with the assignments' tokens; earlier ones stay known as stale.
    pub fn set_current(&mut self, current: impl IntoIterator<Item = (String, String, u32)>) {
        for grant in self.grants.values_mut() {
            grant.current = false;
        }
        for (token, job_id, attempt) in current {
            if token.is_empty() {
                continue;
            }
            self.grants.insert(
                token,
                Grant {
                    job_id,
                    attempt,
                    current: true,
                },
            );
        }
        if self.grants.len() > STALE_TOKENS_MAX {
            let stale: Vec<String> = self
                .grants
                .iter()
                .filter(|(_, g)| !g.current)
                .map(|(t, _)| t.clone())
                .take(self.grants.len() - STALE_TOKENS_MAX)
                .collect();
            for t in stale {
                self.grants.remove(&t);
            }
        }
    }

    /// Notes progress of an attempt (output shipped, a progress report).
    pub fn note_progress(&mut self, job_id: &str, attempt: u32, step: Option<u64>) {
        let entry = self
            .pending_progress
            .entry((job_id.to_string(), attempt))
            .or_insert(None);
        if step.is_some() {
            *entry = step.max(*entry);
        }
    }

    /// The progress to send with the next heartbeat, taken.
    pub fn take_progress(&mut self) -> BTreeMap<(String, u32), Option<u64>> {
        std::mem::take(&mut self.pending_progress)
    }
}

/// What the handlers need.
#[derive(Clone)]
pub struct RankApi {
    pub state: Arc<Mutex<RankApiState>>,
    /// The client of the coordinator the agent talks to now (it follows the leader).
    pub client: tokio::sync::watch::Receiver<AgentServiceClient<Channel>>,
    pub node_name: String,
    pub instance_id: String,
}

fn lock(state: &Mutex<RankApiState>) -> std::sync::MutexGuard<'_, RankApiState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The routes.
pub fn router(api: RankApi) -> Router {
    Router::new()
        .route("/v1/checkpoints", post(commit_checkpoint))
        .route("/v1/progress", post(progress))
        .layer(DefaultBodyLimit::max(RANK_API_BODY_BYTES_MAX))
        .fallback(|| async {
            RankApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; the agent serves POST /v1/checkpoints and POST /v1/progress"
                    .into(),
            )
        })
        .with_state(api)
}

/// An error answered to a rank: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct RankApiError(pub StatusCode, pub String);

impl IntoResponse for RankApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// The body of a checkpoint commit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    pub path: String,
    pub step: u64,
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// Optional: the job the caller means; a token of another job is refused (403).
    #[serde(default)]
    pub job: Option<String>,
}

/// The reply to a commit.
#[derive(Debug, Serialize)]
pub struct CommitReply {
    pub job: String,
    pub attempt: u32,
    pub path: String,
    pub step: u64,
    /// Older checkpoints deleted because of the job's `keep`.
    pub pruned: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    step: Option<u64>,
}

/// Resolves the bearer token to a grant, or the status to answer.
pub fn authorize(
    state: &RankApiState,
    headers: &HeaderMap,
    job: Option<&str>,
) -> Result<Grant, RankApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            RankApiError(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer $TRAINCTL_JOB_TOKEN`".into(),
            )
        })?;
    let grant = state.grants.get(token).cloned().ok_or_else(|| {
        RankApiError(
            StatusCode::UNAUTHORIZED,
            "unknown job token: not one of a job running on this host".into(),
        )
    })?;
    if let Some(job) = job {
        if job != grant.job_id {
            return Err(RankApiError(
                StatusCode::FORBIDDEN,
                format!("this token is job {}'s, not job {job}'s", grant.job_id),
            ));
        }
    }
    if !grant.current {
        return Err(RankApiError(
            StatusCode::CONFLICT,
            format!(
                "attempt {} of job {} is over; a newer attempt runs (or the job ended)",
                grant.attempt, grant.job_id
            ),
        ));
    }
    Ok(grant)
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8], example: &str) -> Result<T, RankApiError> {
    serde_json::from_slice(body).map_err(|e| {
        RankApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad JSON body: {e} (accepted: {example})"),
        )
    })
}

async fn commit_checkpoint(
    State(api): State<RankApi>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<CommitReply>, RankApiError> {
    let body: CommitBody = json_body(
        &body,
        r#"{"path": "/ckpt/step-100", "step": 100, "metrics": {"loss": 0.1}}"#,
    )?;
    let grant = authorize(&lock(&api.state), &headers, body.job.as_deref())?;
    let metrics_json = match &body.metrics {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(v @ serde_json::Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(RankApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "metrics must be a JSON object, e.g. {\"loss\": 0.25}".into(),
            ))
        }
    };
    let request = CommitCheckpointRequest {
        node_name: api.node_name.clone(),
        instance_id: api.instance_id.clone(),
        job_id: grant.job_id.clone(),
        attempt: grant.attempt,
        path: body.path.clone(),
        step: body.step,
        metrics_json,
    };
    let mut client = api.client.borrow().clone();
    let reply = client
        .commit_checkpoint(request)
        .await
        .map_err(|s| {
            let status = match s.code() {
                tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
                tonic::Code::InvalidArgument => StatusCode::UNPROCESSABLE_ENTITY,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            RankApiError(status, s.message().to_string())
        })?
        .into_inner();
    let dir = PathBuf::from(&reply.checkpoint_dir);
    let pruned = reply.pruned.clone();
    tokio::task::spawn_blocking(move || delete_pruned(&dir, &pruned))
        .await
        .ok();
    lock(&api.state).note_progress(&grant.job_id, grant.attempt, Some(body.step));
    Ok(Json(CommitReply {
        job: grant.job_id,
        attempt: grant.attempt,
        path: body.path,
        step: body.step,
        pruned: reply.pruned,
    }))
}

async fn progress(
    State(api): State<RankApi>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, RankApiError> {
    let body: ProgressBody = json_body(&body, r#"{"step": 1234}"#)?;
    let mut state = lock(&api.state);
    let grant = authorize(&state, &headers, None)?;
    state.note_progress(&grant.job_id, grant.attempt, body.step);
    Ok(StatusCode::NO_CONTENT)
}

/// Whether `path` lies strictly inside `dir`, lexically (no `..`).
pub fn inside(dir: &Path, path: &Path) -> bool {
    if dir.as_os_str().is_empty() || path.components().any(|c| c == Component::ParentDir) {
        return false;
    }
    path.starts_with(dir) && path != dir
}

/// Deletes checkpoints that fell out of `keep`, never anything outside the checkpoint dir.
pub fn delete_pruned(dir: &Path, pruned: &[String]) {
    for p in pruned {
        let path = dir.join(p);
        if !inside(dir, &path) {
            tracing::warn!(path = %path.display(), "not deleting a pruned checkpoint outside the checkpoint dir");
            continue;
        }
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => tracing::info!(path = %path.display(), "deleted a pruned checkpoint"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a pruned checkpoint")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn tokens_grant_their_own_current_attempt_only() {
        let mut state = RankApiState::default();
        state.set_current([
            ("tok-a0".to_string(), "1".to_string(), 0),
            ("tok-b0".to_string(), "2".to_string(), 0),
        ]);
        // Job 1 restarts: attempt 1 gets a new token; attempt 0's is now stale.
        state.set_current([
            ("tok-a1".to_string(), "1".to_string(), 1),
            ("tok-b0".to_string(), "2".to_string(), 0),
        ]);
        /// (token, the body's job, the grant or the status answered)
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Result<(&'a str, u32), StatusCode>,
        );
        let cases: &[Case] = &[
            (None, None, Err(StatusCode::UNAUTHORIZED)),
            (Some("nonsense"), None, Err(StatusCode::UNAUTHORIZED)),
            (Some("tok-a1"), None, Ok(("1", 1))),
            (Some("tok-a1"), Some("1"), Ok(("1", 1))),
            (Some("tok-b0"), Some("1"), Err(StatusCode::FORBIDDEN)),
            (Some("tok-a0"), None, Err(StatusCode::CONFLICT)),
        ];
        for (token, job, expected) in cases {
            let got = authorize(&state, &headers(*token), *job)
                .map(|g| (g.job_id, g.attempt))
                .map_err(|e| e.0);
            let expected = expected.map(|(j, a)| (j.to_string(), a));
            assert_eq!(got, expected, "token {token:?} job {job:?}");
        }
    }

    #[test]
    fn pruning_never_leaves_the_checkpoint_dir() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ckpt");
        std::fs::create_dir_all(root.join("step-10")).unwrap();
        std::fs::write(root.join("step-10/params.bin"), b"x").unwrap();
        let outside = dir.path().join("precious");
        std::fs::write(&outside, b"keep me").unwrap();
        delete_pruned(
            &root,
            &[
                root.join("step-10").to_string_lossy().into_owned(),
                outside.to_string_lossy().into_owned(),
                format!("{}/../precious", root.display()),
            ],
        );
        assert!(!root.join("step-10").exists());
        assert!(outside.exists());
    }

    #[test]
    fn progress_keeps_the_newest_step() {
        let mut state = RankApiState::default();
        state.note_progress("1", 0, Some(5));
        state.note_progress("1", 0, None);
        state.note_progress("1", 0, Some(3));
        state.note_progress("2", 1, None);
        let taken = state.take_progress();
        assert_eq!(taken[&("1".to_string(), 0)], Some(5));
        assert_eq!(taken[&("2".to_string(), 1)], None);
        assert!(state.take_progress().is_empty());
    }
}
