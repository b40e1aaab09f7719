//! A real client no one here wrote: PyTorch's `torch.distributed` (gloo, CPU), launched by trainctl on a
//! local cluster of 2 hosts x 2 ranks, finding its peers through MASTER_ADDR/MASTER_PORT.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{repo, DevCluster};

/// The virtual environment's python, created (with torch) by scripts/python-env.sh if needed.
fn python_with_torch() -> PathBuf {
    let out = Command::new(repo().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("python-env.sh prints the python path")
            .trim(),
    )
}

#[test]
fn pytorch_ddp_job_runs_across_two_hosts() {
    let python = python_with_torch();
    let bin = python.parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cluster = DevCluster::start_with(2, &[], &[("PATH", path)]);
    let spec = repo().join("jobs/examples/ddp-torch/ddp-torch.toml");
    let out = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let id = job["id"].as_str().unwrap_or("1").to_string();
    let logs = cluster.logs(&id);
    assert!(out.status.success(), "the torch job failed: {job}\n{logs}");
    assert_eq!(job["state"], "succeeded");

    // Every rank joined the process group from its own host.
    for rank in 0..4 {
        let host = if rank < 2 { "node-1" } else { "node-2" };
        let line = format!("[{host} rank {rank}] RANK_JOINED rank={rank} world_size=4");
        assert!(logs.lines().any(|l| l == line), "missing {line:?}:\n{logs}");
    }
    // The all-reduce of (rank+1) over 4 ranks is 10, the all-gather lists every rank, and DDP left the
    // parameters bit-identical on every rank (train.py checks that and exits non-zero otherwise).
    assert!(
        logs.lines().any(|l| l.starts_with(
            "[node-1 rank 0] TORCH_DDP_OK world_size=4 allreduce=10 ranks=0,1,2,3 checksum="
        )),
        "{logs}"
    );
    assert!(!logs.contains("TORCH_DDP_FAIL"), "{logs}");
}
