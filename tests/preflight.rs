//! `trainctl preflight` through the real binary, as a user runs it on a host. On a host without
//! GPU or RDMA device (this one) every check is skipped with a reason and the exit status is 0;
//! on a GPU host the same test checks the shape and that what ran has a figure or a reason.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{job_file, trainctl, DevCluster};
use serde_json::Value;

const CHECKS: [&str; 5] = [
    "gpu-health",
    "gpu-copy",
    "rdma-port-active",
    "rdma-loopback",
    "nccl-all-reduce",
];

fn preflight(args: &[&str], fail: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(trainctl());
    cmd.arg("preflight").args(args);
    match fail {
        Some(v) => cmd.env("TRAINCTL_PREFLIGHT_FAIL", v),
        None => cmd.env_remove("TRAINCTL_PREFLIGHT_FAIL"),
    };
    cmd.env_remove("TRAINCTL_NCCL_LIBRARY")
        .env_remove("TRAINCTL_IBVERBS_LIBRARY");
    cmd.output().unwrap()
}

/// The venv's NCCL wheel (scripts/python-env.sh installs nvidia-nccl-cu13): its libnccl.so.2 and
/// the wheel's version, from its dist-info directory's name (`nvidia_nccl_cu13-2.30.7.dist-info`).
fn venv_nccl() -> Option<(PathBuf, String)> {
    let venv_lib = common::repo().join(".venv/lib");
    let site = std::fs::read_dir(venv_lib)
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages"))
        .find(|p| p.join("nvidia/nccl/lib/libnccl.so.2").is_file())?;
    let version = std::fs::read_dir(&site)
        .ok()?
        .flatten()
        .filter_map(|d| d.file_name().into_string().ok())
        .find_map(|name| {
            let rest = name
                .strip_prefix("nvidia_nccl_cu13-")
                .or_else(|| name.strip_prefix("nvidia_nccl_cu12-"))?;
            rest.strip_suffix(".dist-info").map(str::to_owned)
        })?;
    Some((site.join("nvidia/nccl/lib/libnccl.so.2"), version))
}

#[test]
fn preflight_reports_every_check_and_says_plainly_when_there_is_no_hardware() {
    let out = preflight(&["-o", "json"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in CHECKS {
        assert!(names.contains(&name), "{name} missing: {report}");
    }
    for c in report["checks"].as_array().unwrap() {
        match c["result"].as_str().unwrap() {
            "passed" => {}
            "failed" | "skipped" => assert!(!c["reason"].as_str().unwrap().is_empty(), "{c}"),
            other => panic!("unknown result {other}: {c}"),
        }
    }
    for lib in ["cuda_driver", "nvidia_driver", "nccl", "libibverbs"] {
        assert!(
            !report["versions"][lib].as_str().unwrap().is_empty(),
            "{lib}: {report}"
        );
    }
    let healthy = report["health"]["healthy"].as_bool().unwrap();
    assert_eq!(
        out.status.code(),
        Some(if healthy { 0 } else { 1 }),
        "{report}"
    );

    let no_gpu = report["gpus"].as_array().unwrap().is_empty();
    let no_rdma = report["rdma_devices"].as_array().unwrap().is_empty();
    if !(no_gpu && no_rdma) {
        eprintln!(
            "this host has GPUs or RDMA devices: the no-hardware half of the test is skipped"
        );
        return;
    }
    // A bare host: everything skipped with a reason, exit 0, and the text says why.
    assert!(healthy, "{report}");
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["result"], "skipped", "{c}");
        let reason = c["reason"].as_str().unwrap();
        assert!(
            reason == "no GPU on this host" || reason == "no RDMA device on this host",
            "{c}"
        );
    }
    let text = preflight(&[], None);
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout);
    for line in [
        "GPUs: none on this host",
        "RDMA devices: none on this host",
        "libraries: CUDA driver ",
        "healthy: no GPU and no RDMA device on this host, so every check was skipped",
    ] {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
}

#[test]
fn a_failed_check_exits_1_and_a_bad_knob_exits_2() {
    let out = preflight(&[], Some("command:rdma-port-active"));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unhealthy: rdma-port-active on ")
            && text.contains("injected by TRAINCTL_PREFLIGHT_FAIL"),
        "{text}"
    );
    // Aimed at the agent only: the command is not affected.
    let out = preflight(&["-o", "json"], Some("job:gpu-copy,periodic:gpu-copy"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(if report["health"]["healthy"] == true {
            0
        } else {
            1
        })
    );
    assert!(
        !report["checks"].to_string().contains("injected"),
        "{report}"
    );

    let out = preflight(&[], Some("gpu-cpy"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TRAINCTL_PREFLIGHT_FAIL: `gpu-cpy`")
            && err.contains("unknown check `gpu-cpy`"),
        "{err}"
    );
}

#[test]
fn rdma_port_options_are_checked_and_a_named_port_must_exist() {
    // A malformed entry: exit 2, the entry and the accepted form named.
    let out = preflight(&["--rdma-ports", "mlx5_0:x"], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rdma-ports: `mlx5_0:x` has `x` where a port number belongs")
            && err.contains("DEVICE:PORT"),
        "{err}"
    );
    let out = preflight(&["--rdma-ignore", "mlx5_0:0"], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rdma-ignore: `mlx5_0:0` names port 0"),
        "{err}"
    );

    // A port this host does not have: exit 2, naming it and listing what exists.
    let out = preflight(&["--rdma-ports", "trainctl_no_such_dev:1"], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rdma-ports: `trainctl_no_such_dev:1` names no RDMA port of this host; its ports are: "),
        "{err}"
    );

    // An ignore entry that matches nothing is a warning, not an error.
    let out = preflight(
        &["-o", "json", "--rdma-ignore", "trainctl_no_such_dev"],
        None,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(if report["health"]["healthy"] == true {
            0
        } else {
            1
        })
    );
    let warnings = report["warnings"].to_string();
    assert!(
        warnings
            .contains("--rdma-ignore: `trainctl_no_such_dev` matches no RDMA port of this host"),
        "{report}"
    );
    assert!(report["claimed_ports"].is_array(), "{report}");
    let text = preflight(&["--rdma-ignore", "trainctl_no_such_dev"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("warning: --rdma-ignore: `trainctl_no_such_dev` matches no RDMA port"),
        "{text}"
    );
}

/// Without --rdma-ports, a port that is not ACTIVE is reported, never failed (only on a host
/// with RDMA ports; on this one there are none and the test says so).
#[test]
fn without_rdma_ports_a_port_that_is_not_active_is_only_a_warning() {
    let out = preflight(&["-o", "json"], None);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ports: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "rdma-port-active" && c["subject"] != "host")
        .collect();
    if ports.is_empty() {
        eprintln!("no RDMA port on this host: nothing to check");
        return;
    }
    for c in ports {
        let active = c["figure"].as_str().unwrap_or("").starts_with("ACTIVE");
        let want = if active { "passed" } else { "skipped" };
        assert_eq!(c["result"], want, "{c}");
        if !active {
            assert!(
                c["reason"]
                    .as_str()
                    .unwrap()
                    .contains("name it in --rdma-ports to require it"),
                "{c}"
            );
        }
    }
}

#[test]
fn nccl_library_reports_the_given_nccls_version() {
    let Some((lib, version)) = venv_nccl() else {
        eprintln!(
            "skipped: no NCCL wheel in .venv (scripts/python-env.sh installs nvidia-nccl-cu13)"
        );
        return;
    };
    let lib_arg = lib.to_str().unwrap();
    let out = preflight(&["-o", "json", "--nccl-library", lib_arg], None);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        report["versions"]["nccl"],
        format!("{version} from {lib_arg}"),
        "{report}"
    );
    let text = preflight(&["--nccl-library", lib_arg], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("NCCL {version} from {lib_arg}")),
        "{text}"
    );
}

#[test]
fn a_library_path_that_is_not_the_library_exits_2_naming_option_path_and_cause() {
    let cases = [
        (
            "--nccl-library",
            "/bin/sh",
            "--nccl-library /bin/sh (TRAINCTL_NCCL_LIBRARY): cannot be opened: ",
        ),
        (
            "--nccl-library",
            "/nonexistent/libnccl.so.2",
            "No such file or directory",
        ),
        (
            "--ibverbs-library",
            "/bin/sh",
            "--ibverbs-library /bin/sh (TRAINCTL_IBVERBS_LIBRARY): cannot be opened: ",
        ),
        (
            "--ibverbs-library",
            "/nonexistent/libibverbs.so.1",
            "No such file or directory",
        ),
    ];
    for (option, path, cause) in cases {
        let out = preflight(&[option, path], None);
        assert_eq!(out.status.code(), Some(2), "{option} {path}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{option} {path}")) && err.contains(cause),
            "{option} {path}: {err}"
        );
        assert!(out.stdout.is_empty(), "no report for bad options");
    }
}

/// The agent refuses to start with a --nccl-library that is not NCCL, before it reaches for a
/// coordinator (none listens here), instead of falling back to the loader's search.
#[test]
fn the_agent_refuses_to_start_with_a_nccl_library_that_is_not_nccl() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::trainctl())
        .args(["agent", "--coordinator", "http://127.0.0.1:9", "--data-dir"])
        .arg(data_dir.path())
        .args(["--nccl-library", "/bin/sh"])
        .env_remove("TRAINCTL_IBVERBS_LIBRARY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent kept running with --nccl-library /bin/sh");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("--nccl-library /bin/sh (TRAINCTL_NCCL_LIBRARY): cannot be opened: "),
        "{err}"
    );
    // The loader's install advice is for the search path, not for a file that was given.
    assert!(!err.contains("LD_LIBRARY_PATH"), "{err}");
}

/// An agent with --nccl-library (here through `TRAINCTL_NCCL_LIBRARY`, which `trainctl dev`'s
/// agents inherit, given relative to the agents' working directory) tells its GPU ranks the
/// absolute path; a CPU job's ranks get nothing from the agent (they only inherit the agent's own
/// environment, the relative path as given). (A job spec cannot set `TRAINCTL_*` names, so "the
/// job's env wins" is tested on `LibraryPaths::rank_env` alone.)
#[test]
fn gpu_ranks_of_an_agent_with_nccl_library_get_its_absolute_path_unless_the_job_sets_it() {
    let Some((lib, _)) = venv_nccl() else {
        eprintln!(
            "skipped: no NCCL wheel in .venv (scripts/python-env.sh installs nvidia-nccl-cu13)"
        );
        return;
    };
    let repo = common::repo();
    let relative = lib
        .strip_prefix(&repo)
        .expect("the venv is in the repository");
    let relative = relative.to_str().unwrap().to_owned();
    let cluster = DevCluster::start_with(
        1,
        &["--gpus-per-agent", "2"],
        &[("TRAINCTL_NCCL_LIBRARY", relative.clone())],
    );
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, gpus: u32| {
        let spec = job_file(
            dir.path(),
            name,
            &format!(
                r#"
name = "{name}"
[launch]
command = ["sh", "-c", "echo lib=$TRAINCTL_NCCL_LIBRARY"]
[resources]
nodes = 1
procs_per_node = 1
gpus_per_node = {gpus}
"#
            ),
        );
        let id = cluster.submit(&spec);
        cluster.wait_state(&id, "succeeded", Duration::from_secs(60));
        let logs = cluster.logs(&id);
        logs.lines()
            .find_map(|l| l.split_once("lib=").map(|(_, v)| v.to_owned()))
            .unwrap_or_else(|| panic!("{name}: no lib= line in {logs}"))
    };
    assert_eq!(job("gpu", 1), lib.to_str().unwrap());
    assert_eq!(job("cpu", 0), relative);
}
