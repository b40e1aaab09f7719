//! Table tests of the rank environment: IB, RoCE v2, mixed hosts and gangs, the job's own env, no
//! RDMA, declared GPUs. Each case lists every decision, so a variable set without reason shows up.

use super::*;
use crate::state::{
    NicAffinity, NodeId, NodeStatus, NodeUsage, RdmaDeviceInfo, RdmaGid, RdmaPortInfo,
};

fn gid(index: u32, gid: &str, kind: &str) -> RdmaGid {
    RdmaGid {
        index,
        gid: gid.into(),
        kind: kind.into(),
    }
}

fn port(port: u32, state: &str, link_layer: &str, gids: Vec<RdmaGid>) -> RdmaPortInfo {
    RdmaPortInfo {
        port,
        state: state.into(),
        link_layer: link_layer.into(),
        rate: "400 Gb/sec (4X NDR)".into(),
        gid_count: gids.len() as u32,
        netdev: if link_layer == "Ethernet" {
            format!("eth{port}")
        } else {
            String::new()
        },
        gids,
    }
}

fn device(name: &str, ports: Vec<RdmaPortInfo>) -> RdmaDeviceInfo {
    RdmaDeviceInfo {
        name: name.into(),
        ports,
        ..RdmaDeviceInfo::default()
    }
}

fn gpu(index: u32, uuid: &str, affinity: &[(&str, PcieLink)]) -> GpuInfo {
    GpuInfo {
        index,
        name: "NVIDIA H200".into(),
        memory_mib: 143_771,
        uuid: uuid.into(),
        nic_affinity: affinity
            .iter()
            .map(|&(d, link)| NicAffinity {
                rdma_device: d.into(),
                link,
            })
            .collect(),
        ..GpuInfo::default()
    }
}

/// RoCE v2 GIDs as mlx5 lays them out: 0 and 1 link-local (v1, v2), 2 and 3 IPv4-mapped (v1, v2).
fn roce_gids(ipv4_hex: &str) -> Vec<RdmaGid> {
    let mapped = format!("0000:0000:0000:0000:0000:ffff:{ipv4_hex}");
    vec![
        gid(0, "fe80:0000:0000:0000:0ac4:7aff:feb3:1234", "IB/RoCE v1"),
        gid(1, "fe80:0000:0000:0000:0ac4:7aff:feb3:1234", "RoCE v2"),
        gid(2, &mapped, "IB/RoCE v1"),
        gid(3, &mapped, "RoCE v2"),
    ]
}

use PcieLink::{Node as NODE, Pix, Sys};

/// Hosts by kind:
/// - `ib`: 2 GPUs, GPU 0 behind the switch of mlx5_0, GPU 1 of mlx5_1; mlx5_2 is DOWN.
/// - `roce`: the same shape over RoCE, mlx5_0 and mlx5_1 each with a RoCE v2 IPv4-mapped GID at 3.
/// - `mixed`: a VPI host: mlx5_0 port 1 InfiniBand, port 2 Ethernet (RoCE); GPU 0 near mlx5_0.
/// - `noaffinity`: IB ports, GPUs without affinity (an agent that predates it).
/// - `plain`: 2 GPUs, no RDMA device.
/// - `declared`: `--gpus 2` (declared-gpu-N), no RDMA, no interface reported.
/// - `roce-v1`: RoCE with only v1 GIDs.
fn host(kind: &str) -> Node {
    let two_gpus = || {
        vec![
            gpu(0, "GPU-aaaa", &[("mlx5_0", Pix), ("mlx5_1", Sys)]),
            gpu(1, "GPU-bbbb", &[("mlx5_1", Pix), ("mlx5_0", Sys)]),
        ]
    };
    let (gpus, rdma_devices, interface) = match kind {
        "ib" => (
            two_gpus(),
            vec![
                device("mlx5_0", vec![port(1, "ACTIVE", "InfiniBand", vec![])]),
                device("mlx5_1", vec![port(1, "ACTIVE", "InfiniBand", vec![])]),
                device("mlx5_2", vec![port(1, "DOWN", "InfiniBand", vec![])]),
            ],
            "eth0",
        ),
        "roce" => (
            two_gpus(),
            vec![
                device(
                    "mlx5_0",
                    vec![port(1, "ACTIVE", "Ethernet", roce_gids("0a01:0005"))],
                ),
                device(
                    "mlx5_1",
                    vec![port(1, "ACTIVE", "Ethernet", roce_gids("0a01:0105"))],
                ),
            ],
            "bond0",
        ),
        "roce-v1" => (
            two_gpus(),
            vec![device(
                "mlx5_0",
                vec![port(
                    1,
                    "ACTIVE",
                    "Ethernet",
                    vec![gid(
                        0,
                        "fe80:0000:0000:0000:0ac4:7aff:feb3:1234",
                        "IB/RoCE v1",
                    )],
                )],
            )],
            "eth0",
        ),
        "mixed" => (
            vec![
                gpu(0, "GPU-aaaa", &[("mlx5_0", Pix), ("mlx5_1", NODE)]),
                gpu(1, "GPU-bbbb", &[("mlx5_1", Pix), ("mlx5_0", NODE)]),
            ],
            vec![
                device(
                    "mlx5_0",
                    vec![
                        port(1, "ACTIVE", "InfiniBand", vec![]),
                        port(2, "ACTIVE", "Ethernet", roce_gids("0a02:0005")),
                    ],
                ),
                device(
                    "mlx5_1",
                    vec![port(1, "ACTIVE", "Ethernet", roce_gids("0a02:0105"))],
                ),
            ],
            "eth0",
        ),
        "noaffinity" => (
            vec![gpu(0, "GPU-aaaa", &[]), gpu(1, "GPU-bbbb", &[])],
            vec![
                device("mlx5_0", vec![port(1, "ACTIVE", "InfiniBand", vec![])]),
                device("mlx5_1", vec![port(1, "ACTIVE", "InfiniBand", vec![])]),
            ],
            "eth0",
        ),
        "plain" => (two_gpus(), vec![], "eth0"),
        "declared" => (
            vec![gpu(0, "declared-gpu-0", &[]), gpu(1, "declared-gpu-1", &[])],
            vec![],
            "",
        ),
        other => panic!("no host kind {other}"),
    };
    Node {
        id: NodeId(kind.into()),
        address: "10.0.0.5".into(),
        instance_id: "i-1".into(),
        resources: NodeResources {
            hostname: kind.into(),
            cpus: 64,
            memory_mib: 1 << 20,
            gpus,
            rdma_devices,
            containment: String::new(),
            advertised_interface: interface.into(),
        },
        port_range: (29500, 29599),
        status: NodeStatus::Up,
        status_reason: None,
        registered_at_ms: 0,
        usage: NodeUsage::default(),
        drained: false,
        health: Default::default(),
    }
}

/// One expected decision: (name, value, set by, words of the reason).
type Want = (&'static str, Option<&'static str>, SetBy, &'static str);

struct Case {
    what: &'static str,
    fabric: Fabric,
    /// Kinds of the gang's other hosts (the rank's own host is always in the gang).
    others: &'static [&'static str],
    host: &'static str,
    host_gpus: &'static [u32],
    job_env: &'static [(&'static str, &'static str)],
    want: &'static [Want],
}

const ANY: Fabric = Fabric::Any;
use SetBy::{Job, Trainctl, Unset};

const UUIDS: Want = (
    CUDA_VISIBLE_DEVICES,
    Some("GPU-aaaa,GPU-bbbb"),
    Trainctl,
    "the job's 2 GPUs on this host, by UUID",
);
const IFNAME_ETH0: Want = (
    NCCL_SOCKET_IFNAME,
    Some("=eth0"),
    Trainctl,
    "the interface holding this host's advertised address 10.0.0.5",
);

#[test]
fn decisions_table() {
    let cases = [
        Case {
            what: "IB host: the ports nearest every GPU of the job there, for every local rank",
            fabric: ANY,
            others: &["ib"],
            host: "ib",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1,mlx5_1:1"),
                    Trainctl,
                    "the ACTIVE InfiniBand ports nearest GPU-aaaa (PIX), GPU-bbbb (PIX)",
                ),
            ],
        },
        Case {
            what: "an IB job asking for IB: the same ports",
            fabric: Fabric::Ib,
            others: &[],
            host: "ib",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1,mlx5_1:1"),
                    Trainctl,
                    "nearest GPU-aaaa (PIX), GPU-bbbb (PIX)",
                ),
            ],
        },
        Case {
            what: "RoCE v2 host: the IPv4-mapped RoCE v2 GID",
            fabric: Fabric::Roce,
            others: &["roce"],
            host: "roce",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                (
                    NCCL_SOCKET_IFNAME,
                    Some("=bond0"),
                    Trainctl,
                    "address 10.0.0.5",
                ),
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1,mlx5_1:1"),
                    Trainctl,
                    "the ACTIVE RoCE ports nearest GPU-aaaa (PIX), GPU-bbbb (PIX)",
                ),
                (
                    NCCL_IB_GID_INDEX,
                    Some("3"),
                    Trainctl,
                    "a RoCE v2 GID with an IPv4-mapped address on mlx5_0:1 ::ffff:10.1.0.5, mlx5_1:1 ::ffff:10.1.1.5",
                ),
            ],
        },
        Case {
            what: "RoCE with v1 GIDs only: no index, NCCL picks",
            fabric: ANY,
            others: &[],
            host: "roce-v1",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1"),
                    Trainctl,
                    "nearest GPU-aaaa (PIX), GPU-bbbb (SYS)",
                ),
                (
                    NCCL_IB_GID_INDEX,
                    None,
                    Unset,
                    "no GID index is RoCE v2 on every chosen port (mlx5_0:1); NCCL picks one",
                ),
            ],
        },
        Case {
            what: "mixed VPI host in an IB gang: only the IB port, not its RoCE sibling",
            fabric: ANY,
            others: &["ib"],
            host: "mixed",
            host_gpus: &[0, 1],
            job_env: &[],
            // GPU 1's nearest device (mlx5_1) has no IB port: the nearest IB one is mlx5_0 (NODE).
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1"),
                    Trainctl,
                    "the ACTIVE InfiniBand port nearest GPU-aaaa (PIX), GPU-bbbb (NODE)",
                ),
            ],
        },
        Case {
            what: "mixed VPI host in a RoCE gang: the RoCE port of the same device",
            fabric: Fabric::Roce,
            others: &["roce"],
            host: "mixed",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:2,mlx5_1:1"),
                    Trainctl,
                    "RoCE ports nearest GPU-aaaa (PIX), GPU-bbbb (PIX)",
                ),
                (
                    NCCL_IB_GID_INDEX,
                    Some("3"),
                    Trainctl,
                    "on mlx5_0:2 ::ffff:10.2.0.5, mlx5_1:1 ::ffff:10.2.1.5",
                ),
            ],
        },
        Case {
            what: "gang of an IB and a RoCE host: no shared fabric, IB transport off",
            fabric: ANY,
            others: &["roce"],
            host: "ib",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_DISABLE,
                    Some("1"),
                    Trainctl,
                    "the gang's hosts share no RDMA fabric (ib: InfiniBand, roce: RoCE)",
                ),
            ],
        },
        Case {
            what: "gang with a host without RDMA: IB transport off there too",
            fabric: ANY,
            others: &["ib"],
            host: "plain",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_DISABLE,
                    Some("1"),
                    Trainctl,
                    "(plain: no ACTIVE RDMA port, ib: InfiniBand)",
                ),
            ],
        },
        Case {
            what: "no affinity reported: every ACTIVE port of the fabric",
            fabric: ANY,
            others: &[],
            host: "noaffinity",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                UUIDS,
                IFNAME_ETH0,
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1,mlx5_1:1"),
                    Trainctl,
                    "every ACTIVE InfiniBand port of this host: discovery reported no GPU-to-NIC affinity to them for GPU-aaaa",
                ),
            ],
        },
        Case {
            what: "the job's own env wins, and the reason says what trainctl would set",
            fabric: Fabric::Roce,
            others: &[],
            host: "roce",
            host_gpus: &[0, 1],
            job_env: &[("NCCL_IB_HCA", "mlx5"), ("NCCL_SOCKET_IFNAME", "ib0")],
            want: &[
                UUIDS,
                (
                    NCCL_SOCKET_IFNAME,
                    Some("ib0"),
                    Job,
                    "the job's launch.env sets it; trainctl would set =bond0: the interface holding",
                ),
                (
                    NCCL_IB_HCA,
                    Some("mlx5"),
                    Job,
                    "the job's launch.env sets it; trainctl would set =mlx5_0:1,mlx5_1:1: the ACTIVE RoCE ports nearest GPU-aaaa (PIX), GPU-bbbb (PIX)",
                ),
                (
                    NCCL_IB_GID_INDEX,
                    None,
                    Unset,
                    "the job's launch.env chooses the ports (NCCL_IB_HCA)",
                ),
            ],
        },
        Case {
            what: "the job sets the GID index itself",
            fabric: ANY,
            others: &[],
            host: "roce",
            host_gpus: &[0, 1],
            job_env: &[("NCCL_IB_GID_INDEX", "1")],
            want: &[
                UUIDS,
                (NCCL_SOCKET_IFNAME, Some("=bond0"), Trainctl, "address"),
                (
                    NCCL_IB_HCA,
                    Some("=mlx5_0:1,mlx5_1:1"),
                    Trainctl,
                    "nearest GPU-aaaa",
                ),
                (
                    NCCL_IB_GID_INDEX,
                    Some("1"),
                    Job,
                    "the job's launch.env sets it; trainctl would set 3:",
                ),
            ],
        },
        Case {
            what: "no RDMA at all: no NCCL_IB_* and no word about them",
            fabric: ANY,
            others: &["plain"],
            host: "plain",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[UUIDS, IFNAME_ETH0],
        },
        Case {
            what: "declared GPUs (agent --gpus): indices, as before",
            fabric: ANY,
            others: &["declared"],
            host: "declared",
            host_gpus: &[0, 1],
            job_env: &[],
            want: &[
                (
                    CUDA_VISIBLE_DEVICES,
                    Some("0,1"),
                    Trainctl,
                    "the job's 2 GPUs on this host, by the agent's index: declared GPUs (agent --gpus) have no UUID CUDA knows",
                ),
                (
                    NCCL_SOCKET_IFNAME,
                    None,
                    Unset,
                    "the agent did not report which interface holds its address 10.0.0.5",
                ),
            ],
        },
        Case {
            what: "a CPU job: every GPU hidden, no NCCL variable",
            fabric: ANY,
            others: &["ib"],
            host: "ib",
            host_gpus: &[],
            job_env: &[],
            want: &[(
                CUDA_VISIBLE_DEVICES,
                Some(""),
                Trainctl,
                "the job holds no GPU on this host",
            )],
        },
        Case {
            what: "one of the host's GPUs, by UUID",
            fabric: ANY,
            others: &[],
            host: "ib",
            host_gpus: &[1],
            job_env: &[],
            want: &[
                (
                    CUDA_VISIBLE_DEVICES,
                    Some("GPU-bbbb"),
                    Trainctl,
                    "the job's GPU on this host, by UUID",
                ),
                IFNAME_ETH0,
                (NCCL_IB_HCA, Some("=mlx5_1:1"), Trainctl, "GPU-bbbb (PIX)"),
            ],
        },
    ];
    for case in &cases {
        let this = host(case.host);
        let others: Vec<Node> = case.others.iter().map(|k| host(k)).collect();
        let gang = gang_fabric(
            case.fabric,
            std::iter::once(&this)
                .chain(&others)
                .map(|n| (n.id.0.as_str(), &n.resources)),
        );
        let job_env: BTreeMap<String, String> = case
            .job_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let got = decide(&RankInput {
            job_env: &job_env,
            gang: &gang,
            host: Some(&this),
            host_gpus: case.host_gpus,
        });
        let shown: Vec<String> = got
            .iter()
            .map(|d| {
                format!(
                    "{}={:?} [{}] {}",
                    d.name,
                    d.value,
                    d.set_by.as_str(),
                    d.reason
                )
            })
            .collect();
        println!("{}:\n  {}", case.what, shown.join("\n  "));
        assert_eq!(got.len(), case.want.len(), "{}: {shown:#?}", case.what);
        for (d, &(name, value, set_by, words)) in got.iter().zip(case.want) {
            assert_eq!(d.name, name, "{}: {shown:#?}", case.what);
            assert_eq!(d.value.as_deref(), value, "{}: {name}", case.what);
            assert_eq!(d.set_by, set_by, "{}: {name}", case.what);
            assert!(
                d.reason.contains(words),
                "{}: {name}: {:?} lacks {words:?}",
                case.what,
                d.reason
            );
        }
    }
}

#[test]
fn to_set_leaves_out_the_jobs_and_the_unset() {
    let decisions = vec![
        EnvDecision::set(NCCL_IB_HCA, "=mlx5_0:1".into(), "r".into()),
        EnvDecision {
            name: NCCL_SOCKET_IFNAME,
            value: Some("ib0".into()),
            set_by: SetBy::Job,
            reason: "r".into(),
        },
        EnvDecision::unset(NCCL_IB_GID_INDEX, "r".into()),
    ];
    let set: Vec<(&str, &str)> = to_set(&decisions).collect();
    assert_eq!(set, [(NCCL_IB_HCA, "=mlx5_0:1")]);
}

#[test]
fn group_by_rank_names_ranks_only_where_they_differ() {
    let this = host("ib");
    let gang = gang_fabric(ANY, [(this.id.0.as_str(), &this.resources)]);
    let env = BTreeMap::new();
    let same = decide(&RankInput {
        job_env: &env,
        gang: &gang,
        host: Some(&this),
        host_gpus: &[0, 1],
    });
    let mut other = same.clone();
    other[2] = EnvDecision::set(NCCL_IB_HCA, "=mlx5_1:1".into(), "r".into());
    let grouped: Vec<(&str, Option<String>, Vec<u32>)> =
        group_by_rank(&[same.clone(), other, same])
            .into_iter()
            .map(|(d, ranks)| (d.name, d.value, ranks))
            .collect();
    assert_eq!(
        grouped,
        [
            (
                CUDA_VISIBLE_DEVICES,
                Some("GPU-aaaa,GPU-bbbb".to_owned()),
                vec![]
            ),
            (NCCL_SOCKET_IFNAME, Some("=eth0".to_owned()), vec![]),
            (
                NCCL_IB_HCA,
                Some("=mlx5_0:1,mlx5_1:1".to_owned()),
                vec![0, 2]
            ),
            (NCCL_IB_HCA, Some("=mlx5_1:1".to_owned()), vec![1]),
        ]
    );
    assert!(group_by_rank(&[]).is_empty());
}

#[test]
fn gang_fabric_table() {
    // (job's fabric, hosts, expected)
    let cases: &[(Fabric, &[&str], GangFabric)] = &[
        (ANY, &["ib", "ib"], GangFabric::Shared(Fabric::Ib)),
        (ANY, &["roce", "mixed"], GangFabric::Shared(Fabric::Roce)),
        (ANY, &["ib", "mixed"], GangFabric::Shared(Fabric::Ib)),
        (Fabric::Roce, &["mixed"], GangFabric::Shared(Fabric::Roce)),
        (ANY, &["plain", "declared"], GangFabric::NoRdma),
        (
            Fabric::Ib,
            &["ib", "roce"],
            GangFabric::Split("ib: InfiniBand, roce: RoCE".into()),
        ),
        (
            ANY,
            &["ib", "ib", "ib", "ib", "roce", "plain"],
            GangFabric::Split(
                "ib: InfiniBand, ib: InfiniBand, ib: InfiniBand, ib: InfiniBand, and 2 more".into(),
            ),
        ),
    ];
    for (fabric, kinds, want) in cases {
        let hosts: Vec<Node> = kinds.iter().map(|k| host(k)).collect();
        let got = gang_fabric(
            *fabric,
            hosts.iter().map(|n| (n.id.0.as_str(), &n.resources)),
        );
        assert_eq!(&got, want, "{fabric} on {kinds:?}");
    }
}

#[test]
fn ipv4_mapped_gids() {
    assert_eq!(
        ipv4_mapped("0000:0000:0000:0000:0000:ffff:0a01:0005"),
        Some(std::net::Ipv4Addr::new(10, 1, 0, 5))
    );
    assert_eq!(ipv4_mapped("fe80:0000:0000:0000:0ac4:7aff:feb3:1234"), None);
    assert_eq!(ipv4_mapped("not a gid"), None);
}
