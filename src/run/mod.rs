//! `trainctl run`: a drop-in for `torchrun` (issue 8).
//!
//! - `flags`: torchrun's command line (both spellings, `PET_*`), parsed purely into [`flags::RunArgs`].
//! - `workers`: one attempt of the local worker group: spawn, console and log files, stop, summary.
#![cfg_attr(not(test), allow(dead_code))]

pub mod flags;
pub mod workers;
