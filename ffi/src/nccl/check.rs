//! A single-host NCCL all-reduce over several GPUs from one process: the pre-flight check of a
//! GPU host's NCCL path (one communicator per GPU with `ncclCommInitAll`, one group call per
//! iteration), and its bandwidth figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use super::{Communicator, Nccl, NcclError, ReduceOp};

/// What [`single_host_all_reduce`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct AllReduceReport {
    /// The CUDA device ordinals that took part, rank `i` on `devices[i]`.
    pub devices: Vec<i32>,
    /// The size of each rank's buffer in bytes.
    pub bytes: usize,
    /// Timed iterations (after one untimed warm-up).
    pub iterations: u32,
    /// Wall time of one all-reduce, averaged over the timed iterations.
    pub time_per_iteration: Duration,
    /// Algorithm bandwidth in GB/s (bytes / time), as nccl-tests prints it.
    pub algorithm_gb_per_s: f64,
    /// Bus bandwidth in GB/s (algorithm bandwidth x 2(n-1)/n), nccl-tests' comparable figure.
    pub bus_gb_per_s: f64,
}

/// nccl-tests' bus bandwidth of an all-reduce: each rank sends and receives `2(n-1)/n` of the
/// buffer, so `busbw = algbw * 2(n-1)/n`. One rank moves nothing over a bus: 0.
pub fn all_reduce_bus_bandwidth(algorithm_gb_per_s: f64, ranks: usize) -> f64 {
    if ranks <= 1 {
        return 0.0;
    }
    let n = ranks as f64;
    algorithm_gb_per_s * 2.0 * (n - 1.0) / n
}

/// The value every element holds after a sum all-reduce where rank `r` contributed `r + 1`:
/// `1 + 2 + ... + n`.
pub fn expected_sum(ranks: usize) -> f32 {
    (ranks * (ranks + 1) / 2) as f32
}

/// Runs a sum all-reduce of `elements` f32 values over `devices` (CUDA ordinals) from this
/// process: one communicator per GPU (`ncclCommInitAll`), buffers from cudarc, rank `r` sending
/// `r + 1` everywhere. Checks every element of every rank's result, then times `iterations` more
/// all-reduces. Returns [`NcclError::InvalidArgument`] for no devices, zero elements or zero
/// iterations, [`NcclError::NoCuda`] without a CUDA driver, and the first NCCL or CUDA error.
pub fn single_host_all_reduce(
    nccl: &Arc<Nccl>,
    devices: &[i32],
    elements: usize,
    iterations: u32,
) -> Result<AllReduceReport, NcclError> {
    let invalid = |reason: &str| NcclError::InvalidArgument {
        call: "single_host_all_reduce",
        reason: reason.to_owned(),
    };
    if devices.is_empty() || elements == 0 || iterations == 0 {
        return Err(invalid(
            "needs at least one device, one element and one iteration",
        ));
    }
    if !crate::cuda::driver_present() {
        return Err(NcclError::NoCuda);
    }
    let ordinals = devices
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| invalid(&format!("device ordinal {d} is negative")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let streams: Vec<Arc<CudaStream>> = ordinals
        .iter()
        .map(|ordinal| CudaContext::new(*ordinal).and_then(|ctx| ctx.new_stream()))
        .collect::<Result<_, _>>()?;
    let mut buffers: Vec<CudaSlice<f32>> = streams
        .iter()
        .enumerate()
        .map(|(rank, stream)| stream.clone_htod(&vec![(rank + 1) as f32; elements]))
        .collect::<Result<_, _>>()?;
    let comms = Communicator::init_all(nccl, devices)?;

    let run_once = |buffers: &mut [CudaSlice<f32>]| -> Result<(), NcclError> {
        nccl.group(|| {
            for ((comm, buf), stream) in comms.iter().zip(buffers.iter_mut()).zip(&streams) {
                comm.all_reduce_in_place(buf, ReduceOp::Sum, stream)?;
            }
            Ok(())
        })?;
        for stream in &streams {
            stream.synchronize()?;
        }
        Ok(())
    };

    run_once(&mut buffers)?;
    let want = expected_sum(devices.len());
    for (rank, (buf, stream)) in buffers.iter().zip(&streams).enumerate() {
        let got = stream.clone_dtoh(buf)?;
        if let Some((index, value)) = got.iter().enumerate().find(|(_, v)| **v != want) {
            return Err(NcclError::WrongResult {
                rank,
                index,
                got: f64::from(*value),
                want: f64::from(want),
            });
        }
    }

    let start = Instant::now();
    for _ in 0..iterations {
        run_once(&mut buffers)?;
    }
    let time_per_iteration = start.elapsed() / iterations;
    let bytes = elements * std::mem::size_of::<f32>();
    let seconds = time_per_iteration.as_secs_f64().max(f64::MIN_POSITIVE);
    let algorithm_gb_per_s = bytes as f64 / seconds / 1e9;
    Ok(AllReduceReport {
        devices: devices.to_vec(),
        bytes,
        iterations,
        time_per_iteration,
        algorithm_gb_per_s,
        bus_gb_per_s: all_reduce_bus_bandwidth(algorithm_gb_per_s, devices.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_follows_nccl_tests() {
        let cases = [
            (100.0, 1, 0.0),
            (100.0, 2, 100.0),
            (100.0, 4, 150.0),
            (100.0, 8, 175.0),
        ];
        for (algbw, ranks, busbw) in cases {
            assert!(
                (all_reduce_bus_bandwidth(algbw, ranks) - busbw).abs() < 1e-9,
                "{ranks} ranks"
            );
        }
    }

    #[test]
    fn expected_sums_are_triangular_numbers() {
        let cases = [(1, 1.0), (2, 3.0), (4, 10.0), (8, 36.0)];
        for (ranks, sum) in cases {
            assert_eq!(expected_sum(ranks), sum, "{ranks} ranks");
        }
    }
}
