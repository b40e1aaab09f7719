//! Regression tests: the Raft routes refuse anyone who is not another coordinator of the cluster.
//! Found in review: an unauthenticated append with a crafted entry cancelled a running job, a
//! malformed one panicked openraft, and higher-term vote requests deposed the leader.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;
use trainctl_coordinator::raft::peer_auth::{PeerSecret, PEER_HEADER};
use trainctl_coordinator::server::{self, CoordinatorConfig};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_routes_refuse_strangers_forgers_and_non_members() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".into());
    config.node_timeout_ms = 3_600_000;
    // Peer authentication of Raft messages, over plain HTTP (TLS is a layer beneath it).
    config.secure = false;
    let coordinator = server::open(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(server::run(coordinator.clone(), listener, rx));
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let health = || async {
        http.get(url("/v1/health"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while health().await["is_leader"] != json!(true) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = health().await;
    let term = before["raft_term"].as_u64().unwrap();
    let index = before["last_applied_index"].as_u64().unwrap();

    // The attack as reported: a CancelJob entry at the next index, with a higher term.
    let append = json!({
        "vote": {"leader_id": {"term": term + 10, "node_id": 2}, "committed": true},
        "prev_log_id": {"leader_id": {"term": term, "node_id": 1}, "index": index},
        "entries": [{"log_id": {"leader_id": {"term": term + 10, "node_id": 2}, "index": index + 1},
                     "payload": {"Normal": {"CancelJob": {"job": 1, "at_ms": 0}}}}],
        "leader_commit": {"leader_id": {"term": term + 10, "node_id": 2}, "index": index + 1},
    });
    let body = serde_json::to_vec(&append).unwrap();
    let post = |path: &'static str, body: Vec<u8>, signature: Option<String>| {
        let mut request = http
            .post(url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = signature {
            request = request.header(PEER_HEADER, s);
        }
        request.send()
    };
    // 1. No signature.
    let response = post("/internal/raft/append", body.clone(), None)
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("signature"),
        "{error}"
    );
    // 2. Signed with another cluster's secret.
    let forged =
        PeerSecret::from_bytes(vec![1; 32]).sign(2, now_ms(), "/internal/raft/append", &body);
    let response = post("/internal/raft/append", body.clone(), Some(forged))
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // 3. Signed with the real secret (a stolen copy) but from a server that is not a member.
    let real = PeerSecret::load_or_create(dir.path()).unwrap();
    let stolen = real.sign(2, now_ms(), "/internal/raft/append", &body);
    let response = post("/internal/raft/append", body.clone(), Some(stolen))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // 4. A vote storm with higher terms: refused, the leader keeps its term.
    for i in 0..10 {
        let vote = serde_json::to_vec(&json!({
            "vote": {"leader_id": {"term": term + 100 + i, "node_id": 3}, "committed": false},
            "last_log_id": {"leader_id": {"term": term + 100 + i, "node_id": 3}, "index": 1_000_000},
        }))
        .unwrap();
        let response = post("/internal/raft/vote", vote, None).await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let after = health().await;
    assert_eq!(after["raft_term"], before["raft_term"], "{after}");
    assert_eq!(after["is_leader"], json!(true));
    assert_eq!(after["last_applied_index"], before["last_applied_index"]);
    // Writes still work.
    let submitted = http
        .post(url("/v1/jobs"))
        .header("content-type", "application/toml")
        .body("name = \"j\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n")
        .send()
        .await
        .unwrap();
    // (No node is registered: the job can never fit, which is a 422 from a healthy leader.)
    assert_eq!(submitted.status(), 422);
    shutdown.send(true).unwrap();
    task.await.unwrap().unwrap();
}
