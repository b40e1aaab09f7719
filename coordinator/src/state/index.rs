//! Indexes over the jobs, kept up to date by [`State::apply`]: which jobs are live, and which jobs
//! hold something on each node. Agents' heartbeats and the leader's supervision read them instead of
//! scanning every job the cluster ever ran (a scan per heartbeat is O(jobs x nodes) per second).
//!
//! The index is derived data: it is not serialized, it is rebuilt when a state is loaded
//! ([`State::rebuild_index`]), and a state whose index was never built answers every query by a
//! scan, so forgetting to build one costs time, never correctness. Every handler that changes a job
//! goes through [`State::job_mut`], which marks it; `apply` re-indexes the marked jobs after each
//! command, and in debug builds checks the whole index against a scan while the state is small.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Job, JobId, JobState, NodeId, State};

/// Debug builds compare the whole index with a scan after every command while the state holds at
/// most this many jobs (every unit test and the fuzz; a larger state would make each apply O(jobs)).
const CHECK_IN_FULL_UP_TO_JOBS: usize = 2_000;

/// Which jobs are live and which hold something on each node.
#[derive(Debug, Clone, Default)]
pub struct JobIndex {
    /// False until built from the jobs: every query then scans.
    built: bool,
    /// Jobs whose state is `Starting` or `Running`.
    live: BTreeSet<JobId>,
    /// For each node, the jobs holding an unreleased share of their allocation on it, or a share
    /// retired from an earlier attempt (see [`holds_on`]).
    by_node: BTreeMap<NodeId, BTreeSet<JobId>>,
    /// The nodes each job is listed under in `by_node`, to take it out again.
    nodes_of: BTreeMap<JobId, Vec<NodeId>>,
    /// Jobs changed by the command being applied.
    touched: BTreeSet<JobId>,
}

/// The index is derived from the jobs: two states with the same jobs are equal whether or not
/// their indexes were built.
impl PartialEq for JobIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for JobIndex {}

/// The nodes on which `job` holds something: an unreleased share of its allocation, or a retired
/// share of an earlier attempt.
pub(super) fn holds_on(job: &Job) -> BTreeSet<&NodeId> {
    let mut nodes: BTreeSet<&NodeId> = job
        .allocation
        .iter()
        .flat_map(|a| a.nodes.iter().filter(|na| !na.released).map(|na| &na.node))
        .collect();
    nodes.extend(job.retired.iter().map(|r| &r.node));
    nodes
}

fn is_live(job: &Job) -> bool {
    matches!(job.state, JobState::Starting | JobState::Running)
}

impl JobIndex {
    /// Whether the index was built (otherwise queries scan).
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// Marks `job` as changed by the command being applied.
    pub fn touch(&mut self, job: JobId) {
        if self.built {
            self.touched.insert(job);
        }
    }

    /// Builds the index from `jobs`.
    pub fn build(jobs: &BTreeMap<JobId, Arc<Job>>) -> Self {
        let mut index = JobIndex {
            built: true,
            ..JobIndex::default()
        };
        for job in jobs.values() {
            index.add(job);
        }
        index
    }

    fn add(&mut self, job: &Job) {
        if is_live(job) {
            self.live.insert(job.id);
        }
        let nodes: Vec<NodeId> = holds_on(job).into_iter().cloned().collect();
        for node in &nodes {
            self.by_node.entry(node.clone()).or_default().insert(job.id);
        }
        if !nodes.is_empty() {
            self.nodes_of.insert(job.id, nodes);
        }
    }

    fn remove(&mut self, job: JobId) {
        self.live.remove(&job);
        for node in self.nodes_of.remove(&job).unwrap_or_default() {
            if let Some(jobs) = self.by_node.get_mut(&node) {
                jobs.remove(&job);
                if jobs.is_empty() {
                    self.by_node.remove(&node);
                }
            }
        }
    }

    /// Re-indexes the jobs touched since the last refresh.
    pub fn refresh(&mut self, jobs: &BTreeMap<JobId, Arc<Job>>) {
        for id in std::mem::take(&mut self.touched) {
            self.remove(id);
            if let Some(job) = jobs.get(&id) {
                self.add(job);
            }
        }
    }

    /// The same sets as a fresh build from `jobs`.
    fn matches(&self, jobs: &BTreeMap<JobId, Arc<Job>>) -> bool {
        let fresh = JobIndex::build(jobs);
        self.live == fresh.live && self.by_node == fresh.by_node && self.nodes_of == fresh.nodes_of
    }
}

/// [`State::job_mut`] for a handler that reads other fields of the state while it changes the
/// job (the borrows of `index` and `jobs` stay apart from the rest).
pub(super) fn job_mut_in<'a>(
    index: &mut JobIndex,
    jobs: &'a mut BTreeMap<JobId, Arc<Job>>,
    id: JobId,
) -> Option<&'a mut Job> {
    index.touch(id);
    jobs.get_mut(&id).map(Arc::make_mut)
}

impl State {
    /// Builds the job index (after loading a state: it is not stored).
    pub fn rebuild_index(&mut self) {
        self.index = JobIndex::build(&self.jobs);
    }

    /// Brings the index up to date after a command, and in debug builds checks it.
    pub(super) fn refresh_index(&mut self) {
        if !self.index.built {
            return;
        }
        self.index.refresh(&self.jobs);
        debug_assert!(
            self.jobs.len() > CHECK_IN_FULL_UP_TO_JOBS || self.index.matches(&self.jobs),
            "the job index disagrees with the jobs: a handler changed a job without touching it"
        );
    }

    /// Job `id`, to change: marked for the index, and copied first if a snapshot being written
    /// still shares it. Every change to a job goes through here.
    pub(super) fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        job_mut_in(&mut self.index, &mut self.jobs, id)
    }

    /// Jobs in state `Starting` or `Running`.
    pub fn live_jobs(&self) -> Box<dyn Iterator<Item = &Job> + '_> {
        if self.index.built {
            Box::new(
                self.index
                    .live
                    .iter()
                    .filter_map(|id| self.jobs.get(id).map(|j| &**j)),
            )
        } else {
            Box::new(self.jobs.values().map(|j| &**j).filter(|j| is_live(j)))
        }
    }

    /// Jobs holding something on `node`: an unreleased share of their allocation (in any state),
    /// or a share retired from an earlier attempt. A superset for callers to filter further.
    pub fn jobs_holding_on<'a>(
        &'a self,
        node: &'a NodeId,
    ) -> Box<dyn Iterator<Item = &'a Job> + 'a> {
        if self.index.built {
            Box::new(
                self.index
                    .by_node
                    .get(node)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.jobs.get(id).map(|j| &**j)),
            )
        } else {
            Box::new(
                self.jobs
                    .values()
                    .map(|j| &**j)
                    .filter(move |j| holds_on(j).contains(node)),
            )
        }
    }
}
