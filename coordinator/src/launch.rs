//! What each rank is started with: the torchrun environment contract, computed from the state.
//!
//! Pure: the agent receives these maps and launches processes with them. Keys come from
//! `shared/notes/torchrun.md` section 2, plus trainctl's own (`TRAINCTL_*`), plus the GPU, NCCL and
//! RDMA variables [`crate::nccl_env`] decides from the hosts' discovery ([`rank_env_decisions`]).

use std::collections::BTreeMap;

use crate::nccl_env::{self, EnvDecision, GangFabric, RankInput};
use crate::state::{Job, Node, NodeAllocation, NodeId};

/// Environment of a rank, set exactly, plus defaults set only when the host does not already have them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLaunch {
    pub rank: u32,
    pub local_rank: u32,
    pub env: BTreeMap<String, String>,
    pub env_defaults: BTreeMap<String, String>,
}

/// The ranks `node` must run for `job`, with their environments; empty when the job has nothing there.
/// `nodes` are the cluster's hosts as registered: the GPU, NCCL and RDMA variables come from this
/// host's and the gang's discovery ([`rank_env_decisions`]).
pub fn rank_launches_on(
    job: &Job,
    node: &NodeId,
    nodes: &BTreeMap<NodeId, Node>,
) -> Vec<RankLaunch> {
    let Some(host) = nodes.get(node) else {
        return Vec::new();
    };
    let gang = gang_fabric(job, nodes);
    launches(job, host, &gang)
}

/// The ranks of `job` on `host`, with the GPU and NCCL decisions for `gang`.
fn launches(job: &Job, host: &Node, gang: &GangFabric) -> Vec<RankLaunch> {
    let Some(allocation) = &job.allocation else {
        return Vec::new();
    };
    let Some(share) = allocation.nodes.iter().find(|na| na.node == host.id) else {
        return Vec::new();
    };
    let res = &job.spec.resources;
    let decisions = decide(job, share, Some(host), gang);
    (0..res.procs_per_node)
        .map(|local_rank| {
            let mut env = rank_env(
                job,
                &allocation.master_addr,
                allocation.master_port,
                share,
                &host.id,
                &host.address,
                local_rank,
            );
            for (name, value) in nccl_env::to_set(&decisions) {
                env.insert(name.to_owned(), value.to_owned());
            }
            RankLaunch {
                rank: share.group_rank * res.procs_per_node + local_rank,
                local_rank,
                env,
                env_defaults: env_defaults(job),
            }
        })
        .collect()
}

/// The fabric of `job`'s gang: its hosts as registered, under the job's `[resources] fabric`.
fn gang_fabric(job: &Job, nodes: &BTreeMap<NodeId, Node>) -> GangFabric {
    let hosts = job
        .allocation
        .iter()
        .flat_map(|a| &a.nodes)
        .filter_map(|na| nodes.get(&na.node))
        .map(|n| (n.id.0.as_str(), &n.resources));
    nccl_env::gang_fabric(job.spec.resources.fabric, hosts)
}

/// The decisions of every local rank of `share` (the same for all: they see the same GPUs, and NCCL
/// requires one `NCCL_IB_HCA` per host).
fn decide(
    job: &Job,
    share: &NodeAllocation,
    host: Option<&Node>,
    gang: &GangFabric,
) -> Vec<EnvDecision> {
    nccl_env::decide(&RankInput {
        job_env: &job.spec.launch.env,
        gang,
        host,
        host_gpus: &share.gpus,
    })
}

/// The GPU, NCCL and RDMA decisions for every local rank `node` runs for `job` (index = local rank),
/// with their reasons, as [`rank_launches_on`] sets them; empty when the job has nothing there.
pub fn rank_env_decisions(
    job: &Job,
    node: &NodeId,
    nodes: &BTreeMap<NodeId, Node>,
) -> Vec<Vec<EnvDecision>> {
    let Some(share) = job
        .allocation
        .iter()
        .flat_map(|a| &a.nodes)
        .find(|na| &na.node == node)
    else {
        return Vec::new();
    };
    let gang = gang_fabric(job, nodes);
    let decisions = decide(job, share, nodes.get(node), &gang);
    vec![decisions; job.spec.resources.procs_per_node as usize]
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
    // CUDA_VISIBLE_DEVICES (the job's GPUs on this host, and no others) and the NCCL variables come
    // from `nccl_env`, in `launches`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nccl_env::SetBy;
    use crate::scheduler;
    use crate::state::{
        Command, CommandOutcome, GpuInfo, JobId, NicAffinity, NodeResources, PcieLink,
        RdmaDeviceInfo, RdmaPortInfo, State,
    };
    use trainctl_jobs::JobSpec;

    /// Two InfiniBand hosts (2 GPUs each, GPU n behind mlx5_n) and a 2x2 GPU job placed on them;
    /// `env` is the job's own `[launch] env` as TOML.
    fn placed_ib_job(env: &str) -> (State, JobId) {
        let mut s = State::default();
        for n in 1..=2 {
            let name = format!("node-{n}");
            let gpus = (0..2)
                .map(|index| GpuInfo {
                    index,
                    name: "Test GPU".into(),
                    memory_mib: 1 << 16,
                    uuid: format!("GPU-{n}-{index}"),
                    nic_affinity: vec![NicAffinity {
                        rdma_device: format!("mlx5_{index}"),
                        link: PcieLink::Pix,
                    }],
                    ..GpuInfo::default()
                })
                .collect();
            let rdma_devices = (0..2)
                .map(|d| RdmaDeviceInfo {
                    name: format!("mlx5_{d}"),
                    ports: vec![RdmaPortInfo {
                        port: 1,
                        state: "ACTIVE".into(),
                        link_layer: "InfiniBand".into(),
                        ..RdmaPortInfo::default()
                    }],
                    ..RdmaDeviceInfo::default()
                })
                .collect();
            let outcome = s.apply(Command::RegisterNode {
                node: NodeId(name.clone()),
                address: format!("10.0.0.{n}"),
                instance_id: format!("{name}-a"),
                resources: NodeResources {
                    hostname: name,
                    cpus: 16,
                    memory_mib: 1 << 16,
                    gpus,
                    rdma_devices,
                    advertised_interface: "eth0".into(),
                    ..NodeResources::default()
                },
                port_range: (29500, 29599),
                at_ms: 1,
            });
            assert_eq!(outcome, CommandOutcome::Done);
        }
        let spec = JobSpec::from_toml(
            &format!(
                "name = \"ddp\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\nenv = {{ {env} }}\n\
                 [resources]\nnodes = 2\nprocs_per_node = 2\ngpus_per_node = 2\nfabric = \"ib\"\n"
            ),
            "test.toml",
        )
        .unwrap();
        let CommandOutcome::JobSubmitted { job } = s.apply(Command::SubmitJob {
            spec,
            at_ms: 2,
            secret: String::new(),
            resume_from_job: None,
        }) else {
            panic!("not submitted")
        };
        let placement =
            scheduler::plan(&s.cluster_snapshot(), &s.jobs[&job].spec.resources).expect("fits");
        let outcome = s.apply(Command::PlaceJob {
            job,
            placement,
            at_ms: 3,
        });
        assert_eq!(outcome, CommandOutcome::Done);
        (s, job)
    }

    #[test]
    fn ranks_get_the_gpu_and_nccl_environment_of_their_host() {
        let (s, job) = placed_ib_job("NCCL_DEBUG = \"WARN\"");
        let job = &s.jobs[&job];
        let node = NodeId("node-2".into());
        let launches = rank_launches_on(job, &node, &s.nodes);
        assert_eq!(launches.len(), 2);
        for l in &launches {
            let env = |k: &str| l.env.get(k).map(String::as_str);
            assert_eq!(env("CUDA_VISIBLE_DEVICES"), Some("GPU-2-0,GPU-2-1"));
            assert_eq!(env("NCCL_SOCKET_IFNAME"), Some("=eth0"));
            // The same list for every local rank (NCCL refuses or hangs otherwise): the ports
            // nearest all the job's GPUs on the host.
            assert_eq!(
                env("NCCL_IB_HCA"),
                Some("=mlx5_0:1,mlx5_1:1"),
                "rank {}",
                l.rank
            );
            assert_eq!(
                env("NCCL_IB_GID_INDEX"),
                None,
                "InfiniBand needs no GID index"
            );
            // The job's own variables travel in `job_env`, not per rank.
            assert_eq!(env("NCCL_DEBUG"), None);
            assert_eq!(env("RANK"), Some(l.rank.to_string().as_str()));
        }
        // What the API shows is what the launches set.
        let decisions = rank_env_decisions(job, &node, &s.nodes);
        assert_eq!(decisions.len(), 2);
        for (l, d) in launches.iter().zip(&decisions) {
            for (name, value) in nccl_env::to_set(d) {
                assert_eq!(l.env.get(name).map(String::as_str), Some(value), "{name}");
            }
        }
    }

    #[test]
    fn the_jobs_own_nccl_variables_are_not_overridden() {
        let (s, job) = placed_ib_job("NCCL_IB_HCA = \"mlx5\"");
        let job = &s.jobs[&job];
        let node = NodeId("node-1".into());
        for l in rank_launches_on(job, &node, &s.nodes) {
            // Not in the rank's env: the agent applies the job's env under it, so the job's stays.
            assert_eq!(l.env.get("NCCL_IB_HCA"), None);
            assert_eq!(l.env["NCCL_SOCKET_IFNAME"], "=eth0");
        }
        let decisions = rank_env_decisions(job, &node, &s.nodes);
        let hca = decisions[0]
            .iter()
            .find(|d| d.name == nccl_env::NCCL_IB_HCA)
            .unwrap();
        assert_eq!(hca.set_by, SetBy::Job);
        assert_eq!(hca.value.as_deref(), Some("mlx5"));
        assert!(
            hca.reason.contains("trainctl would set =mlx5_0:1,mlx5_1:1"),
            "{}",
            hca.reason
        );
    }

    #[test]
    fn a_node_outside_the_job_gets_nothing() {
        let (s, job) = placed_ib_job("");
        let job = &s.jobs[&job];
        let stranger = NodeId("node-9".into());
        assert!(rank_launches_on(job, &stranger, &s.nodes).is_empty());
        assert!(rank_env_decisions(job, &stranger, &s.nodes).is_empty());
    }
}
