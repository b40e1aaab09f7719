//! The ring algorithm's arithmetic: how a buffer is cut into chunks and which chunk each rank sends
//! and receives at each step. Pure functions, so the schedule is tested without sockets.

use std::ops::Range;

/// The element range of chunk `index` when `len` elements are cut into `parts` chunks whose sizes
/// differ by at most one (the first `len % parts` chunks get the extra element).
///
/// `parts` must be at least 1 and `index` below `parts`.
pub(crate) fn chunk_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

/// `(send_chunk, recv_chunk)` for `rank` at reduce-scatter step `step` (0-based, `world - 1` steps).
///
/// Chunk `c` starts at rank `c` and travels forward, each rank adding its own values, so after the
/// last step rank `r` holds the complete sum of chunk `(r + 1) % world`: see [`owned_chunk`].
pub(crate) fn reduce_scatter_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    let send = (rank + world - step % world) % world;
    let recv = (rank + 2 * world - step % world - 1) % world;
    (send, recv)
}

/// `(send_chunk, recv_chunk)` for `rank` at all-gather step `step` (0-based, `world - 1` steps).
///
/// Each rank first sends the chunk it owns; a received chunk overwrites the local one bit for bit,
/// so every rank ends with the owner's result.
pub(crate) fn all_gather_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    let send = (owned_chunk(rank, world) + world - step % world) % world;
    let recv = (send + world - 1) % world;
    (send, recv)
}

/// Whether the chunk `rank` receives at reduce-scatter step `step` is the one it sends next: at
/// step `step + 1`, or after the last step the chunk it owns, which all-gather step 0 sends; and
/// likewise, at every all-gather step but the last, the chunk received is the next one sent. The
/// pipelined all-reduce relies on this to pass each segment on as soon as it has it. True for
/// every rank and step of every world size (see the tests); checked in debug builds.
pub(crate) fn next_send_is_this_recv(rank: usize, world: usize, step: usize) -> bool {
    let (_, rs_recv) = reduce_scatter_step(rank, world, step);
    let rs_next = if step + 2 < world {
        reduce_scatter_step(rank, world, step + 1).0
    } else {
        all_gather_step(rank, world, 0).0
    };
    let (_, ag_recv) = all_gather_step(rank, world, step);
    let ag_ok = step + 2 >= world || all_gather_step(rank, world, step + 1).0 == ag_recv;
    rs_recv == rs_next && ag_ok
}

/// The chunk whose complete sum `rank` holds after the reduce-scatter.
pub(crate) fn owned_chunk(rank: usize, world: usize) -> usize {
    (rank + 1) % world
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer_evenly() {
        // (len, parts, expected sizes)
        let cases: &[(usize, usize, &[usize])] = &[
            (0, 1, &[0]),
            (0, 3, &[0, 0, 0]),
            (1, 4, &[1, 0, 0, 0]),
            (3, 4, &[1, 1, 1, 0]),
            (10, 3, &[4, 3, 3]),
            (12, 4, &[3, 3, 3, 3]),
            (7, 1, &[7]),
        ];
        for &(len, parts, sizes) in cases {
            let mut next = 0;
            for (i, &size) in sizes.iter().enumerate() {
                let r = chunk_range(len, parts, i);
                assert_eq!(r.start, next, "len {len} parts {parts} chunk {i}");
                assert_eq!(r.len(), size, "len {len} parts {parts} chunk {i}");
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }

    /// Runs the schedule on symbolic values: each chunk is the list of ranks whose contribution it
    /// holds, in the order they were added. Checks that every rank ends with every contribution
    /// exactly once and with the same order, the property that makes results bit-identical.
    #[test]
    fn schedule_sums_every_contribution_once_and_gathers_the_owners_copy() {
        for world in 1..=7 {
            let mut chunks: Vec<Vec<Vec<usize>>> =
                (0..world).map(|r| vec![vec![r]; world]).collect();
            for step in 0..world - 1 {
                let sent: Vec<(usize, Vec<usize>)> = (0..world)
                    .map(|r| {
                        let (send, _) = reduce_scatter_step(r, world, step);
                        (send, chunks[r][send].clone())
                    })
                    .collect();
                for (r, rank_chunks) in chunks.iter_mut().enumerate() {
                    let prev = (r + world - 1) % world;
                    let (_, recv) = reduce_scatter_step(r, world, step);
                    let (chunk, ref incoming) = sent[prev];
                    assert_eq!(chunk, recv, "world {world} step {step} rank {r}");
                    let mut sum = incoming.clone();
                    sum.extend_from_slice(&rank_chunks[recv]);
                    rank_chunks[recv] = sum;
                }
            }
            for (r, rank_chunks) in chunks.iter().enumerate() {
                let mut owned = rank_chunks[owned_chunk(r, world)].clone();
                owned.sort_unstable();
                assert_eq!(
                    owned,
                    (0..world).collect::<Vec<_>>(),
                    "world {world} rank {r}"
                );
            }
            for step in 0..world - 1 {
                let sent: Vec<(usize, Vec<usize>)> = (0..world)
                    .map(|r| {
                        let (send, _) = all_gather_step(r, world, step);
                        (send, chunks[r][send].clone())
                    })
                    .collect();
                for (r, rank_chunks) in chunks.iter_mut().enumerate() {
                    let prev = (r + world - 1) % world;
                    let (_, recv) = all_gather_step(r, world, step);
                    assert_eq!(sent[prev].0, recv, "world {world} step {step} rank {r}");
                    rank_chunks[recv] = sent[prev].1.clone();
                }
            }
            for r in 1..world {
                assert_eq!(
                    chunks[r], chunks[0],
                    "world {world}: rank {r} differs from rank 0"
                );
            }
        }
    }

    #[test]
    fn each_chunk_received_is_the_next_one_sent() {
        for world in 2..=9 {
            for rank in 0..world {
                for step in 0..world - 1 {
                    assert!(
                        next_send_is_this_recv(rank, world, step),
                        "world {world} rank {rank} step {step}"
                    );
                }
            }
        }
        // The reduce-scatter's last chunk received is the owned one, sent first in the all-gather.
        let cases: &[(usize, usize, usize)] =
            &[(0, 2, 1), (1, 2, 0), (0, 4, 1), (3, 4, 0), (2, 5, 3)];
        for &(rank, world, owned) in cases {
            assert_eq!(reduce_scatter_step(rank, world, world - 2).1, owned);
            assert_eq!(all_gather_step(rank, world, 0).0, owned);
        }
    }
}
