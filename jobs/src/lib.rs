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
//! # Layout
//! - `lib.rs`: the spec types and their entry points.
//! - `node`: a format-neutral document tree with byte spans, built from TOML or JSON.
//! - `parse`: the schema walker (unknown keys, wrong types, missing fields, defaults).
//! - `validate`: the value rules, shared by parsed specs and specs built in code.
//! - `suggest`: "did you mean ...?" for unknown keys.
//! - `env`, `limits`: reserved environment names and named bounds.
//! - `error`: [`SpecError`] and its `file:line:column: field: message` rendering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
/// serializing and reading back with [`JobSpec::from_json`] gives an equal spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// 1 to 63 characters of `[a-z0-9._-]`, starting with a letter or digit.
    pub name: String,
    /// What every rank runs.
    pub launch: Launch,
    /// The gang's shape and what each host must provide.
    pub resources: Resources,
    /// What to do when a rank fails.
    pub failure: FailurePolicy,
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

/// The `[resources]` table: a gang of `nodes` hosts with `procs_per_node` ranks each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Hosts in the gang, 1 to [`limits::NODES_MAX`].
    pub nodes: u32,
    /// Ranks per host, 1 to [`limits::PROCS_PER_NODE_MAX`].
    pub procs_per_node: u32,
    /// GPUs needed per host: 0 (CPU-only, the default) or at least `procs_per_node`.
    pub gpus_per_node: u32,
    /// CPUs needed per host; defaults to `procs_per_node`.
    pub cpus_per_node: u32,
    /// Memory needed per host in MiB; 0 (the default) means no requirement.
    pub memory_per_node_mib: u64,
}

/// The optional `[failure]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailurePolicy {
    /// How many times a failed gang may be restarted (default 0). Stored only, for now.
    pub max_restarts: u32,
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
        let result = serde_json::from_str::<serde_json::Value>(source)
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
            .and_then(|value| {
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

    /// Ranks in the gang: `nodes * procs_per_node` (at most 102 400 000 within the bounds;
    /// saturates on unvalidated specs).
    pub fn world_size(&self) -> u32 {
        self.resources
            .nodes
            .saturating_mul(self.resources.procs_per_node)
    }
}

#[cfg(test)]
mod tests;
