//! Job submissions per second through the real write path: `POST /v1/jobs` -> spec parsing ->
//! feasibility check -> openraft client_write -> redb log append with fsync -> `State::apply` ->
//! 201, on a one-voter coordinator served in-process on 127.0.0.1. Then the same load against etcd
//! (one member, its JSON gateway, `PUT` of the same job spec as the value), when an `etcd` binary is
//! installed, and the ratio of the two.
//!
//! Run: `cargo bench -p trainctl-benches --bench write_path`.
//! Knobs (environment): `TRAINCTL_BENCH_JOBS` submissions per concurrency level (default 2000),
//! `TRAINCTL_BENCH_CONCURRENCY` client counts (default `1,8,64`), `TRAINCTL_BENCH_ETCD` the etcd
//! binary (default `etcd` from PATH; `off` skips it).
//!
//! Everything listens on 127.0.0.1 and lives in a temporary directory removed at the end; etcd runs
//! as a child process that is killed when the benchmark ends, fails or panics.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tokio::sync::watch;
use trainctl_benches::{base64, fixtures, job_spec_json, millis, Summary};
use trainctl_coordinator::server::{self, CoordinatorConfig};
use trainctl_coordinator::state::CommandOutcome;

/// Submissions per concurrency level, unless `TRAINCTL_BENCH_JOBS` says otherwise.
const DEFAULT_JOBS: usize = 2_000;
/// Concurrent clients, unless `TRAINCTL_BENCH_CONCURRENCY` says otherwise.
const DEFAULT_CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Untimed submissions before the first timed level (connections, allocator, redb pages).
const WARMUP_COUNT: usize = 50;
/// Fake hosts registered so that submissions pass the "can this ever fit" check.
const NODE_COUNT: usize = 4;
/// Appends timed for the bare-disk reference.
const FSYNC_SAMPLE_COUNT: usize = 200;
/// How long a server gets to come up (leader elected, port open).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one request may take before the run counts it as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the coordinator gets to stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// One load level's result.
struct Level {
    concurrency: usize,
    elapsed: Duration,
    latency: Summary,
}

impl Level {
    fn per_second(&self) -> f64 {
        self.latency.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// What the load generator sends.
#[derive(Clone)]
enum Target {
    /// `POST {base}/v1/jobs` with a JSON job spec.
    Trainctl { base: String },
    /// `POST {base}{path}` (`/v3/kv/put`) with a base64 key and the same job spec as the value.
    Etcd { base: String, path: &'static str },
}

fn main() -> anyhow::Result<()> {
    let jobs = match std::env::var("TRAINCTL_BENCH_JOBS") {
        Ok(n) => n.parse().context("TRAINCTL_BENCH_JOBS is not a number")?,
        Err(_) => DEFAULT_JOBS,
    };
    let levels = match std::env::var("TRAINCTL_BENCH_CONCURRENCY") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("TRAINCTL_BENCH_CONCURRENCY: `{s}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => DEFAULT_CONCURRENCY.to_vec(),
    };
    ensure!(
        jobs > 0 && levels.iter().all(|&c| c > 0),
        "jobs and concurrency must be positive"
    );
    let etcd_binary = std::env::var("TRAINCTL_BENCH_ETCD").unwrap_or_else(|_| "etcd".to_string());

    let tmp = tempfile::tempdir().context("create a temporary directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;

    let fsync = fsync_reference(&tmp.path().join("fsync-probe"))?;
    println!(
        "disk reference: 300-byte append + fdatasync in {}: median {} ms, p99 {} ms ({} samples)",
        tmp.path().display(),
        millis(fsync.median),
        millis(fsync.p99),
        fsync.count
    );
    println!(
        "{jobs} submissions per level, clients {levels:?}; job spec {} bytes of JSON",
        job_spec_json(0).len()
    );

    let trainctl = runtime.block_on(bench_trainctl(
        &tmp.path().join("coordinator"),
        jobs,
        &levels,
    ))?;
    print_levels(
        "trainctl: POST /v1/jobs (REST + one-voter Raft, fsync per append)",
        &trainctl,
    );

    let etcd = if etcd_binary == "off" {
        println!("\netcd: skipped (TRAINCTL_BENCH_ETCD=off)");
        None
    } else {
        match runtime.block_on(bench_etcd(
            &etcd_binary,
            &tmp.path().join("etcd"),
            jobs,
            &levels,
        )) {
            Ok(levels) => Some(levels),
            Err(e) => {
                println!("\netcd: skipped: {e:#}");
                None
            }
        }
    };
    if let Some(etcd) = etcd {
        print_levels(
            "etcd: POST /v3/kv/put through the JSON gateway (one member, fsync'd WAL)",
            &etcd,
        );
        println!(
            "\n{:>8}  {:>12}  {:>12}  {:>16}",
            "clients", "trainctl/s", "etcd/s", "trainctl / etcd"
        );
        for (t, e) in trainctl.iter().zip(&etcd) {
            println!(
                "{:>8}  {:>12.0}  {:>12.0}  {:>16.2}",
                t.concurrency,
                t.per_second(),
                e.per_second(),
                t.per_second() / e.per_second()
            );
        }
    }
    Ok(())
}

fn print_levels(title: &str, levels: &[Level]) {
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

/// What one fsync'd 300-byte append costs on the disk under the temporary directory: the floor
/// for one client's durable write, whoever makes it.
fn fsync_reference(path: &Path) -> anyhow::Result<Summary> {
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let record = [b'x'; 300];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLE_COUNT);
    for _ in 0..FSYNC_SAMPLE_COUNT {
        let t = Instant::now();
        file.write_all(&record)
            .context("append to the probe file")?;
        file.sync_data().context("fdatasync the probe file")?;
        samples.push(t.elapsed());
    }
    Ok(Summary::of(&mut samples).expect("FSYNC_SAMPLE_COUNT > 0"))
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .no_proxy()
        .build()
        .context("build the HTTP client")
}

async fn bench_trainctl(
    data_dir: &Path,
    jobs: usize,
    levels: &[usize],
) -> anyhow::Result<Vec<Level>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut config = CoordinatorConfig::new(data_dir.to_path_buf(), addr.to_string());
    // No agent heartbeats here: keep the liveness loop from declaring the fake nodes lost mid-run.
    config.node_timeout_ms = 3_600_000;
    let coordinator = server::open(config).await.context("open the coordinator")?;
    let (stop, stopped) = watch::channel(false);
    let serving = tokio::spawn(server::run(coordinator.clone(), listener, stopped));
    let base = format!("http://{addr}");
    let client = http_client()?;

    let result = async {
        wait_until_ready(&client, &format!("{base}/v1/health"), || {
            coordinator.is_leader()
        })
        .await?;
        for i in 0..NODE_COUNT {
            let outcome = coordinator
                .write(fixtures::register_node(i, server::now_ms()))
                .await
                .context("register a fake node")?;
            ensure!(
                outcome == CommandOutcome::Done,
                "registering node {i}: {outcome:?}"
            );
        }
        let target = Target::Trainctl { base: base.clone() };
        run_level(&client, &target, 1, WARMUP_COUNT, 0)
            .await
            .context("warm-up")?;
        let mut out = Vec::new();
        for (k, &c) in levels.iter().enumerate() {
            out.push(run_level(&client, &target, c, jobs, (k + 1) * jobs).await?);
        }
        let queued = server::job_counts(&coordinator);
        println!("\ntrainctl after the run: jobs by state {queued:?}");
        Ok(out)
    }
    .await;

    stop.send(true).ok();
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, serving).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("coordinator stopped with an error: {e:#}"),
        Ok(Err(e)) => eprintln!("coordinator task failed: {e}"),
        Err(_) => eprintln!("coordinator did not stop within {SHUTDOWN_TIMEOUT:?}"),
    }
    result
}

/// Polls `url` until it answers 200 and `ready()` holds, for at most `STARTUP_TIMEOUT`.
async fn wait_until_ready(
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

/// Sends `count` writes from `concurrency` clients; write `i` carries sequence number `first + i`.
async fn run_level(
    client: &reqwest::Client,
    target: &Target,
    concurrency: usize,
    count: usize,
    first: usize,
) -> anyhow::Result<Level> {
    // Bodies are made before the clock starts, so the load generator spends its CPU on sending.
    let bodies: Arc<Vec<String>> = Arc::new(
        (first..first + count)
            .map(|seq| body(target, seq))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, target, bodies, next) =
            (client.clone(), target.clone(), bodies.clone(), next.clone());
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

fn body(target: &Target, seq: usize) -> String {
    match target {
        Target::Trainctl { .. } => job_spec_json(seq),
        Target::Etcd { .. } => serde_json::json!({
            "key": base64(format!("/trainctl/jobs/{seq:08}").as_bytes()),
            "value": base64(job_spec_json(seq).as_bytes()),
        })
        .to_string(),
    }
}

async fn send(client: &reqwest::Client, target: &Target, body: String) -> anyhow::Result<()> {
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

/// An etcd child process; killed and reaped when dropped.
struct Etcd {
    child: Child,
    base: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_loopback_port() -> anyhow::Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(probe.local_addr()?.port())
}

fn start_etcd(binary: &str, data_dir: &Path) -> anyhow::Result<Etcd> {
    let version = Process::new(binary)
        .arg("--version")
        .output()
        .with_context(|| {
            format!("run `{binary} --version` (is etcd installed? `apt-get install etcd-server`)")
        })?;
    let version = String::from_utf8_lossy(&version.stdout);
    println!(
        "\netcd: {}",
        version.lines().next().unwrap_or("version unknown")
    );

    let (client_port, peer_port) = (free_loopback_port()?, free_loopback_port()?);
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let log = File::create(data_dir.with_extension("log")).context("create the etcd log file")?;
    let child = Process::new(binary)
        .args(["--name", "bench", "--data-dir"])
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args([
            "--initial-cluster",
            &format!("bench={peer_url}"),
            "--initial-cluster-state",
            "new",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {binary}"))?;
    Ok(Etcd {
        child,
        base: client_url,
    })
}

async fn bench_etcd(
    binary: &str,
    data_dir: &Path,
    jobs: usize,
    levels: &[usize],
) -> anyhow::Result<Vec<Level>> {
    let mut etcd = start_etcd(binary, data_dir)?;
    let client = http_client()?;
    let health = format!("{}/health", etcd.base);
    let ready = wait_until_ready(&client, &health, || true).await;
    if let Ok(Some(status)) = etcd.child.try_wait() {
        bail!(
            "etcd exited ({status}); see {}",
            data_dir.with_extension("log").display()
        );
    }
    ready.with_context(|| {
        format!(
            "etcd did not come up; see {}",
            data_dir.with_extension("log").display()
        )
    })?;

    // etcd 3.4 serves the gateway under /v3/, older releases under /v3beta/.
    let mut path = None;
    for candidate in ["/v3/kv/put", "/v3beta/kv/put"] {
        let target = Target::Etcd {
            base: etcd.base.clone(),
            path: candidate,
        };
        if send(&client, &target, body(&target, 0)).await.is_ok() {
            path = Some(candidate);
            break;
        }
    }
    let path =
        path.context("etcd's JSON gateway answered neither /v3/kv/put nor /v3beta/kv/put")?;
    let target = Target::Etcd {
        base: etcd.base.clone(),
        path,
    };
    run_level(&client, &target, 1, WARMUP_COUNT, 0)
        .await
        .context("etcd warm-up")?;
    let mut out = Vec::new();
    for (k, &c) in levels.iter().enumerate() {
        out.push(run_level(&client, &target, c, jobs, (k + 1) * jobs).await?);
    }
    drop(etcd);
    Ok(out)
}
