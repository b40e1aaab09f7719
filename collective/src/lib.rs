//! Collectives for trainctl's built-in workloads: the [`Collective`] trait, rendezvous of the ranks
//! of one attempt, three backends implementing the trait (a TCP ring, [`TcpRing`]; NCCL on a GPU,
//! [`NcclCollective`]; a ring over RDMA queue pairs, [`RdmaRing`]), and the example training
//! workload behind `trainctl example-train`.
//!
//! What it owns: meeting the ranks at `MASTER_ADDR:MASTER_PORT`, the ring connections and the ring
//! algorithms over them, bringing NCCL and RDMA up over that rendezvous and watching them, and the
//! deterministic example workload. The ranks meet in one of two ways: under trainctl's agent
//! (`TORCHELASTIC_USE_AGENT_STORE=True`) the agent serves a TCPStore there (the `trainctl-store`
//! crate, fresh for every attempt) and every rank, rank 0 included, publishes its address to it and
//! reads the others' through a small blocking client; otherwise (run by hand or by another
//! launcher) rank 0 listens there itself, the others join it and receive the address table. The
//! NCCL and RDMA backends meet the same way and send their bootstrap records (rank 0's NCCL
//! `UniqueId`, every rank's queue pair records) over the TCP ring that results, which then stays as
//! the control ring of their watchdog. What it does not: serving the store (the agent does), the
//! vendor libraries themselves (`trainctl-ffi` opens NCCL and libibverbs at run time and holds all
//! of their `unsafe`; CUDA memory goes through cudarc's safe API), and launching or supervising
//! rank processes (the agent does that and passes `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`, `TRAINCTL_NODE_ADDR` and, for GPUs,
//! `CUDA_VISIBLE_DEVICES` and the `NCCL_*` variables in the environment).
//!
//! Everything uses blocking `std::net` sockets and threads: a rank does nothing else while it
//! waits on a collective, and no async runtime is needed (the store crate's codec is reused, its
//! tokio server and client are not).
//!
//! # Layout
//!
//! - `error`: [`CollectiveError`], the one error type of the collectives.
//! - `device`: what the trait says about GPU work: [`DType`], [`HostBufMut`], [`DeviceBufMut`],
//!   [`Device`], [`AbortHandle`].
//! - [`checkpoint`]: the blocking HTTP client of the rank side of trainctl's checkpoint contract
//!   ([`commit_checkpoint`], [`report_progress`], [`commit_from_env`]).
//! - `wire`: the byte format of every message, as pure encode/decode functions.
//! - `schedule`: the ring algorithm's chunking and step arithmetic, pure.
//! - `tcp`: rendezvous ([`RendezvousConfig`], [`MasterListener`]: the path through rank 0) and
//!   [`TcpRing`].
//! - `store_rendezvous`: the path through the agent's store (keys under `trainctl/rdzv/`).
//! - `store_client`: the blocking TCPStore client it uses (`trainctl_store::codec` for the bytes).
//! - `bootstrap`: byte records sent to or gathered from every rank over a working collective.
//! - [`nccl`]: [`NcclCollective`], one rank per process on one GPU.
//! - [`rdma`]: [`RdmaRing`], and `rdma::plan`, its schedule and credits, pure.
//! - [`watchdog`]: the heartbeat over the control ring and the pure abort decision
//!   ([`watchdog::decide`]) that keep a dead peer from hanging the NCCL and RDMA backends.
//! - [`example`]: the example workload ([`example_train`], [`example_train_main`]; `--device`,
//!   `--transport`).
//! - `params_file`: the example workload's checkpoint file, written atomically.
//! - `signal`: the `SIGUSR1` "checkpoint now" flag (the crate's only `unsafe`).
//! - `prng`: SplitMix64 for synthetic data and session ids.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod bootstrap;
pub mod checkpoint;
mod device;
mod error;
pub mod example;
pub mod nccl;
mod params_file;
mod prng;
pub mod rdma;
mod schedule;
mod signal;
mod store_client;
mod store_rendezvous;
mod tcp;
#[cfg(test)]
mod testing;
pub mod watchdog;
mod wire;

pub use checkpoint::{
    commit_checkpoint, commit_from_env, report_progress, AgentEndpoint, CheckpointError,
};
pub use device::{AbortHandle, DType, Device, DeviceBufMut, HostBufMut};
pub use error::CollectiveError;
pub use example::{
    example_train, example_train_from_env, example_train_main, example_train_with, exit_code,
    nccl_options_from_env, params_checksum, parse_args, rendezvous_config_from_env,
    run_options_from_env, CheckpointRecord, DeviceChoice, ExampleArgs, ExampleError, Fault,
    FaultKind, ResumePoint, RunOptions, TrainConfig, TrainSummary, Transport,
};
pub use nccl::{NcclCollective, NcclOptions};
pub use rdma::{RdmaOptions, RdmaRing};
pub use signal::install_checkpoint_signal;
pub use tcp::{MasterListener, RendezvousConfig, TcpRing};

use std::sync::Arc;

use cudarc::driver::CudaStream;

/// Largest world size a rendezvous accepts.
pub const MAX_WORLD_SIZE: u32 = 16_384;

/// Collective operations among the ranks of one attempt, each rank holding one value of this
/// trait. The TCP ring implements it today; NCCL and ibverbs backends will implement it later.
///
/// Every rank must call the same operations in the same order with buffers of the same length
/// (and the same root); implementations detect a mismatch where they can and fail with
/// [`CollectiveError::OpMismatch`] rather than mixing data.
pub trait Collective {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> u32;

    /// Number of ranks.
    fn world_size(&self) -> u32;

    /// Replaces `buf` on every rank with the element-wise sum of every rank's `buf`.
    ///
    /// Every rank ends with exactly the same bits, and the same inputs on the same world size give
    /// the same bits on every run (the summation order depends only on the world size and the
    /// buffer length).
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `buf` on every rank with the element-wise sum of every rank's `buf`, with
    /// wrapping (two's complement) addition.
    ///
    /// Integer addition is associative and commutative, so unlike [`Self::all_reduce_sum_f32`]
    /// the result is the same whatever the world size and whatever order the ranks add in: it
    /// depends only on the multiset of values summed. The example workload reduces fixed-point
    /// gradients this way so that its training does not depend on the world size.
    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError>;

    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError>;

    /// Returns on each rank only once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// The backend's short name for messages: "tcp", "nccl", "rdma".
    fn backend(&self) -> &'static str {
        "host"
    }

    /// Where this backend moves data. Default: host memory.
    fn device(&self) -> Device {
        Device::Host
    }

    /// Replaces `buf` with the element-wise sum over the ranks, for any [`DType`]. The default
    /// serves f32 and i64 through [`Self::all_reduce_sum_f32`] and [`Self::all_reduce_sum_i64`]
    /// and refuses the other types with [`CollectiveError::Unsupported`].
    fn all_reduce_sum(&mut self, buf: HostBufMut<'_>) -> Result<(), CollectiveError> {
        match buf {
            HostBufMut::F32(b) => self.all_reduce_sum_f32(b),
            HostBufMut::I64(b) => self.all_reduce_sum_i64(b),
            other => Err(CollectiveError::Unsupported {
                backend: self.backend(),
                what: format!("an all-reduce of {} host buffers", other.dtype()),
                accepted: "f32 and i64 host buffers",
            }),
        }
    }

    /// Replaces the GPU buffer `buf` with the element-wise sum over the ranks, in place, ordered
    /// on [`Self::stream`] after the work already enqueued there; returns once the sum is in
    /// `buf`. The buffer must be on [`Self::device`]. The default (a host backend) refuses with
    /// [`CollectiveError::Unsupported`].
    fn all_reduce_sum_device(&mut self, buf: DeviceBufMut<'_>) -> Result<(), CollectiveError> {
        Err(CollectiveError::Unsupported {
            backend: self.backend(),
            what: format!("an all-reduce of a {} GPU buffer", buf.dtype()),
            accepted: "host buffers only (use the nccl backend, example-train --device cuda, for GPU memory)",
        })
    }

    /// The CUDA stream this collective's device operations are ordered on, for the caller's own
    /// work on the buffers. `None` for a host backend.
    fn stream(&self) -> Option<Arc<CudaStream>> {
        None
    }

    /// A handle that aborts this collective from another thread. `None` when the backend cannot
    /// be interrupted but only times out: the TCP ring, whose operations fail as soon as a
    /// neighbour's connection closes and after [`TcpRing::set_op_timeout`] otherwise.
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
}
