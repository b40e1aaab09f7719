//! The REST API: everything the CLI does, as JSON over HTTP, described by an OpenAPI document at
//! `/openapi.json` (browsable at `/docs`).
//!
//! Errors map to status codes in exactly one place, [`ApiError`]'s `IntoResponse`. A user's mistake is a
//! 4xx with a message; 5xx is for the coordinator's own faults.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trainctl_jobs::{limits, JobSpec};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub mod access;
pub mod cluster;

use crate::auth::Principal;
use crate::logs::{format_cursor, parse_cursor};
use crate::scheduler::{self, Unschedulable};
use crate::server::{job_counts, now_ms, Coordinator, WriteError};
use crate::state::{
    Command, CommandOutcome, Job, JobId, JobState, Node, NodeId, NodeStatus, RankPhase,
    State as ClusterState,
};

/// Everything that can go wrong in a request, each with its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("job {0} does not exist")]
    JobNotFound(JobId),
    #[error("job {0} ended and was forgotten: the coordinators keep finished jobs for --job-retention-days (30 by default) and at most --max-finished-jobs (100 000 by default), the oldest going first")]
    JobForgotten(JobId),
    #[error("no node named `{0}` (see `trainctl nodes`)")]
    NodeNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Infeasible(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{0}")]
    Internal(String),
    /// A body over the server's limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// No route has this path (and the request is not gRPC).
    #[error("no such endpoint: {method} {path} (see /openapi.json)")]
    NoSuchEndpoint { method: Method, path: String },
    /// The path exists but not with this method; `allow` lists the methods it has.
    #[error("method {method} is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: String,
    },
    /// A request refused by the HTTP layer before any handler ran, with the status it chose.
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    /// Something other than a job or node that does not exist (a token).
    #[error("{0}")]
    NotFound(String),
    /// No token, or one that is malformed, unknown, expired or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// A good token whose role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No leader can answer now (an election, a coordinator cut off from the majority): 503
    /// with `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what is accepted.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidSpec(_) | ApiError::Infeasible(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::JobNotFound(_)
            | ApiError::JobForgotten(_)
            | ApiError::NodeNotFound(_)
            | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Write(WriteError::NotLeader { .. } | WriteError::Unconfirmed)
            | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Write(WriteError::Raft(_)) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoSuchEndpoint { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Rejected { status, .. } => *status,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let allow = match &self {
            ApiError::MethodNotAllowed { allow, .. } => HeaderValue::from_str(allow).ok(),
            _ => None,
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"trainctl\""),
            );
        }
        response
    }
}

/// `Query`, with a malformed query string answered by [`ApiError`] (a JSON 400) rather than
/// axum's plain-text rejection.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "{}; see the parameters of {} in /openapi.json",
                e.body_text(),
                parts.uri.path()
            ))),
        }
    }
}

/// A request body, or why it could not be read (413 past the server's body limit).
fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is over the size limit; a job spec may be at most {} bytes ({} MiB)",
                limits::SPEC_SOURCE_BYTES_MAX,
                limits::SPEC_SOURCE_BYTES_MAX >> 20
            ))
        } else {
            ApiError::Rejected {
                status: e.status(),
                message: e.body_text(),
            }
        }
    })
}

/// Whether a request is gRPC (an agent): only those reach the agent service.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The fallback of the whole server: gRPC requests go to `grpc` (the agent service, whose own
/// fallback answers unknown gRPC methods with `UNIMPLEMENTED`); anything else that no route
/// matched is a JSON 404, never an empty `200 application/grpc` that looks like success.
pub fn grpc_or_no_such_endpoint(grpc: Router) -> Router {
    Router::new().fallback(move |request: Request| {
        let mut grpc = grpc.clone();
        async move {
            if is_grpc(request.headers()) {
                match tower::Service::call(&mut grpc, request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            } else {
                ApiError::NoSuchEndpoint {
                    method: request.method().clone(),
                    path: request.uri().path().to_string(),
                }
                .into_response()
            }
        }
    })
}

/// `app` with [`json_errors`] around it as a whole. Around the whole router, not its routes
/// (`Router::layer`): axum adds a 405's `Allow` header outside of any route layer.
pub fn with_json_errors(app: Router) -> Router {
    use tower::Layer;
    Router::new().fallback_service(axum::middleware::from_fn(json_errors).layer(app))
}

/// Turns the error responses axum makes itself (405 with an empty body, plain-text rejections)
/// into JSON `{"error": ...}` bodies through [`ApiError`], keeping their status (and a 405's
/// `Allow` header). Responses that are not errors, or already JSON, pass untouched.
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    // The agents' gRPC and the coordinators' Raft protocols are not the REST API: left as they are.
    if is_grpc(request.headers()) || path.starts_with("/internal/") {
        return next.run(request).await;
    }
    let request = request.map(|body| axum::body::Body::new(DrainOnDrop(Some(body))));
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = response
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        return ApiError::MethodNotAllowed {
            method,
            path,
            allow,
        }
        .into_response();
    }
    const MESSAGE_BYTES_MAX: usize = 4096;
    let text = axum::body::to_bytes(response.into_body(), MESSAGE_BYTES_MAX)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        format!(
            "{method} {path}: {}",
            status.canonical_reason().unwrap_or("error")
        )
    } else {
        text
    };
    ApiError::Rejected { status, message }.into_response()
}

/// A request body that, dropped before its end (a request answered without reading its body: a
/// 401 from the auth layer, a 404 or 405), is read to its end in the background and discarded.
/// Without it, hyper closes the connection while the client still sends the body, and the client
/// gets a reset or a TLS EOF instead of the answer. The body keeps its bounds (`crate::http`: the
/// size limit and the idle timeout), so draining one costs no more than reading it would.
struct DrainOnDrop(Option<axum::body::Body>);

impl hyper::body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        match &mut self.get_mut().0 {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            |body| body.size_hint(),
        )
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        use http_body_util::BodyExt;
        use hyper::body::Body as _;
        let Some(mut body) = self.0.take().filter(|body| !body.is_end_stream()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
        }
    }
}

/// A job spec as JSON: the same document as the TOML `job.toml`, read by the same parser
/// (`trainctl_jobs::JobSpec::from_json`). Only the OpenAPI description uses this type; it mirrors
/// the spec's schema, defaults and bounds. Durations are strings such as `"500ms"`, `"30s"`, `"10m"`,
/// `"1h30m"`, or whole milliseconds under the `_ms` key: one of the two, not both. A `null` value
/// is the same as leaving the key out. In a job's detail, `spec` is the stored canonical form: every
/// default filled in, `min_nodes` set, durations as `_ms`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "ddp",
    "launch": {"command": ["python3", "train.py"], "env": {"NCCL_DEBUG": "WARN"}},
    "resources": {"nodes": "2:4", "procs_per_node": 8, "gpus_per_node": 8, "fabric": "ib"},
    "failure": {"max_restarts": 3, "hang_timeout": "10m"},
    "checkpoint": {"dir": "/shared/ckpt/{job}", "signal": "SIGUSR1", "grace": "2m", "keep": 3}
}))]
struct JobSpecBody {
    /// 1 to 63 characters of `a-z`, `0-9`, `.`, `_` and `-`, starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9._-]*$")]
    name: String,
    launch: LaunchBody,
    resources: ResourcesBody,
    failure: Option<FailureBody>,
    checkpoint: Option<CheckpointBody>,
}

/// What every rank runs.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LaunchBody {
    /// The argv, never a shell string: `command[0]` is the program, looked up in `PATH`.
    #[schema(min_items = 1)]
    command: Vec<String>,
    /// Working directory: absolute, or relative to the spec file's directory (the CLI's).
    workdir: Option<String>,
    /// Extra environment for every rank; names trainctl sets itself (RANK, WORLD_SIZE,
    /// MASTER_ADDR, TRAINCTL_*, ...) are refused.
    env: Option<BTreeMap<String, String>>,
}

/// How many hosts (`resources.nodes`); its schema is written by hand: an integer or a string.
#[derive(Serialize)]
struct NodeCount;

impl utoipa::PartialSchema for NodeCount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .description(Some(
                "An integer (exactly that many hosts), or a string \"N\" or \"MIN:MAX\" (an elastic job, \
                 like torchrun's --nnodes), from 1 to 100000",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(limits::NODES_MAX)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]+(:[0-9]+)?$"))
                    .examples(["2:4"]),
            )
            .into()
    }
}

impl ToSchema for NodeCount {}

/// The gang's shape and what each host must provide.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResourcesBody {
    nodes: NodeCount,
    /// The fewest hosts, 1 to `nodes` (default: `nodes`; 0 also means `nodes`). With
    /// `nodes = "MIN:MAX"` it must equal MIN.
    #[schema(minimum = 0, maximum = 100_000)]
    min_nodes: Option<u32>,
    /// Ranks per host.
    #[schema(minimum = 1, maximum = 1024)]
    procs_per_node: u32,
    /// GPUs per host: 0 (CPU-only, the default) or at least `procs_per_node`.
    #[schema(minimum = 0, maximum = 1024)]
    gpus_per_node: Option<u32>,
    /// CPUs per host (default: `procs_per_node`).
    #[schema(minimum = 1, maximum = 65_536)]
    cpus_per_node: Option<u32>,
    /// Memory per host in MiB (default 0: no requirement).
    #[schema(minimum = 0, maximum = 67_108_864)]
    memory_per_node_mib: Option<u64>,
    /// The RDMA fabric every host of the gang must have an ACTIVE port on (default `any`).
    fabric: Option<FabricBody>,
}

/// `ib`: InfiniBand; `roce`: RDMA over Converged Ethernet; `any` (the default): no requirement. A
/// job whose fabric no host has waits (pending, with the reason) rather than being refused.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum FabricBody {
    Ib,
    Roce,
    Any,
}

/// What to do when a rank fails or the gang hangs.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FailureBody {
    /// Job-wide restart budget (default 0).
    #[schema(minimum = 0, maximum = 10_000)]
    max_restarts: Option<u32>,
    /// Restart a gang that makes no progress this long (a duration, 1s to 7 days); default: never.
    #[schema(example = "10m")]
    hang_timeout: Option<String>,
    /// The same in milliseconds (not together with `hang_timeout`).
    #[schema(minimum = 1_000, maximum = 604_800_000)]
    hang_timeout_ms: Option<u64>,
}

/// How the job's ranks checkpoint, for planned stops (resizes, drains) and cleanup.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    /// Where ranks write checkpoints; `{job}` and `{name}` are expanded. Relative to the workdir.
    #[schema(min_length = 1, max_length = 4096, example = "/shared/ckpt/{job}")]
    dir: String,
    /// The "checkpoint now" signal, e.g. `SIGUSR1`, `USR1` or `usr1` (not KILL or STOP); default: none.
    signal: Option<String>,
    /// How long a planned stop waits for a new checkpoint (a duration, 0 to 1h; default "2m").
    #[schema(example = "2m")]
    grace: Option<String>,
    /// The same in milliseconds (not together with `grace`).
    #[schema(minimum = 0, maximum = 3_600_000)]
    grace_ms: Option<u64>,
    /// Committed checkpoints to keep on disk (default: all).
    #[schema(minimum = 1, maximum = 10_000)]
    keep: Option<u32>,
}

/// The reply to a submission.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    /// The new job's id.
    pub id: String,
}

/// One job in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    /// One of pending, starting, running, succeeded, failed, cancelled.
    pub state: String,
    pub nodes: u32,
    pub procs_per_node: u32,
    pub world_size: u32,
    pub gpus_per_node: u32,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Why the job failed or was cancelled.
    pub reason: Option<String>,
    /// Why a pending job is still waiting.
    pub pending_reason: Option<String>,
}

/// One rank of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RankView {
    pub rank: u32,
    pub local_rank: u32,
    pub node: String,
    /// One of pending, running, exited, failed_to_start, lost.
    pub state: String,
    /// Exit code once exited; negative: killed by that signal.
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub pid: Option<u32>,
}

/// One node's share of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AllocationView {
    pub node: String,
    pub address: String,
    pub group_rank: u32,
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub released: bool,
    /// The GPU, NCCL and RDMA variables trainctl decided for the ranks here, and why (computed from
    /// the hosts as registered now). Absent from coordinators that predate it.
    #[serde(default)]
    pub launch_env: Vec<LaunchEnvView>,
}

/// One variable of the ranks' GPU, NCCL and RDMA environment on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LaunchEnvView {
    /// E.g. `NCCL_IB_HCA`.
    pub name: String,
    /// What the ranks see; null when it is left unset.
    pub value: Option<String>,
    /// `trainctl` (decided from discovery), `job` (the job's `launch.env` sets it) or `unset`.
    pub set_by: String,
    /// Why, in words.
    pub reason: String,
    /// The local ranks that get this value; empty when every rank on the node does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_ranks: Vec<u32>,
}

/// Everything about one job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The launch of the gang shown (0 for the first).
    pub attempt: u32,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub allocation: Vec<AllocationView>,
    pub ranks: Vec<RankView>,
    /// Restarts spent from the budget (failures and hangs; host losses and resizes are free).
    pub restarts: u32,
    /// The budget: `[failure] max_restarts`.
    pub max_restarts: u32,
    /// Hosts in the current (or last) attempt; an elastic job's size changes between attempts.
    pub current_nodes: u32,
    /// `[min_nodes, nodes]`: the gang's allowed host counts.
    pub node_range: [u32; 2],
    /// Every attempt so far, oldest first.
    pub attempts: Vec<AttemptView>,
    /// Committed checkpoints, oldest first; the next attempt resumes from the last.
    pub checkpoints: Vec<CheckpointView>,
    /// Another job's checkpoint this job started from (`submit --resume-from`).
    pub resume_from: Option<CheckpointView>,
    /// The job spec as stored (defaults filled in).
    #[schema(value_type = JobSpecBody)]
    pub spec: JobSpec,
}

/// One attempt (launch of the gang) of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    pub nodes: Vec<String>,
    pub world_size: u32,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Why it ended: "succeeded", the failing rank, "hung: ...", "growing ...", ...
    pub end: Option<String>,
}

/// A committed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointView {
    pub path: String,
    pub step: u64,
    pub committed_at_ms: u64,
    pub attempt: u32,
    /// The job that committed it.
    pub job: Option<String>,
    /// What the rank sent with it.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
}

/// Query of the submission.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Start from this job's newest committed checkpoint.
    pub resume_from: Option<String>,
}

/// Query of a cancellation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CancelQuery {
    /// Send the job's checkpoint signal first and wait up to its grace for a new commit.
    #[serde(default)]
    pub checkpoint: bool,
}

/// One node of the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub hostname: String,
    /// up or down.
    pub status: String,
    pub status_reason: Option<String>,
    pub cpus: u32,
    pub cpus_allocated: u32,
    pub memory_mib: u64,
    pub memory_allocated_mib: u64,
    pub gpus: u32,
    pub gpus_allocated: u32,
    pub gpu_models: Vec<String>,
    /// RDMA devices and their port states, e.g. `mlx5_0 port 1 ACTIVE InfiniBand 400 Gb/sec`.
    pub rdma: Vec<String>,
    /// Jobs holding resources here.
    pub jobs: Vec<String>,
    /// Drained by an operator: nothing new is placed here.
    pub drained: bool,
    /// Why the node failed its agent's pre-flight checks (GPU copy, NVML health, RDMA ports,
    /// NCCL); nothing new is placed here until they pass. Absent when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
    /// How ranks are contained there: `cgroup2 (cpu, memory)`, `process groups (...)`.
    #[serde(default)]
    pub containment: String,
    /// The RDMA fabrics of the host's ACTIVE ports: "InfiniBand", "RoCE", "InfiniBand and RoCE",
    /// "no ACTIVE RDMA port", or "no RDMA devices".
    #[serde(default)]
    pub fabric: String,
    /// The network interface that holds the agent's address, e.g. `eth0`; empty when unknown.
    #[serde(default)]
    pub advertised_interface: String,
    /// Each GPU, as the agent discovered it.
    #[serde(default)]
    pub gpu_devices: Vec<GpuView>,
    /// Each RDMA device and its ports.
    #[serde(default)]
    pub rdma_devices: Vec<RdmaDeviceView>,
}

/// One GPU of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GpuView {
    /// The agent's ordinal (display only; GPUs are identified by `uuid`).
    pub index: u32,
    /// `GPU-<uuid>`, or `declared-gpu-N` for a GPU declared with `--gpus`.
    pub uuid: String,
    /// e.g. "NVIDIA H200".
    pub name: String,
    pub memory_mib: u64,
    /// Held by a job now.
    pub allocated: bool,
    /// `0000:1b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// RDMA devices by nearness, nearest first.
    #[serde(default)]
    pub nic_affinity: Vec<NicAffinityView>,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub mig_mode: String,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub ecc_mode: String,
    /// Bus ids of the GPUs reached over NVLink.
    #[serde(default)]
    pub nvlink_peers: Vec<String>,
    #[serde(default)]
    pub retired_pages_pending: bool,
    #[serde(default)]
    pub uncorrectable_ecc_errors: u64,
}

/// How near an RDMA device is to a GPU.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NicAffinityView {
    pub rdma_device: String,
    /// `PIX` (same PCIe switch), `PXB` (several switches), `PHB` (same host bridge), `NODE`
    /// (same NUMA node), `SYS` (across NUMA nodes).
    pub link: String,
}

/// One RDMA device of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RdmaDeviceView {
    /// e.g. `mlx5_0`.
    pub name: String,
    /// `0000:3b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default)]
    pub numa_node: Option<u32>,
    pub ports: Vec<RdmaPortView>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RdmaPortView {
    pub port: u32,
    /// e.g. "ACTIVE", "DOWN".
    pub state: String,
    /// "InfiniBand" or "Ethernet" (RoCE).
    pub link_layer: String,
    /// e.g. "400 Gb/sec (4X NDR)".
    pub rate: String,
    /// The Ethernet interface of a RoCE port; empty for InfiniBand.
    #[serde(default)]
    pub netdev: String,
    /// Set GID entries (all of them, even past those listed in `gids`).
    pub gid_count: u32,
    #[serde(default)]
    pub gids: Vec<RdmaGidView>,
}

/// One set GID entry of a port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RdmaGidView {
    pub index: u32,
    pub gid: String,
    /// "IB/RoCE v1" or "RoCE v2"; empty when unknown.
    pub kind: String,
}

/// One line of a rank's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub rank: u32,
    pub node: String,
    pub text: String,
}

/// A page of a job's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogsPage {
    pub lines: Vec<LogLine>,
    /// Pass back as `cursor` to get the lines after these.
    pub cursor: String,
    /// True when the job has ended and every line has been returned: following can stop.
    pub complete: bool,
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only this global rank.
    pub rank: Option<u32>,
    /// Where the previous page ended.
    pub cursor: Option<String>,
    /// `text` for plain `[node rank N] line` text instead of JSON.
    pub format: Option<String>,
    /// Which attempt's output (default: the current one, or the last that ran).
    pub attempt: Option<u32>,
}

/// Query of the job listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<String>,
}

/// The coordinator's health.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when this coordinator knows a Raft leader.
    pub status: String,
    pub server_id: u64,
    pub is_leader: bool,
    pub leader: Option<u64>,
    pub raft_term: u64,
    /// The cluster's id (a coordinator joining with `--join` checks it).
    pub cluster_id: Option<String>,
    pub last_applied_index: Option<u64>,
    pub nodes_up: u64,
    pub nodes_down: u64,
    pub jobs: BTreeMap<String, u64>,
    pub uptime_s: u64,
}

/// Counters kept across requests; gauges are read from the state at scrape time.
pub struct Metrics {
    registry: Registry,
    pub submissions: Counter,
    pub placements: Counter,
    pub heartbeats: Counter,
    pub checkpoints: Counter,
    pub restarts: Counter,
    jobs: Family<Vec<(String, String)>, Gauge>,
    nodes: Family<Vec<(String, String)>, Gauge>,
    gpus_total: Gauge,
    gpus_allocated: Gauge,
    raft_last_applied: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trainctl");
        let submissions = Counter::default();
        let placements = Counter::default();
        let heartbeats = Counter::default();
        let checkpoints = Counter::default();
        let restarts = Counter::default();
        let jobs = Family::default();
        let nodes = Family::default();
        let gpus_total = Gauge::default();
        let gpus_allocated = Gauge::default();
        let raft_last_applied = Gauge::default();
        registry.register("job_submissions", "Jobs submitted", submissions.clone());
        registry.register(
            "gang_placements",
            "Gangs placed by the scheduler",
            placements.clone(),
        );
        registry.register(
            "agent_heartbeats",
            "Heartbeats received from agents",
            heartbeats.clone(),
        );
        registry.register(
            "checkpoint_commits",
            "Checkpoints committed by ranks",
            checkpoints.clone(),
        );
        registry.register(
            "gang_restarts",
            "Attempts ended by the leader (hangs, resizes, drains)",
            restarts.clone(),
        );
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register("nodes", "Nodes by status", nodes.clone());
        registry.register("gpus", "GPUs of nodes that are up", gpus_total.clone());
        registry.register(
            "gpus_allocated",
            "GPUs held by jobs",
            gpus_allocated.clone(),
        );
        registry.register(
            "raft_last_applied_index",
            "Last Raft log index applied",
            raft_last_applied.clone(),
        );
        Metrics {
            registry,
            submissions,
            placements,
            heartbeats,
            checkpoints,
            restarts,
            jobs,
            nodes,
            gpus_total,
            gpus_allocated,
            raft_last_applied,
        }
    }
}

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
    let m = &c.metrics;
    for (state, count) in job_counts(&c) {
        m.jobs
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .set(count as i64);
    }
    c.state.read(|s| {
        let (mut up, mut down, mut gpus, mut allocated) = (0, 0, 0, 0);
        for n in s.nodes.values() {
            if n.status == NodeStatus::Up {
                up += 1;
                gpus += n.resources.gpus.len() as i64;
            } else {
                down += 1;
            }
            allocated += n.usage.gpus.len() as i64;
        }
        m.nodes
            .get_or_create(&vec![("status".to_string(), "up".to_string())])
            .set(up);
        m.nodes
            .get_or_create(&vec![("status".to_string(), "down".to_string())])
            .set(down);
        m.gpus_total.set(gpus);
        m.gpus_allocated.set(allocated);
    });
    let applied = c
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    m.raft_last_applied.set(applied as i64);
    let mut body = String::new();
    encode(&mut body, &m.registry).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// What rendering jobs needs from the state, each part computed at most once per request: a listing
/// of many pending jobs builds one cluster snapshot and one queue index, not one per job.
struct View<'a> {
    state: &'a ClusterState,
    snapshot: std::cell::OnceCell<scheduler::ClusterSnapshot>,
    queue_position: std::cell::OnceCell<std::collections::HashMap<JobId, usize>>,
}

impl<'a> View<'a> {
    fn new(state: &'a ClusterState) -> Self {
        View {
            state,
            snapshot: std::cell::OnceCell::new(),
            queue_position: std::cell::OnceCell::new(),
        }
    }
}

fn pending_reason(v: &View, job: &Job) -> Option<String> {
    if job.state != JobState::Pending {
        return None;
    }
    let s = v.state;
    let snapshot = v.snapshot.get_or_init(|| s.cluster_snapshot());
    let own = match scheduler::plan(snapshot, &job.spec.resources) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    let positions = v
        .queue_position
        .get_or_init(|| s.queue.iter().enumerate().map(|(i, id)| (*id, i)).collect());
    let ahead = positions.get(&job.id).copied().unwrap_or(0);
    match (ahead, own) {
        (0, Some(why)) => Some(why),
        (0, None) => Some("fits now; being placed".to_string()),
        (n, why) => Some(format!(
            "waiting behind {n} earlier job{} (first: job {}){}",
            if n == 1 { "" } else { "s" },
            s.queue[0],
            why.map(|w| format!("; and it {w}")).unwrap_or_default()
        )),
    }
}

fn summary(v: &View, job: &Job) -> JobSummary {
    let res = &job.spec.resources;
    JobSummary {
        id: job.id.to_string(),
        name: job.spec.name.clone(),
        state: job.state.as_str().to_string(),
        nodes: res.nodes,
        procs_per_node: res.procs_per_node,
        world_size: job.spec.world_size(),
        gpus_per_node: res.gpus_per_node,
        submitted_at_ms: job.submitted_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        reason: job.reason.clone(),
        pending_reason: pending_reason(v, job),
    }
}

fn rank_phase_name(phase: RankPhase) -> &'static str {
    match phase {
        RankPhase::Pending => "pending",
        RankPhase::Running => "running",
        RankPhase::Exited => "exited",
        RankPhase::FailedToStart => "failed_to_start",
        RankPhase::Lost => "lost",
    }
}

fn detail(v: &View, job: &Job) -> JobDetail {
    let s = v.state;
    let allocation = job
        .allocation
        .as_ref()
        .map(|a| {
            a.nodes
                .iter()
                .map(|na| AllocationView {
                    node: na.node.to_string(),
                    address: s
                        .nodes
                        .get(&na.node)
                        .map(|n| n.address.clone())
                        .unwrap_or_default(),
                    group_rank: na.group_rank,
                    gpus: na.gpus.clone(),
                    cpus: na.cpus,
                    memory_mib: na.memory_mib,
                    released: na.released,
                    launch_env: launch_env_view(job, &na.node, &s.nodes),
                })
                .collect()
        })
        .unwrap_or_default();
    JobDetail {
        summary: summary(v, job),
        attempt: job.attempt,
        master_addr: job.allocation.as_ref().map(|a| a.master_addr.clone()),
        master_port: job.allocation.as_ref().map(|a| a.master_port),
        allocation,
        ranks: job
            .ranks
            .iter()
            .map(|r| RankView {
                rank: r.rank,
                local_rank: r.local_rank,
                node: r.node.to_string(),
                state: rank_phase_name(r.phase).to_string(),
                exit_code: r.exit_code,
                message: r.message.clone(),
                pid: r.pid,
            })
            .collect(),
        restarts: job.restarts,
        max_restarts: job.spec.failure.max_restarts,
        current_nodes: job
            .allocation
            .as_ref()
            .map(|a| a.nodes.len() as u32)
            .or_else(|| job.attempts.last().map(|a| a.nodes.len() as u32))
            .unwrap_or(0),
        node_range: {
            let (lo, hi) = job.spec.resources.node_range();
            [lo, hi]
        },
        attempts: job
            .attempts
            .iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                nodes: a.nodes.iter().map(|n| n.to_string()).collect(),
                world_size: a.world_size,
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                end: a.end.clone(),
            })
            .collect(),
        checkpoints: job.checkpoints.iter().map(checkpoint_view).collect(),
        resume_from: job.resume_from.as_ref().map(checkpoint_view),
        spec: job.spec.clone(),
    }
}

/// [`LaunchEnvView`]s of `job`'s ranks on `node`: each distinct decision once.
fn launch_env_view(
    job: &Job,
    node: &NodeId,
    nodes: &std::collections::BTreeMap<NodeId, Node>,
) -> Vec<LaunchEnvView> {
    let per_rank = crate::launch::rank_env_decisions(job, node, nodes);
    crate::nccl_env::group_by_rank(&per_rank)
        .into_iter()
        .map(|(d, local_ranks)| LaunchEnvView {
            name: d.name.to_owned(),
            value: d.value,
            set_by: d.set_by.as_str().to_owned(),
            reason: d.reason,
            local_ranks,
        })
        .collect()
}

fn checkpoint_view(c: &crate::state::CheckpointRecord) -> CheckpointView {
    CheckpointView {
        path: c.path.clone(),
        step: c.step,
        committed_at_ms: c.at_ms,
        attempt: c.attempt,
        job: c.job.map(|j| j.to_string()),
        metrics: c
            .metrics
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
    }
}

fn node_view(s: &ClusterState, n: &Node) -> NodeView {
    let jobs = s
        .jobs
        .values()
        .filter(|j| {
            j.allocation
                .as_ref()
                .is_some_and(|a| a.nodes.iter().any(|na| na.node == n.id && !na.released))
        })
        .map(|j| j.id.to_string())
        .collect();
    let mut gpu_models: Vec<String> = n.resources.gpus.iter().map(|g| g.name.clone()).collect();
    gpu_models.dedup();
    NodeView {
        name: n.id.to_string(),
        address: n.address.clone(),
        hostname: n.resources.hostname.clone(),
        status: match n.status {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
        }
        .to_string(),
        status_reason: n.status_reason.clone(),
        cpus: n.resources.cpus,
        cpus_allocated: n.usage.cpus,
        memory_mib: n.resources.memory_mib,
        memory_allocated_mib: n.usage.memory_mib,
        gpus: n.resources.gpus.len() as u32,
        gpus_allocated: n.usage.gpus.len() as u32,
        gpu_models,
        rdma: n
            .resources
            .rdma_devices
            .iter()
            .flat_map(|d| {
                d.ports.iter().map(move |p| {
                    format!(
                        "{} port {} {} {} {}",
                        d.name, p.port, p.state, p.link_layer, p.rate
                    )
                })
            })
            .collect(),
        jobs,
        drained: n.drained,
        unhealthy: n.health.unhealthy.clone(),
        containment: n.resources.containment.clone(),
        fabric: if n.resources.rdma_devices.is_empty() {
            "no RDMA devices".to_string()
        } else {
            scheduler::HostFabrics::of(&n.resources.rdma_devices)
                .describe()
                .to_string()
        },
        advertised_interface: n.resources.advertised_interface.clone(),
        gpu_devices: n
            .resources
            .gpus
            .iter()
            .map(|g| GpuView {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_mib: g.memory_mib,
                allocated: n.usage.gpus.contains(&g.index),
                pci_bus_id: g.pci_bus_id.clone(),
                numa_node: g.numa_node,
                nic_affinity: g
                    .nic_affinity
                    .iter()
                    .map(|a| NicAffinityView {
                        rdma_device: a.rdma_device.clone(),
                        link: a.link.as_str().to_string(),
                    })
                    .collect(),
                mig_mode: g.mig_mode.clone(),
                ecc_mode: g.ecc_mode.clone(),
                nvlink_peers: g.nvlink_peers.clone(),
                retired_pages_pending: g.retired_pages_pending,
                uncorrectable_ecc_errors: g.uncorrectable_ecc_errors,
            })
            .collect(),
        rdma_devices: n
            .resources
            .rdma_devices
            .iter()
            .map(|d| RdmaDeviceView {
                name: d.name.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                numa_node: d.numa_node,
                ports: d
                    .ports
                    .iter()
                    .map(|p| RdmaPortView {
                        port: p.port,
                        state: p.state.clone(),
                        link_layer: p.link_layer.clone(),
                        rate: p.rate.clone(),
                        netdev: p.netdev.clone(),
                        gid_count: p.gid_count,
                        gids: p
                            .gids
                            .iter()
                            .map(|g| RdmaGidView {
                                index: g.index,
                                gid: g.gid.clone(),
                                kind: g.kind.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
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
