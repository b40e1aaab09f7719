//! What this host has: CPUs, memory, GPUs, RDMA devices, how they connect, and which network
//! interface holds the agent's advertised address.
//!
//! GPUs come from NVML (through `trainctl_ffi::nvml`, loaded at run time), or from the CUDA
//! driver's listing when NVML is missing; they are identified by UUID, never by ordinal. RDMA
//! devices come from sysfs, without rdma-core. Sysfs PCI paths add each GPU's NUMA node (when NVML
//! lacks it) and how near each RDMA device is (`PIX` ... `SYS`).
//!
//! Discovery never fails: a missing library or an unreadable file yields fewer facts and a log
//! line, so the same agent runs on a laptop, a CPU host and a GPU host.
//!
//! # Layout
//! - [`gpus`]: NVML, the CUDA fallback, NVLink peers, NUMA and NIC affinity of GPUs.
//! - [`rdma`]: RDMA devices, ports and GID tables from sysfs.
//! - [`pci`]: PCI paths, NUMA nodes and the PCIe link between two devices (pure).
//! - [`netif`]: the interface holding the advertised address.

use std::fs;
use std::path::Path;

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
use trainctl_proto::agent as wire;

pub mod gpus;
pub mod netif;
pub mod pci;
pub mod rdma;

pub use netif::advertised_interface;
pub use pci::PcieLink;
pub use rdma::{read_rdma_devices, RdmaDevice, RdmaGid, RdmaPort};

/// The facts an agent reports about its host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFacts {
    /// The host's name.
    pub hostname: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// GPUs, in NVML's (or the driver's) order.
    pub gpus: Vec<GpuInfo>,
    /// RDMA devices (InfiniBand or RoCE), sorted by name.
    pub rdma_devices: Vec<RdmaDevice>,
    /// The network interface holding the agent's advertised address, e.g. `eth0`; empty until
    /// the agent knows its address, or when no interface holds it.
    pub advertised_interface: String,
}

/// One GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    /// NVML's (or the driver's) ordinal, for display only.
    pub index: u32,
    /// The device name, e.g. "NVIDIA H200", or "declared-gpu-N" for a declared GPU.
    pub name: String,
    /// Device memory in MiB (0 for a declared GPU).
    pub memory_mib: u64,
    /// `GPU-<uuid>` as nvidia-smi writes it, or "declared-gpu-N" for a declared GPU.
    pub uuid: String,
    /// The PCI bus id in sysfs form, `0000:1b:00.0`; empty when unknown.
    pub pci_bus_id: String,
    /// The NUMA node (NVML's, else sysfs'); `None` when unknown.
    pub numa_node: Option<u32>,
    /// How near each RDMA device is, nearest first.
    pub nic_affinity: Vec<NicAffinity>,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    pub mig_mode: String,
    /// "enabled", "disabled", "unsupported", or empty when unknown.
    pub ecc_mode: String,
    /// Bus ids of the GPUs this one reaches over NVLink.
    pub nvlink_peers: Vec<String>,
    /// NVML reports retired pages waiting for a driver reload.
    pub retired_pages_pending: bool,
    /// Uncorrectable ECC errors since the driver loaded.
    pub uncorrectable_ecc_errors: u64,
}

/// How near one RDMA device is to a GPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NicAffinity {
    /// The RDMA device's name, e.g. `mlx5_0`.
    pub rdma_device: String,
    /// The PCIe path between them.
    pub link: PcieLink,
}

/// Everything about this host. `declared_gpus` (the `--gpus N` flag) replaces the discovered GPUs
/// with `N` declared ones, so a development machine can act as a GPU host. The advertised
/// interface is left empty: the caller learns its address later ([`advertised_interface`]).
pub fn discover(declared_gpus: Option<u32>) -> HostFacts {
    discover_in(Path::new("/sys"), declared_gpus)
}

/// [`discover`] with sysfs at `sysfs_root`.
fn discover_in(sysfs_root: &Path, declared_gpus: Option<u32>) -> HostFacts {
    let (cpus, memory_mib) = cpus_and_memory();
    let rdma_devices = read_rdma_devices(sysfs_root);
    let mut facts = HostFacts {
        hostname: hostname(),
        cpus,
        memory_mib,
        gpus: Vec::new(),
        rdma_devices,
        advertised_interface: String::new(),
    };
    match declared_gpus {
        Some(n) => apply_declared_gpus(&mut facts, n),
        None => {
            let (mut found, source) = gpus::discover_gpus();
            gpus::add_pci_facts(sysfs_root, &mut found, &facts.rdma_devices);
            tracing::info!(
                gpus = found.len(),
                ?source,
                rdma_devices = facts.rdma_devices.len(),
                "discovered this host's accelerators"
            );
            facts.gpus = found;
        }
    }
    facts
}

/// Replaces the discovered GPUs with `declared` entries named "declared-gpu-N" (N from 0).
pub fn apply_declared_gpus(facts: &mut HostFacts, declared: u32) {
    facts.gpus = (0..declared)
        .map(|index| GpuInfo {
            index,
            name: format!("declared-gpu-{index}"),
            memory_mib: 0,
            uuid: format!("declared-gpu-{index}"),
            ..GpuInfo::default()
        })
        .collect();
}

/// The registration's view of `facts`, with how ranks are contained here.
pub fn host_resources(facts: &HostFacts, containment: String) -> wire::HostResources {
    wire::HostResources {
        cpus: facts.cpus,
        memory_mib: facts.memory_mib,
        hostname: facts.hostname.clone(),
        containment,
        advertised_interface: facts.advertised_interface.clone(),
        gpus: facts
            .gpus
            .iter()
            .map(|g| wire::Gpu {
                index: g.index,
                name: g.name.clone(),
                memory_mib: g.memory_mib,
                uuid: g.uuid.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                numa_node: g.numa_node,
                nic_affinity: g
                    .nic_affinity
                    .iter()
                    .map(|a| wire::NicAffinity {
                        rdma_device: a.rdma_device.clone(),
                        link: a.link.as_str().to_owned(),
                    })
                    .collect(),
                mig_mode: g.mig_mode.clone(),
                ecc_mode: g.ecc_mode.clone(),
                nvlink_peers: g.nvlink_peers.clone(),
                retired_pages_pending: g.retired_pages_pending,
                uncorrectable_ecc_errors: g.uncorrectable_ecc_errors,
            })
            .collect(),
        rdma_devices: facts
            .rdma_devices
            .iter()
            .map(|d| wire::RdmaDevice {
                name: d.name.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                numa_node: d.numa_node,
                ports: d
                    .ports
                    .iter()
                    .map(|p| wire::RdmaPort {
                        port: p.port,
                        state: p.state.clone(),
                        link_layer: p.link_layer.clone(),
                        rate: p.rate.clone(),
                        gid_count: p.gid_count,
                        netdev: p.netdev.clone(),
                        gids: p
                            .gids
                            .iter()
                            .map(|g| wire::RdmaGid {
                                index: g.index,
                                gid: g.gid.clone(),
                                kind: g.kind.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn hostname() -> String {
    match System::host_name() {
        Ok(name) if !name.is_empty() => name,
        Ok(_) | Err(_) => {
            let fallback = fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if fallback.is_empty() {
                tracing::warn!("cannot learn this host's name; reporting \"localhost\"");
                "localhost".to_owned()
            } else {
                fallback
            }
        }
    }
}

fn cpus_and_memory() -> (u32, u64) {
    let refresh = RefreshKind::nothing()
        .with_cpu(CpuRefreshKind::nothing())
        .with_memory(MemoryRefreshKind::nothing().with_ram());
    let (mut cpus, memory_mib) = match System::new_with_specifics(refresh) {
        Ok(sys) => (sys.cpus().len() as u32, sys.total_memory() / (1024 * 1024)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read CPU and memory facts");
            (0, 0)
        }
    };
    if cpus == 0 {
        cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
    }
    (cpus, memory_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_gpus_replace_discovered_ones() {
        let mut facts = discover(None);
        facts.gpus = vec![GpuInfo {
            index: 0,
            name: "real".into(),
            memory_mib: 1,
            uuid: "GPU-x".into(),
            ..GpuInfo::default()
        }];
        apply_declared_gpus(&mut facts, 2);
        let names: Vec<_> = facts.gpus.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["declared-gpu-0", "declared-gpu-1"]);
        assert_eq!(facts.gpus[1].index, 1);
        apply_declared_gpus(&mut facts, 0);
        assert!(facts.gpus.is_empty());
    }

    #[test]
    fn discover_reports_this_host() {
        let facts = discover(Some(3));
        assert!(!facts.hostname.is_empty());
        assert!(facts.cpus >= 1);
        assert!(facts.memory_mib > 0);
        assert_eq!(facts.gpus.len(), 3);
        let expected_cpus = std::thread::available_parallelism().unwrap().get() as u32;
        // sysinfo counts online CPUs; available_parallelism may be limited by affinity/cgroups.
        assert!(
            facts.cpus >= expected_cpus,
            "{} < {expected_cpus}",
            facts.cpus
        );
    }

    #[test]
    fn discovered_gpus_match_nvml_or_the_driver() {
        // Without a driver: 0 GPUs and no panic. With one: NVML's list, or the driver's.
        let facts = discover(None);
        match trainctl_ffi::nvml::inventory() {
            Ok(inv) => assert_eq!(facts.gpus.len(), inv.gpus.len()),
            Err(_) => match trainctl_ffi::cuda::cuda_devices() {
                Ok(devices) => assert_eq!(facts.gpus.len(), devices.len()),
                Err(_) => assert!(facts.gpus.is_empty()),
            },
        }
        for gpu in &facts.gpus {
            assert!(
                gpu.memory_mib > 0 && gpu.uuid.starts_with("GPU-"),
                "{gpu:?}"
            );
        }
    }

    #[test]
    fn a_sysfs_tree_without_accelerators_gives_none() {
        let root = tempfile::tempdir().unwrap();
        let facts = discover_in(root.path(), Some(0));
        assert!(facts.gpus.is_empty());
        assert!(facts.rdma_devices.is_empty());
    }

    #[test]
    fn the_registration_carries_every_discovered_fact() {
        let facts = HostFacts {
            hostname: "gpu-1".into(),
            cpus: 64,
            memory_mib: 1 << 20,
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H200".into(),
                memory_mib: 143_771,
                uuid: "GPU-1".into(),
                pci_bus_id: "0000:1b:00.0".into(),
                numa_node: Some(0),
                nic_affinity: vec![NicAffinity {
                    rdma_device: "mlx5_0".into(),
                    link: PcieLink::Pix,
                }],
                mig_mode: "disabled".into(),
                ecc_mode: "enabled".into(),
                nvlink_peers: vec!["0000:1c:00.0".into()],
                retired_pages_pending: true,
                uncorrectable_ecc_errors: 3,
            }],
            rdma_devices: vec![RdmaDevice {
                name: "mlx5_0".into(),
                ports: vec![RdmaPort {
                    port: 1,
                    state: "ACTIVE".into(),
                    link_layer: "Ethernet".into(),
                    rate: "400 Gb/sec (4X NDR)".into(),
                    gid_count: 1,
                    netdev: "eth2".into(),
                    gids: vec![RdmaGid {
                        index: 3,
                        gid: "0000:0000:0000:0000:0000:ffff:0a00:0001".into(),
                        kind: "RoCE v2".into(),
                    }],
                }],
                pci_bus_id: "0000:1a:00.0".into(),
                numa_node: Some(0),
            }],
            advertised_interface: "eth0".into(),
        };
        let wire = host_resources(&facts, "cgroup2 (cpu, memory)".into());
        assert_eq!(wire.advertised_interface, "eth0");
        assert_eq!(wire.containment, "cgroup2 (cpu, memory)");
        let g = &wire.gpus[0];
        assert_eq!(
            (
                g.pci_bus_id.as_str(),
                g.numa_node,
                g.mig_mode.as_str(),
                g.ecc_mode.as_str()
            ),
            ("0000:1b:00.0", Some(0), "disabled", "enabled")
        );
        assert_eq!(g.nic_affinity[0].link, "PIX");
        assert_eq!(g.nic_affinity[0].rdma_device, "mlx5_0");
        assert_eq!(g.nvlink_peers, ["0000:1c:00.0"]);
        assert!(g.retired_pages_pending);
        assert_eq!(g.uncorrectable_ecc_errors, 3);
        let d = &wire.rdma_devices[0];
        assert_eq!(
            (d.pci_bus_id.as_str(), d.numa_node),
            ("0000:1a:00.0", Some(0))
        );
        let p = &d.ports[0];
        assert_eq!(p.netdev, "eth2");
        assert_eq!((p.gids[0].index, p.gids[0].kind.as_str()), (3, "RoCE v2"));
    }
}
