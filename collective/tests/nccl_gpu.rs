//! The NCCL backend on real GPUs. Every test needs the CUDA driver, a GPU and NCCL
//! (`libnccl.so.2` on the loader path, `TRAINCTL_NCCL_LIBRARY`, or the venv's
//! `nvidia-nccl-cu13` wheel) and says why it skips otherwise; the two-rank tests need two GPUs.
//! On a machine without cargo, `scripts/gpu-check.sh` runs the same paths through the binary.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{cfg, free_port, JOIN_TIMEOUT};
use trainctl_collective::{
    example_train, Collective, CollectiveError, Device, DeviceBufMut, NcclCollective, NcclOptions,
    TcpRing, TrainConfig,
};

/// Says why a test stops early, on stderr past libtest's capture.
fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// The NCCL library to use: `TRAINCTL_NCCL_LIBRARY`, else the venv's wheel, else the loader's.
fn library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRAINCTL_NCCL_LIBRARY") {
        return Some(PathBuf::from(p));
    }
    trainctl_ffi::nccl::wheel_library(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

/// How many GPUs a test can use, or the reason it cannot run.
fn gpus() -> Result<usize, String> {
    if !trainctl_ffi::cuda::driver_present() {
        return Err("no CUDA driver on this host".to_owned());
    }
    let count = trainctl_ffi::cuda::cuda_devices()
        .map_err(|e| e.to_string())?
        .len();
    if count == 0 {
        return Err("the CUDA driver sees no GPU".to_owned());
    }
    let opts = NcclOptions {
        library: library(),
        ..NcclOptions::default()
    };
    trainctl_collective::nccl::open_host(&opts).map_err(|e| e.to_string())?;
    Ok(count)
}

fn options(local_rank: u32) -> NcclOptions {
    NcclOptions {
        library: library(),
        local_rank: Some(local_rank),
        ..NcclOptions::default()
    }
}

#[test]
fn one_rank_reduces_host_and_device_buffers_and_trains_to_the_cpu_checksum() {
    if let Err(reason) = gpus() {
        return skip(&reason);
    }
    let mut coll = NcclCollective::connect(cfg(0, 1, "127.0.0.1", 0, JOIN_TIMEOUT), &options(0))
        .expect("bring-up on GPU 0");
    assert_eq!(coll.device(), Device::Cuda { ordinal: 0 });

    let mut ints = [i64::MIN, -1, 7];
    coll.all_reduce_sum_i64(&mut ints).unwrap();
    assert_eq!(ints, [i64::MIN, -1, 7], "a one-rank sum changes nothing");
    let mut floats = [-0.0f32, f32::NAN, 1.5];
    let bits: Vec<u32> = floats.iter().map(|f| f.to_bits()).collect();
    coll.broadcast_f32(&mut floats, 0).unwrap();
    assert_eq!(
        floats.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
        bits,
        "broadcast is exact to the bit, sign of zero and NaN payload included"
    );
    coll.barrier().unwrap();

    let stream = coll.stream().expect("the NCCL backend has a stream");
    let mut dev = stream.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
    coll.all_reduce_sum_device(DeviceBufMut::F32(&mut dev))
        .unwrap();
    assert_eq!(stream.clone_dtoh(&dev).unwrap(), vec![1.0, 2.0, 3.0]);

    let cfg_train = TrainConfig {
        steps: 10,
        ..TrainConfig::default()
    };
    let on_gpu = example_train(&cfg_train, &mut coll, &mut Vec::new()).unwrap();
    assert!(coll.finish(), "a world of one finishes in order");
    let mut solo = TcpRing::connect(cfg(0, 1, "127.0.0.1", 0, JOIN_TIMEOUT)).unwrap();
    let on_cpu = example_train(&cfg_train, &mut solo, &mut Vec::new()).unwrap();
    assert_eq!(on_gpu.checksum, on_cpu.checksum);
}

/// Runs `f(rank, collective)` for two ranks on GPUs 0 and 1, as threads meeting through rank 0.
fn two_ranks<T: Send + 'static>(
    f: impl Fn(u32, NcclCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let (tx, rx) = mpsc::channel();
    for rank in 0..2u32 {
        let (tx, f) = (tx.clone(), f.clone());
        thread::spawn(move || {
            let coll = NcclCollective::connect(
                cfg(rank, 2, "127.0.0.1", port, JOIN_TIMEOUT),
                &options(rank),
            )
            .expect("bring-up");
            let _ = tx.send((rank, f(rank, coll)));
        });
    }
    drop(tx);
    let mut out: Vec<Option<T>> = vec![None, None];
    for _ in 0..2 {
        let (rank, value) = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("both ranks finish");
        out[rank as usize] = Some(value);
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn two_ranks_on_two_gpus_sum_exactly() {
    match gpus() {
        Err(reason) => return skip(&reason),
        Ok(n) if n < 2 => return skip(&format!("needs two GPUs, this host has {n}")),
        Ok(_) => {}
    }
    let sums = two_ranks(|rank, mut coll| {
        let mut x = [i64::from(rank) + 1, i64::MAX];
        coll.all_reduce_sum_i64(&mut x).unwrap();
        let mut b = [rank as f32 * 10.0];
        coll.broadcast_f32(&mut b, 1).unwrap();
        assert!(coll.finish());
        (x, b)
    });
    for (x, b) in sums {
        assert_eq!(x, [3, i64::MAX.wrapping_mul(2)]);
        assert_eq!(b, [10.0]);
    }
}

#[test]
fn a_rank_that_dies_mid_run_never_hangs_its_peer() {
    match gpus() {
        Err(reason) => return skip(&reason),
        Ok(n) if n < 2 => return skip(&format!("needs two GPUs, this host has {n}")),
        Ok(_) => {}
    }
    let outcomes = two_ranks(|rank, mut coll| {
        let mut x = [1i64];
        coll.all_reduce_sum_i64(&mut x).unwrap();
        if rank == 1 {
            // Gone without a word: the communicator is aborted and the heartbeat stops.
            drop(coll);
            return None;
        }
        let start = Instant::now();
        let err = coll.all_reduce_sum_i64(&mut x).unwrap_err();
        Some((start.elapsed(), err))
    });
    let (took, err) = outcomes[0].as_ref().expect("rank 0's outcome");
    assert!(matches!(err, CollectiveError::Aborted { .. }), "{err}");
    assert!(*took < Duration::from_secs(30), "rank 0 waited {took:?}");
}
