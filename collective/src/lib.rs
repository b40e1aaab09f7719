//! Collectives for trainctl's built-in workloads: the [`Collective`] trait, rendezvous of the ranks
//! of one attempt, a TCP ring transport ([`TcpRing`]) implementing the trait, and the example
//! training workload behind `trainctl example-train`.
//!
//! What it owns: meeting the ranks (rank 0 listens on `MASTER_ADDR:MASTER_PORT`, the others join
//! and receive the address table), the ring connections and the ring algorithms over them, and the
//! deterministic example workload. What it does not: NCCL and ibverbs transports (they come later,
//! as further implementations of the same trait, with their `unsafe` kept in `ffi/` and the lowest
//! layer here), and launching or supervising rank processes (the agent does that and passes
//! `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` and `TRAINCTL_NODE_ADDR` in the environment).
//!
//! Everything uses blocking `std::net` sockets and threads: a rank does nothing else while it
//! waits on a collective, and no async runtime is needed.
//!
//! # Layout
//!
//! - `error`: [`CollectiveError`], the one error type.
//! - `wire`: the byte format of every message, as pure encode/decode functions.
//! - `schedule`: the ring algorithm's chunking and step arithmetic, pure.
//! - `tcp`: rendezvous ([`RendezvousConfig`], [`MasterListener`]) and [`TcpRing`].
//! - [`example`]: the example workload ([`example_train`], [`example_train_main`]).
//! - `prng`: SplitMix64 for synthetic data and session ids.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod example;
mod prng;
mod schedule;
mod tcp;
mod wire;

pub use error::CollectiveError;
pub use example::{
    example_train, example_train_from_env, example_train_main, params_checksum, parse_args,
    rendezvous_config_from_env, ExampleError, TrainConfig, TrainSummary,
};
pub use tcp::{MasterListener, RendezvousConfig, TcpRing};

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

    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError>;

    /// Returns on each rank only once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}
