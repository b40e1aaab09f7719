//! Test helpers: the ranks of a real rendezvous as threads of the test process, on loopback,
//! through either path (rank 0's listener, or a `trainctl_store` server as the agent serves it).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use trainctl_store::{StoreConfig, StoreServer};

use crate::{MasterListener, RendezvousConfig, TcpRing};

/// Rendezvous timeout of the helpers.
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long all ranks together may take before the test counts as deadlocked.
pub(crate) const DEADLOCK: Duration = Duration::from_secs(120);

/// How the ranks meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Rank 0 listens (`TORCHELASTIC_USE_AGENT_STORE` unset).
    RankZero,
    /// Through a TCPStore, as under trainctl's agent.
    Store,
}

fn cfg(rank: u32, world: u32, port: u16, use_agent_store: bool) -> RendezvousConfig {
    RendezvousConfig {
        rank,
        world_size: world,
        master_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        master_port: port,
        bind_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        timeout: JOIN_TIMEOUT,
        use_agent_store,
    }
}

/// Runs `f(rank, ring)` on every rank of a `world`-rank rendezvous by `path`, each on its own
/// thread, and returns the results by rank; panics on a deadlock.
pub(crate) fn run_ranks<T: Send + 'static>(
    world: u32,
    path: Path,
    f: impl Fn(TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    // The store, if any, lives on its own runtime until every rank is done.
    let mut store = None;
    let (port, use_store, listener) = match path {
        Path::RankZero => {
            let listener = MasterListener::bind(cfg(0, world, 0, false)).expect("rank 0 binds");
            let port = listener.local_addr().expect("address").port();
            (port, false, Some(listener))
        }
        Path::Store => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let server = rt
                .block_on(StoreServer::bind(
                    "127.0.0.1:0".parse().expect("address"),
                    StoreConfig::default(),
                ))
                .expect("store binds");
            let port = server.local_addr().port();
            store = Some((rt, server));
            (port, true, None)
        }
    };
    let (tx, rx) = mpsc::channel();
    let mut listener = listener;
    for rank in 0..world {
        let (tx, f) = (tx.clone(), f.clone());
        let own_listener = if rank == 0 { listener.take() } else { None };
        thread::spawn(move || {
            let ring = match own_listener {
                Some(l) => l.accept_ring(),
                None => TcpRing::connect(cfg(rank, world, port, use_store)),
            }
            .expect("rendezvous");
            let _ = tx.send((rank, f(ring)));
        });
    }
    drop(tx);
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (rank, value) = rx.recv_timeout(DEADLOCK).expect("every rank finishes");
        results[rank as usize] = Some(value);
    }
    if let Some((rt, server)) = store {
        rt.block_on(server.shutdown());
    }
    results.into_iter().map(|r| r.expect("a result")).collect()
}

/// NCCL's `libnccl.so.2` from the venv that `scripts/python-env.sh` makes (the
/// `nvidia-nccl-cu13` wheel), if it is there.
pub(crate) fn venv_nccl() -> Option<PathBuf> {
    trainctl_ffi::nccl::wheel_library(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

/// Says why a test stops early, on stderr past libtest's capture.
pub(crate) fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}
