//! Property test of `validate_register`: it never panics on arbitrary requests (control
//! characters, unicode, huge counts, duplicate GPU indices and uuids, long lists), refuses with
//! `InvalidArgument` and a message a terminal may print, and every request it accepts keeps the
//! documented limits. 256 cases, no persistence file.

use proptest::collection::vec;
use proptest::prelude::*;
use trainctl_proto::agent::{Gpu, HostResources, RdmaDevice, RdmaPort, RegisterRequest};

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

fn gpu() -> impl Strategy<Value = Gpu> {
    (
        prop_oneof![0..4u32, Just(1023u32), Just(1024u32), any::<u32>()],
        text(DEVICE_STRING_CHARS_MAX),
        count_u64(MEMORY_PER_GPU_MIB_MAX),
        prop_oneof![
            Just(String::new()),
            "GPU-[0-3]",
            text(DEVICE_STRING_CHARS_MAX)
        ],
    )
        .prop_map(|(index, name, memory_mib, uuid)| Gpu {
            index,
            name,
            memory_mib,
            uuid,
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
    })
}

fn rdma_port() -> impl Strategy<Value = RdmaPort> {
    (
        any::<u32>(),
        text(DEVICE_STRING_CHARS_MAX),
        text(DEVICE_STRING_CHARS_MAX),
        text(DEVICE_STRING_CHARS_MAX),
        count_u32(RDMA_GIDS_PER_PORT_MAX),
    )
        .prop_map(|(port, state, link_layer, rate, gid_count)| RdmaPort {
            port,
            state,
            link_layer,
            rate,
            gid_count,
        })
}

fn rdma_device() -> impl Strategy<Value = RdmaDevice> {
    (
        prop_oneof![3 => "mlx5_[0-2]", 1 => text(DEVICE_STRING_CHARS_MAX)],
        prop_oneof![8 => vec(rdma_port(), 0..3), 1 => vec(cheap_port(), 255..259)],
    )
        .prop_map(|(name, ports)| RdmaDevice { name, ports })
}

fn resources() -> impl Strategy<Value = HostResources> {
    (
        count_u32(CPUS_PER_HOST_MAX),
        count_u64(MEMORY_PER_HOST_MIB_MAX),
        prop_oneof![8 => vec(gpu(), 0..8), 1 => vec(cheap_gpu(), 1020..1030)],
        prop_oneof![
            8 => vec(rdma_device(), 0..4),
            1 => vec("mlx5_[0-9]{1,3}".prop_map(|name| RdmaDevice { name, ports: Vec::new() }), 255..259),
        ],
        text(HOSTNAME_CHARS_MAX),
        text(CONTAINMENT_CHARS_MAX),
    )
        .prop_map(
            |(cpus, memory_mib, gpus, rdma_devices, hostname, containment)| HostResources {
                cpus,
                memory_mib,
                gpus,
                rdma_devices,
                hostname,
                containment,
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
            },
        )
}

fn printable(s: &str, max: usize, may_be_empty: bool) -> bool {
    (may_be_empty || !s.is_empty())
        && s.chars().count() <= max
        && s.chars().all(|c| (' '..='~').contains(&c))
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
    let mut indices = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    let gpus_ok = res.gpus.len() <= GPUS_PER_HOST_MAX
        && res.gpus.iter().all(|g| {
            (g.index as usize) < GPUS_PER_HOST_MAX
                && indices.insert(g.index)
                && printable(&g.name, DEVICE_STRING_CHARS_MAX, true)
                && printable(&g.uuid, DEVICE_STRING_CHARS_MAX, true)
                && (g.uuid.is_empty() || uuids.insert(g.uuid.clone()))
                && g.memory_mib <= MEMORY_PER_GPU_MIB_MAX
        });
    let mut names = BTreeSet::new();
    let rdma_ok = res.rdma_devices.len() <= RDMA_DEVICES_PER_HOST_MAX
        && res.rdma_devices.iter().all(|d| {
            printable(&d.name, DEVICE_STRING_CHARS_MAX, false)
                && names.insert(d.name.clone())
                && d.ports.len() <= RDMA_PORTS_PER_DEVICE_MAX
                && d.ports.iter().all(|p| {
                    printable(&p.state, DEVICE_STRING_CHARS_MAX, true)
                        && printable(&p.link_layer, DEVICE_STRING_CHARS_MAX, true)
                        && printable(&p.rate, DEVICE_STRING_CHARS_MAX, true)
                        && p.gid_count <= RDMA_GIDS_PER_PORT_MAX
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
