//! trainctl-ffi's NCCL layer against the real `libnccl.so.2` of NVIDIA's pip wheel, which
//! `scripts/python-env.sh` installs into the repository's venv. Without a GPU, NCCL still answers
//! `ncclGetVersion` and `ncclGetUniqueId`; the communicator tests need GPUs and say so when they
//! skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Says why a test stops early, on stderr directly so that libtest's output capture does not hide
/// it (`cargo test` shows it without `--nocapture`).
macro_rules! skip {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "skipped: {}", format!($($arg)*));
    }};
}

use trainctl_ffi::nccl::{check, Nccl, NcclError, NcclVersion, UniqueId, LIBRARY_NAME};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// The venv's python (made by scripts/python-env.sh, which also installs the NCCL wheel).
fn venv_python() -> PathBuf {
    let out = Command::new(repo().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("python-env.sh prints the python path")
            .trim(),
    )
}

/// The wheel's `lib` directory and the wheel's version, e.g. `2.30.7`.
fn wheel_nccl() -> (PathBuf, String) {
    let script = r#"
import importlib.metadata, importlib.util
spec = importlib.util.find_spec("nvidia.nccl")
print(list(spec.submodule_search_locations)[0] + "/lib")
for name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
    try:
        print(importlib.metadata.version(name)); break
    except importlib.metadata.PackageNotFoundError:
        pass
"#;
    let out = Command::new(venv_python())
        .args(["-c", script])
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "finding NCCL's wheel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = stdout.lines();
    let dir = PathBuf::from(lines.next().expect("lib dir"));
    let version = lines.next().expect("wheel version").to_owned();
    assert!(
        dir.join(LIBRARY_NAME).is_file(),
        "{} has no {LIBRARY_NAME}",
        dir.display()
    );
    (dir, version)
}

fn open_wheel_nccl() -> (Arc<Nccl>, String) {
    let (dir, version) = wheel_nccl();
    let nccl = Nccl::open_path(&dir.join(LIBRARY_NAME)).expect("the wheel's NCCL opens");
    (nccl, version)
}

#[test]
fn the_wheels_nccl_reports_the_wheels_version() {
    let (nccl, wheel_version) = open_wheel_nccl();
    let version = nccl.version();
    // Wheel versions are NCCL versions, sometimes with a fourth "post" field (2.27.3.post1...).
    assert!(
        wheel_version.starts_with(&version.to_string()),
        "ncclGetVersion says {version}, the wheel is {wheel_version}"
    );
    assert!(version >= NcclVersion::MINIMUM, "{version}");
    assert!(
        nccl.library().ends_with("/libnccl.so.2"),
        "{}",
        nccl.library()
    );
}

#[test]
fn unique_ids_work_without_a_gpu_and_round_trip_as_bytes() {
    let (nccl, _) = open_wheel_nccl();
    let first = nccl.unique_id().expect("ncclGetUniqueId without a GPU");
    let second = nccl.unique_id().expect("a second id");
    assert_ne!(first, second, "two ids name two communicators");
    assert!(
        first.as_bytes().iter().any(|b| *b != 0),
        "an id is not all zeros: {first:?}"
    );
    let received = UniqueId::from_bytes(first.as_bytes().as_slice()).expect("128 bytes");
    assert_eq!(received, first);
}

#[test]
fn a_minimum_above_the_library_is_refused_with_both_versions() {
    let (dir, _) = wheel_nccl();
    let path = dir.join(LIBRARY_NAME);
    let future = NcclVersion {
        major: 2,
        minor: 99,
        patch: 0,
    };
    match Nccl::open_with(path.as_os_str(), future) {
        Err(NcclError::TooOld {
            found, required, ..
        }) => {
            assert_eq!(required, future);
            assert!(found < future, "{found}");
            let message = NcclError::TooOld {
                library: "x".into(),
                found,
                required,
            }
            .to_string();
            assert!(
                message.contains(&format!("is NCCL {found}, older than the 2.99.0")),
                "{message}"
            );
        }
        other => panic!("expected TooOld, got {other:?}"),
    }
}

/// Runs `open_by_soname_in_child` in a new process of this test binary with `ld_library_path`
/// (the loader reads it at process start, and a library once opened in this process would be
/// found by its soname whatever the path) and returns its stdout.
fn open_by_soname_in_a_child(ld_library_path: Option<&Path>, expect: &str) -> String {
    let mut child = Command::new(std::env::current_exe().expect("test binary"));
    child
        .args([
            "--exact",
            "open_by_soname_in_child",
            "--ignored",
            "--nocapture",
        ])
        .env("TRAINCTL_FFI_CHILD_EXPECT", expect)
        .env_remove("LD_LIBRARY_PATH");
    if let Some(dir) = ld_library_path {
        child.env("LD_LIBRARY_PATH", dir);
    }
    let out = child.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_loader_finds_nccl_through_ld_library_path() {
    let (dir, _) = wheel_nccl();
    let stdout = open_by_soname_in_a_child(Some(&dir), "found");
    assert!(
        stdout.contains("opened libnccl.so.2 by soname: NCCL 2."),
        "{stdout}"
    );
}

#[test]
fn without_nccl_on_the_loader_path_open_is_a_typed_error() {
    let system_nccl = [
        "/usr/lib/x86_64-linux-gnu/libnccl.so.2",
        "/usr/lib64/libnccl.so.2",
        "/usr/lib/libnccl.so.2",
    ]
    .iter()
    .find(|p| Path::new(p).exists());
    if let Some(path) = system_nccl {
        return skip!("this host has a system NCCL ({path})");
    }
    let stdout = open_by_soname_in_a_child(None, "missing");
    assert!(
        stdout.contains("typed error: cannot open the NCCL library libnccl.so.2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("nvidia-nccl-cu12") && stdout.contains("LD_LIBRARY_PATH"),
        "{stdout}"
    );
}

#[test]
#[ignore = "run in a child process by the two soname tests above (TRAINCTL_FFI_CHILD_EXPECT)"]
fn open_by_soname_in_child() {
    let expect = std::env::var("TRAINCTL_FFI_CHILD_EXPECT").unwrap_or_default();
    match (Nccl::open(), expect.as_str()) {
        (Ok(nccl), "found") => {
            assert_eq!(nccl.library(), LIBRARY_NAME);
            println!("opened libnccl.so.2 by soname: NCCL {}", nccl.version());
        }
        (Err(e @ NcclError::NotFound { .. }), "missing") => println!("typed error: {e}"),
        (got, _) => panic!("TRAINCTL_FFI_CHILD_EXPECT={expect:?} (found or missing), got {got:?}"),
    }
}

#[test]
fn single_host_all_reduce_refuses_bad_arguments_and_needs_cuda() {
    let (nccl, _) = open_wheel_nccl();
    let err = check::single_host_all_reduce(&nccl, &[], 1024, 1).expect_err("no devices");
    assert!(err.to_string().contains("at least one device"), "{err}");
    let err = check::single_host_all_reduce(&nccl, &[0], 0, 1).expect_err("no elements");
    assert!(err.to_string().contains("one element"), "{err}");
    if trainctl_ffi::cuda::driver_present() {
        skip!("the no-CUDA half: this host has a CUDA driver");
        return;
    }
    let err = check::single_host_all_reduce(&nccl, &[0], 1024, 1).expect_err("no CUDA here");
    assert!(matches!(err, NcclError::NoCuda), "{err:?}");
}

#[test]
fn all_reduce_over_every_gpu_of_this_host() {
    let gpus = match trainctl_ffi::cuda::cuda_devices() {
        Ok(gpus) if !gpus.is_empty() => gpus,
        Ok(_) => return skip!("the CUDA driver sees no GPU on this host"),
        Err(e) => return skip!("no GPU on this host ({e})"),
    };
    let (nccl, _) = open_wheel_nccl();
    let devices: Vec<i32> = gpus.iter().map(|g| g.ordinal as i32).collect();
    let report = check::single_host_all_reduce(&nccl, &devices, 16 << 20, 5).expect("all-reduce");
    println!("{report:?}");
    assert_eq!(report.devices, devices);
    assert!(report.algorithm_gb_per_s > 0.0);
}
