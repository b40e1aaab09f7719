//! What TLS costs, in one run: two real coordinators served in-process side by side, one with plain
//! HTTP (`--insecure`) and one secure (TLS on the port, a bearer token on every REST request,
//! agents presenting their client certificate), each on a tokio runtime of its own so that its CPU
//! time can be read apart from the load generator's.
//!
//! 1. **Write path**: `POST /v1/jobs` through REST and the fsync'd one-voter Raft log, from the
//!    same client counts as `write_path` (1, 8, 64), each submitter with a client of its own, in
//!    two series: `keep-alive` (connections reused: long-lived programs) and `per-request` (a new
//!    connection per request; over TLS a full handshake each time, no session resumption, as a
//!    fresh `trainctl` process pays). Like the CLI, a TLS client offers HTTP/2 first (ALPN) and
//!    a plain one speaks HTTP/1.1. Plain and TLS alternate level by level, so both coordinators
//!    hold the same number of jobs at each comparison and share the machine's moods.
//! 2. **Heartbeats**: N fake agents, each with its own gRPC channel built by the real agent's code
//!    (`trainctl_agent::identity::coordinator_channel`): plain h2c, or mutual TLS with a client
//!    certificate obtained the way a real agent joins (an agent token from `POST /v1/tokens`, then
//!    `POST /v1/join` with a CSR). They register, then heartbeat as an idle agent does (no ranks,
//!    no logs) but without the long poll (`wait_ms = 0`), so each beat is answered at once: first at
//!    a fixed rate (coordinator CPU per heartbeat at a known load), then back to back (the rate the
//!    coordinator sustains on this machine, the load generator included).
//!
//! Run: `cargo bench -p trainctl-benches --bench tls_overhead` (about 1 to 2 min on 2 cores).
//! Knobs (environment): `TRAINCTL_BENCH_JOBS` submissions per level (default 2000),
//! `TRAINCTL_BENCH_CONCURRENCY` client counts (default `1,8,64`), `TRAINCTL_BENCH_AGENTS` fake
//! agents (default 100), `TRAINCTL_BENCH_HEARTBEAT_HZ` beats per second per agent in the
//! fixed-rate phase (default 10), `TRAINCTL_BENCH_WINDOW_MS` length of each heartbeat phase
//! (default 5000). Two diagnosis knobs (see the README): `TRAINCTL_BENCH_SERVER_NODELAY=1` sets
//! `TCP_NODELAY` on both coordinators' listening sockets, which accepted sockets inherit on Linux;
//! `TRAINCTL_BENCH_TLS_HTTP1=1` makes REST clients over TLS offer only HTTP/1.1.
//!
//! Everything listens on 127.0.0.1 and lives in a temporary directory removed at the end.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio::runtime::Runtime;
use tonic::transport::Channel;
use trainctl_agent::identity::{self, AgentTlsConfig};
use trainctl_benches::load::{self, run_level, ConnectCounter, Connections, Level};
use trainctl_benches::served::{self, Served};
use trainctl_benches::{cpu, micros, millis, Summary};
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{HeartbeatRequest, HostResources, RegisterRequest};

const DEFAULT_JOBS: usize = 2_000;
/// The client counts of `write_path`.
const DEFAULT_CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Untimed submissions before the first timed level, on kept-alive connections.
const WARMUP_COUNT: usize = 50;
/// Fake hosts registered so that submissions pass the "can this ever fit" check.
const NODE_COUNT: usize = 4;
const DEFAULT_AGENTS: usize = 100;
const DEFAULT_HEARTBEAT_HZ: usize = 10;
const DEFAULT_WINDOW_MS: usize = 5_000;
/// Name (prefix) of the load generator's threads.
const LOAD_THREADS: &str = "load";
/// Worker threads per runtime: the machine's cores, two on the machine of the published figures.
const WORKERS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Tls,
}

impl Mode {
    const BOTH: [Mode; 2] = [Mode::Plain, Mode::Tls];

    fn secure(self) -> bool {
        self == Mode::Tls
    }

    /// The name of the threads serving this mode's coordinator.
    fn threads(self) -> &'static str {
        match self {
            Mode::Plain => "srv-plain",
            Mode::Tls => "srv-tls",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Tls => "TLS",
        }
    }
}

/// CPU time a window of load cost the coordinator's threads and the load generator's.
#[derive(Debug, Clone, Copy)]
struct Cost {
    server: Duration,
    client: Duration,
}

/// Runs `work` and reads what it cost `mode`'s coordinator and the load generator in CPU time.
async fn measured<T>(
    mode: Mode,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Cost)> {
    let (server, client) = (
        cpu::threads_cpu(mode.threads())?,
        cpu::threads_cpu(LOAD_THREADS)?,
    );
    let out = work.await?;
    let cost = Cost {
        server: cpu::threads_cpu(mode.threads())?.saturating_sub(server),
        client: cpu::threads_cpu(LOAD_THREADS)?.saturating_sub(client),
    };
    Ok((out, cost))
}

/// Whether `TRAINCTL_BENCH_SERVER_NODELAY=1`: a diagnosis knob, not what a coordinator does.
fn server_nodelay() -> bool {
    std::env::var("TRAINCTL_BENCH_SERVER_NODELAY").is_ok_and(|v| v == "1")
}

/// Whether `TRAINCTL_BENCH_TLS_HTTP1=1`: TLS clients offer only HTTP/1.1, as plain ones speak,
/// to tell TLS's own cost from HTTP/2's (the CLI speaks HTTP/2 over TLS).
fn tls_http1_only() -> bool {
    std::env::var("TRAINCTL_BENCH_TLS_HTTP1").is_ok_and(|v| v == "1")
}

/// Per item, in microseconds.
fn per(total: Duration, count: usize) -> String {
    micros(total / count.max(1) as u32)
}

fn main() -> anyhow::Result<()> {
    let jobs = load::env_count("TRAINCTL_BENCH_JOBS", DEFAULT_JOBS)?;
    let levels = load::env_counts("TRAINCTL_BENCH_CONCURRENCY", &DEFAULT_CONCURRENCY)?;
    let agents = load::env_count("TRAINCTL_BENCH_AGENTS", DEFAULT_AGENTS)?;
    let hz = load::env_count("TRAINCTL_BENCH_HEARTBEAT_HZ", DEFAULT_HEARTBEAT_HZ)?;
    let window = Duration::from_millis(load::env_count(
        "TRAINCTL_BENCH_WINDOW_MS",
        DEFAULT_WINDOW_MS,
    )? as u64);
    trainctl_tls::install_crypto_provider();
    let tmp = tempfile::tempdir().context("create a temporary directory")?;
    let load_rt = cpu::runtime(LOAD_THREADS, WORKERS).context("start the load runtime")?;
    let servers = [
        cpu::runtime(Mode::Plain.threads(), WORKERS).context("start a server runtime")?,
        cpu::runtime(Mode::Tls.threads(), WORKERS).context("start a server runtime")?,
    ];
    println!("machine: {}", machine());
    println!(
        "write path: {jobs} submissions per level and mode, clients {levels:?}; \
         heartbeats: {agents} agents, {hz}/s each at the fixed rate, {} s per phase",
        window.as_secs_f64()
    );
    if tls_http1_only() {
        println!(
            "TRAINCTL_BENCH_TLS_HTTP1=1: REST over TLS offers only http/1.1 (the CLI offers h2 first)"
        );
    }
    if server_nodelay() {
        println!(
            "TRAINCTL_BENCH_SERVER_NODELAY=1: TCP_NODELAY set on both coordinators' listening \
             sockets (inherited by accepted sockets)"
        );
    }

    let (writes, idle) = load_rt.block_on(bench_writes(&servers, tmp.path(), jobs, &levels))?;
    println!(
        "\nidle coordinators (no requests; Raft ticks and the periodic loops) use {:.1}% (plain) \
         and {:.1}% (TLS) of a core",
        100.0 * idle[0],
        100.0 * idle[1]
    );
    print_writes(&writes);
    let beats = load_rt.block_on(bench_heartbeats(&servers, tmp.path(), agents, hz, window))?;
    print_heartbeats(&beats, agents, hz);
    println!("\nload average at the end: {}", load_average());
    Ok(())
}

/// Opens and serves a coordinator on `rt`, so that its tasks (and CPU time) are that runtime's.
/// `TRAINCTL_BENCH_SERVER_NODELAY=1` sets `TCP_NODELAY` on its listening socket (see
/// [`served::loopback_listener`]).
async fn start_on(rt: &Runtime, dir: PathBuf, mode: Mode) -> anyhow::Result<Served> {
    rt.spawn(async move {
        let listener = served::loopback_listener(server_nodelay())?;
        Served::start_on(&dir, mode.secure(), listener).await
    })
    .await
    .context("the coordinator's start task")?
    .with_context(|| format!("start the {} coordinator", mode.label()))
}

// ---------------------------------------------------------------------------------------------
// Write path

/// How the concurrent submitters use connections; each submitter has a client of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    /// Connections kept alive and reused: long-lived programs.
    KeepAlive,
    /// A new connection (and, over TLS, a full handshake) per request: CLI invocations.
    PerRequest,
}

impl Series {
    const ALL: [Series; 2] = [Series::KeepAlive, Series::PerRequest];

    fn label(self) -> &'static str {
        match self {
            Series::KeepAlive => "keep-alive",
            Series::PerRequest => "per-request",
        }
    }

    fn connections(self) -> Connections {
        match self {
            Series::KeepAlive => Connections::KeepAlive,
            Series::PerRequest => Connections::PerRequest,
        }
    }
}

/// One level of submissions against one coordinator.
struct WriteLevel {
    level: Level,
    cost: Cost,
    /// TCP connections the clients opened during the level.
    connects: usize,
}

struct WriteRow {
    series: Series,
    concurrency: usize,
    /// Plain first, then TLS.
    modes: [WriteLevel; 2],
}

async fn bench_writes(
    servers: &[Runtime; 2],
    tmp: &Path,
    jobs: usize,
    levels: &[usize],
) -> anyhow::Result<(Vec<WriteRow>, [f64; 2])> {
    let plain = start_on(&servers[0], tmp.join("writes-plain"), Mode::Plain).await?;
    let tls = match start_on(&servers[1], tmp.join("writes-tls"), Mode::Tls).await {
        Ok(tls) => tls,
        Err(e) => {
            plain.shutdown().await;
            return Err(e);
        }
    };
    let served = [plain, tls];
    let result = async {
        for s in &served {
            s.register_fake_nodes(NODE_COUNT).await?;
            let client = s.http_client(Connections::KeepAlive)?;
            run_level(&[client], &s.target(), 1, WARMUP_COUNT, 0)
                .await
                .context("warm-up")?;
        }
        let idle = idle_cpu().await?;
        let mut rows = Vec::new();
        let mut first = WARMUP_COUNT;
        for series in Series::ALL {
            for &concurrency in levels {
                let mut modes = Vec::new();
                for (mode, s) in Mode::BOTH.into_iter().zip(&served) {
                    // Fresh clients per level: no connection carried over from the last one.
                    let counter = ConnectCounter::default();
                    // One client per submitter, as separate programs: one reqwest client shared
                    // by all would speak HTTP/2 over TLS and multiplex them on one connection.
                    let clients = (0..concurrency)
                        .map(|_| {
                            let builder =
                                s.http_builder_alpn(series.connections(), tls_http1_only())?;
                            builder
                                .connector_layer(counter.clone())
                                .build()
                                .context("build the HTTP client")
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let (level, cost) = measured(
                        mode,
                        run_level(&clients, &s.target(), concurrency, jobs, first),
                    )
                    .await
                    .with_context(|| format!("{} submissions", mode.label()))?;
                    modes.push(WriteLevel {
                        level,
                        cost,
                        connects: counter.count(),
                    });
                }
                first += jobs;
                let [plain, tls]: [WriteLevel; 2] = modes
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("two modes"));
                rows.push(WriteRow {
                    series,
                    concurrency,
                    modes: [plain, tls],
                });
            }
        }
        Ok((rows, idle))
    }
    .await;
    for s in served {
        s.shutdown().await;
    }
    result
}

/// How long the coordinators are watched idle.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

/// The share of a core each coordinator (plain, TLS) uses with no request to serve: a background
/// that every per-request CPU figure includes, spread over the level's requests.
async fn idle_cpu() -> anyhow::Result<[f64; 2]> {
    let before = [
        cpu::threads_cpu(Mode::Plain.threads())?,
        cpu::threads_cpu(Mode::Tls.threads())?,
    ];
    tokio::time::sleep(IDLE_WINDOW).await;
    let mut out = [0.0; 2];
    for (k, mode) in Mode::BOTH.into_iter().enumerate() {
        let used = cpu::threads_cpu(mode.threads())?.saturating_sub(before[k]);
        out[k] = used.as_secs_f64() / IDLE_WINDOW.as_secs_f64();
    }
    Ok(out)
}

fn print_writes(rows: &[WriteRow]) {
    println!(
        "\nwrite path: POST /v1/jobs, REST + one-voter Raft (fsync per append); \
         CPU = the coordinator's threads / the load generator's, per request"
    );
    println!(
        "{:<11} {:>7}  {:<5} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7}",
        "connections",
        "clients",
        "mode",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "server us",
        "client us",
        "connects"
    );
    for row in rows {
        for (mode, m) in Mode::BOTH.into_iter().zip(&row.modes) {
            let n = m.level.latency.count;
            println!(
                "{:<11} {:>7}  {:<5} {:>9.0} {:>9} {:>9} {:>12} {:>12} {:>7}",
                row.series.label(),
                row.concurrency,
                mode.label(),
                m.level.per_second(),
                millis(m.level.latency.median),
                millis(m.level.latency.p99),
                per(m.cost.server, n),
                per(m.cost.client, n),
                m.connects
            );
        }
    }
    println!("\nwrite path, TLS / plain (jobs/s below 1 and times above 1: TLS costs)");
    println!(
        "{:<11} {:>7}  {:>9} {:>9} {:>9} {:>12} {:>12}",
        "connections", "clients", "jobs/s", "p50", "p99", "server CPU", "client CPU"
    );
    for row in rows {
        let [p, t] = &row.modes;
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        let cpu = |c: Duration, n: usize| c.as_secs_f64() / n as f64;
        println!(
            "{:<11} {:>7}  {:>9.2} {:>9.2} {:>9.2} {:>12.2} {:>12.2}",
            row.series.label(),
            row.concurrency,
            t.level.per_second() / p.level.per_second(),
            ratio(t.level.latency.median, p.level.latency.median),
            ratio(t.level.latency.p99, p.level.latency.p99),
            cpu(t.cost.server, t.level.latency.count)
                / cpu(p.cost.server, p.level.latency.count).max(1e-12),
            cpu(t.cost.client, t.level.latency.count)
                / cpu(p.cost.client, p.level.latency.count).max(1e-12),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Heartbeats

/// A fake agent: registered, with its own channel (one HTTP/2 connection) to the coordinator.
struct FakeAgent {
    node: String,
    instance_id: String,
    client: AgentServiceClient<Channel>,
}

/// One phase of heartbeats against one coordinator.
struct BeatPhase {
    mode: Mode,
    /// `None`: back to back.
    rate_hz: Option<usize>,
    beats: usize,
    elapsed: Duration,
    latency: Summary,
    cost: Cost,
}

struct Beats {
    /// Per mode: the first RPC of each agent (Register: connect, handshake, one Raft write).
    first_rpc: [Summary; 2],
    phases: Vec<BeatPhase>,
}

async fn bench_heartbeats(
    servers: &[Runtime; 2],
    tmp: &Path,
    agents: usize,
    hz: usize,
    window: Duration,
) -> anyhow::Result<Beats> {
    let plain = start_on(&servers[0], tmp.join("beats-plain"), Mode::Plain).await?;
    let tls = match start_on(&servers[1], tmp.join("beats-tls"), Mode::Tls).await {
        Ok(tls) => tls,
        Err(e) => {
            plain.shutdown().await;
            return Err(e);
        }
    };
    let served = [plain, tls];
    let result = async {
        let mut fleets = Vec::new();
        let mut first_rpc = Vec::new();
        for (mode, s) in Mode::BOTH.into_iter().zip(&served) {
            let dir = tmp.join(format!("agents-{}", mode.label()));
            let (fleet, first) = admit_agents(s, &dir, agents)
                .await
                .with_context(|| format!("admit the {} agents", mode.label()))?;
            fleets.push(fleet);
            first_rpc.push(first);
        }
        let period = Duration::from_secs(1) / hz as u32;
        let mut phases = Vec::new();
        for rate in [Some(period), None] {
            for (k, mode) in Mode::BOTH.into_iter().enumerate() {
                let counted = served[k].coordinator.metrics.heartbeats.get();
                let ((latencies, elapsed), cost) =
                    measured(mode, beat(&fleets[k], rate, window)).await?;
                let counted = served[k].coordinator.metrics.heartbeats.get() - counted;
                let mut latencies = latencies;
                let beats = latencies.len();
                ensure!(
                    counted as usize == beats,
                    "the {} coordinator counted {counted} heartbeats, the agents sent {beats}",
                    mode.label()
                );
                phases.push(BeatPhase {
                    mode,
                    rate_hz: rate.map(|_| hz),
                    beats,
                    elapsed,
                    latency: Summary::of(&mut latencies).context("no heartbeats")?,
                    cost,
                });
            }
        }
        let [plain, tls]: [Summary; 2] = first_rpc
            .try_into()
            .unwrap_or_else(|_| unreachable!("two modes"));
        Ok(Beats {
            first_rpc: [plain, tls],
            phases,
        })
    }
    .await;
    for s in served {
        s.shutdown().await;
    }
    result
}

/// Admits and registers `count` fake agents. Secure, each joins as a real agent does (through
/// `identity::ensure` with an agent token and the cluster CA, its identity kept under `dir`) and
/// speaks mutual TLS; plain, it connects without either. Returns them, with how long each one's
/// first RPC took.
async fn admit_agents(
    served: &Served,
    dir: &Path,
    count: usize,
) -> anyhow::Result<(Vec<FakeAgent>, Summary)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tls = match &served.ca_pem {
        Some(ca_pem) => {
            // An agent token, as `trainctl token create --role agent` makes one.
            let admin = served.http_client(Connections::KeepAlive)?;
            let response = admin
                .post(format!("{}/v1/tokens", served.base))
                .json(&serde_json::json!({ "name": "bench-agents", "role": "agent" }))
                .send()
                .await
                .context("POST /v1/tokens")?;
            let status = response.status();
            let answer: serde_json::Value = response.json().await.context("token answer")?;
            ensure!(status.is_success(), "POST /v1/tokens: {status}: {answer}");
            let token = answer["token"]
                .as_str()
                .context("no `token` in the answer of POST /v1/tokens")?
                .to_string();
            let ca_cert = dir.join("ca.pem");
            std::fs::write(&ca_cert, ca_pem).context("write the CA file")?;
            Some(AgentTlsConfig {
                ca_cert,
                join_token: Some(token),
            })
        }
        None => None,
    };
    let mut fleet = Vec::with_capacity(count);
    let mut first = Vec::with_capacity(count);
    for i in 0..count {
        let node = format!("hb-{i:05}");
        let identity = match &tls {
            Some(tls) => Some(
                identity::ensure(&dir.join(&node), &node, &served.base, tls)
                    .await
                    .with_context(|| format!("join as {node}"))?,
            ),
            None => None,
        };
        let channel = identity::coordinator_channel(&served.base, identity.as_ref())?;
        let mut client = AgentServiceClient::new(channel);
        let instance_id = format!("bench-{}-{i}", std::process::id());
        let t = Instant::now();
        client
            .register(RegisterRequest {
                node_name: node.clone(),
                address: "127.0.0.1".to_string(),
                instance_id: instance_id.clone(),
                resources: Some(HostResources {
                    cpus: 16,
                    memory_mib: 65_536,
                    hostname: node.clone(),
                    containment: "none (benchmark)".to_string(),
                    ..Default::default()
                }),
                port_range_start: 29_500,
                port_range_end: 29_599,
                agent_version: "bench".to_string(),
                health: None,
            })
            .await
            .with_context(|| format!("register {node}"))?;
        first.push(t.elapsed());
        let agent = FakeAgent {
            node,
            instance_id,
            client,
        };
        // One untimed beat: the connection is warm before any phase.
        heartbeat(&mut agent.client.clone(), &agent.node, &agent.instance_id).await?;
        fleet.push(agent);
    }
    Ok((fleet, Summary::of(&mut first).context("no agents")?))
}

/// One idle agent's heartbeat, answered at once (`wait_ms = 0`).
async fn heartbeat(
    client: &mut AgentServiceClient<Channel>,
    node: &str,
    instance_id: &str,
) -> anyhow::Result<()> {
    let reply = client
        .heartbeat(HeartbeatRequest {
            node_name: node.to_string(),
            instance_id: instance_id.to_string(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("heartbeat of {node}"))?
        .into_inner();
    ensure!(
        !reply.register_again,
        "{node}: the coordinator asked it to register again"
    );
    Ok(())
}

/// Every agent heartbeats for `window`: every `period` (staggered across agents) or, without one,
/// back to back. Returns each beat's round trip and the phase's length.
async fn beat(
    fleet: &[FakeAgent],
    period: Option<Duration>,
    window: Duration,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let start = tokio::time::Instant::now();
    let deadline = start + window;
    let mut tasks = Vec::with_capacity(fleet.len());
    for (i, agent) in fleet.iter().enumerate() {
        let mut client = agent.client.clone();
        let (node, instance_id) = (agent.node.clone(), agent.instance_id.clone());
        let mut ticks = period.map(|p| {
            let offset = p * i as u32 / fleet.len() as u32;
            let mut ticks = tokio::time::interval_at(start + offset, p);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                heartbeat(&mut client, &node, &instance_id).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("agent task")??);
    }
    Ok((latencies, start.elapsed()))
}

fn print_heartbeats(beats: &Beats, agents: usize, hz: usize) {
    println!(
        "\nheartbeats: {agents} agents, gRPC Heartbeat of an idle agent answered at once; plain h2c \
         vs mutual TLS (client certificate)"
    );
    for (mode, first) in Mode::BOTH.into_iter().zip(&beats.first_rpc) {
        println!(
            "first RPC of an agent ({}): connect{} + Register (one Raft write): median {} ms, p99 {} ms",
            mode.label(),
            if mode.secure() { " + TLS handshake" } else { "" },
            millis(first.median),
            millis(first.p99)
        );
    }
    println!(
        "{:<16} {:<5} {:>8} {:>9} {:>9} {:>9} {:>12} {:>12} {:>11}",
        "phase",
        "mode",
        "beats",
        "beats/s",
        "p50 ms",
        "p99 ms",
        "server us",
        "client us",
        "server CPU"
    );
    for p in &beats.phases {
        let phase = match p.rate_hz {
            Some(hz) => format!("{}/s offered", hz * agents),
            None => "back to back".to_string(),
        };
        println!(
            "{:<16} {:<5} {:>8} {:>9.0} {:>9} {:>9} {:>12} {:>12} {:>10.0}%",
            phase,
            p.mode.label(),
            p.beats,
            p.beats as f64 / p.elapsed.as_secs_f64(),
            millis(p.latency.median),
            millis(p.latency.p99),
            per(p.cost.server, p.beats),
            per(p.cost.client, p.beats),
            100.0 * p.cost.server.as_secs_f64() / p.elapsed.as_secs_f64()
        );
    }
    println!("\nheartbeats, TLS / plain");
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "phase", "beats/s", "p50", "p99", "server CPU", "client CPU"
    );
    for pair in beats.phases.chunks(2) {
        let [p, t] = pair else { continue };
        let rate = |b: &BeatPhase| b.beats as f64 / b.elapsed.as_secs_f64();
        let cpu = |c: Duration, n: usize| c.as_secs_f64() / n as f64;
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        let phase = match p.rate_hz {
            Some(_) => format!("{}/s offered", hz * agents),
            None => "back to back".to_string(),
        };
        println!(
            "{:<16} {:>9.2} {:>9.2} {:>9.2} {:>12.2} {:>12.2}",
            phase,
            rate(t) / rate(p),
            ratio(t.latency.median, p.latency.median),
            ratio(t.latency.p99, p.latency.p99),
            cpu(t.cost.server, t.beats) / cpu(p.cost.server, p.beats).max(1e-12),
            cpu(t.cost.client, t.beats) / cpu(p.cost.client, p.beats).max(1e-12),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The machine

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cores} cores ({model}), load average {}", load_average())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}
