//! The Prometheus registry behind `/metrics`: counters kept across requests, gauges set from the
//! state at scrape time.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::ApiError;
use crate::state::{NodeStatus, State as ClusterState};

/// Counters kept across requests; gauges are read from the state at scrape time.
pub struct Metrics {
    registry: Registry,
    pub submissions: Counter,
    pub placements: Counter,
    pub heartbeats: Counter,
    pub checkpoints: Counter,
    pub restarts: Counter,
    jobs: Family<Vec<(String, String)>, Gauge>,
    nodes: Family<Vec<(String, String)>, Gauge>,
    gpus_total: Gauge,
    gpus_allocated: Gauge,
    raft_last_applied: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trainctl");
        let submissions = Counter::default();
        let placements = Counter::default();
        let heartbeats = Counter::default();
        let checkpoints = Counter::default();
        let restarts = Counter::default();
        let jobs = Family::default();
        let nodes = Family::default();
        let gpus_total = Gauge::default();
        let gpus_allocated = Gauge::default();
        let raft_last_applied = Gauge::default();
        registry.register("job_submissions", "Jobs submitted", submissions.clone());
        registry.register(
            "gang_placements",
            "Gangs placed by the scheduler",
            placements.clone(),
        );
        registry.register(
            "agent_heartbeats",
            "Heartbeats received from agents",
            heartbeats.clone(),
        );
        registry.register(
            "checkpoint_commits",
            "Checkpoints committed by ranks",
            checkpoints.clone(),
        );
        registry.register(
            "gang_restarts",
            "Attempts ended by the leader (hangs, resizes, drains)",
            restarts.clone(),
        );
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register("nodes", "Nodes by status", nodes.clone());
        registry.register("gpus", "GPUs of nodes that are up", gpus_total.clone());
        registry.register(
            "gpus_allocated",
            "GPUs held by jobs",
            gpus_allocated.clone(),
        );
        registry.register(
            "raft_last_applied_index",
            "Last Raft log index applied",
            raft_last_applied.clone(),
        );
        Metrics {
            registry,
            submissions,
            placements,
            heartbeats,
            checkpoints,
            restarts,
            jobs,
            nodes,
            gpus_total,
            gpus_allocated,
            raft_last_applied,
        }
    }
}

impl Metrics {
    /// Sets the gauges from `state`, the jobs per state (`job_counts`) and the Raft log's last
    /// applied index. Called under the state's read lock; [`Metrics::encode`] then runs outside it.
    pub(super) fn observe(
        &self,
        job_counts: &BTreeMap<&'static str, u64>,
        state: &ClusterState,
        last_applied: u64,
    ) {
        for (job_state, count) in job_counts {
            self.jobs
                .get_or_create(&vec![("state".to_string(), job_state.to_string())])
                .set(*count as i64);
        }
        let (mut up, mut down, mut gpus, mut allocated) = (0, 0, 0, 0);
        for n in state.nodes.values() {
            if n.status == NodeStatus::Up {
                up += 1;
                gpus += n.resources.gpus.len() as i64;
            } else {
                down += 1;
            }
            allocated += n.usage.gpus.len() as i64;
        }
        self.nodes
            .get_or_create(&vec![("status".to_string(), "up".to_string())])
            .set(up);
        self.nodes
            .get_or_create(&vec![("status".to_string(), "down".to_string())])
            .set(down);
        self.gpus_total.set(gpus);
        self.gpus_allocated.set(allocated);
        self.raft_last_applied.set(last_applied as i64);
    }

    /// The OpenMetrics text of every metric.
    pub(super) fn encode(&self) -> Result<String, ApiError> {
        let mut body = String::new();
        encode(&mut body, &self.registry).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(body)
    }
}
