//! trainctl-ffi's verbs layer against the real `libibverbs.so.1` (Debian `libibverbs1`, which
//! `scripts/test.sh` installs). On a host without an RDMA device the device list is empty; the
//! tests that need a device say so when they skip.

use std::io::Write;
use std::sync::Arc;

/// Says why a test stops early, on stderr directly so that libtest's output capture does not hide
/// it (`cargo test` shows it without `--nocapture`).
macro_rules! skip {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "skipped: {}", format!($($arg)*));
    }};
}

use trainctl_ffi::verbs::{self, PortState, Verbs, VerbsError};

fn open() -> Arc<Verbs> {
    Verbs::open().unwrap_or_else(|e| {
        panic!("{e}\n(scripts/test.sh installs the Debian package libibverbs1; run it, or install it by hand)")
    })
}

#[test]
fn the_device_list_opens_and_is_empty_without_rdma_hardware() {
    let verbs = open();
    assert_eq!(verbs.library(), verbs::LIBRARY_NAME);
    let devices = verbs
        .devices()
        .expect("ibv_get_device_list is not an error without devices");
    let names: Vec<String> = devices.iter().map(|d| d.name).collect();
    assert_eq!(names.len(), devices.len());
    if !devices.is_empty() {
        skip!("the empty-list check: this host has RDMA devices {names:?}");
        return;
    }
    assert!(names.is_empty());
    assert_eq!(format!("{devices:?}"), "[]");
    // Without the kernel's uverbs driver libibverbs answers ENOSYS, reported as an empty list.
    let sysfs = std::path::Path::new("/sys/class/infiniband_verbs").exists();
    assert_eq!(
        devices.kernel_has_rdma(),
        sysfs,
        "kernel RDMA support vs /sys/class/infiniband_verbs"
    );
}

#[test]
fn opening_a_device_that_is_not_there_names_what_exists() {
    let verbs = open();
    let devices = verbs.devices().expect("device list");
    let err = devices
        .open_by_name("mlx5_does_not_exist")
        .expect_err("no such device");
    assert!(matches!(err, VerbsError::InvalidArgument { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("no RDMA device named 'mlx5_does_not_exist'; this host has: "),
        "{err}"
    );
    let err = devices.open(devices.len()).expect_err("index past the end");
    assert!(
        err.to_string()
            .contains(&format!("this host has {} devices", devices.len())),
        "{err}"
    );
}

#[test]
fn every_device_and_port_can_be_queried() {
    let verbs = open();
    let devices = verbs.devices().expect("device list");
    if devices.is_empty() {
        return skip!("no RDMA device on this host (ibv_get_device_list returned 0 devices)");
    }
    for entry in devices.iter() {
        let ctx = devices.open(entry.index).expect("open");
        let attrs = ctx.query_device().expect("query device");
        println!("{}: {attrs:?}", entry.name);
        assert!(attrs.port_count >= 1);
        for port in 1..=attrs.port_count {
            let p = ctx.query_port(port).expect("query port");
            let gids = ctx.gid_table(port).expect("gid table");
            println!(
                "  port {port}: {p:?}; {} GIDs, first {:?}",
                gids.len(),
                gids.first()
            );
        }
    }
}

#[test]
fn rdma_write_with_immediate_to_a_queue_pair_on_the_same_port() {
    let verbs = open();
    let devices = verbs.devices().expect("device list");
    let target = devices.iter().find_map(|entry| {
        let ctx = devices.open(entry.index).ok()?;
        let ports = ctx.query_device().ok()?.port_count;
        (1..=ports).find_map(|port| {
            let attrs = ctx.query_port(port).ok()?;
            let gid = ctx.gid_table(port).ok()?.into_iter().next()?;
            (attrs.state == PortState::Active).then(|| (entry.name.clone(), port, gid.index))
        })
    });
    let Some((device, port, gid_index)) = target else {
        return skip!(
            "no ACTIVE RDMA port on this host ({} devices)",
            devices.len()
        );
    };
    let report =
        verbs::loopback_write(&verbs, &device, port, gid_index, 1 << 20).expect("loopback write");
    println!("{report:?}");
    assert_eq!(report.bytes, 1 << 20);
}
