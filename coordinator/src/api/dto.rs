//! The API's request and response bodies, as the OpenAPI document describes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trainctl_jobs::{limits, JobSpec};
use utoipa::{IntoParams, ToSchema};

/// A job spec as JSON: the same document as the TOML `job.toml`, read by the same parser
/// (`trainctl_jobs::JobSpec::from_json`). Only the OpenAPI description uses this type; it mirrors
/// the spec's schema, defaults and bounds. Durations are strings such as `"500ms"`, `"30s"`, `"10m"`,
/// `"1h30m"`, or whole milliseconds under the `_ms` key: one of the two, not both. A `null` value
/// is the same as leaving the key out. In a job's detail, `spec` is the stored canonical form: every
/// default filled in, `min_nodes` set, durations as `_ms`.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "ddp",
    "launch": {"command": ["python3", "train.py"], "env": {"NCCL_DEBUG": "WARN"}},
    "resources": {"nodes": "2:4", "procs_per_node": 8, "gpus_per_node": 8, "fabric": "ib"},
    "failure": {"max_restarts": 3, "hang_timeout": "10m"},
    "checkpoint": {"dir": "/shared/ckpt/{job}", "signal": "SIGUSR1", "grace": "2m", "keep": 3}
}))]
pub(crate) struct JobSpecBody {
    /// 1 to 63 characters of `a-z`, `0-9`, `.`, `_` and `-`, starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9._-]*$")]
    name: String,
    launch: LaunchBody,
    resources: ResourcesBody,
    failure: Option<FailureBody>,
    checkpoint: Option<CheckpointBody>,
}

/// What every rank runs.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LaunchBody {
    /// The argv, never a shell string: `command[0]` is the program, looked up in `PATH`.
    #[schema(min_items = 1)]
    command: Vec<String>,
    /// Working directory: absolute, or relative to the spec file's directory (the CLI's).
    workdir: Option<String>,
    /// Extra environment for every rank; names trainctl sets itself (RANK, WORLD_SIZE,
    /// MASTER_ADDR, TRAINCTL_*, ...) are refused.
    env: Option<BTreeMap<String, String>>,
}

/// How many hosts (`resources.nodes`); its schema is written by hand: an integer or a string.
#[derive(Serialize)]
pub(crate) struct NodeCount;

impl utoipa::PartialSchema for NodeCount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .description(Some(
                "An integer (exactly that many hosts), or a string \"N\" or \"MIN:MAX\" (an elastic job, \
                 like torchrun's --nnodes), from 1 to 100000",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(limits::NODES_MAX)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]+(:[0-9]+)?$"))
                    .examples(["2:4"]),
            )
            .into()
    }
}

impl ToSchema for NodeCount {}

/// The gang's shape and what each host must provide.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResourcesBody {
    nodes: NodeCount,
    /// The fewest hosts, 1 to `nodes` (default: `nodes`; 0 also means `nodes`). With
    /// `nodes = "MIN:MAX"` it must equal MIN.
    #[schema(minimum = 0, maximum = 100_000)]
    min_nodes: Option<u32>,
    /// Ranks per host.
    #[schema(minimum = 1, maximum = 1024)]
    procs_per_node: u32,
    /// GPUs per host: 0 (CPU-only, the default) or at least `procs_per_node`.
    #[schema(minimum = 0, maximum = 1024)]
    gpus_per_node: Option<u32>,
    /// CPUs per host (default: `procs_per_node`).
    #[schema(minimum = 1, maximum = 65_536)]
    cpus_per_node: Option<u32>,
    /// Memory per host in MiB (default 0: no requirement).
    #[schema(minimum = 0, maximum = 67_108_864)]
    memory_per_node_mib: Option<u64>,
    /// The RDMA fabric every host of the gang must have an ACTIVE port on (default `any`).
    fabric: Option<FabricBody>,
}

/// `ib`: InfiniBand; `roce`: RDMA over Converged Ethernet; `any` (the default): no requirement. A
/// job whose fabric no host has waits (pending, with the reason) rather than being refused.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FabricBody {
    Ib,
    Roce,
    Any,
}

/// What to do when a rank fails or the gang hangs.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailureBody {
    /// Job-wide restart budget (default 0).
    #[schema(minimum = 0, maximum = 10_000)]
    max_restarts: Option<u32>,
    /// Restart a gang that makes no progress this long (a duration, 1s to 7 days); default: never.
    #[schema(example = "10m")]
    hang_timeout: Option<String>,
    /// The same in milliseconds (not together with `hang_timeout`).
    #[schema(minimum = 1_000, maximum = 604_800_000)]
    hang_timeout_ms: Option<u64>,
}

/// How the job's ranks checkpoint, for planned stops (resizes, drains) and cleanup.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckpointBody {
    /// Where ranks write checkpoints; `{job}` and `{name}` are expanded. Relative to the workdir.
    #[schema(min_length = 1, max_length = 4096, example = "/shared/ckpt/{job}")]
    dir: String,
    /// The "checkpoint now" signal, e.g. `SIGUSR1`, `USR1` or `usr1` (not KILL or STOP); default: none.
    signal: Option<String>,
    /// How long a planned stop waits for a new checkpoint (a duration, 0 to 1h; default "2m").
    #[schema(example = "2m")]
    grace: Option<String>,
    /// The same in milliseconds (not together with `grace`).
    #[schema(minimum = 0, maximum = 3_600_000)]
    grace_ms: Option<u64>,
    /// Committed checkpoints to keep on disk (default: all).
    #[schema(minimum = 1, maximum = 10_000)]
    keep: Option<u32>,
}

/// The reply to a submission.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    /// The new job's id.
    pub id: String,
}

/// One job in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    /// One of pending, starting, running, succeeded, failed, cancelled.
    pub state: String,
    pub nodes: u32,
    pub procs_per_node: u32,
    pub world_size: u32,
    pub gpus_per_node: u32,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Why the job failed or was cancelled.
    pub reason: Option<String>,
    /// Why a pending job is still waiting.
    pub pending_reason: Option<String>,
}

/// One rank of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RankView {
    pub rank: u32,
    pub local_rank: u32,
    pub node: String,
    /// One of pending, running, exited, failed_to_start, lost.
    pub state: String,
    /// Exit code once exited; negative: killed by that signal.
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub pid: Option<u32>,
}

/// One node's share of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AllocationView {
    pub node: String,
    pub address: String,
    pub group_rank: u32,
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub released: bool,
    /// The GPU, NCCL and RDMA variables trainctl decided for the ranks here, and why (computed from
    /// the hosts as registered now). Absent from coordinators that predate it.
    #[serde(default)]
    pub launch_env: Vec<LaunchEnvView>,
}

/// One variable of the ranks' GPU, NCCL and RDMA environment on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LaunchEnvView {
    /// E.g. `NCCL_IB_HCA`.
    pub name: String,
    /// What the ranks see; null when it is left unset.
    pub value: Option<String>,
    /// `trainctl` (decided from discovery), `job` (the job's `launch.env` sets it) or `unset`.
    pub set_by: String,
    /// Why, in words.
    pub reason: String,
    /// The local ranks that get this value; empty when every rank on the node does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_ranks: Vec<u32>,
}

/// Everything about one job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The launch of the gang shown (0 for the first).
    pub attempt: u32,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub allocation: Vec<AllocationView>,
    pub ranks: Vec<RankView>,
    /// Restarts spent from the budget (failures and hangs; host losses and resizes are free).
    pub restarts: u32,
    /// The budget: `[failure] max_restarts`.
    pub max_restarts: u32,
    /// Hosts in the current (or last) attempt; an elastic job's size changes between attempts.
    pub current_nodes: u32,
    /// `[min_nodes, nodes]`: the gang's allowed host counts.
    pub node_range: [u32; 2],
    /// Every attempt so far, oldest first.
    pub attempts: Vec<AttemptView>,
    /// Committed checkpoints, oldest first; the next attempt resumes from the last.
    pub checkpoints: Vec<CheckpointView>,
    /// Another job's checkpoint this job started from (`submit --resume-from`).
    pub resume_from: Option<CheckpointView>,
    /// The job spec as stored (defaults filled in).
    #[schema(value_type = JobSpecBody)]
    pub spec: JobSpec,
}

/// One attempt (launch of the gang) of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    pub nodes: Vec<String>,
    pub world_size: u32,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Why it ended: "succeeded", the failing rank, "hung: ...", "growing ...", ...
    pub end: Option<String>,
}

/// A committed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointView {
    pub path: String,
    pub step: u64,
    pub committed_at_ms: u64,
    pub attempt: u32,
    /// The job that committed it.
    pub job: Option<String>,
    /// What the rank sent with it.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
}

/// Query of the submission.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Start from this job's newest committed checkpoint.
    pub resume_from: Option<String>,
}

/// Query of a cancellation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CancelQuery {
    /// Send the job's checkpoint signal first and wait up to its grace for a new commit.
    #[serde(default)]
    pub checkpoint: bool,
}

/// One node of the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub hostname: String,
    /// up or down.
    pub status: String,
    pub status_reason: Option<String>,
    pub cpus: u32,
    pub cpus_allocated: u32,
    pub memory_mib: u64,
    pub memory_allocated_mib: u64,
    pub gpus: u32,
    pub gpus_allocated: u32,
    pub gpu_models: Vec<String>,
    /// RDMA devices and their port states, e.g. `mlx5_0 port 1 ACTIVE InfiniBand 400 Gb/sec`.
    pub rdma: Vec<String>,
    /// Jobs holding resources here.
    pub jobs: Vec<String>,
    /// Drained by an operator: nothing new is placed here.
    pub drained: bool,
    /// Why the node failed its agent's pre-flight checks (GPU copy, NVML health, RDMA ports,
    /// NCCL); nothing new is placed here until they pass. Absent when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
    /// How ranks are contained there: `cgroup2 (cpu, memory)`, `process groups (...)`.
    #[serde(default)]
    pub containment: String,
    /// The RDMA fabrics of the host's ACTIVE ports: "InfiniBand", "RoCE", "InfiniBand and RoCE",
    /// "no ACTIVE RDMA port", or "no RDMA devices".
    #[serde(default)]
    pub fabric: String,
    /// The network interface that holds the agent's address, e.g. `eth0`; empty when unknown.
    #[serde(default)]
    pub advertised_interface: String,
    /// Each GPU, as the agent discovered it.
    #[serde(default)]
    pub gpu_devices: Vec<GpuView>,
    /// Each RDMA device and its ports.
    #[serde(default)]
    pub rdma_devices: Vec<RdmaDeviceView>,
}

/// One GPU of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GpuView {
    /// The agent's ordinal (display only; GPUs are identified by `uuid`).
    pub index: u32,
    /// `GPU-<uuid>`, or `declared-gpu-N` for a GPU declared with `--gpus`.
    pub uuid: String,
    /// e.g. "NVIDIA H200".
    pub name: String,
    pub memory_mib: u64,
    /// Held by a job now.
    pub allocated: bool,
    /// `0000:1b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// RDMA devices by nearness, nearest first.
    #[serde(default)]
    pub nic_affinity: Vec<NicAffinityView>,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub mig_mode: String,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    #[serde(default)]
    pub ecc_mode: String,
    /// Bus ids of the GPUs reached over NVLink.
    #[serde(default)]
    pub nvlink_peers: Vec<String>,
    #[serde(default)]
    pub retired_pages_pending: bool,
    #[serde(default)]
    pub uncorrectable_ecc_errors: u64,
}

/// How near an RDMA device is to a GPU.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NicAffinityView {
    pub rdma_device: String,
    /// `PIX` (same PCIe switch), `PXB` (several switches), `PHB` (same host bridge), `NODE`
    /// (same NUMA node), `SYS` (across NUMA nodes).
    pub link: String,
}

/// One RDMA device of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RdmaDeviceView {
    /// e.g. `mlx5_0`.
    pub name: String,
    /// `0000:3b:00.0`; empty when unknown.
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default)]
    pub numa_node: Option<u32>,
    pub ports: Vec<RdmaPortView>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RdmaPortView {
    pub port: u32,
    /// e.g. "ACTIVE", "DOWN".
    pub state: String,
    /// "InfiniBand" or "Ethernet" (RoCE).
    pub link_layer: String,
    /// e.g. "400 Gb/sec (4X NDR)".
    pub rate: String,
    /// The Ethernet interface of a RoCE port; empty for InfiniBand.
    #[serde(default)]
    pub netdev: String,
    /// Set GID entries (all of them, even past those listed in `gids`).
    pub gid_count: u32,
    #[serde(default)]
    pub gids: Vec<RdmaGidView>,
}

/// One set GID entry of a port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RdmaGidView {
    pub index: u32,
    pub gid: String,
    /// "IB/RoCE v1" or "RoCE v2"; empty when unknown.
    pub kind: String,
}

/// One line of a rank's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub rank: u32,
    pub node: String,
    pub text: String,
}

/// A page of a job's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogsPage {
    pub lines: Vec<LogLine>,
    /// Pass back as `cursor` to get the lines after these.
    pub cursor: String,
    /// True when the job has ended and every line has been returned: following can stop.
    pub complete: bool,
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only this global rank.
    pub rank: Option<u32>,
    /// Where the previous page ended.
    pub cursor: Option<String>,
    /// `text` for plain `[node rank N] line` text instead of JSON.
    pub format: Option<String>,
    /// Which attempt's output (default: the current one, or the last that ran).
    pub attempt: Option<u32>,
}

/// Query of the job listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<String>,
}

/// The coordinator's health.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when this coordinator knows a Raft leader.
    pub status: String,
    pub server_id: u64,
    pub is_leader: bool,
    pub leader: Option<u64>,
    pub raft_term: u64,
    /// The cluster's id (a coordinator joining with `--join` checks it).
    pub cluster_id: Option<String>,
    pub last_applied_index: Option<u64>,
    pub nodes_up: u64,
    pub nodes_down: u64,
    pub jobs: BTreeMap<String, u64>,
    pub uptime_s: u64,
}
