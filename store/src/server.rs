//! The store's TCP server: one tokio task per connection around the pure [`Keyspace`].
//!
//! Every connection must open with `VALIDATE`: torch's magic selects the worker keyspace,
//! trainctl's [`CONTROL_MAGIC`] the control keyspace; anything else closes it. The task then
//! parses every whole request in what it read, applies them under one lock, and writes all their
//! replies with one write. A `WAIT` another connection completes is queued on the waiter's
//! connection under the same lock, so a `STOP_WAITING` always goes out before the `WAIT_CANCELED`
//! of a later `CANCEL_WAIT` (torch's client relies on that order).
//!
//! # Bounds
//! - Connections: at most [`StoreConfig::max_connections`]; one more is closed at accept.
//! - A connection must send its handshake, and finish any request it started, within
//!   [`StoreConfig::frame_timeout`] (a slow sender cannot hold a buffer for ever). Between
//!   requests a connection may stay idle as long as it likes: ranks hold theirs for a whole run.
//! - Buffers: a request larger than 16 KiB reserves its declared length from a budget shared by
//!   all connections ([`StoreConfig::buffer_budget_bytes`]) before it is read; when the budget
//!   is spent, readers wait for it instead of allocating.
//! - Stored bytes per keyspace: [`StoreConfig::max_bytes`]; a write past it closes the writer's
//!   connection (and is logged) and stores nothing.
//! - Malformed or oversized requests close their connection only.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::codec::{
    decode, frame_len, CodecError, Frame, Limits, Request, CONTROL_MAGIC, VALIDATION_MAGIC,
    WAIT_STOP_WAITING,
};
use crate::keyspace::{
    ApplyError, ConnId, Keyspace, DEFAULT_MAX_BYTES, DEFAULT_MAX_WAITS_PER_CONN,
};

/// Requests up to this size are read without reserving from the shared buffer budget.
const UNACCOUNTED_FRAME_BYTES: usize = 16 * 1024;
/// Bytes asked of the socket per read when no larger request is pending.
const READ_CHUNK: usize = 16 * 1024;
/// Listen backlog (torch's own server uses 16 384; the kernel caps it at `somaxconn`).
const LISTEN_BACKLOG: u32 = 16_384;

/// Which keyspace a connection uses, chosen by its `VALIDATE` magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// Torch's clients (`TCPStore`): the ranks' keys. [`StoreServer::reset_workers`] empties it.
    Workers,
    /// trainctl's launchers: rendezvous state that outlives an attempt.
    Control,
}

impl Namespace {
    /// The `VALIDATE` magic that selects this namespace.
    pub fn magic(self) -> u32 {
        match self {
            Namespace::Workers => VALIDATION_MAGIC,
            Namespace::Control => CONTROL_MAGIC,
        }
    }
}

/// Limits and policies of a store server.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Per-message limits (torch's by default).
    pub limits: Limits,
    /// Bytes of keys and values each keyspace may hold.
    pub max_bytes: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for the handshake and for the rest of a request once its first byte came.
    pub frame_timeout: Duration,
    /// Bytes all connections together may hold in buffers for large requests.
    pub buffer_budget_bytes: usize,
    /// `WAIT`s one connection may have pending.
    pub max_waits_per_connection: usize,
    /// When set, connections from any other address are closed at accept (a job's store accepts
    /// the job's hosts only).
    pub allowed_peers: Option<Vec<IpAddr>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            limits: Limits::default(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_connections: 65_536,
            frame_timeout: Duration::from_secs(30),
            buffer_budget_bytes: 512 * 1024 * 1024,
            max_waits_per_connection: DEFAULT_MAX_WAITS_PER_CONN,
            allowed_peers: None,
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Connections open now.
    pub connections: usize,
    /// Keys with a value in the worker keyspace.
    pub worker_keys: usize,
    /// Keys with a value in the control keyspace.
    pub control_keys: usize,
    /// Times [`StoreServer::reset_workers`] ran.
    pub worker_resets: u64,
    /// Connections closed for a protocol error, a limit or a timeout.
    pub refused: u64,
}

/// What a connection task shares with the others.
struct ConnHandle {
    namespace: Namespace,
    /// `STOP_WAITING` bytes queued by other connections' writes.
    pending: Mutex<Vec<u8>>,
    wake: Notify,
    closed: AtomicBool,
}

struct State {
    workers: Keyspace,
    control: Keyspace,
    conns: HashMap<ConnId, Arc<ConnHandle>>,
}

impl State {
    fn keyspace(&mut self, namespace: Namespace) -> &mut Keyspace {
        match namespace {
            Namespace::Workers => &mut self.workers,
            Namespace::Control => &mut self.control,
        }
    }
}

struct Shared {
    config: StoreConfig,
    state: Mutex<State>,
    budget: Arc<Semaphore>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    resets: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn new_keyspace(&self) -> Keyspace {
        Keyspace::new(self.config.max_bytes, self.config.max_waits_per_connection)
    }
}

/// A running store server. Dropping it stops the server and closes every connection.
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: Option<JoinHandle<()>>,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("the first message was {0:?}, not VALIDATE")]
    NoHandshake(crate::codec::QueryType),
    #[error("VALIDATE with magic {0:#x} (torch's is {VALIDATION_MAGIC:#x})")]
    BadMagic(u32),
    #[error("no whole request within {0:?}")]
    Timeout(Duration),
    #[error(
        "a request of {need} bytes is larger than the store's whole buffer budget ({budget} bytes)"
    )]
    OverBudget { need: usize, budget: usize },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StoreServer {
    /// Binds `addr` (port 0: any free port) and starts serving.
    pub async fn bind(addr: SocketAddr, config: StoreConfig) -> io::Result<StoreServer> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        Self::serve(listener, config)
    }

    /// Serves an already bound listener.
    pub fn serve(listener: TcpListener, config: StoreConfig) -> io::Result<StoreServer> {
        let local_addr = listener.local_addr()?;
        let budget = Arc::new(Semaphore::new(config.buffer_budget_bytes));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                workers: Keyspace::new(config.max_bytes, config.max_waits_per_connection),
                control: Keyspace::new(config.max_bytes, config.max_waits_per_connection),
                conns: HashMap::new(),
            }),
            config,
            budget,
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            resets: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Ok(StoreServer {
            local_addr,
            shared,
            shutdown,
            accept_task: Some(accept_task),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts a fresh, empty worker keyspace and closes every worker connection: the next
    /// attempt of a gang sees none of the previous attempt's keys, and no rank of the previous
    /// attempt can reach the new one through a connection it still holds.
    pub fn reset_workers(&self) {
        let fresh = self.shared.new_keyspace();
        let mut state = self.shared.state.lock().expect("store state lock");
        state.workers = fresh;
        for conn in state.conns.values() {
            if conn.namespace == Namespace::Workers {
                conn.closed.store(true, Ordering::SeqCst);
                conn.wake.notify_one();
            }
        }
        self.shared.resets.fetch_add(1, Ordering::SeqCst);
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let state = self.shared.state.lock().expect("store state lock");
        StoreStats {
            connections: self.shared.open.load(Ordering::SeqCst),
            worker_keys: state.workers.len(),
            control_keys: state.control.len(),
            worker_resets: self.shared.resets.load(Ordering::SeqCst),
            refused: self.shared.refused.load(Ordering::SeqCst),
        }
    }

    /// Stops accepting, closes every connection and waits for the listener to be released.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "store: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(allowed) = &shared.config.allowed_peers {
            if !allowed.contains(&peer.ip()) {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "store: connection from an address outside the job refused");
                continue;
            }
        }
        if shared.open.load(Ordering::SeqCst) >= shared.config.max_connections {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = shared.config.max_connections, "store: too many connections; refused");
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = serve_conn(&shared, stream, id, shutdown).await {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "store: connection closed");
            }
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Removes a connection from the shared state when its task ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: ConnId,
    namespace: Option<Namespace>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Some(namespace) = self.namespace {
            let mut state = self.shared.state.lock().expect("store state lock");
            state.conns.remove(&self.id);
            state.keyspace(namespace).drop_conn(self.id);
        }
    }
}

async fn serve_conn(
    shared: &Shared,
    mut stream: TcpStream,
    id: ConnId,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let limits = shared.config.limits;
    let timeout = shared.config.frame_timeout;
    let mut registration = Registration {
        shared,
        id,
        namespace: None,
    };
    let mut handle: Option<Arc<ConnHandle>> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    // Budget held for the large request being read, and its size.
    let mut reserved: Option<(OwnedSemaphorePermit, usize)> = None;
    // When the handshake or the current request must be whole.
    let mut deadline = Some(Instant::now() + timeout);
    loop {
        // Apply every whole request in the buffer.
        let mut start = 0;
        let need;
        loop {
            match frame_len(&buf[start..], &limits)? {
                Frame::Partial(n) => {
                    need = n;
                    break;
                }
                Frame::Complete(_) => {
                    let (request, len) =
                        decode(&buf[start..], &limits)?.expect("frame is complete");
                    start += len;
                    match &handle {
                        None => {
                            let namespace = handshake(request)?;
                            let h = Arc::new(ConnHandle {
                                namespace,
                                pending: Mutex::new(Vec::new()),
                                wake: Notify::new(),
                                closed: AtomicBool::new(false),
                            });
                            shared
                                .state
                                .lock()
                                .expect("store state lock")
                                .conns
                                .insert(id, h.clone());
                            registration.namespace = Some(namespace);
                            handle = Some(h);
                        }
                        Some(h) => apply(shared, id, h, request, &mut out)?,
                    }
                }
            }
        }
        buf.drain(..start);
        if buf.is_empty() {
            // Between requests: no deadline once the handshake is done, and no budget held.
            if handle.is_some() {
                deadline = None;
            }
            reserved = None;
            if buf.capacity() > READ_CHUNK * 4 {
                buf = Vec::new();
            }
        } else if deadline.is_none() || start > 0 {
            deadline = Some(Instant::now() + timeout);
        }
        if need > UNACCOUNTED_FRAME_BYTES && reserved.as_ref().is_none_or(|(_, n)| *n < need) {
            drop(reserved.take());
            let budget = shared.config.buffer_budget_bytes;
            if need > budget {
                return Err(ConnError::OverBudget { need, budget });
            }
            let permits = u32::try_from(need).unwrap_or(u32::MAX);
            let acquire = shared.budget.clone().acquire_many_owned(permits);
            let permit = match deadline {
                Some(d) => tokio::time::timeout_at(d, acquire)
                    .await
                    .map_err(|_| ConnError::Timeout(timeout))?,
                None => acquire.await,
            }
            .expect("the budget semaphore is never closed");
            reserved = Some((permit, need));
        }
        if let Some(h) = &handle {
            take_pending(h, &mut out);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if handle
            .as_ref()
            .is_some_and(|h| h.closed.load(Ordering::SeqCst))
        {
            return Ok(());
        }
        let want = need.saturating_sub(buf.len()).max(READ_CHUNK);
        buf.reserve(want);
        let wake = async {
            match &handle {
                Some(h) => h.wake.notified().await,
                None => std::future::pending().await,
            }
        };
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut limited = (&mut stream).take(want as u64);
        tokio::select! {
            read = limited.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
            }
            _ = wake => {}
            _ = expired => return Err(ConnError::Timeout(timeout)),
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
    }
}

fn handshake(request: Request) -> Result<Namespace, ConnError> {
    match request {
        Request::Validate { magic } if magic == VALIDATION_MAGIC => Ok(Namespace::Workers),
        Request::Validate { magic } if magic == CONTROL_MAGIC => Ok(Namespace::Control),
        Request::Validate { magic } => Err(ConnError::BadMagic(magic)),
        other => Err(ConnError::NoHandshake(other.query_type())),
    }
}

/// Applies one request under the state lock, queueing `STOP_WAITING` on the connections it woke.
fn apply(
    shared: &Shared,
    id: ConnId,
    handle: &ConnHandle,
    request: Request,
    out: &mut Vec<u8>,
) -> Result<(), ConnError> {
    if let Request::Validate { magic } = request {
        // A repeated handshake with the same magic is harmless.
        return if magic == handle.namespace.magic() {
            Ok(())
        } else {
            Err(ConnError::BadMagic(magic))
        };
    }
    let mut state = shared.state.lock().expect("store state lock");
    // Anything other connections queued for this one goes out before this request's reply.
    take_pending(handle, out);
    let keyspace = state.keyspace(handle.namespace);
    // (`Keyspace::check_invariants` scans the whole keyspace: the unit tests run it after every
    // request; here it would make each request O(keys).)
    let woken = keyspace.apply(id, request, out)?;
    for conn in woken {
        if conn == id {
            out.push(WAIT_STOP_WAITING);
        } else if let Some(other) = state.conns.get(&conn) {
            other
                .pending
                .lock()
                .expect("pending lock")
                .push(WAIT_STOP_WAITING);
            other.wake.notify_one();
        }
    }
    Ok(())
}

fn take_pending(handle: &ConnHandle, out: &mut Vec<u8>) {
    let mut pending = handle.pending.lock().expect("pending lock");
    out.append(&mut pending);
}
