//! Named sanity bounds on a job spec, shared by the parsers and [`JobSpec::validate`].
//!
//! [`JobSpec::validate`]: crate::JobSpec::validate

/// Longest accepted job name, in characters (a DNS label).
pub const NAME_LEN_MAX: usize = 63;
/// Most hosts in one gang.
pub const NODES_MAX: u32 = 100_000;
/// Most ranks on one host.
pub const PROCS_PER_NODE_MAX: u32 = 1024;
/// Most GPUs a job may ask for on one host.
pub const GPUS_PER_NODE_MAX: u32 = 1024;
/// Most CPUs a job may ask for on one host.
pub const CPUS_PER_NODE_MAX: u32 = 65_536;
/// Most memory a job may ask for on one host: 64 TiB.
pub const MEMORY_PER_NODE_MIB_MAX: u64 = 64 * 1024 * 1024;
/// Most restarts a failure policy may allow.
pub const RESTARTS_MAX: u32 = 10_000;

/// The accepted range of one integer field, and how its range errors read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    /// Dotted path of the field.
    pub field: &'static str,
    /// What the number counts, for "must be an integer number of ...".
    pub counts: &'static str,
    pub min: u64,
    pub max: u64,
}

pub(crate) const NODES: Bound = Bound {
    field: "resources.nodes",
    counts: "hosts",
    min: 1,
    max: NODES_MAX as u64,
};
pub(crate) const PROCS_PER_NODE: Bound = Bound {
    field: "resources.procs_per_node",
    counts: "ranks per host",
    min: 1,
    max: PROCS_PER_NODE_MAX as u64,
};
pub(crate) const GPUS_PER_NODE: Bound = Bound {
    field: "resources.gpus_per_node",
    counts: "GPUs per host",
    min: 0,
    max: GPUS_PER_NODE_MAX as u64,
};
pub(crate) const CPUS_PER_NODE: Bound = Bound {
    field: "resources.cpus_per_node",
    counts: "CPUs per host",
    min: 1,
    max: CPUS_PER_NODE_MAX as u64,
};
pub(crate) const MEMORY_PER_NODE_MIB: Bound = Bound {
    field: "resources.memory_per_node_mib",
    counts: "MiB per host",
    min: 0,
    max: MEMORY_PER_NODE_MIB_MAX,
};
pub(crate) const MAX_RESTARTS: Bound = Bound {
    field: "failure.max_restarts",
    counts: "restarts",
    min: 0,
    max: RESTARTS_MAX as u64,
};

impl Bound {
    /// `(accepted: an integer number of hosts from 1 to 100000)`.
    pub fn accepted(&self) -> String {
        format!(
            "(accepted: an integer number of {} from {} to {})",
            self.counts, self.min, self.max
        )
    }

    /// Checks `value` against the range; the error message ends with [`Bound::accepted`].
    pub fn check(&self, value: i128) -> Result<u64, String> {
        let problem = if value < 0 && self.min == 0 {
            format!("must not be negative, got {value}")
        } else if value < i128::from(self.min) {
            format!("must be at least {}, got {value}", self.min)
        } else if value > i128::from(self.max) {
            format!("must be at most {}, got {value}", self.max)
        } else {
            return Ok(value as u64);
        };
        Err(format!("{problem} {}", self.accepted()))
    }
}
