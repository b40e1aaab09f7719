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
//! The coordinator serves plain HTTP (`--insecure`), as etcd does here; `tls_overhead` measures
//! what TLS and tokens add.
//!
//! Everything listens on 127.0.0.1 and lives in a temporary directory removed at the end; etcd runs
//! as a child process that is killed when the benchmark ends, fails or panics.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};

use anyhow::{bail, Context};
use trainctl_benches::load::{self, print_levels, run_level, send, Connections, Level, Target};
use trainctl_benches::served::Served;
use trainctl_benches::{job_spec_json, millis, Summary};
use trainctl_coordinator::server;

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

fn main() -> anyhow::Result<()> {
    let jobs = load::env_count("TRAINCTL_BENCH_JOBS", DEFAULT_JOBS)?;
    let levels = load::env_counts("TRAINCTL_BENCH_CONCURRENCY", &DEFAULT_CONCURRENCY)?;
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
        "trainctl: POST /v1/jobs (plain HTTP, --insecure; REST + one-voter Raft, fsync per append)",
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

/// What one fsync'd 300-byte append costs on the disk under the temporary directory: the floor
/// for one client's durable write, whoever makes it.
fn fsync_reference(path: &Path) -> anyhow::Result<Summary> {
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let record = [b'x'; 300];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLE_COUNT);
    for _ in 0..FSYNC_SAMPLE_COUNT {
        let t = std::time::Instant::now();
        file.write_all(&record)
            .context("append to the probe file")?;
        file.sync_data().context("fdatasync the probe file")?;
        samples.push(t.elapsed());
    }
    Ok(Summary::of(&mut samples).expect("FSYNC_SAMPLE_COUNT > 0"))
}

/// trainctl with plain HTTP (`--insecure`), like the etcd it is compared with; `tls_overhead`
/// measures what TLS and tokens add.
async fn bench_trainctl(
    data_dir: &Path,
    jobs: usize,
    levels: &[usize],
) -> anyhow::Result<Vec<Level>> {
    let served = Served::start(data_dir, false).await?;
    let result = async {
        served.register_fake_nodes(NODE_COUNT).await?;
        let client = served.http_client(Connections::KeepAlive)?;
        let target = served.target();
        run_level(std::slice::from_ref(&client), &target, 1, WARMUP_COUNT, 0)
            .await
            .context("warm-up")?;
        let mut out = Vec::new();
        for (k, &c) in levels.iter().enumerate() {
            out.push(
                run_level(
                    std::slice::from_ref(&client),
                    &target,
                    c,
                    jobs,
                    (k + 1) * jobs,
                )
                .await?,
            );
        }
        let queued = server::job_counts(&served.coordinator);
        println!("\ntrainctl after the run: jobs by state {queued:?}");
        Ok(out)
    }
    .await;
    served.shutdown().await;
    result
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
    let client = load::http_client(Connections::KeepAlive)?;
    let health = format!("{}/health", etcd.base);
    let ready = load::wait_until_ready(&client, &health, || true).await;
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
        if send(&client, &target, load::body(&target, 0)).await.is_ok() {
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
    run_level(std::slice::from_ref(&client), &target, 1, WARMUP_COUNT, 0)
        .await
        .context("etcd warm-up")?;
    let mut out = Vec::new();
    for (k, &c) in levels.iter().enumerate() {
        out.push(
            run_level(
                std::slice::from_ref(&client),
                &target,
                c,
                jobs,
                (k + 1) * jobs,
            )
            .await?,
        );
    }
    drop(etcd);
    Ok(out)
}
