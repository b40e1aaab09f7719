//! REST load for the write-path benchmarks: `count` writes (`POST /v1/jobs`, or an etcd put) from
//! `concurrency` clients, each timed from sending to reading the whole answer.
//!
//! `benches/write_path.rs` (trainctl next to etcd) and `benches/tls_overhead.rs` (plain HTTP next
//! to TLS) both drive their servers through [`run_level`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::{base64, job_spec_json, millis, Summary};

/// How long one request may take before the run counts it as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to come up (leader elected, port open).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// One load level's result.
#[derive(Debug, Clone)]
pub struct Level {
    pub concurrency: usize,
    pub elapsed: Duration,
    pub latency: Summary,
}

impl Level {
    /// Writes per second over the level.
    pub fn per_second(&self) -> f64 {
        self.latency.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// What the load generator sends.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST {base}/v1/jobs` with a JSON job spec (`base` is `http://` or `https://`).
    Trainctl { base: String },
    /// `POST {base}{path}` (`/v3/kv/put`) with a base64 key and the same job spec as the value.
    Etcd { base: String, path: &'static str },
}

/// How a client uses its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Idle connections are kept and reused (HTTP/1.1 keep-alive, or one HTTP/2 connection).
    KeepAlive,
    /// No connection is kept: every request connects (and, over TLS, handshakes) anew, as a CLI
    /// invocation does.
    PerRequest,
}

/// A client builder with the benchmarks' timeout, no proxy, and `connections`' pooling. Add TLS and
/// headers on top.
pub fn client_builder(connections: Connections) -> reqwest::ClientBuilder {
    let idle = match connections {
        Connections::KeepAlive => 1024,
        // hyper's pool is disabled outright at 0: nothing kept, nothing shared, even over HTTP/2.
        Connections::PerRequest => 0,
    };
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(idle)
        .no_proxy()
}

/// Counts the connections the clients it is layered into open (`ClientBuilder::connector_layer`):
/// one per TCP connection, before its TLS handshake if any.
#[derive(Debug, Clone, Default)]
pub struct ConnectCounter(Arc<AtomicUsize>);

impl ConnectCounter {
    /// Connections opened so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl<S> tower::Layer<S> for ConnectCounter {
    type Service = CountedConnector<S>;

    fn layer(&self, inner: S) -> CountedConnector<S> {
        CountedConnector {
            inner,
            count: self.0.clone(),
        }
    }
}

/// A connector that counts its connections; see [`ConnectCounter`].
#[derive(Debug, Clone)]
pub struct CountedConnector<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

impl<S: tower::Service<R>, R> tower::Service<R> for CountedConnector<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// A plain-HTTP client.
pub fn http_client(connections: Connections) -> anyhow::Result<reqwest::Client> {
    client_builder(connections)
        .build()
        .context("build the HTTP client")
}

/// Polls `url` until it answers 200 and `ready()` holds, for at most [`STARTUP_TIMEOUT`].
pub async fn wait_until_ready(
    client: &reqwest::Client,
    url: &str,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let ok = matches!(client.get(url).send().await, Ok(r) if r.status().is_success());
        if ok && ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} not ready within {STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `count` writes from `concurrency` concurrent tasks; write `i` carries sequence number
/// `first + i`. Task `k` sends through `clients[k % clients.len()]`: one client shared by all (as
/// one program with many tasks; over TLS, HTTP/2 then multiplexes them on one connection), or one
/// each (as many programs).
pub async fn run_level(
    clients: &[reqwest::Client],
    target: &Target,
    concurrency: usize,
    count: usize,
    first: usize,
) -> anyhow::Result<Level> {
    run_level_spread(
        clients,
        std::slice::from_ref(target),
        concurrency,
        count,
        first,
    )
    .await
}

/// [`run_level`] over several servers of one kind (the members of a Raft group): task `k` sends
/// to `targets[k % targets.len()]`, so the tasks spread evenly over the members.
pub async fn run_level_spread(
    clients: &[reqwest::Client],
    targets: &[Target],
    concurrency: usize,
    count: usize,
    first: usize,
) -> anyhow::Result<Level> {
    ensure!(!targets.is_empty(), "no server to send to");
    // Bodies are made before the clock starts, so the load generator spends its CPU on sending.
    // Every target of one run is of the same kind, so one body fits them all.
    let bodies: Arc<Vec<String>> = Arc::new(
        (first..first + count)
            .map(|seq| body(&targets[0], seq))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    ensure!(!clients.is_empty(), "no client to send with");
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let client = clients[k % clients.len()].clone();
        let target = targets[k % targets.len()].clone();
        let (bodies, next) = (bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                send(&client, &target, body.clone()).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.extend(task.await.context("client task")??);
    }
    let elapsed = started.elapsed();
    Ok(Level {
        concurrency,
        elapsed,
        latency: Summary::of(&mut latencies).context("no writes were sent")?,
    })
}

/// The body of write `seq` to `target`.
pub fn body(target: &Target, seq: usize) -> String {
    match target {
        Target::Trainctl { .. } => job_spec_json(seq),
        Target::Etcd { .. } => serde_json::json!({
            "key": base64(format!("/trainctl/jobs/{seq:08}").as_bytes()),
            "value": base64(job_spec_json(seq).as_bytes()),
        })
        .to_string(),
    }
}

/// Sends one write and checks its status (201 from trainctl, 200 from etcd).
pub async fn send(client: &reqwest::Client, target: &Target, body: String) -> anyhow::Result<()> {
    let (url, expected) = match target {
        Target::Trainctl { base } => (format!("{base}/v1/jobs"), reqwest::StatusCode::CREATED),
        Target::Etcd { base, path } => (format!("{base}{path}"), reqwest::StatusCode::OK),
    };
    let response = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("read the answer of POST {url}"))?;
    ensure!(status == expected, "POST {url}: {status}: {text}");
    Ok(())
}

/// Prints one table row per level: writes, seconds, writes/s, median and p99.
pub fn print_levels(title: &str, levels: &[Level]) {
    println!("\n{title}");
    println!(
        "{:>8}  {:>7}  {:>8}  {:>10}  {:>11}  {:>11}",
        "clients", "writes", "secs", "writes/s", "median ms", "p99 ms"
    );
    for l in levels {
        println!(
            "{:>8}  {:>7}  {:>8.2}  {:>10.0}  {:>11}  {:>11}",
            l.concurrency,
            l.latency.count,
            l.elapsed.as_secs_f64(),
            l.per_second(),
            millis(l.latency.median),
            millis(l.latency.p99)
        );
    }
}

/// A positive count from the environment variable `name`, else `default`.
pub fn env_count(name: &str, default: usize) -> anyhow::Result<usize> {
    let n = match std::env::var(name) {
        Ok(n) => n
            .trim()
            .parse()
            .with_context(|| format!("{name}=`{n}` is not a number"))?,
        Err(_) => default,
    };
    ensure!(n > 0, "{name} must be positive");
    Ok(n)
}

/// A comma-separated list of positive counts from the environment variable `name` (e.g.
/// `TRAINCTL_BENCH_CONCURRENCY=1,8,64`), else `default`.
pub fn env_counts(name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    let list = match std::env::var(name) {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}: `{s}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => default.to_vec(),
    };
    ensure!(
        !list.is_empty() && list.iter().all(|&c| c > 0),
        "{name} must list positive counts"
    );
    Ok(list)
}
