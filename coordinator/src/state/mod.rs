//! The replicated state and the deterministic function that changes it.
//!
//! Every change to the cluster's intent goes through [`State::apply`] with a [`Command`] that Raft has
//! committed. `apply` never reads the clock, makes an id or rolls a die: the leader puts timestamps in
//! the command, and ids come from counters inside the state. So every replica that applies the same log
//! reaches the same state, and tests can drive it with plain values.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use trainctl_jobs::JobSpec;

use crate::scheduler::{ClusterSnapshot, HostFabrics, NodeCapacity, NodeSize, Placement};

mod access;
mod attempts;
mod idempotency;
mod index;
pub mod retention;

pub use access::{
    access_name_problem, secret_digest, split_token, Actor, AgentIdentity, AuditEntry, Role,
    TokenRecord, TokenRefusal, ACCESS_NAME_BYTES_MAX, AUDIT_ENTRIES_MAX, IDENTITIES_MAX,
    TOKENS_MAX,
};

pub use attempts::{
    attempt_token, checkpoint_path_problem, AttemptEnd, AttemptRecord, CheckpointRecord,
    RetiredShare, ATTEMPT_HISTORY_MAX, CHECKPOINT_METRICS_BYTES_MAX, CHECKPOINT_RECORDS_MAX,
};

pub use idempotency::{
    idempotency_key_problem, request_digest, IdempotencyKeys, KeyRecord, KeyUse,
    IDEMPOTENCY_KEYS_MAX, IDEMPOTENCY_KEY_CHARS_MAX, IDEMPOTENCY_KEY_TTL_MS,
};

/// A job's id: a number the state machine hands out in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Strict: one spelling per job, so `+1`, ` 1`, `1\n` and `01` are not job 1.
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let canonical = s == "0" || !s.starts_with('0');
        match s.parse::<u64>() {
            Ok(id) if digits && canonical => Ok(JobId(id)),
            _ => {
                let shown: String = s.escape_debug().take(40).collect();
                Err(format!(
                    "`{shown}` is not a job id (job ids are decimal numbers such as `3`: ASCII digits only, \
                     no sign, spaces or leading zeros)"
                ))
            }
        }
    }
}

/// A node's id: the name its agent registered with (unique in the cluster).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One GPU of a node, as its agent discovered (or was told to declare) it.
///
/// Every field after `uuid` came with issue 9's discovery; an agent that predates it (and every
/// older log entry and snapshot) leaves them at their defaults: empty, `None`, `false`, 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The agent's own ordinal, for display only: GPUs are identified by `uuid` everywhere.
    pub index: u32,
    pub name: String,
    pub memory_mib: u64,
    /// `GPU-<uuid>` as nvidia-smi writes it, or `declared-gpu-N` for a declared GPU.
    pub uuid: String,
    /// The PCI bus id in NVML's form, lowercased: `0000:1b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    /// The NUMA node of the GPU's PCI device; `None` when unknown or the host has one node.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// How near each RDMA device of the node is, nearest first.
    #[serde(default)]
    pub nic_affinity: Vec<NicAffinity>,
    /// MIG mode: "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub mig_mode: String,
    /// ECC mode: "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub ecc_mode: String,
    /// PCI bus ids of the GPUs this one reaches over NVLink (same form as `pci_bus_id`).
    #[serde(default)]
    pub nvlink_peers: Vec<String>,
    /// NVML reports retired pages waiting for a driver reload (the GPU should be reset).
    #[serde(default)]
    pub retired_pages_pending: bool,
    /// Uncorrectable ECC errors since the driver loaded (volatile count).
    #[serde(default)]
    pub uncorrectable_ecc_errors: u64,
}

/// How near an RDMA device is to a GPU, in nvidia-smi topo's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAffinity {
    /// The RDMA device's name, e.g. `mlx5_0`.
    pub rdma_device: String,
    /// The PCIe path between the two.
    pub link: PcieLink,
}

/// The PCIe path between two devices, nearest first (the order `nvidia-smi topo -m` uses, and the
/// order of the variants, so `Ord` sorts nearest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PcieLink {
    /// Behind the same PCIe switch (one bridge between them).
    #[serde(rename = "PIX")]
    Pix,
    /// Behind several PCIe switches, without crossing the host bridge.
    #[serde(rename = "PXB")]
    Pxb,
    /// Through the same PCIe host bridge (the CPU's root complex).
    #[serde(rename = "PHB")]
    Phb,
    /// Through different host bridges of the same NUMA node.
    #[serde(rename = "NODE")]
    Node,
    /// Across NUMA nodes (the inter-socket link).
    #[serde(rename = "SYS")]
    Sys,
}

impl PcieLink {
    /// nvidia-smi topo's word for the link.
    pub fn as_str(self) -> &'static str {
        match self {
            PcieLink::Pix => "PIX",
            PcieLink::Pxb => "PXB",
            PcieLink::Phb => "PHB",
            PcieLink::Node => "NODE",
            PcieLink::Sys => "SYS",
        }
    }

    /// The link named by nvidia-smi topo's word (`PIX`, `PXB`, `PHB`, `NODE`, `SYS`).
    pub fn from_word(word: &str) -> Option<PcieLink> {
        Some(match word {
            "PIX" => PcieLink::Pix,
            "PXB" => PcieLink::Pxb,
            "PHB" => PcieLink::Phb,
            "NODE" => PcieLink::Node,
            "SYS" => PcieLink::Sys,
            _ => return None,
        })
    }
}

impl fmt::Display for PcieLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of an RDMA port's GID table that is set (non-zero).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaGid {
    /// The GID index (what `NCCL_IB_GID_INDEX` names).
    pub index: u32,
    /// The GID as sysfs writes it, e.g. `fe80:0000:0000:0000:0ac4:7aff:feb3:1234`.
    pub gid: String,
    /// The type as sysfs `gid_attrs/types/N` writes it: "IB/RoCE v1" or "RoCE v2"; empty when the
    /// kernel does not say (InfiniBand ports have no types directory on older kernels).
    pub kind: String,
}

/// One port of an RDMA device of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaPortInfo {
    pub port: u32,
    pub state: String,
    pub link_layer: String,
    pub rate: String,
    pub gid_count: u32,
    /// The Ethernet interface of a RoCE port, e.g. `eth2`; empty for InfiniBand or when unknown.
    #[serde(default)]
    pub netdev: String,
    /// The set GID entries, by index.
    #[serde(default)]
    pub gids: Vec<RdmaGid>,
}

/// One RDMA device (an InfiniBand or RoCE HCA) of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaDeviceInfo {
    pub name: String,
    pub ports: Vec<RdmaPortInfo>,
    /// The PCI bus id, lowercased: `0000:3b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    /// The NUMA node of the device; `None` when unknown.
    #[serde(default)]
    pub numa_node: Option<u32>,
}

/// What a node has, as reported by its agent at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    pub hostname: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub gpus: Vec<GpuInfo>,
    pub rdma_devices: Vec<RdmaDeviceInfo>,
    /// How the agent contains ranks there, e.g. `cgroup2 (cpu, memory)` or `process groups (...)`;
    /// empty from an agent that predates the report.
    #[serde(default)]
    pub containment: String,
    /// The network interface that holds the agent's advertised address, e.g. `eth0`; empty when
    /// unknown (an agent that predates the report, or an address no interface holds).
    #[serde(default)]
    pub advertised_interface: String,
}

/// Whether the coordinator hears from a node's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Up,
    Down,
}

/// What jobs hold on a node right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub cpus: u32,
    pub memory_mib: u64,
    pub gpus: BTreeSet<u32>,
    pub ports: BTreeSet<u16>,
}

/// A host with an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// The IP address other hosts reach it at.
    pub address: String,
    pub instance_id: String,
    pub resources: NodeResources,
    /// Ports the coordinator may lease to jobs on this node (MASTER_PORT), inclusive.
    pub port_range: (u16, u16),
    pub status: NodeStatus,
    pub status_reason: Option<String>,
    pub registered_at_ms: u64,
    pub usage: NodeUsage,
    /// Drained by an operator: its jobs were moved off and nothing new is placed here until undrained.
    #[serde(default)]
    pub drained: bool,
    /// The verdict of its agent's pre-flight checks: an unhealthy node gets no new placement.
    #[serde(default)]
    pub health: NodeHealth,
}

/// What a node's agent last reported of its pre-flight checks (`agent/src/preflight`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Why the host failed its pre-flight (the failed checks and their reasons); `None` when no
    /// check failed, or its agent reports none.
    #[serde(default)]
    pub unhealthy: Option<String>,
    /// When the coordinator recorded this verdict (0: never changed).
    #[serde(default)]
    pub since_ms: u64,
}

impl Node {
    /// The lowest port of this node's range that no job holds.
    pub fn free_port(&self) -> Option<u16> {
        (self.port_range.0..=self.port_range.1).find(|p| !self.usage.ports.contains(p))
    }

    /// How big this node is when empty.
    pub fn size(&self) -> NodeSize {
        NodeSize {
            gpus: self.resources.gpus.len() as u32,
            cpus: self.resources.cpus,
            memory_mib: self.resources.memory_mib,
        }
    }

    /// This node as the scheduler sees it.
    pub fn capacity(&self) -> NodeCapacity {
        NodeCapacity {
            node: self.id.clone(),
            up: self.status == NodeStatus::Up && !self.drained,
            total_gpus: self.resources.gpus.len() as u32,
            total_cpus: self.resources.cpus,
            total_memory_mib: self.resources.memory_mib,
            free_gpus: self
                .resources
                .gpus
                .iter()
                .map(|g| g.index)
                .filter(|i| !self.usage.gpus.contains(i))
                .collect(),
            free_cpus: self.resources.cpus.saturating_sub(self.usage.cpus),
            free_memory_mib: self
                .resources
                .memory_mib
                .saturating_sub(self.usage.memory_mib),
            free_port: self.free_port(),
            fabrics: HostFabrics::of(&self.resources.rdma_devices),
            unhealthy: self.health.unhealthy.clone(),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Queued: waiting for every rank to fit at once.
    Pending,
    /// Placed: agents are launching the ranks.
    Starting,
    /// Every rank has started.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Starting,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Whether the job has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The lowercase name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Where a rank (one process of the gang) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankPhase {
    /// Placed, not yet reported started.
    Pending,
    Running,
    /// Ended; `exit_code` says how.
    Exited,
    /// Its process could not be started; `message` says why.
    FailedToStart,
    /// Its host or agent went away; nothing more will be heard of it.
    Lost,
}

impl RankPhase {
    /// Whether a rank that reached this phase (with this exit code) failed the attempt.
    pub fn is_failure(self, exit_code: Option<i32>) -> bool {
        match self {
            RankPhase::FailedToStart | RankPhase::Lost => true,
            RankPhase::Exited => exit_code != Some(0),
            RankPhase::Pending | RankPhase::Running => false,
        }
    }

    /// Whether no more reports can change it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RankPhase::Exited | RankPhase::FailedToStart | RankPhase::Lost
        )
    }
}

/// One rank of a job's current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankStatus {
    pub rank: u32,
    pub local_rank: u32,
    pub node: NodeId,
    pub phase: RankPhase,
    /// Exit code (negative: killed by that signal), once exited.
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub pid: Option<u32>,
}

/// What one node gives to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAllocation {
    pub node: NodeId,
    /// GROUP_RANK: the node's index in the gang.
    pub group_rank: u32,
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Set once the node's ranks have all ended, returning its resources.
    pub released: bool,
    /// The node was lost while its ranks ran: they count as lost, but its resources stay held until
    /// its agent says it runs nothing of the job (or a new agent instance, which reaps them, replaces
    /// it). A cut-off agent's ranks may still run, and their GPUs and port are not free.
    #[serde(default)]
    pub awaiting_agent: bool,
}

/// Where every rank of a job runs, and how the ranks find each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// IP address of the node of group rank 0.
    pub master_addr: String,
    /// Port leased on that node for this job.
    pub master_port: u16,
    pub nodes: Vec<NodeAllocation>,
}

/// A submitted job and everything the cluster intends and knows about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job ended as it did (failed, cancelled), in words.
    pub reason: Option<String>,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// The launch of the gang this state describes; 0 for the first (TORCHELASTIC_RESTART_COUNT).
    pub attempt: u32,
    pub allocation: Option<Allocation>,
    pub ranks: Vec<RankStatus>,
    /// Restarts that counted against `[failure] max_restarts` (failures and hangs; not host losses or
    /// resizes).
    #[serde(default)]
    pub restarts: u32,
    /// Every attempt so far, oldest first (at most [`ATTEMPT_HISTORY_MAX`]).
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// Committed checkpoints, oldest first (at most `[checkpoint] keep`, or [`CHECKPOINT_RECORDS_MAX`]).
    #[serde(default)]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Another job's checkpoint this job starts from (`submit --resume-from`), until it commits its own.
    #[serde(default)]
    pub resume_from: Option<CheckpointRecord>,
    /// Shares of earlier attempts whose processes are not yet confirmed gone; held like live shares.
    #[serde(default)]
    pub retired: Vec<RetiredShare>,
    /// Chosen by the leader at submission; each attempt's job token derives from it. Never shown.
    #[serde(default)]
    pub secret: String,
    /// Bumped for every "checkpoint now" request; agents signal the ranks once per value.
    #[serde(default)]
    pub checkpoint_signals: u32,
    /// Who submitted it, and the namespace it belongs to (`None` for jobs from before tokens).
    #[serde(default)]
    pub owner: Option<Actor>,
    /// How many bytes of each rank's output are committed, by attempt and rank: the bytes
    /// `[0, n)` of that log reached the Raft log ([`Command::AppendLogs`]). A coordinator whose
    /// own copy is shorter (it caught up from a snapshot) fetches the rest from the others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub log_bytes: BTreeMap<u32, BTreeMap<u32, u64>>,
}

/// A rank's state as an agent observed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankObservation {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub phase: RankPhase,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub pid: Option<u32>,
}

/// A byte range of one rank's output, as an agent shipped it: replicated through Raft
/// ([`Command::AppendLogs`]) so every coordinator stores the same rank logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
    /// Where `data` starts in the rank's log.
    pub offset: u64,
    /// The bytes, base64 in the log entry (not a JSON array of numbers).
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// Bytes as one base64 string (standard alphabet, padded).
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A change to the cluster's state, as written to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An agent (re)started on a host and announced what the host has.
    RegisterNode {
        node: NodeId,
        address: String,
        instance_id: String,
        resources: NodeResources,
        port_range: (u16, u16),
        at_ms: u64,
    },
    /// The coordinator stopped hearing from a node's agent.
    NodeLost {
        node: NodeId,
        reason: String,
        at_ms: u64,
    },
    /// A user submitted a job; it gets the next id.
    SubmitJob {
        spec: JobSpec,
        at_ms: u64,
        /// Random, from the leader: the seed of the job's attempt tokens.
        #[serde(default)]
        secret: String,
        /// Start from this job's newest checkpoint (`submit --resume-from`).
        #[serde(default)]
        resume_from_job: Option<JobId>,
    },
    /// The scheduler placed every rank of a pending job.
    PlaceJob {
        job: JobId,
        placement: Placement,
        at_ms: u64,
    },
    /// An agent reported what its ranks are doing.
    ReportRanks {
        node: NodeId,
        instance_id: String,
        observations: Vec<RankObservation>,
        /// Ended jobs of which the agent runs no process (any rank still pending there never started).
        idle_jobs: Vec<JobId>,
        at_ms: u64,
        /// Earlier attempts of which the agent runs no process any more: their retired shares are free.
        #[serde(default)]
        gone_attempts: Vec<(JobId, u32)>,
    },
    /// A user cancelled a job.
    CancelJob { job: JobId, at_ms: u64 },
    /// The first leader names the cluster's state (once; later attempts are rejected).
    InitCluster { cluster_id: String },
    /// Commands that arrived together, written as one log entry (group commit); applied in order.
    Batch(Vec<Command>),
    /// The scheduler found a queued job can no longer ever fit (the cluster shrank under it).
    FailPendingJob {
        job: JobId,
        reason: String,
        at_ms: u64,
    },
    /// The leader ends `attempt` of a running job: it hung, it grows, or its host is drained.
    RestartJob {
        job: JobId,
        attempt: u32,
        reason: String,
        end: AttemptEnd,
        at_ms: u64,
    },
    /// A rank of `attempt` committed a checkpoint it finished writing.
    CommitCheckpoint {
        job: JobId,
        attempt: u32,
        path: String,
        step: u64,
        /// Compact JSON object, as the rank sent it.
        metrics: Option<String>,
        at_ms: u64,
    },
    /// Ask every rank of a running job to checkpoint now (its `[checkpoint] signal`).
    RequestCheckpoint { job: JobId },
    /// An operator drains (true) or undrains (false) a node.
    SetNodeDrained { node: NodeId, drained: bool },
    /// An operator removes a node for good; its held shares are given up.
    RemoveNode { node: NodeId, at_ms: u64 },
    /// A node's agent reported the verdict of its pre-flight checks (`unhealthy`: why it failed,
    /// `None`: it passed). Written only when the verdict changes. An unhealthy node gets no new
    /// placement, and a job whose ranks there have not started is placed again elsewhere without
    /// using a restart ([`AttemptEnd::Unhealthy`]).
    SetNodeHealth {
        node: NodeId,
        /// The agent process that ran the checks; a report of an earlier one is rejected.
        instance_id: String,
        unhealthy: Option<String>,
        at_ms: u64,
    },
    /// A person (through the API) asked for `command`: applied, and recorded in the audit trail.
    Audited {
        actor: Actor,
        at_ms: u64,
        command: Box<Command>,
    },
    /// A new API or join token (only its digest is stored).
    CreateToken { record: TokenRecord },
    /// A token stops working; agents admitted with it lose their identity and are drained.
    RevokeToken { id: String, at_ms: u64 },
    /// An agent traded a join token for a certificate bound to `node`.
    AdmitAgent {
        node: NodeId,
        fingerprint: String,
        token_id: String,
        at_ms: u64,
    },
    /// A submission with an `Idempotency-Key` (`submit` is a `SubmitJob`): applied once per key and
    /// submitter (the actor of the `Audited` around it); a repeat returns the first job. See
    /// `state/idempotency.rs`.
    Idempotent {
        key: String,
        /// `request_digest` of the submission, computed by the leader.
        digest: String,
        submit: Box<Command>,
    },
    /// Rank output an agent shipped. It changes nothing in the state: the Raft state machine
    /// appends the chunks to the coordinator's rank logs (`raft/state_machine.rs`) when it applies
    /// the entry, so every member stores the same logs.
    AppendLogs { chunks: Vec<LogRecord> },
    /// A change of the coordinators' membership (Raft keeps the membership itself), written
    /// inside [`Command::Audited`] so the audit trail shows who changed it and how it ended:
    /// `refused` is why it failed. Changes nothing else.
    MembershipChanged {
        change: String,
        #[serde(default)]
        refused: Option<String>,
    },
    /// The leader's retention pass forgets finished jobs (`state/retention.rs`): each named job
    /// that has ended and holds nothing on any node is removed; any other is kept.
    ForgetJobs { jobs: Vec<JobId> },
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Done,
    JobSubmitted {
        job: JobId,
    },
    /// The command was valid when proposed but not against the state it met (a stale plan, a job that
    /// already ended, ...). Nothing changed.
    Rejected {
        reason: String,
    },
    /// The outcome of each command of a batch, in order.
    Batch(Vec<CommandOutcome>),
    /// A checkpoint was recorded; these older ones fell out of `keep` and should be deleted.
    CheckpointCommitted {
        pruned: Vec<String>,
    },
    /// A submission repeated with its idempotency key: nothing changed; `job` is the first one's.
    JobReplayed {
        job: JobId,
    },
    /// The idempotency key was recorded for a different request (`job`): nothing changed.
    IdempotencyKeyReused {
        job: JobId,
    },
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<NodeId, Node>,
    /// Shared with snapshots being written: a snapshot clones the map (pointers), not the jobs,
    /// and a job changed meanwhile is copied on write (`Arc::make_mut`).
    pub jobs: BTreeMap<JobId, Arc<Job>>,
    /// Pending jobs in submission order: the scheduler places them first come, first served.
    pub queue: VecDeque<JobId>,
    pub last_job_id: u64,
    /// Chosen once, when the cluster's state is created; agents use it to notice a replaced state.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// API and join tokens by id (digests only).
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Admitted agent identities by certificate fingerprint.
    #[serde(default)]
    pub identities: BTreeMap<String, AgentIdentity>,
    /// The newest changes people made, oldest first (at most [`AUDIT_ENTRIES_MAX`]).
    #[serde(default)]
    pub audit: VecDeque<AuditEntry>,
    /// Idempotency keys of recent submissions (at most [`IDEMPOTENCY_KEYS_MAX`], for a day each).
    #[serde(default)]
    pub idempotency: IdempotencyKeys,
    /// Live jobs and the jobs holding something on each node: derived, never stored.
    #[serde(skip)]
    pub(crate) index: index::JobIndex,
}

pub(crate) fn rejected(reason: impl Into<String>) -> CommandOutcome {
    CommandOutcome::Rejected {
        reason: reason.into(),
    }
}

impl State {
    /// Records how far each rank's log is committed by `chunks` (see [`Job::log_bytes`]): a chunk
    /// that starts within the committed bytes extends them; one past their end (a gap) does not.
    pub fn extend_committed_logs(&mut self, chunks: &[LogRecord]) {
        for chunk in chunks {
            let Some(job) = self.job_mut(chunk.job) else {
                continue;
            };
            let committed = job
                .log_bytes
                .entry(chunk.attempt)
                .or_default()
                .entry(chunk.rank)
                .or_default();
            if chunk.offset <= *committed {
                *committed = (*committed).max(chunk.offset + chunk.data.len() as u64);
            }
        }
    }

    /// Applies one committed command. Deterministic: same state and command, same result.
    pub fn apply(&mut self, command: Command) -> CommandOutcome {
        if !self.index.is_built() {
            self.rebuild_index();
        }
        let outcome = self.apply_command(command);
        self.refresh_index();
        outcome
    }

    fn apply_command(&mut self, command: Command) -> CommandOutcome {
        match command {
            Command::RegisterNode {
                node,
                address,
                instance_id,
                resources,
                port_range,
                at_ms,
            } => self.register_node(node, address, instance_id, resources, port_range, at_ms),
            Command::NodeLost {
                node,
                reason,
                at_ms,
            } => self.node_lost(&node, reason, at_ms),
            Command::SubmitJob {
                spec,
                at_ms,
                secret,
                resume_from_job,
            } => self.submit_job(spec, at_ms, secret, resume_from_job),
            Command::PlaceJob {
                job,
                placement,
                at_ms,
            } => self.place_job(job, placement, at_ms),
            Command::ReportRanks {
                node,
                instance_id,
                observations,
                idle_jobs,
                at_ms,
                gone_attempts,
            } => self.report_ranks(
                &node,
                &instance_id,
                observations,
                idle_jobs,
                gone_attempts,
                at_ms,
            ),
            Command::CancelJob { job, at_ms } => self.cancel_job(job, at_ms),
            Command::Batch(commands) => {
                CommandOutcome::Batch(commands.into_iter().map(|c| self.apply(c)).collect())
            }
            Command::InitCluster { cluster_id } => match &self.cluster_id {
                Some(existing) => rejected(format!("the cluster is already named {existing}")),
                None => {
                    self.cluster_id = Some(cluster_id);
                    CommandOutcome::Done
                }
            },
            Command::FailPendingJob { job, reason, at_ms } => {
                self.fail_pending_job(job, reason, at_ms)
            }
            Command::RestartJob {
                job,
                attempt,
                reason,
                end,
                at_ms,
            } => self.restart_job(job, attempt, reason, end, at_ms),
            Command::CommitCheckpoint {
                job,
                attempt,
                path,
                step,
                metrics,
                at_ms,
            } => self.commit_checkpoint(job, attempt, path, step, metrics, at_ms),
            Command::RequestCheckpoint { job } => self.request_checkpoint(job),
            Command::SetNodeDrained { node, drained } => self.set_node_drained(&node, drained),
            Command::RemoveNode { node, at_ms } => self.remove_node(&node, at_ms),
            Command::SetNodeHealth {
                node,
                instance_id,
                unhealthy,
                at_ms,
            } => self.set_node_health(&node, &instance_id, unhealthy, at_ms),
            Command::Audited {
                actor,
                at_ms,
                command,
            } => self.apply_audited(actor, at_ms, *command),
            Command::CreateToken { record } => self.create_token(record),
            Command::RevokeToken { id, at_ms } => self.revoke_token(&id, at_ms),
            Command::AdmitAgent {
                node,
                fingerprint,
                token_id,
                at_ms,
            } => self.admit_agent(node, fingerprint, token_id, at_ms),
            Command::Idempotent {
                key,
                digest,
                submit,
            } => self.apply_idempotent(&Actor::default(), key, digest, *submit),
            // The bytes go to files outside the state (the Raft state machine writes them); the
            // state keeps how far each log is committed.
            Command::AppendLogs { chunks } => {
                self.extend_committed_logs(&chunks);
                CommandOutcome::Done
            }
            Command::MembershipChanged { refused, .. } => match refused {
                Some(reason) => CommandOutcome::Rejected { reason },
                None => CommandOutcome::Done,
            },
            Command::ForgetJobs { jobs } => self.forget_jobs(&jobs),
        }
    }

    fn register_node(
        &mut self,
        node: NodeId,
        address: String,
        instance_id: String,
        resources: NodeResources,
        port_range: (u16, u16),
        at_ms: u64,
    ) -> CommandOutcome {
        if port_range.0 > port_range.1 {
            return rejected(format!(
                "port range {}-{} is empty",
                port_range.0, port_range.1
            ));
        }
        let previous_instance = self.nodes.get(&node).map(|n| n.instance_id.clone());
        if let Some(previous) = previous_instance {
            if previous != instance_id {
                // A new agent process: the ranks of the old one died with it (they run with a
                // parent-death signal), so whatever they were doing is lost.
                // The new agent reaped the old one's process groups before registering.
                self.lose_ranks_on(
                    &node,
                    &format!("the agent on {node} restarted"),
                    at_ms,
                    true,
                );
                self.release_retired_on(&node, |_| true);
            }
        }
        let drained = self.nodes.get(&node).is_some_and(|n| n.drained);
        // Kept until the new agent reports its own verdict (in the same log entry, when it has one).
        let health = self
            .nodes
            .get(&node)
            .map(|n| n.health.clone())
            .unwrap_or_default();
        let usage = self
            .nodes
            .get(&node)
            .map(|n| n.usage.clone())
            .unwrap_or_default();
        let registered_at_ms = self.nodes.get(&node).map_or(at_ms, |n| n.registered_at_ms);
        self.nodes.insert(
            node.clone(),
            Node {
                id: node,
                address,
                instance_id,
                resources,
                port_range,
                status: NodeStatus::Up,
                status_reason: None,
                registered_at_ms,
                usage,
                drained,
                health,
            },
        );
        CommandOutcome::Done
    }

    fn set_node_health(
        &mut self,
        node: &NodeId,
        instance_id: &str,
        unhealthy: Option<String>,
        at_ms: u64,
    ) -> CommandOutcome {
        let Some(n) = self.nodes.get_mut(node) else {
            return rejected(format!("no node named {node}"));
        };
        if n.instance_id != instance_id {
            return rejected(format!(
                "a health report from an earlier agent of node {node}"
            ));
        }
        if n.health.unhealthy == unhealthy {
            return CommandOutcome::Done;
        }
        n.health = NodeHealth {
            unhealthy: unhealthy.clone(),
            since_ms: at_ms,
        };
        let Some(reason) = unhealthy else {
            return CommandOutcome::Done;
        };
        // Jobs whose ranks on this node have not started (the agent checks a job's GPUs before
        // starting its ranks): placed again elsewhere, free. Ranks already running stay; if the
        // host is broken, they fail and restart as any failure does.
        let waiting: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .filter(|j| {
                j.ranks
                    .iter()
                    .any(|r| &r.node == node && r.phase == RankPhase::Pending)
            })
            .map(|j| j.id)
            .collect();
        for job in waiting {
            self.end_attempt(
                job,
                format!("host {node} failed its pre-flight checks: {reason}"),
                AttemptEnd::Unhealthy,
                at_ms,
            );
        }
        CommandOutcome::Done
    }

    fn node_lost(&mut self, node: &NodeId, reason: String, at_ms: u64) -> CommandOutcome {
        let Some(n) = self.nodes.get_mut(node) else {
            return rejected(format!("no node named {node}"));
        };
        if n.status == NodeStatus::Down {
            return rejected(format!("node {node} is already down"));
        }
        n.status = NodeStatus::Down;
        n.status_reason = Some(reason.clone());
        // Its ranks may still run behind a partition: hold its resources until its agent answers.
        self.lose_ranks_on(
            node,
            &format!("node {node} was lost: {reason}"),
            at_ms,
            false,
        );
        // The shares `lose_ranks_on` just retired are in the index once it is refreshed.
        self.index.refresh(&self.jobs);
        let retired_here: Vec<JobId> = self
            .jobs_holding_on(node)
            .filter(|j| j.retired.iter().any(|r| &r.node == node))
            .map(|j| j.id)
            .collect();
        for id in retired_here {
            if let Some(job) = self.job_mut(id) {
                for share in job.retired.iter_mut().filter(|r| &r.node == node) {
                    share.awaiting_agent = true;
                }
            }
        }
        CommandOutcome::Done
    }

    /// Marks every live rank on `node` lost and ends their jobs' attempts (the gang is placed again,
    /// without counting against the restart budget). The node's shares are returned when
    /// `processes_gone` (nothing of them can still run), else held until the agent confirms.
    fn lose_ranks_on(&mut self, node: &NodeId, why: &str, at_ms: u64, processes_gone: bool) {
        let affected: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| {
                j.allocation
                    .as_ref()
                    .is_some_and(|a| a.nodes.iter().any(|na| &na.node == node && !na.released))
            })
            .map(|j| j.id)
            .collect();
        for job_id in affected {
            let job = self.job_mut(job_id).expect("listed above");
            let mut lost_any = false;
            for rank in job.ranks.iter_mut().filter(|r| &r.node == node) {
                if !rank.phase.is_terminal() {
                    rank.phase = RankPhase::Lost;
                    rank.message = Some(why.to_string());
                    lost_any = true;
                }
            }
            // Every rank there had already ended: nothing can still run, so nothing to hold.
            if processes_gone || !lost_any {
                self.release_node_allocation(job_id, node);
            } else if let Some(share) = job.allocation.as_mut().and_then(|a| {
                a.nodes
                    .iter_mut()
                    .find(|na| &na.node == node && !na.released)
            }) {
                share.awaiting_agent = true;
            }
            let live = !self.jobs[&job_id].state.is_terminal();
            if lost_any && live {
                let rank = self.jobs[&job_id]
                    .ranks
                    .iter()
                    .find(|r| &r.node == node)
                    .map(|r| r.rank)
                    .unwrap_or(0);
                self.end_attempt(
                    job_id,
                    format!("rank {rank} on {node} was lost: {why}"),
                    AttemptEnd::HostLost,
                    at_ms,
                );
            }
            self.release_finished_allocations(job_id);
        }
    }

    fn submit_job(
        &mut self,
        spec: JobSpec,
        at_ms: u64,
        secret: String,
        resume_from_job: Option<JobId>,
    ) -> CommandOutcome {
        // No `spec.validate()` here: the API validates before the write, and a spec in the log was
        // accepted then. Validation rules change between releases; re-running them here would make an
        // old log replay to a different state (a job refused, every later job id shifted).
        let resume_from = match resume_from_job {
            None => None,
            Some(other) => match self.jobs.get(&other) {
                None => return rejected(format!("job {other} does not exist")),
                Some(j) => match j.checkpoints.last().or(j.resume_from.as_ref()) {
                    Some(c) => Some(c.clone()),
                    None => return rejected(format!("job {other} has committed no checkpoint")),
                },
            },
        };
        self.last_job_id += 1;
        let id = JobId(self.last_job_id);
        self.index.touch(id);
        self.jobs.insert(
            id,
            Arc::new(Job {
                id,
                spec,
                state: JobState::Pending,
                reason: None,
                submitted_at_ms: at_ms,
                started_at_ms: None,
                finished_at_ms: None,
                attempt: 0,
                allocation: None,
                ranks: Vec::new(),
                restarts: 0,
                attempts: Vec::new(),
                checkpoints: Vec::new(),
                resume_from,
                retired: Vec::new(),
                secret,
                checkpoint_signals: 0,
                owner: None,
                log_bytes: BTreeMap::new(),
            }),
        );
        self.queue.push_back(id);
        CommandOutcome::JobSubmitted { job: id }
    }

    fn place_job(&mut self, job_id: JobId, placement: Placement, at_ms: u64) -> CommandOutcome {
        let Some(job) = self.jobs.get(&job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if job.state != JobState::Pending {
            return rejected(format!(
                "job {job_id} is {}, not pending",
                job.state.as_str()
            ));
        }
        let res = &job.spec.resources;
        let (min_nodes, max_nodes) = res.node_range();
        if !(min_nodes as usize..=max_nodes as usize).contains(&placement.nodes.len()) {
            return rejected(format!(
                "plan has {} nodes, job {job_id} needs {}",
                placement.nodes.len(),
                if min_nodes == max_nodes {
                    min_nodes.to_string()
                } else {
                    format!("{min_nodes} to {max_nodes}")
                }
            ));
        }
        if let Some(waiting) = job.retired.iter().find(|r| !r.awaiting_agent) {
            return rejected(format!(
                "job {job_id} still has ranks of attempt {} stopping on {}",
                waiting.attempt, waiting.node
            ));
        }
        // Re-check the plan against the state it meets: it was computed on an older snapshot.
        let mut seen = BTreeSet::new();
        for (i, p) in placement.nodes.iter().enumerate() {
            if !seen.insert(&p.node) {
                return rejected(format!("plan uses node {} twice", p.node));
            }
            let Some(node) = self.nodes.get(&p.node) else {
                return rejected(format!("plan uses unknown node {}", p.node));
            };
            if node.status != NodeStatus::Up {
                return rejected(format!("plan uses node {} which is down", p.node));
            }
            if node.health.unhealthy.is_some() {
                return rejected(format!(
                    "plan uses node {} which failed its pre-flight checks",
                    p.node
                ));
            }
            let cap = node.capacity();
            let distinct_gpus: BTreeSet<&u32> = p.gpus.iter().collect();
            if p.gpus.len() != res.gpus_per_node as usize
                || distinct_gpus.len() != p.gpus.len()
                || p.gpus.iter().any(|g| !cap.free_gpus.contains(g))
                || cap.free_cpus < res.cpus_per_node
                || cap.free_memory_mib < res.memory_per_node_mib
            {
                return rejected(format!(
                    "node {} no longer has room for job {job_id}",
                    p.node
                ));
            }
            if i == 0 && node.usage.ports.contains(&placement.master_port) {
                return rejected(format!(
                    "port {} on {} is taken",
                    placement.master_port, p.node
                ));
            }
            if i == 0 && !(node.port_range.0..=node.port_range.1).contains(&placement.master_port) {
                return rejected(format!(
                    "port {} is outside the range of {}",
                    placement.master_port, p.node
                ));
            }
        }

        let procs = res.procs_per_node;
        let cpus = res.cpus_per_node;
        let memory_mib = res.memory_per_node_mib;
        let master_addr = self.nodes[&placement.nodes[0].node].address.clone();
        let mut nodes = Vec::with_capacity(placement.nodes.len());
        let mut ranks = Vec::with_capacity((procs as usize) * placement.nodes.len());
        for (group_rank, p) in placement.nodes.iter().enumerate() {
            let group_rank = group_rank as u32;
            let node = self.nodes.get_mut(&p.node).expect("checked above");
            node.usage.cpus += cpus;
            node.usage.memory_mib += memory_mib;
            node.usage.gpus.extend(p.gpus.iter().copied());
            if group_rank == 0 {
                node.usage.ports.insert(placement.master_port);
            }
            nodes.push(NodeAllocation {
                node: p.node.clone(),
                group_rank,
                gpus: p.gpus.clone(),
                cpus,
                memory_mib,
                released: false,
                awaiting_agent: false,
            });
            for local_rank in 0..procs {
                ranks.push(RankStatus {
                    rank: group_rank * procs + local_rank,
                    local_rank,
                    node: p.node.clone(),
                    phase: RankPhase::Pending,
                    exit_code: None,
                    message: None,
                    pid: None,
                });
            }
        }
        let job = self.job_mut(job_id).expect("checked above");
        job.state = JobState::Starting;
        job.started_at_ms = Some(at_ms);
        job.allocation = Some(Allocation {
            master_addr,
            master_port: placement.master_port,
            nodes,
        });
        job.ranks = ranks;
        job.reason = None;
        job.record_attempt_start(at_ms);
        self.queue.retain(|j| *j != job_id);
        CommandOutcome::Done
    }

    fn report_ranks(
        &mut self,
        node: &NodeId,
        instance_id: &str,
        observations: Vec<RankObservation>,
        idle_jobs: Vec<JobId>,
        gone_attempts: Vec<(JobId, u32)>,
        at_ms: u64,
    ) -> CommandOutcome {
        match self.nodes.get(node) {
            None => return rejected(format!("no node named {node}")),
            Some(n) if n.instance_id != instance_id => {
                return rejected(format!("report from a previous agent of {node}"))
            }
            Some(_) => {}
        }
        for (job, attempt) in &gone_attempts {
            self.release_retired(*job, node, |r| r.attempt == *attempt);
        }
        let mut touched = BTreeSet::new();
        // The first failure reported for each job, in report order: the root cause.
        let mut first_failure: BTreeMap<JobId, u32> = BTreeMap::new();
        for obs in observations {
            // Checked on the shared job first: `job_mut` copies a job that a snapshot still
            // holds, which a stale or settled observation must not cost.
            let applies = self.jobs.get(&obs.job).is_some_and(|job| {
                job.attempt == obs.attempt
                    && job
                        .ranks
                        .iter()
                        .any(|r| r.rank == obs.rank && &r.node == node && !r.phase.is_terminal())
            });
            if !applies {
                continue;
            }
            let Some(rank) = self
                .job_mut(obs.job)
                .and_then(|job| job.ranks.iter_mut().find(|r| r.rank == obs.rank))
            else {
                continue;
            };
            rank.phase = obs.phase;
            rank.exit_code = obs.exit_code;
            rank.message = obs.message;
            rank.pid = obs.pid.or(rank.pid);
            if obs.phase.is_failure(obs.exit_code) {
                first_failure.entry(obs.job).or_insert(obs.rank);
            }
            touched.insert(obs.job);
        }
        for job_id in &touched {
            self.update_job_from_ranks(*job_id, first_failure.get(job_id).copied(), at_ms);
        }
        for job_id in &idle_jobs {
            if !self.jobs.get(job_id).is_some_and(|j| j.state.is_terminal()) {
                continue;
            }
            let Some(job) = self.job_mut(*job_id) else {
                continue;
            };
            for rank in job.ranks.iter_mut().filter(|r| &r.node == node) {
                if !rank.phase.is_terminal() {
                    rank.phase = RankPhase::Lost;
                    rank.message = Some("the job ended before this rank started".to_string());
                }
            }
            // The agent runs nothing of it here: whatever was held for a lost node is free now.
            if let Some(share) = job
                .allocation
                .as_mut()
                .and_then(|a| a.nodes.iter_mut().find(|na| &na.node == node))
            {
                share.awaiting_agent = false;
            }
        }
        for job_id in touched.into_iter().chain(idle_jobs) {
            self.release_finished_allocations(job_id);
        }
        CommandOutcome::Done
    }

    /// Derives a running job's state from its ranks: the first failure (`first_failed_rank`, in
    /// report order) ends the attempt, and the gang restarts or the job fails.
    fn update_job_from_ranks(&mut self, job_id: JobId, first_failed_rank: Option<u32>, at_ms: u64) {
        let job = self.job_mut(job_id).expect("caller checked");
        if job.state.is_terminal() || job.state == JobState::Pending {
            return;
        }
        let failure = first_failed_rank.and_then(|rank| job.ranks.iter().find(|r| r.rank == rank));
        if let Some(r) = failure {
            let what = match r.phase {
                RankPhase::FailedToStart => format!(
                    "rank {} on {} failed to start: {}",
                    r.rank,
                    r.node,
                    r.message.as_deref().unwrap_or("unknown error")
                ),
                RankPhase::Lost => format!(
                    "rank {} on {} was lost: {}",
                    r.rank,
                    r.node,
                    r.message.as_deref().unwrap_or("unknown")
                ),
                _ => describe_exit(r),
            };
            self.end_attempt(job_id, what, AttemptEnd::Failed, at_ms);
        } else if job.ranks.iter().all(|r| r.phase == RankPhase::Exited) {
            job.state = JobState::Succeeded;
            job.reason = None;
            job.finished_at_ms = Some(at_ms);
            job.record_attempt_end(at_ms, "succeeded");
        } else if job.ranks.iter().all(|r| r.phase != RankPhase::Pending) {
            job.state = JobState::Running;
        }
    }

    fn cancel_job(&mut self, job_id: JobId, at_ms: u64) -> CommandOutcome {
        let Some(job) = self.job_mut(job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if job.state.is_terminal() {
            return rejected(format!("job {job_id} already {}", job.state.as_str()));
        }
        job.state = JobState::Cancelled;
        job.reason = Some("cancelled by user".to_string());
        job.finished_at_ms = Some(at_ms);
        job.record_attempt_end(at_ms, "cancelled by user");
        self.queue.retain(|j| *j != job_id);
        self.release_finished_allocations(job_id);
        CommandOutcome::Done
    }

    fn fail_pending_job(&mut self, job_id: JobId, reason: String, at_ms: u64) -> CommandOutcome {
        let Some(job) = self.job_mut(job_id) else {
            return rejected(format!("job {job_id} does not exist"));
        };
        if job.state != JobState::Pending {
            return rejected(format!(
                "job {job_id} is {}, not pending",
                job.state.as_str()
            ));
        }
        job.state = JobState::Failed;
        job.reason = Some(reason);
        job.finished_at_ms = Some(at_ms);
        self.queue.retain(|j| *j != job_id);
        CommandOutcome::Done
    }

    /// Returns the resources of every node of an ended job whose ranks have all ended.
    fn release_finished_allocations(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        if !job.state.is_terminal() {
            return;
        }
        let Some(allocation) = &job.allocation else {
            return;
        };
        let done: Vec<NodeId> = allocation
            .nodes
            .iter()
            .filter(|na| !na.released && !na.awaiting_agent)
            .filter(|na| {
                job.ranks
                    .iter()
                    .filter(|r| r.node == na.node)
                    .all(|r| r.phase.is_terminal())
            })
            .map(|na| na.node.clone())
            .collect();
        for node in done {
            self.release_node_allocation(job_id, &node);
        }
    }

    fn release_node_allocation(&mut self, job_id: JobId, node_id: &NodeId) {
        let Some(job) = self.job_mut(job_id) else {
            return;
        };
        let Some(allocation) = job.allocation.as_mut() else {
            return;
        };
        let master_port = allocation.master_port;
        let Some(na) = allocation
            .nodes
            .iter_mut()
            .find(|na| &na.node == node_id && !na.released)
        else {
            return;
        };
        na.released = true;
        let (cpus, memory_mib, gpus, group_rank) =
            (na.cpus, na.memory_mib, na.gpus.clone(), na.group_rank);
        let port = (group_rank == 0).then_some(master_port);
        self.free_on_node(node_id, &gpus, cpus, memory_mib, port);
    }

    /// The cluster as the scheduler sees it.
    pub fn cluster_snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: self.nodes.values().map(Node::capacity).collect(),
        }
    }

    /// Jobs whose ranks should be running on `node`: a node runs exactly these, and stops anything else.
    pub fn jobs_assigned_to<'a>(&'a self, node: &'a NodeId) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs_holding_on(node).filter(move |j| {
            matches!(j.state, JobState::Starting | JobState::Running)
                && j.allocation
                    .as_ref()
                    .is_some_and(|a| a.nodes.iter().any(|na| &na.node == node && !na.released))
        })
    }
}

fn describe_exit(r: &RankStatus) -> String {
    let what = match r.exit_code {
        Some(code) if code < 0 => {
            format!(
                "rank {} on {} was killed by signal {}",
                r.rank, r.node, -code
            )
        }
        Some(code) => format!("rank {} on {} exited with code {code}", r.rank, r.node),
        None => format!("rank {} on {} exited", r.rank, r.node),
    };
    match r.message.as_deref().filter(|m| !m.is_empty()) {
        Some(tail) => format!("{what}\n{tail}"),
        None => what,
    }
}

#[cfg(test)]
mod tests;
