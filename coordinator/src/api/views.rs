//! Rendering jobs and nodes from the state into the API's bodies ([`super::dto`]).

use super::dto::{
    AllocationView, AttemptView, CheckpointView, GpuView, JobDetail, JobSummary, LaunchEnvView,
    NicAffinityView, NodeView, RankView, RdmaDeviceView, RdmaGidView, RdmaPortView,
};
use crate::scheduler;
use crate::state::{
    Job, JobId, JobState, Node, NodeId, NodeStatus, RankPhase, State as ClusterState,
};

/// What rendering jobs needs from the state, each part computed at most once per request: a listing
/// of many pending jobs builds one cluster snapshot and one queue index, not one per job.
pub(super) struct View<'a> {
    state: &'a ClusterState,
    snapshot: std::cell::OnceCell<scheduler::ClusterSnapshot>,
    queue_position: std::cell::OnceCell<std::collections::HashMap<JobId, usize>>,
}

impl<'a> View<'a> {
    pub(super) fn new(state: &'a ClusterState) -> Self {
        View {
            state,
            snapshot: std::cell::OnceCell::new(),
            queue_position: std::cell::OnceCell::new(),
        }
    }
}

fn pending_reason(v: &View, job: &Job) -> Option<String> {
    if job.state != JobState::Pending {
        return None;
    }
    let s = v.state;
    let snapshot = v.snapshot.get_or_init(|| s.cluster_snapshot());
    let own = match scheduler::plan(snapshot, &job.spec.resources) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    let positions = v
        .queue_position
        .get_or_init(|| s.queue.iter().enumerate().map(|(i, id)| (*id, i)).collect());
    let ahead = positions.get(&job.id).copied().unwrap_or(0);
    match (ahead, own) {
        (0, Some(why)) => Some(why),
        (0, None) => Some("fits now; being placed".to_string()),
        (n, why) => Some(format!(
            "waiting behind {n} earlier job{} (first: job {}){}",
            if n == 1 { "" } else { "s" },
            s.queue[0],
            why.map(|w| format!("; and it {w}")).unwrap_or_default()
        )),
    }
}

pub(super) fn summary(v: &View, job: &Job) -> JobSummary {
    let res = &job.spec.resources;
    JobSummary {
        id: job.id.to_string(),
        name: job.spec.name.clone(),
        state: job.state.as_str().to_string(),
        nodes: res.nodes,
        procs_per_node: res.procs_per_node,
        world_size: job.spec.world_size(),
        gpus_per_node: res.gpus_per_node,
        submitted_at_ms: job.submitted_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        reason: job.reason.clone(),
        pending_reason: pending_reason(v, job),
    }
}

fn rank_phase_name(phase: RankPhase) -> &'static str {
    match phase {
        RankPhase::Pending => "pending",
        RankPhase::Running => "running",
        RankPhase::Exited => "exited",
        RankPhase::FailedToStart => "failed_to_start",
        RankPhase::Lost => "lost",
    }
}

pub(super) fn detail(v: &View, job: &Job) -> JobDetail {
    let s = v.state;
    let allocation = job
        .allocation
        .as_ref()
        .map(|a| {
            a.nodes
                .iter()
                .map(|na| AllocationView {
                    node: na.node.to_string(),
                    address: s
                        .nodes
                        .get(&na.node)
                        .map(|n| n.address.clone())
                        .unwrap_or_default(),
                    group_rank: na.group_rank,
                    gpus: na.gpus.clone(),
                    cpus: na.cpus,
                    memory_mib: na.memory_mib,
                    released: na.released,
                    launch_env: launch_env_view(job, &na.node, &s.nodes),
                })
                .collect()
        })
        .unwrap_or_default();
    JobDetail {
        summary: summary(v, job),
        attempt: job.attempt,
        master_addr: job.allocation.as_ref().map(|a| a.master_addr.clone()),
        master_port: job.allocation.as_ref().map(|a| a.master_port),
        allocation,
        ranks: job
            .ranks
            .iter()
            .map(|r| RankView {
                rank: r.rank,
                local_rank: r.local_rank,
                node: r.node.to_string(),
                state: rank_phase_name(r.phase).to_string(),
                exit_code: r.exit_code,
                message: r.message.clone(),
                pid: r.pid,
            })
            .collect(),
        restarts: job.restarts,
        max_restarts: job.spec.failure.max_restarts,
        current_nodes: job
            .allocation
            .as_ref()
            .map(|a| a.nodes.len() as u32)
            .or_else(|| job.attempts.last().map(|a| a.nodes.len() as u32))
            .unwrap_or(0),
        node_range: {
            let (lo, hi) = job.spec.resources.node_range();
            [lo, hi]
        },
        attempts: job
            .attempts
            .iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                nodes: a.nodes.iter().map(|n| n.to_string()).collect(),
                world_size: a.world_size,
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                end: a.end.clone(),
            })
            .collect(),
        checkpoints: job.checkpoints.iter().map(checkpoint_view).collect(),
        resume_from: job.resume_from.as_ref().map(checkpoint_view),
        spec: job.spec.clone(),
    }
}

/// [`LaunchEnvView`]s of `job`'s ranks on `node`: each distinct decision once.
fn launch_env_view(
    job: &Job,
    node: &NodeId,
    nodes: &std::collections::BTreeMap<NodeId, Node>,
) -> Vec<LaunchEnvView> {
    let per_rank = crate::launch::rank_env_decisions(job, node, nodes);
    crate::nccl_env::group_by_rank(&per_rank)
        .into_iter()
        .map(|(d, local_ranks)| LaunchEnvView {
            name: d.name.to_owned(),
            value: d.value,
            set_by: d.set_by.as_str().to_owned(),
            reason: d.reason,
            local_ranks,
        })
        .collect()
}

pub(super) fn checkpoint_view(c: &crate::state::CheckpointRecord) -> CheckpointView {
    CheckpointView {
        path: c.path.clone(),
        step: c.step,
        committed_at_ms: c.at_ms,
        attempt: c.attempt,
        job: c.job.map(|j| j.to_string()),
        metrics: c
            .metrics
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
    }
}

pub(super) fn node_view(s: &ClusterState, n: &Node) -> NodeView {
    let jobs = s
        .jobs
        .values()
        .filter(|j| {
            j.allocation
                .as_ref()
                .is_some_and(|a| a.nodes.iter().any(|na| na.node == n.id && !na.released))
        })
        .map(|j| j.id.to_string())
        .collect();
    let mut gpu_models: Vec<String> = n.resources.gpus.iter().map(|g| g.name.clone()).collect();
    gpu_models.dedup();
    NodeView {
        name: n.id.to_string(),
        address: n.address.clone(),
        hostname: n.resources.hostname.clone(),
        status: match n.status {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
        }
        .to_string(),
        status_reason: n.status_reason.clone(),
        cpus: n.resources.cpus,
        cpus_allocated: n.usage.cpus,
        memory_mib: n.resources.memory_mib,
        memory_allocated_mib: n.usage.memory_mib,
        gpus: n.resources.gpus.len() as u32,
        gpus_allocated: n.usage.gpus.len() as u32,
        gpu_models,
        rdma: n
            .resources
            .rdma_devices
            .iter()
            .flat_map(|d| {
                d.ports.iter().map(move |p| {
                    format!(
                        "{} port {} {} {} {}",
                        d.name, p.port, p.state, p.link_layer, p.rate
                    )
                })
            })
            .collect(),
        jobs,
        drained: n.drained,
        unhealthy: n.health.unhealthy.clone(),
        containment: n.resources.containment.clone(),
        fabric: if n.resources.rdma_devices.is_empty() {
            "no RDMA devices".to_string()
        } else {
            scheduler::HostFabrics::of(&n.resources.rdma_devices)
                .describe()
                .to_string()
        },
        advertised_interface: n.resources.advertised_interface.clone(),
        gpu_devices: n
            .resources
            .gpus
            .iter()
            .map(|g| GpuView {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_mib: g.memory_mib,
                allocated: n.usage.gpus.contains(&g.index),
                pci_bus_id: g.pci_bus_id.clone(),
                numa_node: g.numa_node,
                nic_affinity: g
                    .nic_affinity
                    .iter()
                    .map(|a| NicAffinityView {
                        rdma_device: a.rdma_device.clone(),
                        link: a.link.as_str().to_string(),
                    })
                    .collect(),
                mig_mode: g.mig_mode.clone(),
                ecc_mode: g.ecc_mode.clone(),
                nvlink_peers: g.nvlink_peers.clone(),
                retired_pages_pending: g.retired_pages_pending,
                uncorrectable_ecc_errors: g.uncorrectable_ecc_errors,
            })
            .collect(),
        rdma_devices: n
            .resources
            .rdma_devices
            .iter()
            .map(|d| RdmaDeviceView {
                name: d.name.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                numa_node: d.numa_node,
                ports: d
                    .ports
                    .iter()
                    .map(|p| RdmaPortView {
                        port: p.port,
                        state: p.state.clone(),
                        link_layer: p.link_layer.clone(),
                        rate: p.rate.clone(),
                        netdev: p.netdev.clone(),
                        gid_count: p.gid_count,
                        gids: p
                            .gids
                            .iter()
                            .map(|g| RdmaGidView {
                                index: g.index,
                                gid: g.gid.clone(),
                                kind: g.kind.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
