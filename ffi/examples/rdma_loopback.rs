//! An RDMA write with immediate from a queue pair to itself on one port, through trainctl-ffi:
//! lists the host's RDMA devices and ports, then runs `verbs::loopback_write` on every ACTIVE port
//! (or on the one named).
//!
//! ```text
//! cargo build --release -p trainctl-ffi --example rdma_loopback
//! target/release/examples/rdma_loopback [device [port [gid-index]]]
//! ```
//! Exits 0 when every tried port passed (or the host has no RDMA device, which it says), 1 when
//! one failed.

use std::process::ExitCode;

use trainctl_ffi::verbs::{self, PortState, Verbs};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verbs = match Verbs::open() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("rdma_loopback: {e}");
            return ExitCode::FAILURE;
        }
    };
    let devices = match verbs.devices() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rdma_loopback: {e}");
            return ExitCode::FAILURE;
        }
    };
    if devices.is_empty() {
        let why = if devices.kernel_has_rdma() {
            "no RDMA device"
        } else {
            "no RDMA support in the kernel (ENOSYS)"
        };
        println!("rdma_loopback: {why} on this host; nothing to check");
        return ExitCode::SUCCESS;
    }
    let only_port: Option<u8> = args.get(1).and_then(|p| p.parse().ok());
    let gid_index: Option<u32> = args.get(2).and_then(|g| g.parse().ok());
    let mut failed = false;
    for entry in devices
        .iter()
        .filter(|d| args.first().is_none_or(|name| *name == d.name))
    {
        let ctx = match devices.open(entry.index) {
            Ok(c) => c,
            Err(e) => {
                println!("{}: {e}", entry.name);
                failed = true;
                continue;
            }
        };
        let ports = ctx.query_device().map(|a| a.port_count).unwrap_or(0);
        for port in (1..=ports).filter(|p| only_port.is_none_or(|o| o == *p)) {
            let Ok(attrs) = ctx.query_port(port) else {
                continue;
            };
            let gids = ctx.gid_table(port).unwrap_or_default();
            println!(
                "{} port {port}: {:?} {:?} {:?} Gb/s, MTU {:?}, LID {}, {} GIDs",
                entry.name,
                attrs.state,
                attrs.link_layer,
                attrs.rate_gbps,
                attrs.active_mtu,
                attrs.lid,
                gids.len()
            );
            for g in &gids {
                println!("  gid {} {} {:?}", g.index, g.gid, g.gid_type);
            }
            if attrs.state != PortState::Active {
                continue;
            }
            // RoCE v2 where there is one (what NCCL uses), else the first GID.
            let index = gid_index
                .or_else(|| {
                    gids.iter()
                        .find(|g| g.gid_type == Some(verbs::GidType::RoceV2))
                        .map(|g| g.index)
                })
                .or_else(|| gids.first().map(|g| g.index))
                .unwrap_or(0);
            match verbs::loopback_write(&verbs, &entry.name, port, index, 1 << 20) {
                Ok(r) => println!(
                    "  loopback write ok: {} bytes via gid {} in {:?}",
                    r.bytes, r.gid_index, r.elapsed
                ),
                Err(e) => {
                    println!("  loopback write FAILED via gid {index}: {e}");
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
