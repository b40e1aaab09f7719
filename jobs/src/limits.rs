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
/// Shortest accepted hang timeout (`failure.hang_timeout`): 1 s.
pub const HANG_TIMEOUT_MS_MIN: u64 = 1_000;
/// Longest accepted hang timeout (`failure.hang_timeout`): 7 days.
pub const HANG_TIMEOUT_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1_000;
/// Longest accepted checkpoint grace period (`checkpoint.grace`): 1 h. The shortest is 0.
pub const GRACE_MS_MAX: u64 = 60 * 60 * 1_000;
/// The checkpoint grace period when `checkpoint.grace` is left out: 2 min.
pub const GRACE_MS_DEFAULT: u64 = 120_000;
/// Most committed checkpoints a policy may ask to keep (`checkpoint.keep`).
pub const CHECKPOINT_KEEP_MAX: u32 = 10_000;
/// Longest accepted `checkpoint.dir`, in bytes before expansion (Linux `PATH_MAX`).
pub const CHECKPOINT_DIR_BYTES_MAX: usize = 4096;
/// Most arguments in `launch.command`.
pub const ARGV_LEN_MAX: usize = 4096;
/// Most bytes of strings in one spec, all together: the name, every argument, every
/// environment name and value, the workdir and the checkpoint settings (1 MiB).
pub const SPEC_BYTES_MAX: usize = 1024 * 1024;
/// Longest accepted spec document (TOML or JSON text), checked before parsing (4 MiB).
pub const SPEC_SOURCE_BYTES_MAX: usize = 4 * 1024 * 1024;

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
pub(crate) const MIN_NODES: Bound = Bound {
    field: "resources.min_nodes",
    counts: "hosts",
    min: 0,
    max: NODES_MAX as u64,
};
pub(crate) const CHECKPOINT_KEEP: Bound = Bound {
    field: "checkpoint.keep",
    counts: "checkpoints",
    min: 1,
    max: CHECKPOINT_KEEP_MAX as u64,
};
pub(crate) const HANG_TIMEOUT: DurationBound = DurationBound {
    field: "failure.hang_timeout",
    ms: Bound {
        field: "failure.hang_timeout_ms",
        counts: "milliseconds",
        min: HANG_TIMEOUT_MS_MIN,
        max: HANG_TIMEOUT_MS_MAX,
    },
};
pub(crate) const GRACE: DurationBound = DurationBound {
    field: "checkpoint.grace",
    ms: Bound {
        field: "checkpoint.grace_ms",
        counts: "milliseconds",
        min: 0,
        max: GRACE_MS_MAX,
    },
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
        match self.problem(value) {
            None => Ok(value as u64),
            Some(problem) => Err(format!("{problem} {}", self.accepted())),
        }
    }

    /// What is wrong with `value` (`must be at least 1, got 0`), without the accepted part.
    pub fn problem(&self, value: i128) -> Option<String> {
        if value < 0 && self.min == 0 {
            Some(format!("must not be negative, got {value}"))
        } else if value < i128::from(self.min) {
            Some(format!("must be at least {}, got {value}", self.min))
        } else if value > i128::from(self.max) {
            Some(format!("must be at most {}, got {value}", self.max))
        } else {
            None
        }
    }
}

/// The accepted range of a duration written either as a string (`hang_timeout = "10m"`, the
/// `field`) or as a number of milliseconds (`hang_timeout_ms = 600000`, the `ms` bound).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DurationBound {
    /// Dotted path of the duration-string field.
    pub field: &'static str,
    /// The range in milliseconds, under the `_ms` field's name.
    pub ms: Bound,
}

impl DurationBound {
    /// `(accepted: a duration from 1s to 7d, e.g. "30s", "10m" or "1h30m"; units ms, s, m, h, d)`.
    pub fn accepted(&self) -> String {
        format!(
            "(accepted: a duration from {} to {}, {})",
            crate::duration::format_ms(self.ms.min),
            crate::duration::format_ms(self.ms.max),
            crate::duration::FORMS
        )
    }

    /// Checks a parsed duration against the range, in duration words.
    pub fn check(&self, ms: u64) -> Result<u64, String> {
        let got = crate::duration::format_ms(ms);
        let problem = if ms < self.ms.min {
            format!(
                "must be at least {}, got {got}",
                crate::duration::format_ms(self.ms.min)
            )
        } else if ms > self.ms.max {
            format!(
                "must be at most {}, got {got}",
                crate::duration::format_ms(self.ms.max)
            )
        } else {
            return Ok(ms);
        };
        Err(format!("{problem} {}", self.accepted()))
    }
}
