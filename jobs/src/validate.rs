//! [`JobSpec::validate`]: the value rules, on a typed spec however it was built.

use crate::env::{is_reserved_env, is_valid_env_name, RESERVED_ENV, RESERVED_ENV_PREFIX};
use crate::error::{SpecError, SpecErrorKind};
use crate::limits::{self, NAME_LEN_MAX};
use crate::{FailurePolicy, JobSpec, Launch, Resources};

/// Origin used for errors about a spec that did not come from a file.
pub(crate) const CODE_ORIGIN: &str = "job spec";

pub(crate) fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    validate_name(&spec.name)
        .and_then(|()| validate_launch(&spec.launch))
        .and_then(|()| validate_resources(&spec.resources))
        .and_then(|()| validate_failure(&spec.failure))
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
    let bound = limits::MAX_RESTARTS;
    bound
        .check(i128::from(f.max_restarts))
        .map(|_| ())
        .map_err(|message| invalid(bound.field, message))
}
