//! The example workload's checkpoint file, `params.bin`, and writing it atomically.
//!
//! Layout, all little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `TRCKPT\0\x01` |
//! | 4 | workload version ([`WORKLOAD_VERSION`]: model shape, data order and reduction) |
//! | 8 | step the parameters are *after* |
//! | 8 | seed |
//! | 4 | global batch |
//! | 4 | learning rate (f32 bits) |
//! | 4 | fixed-point fraction bits of the gradient reduction |
//! | 4 | parameter count |
//! | 4 × count | parameters (f32 bits) |
//! | 8 | FNV-1a of every byte above |
//!
//! That is everything a bit-exact resume needs: the data order is a function of the step alone
//! (example `(step - 1) * batch + j` of the dataset, which itself derives from the seed), the teacher
//! derives from the seed, SGD carries no state beyond the parameters, and the world size does not
//! enter the arithmetic at all (see [`crate::example`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::example::params_checksum_bytes;

/// File name inside a checkpoint directory.
pub(crate) const PARAMS_FILE: &str = "params.bin";
const MAGIC: [u8; 8] = *b"TRCKPT\x00\x01";
/// Bumped whenever a change would make a resumed run differ from an uninterrupted one.
pub(crate) const WORKLOAD_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 4 + 4 + 4 + 4;

/// The contents of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub workload_version: u32,
    pub step: u64,
    pub seed: u64,
    pub global_batch: u32,
    pub lr: f32,
    pub fraction_bits: u32,
    pub params: Vec<f32>,
}

pub(crate) fn encode(s: &Snapshot) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + 4 * s.params.len() + 8);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&s.workload_version.to_le_bytes());
    b.extend_from_slice(&s.step.to_le_bytes());
    b.extend_from_slice(&s.seed.to_le_bytes());
    b.extend_from_slice(&s.global_batch.to_le_bytes());
    b.extend_from_slice(&s.lr.to_bits().to_le_bytes());
    b.extend_from_slice(&s.fraction_bits.to_le_bytes());
    b.extend_from_slice(&(s.params.len() as u32).to_le_bytes());
    for p in &s.params {
        b.extend_from_slice(&p.to_le_bytes());
    }
    let sum = params_checksum_bytes(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

pub(crate) fn decode(b: &[u8]) -> Result<Snapshot, String> {
    if b.len() < HEADER_LEN + 8 || b[..8] != MAGIC {
        return Err(format!(
            "not an example-train checkpoint ({} bytes, expected the magic {:?} first)",
            b.len(),
            String::from_utf8_lossy(&MAGIC[..6])
        ));
    }
    let (body, trailer) = b.split_at(b.len() - 8);
    let want = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
    if params_checksum_bytes(body) != want {
        return Err("the file is corrupt (its checksum does not match)".to_string());
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let count = u32_at(40) as usize;
    if body.len() != HEADER_LEN + 4 * count {
        return Err(format!(
            "the file is {} bytes but says it holds {count} parameters",
            b.len()
        ));
    }
    let params = body[HEADER_LEN..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(Snapshot {
        workload_version: u32_at(8),
        step: u64_at(12),
        seed: u64_at(20),
        global_batch: u32_at(28),
        lr: f32::from_bits(u32_at(32)),
        fraction_bits: u32_at(36),
        params,
    })
}

/// Reads a checkpoint from a step directory (its `params.bin`) or from the file itself.
pub(crate) fn read(path: &Path) -> Result<Snapshot, String> {
    let file = if path.is_dir() {
        path.join(PARAMS_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", file.display()))
}

/// Writes `bytes` as `<dir>/step-<step>/params.bin` so that the step directory either does not
/// exist or holds the complete, durable file: the file is written into a temporary directory,
/// fsynced, the temporary directory fsynced and renamed to `step-<step>` (the name appears last),
/// and `dir` fsynced. Returns the step directory.
///
/// If `step-<step>` already exists (an earlier attempt wrote it, or this run wrote it a moment ago)
/// and holds exactly these bytes, it is kept and returned; with other contents it is an error,
/// because a committed checkpoint must never change under its name.
pub(crate) fn write_atomic(dir: &Path, step: u64, bytes: &[u8]) -> io::Result<PathBuf> {
    let final_dir = dir.join(format!("step-{step}"));
    if final_dir.exists() {
        return same_contents(&final_dir, bytes).map(|()| final_dir);
    }
    fs::create_dir_all(dir)?;
    let tmp_dir = dir.join(format!(".step-{step}.tmp-{}", std::process::id()));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir)?;
    }
    fs::create_dir(&tmp_dir)?;
    let result = (|| {
        let tmp_file = tmp_dir.join(format!("{PARAMS_FILE}.tmp"));
        let mut f = File::create(&tmp_file)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp_file, tmp_dir.join(PARAMS_FILE))?;
        File::open(&tmp_dir)?.sync_all()?;
        fs::rename(&tmp_dir, &final_dir)?;
        File::open(dir)?.sync_all()
    })();
    match result {
        Ok(()) => Ok(final_dir),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp_dir);
            // Lost a race with another writer of the same step: fine if it wrote the same bytes.
            if final_dir.exists() {
                return same_contents(&final_dir, bytes).map(|()| final_dir);
            }
            Err(e)
        }
    }
}

fn same_contents(step_dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let existing = fs::read(step_dir.join(PARAMS_FILE))?;
    if existing == bytes {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} already exists with different contents; not overwriting a checkpoint",
                step_dir.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            workload_version: WORKLOAD_VERSION,
            step: 20,
            seed: 42,
            global_batch: 128,
            lr: 0.2,
            fraction_bits: 32,
            params: vec![1.0, -0.5, f32::MIN_POSITIVE],
        }
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes).unwrap(), s);
        let mut bad = bytes.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("corrupt"));
        assert!(decode(b"hello")
            .unwrap_err()
            .contains("not an example-train"));
        assert!(decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("corrupt"));
    }

    #[test]
    fn atomic_write_creates_the_step_directory_and_keeps_identical_rewrites() {
        let root = std::env::temp_dir().join(format!(
            "trainctl-params-file-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&root);
        let bytes = encode(&sample());
        let dir = write_atomic(&root, 20, &bytes).unwrap();
        assert_eq!(dir, root.join("step-20"));
        assert_eq!(read(&dir).unwrap(), sample());
        assert_eq!(read(&dir.join(PARAMS_FILE)).unwrap(), sample());
        // No temporary left behind.
        let names: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["step-20"]);
        assert_eq!(write_atomic(&root, 20, &bytes).unwrap(), dir);
        let other = encode(&Snapshot {
            seed: 1,
            ..sample()
        });
        let err = write_atomic(&root, 20, &other).unwrap_err();
        assert!(err.to_string().contains("different contents"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
