//! The formats of what a coordinator stores: Raft log entries and state-machine snapshots.
//!
//! A coordinator's data directory outlives its binary: the log and the snapshot a release writes are
//! read by every later release, and a cluster being upgraded holds both. So each stored record says
//! which format wrote it, and every format ever released keeps decoding, to the same value.
//!
//! # The formats
//!
//! Everything is compact JSON with a version field `v` first.
//!
//! - **A log entry** (table `raft_log`, key = log index): openraft's `Entry` (`log_id`, `payload`)
//!   with `v` = [`LOG_FORMAT_VERSION`]:
//!   `{"v":1,"log_id":{"leader_id":{"term":2,"node_id":1},"index":7},"payload":{"Normal":{"CancelJob":{"job":3,"at_ms":1700000000000}}}}`.
//!   The payload is a [`Command`](crate::state::Command) as serde writes it (externally tagged).
//! - **Snapshot data** (what [`StateMachineStore`](super::state_machine::StateMachineStore) builds and
//!   Raft sends to a follower that lags, in chunks): `{"v":1,"last_applied":…,"last_membership":…,"state":…}`
//!   ([`SNAPSHOT_DATA_FORMAT_VERSION`]), the whole [`State`] with Raft's bookkeeping of it. It is
//!   written and read as a stream ([`write_snapshot_data`], [`read_snapshot_data`]), never held whole
//!   in memory.
//! - **The stored snapshot** ([`SNAPSHOT_FORMAT_VERSION`], format 2): the data in a file of its own
//!   under `<data-dir>/snapshots/`, bytes for bytes as built or received, and in table `snapshot`, key
//!   `current`, the header `{"v":2,"meta":…,"file":"snapshot-42-….json"}` (openraft's `SnapshotMeta`
//!   and the file's name). The file is written to a temporary name, fsync'd and renamed before the
//!   header naming it is committed, so the header never names a partial file.
//!
//! Older stored snapshots still decode (and are rewritten as format 2 when a coordinator opens them):
//! format 1 kept the data in redb under key `current.data` beside the header `{"v":1,"meta":…}` (the
//! data format is unchanged since); format 0, what releases before versioning wrote, is a log entry
//! and snapshot data without `v` (format 1 only added `v`), and a stored snapshot
//! `{"meta":…,"data":[123,34,…]}` with the data inline as an array of byte values under key `current`
//! (which held the state twice in memory and took up to four characters a byte).
//!
//! # Policy
//!
//! - **Add a field** to a command or to the state with `#[serde(default)]` (and a default that means
//!   what the old behaviour meant): old records then decode unchanged, and the format version stays.
//!   Add a command as a new variant; no old log holds it.
//! - **Bump the version** (`LOG_FORMAT_VERSION` for commands and entries,
//!   `SNAPSHOT_DATA_FORMAT_VERSION` for the state, `SNAPSHOT_FORMAT_VERSION` for the stored snapshot)
//!   when a change is not just an added defaulted field: a renamed
//!   or removed field or variant, a changed type or meaning, another encoding. Keep the old shape as a
//!   type of its own here (`EntryV1`, ...), decode by `v`, convert it to today's type, and give the old
//!   meaning to the new code (`State::apply` of a command from an old log must reach the state it
//!   reached when it was written).
//! - **Old versions decode forever.** Add the new format's fixtures under `coordinator/tests/fixtures/`
//!   (see `coordinator/tests/format.rs`) and keep every older one: each must keep replaying to the
//!   same state.
//! - A record of a version newer than this binary's is an error that says so ([`FormatError::Newer`]),
//!   never a best-effort read: a coordinator that cannot read its log stops (a storage error fails
//!   Raft, and the process exits) instead of serving a different state.
//!
//! Not versioned here: openraft's own small records in `raft_meta` (vote, committed, last purged),
//! the JSON of openraft 0.9's types, like `log_id` and `meta` above. An openraft upgrade that changes
//! them is a format change too; the fixtures catch it.

use std::io::{Read, Seek, SeekFrom, Write};

use openraft::{BasicNode, Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::state_machine::Applied;
use super::{ServerId, TypeConfig};
use crate::state::State;

/// The format this binary writes Raft log entries in, and the newest it reads.
pub const LOG_FORMAT_VERSION: u32 = 1;
/// The format this binary stores snapshots in (the header in redb, the data in a file), and the
/// newest it reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;
/// The format this binary writes snapshot data in (stored, and sent to followers), and the newest it
/// reads. Format 1 since versioning began: format 2 of the stored snapshot moved the data, it did
/// not change it, so a follower of the release before can still install what this one sends.
pub const SNAPSHOT_DATA_FORMAT_VERSION: u32 = 1;

/// A stored record that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a later release: this binary must not guess at it.
    #[error(
        "{what} was written by a newer trainctl (format {found}); this binary reads up to {supported}: \
         run the newer trainctl"
    )]
    Newer {
        what: String,
        found: u32,
        supported: u32,
    },
    /// Of a known version but not of its shape: corrupted, or written by a build with a format bug.
    #[error("{what} (format {version}) is malformed: {source}")]
    Malformed {
        what: String,
        version: u32,
        #[source]
        source: serde_json::Error,
    },
    /// A stored snapshot whose data is missing.
    #[error("{what} (format {version}) has no data")]
    NoData { what: String, version: u32 },
    /// The data could not be read or written at all.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Only the version of a record, whatever else it holds (absent: format 0).
#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default)]
    v: u32,
}

/// Decodes `bytes` as `T`, whose version `version_of` reads. A record newer than `supported` is
/// [`FormatError::Newer`], also when it does not parse as `T` (a newer shape).
fn decode<T: DeserializeOwned>(
    what: impl FnOnce() -> String,
    bytes: &[u8],
    supported: u32,
    version_of: impl Fn(&T) -> u32,
) -> Result<T, FormatError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(value) if version_of(&value) <= supported => Ok(value),
        Ok(value) => Err(FormatError::Newer {
            what: what(),
            found: version_of(&value),
            supported,
        }),
        Err(source) => {
            let version = serde_json::from_slice::<VersionOnly>(bytes).map_or(0, |p| p.v);
            if version > supported {
                Err(FormatError::Newer {
                    what: what(),
                    found: version,
                    supported,
                })
            } else {
                Err(FormatError::Malformed {
                    what: what(),
                    version,
                    source,
                })
            }
        }
    }
}

#[derive(Serialize)]
struct EntryOut<'a> {
    v: u32,
    log_id: &'a LogId<ServerId>,
    payload: &'a EntryPayload<TypeConfig>,
}

/// Formats 0 and 1 (format 1 is format 0 with `v`).
#[derive(Deserialize)]
struct EntryIn {
    #[serde(default)]
    v: u32,
    log_id: LogId<ServerId>,
    payload: EntryPayload<TypeConfig>,
}

/// A log entry as the log store writes it ([`LOG_FORMAT_VERSION`]).
pub fn encode_entry(entry: &Entry<TypeConfig>) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&EntryOut {
        v: LOG_FORMAT_VERSION,
        log_id: &entry.log_id,
        payload: &entry.payload,
    })
}

/// A stored log entry of any released format; `index` (its key) names it in errors.
pub fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>, FormatError> {
    let stored: EntryIn = decode(
        || format!("Raft log entry {index}"),
        bytes,
        LOG_FORMAT_VERSION,
        |e: &EntryIn| e.v,
    )?;
    Ok(Entry {
        log_id: stored.log_id,
        payload: stored.payload,
    })
}

#[derive(Serialize)]
struct AppliedOut<'a> {
    v: u32,
    last_applied: &'a Option<LogId<ServerId>>,
    last_membership: &'a StoredMembership<ServerId, BasicNode>,
    state: &'a State,
}

/// Formats 0 and 1 (format 1 is format 0 with `v`).
#[derive(Deserialize)]
struct AppliedIn {
    #[serde(default)]
    v: u32,
    last_applied: Option<LogId<ServerId>>,
    last_membership: StoredMembership<ServerId, BasicNode>,
    state: State,
}

/// Snapshot data ([`SNAPSHOT_DATA_FORMAT_VERSION`]) in memory: for tests and small states; the
/// state machine streams it with [`write_snapshot_data`].
pub fn encode_snapshot_data(applied: &Applied) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = Vec::new();
    write_snapshot_data(applied, &mut bytes)?;
    Ok(bytes)
}

/// Writes snapshot data ([`SNAPSHOT_DATA_FORMAT_VERSION`]) to `writer` as it is serialized (give it a
/// buffered writer): no copy of the encoding is held in memory.
pub fn write_snapshot_data(applied: &Applied, writer: impl Write) -> Result<(), serde_json::Error> {
    serde_json::to_writer(
        writer,
        &AppliedOut {
            v: SNAPSHOT_DATA_FORMAT_VERSION,
            last_applied: &applied.last_applied,
            last_membership: &applied.last_membership,
            state: &applied.state,
        },
    )
}

fn applied(stored: AppliedIn) -> Applied {
    let mut state = stored.state;
    state.rebuild_index();
    Applied {
        last_applied: stored.last_applied,
        last_membership: stored.last_membership,
        state,
    }
}

/// Snapshot data of any released format, in memory.
pub fn decode_snapshot_data(bytes: &[u8]) -> Result<Applied, FormatError> {
    decode(
        || "the snapshot data".to_string(),
        bytes,
        SNAPSHOT_DATA_FORMAT_VERSION,
        |a: &AppliedIn| a.v,
    )
    .map(applied)
}

/// Snapshot data of any released format, decoded as it is read from `reader` (give it a buffered
/// reader). A record that does not decode is read again from the start for its version only, so a
/// newer one is still [`FormatError::Newer`].
pub fn read_snapshot_data<R: Read + Seek>(mut reader: R) -> Result<Applied, FormatError> {
    let what = || "the snapshot data".to_string();
    let supported = SNAPSHOT_DATA_FORMAT_VERSION;
    let newer = |found| FormatError::Newer {
        what: what(),
        found,
        supported,
    };
    match serde_json::from_reader::<_, AppliedIn>(&mut reader) {
        Ok(value) if value.v <= supported => Ok(applied(value)),
        Ok(value) => Err(newer(value.v)),
        Err(source) if source.is_io() => Err(FormatError::Io {
            what: what(),
            source: source.into(),
        }),
        Err(source) => {
            let version = reader
                .seek(SeekFrom::Start(0))
                .ok()
                .and_then(|_| serde_json::from_reader::<_, VersionOnly>(&mut reader).ok())
                .map_or(0, |p| p.v);
            if version > supported {
                Err(newer(version))
            } else {
                Err(FormatError::Malformed {
                    what: what(),
                    version,
                    source,
                })
            }
        }
    }
}

#[derive(Serialize)]
struct SnapshotHeaderOut<'a> {
    v: u32,
    meta: &'a SnapshotMeta<ServerId, BasicNode>,
    file: &'a str,
}

/// Format 0 (`data` inline), 1 (`v`, the data under a key of its own) and 2 (the data in `file`).
#[derive(Deserialize)]
struct SnapshotHeaderIn {
    #[serde(default)]
    v: u32,
    meta: SnapshotMeta<ServerId, BasicNode>,
    #[serde(default)]
    data: Option<Vec<u8>>,
    #[serde(default)]
    file: Option<String>,
}

/// The stored snapshot's header ([`SNAPSHOT_FORMAT_VERSION`]): its data is the file `file` in the
/// snapshot directory.
pub fn encode_snapshot_header(
    meta: &SnapshotMeta<ServerId, BasicNode>,
    file: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&SnapshotHeaderOut {
        v: SNAPSHOT_FORMAT_VERSION,
        meta,
        file,
    })
}

/// A decoded stored-snapshot header.
#[derive(Debug)]
pub struct SnapshotHeader {
    /// The format that wrote it.
    pub version: u32,
    pub meta: SnapshotMeta<ServerId, BasicNode>,
    /// The data, when it is inline (format 0).
    pub inline_data: Option<Vec<u8>>,
    /// The name of the data's file in the snapshot directory (format 2); with neither this nor
    /// `inline_data` (format 1) the data is under its own key.
    pub file: Option<String>,
}

/// A stored snapshot's header of any released format. Format 0 must carry its data inline, format
/// 2 a file name.
pub fn decode_snapshot_header(bytes: &[u8]) -> Result<SnapshotHeader, FormatError> {
    let what = || "the stored snapshot".to_string();
    let stored: SnapshotHeaderIn = decode(
        what,
        bytes,
        SNAPSHOT_FORMAT_VERSION,
        |h: &SnapshotHeaderIn| h.v,
    )?;
    let missing = match stored.v {
        0 => stored.data.is_none(),
        1 => false,
        _ => stored.file.is_none(),
    };
    if missing {
        return Err(FormatError::NoData {
            what: what(),
            version: stored.v,
        });
    }
    Ok(SnapshotHeader {
        version: stored.v,
        meta: stored.meta,
        inline_data: stored.data,
        file: stored.file,
    })
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::state::{Command, JobId};

    fn entry() -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 7),
            payload: EntryPayload::Normal(Command::CancelJob {
                job: JobId(3),
                at_ms: 1_700_000_000_000,
            }),
        }
    }

    #[test]
    fn entries_are_written_with_their_version_first() {
        let bytes = encode_entry(&entry()).unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"v":1,"log_id":{"leader_id":{"term":2,"node_id":1},"index":7},"payload":{"Normal":{"CancelJob":{"job":3,"at_ms":1700000000000}}}}"#
        );
        assert_eq!(decode_entry(7, &bytes).unwrap(), entry());
    }

    #[test]
    fn unversioned_entries_are_format_0() {
        let bytes = serde_json::to_vec(&entry()).unwrap();
        assert!(bytes.starts_with(b"{\"log_id\""));
        assert_eq!(decode_entry(7, &bytes).unwrap(), entry());
    }

    #[test]
    fn a_newer_format_is_refused_by_name_whatever_its_shape() {
        let same_shape = String::from_utf8(encode_entry(&entry()).unwrap())
            .unwrap()
            .replacen("\"v\":1", "\"v\":2", 1);
        let new_shape = r#"{"v":7,"entry":{"index":7,"command":{"Cancel":{"job":3}}}}"#;
        for bytes in [same_shape.as_str(), new_shape] {
            let e = decode_entry(7, bytes.as_bytes()).unwrap_err();
            assert!(matches!(e, FormatError::Newer { .. }), "{e:?}");
            let message = e.to_string();
            assert!(
                message.starts_with("Raft log entry 7 was written by a newer trainctl (format ")
                    && message.contains("this binary reads up to 1"),
                "{message}"
            );
        }
        let data = r#"{"v":9,"state":"elsewhere"}"#;
        let e = decode_snapshot_data(data.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("newer trainctl (format 9)"), "{e}");
        let e = read_snapshot_data(std::io::Cursor::new(data))
            .unwrap_err()
            .to_string();
        assert!(e.contains("newer trainctl (format 9)"), "{e}");
        let header = r#"{"v":3,"meta":{}}"#;
        let e = decode_snapshot_header(header.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("newer trainctl (format 3)"), "{e}");
    }

    #[test]
    fn a_damaged_record_of_a_known_format_is_malformed_not_newer() {
        for bytes in [&b"{\"v\":1,\"log_id\":"[..], b"{\"log_id\":3}", b"\x00\x01"] {
            let e = decode_entry(1, bytes).unwrap_err();
            assert!(matches!(e, FormatError::Malformed { .. }), "{e:?}");
        }
        let e = decode_snapshot_header(br#"{"meta":{"last_log_id":null,"last_membership":{"log_id":null,"membership":{"configs":[],"nodes":{}}},"snapshot_id":"x"}}"#)
            .unwrap_err();
        assert!(matches!(e, FormatError::NoData { .. }), "{e:?}");
    }

    #[test]
    fn snapshot_data_round_trips_and_reads_format_0() {
        let mut applied = Applied::default();
        applied.state.last_job_id = 4;
        applied.state.cluster_id = Some("c".into());
        let bytes = encode_snapshot_data(&applied).unwrap();
        assert!(bytes.starts_with(b"{\"v\":1,\"last_applied\""));
        let back = decode_snapshot_data(&bytes).unwrap();
        assert_eq!(back.state, applied.state);
        let streamed = read_snapshot_data(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(streamed.state, applied.state);
        let e = read_snapshot_data(std::io::Cursor::new(&bytes[..bytes.len() - 1])).unwrap_err();
        assert!(matches!(e, FormatError::Malformed { .. }), "{e:?}");
        let format_0 = serde_json::json!({
            "last_applied": null,
            "last_membership": applied.last_membership,
            "state": applied.state,
        });
        let back = decode_snapshot_data(&serde_json::to_vec(&format_0).unwrap()).unwrap();
        assert_eq!(back.state, applied.state);
    }
}
