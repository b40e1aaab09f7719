//! The hardware side of the pre-flight: the libraries a run loads, each probe's call into
//! `trainctl_ffi`, and the pure judgement of what a probe measured against the thresholds of
//! [`super`]. Every call here may block or hang inside a vendor library; [`super::run`] calls
//! them on their own threads with deadlines.

use std::sync::Arc;

use trainctl_ffi::cuda::{self, CopyReport, CudaDevice, CudaError};
use trainctl_ffi::nccl::check::AllReduceReport;
use trainctl_ffi::nccl::{self, Nccl};
use trainctl_ffi::verbs::{self, Verbs};

use super::libraries::LibraryPaths;
use super::{
    Outcome, Probe, Versions, GPU_COPY_BYTES, GPU_COPY_ITERATIONS, MIN_DEVICE_COPY_GB_PER_S,
    MIN_HOST_COPY_GB_PER_S, MIN_NCCL_BUS_GB_PER_S, NCCL_ELEMENTS, NCCL_ITERATIONS,
    RDMA_LOOPBACK_BYTES,
};

/// What "not installed" is written as in [`Versions`].
pub const NOT_INSTALLED: &str = "not installed";

/// The libraries of one run, opened once: the CUDA driver's devices, NCCL and libibverbs; each
/// an error in words when absent.
#[derive(Debug, Clone)]
pub struct Libraries {
    /// The devices the CUDA driver lists (their UUIDs map GPUs to CUDA ordinals).
    pub cuda_devices: Result<Vec<CudaDevice>, String>,
    /// NCCL, opened from `--nccl-library` or the loader's path.
    pub nccl: Result<Arc<Nccl>, String>,
    /// libibverbs, opened from `--ibverbs-library` or the loader's path.
    pub verbs: Result<Arc<Verbs>, String>,
    /// This process's own `CUDA_VISIBLE_DEVICES` when set: the CUDA driver then lists only those
    /// GPUs, while NVML (discovery) lists every GPU of the host.
    pub visible_devices: Option<String>,
}

impl Libraries {
    /// Opens every library, NCCL and libibverbs from `paths` (`cuInit` included, which can hang
    /// on a broken GPU: call it bounded).
    pub fn load(paths: &LibraryPaths) -> Libraries {
        Libraries {
            cuda_devices: cuda::cuda_devices().map_err(|e| e.to_string()),
            nccl: paths.nccl().map_err(|e| e.to_string()),
            verbs: paths.ibverbs().map_err(|e| e.to_string()),
            visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }
    }

    /// The CUDA ordinal of the GPU `uuid`, or the outcome of its check when the driver does not
    /// list it ([`unlisted_gpu`]).
    fn ordinal(&self, uuid: &str) -> Result<u32, Outcome> {
        let devices = self.cuda_devices.as_ref().map_err(Outcome::failed)?;
        devices
            .iter()
            .find(|d| d.uuid == uuid)
            .map(|d| d.ordinal)
            .ok_or_else(|| {
                let listed: Vec<&str> = devices.iter().map(|d| d.uuid.as_str()).collect();
                unlisted_gpu(&listed, self.visible_devices.as_deref())
            })
    }
}

/// The outcome of a check on a GPU that NVML reported but the CUDA driver does not list (it lists
/// `listed`). With this process's `CUDA_VISIBLE_DEVICES` set (`visible_devices`), the driver lists
/// only those GPUs: the GPU is hidden from the check, not broken, so the check is skipped (the
/// ranks get their own `CUDA_VISIBLE_DEVICES` and see it). Without it, the GPU is off the bus or
/// broken: failed.
pub fn unlisted_gpu(listed: &[&str], visible_devices: Option<&str>) -> Outcome {
    let lists = if listed.is_empty() {
        "none".to_string()
    } else {
        listed.join(", ")
    };
    match visible_devices {
        Some(visible) => Outcome::skipped(format!(
            "hidden from this process by its CUDA_VISIBLE_DEVICES={visible:?} (the CUDA driver lists {lists}): not probed"
        )),
        None => Outcome::failed(format!(
            "the CUDA driver does not list this GPU (it lists {lists}): off the bus, or broken?"
        )),
    }
}

/// Runs one probe and judges what it measured. Blocks; may hang inside a library.
pub fn run_probe(probe: &Probe, libs: &Libraries) -> (Outcome, Option<String>) {
    match probe {
        Probe::GpuCopy { uuid } => {
            let ordinal = match libs.ordinal(uuid) {
                Ok(o) => o,
                Err(outcome) => return (outcome, None),
            };
            match cuda::copy_bandwidth(ordinal, GPU_COPY_BYTES, GPU_COPY_ITERATIONS) {
                Ok(report) => judge_copy(&report),
                Err(e) => (Outcome::failed(copy_error(&e)), None),
            }
        }
        Probe::RdmaLoopback {
            device,
            port,
            gid_index,
        } => {
            let verbs = match &libs.verbs {
                Ok(v) => v,
                Err(why) => {
                    return (
                        Outcome::skipped(format!("libibverbs is not installed: {why}")),
                        None,
                    )
                }
            };
            match verbs::loopback_write(verbs, device, *port, *gid_index, RDMA_LOOPBACK_BYTES) {
                Ok(r) => (
                    Outcome::Passed,
                    Some(format!(
                        "{} KiB written to itself in {} us (GID index {})",
                        r.bytes >> 10,
                        r.elapsed.as_micros(),
                        r.gid_index
                    )),
                ),
                Err(e) => (Outcome::failed(e.to_string()), None),
            }
        }
        Probe::NcclAllReduce { uuids } => {
            let nccl = match &libs.nccl {
                Ok(n) => n,
                Err(why) => {
                    return (
                        Outcome::skipped(format!("NCCL is not installed: {why}")),
                        None,
                    )
                }
            };
            let mut ordinals = Vec::new();
            for uuid in uuids {
                match libs.ordinal(uuid) {
                    Ok(o) => ordinals.push(o as i32),
                    Err(Outcome::Skipped { reason }) => {
                        return (Outcome::skipped(format!("{uuid}: {reason}")), None)
                    }
                    Err(outcome) => {
                        let why = outcome.reason().unwrap_or_default();
                        return (Outcome::failed(format!("{uuid}: {why}")), None);
                    }
                }
            }
            match nccl::check::single_host_all_reduce(
                nccl,
                &ordinals,
                NCCL_ELEMENTS,
                NCCL_ITERATIONS,
            ) {
                Ok(report) => judge_all_reduce(&report),
                Err(e) => (Outcome::failed(e.to_string()), None),
            }
        }
    }
}

fn copy_error(e: &CudaError) -> String {
    match e {
        CudaError::DriverNotInstalled => {
            "the CUDA driver library (libcuda.so.1) is not installed, yet discovery found this GPU"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// Whether one GPU's copy rates are plausible ([`MIN_HOST_COPY_GB_PER_S`] each way,
/// [`MIN_DEVICE_COPY_GB_PER_S`] on the device), with the figures.
pub fn judge_copy(r: &CopyReport) -> (Outcome, Option<String>) {
    let figure = format!(
        "H2D {:.1} GB/s, D2H {:.1} GB/s, D2D {:.0} GB/s ({} MiB x {})",
        r.h2d_gb_per_s,
        r.d2h_gb_per_s,
        r.d2d_gb_per_s,
        r.bytes >> 20,
        r.iterations
    );
    let mut slow = Vec::new();
    for (what, got, min) in [
        ("host-to-device", r.h2d_gb_per_s, MIN_HOST_COPY_GB_PER_S),
        ("device-to-host", r.d2h_gb_per_s, MIN_HOST_COPY_GB_PER_S),
        ("device-to-device", r.d2d_gb_per_s, MIN_DEVICE_COPY_GB_PER_S),
    ] {
        if got < min {
            slow.push(format!("{what} {got:.1} GB/s is below {min} GB/s"));
        }
    }
    let outcome = if slow.is_empty() {
        Outcome::Passed
    } else {
        Outcome::failed(format!(
            "{} (a downtrained PCIe link, or a GPU stuck at low clocks)",
            slow.join(", ")
        ))
    };
    (outcome, Some(figure))
}

/// Whether a single-host all-reduce's bus bandwidth is plausible ([`MIN_NCCL_BUS_GB_PER_S`] for
/// 2 or more GPUs; one GPU has no bus, so only its result is checked), with the figures.
pub fn judge_all_reduce(r: &AllReduceReport) -> (Outcome, Option<String>) {
    let figure = format!(
        "{} GPU{}, {} MiB: algbw {:.1} GB/s, busbw {:.1} GB/s, {:.2} ms per all-reduce",
        r.devices.len(),
        if r.devices.len() == 1 { "" } else { "s" },
        r.bytes >> 20,
        r.algorithm_gb_per_s,
        r.bus_gb_per_s,
        r.time_per_iteration.as_secs_f64() * 1e3
    );
    let outcome = if r.devices.len() >= 2 && r.bus_gb_per_s < MIN_NCCL_BUS_GB_PER_S {
        Outcome::failed(format!(
            "bus bandwidth {:.1} GB/s is below {MIN_NCCL_BUS_GB_PER_S} GB/s (no P2P path between the GPUs, NCCL_P2P_DISABLE set, or a downtrained link)",
            r.bus_gb_per_s
        ))
    } else {
        Outcome::Passed
    };
    (outcome, Some(figure))
}

/// The libraries of this host in words, "not installed" where absent; NCCL and libibverbs from
/// `paths`, a given path named after the version (`2.30.7 from /opt/nccl/libnccl.so.2`). Loads
/// each library (the CUDA driver without `cuInit`), so call it bounded.
pub fn versions(paths: &LibraryPaths) -> Versions {
    let cuda_driver = match cuda::driver_version() {
        Ok((major, minor)) => format!("{major}.{minor}"),
        Err(CudaError::DriverNotInstalled) => NOT_INSTALLED.to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let nvidia_driver = match trainctl_ffi::nvml::inventory() {
        Ok(inv) if !inv.driver_version.is_empty() => inv.driver_version,
        Ok(_) => "unknown".to_string(),
        Err(trainctl_ffi::nvml::NvmlError::LibraryNotFound { .. }) => NOT_INSTALLED.to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let nccl = match (paths.nccl(), &paths.nccl) {
        (Ok(n), None) => n.version().to_string(),
        (Ok(n), Some(path)) => format!("{} from {}", n.version(), path.display()),
        (Err(nccl::NcclError::NotFound { .. }), None) => NOT_INSTALLED.to_string(),
        (Err(e), _) => format!("unusable ({e})"),
    };
    let libibverbs = match (paths.ibverbs(), &paths.ibverbs) {
        (Ok(_), None) => std::fs::read_to_string("/proc/self/maps")
            .ok()
            .and_then(|maps| mapped_file(&maps, "libibverbs.so"))
            .unwrap_or_else(|| verbs::LIBRARY_NAME.to_string()),
        (Ok(_), Some(path)) => {
            // The file a link such as libibverbs.so.1 resolves to names the version.
            let file = std::fs::canonicalize(path)
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
            match file {
                Some(file) => format!("{file} from {}", path.display()),
                None => format!("from {}", path.display()),
            }
        }
        (Err(verbs::VerbsError::NotFound { .. }), None) => NOT_INSTALLED.to_string(),
        (Err(e), _) => format!("unusable ({e})"),
    };
    Versions {
        cuda_driver,
        nvidia_driver,
        nccl,
        libibverbs,
    }
}

/// The file name of the first library in `/proc/self/maps` text whose name starts with `stem`,
/// e.g. `libibverbs.so.1.14.44.0` (its version, which the library itself cannot tell).
pub fn mapped_file(maps: &str, stem: &str) -> Option<String> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter_map(|path| path.rsplit('/').next())
        .find(|name| name.starts_with(stem))
        .map(str::to_string)
}
