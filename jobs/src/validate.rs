//! [`JobSpec::validate`]: the value rules, on a typed spec however it was built.

use crate::checkpoint::{self, DIR_ACCEPTED};
use crate::env::{is_reserved_env, is_valid_env_name, RESERVED_ENV, RESERVED_ENV_PREFIX};
use crate::error::{SpecError, SpecErrorKind};
use crate::limits::{self, Bound, ARGV_LEN_MAX, NAME_LEN_MAX, SPEC_BYTES_MAX};
use crate::{CheckpointPolicy, FailurePolicy, JobSpec, Launch, Resources};

/// Origin used for errors about a spec that did not come from a file.
pub(crate) const CODE_ORIGIN: &str = "job spec";

pub(crate) fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    validate_name(&spec.name)
        .and_then(|()| validate_size(spec))
        .and_then(|()| validate_launch(&spec.launch))
        .and_then(|()| validate_resources(&spec.resources))
        .and_then(|()| validate_failure(&spec.failure))
        .and_then(|()| match &spec.checkpoint {
            Some(c) => validate_checkpoint(c),
            None => Ok(()),
        })
        .map_err(|mut e| {
            e.origin = CODE_ORIGIN.to_owned();
            e
        })
}

fn invalid(field: impl Into<String>, message: String) -> SpecError {
    SpecError::field(SpecErrorKind::Invalid, field, message)
}

pub(crate) const NAME_ACCEPTED: &str =
    "(accepted: 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit)";

fn validate_name(name: &str) -> Result<(), SpecError> {
    let length = name.chars().count();
    let problem = if name.is_empty() {
        "must not be empty".to_owned()
    } else if length > NAME_LEN_MAX {
        format!("is {length} characters long, more than {NAME_LEN_MAX}")
    } else if let Some((i, c)) = name
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c)))
    {
        let mut problem = format!("contains {c:?} at character {}", i + 1);
        if c.is_ascii_uppercase() {
            problem.push_str(&format!(
                "; names are lowercase, e.g. {:?}",
                name.to_ascii_lowercase()
            ));
        }
        problem
    } else if let Some(c) = name.chars().next().filter(|c| !c.is_ascii_alphanumeric()) {
        format!("must start with a letter or digit, not {c:?}")
    } else {
        return Ok(());
    };
    Err(invalid("name", format!("{problem} {NAME_ACCEPTED}")))
}

/// The spec's total size: the number of arguments, and the bytes of all its strings.
fn validate_size(spec: &JobSpec) -> Result<(), SpecError> {
    let argc = spec.launch.command.len();
    if argc > ARGV_LEN_MAX {
        return Err(invalid(
            "launch.command",
            format!("has {argc} arguments, more than {ARGV_LEN_MAX} (accepted: at most {ARGV_LEN_MAX} arguments; pass long lists in a file)"),
        ));
    }
    let launch = &spec.launch;
    let parts = [
        ("name", spec.name.len()),
        (
            "launch.command",
            launch.command.iter().map(String::len).sum(),
        ),
        (
            "launch.workdir",
            launch.workdir.as_ref().map_or(0, String::len),
        ),
        (
            "launch.env",
            launch.env.iter().map(|(k, v)| k.len() + v.len()).sum(),
        ),
        (
            "checkpoint",
            spec.checkpoint.as_ref().map_or(0, |c| {
                c.dir.len() + c.signal.as_ref().map_or(0, String::len)
            }),
        ),
    ];
    let total: usize = parts.iter().map(|&(_, n)| n).sum();
    if total <= SPEC_BYTES_MAX {
        return Ok(());
    }
    let (field, largest) = parts
        .iter()
        .copied()
        .max_by_key(|&(_, n)| n)
        .expect("parts is not empty");
    Err(invalid(
        field,
        format!("the spec's strings total {total} bytes, more than {SPEC_BYTES_MAX} (1 MiB), and {field} holds {largest} of them (accepted: at most {SPEC_BYTES_MAX} bytes of name, arguments, environment and paths in all; put large data in files)"),
    ))
}

fn validate_launch(launch: &Launch) -> Result<(), SpecError> {
    let Some(program) = launch.command.first() else {
        return Err(invalid(
            "launch.command",
            "must not be empty (accepted: the program and its arguments, e.g. [\"python3\", \"train.py\"])".to_owned(),
        ));
    };
    if program.trim().is_empty() {
        return Err(invalid(
            "launch.command[0]",
            format!("the program must not be empty or blank, got {program:?} (accepted: a program name looked up in PATH, or a path to it)"),
        ));
    }
    if launch.command.len() == 1 && looks_like_command_line(program) {
        let words: Vec<&str> = program.split_whitespace().collect();
        return Err(invalid(
            "launch.command[0]",
            format!(
                "{program:?} looks like a shell command line, but command is an argv and is never split; write {words:?} (accepted: an array of strings, one per argument)"
            ),
        ));
    }
    if let Some(i) = launch.command.iter().position(|arg| arg.contains('\0')) {
        return Err(invalid(
            format!("launch.command[{i}]"),
            "must not contain a NUL character".to_owned(),
        ));
    }
    if let Some(workdir) = &launch.workdir {
        if workdir.is_empty() {
            return Err(invalid(
                "launch.workdir",
                "must not be empty (accepted: a directory, relative to the spec file or absolute; leave workdir out for the spec file's directory)".to_owned(),
            ));
        }
        if workdir.contains('\0') {
            return Err(invalid(
                "launch.workdir",
                "must not contain a NUL character".to_owned(),
            ));
        }
    }
    for (key, value) in &launch.env {
        let field = format!("launch.env.{key}");
        if !is_valid_env_name(key) {
            return Err(invalid(
                field,
                format!("{key:?} is not a valid environment variable name (accepted: a letter or '_', then letters, digits and '_')"),
            ));
        }
        if is_reserved_env(key) {
            let hint = if key == "CUDA_VISIBLE_DEVICES" {
                "; ask for GPUs with resources.gpus_per_node and trainctl assigns them to ranks"
            } else {
                ""
            };
            return Err(invalid(
                field,
                format!(
                    "`{key}` is set by trainctl for every rank and cannot be set in a job spec{hint} (reserved: {}, and every name starting with {RESERVED_ENV_PREFIX})",
                    RESERVED_ENV.join(", ")
                ),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(
                field,
                "must not contain a NUL character".to_owned(),
            ));
        }
    }
    Ok(())
}

/// A lone argv[0] such as "python train.py": blank-separated words, not a path to a program.
fn looks_like_command_line(program: &str) -> bool {
    program.split_whitespace().count() > 1 && !program.contains('/') && !program.contains('\\')
}

fn validate_resources(r: &Resources) -> Result<(), SpecError> {
    let checks = [
        (limits::NODES, u64::from(r.nodes)),
        (limits::PROCS_PER_NODE, u64::from(r.procs_per_node)),
        (limits::GPUS_PER_NODE, u64::from(r.gpus_per_node)),
        (limits::CPUS_PER_NODE, u64::from(r.cpus_per_node)),
        (limits::MEMORY_PER_NODE_MIB, r.memory_per_node_mib),
    ];
    for (bound, value) in checks {
        bound
            .check(i128::from(value))
            .map_err(|message| invalid(bound.field, message))?;
    }
    // 0 means "equal to nodes" (a fixed job, or a spec stored before elastic jobs).
    if r.min_nodes > r.nodes {
        return Err(invalid(
            limits::MIN_NODES.field,
            format!(
                "must be at most nodes = {}, got {}; the minimum cannot exceed the maximum (accepted: an integer number of hosts from 1 to nodes, or 0 for nodes itself)",
                r.nodes, r.min_nodes
            ),
        ));
    }
    if r.gpus_per_node > 0 && r.gpus_per_node < r.procs_per_node {
        return Err(invalid(
            limits::GPUS_PER_NODE.field,
            format!(
                "{} GPUs per host cannot give each of the {} ranks per host its own GPU (accepted: 0 for a CPU-only job, or at least procs_per_node = {})",
                r.gpus_per_node, r.procs_per_node, r.procs_per_node
            ),
        ));
    }
    Ok(())
}

fn validate_failure(f: &FailurePolicy) -> Result<(), SpecError> {
    check(limits::MAX_RESTARTS, u64::from(f.max_restarts))?;
    match f.hang_timeout_ms {
        Some(ms) => check(limits::HANG_TIMEOUT.ms, ms),
        None => Ok(()),
    }
}

fn validate_checkpoint(c: &CheckpointPolicy) -> Result<(), SpecError> {
    if let Some(problem) = checkpoint::dir_problem(&c.dir) {
        return Err(invalid(
            "checkpoint.dir",
            format!("{problem} {DIR_ACCEPTED}"),
        ));
    }
    if let Some(signal) = &c.signal {
        let problem = match checkpoint::parse_signal(signal) {
            Ok(canonical) if canonical == signal => None,
            Ok(canonical) => Some(format!(
                "{signal:?} is not in the canonical form; write {canonical:?}"
            )),
            Err(problem) => Some(problem),
        };
        if let Some(problem) = problem {
            return Err(invalid(
                "checkpoint.signal",
                format!("{problem} {}", checkpoint::signal_accepted()),
            ));
        }
    }
    check(limits::GRACE.ms, c.grace_ms)?;
    match c.keep {
        Some(keep) => check(limits::CHECKPOINT_KEEP, u64::from(keep)),
        None => Ok(()),
    }
}

fn check(bound: Bound, value: u64) -> Result<(), SpecError> {
    bound
        .check(i128::from(value))
        .map(|_| ())
        .map_err(|message| invalid(bound.field, message))
}
