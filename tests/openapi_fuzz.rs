//! The REST API fuzzed from its own OpenAPI document by a fuzzer no one here wrote: schemathesis,
//! from the managed Python venv (`scripts/python-env.sh`, which the test command runs), against a
//! real `trainctl dev` cluster with TLS and tokens. No request may get a 5xx, and every response
//! must have a status code, content type, headers and body that the document declares for it.
//! Without a token, every operation the document secures must answer 401 with a JSON error.
//!
//! The run is bounded (examples per operation, a wall-clock limit) and seeded, like the property
//! tests: `TRAINCTL_FUZZ_SEED` explores other inputs, `TRAINCTL_FUZZ_EXAMPLES` more of them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{repo, DevCluster};

/// The checks every run makes (schemathesis' own names): no 5xx; status codes, content types,
/// headers and bodies as documented; no schema-violating request accepted; no operation that
/// ignores its security scheme; resources gone after a DELETE stay gone; a declared method
/// answered, an undeclared one 405 with `Allow`. Not `positive_data_acceptance`: the document
/// can not say everything the server checks (a job spec's `min_nodes` against its `nodes`, a
/// token's name rules), so a schema-valid request may rightly get a 400 or 422.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_headers_conformance,response_schema_conformance,negative_data_rejection,\
    ignored_auth,use_after_free,unsupported_method,allow_header_conformance";

/// Operations fuzzed apart, without the stateful phase. That phase follows links it infers from
/// responses (`GET /v1/nodes` gives node names, `GET /v1/tokens` token ids), so with these it
/// would undrain the test's only node (and fuzzed jobs would then run on this host, creating
/// their fuzzed checkpoint directories), remove it, or revoke the admin token the fuzzer uses.
/// Apart, they get fuzzed names and ids: every answer but the success one.
const CLUSTER_WRECKING: &str = r"^/v1/nodes/\{name\}(/undrain)?$|^/v1/tokens/\{id\}/revoke$";

/// The whole test must stay within the test command's time (about 3 minutes on 2 cores).
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// A schemathesis check, loaded through `SCHEMATHESIS_HOOKS` for the run without a token.
const HOOKS: &str = r#"
import schemathesis


@schemathesis.check
def refused_without_token(ctx, response, case):
    """An operation the document secures answers 401 with a JSON error to a request without a
    valid token (none, or a fuzzed one)."""
    op = case.operation
    security = op.definition.raw.get("security", op.schema.raw_schema.get("security", []))
    if not security or {} in security:
        return None
    if response.status_code != 401:
        raise AssertionError(
            f"{op.label} without a valid token answered {response.status_code}, not 401"
        )
    try:
        body = response.json()
    except Exception:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        raise AssertionError(f"{op.label} answered 401 with {response.text!r}, not a JSON error")
    return None
"#;

/// The venv's python (made by scripts/python-env.sh if needed) with schemathesis; panics, saying
/// what to do, if either is missing.
fn python_with_schemathesis() -> (PathBuf, String) {
    let out = Command::new(repo().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh (the managed venv with schemathesis) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let python = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("python-env.sh prints the python path")
            .trim(),
    );
    let version = Command::new(&python)
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    assert!(
        version.status.success(),
        "schemathesis is not installed for {}: scripts/python-env.sh installs it into its venv \
         (with TRAINCTL_PYTHON it installs nothing: run `{} -m pip install schemathesis==VERSION`, the \
         version python-env.sh pins):\n{}{}",
        python.display(),
        python.display(),
        String::from_utf8_lossy(&version.stdout),
        String::from_utf8_lossy(&version.stderr)
    );
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    (python, version)
}

/// One schemathesis run.
struct Fuzz<'a> {
    what: &'a str,
    args: Vec<String>,
    env: Vec<(&'static str, PathBuf)>,
}

/// Runs `fuzz` to the end or until `deadline`; its report if it failed.
fn run(python: &Path, dir: &Path, fuzz: &Fuzz, deadline: Instant) -> Option<String> {
    let log = dir.join(format!("{}.log", fuzz.what.replace(' ', "-")));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(python);
    cmd.args(["-m", "schemathesis.cli", "run"])
        .args(&fuzz.args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("COLUMNS", "120")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (k, v) in &fuzz.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "schemathesis, {}: {}, {:.1?}",
        fuzz.what,
        status.map_or("killed at the limit".into(), |s| s.to_string()),
        started.elapsed()
    );
    match status {
        Some(s) if s.success() => None,
        Some(s) => Some(format!("schemathesis, {} ({s}):\n{report}", fuzz.what)),
        None => Some(format!(
            "schemathesis, {}: still running after the test's limit of {RUN_LIMIT:?}, killed:\n{report}",
            fuzz.what
        )),
    }
}

/// Requests answered without their body being read (401 without a token, 404, 405), with bodies
/// big enough to still be in flight when the answer comes, as the fuzzer's client sends them:
/// each gets its answer, never a reset or a TLS EOF (which the fuzzer once met as a network error).
const UNREAD_BODIES: &str = r#"
import sys, requests
url, ca, token = sys.argv[1:4]
session = requests.Session()
problems = []
for method, path, auth, expected in [
    ("POST", "/v1/jobs", False, 401),
    ("POST", "/v1/tokens", False, 401),
    ("POST", "/v1/no-such-endpoint", True, 404),
    ("PUT", "/v1/jobs", True, 405),
]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Bearer " + token
    for size in (1_000, 20_000, 200_000, 1_000_000):
        for _ in range(5):
            try:
                r = session.request(method, url + path, data=b"{" + b" " * size + b"}", headers=headers, verify=ca)
                if r.status_code != expected:
                    problems.append(f"{method} {path} ({size} bytes): {r.status_code}, not {expected}")
            except Exception as e:
                problems.append(f"{method} {path} ({size} bytes): {e!r}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
"#;

/// Runs [`UNREAD_BODIES`]; what went wrong, if anything.
fn unread_bodies_are_answered(python: &Path, cluster: &DevCluster) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", UNREAD_BODIES, &cluster.url()])
        .arg(cluster.ca_cert())
        .arg(cluster.token())
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    (!out.status.success()).then(|| {
        format!(
            "requests answered without reading their bodies ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn the_rest_api_answers_fuzzed_requests_as_its_openapi_document_says() {
    let t0 = Instant::now();
    let (python, version) = python_with_schemathesis();
    let cluster = DevCluster::start(1);
    // Fuzzed job specs are accepted (201) but must never run on this host: with its only node
    // drained, they stay pending.
    let out = cluster.cli(&["drain", "node-1"]);
    assert!(
        out.status.success(),
        "drain node-1: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("trainctl_fuzz_hooks.py"), HOOKS).unwrap();
    let seed = std::env::var("TRAINCTL_FUZZ_SEED").unwrap_or_else(|_| "20261130".into());
    let examples: u32 = std::env::var("TRAINCTL_FUZZ_EXAMPLES")
        .ok()
        .map(|n| n.parse().expect("TRAINCTL_FUZZ_EXAMPLES is a number"))
        .unwrap_or(100);
    let common = |examples: u32| -> Vec<String> {
        [
            format!("{}/openapi.json", cluster.url()),
            "--tls-verify".into(),
            cluster.ca_cert().display().to_string(),
            "--seed".into(),
            seed.clone(),
            "--max-examples".into(),
            examples.to_string(),
            // No examples kept between runs (Hypothesis' database, `.hypothesis/`): the same
            // inputs on every run.
            "--generation-database".into(),
            "none".into(),
            "--request-timeout".into(),
            "10".into(),
            "--no-color".into(),
        ]
        .into()
    };
    let bearer = format!("Authorization: Bearer {}", cluster.token());
    let runs = [
        Fuzz {
            what: "without a token",
            args: [
                common(examples.div_ceil(3)),
                vec!["--checks".into(), format!("{CHECKS},refused_without_token")],
            ]
            .concat(),
            env: vec![
                ("PYTHONPATH", dir.path().to_path_buf()),
                ("SCHEMATHESIS_HOOKS", "trainctl_fuzz_hooks".into()),
            ],
        },
        Fuzz {
            what: "as admin",
            args: [
                common(examples),
                vec![
                    "--checks".into(),
                    CHECKS.into(),
                    "--header".into(),
                    bearer.clone(),
                    "--exclude-path-regex".into(),
                    CLUSTER_WRECKING.into(),
                ],
            ]
            .concat(),
            env: vec![],
        },
        Fuzz {
            what: "as admin, operations that would wreck the cluster",
            args: [
                common(examples),
                vec![
                    "--checks".into(),
                    CHECKS.into(),
                    "--header".into(),
                    bearer,
                    "--include-path-regex".into(),
                    CLUSTER_WRECKING.into(),
                    "--phases".into(),
                    "examples,coverage,fuzzing".into(),
                ],
            ]
            .concat(),
            env: vec![],
        },
    ];
    let deadline = t0 + RUN_LIMIT;
    let mut failures: Vec<String> = runs
        .iter()
        .filter_map(|fuzz| run(&python, dir.path(), fuzz, deadline))
        .collect();
    failures.extend(unread_bodies_are_answered(&python, &cluster));

    // The cluster is whole: its node still there and drained, the admin token still good.
    let nodes = cluster.json(&["nodes"]);
    assert_eq!(nodes[0]["name"], "node-1", "{nodes}");
    assert_eq!(nodes[0]["drained"], true, "{nodes}");
    eprintln!(
        "{version} with seed {seed}, {examples} examples per operation: {:.1?} in all",
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "the REST API does not answer as /openapi.json says (seed {seed}):\n\n{}",
        failures.join("\n\n")
    );
}
