//! `trainctl run`, end to end, as a torchrun user runs it: the real binary started with the
//! virtual environment's `bin` first in PATH (so `python3` is the one with torch), real torch
//! workers (gloo, CPU), and where it matters the same script under the venv's own `torchrun`
//! for comparison: the workers' environment, the failure summary, the log files.
//!
//! The launchers of one test share two cores with torch's imports; the tests that start workers
//! run one at a time ([`serial`]).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one launcher may take before the test gives up on it (a 2-process gloo job takes
/// about 5 s here).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(90);

/// One test with workers at a time: two cores, and torch's import is heavy.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The venv's `bin` directory (python3, torchrun), made once by scripts/python-env.sh.
fn venv_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        common::python_with_torch()
            .parent()
            .expect("the venv's python is in a directory")
            .to_path_buf()
    })
}

fn script(name: &str) -> String {
    common::repo()
        .join("tests/python")
        .join(name)
        .display()
        .to_string()
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment every launcher of these tests starts with: the test's own, without anything
/// that would configure a launcher or a worker behind the test's back, and with the venv first in
/// PATH, as a user who activated it.
fn parent_env() -> BTreeMap<String, String> {
    const WORKER_VARS: [&str; 12] = [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "PYTHON_EXEC",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    ];
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            !k.starts_with("PET_")
                && !k.starts_with("TORCHELASTIC_")
                && !k.starts_with("ROLE_")
                && !k.starts_with("TRAINCTL_")
                && !WORKER_VARS.contains(&k.as_str())
        })
        .collect();
    let path = std::env::var("PATH").unwrap_or_default();
    env.insert("PATH".into(), format!("{}:{path}", venv_bin().display()));
    env
}

/// A launcher (trainctl run or torchrun) started by a test, its output in files. Dropped while
/// running, it gets SIGTERM (it stops its workers), then SIGKILL after 10 s.
struct Launcher {
    child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
    code: Option<i32>,
    _files: tempfile::TempDir,
}

impl Launcher {
    /// `program args...` in `cwd` with exactly `env`, and a TMPDIR of its own (where both
    /// launchers put their default log directories), removed with it.
    fn start(program: &Path, args: &[&str], cwd: &Path, env: &BTreeMap<String, String>) -> Self {
        let files = tempfile::tempdir().unwrap();
        let stdout = files.path().join("stdout");
        let stderr = files.path().join("stderr");
        let tmp = files.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .envs(env)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Launcher {
            child,
            what: format!("{} {}", program.display(), args.join(" ")),
            stdout,
            stderr,
            code: None,
            _files: files,
        }
    }

    /// `trainctl run ARGS` in `cwd` with [`parent_env`].
    fn trainctl(args: &[&str], cwd: &Path) -> Self {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        Self::start(&common::trainctl(), &all, cwd, &parent_env())
    }

    /// The venv's `torchrun ARGS` in `cwd` with [`parent_env`].
    fn torchrun(args: &[&str], cwd: &Path) -> Self {
        Self::start(&venv_bin().join("torchrun"), args, cwd, &parent_env())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything it printed, for failure messages.
    fn output(&self) -> String {
        format!(
            "`{}`\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.stdout(),
            self.stderr()
        )
    }

    /// Its exit code (128 + N when a signal N killed it), or `None` while it runs.
    fn try_code(&mut self) -> Option<i32> {
        if self.code.is_none() {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt as _;
                self.code = Some(
                    status
                        .code()
                        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                );
            }
        }
        self.code
    }

    /// Waits for it to exit, at most `timeout` (then the test fails with its output).
    fn wait(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(code) = self.try_code() {
                return code;
            }
            assert!(
                start.elapsed() < timeout,
                "still running after {timeout:?}: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for exit 0.
    fn succeeds(&mut self) {
        let code = self.wait(LAUNCH_TIMEOUT);
        assert_eq!(code, 0, "exit {code}: {}", self.output());
    }

    /// Waits until its stdout has `count` lines containing `marker`, and returns them.
    fn wait_lines(&mut self, marker: &str, count: usize, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let lines: Vec<String> = self
                .stdout()
                .lines()
                .filter(|l| l.contains(marker))
                .map(str::to_string)
                .collect();
            if lines.len() >= count {
                return lines;
            }
            if let Some(code) = self.try_code() {
                panic!(
                    "exited {code} before printing {count} {marker:?} lines: {}",
                    self.output()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no {count} {marker:?} lines after {timeout:?}: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.try_code().is_some() {
            return;
        }
        common::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.try_code().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for every launcher, then asserts that each exited 0 (all outputs in the message).
fn all_succeed(launchers: &mut [Launcher]) {
    let codes: Vec<i32> = launchers
        .iter_mut()
        .map(|l| l.wait(LAUNCH_TIMEOUT))
        .collect();
    if codes.iter().any(|c| *c != 0) {
        let outputs: Vec<String> = launchers.iter().map(Launcher::output).collect();
        panic!("exit codes {codes:?}:\n{}", outputs.join("\n\n"));
    }
}

/// What one worker of `run_env.py` reported.
#[derive(Debug, Clone)]
struct Worker {
    /// The console line's prefix (what the launcher put before the worker's text).
    prefix: String,
    env: BTreeMap<String, String>,
    rank: u64,
    world_size: u64,
    sum: f64,
}

impl Worker {
    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("worker {} has no {name}: {:?}", self.rank, self.env))
    }

    fn local_rank(&self) -> u32 {
        self.var("LOCAL_RANK").parse().unwrap()
    }
}

/// The `ENV {...}` lines of `run_env.py` workers, by global rank.
fn workers(stdout: &str) -> BTreeMap<u64, Worker> {
    let mut found = BTreeMap::new();
    for line in stdout.lines() {
        let Some(at) = line.find("ENV {") else {
            continue;
        };
        let v: Value = serde_json::from_str(&line[at + 4..])
            .unwrap_or_else(|e| panic!("a worker printed a bad ENV line ({e}): {line}"));
        let env = v["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let w = Worker {
            prefix: line[..at].to_string(),
            env,
            rank: v["rank"].as_u64().unwrap(),
            world_size: v["world_size"].as_u64().unwrap(),
            sum: v["sum"].as_f64().unwrap(),
        };
        assert!(
            found.insert(w.rank, w).is_none(),
            "rank printed twice: {stdout}"
        );
    }
    found
}

/// Variables whose values torchrun and trainctl must give alike (when they run the same
/// topology): every rank and size, the role, the restart counts, torchrun's defaults and the
/// signals workers should handle.
const DETERMINISTIC: [&str; 15] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
    "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
];

/// Variables that differ from run to run by design: a free port, a random run id, a log path,
/// and the TMPDIR each launcher of these tests gets ([`Launcher::start`]).
const PER_RUN: [&str; 4] = [
    "TMPDIR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
];

/// Compares the environment torchrun gave one worker with trainctl's: every variable torchrun
/// added must be there, and every value but the per-run ones (and `skip`) must be equal.
fn compare_env(torch: &Worker, ours: &Worker, parent: &BTreeMap<String, String>, skip: &[&str]) {
    let added = |w: &Worker| -> BTreeSet<String> {
        w.env
            .keys()
            .filter(|k| !parent.contains_key(*k))
            .cloned()
            .collect()
    };
    let (torch_added, ours_added) = (added(torch), added(ours));
    let missing: Vec<&String> = torch_added.difference(&ours_added).collect();
    let extra: Vec<&String> = ours_added.difference(&torch_added).collect();
    assert!(
        missing.is_empty(),
        "rank {}: torchrun gives the worker {missing:?} and trainctl does not (trainctl adds {extra:?} that torchrun does not)",
        torch.rank
    );
    for name in DETERMINISTIC {
        assert!(
            torch.env.contains_key(name),
            "torchrun no longer sets {name}: {:?}",
            torch.env
        );
    }
    let differing: Vec<String> = torch
        .env
        .iter()
        .filter(|(k, _)| !PER_RUN.contains(&k.as_str()) && !skip.contains(&k.as_str()))
        .filter(|(k, v)| ours.env.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: torchrun {v:?}, trainctl {:?}", ours.env.get(k)))
        .collect();
    assert!(
        differing.is_empty(),
        "rank {}: values differ from torchrun's:\n{}",
        torch.rank,
        differing.join("\n")
    );
}

/// The run directory of a worker's error file, `<log_dir>/<run_id>_<random>/attempt_N/<local>/error.json`,
/// checked against torch's layout.
fn check_error_file_layout(w: &Worker, log_dir: Option<&Path>, attempt: u32) -> PathBuf {
    let path = PathBuf::from(w.var("TORCHELASTIC_ERROR_FILE"));
    let tail = format!("attempt_{attempt}/{}/error.json", w.local_rank());
    assert!(
        path.ends_with(&tail),
        "{} does not end with {tail}",
        path.display()
    );
    let run_dir = path.ancestors().nth(3).unwrap().to_path_buf();
    let name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    let run_id = w.var("TORCHELASTIC_RUN_ID");
    let suffix = name
        .strip_prefix(&format!("{run_id}_"))
        .unwrap_or_else(|| panic!("run directory {name} is not <run id {run_id}>_<random>"));
    assert_eq!(
        suffix.len(),
        8,
        "torch's mkdtemp suffix has 8 characters: {name}"
    );
    if let Some(dir) = log_dir {
        assert_eq!(
            run_dir.parent(),
            Some(dir),
            "{} is not in --log-dir",
            run_dir.display()
        );
    }
    run_dir
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<usize> = text.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12] && text.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[test]
fn workers_get_the_environment_torchrun_gives_them() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let args = ["--standalone", "--nproc-per-node", "2"];
    let run = |mut l: Launcher| {
        l.succeeds();
        let w = workers(&l.stdout());
        assert_eq!(w.len(), 2, "two workers reported: {}", l.output());
        w
    };
    let env_py = script("run_env.py");
    let torch = run(Launcher::torchrun(
        &[&args[..], &[&env_py]].concat(),
        cwd.path(),
    ));
    let ours = run(Launcher::trainctl(
        &[&args[..], &[&env_py]].concat(),
        cwd.path(),
    ));
    let parent = parent_env();
    for rank in 0..2 {
        let (t, o) = (&torch[&rank], &ours[&rank]);
        // MASTER_ADDR: torch's c10d agent gives `socket.getfqdn()` (or --local-addr), which is
        // `localhost` on hosts whose name maps to 127.0.0.1 first (this one: checked below when
        // it is). trainctl's standalone store listens on 127.0.0.1 only, so its workers always
        // get `localhost`, which no DNS can get wrong.
        compare_env(t, o, &parent, &["MASTER_ADDR"]);
        assert_eq!(o.var("MASTER_ADDR"), "localhost");
        if t.var("MASTER_ADDR") == "localhost" {
            assert_eq!(o.var("MASTER_ADDR"), t.var("MASTER_ADDR"));
        }
        for w in [t, o] {
            assert_eq!((w.world_size, w.sum), (2, 3.0), "the all-reduce of 1 + 2");
            assert!(is_uuid(w.var("TORCHELASTIC_RUN_ID")), "{w:?}");
            assert!(w.var("MASTER_PORT").parse::<u16>().unwrap() > 0);
            check_error_file_layout(w, None, 0);
        }
        assert_eq!(o.var("MASTER_PORT"), ours[&0].var("MASTER_PORT"));
        assert_eq!(
            o.var("TORCHELASTIC_RUN_ID"),
            ours[&0].var("TORCHELASTIC_RUN_ID")
        );
        assert_eq!(o.var("OMP_NUM_THREADS"), "1");
        assert_eq!(o.var("TORCHELASTIC_USE_AGENT_STORE"), "True");
    }
}

#[test]
fn workers_get_no_variable_with_an_empty_name() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let mut l = Launcher::trainctl(
        &[
            "--standalone",
            "--nproc-per-node",
            "1",
            &script("run_env.py"),
        ],
        cwd.path(),
    );
    l.succeeds();
    let w = workers(&l.stdout());
    assert!(!w[&0].env.contains_key(""), "{:?}", w[&0].env.keys());
}

/// torch's `ChildFailedError` box from a launcher's stderr, with what differs between two runs
/// (times, pids, hosts, the log directory and torch's random run directory) replaced.
fn failure_box(stderr: &str, log_dir: &Path) -> Vec<String> {
    let marker = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ";
    let at = stderr
        .find(marker)
        .unwrap_or_else(|| panic!("no ChildFailedError in:\n{stderr}"));
    let mut lines = Vec::new();
    let mut borders = 0;
    for line in stderr[at + marker.len()..].lines().skip(1) {
        let mut line = line.replace(&log_dir.display().to_string(), "LOGS");
        if let Some(rest) = line.strip_prefix("  error_file: LOGS/") {
            let tail = rest.split_once('/').map(|(_, t)| t).unwrap_or(rest);
            line = format!("  error_file: LOGS/RUN/{tail}");
        }
        for (field, placeholder) in [("  time      : ", "TIME"), ("  host      : ", "HOST")] {
            if line.starts_with(field) {
                line = format!("{field}{placeholder}");
            }
        }
        for key in ["(pid: ", "by PID "] {
            if let Some(i) = line.find(key) {
                let start = i + key.len();
                let digits = line[start..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .count();
                line.replace_range(start..start + digits, "PID");
            }
        }
        let border = !line.is_empty() && line.chars().all(|c| c == '=');
        lines.push(line);
        if border {
            borders += 1;
            if borders == 2 {
                return lines;
            }
        }
    }
    panic!("the ChildFailedError box does not end:\n{stderr}");
}

#[test]
fn a_failing_worker_with_record_gives_torchruns_exit_code_and_summary() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let fail_py = script("run_fail.py");
    let summary = |mut l: Launcher, log_dir: &Path| {
        let code = l.wait(LAUNCH_TIMEOUT);
        assert_eq!(
            code,
            1,
            "torchrun's exit code for failed workers: {}",
            l.output()
        );
        failure_box(&l.stderr(), log_dir)
    };
    let torch_logs = tempfile::tempdir().unwrap();
    let ours_logs = tempfile::tempdir().unwrap();
    let args = |logs: &Path| {
        vec![
            "--standalone".to_string(),
            "--nproc-per-node".into(),
            "2".into(),
            "--log-dir".into(),
            logs.display().to_string(),
            fail_py.clone(),
        ]
    };
    let theirs = summary(
        Launcher::torchrun(&strs(&args(torch_logs.path())), cwd.path()),
        torch_logs.path(),
    );
    let ours = summary(
        Launcher::trainctl(&strs(&args(ours_logs.path())), cwd.path()),
        ours_logs.path(),
    );

    // What a user reads first: the failed rank, its exit code, its message and where it raised.
    let text = ours.join("\n");
    let root = &text[text
        .find("Root Cause (first observed failure):")
        .expect(&text)..];
    for expected in [
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: PID) ",
        "  error_file: LOGS/RUN/attempt_0/1/error.json",
        "ValueError: rank 1 gave up",
        "  second line",
        "run_fail.py\", line",
        "raise ValueError(",
    ] {
        assert!(
            root.contains(expected),
            "no {expected:?} in the root cause:\n{text}"
        );
    }
    assert!(
        text.contains("  exitcode  : -15 (pid: PID)  (SIGTERM)"),
        "{text}"
    );
    // The error file the summary names is the one @record wrote.
    let error_files: Vec<PathBuf> = std::fs::read_dir(ours_logs.path())
        .unwrap()
        .map(|e| e.unwrap().path().join("attempt_0/1/error.json"))
        .collect();
    assert_eq!(error_files.len(), 1, "one run directory: {error_files:?}");
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(&error_files[0]).unwrap()).unwrap();
    assert_eq!(
        recorded["message"]["message"],
        "ValueError: rank 1 gave up\nsecond line"
    );
    // Line for line torch's box, apart from times, pids, hosts and paths.
    assert_eq!(
        ours,
        theirs,
        "trainctl's summary:\n{}\ntorchrun's:\n{}",
        ours.join("\n"),
        theirs.join("\n")
    );
}

#[test]
fn a_restarted_gang_gets_a_fresh_store_and_succeeds() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().display().to_string();
    let mut l = Launcher::trainctl(
        &[
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "--log-dir",
            &log_dir,
            &script("run_restart.py"),
        ],
        cwd.path(),
    );
    l.succeeds();
    let out = l.stdout();
    for rank in 0..2 {
        for expected in [
            format!("ATTEMPT 0 RANK {rank} set its key"),
            format!("ATTEMPT 1 RANK {rank} stale_keys_seen=0 sum=2.0"),
        ] {
            assert!(out.contains(&expected), "no {expected:?}: {}", l.output());
        }
    }
    assert!(l.stderr().contains("restarting the gang"), "{}", l.output());
    // Both attempts under one run directory, as torch lays them out.
    let runs: Vec<PathBuf> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    for attempt in ["attempt_0", "attempt_1"] {
        assert!(
            runs[0].join(attempt).join("1").is_dir(),
            "no {attempt} in {runs:?}"
        );
    }
}

/// `&str`s of owned arguments.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Starts one `run_env.py` launcher per node of a two-node run, with `args` plus
/// `node_args(node)`.
fn two_nodes(
    start: impl Fn(&[&str]) -> Launcher,
    args: &[&str],
    node_args: impl Fn(u32) -> Vec<String>,
) -> Vec<Launcher> {
    (0..2)
        .map(|node| {
            let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            all.extend(node_args(node));
            all.push(script("run_env.py"));
            start(&strs(&all))
        })
        .collect()
}

#[test]
fn two_static_nodes_make_one_world_as_under_torchrun() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let static_run = |start: &dyn Fn(&[&str]) -> Launcher| {
        let port = free_port().to_string();
        let args = [
            "--nnodes",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--nproc-per-node",
            "2",
        ];
        let mut nodes = two_nodes(start, &args, |node| {
            vec![
                "--node-rank".into(),
                node.to_string(),
                "--local-addr".into(),
                format!("127.0.0.{}", node + 2),
            ]
        });
        all_succeed(&mut nodes);
        let per_node: Vec<BTreeMap<u64, Worker>> =
            nodes.iter().map(|n| workers(&n.stdout())).collect();
        (port, per_node)
    };
    let (port, ours) = static_run(&|a| Launcher::trainctl(a, cwd.path()));
    for (node, found) in ours.iter().enumerate() {
        let ranks: Vec<u64> = found.keys().copied().collect();
        let want = vec![node as u64 * 2, node as u64 * 2 + 1];
        assert_eq!(ranks, want, "node {node}'s ranks are contiguous");
        for w in found.values() {
            assert_eq!((w.world_size, w.sum), (4, 10.0));
            assert_eq!(w.var("GROUP_RANK"), node.to_string());
            assert_eq!(w.var("GROUP_WORLD_SIZE"), "2");
            assert_eq!(w.var("MASTER_ADDR"), "127.0.0.1");
            assert_eq!(w.var("MASTER_PORT"), port);
            assert_eq!(w.var("TORCHELASTIC_RUN_ID"), "none");
            assert_eq!(w.prefix, format!("[127.0.0.{} rank {}] ", node + 2, w.rank));
            check_error_file_layout(w, None, 0);
        }
    }
    // The same two nodes under torchrun give every worker the same values.
    let (torch_port, theirs) = static_run(&|a| Launcher::torchrun(a, cwd.path()));
    let parent = parent_env();
    for (node, found) in theirs.iter().enumerate() {
        for (rank, t) in found {
            assert_eq!(t.var("MASTER_PORT"), torch_port);
            compare_env(t, &ours[node][rank], &parent, &[]);
            assert_eq!(
                t.var("TORCHELASTIC_RUN_ID"),
                ours[node][rank].var("TORCHELASTIC_RUN_ID")
            );
        }
    }
}

#[test]
fn a_duplicate_node_rank_is_refused_with_a_clear_error() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let start = |node: &str, addr: &str| {
        Launcher::trainctl(
            &[
                "--nnodes",
                "2",
                "--node-rank",
                node,
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
                "--nproc-per-node",
                "1",
                "--local-addr",
                addr,
                &script("run_print.py"),
            ],
            cwd.path(),
        )
    };
    let mut first = start("0", "127.0.0.2");
    let mut second = start("1", "127.0.0.3");
    let mut third = start("1", "127.0.0.4");
    first.succeeds();
    let codes = [second.wait(LAUNCH_TIMEOUT), third.wait(LAUNCH_TIMEOUT)];
    let (loser, winner) = match codes {
        [0, c] if c != 0 => (&third, &second),
        [c, 0] if c != 0 => (&second, &third),
        _ => panic!(
            "one of two --node-rank 1 launchers must fail, codes {codes:?}:\n{}\n{}",
            second.output(),
            third.output()
        ),
    };
    assert!(
        loser.stderr().contains("two launchers claim --node-rank 1"),
        "{}",
        loser.output()
    );
    assert!(
        winner.stdout().contains("out of local rank 0"),
        "{}",
        winner.output()
    );
}

#[test]
fn two_c10d_nodes_meet_at_the_endpoint_and_one_node_closes_an_elastic_round() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let args = [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        &endpoint,
        "--rdzv-id",
        "job1",
        "--nnodes",
        "1:2",
        "--nproc-per-node",
        "2",
    ];
    // Both launchers run on this host, so both see the endpoint as theirs: is_host says which
    // one serves it, as torch users do on shared hosts.
    let mut nodes = two_nodes(
        |a| Launcher::trainctl(a, cwd.path()),
        &args,
        |node| {
            vec![
                "--rdzv-conf".into(),
                format!("is_host={}", u32::from(node == 0)),
                "--local-addr".into(),
                format!("127.0.0.{}", node + 2),
            ]
        },
    );
    all_succeed(&mut nodes);
    let mut seen = BTreeSet::new();
    for node in &nodes {
        let found = workers(&node.stdout());
        assert_eq!(found.len(), 2, "{}", node.output());
        let ranks: Vec<u64> = found.keys().copied().collect();
        let group = ranks[0] / 2;
        assert_eq!(
            ranks,
            [group * 2, group * 2 + 1],
            "contiguous ranks per node"
        );
        for w in found.values() {
            assert_eq!((w.world_size, w.sum), (4, 10.0));
            assert_eq!(w.var("GROUP_RANK"), group.to_string());
            assert_eq!(w.var("GROUP_WORLD_SIZE"), "2");
            assert_eq!(w.var("TORCHELASTIC_RUN_ID"), "job1");
            // trainctl serves the workers' store at the endpoint itself (torch's rank-0 agent
            // serves another one, on a free port of its own host).
            assert_eq!(w.var("MASTER_ADDR"), "127.0.0.1");
            assert_eq!(w.var("MASTER_PORT"), port.to_string());
            seen.insert(w.rank);
        }
    }
    assert_eq!(seen, (0..4).collect());

    // MIN:MAX with only MIN launchers: the round closes after the last call.
    let endpoint = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let mut alone = Launcher::trainctl(
        &[
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            &endpoint,
            "--rdzv-id",
            "job2",
            "--nnodes",
            "1:2",
            "--rdzv-conf",
            "last_call_timeout=1",
            "--nproc-per-node",
            "2",
            &script("run_env.py"),
        ],
        cwd.path(),
    );
    alone.succeeds();
    let found = workers(&alone.stdout());
    assert_eq!(found.len(), 2, "{}", alone.output());
    for w in found.values() {
        assert_eq!((w.world_size, w.sum), (2, 3.0));
        assert_eq!(w.var("GROUP_WORLD_SIZE"), "1");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the last call was waited for"
    );
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The worker pids a `run_sleep.py` gang printed.
fn sleeping_pids(l: &mut Launcher, count: usize) -> Vec<u32> {
    l.wait_lines("PID ", count, LAUNCH_TIMEOUT)
        .iter()
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn sigterm_stops_the_workers_and_the_launcher_promptly() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let sleep_py = script("run_sleep.py");
    // Workers that die of SIGTERM: gone at once.
    let mut l = Launcher::trainctl(
        &["--standalone", "--nproc-per-node", "2", &sleep_py],
        cwd.path(),
    );
    let pids = sleeping_pids(&mut l, 2);
    let sent = Instant::now();
    common::signal(l.pid(), libc::SIGTERM);
    let code = l.wait(Duration::from_secs(10));
    assert_eq!(code, 1, "torchrun's exit code when stopped: {}", l.output());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    for pid in &pids {
        assert!(gone(*pid), "worker {pid} outlived the launcher");
    }

    // Workers that ignore SIGTERM: SIGKILLed after --shutdown-timeout.
    let mut l = Launcher::trainctl(
        &[
            "--standalone",
            "--nproc-per-node",
            "2",
            "--shutdown-timeout",
            "2",
            &sleep_py,
            "--ignore-sigterm",
        ],
        cwd.path(),
    );
    let pids = sleeping_pids(&mut l, 2);
    let sent = Instant::now();
    common::signal(l.pid(), libc::SIGTERM);
    let code = l.wait(Duration::from_secs(15));
    let took = sent.elapsed();
    assert_ne!(code, 0, "{}", l.output());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "stopped after {took:?}, the shutdown timeout is 2 s: {}",
        l.output()
    );
    for pid in &pids {
        assert!(gone(*pid), "worker {pid} outlived the launcher");
    }
}

#[test]
fn sigterm_while_waiting_for_other_nodes_ends_the_launcher() {
    // Regression: the launcher ignored signals in the rendezvous (until the 600 s join timeout).
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut l = Launcher::trainctl(
        &[
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--master-port",
            &port,
            &script("run_sleep.py"),
        ],
        cwd.path(),
    );
    // Its store is up once the port is taken: it waits for node 1 then.
    common::eventually(Duration::from_secs(30), "the store to listen", || {
        TcpListener::bind(format!("0.0.0.0:{port}"))
            .is_err()
            .then_some(())
    });
    common::signal(l.pid(), libc::SIGTERM);
    let code = l.wait(Duration::from_secs(5));
    assert_eq!(code, 1, "{}", l.output());
    assert!(l.stderr().contains("stopped by a signal"), "{}", l.output());
}

/// The files of a log directory, relative to it, with the run directory named `RUN`.
fn log_files(dir: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, &mut found);
    found
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let (_, rest) = rel.split_once('/').unwrap();
            format!("RUN/{rest}")
        })
        .collect()
}

#[test]
fn log_dir_tee_redirects_filter_and_prefix_follow_torch() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let print_py = script("run_print.py");
    let (ours_logs, torch_logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_logs = |dir: &Path| {
        vec![
            "--standalone".to_string(),
            "--nproc-per-node".into(),
            "2".into(),
            "--log-dir".into(),
            dir.display().to_string(),
            "--tee".into(),
            "3".into(),
            "--redirects".into(),
            "1".into(),
            print_py.clone(),
        ]
    };
    let mut l = Launcher::trainctl(&strs(&with_logs(ours_logs.path())), cwd.path());
    l.succeeds();
    // --tee 3 wins over --redirects 1: both streams on the console and in the files.
    for rank in 0..2 {
        assert!(
            l.stdout().contains(&format!("out of local rank {rank}")),
            "{}",
            l.output()
        );
        assert!(
            l.stderr().contains(&format!("err of local rank {rank}")),
            "{}",
            l.output()
        );
    }
    let runs: Vec<PathBuf> = std::fs::read_dir(ours_logs.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    for rank in 0..2 {
        let dir = runs[0].join("attempt_0").join(rank.to_string());
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert_eq!(read("stdout.log"), format!("out of local rank {rank}\n"));
        assert_eq!(read("stderr.log"), format!("err of local rank {rank}\n"));
    }
    // torchrun writes the same files (trainctl adds its own output.log).
    Launcher::torchrun(&strs(&with_logs(torch_logs.path())), cwd.path()).succeeds();
    let (ours, theirs) = (log_files(ours_logs.path()), log_files(torch_logs.path()));
    let missing: Vec<&String> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "torchrun writes {missing:?} and trainctl does not: {ours:?}"
    );

    // --redirects 3 alone: nothing on the console, everything in the files.
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().display().to_string();
    let mut l = Launcher::trainctl(
        &[
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            &log_dir,
            "-r",
            "3",
            &print_py,
        ],
        cwd.path(),
    );
    l.succeeds();
    assert!(!l.stdout().contains("local rank"), "{}", l.output());
    assert!(!l.stderr().contains("local rank"), "{}", l.output());
    assert_eq!(
        log_files(logs.path())
            .iter()
            .filter(|f| f.ends_with("/stdout.log") || f.ends_with("/stderr.log"))
            .count(),
        4
    );

    // --local-ranks-filter 0 and torch's prefix template.
    let mut l = Launcher::trainctl(
        &[
            "--standalone",
            "--nproc-per-node",
            "2",
            "--local-ranks-filter",
            "0",
            "--log-line-prefix-template",
            "[${role_name}${local_rank}]:",
            &print_py,
        ],
        cwd.path(),
    );
    l.succeeds();
    assert_eq!(
        l.stdout(),
        "[default0]:out of local rank 0\n",
        "{}",
        l.output()
    );
    assert!(
        l.stderr().contains("[default0]:err of local rank 0\n"),
        "{}",
        l.output()
    );
    assert!(!l.stderr().contains("local rank 1"), "{}", l.output());
}

#[test]
fn bad_command_lines_are_refused_with_the_reason_and_exit_2() {
    let cwd = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--nprocs-per-node", "2", "train.py"],
            &["--nprocs-per-node", "did you mean --nproc-per-node"],
        ),
        (
            &["--standalone", "--frobnicate", "train.py"],
            &["--frobnicate"],
        ),
        (
            &["--nnodes", "3:2", "train.py"],
            &["--nnodes", "MIN must not exceed MAX"],
        ),
        (
            &["--rdzv-backend", "etcd", "train.py"],
            &["etcd", "not supported"],
        ),
        (
            &["--nnodes", "2", "--node-rank", "2", "train.py"],
            &["--node-rank 2", "0 to 1"],
        ),
    ];
    for (args, expected) in cases {
        let mut l = Launcher::trainctl(args, cwd.path());
        let code = l.wait(Duration::from_secs(10));
        assert_eq!(code, 2, "trainctl run {args:?}: {}", l.output());
        for text in expected {
            assert!(l.stderr().contains(text), "no {text:?}: {}", l.output());
        }
        assert!(l.stdout().is_empty(), "{}", l.output());
    }
}

#[test]
fn a_node_that_arrives_later_grows_the_running_gang_without_using_a_restart() {
    let _serial = serial();
    let cwd = tempfile::tempdir().unwrap();
    let endpoint = format!("127.0.0.1:{}", free_port());
    let launcher = |is_host: u32, addr: &str| {
        Launcher::trainctl(
            &[
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                &endpoint,
                "--rdzv-id",
                "grow",
                "--nnodes",
                "1:2",
                "--rdzv-conf",
                &format!("is_host={is_host},last_call_timeout=1"),
                "--local-addr",
                addr,
                "--max-restarts",
                "0",
                "--nproc-per-node",
                "2",
                &script("run_grow.py"),
            ],
            cwd.path(),
        )
    };
    let mut first = launcher(1, "127.0.0.2");
    // Alone, the round closes with one node after the last call; its workers run at world size 2.
    first.wait_lines("GROW restart_count=0 world=2", 2, LAUNCH_TIMEOUT);
    let second = launcher(0, "127.0.0.3");
    let mut nodes = [first, second];
    all_succeed(&mut nodes);
    let both = format!("{}{}", nodes[0].stdout(), nodes[1].stdout());
    for rank in 0..4 {
        let line = format!("GROW restart_count=0 world=4 rank={rank} group_world=2");
        assert!(both.contains(&line), "missing {line:?}:\n{both}");
        let line = format!("GROWN rank={rank} sum=4.0");
        assert!(both.contains(&line), "missing {line:?}:\n{both}");
    }
    assert!(
        nodes[0]
            .stderr()
            .contains("joined; restarting the gang at its new size"),
        "{}",
        nodes[0].output()
    );
}
