//! Every released storage format keeps loading, to the same state: fixtures of the Raft log and of
//! the stored snapshot, byte for byte as each release wrote them, read through the real log store and
//! state machine (`coordinator/src/raft/format.rs` says what the formats are and the policy).
//!
//! `tests/fixtures/`:
//! - `log-v0.jsonl`: a log of format 0 (releases before versioning), one stored entry a line, line n
//!   at index n: the membership `initialize` writes, blank entries of two terms, and every kind of
//!   command (tokens, admissions, registrations, audited and batched submissions, placements, rank
//!   reports, checkpoints, a restart, a resume, a cancel, a drain, a lost node, a failed pending job,
//!   a revoked token, and commands the state refused: they stay in a log too). Written by the code of
//!   99a0e5f (the generator is in this file's history, commit "test: format-0 fixtures").
//! - `log-v1.jsonl`: the same log in format 1.
//! - `state-after-log.json`: the state that log reached when it was written. Fields added to
//!   `State` since (with `#[serde(default)]`) read as their defaults.
//! - `snapshot-v0.json` (`{"meta":…,"data":[…]}` under key `current`), `snapshot-v1.json` plus
//!   `snapshot-v1.data.json` (keys `current` and `current.data`), and `snapshot-v2.json` (key
//!   `current`) plus `snapshot-v2.data.json` (the file under `<data-dir>/snapshots/` that the header
//!   names): the stored snapshot of that state.
//!
//! # When a format changes
//!
//! 1. Bump `LOG_FORMAT_VERSION` or `SNAPSHOT_FORMAT_VERSION` and keep decoding the old shapes
//!    (`raft/format.rs`).
//! 2. Run `cargo test -p trainctl-coordinator --test format -- --ignored write_fixtures_of_this_format`:
//!    it writes the format-0 log and snapshot again in the current formats, as `log-v<N>.jsonl` and
//!    `snapshot-v<N>.json` / `snapshot-v<N>.data.json` (the header and the data, wherever the format
//!    keeps it), and never overwrites a file. If the change
//!    comes with new commands, add a log of them of its own (with its expected state) as well.
//! 3. Add the new files to [`LOGS`] / [`SNAPSHOTS`] and commit them.
//!
//! Old fixtures stay forever and are never edited: a release whose code no longer replays one to its
//! expected state has changed what an existing cluster's log means.

use std::ops::RangeFull;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::io::AsyncReadExt;
use trainctl_coordinator::logs::LogStore as RankLogs;
use trainctl_coordinator::raft::format::{
    decode_entry, decode_snapshot_data, encode_entry, LOG_FORMAT_VERSION,
    SNAPSHOT_DATA_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION,
};
use trainctl_coordinator::raft::log_store::LogStore;
use trainctl_coordinator::raft::state_machine::StateMachineStore;
use trainctl_coordinator::state::State;

/// The stores' tables, as named on disk (a rename is a format change too).
const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// Every released log format's fixture and the format it is in.
const LOGS: &[(&str, u32)] = &[("log-v0.jsonl", 0), ("log-v1.jsonl", 1)];
/// Every released stored-snapshot format's fixture: the value under `current`, the data (none in
/// format 0: it is inline; under `current.data` in format 1, the named file from format 2), and the
/// format.
const SNAPSHOTS: &[(&str, Option<&str>, u32)] = &[
    ("snapshot-v0.json", None, 0),
    ("snapshot-v1.json", Some("snapshot-v1.data.json"), 1),
    ("snapshot-v2.json", Some("snapshot-v2.data.json"), 2),
];
/// The index of the last entry of the fixture logs (and the snapshots' `last_applied`).
const LAST_INDEX: u64 = 42;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The stored records of a fixture: one a line, without the newline.
fn records(name: &str) -> Vec<Vec<u8>> {
    fixture(name)
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn expected_state() -> State {
    serde_json::from_slice(&fixture("state-after-log.json")).expect("state-after-log.json")
}

/// The version a stored record says it is in (absent: 0).
fn version_of(record: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(record).expect("a JSON record");
    value
        .get("v")
        .map_or(0, |v| v.as_u64().expect("v is a number"))
}

fn empty_db() -> (tempfile::TempDir, Arc<Database>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Arc::new(Database::create(dir.path().join("state.redb")).expect("create db"));
    (dir, db)
}

/// The state machine of the data dir `dir` (snapshots and rank logs where a coordinator keeps them).
fn open_sm(dir: &Path, db: &Arc<Database>) -> anyhow::Result<StateMachineStore> {
    StateMachineStore::open(
        db.clone(),
        dir.join("snapshots"),
        RankLogs::new(dir.join("logs")),
    )
}

/// The snapshot files in the data dir `dir`.
fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Puts `entries` into the log table as they are, entry n at index n.
fn put_log(db: &Database, entries: &[Vec<u8>]) {
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(RAFT_LOG).unwrap();
        for (index, bytes) in entries.iter().enumerate() {
            table.insert(index as u64, bytes.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// Stores a snapshot as `values` say: redb keys and values, and from format 2 on the data as the file
/// the header (`current`) names, in the data dir `dir`.
fn put_snapshot(dir: &Path, db: &Database, values: &[(&str, Vec<u8>)]) {
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(SNAPSHOT).unwrap();
        for (key, bytes) in values {
            if *key != FILE_KEY {
                table.insert(*key, bytes.as_slice()).unwrap();
            }
        }
    }
    txn.commit().unwrap();
    if let Some((_, data)) = values.iter().find(|(k, _)| *k == FILE_KEY) {
        let header: serde_json::Value = serde_json::from_slice(&values[0].1).unwrap();
        let name = header["file"]
            .as_str()
            .expect("a format-2 header names its file");
        std::fs::create_dir_all(dir.join("snapshots")).unwrap();
        std::fs::write(dir.join("snapshots").join(name), data).unwrap();
    }
}

/// Stands for the snapshot file in [`snapshot_values`] (format 2 on).
const FILE_KEY: &str = "(file)";

fn stored_snapshot(db: &Database) -> Vec<(String, Vec<u8>)> {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(SNAPSHOT).unwrap();
    table
        .range::<&str>(..)
        .unwrap()
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.value().to_string(), v.value().to_vec())
        })
        .collect()
}

/// The fixture snapshot `current` (and `current.data`, or the file) values as a store holds them.
fn snapshot_values(header: &str, data: Option<&str>) -> Vec<(&'static str, Vec<u8>)> {
    let one = |name: &str| records(name).pop().expect("one record");
    let header = one(header);
    let file = version_of(&header) >= 2;
    let mut values = vec![("current", header)];
    if let Some(data) = data {
        values.push((if file { FILE_KEY } else { "current.data" }, one(data)));
    }
    values
}

#[tokio::test]
async fn every_released_log_replays_to_the_same_state() {
    let expected = expected_state();
    for &(name, version) in LOGS {
        let entries = records(name);
        assert_eq!(entries.len() as u64, LAST_INDEX + 1, "{name}");
        for (index, bytes) in entries.iter().enumerate() {
            assert_eq!(
                version_of(bytes),
                u64::from(version),
                "{name}:{}",
                index + 1
            );
        }
        let (dir, db) = empty_db();
        let mut log = LogStore::open(db.clone()).unwrap();
        let mut sm = open_sm(dir.path(), &db).unwrap();
        put_log(&db, &entries);

        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|id| id.index), Some(LAST_INDEX));
        let read = log.try_get_log_entries::<RangeFull>(..).await.unwrap();
        for (index, entry) in read.iter().enumerate() {
            assert_eq!(entry.log_id.index, index as u64, "{name}");
        }
        sm.apply(read).await.unwrap();

        let (last_applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(last_applied.map(|id| id.index), Some(LAST_INDEX), "{name}");
        assert_eq!(
            membership.membership().voter_ids().collect::<Vec<_>>(),
            [1],
            "{name}"
        );
        let replayed = sm.read(State::clone);
        assert!(
            replayed == expected,
            "{name} replays to another state than it did when it was written:\n{}",
            first_difference(&replayed, &expected)
        );
    }
}

/// The first line where the two states' pretty JSON differ, for a readable failure.
fn first_difference(got: &State, want: &State) -> String {
    let got = serde_json::to_string_pretty(got).unwrap();
    let want = serde_json::to_string_pretty(want).unwrap();
    got.lines()
        .zip(want.lines())
        .enumerate()
        .find(|(_, (g, w))| g != w)
        .map_or("(only their lengths differ)".into(), |(i, (g, w))| {
            format!("line {}: got `{g}`, want `{w}`", i + 1)
        })
}

#[tokio::test]
async fn every_released_snapshot_loads_and_is_rewritten_in_the_current_format() {
    let expected = expected_state();
    for &(header, data, version) in SNAPSHOTS {
        let values = snapshot_values(header, data);
        for (key, bytes) in &values {
            // The file of format 2 holds snapshot data of format 1 (the data did not change).
            let want = if *key == FILE_KEY { 1 } else { version };
            assert_eq!(version_of(bytes), u64::from(want), "{header} {key}");
        }
        let (dir, db) = empty_db();
        open_sm(dir.path(), &db).unwrap();
        put_snapshot(dir.path(), &db, &values);

        // Opening moves an older stored snapshot to a file (format 2), the data as it was (format 0
        // data has no version).
        let mut sm = open_sm(dir.path(), &db).unwrap();
        assert!(sm.read(State::clone) == expected, "{header}: another state");
        let data_version = if version == 0 {
            0
        } else {
            SNAPSHOT_DATA_FORMAT_VERSION
        };
        assert_current_format(dir.path(), &db, header, data_version);
        let (last_applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(last_applied.map(|id| id.index), Some(LAST_INDEX));
        let mut current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(current.meta.last_log_id, last_applied, "{header}");
        let mut sent = Vec::new();
        current.snapshot.read_to_end(&mut sent).await.unwrap();
        let sent = decode_snapshot_data(&sent).unwrap();
        assert!(sent.state == expected, "{header}: the data sent differs");

        // The next snapshot replaces it in the current format, and loads again.
        sm.build_snapshot().await.unwrap();
        assert_current_format(dir.path(), &db, header, SNAPSHOT_DATA_FORMAT_VERSION);
        let reopened = open_sm(dir.path(), &db).unwrap();
        assert!(
            reopened.read(State::clone) == expected,
            "{header}: rewritten"
        );
    }
}

/// The stored snapshot is of the current format: one header naming the one snapshot file, whose data
/// is of format `data_version`.
fn assert_current_format(dir: &Path, db: &Database, what: &str, data_version: u32) {
    let stored = stored_snapshot(db);
    let keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["current"], "{what}");
    assert_eq!(
        version_of(&stored[0].1),
        u64::from(SNAPSHOT_FORMAT_VERSION),
        "{what}"
    );
    let header: serde_json::Value = serde_json::from_slice(&stored[0].1).unwrap();
    let file = header["file"].as_str().expect("a file").to_string();
    assert_eq!(snapshot_files(dir), std::slice::from_ref(&file), "{what}");
    let data = std::fs::read(dir.join("snapshots").join(file)).unwrap();
    assert_eq!(version_of(&data), u64::from(data_version), "{what}");
}

#[tokio::test]
async fn a_log_of_a_newer_format_is_refused_with_a_clear_error() {
    let newer = LOG_FORMAT_VERSION + 1;
    let mut entries = records("log-v1.jsonl");
    entries[3] = String::from_utf8(entries[3].clone())
        .unwrap()
        .replacen("{\"v\":1,", &format!("{{\"v\":{newer},"), 1)
        .into_bytes();
    let (_dir, db) = empty_db();
    let mut log = LogStore::open(db.clone()).unwrap();
    put_log(&db, &entries);
    let error = log
        .try_get_log_entries::<RangeFull>(..)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!(
            "Raft log entry 3 was written by a newer trainctl (format {newer}); this binary reads up to {LOG_FORMAT_VERSION}"
        )),
        "{error}"
    );
    // The entries before it are readable.
    assert_eq!(log.try_get_log_entries(0..3).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_snapshot_of_a_newer_format_stops_the_coordinator_from_opening() {
    let bump = |bytes: Vec<u8>, newer: u32| {
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let v = value["v"].as_u64().unwrap();
        String::from_utf8(bytes)
            .unwrap()
            .replacen(&format!("{{\"v\":{v},"), &format!("{{\"v\":{newer},"), 1)
            .into_bytes()
    };
    for (header, data) in [
        ("snapshot-v1.json", "snapshot-v1.data.json"),
        ("snapshot-v2.json", "snapshot-v2.data.json"),
    ] {
        let values = snapshot_values(header, Some(data));
        for i in 0..values.len() {
            // The header newer, then (with a current header) the data newer.
            let supported = if i == 0 {
                SNAPSHOT_FORMAT_VERSION
            } else {
                SNAPSHOT_DATA_FORMAT_VERSION
            };
            let newer = supported + 1;
            let mut one = values.clone();
            one[i].1 = bump(one[i].1.clone(), newer);
            let (dir, db) = empty_db();
            open_sm(dir.path(), &db).unwrap();
            put_snapshot(dir.path(), &db, &one);
            let error = open_sm(dir.path(), &db).err().expect("refused").to_string();
            assert!(
                error.contains(&format!(
                    "was written by a newer trainctl (format {newer}); this binary reads up to {supported}"
                )),
                "{header} {}: {error}",
                one[i].0
            );
        }
    }
}

/// Writes the fixtures of the current formats from the format-0 ones (see the module doc); never
/// overwrites a file.
#[tokio::test]
#[ignore = "writes fixtures; run by hand when a format changes"]
async fn write_fixtures_of_this_format() {
    let write_new = |name: String, bytes: Vec<u8>| {
        let path = fixture_path(&name);
        if path.exists() {
            eprintln!("{} exists; kept", path.display());
        } else {
            std::fs::write(&path, bytes).unwrap();
            eprintln!("wrote {}", path.display());
        }
    };
    let mut log = Vec::new();
    for (index, bytes) in records("log-v0.jsonl").iter().enumerate() {
        let entry = decode_entry(index as u64, bytes).unwrap();
        log.extend(encode_entry(&entry).unwrap());
        log.push(b'\n');
    }
    write_new(format!("log-v{LOG_FORMAT_VERSION}.jsonl"), log);

    let (dir, db) = empty_db();
    open_sm(dir.path(), &db).unwrap();
    put_snapshot(dir.path(), &db, &snapshot_values("snapshot-v0.json", None));
    open_sm(dir.path(), &db)
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    for (key, mut bytes) in stored_snapshot(&db) {
        bytes.push(b'\n');
        let name = match key.as_str() {
            "current" => format!("snapshot-v{SNAPSHOT_FORMAT_VERSION}.json"),
            "current.data" => format!("snapshot-v{SNAPSHOT_FORMAT_VERSION}.data.json"),
            other => panic!("unexpected key {other}"),
        };
        write_new(name, bytes);
    }
    // From format 2 the data is a file of its own.
    for file in snapshot_files(dir.path()) {
        let mut bytes = std::fs::read(dir.path().join("snapshots").join(file)).unwrap();
        bytes.push(b'\n');
        write_new(
            format!("snapshot-v{SNAPSHOT_FORMAT_VERSION}.data.json"),
            bytes,
        );
    }
}
