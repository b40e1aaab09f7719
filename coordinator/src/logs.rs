//! The coordinator's copy of every rank's output, as agents ship it.
//!
//! One file per job, attempt and rank under `<data-dir>/logs`. Agents send byte ranges with their
//! offset, so a resent chunk is stored once and a restarted coordinator resumes where its files end.
//! Calls do blocking file IO: async callers use `spawn_blocking`.
//!
//! # Replicated through Raft
//!
//! The leader's agent service writes a heartbeat's chunks as one `Command::AppendLogs`; every
//! coordinator appends them here when its Raft state machine applies the entry
//! (`raft/state_machine.rs`), so every member's files are the same, and reads are served from the
//! local files by whichever coordinator is asked. A replayed entry (a restart re-applies the log after
//! the last snapshot) stores nothing twice: appends are idempotent by offset.
//!
//! **The snapshot gap.** A snapshot carries the state, not these files. A member that catches up by
//! installing a snapshot (a new member, or one that lagged past the leader's purged log) lacks every
//! chunk committed before that snapshot; the chunks after it start beyond the end of its files and
//! are skipped, so that member's copy of a rank's log that was being written then stays short (or
//! empty) for good, and reading it there shows less than the leader has. Logs of ranks that start
//! after the install are complete. No catch-up of rank logs exists yet.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::state::JobId;

/// Where a reader is in each rank's log: rank -> byte offset.
pub type LogCursor = BTreeMap<u32, u64>;

/// Most bytes one read returns across ranks.
pub const READ_LIMIT_BYTES: u64 = 1 << 20;

/// One line of one rank's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLine {
    pub rank: u32,
    pub text: String,
}

/// Rank logs stored under one directory.
#[derive(Debug, Clone)]
pub struct LogStore {
    root: PathBuf,
    /// Appends are read-length-then-write: two at once (a retried heartbeat racing the original)
    /// would store a chunk twice. Appends are small and unsynced, so one at a time is cheap.
    append_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl LogStore {
    /// Logs under `root` (created on first write).
    pub fn new(root: PathBuf) -> Self {
        LogStore {
            root,
            append_lock: Default::default(),
        }
    }

    /// Deletes every stored line of `job` (all attempts). Missing logs are not an error.
    pub fn remove_job(&self, job: JobId) -> io::Result<()> {
        match fs::remove_dir_all(self.root.join(format!("job-{job}"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The jobs that have logs here.
    pub fn jobs(&self) -> io::Result<Vec<JobId>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("job-")?
                    .parse()
                    .ok()
                    .map(JobId)
            })
            .collect())
    }

    fn path(&self, job: JobId, attempt: u32, rank: u32) -> PathBuf {
        self.root
            .join(format!("job-{job}"))
            .join(format!("attempt-{attempt}"))
            .join(format!("rank-{rank}.log"))
    }

    /// Stores `data`, which starts at byte `offset` of the rank's log; returns how many bytes of the
    /// log are now stored. Bytes already stored are skipped; a chunk past the end (a gap) is refused by
    /// returning the current length, so the agent resends from there.
    pub fn append(
        &self,
        job: JobId,
        attempt: u32,
        rank: u32,
        offset: u64,
        data: &[u8],
    ) -> io::Result<u64> {
        let _one_at_a_time = self.append_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path(job, attempt, rank);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let stored = file.metadata()?.len();
        let end = offset + data.len() as u64;
        if offset > stored || end <= stored {
            return Ok(stored);
        }
        let skip = (stored - offset) as usize;
        file.write_all(&data[skip..])?;
        Ok(end)
    }

    /// Up to `max` bytes of a rank's log from `offset` (fewer at its end; none past it).
    pub fn read_range(
        &self,
        job: JobId,
        attempt: u32,
        rank: u32,
        offset: u64,
        max: u64,
    ) -> io::Result<Vec<u8>> {
        let mut file = match fs::File::open(self.path(job, attempt, rank)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(offset))?;
        let mut data = Vec::new();
        file.take(max).read_to_end(&mut data)?;
        Ok(data)
    }

    /// How many bytes of a rank's log are stored here (0 when none).
    pub fn stored_len(&self, job: JobId, attempt: u32, rank: u32) -> u64 {
        fs::metadata(self.path(job, attempt, rank)).map_or(0, |m| m.len())
    }

    /// Reads whole lines after `cursor` from the given ranks (at most [`READ_LIMIT_BYTES`] in all) and
    /// returns them with the advanced cursor. Lines come rank by rank.
    pub fn read(
        &self,
        job: JobId,
        attempt: u32,
        ranks: &[u32],
        cursor: &LogCursor,
    ) -> io::Result<(Vec<RankLine>, LogCursor)> {
        let mut lines = Vec::new();
        let mut next = cursor.clone();
        let mut budget = READ_LIMIT_BYTES;
        for &rank in ranks {
            if budget == 0 {
                break;
            }
            let offset = cursor.get(&rank).copied().unwrap_or(0);
            let mut file = match fs::File::open(self.path(job, attempt, rank)) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.take(budget).read_to_end(&mut buf)?;
            // Only whole lines: a line still being written is returned next time.
            let Some(last_newline) = buf.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            buf.truncate(last_newline + 1);
            budget -= buf.len() as u64;
            next.insert(rank, offset + buf.len() as u64);
            for line in buf[..last_newline].split(|b| *b == b'\n') {
                lines.push(RankLine {
                    rank,
                    text: String::from_utf8_lossy(line).into_owned(),
                });
            }
        }
        Ok((lines, next))
    }
}

/// Writes a cursor as `rank:offset,rank:offset`.
pub fn format_cursor(cursor: &LogCursor) -> String {
    cursor
        .iter()
        .map(|(r, o)| format!("{r}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a cursor written by [`format_cursor`].
pub fn parse_cursor(text: &str) -> Result<LogCursor, String> {
    let mut cursor = LogCursor::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let parsed = part
            .split_once(':')
            .and_then(|(r, o)| Some((r.parse::<u32>().ok()?, o.parse::<u64>().ok()?)));
        let Some((rank, offset)) = parsed else {
            return Err(format!(
                "bad cursor part `{part}`: expected RANK:OFFSET pairs separated by commas"
            ));
        };
        cursor.insert(rank, offset);
    }
    Ok(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_and_overlapping_chunks_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path().to_path_buf());
        let job = JobId(1);
        assert_eq!(store.append(job, 0, 0, 0, b"one\ntw").unwrap(), 6);
        assert_eq!(store.append(job, 0, 0, 0, b"one\ntw").unwrap(), 6, "resend");
        assert_eq!(
            store.append(job, 0, 0, 4, b"two\nthree\n").unwrap(),
            14,
            "overlap"
        );
        assert_eq!(
            store.append(job, 0, 0, 20, b"gap\n").unwrap(),
            14,
            "gap refused"
        );
        let (lines, cursor) = store.read(job, 0, &[0], &LogCursor::new()).unwrap();
        let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(cursor[&0], 14);
    }

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path().to_path_buf());
        store.append(JobId(2), 0, 1, 0, b"done\nhalf").unwrap();
        let (lines, cursor) = store.read(JobId(2), 0, &[0, 1], &LogCursor::new()).unwrap();
        assert_eq!(
            lines,
            vec![RankLine {
                rank: 1,
                text: "done".into()
            }]
        );
        store.append(JobId(2), 0, 1, 9, b" line\n").unwrap();
        let (lines, _) = store.read(JobId(2), 0, &[1], &cursor).unwrap();
        assert_eq!(lines[0].text, "half line");
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c: LogCursor = [(0, 10), (3, 7)].into_iter().collect();
        assert_eq!(parse_cursor(&format_cursor(&c)).unwrap(), c);
        assert!(parse_cursor("0:1,x").unwrap_err().contains("RANK:OFFSET"));
    }
}
