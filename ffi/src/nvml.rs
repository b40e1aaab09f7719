//! The GPUs NVML sees: identity, memory, PCI placement, modes and health.
//!
//! NVML (`libnvidia-ml.so.1`, shipped with the driver) is opened at run time through
//! `nvml-wrapper`; on a host without the driver [`inventory`] returns
//! [`NvmlError::LibraryNotFound`] and never panics. Each GPU is identified by its UUID. One GPU
//! whose identity cannot be read is left out and reported in [`NvmlInventory::skipped`]; a fact
//! NVML cannot give for a GPU (an older driver, a consumer card) is `None` or [`Mode::Unknown`],
//! never an error for the whole listing.
//!
//! Nothing here decides anything: the agent's discovery fills a missing NUMA node from sysfs,
//! turns NVLink remote ends into peers, and reports the result.

use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::error::NvmlError as WrapperError;
use nvml_wrapper::{Device, Nvml};

/// The file NVML is opened from: the driver's soname (the unversioned `libnvidia-ml.so` only
/// comes with development packages).
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVLink links a GPU may have (`NVML_NVLINK_MAX_LINKS` in NVML 12).
pub const NVLINK_LINKS_MAX: u32 = 18;

/// Why NVML could not list GPUs.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    /// The library is not on the loader path: no NVIDIA driver on this host.
    #[error("{library} could not be opened (no NVIDIA driver on this host?): {reason}")]
    LibraryNotFound {
        /// The file that was tried.
        library: &'static str,
        /// The loader's own words.
        reason: String,
    },
    /// The library is there but the kernel driver is not running.
    #[error("the NVIDIA kernel driver is not loaded (NVML: {0})")]
    DriverNotLoaded(String),
    /// An NVML call failed.
    #[error("NVML {call} failed: {source}")]
    Call {
        /// The wrapper call, e.g. `device_count`.
        call: &'static str,
        /// NVML's error.
        #[source]
        source: WrapperError,
    },
}

/// A GPU mode that NVML reports as on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The mode is on.
    Enabled,
    /// The mode is off.
    Disabled,
    /// The GPU does not have the feature (NVML says `NotSupported`).
    Unsupported,
    /// NVML could not say (another error, or a library without the call).
    Unknown,
}

impl Mode {
    /// The word trainctl reports: "enabled", "disabled", "unsupported", or "" when unknown.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enabled => "enabled",
            Mode::Disabled => "disabled",
            Mode::Unsupported => "unsupported",
            Mode::Unknown => "",
        }
    }

    fn of(result: Result<bool, WrapperError>) -> Mode {
        match result {
            Ok(true) => Mode::Enabled,
            Ok(false) => Mode::Disabled,
            Err(WrapperError::NotSupported) => Mode::Unsupported,
            Err(_) => Mode::Unknown,
        }
    }
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlGpu {
    /// NVML's index (the order NVML enumerates; for display only).
    pub index: u32,
    /// `GPU-<uuid>`.
    pub uuid: String,
    /// e.g. "NVIDIA H200".
    pub name: String,
    /// Total device memory in bytes.
    pub memory_total_bytes: u64,
    /// The PCI bus id in sysfs form ([`sysfs_bus_id`]), e.g. `0000:1b:00.0`; empty if NVML's
    /// could not be read.
    pub pci_bus_id: String,
    /// NVML's NUMA node (`nvmlDeviceGetNumaNodeId`, drivers from 545); `None` when NVML cannot say.
    pub numa_node: Option<u32>,
    /// MIG mode now.
    pub mig_mode: Mode,
    /// ECC mode now.
    pub ecc_mode: Mode,
    /// Retired pages wait for a driver reload; `None` when NVML cannot say.
    pub retired_pages_pending: Option<bool>,
    /// Uncorrectable ECC errors since the driver loaded; `None` when NVML cannot say (ECC off).
    pub uncorrectable_ecc_errors: Option<u64>,
    /// Sysfs-form bus ids at the far end of each active NVLink, sorted, once each: other GPUs,
    /// or NVSwitches (the caller tells them apart by comparing with the GPUs' own bus ids).
    pub nvlink_remote_bus_ids: Vec<String>,
}

/// What NVML listed.
#[derive(Debug)]
pub struct NvmlInventory {
    /// The driver version, e.g. "580.65.06"; empty if NVML could not say.
    pub driver_version: String,
    /// The GPUs, in NVML's order.
    pub gpus: Vec<NvmlGpu>,
    /// GPUs NVML counts but whose identity (handle, UUID) could not be read: index and error.
    pub skipped: Vec<(u32, NvmlError)>,
}

/// Opens NVML from [`NVML_LIBRARY`] and lists every GPU. The library is closed again on return.
pub fn inventory() -> Result<NvmlInventory, NvmlError> {
    let nvml = Nvml::builder()
        .lib_path(std::ffi::OsStr::new(NVML_LIBRARY))
        .init()
        .map_err(init_error)?;
    let count = nvml.device_count().map_err(|source| NvmlError::Call {
        call: "device_count",
        source,
    })?;
    let mut gpus = Vec::new();
    let mut skipped = Vec::new();
    for index in 0..count {
        match nvml
            .device_by_index(index)
            .map_err(|source| NvmlError::Call {
                call: "device_by_index",
                source,
            })
            .and_then(|device| read_gpu(index, &device))
        {
            Ok(gpu) => gpus.push(gpu),
            Err(e) => skipped.push((index, e)),
        }
    }
    Ok(NvmlInventory {
        driver_version: nvml.sys_driver_version().unwrap_or_default(),
        gpus,
        skipped,
    })
}

fn init_error(e: WrapperError) -> NvmlError {
    match e {
        WrapperError::LibloadingError(e) => NvmlError::LibraryNotFound {
            library: NVML_LIBRARY,
            reason: e.to_string(),
        },
        WrapperError::LibraryNotFound => NvmlError::LibraryNotFound {
            library: NVML_LIBRARY,
            reason: "NVML reports its library as not found".to_string(),
        },
        WrapperError::DriverNotLoaded => NvmlError::DriverNotLoaded(e.to_string()),
        source => NvmlError::Call {
            call: "init",
            source,
        },
    }
}

fn read_gpu(index: u32, device: &Device<'_>) -> Result<NvmlGpu, NvmlError> {
    let uuid = device.uuid().map_err(|source| NvmlError::Call {
        call: "uuid",
        source,
    })?;
    let pci_bus_id = device
        .pci_info()
        .ok()
        .and_then(|p| sysfs_bus_id(&p.bus_id))
        .unwrap_or_default();
    let mut nvlink_remote_bus_ids: Vec<String> = (0..NVLINK_LINKS_MAX)
        .filter_map(|link| {
            let link = device.link_wrapper_for(link);
            // NotSupported / InvalidArg past the GPU's last link: no peer there.
            if !link.is_active().ok()? {
                return None;
            }
            sysfs_bus_id(&link.remote_pci_info().ok()?.bus_id)
        })
        .collect();
    nvlink_remote_bus_ids.sort();
    nvlink_remote_bus_ids.dedup();
    Ok(NvmlGpu {
        index,
        name: device.name().unwrap_or_default(),
        memory_total_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
        pci_bus_id,
        numa_node: device.numa_node_id().ok(),
        mig_mode: Mode::of(device.mig_mode().map(|m| m.current == 1)),
        ecc_mode: Mode::of(device.is_ecc_enabled().map(|m| m.currently_enabled)),
        retired_pages_pending: device.are_pages_pending_retired().ok(),
        uncorrectable_ecc_errors: device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .ok(),
        nvlink_remote_bus_ids,
        uuid,
    })
}

/// NVML's bus id (`00000000:1B:00.0`, an 8-digit domain, uppercase) in the form sysfs names PCI
/// devices (`0000:1b:00.0`: lowercase, the domain cut to 4 digits when it fits, as the kernel
/// prints domains with `%04x`). `None` when `nvml` is not `domain:bus:device.function` in hex.
pub fn sysfs_bus_id(nvml: &str) -> Option<String> {
    let nvml = nvml.trim().trim_end_matches('\0');
    let (domain, rest) = nvml.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let device = u8::from_str_radix(device, 16).ok()?;
    let function = u8::from_str_radix(function, 16).ok()?;
    if device > 0x1f || function > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{device:02x}.{function}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_bus_ids_take_the_sysfs_form() {
        let cases = [
            ("00000000:1B:00.0", Some("0000:1b:00.0")),
            ("00000000:DB:00.0", Some("0000:db:00.0")),
            ("0000:3b:00.1", Some("0000:3b:00.1")),
            ("00010000:01:00.0", Some("10000:01:00.0")),
            ("00000000:1B:00.0\0\0", Some("0000:1b:00.0")),
            ("00000000:1B:20.0", None),
            ("00000000:1B:00.8", None),
            ("00000000:1B", None),
            ("GPU-1234", None),
            ("", None),
        ];
        for (nvml, want) in cases {
            assert_eq!(sysfs_bus_id(nvml).as_deref(), want, "{nvml:?}");
        }
    }

    #[test]
    fn modes_have_trainctl_words() {
        assert_eq!(Mode::of(Ok(true)).as_str(), "enabled");
        assert_eq!(Mode::of(Ok(false)).as_str(), "disabled");
        assert_eq!(
            Mode::of(Err(WrapperError::NotSupported)).as_str(),
            "unsupported"
        );
        assert_eq!(Mode::of(Err(WrapperError::Unknown)).as_str(), "");
    }

    #[test]
    fn without_the_driver_inventory_is_an_error_not_a_panic() {
        // On a host with the driver this lists its GPUs; without it, a typed error.
        match inventory() {
            Ok(inv) => {
                for gpu in &inv.gpus {
                    assert!(gpu.uuid.starts_with("GPU-"), "{gpu:?}");
                }
            }
            Err(e @ NvmlError::LibraryNotFound { .. }) => {
                assert!(e.to_string().contains(NVML_LIBRARY), "{e}");
            }
            Err(e @ NvmlError::DriverNotLoaded(_)) => {
                assert!(e.to_string().contains("not loaded"), "{e}");
            }
            Err(e) => panic!("NVML is present but failed: {e}"),
        }
    }
}
