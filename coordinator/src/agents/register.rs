//! Registration's checks, pure: every field an agent reports is validated and bounded before it
//! reaches the state (what was wrong, which field, what is accepted), and a validated report becomes
//! the state's model of the host ([`node_resources`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tonic::Status;
use trainctl_proto::agent::{Gpu, HostResources, RdmaPort, RegisterRequest};

use crate::state::{
    GpuInfo, NicAffinity, NodeId, NodeResources, NodeStatus, PcieLink, RdmaDeviceInfo, RdmaGid,
    RdmaPortInfo,
};

/// Longest node name, in characters (a DNS label).
pub const NODE_NAME_CHARS_MAX: usize = 63;
/// Longest hostname an agent may report, in characters (a DNS name).
pub const HOSTNAME_CHARS_MAX: usize = 253;
/// Longest `instance_id` and `agent_version`, in characters.
pub const AGENT_ID_CHARS_MAX: usize = 128;
/// Longest GPU name or uuid, RDMA device name or port field, in characters.
pub const DEVICE_STRING_CHARS_MAX: usize = 128;
/// Longest description of how a host contains ranks (`resources.containment`), in characters.
pub const CONTAINMENT_CHARS_MAX: usize = 512;
/// Most GPUs one host may report.
pub const GPUS_PER_HOST_MAX: usize = 1024;
/// Most CPUs one host may report.
pub const CPUS_PER_HOST_MAX: u32 = 65_536;
/// Most memory one host may report, in MiB: 64 TiB.
pub const MEMORY_PER_HOST_MIB_MAX: u64 = 64 * 1024 * 1024;
/// Most memory one GPU may report, in MiB: 16 TiB.
pub const MEMORY_PER_GPU_MIB_MAX: u64 = 16 * 1024 * 1024;
/// Most RDMA devices one host may report.
pub const RDMA_DEVICES_PER_HOST_MAX: usize = 256;
/// Most ports one RDMA device may report.
pub const RDMA_PORTS_PER_DEVICE_MAX: usize = 256;
/// Most GIDs one RDMA port may report.
pub const RDMA_GIDS_PER_PORT_MAX: u32 = 65_536;
/// Most GID entries one RDMA port may list (`gids`; mlx5 tables hold 128 (InfiniBand) or 255
/// (RoCE) entries; an agent lists the first this many set ones).
pub const RDMA_GIDS_LISTED_PER_PORT_MAX: usize = 256;
/// Most NVLink peers one GPU may list (NVML has at most 18 links a GPU; peers are per link).
pub const NVLINK_PEERS_PER_GPU_MAX: usize = 64;
/// Highest NUMA node number a device may report (Linux's `MAX_NUMNODES` is at most 1024).
pub const NUMA_NODE_MAX: u32 = 1023;
/// Longest network interface name, in characters (Linux's `IFNAMSIZ` less the NUL).
pub const NETDEV_CHARS_MAX: usize = 15;
/// Longest GPU mode word (`mig_mode`, `ecc_mode`) or GID type, in characters.
pub const DEVICE_WORD_CHARS_MAX: usize = 32;

/// What a PCI bus id may be, for refusals.
const PCI_BUS_ID_ACCEPTED: &str = "empty, or `dddd:bb:dd.f` in lowercase hex as sysfs writes it \
     (domain of 4 to 8 digits, device 00-1f, function 0-7), e.g. `0000:1b:00.0`";

/// Why `id` is not a PCI bus id as sysfs names devices (`0000:1b:00.0`, lowercase); `None` when
/// it is one. The agent turns NVML's `00000000:1B:00.0` into this form.
pub fn pci_bus_id_problem(id: &str) -> Option<&'static str> {
    let hex = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    };
    let Some((domain, rest)) = id.split_once(':') else {
        return Some("has no `:` after the domain");
    };
    let Some((bus, rest)) = rest.split_once(':') else {
        return Some("has no `:` after the bus");
    };
    let Some((device, function)) = rest.split_once('.') else {
        return Some("has no `.` before the function");
    };
    if !(4..=8).contains(&domain.len()) || !hex(domain) {
        return Some("has a domain that is not 4 to 8 lowercase hex digits");
    }
    if bus.len() != 2 || !hex(bus) {
        return Some("has a bus that is not 2 lowercase hex digits");
    }
    if device.len() != 2
        || !hex(device)
        || u8::from_str_radix(device, 16).map_or(true, |d| d > 0x1f)
    {
        return Some("has a device that is not 2 lowercase hex digits from 00 to 1f");
    }
    if function.len() != 1 || !('0'..='7').contains(&function.chars().next().unwrap_or('x')) {
        return Some("has a function that is not one digit from 0 to 7");
    }
    None
}

/// Checks an optional PCI bus id field ([`pci_bus_id_problem`]).
pub(super) fn pci_bus_id_field(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Ok(());
    }
    match pci_bus_id_problem(id) {
        None => Ok(()),
        Some(problem) => Err(Status::invalid_argument(format!(
            "{field} `{}` {problem} (accepted: {PCI_BUS_ID_ACCEPTED})",
            escape_for_message(id, 64)
        ))),
    }
}

/// Checks an optional NUMA node field.
pub(super) fn numa_node_field(field: &str, node: Option<u32>) -> Result<(), Status> {
    match node {
        Some(n) if n > NUMA_NODE_MAX => Err(Status::invalid_argument(format!(
            "{field} is {n} (accepted: absent, or 0 to {NUMA_NODE_MAX})"
        ))),
        _ => Ok(()),
    }
}

/// Checks a network interface name: empty, or 1 to [`NETDEV_CHARS_MAX`] printable ASCII
/// characters without `/`, `:` or spaces (what Linux accepts in a name).
pub(super) fn netdev_field(field: &str, name: &str) -> Result<(), Status> {
    printable_field(field, name, NETDEV_CHARS_MAX, true)?;
    if let Some(bad) = name.chars().find(|c| matches!(c, '/' | ':' | ' ')) {
        return Err(Status::invalid_argument(format!(
            "{field} `{}` has the character {bad:?} (accepted: empty, or a Linux interface name: \
             1 to {NETDEV_CHARS_MAX} printable ASCII characters without '/', ':' or spaces)",
            escape_for_message(name, 64)
        )));
    }
    Ok(())
}

/// Whether `gid` is a GID as sysfs writes it: eight groups of four lowercase hex digits.
pub(super) fn gid_is_well_formed(gid: &str) -> bool {
    let groups: Vec<&str> = gid.split(':').collect();
    groups.len() == 8
        && groups.iter().all(|g| {
            g.len() == 4
                && g.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        })
}

/// What a node name may be, for refusals.
const NODE_NAME_ACCEPTED: &str = "1 to 63 characters of a-z, 0-9, '.', '_' and '-', \
     starting and ending with a letter or digit";

/// Why `name` is not a node name: 1 to [`NODE_NAME_CHARS_MAX`] characters of `[a-z0-9._-]`,
/// starting and ending with a letter or digit. Uppercase is refused, not folded: the name is the
/// node's identity in every heartbeat, log line and allocation, so the coordinator does not
/// rename it behind the agent's back; the message names the lowercase form to pass instead.
pub fn node_name_problem(name: &str) -> Option<String> {
    let shown = escape_for_message(name, NODE_NAME_CHARS_MAX + 1);
    if name.is_empty() {
        return Some(format!(
            "node_name is empty (accepted: {NODE_NAME_ACCEPTED})"
        ));
    }
    if name.chars().count() > NODE_NAME_CHARS_MAX {
        return Some(format!(
            "node_name `{shown}` is {} characters long (accepted: {NODE_NAME_ACCEPTED}); \
             start the agent with --name <a shorter name>",
            name.chars().count()
        ));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    if name.chars().all(|c| allowed(c.to_ascii_lowercase()))
        && name.chars().any(|c| c.is_ascii_uppercase())
    {
        return Some(format!(
            "node_name `{shown}` has uppercase letters; node names are not folded to lowercase \
             (accepted: {NODE_NAME_ACCEPTED}); start the agent with --name {}",
            name.to_ascii_lowercase()
        ));
    }
    if let Some(bad) = name.chars().find(|&c| !allowed(c)) {
        return Some(format!(
            "node_name `{shown}` has the character {} (accepted: {NODE_NAME_ACCEPTED})",
            escape_for_message(&format!("{bad:?}"), 16)
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(name.chars().next()) || !edge_ok(name.chars().last()) {
        return Some(format!(
            "node_name `{shown}` starts or ends with '.', '_' or '-' (accepted: {NODE_NAME_ACCEPTED})"
        ));
    }
    None
}

/// `s` with control and non-ASCII characters escaped (`\u{1b}`), cut to `max` characters: safe to
/// quote in an error message that a terminal may print.
pub(super) fn escape_for_message(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_default).collect();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

/// Checks that a reported string is printable ASCII (space to `~`) and at most `max` characters.
pub(super) fn printable_field(
    field: &str,
    value: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<(), Status> {
    let accepted = if may_be_empty {
        format!("0 to {max} printable ASCII characters")
    } else {
        format!("1 to {max} printable ASCII characters")
    };
    let problem = if value.is_empty() && !may_be_empty {
        "is empty".to_string()
    } else if value.chars().count() > max {
        format!("is {} characters long", value.chars().count())
    } else if let Some(bad) = value.chars().find(|c| !(' '..='~').contains(c)) {
        format!(
            "has the character {}",
            escape_for_message(&format!("{bad:?}"), 16)
        )
    } else {
        return Ok(());
    };
    Err(Status::invalid_argument(format!(
        "{field} `{}` {problem} (accepted: {accepted})",
        escape_for_message(value, 64)
    )))
}

/// Why `gpus` cannot be registered for `node`: a real GPU (`GPU-<uuid>`) that another node which
/// is up already reported, so two agents would hand the same device to two jobs (two agents on
/// one host, or a cloned machine). Declared GPUs (`declared-gpu-N`) and empty uuids are shared
/// by design. `None` when nothing clashes. The agent retries a refused registration, so it gets
/// in once the other node is down.
pub(super) fn gpu_held_elsewhere(
    nodes: &BTreeMap<NodeId, crate::state::Node>,
    node: &NodeId,
    gpus: &[Gpu],
) -> Option<String> {
    let mine: BTreeSet<&str> = gpus
        .iter()
        .map(|g| g.uuid.as_str())
        .filter(|u| u.starts_with("GPU-"))
        .collect();
    nodes
        .values()
        .filter(|n| &n.id != node && n.status == NodeStatus::Up)
        .find_map(|n| {
            let uuid = n
                .resources
                .gpus
                .iter()
                .find(|g| mine.contains(g.uuid.as_str()))?;
            Some(format!(
                "resources.gpus uuid `{}` is already reported by node {}, which is up \
                 (accepted: each GPU on one node; is a second agent running on that host, or was \
                 it cloned?); registration is retried and succeeds once {} is down",
                uuid.uuid, n.id, n.id
            ))
        })
}

/// The state's model of a validated report ([`validate_resources`] has accepted it, so every
/// affinity word is known; an unknown one would be dropped).
pub(super) fn node_resources(res: HostResources) -> NodeResources {
    NodeResources {
        containment: res.containment,
        hostname: res.hostname,
        cpus: res.cpus,
        memory_mib: res.memory_mib,
        advertised_interface: res.advertised_interface,
        gpus: res
            .gpus
            .into_iter()
            .map(|g| GpuInfo {
                index: g.index,
                name: g.name,
                memory_mib: g.memory_mib,
                uuid: g.uuid,
                pci_bus_id: g.pci_bus_id,
                numa_node: g.numa_node,
                nic_affinity: g
                    .nic_affinity
                    .into_iter()
                    .filter_map(|a| {
                        Some(NicAffinity {
                            link: PcieLink::from_word(&a.link)?,
                            rdma_device: a.rdma_device,
                        })
                    })
                    .collect(),
                mig_mode: g.mig_mode,
                ecc_mode: g.ecc_mode,
                nvlink_peers: g.nvlink_peers,
                retired_pages_pending: g.retired_pages_pending,
                uncorrectable_ecc_errors: g.uncorrectable_ecc_errors,
            })
            .collect(),
        rdma_devices: res
            .rdma_devices
            .into_iter()
            .map(|d| RdmaDeviceInfo {
                name: d.name,
                pci_bus_id: d.pci_bus_id,
                numa_node: d.numa_node,
                ports: d
                    .ports
                    .into_iter()
                    .map(|p| RdmaPortInfo {
                        port: p.port,
                        state: p.state,
                        link_layer: p.link_layer,
                        rate: p.rate,
                        gid_count: p.gid_count,
                        netdev: p.netdev,
                        gids: p
                            .gids
                            .into_iter()
                            .map(|g| RdmaGid {
                                index: g.index,
                                gid: g.gid,
                                kind: g.kind,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub(super) fn validate_register(r: &RegisterRequest) -> Result<(), Status> {
    if let Some(problem) = node_name_problem(&r.node_name) {
        return Err(Status::invalid_argument(problem));
    }
    if r.address.len() > 64 || r.address.parse::<IpAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "address `{}` is not an IP address; agents advertise an IP other hosts can reach",
            escape_for_message(&r.address, 64)
        )));
    }
    printable_field("instance_id", &r.instance_id, AGENT_ID_CHARS_MAX, false)?;
    printable_field("agent_version", &r.agent_version, AGENT_ID_CHARS_MAX, true)?;
    let (lo, hi) = (r.port_range_start, r.port_range_end);
    if lo == 0 || hi > u32::from(u16::MAX) || lo > hi {
        return Err(Status::invalid_argument(format!(
            "port range {lo}-{hi} is not a range of TCP ports (1-65535, start <= end)"
        )));
    }
    if let Some(res) = &r.resources {
        validate_resources(res)?;
    }
    Ok(())
}

pub(super) fn validate_resources(res: &HostResources) -> Result<(), Status> {
    let invalid = |m: String| Err(Status::invalid_argument(m));
    printable_field(
        "resources.hostname",
        &res.hostname,
        HOSTNAME_CHARS_MAX,
        true,
    )?;
    printable_field(
        "resources.containment",
        &res.containment,
        CONTAINMENT_CHARS_MAX,
        true,
    )?;
    if res.cpus > CPUS_PER_HOST_MAX {
        return invalid(format!(
            "resources.cpus is {} (accepted: 0 to {CPUS_PER_HOST_MAX} CPUs)",
            res.cpus
        ));
    }
    if res.memory_mib > MEMORY_PER_HOST_MIB_MAX {
        return invalid(format!(
            "resources.memory_mib is {} (accepted: 0 to {MEMORY_PER_HOST_MIB_MAX} MiB, 64 TiB)",
            res.memory_mib
        ));
    }
    if res.gpus.len() > GPUS_PER_HOST_MAX {
        return invalid(format!(
            "resources.gpus lists {} GPUs (accepted: 0 to {GPUS_PER_HOST_MAX} GPUs per host)",
            res.gpus.len()
        ));
    }
    let mut indices = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    let mut bus_ids = BTreeSet::new();
    netdev_field("resources.advertised_interface", &res.advertised_interface)?;
    for g in &res.gpus {
        if g.index as usize >= GPUS_PER_HOST_MAX {
            return invalid(format!(
                "resources.gpus index {} is out of range (accepted: 0 to {})",
                g.index,
                GPUS_PER_HOST_MAX - 1
            ));
        }
        if !indices.insert(g.index) {
            return invalid(format!(
                "resources.gpus index {} is listed twice (accepted: each GPU index once)",
                g.index
            ));
        }
        printable_field(
            "resources.gpus.name",
            &g.name,
            DEVICE_STRING_CHARS_MAX,
            true,
        )?;
        printable_field(
            "resources.gpus.uuid",
            &g.uuid,
            DEVICE_STRING_CHARS_MAX,
            true,
        )?;
        if !g.uuid.is_empty() && !uuids.insert(g.uuid.as_str()) {
            return invalid(format!(
                "resources.gpus uuid `{}` is listed twice (accepted: each GPU uuid once, or empty)",
                g.uuid
            ));
        }
        if g.memory_mib > MEMORY_PER_GPU_MIB_MAX {
            return invalid(format!(
                "resources.gpus.memory_mib of GPU {} is {} (accepted: 0 to {MEMORY_PER_GPU_MIB_MAX} MiB, 16 TiB)",
                g.index, g.memory_mib
            ));
        }
        validate_gpu_details(g, &mut bus_ids)?;
    }
    if res.rdma_devices.len() > RDMA_DEVICES_PER_HOST_MAX {
        return invalid(format!(
            "resources.rdma_devices lists {} devices (accepted: 0 to {RDMA_DEVICES_PER_HOST_MAX})",
            res.rdma_devices.len()
        ));
    }
    let mut names = BTreeSet::new();
    for d in &res.rdma_devices {
        printable_field(
            "resources.rdma_devices.name",
            &d.name,
            DEVICE_STRING_CHARS_MAX,
            false,
        )?;
        if !names.insert(d.name.as_str()) {
            return invalid(format!(
                "resources.rdma_devices name `{}` is listed twice (accepted: each device once)",
                d.name
            ));
        }
        if d.ports.len() > RDMA_PORTS_PER_DEVICE_MAX {
            return invalid(format!(
                "resources.rdma_devices.ports of `{}` lists {} ports (accepted: 0 to {RDMA_PORTS_PER_DEVICE_MAX})",
                d.name,
                d.ports.len()
            ));
        }
        for p in &d.ports {
            printable_field(
                "resources.rdma_devices.ports.state",
                &p.state,
                DEVICE_STRING_CHARS_MAX,
                true,
            )?;
            printable_field(
                "resources.rdma_devices.ports.link_layer",
                &p.link_layer,
                DEVICE_STRING_CHARS_MAX,
                true,
            )?;
            printable_field(
                "resources.rdma_devices.ports.rate",
                &p.rate,
                DEVICE_STRING_CHARS_MAX,
                true,
            )?;
            if p.gid_count > RDMA_GIDS_PER_PORT_MAX {
                return invalid(format!(
                    "resources.rdma_devices.ports.gid_count of `{}` port {} is {} (accepted: 0 to {RDMA_GIDS_PER_PORT_MAX})",
                    d.name, p.port, p.gid_count
                ));
            }
            validate_port_details(&d.name, p)?;
        }
        pci_bus_id_field("resources.rdma_devices.pci_bus_id", &d.pci_bus_id)?;
        numa_node_field("resources.rdma_devices.numa_node", d.numa_node)?;
    }
    // Affinity names devices of this report, once each.
    for g in &res.gpus {
        let mut seen = BTreeSet::new();
        for a in &g.nic_affinity {
            if !names.contains(a.rdma_device.as_str()) {
                return invalid(format!(
                    "resources.gpus.nic_affinity of GPU `{}` names RDMA device `{}`, which is not in \
                     resources.rdma_devices (accepted: the name of a reported device)",
                    escape_for_message(&g.uuid, 64),
                    escape_for_message(&a.rdma_device, 64)
                ));
            }
            if !seen.insert(a.rdma_device.as_str()) {
                return invalid(format!(
                    "resources.gpus.nic_affinity of GPU `{}` lists RDMA device `{}` twice \
                     (accepted: each device once)",
                    escape_for_message(&g.uuid, 64),
                    a.rdma_device
                ));
            }
        }
    }
    Ok(())
}

/// The discovery fields of one GPU (issue 9): bus id, NUMA node, modes, NVLink peers, affinity
/// words and list lengths. `bus_ids` collects the host's GPU bus ids so one is never listed twice.
pub(super) fn validate_gpu_details<'a>(
    g: &'a Gpu,
    bus_ids: &mut BTreeSet<&'a str>,
) -> Result<(), Status> {
    let invalid = |m: String| Err(Status::invalid_argument(m));
    pci_bus_id_field("resources.gpus.pci_bus_id", &g.pci_bus_id)?;
    if !g.pci_bus_id.is_empty() && !bus_ids.insert(g.pci_bus_id.as_str()) {
        return invalid(format!(
            "resources.gpus pci_bus_id `{}` is listed twice (accepted: each GPU's bus id once, or empty)",
            g.pci_bus_id
        ));
    }
    numa_node_field("resources.gpus.numa_node", g.numa_node)?;
    printable_field(
        "resources.gpus.mig_mode",
        &g.mig_mode,
        DEVICE_WORD_CHARS_MAX,
        true,
    )?;
    printable_field(
        "resources.gpus.ecc_mode",
        &g.ecc_mode,
        DEVICE_WORD_CHARS_MAX,
        true,
    )?;
    if g.nvlink_peers.len() > NVLINK_PEERS_PER_GPU_MAX {
        return invalid(format!(
            "resources.gpus.nvlink_peers of GPU {} lists {} peers (accepted: 0 to {NVLINK_PEERS_PER_GPU_MAX})",
            g.index,
            g.nvlink_peers.len()
        ));
    }
    for peer in &g.nvlink_peers {
        if peer.is_empty() {
            return invalid(format!(
                "resources.gpus.nvlink_peers of GPU {} has an empty bus id (accepted: {PCI_BUS_ID_ACCEPTED}, not empty)",
                g.index
            ));
        }
        pci_bus_id_field("resources.gpus.nvlink_peers", peer)?;
    }
    if g.nic_affinity.len() > RDMA_DEVICES_PER_HOST_MAX {
        return invalid(format!(
            "resources.gpus.nic_affinity of GPU {} lists {} devices (accepted: 0 to {RDMA_DEVICES_PER_HOST_MAX})",
            g.index,
            g.nic_affinity.len()
        ));
    }
    for a in &g.nic_affinity {
        if PcieLink::from_word(&a.link).is_none() {
            return invalid(format!(
                "resources.gpus.nic_affinity link `{}` of GPU {} is not a PCIe link word \
                 (accepted: PIX, PXB, PHB, NODE or SYS)",
                escape_for_message(&a.link, 16),
                g.index
            ));
        }
    }
    Ok(())
}

/// The discovery fields of one RDMA port (issue 9): netdev and the listed GIDs.
pub(super) fn validate_port_details(device: &str, p: &RdmaPort) -> Result<(), Status> {
    let invalid = |m: String| Err(Status::invalid_argument(m));
    netdev_field("resources.rdma_devices.ports.netdev", &p.netdev)?;
    if p.gids.len() > RDMA_GIDS_LISTED_PER_PORT_MAX {
        return invalid(format!(
            "resources.rdma_devices.ports.gids of `{device}` port {} lists {} GIDs (accepted: 0 to {RDMA_GIDS_LISTED_PER_PORT_MAX})",
            p.port,
            p.gids.len()
        ));
    }
    let mut indices = BTreeSet::new();
    for gid in &p.gids {
        if gid.index >= RDMA_GIDS_PER_PORT_MAX {
            return invalid(format!(
                "resources.rdma_devices.ports.gids index {} of `{device}` port {} is out of range (accepted: 0 to {})",
                gid.index,
                p.port,
                RDMA_GIDS_PER_PORT_MAX - 1
            ));
        }
        if !indices.insert(gid.index) {
            return invalid(format!(
                "resources.rdma_devices.ports.gids index {} of `{device}` port {} is listed twice (accepted: each index once)",
                gid.index, p.port
            ));
        }
        if !gid_is_well_formed(&gid.gid) {
            return invalid(format!(
                "resources.rdma_devices.ports.gids gid `{}` of `{device}` port {} is not a GID \
                 (accepted: eight groups of four lowercase hex digits, e.g. fe80:0000:0000:0000:0ac4:7aff:feb3:1234)",
                escape_for_message(&gid.gid, 64),
                p.port
            ));
        }
        printable_field(
            "resources.rdma_devices.ports.gids.kind",
            &gid.kind,
            DEVICE_WORD_CHARS_MAX,
            true,
        )?;
    }
    Ok(())
}
