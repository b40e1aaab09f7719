//! `trainctl run --cluster`: the torchrun flags become a job submitted to a trainctl coordinator;
//! the command streams the job's output and exits as torchrun would.
//!
//! # When
//! Only with `--cluster`. `TRAINCTL_ADDR` alone does not switch modes, so a torchrun command line
//! keeps its meaning (a run on this host) wherever it is typed. The coordinator is `--addr` if
//! given, else the CLI's usual resolution: `TRAINCTL_ADDR`, then the current context.
//!
//! # The job ([`job_spec`], pure)
//! | flag | job |
//! |---|---|
//! | SCRIPT, its arguments | `launch.command`: `PYTHON -u [-m] SCRIPT ARGS...`, or `SCRIPT ARGS...` with `--no-python` (`--run-path`: `PYTHON -u SCRIPT ARGS...`, as torchrun's `runpy.run_path`) |
//! | | `launch.workdir`: the current directory (absolute); a relative SCRIPT stays relative to it |
//! | `--rdzv-id` | `name` (else `run-` and the script's name: `train.py` → `run-train`) |
//! | `--nnodes N`, `MIN:MAX` | `resources.nodes = N`; an elastic `min_nodes = MIN`, `nodes = MAX` |
//! | `--nproc-per-node N` | `resources.procs_per_node = N` (and no GPUs) |
//! | `--nproc-per-node gpu` | one worker per GPU of the cluster's hosts: `procs_per_node = gpus_per_node = G`, G the GPU count of its hosts that have GPUs (they must agree) |
//! | `--max-restarts` | `failure.max_restarts` |
//! | `--signals-to-handle` | `TORCHELASTIC_SIGNALS_TO_HANDLE` in `launch.env`, as torchrun exports it |
//! | `--local-ranks-filter` | the console shows only those local ranks (`trainctl logs` keeps all) |
//! | `--tee` | nothing to do: every stream goes to the job's logs and to the console |
//! | `--start-method`, `--monitor-interval` | accepted, no effect (the agents exec and watch the ranks) |
//!
//! PYTHON is the interpreter `trainctl run` would use here: `$PYTHON_EXEC` as given, else the
//! absolute path of `python3` (else `python`) on this `PATH`, so the agents run the interpreter
//! (and the packages) of the shell that typed the command, as torchrun's workers run its
//! `sys.executable`. Hosts must have it at the same path; set `PYTHON_EXEC=python3` to use theirs.
//! The workers get the agents' environment plus trainctl's and torchrun's variables, not this
//! shell's.
//!
//! Refused, with an error that names the flag (and its `PET_*` variable) and why
//! ([`LocalOnly`]): `--node-rank`, `--master-addr`, `--master-port`, `--rdzv-backend`,
//! `--rdzv-endpoint`, `--rdzv-conf`, `--standalone`, `--local-addr` (the coordinator places the
//! gang, the agent of group rank 0 serves the store), `--log-dir`, `--redirects`,
//! `--log-line-prefix-template` (the cluster keeps the logs; lines are `[NODE rank RANK]`),
//! `--role` (`ROLE_NAME` is `default` on a cluster), `--shutdown-timeout` (the agents' grace), and
//! `--nproc-per-node auto|cpu` (this host's CPUs say nothing of the cluster's: give a number).
//! [`RunArgs`] holds values, not which flags were typed, so a flag given its default value
//! (`--node-rank 0`, `--rdzv-backend static`) reads as absent and is accepted.
//!
//! # Running
//! The spec is checked with [`JobSpec::validate`] (errors as `trainctl submit` shows them) and
//! submitted with an Idempotency-Key, as `trainctl submit` does; one line on stderr gives the job
//! id and how to follow and cancel it. The output is followed as `trainctl logs ID -f` does
//! (`[NODE rank RANK] line` on stdout, state changes on stderr) until the job ends; the exit
//! code is 0 when the job succeeded, else 1 (torchrun's code for failed workers) with the job's
//! failure reason on stderr.
//!
//! # Signals
//! SIGINT or SIGTERM stops following and leaves the job running (as `nomad job run` detaches):
//! the command says how to cancel it (`trainctl cancel ID`) and follow it again, and exits
//! 128 + the signal (130 for Ctrl-C). A job is a cluster's to keep: a closed laptop or a lost
//! ssh session must not cancel a training run, and cancelling is one explicit command away.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use trainctl_coordinator::api::{JobDetail, NodeView};
use trainctl_jobs::{limits, Fabric, FailurePolicy, JobSpec, Launch, Resources, SpecError};

use super::flags::{
    NprocPerNode, RdzvBackend, RdzvConf, RunArgs, StdSpec, DEFAULT_RDZV_ID, DEFAULT_ROLE,
    DEFAULT_SHUTDOWN_TIMEOUT,
};

/// Exit code for a command line that has no meaning as a job (argparse's usage code, as the
/// flag errors of `trainctl run`).
const USAGE_EXIT: u8 = 2;

/// The environment variable torchrun exports `--signals-to-handle` as.
const SIGNALS_TO_HANDLE_ENV: &str = "TORCHELASTIC_SIGNALS_TO_HANDLE";

/// Where `trainctl run --cluster` says messages come from.
const ORIGIN: &str = "trainctl run --cluster";

/// Submits the run as a job and follows it.
pub async fn main(args: &RunArgs) -> anyhow::Result<ExitCode> {
    if let Err(e) = refuse_local_only(args) {
        errln!("trainctl run: error: {e}");
        return Ok(ExitCode::from(USAGE_EXIT));
    }
    let target = target(args.addr.as_deref())?;
    let client = target.client()?;
    let host_gpus = match args.nproc_per_node {
        NprocPerNode::Gpu => {
            let nodes = client.nodes().await.context("list the cluster's hosts")?;
            match one_per_gpu(&nodes) {
                Ok(gpus) => Some(gpus),
                Err(e) => {
                    errln!("trainctl run: error: {e}");
                    return Ok(ExitCode::from(USAGE_EXIT));
                }
            }
        }
        _ => None,
    };
    let workdir = std::env::current_dir().context("find the current directory")?;
    let here = Here {
        workdir,
        python: python_here(),
        host_gpus,
    };
    let spec = match job_spec(args, &here) {
        Ok(spec) => spec,
        Err(e) => {
            errln!("trainctl run: error: {e}");
            return Ok(ExitCode::from(USAGE_EXIT));
        }
    };

    // Listen before submitting: a Ctrl-C while the submission is on its way then detaches from
    // the job it made, with its id printed, instead of killing the CLI without one.
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;

    let key = trainctl_coordinator::api::new_idempotency_key();
    let id = client
        .submit(&spec, None, &key, crate::say_retry)
        .await
        .with_context(|| format!("submit job {}", spec.name))?;
    let again = match &args.addr {
        Some(addr) => format!(" --addr {addr}"),
        None => String::new(),
    };
    errln!(
        "trainctl run: submitted job {id} ({}); follow it with `trainctl logs {id} -f{again}`, cancel it with `trainctl cancel {id}{again}`",
        spec.name
    );

    let procs = spec.resources.procs_per_node;
    let filter = args.local_ranks_filter.clone();
    let show = move |line: &trainctl_coordinator::api::LogLine| match &filter {
        Some(local_ranks) => local_ranks.contains(&(line.rank % procs.max(1))),
        None => true,
    };
    let query = crate::LogsQuery::follow();
    let follow = crate::follow_logs(&client, &id, &query, crate::Output::Human, show);
    let signal = tokio::select! {
        followed = follow => {
            followed.with_context(|| format!("follow job {id}"))?;
            None
        }
        _ = interrupt.recv() => Some(libc::SIGINT),
        _ = terminate.recv() => Some(libc::SIGTERM),
    };
    if let Some(signal) = signal {
        errln!(
            "trainctl run: stopped following job {id}; it keeps running. Cancel it with `trainctl cancel {id}{again}`, follow it again with `trainctl logs {id} -f{again}`"
        );
        return Ok(ExitCode::from(128 + signal as u8));
    }
    let detail = client.job(&id).await?;
    let (code, message) = outcome(&detail);
    if let Some(message) = message {
        errln!("trainctl run: {message}");
    }
    Ok(code)
}

/// The CLI's connection flags as every other command resolves them (`--addr`, else
/// `TRAINCTL_ADDR`, then the context; `TRAINCTL_TOKEN`, `TRAINCTL_CA_CERT`, `TRAINCTL_CONTEXT`),
/// with `addr` (`trainctl run --addr`) in the place of `--addr`.
fn target(addr: Option<&str>) -> anyhow::Result<crate::Target> {
    #[derive(Parser)]
    struct Connection {
        #[command(flatten)]
        target: crate::Target,
    }
    let mut argv = vec![ORIGIN.to_string()];
    argv.extend(addr.map(|a| format!("--addr={a}")));
    Ok(Connection::try_parse_from(argv)
        .context("read the coordinator's address and credentials")?
        .target)
}

/// `python3` (else `python`) as `trainctl run` would run it here, as an absolute path, or
/// `$PYTHON_EXEC` as it is.
pub(super) fn python_here() -> String {
    if let Ok(exec) = std::env::var("PYTHON_EXEC") {
        return exec;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["python3", "python"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() && dir.is_absolute() {
                return candidate.to_string_lossy().into_owned();
            }
        }
    }
    "python3".to_string()
}

/// What the job needs from this machine and the cluster, besides the command line.
#[derive(Debug, Clone)]
struct Here {
    /// The current directory: the job's workdir.
    workdir: PathBuf,
    /// The interpreter ([`python_here`]).
    python: String,
    /// GPUs per host for `--nproc-per-node gpu` ([`one_per_gpu`]); `None` when not looked up.
    host_gpus: Option<u32>,
}

/// Why a command line does not become a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MapError {
    /// A flag that only makes sense for a run on this host.
    LocalOnly(LocalOnly),
    /// `--nproc-per-node auto|cpu`, or `gpu` on a cluster whose hosts' GPUs do not say how many.
    Nproc(String),
    /// The script or an argument that is not UTF-8 (a job's command is text).
    NotText { what: String, value: OsString },
    /// The spec the flags make is not valid; rendered as `trainctl submit` renders it.
    Spec(SpecError),
}

/// A flag refused with `--cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LocalOnly {
    /// The flag, canonically spelled.
    flag: &'static str,
    /// Where else its value can come from (`PET_NODE_RANK`).
    env: &'static str,
    /// Why it has no meaning for a job of the cluster.
    why: &'static str,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::LocalOnly(LocalOnly { flag, env, why }) => write!(
                f,
                "{flag} (or {env}) has no meaning with --cluster: {why}; leave it out to submit the run as a job"
            ),
            MapError::Nproc(message) => write!(f, "--nproc-per-node: {message}"),
            MapError::NotText { what, value } => write!(
                f,
                "{what} {value:?} is not UTF-8; a job's command is text (accepted: UTF-8 arguments)"
            ),
            MapError::Spec(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MapError {}

const PLACED_BY_THE_COORDINATOR: &str = "the coordinator places the gang's nodes and ranks, and the agent of group rank 0 serves its store at MASTER_ADDR:MASTER_PORT";

/// The first flag of `args` that only makes sense on this host (see the module docs).
fn local_only(args: &RunArgs) -> Option<LocalOnly> {
    let refuse = |flag, env, why| Some(LocalOnly { flag, env, why });
    if args.standalone {
        return refuse(
            "--standalone",
            "PET_STANDALONE",
            "it runs on this host alone; a job runs on the cluster's hosts",
        );
    }
    if args.node_rank != 0 {
        return refuse("--node-rank", "PET_NODE_RANK", PLACED_BY_THE_COORDINATOR);
    }
    if args.master_addr.is_some() {
        return refuse(
            "--master-addr",
            "PET_MASTER_ADDR",
            PLACED_BY_THE_COORDINATOR,
        );
    }
    if args.master_port.is_some() {
        return refuse(
            "--master-port",
            "PET_MASTER_PORT",
            PLACED_BY_THE_COORDINATOR,
        );
    }
    if args.rdzv_backend != RdzvBackend::Static {
        return refuse(
            "--rdzv-backend",
            "PET_RDZV_BACKEND",
            PLACED_BY_THE_COORDINATOR,
        );
    }
    if args.rdzv_endpoint.is_some() {
        return refuse(
            "--rdzv-endpoint",
            "PET_RDZV_ENDPOINT",
            PLACED_BY_THE_COORDINATOR,
        );
    }
    if args.rdzv_conf != RdzvConf::default() {
        return refuse(
            "--rdzv-conf",
            "PET_RDZV_CONF",
            "the coordinator starts the whole gang at once; there is no rendezvous of launchers to time out",
        );
    }
    if args.local_addr.is_some() {
        return refuse(
            "--local-addr",
            "PET_LOCAL_ADDR",
            "each host's agent advertises the address it registered with",
        );
    }
    if args.log_dir.is_some() {
        return refuse(
            "--log-dir",
            "PET_LOG_DIR",
            "the cluster keeps every rank's output (trainctl logs ID, --rank, --attempt)",
        );
    }
    if args.redirects != StdSpec::default() {
        return refuse(
            "--redirects",
            "PET_REDIRECTS",
            "the console shows the job's output as the cluster keeps it, one stream per rank; use --local-ranks-filter to show fewer ranks",
        );
    }
    if args.log_line_prefix_template.is_some() {
        return refuse(
            "--log-line-prefix-template",
            "PET_LOG_LINE_PREFIX_TEMPLATE or TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE",
            "the job's lines are prefixed [NODE rank RANK], as trainctl logs prints them",
        );
    }
    if args.role != DEFAULT_ROLE {
        return refuse(
            "--role",
            "PET_ROLE",
            "the cluster sets ROLE_NAME=default for every rank",
        );
    }
    if args.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT {
        return refuse(
            "--shutdown-timeout",
            "PET_SHUTDOWN_TIMEOUT or TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
            "the agents stop ranks with their own grace between SIGTERM and SIGKILL",
        );
    }
    None
}

/// [`local_only`] and `--nproc-per-node auto|cpu` as errors: the checks that need no network.
fn refuse_local_only(args: &RunArgs) -> Result<(), MapError> {
    if let Some(refused) = local_only(args) {
        return Err(MapError::LocalOnly(refused));
    }
    let value = match args.nproc_per_node {
        NprocPerNode::Auto => "auto",
        NprocPerNode::Cpu => "cpu",
        NprocPerNode::Count(_) | NprocPerNode::Gpu => return Ok(()),
    };
    Err(MapError::Nproc(format!(
        "{value} counts this host's {}, and the job runs on the cluster's hosts (accepted with --cluster: a number of workers per host, e.g. 4, or gpu for one per GPU of the cluster's hosts)",
        if value == "cpu" { "CPUs" } else { "GPUs or CPUs" }
    )))
}

/// GPUs per host for `--nproc-per-node gpu`: the GPU count of the cluster's hosts that are up,
/// not drained and have GPUs; they must all have the same.
fn one_per_gpu(nodes: &[NodeView]) -> Result<u32, MapError> {
    let counts: std::collections::BTreeSet<u32> = nodes
        .iter()
        .filter(|n| n.status == "up" && !n.drained && n.gpus > 0)
        .map(|n| n.gpus)
        .collect();
    let listed: Vec<String> = counts.iter().map(u32::to_string).collect();
    match listed.as_slice() {
        [] => Err(MapError::Nproc(format!(
            "gpu: none of the cluster's {} hosts that are up has a GPU (accepted: a number of workers per host, e.g. 4)",
            nodes.iter().filter(|n| n.status == "up").count()
        ))),
        [_] => Ok(*counts.first().expect("one count")),
        _ => Err(MapError::Nproc(format!(
            "gpu: the cluster's hosts have {} GPUs, and a job runs the same number of workers on each (accepted: a number of workers per host, e.g. {})",
            listed.join(" or "),
            counts.first().expect("counts")
        ))),
    }
}

/// The job's name: `--rdzv-id`, else `run-` and the script's name (without directory and
/// extension), lowercased, other characters than `[a-z0-9._-]` as `-`, at most 63 characters.
fn job_name(args: &RunArgs) -> String {
    if args.rdzv_id != DEFAULT_RDZV_ID {
        return args.rdzv_id.clone();
    }
    let script = Path::new(&args.script);
    let stem = if args.module {
        args.script.as_os_str()
    } else {
        script
            .file_stem()
            .or(script.file_name())
            .unwrap_or(OsStr::new("script"))
    };
    let stem: String = stem
        .to_string_lossy()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("run-{stem}")
        .chars()
        .take(limits::NAME_LEN_MAX)
        .collect()
}

/// What every rank runs, as torchrun's `config_from_args` builds it.
pub(super) fn worker_command(args: &RunArgs, python: &str) -> Result<Vec<String>, MapError> {
    let text = |what: &str, value: &OsString| {
        value.to_str().map(str::to_string).ok_or(MapError::NotText {
            what: what.to_string(),
            value: value.clone(),
        })
    };
    let mut command = Vec::new();
    if args.run_path || !args.no_python {
        command.extend([python.to_string(), "-u".to_string()]);
        if args.module && !args.run_path {
            command.push("-m".to_string());
        }
    }
    command.push(text("the script", &args.script)?);
    for (i, arg) in args.script_args.iter().enumerate() {
        command.push(text(&format!("the script's argument {}", i + 1), arg)?);
    }
    Ok(command)
}

/// The job the command line asks for (see the module docs), validated.
fn job_spec(args: &RunArgs, here: &Here) -> Result<JobSpec, MapError> {
    refuse_local_only(args)?;
    let (procs_per_node, gpus_per_node) = match args.nproc_per_node {
        NprocPerNode::Count(n) => (n, 0),
        NprocPerNode::Gpu => match here.host_gpus {
            Some(g) => (g, g),
            None => {
                return Err(MapError::Nproc(
                    "gpu: the GPUs of the cluster's hosts are not known".to_string(),
                ))
            }
        },
        NprocPerNode::Auto | NprocPerNode::Cpu => unreachable!("refused above"),
    };
    let workdir = here
        .workdir
        .to_str()
        .ok_or_else(|| MapError::NotText {
            what: "the current directory".to_string(),
            value: here.workdir.clone().into_os_string(),
        })?
        .to_string();
    let spec = JobSpec {
        name: job_name(args),
        launch: Launch {
            command: worker_command(args, &here.python)?,
            workdir: Some(workdir),
            env: [(
                SIGNALS_TO_HANDLE_ENV.to_string(),
                args.signals_to_handle.clone(),
            )]
            .into(),
        },
        resources: Resources {
            nodes: args.nnodes.max,
            min_nodes: args.nnodes.min,
            procs_per_node,
            gpus_per_node,
            cpus_per_node: procs_per_node,
            memory_per_node_mib: 0,
            fabric: Fabric::Any,
        },
        failure: FailurePolicy {
            max_restarts: args.max_restarts,
            hang_timeout_ms: None,
        },
        checkpoint: None,
    };
    spec.validate().map_err(|mut e| {
        e.origin = ORIGIN.to_string();
        if let Some(field) = &e.field {
            if let Some(source) = field_source(field, args) {
                e.field = Some(format!("{field} (from {source})"));
            }
        }
        MapError::Spec(e)
    })?;
    Ok(spec)
}

/// The flag a field of the spec came from, for validation errors.
fn field_source(field: &str, args: &RunArgs) -> Option<&'static str> {
    let top = field.split(['.', '[']).collect::<Vec<_>>();
    Some(match top.as_slice() {
        ["name"] if args.rdzv_id != DEFAULT_RDZV_ID => "--rdzv-id",
        ["name"] => "the script's name",
        ["launch", "command", ..] => "SCRIPT and its arguments",
        ["launch", "workdir"] => "the current directory",
        ["launch", "env", ..] => "--signals-to-handle",
        ["resources", "nodes" | "min_nodes"] => "--nnodes",
        ["resources", "procs_per_node" | "gpus_per_node" | "cpus_per_node"] => "--nproc-per-node",
        ["failure", "max_restarts"] => "--max-restarts",
        _ => return None,
    })
}

/// The exit code of a job that ended, and what to say on stderr: 0 when it succeeded, else 1
/// (torchrun's code for failed workers) with the reason.
fn outcome(detail: &JobDetail) -> (ExitCode, Option<String>) {
    let s = &detail.summary;
    if s.state == "succeeded" {
        return (ExitCode::SUCCESS, None);
    }
    let reason = s.reason.as_deref().unwrap_or("no reason given");
    (
        ExitCode::FAILURE,
        Some(format!("job {} ({}) {}: {reason}", s.id, s.name, s.state)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::flags::{self, Parsed, SHUTDOWN_TIMEOUT_ENV};
    use std::collections::BTreeMap;

    fn parse(argv: &[&str]) -> RunArgs {
        parse_env(argv, &[])
    }

    fn parse_env(argv: &[&str], env: &[(&str, &str)]) -> RunArgs {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match flags::parse(&argv, &|k| env.get(k).cloned()) {
            Ok(Parsed::Run(args)) => args,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    fn here() -> Here {
        Here {
            workdir: PathBuf::from("/home/u/proj"),
            python: "/venv/bin/python3".to_string(),
            host_gpus: Some(8),
        }
    }

    fn spec(argv: &[&str]) -> Result<JobSpec, MapError> {
        job_spec(&parse(argv), &here())
    }

    /// The spec of `trainctl run --cluster [flags] train.py`, before `edit`.
    fn base() -> JobSpec {
        JobSpec {
            name: "run-train".into(),
            launch: Launch {
                command: vec!["/venv/bin/python3".into(), "-u".into(), "train.py".into()],
                workdir: Some("/home/u/proj".into()),
                env: [(
                    "TORCHELASTIC_SIGNALS_TO_HANDLE".to_string(),
                    "SIGTERM,SIGINT,SIGHUP,SIGQUIT".to_string(),
                )]
                .into(),
            },
            resources: Resources {
                nodes: 1,
                min_nodes: 1,
                procs_per_node: 1,
                gpus_per_node: 0,
                cpus_per_node: 1,
                memory_per_node_mib: 0,
                fabric: Fabric::Any,
            },
            failure: FailurePolicy::default(),
            checkpoint: None,
        }
    }

    #[test]
    fn flags_map_to_the_job() {
        type Edit = fn(&mut JobSpec);
        let rows: &[(&[&str], Edit)] = &[
            (&["--cluster", "train.py"], |_| {}),
            (&["--cluster", "--addr", "h:1", "./train.py"], |s| {
                s.launch.command[2] = "./train.py".into()
            }),
            (
                &[
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "4",
                    "train.py",
                    "--lr",
                    "0.1",
                ],
                |s| {
                    s.resources.nodes = 2;
                    s.resources.min_nodes = 2;
                    s.resources.procs_per_node = 4;
                    s.resources.cpus_per_node = 4;
                    s.launch.command.extend(["--lr".into(), "0.1".into()]);
                },
            ),
            (&["--nnodes=2:4", "train.py"], |s| {
                s.resources.nodes = 4;
                s.resources.min_nodes = 2;
            }),
            (&["--nproc-per-node", "gpu", "train.py"], |s| {
                s.resources.procs_per_node = 8;
                s.resources.gpus_per_node = 8;
                s.resources.cpus_per_node = 8;
            }),
            (&["--max-restarts", "3", "train.py"], |s| {
                s.failure.max_restarts = 3
            }),
            (&["--rdzv-id", "exp-42", "train.py"], |s| {
                s.name = "exp-42".into()
            }),
            (&["-m", "pkg.Train"], |s| {
                s.name = "run-pkg.train".into();
                s.launch.command = vec![
                    "/venv/bin/python3".into(),
                    "-u".into(),
                    "-m".into(),
                    "pkg.Train".into(),
                ];
            }),
            (&["--no-python", "bin/Train Job.sh", "-x"], |s| {
                s.name = "run-train-job".into();
                s.launch.command = vec!["bin/Train Job.sh".into(), "-x".into()];
            }),
            (&["--run-path", "--no-python", "/abs/train.py"], |s| {
                s.launch.command[2] = "/abs/train.py".into();
            }),
            (&["--signals-to-handle", "SIGUSR1", "train.py"], |s| {
                s.launch
                    .env
                    .insert("TORCHELASTIC_SIGNALS_TO_HANDLE".into(), "SIGUSR1".into());
            }),
            // Accepted: they change nothing about the job.
            (
                &["--tee", "3", "--local-ranks-filter", "0", "train.py"],
                |_| {},
            ),
            (
                &[
                    "--start-method",
                    "fork",
                    "--monitor-interval",
                    "5",
                    "train.py",
                ],
                |_| {},
            ),
            (
                &["--node-rank", "0", "--rdzv-backend", "static", "train.py"],
                |_| {},
            ),
        ];
        for (argv, edit) in rows {
            let mut expected = base();
            edit(&mut expected);
            assert_eq!(spec(argv), Ok(expected), "{argv:?}");
        }
    }

    #[test]
    fn every_local_only_flag_is_refused_by_name() {
        let rows: &[(&[&str], &str)] = &[
            (&["--standalone"], "--standalone"),
            (&["--node-rank", "1"], "--node-rank"),
            (&["--master-addr", "h"], "--master-addr"),
            (&["--master-port", "29500"], "--master-port"),
            (&["--rdzv-backend", "c10d"], "--rdzv-backend"),
            (&["--rdzv-endpoint", "h:29400"], "--rdzv-endpoint"),
            (&["--rdzv-conf", "join_timeout=900"], "--rdzv-conf"),
            (&["--local-addr", "10.0.0.1"], "--local-addr"),
            (&["--log-dir", "/tmp/l"], "--log-dir"),
            (&["-r", "3"], "--redirects"),
            (
                &["--log-line-prefix-template", "${rank}:"],
                "--log-line-prefix-template",
            ),
            (&["--role", "trainer"], "--role"),
            (&["--shutdown-timeout", "5"], "--shutdown-timeout"),
        ];
        for (flags, name) in rows {
            let argv: Vec<&str> = flags.iter().copied().chain(["train.py"]).collect();
            let err = spec(&argv).unwrap_err();
            let MapError::LocalOnly(refused) = &err else {
                panic!("{argv:?}: {err:?}");
            };
            assert_eq!(refused.flag, *name, "{argv:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("{name} (or PET_"))
                    && text.contains("has no meaning with --cluster: "),
                "{text}"
            );
        }
        // From the environment too, and the message names the variable.
        let err = job_spec(
            &parse_env(&["train.py"], &[("PET_NODE_RANK", "2")]),
            &here(),
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .starts_with("--node-rank (or PET_NODE_RANK) has no meaning"),);
        let args = parse_env(&["train.py"], &[(SHUTDOWN_TIMEOUT_ENV, "60")]);
        assert!(job_spec(&args, &here())
            .unwrap_err()
            .to_string()
            .contains("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"));
    }

    #[test]
    fn nproc_per_node_counts_only_the_cluster() {
        for value in ["auto", "cpu"] {
            let err = spec(&["--nproc-per-node", value, "train.py"]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("--nproc-per-node: {value} counts this host's"))
                    && text.contains("a number of workers per host"),
                "{text}"
            );
        }
        let mut unknown = here();
        unknown.host_gpus = None;
        let err = job_spec(&parse(&["--nproc-per-node", "gpu", "t.py"]), &unknown);
        assert!(matches!(err, Err(MapError::Nproc(_))), "{err:?}");

        let node = |gpus: u32, status: &str, drained: bool| NodeView {
            name: "n".into(),
            address: "a".into(),
            hostname: "h".into(),
            status: status.into(),
            status_reason: None,
            cpus: 8,
            cpus_allocated: 0,
            memory_mib: 0,
            memory_allocated_mib: 0,
            gpus,
            gpus_allocated: 0,
            gpu_models: vec![],
            rdma: vec![],
            jobs: vec![],
            drained,
            containment: String::new(),
            ..NodeView::default()
        };
        // CPU-only, down and drained hosts do not count.
        let nodes = [
            node(8, "up", false),
            node(0, "up", false),
            node(4, "down", false),
            node(2, "up", true),
        ];
        assert_eq!(one_per_gpu(&nodes), Ok(8));
        let none = one_per_gpu(&[node(0, "up", false)])
            .unwrap_err()
            .to_string();
        assert!(
            none.contains("none of the cluster's 1 hosts that are up has a GPU"),
            "{none}"
        );
        let mixed = one_per_gpu(&[node(8, "up", false), node(4, "up", false)])
            .unwrap_err()
            .to_string();
        assert!(mixed.contains("have 4 or 8 GPUs"), "{mixed}");
    }

    #[test]
    fn an_invalid_job_is_reported_as_submit_reports_it_with_the_flag() {
        let err = spec(&["--rdzv-id", "Exp_1", "train.py"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "trainctl run --cluster: name (from --rdzv-id): contains 'E' at character 1"
            ),
            "{err}"
        );
        let err = spec(&["--max-restarts", "10001", "train.py"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("trainctl run --cluster: failure.max_restarts (from --max-restarts): "),
            "{err}"
        );
        let err = spec(&["--nproc-per-node", "5000", "train.py"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resources.procs_per_node (from --nproc-per-node)"),
            "{err}"
        );
    }

    #[test]
    fn job_names_come_from_the_script() {
        let name = |argv: &[&str]| job_name(&parse(argv));
        assert_eq!(name(&["train.py"]), "run-train");
        assert_eq!(name(&["../x/My Model.v2.py"]), "run-my-model.v2");
        assert_eq!(
            name(&["-m", "torch.utils.bottleneck"]),
            "run-torch.utils.bottleneck"
        );
        let long = format!("{}.py", "a".repeat(100));
        assert_eq!(name(&[&long]).len(), limits::NAME_LEN_MAX);
    }

    #[test]
    fn the_exit_code_is_torchruns() {
        let detail = |state: &str, reason: Option<&str>| -> JobDetail {
            let mut v = serde_json::json!({
                "id": "7", "name": "run-train", "state": state, "nodes": 2, "procs_per_node": 2,
                "world_size": 4, "gpus_per_node": 0, "submitted_at_ms": 0, "started_at_ms": null,
                "finished_at_ms": null, "reason": reason, "pending_reason": null, "attempt": 0,
                "master_addr": null, "master_port": null, "allocation": [], "ranks": [],
                "restarts": 0, "max_restarts": 0, "current_nodes": 2, "node_range": [2, 2],
                "attempts": [], "checkpoints": [], "resume_from": null,
            });
            v["spec"] = serde_json::to_value(base()).unwrap();
            serde_json::from_value(v).unwrap()
        };
        assert_eq!(
            outcome(&detail("succeeded", None)),
            (ExitCode::SUCCESS, None)
        );
        let (code, message) = outcome(&detail(
            "failed",
            Some("rank 3 on node-2 exited with code 3"),
        ));
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(
            message.as_deref(),
            Some("job 7 (run-train) failed: rank 3 on node-2 exited with code 3")
        );
        let (code, message) = outcome(&detail("cancelled", Some("cancelled by user")));
        assert_eq!(code, ExitCode::FAILURE);
        assert!(message.unwrap().ends_with("cancelled: cancelled by user"));
    }
}
