//! Helpers for tests that run the real `trainctl` binary the way a user does.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Local clusters use fixed loopback addresses and port ranges: one at a time.
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

/// Holds the right to use the local cluster addresses until dropped.
pub fn lock_cluster_addresses() -> MutexGuard<'static, ()> {
    CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// The binary under test.
pub fn trainctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trainctl"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port free on the loopback address `ip` now (e.g. `127.0.0.71`, an address of a test's own).
pub fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `trainctl dev` cluster started as a child process. It runs with TLS and tokens (unless
/// started with `--insecure`); its CLI calls find the credentials through the context file
/// `dev` writes (`TRAINCTL_CONFIG` points into the cluster's own directory).
pub struct DevCluster {
    pub addr: String,
    pub data_dir: tempfile::TempDir,
    /// Started with `--insecure`: plain HTTP, no tokens.
    pub insecure: bool,
    child: Child,
    _lock: MutexGuard<'static, ()>,
}

impl DevCluster {
    pub fn start(agents: u32) -> DevCluster {
        Self::start_with(agents, &[], &[])
    }

    /// Starts `trainctl dev` with extra flags and environment, and waits for every agent.
    pub fn start_with(agents: u32, flags: &[&str], env: &[(&str, String)]) -> DevCluster {
        Self::start_at("127.0.0.1", agents, flags, env)
    }

    /// [`DevCluster::start_with`] with the (first) coordinator on loopback address `ip`, at a
    /// port free there (with `--coordinators N`, the others take the next ports).
    pub fn start_at(ip: &str, agents: u32, flags: &[&str], env: &[(&str, String)]) -> DevCluster {
        let lock = lock_cluster_addresses();
        let data_dir = tempfile::tempdir().unwrap();
        let port = free_port_on(ip);
        let addr = format!("{ip}:{port}");
        let log = std::fs::File::create(data_dir.path().join("dev.out")).unwrap();
        let insecure = flags.contains(&"--insecure");
        let mut cmd = Command::new(trainctl());
        cmd.env("TRAINCTL_CONFIG", data_dir.path().join("config.toml"));
        cmd.args([
            "dev",
            "--agents",
            &agents.to_string(),
            "--listen",
            &addr,
            "--data-dir",
        ])
        .arg(data_dir.path().join("cluster"))
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start trainctl dev");
        let cluster = DevCluster {
            addr,
            data_dir,
            insecure,
            child,
            _lock: lock,
        };
        eventually(Duration::from_secs(60), "every agent to register", || {
            let out = cluster.cli(&["nodes", "-o", "json"]);
            let nodes: Value = serde_json::from_slice(&out.stdout).ok()?;
            (nodes_up(&nodes)? == agents as usize).then_some(())
        });
        cluster
    }

    /// Runs `trainctl ARGS` against this cluster (credentials from the context `dev` wrote).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run trainctl")
    }

    /// `trainctl ARGS` aimed at this cluster, credentials from its context.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(trainctl());
        cmd.args(args)
            .env("TRAINCTL_CONFIG", self.config_file())
            .env("TRAINCTL_ADDR", self.url())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `trainctl ARGS` as a user of `dev` does: the context `dev` wrote (its whole list of
    /// coordinators), no address or token given.
    pub fn cli_from_context(&self, args: &[&str]) -> Output {
        Command::new(trainctl())
            .args(args)
            .env("TRAINCTL_CONFIG", self.config_file())
            .env_remove("TRAINCTL_ADDR")
            .env_remove("TRAINCTL_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run trainctl")
    }

    /// The context file `trainctl dev` wrote.
    pub fn config_file(&self) -> PathBuf {
        self.data_dir.path().join("config.toml")
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        let scheme = if self.insecure { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// The coordinator's data directory.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.data_dir.path().join("cluster").join("coordinator")
    }

    /// The cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.coordinator_dir().join("tls").join("ca.pem")
    }

    /// The admin token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.coordinator_dir().join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `curl` with this cluster's CA and admin token, `-s`: ARGS must name the URL (see
    /// [`DevCluster::url`]).
    pub fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.arg("-s");
        if !self.insecure {
            cmd.arg("--cacert")
                .arg(self.ca_cert())
                .arg("-H")
                .arg(format!("Authorization: Bearer {}", self.token()));
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// A CLI run with another token (`TRAINCTL_TOKEN`), e.g. one of a lesser role.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.command(args)
            .env("TRAINCTL_TOKEN", token)
            .output()
            .expect("run trainctl")
    }

    /// Runs `trainctl ARGS -o json` and parses its standard output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "trainctl {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "trainctl {all:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn job(&self, id: &str) -> Value {
        self.json(&["status", id])
    }

    /// Waits until `count` nodes are up.
    pub fn wait_nodes_up(&self, count: usize) {
        eventually(
            Duration::from_secs(60),
            &format!("{count} nodes up"),
            || (nodes_up(&self.json(&["nodes"]))? == count).then_some(()),
        );
    }

    /// Submits a job file and returns its id.
    pub fn submit(&self, file: &Path) -> String {
        let v = self.json(&["submit", file.to_str().unwrap()]);
        v["id"]
            .as_str()
            .expect("submit -o json prints an id")
            .to_string()
    }

    /// Waits until the job reaches `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("job {id} to be {state}"), || {
            let job = self.job(id);
            (job["state"] == state).then_some(job)
        })
    }

    /// Every log line of a job, as printed by `trainctl logs`.
    pub fn logs(&self, id: &str) -> String {
        let out = self.cli(&["logs", id]);
        assert!(
            out.status.success(),
            "logs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many nodes of a `trainctl nodes -o json` listing are up (`None` if it is not a list).
pub fn nodes_up(nodes: &Value) -> Option<usize> {
    Some(
        nodes
            .as_array()?
            .iter()
            .filter(|n| n["status"] == "up")
            .count(),
    )
}

/// Runs `trainctl ARGS` against `addr` with no credentials (no context file either).
pub fn cli_at(addr: &str, args: &[&str]) -> Output {
    Command::new(trainctl())
        .args(args)
        .env("TRAINCTL_ADDR", addr)
        .env("TRAINCTL_CONFIG", "/nonexistent/trainctl-config.toml")
        .stdin(Stdio::null())
        .output()
        .expect("run trainctl")
}

/// Writes a job file into `dir` and returns its path.
pub fn job_file(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Zombies are dead already.
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// A `trainctl` process started by a test, stopped (SIGTERM, then SIGKILL after 10 s) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        signal(self.0.id(), libc::SIGTERM);
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `trainctl ARGS`, appending its output to `log`.
pub fn start(args: &[&str], log: &Path) -> Proc {
    start_with_env(args, &[], log)
}

/// [`start`] with extra environment.
pub fn start_with_env(args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(trainctl())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

/// A cluster started by hand, as an operator starts a real one: one `trainctl coordinator` and
/// agents `host-1`, `host-2`, ... on 127.0.0.2, 127.0.0.3, ... with disjoint port ranges. Unlike
/// [`DevCluster`], a test can kill and restart its coordinator.
pub struct HandCluster {
    pub addr: String,
    /// Started with `--insecure` (plain HTTP, no tokens).
    pub insecure: bool,
    /// The token agents join with.
    join_token: Option<String>,
    // Agents are dropped (stopped) before the coordinator.
    agents: Vec<(String, Proc)>,
    coordinator: Option<Proc>,
    /// The coordinator's `--node-timeout-ms`.
    node_timeout_ms: u64,
    /// More flags for every coordinator this cluster starts.
    coordinator_flags: Vec<String>,
    /// The data dir of the coordinator started last (its admin token).
    admin_token_dir: PathBuf,
    pub dir: tempfile::TempDir,
    _lock: MutexGuard<'static, ()>,
}

impl HandCluster {
    /// Starts a coordinator with its data in `<dir>/coordinator` and `agents` agents, and waits
    /// until every agent is up.
    pub fn start(agents: u32) -> HandCluster {
        Self::start_with(agents, 15_000)
    }

    /// [`HandCluster::start`] with the coordinator's `--node-timeout-ms` (how soon a silent host
    /// is lost).
    pub fn start_with(agents: u32, node_timeout_ms: u64) -> HandCluster {
        Self::start_full(agents, node_timeout_ms, false)
    }

    /// [`HandCluster::start_with`], plain HTTP and no tokens when `insecure`. A secure one uses
    /// a CA made with `trainctl ca init` in `<dir>/ca` (the operator's own PKI), so a
    /// coordinator started on a fresh data dir is still trusted by the agents.
    pub fn start_full(agents: u32, node_timeout_ms: u64, insecure: bool) -> HandCluster {
        Self::start_configured(agents, node_timeout_ms, insecure, &[])
    }

    /// [`HandCluster::start_full`] with `coordinator_flags` added to the coordinator's command line.
    pub fn start_configured(
        agents: u32,
        node_timeout_ms: u64,
        insecure: bool,
        coordinator_flags: &[&str],
    ) -> HandCluster {
        let lock = lock_cluster_addresses();
        let dir = tempfile::tempdir().unwrap();
        if !insecure {
            let out = Command::new(trainctl())
                .args(["ca", "init", "--dir"])
                .arg(dir.path().join("ca"))
                .output()
                .unwrap();
            assert!(out.status.success(), "ca init: {out:?}");
        }
        let mut cluster = HandCluster {
            addr: format!("127.0.0.1:{}", free_port()),
            insecure,
            join_token: None,
            agents: Vec::new(),
            coordinator: None,
            node_timeout_ms,
            coordinator_flags: coordinator_flags.iter().map(|f| f.to_string()).collect(),
            admin_token_dir: PathBuf::new(),
            dir,
            _lock: lock,
        };
        cluster.start_coordinator(&cluster.coordinator_dir());
        if !insecure {
            cluster.wait_coordinator_credentials(&cluster.coordinator_dir());
            cluster.new_join_token();
        }
        for i in 1..=agents {
            cluster.start_agent(i);
        }
        cluster.wait_agents_up(agents as usize);
        cluster
    }

    /// Starts agent `host-I` on 127.0.0.(I+1) with its data in `<dir>/agent-I` (the same as before
    /// when it ran already: a host that comes back).
    pub fn start_agent(&mut self, i: u32) {
        let name = format!("host-{i}");
        let url = self.url();
        let data = self.dir.path().join(format!("agent-{i}"));
        let ports = format!("{}-{}", 29500 + i * 100, 29599 + i * 100);
        let ca = self.ca_cert();
        let mut args = vec![
            "agent",
            "--coordinator",
            &url,
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            &name,
        ];
        let advertise = format!("127.0.0.{}", i + 1);
        args.extend(["--advertise-addr", &advertise, "--port-range", &ports]);
        if !self.insecure {
            args.extend(["--ca-cert", ca.to_str().unwrap()]);
        }
        let env: Vec<(&str, &str)> = self
            .join_token
            .as_deref()
            .map(|t| ("TRAINCTL_JOIN_TOKEN", t))
            .into_iter()
            .collect();
        let agent = start_with_env(&args, &env, &self.log());
        self.agents.push((name, agent));
    }

    /// SIGKILLs agent `name` (a host lost at once) and waits for it to be gone. Its reaper kills
    /// its ranks.
    pub fn kill_agent(&mut self, name: &str) {
        let at = self
            .agents
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no agent named {name} runs"));
        let (_, mut agent) = self.agents.remove(at);
        signal(agent.0.id(), libc::SIGKILL);
        let _ = agent.0.wait();
    }

    /// Where the first coordinator keeps its data.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// The file every process of the cluster writes its output to.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("cluster.log")
    }

    /// Starts a coordinator on the cluster's address with its data in `data_dir`.
    pub fn start_coordinator(&mut self, data_dir: &Path) {
        let timeout = self.node_timeout_ms.to_string();
        let ca_cert = self.ca_cert();
        let ca_key = self.dir.path().join("ca").join("ca.key");
        let mut args = vec![
            "coordinator",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &self.addr,
            "--node-timeout-ms",
            &timeout,
        ];
        if self.insecure {
            args.push("--insecure");
        } else {
            args.extend([
                "--tls-ca-cert",
                ca_cert.to_str().unwrap(),
                "--tls-ca-key",
                ca_key.to_str().unwrap(),
            ]);
        }
        args.extend(self.coordinator_flags.iter().map(String::as_str));
        self.coordinator = Some(start(&args, &self.log()));
        self.admin_token_dir = data_dir.to_path_buf();
    }

    /// Waits until the coordinator in `data_dir` has written its admin token.
    pub fn wait_coordinator_credentials(&self, data_dir: &Path) {
        let token = data_dir.join("admin.token");
        eventually(Duration::from_secs(30), "the admin token", || {
            token.exists().then_some(())
        });
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        let scheme = if self.insecure { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// The cluster CA certificate (made by `trainctl ca init`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca").join("ca.pem")
    }

    /// Makes a new agent join token (from the coordinator started last) for agents started
    /// from now on.
    pub fn new_join_token(&mut self) {
        let out = self.cli(&["token", "create", "--role", "agent"]);
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.join_token = Some(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }

    /// curl's arguments for the CA and the admin token (none when insecure).
    pub fn curl_auth_args(&self) -> Vec<String> {
        match self.token() {
            Some(token) => vec![
                "--cacert".into(),
                self.ca_cert().display().to_string(),
                "-H".into(),
                format!("Authorization: Bearer {token}"),
            ],
            None => Vec::new(),
        }
    }

    /// The admin token of the coordinator started last.
    pub fn token(&self) -> Option<String> {
        if self.insecure {
            return None;
        }
        std::fs::read_to_string(self.admin_token_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// SIGKILLs the coordinator and waits for it to be gone.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            signal(c.0.id(), libc::SIGKILL);
            let _ = c.0.wait();
        }
    }

    /// Waits until `count` agents are up.
    pub fn wait_agents_up(&self, count: usize) {
        eventually(
            Duration::from_secs(30),
            &format!("{count} agents up"),
            || (nodes_up(&self.json(&["nodes"]))? == count).then_some(()),
        );
    }

    /// Runs `trainctl ARGS` against this cluster, as its admin.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(trainctl());
        cmd.args(args)
            .env("TRAINCTL_ADDR", self.url())
            .env("TRAINCTL_CONFIG", self.dir.path().join("no-config.toml"))
            .stdin(Stdio::null());
        if let Some(token) = self.token() {
            cmd.env("TRAINCTL_TOKEN", token)
                .env("TRAINCTL_CA_CERT", self.ca_cert());
        }
        cmd.output().expect("run trainctl")
    }

    /// Runs `trainctl ARGS -o json`; `null` when it printed no JSON (e.g. the coordinator is down).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.cli(&all).stdout).unwrap_or(Value::Null)
    }

    /// Submits a job file and returns its id.
    pub fn submit(&self, file: &Path) -> String {
        let out = self.cli(&["submit", file.to_str().unwrap(), "-o", "json"]);
        assert!(
            out.status.success(),
            "submit {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// `trainctl status ID -o json`.
    pub fn job(&self, id: &str) -> Value {
        self.json(&["status", id])
    }

    /// Waits for `state`; panics early (with the job and its output) if the job ends in another
    /// state, or after `timeout` (with the nodes and the cluster's log tail).
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let start = Instant::now();
        loop {
            let j = self.job(id);
            if j["state"] == state {
                return j;
            }
            if !j.is_null() {
                last = j;
            }
            let terminal = ["succeeded", "failed", "cancelled"];
            if terminal.contains(&last["state"].as_str().unwrap_or("")) {
                panic!(
                    "job {id} ended {} while waiting for {state}: {last:#}\nlogs:\n{}",
                    last["state"],
                    self.logs(id)
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for job {id} to be {state}: {last:#}\nnodes: {:#}\ncluster log (tail):\n{}",
                    self.json(&["nodes"]),
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines the cluster's processes wrote.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The current (or last) attempt's output, as `trainctl logs` prints it.
    pub fn logs(&self, id: &str) -> String {
        String::from_utf8_lossy(&self.cli(&["logs", id]).stdout).into_owned()
    }

    /// Every line of one attempt's output, as `trainctl logs ID --attempt N` prints it.
    pub fn attempt_logs(&self, id: &str, attempt: u32) -> String {
        let out = self.cli(&["logs", id, "--attempt", &attempt.to_string()]);
        assert!(
            out.status.success(),
            "trainctl logs {id} --attempt {attempt} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The strings of a JSON array.
pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The virtual environment's python, created (with torch) by scripts/python-env.sh if needed.
pub fn python_with_torch() -> PathBuf {
    let out = Command::new(repo().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("python-env.sh prints the python path")
            .trim(),
    )
}

/// `PATH` with the venv's `bin/` (torch's `python3`) first, for a cluster whose ranks run python.
pub fn path_with_venv() -> String {
    let python = python_with_torch();
    format!(
        "{}:{}",
        python.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
