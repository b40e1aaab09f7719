//! A real coordinator served in-process for the benchmarks: `server::open` and `server::run` on
//! `127.0.0.1:0`, its data (redb, a one-voter openraft log with an fsync per append) in a directory
//! the caller owns.
//!
//! Secure (the production default: TLS on the port, a bearer token on every REST request) or
//! plain HTTP (`--insecure`), chosen by the caller. Secure, `server::open` makes a cluster CA under
//! `<data-dir>/tls` and an admin token in `<data-dir>/admin.token`; [`Served::http_client`] trusts
//! that CA and sends that token.
//!
//! Every task of the coordinator runs on the tokio runtime [`Served::start`] is polled on, so a
//! benchmark that starts it on a runtime of its own (see [`crate::cpu`]) can tell the
//! coordinator's CPU time from its load generator's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trainctl_coordinator::server::{self, Coordinator, CoordinatorConfig, ADMIN_TOKEN_FILE};
use trainctl_coordinator::state::CommandOutcome;

use crate::fixtures;
use crate::load::{self, Connections, Target};

/// How long the coordinator gets to stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A coordinator serving on 127.0.0.1, and what a client needs to reach it.
pub struct Served {
    pub coordinator: Arc<Coordinator>,
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` when secure, else `http://127.0.0.1:PORT`.
    pub base: String,
    /// The cluster CA (PEM) when secure.
    pub ca_pem: Option<String>,
    /// The bootstrap admin token when secure.
    pub admin_token: Option<String>,
    stop: watch::Sender<bool>,
    serving: JoinHandle<anyhow::Result<()>>,
}

/// A listener on a free port of 127.0.0.1. With `nodelay`, `TCP_NODELAY` is set on it, and Linux
/// passes it on to every socket it accepts: a coordinator served on it answers without Nagle's
/// delay whether or not it sets the option itself. Call it inside the runtime that will serve.
pub fn loopback_listener(nodelay: bool) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4().context("make a TCP socket")?;
    if nodelay {
        socket
            .set_nodelay(true)
            .context("set TCP_NODELAY on the listener")?;
    }
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("bind 127.0.0.1:0")?;
    socket.listen(1024).context("listen on 127.0.0.1")
}

impl Served {
    /// Opens a coordinator with its data in `data_dir`, TLS and tokens when `secure`, serves it on
    /// a free port of 127.0.0.1, and waits until it answers `/v1/health` and leads its Raft group.
    ///
    /// Its liveness timeout is 1 h: a benchmark's fake hosts send no heartbeats, and a loaded
    /// machine must not get real ones declared lost mid-run.
    pub async fn start(data_dir: &Path, secure: bool) -> anyhow::Result<Served> {
        Served::start_on(data_dir, secure, loopback_listener(false)?).await
    }

    /// [`Served::start`] on a listener of the caller's (see [`loopback_listener`]).
    pub async fn start_on(
        data_dir: &Path,
        secure: bool,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Served> {
        let addr = listener.local_addr()?;
        let mut config = CoordinatorConfig::new(data_dir.to_path_buf(), addr.to_string());
        config.secure = secure;
        config.node_timeout_ms = 3_600_000;
        let coordinator = server::open(config).await.context("open the coordinator")?;
        let (ca_pem, admin_token) = if secure {
            let ca = data_dir.join(server::TLS_DIR).join("ca.pem");
            let token = data_dir.join(ADMIN_TOKEN_FILE);
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
            };
            (Some(read(&ca)?), Some(read(&token)?.trim().to_string()))
        } else {
            (None, None)
        };
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(server::run(coordinator.clone(), listener, stopped));
        let scheme = if secure { "https" } else { "http" };
        let served = Served {
            coordinator,
            addr,
            base: format!("{scheme}://{addr}"),
            ca_pem,
            admin_token,
            stop,
            serving,
        };
        let client = served.http_client(Connections::KeepAlive)?;
        let coordinator = served.coordinator.clone();
        load::wait_until_ready(&client, &format!("{}/v1/health", served.base), || {
            coordinator.is_leader()
        })
        .await?;
        Ok(served)
    }

    pub fn secure(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// A REST client of this coordinator: trusting its CA and sending the admin token when secure.
    ///
    /// With [`Connections::PerRequest`] over TLS, TLS session resumption is off too, so every
    /// request pays a full handshake, as a fresh `trainctl` process does.
    pub fn http_client(&self, connections: Connections) -> anyhow::Result<reqwest::Client> {
        self.http_builder(connections)?
            .build()
            .context("build the HTTP client")
    }

    /// What [`Served::http_client`] builds, to add to.
    pub fn http_builder(&self, connections: Connections) -> anyhow::Result<reqwest::ClientBuilder> {
        self.http_builder_alpn(connections, false)
    }

    /// [`Served::http_builder`]; with `http1_only`, a TLS client offers only `http/1.1` (ALPN),
    /// where the CLI offers `h2` first and so speaks HTTP/2 over TLS (and HTTP/1.1 without).
    pub fn http_builder_alpn(
        &self,
        connections: Connections,
        http1_only: bool,
    ) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut builder = load::client_builder(connections);
        if let (Some(ca), Some(token)) = (&self.ca_pem, &self.admin_token) {
            trainctl_tls::install_crypto_provider();
            let mut tls = trainctl_tls::client_config(ca, None).context("the cluster CA")?;
            if connections == Connections::PerRequest {
                tls.resumption = trainctl_tls::rustls::client::Resumption::disabled();
            }
            if http1_only {
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the admin token")?;
            value.set_sensitive(true);
            builder = builder.tls_backend_preconfigured(tls).default_headers(
                [(reqwest::header::AUTHORIZATION, value)]
                    .into_iter()
                    .collect(),
            );
        }
        Ok(builder)
    }

    /// What [`load::run_level`] sends job submissions to.
    pub fn target(&self) -> Target {
        Target::Trainctl {
            base: self.base.clone(),
        }
    }

    /// Registers `count` fake 8-GPU hosts through Raft, so that submissions pass the "can this
    /// ever fit" check (a spec that could never fit is refused with 422).
    pub async fn register_fake_nodes(&self, count: usize) -> anyhow::Result<()> {
        for i in 0..count {
            let outcome = self
                .coordinator
                .write(fixtures::register_node(i, server::now_ms()))
                .await
                .context("register a fake node")?;
            ensure!(
                outcome == CommandOutcome::Done,
                "registering node {i}: {outcome:?}"
            );
        }
        Ok(())
    }

    /// Stops serving and waits (up to 10 s) for the coordinator to stop; problems are printed.
    pub async fn shutdown(self) {
        self.stop.send(true).ok();
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.serving).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("coordinator stopped with an error: {e:#}"),
            Ok(Err(e)) => eprintln!("coordinator task failed: {e}"),
            Err(_) => eprintln!("coordinator did not stop within {SHUTDOWN_TIMEOUT:?}"),
        }
    }
}
