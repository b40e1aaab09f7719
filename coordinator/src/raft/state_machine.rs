//! The Raft state machine: the pure [`State`] in memory, persisted as snapshots in redb.
//!
//! `apply` keeps the state in memory; durability comes from the log (fsync'd on append) plus the last
//! snapshot: on start the state is loaded from the snapshot and openraft re-applies the committed log
//! entries after it.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{blocking, ServerId, StorageError, TypeConfig};
use crate::state::{CommandOutcome, State};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const KEY_SNAPSHOT: &str = "current";

/// What the state machine holds: the state plus Raft's bookkeeping of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<ServerId>>,
    pub last_membership: StoredMembership<ServerId, BasicNode>,
    pub state: State,
}

#[derive(Serialize, Deserialize)]
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
    /// Opens the state machine, loading the last snapshot from `db` if there is one.
    pub fn open(db: Arc<Database>) -> Result<Self, anyhow::Error> {
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOT)?;
        txn.commit()?;
        let applied = match read_snapshot(&db)? {
            Some(stored) => serde_json::from_slice(&stored.data)?,
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
    let txn = db
        .begin_read()
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    let table = txn
        .open_table(SNAPSHOT)
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    let Some(raw) = table
        .get(KEY_SNAPSHOT)
        .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    else {
        return Ok(None);
    };
    let stored =
        serde_json::from_slice(raw.value()).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    Ok(Some(stored))
}

fn write_snapshot(db: &Database, stored: &StoredSnapshot) -> Result<(), StorageError> {
    let sig = Some(stored.meta.signature());
    let bytes =
        serde_json::to_vec(stored).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    let txn = db
        .begin_write()
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    {
        let mut table = txn
            .open_table(SNAPSHOT)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        table
            .insert(KEY_SNAPSHOT, bytes.as_slice())
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    }
    txn.commit()
        .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, last_membership) = {
            let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
            let data =
                serde_json::to_vec(&*guard).map_err(|e| StorageIOError::read_state_machine(&e))?;
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
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let db = self.db.clone();
        let stored = blocking(move || {
            write_snapshot(&db, &stored)?;
            Ok(stored)
        })
        .await?;
        Ok(Snapshot {
            meta,
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
        let applied: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let db = self.db.clone();
        blocking(move || write_snapshot(&db, &stored)).await?;
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
