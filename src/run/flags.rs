//! torchrun's command line, parsed purely into [`RunArgs`] (issue 8).
//!
//! `trainctl run` takes the flags of torch 2.15's `torchrun` (`torch/distributed/run.py`) the way
//! torchrun's argparse parser (Python 3.11) reads them:
//! - every flag in both spellings (`--nproc-per-node`, `--nproc_per_node`), `--flag VALUE` and
//!   `--flag=VALUE`, the short forms `-m`, `-r`, `-t`, `-h` (also joined: `-mr3`, `-r3`);
//! - unambiguous prefixes of long flags (`--stand`); like argparse, a prefix that matches both spellings
//!   of one flag (`--nproc`) is ambiguous;
//! - a flag not on the command line falls back to `PET_<DEST>` in the environment (argparse_util's
//!   `env` action); switches read `PET_<DEST>` as an integer, non-zero meaning on (`check_env`);
//! - the first positional argument is the script, and everything after it is the script's, verbatim;
//!   `--` may come before the script. As Python 3.11's argparse does, a `--` right after the script is
//!   dropped (`torchrun train.py -- --x` gives the script `--x`).
//!
//! Deliberate differences from torchrun:
//! - Values are checked here, with an error that names the flag (or the `PET_*` variable), the value and
//!   what is accepted; torchrun checks most of them later (`config_from_args`, the rendezvous), and some
//!   never (a `PET_START_METHOD` outside the choices, a negative `--node-rank`).
//! - The script's arguments are never looked at: argparse classifies them too, and fails on
//!   `torchrun train.py --log 1` ("ambiguous option: --log could match --log-dir, ...").
//! - `--rdzv-conf` keys torchrun would ignore are errors; flags trainctl does not implement are errors
//!   ([`FlagError::Unsupported`]), never silently ignored.
//!
//! This module does no IO: the environment comes in as a lookup function.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use super::workers::Streams;

/// `--master-addr` when neither the flag nor `PET_MASTER_ADDR` gives one.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// `--master-port` when neither the flag nor `PET_MASTER_PORT` gives one (torchrun's `run()`).
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// The port of a c10d `--rdzv-endpoint` given without one (torch's `c10d_rendezvous_backend`).
pub const C10D_DEFAULT_PORT: u16 = 29400;
/// `--rdzv-id` by default.
pub const DEFAULT_RDZV_ID: &str = "none";
/// `--role` by default.
pub const DEFAULT_ROLE: &str = "default";
/// `--monitor-interval` by default (0.1 s).
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_millis(100);
/// `--signals-to-handle` by default; torchrun exports the value as `TORCHELASTIC_SIGNALS_TO_HANDLE`.
pub const DEFAULT_SIGNALS_TO_HANDLE: &str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT";
/// The grace between SIGTERM and SIGKILL when neither `--shutdown-timeout` nor
/// `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` gives one (torch's `LaunchConfig`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The rendezvous `timeout` torchrun's `LaunchConfig` puts in the rendezvous configuration when
/// `--rdzv-conf` has none (it bounds the static rendezvous).
pub const DEFAULT_RDZV_TIMEOUT: Duration = Duration::from_secs(900);
/// Environment variable read when `--shutdown-timeout` is not given (as torch's `LaunchConfig`).
pub const SHUTDOWN_TIMEOUT_ENV: &str = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT";
/// Environment variable read when `--log-line-prefix-template` is empty (as torchrun).
pub const LOG_LINE_PREFIX_TEMPLATE_ENV: &str = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per process
pub enum Parsed {
    /// Run (or submit) the script.
    Run(RunArgs),
    /// `-h`/`--help`: print this text and exit successfully.
    Help(String),
}

/// `trainctl run`'s flags, typed, with torchrun's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RunArgs {
    /// `--nnodes`: the number of nodes, or the elastic range.
    pub nnodes: NodeRange,
    /// `--nproc-per-node`: workers on each node.
    pub nproc_per_node: NprocPerNode,
    /// `--rdzv-backend`.
    pub rdzv_backend: RdzvBackend,
    /// `--rdzv-endpoint`; `None` when not given or empty.
    pub rdzv_endpoint: Option<Endpoint>,
    /// `--rdzv-id` ([`DEFAULT_RDZV_ID`] by default).
    pub rdzv_id: String,
    /// `--rdzv-conf`, with torch's defaults for the keys not given.
    pub rdzv_conf: RdzvConf,
    /// `--standalone`: one node, a rendezvous on this host; torchrun then ignores the `--rdzv-*` flags.
    pub standalone: bool,
    /// `--max-restarts`: restarts of the worker group before the job fails.
    pub max_restarts: u32,
    /// `--monitor-interval`: how often the workers are checked.
    pub monitor_interval: Duration,
    /// `--start-method`: accepted and kept; exec'd workers do not depend on it.
    pub start_method: StartMethod,
    /// `--role`: the workers' `ROLE_NAME`.
    pub role: String,
    /// `-m`/`--module`: run the script as `python -m SCRIPT`.
    pub module: bool,
    /// `--no-python`: exec the script itself.
    pub no_python: bool,
    /// `--run-path`: run the script with `runpy.run_path`; takes precedence over `--no-python`.
    pub run_path: bool,
    /// `--log-dir`; `None` (not given, or empty) means a new temporary directory.
    pub log_dir: Option<PathBuf>,
    /// `-r`/`--redirects`: streams that go to log files only.
    pub redirects: StdSpec,
    /// `-t`/`--tee`: streams that go to log files and to the console.
    pub tee: StdSpec,
    /// `--log-line-prefix-template`, else `TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`; `None` when both are
    /// empty (torchrun's default prefix `[${role_name}${local_rank}]:` then applies).
    pub log_line_prefix_template: Option<String>,
    /// `--local-ranks-filter`: the local ranks shown on the console; `None` shows all.
    pub local_ranks_filter: Option<BTreeSet<u32>>,
    /// `--node-rank`: this node's rank in a static rendezvous.
    pub node_rank: u32,
    /// `--master-addr`, `None` when not given ([`RunArgs::master_addr`] applies the default).
    pub master_addr: Option<String>,
    /// `--master-port`, `None` when not given. torchrun turns a one-node static job without
    /// `--master-port` and `--rdzv-endpoint` into a c10d rendezvous on `localhost:0`, so it matters
    /// whether the port was given ([`RunArgs::master_port`] applies the default).
    pub master_port: Option<u16>,
    /// `--local-addr`: the address this node advertises; `None` means its FQDN.
    pub local_addr: Option<String>,
    /// `--signals-to-handle`, verbatim: torchrun exports it as `TORCHELASTIC_SIGNALS_TO_HANDLE` and
    /// skips, with a warning, names that are not signals.
    pub signals_to_handle: String,
    /// `--shutdown-timeout`, else `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, else 30 s.
    pub shutdown_timeout: Duration,
    /// `--cluster` (trainctl's): submit the job to a trainctl coordinator instead of running it here.
    pub cluster: bool,
    /// `--addr` (trainctl's): the coordinator's addresses, for `--cluster`, verbatim.
    pub addr: Option<String>,
    /// The training script (a module name with `-m`, a program with `--no-python`).
    pub script: OsString,
    /// The script's arguments, verbatim.
    pub script_args: Vec<OsString>,
}

impl RunArgs {
    /// `--master-addr`, or [`DEFAULT_MASTER_ADDR`].
    pub fn master_addr(&self) -> &str {
        self.master_addr.as_deref().unwrap_or(DEFAULT_MASTER_ADDR)
    }

    /// `--master-port`, or [`DEFAULT_MASTER_PORT`].
    pub fn master_port(&self) -> u16 {
        self.master_port.unwrap_or(DEFAULT_MASTER_PORT)
    }
}

/// `--nnodes`: `N` (`N:N`) or `MIN:MAX`, with `1 <= MIN <= MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRange {
    /// The fewest nodes the job runs with.
    pub min: u32,
    /// The most nodes the job runs with.
    pub max: u32,
}

impl fmt::Display for NodeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.min, self.max)
    }
}

/// `--nproc-per-node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NprocPerNode {
    /// That many workers.
    Count(u32),
    /// One per accelerator if there are any, else one per CPU.
    Auto,
    /// One per CPU.
    Cpu,
    /// One per GPU (an error where there is none).
    Gpu,
}

/// `--rdzv-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdzvBackend {
    /// Node ranks given by `--node-rank`; node 0 at `--master-addr:--master-port`.
    Static,
    /// Nodes meet at `--rdzv-endpoint` and get their ranks there (trainctl's own rendezvous).
    C10d,
}

/// `--rdzv-endpoint`: `HOST[:PORT]`, an IPv6 host in brackets (`[::1]:29400`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The host, without brackets.
    pub host: String,
    /// The port, when given.
    pub port: Option<u16>,
}

impl Endpoint {
    /// The port, or `default` ([`C10D_DEFAULT_PORT`] for c10d).
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }
}

/// `--start-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMethod {
    /// `spawn` (the default).
    Spawn,
    /// `fork`.
    Fork,
    /// `forkserver`.
    Forkserver,
}

/// `--rdzv-conf KEY=VALUE,...`, with torch's defaults for the keys not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdzvConf {
    /// `join_timeout`: the rendezvous must complete within it (600 s).
    pub join_timeout: Duration,
    /// `last_call_timeout`: the wait for more nodes once MIN have joined (30 s).
    pub last_call_timeout: Duration,
    /// `close_timeout`: the rendezvous must close within it (30 s).
    pub close_timeout: Duration,
    /// `heartbeat_timeout`: a keep-alive heartbeat must complete within it (5 s).
    pub heartbeat_timeout: Duration,
    /// `keep_alive_interval`: between a node's heartbeats (5 s).
    pub keep_alive_interval: Duration,
    /// `keep_alive_max_attempt`: heartbeats missed before a node is dead (3).
    pub keep_alive_max_attempt: u32,
    /// `read_timeout`: of store operations (60 s).
    pub read_timeout: Duration,
    /// `is_host`: whether this node hosts the store; `None` decides by the endpoint's host.
    pub is_host: Option<bool>,
    /// `timeout`: of the static rendezvous; `None` means [`DEFAULT_RDZV_TIMEOUT`].
    pub timeout: Option<Duration>,
    /// `cas_backoff_max_seconds`: the longest random delay after a failed state write (0: none).
    pub cas_backoff_max: Duration,
}

impl Default for RdzvConf {
    fn default() -> Self {
        Self {
            join_timeout: Duration::from_secs(600),
            last_call_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_max_attempt: 3,
            read_timeout: Duration::from_secs(60),
            is_host: None,
            timeout: None,
            cas_backoff_max: Duration::ZERO,
        }
    }
}

/// The keys `--rdzv-conf` accepts.
pub const RDZV_CONF_KEYS: &[&str] = &[
    "join_timeout",
    "last_call_timeout",
    "close_timeout",
    "heartbeat_timeout",
    "keep_alive_interval",
    "keep_alive_max_attempt",
    "read_timeout",
    "is_host",
    "timeout",
    "cas_backoff_max_seconds",
    "store_type",
];

/// torch's `Std` mask: 0 none, 1 stdout, 2 stderr, 3 both.
fn streams_from_mask(mask: u8) -> Streams {
    match mask & 3 {
        3 => Streams::BOTH,
        m => Streams {
            stdout: m & 1 != 0,
            stderr: m & 2 != 0,
        },
    }
}

/// `--redirects`/`--tee`: one mask for every local rank (`3`), or masks per local rank (`0:3,1:1`;
/// ranks not listed get none), as torch's `Std.from_str`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdSpec {
    /// The same streams for every local rank.
    All(Streams),
    /// Streams per local rank; local ranks not listed get [`Streams::NONE`].
    PerRank(BTreeMap<u32, Streams>),
}

impl Default for StdSpec {
    fn default() -> Self {
        StdSpec::All(Streams::NONE)
    }
}

impl StdSpec {
    /// The streams this setting covers for `local_rank` (torch's `to_map`).
    pub fn std_for(&self, local_rank: u32) -> Streams {
        match self {
            StdSpec::All(streams) => *streams,
            StdSpec::PerRank(map) => map.get(&local_rank).copied().unwrap_or(Streams::NONE),
        }
    }

    /// torch's `Std.from_str`: `^[0123]$` or `^(\d:[0123],)*(\d:[0123])$` (single-digit local ranks;
    /// a rank listed twice keeps its last mask).
    fn parse(s: &str) -> Result<StdSpec, Reject> {
        if let [mask @ b'0'..=b'3'] = s.as_bytes() {
            return Ok(StdSpec::All(streams_from_mask(mask - b'0')));
        }
        let mut map = BTreeMap::new();
        for item in s.split(',') {
            let [rank @ b'0'..=b'9', b':', mask @ b'0'..=b'3'] = item.as_bytes() else {
                let reason = if s.contains(':') {
                    format!("{item:?} is not LOCAL_RANK:MASK with a one-digit LOCAL_RANK and MASK 0 to 3")
                } else {
                    "not a mask from 0 to 3".to_string()
                };
                return Err(Reject::bad(reason));
            };
            map.insert(u32::from(rank - b'0'), streams_from_mask(mask - b'0'));
        }
        Ok(StdSpec::PerRank(map))
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The command line, with the flag's canonical name (`--nnodes`).
    Flag(&'static str),
    /// An environment variable (`PET_NNODES`).
    Env(&'static str),
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Flag(name) | Origin::Env(name) => name,
        }
    }
}

/// A command line `trainctl run` does not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagError {
    /// A value (from the command line or the environment) that is not accepted.
    BadValue {
        /// The flag or the environment variable it came from.
        origin: Origin,
        /// The value, or the part of it at fault (one `KEY=VALUE` of `--rdzv-conf`).
        value: String,
        /// What is wrong with it.
        reason: String,
        /// What would be accepted.
        accepted: String,
    },
    /// A flag that takes a value came without one.
    MissingValue {
        /// The flag, canonically spelled.
        flag: &'static str,
        /// What would be accepted.
        accepted: &'static str,
    },
    /// A switch given a value (`--standalone=1`, `-m=1`).
    UnexpectedValue {
        /// The switch, as matched (`-m`, `--standalone`).
        flag: &'static str,
        /// The value it was given.
        value: String,
    },
    /// Neither torchrun's nor trainctl's flag.
    Unknown {
        /// The flag as typed (without `=VALUE`).
        flag: String,
        /// The nearest known flag, if one is near.
        suggestion: Option<&'static str>,
    },
    /// A prefix of several flags (argparse's abbreviations, as torchrun).
    Ambiguous {
        /// The prefix as typed.
        flag: String,
        /// The flags it could mean, in both spellings.
        candidates: Vec<&'static str>,
    },
    /// A torchrun flag (or value) trainctl does not implement.
    Unsupported {
        /// The flag, `FLAG=VALUE` or the environment variable.
        flag: String,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// `-m` with `--no-python` (without `--run-path`), as torchrun refuses it.
    ModuleWithNoPython,
    /// No training script.
    MissingScript,
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlagError::BadValue {
                origin,
                value,
                reason,
                accepted,
            } => {
                match origin {
                    Origin::Flag(flag) => write!(f, "{flag}: {value:?}")?,
                    Origin::Env(var) => write!(f, "{var}={value:?} (environment)")?,
                }
                write!(f, ": {reason} (accepted: {accepted})")
            }
            FlagError::MissingValue { flag, accepted } => {
                write!(f, "{flag}: expected a value (accepted: {accepted})")
            }
            FlagError::UnexpectedValue { flag, value } => {
                write!(f, "{flag}: takes no value, got {value:?}")
            }
            FlagError::Unknown { flag, suggestion } => match suggestion {
                Some(known) => write!(f, "unknown flag {flag}; did you mean {known}?"),
                None => write!(
                    f,
                    "unknown flag {flag} (trainctl run --help lists the flags)"
                ),
            },
            FlagError::Ambiguous { flag, candidates } => write!(
                f,
                "ambiguous flag {flag}: could be {} (as in torchrun, a shortened flag must match \
                 one spelling of one flag)",
                candidates.join(", ")
            ),
            FlagError::Unsupported { flag, why } => {
                write!(f, "{flag}: not supported by trainctl run: {why}")
            }
            FlagError::ModuleWithNoPython => write!(
                f,
                "Don't use both the '--no-python' flag and the '--module' flag at the same time."
            ),
            FlagError::MissingScript => write!(
                f,
                "missing the training script: trainctl run [FLAGS] SCRIPT [SCRIPT_ARGS...]"
            ),
        }
    }
}

impl std::error::Error for FlagError {}

/// Parses `argv` (everything after `trainctl run`); `env` looks up environment variables (`PET_*`,
/// `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, `TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`).
pub fn parse(argv: &[OsString], env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, FlagError> {
    match scan(argv)? {
        None => Ok(Parsed::Help(help_text())),
        Some(line) => resolve(&line, env).map(Parsed::Run),
    }
}

/// The help text of `trainctl run`.
pub fn help_text() -> String {
    let mut out = String::from(
        "Usage: trainctl run [FLAGS] SCRIPT [SCRIPT_ARGS...]\n\
         \n\
         Runs SCRIPT on this node's workers as torchrun does. The flags are torchrun's (torch 2.15),\n\
         each also spelled with underscores (--nproc_per_node), as --flag VALUE or --flag=VALUE, and each\n\
         falls back to PET_<FLAG> in the environment (PET_NPROC_PER_NODE). Everything after SCRIPT is\n\
         passed to it unchanged.\n",
    );
    for section in SECTIONS {
        out.push('\n');
        out.push_str(section.heading());
        out.push('\n');
        for flag in FLAGS.iter().filter(|flag| flag.section == section) {
            let mut left = String::new();
            if let Some(short) = flag.short {
                left.push_str(short);
                left.push_str(", ");
            }
            left.push_str(flag.long);
            if let Some(metavar) = flag.metavar {
                left.push(' ');
                left.push_str(metavar);
            }
            // The help in a column from HELP_INDENT, wrapped at HELP_WIDTH.
            let mut lines = vec![String::new()];
            for word in flag.help.split(' ') {
                let line = lines.last_mut().expect("one line at least");
                if !line.is_empty() && HELP_INDENT + line.len() + 1 + word.len() > HELP_WIDTH {
                    lines.push(word.to_string());
                } else {
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line.push_str(word);
                }
            }
            let head = format!("  {left}");
            let mut lines = lines.into_iter();
            if head.len() + 2 <= HELP_INDENT {
                let first = lines.next().unwrap_or_default();
                out.push_str(&format!("{head:<HELP_INDENT$}{first}\n"));
            } else {
                out.push_str(&format!("{head}\n"));
            }
            for line in lines {
                out.push_str(&format!("{:HELP_INDENT$}{line}\n", ""));
            }
        }
    }
    out
}

/// Where the help of each flag starts, and the width it is wrapped at.
const HELP_INDENT: usize = 36;
const HELP_WIDTH: usize = 100;

// ---------------------------------------------------------------------------------------------------
// The flag table

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FlagId {
    Nnodes,
    NprocPerNode,
    NodeRank,
    RdzvBackend,
    RdzvEndpoint,
    RdzvId,
    RdzvConf,
    Standalone,
    MasterAddr,
    MasterPort,
    LocalAddr,
    MaxRestarts,
    MonitorInterval,
    StartMethod,
    Role,
    Module,
    NoPython,
    RunPath,
    SignalsToHandle,
    ShutdownTimeout,
    LogDir,
    Redirects,
    Tee,
    LogLinePrefixTemplate,
    LocalRanksFilter,
    EventLogHandler,
    LogsSpecs,
    NumaBinding,
    DuplicateStdoutFilters,
    DuplicateStderrFilters,
    VirtualLocalRank,
    PrintCompletion,
    Cluster,
    Addr,
    Help,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Nodes,
    Rendezvous,
    Workers,
    Logs,
    Trainctl,
    Unsupported,
}

const SECTIONS: [Section; 6] = [
    Section::Nodes,
    Section::Rendezvous,
    Section::Workers,
    Section::Logs,
    Section::Trainctl,
    Section::Unsupported,
];

impl Section {
    fn heading(self) -> &'static str {
        match self {
            Section::Nodes => "Nodes and workers:",
            Section::Rendezvous => "Rendezvous:",
            Section::Workers => "Running the workers:",
            Section::Logs => "Output and logs:",
            Section::Trainctl => "trainctl:",
            Section::Unsupported => {
                "torchrun flags trainctl does not support (an error names them):"
            }
        }
    }
}

/// One flag of `trainctl run`.
struct Flag {
    id: FlagId,
    /// The canonical spelling.
    long: &'static str,
    /// torchrun's underscore spelling.
    alias: Option<&'static str>,
    short: Option<&'static str>,
    /// `None` for a switch.
    metavar: Option<&'static str>,
    /// `PET_<DEST>`, for torchrun's flags that read it.
    env: Option<&'static str>,
    /// What a value may be, for errors.
    accepted: &'static str,
    section: Section,
    help: &'static str,
}

impl Flag {
    fn names(&self) -> impl Iterator<Item = &'static str> {
        [Some(self.long), self.alias, self.short]
            .into_iter()
            .flatten()
    }
}

const NNODES_ACCEPTED: &str = "N or MIN:MAX, e.g. 2 or 1:4";
const STD_ACCEPTED: &str = "0 (none), 1 (stdout), 2 (stderr), 3 (both), or LOCAL_RANK:MASK,... \
                            with one-digit local ranks, e.g. 0:3,1:2";
const SWITCH_ENV_ACCEPTED: &str = "an integer: 0 for off, anything else for on";

const FLAGS: &[Flag] = &[
    Flag {
        id: FlagId::Nnodes,
        long: "--nnodes",
        alias: None,
        short: None,
        metavar: Some("N|MIN:MAX"),
        env: Some("PET_NNODES"),
        accepted: NNODES_ACCEPTED,
        section: Section::Nodes,
        help: "number of nodes, or an elastic range (default 1:1)",
    },
    Flag {
        id: FlagId::NprocPerNode,
        long: "--nproc-per-node",
        alias: Some("--nproc_per_node"),
        short: None,
        metavar: Some("N|auto|cpu|gpu"),
        env: Some("PET_NPROC_PER_NODE"),
        accepted: "a positive integer, auto, cpu or gpu",
        section: Section::Nodes,
        help: "workers per node, or one per GPU/CPU of the node (default 1)",
    },
    Flag {
        id: FlagId::NodeRank,
        long: "--node-rank",
        alias: Some("--node_rank"),
        short: None,
        metavar: Some("RANK"),
        env: Some("PET_NODE_RANK"),
        accepted: "a non-negative integer",
        section: Section::Nodes,
        help: "this node's rank, for the static rendezvous (default 0)",
    },
    Flag {
        id: FlagId::RdzvBackend,
        long: "--rdzv-backend",
        alias: Some("--rdzv_backend"),
        short: None,
        metavar: Some("static|c10d"),
        env: Some("PET_RDZV_BACKEND"),
        accepted: "static or c10d",
        section: Section::Rendezvous,
        help: "static: ranks from --node-rank; c10d: ranks given at --rdzv-endpoint (default static)",
    },
    Flag {
        id: FlagId::RdzvEndpoint,
        long: "--rdzv-endpoint",
        alias: Some("--rdzv_endpoint"),
        short: None,
        metavar: Some("HOST[:PORT]"),
        env: Some("PET_RDZV_ENDPOINT"),
        accepted: "HOST or HOST:PORT, an IPv6 address in brackets, e.g. node0:29400 or [fd00::1]:29400",
        section: Section::Rendezvous,
        help: "where the nodes meet (c10d's default port 29400)",
    },
    Flag {
        id: FlagId::RdzvId,
        long: "--rdzv-id",
        alias: Some("--rdzv_id"),
        short: None,
        metavar: Some("ID"),
        env: Some("PET_RDZV_ID"),
        accepted: "any text",
        section: Section::Rendezvous,
        help: "the job's id, the same on every node (default none)",
    },
    Flag {
        id: FlagId::RdzvConf,
        long: "--rdzv-conf",
        alias: Some("--rdzv_conf"),
        short: None,
        metavar: Some("KEY=VALUE,..."),
        env: Some("PET_RDZV_CONF"),
        accepted: "KEY=VALUE,... e.g. join_timeout=900,read_timeout=120",
        section: Section::Rendezvous,
        help: "rendezvous settings: join_timeout (600 s), last_call_timeout (30), close_timeout (30), \
               heartbeat_timeout (5), keep_alive_interval (5), keep_alive_max_attempt (3), \
               read_timeout (60), is_host, timeout, cas_backoff_max_seconds, store_type=tcp",
    },
    Flag {
        id: FlagId::Standalone,
        long: "--standalone",
        alias: None,
        short: None,
        metavar: None,
        env: Some("PET_STANDALONE"),
        accepted: SWITCH_ENV_ACCEPTED,
        section: Section::Rendezvous,
        help: "one node: a rendezvous on this host, on a free port; the --rdzv-* flags are ignored",
    },
    Flag {
        id: FlagId::MasterAddr,
        long: "--master-addr",
        alias: Some("--master_addr"),
        short: None,
        metavar: Some("HOST"),
        env: Some("PET_MASTER_ADDR"),
        accepted: "a hostname or an IP address, IPv6 in brackets",
        section: Section::Rendezvous,
        help: "node 0's address, for the static rendezvous (default 127.0.0.1)",
    },
    Flag {
        id: FlagId::MasterPort,
        long: "--master-port",
        alias: Some("--master_port"),
        short: None,
        metavar: Some("PORT"),
        env: Some("PET_MASTER_PORT"),
        accepted: "an integer from 0 to 65535",
        section: Section::Rendezvous,
        help: "node 0's port, for the static rendezvous (default 29500)",
    },
    Flag {
        id: FlagId::LocalAddr,
        long: "--local-addr",
        alias: Some("--local_addr"),
        short: None,
        metavar: Some("HOST"),
        env: Some("PET_LOCAL_ADDR"),
        accepted: "a hostname or an IP address",
        section: Section::Rendezvous,
        help: "the address this node advertises (default: its FQDN)",
    },
    Flag {
        id: FlagId::MaxRestarts,
        long: "--max-restarts",
        alias: Some("--max_restarts"),
        short: None,
        metavar: Some("N"),
        env: Some("PET_MAX_RESTARTS"),
        accepted: "a non-negative integer",
        section: Section::Workers,
        help: "restarts of the worker group before the job fails (default 0)",
    },
    Flag {
        id: FlagId::MonitorInterval,
        long: "--monitor-interval",
        alias: Some("--monitor_interval"),
        short: None,
        metavar: Some("SECONDS"),
        env: Some("PET_MONITOR_INTERVAL"),
        accepted: "a non-negative number of seconds, e.g. 0.1 or 5",
        section: Section::Workers,
        help: "how often the workers are checked (default 0.1)",
    },
    Flag {
        id: FlagId::StartMethod,
        long: "--start-method",
        alias: Some("--start_method"),
        short: None,
        metavar: Some("spawn|fork|forkserver"),
        env: Some("PET_START_METHOD"),
        accepted: "spawn, fork or forkserver",
        section: Section::Workers,
        help: "accepted for torchrun's sake; trainctl execs every worker (default spawn)",
    },
    Flag {
        id: FlagId::Role,
        long: "--role",
        alias: None,
        short: None,
        metavar: Some("NAME"),
        env: Some("PET_ROLE"),
        accepted: "any text",
        section: Section::Workers,
        help: "the workers' ROLE_NAME (default \"default\")",
    },
    Flag {
        id: FlagId::Module,
        long: "--module",
        alias: None,
        short: Some("-m"),
        metavar: None,
        env: Some("PET_MODULE"),
        accepted: SWITCH_ENV_ACCEPTED,
        section: Section::Workers,
        help: "run SCRIPT as a module: python -m SCRIPT",
    },
    Flag {
        id: FlagId::NoPython,
        long: "--no-python",
        alias: Some("--no_python"),
        short: None,
        metavar: None,
        env: Some("PET_NO_PYTHON"),
        accepted: SWITCH_ENV_ACCEPTED,
        section: Section::Workers,
        help: "run SCRIPT itself, not with python (not with -m)",
    },
    Flag {
        id: FlagId::RunPath,
        long: "--run-path",
        alias: Some("--run_path"),
        short: None,
        metavar: None,
        env: Some("PET_RUN_PATH"),
        accepted: SWITCH_ENV_ACCEPTED,
        section: Section::Workers,
        help: "run SCRIPT (an absolute path) with runpy.run_path; wins over --no-python",
    },
    Flag {
        id: FlagId::SignalsToHandle,
        long: "--signals-to-handle",
        alias: Some("--signals_to_handle"),
        short: None,
        metavar: Some("SIGNALS"),
        env: Some("PET_SIGNALS_TO_HANDLE"),
        accepted: "signal names separated by commas, e.g. SIGTERM,SIGUSR1",
        section: Section::Workers,
        help: "signals passed on to the workers (default SIGTERM,SIGINT,SIGHUP,SIGQUIT)",
    },
    Flag {
        id: FlagId::ShutdownTimeout,
        long: "--shutdown-timeout",
        alias: Some("--shutdown_timeout"),
        short: None,
        metavar: Some("SECONDS"),
        env: Some("PET_SHUTDOWN_TIMEOUT"),
        accepted: "a non-negative integer number of seconds",
        section: Section::Workers,
        help: "from SIGTERM to SIGKILL when stopping workers (default $TORCH_ELASTIC_SHUTDOWN_TIMEOUT \
               or 30)",
    },
    Flag {
        id: FlagId::LogDir,
        long: "--log-dir",
        alias: Some("--log_dir"),
        short: None,
        metavar: Some("DIR"),
        env: Some("PET_LOG_DIR"),
        accepted: "a directory",
        section: Section::Logs,
        help: "base directory of the per-attempt, per-rank logs (default: a new temporary one)",
    },
    Flag {
        id: FlagId::Redirects,
        long: "--redirects",
        alias: None,
        short: Some("-r"),
        metavar: Some("MASK"),
        env: Some("PET_REDIRECTS"),
        accepted: STD_ACCEPTED,
        section: Section::Logs,
        help: "streams to log files only: 0 none, 1 stdout, 2 stderr, 3 both, or RANK:MASK,... (default 0)",
    },
    Flag {
        id: FlagId::Tee,
        long: "--tee",
        alias: None,
        short: Some("-t"),
        metavar: Some("MASK"),
        env: Some("PET_TEE"),
        accepted: STD_ACCEPTED,
        section: Section::Logs,
        help: "streams to log files and the console, as --redirects (default 0)",
    },
    Flag {
        id: FlagId::LogLinePrefixTemplate,
        long: "--log-line-prefix-template",
        alias: Some("--log_line_prefix_template"),
        short: None,
        metavar: Some("TEMPLATE"),
        env: Some("PET_LOG_LINE_PREFIX_TEMPLATE"),
        accepted: "any text",
        section: Section::Logs,
        help: "prefix of console lines: ${role_name} ${rank} ${local_rank} ${hostname}",
    },
    Flag {
        id: FlagId::LocalRanksFilter,
        long: "--local-ranks-filter",
        alias: Some("--local_ranks_filter"),
        short: None,
        metavar: Some("RANK,..."),
        env: Some("PET_LOCAL_RANKS_FILTER"),
        accepted: "local ranks separated by commas, e.g. 0,1,2",
        section: Section::Logs,
        help: "show only these local ranks on the console (log files keep all)",
    },
    Flag {
        id: FlagId::Cluster,
        long: "--cluster",
        alias: None,
        short: None,
        metavar: None,
        env: None,
        accepted: "",
        section: Section::Trainctl,
        help: "submit the run as a job to the coordinator (--addr, else TRAINCTL_ADDR or the context; TRAINCTL_ADDR alone does not switch modes) and stream its output; Ctrl-C or SIGTERM stops following and leaves the job running (trainctl cancel ID stops it)",
    },
    Flag {
        id: FlagId::Addr,
        long: "--addr",
        alias: None,
        short: None,
        metavar: Some("ADDRS"),
        env: None,
        accepted: "the coordinator's addresses",
        section: Section::Trainctl,
        help: "the coordinator's addresses, for --cluster",
    },
    Flag {
        id: FlagId::Help,
        long: "--help",
        alias: None,
        short: Some("-h"),
        metavar: None,
        env: None,
        accepted: "",
        section: Section::Trainctl,
        help: "print this help",
    },
    Flag {
        id: FlagId::EventLogHandler,
        long: "--event-log-handler",
        alias: Some("--event_log_handler"),
        short: None,
        metavar: Some("NAME"),
        env: Some("PET_EVENT_LOG_HANDLER"),
        accepted: "null",
        section: Section::Unsupported,
        help: "torchrun's event-log handlers; only null, the default, is accepted",
    },
    Flag {
        id: FlagId::LogsSpecs,
        long: "--logs-specs",
        alias: Some("--logs_specs"),
        short: None,
        metavar: Some("NAME"),
        env: None,
        accepted: "",
        section: Section::Unsupported,
        help: "torchrun's LogsSpecs plugins",
    },
    Flag {
        id: FlagId::NumaBinding,
        long: "--numa-binding",
        alias: Some("--numa_binding"),
        short: None,
        metavar: Some("MODE"),
        env: None,
        accepted: "",
        section: Section::Unsupported,
        help: "binding workers to the CPUs near their GPUs",
    },
    Flag {
        id: FlagId::DuplicateStdoutFilters,
        long: "--duplicate-stdout-filters",
        alias: Some("--duplicate_stdout_filters"),
        short: None,
        metavar: Some("FILTERS"),
        env: Some("PET_DUPLICATE_STDOUT_FILTERS"),
        accepted: "",
        section: Section::Unsupported,
        help: "copies of matching stdout lines in another file",
    },
    Flag {
        id: FlagId::DuplicateStderrFilters,
        long: "--duplicate-stderr-filters",
        alias: Some("--duplicate_stderr_filters"),
        short: None,
        metavar: Some("FILTERS"),
        env: Some("PET_DUPLICATE_STDERR_FILTERS"),
        accepted: "",
        section: Section::Unsupported,
        help: "copies of matching stderr lines in another file",
    },
    Flag {
        id: FlagId::VirtualLocalRank,
        long: "--virtual-local-rank",
        alias: Some("--virtual_local_rank"),
        short: None,
        metavar: None,
        env: Some("PET_VIRTUAL_LOCAL_RANK"),
        accepted: SWITCH_ENV_ACCEPTED,
        section: Section::Unsupported,
        help: "LOCAL_RANK 0 for every worker, each seeing only its own GPU",
    },
    Flag {
        id: FlagId::PrintCompletion,
        long: "--print-completion",
        alias: Some("--print_completion"),
        short: None,
        metavar: Some("SHELL"),
        env: None,
        accepted: "",
        section: Section::Unsupported,
        help: "torchrun's shell completion script",
    },
];

fn flag(id: FlagId) -> &'static Flag {
    FLAGS
        .iter()
        .find(|flag| flag.id == id)
        .expect("every FlagId has a row in FLAGS")
}

fn unsupported_why(id: FlagId) -> &'static str {
    match id {
        FlagId::EventLogHandler => {
            "trainctl records the job's events itself and loads none of torchrun's event-log handlers \
             (only the default, null, is accepted)"
        }
        FlagId::LogsSpecs => {
            "torchrun's LogsSpecs plugins are Python entry points; trainctl writes the per-rank logs \
             itself (see --log-dir, --redirects, --tee)"
        }
        FlagId::NumaBinding => {
            "trainctl does not bind workers to NUMA nodes; bind them in the script or with numactl"
        }
        FlagId::DuplicateStdoutFilters | FlagId::DuplicateStderrFilters => {
            "trainctl does not copy matching lines to another file; use --tee and search the log files"
        }
        FlagId::VirtualLocalRank => {
            "trainctl does not remap LOCAL_RANK and CUDA_VISIBLE_DEVICES per worker"
        }
        FlagId::PrintCompletion => "torchrun's completion script does not apply to trainctl run",
        _ => "",
    }
}

// ---------------------------------------------------------------------------------------------------
// Scanning the command line (argparse's rules)

/// The command line, split into flags, the script and its arguments; values not yet checked.
#[derive(Default)]
struct CommandLine {
    /// The last value given for each flag that takes one.
    values: BTreeMap<FlagId, OsString>,
    /// The switches given.
    switches: BTreeSet<FlagId>,
    /// The first flag that is no flag of ours.
    unknown: Option<String>,
    script: Option<OsString>,
    script_args: Vec<OsString>,
}

/// How argparse sees one argument.
enum Class<'a> {
    /// Not a flag: the script (or a flag's value).
    Positional,
    /// A flag, with the option string it matched and the value joined to it (`--nnodes=2`, `-r3`).
    Flag {
        flag: &'static Flag,
        name: &'static str,
        explicit: Option<&'a [u8]>,
    },
    /// Looks like a flag, is none.
    Unknown,
}

fn exact(name: &[u8]) -> Option<(&'static Flag, &'static str)> {
    FLAGS.iter().find_map(|flag| {
        flag.names()
            .find(|known| known.as_bytes() == name)
            .map(|known| (flag, known))
    })
}

/// argparse's `_parse_optional` (Python 3.11, `allow_abbrev=True`).
fn classify(arg: &[u8]) -> Result<Class<'_>, FlagError> {
    if arg.first() != Some(&b'-') {
        return Ok(Class::Positional);
    }
    if let Some((flag, name)) = exact(arg) {
        return Ok(Class::Flag {
            flag,
            name,
            explicit: None,
        });
    }
    if arg.len() == 1 {
        return Ok(Class::Positional);
    }
    if let Some(eq) = arg.iter().position(|&b| b == b'=') {
        if let Some((flag, name)) = exact(&arg[..eq]) {
            return Ok(Class::Flag {
                flag,
                name,
                explicit: Some(&arg[eq + 1..]),
            });
        }
    }
    let mut matches: Vec<Class<'_>> = Vec::new();
    if arg[1] == b'-' {
        // A prefix of long flags, any of their spellings: `--nn=2`.
        let (prefix, explicit) = match arg.iter().position(|&b| b == b'=') {
            Some(eq) => (&arg[..eq], Some(&arg[eq + 1..])),
            None => (arg, None),
        };
        for flag in FLAGS {
            for name in flag.names() {
                if name.as_bytes().starts_with(prefix) {
                    matches.push(Class::Flag {
                        flag,
                        name,
                        explicit,
                    });
                }
            }
        }
    } else {
        // A short flag with its value joined: `-r3`, `-mr3`.
        for flag in FLAGS {
            for name in flag.names() {
                if name.as_bytes() == &arg[..2] {
                    matches.push(Class::Flag {
                        flag,
                        name,
                        explicit: Some(&arg[2..]),
                    });
                } else if name.as_bytes().starts_with(arg) {
                    matches.push(Class::Flag {
                        flag,
                        name,
                        explicit: None,
                    });
                }
            }
        }
    }
    if matches.len() > 1 {
        let candidates = matches
            .iter()
            .filter_map(|class| match class {
                Class::Flag { name, .. } => Some(*name),
                _ => None,
            })
            .collect();
        return Err(FlagError::Ambiguous {
            flag: lossy(arg),
            candidates,
        });
    }
    if let Some(class) = matches.pop() {
        return Ok(class);
    }
    if is_negative_number(arg) || arg.contains(&b' ') {
        return Ok(Class::Positional);
    }
    Ok(Class::Unknown)
}

/// argparse's `^-\d+$|^-\d*\.\d+$`: such arguments are values, not flags.
fn is_negative_number(arg: &[u8]) -> bool {
    let Some(rest) = arg.strip_prefix(b"-") else {
        return false;
    };
    let all_digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    match rest.iter().position(|&b| b == b'.') {
        None => all_digits(rest),
        Some(dot) => rest[..dot].iter().all(u8::is_ascii_digit) && all_digits(&rest[dot + 1..]),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits the command line as torchrun's argparse parser does; `None` when `-h`/`--help` came first.
fn scan(argv: &[OsString]) -> Result<Option<CommandLine>, FlagError> {
    let mut line = CommandLine::default();
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_bytes();
        if arg == b"--" {
            // Everything after `--` is positional; the first of it is the script.
            if let Some(script) = argv.get(i + 1) {
                line.script = Some(script.clone());
                line.script_args = argv[i + 2..].to_vec();
            }
            break;
        }
        let (mut flag, mut name, mut explicit) = match classify(arg)? {
            Class::Positional => {
                line.script = Some(argv[i].clone());
                let mut rest = &argv[i + 1..];
                // Python 3.11's argparse lets the script's pattern (`-*A-*`) take a `--` that follows
                // it, and then drops that `--`: `torchrun train.py -- --x` passes `--x`.
                if rest.first().is_some_and(|next| next.as_bytes() == b"--") {
                    rest = &rest[1..];
                }
                line.script_args = rest.to_vec();
                break;
            }
            Class::Unknown => {
                // argparse collects it and goes on; it is reported after the scan.
                if line.unknown.is_none() {
                    let typed = arg.split(|&b| b == b'=').next().unwrap_or(arg);
                    line.unknown = Some(lossy(typed));
                }
                i += 1;
                continue;
            }
            Class::Flag {
                flag,
                name,
                explicit,
            } => (flag, name, explicit),
        };
        i += 1;
        let mut help = false;
        loop {
            if flag.metavar.is_some() {
                let value = match explicit {
                    Some(value) => OsStr::from_bytes(value).to_os_string(),
                    None => {
                        let next = argv.get(i).filter(|next| next.as_bytes() != b"--");
                        match next.map(|next| classify(next.as_bytes())).transpose()? {
                            Some(Class::Positional) => {
                                i += 1;
                                argv[i - 1].clone()
                            }
                            _ => {
                                return Err(FlagError::MissingValue {
                                    flag: flag.long,
                                    accepted: flag.accepted,
                                })
                            }
                        }
                    }
                };
                line.values.insert(flag.id, value);
                break;
            }
            if flag.id == FlagId::Help {
                help = true;
            } else {
                line.switches.insert(flag.id);
            }
            let Some(value) = explicit else {
                break;
            };
            // A short switch with more joined to it is followed by another short flag: `-mr3` is
            // `-m -r3`, as argparse reads it.
            let joined = match (name.as_bytes()[1] != b'-', value.first()) {
                (true, Some(&next)) => exact(&[b'-', next]),
                _ => None,
            };
            let Some((next_flag, next_name)) = joined else {
                return Err(FlagError::UnexpectedValue {
                    flag: name,
                    value: lossy(value),
                });
            };
            flag = next_flag;
            name = next_name;
            explicit = Some(&value[1..]).filter(|rest| !rest.is_empty());
        }
        if help {
            return Ok(None);
        }
    }
    Ok(Some(line))
}

// ---------------------------------------------------------------------------------------------------
// Checking values

/// Why a value is refused, before the flag it belongs to is known.
enum Reject {
    Bad {
        reason: String,
        /// The part of the value at fault, when not all of it.
        part: Option<String>,
        /// What is accepted, when more precise than the flag's.
        accepted: Option<String>,
    },
    /// A value torchrun accepts and trainctl does not.
    Unsupported(&'static str),
}

impl Reject {
    fn bad(reason: impl Into<String>) -> Reject {
        Reject::Bad {
            reason: reason.into(),
            part: None,
            accepted: None,
        }
    }

    fn accepted(self, what: impl Into<String>) -> Reject {
        match self {
            Reject::Bad { reason, part, .. } => Reject::Bad {
                reason,
                part,
                accepted: Some(what.into()),
            },
            other => other,
        }
    }

    fn part(self, what: &str) -> Reject {
        match self {
            Reject::Bad {
                reason, accepted, ..
            } => Reject::Bad {
                reason,
                part: Some(what.to_string()),
                accepted,
            },
            other => other,
        }
    }

    fn into_error(self, flag: &Flag, origin: Origin, value: &str) -> FlagError {
        match self {
            Reject::Bad {
                reason,
                part,
                accepted,
            } => FlagError::BadValue {
                origin,
                value: part.unwrap_or_else(|| value.to_string()),
                reason,
                accepted: accepted.unwrap_or_else(|| flag.accepted.to_string()),
            },
            Reject::Unsupported(why) => FlagError::Unsupported {
                flag: format!("{}={value}", origin.name()),
                why,
            },
        }
    }
}

/// Python's `int(text)`: surrounding whitespace, a sign, decimal digits with single `_` between them.
/// Saturates far outside every range checked here.
fn py_int(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let mut n: i128 = 0;
    for c in digits.chars().filter(|&c| c != '_') {
        n = n
            .saturating_mul(10)
            .saturating_add(i128::from(c.to_digit(10)?));
    }
    Some(if negative { -n } else { n })
}

/// Python's `float(text)` for the decimal forms (`0.5`, `.5`, `1e-3`, `1_000.5`, `inf`, `nan`).
fn py_float(text: &str) -> Option<f64> {
    let text = text.trim();
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let between_digits = i > 0
            && i + 1 < bytes.len()
            && bytes[i - 1].is_ascii_digit()
            && bytes[i + 1].is_ascii_digit();
        if b == b'_' && !between_digits {
            return None;
        }
    }
    text.replace('_', "").parse().ok()
}

fn int_in<T: TryFrom<i128>>(text: &str, min: i128, what: &str) -> Result<T, Reject> {
    let n = py_int(text).ok_or_else(|| Reject::bad(format!("not {what}")))?;
    if n < min {
        return Err(Reject::bad(if min == 0 {
            "must not be negative".to_string()
        } else {
            format!("must be at least {min}")
        }));
    }
    T::try_from(n).map_err(|_| Reject::bad("too large"))
}

fn parse_count(text: &str) -> Result<u32, Reject> {
    int_in(text, 0, "an integer")
}

fn parse_whole_seconds(text: &str, min: i128) -> Result<Duration, Reject> {
    int_in::<u64>(text, min, "an integer number of seconds").map(Duration::from_secs)
}

fn parse_nnodes(text: &str) -> Result<NodeRange, Reject> {
    let parts: Vec<&str> = text.split(':').collect();
    let number = |part: &str| {
        py_int(part)
            .ok_or_else(|| Reject::bad(format!("{part:?} is not an integer")))
            .and_then(|n| {
                u32::try_from(n.max(0))
                    .map_err(|_| Reject::bad("too large"))
                    .map(|v| (n, v))
            })
    };
    match parts[..] {
        [n] => {
            let (raw, n) = number(n)?;
            if raw < 1 {
                return Err(Reject::bad("N must be at least 1"));
            }
            Ok(NodeRange { min: n, max: n })
        }
        [min, max] => {
            let ((raw_min, min), (_, max)) = (number(min)?, number(max)?);
            if raw_min < 1 {
                return Err(Reject::bad("MIN must be at least 1"));
            }
            if min > max {
                return Err(Reject::bad("MIN must not exceed MAX"));
            }
            Ok(NodeRange { min, max })
        }
        _ => Err(Reject::bad("not N or MIN:MAX")),
    }
}

fn parse_nproc(text: &str) -> Result<NprocPerNode, Reject> {
    // torchrun tries int() first, then compares the words exactly.
    if py_int(text).is_some() {
        return int_in(text, 1, "an integer").map(NprocPerNode::Count);
    }
    match text {
        "auto" => Ok(NprocPerNode::Auto),
        "cpu" => Ok(NprocPerNode::Cpu),
        "gpu" => Ok(NprocPerNode::Gpu),
        "xpu" => Err(Reject::bad("trainctl does not run on XPUs")),
        _ => Err(Reject::bad("not a number of workers")),
    }
}

fn parse_backend(text: &str) -> Result<RdzvBackend, Reject> {
    match text {
        "static" => Ok(RdzvBackend::Static),
        "c10d" => Ok(RdzvBackend::C10d),
        "etcd" | "etcd-v2" => Err(Reject::Unsupported(
            "trainctl has its own rendezvous and needs no etcd; use --rdzv-backend=c10d with \
             --rdzv-endpoint HOST:PORT, or static with --master-addr and --node-rank",
        )),
        _ => Err(Reject::bad("not a rendezvous backend")),
    }
}

/// torch's `parse_rendezvous_endpoint`; an empty endpoint is none.
fn parse_endpoint(text: &str) -> Result<Option<Endpoint>, Reject> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let (host, port) = if text.starts_with('[') && text.ends_with(']') {
        (text, None)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let bracketed = host.len() > 1 && host.starts_with('[') && host.ends_with(']');
    let host = if bracketed {
        &host[1..host.len() - 1]
    } else {
        host
    };
    let port = match port {
        None => None,
        Some(port) => {
            let digits =
                !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            match port.parse::<u16>() {
                Ok(port) if digits => Some(port),
                _ => return Err(Reject::bad("the port must be an integer from 0 to 65535")),
            }
        }
    };
    let host_chars = |c: char| c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if host.is_empty() || !host.chars().all(host_chars) {
        return Err(Reject::bad(
            "the host must be a hostname, an IPv4 address or an IPv6 address",
        ));
    }
    if !bracketed && host.contains(':') {
        // torch would read `::1` as host ":" and port 1.
        return Err(Reject::bad(
            "an IPv6 address needs brackets: [ADDRESS]:PORT",
        ));
    }
    Ok(Some(Endpoint {
        host: host.to_string(),
        port,
    }))
}

fn parse_host(text: &str) -> Result<String, Reject> {
    if text.trim().is_empty() {
        return Err(Reject::bad("empty"));
    }
    Ok(text.to_string())
}

fn parse_start_method(text: &str) -> Result<StartMethod, Reject> {
    match text {
        "spawn" => Ok(StartMethod::Spawn),
        "fork" => Ok(StartMethod::Fork),
        "forkserver" => Ok(StartMethod::Forkserver),
        _ => Err(Reject::bad("not a start method")),
    }
}

fn parse_monitor_interval(text: &str) -> Result<Duration, Reject> {
    let seconds = py_float(text).ok_or_else(|| Reject::bad("not a number"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(Reject::bad("must be a finite number, not negative"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| Reject::bad("too large"))
}

fn parse_local_ranks(text: &str) -> Result<Option<BTreeSet<u32>>, Reject> {
    if text.is_empty() {
        return Ok(None);
    }
    text.split(',')
        .map(|rank| parse_count(rank).map_err(|reject| reject.part(rank)))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// torch's `RendezvousParameters.get_as_bool`.
fn parse_bool(text: &str) -> Result<bool, Reject> {
    match text.to_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" => Ok(true),
        "0" | "false" | "f" | "no" | "n" => Ok(false),
        _ => Err(Reject::bad("not a boolean")),
    }
}

/// torch's `_parse_rendezvous_config`, then the typed reads of its c10d and static rendezvous.
fn parse_rdzv_conf(text: &str) -> Result<RdzvConf, Reject> {
    let mut conf = RdzvConf::default();
    let text = text.trim();
    if text.is_empty() {
        return Ok(conf);
    }
    for item in text.split(',') {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key.trim(), value.trim()),
            None => (item.trim(), ""),
        };
        if key.is_empty() {
            return Err(Reject::bad("an item without a key").part(item));
        }
        if value.is_empty() {
            return Err(Reject::bad(format!("{key} has no value")).part(item));
        }
        set_rdzv_conf(&mut conf, key, value).map_err(|reject| reject.part(item))?;
    }
    Ok(conf)
}

fn set_rdzv_conf(conf: &mut RdzvConf, key: &str, value: &str) -> Result<(), Reject> {
    let seconds = |value: &str| {
        parse_whole_seconds(value, 1)
            .map_err(|r| r.accepted(format!("{key}=SECONDS, a positive integer")))
    };
    match key {
        "join_timeout" => conf.join_timeout = seconds(value)?,
        "last_call_timeout" => conf.last_call_timeout = seconds(value)?,
        "close_timeout" => conf.close_timeout = seconds(value)?,
        "heartbeat_timeout" => conf.heartbeat_timeout = seconds(value)?,
        "keep_alive_interval" => conf.keep_alive_interval = seconds(value)?,
        "read_timeout" => conf.read_timeout = seconds(value)?,
        "timeout" => conf.timeout = Some(seconds(value)?),
        "keep_alive_max_attempt" => {
            conf.keep_alive_max_attempt = int_in(value, 1, "an integer")
                .map_err(|r| r.accepted("keep_alive_max_attempt=N, a positive integer"))?
        }
        "is_host" => {
            conf.is_host = Some(
                parse_bool(value)
                    .map_err(|r| r.accepted("is_host=true|false (also 1/0, t/f, yes/no, y/n)"))?,
            )
        }
        "cas_backoff_max_seconds" => {
            conf.cas_backoff_max = parse_monitor_interval(value)
                .map_err(|r| r.accepted("cas_backoff_max_seconds=SECONDS, a non-negative number"))?
        }
        "store_type" => match value.to_lowercase().as_str() {
            "tcp" => {}
            "file" => {
                return Err(
                    Reject::bad("trainctl's rendezvous serves its store over TCP")
                        .accepted("store_type=tcp"),
                )
            }
            _ => return Err(Reject::bad("not a store type").accepted("store_type=tcp")),
        },
        "rank" => {
            return Err(
                Reject::bad("torchrun sets it from --node-rank").accepted("--node-rank RANK")
            )
        }
        _ => {
            return Err(
                Reject::bad(format!("unknown key {key:?}")).accepted(format!(
                    "KEY=VALUE,... with KEY one of {}",
                    RDZV_CONF_KEYS.join(", ")
                )),
            )
        }
    }
    Ok(())
}

/// A value and where it came from.
struct Raw {
    value: OsString,
    origin: Origin,
}

/// Reads each flag from the command line, else from its `PET_*` variable.
struct Resolver<'a> {
    line: &'a CommandLine,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Resolver<'_> {
    fn raw(&self, id: FlagId) -> Option<Raw> {
        let flag = flag(id);
        if let Some(value) = self.line.values.get(&id) {
            return Some(Raw {
                value: value.clone(),
                origin: Origin::Flag(flag.long),
            });
        }
        let var = flag.env?;
        (self.env)(var).map(|value| Raw {
            value: value.into(),
            origin: Origin::Env(var),
        })
    }

    /// The flag's value, checked by `check`; `None` when neither given nor in the environment.
    fn value<T>(
        &self,
        id: FlagId,
        check: impl Fn(&str) -> Result<T, Reject>,
    ) -> Result<Option<T>, FlagError> {
        let Some(raw) = self.raw(id) else {
            return Ok(None);
        };
        let flag = flag(id);
        let text = raw.value.to_str().ok_or_else(|| FlagError::BadValue {
            origin: raw.origin,
            value: raw.value.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".to_string(),
            accepted: flag.accepted.to_string(),
        })?;
        check(text)
            .map(Some)
            .map_err(|reject| reject.into_error(flag, raw.origin, text))
    }

    /// Where a switch was turned on, if it was: the command line, or `PET_*` holding a non-zero
    /// integer (argparse_util's `check_env`).
    fn switch_origin(&self, id: FlagId) -> Result<Option<Origin>, FlagError> {
        let flag = flag(id);
        if self.line.switches.contains(&id) {
            return Ok(Some(Origin::Flag(flag.long)));
        }
        let Some(var) = flag.env else {
            return Ok(None);
        };
        let Some(value) = (self.env)(var) else {
            return Ok(None);
        };
        match py_int(&value) {
            Some(n) => Ok((n != 0).then_some(Origin::Env(var))),
            None => Err(FlagError::BadValue {
                origin: Origin::Env(var),
                value,
                reason: "not an integer".to_string(),
                accepted: SWITCH_ENV_ACCEPTED.to_string(),
            }),
        }
    }

    fn switch(&self, id: FlagId) -> Result<bool, FlagError> {
        self.switch_origin(id).map(|origin| origin.is_some())
    }

    fn text(&self, id: FlagId) -> Result<Option<String>, FlagError> {
        self.value(id, |text| Ok(text.to_string()))
    }
}

fn resolve(line: &CommandLine, env: &dyn Fn(&str) -> Option<String>) -> Result<RunArgs, FlagError> {
    if let Some(typed) = &line.unknown {
        return Err(FlagError::Unknown {
            flag: typed.clone(),
            suggestion: suggest(typed),
        });
    }
    let r = Resolver { line, env };
    for flag in FLAGS
        .iter()
        .filter(|flag| flag.section == Section::Unsupported)
    {
        let used = if flag.metavar.is_none() {
            r.switch_origin(flag.id)?
                .map(|origin| origin.name().to_string())
        } else {
            r.raw(flag.id).and_then(|raw| {
                let harmless = flag.id == FlagId::EventLogHandler && raw.value == "null";
                (!harmless).then(|| match raw.origin {
                    Origin::Flag(name) => name.to_string(),
                    Origin::Env(var) => format!("{var}={}", raw.value.to_string_lossy()),
                })
            })
        };
        if let Some(flag_text) = used {
            return Err(FlagError::Unsupported {
                flag: flag_text,
                why: unsupported_why(flag.id),
            });
        }
    }
    let script = line.script.clone().ok_or(FlagError::MissingScript)?;

    let shutdown_timeout = match r.value(FlagId::ShutdownTimeout, |t| parse_whole_seconds(t, 0))? {
        Some(timeout) => timeout,
        None => match env(SHUTDOWN_TIMEOUT_ENV) {
            None => DEFAULT_SHUTDOWN_TIMEOUT,
            Some(value) => parse_whole_seconds(&value, 0).map_err(|reject| {
                reject.into_error(
                    flag(FlagId::ShutdownTimeout),
                    Origin::Env(SHUTDOWN_TIMEOUT_ENV),
                    &value,
                )
            })?,
        },
    };
    let log_line_prefix_template = r
        .text(FlagId::LogLinePrefixTemplate)?
        .filter(|template| !template.is_empty())
        .or_else(|| env(LOG_LINE_PREFIX_TEMPLATE_ENV).filter(|template| !template.is_empty()));

    let args = RunArgs {
        nnodes: r
            .value(FlagId::Nnodes, parse_nnodes)?
            .unwrap_or(NodeRange { min: 1, max: 1 }),
        nproc_per_node: r
            .value(FlagId::NprocPerNode, parse_nproc)?
            .unwrap_or(NprocPerNode::Count(1)),
        rdzv_backend: r
            .value(FlagId::RdzvBackend, parse_backend)?
            .unwrap_or(RdzvBackend::Static),
        rdzv_endpoint: r.value(FlagId::RdzvEndpoint, parse_endpoint)?.flatten(),
        rdzv_id: r
            .text(FlagId::RdzvId)?
            .unwrap_or_else(|| DEFAULT_RDZV_ID.to_string()),
        rdzv_conf: r
            .value(FlagId::RdzvConf, parse_rdzv_conf)?
            .unwrap_or_default(),
        standalone: r.switch(FlagId::Standalone)?,
        max_restarts: r.value(FlagId::MaxRestarts, parse_count)?.unwrap_or(0),
        monitor_interval: r
            .value(FlagId::MonitorInterval, parse_monitor_interval)?
            .unwrap_or(DEFAULT_MONITOR_INTERVAL),
        start_method: r
            .value(FlagId::StartMethod, parse_start_method)?
            .unwrap_or(StartMethod::Spawn),
        role: r
            .text(FlagId::Role)?
            .unwrap_or_else(|| DEFAULT_ROLE.to_string()),
        module: r.switch(FlagId::Module)?,
        no_python: r.switch(FlagId::NoPython)?,
        run_path: r.switch(FlagId::RunPath)?,
        log_dir: r
            .raw(FlagId::LogDir)
            .map(|raw| raw.value)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from),
        redirects: r
            .value(FlagId::Redirects, StdSpec::parse)?
            .unwrap_or_default(),
        tee: r.value(FlagId::Tee, StdSpec::parse)?.unwrap_or_default(),
        log_line_prefix_template,
        local_ranks_filter: r
            .value(FlagId::LocalRanksFilter, parse_local_ranks)?
            .flatten(),
        node_rank: r.value(FlagId::NodeRank, parse_count)?.unwrap_or(0),
        master_addr: r.value(FlagId::MasterAddr, parse_host)?,
        master_port: r.value(FlagId::MasterPort, |t| int_in(t, 0, "an integer"))?,
        local_addr: r.text(FlagId::LocalAddr)?.filter(|addr| !addr.is_empty()),
        signals_to_handle: r
            .text(FlagId::SignalsToHandle)?
            .unwrap_or_else(|| DEFAULT_SIGNALS_TO_HANDLE.to_string()),
        shutdown_timeout,
        cluster: r.switch(FlagId::Cluster)?,
        addr: r.text(FlagId::Addr)?,
        script,
        script_args: line.script_args.clone(),
    };
    // torchrun checks this only when it is about to start python (`--run-path` wins).
    if args.module && args.no_python && !args.run_path {
        return Err(FlagError::ModuleWithNoPython);
    }
    Ok(args)
}

/// The known flag nearest to an unknown one, if it is near (a typo, `_` for `-`, one dash missing).
fn suggest(typed: &str) -> Option<&'static str> {
    let typed = typed.replace('_', "-");
    let tries = [typed.clone(), format!("-{typed}")];
    FLAGS
        .iter()
        .map(|flag| {
            let distance = tries
                .iter()
                .map(|attempt| edit_distance(attempt, flag.long))
                .min()
                .unwrap_or(usize::MAX);
            (distance, flag.long)
        })
        .min()
        .filter(|(distance, long)| *distance <= (long.len() / 4).max(2))
        .map(|(_, long)| long)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: Streams = Streams {
        stdout: true,
        stderr: false,
    };
    const ERR: Streams = Streams {
        stdout: false,
        stderr: true,
    };

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse_with(argv: &[&str], env: &[(&str, &str)]) -> Result<Parsed, FlagError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(&os(argv), &|name| env.get(name).cloned())
    }

    /// torchrun's defaults, written out: `torchrun train.py`.
    fn defaults() -> RunArgs {
        RunArgs {
            nnodes: NodeRange { min: 1, max: 1 },
            nproc_per_node: NprocPerNode::Count(1),
            rdzv_backend: RdzvBackend::Static,
            rdzv_endpoint: None,
            rdzv_id: "none".into(),
            rdzv_conf: RdzvConf {
                join_timeout: Duration::from_secs(600),
                last_call_timeout: Duration::from_secs(30),
                close_timeout: Duration::from_secs(30),
                heartbeat_timeout: Duration::from_secs(5),
                keep_alive_interval: Duration::from_secs(5),
                keep_alive_max_attempt: 3,
                read_timeout: Duration::from_secs(60),
                is_host: None,
                timeout: None,
                cas_backoff_max: Duration::ZERO,
            },
            standalone: false,
            max_restarts: 0,
            monitor_interval: Duration::from_millis(100),
            start_method: StartMethod::Spawn,
            role: "default".into(),
            module: false,
            no_python: false,
            run_path: false,
            log_dir: None,
            redirects: StdSpec::All(Streams::NONE),
            tee: StdSpec::All(Streams::NONE),
            log_line_prefix_template: None,
            local_ranks_filter: None,
            node_rank: 0,
            master_addr: None,
            master_port: None,
            local_addr: None,
            signals_to_handle: "SIGTERM,SIGINT,SIGHUP,SIGQUIT".into(),
            shutdown_timeout: Duration::from_secs(30),
            cluster: false,
            addr: None,
            script: "train.py".into(),
            script_args: Vec::new(),
        }
    }

    enum Want {
        /// The defaults, changed by the function.
        Args(fn(&mut RunArgs)),
        /// An error whose text contains this.
        Err(&'static str),
        Help,
    }

    struct Row {
        argv: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
        want: Want,
    }

    const fn row(argv: &'static [&'static str], want: Want) -> Row {
        Row {
            argv,
            env: &[],
            want,
        }
    }

    const fn row_env(
        argv: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
        want: Want,
    ) -> Row {
        Row { argv, env, want }
    }

    fn script_args(args: &mut RunArgs, list: &[&str]) {
        args.script_args = os(list);
    }

    use Want::{Args, Err as Fails, Help as Helps};

    const ROWS: &[Row] = &[
        // Defaults and both spellings, with and without `=`.
        row(&["train.py"], Args(|_| {})),
        row(&["--nproc-per-node", "4", "train.py"], Args(|a| a.nproc_per_node = NprocPerNode::Count(4))),
        row(&["--nproc_per_node=4", "train.py"], Args(|a| a.nproc_per_node = NprocPerNode::Count(4))),
        row(&["--nproc-per-node=gpu", "train.py"], Args(|a| a.nproc_per_node = NprocPerNode::Gpu)),
        row(&["--nproc_per_node", "cpu", "train.py"], Args(|a| a.nproc_per_node = NprocPerNode::Cpu)),
        row(&["--nproc-per-node", "auto", "train.py"], Args(|a| a.nproc_per_node = NprocPerNode::Auto)),
        row(&["--nproc-per-node", "0", "train.py"], Fails(r#"--nproc-per-node: "0": must be at least 1"#)),
        row(&["--nproc-per-node", "xpu", "train.py"], Fails("XPU")),
        row(&["--nproc-per-node", " gpu", "train.py"], Fails("not a number of workers (accepted: a positive integer, auto, cpu or gpu)")),
        row(&["--nnodes", "2", "train.py"], Args(|a| a.nnodes = NodeRange { min: 2, max: 2 })),
        row(&["--nnodes=1:4", "train.py"], Args(|a| a.nnodes = NodeRange { min: 1, max: 4 })),
        row(
            &["--nnodes", "3:2", "train.py"],
            Fails(r#"--nnodes: "3:2": MIN must not exceed MAX (accepted: N or MIN:MAX, e.g. 2 or 1:4)"#),
        ),
        row(&["--nnodes", "0:2", "train.py"], Fails("MIN must be at least 1")),
        row(&["--nnodes", "0", "train.py"], Fails("N must be at least 1")),
        row(&["--nnodes", "1:2:3", "train.py"], Fails("not N or MIN:MAX")),
        row(&["--nnodes", "x", "train.py"], Fails(r#""x" is not an integer"#)),
        row(&["--max-restarts", " 3", "train.py"], Args(|a| a.max_restarts = 3)),
        row(&["--max_restarts=1_0", "train.py"], Args(|a| a.max_restarts = 10)),
        row(&["--max-restarts", "-1", "train.py"], Fails("must not be negative")),
        row(&["--monitor-interval", "0.5", "train.py"], Args(|a| a.monitor_interval = Duration::from_millis(500))),
        row(&["--monitor_interval=5", "train.py"], Args(|a| a.monitor_interval = Duration::from_secs(5))),
        row(&["--monitor-interval", "nan", "train.py"], Fails("finite")),
        row(&["--start-method", "fork", "train.py"], Args(|a| a.start_method = StartMethod::Fork)),
        row(&["--start_method=forkserver", "train.py"], Args(|a| a.start_method = StartMethod::Forkserver)),
        row(&["--start-method", "thread", "train.py"], Fails("spawn, fork or forkserver")),
        row(&["--role", "trainer", "train.py"], Args(|a| a.role = "trainer".into())),
        row(&["--log-dir", "/tmp/logs", "train.py"], Args(|a| a.log_dir = Some("/tmp/logs".into()))),
        row(&["--log_dir=", "train.py"], Args(|_| {})),
        row(&["--local-ranks-filter", "0,2", "train.py"], Args(|a| a.local_ranks_filter = Some([0, 2].into()))),
        row(&["--local_ranks_filter=0,,1", "train.py"], Fails(r#"--local-ranks-filter: "": not an integer"#)),
        row(
            &["--log-line-prefix-template", "[${rank}]", "train.py"],
            Args(|a| a.log_line_prefix_template = Some("[${rank}]".into())),
        ),
        row_env(
            &["train.py"],
            &[("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "${rank}:")],
            Args(|a| a.log_line_prefix_template = Some("${rank}:".into())),
        ),
        // Static rendezvous: whether the port was given is kept.
        row(
            &["--master-addr", "10.0.0.1", "--master_port=1234", "--node-rank", "1", "train.py"],
            Args(|a| {
                a.master_addr = Some("10.0.0.1".into());
                a.master_port = Some(1234);
                a.node_rank = 1;
            }),
        ),
        row_env(&["train.py"], &[("PET_MASTER_PORT", "29501")], Args(|a| a.master_port = Some(29501))),
        row(&["--master-port", "70000", "train.py"], Fails("too large")),
        row(&["--node-rank", "-1", "train.py"], Fails(r#"--node-rank: "-1": must not be negative"#)),
        row(&["--master-addr=", "train.py"], Fails("--master-addr")),
        row(&["--local-addr", "node3", "train.py"], Args(|a| a.local_addr = Some("node3".into()))),
        // Rendezvous.
        row(
            &["--rdzv-backend=c10d", "--rdzv_endpoint", "node0:29401", "--rdzv-id", "job7", "train.py"],
            Args(|a| {
                a.rdzv_backend = RdzvBackend::C10d;
                a.rdzv_endpoint = Some(Endpoint { host: "node0".into(), port: Some(29401) });
                a.rdzv_id = "job7".into();
            }),
        ),
        row(&["--rdzv-endpoint", "node0", "train.py"], Args(|a| a.rdzv_endpoint = Some(Endpoint { host: "node0".into(), port: None }))),
        row(&["--rdzv-endpoint", "[::1]:1234", "train.py"], Args(|a| a.rdzv_endpoint = Some(Endpoint { host: "::1".into(), port: Some(1234) }))),
        row(&["--rdzv-endpoint", "[fd00::1]", "train.py"], Args(|a| a.rdzv_endpoint = Some(Endpoint { host: "fd00::1".into(), port: None }))),
        row(&["--rdzv-endpoint", " ", "train.py"], Args(|_| {})),
        row(&["--rdzv-endpoint", "node0:99999", "train.py"], Fails("0 to 65535")),
        row(&["--rdzv-endpoint", "node0:", "train.py"], Fails("0 to 65535")),
        row(&["--rdzv-endpoint", "fd00::1", "train.py"], Fails("brackets")),
        row(&["--rdzv-endpoint", "a b:1", "train.py"], Fails("hostname")),
        row(&["--rdzv-backend", "etcd", "train.py"], Fails("--rdzv-backend=etcd: not supported by trainctl run: trainctl has its own rendezvous")),
        row_env(&["train.py"], &[("PET_RDZV_BACKEND", "etcd-v2")], Fails("PET_RDZV_BACKEND=etcd-v2: not supported")),
        row(&["--rdzv-backend", "zk", "train.py"], Fails("(accepted: static or c10d)")),
        row(
            &[
                "--rdzv-conf",
                " join_timeout=900, is_host=TRUE,read_timeout=10,last_call_timeout=5,close_timeout=7,\
                 keep_alive_interval=2,keep_alive_max_attempt=4,timeout=100,heartbeat_timeout=9,\
                 cas_backoff_max_seconds=0.5,store_type=tcp,join_timeout=901",
                "train.py",
            ],
            Args(|a| {
                a.rdzv_conf = RdzvConf {
                    join_timeout: Duration::from_secs(901),
                    last_call_timeout: Duration::from_secs(5),
                    close_timeout: Duration::from_secs(7),
                    heartbeat_timeout: Duration::from_secs(9),
                    keep_alive_interval: Duration::from_secs(2),
                    keep_alive_max_attempt: 4,
                    read_timeout: Duration::from_secs(10),
                    is_host: Some(true),
                    timeout: Some(Duration::from_secs(100)),
                    cas_backoff_max: Duration::from_millis(500),
                }
            }),
        ),
        row(&["--rdzv_conf=is_host=0", "train.py"], Args(|a| a.rdzv_conf.is_host = Some(false))),
        row(
            &["--rdzv-conf", "join_timout=5", "train.py"],
            Fails(r#"--rdzv-conf: "join_timout=5": unknown key "join_timout" (accepted: KEY=VALUE,... with KEY one of join_timeout, last_call_timeout,"#),
        ),
        row(&["--rdzv-conf", "join_timeout", "train.py"], Fails("join_timeout has no value")),
        row(&["--rdzv-conf", "join_timeout=0", "train.py"], Fails(r#""join_timeout=0": must be at least 1 (accepted: join_timeout=SECONDS, a positive integer)"#)),
        row(&["--rdzv-conf", "is_host=maybe", "train.py"], Fails("not a boolean")),
        row(&["--rdzv-conf", "read_timeout=5,", "train.py"], Fails("an item without a key")),
        row(&["--rdzv-conf", "store_type=file", "train.py"], Fails("over TCP")),
        row(&["--rdzv-conf", "rank=1", "train.py"], Fails("--node-rank")),
        row(&["--standalone", "train.py"], Args(|a| a.standalone = true)),
        // Redirects and tee.
        row(&["-r", "3", "train.py"], Args(|a| a.redirects = StdSpec::All(Streams::BOTH))),
        row(&["-r1", "train.py"], Args(|a| a.redirects = StdSpec::All(OUT))),
        row(&["-r=2", "train.py"], Args(|a| a.redirects = StdSpec::All(ERR))),
        row(&["--redirects=3", "--tee", "1", "train.py"], Args(|a| {
            a.redirects = StdSpec::All(Streams::BOTH);
            a.tee = StdSpec::All(OUT);
        })),
        row(
            &["-t", "0:1,1:2,0:3", "train.py"],
            Args(|a| a.tee = StdSpec::PerRank([(0, Streams::BOTH), (1, ERR)].into())),
        ),
        row(&["--tee", "4", "train.py"], Fails(r#"--tee: "4": not a mask from 0 to 3"#)),
        row(&["-r", "10:1", "train.py"], Fails("one-digit LOCAL_RANK")),
        row(&["-r", "", "train.py"], Fails("--redirects")),
        // -m, --no-python, --run-path.
        row(&["-m", "pkg.train", "--lr", "0.1"], Args(|a| {
            a.module = true;
            a.script = "pkg.train".into();
            script_args(a, &["--lr", "0.1"]);
        })),
        row(&["--module", "train.py"], Args(|a| a.module = true)),
        row(&["--no_python", "train.py"], Args(|a| a.no_python = true)),
        row(&["--no-python", "-m", "train.py"], Fails("Don't use both the '--no-python' flag and the '--module' flag at the same time.")),
        row(&["--run-path", "--no-python", "-m", "train.py"], Args(|a| {
            a.run_path = true;
            a.no_python = true;
            a.module = true;
        })),
        row(&["-mr3", "train.py"], Args(|a| {
            a.module = true;
            a.redirects = StdSpec::All(Streams::BOTH);
        })),
        row(&["-mt", "1", "train.py"], Args(|a| {
            a.module = true;
            a.tee = StdSpec::All(OUT);
        })),
        row(&["-m=1", "train.py"], Fails(r#"-m: takes no value, got "1""#)),
        row(&["--standalone=1", "train.py"], Fails(r#"--standalone: takes no value, got "1""#)),
        // The environment: PET_*, and the command line wins.
        row_env(
            &["train.py"],
            &[("PET_NPROC_PER_NODE", "8"), ("PET_NNODES", "2:4"), ("PET_STANDALONE", " 2 "), ("PET_MODULE", "0"), ("PET_MAX_RESTARTS", "3")],
            Args(|a| {
                a.nproc_per_node = NprocPerNode::Count(8);
                a.nnodes = NodeRange { min: 2, max: 4 };
                a.standalone = true;
                a.max_restarts = 3;
            }),
        ),
        row_env(
            &["--nproc-per-node=2", "--standalone", "-r", "1", "train.py"],
            &[("PET_NPROC_PER_NODE", "8"), ("PET_STANDALONE", "0"), ("PET_REDIRECTS", "3")],
            Args(|a| {
                a.nproc_per_node = NprocPerNode::Count(2);
                a.standalone = true;
                a.redirects = StdSpec::All(OUT);
            }),
        ),
        row_env(&["train.py"], &[("PET_TEE", "0:3")], Args(|a| a.tee = StdSpec::PerRank([(0, Streams::BOTH)].into()))),
        row_env(&["train.py"], &[("PET_NNODES", "3:2")], Fails(r#"PET_NNODES="3:2" (environment): MIN must not exceed MAX"#)),
        row_env(&["train.py"], &[("PET_MAX_RESTARTS", "")], Fails(r#"PET_MAX_RESTARTS="" (environment): not an integer"#)),
        row_env(&["train.py"], &[("PET_STANDALONE", "yes")], Fails(r#"PET_STANDALONE="yes" (environment): not an integer"#)),
        row_env(&["--nnodes", "2", "train.py"], &[("PET_NNODES", "x")], Args(|a| a.nnodes = NodeRange { min: 2, max: 2 })),
        row_env(&["train.py"], &[("PET_LOG_DIR", "/var/log/t")], Args(|a| a.log_dir = Some("/var/log/t".into()))),
        row_env(&["train.py"], &[("PET_CLUSTER", "1"), ("PET_ADDR", "x")], Args(|_| {})),
        row(&["--shutdown-timeout", "5", "--signals-to-handle", "SIGTERM,SIGUSR1", "train.py"], Args(|a| {
            a.shutdown_timeout = Duration::from_secs(5);
            a.signals_to_handle = "SIGTERM,SIGUSR1".into();
        })),
        row_env(&["train.py"], &[("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "7")], Args(|a| a.shutdown_timeout = Duration::from_secs(7))),
        row_env(&["--shutdown-timeout=2", "train.py"], &[("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "7")], Args(|a| a.shutdown_timeout = Duration::from_secs(2))),
        row_env(&["train.py"], &[("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "soon")], Fails("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=\"soon\" (environment)")),
        // The script and its arguments.
        row(&["train.py", "--nnodes", "5", "-h", "--foo", "--log", "1"], Args(|a| script_args(a, &["--nnodes", "5", "-h", "--foo", "--log", "1"]))),
        row(&["--", "train.py", "--x"], Args(|a| script_args(a, &["--x"]))),
        row(&["--standalone", "--", "train.py"], Args(|a| a.standalone = true)),
        row(&["--", "--", "a"], Args(|a| {
            a.script = "--".into();
            script_args(a, &["a"]);
        })),
        row(&["train.py", "--", "a"], Args(|a| script_args(a, &["a"]))),
        row(&["train.py", "--", "--", "a"], Args(|a| script_args(a, &["--", "a"]))),
        row(&["train.py", "a", "--", "b"], Args(|a| script_args(a, &["a", "--", "b"]))),
        row(&["-", "a"], Args(|a| {
            a.script = "-".into();
            script_args(a, &["a"]);
        })),
        row(&["-1", "a"], Args(|a| {
            a.script = "-1".into();
            script_args(a, &["a"]);
        })),
        row(&["-x y", "a"], Args(|a| {
            a.script = "-x y".into();
            script_args(a, &["a"]);
        })),
        row(&[], Fails("missing the training script")),
        row(&["--standalone"], Fails("missing the training script")),
        row(&["--"], Fails("missing the training script")),
        row(&["--log-dir", "-x", "train.py"], Fails("--log-dir: expected a value (accepted: a directory)")),
        row(&["--log-dir", "--", "train.py"], Fails("--log-dir: expected a value")),
        row(&["--log-dir"], Fails("--log-dir: expected a value")),
        // Abbreviations, as argparse: unique prefixes of one spelling.
        row(&["--stand", "--nproc-", "2", "train.py"], Args(|a| {
            a.standalone = true;
            a.nproc_per_node = NprocPerNode::Count(2);
        })),
        row(&["--nn=2", "--mod", "train.py"], Args(|a| {
            a.nnodes = NodeRange { min: 2, max: 2 };
            a.module = true;
        })),
        row(&["--nproc", "2", "train.py"], Fails("ambiguous flag --nproc: could be --nproc-per-node, --nproc_per_node")),
        row(&["--lo", "x", "train.py"], Fails("ambiguous flag --lo")),
        // Unknown and unsupported flags.
        row(&["--nprocs-per-node", "2", "train.py"], Fails("unknown flag --nprocs-per-node; did you mean --nproc-per-node?")),
        row(&["-nnodes=2", "train.py"], Fails("unknown flag -nnodes; did you mean --nnodes?")),
        row(&["--master_address", "h", "train.py"], Fails("did you mean --master-addr?")),
        row(&["--gpus", "2", "train.py"], Fails("unknown flag --gpus (trainctl run --help lists the flags)")),
        row(&["--numa-binding", "node", "train.py"], Fails("--numa-binding: not supported by trainctl run: ")),
        row(&["--numa-", "node", "train.py"], Fails("--numa-binding: not supported")),
        row(&["--numa", "node", "train.py"], Fails("ambiguous flag --numa: could be --numa-binding, --numa_binding")),
        row(&["--logs_specs", "x", "train.py"], Fails("--logs-specs: not supported")),
        row(&["--event-log-handler", "console", "train.py"], Fails("--event-log-handler: not supported")),
        row(&["--event-log-handler", "null", "train.py"], Args(|_| {})),
        row(&["--duplicate-stdout-filters", "loss", "train.py"], Fails("--duplicate-stdout-filters: not supported")),
        row(&["--duplicate_stderr_filters=x", "train.py"], Fails("--duplicate-stderr-filters: not supported")),
        row(&["--virtual-local-rank", "train.py"], Fails("--virtual-local-rank: not supported")),
        row_env(&["train.py"], &[("PET_VIRTUAL_LOCAL_RANK", "1")], Fails("PET_VIRTUAL_LOCAL_RANK: not supported")),
        row_env(&["train.py"], &[("PET_VIRTUAL_LOCAL_RANK", "0")], Args(|_| {})),
        row_env(&["train.py"], &[("PET_EVENT_LOG_HANDLER", "console")], Fails("PET_EVENT_LOG_HANDLER=console: not supported")),
        row(&["--print-completion", "bash"], Fails("--print-completion: not supported")),
        // trainctl's own flags.
        row(&["--cluster", "--addr", "h1:7000,h2:7000", "train.py"], Args(|a| {
            a.cluster = true;
            a.addr = Some("h1:7000,h2:7000".into());
        })),
        row(&["--cl", "--addr=h1", "train.py"], Args(|a| {
            a.cluster = true;
            a.addr = Some("h1".into());
        })),
        // Help wins over what follows it, as argparse's help action exits at once.
        row(&["-h"], Helps),
        row(&["--nnodes", "2", "--help", "train.py"], Helps),
        row(&["--foo", "-h"], Helps),
        row(&["--he"], Helps),
        row(&["-mh"], Helps),
        row(&["-hx"], Fails(r#"-h: takes no value, got "x""#)),
    ];

    #[test]
    fn command_lines_parse_as_the_table_says() {
        let mut failures = Vec::new();
        for Row { argv, env, want } in ROWS {
            let got = parse_with(argv, env);
            let ok = match (want, &got) {
                (Want::Args(change), Ok(Parsed::Run(args))) => {
                    let mut expected = defaults();
                    change(&mut expected);
                    if *args == expected {
                        true
                    } else {
                        failures.push(format!(
                            "{argv:?} {env:?}:\n  got  {args:?}\n  want {expected:?}"
                        ));
                        continue;
                    }
                }
                (Want::Err(text), Err(err)) => err.to_string().contains(text),
                (Want::Help, Ok(Parsed::Help(_))) => true,
                _ => false,
            };
            if !ok {
                let got = match &got {
                    Ok(Parsed::Run(args)) => format!("{args:?}"),
                    Ok(Parsed::Help(_)) => "help".to_string(),
                    Err(err) => format!("error: {err}"),
                };
                let want = match want {
                    Want::Args(_) => "arguments".to_string(),
                    Want::Err(text) => format!("an error containing {text:?}"),
                    Want::Help => "help".to_string(),
                };
                failures.push(format!("{argv:?} {env:?}: got {got}, want {want}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} rows failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn non_utf8_script_and_log_dir_pass_through() {
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(vec![b't', 0xff, b'.', b'p', b'y']);
        let dir = OsString::from_vec(vec![b'/', 0xfe]);
        let argv = vec!["--log-dir".into(), dir.clone(), odd.clone(), odd.clone()];
        let Ok(Parsed::Run(args)) = parse(&argv, &|_| None) else {
            panic!("not parsed");
        };
        assert_eq!(args.script, odd);
        assert_eq!(args.script_args, vec![odd]);
        assert_eq!(args.log_dir, Some(PathBuf::from(dir)));
        let argv = vec![
            "--role".into(),
            OsString::from_vec(vec![0xff]),
            "train.py".into(),
        ];
        let err = parse(&argv, &|_| None).unwrap_err();
        assert!(
            err.to_string()
                .contains("--role: \"\u{fffd}\": not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn std_for_answers_per_local_rank() {
        let spec = StdSpec::parse("0:3,2:1").ok().unwrap();
        assert_eq!(spec.std_for(0), Streams::BOTH);
        assert_eq!(spec.std_for(1), Streams::NONE);
        assert_eq!(spec.std_for(2), OUT);
        assert_eq!(StdSpec::All(ERR).std_for(7), ERR);
        assert_eq!(streams_from_mask(2), ERR);
        assert_eq!(streams_from_mask(3), Streams::BOTH);
    }

    #[test]
    fn accessors_apply_torchruns_defaults() {
        let args = defaults();
        assert_eq!(args.master_addr(), "127.0.0.1");
        assert_eq!(args.master_port(), 29500);
        let endpoint = Endpoint {
            host: "h".into(),
            port: None,
        };
        assert_eq!(endpoint.port_or(C10D_DEFAULT_PORT), 29400);
        assert_eq!(RdzvConf::default(), defaults().rdzv_conf);
        let timeout = defaults().rdzv_conf.timeout.unwrap_or(DEFAULT_RDZV_TIMEOUT);
        assert_eq!(timeout, Duration::from_secs(900));
        assert_eq!(NodeRange { min: 1, max: 4 }.to_string(), "1:4");
    }

    #[test]
    fn the_flag_table_is_consistent_and_the_help_lists_every_flag() {
        let help = help_text();
        assert!(help.contains("\ntrainctl:\n  --cluster "), "{help}");
        let mut names = BTreeSet::new();
        for flag in FLAGS {
            assert!(
                help.contains(&format!("  {}", flag.long))
                    || help.contains(&format!(", {}", flag.long)),
                "{}",
                flag.long
            );
            for name in flag.names() {
                assert!(names.insert(name), "{name} twice");
            }
            if let Some(alias) = flag.alias {
                assert_eq!(alias, flag.long.replace('-', "_").replacen("__", "--", 1));
            }
            // argparse_util's env actions read PET_<DEST>, DEST being the first long spelling.
            if let Some(var) = flag.env {
                let dest = flag
                    .long
                    .trim_start_matches('-')
                    .replace('-', "_")
                    .to_uppercase();
                assert_eq!(var, format!("PET_{dest}"));
            }
            assert_eq!(
                flag.section == Section::Unsupported,
                !unsupported_why(flag.id).is_empty(),
                "{}",
                flag.long
            );
        }
        for line in help.lines().filter(|line| line.starts_with("  -")) {
            assert!(
                line.chars().count() <= HELP_WIDTH,
                "help line too long: {line}"
            );
        }
        let Ok(Parsed::Help(text)) = parse_with(&["-h"], &[]) else {
            panic!("no help");
        };
        assert_eq!(text, help);
    }

    #[test]
    fn edit_distance_counts_single_char_edits() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("--nnode", "--nnodes"), 1);
        assert_eq!(suggest("--zzzzzzzz"), None);
    }

    /// The argv and environment of one comparison with the real torchrun.
    struct Compared {
        argv: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
    }

    const fn cmp(
        argv: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
    ) -> Compared {
        Compared { argv, env }
    }

    /// Command lines both parsers must read the same way (or both refuse).
    const COMPARED: &[Compared] = &[
        cmp(&["train.py"], &[]),
        cmp(
            &[
                "--nproc-per-node=4",
                "--nnodes",
                "1:3",
                "train.py",
                "--lr",
                "0.1",
                "--nnodes",
                "7",
            ],
            &[],
        ),
        cmp(
            &[
                "--nproc_per_node",
                "gpu",
                "--max_restarts=2",
                "-m",
                "pkg.mod",
                "x",
            ],
            &[],
        ),
        cmp(
            &[
                "--rdzv-backend=c10d",
                "--rdzv-endpoint",
                "node0:29401",
                "--rdzv-id",
                "job7",
                "--rdzv-conf",
                "join_timeout=900, is_host=true,read_timeout=10,keep_alive_max_attempt=5",
                "train.py",
            ],
            &[],
        ),
        cmp(&["--rdzv_endpoint=[::1]:1234", "train.py"], &[]),
        cmp(&["--rdzv-endpoint", "[fd00::1]", "train.py"], &[]),
        cmp(&["--rdzv-endpoint", "node0", "train.py"], &[]),
        cmp(
            &["-r", "3", "-t0:1,1:2", "--log-dir", "/tmp/x", "train.py"],
            &[],
        ),
        cmp(&["-mr3", "--tee=2", "train.py"], &[]),
        cmp(
            &[
                "--local-ranks-filter",
                "0,2",
                "--role",
                "trainer",
                "--monitor-interval",
                "0.5",
                "train.py",
            ],
            &[],
        ),
        cmp(
            &[
                "--monitor_interval=1e-2",
                "--start-method",
                "fork",
                "train.py",
            ],
            &[],
        ),
        cmp(
            &[
                "--master-addr",
                "10.0.0.1",
                "--master-port",
                "1234",
                "--node-rank",
                "1",
                "--nnodes",
                "2",
                "train.py",
            ],
            &[],
        ),
        cmp(&["--standalone", "--no-python", "./run.sh", "-x"], &[]),
        cmp(&["--run-path", "--no-python", "-m", "/abs/train.py"], &[]),
        cmp(&["--stand", "--nproc-", "2", "--nn=2", "train.py"], &[]),
        cmp(&["--", "train.py", "--x"], &[]),
        cmp(&["train.py", "--", "a"], &[]),
        cmp(&["train.py", "--", "--", "a"], &[]),
        cmp(&["train.py", "a", "--", "b"], &[]),
        cmp(&["--", "--", "a"], &[]),
        cmp(&["-1", "a"], &[]),
        cmp(
            &[
                "--shutdown-timeout",
                "5",
                "--signals-to-handle",
                "SIGUSR1",
                "--local-addr",
                "n3",
                "train.py",
            ],
            &[],
        ),
        cmp(
            &[
                "--log-line-prefix-template",
                "[${rank}] ",
                "--event-log-handler",
                "null",
                "train.py",
            ],
            &[],
        ),
        cmp(
            &["train.py"],
            &[
                ("PET_NPROC_PER_NODE", "8"),
                ("PET_NNODES", "2:4"),
                ("PET_STANDALONE", "1"),
                ("PET_MODULE", "0"),
                ("PET_MAX_RESTARTS", "3"),
                ("PET_MASTER_PORT", "29501"),
                ("PET_REDIRECTS", "0:3"),
                ("PET_RDZV_CONF", "timeout=60"),
                ("PET_LOG_DIR", "/var/log/t"),
                ("PET_NO_PYTHON", "2"),
            ],
        ),
        cmp(
            &[
                "--nproc-per-node",
                "2",
                "--standalone",
                "--max-restarts=1",
                "train.py",
            ],
            &[
                ("PET_NPROC_PER_NODE", "8"),
                ("PET_STANDALONE", "0"),
                ("PET_MAX_RESTARTS", "3"),
            ],
        ),
        cmp(
            &["train.py"],
            &[
                ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "7"),
                ("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "${rank}:"),
            ],
        ),
        // Both refuse these.
        cmp(&["--nnodes", "3:2", "train.py"], &[]),
        cmp(&["--nnodes=0", "train.py"], &[]),
        cmp(&["--nproc", "2", "train.py"], &[]),
        cmp(&["--foo", "train.py"], &[]),
        cmp(&[], &[]),
        cmp(&["--standalone"], &[]),
        cmp(&["--no-python", "-m", "train.py"], &[]),
        cmp(&["--start-method", "thread", "train.py"], &[]),
        cmp(&["--max-restarts", "-1", "train.py"], &[]),
        cmp(&["--max-restarts", "x", "train.py"], &[]),
        cmp(&["--rdzv-conf", "join_timeout", "train.py"], &[]),
        cmp(&["--rdzv-conf", "join_timeout=0", "train.py"], &[]),
        cmp(&["--rdzv-conf", "is_host=maybe", "train.py"], &[]),
        cmp(&["-r", "4", "train.py"], &[]),
        cmp(&["-r", "10:1", "train.py"], &[]),
        cmp(&["-m=1", "train.py"], &[]),
        cmp(&["--standalone=1", "train.py"], &[]),
        cmp(&["--log-dir", "-x", "train.py"], &[]),
        cmp(&["--rdzv-endpoint", "h:99999", "train.py"], &[]),
        cmp(&["--master-port", "x", "train.py"], &[]),
        cmp(&["--local-ranks-filter", "0,,1", "train.py"], &[]),
        cmp(&["--nproc-per-node", "many", "train.py"], &[]),
        cmp(&["train.py"], &[("PET_MAX_RESTARTS", "")]),
        cmp(&["train.py"], &[("PET_STANDALONE", "yes")]),
        cmp(&["train.py"], &[("PET_NNODES", "3:2")]),
    ];

    /// Parses each case with torchrun's own parser and normalises what torchrun then derives from it
    /// (`config_from_args`, `Std.from_str`, the rendezvous' typed reads), as JSON; a refusal is
    /// `{"error": ...}`.
    const TORCHRUN_VIEW: &str = r#"
import contextlib, io, json, os, sys
from torch.distributed.run import get_args_parser, parse_min_max_nnodes
from torch.distributed.elastic.multiprocessing.api import Std
from torch.distributed.elastic.rendezvous.api import RendezvousParameters
from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint

OWN = ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")

def std(value):
    s = Std.from_str(value)
    return {str(k): int(v) for k, v in s.items()} if isinstance(s, dict) else int(s)

def view(argv):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        ns = get_args_parser().parse_args(argv)
    lo, hi = parse_min_max_nnodes(ns.nnodes)
    if not 0 < lo <= hi: raise ValueError("nnodes")
    if ns.max_restarts < 0: raise ValueError("max_restarts")
    try:
        nproc = int(ns.nproc_per_node)
        if nproc < 1: raise ValueError("nproc")
    except ValueError:
        if ns.nproc_per_node not in ("auto", "cpu", "gpu"): raise
        nproc = ns.nproc_per_node
    conf = _parse_rendezvous_config(ns.rdzv_conf)
    p = RendezvousParameters("c10d", "", "id", 1, 1, **conf)
    typed = {k: p.get_as_int(k, d) for k, d in [("join_timeout", 600), ("last_call_timeout", 30),
             ("close_timeout", 30), ("heartbeat_timeout", 5), ("keep_alive_interval", 5),
             ("keep_alive_max_attempt", 3), ("read_timeout", 60), ("timeout", None)]}
    for k in ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "read_timeout"):
        if typed[k] <= 0: raise ValueError(k)
    typed["is_host"] = p.get_as_bool("is_host")
    endpoint = None
    if ns.rdzv_endpoint.strip():
        host, port = parse_rendezvous_endpoint(ns.rdzv_endpoint, -1)
        endpoint = [host, None if port == -1 else port]
    if not ns.run_path and ns.no_python and ns.module: raise ValueError("module and no_python")
    ranks = sorted(set(map(int, ns.local_ranks_filter.split(",")))) if ns.local_ranks_filter else None
    shutdown = ns.shutdown_timeout
    if shutdown is None: shutdown = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    if shutdown < 0: raise ValueError("shutdown_timeout")
    if ns.start_method not in ("spawn", "fork", "forkserver"): raise ValueError("start_method")
    return {
        "nnodes": [lo, hi], "nproc_per_node": nproc, "rdzv_backend": ns.rdzv_backend,
        "rdzv_endpoint": endpoint, "rdzv_id": ns.rdzv_id, "rdzv_conf": typed, "standalone": ns.standalone,
        "max_restarts": ns.max_restarts, "monitor_interval": ns.monitor_interval,
        "start_method": ns.start_method, "role": ns.role, "module": ns.module, "no_python": ns.no_python,
        "run_path": ns.run_path, "log_dir": ns.log_dir or None, "redirects": std(ns.redirects),
        "tee": std(ns.tee),
        "log_line_prefix_template": ns.log_line_prefix_template or os.getenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE") or None,
        "local_ranks_filter": ranks, "node_rank": ns.node_rank, "master_addr": ns.master_addr,
        "master_port": ns.master_port, "local_addr": ns.local_addr or None,
        "signals_to_handle": ns.signals_to_handle, "shutdown_timeout": shutdown,
        "training_script": ns.training_script, "training_script_args": ns.training_script_args,
    }

out = []
for case in json.loads(sys.argv[1]):
    for k in list(os.environ):
        if k.startswith("PET_") or k in OWN: del os.environ[k]
    os.environ.update(case["env"])
    try:
        out.append(view(case["argv"]))
    except BaseException as e:
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"#;

    /// Our parse in the same shape as `TORCHRUN_VIEW`'s.
    fn our_view(args: &RunArgs) -> serde_json::Value {
        let std = |spec: &StdSpec| match spec {
            StdSpec::All(s) => serde_json::json!(u8::from(s.stdout) + 2 * u8::from(s.stderr)),
            StdSpec::PerRank(map) => serde_json::Value::Object(
                map.iter()
                    .map(|(rank, s)| {
                        (
                            rank.to_string(),
                            serde_json::json!(u8::from(s.stdout) + 2 * u8::from(s.stderr)),
                        )
                    })
                    .collect(),
            ),
        };
        let conf = &args.rdzv_conf;
        serde_json::json!({
            "nnodes": [args.nnodes.min, args.nnodes.max],
            "nproc_per_node": match args.nproc_per_node {
                NprocPerNode::Count(n) => serde_json::json!(n),
                NprocPerNode::Auto => serde_json::json!("auto"),
                NprocPerNode::Cpu => serde_json::json!("cpu"),
                NprocPerNode::Gpu => serde_json::json!("gpu"),
            },
            "rdzv_backend": match args.rdzv_backend { RdzvBackend::Static => "static", RdzvBackend::C10d => "c10d" },
            "rdzv_endpoint": args.rdzv_endpoint.as_ref().map(|e| serde_json::json!([e.host, e.port])),
            "rdzv_id": args.rdzv_id,
            "rdzv_conf": {
                "join_timeout": conf.join_timeout.as_secs(), "last_call_timeout": conf.last_call_timeout.as_secs(),
                "close_timeout": conf.close_timeout.as_secs(), "heartbeat_timeout": conf.heartbeat_timeout.as_secs(),
                "keep_alive_interval": conf.keep_alive_interval.as_secs(),
                "keep_alive_max_attempt": conf.keep_alive_max_attempt, "read_timeout": conf.read_timeout.as_secs(),
                "timeout": conf.timeout.map(|t| t.as_secs()), "is_host": conf.is_host,
            },
            "standalone": args.standalone,
            "max_restarts": args.max_restarts,
            "monitor_interval": args.monitor_interval.as_secs_f64(),
            "start_method": match args.start_method {
                StartMethod::Spawn => "spawn", StartMethod::Fork => "fork", StartMethod::Forkserver => "forkserver",
            },
            "role": args.role, "module": args.module, "no_python": args.no_python, "run_path": args.run_path,
            "log_dir": args.log_dir.as_ref().map(|d| d.to_string_lossy().into_owned()),
            "redirects": std(&args.redirects), "tee": std(&args.tee),
            "log_line_prefix_template": args.log_line_prefix_template,
            "local_ranks_filter": args.local_ranks_filter.as_ref().map(|r| r.iter().collect::<Vec<_>>()),
            "node_rank": args.node_rank, "master_addr": args.master_addr(), "master_port": args.master_port,
            "local_addr": args.local_addr, "signals_to_handle": args.signals_to_handle,
            "shutdown_timeout": args.shutdown_timeout.as_secs(),
            "training_script": args.script.to_string_lossy(),
            "training_script_args": args.script_args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
        })
    }

    /// The python of the venv with torch, from `scripts/python-env.sh` (as tests/torch.rs).
    fn python_with_torch() -> PathBuf {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(repo.join("scripts/python-env.sh"))
            .current_dir(&repo)
            .output()
            .expect("run scripts/python-env.sh");
        assert!(
            out.status.success(),
            "scripts/python-env.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("python-env.sh prints UTF-8");
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("python-env.sh prints the python path")
                .trim(),
        )
    }

    #[test]
    fn torchrun_reads_the_same_command_lines_the_same_way() {
        let cases: Vec<serde_json::Value> = COMPARED
            .iter()
            .map(|case| {
                let env: serde_json::Map<String, serde_json::Value> = case
                    .env
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect();
                serde_json::json!({"argv": case.argv, "env": env})
            })
            .collect();
        let out = std::process::Command::new(python_with_torch())
            .arg("-c")
            .arg(TORCHRUN_VIEW)
            .arg(serde_json::Value::Array(cases).to_string())
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let views: Vec<serde_json::Value> =
            serde_json::from_str(stdout.lines().last().unwrap_or(""))
                .expect("one JSON line from python");
        assert_eq!(views.len(), COMPARED.len());

        let mut disagreements = Vec::new();
        for (case, torch) in COMPARED.iter().zip(views) {
            let ours = parse_with(case.argv, case.env);
            match (ours, torch.get("error")) {
                (Ok(Parsed::Run(args)), None) => {
                    let mut ours = our_view(&args);
                    let mut torch = torch.clone();
                    // Seconds as f64 on both sides, compared to the nanosecond.
                    let a = ours["monitor_interval"].take().as_f64().unwrap_or(f64::NAN);
                    let b = torch["monitor_interval"]
                        .take()
                        .as_f64()
                        .unwrap_or(f64::NAN);
                    if ours != torch || (a - b).abs() > 1e-9 {
                        disagreements.push(format!(
                            "{:?} {:?}:\n  torchrun {torch} (monitor_interval {b})\n  ours     {ours} (monitor_interval {a})",
                            case.argv, case.env
                        ));
                    }
                }
                (Err(_), Some(_)) => {}
                (ours, torch_error) => disagreements.push(format!(
                    "{:?} {:?}: torchrun {}, ours {:?}",
                    case.argv,
                    case.env,
                    torch_error
                        .map_or_else(|| "accepts it".to_string(), |e| format!("refuses it ({e})")),
                    ours.map(|parsed| match parsed {
                        Parsed::Run(_) => "accepts it",
                        Parsed::Help(_) => "prints help",
                    })
                )),
            }
        }
        assert!(
            disagreements.is_empty(),
            "{} disagreements:\n{}",
            disagreements.len(),
            disagreements.join("\n")
        );
    }
}
