//! The Raft state machine: the pure [`State`] in memory, persisted as snapshots in redb.
//!
//! `apply` keeps the state in memory; durability comes from the log (fsync'd on append) plus the last
//! snapshot: on start the state is loaded from the snapshot and openraft re-applies the committed log
//! entries after it.
//!
//! Snapshots are stored and sent in the versioned formats of [`super::format`]; the stored snapshot
//! keeps its data apart from its header, so the serialized state is held once, not copied into a
//! second encoding.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::watch;

use super::format::{
    decode_snapshot_data, decode_snapshot_header, encode_snapshot_data, encode_snapshot_header,
};
use super::{blocking, ServerId, StorageError, TypeConfig};
use crate::state::{CommandOutcome, State};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// The stored snapshot's header (and, in format 0, its data too).
const KEY_SNAPSHOT: &str = "current";
/// The stored snapshot's data (format 1 on), as built or received.
const KEY_SNAPSHOT_DATA: &str = "current.data";

/// What the state machine holds: the state plus Raft's bookkeeping of it. Its stored form is
/// [`super::format::encode_snapshot_data`]'s.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last_applied: Option<LogId<ServerId>>,
    pub last_membership: StoredMembership<ServerId, BasicNode>,
    pub state: State,
}

/// A snapshot as stored: its meta and its data (snapshot data of any released format).
struct StoredSnapshot {
    meta: SnapshotMeta<ServerId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine of one coordinator. Clones share the same state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
    /// Bumped after every apply, so loops (the scheduler) wake up when the state changes.
    changes: watch::Sender<u64>,
}

impl StateMachineStore {
    /// Opens the state machine, loading the last snapshot from `db` if there is one (of any released
    /// format; one of a newer format is an error).
    pub fn open(db: Arc<Database>) -> Result<Self, anyhow::Error> {
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOT)?;
        txn.commit()?;
        let applied = match read_snapshot(&db)? {
            Some(stored) => decode_snapshot_data(&stored.data)
                .map_err(|e| anyhow::anyhow!("load the stored snapshot: {e}"))?,
            None => Applied::default(),
        };
        Ok(StateMachineStore {
            db,
            applied: Arc::new(RwLock::new(applied)),
            changes: watch::channel(0).0,
        })
    }

    /// Reads the current state. Never hold the guard across an await.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
        f(&guard.state)
    }

    /// A receiver that sees a new value after every apply.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn read_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, StorageError> {
    fn err<E: std::error::Error + 'static>(e: &E) -> StorageIOError<ServerId> {
        StorageIOError::read_snapshot(None, e)
    }
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let table = txn.open_table(SNAPSHOT).map_err(|e| err(&e))?;
    let Some(raw) = table.get(KEY_SNAPSHOT).map_err(|e| err(&e))? else {
        return Ok(None);
    };
    let header = decode_snapshot_header(raw.value()).map_err(|e| err(&e))?;
    let data = match header.inline_data {
        // Format 0: the data is inline.
        Some(data) => data,
        None => match table.get(KEY_SNAPSHOT_DATA).map_err(|e| err(&e))? {
            Some(raw) => raw.value().to_vec(),
            None => {
                let missing = std::io::Error::other(format!(
                    "the stored snapshot (format {}) has no `{KEY_SNAPSHOT_DATA}`",
                    header.version
                ));
                return Err(err(&missing).into());
            }
        },
    };
    Ok(Some(StoredSnapshot {
        meta: header.meta,
        data,
    }))
}

/// Stores `meta` and `data` (format [`super::format::SNAPSHOT_FORMAT_VERSION`]) in one transaction,
/// replacing the snapshot of any format stored before.
fn write_snapshot(
    db: &Database,
    meta: &SnapshotMeta<ServerId, BasicNode>,
    data: &[u8],
) -> Result<(), StorageError> {
    fn err<E: std::error::Error + 'static>(
        meta: &SnapshotMeta<ServerId, BasicNode>,
        e: &E,
    ) -> StorageIOError<ServerId> {
        StorageIOError::write_snapshot(Some(meta.signature()), e)
    }
    let header = encode_snapshot_header(meta).map_err(|e| err(meta, &e))?;
    let txn = db.begin_write().map_err(|e| err(meta, &e))?;
    {
        let mut table = txn.open_table(SNAPSHOT).map_err(|e| err(meta, &e))?;
        table
            .insert(KEY_SNAPSHOT, header.as_slice())
            .map_err(|e| err(meta, &e))?;
        table
            .insert(KEY_SNAPSHOT_DATA, data)
            .map_err(|e| err(meta, &e))?;
    }
    txn.commit().map_err(|e| err(meta, &e))?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, last_membership) = {
            let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
            let data =
                encode_snapshot_data(&guard).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (data, guard.last_applied, guard.last_membership.clone())
        };
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let db = self.db.clone();
        let stored = StoredSnapshot { meta, data };
        let stored = blocking(move || {
            write_snapshot(&db, &stored.meta, &stored.data)?;
            Ok(stored)
        })
        .await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<ServerId>>,
            StoredMembership<ServerId, BasicNode>,
        ),
        StorageError,
    > {
        let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
        Ok((guard.last_applied, guard.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        {
            let mut guard = self.applied.write().unwrap_or_else(|e| e.into_inner());
            for entry in entries {
                guard.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => CommandOutcome::Done,
                    EntryPayload::Normal(command) => guard.state.apply(command),
                    EntryPayload::Membership(membership) => {
                        guard.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        CommandOutcome::Done
                    }
                };
                outcomes.push(outcome);
            }
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ServerId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let applied = decode_snapshot_data(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // Stored as received (its format is in it), so the data is never held in a second encoding.
        let db = self.db.clone();
        let meta = meta.clone();
        blocking(move || write_snapshot(&db, &meta, &data)).await?;
        *self.applied.write().unwrap_or_else(|e| e.into_inner()) = applied;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let db = self.db.clone();
        let stored = blocking(move || read_snapshot(&db)).await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
