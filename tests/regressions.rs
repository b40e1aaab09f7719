//! Real-process regression tests for bugs found in review; each failed before its fix.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, job_file, processes_with, signal, DevCluster, HandCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent of *this* cluster named `name` (another local cluster may run agents of the same name).
fn agent_pid(cluster: &DevCluster, name: &str) -> u32 {
    let dir = cluster.data_dir.path().join("cluster").join(name);
    let pids = processes_with(&format!(
        "agent --coordinator {} --data-dir {} ",
        cluster.url(),
        dir.display()
    ));
    assert_eq!(pids.len(), 1, "expected one agent named {name}: {pids:?}");
    pids[0]
}

/// An agent cut off mid-job (SIGSTOP here, a partition in life) comes back. The coordinator released
/// its CPUs and MASTER_PORT when it declared the node lost, so the queued job is placed on the node
/// the moment the agent re-registers, and launched in the same heartbeat reply that tells the agent
/// to stop the old ranks, which then have `stop_grace_ms` to exit. Here the old ranks take 6 s to
/// exit on SIGTERM (as a job that checkpoints on SIGTERM does): the new job runs beside them.
#[test]
fn a_returning_cut_off_agent_gets_no_new_work_until_its_old_ranks_are_gone() {
    let cluster = DevCluster::start_with(1, &["--node-timeout-ms", "2000"], &[]);
    let dir = tempfile::tempdir().unwrap();
    // procs_per_node = 2 takes cpus_per_node = 2: the whole of a 2-CPU test machine's agent.
    let old = job_file(
        dir.path(),
        "old",
        "name = \"old\"\n[launch]\ncommand = [\"sh\", \"-c\", \"trap 'sleep 6.48011; exit 0' TERM; echo up; sleep 4801.1 & wait\"]\n[resources]\nnodes = 1\nprocs_per_node = 2\ncpus_per_node = 2\n",
    );
    let old = cluster.submit(&old);
    cluster.wait_state(&old, "running", JOB_TIMEOUT);
    let agent = agent_pid(&cluster, "node-1");
    signal(agent, libc::SIGSTOP);
    // The lost host's job waits to be placed again; cancelled, it leaves its share held for the
    // silent agent's ranks, which may still run.
    cluster.wait_state(&old, "pending", Duration::from_secs(30));
    assert!(cluster.cli(&["cancel", &old]).status.success());
    cluster.wait_state(&old, "cancelled", Duration::from_secs(10));

    let new = job_file(
        dir.path(),
        "new",
        "name = \"new\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo new; sleep 4802.2\"]\n[resources]\nnodes = 1\nprocs_per_node = 2\ncpus_per_node = 2\n",
    );
    let new = cluster.submit(&new);
    assert_eq!(cluster.job(&new)["state"], "pending");
    signal(agent, libc::SIGCONT);

    // Watch until the old job's processes are gone; the new job must not have started before that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut overlap = None;
    while Instant::now() < deadline {
        let old_alive = processes_with("4801").len();
        let new_alive = processes_with("sleep 4802.2").len();
        if old_alive > 0 && new_alive > 0 {
            overlap = Some((old_alive, new_alive));
            break;
        }
        if old_alive == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let new_job = cluster.job(&new);
    let old_job = cluster.job(&old);
    signal(agent, libc::SIGCONT);
    let _ = cluster.cli(&["cancel", &new]);
    assert!(
        overlap.is_none(),
        "job {new} ({} on port {}) ran beside {:?} processes of job {old} (port {}) on the same host",
        new_job["state"],
        new_job["master_port"],
        overlap,
        old_job["master_port"],
    );
}

/// The coordinator acknowledges log bytes once they are written, not fsynced. A coordinator host
/// that crashes (power, kernel) comes back with its Raft state (fsynced) but with the tail of a
/// rank's log file gone: shorter than what it acknowledged. Simulated here by truncating the file
/// while the coordinator is down. The bug: the agent kept `shipped = max(shipped, stored_until)`,
/// never resent the gap, and reported the rank's exit only once everything was shipped, so the job
/// ran for ever. Now the agent takes the coordinator's acknowledged offset as the truth and resends.
#[test]
fn a_coordinator_that_lost_the_tail_of_a_log_gets_it_again_and_sees_the_job_end() {
    let mut cluster = HandCluster::start(1);
    let dir = cluster.dir.path().to_path_buf();
    let spec = job_file(
        &dir,
        "two-lines",
        "name = \"two-lines\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo first; sleep 4; echo second\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    );
    let id = cluster.json(&["submit", spec.to_str().unwrap()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(JOB_TIMEOUT, "the first line stored", || {
        let out = cluster.cli(&["logs", &id]);
        String::from_utf8_lossy(&out.stdout)
            .contains("first")
            .then_some(())
    });
    // Let the agent receive the acknowledgement of the first line.
    std::thread::sleep(Duration::from_millis(1500));

    cluster.kill_coordinator();
    let rank_log = cluster
        .coordinator_dir()
        .join(format!("logs/job-{id}/attempt-0/rank-0.log"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rank_log)
        .unwrap()
        .set_len(0)
        .unwrap();
    let data = cluster.coordinator_dir();
    cluster.start_coordinator(&data);

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        last = cluster.json(&["status", &id]);
        if last["state"] == "succeeded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = String::from_utf8(cluster.cli(&["logs", &id]).stdout).unwrap();
    drop(cluster);
    assert_eq!(
        last["state"], "succeeded",
        "the job did not end 16 s after its rank exited; logs now: {logs:?}"
    );
    assert!(logs.contains("second"), "{logs}");
}
