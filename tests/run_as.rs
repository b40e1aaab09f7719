//! `trainctl agent --run-as USER` with real processes: ranks run as the user (uid, gid, HOME) in
//! the directories the agent made for them, and an agent that cannot honour the flag refuses to
//! start with a message naming the user.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{job_file, trainctl, DevCluster};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `trainctl agent ... --run-as USER` (as `uid` when given) against a coordinator that does
/// not exist and returns its output, or panics if it is still running after 20 s (it did not
/// refuse).
fn agent_with_run_as(user: &str, uid: Option<u32>) -> Output {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(trainctl());
    cmd.args(["agent", "--coordinator", "http://127.0.0.1:9", "--data-dir"])
        .arg(data.path().join("agent"))
        .args(["--run-as", user])
        .env_remove("TRAINCTL_RUN_AS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().expect("start trainctl agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "the agent with --run-as {user} did not refuse to start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_unknown_run_as_user_stops_the_agent_at_start() {
    let out = agent_with_run_as("no-such-user-trainctl", None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("there is no user `no-such-user-trainctl` on this host"),
        "{stderr}"
    );
}

#[test]
fn an_agent_that_is_not_root_refuses_to_run_ranks_as_another_user() {
    // As root, run the agent itself as nobody (65534) and ask for root's ranks.
    let as_uid = if is_root() { Some(65534) } else { None };
    let out = agent_with_run_as("root", as_uid);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--run-as root: the agent runs as uid") && stderr.contains("not root"),
        "{stderr}"
    );
}

#[test]
fn ranks_run_as_the_run_as_user_and_write_where_the_agent_made_room() {
    if !is_root() {
        eprintln!("SKIPPED: running ranks as another user needs an agent running as root");
        return;
    }
    let Some(nobody) = passwd_entry("nobody") else {
        eprintln!("SKIPPED: this host has no user `nobody`");
        return;
    };
    let cluster = DevCluster::start_with(1, &[], &[("TRAINCTL_RUN_AS", "nobody".to_string())]);
    let nodes = cluster.json(&["nodes"]);
    let containment = nodes[0]["containment"].as_str().unwrap_or("").to_string();

    // The job file's directory, the workdir and the checkpoint storage: 0755, as a shared
    // filesystem would be; the checkpoint dir itself does not exist yet (the agent creates it).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ckpt = dir.path().join("ckpt");
    let script = "echo uid=$(id -u) gid=$(id -g) home=$HOME user=$USER; \
                  touch \"$TRAINCTL_CHECKPOINT_DIR/x\" && echo touched; \
                  grep '^0::' /proc/self/cgroup";
    let job = job_file(
        dir.path(),
        "as-nobody",
        &format!(
            "name = \"as-nobody\"\n[launch]\ncommand = [\"sh\", \"-c\", {script:?}]\n\
             [resources]\nnodes = 1\nprocs_per_node = 1\n\
             [checkpoint]\ndir = \"{}/{{job}}\"\n",
            ckpt.display()
        ),
    );
    let id = cluster.submit(&job);
    let detail = cluster.wait_state(&id, "succeeded", JOB_TIMEOUT);
    let logs = cluster.logs(&id);
    assert!(
        logs.contains(&format!(
            "uid=65534 gid={} home={} user=nobody",
            nobody.1, nobody.2
        )),
        "{logs}\n{detail}"
    );
    assert!(logs.contains("touched"), "{logs}");
    let written = ckpt.join(&id).join("x");
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(meta.uid(), 65534, "{}", written.display());
    let job_ckpt = std::fs::metadata(ckpt.join(&id)).unwrap();
    assert_eq!((job_ckpt.uid(), job_ckpt.gid()), (65534, nobody.1));
    if containment.starts_with("cgroup2 (") {
        // Entered between fork and exec, before the switch to nobody.
        assert!(logs.contains("/rank-0"), "{logs}");
    } else {
        eprintln!("note: ranks here run in process groups ({containment}); no cgroup to check");
    }
}

/// (uid, gid, home) of `user` from `getent passwd`.
fn passwd_entry(user: &str) -> Option<(u32, u32, String)> {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    Some((
        fields.get(2)?.parse().ok()?,
        fields.get(3)?.parse().ok()?,
        fields.get(5)?.to_string(),
    ))
}
