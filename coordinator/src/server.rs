//! The coordinator process: one TCP listener serving REST, gRPC (agents) and Raft (other coordinators),
//! plus the leader's background loops (scheduling, node liveness).
//!
//! Shape: `run(config, listener, shutdown)` starts everything and returns when `shutdown` fires and every
//! task has stopped.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::logs::LogStore;
use crate::raft::elections::Elections;
use crate::raft::log_store::LogStore as RaftLogStore;
use crate::raft::network::HttpNetworkFactory;
use crate::raft::peer_auth::{append_problem, PeerSecret, PEER_HEADER};
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{Raft, ServerId};
use crate::scheduler::{self, QueueHead};
use crate::state::retention::{jobs_to_forget, JobRetention, FORGET_JOBS_PER_COMMAND};
use crate::state::{Command, CommandOutcome, JobId, JobState, NodeId};
use crate::supervise::{self, NodeSeen, NodeVerdict};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where the Raft log, snapshots and rank logs live.
    pub data_dir: PathBuf,
    /// This coordinator's Raft server id.
    pub server_id: ServerId,
    /// The address other coordinators reach this one at (host:port).
    pub advertise_addr: String,
    /// How often agents heartbeat.
    pub heartbeat_interval_ms: u32,
    /// A node not heard from for this long is lost, and its jobs fail.
    pub node_timeout_ms: u64,
    /// SIGTERM-to-SIGKILL grace when agents stop ranks.
    pub stop_grace_ms: u32,
    /// Most REST requests served at once; more wait their turn. Agents' gRPC and Raft have
    /// their own allowances, so a flood of API clients never starves heartbeats or replication.
    pub max_rest_requests: usize,
    /// Most agent gRPC requests served at once (a heartbeat may be held up to 2 s as a long poll,
    /// so this is about one per host).
    pub max_agent_requests: usize,
    /// Rank logs of a job are deleted this long after it ended (each coordinator prunes its own).
    pub log_retention_ms: u64,
    /// How long finished jobs stay in the state, and how many at most (the leader forgets the
    /// rest; see `state/retention.rs`).
    pub job_retention: JobRetention,
    /// How often the leader looks for finished jobs past the retention.
    pub job_sweep_ms: u64,
    /// TLS on the port and tokens on every request (the default). `false` is `--insecure`: plain
    /// HTTP, and anyone who reaches the port is an admin.
    pub secure: bool,
    /// Where TLS material comes from when `secure`.
    pub tls: TlsSources,
    /// Whether a new data dir starts a cluster or joins one (ignored once the data dir holds one).
    pub start: crate::membership::ClusterStart,
    /// A snapshot is taken every this many log entries; half as many are kept behind it for
    /// followers that lag a little (the rest catch up from the snapshot).
    pub snapshot_logs: u64,
}

/// The coordinator's TLS material. Unset files are created under `<data-dir>/tls/`: a cluster CA
/// (`ca.pem`, `ca.key`) on first start, and a server certificate signed by it on every start.
#[derive(Debug, Clone, Default)]
pub struct TlsSources {
    /// The operator's own CA (certificate and key, PEM), used to verify and sign agents and
    /// coordinators. Other coordinators of the cluster must use the same one.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// The operator's own server certificate chain and key (PEM), instead of one the CA signs.
    pub server: Option<(PathBuf, PathBuf)>,
    /// Extra names (DNS names or IP addresses) for the server certificate, besides the advertise
    /// address, the listen address, `localhost`, 127.0.0.1 and the host name.
    pub names: Vec<String>,
}

/// The name of the file in the data dir holding the bootstrap admin token (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The directory in the data dir holding the cluster CA and the server certificate.
pub const TLS_DIR: &str = "tls";

impl CoordinatorConfig {
    /// Defaults for a coordinator storing its data in `data_dir` and reachable at `advertise_addr`.
    pub fn new(data_dir: PathBuf, advertise_addr: String) -> Self {
        CoordinatorConfig {
            data_dir,
            server_id: 1,
            advertise_addr,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            stop_grace_ms: 10_000,
            max_rest_requests: 1024,
            max_agent_requests: 16_384,
            log_retention_ms: DEFAULT_LOG_RETENTION_MS,
            job_retention: JobRetention {
                max_age_ms: DEFAULT_JOB_RETENTION_MS,
                max_finished: DEFAULT_MAX_FINISHED_JOBS,
            },
            job_sweep_ms: DEFAULT_JOB_SWEEP_MS,
            secure: true,
            tls: TlsSources::default(),
            start: crate::membership::ClusterStart::Bootstrap,
            snapshot_logs: DEFAULT_SNAPSHOT_LOGS,
        }
    }
}

/// How often agents heartbeat by default. A heartbeat with nothing to report is held by the
/// coordinator up to this long (a long poll), so a host is heard from about this often.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u32 = 500;
/// A host silent this long is lost by default: four heartbeats, so one late or lost beat on a busy
/// host is no loss, and a dead host's gang is placed again within about two seconds.
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 2_000;

/// Rank logs are kept this long after their job ended: 30 days.
pub const DEFAULT_LOG_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;
/// How often the coordinator looks for logs past their retention.
pub const LOG_RETENTION_SWEEP_MS: u64 = 10 * 60 * 1000;
/// Finished jobs stay in the state this long by default: 30 days, as their logs.
pub const DEFAULT_JOB_RETENTION_MS: u64 = DEFAULT_LOG_RETENTION_MS;
/// At most this many finished jobs stay in the state by default (the snapshot of 100 000 is about
/// 80 MB and installs in about 4 s: `benches/README.md`, `snapshot_join`).
pub const DEFAULT_MAX_FINISHED_JOBS: usize = 100_000;
/// How often the leader looks for finished jobs to forget, by default.
pub const DEFAULT_JOB_SWEEP_MS: u64 = 60 * 1000;

/// Errors of a write through Raft, for the API and the agent service to map.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This coordinator is not the leader; the request belongs there.
    #[error("this coordinator is not the leader{}", leader.as_ref().map(|l| format!("; the leader is at {l}")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    /// Raft could not commit the command.
    #[error("the cluster state could not be written: {0}")]
    Raft(String),
    /// A quorum did not confirm the write in time (this coordinator may be cut off from the
    /// majority). It may still take effect: retry it with the same Idempotency-Key.
    #[error("the write was not confirmed by a majority of coordinators within {}s (is this coordinator cut off from them?); it may still take effect: retry it (with the same Idempotency-Key for a submission)", WRITE_COMMIT_TIMEOUT.as_secs())]
    Unconfirmed,
}

/// How long a write may wait for a quorum before its caller is told to retry.
pub const WRITE_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the request handlers and loops share.
pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub raft: Raft,
    pub state: StateMachineStore,
    pub logs: LogStore,
    /// When each node's agent was last heard from (leader-local, not replicated).
    pub last_heard: Mutex<HashMap<NodeId, Instant>>,
    /// When each running job last made progress, on which attempt, and its newest step (leader-local;
    /// a new leader starts every clock afresh).
    pub progress: Mutex<HashMap<JobId, JobProgress>>,
    /// Held heartbeats (long polls) in progress per node: a node holding one is alive right now.
    pub holding: Mutex<HashMap<NodeId, usize>>,
    /// When each rank failure was first reported (leader-local), while it waits for its gang's
    /// other hosts to show they are alive.
    pub failures_seen: Mutex<HashMap<(JobId, u32, u32), Instant>>,
    pub metrics: crate::api::Metrics,
    pub started_at: Instant,
    /// Signs and checks Raft messages between this cluster's coordinators.
    pub peer_secret: PeerSecret,
    /// The cluster CA, which signs agents' certificates when they join (`None` with `--insecure`).
    pub cluster_ca: Option<Arc<trainctl_tls::ClusterCa>>,
    /// The TLS configuration of the port (`None` with `--insecure`).
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// Signed calls to other coordinators (membership) and the client that forwards REST
    /// requests to the leader.
    pub peers: crate::membership::PeerClient,
    /// Server ids granted to joining coordinators that are not members yet (leader-local).
    pub granted_ids: Mutex<std::collections::BTreeSet<ServerId>>,
    /// One membership change (add, remove, leadership transfer) at a time.
    pub membership_change: tokio::sync::Mutex<()>,
    /// Held for writing while leadership moves: the write queue waits.
    pub write_pause: Arc<tokio::sync::RwLock<()>>,
    /// When this coordinator may campaign: election holds and its last contact with a leader.
    pub elections: Arc<Elections>,
    /// Writes go through one queue so that concurrent ones share a log entry and an fsync.
    writes: mpsc::Sender<PendingWrite>,
}

/// The newest sign of life of a job's current attempt, as the leader saw it.
#[derive(Debug, Clone, Copy)]
pub struct JobProgress {
    pub attempt: u32,
    pub at: Instant,
    pub step: Option<u64>,
}

impl JobProgress {
    /// `job`'s entry for `attempt`; a new attempt (or a job not seen yet) starts its clock now.
    fn of(
        progress: &mut HashMap<JobId, JobProgress>,
        job: JobId,
        attempt: u32,
    ) -> &mut JobProgress {
        let fresh = || JobProgress {
            attempt,
            at: Instant::now(),
            step: None,
        };
        let entry = progress.entry(job).or_insert_with(fresh);
        if entry.attempt != attempt {
            *entry = fresh();
        }
        entry
    }
}

/// A command waiting for its turn in the log, and where its outcome goes.
type PendingWrite = (Command, oneshot::Sender<Result<CommandOutcome, WriteError>>);

/// Most commands written as one log entry.
pub const MAX_COMMANDS_PER_ENTRY: usize = 256;
/// Writes waiting for the log before callers wait for room.
pub const WRITE_QUEUE_LEN: usize = 4096;

/// Milliseconds since the Unix epoch: the leader stamps commands with it before the Raft write.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Coordinator {
    /// Commits one command through Raft and returns what applying it produced. Commands written
    /// while another write is in flight are grouped into one log entry (group commit).
    pub async fn write(&self, command: Command) -> Result<CommandOutcome, WriteError> {
        let (reply, outcome) = oneshot::channel();
        let stopped = || WriteError::Raft("the coordinator is shutting down".to_string());
        self.writes
            .send((command, reply))
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    /// Writes `command` on behalf of `who`: applied like [`Coordinator::write`], and recorded in
    /// the audit trail with its outcome.
    pub async fn write_as(
        &self,
        who: &crate::auth::Principal,
        command: Command,
    ) -> Result<CommandOutcome, WriteError> {
        self.write(Command::Audited {
            actor: who.actor(),
            at_ms: now_ms(),
            command: Box::new(command),
        })
        .await
    }

    /// Whether this coordinator leads the Raft group now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.server_id)
    }

    /// Notes that a rank of `job`'s `attempt` made progress (output, a progress report, a checkpoint).
    pub fn made_progress(&self, job: JobId, attempt: u32, step: Option<u64>) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let entry = JobProgress::of(&mut progress, job, attempt);
        entry.at = Instant::now();
        if step.is_some() {
            entry.step = step;
        }
    }

    /// Whether `node` has shown it is alive since `t`: it holds a heartbeat open now, or one arrived
    /// after `t`.
    pub fn alive_since(&self, node: &NodeId, t: Instant) -> bool {
        let holding = self
            .holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
            .unwrap_or(0);
        holding > 0
            || self
                .last_heard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(node)
                .is_some_and(|heard| *heard > t)
    }

    /// Notes that `node`'s agent was just heard from.
    pub fn heard_from(&self, node: &NodeId) {
        self.last_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), Instant::now());
    }
}

/// The Raft configuration of every coordinator (and of the simulated clusters in the tests):
/// timers, snapshots every `snapshot_logs` entries, message bounds.
pub fn raft_config(snapshot_logs: u64) -> anyhow::Result<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "trainctl".to_string(),
        // A follower that heard from a leader campaigns after the leader's lease (openraft
        // 0.9 fixes it at election_timeout_max) plus its own election timeout: 0.45 to 0.6 s of
        // silence, so a failover (and its first commit) fits in well under a second.
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Bounds each snapshot chunk's RPC, and the last one waits for the receiver to fsync and
        // load the whole snapshot (seconds for 100 000 jobs): openraft's 200 ms default made the
        // leader send a large snapshot again and again.
        install_snapshot_timeout: SNAPSHOT_INSTALL_TIMEOUT_MS,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs.max(2)),
        max_in_snapshot_log_to_keep: snapshot_logs.max(2) / 2,
        snapshot_max_chunk_size: crate::raft::state_machine::SNAPSHOT_CHUNK_BYTES,
        // An append carries at most this many entries (each up to MAX_COMMANDS_PER_ENTRY
        // commands), so a Raft message stays within MAX_RAFT_BODY_BYTES.
        max_payload_entries: RAFT_MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    Ok(config)
}

/// Opens the coordinator's storage and Raft. A new data dir either starts a one-voter cluster
/// (`ClusterStart::Bootstrap`) or joins one (`ClusterStart::Join`: the grant is fetched and stored
/// here; `run` asks to be added once it serves).
pub async fn open(mut config: CoordinatorConfig) -> anyhow::Result<Arc<Coordinator>> {
    use crate::membership::{store_grant, ClusterStart, Joiner, ServerIdentity};
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let db_path = config.data_dir.join("state.redb");
    let mut identity = ServerIdentity::load(&config.data_dir)?;
    // A data dir from before server.json: a bootstrapped server with the configured id.
    let legacy = identity.is_none() && db_path.exists();
    if let ClusterStart::Join(target) = &config.start {
        let joiner = Joiner::new(target.clone())?;
        match &identity {
            None if !legacy => {
                let grant = joiner
                    .grant(&config.advertise_addr)
                    .await
                    .with_context(|| {
                        format!("join the cluster at {}", target.addresses.join(","))
                    })?;
                identity = Some(store_grant(&config.data_dir, &grant)?);
                info!(server_id = grant.server_id, cluster_id = %grant.cluster_id, "granted a place in the cluster");
            }
            _ => {
                let mine = identity.as_ref().and_then(|i| i.cluster_id.clone());
                if let (Some(mine), Some(theirs)) = (&mine, joiner.cluster_id().await) {
                    if *mine != theirs {
                        anyhow::bail!(
                            "{} holds cluster {mine}, but {} is cluster {theirs}: a data dir belongs to one cluster; \
                             to join {theirs}, start from an empty data dir",
                            config.data_dir.display(),
                            target.addresses.join(",")
                        );
                    }
                }
            }
        }
    }
    if let Some(identity) = &identity {
        config.server_id = identity.server_id;
    }
    let db = tokio::task::spawn_blocking(move || redb::Database::create(&db_path))
        .await?
        .context("open the state database (is another coordinator using this data dir?)")?;
    let db = Arc::new(db);
    let log_store = RaftLogStore::open(db.clone()).context("open the raft log")?;
    // One store (one append lock) for the state machine's appends and `log_repair`'s, which
    // write the same files.
    let logs = LogStore::new(config.data_dir.join("logs"));
    let state = StateMachineStore::open(db, config.data_dir.join("snapshots"), logs.clone())
        .context("open the state machine")?;
    let raft_config = raft_config(config.snapshot_logs)?;
    let peer_secret = PeerSecret::load_or_create(&config.data_dir)
        .context("read or create the cluster's peer secret")?;
    let tls = if config.secure {
        Some(load_tls(&config)?)
    } else {
        None
    };
    let peer_tls = tls.as_ref().map(|t| t.peer_client.clone());
    let raft = Raft::new(
        config.server_id,
        Arc::new(raft_config),
        HttpNetworkFactory::new(peer_secret.clone(), config.server_id, peer_tls.clone())?,
        log_store,
        state.clone(),
    )
    .await
    .context("start raft")?;
    let joining = matches!(config.start, ClusterStart::Join(_)) && !legacy;
    if !raft.is_initialized().await.context("read raft state")? && !joining {
        let members = BTreeMap::from([(config.server_id, BasicNode::new(&config.advertise_addr))]);
        raft.initialize(members)
            .await
            .context("initialise a one-voter raft cluster")?;
        info!(
            server_id = config.server_id,
            "initialised a new one-voter cluster"
        );
    }
    let elections = Elections::start(raft.clone());
    if !joining && state.read(|s| s.cluster_id.is_none()) {
        name_cluster(&raft, config.server_id).await?;
    }
    if !joining {
        let cluster_id = state.read(|s| s.cluster_id.clone());
        let current = ServerIdentity {
            server_id: config.server_id,
            cluster_id,
        };
        if identity.as_ref() != Some(&current) && current.cluster_id.is_some() {
            current.save(&config.data_dir)?;
        }
    }
    let sole_voter = {
        let m = raft.metrics().borrow().clone();
        let voters: Vec<ServerId> = m.membership_config.membership().voter_ids().collect();
        voters == [config.server_id]
    };
    if config.secure && sole_voter {
        ensure_admin_token(&raft, &state, &config.data_dir).await?;
    }
    let (writes, queue) = mpsc::channel(WRITE_QUEUE_LEN);
    let write_pause = Arc::new(tokio::sync::RwLock::new(()));
    tokio::spawn(group_commit(raft.clone(), queue, write_pause.clone()));
    let peers =
        crate::membership::PeerClient::new(peer_secret.clone(), config.server_id, peer_tls)?;
    Ok(Arc::new(Coordinator {
        writes,
        config,
        raft,
        state,
        logs,
        last_heard: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        holding: Mutex::new(HashMap::new()),
        failures_seen: Mutex::new(HashMap::new()),
        metrics: crate::api::Metrics::default(),
        started_at: Instant::now(),
        peer_secret,
        cluster_ca: tls.as_ref().map(|t| t.ca.clone()),
        server_tls: tls.map(|t| t.server),
        peers,
        granted_ids: Mutex::new(Default::default()),
        membership_change: tokio::sync::Mutex::new(()),
        write_pause,
        elections,
    }))
}

/// How long one snapshot chunk's RPC may take, the last one included (it installs the snapshot).
pub const SNAPSHOT_INSTALL_TIMEOUT_MS: u64 = 120_000;

/// A snapshot every this many log entries by default.
pub const DEFAULT_SNAPSHOT_LOGS: u64 = 2000;

/// Most log entries in one Raft append.
pub const RAFT_MAX_PAYLOAD_ENTRIES: u64 = 16;
/// Most bytes of commands grouped into one log entry (one command alone may be larger: a job spec
/// is at most 4 MiB, a heartbeat's logs about 6 MiB encoded). So an append of
/// [`RAFT_MAX_PAYLOAD_ENTRIES`] entries stays far below [`MAX_RAFT_BODY_BYTES`].
pub const MAX_ENTRY_BYTES: usize = 32 << 20;

/// The size of `command` as the log stores it.
fn encoded_len(command: &Command) -> usize {
    serde_json::to_vec(command).map_or(0, |v| v.len())
}

/// The TLS material of a secure coordinator.
struct LoadedTls {
    ca: Arc<trainctl_tls::ClusterCa>,
    server: Arc<rustls::ServerConfig>,
    /// For Raft messages to other coordinators: trusts the cluster CA, presents this server's
    /// certificate.
    peer_client: rustls::ClientConfig,
}

/// Loads (or creates) the cluster CA and this coordinator's certificate.
fn load_tls(config: &CoordinatorConfig) -> anyhow::Result<LoadedTls> {
    use trainctl_tls::ClusterCa;
    trainctl_tls::install_crypto_provider();
    let dir = config.data_dir.join(TLS_DIR);
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    let ca = match &config.tls.ca {
        Some((cert, key)) => ClusterCa::from_pem(&read(cert)?, &read(key)?)
            .with_context(|| format!("the CA in {} and {}", cert.display(), key.display()))?,
        None => ClusterCa::load_or_create(&dir)
            .with_context(|| format!("the cluster CA in {}", dir.display()))?,
    };
    let (cert_pem, key_pem) = match &config.tls.server {
        Some((cert, key)) => (read(cert)?, read(key)?),
        None => {
            let issued = ca
                .issue_server(&server_names(config))
                .context("issue the coordinator's certificate")?;
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("server.pem"), &issued.cert_pem)?;
            trainctl_tls::write_private_file(&dir.join("server.key"), issued.key_pem.as_bytes())?;
            (issued.cert_pem, issued.key_pem)
        }
    };
    let server = trainctl_tls::server_config(&cert_pem, &key_pem, ca.cert_pem())
        .context("the coordinator's TLS configuration")?;
    let peer_client = trainctl_tls::client_config(ca.cert_pem(), Some((&cert_pem, &key_pem)))
        .context("the TLS configuration for other coordinators")?;
    Ok(LoadedTls {
        ca: Arc::new(ca),
        server,
        peer_client,
    })
}

/// The names the coordinator's own certificate is valid for: the advertise host, `localhost`,
/// 127.0.0.1, the host name, and the operator's extra names.
fn server_names(config: &CoordinatorConfig) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let advertise = config.advertise_addr.trim_start_matches("https://");
    let advertise = advertise.trim_start_matches("http://");
    let host = match advertise.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => advertise,
    };
    names.push(host.trim_matches(['[', ']']).to_string());
    if let Ok(hostname) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(hostname.trim().to_ascii_lowercase());
    }
    names.extend(config.tls.names.iter().cloned());
    names.retain(|n| !n.is_empty() && n != "0.0.0.0" && n != "::");
    names.sort();
    names.dedup();
    names
}

/// Makes sure the admin token in `<data-dir>/admin.token` exists and works: created (and
/// written 0600) on a new cluster, and its record written to the state if the state lacks it.
async fn ensure_admin_token(
    raft: &Raft,
    state: &StateMachineStore,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let existing = std::fs::read_to_string(&path).ok();
    let usable = existing
        .as_deref()
        .is_some_and(|t| state.read(|s| crate::auth::check_token(s, t.trim(), now_ms()).is_ok()));
    if usable {
        return Ok(());
    }
    // After a restart the state catches up with the log once this coordinator leads again.
    let leads = raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader == Some(m.id), "this coordinator leads")
        .await
        .is_ok();
    let usable = existing
        .as_deref()
        .is_some_and(|t| state.read(|s| crate::auth::check_token(s, t.trim(), now_ms()).is_ok()));
    if usable {
        return Ok(());
    }
    if !leads {
        anyhow::bail!(
            "{} holds no usable admin token and this coordinator does not lead, so it can not make one",
            path.display()
        );
    }
    let (record, token) = crate::auth::mint_token(
        "admin".into(),
        crate::state::Role::Admin,
        None,
        None,
        "coordinator".into(),
        now_ms(),
    );
    raft.client_write(Command::Audited {
        actor: crate::state::Actor {
            name: "coordinator".into(),
            namespace: None,
        },
        at_ms: now_ms(),
        command: Box::new(Command::CreateToken { record }),
    })
    .await
    .context("create the admin token")?;
    trainctl_tls::write_private_file(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    info!(path = %path.display(), "wrote a new admin token");
    Ok(())
}

/// Writes queued commands to the Raft log, as many as are waiting in one entry, one entry at a time:
/// while an entry's fsync runs, the next ones gather. So N concurrent writes cost about one fsync.
async fn group_commit(
    raft: Raft,
    mut queue: mpsc::Receiver<PendingWrite>,
    pause: Arc<tokio::sync::RwLock<()>>,
) {
    // A command that did not fit the previous entry opens the next one.
    let mut carried: Option<PendingWrite> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Sizes are measured only when commands are grouped: a lone write is never encoded twice.
        let mut bytes: Option<usize> = None;
        let mut batch = vec![first];
        while batch.len() < MAX_COMMANDS_PER_ENTRY {
            match queue.try_recv() {
                Ok(next) => {
                    let bytes = bytes.get_or_insert_with(|| encoded_len(&batch[0].0));
                    let next_bytes = encoded_len(&next.0);
                    if *bytes + next_bytes > MAX_ENTRY_BYTES {
                        carried = Some(next);
                        break;
                    }
                    *bytes += next_bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let single = commands.len() == 1;
        let command = if single {
            commands.into_iter().next().expect("one command")
        } else {
            Command::Batch(commands)
        };
        let paused = pause.read().await;
        let written = tokio::time::timeout(WRITE_COMMIT_TIMEOUT, raft.client_write(command)).await;
        drop(paused);
        let result = match written {
            Err(_) => Err(WriteError::Unconfirmed),
            Ok(written) => match written {
                Ok(response) => Ok(response.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Err(WriteError::NotLeader {
                        leader: f.leader_node.map(|n| n.addr),
                    })
                }
                Err(e) => Err(WriteError::Raft(e.to_string())),
            },
        };
        match result {
            Ok(CommandOutcome::Batch(outcomes)) if !single => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Ok(outcome) => {
                for reply in replies {
                    let _ = reply.send(Ok(outcome.clone()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(match &e {
                        WriteError::NotLeader { leader } => WriteError::NotLeader {
                            leader: leader.clone(),
                        },
                        WriteError::Raft(m) => WriteError::Raft(m.clone()),
                        WriteError::Unconfirmed => WriteError::Unconfirmed,
                    }));
                }
            }
        }
    }
}

/// Gives a new cluster state its id before anything registers, so agents can tell it from any other.
/// The leader makes the id and the command carries it, so every replica agrees.
async fn name_cluster(raft: &Raft, server_id: ServerId) -> anyhow::Result<()> {
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.current_leader == Some(server_id),
            "this coordinator leads",
        )
        .await
        .context("wait for this coordinator to lead its new cluster")?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let cluster_id = format!("{:016x}{:08x}", nanos as u64, std::process::id());
    raft.client_write(Command::InitCluster { cluster_id })
        .await
        .context("name the new cluster")?;
    Ok(())
}

/// Serves REST, gRPC and Raft on `listener` and runs the leader loops until `shutdown` turns true.
pub async fn run(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    // Each kind of traffic waits only for its own kind.
    let limit = tower::limit::GlobalConcurrencyLimitLayer::new;
    let grpc = crate::agents::router(coordinator.clone())
        .layer(limit(coordinator.config.max_agent_requests));
    // REST requests go to the leader first (`forward`), then wait their turn; Raft has its
    // own allowance and its own, larger, body limit.
    let rest = crate::api::router(coordinator.clone())
        .layer(limit(coordinator.config.max_rest_requests))
        .layer(axum::middleware::from_fn_with_state(
            coordinator.clone(),
            crate::forward::layer,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    let raft = raft_router(coordinator.clone())
        .layer(limit(MAX_RAFT_REQUESTS))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RAFT_BODY_BYTES));
    let app = rest
        .merge(raft)
        .fallback_service(crate::api::grpc_or_no_such_endpoint(grpc));
    let app = crate::api::with_json_errors(app);
    if let crate::membership::ClusterStart::Join(target) = &coordinator.config.start {
        tokio::spawn(become_member(coordinator.clone(), target.clone()));
    }

    let scheduler = tokio::spawn(scheduling_loop(coordinator.clone(), shutdown.clone()));
    let liveness = tokio::spawn(liveness_loop(coordinator.clone(), shutdown.clone()));
    let retention = tokio::spawn(log_retention_loop(coordinator.clone(), shutdown.clone()));
    let job_retention = tokio::spawn(job_retention_loop(coordinator.clone(), shutdown.clone()));
    let log_repair = tokio::spawn(crate::log_repair::after_snapshot_installs(
        coordinator.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(exit_if_raft_core_fails(coordinator.clone()));
    info!(%local, "coordinator serving REST, gRPC and Raft");

    let graceful = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if coordinator.server_tls.is_none() {
        warn!("INSECURE: this coordinator serves plain HTTP without authentication; anyone who can reach {local} can read and change the cluster, join as an agent and receive jobs' secrets. Use it only on a trusted machine.");
    }
    crate::http::serve(listener, app, graceful, coordinator.server_tls.clone())
        .await
        .context("serve")?;
    scheduler.await.ok();
    liveness.await.ok();
    retention.await.ok();
    job_retention.await.ok();
    log_repair.await.ok();
    coordinator.raft.shutdown().await.ok();
    Ok(())
}

/// A panic or storage failure in openraft's core stops it for good: every later write would fail
/// while the API still answered. Treat it as fatal for the process, so a supervisor restarts it and
/// Raft recovers from its log, instead of a "healthy" coordinator that answers 500 to every write.
async fn exit_if_raft_core_fails(coordinator: Arc<Coordinator>) {
    let mut metrics = coordinator.raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow().running_state {
            if matches!(fatal, openraft::error::Fatal::Stopped) {
                // A shutdown we asked for.
                return;
            }
            tracing::error!(error = %fatal, "the Raft core stopped; exiting so this coordinator restarts from its log");
            std::process::exit(RAFT_CORE_FAILED_EXIT_CODE);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Most Raft requests from other coordinators served at once.
pub const MAX_RAFT_REQUESTS: usize = 256;

/// Exit status of a coordinator whose Raft core failed (EX_SOFTWARE).
pub const RAFT_CORE_FAILED_EXIT_CODE: i32 = 70;

/// Raft messages from other coordinators (see `raft::network` and `raft::peer_auth`): signed by a
/// member of the current membership other than this server, and well formed, or refused before
/// openraft sees them.
fn raft_router(coordinator: Arc<Coordinator>) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::Json;
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

    use crate::raft::TypeConfig;

    fn refuse(status: StatusCode, error: String) -> axum::response::Response {
        (status, Json(serde_json::json!({ "error": error }))).into_response()
    }

    // The refusal is built once per bad message; boxing it would only move the allocation.
    #[allow(clippy::result_large_err)]
    async fn rpc(
        State(c): State<Arc<Coordinator>>,
        Path(kind): Path<String>,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> axum::response::Response {
        let route = format!("/internal/raft/{kind}");
        let header = headers.get(PEER_HEADER).and_then(|v| v.to_str().ok());
        let from = match c.peer_secret.verify(header, &route, &body, now_ms()) {
            Ok(from) => from,
            Err(e) => {
                warn!(route, error = %e, "refused a Raft message");
                return refuse(StatusCode::UNAUTHORIZED, e.to_string());
            }
        };
        // A coordinator being added answers who it is before it is a member of anything: holding
        // the peer secret is enough to ask.
        if kind == "identity" {
            let identity = crate::membership::PeerIdentity {
                server_id: c.config.server_id,
                cluster_id: c.state.read(|s| s.cluster_id.clone()).or_else(|| {
                    crate::membership::ServerIdentity::load(&c.config.data_dir)
                        .ok()
                        .flatten()
                        .and_then(|i| i.cluster_id)
                }),
            };
            return Json(identity).into_response();
        }
        let membership_config = c.raft.metrics().borrow().membership_config.clone();
        let is_member = membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == from);
        let knows_no_membership = membership_config.membership().nodes().next().is_none();
        // A joining coordinator knows no membership until the leader's first append brings it:
        // until then, the signature (the cluster's peer secret) is what admits the leader.
        if from == c.config.server_id || !(is_member || knows_no_membership) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("server {from} is not another member of this cluster"),
            );
        }
        fn parse<T: serde::de::DeserializeOwned>(
            body: &[u8],
        ) -> Result<T, axum::response::Response> {
            serde_json::from_slice(body)
                .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("not a Raft message: {e}")))
        }
        match kind.as_str() {
            "append" => {
                let rpc: AppendEntriesRequest<TypeConfig> = match parse(&body) {
                    Ok(r) => r,
                    Err(response) => return response,
                };
                if let Some(problem) = append_problem(&rpc) {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        format!("malformed append: {problem}"),
                    );
                }
                let answer = c.elections.receive_append(rpc).await;
                Json(answer).into_response()
            }
            "vote" => match parse::<VoteRequest<ServerId>>(&body) {
                Ok(rpc) => Json(c.elections.receive_vote(rpc).await).into_response(),
                Err(response) => response,
            },
            "snapshot" => match parse::<InstallSnapshotRequest<TypeConfig>>(&body) {
                Ok(rpc) => Json(c.raft.install_snapshot(rpc).await).into_response(),
                Err(response) => response,
            },
            // Rank logs this member holds, for one that lacks them (see `log_repair`).
            "log-read" => match parse::<crate::log_repair::LogRange>(&body) {
                Ok(range) => {
                    let store = c.logs.clone();
                    match tokio::task::spawn_blocking(move || {
                        crate::log_repair::serve(&store, &range)
                    })
                    .await
                    {
                        Ok(Ok(record)) => Json(record).into_response(),
                        Ok(Err(e)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
                Err(response) => response,
            },
            // Leadership transfer (see `membership`): the leader asks the new one to campaign,
            // and the others to hold their elections meanwhile.
            "elect" => match c.raft.trigger().elect().await {
                Ok(()) => Json(serde_json::json!({})).into_response(),
                Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            "hold-elections" => match parse::<crate::membership::HoldElections>(&body) {
                Ok(hold) => {
                    let ms = hold.ms.min(crate::membership::TRANSFER_HOLD.as_millis() as u64);
                    c.elections.hold_for(Duration::from_millis(ms));
                    Json(serde_json::json!({})).into_response()
                }
                Err(response) => response,
            },
            other => refuse(
                StatusCode::NOT_FOUND,
                format!("no Raft message `{other}` (append, vote, snapshot, identity, elect, hold-elections, log-read)"),
            ),
        }
    }

    axum::Router::new()
        .route("/internal/raft/{kind}", post(rpc))
        .with_state(coordinator)
}

/// Bodies are job specs and heartbeats with log chunks; 16 MiB is far above either.
const MAX_BODY_BYTES: usize = 16 << 20;
/// A Raft append carries up to [`RAFT_MAX_PAYLOAD_ENTRIES`] entries of up to
/// [`MAX_COMMANDS_PER_ENTRY`] commands each, as JSON: far more than one REST body.
pub const MAX_RAFT_BODY_BYTES: usize = 1 << 30;

/// A joining coordinator (`--join`), once it serves: asks the leader to add it as a voter,
/// unless it is one already. A refusal is fatal: the server can not serve this cluster.
async fn become_member(coordinator: Arc<Coordinator>, target: crate::membership::JoinTarget) {
    let me = coordinator.config.server_id;
    let is_voter = |c: &Coordinator| {
        c.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
    };
    if is_voter(&coordinator) {
        return;
    }
    let joiner = match crate::membership::Joiner::new(target) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "can not join");
            std::process::exit(1);
        }
    };
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        match joiner
            .become_member(&coordinator.config.advertise_addr)
            .await
        {
            Ok(()) => {
                info!(server_id = me, "joined the cluster as a voter");
                return;
            }
            Err(e) if attempt < 10 && !is_voter(&coordinator) => {
                warn!(error = %format!("{e:#}"), "could not join yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(_) if is_voter(&coordinator) => return,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "could not join the cluster");
                std::process::exit(1);
            }
        }
    }
}

async fn wait_for_change_or(
    changes: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    period: Duration,
) -> bool {
    tokio::select! {
        _ = changes.changed() => {}
        _ = tokio::time::sleep(period) => {}
        _ = shutdown.changed() => {}
    }
    !*shutdown.borrow()
}

/// The leader places pending jobs first come, first served: the head of the queue is placed whole or
/// the queue waits (a gang is never starved by smaller jobs behind it).
async fn scheduling_loop(coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = coordinator.state.subscribe();
    const SCHEDULE_PERIOD: Duration = Duration::from_millis(500);
    while wait_for_change_or(&mut changes, &mut shutdown, SCHEDULE_PERIOD).await {
        if !coordinator.is_leader() {
            continue;
        }
        // Place as many as fit, one commit each; stop at the first that does not.
        const MAX_PLACEMENTS_PER_PASS: usize = 1024;
        for _ in 0..MAX_PLACEMENTS_PER_PASS {
            let (job, placement) = match coordinator.state.read(scheduler::queue_head) {
                QueueHead::Idle | QueueHead::NoRoomNow => break,
                QueueHead::Place { job, placement } => (job, placement),
                QueueHead::Fail { job, reason } => {
                    warn!(%job, %reason, "failing a queued job");
                    if let Err(e) = coordinator
                        .write(Command::FailPendingJob {
                            job,
                            reason,
                            at_ms: now_ms(),
                        })
                        .await
                    {
                        warn!(%job, error = %e, "could not fail a job that can never run");
                        break;
                    }
                    continue;
                }
            };
            match coordinator
                .write(Command::PlaceJob {
                    job,
                    placement,
                    at_ms: now_ms(),
                })
                .await
            {
                Ok(CommandOutcome::Done) => {
                    coordinator.metrics.placements.inc();
                    info!(%job, "placed job");
                }
                Ok(other) => warn!(%job, ?other, "placement not applied; planning again"),
                Err(e) => {
                    warn!(%job, error = %e, "placement not written");
                    break;
                }
            }
        }
    }
}

/// The leader declares lost every node it has not heard from within the node timeout.
/// A coordinator that becomes leader starts its leader-local clocks afresh: what it remembers
/// from an earlier term (when it last heard from each node, each job's last progress, failures
/// waiting for silent peers) is stale, and would declare healthy nodes lost or busy jobs hung the
/// moment it leads. Every node gets a full timeout from now, every running job a full hang
/// timeout.
pub fn start_leader_clocks(coordinator: &Coordinator) {
    let now = Instant::now();
    let nodes: Vec<NodeId> = coordinator
        .state
        .read(|s| s.nodes.keys().cloned().collect());
    {
        let mut heard = coordinator
            .last_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        heard.clear();
        for node in nodes {
            heard.insert(node, now);
        }
    }
    coordinator
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    coordinator
        .failures_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

async fn liveness_loop(coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    let timeout = Duration::from_millis(coordinator.config.node_timeout_ms);
    let mut was_leader = false;
    // When the leader first saw room for each elastic job to grow (wall clock, ms).
    let mut grow_seen: HashMap<JobId, u64> = HashMap::new();
    let mut last_pass = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(LIVENESS_PERIOD_MS)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let leader = coordinator.is_leader();
        if leader && !was_leader {
            start_leader_clocks(&coordinator);
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        let since_last_pass = last_pass.elapsed();
        last_pass = Instant::now();
        let verdict = {
            let heard = coordinator
                .last_heard
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let holding = coordinator
                .holding
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let seen: Vec<NodeSeen> = coordinator.state.read(|s| {
                s.nodes
                    .values()
                    .map(|n| NodeSeen {
                        node: n.id.clone(),
                        status: n.status,
                        silent_for: heard.get(&n.id).map(Instant::elapsed),
                        holding_beat: holding.get(&n.id).is_some_and(|&k| k > 0),
                    })
                    .collect()
            });
            supervise::node_verdict(since_last_pass, timeout, seen)
        };
        let lost = match verdict {
            NodeVerdict::PassRanLate => {
                warn!(
                    late_ms = since_last_pass.as_millis() as u64,
                    "the liveness check ran late; not counting the gap against any node"
                );
                let now = Instant::now();
                let mut heard = coordinator
                    .last_heard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for t in heard.values_mut() {
                    *t = now;
                }
                continue;
            }
            NodeVerdict::Lost(lost) => lost,
        };
        supervise_jobs(&coordinator, &mut grow_seen).await;
        for (node, silent_for) in lost {
            warn!(%node, silent_ms = silent_for.as_millis() as u64, "node lost");
            if let Err(e) = coordinator
                .write(supervise::node_lost(node, silent_for, now_ms()))
                .await
            {
                warn!(error = %e, "could not record a lost node");
            }
        }
    }
}

/// The jobs whose logs are past retention: ended more than `retention_ms` before `now_ms`, or no
/// longer in the state at all.
pub fn logs_past_retention(
    state: &crate::state::State,
    with_logs: &[JobId],
    now_ms: u64,
    retention_ms: u64,
) -> Vec<JobId> {
    with_logs
        .iter()
        .copied()
        .filter(|id| match state.jobs.get(id) {
            None => true,
            Some(j) => j
                .finished_at_ms
                .is_some_and(|f| j.state.is_terminal() && now_ms.saturating_sub(f) >= retention_ms),
        })
        .collect()
}

/// Deletes rank logs of jobs that ended longer ago than the retention, every
/// [`LOG_RETENTION_SWEEP_MS`] (and once at start).
async fn log_retention_loop(coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let store = coordinator.logs.clone();
        let with_logs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let expired = coordinator.state.read(|s| {
            logs_past_retention(s, &with_logs, now_ms(), coordinator.config.log_retention_ms)
        });
        for job in expired {
            let store = coordinator.logs.clone();
            match tokio::task::spawn_blocking(move || store.remove_job(job)).await {
                Ok(Ok(())) => info!(%job, "deleted the logs of a job past the log retention"),
                Ok(Err(e)) => warn!(%job, error = %e, "could not delete old logs"),
                Err(_) => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(LOG_RETENTION_SWEEP_MS)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// On the leader, every `job_sweep_ms`: forgets the finished jobs past the retention
/// (`state::retention`), [`FORGET_JOBS_PER_COMMAND`] per write. Their logs go with the next log
/// retention sweep of each coordinator (a job no longer in the state has no logs to keep).
async fn job_retention_loop(coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(coordinator.config.job_sweep_ms)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        while coordinator.is_leader() {
            let jobs = coordinator.state.read(|s| {
                jobs_to_forget(
                    s,
                    now_ms(),
                    &coordinator.config.job_retention,
                    FORGET_JOBS_PER_COMMAND,
                )
            });
            if jobs.is_empty() {
                break;
            }
            let count = jobs.len();
            match coordinator.write(Command::ForgetJobs { jobs }).await {
                Ok(_) => info!(count, "forgot finished jobs past the job retention"),
                Err(e) => {
                    warn!(error = %e, "could not forget finished jobs");
                    break;
                }
            }
            if count < FORGET_JOBS_PER_COMMAND {
                break;
            }
        }
    }
}

/// How often the leader checks for silent nodes, hung gangs and room to grow.
pub const LIVENESS_PERIOD_MS: u64 = 250;

/// Restarts hung gangs and grows elastic ones (decisions in `supervise`).
async fn supervise_jobs(coordinator: &Coordinator, grow_seen: &mut HashMap<JobId, u64>) {
    let now = Instant::now();
    let wall = now_ms();
    let commands: Vec<Command> = {
        let mut progress = coordinator
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        coordinator.state.read(|s| {
            let snapshot = s.cluster_snapshot();
            let mut commands = Vec::new();
            progress.retain(|job, _| s.jobs.get(job).is_some_and(|j| !j.state.is_terminal()));
            grow_seen.retain(|job, _| {
                s.jobs
                    .get(job)
                    .is_some_and(|j| j.state == JobState::Running)
            });
            for job in s.live_jobs() {
                // A new attempt (or a new leader) starts the job's clock afresh.
                let p = JobProgress::of(&mut progress, job.id, job.attempt);
                if let Some(c) =
                    supervise::hang_decision(job, now.saturating_duration_since(p.at), p.step, wall)
                {
                    commands.push(c);
                    continue;
                }
                match supervise::grow_decision(
                    s,
                    &snapshot,
                    job,
                    grow_seen.get(&job.id).copied(),
                    wall,
                ) {
                    supervise::Grow::No => {
                        grow_seen.remove(&job.id);
                    }
                    supervise::Grow::Wait { .. } => {
                        grow_seen.entry(job.id).or_insert(wall);
                    }
                    supervise::Grow::Now(c) => {
                        grow_seen.remove(&job.id);
                        commands.push(*c);
                    }
                }
            }
            commands
        })
    };
    for command in commands {
        if let Command::RestartJob { job, reason, .. } = &command {
            warn!(%job, %reason, "restarting a gang");
        }
        match coordinator.write(command).await {
            Ok(_) => {
                coordinator.metrics.restarts.inc();
            }
            Err(e) => warn!(error = %e, "could not restart a gang"),
        }
    }
}

/// Counts jobs by state, for health and metrics.
pub fn job_counts(coordinator: &Coordinator) -> BTreeMap<&'static str, u64> {
    coordinator.state.read(|s| {
        let mut counts: BTreeMap<&'static str, u64> = JobState::ALL
            .into_iter()
            .map(|st| (st.as_str(), 0))
            .collect();
        for job in s.jobs.values() {
            *counts.entry(job.state.as_str()).or_default() += 1;
        }
        counts
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, CommandOutcome, State};

    #[test]
    fn logs_go_once_their_job_ended_longer_ago_than_the_retention() {
        let mut s = State::default();
        let spec = trainctl_jobs::JobSpec::from_toml(
            "name = \"j\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
            "t.toml",
        )
        .unwrap();
        for at_ms in [1_000, 2_000] {
            let outcome = s.apply(Command::SubmitJob {
                spec: spec.clone(),
                at_ms,
                secret: String::new(),
                resume_from_job: None,
            });
            assert!(matches!(outcome, CommandOutcome::JobSubmitted { .. }));
        }
        // Job 1 cancelled at 5 000; job 2 still queued; job 9 unknown (its state is gone).
        s.apply(Command::CancelJob {
            job: JobId(1),
            at_ms: 5_000,
        });
        let with_logs = [JobId(1), JobId(2), JobId(9)];
        assert_eq!(
            logs_past_retention(&s, &with_logs, 5_500, 1_000),
            [JobId(9)]
        );
        assert_eq!(
            logs_past_retention(&s, &with_logs, 6_000, 1_000),
            [JobId(1), JobId(9)]
        );
    }
}
