//! `trainctl submit` with an idempotency key, against real processes: the same key gives the same
//! job, and a submission sent while the coordinator is down is retried until it answers, once.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{job_file, trainctl, HandCluster};
use serde_json::Value;

const JOB: &str =
    "name = \"once\"\n[launch]\ncommand = [\"echo\", \"hi\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n";

fn id_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn the_cli_submits_once_per_key_even_through_a_coordinator_restart() {
    let mut cluster = HandCluster::start(1);
    let file = job_file(cluster.dir.path(), "once", JOB);
    let file = file.to_str().unwrap();
    let submit_with = |cluster: &HandCluster, key: &str| {
        cluster.cli(&["submit", file, "--idempotency-key", key, "-o", "json"])
    };

    // The same key twice: one job.
    let first = id_of(&submit_with(&cluster, "script-run-1"));
    assert_eq!(id_of(&submit_with(&cluster, "script-run-1")), first);
    // Without a key, each run is its own submission.
    let other = id_of(&cluster.cli(&["submit", file, "-o", "json"]));
    assert_ne!(other, first);
    assert_eq!(cluster.json(&["list"]).as_array().unwrap().len(), 2);
    // The same key with another job is refused.
    let edited = job_file(cluster.dir.path(), "edited", &JOB.replace("hi", "bye"));
    let out = cluster.cli(&[
        "submit",
        edited.to_str().unwrap(),
        "--idempotency-key",
        "script-run-1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already used for a different request"),
        "{err}"
    );
    // A malformed key is refused before anything is sent.
    let out = cluster.cli(&["submit", file, "--idempotency-key", ""]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--idempotency-key") && err.contains("printable ASCII"),
        "{err}"
    );

    // The coordinator is down when the submission is sent: the CLI retries with its key until
    // the restarted coordinator answers.
    let (token, ca) = (cluster.token(), cluster.ca_cert());
    cluster.kill_coordinator();
    let mut cmd = Command::new(trainctl());
    cmd.args([
        "submit",
        file,
        "--idempotency-key",
        "during-restart",
        "-o",
        "json",
    ])
    .env("TRAINCTL_ADDR", cluster.url())
    .env("TRAINCTL_CONFIG", cluster.dir.path().join("no-config.toml"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(token) = token {
        cmd.env("TRAINCTL_TOKEN", token).env("TRAINCTL_CA_CERT", ca);
    }
    let started = Instant::now();
    let pending = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let data = cluster.coordinator_dir();
    cluster.start_coordinator(&data);
    let out = pending.wait_with_output().unwrap();
    let during = id_of(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trying again") && err.contains("same idempotency key"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(35));
    // Run again (a script that did not see the answer): the same job.
    assert_eq!(id_of(&submit_with(&cluster, "during-restart")), during);
    assert_eq!(id_of(&submit_with(&cluster, "script-run-1")), first);
    let jobs = cluster.json(&["list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 3, "{jobs:#}");
}
