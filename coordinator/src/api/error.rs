//! Errors and what every request goes through before a handler: [`ApiError`] (the one place
//! errors map to status codes), the JSON error body, the query extractor, and the middleware that
//! turns axum's and hyper's own rejections into the same JSON errors.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trainctl_jobs::limits;
use utoipa::ToSchema;

use crate::server::WriteError;
use crate::state::JobId;

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
pub(super) fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
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
