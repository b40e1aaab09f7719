//! Rank launching and cleanup against real processes (Linux, `/bin/sh`, `sleep`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trainctl_agent::cgroup::{self, CgroupTree, Containment, Limits};
use trainctl_agent::process::{
    group_has_live_members, group_members, read_proc_stat, spawn_rank, terminate_group,
    terminate_rank, GroupEnd, LaunchError, PgidJournal, RankProcess, RankSpec, Stream,
};

fn spec(dir: &Path, argv: &[&str]) -> RankSpec {
    RankSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        workdir: dir.to_path_buf(),
        env: Vec::new(),
        env_defaults: Vec::new(),
        log_path: dir.join("logs/rank-0.log"),
        line_prefix: "[test-node rank 0] ".into(),
        cgroup: None,
        run_as: None,
        copy_lines_to: None,
    }
}

fn sh(dir: &Path, script: &str) -> RankSpec {
    spec(dir, &["sh", "-c", script])
}

fn log_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the rank's log holds a line `ready` (so its traps and children are in place).
async fn wait_ready(rank: &RankProcess) {
    let log = rank.log_path().to_path_buf();
    let ready = wait_until(
        || {
            fs::read_to_string(&log)
                .map(|t| t.lines().any(|l| l == "ready"))
                .unwrap_or(false)
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(ready, "the rank did not print `ready` within 10 s");
}

/// Polls until no live (non-zombie) process is in `pgid`.
async fn wait_group_empty(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !group_has_live_members(pgid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn live_members(pgid: i32) -> Vec<i32> {
    group_members(pgid)
        .unwrap()
        .into_iter()
        .filter(|m| !m.is_zombie())
        .map(|m| m.pid)
        .collect()
}

fn pid_is_dead(pid: i32) -> bool {
    match read_proc_stat(pid) {
        Err(_) => true,
        Ok(stat) => stat.is_zombie(),
    }
}

#[tokio::test]
async fn exit_codes_follow_torchrun_convention() {
    let dir = tempfile::tempdir().unwrap();
    let mut ok = spawn_rank(sh(dir.path(), "exit 0")).await.unwrap();
    assert_eq!(ok.wait().await.code, 0);
    assert!(ok.wait().await.success(), "wait can be called again");

    let mut three = spawn_rank(sh(dir.path(), "exit 3")).await.unwrap();
    assert_eq!(three.wait().await.code, 3);

    let mut killed = spawn_rank(sh(dir.path(), "kill -KILL $$")).await.unwrap();
    assert_eq!(killed.wait().await.code, -9);

    let mut termed = spawn_rank(sh(dir.path(), "kill -TERM $$")).await.unwrap();
    assert_eq!(termed.wait().await.code, -15);
}

#[tokio::test]
async fn rank_leads_its_own_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut rank = spawn_rank(spec(dir.path(), &["sleep", "0.3"]))
        .await
        .unwrap();
    assert_eq!(rank.pid(), rank.pgid());
    let stat = read_proc_stat(rank.pid()).unwrap();
    assert_eq!(stat.pgid, rank.pid());
    assert_eq!(stat.start_time, rank.start_time());
    assert_ne!(
        stat.pgid,
        read_proc_stat(std::process::id() as i32).unwrap().pgid
    );
    assert_eq!(rank.wait().await.code, 0);
}

#[tokio::test]
async fn stdout_and_stderr_land_in_the_file_in_order_without_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo out$i; echo err$i >&2; done; printf 'no newline at end'";
    let s = sh(dir.path(), script);
    let log = s.log_path.clone();
    let mut rank = spawn_rank(s).await.unwrap();
    let mut shipped = rank.take_lines().unwrap();
    assert!(rank.take_lines().is_none());
    assert_eq!(rank.wait().await.code, 0);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 21, "{lines:?}");
    // The shipping channel sees exactly the file's lines, tagged with their stream.
    let mut from_channel = Vec::new();
    while let Ok(line) = shipped.try_recv() {
        let expected = if line.text.starts_with("err") {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        assert_eq!(line.stream, expected, "{line:?}");
        from_channel.push(line.text);
    }
    assert_eq!(from_channel, lines);
    let outs: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("out"))
        .cloned()
        .collect();
    let errs: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("err"))
        .cloned()
        .collect();
    let expect = |p: &str| (1..=10).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    assert_eq!(outs, expect("out"));
    assert_eq!(errs, expect("err"));
    assert!(lines.contains(&"no newline at end".to_owned()));
    assert!(!fs::read_to_string(&log).unwrap().contains("[test-node"));
    assert_eq!(rank.line_prefix(), "[test-node rank 0] ");
}

#[tokio::test]
async fn lines_of_two_busy_streams_are_never_torn() {
    let dir = tempfile::tempdir().unwrap();
    // Two writers at once, each line long enough to take several pipe reads.
    let script = "a=$(printf 'a%.0s' $(seq 1 3000)); b=$(printf 'b%.0s' $(seq 1 3000)); \
                  (for i in $(seq 1 200); do echo \"$a\"; done) & \
                  (for i in $(seq 1 200); do echo \"$b\" >&2; done); wait";
    let s = sh(dir.path(), script);
    let log = s.log_path.clone();
    let mut rank = spawn_rank(s).await.unwrap();
    assert_eq!(rank.wait().await.code, 0);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 400);
    for line in &lines {
        assert!(
            line == &"a".repeat(3000) || line == &"b".repeat(3000),
            "torn line of {} bytes",
            line.len()
        );
    }
}

#[tokio::test]
async fn very_long_lines_are_split_at_64_kib() {
    let dir = tempfile::tempdir().unwrap();
    // 150 000 characters then a newline: pieces of 65 536, 65 536 and 18 928.
    let script = "head -c 150000 /dev/zero | tr '\\0' x; echo; echo after";
    let s = sh(dir.path(), script);
    let log = s.log_path.clone();
    let mut rank = spawn_rank(s).await.unwrap();
    assert_eq!(rank.wait().await.code, 0);
    let lines = log_lines(&log);
    let lens: Vec<_> = lines.iter().map(String::len).collect();
    assert_eq!(lens, [65536, 65536, 150000 - 2 * 65536, 5]);
    assert_eq!(lines[3], "after");
}

#[tokio::test]
async fn invalid_utf8_is_replaced_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = sh(dir.path(), "printf 'ok \\377 end\\n'");
    let log = s.log_path.clone();
    let mut rank = spawn_rank(s).await.unwrap();
    rank.wait().await;
    assert_eq!(log_lines(&log), ["ok \u{FFFD} end"]);
}

#[tokio::test]
async fn log_is_appended_across_attempts_and_parent_dirs_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sh(dir.path(), "echo first");
    s.log_path = dir.path().join("a/b/c/rank.log");
    spawn_rank(s.clone()).await.unwrap().wait().await;
    s.argv[2] = "echo second".into();
    spawn_rank(s.clone()).await.unwrap().wait().await;
    assert_eq!(log_lines(&s.log_path), ["first", "second"]);
}

#[tokio::test]
async fn missing_command_says_where_it_was_searched_without_dumping_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), &["pyhton3", "train.py"]);
    s.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    let err = spawn_rank(s).await.unwrap_err();
    assert!(
        matches!(err, LaunchError::CommandNotFound { .. }),
        "{err:?}"
    );
    // The rank's whole PATH used to be quoted here (and repeated by `status`): only its size now.
    assert_eq!(
        err.to_string(),
        "command `pyhton3` not found in the rank's PATH (2 directories) on this host"
    );

    let err = spawn_rank(spec(dir.path(), &["./missing.sh"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LaunchError::CommandNotFound { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing.sh"), "{err}");
}

#[tokio::test]
async fn non_executable_file_is_reported_as_such() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("train.sh");
    fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let err = spawn_rank(spec(dir.path(), &["./train.sh"]))
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::NotExecutable { .. }), "{err:?}");
    assert!(err.to_string().contains("not executable"), "{err}");

    // Found in PATH, but not executable there.
    let mut s = spec(dir.path(), &["train.sh"]);
    s.env = vec![("PATH".into(), dir.path().display().to_string())];
    let err = spawn_rank(s).await.unwrap_err();
    assert!(matches!(err, LaunchError::NotExecutable { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_interpreter_is_not_reported_as_a_missing_command() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("train.py");
    fs::write(&script, "#!/nonexistent/python9\nprint(1)\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let err = spawn_rank(spec(dir.path(), &["./train.py"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LaunchError::InterpreterNotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn relative_command_runs_from_the_workdir() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("train.sh");
    fs::write(&script, "#!/bin/sh\necho \"$0 in $(pwd)\"\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let s = spec(dir.path(), &["./train.sh"]);
    let log = s.log_path.clone();
    let mut rank = spawn_rank(s).await.unwrap();
    assert_eq!(rank.wait().await.code, 0);
    let pwd = fs::canonicalize(dir.path()).unwrap();
    // A script's `$0` is the path the kernel was given: the resolved one under the workdir.
    assert_eq!(
        log_lines(&log),
        [format!(
            "{}/./train.sh in {}",
            dir.path().display(),
            pwd.display()
        )]
    );
}

#[tokio::test]
async fn bad_workdir_is_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sh(dir.path(), "true");
    s.workdir = PathBuf::from("/x/y/does-not-exist");
    let err = spawn_rank(s).await.unwrap_err();
    assert!(matches!(err, LaunchError::WorkdirMissing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "workdir /x/y/does-not-exist does not exist on this host"
    );
    let err = spawn_rank(spec(dir.path(), &[])).await.unwrap_err();
    assert!(matches!(err, LaunchError::EmptyArgv));
}

#[tokio::test]
async fn env_overrides_and_defaults_take_the_right_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sh(
        dir.path(),
        "echo \"A=$A\"; echo \"B=$B\"; echo \"HOME=$HOME\"; echo \"PATH=$PATH\"",
    );
    let inherited_path = std::env::var("PATH").unwrap();
    s.env = vec![
        ("A".into(), "from-env".into()),
        ("HOME".into(), "/home/override".into()),
    ];
    s.env_defaults = vec![
        ("A".into(), "default-loses-to-env".into()),
        ("B".into(), "default-applies".into()),
        ("PATH".into(), "/default-loses-to-inherited".into()),
    ];
    let log = s.log_path.clone();
    spawn_rank(s).await.unwrap().wait().await;
    assert_eq!(
        log_lines(&log),
        [
            "A=from-env".to_owned(),
            "B=default-applies".to_owned(),
            "HOME=/home/override".to_owned(),
            format!("PATH={inherited_path}"),
        ]
    );
}

#[tokio::test]
async fn terminate_group_is_prompt_when_the_rank_obeys_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut rank = spawn_rank(spec(dir.path(), &["sleep", "1000"]))
        .await
        .unwrap();
    // No one is in `wait()`: the supervisor must still reap the leader, or its zombie would keep
    // the group "alive" for the whole grace period.
    let started = Instant::now();
    let end = terminate_group(rank.pgid(), Duration::from_secs(20)).await;
    assert_eq!(end, GroupEnd::ExitedAfterTerm);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rank.wait().await.code, -15);
    assert_eq!(
        terminate_group(rank.pgid(), Duration::from_secs(1)).await,
        GroupEnd::AlreadyGone
    );
}

#[tokio::test]
async fn terminate_group_sigkills_a_rank_that_ignores_sigterm_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let rank = spawn_rank(sh(
        dir.path(),
        "trap '' TERM; echo ready; while true; do sleep 0.05; done",
    ))
    .await
    .unwrap();
    let mut rank = rank;
    wait_ready(&rank).await;
    let grace = Duration::from_millis(700);
    let started = Instant::now();
    let end = terminate_group(rank.pgid(), grace).await;
    let took = started.elapsed();
    assert_eq!(end, GroupEnd::Killed);
    assert!(
        took >= grace,
        "SIGKILL came before the grace ended: {took:?}"
    );
    assert!(took < grace + Duration::from_secs(5), "{took:?}");
    assert_eq!(rank.wait().await.code, -9);
    assert!(live_members(rank.pgid()).is_empty());
}

#[tokio::test]
async fn terminate_group_leaves_no_grandchildren_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut rank = spawn_rank(sh(dir.path(), "sleep 1000 & sleep 1000 & echo ready; wait"))
        .await
        .unwrap();
    wait_ready(&rank).await;
    let pgid = rank.pgid();
    let members = live_members(pgid);
    assert_eq!(members.len(), 3, "sh and two sleeps: {members:?}");
    let sleeps: Vec<i32> = members.into_iter().filter(|&p| p != pgid).collect();

    terminate_group(pgid, Duration::from_secs(5)).await;
    assert!(live_members(pgid).is_empty());
    for pid in sleeps {
        assert!(pid_is_dead(pid), "sleep {pid} survived");
    }
    assert_eq!(rank.wait().await.code, -15);
}

#[tokio::test]
async fn grandchildren_ignoring_sigterm_are_killed_too() {
    let dir = tempfile::tempdir().unwrap();
    let rank = spawn_rank(sh(
        dir.path(),
        "sh -c 'trap \"\" TERM; while true; do sleep 0.05; done' & echo ready; wait",
    ))
    .await
    .unwrap();
    wait_ready(&rank).await;
    let end = terminate_group(rank.pgid(), Duration::from_millis(300)).await;
    assert_eq!(end, GroupEnd::Killed);
    assert!(live_members(rank.pgid()).is_empty());
}

#[tokio::test]
async fn wait_returns_even_if_a_background_process_holds_the_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rank = spawn_rank(sh(dir.path(), "sleep 1000 & echo leader done"))
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(rank.wait().await.code, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(log_lines(rank.log_path()), ["leader done"]);
    // The orphaned sleep is still in the rank's group: cleanup must still find it.
    assert_eq!(live_members(rank.pgid()).len(), 1);
    assert_eq!(
        terminate_group(rank.pgid(), Duration::from_secs(5)).await,
        GroupEnd::ExitedAfterTerm
    );
}

#[test]
fn rank_survives_the_exit_of_the_thread_that_launched_it() {
    // PR_SET_PDEATHSIG fires when the forking *thread* exits. A rank launched from a blocking-pool
    // thread must not be killed when that thread retires.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), &["sleep", "1000"]);
        let handle = tokio::runtime::Handle::current();
        let rank = tokio::task::spawn_blocking(move || handle.block_on(spawn_rank(s)))
            .await
            .unwrap()
            .unwrap();
        // Let the blocking thread idle out and exit.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !pid_is_dead(rank.pid()),
            "the rank died with its launching thread"
        );
        terminate_group(rank.pgid(), Duration::from_secs(5)).await;
    });
}

#[tokio::test]
async fn reap_leftovers_kills_groups_a_crashed_agent_left() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pgid;
    {
        let journal = PgidJournal::open(&data).unwrap();
        let rank = spawn_rank(sh(dir.path(), "sleep 1000 & sleep 1000 & echo ready; wait"))
            .await
            .unwrap();
        wait_ready(&rank).await;
        journal
            .record(rank.pgid(), rank.start_time(), "job-7")
            .unwrap();
        pgid = rank.pgid();
        // The "crash": handles dropped, nothing terminated.
    }
    assert_eq!(live_members(pgid).len(), 3);

    let restarted = PgidJournal::open(&data).unwrap();
    let reaped = restarted.reap_leftovers();
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(reaped[0].pgid, pgid);
    assert_eq!(reaped[0].job_id, "job-7");
    assert_eq!(reaped[0].processes, 3);
    assert!(wait_group_empty(pgid, Duration::from_secs(5)).await);
    assert!(restarted.entries().unwrap().is_empty());
}

#[tokio::test]
async fn reap_leftovers_kills_survivors_of_a_group_whose_leader_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let journal = PgidJournal::open(dir.path()).unwrap();
    let mut rank = spawn_rank(sh(dir.path(), "sleep 1000 >/dev/null 2>&1 & exit 0"))
        .await
        .unwrap();
    journal
        .record(rank.pgid(), rank.start_time(), "job-8")
        .unwrap();
    assert_eq!(rank.wait().await.code, 0);
    // Leader reaped; the sleep lives on in its group.
    assert!(
        wait_until(
            || read_proc_stat(rank.pid()).is_err(),
            Duration::from_secs(5)
        )
        .await
    );
    assert_eq!(live_members(rank.pgid()).len(), 1);

    let reaped = journal.reap_leftovers();
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(reaped[0].processes, 1);
    assert!(wait_group_empty(rank.pgid(), Duration::from_secs(5)).await);
}

#[tokio::test]
async fn reap_leftovers_spares_a_recycled_pid() {
    let dir = tempfile::tempdir().unwrap();
    let journal = PgidJournal::open(dir.path()).unwrap();
    let rank = spawn_rank(spec(dir.path(), &["sleep", "1000"]))
        .await
        .unwrap();
    // Same pgid, different start time: the recorded process is gone and the pid was reused.
    journal
        .record(rank.pgid(), rank.start_time() + 1, "old-job")
        .unwrap();
    assert!(journal.reap_leftovers().is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pid_is_dead(rank.pid()), "an unrelated process was killed");
    assert!(journal.entries().unwrap().is_empty());
    terminate_group(rank.pgid(), Duration::from_secs(5)).await;
}

async fn wait_until(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

const PDEATHSIG_HELPER_ENV: &str = "TRAINCTL_TEST_PDEATHSIG_PIDFILE";

/// Not a test on its own: when `rank_dies_when_the_agent_is_sigkilled` re-runs this test binary
/// with `PDEATHSIG_HELPER_ENV` set, this plays the agent: it launches a rank, writes the rank's pid,
/// and waits to be killed.
#[test]
fn pdeathsig_helper_agent() {
    let Some(pidfile) = std::env::var_os(PDEATHSIG_HELPER_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let rank = spawn_rank(spec(dir.path(), &["sleep", "1000"]))
            .await
            .unwrap();
        let tmp = PathBuf::from(format!("{}.tmp", PathBuf::from(&pidfile).display()));
        fs::write(&tmp, rank.pid().to_string()).unwrap();
        fs::rename(&tmp, &pidfile).unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

#[tokio::test]
async fn rank_dies_when_the_agent_is_sigkilled() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("rank.pid");
    let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pdeathsig_helper_agent",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PDEATHSIG_HELPER_ENV, &pidfile)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(|| pidfile.exists(), Duration::from_secs(30)).await,
        "the helper agent never launched its rank"
    );
    let rank_pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!pid_is_dead(rank_pid));
    let rank_start = read_proc_stat(rank_pid).unwrap().start_time;

    agent.kill().unwrap(); // SIGKILL: no destructor, no cleanup code runs in the agent
    agent.wait().unwrap();

    let died = wait_until(
        || match read_proc_stat(rank_pid) {
            Err(_) => true,
            // Same pid, other process: ours is gone.
            Ok(stat) => stat.is_zombie() || stat.start_time != rank_start,
        },
        Duration::from_secs(5),
    )
    .await;
    if !died {
        // Do not leave it behind if the assertion fails.
        unsafe_kill(rank_pid);
    }
    assert!(died, "the rank outlived the agent that launched it");
}

fn unsafe_kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Regression: an old agent's reaper and a new agent rewrote the same journal without a common
/// lock, so one's read-modify-write could drop the other's entry. Two journals on one directory
/// (two processes in life) recording at once must keep every entry.
#[test]
fn two_journals_on_one_directory_lose_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let journal = PgidJournal::open(&path).unwrap();
                for i in 0..150 {
                    journal.record(10_000 + w * 1_000 + i, 1, "7").unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let entries = PgidJournal::open(dir.path()).unwrap().entries().unwrap();
    assert_eq!(entries.len(), 300);
}

// ---- Containment: cgroup v2 ----

/// Whether this host should give the tests a cgroup2 tree: a cgroup2 hierarchy is mounted and the
/// test's own cgroup there is writable. `Err` says why not.
fn cgroup2_expected() -> Result<(), String> {
    let mounts = cgroup::parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
    let Some(mount) = cgroup::choose_mount(&mounts) else {
        return Err("no cgroup2 hierarchy is mounted".into());
    };
    let own = cgroup::parse_own_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap())
        .ok_or("the test is in no cgroup2 cgroup")?;
    let dir = cgroup::cgroup_dir(mount, &own);
    let c = std::ffi::CString::new(dir.as_os_str().to_str().unwrap()).unwrap();
    // SAFETY: `access` reads a NUL-terminated path we own; no memory is shared.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "{} is not writable (no cgroup delegated)",
            dir.display()
        ));
    }
    Ok(())
}

/// A fresh agent-instance tree, removed on drop; `None` (with the reason printed) where this host
/// has no usable cgroup2. Where it has one, detection must find it.
struct TestTree(CgroupTree);

impl Drop for TestTree {
    fn drop(&mut self) {
        cgroup::reap_tree(&self.0.base);
    }
}

fn test_tree(test: &str) -> Option<TestTree> {
    let instance = format!("test-{}-{}", std::process::id(), test);
    let containment = Containment::detect(&instance);
    match (cgroup2_expected(), containment) {
        (Ok(()), Containment::Cgroup2(tree)) => Some(TestTree(tree)),
        (Ok(()), other) => panic!(
            "this host has a writable cgroup2 hierarchy but detection fell back: {}",
            other.describe()
        ),
        (Err(why), Containment::Cgroup2(tree)) => {
            cgroup::reap_tree(&tree.base);
            panic!("detection found a cgroup2 tree the test thought unusable: {why}");
        }
        (Err(why), other) => {
            eprintln!("SKIPPED {test}: {why} (containment: {})", other.describe());
            None
        }
    }
}

/// Pids of live processes running `sleep <marker>` (not the shells whose scripts name it).
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.trim_end() == format!("sleep {marker}") && !pid_is_dead(pid) {
            found.push(pid);
        }
    }
    found
}

fn kill_all(pids: &[i32]) {
    for pid in pids {
        unsafe_kill(*pid);
    }
}

/// A unique `sleep` duration to find escapees by, e.g. `1000.4242017`.
fn marker(n: u32) -> String {
    format!("{}.{}{:03}", 1000 + n, std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A rank that starts two processes that leave its process group: one through `setsid`, one as a
/// job of a shell with job control (`bash`, `set -m`; dash refuses it without a tty) that then exits, so the job is reparented to init.
fn escaping_script(a: &str, b: &str) -> String {
    format!(
        "setsid sleep {a} >/dev/null 2>&1 & bash -c 'set -m; sleep {b} >/dev/null 2>&1 & exit 0'; \
         sleep 0.2; echo ready; wait"
    )
}

async fn wait_escapees(a: &str, b: &str) {
    let both = wait_until(
        || !processes_with(a).is_empty() && !processes_with(b).is_empty(),
        Duration::from_secs(10),
    )
    .await;
    assert!(both, "the escapees never started");
}

/// The premise: a process group does not contain a rank. Its escapees survive a group kill.
#[tokio::test]
async fn process_groups_alone_let_setsid_and_job_control_escape() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (marker(1), marker(2));
    let mut rank = spawn_rank(sh(dir.path(), &escaping_script(&a, &b)))
        .await
        .unwrap();
    wait_ready(&rank).await;
    wait_escapees(&a, &b).await;
    for pid in processes_with(&a).into_iter().chain(processes_with(&b)) {
        let stat = read_proc_stat(pid).unwrap();
        assert_ne!(stat.pgid, rank.pgid(), "pid {pid} did not leave the group");
    }
    terminate_group(rank.pgid(), Duration::from_secs(5)).await;
    rank.wait().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let survivors: Vec<i32> = processes_with(&a)
        .into_iter()
        .chain(processes_with(&b))
        .collect();
    kill_all(&survivors);
    assert_eq!(survivors.len(), 2, "both escapees outlive a group kill");
}

#[tokio::test]
async fn a_rank_in_a_cgroup_leaves_nothing_behind_when_stopped() {
    let Some(tree) = test_tree("stop") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leaf = tree
        .0
        .create_rank("job/7 x", 2, 0, &Limits::default())
        .unwrap();
    assert!(
        leaf.ends_with("job-job_7_x-attempt-2/rank-0"),
        "{}",
        leaf.display()
    );
    let (a, b) = (marker(3), marker(4));
    let mut s = sh(dir.path(), &escaping_script(&a, &b));
    s.cgroup = Some(leaf.clone());
    let mut rank = spawn_rank(s).await.unwrap();
    assert_eq!(rank.cgroup(), Some(leaf.as_path()));
    wait_ready(&rank).await;
    wait_escapees(&a, &b).await;
    // Everything the rank started is in its cgroup, escapees included.
    let inside = cgroup::procs(&leaf);
    for pid in processes_with(&a).into_iter().chain(processes_with(&b)) {
        assert!(
            inside.contains(&pid),
            "escapee {pid} is outside the cgroup {inside:?}"
        );
    }
    let end = terminate_rank(rank.pgid(), rank.cgroup(), Duration::from_secs(5)).await;
    assert_eq!(end, GroupEnd::ExitedAfterTerm);
    rank.wait().await;
    let survivors: Vec<i32> = processes_with(&a)
        .into_iter()
        .chain(processes_with(&b))
        .collect();
    kill_all(&survivors);
    assert!(survivors.is_empty(), "escapees survived: {survivors:?}");
    assert!(!cgroup::populated(&leaf));
    cgroup::remove(&leaf);
    assert!(!leaf.exists());
}

#[tokio::test]
async fn a_cgroup_is_killed_after_the_grace_even_if_everything_ignores_sigterm() {
    let Some(tree) = test_tree("kill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leaf = tree.0.create_rank("9", 0, 1, &Limits::default()).unwrap();
    let a = marker(5);
    let mut s = sh(
        dir.path(),
        &format!(
            "trap '' TERM; setsid sh -c 'trap \"\" TERM; while true; do sleep {a}; done' & \
             echo ready; while true; do sleep 0.05; done"
        ),
    );
    s.cgroup = Some(leaf.clone());
    let mut rank = spawn_rank(s).await.unwrap();
    wait_ready(&rank).await;
    let grace = Duration::from_millis(500);
    let started = Instant::now();
    let end = terminate_rank(rank.pgid(), rank.cgroup(), grace).await;
    assert_eq!(end, GroupEnd::Killed);
    assert!(started.elapsed() >= grace);
    assert_eq!(rank.wait().await.code, -9);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let survivors = processes_with(&a);
    kill_all(&survivors);
    assert!(survivors.is_empty(), "{survivors:?}");
    assert_eq!(
        terminate_rank(rank.pgid(), rank.cgroup(), grace).await,
        GroupEnd::AlreadyGone
    );
}

const REAPER_HELPER_ENV: &str = "TRAINCTL_TEST_REAPER_DATA_DIR";

/// Not a test on its own: `the_reaper_kills_cgroup_escapees_when_the_agent_dies` runs this test
/// binary with `REAPER_HELPER_ENV` set, and this plays `trainctl agent-reaper`.
#[test]
fn reaper_helper() {
    let Some(data_dir) = std::env::var_os(REAPER_HELPER_ENV) else {
        return;
    };
    trainctl_agent::reaper_main(Path::new(&data_dir)).unwrap();
}

/// The test plays the agent: it runs a rank with escapees in its tree, and has a reaper watching
/// it. Its end of the reaper's pipe closes (as when an agent dies) and the reaper kills the tree.
#[tokio::test]
async fn the_reaper_kills_cgroup_escapees_when_the_agent_dies() {
    use std::io::Write as _;
    let Some(tree) = test_tree("reaper") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leaf = tree.0.create_rank("3", 0, 0, &Limits::default()).unwrap();
    let (a, b) = (marker(6), marker(7));
    let mut s = sh(dir.path(), &escaping_script(&a, &b));
    s.cgroup = Some(leaf.clone());
    let rank = spawn_rank(s).await.unwrap();
    wait_ready(&rank).await;
    wait_escapees(&a, &b).await;

    let mut reaper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "reaper_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(REAPER_HELPER_ENV, dir.path().join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut pipe = reaper.stdin.take().unwrap();
    writeln!(pipe, "cgroup {}", tree.0.base.display()).unwrap();
    drop(pipe); // the agent is gone
    let status = tokio::task::spawn_blocking(move || reaper.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let survivors: Vec<i32> = processes_with(&a)
        .into_iter()
        .chain(processes_with(&b))
        .collect();
    kill_all(&survivors);
    assert!(
        survivors.is_empty(),
        "escapees outlived the agent: {survivors:?}"
    );
    assert!(!tree.0.base.exists(), "the reaper removes the tree");
}

/// A restarted agent kills what its predecessor left in the tree recorded in its data dir.
#[tokio::test]
async fn a_restarted_agent_kills_the_recorded_tree() {
    let Some(tree) = test_tree("restart") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    cgroup::record_tree(dir.path(), Some(&tree.0.base)).unwrap();
    let leaf = tree.0.create_rank("4", 1, 0, &Limits::default()).unwrap();
    let (a, b) = (marker(8), marker(9));
    let mut s = sh(dir.path(), &escaping_script(&a, &b));
    s.cgroup = Some(leaf);
    let rank = spawn_rank(s).await.unwrap();
    wait_ready(&rank).await;
    wait_escapees(&a, &b).await;
    drop(rank); // the "crash"

    let recorded = cgroup::recorded_trees(dir.path());
    assert_eq!(recorded, vec![tree.0.base.clone()]);
    let killed: usize = recorded.iter().map(|t| cgroup::reap_tree(t)).sum();
    assert!(killed >= 3, "sh and two escapees: {killed}");
    let survivors: Vec<i32> = processes_with(&a)
        .into_iter()
        .chain(processes_with(&b))
        .collect();
    kill_all(&survivors);
    assert!(survivors.is_empty(), "{survivors:?}");
}

#[tokio::test]
async fn a_rank_whose_cgroup_is_gone_does_not_run_uncontained() {
    let Some(tree) = test_tree("gone") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leaf = tree.0.create_rank("5", 0, 0, &Limits::default()).unwrap();
    // A cgroup with a child cannot take processes (no internal processes below the root is not
    // universal, so use a removed leaf instead: the open fails with a clear message).
    cgroup::remove(&leaf);
    let mut s = sh(dir.path(), "echo ran");
    s.cgroup = Some(leaf.clone());
    let err = spawn_rank(s).await.unwrap_err();
    assert!(err.to_string().contains("cgroup"), "{err}");
}

#[tokio::test]
async fn a_slow_line_copy_gets_every_line_in_order_the_rank_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut rank_spec = sh(
        dir.path(),
        "i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done",
    );
    rank_spec.copy_lines_to = Some(tx);
    let mut rank = spawn_rank(rank_spec).await.unwrap();
    let mut got = Vec::new();
    while let Some(line) = rx.recv().await {
        got.push(line.text);
        if got.len() % 100 == 0 {
            // A receiver far slower than the rank: a lossy copy would drop lines here.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(rank.wait().await.code, 0);
    let want: Vec<String> = (0..3000).map(|i| format!("line {i}")).collect();
    assert_eq!(got, want);
}
