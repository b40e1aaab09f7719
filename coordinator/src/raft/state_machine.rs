//! The Raft state machine: the pure [`State`] in memory, snapshots in files, rank logs on disk.
//!
//! `apply` keeps the state in memory; durability comes from the log (fsync'd on append) plus the last
//! snapshot: on start the state is loaded from the snapshot and openraft re-applies the committed log
//! entries after it.
//!
//! # Snapshots
//!
//! A snapshot is a file under `<data-dir>/snapshots/` (the format is in [`super::format`]): built by
//! serializing the state straight into the file, received from the leader chunk by chunk into a file,
//! loaded by decoding the file as it is read. The whole encoded state is never one allocation or one
//! message; openraft sends it in chunks of `snapshot_max_chunk_size`. A file is written under a
//! temporary name, fsync'd and renamed; then the header in redb (table `snapshot`, key `current`) is
//! switched to it in one transaction, and the previous file is deleted. A crash at any point leaves the
//! previous snapshot current; leftovers (a half-received file, a file no header names) are deleted
//! when the store opens. Only the current snapshot and the one being received or built are on disk.
//! A snapshot of an older format stored in redb (formats 0 and 1) is loaded and moved to a file when
//! the store opens.
//!
//! # Rank logs
//!
//! [`Command::AppendLogs`] changes nothing in [`State`]; applying it here appends its chunks to the
//! coordinator's [`LogStore`], idempotent by offset, so a replayed entry (a restart re-applies the log
//! after the snapshot) stores nothing twice. Every member applies the same log and so holds the same
//! rank logs, except for one gap, stated plainly: a member that catches up by installing a snapshot
//! gets the state but not the rank logs written before it (a snapshot does not carry them). Chunks of
//! those logs that arrive later start beyond the end of the member's file and are skipped (a debug
//! log, never an error that stops Raft), so on that member such a rank's log stays short until the
//! job's logs are removed. A member that cannot write a chunk (a full disk) logs the error and
//! answers the command with a rejection, so the agent resends through the leader.

use std::fs;
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::format::{
    decode_snapshot_data, decode_snapshot_header, encode_snapshot_header, read_snapshot_data,
    write_snapshot_data,
};
use super::{blocking, ServerId, StorageError, TypeConfig};
use crate::logs::LogStore;
use crate::state::{Command, CommandOutcome, LogRecord, State};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// The stored snapshot's header (and, in format 0, its data too).
const KEY_SNAPSHOT: &str = "current";
/// The stored snapshot's data in format 1 (moved to a file on open).
const KEY_SNAPSHOT_DATA: &str = "current.data";
/// Names of files being written (built or received); never current, deleted on open.
const TEMP_SUFFIX: &str = ".tmp";
/// The most snapshot bytes one Raft message carries (openraft's `snapshot_max_chunk_size`). The
/// Raft RPC body is JSON, where a chunk's bytes are an array of numbers (up to 4 characters a byte):
/// a chunk's message is at most about 4 × this plus the snapshot's meta (see
/// `benches/benches/snapshot_install.rs` for the measured largest body).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 256 * 1024;
/// Buffer between the serializer (or deserializer) and a snapshot file.
const SNAPSHOT_IO_BUFFER_BYTES: usize = 1 << 20;

/// What the state machine holds: the state plus Raft's bookkeeping of it. Its stored form is
/// [`super::format::write_snapshot_data`]'s.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last_applied: Option<LogId<ServerId>>,
    pub last_membership: StoredMembership<ServerId, BasicNode>,
    pub state: State,
}

type Meta = SnapshotMeta<ServerId, BasicNode>;

/// The state machine of one coordinator. Clones share the same state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    /// `<data-dir>/snapshots`.
    dir: PathBuf,
    /// Where committed [`Command::AppendLogs`] chunks go.
    logs: LogStore,
    applied: Arc<RwLock<Applied>>,
    /// Bumped after every apply, so loops (the scheduler) wake up when the state changes.
    changes: watch::Sender<u64>,
    /// Bumped after every snapshot installed from the leader (it carries no rank-log files).
    installs: watch::Sender<u64>,
    /// The temporary file of the snapshot being received, if any.
    receiving: Arc<Mutex<Option<PathBuf>>>,
    /// Held while the current snapshot changes, and while its file is opened.
    current: Arc<Mutex<()>>,
}

impl StateMachineStore {
    /// Opens the state machine: snapshot files in `snapshot_dir` (created if missing; leftovers of an
    /// interrupted build or receive are deleted), committed rank logs appended to `logs`. Loads the
    /// current snapshot if there is one, of any released format (one of an older format is moved to a
    /// file; one of a newer format is an error).
    pub fn open(
        db: Arc<Database>,
        snapshot_dir: PathBuf,
        logs: LogStore,
    ) -> Result<Self, anyhow::Error> {
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOT)?;
        txn.commit()?;
        fs::create_dir_all(&snapshot_dir)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", snapshot_dir.display()))?;
        let store = StateMachineStore {
            db,
            dir: snapshot_dir,
            logs,
            applied: Default::default(),
            changes: watch::channel(0).0,
            installs: watch::channel(0).0,
            receiving: Default::default(),
            current: Default::default(),
        };
        let applied = store
            .load_current()
            .map_err(|e| anyhow::anyhow!("load the stored snapshot: {e}"))?;
        store.remove_leftovers()?;
        *store.applied.write().unwrap_or_else(|e| e.into_inner()) = applied;
        Ok(store)
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

    /// Changes after every snapshot installed from the leader (see `log_repair`).
    pub fn subscribe_installs(&self) -> watch::Receiver<u64> {
        self.installs.subscribe()
    }

    /// The directory snapshot files live in.
    pub fn snapshot_dir(&self) -> &Path {
        &self.dir
    }

    /// The state of the current snapshot, moving one of format 0 or 1 out of redb into a file.
    fn load_current(&self) -> Result<Applied, anyhow::Error> {
        // Read, then let go of the read transaction (and every page it holds) before writing.
        let (header, legacy_data) = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let Some(header) = table.get(KEY_SNAPSHOT)?.map(|raw| raw.value().to_vec()) else {
                return Ok(Applied::default());
            };
            let data = table
                .get(KEY_SNAPSHOT_DATA)?
                .map(|raw| raw.value().to_vec());
            (decode_snapshot_header(&header)?, data)
        };
        if let Some(name) = &header.file {
            let path = self.dir.join(name);
            let file = fs::File::open(&path)
                .map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))?;
            let reader = BufReader::with_capacity(SNAPSHOT_IO_BUFFER_BYTES, file);
            return Ok(read_snapshot_data(reader)?);
        }
        // Format 0 (inline) or 1 (under its own key): small by construction (it was one value).
        let Some(data) = header.inline_data.or(legacy_data) else {
            anyhow::bail!(
                "the stored snapshot (format {}) has no `{KEY_SNAPSHOT_DATA}`",
                header.version
            );
        };
        let applied = decode_snapshot_data(&data)?;
        let temp = self.temp_path("migrating");
        write_file(&temp, |file| io::Write::write_all(file, &data))?;
        let file = fs::File::open(&temp)?;
        self.make_current(&header.meta, &temp, file)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(applied)
    }

    /// Deletes what no header names: temporary files and replaced snapshots. Only at open, when
    /// nothing is being built or received.
    fn remove_leftovers(&self) -> Result<(), anyhow::Error> {
        let current = self.current_file_name()?;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.ends_with(TEMP_SUFFIX)
                || (name.starts_with("snapshot-") && name.ends_with(".json"));
            if ours && current.as_deref() != Some(name) {
                tracing::debug!(file = name, "removing a leftover snapshot file");
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    fn current_file_name(&self) -> Result<Option<String>, anyhow::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let Some(raw) = table.get(KEY_SNAPSHOT)? else {
            return Ok(None);
        };
        Ok(decode_snapshot_header(raw.value())?.file)
    }

    /// A new temporary file's path (unique).
    fn temp_path(&self, what: &str) -> PathBuf {
        self.dir.join(format!(
            "{what}-{:016x}{TEMP_SUFFIX}",
            rand::random::<u64>()
        ))
    }

    /// Makes the fsync'd file at `temp` the current snapshot with `meta`: renamed to its final name,
    /// then named by the header in redb, then the previous file deleted. A snapshot older than the
    /// current one (a build that raced an install) is dropped instead. `reader` is an open handle of
    /// the file, returned for sending (it stays readable if the file is dropped or later replaced).
    fn make_current(
        &self,
        meta: &Meta,
        temp: &Path,
        reader: fs::File,
    ) -> Result<fs::File, StorageError> {
        let err = |e: &dyn std::error::Error| -> StorageError {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::error(e)).into()
        };
        let index = meta.last_log_id.map_or(0, |id| id.index);
        let name = format!("snapshot-{index}-{:016x}.json", rand::random::<u64>());
        let path = self.dir.join(&name);
        let _current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        fs::rename(temp, &path).map_err(|e| err(&e))?;
        sync_dir(&self.dir).map_err(|e| err(&e))?;
        let header = encode_snapshot_header(meta, &name).map_err(|e| err(&e))?;
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        let replaced = {
            let mut table = txn.open_table(SNAPSHOT).map_err(|e| err(&e))?;
            let previous = table
                .get(KEY_SNAPSHOT)
                .map_err(|e| err(&e))?
                .map(|raw| raw.value().to_vec());
            let previous = match previous {
                Some(raw) => Some(decode_snapshot_header(&raw).map_err(|e| err(&e))?),
                None => None,
            };
            let newer = previous
                .as_ref()
                .is_none_or(|p| p.meta.last_log_id <= meta.last_log_id);
            if newer {
                table
                    .insert(KEY_SNAPSHOT, header.as_slice())
                    .map_err(|e| err(&e))?;
                table.remove(KEY_SNAPSHOT_DATA).map_err(|e| err(&e))?;
                Some(previous.and_then(|p| p.file))
            } else {
                None
            }
        };
        txn.commit().map_err(|e| err(&e))?;
        let obsolete = match replaced {
            Some(previous) => previous.filter(|p| *p != name),
            None => {
                tracing::debug!(snapshot = %meta.snapshot_id, "a newer snapshot is current; dropped this one");
                Some(name)
            }
        };
        if let Some(obsolete) = obsolete {
            if let Err(e) = fs::remove_file(self.dir.join(&obsolete)) {
                // Deleted on the next open.
                tracing::warn!(file = obsolete, error = %e, "could not delete a replaced snapshot");
            }
        }
        Ok(reader)
    }

    /// Serializes the state into a new snapshot file and makes it current (blocking).
    fn build_blocking(&self) -> Result<(Meta, fs::File), StorageError> {
        let temp = self.temp_path("building");
        let result = (|| {
            let mut bookkeeping = None;
            write_file(&temp, |file| {
                let mut writer = BufWriter::with_capacity(SNAPSHOT_IO_BUFFER_BYTES, file);
                // A copy taken under the read lock is serialized without it, so applies never wait
                // for the serialization (seconds for a large state). The copy is cheap: jobs are
                // shared (`Arc`), and one changed meanwhile is copied on write.
                let applied = self
                    .applied
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                write_snapshot_data(&applied, &mut writer).map_err(io::Error::other)?;
                bookkeeping = Some((applied.last_applied, applied.last_membership.clone()));
                drop(applied);
                io::Write::flush(&mut writer)
            })
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            let (last_applied, last_membership) = bookkeeping.expect("written");
            let file =
                fs::File::open(&temp).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            let len = file
                .metadata()
                .map_err(|e| StorageIOError::write_snapshot(None, &e))?
                .len();
            let snapshot_id = match last_applied {
                Some(id) => format!("{}-{}-{len}", id.leader_id, id.index),
                None => format!("empty-{len}"),
            };
            let meta = SnapshotMeta {
                last_log_id: last_applied,
                last_membership,
                snapshot_id,
            };
            let file = self.make_current(&meta, &temp, file)?;
            Ok((meta, file))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Decodes the received snapshot file and makes it current (blocking). `received` is the file
    /// [`RaftStateMachine::begin_receiving_snapshot`] handed out, or any file with the data.
    fn install_blocking(
        &self,
        meta: &Meta,
        mut received: fs::File,
        receiving: Option<PathBuf>,
    ) -> Result<Applied, StorageError> {
        let sig = Some(meta.signature());
        let err = |e: &dyn std::error::Error| -> StorageError {
            StorageIOError::new(
                ErrorSubject::Snapshot(sig.clone()),
                ErrorVerb::Write,
                AnyError::error(e),
            )
            .into()
        };
        let temp = match receiving {
            Some(path) if same_file(&path, &received) => {
                received.sync_all().map_err(|e| err(&e))?;
                path
            }
            other => {
                // Not the file handed out (openraft's test suite hands over another snapshot's
                // file): copy it into one of ours.
                if let Some(path) = other {
                    let _ = fs::remove_file(path);
                }
                let temp = self.temp_path("received");
                received.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
                write_file(&temp, |file| io::copy(&mut received, file).map(|_| ()))
                    .map_err(|e| err(&e))?;
                temp
            }
        };
        let result = (|| {
            let mut file = fs::File::open(&temp).map_err(|e| err(&e))?;
            let applied = read_snapshot_data(BufReader::with_capacity(
                SNAPSHOT_IO_BUFFER_BYTES,
                &mut file,
            ))
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
            self.make_current(meta, &temp, file)?;
            Ok(applied)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// The current snapshot's meta and an open handle of its file (blocking).
    fn current_blocking(&self) -> Result<Option<(Meta, fs::File)>, StorageError> {
        let err = |e: &dyn std::error::Error| -> StorageError {
            StorageIOError::read_snapshot(None, AnyError::error(e)).into()
        };
        let _current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let table = txn.open_table(SNAPSHOT).map_err(|e| err(&e))?;
        let Some(raw) = table.get(KEY_SNAPSHOT).map_err(|e| err(&e))? else {
            return Ok(None);
        };
        let header = decode_snapshot_header(raw.value()).map_err(|e| err(&e))?;
        let Some(name) = header.file else {
            // Moved to a file at open; a format-0/1 header here means someone wrote it since.
            let e = io::Error::other(format!(
                "the current snapshot (format {}) is not in a file",
                header.version
            ));
            return Err(err(&e));
        };
        let file = fs::File::open(self.dir.join(name)).map_err(|e| err(&e))?;
        Ok(Some((header.meta, file)))
    }
}

/// Creates `path`, lets `fill` write it, and fsyncs it.
fn write_file(path: &Path, fill: impl FnOnce(&mut fs::File) -> io::Result<()>) -> io::Result<()> {
    let mut file = fs::File::create(path)?;
    fill(&mut file)?;
    file.sync_all()
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Whether `file` is the file at `path`.
fn same_file(path: &Path, file: &fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes the chunks out of every [`Command::AppendLogs`] in `command` (also inside batches and
/// audited commands), with where its outcome will be: the indexes through nested batches.
fn take_log_records(
    command: &mut Command,
    path: &mut Vec<usize>,
    out: &mut Vec<(Vec<usize>, Vec<LogRecord>)>,
) {
    match command {
        Command::AppendLogs { chunks } if !chunks.is_empty() => {
            out.push((path.clone(), std::mem::take(chunks)));
        }
        Command::Batch(commands) => {
            for (i, c) in commands.iter_mut().enumerate() {
                path.push(i);
                take_log_records(c, path, out);
                path.pop();
            }
        }
        // Its outcome is its command's.
        Command::Audited { command, .. } => take_log_records(command, path, out),
        _ => {}
    }
}

/// The outcome at `path` (indexes through nested batches) of an entry's outcome.
fn outcome_at<'a>(
    outcome: &'a mut CommandOutcome,
    path: &[usize],
) -> Option<&'a mut CommandOutcome> {
    match path.split_first() {
        None => Some(outcome),
        Some((&i, rest)) => match outcome {
            CommandOutcome::Batch(outcomes) => outcome_at(outcomes.get_mut(i)?, rest),
            _ => None,
        },
    }
}

/// Appends one command's committed log chunks to `logs` (blocking); the first error that kept a chunk
/// from being stored, if any. A chunk beyond the end of its file is skipped.
fn append_log_records(logs: &LogStore, records: &[LogRecord]) -> Result<(), io::Error> {
    let mut first_error = None;
    for r in records {
        match logs.append(r.job, r.attempt, r.rank, r.offset, &r.data) {
            Ok(stored) if stored < r.offset + r.data.len() as u64 => tracing::debug!(
                job = %r.job,
                attempt = r.attempt,
                rank = r.rank,
                offset = r.offset,
                stored,
                "log chunk beyond the end of the stored log (snapshot installed since?); skipped"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(job = %r.job, attempt = r.attempt, rank = r.rank, error = %e, "could not store a committed log chunk");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        let (meta, file) = blocking(move || this.build_blocking()).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
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
        // (entry, path to the command's outcome, its chunks)
        let mut log_records = Vec::new();
        {
            let mut guard = self.applied.write().unwrap_or_else(|e| e.into_inner());
            for entry in entries {
                guard.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => CommandOutcome::Done,
                    EntryPayload::Normal(mut command) => {
                        let mut taken = Vec::new();
                        take_log_records(&mut command, &mut Vec::new(), &mut taken);
                        // What the chunks commit is state (how far each log goes); their bytes
                        // go to files below.
                        for (_, records) in &taken {
                            guard.state.extend_committed_logs(records);
                        }
                        log_records.extend(taken.into_iter().map(|(p, r)| (outcomes.len(), p, r)));
                        guard.state.apply(command)
                    }
                    EntryPayload::Membership(membership) => {
                        guard.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        CommandOutcome::Done
                    }
                };
                outcomes.push(outcome);
            }
        }
        if !log_records.is_empty() {
            let logs = self.logs.clone();
            let failed = blocking(move || {
                Ok(log_records
                    .into_iter()
                    .filter_map(|(entry, path, records)| {
                        let e = append_log_records(&logs, &records).err()?;
                        Some((entry, path, e))
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
            for (entry, path, e) in failed {
                if let Some(outcome) = outcome_at(&mut outcomes[entry], &path) {
                    *outcome = CommandOutcome::Rejected {
                        reason: format!("the coordinator could not store the log chunks: {e}"),
                    };
                }
            }
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.temp_path("receiving");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // Only one snapshot is received at a time: an abandoned one is deleted.
        let abandoned = self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(path);
        if let Some(abandoned) = abandoned {
            let _ = tokio::fs::remove_file(abandoned).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        // Waits for writes still in flight.
        let received = snapshot.into_std().await;
        let receiving = self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let this = self.clone();
        let meta = meta.clone();
        let applied = blocking(move || this.install_blocking(&meta, received, receiving)).await?;
        let replaced = std::mem::replace(
            &mut *self.applied.write().unwrap_or_else(|e| e.into_inner()),
            applied,
        );
        // Not under the lock: a large state takes a while to free.
        drop(replaced);
        // A stream begun while this one installed (the leader gave up waiting and started
        // again) is moot now: its file would stay until the next start. (Should it still be
        // written to, its open handle keeps the data; `install_blocking` copies from handles.)
        let stale = self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stale) = stale {
            let _ = tokio::fs::remove_file(stale).await;
        }
        self.changes.send_modify(|n| *n += 1);
        self.installs.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let this = self.clone();
        let current = blocking(move || this.current_blocking()).await?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Actor, JobId};

    fn open(dir: &Path) -> StateMachineStore {
        let db = Arc::new(Database::create(dir.join("state.redb")).unwrap());
        StateMachineStore::open(db, dir.join("snapshots"), LogStore::new(dir.join("logs"))).unwrap()
    }

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    /// A store with a membership and a few commands applied (index 1 to 3).
    async fn with_state(dir: &Path) -> StateMachineStore {
        let mut sm = open(dir);
        let membership = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Membership(Membership::new(
                vec![[1].into()],
                BTreeMap::from([(1, BasicNode::new("10.0.0.1:7070"))]),
            )),
        };
        sm.apply([
            membership,
            entry(
                2,
                Command::InitCluster {
                    cluster_id: "c-1".into(),
                },
            ),
            entry(
                3,
                Command::CancelJob {
                    job: JobId(9),
                    at_ms: 1,
                },
            ),
        ])
        .await
        .unwrap();
        sm
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Sends `snapshot` into `to` the way openraft does: chunk by chunk, each written at its offset.
    async fn stream(
        snapshot: &mut tokio::fs::File,
        to: &mut tokio::fs::File,
        chunk: usize,
    ) -> usize {
        let mut offset = 0u64;
        let mut chunks = 0;
        loop {
            snapshot.seek(SeekFrom::Start(offset)).await.unwrap();
            let mut buf = vec![0; chunk];
            let n = snapshot.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            to.seek(SeekFrom::Start(offset)).await.unwrap();
            to.write_all(&buf[..n]).await.unwrap();
            offset += n as u64;
            chunks += 1;
        }
        to.shutdown().await.unwrap();
        chunks
    }

    #[tokio::test]
    async fn a_snapshot_streamed_in_chunks_installs_the_same_state_and_survives_a_restart() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = with_state(a.path()).await;
        let mut built = leader.build_snapshot().await.unwrap();
        assert_eq!(files(a.path()).len(), 1, "{:?}", files(a.path()));
        assert_eq!(built.meta.last_log_id.map(|id| id.index), Some(3));

        let mut follower = open(b.path());
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        assert_eq!(files(b.path()).len(), 1, "the file being received");
        let chunks = stream(&mut built.snapshot, &mut receiving, 7).await;
        assert!(chunks > 10, "{chunks} chunks");
        follower
            .install_snapshot(&built.meta, receiving)
            .await
            .unwrap();

        let want = leader.read(State::clone);
        assert_eq!(follower.read(State::clone), want);
        assert_eq!(
            follower.applied_state().await.unwrap(),
            leader.applied_state().await.unwrap()
        );
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert_eq!(files(b.path()).len(), 1, "only the current snapshot stays");

        // A restart loads it.
        drop(follower);
        let mut restarted = open(b.path());
        assert_eq!(restarted.read(State::clone), want);
        assert_eq!(
            restarted
                .applied_state()
                .await
                .unwrap()
                .0
                .map(|id| id.index),
            Some(3)
        );

        // A newer build replaces the file; the old one is gone.
        let before = files(b.path());
        restarted
            .apply([entry(
                4,
                Command::CancelJob {
                    job: JobId(1),
                    at_ms: 2,
                },
            )])
            .await
            .unwrap();
        restarted.build_snapshot().await.unwrap();
        let after = files(b.path());
        assert_eq!(after.len(), 1);
        assert_ne!(after, before);
    }

    #[tokio::test]
    async fn a_crash_mid_receive_leaves_the_current_snapshot_whole() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = with_state(a.path()).await;
        let mut first = leader.build_snapshot().await.unwrap();
        let mut follower = open(b.path());
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        stream(&mut first.snapshot, &mut receiving, 64).await;
        follower
            .install_snapshot(&first.meta, receiving)
            .await
            .unwrap();
        let installed = files(b.path());

        // A newer snapshot, half received when the process dies.
        leader
            .apply([entry(
                4,
                Command::InitCluster {
                    cluster_id: "other".into(),
                },
            )])
            .await
            .unwrap();
        let mut second = leader.build_snapshot().await.unwrap();
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        let mut half = vec![0; 40];
        second.snapshot.read_exact(&mut half).await.unwrap();
        receiving.write_all(&half).await.unwrap();
        receiving.flush().await.unwrap();
        assert_eq!(files(b.path()).len(), 2);
        drop((receiving, follower));

        let mut restarted = open(b.path());
        assert_eq!(files(b.path()), installed, "the partial file is deleted");
        assert_eq!(restarted.read(State::clone), {
            let mut s = leader.read(State::clone);
            s.cluster_id = Some("c-1".into());
            s
        });
        let current = restarted.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, first.meta);
    }

    #[tokio::test]
    async fn an_abandoned_receive_is_deleted_when_the_next_begins() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let mut first = sm.begin_receiving_snapshot().await.unwrap();
        first.write_all(b"{\"v\":1").await.unwrap();
        let _second = sm.begin_receiving_snapshot().await.unwrap();
        assert_eq!(files(dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn damaged_snapshot_data_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = with_state(dir.path()).await;
        let before = sm.read(State::clone);
        let meta = sm.build_snapshot().await.unwrap().meta;
        let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
        receiving.write_all(b"{\"v\":1,\"last_").await.unwrap();
        receiving.shutdown().await.unwrap();
        let e = sm.install_snapshot(&meta, receiving).await.unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        assert_eq!(sm.read(State::clone), before);
        assert_eq!(files(dir.path()).len(), 1, "{:?}", files(dir.path()));
    }

    fn chunk(job: u64, rank: u32, offset: u64, data: &str) -> LogRecord {
        LogRecord {
            job: JobId(job),
            attempt: 0,
            rank,
            offset,
            data: data.as_bytes().to_vec(),
        }
    }

    fn log_text(dir: &Path, job: u64, rank: u32) -> String {
        let path = dir.join(format!("logs/job-{job}/attempt-0/rank-{rank}.log"));
        fs::read_to_string(path).unwrap_or_default()
    }

    #[tokio::test]
    async fn committed_log_chunks_are_written_once_even_when_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let entries = || {
            vec![
                entry(
                    1,
                    Command::AppendLogs {
                        chunks: vec![chunk(1, 0, 0, "one\n"), chunk(1, 1, 0, "uno\n")],
                    },
                ),
                // Group commit: inside a batch, beside other commands, and audited.
                entry(
                    2,
                    Command::Batch(vec![
                        Command::CancelJob {
                            job: JobId(7),
                            at_ms: 1,
                        },
                        Command::AppendLogs {
                            chunks: vec![chunk(1, 0, 4, "two\n")],
                        },
                        Command::Audited {
                            actor: Actor::default(),
                            at_ms: 1,
                            command: Box::new(Command::AppendLogs {
                                chunks: vec![chunk(1, 1, 4, "dos\n")],
                            }),
                        },
                    ]),
                ),
                // A resent chunk overlapping what is stored, and one beyond the end (skipped).
                entry(
                    3,
                    Command::AppendLogs {
                        chunks: vec![chunk(1, 0, 4, "two\nthree\n"), chunk(2, 0, 100, "gap\n")],
                    },
                ),
            ]
        };
        let mut sm = open(dir.path());
        let outcomes = sm.apply(entries()).await.unwrap();
        assert_eq!(outcomes[0], CommandOutcome::Done);
        assert!(
            matches!(&outcomes[1], CommandOutcome::Batch(o) if o[1] == CommandOutcome::Done && o[2] == CommandOutcome::Done),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[2], CommandOutcome::Done);
        assert_eq!(log_text(dir.path(), 1, 0), "one\ntwo\nthree\n");
        assert_eq!(log_text(dir.path(), 1, 1), "uno\ndos\n");
        assert_eq!(log_text(dir.path(), 2, 0), "");
        let audit: Vec<String> = sm.read(|s| s.audit.iter().map(|a| a.action.clone()).collect());
        assert_eq!(audit, ["append rank logs"]);

        // A restart without a snapshot re-applies the whole log: nothing is doubled.
        drop(sm);
        let mut replayed = open(dir.path());
        replayed.apply(entries()).await.unwrap();
        assert_eq!(log_text(dir.path(), 1, 0), "one\ntwo\nthree\n");
        assert_eq!(log_text(dir.path(), 1, 1), "uno\ndos\n");
    }

    #[tokio::test]
    async fn a_log_chunk_that_cannot_be_stored_is_rejected_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        // The logs directory is a file: every append fails.
        fs::write(dir.path().join("logs"), b"").unwrap();
        let outcomes = sm
            .apply([
                entry(
                    1,
                    Command::Batch(vec![
                        Command::InitCluster {
                            cluster_id: "c".into(),
                        },
                        Command::AppendLogs {
                            chunks: vec![chunk(1, 0, 0, "lost\n")],
                        },
                    ]),
                ),
                entry(
                    2,
                    Command::InitCluster {
                        cluster_id: "again".into(),
                    },
                ),
            ])
            .await
            .unwrap();
        let CommandOutcome::Batch(batch) = &outcomes[0] else {
            panic!("{outcomes:?}");
        };
        assert_eq!(batch[0], CommandOutcome::Done);
        assert!(
            matches!(&batch[1], CommandOutcome::Rejected { reason } if reason.contains("could not store the log chunks")),
            "{batch:?}"
        );
        assert!(matches!(outcomes[1], CommandOutcome::Rejected { .. }));
        assert_eq!(sm.read(|s| s.cluster_id.clone()), Some("c".into()));
    }
}
