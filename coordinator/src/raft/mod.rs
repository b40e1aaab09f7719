//! Raft glue: openraft's type configuration, the redb-backed log and state machine, and the network.
//!
//! The adapters here are thin: the state machine's `apply` hands each committed [`Command`] to the pure
//! [`State::apply`](crate::state::State::apply) (and appends the rank logs of `AppendLogs` to the
//! coordinator's files). What they store is versioned: see [`format`].

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers return it.
#![allow(clippy::result_large_err)]

use crate::state::{Command, CommandOutcome};

pub mod elections;
pub mod format;
pub mod log_store;
pub mod network;
pub mod peer_auth;
pub mod state_machine;

openraft::declare_raft_types!(
    /// Types of trainctl's Raft: commands in, outcomes out, u64 server ids, HTTP addresses, and
    /// snapshots as files (built, sent and received in chunks, never whole in memory).
    pub TypeConfig:
        D = Command,
        R = CommandOutcome,
        SnapshotData = tokio::fs::File,
);

/// A coordinator's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Raft server id of a coordinator.
pub type ServerId = u64;
/// Storage error of this Raft.
pub type StorageError = openraft::StorageError<ServerId>;

/// Runs blocking storage work (redb, fsync) off the async threads.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| openraft::StorageIOError::write(&e))?
}
