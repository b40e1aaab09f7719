//! The attacks of the security issue, as real clients make them against a real cluster started the
//! way the README starts one (`trainctl dev`: TLS and tokens on): curl without or with a wrong
//! token, tokens of lesser roles and other namespaces, a rogue gRPC client without a certificate or
//! with one from another CA, a host taking over another's node name, a revoked agent, and a client
//! that opens a connection and never says hello.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{eventually, job_file, processes_with, start_with_env, trainctl, DevCluster};
use serde_json::Value;
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{HostResources, RegisterRequest};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// `curl -s` with ARGS (no credentials unless ARGS give them): status, body as JSON (Null if not
/// JSON), and the WWW-Authenticate header.
fn curl(args: &[&str]) -> (u16, Value, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%header{www-authenticate}\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl is required for this test (the test command installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = text.rsplitn(3, '\n');
    let code = parts.next().unwrap_or("0").parse().unwrap_or(0);
    let auth = parts.next().unwrap_or("").to_string();
    let body = serde_json::from_str(parts.next().unwrap_or("")).unwrap_or(Value::Null);
    (code, body, auth)
}

/// Creates a token with `args` (after `token create`) and returns it.
fn token(cluster: &DevCluster, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend(args);
    let out = cluster.cli(&all);
    assert!(
        out.status.success(),
        "token create {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn nothing_is_read_or_written_without_a_valid_token() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let ca = cluster.ca_cert();
    let ca = ca.to_str().unwrap();
    let spec =
        r#"{"name":"x","launch":{"command":["true"]},"resources":{"nodes":1,"procs_per_node":1}}"#;
    // The real token with its last character changed (to one it is not: a token ending in `0`
    // once made this "forgery" the real token).
    let real = cluster.token();
    let (kept, last) = real.split_at(real.len() - 1);
    let forged = format!(
        "Authorization: Bearer {kept}{}",
        if last == "0" { "1" } else { "0" }
    );
    for auth in [
        None,
        Some("Authorization: Bearer nope".to_string()),
        Some(forged),
        Some("Authorization: Basic YWRtaW46YWRtaW4=".to_string()),
    ] {
        for (method, path, body) in [
            ("GET", "/v1/jobs", None),
            ("POST", "/v1/jobs", Some(spec)),
            ("GET", "/v1/jobs/1", None),
            ("POST", "/v1/jobs/1/cancel", None),
            ("GET", "/v1/nodes", None),
            ("POST", "/v1/nodes/node-1/drain", None),
            ("DELETE", "/v1/nodes/node-1", None),
            ("GET", "/v1/tokens", None),
            ("POST", "/v1/tokens", Some(r#"{"name":"x","role":"admin"}"#)),
            ("GET", "/v1/audit", None),
            ("GET", "/metrics", None),
        ] {
            let url = format!("{base}{path}");
            let mut args = vec!["--cacert", ca, "-X", method, &url];
            if let Some(a) = &auth {
                args.extend(["-H", a]);
            }
            if let Some(b) = body {
                args.extend(["-H", "Content-Type: application/json", "--data", b]);
            }
            let (code, body, www) = curl(&args);
            assert_eq!(code, 401, "{method} {path} with {auth:?}: {body}");
            assert!(body["error"].is_string(), "{method} {path}: {body}");
            assert!(www.starts_with("Bearer"), "{method} {path}: {www:?}");
        }
    }
    // An unknown path is a 404 with or without a token: the API's surface is public anyway
    // (/openapi.json), and nothing behind it answers.
    let (code, body, _) = curl(&["--cacert", ca, &format!("{base}/nope")]);
    assert_eq!(code, 404, "{body}");
    // Health and the API description stay public.
    let (code, body, _) = curl(&["--cacert", ca, &format!("{base}/v1/health")]);
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    let (code, body, _) = curl(&["--cacert", ca, &format!("{base}/openapi.json")]);
    assert_eq!(code, 200);
    assert_eq!(
        body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Nothing was changed by all of that: no job, the node not drained, one admin token.
    assert_eq!(cluster.json(&["list"]), serde_json::json!([]));
    assert_eq!(cluster.json(&["nodes"])[0]["drained"], false);
    // Plain HTTP on the TLS port gets no answer; a client that does not trust the cluster CA
    // does not talk to it.
    let (code, _, _) = curl(&[&format!("http://{}/v1/jobs", cluster.addr)]);
    assert_eq!(code, 0, "plain HTTP got an HTTP answer");
    let (code, _, _) = curl(&[&format!("{base}/v1/health")]);
    assert_eq!(
        code, 0,
        "curl trusted the cluster's certificate without its CA"
    );
}

#[test]
fn roles_and_namespaces_confine_what_a_token_sees_and_does() {
    let cluster = DevCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let team_a = token(
        &cluster,
        &[
            "--role",
            "submit",
            "--namespace",
            "team-a",
            "--name",
            "alice",
        ],
    );
    let team_b = token(
        &cluster,
        &["--role", "submit", "--namespace", "team-b", "--name", "bob"],
    );
    let reader_a = token(
        &cluster,
        &[
            "--role",
            "read",
            "--namespace",
            "team-a",
            "--name",
            "auditor",
        ],
    );
    let secret = "hunter2-7f3a9c";
    let spec = job_file(
        dir.path(),
        "secretive",
        &format!(
            "name = \"secretive\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo started; sleep 4791.5\"]\nenv = {{ WANDB_API_KEY = \"{secret}\" }}\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        ),
    );
    let out = cluster.cli_as(&team_a, &["submit", spec.to_str().unwrap(), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.wait_state(&id, "running", JOB_TIMEOUT);

    // Another team's token sees nothing of it and can not cancel it.
    let listed = cluster.cli_as(&team_b, &["list", "-o", "json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&listed.stdout).unwrap(),
        serde_json::json!([])
    );
    for args in [
        ["status", id.as_str()],
        ["cancel", id.as_str()],
        ["logs", id.as_str()],
    ] {
        let out = cluster.cli_as(&team_b, &args);
        assert!(!out.status.success(), "{args:?} as team-b succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("job {id} does not exist")),
            "{args:?}: {err}"
        );
    }
    // A reader of the team sees the job, not the secret, and can not change anything.
    let out = cluster.cli_as(&reader_a, &["status", &id, "-o", "json"]);
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        seen["spec"]["launch"]["env"]["WANDB_API_KEY"], "(hidden)",
        "{seen}"
    );
    let out = cluster.cli_as(&reader_a, &["cancel", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs admin or submit"),
        "{err}"
    );
    let out = cluster.cli_as(&reader_a, &["submit", spec.to_str().unwrap()]);
    assert!(!out.status.success());
    // A submitter can not drain nodes or make tokens.
    let out = cluster.cli_as(&team_a, &["drain", "node-1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs admin"),
        "{out:?}"
    );
    let out = cluster.cli_as(&team_a, &["token", "create", "--role", "admin"]);
    assert!(!out.status.success());
    // The owner and the admin see the value.
    let owner: Value = serde_json::from_slice(
        &cluster
            .cli_as(&team_a, &["status", &id, "-o", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(owner["spec"]["launch"]["env"]["WANDB_API_KEY"], secret);
    assert_eq!(
        cluster.job(&id)["spec"]["launch"]["env"]["WANDB_API_KEY"],
        secret
    );

    // The owner cancels it; the audit trail says who did what.
    let out = cluster.cli_as(&team_a, &["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = cluster.json(&["audit"]);
    let lines: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["by"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        lines.contains(&(
            "alice".into(),
            format!("submit job `secretive` as job {id}")
        )),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("alice".into(), format!("cancel job {id}"))),
        "{lines:?}"
    );

    // The secret is in no log the cluster wrote and not in its metrics.
    let mut logs = String::new();
    for entry in std::fs::read_dir(cluster.data_dir.path().join("cluster"))
        .unwrap()
        .flatten()
    {
        if entry.path().extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    assert!(logs.contains("node-1"), "no process logs found");
    assert!(
        !logs.contains(secret),
        "a process log holds the job's secret"
    );
    let out = cluster
        .curl()
        .arg(format!("{}/metrics", cluster.url()))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(metrics.contains("trainctl"), "{metrics}");
    assert!(!metrics.contains(secret));
}

#[test]
fn agents_need_an_admitted_identity_and_a_revoked_one_stops_and_is_drained() {
    let cluster = DevCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let register = |node: &str| RegisterRequest {
        node_name: node.into(),
        address: "127.0.0.9".into(),
        instance_id: "rogue-1".into(),
        resources: Some(HostResources {
            cpus: 64,
            memory_mib: 1 << 20,
            hostname: "rogue".into(),
            ..Default::default()
        }),
        port_range_start: 29900,
        port_range_end: 29909,
        agent_version: "rogue".into(),
        health: None,
    };
    let ca_pem = std::fs::read_to_string(cluster.ca_cert()).unwrap();
    runtime.block_on(async {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        // Plain gRPC to the TLS port: no conversation at all.
        let plain = AgentServiceClient::connect(format!("http://{}", cluster.addr)).await;
        if let Ok(mut client) = plain {
            assert!(client.register(register("rogue")).await.is_err());
        }
        // TLS, trusting the cluster, but without a certificate: refused before anything applies.
        let channel = Channel::from_shared(cluster.url())
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = AgentServiceClient::new(channel)
            .register(register("node-1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        // A certificate from another CA: the handshake fails.
        let other = trainctl_tls::ClusterCa::generate("evil CA").unwrap();
        let (key, csr) = trainctl_tls::generate_csr("node-1").unwrap();
        let cert = other.sign_csr(&csr, "node-1", 1).unwrap();
        let forged = Channel::from_shared(cluster.url())
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca_pem))
                    .identity(Identity::from_pem(cert, key)),
            )
            .unwrap()
            .connect()
            .await;
        if let Ok(channel) = forged {
            assert!(AgentServiceClient::new(channel)
                .register(register("node-1"))
                .await
                .is_err());
        }
    });
    let nodes = cluster.json(&["nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");

    // A host with a valid join token can not take node-1's name.
    let join = token(&cluster, &["--role", "agent", "--name", "extra-hosts"]);
    let ca = cluster.ca_cert();
    let url = cluster.url();
    let agent_args = |name: &'static str, data: &std::path::Path| -> Vec<String> {
        vec![
            "agent".into(),
            "--coordinator".into(),
            url.clone(),
            "--ca-cert".into(),
            ca.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--name".into(),
            name.into(),
            "--advertise-addr".into(),
            "127.0.0.9".into(),
            "--port-range".into(),
            "29900-29909".into(),
        ]
    };
    let out = std::process::Command::new(trainctl())
        .args(agent_args("node-1", &dir.path().join("thief")))
        .env("TRAINCTL_JOIN_TOKEN", &join)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to another agent identity"), "{err}");
    assert_eq!(cluster.json(&["nodes"])[0]["status"], "up");

    // An agent that joined properly runs work; revoking its token drains its node, and the agent
    // stops its ranks and exits, its identity forgotten.
    let log = dir.path().join("extra.log");
    let args = agent_args("extra", &dir.path().join("extra"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut extra = start_with_env(&args, &[("TRAINCTL_JOIN_TOKEN", join.as_str())], &log);
    cluster.wait_nodes_up(2);
    let spec = job_file(
        dir.path(),
        "wide",
        "name = \"wide\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo up; sleep 4792.5\"]\n[resources]\nnodes = 2\nprocs_per_node = 1\n",
    );
    let id = cluster.submit(&spec);
    cluster.wait_state(&id, "running", JOB_TIMEOUT);
    eventually(JOB_TIMEOUT, "both ranks running", || {
        // `sh -c` and its `sleep` per rank.
        (processes_with("sleep 4792.5").len() >= 2).then_some(())
    });
    let token_id = cluster
        .json(&["token", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "extra-hosts")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let revoked = cluster.json(&["token", "revoke", &token_id]);
    assert_eq!(revoked["nodes"], serde_json::json!(["extra"]), "{revoked}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = extra.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the revoked agent kept running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("start the agent again with a new join token"),
        "{said}"
    );
    assert!(!dir.path().join("extra").join("identity").exists());
    eventually(Duration::from_secs(30), "no rank left on any host", || {
        processes_with("sleep 4792.5").is_empty().then_some(())
    });
    let extra_node = cluster
        .json(&["nodes"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "extra")
        .cloned()
        .unwrap();
    assert_eq!(extra_node["drained"], true, "{extra_node}");
    // The job waits for a second host (it is not running on the revoked one).
    assert_ne!(cluster.job(&id)["state"], "running");
    let _ = cluster.cli(&["cancel", &id]);
}

#[test]
fn a_connection_that_never_completes_its_tls_handshake_is_closed() {
    let cluster = DevCluster::start(1);
    let mut idle = TcpStream::connect(&cluster.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    let after = opened.elapsed();
    assert_eq!(n, 0, "the server sent bytes to a client that said nothing");
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(19),
        "closed after {after:?} (the handshake timeout is 10 s)"
    );
    // The cluster kept serving meanwhile.
    assert_eq!(cluster.json(&["nodes"])[0]["status"], "up");
}

#[test]
fn an_insecure_coordinator_says_so_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let log = dir.path().join("coordinator.log");
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let _coordinator = common::start(
        &[
            "coordinator",
            "--insecure",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &log,
    );
    eventually(Duration::from_secs(30), "the warning", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("WARNING: --insecure") && text.contains("INSECURE")).then_some(())
    });
    assert!(!data.join("admin.token").exists());
}

#[test]
fn a_coordinator_runs_on_the_operators_own_ca_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("pki");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(trainctl())
            .args(args)
            .env("TRAINCTL_CONFIG", dir.path().join("none.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["ca", "init", "--dir", ca_dir.to_str().unwrap()]);
    // A second init into the same dir is refused: a CA is never overwritten.
    let again = std::process::Command::new(trainctl())
        .args(["ca", "init", "--dir", ca_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    run(&[
        "ca",
        "issue",
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--name",
        "127.0.0.1",
        "--name",
        "coord.test",
    ]);
    let pem = |f: &str| ca_dir.join(f).display().to_string();
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let log = dir.path().join("coordinator.log");
    let _coordinator = common::start(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-ca-cert",
            &pem("ca.pem"),
            "--tls-ca-key",
            &pem("ca.key"),
            "--tls-cert",
            &pem("127.0.0.1.pem"),
            "--tls-key",
            &pem("127.0.0.1.key"),
        ],
        &log,
    );
    let token_file = data.join("admin.token");
    eventually(Duration::from_secs(30), "the admin token", || {
        token_file.exists().then_some(())
    });
    let token = std::fs::read_to_string(&token_file).unwrap();
    let who = std::process::Command::new(trainctl())
        .args(["whoami", "-o", "json"])
        .env("TRAINCTL_CONFIG", dir.path().join("none.toml"))
        .env("TRAINCTL_ADDR", format!("https://{listen}"))
        .env("TRAINCTL_CA_CERT", pem("ca.pem"))
        .env("TRAINCTL_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(
        who.status.success(),
        "{}",
        String::from_utf8_lossy(&who.stderr)
    );
    let who: Value = serde_json::from_slice(&who.stdout).unwrap();
    assert_eq!(
        (who["name"].as_str(), who["role"].as_str()),
        (Some("admin"), Some("admin"))
    );
    // It serves the operator's certificate: it made no CA or certificate of its own.
    assert!(!data.join("tls").join("ca.pem").exists());
    assert!(!data.join("tls").join("server.pem").exists());
    // A client trusting another CA is refused.
    let other = dir.path().join("other");
    run(&["ca", "init", "--dir", other.to_str().unwrap()]);
    let (code, _, _) = curl(&[
        "--cacert",
        other.join("ca.pem").to_str().unwrap(),
        &format!("https://{listen}/v1/health"),
    ]);
    assert_eq!(code, 0);
}
