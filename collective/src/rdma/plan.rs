//! The RDMA ring all-reduce without the library, pure: which bytes each rank writes into which
//! receive slot of the next rank at every step, with which immediate value; what it expects from
//! the previous rank, in order; and the credits that keep a writer from overwriting a slot the
//! reader has not consumed.
//!
//! # The schedule
//!
//! The steps are the TCP ring's (`crate::schedule`): `world - 1` reduce-scatter steps, then
//! `world - 1` all-gather steps. At each step a rank writes one chunk of its work buffer to the
//! next rank, cut into segments of at most `slot_bytes` (whole elements), and receives one chunk
//! from the previous rank the same way. Writes go to the receiver's slot `w % slots`, where `w`
//! counts the writes of the whole operation; the receiver counts its receipts the same way, so
//! both sides agree on every slot without telling each other (the tests check that a rank's
//! receipts are, entry for entry, its previous rank's writes).
//!
//! # Immediate values
//!
//! Every write carries an immediate ([`Imm`]): a data write names its phase, step and segment,
//! which the receiver checks against what it expects next (a mismatch means the ranks run
//! different operations, and is an error, not corrupted data); a credit names how many slots it
//! frees.
//!
//! # Credits
//!
//! A writer may have at most `slots` writes that the reader has not yet consumed
//! ([`CreditWindow`]). The reader, once it has added (or copied) a slot into its work buffer,
//! sends a one-byte write with a credit immediate back on the same connection.

use std::fmt;
use std::ops::Range;

use crate::schedule::{all_gather_step, chunk_range, reduce_scatter_step};

/// Bits of an immediate that hold the step.
const STEP_BITS: u32 = 14;
/// Bits of an immediate that hold the segment.
const SEGMENT_BITS: u32 = 16;
/// The credit flag: the top bit.
const CREDIT_FLAG: u32 = 1 << 31;
/// The all-gather flag of a data immediate.
const ALL_GATHER_FLAG: u32 = 1 << 30;
/// The largest step an immediate holds (`world - 2` for the largest world).
pub(crate) const MAX_STEP: u32 = (1 << STEP_BITS) - 1;
/// The most segments one chunk may have.
pub(crate) const MAX_SEGMENTS: usize = 1 << SEGMENT_BITS;

/// The two phases of the ring all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Each received segment is added into the work buffer.
    ReduceScatter,
    /// Each received segment replaces the work buffer's bytes.
    AllGather,
}

/// The meaning of a write's immediate value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Imm {
    /// Segment `segment` of step `step` of `phase`.
    Data {
        /// The phase.
        phase: Phase,
        /// The step within the phase, from 0.
        step: u32,
        /// The segment within the step's chunk, from 0.
        segment: u32,
    },
    /// The reader consumed this many slots.
    Credit {
        /// How many.
        slots: u32,
    },
}

impl Imm {
    /// The 32 bits on the wire: credit flag, all-gather flag, 14 bits of step, 16 of segment; or
    /// the credit flag and 31 bits of count.
    pub(crate) fn encode(self) -> u32 {
        match self {
            Imm::Data {
                phase,
                step,
                segment,
            } => {
                debug_assert!(step <= MAX_STEP && (segment as usize) < MAX_SEGMENTS);
                let phase = match phase {
                    Phase::ReduceScatter => 0,
                    Phase::AllGather => ALL_GATHER_FLAG,
                };
                phase | (step << SEGMENT_BITS) | segment
            }
            Imm::Credit { slots } => CREDIT_FLAG | (slots & !CREDIT_FLAG),
        }
    }

    /// Reads [`Imm::encode`]'s bits. Every 32-bit value means something.
    pub(crate) fn decode(bits: u32) -> Imm {
        if bits & CREDIT_FLAG != 0 {
            return Imm::Credit {
                slots: bits & !CREDIT_FLAG,
            };
        }
        Imm::Data {
            phase: if bits & ALL_GATHER_FLAG != 0 {
                Phase::AllGather
            } else {
                Phase::ReduceScatter
            },
            step: (bits >> SEGMENT_BITS) & MAX_STEP,
            segment: bits & ((1 << SEGMENT_BITS) - 1),
        }
    }
}

impl fmt::Display for Imm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Imm::Data {
                phase,
                step,
                segment,
            } => write!(f, "{phase:?} step {step} segment {segment}"),
            Imm::Credit { slots } => write!(f, "a credit of {slots} slot(s)"),
        }
    }
}

/// One RDMA write with immediate of the plan, or its receipt: the same bytes as seen by the
/// writer (`local` in its work buffer) and by the reader (`slot` of its receive buffer, then
/// `local` in its own work buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transfer {
    /// The phase, for the receiver: add or copy.
    pub(crate) phase: Phase,
    /// Byte range in the work buffer: read from on the writer, reduced or copied into on the
    /// reader.
    pub(crate) local: Range<usize>,
    /// The receive slot on the reader.
    pub(crate) slot: usize,
    /// The immediate value.
    pub(crate) imm: u32,
}

/// One step of the plan for one rank.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Step {
    /// What this rank writes to the next rank, in order.
    pub(crate) writes: Vec<Transfer>,
    /// What this rank receives from the previous rank, in order.
    pub(crate) receipts: Vec<Transfer>,
}

/// The sizes a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Elements in the buffer.
    pub(crate) len: usize,
    /// Bytes per element.
    pub(crate) elem_bytes: usize,
    /// Bytes per receive slot (a multiple of `elem_bytes`).
    pub(crate) slot_bytes: usize,
    /// Receive slots per rank.
    pub(crate) slots: usize,
    /// Writes this rank made to the next rank in earlier operations: the first write of this one
    /// goes to slot `write_base % slots`, so a slot the reader has not consumed yet is never
    /// reused early (the credit window spans operations too).
    pub(crate) write_base: u64,
    /// Receipts from the previous rank in earlier operations (equal to that rank's
    /// `write_base`).
    pub(crate) receipt_base: u64,
}

/// Why no plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    /// The slots cannot hold one element, or there are none.
    #[error("receive slots of {slot_bytes} bytes x {slots}: each must hold at least one {elem_bytes}-byte element, and there must be one slot or more")]
    Slots {
        /// Bytes per slot.
        slot_bytes: usize,
        /// Number of slots.
        slots: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// A chunk would need more segments than an immediate can number.
    #[error("a chunk of {chunk_bytes} bytes needs {segments} segments of {slot_bytes} bytes; at most {MAX_SEGMENTS} fit in an immediate value: use larger slots")]
    TooManySegments {
        /// Bytes of the largest chunk.
        chunk_bytes: usize,
        /// Segments it would need.
        segments: usize,
        /// Bytes per slot.
        slot_bytes: usize,
    },
    /// The world is larger than an immediate's step field allows.
    #[error("a world of {world} ranks has more steps than an immediate value can number (at most {})", MAX_STEP + 2)]
    WorldTooLarge {
        /// The world size.
        world: usize,
    },
}

/// The byte ranges of `chunk` cut into segments of at most `seg_elems` elements.
fn segments(g: &Geometry, world: usize, chunk: usize) -> Vec<Range<usize>> {
    let elems = chunk_range(g.len, world, chunk);
    let seg_elems = g.slot_bytes / g.elem_bytes;
    elems
        .clone()
        .step_by(seg_elems)
        .map(|start| {
            let end = (start + seg_elems).min(elems.end);
            start * g.elem_bytes..end * g.elem_bytes
        })
        .collect()
}

/// The whole operation's steps for `rank` of `world` (module docs). A world of one has no steps.
pub(crate) fn plan(rank: usize, world: usize, g: &Geometry) -> Result<Vec<Step>, PlanError> {
    if g.slots == 0 || g.elem_bytes == 0 || g.slot_bytes < g.elem_bytes {
        return Err(PlanError::Slots {
            slot_bytes: g.slot_bytes,
            slots: g.slots,
            elem_bytes: g.elem_bytes,
        });
    }
    if world < 2 {
        return Ok(Vec::new());
    }
    if world - 2 > MAX_STEP as usize {
        return Err(PlanError::WorldTooLarge { world });
    }
    let largest = chunk_range(g.len, world, 0).len() * g.elem_bytes;
    let seg_elems = g.slot_bytes / g.elem_bytes;
    let most = chunk_range(g.len, world, 0).len().div_ceil(seg_elems);
    if most > MAX_SEGMENTS {
        return Err(PlanError::TooManySegments {
            chunk_bytes: largest,
            segments: most,
            slot_bytes: seg_elems * g.elem_bytes,
        });
    }
    let (mut written, mut received) = (g.write_base, g.receipt_base);
    let mut steps = Vec::with_capacity(2 * (world - 1));
    for (phase, step_fn) in [
        (
            Phase::ReduceScatter,
            reduce_scatter_step as fn(usize, usize, usize) -> (usize, usize),
        ),
        (Phase::AllGather, all_gather_step),
    ] {
        for step in 0..world - 1 {
            let (send, recv) = step_fn(rank, world, step);
            let transfer = |(segment, local): (usize, Range<usize>), counter: &mut u64| {
                let slot = (*counter % g.slots as u64) as usize;
                *counter += 1;
                Transfer {
                    phase,
                    local,
                    slot,
                    imm: Imm::Data {
                        phase,
                        step: step as u32,
                        segment: segment as u32,
                    }
                    .encode(),
                }
            };
            let writes = segments(g, world, send)
                .into_iter()
                .enumerate()
                .map(|s| transfer(s, &mut written))
                .collect();
            let receipts = segments(g, world, recv)
                .into_iter()
                .enumerate()
                .map(|s| transfer(s, &mut received))
                .collect();
            steps.push(Step { writes, receipts });
        }
    }
    Ok(steps)
}

/// How many more writes the reader can take: at most `slots` not yet credited back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreditWindow {
    slots: u64,
    sent: u64,
    freed: u64,
}

/// A credit that frees more slots than were written: the peer is confused or not a trainctl rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a credit of {credit} slot(s) arrived with only {outstanding} write(s) outstanding")]
pub(crate) struct CreditError {
    /// The credit received.
    pub(crate) credit: u64,
    /// Writes not yet credited when it arrived.
    pub(crate) outstanding: u64,
}

impl CreditWindow {
    /// A window over `slots` receive slots, all free.
    pub(crate) fn new(slots: usize) -> CreditWindow {
        CreditWindow {
            slots: slots as u64,
            sent: 0,
            freed: 0,
        }
    }

    /// Whether one more write fits.
    pub(crate) fn can_send(&self) -> bool {
        self.sent - self.freed < self.slots
    }

    /// A write was posted. Call only when [`CreditWindow::can_send`].
    pub(crate) fn on_send(&mut self) {
        debug_assert!(self.can_send());
        self.sent += 1;
    }

    /// The reader freed `slots` slots.
    pub(crate) fn on_credit(&mut self, slots: u32) -> Result<(), CreditError> {
        let outstanding = self.sent - self.freed;
        if u64::from(slots) > outstanding {
            return Err(CreditError {
                credit: u64::from(slots),
                outstanding,
            });
        }
        self.freed += u64::from(slots);
        Ok(())
    }

    /// Writes not yet credited back.
    pub(crate) fn outstanding(&self) -> u64 {
        self.sent - self.freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(len: usize, elem_bytes: usize, slot_bytes: usize, slots: usize) -> Geometry {
        Geometry {
            len,
            elem_bytes,
            slot_bytes,
            slots,
            write_base: 0,
            receipt_base: 0,
        }
    }

    #[test]
    fn slot_numbering_continues_from_earlier_operations() {
        // After 3 writes (slots 0, 1, 2 of 4), the next operation starts at slot 3 and wraps.
        let g = Geometry {
            write_base: 3,
            receipt_base: 5,
            ..geometry(8, 4, 4, 4)
        };
        let steps = plan(0, 2, &g).unwrap();
        let slots = |pick: fn(&Step) -> &Vec<Transfer>| -> Vec<usize> {
            steps
                .iter()
                .flat_map(|s| pick(s).iter().map(|t| t.slot))
                .collect()
        };
        assert_eq!(slots(|s| &s.writes), vec![3, 0, 1, 2, 3, 0, 1, 2]);
        assert_eq!(slots(|s| &s.receipts), vec![1, 2, 3, 0, 1, 2, 3, 0]);
    }

    #[test]
    fn immediates_round_trip_and_name_their_meaning() {
        let cases = [
            (
                Imm::Data {
                    phase: Phase::ReduceScatter,
                    step: 0,
                    segment: 0,
                },
                0x0000_0000,
            ),
            (
                Imm::Data {
                    phase: Phase::ReduceScatter,
                    step: 3,
                    segment: 7,
                },
                0x0003_0007,
            ),
            (
                Imm::Data {
                    phase: Phase::AllGather,
                    step: MAX_STEP,
                    segment: (MAX_SEGMENTS - 1) as u32,
                },
                0x7fff_ffff,
            ),
            (Imm::Credit { slots: 1 }, 0x8000_0001),
            (Imm::Credit { slots: 0x7fff_ffff }, 0xffff_ffff),
        ];
        for (imm, bits) in cases {
            assert_eq!(imm.encode(), bits, "{imm}");
            assert_eq!(Imm::decode(bits), imm, "{bits:#x}");
        }
        assert_eq!(
            Imm::decode(0x4002_0001).to_string(),
            "AllGather step 2 segment 1"
        );
    }

    #[test]
    fn a_small_ring_writes_exactly_these_bytes_to_these_slots() {
        // 10 f32 over 3 ranks: chunks of 4, 3, 3 elements (16, 12, 12 bytes); slots of 8 bytes,
        // 2 of them. Rank 0 sends chunk 0, then 2 (reduce-scatter); owns chunk 1, sends it,
        // then chunk 0 (all-gather).
        let g = geometry(10, 4, 8, 2);
        let steps = plan(0, 3, &g).unwrap();
        let w = |phase, step: u32, segment: u32, local: Range<usize>, slot| Transfer {
            phase,
            local,
            slot,
            imm: Imm::Data {
                phase,
                step,
                segment,
            }
            .encode(),
        };
        use Phase::{AllGather as Ag, ReduceScatter as Rs};
        let writes: Vec<Vec<Transfer>> = steps.iter().map(|s| s.writes.clone()).collect();
        assert_eq!(
            writes,
            vec![
                vec![w(Rs, 0, 0, 0..8, 0), w(Rs, 0, 1, 8..16, 1)],
                vec![w(Rs, 1, 0, 28..36, 0), w(Rs, 1, 1, 36..40, 1)],
                vec![w(Ag, 0, 0, 16..24, 0), w(Ag, 0, 1, 24..28, 1)],
                vec![w(Ag, 1, 0, 0..8, 0), w(Ag, 1, 1, 8..16, 1)],
            ]
        );
        // Rank 0 receives chunk 2, then 1 (adding), then chunk 0, then 2 (copying).
        let receipts: Vec<Vec<Transfer>> = steps.iter().map(|s| s.receipts.clone()).collect();
        assert_eq!(
            receipts,
            vec![
                vec![w(Rs, 0, 0, 28..36, 0), w(Rs, 0, 1, 36..40, 1)],
                vec![w(Rs, 1, 0, 16..24, 0), w(Rs, 1, 1, 24..28, 1)],
                vec![w(Ag, 0, 0, 0..8, 0), w(Ag, 0, 1, 8..16, 1)],
                vec![w(Ag, 1, 0, 28..36, 0), w(Ag, 1, 1, 36..40, 1)],
            ]
        );
    }

    #[test]
    fn every_rank_receives_exactly_what_its_previous_rank_writes() {
        let geometries = [
            geometry(10, 4, 8, 2),
            geometry(1000, 8, 64, 3),
            geometry(7, 8, 8, 1),
            geometry(2, 4, 4096, 4),
            geometry(0, 4, 16, 2),
        ];
        for g in geometries {
            for world in 2..=6 {
                for rank in 0..world {
                    let prev = (rank + world - 1) % world;
                    let mine = plan(rank, world, &g).unwrap();
                    let theirs = plan(prev, world, &g).unwrap();
                    assert_eq!(mine.len(), 2 * (world - 1));
                    for (step, (m, t)) in mine.iter().zip(&theirs).enumerate() {
                        // The same bytes of the same chunk, to the same slot, with the same
                        // immediate: the writer's offsets are the reader's.
                        assert_eq!(
                            m.receipts, t.writes,
                            "{g:?} world {world} rank {rank} step {step}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_plan_covers_the_buffer_and_leaves_every_rank_with_every_sum() {
        // Simulate the plan with real numbers: rank r holds r + 1 + i * 10 at element i. Every
        // rank must end with the sum over ranks at every element.
        for world in 1..=5 {
            for len in [0usize, 1, 5, 17] {
                let g = geometry(len, 8, 16, 2);
                let mut bufs: Vec<Vec<i64>> = (0..world)
                    .map(|r| (0..len).map(|i| (r + 1 + i * 10) as i64).collect())
                    .collect();
                let plans: Vec<Vec<Step>> =
                    (0..world).map(|r| plan(r, world, &g).unwrap()).collect();
                for step in 0..2 * world.saturating_sub(1) {
                    let before = bufs.clone();
                    for (rank, p) in plans.iter().enumerate() {
                        for t in &p[step].receipts {
                            let prev = (rank + world - 1) % world;
                            for e in t.local.start / 8..t.local.end / 8 {
                                bufs[rank][e] = match t.phase {
                                    Phase::ReduceScatter => bufs[rank][e] + before[prev][e],
                                    Phase::AllGather => before[prev][e],
                                };
                            }
                        }
                    }
                }
                let want: Vec<i64> = (0..len)
                    .map(|i| (0..world).map(|r| (r + 1 + i * 10) as i64).sum())
                    .collect();
                for (rank, buf) in bufs.iter().enumerate() {
                    assert_eq!(buf, &want, "world {world} len {len} rank {rank}");
                }
            }
        }
    }

    #[test]
    fn impossible_geometries_are_refused_with_what_to_change() {
        let cases = [
            (
                geometry(10, 8, 4, 2),
                2,
                "each must hold at least one 8-byte element",
            ),
            (geometry(10, 8, 8, 0), 2, "there must be one slot or more"),
            (
                geometry(MAX_SEGMENTS * 2 + 2, 4, 4, 1),
                2,
                "use larger slots",
            ),
            (
                geometry(10, 4, 4, 1),
                MAX_STEP as usize + 3,
                "more steps than an immediate",
            ),
        ];
        for (g, world, want) in cases {
            let err = plan(0, world, &g).unwrap_err().to_string();
            assert!(err.contains(want), "{g:?}: {err}");
        }
    }

    #[test]
    fn the_credit_window_holds_at_most_slots_uncredited_writes() {
        let mut w = CreditWindow::new(2);
        assert!(w.can_send());
        w.on_send();
        w.on_send();
        assert!(!w.can_send(), "two slots, two writes outstanding");
        assert_eq!(w.outstanding(), 2);
        w.on_credit(1).unwrap();
        assert!(w.can_send());
        w.on_send();
        assert_eq!(
            w.on_credit(3),
            Err(CreditError {
                credit: 3,
                outstanding: 2
            })
        );
        w.on_credit(2).unwrap();
        assert_eq!(w.outstanding(), 0);
    }
}
