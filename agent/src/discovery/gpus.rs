//! GPUs: NVML first (identity, PCI placement, modes, health), the CUDA driver's listing when NVML
//! is missing, and the facts sysfs adds (NUMA node, which RDMA devices are near).

use std::collections::BTreeSet;
use std::path::Path;

use trainctl_ffi::cuda::{self, CudaError};
use trainctl_ffi::nvml::{self, NvmlError, NvmlGpu};

use super::pci::{self, pcie_link};
use super::rdma::RdmaDevice;
use super::{GpuInfo, NicAffinity};

/// Where the GPU list came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSource {
    /// NVML answered.
    Nvml,
    /// NVML is missing or failed; the CUDA driver answered.
    CudaDriver,
    /// Neither library is on this host.
    None,
}

/// The GPUs of this host, from NVML or else the CUDA driver. Never fails: a missing library is
/// 0 GPUs and a log line.
pub fn discover_gpus() -> (Vec<GpuInfo>, GpuSource) {
    match nvml::inventory() {
        Ok(inventory) => {
            for (index, error) in &inventory.skipped {
                tracing::warn!(index, error = %error, "NVML lists a GPU whose identity cannot be read; it is not reported");
            }
            if inventory.gpus.is_empty() {
                tracing::info!(driver = %inventory.driver_version, "NVML reports no GPU: 0 GPUs");
            }
            (gpus_from_nvml(&inventory.gpus), GpuSource::Nvml)
        }
        Err(e) => {
            match &e {
                NvmlError::LibraryNotFound { .. } => {
                    tracing::debug!(error = %e, "no NVML; asking the CUDA driver")
                }
                _ => {
                    tracing::warn!(error = %e, "NVML failed; asking the CUDA driver (no PCI, mode or health facts)")
                }
            }
            match cuda_gpus() {
                Some(gpus) => (gpus, GpuSource::CudaDriver),
                None => (Vec::new(), GpuSource::None),
            }
        }
    }
}

/// The CUDA driver's listing: UUID, name and memory only. `None` when there is no driver.
fn cuda_gpus() -> Option<Vec<GpuInfo>> {
    match cuda::cuda_devices() {
        Ok(devices) => {
            if devices.is_empty() {
                tracing::info!("the CUDA driver reports no device: 0 GPUs");
            }
            Some(
                devices
                    .into_iter()
                    .map(|d| GpuInfo {
                        index: d.ordinal,
                        name: d.name,
                        memory_mib: d.total_memory_bytes / (1024 * 1024),
                        uuid: d.uuid,
                        ..GpuInfo::default()
                    })
                    .collect(),
            )
        }
        Err(CudaError::DriverNotInstalled) => {
            tracing::info!("no NVIDIA driver on this host: 0 GPUs (use --gpus N to declare some)");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list GPUs: reporting 0 GPUs");
            None
        }
    }
}

/// NVML's GPUs as reported facts: the mode words, health, and NVLink peers ([`nvlink_peers`]).
pub fn gpus_from_nvml(gpus: &[NvmlGpu]) -> Vec<GpuInfo> {
    let remotes: Vec<(&str, &[String])> = gpus
        .iter()
        .map(|g| (g.pci_bus_id.as_str(), g.nvlink_remote_bus_ids.as_slice()))
        .collect();
    let peers = nvlink_peers(&remotes);
    gpus.iter()
        .zip(peers)
        .map(|(g, nvlink_peers)| GpuInfo {
            index: g.index,
            name: g.name.clone(),
            memory_mib: g.memory_total_bytes / (1024 * 1024),
            uuid: g.uuid.clone(),
            pci_bus_id: g.pci_bus_id.clone(),
            numa_node: g.numa_node,
            nic_affinity: Vec::new(),
            mig_mode: g.mig_mode.as_str().to_owned(),
            ecc_mode: g.ecc_mode.as_str().to_owned(),
            nvlink_peers,
            retired_pages_pending: g.retired_pages_pending.unwrap_or(false),
            uncorrectable_ecc_errors: g.uncorrectable_ecc_errors.unwrap_or(0),
        })
        .collect()
}

/// For each GPU (its bus id and the bus ids at the far end of its active NVLinks), the GPUs of
/// this host it reaches over NVLink, by bus id, sorted: the GPUs its links end at directly, and
/// the GPUs that share an NVSwitch with it (a far end that is not one of the host's GPUs is a
/// switch). A GPU with an unknown bus id has no peers.
pub fn nvlink_peers(gpus: &[(&str, &[String])]) -> Vec<Vec<String>> {
    let gpu_ids: BTreeSet<&str> = gpus
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !id.is_empty())
        .collect();
    let switches = |remotes: &[String]| -> BTreeSet<String> {
        remotes
            .iter()
            .filter(|r| !gpu_ids.contains(r.as_str()))
            .cloned()
            .collect()
    };
    gpus.iter()
        .map(|(id, remotes)| {
            if id.is_empty() {
                return Vec::new();
            }
            let my_switches = switches(remotes);
            let mut peers: BTreeSet<String> = remotes
                .iter()
                .filter(|r| gpu_ids.contains(r.as_str()))
                .cloned()
                .collect();
            for (other, other_remotes) in gpus {
                if !other.is_empty()
                    && other != id
                    && !my_switches.is_disjoint(&switches(other_remotes))
                {
                    peers.insert(other.to_string());
                }
            }
            peers.remove(*id);
            peers.into_iter().collect()
        })
        .collect()
}

/// Fills what sysfs knows about each GPU with a PCI bus id: a NUMA node NVML did not give, and
/// how near each RDMA device is (nearest first, then by name). Devices or GPUs whose PCI path
/// cannot be resolved get no affinity entry.
pub fn add_pci_facts(sysfs_root: &Path, gpus: &mut [GpuInfo], rdma: &[RdmaDevice]) {
    let nics: Vec<(&str, pci::PciPlace)> = rdma
        .iter()
        .filter_map(|d| Some((d.name.as_str(), pci::resolve(sysfs_root, &d.pci_bus_id)?)))
        .collect();
    for gpu in gpus {
        let Some(place) = pci::resolve(sysfs_root, &gpu.pci_bus_id) else {
            continue;
        };
        if gpu.numa_node.is_none() {
            gpu.numa_node = place.numa_node;
        }
        let mut affinity: Vec<NicAffinity> = nics
            .iter()
            .filter_map(|(name, nic)| {
                Some(NicAffinity {
                    rdma_device: name.to_string(),
                    link: pcie_link(&place.path, gpu.numa_node, &nic.path, nic.numa_node)?,
                })
            })
            .collect();
        affinity.sort_by(|a, b| (a.link, &a.rdma_device).cmp(&(b.link, &b.rdma_device)));
        gpu.nic_affinity = affinity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::pci::PcieLink;
    use std::fs;
    use trainctl_ffi::nvml::Mode;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nvlink_peers_are_direct_links_and_shared_switches() {
        let a = "0000:1b:00.0";
        let b = "0000:1c:00.0";
        let c = "0000:2b:00.0";
        let d = "0000:2c:00.0";
        let sw1 = ids(&["0000:a0:00.0", "0000:a1:00.0"]);
        let sw2 = ids(&["0000:b0:00.0"]);
        type Case<'a> = (&'a str, Vec<(&'a str, Vec<String>)>, Vec<Vec<String>>);
        let cases: Vec<Case> = vec![
            (
                "two GPUs bridged directly",
                vec![(a, ids(&[b])), (b, ids(&[a]))],
                vec![ids(&[b]), ids(&[a])],
            ),
            (
                "HGX: every GPU on the same switches",
                vec![(a, sw1.clone()), (b, sw1.clone()), (c, sw1.clone())],
                vec![ids(&[b, c]), ids(&[a, c]), ids(&[a, b])],
            ),
            (
                "two switch domains, one GPU without NVLink",
                vec![
                    (a, sw1.clone()),
                    (b, sw1.clone()),
                    (c, sw2.clone()),
                    (d, sw2.clone()),
                    ("", sw1.clone()),
                ],
                vec![ids(&[b]), ids(&[a]), ids(&[d]), ids(&[c]), vec![]],
            ),
            (
                "no NVLink",
                vec![(a, vec![]), (b, vec![])],
                vec![vec![], vec![]],
            ),
            (
                "a link to itself is not a peer",
                vec![(a, ids(&[a]))],
                vec![vec![]],
            ),
        ];
        for (what, gpus, want) in cases {
            let input: Vec<(&str, &[String])> =
                gpus.iter().map(|(id, r)| (*id, r.as_slice())).collect();
            assert_eq!(nvlink_peers(&input), want, "{what}");
        }
    }

    #[test]
    fn nvml_facts_become_reported_gpus() {
        let gpu = NvmlGpu {
            index: 0,
            uuid: "GPU-1".into(),
            name: "NVIDIA H200".into(),
            memory_total_bytes: 150_754_820_096,
            pci_bus_id: "0000:1b:00.0".into(),
            numa_node: None,
            mig_mode: Mode::Disabled,
            ecc_mode: Mode::Enabled,
            retired_pages_pending: Some(true),
            uncorrectable_ecc_errors: None,
            nvlink_remote_bus_ids: vec![],
        };
        let got = gpus_from_nvml(&[gpu]);
        assert_eq!(
            got,
            vec![GpuInfo {
                index: 0,
                name: "NVIDIA H200".into(),
                memory_mib: 143_771,
                uuid: "GPU-1".into(),
                pci_bus_id: "0000:1b:00.0".into(),
                numa_node: None,
                nic_affinity: vec![],
                mig_mode: "disabled".into(),
                ecc_mode: "enabled".into(),
                nvlink_peers: vec![],
                retired_pages_pending: true,
                uncorrectable_ecc_errors: 0,
            }]
        );
    }

    /// A PCI device in a fake sysfs tree: its place under `devices/` and the `bus/pci/devices`
    /// symlink to it.
    fn fake_pci(root: &Path, parts: &[&str], numa: &str) -> String {
        let mut dir = root.join("devices");
        for p in parts {
            dir.push(p);
        }
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("numa_node"), numa).unwrap();
        let id = parts.last().unwrap().to_string();
        fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(&dir, root.join("bus/pci/devices").join(&id)).unwrap();
        id
    }

    #[test]
    fn affinity_and_numa_come_from_the_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let gpu0 = fake_pci(
            r,
            &[
                "pci0000:17",
                "0000:17:00.0",
                "0000:18:00.0",
                "0000:19:00.0",
                "0000:1b:00.0",
            ],
            "0\n",
        );
        let nic0 = fake_pci(
            r,
            &[
                "pci0000:17",
                "0000:17:00.0",
                "0000:18:00.0",
                "0000:19:01.0",
                "0000:1a:00.0",
            ],
            "0\n",
        );
        let nic1 = fake_pci(r, &["pci0000:3a", "0000:3a:00.0", "0000:3b:00.0"], "0\n");
        let nic2 = fake_pci(r, &["pci0000:b0", "0000:b0:00.0", "0000:b1:00.0"], "1\n");
        let rdma = |name: &str, id: &str| RdmaDevice {
            name: name.into(),
            ports: vec![],
            pci_bus_id: id.into(),
            numa_node: None,
        };
        let devices = [
            rdma("mlx5_2", &nic2),
            rdma("mlx5_1", &nic1),
            rdma("mlx5_0", &nic0),
            rdma("rxe0", ""),
        ];
        let mut gpus = vec![
            GpuInfo {
                uuid: "GPU-0".into(),
                pci_bus_id: gpu0,
                ..GpuInfo::default()
            },
            GpuInfo {
                uuid: "GPU-unknown-bus".into(),
                ..GpuInfo::default()
            },
        ];
        add_pci_facts(r, &mut gpus, &devices);
        assert_eq!(gpus[0].numa_node, Some(0), "from sysfs, NVML had none");
        let affinity: Vec<(&str, PcieLink)> = gpus[0]
            .nic_affinity
            .iter()
            .map(|a| (a.rdma_device.as_str(), a.link))
            .collect();
        assert_eq!(
            affinity,
            [
                ("mlx5_0", PcieLink::Pix),
                ("mlx5_1", PcieLink::Node),
                ("mlx5_2", PcieLink::Sys)
            ]
        );
        assert!(gpus[1].nic_affinity.is_empty());
        assert_eq!(gpus[1].numa_node, None);
    }

    #[test]
    fn gpus_are_discovered_without_panicking() {
        // Without NVML and the CUDA driver (this machine): no GPUs and source None. With them:
        // every GPU has a UUID.
        let (gpus, source) = discover_gpus();
        match source {
            GpuSource::None => assert!(gpus.is_empty()),
            GpuSource::Nvml | GpuSource::CudaDriver => {
                for gpu in &gpus {
                    assert!(gpu.uuid.starts_with("GPU-"), "{gpu:?}");
                }
            }
        }
    }
}
