//! The schema walker: a [`Node`] tree (from TOML or JSON) to a [`JobSpec`] with its defaults
//! filled in, reporting unknown keys, wrong types and missing fields, and recording where each
//! field was written so that later validation errors can point at it.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::checkpoint::{self, DIR_ACCEPTED};
use crate::duration;
use crate::error::{SpecError, SpecErrorKind};
use crate::limits::{self, Bound, DurationBound};
use crate::node::{Entry, Node, Value};
use crate::suggest::{did_you_mean, KNOWN_KEYS};
use crate::{CheckpointPolicy, Fabric, FailurePolicy, JobSpec, Launch, Resources};

/// Byte offset where each field (dotted path) was written, for locating validation errors.
#[derive(Debug, Default)]
pub(crate) struct Spans(BTreeMap<String, usize>);

impl Spans {
    /// Offset of `field`, or of the nearest enclosing field or table that was written.
    pub fn find(&self, field: &str) -> Option<usize> {
        let mut path = field;
        loop {
            if let Some(&offset) = self.0.get(path) {
                return Some(offset);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }
}

/// Walks one document. `source` is the TOML text the spans point into (`None` for JSON).
pub(crate) struct Walker<'s> {
    source: Option<&'s str>,
    pub spans: Spans,
}

type Result<T> = std::result::Result<T, SpecError>;

const COMMAND_EXAMPLE: &str = "command = [\"python3\", \"-u\", \"train.py\"]";

/// Every accepted form of `resources.nodes`.
const NODES_ACCEPTED: &str = "(accepted: an integer number of hosts from 1 to 100000, e.g. nodes = 4, or a \"MIN:MAX\" range for an elastic job, e.g. nodes = \"2:4\", with 1 <= MIN <= MAX <= 100000)";

impl<'s> Walker<'s> {
    pub fn new(source: Option<&'s str>) -> Self {
        Walker {
            source,
            spans: Spans::default(),
        }
    }

    fn error(
        &self,
        kind: SpecErrorKind,
        field: &str,
        span: Option<&Range<usize>>,
        message: String,
    ) -> SpecError {
        let mut e = SpecError::field(kind, field, message);
        if let (Some(source), Some(span)) = (self.source, span) {
            e.locate(source, span.start);
        }
        e
    }

    fn wrong_type(&self, field: &str, node: &Node, expected: &str, accepted: &str) -> SpecError {
        self.error(
            SpecErrorKind::WrongType,
            field,
            node.span.as_ref(),
            format!(
                "must be {expected}, got {} {accepted}",
                node.value.describe()
            ),
        )
    }

    fn record(&mut self, field: &str, span: Option<&Range<usize>>) {
        if let Some(span) = span {
            self.spans.0.insert(field.to_owned(), span.start);
        }
    }

    /// The whole document.
    pub fn job_spec(&mut self, root: &Node) -> Result<JobSpec> {
        let root_entries = self.table(root, "")?;
        // Unknown keys first, at every level: a misspelled or misplaced key (`name` written
        // under [launch]) explains the "missing field" error that would otherwise come first.
        for entry in root_entries {
            let is_table = matches!(entry.node.value, Value::Table(_));
            if is_table
                && ["launch", "resources", "failure", "checkpoint"].contains(&entry.key.as_str())
            {
                self.table(&entry.node, &entry.key)?;
            }
        }
        let name = match get(root_entries, "name") {
            Some(node) => self.string(node, "name", crate::validate::NAME_ACCEPTED)?,
            None => {
                return Err(self.error(
                    SpecErrorKind::Missing,
                    "name",
                    None,
                    "missing required field; add name = \"my-job\" at the top level, before any [table] header (accepted: 1 to 63 characters of a-z, 0-9, '.', '_' and '-')".to_owned(),
                ))
            }
        };
        let launch = self.launch(get(root_entries, "launch"))?;
        let resources = self.resources(get(root_entries, "resources"))?;
        let failure = self.failure(get(root_entries, "failure"))?;
        let checkpoint = self.checkpoint(get(root_entries, "checkpoint"))?;
        Ok(JobSpec {
            name,
            launch,
            resources,
            failure,
            checkpoint,
        })
    }

    /// Checks that `node` is a table with only known keys, and returns its entries.
    fn table<'n>(&mut self, node: &'n Node, path: &str) -> Result<&'n [Entry]> {
        let known: Vec<&str> = KNOWN_KEYS
            .iter()
            .filter(|(t, _)| *t == path)
            .map(|&(_, k)| k)
            .collect();
        let accepted = format!("(accepted: {})", known.join(", "));
        let Value::Table(entries) = &node.value else {
            if path.is_empty() {
                let mut e = self.wrong_type(
                    "",
                    node,
                    "a table (a JSON object)",
                    &format!("(accepted: a table with keys {})", known.join(", ")),
                );
                e.field = None;
                e.message = format!("the spec {}", e.message);
                return Err(e);
            }
            let hint = if matches!(node.value, Value::Array(_)) {
                format!(" (write [{path}], not [[{path}]])")
            } else {
                String::new()
            };
            let expected = format!("a table{hint}");
            let accepted = format!(
                "(accepted: a [{path}] table with keys {})",
                known.join(", ")
            );
            return Err(self.wrong_type(path, node, &expected, &accepted));
        };
        if !path.is_empty() {
            self.record(path, node.span.as_ref());
        }
        if let Some(unknown) = entries.iter().find(|e| !known.contains(&e.key.as_str())) {
            let field = join(path, &unknown.key);
            let message = match did_you_mean(path, &unknown.key) {
                Some(hint) => format!("unknown field; {hint} {accepted}"),
                None => format!("unknown field {accepted}"),
            };
            return Err(self.error(
                SpecErrorKind::UnknownField,
                &field,
                unknown.key_span.as_ref(),
                message,
            ));
        }
        Ok(entries)
    }

    /// A required field of table `path`; `table` is `None` when the table itself is absent.
    fn required<'n>(
        &self,
        table: Option<(&'n Node, &'n [Entry])>,
        path: &str,
        key: &str,
        example: &str,
    ) -> Result<&'n Node> {
        if let Some(node) = table.and_then(|(_, entries)| get(entries, key)) {
            return Ok(node);
        }
        let (span, message) = match table {
            Some((node, _)) => (
                node.span.as_ref(),
                format!("missing required field `{key}` in the [{path}] table; add {example}"),
            ),
            None => (
                None,
                format!("missing required field `{key}`: add a [{path}] table with {example}"),
            ),
        };
        Err(self.error(SpecErrorKind::Missing, &join(path, key), span, message))
    }

    fn launch(&mut self, node: Option<&Node>) -> Result<Launch> {
        let table = match node {
            Some(node) => Some((node, self.table(node, "launch")?)),
            None => None,
        };
        let entries = table.map_or(&[][..], |(_, e)| e);
        let command = self.required(table, "launch", "command", COMMAND_EXAMPLE)?;
        let command = self.command(command)?;
        let workdir = match get(entries, "workdir") {
            Some(node) => Some(self.string(
                node,
                "launch.workdir",
                "(accepted: a directory, relative to the spec file or absolute)",
            )?),
            None => None,
        };
        let env = match get(entries, "env") {
            Some(node) => self.env(node)?,
            None => BTreeMap::new(),
        };
        Ok(Launch {
            command,
            workdir,
            env,
        })
    }

    fn command(&mut self, node: &Node) -> Result<Vec<String>> {
        const FIELD: &str = "launch.command";
        const ACCEPTED: &str =
            "(accepted: an array of strings, one per argument, e.g. [\"python3\", \"train.py\"])";
        self.record(FIELD, node.span.as_ref());
        let items = match &node.value {
            Value::Array(items) => items,
            Value::Str(line) => {
                let words: Vec<&str> = line.split_whitespace().collect();
                let example = if words.is_empty() {
                    "[\"python3\", \"train.py\"]".to_owned()
                } else {
                    format!("{words:?}")
                };
                return Err(self.error(
                    SpecErrorKind::WrongType,
                    FIELD,
                    node.span.as_ref(),
                    format!(
                        "must be an array of strings (an argv, not a shell string), got a string; write command = {example}, or [\"sh\", \"-c\", ...] if you need a shell {ACCEPTED}"
                    ),
                ));
            }
            _ => return Err(self.wrong_type(FIELD, node, "an array of strings", ACCEPTED)),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let field = format!("{FIELD}[{i}]");
                self.record(&field, item.span.as_ref());
                match &item.value {
                    Value::Str(s) => Ok(s.clone()),
                    Value::Int(_) | Value::Float(_) | Value::Bool(_) => Err(self.wrong_type(
                        &field,
                        item,
                        "a string",
                        "(accepted: a string; quote numbers and flags, e.g. \"2\")",
                    )),
                    _ => Err(self.wrong_type(&field, item, "a string", ACCEPTED)),
                }
            })
            .collect()
    }

    fn env(&mut self, node: &Node) -> Result<BTreeMap<String, String>> {
        const FIELD: &str = "launch.env";
        let Value::Table(entries) = &node.value else {
            return Err(self.wrong_type(
                FIELD,
                node,
                "a table of strings",
                "(accepted: e.g. env = { NCCL_DEBUG = \"WARN\" })",
            ));
        };
        self.record(FIELD, node.span.as_ref());
        let mut env = BTreeMap::new();
        for entry in entries {
            let field = format!("{FIELD}.{}", entry.key);
            // Point at the key: most env mistakes (bad or reserved names) are in the key.
            self.record(&field, entry.key_span.as_ref().or(entry.node.span.as_ref()));
            let Value::Str(value) = &entry.node.value else {
                let quoted = match &entry.node.value {
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => f.clone(),
                    Value::Bool(b) => b.to_string(),
                    _ => "...".to_owned(),
                };
                let accepted = format!(
                    "(accepted: a string; quote it: {} = \"{quoted}\")",
                    entry.key
                );
                return Err(self.wrong_type(&field, &entry.node, "a string", &accepted));
            };
            env.insert(entry.key.clone(), value.clone());
        }
        Ok(env)
    }

    fn resources(&mut self, node: Option<&Node>) -> Result<Resources> {
        let table = match node {
            Some(node) => Some((node, self.table(node, "resources")?)),
            None => None,
        };
        let entries = table.map_or(&[][..], |(_, e)| e);
        let nodes = self.required(table, "resources", "nodes", "nodes = 2")?;
        let (range_min, nodes) = self.node_count(nodes)?;
        let min_nodes = self.min_nodes(entries, range_min, nodes)?;
        let procs = self.required(table, "resources", "procs_per_node", "procs_per_node = 8")?;
        let procs_per_node = self.u32(procs, limits::PROCS_PER_NODE)?;
        let gpus_per_node = self.optional_u32(entries, "gpus_per_node", limits::GPUS_PER_NODE)?;
        let cpus_per_node = self.optional_u32(entries, "cpus_per_node", limits::CPUS_PER_NODE)?;
        let memory_per_node_mib = match get(entries, "memory_per_node_mib") {
            Some(node) => self.integer(node, limits::MEMORY_PER_NODE_MIB)?,
            None => 0,
        };
        let fabric = match get(entries, "fabric") {
            Some(node) => self.fabric(node)?,
            None => Fabric::Any,
        };
        Ok(Resources {
            nodes,
            min_nodes,
            procs_per_node,
            gpus_per_node: gpus_per_node.unwrap_or(0),
            cpus_per_node: cpus_per_node.unwrap_or(procs_per_node),
            memory_per_node_mib,
            fabric,
        })
    }

    /// `resources.fabric`: `"ib"`, `"roce"` or `"any"`.
    fn fabric(&mut self, node: &Node) -> Result<Fabric> {
        const FIELD: &str = "resources.fabric";
        let text = self.string(node, FIELD, Fabric::ACCEPTED)?;
        Fabric::parse(&text).map_err(|problem| {
            self.error(SpecErrorKind::Invalid, FIELD, node.span.as_ref(), problem)
        })
    }

    /// `resources.nodes`: an integer, or a string `"N"` or `"MIN:MAX"`. Returns the MIN of a
    /// range (`None` otherwise) and the maximum.
    fn node_count(&mut self, node: &Node) -> Result<(Option<u32>, u32)> {
        let bound = limits::NODES;
        let Value::Str(text) = &node.value else {
            if let Value::Int(_) = node.value {
                return Ok((None, self.u32(node, bound)?));
            }
            self.record(bound.field, node.span.as_ref());
            return Err(self.wrong_type(
                bound.field,
                node,
                "an integer number of hosts or a \"MIN:MAX\" string",
                NODES_ACCEPTED,
            ));
        };
        self.record(bound.field, node.span.as_ref());
        parse_node_range(text).map_err(|problem| {
            self.error(
                SpecErrorKind::Invalid,
                bound.field,
                node.span.as_ref(),
                format!("{problem} {NODES_ACCEPTED}"),
            )
        })
    }

    /// `resources.min_nodes`, reconciled with a `"MIN:MAX"` in `nodes` (`range_min`).
    fn min_nodes(&mut self, entries: &[Entry], range_min: Option<u32>, max: u32) -> Result<u32> {
        let bound = limits::MIN_NODES;
        let Some(node) = get(entries, "min_nodes") else {
            return Ok(range_min.unwrap_or(max));
        };
        // 0 means "the same as nodes": a fixed job.
        let given = match self.u32(node, bound)? {
            0 => max,
            n => n,
        };
        let problem = match range_min {
            Some(min) if min != given => format!(
                "min_nodes = {given} disagrees with the minimum {min} in nodes = \"{min}:{max}\"; give the minimum once: nodes = \"{given}:{max}\", or nodes = {max} with min_nodes = {given}"
            ),
            _ if given > max => format!(
                "must be at most nodes = {max}, got {given}; the minimum cannot exceed the maximum"
            ),
            _ => return Ok(given),
        };
        Err(self.error(
            SpecErrorKind::Invalid,
            bound.field,
            node.span.as_ref(),
            format!("{problem} (accepted: an integer number of hosts from 1 to nodes, or 0 for nodes itself)"),
        ))
    }

    fn failure(&mut self, node: Option<&Node>) -> Result<FailurePolicy> {
        let entries = match node {
            Some(node) => self.table(node, "failure")?,
            None => &[],
        };
        let max_restarts = self.optional_u32(entries, "max_restarts", limits::MAX_RESTARTS)?;
        let hang_timeout_ms = self.duration(entries, limits::HANG_TIMEOUT)?;
        Ok(FailurePolicy {
            max_restarts: max_restarts.unwrap_or(0),
            hang_timeout_ms,
        })
    }

    fn checkpoint(&mut self, node: Option<&Node>) -> Result<Option<CheckpointPolicy>> {
        let Some(node) = node else {
            return Ok(None);
        };
        let entries = self.table(node, "checkpoint")?;
        let dir = self.required(
            Some((node, entries)),
            "checkpoint",
            "dir",
            "dir = \"/shared/ckpt/{job}\"",
        )?;
        let dir = self.string(dir, "checkpoint.dir", DIR_ACCEPTED)?;
        let signal = match get(entries, "signal") {
            Some(node) => Some(self.signal(node)?),
            None => None,
        };
        let grace_ms = self
            .duration(entries, limits::GRACE)?
            .unwrap_or(limits::GRACE_MS_DEFAULT);
        let keep = self.optional_u32(entries, "keep", limits::CHECKPOINT_KEEP)?;
        Ok(Some(CheckpointPolicy {
            dir,
            signal,
            grace_ms,
            keep,
        }))
    }

    /// `checkpoint.signal`, in its canonical form.
    fn signal(&mut self, node: &Node) -> Result<String> {
        const FIELD: &str = "checkpoint.signal";
        let text = self.string(node, FIELD, &checkpoint::signal_accepted())?;
        checkpoint::parse_signal(&text)
            .map(str::to_owned)
            .map_err(|problem| {
                self.error(
                    SpecErrorKind::Invalid,
                    FIELD,
                    node.span.as_ref(),
                    format!("{problem} {}", checkpoint::signal_accepted()),
                )
            })
    }

    /// A duration written either as a string under `bound.field`'s key (`grace = "2m"`) or
    /// as milliseconds under `bound.ms.field`'s key (`grace_ms = 120000`), not both.
    fn duration(&mut self, entries: &[Entry], bound: DurationBound) -> Result<Option<u64>> {
        let key = last_key(bound.field);
        let ms_key = last_key(bound.ms.field);
        match (get(entries, key), get(entries, ms_key)) {
            (Some(_), Some(ms_node)) => {
                self.record(bound.ms.field, ms_node.span.as_ref());
                Err(self.error(
                    SpecErrorKind::Invalid,
                    bound.ms.field,
                    ms_node.span.as_ref(),
                    format!(
                        "{key} is set too; give either {key} (a duration string such as \"10m\") or {ms_key} (an integer number of milliseconds), not both"
                    ),
                ))
            }
            (None, Some(ms_node)) => self.integer(ms_node, bound.ms).map(Some),
            (Some(node), None) => {
                self.record(bound.field, node.span.as_ref());
                let text = match &node.value {
                    Value::Str(text) => text,
                    Value::Int(i) => {
                        return Err(self.error(
                            SpecErrorKind::WrongType,
                            bound.field,
                            node.span.as_ref(),
                            format!(
                                "must be a duration string, got an integer {i}; write {key} = \"{i}s\" for seconds, or {ms_key} = {i} for milliseconds {}",
                                bound.accepted()
                            ),
                        ))
                    }
                    _ => {
                        return Err(self.wrong_type(
                            bound.field,
                            node,
                            "a duration string",
                            &bound.accepted(),
                        ))
                    }
                };
                duration::parse_ms(text)
                    .map_err(|problem| format!("{problem} {}", bound.accepted()))
                    .and_then(|ms| bound.check(ms))
                    .map(Some)
                    .map_err(|message| {
                        self.error(
                            SpecErrorKind::Invalid,
                            bound.field,
                            node.span.as_ref(),
                            message,
                        )
                    })
            }
            (None, None) => Ok(None),
        }
    }

    fn optional_u32(&mut self, entries: &[Entry], key: &str, bound: Bound) -> Result<Option<u32>> {
        debug_assert!(bound.field.ends_with(key));
        get(entries, key)
            .map(|node| self.u32(node, bound))
            .transpose()
    }

    fn u32(&mut self, node: &Node, bound: Bound) -> Result<u32> {
        debug_assert!(bound.max <= u64::from(u32::MAX));
        let value = self.integer(node, bound)?;
        Ok(u32::try_from(value).expect("bound.max fits in u32"))
    }

    /// An integer within `bound`.
    fn integer(&mut self, node: &Node, bound: Bound) -> Result<u64> {
        self.record(bound.field, node.span.as_ref());
        let expected = format!("an integer number of {}", bound.counts);
        match &node.value {
            Value::Int(i) => bound.check(*i).map_err(|message| {
                self.error(
                    SpecErrorKind::Invalid,
                    bound.field,
                    node.span.as_ref(),
                    message,
                )
            }),
            Value::Str(s) if s.trim().parse::<i128>().is_ok() => {
                let key = bound.field.rsplit('.').next().unwrap_or(bound.field);
                Err(self.error(
                    SpecErrorKind::WrongType,
                    bound.field,
                    node.span.as_ref(),
                    format!(
                        "must be {expected}, got a string {s:?}; remove the quotes: {key} = {} {}",
                        s.trim(),
                        bound.accepted()
                    ),
                ))
            }
            _ => Err(self.wrong_type(bound.field, node, &expected, &bound.accepted())),
        }
    }

    fn string(&mut self, node: &Node, field: &str, accepted: &str) -> Result<String> {
        self.record(field, node.span.as_ref());
        match &node.value {
            Value::Str(s) => Ok(s.clone()),
            _ => Err(self.wrong_type(field, node, "a string", accepted)),
        }
    }
}

/// The value of `key`, treating JSON `null` as absent.
fn get<'n>(entries: &'n [Entry], key: &str) -> Option<&'n Node> {
    entries
        .iter()
        .find(|e| e.key == key)
        .map(|e| &e.node)
        .filter(|n| !matches!(n.value, Value::Null))
}

/// The last key of a dotted path: `hang_timeout` of `failure.hang_timeout`.
fn last_key(field: &str) -> &str {
    field.rsplit('.').next().unwrap_or(field)
}

/// `"4"` or `"2:4"` as (the MIN of a range, the maximum); the error says what is wrong,
/// without the accepted forms.
fn parse_node_range(text: &str) -> std::result::Result<(Option<u32>, u32), String> {
    let bound = limits::NODES;
    let count = |part: &str, what: &str| -> std::result::Result<u32, String> {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("{text:?}: the {what} is missing"));
        }
        let digits = part.strip_prefix('-').unwrap_or(part);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(if what == "count" {
                format!("{text:?} is not a number of hosts or a \"MIN:MAX\" range")
            } else {
                format!("{text:?}: the {what} {part:?} is not a number of hosts")
            });
        }
        let problem = match part.parse::<i128>() {
            Ok(value) => match bound.problem(value) {
                None => return Ok(u32::try_from(value).expect("bound.max fits in u32")),
                Some(problem) => problem,
            },
            // Only digits, so too long for any integer type.
            Err(_) if part.starts_with('-') => {
                format!("must be at least {}, got {part}", bound.min)
            }
            Err(_) => format!("must be at most {}, got {part}", bound.max),
        };
        Err(if what == "count" {
            problem
        } else {
            format!("{text:?}: the {what} {problem}")
        })
    };
    if text.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    let Some((min, max)) = text.split_once(':') else {
        return count(text, "count").map(|n| (None, n));
    };
    if max.contains(':') {
        return Err(format!("{text:?} has more than one ':'"));
    }
    let min = count(min, "minimum")?;
    let max = count(max, "maximum")?;
    if min > max {
        return Err(format!(
            "{text:?}: the minimum {min} is more than the maximum {max}; write \"{max}:{min}\""
        ));
    }
    Ok((Some(min), max))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}
