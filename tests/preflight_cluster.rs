//! Pre-flight with real agents: `trainctl dev` with two agents whose GPUs are declared, one of
//! them made to fail its check before a job's ranks start (`TRAINCTL_PREFLIGHT_FAIL`, the
//! documented test knob). The job is placed there first, never starts there, and runs on the
//! other host without using a restart; `trainctl nodes` shows the failing host and why.

mod common;

use std::time::Duration;

use common::{eventually, job_file, DevCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_host_failing_its_check_before_a_job_is_left_and_the_job_runs_elsewhere_for_free() {
    let cluster = DevCluster::start_with(
        2,
        &["--gpus-per-agent", "2"],
        &[("TRAINCTL_PREFLIGHT_FAIL", "node-1@job:gpu-copy".to_string())],
    );
    // Both hosts passed their start-up checks: both healthy.
    let nodes = cluster.json(&["nodes"]);
    for n in nodes.as_array().unwrap() {
        assert!(n.get("unhealthy").is_none(), "{n}");
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "gpu",
        r#"
name = "gpu"
[launch]
command = ["sh", "-c", "echo ran on $TRAINCTL_JOB_ID"]
[resources]
nodes = 1
procs_per_node = 1
gpus_per_node = 2
"#,
    );
    let id = cluster.submit(&spec);
    let job = cluster.wait_state(&id, "succeeded", JOB_TIMEOUT);
    // Best fit with a tie goes to node-1 first; its check failed, so the job ran on node-2.
    let ranks = job["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 1, "{job}");
    assert_eq!(ranks[0]["node"], "node-2", "{job}");
    assert_eq!(
        job["restarts"], 0,
        "a failed pre-flight uses no restart: {job}"
    );
    assert_eq!(job["attempt"], 1, "{job}");
    let first = &job["attempts"][0];
    assert_eq!(first["nodes"][0], "node-1", "{job}");
    let end = first["end"].as_str().unwrap();
    assert!(
        end.contains("host node-1 failed its pre-flight checks: gpu-copy on host: injected by TRAINCTL_PREFLIGHT_FAIL"),
        "{end}"
    );
    // No rank ever started on node-1.
    assert!(
        !cluster.logs(&id).contains("[node-1 rank"),
        "{}",
        cluster.logs(&id)
    );

    // node-1 stays unhealthy, with its reason, in JSON and in the table.
    let nodes = cluster.json(&["nodes"]);
    let node1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-1")
        .unwrap();
    assert!(
        node1["unhealthy"]
            .as_str()
            .unwrap()
            .starts_with("gpu-copy on host: injected"),
        "{node1}"
    );
    let table = String::from_utf8(cluster.cli(&["nodes"]).stdout).unwrap();
    assert!(table.contains("up,UNHEALTHY"), "{table}");
    assert!(
        table.contains("node-1 is unhealthy (no new work until its pre-flight passes): gpu-copy on host: injected"),
        "{table}"
    );

    // A second GPU job goes straight to node-2: node-1 gets no placement while unhealthy.
    let again = cluster.submit(&spec);
    let job = cluster.wait_state(&again, "succeeded", JOB_TIMEOUT);
    assert_eq!(job["ranks"][0]["node"], "node-2", "{job}");
    assert_eq!(job["attempt"], 0, "{job}");
    // A job too large for node-2 alone waits, and says why.
    let two = job_file(
        dir.path(),
        "two",
        r#"
name = "two"
[launch]
command = ["true"]
[resources]
nodes = 2
procs_per_node = 1
gpus_per_node = 1
"#,
    );
    let waiting = cluster.submit(&two);
    eventually(Duration::from_secs(10), "the pending reason", || {
        let job = cluster.job(&waiting);
        let reason = job["pending_reason"].as_str()?.to_string();
        reason
            .contains("1 host failed its pre-flight checks (node-1: gpu-copy on host: injected")
            .then_some(())
    });
}
