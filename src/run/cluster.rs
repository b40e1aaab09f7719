//! `trainctl run --cluster`: the torchrun flags become a job submitted to a trainctl coordinator.

use std::process::ExitCode;

use super::flags::RunArgs;

/// Submits the run as a job and follows it.
pub async fn main(_args: &RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("--cluster is not supported yet: submit a job file with `trainctl submit`")
}
