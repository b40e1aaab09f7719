//! The coordinator: the cluster's replicated intent and the decisions made on it.
//!
//! It owns the [`state`] (jobs, nodes, allocations; changed only by commands applied through Raft),
//! the gang [`scheduler`] (a pure function over a snapshot), the Raft glue in [`raft`], the REST API in
//! [`api`], the agent gRPC service in [`agents`], the coordinator's copy of rank logs in [`logs`], and
//! the [`server`] that ties them together. It does not launch processes (that is the agent's job) and
//! does not parse job files (that is `trainctl-jobs`).
//!
//! # Layout
//! - [`state`]: `State::apply(Command)`, deterministic, no IO.
//! - [`scheduler`]: `plan(&ClusterSnapshot, &Resources) -> Placement`, no IO.
//! - [`launch`]: the environment every rank gets (the torchrun contract), no IO; [`nccl_env`]: its
//!   GPU, NCCL and RDMA part, decided from discovery with a reason per variable, no IO.
//! - [`raft`]: openraft's storage (redb) and network (HTTP) adapters.
//! - [`logs`]: rank logs shipped by agents, stored per job, attempt and rank.
//! - [`api`]: REST handlers, their OpenAPI document, and the one error type they return.
//! - [`agents`]: the gRPC service agents register and heartbeat with.
//! - [`http`]: the HTTP server under all three: header, idle and body timeouts, body size limits.
//! - [`membership`]: bootstrap, join, add, remove, leadership transfer; [`forward`]: REST requests
//!   answered by the leader (forwarded from followers; reads linearizable).
//! - [`server`]: `run(config, shutdown)`: one listener for REST, gRPC and Raft, plus the leader's loops.

pub mod agents;
pub mod api;
pub mod auth;
pub mod forward;
pub mod http;
pub mod launch;
pub mod log_repair;
pub mod logs;
pub mod membership;
pub mod nccl_env;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod supervise;
