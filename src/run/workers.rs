//! One attempt of the local worker group: what torchrun's `LocalElasticAgent` and its
//! multiprocessing `PContext` do between one rendezvous and the next.
//!
//! [`run_group`] starts every worker with [`spawn_rank`] (own process group, parent-death signal,
//! pipes captured into `<attempt_dir>/<local_rank>/output.log`), copies each worker's lines to the
//! console and to torch's `stdout.log`/`stderr.log` as `--redirects`/`--tee` ask, polls the workers
//! every `monitor_interval`, and ends the attempt when every worker succeeded, when one failed
//! (the others get SIGTERM, then SIGKILL after `shutdown_timeout`), or when the launcher was asked
//! to stop (the signal it got is forwarded, then the same escalation). It then reads the error
//! file torch's `@record` wrote for each failed worker. It decides nothing about restarts or exit
//! codes: the caller gets a [`GroupOutcome`] and [`failure_summary`] renders torchrun's
//! `ChildFailedError` text from it (a pure function).
//!
//! # The files of one attempt (torch's layout)
//! ```text
//! <attempt_dir>/<local_rank>/error.json   TORCHELASTIC_ERROR_FILE of the worker
//! <attempt_dir>/<local_rank>/output.log   every line of both streams (trainctl's own, always)
//! <attempt_dir>/<local_rank>/stdout.log   when --redirects or --tee selects stdout
//! <attempt_dir>/<local_rank>/stderr.log   when --redirects or --tee selects stderr
//! ```
//! Stale copies of these files from an earlier run in the same directory are removed first
//! (torch removes the whole attempt directory), so an old `error.json` is never reported.
//!
//! # Differences from torchrun, on purpose
//! - Every console line carries [`GroupOptions::line_prefix`]; torchrun prefixes only tee'd
//!   streams (`[default0]:`) and lets the others through unchanged.
//! - Stopping signals the worker's whole process group and waits for the group, not only its
//!   leader; and when the attempt ends, whatever is left in a worker's group (a background
//!   process of a finished worker) is stopped too, so nothing outlives the attempt.
//! - An error file torch cannot parse (torchrun then crashes) becomes a [`WorkerError`] whose
//!   message says what is wrong with it.

use std::collections::BTreeSet;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use trainctl_agent::process::{
    create_dir_for_rank, group_has_live_members, spawn_rank, terminate_rank, RankExit, RankLine,
    RankProcess, RankSpec, Stream, GROUP_POLL_INTERVAL_MS,
};

/// The variable that tells a worker where `@record` writes its error file.
pub const ERROR_FILE_ENV: &str = "TORCHELASTIC_ERROR_FILE";
/// File name of a worker's error file in its per-rank directory (torch's).
pub const ERROR_FILE_NAME: &str = "error.json";
/// File name of a worker's combined output (both streams, every line) in its per-rank directory.
pub const OUTPUT_LOG_NAME: &str = "output.log";
/// File name of a worker's redirected or tee'd stdout (torch's).
pub const STDOUT_LOG_NAME: &str = "stdout.log";
/// File name of a worker's redirected or tee'd stderr (torch's).
pub const STDERR_LOG_NAME: &str = "stderr.log";
/// torchrun's default grace between SIGTERM and SIGKILL when stopping workers.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
/// torchrun's default `--monitor-interval` (0.1 s).
pub const DEFAULT_MONITOR_INTERVAL_MS: u64 = 100;
/// The shortest monitor interval used, whatever is asked (a zero interval would spin).
pub const MIN_MONITOR_INTERVAL_MS: u64 = 1;
/// Console lines queued between the workers' line copiers and the console writer. When the
/// console does not keep up, the copiers wait, and so do the workers on their pipes (as on a
/// slow terminal under torchrun): no line is left out.
pub const CONSOLE_QUEUE_LINES: usize = 4096;
/// Lines queued from a worker's log writer to its copier (console and stdout.log/stderr.log).
pub const LINE_COPY_QUEUE: usize = 1024;
/// How long, once every worker has ended, the console and file copies may take to finish.
/// Only a process that left the worker's group and still holds its pipes makes this wait.
pub const LINE_DRAIN_AFTER_GROUP_MS: u64 = 1_000;
/// Largest error file read; a larger one is reported as malformed.
pub const ERROR_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// torch's `ChildFailedError` box is as wide as its widest line, but at most this.
pub const SUMMARY_MAX_WIDTH: usize = 60;

/// What torch prints for a failure that left no error file and was not a signal.
const TRACEBACK_HINT: &str =
    "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html";
/// torch's placeholder for a value it does not have.
const NOT_AVAILABLE: &str = "<N/A>";

/// One worker of the local group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Rank on this host, 0-based; names the per-rank directory.
    pub local_rank: u32,
    /// Rank in the whole job (`RANK`).
    pub global_rank: u32,
    /// Program and arguments (e.g. `python -u train.py ...`).
    pub argv: Vec<String>,
    /// Variables set for the worker over the launcher's environment (`RANK`, `WORLD_SIZE`, ...).
    /// [`ERROR_FILE_ENV`] is added by [`run_group`].
    pub env: Vec<(String, String)>,
    /// Variables set only when neither the launcher's environment nor `env` has them.
    pub env_defaults: Vec<(String, String)>,
    /// Working directory of the worker.
    pub workdir: PathBuf,
}

/// A choice of a worker's streams (torch's `Std` flags: 1 stdout, 2 stderr, 3 both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    /// The worker's stdout.
    pub stdout: bool,
    /// The worker's stderr.
    pub stderr: bool,
}

impl Streams {
    /// Neither stream (torch's `0`).
    pub const NONE: Streams = Streams {
        stdout: false,
        stderr: false,
    };
    /// Both streams (torch's `3`).
    pub const BOTH: Streams = Streams {
        stdout: true,
        stderr: true,
    };

    /// Whether `stream` is chosen.
    pub fn has(self, stream: Stream) -> bool {
        match stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// Where console lines go. Each call gets one whole line (prefix, text and newline), which the
/// implementation must write at once so that lines of different workers never tear.
pub trait Console: Send + Sync {
    /// Writes `line` to the console's stdout ([`Stream::Stdout`]) or stderr.
    fn write_line(&self, stream: Stream, line: &[u8]);
}

/// The launcher's own stdout and stderr.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdConsole;

impl Console for StdConsole {
    fn write_line(&self, stream: Stream, line: &[u8]) {
        // A console that went away (closed pipe) cannot be told; the log files keep the lines.
        let _ = match stream {
            Stream::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line).and_then(|()| out.flush())
            }
            Stream::Stderr => io::stderr().lock().write_all(line),
        };
    }
}

/// Chooses streams per local rank (`--redirects`, `--tee`).
pub type StreamChoice = Box<dyn Fn(u32) -> Streams + Send + Sync>;
/// The console prefix of a worker from its local and global rank.
pub type LinePrefix = Box<dyn Fn(u32, u32) -> String + Send + Sync>;

/// How the group is run and shown.
pub struct GroupOptions {
    /// This host's name, for the default prefix and the launcher's log events (the summary
    /// takes its own).
    pub host: String,
    /// `<log_dir>/<run_id>/attempt_<n>`; the per-rank directories are made below it.
    pub attempt_dir: PathBuf,
    /// Streams of local rank N that go to files only (`--redirects`).
    pub redirect: StreamChoice,
    /// Streams of local rank N that go to files and to the console (`--tee`); tee wins over
    /// redirect for a stream both choose, as in torch.
    pub tee: StreamChoice,
    /// `--local-ranks-filter`: only these local ranks reach the console (files are unaffected).
    /// `None` or an empty set: every rank, as torch treats an empty filter.
    pub console_filter: Option<BTreeSet<u32>>,
    /// The prefix of each console line from (local rank, global rank).
    pub line_prefix: LinePrefix,
    /// Grace between the stopping signal and SIGKILL.
    pub shutdown_timeout: Duration,
    /// How often the workers are polled.
    pub monitor_interval: Duration,
    /// Where console lines are written ([`StdConsole`] unless a test captures them).
    pub console: Arc<dyn Console>,
}

impl GroupOptions {
    /// torchrun's defaults: no redirects, no tee, no filter, `"[host rank N] "` (global rank),
    /// a 30 s shutdown timeout, a 0.1 s monitor interval, the launcher's own console.
    pub fn new(host: impl Into<String>, attempt_dir: impl Into<PathBuf>) -> Self {
        let host = host.into();
        let prefix_host = host.clone();
        GroupOptions {
            host,
            attempt_dir: attempt_dir.into(),
            redirect: Box::new(|_| Streams::NONE),
            tee: Box::new(|_| Streams::NONE),
            console_filter: None,
            line_prefix: Box::new(move |_local, global| format!("[{prefix_host} rank {global}] ")),
            shutdown_timeout: Duration::from_secs(DEFAULT_SHUTDOWN_TIMEOUT_S),
            monitor_interval: Duration::from_millis(DEFAULT_MONITOR_INTERVAL_MS),
            console: Arc::new(StdConsole),
        }
    }

    /// Whether local rank `local_rank` may reach the console at all.
    fn shown(&self, local_rank: u32) -> bool {
        match &self.console_filter {
            Some(ranks) if !ranks.is_empty() => ranks.contains(&local_rank),
            _ => true,
        }
    }
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerExit {
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
}

impl WorkerExit {
    fn from_rank(exit: RankExit) -> Self {
        if exit.code < 0 {
            WorkerExit::Signaled(-exit.code)
        } else {
            WorkerExit::Exited(exit.code)
        }
    }

    /// Exit code 0.
    pub fn success(self) -> bool {
        self == WorkerExit::Exited(0)
    }

    /// torch's exitcode: the code, or the negated signal number (`-9` for SIGKILL).
    pub fn exitcode(self) -> i32 {
        match self {
            WorkerExit::Exited(code) => code,
            WorkerExit::Signaled(signal) => -signal,
        }
    }
}

/// The shape of an error file, which decides how torch shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFileFormat {
    /// `@record`'s: `{"message": {"message": ..., "extraInfo": {"py_callstack": ..., "timestamp": ...}}}`.
    Recorded,
    /// `{"message": "<text>", "timestamp": <s>}`, which torch also accepts (shown as is).
    Plain,
    /// Neither: not JSON, no `message`, too large, unreadable. [`WorkerError::message`] says why.
    Malformed,
}

/// What a failed worker's error file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerError {
    /// `"<Exception>: <message>"` as `@record` writes it (`<N/A>` if absent), the plain
    /// message, or for a malformed file what is wrong with it.
    pub message: String,
    /// The Python traceback (`py_callstack`), if recorded.
    pub traceback: Option<String>,
    /// When the error was recorded, Unix seconds (a plain message without one counts as 0, as
    /// in torch). `None`: absent or unreadable, and the worker's end time stands in.
    pub timestamp: Option<i64>,
    /// Which shape the file had.
    pub format: ErrorFileFormat,
}

/// How one worker of the attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerResult {
    /// Its local rank.
    pub local_rank: u32,
    /// Its global rank.
    pub global_rank: u32,
    /// Its process id (also its process group id).
    pub pid: i32,
    /// How it ended.
    pub exit: WorkerExit,
    /// When the launcher saw it end (at a monitor poll, or after stopping it).
    pub ended_at: SystemTime,
    /// `<attempt_dir>/<local_rank>/error.json` (whether or not the worker wrote it).
    pub error_file: PathBuf,
    /// Every line it printed, `<attempt_dir>/<local_rank>/output.log`.
    pub output_log: PathBuf,
    /// Its error file, read when it failed and the file exists.
    pub error: Option<WorkerError>,
}

impl WorkerResult {
    /// torch's failure timestamp: the error file's, else when the end was seen (Unix seconds).
    fn failure_timestamp(&self) -> i64 {
        match &self.error {
            Some(WorkerError {
                timestamp: Some(ts),
                format: ErrorFileFormat::Recorded | ErrorFileFormat::Plain,
                ..
            }) => *ts,
            _ => unix_seconds(self.ended_at),
        }
    }
}

/// How the attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    /// Every worker started, in the order their ends were seen (within one poll, by local
    /// rank): torch's order of failures, which breaks timestamp ties for the root cause.
    pub workers: Vec<WorkerResult>,
    /// The signal the launcher was stopped with, if it was.
    pub stopped_by: Option<i32>,
}

impl GroupOutcome {
    /// Whether every worker exited 0 and nobody stopped the group.
    pub fn succeeded(&self) -> bool {
        self.stopped_by.is_none() && self.workers.iter().all(|w| w.exit.success())
    }

    /// The workers that did not exit 0 (signals included), in the order their ends were seen.
    pub fn failures(&self) -> Vec<&WorkerResult> {
        self.workers.iter().filter(|w| !w.exit.success()).collect()
    }

    /// torch's "first observed failure" (`ChildFailedError.get_first_failure`): the failure
    /// with the smallest timestamp in whole seconds (its error file's, else when its end was
    /// seen), the earliest seen among equal ones.
    pub fn root_cause(&self) -> Option<&WorkerResult> {
        self.failures()
            .into_iter()
            .min_by_key(|w| w.failure_timestamp())
    }
}

/// Runs one attempt of the local worker group until every worker succeeded, one failed, or
/// `stop` turned `Some(signal)` (see the module docs). An error means the group could not be
/// started (a per-rank directory, a worker that could not be spawned); the workers already
/// started are stopped first.
pub async fn run_group(
    workers: Vec<WorkerSpec>,
    opts: GroupOptions,
    mut stop: watch::Receiver<Option<i32>>,
) -> anyhow::Result<GroupOutcome> {
    let asked = *stop.borrow_and_update();
    if let Some(signal) = asked {
        return Ok(GroupOutcome {
            workers: Vec::new(),
            stopped_by: Some(signal),
        });
    }
    let (console_tx, console_rx) = mpsc::channel(CONSOLE_QUEUE_LINES);
    let console_task = tokio::task::spawn_blocking({
        let console = Arc::clone(&opts.console);
        move || write_console(console.as_ref(), console_rx)
    });

    let mut live = Vec::with_capacity(workers.len());
    let mut copiers = Vec::with_capacity(workers.len());
    for spec in &workers {
        match start_worker(spec, &opts, console_tx.clone()).await {
            Ok((worker, copier)) => {
                live.push(worker);
                copiers.push(copier);
            }
            Err(e) => {
                let pgids: Vec<i32> = live.iter().map(|w: &LiveWorker| w.pid).collect();
                stop_groups(&pgids, libc::SIGTERM, opts.shutdown_timeout).await;
                drop(live);
                drain(copiers, console_tx, console_task).await;
                return Err(e);
            }
        }
    }

    let mut order = Vec::with_capacity(live.len());
    let stopped_by = monitor(&mut live, &mut order, &opts, &mut stop).await;
    // Whoever is still running was just stopped: collect how each ended.
    for (i, worker) in live.iter_mut().enumerate() {
        if worker.ended.is_none() {
            let exit = worker.rank.wait().await;
            worker.ended = Some((WorkerExit::from_rank(exit), SystemTime::now()));
            order.push(i);
        }
    }
    // Nothing of the attempt outlives it: a finished worker's background processes included.
    let leftovers: Vec<i32> = live
        .iter()
        .map(|w| w.pid)
        .filter(|&pgid| group_has_live_members(pgid))
        .collect();
    if !leftovers.is_empty() {
        tracing::info!(
            groups = leftovers.len(),
            "stopping processes that workers left behind"
        );
        stop_groups(&leftovers, libc::SIGTERM, opts.shutdown_timeout).await;
    }

    let mut results = Vec::with_capacity(live.len());
    for i in order {
        let worker = &live[i];
        let Some((exit, ended_at)) = worker.ended else {
            continue;
        };
        let error = if exit.success() {
            None
        } else {
            read_error_file(&worker.error_file).await
        };
        results.push(WorkerResult {
            local_rank: worker.local_rank,
            global_rank: worker.global_rank,
            pid: worker.pid,
            exit,
            ended_at,
            error_file: worker.error_file.clone(),
            output_log: worker.rank.log_path().to_path_buf(),
            error,
        });
    }
    drop(live);
    drain(copiers, console_tx, console_task).await;
    Ok(GroupOutcome {
        workers: results,
        stopped_by,
    })
}

/// A started worker.
struct LiveWorker {
    local_rank: u32,
    global_rank: u32,
    pid: i32,
    error_file: PathBuf,
    rank: RankProcess,
    ended: Option<(WorkerExit, SystemTime)>,
}

/// Polls until every worker ended or one failed (then stops the others with SIGTERM), or until
/// `stop` asks (then forwards its signal). Records each end in `order`. Returns the stop signal.
async fn monitor(
    live: &mut [LiveWorker],
    order: &mut Vec<usize>,
    opts: &GroupOptions,
    stop: &mut watch::Receiver<Option<i32>>,
) -> Option<i32> {
    let period = opts
        .monitor_interval
        .max(Duration::from_millis(MIN_MONITOR_INTERVAL_MS));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop_open = true;
    loop {
        let asked = *stop.borrow_and_update();
        if let Some(signal) = asked {
            let signal = if signal > 0 { signal } else { libc::SIGTERM };
            tracing::info!(host = %opts.host, signal, "forwarding the launcher's signal to every worker");
            let pgids: Vec<i32> = live.iter().map(|w| w.pid).collect();
            stop_groups(&pgids, signal, opts.shutdown_timeout).await;
            return Some(signal);
        }
        let now = SystemTime::now();
        for (i, worker) in live.iter_mut().enumerate() {
            if worker.ended.is_some() {
                continue;
            }
            if let Some(exit) = worker.rank.try_exit() {
                worker.ended = Some((WorkerExit::from_rank(exit), now));
                order.push(i);
            }
        }
        let failed = live
            .iter()
            .filter_map(|w| w.ended.map(|(exit, _)| (w, exit)))
            .find(|(_, exit)| !exit.success());
        if let Some((worker, exit)) = failed {
            tracing::warn!(
                host = %opts.host,
                local_rank = worker.local_rank,
                pid = worker.pid,
                exitcode = exit.exitcode(),
                "a worker failed; stopping the others"
            );
            let pgids: Vec<i32> = live.iter().map(|w| w.pid).collect();
            stop_groups(&pgids, libc::SIGTERM, opts.shutdown_timeout).await;
            return None;
        }
        if live.iter().all(|w| w.ended.is_some()) {
            return None;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            changed = stop.changed(), if stop_open => {
                // A dropped sender can no longer ask to stop.
                stop_open = changed.is_ok();
            }
        }
    }
}

/// Sends `signal` to every group, waits up to `grace` for all of them to empty, then stops the
/// ones left with [`terminate_rank`] (SIGTERM, SIGKILL at once, confirmed).
async fn stop_groups(pgids: &[i32], signal: i32, grace: Duration) {
    for &pgid in pgids {
        signal_group(pgid, signal);
    }
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let lingering: Vec<i32> = pgids
            .iter()
            .copied()
            .filter(|&pgid| group_has_live_members(pgid))
            .collect();
        if lingering.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                groups = lingering.len(),
                grace_ms = grace.as_millis() as u64,
                "workers outlived the shutdown timeout; sending SIGKILL"
            );
            let mut kills = tokio::task::JoinSet::new();
            for pgid in lingering {
                kills.spawn(async move { terminate_rank(pgid, None, Duration::ZERO).await });
            }
            while kills.join_next().await.is_some() {}
            return;
        }
        tokio::time::sleep_until(
            deadline
                .min(tokio::time::Instant::now() + Duration::from_millis(GROUP_POLL_INTERVAL_MS)),
        )
        .await;
    }
}

/// `kill(-pgid, signal)`; refuses ids below 2, which `kill` would take as "everyone" or "us".
fn signal_group(pgid: i32, signal: i32) {
    if pgid < 2 {
        return;
    }
    // SAFETY: `kill` has no memory-safety preconditions; `pgid >= 2`, so `-pgid` names exactly one
    // process group (a worker's, which leads its own group).
    unsafe { libc::kill(-pgid, signal) };
}

/// Prepares a worker's directory and files, spawns it, and starts copying its lines.
async fn start_worker(
    spec: &WorkerSpec,
    opts: &GroupOptions,
    console: mpsc::Sender<ConsoleLine>,
) -> anyhow::Result<(LiveWorker, JoinHandle<()>)> {
    let local_rank = spec.local_rank;
    let dir = opts.attempt_dir.join(local_rank.to_string());
    create_dir_for_rank(&dir, None).with_context(|| {
        format!(
            "create the log directory {} of local rank {local_rank}",
            dir.display()
        )
    })?;
    for stale in [
        ERROR_FILE_NAME,
        OUTPUT_LOG_NAME,
        STDOUT_LOG_NAME,
        STDERR_LOG_NAME,
    ] {
        let path = dir.join(stale);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "remove the stale {} of local rank {local_rank}",
                        path.display()
                    )
                })
            }
        }
    }
    let redirect = (opts.redirect)(local_rank);
    let tee = (opts.tee)(local_rank);
    let to_file = Streams {
        stdout: redirect.stdout || tee.stdout,
        stderr: redirect.stderr || tee.stderr,
    };
    let shown = opts.shown(local_rank);
    let to_console = Streams {
        stdout: shown && (tee.stdout || !redirect.stdout),
        stderr: shown && (tee.stderr || !redirect.stderr),
    };
    let open = |chosen: bool, name: &str| -> anyhow::Result<Option<RankFile>> {
        if !chosen {
            return Ok(None);
        }
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("create {} of local rank {local_rank}", path.display()))?;
        Ok(Some(RankFile {
            path,
            writer: Some(io::BufWriter::new(file)),
        }))
    };
    let stdout_file = open(to_file.stdout, STDOUT_LOG_NAME)?;
    let stderr_file = open(to_file.stderr, STDERR_LOG_NAME)?;

    let error_file = dir.join(ERROR_FILE_NAME);
    let mut env = spec.env.clone();
    env.push((
        ERROR_FILE_ENV.to_owned(),
        error_file.to_string_lossy().into_owned(),
    ));
    let prefix = (opts.line_prefix)(local_rank, spec.global_rank);
    // Every line reaches the console and the files, with backpressure: a worker waits on its
    // pipe when they fall behind, as it would writing to a slow terminal under torchrun.
    let (lines_tx, lines) = mpsc::channel(LINE_COPY_QUEUE);
    let rank = spawn_rank(RankSpec {
        argv: spec.argv.clone(),
        workdir: spec.workdir.clone(),
        env,
        env_defaults: spec.env_defaults.clone(),
        log_path: dir.join(OUTPUT_LOG_NAME),
        line_prefix: prefix.clone(),
        cgroup: None,
        run_as: None,
        copy_lines_to: Some(lines_tx),
    })
    .await
    .with_context(|| format!("start local rank {local_rank}"))?;
    let copier = tokio::spawn(copy_lines(
        lines,
        LineCopies {
            prefix,
            to_console,
            console,
            stdout_file,
            stderr_file,
        },
    ));
    let worker = LiveWorker {
        local_rank,
        global_rank: spec.global_rank,
        pid: rank.pid(),
        error_file,
        rank,
        ended: None,
    };
    Ok((worker, copier))
}

/// One console line: the stream it belongs on and the whole line, newline included.
type ConsoleLine = (Stream, Vec<u8>);

/// The console writer, on a blocking thread: a stuck terminal blocks it, not the runtime.
fn write_console(console: &dyn Console, mut lines: mpsc::Receiver<ConsoleLine>) {
    while let Some((stream, line)) = lines.blocking_recv() {
        console.write_line(stream, &line);
    }
}

/// A `stdout.log` or `stderr.log` being written.
struct RankFile {
    path: PathBuf,
    /// `None` once a write failed (reported once; the worker keeps running).
    writer: Option<io::BufWriter<std::fs::File>>,
}

impl RankFile {
    fn write_line(&mut self, text: &str) {
        let Some(writer) = &mut self.writer else {
            return;
        };
        let written = writer
            .write_all(text.as_bytes())
            .and_then(|()| writer.write_all(b"\n"));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "writing a worker's log failed; further lines are dropped");
            self.writer = None;
        }
    }

    fn flush(&mut self) {
        if let Some(writer) = &mut self.writer {
            if let Err(e) = writer.flush() {
                tracing::error!(path = %self.path.display(), error = %e, "writing a worker's log failed; further lines are dropped");
                self.writer = None;
            }
        }
    }
}

/// Where one worker's lines are copied.
struct LineCopies {
    prefix: String,
    to_console: Streams,
    console: mpsc::Sender<ConsoleLine>,
    stdout_file: Option<RankFile>,
    stderr_file: Option<RankFile>,
}

impl LineCopies {
    async fn copy(&mut self, line: &RankLine) {
        let file = match line.stream {
            Stream::Stdout => &mut self.stdout_file,
            Stream::Stderr => &mut self.stderr_file,
        };
        if let Some(file) = file {
            file.write_line(&line.text);
        }
        if self.to_console.has(line.stream) {
            let mut bytes = Vec::with_capacity(self.prefix.len() + line.text.len() + 1);
            bytes.extend_from_slice(self.prefix.as_bytes());
            bytes.extend_from_slice(line.text.as_bytes());
            bytes.push(b'\n');
            // The console writer lives as long as the group; a send fails only once it is gone.
            let _ = self.console.send((line.stream, bytes)).await;
        }
    }

    fn flush(&mut self) {
        for file in [&mut self.stdout_file, &mut self.stderr_file]
            .into_iter()
            .flatten()
        {
            file.flush();
        }
    }
}

/// Copies a worker's lines until its output ends (every sender of `lines` is gone), flushing
/// the files whenever no line is waiting.
async fn copy_lines(mut lines: mpsc::Receiver<RankLine>, mut copies: LineCopies) {
    while let Some(line) = lines.recv().await {
        copies.copy(&line).await;
        if lines.is_empty() {
            copies.flush();
        }
    }
    copies.flush();
}

/// Lets the line copiers finish (bounded by [`LINE_DRAIN_AFTER_GROUP_MS`]), then the console.
/// The workers' [`RankProcess`]es must be dropped first: their line senders end the copies.
async fn drain(
    copiers: Vec<JoinHandle<()>>,
    console_tx: mpsc::Sender<ConsoleLine>,
    console_task: JoinHandle<()>,
) {
    drop(console_tx);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LINE_DRAIN_AFTER_GROUP_MS);
    for mut copier in copiers {
        if tokio::time::timeout_at(deadline, &mut copier)
            .await
            .is_err()
        {
            tracing::info!(
                "a process that left its worker's group still holds the worker's output; no longer copying it"
            );
            copier.abort();
        }
    }
    // Every sender is gone now, so the console writer ends once it has written what is queued,
    // unless the console itself is stuck; then the launcher goes on without it.
    if tokio::time::timeout(
        Duration::from_millis(LINE_DRAIN_AFTER_GROUP_MS),
        console_task,
    )
    .await
    .is_err()
    {
        tracing::warn!("the console does not take lines; some were not shown");
    }
}

/// Reads a worker's error file: `None` when there is none, a [`ErrorFileFormat::Malformed`]
/// error saying why when it cannot be used.
async fn read_error_file(path: &Path) -> Option<WorkerError> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.len() > ERROR_FILE_MAX_BYTES {
        return Some(malformed(format!(
            "{} bytes, more than the {ERROR_FILE_MAX_BYTES} read",
            meta.len()
        )));
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => Some(parse_error_file(&String::from_utf8_lossy(&bytes))),
        Err(e) => Some(malformed(format!("cannot be read ({e})"))),
    }
}

fn malformed(why: String) -> WorkerError {
    WorkerError {
        message: format!("malformed error file: {why}"),
        traceback: None,
        timestamp: None,
        format: ErrorFileFormat::Malformed,
    }
}

/// Parses an error file in the shapes torch's `ProcessFailure` accepts (see
/// [`ErrorFileFormat`]). Never fails: anything else is [`ErrorFileFormat::Malformed`].
pub fn parse_error_file(text: &str) -> WorkerError {
    use serde_json::Value;
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return malformed(format!("not JSON ({e})")),
    };
    let Some(object) = value.as_object() else {
        return malformed("not a JSON object".to_owned());
    };
    match object.get("message") {
        Some(Value::String(message)) => WorkerError {
            message: message.clone(),
            traceback: None,
            // torch: `int(data.get("timestamp", 0))`.
            timestamp: match object.get("timestamp") {
                None => Some(0),
                Some(ts) => parse_timestamp(ts),
            },
            format: ErrorFileFormat::Plain,
        },
        Some(Value::Object(message)) => {
            let extra = message.get("extraInfo");
            WorkerError {
                message: message
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or(NOT_AVAILABLE)
                    .to_owned(),
                traceback: extra
                    .and_then(|e| e.get("py_callstack"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                timestamp: extra
                    .and_then(|e| e.get("timestamp"))
                    .and_then(parse_timestamp),
                format: ErrorFileFormat::Recorded,
            }
        }
        Some(_) => malformed("\"message\" is neither a string nor an object".to_owned()),
        None => malformed("no \"message\" field".to_owned()),
    }
}

/// Python's `int(x)` for the values error files hold: an integer, a float (truncated) or a
/// decimal string.
fn parse_timestamp(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// torchrun's `ChildFailedError` text for the failed workers of `outcome` (None if none failed):
/// a box titled `<script> FAILED`, the other failures, then the root cause ([`GroupOutcome::root_cause`]).
/// Exactly `ChildFailedError.format_msg()`, leading newline included; times in local time.
pub fn failure_summary(script: &str, outcome: &GroupOutcome, host: &str) -> Option<String> {
    render_summary(script, outcome, host, Zone::Local)
}

/// The time zone summary times are shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    /// The host's, as torch shows them.
    Local,
    /// UTC, for tests that must not depend on the host.
    #[cfg_attr(not(test), allow(dead_code))]
    Utc,
}

fn render_summary(script: &str, outcome: &GroupOutcome, host: &str, zone: Zone) -> Option<String> {
    let failures = outcome.failures();
    let root = outcome.root_cause()?;
    let title = format!("{script} FAILED");
    let mut width = title.chars().count();
    let mut root_text = String::new();
    let mut others = Vec::new();
    for (idx, failure) in failures.iter().enumerate() {
        let text = format_failure(idx, failure, host, zone);
        width = width.max(text.lines().map(|l| l.chars().count()).max().unwrap_or(0));
        if std::ptr::eq(*failure, root) {
            root_text = text;
        } else {
            others.push(text);
        }
    }
    let width = width.min(SUMMARY_MAX_WIDTH);
    let border = "=".repeat(width);
    let section = "-".repeat(width);
    let others = if others.is_empty() {
        "  <NO_OTHER_FAILURES>".to_owned()
    } else {
        others.join("\n")
    };
    Some(format!(
        "\n{border}\n{title}\n{section}\nFailures:\n{others}\n{section}\nRoot Cause (first observed failure):\n{root_text}\n{border}"
    ))
}

/// torch's `_FAILURE_FORMAT_TEMPLATE` for one failure.
fn format_failure(idx: usize, w: &WorkerResult, host: &str, zone: Zone) -> String {
    let signal_name = match w.exit {
        WorkerExit::Signaled(signal) => signal_name(signal)
            .map(|name| format!(" ({name})"))
            .unwrap_or_default(),
        WorkerExit::Exited(_) => String::new(),
    };
    let error_file = match &w.error {
        Some(_) => w.error_file.display().to_string(),
        None => NOT_AVAILABLE.to_owned(),
    };
    format!(
        "[{idx}]:\n  time      : {time}\n  host      : {host}\n  rank      : {rank} (local_rank: {local})\n  exitcode  : {code} (pid: {pid}) {signal_name}\n  error_file: {error_file}\n  traceback : {message}",
        time = format_time(w.failure_timestamp(), zone),
        rank = w.global_rank,
        local = w.local_rank,
        code = w.exit.exitcode(),
        pid = w.pid,
        message = failure_message(w),
    )
}

/// What torch shows as a failure's traceback.
fn failure_message(w: &WorkerResult) -> String {
    match &w.error {
        Some(error) => match error.format {
            ErrorFileFormat::Recorded => error
                .traceback
                .as_deref()
                .unwrap_or(&error.message)
                .replace('\n', "\n  "),
            ErrorFileFormat::Plain if error.message.is_empty() => made_up_message(w),
            ErrorFileFormat::Plain | ErrorFileFormat::Malformed => error.message.clone(),
        },
        None => made_up_message(w),
    }
}

/// torch's message for a failure without a usable error file.
fn made_up_message(w: &WorkerResult) -> String {
    match w.exit {
        WorkerExit::Signaled(signal) => format!(
            "Signal {signal} ({}) received by PID {}",
            signal_name(signal).unwrap_or(NOT_AVAILABLE),
            w.pid
        ),
        WorkerExit::Exited(_) => TRACEBACK_HINT.to_owned(),
    }
}

/// Python's `signal.Signals(n).name` on Linux.
fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match signal {
        1..=31 => Some(NAMES[signal as usize - 1]),
        34 => Some("SIGRTMIN"),
        64 => Some("SIGRTMAX"),
        _ => None,
    }
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Python's `datetime.fromtimestamp(ts).isoformat(sep="_")`: `YYYY-MM-DD_HH:MM:SS`.
fn format_time(ts: i64, zone: Zone) -> String {
    // `time_t` is 64 bits on every Linux this runs on.
    let t = ts as libc::time_t;
    // SAFETY: `tm` is plain old data, so all zeroes is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; the `_r` variants write only into `tm`.
    let converted = unsafe {
        match zone {
            Zone::Local => libc::localtime_r(&t, &mut tm),
            Zone::Utc => libc::gmtime_r(&t, &mut tm),
        }
    };
    if converted.is_null() {
        return ts.to_string();
    }
    format!(
        "{:04}-{:02}-{:02}_{:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Captures console lines for assertions.
    #[derive(Default)]
    struct MemoryConsole {
        lines: Mutex<Vec<(Stream, String)>>,
    }

    impl Console for MemoryConsole {
        fn write_line(&self, stream: Stream, line: &[u8]) {
            self.lines
                .lock()
                .unwrap()
                .push((stream, String::from_utf8_lossy(line).into_owned()));
        }
    }

    impl MemoryConsole {
        fn on(&self, stream: Stream) -> Vec<String> {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, _)| *s == stream)
                .map(|(_, l)| l.clone())
                .collect()
        }
    }

    fn sh(local_rank: u32, dir: &Path, script: &str) -> WorkerSpec {
        WorkerSpec {
            local_rank,
            global_rank: local_rank + 10,
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("LOCAL_RANK".into(), local_rank.to_string())],
            env_defaults: Vec::new(),
            workdir: dir.to_path_buf(),
        }
    }

    fn options(dir: &Path) -> (GroupOptions, Arc<MemoryConsole>) {
        let console = Arc::new(MemoryConsole::default());
        let mut opts = GroupOptions::new("hostA", dir.join("attempt_0"));
        opts.console = console.clone();
        opts.shutdown_timeout = Duration::from_secs(5);
        opts.monitor_interval = Duration::from_millis(20);
        (opts, console)
    }

    fn no_stop() -> watch::Receiver<Option<i32>> {
        watch::channel(None).1
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn by_local(outcome: &GroupOutcome, local_rank: u32) -> &WorkerResult {
        outcome
            .workers
            .iter()
            .find(|w| w.local_rank == local_rank)
            .unwrap()
    }

    async fn wait_for_file(path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn when_all_succeed_every_line_reaches_the_console_prefixed_on_its_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        let script = r#"echo "out $LOCAL_RANK $TORCHELASTIC_ERROR_FILE $FROM_DEFAULT"; echo "err $LOCAL_RANK" >&2"#;
        let mut workers = vec![sh(0, dir.path(), script), sh(1, dir.path(), script)];
        workers[1].env_defaults = vec![("FROM_DEFAULT".into(), "dflt".into())];
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();

        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(outcome.failures().is_empty());
        assert_eq!(outcome.root_cause(), None);
        assert_eq!(failure_summary("x.py", &outcome, "hostA"), None);
        assert_eq!(outcome.workers.len(), 2);
        for local in 0..2u32 {
            let w = by_local(&outcome, local);
            assert_eq!(w.exit, WorkerExit::Exited(0));
            assert_eq!(w.global_rank, local + 10);
            assert_eq!(w.error_file, attempt.join(format!("{local}/error.json")));
            assert_eq!(w.error, None);
        }
        let mut out = console.on(Stream::Stdout);
        out.sort();
        let dflt = |local: u32| if local == 1 { "dflt" } else { "" };
        let expected: Vec<String> = (0..2u32)
            .map(|l| {
                format!(
                    "[hostA rank {}] out {l} {} {}\n",
                    l + 10,
                    attempt.join(format!("{l}/error.json")).display(),
                    dflt(l)
                )
            })
            .collect();
        assert_eq!(out, expected);
        let mut err = console.on(Stream::Stderr);
        err.sort();
        assert_eq!(
            err,
            vec!["[hostA rank 10] err 0\n", "[hostA rank 11] err 1\n"]
        );
        // The combined log keeps both streams, without prefix; no redirect files were asked for.
        let log = read(attempt.join("0/output.log"));
        assert!(log.contains("out 0 ") && log.contains("err 0\n"), "{log}");
        assert!(!attempt.join("0/stdout.log").exists());
        assert!(!attempt.join("0/stderr.log").exists());
    }

    #[tokio::test]
    async fn a_failed_worker_stops_the_others_and_is_the_root_cause() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, _console) = options(dir.path());
        let workers = vec![
            sh(0, dir.path(), "sleep 30"),
            sh(1, dir.path(), "sleep 0.2; exit 3"),
            sh(2, dir.path(), "sleep 30"),
        ];
        let started = Instant::now();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(!outcome.succeeded());
        assert_eq!(outcome.stopped_by, None);
        assert_eq!(by_local(&outcome, 1).exit, WorkerExit::Exited(3));
        assert_eq!(
            by_local(&outcome, 0).exit,
            WorkerExit::Signaled(libc::SIGTERM)
        );
        assert_eq!(
            by_local(&outcome, 2).exit,
            WorkerExit::Signaled(libc::SIGTERM)
        );
        // Seen in torch's order: the failure first, then the workers it took down.
        let order: Vec<u32> = outcome.failures().iter().map(|w| w.local_rank).collect();
        assert_eq!(order, vec![1, 0, 2]);
        assert_eq!(outcome.root_cause().unwrap().local_rank, 1);
        for w in &outcome.workers {
            assert!(!group_has_live_members(w.pid), "{w:?}");
        }
        let summary = failure_summary("train.py", &outcome, "hostA").unwrap();
        assert!(summary.contains("train.py FAILED"), "{summary}");
        assert!(
            summary.contains("Root Cause (first observed failure):\n[0]:"),
            "{summary}"
        );
        assert!(
            summary.contains("  exitcode  : -15 (pid: ")
                && summary.contains(" (SIGTERM)\n")
                && summary.contains("  traceback : Signal 15 (SIGTERM) received by PID "),
            "{summary}"
        );
    }

    #[tokio::test]
    async fn a_worker_ignoring_sigterm_is_killed_after_the_shutdown_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, _console) = options(dir.path());
        opts.shutdown_timeout = Duration::from_millis(600);
        let workers = vec![
            sh(0, dir.path(), "trap '' TERM; touch ready; sleep 30"),
            sh(
                1,
                dir.path(),
                "while [ ! -e ready ]; do sleep 0.01; done; exit 1",
            ),
        ];
        let started = Instant::now();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(by_local(&outcome, 1).exit, WorkerExit::Exited(1));
        assert_eq!(
            by_local(&outcome, 0).exit,
            WorkerExit::Signaled(libc::SIGKILL)
        );
        assert!(
            elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert!(!group_has_live_members(by_local(&outcome, 0).pid));
        let summary = failure_summary("x.py", &outcome, "h").unwrap();
        assert!(
            summary.contains("  exitcode  : -9 (pid: ")
                && summary.contains("Signal 9 (SIGKILL) received by PID "),
            "{summary}"
        );
    }

    #[tokio::test]
    async fn the_launchers_signal_is_forwarded_to_every_worker() {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, console) = options(dir.path());
        opts.shutdown_timeout = Duration::from_millis(800);
        let handles_int = r#"trap 'echo "got INT $LOCAL_RANK"; exit 7' INT; touch ready$LOCAL_RANK; while :; do sleep 0.05; done"#;
        let ignores_int = "trap '' INT; touch ready$LOCAL_RANK; sleep 30";
        let workers = vec![
            sh(0, dir.path(), handles_int),
            sh(1, dir.path(), handles_int),
            sh(2, dir.path(), ignores_int),
        ];
        let (stop_tx, stop_rx) = watch::channel(None);
        let group = tokio::spawn(run_group(workers, opts, stop_rx));
        for local in 0..3 {
            wait_for_file(&dir.path().join(format!("ready{local}"))).await;
        }
        let stopped = Instant::now();
        stop_tx.send_replace(Some(libc::SIGINT));
        let outcome = group.await.unwrap().unwrap();

        assert_eq!(outcome.stopped_by, Some(libc::SIGINT));
        assert!(!outcome.succeeded());
        assert_eq!(by_local(&outcome, 0).exit, WorkerExit::Exited(7));
        assert_eq!(by_local(&outcome, 1).exit, WorkerExit::Exited(7));
        // The one that ignores SIGINT is stopped once the shutdown timeout is over.
        assert!(
            matches!(by_local(&outcome, 2).exit, WorkerExit::Signaled(_)),
            "{outcome:?}"
        );
        assert!(stopped.elapsed() >= Duration::from_millis(800));
        assert!(stopped.elapsed() < Duration::from_secs(5));
        let mut out = console.on(Stream::Stdout);
        out.sort();
        assert_eq!(
            out,
            vec!["[hostA rank 10] got INT 0\n", "[hostA rank 11] got INT 1\n"]
        );
    }

    #[tokio::test]
    async fn a_stop_asked_before_the_start_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, _console) = options(dir.path());
        let (_tx, rx) = watch::channel(Some(libc::SIGTERM));
        let outcome = run_group(vec![sh(0, dir.path(), "touch started")], opts, rx)
            .await
            .unwrap();
        assert_eq!(outcome.stopped_by, Some(libc::SIGTERM));
        assert!(outcome.workers.is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!dir.path().join("started").exists());
    }

    #[tokio::test]
    async fn redirects_and_tee_write_torchs_files_and_choose_the_console_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        // Rank 0: stdout to its file only. Rank 1: both streams to files and console.
        // Rank 2: console only. Rank 3: stdout redirected and tee'd (tee wins), stderr redirected.
        opts.redirect = Box::new(|local| match local {
            0 => Streams {
                stdout: true,
                stderr: false,
            },
            3 => Streams::BOTH,
            _ => Streams::NONE,
        });
        opts.tee = Box::new(|local| match local {
            1 => Streams::BOTH,
            3 => Streams {
                stdout: true,
                stderr: false,
            },
            _ => Streams::NONE,
        });
        opts.line_prefix = Box::new(|local, global| format!("[r{local}/{global}]: "));
        let script = r#"echo "o$LOCAL_RANK a"; echo "e$LOCAL_RANK" >&2; echo "o$LOCAL_RANK b""#;
        let workers = (0..4).map(|l| sh(l, dir.path(), script)).collect();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        assert!(outcome.succeeded());

        assert_eq!(read(attempt.join("0/stdout.log")), "o0 a\no0 b\n");
        assert!(!attempt.join("0/stderr.log").exists());
        assert_eq!(read(attempt.join("1/stdout.log")), "o1 a\no1 b\n");
        assert_eq!(read(attempt.join("1/stderr.log")), "e1\n");
        assert!(!attempt.join("2/stdout.log").exists());
        assert!(!attempt.join("2/stderr.log").exists());
        assert_eq!(read(attempt.join("3/stdout.log")), "o3 a\no3 b\n");
        assert_eq!(read(attempt.join("3/stderr.log")), "e3\n");

        let mut out = console.on(Stream::Stdout);
        out.sort();
        assert_eq!(
            out,
            vec![
                "[r1/11]: o1 a\n",
                "[r1/11]: o1 b\n",
                "[r2/12]: o2 a\n",
                "[r2/12]: o2 b\n",
                "[r3/13]: o3 a\n",
                "[r3/13]: o3 b\n",
            ]
        );
        let mut err = console.on(Stream::Stderr);
        err.sort();
        assert_eq!(err, vec!["[r0/10]: e0\n", "[r1/11]: e1\n", "[r2/12]: e2\n"]);
        // Each worker's lines keep their order on the console.
        let out = console.on(Stream::Stdout);
        let first = out.iter().position(|l| l.ends_with("o1 a\n")).unwrap();
        let second = out.iter().position(|l| l.ends_with("o1 b\n")).unwrap();
        assert!(first < second);
    }

    #[tokio::test]
    async fn the_local_ranks_filter_hides_other_ranks_from_the_console_but_not_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        opts.tee = Box::new(|_| Streams {
            stdout: true,
            stderr: false,
        });
        opts.console_filter = Some(BTreeSet::from([1]));
        let script = r#"echo "o$LOCAL_RANK"; echo "e$LOCAL_RANK" >&2"#;
        let workers = (0..3).map(|l| sh(l, dir.path(), script)).collect();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        assert!(outcome.succeeded());
        assert_eq!(console.on(Stream::Stdout), vec!["[hostA rank 11] o1\n"]);
        assert_eq!(console.on(Stream::Stderr), vec!["[hostA rank 11] e1\n"]);
        for local in 0..3 {
            assert_eq!(
                read(attempt.join(format!("{local}/stdout.log"))),
                format!("o{local}\n")
            );
        }
    }

    #[tokio::test]
    async fn no_line_is_lost_or_torn_when_workers_print_up_to_their_exit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        opts.tee = Box::new(|_| Streams::BOTH);
        // 200 lines per stream, written as fast as sh can, then exit at once.
        let script = r#"i=0; while [ $i -lt 200 ]; do echo "line $LOCAL_RANK $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"; echo "eline $LOCAL_RANK $i" >&2; i=$((i+1)); done"#;
        let workers = (0..2).map(|l| sh(l, dir.path(), script)).collect();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        assert!(outcome.succeeded());
        for local in 0..2u32 {
            let prefix = format!("[hostA rank {}] ", local + 10);
            let out: Vec<String> = console
                .on(Stream::Stdout)
                .into_iter()
                .filter(|l| l.starts_with(&prefix))
                .collect();
            let expected: Vec<String> = (0..200)
                .map(|i| format!("{prefix}line {local} {i} {}\n", "x".repeat(67)))
                .collect();
            assert_eq!(out, expected);
            let err: Vec<String> = console
                .on(Stream::Stderr)
                .into_iter()
                .filter(|l| l.starts_with(&prefix))
                .collect();
            assert_eq!(err.len(), 200);
            assert_eq!(err[199], format!("{prefix}eline {local} 199\n"));
            assert_eq!(
                read(attempt.join(format!("{local}/stdout.log")))
                    .lines()
                    .count(),
                200
            );
        }
    }

    #[tokio::test]
    async fn a_recorded_error_file_is_read_and_shown_as_the_root_cause() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, _console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        // What torch's @record writes (timestamp as a string), written by the worker itself.
        let record = r#"printf '%s' '{"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  File \"x.py\", line 3, in main\nValueError: boom\n", "timestamp": "1700000000"}}}' > "$TORCHELASTIC_ERROR_FILE"; exit 1"#;
        // A stale error file from an earlier run in the same directory is not this run's.
        std::fs::create_dir_all(attempt.join("0")).unwrap();
        std::fs::write(attempt.join("0/error.json"), r#"{"message": "stale"}"#).unwrap();
        let workers = vec![
            sh(0, dir.path(), "sleep 0.3; exit 2"),
            sh(1, dir.path(), record),
        ];
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        let failed = by_local(&outcome, 1);
        assert_eq!(failed.exit, WorkerExit::Exited(1));
        assert_eq!(
            failed.error,
            Some(WorkerError {
                message: "ValueError: boom".into(),
                traceback: Some(
                    "Traceback (most recent call last):\n  File \"x.py\", line 3, in main\nValueError: boom\n"
                        .into()
                ),
                timestamp: Some(1_700_000_000),
                format: ErrorFileFormat::Recorded,
            })
        );
        let other = by_local(&outcome, 0);
        assert_eq!(other.error, None, "{other:?}");
        // Rank 1 ended first anyway; its recorded time is also the earlier one.
        assert_eq!(outcome.root_cause().unwrap().local_rank, 1);
        let summary = render_summary("x.py", &outcome, "hostA", Zone::Utc).unwrap();
        let expected_root = format!(
            "Root Cause (first observed failure):\n[0]:\n  time      : 2023-11-14_22:13:20\n  host      : hostA\n  rank      : 11 (local_rank: 1)\n  exitcode  : 1 (pid: {}) \n  error_file: {}\n  traceback : Traceback (most recent call last):\n    File \"x.py\", line 3, in main\n  ValueError: boom\n  \n",
            failed.pid,
            attempt.join("1/error.json").display()
        );
        assert!(summary.contains(&expected_root), "{summary}");
    }

    #[tokio::test]
    async fn a_malformed_error_file_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, _console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        let workers = vec![sh(
            0,
            dir.path(),
            r#"printf '{"message": {"mess' > "$TORCHELASTIC_ERROR_FILE"; exit 4"#,
        )];
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        let w = by_local(&outcome, 0);
        let error = w.error.as_ref().unwrap();
        assert_eq!(error.format, ErrorFileFormat::Malformed);
        assert!(
            error
                .message
                .starts_with("malformed error file: not JSON ("),
            "{error:?}"
        );
        let summary = failure_summary("x.py", &outcome, "hostA").unwrap();
        assert!(
            summary.contains(&format!(
                "  error_file: {}\n  traceback : malformed error file: not JSON (",
                attempt.join("0/error.json").display()
            )),
            "{summary}"
        );
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_fails_the_group_and_stops_the_started_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, _console) = options(dir.path());
        let workers = vec![
            sh(0, dir.path(), "echo $$ > pid0; exec sleep 30"),
            WorkerSpec {
                local_rank: 1,
                argv: vec!["no-such-command-trainctl".into()],
                workdir: dir.path().to_path_buf(),
                ..WorkerSpec::default()
            },
        ];
        let started = Instant::now();
        let err = run_group(workers, opts, no_stop()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(4));
        let text = format!("{err:#}");
        assert!(
            text.contains("start local rank 1")
                && text.contains("command `no-such-command-trainctl` not found"),
            "{text}"
        );
        if let Ok(pid) = std::fs::read_to_string(dir.path().join("pid0")) {
            let pid: i32 = pid.trim().parse().unwrap();
            assert!(!group_has_live_members(pid), "rank 0 still runs");
        }
    }

    #[test]
    fn error_files_in_every_shape_torch_accepts_and_some_it_does_not() {
        let recorded = |message: &str, traceback: Option<&str>, ts: Option<i64>| WorkerError {
            message: message.into(),
            traceback: traceback.map(str::to_owned),
            timestamp: ts,
            format: ErrorFileFormat::Recorded,
        };
        let plain = |message: &str, ts: Option<i64>| WorkerError {
            message: message.into(),
            traceback: None,
            timestamp: ts,
            format: ErrorFileFormat::Plain,
        };
        let cases: Vec<(&str, WorkerError)> = vec![
            (
                r#"{"message": {"message": "E: m", "extraInfo": {"py_callstack": "tb", "timestamp": "17"}}}"#,
                recorded("E: m", Some("tb"), Some(17)),
            ),
            (
                r#"{"message": {"message": "E: m", "extraInfo": {"py_callstack": "tb", "timestamp": 18}, "errorCode": 9}}"#,
                recorded("E: m", Some("tb"), Some(18)),
            ),
            (
                r#"{"message": {"message": "E: m", "extraInfo": {"timestamp": " 19 "}}}"#,
                recorded("E: m", None, Some(19)),
            ),
            (
                r#"{"message": {"extraInfo": {"py_callstack": "tb", "timestamp": 20.9}}}"#,
                recorded("<N/A>", Some("tb"), Some(20)),
            ),
            // torch crashes on these; here the end time stands in for the timestamp.
            (
                r#"{"message": {"message": "E: m"}}"#,
                recorded("E: m", None, None),
            ),
            (
                r#"{"message": {"message": "E: m", "extraInfo": {"timestamp": "soon"}}}"#,
                recorded("E: m", None, None),
            ),
            (
                r#"{"message": "plain", "timestamp": 21}"#,
                plain("plain", Some(21)),
            ),
            (r#"{"message": "plain"}"#, plain("plain", Some(0))),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_error_file(text), expected, "{text}");
        }
        for (text, why) in [
            ("", "not JSON ("),
            ("{\"message\": ", "not JSON ("),
            ("[1, 2]", "not a JSON object"),
            ("{}", "no \"message\" field"),
            (
                "{\"message\": 5}",
                "\"message\" is neither a string nor an object",
            ),
        ] {
            let error = parse_error_file(text);
            assert_eq!(error.format, ErrorFileFormat::Malformed, "{text}");
            assert!(
                error
                    .message
                    .starts_with(&format!("malformed error file: {why}")),
                "{text}: {error:?}"
            );
            assert_eq!((error.traceback, error.timestamp), (None, None));
        }
    }

    fn failure(local: u32, global: u32, pid: i32, exit: WorkerExit, ended: i64) -> WorkerResult {
        WorkerResult {
            local_rank: local,
            global_rank: global,
            pid,
            exit,
            ended_at: UNIX_EPOCH + Duration::from_millis(ended as u64),
            error_file: PathBuf::from(format!("/logs/run/attempt_0/{local}/error.json")),
            output_log: PathBuf::from(format!("/logs/run/attempt_0/{local}/output.log")),
            error: None,
        }
    }

    /// The traceback torch 2.15's @record wrote for `raise ValueError("boom\nsecond line")`.
    const REAL_TRACEBACK: &str = "Traceback (most recent call last):\n  File \"/work/main/.venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py\", line 384, in wrapper\n    result = f(*args, **kwargs)\n             ^^^^^^^^^^^^^^^^^^\n  File \"/tmp/tr/x.py\", line 13, in main\n    raise ValueError(\"boom\\nsecond line\")\nValueError: boom\nsecond line\n";

    #[test]
    fn the_summary_matches_real_torchrun_output() {
        // Each case: a real `torchrun --standalone --nproc-per-node 2 x.py` (torch 2.15, TZ=UTC)
        // where local rank 1 failed and rank 0 was stopped with SIGTERM; the expected text is
        // what it printed after "ChildFailedError: ".
        let term = |ended_ms| failure(0, 0, 24630, WorkerExit::Signaled(15), ended_ms);

        // 1. `raise` under @record.
        let mut raised = failure(1, 1, 24631, WorkerExit::Exited(1), 1_796_075_085_000);
        raised.error_file = PathBuf::from(
            "/tmp/tr/logs/1330c089-c831-4d1d-9fe3-59560728aae8_fvpnbx4q/attempt_0/1/error.json",
        );
        raised.error = Some(WorkerError {
            message: "ValueError: boom\nsecond line".into(),
            traceback: Some(REAL_TRACEBACK.into()),
            timestamp: Some(1_796_075_084),
            format: ErrorFileFormat::Recorded,
        });
        let outcome = GroupOutcome {
            workers: vec![raised, term(1_796_075_085_400)],
            stopped_by: None,
        };
        let expected = r#"
============================================================
x.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_21:44:45
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 24630)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 24630
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_21:44:44
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 24631) 
  error_file: /tmp/tr/logs/1330c089-c831-4d1d-9fe3-59560728aae8_fvpnbx4q/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py", line 384, in wrapper
      result = f(*args, **kwargs)
               ^^^^^^^^^^^^^^^^^^
    File "/tmp/tr/x.py", line 13, in main
      raise ValueError("boom\nsecond line")
  ValueError: boom
  second line
  
============================================================"#;
        assert_eq!(
            render_summary("x.py", &outcome, "localhost", Zone::Utc).unwrap(),
            expected
        );

        // 2. `os.kill(os.getpid(), 9)`: no error file; every line is under 60 wide.
        let outcome = GroupOutcome {
            workers: vec![
                failure(1, 1, 24858, WorkerExit::Signaled(9), 1_796_075_099_100),
                failure(0, 0, 24857, WorkerExit::Signaled(15), 1_796_075_099_200),
            ],
            stopped_by: None,
        };
        let expected = r#"
=======================================================
x.py FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_21:44:59
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 24857)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 24857
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_21:44:59
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 24858)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 24858
======================================================="#;
        assert_eq!(
            render_summary("x.py", &outcome, "localhost", Zone::Utc).unwrap(),
            expected
        );

        // 3. `sys.exit(3)`: @record writes nothing for SystemExit.
        let outcome = GroupOutcome {
            workers: vec![
                failure(1, 1, 24895, WorkerExit::Exited(3), 1_796_075_103_100),
                failure(0, 0, 24894, WorkerExit::Signaled(15), 1_796_075_103_200),
            ],
            stopped_by: None,
        };
        let expected = r#"
============================================================
x.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_21:45:03
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 24894)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 24894
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_21:45:03
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 24895) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"#;
        assert_eq!(
            render_summary("x.py", &outcome, "localhost", Zone::Utc).unwrap(),
            expected
        );
    }

    #[test]
    fn the_root_cause_follows_torchs_rule() {
        let at = |local: u32, exit: WorkerExit, ended_ms: i64, recorded: Option<i64>| {
            let mut w = failure(local, local, 100 + local as i32, exit, ended_ms);
            w.error = recorded.map(|ts| WorkerError {
                message: "E: m".into(),
                traceback: None,
                timestamp: Some(ts),
                format: ErrorFileFormat::Recorded,
            });
            w
        };
        let root = |workers: Vec<WorkerResult>| {
            GroupOutcome {
                workers,
                stopped_by: None,
            }
            .root_cause()
            .map(|w| w.local_rank)
        };
        let ok = WorkerExit::Exited(0);
        let bad = WorkerExit::Exited(1);
        let term = WorkerExit::Signaled(15);
        // (case, workers in the order seen, expected root)
        let cases = vec![
            ("nothing failed", vec![at(0, ok, 1_000, None)], None),
            (
                "the earliest recorded error wins over an earlier end",
                vec![at(0, term, 5_000, None), at(1, bad, 9_000, Some(3))],
                Some(1),
            ),
            (
                "without error files, the end seen first (whole seconds, then order seen)",
                vec![at(2, bad, 7_900, None), at(0, term, 7_100, None)],
                Some(2),
            ),
            (
                "an earlier second wins",
                vec![at(2, bad, 8_100, None), at(0, term, 7_900, None)],
                Some(0),
            ),
            (
                "a success is never the root cause",
                vec![at(0, ok, 1_000, None), at(1, bad, 2_000, None)],
                Some(1),
            ),
            (
                "equal recorded seconds: the one seen first",
                vec![at(3, bad, 4_000, Some(4)), at(1, bad, 4_000, Some(4))],
                Some(3),
            ),
        ];
        for (case, workers, expected) in cases {
            assert_eq!(root(workers), expected, "{case}");
        }
        // A plain message without a timestamp counts as 0 in torch, so it is the root cause.
        let mut plain = at(4, bad, 9_000, None);
        plain.error = Some(parse_error_file(r#"{"message": "plain"}"#));
        assert_eq!(root(vec![at(1, bad, 1_000, None), plain]), Some(4));
        // A malformed file's (absent) timestamp does not count: the end time does.
        let mut broken = at(4, bad, 9_000, None);
        broken.error = Some(parse_error_file("{"));
        assert_eq!(root(vec![at(1, bad, 1_000, None), broken]), Some(1));
    }

    #[test]
    fn summary_messages_for_each_kind_of_failure() {
        let mut plain = failure(0, 4, 50, WorkerExit::Exited(1), 0);
        plain.error = Some(parse_error_file(
            r#"{"message": "line one\nline two", "timestamp": 0}"#,
        ));
        let mut empty_plain = failure(1, 5, 51, WorkerExit::Signaled(11), 0);
        empty_plain.error = Some(parse_error_file(r#"{"message": ""}"#));
        let mut no_traceback = failure(2, 6, 52, WorkerExit::Exited(1), 0);
        no_traceback.error = Some(parse_error_file(
            r#"{"message": {"message": "E: a\nb", "extraInfo": {"timestamp": "0"}}}"#,
        ));
        let odd_signal = failure(3, 7, 53, WorkerExit::Signaled(40), 0);
        let rt = failure(4, 8, 54, WorkerExit::Signaled(34), 0);
        // (worker, expected exitcode line, error_file line, traceback line)
        let cases = [
            (
                plain,
                "1 (pid: 50) ",
                "/logs/run/attempt_0/0/error.json",
                "line one\nline two",
            ),
            (
                empty_plain,
                "-11 (pid: 51)  (SIGSEGV)",
                "/logs/run/attempt_0/1/error.json",
                "Signal 11 (SIGSEGV) received by PID 51",
            ),
            (
                no_traceback,
                "1 (pid: 52) ",
                "/logs/run/attempt_0/2/error.json",
                "E: a\n  b",
            ),
            (
                odd_signal,
                "-40 (pid: 53) ",
                "<N/A>",
                "Signal 40 (<N/A>) received by PID 53",
            ),
            (
                rt,
                "-34 (pid: 54)  (SIGRTMIN)",
                "<N/A>",
                "Signal 34 (SIGRTMIN) received by PID 54",
            ),
        ];
        for (w, exitcode, error_file, traceback) in cases {
            let text = format_failure(0, &w, "h", Zone::Utc);
            let expected = format!(
                "[0]:\n  time      : 1970-01-01_00:00:00\n  host      : h\n  rank      : {} (local_rank: {})\n  exitcode  : {exitcode}\n  error_file: {error_file}\n  traceback : {traceback}",
                w.global_rank, w.local_rank
            );
            assert_eq!(text, expected);
        }
    }

    #[test]
    fn a_single_failure_has_no_other_failures_and_a_long_title_widens_the_box() {
        let outcome = GroupOutcome {
            workers: vec![failure(0, 0, 7, WorkerExit::Exited(2), 0)],
            stopped_by: None,
        };
        let text = render_summary("s.py", &outcome, "h", Zone::Utc).unwrap();
        assert!(
            text.contains("Failures:\n  <NO_OTHER_FAILURES>\n---"),
            "{text}"
        );
        let long = "a".repeat(80);
        let text = render_summary(&long, &outcome, "h", Zone::Utc).unwrap();
        // The box is capped at 60 however long the title or a line is.
        assert!(
            text.starts_with(&format!("\n{}\n{long} FAILED\n", "=".repeat(60))),
            "{text}"
        );
    }

    /// Replaces what differs between two runs (times, pids, paths) so texts can be compared.
    fn normalize(text: &str, replacements: &[(String, &str)]) -> String {
        let mut text = text.to_owned();
        for (from, to) in replacements {
            text = text.replace(from.as_str(), to);
        }
        text.lines()
            .map(|line| match line.strip_prefix("  time      : ") {
                Some(_) => "  time      : T",
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn a_real_torch_worker_with_record_gives_torchruns_summary() {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        if !python.exists() {
            eprintln!("SKIPPED: no {} with torch", python.display());
            return;
        }
        // The script of the torchrun runs above, at the same line numbers.
        let dir = tempfile::tempdir().unwrap();
        let script = r#"import os, sys, time
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    r = int(os.environ["LOCAL_RANK"])
    mode = os.environ.get("MODE", "raise")
    print(f"hello from {r}", flush=True)
    print(f"err from {r}", file=sys.stderr, flush=True)
    if r == 1:
        time.sleep(0.5)
        if mode == "raise":
            raise ValueError("boom\nsecond line")
        if mode == "kill":
            os.kill(os.getpid(), 9)
        if mode == "exit":
            sys.exit(3)
    time.sleep(30)

if __name__ == "__main__":
    main()
"#;
        std::fs::write(dir.path().join("x.py"), script).unwrap();
        let (opts, console) = options(dir.path());
        let attempt = opts.attempt_dir.clone();
        let workers = (0..2u32)
            .map(|local| WorkerSpec {
                local_rank: local,
                global_rank: local,
                argv: vec![
                    python.display().to_string(),
                    "-u".into(),
                    dir.path().join("x.py").display().to_string(),
                ],
                env: vec![("LOCAL_RANK".into(), local.to_string())],
                env_defaults: Vec::new(),
                workdir: dir.path().to_path_buf(),
            })
            .collect();
        let outcome = run_group(workers, opts, no_stop()).await.unwrap();
        let (r0, r1) = (by_local(&outcome, 0), by_local(&outcome, 1));
        assert_eq!(r1.exit, WorkerExit::Exited(1));
        assert_eq!(r0.exit, WorkerExit::Signaled(libc::SIGTERM));
        let error = r1.error.as_ref().unwrap();
        assert_eq!(error.message, "ValueError: boom\nsecond line");
        assert_eq!(error.format, ErrorFileFormat::Recorded);
        assert!(error.timestamp.is_some());
        let mut out = console.on(Stream::Stdout);
        out.sort();
        assert_eq!(
            out,
            vec![
                "[hostA rank 0] hello from 0\n",
                "[hostA rank 1] hello from 1\n"
            ]
        );

        let ours = render_summary("x.py", &outcome, "localhost", Zone::Utc).unwrap();
        let replacements = [
            (
                attempt.display().to_string(),
                "/tmp/tr/logs/1330c089-c831-4d1d-9fe3-59560728aae8_fvpnbx4q/attempt_0",
            ),
            (dir.path().display().to_string(), "/tmp/tr"),
            // The venv the traceback runs through: `<venv>/bin/python` here, /work/main/.venv
            // where the torchrun output was captured.
            (
                python
                    .parent()
                    .and_then(Path::parent)
                    .map(|venv| venv.display().to_string())
                    .unwrap_or_default(),
                "/work/main/.venv",
            ),
            (format!("PID {}", r0.pid), "PID 24630"),
            (format!("pid: {}", r0.pid), "pid: 24630"),
            (format!("pid: {}", r1.pid), "pid: 24631"),
        ];
        let torchrun = GroupOutcome {
            workers: vec![
                WorkerResult {
                    error_file: PathBuf::from("/tmp/tr/logs/1330c089-c831-4d1d-9fe3-59560728aae8_fvpnbx4q/attempt_0/1/error.json"),
                    error: Some(WorkerError {
                        message: "ValueError: boom\nsecond line".into(),
                        traceback: Some(REAL_TRACEBACK.into()),
                        timestamp: Some(1_796_075_084),
                        format: ErrorFileFormat::Recorded,
                    }),
                    ..failure(1, 1, 24631, WorkerExit::Exited(1), 1_796_075_085_000)
                },
                failure(0, 0, 24630, WorkerExit::Signaled(15), 1_796_075_085_400),
            ],
            stopped_by: None,
        };
        let theirs = render_summary("x.py", &torchrun, "localhost", Zone::Utc).unwrap();
        assert_eq!(normalize(&ours, &replacements), normalize(&theirs, &[]));
    }

    #[test]
    fn local_times_are_shown_as_python_shows_them() {
        // Whatever this host's zone is, the shape is Python's isoformat with `_`; compare
        // with `date` when it is there.
        let ts = 1_796_075_084;
        let shown = format_time(ts, Zone::Local);
        assert_eq!(shown.len(), 19, "{shown}");
        if let Ok(out) = std::process::Command::new("date")
            .args(["-d", &format!("@{ts}"), "+%Y-%m-%d_%H:%M:%S"])
            .output()
        {
            if out.status.success() {
                assert_eq!(shown, String::from_utf8_lossy(&out.stdout).trim());
            }
        }
        assert_eq!(format_time(0, Zone::Utc), "1970-01-01_00:00:00");
    }
}
