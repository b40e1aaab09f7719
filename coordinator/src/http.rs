//! The coordinator's HTTP server: the accept loop under REST, agent gRPC and Raft, with the bounds
//! `axum::serve` has no knobs for.
//!
//! - **Header read timeout** ([`HEADER_READ_TIMEOUT_MS`]): an HTTP/1 client that has not sent a
//!   whole request head this long after connecting (or after its previous response) is cut off,
//!   so half-sent headers (slowloris) hold no connection.
//! - **Idle connection timeout** ([`CONNECTION_IDLE_TIMEOUT_MS`]): a connection (HTTP/1 or
//!   HTTP/2) with no request in flight for this long is closed. A request is in flight until its
//!   response body has been sent, so a long poll (heartbeats, held up to 2 s) or `logs --follow`
//!   (a response streamed for as long as the job runs) is never cut by it.
//! - **Body idle timeout** ([`BODY_IDLE_TIMEOUT_MS`]): a request body that sends nothing for this
//!   long fails, so a half-sent body does not hold its buffer.
//! - **Body size limits**, by kind of request: REST ([`REST_BODY_BYTES_MAX`]), agent gRPC
//!   ([`GRPC_BODY_BYTES_MAX`]) and Raft ([`RAFT_BODY_BYTES_MAX`]). A declared `Content-Length`
//!   over the limit is answered 413 at once, before any of the body is read; a chunked body is
//!   cut off at the limit.
//! - **HTTP/2 keep-alive pings** ([`HTTP2_KEEPALIVE_INTERVAL_MS`]): a peer that stops answering
//!   them is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::debug;

use crate::auth::PeerCertificate;

/// Most bytes of a REST request body (a job spec is the largest): the job spec document limit,
/// [`trainctl_jobs::limits::SPEC_SOURCE_BYTES_MAX`] (4 MiB).
pub const REST_BODY_BYTES_MAX: usize = trainctl_jobs::limits::SPEC_SOURCE_BYTES_MAX;
/// Most bytes of an agent gRPC request body: the largest message the agent service decodes (a
/// heartbeat with up to twice [`MAX_LOG_BYTES_PER_HEARTBEAT`] of log chunks, 8 MiB) plus framing.
///
/// [`MAX_LOG_BYTES_PER_HEARTBEAT`]: crate::agents::MAX_LOG_BYTES_PER_HEARTBEAT
pub const GRPC_BODY_BYTES_MAX: usize = crate::agents::MAX_LOG_BYTES_PER_HEARTBEAT * 2 + 64 * 1024;
/// Most bytes of a Raft request body from another coordinator (log entries, a snapshot chunk):
/// [`crate::server::MAX_RAFT_BODY_BYTES`], far above a REST body, so a batch of large job specs is
/// never refused between coordinators.
pub const RAFT_BODY_BYTES_MAX: usize = crate::server::MAX_RAFT_BODY_BYTES;
/// An HTTP/1 request head must arrive within this long of the connection opening or of the
/// previous response: 10 s.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// A connection with no request in flight is closed after this long: 60 s.
pub const CONNECTION_IDLE_TIMEOUT_MS: u64 = 60_000;
/// A request body that sends no bytes for this long fails: 15 s.
pub const BODY_IDLE_TIMEOUT_MS: u64 = 15_000;
/// How often an HTTP/2 connection is pinged; a ping unanswered for as long again drops it: 20 s.
pub const HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 20_000;
/// A body declared over its limit but at most this big is read and discarded after the 413, so
/// the client (still sending) reads the answer: 32 MiB.
pub const TOO_LARGE_DRAIN_BYTES_MAX: usize = 32 << 20;
/// The drain after a 413 stops when the client sends nothing for this long: 1 s.
pub const TOO_LARGE_DRAIN_IDLE_MS: u64 = 1_000;
/// The drain after a 413 stops after this long in all: 5 s.
pub const TOO_LARGE_DRAIN_MS: u64 = 5_000;
/// A TLS handshake must complete within this long of the connection opening: 10 s.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// After shutdown is asked, how long open connections get to finish their requests: 10 s.
pub const SHUTDOWN_DRAIN_TIMEOUT_MS: u64 = 10_000;

/// Serves `app` on `listener` until `shutdown` completes, then lets open connections finish their
/// requests (up to [`SHUTDOWN_DRAIN_TIMEOUT_MS`]).
///
/// With `tls`, every connection first completes a TLS handshake (within
/// [`TLS_HANDSHAKE_TIMEOUT_MS`]); the client certificate it presented, if any, reaches every
/// request of the connection as a [`PeerCertificate`] extension.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(HTTP2_KEEPALIVE_INTERVAL_MS))
        .keep_alive_timeout(Duration::from_millis(HTTP2_KEEPALIVE_INTERVAL_MS));
    let builder = Arc::new(builder);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as axum::serve does.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Small writes (TLS handshake records, HTTP/2 frames, gRPC replies) go out at once, not
        // after the peer's delayed ACK (40 ms per new TLS connection without this).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let builder = builder.clone();
        let app = app.clone();
        let stop = stop_rx.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(
                    &builder,
                    stream,
                    app,
                    None,
                    RAFT_BODY_BYTES_MAX,
                    stop,
                    peer,
                )
                .await;
            };
            let handshake = tokio::time::timeout(
                Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
                acceptor.accept(stream),
            );
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let certificate =
                trainctl_tls::peer_fingerprint(stream.get_ref().1).map(PeerCertificate);
            // Only a client with a certificate of the cluster CA (a coordinator, or an agent) may
            // send a Raft-sized body; anyone else gets the REST limit before any signature check.
            let raft_body_max = if certificate.is_some() {
                RAFT_BODY_BYTES_MAX
            } else {
                REST_BODY_BYTES_MAX
            };
            serve_connection(
                &builder,
                stream,
                app,
                certificate,
                raft_body_max,
                stop,
                peer,
            )
            .await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_DRAIN_TIMEOUT_MS), drained)
        .await
        .is_err()
    {
        debug!("connections still open after the shutdown drain time; closing them");
        connections.abort_all();
    }
    Ok(())
}

/// Serves one connection (plain or TLS) until it ends, is idle too long, or the server drains.
async fn serve_connection<S>(
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    stream: S,
    app: axum::Router,
    certificate: Option<PeerCertificate>,
    raft_body_max: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = Arc::new(InFlight::new());
    let service = ConnService {
        app,
        in_flight: in_flight.clone(),
        certificate,
        raft_body_max,
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle = Duration::from_millis(CONNECTION_IDLE_TIMEOUT_MS);
    let mut draining = false;
    loop {
        let check_at = in_flight.idle_deadline(idle);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            _ = stop.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = tokio::time::sleep_until(check_at) => {
                if in_flight.idle_for() >= Some(idle) {
                    debug!(%peer, "closing an idle connection");
                    break;
                }
            }
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct InFlight {
    /// (requests in flight, when the count last became 0).
    state: Mutex<(usize, Instant)>,
}

impl InFlight {
    fn new() -> Self {
        InFlight {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.state.lock().unwrap().0 += 1;
        InFlightGuard(self.clone())
    }

    /// How long the connection has had no request in flight; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        let (n, since) = *self.state.lock().unwrap();
        (n == 0).then(|| since.elapsed())
    }

    /// When to look again whether the connection has been idle for `idle`.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let (n, since) = *self.state.lock().unwrap();
        if n == 0 {
            since + idle
        } else {
            Instant::now() + idle
        }
    }
}

/// One request in flight; held until its response body has been sent (or dropped).
struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap();
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = Instant::now();
        }
    }
}

/// What kind of request this is, for its body limit.
fn body_limit(req: &Request<Incoming>, raft_body_max: usize) -> (usize, &'static str) {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        (GRPC_BODY_BYTES_MAX, "an agent gRPC request")
    } else if req.uri().path().starts_with("/internal/raft/") {
        (raft_body_max, "a Raft request")
    } else {
        (REST_BODY_BYTES_MAX, "a REST request")
    }
}

fn too_large(declared: u64, limit: usize, kind: &str, close: bool) -> Response<axum::body::Body> {
    let body = serde_json::json!({
        "error": format!(
            "the request body is {declared} bytes; {kind} body may be at most {limit} bytes ({} MiB)",
            limit >> 20
        )
    });
    let mut response = Response::new(axum::body::Body::from(body.to_string()));
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if close {
        // The rest of the body is not read: the client must not reuse this connection.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The service one connection runs: counts requests in flight, bounds bodies, then calls the app.
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    in_flight: Arc<InFlight>,
    /// The connection's TLS client certificate, given to every request on it.
    certificate: Option<PeerCertificate>,
    /// The body limit of Raft requests on this connection.
    raft_body_max: usize,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.in_flight.enter();
        let (limit, kind) = body_limit(&req, self.raft_body_max);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(declared) = declared.filter(|&n| n > limit as u64) {
            // A client still sending its body must be able to read the 413: a connection closed
            // on unread bytes is reset (under TLS the client then sees an EOF, not the answer). So
            // a body up to TOO_LARGE_DRAIN_BYTES_MAX is read and thrown away in the background and
            // the connection lives on; a larger one is not read at all, and the connection closes.
            let drain = declared <= TOO_LARGE_DRAIN_BYTES_MAX as u64;
            if drain {
                let body = http_body_util::Limited::new(
                    IdleTimeoutBody::new(
                        req.into_body(),
                        Duration::from_millis(TOO_LARGE_DRAIN_IDLE_MS),
                    ),
                    TOO_LARGE_DRAIN_BYTES_MAX,
                );
                // It lingers briefly, as nginx's lingering close does: it stops after
                // TOO_LARGE_DRAIN_IDLE_MS without a byte, or TOO_LARGE_DRAIN_MS in all.
                tokio::spawn(async move {
                    let mut body = std::pin::pin!(body);
                    let drained = async { while let Some(Ok(_)) = body.frame().await {} };
                    let _ =
                        tokio::time::timeout(Duration::from_millis(TOO_LARGE_DRAIN_MS), drained)
                            .await;
                });
            }
            return Box::pin(std::future::ready(Ok(too_large(
                declared, limit, kind, !drain,
            ))));
        }
        let mut req = req;
        if let Some(certificate) = &self.certificate {
            req.extensions_mut().insert(certificate.clone());
        }
        let req = req.map(|body| {
            axum::body::Body::new(http_body_util::Limited::new(
                IdleTimeoutBody::new(body, Duration::from_millis(BODY_IDLE_TIMEOUT_MS)),
                limit,
            ))
        });
        let mut app = self.app.clone();
        Box::pin(async move {
            let response = match app.call(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // The request stays in flight until its response body has been sent.
            Ok(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _ = &guard;
                    frame
                }))
            }))
        })
    }
}

/// A request body that fails when no frame arrives for `timeout`.
struct IdleTimeoutBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimeoutBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

/// A request body that sent nothing for [`BODY_IDLE_TIMEOUT_MS`].
#[derive(Debug)]
struct BodyIdleTimeout;

impl std::fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body sent nothing for {} s",
            BODY_IDLE_TIMEOUT_MS / 1000
        )
    }
}

impl std::error::Error for BodyIdleTimeout {}

impl HttpBody for IdleTimeoutBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdleTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
