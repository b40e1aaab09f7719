//! Rendezvous through the agent's TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`): ranks as threads,
//! the store as an in-process `trainctl_store::StoreServer`, the way the agent of group rank 0
//! serves it.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{cfg, free_port, JOIN_TIMEOUT, WATCHDOG};
use trainctl_collective::{Collective, CollectiveError, MasterListener, RendezvousConfig, TcpRing};
use trainctl_store::{StoreConfig, StoreServer};

const SHORT: Duration = Duration::from_millis(500);

/// A store server on its own runtime, as the agent serves it.
struct Store {
    rt: tokio::runtime::Runtime,
    server: Option<StoreServer>,
}

impl Store {
    fn start() -> Store {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(StoreServer::bind(
                "127.0.0.1:0".parse().unwrap(),
                StoreConfig::default(),
            ))
            .unwrap();
        Store {
            rt,
            server: Some(server),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().local_addr()
    }

    /// A new attempt: the agent empties the workers' keyspace.
    fn reset(&self) {
        self.server.as_ref().unwrap().reset_workers();
    }

    /// Rank `rank`'s configuration for a world of `world`, through this store.
    fn cfg(&self, rank: u32, world: u32, timeout: Duration) -> RendezvousConfig {
        let mut c = cfg(rank, world, "127.0.0.1", self.addr().port(), timeout);
        c.use_agent_store = true;
        c
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }
}

/// Connects every configuration on its own thread (in the order given, `stagger` apart) and
/// returns each one's result in that order, or fails the test if they do not finish within
/// [`WATCHDOG`].
fn connect_all<T: Send + 'static>(
    cfgs: Vec<RendezvousConfig>,
    stagger: Duration,
    then: impl Fn(TcpRing) -> T + Send + Sync + Clone + 'static,
) -> Vec<Result<T, CollectiveError>> {
    let count = cfgs.len();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for (i, c) in cfgs.into_iter().enumerate() {
        let (tx, then) = (tx.clone(), then.clone());
        handles.push(thread::spawn(move || {
            let _ = tx.send((i, TcpRing::connect(c).map(then)));
        }));
        thread::sleep(stagger);
    }
    drop(tx);
    let mut results: Vec<Option<Result<T, CollectiveError>>> = (0..count).map(|_| None).collect();
    for _ in 0..count {
        let (i, r) = rx
            .recv_timeout(WATCHDOG)
            .expect("every rank finishes: deadlock?");
        results[i] = Some(r);
    }
    for h in handles {
        h.join().unwrap();
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// Every rank contributes `rank + 1`; returns the all-reduced sum and a broadcast from the last rank.
fn sum_and_broadcast(mut ring: TcpRing) -> (f32, f32) {
    let mut x = [ring.rank() as f32 + 1.0];
    ring.all_reduce_sum_f32(&mut x).unwrap();
    let mut b = [ring.rank() as f32 * 10.0];
    ring.broadcast_f32(&mut b, ring.world_size() - 1).unwrap();
    ring.barrier().unwrap();
    (x[0], b[0])
}

#[test]
fn ranks_meet_through_the_agents_store_and_all_reduce() {
    let store = Store::start();
    for world in [2u32, 5] {
        store.reset();
        // Rank 0 last: it is a client like the others and binds nothing at the store's port.
        let cfgs = (0..world)
            .rev()
            .map(|r| store.cfg(r, world, JOIN_TIMEOUT))
            .collect();
        let results = connect_all(cfgs, Duration::from_millis(20), sum_and_broadcast);
        let want_sum = (world * (world + 1) / 2) as f32;
        let want_broadcast = (world - 1) as f32 * 10.0;
        for r in results {
            assert_eq!(r.unwrap(), (want_sum, want_broadcast), "world {world}");
        }
    }
}

#[test]
fn ranks_started_before_the_store_wait_for_it() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let early: Vec<_> = (0..2u32)
        .map(|rank| {
            let mut c = cfg(rank, 2, "127.0.0.1", port, JOIN_TIMEOUT);
            c.use_agent_store = true;
            thread::spawn(move || TcpRing::connect(c).map(sum_and_broadcast))
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(StoreServer::bind(addr, StoreConfig::default()))
        .unwrap();
    for h in early {
        assert_eq!(h.join().unwrap().unwrap(), (3.0, 10.0));
    }
    rt.block_on(server.shutdown());
}

#[test]
fn a_duplicate_rank_is_reported_on_every_rank() {
    let store = Store::start();
    let results = connect_all(
        vec![
            store.cfg(0, 3, JOIN_TIMEOUT),
            store.cfg(1, 3, JOIN_TIMEOUT),
            store.cfg(1, 3, JOIN_TIMEOUT),
        ],
        Duration::from_millis(50),
        |_| (),
    );
    for r in results {
        let err = r.unwrap_err();
        assert!(
            matches!(err, CollectiveError::DuplicateRank { rank: 1 }),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .contains("every process needs a distinct RANK"));
    }
}

#[test]
fn a_world_size_mismatch_is_reported_on_every_rank_with_rank_0s_as_expected() {
    let store = Store::start();
    // The other rank believes in a larger world, then a smaller one, than rank 0.
    for (rank0_world, rank1_world) in [(2u32, 3u32), (3, 2)] {
        store.reset();
        let results = connect_all(
            vec![
                store.cfg(0, rank0_world, JOIN_TIMEOUT),
                store.cfg(1, rank1_world, JOIN_TIMEOUT),
            ],
            Duration::from_millis(20),
            |_| (),
        );
        for r in results {
            let err = r.unwrap_err();
            assert!(
                matches!(err, CollectiveError::WorldSizeMismatch { expected, rank: 1, got }
                    if expected == rank0_world && got == rank1_world),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("world size mismatch: rank 0 was started with world size {rank0_world} but rank 1 with {rank1_world}; every rank must get the same WORLD_SIZE")
            );
        }
    }
}

#[test]
fn a_missing_rank_times_out_naming_it_on_every_rank() {
    let store = Store::start();
    let started = Instant::now();
    let results = connect_all(
        [0u32, 1, 3]
            .iter()
            .map(|&r| store.cfg(r, 4, SHORT))
            .collect(),
        Duration::ZERO,
        |_| (),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let want = format!(
        "rendezvous at {} timed out after 500ms: 3 of 4 ranks joined (missing: 2)",
        store.addr()
    );
    for r in results {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, CollectiveError::RendezvousTimeout { joined: 3, world_size: 4, missing, .. } if missing == &[2]),
            "{err:?}"
        );
        assert_eq!(err.to_string(), want);
    }
}

#[test]
fn a_missing_rank_0_times_out_naming_it() {
    let store = Store::start();
    let results = connect_all(
        (1..3u32).map(|r| store.cfg(r, 3, SHORT)).collect(),
        Duration::ZERO,
        |_| (),
    );
    for r in results {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, CollectiveError::RendezvousTimeout { joined: 2, world_size: 3, missing, .. } if missing == &[0]),
            "{err:?}"
        );
    }
}

#[test]
fn each_attempt_needs_a_fresh_keyspace_and_sees_none_of_the_last_ones_keys() {
    let store = Store::start();
    let attempt = |timeout| {
        connect_all(
            (0..3u32).map(|r| store.cfg(r, 3, timeout)).collect(),
            Duration::ZERO,
            sum_and_broadcast,
        )
    };
    for r in attempt(JOIN_TIMEOUT) {
        assert_eq!(r.unwrap(), (6.0, 20.0));
    }
    // Without a reset the first attempt's claims are still there: every rank is a duplicate.
    for r in attempt(SHORT) {
        let err = r.unwrap_err();
        assert!(
            matches!(err, CollectiveError::DuplicateRank { .. }),
            "{err:?}"
        );
    }
    // What the agent does between attempts.
    store.reset();
    for r in attempt(JOIN_TIMEOUT) {
        assert_eq!(r.unwrap(), (6.0, 20.0));
    }
}

#[test]
fn a_store_that_never_starts_is_named_with_the_agent_and_master_port() {
    let port = free_port();
    let mut c = cfg(1, 2, "127.0.0.1", port, SHORT);
    c.use_agent_store = true;
    let started = Instant::now();
    let err = TcpRing::connect(c).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, CollectiveError::StoreUnreachable { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "rendezvous at 127.0.0.1:{port} timed out after 500ms: could not reach the store"
        )),
        "{msg}"
    );
    assert!(msg.contains("TORCHELASTIC_USE_AGENT_STORE=True"), "{msg}");
    assert!(msg.contains("MASTER_ADDR and MASTER_PORT"), "{msg}");
}

#[test]
fn rank_0_does_not_listen_when_the_agent_serves_the_store() {
    // The agent's store holds the port; rank 0 must not try to bind it.
    let store = Store::start();
    let err = MasterListener::bind(store.cfg(0, 2, SHORT)).unwrap_err();
    assert!(err.to_string().contains("agent serves the store"), "{err}");
    // And a port rank 0 could bind is still left alone: a world of one opens no socket.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = cfg(0, 1, "127.0.0.1", taken.local_addr().unwrap().port(), SHORT);
    c.use_agent_store = true;
    assert_eq!(TcpRing::connect(c).unwrap().world_size(), 1);
}
