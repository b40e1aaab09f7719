//! TCPStore servers as real processes, for the store benchmarks: `trainctl store` (the release
//! binary, found and copied as in [`crate::procs::trainctl_binary`]) and torch's own libuv server
//! (`scripts/store/torch_server.py`, the same helper `scripts/store_ops.sh` uses). Both print one
//! JSON line with the port they listen on. Each is SIGKILLed and reaped when dropped.
//!
//! Also [`raise_open_files_limit`]: a benchmark holding thousands of connections needs more
//! descriptors than the usual soft limit of 1 024.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::procs::Proc;

/// Which server a [`ServerProc`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `trainctl store --listen 127.0.0.1:0 -o json`.
    Trainctl,
    /// `TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)` in a
    /// Python process of its own.
    Torch,
    /// The same torch server with no DNS server to ask: started in a mount namespace of its own
    /// (`unshare -m`, needs root) where `/etc/resolv.conf` is an empty file, so glibc's resolver
    /// asks 127.0.0.1:53, where nothing listens, and fails at once. Torch's server looks up the
    /// name of every peer on its event loop (`getnameinfo`; a peer it sees as `::ffff:127.0.0.1`
    /// is not in `/etc/hosts`); this variant separates that lookup from the server's own work.
    TorchNoDns,
}

impl ServerKind {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Trainctl => "trainctl store",
            ServerKind::Torch => "torch libuv",
            ServerKind::TorchNoDns => "torch libuv, no DNS",
        }
    }
}

/// A store server process listening on `addr`.
pub struct ServerProc {
    pub kind: ServerKind,
    pub addr: SocketAddr,
    /// Kept so that torch's helper, which serves until its stdin closes, keeps serving; the
    /// process is killed on drop anyway.
    _stdin: Option<std::process::ChildStdin>,
    pub proc: Proc,
}

/// What starting the servers needs: the trainctl binary and a Python with torch.
pub struct Servers {
    pub trainctl: PathBuf,
    pub python: PathBuf,
    /// Most connections `trainctl store` is told to serve (kept under the open-file limit, so it
    /// does not warn).
    pub max_connections: usize,
    /// An empty file bind-mounted over `/etc/resolv.conf` for [`ServerKind::TorchNoDns`].
    pub empty_resolv_conf: PathBuf,
}

impl Servers {
    /// Starts a server of `kind` on a free port of 127.0.0.1 and waits for its address.
    pub fn start(&self, kind: ServerKind) -> anyhow::Result<ServerProc> {
        let mut command = match kind {
            ServerKind::Trainctl => {
                let mut c = Command::new(&self.trainctl);
                c.args(["store", "--listen", "127.0.0.1:0", "--max-connections"])
                    .arg(self.max_connections.to_string())
                    .args(["-o", "json"]);
                c
            }
            ServerKind::Torch => {
                let mut c = Command::new(&self.python);
                c.arg(torch_server_script()).arg("127.0.0.1");
                c
            }
            ServerKind::TorchNoDns => {
                let mut c = self.without_dns();
                c.arg(&self.python)
                    .arg(torch_server_script())
                    .arg("127.0.0.1");
                c
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start the {} server", kind.name()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let proc = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("read the {} server's address", kind.name()))?;
        let printed: serde_json::Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "the {} server printed {line:?}, not its address as JSON",
                kind.name()
            )
        })?;
        let Some(port) = printed["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
            bail!("the {} server printed no port: {line:?}", kind.name());
        };
        Ok(ServerProc {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _stdin: stdin,
            proc,
        })
    }
}

impl Servers {
    /// A command that runs its arguments in a mount namespace where `/etc/resolv.conf` is empty
    /// (`unshare -m sh -c 'mount --bind EMPTY /etc/resolv.conf && exec "$@"'`); the program ends up
    /// as the child itself (`exec`), so killing the child kills it.
    fn without_dns(&self) -> Command {
        let mut c = Command::new("unshare");
        c.args([
            "-m",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#,
        ])
        .arg(&self.empty_resolv_conf);
        c
    }

    /// Whether [`ServerKind::TorchNoDns`] can run here (root, `unshare` and `mount` present).
    pub fn can_run_without_dns(&self) -> anyhow::Result<bool> {
        std::fs::write(&self.empty_resolv_conf, "")
            .with_context(|| format!("write {}", self.empty_resolv_conf.display()))?;
        let probe = self
            .without_dns()
            .args(["test", "!", "-s", "/etc/resolv.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(probe.is_ok_and(|s| s.success()))
    }
}

/// `benches/scripts/store/torch_server.py`.
pub fn torch_server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/store/torch_server.py")
}

/// A Python with torch: `TRAINCTL_BENCH_PYTHON`, else the workspace's `.venv/bin/python` (what
/// `scripts/python-env.sh` sets up), else `python3` on `PATH`. Checked by importing torch.
pub fn python_with_torch() -> anyhow::Result<PathBuf> {
    let python = match std::env::var_os("TRAINCTL_BENCH_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
            if venv.is_file() {
                venv
            } else {
                PathBuf::from("python3")
            }
        }
    };
    let imported = Command::new(&python)
        .args(["-c", "import torch.distributed"])
        .status()
        .with_context(|| format!("run {}", python.display()))?;
    if !imported.success() {
        bail!(
            "{} cannot import torch: run scripts/python-env.sh, or set TRAINCTL_BENCH_PYTHON",
            python.display()
        );
    }
    Ok(python)
}

/// Raises this process's soft open-file limit to its hard limit; returns the limit in force.
pub fn raise_open_files_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        return Ok(raised.rlim_cur);
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limit_ends_at_the_hard_limit() {
        let now = raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((now, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }

    #[test]
    fn torch_server_script_is_in_the_tree() {
        assert!(torch_server_script().is_file());
    }
}
