//! Rendezvous failures a user meets, and the messages they get.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{cfg, free_port};
use trainctl_collective::{Collective, CollectiveError, MasterListener, TcpRing};

const SHORT: Duration = Duration::from_millis(500);

#[test]
fn invalid_configs_are_rejected_before_any_socket() {
    let cases = [
        (
            cfg(0, 0, "127.0.0.1", 1, SHORT),
            "bad world size 0: expected 1..=16384",
        ),
        (
            cfg(0, 20_000, "127.0.0.1", 1, SHORT),
            "bad world size 20000: expected 1..=16384",
        ),
        (
            cfg(3, 3, "127.0.0.1", 1, SHORT),
            "rank 3 does not exist in a world of size 3 (ranks are 0..=2)",
        ),
    ];
    for (c, want) in cases {
        let err = TcpRing::connect(c).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::InvalidWorldSize { .. } | CollectiveError::InvalidRank { .. }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), want);
    }
}

#[test]
fn world_of_one_needs_no_sockets_and_every_collective_is_local() {
    // The port is taken: a world of one must not even try to listen on it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut ring = TcpRing::connect(cfg(0, 1, "127.0.0.1", port, SHORT)).unwrap();
    assert_eq!((ring.rank(), ring.world_size()), (0, 1));
    let mut buf = [1.5f32, -2.0];
    ring.all_reduce_sum_f32(&mut buf).unwrap();
    ring.broadcast_f32(&mut buf, 0).unwrap();
    ring.barrier().unwrap();
    assert_eq!(buf, [1.5, -2.0]);
    let err = ring.broadcast_f32(&mut buf, 1).unwrap_err();
    assert!(matches!(
        err,
        CollectiveError::InvalidRoot {
            root: 1,
            world_size: 1
        }
    ));
}

#[test]
fn rendezvous_timeout_names_the_missing_ranks_on_every_rank_that_joined() {
    let listener = MasterListener::bind(cfg(0, 4, "127.0.0.2", 0, SHORT)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let joiners: Vec<_> = [1u32, 3]
        .into_iter()
        .map(|rank| {
            let c = cfg(rank, 4, "127.0.0.2", port, SHORT);
            thread::spawn(move || TcpRing::connect(c).unwrap_err())
        })
        .collect();
    let err = listener.accept_ring().unwrap_err();
    let want = format!(
        "rendezvous at 127.0.0.2:{port} timed out after 500ms: 3 of 4 ranks joined (missing: 2)"
    );
    assert_eq!(err.to_string(), want);
    assert!(
        matches!(&err, CollectiveError::RendezvousTimeout { joined: 3, world_size: 4, missing, .. } if missing == &[2])
    );
    for j in joiners {
        let err = j.join().unwrap();
        assert_eq!(
            err.to_string(),
            want,
            "a joined rank reports rank 0's verdict"
        );
    }
}

#[test]
fn a_rank_whose_rank_0_never_starts_times_out_naming_the_address() {
    let port = free_port();
    let started = Instant::now();
    let err = TcpRing::connect(cfg(1, 2, "127.0.0.1", port, SHORT)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, CollectiveError::MasterUnreachable { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    let want =
        format!("rendezvous at 127.0.0.1:{port} timed out after 500ms: could not reach rank 0");
    assert!(msg.starts_with(&want), "{msg}");
    assert!(msg.contains("MASTER_ADDR and MASTER_PORT"), "{msg}");
}

#[test]
fn ranks_that_start_before_rank_0_wait_for_it() {
    let port = free_port();
    let early: Vec<_> = (1..3u32)
        .map(|rank| {
            let c = cfg(rank, 3, "127.0.0.1", port, Duration::from_secs(20));
            thread::spawn(move || {
                let mut ring = TcpRing::connect(c).unwrap();
                let mut x = [1.0f32];
                ring.all_reduce_sum_f32(&mut x).unwrap();
                x[0]
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut ring = TcpRing::connect(cfg(0, 3, "127.0.0.1", port, Duration::from_secs(20))).unwrap();
    let mut x = [1.0f32];
    ring.all_reduce_sum_f32(&mut x).unwrap();
    assert_eq!(x[0], 3.0);
    for h in early {
        assert_eq!(h.join().unwrap(), 3.0);
    }
}

#[test]
fn world_size_mismatch_is_reported_on_both_sides() {
    let listener = MasterListener::bind(cfg(0, 2, "127.0.0.1", 0, SHORT * 10)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let joiner = thread::spawn(move || {
        TcpRing::connect(cfg(1, 3, "127.0.0.1", port, SHORT * 10)).unwrap_err()
    });
    let errs = [listener.accept_ring().unwrap_err(), joiner.join().unwrap()];
    for err in errs {
        assert!(
            matches!(
                err,
                CollectiveError::WorldSizeMismatch {
                    expected: 2,
                    rank: 1,
                    got: 3
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "world size mismatch: rank 0 was started with world size 2 but rank 1 with 3; every rank must get the same WORLD_SIZE"
        );
    }
}

#[test]
fn two_processes_claiming_one_rank_are_refused() {
    let listener = MasterListener::bind(cfg(0, 3, "127.0.0.1", 0, SHORT * 10)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let joiners: Vec<_> = (0..2)
        .map(|_| {
            let c = cfg(1, 3, "127.0.0.1", port, SHORT * 10);
            thread::spawn(move || TcpRing::connect(c).unwrap_err())
        })
        .collect();
    let err = listener.accept_ring().unwrap_err();
    assert!(
        matches!(err, CollectiveError::DuplicateRank { rank: 1 }),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("every process needs a distinct RANK"));
    for j in joiners {
        let err = j.join().unwrap();
        assert!(
            matches!(err, CollectiveError::DuplicateRank { rank: 1 }),
            "{err:?}"
        );
    }
}

#[test]
fn a_taken_master_port_is_named_in_the_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = TcpRing::connect(cfg(0, 2, "127.0.0.1", port, SHORT)).unwrap_err();
    assert!(
        matches!(err, CollectiveError::AddressInUse { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("port {port} is already in use")),
        "{msg}"
    );
}

#[test]
fn a_foreign_program_on_the_master_port_is_a_protocol_mismatch() {
    let listener = MasterListener::bind(cfg(0, 2, "127.0.0.1", 0, SHORT * 10)).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut intruder = TcpStream::connect(addr).unwrap();
    intruder
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let err = listener.accept_ring().unwrap_err();
    assert!(
        matches!(err, CollectiveError::ProtocolMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("expected a trainctl collective message"),
        "{msg}"
    );
}

#[test]
fn only_rank_0_binds_the_master_listener() {
    let err = MasterListener::bind(cfg(1, 2, "127.0.0.1", 0, SHORT)).unwrap_err();
    assert!(err.to_string().contains("only rank 0 listens"), "{err}");
}
