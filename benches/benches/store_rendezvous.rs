//! Rendezvous of **4 096 clients** on one TCPStore: `trainctl store` next to torch's own libuv
//! server, both real processes on 127.0.0.1 (`trainctl_benches::stores`), taking turns, a fresh
//! server for every round.
//!
//! Every client does what torch's store barrier does (`torch.distributed.elastic.utils.store.
//! barrier`): connect (the `VALIDATE` handshake and a `PING`, as torch's client), `ADD
//! rdzv/checkin 1`; the client whose `ADD` returns N sets `rdzv/last`; every client `WAIT`s for
//! `rdzv/last`. The clients are tokio tasks of this process using `trainctl_store::StoreClient`,
//! which speaks torch's protocol byte for byte; all are spawned at once and keep their connection
//! until the round ends, as ranks do.
//!
//! Measured per round, from just before the first connect: **the last client released** (its
//! `WAIT` answered), and the last client connected (handshake answered). The goal is under 1 s for
//! trainctl. A round is cut after `TRAINCTL_BENCH_RDZV_TIMEOUT_S` and then reports how many clients
//! had connected and been released by then. The load average is printed with the figures.
//!
//! Torch's server looks up the name of every peer (`getnameinfo`) on its event loop; where the
//! DNS server drops a query, the loop stalls for the resolver's timeout (5 s). So, where it can
//! (root: `unshare -m`), the bench also runs torch's server with no DNS server to ask
//! (`torch libuv, no DNS`, see [`ServerKind::TorchNoDns`]), which shows the server's own cost.
//!
//! Run: `cargo build --release -p trainctl && cargo bench -p trainctl-benches --bench
//! store_rendezvous` (about 2 min, most of it torch's server cut at the timeout). Knobs:
//! `TRAINCTL_BENCH_RDZV_CLIENTS` (4096), `TRAINCTL_BENCH_ROUNDS` (3 per server),
//! `TRAINCTL_BENCH_RDZV_TIMEOUT_S` (30), `TRAINCTL_BENCH_RDZV_SERVERS` (a comma-separated subset
//! of `trainctl,torch,torch-no-dns`; default all three), `TRAINCTL_BENCH_PYTHON` (a Python with
//! torch; default `.venv/bin/python`), `TRAINCTL_BIN`. The process raises its open-file limit to
//! the hard limit (each client is a descriptor here and one in the server).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use trainctl_benches::load;
use trainctl_benches::procs::{self, BenchDir};
use trainctl_benches::stores::{self, ServerKind, Servers};
use trainctl_store::{Namespace, StoreClient, StoreError};

const DEFAULT_CLIENTS: usize = 4096;
const DEFAULT_ROUNDS: usize = 3;
const DEFAULT_TIMEOUT_S: usize = 30;
/// Descriptors kept free for everything else (the runtime, stdio, the children's pipes).
const SPARE_FILES: usize = 64;
const CHECKIN_KEY: &str = "rdzv/checkin";
const LAST_KEY: &str = "rdzv/last";

/// One round against one server.
struct Round {
    /// Until the last client had its handshake answered; `None` if the round was cut first.
    connected: Option<Duration>,
    /// Until the last client's `WAIT` was answered; `None` if the round was cut or a client failed.
    released: Option<Duration>,
    connected_count: usize,
    released_count: usize,
    /// How many clients failed, and the first one's error.
    errors: usize,
    first_error: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let clients = load::env_count("TRAINCTL_BENCH_RDZV_CLIENTS", DEFAULT_CLIENTS)?;
    let rounds = load::env_count("TRAINCTL_BENCH_ROUNDS", DEFAULT_ROUNDS)?;
    let timeout = Duration::from_secs(load::env_count(
        "TRAINCTL_BENCH_RDZV_TIMEOUT_S",
        DEFAULT_TIMEOUT_S,
    )? as u64);
    let open_files = stores::raise_open_files_limit()? as usize;
    ensure!(
        clients + SPARE_FILES <= open_files,
        "{clients} clients need more than the open-file limit of {open_files} (its hard limit)"
    );
    let dir = BenchDir::new("store-rendezvous-")?;
    let servers = Servers {
        trainctl: procs::trainctl_binary(&dir.path)?,
        python: stores::python_with_torch()?,
        max_connections: open_files - SPARE_FILES,
        empty_resolv_conf: dir.path.join("resolv.conf"),
    };
    let mut kinds = server_kinds()?;
    if kinds.contains(&ServerKind::TorchNoDns) && !servers.can_run_without_dns()? {
        println!("skipping `torch libuv, no DNS`: `unshare -m` and `mount --bind` need root here");
        kinds.retain(|k| *k != ServerKind::TorchNoDns);
    }
    println!(
        "{clients} clients, {rounds} rounds per server taking turns, cut after {timeout:?}; \
         open-file limit {open_files}; {} cores; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut results: Vec<(ServerKind, Round)> = Vec::new();
    for round in 1..=rounds {
        // Each server goes first in turn.
        let mut order = kinds.clone();
        order.rotate_left((round - 1) % kinds.len());
        for kind in order {
            let server = servers.start(kind)?;
            let r = runtime.block_on(rendezvous(server.addr, clients, timeout));
            println!(
                "round {round}/{rounds} {:<19}: released {}/{clients} in {}, connected {}/{clients} in {}{}; load {}",
                kind.name(),
                r.released_count,
                secs(r.released),
                r.connected_count,
                secs(r.connected),
                match &r.first_error {
                    Some(e) => format!("; {} failed, first: {e}", r.errors),
                    None => String::new(),
                },
                load_average()
            );
            drop(server);
            results.push((kind, r));
        }
    }
    println!(
        "\nrendezvous of {clients} clients (connect, VALIDATE, ADD, WAIT for the last), {rounds} rounds each; \
         load average at the end {}",
        load_average()
    );
    println!("(a round cut at the timeout counts as the timeout: `>`)");
    println!(
        "| server | released: median s | min s | max s | all connected: median s | rounds complete |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut medians = Vec::new();
    for &kind in &kinds {
        let of_kind: Vec<&Round> = results
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, r)| r)
            .collect();
        let complete = of_kind.iter().filter(|r| r.released.is_some()).count();
        let released = sorted(of_kind.iter().map(|r| r.released));
        let connected = sorted(of_kind.iter().map(|r| r.connected));
        let median = released[released.len() / 2];
        medians.push((kind, median));
        println!(
            "| {} | {} | {} | {} | {} | {complete} of {} |",
            kind.name(),
            cell(median, timeout),
            cell(released[0], timeout),
            cell(released[released.len() - 1], timeout),
            cell(connected[connected.len() / 2], timeout),
            of_kind.len()
        );
    }
    if let Some(&(_, ours)) = medians.iter().find(|(k, _)| *k == ServerKind::Trainctl) {
        for &(kind, theirs) in medians.iter().filter(|(k, _)| *k != ServerKind::Trainctl) {
            let bound = if theirs.is_none() { "at least " } else { "" };
            println!(
                "{} takes {bound}{:.1}x trainctl's time (medians)",
                kind.name(),
                theirs.unwrap_or(timeout).as_secs_f64() / ours.unwrap_or(timeout).as_secs_f64()
            );
        }
        println!(
            "goal for trainctl: under 1 s: {}",
            match ours {
                Some(d) if d < Duration::from_secs(1) => "met",
                _ => "not met",
            }
        );
    }
    Ok(())
}

/// The servers to measure, from `TRAINCTL_BENCH_RDZV_SERVERS`.
fn server_kinds() -> anyhow::Result<Vec<ServerKind>> {
    let Ok(list) = std::env::var("TRAINCTL_BENCH_RDZV_SERVERS") else {
        return Ok(vec![
            ServerKind::Trainctl,
            ServerKind::Torch,
            ServerKind::TorchNoDns,
        ]);
    };
    let mut kinds = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        kinds.push(match name {
            "trainctl" => ServerKind::Trainctl,
            "torch" => ServerKind::Torch,
            "torch-no-dns" => ServerKind::TorchNoDns,
            other => bail!(
                "TRAINCTL_BENCH_RDZV_SERVERS: unknown server `{other}` (expected trainctl, torch, torch-no-dns)"
            ),
        });
    }
    ensure!(!kinds.is_empty(), "TRAINCTL_BENCH_RDZV_SERVERS is empty");
    Ok(kinds)
}

/// `n` clients rendezvous on the store at `addr`; gives up after `timeout`.
async fn rendezvous(addr: SocketAddr, n: usize, timeout: Duration) -> Round {
    let addr = addr.to_string();
    let connected_count = Arc::new(AtomicUsize::new(0));
    let released_count = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let addr = addr.clone();
            let connected_count = connected_count.clone();
            let released_count = released_count.clone();
            tokio::spawn(async move {
                let out = client(&addr, n, start, timeout, &connected_count).await;
                if out.is_ok() {
                    released_count.fetch_add(1, Ordering::Relaxed);
                }
                out
            })
        })
        .collect();
    let mut round = Round {
        connected: Some(Duration::ZERO),
        released: Some(Duration::ZERO),
        connected_count: 0,
        released_count: 0,
        errors: 0,
        first_error: None,
    };
    // Connections stay open until every client is done, as ranks hold theirs.
    let mut held = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = tasks.into_iter();
    while let Some(mut task) = tasks.next() {
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(Ok((conn, connected, released)))) => {
                round.connected = round.connected.map(|c| c.max(connected));
                round.released = round.released.map(|r| r.max(released));
                held.push(conn);
            }
            Ok(Ok(Err(e))) => {
                round.errors += 1;
                round.first_error.get_or_insert_with(|| e.to_string());
                round.released = None;
            }
            Ok(Err(join)) => {
                round.errors += 1;
                round.first_error.get_or_insert_with(|| join.to_string());
                round.released = None;
            }
            Err(_) => {
                round.connected_count = connected_count.load(Ordering::Relaxed);
                round.released_count = released_count.load(Ordering::Relaxed);
                task.abort();
                tasks.by_ref().for_each(|t| t.abort());
                round.released = None;
                if round.connected_count < n {
                    round.connected = None;
                }
                round
                    .first_error
                    .get_or_insert_with(|| format!("cut after {timeout:?}"));
                return round;
            }
        }
    }
    round.connected_count = connected_count.load(Ordering::Relaxed);
    round.released_count = released_count.load(Ordering::Relaxed);
    drop(held);
    round
}

/// One client: connect, check in, the last one in sets the last key, everyone waits for it.
/// Returns the connection and when it was connected and released, from `start`.
async fn client(
    addr: &str,
    n: usize,
    start: Instant,
    timeout: Duration,
    connected_count: &AtomicUsize,
) -> Result<(StoreClient, Duration, Duration), StoreError> {
    let mut conn = StoreClient::connect(addr, Namespace::Workers).await?;
    let connected = start.elapsed();
    connected_count.fetch_add(1, Ordering::Relaxed);
    if conn.add(CHECKIN_KEY, 1).await? == n as i64 {
        conn.set(LAST_KEY, b"1").await?;
    }
    conn.wait(&[LAST_KEY], timeout).await?;
    Ok((conn, connected, start.elapsed()))
}

/// Sorted, with `None` (cut) last.
fn sorted(values: impl Iterator<Item = Option<Duration>>) -> Vec<Option<Duration>> {
    let mut v: Vec<Option<Duration>> = values.collect();
    v.sort_unstable_by_key(|d| d.unwrap_or(Duration::MAX));
    v
}

/// Seconds, or `> timeout` for a cut round.
fn cell(d: Option<Duration>, timeout: Duration) -> String {
    match d {
        Some(d) => format!("{:.3}", d.as_secs_f64()),
        None => format!("> {:.0}", timeout.as_secs_f64()),
    }
}

fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.3} s", d.as_secs_f64()),
        None => "-".into(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
