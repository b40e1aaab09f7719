//! What each rank is started with: the torchrun environment contract, computed from the state.
//!
//! Pure: the agent receives these maps and launches processes with them. Keys come from
//! `shared/notes/torchrun.md` section 2, plus trainctl's own (`TRAINCTL_*`).

use std::collections::BTreeMap;

use crate::state::{Job, NodeAllocation, NodeId};

/// Environment of a rank, set exactly, plus defaults set only when the host does not already have them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLaunch {
    pub rank: u32,
    pub local_rank: u32,
    pub env: BTreeMap<String, String>,
    pub env_defaults: BTreeMap<String, String>,
}

/// The ranks `node` must run for `job`, with their environments; empty when the job has nothing there.
pub fn rank_launches(job: &Job, node: &NodeId, node_address: &str) -> Vec<RankLaunch> {
    let Some(allocation) = &job.allocation else {
        return Vec::new();
    };
    let Some(share) = allocation.nodes.iter().find(|na| &na.node == node) else {
        return Vec::new();
    };
    let res = &job.spec.resources;
    (0..res.procs_per_node)
        .map(|local_rank| RankLaunch {
            rank: share.group_rank * res.procs_per_node + local_rank,
            local_rank,
            env: rank_env(
                job,
                &allocation.master_addr,
                allocation.master_port,
                share,
                node,
                node_address,
                local_rank,
            ),
            env_defaults: env_defaults(job),
        })
        .collect()
}

fn rank_env(
    job: &Job,
    master_addr: &str,
    master_port: u16,
    share: &NodeAllocation,
    node: &NodeId,
    node_address: &str,
    local_rank: u32,
) -> BTreeMap<String, String> {
    let res = &job.spec.resources;
    // An elastic gang's size is this attempt's, not the spec's maximum.
    let group_world_size = job
        .allocation
        .as_ref()
        .map_or(res.nodes, |a| a.nodes.len() as u32);
    let world_size = group_world_size * res.procs_per_node;
    let rank = share.group_rank * res.procs_per_node + local_rank;
    // The job's own environment travels once per assignment (`job_env`), not once per rank.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("RANK", rank.to_string());
    set("LOCAL_RANK", local_rank.to_string());
    set("WORLD_SIZE", world_size.to_string());
    set("LOCAL_WORLD_SIZE", res.procs_per_node.to_string());
    set("GROUP_RANK", share.group_rank.to_string());
    set("GROUP_WORLD_SIZE", group_world_size.to_string());
    set("ROLE_NAME", "default".to_string());
    set("ROLE_RANK", rank.to_string());
    set("ROLE_WORLD_SIZE", world_size.to_string());
    set("MASTER_ADDR", master_addr.to_string());
    set("MASTER_PORT", master_port.to_string());
    set("TORCHELASTIC_RESTART_COUNT", job.attempt.to_string());
    set(
        "TORCHELASTIC_MAX_RESTARTS",
        job.spec.failure.max_restarts.to_string(),
    );
    set("TORCHELASTIC_RUN_ID", format!("trainctl-{}", job.id));
    // The agent of group rank 0 serves the store at MASTER_ADDR:MASTER_PORT ([`store_launch`]): every
    // rank, rank 0 included, is a client of it, and each attempt gets an empty one.
    set("TORCHELASTIC_USE_AGENT_STORE", "True".to_string());
    // The job's GPUs on this host, and no others (an empty list hides every GPU from a CPU job).
    set(
        "CUDA_VISIBLE_DEVICES",
        share
            .gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    set("TRAINCTL_JOB_ID", job.id.to_string());
    set("TRAINCTL_JOB_NAME", job.spec.name.clone());
    set("TRAINCTL_ATTEMPT", job.attempt.to_string());
    set("TRAINCTL_NODE_NAME", node.to_string());
    set("TRAINCTL_NODE_ADDR", node_address.to_string());
    set("TRAINCTL_JOB_TOKEN", job.token());
    if let Some(dir) = job.checkpoint_dir() {
        set("TRAINCTL_CHECKPOINT_DIR", dir);
    }
    if let Some(resume) = job.resume_point() {
        set("TRAINCTL_RESUME_FROM", resume.path.clone());
        set("TRAINCTL_RESUME_STEP", resume.step.to_string());
    }
    env
}

/// The TCPStore that `node`'s agent serves for `job`'s current attempt, if any: on the host of
/// group rank 0, at MASTER_ADDR:MASTER_PORT (the port is leased to this job on that host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLaunch {
    pub address: String,
    pub port: u16,
    /// The addresses of the job's hosts, the only peers the store serves.
    pub peers: Vec<String>,
}

/// [`StoreLaunch`] of `job` on `node`; `address_of` gives a host's registered address.
pub fn store_launch(
    job: &Job,
    node: &NodeId,
    address_of: impl Fn(&NodeId) -> Option<String>,
) -> Option<StoreLaunch> {
    let allocation = job.allocation.as_ref()?;
    allocation
        .nodes
        .iter()
        .find(|na| &na.node == node && na.group_rank == 0)?;
    Some(StoreLaunch {
        address: allocation.master_addr.clone(),
        port: allocation.master_port,
        peers: allocation
            .nodes
            .iter()
            .filter_map(|na| address_of(&na.node))
            .collect(),
    })
}

fn env_defaults(job: &Job) -> BTreeMap<String, String> {
    let mut defaults = BTreeMap::new();
    defaults.insert(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING".to_string(),
        "1".to_string(),
    );
    if job.spec.resources.procs_per_node > 1 {
        // torchrun's rule: several processes per host each get one OpenMP thread unless told otherwise.
        defaults.insert("OMP_NUM_THREADS".to_string(), "1".to_string());
    }
    defaults
}
