//! The store: a TCPStore server speaking PyTorch's wire protocol, so that `torch.distributed`'s
//! own client (libuv and legacy) finds its peers through trainctl instead of through a store
//! hosted by rank 0.
//!
//! - [`codec`]: the wire format, pure (decode from partial buffers, encode).
//! - [`keyspace`]: what each request means, pure ([`Keyspace::apply`]: request in, reply and
//!   woken connections out).
//! - [`server`]: the tokio server ([`StoreServer`]): handshake, bounds, two keyspaces
//!   ([`Namespace`]): the workers' one, emptied for every attempt, and trainctl's control one.
//! - [`client`]: an async client ([`StoreClient`]) for trainctl's launchers and tests.
//!
//! Who serves it: the agent of a job's group rank 0 (cluster jobs), the launcher of node 0
//! (`trainctl run`), or `trainctl store --listen ADDR` (standalone).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod keyspace;
pub mod server;

pub use client::{StoreClient, StoreError};
pub use codec::Limits;
pub use keyspace::Keyspace;
pub use server::{Namespace, StoreConfig, StoreServer, StoreStats};
