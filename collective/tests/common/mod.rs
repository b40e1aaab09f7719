//! Starting several ranks as threads of one test process, on loopback addresses.

#![allow(dead_code)]

use std::net::{IpAddr, TcpListener};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use trainctl_collective::{MasterListener, RendezvousConfig, TcpRing};

/// Rendezvous timeout for tests that expect everyone to show up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole multi-rank test may take before it is declared deadlocked.
pub const WATCHDOG: Duration = Duration::from_secs(120);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn cfg(
    rank: u32,
    world_size: u32,
    master: &str,
    port: u16,
    timeout: Duration,
) -> RendezvousConfig {
    RendezvousConfig {
        rank,
        world_size,
        master_addr: ip(master),
        master_port: port,
        bind_addr: ip(master),
        timeout,
        use_agent_store: false,
    }
}

/// A port that was free a moment ago (for tests where rank 0 must start after the others).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `f` on every rank of a `world`-rank ring on 127.0.0.1 and returns the results by rank.
pub fn run_ranks<T, F>(world: u32, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(TcpRing) -> T + Send + Sync + 'static,
{
    let binds = vec!["127.0.0.1"; world as usize];
    run_ranks_on("127.0.0.1", &binds, f)
}

/// Like [`run_ranks`], with rank 0 listening on `master` and rank `r` binding its data listener on
/// `binds[r]`. Fails the test, instead of hanging, if the ranks do not finish within [`WATCHDOG`].
pub fn run_ranks_on<T, F>(master: &str, binds: &[&str], f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(TcpRing) -> T + Send + Sync + 'static,
{
    let world = binds.len() as u32;
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    let mut rank0 = cfg(0, world, master, 0, JOIN_TIMEOUT);
    rank0.bind_addr = ip(binds[0]);
    let listener = MasterListener::bind(rank0).expect("rank 0 binds");
    let port = listener.local_addr().unwrap().port();
    let mut handles = Vec::new();
    {
        let (f, tx) = (f.clone(), tx.clone());
        handles.push(thread::spawn(move || {
            let ring = listener.accept_ring().expect("rank 0 rendezvous");
            let _ = tx.send((0u32, f(ring)));
        }));
    }
    for rank in 1..world {
        let mut c = cfg(rank, world, master, port, JOIN_TIMEOUT);
        c.bind_addr = ip(binds[rank as usize]);
        let (f, tx) = (f.clone(), tx.clone());
        handles.push(thread::spawn(move || {
            let ring =
                TcpRing::connect(c).unwrap_or_else(|e| panic!("rank {rank} rendezvous: {e}"));
            let _ = tx.send((rank, f(ring)));
        }));
    }
    drop(tx);
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        match rx.recv_timeout(WATCHDOG) {
            Ok((rank, value)) => results[rank as usize] = Some(value),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("ranks did not finish within {WATCHDOG:?}: deadlock?")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        if let Err(panic) = h.join() {
            std::panic::resume_unwind(panic);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every rank reported"))
        .collect()
}
