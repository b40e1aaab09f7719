//! Bounds on what the coordinator accepts and what the CLI prints, with real processes: a
//! `trainctl dev` cluster attacked over raw TCP and raw gRPC, and `trainctl` pointed at a hostile
//! server.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{cli_at, eventually, job_file, DevCluster, HandCluster};
use trainctl_coordinator::http::{HEADER_READ_TIMEOUT_MS, REST_BODY_BYTES_MAX};
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{HostResources, RegisterRequest};

/// Reads until the peer closes the connection (or `limit` passes); returns what was read and when
/// the connection closed.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, Some(start.elapsed())),
        }
    }
    (got, None)
}

#[test]
fn the_coordinator_bounds_connections_bodies_and_registrations() {
    // Plain HTTP, to speak raw HTTP/1.1 on a socket: the same bounds apply beneath TLS (the TLS
    // handshake has its own timeout, tested in tests/security.rs).
    let cluster = DevCluster::start_with(1, &["--insecure"], &[]);

    // Half a request head, then silence: the server closes the connection within the header
    // read timeout (slowloris holds nothing).
    let mut slow = TcpStream::connect(&cluster.addr).unwrap();
    slow.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let header_timeout = Duration::from_millis(HEADER_READ_TIMEOUT_MS);
    let (_, closed) = read_until_closed(&mut slow, header_timeout + Duration::from_secs(5));
    let closed = closed.expect("the server never closed a connection with half a request head");
    assert!(
        closed >= header_timeout - Duration::from_secs(1),
        "closed after {closed:?}, before the header timeout"
    );

    // A body declared far over the REST limit: 413 at once, without the server reading it.
    let mut big = TcpStream::connect(&cluster.addr).unwrap();
    let declared = 100 * REST_BODY_BYTES_MAX;
    write!(
        big,
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"name\": "
    )
    .unwrap();
    let start = Instant::now();
    let (reply, _) = read_until_closed(&mut big, Duration::from_secs(3));
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains(&REST_BODY_BYTES_MAX.to_string()), "{reply}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // A registration whose node name holds a terminal escape is refused, naming the field.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut client = AgentServiceClient::connect(format!("http://{}", cluster.addr))
            .await
            .unwrap();
        client
            .register(RegisterRequest {
                node_name: "evil\x1b]0;owned\x07".into(),
                address: "127.0.0.9".into(),
                instance_id: "evil-1".into(),
                resources: Some(HostResources {
                    cpus: 1,
                    memory_mib: 1024,
                    hostname: "evil".into(),
                    ..Default::default()
                }),
                port_range_start: 29900,
                port_range_end: 29909,
                agent_version: "test".into(),
                health: None,
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node_name"), "{status:?}");
    assert!(!status.message().contains('\x1b'), "{status:?}");
    let nodes = cluster.json(&["nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");

    // The agent protocol still works through all of this: the one agent is still up.
    assert_eq!(nodes[0]["status"], "up", "{nodes}");
}

/// A server that answers every request with `reply(path)`: (status line, JSON body).
fn hostile_server(reply: fn(&str) -> (&'static str, String)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = reply(&path);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn the_cli_never_prints_a_terminal_escape_it_was_sent() {
    let addr = hostile_server(|path| {
        if path.starts_with("/v1/nodes") {
            let node = serde_json::json!({
                "name": "evil\u{1b}]0;owned\u{7}",
                "address": "127.0.0.9",
                "hostname": "evil\u{1b}[2J",
                "status": "down",
                "status_reason": "lost\u{1b}[2J\u{1b}[31m\u{9b}1m",
                "cpus": 1, "cpus_allocated": 0,
                "memory_mib": 1024, "memory_allocated_mib": 0,
                "gpus": 1, "gpus_allocated": 0,
                "gpu_models": ["\u{1b}[5mH200"],
                "rdma": [], "jobs": ["1\u{1b}[A"],
                "drained": false,
                "containment": "cgroup2\u{1b}[K",
            });
            ("200 OK", serde_json::json!([node]).to_string())
        } else {
            let error = serde_json::json!({ "error": "no\u{1b}]0;owned\u{7} such job\u{1b}[2J" });
            ("404 Not Found", error.to_string())
        }
    });
    let addr = format!("http://{addr}");
    let nodes = cli_at(&addr, &["nodes"]);
    assert!(nodes.status.success(), "{nodes:?}");
    let stdout = String::from_utf8_lossy(&nodes.stdout);
    assert!(!nodes.stdout.contains(&0x1b), "{stdout}");
    assert!(!stdout.contains('\u{9b}'), "{stdout}");
    assert!(stdout.contains("evil\\u{1b}]0;owned\\u{7}"), "{stdout}");
    assert!(stdout.contains("lost\\u{1b}[2J"), "{stdout}");

    // Errors relayed from the server are escaped too.
    let status = cli_at(&addr, &["status", "1"]);
    assert!(!status.status.success());
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(!status.stderr.contains(&0x1b), "{stderr}");
    assert!(!status.stdout.contains(&0x1b));
    assert!(stderr.contains("such job"), "{stderr}");
}

/// The job history is bounded: with `--max-finished-jobs 1` the leader forgets the older of two
/// finished jobs, and the CLI, curl and `logs` say it was forgotten (not that it never existed).
#[test]
fn finished_jobs_past_the_retention_are_forgotten_and_say_so() {
    let cluster = HandCluster::start_configured(
        1,
        15_000,
        false,
        &["--max-finished-jobs", "1", "--job-sweep-ms", "200"],
    );
    let file = job_file(
        cluster.dir.path(),
        "quick",
        "name = \"quick\"\n[launch]\ncommand = [\"sh\", \"-c\", \"echo done\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n",
    );
    let first = cluster.submit(&file);
    cluster.wait_state(&first, "succeeded", Duration::from_secs(60));
    // One finished job is within the bound: it stays.
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(cluster.job(&first)["state"], "succeeded");
    let second = cluster.submit(&file);
    cluster.wait_state(&second, "succeeded", Duration::from_secs(60));

    let out = eventually(Duration::from_secs(30), "the first job forgotten", || {
        let out = cluster.cli(&["status", &first]);
        (!out.status.success()).then_some(out)
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("job {first} ended and was forgotten"))
            && err.contains("--max-finished-jobs"),
        "status of a forgotten job: {err}"
    );
    let logs = cluster.cli(&["logs", &first]);
    assert!(!logs.status.success());
    assert!(String::from_utf8_lossy(&logs.stderr).contains("was forgotten"));
    // curl gets a 404 with the same words; an id never given out is merely unknown.
    for (id, words) in [(first.as_str(), "was forgotten"), ("999", "does not exist")] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .args(cluster.curl_auth_args())
            .arg(format!("{}/v1/jobs/{id}", cluster.url()))
            .output()
            .expect("run curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.ends_with("\n404") && body.contains(words),
            "GET job {id}: {body}"
        );
    }
    // The newer job is kept, and is the only one listed.
    assert_eq!(cluster.job(&second)["state"], "succeeded");
    let jobs = cluster.json(&["list"]);
    let ids: Vec<&str> = jobs
        .as_array()
        .expect("a list of jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(ids, [second.as_str()]);
}
