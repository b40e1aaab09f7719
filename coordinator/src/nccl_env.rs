//! The GPU, NCCL and RDMA environment of a rank, decided from what the agents discovered.
//!
//! For each rank: which GPUs it sees (`CUDA_VISIBLE_DEVICES`, by UUID), which RDMA ports NCCL uses
//! (`NCCL_IB_HCA`: the ACTIVE ports nearest the job's GPUs on the host, the same list for every local
//! rank: NCCL builds its rings from every local rank's NICs and requires one list per host; it picks
//! each GPU's nearest NIC itself), the GID index of RoCE v2 ports
//! (`NCCL_IB_GID_INDEX`), the interface of NCCL's bootstrap and socket transport
//! (`NCCL_SOCKET_IFNAME`: the one holding the agent's address), and `NCCL_IB_DISABLE=1` for a gang
//! whose hosts share no RDMA fabric. Each comes as an [`EnvDecision`]: the value and the reason, which
//! [`crate::launch`] puts into the rank's environment and the API shows in `trainctl status`.
//!
//! Pure: the inputs are the job's own environment, the gang's hosts as registered and the job's GPUs on the
//! rank's host.
//! The job's `launch.env` always wins: a variable it sets is left to it, and the decision says what
//! trainctl would have set. A CPU job (no GPU on the host) gets only `CUDA_VISIBLE_DEVICES=` (empty:
//! it hides every GPU), and a gang with no ACTIVE RDMA port gets no `NCCL_IB_*` variable at all.
//!
//! NCCL's list syntax: a leading `=` makes NCCL match names exactly (`NCCL_IB_HCA==mlx5_0:1,mlx5_1:1`
//! uses port 1 of `mlx5_0` and `mlx5_1`, not `mlx5_10`; `NCCL_SOCKET_IFNAME==eth0`, not `eth00`).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use trainctl_jobs::Fabric;

use crate::scheduler::{port_fabric, HostFabrics};
use crate::state::{GpuInfo, Node, NodeResources, PcieLink, RdmaPortInfo};

/// The GPUs a rank sees.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// The RDMA ports NCCL's IB transport may use.
pub const NCCL_IB_HCA: &str = "NCCL_IB_HCA";
/// The GID table entry NCCL uses on RoCE ports.
pub const NCCL_IB_GID_INDEX: &str = "NCCL_IB_GID_INDEX";
/// The interfaces of NCCL's bootstrap and socket transport.
pub const NCCL_SOCKET_IFNAME: &str = "NCCL_SOCKET_IFNAME";
/// `1` turns NCCL's IB transport off (NCCL then uses TCP sockets between hosts).
pub const NCCL_IB_DISABLE: &str = "NCCL_IB_DISABLE";

/// Who chose the value a rank sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetBy {
    /// trainctl, from discovery: the rank gets `value`.
    Trainctl,
    /// The job's own `launch.env`: the rank gets the job's value, and trainctl sets nothing.
    Job,
    /// Nobody: trainctl could not choose well and leaves it to NCCL's own defaults.
    Unset,
}

impl SetBy {
    /// `trainctl`, `job` or `unset`, as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SetBy::Trainctl => "trainctl",
            SetBy::Job => "job",
            SetBy::Unset => "unset",
        }
    }
}

/// One variable of a rank's environment: what the rank sees, who chose it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvDecision {
    /// The variable, e.g. `NCCL_IB_HCA`.
    pub name: &'static str,
    /// What the rank sees: trainctl's value, the job's, or `None` when unset.
    pub value: Option<String>,
    pub set_by: SetBy,
    /// Why, in words: `=mlx5_0:1` because "the ACTIVE InfiniBand ports nearest GPU-… (PIX)".
    pub reason: String,
}

impl EnvDecision {
    fn set(name: &'static str, value: String, reason: String) -> Self {
        EnvDecision {
            name,
            value: Some(value),
            set_by: SetBy::Trainctl,
            reason,
        }
    }

    fn unset(name: &'static str, reason: String) -> Self {
        EnvDecision {
            name,
            value: None,
            set_by: SetBy::Unset,
            reason,
        }
    }
}

/// The RDMA fabric NCCL's IB transport uses between the gang's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GangFabric {
    /// Every host has an ACTIVE port of this fabric ([`Fabric::Ib`] or [`Fabric::Roce`]).
    Shared(Fabric),
    /// Some host has an ACTIVE RDMA port, but the hosts share no fabric (the job's, or with
    /// `fabric = "any"` any one): what each has, in words.
    Split(String),
    /// No host of the gang has an ACTIVE RDMA port.
    NoRdma,
}

/// Hosts named in a [`GangFabric::Split`] description before "and N more".
const SPLIT_HOSTS_SHOWN_MAX: usize = 4;

/// The fabric of a gang whose job asked for `requested`: that one when every host has it; with
/// `"any"`, InfiniBand when every host has it, else RoCE when every host has that. `hosts` are
/// (name, resources) of the gang's hosts.
pub fn gang_fabric<'a>(
    requested: Fabric,
    hosts: impl IntoIterator<Item = (&'a str, &'a NodeResources)>,
) -> GangFabric {
    let hosts: Vec<(&str, HostFabrics)> = hosts
        .into_iter()
        .map(|(name, r)| (name, HostFabrics::of(&r.rdma_devices)))
        .collect();
    if !hosts.iter().any(|(_, f)| f.ib || f.roce) {
        return GangFabric::NoRdma;
    }
    let candidates: &[Fabric] = match requested {
        Fabric::Any => &[Fabric::Ib, Fabric::Roce],
        Fabric::Ib => &[Fabric::Ib],
        Fabric::Roce => &[Fabric::Roce],
    };
    if let Some(&shared) = candidates
        .iter()
        .find(|&&c| hosts.iter().all(|(_, f)| f.has(c)))
    {
        return GangFabric::Shared(shared);
    }
    let mut shown: Vec<String> = hosts
        .iter()
        .take(SPLIT_HOSTS_SHOWN_MAX)
        .map(|(name, f)| format!("{name}: {}", f.describe()))
        .collect();
    if hosts.len() > SPLIT_HOSTS_SHOWN_MAX {
        shown.push(format!("and {} more", hosts.len() - SPLIT_HOSTS_SHOWN_MAX));
    }
    GangFabric::Split(shown.join(", "))
}

/// What [`decide`] looks at for one rank.
#[derive(Debug, Clone, Copy)]
pub struct RankInput<'a> {
    /// The job's own environment (`[launch] env`): what it sets is left to it.
    pub job_env: &'a BTreeMap<String, String>,
    /// The gang's fabric ([`gang_fabric`]).
    pub gang: &'a GangFabric,
    /// The rank's host as registered; `None` when the coordinator no longer knows it (then only the
    /// GPU indices are known).
    pub host: Option<&'a Node>,
    /// The job's GPUs on this host, by the agent's index (the allocation's order). Every local rank
    /// sees all of them, and gets the same NCCL variables: nothing here depends on the local rank.
    pub host_gpus: &'a [u32],
}

/// Every variable trainctl decides for a rank, in a fixed order: `CUDA_VISIBLE_DEVICES`, then, for a
/// job with GPUs on the host, `NCCL_SOCKET_IFNAME` and the `NCCL_IB_*` of the gang's fabric.
pub fn decide(input: &RankInput) -> Vec<EnvDecision> {
    let mut decisions = vec![visible_devices(input.host, input.host_gpus)];
    if !input.host_gpus.is_empty() {
        if let Some(host) = input.host {
            decisions.extend(nccl(input, host));
        }
    }
    for d in &mut decisions {
        if let Some(value) = input.job_env.get(d.name) {
            let would = match (&d.value, d.set_by) {
                (Some(v), SetBy::Trainctl) => format!("; trainctl would set {v}: {}", d.reason),
                _ => String::new(),
            };
            d.reason = format!("the job's launch.env sets it{would}");
            d.value = Some(value.clone());
            d.set_by = SetBy::Job;
        }
    }
    decisions
}

/// The variables trainctl sets, as `(name, value)`: the decisions [`SetBy::Trainctl`] made.
pub fn to_set(decisions: &[EnvDecision]) -> impl Iterator<Item = (&'static str, &str)> {
    decisions
        .iter()
        .filter(|d| d.set_by == SetBy::Trainctl)
        .filter_map(|d| d.value.as_deref().map(|v| (d.name, v)))
}

/// The decisions of a host's ranks (index = local rank), each distinct decision once with the local
/// ranks that got it, or no ranks when every rank did; in the order of the variables.
pub fn group_by_rank(per_rank: &[Vec<EnvDecision>]) -> Vec<(EnvDecision, Vec<u32>)> {
    let mut groups: Vec<(EnvDecision, Vec<u32>)> = Vec::new();
    for (local_rank, decisions) in (0u32..).zip(per_rank) {
        for d in decisions {
            match groups.iter_mut().find(|(g, _)| g == d) {
                Some((_, ranks)) => ranks.push(local_rank),
                None => groups.push((d.clone(), vec![local_rank])),
            }
        }
    }
    // Keep the variables' order: a stable sort by each name's first appearance.
    let order: Vec<&'static str> = groups.iter().fold(Vec::new(), |mut names, (d, _)| {
        if !names.contains(&d.name) {
            names.push(d.name);
        }
        names
    });
    groups.sort_by_key(|(d, _)| order.iter().position(|n| *n == d.name));
    for (_, ranks) in &mut groups {
        if ranks.len() == per_rank.len() {
            ranks.clear();
        }
    }
    groups
}

/// Whether CUDA knows `uuid` as a device UUID (`GPU-…`, or a MIG instance's `MIG-…`).
fn is_cuda_uuid(uuid: &str) -> bool {
    uuid.starts_with("GPU-") || uuid.starts_with("MIG-")
}

/// How a GPU is named in reasons: its UUID, or `GPU <index>` without one.
fn gpu_name(index: u32, gpu: Option<&GpuInfo>) -> String {
    match gpu.filter(|g| !g.uuid.is_empty()) {
        Some(g) => g.uuid.clone(),
        None => format!("GPU {index}"),
    }
}

fn visible_devices(host: Option<&Node>, host_gpus: &[u32]) -> EnvDecision {
    if host_gpus.is_empty() {
        return EnvDecision::set(
            CUDA_VISIBLE_DEVICES,
            String::new(),
            "the job holds no GPU on this host: the empty list hides every GPU".to_owned(),
        );
    }
    let gpus: Vec<Option<&GpuInfo>> = host_gpus
        .iter()
        .map(|i| host.and_then(|h| h.resources.gpus.iter().find(|g| g.index == *i)))
        .collect();
    let n = host_gpus.len();
    let what = if n == 1 {
        "the job's GPU".to_owned()
    } else {
        format!("the job's {n} GPUs")
    };
    if gpus
        .iter()
        .all(|g| g.is_some_and(|g| is_cuda_uuid(&g.uuid)))
    {
        let uuids: Vec<&str> = gpus.iter().flatten().map(|g| g.uuid.as_str()).collect();
        return EnvDecision::set(
            CUDA_VISIBLE_DEVICES,
            uuids.join(","),
            format!(
                "{what} on this host, by UUID (an ordinal would name other GPUs where the agent runs with CUDA_VISIBLE_DEVICES set)"
            ),
        );
    }
    let declared = gpus
        .iter()
        .flatten()
        .any(|g| g.uuid.starts_with("declared-gpu-"));
    let why = if declared {
        "declared GPUs (agent --gpus) have no UUID CUDA knows"
    } else {
        "the agent reported no CUDA UUID for every one of them"
    };
    EnvDecision::set(
        CUDA_VISIBLE_DEVICES,
        host_gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        format!("{what} on this host, by the agent's index: {why}"),
    )
}

/// The NCCL variables of a GPU rank on `host`.
fn nccl(input: &RankInput, host: &Node) -> Vec<EnvDecision> {
    let mut decisions = vec![socket_ifname(host)];
    match input.gang {
        GangFabric::NoRdma => {}
        GangFabric::Split(hosts) => decisions.push(EnvDecision::set(
            NCCL_IB_DISABLE,
            "1".to_owned(),
            format!(
                "the gang's hosts share no RDMA fabric ({hosts}): NCCL's IB transport could not connect them, so NCCL uses TCP sockets"
            ),
        )),
        GangFabric::Shared(fabric) => {
            let (hca, ports) = ib_hca(&host.resources, input.host_gpus, *fabric);
            decisions.push(hca);
            if *fabric == Fabric::Roce {
                decisions.push(if input.job_env.contains_key(NCCL_IB_HCA) {
                    EnvDecision::unset(
                        NCCL_IB_GID_INDEX,
                        "the job's launch.env chooses the ports (NCCL_IB_HCA), so their GID index is left to NCCL".to_owned(),
                    )
                } else {
                    gid_index(&ports)
                });
            }
        }
    }
    decisions
}

fn socket_ifname(host: &Node) -> EnvDecision {
    let interface = host.resources.advertised_interface.trim();
    if interface.is_empty() {
        return EnvDecision::unset(
            NCCL_SOCKET_IFNAME,
            format!(
                "the agent did not report which interface holds its address {}; NCCL picks one",
                host.address
            ),
        );
    }
    EnvDecision::set(
        NCCL_SOCKET_IFNAME,
        format!("={interface}"),
        format!(
            "the interface holding this host's advertised address {}",
            host.address
        ),
    )
}

/// One ACTIVE port of the gang's fabric: (device name, port).
type Port<'a> = (&'a str, &'a RdmaPortInfo);

fn port_names(ports: &[Port]) -> String {
    ports
        .iter()
        .map(|(device, p)| format!("{device}:{}", p.port))
        .collect::<Vec<_>>()
        .join(",")
}

/// `NCCL_IB_HCA`: the ACTIVE ports of `fabric` on the devices nearest the job's GPUs on the host
/// (`host_gpus`, all of them: every local rank must get the same list, or NCCL's rings over the
/// host's ranks name NICs some ranks do not have, NVIDIA/nccl#1478), or every ACTIVE port of
/// `fabric` when discovery reported no affinity; also returns the ports chosen.
fn ib_hca<'a>(
    host: &'a NodeResources,
    host_gpus: &[u32],
    fabric: Fabric,
) -> (EnvDecision, Vec<Port<'a>>) {
    let active: Vec<Port> = host
        .rdma_devices
        .iter()
        .flat_map(|d| d.ports.iter().map(move |p| (d.name.as_str(), p)))
        .filter(|(_, p)| port_fabric(p) == Some(fabric))
        .collect();
    let serves = |device: &str| active.iter().any(|(d, _)| *d == device);
    // Per GPU of the job on this host: the devices of the fabric at its nearest link.
    let mut nearest: Vec<&str> = Vec::new();
    let mut near_gpus: Vec<String> = Vec::new();
    let mut without: Vec<String> = Vec::new();
    for &index in host_gpus {
        let gpu = host.gpus.iter().find(|g| g.index == index);
        let affinity = gpu.map_or(&[][..], |g| g.nic_affinity.as_slice());
        let best: Option<PcieLink> = affinity
            .iter()
            .filter(|a| serves(&a.rdma_device))
            .map(|a| a.link)
            .min();
        let Some(best) = best else {
            without.push(gpu_name(index, gpu));
            continue;
        };
        for a in affinity
            .iter()
            .filter(|a| a.link == best && serves(&a.rdma_device))
        {
            if !nearest.contains(&a.rdma_device.as_str()) {
                nearest.push(&a.rdma_device);
            }
        }
        near_gpus.push(format!("{} ({best})", gpu_name(index, gpu)));
    }
    let kind = fabric.describe();
    let (ports, why): (Vec<Port>, String) = if without.is_empty() && !nearest.is_empty() {
        let ports: Vec<Port> = nearest
            .iter()
            .flat_map(|n| active.iter().filter(move |(d, _)| d == n).copied())
            .collect();
        let noun = if ports.len() == 1 { "port" } else { "ports" };
        let why = format!("the ACTIVE {kind} {noun} nearest {}", near_gpus.join(", "));
        (ports, why)
    } else {
        let whose = if without.is_empty() {
            "the job's GPUs".to_owned()
        } else {
            without.join(", ")
        };
        (
            active.clone(),
            format!(
                "every ACTIVE {kind} port of this host: discovery reported no GPU-to-NIC affinity to them for {whose}"
            ),
        )
    };
    let names = port_names(&ports);
    (
        EnvDecision::set(NCCL_IB_HCA, format!("={names}"), why),
        ports,
    )
}

/// Whether a GID table entry's type is RoCE v2.
fn is_roce_v2(kind: &str) -> bool {
    kind.trim().eq_ignore_ascii_case("RoCE v2")
}

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`), if it is one.
fn ipv4_mapped(gid: &str) -> Option<std::net::Ipv4Addr> {
    gid.parse::<Ipv6Addr>().ok()?.to_ipv4_mapped()
}

/// `NCCL_IB_GID_INDEX` for RoCE `ports`: an index that is RoCE v2 on every port, preferring one
/// whose GIDs are IPv4-mapped on every port, then the lowest.
fn gid_index(ports: &[Port]) -> EnvDecision {
    let Some((_, first)) = ports.first() else {
        return EnvDecision::unset(
            NCCL_IB_GID_INDEX,
            "no ACTIVE RoCE port was chosen".to_owned(),
        );
    };
    let v2_at = |p: &RdmaPortInfo, index: u32| {
        p.gids
            .iter()
            .find(|g| g.index == index && is_roce_v2(&g.kind))
            .map(|g| g.gid.clone())
    };
    let mut candidates: Vec<(bool, u32, Vec<String>)> = first
        .gids
        .iter()
        .filter(|g| is_roce_v2(&g.kind))
        .filter_map(|g| {
            let gids: Option<Vec<String>> = ports.iter().map(|(_, p)| v2_at(p, g.index)).collect();
            let gids = gids?;
            let mapped = gids.iter().all(|gid| ipv4_mapped(gid).is_some());
            Some((!mapped, g.index, gids))
        })
        .collect();
    candidates.sort();
    let names = port_names(ports);
    let Some((not_mapped, index, gids)) = candidates.into_iter().next() else {
        return EnvDecision::unset(
            NCCL_IB_GID_INDEX,
            format!("no GID index is RoCE v2 on every chosen port ({names}); NCCL picks one"),
        );
    };
    let per_port: Vec<String> = ports
        .iter()
        .zip(&gids)
        .map(|((device, p), gid)| match ipv4_mapped(gid) {
            Some(v4) => format!("{device}:{} ::ffff:{v4}", p.port),
            None => format!("{device}:{} {gid}", p.port),
        })
        .collect();
    let what = if not_mapped {
        "a RoCE v2 GID (none is an IPv4-mapped one on every port)"
    } else {
        "a RoCE v2 GID with an IPv4-mapped address"
    };
    EnvDecision::set(
        NCCL_IB_GID_INDEX,
        index.to_string(),
        format!("{what} on {}", per_port.join(", ")),
    )
}

#[cfg(test)]
mod tests;
