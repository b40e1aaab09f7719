//! `trainctl dev` and `trainctl demo`: one coordinator (or a Raft group of 3 or 5, `dev
//! --coordinators N`, on consecutive ports) and N agents started on this machine as separate
//! processes of this same binary, each agent on its own loopback address (127.0.0.2, 127.0.0.3, ...) so
//! every "host" has its own IP. They talk over the same gRPC and REST paths as a real cluster.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::Client;
use crate::context::{ClusterContext, Connection};

/// Most agents a local cluster may have: each takes an address in 127.0.0.2..=127.0.0.255.
pub const MAX_LOCAL_AGENTS: u32 = 254;
/// Ports each local agent may lease to jobs: disjoint per agent, since ranks often bind every address.
pub const LOCAL_PORTS_PER_AGENT: u16 = 100;
/// First port leased to local agents' jobs.
pub const LOCAL_PORT_BASE: u16 = 29500;
/// How long to wait for every agent to register.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a local cluster looks like.
#[derive(Debug, Clone)]
pub struct LocalClusterSpec {
    pub agents: u32,
    /// Coordinators: the first on `listen` starts the cluster, the others join it, on the next
    /// ports.
    pub coordinators: u32,
    pub data_dir: PathBuf,
    /// host:port of the first coordinator.
    pub listen: String,
    pub gpus_per_agent: Option<u32>,
    /// Extra environment for every process (e.g. PATH with a Python virtual environment first).
    pub heartbeat_interval_ms: u32,
    pub node_timeout_ms: u64,
    /// Plain HTTP and no tokens (`dev --insecure`).
    pub insecure: bool,
}

/// Where a secure local cluster's credentials are.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The cluster CA (the coordinator's `tls/ca.pem`).
    pub ca_cert: PathBuf,
    /// The admin token the coordinator wrote (`admin.token`).
    pub token_file: PathBuf,
}

/// A running local cluster; dropping it stops every process (agents first, so they stop their ranks).
pub struct LocalCluster {
    /// Every coordinator's URL, comma-separated (what the CLI and agents take).
    pub coordinator_url: String,
    /// Each coordinator's URL.
    pub coordinator_urls: Vec<String>,
    pub agents: Vec<(String, Ipv4Addr)>,
    /// The coordinators' processes, in the order of `coordinator_urls`.
    coordinators: Vec<Child>,
    /// Each running agent's process, by node name.
    agent_children: Vec<(String, Child)>,
    pub data_dir: PathBuf,
    /// `None` for an insecure cluster.
    pub credentials: Option<Credentials>,
}

/// A file that marks a directory as a local cluster's, so `dev` only ever clears its own.
pub const DATA_DIR_MARKER: &str = ".trainctl-dev";

/// Most coordinators of a local cluster.
pub const MAX_LOCAL_COORDINATORS: u32 = 7;

/// `n` addresses on consecutive ports from `listen`.
pub fn coordinator_addresses(listen: &str, n: u32) -> anyhow::Result<Vec<String>> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("`{listen}` is not host:port"))?;
    (0..n)
        .map(|i| {
            let port = addr.port().checked_add(i as u16).filter(|p| *p > 0);
            port.map(|p| std::net::SocketAddr::new(addr.ip(), p).to_string())
                .with_context(|| format!("no {n} consecutive ports from {listen}"))
        })
        .collect()
}

/// Fails if something already listens on `listen` (another `trainctl dev`?).
pub fn ensure_address_free(listen: &str) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("`{listen}` is not host:port"))?;
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        bail!(
            "{listen} is already in use (another `trainctl dev`?). Stop it, or choose another address with --listen"
        );
    }
    Ok(())
}

/// Empties a local cluster's data directory, refusing one that `trainctl dev` did not make.
pub fn clear_data_dir(dir: &Path) -> anyhow::Result<()> {
    let Ok(mut entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    if entries.next().is_some() && !dir.join(DATA_DIR_MARKER).exists() {
        bail!(
            "refusing to clear {}: it is not empty and was not made by `trainctl dev`; \
             choose a new or empty --data-dir",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))
}

/// A free TCP port on 127.0.0.1.
pub fn free_local_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_child(exe: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    spawn_child_with(exe, args, &[], log)
}

/// Starts `exe args` with extra environment `env` (secrets go there, not into argv, which every
/// user of the host can read).
fn spawn_child_with(
    exe: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it asks the kernel to
    // kill this child when the process that started it dies, so a killed `trainctl dev` leaves nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("start {} {}", exe.display(), args.join(" ")))
}

impl LocalCluster {
    /// Starts the coordinator and the agents, and waits until every agent has registered.
    pub async fn start(spec: &LocalClusterSpec) -> anyhow::Result<LocalCluster> {
        if spec.agents == 0 || spec.agents > MAX_LOCAL_AGENTS {
            bail!(
                "--agents must be between 1 and {MAX_LOCAL_AGENTS}, got {}",
                spec.agents
            );
        }
        let exe = std::env::current_exe().context("find this program's path")?;
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("create {}", spec.data_dir.display()))?;
        let scheme = if spec.insecure { "http" } else { "https" };
        if !(1..=MAX_LOCAL_COORDINATORS).contains(&spec.coordinators) {
            bail!(
                "--coordinators must be between 1 and {MAX_LOCAL_COORDINATORS} (3 or 5 survive the loss of 1 or 2), got {}",
                spec.coordinators
            );
        }
        let listens = coordinator_addresses(&spec.listen, spec.coordinators)?;
        for listen in &listens {
            ensure_address_free(listen)?;
        }
        let coordinator_urls: Vec<String> =
            listens.iter().map(|l| format!("{scheme}://{l}")).collect();
        let coordinator_url = coordinator_urls.join(",");
        std::fs::write(
            spec.data_dir.join(DATA_DIR_MARKER),
            "made by trainctl dev\n",
        )
        .with_context(|| format!("write into {}", spec.data_dir.display()))?;
        let coordinator_dir = spec.data_dir.join("coordinator");
        let mut args = vec![
            "coordinator".to_string(),
            "--data-dir".into(),
            coordinator_dir.display().to_string(),
            "--listen".into(),
            spec.listen.clone(),
            "--heartbeat-interval-ms".into(),
            spec.heartbeat_interval_ms.to_string(),
            "--node-timeout-ms".into(),
            spec.node_timeout_ms.to_string(),
        ];
        if spec.insecure {
            args.push("--insecure".into());
        }
        let coordinator = spawn_child(&exe, &args, &spec.data_dir.join("coordinator.log"))?;
        let first_args = args;
        let credentials = (!spec.insecure).then(|| Credentials {
            ca_cert: coordinator_dir
                .join(trainctl_coordinator::server::TLS_DIR)
                .join("ca.pem"),
            token_file: coordinator_dir.join(trainctl_coordinator::server::ADMIN_TOKEN_FILE),
        });
        let mut cluster = LocalCluster {
            coordinator_url: coordinator_url.clone(),
            coordinator_urls: coordinator_urls.clone(),
            agents: Vec::new(),
            coordinators: vec![coordinator],
            agent_children: Vec::new(),
            data_dir: spec.data_dir.clone(),
            credentials,
        };
        // Agents of a secure cluster join with a token made for them, valid for an hour.
        let join_token = match &cluster.credentials {
            Some(creds) => Some(cluster.make_join_token(creds.clone()).await?),
            None => None,
        };
        // The other coordinators join the first (with its admin token and CA).
        for (i, listen) in listens.iter().enumerate().skip(1) {
            let n = i + 1;
            let mut args = first_args.clone();
            args[2] = spec
                .data_dir
                .join(format!("coordinator-{n}"))
                .display()
                .to_string();
            args[4] = listen.clone();
            args.push("--join".into());
            args.push(coordinator_urls[0].clone());
            let token = match &cluster.credentials {
                Some(creds) => {
                    args.push("--ca-cert".into());
                    args.push(creds.ca_cert.display().to_string());
                    Some(
                        std::fs::read_to_string(&creds.token_file)
                            .with_context(|| format!("read {}", creds.token_file.display()))?
                            .trim()
                            .to_string(),
                    )
                }
                None => None,
            };
            let env: Vec<(&str, &str)> = token
                .as_deref()
                .map(|t| ("TRAINCTL_TOKEN", t))
                .into_iter()
                .collect();
            let child = spawn_child_with(
                &exe,
                &args,
                &env,
                &spec.data_dir.join(format!("coordinator-{n}.log")),
            )?;
            cluster.coordinators.push(child);
        }
        if spec.coordinators > 1 {
            cluster.wait_members(spec.coordinators as usize).await?;
        }
        for i in 1..=spec.agents {
            let name = format!("node-{i}");
            let ip = Ipv4Addr::new(127, 0, 0, (i + 1) as u8);
            let lo = LOCAL_PORT_BASE + (i as u16 - 1) * LOCAL_PORTS_PER_AGENT;
            let mut args = vec![
                "agent".to_string(),
                "--coordinator".into(),
                coordinator_url.clone(),
                "--data-dir".into(),
                spec.data_dir.join(&name).display().to_string(),
                "--name".into(),
                name.clone(),
                "--advertise-addr".into(),
                ip.to_string(),
                "--port-range".into(),
                format!("{lo}-{}", lo + LOCAL_PORTS_PER_AGENT - 1),
            ];
            if let Some(creds) = &cluster.credentials {
                args.push("--ca-cert".into());
                args.push(creds.ca_cert.display().to_string());
            }
            if let Some(g) = spec.gpus_per_agent {
                args.push("--gpus".into());
                args.push(g.to_string());
            }
            let env: Vec<(&str, &str)> = join_token
                .as_deref()
                .map(|t| ("TRAINCTL_JOIN_TOKEN", t))
                .into_iter()
                .collect();
            let child = spawn_child_with(
                &exe,
                &args,
                &env,
                &spec.data_dir.join(format!("{name}.log")),
            )?;
            cluster.agent_children.push((name.clone(), child));
            cluster.agents.push((name, ip));
        }
        cluster.wait_ready(spec.agents).await?;
        Ok(cluster)
    }

    /// How the CLI reaches this cluster (for the config file).
    pub fn context(&self) -> ClusterContext {
        ClusterContext {
            server: self.coordinator_url.clone(),
            ca_cert: self.credentials.as_ref().map(|c| c.ca_cert.clone()),
            token: None,
            token_file: self.credentials.as_ref().map(|c| c.token_file.clone()),
        }
    }

    /// A REST client of this cluster's coordinator, with the admin token.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut connection = Connection {
            server: self.coordinator_url.clone(),
            ..Default::default()
        };
        if let Some(creds) = &self.credentials {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
            };
            connection.ca_pem = Some(read(&creds.ca_cert)?);
            connection.token = Some(read(&creds.token_file)?.trim().to_string());
        }
        Client::new(&connection)
    }

    /// Waits for the coordinator to write its CA and admin token and to answer, then creates a
    /// join token for the local agents.
    async fn make_join_token(&mut self, creds: Credentials) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            self.check_coordinator_alive()?;
            if creds.ca_cert.exists() && creds.token_file.exists() {
                let client = self.client()?;
                if client.healthy().await {
                    let created = client
                        .create_token(&serde_json::json!({
                            "name": "dev-agents",
                            "role": "agent",
                            "ttl": "1h",
                        }))
                        .await
                        .context("create a join token for the local agents")?;
                    return Ok(created.token);
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                bail!(
                    "the coordinator did not come up within {}s; see {}",
                    STARTUP_TIMEOUT.as_secs(),
                    self.data_dir.join("coordinator.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn check_coordinator_alive(&mut self) -> anyhow::Result<()> {
        for (i, c) in self.coordinators.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                let log = if i == 0 {
                    "coordinator.log".to_string()
                } else {
                    format!("coordinator-{}.log", i + 1)
                };
                bail!(
                    "a coordinator exited ({status}) while starting; see {}",
                    self.data_dir.join(log).display()
                );
            }
        }
        Ok(())
    }

    /// Waits until the Raft group has `n` voters.
    async fn wait_members(&mut self, n: usize) -> anyhow::Result<()> {
        let client = self.client()?;
        let started = Instant::now();
        loop {
            self.check_coordinator_alive()?;
            if let Ok(view) = client.cluster().await {
                if view.members.iter().filter(|m| m.voter).count() >= n {
                    return Ok(());
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                bail!(
                    "the coordinators did not form a group of {n} within {}s; see the coordinator logs in {}",
                    STARTUP_TIMEOUT.as_secs(),
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&mut self, agents: u32) -> anyhow::Result<()> {
        let client = self.client()?;
        let started = Instant::now();
        loop {
            self.check_coordinator_alive()?;
            if let Ok(nodes) = client.nodes().await {
                if nodes.iter().filter(|n| n.status == "up").count() as u32 >= agents {
                    return Ok(());
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                bail!(
                    "the local cluster did not come up within {}s; see the logs in {}",
                    STARTUP_TIMEOUT.as_secs(),
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the agent of node `name`, as if its host vanished: no goodbye to the coordinator,
    /// and its ranks die with it (the agent starts them with a parent-death signal). Returns the
    /// agent's process id.
    pub fn kill_agent(&mut self, name: &str) -> anyhow::Result<u32> {
        let Some(i) = self.agent_children.iter().position(|(n, _)| n == name) else {
            let running: Vec<&str> = self
                .agent_children
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            bail!(
                "no running agent named `{name}`; running: {}",
                running.join(", ")
            );
        };
        let (_, mut child) = self.agent_children.remove(i);
        let pid = child.id();
        // Child::kill sends SIGKILL.
        child
            .kill()
            .with_context(|| format!("kill the agent of {name} (pid {pid})"))?;
        let _ = child.wait();
        Ok(pid)
    }

    /// Stops the agents (which stop their ranks), then the coordinator.
    pub fn stop(&mut self) {
        for (_, child) in &self.agent_children {
            // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is shared.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (_, child) in &mut self.agent_children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.agent_children.clear();
        for mut c in self.coordinators.drain(..).rev() {
            // SAFETY: as above.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
