//! What the [`crate::Collective`] trait says about GPU work: element types ([`DType`]), host and
//! device buffers of those types ([`HostBufMut`], [`DeviceBufMut`]), where a backend's data path
//! runs ([`Device`]), and a handle that aborts a collective from another thread
//! ([`AbortHandle`]).
//!
//! Device buffers are cudarc's (`CudaSlice<T>`): the caller allocates them on the GPU the backend
//! reports and orders its own work on the stream the backend returns
//! ([`crate::Collective::stream`]), so a kernel that writes a buffer before an all-reduce and one
//! that reads it after are ordered with the collective without a host round trip.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

/// Element types of collective buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
    /// 32-bit two's complement integer (sums wrap).
    I32,
    /// 64-bit two's complement integer (sums wrap).
    I64,
}

impl DType {
    /// The size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// The Rust name of the type: "f32", "f64", "i32", "i64".
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a backend's collectives move data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory (the TCP ring, the RDMA ring).
    Host,
    /// The CUDA device with this ordinal in the process (after `CUDA_VISIBLE_DEVICES`).
    Cuda {
        /// The CUDA ordinal.
        ordinal: usize,
    },
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("host"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// A host buffer of one of the [`DType`]s, for [`crate::Collective::all_reduce_sum`].
#[derive(Debug)]
pub enum HostBufMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f64 elements.
    F64(&'a mut [f64]),
    /// i32 elements.
    I32(&'a mut [i32]),
    /// i64 elements.
    I64(&'a mut [i64]),
}

impl HostBufMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostBufMut::F32(_) => DType::F32,
            HostBufMut::F64(_) => DType::F64,
            HostBufMut::I32(_) => DType::I32,
            HostBufMut::I64(_) => DType::I64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostBufMut::F32(b) => b.len(),
            HostBufMut::F64(b) => b.len(),
            HostBufMut::I32(b) => b.len(),
            HostBufMut::I64(b) => b.len(),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A buffer in GPU memory (cudarc's allocation) of one of the [`DType`]s, for
/// [`crate::Collective::all_reduce_sum_device`].
#[derive(Debug)]
pub enum DeviceBufMut<'a> {
    /// f32 elements.
    F32(&'a mut CudaSlice<f32>),
    /// f64 elements.
    F64(&'a mut CudaSlice<f64>),
    /// i32 elements.
    I32(&'a mut CudaSlice<i32>),
    /// i64 elements.
    I64(&'a mut CudaSlice<i64>),
}

impl DeviceBufMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            DeviceBufMut::F32(_) => DType::F32,
            DeviceBufMut::F64(_) => DType::F64,
            DeviceBufMut::I32(_) => DType::I32,
            DeviceBufMut::I64(_) => DType::I64,
        }
    }
}

/// Aborts a collective from another thread: the operation in progress returns
/// [`crate::CollectiveError::Aborted`] with the reason given, and every later one fails. Cheap to
/// clone; aborting twice has the effect of the first call only.
#[derive(Clone)]
pub struct AbortHandle {
    abort: Arc<dyn Fn(&str) + Send + Sync>,
}

impl AbortHandle {
    /// A handle that calls `abort` with the reason.
    pub fn new(abort: impl Fn(&str) + Send + Sync + 'static) -> AbortHandle {
        AbortHandle {
            abort: Arc::new(abort),
        }
    }

    /// Aborts the collective, recording `reason` for the error its operations return.
    pub fn abort(&self, reason: &str) {
        (self.abort)(reason)
    }
}

impl fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AbortHandle")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_know_their_size_and_name() {
        let cases = [
            (DType::F32, 4, "f32"),
            (DType::F64, 8, "f64"),
            (DType::I32, 4, "i32"),
            (DType::I64, 8, "i64"),
        ];
        for (dtype, size, name) in cases {
            assert_eq!(dtype.size_bytes(), size, "{dtype:?}");
            assert_eq!(dtype.to_string(), name);
        }
    }

    #[test]
    fn host_buffers_report_type_and_length() {
        let (mut a, mut b, mut c, mut d) = ([0f32; 3], [0f64; 1], [0i32; 0], [0i64; 2]);
        let cases = [
            (HostBufMut::F32(&mut a), DType::F32, 3),
            (HostBufMut::F64(&mut b), DType::F64, 1),
            (HostBufMut::I32(&mut c), DType::I32, 0),
            (HostBufMut::I64(&mut d), DType::I64, 2),
        ];
        for (buf, dtype, len) in cases {
            assert_eq!(
                (buf.dtype(), buf.len(), buf.is_empty()),
                (dtype, len, len == 0)
            );
        }
    }

    #[test]
    fn devices_print_as_torch_does() {
        assert_eq!(Device::Host.to_string(), "host");
        assert_eq!(Device::Cuda { ordinal: 3 }.to_string(), "cuda:3");
    }

    #[test]
    fn an_abort_handle_passes_the_reason_on() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let handle = AbortHandle::new(move |reason| log.lock().unwrap().push(reason.to_owned()));
        handle.clone().abort("rank 2 lost");
        assert_eq!(*seen.lock().unwrap(), vec!["rank 2 lost".to_owned()]);
    }

    #[test]
    fn a_host_backend_sums_f32_and_i64_through_the_dtype_method_and_refuses_the_rest() {
        use crate::testing::{run_ranks, Path};
        use crate::{Collective, CollectiveError};
        let results = run_ranks(2, Path::RankZero, |mut ring| {
            let r = ring.rank();
            let mut ints = [i64::from(r) + 1, -5];
            ring.all_reduce_sum(HostBufMut::I64(&mut ints)).unwrap();
            let mut floats = [r as f32 + 0.5];
            ring.all_reduce_sum(HostBufMut::F32(&mut floats)).unwrap();
            let refused = ring
                .all_reduce_sum(HostBufMut::F64(&mut [1.0]))
                .unwrap_err();
            (
                ints,
                floats,
                refused,
                ring.device(),
                ring.stream().is_none(),
                ring.abort_handle().is_none(),
            )
        });
        for (ints, floats, refused, device, no_stream, no_abort) in results {
            assert_eq!((ints, floats), ([3, -10], [2.0]));
            assert!(matches!(refused, CollectiveError::Unsupported { .. }));
            assert_eq!(
                refused.to_string(),
                "an all-reduce of f64 host buffers is not supported by the tcp backend; it accepts f32 and i64 host buffers"
            );
            assert_eq!((device, no_stream, no_abort), (Device::Host, true, true));
        }
    }
}
