//! The Raft log, vote and commit index in redb. Every append is a durable (fsync'd) transaction.
//!
//! Each entry is stored in the versioned format of [`super::format`] (`encode_entry`), and read
//! back in any released format (`decode_entry`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

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

/// The Raft log of one coordinator, stored in its redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens the log in `db`, creating its tables on first use.
    pub fn open(db: Arc<Database>) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore { db })
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

    /// Writes one metadata value; `durable` commits wait for fsync, others ride on the next one.
    fn write_meta<T: serde::Serialize>(
        db: &Database,
        key: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        let mut txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageIOError::write(&e))?;
        }
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
        let db = self.db.clone();
        let range = (
            bound_owned(range.start_bound()),
            bound_owned(range.end_bound()),
        );
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
        blocking(move || Self::write_meta(&db, KEY_VOTE, &vote, true)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<ServerId>>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_meta(&db, KEY_VOTE)).await
    }

    /// The commit index is a hint (openraft recomputes it from a quorum), so it is written without
    /// waiting for fsync: it reaches disk with the next log append.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<ServerId>>,
    ) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || Self::write_meta(&db, KEY_COMMITTED, &committed, false)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<ServerId>>, StorageError> {
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
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode_entry(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let result = blocking(move || {
            let txn = db
                .begin_write()
                .map_err(|e| StorageIOError::write_logs(&e))?;
            {
                let mut table = txn
                    .open_table(LOG)
                    .map_err(|e| StorageIOError::write_logs(&e))?;
                for (index, bytes) in &encoded {
                    table
                        .insert(index, bytes.as_slice())
                        .map_err(|e| StorageIOError::write_logs(&e))?;
                }
            }
            txn.commit().map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await;
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result
    }

    async fn truncate(&mut self, log_id: LogId<ServerId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || remove_entries(&db, log_id.index.., None)).await
    }

    async fn purge(&mut self, log_id: LogId<ServerId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || remove_entries(&db, ..=log_id.index, Some(&log_id))).await
    }
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
