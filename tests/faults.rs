//! Faults with real processes: an agent killed or cut off mid-job, a coordinator restarted mid-job.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, job_file, processes_with, signal, DevCluster, HandCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A job whose every rank is a shell with a `sleep MARKER` child: two processes per rank.
fn sleeper(dir: &Path, marker: &str, nodes: u32) -> std::path::PathBuf {
    job_file(
        dir,
        "sleeper",
        &format!(
            "name = \"sleeper\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo up; sleep {marker} & wait\"]\n[resources]\nnodes = {nodes}\nprocs_per_node = 2\n"
        ),
    )
}

fn agent_pid(name: &str) -> u32 {
    let pids = processes_with(&format!("--name {name} "));
    assert_eq!(pids.len(), 1, "expected one agent named {name}: {pids:?}");
    pids[0]
}

#[test]
fn an_agent_killed_mid_job_requeues_the_job_and_leaves_no_process() {
    let cluster = DevCluster::start_with(2, &["--node-timeout-ms", "2000"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let id = cluster.submit(&sleeper(dir.path(), "4721.1", 2));
    cluster.wait_state(&id, "running", JOB_TIMEOUT);
    eventually(
        Duration::from_secs(10),
        "shells and sleeps of 4 ranks",
        || (processes_with("sleep 4721.1").len() == 8).then_some(()),
    );

    signal(agent_pid("node-2"), libc::SIGKILL);
    // A host loss does not fail the job: it waits at the head of the queue for two hosts again,
    // as attempt 1, without spending a restart.
    let job = cluster.wait_state(&id, "pending", Duration::from_secs(30));
    assert_eq!(
        (job["attempt"].as_u64(), job["restarts"].as_u64()),
        (Some(1), Some(0))
    );
    let end = job["attempts"][0]["end"].as_str().unwrap();
    assert!(
        end.contains("node node-2 was lost") && end.contains("no heartbeat"),
        "{end}"
    );
    // The killed agent's ranks and their children die with it (its reaper); node-1 stops its own.
    eventually(Duration::from_secs(20), "every rank process gone", || {
        processes_with("4721.1").is_empty().then_some(())
    });
    let nodes = cluster.json(&["nodes"]);
    let node2 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap();
    assert_eq!(node2["status"], "down");
    assert!(node2["status_reason"]
        .as_str()
        .unwrap()
        .contains("no heartbeat"));
    // Logs printed before the loss are kept, per attempt.
    let out = cluster.cli(&["logs", &id, "--attempt", "0"]);
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(logs.contains("[node-2 rank 2] up"), "{logs}");
    assert!(cluster.cli(&["cancel", &id]).status.success());
}

#[test]
fn an_agent_cut_off_mid_job_stops_its_ranks_when_it_returns() {
    let cluster = DevCluster::start_with(2, &["--node-timeout-ms", "2000"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let id = cluster.submit(&sleeper(dir.path(), "4722.2", 2));
    cluster.wait_state(&id, "running", JOB_TIMEOUT);
    let agent = agent_pid("node-2");
    // A frozen agent is silent, as one behind a network partition is; its ranks keep running.
    signal(agent, libc::SIGSTOP);
    let job = cluster.wait_state(&id, "pending", Duration::from_secs(30));
    assert!(job["attempts"][0]["end"]
        .as_str()
        .unwrap()
        .contains("node-2"));
    eventually(Duration::from_secs(20), "node-1's ranks stopped", || {
        (processes_with("sleep 4722.2").len() == 4).then_some(())
    });
    // Back on the network: it registers again, stops the old attempt's ranks, and only then is
    // the job placed again (attempt 1 on both hosts: 8 processes, none of attempt 0).
    signal(agent, libc::SIGCONT);
    let job = cluster.wait_state(&id, "running", Duration::from_secs(30));
    assert_eq!(job["attempt"], 1);
    eventually(Duration::from_secs(20), "attempt 1's ranks only", || {
        (processes_with("sleep 4722.2").len() == 4 * 2).then_some(())
    });
    assert!(cluster.cli(&["cancel", &id]).status.success());
    eventually(Duration::from_secs(20), "every rank stopped", || {
        processes_with("4722.2").is_empty().then_some(())
    });
    eventually(
        Duration::from_secs(20),
        "node-2 up again with nothing allocated",
        || {
            let nodes = cluster.json(&["nodes"]);
            nodes
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["status"] == "up" && n["cpus_allocated"] == 0)
                .then_some(())
        },
    );
    // The cluster is usable again.
    let spec = job_file(dir.path(), "ok", "name = \"ok\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 2\nprocs_per_node = 1\n");
    let ok = cluster.submit(&spec);
    cluster.wait_state(&ok, "succeeded", JOB_TIMEOUT);
}

#[test]
fn a_coordinator_restarted_mid_job_loses_no_job_and_no_log_line() {
    let mut cluster = HandCluster::start(2);
    let dir = cluster.dir.path().to_path_buf();
    let quick = job_file(&dir, "quick", "name = \"quick\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n");
    let out = cluster.cli(&["submit", quick.to_str().unwrap(), "--wait"]);
    assert!(out.status.success());
    let ticker = job_file(
        &dir,
        "ticker",
        "name = \"ticker\"\n[launch]\ncommand = [\"sh\", \"-c\", \"for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done\"]\n[resources]\nnodes = 2\nprocs_per_node = 2\n",
    );
    let id = cluster.json(&["submit", ticker.to_str().unwrap()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(JOB_TIMEOUT, "the ticker to run", || {
        (cluster.json(&["status", &id])["state"] == "running").then_some(())
    });

    // Kill the coordinator hard, mid-job, and bring it back on the same data dir.
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_millis(1500));
    let data = cluster.coordinator_dir();
    cluster.start_coordinator(&data);

    let job = eventually(
        JOB_TIMEOUT,
        "the ticker to finish after the restart",
        || {
            let job = cluster.json(&["status", &id]);
            (job["state"] == "succeeded").then_some(job)
        },
    );
    assert_eq!(job["ranks"].as_array().unwrap().len(), 4);
    let logs = String::from_utf8(cluster.cli(&["logs", &id]).stdout).unwrap();
    for rank in 0..4 {
        let host = if rank < 2 { "host-1" } else { "host-2" };
        for tick in 1..=8 {
            let line = format!("[{host} rank {rank}] tick {tick}");
            assert!(logs.lines().any(|l| l == line), "lost {line:?}: {logs}");
        }
    }
    let jobs = cluster.json(&["list"]);
    let names: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quick", "ticker"], "every job survives the restart");
    assert_eq!(jobs[0]["state"], "succeeded");
}

#[test]
fn a_coordinator_with_a_new_state_gets_agents_that_stop_the_old_ranks() {
    let mut cluster = HandCluster::start(1);
    let dir = cluster.dir.path().to_path_buf();
    let id = cluster.json(&["submit", sleeper(&dir, "4723.3", 1).to_str().unwrap()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(JOB_TIMEOUT, "the sleeper to run", || {
        (cluster.json(&["status", &id])["state"] == "running").then_some(())
    });

    // The coordinator's data is gone (a new data dir): a new cluster state on the same address,
    // with the same CA (the operator's own).
    cluster.kill_coordinator();
    cluster.start_coordinator(&dir.join("second"));
    // The new state never admitted the agent: it is refused, stops the ranks of the state that no
    // longer exists, forgets its identity and exits, saying to join again.
    eventually(Duration::from_secs(30), "the old ranks stopped", || {
        processes_with("4723.3").is_empty().then_some(())
    });
    eventually(
        Duration::from_secs(30),
        "the refused agent to say why",
        || {
            cluster
                .log_tail(200)
                .contains("start the agent again with a new join token")
                .then_some(())
        },
    );
    // The operator joins it again with a token of the new state.
    cluster.wait_coordinator_credentials(&dir.join("second"));
    cluster.new_join_token();
    cluster.kill_agent("host-1");
    cluster.start_agent(1);
    cluster.wait_agents_up(1);
    // The new state's job 1 really runs (its id matches the old job's: it must not be mistaken for it).
    let fresh = job_file(&dir, "fresh", "name = \"fresh\"\n[launch]\ncommand = [\"echo\", \"fresh job ran\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n");
    let out = cluster.cli(&["submit", fresh.to_str().unwrap(), "--wait", "-o", "json"]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["id"], id.as_str(), "the new state reuses the id");
    assert_eq!(job["state"], "succeeded", "{job}");
    let logs = String::from_utf8(cluster.cli(&["logs", &id]).stdout).unwrap();
    assert_eq!(logs.trim(), "[host-1 rank 0] fresh job ran");
}
