//! Table-driven tests of parsing and validation: every user mistake gets a message with the
//! line, the field and the words that say what is accepted.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Fabric, FailurePolicy, JobSpec, Launch, Resources, SpecError, SpecErrorKind};

/// One mistake: a TOML document (one string per line) and what its error must say.
struct Case {
    what: &'static str,
    doc: &'static [&'static str],
    line: Option<usize>,
    field: Option<&'static str>,
    kind: SpecErrorKind,
    words: &'static [&'static str],
}

fn toml_error(doc: &[&str]) -> SpecError {
    let source = doc.join("\n");
    match JobSpec::from_toml(&source, "job.toml") {
        Ok(spec) => panic!("expected an error, parsed {spec:?}"),
        Err(e) => e,
    }
}

fn check(cases: &[Case]) {
    for case in cases {
        check_one(
            case.what, case.doc, case.line, case.field, case.kind, case.words,
        );
    }
}

/// Parses `doc` (one string per line) as `job.toml` and checks its error.
fn check_one(
    what: &str,
    doc: &[&str],
    line: Option<usize>,
    field: Option<&str>,
    kind: SpecErrorKind,
    words: &[&str],
) {
    let e = toml_error(doc);
    let shown = e.to_string();
    println!("{what}: {shown}");
    assert_eq!(e.origin, "job.toml", "{what}: {shown}");
    assert_eq!(e.line, line, "{what}: line of {shown}");
    assert_eq!(e.line.is_some(), e.column.is_some(), "{what}: {shown}");
    assert_eq!(e.field.as_deref(), field, "{what}: field of {shown}");
    assert_eq!(e.kind, kind, "{what}: kind of {shown}");
    for word in words {
        assert!(shown.contains(word), "{what}: {shown:?} lacks {word:?}");
    }
}

use SpecErrorKind::*;

#[test]
fn syntax_errors_have_line_and_column() {
    check(&[
        Case {
            what: "unclosed array",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"python3\", \"train.py\"",
                "[resources]",
            ],
            line: Some(4),
            field: None,
            kind: Syntax,
            words: &["invalid TOML"],
        },
        Case {
            what: "missing value",
            doc: &["name = \"a\"", "[launch]", "command ="],
            line: Some(3),
            field: None,
            kind: Syntax,
            words: &["invalid TOML"],
        },
        Case {
            what: "duplicate key",
            doc: &["name = \"a\"", "name = \"b\""],
            line: Some(2),
            field: None,
            kind: Syntax,
            words: &["invalid TOML: duplicate key `name`"],
        },
        Case {
            what: "bare string",
            doc: &["name = ddp"],
            line: Some(1),
            field: None,
            kind: Syntax,
            words: &["invalid TOML"],
        },
    ]);
    let e = toml_error(&["", "name = \"a\"", "[launch]", "command = [1,,]"]);
    assert_eq!((e.line, e.column), (Some(4), Some(14)), "{e}");
}

#[test]
fn unknown_keys_at_every_level() {
    check(&[
        Case {
            what: "typo in launch",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "comand = [\"x\"]",
            ],
            line: Some(4),
            field: Some("launch.comand"),
            kind: UnknownField,
            words: &["job.toml:4:1: launch.comand: unknown field; did you mean `command`? (accepted: command, workdir, env)"],
        },
        Case {
            what: "typo at top level",
            doc: &["nmae = \"a\""],
            line: Some(1),
            field: Some("nmae"),
            kind: UnknownField,
            words: &["did you mean `name`?", "accepted: name, launch, resources, failure, checkpoint"],
        },
        Case {
            what: "typo in a table name",
            doc: &["name = \"a\"", "[resource]", "nodes = 1"],
            line: Some(2),
            field: Some("resource"),
            kind: UnknownField,
            words: &["did you mean `resources`?"],
        },
        Case {
            what: "typo in resources",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "  procs_per_nod = 2",
            ],
            line: Some(6),
            field: Some("resources.procs_per_nod"),
            kind: UnknownField,
            words: &[
                ":6:3:",
                "did you mean `procs_per_node`?",
                "accepted: nodes, min_nodes, procs_per_node, gpus_per_node, cpus_per_node, memory_per_node_mib",
            ],
        },
        Case {
            what: "torchrun name",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nnodes = 1",
            ],
            line: Some(5),
            field: Some("resources.nnodes"),
            kind: UnknownField,
            words: &["did you mean `nodes`?"],
        },
        Case {
            what: "typo in failure",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "[failure]",
                "max_restart = 1",
            ],
            line: Some(8),
            field: Some("failure.max_restart"),
            kind: UnknownField,
            words: &[
                "did you mean `max_restarts`?",
                "(accepted: max_restarts, hang_timeout, hang_timeout_ms)",
            ],
        },
        Case {
            what: "top-level key written after a table header",
            doc: &["[launch]", "command = [\"x\"]", "name = \"a\""],
            line: Some(3),
            field: Some("launch.name"),
            kind: UnknownField,
            words: &["the top-level `name`", "before the first [table] header"],
        },
        Case {
            what: "key in the wrong table",
            doc: &["name = \"a\"", "nodes = 2"],
            line: Some(2),
            field: Some("nodes"),
            kind: UnknownField,
            words: &["did you mean `nodes` in the [resources] table?"],
        },
        Case {
            what: "nothing close",
            doc: &["name = \"a\"", "[launch]", "image = \"ubuntu\""],
            line: Some(3),
            field: Some("launch.image"),
            kind: UnknownField,
            words: &["unknown field (accepted: command, workdir, env)"],
        },
        Case {
            what: "dotted key",
            doc: &["name = \"a\"", "launch.commands = [\"x\"]"],
            line: Some(2),
            field: Some("launch.commands"),
            kind: UnknownField,
            words: &["did you mean `command`?"],
        },
    ]);
}

#[test]
fn wrong_types() {
    check(&[
        Case {
            what: "nodes as a word",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = \"two\"",
            ],
            line: Some(5),
            field: Some("resources.nodes"),
            kind: Invalid,
            words: &[
                ":5:9:",
                "\"two\" is not a number of hosts or a \"MIN:MAX\" range",
                "e.g. nodes = \"2:4\"",
            ],
        },
        Case {
            what: "nodes as a boolean",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = true",
            ],
            line: Some(5),
            field: Some("resources.nodes"),
            kind: WrongType,
            words: &[
                "must be an integer number of hosts or a \"MIN:MAX\" string, got a boolean true",
            ],
        },
        Case {
            what: "command as a shell string",
            doc: &["name = \"a\"", "[launch]", "command = \"python train.py\""],
            line: Some(3),
            field: Some("launch.command"),
            kind: WrongType,
            words: &[
                "must be an array of strings",
                "argv, not a shell string",
                "[\"python\", \"train.py\"]",
            ],
        },
        Case {
            what: "number in argv",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [",
                "  \"train\",",
                "  2,",
                "]",
            ],
            line: Some(5),
            field: Some("launch.command[1]"),
            kind: WrongType,
            words: &["must be a string, got an integer 2", "quote"],
        },
        Case {
            what: "float procs",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 2.5",
            ],
            line: Some(6),
            field: Some("resources.procs_per_node"),
            kind: WrongType,
            words: &["must be an integer number of ranks per host, got a float 2.5"],
        },
        Case {
            what: "quoted number",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = \"4\"",
            ],
            line: Some(6),
            field: Some("resources.procs_per_node"),
            kind: WrongType,
            words: &["got a string \"4\"; remove the quotes: procs_per_node = 4 (accepted"],
        },
        Case {
            what: "env value not a string",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "env = { OMP_NUM_THREADS = 4 }",
            ],
            line: Some(4),
            field: Some("launch.env.OMP_NUM_THREADS"),
            kind: WrongType,
            words: &["must be a string", "OMP_NUM_THREADS = \"4\""],
        },
        Case {
            what: "name not a string",
            doc: &["name = 7"],
            line: Some(1),
            field: Some("name"),
            kind: WrongType,
            words: &["must be a string, got an integer 7"],
        },
        Case {
            what: "array of tables",
            doc: &["name = \"a\"", "[[launch]]", "command = [\"x\"]"],
            line: Some(2),
            field: Some("launch"),
            kind: WrongType,
            words: &["must be a table", "not [[launch]]"],
        },
        Case {
            what: "workdir not a string",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "workdir = true",
            ],
            line: Some(4),
            field: Some("launch.workdir"),
            kind: WrongType,
            words: &["must be a string, got a boolean true"],
        },
    ]);
}

#[test]
fn missing_required_fields_name_their_table() {
    check(&[
        Case {
            what: "no name",
            doc: &["[launch]", "command = [\"x\"]"],
            line: None,
            field: Some("name"),
            kind: Missing,
            words: &["missing required field", "top level"],
        },
        Case {
            what: "no command",
            doc: &["name = \"a\"", "", "[launch]", "workdir = \".\""],
            line: Some(3),
            field: Some("launch.command"),
            kind: Missing,
            words: &["missing required field `command` in the [launch] table"],
        },
        Case {
            what: "no launch table",
            doc: &["name = \"a\"", "[resources]", "nodes = 1"],
            line: None,
            field: Some("launch.command"),
            kind: Missing,
            words: &["add a [launch] table"],
        },
        Case {
            what: "no nodes",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "procs_per_node = 1",
            ],
            line: Some(4),
            field: Some("resources.nodes"),
            kind: Missing,
            words: &["missing required field `nodes` in the [resources] table"],
        },
        Case {
            what: "no procs_per_node",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
            ],
            line: Some(4),
            field: Some("resources.procs_per_node"),
            kind: Missing,
            words: &["`procs_per_node` in the [resources] table"],
        },
        Case {
            what: "no resources table",
            doc: &["name = \"a\"", "[launch]", "command = [\"x\"]"],
            line: None,
            field: Some("resources.nodes"),
            kind: Missing,
            words: &["add a [resources] table"],
        },
    ]);
}

#[test]
fn sizes_out_of_range() {
    check(&[
        Case {
            what: "zero nodes",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "",
                "[resources]",
                "",
                "nodes = 0",
                "procs_per_node = 1",
            ],
            line: Some(7),
            field: Some("resources.nodes"),
            kind: Invalid,
            words: &["job.toml:7:9: resources.nodes: must be at least 1, got 0 (accepted: an integer number of hosts from 1 to 100000)"],
        },
        Case {
            what: "negative procs",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = -2",
            ],
            line: Some(6),
            field: Some("resources.procs_per_node"),
            kind: Invalid,
            words: &["must be at least 1, got -2"],
        },
        Case {
            what: "negative gpus",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "gpus_per_node = -1",
            ],
            line: Some(7),
            field: Some("resources.gpus_per_node"),
            kind: Invalid,
            words: &["must not be negative, got -1"],
        },
        Case {
            what: "negative memory",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "memory_per_node_mib = -1",
            ],
            line: Some(7),
            field: Some("resources.memory_per_node_mib"),
            kind: Invalid,
            words: &["must not be negative"],
        },
        Case {
            what: "negative restarts",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "[failure]",
                "max_restarts = -1",
            ],
            line: Some(8),
            field: Some("failure.max_restarts"),
            kind: Invalid,
            words: &["must not be negative"],
        },
        Case {
            what: "zero cpus",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "cpus_per_node = 0",
            ],
            line: Some(7),
            field: Some("resources.cpus_per_node"),
            kind: Invalid,
            words: &["must be at least 1, got 0"],
        },
        Case {
            what: "too many nodes",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 100_001",
                "procs_per_node = 1",
            ],
            line: Some(5),
            field: Some("resources.nodes"),
            kind: Invalid,
            words: &["must be at most 100000, got 100001"],
        },
        Case {
            what: "too many procs",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1025",
            ],
            line: Some(6),
            field: Some("resources.procs_per_node"),
            kind: Invalid,
            words: &["must be at most 1024"],
        },
        Case {
            what: "too many gpus",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 1",
                "gpus_per_node = 0x10000",
            ],
            line: Some(7),
            field: Some("resources.gpus_per_node"),
            kind: Invalid,
            words: &["must be at most 1024, got 65536"],
        },
        Case {
            what: "beyond every integer type",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 99999999999999999999",
            ],
            line: Some(5),
            field: Some("resources.nodes"),
            kind: Invalid,
            words: &["must be at most 100000"],
        },
        Case {
            what: "fewer gpus than ranks",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "[resources]",
                "nodes = 1",
                "procs_per_node = 4",
                "gpus_per_node = 2",
            ],
            line: Some(7),
            field: Some("resources.gpus_per_node"),
            kind: Invalid,
            words: &[
                "2 GPUs per host cannot give each of the 4 ranks per host its own GPU",
                "0 for a CPU-only job, or at least procs_per_node = 4",
            ],
        },
    ]);
}

/// A `[resources]` table to end documents with, so the error under test is the only one.
const R1: &str = "[resources]";
const R2: &str = "nodes = 1\nprocs_per_node = 1";

#[test]
fn command_rules() {
    check(&[
        Case {
            what: "empty command",
            doc: &["name = \"a\"", "[launch]", "command = []", R1, R2],
            line: Some(3),
            field: Some("launch.command"),
            kind: Invalid,
            words: &["must not be empty", "the program and its arguments"],
        },
        Case {
            what: "empty argv[0]",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"\", \"train.py\"]",
                R1,
                R2,
            ],
            line: Some(3),
            field: Some("launch.command[0]"),
            kind: Invalid,
            words: &["the program must not be empty"],
        },
        Case {
            what: "command line in one argument",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"python train.py\"]",
                R1,
                R2,
            ],
            line: Some(3),
            field: Some("launch.command[0]"),
            kind: Invalid,
            words: &[
                "looks like a shell command line",
                "[\"python\", \"train.py\"]",
            ],
        },
        Case {
            what: "NUL in an argument",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\",",
                "  \"a\\u0000b\"]",
                R1,
                R2,
            ],
            line: Some(4),
            field: Some("launch.command[1]"),
            kind: Invalid,
            words: &["NUL"],
        },
        Case {
            what: "empty workdir",
            doc: &[
                "name = \"a\"",
                "[launch]",
                "command = [\"x\"]",
                "workdir = \"\"",
                R1,
                R2,
            ],
            line: Some(4),
            field: Some("launch.workdir"),
            kind: Invalid,
            words: &["must not be empty"],
        },
    ]);
}

#[test]
fn name_rules() {
    let cases: &[(&str, &[&str])] = &[
        ("", &["must not be empty"]),
        (
            "DDP",
            &["contains 'D' at character 1", "lowercase, e.g. \"ddp\""],
        ),
        ("-ddp", &["must start with a letter or digit, not '-'"]),
        (".x", &["must start with a letter or digit"]),
        ("ddp gloo", &["contains ' ' at character 4"]),
        ("ddp/gloo", &["contains '/'"]),
        ("é", &["contains 'é'"]),
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            &["64 characters long, more than 63"],
        ),
    ];
    for (name, words) in cases {
        let source = format!(
            "\n\nname = {name:?}\n[launch]\ncommand = [\"x\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        );
        let e = JobSpec::from_toml(&source, "job.toml").expect_err(name);
        let shown = e.to_string();
        assert_eq!(e.line, Some(3), "{shown}");
        assert_eq!(e.field.as_deref(), Some("name"), "{shown}");
        assert!(shown.contains("(accepted: 1 to 63 characters"), "{shown}");
        for word in *words {
            assert!(shown.contains(word), "{shown:?} lacks {word:?}");
        }
    }
    for name in ["a", "0", "ddp-gloo", "ddp_gloo.v2", &"a".repeat(63)] {
        let source = format!(
            "name = {name:?}\n[launch]\ncommand = [\"x\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        );
        JobSpec::from_toml(&source, "job.toml").unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn env_rules() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "\"1BAD\" = \"x\"",
            "launch.env.1BAD",
            &["not a valid environment variable name", "a letter or '_'"],
        ),
        (
            "\"A-B\" = \"x\"",
            "launch.env.A-B",
            &["not a valid environment variable name"],
        ),
        (
            "\"\" = \"x\"",
            "launch.env.",
            &["not a valid environment variable name"],
        ),
        (
            "RANK = \"3\"",
            "launch.env.RANK",
            &[
                "`RANK` is set by trainctl",
                "reserved: RANK, LOCAL_RANK",
                "TORCHELASTIC_ERROR_FILE",
                "every name starting with TRAINCTL_",
            ],
        ),
        (
            "MASTER_PORT = \"29500\"",
            "launch.env.MASTER_PORT",
            &["`MASTER_PORT` is set by trainctl"],
        ),
        (
            "CUDA_VISIBLE_DEVICES = \"0\"",
            "launch.env.CUDA_VISIBLE_DEVICES",
            &["gpus_per_node"],
        ),
        (
            "TRAINCTL_JOB = \"x\"",
            "launch.env.TRAINCTL_JOB",
            &["`TRAINCTL_JOB` is set by trainctl"],
        ),
        ("BAD = \"a\\u0000\"", "launch.env.BAD", &["NUL"]),
    ];
    for (entry, field, words) in cases {
        let source = format!(
            "name = \"a\"\n[launch]\ncommand = [\"x\"]\n\n[launch.env]\nNCCL_DEBUG = \"WARN\"\n  {entry}\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        );
        let e = JobSpec::from_toml(&source, "job.toml").expect_err(entry);
        let shown = e.to_string();
        println!("{shown}");
        assert_eq!((e.line, e.column), (Some(7), Some(3)), "{shown}");
        assert_eq!(e.field.as_deref(), Some(*field), "{shown}");
        assert_eq!(e.kind, Invalid, "{shown}");
        for word in *words {
            assert!(shown.contains(word), "{shown:?} lacks {word:?}");
        }
    }
}

const FULL: &str = r#"name = "ddp-gloo"
[launch]
command = ["python3", "-u", "train.py", "--epochs", "2"]   # argv, never a shell string
workdir = "."
env = { NCCL_DEBUG = "WARN" }
[resources]
nodes = 2
procs_per_node = 2
gpus_per_node = 0
cpus_per_node = 4
memory_per_node_mib = 0
[failure]
max_restarts = 0
"#;

fn full_spec() -> JobSpec {
    JobSpec {
        name: "ddp-gloo".into(),
        launch: Launch {
            command: ["python3", "-u", "train.py", "--epochs", "2"]
                .map(String::from)
                .to_vec(),
            workdir: Some(".".into()),
            env: BTreeMap::from([("NCCL_DEBUG".into(), "WARN".into())]),
        },
        resources: Resources {
            nodes: 2,
            min_nodes: 2,
            procs_per_node: 2,
            gpus_per_node: 0,
            cpus_per_node: 4,
            memory_per_node_mib: 0,
            fabric: Fabric::Any,
        },
        failure: FailurePolicy {
            max_restarts: 0,
            hang_timeout_ms: None,
        },
        checkpoint: None,
    }
}

#[test]
fn parses_the_documented_spec() {
    assert_eq!(JobSpec::from_toml(FULL, "job.toml"), Ok(full_spec()));
    assert_eq!(full_spec().world_size(), 4);
}

#[test]
fn fills_in_defaults() {
    let source = "name = \"a\"\n[launch]\ncommand = [\"x\"]\n[resources]\nnodes = 3\nprocs_per_node = 8\ngpus_per_node = 8\n";
    let spec = JobSpec::from_toml(source, "job.toml").unwrap();
    assert_eq!(spec.launch.workdir, None);
    assert!(spec.launch.env.is_empty());
    assert_eq!(
        spec.resources,
        Resources {
            nodes: 3,
            min_nodes: 3,
            procs_per_node: 8,
            gpus_per_node: 8,
            cpus_per_node: 8,
            memory_per_node_mib: 0,
            fabric: Fabric::Any,
        }
    );
    assert_eq!(spec.failure, FailurePolicy::default());
    assert_eq!(spec.checkpoint, None);
    assert_eq!(spec.resources.node_range(), (3, 3));
    assert!(!spec.resources.is_elastic());
    assert_eq!(spec.world_size(), 24);
}

#[test]
fn accepts_inline_and_dotted_tables() {
    let source = r#"
name = "a"
launch = { command = ["x"], env.NCCL_DEBUG = "INFO" }
resources.nodes = 1
resources.procs_per_node = 2
resources.gpus_per_node = 4
"#;
    let spec = JobSpec::from_toml(source, "job.toml").unwrap();
    assert_eq!(spec.launch.env["NCCL_DEBUG"], "INFO");
    assert_eq!(spec.resources.gpus_per_node, 4);
}

#[test]
fn json_form_round_trips() {
    let spec = full_spec();
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(JobSpec::from_json(&json, "stored"), Ok(spec.clone()));

    let mut no_workdir = spec;
    no_workdir.launch.workdir = None;
    let json = serde_json::to_string_pretty(&no_workdir).unwrap();
    assert!(json.contains("\"workdir\": null"), "{json}");
    assert_eq!(JobSpec::from_json(&json, "stored"), Ok(no_workdir));
}

#[test]
fn json_fills_in_defaults() {
    let json = r#"{"name": "a", "launch": {"command": ["x"]}, "resources": {"nodes": 2, "procs_per_node": 3}}"#;
    let spec = JobSpec::from_json(json, "request body").unwrap();
    assert_eq!(spec.resources.cpus_per_node, 3);
    assert_eq!(spec.failure.max_restarts, 0);
}

#[test]
fn fabric_values() {
    let spec_with = |line: &str| {
        format!("name = \"a\"\n[launch]\ncommand = [\"x\"]\n[resources]\nnodes = 2\nprocs_per_node = 1\n{line}\n")
    };
    // (the fabric line, the fabric read)
    let accepted = [
        ("", Fabric::Any),
        ("fabric = \"any\"", Fabric::Any),
        ("fabric = \"ib\"", Fabric::Ib),
        ("fabric = \"roce\"", Fabric::Roce),
    ];
    for (line, want) in accepted {
        let spec = JobSpec::from_toml(&spec_with(line), "job.toml").expect(line);
        assert_eq!(spec.resources.fabric, want, "{line}");
        // The canonical JSON form keeps it, and leaves out the default.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json.contains(&format!("\"fabric\":\"{want}\"")),
            want != Fabric::Any,
            "{json}"
        );
        assert_eq!(json.contains("fabric"), want != Fabric::Any, "{json}");
        assert_eq!(JobSpec::from_json(&json, "stored").unwrap(), spec);
    }
    // A spec stored before `fabric` existed reads as "any".
    let mut stored: serde_json::Value = serde_json::to_value(full_spec()).unwrap();
    stored["resources"]
        .as_object_mut()
        .unwrap()
        .remove("fabric");
    let old: JobSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(old.resources.fabric, Fabric::Any);

    // (the fabric line, kind, words the message must contain)
    let refused: &[(&str, SpecErrorKind, &[&str])] = &[
        (
            "fabric = \"InfiniBand\"",
            Invalid,
            &[
                "job.toml:7:10: resources.fabric: \"InfiniBand\" is not a fabric; write \"ib\"",
                "(accepted: \"ib\" for InfiniBand, \"roce\" for RDMA over Converged Ethernet (v1 or v2), or \"any\", the default",
            ],
        ),
        ("fabric = \"RoCEv2\"", Invalid, &["write \"roce\""]),
        ("fabric = \"IB\"", Invalid, &["write \"ib\""]),
        ("fabric = \"nvlink\"", Invalid, &["\"nvlink\" is not a fabric (accepted: \"ib\""]),
        ("fabric = \"\"", Invalid, &["must not be empty (accepted:"]),
        ("fabric = 1", WrongType, &["must be a string, got an integer 1 (accepted: \"ib\""]),
        ("fabric = [\"ib\"]", WrongType, &["must be a string, got an array"]),
        ("fabrik = \"ib\"", UnknownField, &["did you mean `fabric`?"]),
    ];
    for &(line, kind, words) in refused {
        let doc = spec_with(line);
        let lines: Vec<&str> = doc.lines().collect();
        let field = if kind == UnknownField {
            "resources.fabrik"
        } else {
            "resources.fabric"
        };
        check_one(line, &lines, Some(7), Some(field), kind, words);
    }
    // The same through JSON (no positions there).
    let e = JobSpec::from_json(
        r#"{"name": "a", "launch": {"command": ["x"]}, "resources": {"nodes": 1, "procs_per_node": 1, "fabric": "infiniband"}}"#,
        "request body",
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("resources.fabric"));
    assert!(e.to_string().contains("write \"ib\""), "{e}");
}

#[test]
fn json_errors() {
    /// (document, line, field, kind, words the message must contain)
    type JsonCase = (
        &'static str,
        Option<usize>,
        Option<&'static str>,
        SpecErrorKind,
        &'static str,
    );
    let cases: &[JsonCase] = &[
        (
            "{\n  \"name\": \"a\",\n  \"launch\": }",
            Some(3),
            None,
            Syntax,
            "invalid JSON: expected value",
        ),
        (
            r#"{"name": "a", "lanch": {}}"#,
            None,
            Some("lanch"),
            UnknownField,
            "did you mean `launch`?",
        ),
        (
            r#"{"name": "a", "launch": {"command": "python train.py"}}"#,
            None,
            Some("launch.command"),
            WrongType,
            "argv, not a shell string",
        ),
        (
            r#"{"name": "a", "launch": {"command": ["x"]}, "resources": {"nodes": 0, "procs_per_node": 1}}"#,
            None,
            Some("resources.nodes"),
            Invalid,
            "must be at least 1, got 0",
        ),
        (
            r#"{"name": "a", "launch": {"command": ["x"]}, "resources": {"nodes": 1.5, "procs_per_node": 1}}"#,
            None,
            Some("resources.nodes"),
            WrongType,
            "got a float 1.5",
        ),
        (
            r#"{"name": "a", "launch": {"command": ["x"]}, "resources": {"nodes": 18446744073709551615, "procs_per_node": 1}}"#,
            None,
            Some("resources.nodes"),
            Invalid,
            "must be at most 100000",
        ),
        (
            r#"{"name": "a", "launch": {"command": ["x"], "env": {"RANK": "0"}}, "resources": {"nodes": 1, "procs_per_node": 1}}"#,
            None,
            Some("launch.env.RANK"),
            Invalid,
            "set by trainctl",
        ),
        (
            r#"{"launch": {"command": ["x"]}}"#,
            None,
            Some("name"),
            Missing,
            "missing required field",
        ),
        (
            r#"[1]"#,
            None,
            None,
            WrongType,
            "request body: the spec must be a table (a JSON object), got an array",
        ),
    ];
    for &(json, line, field, kind, words) in cases {
        let e = JobSpec::from_json(json, "request body").expect_err(json);
        let shown = e.to_string();
        println!("{shown}");
        assert_eq!(e.origin, "request body");
        assert_eq!(e.line, line, "{shown}");
        assert_eq!(e.field.as_deref(), field, "{shown}");
        assert_eq!(e.kind, kind, "{shown}");
        assert!(shown.contains(words), "{shown:?} lacks {words:?}");
    }
}

#[test]
fn validate_checks_specs_built_in_code() {
    assert_eq!(full_spec().validate(), Ok(()));
    let mut spec = full_spec();
    spec.resources.procs_per_node = 0;
    let e = spec.validate().unwrap_err();
    assert_eq!(e.field.as_deref(), Some("resources.procs_per_node"));
    assert_eq!(e.line, None);
    assert_eq!(
        e.to_string(),
        "job spec: resources.procs_per_node: must be at least 1, got 0 (accepted: an integer number of ranks per host from 1 to 1024)"
    );
    let mut spec = full_spec();
    spec.launch.env.insert("WORLD_SIZE".into(), "4".into());
    assert_eq!(
        spec.validate().unwrap_err().field.as_deref(),
        Some("launch.env.WORLD_SIZE")
    );
}

#[test]
fn resolve_workdir_is_a_pure_join() {
    let cases: &[(Option<&str>, &str, &str)] = &[
        (None, "/jobs/ddp", "/jobs/ddp"),
        (Some("."), "/jobs/ddp", "/jobs/ddp"),
        (Some("src"), "/jobs/ddp", "/jobs/ddp/src"),
        (Some("./src/./x"), "/jobs/ddp", "/jobs/ddp/src/x"),
        (Some("../data"), "/jobs/ddp", "/jobs/ddp/../data"),
        (Some("/abs/dir"), "/jobs/ddp", "/abs/dir"),
        (None, "", "."),
        (Some("src"), "rel", "rel/src"),
    ];
    for &(workdir, spec_dir, want) in cases {
        let mut spec = full_spec();
        spec.launch.workdir = workdir.map(String::from);
        spec.resolve_workdir(Path::new(spec_dir));
        assert_eq!(
            spec.launch.workdir.as_deref(),
            Some(want),
            "{workdir:?} in {spec_dir:?}"
        );
    }
}

#[test]
fn world_size_saturates_on_unvalidated_specs() {
    let mut spec = full_spec();
    spec.resources.nodes = u32::MAX;
    assert_eq!(spec.world_size(), u32::MAX);
}

mod fuzz;
mod policies;

#[test]
fn json_refuses_duplicate_keys_as_toml_does() {
    let base = r#""launch": {"command": ["python3", "t.py"]}, "resources": {"nodes": 1, "procs_per_node": 1}"#;
    let top = format!(r#"{{"name": "a", "name": "b", {base}}}"#);
    let err = JobSpec::from_json(&top, "job.json").unwrap_err();
    assert_eq!(err.kind, SpecErrorKind::Syntax);
    assert!(
        err.to_string().starts_with("job.json:1:")
            && err
                .to_string()
                .contains("invalid JSON: duplicate key `name`"),
        "{err}"
    );
    let nested = r#"{"name": "a", "launch": {"command": ["x"]},
        "resources": {"nodes": 1, "procs_per_node": 1, "nodes": 64}}"#;
    let err = JobSpec::from_json(nested, "job.json").unwrap_err();
    assert!(err.to_string().contains("duplicate key `nodes`"), "{err}");
    let env = r#"{"name": "a", "launch": {"command": ["x"], "env": {"A": "1", "A": "2"}},
        "resources": {"nodes": 1, "procs_per_node": 1}}"#;
    let err = JobSpec::from_json(env, "job.json").unwrap_err();
    assert!(err.to_string().contains("duplicate key `A`"), "{err}");
    // The same keys once each are fine, and so is one key in two different objects.
    let ok = format!(r#"{{"name": "a", {base}, "failure": {{"max_restarts": 1}}}}"#);
    JobSpec::from_json(&ok, "job.json").unwrap();
}
