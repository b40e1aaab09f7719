//! [`NcclCollective`]: the [`Collective`] trait over NCCL, one rank per process and one GPU per
//! rank, through `trainctl_ffi::nccl` (NCCL opened at run time; all `unsafe` stays in `ffi/`).
//!
//! # Bring-up ([`NcclCollective::connect`])
//!
//! 1. The host is checked first, before any peer waits on this rank: the CUDA driver library, a
//!    GPU ([`select_gpu`]: device 0 of the process, i.e. the one `CUDA_VISIBLE_DEVICES` names,
//!    or `LOCAL_RANK`'s when several are visible), and NCCL. A missing one is
//!    [`CollectiveError::Unavailable`], naming it.
//! 2. The ordinary rendezvous builds a TCP ring (through the agent's store, or rank 0's listener:
//!    [`RendezvousConfig`]); rank 0 makes the NCCL `UniqueId` and it travels to every rank over
//!    that ring (`bootstrap::broadcast_bytes`).
//! 3. The ring becomes the watchdog's control ring (`crate::watchdog`) and every rank calls
//!    `ncclCommInitRank` on its GPU. A peer that dies during the init cannot be aborted out of
//!    it (the communicator does not exist yet): the watchdog then ends the process with the
//!    reason, and the launcher restarts the gang.
//!
//! # Operations
//!
//! Host buffers (the trait's typed methods, which the example workload uses) are copied to the
//! GPU, all-reduced there and copied back; device buffers
//! ([`Collective::all_reduce_sum_device`]) are reduced in place on [`Collective::stream`]. Every
//! operation waits for its completion by polling a CUDA event, never in a blocking
//! synchronisation, so an abort by the watchdog (peer lost or failed, NCCL's asynchronous error,
//! an operation past [`NcclOptions::op_timeout`]) returns [`CollectiveError::Aborted`] at once.
//! Broadcast sends the f32 bit patterns as integers in a sum where every rank but the root adds
//! zeros, so it is exact to the bit; a barrier is a one-element all-reduce.
//!
//! Unlike the TCP ring, the f32 sum's order of addition is NCCL's: bit-identical results across
//! runs are NCCL's promise (same GPUs, same version, same configuration), not trainctl's. The
//! example workload's sums are i64 and stay exact.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use trainctl_ffi::cuda;
use trainctl_ffi::nccl::{Communicator, Nccl, NcclType, ReduceOp, UniqueId, UNIQUE_ID_BYTES};

use crate::bootstrap;
use crate::watchdog::{Watchdog, WatchdogLimits, Watched};
use crate::{
    AbortHandle, Collective, CollectiveError, Device, DeviceBufMut, HostBufMut, RendezvousConfig,
    TcpRing,
};

/// The backend's name in messages.
const BACKEND: &str = "nccl";
/// Default for [`NcclOptions::op_timeout`]: torch's default NCCL timeout.
pub const DEFAULT_OP_TIMEOUT_SECS: u64 = 600;
/// Default for [`NcclOptions::heartbeat_timeout`].
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 60;
/// How long [`NcclCollective::finish`] waits for the other ranks to finish too.
const FINISH_WAIT_SECS: u64 = 60;
/// Exit status of a process whose watchdog aborted during `ncclCommInitRank`.
pub const INIT_ABORT_EXIT_CODE: i32 = 1;
/// The completion poll spins this long before it starts sleeping between looks.
const SPIN_BEFORE_SLEEP_US: u64 = 200;
/// Pause between completion polls after the spin.
const COMPLETION_POLL_US: u64 = 50;

/// How an [`NcclCollective`] is brought up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclOptions {
    /// The NCCL library to open; `None`: `libnccl.so.2` through the loader's search path.
    pub library: Option<PathBuf>,
    /// `LOCAL_RANK`: which visible GPU to use when the process sees several.
    pub local_rank: Option<u32>,
    /// Longest one operation may take before the watchdog aborts the communicator; `None`: no
    /// limit (a dead peer is still caught by the heartbeat).
    pub op_timeout: Option<Duration>,
    /// Longest a heartbeat round may take before the peers count as stuck.
    pub heartbeat_timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions {
            library: None,
            local_rank: None,
            op_timeout: Some(Duration::from_secs(DEFAULT_OP_TIMEOUT_SECS)),
            heartbeat_timeout: Duration::from_secs(DEFAULT_HEARTBEAT_TIMEOUT_SECS),
        }
    }
}

/// The CUDA ordinal this rank uses among the `visible` GPUs of the process: the only one when
/// exactly one is visible (trainctl's agent gives each rank one GPU in `CUDA_VISIBLE_DEVICES`,
/// whatever its `LOCAL_RANK`), else `local_rank`'s (torchrun's convention), else 0.
pub fn select_gpu(visible: usize, local_rank: Option<u32>) -> Result<usize, String> {
    match (visible, local_rank) {
        (0, _) => Err(
            "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES and nvidia-smi)".to_owned(),
        ),
        (1, _) => Ok(0),
        (_, None) => Ok(0),
        (n, Some(r)) if (r as usize) < n => Ok(r as usize),
        (n, Some(r)) => Err(format!(
            "LOCAL_RANK={r} but the process sees {n} GPUs (ordinals 0 to {}); give each rank its own GPU through CUDA_VISIBLE_DEVICES, or a LOCAL_RANK below {n}",
            n - 1
        )),
    }
}

/// Checks that this host can run the NCCL backend and opens NCCL: the CUDA driver, a GPU for
/// this rank, the library. Returns NCCL and the CUDA ordinal to use.
pub fn open_host(opts: &NcclOptions) -> Result<(Arc<Nccl>, usize), CollectiveError> {
    let unavailable = |missing: String| CollectiveError::Unavailable {
        backend: BACKEND,
        missing,
    };
    if !cuda::driver_present() {
        return Err(unavailable(
            "no CUDA driver library (libcuda.so.1): install the NVIDIA driver, or run with --device cpu".to_owned(),
        ));
    }
    let gpus = cuda::cuda_devices().map_err(|e| unavailable(e.to_string()))?;
    let ordinal = select_gpu(gpus.len(), opts.local_rank).map_err(unavailable)?;
    let nccl = match &opts.library {
        Some(path) => Nccl::open_path(path),
        None => Nccl::open(),
    }
    .map_err(|e| unavailable(e.to_string()))?;
    Ok((nccl, ordinal))
}

/// rank 0's `id` on every rank, over `coll` (the rendezvous' TCP ring). Ranks other than 0 pass
/// `None`.
pub(crate) fn share_unique_id(
    coll: &mut dyn Collective,
    id: Option<&[u8; UNIQUE_ID_BYTES]>,
) -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    let zeros = [0u8; UNIQUE_ID_BYTES];
    let bytes = bootstrap::broadcast_bytes(coll, 0, id.unwrap_or(&zeros))?;
    <[u8; UNIQUE_ID_BYTES]>::try_from(bytes.as_slice()).map_err(|_| CollectiveError::Io {
        context: "receive the NCCL unique id",
        source: io::Error::new(io::ErrorKind::InvalidData, "wrong length"),
    })
}

/// What the watchdog watches: the communicator.
struct WatchedComm(Arc<Communicator>);

impl Watched for WatchedComm {
    fn async_error(&self) -> Option<String> {
        match self.0.async_error() {
            Ok(e) => e.map(|e| e.to_string()),
            // After an abort the query itself fails; that is not news.
            Err(_) => None,
        }
    }

    fn abort(&self) {
        let _ = self.0.abort();
    }
}

/// During a blocking `ncclCommInitRank` nothing can be aborted: the process ends, with the reason.
fn exit_during_init(reason: &str) {
    eprintln!(
        "trainctl: the NCCL watchdog ended this rank during ncclCommInitRank (which cannot be interrupted): {reason}"
    );
    std::process::exit(INIT_ABORT_EXIT_CODE);
}

/// A [`Collective`] over NCCL on one GPU (module docs).
pub struct NcclCollective {
    rank: u32,
    world_size: u32,
    ordinal: usize,
    nccl: Arc<Nccl>,
    stream: Arc<CudaStream>,
    comm: Arc<Communicator>,
    watchdog: Option<Watchdog>,
    broken: Option<String>,
    init_time: Duration,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.ordinal)
            .field("nccl", &self.nccl.version().to_string())
            .finish()
    }
}

fn device_err(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CollectiveError {
    move |e| CollectiveError::Device {
        backend: BACKEND,
        during,
        source: Box::new(e),
    }
}

fn nccl_err(during: &'static str) -> impl Fn(trainctl_ffi::nccl::NcclError) -> CollectiveError {
    move |e| CollectiveError::Device {
        backend: BACKEND,
        during,
        source: Box::new(e),
    }
}

impl NcclCollective {
    /// Brings up this rank (module docs): checks the host, meets the other ranks, shares rank 0's
    /// unique id and creates the communicator on this rank's GPU.
    pub fn connect(
        rdzv: RendezvousConfig,
        opts: &NcclOptions,
    ) -> Result<NcclCollective, CollectiveError> {
        let (nccl, ordinal) = open_host(opts)?;
        let mut control = TcpRing::connect(rdzv)?;
        let started = Instant::now();
        let id = if control.rank() == 0 {
            Some(
                nccl.unique_id()
                    .map_err(nccl_err("making the NCCL unique id"))?,
            )
        } else {
            None
        };
        let bytes = share_unique_id(&mut control, id.as_ref().map(UniqueId::as_bytes))?;
        let id = UniqueId::from_bytes(&bytes).map_err(nccl_err("reading the NCCL unique id"))?;
        let (rank, world_size) = (control.rank(), control.world_size());
        let limits = WatchdogLimits {
            op_timeout: opts.op_timeout,
            heartbeat_timeout: opts.heartbeat_timeout,
        };
        let watchdog = Watchdog::start(control, limits, exit_during_init)?;
        let ctx = CudaContext::new(ordinal).map_err(device_err("opening the GPU"))?;
        ctx.bind_to_thread()
            .map_err(device_err("binding the GPU to this thread"))?;
        let stream = ctx
            .new_stream()
            .map_err(device_err("creating a CUDA stream"))?;
        let comm = Communicator::init_rank(&nccl, &id, world_size as usize, rank as usize)
            .map_err(nccl_err(
                "creating the NCCL communicator (ncclCommInitRank)",
            ))?;
        let comm = Arc::new(comm);
        watchdog.watch(Arc::new(WatchedComm(Arc::clone(&comm))));
        Ok(NcclCollective {
            rank,
            world_size,
            ordinal,
            nccl,
            stream,
            comm,
            watchdog: Some(watchdog),
            broken: None,
            init_time: started.elapsed(),
        })
    }

    /// The NCCL library in use.
    pub fn nccl(&self) -> &Arc<Nccl> {
        &self.nccl
    }

    /// How long the unique id exchange and `ncclCommInitRank` took on this rank.
    pub fn init_time(&self) -> Duration {
        self.init_time
    }

    /// Ends the collective in order: waits (up to a minute) until every rank has finished too,
    /// so that no rank destroys its communicator while a peer still needs it. True when every
    /// rank finished (the communicator is then destroyed); false when a peer was lost or failed
    /// first (it is then aborted, which never waits on a peer).
    pub fn finish(mut self) -> bool {
        let in_order = match self.watchdog.take() {
            Some(w) => w.finish(Duration::from_secs(FINISH_WAIT_SECS)),
            None => false,
        };
        if !in_order {
            let _ = self.comm.abort();
        }
        in_order
    }

    fn watchdog(&self) -> &Watchdog {
        self.watchdog
            .as_ref()
            .expect("the watchdog lives as long as the collective")
    }

    /// Runs one operation: refuses after an earlier failure, times it for the watchdog, and on a
    /// failure breaks the collective and raises this rank's failed flag for the peers.
    fn run_op<R>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken {
                cause: cause.clone(),
            });
        }
        self.watchdog().op_started();
        let result = op(self);
        self.watchdog().op_finished();
        let result = match (result, self.watchdog().aborted()) {
            (_, Some(reason)) => Err(CollectiveError::Aborted { reason }),
            (result, None) => result,
        };
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            self.watchdog().fail();
        }
        result
    }

    /// Waits for the work enqueued on the stream so far, by polling an event (module docs).
    fn wait(&self) -> Result<(), CollectiveError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(device_err("recording a CUDA event"))?;
        let start = Instant::now();
        loop {
            if let Some(reason) = self.watchdog().aborted() {
                return Err(CollectiveError::Aborted { reason });
            }
            if event
                .try_is_complete()
                .map_err(device_err("waiting for the all-reduce"))?
            {
                return Ok(());
            }
            if start.elapsed() < Duration::from_micros(SPIN_BEFORE_SLEEP_US) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(COMPLETION_POLL_US));
            }
        }
    }

    /// Sum all-reduce of a device buffer on the stream, then waits.
    fn reduce_device<T: NcclType>(&self, buf: &mut CudaSlice<T>) -> Result<(), CollectiveError> {
        self.comm
            .all_reduce_in_place(buf, ReduceOp::Sum, &self.stream)
            .map_err(nccl_err("enqueuing the all-reduce (ncclAllReduce)"))?;
        self.wait()
    }

    /// Sum all-reduce of a host buffer: to the GPU, reduced, back.
    fn reduce_host<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        buf: &mut [T],
    ) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(device_err("copying to the GPU"))?;
        self.reduce_device(&mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(device_err("copying from the GPU"))
    }
}

impl Drop for NcclCollective {
    /// Without [`NcclCollective::finish`] (an error ended the run): aborts the communicator, since
    /// `ncclCommDestroy` may wait for peers that are gone or for an operation that never ends.
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            let _ = self.comm.abort();
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run_op(|c| c.reduce_host(buf))
    }

    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        self.run_op(|c| c.reduce_host(buf))
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidRoot {
                root,
                world_size: self.world_size,
            });
        }
        let mine = self.rank == root;
        self.run_op(|c| {
            let mut bits: Vec<u32> = if mine {
                buf.iter().map(|v| v.to_bits()).collect()
            } else {
                vec![0; buf.len()]
            };
            c.reduce_host(&mut bits)?;
            for (v, b) in buf.iter_mut().zip(bits) {
                *v = f32::from_bits(b);
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.run_op(|c| c.reduce_host(&mut [0i64]))
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn device(&self) -> Device {
        Device::Cuda {
            ordinal: self.ordinal,
        }
    }

    fn all_reduce_sum(&mut self, buf: HostBufMut<'_>) -> Result<(), CollectiveError> {
        self.run_op(|c| match buf {
            HostBufMut::F32(b) => c.reduce_host(b),
            HostBufMut::F64(b) => c.reduce_host(b),
            HostBufMut::I32(b) => c.reduce_host(b),
            HostBufMut::I64(b) => c.reduce_host(b),
        })
    }

    fn all_reduce_sum_device(&mut self, buf: DeviceBufMut<'_>) -> Result<(), CollectiveError> {
        self.run_op(|c| match buf {
            DeviceBufMut::F32(b) => c.reduce_device(b),
            DeviceBufMut::F64(b) => c.reduce_device(b),
            DeviceBufMut::I32(b) => c.reduce_device(b),
            DeviceBufMut::I64(b) => c.reduce_device(b),
        })
    }

    fn stream(&self) -> Option<Arc<CudaStream>> {
        Some(Arc::clone(&self.stream))
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(AbortHandle::new(self.watchdog().abort_fn()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{run_ranks, skip, venv_nccl, Path};

    #[test]
    fn the_gpu_is_the_only_visible_one_else_local_ranks() {
        let cases: &[(usize, Option<u32>, Result<usize, &str>)] = &[
            (1, None, Ok(0)),
            // The agent pins one GPU per rank; LOCAL_RANK then says nothing about the ordinal.
            (1, Some(5), Ok(0)),
            (8, Some(3), Ok(3)),
            (8, None, Ok(0)),
            (0, None, Err("the CUDA driver sees no GPU")),
            (0, Some(0), Err("the CUDA driver sees no GPU")),
            (
                2,
                Some(2),
                Err("LOCAL_RANK=2 but the process sees 2 GPUs (ordinals 0 to 1)"),
            ),
        ];
        for (visible, local_rank, want) in cases {
            let got = select_gpu(*visible, *local_rank);
            match (&got, want) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{visible} visible, {local_rank:?}"),
                (Err(e), Err(prefix)) => assert!(e.starts_with(prefix), "{e}"),
                _ => panic!("{visible} visible, {local_rank:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn options_default_to_torchs_timeout_and_the_loader_path() {
        let opts = NcclOptions::default();
        assert_eq!(opts.op_timeout, Some(Duration::from_secs(600)));
        assert_eq!(opts.library, None);
        assert_eq!(opts.local_rank, None);
    }

    /// A 128-byte id with every kind of byte, including the sign bits of the packed words.
    fn synthetic_id() -> [u8; UNIQUE_ID_BYTES] {
        std::array::from_fn(|i| match i % 4 {
            0 => 0xff,
            1 => 0x80,
            2 => 0,
            _ => (i * 7) as u8,
        })
    }

    #[test]
    fn rank_0s_unique_id_reaches_every_rank_through_both_rendezvous_paths() {
        for path in [Path::RankZero, Path::Store] {
            let ids = run_ranks(4, path, |mut ring| {
                let id = (ring.rank() == 0).then(synthetic_id);
                share_unique_id(&mut ring, id.as_ref()).unwrap()
            });
            assert_eq!(ids, vec![synthetic_id(); 4], "{path:?}");
        }
    }

    #[test]
    fn a_real_nccl_unique_id_survives_the_exchange() {
        let Some(lib) = venv_nccl() else {
            return skip(
                "no NCCL wheel in .venv (scripts/python-env.sh installs nvidia-nccl-cu13)",
            );
        };
        let nccl = Nccl::open_path(&lib).expect("the wheel's NCCL opens");
        let id = nccl
            .unique_id()
            .expect("ncclGetUniqueId works without a GPU");
        let sent = *id.as_bytes();
        let got = run_ranks(3, Path::Store, move |mut ring| {
            let mine = (ring.rank() == 0).then_some(sent);
            share_unique_id(&mut ring, mine.as_ref()).unwrap()
        });
        for bytes in got {
            assert_eq!(UniqueId::from_bytes(&bytes).unwrap(), id);
        }
    }

    #[test]
    fn without_a_cuda_driver_the_backend_names_what_is_missing() {
        if cuda::driver_present() {
            return skip("this host has a CUDA driver: the missing-driver error cannot be seen");
        }
        let err = open_host(&NcclOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::Unavailable {
                    backend: "nccl",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "the nccl backend cannot run on this host: no CUDA driver library (libcuda.so.1)"
            ),
            "{msg}"
        );
        assert!(msg.contains("--device cpu"), "{msg}");
    }
}
