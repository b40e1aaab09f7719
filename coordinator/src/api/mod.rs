//! The REST API: everything the CLI does, as JSON over HTTP, described by an OpenAPI document at
//! `/openapi.json` (browsable at `/docs`).
//!
//! Errors map to status codes in exactly one place, [`ApiError`]'s `IntoResponse`. A user's mistake is a
//! 4xx with a message; 5xx is for the coordinator's own faults.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use trainctl_jobs::JobSpec;
use utoipa::OpenApi;

pub mod access;
pub mod cluster;
mod dto;
mod error;
mod metrics;
mod views;

pub use dto::*;
use error::body_or_error;
pub use error::{
    grpc_or_no_such_endpoint, is_grpc, with_json_errors, ApiError, ApiQuery, ErrorBody,
};
pub use metrics::Metrics;
use views::{checkpoint_view, detail, node_view, summary, View};

use crate::auth::Principal;
use crate::logs::{format_cursor, parse_cursor};
use crate::scheduler::{self, Unschedulable};
use crate::server::{job_counts, now_ms, Coordinator};
use crate::state::{Command, CommandOutcome, JobId, JobState, Node, NodeId, NodeStatus};

type Ctx = State<Arc<Coordinator>>;

/// The REST routes, the OpenAPI document and its browser UI.
pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/jobs/{id}/checkpoints", get(job_checkpoints))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/nodes/{name}/drain", post(drain_node))
        .route("/v1/nodes/{name}/undrain", post(undrain_node))
        .route(
            "/v1/tokens",
            post(access::create_token).get(access::list_tokens),
        )
        .route("/v1/tokens/{id}/revoke", post(access::revoke_token))
        .route("/v1/audit", get(access::audit))
        .route("/v1/whoami", get(access::whoami))
        .route("/v1/cluster", get(cluster::cluster))
        .route("/v1/cluster/join", post(cluster::join))
        .route("/v1/cluster/members", post(cluster::add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(cluster::remove_member),
        )
        .route("/v1/cluster/leader", post(cluster::transfer_leader))
        .route("/v1/join", post(access::join))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs").url("/docs/openapi.json", ApiDoc::openapi()),
        )
        .layer(axum::middleware::from_fn_with_state(
            coordinator.clone(),
            crate::auth::layer,
        ))
        .with_state(coordinator)
}

/// The OpenAPI description of the REST API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "trainctl",
        description = "Gang-scheduled distributed training jobs"
    ),
    paths(
        submit_job,
        list_jobs,
        get_job,
        cancel_job,
        job_logs,
        job_checkpoints,
        list_nodes,
        drain_node,
        undrain_node,
        remove_node,
        access::create_token,
        access::list_tokens,
        access::revoke_token,
        access::audit,
        access::whoami,
        access::join,
        cluster::cluster,
        cluster::join,
        cluster::add_member,
        cluster::remove_member,
        cluster::transfer_leader,
        health,
        metrics
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(
        JobSpecBody,
        LaunchBody,
        ResourcesBody,
        FabricBody,
        NodeCount,
        FailureBody,
        CheckpointBody,
        ErrorBody,
        SubmitResponse,
        JobSummary,
        JobDetail,
        RankView,
        AllocationView,
        LaunchEnvView,
        NodeView,
        GpuView,
        NicAffinityView,
        RdmaDeviceView,
        RdmaPortView,
        RdmaGidView,
        AttemptView,
        CheckpointView,
        LogLine,
        LogsPage,
        Health,
        access::CreateTokenBody,
        access::TokenView,
        access::CreatedToken,
        access::AuditView,
        access::WhoAmI,
        access::JoinBody,
        access::JoinResponse,
        cluster::ClusterView,
        cluster::MemberView,
        cluster::ServerRef,
        crate::membership::JoinRequest,
        crate::membership::JoinGrant,
        crate::membership::AddMemberRequest,
        crate::membership::TransferLeaderRequest
    ))
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme (`Authorization: Bearer tctl_...`) every operation but
/// health, the document itself and joining requires.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A trainctl token (`tctl_<id>_<secret>`, from `trainctl token create`); \
                         coordinators started with --insecure need none",
                    ))
                    .build(),
            ),
        );
        // Public operations need no token; every other one may answer 401 and 403.
        let error = |description: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let public = matches!(path.as_str(), "/v1/health" | "/v1/join");
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                if public {
                    op.security = Some(Vec::new());
                    continue;
                }
                for (code, description) in [
                    (
                        "401",
                        "No token, or one that is malformed, unknown, expired or revoked",
                    ),
                    ("403", "The token's role may not do this"),
                ] {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

fn parse_job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse().map_err(ApiError::BadRequest)
}

/// Reads a job spec from a request body: TOML or JSON, by Content-Type or, without one, by its look.
pub fn spec_from_body(headers: &HeaderMap, body: &[u8]) -> Result<JobSpec, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::BadRequest("the body is not UTF-8 text; send a job spec as TOML or JSON".into())
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "the body is empty; send a job spec as TOML (Content-Type: application/toml) or JSON (application/json)"
                .into(),
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let is_json = match content_type.as_deref() {
        Some("application/json") => true,
        Some("application/toml") | Some("text/toml") | Some("text/x-toml") => false,
        None | Some("text/plain") | Some("application/octet-stream") | Some("application/x-www-form-urlencoded") => {
            text.trim_start().starts_with('{')
        }
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type `{other}` is not accepted; send the job spec as application/toml or application/json"
            )))
        }
    };
    let parsed = if is_json {
        JobSpec::from_json(text, "request body")
    } else {
        JobSpec::from_toml(text, "request body")
    };
    parsed.map_err(|e| ApiError::InvalidSpec(e.to_string()))
}

/// Submit a job (TOML or JSON job spec).
///
/// With an `Idempotency-Key` header the submission is made once: a retry with the same key (after a
/// timeout, a 503, a leader change) returns the first job's id, with the same 201 and body plus
/// `Idempotent-Replayed: true`, and creates nothing. Keys are the submitter's own (scoped by token),
/// remembered for 24 hours (at most 100 000, the oldest forgotten first). The same key with another
/// spec or `resume_from` is refused with 409.
#[utoipa::path(post, path = "/v1/jobs",
    params(SubmitQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the submission idempotent: \
            1 to 128 printable ASCII characters, unique per submission (a random UUID). A retry with the \
            same key and request returns the first job; see the description.")),
    request_body(description = "A job spec: JSON (application/json) with the schema below, or the same \
        document as TOML (application/toml, the `job.toml` a user writes). Without a Content-Type, a body \
        starting with `{` is read as JSON, anything else as TOML. Unknown keys and repeated keys are errors.",
        content((JobSpecBody = "application/json"), (String = "application/toml"))),
    responses(
        (status = 201, body = SubmitResponse, description = "Queued; or, for a retry with the same \
            `Idempotency-Key`, the job the first request queued (then with `Idempotent-Replayed: true`)",
            headers(("Idempotent-Replayed" = String, description = "`true` when this answers a retry: \
                the job was made by an earlier request with the same `Idempotency-Key`"))),
        (status = 400, body = ErrorBody, description = "Not a job spec (empty, not UTF-8), a bad query string or `resume_from` id, or a malformed `Idempotency-Key`"),
        (status = 404, body = ErrorBody, description = "The `resume_from` job does not exist"),
        (status = 409, body = ErrorBody, description = "The `resume_from` job has committed no checkpoint, or the \
            `Idempotency-Key` was already used for a different request"),
        (status = 413, body = ErrorBody, description = "The body is over the size limit"),
        (status = 415, body = ErrorBody, description = "Neither TOML nor JSON"),
        (status = 422, body = ErrorBody, description = "Invalid spec, or a job that can never fit the cluster"),
        (status = 500, body = ErrorBody, description = "The cluster state could not be written"),
        (status = 503, body = ErrorBody, description = "Not the leader")))]
async fn submit_job(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<SubmitQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let body = body_or_error(body)?;
    let spec = spec_from_body(&headers, &body)?;
    let resume_from_job = q.resume_from.as_deref().map(parse_job_id).transpose()?;
    // A key already recorded: the write answers (a replay or a conflict), whatever the checks
    // below would say now (the cluster may have shrunk since the first request).
    let known = key.as_deref().is_some_and(|key| {
        c.state
            .read(|s| s.idempotency.get(&who.actor(), key, now_ms()).is_some())
    });
    if let Some(other) = resume_from_job.filter(|_| !known) {
        let newest = c.state.read(|s| {
            s.jobs
                .get(&other)
                .filter(|j| who.sees(j))
                .map(|j| j.resume_point().is_some())
        });
        match newest {
            None => return Err(c.state.read(|s| no_such_job(s, other))),
            Some(false) => {
                return Err(ApiError::Conflict(format!(
                    "job {other} has committed no checkpoint to resume from"
                )))
            }
            Some(true) => {}
        }
    }
    let fit = c
        .state
        .read(|s| scheduler::check_ever_fits(s.nodes.values().map(Node::size), &spec.resources));
    if let (false, Err(Unschedulable::NeverFits(why)) | Err(Unschedulable::NoRoomNow(why))) =
        (known, fit)
    {
        return Err(ApiError::Infeasible(format!(
            "job `{}` can never run here: {why}",
            spec.name
        )));
    }
    let digest = key
        .as_ref()
        .map(|_| crate::state::request_digest(&spec, resume_from_job));
    let submit = Command::SubmitJob {
        spec,
        at_ms: now_ms(),
        secret: format!("{:032x}", rand::random::<u128>()),
        resume_from_job,
    };
    let command = match (key.clone(), digest) {
        (Some(key), Some(digest)) => Command::Idempotent {
            key,
            digest,
            submit: Box::new(submit),
        },
        _ => submit,
    };
    let created = |job: JobId| {
        (
            StatusCode::CREATED,
            Json(SubmitResponse {
                id: job.to_string(),
            }),
        )
            .into_response()
    };
    match c.write_as(&who, command).await? {
        CommandOutcome::JobSubmitted { job } => {
            c.metrics.submissions.inc();
            Ok(created(job))
        }
        CommandOutcome::JobReplayed { job } => {
            let mut response = created(job);
            response.headers_mut().insert(
                HeaderName::from_static(IDEMPOTENT_REPLAYED),
                HeaderValue::from_static("true"),
            );
            Ok(response)
        }
        CommandOutcome::IdempotencyKeyReused { job } => Err(ApiError::Conflict(format!(
            "the Idempotency-Key `{}` was already used for a different request (job {job}); \
             send a new key with a different job spec or resume_from",
            key.as_deref().unwrap_or_default().escape_debug()
        ))),
        CommandOutcome::Rejected { reason } => Err(ApiError::InvalidSpec(reason)),
        _ => Err(ApiError::Internal("submission produced no job id".into())),
    }
}

/// The request header that makes a submission idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header of a submission answered from an earlier one with the same key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The request's `Idempotency-Key`, if it has one; 400 for a malformed one or several.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".into(),
        ));
    }
    let key = String::from_utf8_lossy(value.as_bytes()).into_owned();
    match crate::state::idempotency_key_problem(&key) {
        Some(problem) => Err(ApiError::BadRequest(problem)),
        None => Ok(Some(key)),
    }
}

/// A fresh idempotency key for one submission: 32 random hex digits (what the CLI sends).
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// List jobs, oldest first.
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery),
    responses((status = 200, body = [JobSummary]), (status = 400, body = ErrorBody)))]
async fn list_jobs(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    if let Some(st) = &q.state {
        if !JobState::ALL.iter().any(|s| s.as_str() == st) {
            let accepted: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            return Err(ApiError::BadRequest(format!(
                "unknown state `{st}`; accepted: {}",
                accepted.join(", ")
            )));
        }
    }
    Ok(Json(c.state.read(|s| {
        let view = View::new(s);
        s.jobs
            .values()
            .filter(|j| who.sees(j))
            .filter(|j| q.state.as_deref().is_none_or(|st| j.state.as_str() == st))
            .map(|j| summary(&view, j))
            .collect()
    })))
}

/// Get one job: state, placement, and every rank's state and exit code.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobDetail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    let id = parse_job_id(&id)?;
    job_detail_for(&c, &who, id).map(Json)
}

/// A job as `who` may see it (404 for a job of another namespace; env values hidden from readers).
fn job_detail_for(c: &Coordinator, who: &Principal, id: JobId) -> Result<JobDetail, ApiError> {
    c.state.read(|s| {
        s.jobs
            .get(&id)
            .filter(|j| who.sees(j))
            .map(|j| {
                let mut d = detail(&View::new(s), j);
                if !who.sees_env_of(j) {
                    for value in d.spec.launch.env.values_mut() {
                        *value = HIDDEN_ENV_VALUE.to_string();
                    }
                }
                d
            })
            .ok_or_else(|| no_such_job(s, id))
    })
}

/// The 404 for job `id`, which is not in the state (or not visible to the caller): a job the
/// retention forgot says so.
fn no_such_job(s: &crate::state::State, id: JobId) -> ApiError {
    if s.was_forgotten(id) {
        ApiError::JobForgotten(id)
    } else {
        ApiError::JobNotFound(id)
    }
}

/// What a reader sees instead of an env value (only admins and submitters see the values).
pub const HIDDEN_ENV_VALUE: &str = "(hidden)";

/// 404 unless `who` may see job `id`.
fn visible_job(c: &Coordinator, who: &Principal, id: JobId) -> Result<(), ApiError> {
    c.state.read(|s| {
        if s.jobs.get(&id).is_some_and(|j| who.sees(j)) {
            Ok(())
        } else {
            Err(no_such_job(s, id))
        }
    })
}

/// Cancel a job: a pending job leaves the queue; a running gang is stopped (SIGTERM, grace, SIGKILL).
/// With `checkpoint=true`, the ranks first get the job's checkpoint signal and the stop waits up to
/// its `[checkpoint] grace` for a new commit.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path, description = "Job id"), CancelQuery),
    responses((status = 200, body = JobDetail), (status = 400, body = ErrorBody, description = "Not a job id, or a bad query string"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Already ended"),
        (status = 500, body = ErrorBody, description = "The cluster state could not be written"),
        (status = 503, body = ErrorBody, description = "Not the leader")))]
async fn cancel_job(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<CancelQuery>,
) -> Result<Json<JobDetail>, ApiError> {
    let id = parse_job_id(&id)?;
    visible_job(&c, &who, id)?;
    if q.checkpoint {
        checkpoint_now(&c, id).await?;
    }
    match c
        .write_as(
            &who,
            Command::CancelJob {
                job: id,
                at_ms: now_ms(),
            },
        )
        .await?
    {
        CommandOutcome::Rejected { reason } => Err(ApiError::Conflict(reason)),
        _ => job_detail_for(&c, &who, id).map(Json),
    }
}

/// Read a job's output, each line tagged with node and global rank. Follow by passing the cursor back.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = String, Path, description = "Job id"), LogsQuery),
    responses((status = 200, content((LogsPage = "application/json"), (String = "text/plain")), description = "A page of lines; `format=text` gives plain text"),
        (status = 400, body = ErrorBody, description = "Not a job id, no such rank, a bad cursor or query string"),
        (status = 404, body = ErrorBody), (status = 500, body = ErrorBody, description = "The logs could not be read")))]
async fn job_logs(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    visible_job(&c, &who, id)?;
    let cursor = parse_cursor(q.cursor.as_deref().unwrap_or("")).map_err(ApiError::BadRequest)?;
    let found = c.state.read(|s| {
        s.jobs.get(&id).map(|j| {
            // The attempt asked for, else the current one if it has ranks, else the last that ran.
            let record = match q.attempt {
                Some(a) => j.attempts.iter().find(|r| r.attempt == a),
                None if !j.ranks.is_empty() => None,
                None => j.attempts.last(),
            };
            let procs = j.spec.resources.procs_per_node;
            let (attempt, nodes): (u32, BTreeMap<u32, String>) = match record {
                Some(r) if r.attempt != j.attempt || j.ranks.is_empty() => (
                    r.attempt,
                    r.nodes
                        .iter()
                        .enumerate()
                        .flat_map(|(g, n)| {
                            (0..procs).map(move |l| (g as u32 * procs + l, n.to_string()))
                        })
                        .collect(),
                ),
                _ => (
                    j.attempt,
                    j.ranks
                        .iter()
                        .map(|r| (r.rank, r.node.to_string()))
                        .collect(),
                ),
            };
            // Every host has shipped all it will: its share is released, or its node is down (a
            // lost node that returns ships what it still has, but nobody should wait for that).
            let node_down =
                |n: &NodeId| s.nodes.get(n).is_none_or(|n| n.status == NodeStatus::Down);
            let complete = j.state.is_terminal()
                && j.allocation
                    .as_ref()
                    .is_none_or(|a| a.nodes.iter().all(|n| n.released || node_down(&n.node)));
            let complete = complete || attempt != j.attempt;
            let world_size = nodes.len() as u32;
            (attempt, nodes, complete, world_size)
        })
    });
    let Some((attempt, nodes, complete, world_size)) = found else {
        return Err(c.state.read(|s| no_such_job(s, id)));
    };
    let ranks: Vec<u32> = match q.rank {
        Some(r) if r >= world_size => {
            return Err(ApiError::BadRequest(format!(
                "rank {r} does not exist in attempt {attempt} of job {id} (world size {world_size})"
            )))
        }
        Some(r) => vec![r],
        None => nodes.keys().copied().collect(),
    };
    // What this coordinator's copy lacks (it caught up from a snapshot), from the others.
    crate::log_repair::fill_in(&c, id, attempt, &ranks).await;
    let store = c.logs.clone();
    let (lines, next) =
        tokio::task::spawn_blocking(move || store.read(id, attempt, &ranks, &cursor))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("read logs of job {id}: {e}")))?;
    // Complete only once nothing is left unread.
    let complete = complete && lines.is_empty();
    let lines: Vec<LogLine> = lines
        .into_iter()
        .map(|l| LogLine {
            node: nodes.get(&l.rank).cloned().unwrap_or_default(),
            rank: l.rank,
            text: l.text,
        })
        .collect();
    if q.format.as_deref() == Some("text") {
        let mut out = String::new();
        for l in &lines {
            out.push_str(&format!("[{} rank {}] {}\n", l.node, l.rank, l.text));
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response());
    }
    Ok(Json(LogsPage {
        lines,
        cursor: format_cursor(&next),
        complete,
    })
    .into_response())
}

/// Asks a running job's ranks to checkpoint now and waits up to the job's grace for a new commit.
/// Returns whether one arrived. A job without a checkpoint signal is not waited for.
pub async fn checkpoint_now(c: &Coordinator, job: JobId) -> Result<bool, ApiError> {
    let before = c.state.read(|s| {
        s.jobs.get(&job).map(|j| {
            let policy = j.spec.checkpoint.as_ref();
            (
                j.checkpoints.last().map(|c| (c.path.clone(), c.at_ms)),
                policy.and_then(|p| p.signal_number()).is_some(),
                policy.map_or(0, |p| p.grace_ms),
                matches!(j.state, JobState::Starting | JobState::Running),
            )
        })
    });
    let Some((newest, has_signal, grace_ms, live)) = before else {
        return Err(ApiError::JobNotFound(job));
    };
    if !has_signal || !live {
        return Ok(false);
    }
    let mut changes = c.state.subscribe();
    if let CommandOutcome::Rejected { .. } = c.write(Command::RequestCheckpoint { job }).await? {
        return Ok(false);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(grace_ms);
    loop {
        let (committed, over) = c.state.read(|s| {
            s.jobs.get(&job).map_or((false, true), |j| {
                (
                    j.checkpoints.last().map(|c| (c.path.clone(), c.at_ms)) != newest,
                    !matches!(j.state, JobState::Starting | JobState::Running),
                )
            })
        });
        if committed {
            return Ok(true);
        }
        if over {
            return Ok(false);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Ok(false) },
            _ = tokio::time::sleep_until(deadline) => return Ok(false),
        }
    }
}

/// List a job's committed checkpoints, oldest first.
#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoints", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = [CheckpointView]), (status = 400, body = ErrorBody, description = "Not a job id"), (status = 404, body = ErrorBody)))]
async fn job_checkpoints(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<CheckpointView>>, ApiError> {
    let id = parse_job_id(&id)?;
    visible_job(&c, &who, id)?;
    c.state
        .read(|s| {
            s.jobs
                .get(&id)
                .map(|j| j.checkpoints.iter().map(checkpoint_view).collect())
        })
        .map(Json)
        .ok_or(ApiError::JobNotFound(id))
}

fn node_or_404(c: &Coordinator, name: &str) -> Result<NodeId, ApiError> {
    let node = NodeId(name.to_string());
    if c.state.read(|s| s.nodes.contains_key(&node)) {
        Ok(node)
    } else {
        Err(ApiError::NodeNotFound(name.to_string()))
    }
}

fn get_node_view(c: &Coordinator, node: &NodeId) -> Result<Json<NodeView>, ApiError> {
    c.state
        .read(|s| s.nodes.get(node).map(|n| node_view(s, n)))
        .map(Json)
        .ok_or_else(|| ApiError::NodeNotFound(node.to_string()))
}

/// Drain a node: nothing new is placed on it, and each job running there gets its checkpoint signal,
/// waits up to its grace for a commit, and is placed again elsewhere (not counted as a restart).
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody, description = "The cluster state could not be written"), (status = 503, body = ErrorBody, description = "Not the leader")))]
async fn drain_node(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let node = node_or_404(&c, &name)?;
    c.write_as(
        &who,
        Command::SetNodeDrained {
            node: node.clone(),
            drained: true,
        },
    )
    .await?;
    move_jobs_off(&c, &node, "was drained").await?;
    get_node_view(&c, &node)
}

/// Moves every job running on `node` elsewhere: each gets its checkpoint signal and up to its
/// grace for a commit, then is placed again (not counted as a restart). `why` completes "node X ...".
async fn move_jobs_off(c: &Coordinator, node: &NodeId, why: &str) -> Result<(), ApiError> {
    let jobs: Vec<(JobId, u32)> = c.state.read(|s| {
        s.jobs_assigned_to(node)
            .map(|j| (j.id, j.attempt))
            .collect()
    });
    for (job, attempt) in jobs {
        let committed = checkpoint_now(c, job).await?;
        let reason = format!(
            "node {node} {why}{}",
            if committed {
                " (after a checkpoint)"
            } else {
                ""
            }
        );
        c.write(Command::RestartJob {
            job,
            attempt,
            reason,
            end: crate::state::AttemptEnd::Drained,
            at_ms: now_ms(),
        })
        .await?;
    }
    Ok(())
}

/// Undrain a node: it takes new work again.
#[utoipa::path(post, path = "/v1/nodes/{name}/undrain", params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody), (status = 500, body = ErrorBody, description = "The cluster state could not be written"), (status = 503, body = ErrorBody, description = "Not the leader")))]
async fn undrain_node(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let node = node_or_404(&c, &name)?;
    c.write_as(
        &who,
        Command::SetNodeDrained {
            node: node.clone(),
            drained: false,
        },
    )
    .await?;
    get_node_view(&c, &node)
}

/// Remove a node for good (a host that will not return). Refused while its agent is up and the node
/// is not drained; whatever it held is given up and its jobs are placed again.
#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = String, Path, description = "Node name")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The node is up and not drained"),
        (status = 500, body = ErrorBody, description = "The cluster state could not be written"), (status = 503, body = ErrorBody, description = "Not the leader")))]
async fn remove_node(
    State(c): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let node = NodeId(name.clone());
    let known = c
        .state
        .read(|s| s.nodes.contains_key(&node) || s.identities.values().any(|i| i.node == node));
    if !known {
        return Err(ApiError::NodeNotFound(name));
    }
    match c
        .write_as(
            &who,
            Command::RemoveNode {
                node,
                at_ms: now_ms(),
            },
        )
        .await?
    {
        CommandOutcome::Rejected { reason } => Err(ApiError::Conflict(reason)),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

/// List the cluster's nodes with what they have and what jobs hold.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = [NodeView])))]
async fn list_nodes(State(c): Ctx) -> Json<Vec<NodeView>> {
    Json(
        c.state
            .read(|s| s.nodes.values().map(|n| node_view(s, n)).collect()),
    )
}

/// Health of this coordinator and a summary of the cluster.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health, description = "A leader is known"), (status = 503, body = Health, description = "No leader is known")))]
async fn health(State(c): Ctx) -> (StatusCode, Json<Health>) {
    let m = c.raft.metrics().borrow().clone();
    let (up, down) = c.state.read(|s| {
        let up = s
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Up)
            .count() as u64;
        (up, s.nodes.len() as u64 - up)
    });
    let health = Health {
        status: if m.current_leader.is_some() {
            "ok"
        } else {
            "no_leader"
        }
        .to_string(),
        server_id: c.config.server_id,
        is_leader: m.current_leader == Some(c.config.server_id),
        leader: m.current_leader,
        raft_term: m.current_term,
        cluster_id: c.state.read(|s| s.cluster_id.clone()),
        last_applied_index: m.last_applied.map(|l| l.index),
        nodes_up: up,
        nodes_down: down,
        jobs: job_counts(&c)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        uptime_s: c.started_at.elapsed().as_secs(),
    };
    let status = if health.leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text format", content_type = "application/openmetrics-text"),
    (status = 500, body = ErrorBody, description = "The metrics could not be encoded")))]
async fn metrics(State(c): Ctx) -> Result<Response, ApiError> {
    let applied = c
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    let jobs = job_counts(&c);
    c.state.read(|s| c.metrics.observe(&jobs, s, applied));
    let body = c.metrics.encode()?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_job_spec_example_is_a_valid_spec_and_unknown_keys_are_declared_errors() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let example = &schemas["JobSpecBody"]["example"];
        let spec = JobSpec::from_json(&example.to_string(), "example").unwrap();
        assert_eq!(spec.resources.node_range(), (2, 4));
        for name in [
            "JobSpecBody",
            "LaunchBody",
            "ResourcesBody",
            "FailureBody",
            "CheckpointBody",
        ] {
            assert_eq!(
                schemas[name]["additionalProperties"],
                serde_json::json!(false),
                "{name}"
            );
        }
    }
}
