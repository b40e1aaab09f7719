//! `trainctl run --cluster`: a torchrun command line submitted as a job to a local cluster of 2 hosts,
//! run by real torch (gloo, CPU), its output streamed back and its end turned into torchrun's exit
//! code; Ctrl-C detaches and leaves the job running.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{path_with_venv, python_with_torch, repo, trainctl, DevCluster};

/// A job's end, from the CLI's start, with room for torch's import on 4 ranks.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// `trainctl run ARGS` from `tests/python` (the script's directory, so the script is named relative
/// to it), with the venv first on PATH and the cluster's context, without TRAINCTL_ADDR.
fn trainctl_run(cluster: &DevCluster, path: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(trainctl());
    cmd.arg("run")
        .args(args)
        .current_dir(repo().join("tests/python"))
        .env("TRAINCTL_CONFIG", cluster.config_file())
        .env("PATH", path)
        .env_remove("TRAINCTL_ADDR")
        .env_remove("PYTHON_EXEC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads a child's stream line by line into a channel.
fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A running `trainctl run`, its output collected as it comes.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    out: Vec<String>,
    err: Vec<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("start trainctl run");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    fn drain(&mut self) {
        self.out.extend(self.stdout.try_iter());
        self.err.extend(self.stderr.try_iter());
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn stderr_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(line) = self.err.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with {needle:?} after {timeout:?}:\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (killing it after `timeout`), with everything it printed.
    fn finish(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "trainctl run still running after {timeout:?}:\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads end at EOF: take every line.
        self.out.extend(self.stdout.iter());
        self.err.extend(self.stderr.iter());
        (status, self.out.join("\n"), self.err.join("\n"))
    }

    fn transcript(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.out.join("\n"),
            self.err.join("\n")
        )
    }
}

/// The job id of `trainctl run: submitted job ID (NAME); ...`.
fn submitted_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.split("trainctl run: submitted job ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `submitted job` line:\n{stderr}"))
        .to_string()
}

#[test]
fn a_torchrun_command_line_runs_as_a_job_of_the_cluster_and_exits_as_torchrun() {
    let path = path_with_venv();
    let cluster = DevCluster::start_with(2, &[], &[("PATH", path.clone())]);

    // 1. Success: every rank's line streamed with its [NODE rank RANK] prefix, exit 0.
    let run = Running::start(trainctl_run(
        &cluster,
        &path,
        &[
            "--cluster",
            "--addr",
            &cluster.url(),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "cluster_allreduce.py",
        ],
    ));
    let (status, stdout, stderr) = run.finish(RUN_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let id = submitted_id(&stderr);
    assert!(
        stderr.contains(&format!(
            "submitted job {id} (run-cluster_allreduce); follow it with `trainctl logs {id} -f --addr"
        )),
        "{stderr}"
    );
    let mut nodes = Vec::new();
    for rank in 0..4 {
        let text = format!(
            " rank {rank}] ALLREDUCE rank={rank} local_rank={} world=4 sum=10",
            rank % 2
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("[node-") && l.ends_with(&text))
            .unwrap_or_else(|| panic!("no line ending {text:?}:\n{stdout}\n{stderr}"));
        nodes.push(line[1..line.find(' ').unwrap()].to_string());
    }
    assert!(
        nodes[0] == nodes[1] && nodes[2] == nodes[3] && nodes[0] != nodes[2],
        "2 ranks on each host: {nodes:?}"
    );
    // The job as submitted: torchrun's worker command, the script relative to the workdir.
    let job = cluster.job(&id);
    assert_eq!(job["state"], "succeeded");
    let spec = &job["spec"];
    let command: Vec<&str> = spec["launch"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The interpreter `trainctl run` would use here: python3 on this PATH, as an absolute path.
    let python3 = python_with_torch().parent().unwrap().join("python3");
    assert_eq!(
        command,
        [python3.to_str().unwrap(), "-u", "cluster_allreduce.py"],
        "{spec:#}"
    );
    let workdir = repo().join("tests/python");
    assert_eq!(spec["launch"]["workdir"], workdir.to_str().unwrap());
    assert_eq!(spec["resources"]["nodes"], 2);
    assert_eq!(spec["resources"]["procs_per_node"], 2);

    // 2. A failing rank: exit 1 and the job's failure reason; the coordinator from TRAINCTL_ADDR.
    let mut cmd = trainctl_run(
        &cluster,
        &path,
        &[
            "--cluster",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--rdzv-id",
            "fails",
            "cluster_allreduce.py",
            "--fail-rank",
            "3",
        ],
    );
    cmd.env("TRAINCTL_ADDR", cluster.url());
    let (status, stdout, stderr) = Running::start(cmd).finish(RUN_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(" rank 3] FAILING rank=3"), "{stdout}");
    let id = submitted_id(&stderr);
    let reason = format!("trainctl run: job {id} (fails) failed: rank 3 on node-");
    assert!(stderr.contains(&reason), "{stderr}");
    assert_eq!(cluster.job(&id)["state"], "failed");

    // 3. Ctrl-C while following: the CLI detaches (130) and says how to cancel; the job runs on.
    let mut running = Running::start(trainctl_run(
        &cluster,
        &path,
        &[
            "--cluster",
            "--addr",
            &cluster.url(),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "cluster_allreduce.py",
            "--sleep",
            "120",
        ],
    ));
    let line = running.stderr_line("submitted job", RUN_TIMEOUT);
    let id = submitted_id(&line);
    cluster.wait_state(&id, "running", RUN_TIMEOUT);
    common::signal(running.child.id(), libc::SIGINT);
    let (status, _, stderr) = running.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "stopped following job {id}; it keeps running. Cancel it with `trainctl cancel {id} --addr"
        )),
        "{stderr}"
    );
    assert_eq!(cluster.job(&id)["state"], "running");
    let out = cluster.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    cluster.wait_state(&id, "cancelled", Duration::from_secs(60));
}

#[test]
fn flags_that_only_mean_something_on_this_host_are_refused_before_anything_is_submitted() {
    let out = Command::new(trainctl())
        .args([
            "run",
            "--cluster",
            "--addr",
            "127.0.0.1:9",
            "--master-port",
            "29500",
            "train.py",
        ])
        .env("TRAINCTL_CONFIG", "/nonexistent/trainctl-config.toml")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(
            "trainctl run: error: --master-port (or PET_MASTER_PORT) has no meaning with --cluster: "
        ),
        "{stderr}"
    );
}
