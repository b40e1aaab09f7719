use std::time::Duration;

use trainctl_ffi::cuda::CopyReport;
use trainctl_ffi::nccl::check::AllReduceReport;

use super::probes::{judge_all_reduce, judge_copy, mapped_file};
use super::*;
use crate::discovery::{RdmaDevice, RdmaGid, RdmaPort};

fn result(name: &str, subject: &str, outcome: Outcome) -> CheckResult {
    CheckResult {
        name: name.to_string(),
        subject: subject.to_string(),
        outcome,
        duration_ms: 1,
        figure: None,
    }
}

fn failed(reason: &str) -> Outcome {
    Outcome::Failed {
        reason: reason.to_string(),
    }
}

fn skipped(reason: &str) -> Outcome {
    Outcome::Skipped {
        reason: reason.to_string(),
    }
}

fn gpu(uuid: &str, ecc: &str, pending: bool, uncorrectable: u64) -> GpuInfo {
    GpuInfo {
        index: uuid.len() as u32 % 8,
        name: "NVIDIA H200".into(),
        uuid: uuid.into(),
        ecc_mode: ecc.into(),
        retired_pages_pending: pending,
        uncorrectable_ecc_errors: uncorrectable,
        ..GpuInfo::default()
    }
}

fn port(n: u32, state: &str, layer: &str, gids: &[(u32, &str)]) -> RdmaPort {
    RdmaPort {
        port: n,
        state: state.into(),
        link_layer: layer.into(),
        rate: "400 Gb/sec (4X NDR)".into(),
        gid_count: gids.len() as u32,
        netdev: String::new(),
        gids: gids
            .iter()
            .map(|(index, kind)| RdmaGid {
                index: *index,
                gid: "fe80:0000:0000:0000:0000:0000:0000:0001".into(),
                kind: (*kind).into(),
            })
            .collect(),
    }
}

fn facts(gpus: Vec<GpuInfo>, rdma: Vec<RdmaDevice>) -> HostFacts {
    HostFacts {
        hostname: "h".into(),
        cpus: 8,
        memory_mib: 1024,
        gpus,
        rdma_devices: rdma,
        advertised_interface: String::new(),
    }
}

fn device(name: &str, ports: Vec<RdmaPort>) -> RdmaDevice {
    RdmaDevice {
        name: name.into(),
        ports,
        pci_bus_id: String::new(),
        numa_node: None,
    }
}

#[test]
fn a_host_is_unhealthy_exactly_when_a_check_failed() {
    let cases: Vec<(&str, Vec<CheckResult>, Option<&str>)> = vec![
        ("nothing ran", vec![], None),
        (
            "all skipped",
            vec![
                result(CHECK_GPU_COPY, "host", skipped("no GPU on this host")),
                result(CHECK_RDMA_PORT, "host", skipped("no RDMA device")),
            ],
            None,
        ),
        (
            "passed and skipped",
            vec![
                result(CHECK_GPU_COPY, "GPU-a", Outcome::Passed),
                result(CHECK_NCCL, "host", skipped("NCCL is not installed")),
            ],
            None,
        ),
        (
            "one failure",
            vec![
                result(CHECK_GPU_COPY, "GPU-a", Outcome::Passed),
                result(CHECK_RDMA_PORT, "mlx5_0 port 1", failed("the port is DOWN")),
            ],
            Some("rdma-port-active on mlx5_0 port 1: the port is DOWN"),
        ),
        (
            "two failures in order",
            vec![
                result(CHECK_GPU_HEALTH, "GPU-a", failed("pending")),
                result(CHECK_GPU_COPY, "GPU-b", failed("slow")),
            ],
            Some("gpu-health on GPU-a: pending; gpu-copy on GPU-b: slow"),
        ),
        (
            "more than three: counted",
            (0..5)
                .map(|i| result(CHECK_GPU_COPY, &format!("GPU-{i}"), failed("x")))
                .collect(),
            Some("gpu-copy on GPU-0: x; gpu-copy on GPU-1: x; gpu-copy on GPU-2: x; and 2 more failed"),
        ),
    ];
    for (what, results, reason) in cases {
        let health = assess(&results);
        assert_eq!(health.healthy, reason.is_none(), "{what}");
        assert_eq!(health.reason.as_deref(), reason, "{what}");
    }
}

#[test]
fn a_long_reason_is_cut_at_a_char_boundary() {
    let long = "é".repeat(2 * REASON_BYTES_MAX);
    let health = assess(&[result(CHECK_GPU_COPY, "GPU-a", failed(&long))]);
    let reason = health.reason.unwrap();
    assert!(reason.len() <= REASON_BYTES_MAX, "{}", reason.len());
    assert!(reason.ends_with("..."));
}

#[test]
fn newer_results_replace_older_ones_of_the_same_check_and_subject() {
    let older = vec![
        result(CHECK_GPU_COPY, "GPU-a", failed("slow")),
        result(CHECK_GPU_COPY, "GPU-b", Outcome::Passed),
        result(CHECK_RDMA_PORT, "mlx5_0 port 1", Outcome::Passed),
    ];
    let cases: Vec<(&str, Vec<CheckResult>, bool)> = vec![
        ("nothing new keeps the failure", vec![], false),
        (
            "a job's check of GPU-a passes: healthy again",
            vec![result(CHECK_GPU_COPY, "GPU-a", Outcome::Passed)],
            true,
        ),
        (
            "a job's check of GPU-b only: GPU-a's failure stays",
            vec![result(CHECK_GPU_COPY, "GPU-b", Outcome::Passed)],
            false,
        ),
    ];
    for (what, newer, healthy) in cases {
        let merged = merge(&older, &newer);
        assert_eq!(merged.len(), 3, "{what}");
        assert_eq!(assess(&merged).healthy, healthy, "{what}");
    }
}

/// A whole-host scope whose claimed ports are those of `devices` that are ACTIVE.
fn host_scope(devices: &[RdmaDevice]) -> Scope {
    Scope::Host {
        busy_gpus: BTreeSet::new(),
        ports: ports::claim(
            devices,
            &ports::PortOptions::default(),
            ports::ClaimedAt::AgentStart,
        )
        .unwrap(),
    }
}

/// (check, subject, word, reason or probe) of each planned check.
fn summary(planned: &[Planned]) -> Vec<(String, String, String)> {
    planned
        .iter()
        .map(|p| {
            let what = match &p.work {
                Work::Decided(o, _) => format!("{} {}", o.word(), o.reason().unwrap_or_default()),
                Work::Probe(probe) => format!("probe {probe:?}"),
            };
            (
                p.name.to_string(),
                p.subject.clone(),
                what.trim().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_plan_skips_what_the_host_lacks_and_probes_the_rest() {
    let ib = device("mlx5_0", vec![port(1, "ACTIVE", "InfiniBand", &[])]);
    let roce = device(
        "mlx5_1",
        vec![
            port(
                1,
                "ACTIVE",
                "Ethernet",
                &[(0, "IB/RoCE v1"), (3, "RoCE v2")],
            ),
            port(2, "DOWN", "Ethernet", &[]),
        ],
    );
    let host = host_scope(&[]);
    // The agent started with mlx5_1 port 2 ACTIVE: it is claimed, and DOWN now.
    let started_with_both = {
        let mut up = roce.clone();
        up.ports[1].state = "ACTIVE".into();
        Scope::Host {
            busy_gpus: BTreeSet::new(),
            ports: ports::claim(
                &[ib.clone(), up],
                &ports::PortOptions::default(),
                ports::ClaimedAt::AgentStart,
            )
            .unwrap(),
        }
    };
    let started_with_these = Scope::Host {
        busy_gpus: BTreeSet::new(),
        ports: ports::claim(
            &[ib.clone(), roce.clone()],
            &ports::PortOptions::default(),
            ports::ClaimedAt::AgentStart,
        )
        .unwrap(),
    };
    type Case<'a> = (&'a str, HostFacts, Scope, Vec<(&'a str, &'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "a host with nothing: every check skipped with its reason",
            facts(vec![], vec![]),
            host.clone(),
            vec![
                (CHECK_GPU_HEALTH, "host", "skipped no GPU on this host"),
                (CHECK_GPU_COPY, "host", "skipped no GPU on this host"),
                (CHECK_RDMA_PORT, "host", "skipped no RDMA device on this host"),
                (CHECK_RDMA_LOOPBACK, "host", "skipped no RDMA device on this host"),
                (CHECK_NCCL, "host", "skipped no GPU on this host"),
            ],
        ),
        (
            "declared GPUs are not probed",
            {
                let mut f = facts(vec![], vec![]);
                crate::discovery::apply_declared_gpus(&mut f, 2);
                f
            },
            host.clone(),
            vec![
                (CHECK_GPU_HEALTH, "host", "skipped the GPUs are declared (--gpus N), not discovered: nothing to probe"),
                (CHECK_GPU_COPY, "host", "skipped the GPUs are declared (--gpus N), not discovered: nothing to probe"),
                (CHECK_RDMA_PORT, "host", "skipped no RDMA device on this host"),
                (CHECK_RDMA_LOOPBACK, "host", "skipped no RDMA device on this host"),
                (CHECK_NCCL, "host", "skipped the GPUs are declared (--gpus N), not discovered: nothing to probe"),
            ],
        ),
        (
            "GPUs and ports: health from the facts, probes for the rest, a claimed port DOWN now fails",
            facts(
                vec![gpu("GPU-a", "enabled", false, 0), gpu("GPU-b", "enabled", true, 0)],
                vec![ib.clone(), roce.clone()],
            ),
            started_with_both,
            vec![
                (CHECK_GPU_HEALTH, "GPU-a", "passed"),
                (CHECK_GPU_HEALTH, "GPU-b", "failed NVML reports retired pages pending: reset the GPU (nvidia-smi -r) or reload the driver"),
                (CHECK_GPU_COPY, "GPU-a", "probe GpuCopy { uuid: \"GPU-a\" }"),
                (CHECK_GPU_COPY, "GPU-b", "probe GpuCopy { uuid: \"GPU-b\" }"),
                (CHECK_RDMA_PORT, "mlx5_0 port 1", "passed"),
                (CHECK_RDMA_PORT, "mlx5_1 port 1", "passed"),
                (CHECK_RDMA_PORT, "mlx5_1 port 2", "failed the port is DOWN, not ACTIVE (cable, switch port or subnet manager)"),
                (CHECK_RDMA_LOOPBACK, "mlx5_0 port 1", "probe RdmaLoopback { device: \"mlx5_0\", port: 1, gid_index: 0 }"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 1", "probe RdmaLoopback { device: \"mlx5_1\", port: 1, gid_index: 3 }"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 2", "skipped the port is not ACTIVE (see rdma-port-active)"),
                (CHECK_NCCL, "host", "probe NcclAllReduce { uuids: [\"GPU-a\", \"GPU-b\"] }"),
            ],
        ),
        (
            "a port DOWN since the agent started is not claimed: reported, not failed, not written to",
            facts(vec![], vec![ib.clone(), roce.clone()]),
            started_with_these,
            vec![
                (CHECK_GPU_HEALTH, "host", "skipped no GPU on this host"),
                (CHECK_GPU_COPY, "host", "skipped no GPU on this host"),
                (CHECK_RDMA_PORT, "mlx5_0 port 1", "passed"),
                (CHECK_RDMA_PORT, "mlx5_1 port 1", "passed"),
                (CHECK_RDMA_PORT, "mlx5_1 port 2", "skipped not claimed: was not ACTIVE at agent start; name it in --rdma-ports to require it"),
                (CHECK_RDMA_LOOPBACK, "mlx5_0 port 1", "probe RdmaLoopback { device: \"mlx5_0\", port: 1, gid_index: 0 }"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 1", "probe RdmaLoopback { device: \"mlx5_1\", port: 1, gid_index: 3 }"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 2", "skipped not claimed: was not ACTIVE at agent start; name it in --rdma-ports to require it"),
                (CHECK_NCCL, "host", "skipped no GPU on this host"),
            ],
        ),
        (
            "a claimed port whose device is gone fails; an ignored ACTIVE port is neither checked nor written to",
            facts(vec![], vec![roce.clone()]),
            Scope::Host {
                busy_gpus: BTreeSet::new(),
                ports: ports::claim(
                    &[ib.clone(), roce.clone()],
                    &ports::PortOptions::parse(None, Some("mlx5_1:1")).unwrap(),
                    ports::ClaimedAt::AgentStart,
                )
                .unwrap(),
            },
            vec![
                (CHECK_GPU_HEALTH, "host", "skipped no GPU on this host"),
                (CHECK_GPU_COPY, "host", "skipped no GPU on this host"),
                (CHECK_RDMA_PORT, "mlx5_1 port 1", "skipped not claimed: excluded by --rdma-ignore mlx5_1:1"),
                (CHECK_RDMA_PORT, "mlx5_1 port 2", "skipped not claimed: was not ACTIVE at agent start; name it in --rdma-ports to require it"),
                (CHECK_RDMA_PORT, "mlx5_0 port 1", "failed the claimed port is gone: its device is no longer in /sys/class/infiniband (fell off the bus, or its driver unloaded)"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 1", "skipped not claimed: excluded by --rdma-ignore mlx5_1:1"),
                (CHECK_RDMA_LOOPBACK, "mlx5_1 port 2", "skipped not claimed: was not ACTIVE at agent start; name it in --rdma-ports to require it"),
                (CHECK_RDMA_LOOPBACK, "mlx5_0 port 1", "skipped the port is gone (see rdma-port-active)"),
                (CHECK_NCCL, "host", "skipped no GPU on this host"),
            ],
        ),
        (
            "busy GPUs are not copied to, and NCCL waits",
            facts(vec![gpu("GPU-a", "enabled", false, 0), gpu("GPU-b", "", false, 0)], vec![]),
            Scope::Host { busy_gpus: ["GPU-a".to_string()].into(), ports: ports::PortClaim::none(ports::ClaimedAt::AgentStart) },
            vec![
                (CHECK_GPU_HEALTH, "GPU-a", "passed"),
                (CHECK_GPU_HEALTH, "GPU-b", "skipped NVML did not report this GPU (only the CUDA driver listed it)"),
                (CHECK_GPU_COPY, "GPU-a", "skipped in use by a job (checked before the job's ranks started)"),
                (CHECK_GPU_COPY, "GPU-b", "probe GpuCopy { uuid: \"GPU-b\" }"),
                (CHECK_RDMA_PORT, "host", "skipped no RDMA device on this host"),
                (CHECK_RDMA_LOOPBACK, "host", "skipped no RDMA device on this host"),
                (CHECK_NCCL, "host", "skipped GPUs are in use by jobs: the all-reduce would disturb them"),
            ],
        ),
        (
            "before a job: the GPU checks of its GPUs only",
            facts(
                vec![gpu("GPU-a", "enabled", false, 2), gpu("GPU-b", "enabled", false, 0)],
                vec![ib],
            ),
            Scope::Gpus(vec!["GPU-a".into()]),
            vec![
                (CHECK_GPU_HEALTH, "GPU-a", "failed NVML counts 2 uncorrectable ECC errors since the driver loaded (at most 0 allowed): reset the GPU"),
                (CHECK_GPU_COPY, "GPU-a", "probe GpuCopy { uuid: \"GPU-a\" }"),
            ],
        ),
        (
            "a MIG-enabled GPU is not probed (CUDA lists its instances, not it); NCCL uses the rest",
            facts(
                vec![
                    GpuInfo { mig_mode: "enabled".into(), ..gpu("GPU-m", "enabled", false, 0) },
                    gpu("GPU-a", "enabled", false, 0),
                ],
                vec![],
            ),
            host.clone(),
            vec![
                (CHECK_GPU_HEALTH, "GPU-m", "passed"),
                (CHECK_GPU_HEALTH, "GPU-a", "passed"),
                (CHECK_GPU_COPY, "GPU-m", "skipped MIG is enabled: the CUDA driver lists its instances, not the whole GPU, so it is not probed"),
                (CHECK_GPU_COPY, "GPU-a", "probe GpuCopy { uuid: \"GPU-a\" }"),
                (CHECK_RDMA_PORT, "host", "skipped no RDMA device on this host"),
                (CHECK_RDMA_LOOPBACK, "host", "skipped no RDMA device on this host"),
                (CHECK_NCCL, "host", "probe NcclAllReduce { uuids: [\"GPU-a\"] }"),
            ],
        ),
        (
            "every GPU MIG-enabled: no NCCL probe",
            facts(
                vec![GpuInfo { mig_mode: "enabled".into(), ..gpu("GPU-m", "enabled", false, 0) }],
                vec![],
            ),
            host.clone(),
            vec![
                (CHECK_GPU_HEALTH, "GPU-m", "passed"),
                (CHECK_GPU_COPY, "GPU-m", "skipped MIG is enabled: the CUDA driver lists its instances, not the whole GPU, so it is not probed"),
                (CHECK_RDMA_PORT, "host", "skipped no RDMA device on this host"),
                (CHECK_RDMA_LOOPBACK, "host", "skipped no RDMA device on this host"),
                (CHECK_NCCL, "host", "skipped MIG is enabled: the CUDA driver lists its instances, not the whole GPU, so it is not probed"),
            ],
        ),
        (
            "before a job whose GPUs discovery does not know",
            facts(vec![gpu("GPU-a", "enabled", false, 0)], vec![]),
            Scope::Gpus(vec!["GPU-z".into()]),
            vec![
                (CHECK_GPU_HEALTH, "host", "skipped the job has no GPU on this host that discovery knows"),
                (CHECK_GPU_COPY, "host", "skipped the job has no GPU on this host that discovery knows"),
            ],
        ),
    ];
    for (what, facts, scope, want) in cases {
        let got = summary(&plan(&facts, &scope));
        let want: Vec<(String, String, String)> = want
            .into_iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn a_gpu_the_cuda_driver_does_not_list_fails_unless_the_agent_hides_it() {
    // (GPUs the driver lists, the agent's own CUDA_VISIBLE_DEVICES, expected word, reason words)
    let cases: [(&[&str], Option<&str>, &str, &str); 4] = [
        (
            &["GPU-a"],
            None,
            "failed",
            "does not list this GPU (it lists GPU-a): off the bus",
        ),
        (&[], None, "failed", "(it lists none)"),
        // The agent runs with CUDA_VISIBLE_DEVICES set: NVML sees every GPU, CUDA only those.
        (
            &["GPU-a"],
            Some("0"),
            "skipped",
            "hidden from this process by its CUDA_VISIBLE_DEVICES=\"0\"",
        ),
        (
            &[],
            Some(""),
            "skipped",
            "CUDA_VISIBLE_DEVICES=\"\" (the CUDA driver lists none)",
        ),
    ];
    for (listed, visible, word, words) in cases {
        let outcome = super::probes::unlisted_gpu(listed, visible);
        assert_eq!(outcome.word(), word, "{listed:?} {visible:?}");
        let reason = outcome.reason().unwrap();
        assert!(reason.contains(words), "{reason:?} lacks {words:?}");
    }
}

#[test]
fn loopback_gid_prefers_roce_v2_on_ethernet() {
    let cases = [
        (port(1, "ACTIVE", "InfiniBand", &[]), Some(0)),
        (
            port(
                1,
                "ACTIVE",
                "Ethernet",
                &[(0, "IB/RoCE v1"), (1, "RoCE v2")],
            ),
            Some(1),
        ),
        (port(1, "ACTIVE", "Ethernet", &[(2, "IB/RoCE v1")]), Some(2)),
        (port(1, "ACTIVE", "Ethernet", &[]), None),
    ];
    for (p, want) in cases {
        assert_eq!(loopback_gid_index(&p), want, "{p:?}");
    }
}

#[test]
fn injection_parses_triggers_and_refuses_unknown_names() {
    let ok = [
        ("", vec![]),
        ("gpu-copy", vec![(None, "gpu-copy")]),
        (
            "job:gpu-copy, start:rdma-port-active,any:nccl-all-reduce",
            vec![
                (Some(Trigger::Job), "gpu-copy"),
                (Some(Trigger::Start), "rdma-port-active"),
                (None, "nccl-all-reduce"),
            ],
        ),
    ];
    for (value, want) in ok {
        let got = Injection::parse(value).unwrap();
        let want: Vec<(Option<Trigger>, String)> =
            want.into_iter().map(|(t, c)| (t, c.to_string())).collect();
        assert_eq!(got.fail, want, "{value}");
    }
    let scoped = Injection::parse("node-2@job:gpu-copy,rdma-loopback").unwrap();
    assert_eq!(
        scoped.for_node("node-1").fail,
        vec![(None, "rdma-loopback".to_string())]
    );
    assert_eq!(
        scoped.for_node("node-2").fail,
        vec![
            (None, "rdma-loopback".to_string()),
            (Some(Trigger::Job), "gpu-copy".to_string())
        ]
    );
    let bad = [
        ("gpu-cpy", "unknown check `gpu-cpy`"),
        ("later:gpu-copy", "unknown trigger `later`"),
        ("@gpu-copy", "an empty node name before `@`"),
        ("node-1@gpu", "unknown check `gpu`"),
    ];
    for (value, problem) in bad {
        let err = Injection::parse(value).unwrap_err();
        assert_eq!(err.problem, problem, "{value}");
        let text = err.to_string();
        assert!(
            text.contains(FAIL_ENV) && text.contains("gpu-health, gpu-copy"),
            "{text}"
        );
    }
}

#[test]
fn an_injected_check_fails_only_for_its_trigger() {
    let injection = Injection::parse("job:gpu-copy").unwrap();
    let base = vec![
        result(CHECK_GPU_COPY, "host", skipped("declared")),
        result(CHECK_GPU_HEALTH, "host", skipped("declared")),
    ];
    for (trigger, healthy) in [
        (Trigger::Start, true),
        (Trigger::Periodic, true),
        (Trigger::Job, false),
    ] {
        let mut results = base.clone();
        injection.apply(trigger, &mut results);
        let health = assess(&results);
        assert_eq!(health.healthy, healthy, "{trigger:?}");
        if !healthy {
            let reason = health.reason.unwrap();
            assert!(
                reason.starts_with("gpu-copy on host: injected by TRAINCTL_PREFLIGHT_FAIL"),
                "{reason}"
            );
            assert!(
                reason.contains("the check itself skipped: declared"),
                "{reason}"
            );
        }
    }
}

fn copy(h2d: f64, d2h: f64, d2d: f64) -> CopyReport {
    CopyReport {
        ordinal: 0,
        bytes: GPU_COPY_BYTES,
        iterations: GPU_COPY_ITERATIONS,
        h2d_gb_per_s: h2d,
        d2h_gb_per_s: d2h,
        d2d_gb_per_s: d2d,
        elapsed: Duration::from_millis(300),
    }
}

#[test]
fn copy_rates_are_judged_against_the_thresholds() {
    let cases = [
        ("H200 on PCIe 5", copy(50.0, 50.0, 1800.0), None),
        ("T4 on PCIe 3", copy(11.0, 12.0, 120.0), None),
        (
            "link trained to x1",
            copy(0.9, 0.8, 1800.0),
            Some(
                "host-to-device 0.9 GB/s is below 3 GB/s, device-to-host 0.8 GB/s is below 3 GB/s",
            ),
        ),
        (
            "memory clock stuck",
            copy(25.0, 25.0, 12.0),
            Some("device-to-device 12.0 GB/s is below 50 GB/s"),
        ),
    ];
    for (what, report, slow) in cases {
        let (outcome, figure) = judge_copy(&report);
        match slow {
            None => assert_eq!(outcome, Outcome::Passed, "{what}"),
            Some(s) => assert!(
                outcome.reason().unwrap().starts_with(s),
                "{what}: {outcome:?}"
            ),
        }
        assert!(figure.unwrap().contains("GB/s"), "{what}");
    }
}

#[test]
fn all_reduce_bus_bandwidth_is_judged_for_two_gpus_or_more() {
    let report = |gpus: usize, busbw: f64| AllReduceReport {
        devices: (0..gpus as i32).collect(),
        bytes: NCCL_ELEMENTS * 4,
        iterations: NCCL_ITERATIONS,
        time_per_iteration: Duration::from_millis(2),
        algorithm_gb_per_s: busbw,
        bus_gb_per_s: busbw,
    };
    let cases = [
        ("one GPU: no bus", report(1, 0.0), true),
        ("8 NVLink GPUs", report(8, 350.0), true),
        ("2 PCIe GPUs", report(2, 12.0), true),
        ("2 GPUs without P2P", report(2, 2.5), false),
    ];
    for (what, r, passes) in cases {
        let (outcome, figure) = judge_all_reduce(&r);
        assert_eq!(outcome == Outcome::Passed, passes, "{what}: {outcome:?}");
        assert!(figure.unwrap().contains("busbw"), "{what}");
    }
}

#[test]
fn job_gpus_accepts_uuids_and_indexes() {
    let mut f = facts(
        vec![
            gpu("GPU-a", "enabled", false, 0),
            gpu("GPU-bb", "enabled", false, 0),
        ],
        vec![],
    );
    f.gpus[0].index = 0;
    f.gpus[1].index = 1;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec![""], vec![]),
        (vec!["1"], vec!["GPU-bb"]),
        (vec!["GPU-a,GPU-bb", "GPU-a"], vec!["GPU-a", "GPU-bb"]),
        (vec!["7,GPU-zz"], vec![]),
    ];
    for (lists, want) in cases {
        assert_eq!(job_gpus(&f, lists.iter().copied()), want, "{lists:?}");
    }
}

#[test]
fn the_mapped_library_file_names_its_version() {
    let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.44.0\n\
                7f04-7f05 rw-p 00000000 00:00 0\n";
    assert_eq!(
        mapped_file(maps, "libibverbs.so").as_deref(),
        Some("libibverbs.so.1.14.44.0")
    );
    assert_eq!(mapped_file(maps, "libnccl.so"), None);
}

#[test]
fn a_stuck_call_is_abandoned_at_its_deadline() {
    let started = std::time::Instant::now();
    let got = bounded(Duration::from_millis(100), || {
        std::thread::sleep(Duration::from_secs(30));
    });
    assert_eq!(got, Err(Duration::from_millis(100)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(bounded(Duration::from_secs(5), || 7), Ok(7));
}

/// On this host (no GPU, no RDMA device) a real run skips every check, with a reason, quickly.
#[test]
fn a_run_on_a_host_without_hardware_skips_everything() {
    let host = facts(vec![], vec![]);
    let report = run(
        &host,
        &host_scope(&[]),
        Trigger::Command,
        &Injection::default(),
        &libraries::LibraryPaths::default(),
        RUN_BUDGET,
    );
    assert!(report.health.healthy);
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, CHECK_NAMES);
    for c in &report.checks {
        assert_eq!(c.outcome.word(), "skipped", "{c:?}");
        assert!(!c.outcome.reason().unwrap().is_empty());
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["checks"][0]["result"], "skipped");
    assert_eq!(json["checks"][0]["reason"], "no GPU on this host");
    let back: Report = serde_json::from_value(json).unwrap();
    assert_eq!(back, report);
}

fn sel(device: &str, port: Option<u32>) -> ports::PortSelector {
    ports::PortSelector {
        device: device.into(),
        port,
    }
}

#[test]
fn port_options_parse_device_and_device_port_entries_and_name_a_bad_one() {
    use ports::{PortOptionError, PortOptions};
    let accepted = ports::ACCEPTED_FORM;
    // (--rdma-ports, --rdma-ignore, Ok(ports, ignore) or Err(message))
    type Want = Result<(Option<Vec<ports::PortSelector>>, Vec<ports::PortSelector>), String>;
    let cases: Vec<(Option<&str>, Option<&str>, Want)> = vec![
        (None, None, Ok((None, vec![]))),
        (
            Some("mlx5_0:1, mlx5_1:1,,mlx5_0:1"),
            Some("mlx5_2"),
            Ok((
                Some(vec![sel("mlx5_0", Some(1)), sel("mlx5_1", Some(1))]),
                vec![sel("mlx5_2", None)],
            )),
        ),
        (
            Some("ibp59s0-x"),
            Some(""),
            Ok((Some(vec![sel("ibp59s0-x", None)]), vec![])),
        ),
        (
            Some(" , "),
            None,
            Err(PortOptionError::Empty.to_string()),
        ),
        (
            Some("mlx5_0:x"),
            None,
            Err(format!("--rdma-ports: `mlx5_0:x` has `x` where a port number belongs; accepted: {accepted}")),
        ),
        (
            None,
            Some("mlx5_0:0"),
            Err(format!("--rdma-ignore: `mlx5_0:0` names port 0: ports are numbered from 1; accepted: {accepted}")),
        ),
        (
            Some(":1"),
            None,
            Err(format!("--rdma-ports: `:1` has no device name before `:`; accepted: {accepted}")),
        ),
        (
            Some("mlx5_0:"),
            None,
            Err(format!("--rdma-ports: `mlx5_0:` has no port number after `:`; accepted: {accepted}")),
        ),
        (
            None,
            Some("mlx5_0 port 1"),
            Err(format!("--rdma-ignore: `mlx5_0 port 1` has a device name with characters other than letters, digits, `_` and `-`; accepted: {accepted}")),
        ),
        (
            Some("mlx5_0:1:2"),
            None,
            Err(format!("--rdma-ports: `mlx5_0:1:2` has `1:2` where a port number belongs; accepted: {accepted}")),
        ),
    ];
    for (ports_value, ignore_value, want) in cases {
        let got = PortOptions::parse(ports_value, ignore_value)
            .map(|o| (o.ports, o.ignore))
            .map_err(|e| e.to_string());
        assert_eq!(got, want, "{ports_value:?} / {ignore_value:?}");
    }
}

#[test]
fn the_claimed_ports_are_the_active_ones_at_start_or_exactly_those_named_less_the_ignored() {
    use ports::{claim, ClaimedAt, PortOptions};
    // A dual-port card with port 2 never cabled, and a storage NIC.
    let devices = vec![
        device(
            "mlx5_0",
            vec![
                port(1, "ACTIVE", "InfiniBand", &[]),
                port(2, "DOWN", "InfiniBand", &[]),
            ],
        ),
        device("mlx5_1", vec![port(1, "ACTIVE", "Ethernet", &[])]),
    ];
    let existing = "mlx5_0:1 (ACTIVE), mlx5_0:2 (DOWN), mlx5_1:1 (ACTIVE)";
    // (--rdma-ports, --rdma-ignore, Ok(claimed) or Err(message))
    type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<&'a str, String>);
    let cases: Vec<Case> = vec![
        (None, None, Ok("mlx5_0:1, mlx5_1:1")),
        (None, Some("mlx5_1"), Ok("mlx5_0:1")),
        (None, Some("mlx5_0:1,mlx5_1:1"), Ok("none")),
        (Some("mlx5_0:1,mlx5_0:2"), None, Ok("mlx5_0:1, mlx5_0:2")),
        (Some("mlx5_0"), None, Ok("mlx5_0:1, mlx5_0:2")),
        (Some("mlx5_0"), Some("mlx5_0:2"), Ok("mlx5_0:1")),
        (
            Some("mlx5_0:3"),
            None,
            Err(format!("--rdma-ports: `mlx5_0:3` names no RDMA port of this host; its ports are: {existing}")),
        ),
        (
            Some("mlx5_0:1,mlx5_9"),
            None,
            Err(format!("--rdma-ports: `mlx5_9` names no RDMA port of this host; its ports are: {existing}")),
        ),
        (
            Some("mlx5_0:2"),
            Some("mlx5_0"),
            Err("--rdma-ports: `mlx5_0:2` is entirely excluded by --rdma-ignore `mlx5_0`: drop one of them".to_string()),
        ),
    ];
    for (ports_value, ignore_value, want) in cases {
        let options = PortOptions::parse(ports_value, ignore_value).unwrap();
        let got = claim(&devices, &options, ClaimedAt::AgentStart)
            .map(|c| c.claimed_list())
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            want.map(str::to_string),
            "{ports_value:?} / {ignore_value:?}"
        );
    }
    let none = claim(
        &[],
        &PortOptions::parse(Some("mlx5_0:1"), None).unwrap(),
        ClaimedAt::Now,
    );
    assert_eq!(
        none.unwrap_err().to_string(),
        "--rdma-ports: `mlx5_0:1` names no RDMA port of this host; its ports are: none (no RDMA device)"
    );
    let stray = claim(
        &devices,
        &PortOptions::parse(None, Some("mlx5_7,mlx5_0:2")).unwrap(),
        ClaimedAt::AgentStart,
    )
    .unwrap();
    assert_eq!(
        stray.warnings(),
        vec!["--rdma-ignore: `mlx5_7` matches no RDMA port of this host".to_string()]
    );
}

#[test]
fn each_port_is_up_down_gone_or_unclaimed_with_its_reason() {
    use ports::{claim, judge, ClaimedAt, PortOptions, PortStatus, Unclaimed};
    let at_start = vec![
        device(
            "mlx5_0",
            vec![
                port(1, "ACTIVE", "InfiniBand", &[]),
                port(2, "DOWN", "InfiniBand", &[]),
            ],
        ),
        device("mlx5_1", vec![port(1, "ACTIVE", "Ethernet", &[])]),
    ];
    let now_down = vec![
        device(
            "mlx5_0",
            vec![
                port(1, "DOWN", "InfiniBand", &[]),
                port(2, "DOWN", "InfiniBand", &[]),
            ],
        ),
        device("mlx5_1", vec![port(1, "ACTIVE", "Ethernet", &[])]),
        device("mlx5_2", vec![port(1, "INIT", "InfiniBand", &[])]),
    ];
    let gone = vec![device("mlx5_1", vec![port(1, "ACTIVE", "Ethernet", &[])])];
    let up = PortStatus::Up;
    let down = |s: &str| PortStatus::Down { state: s.into() };
    let unclaimed = PortStatus::Unclaimed;
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        ClaimedAt,
        &'a [RdmaDevice],
        Vec<(&'a str, PortStatus)>,
    );
    let cases: Vec<Case> = vec![
        (
            "unchanged since start",
            None,
            None,
            ClaimedAt::AgentStart,
            &at_start,
            vec![
                ("mlx5_0 port 1", up.clone()),
                ("mlx5_0 port 2", unclaimed(Unclaimed::NotActiveAtStart)),
                ("mlx5_1 port 1", up.clone()),
            ],
        ),
        (
            "a claimed port went down; a port appeared after start",
            None,
            None,
            ClaimedAt::AgentStart,
            &now_down,
            vec![
                ("mlx5_0 port 1", down("DOWN")),
                ("mlx5_0 port 2", unclaimed(Unclaimed::NotActiveAtStart)),
                ("mlx5_1 port 1", up.clone()),
                ("mlx5_2 port 1", unclaimed(Unclaimed::AppearedAfterStart)),
            ],
        ),
        (
            "a claimed device is gone",
            None,
            None,
            ClaimedAt::AgentStart,
            &gone,
            vec![
                ("mlx5_1 port 1", up.clone()),
                ("mlx5_0 port 1", PortStatus::Gone),
            ],
        ),
        (
            "named ports: a DOWN one is required, the others are not named",
            Some("mlx5_0:2"),
            None,
            ClaimedAt::AgentStart,
            &at_start,
            vec![
                ("mlx5_0 port 1", unclaimed(Unclaimed::NotNamed)),
                ("mlx5_0 port 2", down("DOWN")),
                ("mlx5_1 port 1", unclaimed(Unclaimed::NotNamed)),
            ],
        ),
        (
            "ignored",
            None,
            Some("mlx5_1"),
            ClaimedAt::AgentStart,
            &at_start,
            vec![
                ("mlx5_0 port 1", up.clone()),
                ("mlx5_0 port 2", unclaimed(Unclaimed::NotActiveAtStart)),
                (
                    "mlx5_1 port 1",
                    unclaimed(Unclaimed::Ignored(sel("mlx5_1", None))),
                ),
            ],
        ),
        (
            "trainctl preflight: no history, a port not ACTIVE now is not required",
            None,
            None,
            ClaimedAt::Now,
            &at_start,
            vec![
                ("mlx5_0 port 1", up.clone()),
                ("mlx5_0 port 2", unclaimed(Unclaimed::NotActive)),
                ("mlx5_1 port 1", up.clone()),
            ],
        ),
    ];
    for (what, ports_value, ignore_value, at, now, want) in cases {
        let options = PortOptions::parse(ports_value, ignore_value).unwrap();
        let claim = claim(&at_start, &options, at).unwrap();
        let got: Vec<(String, PortStatus)> = judge(&claim, now)
            .into_iter()
            .map(|v| (v.subject(), v.status))
            .collect();
        let want: Vec<(String, PortStatus)> = want
            .into_iter()
            .map(|(s, st)| (s.to_string(), st))
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn unclaimed_reasons_say_how_to_require_the_port_and_notes_leave_out_ignored_ports() {
    use ports::{claim, judge, unclaimed_down, ClaimedAt, PortOptions, Unclaimed};
    let cases = [
        (
            Unclaimed::Ignored(sel("mlx5_2", Some(1))),
            "not claimed: excluded by --rdma-ignore mlx5_2:1",
        ),
        (
            Unclaimed::NotNamed,
            "not claimed: not named in --rdma-ports",
        ),
        (
            Unclaimed::NotActiveAtStart,
            "not claimed: was not ACTIVE at agent start; name it in --rdma-ports to require it",
        ),
        (
            Unclaimed::AppearedAfterStart,
            "not claimed: appeared after agent start; name it in --rdma-ports to require it",
        ),
        (
            Unclaimed::NotActive,
            "not ACTIVE (name it in --rdma-ports to require it)",
        ),
    ];
    for (why, want) in cases {
        assert_eq!(why.reason(), want);
    }
    let devices = vec![
        device(
            "mlx5_0",
            vec![
                port(1, "ACTIVE", "InfiniBand", &[]),
                port(2, "DOWN", "InfiniBand", &[]),
            ],
        ),
        device("mlx5_2", vec![port(1, "DOWN", "Ethernet", &[])]),
    ];
    let claim = claim(
        &devices,
        &PortOptions::parse(None, Some("mlx5_2")).unwrap(),
        ClaimedAt::Now,
    )
    .unwrap();
    assert_eq!(
        unclaimed_down(&judge(&claim, &devices)),
        vec![
            "mlx5_0 port 2 is DOWN: not ACTIVE (name it in --rdma-ports to require it)".to_string()
        ]
    );
}

#[test]
fn an_unhealthy_host_checks_again_within_a_minute_even_without_periodic_runs() {
    let s = Duration::from_secs;
    // (interval, healthy, next run after)
    let cases = [
        (s(0), true, None),
        (s(300), true, Some(s(300))),
        (s(0), false, Some(RETRY_AFTER_FAILURE)),
        (s(300), false, Some(RETRY_AFTER_FAILURE)),
        (s(10), false, Some(s(10))),
    ];
    for (interval, healthy, want) in cases {
        assert_eq!(
            next_run_after(interval, healthy),
            want,
            "{interval:?} {healthy}"
        );
    }
}
