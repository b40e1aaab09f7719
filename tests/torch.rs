//! A real client no one here wrote: PyTorch's `torch.distributed` (gloo, CPU), launched by trainctl on a
//! local cluster of 2 hosts x 2 ranks, finding its peers through MASTER_ADDR/MASTER_PORT; and the same
//! example checkpointing through the trainctl contract and resuming on a spare after its host is killed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    eventually, job_file, path_with_venv, processes_with, python_with_torch, repo, strs,
    DevCluster, HandCluster,
};

#[test]
fn pytorch_ddp_job_runs_across_two_hosts() {
    let path = path_with_venv();
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

/// A job file running the ddp-torch example with `python` (an absolute path: agents of a hand-started
/// cluster inherit this process's PATH) on `nodes` hosts x `procs` ranks, checkpointing under `dir/ckpt`.
fn torch_job(
    dir: &Path,
    name: &str,
    python: &Path,
    nodes: u32,
    procs: u32,
    args: &[&str],
) -> PathBuf {
    let argv: Vec<String> = [python.to_str().unwrap(), "-u", "train.py"]
        .iter()
        .chain(args)
        .map(|a| format!("{a:?}"))
        .collect();
    let workdir = repo().join("jobs/examples/ddp-torch");
    job_file(
        dir,
        name,
        &format!(
            "name = \"{name}\"\n[launch]\ncommand = [{}]\nworkdir = {:?}\nenv = {{ PYTHONUNBUFFERED = \"1\", OMP_NUM_THREADS = \"1\" }}\n\
             [resources]\nnodes = {nodes}\nprocs_per_node = {procs}\ngpus_per_node = 0\n\
             [failure]\nmax_restarts = 2\n[checkpoint]\ndir = \"{}/ckpt/{{job}}\"\nkeep = 2\n",
            argv.join(", "),
            workdir.to_str().unwrap(),
            dir.display()
        ),
    )
}

/// The checksum of rank 0's `TORCH_DDP_OK` line.
fn torch_checksum(logs: &str) -> Option<String> {
    logs.lines()
        .filter(|l| l.contains(" rank 0] TORCH_DDP_OK "))
        .find_map(|l| l.split("checksum=").nth(1))
        .map(|c| c.trim().to_string())
}

#[test]
fn pytorch_job_resumes_on_a_spare_after_its_host_is_killed() {
    let t0 = Instant::now();
    let python = python_with_torch();
    let mut cluster = HandCluster::start_with(3, 2000);
    let dir = tempfile::tempdir().unwrap();
    // The seed is this test's marker: every rank's command line carries it.
    let args = [
        "--steps",
        "12",
        "--seed",
        "4729",
        "--checkpoint-every",
        "2",
        "--step-delay-ms",
        "700",
    ];
    let marker = "--seed 4729";
    let timeout = Duration::from_secs(120);

    // The reference: the same job, uninterrupted.
    let reference = cluster.submit(&torch_job(dir.path(), "reference", &python, 2, 1, &args));
    let done = cluster.wait_state(&reference, "succeeded", timeout);
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done:#}");
    let ref_logs = cluster.attempt_logs(&reference, 0);
    let expected = torch_checksum(&ref_logs).unwrap_or_else(|| panic!("no checksum: {ref_logs}"));
    assert!(!ref_logs.contains("RESUMED"), "{ref_logs}");
    eprintln!("reference run done after {:?}", t0.elapsed());

    let id = cluster.submit(&torch_job(dir.path(), "resumed", &python, 2, 1, &args));
    cluster.wait_state(&id, "running", timeout);
    let before = eventually(timeout, "a committed checkpoint", || {
        let j = cluster.json(&["status", &id]);
        if j["state"] != "running" {
            return None;
        }
        (!j["checkpoints"].as_array()?.is_empty()).then_some(j)
    });
    let first = strs(&before["attempts"][0]["nodes"]);
    assert_eq!(first.len(), 2, "{before:#}");
    let spare = ["host-1", "host-2", "host-3"]
        .into_iter()
        .find(|h| !first.iter().any(|f| f == h))
        .unwrap();
    // Lose the host of rank 0 (the process group's store), mid-run, after a commit.
    let victim = before["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rank"] == 0)
        .and_then(|r| r["node"].as_str())
        .unwrap_or_else(|| panic!("no rank 0 in {before:#}"))
        .to_string();
    assert!(first.contains(&victim), "{before:#}");
    let committed = before["checkpoints"][0]["step"].as_u64().unwrap();
    eprintln!(
        "killing {victim} (rank 0) after {:?}, checkpoint step {committed} committed",
        t0.elapsed()
    );
    cluster.kill_agent(&victim);

    let job = cluster.wait_state(&id, "succeeded", timeout);
    eprintln!("resumed job succeeded after {:?}", t0.elapsed());
    assert_eq!(
        job["restarts"], 0,
        "a lost host is not the job's fault: {job:#}"
    );
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    let end = attempts[0]["end"].as_str().unwrap_or_default();
    assert!(end.contains(&victim) && end.contains("lost"), "{end}");
    let second = strs(&attempts[1]["nodes"]);
    assert!(
        second.iter().any(|n| n == spare) && !second.contains(&victim),
        "placed again on the spare {spare}: {second:?}\n{job:#}"
    );
    let last_attempt = attempts[1]["attempt"].as_u64().unwrap_or(1) as u32;
    let last = cluster.attempt_logs(&id, last_attempt);
    for rank in 0..2 {
        assert!(
            last.lines()
                .any(|l| l.contains(&format!(" rank {rank}] RESUMED from="))
                    && l.contains(&format!("attempt={last_attempt}"))),
            "rank {rank} did not resume:\n{last}"
        );
    }
    let resumed_step: u64 = last
        .lines()
        .filter(|l| l.contains("] RESUMED from="))
        .find_map(|l| l.split(" step=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no RESUMED step: {last}"));
    assert!(resumed_step >= committed && resumed_step < 12, "{last}");
    assert!(
        !last.contains(&format!("step {}/12 ", resumed_step)),
        "steps up to the checkpoint are not run again: {last}"
    );
    assert_eq!(
        torch_checksum(&last).as_deref(),
        Some(expected.as_str()),
        "the resumed run ends where the uninterrupted one did:\n{last}"
    );
    assert!(!last.contains("TORCH_DDP_FAIL"), "{last}");

    eventually(
        Duration::from_secs(20),
        "every python rank of this test gone",
        || processes_with(marker).is_empty().then_some(()),
    );
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn each_attempt_of_a_torch_job_gets_an_empty_store_from_the_agent() {
    let path = path_with_venv();
    let cluster = DevCluster::start_with(2, &[], &[("PATH", path)]);
    let dir = tempfile::tempdir().unwrap();
    let script = repo().join("tests/python/store_attempts.py");
    let spec = job_file(
        dir.path(),
        "store-attempts.toml",
        &format!(
            "name = \"store-attempts\"\n[launch]\ncommand = [\"python3\", \"-u\", {:?}]\n\
             env = {{ OMP_NUM_THREADS = \"1\" }}\n\
             [resources]\nnodes = 2\nprocs_per_node = 2\ngpus_per_node = 0\n\
             [failure]\nmax_restarts = 1\n",
            script.to_str().unwrap()
        ),
    );
    let out = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let id = job["id"].as_str().unwrap_or("1").to_string();
    let logs = cluster.logs(&id);
    assert!(out.status.success(), "the job failed: {job}\n{logs}");
    assert_eq!(job["state"], "succeeded", "{logs}");
    let first = cluster.cli(&["logs", &id, "--attempt", "0"]);
    let logs = format!("{}{logs}", String::from_utf8_lossy(&first.stdout));
    for attempt in 0..2 {
        for rank in 0..4 {
            let line =
                format!("STORE_ATTEMPT attempt={attempt} rank={rank} world=4 agent_store=True");
            assert!(logs.contains(&line), "missing {line:?}:\n{logs}");
        }
    }
    for rank in 0..4 {
        let line = format!("STORE_FRESH attempt=1 rank={rank} stale_key_visible=False");
        assert!(logs.contains(&line), "missing {line:?}:\n{logs}");
    }
}
