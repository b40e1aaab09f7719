//! The CUDA driver, loaded at run time: device enumeration for host discovery.
//!
//! cudarc panics when a driver function is called and `libcuda` cannot be opened (or lacks a
//! symbol). [`cuda_devices`] therefore checks that the library is present before the first call and
//! runs the enumeration under `catch_unwind`, so no path out of this module panics.

use std::panic::{self, AssertUnwindSafe};

use cudarc::driver::{result, sys};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    /// The driver's device ordinal (what `CUDA_VISIBLE_DEVICES` indexes, before any remapping).
    pub ordinal: u32,
    /// The marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory_bytes: u64,
    /// The UUID in nvidia-smi's form, `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub uuid: String,
}

/// Why the CUDA driver could not be asked for its devices.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No `libcuda` could be opened on this host (no NVIDIA driver installed, or it is not on the
    /// loader's search path).
    #[error("the CUDA driver library (libcuda.so) is not installed on this host")]
    DriverNotInstalled,
    /// A driver call returned an error status.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver {
        /// The driver function that failed, e.g. `cuInit`.
        call: &'static str,
        /// The driver's name and description of the status.
        message: String,
    },
    /// cudarc panicked inside a driver call (for instance a symbol missing from an old driver);
    /// the panic was caught.
    #[error("the CUDA driver bindings panicked: {0}")]
    BindingsPanicked(String),
}

/// Whether a CUDA driver library can be opened on this host. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on a fixed list of library names and drops the
    // handles again; it is marked unsafe because opening a library runs its initialisers, which for
    // the NVIDIA driver library is the documented way to use it.
    unsafe { sys::is_culib_present() }
}

/// Lists the CUDA devices the driver sees.
///
/// Returns `Err(CudaError::DriverNotInstalled)` when no driver library exists, `Ok(vec![])` when
/// the driver is installed but reports no device (`CUDA_ERROR_NO_DEVICE`), and never panics.
pub fn cuda_devices() -> Result<Vec<CudaDevice>, CudaError> {
    if !driver_present() {
        return Err(CudaError::DriverNotInstalled);
    }
    match panic::catch_unwind(AssertUnwindSafe(enumerate)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(CudaError::BindingsPanicked(message))
        }
    }
}

fn enumerate() -> Result<Vec<CudaDevice>, CudaError> {
    match result::init() {
        Ok(()) => {}
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(Vec::new()),
        Err(e) => return Err(driver_error("cuInit", e)),
    }
    let count = result::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    let mut devices = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for ordinal in 0..count {
        let dev = result::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
        let name = result::device::get_name(dev).map_err(|e| driver_error("cuDeviceGetName", e))?;
        // SAFETY: `dev` was returned by `cuDeviceGet` just above, after a successful `cuInit`,
        // which is the only precondition of `cuDeviceTotalMem`.
        let total = unsafe { result::device::total_mem(dev) }
            .map_err(|e| driver_error("cuDeviceTotalMem", e))?;
        let uuid = result::device::get_uuid(dev).map_err(|e| driver_error("cuDeviceGetUuid", e))?;
        devices.push(CudaDevice {
            ordinal: ordinal as u32,
            name,
            total_memory_bytes: total as u64,
            uuid: format_uuid(&uuid.bytes.map(|b| b as u8)),
        });
    }
    Ok(devices)
}

fn driver_error(call: &'static str, e: result::DriverError) -> CudaError {
    CudaError::Driver {
        call,
        message: format!("{e:?}"),
    }
}

/// Formats 16 UUID bytes the way nvidia-smi and `CUDA_VISIBLE_DEVICES` spell them.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_formatted_like_nvidia_smi() {
        let bytes = [
            0x5a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7,
            0xe8, 0xf9,
        ];
        assert_eq!(
            format_uuid(&bytes),
            "GPU-5a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
        );
    }

    /// On a host without the driver this must be a typed error, not a panic; on a GPU host it
    /// must list devices with plausible facts.
    #[test]
    fn cuda_devices_never_panics() {
        match cuda_devices() {
            Err(CudaError::DriverNotInstalled) => assert!(!driver_present()),
            Ok(devices) => {
                for (i, d) in devices.iter().enumerate() {
                    assert_eq!(d.ordinal as usize, i);
                    assert!(!d.name.is_empty());
                    assert!(d.total_memory_bytes > 0);
                    assert!(
                        d.uuid.starts_with("GPU-") && d.uuid.len() == 40,
                        "{}",
                        d.uuid
                    );
                }
            }
            Err(other) => panic!("unexpected error from the CUDA driver: {other}"),
        }
    }
}
