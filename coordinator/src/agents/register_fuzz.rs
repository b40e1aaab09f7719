//! Property test of `validate_register`: it never panics on arbitrary requests (control
//! characters, unicode, huge counts, duplicate GPU indices and uuids, long lists), refuses with
//! `InvalidArgument` and a message a terminal may print, and every request it accepts keeps the
//! documented limits, including the discovery fields of issue 9 (PCI bus ids, NUMA nodes, NIC
//! affinity naming reported devices, NVLink peers, netdevs, GID entries). 256 cases, no
//! persistence file.

use std::net::IpAddr;

use proptest::collection::vec;
use proptest::prelude::*;
use trainctl_proto::agent::{
    Gpu, HostResources, NicAffinity as WireAffinity, RdmaDevice, RdmaGid as WireGid, RdmaPort,
    RegisterRequest,
};

use super::*;

/// Mostly plausible strings, sometimes anything: control characters, unicode, long ones.
fn text(max: usize) -> BoxedStrategy<String> {
    let long = proptest::string::string_regex(&format!("[ -~]{{0,{}}}", max + 8)).unwrap();
    prop_oneof![
        3 => "[a-z0-9][a-z0-9._-]{0,12}[a-z0-9]",
        2 => long,
        1 => Just(String::new()),
        1 => any::<String>(),
        1 => "[a-zA-Z0-9._\\-\\x00-\\x1f\\x7f\u{e9}\u{202e}]{0,20}",
    ]
    .boxed()
}

fn count_u32(limit: u32) -> impl Strategy<Value = u32> {
    prop_oneof![0..16u32, Just(limit), Just(limit + 1), any::<u32>()]
}

fn count_u64(limit: u64) -> impl Strategy<Value = u64> {
    prop_oneof![0..1_000_000u64, Just(limit), Just(limit + 1), any::<u64>()]
}

/// Mostly well-formed PCI bus ids, sometimes empty, malformed or anything.
fn pci_bus_id() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "0000:[0-9a-f]{2}:[01][0-9a-f]\\.[0-7]",
        2 => Just(String::new()),
        1 => "[0-9a-fA-F]{3,9}:[0-9a-fA-F]{1,3}:[0-9a-f]{2}\\.[0-9]",
        1 => "[0-9a-f:.]{0,16}",
        1 => text(20),
    ]
    .boxed()
}

fn numa_node() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(prop_oneof![
        0..4u32,
        Just(NUMA_NODE_MAX),
        Just(NUMA_NODE_MAX + 1),
        any::<u32>()
    ])
}

fn netdev() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "(eth|ib|ens)[0-9]{1,3}",
        2 => Just(String::new()),
        1 => "[a-z0-9/: ]{1,20}",
        1 => text(20),
    ]
    .boxed()
}

fn affinity() -> impl Strategy<Value = WireAffinity> {
    (
        prop_oneof![4 => "mlx5_[0-3]", 1 => text(10)],
        prop_oneof![4 => "PIX|PXB|PHB|NODE|SYS", 1 => text(6)],
    )
        .prop_map(|(rdma_device, link)| WireAffinity { rdma_device, link })
}

/// The discovery fields of a GPU (issue 9), set on a GPU of the older strategies.
fn gpu_details() -> impl Strategy<Value = Gpu> {
    (
        pci_bus_id(),
        numa_node(),
        prop_oneof![8 => vec(affinity(), 0..4), 1 => vec(Just(WireAffinity { rdma_device: "mlx5_0".into(), link: "SYS".into() }), 255..259)],
        prop_oneof![Just("enabled".to_string()), Just(String::new()), text(DEVICE_WORD_CHARS_MAX)],
        prop_oneof![Just("disabled".to_string()), text(DEVICE_WORD_CHARS_MAX)],
        prop_oneof![8 => vec(pci_bus_id(), 0..3), 1 => vec(Just("0000:01:00.0".to_string()), 63..66)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(pci_bus_id, numa_node, nic_affinity, mig_mode, ecc_mode, nvlink_peers, pending, ecc)| Gpu {
                pci_bus_id,
                numa_node,
                nic_affinity,
                mig_mode,
                ecc_mode,
                nvlink_peers,
                retired_pages_pending: pending,
                uncorrectable_ecc_errors: ecc,
                ..Default::default()
            },
        )
}

fn gid() -> impl Strategy<Value = WireGid> {
    (
        prop_oneof![0..4u32, Just(RDMA_GIDS_PER_PORT_MAX), any::<u32>()],
        prop_oneof![
            4 => "fe80(:[0-9a-f]{4}){7}",
            1 => "[0-9a-fA-F:]{0,40}",
            1 => text(40),
        ],
        prop_oneof![
            Just("RoCE v2".to_string()),
            Just("IB/RoCE v1".to_string()),
            text(DEVICE_WORD_CHARS_MAX)
        ],
    )
        .prop_map(|(index, gid, kind)| WireGid { index, gid, kind })
}

fn gpu() -> impl Strategy<Value = Gpu> {
    (
        gpu_details(),
        prop_oneof![0..4u32, Just(1023u32), Just(1024u32), any::<u32>()],
        text(DEVICE_STRING_CHARS_MAX),
        count_u64(MEMORY_PER_GPU_MIB_MAX),
        prop_oneof![
            Just(String::new()),
            "GPU-[0-3]",
            text(DEVICE_STRING_CHARS_MAX)
        ],
    )
        .prop_map(|(details, index, name, memory_mib, uuid)| Gpu {
            index,
            name,
            memory_mib,
            uuid,
            ..details
        })
}

/// For long lists: a GPU without the costly string strategies.
fn cheap_gpu() -> impl Strategy<Value = Gpu> {
    (0..1100u32, any::<bool>()).prop_map(|(index, uuid)| Gpu {
        index,
        name: "GPU".into(),
        memory_mib: 1 << 16,
        uuid: if uuid {
            format!("GPU-{index}")
        } else {
            String::new()
        },
        ..Default::default()
    })
}

/// For long lists: a port without the costly string strategies.
fn cheap_port() -> impl Strategy<Value = RdmaPort> {
    (any::<u32>(), count_u32(RDMA_GIDS_PER_PORT_MAX)).prop_map(|(port, gid_count)| RdmaPort {
        port,
        state: "ACTIVE".into(),
        link_layer: "InfiniBand".into(),
        rate: "200 Gb/sec".into(),
        gid_count,
        ..Default::default()
    })
}

fn rdma_port() -> impl Strategy<Value = RdmaPort> {
    (
        any::<u32>(),
        text(DEVICE_STRING_CHARS_MAX),
        text(DEVICE_STRING_CHARS_MAX),
        text(DEVICE_STRING_CHARS_MAX),
        count_u32(RDMA_GIDS_PER_PORT_MAX),
        netdev(),
        prop_oneof![8 => vec(gid(), 0..4), 1 => (255..259usize).prop_map(|n| (0..n as u32).map(|index| WireGid { index, gid: "fe80:0000:0000:0000:0000:0000:0000:0001".into(), kind: "RoCE v2".into() }).collect())],
    )
        .prop_map(|(port, state, link_layer, rate, gid_count, netdev, gids)| RdmaPort {
            port,
            state,
            link_layer,
            rate,
            gid_count,
            netdev,
            gids,
        })
}

fn rdma_device() -> impl Strategy<Value = RdmaDevice> {
    (
        prop_oneof![3 => "mlx5_[0-2]", 1 => text(DEVICE_STRING_CHARS_MAX)],
        prop_oneof![8 => vec(rdma_port(), 0..3), 1 => vec(cheap_port(), 255..259)],
        pci_bus_id(),
        numa_node(),
    )
        .prop_map(|(name, ports, pci_bus_id, numa_node)| RdmaDevice {
            name,
            ports,
            pci_bus_id,
            numa_node,
        })
}

fn resources() -> impl Strategy<Value = HostResources> {
    (
        count_u32(CPUS_PER_HOST_MAX),
        count_u64(MEMORY_PER_HOST_MIB_MAX),
        prop_oneof![8 => vec(gpu(), 0..8), 1 => vec(cheap_gpu(), 1020..1030)],
        prop_oneof![
            8 => vec(rdma_device(), 0..4),
            1 => vec("mlx5_[0-9]{1,3}".prop_map(|name| RdmaDevice { name, ..Default::default() }), 255..259),
        ],
        text(HOSTNAME_CHARS_MAX),
        text(CONTAINMENT_CHARS_MAX),
        netdev(),
    )
        .prop_map(
            |(cpus, memory_mib, gpus, rdma_devices, hostname, containment, advertised_interface)| {
                HostResources {
                    cpus,
                    memory_mib,
                    gpus,
                    rdma_devices,
                    hostname,
                    containment,
                    advertised_interface,
                }
            },
        )
}

fn request() -> impl Strategy<Value = RegisterRequest> {
    (
        prop_oneof![3 => "[a-z0-9][a-z0-9._-]{0,70}", 1 => "[A-Za-z]{1,8}", 1 => text(80)],
        prop_oneof![
            "10\\.0\\.[0-9]{1,3}\\.[0-9]{1,3}",
            Just("::1".to_string()),
            "[0-9a-f:.%]{0,70}",
            text(80),
        ],
        text(AGENT_ID_CHARS_MAX),
        text(AGENT_ID_CHARS_MAX),
        proptest::option::weighted(0.8, resources()),
        prop_oneof![1..70_000u32, Just(0u32), any::<u32>()],
        prop_oneof![1..70_000u32, Just(65_535u32), any::<u32>()],
    )
        .prop_map(
            |(node_name, address, instance_id, agent_version, resources, lo, hi)| RegisterRequest {
                node_name,
                address,
                instance_id,
                resources,
                port_range_start: lo,
                port_range_end: hi,
                agent_version,
                health: None,
            },
        )
}

fn printable(s: &str, max: usize, may_be_empty: bool) -> bool {
    (may_be_empty || !s.is_empty())
        && s.chars().count() <= max
        && s.chars().all(|c| (' '..='~').contains(&c))
}

/// A PCI bus id as sysfs writes it, checked independently of `pci_bus_id_problem`: empty, or
/// 4-8 lowercase hex, `:`, 2 hex, `:`, `0`/`1` and a hex digit, `.`, a digit 0-7.
fn pci_ok(id: &str) -> bool {
    let lower_hex = |c: char| c.is_ascii_hexdigit() && !c.is_ascii_uppercase();
    if id.is_empty() {
        return true;
    }
    let n = id.len();
    let b = id.as_bytes();
    // Byte positions below: anything not ASCII is no bus id (and would not slice at them).
    id.is_ascii()
        && (12..=16).contains(&n)
        && id[..n - 8].chars().all(lower_hex)
        && b[n - 8] == b':'
        && id[n - 7..n - 5].chars().all(lower_hex)
        && b[n - 5] == b':'
        && (b[n - 4] == b'0' || b[n - 4] == b'1')
        && lower_hex(b[n - 3] as char)
        && b[n - 2] == b'.'
        && (b'0'..=b'7').contains(&b[n - 1])
}

fn netdev_ok(name: &str) -> bool {
    printable(name, NETDEV_CHARS_MAX, true) && !name.contains(['/', ':', ' '])
}

fn numa_ok(node: Option<u32>) -> bool {
    node.is_none_or(|n| n <= NUMA_NODE_MAX)
}

/// Every documented limit, checked independently of the validator.
fn keeps_the_limits(r: &RegisterRequest) -> Result<(), String> {
    let name_ok = (1..=NODE_NAME_CHARS_MAX).contains(&r.node_name.chars().count())
        && r.node_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && r.node_name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && r.node_name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let checks = [
        ("node_name", name_ok),
        ("address", r.address.parse::<IpAddr>().is_ok()),
        (
            "instance_id",
            printable(&r.instance_id, AGENT_ID_CHARS_MAX, false),
        ),
        (
            "agent_version",
            printable(&r.agent_version, AGENT_ID_CHARS_MAX, true),
        ),
        (
            "ports",
            r.port_range_start >= 1
                && r.port_range_start <= r.port_range_end
                && r.port_range_end <= 65_535,
        ),
    ];
    for (what, ok) in checks {
        if !ok {
            return Err(what.to_string());
        }
    }
    let Some(res) = &r.resources else {
        return Ok(());
    };
    let mut names = BTreeSet::new();
    let rdma_ok = res.rdma_devices.len() <= RDMA_DEVICES_PER_HOST_MAX
        && res.rdma_devices.iter().all(|d| {
            printable(&d.name, DEVICE_STRING_CHARS_MAX, false)
                && names.insert(d.name.clone())
                && d.ports.len() <= RDMA_PORTS_PER_DEVICE_MAX
                && pci_ok(&d.pci_bus_id)
                && numa_ok(d.numa_node)
                && d.ports.iter().all(|p| {
                    let mut gid_indices = BTreeSet::new();
                    printable(&p.state, DEVICE_STRING_CHARS_MAX, true)
                        && printable(&p.link_layer, DEVICE_STRING_CHARS_MAX, true)
                        && printable(&p.rate, DEVICE_STRING_CHARS_MAX, true)
                        && p.gid_count <= RDMA_GIDS_PER_PORT_MAX
                        && netdev_ok(&p.netdev)
                        && p.gids.len() <= RDMA_GIDS_LISTED_PER_PORT_MAX
                        && p.gids.iter().all(|g| {
                            g.index < RDMA_GIDS_PER_PORT_MAX
                                && gid_indices.insert(g.index)
                                && g.gid.len() == 39
                                && g.gid.char_indices().all(|(i, c)| {
                                    if i % 5 == 4 {
                                        c == ':'
                                    } else {
                                        c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                                    }
                                })
                                && printable(&g.kind, DEVICE_WORD_CHARS_MAX, true)
                        })
                })
        });
    let mut indices = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    let mut bus_ids = BTreeSet::new();
    let gpus_ok = res.gpus.len() <= GPUS_PER_HOST_MAX
        && res.gpus.iter().all(|g| {
            let mut affine = BTreeSet::new();
            (g.index as usize) < GPUS_PER_HOST_MAX
                && indices.insert(g.index)
                && printable(&g.name, DEVICE_STRING_CHARS_MAX, true)
                && printable(&g.uuid, DEVICE_STRING_CHARS_MAX, true)
                && (g.uuid.is_empty() || uuids.insert(g.uuid.clone()))
                && g.memory_mib <= MEMORY_PER_GPU_MIB_MAX
                && pci_ok(&g.pci_bus_id)
                && (g.pci_bus_id.is_empty() || bus_ids.insert(g.pci_bus_id.clone()))
                && numa_ok(g.numa_node)
                && printable(&g.mig_mode, DEVICE_WORD_CHARS_MAX, true)
                && printable(&g.ecc_mode, DEVICE_WORD_CHARS_MAX, true)
                && g.nvlink_peers.len() <= NVLINK_PEERS_PER_GPU_MAX
                && g.nvlink_peers.iter().all(|p| !p.is_empty() && pci_ok(p))
                && g.nic_affinity.len() <= RDMA_DEVICES_PER_HOST_MAX
                && g.nic_affinity.iter().all(|a| {
                    ["PIX", "PXB", "PHB", "NODE", "SYS"].contains(&a.link.as_str())
                        && names.contains(&a.rdma_device)
                        && affine.insert(a.rdma_device.clone())
                })
        });
    let checks = [
        (
            "hostname",
            printable(&res.hostname, HOSTNAME_CHARS_MAX, true),
        ),
        (
            "containment",
            printable(&res.containment, CONTAINMENT_CHARS_MAX, true),
        ),
        ("cpus", res.cpus <= CPUS_PER_HOST_MAX),
        ("memory_mib", res.memory_mib <= MEMORY_PER_HOST_MIB_MAX),
        ("gpus", gpus_ok),
        ("rdma_devices", rdma_ok),
        ("advertised_interface", netdev_ok(&res.advertised_interface)),
    ];
    for (what, ok) in checks {
        if !ok {
            return Err(format!("resources.{what}"));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn validate_register_accepts_exactly_what_the_limits_allow(r in request()) {
        let verdict = validate_register(&r);
        let expected = keeps_the_limits(&r);
        match &verdict {
            Ok(()) => prop_assert!(expected.is_ok(), "accepted {r:?} breaking {expected:?}"),
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(expected.is_err(), "refused a request within the limits: {}", status.message());
                // The refusal quotes what the agent sent: escaped, so a terminal may print it.
                prop_assert!(
                    !status.message().chars().any(char::is_control),
                    "unescaped control character in {:?}",
                    status.message()
                );
            }
        }
    }
}
