//! `trainctl run` on hosts without a trainctl cluster: `--standalone`, static (`--node-rank`,
//! `--master-addr`) and c10d (`--rdzv-endpoint`), all on one code path:
//!
//! 1. the first node (standalone: this process; static: `--node-rank 0`; c10d: the launcher on
//!    the endpoint's host) serves the run's TCPStore ([`trainctl_store::StoreServer`]) at
//!    MASTER_ADDR:MASTER_PORT (static) or at the endpoint (c10d);
//! 2. every launcher meets the others there, round after round ([`super::rendezvous`]);
//! 3. each round it runs its workers ([`super::workers::run_group`]) with torchrun's environment
//!    (`TORCHELASTIC_USE_AGENT_STORE=True`: every worker is a client of that store, whose worker
//!    keyspace is emptied before each round), and restarts the whole gang after a failure, up to
//!    `--max-restarts` times;
//! 4. it exits 0 when every worker of every node succeeded, else 1 with torchrun's failure
//!    summary (on the node whose worker failed first). The launcher that serves the store exits
//!    last, once every other launcher has read how the run ended (torch's exit barrier).
//!
//! A signal stops it at any point, the rendezvous included. Per-attempt logs go to torch's
//! `<log_dir>/<run_id>_<random>/attempt_<n>/<local_rank>/`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;
use trainctl_store::{StoreConfig, StoreServer};

use super::flags::{self, NprocPerNode, Parsed, RdzvBackend, RunArgs, C10D_DEFAULT_PORT};
use super::rendezvous::{self, Joined, LocalEnd, Rendezvous, RoundOutcome, RoundPlan};
use super::workers::{self, GroupOptions, WorkerSpec};

/// Exit code for a command line trainctl run does not accept (argparse's).
const USAGE_EXIT: u8 = 2;

/// Entry point: `trainctl run ARGS...`.
pub async fn main(argv: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let args = match flags::parse(&argv, &|k| std::env::var(k).ok()) {
        Ok(Parsed::Help(text)) => {
            outln!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        Ok(Parsed::Run(args)) => args,
        Err(e) => {
            errln!("trainctl run: error: {e}");
            return Ok(ExitCode::from(USAGE_EXIT));
        }
    };
    if args.cluster {
        return super::cluster::main(&args).await;
    }
    if let Err(e) = check_node_rank(&args) {
        errln!("trainctl run: error: {e}");
        return Ok(ExitCode::from(USAGE_EXIT));
    }
    run_locally(args).await
}

/// A static run's `--node-rank` must name one of its `--nnodes` nodes: a rank past the end would
/// wait for a rendezvous that can never take it (for the whole join timeout).
fn check_node_rank(args: &RunArgs) -> Result<(), String> {
    if args.standalone
        || args.rdzv_backend != RdzvBackend::Static
        || args.node_rank < args.nnodes.max
    {
        return Ok(());
    }
    Err(format!(
        "--node-rank {}: a static run of --nnodes {} has node ranks 0 to {}",
        args.node_rank,
        args.nnodes.max,
        args.nnodes.max.saturating_sub(1)
    ))
}

/// Where the run's store is and whether this launcher serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topology {
    /// What workers get as MASTER_ADDR / MASTER_PORT and launchers dial (`host:port`).
    master_addr: String,
    master_port: u16,
    /// Serve the store here, on this address (`None`: another node serves it).
    serve_at: Option<SocketAddr>,
    /// `--node-rank` (static), or `None` (c10d: ranks by arrival).
    static_rank: Option<u32>,
    min_nodes: u32,
    max_nodes: u32,
    run_id: String,
}

/// Pure: the topology from the flags. `is_local` says whether a host name or address is this
/// machine's (the c10d endpoint host serves the store, as in torch).
fn topology(args: &RunArgs, is_local: &dyn Fn(&str) -> bool, random_id: &str) -> Topology {
    let unspecified = |port| Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    if args.standalone {
        return Topology {
            master_addr: "localhost".to_string(),
            master_port: 0,
            serve_at: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
            static_rank: Some(0),
            min_nodes: 1,
            max_nodes: 1,
            run_id: random_id.to_string(),
        };
    }
    match args.rdzv_backend {
        RdzvBackend::Static => {
            let port = args.master_port();
            Topology {
                master_addr: args.master_addr().to_string(),
                master_port: port,
                serve_at: (args.node_rank == 0).then_some(unspecified(port)).flatten(),
                static_rank: Some(args.node_rank),
                min_nodes: args.nnodes.max,
                max_nodes: args.nnodes.max,
                run_id: args.rdzv_id.clone(),
            }
        }
        RdzvBackend::C10d => {
            let endpoint = args.rdzv_endpoint.clone().unwrap_or(flags::Endpoint {
                host: "localhost".to_string(),
                port: None,
            });
            let port = endpoint.port_or(C10D_DEFAULT_PORT);
            let host = args
                .rdzv_conf
                .is_host
                .unwrap_or_else(|| is_local(&endpoint.host));
            Topology {
                master_addr: endpoint.host.clone(),
                master_port: port,
                serve_at: host.then_some(unspecified(port)).flatten(),
                static_rank: None,
                min_nodes: args.nnodes.min,
                max_nodes: args.nnodes.max,
                run_id: args.rdzv_id.clone(),
            }
        }
    }
}

/// Whether `host` names this machine: it resolves to an address a socket here can bind.
fn is_local_host(host: &str) -> bool {
    let Ok(addrs) = (host, 0).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || TcpListener::bind(SocketAddr::new(a.ip(), 0)).is_ok())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn random_run_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Workers per node for `--nproc-per-node`.
fn resolve_nproc(nproc: NprocPerNode) -> anyhow::Result<u32> {
    let cpus = || {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    };
    let gpus = || trainctl_agent::discovery::discover(None).gpus.len() as u32;
    Ok(match nproc {
        NprocPerNode::Count(n) => n,
        NprocPerNode::Cpu => cpus(),
        NprocPerNode::Gpu => match gpus() {
            0 => bail!("--nproc-per-node gpu: this host has no GPU that trainctl can see (NVML); give a number, or cpu"),
            n => n,
        },
        NprocPerNode::Auto => match gpus() {
            0 => cpus(),
            n => n,
        },
    })
}

/// torchrun's worker environment for one local rank of a round (pure).
fn worker_env(
    args: &RunArgs,
    topo: &Topology,
    plan: &RoundPlan,
    nproc: u32,
    local_rank: u32,
) -> Vec<(String, String)> {
    let rank = plan.rank_offset + local_rank;
    let mut env: BTreeMap<&str, String> = BTreeMap::new();
    env.insert("RANK", rank.to_string());
    env.insert("LOCAL_RANK", local_rank.to_string());
    env.insert("WORLD_SIZE", plan.world_size.to_string());
    env.insert("LOCAL_WORLD_SIZE", nproc.to_string());
    env.insert("GROUP_RANK", plan.node_rank.to_string());
    env.insert("GROUP_WORLD_SIZE", plan.nnodes.to_string());
    env.insert("ROLE_RANK", rank.to_string());
    env.insert("ROLE_WORLD_SIZE", plan.world_size.to_string());
    env.insert("ROLE_NAME", args.role.clone());
    env.insert("MASTER_ADDR", topo.master_addr.clone());
    env.insert("MASTER_PORT", topo.master_port.to_string());
    env.insert("TORCHELASTIC_RESTART_COUNT", plan.restart_count.to_string());
    env.insert("TORCHELASTIC_MAX_RESTARTS", args.max_restarts.to_string());
    env.insert("TORCHELASTIC_RUN_ID", topo.run_id.clone());
    env.insert("TORCHELASTIC_USE_AGENT_STORE", "True".to_string());
    env.insert(
        "TORCHELASTIC_SIGNALS_TO_HANDLE",
        args.signals_to_handle.clone(),
    );
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn worker_env_defaults(nproc: u32) -> Vec<(String, String)> {
    let mut defaults = vec![(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING".to_string(),
        "1".to_string(),
    )];
    if nproc > 1 {
        defaults.push(("OMP_NUM_THREADS".to_string(), "1".to_string()));
    }
    defaults
}

/// `--log-line-prefix-template` with torch's macros, else trainctl's `[host rank N] `.
fn line_prefix(template: Option<&str>, role: &str, host: &str) -> workers::LinePrefix {
    let role = role.to_string();
    let host = host.to_string();
    match template {
        Some(t) => {
            let t = t.to_string();
            Box::new(move |local, global| {
                t.replace("${role_name}", &role)
                    .replace("${rank}", &global.to_string())
                    .replace("${local_rank}", &local.to_string())
                    .replace("${hostname}", &host)
            })
        }
        None => Box::new(move |_, global| format!("[{host} rank {global}] ")),
    }
}

async fn start_store(addr: SocketAddr, topo: &Topology) -> anyhow::Result<StoreServer> {
    StoreServer::bind(addr, StoreConfig::default())
        .await
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                if topo.static_rank.is_some() {
                    " (another job on this host uses it: pick another --master-port, or --standalone for a free one)"
                } else {
                    " (another job on this host uses it: pick another port in --rdzv-endpoint)"
                }
            } else {
                ""
            };
            anyhow::anyhow!("could not serve the run's store on {addr}: {e}{hint}")
        })
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT to the launcher, as a watch of the last one received.
fn signals() -> anyhow::Result<watch::Receiver<Option<i32>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(None);
    for (kind, number) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let _ = tx.send(Some(number));
            }
        });
    }
    Ok(rx)
}

async fn run_locally(args: RunArgs) -> anyhow::Result<ExitCode> {
    let host = args.local_addr.clone().unwrap_or_else(hostname);
    let topo = topology(&args, &is_local_host, &random_run_id());
    let nproc = resolve_nproc(args.nproc_per_node)?;
    let user_signal = signals()?;

    let store = match topo.serve_at {
        Some(addr) => Some(Arc::new(start_store(addr, &topo).await?)),
        None => None,
    };
    let mut topo = topo;
    if let Some(store) = &store {
        if topo.master_port == 0 {
            topo.master_port = store.local_addr().port();
        }
    }
    // The launcher that serves the store dials it locally; the others at MASTER_ADDR.
    let endpoint = match &store {
        Some(store) => format!("127.0.0.1:{}", store.local_addr().port()),
        None => format!("{}:{}", topo.master_addr, topo.master_port),
    };
    let conf = &args.rdzv_conf;
    // torch: the static rendezvous waits `timeout` (900 s), c10d rounds `join_timeout` (600 s).
    let join_timeout = match (topo.static_rank, conf.timeout) {
        (_, Some(timeout)) => timeout,
        (Some(_), None) => flags::DEFAULT_RDZV_TIMEOUT,
        (None, None) => conf.join_timeout,
    };
    let connect = Rendezvous::connect(
        &endpoint,
        &topo.run_id,
        &host,
        topo.static_rank,
        topo.min_nodes,
        topo.max_nodes,
        join_timeout,
        conf.last_call_timeout,
    );
    let Some(rdzv) = until_signal(&user_signal, connect).await else {
        return Ok(stopped_in_rendezvous());
    };
    let mut rdzv = rdzv?;
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("trainctl-run-{}", std::process::id())),
    };
    // torch's `<log_dir>/<run_id>_<random>`, made once for every attempt of this launcher: two
    // runs with the same id (a static run's is `none`) never share files.
    let run_log_dir = make_run_log_dir(&log_dir, &topo.run_id)?;
    let workdir = std::env::current_dir().context("the current directory")?;
    let script = args.script.to_string_lossy().into_owned();
    // The same command a `--cluster` job runs (torchrun's `config_from_args`).
    let argv = super::cluster::worker_command(&args, &super::cluster::python_here())
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut round = 0;
    // Restarts used so far; `None` while this node has not yet been in a round of a run that
    // may be under way (it learns the count from the round it joins).
    let mut restarts = Some(0);
    loop {
        let reset = store.clone().map(|s| move || s.reset_workers());
        let join = rdzv.join(
            round,
            nproc,
            restarts,
            reset.as_ref().map(|f| f as &(dyn Fn() + Send + Sync)),
        );
        let Some(joined) = until_signal(&user_signal, join).await else {
            return Ok(stopped_in_rendezvous());
        };
        let plan = match joined? {
            Joined::Plan(plan) => plan,
            Joined::Later => {
                round += 1;
                restarts = None;
                continue;
            }
            Joined::RunOver => {
                errln!("trainctl run: the run succeeded before this node was needed");
                return Ok(ExitCode::SUCCESS);
            }
        };
        restarts = Some(plan.restart_count);
        let attempt_dir = run_log_dir.join(format!("attempt_{round}"));
        let specs: Vec<WorkerSpec> = (0..nproc)
            .map(|local_rank| WorkerSpec {
                local_rank,
                global_rank: plan.rank_offset + local_rank,
                argv: argv.clone(),
                env: worker_env(&args, &topo, &plan, nproc, local_rank),
                env_defaults: worker_env_defaults(nproc),
                workdir: workdir.clone(),
            })
            .collect();
        let opts = group_options(&args, &host, &attempt_dir);

        // Stop the workers on a signal to this launcher, or when another node's failed.
        let (stop_tx, stop_rx) = watch::channel(None);
        let forwarder = {
            let mut user = user_signal.clone();
            let endpoint = endpoint.clone();
            let run_id = topo.run_id.clone();
            tokio::spawn(async move {
                let others = rendezvous::watch_for_failure(&endpoint, &run_id, round);
                tokio::select! {
                    Ok(sig) = user.wait_for(Option::is_some) => {
                        let sig = *sig;
                        let _ = stop_tx.send(sig);
                    }
                    Ok(outcome) = others => {
                        if outcome != RoundOutcome::Succeeded {
                            let _ = stop_tx.send(Some(libc::SIGTERM));
                        }
                    }
                }
                // Keep the channel open until the round ends (the group reads it).
                std::future::pending::<()>().await;
            })
        };
        let outcome = workers::run_group(specs, opts, stop_rx).await;
        forwarder.abort();
        let outcome = outcome?;
        let local = if user_signal.borrow().is_some() {
            LocalEnd::Stopped
        } else if outcome.succeeded() {
            LocalEnd::Succeeded
        } else {
            LocalEnd::Failed
        };
        let gang = rdzv.finish(&plan, local).await?;
        let summary = workers::failure_summary(&script, &outcome, &host);
        let exit = match gang {
            RoundOutcome::Succeeded => ExitCode::SUCCESS,
            RoundOutcome::Stopped(who) => {
                errln!(
                    "trainctl run: stopped by a signal (on node {who}); the workers were stopped"
                );
                ExitCode::FAILURE
            }
            RoundOutcome::Grow(who) => {
                errln!(
                    "trainctl run: node {who} joined; restarting the gang at its new size (no restart used)"
                );
                round += 1;
                continue;
            }
            RoundOutcome::Failed(who) if plan.restart_count < args.max_restarts => {
                errln!(
                    "trainctl run: workers failed on node {who} in attempt {round}; restarting the gang ({} of {} restarts left)",
                    args.max_restarts - plan.restart_count,
                    args.max_restarts
                );
                restarts = Some(plan.restart_count + 1);
                round += 1;
                continue;
            }
            RoundOutcome::Failed(who) => {
                match summary {
                    Some(text) if local == LocalEnd::Failed => errln!(
                        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: {text}"
                    ),
                    _ => errln!(
                        "trainctl run: the workers failed on node {who}; its launcher printed the failure summary"
                    ),
                }
                ExitCode::FAILURE
            }
        };
        if store.is_some() {
            // The others still read the outcome from this launcher's store: stay until they
            // have (or until the user signals this launcher again).
            let mut again = user_signal.clone();
            again.borrow_and_update();
            tokio::select! {
                waited = rdzv.wait_every_node_finished(&plan, rendezvous::EXIT_BARRIER_TIMEOUT) => {
                    if let Err(e) = waited {
                        tracing::warn!(error = %format!("{e:#}"), "stopping the run's store anyway");
                    }
                }
                _ = again.changed() => {}
            }
        }
        return Ok(exit);
    }
}

/// Runs `work` unless the launcher gets a signal first (then `None`): waiting for the other
/// nodes must not outlast a Ctrl-C, as torchrun does not.
async fn until_signal<T>(
    user_signal: &watch::Receiver<Option<i32>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut user = user_signal.clone();
    tokio::select! {
        done = work => Some(done),
        _ = user.wait_for(Option::is_some) => None,
    }
}

fn stopped_in_rendezvous() -> ExitCode {
    errln!("trainctl run: stopped by a signal while waiting for the other nodes (rendezvous); no worker was running");
    ExitCode::FAILURE
}

/// Creates `<log_dir>/<run_id>_<8 random characters>`, as torch's `tempfile.mkdtemp` does.
fn make_run_log_dir(log_dir: &Path, run_id: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("create the log directory {}", log_dir.display()))?;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
    const TRIES: usize = 100;
    for _ in 0..TRIES {
        let suffix: String = (0..8)
            .map(|_| CHARS[rand::random_range(0..CHARS.len())] as char)
            .collect();
        let dir = log_dir.join(format!("{run_id}_{suffix}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("create the run's log directory {}", dir.display()))
            }
        }
    }
    bail!(
        "could not make a new directory for the run's logs in {} after {TRIES} tries",
        log_dir.display()
    )
}

fn group_options(args: &RunArgs, host: &str, attempt_dir: &Path) -> GroupOptions {
    let mut opts = GroupOptions::new(host, PathBuf::from(attempt_dir));
    let redirects = args.redirects.clone();
    let tee = args.tee.clone();
    opts.redirect = Box::new(move |local| redirects.std_for(local));
    opts.tee = Box::new(move |local| tee.std_for(local));
    opts.console_filter = args.local_ranks_filter.clone();
    opts.line_prefix = line_prefix(args.log_line_prefix_template.as_deref(), &args.role, host);
    opts.shutdown_timeout = args.shutdown_timeout;
    opts.monitor_interval = args.monitor_interval.max(Duration::from_millis(1));
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        match flags::parse(&argv, &|_| None).unwrap() {
            Parsed::Run(args) => args,
            Parsed::Help(_) => panic!("help"),
        }
    }

    #[test]
    fn topologies_of_the_three_ways_to_run() {
        let local = |h: &str| h == "node-a" || h == "localhost";
        let t = topology(&parse(&["--standalone", "x.py"]), &local, "rid");
        assert_eq!(
            (
                t.master_addr.as_str(),
                t.serve_at.is_some(),
                t.static_rank,
                t.run_id.as_str()
            ),
            ("localhost", true, Some(0), "rid")
        );
        let t = topology(
            &parse(&[
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "node-a",
                "x.py",
            ]),
            &local,
            "rid",
        );
        assert_eq!(
            (
                t.master_addr.as_str(),
                t.master_port,
                t.serve_at,
                t.static_rank
            ),
            ("node-a", 29500, None, Some(1))
        );
        let t = topology(
            &parse(&[
                "--nnodes",
                "2",
                "--node-rank",
                "0",
                "--master-port",
                "4000",
                "x.py",
            ]),
            &local,
            "rid",
        );
        assert_eq!(t.serve_at, Some("0.0.0.0:4000".parse().unwrap()));
        let t = topology(
            &parse(&[
                "--nnodes",
                "1:3",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "node-a",
                "--rdzv-id",
                "j7",
                "x.py",
            ]),
            &local,
            "rid",
        );
        assert_eq!(
            (
                t.master_port,
                t.serve_at.is_some(),
                t.static_rank,
                t.min_nodes,
                t.max_nodes,
                t.run_id.as_str()
            ),
            (29400, true, None, 1, 3, "j7")
        );
        let t = topology(
            &parse(&[
                "--nnodes",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "node-b:5000",
                "x.py",
            ]),
            &local,
            "rid",
        );
        assert_eq!((t.master_port, t.serve_at), (5000, None));
    }

    #[test]
    fn prefix_templates_take_torchs_macros() {
        let prefix = line_prefix(
            Some("[${hostname} ${role_name}${local_rank}/${rank}]:"),
            "trainer",
            "gpu-7",
        );
        assert_eq!(prefix(1, 9), "[gpu-7 trainer1/9]:");
        assert_eq!(
            line_prefix(None, "default", "gpu-7")(0, 4),
            "[gpu-7 rank 4] "
        );
    }

    #[test]
    fn worker_argv_follows_module_and_no_python() {
        let argv =
            |a: &[&str]| super::super::cluster::worker_command(&parse(a), "/opt/py").unwrap();
        assert_eq!(
            argv(&["t.py", "--lr", "1"]),
            ["/opt/py", "-u", "t.py", "--lr", "1"]
        );
        assert_eq!(
            argv(&["-m", "pkg.train"]),
            ["/opt/py", "-u", "-m", "pkg.train"]
        );
        assert_eq!(argv(&["--no-python", "./bin", "a"]), ["./bin", "a"]);
        assert_eq!(
            argv(&["--no-python", "--run-path", "/abs/t.py"]),
            ["/opt/py", "-u", "/abs/t.py"]
        );
    }

    #[test]
    fn the_environment_of_a_worker_is_torchruns() {
        let args = parse(&[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "3",
            "x.py",
        ]);
        let topo = topology(&args, &|_| false, "rid");
        let plan = RoundPlan {
            round: 1,
            node_rank: 1,
            nnodes: 2,
            rank_offset: 2,
            world_size: 4,
            restart_count: 1,
        };
        let env: BTreeMap<String, String> =
            worker_env(&args, &topo, &plan, 2, 1).into_iter().collect();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("RANK"), Some("3"));
        assert_eq!(get("LOCAL_RANK"), Some("1"));
        assert_eq!(get("WORLD_SIZE"), Some("4"));
        assert_eq!(get("GROUP_RANK"), Some("1"));
        assert_eq!(get("GROUP_WORLD_SIZE"), Some("2"));
        assert_eq!(get("ROLE_RANK"), Some("3"));
        assert_eq!(get("ROLE_NAME"), Some("default"));
        assert_eq!(get("MASTER_ADDR"), Some("127.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29500"));
        assert_eq!(get("TORCHELASTIC_RESTART_COUNT"), Some("1"));
        assert_eq!(get("TORCHELASTIC_MAX_RESTARTS"), Some("3"));
        assert_eq!(get("TORCHELASTIC_RUN_ID"), Some("none"));
        assert_eq!(get("TORCHELASTIC_USE_AGENT_STORE"), Some("True"));
    }
}
