//! The job model: [`JobSpec`], the TOML (or JSON) document a user writes to describe a
//! distributed training job, with its parsing and validation.
//!
//! This crate owns the spec's schema, its defaults, its sanity bounds ([`limits`]), the
//! environment names trainctl reserves for itself ([`RESERVED_ENV`]), and error messages that
//! say what was wrong, where (file, line, column, field) and what is accepted ([`SpecError`]).
//! It deliberately does no IO: no file reads, no environment reads, no clock. Callers (the
//! CLI, the REST API) read the text and pass it in with the name to use in messages, and
//! [`JobSpec::resolve_workdir`] is a pure path join. Scheduling, launching and job state
//! belong to the coordinator and agent crates.
//!
//! # What a spec says
//! - `name`, and `[launch]`: the argv every rank runs, its workdir and extra environment.
//! - `[resources]`: the gang's shape. `nodes = 4` asks for exactly 4 hosts; `nodes = "2:4"`
//!   (torchrun's `--nnodes MIN:MAX`) makes the job elastic: it starts with at least 2 hosts
//!   and runs on up to 4 ([`Resources::node_range`], [`Resources::is_elastic`]).
//!   `fabric = "ib" | "roce" | "any"` ([`Fabric`]) asks for hosts with an ACTIVE RDMA port of
//!   that fabric.
//! - `[failure]` ([`FailurePolicy`]): a job-wide restart budget and an optional hang timeout.
//! - `[checkpoint]` ([`CheckpointPolicy`], optional): where ranks write checkpoints, the
//!   signal that asks them to checkpoint before a planned stop, how long to wait for it, and
//!   how many checkpoints to keep.
//!
//! Durations are strings such as `"500ms"`, `"30s"`, `"10m"`, `"2h"` or `"1h30m"`; the
//! canonical JSON form stores them as whole milliseconds under a `_ms` key
//! (`hang_timeout = "10m"` is stored as `"hang_timeout_ms": 600000`), and both keys are
//! accepted in either format, one at a time.
//!
//! ```
//! use trainctl_jobs::JobSpec;
//!
//! let source = r#"
//! name = "elastic"
//! [launch]
//! command = ["python3", "train.py"]
//! [resources]
//! nodes = "2:4"
//! procs_per_node = 8
//! [failure]
//! max_restarts = 3
//! hang_timeout = "10m"
//! [checkpoint]
//! dir = "/shared/ckpt/{job}"
//! signal = "usr1"
//! "#;
//! let spec = JobSpec::from_toml(source, "job.toml").unwrap();
//! assert_eq!(spec.resources.node_range(), (2, 4));
//! assert_eq!((spec.min_world_size(), spec.world_size()), (16, 32));
//! assert_eq!(spec.failure.hang_timeout_ms, Some(600_000));
//! let checkpoint = spec.checkpoint.as_ref().unwrap();
//! assert_eq!(checkpoint.signal.as_deref(), Some("SIGUSR1"));
//! assert_eq!(checkpoint.grace_ms, 120_000);
//! assert_eq!(checkpoint.expand_dir(17, &spec.name), "/shared/ckpt/17");
//!
//! // The canonical JSON form reads back to the same spec.
//! let json = serde_json::to_string(&spec).unwrap();
//! assert_eq!(JobSpec::from_json(&json, "stored").unwrap(), spec);
//! ```
//!
//! # Layout
//! - `lib.rs`: the spec types and their entry points.
//! - `node`: a format-neutral document tree with byte spans, built from TOML or JSON.
//! - `parse`: the schema walker (unknown keys, wrong types, missing fields, defaults).
//! - `validate`: the value rules, shared by parsed specs and specs built in code.
//! - `duration`: duration strings (`"1h30m"`) to milliseconds and back.
//! - `checkpoint`: `checkpoint.dir` placeholders and checkpoint signals.
//! - `suggest`: "did you mean ...?" for unknown keys.
//! - `env`, `limits`: reserved environment names and named bounds.
//! - `error`: [`SpecError`] and its `file:line:column: field: message` rendering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod checkpoint;
mod duration;
/// Parses a duration as users write it (`"30s"`, `"10m"`, `"1h30m"`) into milliseconds.
pub use duration::parse_ms as parse_duration_ms;
mod env;
mod error;
pub mod limits;
mod node;
mod parse;
mod suggest;
mod validate;

pub use env::{is_reserved_env, RESERVED_ENV, RESERVED_ENV_PREFIX};
pub use error::{SpecError, SpecErrorKind};

/// A job as the user described it: what to run and on how much hardware.
///
/// Its serde JSON form is the canonical stored form, with every default filled in;
/// serializing and reading back with [`JobSpec::from_json`] gives an equal spec (for a spec
/// built in code with `min_nodes = 0`, one with `min_nodes = nodes`: the same node range).
/// Specs stored before `min_nodes`, `hang_timeout_ms`, `checkpoint` and `fabric` existed still
/// deserialize with serde, as `0`, `None`, `None` and [`Fabric::Any`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// 1 to 63 characters of `[a-z0-9._-]`, starting with a letter or digit.
    pub name: String,
    /// What every rank runs.
    pub launch: Launch,
    /// The gang's shape and what each host must provide.
    pub resources: Resources,
    /// What to do when a rank fails or the gang hangs.
    pub failure: FailurePolicy,
    /// The optional `[checkpoint]` table; `None` when the spec has none (and in specs stored
    /// before it existed).
    #[serde(default)]
    pub checkpoint: Option<CheckpointPolicy>,
}

/// The `[launch]` table: the command every rank runs, and where, and with what environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The argv, never a shell string: `command[0]` is the program, looked up in `PATH`.
    /// The agent runs a `trainctl` program as its own binary.
    pub command: Vec<String>,
    /// Working directory, relative to the spec file's directory or absolute; `None` means
    /// the spec file's directory. See [`JobSpec::resolve_workdir`].
    pub workdir: Option<String>,
    /// Extra environment for every rank; may not set [`RESERVED_ENV`] names.
    pub env: BTreeMap<String, String>,
}

/// The `[resources]` table: a gang of `nodes` hosts (or, for an elastic job, from `min_nodes`
/// to `nodes` hosts) with `procs_per_node` ranks each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// The most hosts in the gang, 1 to [`limits::NODES_MAX`]: the exact count for a fixed
    /// job, the maximum for an elastic one. Written `nodes = 4` (exactly 4), `nodes = "4"`
    /// (the same) or `nodes = "2:4"` (at least 2, at most 4, like torchrun's `--nnodes`).
    pub nodes: u32,
    /// The fewest hosts the gang runs with, 1 to `nodes`; equal to `nodes` for a fixed job.
    /// The parsers always set it. 0 means "equal to `nodes`" (specs stored before elastic
    /// jobs lack the field and read as 0); use [`Resources::node_range`] rather than reading
    /// it directly.
    ///
    /// Besides `nodes = "MIN:MAX"`, the minimum may be written as its own key, `min_nodes = 2`
    /// next to `nodes = 4` (the canonical JSON form does so). Both together must agree: a
    /// `min_nodes` that differs from the MIN of a `"MIN:MAX"` string is an error. An input
    /// `min_nodes = 0` means a fixed job and is read as `nodes`.
    #[serde(default)]
    pub min_nodes: u32,
    /// Ranks per host, 1 to [`limits::PROCS_PER_NODE_MAX`].
    pub procs_per_node: u32,
    /// GPUs needed per host: 0 (CPU-only, the default) or at least `procs_per_node`.
    pub gpus_per_node: u32,
    /// CPUs needed per host; defaults to `procs_per_node`.
    pub cpus_per_node: u32,
    /// Memory needed per host in MiB; 0 (the default) means no requirement.
    pub memory_per_node_mib: u64,
    /// The RDMA fabric every host of the gang must have: `fabric = "ib"`, `"roce"` or `"any"`
    /// (the default: placement ignores fabrics). Specs stored before it existed read as `Any`,
    /// and the canonical JSON form leaves out `Any`, so such a spec serializes (and its
    /// idempotency digest reads) exactly as before the field existed.
    #[serde(default, skip_serializing_if = "Fabric::is_any")]
    pub fabric: Fabric,
}

/// The RDMA fabric a job asks for (`[resources] fabric`). A host has a fabric when one of its
/// RDMA ports is ACTIVE with that link layer; a host may have both.
///
/// ```
/// use trainctl_jobs::Fabric;
///
/// assert_eq!(Fabric::parse("roce"), Ok(Fabric::Roce));
/// assert_eq!(Fabric::default(), Fabric::Any);
/// let problem = Fabric::parse("InfiniBand").unwrap_err();
/// assert!(problem.contains("write \"ib\""), "{problem}");
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Fabric {
    /// No requirement: hosts with any fabric, or none, are placed as before.
    #[default]
    Any,
    /// InfiniBand: every host needs an ACTIVE port with link layer `InfiniBand`.
    Ib,
    /// RDMA over Converged Ethernet: every host needs an ACTIVE port with link layer `Ethernet`.
    Roce,
}

impl Fabric {
    /// Every fabric, in the order the accepted values are listed.
    pub const ALL: [Fabric; 3] = [Fabric::Ib, Fabric::Roce, Fabric::Any];

    /// Whether this is the default, [`Fabric::Any`].
    pub fn is_any(&self) -> bool {
        *self == Fabric::Any
    }

    /// The value as a spec writes it: `"ib"`, `"roce"` or `"any"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fabric::Any => "any",
            Fabric::Ib => "ib",
            Fabric::Roce => "roce",
        }
    }

    /// The fabric in words for messages: "InfiniBand", "RoCE", "any fabric".
    pub fn describe(self) -> &'static str {
        match self {
            Fabric::Any => "any fabric",
            Fabric::Ib => "InfiniBand",
            Fabric::Roce => "RoCE",
        }
    }

    /// Reads a spec's value (exactly `"ib"`, `"roce"` or `"any"`). The error says what was
    /// wrong, suggests the value meant where it can (`"InfiniBand"` -> `"ib"`), and ends with
    /// [`Fabric::ACCEPTED`].
    pub fn parse(text: &str) -> Result<Fabric, String> {
        if let Some(f) = Fabric::ALL.into_iter().find(|f| f.as_str() == text) {
            return Ok(f);
        }
        let folded: String = text
            .trim()
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let meant = match folded.as_str() {
            "ib" | "infiniband" => Some(Fabric::Ib),
            "roce" | "rocev1" | "rocev2" | "ethernet" | "eth" => Some(Fabric::Roce),
            "any" | "none" | "" | "auto" | "default" => Some(Fabric::Any),
            _ => None,
        };
        let problem = if text.is_empty() {
            "must not be empty".to_owned()
        } else {
            format!("{text:?} is not a fabric")
        };
        Err(match meant {
            Some(f) if !text.is_empty() => {
                format!("{problem}; write {:?} {}", f.as_str(), Fabric::ACCEPTED)
            }
            _ => format!("{problem} {}", Fabric::ACCEPTED),
        })
    }

    /// The accepted values, as messages end with them.
    pub const ACCEPTED: &'static str = "(accepted: \"ib\" for InfiniBand, \"roce\" for RDMA over Converged Ethernet (v1 or v2), or \"any\", the default, for no requirement)";
}

impl std::fmt::Display for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The optional `[failure]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailurePolicy {
    /// Job-wide restart budget (default 0), 0 to [`limits::RESTARTS_MAX`].
    pub max_restarts: u32,
    /// A gang that makes no progress this long is restarted; None = no hang detection.
    /// Written `hang_timeout = "10m"` (a duration string) or `hang_timeout_ms = 600000`
    /// (the canonical JSON form), not both; from [`limits::HANG_TIMEOUT_MS_MIN`] (1 s) to
    /// [`limits::HANG_TIMEOUT_MS_MAX`] (7 days).
    #[serde(default)]
    pub hang_timeout_ms: Option<u64>,
}

/// The optional `[checkpoint]` table: how a job's ranks checkpoint, as trainctl needs to know
/// it for planned stops (rescaling an elastic job, draining a host) and for cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPolicy {
    /// Where ranks write checkpoints (shared storage); `{job}` (the job id) and `{name}` (the
    /// job name) are expanded by [`CheckpointPolicy::expand_dir`]. Relative paths are relative
    /// to the job's workdir. Required, non-empty, no NUL, no other `{...}` placeholders, at
    /// most [`limits::CHECKPOINT_DIR_BYTES_MAX`] bytes.
    pub dir: String,
    /// Signal sent to every rank as "checkpoint now" before a planned stop, e.g. "SIGUSR1";
    /// None = none. Written `"SIGUSR1"`, `"USR1"` or `"usr1"`; stored in the canonical
    /// `"SIGUSR1"` form. SIGKILL and SIGSTOP are refused (they cannot be caught).
    #[serde(default)]
    pub signal: Option<String>,
    /// How long a planned stop waits for a new checkpoint commit (default 120 000 ms = "2m").
    /// Written `grace = "2m"` or `grace_ms = 120000` (the canonical JSON form), not both;
    /// 0 to [`limits::GRACE_MS_MAX`] (1 h).
    pub grace_ms: u64,
    /// Committed checkpoints to keep on disk; older ones are deleted by trainctl. None = keep
    /// all. 1 to [`limits::CHECKPOINT_KEEP_MAX`].
    #[serde(default)]
    pub keep: Option<u32>,
}

impl JobSpec {
    /// Parses and validates a TOML spec. `origin` names the source in messages (usually
    /// the file name as the user gave it); errors carry its line and column.
    ///
    /// ```
    /// use trainctl_jobs::JobSpec;
    ///
    /// let source = "name = \"ddp\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\n\
    ///               [resources]\nnodes = 2\nprocs_per_node = 0\n";
    /// let err = JobSpec::from_toml(source, "job.toml").unwrap_err();
    /// assert_eq!(err.line, Some(6));
    /// assert_eq!(err.field.as_deref(), Some("resources.procs_per_node"));
    /// assert!(err.to_string().starts_with("job.toml:6:18: resources.procs_per_node: must be at least 1"));
    /// ```
    pub fn from_toml(source: &str, origin: &str) -> Result<JobSpec, SpecError> {
        check_source_len(source, origin)?;
        let doc = toml::de::DeTable::parse(source).map_err(|e| {
            let mut err = SpecError {
                origin: String::new(),
                line: None,
                column: None,
                field: None,
                kind: SpecErrorKind::Syntax,
                message: format!("invalid TOML: {}", e.message()),
            };
            // The parser does not say which key is duplicated; the span covers it.
            if let Some(key) = e
                .span()
                .filter(|_| e.message().starts_with("duplicate key"))
                .and_then(|span| source.get(span))
            {
                err.message.push_str(&format!(" `{}`", key.trim()));
            }
            if let Some(span) = e.span() {
                err.locate(source, span.start);
            }
            err
        });
        let result = doc.and_then(|doc| {
            let root = node::Node::from_toml(doc);
            let mut walker = parse::Walker::new(Some(source));
            let spec = walker.job_spec(&root)?;
            spec.validate().map_err(|mut e| {
                if let Some(offset) = e.field.as_deref().and_then(|f| walker.spans.find(f)) {
                    e.locate(source, offset);
                }
                e
            })?;
            Ok(spec)
        });
        result.map_err(|mut e| {
            e.origin = origin.to_owned();
            e
        })
    }

    /// Parses and validates a JSON spec with the same schema (a REST request body, or the
    /// stored form). Syntax errors carry line and column; schema and value errors name the
    /// field only, as JSON values carry no positions here.
    pub fn from_json(source: &str, origin: &str) -> Result<JobSpec, SpecError> {
        check_source_len(source, origin)?;
        let result = serde_json::from_str::<node::StrictJson>(source)
            .map_err(|e| {
                let full = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                SpecError {
                    origin: String::new(),
                    line: Some(e.line()).filter(|&l| l > 0),
                    column: Some(e.column()).filter(|&c| c > 0),
                    field: None,
                    kind: SpecErrorKind::Syntax,
                    message: format!(
                        "invalid JSON: {}",
                        full.strip_suffix(&suffix).unwrap_or(&full)
                    ),
                }
            })
            .and_then(|node::StrictJson(value)| {
                let spec = parse::Walker::new(None).job_spec(&node::Node::from_json(value))?;
                spec.validate()?;
                Ok(spec)
            });
        result.map_err(|mut e| {
            e.origin = origin.to_owned();
            e
        })
    }

    /// Checks every value rule: name, command, environment, sizes and their bounds. The
    /// parsers call it; call it on specs built in code. Errors name the field but carry no
    /// position, and their origin is `job spec`.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate::validate(self)
    }

    /// Makes the working directory explicit: a relative workdir (or none, meaning `.`)
    /// becomes `spec_dir.join(workdir)`; an absolute one stays. A pure path join with `.`
    /// components dropped (`..` is kept, since resolving it needs the file system).
    /// Pass an absolute `spec_dir` to get an absolute workdir.
    pub fn resolve_workdir(&mut self, spec_dir: &Path) {
        let joined = match &self.launch.workdir {
            Some(workdir) if Path::new(workdir).is_absolute() => return,
            Some(workdir) => spec_dir.join(workdir),
            None => spec_dir.to_path_buf(),
        };
        let normalized: PathBuf = joined.components().collect();
        let resolved = normalized.to_string_lossy().into_owned();
        self.launch.workdir = Some(if resolved.is_empty() {
            ".".to_owned()
        } else {
            resolved
        });
    }

    /// Ranks in the gang at its largest: `nodes * procs_per_node` (at most 102 400 000 within
    /// the bounds; saturates on unvalidated specs). For a fixed job, the world size.
    pub fn world_size(&self) -> u32 {
        self.resources
            .nodes
            .saturating_mul(self.resources.procs_per_node)
    }

    /// Ranks in the gang at its smallest: the minimum of [`Resources::node_range`] times
    /// `procs_per_node` (equal to [`JobSpec::world_size`] for a fixed job; saturates).
    pub fn min_world_size(&self) -> u32 {
        self.resources
            .node_range()
            .0
            .saturating_mul(self.resources.procs_per_node)
    }
}

impl Resources {
    /// `(min, max)` hosts: `(min_nodes, nodes)`, where a `min_nodes` of 0 means `nodes`
    /// (a fixed job, or a spec stored before elastic jobs).
    pub fn node_range(&self) -> (u32, u32) {
        let min = if self.min_nodes == 0 {
            self.nodes
        } else {
            self.min_nodes
        };
        (min, self.nodes)
    }

    /// Whether the gang may run with fewer hosts than `nodes` (min < max).
    pub fn is_elastic(&self) -> bool {
        let (min, max) = self.node_range();
        min < max
    }
}

/// Refuses a document longer than [`limits::SPEC_SOURCE_BYTES_MAX`] before parsing it.
fn check_source_len(source: &str, origin: &str) -> Result<(), SpecError> {
    if source.len() <= limits::SPEC_SOURCE_BYTES_MAX {
        return Ok(());
    }
    Err(SpecError {
        origin: origin.to_owned(),
        line: None,
        column: None,
        field: None,
        kind: SpecErrorKind::Invalid,
        message: format!(
            "the spec is {} bytes long, more than {} (accepted: a document of at most 4 MiB, with at most {} bytes of strings; put large data in files)",
            source.len(),
            limits::SPEC_SOURCE_BYTES_MAX,
            limits::SPEC_BYTES_MAX
        ),
    })
}

#[cfg(test)]
mod tests;
