//! What this host has: CPUs, memory, GPUs (through the CUDA driver, loaded at run time) and RDMA
//! devices (from sysfs, without rdma-core).
//!
//! Discovery never fails: a missing driver or an unreadable file yields fewer facts and a log
//! line, so the same agent runs on a laptop, a CPU host and a GPU host.

use std::fs;
use std::path::Path;

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
use trainctl_ffi::cuda::{self, CudaError};

/// The facts an agent reports about its host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFacts {
    /// The host's name.
    pub hostname: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// GPUs, by driver ordinal.
    pub gpus: Vec<GpuInfo>,
    /// RDMA devices (InfiniBand or RoCE), sorted by name.
    pub rdma_devices: Vec<RdmaDevice>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    /// The driver's ordinal.
    pub index: u32,
    /// The device name, e.g. "NVIDIA H200", or "declared-gpu-N" for a declared GPU.
    pub name: String,
    /// Device memory in MiB (0 for a declared GPU).
    pub memory_mib: u64,
    /// `GPU-<uuid>` as nvidia-smi writes it, or "declared-gpu-N" for a declared GPU.
    pub uuid: String,
}

/// One RDMA device, e.g. `mlx5_0`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdmaDevice {
    /// The device name under `/sys/class/infiniband`.
    pub name: String,
    /// Its ports, sorted by number.
    pub ports: Vec<RdmaPort>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdmaPort {
    /// The port number (from 1).
    pub port: u32,
    /// The port state word, e.g. "ACTIVE", "DOWN", "INIT".
    pub state: String,
    /// "InfiniBand" or "Ethernet" (RoCE).
    pub link_layer: String,
    /// The rate as the kernel writes it, e.g. "400 Gb/sec (4X NDR)".
    pub rate: String,
    /// GID table entries that are set (non-zero).
    pub gid_count: u32,
}

/// Everything about this host. `declared_gpus` (the `--gpus N` flag) replaces the discovered GPUs
/// with `N` declared ones, so a development machine can act as a GPU host.
pub fn discover(declared_gpus: Option<u32>) -> HostFacts {
    let (cpus, memory_mib) = cpus_and_memory();
    let mut facts = HostFacts {
        hostname: hostname(),
        cpus,
        memory_mib,
        gpus: match declared_gpus {
            Some(_) => Vec::new(),
            None => discover_gpus(),
        },
        rdma_devices: read_rdma_devices(Path::new("/sys")),
    };
    if let Some(n) = declared_gpus {
        apply_declared_gpus(&mut facts, n);
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
        })
        .collect();
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

fn discover_gpus() -> Vec<GpuInfo> {
    match cuda::cuda_devices() {
        Ok(devices) => {
            if devices.is_empty() {
                tracing::info!("the CUDA driver reports no device: 0 GPUs");
            }
            devices
                .into_iter()
                .map(|d| GpuInfo {
                    index: d.ordinal,
                    name: d.name,
                    memory_mib: d.total_memory_bytes / (1024 * 1024),
                    uuid: d.uuid,
                })
                .collect()
        }
        Err(CudaError::DriverNotInstalled) => {
            tracing::info!("no CUDA driver on this host: 0 GPUs (use --gpus N to declare some)");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list GPUs: reporting 0 GPUs");
            Vec::new()
        }
    }
}

/// Reads RDMA devices from `<sysfs_root>/class/infiniband`. Returns an empty list when the
/// directory does not exist (no RDMA hardware or driver). In production `sysfs_root` is `/sys`.
pub fn read_rdma_devices(sysfs_root: &Path) -> Vec<RdmaDevice> {
    let class = sysfs_root.join("class/infiniband");
    let Ok(entries) = fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut devices: Vec<RdmaDevice> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            Some(RdmaDevice {
                ports: read_ports(&entry.path().join("ports")),
                name,
            })
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

fn read_ports(ports_dir: &Path) -> Vec<RdmaPort> {
    let Ok(entries) = fs::read_dir(ports_dir) else {
        return Vec::new();
    };
    let mut ports: Vec<RdmaPort> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let port = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let dir = entry.path();
            let read = |file: &str| {
                fs::read_to_string(dir.join(file))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            Some(RdmaPort {
                port,
                state: state_word(&read("state")),
                link_layer: read("link_layer"),
                rate: read("rate"),
                gid_count: count_gids(&dir.join("gids")),
            })
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    ports
}

/// "4: ACTIVE" -> "ACTIVE"; a value without a number is kept as it is.
fn state_word(raw: &str) -> String {
    match raw.split_once(':') {
        Some((_, word)) => word.trim().to_owned(),
        None => raw.trim().to_owned(),
    }
}

/// GID entries that are set: anything but all zeros (`0000:0000:...`). An entry that cannot be
/// read (the kernel answers EINVAL for unset RoCE entries) is not counted.
fn count_gids(gids_dir: &Path) -> u32 {
    let Ok(entries) = fs::read_dir(gids_dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter(|gid| gid.trim().chars().any(|c| c != '0' && c != ':'))
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const ZERO_GID: &str = "0000:0000:0000:0000:0000:0000:0000:0000\n";

    fn write(path: PathBuf, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn fake_port(root: &Path, dev: &str, port: u32, state: &str, layer: &str, rate: &str) {
        let dir = root.join(format!("class/infiniband/{dev}/ports/{port}"));
        write(dir.join("state"), &format!("{state}\n"));
        write(dir.join("link_layer"), &format!("{layer}\n"));
        write(dir.join("rate"), &format!("{rate}\n"));
    }

    #[test]
    fn rdma_devices_are_read_from_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake_port(r, "mlx5_1", 1, "1: DOWN", "Ethernet", "100 Gb/sec (4X EDR)");
        fake_port(
            r,
            "mlx5_0",
            2,
            "4: ACTIVE",
            "InfiniBand",
            "200 Gb/sec (4X HDR)",
        );
        fake_port(
            r,
            "mlx5_0",
            1,
            "4: ACTIVE",
            "InfiniBand",
            "400 Gb/sec (4X NDR)",
        );
        let gids = r.join("class/infiniband/mlx5_0/ports/1/gids");
        write(gids.join("0"), "fe80:0000:0000:0000:0ac4:7aff:feb3:1234\n");
        write(gids.join("1"), "0000:0000:0000:0000:0000:ffff:0a00:0001\n");
        write(gids.join("2"), ZERO_GID);
        write(gids.join("3"), ZERO_GID);

        let devices = read_rdma_devices(r);
        assert_eq!(
            devices,
            vec![
                RdmaDevice {
                    name: "mlx5_0".into(),
                    ports: vec![
                        RdmaPort {
                            port: 1,
                            state: "ACTIVE".into(),
                            link_layer: "InfiniBand".into(),
                            rate: "400 Gb/sec (4X NDR)".into(),
                            gid_count: 2,
                        },
                        RdmaPort {
                            port: 2,
                            state: "ACTIVE".into(),
                            link_layer: "InfiniBand".into(),
                            rate: "200 Gb/sec (4X HDR)".into(),
                            gid_count: 0,
                        },
                    ],
                },
                RdmaDevice {
                    name: "mlx5_1".into(),
                    ports: vec![RdmaPort {
                        port: 1,
                        state: "DOWN".into(),
                        link_layer: "Ethernet".into(),
                        rate: "100 Gb/sec (4X EDR)".into(),
                        gid_count: 0,
                    }],
                },
            ]
        );
    }

    #[test]
    fn no_infiniband_class_means_no_rdma_devices() {
        let root = tempfile::tempdir().unwrap();
        assert!(read_rdma_devices(root.path()).is_empty());
        assert!(read_rdma_devices(Path::new("/nonexistent-sysfs-root")).is_empty());
    }

    #[test]
    fn this_host_sysfs_is_read_without_error() {
        // On a machine without RDMA hardware this is empty; with it, every port has a state.
        for dev in read_rdma_devices(Path::new("/sys")) {
            for port in dev.ports {
                assert!(!port.state.is_empty(), "{}/{}", dev.name, port.port);
            }
        }
    }

    #[test]
    fn state_keeps_the_word() {
        assert_eq!(state_word("4: ACTIVE"), "ACTIVE");
        assert_eq!(state_word("1: DOWN"), "DOWN");
        assert_eq!(state_word("ACTIVE"), "ACTIVE");
        assert_eq!(state_word(""), "");
    }

    #[test]
    fn declared_gpus_replace_discovered_ones() {
        let mut facts = discover(None);
        facts.gpus = vec![GpuInfo {
            index: 0,
            name: "real".into(),
            memory_mib: 1,
            uuid: "GPU-x".into(),
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
    fn discovered_gpus_match_the_driver() {
        // Without a driver: 0 GPUs and no panic. With one: the driver's list.
        let facts = discover(None);
        match cuda::cuda_devices() {
            Ok(devices) => assert_eq!(facts.gpus.len(), devices.len()),
            Err(_) => assert!(facts.gpus.is_empty()),
        }
        for gpu in &facts.gpus {
            assert!(
                gpu.memory_mib > 0 && gpu.uuid.starts_with("GPU-"),
                "{gpu:?}"
            );
        }
    }
}
