//! Launching ranks as child processes, capturing their output, and cleaning up after them (Linux).
//!
//! Each rank runs in its own process group, so one signal to `-pgid` reaches everything the rank
//! started (data-loader workers, `sh -c` wrappers, compilers). Three mechanisms keep a rank from
//! outliving the agent that launched it:
//!
//! 1. `PR_SET_PDEATHSIG = SIGKILL` on the rank, set between `fork` and `exec`: the kernel kills the
//!    rank when the agent dies, however it dies.
//! 2. [`terminate_group`]: SIGTERM to the group, a bounded grace period, then SIGKILL.
//! 3. [`PgidJournal`]: a small file naming every live group, so an agent restarted after a crash
//!    kills what the previous one left behind ([`PgidJournal::reap_leftovers`]).
//!
//! # Which thread forks matters
//! The kernel sends the parent-death signal when the *thread* that forked the child exits, not
//! when the process does. A rank forked from a `spawn_blocking` thread would be SIGKILLed when
//! that idle thread retires (10 s by default). [`spawn_rank`] therefore hands every fork to one
//! dedicated launcher thread that lives as long as the agent process, whatever task or thread
//! calls it.
//!
//! # Running ranks as another user
//! With `trainctl agent --run-as USER` (or `TRAINCTL_RUN_AS`), every rank runs with USER's uid,
//! primary gid and supplementary groups while the agent stays root (it must manage cgroups and
//! signal any rank). [`RunAs::for_agent`] resolves the user once, when the agent starts
//! (`getpwnam_r`, `getgrouplist`): an unknown user, or an agent that is not root and names another
//! user, refuses to start. Between `fork` and `exec` the child then does, in this order:
//!
//! 1. the write to its cgroup's `cgroup.procs` (still root, through a descriptor the agent opened),
//!    so the cgroup stays root's and the rank cannot move itself out of it or raise its limits;
//! 2. `setgroups`, `setgid`, `setuid` (plain system calls on values computed before the fork);
//! 3. `chdir` to the workdir, as the user: a workdir the user cannot enter ends the rank (exit 126)
//!    with the reason on its output;
//! 4. `PR_SET_PDEATHSIG` and the parent check: the kernel clears the parent-death signal whenever a
//!    process's credentials change, so it is set after the switch.
//!
//! `HOME`, `USER` and `LOGNAME` follow the user unless the job sets them. The rank's output file is
//! written by the agent (from pipes), so it stays the agent's; the directories a rank writes
//! itself (its `TORCHELASTIC_ERROR_FILE` directory, the checkpoint dir when the agent creates it)
//! are made with [`create_dir_for_rank`], which gives a directory it creates to the user. The path
//! to them (the agent's data dir, the shared checkpoint storage) must be searchable by the user.
//!
//! # Logs
//! A rank's stdout and stderr are read line by line (lossy UTF-8, lines longer than
//! [`MAX_LINE_BYTES`] split) and appended as whole lines to one file per rank by a single writer,
//! so lines of the two streams never tear into each other. The file holds the raw lines; the
//! prefix that names node and rank ([`RankSpec::line_prefix`]) is for the copies the agent ships or
//! echoes, available through [`RankProcess::subscribe_lines`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc as std_mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Longest line written to a rank's log; a longer line is split into pieces of at most this size
/// (at a UTF-8 character boundary when the text is valid UTF-8).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Lines buffered between the pipe readers and the log writer before the readers wait (and the
/// rank, once its pipe fills, blocks on write).
pub const LOG_QUEUE_LINES: usize = 1024;
/// Lines a slow [`RankProcess::subscribe_lines`] receiver may fall behind before it loses some.
pub const LINE_BROADCAST_LINES: usize = 256;
/// How long [`RankProcess::wait`] keeps waiting for the pipes to close after the rank's main
/// process exited. A background process that inherited the pipes can hold them open for ever;
/// its output is still captured after `wait` returns.
pub const LOG_DRAIN_AFTER_EXIT_MS: u64 = 2_000;
/// Interval between checks of whether a process group is empty.
pub const GROUP_POLL_INTERVAL_MS: u64 = 20;
/// How long [`terminate_group`] waits for the group to vanish after SIGKILL.
pub const KILL_CONFIRM_MS: u64 = 5_000;
/// Exit code reported when the agent could not learn how the rank ended (its status was lost).
pub const UNKNOWN_EXIT_CODE: i32 = 255;
/// The search path used when the rank's environment has no `PATH` (glibc's default).
pub const DEFAULT_PATH: &str = "/usr/bin:/bin";
/// File name of the journal inside the agent's data directory.
pub const JOURNAL_FILE_NAME: &str = "rank-groups.journal";

/// Everything needed to start one rank.
#[derive(Debug, Clone, Default)]
pub struct RankSpec {
    /// Program and arguments. `argv[0]` without a `/` is looked up in the rank's `PATH`; with a
    /// `/` it is a path, relative paths taken from `workdir`.
    pub argv: Vec<String>,
    /// Working directory of the rank; must exist.
    pub workdir: PathBuf,
    /// Variables set for the rank, overriding the agent's inherited environment.
    pub env: Vec<(String, String)>,
    /// Variables set only if absent from both the inherited environment and `env`.
    pub env_defaults: Vec<(String, String)>,
    /// File the rank's stdout and stderr lines are appended to (parents are created).
    pub log_path: PathBuf,
    /// Prefix naming node and rank, e.g. `"[node-3 rank 17] "`. Not written to the file; kept for
    /// whoever ships or echoes the lines ([`RankProcess::line_prefix`]).
    pub line_prefix: String,
    /// A cgroup2 directory (already created, empty, a leaf) the rank is moved into before it
    /// executes, so that everything it starts stays there ([`crate::cgroup`]). `None`: the rank's
    /// process group is all that contains it.
    pub cgroup: Option<PathBuf>,
    /// The user the rank runs as ([`RunAs`]); `None`: the agent's own user.
    pub run_as: Option<RunAs>,
    /// Also send every line here, in order and with backpressure: when the receiver falls
    /// behind, the rank waits on its pipe, as it would on a slow terminal, and no line is lost
    /// (`trainctl run`'s console). [`RankProcess::subscribe_lines`] may lose lines instead.
    pub copy_lines_to: Option<mpsc::Sender<RankLine>>,
}

/// The user ranks run as (`trainctl agent --run-as USER`), resolved before any fork (see the
/// module docs). The supplementary groups are read once, when the agent resolves the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user name, as given.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Every group it belongs to (`getgrouplist`: the primary gid included).
    pub groups: Vec<u32>,
    /// Its home directory (`HOME` of its ranks unless the job sets one).
    pub home: PathBuf,
}

/// Why `--run-as USER` cannot be used. Each message names the user.
#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    /// No such user in the host's user database.
    #[error("--run-as {name}: there is no user `{name}` on this host")]
    UnknownUser {
        /// The name given.
        name: String,
    },
    /// The name cannot be a user name (empty, or holding a NUL).
    #[error("--run-as {name:?}: not a valid user name")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The user database could not be read.
    #[error("--run-as {name}: cannot look the user up: {source}")]
    Lookup {
        /// The name given.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The agent is not root, so it cannot start processes as another user.
    #[error("--run-as {name}: the agent runs as uid {agent_uid}, not root, so it cannot run ranks as `{name}` (uid {uid}); start the agent as root, or without --run-as")]
    NotRoot {
        /// The name given.
        name: String,
        /// The user's uid.
        uid: u32,
        /// The agent's effective uid.
        agent_uid: u32,
    },
}

impl RunAs {
    /// Looks `name` up in the host's user database (`getpwnam_r`) with its groups
    /// (`getgrouplist`). Blocking (NSS may ask a directory service); call it before forking.
    pub fn resolve(name: &str) -> Result<RunAs, RunAsError> {
        let c_name = std::ffi::CString::new(name)
            .ok()
            .filter(|_| !name.is_empty())
            .ok_or_else(|| RunAsError::InvalidName {
                name: name.to_owned(),
            })?;
        let lookup = |source: io::Error| RunAsError::Lookup {
            name: name.to_owned(),
            source,
        };
        let mut buf: Vec<libc::c_char> = vec![0; 1024];
        let (uid, gid, home) = loop {
            // SAFETY: `passwd` is plain old data, so all zeroes is a valid value.
            let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call: `c_name` is NUL-terminated, `buf` has
            // `buf.len()` bytes, `pwd` and `result` are locals. The strings `pwd` points to live
            // in `buf`, read below before `buf` changes.
            let rc = unsafe {
                libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            };
            if rc == libc::ERANGE && buf.len() < (1 << 20) {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if rc != 0 {
                return Err(lookup(io::Error::from_raw_os_error(rc)));
            }
            if result.is_null() {
                return Err(RunAsError::UnknownUser {
                    name: name.to_owned(),
                });
            }
            let home = if pwd.pw_dir.is_null() {
                PathBuf::from("/")
            } else {
                use std::os::unix::ffi::OsStrExt as _;
                // SAFETY: a non-null `pw_dir` is a NUL-terminated string inside `buf`.
                let bytes = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) }.to_bytes();
                PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
            };
            break (pwd.pw_uid, pwd.pw_gid, home);
        };
        let mut groups: Vec<libc::gid_t> = vec![0; 64];
        loop {
            let mut count = groups.len() as libc::c_int;
            // SAFETY: `groups` has room for `count` gids; glibc writes at most that many and sets
            // `count` to the number the user has (returning -1 when they did not fit).
            let rc = unsafe {
                libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count)
            };
            let count = usize::try_from(count).unwrap_or(0);
            if rc >= 0 {
                groups.truncate(count);
                break;
            }
            if count <= groups.len() || count > 1 << 20 {
                return Err(lookup(io::Error::other("getgrouplist failed")));
            }
            groups.resize(count, 0);
        }
        Ok(RunAs {
            name: name.to_owned(),
            uid,
            gid,
            groups,
            home,
        })
    }

    /// [`resolve`](Self::resolve), then checks that an agent with effective uid `agent_uid` may
    /// run ranks as this user: root may run them as anyone, any other user only as itself.
    pub fn for_agent(name: &str, agent_uid: u32) -> Result<RunAs, RunAsError> {
        let user = RunAs::resolve(name)?;
        if agent_uid != 0 && agent_uid != user.uid {
            return Err(RunAsError::NotRoot {
                name: user.name,
                uid: user.uid,
                agent_uid,
            });
        }
        Ok(user)
    }

    /// The variables that follow the user (`HOME`, `USER`, `LOGNAME`) unless the job sets them.
    fn env(&self) -> [(OsString, OsString); 3] {
        [
            ("HOME".into(), self.home.clone().into_os_string()),
            ("USER".into(), self.name.clone().into()),
            ("LOGNAME".into(), self.name.clone().into()),
        ]
    }
}

/// The agent's effective uid (0: root).
pub fn effective_uid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (and missing parents) for a rank to write in. With `run_as`, a `dir` this call
/// creates is given to that user (owner and group; its parents stay the agent's); a `dir` that
/// already exists is left as it is (its owner chose who may write there).
pub fn create_dir_for_rank(dir: &Path, run_as: Option<&RunAs>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    if let Some(user) = run_as {
        std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// Why a rank could not be started. Each message says what was wrong on which host.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `argv` was empty.
    #[error("the rank's argv is empty: nothing to run")]
    EmptyArgv,
    /// The program does not exist.
    #[error("command `{program}` not found {searched} on this host")]
    CommandNotFound {
        /// `argv[0]` as given.
        program: String,
        /// Where it was looked for: `in the rank's PATH (N directories)` or `at /abs/path`.
        searched: String,
    },
    /// The program exists but may not be executed (no execute bit, a directory, a `noexec`
    /// mount, ...).
    #[error("command `{program}` at {} is not executable on this host (permission denied)", path.display())]
    NotExecutable {
        /// `argv[0]` as given.
        program: String,
        /// The file found.
        path: PathBuf,
    },
    /// The program exists but the kernel could not find what it needs to run it.
    #[error("command `{program}` at {} could not be started on this host: its `#!` interpreter or dynamic loader is missing", path.display())]
    InterpreterNotFound {
        /// `argv[0]` as given.
        program: String,
        /// The file found.
        path: PathBuf,
    },
    /// The working directory does not exist.
    #[error("workdir {} does not exist on this host", workdir.display())]
    WorkdirMissing {
        /// The workdir asked for.
        workdir: PathBuf,
    },
    /// The working directory exists but is not a directory.
    #[error("workdir {} is not a directory on this host", workdir.display())]
    WorkdirNotADirectory {
        /// The workdir asked for.
        workdir: PathBuf,
    },
    /// Any other IO failure (creating the log file, fork, ...).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "create log file /var/lib/trainctl/logs/r0.log".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl LaunchError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        LaunchError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How a rank ended, in torchrun's convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankExit {
    /// The exit code, or the negated signal number when a signal killed the rank
    /// (`-9` for SIGKILL), or [`UNKNOWN_EXIT_CODE`] when the status was lost.
    pub code: i32,
}

impl RankExit {
    /// Whether the rank exited with code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The rank's standard output.
    Stdout,
    /// The rank's standard error.
    Stderr,
}

/// One line of a rank's output, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLine {
    /// The pipe it came from.
    pub stream: Stream,
    /// The text (invalid UTF-8 replaced by U+FFFD).
    pub text: String,
}

/// A running (or finished) rank. Dropping it neither kills nor forgets the rank: its exit status
/// is still collected and its output still captured in the background.
#[derive(Debug)]
pub struct RankProcess {
    pid: i32,
    cgroup: Option<PathBuf>,
    start_time: u64,
    line_prefix: String,
    log_path: PathBuf,
    exit: watch::Receiver<Option<RankExit>>,
    lines: broadcast::Sender<RankLine>,
    first_lines: Option<broadcast::Receiver<RankLine>>,
}

impl RankProcess {
    /// The rank's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The rank's process group id (equal to its pid: the rank leads its own group).
    pub fn pgid(&self) -> i32 {
        self.pid
    }

    /// The rank's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), which with
    /// the pid identifies the process even after the pid is recycled. 0 if it could not be read.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The prefix naming node and rank, from [`RankSpec::line_prefix`].
    pub fn line_prefix(&self) -> &str {
        &self.line_prefix
    }

    /// The file the rank's output is appended to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The receiver of the rank's lines from its very first line, in file order (`None` after
    /// the first call). This is the one to ship logs from; [`subscribe_lines`](Self::subscribe_lines)
    /// only sees lines from the moment it is called. A receiver that falls more than
    /// [`LINE_BROADCAST_LINES`] behind loses lines (and learns how many); the file keeps them all.
    pub fn take_lines(&mut self) -> Option<broadcast::Receiver<RankLine>> {
        self.first_lines.take()
    }

    /// Receives the rank's lines from now on, in file order (see [`take_lines`](Self::take_lines)).
    pub fn subscribe_lines(&self) -> broadcast::Receiver<RankLine> {
        self.lines.subscribe()
    }

    /// How the rank ended, if it has.
    pub fn try_exit(&self) -> Option<RankExit> {
        *self.exit.borrow()
    }

    /// Waits for the rank's main process to exit and for its output to reach the log file
    /// (bounded by [`LOG_DRAIN_AFTER_EXIT_MS`] if a background process holds the pipes open).
    /// May be called again; it then returns the same value at once.
    pub async fn wait(&mut self) -> RankExit {
        match self.exit.wait_for(Option::is_some).await {
            Ok(exit) => exit.unwrap_or(RankExit {
                code: UNKNOWN_EXIT_CODE,
            }),
            // The supervisor task is gone without a status: the runtime is shutting down.
            Err(_) => RankExit {
                code: UNKNOWN_EXIT_CODE,
            },
        }
    }

    /// The cgroup the rank runs in, if any ([`RankSpec::cgroup`]).
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// [`terminate_rank`] on this rank's cgroup, or its process group.
    pub async fn terminate(&self, grace: Duration) -> GroupEnd {
        terminate_rank(self.pgid(), self.cgroup(), grace).await
    }
}

/// Starts one rank: resolves the program, checks the workdir, opens the log, forks in a new
/// process group with `PR_SET_PDEATHSIG = SIGKILL`, and starts capturing output.
///
/// Must be called inside a Tokio runtime; the rank's supervision runs as tasks of that runtime.
pub async fn spawn_rank(spec: RankSpec) -> Result<RankProcess, LaunchError> {
    let RankSpec {
        argv,
        workdir,
        env,
        env_defaults,
        log_path,
        line_prefix,
        cgroup,
        run_as,
        copy_lines_to,
    } = spec;
    let program = argv.first().ok_or(LaunchError::EmptyArgv)?.clone();

    match fs::metadata(&workdir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(LaunchError::WorkdirNotADirectory { workdir }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LaunchError::WorkdirMissing { workdir })
        }
        Err(e) => {
            return Err(LaunchError::io(
                format!("inspect workdir {}", workdir.display()),
                e,
            ))
        }
    }

    // (Not `map(RunAs::env).unwrap_or_default()`: the default of an array of 3 pairs is 3 pairs of
    // empty names, which gave every rank a variable with an empty name.)
    let user_env: Vec<(OsString, OsString)> = run_as
        .as_ref()
        .map(|u| u.env().to_vec())
        .unwrap_or_default();
    let merged_env = merge_env(std::env::vars_os().chain(user_env), &env, &env_defaults);
    let path_var = merged_env
        .get(&OsString::from("PATH"))
        .map(|p| p.to_string_lossy().into_owned());
    let resolved = resolve_program(&program, path_var.as_deref(), &workdir)?;

    let log_file = open_log(&log_path).await?;

    // Switching credentials happens in the child below; as root even to root, so that the rank gets
    // exactly the user's groups. The workdir is then entered as the user, not by root for it.
    let switch = run_as
        .as_ref()
        .filter(|user| effective_uid() == 0 || user.uid != effective_uid())
        .map(|user| CredentialSwitch::new(user, &workdir))
        .transpose()?;
    let mut cmd = Command::new(&resolved);
    if switch.is_none() {
        cmd.current_dir(&workdir);
    }
    cmd.arg0(&program)
        .args(&argv[1..])
        .env_clear()
        .envs(&merged_env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let agent_pid = std::process::id() as libc::pid_t;
    // Opened here (close-on-exec) so the child only has to write to it: writing "0" to
    // `cgroup.procs` moves the writer.
    let cgroup_procs = match &cgroup {
        Some(dir) => Some(
            fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| {
                    LaunchError::io(format!("open the rank's cgroup {}", dir.display()), e)
                })?,
        ),
        None => None,
    };
    let cgroup_fd = {
        use std::os::fd::AsRawFd as _;
        cgroup_procs.as_ref().map(|f| f.as_raw_fd())
    };
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // functions may be called. It calls `write`, `setgroups`, `setgid`, `setuid`, `chdir`, `prctl`,
    // `getppid` and `_exit` (plain system calls) on static buffers, on buffers moved into the
    // closure before the fork (`switch`) and on a descriptor the parent keeps open across the spawn,
    // and builds an `io::Error` from errno without allocating (`from_raw_os_error`/`last_os_error`
    // store an int).
    unsafe {
        cmd.pre_exec(move || {
            // Into the rank's cgroup before exec, so nothing the rank starts is ever outside it,
            // and before the credentials change, so the write is root's. `fd` stays open in the
            // parent until the spawn returns. A failure is reported on the rank's stderr (already
            // its log pipe) and ends the rank: never run it uncontained.
            if let Some(fd) = cgroup_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    child_fail(
                        b"trainctl: could not move the rank into its cgroup; not starting it\n",
                        125,
                    );
                }
            }
            if let Some(switch) = &switch {
                switch.apply();
            }
            // After any credential change: the kernel clears the parent-death signal on one.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // If the agent died before prctl, no death signal will ever come: the child has
            // already been reparented. Do not start an unsupervised rank.
            if libc::getppid() != agent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let mut child = launch(cmd).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => LaunchError::InterpreterNotFound {
            program: program.clone(),
            path: resolved.clone(),
        },
        io::ErrorKind::PermissionDenied => LaunchError::NotExecutable {
            program: program.clone(),
            path: resolved.clone(),
        },
        _ => LaunchError::io(format!("start command `{program}`"), e),
    })?;
    drop(cgroup_procs);

    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| {
            LaunchError::io(
                format!("start command `{program}`"),
                io::Error::other("the child has no pid"),
            )
        })?;
    // The child cannot be reaped before the supervisor below first polls `wait`, so its
    // /proc entry is still there (perhaps as a zombie).
    let start_time = read_proc_stat(pid).map(|s| s.start_time).unwrap_or(0);

    let (line_tx, line_rx) = mpsc::channel(LOG_QUEUE_LINES);
    let (broadcast_tx, first_lines) = broadcast::channel(LINE_BROADCAST_LINES);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    if let Some(out) = stdout {
        tokio::spawn(pump_lines(out, Stream::Stdout, line_tx.clone()));
    }
    if let Some(err) = stderr {
        tokio::spawn(pump_lines(err, Stream::Stderr, line_tx.clone()));
    }
    drop(line_tx);
    let writer = tokio::spawn(write_lines(
        log_file,
        log_path.clone(),
        line_rx,
        broadcast_tx.clone(),
        copy_lines_to,
    ));

    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(supervise(child, pid, writer, exit_tx));

    Ok(RankProcess {
        pid,
        cgroup,
        start_time,
        line_prefix,
        log_path,
        exit: exit_rx,
        lines: broadcast_tx,
        first_lines: Some(first_lines),
    })
}

/// Writes `msg` to the child's stderr (the rank's log pipe) and exits with `code`, without
/// running any exit handler. Only for the forked child, before exec.
fn child_fail(msg: &[u8], code: libc::c_int) -> ! {
    // SAFETY: `write` and `_exit` are async-signal-safe system calls; `msg` is a valid buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

/// What the forked child needs to become a [`RunAs`] user, all allocated before the fork.
struct CredentialSwitch {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    workdir: std::ffi::CString,
    /// `trainctl: user NAME (uid U) cannot enter the workdir DIR: `, completed by the reason.
    workdir_failure: Vec<u8>,
}

impl CredentialSwitch {
    fn new(user: &RunAs, workdir: &Path) -> Result<Self, LaunchError> {
        use std::os::unix::ffi::OsStrExt as _;
        let c_workdir = std::ffi::CString::new(workdir.as_os_str().as_bytes()).map_err(|_| {
            LaunchError::io(
                format!("workdir {}", workdir.display()),
                io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"),
            )
        })?;
        Ok(CredentialSwitch {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            workdir: c_workdir,
            workdir_failure: format!(
                "trainctl: user {} (uid {}) cannot enter the workdir {}: ",
                user.name,
                user.uid,
                workdir.display()
            )
            .into_bytes(),
        })
    }

    /// In the forked child: groups, gid, uid (in this order: each later call needs the privilege
    /// the earlier ones keep), then the workdir as the user. A failure ends the child with the
    /// reason on its stderr (exit 125; 126 when the workdir cannot be entered).
    fn apply(&self) {
        // SAFETY: plain system calls on values owned by `self`, which the closure holds; `groups`
        // has `groups.len()` gids and `workdir` is NUL-terminated.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                child_fail(
                    b"trainctl: could not set the rank's supplementary groups (setgroups); not starting it\n",
                    125,
                );
            }
            if libc::setgid(self.gid) != 0 {
                child_fail(
                    b"trainctl: could not set the rank's group (setgid); not starting it\n",
                    125,
                );
            }
            if libc::setuid(self.uid) != 0 {
                child_fail(
                    b"trainctl: could not set the rank's user (setuid); not starting it\n",
                    125,
                );
            }
            if libc::chdir(self.workdir.as_ptr()) != 0 {
                let reason: &[u8] = match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EACCES) => b"permission denied\n",
                    Some(libc::ENOENT) => b"it does not exist\n",
                    Some(libc::ENOTDIR) => b"not a directory\n",
                    _ => b"chdir failed\n",
                };
                libc::write(
                    2,
                    self.workdir_failure.as_ptr().cast(),
                    self.workdir_failure.len(),
                );
                child_fail(reason, 126);
            }
        }
    }
}

/// Reaps the rank's main process as soon as it exits (so a zombie leader never keeps its group
/// looking alive to [`terminate_group`]), then waits for the log to drain and publishes the exit.
async fn supervise(
    mut child: Child,
    pid: i32,
    writer: tokio::task::JoinHandle<()>,
    exit_tx: watch::Sender<Option<RankExit>>,
) {
    let code = match child.wait().await {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => -signal,
            (None, None) => UNKNOWN_EXIT_CODE,
        },
        Err(e) => {
            tracing::error!(pid, error = %e, "lost the exit status of a rank");
            UNKNOWN_EXIT_CODE
        }
    };
    if tokio::time::timeout(Duration::from_millis(LOG_DRAIN_AFTER_EXIT_MS), writer)
        .await
        .is_err()
    {
        tracing::info!(
            pid,
            "a rank exited but a process it started still holds its output open; still capturing"
        );
    }
    exit_tx.send_replace(Some(RankExit { code }));
}

/// The thread every rank is forked from. It never exits, so the parent-death signal fires only
/// when the agent process itself dies (see the module docs).
fn launcher() -> &'static Mutex<std_mpsc::Sender<LaunchRequest>> {
    static LAUNCHER: OnceLock<Mutex<std_mpsc::Sender<LaunchRequest>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<LaunchRequest>();
        let spawned = std::thread::Builder::new()
            .name("trainctl-rank-launcher".into())
            .spawn(move || {
                for mut request in rx {
                    let _runtime = request.runtime.enter();
                    let _ = request.reply.send(request.command.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the rank launcher thread");
        }
        Mutex::new(tx)
    })
}

struct LaunchRequest {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

async fn launch(command: Command) -> io::Result<Child> {
    let (reply, answer) = oneshot::channel();
    let request = LaunchRequest {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    let sent = launcher()
        .lock()
        .map_err(|_| io::Error::other("the rank launcher lock is poisoned"))?
        .send(request);
    if sent.is_err() {
        return Err(io::Error::other("the rank launcher thread is not running"));
    }
    answer
        .await
        .map_err(|_| io::Error::other("the rank launcher thread dropped the request"))?
}

/// The environment a rank sees: inherited, overridden by `env`, then `env_defaults` for names
/// absent from both.
fn merge_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    env: &[(String, String)],
    env_defaults: &[(String, String)],
) -> BTreeMap<OsString, OsString> {
    let mut merged: BTreeMap<OsString, OsString> = inherited.into_iter().collect();
    for (k, v) in env {
        merged.insert(k.into(), v.into());
    }
    for (k, v) in env_defaults {
        merged
            .entry(OsString::from(k))
            .or_insert_with(|| OsString::from(v));
    }
    merged
}

/// Finds the file `program` names, as `execvp` would in the rank's environment, so that a
/// mistake is reported with the path searched.
fn resolve_program(
    program: &str,
    path_var: Option<&str>,
    workdir: &Path,
) -> Result<PathBuf, LaunchError> {
    if program.contains('/') {
        let path = workdir.join(program);
        return match fs::metadata(&path) {
            Ok(meta) if is_executable_file(&meta) => Ok(path),
            Ok(_) => Err(LaunchError::NotExecutable {
                program: program.to_owned(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LaunchError::CommandNotFound {
                program: program.to_owned(),
                searched: format!("at {}", path.display()),
            }),
            Err(e) => Err(LaunchError::io(
                format!("inspect command {}", path.display()),
                e,
            )),
        };
    }
    let path_var = path_var.unwrap_or(DEFAULT_PATH);
    let mut not_executable = None;
    for dir in path_var.split(':') {
        // An empty PATH entry means the current directory, which for the rank is its workdir.
        let candidate = workdir
            .join(if dir.is_empty() { "." } else { dir })
            .join(program);
        match fs::metadata(&candidate) {
            Ok(meta) if is_executable_file(&meta) => return Ok(candidate),
            Ok(meta) if meta.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    match not_executable {
        Some(path) => Err(LaunchError::NotExecutable {
            program: program.to_owned(),
            path,
        }),
        None => Err(LaunchError::CommandNotFound {
            program: program.to_owned(),
            // Not the whole PATH: the agent's is long, and the reason is shown in several places.
            searched: format!(
                "in the rank's PATH ({} directories)",
                path_var.split(':').count()
            ),
        }),
    }
}

fn is_executable_file(meta: &fs::Metadata) -> bool {
    meta.is_file() && meta.permissions().mode() & 0o111 != 0
}

async fn open_log(log_path: &Path) -> Result<tokio::fs::File, LaunchError> {
    if let Some(parent) = log_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await.map_err(|e| {
            LaunchError::io(format!("create log directory {}", parent.display()), e)
        })?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .await
        .map_err(|e| LaunchError::io(format!("open log file {}", log_path.display()), e))
}

/// Reads one pipe into whole lines of at most [`MAX_LINE_BYTES`] and queues them for the writer.
async fn pump_lines<R: AsyncRead + Unpin>(pipe: R, stream: Stream, out: mpsc::Sender<RankLine>) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, pipe);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::warn!(?stream, error = %e, "reading a rank's output failed");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let window = &buf[..buf.len().min(room)];
        let consumed = match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&window[..i]);
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                if out.send(RankLine { stream, text }).await.is_err() {
                    return;
                }
                i + 1
            }
            None => {
                line.extend_from_slice(window);
                window.len()
            }
        };
        reader.consume(consumed);
        if line.len() >= MAX_LINE_BYTES {
            let cut = utf8_cut(&line);
            let rest = line.split_off(cut);
            let text = String::from_utf8_lossy(&line).into_owned();
            line = rest;
            if out.send(RankLine { stream, text }).await.is_err() {
                return;
            }
        }
    }
    if !line.is_empty() {
        let text = String::from_utf8_lossy(&line).into_owned();
        let _ = out.send(RankLine { stream, text }).await;
    }
}

/// Where to split `buf` so that a UTF-8 character cut at its end moves to the next piece.
fn utf8_cut(buf: &[u8]) -> usize {
    let n = buf.len();
    for back in 1..=n.min(3) {
        let b = buf[n - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needed = match b {
            0xF8.. => 1, // never valid in UTF-8: nothing to keep whole
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back && back < n {
            n - back
        } else {
            n
        };
    }
    n
}

/// The single writer of a rank's log file: whole lines, in arrival order, flushed whenever the
/// queue runs empty. A write error is logged once and the pipes keep being drained, so the rank
/// never blocks on a full pipe because the disk is full.
async fn write_lines(
    file: tokio::fs::File,
    log_path: PathBuf,
    mut lines: mpsc::Receiver<RankLine>,
    subscribers: broadcast::Sender<RankLine>,
    mut copy_to: Option<mpsc::Sender<RankLine>>,
) {
    let mut file = BufWriter::new(file);
    let mut failed = false;
    let mut buf = Vec::new();
    while let Some(first) = lines.recv().await {
        let mut next = Some(first);
        while let Some(line) = next {
            buf.clear();
            buf.extend_from_slice(line.text.as_bytes());
            buf.push(b'\n');
            if !failed {
                if let Err(e) = file.write_all(&buf).await {
                    tracing::error!(path = %log_path.display(), error = %e, "writing a rank's log failed; further lines are dropped");
                    failed = true;
                }
            }
            if let Some(tx) = &copy_to {
                if tx.send(line.clone()).await.is_err() {
                    copy_to = None;
                }
            }
            let _ = subscribers.send(line);
            next = lines.try_recv().ok();
        }
        if !failed {
            if let Err(e) = file.flush().await {
                tracing::error!(path = %log_path.display(), error = %e, "writing a rank's log failed; further lines are dropped");
                failed = true;
            }
        }
    }
    if !failed {
        let _ = file.flush().await;
    }
}

/// How [`terminate_group`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupEnd {
    /// There was no such group when asked (or the id was not a valid group to signal).
    AlreadyGone,
    /// Every member exited within the grace period after SIGTERM.
    ExitedAfterTerm,
    /// Some member outlived the grace period; the group was SIGKILLed and is gone.
    Killed,
    /// The group was SIGKILLed but some member was still there after [`KILL_CONFIRM_MS`]
    /// (stuck in uninterruptible sleep, e.g. in a GPU driver call).
    KilledButLingering,
}

/// Stops a whole process group: SIGTERM to `-pgid`, up to `grace` for every member to exit, then
/// SIGKILL, then up to [`KILL_CONFIRM_MS`] to confirm. Members that are zombies count as gone.
///
/// A rank started by [`spawn_rank`] has its leader reaped by its supervisor task as soon as it
/// exits, so a leader that dies on SIGTERM does not hold the group "alive" for the whole grace.
/// Refuses (returning [`GroupEnd::AlreadyGone`]) a `pgid` below 2, which `kill` would treat as
/// "every process" or "my own group".
pub async fn terminate_group(pgid: i32, grace: Duration) -> GroupEnd {
    if pgid < 2 {
        tracing::warn!(pgid, "refusing to signal an invalid process group");
        return GroupEnd::AlreadyGone;
    }
    if signal_group(pgid, libc::SIGTERM).is_err() {
        return GroupEnd::AlreadyGone;
    }
    if wait_group_gone(pgid, grace).await {
        return GroupEnd::ExitedAfterTerm;
    }
    tracing::warn!(
        pgid,
        grace_ms = grace.as_millis() as u64,
        "rank group outlived its grace period; sending SIGKILL"
    );
    if signal_group(pgid, libc::SIGKILL).is_err() {
        return GroupEnd::Killed;
    }
    if wait_group_gone(pgid, Duration::from_millis(KILL_CONFIRM_MS)).await {
        GroupEnd::Killed
    } else {
        tracing::error!(
            pgid,
            "rank group still has members after SIGKILL (uninterruptible sleep?)"
        );
        GroupEnd::KilledButLingering
    }
}

/// Stops a rank and everything it started: with a cgroup, SIGTERM to every process in it, up to
/// `grace` for it to empty, then `cgroup.kill` (which no `setsid` or double fork escapes) and up
/// to [`KILL_CONFIRM_MS`] to confirm; without one, [`terminate_group`]. The cgroup is not removed
/// (the caller may still read its `memory.events`): see [`crate::cgroup::remove`].
pub async fn terminate_rank(pgid: i32, cgroup: Option<&Path>, grace: Duration) -> GroupEnd {
    let Some(dir) = cgroup else {
        return terminate_group(pgid, grace).await;
    };
    if !crate::cgroup::populated(dir) {
        return GroupEnd::AlreadyGone;
    }
    crate::cgroup::signal_all(dir, libc::SIGTERM);
    if crate::cgroup::wait_empty_async(dir, grace).await {
        return GroupEnd::ExitedAfterTerm;
    }
    tracing::warn!(
        cgroup = %dir.display(),
        grace_ms = grace.as_millis() as u64,
        "rank cgroup outlived its grace period; killing it (cgroup.kill)"
    );
    crate::cgroup::kill(dir);
    if crate::cgroup::wait_empty_async(dir, Duration::from_millis(KILL_CONFIRM_MS)).await {
        GroupEnd::Killed
    } else {
        tracing::error!(
            cgroup = %dir.display(),
            "rank cgroup still has processes after cgroup.kill (uninterruptible sleep?)"
        );
        GroupEnd::KilledButLingering
    }
}

/// Sends `signal` to one process (a rank's main process: "checkpoint now"). Refuses pids below 2.
pub fn signal_process(pid: i32, signal: libc::c_int) {
    if pid < 2 {
        return;
    }
    // SAFETY: `kill` has no memory-safety preconditions; `pid >= 2` names one process, never a group
    // or "all processes".
    if unsafe { libc::kill(pid, signal) } != 0 {
        tracing::warn!(pid, signal, error = %io::Error::last_os_error(), "could not signal a rank");
    }
}

fn signal_group(pgid: i32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: `kill` has no memory-safety preconditions; `pgid >= 2` was checked by every caller,
    // so `-pgid` names exactly one process group, never "all processes".
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

async fn wait_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !group_has_live_members(pgid) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let step = Duration::from_millis(GROUP_POLL_INTERVAL_MS).min(deadline - now);
        tokio::time::sleep(step).await;
    }
}

/// Whether any process other than a zombie is in group `pgid`.
pub fn group_has_live_members(pgid: i32) -> bool {
    if pgid < 2 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    if unsafe { libc::kill(-pgid, 0) } != 0 {
        return io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // Something answers, but zombies answer too until their parent reaps them (and a zombie whose
    // parent is a non-reaping init never is): look at the states.
    match group_members(pgid) {
        Ok(members) => members.iter().any(|m| !m.is_zombie()),
        Err(_) => true,
    }
}

/// The fields of `/proc/<pid>/stat` this module uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// State letter (`R`, `S`, `D`, `Z`, ...), field 3.
    pub state: char,
    /// Process group id, field 5.
    pub pgid: i32,
    /// Start time in clock ticks after boot, field 22.
    pub start_time: u64,
}

impl ProcStat {
    /// Whether the process has exited and waits to be reaped (or is being torn down).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from its last `)`.
pub fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3.
    Some(ProcStat {
        pid,
        state: rest.first()?.chars().next()?,
        pgid: rest.get(2)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`.
pub fn read_proc_stat(pid: i32) -> io::Result<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_proc_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable /proc/{pid}/stat"),
        )
    })
}

/// Every process (zombies included) whose process group is `pgid`, by scanning `/proc`.
pub fn group_members(pgid: i32) -> io::Result<Vec<ProcStat>> {
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit between read_dir and read: skip it.
        if let Ok(stat) = read_proc_stat(pid) {
            if stat.pgid == pgid {
                members.push(stat);
            }
        }
    }
    Ok(members)
}

/// One process group recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The group id (= the pid of its leader, the rank).
    pub pgid: i32,
    /// The leader's start time ([`RankProcess::start_time`]).
    pub start_time: u64,
    /// The job the rank belongs to (any text without a newline).
    pub job_id: String,
}

/// A group that [`PgidJournal::reap_leftovers`] killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// The group id.
    pub pgid: i32,
    /// The job it belonged to.
    pub job_id: String,
    /// How many live processes of the group were sent SIGKILL.
    pub processes: usize,
}

/// The record of live rank process groups, kept in the agent's data directory so that an agent
/// restarted after a crash can kill what its predecessor left running.
///
/// The file has one line per group: `<pgid> <start_time> <job_id>`. Every change rewrites it
/// through a temporary file and a rename, so a crash mid-write leaves the old or the new list.
/// It is not fsynced: the only event that could lose an unsynced write is a host crash, and that
/// kills the recorded processes anyway. Methods do small blocking file IO: on an async path call
/// them from `spawn_blocking`.
#[derive(Debug)]
pub struct PgidJournal {
    path: PathBuf,
    lock: Mutex<()>,
}

/// An exclusive `flock` on `<journal>.lock`, held for one read-modify-write of the journal. The
/// in-process mutex orders this agent's threads; this orders processes: an old agent's reaper and
/// a new agent may touch the same journal at once, and without it one's rewrite loses the other's.
struct JournalLock {
    _file: fs::File,
}

impl JournalLock {
    fn acquire(journal: &Path) -> io::Result<JournalLock> {
        use std::os::fd::AsRawFd as _;
        let mut name = journal.as_os_str().to_owned();
        name.push(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(name))?;
        // SAFETY: `flock` on a descriptor we own for the call's duration; no memory is shared. The
        // lock is released when `file` is closed (on drop).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(JournalLock { _file: file })
    }
}

impl PgidJournal {
    /// Opens (creating if needed) the journal `JOURNAL_FILE_NAME` in `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(data_dir)?;
        let path = data_dir.join(JOURNAL_FILE_NAME);
        if !path.exists() {
            fs::write(&path, b"")?;
        }
        Ok(PgidJournal {
            path,
            lock: Mutex::new(()),
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a live group. `start_time` is the leader's ([`RankProcess::start_time`]).
    pub fn record(&self, pgid: i32, start_time: u64, job_id: &str) -> io::Result<()> {
        if job_id.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a job id in the pgid journal cannot contain a newline",
            ));
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _file_lock = JournalLock::acquire(&self.path)?;
        let mut entries = self.load()?;
        entries.retain(|e| e.pgid != pgid);
        entries.push(JournalEntry {
            pgid,
            start_time,
            job_id: job_id.to_owned(),
        });
        self.store(&entries)
    }

    /// Forgets a group (it was terminated or exited on its own).
    pub fn remove(&self, pgid: i32) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _file_lock = JournalLock::acquire(&self.path)?;
        let mut entries = self.load()?;
        entries.retain(|e| e.pgid != pgid);
        self.store(&entries)
    }

    /// The recorded groups. Malformed lines are skipped with a warning.
    pub fn entries(&self) -> io::Result<Vec<JournalEntry>> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _file_lock = JournalLock::acquire(&self.path)?;
        self.load()
    }

    /// SIGKILLs every recorded group that is provably the one recorded, then empties the journal.
    ///
    /// A group is killed when its leader is alive with the recorded start time, or, when the
    /// leader is gone, for each member whose start time is not before the recorded one (while any
    /// member lives the kernel cannot hand the group id out again, so these are the rank's own
    /// descendants). If the leader's pid now belongs to another process (different start time),
    /// the id was recycled and nothing is killed. The signals are sent, not waited for.
    pub fn reap_leftovers(&self) -> Vec<Reaped> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _file_lock = match JournalLock::acquire(&self.path) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot lock the pgid journal; leftovers not reaped");
                return Vec::new();
            }
        };
        let entries = match self.load() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot read the pgid journal; leftovers not reaped");
                return Vec::new();
            }
        };
        let mut reaped = Vec::new();
        for entry in entries {
            if let Some(r) = reap_one(&entry) {
                tracing::warn!(
                    pgid = r.pgid,
                    job_id = %r.job_id,
                    processes = r.processes,
                    "killed rank processes left by a previous agent"
                );
                reaped.push(r);
            }
        }
        if let Err(e) = self.store(&[]) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot clear the pgid journal");
        }
        reaped
    }

    fn load(&self) -> io::Result<Vec<JournalEntry>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(parse_journal(&text, &self.path))
    }

    fn store(&self, entries: &[JournalEntry]) -> io::Result<()> {
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut file = fs::File::create(&tmp)?;
        for e in entries {
            writeln!(file, "{} {} {}", e.pgid, e.start_time, e.job_id)?;
        }
        drop(file);
        fs::rename(&tmp, &self.path)
    }
}

fn parse_journal(text: &str, path: &Path) -> Vec<JournalEntry> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, ' ');
        let parsed = (|| {
            let pgid = fields.next()?.parse::<i32>().ok()?;
            let start_time = fields.next()?.parse::<u64>().ok()?;
            let job_id = fields.next().unwrap_or("").to_owned();
            Some(JournalEntry {
                pgid,
                start_time,
                job_id,
            })
        })();
        match parsed {
            Some(e) => entries.push(e),
            None => tracing::warn!(
                path = %path.display(),
                line = n + 1,
                "skipping a malformed pgid journal line (expected `<pgid> <start_time> <job_id>`)"
            ),
        }
    }
    entries
}

fn reap_one(entry: &JournalEntry) -> Option<Reaped> {
    if entry.pgid < 2 {
        return None;
    }
    // The kernel does not hand out a pid again while a process group still uses it as its id.
    // So if the leader's pid now belongs to another process, the recorded group has emptied and
    // the id was recycled: leave everything alone.
    let leader_alive = match read_proc_stat(entry.pgid) {
        Ok(leader) if leader.start_time != entry.start_time => return None,
        Ok(leader) => leader.pgid == entry.pgid,
        Err(_) => false,
    };
    let members = group_members(entry.pgid).ok()?;
    let targets: Vec<&ProcStat> = members
        .iter()
        .filter(|m| !m.is_zombie() && (leader_alive || m.start_time >= entry.start_time))
        .collect();
    if targets.is_empty() {
        return None;
    }
    if leader_alive {
        let _ = signal_group(entry.pgid, libc::SIGKILL);
    } else {
        for t in &targets {
            // SAFETY: `kill` has no memory-safety preconditions; `t.pid` (>= 2, from /proc) is a
            // member of the recorded group that started no earlier than its leader.
            unsafe { libc::kill(t.pid, libc::SIGKILL) };
        }
    }
    Some(Reaped {
        pgid: entry.pgid,
        job_id: entry.job_id.clone(),
        processes: targets.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_names_with_spaces_and_parens() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let s = parse_proc_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgid, 4242);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn own_proc_stat_is_readable() {
        let me = std::process::id() as i32;
        let s = read_proc_stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.start_time > 0);
    }

    #[test]
    fn env_precedence() {
        let inherited = vec![
            (OsString::from("PATH"), OsString::from("/usr/bin")),
            (OsString::from("HOME"), OsString::from("/root")),
        ];
        let env = vec![("HOME".to_owned(), "/home/r".to_owned())];
        let defaults = vec![
            ("PATH".to_owned(), "/nope".to_owned()),
            ("HOME".to_owned(), "/nope".to_owned()),
            ("NCCL_DEBUG".to_owned(), "WARN".to_owned()),
        ];
        let m = merge_env(inherited, &env, &defaults);
        assert_eq!(m[&OsString::from("PATH")], "/usr/bin");
        assert_eq!(m[&OsString::from("HOME")], "/home/r");
        assert_eq!(m[&OsString::from("NCCL_DEBUG")], "WARN");
    }

    #[test]
    fn the_run_as_user_sets_home_user_and_logname_unless_the_job_does() {
        let user = RunAs {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: PathBuf::from("/home/alice"),
        };
        let inherited = vec![
            (OsString::from("HOME"), OsString::from("/root")),
            (OsString::from("USER"), OsString::from("root")),
            (OsString::from("PATH"), OsString::from("/usr/bin")),
        ];
        let env = vec![("LOGNAME".to_owned(), "job-says".to_owned())];
        let m = merge_env(inherited.into_iter().chain(user.env()), &env, &[]);
        assert_eq!(m[&OsString::from("HOME")], "/home/alice");
        assert_eq!(m[&OsString::from("USER")], "alice");
        assert_eq!(m[&OsString::from("LOGNAME")], "job-says");
        assert_eq!(m[&OsString::from("PATH")], "/usr/bin");
    }

    #[test]
    fn run_as_resolves_root_and_nobody_and_refuses_unknown_names() {
        let root = RunAs::resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(root.home, PathBuf::from("/root"));

        match RunAs::resolve("nobody") {
            Ok(nobody) => {
                assert_eq!(nobody.uid, 65534, "{nobody:?}");
                assert!(nobody.groups.contains(&nobody.gid), "{nobody:?}");
            }
            Err(RunAsError::UnknownUser { .. }) => {
                eprintln!("SKIPPED the nobody check: this host has no user `nobody`")
            }
            Err(e) => panic!("{e}"),
        }

        let err = RunAs::resolve("no-such-user-trainctl").unwrap_err();
        assert!(matches!(err, RunAsError::UnknownUser { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "--run-as no-such-user-trainctl: there is no user `no-such-user-trainctl` on this host"
        );
        assert!(matches!(
            RunAs::resolve("").unwrap_err(),
            RunAsError::InvalidName { .. }
        ));
        assert!(matches!(
            RunAs::resolve("a\0b").unwrap_err(),
            RunAsError::InvalidName { .. }
        ));
    }

    #[test]
    fn only_root_may_run_ranks_as_another_user() {
        assert!(RunAs::for_agent("root", 0).is_ok());
        let err = RunAs::for_agent("root", 1000).unwrap_err();
        assert!(
            matches!(
                err,
                RunAsError::NotRoot {
                    uid: 0,
                    agent_uid: 1000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--run-as root"), "{err}");
        // An agent that is not root may still name its own user.
        let nobody_uid = RunAs::resolve("nobody").map(|u| u.uid).unwrap_or(65534);
        if nobody_uid == 65534 {
            assert!(RunAs::for_agent("nobody", 65534).is_ok());
        }
        assert!(matches!(
            RunAs::for_agent("no-such-user-trainctl", 0).unwrap_err(),
            RunAsError::UnknownUser { .. }
        ));
    }

    #[test]
    fn a_rank_dir_the_agent_creates_belongs_to_the_run_as_user() {
        if effective_uid() != 0 {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let Ok(nobody) = RunAs::resolve("nobody") else {
            eprintln!("SKIPPED: no user `nobody`");
            return;
        };
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        create_dir_for_rank(&fresh, Some(&nobody)).unwrap();
        let meta = fs::metadata(&fresh).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (nobody.uid, nobody.gid));
        // Its parents stay the agent's, and an existing directory is left alone.
        assert_eq!(fs::metadata(dir.path().join("a")).unwrap().uid(), 0);
        create_dir_for_rank(dir.path(), Some(&nobody)).unwrap();
        assert_eq!(fs::metadata(dir.path()).unwrap().uid(), 0);
    }

    #[tokio::test]
    async fn a_rank_runs_as_the_run_as_user_with_its_groups_and_home() {
        if effective_uid() != 0 {
            eprintln!("SKIPPED: running a rank as another user needs root");
            return;
        }
        let Ok(nobody) = RunAs::resolve("nobody") else {
            eprintln!("SKIPPED: no user `nobody`");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/rank-0.log");
        let spec = |workdir: &Path| RankSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME user=$USER".into(),
            ],
            workdir: workdir.to_path_buf(),
            log_path: log.clone(),
            run_as: Some(nobody.clone()),
            ..RankSpec::default()
        };
        let mut rank = spawn_rank(spec(Path::new("/"))).await.unwrap();
        assert_eq!(
            rank.wait().await.code,
            0,
            "{}",
            fs::read_to_string(&log).unwrap()
        );
        let groups: Vec<String> = nobody.groups.iter().map(u32::to_string).collect();
        let text = fs::read_to_string(&log).unwrap();
        assert_eq!(
            text.trim(),
            format!(
                "uid=65534 gid={} groups={} home={} user=nobody",
                nobody.gid,
                groups.join(" "),
                nobody.home.display()
            )
        );
        // The log file stays the agent's.
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(fs::metadata(&log).unwrap().uid(), 0);

        // The parent-death signal survives the switch (the kernel clears it on a credential
        // change, so it must be set after): PR_GET_PDEATHSIG (2) through perl's syscall
        // (prctl is 157 on x86_64).
        if cfg!(target_arch = "x86_64") && Path::new("/usr/bin/perl").exists() {
            let _ = fs::remove_file(&log);
            let mut spec = spec(Path::new("/"));
            spec.argv = vec![
                "/usr/bin/perl".into(),
                "-e".into(),
                r#"$x = pack("i", 0); syscall(157, 2, $x) == 0 or die "prctl: $!"; print "pdeathsig=", unpack("i", $x), " uid=$<\n""#.into(),
            ];
            let mut rank = spawn_rank(spec).await.unwrap();
            assert_eq!(
                rank.wait().await.code,
                0,
                "{}",
                fs::read_to_string(&log).unwrap()
            );
            assert_eq!(
                fs::read_to_string(&log).unwrap().trim(),
                format!("pdeathsig={} uid=65534", libc::SIGKILL)
            );
        }

        // A workdir the user cannot enter ends the rank with the reason.
        let _ = fs::remove_file(&log);
        let private = dir.path().join("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        let mut rank = spawn_rank(spec(&private)).await.unwrap();
        assert_eq!(rank.wait().await.code, 126);
        let text = fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("user nobody (uid 65534) cannot enter the workdir")
                && text.contains("permission denied"),
            "{text}"
        );
    }

    #[test]
    fn utf8_cut_keeps_characters_whole() {
        assert_eq!(utf8_cut(b"abc"), 3);
        let e_acute = "é".as_bytes(); // 2 bytes
        let mut buf = b"ab".to_vec();
        buf.push(e_acute[0]);
        assert_eq!(utf8_cut(&buf), 2);
        buf.push(e_acute[1]);
        assert_eq!(utf8_cut(&buf), 4);
        let euro = "€".as_bytes(); // 3 bytes
        let buf = [b'x', euro[0], euro[1]];
        assert_eq!(utf8_cut(&buf), 1);
        // Invalid bytes are not held back for ever.
        assert_eq!(utf8_cut(&[0xFF, 0xFF]), 2);
        assert_eq!(utf8_cut(&[0xE2]), 1);
    }

    #[test]
    fn journal_round_trips_and_skips_malformed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let journal = PgidJournal::open(dir.path()).unwrap();
        journal.record(100, 5, "job one").unwrap();
        journal.record(200, 6, "job-2").unwrap();
        journal.record(100, 7, "job one again").unwrap();
        journal.remove(200).unwrap();
        let mut text = fs::read_to_string(journal.path()).unwrap();
        text.push_str("garbage\n12 notanumber job\n");
        fs::write(journal.path(), text).unwrap();
        let reopened = PgidJournal::open(dir.path()).unwrap();
        assert_eq!(
            reopened.entries().unwrap(),
            vec![JournalEntry {
                pgid: 100,
                start_time: 7,
                job_id: "job one again".into()
            }]
        );
        assert!(journal.record(1, 1, "bad\nid").is_err());
    }

    #[test]
    fn terminate_refuses_invalid_groups() {
        assert!(!group_has_live_members(0));
        assert!(!group_has_live_members(1));
        assert!(!group_has_live_members(-5));
    }

    #[test]
    fn resolve_reports_the_path_searched() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_program("pyhton3", Some("/usr/bin:/bin"), dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command `pyhton3` not found in the rank's PATH (2 directories) on this host"
        );
        let err = resolve_program("./train.sh", None, dir.path()).unwrap_err();
        assert!(matches!(err, LaunchError::CommandNotFound { .. }), "{err}");
        assert!(err.to_string().contains("train.sh"), "{err}");
        assert!(resolve_program("sh", None, dir.path()).is_ok());
    }
}
