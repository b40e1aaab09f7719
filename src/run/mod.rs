//! `trainctl run`: a drop-in for `torchrun` (issue 8).
//!
//! - `flags`: torchrun's command line (both spellings, `PET_*`), parsed purely into [`flags::RunArgs`].
//! - `launch`: standalone, static and c10d runs on hosts without a trainctl cluster.
//! - `rendezvous`: how the launchers of a run meet, round after round, through the run's store.
//! - `workers`: one attempt of the local worker group: spawn, console and log files, stop, summary.
//! - `cluster`: `--cluster`, the run as a job of a trainctl cluster.

mod cluster;
pub mod flags;
pub mod launch;
pub mod rendezvous;
pub mod workers;
