//! The CUDA driver, loaded at run time: device enumeration for host discovery, the driver's
//! version, and a copy-bandwidth probe of one GPU for the agent's pre-flight.
//!
//! cudarc panics when a driver function is called and `libcuda` cannot be opened (or lacks a
//! symbol). Every public function here therefore checks that the library is present before the
//! first call and runs the driver calls under `catch_unwind`, so no path out of this module panics.

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys, CudaContext};

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
    /// A caller's argument was refused before the driver was called.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Data copied through a GPU came back changed.
    #[error(
        "GPU {ordinal}: byte {index} came back from the host-device-host copy as {got}, expected {want}"
    )]
    Corrupted {
        /// The device's CUDA ordinal.
        ordinal: u32,
        /// The first changed byte.
        index: usize,
        /// Its value after the round trip.
        got: u8,
        /// The value sent.
        want: u8,
    },
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
    guarded(enumerate)
}

/// Runs `f` (which calls the driver) only when the driver library is present, and turns a panic
/// of the bindings into [`CudaError::BindingsPanicked`].
fn guarded<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    if !driver_present() {
        return Err(CudaError::DriverNotInstalled);
    }
    match panic::catch_unwind(AssertUnwindSafe(f)) {
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

/// The CUDA version the installed driver supports (`cuDriverGetVersion`), e.g. `(13, 0)`.
/// Needs no GPU: only the driver library.
pub fn driver_version() -> Result<(u32, u32), CudaError> {
    guarded(|| {
        let mut code: std::ffi::c_int = 0;
        // SAFETY: the library is present (checked by `guarded`); the call writes one int through
        // a pointer to a live local and needs no prior `cuInit`.
        let status = unsafe { sys::cuDriverGetVersion(&mut code) };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(driver_error(
                "cuDriverGetVersion",
                result::DriverError(status),
            ));
        }
        Ok(decode_driver_version(code))
    })
}

/// `cuDriverGetVersion`'s integer as (major, minor): `1000 * major + 10 * minor`.
pub fn decode_driver_version(code: i32) -> (u32, u32) {
    let code = u32::try_from(code).unwrap_or(0);
    (code / 1000, (code % 1000) / 10)
}

/// What [`copy_bandwidth`] measured on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    /// The CUDA ordinal of the device.
    pub ordinal: u32,
    /// Bytes moved by each copy.
    pub bytes: usize,
    /// Timed copies of each kind (after one untimed warm-up copy of each).
    pub iterations: u32,
    /// Host (pinned) to device, GB/s (10^9 bytes per second).
    pub h2d_gb_per_s: f64,
    /// Device to host (pinned), GB/s.
    pub d2h_gb_per_s: f64,
    /// Device to device on the same GPU, GB/s of bytes copied (each byte is read and written).
    pub d2d_gb_per_s: f64,
    /// The whole probe, allocation and check included.
    pub elapsed: Duration,
}

/// GB/s of `bytes` moved `iterations` times in `elapsed` (0 for no time: nothing measurable).
pub fn gb_per_s(bytes: usize, iterations: u32, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    bytes as f64 * f64::from(iterations) / seconds / 1e9
}

/// The byte at `i` of the pattern [`copy_bandwidth`] sends (a prime period, so a copy shifted by
/// any power of two shows).
pub fn copy_pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Allocates two `bytes`-long buffers on the GPU with CUDA ordinal `ordinal` and a pinned host
/// buffer, then times `iterations` copies host to device, device to device and device to host,
/// and checks that the pattern sent came back unchanged. The pre-flight probe of one GPU's
/// memory and PCIe path. [`CudaError::Driver`] names the call that failed (an allocation on a
/// GPU with too little free memory fails in `cuMemAlloc`); a changed byte is
/// [`CudaError::Corrupted`].
pub fn copy_bandwidth(
    ordinal: u32,
    bytes: usize,
    iterations: u32,
) -> Result<CopyReport, CudaError> {
    if bytes == 0 || iterations == 0 {
        return Err(CudaError::InvalidArgument(format!(
            "copy_bandwidth needs at least 1 byte and 1 iteration (got {bytes} bytes, {iterations} iterations)"
        )));
    }
    guarded(|| probe_copies(ordinal, bytes, iterations))
}

fn probe_copies(ordinal: u32, bytes: usize, iterations: u32) -> Result<CopyReport, CudaError> {
    let cuda = |call: &'static str| move |e: result::DriverError| driver_error(call, e);
    let start = Instant::now();
    let ctx = CudaContext::new(ordinal as usize).map_err(cuda("cuCtxCreate"))?;
    let stream = ctx.default_stream();
    // SAFETY: the pinned buffer is written in full (the pattern) before any copy reads it.
    let mut host =
        unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(cuda("cuMemHostAlloc"))?;
    for (i, b) in host
        .as_mut_slice()
        .map_err(cuda("cuEventSynchronize"))?
        .iter_mut()
        .enumerate()
    {
        *b = copy_pattern(i);
    }
    let mut a = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(cuda("cuMemAlloc"))?;
    let mut b = stream
        .alloc_zeros::<u8>(bytes)
        .map_err(cuda("cuMemAlloc"))?;
    let timed = |n: u32, f: &mut dyn FnMut() -> Result<(), result::DriverError>| {
        f()?;
        stream.synchronize()?;
        let t = Instant::now();
        for _ in 0..n {
            f()?;
        }
        stream.synchronize()?;
        Ok::<Duration, result::DriverError>(t.elapsed())
    };
    let h2d = timed(iterations, &mut || stream.memcpy_htod(&host, &mut a))
        .map_err(cuda("cuMemcpyHtoDAsync"))?;
    let d2d = timed(iterations, &mut || stream.memcpy_dtod(&a, &mut b))
        .map_err(cuda("cuMemcpyDtoDAsync"))?;
    // Clear the host copy first, so the check below sees what came back, not what was sent.
    host.as_mut_slice()
        .map_err(cuda("cuEventSynchronize"))?
        .fill(0);
    let d2h = timed(iterations, &mut || stream.memcpy_dtoh(&b, &mut host))
        .map_err(cuda("cuMemcpyDtoHAsync"))?;
    let back = host.as_slice().map_err(cuda("cuEventSynchronize"))?;
    if let Some(index) = (0..bytes).find(|i| back[*i] != copy_pattern(*i)) {
        return Err(CudaError::Corrupted {
            ordinal,
            index,
            got: back[index],
            want: copy_pattern(index),
        });
    }
    Ok(CopyReport {
        ordinal,
        bytes,
        iterations,
        h2d_gb_per_s: gb_per_s(bytes, iterations, h2d),
        d2h_gb_per_s: gb_per_s(bytes, iterations, d2h),
        d2d_gb_per_s: gb_per_s(bytes, iterations, d2d),
        elapsed: start.elapsed(),
    })
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

    #[test]
    fn driver_versions_decode_like_nvidia_smi() {
        let cases = [
            (13000, (13, 0)),
            (12080, (12, 8)),
            (11040, (11, 4)),
            (-1, (0, 0)),
        ];
        for (code, want) in cases {
            assert_eq!(decode_driver_version(code), want, "{code}");
        }
    }

    #[test]
    fn bandwidth_is_bytes_per_nanosecond() {
        let cases = [
            (1_000_000_000, 1, Duration::from_secs(1), 1.0),
            (256 << 20, 10, Duration::from_millis(100), 26.843_545_6),
            (1, 1, Duration::ZERO, 0.0),
        ];
        for (bytes, n, elapsed, want) in cases {
            let got = gb_per_s(bytes, n, elapsed);
            assert!(
                (got - want).abs() < 1e-6,
                "{bytes} x {n} in {elapsed:?}: {got}"
            );
        }
    }

    /// Without a driver: a typed error, never a panic. With a GPU: every copy verified and a
    /// bandwidth above zero.
    #[test]
    fn copy_bandwidth_never_panics() {
        assert!(matches!(
            copy_bandwidth(0, 0, 1),
            Err(CudaError::InvalidArgument(_))
        ));
        match copy_bandwidth(0, 1 << 20, 2) {
            Err(CudaError::DriverNotInstalled) => assert!(!driver_present()),
            Ok(r) => {
                assert!(r.h2d_gb_per_s > 0.0 && r.d2h_gb_per_s > 0.0 && r.d2d_gb_per_s > 0.0);
            }
            // A driver without a usable GPU (no device, or one another process holds).
            Err(e @ CudaError::Driver { .. }) => eprintln!("no usable GPU: {e}"),
            Err(other) => panic!("unexpected error from the copy probe: {other}"),
        }
        match driver_version() {
            Err(CudaError::DriverNotInstalled) => assert!(!driver_present()),
            Ok((major, _)) => assert!(major >= 10),
            Err(other) => panic!("unexpected error from cuDriverGetVersion: {other}"),
        }
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
