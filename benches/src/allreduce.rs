//! The rank side of the all-reduce benchmark (`scripts/allreduce_vs_gloo.sh`): its arguments, the
//! known inputs every rank reduces, and the check of their sum. Pure; the rank program
//! (`src/bin/ring_allreduce.rs`) does the IO, and `scripts/allreduce/gloo_rank.py` computes the
//! same inputs and the same check for torch's gloo, so both sides reduce identical buffers.
//!
//! Rank `r`'s element `i` is `(r + 1) * (i % CHECK_PERIOD + 1)`, so the sum over a world of `n`
//! ranks is `n (n + 1) / 2 * (i % CHECK_PERIOD + 1)`. Every partial sum is a whole number below
//! 2^24, so it is exact in f32 whatever order the ranks add in, and the check is an equality. The
//! period is prime, so a chunk delivered to the wrong place (chunk sizes are never a multiple of it
//! at the sizes benchmarked) or a rank's contribution missing or counted twice shows as a mismatch.

use thiserror::Error;

/// Period of the input pattern: the largest prime below 2^16.
pub const CHECK_PERIOD: usize = 65_521;
/// Largest world size whose sums stay exact in f32: `n (n + 1) / 2 * CHECK_PERIOD < 2^24`.
pub const MAX_CHECKED_WORLD_SIZE: u32 = 16;
/// Largest buffer the rank program accepts (1 GiB): each rank holds three buffers of this size.
pub const MAX_BUFFER_BYTES: usize = 1 << 30;

/// What one rank runs: `warmup` untimed all-reduces, then `iters` timed ones, of `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankArgs {
    /// Buffer size in bytes, a positive multiple of 4 (f32 elements), at most [`MAX_BUFFER_BYTES`].
    pub bytes: usize,
    /// All-reduces run before the timed ones and not reported.
    pub warmup: usize,
    /// Timed all-reduces, at least 1.
    pub iters: usize,
}

/// A bad command line of the rank program.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag that is not one of `--bytes`, `--warmup`, `--iters`.
    #[error("unknown argument `{0}`: expected --bytes N, --warmup N, --iters N")]
    Unknown(String),
    /// A flag given without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A value that is not accepted for its flag.
    #[error("{flag} `{value}` is not valid: expected {expects}")]
    BadValue {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expects: &'static str,
    },
}

impl Default for RankArgs {
    /// 64 MiB, 2 warm-up and 10 timed all-reduces.
    fn default() -> Self {
        RankArgs {
            bytes: 64 << 20,
            warmup: 2,
            iters: 10,
        }
    }
}

/// Parses `--bytes N --warmup N --iters N` (each optional, also as `--flag=N`; defaults in
/// [`RankArgs::default`]).
pub fn parse_args(args: &[String]) -> Result<RankArgs, ArgsError> {
    let mut out = RankArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let (flag, expects, slot): (&'static str, &'static str, &mut usize) = match flag {
            "--bytes" => (
                "--bytes",
                "a positive multiple of 4 up to 1 GiB (1073741824)",
                &mut out.bytes,
            ),
            "--warmup" => ("--warmup", "a whole number", &mut out.warmup),
            "--iters" => ("--iters", "a whole number of at least 1", &mut out.iters),
            _ => return Err(ArgsError::Unknown(arg.clone())),
        };
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or(ArgsError::MissingValue(flag))?,
        };
        let bad = || ArgsError::BadValue {
            flag,
            value: value.clone(),
            expects,
        };
        let n: usize = value.trim().parse().map_err(|_| bad())?;
        let ok = match flag {
            "--bytes" => n > 0 && n.is_multiple_of(4) && n <= MAX_BUFFER_BYTES,
            "--iters" => n >= 1,
            _ => true,
        };
        if !ok {
            return Err(bad());
        }
        *slot = n;
    }
    Ok(out)
}

/// Rank `rank`'s input at element `index`.
pub fn input_value(rank: u32, index: usize) -> f32 {
    ((rank as usize + 1) * (index % CHECK_PERIOD + 1)) as f32
}

/// The sum over a world of `world_size` ranks at element `index`.
pub fn expected_sum(world_size: u32, index: usize) -> f32 {
    let n = world_size as usize;
    (n * (n + 1) / 2 * (index % CHECK_PERIOD + 1)) as f32
}

/// `len` elements of rank `rank`'s input.
pub fn input(rank: u32, len: usize) -> Vec<f32> {
    (0..len).map(|i| input_value(rank, i)).collect()
}

/// `len` elements of the expected sum over `world_size` ranks.
pub fn expected(world_size: u32, len: usize) -> Vec<f32> {
    (0..len).map(|i| expected_sum(world_size, i)).collect()
}

/// The first element where `got` differs from `want`: `(index, got, want)`. Compares bits, so a
/// NaN never passes. A length difference is a mismatch at the shorter length.
pub fn first_mismatch(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        return Some((i, got[i], want[i]));
    }
    (got.len() != want.len()).then(|| {
        let i = got.len().min(want.len());
        (
            i,
            got.get(i).copied().unwrap_or(f32::NAN),
            want.get(i).copied().unwrap_or(f32::NAN),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_parse_or_name_what_was_wrong() {
        let ok: &[(&[&str], RankArgs)] = &[
            (&[], RankArgs::default()),
            (
                &["--bytes", "1024", "--warmup", "0", "--iters", "3"],
                RankArgs {
                    bytes: 1024,
                    warmup: 0,
                    iters: 3,
                },
            ),
            (
                &["--iters=7", "--bytes=4"],
                RankArgs {
                    bytes: 4,
                    warmup: 2,
                    iters: 7,
                },
            ),
        ];
        for (args, want) in ok {
            assert_eq!(parse_args(&strings(args)), Ok(*want), "{args:?}");
        }
        let bad: &[(&[&str], &str)] = &[
            (&["--size", "4"], "unknown argument `--size`"),
            (&["--bytes"], "--bytes needs a value"),
            (
                &["--bytes", "6"],
                "--bytes `6` is not valid: expected a positive multiple of 4",
            ),
            (&["--bytes", "0"], "--bytes `0` is not valid"),
            (
                &["--bytes", "2147483648"],
                "--bytes `2147483648` is not valid",
            ),
            (
                &["--iters", "0"],
                "--iters `0` is not valid: expected a whole number of at least 1",
            ),
            (
                &["--warmup=x"],
                "--warmup `x` is not valid: expected a whole number",
            ),
        ];
        for (args, want) in bad {
            let err = parse_args(&strings(args)).expect_err(&format!("{args:?}"));
            assert!(err.to_string().starts_with(want), "{args:?}: {err}");
        }
    }

    /// The sums are exact whatever order the ranks' values are added in, up to the largest world
    /// size checked: the property that makes the check an equality for any ring schedule.
    #[test]
    fn sums_are_exact_in_f32_in_any_order() {
        for world in [1, 2, 3, 4, 8, MAX_CHECKED_WORLD_SIZE] {
            for index in [0, 1, CHECK_PERIOD - 1, CHECK_PERIOD, 3 * CHECK_PERIOD + 17] {
                let forward = (0..world).fold(0f32, |acc, r| acc + input_value(r, index));
                let backward = (0..world)
                    .rev()
                    .fold(0f32, |acc, r| acc + input_value(r, index));
                let want = expected_sum(world, index);
                assert_eq!(
                    forward.to_bits(),
                    want.to_bits(),
                    "world {world} index {index}"
                );
                assert_eq!(
                    backward.to_bits(),
                    want.to_bits(),
                    "world {world} index {index}"
                );
            }
        }
        // The largest partial sum is below 2^24, where f32 still holds every whole number.
        assert!(expected_sum(MAX_CHECKED_WORLD_SIZE, CHECK_PERIOD - 1) < (1u32 << 24) as f32);
    }

    #[test]
    fn mismatches_are_found_where_they_are() {
        let want = expected(2, 10);
        let cases: &[(Vec<f32>, Option<usize>)] = &[
            (want.clone(), None),
            (input(0, 10), Some(0)),
            (
                {
                    let mut v = want.clone();
                    v[7] += 1.0;
                    v
                },
                Some(7),
            ),
            (
                {
                    let mut v = want.clone();
                    v[3] = f32::NAN;
                    v
                },
                Some(3),
            ),
            (want[..9].to_vec(), Some(9)),
        ];
        for (got, at) in cases {
            assert_eq!(first_mismatch(got, &want).map(|m| m.0), *at, "{got:?}");
        }
    }

    /// A chunk landing in the wrong place is caught: the pattern does not repeat at the chunk sizes
    /// of a 64 MiB buffer split across the world sizes benchmarked.
    #[test]
    fn chunk_sizes_of_the_benchmark_are_not_multiples_of_the_period() {
        let elems = (64usize << 20) / 4;
        for world in 2..=MAX_CHECKED_WORLD_SIZE as usize {
            let chunk = elems / world;
            assert_ne!(chunk % CHECK_PERIOD, 0, "world {world}");
        }
    }
}
