//! How long finished jobs stay in the replicated state. Without a rule the state (and every
//! snapshot, and every restart's load) grows with every job the cluster ever ran; Nomad's job GC,
//! Slurm's `MinJobAge` and Kubernetes' `ttlSecondsAfterFinished` answer the same need.
//!
//! The leader decides ([`jobs_to_forget`], pure) and writes [`Command::ForgetJobs`]; `apply`
//! ([`State::forget_jobs`]) checks each job again against the state it meets, so a job that was
//! restarted or still holds a share in between is kept.

use super::{index, CommandOutcome, Job, JobId, State};

/// Most jobs one `ForgetJobs` command names (so an entry stays small).
pub const FORGET_JOBS_PER_COMMAND: usize = 1_000;

/// How long finished jobs are kept, and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRetention {
    /// A job is forgotten this long after it ended.
    pub max_age_ms: u64,
    /// Beyond this many finished jobs, the ones that ended first are forgotten first.
    pub max_finished: usize,
}

/// Whether `job` may be forgotten at all: it ended, and holds nothing on any node (its last ranks'
/// shares were released and no earlier attempt's share is retired).
pub fn forgettable(job: &Job) -> bool {
    job.state.is_terminal() && job.finished_at_ms.is_some() && index::holds_on(job).is_empty()
}

/// The finished jobs that `rule` says to forget at `now_ms`, at most `limit`, those that ended
/// first first: every one older than `max_age_ms`, and the oldest beyond `max_finished`.
pub fn jobs_to_forget(state: &State, now_ms: u64, rule: &JobRetention, limit: usize) -> Vec<JobId> {
    let mut finished: Vec<(u64, JobId)> = state
        .jobs
        .values()
        .filter(|j| forgettable(j))
        .filter_map(|j| j.finished_at_ms.map(|at| (at, j.id)))
        .collect();
    finished.sort_unstable();
    let over_count = finished.len().saturating_sub(rule.max_finished);
    finished
        .iter()
        .enumerate()
        .filter(|(i, (at, _))| *i < over_count || now_ms.saturating_sub(*at) >= rule.max_age_ms)
        .map(|(_, (_, id))| *id)
        .take(limit)
        .collect()
}

impl State {
    /// Forgets each of `jobs` that may be forgotten ([`forgettable`]); keeps the others.
    pub(super) fn forget_jobs(&mut self, jobs: &[JobId]) -> CommandOutcome {
        for id in jobs {
            if self.jobs.get(id).is_some_and(|j| forgettable(j)) {
                self.index.touch(*id);
                self.jobs.remove(id);
            }
        }
        CommandOutcome::Done
    }

    /// Whether job `id` existed once and was forgotten by the retention.
    pub fn was_forgotten(&self, id: JobId) -> bool {
        id.0 >= 1 && id.0 <= self.last_job_id && !self.jobs.contains_key(&id)
    }
}
