//! Real processes on loopback addresses: `trainctl dev` (a coordinator and agents, each agent on its
//! own 127.0.0.x), driven through the `trainctl` command line exactly as a user would.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{eventually, job_file, processes_with, repo, DevCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn example_job_is_gang_scheduled_run_logged_and_succeeds() {
    let cluster = DevCluster::start(2);
    let spec = repo().join("jobs/examples/ddp-example.toml");
    let out = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    assert!(
        out.status.success(),
        "submit --wait must exit 0 on success: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded");
    let id = job["id"].as_str().unwrap();

    // Every rank ran on its host, exited 0, and the gang spanned both hosts.
    let ranks = job["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["rank"], i as u64);
        assert_eq!(r["state"], "exited");
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["node"], if i < 2 { "node-1" } else { "node-2" });
    }
    assert_eq!(
        job["master_addr"], "127.0.0.2",
        "MASTER_ADDR is group rank 0's IP, never a hostname"
    );

    // Logs: every line tagged with host and global rank; every rank agrees on the checksum.
    let logs = cluster.logs(id);
    assert!(logs.contains("[node-1 rank 0] step 1/30 loss"), "{logs}");
    let checksums: BTreeSet<&str> = logs
        .lines()
        .filter(|l| l.contains("final checksum"))
        .map(|l| l.split("final checksum ").nth(1).unwrap())
        .collect();
    assert_eq!(checksums.len(), 1, "ranks disagree: {checksums:?}");
    for rank in 0..4 {
        let node = if rank < 2 { "node-1" } else { "node-2" };
        assert!(
            logs.contains(&format!("[{node} rank {rank}] final checksum")),
            "rank {rank} missing: {logs}"
        );
    }
    // --rank filters to one rank.
    let only = String::from_utf8(cluster.cli(&["logs", id, "--rank", "3"]).stdout).unwrap();
    assert!(
        only.lines().all(|l| l.starts_with("[node-2 rank 3]")),
        "{only}"
    );
    assert!(!only.is_empty());

    // The same seed and world size give the same checksum on a second run.
    let again = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let logs2 = cluster.logs(again["id"].as_str().unwrap());
    let first = logs2
        .lines()
        .find(|l| l.contains("final checksum"))
        .unwrap_or_else(|| panic!("the second run printed no checksum: {again}\n{logs2}"));
    assert!(checksums.contains(first.split("final checksum ").nth(1).unwrap()));

    // Human output of list and nodes.
    let list = String::from_utf8(cluster.cli(&["list"]).stdout).unwrap();
    assert!(
        list.contains("ddp-example") && list.contains("succeeded"),
        "{list}"
    );
    let nodes = cluster.json(&["nodes"]);
    for n in nodes.as_array().unwrap() {
        assert_eq!(
            n["cpus_allocated"], 0,
            "resources returned after the job: {n}"
        );
        assert!(n["jobs"].as_array().unwrap().is_empty());
    }
}

#[test]
fn every_rank_gets_the_torchrun_environment() {
    let cluster = DevCluster::start_with(2, &["--gpus-per-agent", "4"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "env",
        r#"
name = "env"
[launch]
command = ["sh", "-c", "env | sort"]
env = { MY_SETTING = "42" }
[resources]
nodes = 2
procs_per_node = 2
gpus_per_node = 2
"#,
    );
    let id = cluster.submit(&spec);
    let job = cluster.wait_state(&id, "succeeded", JOB_TIMEOUT);
    let logs = cluster.logs(&id);
    let var = |rank: u32, key: &str| -> String {
        let node = if rank < 2 { "node-1" } else { "node-2" };
        let prefix = format!("[{node} rank {rank}] {key}=");
        logs.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("rank {rank} has no {key}: {logs}"))
            .to_string()
    };
    let port: u16 = job["master_port"].as_u64().unwrap() as u16;
    // node-1's lease range in `trainctl dev`.
    assert!(
        (29500..29600).contains(&port),
        "MASTER_PORT {port} outside node-1's range"
    );
    for rank in 0..4u32 {
        assert_eq!(var(rank, "RANK"), rank.to_string());
        assert_eq!(var(rank, "LOCAL_RANK"), (rank % 2).to_string());
        assert_eq!(var(rank, "WORLD_SIZE"), "4");
        assert_eq!(var(rank, "LOCAL_WORLD_SIZE"), "2");
        assert_eq!(var(rank, "GROUP_RANK"), (rank / 2).to_string());
        assert_eq!(var(rank, "GROUP_WORLD_SIZE"), "2");
        assert_eq!(var(rank, "ROLE_RANK"), rank.to_string());
        assert_eq!(var(rank, "ROLE_NAME"), "default");
        assert_eq!(var(rank, "MASTER_ADDR"), "127.0.0.2");
        assert_eq!(var(rank, "MASTER_PORT"), port.to_string());
        assert_eq!(var(rank, "TORCHELASTIC_RESTART_COUNT"), "0");
        assert_eq!(var(rank, "TORCHELASTIC_RUN_ID"), format!("trainctl-{id}"));
        assert_eq!(var(rank, "TRAINCTL_JOB_ID"), id);
        assert_eq!(var(rank, "CUDA_VISIBLE_DEVICES"), "0,1");
        assert_eq!(var(rank, "OMP_NUM_THREADS"), "1");
        assert_eq!(var(rank, "MY_SETTING"), "42");
        assert!(var(rank, "TORCHELASTIC_ERROR_FILE").ends_with("error.json"));
    }
    assert_eq!(var(2, "TRAINCTL_NODE_ADDR"), "127.0.0.3");
}

#[test]
fn a_failing_rank_fails_the_job_and_stops_the_rest_of_the_gang() {
    let cluster = DevCluster::start(2);
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "fail",
        r#"
name = "fail"
[launch]
command = ["sh", "-c", "if [ \"$RANK\" = 3 ]; then sleep 1; echo boom >&2; exit 3; fi; sleep 4711.1"]
[resources]
nodes = 2
procs_per_node = 2
"#,
    );
    let out = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "submit --wait exits 1 when the job fails"
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("rank 3 on node-2 exited with code 3"),
        "{reason}"
    );
    let id = job["id"].as_str().unwrap();
    // The others were stopped: every rank ends, none is left running anywhere.
    let job = eventually(JOB_TIMEOUT, "every rank to end", || {
        let job = cluster.job(id);
        job["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] != "running")
            .then_some(job)
    });
    let codes: Vec<i64> = job["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(
        codes,
        vec![-15, -15, -15, 3],
        "the rest of the gang is stopped with SIGTERM"
    );
    eventually(Duration::from_secs(10), "no rank process left", || {
        processes_with("4711.1").is_empty().then_some(())
    });
    assert!(cluster.logs(id).contains("[node-2 rank 3] boom"));
}

#[test]
fn cancel_stops_every_process_including_grandchildren() {
    let cluster = DevCluster::start(2);
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "cancel",
        r#"
name = "cancel-me"
[launch]
command = ["sh", "-c", "sleep 4712.2 & sleep 4712.2 & echo started; wait"]
[resources]
nodes = 2
procs_per_node = 1
"#,
    );
    let id = cluster.submit(&spec);
    cluster.wait_state(&id, "running", JOB_TIMEOUT);
    eventually(
        Duration::from_secs(10),
        "the grandchildren to start",
        || (processes_with("sleep 4712.2").len() >= 4).then_some(()),
    );
    let out = cluster.cli(&["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster.job(&id)["state"], "cancelled");
    eventually(
        Duration::from_secs(20),
        "every process of the job to be gone",
        || processes_with("4712.2").is_empty().then_some(()),
    );
    // Resources come back once the agents report the ranks ended.
    eventually(Duration::from_secs(20), "resources to be released", || {
        let nodes = cluster.json(&["nodes"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["cpus_allocated"] == 0)
            .then_some(())
    });
    // Cancelling again is a clear conflict, not a crash.
    let again = cluster.cli(&["cancel", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cancelled"));
}

#[test]
fn jobs_queue_in_order_and_say_why_they_wait() {
    let cluster = DevCluster::start(2);
    let dir = tempfile::tempdir().unwrap();
    // Each host of `trainctl dev` reports this machine's CPUs; take them all on both hosts.
    let cpus = cluster.json(&["nodes"])[0]["cpus"].as_u64().unwrap();
    let blocker = job_file(
        dir.path(),
        "blocker",
        &format!(
            "name = \"blocker\"\n[launch]\ncommand = [\"sleep\", \"4713.3\"]\n[resources]\nnodes = 2\nprocs_per_node = 1\ncpus_per_node = {cpus}\n"
        ),
    );
    let waiter = job_file(
        dir.path(),
        "waiter",
        "name = \"waiter\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    );
    let a = cluster.submit(&blocker);
    cluster.wait_state(&a, "running", JOB_TIMEOUT);
    let b = cluster.submit(&waiter);
    let pending = cluster.job(&b);
    assert_eq!(pending["state"], "pending");
    let why = pending["pending_reason"].as_str().unwrap();
    assert!(
        why.contains("needs 1 host with 1 free CPU; 0 have them now"),
        "{why}"
    );
    // Two jobs sharing a host would never share a port: this one is not even placed yet.
    cluster.cli(&["cancel", &a]);
    cluster.wait_state(&b, "succeeded", JOB_TIMEOUT);

    // A job asking for InfiniBand waits on hosts without it, and says so in the API and `status`.
    let has_ib = cluster
        .json(&["nodes"])
        .as_array()
        .unwrap()
        .iter()
        .any(|n| {
            n["rdma"].as_array().is_some_and(|ports| {
                ports
                    .iter()
                    .any(|p| p.as_str().is_some_and(|p| p.contains("ACTIVE InfiniBand")))
            })
        });
    if has_ib {
        eprintln!("skipped the fabric = \"ib\" check: this machine has an ACTIVE InfiniBand port");
        return;
    }
    let ib = job_file(
        dir.path(),
        "ib",
        "name = \"ib\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\nfabric = \"ib\"\n",
    );
    let c = cluster.submit(&ib);
    let pending = cluster.job(&c);
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["spec"]["resources"]["fabric"], "ib");
    let why = pending["pending_reason"].as_str().unwrap();
    assert!(
        why.starts_with("fabric = \"ib\": needs 1 host with an ACTIVE InfiniBand port")
            && why
                .ends_with("0 of the 2 hosts up that large have one (2 with no ACTIVE RDMA port)"),
        "{why}"
    );
    let shown = cluster.cli(&["status", &c]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains(&format!("waiting: {why}")), "{text}");
    assert!(
        text.contains("every host on InfiniBand (fabric = \"ib\")"),
        "{text}"
    );
    cluster.cli(&["cancel", &c]);
}

#[test]
fn two_jobs_on_one_host_get_different_rendezvous_ports() {
    let cluster = DevCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "sleepy",
        "name = \"sleepy\"\n[launch]\ncommand = [\"sleep\", \"4714.4\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    );
    let a = cluster.submit(&spec);
    let b = cluster.submit(&spec);
    let ja = cluster.wait_state(&a, "running", JOB_TIMEOUT);
    let jb = cluster.wait_state(&b, "running", JOB_TIMEOUT);
    assert_eq!(ja["master_addr"], jb["master_addr"]);
    assert_ne!(
        ja["master_port"], jb["master_port"],
        "a leased port is never shared"
    );
    cluster.cli(&["cancel", &a]);
    cluster.cli(&["cancel", &b]);
    eventually(Duration::from_secs(20), "sleepers gone", || {
        processes_with("4714.4").is_empty().then_some(())
    });
}

#[test]
fn a_command_that_does_not_exist_fails_the_job_with_a_clear_reason() {
    let cluster = DevCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let spec = job_file(
        dir.path(),
        "typo",
        "name = \"typo\"\n[launch]\ncommand = [\"pyhton3\", \"train.py\"]\n[resources]\nnodes = 1\nprocs_per_node = 2\n",
    );
    let out = cluster.cli(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("failed to start")
            && reason.contains("`pyhton3` not found in the rank's PATH ("),
        "{reason}"
    );
    assert_eq!(job["ranks"][0]["state"], "failed_to_start");
    // Nothing stays allocated.
    eventually(Duration::from_secs(10), "resources released", || {
        (cluster.json(&["nodes"])[0]["cpus_allocated"] == 0).then_some(())
    });
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = DevCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("syntax", "name = \"x\n", &["syntax.toml:1"]),
        (
            "unknown",
            "name = \"x\"\n[launch]\ncomand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
            &["unknown.toml:3", "launch.comand", "did you mean `command`"],
        ),
        (
            "type",
            "name = \"x\"\n[launch]\ncommand = \"python train.py\"\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
            &["type.toml:3", "launch.command", "array of strings"],
        ),
        (
            "zero",
            "name = \"x\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 0\nprocs_per_node = 1\n",
            &["zero.toml:5", "resources.nodes", "at least 1"],
        ),
        (
            "negative",
            "name = \"x\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = -2\n",
            &["negative.toml:6", "resources.procs_per_node"],
        ),
        (
            "workdir",
            "name = \"x\"\n[launch]\ncommand = [\"true\"]\nworkdir = \"no/such/dir\"\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
            &["launch.workdir", "does not exist"],
        ),
        (
            "too-big",
            "name = \"x\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 5\nprocs_per_node = 1\n",
            &["can never run here", "needs 5 hosts", "the cluster has 1 host"],
        ),
    ];
    for (name, text, words) in cases {
        let path = job_file(dir.path(), name, text);
        let out = cluster.cli(&["submit", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        for w in *words {
            assert!(err.contains(w), "{name}: error lacks {w:?}: {err}");
        }
    }
    let missing = cluster.cli(&["submit", "/no/such/job.toml"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("read job file /no/such/job.toml"));
    for (args, words) in [
        (vec!["status", "999"], "job 999 does not exist"),
        (vec!["status", "abc"], "not a job id"),
        (vec!["logs", "999"], "job 999 does not exist"),
        (vec!["cancel", "999"], "job 999 does not exist"),
    ] {
        let out = cluster.cli(&args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(words),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        cluster.json(&["list"]).as_array().unwrap().is_empty(),
        "no bad input created a job"
    );
}

#[test]
fn the_rest_api_answers_curl_with_4xx_for_bad_requests() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("curl is required for this test (the test command installs it)");
    }
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let curl = |args: &[&str]| -> (u16, String) {
        let out = cluster
            .curl()
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    };
    let toml = "name = \"curl\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n";
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/toml",
        "--data-binary",
        toml,
        &format!("{base}/v1/jobs"),
    ]);
    assert_eq!(code, 201, "{body}");
    assert!(body.contains("\"id\""));
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{not json",
        &format!("{base}/v1/jobs"),
    ]);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("error"));
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: image/png",
        "-d",
        "x",
        &format!("{base}/v1/jobs"),
    ]);
    assert_eq!(code, 415);
    let (code, _) = curl(&[&format!("{base}/v1/jobs/12345")]);
    assert_eq!(code, 404);
    let (code, _) = curl(&[&format!("{base}/v1/jobs/1/logs?cursor=garbage")]);
    assert_eq!(code, 400);
    let (code, body) = curl(&[&format!("{base}/openapi.json")]);
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/logs",
        "/v1/nodes",
        "/v1/health",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    let (code, body) = curl(&[&format!("{base}/metrics")]);
    assert_eq!(code, 200);
    assert!(
        body.contains("trainctl_jobs") && body.contains("trainctl_nodes"),
        "{body}"
    );
    let (code, body) = curl(&[&format!("{base}/v1/health")]);
    assert_eq!(code, 200);
    assert!(body.contains("\"is_leader\":true"), "{body}");
}

#[test]
fn demo_runs_the_example_job_end_to_end() {
    let summary = demo_summary(&["--agents", "3"]);
    assert_eq!(summary["succeeded"], true);
    assert_eq!(
        summary["checksums"].as_array().unwrap().len(),
        1,
        "every rank ends with the same parameters"
    );
    assert_eq!(summary["job"]["state"], "succeeded");
    assert_eq!(summary["job"]["world_size"], 6, "3 hosts x 2 ranks");
    // A fixed gang of exactly the agents, not an elastic 2:3 one.
    assert_eq!(summary["job"]["node_range"], serde_json::json!([3, 3]));
    let hosts: BTreeSet<&str> = summary["job"]["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(hosts.len(), 3, "the gang spans every host");
}

/// Runs `trainctl demo ARGS -o json` (holding the local cluster addresses) and parses its summary.
fn demo_summary(args: &[&str]) -> serde_json::Value {
    let _lock = common::lock_cluster_addresses();
    let out = std::process::Command::new(common::trainctl())
        .arg("demo")
        .args(args)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `demo --chaos` as the README shows it: a host's agent is killed after the first checkpoint, the
/// job resumes on the other hosts without spending a restart (a host loss is free), and every rank
/// ends with the checksum of an uninterrupted run.
#[test]
fn chaos_demo_loses_a_host_and_resumes_with_the_uninterrupted_checksum() {
    let summary = demo_summary(&["--chaos"]);
    assert_eq!(summary["succeeded"], true, "{summary:#}");
    let killed = summary["killed"]["node"].as_str().unwrap();
    let job = &summary["job"];
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["restarts"], 0, "a host loss spends no restart: {job:#}");
    let attempts = job["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{job:#}");
    let first_end = attempts[0]["end"].as_str().unwrap();
    assert!(
        first_end.contains(&format!("node {killed} was lost")),
        "{first_end}"
    );
    let last = attempts.last().unwrap();
    assert_eq!(last["end"], "succeeded");
    assert!(
        !last["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == killed),
        "the last attempt avoids the dead host: {last:#}"
    );
    assert_eq!(summary["checksums"].as_array().unwrap().len(), 1);
    assert_eq!(summary["checksums"][0], summary["reference_checksum"]);
}

/// The REST contract as curl sees it: a mistyped path is a JSON 404 (never an empty `200
/// application/grpc`), a wrong method a JSON 405 with `Allow`, an oversized body or a bad query
/// string a JSON error with its status, job ids strict, duplicate JSON keys refused.
#[test]
fn the_rest_api_answers_every_mistake_with_a_json_error() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    // (status, content type, Allow header, body as JSON)
    let curl = |args: &[&str]| -> (u16, String, String, serde_json::Value) {
        let out = cluster
            .curl()
            .args([
                "-o",
                "-",
                "-w",
                "\n%{content_type}\n%header{allow}\n%{http_code}",
            ])
            .args(args)
            .output()
            .expect("curl is required for this test (the test command installs it)");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut parts = text.rsplitn(4, '\n');
        let code = parts.next().unwrap().parse().unwrap();
        let allow = parts.next().unwrap().to_string();
        let content_type = parts.next().unwrap().to_string();
        let body = parts.next().unwrap_or("");
        let body = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()));
        (code, content_type, allow, body)
    };
    let error = |what: &str, reply: &(u16, String, String, serde_json::Value), want: u16| {
        let (code, content_type, _, body) = reply;
        assert_eq!(*code, want, "{what}: {body}");
        assert!(
            content_type.starts_with("application/json"),
            "{what}: content type `{content_type}`: {body}"
        );
        body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no `error` in {body}"))
            .to_string()
    };
    let spec = r#"{"name": "contract", "launch": {"command": ["sleep", "60"]},
        "resources": {"nodes": 1, "procs_per_node": 1}}"#;
    let json = "Content-Type: application/json";
    let reply = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-d",
        spec,
        &format!("{base}/v1/jobs"),
    ]);
    assert_eq!(reply.0, 201, "{reply:?}");
    let id = reply.3["id"].as_str().unwrap().to_string();
    cluster.wait_state(&id, "running", JOB_TIMEOUT);

    // A mistyped cancel: 404 naming the endpoint, and the job runs on.
    let cancle = format!("{base}/v1/jobs/{id}/cancle");
    let e = error("cancle", &curl(&["-X", "POST", &cancle]), 404);
    assert_eq!(
        e,
        format!("no such endpoint: POST /v1/jobs/{id}/cancle (see /openapi.json)")
    );
    for path in ["/", "/v1/job"] {
        let e = error(path, &curl(&[&format!("{base}{path}")]), 404);
        assert_eq!(
            e,
            format!("no such endpoint: GET {path} (see /openapi.json)")
        );
    }

    // A wrong method: 405 with Allow.
    let reply = curl(&["-X", "PATCH", &format!("{base}/v1/jobs")]);
    let e = error("PATCH /v1/jobs", &reply, 405);
    assert!(
        e.contains("PATCH") && e.contains("GET") && e.contains("POST"),
        "{e}"
    );
    assert!(
        reply.2.contains("GET") && reply.2.contains("POST"),
        "Allow: {}",
        reply.2
    );

    // Strict ids.
    for raw in ["+1", "1%0a", "%201", "01"] {
        let e = error(raw, &curl(&[&format!("{base}/v1/jobs/{raw}")]), 400);
        assert!(e.contains("is not a job id"), "{e}");
        let cancel = format!("{base}/v1/jobs/{raw}/cancel");
        error(raw, &curl(&["-X", "POST", &cancel]), 400);
    }

    // A bad query string: 400 JSON naming the parameter.
    let bad_query = format!("{base}/v1/jobs/{id}/cancel?checkpoint=maybe");
    let e = error("checkpoint=maybe", &curl(&["-X", "POST", &bad_query]), 400);
    assert!(e.contains("checkpoint"), "{e}");

    // A body over the limit: 413 JSON.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 5 << 20]).unwrap();
    let reply = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{base}/v1/jobs"),
    ]);
    let e = error("big body", &reply, 413);
    assert!(e.contains("at most"), "{e}");

    // Duplicate keys: refused, naming the key.
    let dup = spec.replacen(
        "\"name\": \"contract\",",
        "\"name\": \"a\", \"name\": \"b\",",
        1,
    );
    let reply = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-d",
        &dup,
        &format!("{base}/v1/jobs"),
    ]);
    let e = error("duplicate key", &reply, 422);
    assert!(e.contains("duplicate key `name`"), "{e}");

    // None of it touched the job; the real cancel works.
    assert_eq!(cluster.job(&id)["state"], "running");
    let jobs = curl(&[&format!("{base}/v1/jobs")]);
    assert_eq!(jobs.3.as_array().unwrap().len(), 1, "{jobs:?}");
    let cancel = format!("{base}/v1/jobs/{id}/cancel");
    let reply = curl(&["-X", "POST", &cancel]);
    assert_eq!(reply.0, 200, "{reply:?}");
    assert_eq!(reply.3["state"], "cancelled");
}

#[test]
fn cluster_shows_the_single_coordinator_leading_through_the_cli_with_tls_and_a_token() {
    let cluster = DevCluster::start(1);
    let before = cluster.json(&["cluster"]);
    let leader = before["leader"]["id"].as_u64().expect("a leader");
    assert_eq!(before["this_server"], leader, "{before}");
    assert!(before["cluster_id"].is_string(), "{before}");
    let term = before["term"].as_u64().expect("a term");
    assert!(term >= 1, "{before}");
    let last = before["last_log_index"].as_u64().expect("a last log index");
    assert!(before["last_applied_index"].as_u64().unwrap() <= last);
    let members = before["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{before}");
    assert_eq!(members[0]["id"], leader);
    assert_eq!(members[0]["role"], "leader");
    assert_eq!(members[0]["voter"], true);
    assert_eq!(members[0]["lag"], 0, "{before}");
    assert_eq!(members[0]["address"], before["leader"]["address"]);

    // GET /v1/cluster answers what `trainctl cluster -o json` prints.
    let out = cluster
        .curl()
        .arg(format!("{}/v1/cluster", cluster.url()))
        .output()
        .unwrap();
    let api: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from curl");
    for field in ["cluster_id", "this_server", "leader", "term"] {
        assert_eq!(api[field], before[field], "{field}: {api}");
    }
    assert_eq!(api["members"][0]["id"], before["members"][0]["id"]);
    assert_eq!(api["members"][0]["role"], "leader");

    // A write moves the log on; the term stays and the leader is still not behind itself.
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "noop",
        "name = \"noop\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    );
    cluster.submit(&job);
    let after = cluster.json(&["cluster"]);
    assert_eq!(after["term"], term, "{after}");
    assert!(after["last_log_index"].as_u64().unwrap() > last, "{after}");
    assert_eq!(after["members"][0]["lag"], 0, "{after}");

    // The table: a header line on the leader, then one row per member.
    let out = cluster.cli(&["cluster"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(&format!("leader {leader} (")), "{text}");
    assert!(text.contains(&format!("term {term}")), "{text}");
    assert!(text.contains("ID"), "{text}");
    assert!(text.contains("LAST INDEX"), "{text}");
    assert!(text.lines().nth(2).unwrap().contains("leader"), "{text}");
}
