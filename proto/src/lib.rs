//! The gRPC protocol between agents and the coordinator (`proto/agent.proto`), generated at build time.
//!
//! This crate owns the wire types and the tonic client and server stubs only; what the messages mean is
//! decided by `trainctl-coordinator` (the server) and `trainctl-agent` (the client).
#![allow(clippy::all, missing_docs)]

/// Version 1 of the agent protocol.
pub mod agent {
    tonic::include_proto!("trainctl.agent.v1");
}

/// gRPC metadata of an `UNAVAILABLE` answer from a coordinator that is not the Raft leader: the
/// leader's address (host:port), when that coordinator knows it. The agent goes there at once.
pub const LEADER_METADATA_KEY: &str = "x-trainctl-leader";
