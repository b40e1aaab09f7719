//! Real `trainctl coordinator` processes for the replication benchmarks: a Raft group of N
//! coordinators on loopback addresses of `127.0.10.x` (not `127.0.0.x`, where the tests run), each a
//! child process of the benchmark with its own data dir, `--insecure` (plain HTTP, no token), as an
//! operator starts them: the first bootstraps, the others `--join` it.
//!
//! The binary is the one built by `cargo build --release -p trainctl` (or `TRAINCTL_BIN`), copied
//! into the benchmark's temporary directory first, so a rebuild during the run changes nothing.
//!
//! Children are SIGKILLed and reaped when the [`Group`] is dropped (also on a panic).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{Gpu, HostResources, RegisterRequest};

use crate::load::{self, Connections};

/// How long a coordinator gets to answer, join or catch up before the benchmark gives up.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(120);
/// The node timeout the coordinators run with: the fake hosts never heartbeat, and must stay up.
pub const NODE_TIMEOUT_MS: &str = "3600000";

/// The `trainctl` binary: `TRAINCTL_BIN`, else `release/trainctl` next to the benchmark's own
/// `release/deps/` (the target dir `cargo bench` builds into), else `<workspace>/target/release`.
/// Copied to `into/trainctl-bin`; what was found and how old it is is printed, since `cargo bench` of
/// this package does not build it.
pub fn trainctl_binary(into: &Path) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("TRAINCTL_BIN") {
        Some(bin) => vec![PathBuf::from(bin)],
        None => {
            let mut c = Vec::new();
            if let Ok(exe) = std::env::current_exe() {
                // target/release/deps/<bench>-<hash>
                if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
                    c.push(profile_dir.join("trainctl"));
                }
            }
            c.push(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/release/trainctl")
                    .to_path_buf(),
            );
            c
        }
    };
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "no trainctl binary at {candidates:?}: build it first with `cargo build --release -p trainctl` \
             (or set TRAINCTL_BIN)"
        );
    };
    let age = std::fs::metadata(found)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|d| format!("{} s old", d.as_secs()))
        .unwrap_or_else(|| "age unknown".into());
    println!(
        "trainctl binary: {} ({age}; rebuild with `cargo build --release -p trainctl` if stale)",
        found.display()
    );
    let copy = into.join("trainctl-bin");
    std::fs::copy(found, &copy)
        .with_context(|| format!("copy {} to {}", found.display(), copy.display()))?;
    Ok(copy)
}

/// A port of `ip` that was free a moment ago.
pub fn free_port(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let probe =
        TcpListener::bind(SocketAddr::from((ip, 0))).with_context(|| format!("bind {ip}:0"))?;
    Ok(probe.local_addr()?.port())
}

/// `127.0.10.{last}`.
pub fn bench_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 10, last)
}

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Starts `program args` with stdout and stderr appended to `log`.
pub fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    Ok(Proc(child))
}

/// N `trainctl coordinator --insecure` processes forming one Raft group.
pub struct Group {
    bin: PathBuf,
    dir: PathBuf,
    /// `host:port` of each member, by slot.
    pub addrs: Vec<String>,
    data_dirs: Vec<PathBuf>,
    procs: Vec<Option<Proc>>,
    /// Every member's REST base URL (`http://host:port`).
    pub bases: Vec<String>,
    pub client: reqwest::Client,
}

impl Group {
    /// Slots for `n` members on `127.0.10.{first_ip}`, `127.0.10.{first_ip + 1}`, ..., each on a
    /// free port, their data and logs under `dir`. Starts nothing.
    pub fn new(bin: &Path, dir: &Path, n: usize, first_ip: u8) -> anyhow::Result<Group> {
        let mut addrs = Vec::new();
        for i in 0..n {
            let ip = bench_ip(first_ip + i as u8);
            addrs.push(format!("{ip}:{}", free_port(ip)?));
        }
        Ok(Group {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            bases: addrs.iter().map(|a| format!("http://{a}")).collect(),
            data_dirs: (0..n).map(|i| dir.join(format!("c{i}"))).collect(),
            procs: (0..n).map(|_| None).collect(),
            addrs,
            client: load::http_client(Connections::KeepAlive)?,
        })
    }

    /// Adds a slot on `127.0.10.{ip}` (a member to start later with [`Group::start_member`]).
    pub fn add_slot(&mut self, ip: u8) -> anyhow::Result<usize> {
        let ip = bench_ip(ip);
        let addr = format!("{ip}:{}", free_port(ip)?);
        let i = self.addrs.len();
        self.bases.push(format!("http://{addr}"));
        self.addrs.push(addr);
        self.data_dirs.push(self.dir.join(format!("c{i}")));
        self.procs.push(None);
        Ok(i)
    }

    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("c{i}.log"))
    }

    /// Starts every slot: the first bootstraps, the others join it; returns once all are voters
    /// and caught up.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        self.start_member(0, None)?;
        self.wait_leader()
            .await
            .context("the first coordinator to lead")?;
        for i in 1..self.addrs.len() {
            self.start_member(i, Some(0))?;
        }
        self.wait_voters(self.addrs.len()).await
    }

    /// Starts member `i` on its data dir, joining member `join` (`http://`) if given; a member whose
    /// data dir already holds a cluster (`server.json`) needs no `--join`.
    pub fn start_member(&mut self, i: usize, join: Option<usize>) -> anyhow::Result<()> {
        ensure!(self.procs[i].is_none(), "coordinator {i} already runs");
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--data-dir".into(),
            self.data_dirs[i].display().to_string(),
            "--listen".into(),
            self.addrs[i].clone(),
            "--insecure".into(),
            "--node-timeout-ms".into(),
            NODE_TIMEOUT_MS.into(),
        ];
        if let Some(j) = join {
            args.extend(["--join".into(), self.bases[j].clone()]);
        }
        self.procs[i] = Some(spawn(&self.bin, &args, &self.log(i))?);
        Ok(())
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.procs[i].take();
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(Proc::pid)
    }

    pub fn running(&self, i: usize) -> bool {
        self.procs[i].is_some()
    }

    /// Fails if a started member exited on its own.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            if let Some(p) = p {
                if let Some(status) = p.0.try_wait()? {
                    bail!(
                        "coordinator {i} exited on its own ({status}); see {}",
                        self.dir.join(format!("c{i}.log")).display()
                    );
                }
            }
        }
        Ok(())
    }

    /// `GET /v1/cluster` on member `i` (`?local`: its own view, not the leader's).
    pub async fn cluster_view(&self, i: usize, local: bool) -> anyhow::Result<Value> {
        let url = format!(
            "{}/v1/cluster{}",
            self.bases[i],
            if local { "?local" } else { "" }
        );
        let response = self
            .client
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        ensure!(status.is_success(), "GET {url}: {status}: {body}");
        Ok(body)
    }

    /// The slot of the leader, as the running members report it (their own views).
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.addrs.len() {
            if !self.running(i) {
                continue;
            }
            if let Ok(view) = self.cluster_view(i, true).await {
                if let Some(addr) = view["leader"]["address"].as_str() {
                    if let Some(j) = self.addrs.iter().position(|a| a == addr) {
                        if self.running(j) {
                            return Some(j);
                        }
                    }
                }
            }
        }
        None
    }

    /// Waits for a running leader.
    pub async fn wait_leader(&mut self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + MEMBER_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Some(i) = self.leader().await {
                return Ok(i);
            }
            ensure!(
                Instant::now() < deadline,
                "no leader within {MEMBER_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the leader's view shows `n` voters, none more than `max_lag` entries behind.
    pub async fn voters_caught_up(&self, n: usize, max_lag: u64) -> bool {
        let Some(leader) = self.leader().await else {
            return false;
        };
        let Ok(view) = self.cluster_view(leader, true).await else {
            return false;
        };
        let Some(members) = view["members"].as_array() else {
            return false;
        };
        let voters = members.iter().filter(|m| m["voter"] == true).count();
        voters == n
            && members
                .iter()
                .all(|m| m["lag"].as_u64().is_some_and(|lag| lag <= max_lag))
    }

    /// Whether the leader's view lists member `i` (by address) as a voter.
    pub async fn is_voter(&self, i: usize) -> bool {
        let Some(leader) = self.leader().await else {
            return false;
        };
        let Ok(view) = self.cluster_view(leader, true).await else {
            return false;
        };
        view["members"].as_array().is_some_and(|members| {
            members
                .iter()
                .any(|m| m["address"] == self.addrs[i].as_str() && m["voter"] == true)
        })
    }

    /// Waits until the leader sees `n` voters, none lagging.
    pub async fn wait_voters(&mut self, n: usize) -> anyhow::Result<()> {
        self.wait_voters_within(n, 0).await
    }

    /// Waits until the leader sees `n` voters, none more than `max_lag` entries behind (under a
    /// write load a member is rarely at lag 0 at the moment of a poll).
    pub async fn wait_voters_within(&mut self, n: usize, max_lag: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + MEMBER_TIMEOUT;
        loop {
            self.check_alive()?;
            if self.voters_caught_up(n, max_lag).await {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{n} caught-up voters not seen within {MEMBER_TIMEOUT:?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers `count` fake hosts of 8 GPUs, 64 CPUs and 1 TiB with the leader over the agent
    /// gRPC service (plain h2c, as `--insecure` agents speak), so submissions of
    /// [`crate::job_spec_json`] (4 hosts x 8 GPUs) pass the "can this ever fit" check. They never
    /// heartbeat; the coordinators' node timeout is an hour. The first job is placed on them and
    /// the rest queue behind it.
    pub async fn register_fake_nodes(&mut self, count: usize) -> anyhow::Result<()> {
        let leader = self.wait_leader().await?;
        let channel = trainctl_agent::identity::coordinator_channel(&self.bases[leader], None)?;
        let mut client = AgentServiceClient::new(channel);
        for i in 0..count {
            let node = format!("fake-{i:03}");
            client
                .register(RegisterRequest {
                    node_name: node.clone(),
                    address: "127.0.10.250".to_string(),
                    instance_id: format!("bench-{}-{i}", std::process::id()),
                    resources: Some(HostResources {
                        cpus: 64,
                        memory_mib: 1 << 20,
                        gpus: (0..8)
                            .map(|g| Gpu {
                                index: g,
                                name: "NVIDIA H100 80GB HBM3".into(),
                                memory_mib: 81_559,
                                uuid: format!("GPU-{i:08x}-{g:04x}-0000-0000-000000000000"),
                                ..Default::default()
                            })
                            .collect(),
                        hostname: node.clone(),
                        containment: "none (benchmark)".into(),
                        ..Default::default()
                    }),
                    port_range_start: 29_500,
                    port_range_end: 29_599,
                    agent_version: "bench".into(),
                    health: None,
                })
                .await
                .with_context(|| format!("register {node}"))?;
        }
        Ok(())
    }
}

/// A process's peak resident set (`VmHWM`) and current one (`VmRSS`) in KiB, from
/// `/proc/PID/status`; `None` once it is gone.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Sorted durations' nearest-rank percentile `p` (0..=100).
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    sorted[(n * p).div_ceil(100).clamp(1, n) - 1]
}

/// The benchmark's directory: removed at the end, or kept (and its path printed) with
/// `TRAINCTL_BENCH_KEEP=1`, for the coordinators' logs.
pub struct BenchDir {
    pub path: PathBuf,
    _removed_on_drop: Option<tempfile::TempDir>,
}

impl BenchDir {
    pub fn new(prefix: &str) -> anyhow::Result<BenchDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("create a temporary directory")?;
        if std::env::var("TRAINCTL_BENCH_KEEP").as_deref() == Ok("1") {
            let path = dir.keep();
            println!(
                "TRAINCTL_BENCH_KEEP=1: data and logs kept in {}",
                path.display()
            );
            return Ok(BenchDir {
                path,
                _removed_on_drop: None,
            });
        }
        Ok(BenchDir {
            path: dir.path().to_path_buf(),
            _removed_on_drop: Some(dir),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50), Duration::from_millis(10));
        // With 20 samples the p99 is the largest.
        assert_eq!(percentile(&samples, 99), Duration::from_millis(20));
        assert_eq!(percentile(&samples, 100), Duration::from_millis(20));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn rss_of_this_process_is_read() {
        let (peak, now) = rss_kib(std::process::id()).expect("/proc/self/status");
        assert!(peak >= now && now > 0, "VmHWM {peak} KiB, VmRSS {now} KiB");
    }

    #[test]
    fn bench_addresses_are_free_ports_on_127_0_10() {
        let ip = bench_ip(7);
        assert_eq!(ip.to_string(), "127.0.10.7");
        assert!(free_port(ip).unwrap() > 0);
    }
}
