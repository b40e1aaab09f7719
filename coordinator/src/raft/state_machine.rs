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
                // The read lock is held while serializing (applies wait, reads do not), not while
                // the file is synced.
                let guard = self.applied.read().unwrap_or_else(|e| e.into_inner());
                write_snapshot_data(&guard, &mut writer).map_err(io::Error::other)?;
                bookkeeping = Some((guard.last_applied, guard.last_membership.clone()));
                drop(guard);
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
        Command::AppendLogs { chunks } => {
            if !chunks.is_empty() {
                out.push((path.clone(), std::mem::take(chunks)));
            }
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
        self.changes.send_modify(|n| *n += 1);
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
