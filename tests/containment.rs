//! Containment with real processes: a rank's `setsid` escapee dies with the job's cancel, and
//! `trainctl nodes` says how ranks are contained on each host.

mod common;

use std::time::Duration;

use common::{eventually, job_file, processes_with, DevCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether this host offers a writable cgroup2 hierarchy (mounted; the test's cgroup writable).
fn cgroup2_writable() -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts = trainctl_agent::cgroup::parse_mountinfo(&mountinfo);
    let mount = trainctl_agent::cgroup::choose_mount(&mounts)?;
    let own = trainctl_agent::cgroup::parse_own_cgroup(
        &std::fs::read_to_string("/proc/self/cgroup").ok()?,
    )?;
    let dir = trainctl_agent::cgroup::cgroup_dir(mount, &own);
    let probe = dir.join(format!("trainctl-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    let _ = std::fs::remove_dir(&probe);
    Some(dir.display().to_string())
}

#[test]
fn a_cancelled_job_leaves_no_setsid_escapee_and_nodes_show_the_containment() {
    let cluster = DevCluster::start(1);
    let nodes = cluster.json(&["nodes"]);
    let containment = nodes[0]["containment"].as_str().unwrap_or("").to_string();
    let writable = cgroup2_writable();
    let Some(_) = writable else {
        assert!(
            containment.starts_with("process groups ("),
            "no writable cgroup2 here, so the agent must say it uses process groups: {nodes}"
        );
        eprintln!("SKIPPED the escapee check: no writable cgroup2 hierarchy ({containment})");
        return;
    };
    assert!(
        containment.starts_with("cgroup2 ("),
        "a writable cgroup2 hierarchy is here, but the agent reports `{containment}`"
    );
    let table = String::from_utf8_lossy(&cluster.cli(&["nodes"]).stdout).into_owned();
    assert!(
        table.contains("CONTAIN") && table.contains("cgroup2"),
        "{table}"
    );

    let dir = tempfile::tempdir().unwrap();
    let marker = "4731.7";
    let job = job_file(
        dir.path(),
        "escaper",
        &format!(
            "name = \"escaper\"\n[launch]\ncommand = [\"sh\", \"-c\", \"setsid sleep {marker} >/dev/null 2>&1 & echo up; sleep 1000 & wait\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        ),
    );
    let id = cluster.submit(&job);
    cluster.wait_state(&id, "running", JOB_TIMEOUT);
    eventually(Duration::from_secs(20), "the escapee started", || {
        (!processes_with(&format!("sleep {marker}")).is_empty()).then_some(())
    });
    assert!(cluster.cli(&["cancel", &id]).status.success());
    eventually(Duration::from_secs(20), "the escapee killed", || {
        processes_with(marker).is_empty().then_some(())
    });
}
