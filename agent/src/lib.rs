//! The agent: one per host. It tells the coordinator what the host has, runs the ranks the
//! coordinator assigns to it, ships their output, and leaves no process behind.
//!
//! It owns host discovery ([`discovery`]), process launching and cleanup ([`process`]), and the decision
//! of what to start and stop ([`reconcile`], pure). This file is the thin async shell around them: it
//! registers, heartbeats, performs the reconciler's actions and reports what happened. It does not
//! decide placement or job state: the coordinator does.
//!
//! # Layout
//! - [`cgroup`]: each rank in its own cgroup v2 leaf (job limits, `cgroup.kill`) where the host
//!   delegates one; otherwise process groups, and `trainctl nodes` says which.
//! - [`discovery`]: CPUs, memory, GPUs (NVML, or the CUDA driver; loaded at run time), RDMA
//!   devices (sysfs), GPU-to-NIC affinity, the interface holding the advertised address.
//! - [`members`]: the coordinators the agent knows, and the pure choice of the next one to talk to
//!   when the current one does not lead or does not answer.
//! - [`preflight`]: checks of the host's GPUs, RDMA ports and NCCL (bounded in time), and the pure
//!   verdict "healthy, or why not" reported to the coordinator.
//! - [`process`]: a rank in its own process group with a parent-death signal; logs; group kill; the
//!   journal that lets a restarted agent kill what a crashed one left.
//! - [`reconcile`]: desired ranks + tracked ranks -> actions.
//! - [`rank_api`]: the HTTP endpoint ranks commit checkpoints and report progress to.
//! - [`retention`]: old run directories (local copies of rank logs) are deleted after 7 days.

pub mod cgroup;
pub mod discovery;
pub mod identity;
pub mod job_store;
pub mod members;
pub mod preflight;
pub mod process;
pub mod rank_api;
pub mod reconcile;
pub mod retention;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{
    Assignment, HeartbeatRequest, HostHealth, LogChunk, Progress, RankPhase, RankReport,
    RegisterRequest,
};

use crate::process::{PgidJournal, RankSpec};
use crate::reconcile::{reconcile, Action, RankCondition, RankKey, TrackedRank};

/// Most bytes of one rank's log sent in one heartbeat.
pub const LOG_CHUNK_BYTES: u64 = 512 << 10;
/// Most log bytes sent in one heartbeat, all ranks together.
pub const LOG_BYTES_PER_HEARTBEAT: u64 = 2 << 20;
/// Grace given to ranks when the agent itself shuts down.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Longest wait between attempts to reach the coordinator.
pub const MAX_RETRY_BACKOFF_MS: u64 = 2_000;
/// Pause before the next heartbeat when the last one left output or a rank's end still to report.
pub const FOLLOW_UP_HEARTBEAT_MS: u64 = 20;
/// How long a stopping agent keeps reporting until the coordinator has every rank's end.
pub const FINAL_REPORT_DEADLINE_MS: u64 = 10_000;
/// Grace for the rest of a rank's process group once its main process has exited.
pub const LEFTOVER_GRACE_MS: u64 = 1_000;
/// Largest heartbeat reply the agent accepts (assignments carry each job's environment once).
pub const MAX_HEARTBEAT_REPLY_BYTES: usize = 64 << 20;
/// Times in a row the coordinator may fail to store a rank's output before the agent gives those
/// lines up (they stay in the agent's run dir) so the rank's end can still be reported.
pub const LOG_STORE_FAILURES_MAX: u32 = 8;
/// Longest wait before offering output again to a coordinator that could not store it.
pub const LOG_RETRY_BACKOFF_MAX_MS: u64 = 5_000;

/// Wait before the next offer of a rank's output after `failures` failed stores in a row: 100 ms,
/// doubling, at most [`LOG_RETRY_BACKOFF_MAX_MS`].
pub fn log_retry_backoff(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(16).saturating_sub(1));
    Duration::from_millis(ms.min(LOG_RETRY_BACKOFF_MAX_MS))
}

/// How soon a rank end the coordinator deferred is reported again.
pub const DEFERRED_REPORT_RETRY_MS: u64 = 200;

/// Lines of a failed rank's output quoted in its failure message.
pub const FAILURE_TAIL_LINES: usize = 10;
/// Longest failure message (output tail and error file) sent for one rank.
pub const FAILURE_NOTE_BYTES_MAX: usize = 8 << 10;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinators' URLs, e.g. `http://10.0.0.1:7470`; `https://` when [`tls`](Self::tls)
    /// is set. At least one; the agent also learns the cluster's members from the leader (see
    /// [`members`]), and tries these again when none of those answers.
    pub coordinator_urls: Vec<String>,
    /// TLS to the coordinator: the cluster CA to trust and the join token for a first start.
    /// `None`: plain HTTP (the URL must be `http://`).
    pub tls: Option<identity::AgentTlsConfig>,
    /// This node's name in the cluster; the hostname, lowercased, when absent.
    pub node_name: Option<String>,
    /// The IP other hosts reach this one at; found from the route to the coordinator when absent.
    pub advertise_addr: Option<IpAddr>,
    /// Where rank logs and the process journal live.
    pub data_dir: PathBuf,
    /// Declare this many GPUs instead of discovering them (development on a laptop).
    pub declared_gpus: Option<u32>,
    /// Ports the coordinator may lease to jobs' rendezvous on this host, inclusive.
    pub port_range: (u16, u16),
    /// The program run when a job's argv[0] is `trainctl` (this binary), for built-in workloads.
    pub self_exe: PathBuf,
    /// Port of the endpoint ranks commit checkpoints to (`TRAINCTL_AGENT_URL`); 0 picks a free one.
    pub api_port: u16,
    /// Run directories (local rank logs) untouched this long are deleted.
    pub run_retention: Duration,
    /// Run every rank as this user (its uid, primary gid and groups) instead of the agent's own;
    /// the agent stays root. See [`process::RunAs`]. `None`: ranks run as the agent's user.
    pub run_as: Option<String>,
    /// How often the whole-host pre-flight runs again after the one at start
    /// ([`preflight::DEFAULT_INTERVAL`] by default); zero: only at start and before jobs, and
    /// while the host is unhealthy every [`preflight::RETRY_AFTER_FAILURE`]
    /// ([`preflight::next_run_after`]).
    pub preflight_interval: Duration,
    /// `--rdma-ports` and `--rdma-ignore`: which RDMA ports this host claims
    /// ([`preflight::ports::claim`], made once from the discovery at start).
    pub rdma_ports: preflight::ports::PortOptions,
    /// `--nccl-library` and `--ibverbs-library`: the files the pre-flight opens instead of the
    /// loader's search, each checked at start ([`preflight::libraries::LibraryPaths::open`]); ranks
    /// of GPU jobs are told the NCCL path ([`preflight::libraries::LibraryPaths::rank_env`]).
    pub libraries: preflight::libraries::LibraryPaths,
}

/// The pre-flight's state in the agent: the newest result of each check, the verdict over them,
/// and the checks before jobs.
struct PreflightState {
    /// `TRAINCTL_PREFLIGHT_FAIL`, read at start.
    injection: preflight::Injection,
    /// The RDMA ports this host claims, from the discovery at start and the options.
    ports: preflight::ports::PortClaim,
    /// `--preflight-interval`.
    interval: Duration,
    /// The newest result of every (check, subject) ([`preflight::merge`]).
    checks: Vec<preflight::CheckResult>,
    /// [`preflight::assess`] of `checks`: what every heartbeat reports.
    health: preflight::Health,
    /// When the next whole-host run is due (`None`: never).
    next_run: Option<tokio::time::Instant>,
    /// A whole-host run is under way.
    running: bool,
    /// Finished runs come back here from their blocking tasks.
    finished_tx: tokio::sync::mpsc::UnboundedSender<FinishedCheck>,
    finished_rx: tokio::sync::mpsc::UnboundedReceiver<FinishedCheck>,
    /// The check before each (job, attempt) with GPUs here.
    jobs: BTreeMap<(String, u32), JobCheck>,
}

/// A finished pre-flight run: whole-host (`job` None) or before a job's ranks.
struct FinishedCheck {
    job: Option<(String, u32)>,
    report: preflight::Report,
}

/// Where the check before a job's ranks stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobCheck {
    Running,
    Passed,
    /// The ranks are never started; the coordinator places the job elsewhere.
    Failed,
}

/// What to do with a GPU job's ranks here, given where the check of its GPUs stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobGate {
    /// The check passed (or there was nothing to check): start the ranks.
    Start,
    /// The check runs, or failed and the unhealthy verdict is on its way to the coordinator.
    Wait,
    /// Run the check (again).
    Check,
}

/// The gate of a job's ranks (pure): `check` is the job's [`JobCheck`], `host_healthy` the verdict
/// the heartbeats carry now. A failed check with a healthy verdict means a newer whole-host run
/// replaced the failure (it probed those GPUs before the job held them, and they passed): the
/// coordinator will never move the job, so waiting would leave it starting forever; check again.
fn job_gate(check: Option<JobCheck>, host_healthy: bool) -> JobGate {
    match check {
        Some(JobCheck::Passed) => JobGate::Start,
        Some(JobCheck::Running) => JobGate::Wait,
        Some(JobCheck::Failed) if !host_healthy => JobGate::Wait,
        Some(JobCheck::Failed) | None => JobGate::Check,
    }
}

impl PreflightState {
    /// Takes a finished run: a whole-host run replaces every result, a job's run those of its GPUs.
    fn take(&mut self, finished: FinishedCheck) {
        let report = finished.report;
        for c in &report.checks {
            if let preflight::Outcome::Failed { reason } = &c.outcome {
                warn!(check = %c.name, subject = %c.subject, %reason, trigger = ?report.trigger, "pre-flight check failed");
            }
        }
        match &finished.job {
            None => {
                self.running = false;
                self.checks = report.checks.clone();
            }
            Some(key) => {
                self.checks = preflight::merge(&self.checks, &report.checks);
                let verdict = if report.health.healthy {
                    JobCheck::Passed
                } else {
                    JobCheck::Failed
                };
                if let Some(state) = self.jobs.get_mut(key) {
                    *state = verdict;
                }
            }
        }
        let health = preflight::assess(&self.checks);
        if !health.healthy {
            // An unhealthy host checks again soon (even with no periodic run), so it can recover.
            if let Some(after) = preflight::next_run_after(self.interval, false) {
                let at = tokio::time::Instant::now() + after;
                self.next_run = Some(self.next_run.map_or(at, |t| t.min(at)));
            }
        }
        if health != self.health {
            match &health.reason {
                Some(reason) => warn!(%reason, "this host is unhealthy: it takes no new work"),
                None => info!("this host passes its pre-flight checks"),
            }
        }
        self.health = health;
    }

    fn wire(&self) -> HostHealth {
        HostHealth {
            healthy: self.health.healthy,
            reason: self.health.reason.clone().unwrap_or_default(),
        }
    }
}

/// What the agent knows of one rank it started.
#[derive(Debug)]
struct RankEntry {
    pid: u32,
    pgid: Option<i32>,
    /// The rank's cgroup, when ranks run in cgroups.
    cgroup: Option<PathBuf>,
    exit_code: Option<i32>,
    failed_to_start: Option<String>,
    log_path: PathBuf,
    shipped: u64,
    stopping: bool,
    /// The coordinator has received this rank's final state.
    acknowledged: bool,
    stop_grace: Duration,
    /// For a failed rank: the end of its output and its error file, sent with its exit.
    exit_note: Option<String>,
    /// The coordinator deferred this rank's end (a peer host is silent): report it again after this.
    report_retry_at: Option<std::time::Instant>,
    /// Failed stores of this rank's output in a row, and when to offer it again.
    log_failures: u32,
    log_retry_at: Option<std::time::Instant>,
}

impl RankEntry {
    fn ended(&self) -> bool {
        self.exit_code.is_some() || self.failed_to_start.is_some()
    }
}

type Ranks = Arc<Mutex<BTreeMap<RankKey, RankEntry>>>;

struct Agent {
    config: AgentConfig,
    node_name: String,
    address: IpAddr,
    instance_id: String,
    facts: discovery::HostFacts,
    /// The client of the coordinator talked to now ([`target`](Self::target)).
    client: AgentServiceClient<Channel>,
    /// The same client, for the rank endpoint, which forwards checkpoint commits.
    client_for_ranks: watch::Sender<AgentServiceClient<Channel>>,
    /// The URL of the coordinator talked to now.
    target: String,
    /// The cluster's coordinators (host:port) as the last heartbeat reply listed them.
    members: Vec<String>,
    /// Requests failed in a row for want of a leader or an answer (0 after a success).
    coordinator_failures: u32,
    /// The agent's TLS identity, for the channel to each coordinator (`None`: plain HTTP).
    identity: Option<identity::AgentIdentity>,
    ranks: Ranks,
    journal: Arc<PgidJournal>,
    /// How ranks are contained on this host.
    containment: Arc<cgroup::Containment>,
    heartbeat_interval: Duration,
    /// Set once the agent is stopping: it reports and ships, but starts nothing new.
    shutting_down: bool,
    /// The cluster state this agent's ranks belong to (from the last registration).
    cluster_id: Option<String>,
    /// Rung when a rank ends, so its end is reported without waiting for the next beat.
    wake: Arc<tokio::sync::Notify>,
    /// `job_id:attempt` of the assignments of the last reply acted on.
    known_assignments: BTreeSet<String>,
    /// Tokens and progress shared with the ranks' HTTP endpoint.
    rank_api: Arc<Mutex<rank_api::RankApiState>>,
    /// `TRAINCTL_AGENT_URL` given to ranks.
    agent_url: String,
    /// Checkpoint requests already passed on, per (job, attempt).
    signalled: BTreeMap<(String, u32), u32>,
    /// The user ranks run as ([`AgentConfig::run_as`], resolved at start).
    run_as: Option<process::RunAs>,
    /// The TCPStores this agent serves (jobs whose group rank 0 runs here).
    stores: job_store::JobStores,
    /// Pre-flight results and the checks before jobs.
    preflight: PreflightState,
    /// UUIDs of the GPUs the current assignments use (not probed by the periodic run).
    assigned_gpus: BTreeSet<String>,
}

/// How a heartbeat went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beat {
    /// The assignments this node runs changed.
    Changed,
    Unchanged,
    /// A rank ended during the long poll: the beat was dropped to report it at once.
    Abandoned,
    /// The coordinator does not know this agent (instance): register anew.
    RegisterAgain,
}

fn lock(ranks: &Ranks) -> std::sync::MutexGuard<'_, BTreeMap<RankKey, RankEntry>> {
    ranks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Finds the local IP address used to reach `url`'s host: what this host advertises by default.
pub fn route_address_to(url: &str) -> anyhow::Result<IpAddr> {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let target = authority
        .to_socket_addrs()
        .with_context(|| format!("resolve coordinator address `{authority}`"))?
        .next()
        .ok_or_else(|| anyhow!("coordinator address `{authority}` resolves to nothing"))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).context("open a socket to find the local address")?;
    socket
        .connect(target)
        .context("find a route to the coordinator")?;
    Ok(socket.local_addr()?.ip())
}

/// Runs the agent until `shutdown` turns true, then stops every rank it runs and reports their end.
pub async fn run(config: AgentConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    trainctl_tls::install_crypto_provider();
    if config.coordinator_urls.is_empty() {
        return Err(anyhow!(
            "no coordinator: give at least one with --coordinator"
        ));
    }
    for url in &config.coordinator_urls {
        identity::check_url_scheme(url, config.tls.is_some())?;
    }
    let run_as = match &config.run_as {
        Some(name) => {
            let user = process::RunAs::for_agent(name, process::effective_uid())?;
            info!(user = %user.name, uid = user.uid, gid = user.gid, "ranks run as this user");
            Some(user)
        }
        None => None,
    };
    // A library path that does not open is the operator's mistake: refuse to start, rather than
    // fall back to the loader's search and run jobs with another NCCL.
    let paths = config.libraries.clone();
    let opened = tokio::task::spawn_blocking(move || paths.open()).await??;
    for library in opened.describe() {
        info!(library = %library, "library given by option");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let journal =
        Arc::new(PgidJournal::open(&config.data_dir).context("open the process journal")?);
    for reaped in journal.reap_leftovers() {
        warn!(?reaped, "killed a process group left by a previous agent");
    }
    let instance_id = format!("{:016x}", rand::random::<u64>());
    let containment = {
        let (data_dir, instance) = (config.data_dir.clone(), instance_id.clone());
        tokio::task::spawn_blocking(move || {
            // What a previous agent on this data dir left in its cgroups (setsid escapees too).
            for tree in cgroup::recorded_trees(&data_dir) {
                let killed = cgroup::reap_tree(&tree);
                if killed > 0 {
                    warn!(cgroup = %tree.display(), killed, "killed rank processes left by a previous agent in its cgroup");
                }
            }
            let containment = cgroup::Containment::detect(&instance);
            let base = containment.tree().map(|t| t.base.as_path());
            if let Err(e) = cgroup::record_tree(&data_dir, base) {
                warn!(error = %e, "could not record the agent's cgroup in its data dir");
            }
            containment
        })
        .await?
    };
    info!(containment = %containment.describe(), "rank containment");
    let mut reaper = Reaper::spawn(&config).context("start the agent's reaper process")?;
    if let Some(tree) = containment.tree() {
        reaper.tell_cgroup(&tree.base);
    }
    let _reaper = reaper;
    let declared = config.declared_gpus;
    let mut facts = tokio::task::spawn_blocking(move || discovery::discover(declared)).await?;
    let node_name = config
        .node_name
        .clone()
        // Node names are lowercase; a hostname is not case-sensitive, so the default folds it.
        .unwrap_or_else(|| facts.hostname.to_ascii_lowercase());
    let address = match config.advertise_addr {
        Some(a) => a,
        // The first coordinator with a route decides (all are on the control network).
        None => {
            let mut routes = config.coordinator_urls.iter().map(|u| route_address_to(u));
            let first = routes.next().expect("at least one coordinator");
            match first {
                Ok(a) => a,
                Err(e) => routes.find_map(Result::ok).ok_or(e)?,
            }
        }
    };
    facts.advertised_interface =
        tokio::task::spawn_blocking(move || discovery::advertised_interface(address)).await?;
    let injection = preflight::Injection::from_env()?.for_node(&node_name);
    let port_claim = preflight::ports::claim(
        &facts.rdma_devices,
        &config.rdma_ports,
        preflight::ports::ClaimedAt::AgentStart,
    )?;
    for w in port_claim.warnings() {
        warn!("{w}");
    }
    info!(claimed = %port_claim.claimed_list(), "RDMA ports this host claims (each must stay ACTIVE)");
    let start_report = {
        let (facts, injection, ports) = (facts.clone(), injection.clone(), port_claim.clone());
        let libraries = config.libraries.clone();
        tokio::task::spawn_blocking(move || {
            preflight::run(
                &facts,
                &preflight::Scope::Host {
                    busy_gpus: BTreeSet::new(),
                    ports,
                },
                preflight::Trigger::Start,
                &injection,
                &libraries,
                preflight::RUN_BUDGET,
            )
        })
        .await?
    };
    info!(
        healthy = start_report.health.healthy,
        ms = start_report.duration_ms,
        checks = start_report.checks.len(),
        "pre-flight at start"
    );
    let (finished_tx, finished_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut preflight_state = PreflightState {
        injection,
        ports: port_claim,
        interval: config.preflight_interval,
        checks: Vec::new(),
        health: preflight::Health {
            healthy: true,
            reason: None,
        },
        next_run: preflight::next_run_after(config.preflight_interval, true)
            .map(|after| tokio::time::Instant::now() + after),
        running: false,
        finished_tx,
        finished_rx,
        jobs: BTreeMap::new(),
    };
    preflight_state.take(FinishedCheck {
        job: None,
        report: start_report,
    });
    let identity = match &config.tls {
        Some(tls) => {
            let mut backoff = Duration::from_millis(500);
            loop {
                match identity::ensure_any(
                    &config.data_dir,
                    &node_name,
                    &config.coordinator_urls,
                    tls,
                )
                .await
                {
                    Ok(identity) => break Some(identity),
                    Err(e) if e.is_retryable() => {
                        warn!(error = %e, "could not join the cluster; retrying");
                        sleep_or_shutdown(backoff, &mut shutdown).await;
                        if *shutdown.borrow() {
                            return Ok(());
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        None => None,
    };
    // The members learnt before (this agent's last run) first, then the operator's list.
    let members = {
        let data_dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || members::load(&data_dir)).await?
    };
    let target = members::candidates(
        &member_urls(&members, config.tls.is_some()),
        &config.coordinator_urls,
    )
    .into_iter()
    .next()
    .expect("at least one coordinator");
    let client = coordinator_client(&target, identity.as_ref())?;
    let (client_for_ranks, rank_client) = watch::channel(client.clone());
    let rank_api_state = Arc::new(Mutex::new(rank_api::RankApiState::default()));
    // Loopback only: ranks run on this host, and their job tokens never cross the network.
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, config.api_port))
        .await
        .with_context(|| {
            format!(
                "listen for ranks on 127.0.0.1:{} (the agent's rank endpoint)",
                config.api_port
            )
        })?;
    let agent_url = format!("http://{}", listener.local_addr()?);
    let rank_router = rank_api::router(rank_api::RankApi {
        state: rank_api_state.clone(),
        client: rank_client,
        node_name: node_name.clone(),
        instance_id: instance_id.clone(),
    });
    let mut api_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let stop = async move {
            while !*api_shutdown.borrow() {
                if api_shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, rank_router)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!(error = %e, "the rank endpoint stopped");
        }
    });
    info!(%node_name, %address, gpus = facts.gpus.len(), cpus = facts.cpus, rdma = facts.rdma_devices.len(), "agent starting");
    let mut agent = Agent {
        config,
        node_name,
        address,
        instance_id,
        facts,
        client,
        client_for_ranks,
        target,
        members,
        coordinator_failures: 0,
        identity,
        ranks: Arc::new(Mutex::new(BTreeMap::new())),
        journal,
        containment: Arc::new(containment),
        heartbeat_interval: Duration::from_millis(500),
        shutting_down: false,
        cluster_id: None,
        wake: Arc::new(tokio::sync::Notify::new()),
        known_assignments: BTreeSet::new(),
        rank_api: rank_api_state,
        agent_url,
        signalled: BTreeMap::new(),
        stores: job_store::JobStores::default(),
        run_as,
        preflight: preflight_state,
        assigned_gpus: BTreeSet::new(),
    };

    let mut registered = false;
    let mut backoff = Duration::from_millis(100);
    let mut next_sweep = tokio::time::Instant::now();
    while !*shutdown.borrow() {
        if !registered {
            match agent.register().await {
                Ok(()) => {
                    registered = true;
                    agent.coordinator_failures = 0;
                    backoff = Duration::from_millis(100);
                }
                Err(e) if e.is::<IdentityRefused>() => {
                    let refused = e.downcast::<IdentityRefused>().expect("checked");
                    return Err(agent.give_up_identity(&refused).await);
                }
                Err(e) if e.is::<CoordinatorUnavailable>() => {
                    let wait = agent.fail_over(&e);
                    sleep_or_shutdown(wait, &mut shutdown).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "could not register with the coordinator; retrying");
                    sleep_or_shutdown(backoff, &mut shutdown).await;
                    backoff = (backoff * 2).min(Duration::from_millis(MAX_RETRY_BACKOFF_MS));
                    continue;
                }
            }
        }
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + retention::RUN_RETENTION_SWEEP;
            let cluster = agent
                .cluster_id
                .clone()
                .unwrap_or_else(|| "unnamed".to_string());
            let live: BTreeSet<(String, String, u32)> = lock(&agent.ranks)
                .keys()
                .map(|k| (cluster.clone(), k.job_id.clone(), k.attempt))
                .collect();
            let (data_dir, keep) = (agent.config.data_dir.clone(), agent.config.run_retention);
            tokio::task::spawn_blocking(move || {
                let gone = retention::sweep(&data_dir, &live, keep);
                if gone > 0 {
                    info!(gone, "deleted run directories past their retention");
                }
            });
        }
        // A finished check: report its verdict (and start a passed job's ranks) at once.
        let checked = agent.poll_preflight();
        // Nothing to report: let the coordinator hold the beat until there is work (long poll).
        let news = checked || agent.has_news();
        let wait_ms = if news {
            0
        } else {
            agent.heartbeat_interval.as_millis() as u32
        };
        let started = tokio::time::Instant::now();
        let beat = agent.heartbeat(wait_ms).await;
        if beat.is_ok() {
            agent.coordinator_failures = 0;
        }
        let pause = match beat {
            Ok(Beat::RegisterAgain) => {
                registered = false;
                Duration::ZERO
            }
            // New ranks to report, output to ship, or an end to report: go again almost at once.
            Ok(Beat::Changed | Beat::Abandoned) => Duration::from_millis(FOLLOW_UP_HEARTBEAT_MS),
            Ok(Beat::Unchanged) if agent.has_news() => {
                Duration::from_millis(FOLLOW_UP_HEARTBEAT_MS)
            }
            // A held beat already waited; one answered at once waits out the interval.
            Ok(Beat::Unchanged) => agent.heartbeat_interval.saturating_sub(started.elapsed()),
            Err(e) if e.is::<IdentityRefused>() => {
                let refused = e.downcast::<IdentityRefused>().expect("checked");
                return Err(agent.give_up_identity(&refused).await);
            }
            // Not the leader, or no answer: another coordinator, at once or after a short backoff.
            Err(e) if e.is::<CoordinatorUnavailable>() => agent.fail_over(&e),
            Err(e) => {
                warn!(error = %e, "heartbeat failed; ranks keep running, retrying");
                agent.heartbeat_interval
            }
        };
        let wake = agent.wake.clone();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
            _ = wake.notified() => {}
        }
    }

    info!("agent stopping: stopping every rank it runs");
    agent.shutting_down = true;
    agent.stop_all().await;
    if registered {
        // Let the coordinator learn how every rank ended (which needs their output shipped first),
        // so their jobs fail with the real exit codes rather than "node lost" much later.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(FINAL_REPORT_DEADLINE_MS);
        while tokio::time::Instant::now() < deadline {
            let pause = match agent.heartbeat(0).await {
                Ok(_) if agent.all_reported() => break,
                Ok(_) => Duration::from_millis(50),
                Err(e) if e.is::<CoordinatorUnavailable>() => agent.fail_over(&e),
                Err(_) => Duration::from_millis(50),
            };
            tokio::time::sleep(pause).await;
        }
    }
    if let Some(tree) = agent.containment.tree() {
        let base = tree.base.clone();
        let data_dir = agent.config.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            cgroup::reap_tree(&base);
            let _ = cgroup::record_tree(&data_dir, None);
        })
        .await
        .ok();
    }
    Ok(())
}

/// A watchdog process (`trainctl agent-reaper`) that kills every rank process group in the journal
/// when this agent dies, however it dies: it waits for its standard input, a pipe from the agent, to
/// close. Ranks also get a parent-death signal, but that reaches only the rank's main process, not
/// the processes it started; the reaper reaches the whole group, and where ranks run in cgroups,
/// the agent's whole cgroup tree (named on that pipe: `cgroup <path>`), setsid escapees included.
struct Reaper {
    child: std::process::Child,
}

impl Reaper {
    fn spawn(config: &AgentConfig) -> std::io::Result<Reaper> {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&config.self_exe)
            .arg("agent-reaper")
            .arg("--data-dir")
            .arg(&config.data_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            // Its own group: a Ctrl-C meant for the agent must not take the reaper down first.
            .process_group(0)
            .spawn()?;
        Ok(Reaper { child })
    }

    /// Names the agent's cgroup tree to the reaper, which kills it (`cgroup.kill`) when the agent dies.
    fn tell_cgroup(&mut self, base: &Path) {
        use std::io::Write as _;
        if let Some(stdin) = self.child.stdin.as_mut() {
            if let Err(e) = writeln!(stdin, "cgroup {}", base.display()) {
                warn!(error = %e, "could not tell the reaper the agent's cgroup");
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Closing the pipe tells the reaper the agent is done; after a clean stop the journal is empty.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Body of `trainctl agent-reaper`: waits until the agent's end of standard input closes, then kills
/// every process group the agent's journal still lists.
pub fn reaper_main(data_dir: &Path) -> anyhow::Result<()> {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    for line in String::from_utf8_lossy(&sink).lines() {
        if let Some(base) = line.strip_prefix("cgroup ") {
            let killed = cgroup::reap_tree(Path::new(base));
            if killed > 0 {
                eprintln!(
                    "trainctl agent-reaper: the agent is gone; killed {killed} process(es) in its cgroup {base}"
                );
            }
        }
    }
    let journal = PgidJournal::open(data_dir).context("open the process journal")?;
    for reaped in journal.reap_leftovers() {
        eprintln!(
            "trainctl agent-reaper: the agent is gone; killed {} process(es) of job {} (group {})",
            reaped.processes, reaped.job_id, reaped.pgid
        );
    }
    Ok(())
}

async fn sleep_or_shutdown(period: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(period) => {}
        _ = shutdown.changed() => {}
    }
}

/// The coordinator refused this agent's identity: its certificate is unknown (revoked, its node
/// removed, or the coordinator's state replaced) or was issued for another node.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator refuses this agent's identity: {0}")]
pub struct IdentityRefused(pub String);

/// The coordinator talked to cannot serve the agent now: it does not lead, or did not answer.
/// Another coordinator may ([`members::next_target`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CoordinatorUnavailable {
    /// How it failed, for the choice of the next coordinator.
    pub failure: members::Failure,
    /// The coordinator's or the transport's words.
    pub message: String,
}

/// How a gRPC status bears on the choice of coordinator: `None` when the coordinator answered
/// (the request itself failed); otherwise it does not lead (naming the leader in
/// [`trainctl_proto::LEADER_METADATA_KEY`] when it knows it) or could not be reached (a refused or
/// reset connection, a timeout, a TLS or HTTP/2 failure).
pub fn coordinator_failure(status: &tonic::Status) -> Option<members::Failure> {
    match status.code() {
        tonic::Code::Unavailable => {
            let leader = status
                .metadata()
                .get(trainctl_proto::LEADER_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if leader.is_some()
                || status
                    .message()
                    .starts_with("this coordinator is not the leader")
            {
                Some(members::Failure::NotLeader { leader })
            } else {
                Some(members::Failure::Unreachable)
            }
        }
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            Some(members::Failure::Unreachable)
        }
        _ => None,
    }
}

/// A gRPC status as an error; a refused identity becomes [`IdentityRefused`], a coordinator that
/// cannot serve [`CoordinatorUnavailable`].
fn status_error(status: tonic::Status) -> anyhow::Error {
    if let Some(failure) = coordinator_failure(&status) {
        return CoordinatorUnavailable {
            failure,
            message: status.message().to_string(),
        }
        .into();
    }
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            IdentityRefused(status.message().to_string()).into()
        }
        _ => anyhow!("{}", status.message()),
    }
}

/// The URLs of member addresses (host:port) under the agent's TLS setting.
fn member_urls(members: &[String], tls: bool) -> Vec<String> {
    members
        .iter()
        .map(|m| members::member_url(m, tls))
        .collect()
}

/// A client of the coordinator at `url` (the channel connects lazily).
fn coordinator_client(
    url: &str,
    identity: Option<&identity::AgentIdentity>,
) -> anyhow::Result<AgentServiceClient<Channel>> {
    let channel = identity::coordinator_channel(url, identity)?;
    Ok(AgentServiceClient::new(channel).max_decoding_message_size(MAX_HEARTBEAT_REPLY_BYTES))
}

impl Agent {
    /// The candidates for the next coordinator: the members learnt, then the operator's list.
    fn candidates(&self) -> Vec<String> {
        members::candidates(
            &member_urls(&self.members, self.config.tls.is_some()),
            &self.config.coordinator_urls,
        )
    }

    /// Moves to another coordinator after `error` (a [`CoordinatorUnavailable`]) from the current
    /// one; returns how long to wait before the next request. Ranks are not touched.
    fn fail_over(&mut self, error: &anyhow::Error) -> Duration {
        let Some(unavailable) = error.downcast_ref::<CoordinatorUnavailable>() else {
            return Duration::from_millis(members::RETRY_BACKOFF_MAX_MS);
        };
        self.coordinator_failures = self.coordinator_failures.saturating_add(1);
        let retry = members::next_target(
            &self.candidates(),
            &self.target,
            &unavailable.failure,
            self.coordinator_failures,
            self.config.tls.is_some(),
        );
        if retry.target != self.target {
            match coordinator_client(&retry.target, self.identity.as_ref()) {
                Ok(client) => {
                    warn!(from = %self.target, to = %retry.target, reason = %unavailable.message,
                        "switching coordinators; ranks keep running");
                    self.client = client.clone();
                    self.client_for_ranks.send_replace(client);
                    self.target = retry.target;
                }
                Err(e) => {
                    warn!(coordinator = %retry.target, error = %e, "cannot talk to this coordinator; staying");
                }
            }
        } else {
            warn!(coordinator = %self.target, reason = %unavailable.message,
                "the coordinator cannot serve this agent; ranks keep running, retrying");
        }
        retry.wait
    }

    /// Takes the member list of a heartbeat reply and keeps it on disk when it changed. An empty
    /// or unusable list changes nothing.
    fn learn_members(&mut self, reply: &[String]) {
        let members = members::accepted_members(reply);
        if members.is_empty() || members == self.members {
            return;
        }
        info!(coordinators = %members.join(","), "the cluster's coordinators");
        if let Err(e) = members::store(&self.config.data_dir, &members) {
            warn!(error = %e, "could not keep the coordinators' list in the data dir");
        }
        self.members = members;
    }

    /// The coordinator no longer admits this agent: no rank it runs may go on (their jobs are
    /// being moved elsewhere, or belong to a state that is gone), and its stored identity is
    /// worthless. Stop every rank, forget the identity (so a start with a new join token joins
    /// again), and end with an error that says what to do.
    async fn give_up_identity(&mut self, refused: &IdentityRefused) -> anyhow::Error {
        tracing::error!(error = %refused, "stopping every rank: this agent is no longer part of the cluster");
        self.stop_all().await;
        lock(&self.ranks).clear();
        let dir = self.config.data_dir.join(identity::IDENTITY_DIR);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(error = %e, dir = %dir.display(), "could not delete the refused identity");
            }
        }
        anyhow!(
            "{refused}. Every rank was stopped and the identity in {} deleted; start the agent \
             again with a new join token (`trainctl token create --role agent`, then --join-token)",
            dir.display()
        )
    }

    async fn register(&mut self) -> anyhow::Result<()> {
        let f = &self.facts;
        let request = RegisterRequest {
            node_name: self.node_name.clone(),
            address: self.address.to_string(),
            instance_id: self.instance_id.clone(),
            resources: Some(discovery::host_resources(f, self.containment.describe())),
            port_range_start: u32::from(self.config.port_range.0),
            port_range_end: u32::from(self.config.port_range.1),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            health: Some(self.preflight.wire()),
        };
        let response = self
            .client
            .register(request)
            .await
            .map_err(status_error)?
            .into_inner();
        // (An empty id is a new cluster not yet named: the same state, not a replaced one.)
        let named = !response.cluster_id.is_empty();
        if named
            && self
                .cluster_id
                .as_ref()
                .is_some_and(|id| *id != response.cluster_id)
        {
            // The coordinator's state was replaced: the jobs our ranks belong to no longer exist, and
            // the new state may reuse their ids. Stop them and forget them.
            warn!("the coordinator's cluster state changed; stopping every rank of the old one");
            self.stop_all().await;
            lock(&self.ranks).clear();
        }
        if named {
            self.cluster_id = Some(response.cluster_id.clone());
        }
        self.heartbeat_interval =
            Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(50)));
        info!(node = %self.node_name, "registered with the coordinator");
        Ok(())
    }

    /// Reports, ships logs, and reconciles. With `wait_ms` > 0 the coordinator may hold the reply (a
    /// long poll) until this node's assignments change; a rank ending meanwhile abandons the wait.
    async fn heartbeat(&mut self, wait_ms: u32) -> anyhow::Result<Beat> {
        let ranks = self.ranks.clone();
        let (reports, logs, finals) = tokio::task::spawn_blocking(move || observe(&ranks)).await?;
        // After the observation, before the report: an end this beat reports has its store gone.
        self.stop_stores_of_ended_attempts().await;
        let progress = {
            let mut api = self.rank_api.lock().unwrap_or_else(|e| e.into_inner());
            // Output is progress too.
            for chunk in &logs {
                api.note_progress(&chunk.job_id, chunk.attempt, None);
            }
            api.take_progress()
        };
        let progress: Vec<Progress> = progress
            .into_iter()
            .map(|((job_id, attempt), step)| Progress {
                job_id,
                attempt,
                step: step.unwrap_or(0),
            })
            .collect();
        let request = HeartbeatRequest {
            node_name: self.node_name.clone(),
            instance_id: self.instance_id.clone(),
            ranks: reports,
            logs,
            known_assignments: self.known_assignments.iter().cloned().collect(),
            wait_ms,
            progress,
            health: Some(self.preflight.wire()),
        };
        let mut client = self.client.clone();
        let wake = self.wake.clone();
        // Only the exchange is abandoned, never the reconciling below: what the coordinator applied
        // of an abandoned beat is resent and applied again idempotently.
        let response = tokio::select! {
            r = client.heartbeat(request) => r.map_err(status_error)?.into_inner(),
            _ = wake.notified(), if wait_ms > 0 => return Ok(Beat::Abandoned),
        };
        self.learn_members(&response.coordinators);
        if response.register_again {
            return Ok(Beat::RegisterAgain);
        }
        {
            let mut ranks = lock(&self.ranks);
            for ack in &response.log_acks {
                let key = RankKey {
                    job_id: ack.job_id.clone(),
                    attempt: ack.attempt,
                    rank: ack.rank,
                };
                if let Some(entry) = ranks.get_mut(&key) {
                    if !ack.error.is_empty() {
                        entry.log_failures += 1;
                        if entry.log_failures >= LOG_STORE_FAILURES_MAX {
                            // Defined outcome of a broken log store: the lines are given up (they
                            // stay in this agent's run dir) so the rank's end is still reported.
                            warn!(job = %key.job_id, rank = key.rank, error = %ack.error, path = %entry.log_path.display(),
                                "the coordinator cannot store this rank's output; giving it up (kept on this host)");
                            entry.shipped = file_len(&entry.log_path);
                            entry.log_failures = 0;
                            entry.log_retry_at = None;
                        } else {
                            entry.log_retry_at = Some(
                                std::time::Instant::now() + log_retry_backoff(entry.log_failures),
                            );
                        }
                        continue;
                    }
                    entry.log_failures = 0;
                    entry.log_retry_at = None;
                    // The coordinator's word is the truth, even backwards: if it lost the tail of a
                    // log (a crash before the bytes reached its disk), we resend from where it is.
                    entry.shipped = ack.stored_until;
                }
            }
            let deferred: BTreeSet<RankKey> = response
                .deferred
                .iter()
                .map(|d| RankKey {
                    job_id: d.job_id.clone(),
                    attempt: d.attempt,
                    rank: d.rank,
                })
                .collect();
            for key in finals {
                if let Some(entry) = ranks.get_mut(&key) {
                    if deferred.contains(&key) {
                        entry.report_retry_at = Some(
                            std::time::Instant::now()
                                + Duration::from_millis(DEFERRED_REPORT_RETRY_MS),
                        );
                    } else {
                        entry.acknowledged = true;
                    }
                }
            }
        }
        let assignments: BTreeSet<String> = response
            .assignments
            .iter()
            .map(|a| format!("{}:{}", a.job_id, a.attempt))
            .collect();
        let changed = assignments != self.known_assignments;
        self.known_assignments = assignments;
        self.apply_assignments(&response.assignments).await;
        Ok(if changed {
            Beat::Changed
        } else {
            Beat::Unchanged
        })
    }

    async fn apply_assignments(&mut self, assignments: &[Assignment]) {
        self.rank_api
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_current(
                assignments
                    .iter()
                    .map(|a| (a.token.clone(), a.job_id.clone(), a.attempt)),
            );
        self.pass_on_checkpoint_requests(assignments);
        self.assigned_gpus = assignments.iter().flat_map(|a| self.job_gpus(a)).collect();
        let current: BTreeSet<(String, u32)> = assignments
            .iter()
            .map(|a| (a.job_id.clone(), a.attempt))
            .collect();
        self.preflight.jobs.retain(|k, _| current.contains(k));
        // Stores first: a rank must find its store serving when it starts.
        let stores: Vec<_> = assignments
            .iter()
            .filter(|_| !self.shutting_down)
            .filter_map(|a| Some((a.job_id.clone(), a.attempt, a.store.clone()?)))
            .collect();
        self.stores.sync(&stores).await;
        let desired: BTreeSet<RankKey> = assignments
            .iter()
            .flat_map(|a| {
                a.ranks.iter().map(|r| RankKey {
                    job_id: a.job_id.clone(),
                    attempt: a.attempt,
                    rank: r.rank,
                })
            })
            .collect();
        let tracked: BTreeMap<RankKey, TrackedRank> = lock(&self.ranks)
            .iter()
            .map(|(k, e)| {
                let condition = if e.ended() {
                    RankCondition::Ended {
                        acknowledged: e.acknowledged,
                    }
                } else {
                    RankCondition::Running
                };
                (
                    k.clone(),
                    TrackedRank {
                        condition,
                        stopping: e.stopping,
                    },
                )
            })
            .collect();
        for action in reconcile(&desired, &tracked) {
            match action {
                Action::Launch(_) if self.shutting_down => {}
                Action::Launch(key) => {
                    let Some(assignment) = assignments
                        .iter()
                        .find(|a| a.job_id == key.job_id && a.attempt == key.attempt)
                    else {
                        continue;
                    };
                    if self.gpus_checked(assignment) {
                        self.launch(assignment, key).await;
                    }
                }
                Action::Stop(key) => self.stop(&key),
                Action::Forget(key) => {
                    lock(&self.ranks).remove(&key);
                }
            }
        }
    }

    /// Stops the store of every attempt whose ranks on this host have all ended, before their
    /// ends are reported ([`job_store::JobStores::finish`]).
    async fn stop_stores_of_ended_attempts(&mut self) {
        let serving = self.stores.serving();
        if serving.is_empty() {
            return;
        }
        let ended: Vec<(String, u32)> = {
            let ranks = lock(&self.ranks);
            serving
                .into_iter()
                .filter(|(job, attempt)| {
                    let mut of_attempt = ranks
                        .iter()
                        .filter(|(k, _)| &k.job_id == job && k.attempt == *attempt)
                        .peekable();
                    of_attempt.peek().is_some() && of_attempt.all(|(_, e)| e.ended())
                })
                .collect()
        };
        self.stores.finish(&ended).await;
    }

    /// Sends each assignment's checkpoint signal to its running ranks once per new request.
    fn pass_on_checkpoint_requests(&mut self, assignments: &[Assignment]) {
        let current: BTreeSet<(String, u32)> = assignments
            .iter()
            .map(|a| (a.job_id.clone(), a.attempt))
            .collect();
        self.signalled.retain(|k, _| current.contains(k));
        for a in assignments {
            let key = (a.job_id.clone(), a.attempt);
            let seen = *self
                .signalled
                .entry(key.clone())
                .or_insert(a.checkpoint_requests);
            if a.checkpoint_requests == seen || a.checkpoint_signal == 0 {
                self.signalled.insert(key, a.checkpoint_requests);
                continue;
            }
            self.signalled.insert(key, a.checkpoint_requests);
            let ranks = lock(&self.ranks);
            for (k, e) in ranks.iter() {
                if k.job_id == a.job_id && k.attempt == a.attempt && !e.ended() && e.pid > 0 {
                    info!(job = %k.job_id, rank = k.rank, signal = a.checkpoint_signal, "asking a rank to checkpoint now");
                    process::signal_process(e.pid as i32, a.checkpoint_signal);
                }
            }
        }
    }

    /// Where one attempt's logs and error files go: per cluster state, since a new state reuses job ids.
    fn run_dir(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.config
            .data_dir
            .join("runs")
            .join(self.cluster_id.as_deref().unwrap_or("unnamed"))
            .join(format!("job-{job_id}"))
            .join(format!("attempt-{attempt}"))
    }

    async fn launch(&mut self, assignment: &Assignment, key: RankKey) {
        let Some(rank) = assignment.ranks.iter().find(|r| r.rank == key.rank) else {
            return;
        };
        let run_dir = self.run_dir(&assignment.job_id, assignment.attempt);
        let log_path = run_dir.join(format!("rank-{}.log", rank.rank));
        let mut argv = assignment.argv.clone();
        if argv.first().map(String::as_str) == Some("trainctl") {
            argv[0] = self.config.self_exe.to_string_lossy().into_owned();
        }
        let workdir = if assignment.workdir.is_empty() {
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
        } else {
            PathBuf::from(&assignment.workdir)
        };
        // The job's environment, then the rank's own on top.
        let mut env: Vec<(String, String)> = assignment
            .job_env
            .iter()
            .filter(|(k, _)| !rank.env.contains_key(*k))
            .chain(rank.env.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A host fact: where this host's NCCL is (--nccl-library), for GPU ranks whose job does
        // not say.
        if let Some(var) = self
            .config
            .libraries
            .rank_env(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            env.push(var);
        }
        env.push(("TRAINCTL_AGENT_URL".to_string(), self.agent_url.clone()));
        if !assignment.checkpoint_dir.is_empty() {
            let dir = Path::new(&assignment.checkpoint_dir);
            if let Err(e) = process::create_dir_for_rank(dir, self.run_as.as_ref()) {
                warn!(dir = %assignment.checkpoint_dir, error = %e, "could not create the job's checkpoint dir");
            }
        }
        let error_file = run_dir.join(rank.local_rank.to_string()).join("error.json");
        // As torchrun does: the file's directory exists, so `@record` can write it.
        if let Some(dir) = error_file.parent() {
            if let Err(e) = process::create_dir_for_rank(dir, self.run_as.as_ref()) {
                warn!(dir = %dir.display(), error = %e, "could not create a rank's error-file directory");
            }
        }
        env.push((
            "TORCHELASTIC_ERROR_FILE".to_string(),
            error_file.to_string_lossy().into_owned(),
        ));
        let spec = RankSpec {
            argv,
            workdir,
            env,
            env_defaults: rank
                .env_defaults
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            log_path: log_path.clone(),
            line_prefix: format!("[{} rank {}] ", self.node_name, rank.rank),
            cgroup: None,
            run_as: self.run_as.clone(),
            copy_lines_to: None,
        };
        let stop_grace = Duration::from_millis(u64::from(assignment.stop_grace_ms));
        let rank_cgroup = match self.containment.tree() {
            Some(tree) => {
                let tree = tree.clone();
                let limits = cgroup::limits_for(
                    assignment.cpus_per_node,
                    assignment.memory_per_node_mib,
                    &tree.controllers,
                );
                let (job, attempt, r) = (key.job_id.clone(), key.attempt, key.rank);
                let created = tokio::task::spawn_blocking(move || {
                    tree.create_rank(&job, attempt, r, &limits)
                        .map(|dir| (dir, limits))
                })
                .await;
                match created {
                    Ok(Ok((dir, limits))) => {
                        info!(job = %key.job_id, rank = key.rank, cgroup = %dir.display(), limits = %limits.describe(), "rank cgroup");
                        Some(dir)
                    }
                    Ok(Err(e)) => {
                        warn!(job = %key.job_id, rank = key.rank, error = %e, "could not create the rank's cgroup; it runs in a process group only");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let spec = RankSpec {
            cgroup: rank_cgroup.clone(),
            ..spec
        };
        let mut entry = RankEntry {
            pid: 0,
            pgid: None,
            cgroup: rank_cgroup.clone(),
            exit_code: None,
            failed_to_start: None,
            log_path,
            shipped: 0,
            stopping: false,
            acknowledged: false,
            stop_grace,
            exit_note: None,
            report_retry_at: None,
            log_failures: 0,
            log_retry_at: None,
        };
        if let Some(reason) = self.stores.failure(&key.job_id, key.attempt) {
            entry.failed_to_start = Some(reason.to_string());
            if let Some(dir) = &rank_cgroup {
                cgroup::remove(dir);
            }
            lock(&self.ranks).insert(key, entry);
            return;
        }
        match process::spawn_rank(spec).await {
            Err(e) => {
                warn!(job = %key.job_id, rank = key.rank, error = %e, "rank failed to start");
                entry.failed_to_start = Some(e.to_string());
                if let Some(dir) = &rank_cgroup {
                    cgroup::remove(dir);
                }
                lock(&self.ranks).insert(key, entry);
            }
            Ok(mut child) => {
                let pgid = child.pgid();
                entry.pid = child.pid() as u32;
                entry.pgid = Some(pgid);
                if let Err(e) = self.journal.record(pgid, child.start_time(), &key.job_id) {
                    warn!(error = %e, "could not record a rank's process group in the journal");
                }
                info!(job = %key.job_id, rank = key.rank, pid = pgid, "rank started");
                lock(&self.ranks).insert(key.clone(), entry);
                let ranks = self.ranks.clone();
                let journal = self.journal.clone();
                let wake = self.wake.clone();
                let log_path = log_path_of(&self.ranks, &key);
                tokio::spawn(async move {
                    let exit = child.wait().await;
                    // The main process is gone; whatever it left in its group (cgroup) goes too.
                    let cg = rank_cgroup.clone();
                    process::terminate_rank(
                        pgid,
                        cg.as_deref(),
                        Duration::from_millis(LEFTOVER_GRACE_MS),
                    )
                    .await;
                    let oom_kills = match &rank_cgroup {
                        Some(dir) => {
                            let dir = dir.clone();
                            tokio::task::spawn_blocking(move || {
                                let kills = cgroup::oom_kills(&dir);
                                cgroup::remove(&dir);
                                // The attempt's cgroup goes with its last rank (it stays while others live).
                                if let Some(job) = dir.parent() {
                                    let _ = std::fs::remove_dir(job);
                                }
                                kills
                            })
                            .await
                            .ok()
                            .flatten()
                        }
                        None => None,
                    };
                    if let Err(e) = journal.remove(pgid) {
                        warn!(error = %e, "could not update the process journal");
                    }
                    info!(job = %key.job_id, rank = key.rank, code = exit.code, "rank exited");
                    let note = if exit.code != 0 {
                        let (log, err) = (log_path.clone(), error_file.clone());
                        let note = tokio::task::spawn_blocking(move || failure_note(&log, &err))
                            .await
                            .ok()
                            .flatten();
                        with_oom_note(note, oom_kills.unwrap_or(0))
                    } else {
                        None
                    };
                    // Only the entry of this very process: after a state change the same key may
                    // name a newer rank.
                    if let Some(entry) = lock(&ranks).get_mut(&key).filter(|e| e.pgid == Some(pgid))
                    {
                        entry.exit_code = Some(exit.code);
                        entry.exit_note = note;
                    }
                    wake.notify_one();
                });
            }
        }
    }

    fn stop(&self, key: &RankKey) {
        let mut ranks = lock(&self.ranks);
        let Some(entry) = ranks.get_mut(key) else {
            return;
        };
        entry.stopping = true;
        let Some(pgid) = entry.pgid else { return };
        let grace = entry.stop_grace;
        let cg = entry.cgroup.clone();
        info!(job = %key.job_id, rank = key.rank, "stopping rank");
        tokio::spawn(async move {
            process::terminate_rank(pgid, cg.as_deref(), grace).await;
        });
    }

    async fn stop_all(&mut self) {
        let groups: Vec<(i32, Option<PathBuf>)> = lock(&self.ranks)
            .values_mut()
            .filter(|e| !e.ended())
            .filter_map(|e| {
                e.stopping = true;
                Some((e.pgid?, e.cgroup.clone()))
            })
            .collect();
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        let stops: Vec<_> = groups
            .into_iter()
            .map(|(pgid, cg)| {
                tokio::spawn(
                    async move { process::terminate_rank(pgid, cg.as_deref(), grace).await },
                )
            })
            .collect();
        for stop in stops {
            stop.await.ok();
        }
        // Let the watchers record the exits.
        for _ in 0..50 {
            if lock(&self.ranks).values().all(RankEntry::ended) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether some output is not shipped yet, or some rank's end is not yet acknowledged.
    /// Takes finished pre-flight runs and starts the periodic one when due (on a blocking task:
    /// the heartbeat loop never waits for a check).
    /// Returns whether a run finished since the last call.
    fn poll_preflight(&mut self) -> bool {
        let mut took = false;
        while let Ok(finished) = self.preflight.finished_rx.try_recv() {
            self.preflight.take(finished);
            took = true;
        }
        let due = self
            .preflight
            .next_run
            .is_some_and(|t| tokio::time::Instant::now() >= t);
        if !due || self.preflight.running || self.shutting_down {
            return took;
        }
        self.preflight.running = true;
        // The next periodic run; a failure brings it forward when this run finishes.
        self.preflight.next_run = preflight::next_run_after(self.config.preflight_interval, true)
            .map(|after| tokio::time::Instant::now() + after);
        let declared = self.config.declared_gpus;
        let interface = self.facts.advertised_interface.clone();
        let busy_gpus = self.assigned_gpus.clone();
        let ports = self.preflight.ports.clone();
        let injection = self.preflight.injection.clone();
        let libraries = self.config.libraries.clone();
        let tx = self.preflight.finished_tx.clone();
        let wake = self.wake.clone();
        tokio::task::spawn_blocking(move || {
            // Fresh facts: a port that went down, an ECC error since the last run.
            let mut facts = discovery::discover(declared);
            facts.advertised_interface = interface;
            let report = preflight::run(
                &facts,
                &preflight::Scope::Host { busy_gpus, ports },
                preflight::Trigger::Periodic,
                &injection,
                &libraries,
                preflight::RUN_BUDGET,
            );
            let _ = tx.send(FinishedCheck { job: None, report });
            wake.notify_one();
        });
        took
    }

    /// UUIDs of the GPUs `assignment`'s ranks here see (their `CUDA_VISIBLE_DEVICES`).
    fn job_gpus(&self, assignment: &Assignment) -> Vec<String> {
        preflight::job_gpus(
            &self.facts,
            assignment
                .ranks
                .iter()
                .filter_map(|r| r.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str)),
        )
    }

    /// Whether `assignment`'s ranks may start: a job without GPUs here at once; one with GPUs
    /// once the check of its GPUs ([`preflight::Scope::Gpus`], at most [`preflight::JOB_BUDGET`])
    /// passed. Starts that check the first time it is asked; a failed check keeps the ranks from
    /// ever starting, and the unhealthy verdict the next heartbeat carries makes the coordinator
    /// place the job elsewhere without using a restart.
    fn gpus_checked(&mut self, assignment: &Assignment) -> bool {
        let key = (assignment.job_id.clone(), assignment.attempt);
        match job_gate(
            self.preflight.jobs.get(&key).copied(),
            self.preflight.health.healthy,
        ) {
            JobGate::Start => return true,
            JobGate::Wait => return false,
            JobGate::Check => {}
        }
        let gpus = self.job_gpus(assignment);
        if gpus.is_empty() {
            self.preflight.jobs.insert(key, JobCheck::Passed);
            return true;
        }
        info!(job = %key.0, attempt = key.1, gpus = ?gpus, "checking the job's GPUs before its ranks start");
        self.preflight.jobs.insert(key.clone(), JobCheck::Running);
        let facts = self.facts.clone();
        let injection = self.preflight.injection.clone();
        let libraries = self.config.libraries.clone();
        let tx = self.preflight.finished_tx.clone();
        let wake = self.wake.clone();
        tokio::task::spawn_blocking(move || {
            let report = preflight::run(
                &facts,
                &preflight::Scope::Gpus(gpus),
                preflight::Trigger::Job,
                &injection,
                &libraries,
                preflight::JOB_BUDGET,
            );
            let _ = tx.send(FinishedCheck {
                job: Some(key),
                report,
            });
            wake.notify_one();
        });
        false
    }

    fn has_news(&self) -> bool {
        let now = std::time::Instant::now();
        lock(&self.ranks).values().any(|e| {
            let backing_off = e.log_retry_at.is_some_and(|t| t > now);
            let unshipped = file_len(&e.log_path) > e.shipped;
            let deferred = e.report_retry_at.is_some_and(|t| t > now);
            // An end waits for its output; while that waits out a backoff there is nothing to say.
            (!backing_off && unshipped) || (e.ended() && !e.acknowledged && !unshipped && !deferred)
        })
    }

    /// Whether the coordinator has the final state of every rank this agent started.
    fn all_reported(&self) -> bool {
        lock(&self.ranks)
            .values()
            .all(|e| e.ended() && e.acknowledged)
    }
}

fn log_path_of(ranks: &Ranks, key: &RankKey) -> PathBuf {
    lock(ranks)
        .get(key)
        .map(|e| e.log_path.clone())
        .unwrap_or_default()
}

/// What a failed rank left to explain itself: torch's error file (`@record`: message and traceback),
/// then the last lines of its output.
fn failure_note(log_path: &Path, error_file: &Path) -> Option<String> {
    let mut note = String::new();
    if let Ok(text) = std::fs::read_to_string(error_file) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let m = &v["message"];
            let message = m["message"].as_str().or_else(|| m.as_str()).unwrap_or("");
            let trace = m["extraInfo"]["py_callstack"].as_str().unwrap_or("");
            if !message.is_empty() {
                note.push_str(&format!(
                    "error file: {message}
"
                ));
            }
            if !trace.is_empty() {
                note.push_str(trace.trim_end());
                note.push('\n');
            }
        }
    }
    if let Ok(bytes) = std::fs::read(log_path) {
        let start = bytes.len().saturating_sub(FAILURE_NOTE_BYTES_MAX);
        let text = String::from_utf8_lossy(&bytes[start..]);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(FAILURE_TAIL_LINES)..];
        if !tail.is_empty() {
            note.push_str("last output:\n");
            for line in tail {
                note.push_str("  ");
                note.push_str(line);
                note.push('\n');
            }
        }
    }
    if note.len() > FAILURE_NOTE_BYTES_MAX {
        let mut cut = note.len() - FAILURE_NOTE_BYTES_MAX;
        while !note.is_char_boundary(cut) {
            cut += 1;
        }
        note = note[cut..].to_string();
    }
    let note = note.trim_end().to_string();
    (!note.is_empty()).then_some(note)
}

/// A failed rank's note, headed by what the OOM killer did to it (`oom_kill` of its cgroup's
/// `memory.events`), when it did anything.
fn with_oom_note(note: Option<String>, oom_kills: u64) -> Option<String> {
    if oom_kills == 0 {
        return note;
    }
    let head = format!(
        "killed by the OOM killer: {oom_kills} process(es) of this rank exceeded the job's memory limit on this host (memory_per_node_mib)"
    );
    Some(match note {
        Some(n) => format!("{head}\n{n}"),
        None => head,
    })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_chunk(path: &Path, offset: u64, max: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Builds a heartbeat's reports and log chunks. A rank's end is reported only once all its output has
/// been shipped, so a job that has ended has all its lines stored. Returns the ranks whose final state
/// this heartbeat carries.
fn observe(ranks: &Ranks) -> (Vec<RankReport>, Vec<LogChunk>, Vec<RankKey>) {
    let ranks = lock(ranks);
    let mut reports = Vec::new();
    let mut chunks = Vec::new();
    let mut finals = Vec::new();
    let mut budget = LOG_BYTES_PER_HEARTBEAT;
    let now = std::time::Instant::now();
    for (key, e) in ranks.iter() {
        let len = file_len(&e.log_path);
        let backing_off = e.log_retry_at.is_some_and(|t| t > now);
        if len > e.shipped && budget > 0 && !backing_off {
            let max = LOG_CHUNK_BYTES.min(budget);
            match read_chunk(&e.log_path, e.shipped, max) {
                Ok(data) if !data.is_empty() => {
                    budget -= data.len() as u64;
                    chunks.push(LogChunk {
                        job_id: key.job_id.clone(),
                        attempt: key.attempt,
                        rank: key.rank,
                        offset: e.shipped,
                        data,
                    });
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(path = %e.log_path.display(), error = %err, "could not read a rank's log")
                }
            }
        }
        let all_shipped = len <= e.shipped;
        let (phase, exit_code, message) = if let Some(msg) = &e.failed_to_start {
            (RankPhase::FailedToStart, 0, msg.clone())
        } else if let (Some(code), true) = (e.exit_code, all_shipped) {
            (
                RankPhase::Exited,
                code,
                e.exit_note.clone().unwrap_or_default(),
            )
        } else {
            (RankPhase::Running, 0, String::new())
        };
        if phase != RankPhase::Running {
            finals.push(key.clone());
        }
        reports.push(RankReport {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            rank: key.rank,
            phase: phase as i32,
            exit_code,
            message,
            pid: e.pid,
        });
    }
    (reports, chunks, finals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_check_superseded_by_a_passing_host_run_is_checked_again() {
        // (the job's check, the verdict the heartbeats carry, what the ranks do)
        let cases = [
            (None, true, JobGate::Check),
            (None, false, JobGate::Check),
            (Some(JobCheck::Running), true, JobGate::Wait),
            (Some(JobCheck::Passed), true, JobGate::Start),
            // The failure is on its way to the coordinator, which moves the job: wait.
            (Some(JobCheck::Failed), false, JobGate::Wait),
            // A newer whole-host run replaced the failure: the coordinator will not move the job,
            // so waiting would leave it starting forever.
            (Some(JobCheck::Failed), true, JobGate::Check),
        ];
        for (check, healthy, want) in cases {
            assert_eq!(
                job_gate(check, healthy),
                want,
                "{check:?} healthy={healthy}"
            );
        }
    }

    #[test]
    fn a_coordinator_that_does_not_lead_or_answer_sends_the_agent_elsewhere() {
        use members::Failure;
        let named = {
            let mut s = tonic::Status::unavailable(
                "this coordinator is not the leader; the leader is at 10.0.0.2:7470",
            );
            s.metadata_mut().insert(
                trainctl_proto::LEADER_METADATA_KEY,
                "10.0.0.2:7470".parse().unwrap(),
            );
            s
        };
        let cases = [
            (
                named,
                Some(Failure::NotLeader {
                    leader: Some("10.0.0.2:7470".into()),
                }),
            ),
            (
                tonic::Status::unavailable(
                    "this coordinator is not the leader, and knows no leader now",
                ),
                Some(Failure::NotLeader { leader: None }),
            ),
            // What tonic makes of a refused connection.
            (
                tonic::Status::unavailable("tcp connect error"),
                Some(Failure::Unreachable),
            ),
            (
                tonic::Status::cancelled("Timeout expired"),
                Some(Failure::Unreachable),
            ),
            (
                tonic::Status::unknown("h2 protocol error"),
                Some(Failure::Unreachable),
            ),
            // The coordinator answered: the request failed, not the coordinator.
            (tonic::Status::invalid_argument("bad node name"), None),
            (tonic::Status::permission_denied("revoked"), None),
            (tonic::Status::internal("raft"), None),
        ];
        for (status, expected) in cases {
            assert_eq!(coordinator_failure(&status), expected, "{status:?}");
        }
        // ... and a refused identity still stops the agent, an unavailable one never does.
        assert!(status_error(tonic::Status::permission_denied("revoked")).is::<IdentityRefused>());
        assert!(status_error(tonic::Status::unavailable("x")).is::<CoordinatorUnavailable>());
    }

    #[test]
    fn output_a_coordinator_cannot_store_is_offered_again_ever_more_slowly() {
        let waits: Vec<u64> = (1..=8)
            .map(|n| log_retry_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // The give-up point comes after about 15 s of retries, not never.
        let total: u64 = waits[..LOG_STORE_FAILURES_MAX as usize - 1].iter().sum();
        assert!((5_000..=30_000).contains(&total), "{total}");
    }
}
