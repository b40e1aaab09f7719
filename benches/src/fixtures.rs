//! Clusters of a given size and fill, built the way the coordinator builds them: nodes registered
//! through `State::apply`, then a [`State::cluster_snapshot`] for the scheduler.

use std::fmt;

use trainctl_coordinator::state::{
    Command, GpuInfo, JobId, NodeId, NodeResources, NodeStatus, RankObservation, RankPhase, State,
};
use trainctl_jobs::{Fabric, Resources};

/// GPUs on every fixture host.
pub const GPUS_PER_HOST: u32 = 8;
/// CPUs on every fixture host.
pub const CPUS_PER_HOST: u32 = 64;
/// Memory on every fixture host, MiB (1 TiB).
pub const MEMORY_PER_HOST_MIB: u64 = 1 << 20;
/// The rendezvous ports every fixture host may lease.
pub const PORT_RANGE: (u16, u16) = (29500, 29599);

/// How much of the cluster other jobs hold. A busy host has every GPU, CPU and byte taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// No host busy.
    Empty,
    /// The first half of the hosts busy (as if one large job held half the racks).
    HalfBusy,
    /// 90% of hosts busy; the free 10% scattered across the cluster by a seeded shuffle.
    NinetyScattered,
}

impl Fill {
    pub const ALL: [Fill; 3] = [Fill::Empty, Fill::HalfBusy, Fill::NinetyScattered];

    /// Which of `hosts` hosts are busy under this fill.
    pub fn busy_hosts(self, hosts: usize) -> Vec<bool> {
        match self {
            Fill::Empty => vec![false; hosts],
            Fill::HalfBusy => (0..hosts).map(|i| i < hosts / 2).collect(),
            Fill::NinetyScattered => {
                let mut order: Vec<usize> = (0..hosts).collect();
                let mut rng = SplitMix64(0x7261_696e_6374_6c21);
                // Fisher-Yates; the first 10% of the shuffled order stay free.
                for i in (1..hosts).rev() {
                    let j = (rng.next() % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
                let mut busy = vec![true; hosts];
                for &i in &order[..hosts / 10] {
                    busy[i] = false;
                }
                busy
            }
        }
    }
}

impl fmt::Display for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fill::Empty => "empty",
            Fill::HalfBusy => "50% busy",
            Fill::NinetyScattered => "90% busy, scattered",
        })
    }
}

/// A small seeded generator (splitmix64), so every run builds the same cluster.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The gang the scheduler benchmark places: 64 hosts x 8 GPUs, 16 CPUs per host.
pub fn gang_64x8() -> Resources {
    Resources {
        nodes: 64,
        min_nodes: 64,
        procs_per_node: 8,
        gpus_per_node: 8,
        cpus_per_node: 16,
        memory_per_node_mib: 0,
        fabric: Fabric::Any,
    }
}

/// The command an agent's registration turns into for fixture host `i`.
pub fn register_node(i: usize, at_ms: u64) -> Command {
    let hostname = format!("gpu-{i:05}");
    Command::RegisterNode {
        node: NodeId(hostname.clone()),
        address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        instance_id: format!("bench-{i}"),
        resources: NodeResources {
            containment: String::new(),
            hostname,
            cpus: CPUS_PER_HOST,
            memory_mib: MEMORY_PER_HOST_MIB,
            gpus: (0..GPUS_PER_HOST)
                .map(|g| GpuInfo {
                    index: g,
                    name: "NVIDIA H100 80GB HBM3".to_string(),
                    memory_mib: 81_559,
                    uuid: format!("GPU-{i:08x}-{g:04x}-0000-0000-000000000000"),
                    ..Default::default()
                })
                .collect(),
            rdma_devices: Vec::new(),
            advertised_interface: String::new(),
        },
        port_range: PORT_RANGE,
        at_ms,
    }
}

/// A coordinator state with `hosts` registered, up hosts, `fill` of them fully taken.
pub fn state(hosts: usize, fill: Fill) -> State {
    let mut state = State::default();
    for i in 0..hosts {
        state.apply(register_node(i, 1_700_000_000_000));
    }
    assert_eq!(state.nodes.len(), hosts, "every fixture host registered");
    for (node, busy) in state.nodes.values_mut().zip(fill.busy_hosts(hosts)) {
        assert_eq!(node.status, NodeStatus::Up);
        if busy {
            node.usage.gpus = (0..GPUS_PER_HOST).collect();
            node.usage.cpus = CPUS_PER_HOST;
            node.usage.memory_mib = MEMORY_PER_HOST_MIB;
        }
    }
    state
}

/// One agent report per job of `jobs` (from its first rank's node): every rank of its current
/// attempt in `phase`, with `exit_code`.
pub fn rank_reports(
    state: &State,
    jobs: &[JobId],
    phase: RankPhase,
    exit_code: Option<i32>,
    at_ms: u64,
) -> Vec<Command> {
    jobs.iter()
        .map(|job| {
            let j = &state.jobs[job];
            let node = j.ranks[0].node.clone();
            Command::ReportRanks {
                instance_id: state.nodes[&node].instance_id.clone(),
                node,
                observations: j
                    .ranks
                    .iter()
                    .map(|r| RankObservation {
                        job: *job,
                        attempt: j.attempt,
                        rank: r.rank,
                        phase,
                        exit_code,
                        message: None,
                        pid: Some(1000 + r.rank),
                    })
                    .collect(),
                idle_jobs: Vec::new(),
                at_ms,
                gone_attempts: Vec::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_take_the_stated_share() {
        for (fill, busy) in [
            (Fill::Empty, 0),
            (Fill::HalfBusy, 500),
            (Fill::NinetyScattered, 900),
        ] {
            let snapshot = state(1000, fill).cluster_snapshot();
            let taken = snapshot
                .nodes
                .iter()
                .filter(|n| n.free_gpus.is_empty())
                .count();
            assert_eq!(taken, busy, "{fill}");
        }
    }

    #[test]
    fn gang_fits_every_fixture() {
        for fill in Fill::ALL {
            let p = trainctl_coordinator::scheduler::plan(
                &state(1000, fill).cluster_snapshot(),
                &gang_64x8(),
            )
            .unwrap();
            assert_eq!(p.nodes.len(), 64, "{fill}");
        }
    }
}
