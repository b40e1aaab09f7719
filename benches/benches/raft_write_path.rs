//! Job submissions per second on a **replicated** control plane: three `trainctl coordinator`
//! processes (one Raft group of 3 voters, every log append fsync'd on every member) next to **three
//! etcd members** on the same machine, driven by the same Rust client code with the same payload.
//!
//! - trainctl: `POST /v1/jobs` with the ~316-byte JSON job spec of [`job_spec_json`], plain HTTP
//!   (`--insecure`), to any member (followers forward to the leader).
//! - etcd (3.4, when installed): `POST /v3/kv/put` through its JSON gateway with a base64 key and
//!   **the same job-spec JSON bytes** as the base64 value, to any member (followers forward the
//!   proposal to the leader). etcd fsyncs its WAL by default.
//!
//! Client task `k` of a level sends to member `k % 3` of the system under test, on a keep-alive
//! connection of one shared reqwest client (HTTP/1.1, one connection per task). The two systems
//! alternate level by level (trainctl 1, etcd 1, trainctl 8, ...), both groups running all the
//! while, so each comparison is made under the same machine load. Both share the machine's cores
//! with each other and with the load generator.
//!
//! Run: `cargo build --release -p trainctl && cargo bench -p trainctl-benches --bench raft_write_path`.
//! Knobs (environment): `TRAINCTL_BENCH_JOBS` writes per level (default 2000),
//! `TRAINCTL_BENCH_CONCURRENCY` (default `1,8,64`), `TRAINCTL_BENCH_ETCD` the etcd binary (default
//! `etcd` from PATH; `off` skips etcd), `TRAINCTL_BENCH_TARGET=leader` sends every write to the
//! leader (trainctl's leader; etcd's leader by `/v3/maintenance/status`) instead of spreading,
//! `TRAINCTL_BIN` the trainctl binary, `TRAINCTL_BENCH_KEEP=1` keeps data and logs.
//!
//! Everything listens on `127.0.10.x` (trainctl on .1 to .3, etcd on .11 to .13) on free ports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use trainctl_benches::job_spec_json;
use trainctl_benches::load::{self, print_levels, run_level_spread, Connections, Level, Target};
use trainctl_benches::procs::{self, bench_ip, free_port, spawn, BenchDir, Group, Proc};

const DEFAULT_JOBS: usize = 2_000;
const DEFAULT_CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Untimed writes to each system before the first level.
const WARMUP_COUNT: usize = 60;
/// Fake 8-GPU hosts, so that the 4-host job spec fits.
const NODE_COUNT: usize = 4;
const MEMBERS: usize = 3;

fn main() -> anyhow::Result<()> {
    let jobs = load::env_count("TRAINCTL_BENCH_JOBS", DEFAULT_JOBS)?;
    let levels = load::env_counts("TRAINCTL_BENCH_CONCURRENCY", &DEFAULT_CONCURRENCY)?;
    let etcd_binary = std::env::var("TRAINCTL_BENCH_ETCD").unwrap_or_else(|_| "etcd".to_string());
    let leader_only = std::env::var("TRAINCTL_BENCH_TARGET").as_deref() == Ok("leader");

    let dir = BenchDir::new("raft-write-path-")?;
    let bin = procs::trainctl_binary(&dir.path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    println!(
        "{jobs} writes per level, clients {levels:?}, {MEMBERS} members each, writes sent to {}; \
         payload: the job spec, {} bytes of JSON",
        if leader_only {
            "the leader"
        } else {
            "every member in turn (task k -> member k % 3)"
        },
        job_spec_json(0).len()
    );
    runtime.block_on(run(
        &dir.path,
        &bin,
        &etcd_binary,
        jobs,
        &levels,
        leader_only,
    ))
}

async fn run(
    dir: &Path,
    bin: &Path,
    etcd_binary: &str,
    jobs: usize,
    levels: &[usize],
    leader_only: bool,
) -> anyhow::Result<()> {
    let mut group = Group::new(bin, &dir.join("coordinators"), MEMBERS, 1)?;
    std::fs::create_dir_all(dir.join("coordinators"))?;
    let t = Instant::now();
    group.start_all().await.context("start 3 coordinators")?;
    println!(
        "trainctl: 3 voters up and caught up in {:.2} s; logs in {}",
        t.elapsed().as_secs_f64(),
        dir.join("coordinators").display()
    );
    group.register_fake_nodes(NODE_COUNT).await?;
    let leader = group.wait_leader().await?;
    let trainctl_targets: Vec<Target> = if leader_only {
        vec![Target::Trainctl {
            base: group.bases[leader].clone(),
        }]
    } else {
        group
            .bases
            .iter()
            .map(|b| Target::Trainctl { base: b.clone() })
            .collect()
    };

    let etcd = if etcd_binary == "off" {
        println!("etcd: skipped (TRAINCTL_BENCH_ETCD=off)");
        None
    } else {
        match EtcdGroup::start(etcd_binary, &dir.join("etcd")).await {
            Ok(etcd) => Some(etcd),
            Err(e) => {
                println!("etcd: skipped: {e:#}");
                None
            }
        }
    };
    let etcd_targets: Vec<Target> = match &etcd {
        Some(etcd) if leader_only => vec![etcd.target(etcd.leader().await?)],
        Some(etcd) => (0..MEMBERS).map(|i| etcd.target(i)).collect(),
        None => Vec::new(),
    };

    let client = load::http_client(Connections::KeepAlive)?;
    let clients = std::slice::from_ref(&client);
    run_level_spread(clients, &trainctl_targets, MEMBERS, WARMUP_COUNT, 0)
        .await
        .context("trainctl warm-up")?;
    if etcd.is_some() {
        run_level_spread(clients, &etcd_targets, MEMBERS, WARMUP_COUNT, 0)
            .await
            .context("etcd warm-up")?;
    }
    let (mut t_levels, mut e_levels) = (Vec::new(), Vec::new());
    for (k, &c) in levels.iter().enumerate() {
        let first = WARMUP_COUNT + k * jobs;
        let t = run_level_spread(clients, &trainctl_targets, c, jobs, first)
            .await
            .with_context(|| format!("trainctl at {c} clients"))?;
        println!(
            "  trainctl {c:>3} clients: {:>7.0} writes/s",
            t.per_second()
        );
        t_levels.push(t);
        if etcd.is_some() {
            let e = run_level_spread(clients, &etcd_targets, c, jobs, first)
                .await
                .with_context(|| format!("etcd at {c} clients"))?;
            println!(
                "  etcd     {c:>3} clients: {:>7.0} writes/s",
                e.per_second()
            );
            e_levels.push(e);
        }
    }
    group.check_alive()?;

    // Every acknowledged submission is in the leader's state, and every member caught up.
    let expected = WARMUP_COUNT + levels.len() * jobs;
    let leader = group.wait_leader().await?;
    let listed: serde_json::Value = client
        .get(format!("{}/v1/jobs", group.bases[leader]))
        .send()
        .await?
        .json()
        .await?;
    let count = listed.as_array().map_or(0, Vec::len);
    group.wait_voters(MEMBERS).await?;
    println!(
        "\ntrainctl after the run: {count} jobs in the leader's state ({expected} acknowledged); \
         3 voters caught up"
    );
    if count != expected {
        bail!("{count} jobs listed, {expected} submissions acknowledged");
    }

    print_levels(
        "trainctl: POST /v1/jobs, 3 coordinators (Raft, fsync'd group commit), plain HTTP",
        &t_levels,
    );
    if etcd.is_some() {
        print_levels(
            "etcd 3 members: POST /v3/kv/put through the JSON gateway (fsync'd WAL)",
            &e_levels,
        );
        print_ratio(&t_levels, &e_levels);
    }
    Ok(())
}

fn print_ratio(trainctl: &[Level], etcd: &[Level]) {
    println!(
        "\n{:>8}  {:>12}  {:>12}  {:>16}",
        "clients", "trainctl/s", "etcd/s", "trainctl / etcd"
    );
    for (t, e) in trainctl.iter().zip(etcd) {
        println!(
            "{:>8}  {:>12.0}  {:>12.0}  {:>16.2}",
            t.concurrency,
            t.per_second(),
            e.per_second(),
            t.per_second() / e.per_second()
        );
    }
}

/// Three etcd members, child processes killed when dropped.
struct EtcdGroup {
    clients: Vec<String>,
    _procs: Vec<Proc>,
    path: &'static str,
}

impl EtcdGroup {
    async fn start(binary: &str, dir: &Path) -> anyhow::Result<EtcdGroup> {
        let version = std::process::Command::new(binary)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "`{binary} --version` did not run: etcd is not installed \
                     (Debian: `apt-get install etcd-server etcd-client`, or set TRAINCTL_BENCH_ETCD)"
                )
            })?;
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        println!(
            "etcd: {}",
            version.lines().next().unwrap_or("version unknown")
        );
        std::fs::create_dir_all(dir)?;
        let binary = which(binary)?;
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for i in 0..MEMBERS {
            let ip = bench_ip(11 + i as u8);
            peers.push(format!("http://{ip}:{}", free_port(ip)?));
            clients.push(format!("http://{ip}:{}", free_port(ip)?));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{i}={p}"))
            .collect();
        let mut procs = Vec::new();
        for i in 0..MEMBERS {
            let args: Vec<String> = [
                "--name",
                &format!("e{i}"),
                "--data-dir",
                &dir.join(format!("e{i}")).display().to_string(),
                "--listen-client-urls",
                &clients[i],
                "--advertise-client-urls",
                &clients[i],
                "--listen-peer-urls",
                &peers[i],
                "--initial-advertise-peer-urls",
                &peers[i],
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                "trainctl-bench",
                "--initial-cluster-state",
                "new",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs.push(spawn(&binary, &args, &dir.join(format!("e{i}.log")))?);
        }
        let client = load::http_client(Connections::KeepAlive)?;
        let t = Instant::now();
        for c in &clients {
            load::wait_until_ready(&client, &format!("{c}/health"), || true)
                .await
                .with_context(|| format!("etcd did not come up; logs in {}", dir.display()))?;
        }
        println!(
            "etcd: 3 members healthy in {:.2} s; logs in {}",
            t.elapsed().as_secs_f64(),
            dir.display()
        );
        // 3.4 serves the gateway at /v3/, older releases at /v3beta/.
        let mut path = None;
        for candidate in ["/v3/kv/put", "/v3beta/kv/put"] {
            let target = Target::Etcd {
                base: clients[0].clone(),
                path: candidate,
            };
            if load::send(&client, &target, load::body(&target, 0))
                .await
                .is_ok()
            {
                path = Some(candidate);
                break;
            }
        }
        let path =
            path.context("etcd's JSON gateway answered neither /v3/kv/put nor /v3beta/kv/put")?;
        Ok(EtcdGroup {
            clients,
            _procs: procs,
            path,
        })
    }

    fn target(&self, i: usize) -> Target {
        Target::Etcd {
            base: self.clients[i].clone(),
            path: self.path,
        }
    }

    /// The member that leads, from `/v3/maintenance/status` (`leader` and `header.member_id`).
    async fn leader(&self) -> anyhow::Result<usize> {
        let client = load::http_client(Connections::KeepAlive)?;
        let status_path = self.path.replace("kv/put", "maintenance/status");
        for (i, base) in self.clients.iter().enumerate() {
            let status: serde_json::Value = client
                .post(format!("{base}{status_path}"))
                .body("{}")
                .timeout(Duration::from_secs(5))
                .send()
                .await?
                .json()
                .await?;
            if status["leader"].is_string() && status["leader"] == status["header"]["member_id"] {
                return Ok(i);
            }
        }
        bail!("no etcd member says it leads")
    }
}

/// `name` as a path: itself if it has a slash, else found on PATH.
fn which(name: &str) -> anyhow::Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` is not on PATH"))
}
