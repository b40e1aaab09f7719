//! `trainctl`: the one binary. It runs the coordinator, the agent, a local cluster (`dev`, `demo`), the
//! built-in example workload, and the command line that talks to the coordinator's REST API.

mod client;
mod local;
mod render;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use trainctl_jobs::JobSpec;

use crate::client::{Client, DEFAULT_ADDR};
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
    /// The coordinator's address (host:port or URL).
    #[arg(long, env = "TRAINCTL_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format: human-readable text or JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human, global = true)]
    output: Output,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
    },
    /// Keep a local cluster up: a coordinator and N agents acting as N hosts (127.0.0.2, ...).
    Dev {
        #[arg(long, default_value_t = 4)]
        agents: u32,
        /// Where the coordinator listens (REST, gRPC and Raft on one port).
        #[arg(long, default_value = "127.0.0.1:7470")]
        listen: String,
        /// Data directory; wiped at start unless --keep-state.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep the jobs and logs of a previous run in --data-dir.
        #[arg(long)]
        keep_state: bool,
        /// Declare this many GPUs on every agent (development without GPUs).
        #[arg(long)]
        gpus_per_agent: Option<u32>,
        /// A host not heard from for this long is lost and its jobs fail.
        #[arg(long, default_value_t = 10_000)]
        node_timeout_ms: u64,
        /// `json`: print the cluster's addresses as one JSON line once it is ready.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
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
        #[command(flatten)]
        target: Target,
    },
    /// List jobs.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show a job: state, placement, every rank's state and exit code.
    Status {
        job: String,
        #[command(flatten)]
        target: Target,
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
        #[command(flatten)]
        target: Target,
    },
    /// Cancel a job: stop its ranks (SIGTERM, a grace period, SIGKILL) or take it off the queue.
    Cancel {
        job: String,
        #[command(flatten)]
        target: Target,
    },
    /// List the cluster's hosts and what they hold.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Run a coordinator (one per cluster today; Raft replication to several comes later).
    Coordinator {
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
        /// A host not heard from for this long is lost and its jobs fail.
        #[arg(long, default_value_t = 10_000)]
        node_timeout_ms: u64,
        /// SIGTERM-to-SIGKILL grace when stopping ranks.
        #[arg(long, default_value_t = 10_000)]
        stop_grace_ms: u32,
    },
    /// Run an agent on this host.
    Agent {
        /// The coordinator's address.
        #[arg(long, env = "TRAINCTL_COORDINATOR")]
        coordinator: String,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::ExampleTrain { args } = &cli.command {
        // No runtime, no logging setup: this is a training process.
        return ExitCode::from(trainctl_collective::example_train_main(args).clamp(0, 255) as u8);
    }
    if matches!(
        cli.command,
        Cmd::Submit { .. }
            | Cmd::List { .. }
            | Cmd::Status { .. }
            | Cmd::Logs { .. }
            | Cmd::Cancel { .. }
            | Cmd::Nodes { .. }
    ) {
        // Like other Unix tools: `trainctl logs 3 | head` ends quietly when `head` has enough.
        // SAFETY: setting a signal disposition before any thread starts; no handler code runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRAINCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        } => demo(agents, data_dir, output).await,
        Cmd::Dev {
            agents,
            listen,
            data_dir,
            keep_state,
            gpus_per_agent,
            node_timeout_ms,
            output,
        } => {
            let spec = LocalClusterSpec {
                agents,
                data_dir: data_dir.unwrap_or_else(|| std::env::temp_dir().join("trainctl-dev")),
                listen,
                gpus_per_agent,
                heartbeat_interval_ms: 500,
                node_timeout_ms,
            };
            dev(spec, keep_state, output).await
        }
        Cmd::Submit {
            file,
            wait,
            follow,
            target,
        } => submit(&file, wait, follow, &target).await,
        Cmd::List { target } => {
            let jobs = Client::new(&target.addr)?.list().await?;
            match target.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&jobs)?),
                Output::Human => print!("{}", render::job_table(&jobs)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { job, target } => {
            let detail = Client::new(&target.addr)?.job(&job).await?;
            match target.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&detail)?),
                Output::Human => print!("{}", render::job_detail(&detail)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs {
            job,
            rank,
            follow,
            target,
        } => {
            let client = Client::new(&target.addr)?;
            client.job(&job).await?;
            follow_logs(&client, &job, rank, follow, target.output, |_| true).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { job, target } => {
            let detail = Client::new(&target.addr)?.cancel(&job).await?;
            match target.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&detail)?),
                Output::Human => println!("job {} cancelled", detail.summary.id),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nodes { target } => {
            let nodes = Client::new(&target.addr)?.nodes().await?;
            match target.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
                Output::Human => print!("{}", render::node_table(&nodes)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Coordinator {
            data_dir,
            listen,
            advertise,
            heartbeat_interval_ms,
            node_timeout_ms,
            stop_grace_ms,
        } => {
            init_logging("info,openraft=warn");
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("listen on {listen}"))?;
            let advertise = advertise.unwrap_or_else(|| {
                listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or(listen)
            });
            let mut config =
                trainctl_coordinator::server::CoordinatorConfig::new(data_dir, advertise);
            config.heartbeat_interval_ms = heartbeat_interval_ms;
            config.node_timeout_ms = node_timeout_ms;
            config.stop_grace_ms = stop_grace_ms;
            let shutdown = shutdown_on_signals()?;
            let coordinator = trainctl_coordinator::server::open(config).await?;
            trainctl_coordinator::server::run(coordinator, listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Agent {
            coordinator,
            data_dir,
            name,
            advertise_addr,
            gpus,
            port_range,
            api_port,
        } => {
            init_logging("info");
            let port_range = parse_port_range(&port_range)?;
            let coordinator_url = if coordinator.contains("://") {
                coordinator
            } else {
                format!("http://{coordinator}")
            };
            let config = trainctl_agent::AgentConfig {
                coordinator_url,
                node_name: name,
                advertise_addr,
                data_dir,
                declared_gpus: gpus,
                port_range,
                self_exe: std::env::current_exe().context("find this program's path")?,
                api_port,
            };
            let shutdown = shutdown_on_signals()?;
            trainctl_agent::run(config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::AgentReaper { data_dir } => {
            trainctl_agent::reaper_main(&data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ExampleTrain { .. } => unreachable!("handled before the runtime starts"),
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
    target: &Target,
) -> anyhow::Result<ExitCode> {
    let spec = load_spec(file)?;
    let client = Client::new(&target.addr)?;
    let id = client.submit(&spec).await?;
    match target.output {
        Output::Json if !wait => println!("{}", serde_json::json!({ "id": id })),
        Output::Json => {}
        Output::Human => eprintln!("submitted job {id} ({})", spec.name),
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let detail = if follow {
        follow_logs(&client, &id, None, true, Output::Human, |_| true).await?;
        client.job(&id).await?
    } else {
        wait_for_end(&client, &id, target.output == Output::Human).await?
    };
    match target.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&detail)?),
        Output::Human => print!("{}", render::job_detail(&detail)),
    }
    Ok(if detail.summary.state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
            eprintln!("job {id}: {}", render::state_line(&detail));
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

/// Prints a job's output; with `follow`, keeps going until the job has ended and every line is out.
async fn follow_logs(
    client: &Client,
    id: &str,
    rank: Option<u32>,
    follow: bool,
    output: Output,
    show: impl Fn(&trainctl_coordinator::api::LogLine) -> bool,
) -> anyhow::Result<()> {
    let mut cursor = String::new();
    let mut last_state = String::new();
    loop {
        let page = client.logs(id, rank, &cursor).await?;
        for line in page.lines.iter().filter(|l| show(l)) {
            match output {
                Output::Json => println!("{}", serde_json::to_string(line)?),
                Output::Human => println!("[{} rank {}] {}", line.node, line.rank, line.text),
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
                    eprintln!("job {id}: {}", render::state_line(&detail));
                    last_state = detail.summary.state.clone();
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

async fn dev(spec: LocalClusterSpec, keep_state: bool, output: Output) -> anyhow::Result<ExitCode> {
    let data_dir = spec.data_dir.clone();
    // Check the address before touching the data: it may be another running cluster's.
    local::ensure_address_free(&spec.listen)?;
    if !keep_state {
        local::clear_data_dir(&data_dir)?;
    }
    let mut shutdown = shutdown_on_signals()?;
    let mut cluster = LocalCluster::start(&spec).await?;
    if output == Output::Json {
        let agents: Vec<_> = cluster
            .agents
            .iter()
            .map(|(name, ip)| serde_json::json!({ "name": name, "address": ip.to_string() }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "coordinator": cluster.coordinator_url, "data_dir": data_dir, "agents": agents })
        );
    } else {
        print_dev_banner(&cluster, &data_dir);
    }
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    eprintln!("stopping the local cluster");
    cluster.stop();
    Ok(ExitCode::SUCCESS)
}

fn print_dev_banner(cluster: &LocalCluster, data_dir: &Path) {
    println!(
        "trainctl dev: coordinator at {} (REST API, docs at {}/docs)",
        cluster.coordinator_url, cluster.coordinator_url
    );
    for (name, ip) in &cluster.agents {
        println!("  agent {name} on {ip}");
    }
    println!("  data and process logs in {}", data_dir.display());
    println!(
        "Try:  trainctl submit jobs/examples/ddp-example.toml --wait    (TRAINCTL_ADDR={})",
        cluster.coordinator_url
    );
    println!("Press Ctrl-C to stop.");
}

/// The demo's job: the built-in workload on every host of the embedded cluster.
fn demo_spec(agents: u32) -> anyhow::Result<JobSpec> {
    const EXAMPLE: &str = include_str!("../jobs/examples/ddp-example.toml");
    let mut spec = JobSpec::from_toml(EXAMPLE, "jobs/examples/ddp-example.toml")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    spec.resources.nodes = agents;
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
}

async fn demo(agents: u32, data_dir: Option<PathBuf>, output: Output) -> anyhow::Result<ExitCode> {
    let human = output == Output::Human;
    let say = |text: String| {
        if human {
            println!("{text}");
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
        data_dir: data_dir.clone(),
        listen,
        gpus_per_agent: None,
        heartbeat_interval_ms: 200,
        node_timeout_ms: 10_000,
    };
    let cluster = LocalCluster::start(&spec).await?;
    let client = Client::new(&cluster.coordinator_url)?;
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
    let id = client.submit(&spec).await?;
    say(format!(
        "[demo] submitted job {id} `{}`: {} hosts x {} ranks, command {:?}",
        spec.name, spec.resources.nodes, spec.resources.procs_per_node, spec.launch.command
    ));
    let detail = if human {
        // Rank 0's progress, and every rank's final line.
        follow_logs(&client, &id, None, true, Output::Human, |l| {
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
    let page = client.logs(&id, None, "").await?;
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
        println!(
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
