//! Pre-flight: is this host fit to run GPU and RDMA work, and if not, why not.
//!
//! A run has three steps, and only the middle one touches hardware:
//! 1. [`plan`] (pure): from the host's discovered facts and a [`Scope`], the list of checks, with
//!    those that need no probe already decided (no GPU, declared GPUs, a claimed port that is not
//!    ACTIVE or an unclaimed one ([`ports`]), pending retired pages from NVML).
//! 2. [`run`]: each remaining probe ([`probes`]) on its own thread, stage by stage, each stage
//!    with a deadline and the whole run with a budget: a hung driver or library call fails its
//!    check ("did not finish within ...") and never hangs the caller. The probe thread of a hung
//!    call is left behind (a thread stuck inside a driver cannot be stopped).
//! 3. [`assess`] (pure): healthy unless a check failed; the reason names the failed checks.
//!
//! `trainctl preflight` prints a [`Report`]; the agent runs [`run`] at start, every
//! `--preflight-interval`, and for the GPUs of a job before its ranks start, and reports the
//! verdict to the coordinator, which keeps an unhealthy host out of placement.
//!
//! For tests, `TRAINCTL_PREFLIGHT_FAIL` ([`Injection::from_env`]) makes named checks fail.

pub mod libraries;
pub mod ports;
pub mod probes;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::discovery::{GpuInfo, HostFacts};

/// NVML's health of each GPU: no retired pages pending, no uncorrectable ECC error.
pub const CHECK_GPU_HEALTH: &str = "gpu-health";
/// Each GPU allocates memory and copies it host-to-device, device-to-device and device-to-host
/// at a plausible bandwidth, the data unchanged.
pub const CHECK_GPU_COPY: &str = "gpu-copy";
/// Every RDMA port the host claims ([`ports`]) is ACTIVE; an unclaimed port is reported, skipped.
pub const CHECK_RDMA_PORT: &str = "rdma-port-active";
/// An RDMA write with immediate from a queue pair to itself on each claimed ACTIVE port.
pub const CHECK_RDMA_LOOPBACK: &str = "rdma-loopback";
/// A single-host NCCL all-reduce over every GPU reaches a plausible bus bandwidth.
pub const CHECK_NCCL: &str = "nccl-all-reduce";
/// Every check, in the order a run reports them.
pub const CHECK_NAMES: [&str; 5] = [
    CHECK_GPU_HEALTH,
    CHECK_GPU_COPY,
    CHECK_RDMA_PORT,
    CHECK_RDMA_LOOPBACK,
    CHECK_NCCL,
];

/// Uncorrectable ECC errors a GPU may have had since the driver loaded: none. NVIDIA's
/// "GPU Memory Error Management" guide: an uncorrectable error corrupted data and the GPU needs
/// a reset (its page is retired then), so no job should start there before that.
pub const MAX_UNCORRECTABLE_ECC_ERRORS: u64 = 0;

/// Bytes each GPU copies per direction ([`CHECK_GPU_COPY`]): large enough that the copy engines
/// reach their steady rate (nvbandwidth uses 64 MiB and up), small enough for any GPU with 1 GiB free.
pub const GPU_COPY_BYTES: usize = 256 << 20;
/// Timed copies of each kind per GPU.
pub const GPU_COPY_ITERATIONS: u32 = 4;
/// Lowest host-to-device and device-to-host rate (pinned memory) a healthy GPU reaches, GB/s.
/// PCIe 3.0 x16 moves about 12 GB/s, 4.0 x16 about 25, 5.0 x16 about 50 (nvbandwidth,
/// bandwidthTest): 3 GB/s is a quarter of the oldest link trainctl expects, and what a link that
/// trained down to x4 or Gen1 (a loose riser, a failing slot) gives.
pub const MIN_HOST_COPY_GB_PER_S: f64 = 3.0;
/// Lowest device-to-device copy rate on one GPU, GB/s of bytes copied. A copy reads and writes
/// each byte, so it runs at under half the memory bandwidth: about 120 GB/s on a T4 (320 GB/s
/// GDDR6), 700 on an A100, 2 000 on an H200. 50 GB/s is far below any datacenter GPU and
/// catches one stuck at its lowest clocks or with failing memory.
pub const MIN_DEVICE_COPY_GB_PER_S: f64 = 50.0;

/// f32 elements each GPU all-reduces in [`CHECK_NCCL`]: 64 MiB, where nccl-tests' bus bandwidth
/// is near its plateau on PCIe and NVLink hosts alike.
pub const NCCL_ELEMENTS: usize = 16 << 20;
/// Timed all-reduces (after NCCL's own warm-up one).
pub const NCCL_ITERATIONS: u32 = 5;
/// Lowest NCCL bus bandwidth of a single-host all-reduce over 2 or more GPUs, GB/s. Two GPUs
/// over PCIe 4.0 without NVLink reach about 10-20 GB/s in nccl-tests at 64 MiB; NVLink hosts
/// reach hundreds. 5 GB/s catches a host whose GPUs fall back to copies through host memory
/// (a broken P2P path, `NCCL_P2P_DISABLE` left set) or a downtrained link.
pub const MIN_NCCL_BUS_GB_PER_S: f64 = 5.0;

/// Bytes of the RDMA loopback write.
pub const RDMA_LOOPBACK_BYTES: usize = 64 << 10;

/// Longest wait for the libraries to load and the CUDA driver to list its devices (`cuInit`
/// on a GPU that fell off the bus can hang).
pub const LIBRARY_LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for every GPU's copy probe (they run in parallel, one thread per GPU).
pub const GPU_COPY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for every port's loopback write (in parallel; each polls its CQ for at most 5 s).
pub const RDMA_LOOPBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the NCCL all-reduce (communicator set-up over 8 GPUs takes a few seconds).
pub const NCCL_TIMEOUT: Duration = Duration::from_secs(45);
/// The whole run, all stages: what `trainctl preflight` and the agent's start and periodic runs
/// wait at most. The goal is under 10 s for 8 GPUs and 8 NICs; this bound is for hung calls.
pub const RUN_BUDGET: Duration = Duration::from_secs(90);
/// The check before a job's ranks start, for that job's GPUs only.
pub const JOB_BUDGET: Duration = Duration::from_secs(30);
/// How often the agent runs the pre-flight by default (its `--preflight-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// How soon the agent runs the whole-host checks again after its host became or stayed unhealthy,
/// when `--preflight-interval` is longer or 0 (never): a host must be able to recover without a
/// restart of its agent, and a minute is short next to a repair and long next to a run (at most
/// [`RUN_BUDGET`]).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// How long after a finished run the next whole-host run is due, given the verdict over every
/// check now (pure): a healthy host waits `interval` (zero: no periodic run, `None`); an
/// unhealthy one at most [`RETRY_AFTER_FAILURE`], even when `interval` is zero.
pub fn next_run_after(interval: Duration, healthy: bool) -> Option<Duration> {
    match (interval.is_zero(), healthy) {
        (true, true) => None,
        (false, true) => Some(interval),
        (true, false) => Some(RETRY_AFTER_FAILURE),
        (false, false) => Some(interval.min(RETRY_AFTER_FAILURE)),
    }
}
/// Longest health reason sent to the coordinator.
pub const REASON_BYTES_MAX: usize = 1024;
/// Failed checks named in a health reason; more are counted.
pub const REASON_CHECKS_MAX: usize = 3;

/// The environment variable that makes checks fail, for tests ([`Injection::from_env`]).
pub const FAIL_ENV: &str = "TRAINCTL_PREFLIGHT_FAIL";

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Outcome {
    /// It ran and the host passed.
    Passed,
    /// It ran (or the facts decided it) and the host failed.
    Failed {
        /// What was wrong, with the figure and the threshold where there is one.
        reason: String,
    },
    /// Nothing to check here (no GPU, no RDMA device, a library not installed).
    Skipped {
        /// Why not.
        reason: String,
    },
}

impl Outcome {
    fn failed(reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
        }
    }

    fn skipped(reason: impl Into<String>) -> Outcome {
        Outcome::Skipped {
            reason: reason.into(),
        }
    }

    /// "passed", "failed" or "skipped".
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed { .. } => "failed",
            Outcome::Skipped { .. } => "skipped",
        }
    }

    /// The reason of a failed or skipped check.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Passed => None,
            Outcome::Failed { reason } | Outcome::Skipped { reason } => Some(reason),
        }
    }
}

/// One check on one subject (a GPU, a port, the host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// One of [`CHECK_NAMES`].
    pub name: String,
    /// What was checked: a GPU's UUID, `mlx5_0 port 1`, or `host`.
    pub subject: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long it took, in milliseconds (0 for what the facts decided).
    pub duration_ms: u64,
    /// What it measured, e.g. `H2D 24.1 GB/s, D2H 25.3 GB/s, D2D 1710 GB/s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figure: Option<String>,
}

/// The verdict on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// No check failed.
    pub healthy: bool,
    /// Why not: the failed checks, their subjects and reasons; `None` when healthy.
    pub reason: Option<String>,
}

/// Healthy unless a check failed; the reason names up to [`REASON_CHECKS_MAX`] failed checks
/// (`gpu-copy on GPU-1234...: ...`), counts the rest, and is at most [`REASON_BYTES_MAX`] bytes.
/// Skipped checks never make a host unhealthy.
pub fn assess(results: &[CheckResult]) -> Health {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed { reason } => Some(format!("{} on {}: {reason}", r.name, r.subject)),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        return Health {
            healthy: true,
            reason: None,
        };
    }
    let mut reason = failed[..failed.len().min(REASON_CHECKS_MAX)].join("; ");
    if failed.len() > REASON_CHECKS_MAX {
        reason.push_str(&format!(
            "; and {} more failed",
            failed.len() - REASON_CHECKS_MAX
        ));
    }
    Health {
        healthy: false,
        reason: Some(truncate(&reason, REASON_BYTES_MAX)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The newest result of every (check, subject): `newer` replaces the entries of `older` with the
/// same check and subject and adds the others. A check before a job covers only that job's GPUs,
/// so the agent's health is this merge over its runs; a whole-host run replaces everything.
pub fn merge(older: &[CheckResult], newer: &[CheckResult]) -> Vec<CheckResult> {
    let replaced: BTreeSet<(&str, &str)> = newer
        .iter()
        .map(|r| (r.name.as_str(), r.subject.as_str()))
        .collect();
    let mut merged: Vec<CheckResult> = older
        .iter()
        .filter(|r| !replaced.contains(&(r.name.as_str(), r.subject.as_str())))
        .cloned()
        .collect();
    merged.extend(newer.iter().cloned());
    merged
}

/// Why a run happens (the injection knob can aim at one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `trainctl preflight`.
    Command,
    /// The agent starting.
    Start,
    /// The agent's periodic run.
    Periodic,
    /// Before a job's ranks start.
    Job,
}

/// What a run covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole host. GPUs in `busy_gpus` (UUIDs of GPUs jobs use now) are not probed: the
    /// copy and the all-reduce would disturb the job, and the job's own check covered them.
    /// Only the ports `ports` claims are required ACTIVE and written to.
    Host {
        /// UUIDs of the GPUs running ranks now.
        busy_gpus: BTreeSet<String>,
        /// The RDMA ports the host claims ([`ports::claim`]).
        ports: ports::PortClaim,
    },
    /// Before a job: the GPU checks of these GPUs (UUIDs) only.
    Gpus(Vec<String>),
}

/// Work a planned check still needs from the hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// [`CHECK_GPU_COPY`] on the GPU with this UUID.
    GpuCopy {
        /// `GPU-...`.
        uuid: String,
    },
    /// [`CHECK_RDMA_LOOPBACK`] on one ACTIVE port.
    RdmaLoopback {
        /// e.g. `mlx5_0`.
        device: String,
        /// From 1.
        port: u8,
        /// The GID index to address the queue pair by: a RoCE v2 entry on Ethernet, 0 on InfiniBand.
        gid_index: u32,
    },
    /// [`CHECK_NCCL`] over these GPUs (UUIDs).
    NcclAllReduce {
        /// `GPU-...` each.
        uuids: Vec<String>,
    },
}

impl Probe {
    /// The stage the probe runs in: GPU copies first, then loopback writes, then NCCL (which
    /// uses every GPU, so it never overlaps the copies).
    fn stage(&self) -> usize {
        match self {
            Probe::GpuCopy { .. } => 0,
            Probe::RdmaLoopback { .. } => 1,
            Probe::NcclAllReduce { .. } => 2,
        }
    }

    fn timeout(&self) -> Duration {
        match self {
            Probe::GpuCopy { .. } => GPU_COPY_TIMEOUT,
            Probe::RdmaLoopback { .. } => RDMA_LOOPBACK_TIMEOUT,
            Probe::NcclAllReduce { .. } => NCCL_TIMEOUT,
        }
    }
}

/// One planned check: decided already, or waiting for its probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// One of [`CHECK_NAMES`].
    pub name: &'static str,
    /// What it checks.
    pub subject: String,
    /// The outcome the facts decided, or the probe to run.
    pub work: Work,
}

/// See [`Planned::work`].
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Decided from the facts, with what they showed.
    Decided(Outcome, Option<String>),
    /// To be measured.
    Probe(Probe),
}

fn decided(name: &'static str, subject: &str, outcome: Outcome, figure: Option<String>) -> Planned {
    Planned {
        name,
        subject: subject.to_string(),
        work: Work::Decided(outcome, figure),
    }
}

fn probe(name: &'static str, subject: &str, probe: Probe) -> Planned {
    Planned {
        name,
        subject: subject.to_string(),
        work: Work::Probe(probe),
    }
}

/// Whether the GPU list was declared with `--gpus N` rather than discovered.
fn declared(gpu: &GpuInfo) -> bool {
    gpu.uuid.starts_with("declared-gpu-")
}

/// Whether NVML reports MIG mode enabled: the CUDA driver then lists the GPU's MIG instances
/// (`MIG-...`), not the GPU itself, so the copy and NCCL probes cannot address it by its UUID.
fn mig_enabled(gpu: &GpuInfo) -> bool {
    gpu.mig_mode == "enabled"
}

/// Why a MIG-enabled GPU is not probed.
const MIG_NOT_PROBED: &str =
    "MIG is enabled: the CUDA driver lists its instances, not the whole GPU, so it is not probed";

/// NVML's health of one GPU, from the discovered facts. `ecc_mode` is empty when NVML did not
/// describe the GPU (only the CUDA driver listed it): nothing to judge.
pub fn gpu_health(gpu: &GpuInfo) -> (Outcome, Option<String>) {
    if gpu.ecc_mode.is_empty() {
        return (
            Outcome::skipped("NVML did not report this GPU (only the CUDA driver listed it)"),
            None,
        );
    }
    let figure = Some(format!(
        "ECC {}, {} uncorrectable error{}, retired pages {}",
        gpu.ecc_mode,
        gpu.uncorrectable_ecc_errors,
        if gpu.uncorrectable_ecc_errors == 1 {
            ""
        } else {
            "s"
        },
        if gpu.retired_pages_pending {
            "pending"
        } else {
            "not pending"
        }
    ));
    let outcome = if gpu.retired_pages_pending {
        Outcome::failed(
            "NVML reports retired pages pending: reset the GPU (nvidia-smi -r) or reload the driver",
        )
    } else if gpu.uncorrectable_ecc_errors > MAX_UNCORRECTABLE_ECC_ERRORS {
        Outcome::failed(format!(
            "NVML counts {} uncorrectable ECC error{} since the driver loaded (at most {} allowed): reset the GPU",
            gpu.uncorrectable_ecc_errors,
            if gpu.uncorrectable_ecc_errors == 1 { "" } else { "s" },
            MAX_UNCORRECTABLE_ECC_ERRORS
        ))
    } else {
        Outcome::Passed
    };
    (outcome, figure)
}

/// The GID index a loopback write on this port uses: 0 on InfiniBand; on Ethernet (RoCE) the
/// first RoCE v2 entry, else the first set entry; `None` when a RoCE port has no GID set.
pub fn loopback_gid_index(port: &crate::discovery::RdmaPort) -> Option<u32> {
    if !port.link_layer.eq_ignore_ascii_case("Ethernet") {
        return Some(0);
    }
    port.gids
        .iter()
        .find(|g| g.kind == "RoCE v2")
        .or_else(|| port.gids.first())
        .map(|g| g.index)
}

/// The checks of a run over `facts` (pure). Every check of [`CHECK_NAMES`] that applies to the
/// scope appears at least once, decided as skipped when there is nothing to check, so a report
/// always says what was and was not checked.
pub fn plan(facts: &HostFacts, scope: &Scope) -> Vec<Planned> {
    let mut out = Vec::new();
    let (gpus, busy): (Vec<&GpuInfo>, BTreeSet<String>) = match scope {
        Scope::Host { busy_gpus, .. } => (facts.gpus.iter().collect(), busy_gpus.clone()),
        Scope::Gpus(uuids) => (
            facts
                .gpus
                .iter()
                .filter(|g| uuids.contains(&g.uuid))
                .collect(),
            BTreeSet::new(),
        ),
    };
    let no_gpu = match scope {
        Scope::Host { .. } => "no GPU on this host",
        Scope::Gpus(_) => "the job has no GPU on this host that discovery knows",
    };
    let all_declared = !gpus.is_empty() && gpus.iter().all(|g| declared(g));
    let gpu_skip = if gpus.is_empty() {
        Some(no_gpu)
    } else if all_declared {
        Some("the GPUs are declared (--gpus N), not discovered: nothing to probe")
    } else {
        None
    };
    // GPU health, then copies.
    for name in [CHECK_GPU_HEALTH, CHECK_GPU_COPY] {
        if let Some(why) = gpu_skip {
            out.push(decided(name, "host", Outcome::skipped(why), None));
            continue;
        }
        for g in gpus.iter().filter(|g| !declared(g)) {
            if name == CHECK_GPU_HEALTH {
                let (outcome, figure) = gpu_health(g);
                out.push(decided(name, &g.uuid, outcome, figure));
            } else if mig_enabled(g) {
                out.push(decided(
                    name,
                    &g.uuid,
                    Outcome::skipped(MIG_NOT_PROBED),
                    None,
                ));
            } else if busy.contains(&g.uuid) {
                out.push(decided(
                    name,
                    &g.uuid,
                    Outcome::skipped("in use by a job (checked before the job's ranks started)"),
                    None,
                ));
            } else {
                out.push(probe(
                    name,
                    &g.uuid,
                    Probe::GpuCopy {
                        uuid: g.uuid.clone(),
                    },
                ));
            }
        }
    }
    let Scope::Host { ports: claim, .. } = scope else {
        return out;
    };
    // RDMA ports (those claimed must be ACTIVE), then loopback writes on the claimed ACTIVE ones.
    let verdicts = ports::judge(claim, &facts.rdma_devices);
    if verdicts.is_empty() {
        for name in [CHECK_RDMA_PORT, CHECK_RDMA_LOOPBACK] {
            out.push(decided(
                name,
                "host",
                Outcome::skipped("no RDMA device on this host"),
                None,
            ));
        }
    }
    for v in &verdicts {
        let figure = v
            .facts
            .map(|p| format!("{} {} {}", p.state, p.link_layer, p.rate));
        let outcome = match &v.status {
            ports::PortStatus::Up => Outcome::Passed,
            ports::PortStatus::Down { state } => Outcome::failed(format!(
                "the port is {}, not ACTIVE (cable, switch port or subnet manager)",
                if state.is_empty() {
                    "in an unknown state"
                } else {
                    state
                }
            )),
            ports::PortStatus::Gone => Outcome::failed(
                "the claimed port is gone: its device is no longer in /sys/class/infiniband (fell off the bus, or its driver unloaded)",
            ),
            ports::PortStatus::Unclaimed(why) => Outcome::skipped(why.reason()),
        };
        out.push(decided(CHECK_RDMA_PORT, &v.subject(), outcome, figure));
    }
    for v in &verdicts {
        let subject = v.subject();
        let p = match (&v.status, v.facts) {
            (ports::PortStatus::Up, Some(p)) => p,
            (ports::PortStatus::Unclaimed(why), _) => {
                out.push(decided(
                    CHECK_RDMA_LOOPBACK,
                    &subject,
                    Outcome::skipped(why.reason()),
                    None,
                ));
                continue;
            }
            (ports::PortStatus::Gone, _) | (ports::PortStatus::Up, None) => {
                out.push(decided(
                    CHECK_RDMA_LOOPBACK,
                    &subject,
                    Outcome::skipped("the port is gone (see rdma-port-active)"),
                    None,
                ));
                continue;
            }
            (ports::PortStatus::Down { .. }, _) => {
                out.push(decided(
                    CHECK_RDMA_LOOPBACK,
                    &subject,
                    Outcome::skipped("the port is not ACTIVE (see rdma-port-active)"),
                    None,
                ));
                continue;
            }
        };
        let (Ok(port), Some(gid_index)) = (u8::try_from(p.port), loopback_gid_index(p)) else {
            out.push(decided(
                CHECK_RDMA_LOOPBACK,
                &subject,
                Outcome::failed("the RoCE port has no GID set: no address to write to"),
                None,
            ));
            continue;
        };
        out.push(probe(
            CHECK_RDMA_LOOPBACK,
            &subject,
            Probe::RdmaLoopback {
                device: v.device.clone(),
                port,
                gid_index,
            },
        ));
    }
    // NCCL over every GPU without MIG, when none is busy.
    let nccl_uuids: Vec<String> = gpus
        .iter()
        .filter(|g| !declared(g) && !mig_enabled(g))
        .map(|g| g.uuid.clone())
        .collect();
    let nccl = match gpu_skip {
        Some(why) => decided(CHECK_NCCL, "host", Outcome::skipped(why), None),
        None if gpus.iter().any(|g| busy.contains(&g.uuid)) => decided(
            CHECK_NCCL,
            "host",
            Outcome::skipped("GPUs are in use by jobs: the all-reduce would disturb them"),
            None,
        ),
        None if nccl_uuids.is_empty() => {
            decided(CHECK_NCCL, "host", Outcome::skipped(MIG_NOT_PROBED), None)
        }
        None => probe(
            CHECK_NCCL,
            "host",
            Probe::NcclAllReduce { uuids: nccl_uuids },
        ),
    };
    out.push(nccl);
    out
}

/// Checks made to fail on purpose, for tests: `TRAINCTL_PREFLIGHT_FAIL=[NODE@][TRIGGER:]CHECK,...`
/// (`NODE@` limits an entry to the agent of that node, so one variable can reach every agent of
/// `trainctl dev` and fail one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injection {
    /// (trigger, check): `None` for every trigger.
    pub fail: Vec<(Option<Trigger>, String)>,
    /// (node, trigger, check) of entries for one node only; see [`Injection::for_node`].
    pub for_nodes: Vec<(String, Option<Trigger>, String)>,
}

/// A bad `TRAINCTL_PREFLIGHT_FAIL`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{FAIL_ENV}: `{entry}` is not [NODE@][TRIGGER:]CHECK: {problem}. TRIGGER is one of start, periodic, job, command, any; CHECK one of {}", CHECK_NAMES.join(", "))]
pub struct InjectionError {
    /// The entry that was refused.
    pub entry: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Injection {
    /// Parses `[NODE@][TRIGGER:]CHECK` entries separated by commas; an empty string injects
    /// nothing.
    pub fn parse(value: &str) -> Result<Injection, InjectionError> {
        let mut fail = Vec::new();
        let mut for_nodes = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |problem: String| InjectionError {
                entry: entry.to_string(),
                problem,
            };
            let (node, rest) = match entry.split_once('@') {
                Some(("", _)) => return Err(err("an empty node name before `@`".to_string())),
                Some((node, rest)) => (Some(node), rest),
                None => (None, entry),
            };
            let (trigger, check) = match rest.split_once(':') {
                Some((t, c)) => (
                    match t {
                        "start" => Some(Trigger::Start),
                        "periodic" => Some(Trigger::Periodic),
                        "job" => Some(Trigger::Job),
                        "command" => Some(Trigger::Command),
                        "any" => None,
                        other => return Err(err(format!("unknown trigger `{other}`"))),
                    },
                    c,
                ),
                None => (None, rest),
            };
            if !CHECK_NAMES.contains(&check) {
                return Err(err(format!("unknown check `{check}`")));
            }
            match node {
                Some(node) => for_nodes.push((node.to_string(), trigger, check.to_string())),
                None => fail.push((trigger, check.to_string())),
            }
        }
        Ok(Injection { fail, for_nodes })
    }

    /// The entries that apply on `node`: those for every node and those naming it.
    pub fn for_node(&self, node: &str) -> Injection {
        let mut fail = self.fail.clone();
        fail.extend(
            self.for_nodes
                .iter()
                .filter(|(n, _, _)| n == node)
                .map(|(_, t, c)| (*t, c.clone())),
        );
        Injection {
            fail,
            for_nodes: Vec::new(),
        }
    }

    /// From [`FAIL_ENV`]; nothing when it is unset.
    pub fn from_env() -> Result<Injection, InjectionError> {
        match std::env::var(FAIL_ENV) {
            Ok(v) => Injection::parse(&v),
            Err(_) => Ok(Injection::default()),
        }
    }

    /// The checks made to fail in a run for `trigger`.
    fn checks_for(&self, trigger: Trigger) -> BTreeSet<&str> {
        self.fail
            .iter()
            .filter(|(t, _)| t.is_none_or(|t| t == trigger))
            .map(|(_, c)| c.as_str())
            .collect()
    }

    /// Makes every result of an injected check fail (its real outcome is kept in the reason).
    pub fn apply(&self, trigger: Trigger, results: &mut [CheckResult]) {
        let checks = self.checks_for(trigger);
        for r in results
            .iter_mut()
            .filter(|r| checks.contains(r.name.as_str()))
        {
            let was = match &r.outcome {
                Outcome::Passed => "passed".to_string(),
                other => format!("{}: {}", other.word(), other.reason().unwrap_or_default()),
            };
            r.outcome = Outcome::failed(format!(
                "injected by {FAIL_ENV} (for tests); the check itself {was}"
            ));
        }
    }
}

/// The libraries a run found, in words: a version, or "not installed" with the loader's reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// The CUDA version the driver supports, e.g. `13.0`, or `not installed`.
    pub cuda_driver: String,
    /// The NVIDIA driver version NVML reports, e.g. `580.65.06`, or `not installed`.
    pub nvidia_driver: String,
    /// NCCL's version, e.g. `2.28.3`, or `not installed`; with `--nccl-library`, followed by
    /// `from <path>`.
    pub nccl: String,
    /// The libibverbs file the loader opened, e.g. `libibverbs.so.1.14.44.0`, or `not installed`;
    /// with `--ibverbs-library`, followed by `from <path>`.
    pub libibverbs: String,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Why it ran.
    pub trigger: Trigger,
    /// Every check, in [`CHECK_NAMES`] order.
    pub checks: Vec<CheckResult>,
    /// The verdict over `checks`.
    pub health: Health,
    /// The whole run, in milliseconds.
    pub duration_ms: u64,
}

/// Runs the checks of `plan(facts, scope)` with NCCL and libibverbs from `libraries`, each stage
/// bounded and the run within `budget`, then applies `injection` and [`assess`]es the results.
/// Blocks the calling thread (at most about `budget`); the agent calls it from a blocking task.
pub fn run(
    facts: &HostFacts,
    scope: &Scope,
    trigger: Trigger,
    injection: &Injection,
    libraries: &libraries::LibraryPaths,
    budget: Duration,
) -> Report {
    let started = Instant::now();
    let deadline = started + budget;
    let planned = plan(facts, scope);
    let needs_probes = planned.iter().any(|p| matches!(p.work, Work::Probe(_)));
    let libs = if needs_probes {
        let paths = libraries.clone();
        bounded(
            LIBRARY_LOAD_TIMEOUT.min(deadline.saturating_duration_since(Instant::now())),
            move || probes::Libraries::load(&paths),
        )
        .map_err(|waited| {
            format!(
                "the CUDA driver or a library did not load within {} s (a hung driver call)",
                waited.as_secs()
            )
        })
    } else {
        Err("nothing to probe".to_string())
    };
    let mut results: Vec<Option<CheckResult>> = vec![None; planned.len()];
    for (i, p) in planned.iter().enumerate() {
        if let Work::Decided(outcome, figure) = &p.work {
            results[i] = Some(CheckResult {
                name: p.name.to_string(),
                subject: p.subject.clone(),
                outcome: outcome.clone(),
                duration_ms: 0,
                figure: figure.clone(),
            });
        }
    }
    for stage in 0..3 {
        let work: Vec<(usize, Probe)> = planned
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match &p.work {
                Work::Probe(probe) if probe.stage() == stage => Some((i, probe.clone())),
                _ => None,
            })
            .collect();
        if work.is_empty() {
            continue;
        }
        let stage_timeout = work[0].1.timeout();
        let stage_deadline = deadline.min(Instant::now() + stage_timeout);
        let (tx, rx) = mpsc::channel();
        for (i, probe) in work.iter().cloned() {
            let (thread_tx, libs) = (tx.clone(), libs.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("preflight-{i}"))
                .spawn(move || {
                    let t = Instant::now();
                    let (outcome, figure) = match &libs {
                        Ok(libs) => probes::run_probe(&probe, libs),
                        Err(why) => (Outcome::failed(why.clone()), None),
                    };
                    let _ = thread_tx.send((i, outcome, figure, t.elapsed()));
                });
            if let Err(e) = spawned {
                let _ = tx.send((
                    i,
                    Outcome::failed(format!("could not start a thread for the probe: {e}")),
                    None,
                    Duration::ZERO,
                ));
            }
        }
        drop(tx);
        let mut pending: BTreeSet<usize> = work.iter().map(|(i, _)| *i).collect();
        while !pending.is_empty() {
            let left = stage_deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, outcome, figure, took)) => {
                    pending.remove(&i);
                    results[i] = Some(CheckResult {
                        name: planned[i].name.to_string(),
                        subject: planned[i].subject.clone(),
                        outcome,
                        duration_ms: took.as_millis() as u64,
                        figure,
                    });
                }
                Err(_) => break,
            }
        }
        let waited = stage_deadline.saturating_duration_since(started);
        for i in pending {
            let reason = if stage_deadline >= deadline && Instant::now() >= deadline {
                format!(
                    "the pre-flight's budget of {} s ran out before this check finished (a hung driver or library call)",
                    budget.as_secs()
                )
            } else {
                format!(
                    "did not finish within {} s (a hung driver or library call)",
                    stage_timeout.as_secs()
                )
            };
            results[i] = Some(CheckResult {
                name: planned[i].name.to_string(),
                subject: planned[i].subject.clone(),
                outcome: Outcome::failed(reason),
                duration_ms: waited.as_millis() as u64,
                figure: None,
            });
        }
    }
    let mut checks: Vec<CheckResult> = results.into_iter().flatten().collect();
    injection.apply(trigger, &mut checks);
    // Injected checks that the scope did not plan still show, failed.
    for name in injection.checks_for(trigger) {
        if !checks.iter().any(|c| c.name == name) && planned_for(scope, name) {
            checks.push(CheckResult {
                name: name.to_string(),
                subject: "host".to_string(),
                outcome: Outcome::failed(format!("injected by {FAIL_ENV} (for tests)")),
                duration_ms: 0,
                figure: None,
            });
        }
    }
    checks.sort_by_key(|c| CHECK_NAMES.iter().position(|n| *n == c.name));
    let health = assess(&checks);
    Report {
        trigger,
        checks,
        health,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// What `trainctl preflight` prints: the host's hardware as discovery found it, the libraries,
/// and a whole-host run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host's name.
    pub hostname: String,
    /// The GPUs discovery found.
    pub gpus: Vec<GpuInfo>,
    /// The RDMA devices discovery found.
    pub rdma_devices: Vec<crate::discovery::RdmaDevice>,
    /// The libraries, "not installed" where absent.
    pub versions: Versions,
    /// The RDMA ports the run required ACTIVE (`mlx5_0:1`), in order.
    #[serde(default)]
    pub claimed_ports: Vec<String>,
    /// Notes that are not failures: ports that are not ACTIVE and not required, and
    /// `--rdma-ignore` entries that match no port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The run.
    #[serde(flatten)]
    pub report: Report,
}

/// Discovers this host, reads the library versions and runs every check (`trainctl preflight`),
/// within about [`RUN_BUDGET`] plus [`LIBRARY_LOAD_TIMEOUT`] for discovery and the versions.
/// The claimed ports are those of `port_options` ([`ports::claim`] now: without `--rdma-ports`,
/// the ports ACTIVE now, so a port that is not ACTIVE is reported, not failed); an entry of
/// `--rdma-ports` that names no port of this host is an error. NCCL and libibverbs come from
/// `libraries` (check given paths first with [`libraries::LibraryPaths::open`]: here a file that
/// does not open is reported as `unusable`, not refused).
pub fn host_report(
    injection: &Injection,
    port_options: &ports::PortOptions,
    libraries: &libraries::LibraryPaths,
) -> Result<HostReport, ports::PortOptionError> {
    let unknown = |what: &str| {
        format!(
            "unknown ({what} did not answer within {} s)",
            LIBRARY_LOAD_TIMEOUT.as_secs()
        )
    };
    let facts =
        bounded(LIBRARY_LOAD_TIMEOUT, || crate::discovery::discover(None)).unwrap_or_else(|_| {
            tracing::warn!("discovery did not finish in time: reporting no GPU and no RDMA device");
            HostFacts {
                hostname: String::new(),
                cpus: 0,
                memory_mib: 0,
                gpus: Vec::new(),
                rdma_devices: Vec::new(),
                advertised_interface: String::new(),
            }
        });
    let paths = libraries.clone();
    let versions =
        bounded(LIBRARY_LOAD_TIMEOUT, move || probes::versions(&paths)).unwrap_or_else(|_| {
            Versions {
                cuda_driver: unknown("the CUDA driver"),
                nvidia_driver: unknown("NVML"),
                nccl: unknown("NCCL"),
                libibverbs: unknown("libibverbs"),
            }
        });
    let claim = ports::claim(&facts.rdma_devices, port_options, ports::ClaimedAt::Now)?;
    let mut warnings = ports::unclaimed_down(&ports::judge(&claim, &facts.rdma_devices));
    warnings.extend(claim.warnings());
    let claimed_ports = claim
        .claimed
        .iter()
        .map(|(d, p)| format!("{d}:{p}"))
        .collect();
    let report = run(
        &facts,
        &Scope::Host {
            busy_gpus: BTreeSet::new(),
            ports: claim,
        },
        Trigger::Command,
        injection,
        libraries,
        RUN_BUDGET,
    );
    Ok(HostReport {
        hostname: facts.hostname,
        gpus: facts.gpus,
        rdma_devices: facts.rdma_devices,
        versions,
        claimed_ports,
        warnings,
        report,
    })
}

/// Whether a run of `scope` includes `check` at all (a job's run has only the GPU checks).
fn planned_for(scope: &Scope, check: &str) -> bool {
    match scope {
        Scope::Host { .. } => true,
        Scope::Gpus(_) => check == CHECK_GPU_HEALTH || check == CHECK_GPU_COPY,
    }
}

/// Runs `f` on its own thread and waits at most `timeout` for it; `Err(timeout)` when it did not
/// finish (the thread is left to finish or hang on its own).
pub fn bounded<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Duration> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("preflight".to_string())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return Err(Duration::ZERO);
    }
    rx.recv_timeout(timeout).map_err(|_| timeout)
}

/// The GPUs a job's ranks on this host see: each entry of their `CUDA_VISIBLE_DEVICES` (a UUID,
/// or an index into `facts.gpus` as older coordinators send), as UUIDs of `facts.gpus`. Entries
/// that name no known GPU are left out.
pub fn job_gpus<'a>(
    facts: &HostFacts,
    visible_devices: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in visible_devices {
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let found = facts
                .gpus
                .iter()
                .find(|g| g.uuid == entry || entry.parse::<u32>().is_ok_and(|i| i == g.index));
            if let Some(g) = found {
                if !out.contains(&g.uuid) {
                    out.push(g.uuid.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
