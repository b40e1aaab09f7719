//! The gang scheduler: a pure function from a cluster snapshot and a job's needs to a placement.
//!
//! Stages, as in Nomad's scheduler: keep the nodes where one node's share of the gang fits (feasible),
//! rank them by best fit (fewest GPUs, then CPUs, then bytes of memory left over, so big holes stay
//! whole for big jobs), then take all the nodes the gang needs or none. No IO, no clock: the leader calls
//! it on a snapshot and re-checks the plan when it commits it (see `State::apply`).
//!
//! A job's `[resources] fabric` ([`Fabric`]) is a feasibility filter: `"ib"` keeps the hosts with an
//! ACTIVE InfiniBand port, `"roce"` those with an ACTIVE RoCE (Ethernet link layer) port
//! ([`HostFabrics`]), so every host of such a gang shares that fabric; `"any"` filters nothing. A host
//! lacking the fabric may gain it (a port comes up, the agent registers again), so a job it keeps out
//! waits with the reason ([`Unschedulable::NoRoomNow`]) rather than failing.

use serde::{Deserialize, Serialize};
use trainctl_jobs::{Fabric, Resources};

use crate::state::{JobId, NodeId, RdmaDeviceInfo, RdmaPortInfo, State};

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node: NodeId,
    pub up: bool,
    pub total_gpus: u32,
    pub total_cpus: u32,
    pub total_memory_mib: u64,
    /// Indices of the GPUs no job holds, ascending.
    pub free_gpus: Vec<u32>,
    pub free_cpus: u32,
    pub free_memory_mib: u64,
    /// A port this node can lease to a job's rendezvous, if any is left.
    pub free_port: Option<u16>,
    /// The RDMA fabrics the node has an ACTIVE port on.
    pub fabrics: HostFabrics,
    /// Why the node failed its agent's pre-flight checks; such a node gets no placement.
    pub unhealthy: Option<String>,
}

/// The RDMA fabrics a host can use: the link layers it has an ACTIVE port with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HostFabrics {
    /// An ACTIVE port with link layer `InfiniBand`.
    pub ib: bool,
    /// An ACTIVE port with link layer `Ethernet` (RoCE).
    pub roce: bool,
}

/// The fabric a port serves, if it is ACTIVE: `InfiniBand` is [`Fabric::Ib`], `Ethernet` is
/// [`Fabric::Roce`]; `None` for a port that is not ACTIVE or has another link layer.
pub fn port_fabric(port: &RdmaPortInfo) -> Option<Fabric> {
    if !port.state.trim().eq_ignore_ascii_case("ACTIVE") {
        return None;
    }
    let layer = port.link_layer.trim();
    if layer.eq_ignore_ascii_case("InfiniBand") {
        Some(Fabric::Ib)
    } else if layer.eq_ignore_ascii_case("Ethernet") {
        Some(Fabric::Roce)
    } else {
        None
    }
}

impl HostFabrics {
    /// The fabrics of a host's RDMA devices (`NodeResources::rdma_devices`).
    pub fn of(devices: &[RdmaDeviceInfo]) -> HostFabrics {
        let mut fabrics = HostFabrics::default();
        for port in devices.iter().flat_map(|d| &d.ports) {
            match port_fabric(port) {
                Some(Fabric::Ib) => fabrics.ib = true,
                Some(Fabric::Roce) => fabrics.roce = true,
                Some(Fabric::Any) | None => {}
            }
        }
        fabrics
    }

    /// Whether a job asking for `fabric` may run here (always, for [`Fabric::Any`]).
    pub fn has(self, fabric: Fabric) -> bool {
        match fabric {
            Fabric::Any => true,
            Fabric::Ib => self.ib,
            Fabric::Roce => self.roce,
        }
    }

    /// In words: "InfiniBand", "RoCE", "InfiniBand and RoCE", or "no ACTIVE RDMA port".
    pub fn describe(self) -> &'static str {
        match (self.ib, self.roce) {
            (true, true) => "InfiniBand and RoCE",
            (true, false) => "InfiniBand",
            (false, true) => "RoCE",
            (false, false) => "no ACTIVE RDMA port",
        }
    }
}

/// Every node of the cluster, as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    pub nodes: Vec<NodeCapacity>,
}

/// One node's share of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlacement {
    pub node: NodeId,
    pub gpus: Vec<u32>,
}

/// Where every rank of a gang goes. The first node hosts group rank 0 and the rendezvous port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub nodes: Vec<NodePlacement>,
    pub master_port: u16,
}

/// Why a gang cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unschedulable {
    /// Not now: too few nodes have room, but enough would if other jobs ended.
    #[error("{0}")]
    NoRoomNow(String),
    /// Never: even an empty cluster of today's nodes could not hold it.
    #[error("{0}")]
    NeverFits(String),
}

/// What one node needs to hold one node's share of the gang, in words: "8 GPUs, 16 CPUs".
fn describe_share(res: &Resources) -> String {
    let mut parts = Vec::new();
    if res.gpus_per_node > 0 {
        parts.push(count(res.gpus_per_node, "free GPU"));
    }
    parts.push(count(res.cpus_per_node, "free CPU"));
    if res.memory_per_node_mib > 0 {
        parts.push(format!("{} MiB free memory", res.memory_per_node_mib));
    }
    parts.join(", ")
}

/// "1 free GPU", "8 free GPUs".
fn count(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn hosts(n: usize) -> String {
    count(n as u32, "host")
}

/// [`describe_share`] plus the fabric a host needs, if any: "8 free GPUs, 8 free CPUs, an ACTIVE
/// InfiniBand port".
fn describe_needs(res: &Resources) -> String {
    let share = describe_share(res);
    match res.fabric {
        Fabric::Any => share,
        f => format!("{share}, an ACTIVE {} port", f.describe()),
    }
}

/// Why too few of the up hosts that are large enough have the job's fabric (None when enough have):
/// how many have it, and what the others have instead.
fn fabric_shortage(cluster: &ClusterSnapshot, res: &Resources) -> Option<String> {
    if res.fabric == Fabric::Any {
        return None;
    }
    let needed = res.nodes as usize;
    let large: Vec<&NodeCapacity> = cluster
        .nodes
        .iter()
        .filter(|n| n.up && fits_empty(n.size(), res))
        .collect();
    let with = large.iter().filter(|n| n.fabrics.has(res.fabric)).count();
    if with >= needed {
        return None;
    }
    // What the large enough hosts without the fabric have, e.g. "2 with no ACTIVE RDMA port".
    let mut others: Vec<(&str, usize)> = Vec::new();
    for n in large.iter().filter(|n| !n.fabrics.has(res.fabric)) {
        let what = n.fabrics.describe();
        match others.iter_mut().find(|(w, _)| *w == what) {
            Some((_, k)) => *k += 1,
            None => others.push((what, 1)),
        }
    }
    let others: Vec<String> = others
        .iter()
        .map(|(what, k)| match *what {
            "no ACTIVE RDMA port" => format!("{k} with no ACTIVE RDMA port"),
            what => format!("{k} with {what} only"),
        })
        .collect();
    Some(format!(
        "fabric = \"{}\": needs {} with an ACTIVE {} port and {}; {} of the {} up that large {} one{}",
        res.fabric,
        hosts(needed),
        res.fabric.describe(),
        describe_share(res).replace("free ", ""),
        with,
        hosts(large.len()),
        if with == 1 { "has" } else { "have" },
        if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        }
    ))
}

/// The up hosts that failed their pre-flight, with the first one's reason: "; 1 host failed its
/// pre-flight (node-2: gpu-copy on GPU-...: ...)"; empty when none did.
fn unhealthy_hosts(cluster: &ClusterSnapshot) -> String {
    let mut failed = cluster
        .nodes
        .iter()
        .filter(|n| n.up)
        .filter_map(|n| Some((&n.node, n.unhealthy.as_ref()?)));
    let Some((first, reason)) = failed.next() else {
        return String::new();
    };
    let count = 1 + failed.count();
    format!(
        "; {} failed {} pre-flight checks ({first}: {reason})",
        hosts(count),
        if count == 1 { "its" } else { "their" }
    )
}

/// How big a node is when empty: all that "could this job ever fit?" needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSize {
    pub gpus: u32,
    pub cpus: u32,
    pub memory_mib: u64,
}

impl NodeCapacity {
    /// The node's size when empty.
    pub fn size(&self) -> NodeSize {
        NodeSize {
            gpus: self.total_gpus,
            cpus: self.total_cpus,
            memory_mib: self.total_memory_mib,
        }
    }
}

fn fits_empty(node: NodeSize, res: &Resources) -> bool {
    node.gpus >= res.gpus_per_node
        && node.cpus >= res.cpus_per_node
        && node.memory_mib >= res.memory_per_node_mib
}

fn fits_now(node: &NodeCapacity, res: &Resources) -> bool {
    node.up
        && node.unhealthy.is_none()
        && node.fabrics.has(res.fabric)
        && node.free_gpus.len() as u64 >= u64::from(res.gpus_per_node)
        && node.free_cpus >= res.cpus_per_node
        && node.free_memory_mib >= res.memory_per_node_mib
}

/// `res` with an exact host count of `nodes`.
fn sized(res: &Resources, nodes: u32) -> Resources {
    Resources {
        nodes,
        min_nodes: nodes,
        ..res.clone()
    }
}

/// Checks that a gang could run on this cluster if it were empty (used to refuse a job at submission).
/// An elastic gang needs its minimum.
pub fn check_ever_fits(
    nodes: impl IntoIterator<Item = NodeSize>,
    res: &Resources,
) -> Result<(), Unschedulable> {
    let (min, _) = res.node_range();
    never_fits_reason(nodes, &sized(res, min))
        .map_or(Ok(()), |why| Err(Unschedulable::NeverFits(why)))
}

/// Why the gang could not run on `nodes` even if they were all empty; None when it could.
fn never_fits_reason(nodes: impl IntoIterator<Item = NodeSize>, res: &Resources) -> Option<String> {
    let needed = res.nodes as usize;
    let (mut total, mut capable, mut max_gpus) = (0usize, 0usize, 0u32);
    for n in nodes {
        total += 1;
        capable += usize::from(fits_empty(n, res));
        max_gpus = max_gpus.max(n.gpus);
    }
    if capable >= needed {
        return None;
    }
    let mut why = format!(
        "the job needs {} with {} each; the cluster has {} in all and {} of them {} that large",
        hosts(needed),
        describe_share(res).replace("free ", ""),
        hosts(total),
        capable,
        if capable == 1 { "is" } else { "are" },
    );
    if total > 0 && res.gpus_per_node > max_gpus {
        why.push_str(&format!(" (the most GPUs on one host is {max_gpus})"));
    }
    Some(why)
}

/// Places every rank of a gang at once, or explains why it cannot. An elastic gang (`nodes = "MIN:MAX"`)
/// gets as many hosts as fit now, at least MIN.
pub fn plan(cluster: &ClusterSnapshot, res: &Resources) -> Result<Placement, Unschedulable> {
    let (min, max) = res.node_range();
    if min >= max {
        return plan_exact(cluster, &sized(res, max));
    }
    match plan_exact(cluster, &sized(res, max)) {
        Ok(p) => return Ok(p),
        Err(Unschedulable::NeverFits(_)) => {}
        Err(Unschedulable::NoRoomNow(_)) => {}
    }
    // Fewer: start from as many hosts as have room now.
    let with_room = cluster.nodes.iter().filter(|n| fits_now(n, res)).count() as u32;
    let mut last = None;
    for n in (min..=with_room.min(max - 1).max(min)).rev() {
        match plan_exact(cluster, &sized(res, n)) {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("the range holds at least min"))
}

fn plan_exact(cluster: &ClusterSnapshot, res: &Resources) -> Result<Placement, Unschedulable> {
    if let Some(why) = never_fits_reason(cluster.nodes.iter().map(NodeCapacity::size), res) {
        return Err(Unschedulable::NeverFits(why));
    }
    if never_fits_reason(
        cluster
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(NodeCapacity::size),
        res,
    )
    .is_some()
    {
        // Down nodes may come back, so this is "not now" rather than "never".
        return Err(Unschedulable::NoRoomNow(format!(
            "the job needs {} with {}; too few of the hosts that could hold it are up",
            hosts(res.nodes as usize),
            describe_share(res).replace("free ", "")
        )));
    }

    if let Some(why) = fabric_shortage(cluster, res) {
        return Err(Unschedulable::NoRoomNow(why));
    }

    let needed = res.nodes as usize;
    let mut feasible: Vec<&NodeCapacity> =
        cluster.nodes.iter().filter(|n| fits_now(n, res)).collect();
    let with_port = feasible.iter().any(|n| n.free_port.is_some());
    if feasible.len() < needed || !with_port {
        let up = cluster.nodes.iter().filter(|n| n.up).count();
        let mut why = format!(
            "needs {} with {}; {} {} them now ({} up)",
            hosts(needed),
            describe_needs(res),
            feasible.len(),
            if feasible.len() == 1 { "has" } else { "have" },
            hosts(up)
        );
        if feasible.len() >= needed {
            why = format!(
                "no host with room has a free rendezvous port ({} up)",
                hosts(up)
            );
        }
        why.push_str(&unhealthy_hosts(cluster));
        return Err(Unschedulable::NoRoomNow(why));
    }

    // Best fit: the least room left over after placing this share, so large holes survive.
    let leftover = |n: &NodeCapacity| {
        (
            n.free_gpus.len() as u64 - u64::from(res.gpus_per_node),
            n.free_cpus - res.cpus_per_node,
            n.free_memory_mib - res.memory_per_node_mib,
        )
    };
    let order = |a: &&NodeCapacity, b: &&NodeCapacity| {
        leftover(a)
            .cmp(&leftover(b))
            .then_with(|| a.node.cmp(&b.node))
    };
    if feasible.len() > needed {
        feasible.select_nth_unstable_by(needed - 1, order);
        feasible.truncate(needed);
    }
    feasible.sort_by(order);
    // Group rank 0 hosts the rendezvous: the best-fitting node that has a port to lease.
    let (first, master_port) = match feasible.iter().position(|n| n.free_port.is_some()) {
        Some(i) => (i, feasible[i].free_port.expect("position checked it")),
        None => {
            // The chosen nodes have no port, but another feasible node has: swap it in.
            let spare = cluster
                .nodes
                .iter()
                .filter(|n| fits_now(n, res) && n.free_port.is_some())
                .find(|n| !feasible.iter().any(|f| f.node == n.node))
                .ok_or_else(|| {
                    Unschedulable::NoRoomNow("no host with room has a free rendezvous port".into())
                })?;
            feasible[needed - 1] = spare;
            (needed - 1, spare.free_port.expect("filtered"))
        }
    };
    feasible.swap(0, first);
    let nodes = feasible
        .iter()
        .map(|n| NodePlacement {
            node: n.node.clone(),
            gpus: n.free_gpus[..res.gpus_per_node as usize].to_vec(),
        })
        .collect();
    Ok(Placement { nodes, master_port })
}

/// What the leader's scheduling pass does next with the head of the queue. First come, first
/// served: the head is placed whole or the queue waits, so a gang is never starved by smaller jobs
/// behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueHead {
    /// Nothing to do: no job waits, or the head is a restarting gang whose previous attempt still
    /// holds hosts that report (a heartbeat away; hosts that were lost do not hold it up).
    Idle,
    /// The head does not fit now: the queue waits for room.
    NoRoomNow,
    /// Place the head here.
    Place { job: JobId, placement: Placement },
    /// The head fit when it was submitted but can never fit the cluster as it is now (hosts were
    /// removed): fail it, so that it does not block the queue.
    Fail { job: JobId, reason: String },
}

/// The decision for the head of `state`'s queue, on the cluster as it is now.
pub fn queue_head(state: &State) -> QueueHead {
    let Some(head) = state.queue.front().and_then(|id| state.jobs.get(id)) else {
        return QueueHead::Idle;
    };
    if head.retired.iter().any(|r| !r.awaiting_agent) {
        return QueueHead::Idle;
    }
    match plan(&state.cluster_snapshot(), &head.spec.resources) {
        Ok(placement) => QueueHead::Place {
            job: head.id,
            placement,
        },
        Err(Unschedulable::NoRoomNow(_)) => QueueHead::NoRoomNow,
        Err(Unschedulable::NeverFits(why)) => QueueHead::Fail {
            job: head.id,
            reason: format!("can never run here any more: {why}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(nodes: u32, gpus: u32, cpus: u32) -> Resources {
        Resources {
            nodes,
            min_nodes: nodes,
            procs_per_node: gpus.max(1),
            gpus_per_node: gpus,
            cpus_per_node: cpus,
            memory_per_node_mib: 0,
            fabric: Fabric::Any,
        }
    }

    /// `name:free_gpus/total_gpus:free_cpus/total_cpus[:flag...]`, up, with a port and no RDMA
    /// port unless a flag says otherwise: `down`, `noport`, `ib` (an ACTIVE InfiniBand port),
    /// `roce` (an ACTIVE RoCE port), `unhealthy` (failed its pre-flight).
    fn node(spec: &str) -> NodeCapacity {
        let parts: Vec<&str> = spec.split(':').collect();
        let flags = &parts[3..];
        let (fg, tg) = parts[1].split_once('/').unwrap();
        let (fc, tc) = parts[2].split_once('/').unwrap();
        let (fg, tg): (u32, u32) = (fg.parse().unwrap(), tg.parse().unwrap());
        NodeCapacity {
            node: NodeId(parts[0].to_string()),
            up: !flags.contains(&"down"),
            total_gpus: tg,
            total_cpus: tc.parse().unwrap(),
            total_memory_mib: 1 << 20,
            free_gpus: (tg - fg..tg).collect(),
            free_cpus: fc.parse().unwrap(),
            free_memory_mib: 1 << 20,
            free_port: if flags.contains(&"noport") {
                None
            } else {
                Some(29500)
            },
            fabrics: HostFabrics {
                ib: flags.contains(&"ib"),
                roce: flags.contains(&"roce"),
            },
            unhealthy: flags
                .contains(&"unhealthy")
                .then(|| format!("gpu-copy on GPU-{}: injected", parts[0])),
        }
    }

    fn cluster(specs: &[&str]) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: specs.iter().map(|s| node(s)).collect(),
        }
    }

    fn placed(p: &Placement) -> Vec<&str> {
        p.nodes.iter().map(|n| n.node.0.as_str()).collect()
    }

    /// (cluster, job nodes, GPUs per node, CPUs per node, expected nodes or words of the refusal)
    type Case = (
        &'static [&'static str],
        u32,
        u32,
        u32,
        Result<&'static [&'static str], &'static str>,
    );

    #[test]
    fn placement_table() {
        // (cluster, job nodes, gpus/node, cpus/node, expected nodes or the words of the refusal)
        let cases: &[Case] = &[
            (&["a:8/8:64/64", "b:8/8:64/64"], 2, 8, 8, Ok(&["a", "b"])),
            // best fit: b has exactly 4 free, a has 8: the 4-GPU job goes to b
            (&["a:8/8:64/64", "b:4/8:64/64"], 1, 4, 8, Ok(&["b"])),
            // all or nothing: only one of the two nodes has room
            (
                &["a:8/8:64/64", "b:2/8:64/64"],
                2,
                8,
                8,
                Err("needs 2 hosts with 8 free GPUs, 8 free CPUs; 1 has them now (2 hosts up)"),
            ),
            (
                &["a:8/8:64/64", "b:8/8:64/64"],
                3,
                8,
                8,
                Err("cluster has 2 hosts in all"),
            ),
            (
                &["a:8/8:64/64"],
                1,
                16,
                8,
                Err("the most GPUs on one host is 8"),
            ),
            // a down node does not take ranks, but may come back
            (
                &["a:8/8:64/64", "b:8/8:64/64:down"],
                2,
                8,
                8,
                Err("too few of the hosts that could hold it are up"),
            ),
            (
                &["a:0/0:4/4", "b:0/0:4/4", "c:0/0:2/4"],
                2,
                0,
                4,
                Ok(&["a", "b"]),
            ),
            (&["a:0/0:4/4", "b:0/0:1/4"], 1, 0, 2, Ok(&["a"])),
            // group rank 0 must sit on a node with a free port
            (&["a:0/0:4/4:noport", "b:0/0:4/4"], 2, 0, 4, Ok(&["b", "a"])),
            (&["a:0/0:4/4:noport"], 1, 0, 4, Err("free rendezvous port")),
            // a host that failed its pre-flight takes no ranks, even the best fit; the refusal
            // names it and why
            (&["a:4/8:64/64:unhealthy", "b:8/8:64/64"], 1, 4, 8, Ok(&["b"])),
            (
                &["a:8/8:64/64:unhealthy", "b:8/8:64/64"],
                2,
                8,
                8,
                Err("1 has them now (2 hosts up); 1 host failed its pre-flight checks (a: gpu-copy on GPU-a: injected)"),
            ),
            (
                &["a:8/8:64/64:unhealthy", "b:8/8:64/64:unhealthy"],
                1,
                8,
                8,
                Err("0 have them now (2 hosts up); 2 hosts failed their pre-flight checks (a: "),
            ),
        ];
        for (i, (nodes, n, g, c, expected)) in cases.iter().enumerate() {
            let got = plan(&cluster(nodes), &res(*n, *g, *c));
            match (expected, &got) {
                (Ok(want), Ok(p)) => assert_eq!(placed(p), *want, "case {i}"),
                (Err(words), Err(e)) => {
                    assert!(
                        e.to_string().contains(words),
                        "case {i}: {e} lacks {words:?}"
                    )
                }
                _ => panic!("case {i}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn gpus_given_are_free_ones() {
        let mut c = cluster(&["a:8/8:64/64"]);
        c.nodes[0].free_gpus = vec![1, 3, 4, 6];
        let p = plan(&c, &res(1, 2, 1)).unwrap();
        assert_eq!(p.nodes[0].gpus, vec![1, 3]);
    }

    #[test]
    fn never_fits_versus_not_now() {
        let c = cluster(&["a:0/8:64/64", "b:0/8:64/64"]);
        assert!(matches!(
            plan(&c, &res(2, 8, 8)),
            Err(Unschedulable::NoRoomNow(_))
        ));
        assert!(matches!(
            plan(&c, &res(3, 8, 8)),
            Err(Unschedulable::NeverFits(_))
        ));
    }

    #[test]
    fn fabric_table() {
        use Fabric::{Any, Ib, Roce};
        /// (cluster, job nodes, fabric, expected nodes or the words of the refusal)
        type FabricCase = (
            &'static [&'static str],
            u32,
            Fabric,
            Result<&'static [&'static str], &'static str>,
        );
        let cases: &[FabricCase] = &[
            // "any" keeps today's behaviour: fabrics are not looked at.
            (&["a:8/8:64/64", "b:8/8:64/64:roce"], 2, Any, Ok(&["a", "b"])),
            (&["a:8/8:64/64:ib", "b:8/8:64/64:ib"], 2, Ib, Ok(&["a", "b"])),
            // Only the InfiniBand hosts take an "ib" job, even when another fits better.
            (
                &["a:8/8:64/64:ib", "b:8/8:64/64:roce", "c:8/8:64/64:ib"],
                2,
                Ib,
                Ok(&["a", "c"]),
            ),
            (
                &["a:8/8:64/64:ib", "b:8/8:64/64:roce", "c:8/8:64/64:roce"],
                2,
                Roce,
                Ok(&["b", "c"]),
            ),
            // A host with both fabrics serves either; the gang still shares the one asked for.
            (
                &["a:8/8:64/64:ib:roce", "b:8/8:64/64:roce"],
                2,
                Roce,
                Ok(&["a", "b"]),
            ),
            (
                &["a:8/8:64/64:ib:roce", "b:8/8:64/64:roce"],
                2,
                Ib,
                Err("fabric = \"ib\": needs 2 hosts with an ACTIVE InfiniBand port and 8 GPUs, 8 CPUs; 1 of the 2 hosts up that large has one (1 with RoCE only)"),
            ),
            // No RDMA at all (this machine's agents): the job waits, saying why.
            (
                &["a:8/8:64/64", "b:8/8:64/64"],
                1,
                Ib,
                Err("fabric = \"ib\": needs 1 host with an ACTIVE InfiniBand port and 8 GPUs, 8 CPUs; 0 of the 2 hosts up that large have one (2 with no ACTIVE RDMA port)"),
            ),
            // Hosts too small do not count among those lacking the fabric.
            (
                &["a:8/8:64/64:roce", "b:2/2:64/64:ib", "c:8/8:64/64"],
                1,
                Ib,
                Err("0 of the 2 hosts up that large have one (1 with RoCE only, 1 with no ACTIVE RDMA port)"),
            ),
            // A down host's fabric does not count.
            (
                &["a:8/8:64/64:ib:down", "b:8/8:64/64:ib"],
                2,
                Ib,
                Err("too few of the hosts that could hold it are up"),
            ),
            // Enough hosts have the fabric, but not room now: the fabric is in the words.
            (
                &["a:8/8:64/64:ib", "b:0/8:64/64:ib"],
                2,
                Ib,
                Err("needs 2 hosts with 8 free GPUs, 8 free CPUs, an ACTIVE InfiniBand port; 1 has them now"),
            ),
        ];
        for (i, (nodes, n, fabric, expected)) in cases.iter().enumerate() {
            let mut r = res(*n, 8, 8);
            r.fabric = *fabric;
            let got = plan(&cluster(nodes), &r);
            match (expected, &got) {
                (Ok(want), Ok(p)) => assert_eq!(placed(p), *want, "case {i}"),
                (Err(words), Err(e)) => {
                    assert!(matches!(e, Unschedulable::NoRoomNow(_)), "case {i}: {e:?}");
                    assert!(
                        e.to_string().contains(words),
                        "case {i}: {e} lacks {words:?}"
                    )
                }
                _ => panic!("case {i}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn elastic_gang_takes_only_hosts_of_its_fabric() {
        let c = cluster(&[
            "a:8/8:64/64:ib",
            "b:8/8:64/64",
            "c:8/8:64/64:ib",
            "d:8/8:64/64:roce",
        ]);
        let mut r = res(4, 8, 8);
        r.min_nodes = 1;
        r.fabric = Fabric::Ib;
        assert_eq!(placed(&plan(&c, &r).unwrap()), ["a", "c"]);
        r.fabric = Fabric::Roce;
        assert_eq!(placed(&plan(&c, &r).unwrap()), ["d"]);
    }

    #[test]
    fn host_fabrics_come_from_active_ports() {
        let port = |state: &str, link_layer: &str| RdmaPortInfo {
            port: 1,
            state: state.into(),
            link_layer: link_layer.into(),
            ..RdmaPortInfo::default()
        };
        let device = |ports: Vec<RdmaPortInfo>| RdmaDeviceInfo {
            name: "mlx5_0".into(),
            ports,
            ..RdmaDeviceInfo::default()
        };
        /// (the ports of each device, expected (ib, roce))
        type PortsCase = (Vec<Vec<RdmaPortInfo>>, (bool, bool));
        let cases: Vec<PortsCase> = vec![
            (vec![], (false, false)),
            (vec![vec![port("ACTIVE", "InfiniBand")]], (true, false)),
            (vec![vec![port("ACTIVE", "Ethernet")]], (false, true)),
            (vec![vec![port("DOWN", "InfiniBand")]], (false, false)),
            (vec![vec![port("INIT", "Ethernet")]], (false, false)),
            (vec![vec![port("ACTIVE", "")]], (false, false)),
            (
                vec![
                    vec![port("DOWN", "Ethernet"), port("ACTIVE", "InfiniBand")],
                    vec![port("ACTIVE", "Ethernet")],
                ],
                (true, true),
            ),
        ];
        for (i, (devices, (ib, roce))) in cases.into_iter().enumerate() {
            let devices: Vec<RdmaDeviceInfo> = devices.into_iter().map(device).collect();
            assert_eq!(
                HostFabrics::of(&devices),
                HostFabrics { ib, roce },
                "case {i}"
            );
        }
        let both = HostFabrics {
            ib: true,
            roce: true,
        };
        assert!(Fabric::ALL.iter().all(|f| both.has(*f)));
        let none = HostFabrics::default();
        assert!(none.has(Fabric::Any) && !none.has(Fabric::Ib) && !none.has(Fabric::Roce));
    }

    #[test]
    fn large_cluster_places_exactly_the_gang() {
        let nodes: Vec<String> = (0..2000).map(|i| format!("n{i:05}:8/8:64/64")).collect();
        let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let p = plan(&cluster(&refs), &res(64, 8, 16)).unwrap();
        assert_eq!(p.nodes.len(), 64);
        let unique: std::collections::BTreeSet<_> = p.nodes.iter().map(|n| &n.node).collect();
        assert_eq!(unique.len(), 64);
    }
}
