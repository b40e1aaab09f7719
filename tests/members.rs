//! An agent given several coordinators (`--coordinator a,b`), with real processes: it finds one
//! that serves it, registers, runs a job, and keeps the cluster's member list in its data dir.

mod common;

use std::time::Duration;

use common::{free_port, job_file, start, HandCluster};

#[test]
fn an_agent_whose_first_coordinator_is_dead_registers_with_the_next_and_runs_a_job() {
    let cluster = HandCluster::start_full(0, 15_000, true);
    let data = cluster.dir.path().join("agent-members");
    // Nothing listens on port 1: the agent must move on to the real coordinator.
    let coordinators = format!("http://127.0.0.1:1,{}", cluster.url());
    let port = free_port().to_string();
    let ports = format!("{port}-{port}");
    let _agent = start(
        &[
            "agent",
            "--coordinator",
            &coordinators,
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            "members-1",
            "--advertise-addr",
            "127.0.0.1",
            "--port-range",
            &ports,
        ],
        &cluster.log(),
    );
    cluster.wait_agents_up(1);
    let dir = tempfile::tempdir().unwrap();
    let id = cluster.submit(&job_file(
        dir.path(),
        "hello",
        "name = \"hello\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo hello from $RANK\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    ));
    cluster.wait_state(&id, "succeeded", Duration::from_secs(60));
    assert!(
        cluster.logs(&id).contains("hello from 0"),
        "{}",
        cluster.logs(&id)
    );
    // The leader told it the cluster's members, and it keeps them for its next start.
    let members = std::fs::read_to_string(data.join("coordinators")).unwrap();
    assert_eq!(members.lines().collect::<Vec<_>>(), [cluster.addr.as_str()]);
}
