//! Where the NCCL and libibverbs libraries come from: the loader's ordinary search
//! (`libnccl.so.2`, `libibverbs.so.1` on `LD_LIBRARY_PATH` and the system's directories), or the
//! explicit paths of `--nccl-library` and `--ibverbs-library` ([`LibraryPaths`]).
//!
//! A given path is opened once at agent start (and by `trainctl preflight`) with [`LibraryPaths::open`]:
//! a file that cannot be opened, or is not the library it should be, is an error naming the option,
//! the path and the library's own message, never a silent fallback to the loader's search. The
//! pre-flight's probes and its reported versions then use the same paths, and ranks of GPU jobs
//! are told the NCCL path ([`LibraryPaths::rank_env`]) unless their job sets it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use trainctl_ffi::nccl::{Nccl, NcclError};
use trainctl_ffi::verbs::{Verbs, VerbsError};

/// The option naming NCCL's file.
pub const NCCL_OPTION: &str = "--nccl-library";
/// The option naming libibverbs' file.
pub const IBVERBS_OPTION: &str = "--ibverbs-library";
/// The environment variable of [`NCCL_OPTION`], and the one a rank's NCCL backend reads
/// (`trainctl example-train --device cuda`) for the path of `libnccl.so.2`.
pub const NCCL_LIBRARY_ENV: &str = "TRAINCTL_NCCL_LIBRARY";
/// The environment variable of [`IBVERBS_OPTION`].
pub const IBVERBS_LIBRARY_ENV: &str = "TRAINCTL_IBVERBS_LIBRARY";
/// The variable that says a rank sees GPUs: a rank with a non-empty one runs a GPU job.
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// `--nccl-library` and `--ibverbs-library`: the file of each library, or `None` for the
/// loader's search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibraryPaths {
    /// NCCL's `libnccl.so.2`, e.g. the one in PyTorch's `nvidia/nccl/lib`.
    pub nccl: Option<PathBuf>,
    /// `libibverbs.so.1`.
    pub ibverbs: Option<PathBuf>,
}

/// A library option whose file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LibraryPathError {
    /// `--nccl-library` names a file that does not open as NCCL.
    #[error(
        "{NCCL_OPTION} {} ({NCCL_LIBRARY_ENV}): {}; give the path of NCCL's libnccl.so.2 (from the \
         pip wheel nvidia-nccl-cu12/-cu13 or the package libnccl2), or leave the option out to \
         use the loader's search path",
        .path.display(),
        nccl_detail(.cause)
    )]
    Nccl {
        /// The path given.
        path: PathBuf,
        /// NCCL's (or the loader's) own error, in the message (not a `source`, so that a
        /// chain-printing caller does not repeat it with advice about the loader's search).
        cause: NcclError,
    },
    /// `--ibverbs-library` names a file that does not open as libibverbs.
    #[error(
        "{IBVERBS_OPTION} {} ({IBVERBS_LIBRARY_ENV}): {}; give the path of rdma-core's \
         libibverbs.so.1, or leave the option out to use the loader's search path",
        .path.display(),
        verbs_detail(.cause)
    )]
    Ibverbs {
        /// The path given.
        path: PathBuf,
        /// The loader's or libibverbs' own error, in the message.
        cause: VerbsError,
    },
}

/// The library's error without the install advice meant for the loader's search (the user gave a
/// file, so the loader's own message is what matters).
fn nccl_detail(e: &NcclError) -> String {
    match e {
        NcclError::NotFound { reason, .. } => format!("cannot be opened: {reason}"),
        other => other.to_string(),
    }
}

fn verbs_detail(e: &VerbsError) -> String {
    match e {
        VerbsError::NotFound { reason, .. } => format!("cannot be opened: {reason}"),
        other => other.to_string(),
    }
}

/// The libraries [`LibraryPaths::open`] opened from their given paths.
#[derive(Debug, Clone, Default)]
pub struct OpenedLibraries {
    /// NCCL from `--nccl-library`.
    pub nccl: Option<Arc<Nccl>>,
    /// libibverbs from `--ibverbs-library`.
    pub ibverbs: Option<Arc<Verbs>>,
}

impl OpenedLibraries {
    /// What was opened, in words for the agent's log, e.g. `NCCL 2.28.3 from /opt/nccl/libnccl.so.2`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(n) = &self.nccl {
            out.push(format!("NCCL {} from {}", n.version(), n.library()));
        }
        if let Some(v) = &self.ibverbs {
            out.push(format!("libibverbs from {}", v.library()));
        }
        out
    }
}

impl LibraryPaths {
    /// Opens each library given a path (blocks briefly: the loader maps the file and runs its
    /// initialisers; NCCL is asked its version). The loader's search is never tried for a given
    /// path: a file that cannot be used is an error.
    pub fn open(&self) -> Result<OpenedLibraries, LibraryPathError> {
        let nccl = match &self.nccl {
            Some(path) => Some(
                Nccl::open_path(path).map_err(|cause| LibraryPathError::Nccl {
                    path: path.clone(),
                    cause,
                })?,
            ),
            None => None,
        };
        let ibverbs = match &self.ibverbs {
            Some(path) => Some(Verbs::open_library(path.as_os_str()).map_err(|cause| {
                LibraryPathError::Ibverbs {
                    path: path.clone(),
                    cause,
                }
            })?),
            None => None,
        };
        Ok(OpenedLibraries { nccl, ibverbs })
    }

    /// The same options with each relative path (one with a `/`, such as `lib/libnccl.so.2`)
    /// made absolute against `cwd`, the agent's working directory: ranks start in their job's
    /// workdir and must open the same file. A bare name (`libnccl.so.2`) stays a name for the
    /// loader to search, as `dlopen` treats it.
    pub fn resolved(self, cwd: &Path) -> LibraryPaths {
        let resolve = |p: PathBuf| {
            if p.is_relative() && p.as_os_str().as_encoded_bytes().contains(&b'/') {
                cwd.join(p)
            } else {
                p
            }
        };
        LibraryPaths {
            nccl: self.nccl.map(resolve),
            ibverbs: self.ibverbs.map(resolve),
        }
    }

    /// NCCL, from the given path or the loader's search.
    pub fn nccl(&self) -> Result<Arc<Nccl>, NcclError> {
        match &self.nccl {
            Some(path) => Nccl::open_path(path),
            None => Nccl::open(),
        }
    }

    /// libibverbs, from the given path or the loader's search.
    pub fn ibverbs(&self) -> Result<Arc<Verbs>, VerbsError> {
        match &self.ibverbs {
            Some(path) => Verbs::open_library(path.as_os_str()),
            None => Verbs::open(),
        }
    }

    /// The variable the agent adds to a rank whose environment (the job's, then trainctl's, as
    /// the rank gets it) is `env`: `TRAINCTL_NCCL_LIBRARY=<--nccl-library>` for a rank of a GPU
    /// job (a non-empty `CUDA_VISIBLE_DEVICES`), unless `env` already sets it (the job's own env
    /// wins). `None` without `--nccl-library`, for a CPU job, or when the job sets it.
    pub fn rank_env<'a>(
        &self,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<(String, String)> {
        let path = self.nccl.as_ref()?;
        let mut sees_gpus = false;
        for (name, value) in env {
            match name {
                NCCL_LIBRARY_ENV => return None,
                CUDA_VISIBLE_DEVICES => sees_gpus = !value.trim().is_empty(),
                _ => {}
            }
        }
        sees_gpus.then(|| {
            (
                NCCL_LIBRARY_ENV.to_string(),
                path.to_string_lossy().into_owned(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The venv's NCCL (scripts/python-env.sh installs the wheel nvidia-nccl-cu13), if made.
    fn venv_nccl() -> Option<PathBuf> {
        trainctl_ffi::nccl::wheel_library(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
    }

    /// The C library this test process has mapped: a real shared library that is neither NCCL
    /// nor libibverbs.
    fn libc_path() -> PathBuf {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        maps.lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .find(|p| {
                Path::new(p)
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("libc.so"))
            })
            .map(PathBuf::from)
            .expect("libc is mapped")
    }

    fn skip(reason: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: {reason}");
    }

    #[test]
    fn a_given_path_that_is_not_the_library_is_an_error_naming_option_path_and_cause() {
        let missing = PathBuf::from("/nonexistent/trainctl-test/libnccl.so.2");
        let libc = libc_path();
        // (option set, the message's parts: option, path, the library's or loader's own words)
        let cases: Vec<(LibraryPaths, Vec<String>)> = vec![
            (
                LibraryPaths {
                    nccl: Some(missing.clone()),
                    ibverbs: None,
                },
                vec![
                    "--nccl-library /nonexistent/trainctl-test/libnccl.so.2".into(),
                    "cannot be opened".into(),
                    "No such file or directory".into(),
                    "libnccl.so.2".into(),
                ],
            ),
            (
                LibraryPaths {
                    nccl: Some("/bin/sh".into()),
                    ibverbs: None,
                },
                vec![
                    "--nccl-library /bin/sh (TRAINCTL_NCCL_LIBRARY)".into(),
                    "cannot be opened: ".into(),
                ],
            ),
            (
                LibraryPaths {
                    nccl: Some(libc.clone()),
                    ibverbs: None,
                },
                vec![
                    format!("--nccl-library {}", libc.display()),
                    "lacks the function ncclGetVersion".into(),
                    "it is not NCCL".into(),
                ],
            ),
            (
                LibraryPaths {
                    nccl: None,
                    ibverbs: Some("/bin/sh".into()),
                },
                vec![
                    "--ibverbs-library /bin/sh (TRAINCTL_IBVERBS_LIBRARY)".into(),
                    "cannot be opened: ".into(),
                    "libibverbs.so.1".into(),
                ],
            ),
            (
                LibraryPaths {
                    nccl: None,
                    ibverbs: Some(missing.clone()),
                },
                vec![
                    "--ibverbs-library /nonexistent/trainctl-test/libnccl.so.2".into(),
                    "No such file or directory".into(),
                ],
            ),
            (
                LibraryPaths {
                    nccl: None,
                    ibverbs: Some(libc.clone()),
                },
                vec![
                    format!("--ibverbs-library {}", libc.display()),
                    "lacks the function ibv_get_device_list".into(),
                ],
            ),
        ];
        for (paths, parts) in cases {
            let err = paths.open().expect_err("not the library").to_string();
            for part in &parts {
                assert!(err.contains(part.as_str()), "{part:?} not in: {err}");
            }
            // The loader's install advice is for the search path, not for a file the user gave.
            assert!(!err.contains("LD_LIBRARY_PATH"), "{err}");
        }
    }

    #[test]
    fn no_given_path_opens_nothing_and_is_no_error() {
        let opened = LibraryPaths::default().open().expect("nothing to open");
        assert!(opened.nccl.is_none() && opened.ibverbs.is_none());
        assert!(opened.describe().is_empty());
    }

    #[test]
    fn the_wheels_nccl_opens_by_path_and_is_described_with_its_version() {
        let Some(lib) = venv_nccl() else {
            return skip(
                "no NCCL wheel in .venv (scripts/python-env.sh installs nvidia-nccl-cu13)",
            );
        };
        let paths = LibraryPaths {
            nccl: Some(lib.clone()),
            ibverbs: None,
        };
        let opened = paths.open().expect("the wheel's NCCL opens");
        let nccl = opened.nccl.as_ref().expect("opened");
        assert!(nccl.version().major >= 2, "{:?}", nccl.version());
        assert_eq!(
            opened.describe(),
            vec![format!("NCCL {} from {}", nccl.version(), lib.display())]
        );
        let versions = super::super::probes::versions(&paths);
        assert_eq!(
            versions.nccl,
            format!("{} from {}", nccl.version(), lib.display())
        );
    }

    #[test]
    fn the_systems_libibverbs_opens_by_path_and_is_reported_with_its_file() {
        // Where the loader finds it, if it does: its full path is in this process's maps.
        if Verbs::open().is_err() {
            return skip("libibverbs.so.1 is not installed here");
        }
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        let real = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .find(|p| p.contains("/libibverbs.so"))
            .map(PathBuf::from)
            .expect("libibverbs is mapped");
        let paths = LibraryPaths {
            nccl: None,
            ibverbs: Some(real.clone()),
        };
        let opened = paths.open().expect("libibverbs opens by path");
        assert_eq!(
            opened.describe(),
            vec![format!("libibverbs from {}", real.display())]
        );
        let file = real.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            super::super::probes::versions(&paths).libibverbs,
            format!("{file} from {}", real.display())
        );
    }

    #[test]
    fn relative_paths_are_made_absolute_and_bare_names_left_to_the_loader() {
        let cwd = Path::new("/srv/agent");
        // (given, resolved)
        let cases = [
            ("/opt/nccl/libnccl.so.2", "/opt/nccl/libnccl.so.2"),
            ("lib/libnccl.so.2", "/srv/agent/lib/libnccl.so.2"),
            ("./libnccl.so.2", "/srv/agent/./libnccl.so.2"),
            ("libnccl.so.2", "libnccl.so.2"),
        ];
        for (given, want) in cases {
            let paths = LibraryPaths {
                nccl: Some(given.into()),
                ibverbs: Some(given.into()),
            }
            .resolved(cwd);
            assert_eq!(paths.nccl.as_deref(), Some(Path::new(want)), "{given}");
            assert_eq!(paths.ibverbs.as_deref(), Some(Path::new(want)), "{given}");
        }
        assert_eq!(
            LibraryPaths::default().resolved(cwd),
            LibraryPaths::default()
        );
    }

    #[test]
    fn gpu_ranks_are_told_the_nccl_path_unless_their_job_sets_it() {
        let given = LibraryPaths {
            nccl: Some("/opt/nccl/libnccl.so.2".into()),
            ibverbs: Some("/opt/rdma/libibverbs.so.1".into()),
        };
        let verbs_only = LibraryPaths {
            nccl: None,
            ibverbs: Some("/opt/rdma/libibverbs.so.1".into()),
        };
        let told = Some((
            "TRAINCTL_NCCL_LIBRARY".to_string(),
            "/opt/nccl/libnccl.so.2".to_string(),
        ));
        // (the agent's options, the rank's env in order (the job's, then trainctl's), what is added)
        type Case<'a> = (
            &'a LibraryPaths,
            Vec<(&'a str, &'a str)>,
            Option<(String, String)>,
        );
        let cases: Vec<Case> = vec![
            (
                &given,
                vec![("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")],
                told.clone(),
            ),
            (
                &given,
                vec![("EPOCHS", "3"), ("CUDA_VISIBLE_DEVICES", "GPU-a")],
                told.clone(),
            ),
            // The job's own value wins.
            (
                &given,
                vec![
                    ("TRAINCTL_NCCL_LIBRARY", "/home/me/libnccl.so.2"),
                    ("CUDA_VISIBLE_DEVICES", "GPU-a"),
                ],
                None,
            ),
            // A CPU job: no GPU visible, nothing added.
            (&given, vec![("CUDA_VISIBLE_DEVICES", "")], None),
            (&given, vec![("EPOCHS", "3")], None),
            // The job's GPUs hidden by trainctl's value on top.
            (
                &given,
                vec![("CUDA_VISIBLE_DEVICES", "0"), ("CUDA_VISIBLE_DEVICES", "")],
                None,
            ),
            // No --nccl-library: nothing, even with GPUs (--ibverbs-library tells ranks nothing).
            (&verbs_only, vec![("CUDA_VISIBLE_DEVICES", "GPU-a")], None),
        ];
        for (paths, env, want) in cases {
            assert_eq!(
                paths.rank_env(env.iter().copied()),
                want,
                "{paths:?} {env:?}"
            );
        }
    }
}
