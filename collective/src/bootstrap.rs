//! Small byte records exchanged between the ranks over a collective that already works: how the
//! NCCL backend sends rank 0's `UniqueId`, and the RDMA ring its queue pair records, through the
//! TCP ring built by the ordinary rendezvous (the agent's store or rank 0's listener).
//!
//! Both exchanges are one i64 sum all-reduce. Bytes are packed into words, and every word but the
//! sender's is zero: a sum with zeros is exact (wrapping integer addition, unlike a float sum,
//! never changes a bit pattern), so the sum *is* the sent record. An all-gather gives every rank
//! a slot of its own in one vector. Records must have the same length on every rank; the TCP ring
//! refuses an all-reduce whose lengths differ between ranks ([`CollectiveError::OpMismatch`]).

use crate::{Collective, CollectiveError};

/// Bytes per packed word.
const WORD_BYTES: usize = 8;

/// Words needed for `len` bytes.
fn word_count(len: usize) -> usize {
    len.div_ceil(WORD_BYTES)
}

/// `bytes` as little-endian words, the last one padded with zeros.
pub(crate) fn pack(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks(WORD_BYTES)
        .map(|chunk| {
            let mut word = [0u8; WORD_BYTES];
            word[..chunk.len()].copy_from_slice(chunk);
            i64::from_le_bytes(word)
        })
        .collect()
}

/// The first `len` bytes of `words` (the inverse of [`pack`]).
pub(crate) fn unpack(words: &[i64], len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(len);
    bytes
}

/// `root`'s `record` on every rank. Every rank passes a record of the same length; only the
/// root's bytes matter (the others may pass zeros).
pub(crate) fn broadcast_bytes(
    coll: &mut dyn Collective,
    root: u32,
    record: &[u8],
) -> Result<Vec<u8>, CollectiveError> {
    if root >= coll.world_size() {
        return Err(CollectiveError::InvalidRoot {
            root,
            world_size: coll.world_size(),
        });
    }
    let mut words = if coll.rank() == root {
        pack(record)
    } else {
        vec![0; word_count(record.len())]
    };
    coll.all_reduce_sum_i64(&mut words)?;
    Ok(unpack(&words, record.len()))
}

/// Every rank's `record`, by rank. Every rank passes a record of the same length.
pub(crate) fn all_gather_bytes(
    coll: &mut dyn Collective,
    record: &[u8],
) -> Result<Vec<Vec<u8>>, CollectiveError> {
    let per_rank = word_count(record.len());
    let world = coll.world_size() as usize;
    let rank = coll.rank() as usize;
    let mut words = vec![0i64; per_rank * world];
    words[rank * per_rank..(rank + 1) * per_rank].copy_from_slice(&pack(record));
    coll.all_reduce_sum_i64(&mut words)?;
    Ok(words
        .chunks(per_rank.max(1))
        .take(world)
        .map(|slot| unpack(slot, record.len()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip_every_length() {
        for len in [0, 1, 7, 8, 9, 56, 128, 131] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 255) as u8).collect();
            let words = pack(&bytes);
            assert_eq!(words.len(), word_count(len), "{len} bytes");
            assert_eq!(unpack(&words, len), bytes, "{len} bytes");
        }
    }

    #[test]
    fn every_rank_gets_every_record_in_rank_order_through_both_paths() {
        use crate::testing::{run_ranks, Path};
        for path in [Path::RankZero, Path::Store] {
            let gathered = run_ranks(3, path, |mut ring| {
                // 13 bytes: the last word is padded; 0xff bytes carry the sign bit.
                let record: Vec<u8> = (0..13)
                    .map(|i| (ring.rank() as u8) << 4 | i | 0x80)
                    .collect();
                all_gather_bytes(&mut ring, &record).unwrap()
            });
            let want: Vec<Vec<u8>> = (0..3u8)
                .map(|r| (0..13).map(|i| r << 4 | i | 0x80).collect())
                .collect();
            assert_eq!(gathered, vec![want; 3], "{path:?}");
        }
    }
}
