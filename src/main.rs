//! `trainctl`: the one binary. It runs the coordinator, the agent, a local cluster (`dev`, `demo`), the
//! built-in example workload, and the command line that talks to the coordinator's REST API.

/// `println!` for text that may hold strings from the network: control characters are escaped
/// ([`render::terminal_safe`]) so that nothing a server or agent sent can drive the terminal.
macro_rules! outln {
    () => { println!() };
    ($($arg:tt)*) => { println!("{}", crate::render::terminal_safe(&format!($($arg)*))) };
}

/// `eprintln!` with the same escaping as [`outln!`].
macro_rules! errln {
    ($($arg:tt)*) => { eprintln!("{}", crate::render::terminal_safe(&format!($($arg)*))) };
}

mod access;
mod client;
mod context;
mod local;
mod preflight;
mod render;
mod run;
mod serve_store;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use trainctl_jobs::JobSpec;

use crate::client::Client;
use crate::local::{LocalCluster, LocalClusterSpec};

#[derive(Parser)]
#[command(
    name = "trainctl",
    version,
    about = "Gang-schedule, launch and supervise distributed training jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct Target {
    /// The coordinator's address (host:port, https://host:port, or http://host:port for an
    /// --insecure one). Default: the current context's server (`trainctl dev` writes one), else
    /// https://127.0.0.1:7470.
    #[arg(long, env = "TRAINCTL_ADDR", global = true)]
    addr: Option<String>,
    /// The API token (`tctl_...`). Default: the context's.
    #[arg(long, env = "TRAINCTL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA certificate (PEM) to trust (the coordinator's <data-dir>/tls/ca.pem).
    /// Default: the context's.
    #[arg(long, env = "TRAINCTL_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Which context of the config file ($TRAINCTL_CONFIG, else ~/.config/trainctl/config.toml)
    /// to use. Default: its current one.
    #[arg(long, env = "TRAINCTL_CONTEXT", global = true)]
    context: Option<String>,
    /// Output format: human-readable text or JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human, global = true)]
    output: Output,
}

impl Target {
    /// The connection flags, environment and context file name.
    fn connection(&self) -> anyhow::Result<context::Connection> {
        let path = context::config_path();
        let file = context::load(&path)?;
        context::resolve(
            &context::Overrides {
                addr: self.addr.clone(),
                token: self.token.clone(),
                ca_cert: self.ca_cert.clone(),
                context: self.context.clone(),
            },
            &file,
            &path,
        )
    }

    /// A REST client of the coordinator this target names.
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.connection()?)
    }

    /// When the coordinators came from a context (no --addr), keeps that context's server list
    /// equal to the members `view` names, so the CLI learns added servers and forgets removed
    /// ones. Says so on stderr when it changed.
    fn learn_members(&self, view: &trainctl_coordinator::api::cluster::ClusterView) {
        if self.addr.is_some() {
            return;
        }
        let path = context::config_path();
        let Ok(file) = context::load(&path) else {
            return;
        };
        let Some(name) = self.context.clone().or(file.current.clone()) else {
            return;
        };
        let Some(existing) = file.contexts.get(&name) else {
            return;
        };
        let scheme = if existing.server.starts_with("http://") {
            "http"
        } else {
            "https"
        };
        let servers: Vec<String> = view
            .members
            .iter()
            .filter(|m| !m.address.is_empty())
            .map(|m| format!("{scheme}://{}", m.address))
            .collect();
        if let Ok(true) = context::update_servers(&path, &name, &servers) {
            errln!(
                "context `{name}` in {} now lists the cluster's coordinators: {}",
                path.display(),
                servers.join(",")
            );
        }
    }
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

/// `trainctl dev`'s data directory when `--data-dir` is left out: `$TMPDIR/trainctl-dev`.
fn default_dev_data_dir() -> PathBuf {
    std::env::temp_dir().join("trainctl-dev")
}

#[derive(Subcommand)]
enum Cmd {
    /// A drop-in for torchrun: `trainctl run [torchrun flags] script.py [args]` (`trainctl run
    /// --help` lists the flags).
    #[command(disable_help_flag = true)]
    Run {
        /// torchrun's flags, the script and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Serve a TCPStore (PyTorch's wire protocol) on its own: a rendezvous point that no rank
    /// hosts; torch connects with `TCPStore(host, port, is_master=False)`.
    Store {
        /// Address to listen on (IP:PORT; port 0 picks a free one).
        #[arg(long, default_value = "0.0.0.0:29500")]
        listen: String,
        /// Most MiB of keys and values kept (per keyspace); a write past it is refused.
        #[arg(long, default_value_t = 1024)]
        max_mib: u64,
        /// Most connections served at once.
        #[arg(long, default_value_t = 65_536)]
        max_connections: usize,
        /// Event-loop threads serving connections (0: one per 4 CPUs of this host, at least 1, at
        /// most 8, leaving the other cores to the clients). 1 is a single loop, as torch's server.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
        threads: u16,
        /// `json`: print the address as one JSON line once listening.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Run the built-in example job end to end on an embedded local cluster.
    Demo {
        /// Hosts (agents) in the embedded cluster.
        #[arg(long, default_value_t = 4)]
        agents: u32,
        /// Keep the cluster's data (logs, state) in this directory instead of a temporary one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `json`: print only a JSON summary (the job, its checksum) at the end.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Kill one host's agent mid-run and show the job resume from its checkpoint on the others
        /// (needs at least 3 agents).
        #[arg(long)]
        chaos: bool,
    },
    /// Keep a local cluster up: a coordinator and N agents acting as N hosts (127.0.0.2, ...).
    Dev {
        /// Hosts (agents) to start: node-1 on 127.0.0.2, node-2 on 127.0.0.3, ...
        #[arg(long, default_value_t = 4)]
        agents: u32,
        /// Coordinators in the Raft group, on consecutive ports from --listen (3 or 5 survive
        /// the loss of 1 or 2).
        #[arg(long, default_value_t = 1)]
        coordinators: u32,
        /// Where the coordinator listens (REST, gRPC and Raft on one port).
        #[arg(long, default_value = "127.0.0.1:7470")]
        listen: String,
        /// Data directory (the coordinator's state, agents' logs); wiped at start unless
        /// --keep-state. The default is `trainctl-dev` in the temporary directory ($TMPDIR).
        #[arg(long, default_value_os_t = default_dev_data_dir())]
        data_dir: PathBuf,
        /// Keep the jobs and logs of a previous run in --data-dir.
        #[arg(long)]
        keep_state: bool,
        /// Declare this many GPUs on every agent (development without GPUs).
        #[arg(long)]
        gpus_per_agent: Option<u32>,
        /// A host not heard from for this long is lost; its jobs are placed again elsewhere.
        /// 4 heartbeats at the default interval of 500 ms.
        #[arg(long, default_value_t = trainctl_coordinator::server::DEFAULT_NODE_TIMEOUT_MS)]
        node_timeout_ms: u64,
        /// `json`: print the cluster's addresses as one JSON line once it is ready.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Plain HTTP and no tokens: anyone who reaches the port controls the cluster.
        #[arg(long)]
        insecure: bool,
        /// The name of the context written to the config file ($TRAINCTL_CONFIG, else
        /// ~/.config/trainctl/config.toml) and made current, so the CLI finds this cluster.
        #[arg(long, default_value = "dev")]
        context_name: String,
    },
    /// Create, list and revoke API and join tokens (admin).
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// The audit trail: the newest changes people made, who made them, and how they ended (admin).
    Audit {
        #[command(flatten)]
        target: Target,
    },
    /// Who the CLI's token is: its name, role and namespace.
    Whoami {
        #[command(flatten)]
        target: Target,
    },
    /// The coordinators of the Raft group: members, roles, the leader, the term, log indices and
    /// each member's lag (`cluster add | remove | transfer-leader` change it; admin).
    Cluster {
        #[command(subcommand)]
        command: Option<ClusterCmd>,
        #[command(flatten)]
        target: Target,
    },
    /// Make a cluster CA, or a certificate signed by one (for operators bringing their own PKI
    /// layout; a coordinator makes its own CA on first start).
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Submit a job file (TOML).
    Submit {
        /// The job spec file.
        file: PathBuf,
        /// Wait for the job to end; exit 0 if it succeeded, 1 otherwise.
        #[arg(long)]
        wait: bool,
        /// With --wait: print the job's output while it runs.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Start from the newest committed checkpoint of this job (its TRAINCTL_RESUME_FROM).
        #[arg(long, value_name = "JOB")]
        resume_from: Option<String>,
        /// The submission's Idempotency-Key (default: a random one). Submitting again with the same
        /// key and spec within a day returns the first job instead of making another; lost answers
        /// are retried with it either way.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List jobs.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show a job: state, size, restarts, every rank, the attempt history and the newest checkpoints.
    Status {
        job: String,
        #[command(flatten)]
        target: Target,
    },
    /// List a job's committed checkpoints, newest first.
    Checkpoints {
        job: String,
        #[command(flatten)]
        target: Target,
    },
    /// Checkpoint commands run inside a job's rank.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCmd,
    },
    /// Print a job's output, each line tagged with host and global rank.
    Logs {
        job: String,
        /// Only this global rank.
        #[arg(long)]
        rank: Option<u32>,
        /// Keep printing new lines until the job ends.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The output of this attempt (0 is the first launch; default: the current or last one).
        #[arg(long)]
        attempt: Option<u32>,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel a job: stop its ranks (SIGTERM, a grace period, SIGKILL) or take it off the queue.
    Cancel {
        job: String,
        /// First send the job's checkpoint signal and wait up to its `[checkpoint] grace` for a
        /// new commit.
        #[arg(long)]
        checkpoint: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List the cluster's hosts and what they hold (`nodes rm NODE` removes one).
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCmd>,
        #[command(flatten)]
        target: Target,
    },
    /// Drain a host: nothing new is placed there, and its jobs checkpoint and move elsewhere.
    Drain {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Undrain a host: it takes new work again.
    Undrain {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Run a coordinator. The first of a cluster starts it (`--bootstrap`, the default for a new
    /// data dir); the others `--join` it. 3 or 5 coordinators survive the loss of 1 or 2.
    Coordinator {
        /// Start a new cluster with this coordinator as its only voter (the default when the
        /// data dir is new and --join is not given).
        #[arg(long, conflicts_with = "join")]
        bootstrap: bool,
        /// Join the cluster of these coordinators (host:port, comma-separated; any one will do).
        /// Needs an admin token of that cluster (--token) and its CA (--ca-cert) on the first
        /// start; later starts find the cluster in --data-dir.
        #[arg(long, value_delimiter = ',', value_name = "ADDR,...")]
        join: Vec<String>,
        /// An admin token of the cluster to join (`<data-dir>/admin.token` of its first
        /// coordinator).
        #[arg(long, env = "TRAINCTL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The CA certificate (PEM) of the cluster to join (its coordinators' <data-dir>/tls/ca.pem).
        #[arg(long, env = "TRAINCTL_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// Where the Raft log, snapshots and job logs are stored.
        #[arg(long, env = "TRAINCTL_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on for REST, gRPC (agents) and Raft.
        #[arg(long, default_value = "0.0.0.0:7470")]
        listen: String,
        /// Address other coordinators reach this one at (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// How often agents heartbeat.
        #[arg(long, default_value_t = 500)]
        heartbeat_interval_ms: u32,
        /// A host not heard from for this long is lost; its jobs are placed again elsewhere.
        /// 4 heartbeats at the default interval of 500 ms.
        #[arg(long, default_value_t = trainctl_coordinator::server::DEFAULT_NODE_TIMEOUT_MS)]
        node_timeout_ms: u64,
        /// SIGTERM-to-SIGKILL grace when stopping ranks.
        #[arg(long, default_value_t = 10_000)]
        stop_grace_ms: u32,
        /// Rank logs of a job are deleted this many days after it ended.
        #[arg(long, default_value_t = 30)]
        log_retention_days: u64,
        /// Finished jobs are forgotten (gone from `jobs`, `status` and the state) this many days
        /// after they ended.
        #[arg(long, default_value_t = 30)]
        job_retention_days: u64,
        /// At most this many finished jobs are kept; beyond it the ones that ended first are
        /// forgotten first. A job still holding resources is never forgotten.
        #[arg(long, default_value_t = trainctl_coordinator::server::DEFAULT_MAX_FINISHED_JOBS)]
        max_finished_jobs: usize,
        /// How often the leader looks for finished jobs to forget (for tests).
        #[arg(long, hide = true, default_value_t = trainctl_coordinator::server::DEFAULT_JOB_SWEEP_MS,
              value_parser = clap::value_parser!(u64).range(100..))]
        job_sweep_ms: u64,
        /// Take a Raft snapshot every this many log entries (half as many are kept behind it for
        /// lagging followers; further behind, a follower catches up from the snapshot).
        #[arg(long, default_value_t = trainctl_coordinator::server::DEFAULT_SNAPSHOT_LOGS,
              value_parser = clap::value_parser!(u64).range(2..))]
        snapshot_logs: u64,
        /// Serve plain HTTP with no authentication: anyone who reaches the port can read and
        /// change everything and join as an agent. Only for a trusted machine.
        #[arg(long)]
        insecure: bool,
        /// The cluster CA certificate (PEM) to use instead of the one made in <data-dir>/tls;
        /// with --tls-ca-key. Every coordinator of a cluster uses the same CA.
        #[arg(long, requires = "tls_ca_key")]
        tls_ca_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-ca-cert; it signs agents' certificates.
        #[arg(long, requires = "tls_ca_cert")]
        tls_ca_key: Option<PathBuf>,
        /// This coordinator's certificate chain (PEM) instead of one the CA signs at start;
        /// with --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Another name (DNS name or IP address) clients reach this coordinator by, for its
        /// certificate (repeatable). The advertise and listen addresses, localhost, 127.0.0.1
        /// and the host name are always in it.
        #[arg(long = "tls-san", value_name = "NAME")]
        tls_sans: Vec<String>,
    },
    /// Run an agent on this host.
    Agent {
        /// The coordinators' addresses, comma-separated: https://host:port (host:port means
        /// https), or http://host:port for --insecure coordinators. Any members of the cluster
        /// will do: the agent finds the leader, learns every member from it (kept in
        /// --data-dir), follows leader changes, and still tries these when none of those answers.
        #[arg(
            long,
            env = "TRAINCTL_COORDINATOR",
            value_delimiter = ',',
            required = true,
            value_name = "ADDR,..."
        )]
        coordinator: Vec<String>,
        /// The cluster CA certificate (PEM): a copy of the coordinator's <data-dir>/tls/ca.pem.
        /// Needed for an https:// coordinator.
        #[arg(long, env = "TRAINCTL_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// A join token (`trainctl token create --role agent`), needed on the first start only:
        /// the agent trades it for its own certificate, kept in --data-dir.
        #[arg(long, env = "TRAINCTL_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
        /// Where rank logs and the process journal are kept.
        #[arg(long, env = "TRAINCTL_DATA_DIR")]
        data_dir: PathBuf,
        /// This host's name in the cluster (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// The IP address other hosts reach this one at (default: the address routing to the coordinator).
        #[arg(long)]
        advertise_addr: Option<IpAddr>,
        /// Declare this many GPUs instead of discovering them (development without GPUs).
        #[arg(long)]
        gpus: Option<u32>,
        /// Ports the coordinator may lease to jobs' rendezvous (MASTER_PORT) on this host.
        #[arg(long, default_value = "29500-29999")]
        port_range: String,
        /// Port of the endpoint this host's ranks commit checkpoints to (TRAINCTL_AGENT_URL); 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        api_port: u16,
        /// Local copies of rank logs (run directories) untouched this many days are deleted.
        #[arg(long, default_value_t = 7)]
        run_retention_days: u64,
        /// Run every rank as this user (its uid, primary gid and supplementary groups; HOME, USER
        /// and LOGNAME follow it unless the job sets them) while the agent itself stays root.
        /// The agent refuses to start if the user does not exist, or if it is not root and USER
        /// is another user. Directories the agent creates for ranks to write (checkpoint dir,
        /// error-file dir) are given to USER; the workdir must be enterable by USER.
        #[arg(long, env = "TRAINCTL_RUN_AS", value_name = "USER")]
        run_as: Option<String>,
        /// Run the whole-host pre-flight checks (`trainctl preflight`'s) again this often, in
        /// seconds, after the run at start; 0: only at start and before each GPU job. A failed
        /// check keeps new work off this host until a later run passes; while the host is
        /// unhealthy the checks run again every 60 s (or this interval, if shorter), also with 0.
        #[arg(long, default_value_t = trainctl_agent::preflight::DEFAULT_INTERVAL.as_secs(), value_name = "SECONDS")]
        preflight_interval: u64,
        #[command(flatten)]
        hardware: HardwareArgs,
    },
    /// Check this host: its GPUs, RDMA devices and libraries (CUDA driver, NCCL, libibverbs),
    /// and whether each GPU copies memory at a plausible rate, NVML reports no retired pages
    /// pending or uncorrectable ECC errors, every RDMA port it requires is ACTIVE and carries a
    /// loopback RDMA write, and an NCCL all-reduce over the GPUs reaches a plausible bus
    /// bandwidth. Runs here, without a cluster. Exit 0 when no check failed (a host without GPU
    /// or RDMA skips them and says so), 1 when one failed, 2 for bad options.
    ///
    /// The RDMA ports required ACTIVE are those named by --rdma-ports; without it, the ports
    /// ACTIVE now, and a port that is not ACTIVE is reported as skipped with a warning (exit 0),
    /// as the agent does with a port that was not ACTIVE at its start.
    Preflight {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
        #[command(flatten)]
        hardware: HardwareArgs,
    },
    /// Internal: started by an agent; kills the agent's ranks when the agent dies.
    #[command(hide = true)]
    AgentReaper {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The built-in example workload (run by agents as a job's command; see jobs/examples/ddp-example.toml).
    #[command(disable_help_flag = true)]
    ExampleTrain {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (shown this once).
    Create {
        /// A name people recognise (`ci`, `alice`); the audit trail shows it.
        #[arg(long)]
        name: Option<String>,
        /// admin (everything), submit (submit, see and cancel jobs), read (see jobs and nodes;
        /// env values hidden), agent (join the cluster as an agent).
        #[arg(long)]
        role: String,
        /// Confine the token to this namespace's jobs.
        #[arg(long)]
        namespace: Option<String>,
        /// How long it works (`1h`, `7d`); forever by default.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a token: it stops working; agents that joined with it lose their identity and
    /// their nodes are drained.
    Revoke {
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a new cluster CA: DIR/ca.pem and DIR/ca.key (0600). Give them to every coordinator
    /// with --tls-ca-cert and --tls-ca-key.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a coordinator (server) certificate signed by the CA in --ca-dir:
    /// OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// The directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The names (DNS names or IP addresses) the certificate is valid for; the first also
        /// names the files.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Where to write the certificate and key (default: --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// Remove a host for good (refused while its agent is up and it is not drained).
    Rm {
        node: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `--join`'s addresses and credentials: host:port is https (http with --insecure).
fn join_target(
    addresses: &[String],
    token: Option<String>,
    ca_cert: Option<&std::path::Path>,
    insecure: bool,
    joined: bool,
) -> anyhow::Result<trainctl_coordinator::membership::ClusterStart> {
    let addresses: Vec<String> = addresses
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.contains("://") {
                a.trim_end_matches('/').to_string()
            } else if insecure {
                format!("http://{a}")
            } else {
                format!("https://{a}")
            }
        })
        .collect();
    if addresses.is_empty() {
        anyhow::bail!(
            "--join needs the address of at least one coordinator of the cluster (host:port)"
        );
    }
    let ca_pem = match ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("read the cluster CA certificate {}", path.display()))?,
        ),
        None => None,
    };
    if !insecure && !joined && (ca_pem.is_none() || token.is_none()) {
        anyhow::bail!(
            "--join needs the cluster's CA certificate (--ca-cert: a copy of <data-dir>/tls/ca.pem of a \
             coordinator there) and an admin token (--token or TRAINCTL_TOKEN: its <data-dir>/admin.token)"
        );
    }
    Ok(trainctl_coordinator::membership::ClusterStart::Join(
        trainctl_coordinator::membership::JoinTarget {
            addresses,
            token,
            ca_pem,
        },
    ))
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Add the coordinator serving at ADDR (started with `coordinator --join`, which adds itself;
    /// this re-adds one that was removed) as a learner, then as a voter once it caught up.
    Add {
        /// Its address, host:port.
        address: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove member ID (a dead server, or one leaving); see `trainctl cluster` for ids.
    Remove {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Hand leadership to voter ID (before maintenance of the leader's host).
    TransferLeader {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Tell trainctl that the checkpoint at PATH is completely written (run inside a rank: uses
    /// TRAINCTL_AGENT_URL and TRAINCTL_JOB_TOKEN). Exits 0 only once the commit is durable.
    Commit {
        /// The checkpoint, inside the job's TRAINCTL_CHECKPOINT_DIR.
        path: String,
        /// The training step it holds.
        #[arg(long)]
        step: u64,
        /// A JSON object recorded with it, e.g. '{"loss": 0.25}'.
        #[arg(long)]
        metrics: Option<String>,
        /// `json`: print the agent's reply as is.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
    },
}

/// The options `trainctl agent` and `trainctl preflight` share: which RDMA ports count, and the
/// libraries to load instead of the loader's search.
#[derive(Args, Clone, Debug)]
struct HardwareArgs {
    /// The RDMA ports this host claims, which the pre-flight requires ACTIVE: DEVICE (every port
    /// of it) or DEVICE:PORT, comma-separated, e.g. mlx5_0:1,mlx5_1:1; each must exist. Default:
    /// the ports ACTIVE when the agent starts (for `preflight`: now); a port that is not ACTIVE
    /// then is reported by the pre-flight, with a warning, but not required.
    #[arg(long, env = "TRAINCTL_RDMA_PORTS", value_name = "DEVICE[:PORT],...")]
    rdma_ports: Option<String>,
    /// RDMA ports this host never claims (a storage NIC training does not use), DEVICE or
    /// DEVICE:PORT, comma-separated; subtracted from the default claim or from --rdma-ports (an
    /// --rdma-ports entry it excludes entirely is an error).
    #[arg(long, env = "TRAINCTL_RDMA_IGNORE", value_name = "DEVICE[:PORT],...")]
    rdma_ignore: Option<String>,
    /// The NCCL library (libnccl.so.2) the pre-flight uses instead of the loader's search, e.g.
    /// PyTorch's .../site-packages/nvidia/nccl/lib/libnccl.so.2. The agent refuses to start (and
    /// `preflight` exits 2) if it does not open as NCCL. Ranks of GPU jobs get
    /// TRAINCTL_NCCL_LIBRARY=PATH unless their job's env sets it.
    #[arg(long, env = "TRAINCTL_NCCL_LIBRARY", value_name = "PATH")]
    nccl_library: Option<PathBuf>,
    /// The libibverbs library (libibverbs.so.1) the pre-flight uses instead of the loader's
    /// search. The agent refuses to start (and `preflight` exits 2) if it does not open as
    /// libibverbs.
    #[arg(long, env = "TRAINCTL_IBVERBS_LIBRARY", value_name = "PATH")]
    ibverbs_library: Option<PathBuf>,
}

impl HardwareArgs {
    /// The library paths, made absolute against `cwd`: ranks start in their job's workdir and
    /// must open the same file.
    fn libraries(&self, cwd: &Path) -> trainctl_agent::preflight::libraries::LibraryPaths {
        trainctl_agent::preflight::libraries::LibraryPaths {
            nccl: self.nccl_library.clone(),
            ibverbs: self.ibverbs_library.clone(),
        }
        .resolved(cwd)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::ExampleTrain { args } = &cli.command {
        // No runtime, no logging setup: this is a training process.
        return ExitCode::from(trainctl_collective::example_train_main(args).clamp(0, 255) as u8);
    }
    if let Cmd::Preflight { output, hardware } = &cli.command {
        init_logging("warn");
        let libraries = hardware.libraries(&std::env::current_dir().unwrap_or_default());
        // Blocking: each probe runs on its own thread with a deadline; no runtime needed.
        return match preflight::command(
            *output,
            hardware.rdma_ports.as_deref(),
            hardware.rdma_ignore.as_deref(),
            &libraries,
        ) {
            Ok(code) => code,
            Err(e) => {
                errln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Checkpoint {
        command:
            CheckpointCmd::Commit {
                path,
                step,
                metrics,
                output,
            },
    } = &cli.command
    {
        // Blocking std HTTP: no runtime needed.
        return checkpoint_commit(path, *step, metrics.as_deref(), *output);
    }
    if matches!(
        cli.command,
        Cmd::Submit { .. }
            | Cmd::List { .. }
            | Cmd::Status { .. }
            | Cmd::Logs { .. }
            | Cmd::Cancel { .. }
            | Cmd::Nodes { .. }
            | Cmd::Checkpoints { .. }
            | Cmd::Drain { .. }
            | Cmd::Undrain { .. }
            | Cmd::Token { .. }
            | Cmd::Audit { .. }
            | Cmd::Whoami { .. }
            | Cmd::Cluster { .. }
            | Cmd::Run { .. }
    ) {
        // Like other Unix tools: `trainctl logs 3 | head` ends quietly when `head` has enough.
        // SAFETY: setting a signal disposition before any thread starts; no handler code runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // The store alone: one event loop (as torch's libuv server) spends no CPU handing connections
    // between threads, which wins where the clients share few cores with it; several serve
    // connections in parallel where the host has cores to spare (benches/README, store_ops).
    let runtime = match &cli.command {
        Cmd::Store { threads, .. } => match store_threads(usize::from(*threads), cpus_here()) {
            1 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
        },
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            errln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The CPUs this process may use.
fn cpus_here() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Most event-loop threads `trainctl store` picks by itself.
const STORE_THREADS_AUTO_MAX: usize = 8;

/// The event-loop threads of `trainctl store`: `asked`, or with 0 one per 4 of the host's `cpus`
/// (at least 1, at most [`STORE_THREADS_AUTO_MAX`]).
fn store_threads(asked: usize, cpus: usize) -> usize {
    if asked > 0 {
        asked
    } else {
        (cpus / 4).clamp(1, STORE_THREADS_AUTO_MAX)
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRAINCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A watch that turns true on SIGINT or SIGTERM.
fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn dispatch(command: Cmd) -> anyhow::Result<ExitCode> {
    match command {
        Cmd::Demo {
            agents,
            data_dir,
            output,
            chaos,
        } => {
            if chaos {
                demo_chaos(agents, data_dir, output).await
            } else {
                demo(agents, data_dir, output).await
            }
        }
        Cmd::Dev {
            agents,
            coordinators,
            listen,
            data_dir,
            keep_state,
            gpus_per_agent,
            node_timeout_ms,
            output,
            insecure,
            context_name,
        } => {
            let spec = LocalClusterSpec {
                agents,
                coordinators,
                data_dir,
                listen,
                gpus_per_agent,
                heartbeat_interval_ms: 500,
                node_timeout_ms,
                insecure,
            };
            dev(spec, keep_state, output, &context_name).await
        }
        Cmd::Run { args } => {
            init_logging("warn");
            run::launch::main(args).await
        }
        Cmd::Store {
            listen,
            max_mib,
            max_connections,
            threads,
            output,
        } => {
            init_logging("warn");
            let threads = store_threads(usize::from(threads), cpus_here());
            serve_store::serve(&listen, max_mib, max_connections, threads, output).await
        }
        Cmd::Token { command } => access::token(command).await,
        Cmd::Audit { target } => access::audit(&target).await,
        Cmd::Whoami { target } => access::whoami(&target).await,
        Cmd::Cluster {
            command: Some(command),
            ..
        } => {
            let (target, view) = match command {
                ClusterCmd::Add { address, target } => {
                    let view = target.client()?.add_member(&address).await?;
                    (target, view)
                }
                ClusterCmd::Remove { id, target } => {
                    let view = target.client()?.remove_member(id).await?;
                    (target, view)
                }
                ClusterCmd::TransferLeader { id, target } => {
                    let view = target.client()?.transfer_leader(id).await?;
                    (target, view)
                }
            };
            target.learn_members(&view);
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&view)?),
                Output::Human => print!("{}", render::cluster(&view)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster {
            command: None,
            target,
        } => {
            let view = target.client()?.cluster().await?;
            target.learn_members(&view);
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&view)?),
                Output::Human => print!("{}", render::cluster(&view)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ca { command } => access::ca(command),
        Cmd::Submit {
            file,
            wait,
            follow,
            resume_from,
            idempotency_key,
            target,
        } => {
            submit(
                &file,
                wait,
                follow,
                resume_from.as_deref(),
                idempotency_key,
                &target,
            )
            .await
        }
        Cmd::List { target } => {
            let jobs = target.client()?.list().await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&jobs)?),
                Output::Human => print!("{}", render::job_table(&jobs)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { job, target } => {
            let client = target.client()?;
            match target.output {
                // The coordinator's JSON as it is, so nothing it adds is dropped.
                Output::Json => {
                    let detail = client.job_json(&job).await?;
                    outln!("{}", serde_json::to_string_pretty(&detail)?)
                }
                Output::Human => print!("{}", render::job_detail(&client.job(&job).await?)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoints { job, target } => {
            let checkpoints = target.client()?.checkpoints(&job).await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&checkpoints)?),
                Output::Human => print!("{}", render::checkpoint_table(&checkpoints)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint { .. } => unreachable!("handled before the runtime starts"),
        Cmd::Logs {
            job,
            rank,
            follow,
            attempt,
            target,
        } => {
            let client = target.client()?;
            let detail = client.job(&job).await?;
            if let Some(a) = attempt {
                if !detail.attempts.iter().any(|r| r.attempt == a) && a != detail.attempt {
                    let known: Vec<String> = detail
                        .attempts
                        .iter()
                        .map(|r| r.attempt.to_string())
                        .collect();
                    bail!(
                        "job {job} has no attempt {a}; its attempts: {}",
                        if known.is_empty() {
                            "none yet".to_string()
                        } else {
                            known.join(", ")
                        }
                    );
                }
            }
            let logs = LogsQuery {
                rank,
                attempt,
                follow,
            };
            follow_logs(&client, &job, &logs, target.output, |_| true).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel {
            job,
            checkpoint,
            target,
        } => {
            let client = target.client()?;
            let before = if checkpoint {
                Some(client.job(&job).await?)
            } else {
                None
            };
            if let Some(d) = &before {
                let live = matches!(d.summary.state.as_str(), "starting" | "running");
                if target.output == Output::Human && live {
                    match d.spec.checkpoint.as_ref().and_then(|c| c.signal.as_deref()) {
                        Some(signal) => errln!(
                            "sending {signal} to job {job}'s ranks and waiting up to {:.0}s for a checkpoint commit",
                            d.spec.checkpoint.as_ref().map_or(0, |c| c.grace_ms) as f64 / 1000.0
                        ),
                        None => errln!(
                            "job {job} has no `[checkpoint] signal`: cancelling without waiting for a checkpoint"
                        ),
                    }
                }
            }
            let detail = client.cancel(&job, checkpoint).await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&detail)?),
                Output::Human => {
                    let newer = before.as_ref().and_then(|b| {
                        let last = |d: &trainctl_coordinator::api::JobDetail| {
                            d.checkpoints
                                .last()
                                .map(|c| (c.path.clone(), c.committed_at_ms))
                        };
                        detail
                            .checkpoints
                            .last()
                            .filter(|_| last(&detail) != last(b))
                    });
                    match (checkpoint, newer) {
                        (true, Some(c)) => outln!(
                            "job {} cancelled after committing checkpoint step {} ({})",
                            detail.summary.id,
                            c.step,
                            c.path
                        ),
                        (true, None) => outln!(
                            "job {} cancelled (no new checkpoint was committed{})",
                            detail.summary.id,
                            match detail.checkpoints.last() {
                                Some(c) => format!("; the newest is step {} ({})", c.step, c.path),
                                None => String::new(),
                            }
                        ),
                        (false, _) => outln!("job {} cancelled", detail.summary.id),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nodes {
            command: Some(NodesCmd::Rm { node, target }),
            ..
        } => {
            target.client()?.remove_node(&node).await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::json!({ "removed": node })),
                Output::Human => outln!("node {node} removed"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nodes {
            command: None,
            target,
        } => {
            let nodes = target.client()?.nodes().await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&nodes)?),
                Output::Human => print!("{}", render::node_table(&nodes)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Drain { node, target } => set_drained(&node, true, &target).await,
        Cmd::Undrain { node, target } => set_drained(&node, false, &target).await,
        Cmd::Coordinator {
            bootstrap: _,
            join,
            token,
            ca_cert,
            data_dir,
            listen,
            advertise,
            heartbeat_interval_ms,
            node_timeout_ms,
            stop_grace_ms,
            log_retention_days,
            job_retention_days,
            max_finished_jobs,
            job_sweep_ms,
            snapshot_logs,
            insecure,
            tls_ca_cert,
            tls_ca_key,
            tls_cert,
            tls_key,
            tls_sans,
        } => {
            init_logging("info,openraft=warn");
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("listen on {listen}"))?;
            let advertise = advertise.unwrap_or_else(|| {
                listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| listen.clone())
            });
            let mut config =
                trainctl_coordinator::server::CoordinatorConfig::new(data_dir, advertise);
            config.heartbeat_interval_ms = heartbeat_interval_ms;
            config.node_timeout_ms = node_timeout_ms;
            config.stop_grace_ms = stop_grace_ms;
            config.log_retention_ms = log_retention_days.saturating_mul(24 * 3600 * 1000);
            config.job_retention = trainctl_coordinator::state::retention::JobRetention {
                max_age_ms: job_retention_days.saturating_mul(24 * 3600 * 1000),
                max_finished: max_finished_jobs,
            };
            config.job_sweep_ms = job_sweep_ms;
            config.snapshot_logs = snapshot_logs;
            config.secure = !insecure;
            config.tls = trainctl_coordinator::server::TlsSources {
                ca: tls_ca_cert.zip(tls_ca_key),
                server: tls_cert.zip(tls_key),
                names: tls_sans,
            };
            // Once the data dir holds a cluster, --join is only a check of the cluster's id.
            let joined = config
                .data_dir
                .join(trainctl_coordinator::membership::SERVER_FILE)
                .exists();
            if !join.is_empty() {
                config.start = join_target(&join, token, ca_cert.as_deref(), insecure, joined)?;
            }
            if insecure {
                errln!(
                    "WARNING: --insecure: plain HTTP and no authentication. Anyone who can reach {listen} \
                     can read and change every job, join as an agent and receive jobs' secrets."
                );
            }
            let shutdown = shutdown_on_signals()?;
            let coordinator = trainctl_coordinator::server::open(config).await?;
            trainctl_coordinator::server::run(coordinator, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent {
            coordinator,
            ca_cert,
            join_token,
            data_dir,
            name,
            advertise_addr,
            gpus,
            port_range,
            api_port,
            run_retention_days,
            run_as,
            preflight_interval,
            hardware,
        } => {
            init_logging("info");
            let port_range = parse_port_range(&port_range)?;
            let rdma_ports = trainctl_agent::preflight::ports::PortOptions::parse(
                hardware.rdma_ports.as_deref(),
                hardware.rdma_ignore.as_deref(),
            )?;
            let coordinator_urls: Vec<String> = coordinator
                .iter()
                .map(|c| c.trim())
                .filter(|c| !c.is_empty())
                .map(context::server_url)
                .collect();
            let coordinator_url = coordinator_urls.join(",");
            let tls = match (coordinator_url.starts_with("https://"), ca_cert) {
                (true, Some(ca_cert)) => Some(trainctl_agent::identity::AgentTlsConfig {
                    ca_cert,
                    join_token,
                }),
                (true, None) => bail!(
                    "--coordinator {coordinator_url} speaks TLS: give the cluster CA with --ca-cert \
                     (a copy of the coordinator's <data-dir>/tls/ca.pem), or use http://... for an \
                     --insecure coordinator"
                ),
                (false, _) => {
                    errln!("WARNING: {coordinator_url} is plain HTTP: this agent's traffic (jobs, their env and logs) is neither encrypted nor authenticated");
                    None
                }
            };
            let config = trainctl_agent::AgentConfig {
                coordinator_urls,
                tls,
                node_name: name,
                advertise_addr,
                data_dir,
                declared_gpus: gpus,
                port_range,
                self_exe: std::env::current_exe().context("find this program's path")?,
                api_port,
                run_retention: std::time::Duration::from_secs(
                    run_retention_days.saturating_mul(24 * 3600),
                ),
                run_as,
                preflight_interval: std::time::Duration::from_secs(preflight_interval),
                rdma_ports,
                libraries: hardware
                    .libraries(&std::env::current_dir().context("find the working directory")?),
            };
            let shutdown = shutdown_on_signals()?;
            trainctl_agent::run(config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::AgentReaper { data_dir } => {
            trainctl_agent::reaper_main(&data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ExampleTrain { .. } | Cmd::Preflight { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

async fn set_drained(node: &str, drained: bool, target: &Target) -> anyhow::Result<ExitCode> {
    if drained && target.output == Output::Human {
        errln!("draining {node}: its jobs checkpoint (up to their grace) and are placed again elsewhere");
    }
    let view = target.client()?.set_drained(node, drained).await?;
    match target.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&view)?),
        Output::Human if drained => outln!(
            "node {} drained: nothing new is placed there{}",
            view.name,
            if view.jobs.is_empty() {
                String::new()
            } else {
                format!(" (still releasing: {})", view.jobs.join(", "))
            }
        ),
        Output::Human => outln!("node {} undrained: it takes new work again", view.name),
    }
    Ok(ExitCode::SUCCESS)
}

/// `trainctl checkpoint commit`: the rank side of the checkpoint contract, from a shell.
fn checkpoint_commit(path: &str, step: u64, metrics: Option<&str>, output: Output) -> ExitCode {
    if let Some(m) = metrics {
        match serde_json::from_str::<serde_json::Value>(m) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => {
                errln!(
                    "error: --metrics `{m}` is not a JSON object: write one such as '{{\"loss\": 0.25}}'"
                );
                return ExitCode::from(2);
            }
        }
    }
    match trainctl_collective::commit_from_env(path, step, metrics) {
        Ok(reply) => {
            match output {
                Output::Json => outln!("{}", reply.trim()),
                Output::Human => {
                    let pruned: Vec<String> = serde_json::from_str::<serde_json::Value>(&reply)
                        .ok()
                        .and_then(|v| v.get("pruned").cloned())
                        .and_then(|p| serde_json::from_value(p).ok())
                        .unwrap_or_default();
                    outln!("committed checkpoint step {step}: {path}");
                    if !pruned.is_empty() {
                        outln!("deleted older checkpoints (`keep`): {}", pruned.join(", "));
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(trainctl_collective::CheckpointError::Rejected { status, body }) => {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(body);
            errln!("error: the agent refused the commit of {path} (HTTP {status}): {message}");
            ExitCode::FAILURE
        }
        Err(e) => {
            errln!("error: commit {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_port_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let parsed = text
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((lo, hi)) if lo > 0 && lo <= hi => Ok((lo, hi)),
        _ => bail!("--port-range `{text}` is not a port range: write LOW-HIGH with 1 <= LOW <= HIGH <= 65535, e.g. 29500-29999"),
    }
}

/// Reads and checks a job file, and makes its workdir absolute (relative to the file).
fn load_spec(file: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read job file {}", file.display()))?;
    let mut spec = JobSpec::from_toml(&text, &file.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("find the directory of {}", file.display()))?;
    spec.resolve_workdir(&dir);
    if let Some(workdir) = &spec.launch.workdir {
        if !Path::new(workdir).is_dir() {
            bail!(
                "{}: launch.workdir: directory {workdir} does not exist (a relative workdir is taken from the job file's directory)",
                file.display()
            );
        }
    }
    Ok(spec)
}

async fn submit(
    file: &Path,
    wait: bool,
    follow: bool,
    resume_from: Option<&str>,
    idempotency_key: Option<String>,
    target: &Target,
) -> anyhow::Result<ExitCode> {
    if let Some(problem) = idempotency_key
        .as_deref()
        .and_then(trainctl_coordinator::state::idempotency_key_problem)
    {
        bail!("--idempotency-key: {problem}");
    }
    let key = idempotency_key.unwrap_or_else(trainctl_coordinator::api::new_idempotency_key);
    let spec = load_spec(file)?;
    let client = target.client()?;
    let submitted = client.submit(&spec, resume_from, &key, say_retry).await;
    let id = submitted.with_context(|| {
        if let Some(other) = resume_from {
            format!("submit {} to resume from job {other}", file.display())
        } else {
            format!("submit {}", file.display())
        }
    })?;
    match target.output {
        Output::Json if !wait => outln!("{}", serde_json::json!({ "id": id })),
        Output::Json => {}
        // The result on stdout (scripts capture it), progress on stderr, as kubectl does.
        Output::Human => match resume_from {
            Some(other) => outln!(
                "submitted job {id} ({}), starting from job {other}'s newest checkpoint",
                spec.name
            ),
            None => outln!("submitted job {id} ({})", spec.name),
        },
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let detail = if follow {
        follow_logs(&client, &id, &LogsQuery::follow(), Output::Human, |_| true).await?;
        client.job(&id).await?
    } else {
        wait_for_end(&client, &id, target.output == Output::Human).await?
    };
    match target.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&detail)?),
        Output::Human => print!("{}", render::job_detail(&detail)),
    }
    Ok(if detail.summary.state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Says on stderr that a submission is sent again, and why.
fn say_retry(why: &str, delay: Duration) {
    errln!(
        "submit: no answer yet ({why}); trying again in {:.1}s with the same idempotency key",
        delay.as_secs_f64()
    );
}

const POLL_INTERVAL: Duration = Duration::from_millis(250);

async fn wait_for_end(
    client: &Client,
    id: &str,
    narrate: bool,
) -> anyhow::Result<trainctl_coordinator::api::JobDetail> {
    let mut last_state = String::new();
    loop {
        let detail = client.job(id).await?;
        if narrate && detail.summary.state != last_state {
            errln!("job {id}: {}", render::state_line(&detail));
            last_state = detail.summary.state.clone();
        }
        if matches!(
            detail.summary.state.as_str(),
            "succeeded" | "failed" | "cancelled"
        ) {
            return Ok(detail);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Which output of a job to print.
struct LogsQuery {
    /// Only this global rank.
    rank: Option<u32>,
    /// This attempt (default: the current or last one).
    attempt: Option<u32>,
    /// Keep going until the job has ended and every line is out.
    follow: bool,
}

impl LogsQuery {
    fn follow() -> Self {
        LogsQuery {
            rank: None,
            attempt: None,
            follow: true,
        }
    }
}

/// Prints a job's output; with `follow`, keeps going until the job has ended and every line is out.
async fn follow_logs(
    client: &Client,
    id: &str,
    q: &LogsQuery,
    output: Output,
    show: impl Fn(&trainctl_coordinator::api::LogLine) -> bool,
) -> anyhow::Result<()> {
    let (rank, follow) = (q.rank, q.follow);
    let mut cursor = String::new();
    let mut last_state = String::new();
    loop {
        let page = client.logs(id, rank, q.attempt, &cursor).await?;
        for line in page.lines.iter().filter(|l| show(l)) {
            match output {
                Output::Json => outln!("{}", serde_json::to_string(line)?),
                Output::Human => println!(
                    "[{} rank {}] {}",
                    render::terminal_safe(&line.node),
                    line.rank,
                    line.text
                ),
            }
        }
        cursor = page.cursor;
        if page.complete || (!follow && page.lines.is_empty()) {
            return Ok(());
        }
        if follow && page.lines.is_empty() {
            if output == Output::Human {
                let detail = client.job(id).await?;
                if detail.summary.state != last_state {
                    errln!("job {id}: {}", render::state_line(&detail));
                    last_state = detail.summary.state.clone();
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

async fn dev(
    spec: LocalClusterSpec,
    keep_state: bool,
    output: Output,
    context_name: &str,
) -> anyhow::Result<ExitCode> {
    let data_dir = spec.data_dir.clone();
    // Check the address before touching the data: it may be another running cluster's.
    local::ensure_address_free(&spec.listen)?;
    if !keep_state {
        local::clear_data_dir(&data_dir)?;
    }
    let mut shutdown = shutdown_on_signals()?;
    let mut cluster = LocalCluster::start(&spec).await?;
    let config_path = context::config_path();
    if !spec.insecure {
        context::save(&config_path, context_name, cluster.context())?;
    }
    if output == Output::Json {
        let agents: Vec<_> = cluster
            .agents
            .iter()
            .map(|(name, ip)| serde_json::json!({ "name": name, "address": ip.to_string() }))
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "coordinator": cluster.coordinator_urls[0],
                "coordinators": cluster.coordinator_urls,
                "data_dir": data_dir,
                "agents": agents,
                "context": (!spec.insecure).then_some(context_name),
                "config": (!spec.insecure).then_some(&config_path),
                "ca_cert": cluster.credentials.as_ref().map(|c| &c.ca_cert),
                "admin_token_file": cluster.credentials.as_ref().map(|c| &c.token_file),
            })
        );
    } else {
        print_dev_banner(
            &cluster,
            &data_dir,
            (!spec.insecure).then_some((context_name, config_path.as_path())),
        );
    }
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    errln!("stopping the local cluster");
    cluster.stop();
    Ok(ExitCode::SUCCESS)
}

fn print_dev_banner(cluster: &LocalCluster, data_dir: &Path, context: Option<(&str, &Path)>) {
    outln!(
        "trainctl dev: coordinator at {} (REST API, docs at {}/docs)",
        cluster.coordinator_urls[0],
        cluster.coordinator_urls[0]
    );
    for (i, url) in cluster.coordinator_urls.iter().enumerate().skip(1) {
        outln!("  coordinator {} at {url}", i + 1);
    }
    for (name, ip) in &cluster.agents {
        outln!("  agent {name} on {ip}");
    }
    outln!("  data and process logs in {}", data_dir.display());
    match (context, &cluster.credentials) {
        (Some((name, path)), Some(creds)) => {
            outln!(
                "  TLS and tokens on: the CLI uses context `{name}` in {} (CA {}, admin token in {})",
                path.display(),
                creds.ca_cert.display(),
                creds.token_file.display()
            );
            outln!("Try:  trainctl submit jobs/examples/ddp-example.toml --wait");
        }
        _ => {
            outln!("  INSECURE: plain HTTP, no tokens: anyone who reaches the port controls the cluster");
            outln!(
                "Try:  trainctl submit jobs/examples/ddp-example.toml --wait --addr {}",
                cluster.coordinator_url
            );
        }
    }
    outln!("Press Ctrl-C to stop.");
}

/// The demo's job: the built-in workload on every host of the embedded cluster.
fn demo_spec(agents: u32) -> anyhow::Result<JobSpec> {
    const EXAMPLE: &str = include_str!("../jobs/examples/ddp-example.toml");
    let mut spec = JobSpec::from_toml(EXAMPLE, "jobs/examples/ddp-example.toml")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Exactly one host per agent: the example's `nodes = 2` parsed to min_nodes 2 as well, and
    // changing only the maximum would make the demo an elastic 2:N job.
    spec.resources.nodes = agents;
    spec.resources.min_nodes = agents;
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
}

async fn demo(agents: u32, data_dir: Option<PathBuf>, output: Output) -> anyhow::Result<ExitCode> {
    let human = output == Output::Human;
    let say = |text: String| {
        if human {
            outln!("{text}");
        }
    };
    let temporary = data_dir.is_none();
    let data_dir = match data_dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    let started = Instant::now();
    let listen = format!("127.0.0.1:{}", local::free_local_port()?);
    say(format!(
        "[demo] starting an embedded cluster: a coordinator on {listen} and {agents} agents on 127.0.0.2..127.0.0.{}",
        agents + 1
    ));
    let spec = LocalClusterSpec {
        agents,
        coordinators: 1,
        data_dir: data_dir.clone(),
        listen,
        gpus_per_agent: None,
        heartbeat_interval_ms: 200,
        node_timeout_ms: 10_000,
        insecure: false,
    };
    let cluster = LocalCluster::start(&spec).await?;
    let client = cluster.client()?;
    let nodes = client.nodes().await?;
    say(format!(
        "[demo] {} hosts up in {:.1}s:",
        nodes.len(),
        started.elapsed().as_secs_f64()
    ));
    if human {
        print!("{}", render::node_table(&nodes));
    }

    let spec = demo_spec(agents)?;
    let id = client
        .submit(
            &spec,
            None,
            &trainctl_coordinator::api::new_idempotency_key(),
            say_retry,
        )
        .await?;
    say(format!(
        "[demo] submitted job {id} `{}`: {} x {}, command {:?}",
        spec.name,
        render::count(spec.resources.nodes, "host"),
        render::count(spec.resources.procs_per_node, "rank"),
        spec.launch.command
    ));
    let detail = if human {
        // Rank 0's progress, and every rank's final line.
        follow_logs(&client, &id, &LogsQuery::follow(), Output::Human, |l| {
            l.rank == 0 || l.text.contains("checksum")
        })
        .await?;
        client.job(&id).await?
    } else {
        wait_for_end(&client, &id, false).await?
    };
    if human {
        print!("{}", render::job_detail(&detail));
    }
    let page = client.logs(&id, None, None, "").await?;
    let mut checksums: Vec<String> = page
        .lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("final checksum "))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    checksums.sort_unstable();
    checksums.dedup();
    drop(cluster);
    let succeeded = detail.summary.state == "succeeded" && checksums.len() == 1;
    if !human {
        outln!(
            "{}",
            serde_json::json!({ "succeeded": succeeded, "checksums": checksums, "job": detail })
        );
    } else if succeeded {
        say(format!(
            "[demo] job {id} succeeded: {} ranks on {} hosts trained in lockstep and agree on checksum {} ({:.1}s in all)",
            detail.summary.world_size,
            detail.summary.nodes,
            checksums[0],
            started.elapsed().as_secs_f64()
        ));
        say("[demo] next: `trainctl dev` keeps a cluster up; see README.md".to_string());
    } else {
        say(format!(
            "[demo] job {id} ended {} (checksums seen: {:?}); cluster logs are in {}",
            detail.summary.state,
            checksums,
            data_dir.display()
        ));
    }
    if succeeded && temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trainctl-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The chaos demo's training run: long enough (about 5 s) to lose a host mid-run.
const CHAOS_STEPS: u32 = 60;
const CHAOS_SEED: u64 = 7;
const CHAOS_STEP_DELAY_MS: u64 = 80;
/// How long the chaos demo waits for its job before giving up.
const CHAOS_TIMEOUT: Duration = Duration::from_secs(180);

/// The chaos demo's job: the built-in workload, elastic over 2 to `agents` hosts, checkpointing
/// every 10 steps under `checkpoint_dir`, with a budget of 2 restarts.
fn chaos_spec(agents: u32, checkpoint_dir: &Path) -> anyhow::Result<JobSpec> {
    let dir = serde_json::to_string(&format!("{}/{{job}}", checkpoint_dir.display()))?;
    let toml = format!(
        r#"name = "chaos-example"

[launch]
command = ["trainctl", "example-train", "--steps", "{CHAOS_STEPS}", "--seed", "{CHAOS_SEED}",
           "--step-delay-ms", "{CHAOS_STEP_DELAY_MS}", "--checkpoint-every", "10"]

[resources]
nodes = "2:{agents}"
procs_per_node = 1

[failure]
max_restarts = 2
hang_timeout = "30s"

[checkpoint]
dir = {dir}
signal = "SIGUSR1"
grace = "10s"
keep = 3
"#
    );
    JobSpec::from_toml(&toml, "chaos demo job").map_err(|e| anyhow::anyhow!("{e}"))
}

/// A world of one rank: the reference run of the chaos demo, in this process.
struct SoloRank;

impl trainctl_collective::Collective for SoloRank {
    fn rank(&self) -> u32 {
        0
    }
    fn world_size(&self) -> u32 {
        1
    }
    fn all_reduce_sum_f32(
        &mut self,
        _: &mut [f32],
    ) -> Result<(), trainctl_collective::CollectiveError> {
        Ok(())
    }
    fn all_reduce_sum_i64(
        &mut self,
        _: &mut [i64],
    ) -> Result<(), trainctl_collective::CollectiveError> {
        Ok(())
    }
    fn broadcast_f32(
        &mut self,
        _: &mut [f32],
        _: u32,
    ) -> Result<(), trainctl_collective::CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), trainctl_collective::CollectiveError> {
        Ok(())
    }
}

/// The checksum an uninterrupted run of the chaos job ends with (any world size gives the same).
fn chaos_reference_checksum() -> anyhow::Result<String> {
    let cfg = trainctl_collective::TrainConfig {
        steps: CHAOS_STEPS,
        seed: CHAOS_SEED,
        ..Default::default()
    };
    let summary = trainctl_collective::example_train(&cfg, &mut SoloRank, &mut std::io::sink())
        .context("the uninterrupted reference run")?;
    Ok(format!("{:#018x}", summary.checksum))
}

/// Every line of one attempt's output (of one rank, or all).
async fn all_log_lines(
    client: &Client,
    id: &str,
    rank: Option<u32>,
    attempt: Option<u32>,
) -> anyhow::Result<Vec<trainctl_coordinator::api::LogLine>> {
    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client.logs(id, rank, attempt, &cursor).await?;
        if page.lines.is_empty() {
            return Ok(lines);
        }
        lines.extend(page.lines);
        cursor = page.cursor;
    }
}

/// The step of the newest `step N/M ...` line.
fn last_step(lines: &[trainctl_coordinator::api::LogLine]) -> Option<u32> {
    lines.iter().rev().find_map(|l| {
        l.text
            .strip_prefix("step ")
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.trim().parse().ok())
    })
}

/// `trainctl demo --chaos`: a checkpointing elastic job loses a host mid-run and finishes on the
/// others from its checkpoint, with the checksum of an uninterrupted run.
async fn demo_chaos(
    agents: u32,
    data_dir: Option<PathBuf>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    if agents < 3 {
        bail!("--chaos needs at least 3 agents (the job runs on 2 to N hosts and one is killed), got --agents {agents}");
    }
    let human = output == Output::Human;
    let say = |text: String| {
        if human {
            outln!("{text}");
        }
    };
    let temporary = data_dir.is_none();
    let data_dir = match data_dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    let started = Instant::now();
    let listen = format!("127.0.0.1:{}", local::free_local_port()?);
    let spec = LocalClusterSpec {
        agents,
        coordinators: 1,
        data_dir: data_dir.clone(),
        listen: listen.clone(),
        gpus_per_agent: None,
        // A lost host is noticed within 2 s.
        heartbeat_interval_ms: 250,
        node_timeout_ms: 2_000,
        insecure: false,
    };
    say(format!(
        "[demo] starting an embedded cluster: a coordinator on {listen} and {agents} agents on 127.0.0.2..127.0.0.{} (a host not heard from for {:.0}s is lost)",
        agents + 1,
        spec.node_timeout_ms as f64 / 1000.0
    ));
    let mut cluster = LocalCluster::start(&spec).await?;
    let client = cluster.client()?;
    let checkpoint_dir = data_dir.join("checkpoints");
    let job_spec = chaos_spec(agents, &checkpoint_dir)?;
    let id = client
        .submit(
            &job_spec,
            None,
            &trainctl_coordinator::api::new_idempotency_key(),
            say_retry,
        )
        .await?;
    say(format!(
        "[demo] submitted job {id} `{}`: 2:{agents} hosts (elastic), max_restarts 2, a checkpoint every 10 steps into {}/{id}, command {:?}",
        job_spec.name,
        checkpoint_dir.display(),
        job_spec.launch.command
    ));

    let mut last_state = String::new();
    let mut announced_start = std::collections::BTreeSet::new();
    let mut announced_end = std::collections::BTreeSet::new();
    let mut newest_checkpoint: Option<(u64, u64)> = None;
    let mut killed: Option<serde_json::Value> = None;
    let deadline = Instant::now() + CHAOS_TIMEOUT;
    let detail = loop {
        let d = client.job(&id).await?;
        if d.summary.state != last_state {
            say(format!("[demo] job {id}: {}", render::state_line(&d)));
            last_state = d.summary.state.clone();
        }
        for a in &d.attempts {
            if let Some(end) = &a.end {
                if announced_end.insert(a.attempt) {
                    say(format!(
                        "[demo] attempt {} ended: {}",
                        a.attempt,
                        render::indent_rest(end, "    ")
                    ));
                }
            }
            if a.ended_at_ms.is_none() && announced_start.insert(a.attempt) {
                say(format!(
                    "[demo] attempt {} runs on {} (world size {})",
                    a.attempt,
                    a.nodes.join(", "),
                    a.world_size
                ));
            }
        }
        for c in &d.checkpoints {
            let key = (c.committed_at_ms, c.step);
            if newest_checkpoint.is_none_or(|n| key > n) {
                say(format!(
                    "[demo] checkpoint step {} committed by attempt {}: {}",
                    c.step, c.attempt, c.path
                ));
                newest_checkpoint = Some(key);
            }
        }
        if killed.is_none() && !d.checkpoints.is_empty() && d.summary.state == "running" {
            // A host that runs ranks, but not rank 0's: the job has to carry on without it.
            if let Some(victim) = d
                .allocation
                .iter()
                .filter(|a| !a.released && a.group_rank > 0)
                .min_by_key(|a| a.group_rank)
            {
                // Output arrives in batches: the newest checkpoint may be ahead of it.
                let step = last_step(&all_log_lines(&client, &id, Some(0), None).await?)
                    .map(u64::from)
                    .max(d.checkpoints.last().map(|c| c.step));
                let pid = cluster.kill_agent(&victim.node)?;
                say(format!(
                    "[demo] killed the agent of {} (host {}, pid {pid}) at step {}: SIGKILL, its ranks die with it",
                    victim.node,
                    victim.address,
                    step.map_or("?".to_string(), |s| s.to_string())
                ));
                killed = Some(serde_json::json!({
                    "node": victim.node, "address": victim.address, "pid": pid, "step": step,
                }));
            }
        }
        if matches!(
            d.summary.state.as_str(),
            "succeeded" | "failed" | "cancelled"
        ) {
            break d;
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} did not end within {}s (state {}); cluster logs are in {}",
                CHAOS_TIMEOUT.as_secs(),
                d.summary.state,
                data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let last_attempt = detail.attempts.last().map(|a| a.attempt);
    let lines = all_log_lines(&client, &id, None, last_attempt).await?;
    let mut checksums: Vec<String> = lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("final checksum "))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    checksums.sort_unstable();
    checksums.dedup();
    let reference = chaos_reference_checksum()?;
    if human {
        for l in lines.iter().filter(|l| l.text.starts_with("resumed from")) {
            println!(
                "[{} rank {}] {}",
                render::terminal_safe(&l.node),
                l.rank,
                l.text
            );
        }
        outln!(
            "[demo] attempt history (restarts {}/{}):",
            detail.restarts,
            detail.max_restarts
        );
        print!("{}", render::attempt_table(&detail.attempts));
    }
    drop(cluster);
    let resumed = detail.attempts.len() > 1;
    let succeeded = detail.summary.state == "succeeded"
        && killed.is_some()
        && resumed
        && checksums.len() == 1
        && checksums[0] == reference;
    if !human {
        outln!(
            "{}",
            serde_json::json!({
                "succeeded": succeeded,
                "killed": killed,
                "checksums": checksums,
                "reference_checksum": reference,
                "job": detail,
            })
        );
    } else if succeeded {
        say(format!(
            "[demo] job {id} succeeded after losing a host: final checksum {} on all {} ranks equals the uninterrupted run's {reference} ({:.1}s in all)",
            checksums[0],
            detail.attempts.last().map_or(0, |a| a.world_size),
            started.elapsed().as_secs_f64()
        ));
    } else {
        say(format!(
            "[demo] chaos demo failed: job {id} ended {}{}; checksums seen {:?}, uninterrupted run {reference}{}; cluster logs are in {}",
            detail.summary.state,
            detail
                .summary
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            checksums,
            if killed.is_none() {
                "; no agent was killed (the job ended before its first checkpoint)"
            } else if !resumed {
                "; the job never restarted"
            } else {
                ""
            },
            data_dir.display()
        ));
    }
    if succeeded && temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_picks_one_event_loop_per_four_cpus() {
        // (asked, cpus) -> threads
        let cases = [
            ((0, 1), 1),
            ((0, 2), 1),
            ((0, 7), 1),
            ((0, 8), 2),
            ((0, 16), 4),
            ((0, 256), STORE_THREADS_AUTO_MAX),
            ((1, 64), 1),
            ((3, 2), 3),
        ];
        for ((asked, cpus), want) in cases {
            assert_eq!(
                store_threads(asked, cpus),
                want,
                "asked {asked}, {cpus} CPUs"
            );
        }
    }

    #[test]
    fn the_chaos_job_is_elastic_and_checkpoints_inside_the_data_dir() {
        let spec = chaos_spec(4, Path::new("/tmp/demo/checkpoints")).unwrap();
        assert_eq!(spec.resources.node_range(), (2, 4));
        assert_eq!(spec.failure.max_restarts, 2);
        let checkpoint = spec.checkpoint.expect("a [checkpoint] table");
        assert_eq!(checkpoint.dir, "/tmp/demo/checkpoints/{job}");
        assert_eq!(checkpoint.signal.as_deref(), Some("SIGUSR1"));
    }

    #[test]
    fn the_reference_run_is_deterministic() {
        // The value a 4-host run that lost a host mid-run ended with (`demo --chaos`).
        assert_eq!(chaos_reference_checksum().unwrap(), "0x27d179672376135b");
    }

    #[test]
    fn last_step_reads_the_newest_step_line() {
        let line = |text: &str| trainctl_coordinator::api::LogLine {
            rank: 0,
            node: "node-1".into(),
            text: text.into(),
        };
        let lines = vec![
            line("step 8/60 loss 0.1"),
            line("step 9/60 loss 0.1"),
            line("checkpoint step 10 committed: /x/step-10"),
        ];
        assert_eq!(last_step(&lines), Some(9));
        assert_eq!(last_step(&[]), None);
    }

    #[test]
    fn nodes_lists_without_a_subcommand_and_removes_with_rm() {
        let cli = Cli::try_parse_from(["trainctl", "nodes", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Cmd::Nodes { command: None, .. }));
        let cli = Cli::try_parse_from(["trainctl", "nodes", "rm", "node-2"]).unwrap();
        assert!(
            matches!(cli.command, Cmd::Nodes { command: Some(NodesCmd::Rm { ref node, .. }), .. } if node == "node-2")
        );
        let cli = Cli::try_parse_from([
            "trainctl",
            "checkpoint",
            "commit",
            "/c/step-5",
            "--step",
            "5",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Checkpoint {
                command: CheckpointCmd::Commit { step: 5, .. }
            }
        ));
        assert!(Cli::try_parse_from(["trainctl", "checkpoint", "commit", "/c"]).is_err());
    }

    #[test]
    fn agent_and_preflight_take_the_library_paths() {
        let libraries = |cmd: Cmd| match cmd {
            Cmd::Agent { hardware, .. } | Cmd::Preflight { hardware, .. } => {
                (hardware.nccl_library, hardware.ibverbs_library)
            }
            _ => panic!("not agent or preflight"),
        };
        let given = (
            Some(PathBuf::from("/opt/nccl/libnccl.so.2")),
            Some(PathBuf::from("/opt/rdma/libibverbs.so.1")),
        );
        let agent = [
            "trainctl",
            "agent",
            "--coordinator",
            "http://127.0.0.1:7470",
            "--data-dir",
            "/tmp/a",
        ];
        let preflight = ["trainctl", "preflight"];
        let options = [
            "--nccl-library",
            "/opt/nccl/libnccl.so.2",
            "--ibverbs-library",
            "/opt/rdma/libibverbs.so.1",
        ];
        for base in [&agent[..], &preflight[..]] {
            let cli = Cli::try_parse_from(base.iter().chain(&options)).unwrap();
            assert_eq!(libraries(cli.command), given, "{base:?}");
            // Without the options (nor their variables), the loader's search.
            if std::env::var_os("TRAINCTL_NCCL_LIBRARY").is_none()
                && std::env::var_os("TRAINCTL_IBVERBS_LIBRARY").is_none()
            {
                let cli = Cli::try_parse_from(base).unwrap();
                assert_eq!(libraries(cli.command), (None, None), "{base:?}");
            }
            let Err(err) = Cli::try_parse_from(base.iter().chain(&["--nccl-library"])) else {
                panic!("--nccl-library without a path parsed: {base:?}");
            };
            assert!(err.to_string().contains("--nccl-library"), "{err}");
        }
    }
}
