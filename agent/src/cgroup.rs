//! Containing ranks in cgroup v2 (Linux), where the host delegates a cgroup2 hierarchy.
//!
//! A process group is not a container: a rank's child that calls `setsid` (or a shell with job
//! control, `set -m`) leaves the rank's group, and after a double fork it is reparented to init,
//! beyond the reach of `kill(-pgid)`. A cgroup is: every descendant of a process stays in its
//! cgroup unless moved out by someone with write access to the cgroup tree, and `cgroup.kill`
//! SIGKILLs every process in a cgroup and its descendants at once, including ones forked during
//! the kill.
//!
//! # Layout
//! `<mount><agent's cgroup>/trainctl-<instance>/job-<id>-attempt-<n>/rank-<r>`: one tree per agent
//! instance (so that agents sharing a host, or a restarted agent, never touch each other's), one
//! cgroup per job attempt carrying the job's per-node limits (`cpu.max`, `memory.max`) where those
//! controllers are available, and one leaf per rank so a rank can be stopped on its own and its
//! OOM kills counted (`memory.events`).
//!
//! A rank is moved into its leaf between `fork` and `exec` (see `process::spawn_rank`), so
//! everything it starts is born inside. Where no cgroup2 hierarchy is usable the agent falls back
//! to process groups and says so ([`Containment::describe`], shown by `trainctl nodes`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Controllers the agent applies limits with, when the hierarchy offers them.
pub const WANTED_CONTROLLERS: [&str; 2] = ["cpu", "memory"];
/// Period written to `cpu.max` (microseconds); the quota is this times the CPUs.
pub const CPU_PERIOD_US: u64 = 100_000;
/// File in the agent's data directory naming the agent's cgroup tree, so that a restarted agent
/// kills what its predecessor left there.
pub const CGROUP_RECORD_FILE: &str = "rank-cgroups";
/// Prefix of the name of an agent instance's cgroup tree.
pub const TREE_PREFIX: &str = "trainctl-";
/// Interval between checks of whether a cgroup is empty.
pub const POLL_INTERVAL_MS: u64 = 20;

/// A cgroup2 mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`.
    pub mount_point: PathBuf,
    /// The cgroup shown at the mount point (`/` unless a sub-tree is bind-mounted).
    pub root: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every cgroup2 mount in a `/proc/self/mountinfo` text, in file order. A line is
/// `id parent maj:min root mount_point options [optional fields...] - fstype source super_options`.
pub fn parse_mountinfo(text: &str) -> Vec<Cgroup2Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if dash < 6 || fields.get(dash + 1) != Some(&"cgroup2") {
            continue;
        }
        mounts.push(Cgroup2Mount {
            mount_point: PathBuf::from(unescape_mountinfo(fields[4])),
            root: unescape_mountinfo(fields[3]),
        });
    }
    mounts
}

/// The mount to use: `/sys/fs/cgroup` when it is cgroup2 (a unified host), else the first cgroup2
/// mount (a hybrid host's `/sys/fs/cgroup/unified`).
pub fn choose_mount(mounts: &[Cgroup2Mount]) -> Option<&Cgroup2Mount> {
    mounts
        .iter()
        .find(|m| m.mount_point == Path::new("/sys/fs/cgroup"))
        .or_else(|| mounts.first())
}

/// This process's cgroup2 path (the `0::` line of `/proc/self/cgroup`).
pub fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The directory of cgroup `own` (a `/proc/self/cgroup` path) under `mount`.
pub fn cgroup_dir(mount: &Cgroup2Mount, own: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let relative = if !root.is_empty() && own.starts_with(root) {
        &own[root.len()..]
    } else {
        own
    };
    let relative = relative.trim_start_matches('/');
    if relative.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(relative)
    }
}

/// The limits a job attempt's cgroup gets on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Text for `cpu.max` (`"<quota> <period>"`), when the cpu controller is available.
    pub cpu_max: Option<String>,
    /// Bytes for `memory.max`, when the memory controller is available and memory was asked for.
    pub memory_max: Option<u64>,
}

/// The limits for a job asking `cpus` CPUs and `memory_mib` MiB per node, given the controllers
/// available. 0 CPUs or 0 MiB means no limit.
pub fn limits_for(cpus: u32, memory_mib: u64, controllers: &[String]) -> Limits {
    let has = |c: &str| controllers.iter().any(|x| x == c);
    Limits {
        cpu_max: (cpus > 0 && has("cpu"))
            .then(|| format!("{} {CPU_PERIOD_US}", u64::from(cpus) * CPU_PERIOD_US)),
        memory_max: (memory_mib > 0 && has("memory")).then(|| memory_mib.saturating_mul(1 << 20)),
    }
}

impl Limits {
    /// What was applied, for the log: e.g. `cpu.max=400000 100000, memory.max=1073741824`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.cpu_max {
            parts.push(format!("cpu.max={c}"));
        }
        if let Some(m) = self.memory_max {
            parts.push(format!("memory.max={m}"));
        }
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// How this agent contains ranks.
#[derive(Debug, Clone)]
pub enum Containment {
    /// Each rank in its own cgroup under `tree`.
    Cgroup2(CgroupTree),
    /// Each rank in its own process group only (a `setsid` escapes it).
    ProcessGroups {
        /// Why no cgroup is used.
        reason: String,
    },
}

/// An agent instance's cgroup tree.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    /// `<mount><agent's cgroup>/trainctl-<instance>`.
    pub base: PathBuf,
    /// Controllers enabled for the job cgroups (a subset of [`WANTED_CONTROLLERS`]).
    pub controllers: Vec<String>,
}

fn read_controllers(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Enables each wanted controller listed in `dir/cgroup.controllers` in `dir/cgroup.subtree_control`
/// (one at a time: one refusal does not stop the others); returns those enabled afterwards.
fn enable_controllers(dir: &Path) -> Vec<String> {
    let available = read_controllers(&dir.join("cgroup.controllers"));
    for c in WANTED_CONTROLLERS {
        if available.iter().any(|a| a == c) {
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
    read_controllers(&dir.join("cgroup.subtree_control"))
        .into_iter()
        .filter(|c| WANTED_CONTROLLERS.contains(&c.as_str()))
        .collect()
}

impl Containment {
    /// Finds a usable cgroup2 hierarchy and creates this agent instance's tree in it (under the
    /// agent's own cgroup), or explains why ranks fall back to process groups.
    pub fn detect(instance: &str) -> Containment {
        let fallback = |reason: String| Containment::ProcessGroups { reason };
        let mountinfo = match fs::read_to_string("/proc/self/mountinfo") {
            Ok(t) => t,
            Err(e) => return fallback(format!("cannot read /proc/self/mountinfo: {e}")),
        };
        let mounts = parse_mountinfo(&mountinfo);
        let Some(mount) = choose_mount(&mounts) else {
            return fallback("no cgroup2 mounted".to_string());
        };
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| parse_own_cgroup(&t));
        let Some(own) = own else {
            return fallback("the agent is in no cgroup2 cgroup".to_string());
        };
        let parent = cgroup_dir(mount, &own);
        let base = parent.join(format!("{TREE_PREFIX}{instance}"));
        if let Err(e) = fs::create_dir(&base) {
            return fallback(format!(
                "no cgroup2 delegated: cannot create {}: {e}",
                base.display()
            ));
        }
        if !base.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&base);
            return fallback("the kernel has no cgroup.kill (before Linux 5.14)".to_string());
        }
        // Controllers reach the tree only if the agent's own cgroup passes them down, which the
        // kernel refuses (EBUSY) for a non-root cgroup holding processes: then there are none.
        enable_controllers(&parent);
        let controllers = enable_controllers(&base);
        Containment::Cgroup2(CgroupTree { base, controllers })
    }

    /// What `trainctl nodes` shows: `cgroup2 (cpu, memory)`, `cgroup2 (no controllers)` or
    /// `process groups (<why>)`.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup2(tree) if tree.controllers.is_empty() => {
                "cgroup2 (no controllers)".to_string()
            }
            Containment::Cgroup2(tree) => format!("cgroup2 ({})", tree.controllers.join(", ")),
            Containment::ProcessGroups { reason } => format!("process groups ({reason})"),
        }
    }

    /// The tree, when ranks run in cgroups.
    pub fn tree(&self) -> Option<&CgroupTree> {
        match self {
            Containment::Cgroup2(tree) => Some(tree),
            Containment::ProcessGroups { .. } => None,
        }
    }
}

/// A cgroup directory name made of safe characters only.
fn safe_name(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl CgroupTree {
    /// The cgroup of one job attempt.
    pub fn job_dir(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.base
            .join(format!("job-{}-attempt-{attempt}", safe_name(job_id)))
    }

    /// Creates (or finds) the job attempt's cgroup with `limits`, and a fresh leaf for `rank`
    /// (killing and replacing a leftover one). Returns the leaf.
    pub fn create_rank(
        &self,
        job_id: &str,
        attempt: u32,
        rank: u32,
        limits: &Limits,
    ) -> io::Result<PathBuf> {
        let job = self.job_dir(job_id, attempt);
        let leaf = job.join(format!("rank-{rank}"));
        // A rank ending meanwhile may remove the (then empty) job cgroup: try again.
        let mut last = None;
        for _ in 0..3 {
            match fs::create_dir(&job) {
                Ok(()) => {
                    enable_controllers(&job);
                    if let Some(c) = &limits.cpu_max {
                        fs::write(job.join("cpu.max"), c)?;
                    }
                    if let Some(m) = limits.memory_max {
                        fs::write(job.join("memory.max"), m.to_string())?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if leaf.exists() {
                kill(&leaf);
                wait_empty(&leaf, Duration::from_secs(5));
                remove(&leaf);
            }
            match fs::create_dir(&leaf) {
                Ok(()) => return Ok(leaf),
                Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the job cgroup kept vanishing")))
    }
}

/// Every process in `dir` and its descendant cgroups.
pub fn procs(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(procs(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a live process is in `dir` or below (`populated` of `cgroup.events`). A cgroup that is
/// gone is empty.
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(text) => text
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["populated", "1"]),
        Err(_) => false,
    }
}

/// SIGKILLs every process in `dir` and below (`cgroup.kill`).
pub fn kill(dir: &Path) {
    if let Err(e) = fs::write(dir.join("cgroup.kill"), "1") {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup.kill failed");
        }
    }
}

/// Sends `signal` to every process in `dir` and below. (A process may exit between the read of
/// `cgroup.procs` and the signal; its pid is not reused that fast in practice.)
pub fn signal_all(dir: &Path, signal: libc::c_int) {
    for pid in procs(dir) {
        if pid < 2 {
            continue;
        }
        // SAFETY: `kill` has no memory-safety preconditions; `pid >= 2` names one process.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Polls until `dir` holds no live process or `limit` passes; whether it emptied.
pub fn wait_empty(dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !populated(dir) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

/// [`wait_empty`] for async callers.
pub async fn wait_empty_async(dir: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !populated(dir) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// Removes `dir` and its descendant cgroups, deepest first (only empty cgroups can go). Errors
/// are ignored: a cgroup still in use stays.
pub fn remove(dir: &Path) {
    for sub in subdirs(dir) {
        remove(&sub);
    }
    let _ = fs::remove_dir(dir);
}

/// How many processes of `dir` the OOM killer killed (`oom_kill` of `memory.events`), when the
/// memory controller is enabled there.
pub fn oom_kills(dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(dir.join("memory.events")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some("oom_kill"))
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

/// Kills everything in an agent tree named by a record (a predecessor's, or a dead agent's) and
/// removes the tree. Refuses any path that is not a trainctl tree in a cgroup2 hierarchy.
/// Returns how many processes were in it.
pub fn reap_tree(base: &Path) -> usize {
    let named_ours = base
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TREE_PREFIX));
    if !named_ours || !base.join("cgroup.kill").exists() {
        return 0;
    }
    let count = procs(base).len();
    if count > 0 {
        kill(base);
        wait_empty(base, Duration::from_secs(5));
    }
    remove(base);
    count
}

/// The trees recorded in the data directory's [`CGROUP_RECORD_FILE`].
pub fn recorded_trees(data_dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string(data_dir.join(CGROUP_RECORD_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Records `base` (or nothing) as the data directory's current tree.
pub fn record_tree(data_dir: &Path, base: Option<&Path>) -> io::Result<()> {
    let text = base
        .map(|b| format!("{}\n", b.display()))
        .unwrap_or_default();
    let tmp = data_dir.join(format!("{CGROUP_RECORD_FILE}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(tmp, data_dir.join(CGROUP_RECORD_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
22 1 0:5 / / rw - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
50 22 0:26 /kubepods/pod1 /mnt/my\\040cg rw shared:9 master:4 - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = parse_mountinfo(HYBRID);
        assert_eq!(
            hybrid,
            vec![Cgroup2Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            }]
        );
        assert_eq!(
            choose_mount(&hybrid).unwrap().mount_point,
            Path::new("/sys/fs/cgroup/unified")
        );
        let unified = parse_mountinfo(UNIFIED);
        assert_eq!(unified.len(), 2);
        // Optional fields (shared:, master:) and octal escapes are handled.
        assert_eq!(unified[1].mount_point, Path::new("/mnt/my cg"));
        assert_eq!(unified[1].root, "/kubepods/pod1");
        assert_eq!(
            choose_mount(&unified).unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
        assert!(parse_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n").is_empty());
        assert!(choose_mount(&[]).is_none());
    }

    #[test]
    fn own_cgroup_and_its_directory() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/trainctl.service\n";
        let own = parse_own_cgroup(text).unwrap();
        assert_eq!(own, "/system.slice/trainctl.service");
        let m = Cgroup2Mount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        assert_eq!(
            cgroup_dir(&m, &own),
            Path::new("/sys/fs/cgroup/system.slice/trainctl.service")
        );
        assert_eq!(cgroup_dir(&m, "/"), Path::new("/sys/fs/cgroup"));
        let sub = Cgroup2Mount {
            mount_point: "/mnt/cg".into(),
            root: "/kubepods/pod1".into(),
        };
        assert_eq!(
            cgroup_dir(&sub, "/kubepods/pod1/agent"),
            Path::new("/mnt/cg/agent")
        );
        assert!(parse_own_cgroup("4:memory:/x\n").is_none());
    }

    #[test]
    fn limits_follow_the_job_and_the_controllers_available() {
        let both = vec!["cpu".to_string(), "memory".to_string()];
        assert_eq!(
            limits_for(4, 2048, &both),
            Limits {
                cpu_max: Some("400000 100000".into()),
                memory_max: Some(2048 << 20),
            }
        );
        // 0 MiB means "no requirement": no memory limit.
        assert_eq!(limits_for(1, 0, &both).memory_max, None);
        assert_eq!(limits_for(0, 0, &both), Limits::default());
        // A controller the hierarchy lacks is not applied.
        let cpu_only = vec!["cpu".to_string()];
        assert_eq!(limits_for(2, 512, &cpu_only).memory_max, None);
        assert_eq!(limits_for(2, 512, &[]), Limits::default());
        assert_eq!(limits_for(2, 512, &[]).describe(), "none");
        assert_eq!(
            limits_for(2, 1, &both).describe(),
            "cpu.max=200000 100000, memory.max=1048576"
        );
    }

    #[test]
    fn containment_is_described_for_the_operator() {
        let tree = |c: &[&str]| {
            Containment::Cgroup2(CgroupTree {
                base: "/x".into(),
                controllers: c.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert_eq!(tree(&["cpu", "memory"]).describe(), "cgroup2 (cpu, memory)");
        assert_eq!(tree(&[]).describe(), "cgroup2 (no controllers)");
        let pg = Containment::ProcessGroups {
            reason: "no cgroup2 mounted".into(),
        };
        assert_eq!(pg.describe(), "process groups (no cgroup2 mounted)");
        assert_eq!(safe_name("a/b c..d-1_2"), "a_b_c..d-1_2");
    }

    #[test]
    fn reap_tree_refuses_paths_that_are_not_trainctl_trees() {
        let dir = tempfile::tempdir().unwrap();
        // Not named trainctl-*, and no cgroup.kill: untouched.
        assert_eq!(reap_tree(dir.path()), 0);
        assert!(dir.path().exists());
        let fake = dir.path().join("trainctl-abc");
        fs::create_dir(&fake).unwrap();
        assert_eq!(reap_tree(&fake), 0);
        assert!(fake.exists(), "a plain directory is not a cgroup");
    }
}
