//! `trainctl preflight`: this host's GPUs, RDMA devices and libraries, and the result of every
//! pre-flight check ([`trainctl_agent::preflight`]), as text or JSON. Exit 0 when no check failed
//! (a host without GPU or RDMA device skips them all and says so), 1 when one failed, 2 for a bad
//! `TRAINCTL_PREFLIGHT_FAIL`, `--rdma-ports` or `--rdma-ignore` (an entry that is not
//! `DEVICE[:PORT]`, or a `--rdma-ports` port this host does not have), or a `--nccl-library` or
//! `--ibverbs-library` file that does not open as that library.
//!
//! The RDMA ports required ACTIVE are those `--rdma-ports` names, else those ACTIVE now
//! ([`trainctl_agent::preflight::ports`]): a port that is not ACTIVE and not named is reported as
//! skipped, with a warning line, and does not change the exit status.

use std::fmt::Write as _;
use std::process::ExitCode;

use trainctl_agent::preflight::libraries::LibraryPaths;
use trainctl_agent::preflight::ports::PortOptions;
use trainctl_agent::preflight::{self, HostReport, Injection, Outcome};

use crate::render::{table, terminal_safe};
use crate::Output;

/// Runs the command with the values of `--rdma-ports`, `--rdma-ignore`, `--nccl-library` and
/// `--ibverbs-library`; blocks for at most the pre-flight's budget.
pub fn command(
    output: Output,
    rdma_ports: Option<&str>,
    rdma_ignore: Option<&str>,
    libraries: &LibraryPaths,
) -> anyhow::Result<ExitCode> {
    let usage = |e: &dyn std::fmt::Display| {
        eprintln!("error: {}", terminal_safe(&e.to_string()));
        Ok(ExitCode::from(2))
    };
    let injection = match Injection::from_env() {
        Ok(i) => i,
        Err(e) => return usage(&e),
    };
    let port_options = match PortOptions::parse(rdma_ports, rdma_ignore) {
        Ok(o) => o,
        Err(e) => return usage(&e),
    };
    if let Err(e) = libraries.open() {
        return usage(&e);
    }
    let report = match preflight::host_report(&injection, &port_options, libraries) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print!("{}", text(&report)),
    }
    Ok(if report.report.health.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The human form of a report: what was found, the libraries, a table of checks, the verdict.
pub fn text(r: &HostReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "host: {}", r.hostname);
    if r.gpus.is_empty() {
        let _ = writeln!(out, "GPUs: none on this host");
    } else {
        let _ = writeln!(out, "GPUs: {}", r.gpus.len());
        for g in &r.gpus {
            let mut facts = vec![g.uuid.clone()];
            if !g.pci_bus_id.is_empty() {
                facts.push(g.pci_bus_id.clone());
            }
            if let Some(n) = g.numa_node {
                facts.push(format!("NUMA {n}"));
            }
            if g.memory_mib > 0 {
                facts.push(format!("{} GiB", g.memory_mib / 1024));
            }
            let _ = writeln!(out, "  {} {} ({})", g.index, g.name, facts.join(", "));
        }
    }
    let ports: Vec<String> = r
        .rdma_devices
        .iter()
        .flat_map(|d| {
            d.ports.iter().map(move |p| {
                format!(
                    "  {} port {} {} {} {}",
                    d.name, p.port, p.state, p.link_layer, p.rate
                )
            })
        })
        .collect();
    if r.rdma_devices.is_empty() {
        let _ = writeln!(out, "RDMA devices: none on this host");
    } else {
        let _ = writeln!(out, "RDMA devices: {}", r.rdma_devices.len());
        for p in ports {
            let _ = writeln!(out, "{}", p.trim_end());
        }
    }
    if !r.rdma_devices.is_empty() {
        let claimed = if r.claimed_ports.is_empty() {
            "none".to_string()
        } else {
            r.claimed_ports.join(", ")
        };
        let _ = writeln!(out, "RDMA ports required ACTIVE: {claimed}");
    }
    let v = &r.versions;
    let _ = writeln!(
        out,
        "libraries: CUDA driver {}, NVIDIA driver {}, NCCL {}, libibverbs {}",
        v.cuda_driver, v.nvidia_driver, v.nccl, v.libibverbs
    );
    let _ = writeln!(out);
    let mut rows = vec![["CHECK", "SUBJECT", "RESULT", "TIME", "DETAIL"]
        .map(String::from)
        .to_vec()];
    for c in &r.report.checks {
        let detail = match (&c.outcome, &c.figure) {
            (Outcome::Passed, Some(f)) => f.clone(),
            (Outcome::Passed, None) => String::new(),
            (o, Some(f)) => format!("{} [{f}]", o.reason().unwrap_or_default()),
            (o, None) => o.reason().unwrap_or_default().to_string(),
        };
        rows.push(vec![
            c.name.clone(),
            c.subject.clone(),
            c.outcome.word().to_string(),
            format!("{} ms", c.duration_ms),
            detail,
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(out);
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let nothing_ran = r
        .report
        .checks
        .iter()
        .all(|c| matches!(c.outcome, Outcome::Skipped { .. }));
    match &r.report.health.reason {
        None if nothing_ran => {
            let what = match (r.gpus.is_empty(), r.rdma_devices.is_empty()) {
                (true, true) => "no GPU and no RDMA device on this host",
                (true, false) => "no GPU on this host",
                (false, true) => "no RDMA device on this host",
                (false, false) => "nothing here could be probed",
            };
            let _ = writeln!(
                out,
                "healthy: {what}, so every check was skipped ({} ms)",
                r.report.duration_ms
            );
        }
        None => {
            let _ = writeln!(
                out,
                "healthy: no check failed ({} ms)",
                r.report.duration_ms
            );
        }
        Some(reason) => {
            let _ = writeln!(out, "unhealthy: {reason}");
        }
    }
    terminal_safe(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainctl_agent::discovery::GpuInfo;
    use trainctl_agent::preflight::{CheckResult, Health, Report, Trigger, Versions};

    fn report(gpus: Vec<GpuInfo>, checks: Vec<CheckResult>) -> HostReport {
        let health = preflight::assess(&checks);
        HostReport {
            hostname: "h1".into(),
            gpus,
            rdma_devices: vec![],
            versions: Versions {
                cuda_driver: "not installed".into(),
                nvidia_driver: "not installed".into(),
                nccl: "2.30.7".into(),
                libibverbs: "libibverbs.so.1.14.44.0".into(),
            },
            claimed_ports: vec![],
            warnings: vec![],
            report: Report {
                trigger: Trigger::Command,
                checks,
                health,
                duration_ms: 3,
            },
        }
    }

    fn check(name: &str, outcome: Outcome, figure: Option<&str>) -> CheckResult {
        CheckResult {
            name: name.into(),
            subject: "host".into(),
            outcome,
            duration_ms: 0,
            figure: figure.map(str::to_string),
        }
    }

    #[test]
    fn the_text_says_what_was_found_and_the_verdict() {
        let skipped = Outcome::Skipped {
            reason: "no GPU on this host".into(),
        };
        let bare = report(vec![], vec![check("gpu-copy", skipped.clone(), None)]);
        let gpu = GpuInfo {
            index: 0,
            name: "NVIDIA H200".into(),
            uuid: "GPU-1".into(),
            memory_mib: 143_771,
            ..GpuInfo::default()
        };
        let failing = report(
            vec![gpu.clone()],
            vec![check(
                "gpu-copy",
                Outcome::Failed {
                    reason: "host-to-device 0.9 GB/s is below 3 GB/s".into(),
                },
                Some("H2D 0.9 GB/s"),
            )],
        );
        let passing = report(
            vec![gpu],
            vec![check("gpu-copy", Outcome::Passed, Some("H2D 50.1 GB/s"))],
        );
        let cases = [
            (
                &bare,
                vec![
                    "GPUs: none on this host",
                    "RDMA devices: none on this host",
                    "CUDA driver not installed, NVIDIA driver not installed, NCCL 2.30.7",
                    "gpu-copy  host     skipped  0 ms  no GPU on this host",
                    "healthy: no GPU and no RDMA device on this host, so every check was skipped",
                ],
            ),
            (
                &failing,
                vec![
                    "  0 NVIDIA H200 (GPU-1, 140 GiB)",
                    "failed  0 ms  host-to-device 0.9 GB/s is below 3 GB/s [H2D 0.9 GB/s]",
                    "unhealthy: gpu-copy on host: host-to-device 0.9 GB/s is below 3 GB/s",
                ],
            ),
            (
                &passing,
                vec!["passed  0 ms  H2D 50.1 GB/s", "healthy: no check failed"],
            ),
        ];
        for (r, want) in cases {
            let text = text(r);
            for line in want {
                assert!(text.contains(line), "missing {line:?} in:\n{text}");
            }
        }
        assert_eq!(
            bare.report.health,
            Health {
                healthy: true,
                reason: None
            }
        );
    }

    #[test]
    fn the_text_names_the_required_ports_and_warns_of_the_others() {
        use trainctl_agent::discovery::{RdmaDevice, RdmaPort};
        let port = |n: u32, state: &str| RdmaPort {
            port: n,
            state: state.into(),
            link_layer: "InfiniBand".into(),
            rate: "400 Gb/sec (4X NDR)".into(),
            gid_count: 0,
            netdev: String::new(),
            gids: vec![],
        };
        let mut r = report(
            vec![],
            vec![
                CheckResult {
                    subject: "mlx5_0 port 1".into(),
                    ..check("rdma-port-active", Outcome::Passed, None)
                },
                CheckResult {
                    subject: "mlx5_0 port 2".into(),
                    ..check(
                        "rdma-port-active",
                        Outcome::Skipped {
                            reason: "not ACTIVE (name it in --rdma-ports to require it)".into(),
                        },
                        None,
                    )
                },
            ],
        );
        r.rdma_devices = vec![RdmaDevice {
            name: "mlx5_0".into(),
            ports: vec![port(1, "ACTIVE"), port(2, "DOWN")],
            pci_bus_id: String::new(),
            numa_node: None,
        }];
        r.claimed_ports = vec!["mlx5_0:1".into()];
        r.warnings = vec![
            "mlx5_0 port 2 is DOWN: not ACTIVE (name it in --rdma-ports to require it)".into(),
        ];
        let shown = text(&r);
        for line in [
            "RDMA ports required ACTIVE: mlx5_0:1",
            "warning: mlx5_0 port 2 is DOWN: not ACTIVE (name it in --rdma-ports to require it)",
            "healthy: no check failed",
        ] {
            assert!(shown.contains(line), "missing {line:?} in:\n{shown}");
        }
        r.claimed_ports.clear();
        assert!(text(&r).contains("RDMA ports required ACTIVE: none"));
    }
}
