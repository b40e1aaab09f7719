//! The Raft log, vote and commit index in redb. Every append is a durable (fsync'd) transaction.
//!
//! Each entry is stored in the versioned format of [`super::format`] (`encode_entry`), and read
//! back in any released format (`decode_entry`).
//!
//! The newest entries are also kept decoded in memory ([`Tail`]): openraft reads every entry back
//! right after appending it, once to replicate it and once to apply it, and serving those reads from
//! memory spares each a blocking-pool hand-off, a redb read and a JSON decode on the write path.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::format::{decode_entry, encode_entry};
use super::{blocking, ServerId, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Most entries the in-memory tail keeps.
pub const TAIL_MAX_ENTRIES: usize = 4096;
/// Most encoded bytes the in-memory tail keeps (its entries' stored size).
pub const TAIL_MAX_BYTES: usize = 32 << 20;

/// The Raft log of one coordinator, stored in its redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    tail: Arc<Mutex<Tail>>,
    /// The newest commit index openraft reported and no transaction has stored yet: the next log
    /// append stores it in the same transaction (see [`RaftLogStorage::save_committed`] below).
    unsaved_committed: Arc<Mutex<Option<Option<LogId<ServerId>>>>>,
}

/// The newest log entries, consecutive and already durable in redb, kept decoded for the reads
/// that follow an append. Bounded by [`TAIL_MAX_ENTRIES`] and [`TAIL_MAX_BYTES`]; anything older
/// (or evicted) is read from redb.
#[derive(Debug, Default)]
pub struct Tail {
    /// Entries with consecutive indexes, oldest first, each with its encoded size.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn next_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index + 1)
    }

    /// Records entries just made durable. A batch that does not follow the tail (after a
    /// truncation the store did not see, or a gap) starts a new tail.
    pub fn push(&mut self, appended: Vec<(Entry<TypeConfig>, usize)>) {
        for (entry, size) in appended {
            if self.next_index() != Some(entry.log_id.index) {
                self.clear();
            }
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > TAIL_MAX_ENTRIES
            || (self.bytes > TAIL_MAX_BYTES && !self.entries.is_empty())
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The entries of `[start, end)`, or `None` when the tail does not hold all of them.
    pub fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        let next = self.next_index()?;
        if start < first || end > next || start > end {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// Forgets the entries from index `since` on (a truncation).
    pub fn truncate(&mut self, since: u64) {
        while self.next_index().is_some_and(|next| next > since) {
            let Some((_, size)) = self.entries.pop_back() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Forgets the entries up to index `upto`, inclusive (a purge).
    pub fn purge(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            let Some((_, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// `[start, end)` of a range of indexes, when it is bounded above (reads of the log always are).
fn half_open(range: &(Bound<u64>, Bound<u64>)) -> Option<(u64, u64)> {
    let start = match range.0 {
        Bound::Included(x) => x,
        Bound::Excluded(x) => x.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.1 {
        Bound::Included(x) => x.checked_add(1)?,
        Bound::Excluded(x) => x,
        Bound::Unbounded => return None,
    };
    Some((start, end))
}

impl LogStore {
    /// Opens the log in `db`, creating its tables on first use.
    pub fn open(db: Arc<Database>) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore {
            db,
            tail: Arc::new(Mutex::new(Tail::default())),
            unsaved_committed: Arc::new(Mutex::new(None)),
        })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = db.begin_read().map_err(|e| StorageIOError::read(&e))?;
        let table = txn.open_table(META).map_err(|e| StorageIOError::read(&e))?;
        let Some(raw) = table.get(key).map_err(|e| StorageIOError::read(&e))? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(raw.value()).map_err(|e| StorageIOError::read(&e))?;
        Ok(Some(value))
    }

    /// Writes one metadata value in a durable (fsync'd) transaction.
    fn write_meta<T: serde::Serialize>(
        db: &Database,
        key: &str,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        let txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
        {
            let mut table = txn
                .open_table(META)
                .map_err(|e| StorageIOError::write(&e))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| StorageIOError::write(&e))?;
        }
        txn.commit().map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }
}

fn bound_owned(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(x) => Bound::Included(*x),
        Bound::Excluded(x) => Bound::Excluded(*x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let range = (
            bound_owned(range.start_bound()),
            bound_owned(range.end_bound()),
        );
        if let Some((start, end)) = half_open(&range) {
            if let Some(entries) = self.tail().get(start, end) {
                return Ok(entries);
            }
        }
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(|e| StorageIOError::read_logs(&e))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let mut entries = Vec::new();
            for item in table
                .range::<u64>(range)
                .map_err(|e| StorageIOError::read_logs(&e))?
            {
                let (index, raw) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry = decode_entry(index.value(), raw.value())
                    .map_err(|e| StorageIOError::read_logs(&e))?;
                entries.push(entry);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged: Option<LogId<ServerId>> = Self::read_meta(&db, KEY_LAST_PURGED)?;
            let txn = db.begin_read().map_err(|e| StorageIOError::read_logs(&e))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let last = match table.last().map_err(|e| StorageIOError::read_logs(&e))? {
                Some((index, raw)) => {
                    let entry = decode_entry(index.value(), raw.value())
                        .map_err(|e| StorageIOError::read_logs(&e))?;
                    Some(entry.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<ServerId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        let vote = *vote;
        blocking(move || Self::write_meta(&db, KEY_VOTE, &vote)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<ServerId>>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_meta(&db, KEY_VOTE)).await
    }

    /// The commit index is a hint (openraft recomputes it from a quorum; on a restart it only lets
    /// the member apply what it already knew to be committed before it hears from a leader), so it
    /// costs no IO here: it is kept in memory and stored by the next log append, in that append's
    /// transaction. openraft calls this before applying every commit, on the write path; a redb
    /// transaction of its own there (even without fsync) cost a blocking-pool hand-off per write.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<ServerId>>,
    ) -> Result<(), StorageError> {
        *self
            .unsaved_committed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(committed);
        Ok(())
    }

    /// The newest hint: the one not yet stored, or else the stored one (after a restart).
    async fn read_committed(&mut self) -> Result<Option<LogId<ServerId>>, StorageError> {
        if let Some(unsaved) = *self
            .unsaved_committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            return Ok(unsaved);
        }
        let db = self.db.clone();
        blocking(move || {
            Ok(Self::read_meta::<Option<LogId<ServerId>>>(&db, KEY_COMMITTED)?.flatten())
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.db.clone();
        let committed = self
            .unsaved_committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|c| serde_json::to_vec(&c))
            .transpose()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut encoded = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = encode_entry(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            appended.push((entry.clone(), bytes.len()));
            encoded.push((entry.log_id.index, bytes));
        }
        let result = blocking(move || store_appended(&db, &encoded, committed.as_deref())).await;
        if result.is_ok() {
            self.tail().push(appended);
        }
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result
    }

    async fn truncate(&mut self, log_id: LogId<ServerId>) -> Result<(), StorageError> {
        // Out of the tail first: a reader then finds these entries in redb or nowhere.
        self.tail().truncate(log_id.index);
        let db = self.db.clone();
        blocking(move || remove_entries(&db, log_id.index.., None)).await
    }

    async fn purge(&mut self, log_id: LogId<ServerId>) -> Result<(), StorageError> {
        self.tail().purge(log_id.index);
        let db = self.db.clone();
        blocking(move || remove_entries(&db, ..=log_id.index, Some(&log_id))).await
    }
}

/// Stores appended entries (index, encoded entry) in one durable transaction, with the commit hint
/// when there is one to store.
fn store_appended(
    db: &Database,
    encoded: &[(u64, Vec<u8>)],
    committed: Option<&[u8]>,
) -> Result<(), StorageError> {
    let txn = db
        .begin_write()
        .map_err(|e| StorageIOError::write_logs(&e))?;
    {
        let mut table = txn
            .open_table(LOG)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        for (index, bytes) in encoded {
            table
                .insert(index, bytes.as_slice())
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
    }
    if let Some(committed) = committed {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        meta.insert(KEY_COMMITTED, committed)
            .map_err(|e| StorageIOError::write_logs(&e))?;
    }
    txn.commit().map_err(|e| StorageIOError::write_logs(&e))?;
    Ok(())
}

/// Removes the log entries in `range` in one durable transaction, recording `last_purged` with them
/// when the removal is a purge (so the two never disagree after a crash).
fn remove_entries(
    db: &Database,
    range: impl std::ops::RangeBounds<u64>,
    last_purged: Option<&LogId<ServerId>>,
) -> Result<(), StorageError> {
    let txn = db
        .begin_write()
        .map_err(|e| StorageIOError::write_logs(&e))?;
    {
        if let Some(log_id) = last_purged {
            let bytes = serde_json::to_vec(log_id).map_err(|e| StorageIOError::write_logs(&e))?;
            let mut meta = txn
                .open_table(META)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            meta.insert(KEY_LAST_PURGED, bytes.as_slice())
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        let mut table = txn
            .open_table(LOG)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        table
            .retain_in(range, |_, _| false)
            .map_err(|e| StorageIOError::write_logs(&e))?;
    }
    txn.commit().map_err(|e| StorageIOError::write_logs(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A tail holding `indexes` (term 1, 10 bytes each), pushed in one batch.
    fn tail_of(indexes: std::ops::Range<u64>) -> Tail {
        let mut tail = Tail::default();
        tail.push(indexes.map(|i| (entry(1, i), 10)).collect());
        tail
    }

    fn indexes(entries: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<u64>> {
        entries.map(|e| e.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn the_tail_answers_only_ranges_it_holds_whole() {
        let tail = tail_of(5..10);
        let cases: [(u64, u64, Option<Vec<u64>>); 7] = [
            (5, 10, Some(vec![5, 6, 7, 8, 9])),
            (7, 9, Some(vec![7, 8])),
            (9, 10, Some(vec![9])),
            (8, 8, Some(vec![])),
            (4, 8, None),  // starts before the tail: redb has it
            (6, 11, None), // runs past the last entry
            (9, 7, None),  // not a range
        ];
        for (start, end, want) in cases {
            assert_eq!(indexes(tail.get(start, end)), want, "[{start}, {end})");
        }
        assert_eq!(indexes(Tail::default().get(0, 0)), None, "an empty tail");
    }

    #[test]
    fn truncation_and_purge_forget_exactly_their_entries() {
        let mut tail = tail_of(5..10);
        tail.truncate(8);
        assert_eq!(indexes(tail.get(5, 8)), Some(vec![5, 6, 7]));
        assert_eq!(tail.get(5, 9), None, "8 was truncated");
        tail.purge(5);
        assert_eq!(tail.get(5, 6), None, "5 was purged");
        assert_eq!(indexes(tail.get(6, 8)), Some(vec![6, 7]));
        assert_eq!(tail.bytes, 20);
        tail.truncate(0);
        assert_eq!(tail.get(6, 7), None);
        assert_eq!(tail.bytes, 0);
    }

    #[test]
    fn an_append_that_does_not_follow_the_tail_starts_a_new_one() {
        // After a truncation the tail did not see, index 7 is written again by a later term.
        let mut tail = tail_of(5..10);
        tail.push(vec![(entry(2, 7), 10)]);
        assert_eq!(
            tail.get(5, 7),
            None,
            "the old entries before the rewrite are gone"
        );
        let got = tail.get(7, 8).expect("the new entry");
        assert_eq!(got[0].log_id.leader_id.term, 2);
        // A gap also restarts it.
        tail.push(vec![(entry(2, 20), 10)]);
        assert_eq!(tail.get(7, 8), None);
        assert_eq!(indexes(tail.get(20, 21)), Some(vec![20]));
    }

    #[test]
    fn the_tail_stays_within_its_bounds() {
        let mut tail = Tail::default();
        let n = TAIL_MAX_ENTRIES as u64 + 10;
        tail.push((0..n).map(|i| (entry(1, i), 1)).collect());
        assert_eq!(tail.entries.len(), TAIL_MAX_ENTRIES);
        assert_eq!(tail.first_index(), Some(10));
        // One entry larger than the byte bound is dropped at once.
        tail.push(vec![(entry(1, n), TAIL_MAX_BYTES + 1)]);
        assert!(tail.bytes <= TAIL_MAX_BYTES);
        assert_eq!(tail.get(n, n + 1), None);
    }

    #[test]
    fn half_open_ranges() {
        use Bound::*;
        assert_eq!(half_open(&(Included(3), Excluded(7))), Some((3, 7)));
        assert_eq!(half_open(&(Excluded(3), Included(7))), Some((4, 8)));
        assert_eq!(half_open(&(Unbounded, Included(2))), Some((0, 3)));
        assert_eq!(half_open(&(Included(3), Unbounded)), None);
        assert_eq!(half_open(&(Included(0), Included(u64::MAX))), None);
    }

    #[tokio::test]
    async fn the_commit_hint_costs_no_transaction_and_is_stored_by_the_next_append() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Arc::new(Database::create(dir.path().join("state.redb")).expect("create db"));
        let committed = LogId::new(CommittedLeaderId::new(1, 1), 4);

        let mut store = LogStore::open(db.clone()).expect("open");
        store.save_committed(Some(committed)).await.expect("save");
        assert_eq!(store.read_committed().await.expect("read"), Some(committed));
        let mut reopened = LogStore::open(db.clone()).expect("reopen");
        assert_eq!(
            reopened.read_committed().await.expect("read"),
            None,
            "nothing written yet: a restart here starts without the hint"
        );

        // What `append` writes: the entries and the hint it took, in one transaction.
        let hint = store
            .unsaved_committed
            .lock()
            .expect("lock")
            .take()
            .map(|c| serde_json::to_vec(&c).expect("encode"));
        let fifth = encode_entry(&entry(1, 5)).expect("encode entry");
        store_appended(&db, &[(5, fifth)], hint.as_deref()).expect("store");
        let mut reopened = LogStore::open(db.clone()).expect("reopen");
        assert_eq!(
            reopened.read_committed().await.expect("read"),
            Some(committed)
        );
        assert_eq!(
            reopened.get_log_state().await.expect("state").last_log_id,
            Some(entry(1, 5).log_id)
        );
    }
}
