//! The gang scheduler: a pure function from a cluster snapshot and a job's needs to a placement.
//!
//! Stages, as in Nomad's scheduler: keep the nodes where one node's share of the gang fits (feasible),
//! rank them by best fit (fewest GPUs, then CPUs, then bytes of memory left over, so big holes stay
//! whole for big jobs), then take all the nodes the gang needs or none. No IO, no clock: the leader calls
//! it on a snapshot and re-checks the plan when it commits it (see `State::apply`).

use serde::{Deserialize, Serialize};
use trainctl_jobs::Resources;

use crate::state::NodeId;

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

    let needed = res.nodes as usize;
    let mut feasible: Vec<&NodeCapacity> =
        cluster.nodes.iter().filter(|n| fits_now(n, res)).collect();
    let with_port = feasible.iter().any(|n| n.free_port.is_some());
    if feasible.len() < needed || !with_port {
        let up = cluster.nodes.iter().filter(|n| n.up).count();
        let mut why = format!(
            "needs {} with {}; {} {} them now ({} up)",
            hosts(needed),
            describe_share(res),
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
        }
    }

    /// `name:free_gpus/total_gpus:free_cpus/total_cpus`, up, with a port.
    fn node(spec: &str) -> NodeCapacity {
        let parts: Vec<&str> = spec.split(':').collect();
        let (fg, tg) = parts[1].split_once('/').unwrap();
        let (fc, tc) = parts[2].split_once('/').unwrap();
        let (fg, tg): (u32, u32) = (fg.parse().unwrap(), tg.parse().unwrap());
        NodeCapacity {
            node: NodeId(parts[0].to_string()),
            up: !spec.ends_with(":down"),
            total_gpus: tg,
            total_cpus: tc.parse().unwrap(),
            total_memory_mib: 1 << 20,
            free_gpus: (tg - fg..tg).collect(),
            free_cpus: fc.parse().unwrap(),
            free_memory_mib: 1 << 20,
            free_port: if spec.ends_with(":noport") {
                None
            } else {
                Some(29500)
            },
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
    fn large_cluster_places_exactly_the_gang() {
        let nodes: Vec<String> = (0..2000).map(|i| format!("n{i:05}:8/8:64/64")).collect();
        let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let p = plan(&cluster(&refs), &res(64, 8, 16)).unwrap();
        assert_eq!(p.nodes.len(), 64);
        let unique: std::collections::BTreeSet<_> = p.nodes.iter().map(|n| &n.node).collect();
        assert_eq!(unique.len(), 64);
    }
}
