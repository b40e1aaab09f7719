//! Collectives over real TCP rings of 1 to 5 ranks, each rank a thread of this test.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{run_ranks, run_ranks_on};
use trainctl_collective::{Collective, CollectiveError, TcpRing};

/// Integer-valued contribution of `rank` at `index`: sums stay exact in f32.
fn int_value(rank: u32, index: usize) -> f32 {
    ((index * 7 + rank as usize * 13) % 1000) as f32 - 500.0
}

/// Lengths that exercise empty chunks, uneven chunks and many elements.
fn lengths(world: u32) -> Vec<usize> {
    let w = world as usize;
    vec![0, 1, w.saturating_sub(1), w, w + 1, 1000, 1001, 4099]
}

#[test]
fn all_reduce_gives_the_exact_sum_of_integer_valued_floats() {
    for world in 1..=5u32 {
        let got = run_ranks(world, move |mut ring: TcpRing| {
            let rank = ring.rank();
            let mut out = Vec::new();
            for len in lengths(world) {
                let mut buf: Vec<f32> = (0..len).map(|i| int_value(rank, i)).collect();
                ring.all_reduce_sum_f32(&mut buf).unwrap();
                out.push(buf);
            }
            out
        });
        for (rank, bufs) in got.iter().enumerate() {
            for (len, buf) in lengths(world).into_iter().zip(bufs) {
                let want: Vec<f32> = (0..len)
                    .map(|i| (0..world).map(|r| int_value(r, i)).sum())
                    .collect();
                assert_eq!(buf, &want, "world {world} rank {rank} len {len}");
            }
        }
    }
}

/// Floats spanning many magnitudes, so that the summation order changes the bits.
fn random_values(rank: u32, len: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(rank);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mantissa = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            mantissa * 10f32.powi(((state >> 8) % 12) as i32 - 6)
        })
        .collect()
}

fn reduce_random(world: u32, len: usize) -> Vec<Vec<u32>> {
    run_ranks(world, move |mut ring: TcpRing| {
        let mut buf = random_values(ring.rank(), len);
        ring.all_reduce_sum_f32(&mut buf).unwrap();
        buf.iter().map(|x| x.to_bits()).collect()
    })
}

#[test]
fn all_reduce_gives_identical_bits_on_every_rank_and_every_run() {
    // Below and above 1 MiB: the copying and the lending all-reduce.
    for (world, len) in (2..=5u32).flat_map(|w| [(w, 10_007), (w, 300_007)]) {
        let first = reduce_random(world, len);
        for rank in 1..world as usize {
            assert!(
                first[rank] == first[0],
                "world {world}: rank {rank} differs from rank 0"
            );
        }
        let second = reduce_random(world, len);
        assert!(
            second == first,
            "world {world}: second run differs from the first"
        );
        // And the result is the sum, up to rounding.
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| random_values(r, len)).collect();
        for i in (0..len).step_by(97) {
            let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
            let got = f64::from(f32::from_bits(first[0][i]));
            let scale: f64 = inputs.iter().map(|v| f64::from(v[i]).abs()).sum();
            assert!(
                (got - exact).abs() <= 1e-6 * scale,
                "world {world} index {i}: {got} vs {exact}"
            );
        }
    }
}

#[test]
fn large_buffers_do_not_deadlock() {
    const LEN: usize = 8 * 1024 * 1024 / 4; // 8 MiB of f32
    for world in [2u32, 4] {
        let sums = run_ranks(world, move |mut ring: TcpRing| {
            let rank = ring.rank();
            let mut buf: Vec<f32> = (0..LEN).map(|i| int_value(rank, i)).collect();
            ring.all_reduce_sum_f32(&mut buf).unwrap();
            let mut bcast: Vec<f32> = if rank == 1 {
                buf.clone()
            } else {
                vec![0.0; LEN]
            };
            ring.broadcast_f32(&mut bcast, 1).unwrap();
            (buf == bcast, buf[LEN - 1], buf[12345])
        });
        for (rank, (same, last, mid)) in sums.into_iter().enumerate() {
            assert!(
                same,
                "world {world} rank {rank}: broadcast differs from the all_reduce result"
            );
            assert_eq!(last, (0..world).map(|r| int_value(r, LEN - 1)).sum::<f32>());
            assert_eq!(mid, (0..world).map(|r| int_value(r, 12345)).sum::<f32>());
        }
    }
}

#[test]
fn broadcast_copies_the_roots_buffer_from_every_root() {
    for world in 1..=5u32 {
        let got = run_ranks(world, move |mut ring: TcpRing| {
            let rank = ring.rank();
            let mut out = Vec::new();
            for root in 0..world {
                for len in [0usize, 1, 3, 300_000] {
                    let mut buf: Vec<f32> = (0..len).map(|i| int_value(rank, i)).collect();
                    ring.broadcast_f32(&mut buf, root).unwrap();
                    out.push((root, len, buf));
                }
            }
            out
        });
        for (rank, runs) in got.iter().enumerate() {
            for (root, len, buf) in runs {
                let want: Vec<f32> = (0..*len).map(|i| int_value(*root, i)).collect();
                assert!(
                    buf == &want,
                    "world {world} rank {rank} root {root} len {len}"
                );
            }
        }
    }
}

#[test]
fn broadcast_rejects_a_root_outside_the_world_without_breaking_the_ring() {
    run_ranks(2, |mut ring: TcpRing| {
        let err = ring.broadcast_f32(&mut [1.0], 2).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::InvalidRoot {
                    root: 2,
                    world_size: 2
                }
            ),
            "{err}"
        );
        ring.barrier().unwrap();
    });
}

#[test]
fn barrier_returns_only_after_every_rank_arrived() {
    for world in [1u32, 2, 3, 5] {
        let times = run_ranks(world, |mut ring: TcpRing| {
            thread::sleep(Duration::from_millis(40 * u64::from(ring.rank())));
            let arrived = Instant::now();
            ring.barrier().unwrap();
            (arrived, Instant::now())
        });
        let last_arrival = times.iter().map(|t| t.0).max().unwrap();
        for (rank, (_, left)) in times.iter().enumerate() {
            assert!(
                *left >= last_arrival,
                "world {world}: rank {rank} left the barrier early"
            );
        }
    }
}

#[test]
fn mismatched_collectives_fail_instead_of_mixing_data() {
    // Rank 1 calls barrier while rank 0 calls all_reduce.
    let errs = run_ranks(2, |mut ring: TcpRing| {
        let err = if ring.rank() == 0 {
            ring.all_reduce_sum_f32(&mut [1.0; 4]).unwrap_err()
        } else {
            ring.barrier().unwrap_err()
        };
        let later = ring.barrier().unwrap_err();
        (err, later)
    });
    match &errs[0].0 {
        CollectiveError::OpMismatch {
            rank: 0,
            peer: 1,
            ours,
            theirs,
        } => {
            assert_eq!(ours, "all_reduce_sum_f32 #1 (len 4)");
            assert_eq!(theirs, "barrier #1");
        }
        other => panic!("rank 0: expected OpMismatch, got {other}"),
    }
    for (rank, (_, later)) in errs.iter().enumerate() {
        assert!(
            matches!(later, CollectiveError::Broken { .. }),
            "rank {rank}: {later}"
        );
    }

    // Rank 2 passes a longer buffer than the others.
    let errs = run_ranks(3, |mut ring: TcpRing| {
        let len = if ring.rank() == 2 { 5 } else { 4 };
        ring.all_reduce_sum_f32(&mut vec![1.0; len]).unwrap_err()
    });
    match &errs[0] {
        CollectiveError::OpMismatch {
            peer: 2, theirs, ..
        } => {
            assert_eq!(theirs, "all_reduce_sum_f32 #1 (len 5)")
        }
        other => panic!("rank 0: expected OpMismatch with rank 2, got {other}"),
    }
    let msg = errs[0].to_string();
    assert!(
        msg.contains("every rank must call the same collectives"),
        "{msg}"
    );
}

#[test]
fn a_rank_that_exits_is_reported_by_its_neighbours_instead_of_hanging() {
    let errs = run_ranks(3, |mut ring: TcpRing| {
        if ring.rank() == 2 {
            drop(ring);
            return None;
        }
        let err = ring
            .all_reduce_sum_f32(&mut vec![1.0; 100_000])
            .unwrap_err();
        let later = ring.barrier().unwrap_err();
        assert!(matches!(later, CollectiveError::Broken { .. }), "{later}");
        Some(err)
    });
    match errs[0].as_ref().unwrap() {
        CollectiveError::PeerLost { rank: 2, .. } => {}
        other => panic!("rank 0: expected PeerLost from rank 2, got {other}"),
    }
    let msg = errs[0].as_ref().unwrap().to_string();
    assert!(msg.contains("lost the connection to rank 2"), "{msg}");
    assert!(errs[1].is_some());
}

#[test]
fn op_timeout_reports_the_silent_neighbour() {
    let errs = run_ranks(2, |mut ring: TcpRing| {
        if ring.rank() == 0 {
            ring.set_op_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            Some(ring.barrier().unwrap_err())
        } else {
            thread::sleep(Duration::from_millis(1000));
            drop(ring);
            None
        }
    });
    match errs[0].as_ref().unwrap() {
        CollectiveError::PeerTimeout {
            rank: 1, timeout, ..
        } => {
            assert_eq!(*timeout, Duration::from_millis(200))
        }
        other => panic!("expected PeerTimeout from rank 1, got {other}"),
    }
}

#[test]
fn ranks_on_different_loopback_addresses_form_a_ring() {
    let binds = ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"];
    let got = run_ranks_on("127.0.0.2", &binds, |mut ring: TcpRing| {
        let mut buf = vec![ring.rank() as f32 + 1.0; 33];
        ring.all_reduce_sum_f32(&mut buf).unwrap();
        buf
    });
    for buf in got {
        assert_eq!(buf, vec![10.0; 33]);
    }
}

#[test]
fn ranks_listening_on_all_interfaces_advertise_a_reachable_address() {
    let binds = ["0.0.0.0"; 3];
    let got = run_ranks_on("127.0.0.1", &binds, |mut ring: TcpRing| {
        let mut buf = vec![1.0f32; 5];
        ring.all_reduce_sum_f32(&mut buf).unwrap();
        buf
    });
    assert!(got.iter().all(|b| b == &vec![3.0; 5]));
}

#[test]
fn many_small_operations_in_a_row_stay_in_step() {
    let start = Arc::new(Barrier::new(4));
    let got = run_ranks(4, move |mut ring: TcpRing| {
        start.wait();
        let mut total = 0.0f32;
        for i in 0..300 {
            let mut x = [ring.rank() as f32 + i as f32];
            ring.all_reduce_sum_f32(&mut x).unwrap();
            if i % 50 == 0 {
                ring.barrier().unwrap();
            }
            total += x[0];
        }
        total
    });
    let want: f32 = (0..300).map(|i| 6.0 + 4.0 * i as f32).sum();
    assert!(got.iter().all(|t| *t == want), "{got:?} vs {want}");
}

/// Values near the ends of the i64 range, so that partial sums wrap.
fn i64_value(rank: u32, index: usize) -> i64 {
    let x = (index as i64 * 7919 + i64::from(rank) * 104_729) % 1000 - 500;
    if index.is_multiple_of(3) {
        i64::MAX.wrapping_sub(x)
    } else {
        x * 1_000_000_007
    }
}

#[test]
fn all_reduce_i64_gives_the_exact_wrapping_sum_at_every_world_size() {
    for world in 1..=5u32 {
        let got = run_ranks(world, move |mut ring: TcpRing| {
            let rank = ring.rank();
            let mut out = Vec::new();
            for len in lengths(world) {
                let mut buf: Vec<i64> = (0..len).map(|i| i64_value(rank, i)).collect();
                ring.all_reduce_sum_i64(&mut buf).unwrap();
                // An i64 all-reduce interleaves with the f32 ones.
                let mut f = [1.0f32];
                ring.all_reduce_sum_f32(&mut f).unwrap();
                assert_eq!(f[0], world as f32);
                out.push(buf);
            }
            out
        });
        for (rank, bufs) in got.iter().enumerate() {
            for (len, buf) in lengths(world).into_iter().zip(bufs) {
                let want: Vec<i64> = (0..len)
                    .map(|i| (0..world).fold(0i64, |s, r| s.wrapping_add(i64_value(r, i))))
                    .collect();
                assert_eq!(buf, &want, "world {world} rank {rank} len {len}");
            }
        }
    }
}

#[test]
fn an_i64_all_reduce_against_an_f32_one_is_a_mismatch() {
    let errs = run_ranks(2, |mut ring: TcpRing| {
        if ring.rank() == 0 {
            ring.all_reduce_sum_i64(&mut [1, 2])
                .unwrap_err()
                .to_string()
        } else {
            ring.all_reduce_sum_f32(&mut [1.0, 2.0])
                .unwrap_err()
                .to_string()
        }
    });
    assert!(errs[0].contains("all_reduce_sum_f32"), "{}", errs[0]);
    assert!(errs[1].contains("all_reduce_sum_i64"), "{}", errs[1]);
}
