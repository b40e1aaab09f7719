//! `trainctl store --listen ADDR`: the TCPStore server on its own, a drop-in for a store hosted
//! by rank 0 or by another launcher (`TCPStore(host, port, is_master=False)` connects to it).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use trainctl_store::{StoreConfig, StoreServer};

use crate::{shutdown_on_signals, Output};

/// Raises this process's open-file limit to its hard limit (each store connection is a
/// descriptor; the soft limit is often 1 024). Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// Serves until SIGINT or SIGTERM.
pub async fn serve(
    listen: &str,
    max_mib: u64,
    max_connections: usize,
    threads: usize,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?}: expected IP:PORT, e.g. 0.0.0.0:29500"))?;
    let open_files = raise_open_files_limit();
    let config = StoreConfig {
        max_bytes: max_mib.saturating_mul(1024 * 1024),
        max_connections,
        ..StoreConfig::default()
    };
    let server = StoreServer::bind(addr, config)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    let local = server.local_addr();
    let s = if threads == 1 { "" } else { "s" };
    match output {
        Output::Json => outln!(
            "{}",
            serde_json::json!({ "address": local.to_string(), "port": local.port(), "threads": threads })
        ),
        Output::Human => outln!(
            "store: serving PyTorch's TCPStore protocol on {local} (up to {max_connections} connections, {max_mib} MiB, {threads} event loop{s}; open-file limit {open_files}); Ctrl-C stops it"
        ),
    }
    if (open_files as usize) < max_connections {
        errln!(
            "warning: the open-file limit is {open_files}, fewer than --max-connections {max_connections}: raise it (ulimit -n)"
        );
    }
    let mut stop = shutdown_on_signals()?;
    let _ = stop.wait_for(|s| *s).await;
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
