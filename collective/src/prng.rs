//! SplitMix64: a tiny, well-mixed, reproducible generator (Steele, Lea and Flood, 2014), used for
//! the example workload's synthetic data and for rendezvous session ids. Not for cryptography.

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream starting at `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A float uniformly drawn from [-1, 1), with 24 random bits.
    pub(crate) fn next_signed_unit(&mut self) -> f32 {
        let bits = (self.next_u64() >> 40) as u32; // 24 bits, exact in an f32
        (bits as f32) * (2.0 / (1u32 << 24) as f32) - 1.0
    }
}

/// SplitMix64's finaliser: a bijection of u64 that scrambles every input bit into every output bit.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // First outputs of the reference C implementation seeded with 0.
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(g.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn signed_units_stay_in_range() {
        let mut g = SplitMix64::new(42);
        for _ in 0..10_000 {
            let x = g.next_signed_unit();
            assert!((-1.0..1.0).contains(&x), "{x}");
        }
    }
}
