//! Elastic node counts, `[failure]` hang detection, `[checkpoint]`, durations and the spec's
//! size bounds: every accepted form, and every mistake with its line, field and message.

use super::{check_one, full_spec};
use crate::limits;
use crate::SpecErrorKind::{self, *};
use crate::{CheckpointPolicy, Fabric, FailurePolicy, JobSpec, Resources};

/// The lines before `nodes`: a document whose line 5 is the first line of a case's tail.
const BEFORE_NODES: &[&str] = &[
    "name = \"a\"",
    "[launch]",
    "command = [\"x\"]",
    "[resources]",
];

/// A complete `[resources]` section: a case's tail starts at line 7.
const BEFORE_TABLES: &[&str] = &[
    "name = \"a\"",
    "[launch]",
    "command = [\"x\"]",
    "[resources]",
    "nodes = 2",
    "procs_per_node = 1",
];

/// One mistake: the lines after `head`, and what its error must say.
type TailCase = (
    &'static str,
    &'static [&'static str],
    Option<usize>,
    Option<&'static str>,
    SpecErrorKind,
    &'static [&'static str],
);

fn check_tails(head: &[&str], cases: &[TailCase]) {
    for &(what, tail, line, field, kind, words) in cases {
        let doc: Vec<&str> = head.iter().chain(tail).copied().collect();
        check_one(what, &doc, line, field, kind, words);
    }
}

fn parse_tail(head: &[&str], tail: &[&str]) -> JobSpec {
    let source = head
        .iter()
        .chain(tail)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    JobSpec::from_toml(&source, "job.toml").unwrap_or_else(|e| panic!("{tail:?}: {e}"))
}

#[test]
fn node_counts_fixed_and_elastic() {
    // (lines from `nodes` on, (min, max), min_nodes as stored)
    let cases: &[(&[&str], (u32, u32), u32)] = &[
        (&["nodes = 4"], (4, 4), 4),
        (&["nodes = \"3\""], (3, 3), 3),
        (&["nodes = \"2:4\""], (2, 4), 2),
        (&["nodes = \" 2 : 4 \""], (2, 4), 2),
        (&["nodes = \"4:4\""], (4, 4), 4),
        (&["nodes = \"1:100000\""], (1, 100_000), 1),
        (&["nodes = 4", "min_nodes = 2"], (2, 4), 2),
        (&["min_nodes = 2", "nodes = 4"], (2, 4), 2),
        (&["nodes = 4", "min_nodes = 4"], (4, 4), 4),
        (&["nodes = \"2:4\"", "min_nodes = 2"], (2, 4), 2),
        (&["nodes = 4", "min_nodes = 0"], (4, 4), 4),
        (&["nodes = \"3\"", "min_nodes = 1"], (1, 3), 1),
    ];
    for &(lines, range, min_nodes) in cases {
        let mut tail = lines.to_vec();
        tail.push("procs_per_node = 8");
        let spec = parse_tail(BEFORE_NODES, &tail);
        assert_eq!(spec.resources.node_range(), range, "{lines:?}");
        assert_eq!(spec.resources.min_nodes, min_nodes, "{lines:?}");
        assert_eq!(spec.resources.nodes, range.1, "{lines:?}");
        assert_eq!(spec.resources.is_elastic(), range.0 < range.1, "{lines:?}");
        assert_eq!(spec.world_size(), range.1 * 8, "{lines:?}");
        assert_eq!(spec.min_world_size(), range.0 * 8, "{lines:?}");
    }
}

#[test]
fn node_count_mistakes() {
    const ACCEPTED: &str = "(accepted: an integer number of hosts from 1 to 100000, e.g. nodes = 4, or a \"MIN:MAX\" range for an elastic job, e.g. nodes = \"2:4\", with 1 <= MIN <= MAX <= 100000)";
    let f = Some("resources.nodes");
    let m = Some("resources.min_nodes");
    check_tails(
        BEFORE_NODES,
        &[
            (
                "max below min",
                &["nodes = \"4:2\""],
                Some(5),
                f,
                Invalid,
                &[
                    "job.toml:5:9: resources.nodes: \"4:2\": the minimum 4 is more than the maximum 2; write \"2:4\"",
                    ACCEPTED,
                ],
            ),
            (
                "zero minimum",
                &["nodes = \"0:3\""],
                Some(5),
                f,
                Invalid,
                &["\"0:3\": the minimum must be at least 1, got 0", ACCEPTED],
            ),
            (
                "negative minimum",
                &["nodes = \"-1:3\""],
                Some(5),
                f,
                Invalid,
                &["the minimum must be at least 1, got -1"],
            ),
            (
                "maximum too large",
                &["nodes = \"1:100001\""],
                Some(5),
                f,
                Invalid,
                &["the maximum must be at most 100000, got 100001"],
            ),
            (
                "maximum beyond every integer",
                &["nodes = \"1:99999999999999999999999999999999999999999\""],
                Some(5),
                f,
                Invalid,
                &["the maximum must be at most 100000, got 99999999999999999999999999999999999999999 (accepted"],
            ),
            (
                "words",
                &["nodes = \"a:b\""],
                Some(5),
                f,
                Invalid,
                &["\"a:b\": the minimum \"a\" is not a number of hosts", ACCEPTED],
            ),
            (
                "missing maximum",
                &["nodes = \"2:\""],
                Some(5),
                f,
                Invalid,
                &["\"2:\": the maximum is missing", ACCEPTED],
            ),
            (
                "missing minimum",
                &["nodes = \":4\""],
                Some(5),
                f,
                Invalid,
                &["\":4\": the minimum is missing"],
            ),
            (
                "three parts",
                &["nodes = \"1:2:3\""],
                Some(5),
                f,
                Invalid,
                &["\"1:2:3\" has more than one ':'"],
            ),
            (
                "empty string",
                &["nodes = \"\""],
                Some(5),
                f,
                Invalid,
                &["resources.nodes: must not be empty", ACCEPTED],
            ),
            (
                "a quoted zero",
                &["nodes = \"0\""],
                Some(5),
                f,
                Invalid,
                &["resources.nodes: must be at least 1, got 0 (accepted: an integer number of hosts from 1 to 100000, e.g. nodes = 4"],
            ),
            (
                "a float",
                &["nodes = 2.5"],
                Some(5),
                f,
                WrongType,
                &["got a float 2.5", ACCEPTED],
            ),
            (
                "min_nodes disagrees with the range",
                &["nodes = \"2:4\"", "min_nodes = 3"],
                Some(6),
                m,
                Invalid,
                &[
                    "job.toml:6:13: resources.min_nodes: min_nodes = 3 disagrees with the minimum 2 in nodes = \"2:4\"; give the minimum once",
                ],
            ),
            (
                "min_nodes above nodes",
                &["nodes = 4", "min_nodes = 5"],
                Some(6),
                m,
                Invalid,
                &["must be at most nodes = 4, got 5", "(accepted: an integer number of hosts from 1 to nodes, or 0 for nodes itself)"],
            ),
            (
                "min_nodes out of every range",
                &["nodes = 4", "min_nodes = 100001"],
                Some(6),
                m,
                Invalid,
                &["must be at most 100000, got 100001"],
            ),
            (
                "min_nodes negative",
                &["nodes = 4", "min_nodes = -1"],
                Some(6),
                m,
                Invalid,
                &["must not be negative, got -1"],
            ),
            (
                "min_nodes quoted",
                &["nodes = 4", "min_nodes = \"2\""],
                Some(6),
                m,
                WrongType,
                &["remove the quotes: min_nodes = 2"],
            ),
        ],
    );
}

#[test]
fn hang_timeouts() {
    let cases: &[(&str, Option<u64>)] = &[
        ("max_restarts = 1", None),
        ("hang_timeout = \"10m\"", Some(600_000)),
        ("hang_timeout = \"1s\"", Some(1_000)),
        ("hang_timeout = \"1h30m\"", Some(5_400_000)),
        ("hang_timeout = \"7d\"", Some(limits::HANG_TIMEOUT_MS_MAX)),
        ("hang_timeout_ms = 1000", Some(1_000)),
        ("hang_timeout_ms = 604800000", Some(604_800_000)),
    ];
    for &(line, want) in cases {
        let spec = parse_tail(BEFORE_TABLES, &["[failure]", line]);
        assert_eq!(spec.failure.hang_timeout_ms, want, "{line}");
    }
}

#[test]
fn hang_timeout_mistakes() {
    let f = Some("failure.hang_timeout");
    let ms = Some("failure.hang_timeout_ms");
    const ACCEPTED: &str = "(accepted: a duration from 1s to 7d, e.g. \"500ms\", \"30s\", \"10m\", \"2h\" or \"1h30m\"; units ms, s, m, h, d)";
    check_tails(
        BEFORE_TABLES,
        &[
            (
                "too short",
                &["[failure]", "hang_timeout = \"500ms\""],
                Some(8),
                f,
                Invalid,
                &[
                    "job.toml:8:16: failure.hang_timeout: must be at least 1s, got 500ms",
                    ACCEPTED,
                ],
            ),
            (
                "too long",
                &["[failure]", "hang_timeout = \"8d\""],
                Some(8),
                f,
                Invalid,
                &["must be at most 7d, got 8d", ACCEPTED],
            ),
            (
                "no unit",
                &["[failure]", "hang_timeout = \"30\""],
                Some(8),
                f,
                Invalid,
                &["\"30\" has no unit; write \"30s\" for seconds", ACCEPTED],
            ),
            (
                "unknown unit",
                &["[failure]", "hang_timeout = \"10min\""],
                Some(8),
                f,
                Invalid,
                &["unknown unit \"min\""],
            ),
            (
                "fraction",
                &["[failure]", "hang_timeout = \"1.5h\""],
                Some(8),
                f,
                Invalid,
                &["fractions are not accepted", "\"1h30m\""],
            ),
            (
                "an integer",
                &["[failure]", "hang_timeout = 600"],
                Some(8),
                f,
                WrongType,
                &[
                    "must be a duration string, got an integer 600; write hang_timeout = \"600s\" for seconds, or hang_timeout_ms = 600 for milliseconds",
                    ACCEPTED,
                ],
            ),
            (
                "a boolean",
                &["[failure]", "hang_timeout = false"],
                Some(8),
                f,
                WrongType,
                &["must be a duration string, got a boolean false"],
            ),
            (
                "both keys",
                &["[failure]", "hang_timeout = \"10m\"", "hang_timeout_ms = 600000"],
                Some(9),
                ms,
                Invalid,
                &["hang_timeout is set too; give either hang_timeout", "not both"],
            ),
            (
                "milliseconds too few",
                &["[failure]", "hang_timeout_ms = 500"],
                Some(8),
                ms,
                Invalid,
                &["must be at least 1000, got 500 (accepted: an integer number of milliseconds from 1000 to 604800000)"],
            ),
            (
                "milliseconds as a string",
                &["[failure]", "hang_timeout_ms = \"10m\""],
                Some(8),
                ms,
                WrongType,
                &["must be an integer number of milliseconds, got a string \"10m\""],
            ),
            (
                "torchelastic name",
                &["[failure]", "timeout = \"10m\""],
                Some(8),
                Some("failure.timeout"),
                UnknownField,
                &["did you mean `hang_timeout`?", "(accepted: max_restarts, hang_timeout, hang_timeout_ms)"],
            ),
        ],
    );
}

#[test]
fn checkpoint_policies() {
    let default = CheckpointPolicy {
        dir: "/ckpt/{job}".into(),
        signal: None,
        grace_ms: limits::GRACE_MS_DEFAULT,
        keep: None,
    };
    let cases: &[(&[&str], CheckpointPolicy)] = &[
        (&["dir = \"/ckpt/{job}\""], default.clone()),
        (
            &["dir = \"ckpt/{name}-{job}\"", "keep = 1"],
            CheckpointPolicy {
                dir: "ckpt/{name}-{job}".into(),
                keep: Some(1),
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "signal = \"SIGUSR1\""],
            CheckpointPolicy {
                signal: Some("SIGUSR1".into()),
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "signal = \"usr2\""],
            CheckpointPolicy {
                signal: Some("SIGUSR2".into()),
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "signal = \"SigTerm\""],
            CheckpointPolicy {
                signal: Some("SIGTERM".into()),
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "grace = \"0s\""],
            CheckpointPolicy {
                grace_ms: 0,
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "grace = \"1h\""],
            CheckpointPolicy {
                grace_ms: 3_600_000,
                ..default.clone()
            },
        ),
        (
            &["dir = \"/ckpt/{job}\"", "grace_ms = 20000", "keep = 10000"],
            CheckpointPolicy {
                grace_ms: 20_000,
                keep: Some(10_000),
                ..default.clone()
            },
        ),
    ];
    for (lines, want) in cases {
        let mut tail = vec!["[checkpoint]"];
        tail.extend_from_slice(lines);
        let spec = parse_tail(BEFORE_TABLES, &tail);
        assert_eq!(spec.checkpoint.as_ref(), Some(want), "{lines:?}");
    }
    // An inline table before the first header.
    let spec = parse_tail(
        &[
            "name = \"a\"",
            "checkpoint = { dir = \"/c\", signal = \"hup\" }",
        ],
        &BEFORE_TABLES[1..],
    );
    let checkpoint = spec.checkpoint.unwrap();
    assert_eq!(checkpoint.signal_number(), Some(1));
    assert_eq!(checkpoint.expand_dir(3, "a"), "/c");
}

#[test]
fn checkpoint_mistakes() {
    let dir = Some("checkpoint.dir");
    let signal = Some("checkpoint.signal");
    const SIGNALS: &str = "(accepted: SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGCONT, SIGURG, SIGWINCH; case-insensitive, with or without SIG";
    check_tails(
        BEFORE_TABLES,
        &[
            (
                "no dir",
                &["", "[checkpoint]", "keep = 2"],
                Some(8),
                dir,
                Missing,
                &["missing required field `dir` in the [checkpoint] table; add dir = \"/shared/ckpt/{job}\""],
            ),
            (
                "empty dir",
                &["[checkpoint]", "dir = \"\""],
                Some(8),
                dir,
                Invalid,
                &["job.toml:8:7: checkpoint.dir: must not be empty (accepted: a directory on storage every host shares"],
            ),
            (
                "unknown placeholder",
                &["[checkpoint]", "dir = \"/ckpt/{job_id}\""],
                Some(8),
                dir,
                Invalid,
                &[
                    "unknown placeholder \"{job_id}\"; the placeholders are {job} and {name}",
                    "{job} (the job id) and {name} (the job name)",
                ],
            ),
            (
                "unclosed brace",
                &["[checkpoint]", "dir = \"/ckpt/{job\""],
                Some(8),
                dir,
                Invalid,
                &["a '{' that starts no placeholder"],
            ),
            (
                "NUL in dir",
                &["[checkpoint]", "dir = \"/ckpt\\u0000\""],
                Some(8),
                dir,
                Invalid,
                &["NUL"],
            ),
            (
                "dir not a string",
                &["[checkpoint]", "dir = 3"],
                Some(8),
                dir,
                WrongType,
                &["must be a string, got an integer 3"],
            ),
            (
                "SIGKILL",
                &["[checkpoint]", "dir = \"/c\"", "signal = \"SIGKILL\""],
                Some(9),
                signal,
                Invalid,
                &["job.toml:9:10: checkpoint.signal: SIGKILL cannot be caught", SIGNALS],
            ),
            (
                "stop",
                &["[checkpoint]", "dir = \"/c\"", "signal = \"stop\""],
                Some(9),
                signal,
                Invalid,
                &["SIGSTOP cannot be caught", SIGNALS],
            ),
            (
                "unknown signal",
                &["[checkpoint]", "dir = \"/c\"", "signal = \"SIGFOO\""],
                Some(9),
                signal,
                Invalid,
                &["\"SIGFOO\" is not a signal trainctl sends as a checkpoint request", SIGNALS],
            ),
            (
                "a number in a string",
                &["[checkpoint]", "dir = \"/c\"", "signal = \"10\""],
                Some(9),
                signal,
                Invalid,
                &["write the signal's name, not its number \"10\""],
            ),
            (
                "a number",
                &["[checkpoint]", "dir = \"/c\"", "signal = 10"],
                Some(9),
                signal,
                WrongType,
                &["must be a string, got an integer 10", SIGNALS],
            ),
            (
                "empty signal",
                &["[checkpoint]", "dir = \"/c\"", "signal = \"\""],
                Some(9),
                signal,
                Invalid,
                &["must not be empty", "leave signal out to send none"],
            ),
            (
                "grace too long",
                &["[checkpoint]", "dir = \"/c\"", "grace = \"2h\""],
                Some(9),
                Some("checkpoint.grace"),
                Invalid,
                &["must be at most 1h, got 2h (accepted: a duration from 0s to 1h"],
            ),
            (
                "grace without unit",
                &["[checkpoint]", "dir = \"/c\"", "grace = \"20\""],
                Some(9),
                Some("checkpoint.grace"),
                Invalid,
                &["\"20\" has no unit"],
            ),
            (
                "grace twice",
                &["[checkpoint]", "dir = \"/c\"", "grace_ms = 1000", "grace = \"1s\""],
                Some(9),
                Some("checkpoint.grace_ms"),
                Invalid,
                &["grace is set too; give either grace (a duration string", "or grace_ms (an integer number of milliseconds), not both"],
            ),
            (
                "grace_ms too long",
                &["[checkpoint]", "dir = \"/c\"", "grace_ms = 3600001"],
                Some(9),
                Some("checkpoint.grace_ms"),
                Invalid,
                &["must be at most 3600000"],
            ),
            (
                "keep zero",
                &["[checkpoint]", "dir = \"/c\"", "keep = 0"],
                Some(9),
                Some("checkpoint.keep"),
                Invalid,
                &["must be at least 1, got 0 (accepted: an integer number of checkpoints from 1 to 10000)"],
            ),
            (
                "keep negative",
                &["[checkpoint]", "dir = \"/c\"", "keep = -3"],
                Some(9),
                Some("checkpoint.keep"),
                Invalid,
                &["must be at least 1, got -3"],
            ),
            (
                "TensorFlow's name for keep",
                &["[checkpoint]", "dir = \"/c\"", "max_to_keep = 3"],
                Some(9),
                Some("checkpoint.max_to_keep"),
                UnknownField,
                &["did you mean `keep`? (accepted: dir, signal, grace, grace_ms, keep)"],
            ),
            (
                "typo",
                &["[checkpoint]", "dri = \"/c\""],
                Some(8),
                Some("checkpoint.dri"),
                UnknownField,
                &["did you mean `dir`?"],
            ),
            (
                "array of tables",
                &["[[checkpoint]]", "dir = \"/c\""],
                Some(7),
                Some("checkpoint"),
                WrongType,
                &["not [[checkpoint]]"],
            ),
            (
                "misspelled table",
                &["[checkpoints]", "dir = \"/c\""],
                Some(7),
                Some("checkpoints"),
                UnknownField,
                &["did you mean `checkpoint`?"],
            ),
        ],
    );
}

/// A spec using every new field.
fn elastic_spec() -> JobSpec {
    let mut spec = full_spec();
    spec.resources.nodes = 4;
    spec.resources.min_nodes = 2;
    spec.failure = FailurePolicy {
        max_restarts: 3,
        hang_timeout_ms: Some(30_000),
    };
    spec.checkpoint = Some(CheckpointPolicy {
        dir: "/tmp/ckpt/{name}/{job}".into(),
        signal: Some("SIGUSR1".into()),
        grace_ms: 20_000,
        keep: Some(3),
    });
    spec
}

#[test]
fn new_fields_round_trip_through_json() {
    let spec = elastic_spec();
    for json in [
        serde_json::to_string(&spec).unwrap(),
        serde_json::to_string_pretty(&spec).unwrap(),
    ] {
        assert!(json.contains("\"min_nodes\""), "{json}");
        assert!(json.contains("\"hang_timeout_ms\""), "{json}");
        assert!(json.contains("\"grace_ms\""), "{json}");
        assert_eq!(JobSpec::from_json(&json, "stored"), Ok(spec.clone()));
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
    }

    // The same spec written in TOML parses to it.
    let toml = r#"name = "ddp-gloo"
[launch]
command = ["python3", "-u", "train.py", "--epochs", "2"]
workdir = "."
env = { NCCL_DEBUG = "WARN" }
[resources]
nodes = "2:4"
procs_per_node = 2
cpus_per_node = 4
[failure]
max_restarts = 3
hang_timeout = "30s"
[checkpoint]
dir = "/tmp/ckpt/{name}/{job}"
signal = "usr1"
grace = "20s"
keep = 3
"#;
    assert_eq!(JobSpec::from_toml(toml, "job.toml"), Ok(spec.clone()));

    // Optional new fields left empty round-trip as null.
    let mut spec = spec;
    spec.failure.hang_timeout_ms = None;
    if let Some(c) = spec.checkpoint.as_mut() {
        c.signal = None;
        c.keep = None;
    }
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(JobSpec::from_json(&json, "stored"), Ok(spec.clone()));
    spec.checkpoint = None;
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.contains("\"checkpoint\":null"), "{json}");
    assert_eq!(JobSpec::from_json(&json, "stored"), Ok(spec));
}

#[test]
fn json_accepts_duration_strings_and_ranges() {
    let json = r#"{"name": "a", "launch": {"command": ["x"]},
        "resources": {"nodes": "2:4", "procs_per_node": 1},
        "failure": {"hang_timeout": "10m"},
        "checkpoint": {"dir": "/c", "grace": "1m", "signal": "term"}}"#;
    let spec = JobSpec::from_json(json, "request body").unwrap();
    assert_eq!(spec.resources.node_range(), (2, 4));
    assert_eq!(spec.failure.hang_timeout_ms, Some(600_000));
    let checkpoint = spec.checkpoint.unwrap();
    assert_eq!(checkpoint.grace_ms, 60_000);
    assert_eq!(checkpoint.signal.as_deref(), Some("SIGTERM"));
    assert_eq!(checkpoint.signal_number(), Some(15));
}

#[test]
fn json_mistakes_in_new_fields() {
    let cases: &[(&str, &str, SpecErrorKind, &str)] = &[
        (
            r#""resources": {"nodes": "4:2", "procs_per_node": 1}"#,
            "resources.nodes",
            Invalid,
            "the minimum 4 is more than the maximum 2",
        ),
        (
            r#""resources": {"nodes": 4, "min_nodes": 5, "procs_per_node": 1}"#,
            "resources.min_nodes",
            Invalid,
            "must be at most nodes = 4, got 5",
        ),
        (
            r#""resources": {"nodes": "2:4", "min_nodes": 3, "procs_per_node": 1}"#,
            "resources.min_nodes",
            Invalid,
            "disagrees with the minimum 2",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "failure": {"hang_timeout": "1m", "hang_timeout_ms": 60000}"#,
            "failure.hang_timeout_ms",
            Invalid,
            "not both",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "failure": {"hang_timeout_ms": 0}"#,
            "failure.hang_timeout_ms",
            Invalid,
            "must be at least 1000, got 0",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": {}"#,
            "checkpoint.dir",
            Missing,
            "missing required field `dir` in the [checkpoint] table",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": {"dir": "/c", "signal": "KILL"}"#,
            "checkpoint.signal",
            Invalid,
            "SIGKILL cannot be caught",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": {"dir": "/c/{id}"}"#,
            "checkpoint.dir",
            Invalid,
            "unknown placeholder \"{id}\"",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": {"dir": "/c", "keep": 0}"#,
            "checkpoint.keep",
            Invalid,
            "must be at least 1, got 0",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": {"dir": "/c", "grace_ms": -1}"#,
            "checkpoint.grace_ms",
            Invalid,
            "must not be negative, got -1",
        ),
        (
            r#""resources": {"nodes": 1, "procs_per_node": 1}, "checkpoint": "/c""#,
            "checkpoint",
            WrongType,
            "must be a table, got a string \"/c\"",
        ),
    ];
    for &(rest, field, kind, words) in cases {
        let json = format!(r#"{{"name": "a", "launch": {{"command": ["x"]}}, {rest}}}"#);
        let e = JobSpec::from_json(&json, "request body").expect_err(&json);
        let shown = e.to_string();
        println!("{shown}");
        assert_eq!(e.line, None, "{shown}");
        assert_eq!(e.field.as_deref(), Some(field), "{shown}");
        assert_eq!(e.kind, kind, "{shown}");
        assert!(shown.contains(words), "{shown:?} lacks {words:?}");
    }
}

#[test]
fn specs_stored_before_the_new_fields_still_read() {
    // The canonical form as stored before min_nodes, hang_timeout_ms and checkpoint.
    let old = r#"{"name":"ddp","launch":{"command":["trainctl","example-train"],"workdir":"/jobs","env":{}},
        "resources":{"nodes":3,"procs_per_node":2,"gpus_per_node":0,"cpus_per_node":2,"memory_per_node_mib":0},
        "failure":{"max_restarts":1}}"#;
    let spec: JobSpec = serde_json::from_str(old).unwrap();
    assert_eq!(spec.resources.min_nodes, 0);
    assert_eq!(spec.resources.node_range(), (3, 3));
    assert!(!spec.resources.is_elastic());
    assert_eq!((spec.min_world_size(), spec.world_size()), (6, 6));
    assert_eq!(spec.failure.hang_timeout_ms, None);
    assert_eq!(spec.checkpoint, None);
    assert_eq!(spec.validate(), Ok(()));

    // The parser reads it too, filling in min_nodes.
    let parsed = JobSpec::from_json(old, "stored").unwrap();
    assert_eq!(parsed.resources.min_nodes, 3);
    assert_eq!(parsed.resources.node_range(), (3, 3));

    // A spec built in code with min_nodes = 0 reads back with the same range.
    let json = serde_json::to_string(&spec).unwrap();
    let back = JobSpec::from_json(&json, "stored").unwrap();
    assert_eq!(back.resources.node_range(), spec.resources.node_range());
}

#[test]
fn validate_checks_new_fields_built_in_code() {
    assert_eq!(elastic_spec().validate(), Ok(()));
    type Change = fn(&mut JobSpec);
    let cases: &[(Change, &str, &str)] = &[
        (
            |s| s.resources.min_nodes = 5,
            "resources.min_nodes",
            "must be at most nodes = 4, got 5",
        ),
        (
            |s| s.failure.hang_timeout_ms = Some(999),
            "failure.hang_timeout_ms",
            "must be at least 1000, got 999",
        ),
        (
            |s| s.failure.hang_timeout_ms = Some(limits::HANG_TIMEOUT_MS_MAX + 1),
            "failure.hang_timeout_ms",
            "must be at most 604800000",
        ),
        (
            |s| s.checkpoint.as_mut().unwrap().dir.clear(),
            "checkpoint.dir",
            "must not be empty",
        ),
        (
            |s| s.checkpoint.as_mut().unwrap().signal = Some("usr1".into()),
            "checkpoint.signal",
            "\"usr1\" is not in the canonical form; write \"SIGUSR1\"",
        ),
        (
            |s| s.checkpoint.as_mut().unwrap().signal = Some("SIGSTOP".into()),
            "checkpoint.signal",
            "SIGSTOP cannot be caught",
        ),
        (
            |s| s.checkpoint.as_mut().unwrap().grace_ms = limits::GRACE_MS_MAX + 1,
            "checkpoint.grace_ms",
            "must be at most 3600000",
        ),
        (
            |s| s.checkpoint.as_mut().unwrap().keep = Some(0),
            "checkpoint.keep",
            "must be at least 1, got 0",
        ),
    ];
    for (i, &(change, field, words)) in cases.iter().enumerate() {
        let mut spec = elastic_spec();
        change(&mut spec);
        let e = spec.validate().expect_err(field);
        let shown = e.to_string();
        assert_eq!(e.origin, "job spec", "case {i}: {shown}");
        assert_eq!(e.field.as_deref(), Some(field), "case {i}: {shown}");
        assert!(shown.contains(words), "case {i}: {shown:?} lacks {words:?}");
    }
    let mut fixed = elastic_spec();
    fixed.resources.min_nodes = 0;
    assert_eq!(fixed.validate(), Ok(()));
    assert_eq!(fixed.resources.node_range(), (4, 4));
}

#[test]
fn resources_helpers() {
    let r = |nodes, min_nodes| Resources {
        nodes,
        min_nodes,
        procs_per_node: 1,
        gpus_per_node: 0,
        cpus_per_node: 1,
        memory_per_node_mib: 0,
        fabric: Fabric::Any,
    };
    assert_eq!(r(4, 0).node_range(), (4, 4));
    assert_eq!(r(4, 4).node_range(), (4, 4));
    assert_eq!(r(4, 1).node_range(), (1, 4));
    assert!(r(4, 1).is_elastic());
    assert!(!r(4, 0).is_elastic());
    assert!(!r(4, 4).is_elastic());
}

#[test]
fn spec_size_is_bounded() {
    // Too many arguments, located at the command.
    let args = vec!["\"a\""; limits::ARGV_LEN_MAX + 1].join(", ");
    let source = format!(
        "name = \"a\"\n[launch]\ncommand = [{args}]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
    );
    let e = JobSpec::from_toml(&source, "job.toml").unwrap_err();
    let shown = e.to_string();
    assert_eq!(e.line, Some(3), "{shown}");
    assert_eq!(e.field.as_deref(), Some("launch.command"), "{shown}");
    assert!(
        shown.contains("has 4097 arguments, more than 4096 (accepted: at most 4096 arguments"),
        "{shown}"
    );
    // Exactly the limit is fine.
    let args = vec!["\"a\""; limits::ARGV_LEN_MAX].join(", ");
    let source = format!(
        "name = \"a\"\n[launch]\ncommand = [{args}]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
    );
    JobSpec::from_toml(&source, "job.toml").unwrap();

    // Too many bytes, blamed on the largest part: here the environment.
    let big = "x".repeat(limits::SPEC_BYTES_MAX / 2);
    let source = format!(
        "name = \"a\"\n[launch]\ncommand = [\"x\"]\n[launch.env]\nA = \"{big}\"\nB = \"{big}\"\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
    );
    let e = JobSpec::from_toml(&source, "job.toml").unwrap_err();
    let shown = e.to_string();
    assert_eq!(e.line, Some(4), "{}", &shown[..200]);
    assert_eq!(e.field.as_deref(), Some("launch.env"));
    assert_eq!(e.kind, Invalid);
    assert!(
        shown.contains("the spec's strings total 1048580 bytes, more than 1048576 (1 MiB), and launch.env holds 1048578 of them"),
        "{shown}"
    );

    // In code, the same rule.
    let mut spec = full_spec();
    spec.launch.command.push("y".repeat(limits::SPEC_BYTES_MAX));
    let e = spec.validate().unwrap_err();
    assert_eq!(e.field.as_deref(), Some("launch.command"));
    assert!(e.message.contains("more than 1048576"), "{e}");

    // A document too long to parse at all.
    let padding = "#".repeat(limits::SPEC_SOURCE_BYTES_MAX + 1);
    for result in [
        JobSpec::from_toml(&padding, "job.toml"),
        JobSpec::from_json(&padding, "request body"),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.field, None);
        assert_eq!(e.kind, Invalid);
        assert!(
            e.message
                .starts_with("the spec is 4194305 bytes long, more than 4194304 (accepted:"),
            "{e}"
        );
    }
}
