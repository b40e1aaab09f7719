//! Retention of the agent's run directories (`<data-dir>/runs/<cluster>/job-<id>/attempt-<n>`: rank
//! logs and torch error files). They are shipped to the coordinator as ranks run; what stays here is
//! a local copy, deleted once untouched for the retention period (default 7 days), never while a rank
//! of that attempt is still tracked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Run directories untouched this long are deleted by default: 7 days.
pub const DEFAULT_RUN_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the agent looks for run directories past retention.
pub const RUN_RETENTION_SWEEP: Duration = Duration::from_secs(10 * 60);

/// One attempt's run directory and when anything in it last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub path: PathBuf,
    pub cluster: String,
    pub job_id: String,
    pub attempt: u32,
    pub modified: SystemTime,
}

/// The run directories to delete: untouched for `retention` and not of a live `(cluster, job, attempt)`.
pub fn expired(
    dirs: &[RunDir],
    live: &BTreeSet<(String, String, u32)>,
    now: SystemTime,
    retention: Duration,
) -> Vec<PathBuf> {
    dirs.iter()
        .filter(|d| !live.contains(&(d.cluster.clone(), d.job_id.clone(), d.attempt)))
        .filter(|d| now.duration_since(d.modified).unwrap_or_default() >= retention)
        .map(|d| d.path.clone())
        .collect()
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if let Ok(m) = meta.modified() {
                newest = newest.max(m);
            }
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    newest
}

/// Lists the run directories under `<data_dir>/runs`.
pub fn list(data_dir: &Path) -> Vec<RunDir> {
    let mut out = Vec::new();
    let read = |p: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(p)
            .map(|r| r.flatten().collect())
            .unwrap_or_default()
    };
    for cluster in read(&data_dir.join("runs")) {
        let cluster_name = cluster.file_name().to_string_lossy().into_owned();
        for job in read(&cluster.path()) {
            let name = job.file_name().to_string_lossy().into_owned();
            let Some(job_id) = name.strip_prefix("job-") else {
                continue;
            };
            for attempt in read(&job.path()) {
                let name = attempt.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix("attempt-").and_then(|n| n.parse().ok()) else {
                    continue;
                };
                out.push(RunDir {
                    modified: newest_mtime(&attempt.path()),
                    path: attempt.path(),
                    cluster: cluster_name.clone(),
                    job_id: job_id.to_string(),
                    attempt: n,
                });
            }
        }
    }
    out
}

/// Deletes expired run directories (and job directories left empty); returns how many went.
pub fn sweep(
    data_dir: &Path,
    live: &BTreeSet<(String, String, u32)>,
    retention: Duration,
) -> usize {
    let dirs = list(data_dir);
    let gone = expired(&dirs, live, SystemTime::now(), retention);
    for path in &gone {
        if let Err(e) = std::fs::remove_dir_all(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not delete an old run directory");
        } else if let Some(job_dir) = path.parent() {
            // Only succeeds when empty.
            let _ = std::fs::remove_dir(job_dir);
        }
    }
    gone.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(job: &str, attempt: u32, age_days: u64, now: SystemTime) -> RunDir {
        RunDir {
            path: PathBuf::from(format!("/d/runs/c/job-{job}/attempt-{attempt}")),
            cluster: "c".into(),
            job_id: job.into(),
            attempt,
            modified: now - Duration::from_secs(age_days * 24 * 3600),
        }
    }

    #[test]
    fn old_run_dirs_go_unless_a_rank_of_theirs_is_live() {
        let now = SystemTime::now();
        let dirs = [
            dir("1", 0, 8, now),
            dir("1", 1, 8, now),
            dir("2", 0, 1, now),
            dir("3", 0, 30, now),
        ];
        let live = BTreeSet::from([("c".to_string(), "1".to_string(), 1)]);
        let gone = expired(&dirs, &live, now, DEFAULT_RUN_RETENTION);
        assert_eq!(
            gone,
            [
                PathBuf::from("/d/runs/c/job-1/attempt-0"),
                PathBuf::from("/d/runs/c/job-3/attempt-0")
            ]
        );
    }

    #[test]
    fn a_sweep_deletes_what_is_listed_and_keeps_the_rest() {
        let data = tempfile::tempdir().unwrap();
        let attempt = data.path().join("runs/c1/job-4/attempt-0");
        std::fs::create_dir_all(&attempt).unwrap();
        std::fs::write(attempt.join("rank-0.log"), b"x\n").unwrap();
        let listed = list(data.path());
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].job_id.as_str(), listed[0].attempt), ("4", 0));
        // Fresh: kept. With a zero retention: gone, with its empty job directory.
        assert_eq!(
            sweep(data.path(), &BTreeSet::new(), DEFAULT_RUN_RETENTION),
            0
        );
        assert_eq!(sweep(data.path(), &BTreeSet::new(), Duration::ZERO), 1);
        assert!(!data.path().join("runs/c1/job-4").exists());
    }
}
