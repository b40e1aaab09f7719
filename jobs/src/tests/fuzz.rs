//! Property tests of the parsers: whatever the input, `from_toml` and `from_json` return
//! either a spec that passes `validate()` and round-trips through its canonical JSON, or an
//! error that names where (line) or what (field) was wrong. Arbitrary text, and structured
//! mutations of a valid spec: values of the wrong type, huge numbers, unicode and control
//! characters, deep nesting, duplicate and unknown keys. 256 cases each, no persistence file.

use proptest::prelude::*;
use proptest::sample::select;

use crate::{JobSpec, SpecError, SpecErrorKind};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The outcome's properties: an accepted spec is valid and reads back from its canonical JSON
/// unchanged; an error renders with its origin and says where or what.
fn check_outcome(
    source: &str,
    result: Result<JobSpec, SpecError>,
    origin: &str,
) -> Result<(), TestCaseError> {
    match result {
        Ok(spec) => {
            prop_assert_eq!(
                spec.validate(),
                Ok(()),
                "accepted an invalid spec from {:?}",
                source
            );
            prop_assert!(
                spec.resources.min_nodes >= 1,
                "parsers set min_nodes: {:?}",
                spec
            );
            let json = serde_json::to_string(&spec).expect("a spec serializes");
            prop_assert_eq!(
                JobSpec::from_json(&json, "stored"),
                Ok(spec.clone()),
                "canonical JSON {} of {:?}",
                json,
                source
            );
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert_eq!(&e.origin, origin);
            prop_assert!(shown.starts_with(origin), "{}", shown);
            prop_assert!(!e.message.is_empty(), "{:?}", e);
            // A JSON document that is not an object is wrong as a whole: the message says so.
            let whole = e.message.starts_with("the spec must be a table");
            prop_assert!(
                e.line.is_some() || e.field.is_some() || whole,
                "error names neither a line nor a field: {} (from {:?})",
                shown,
                source
            );
            if let Some(field) = &e.field {
                prop_assert!(shown.contains(field.as_str()), "{}", shown);
            }
            if e.kind == SpecErrorKind::Syntax {
                prop_assert!(e.line.is_some(), "syntax error without a line: {}", shown);
            }
        }
    }
    Ok(())
}

/// A valid spec as `(table, key, value)` TOML lines; table "" is the root.
fn valid_entries() -> Vec<(String, String, String)> {
    [
        ("", "name", "\"ddp\""),
        ("launch", "command", "[\"python3\", \"train.py\"]"),
        ("launch", "workdir", "\"/work\""),
        ("launch", "env", "{ NCCL_DEBUG = \"WARN\" }"),
        ("resources", "nodes", "\"2:4\""),
        ("resources", "procs_per_node", "2"),
        ("resources", "gpus_per_node", "2"),
        ("resources", "cpus_per_node", "4"),
        ("resources", "memory_per_node_mib", "1024"),
        ("failure", "max_restarts", "3"),
        ("failure", "hang_timeout", "\"10m\""),
        ("checkpoint", "dir", "\"/ckpt/{job}\""),
        ("checkpoint", "signal", "\"usr1\""),
        ("checkpoint", "grace", "\"1m\""),
        ("checkpoint", "keep", "2"),
    ]
    .map(|(t, k, v)| (t.to_string(), k.to_string(), v.to_string()))
    .to_vec()
}

/// Renders entries as TOML, each table's keys under its header in order of first appearance.
fn render_toml(entries: &[(String, String, String)]) -> String {
    let mut tables: Vec<&str> = Vec::new();
    for (t, _, _) in entries {
        if !tables.contains(&t.as_str()) {
            tables.push(t);
        }
    }
    tables.sort_by_key(|t| !t.is_empty()); // root keys first
    let mut out = String::new();
    for table in tables {
        if !table.is_empty() {
            out.push_str(&format!("[{table}]\n"));
        }
        for (_, k, v) in entries.iter().filter(|(t, _, _)| t == table) {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

/// Strings with unicode, control characters and quotes, as TOML basic-string bodies.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z\\x00-\\x1f\\x7f\u{e9}\u{202e}\u{1f600}{}:/ .=-]{0,24}",
        Just(String::new()),
        Just("{job}{name}{other}".to_string()),
        Just("SIGKILL".to_string()),
        Just("TRAINCTL_X".to_string()),
        Just("x".repeat(5000)),
    ]
}

fn toml_string(s: &str) -> String {
    // JSON escapes are valid TOML basic-string escapes (\uXXXX, \n, \", \\).
    serde_json::to_string(s).unwrap()
}

/// A TOML value of any type: wrong types, huge and negative numbers, floats, odd strings,
/// arrays, inline tables, deep nesting.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        select(vec![
            "0",
            "-1",
            "1",
            "4294967295",
            "4294967296",
            "18446744073709551616",
            "99999999999999999999999999999999999999999",
            "1e3",
            "nan",
            "-inf",
            "0x10",
            "1_000",
            "true",
            "false",
            "1979-05-27T07:32:00Z",
            "[]",
            "{}",
            "[1, \"a\"]",
            "\"1:0\"",
            "\"0:0\"",
            "\"4:2\"",
            "\"2:\"",
            "\":\"",
            "\"99999999999:1\"",
            "\"0s\"",
            "\"7d\"",
            "\"1h30m\"",
            "\"999999999999h\"",
            "\"-5s\"",
            "{ a = 1 }",
            "[[1]]",
            "\"/ckpt/{job}/{name}\"",
        ])
        .prop_map(str::to_string),
        odd_string().prop_map(|s| toml_string(&s)),
        proptest::collection::vec(odd_string(), 0..4).prop_map(|v| format!(
            "[{}]",
            v.iter()
                .map(|s| toml_string(s))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (1usize..3000, any::<bool>()).prop_map(|(depth, arrays)| if arrays {
            format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth))
        }),
    ]
}

/// One mutation of the entry list.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace entry `i`'s value.
    Replace(usize, String),
    /// Repeat entry `i` (a duplicate key).
    Duplicate(usize),
    /// Remove entry `i`.
    Remove(usize),
    /// Add a key, known in another table or unknown, with a value.
    Add(String, String, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let n = valid_entries().len();
    let table = select(vec![
        "",
        "launch",
        "resources",
        "failure",
        "checkpoint",
        "launch.env",
        "extra",
    ]);
    let key = select(vec![
        "name",
        "nodes",
        "min_nodes",
        "grace_ms",
        "hang_timeout_ms",
        "keep",
        "command",
        "gpus",
        "NCCL_DEBUG",
        "TRAINCTL_RANK",
        "\"\u{e9}\"",
        "\"a\\u0000b\"",
        "\"\"",
    ]);
    prop_oneof![
        4 => (0..n, toml_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => (0..n).prop_map(Mutation::Duplicate),
        1 => (0..n).prop_map(Mutation::Remove),
        2 => (table, key, toml_value()).prop_map(|(t, k, v)| Mutation::Add(t.into(), k.into(), v)),
    ]
}

fn mutate(mutations: &[Mutation]) -> Vec<(String, String, String)> {
    let mut entries = valid_entries();
    for m in mutations {
        match m {
            Mutation::Replace(i, v) => {
                if let Some(e) = entries.get_mut(*i) {
                    e.2 = v.clone();
                }
            }
            Mutation::Duplicate(i) => {
                if let Some(e) = entries.get(*i).cloned() {
                    entries.push(e);
                }
            }
            Mutation::Remove(i) => {
                if *i < entries.len() {
                    entries.remove(*i);
                }
            }
            Mutation::Add(t, k, v) => entries.push((t.clone(), k.clone(), v.clone())),
        }
    }
    entries
}

/// A JSON value of any type for the structured JSON mutations.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        odd_string().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
        Just(json!([])),
        Just(json!({})),
        Just(json!("2:4")),
        Just(json!(["a", 1])),
        (1usize..100).prop_map(|depth| {
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics_the_parsers(source in prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "[a-z_\\[\\]{}=\"'.,:0-9 \n\t#-]{0,256}",
    ]) {
        check_outcome(&source, JobSpec::from_toml(&source, "job.toml"), "job.toml")?;
        check_outcome(&source, JobSpec::from_json(&source, "job.json"), "job.json")?;
    }

    #[test]
    fn mutated_toml_specs_parse_or_say_where(mutations in proptest::collection::vec(mutation(), 0..4)) {
        let source = render_toml(&mutate(&mutations));
        let result = JobSpec::from_toml(&source, "job.toml");
        if let Err(e) = &result {
            // Every mistake in these documents is located (it is in a line of the text), except
            // a missing key, which has no line to point at and names its field instead.
            if e.kind != SpecErrorKind::Missing {
                prop_assert!(e.line.is_some() && e.column.is_some(), "no position: {} in\n{}", e, source);
            }
            if e.kind != SpecErrorKind::Syntax {
                prop_assert!(e.field.is_some(), "no field: {} in\n{}", e, source);
            }
        }
        check_outcome(&source, result, "job.toml")?;
    }

    #[test]
    fn mutated_json_specs_parse_or_name_the_field(
        edits in proptest::collection::vec(
            (select(vec![
                "name", "launch", "launch.command", "launch.workdir", "launch.env",
                "launch.env.NCCL_DEBUG", "launch.env.TRAINCTL_RANK", "resources",
                "resources.nodes", "resources.min_nodes", "resources.procs_per_node",
                "resources.gpus_per_node", "resources.cpus_per_node",
                "resources.memory_per_node_mib", "failure", "failure.max_restarts",
                "failure.hang_timeout_ms", "failure.hang_timeout", "checkpoint",
                "checkpoint.dir", "checkpoint.signal", "checkpoint.grace_ms",
                "checkpoint.grace", "checkpoint.keep", "extra",
            ]), proptest::option::weighted(0.85, json_value())),
            0..4,
        )
    ) {
        let mut doc = serde_json::to_value(
            JobSpec::from_toml(&render_toml(&valid_entries()), "job.toml").expect("the base spec is valid"),
        ).unwrap();
        for (path, value) in &edits {
            let mut keys: Vec<&str> = path.split('.').collect();
            let last = keys.pop().unwrap();
            let mut at = &mut doc;
            for k in keys {
                if !at.is_object() {
                    break;
                }
                at = at.as_object_mut().unwrap().entry(k).or_insert_with(|| serde_json::json!({}));
            }
            if let Some(object) = at.as_object_mut() {
                match value {
                    Some(v) => { object.insert(last.to_string(), v.clone()); }
                    None => { object.remove(last); }
                }
            }
        }
        let source = serde_json::to_string_pretty(&doc).unwrap();
        let result = JobSpec::from_json(&source, "job.json");
        if let Err(e) = &result {
            prop_assert!(e.field.is_some(), "no field: {} in\n{}", e, source);
        }
        check_outcome(&source, result, "job.json")?;
    }
}

#[test]
fn the_base_of_the_mutations_is_valid() {
    let spec = JobSpec::from_toml(&render_toml(&valid_entries()), "job.toml").unwrap();
    assert_eq!(spec.resources.node_range(), (2, 4));
    assert!(spec.checkpoint.is_some());
}
