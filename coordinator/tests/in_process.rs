//! A real coordinator in the test process, driven the way users and agents drive it: REST with
//! reqwest, the agent protocol with the generated tonic client. No agent runs: the tests play it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use trainctl_coordinator::server::{self, Coordinator, CoordinatorConfig};
use trainctl_proto::agent::agent_service_client::AgentServiceClient;
use trainctl_proto::agent::{
    Assignment, Gpu, HeartbeatRequest, HeartbeatResponse, HostResources, LogChunk, RankPhase,
    RankReport, RegisterRequest,
};

/// Longest a test waits for something the coordinator does in the background.
const WAIT_LIMIT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A coordinator serving on a loopback port, with a way to stop it.
struct Running {
    addr: SocketAddr,
    http: reqwest::Client,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(data_dir: &Path, node_timeout_ms: Option<u64>) -> Running {
    start_tuned(data_dir, node_timeout_ms, |_| {}).await
}

/// [`start`] with `tune` applied to the configuration.
async fn start_tuned(
    data_dir: &Path,
    node_timeout_ms: Option<u64>,
    tune: impl FnOnce(&mut CoordinatorConfig),
) -> Running {
    let mut config = CoordinatorConfig::new(data_dir.to_path_buf(), "127.0.0.1:0".into());
    // These tests play the agents by hand and heartbeat only when they mean to: unless a test is
    // about node loss, no node may be declared lost while it runs (on a loaded machine a test can
    // take longer than the default timeout).
    config.node_timeout_ms = node_timeout_ms.unwrap_or(3_600_000);
    // The API's behaviour over plain HTTP; TLS, tokens and agent identities are tested with real
    // processes in tests/security.rs.
    config.secure = false;
    tune(&mut config);
    let coordinator = open_when_free(config).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(server::run(coordinator, listener, rx));
    let running = Running {
        addr,
        http: reqwest::Client::new(),
        shutdown,
        task,
    };
    // A one-voter cluster elects itself; writes before that are refused with 503.
    let r = &running;
    wait_for("this coordinator to lead", move || async move {
        // 503 until a leader is known.
        let (_, health) = r
            .call(reqwest::Method::GET, "/v1/health", None, vec![])
            .await;
        (health["is_leader"] == json!(true)).then_some(())
    })
    .await;
    running
}

/// Opens the data dir, waiting while a coordinator that just stopped still has it open.
async fn open_when_free(config: CoordinatorConfig) -> Arc<Coordinator> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        match server::open(config.clone()).await {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(POLL_INTERVAL).await,
            Err(e) => panic!("open the coordinator: {e:#}"),
        }
    }
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// Sends a request and returns the status and the body as JSON (or as a JSON string if not JSON).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    async fn submit(&self, spec: Value) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/jobs",
                Some("application/json"),
                spec.to_string().into_bytes(),
            )
            .await;
        assert_eq!(status, 201, "submit: {body}");
        body["id"].as_str().expect("an id").to_string()
    }

    async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    async fn node(&self, name: &str) -> Value {
        let nodes = self.get("/v1/nodes").await;
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == json!(name))
            .cloned()
            .unwrap_or_else(|| panic!("no node {name} in {nodes}"))
    }

    async fn wait_for_job_state(&self, id: &str, state: &str) -> Value {
        wait_for(&format!("job {id} to be {state}"), move || async move {
            let job = self.job(id).await;
            (job["state"] == json!(state)).then_some(job)
        })
        .await
    }

    /// Stops the coordinator and waits for every task of it to end.
    async fn stop(self) {
        drop(self.http);
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(WAIT_LIMIT, self.task)
            .await
            .expect("the coordinator stops within the limit")
            .expect("the server task did not panic")
            .expect("the server stopped cleanly");
    }
}

/// Polls `check` until it returns something, or fails the test naming `what`.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The test playing one node's agent.
struct FakeAgent {
    client: AgentServiceClient<Channel>,
    name: String,
    address: String,
    instance_id: String,
    ports: (u32, u32),
}

impl FakeAgent {
    /// An agent for `node-N` at 127.0.0.1N with ports 29N00-29N09.
    async fn connect(coordinator: &Running, n: u32) -> FakeAgent {
        let client = AgentServiceClient::connect(format!("http://{}", coordinator.addr))
            .await
            .unwrap();
        FakeAgent {
            client,
            name: format!("node-{n}"),
            address: format!("127.0.0.1{n}"),
            instance_id: format!("node-{n}-instance-a"),
            ports: (29000 + n * 100, 29000 + n * 100 + 9),
        }
    }

    async fn register(&mut self, cpus: u32, gpus: u32) {
        let response = self
            .client
            .register(RegisterRequest {
                node_name: self.name.clone(),
                address: self.address.clone(),
                instance_id: self.instance_id.clone(),
                resources: Some(HostResources {
                    cpus,
                    containment: String::new(),
                    memory_mib: 1 << 16,
                    gpus: (0..gpus)
                        .map(|index| Gpu {
                            index,
                            name: "Test GPU".into(),
                            memory_mib: 1 << 16,
                            uuid: format!("GPU-{}-{index}", self.name),
                            ..Default::default()
                        })
                        .collect(),
                    rdma_devices: vec![],
                    hostname: format!("{}.example", self.name),
                    ..Default::default()
                }),
                port_range_start: self.ports.0,
                port_range_end: self.ports.1,
                agent_version: "test".into(),
                health: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.heartbeat_interval_ms > 0);
    }

    async fn heartbeat(
        &mut self,
        ranks: Vec<RankReport>,
        logs: Vec<LogChunk>,
    ) -> HeartbeatResponse {
        self.client
            .heartbeat(HeartbeatRequest {
                node_name: self.name.clone(),
                instance_id: self.instance_id.clone(),
                ranks,
                logs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A long-polling heartbeat that says it already knows `known` (`job:attempt`).
    async fn long_poll(&mut self, known: Vec<String>, wait_ms: u32) -> HeartbeatResponse {
        self.client
            .heartbeat(HeartbeatRequest {
                node_name: self.name.clone(),
                instance_id: self.instance_id.clone(),
                known_assignments: known,
                wait_ms,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Heartbeats until the coordinator assigns this node a job.
    async fn wait_for_assignment(&mut self) -> Assignment {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let response = self.heartbeat(vec![], vec![]).await;
            assert!(
                !response.register_again,
                "{} must register again",
                self.name
            );
            if let Some(a) = response.assignments.into_iter().next() {
                return a;
            }
            assert!(Instant::now() < deadline, "no assignment for {}", self.name);
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

fn report(a: &Assignment, rank: u32, phase: RankPhase, exit_code: i32) -> RankReport {
    RankReport {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank,
        phase: phase as i32,
        exit_code,
        message: String::new(),
        pid: 5000 + rank,
    }
}

/// Every rank of the assignment in `phase`.
fn report_all(a: &Assignment, phase: RankPhase, exit_code: i32) -> Vec<RankReport> {
    a.ranks
        .iter()
        .map(|r| report(a, r.rank, phase, exit_code))
        .collect()
}

/// A JSON job spec: `nodes` x `procs` ranks with `gpus` GPUs per node.
fn spec(name: &str, nodes: u32, procs: u32, gpus: u32) -> Value {
    json!({
        "name": name,
        "launch": { "command": ["python3", "train.py"] },
        "resources": { "nodes": nodes, "procs_per_node": procs, "gpus_per_node": gpus },
    })
}

fn env<'a>(env: &'a HashMap<String, String>, key: &str) -> &'a str {
    env.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{key} is not set"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_runs_to_success_through_rest_and_the_agent_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agents = [
        FakeAgent::connect(&c, 1).await,
        FakeAgent::connect(&c, 2).await,
    ];
    for a in &mut agents {
        a.register(16, 4).await;
    }
    let id = c.submit(spec("ddp", 2, 2, 2)).await;
    assert_eq!(id, "1");

    let mut assignments = Vec::new();
    for a in &mut agents {
        assignments.push(a.wait_for_assignment().await);
    }
    let job = c.wait_for_job_state(&id, "starting").await;
    let allocation = job["allocation"].as_array().unwrap();
    let rank0_share = allocation
        .iter()
        .find(|na| na["group_rank"] == json!(0))
        .unwrap();
    let rank0_agent = agents
        .iter()
        .find(|a| rank0_share["node"] == json!(a.name))
        .unwrap();
    let master_port: u32 = job["master_port"].as_u64().unwrap() as u32;
    assert_eq!(job["master_addr"], json!(rank0_agent.address));
    assert!(
        (rank0_agent.ports.0..=rank0_agent.ports.1).contains(&master_port),
        "MASTER_PORT {master_port} outside {:?}",
        rank0_agent.ports
    );

    let mut seen_ranks = Vec::new();
    for (agent, a) in agents.iter().zip(&assignments) {
        assert_eq!(a.job_id, id);
        assert_eq!(a.argv, ["python3", "train.py"]);
        let share = allocation
            .iter()
            .find(|na| na["node"] == json!(agent.name))
            .unwrap();
        let gpus: Vec<String> = share["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| format!("GPU-{}-{g}", agent.name))
            .collect();
        assert_eq!(a.ranks.len(), 2);
        for r in &a.ranks {
            seen_ranks.push(r.rank);
            assert_eq!(env(&r.env, "RANK"), r.rank.to_string());
            assert_eq!(env(&r.env, "LOCAL_RANK"), r.local_rank.to_string());
            assert_eq!(env(&r.env, "WORLD_SIZE"), "4");
            assert_eq!(env(&r.env, "MASTER_ADDR"), rank0_agent.address);
            assert_eq!(env(&r.env, "MASTER_PORT"), master_port.to_string());
            assert_eq!(env(&r.env, "CUDA_VISIBLE_DEVICES"), gpus.join(","));
            assert_eq!(
                env(&r.env, "GROUP_RANK"),
                share["group_rank"].to_string(),
                "on {}",
                agent.name
            );
        }
    }
    seen_ranks.sort_unstable();
    assert_eq!(seen_ranks, [0, 1, 2, 3]);
    let node = c.node("node-1").await;
    assert_eq!(
        (node["gpus_allocated"].clone(), node["jobs"].clone()),
        (json!(2), json!([id]))
    );

    // Every rank starts.
    for (agent, a) in agents.iter_mut().zip(&assignments) {
        let response = agent
            .heartbeat(report_all(a, RankPhase::Running, 0), vec![])
            .await;
        assert_eq!(
            response.assignments.len(),
            1,
            "still assigned while running"
        );
    }
    c.wait_for_job_state(&id, "running").await;
    // A node may not write the log of a rank it does not run.
    let foreign_rank = assignments[0].ranks[0].rank;
    let foreign = LogChunk {
        job_id: id.clone(),
        attempt: 0,
        rank: foreign_rank,
        offset: 0,
        data: b"forged\n".to_vec(),
    };
    let response = agents[1].heartbeat(vec![], vec![foreign]).await;
    // Refused, and said so (the agent gives such output up after a few tries).
    assert_eq!(response.log_acks.len(), 1, "{:?}", response.log_acks);
    assert_eq!(response.log_acks[0].stored_until, 0);
    assert!(response.log_acks[0]
        .error
        .contains("did not run on this node"));

    // Every rank prints and exits 0; the lines ride on the heartbeat that reports the exit.
    for (agent, a) in agents.iter_mut().zip(&assignments) {
        let logs: Vec<LogChunk> = a
            .ranks
            .iter()
            .map(|r| LogChunk {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                rank: r.rank,
                offset: 0,
                data: format!("hello from rank {}\nloss 0.{}\n", r.rank, r.rank).into_bytes(),
            })
            .collect();
        let response = agent
            .heartbeat(report_all(a, RankPhase::Exited, 0), logs.clone())
            .await;
        assert_eq!(response.log_acks.len(), 2);
        for (ack, chunk) in response.log_acks.iter().zip(&logs) {
            assert_eq!(ack.stored_until, chunk.data.len() as u64);
        }
    }
    let job = c.wait_for_job_state(&id, "succeeded").await;
    for agent in &mut agents {
        let response = agent.heartbeat(vec![], vec![]).await;
        assert!(
            response.assignments.is_empty(),
            "an ended job is not assigned"
        );
    }
    assert_eq!(job["reason"], Value::Null);
    let ranks = job["ranks"].as_array().unwrap();
    assert!(ranks
        .iter()
        .all(|r| r["state"] == json!("exited") && r["exit_code"] == json!(0)));
    assert!(job["allocation"]
        .as_array()
        .unwrap()
        .iter()
        .all(|na| na["released"] == json!(true)));

    // The logs: every line, tagged with its node and rank; complete once nothing is left.
    let page = c.get(&format!("/v1/jobs/{id}/logs")).await;
    let mut lines: Vec<(u64, String, String)> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["rank"].as_u64().unwrap(),
                l["node"].as_str().unwrap().to_string(),
                l["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    lines.sort();
    let rank_node = |rank: u64| {
        ranks.iter().find(|r| r["rank"] == json!(rank)).unwrap()["node"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut want = Vec::new();
    for rank in 0..4u64 {
        want.push((rank, rank_node(rank), format!("hello from rank {rank}")));
        want.push((rank, rank_node(rank), format!("loss 0.{rank}")));
    }
    want.sort();
    assert_eq!(lines, want);
    assert_eq!(page["complete"], json!(false), "lines were still returned");
    let cursor = page["cursor"].as_str().unwrap();
    let next = c.get(&format!("/v1/jobs/{id}/logs?cursor={cursor}")).await;
    assert_eq!(next["lines"], json!([]));
    assert_eq!(next["complete"], json!(true));
    let text = c
        .http
        .get(c.url(&format!("/v1/jobs/{id}/logs?format=text&rank=3")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text,
        format!(
            "[{n} rank 3] hello from rank 3\n[{n} rank 3] loss 0.3\n",
            n = rank_node(3)
        )
    );

    // Every resource is back.
    for name in ["node-1", "node-2"] {
        let node = c.node(name).await;
        assert_eq!(node["status"], json!("up"));
        assert_eq!(node["gpus_allocated"], json!(0), "{node}");
        assert_eq!(node["cpus_allocated"], json!(0), "{node}");
        assert_eq!(node["jobs"], json!([]), "{node}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_from_unknown_agents_are_told_to_register_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    let response = agent.heartbeat(vec![], vec![]).await;
    assert!(response.register_again, "an unknown node");
    agent.register(4, 0).await;
    assert!(!agent.heartbeat(vec![], vec![]).await.register_again);
    // The same node name from another agent process (the old one is gone).
    agent.instance_id = "node-1-instance-b".into();
    let response = agent.heartbeat(vec![], vec![]).await;
    assert!(response.register_again, "a previous agent instance");
    assert!(response.assignments.is_empty());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_heartbeat_is_answered_as_soon_as_work_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(4, 0).await;
    // Nothing to do: the reply is held for the wait, then comes empty.
    let started = Instant::now();
    let idle = agent.long_poll(vec![], 400).await;
    assert!(idle.assignments.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "held {:?}",
        started.elapsed()
    );
    // A job submitted while the beat is held is delivered at once, not at the end of the wait.
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let reply = agent.long_poll(vec![], 10_000).await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = c.submit(spec("now", 1, 1, 0)).await;
    let (reply, waited) = poll.await.unwrap();
    assert_eq!(reply.assignments.len(), 1);
    assert_eq!(reply.assignments[0].job_id, id);
    assert!(
        waited < Duration::from_millis(1_900),
        "held past the change: {waited:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_errors_are_4xx_with_a_json_error_that_says_what_was_wrong() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(8, 4).await;
    let id = c.submit(spec("small", 1, 1, 0)).await;

    let json_ct = Some("application/json");
    let too_big = spec("huge", 3, 2, 2).to_string();
    /// (method, path, content type, body, accepted statuses, words of the error)
    type Case<'a> = (Method, String, Option<&'a str>, Vec<u8>, &'a [u16], &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/v1/jobs/42".into(),
            None,
            vec![],
            &[404],
            "job 42 does not exist",
        ),
        (
            Method::POST,
            "/v1/jobs/42/cancel".into(),
            None,
            vec![],
            &[404],
            "job 42",
        ),
        (
            Method::GET,
            "/v1/jobs/42/logs".into(),
            None,
            vec![],
            &[404],
            "job 42",
        ),
        (
            Method::GET,
            "/v1/jobs/abc".into(),
            None,
            vec![],
            &[400],
            "not a job id",
        ),
        (
            Method::GET,
            "/v1/jobs/-1".into(),
            None,
            vec![],
            &[400],
            "not a job id",
        ),
        (
            Method::POST,
            "/v1/jobs/abc/cancel".into(),
            None,
            vec![],
            &[400],
            "not a job id",
        ),
        (
            Method::GET,
            "/v1/jobs?state=bogus".into(),
            None,
            vec![],
            &[400],
            "unknown state",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{id}/logs?rank=9"),
            None,
            vec![],
            &[400],
            "rank 9 does not exist",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{id}/logs?cursor=zz"),
            None,
            vec![],
            &[400],
            "bad cursor",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            None,
            vec![],
            &[400],
            "empty",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            None,
            vec![0xff, 0xfe, 0x00, 0x01],
            &[400, 415, 422],
            "",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            None,
            b"this is neither json nor toml".to_vec(),
            &[400, 415, 422],
            "",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            json_ct,
            b"{\"name\": ".to_vec(),
            &[400, 422],
            "invalid JSON",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            Some("application/toml"),
            b"name = [".to_vec(),
            &[400, 422],
            "invalid TOML",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            Some("image/png"),
            spec("a", 1, 1, 0).to_string().into_bytes(),
            &[415],
            "image/png",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            json_ct,
            too_big.into_bytes(),
            &[422],
            "needs 3 hosts",
        ),
        (
            Method::POST,
            "/v1/jobs".into(),
            json_ct,
            spec("Bad Name", 1, 1, 0).to_string().into_bytes(),
            &[422],
            "name",
        ),
        (
            // Validated here, before the write: the state machine's apply does not validate.
            Method::POST,
            "/v1/jobs".into(),
            json_ct,
            spec("no-ranks", 1, 0, 0).to_string().into_bytes(),
            &[422],
            "procs_per_node",
        ),
    ];
    for (method, path, ct, body, statuses, words) in cases {
        let (status, reply) = c.call(method.clone(), &path, ct, body).await;
        assert!(
            statuses.contains(&status),
            "{method} {path} ({ct:?}): got {status}, want one of {statuses:?}: {reply}"
        );
        let error = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no JSON `error` in {reply}"));
        assert!(
            error.contains(words),
            "{method} {path}: `{error}` lacks `{words}`"
        );
    }
    // A finished job cannot be cancelled twice.
    let cancel = format!("/v1/jobs/{id}/cancel");
    let (status, reply) = c.call(Method::POST, &cancel, None, vec![]).await;
    assert_eq!((status, reply["state"].clone()), (200, json!("cancelled")));
    let (status, reply) = c.call(Method::POST, &cancel, None, vec![]).await;
    assert_eq!(status, 409, "{reply}");
    assert!(reply["error"]
        .as_str()
        .unwrap()
        .contains("already cancelled"));
    // Nothing above made a job.
    let jobs = c.get("/v1/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toml_body_without_content_type_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    FakeAgent::connect(&c, 1).await.register(4, 0).await;
    let toml = "name = \"toml-job\"\n[launch]\ncommand = [\"python3\", \"t.py\"]\n\
                [resources]\nnodes = 1\nprocs_per_node = 1\n";
    let (status, reply) = c
        .call(
            reqwest::Method::POST,
            "/v1/jobs",
            None,
            toml.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let (status, reply) = c
        .call(
            reqwest::Method::POST,
            "/v1/jobs",
            Some("application/toml; charset=utf-8"),
            toml.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let job = c.job(reply["id"].as_str().unwrap()).await;
    assert_eq!(job["name"], json!("toml-job"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_path_and_metrics_count_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let doc = c.get("/openapi.json").await;
    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/logs",
        "/v1/nodes",
        "/v1/health",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from /openapi.json"
        );
    }
    assert!(paths["/v1/jobs"]["post"].is_object() && paths["/v1/jobs"]["get"].is_object());

    FakeAgent::connect(&c, 1).await.register(4, 0).await;
    c.submit(spec("counted", 1, 1, 0)).await;
    let metrics = c
        .http
        .get(c.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("trainctl_jobs"), "{metrics}");
    assert!(
        metrics.contains("trainctl_job_submissions_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trainctl_nodes{status=\"up\"} 1"),
        "{metrics}"
    );
    c.stop().await;
}

/// The parts of the REST view that a restart must keep (leaving out what is computed per request).
async fn snapshot(c: &Running) -> (Value, Value) {
    let mut jobs = Vec::new();
    for summary in c.get("/v1/jobs").await.as_array().unwrap() {
        let mut job = c.job(summary["id"].as_str().unwrap()).await;
        job.as_object_mut().unwrap().remove("pending_reason");
        jobs.push(job);
    }
    (Value::Array(jobs), c.get("/v1/nodes").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_nodes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agents = [
        FakeAgent::connect(&c, 1).await,
        FakeAgent::connect(&c, 2).await,
    ];
    for a in &mut agents {
        a.register(8, 2).await;
    }
    // One job succeeds, one runs, one is cancelled, one waits for room.
    let done = c.submit(spec("done", 1, 1, 1)).await;
    let a = agents[0].wait_for_assignment().await;
    agents[0]
        .heartbeat(report_all(&a, RankPhase::Exited, 0), vec![])
        .await;
    c.wait_for_job_state(&done, "succeeded").await;
    let running = c.submit(spec("running", 2, 2, 2)).await;
    for agent in &mut agents {
        let a = agent.wait_for_assignment().await;
        assert_eq!(a.job_id, running);
        agent
            .heartbeat(report_all(&a, RankPhase::Running, 0), vec![])
            .await;
    }
    c.wait_for_job_state(&running, "running").await;
    let cancelled = c.submit(spec("cancelled", 1, 1, 0)).await;
    let cancel = format!("/v1/jobs/{cancelled}/cancel");
    let (status, _) = c.call(reqwest::Method::POST, &cancel, None, vec![]).await;
    assert_eq!(status, 200);
    let waiting = c.submit(spec("waiting", 1, 1, 1)).await;
    // No GPU is free: it stays pending.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.job(&waiting).await["state"], json!("pending"));
    let before = snapshot(&c).await;
    let states: Vec<Value> = before
        .0
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].clone())
        .collect();
    assert_eq!(
        states,
        [
            json!("succeeded"),
            json!("running"),
            json!("cancelled"),
            json!("pending")
        ]
    );
    drop(agents);
    c.stop().await;

    let c = start(dir.path(), None).await;
    let after = snapshot(&c).await;
    assert_eq!(after.0, before.0, "jobs after the restart");
    assert_eq!(after.1, before.1, "nodes after the restart");
    // And it keeps working: new ids follow the old ones.
    let next = c.submit(spec("after", 1, 1, 0)).await;
    assert_eq!(next, "5");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_heartbeating_is_lost_and_its_job_waits_to_be_placed_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), Some(1500)).await;
    let mut agents = [
        FakeAgent::connect(&c, 1).await,
        FakeAgent::connect(&c, 2).await,
    ];
    for a in &mut agents {
        a.register(8, 2).await;
    }
    let id = c.submit(spec("ddp", 2, 1, 1)).await;
    let mut assignments = Vec::new();
    for agent in &mut agents {
        let a = agent.wait_for_assignment().await;
        agent
            .heartbeat(report_all(&a, RankPhase::Running, 0), vec![])
            .await;
        assignments.push(a);
    }
    c.wait_for_job_state(&id, "running").await;

    // node-1 keeps heartbeating; node-2 falls silent.
    let [agent1, agent2] = &mut agents;
    let deadline = Instant::now() + WAIT_LIMIT;
    let job = loop {
        let response = agent1
            .heartbeat(report_all(&assignments[0], RankPhase::Running, 0), vec![])
            .await;
        assert!(!response.register_again, "node-1 keeps heartbeating");
        let job = c.job(&id).await;
        if job["state"] != json!("running") {
            break job;
        }
        assert!(Instant::now() < deadline, "node-2 was never declared lost");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // A host loss is not the job's fault: it goes back to the head of the queue as attempt 1, and
    // waits for hosts (two are needed, one is up).
    assert_eq!(job["state"], json!("pending"), "{job}");
    assert_eq!(
        (job["attempt"].clone(), job["restarts"].clone()),
        (json!(1), json!(0))
    );
    let end = job["attempts"][0]["end"].as_str().unwrap();
    assert!(
        end.contains("node-2") && end.contains("no heartbeat"),
        "{end}"
    );
    assert!(
        job["pending_reason"]
            .as_str()
            .unwrap()
            .contains("too few of the hosts"),
        "{job}"
    );
    let node2 = c.node("node-2").await;
    assert_eq!(node2["status"], json!("down"));
    assert!(node2["status_reason"]
        .as_str()
        .unwrap()
        .contains("no heartbeat"));
    // Its ranks may still run behind the partition: its GPUs stay held until its agent answers.
    assert_eq!(node2["gpus_allocated"], job["gpus_per_node"]);
    assert_eq!(c.node("node-1").await["status"], json!("up"));
    // node-1 is told to stop its rank; once it reports the exit, node-1 is free again.
    let response = agent1
        .heartbeat(report_all(&assignments[0], RankPhase::Exited, -15), vec![])
        .await;
    assert!(response.assignments.is_empty());
    let node1 = c.node("node-1").await;
    assert_eq!(
        (node1["gpus_allocated"].clone(), node1["jobs"].clone()),
        (json!(0), json!([]))
    );
    // The silent agent, heard from again, must register anew.
    assert!(agent2.heartbeat(vec![], vec![]).await.register_again);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_log_entries_and_get_distinct_ids() {
    const CLIENTS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(4, 0).await;
    let before = c.get("/v1/health").await["last_applied_index"]
        .as_u64()
        .unwrap();
    let mut submitters = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (http, url) = (c.http.clone(), c.url("/v1/jobs"));
        submitters.spawn(async move {
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .body(spec(&format!("job-{i}"), 1, 1, 0).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 201);
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = submitters.join_next().await {
        ids.push(id.unwrap());
    }
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=CLIENTS as u64).collect::<Vec<_>>(),
        "every submission got its own id"
    );
    let after = c.get("/v1/health").await["last_applied_index"]
        .as_u64()
        .unwrap();
    // Group commit: while one entry is being written, the next submissions gather into one entry.
    assert!(
        after - before < CLIENTS as u64,
        "{CLIENTS} submissions took {} log entries",
        after - before
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_survives_a_restart_after_a_raft_snapshot() {
    // The coordinator snapshots every 2000 log entries; write more than that, then restart.
    const SUBMISSIONS: usize = 2100;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(4, 0).await;
    // A job holding every CPU keeps the rest pending.
    let first = c.submit(spec("hog", 1, 4, 0)).await;
    c.wait_for_job_state(&first, "starting").await;
    // One at a time, so each submission is its own log entry (concurrent ones share entries).
    const IN_FLIGHT: usize = 1;
    let mut submitters = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let (http, url) = (c.http.clone(), c.url("/v1/jobs"));
        submitters.spawn(async move {
            for i in (worker..SUBMISSIONS).step_by(IN_FLIGHT) {
                let body = spec(&format!("job-{i}"), 1, 1, 0).to_string();
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 201);
            }
        });
    }
    while let Some(done) = submitters.join_next().await {
        done.unwrap();
    }
    let before = snapshot(&c).await;
    let health = c.get("/v1/health").await;
    assert!(
        health["last_applied_index"].as_u64().unwrap() > 2000,
        "{health}"
    );
    c.stop().await;
    // The state was written as a snapshot (not only as log entries) before the restart.
    // Retried: a task of the stopped coordinator may hold the database a moment longer.
    let db = wait_for("the stopped coordinator to close its database", || async {
        redb::Database::open(dir.path().join("state.redb")).ok()
    })
    .await;
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("snapshot");
    let table = txn.open_table(table).unwrap();
    assert!(
        table.get("current").unwrap().is_some(),
        "no snapshot was taken"
    );
    drop((table, txn, db));

    let c = start(dir.path(), None).await;
    let after = snapshot(&c).await;
    assert_eq!(after.0.as_array().unwrap().len(), SUBMISSIONS + 1);
    assert_eq!(after.0, before.0, "jobs after the restart");
    assert_eq!(after.1, before.1, "nodes after the restart");
    c.stop().await;
}

/// Regression: a log store that cannot write (disk full, unwritable) said nothing, so agents re-sent
/// the chunk every 20 ms forever and the rank's end was never reported. Now the failure is in the
/// acknowledgement (the agent backs off, then gives the lines up), and the rest of the beat works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_store_that_cannot_write_says_so_in_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(4, 0).await;
    let id = c.submit(spec("ddp", 1, 1, 0)).await;
    let a = agent.wait_for_assignment().await;
    // Where the job's logs would go is now a file: no directory can be made there, even by root.
    let logs = dir.path().join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::write(&logs, b"not a directory").unwrap();
    let chunk = LogChunk {
        job_id: id.clone(),
        attempt: 0,
        rank: 0,
        offset: 0,
        data: b"hello\n".to_vec(),
    };
    let response = agent
        .heartbeat(report_all(&a, RankPhase::Running, 0), vec![chunk])
        .await;
    assert_eq!(response.log_acks.len(), 1);
    let ack = &response.log_acks[0];
    assert_eq!(ack.stored_until, 0);
    assert!(!ack.error.is_empty(), "{ack:?}");
    // The report in the same beat was applied all the same.
    c.wait_for_job_state(&id, "running").await;
    c.stop().await;
}

/// Regression: every rank's assignment carried the job's whole environment, so a job with a large
/// `[launch] env` and 8 ranks per host made a heartbeat reply bigger than an agent's 4 MiB decode
/// limit, and the host was locked out of all its work while it still counted as up. The job's
/// environment now travels once per assignment (and a spec is at most 1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_large_environment_still_reaches_a_host_running_many_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(16, 0).await;
    let big: serde_json::Map<String, Value> = (0..15)
        .map(|i| (format!("BIG_{i}"), json!("x".repeat(60_000))))
        .collect();
    let mut job = spec("big-env", 1, 8, 0);
    job["launch"]["env"] = Value::Object(big);
    let id = c.submit(job).await;
    // A default tonic client (4 MiB decode limit) gets the assignment: 8 x 900 KB would not fit.
    let a = agent.wait_for_assignment().await;
    assert_eq!(a.job_id, id);
    assert_eq!(a.ranks.len(), 8);
    assert_eq!(a.job_env.len(), 15);
    assert!(a.ranks.iter().all(|r| !r.env.contains_key("BIG_0")));
    c.stop().await;
}

/// Sends a request with extra headers; returns status, headers and the body (JSON, or a JSON
/// string when not JSON).
async fn call_with_headers(
    c: &Running,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = c.http.request(method, c.url(path)).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// Asserts a JSON error response: the status, a JSON content type, and an `error` containing
/// each of `words`; returns the error.
fn assert_json_error(
    what: &str,
    (status, headers, body): &(u16, reqwest::header::HeaderMap, Value),
    want: u16,
    words: &[&str],
) -> String {
    assert_eq!(*status, want, "{what}: {body}");
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type `{ct}`: {body}"
    );
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no JSON `error` in {body}"))
        .to_string();
    for w in words {
        assert!(error.contains(w), "{what}: `{error}` lacks `{w}`");
    }
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_json_404s_and_only_grpc_requests_reach_the_agent_service() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    // Agents still get through (gRPC on the same port).
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(4, 0).await;
    let id = c.submit(spec("typo", 1, 1, 0)).await;
    for (method, path) in [
        (Method::GET, "/".to_string()),
        (Method::GET, "/v1/job".to_string()),
        (Method::POST, format!("/v1/jobs/{id}/cancle")),
        (Method::DELETE, "/v1/jobs".to_string() + "/x/y/z"),
        (Method::PUT, "/nope".to_string()),
        // The agent service's own path, but not a gRPC request.
        (
            Method::POST,
            "/trainctl.agent.v1.AgentService/Register".to_string(),
        ),
    ] {
        let reply = call_with_headers(&c, method.clone(), &path, &[], vec![]).await;
        let error = assert_json_error(&format!("{method} {path}"), &reply, 404, &[]);
        assert_eq!(
            error,
            format!("no such endpoint: {method} {path} (see /openapi.json)")
        );
    }
    // The mistyped cancel did nothing.
    let state = c.job(&id).await["state"].clone();
    assert_ne!(state, json!("cancelled"));
    // A query string is not part of the endpoint's name.
    let reply = call_with_headers(&c, Method::GET, "/v1/job?state=running", &[], vec![]).await;
    let error = assert_json_error("GET /v1/job?...", &reply, 404, &[]);
    assert_eq!(error, "no such endpoint: GET /v1/job (see /openapi.json)");
    // A gRPC request to a method the agent service lacks is gRPC's UNIMPLEMENTED, not a REST 404.
    let (status, headers, _) = call_with_headers(
        &c,
        Method::POST,
        "/trainctl.agent.v1.AgentService/NoSuchMethod",
        &[("content-type", "application/grpc")],
        vec![],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "12", "{headers:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_body_size_and_query_errors_are_json_with_their_status() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    FakeAgent::connect(&c, 1).await.register(4, 0).await;
    let id = c.submit(spec("errs", 1, 1, 0)).await;

    // 405: JSON, with Allow.
    let reply = call_with_headers(&c, Method::PATCH, "/v1/jobs", &[], vec![]).await;
    let error = assert_json_error("PATCH /v1/jobs", &reply, 405, &["PATCH", "/v1/jobs"]);
    assert!(error.contains("GET") && error.contains("POST"), "{error}");
    let allow = reply.1["allow"].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let reply = call_with_headers(
        &c,
        Method::GET,
        &format!("/v1/jobs/{id}/cancel"),
        &[],
        vec![],
    )
    .await;
    assert_json_error("GET cancel", &reply, 405, &["allowed: POST"]);
    assert_eq!(reply.1["allow"], "POST");

    // 413: JSON, not plain text; no job made. Sent by hand: the coordinator answers as soon as it
    // reads a Content-Length over its limit, before the body (a client still writing it would
    // see a broken pipe instead of the answer). 16 MiB + 1 is over every limit.
    let (status, content_type, body) = raw_http(
        c.addr,
        &format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{{\"name\": ",
            (16 << 20) + 1
        ),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("at most"),
        "{body}"
    );

    // Query strings that do not deserialize: 400 JSON naming the parameter.
    for (method, path, word) in [
        (
            Method::POST,
            format!("/v1/jobs/{id}/cancel?checkpoint=maybe"),
            "checkpoint",
        ),
        (Method::GET, format!("/v1/jobs/{id}/logs?rank=x"), "rank"),
        (
            Method::GET,
            format!("/v1/jobs/{id}/logs?attempt=-1"),
            "attempt",
        ),
    ] {
        let reply = call_with_headers(&c, method.clone(), &path, &[], vec![]).await;
        assert_json_error(
            &format!("{method} {path}"),
            &reply,
            400,
            &[word, "query string"],
        );
    }
    assert_ne!(c.job(&id).await["state"], json!("cancelled"));

    // Duplicate JSON keys are refused, naming the key, as TOML does.
    let body = r#"{"name": "a", "name": "b", "launch": {"command": ["true"]},
        "resources": {"nodes": 1, "procs_per_node": 1}}"#;
    let reply = call_with_headers(
        &c,
        Method::POST,
        "/v1/jobs",
        &[("content-type", "application/json")],
        body.as_bytes().to_vec(),
    )
    .await;
    assert_json_error("duplicate key", &reply, 422, &["duplicate key `name`"]);
    let toml = "name = \"a\"\nname = \"b\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n";
    let reply = call_with_headers(
        &c,
        Method::POST,
        "/v1/jobs",
        &[("content-type", "application/toml")],
        toml.as_bytes().to_vec(),
    )
    .await;
    assert_json_error("duplicate TOML key", &reply, 422, &["duplicate key `name`"]);
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ids_parse_strictly() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    FakeAgent::connect(&c, 1).await.register(4, 0).await;
    let id = c.submit(spec("strict", 1, 1, 0)).await;
    assert_eq!(id, "1");
    for raw in [
        "+1",
        "1%0a",
        "%201",
        "1%20",
        "01",
        "1.0",
        "0x1",
        "%EF%BC%91", // a fullwidth digit one
        "18446744073709551616",
    ] {
        for (method, path) in [
            (Method::GET, format!("/v1/jobs/{raw}")),
            (Method::POST, format!("/v1/jobs/{raw}/cancel")),
            (Method::GET, format!("/v1/jobs/{raw}/logs")),
            (Method::GET, format!("/v1/jobs/{raw}/checkpoints")),
            (Method::POST, format!("/v1/jobs?resume_from={raw}")),
        ] {
            let body = spec("resumer", 1, 1, 0).to_string().into_bytes();
            let reply = call_with_headers(
                &c,
                method.clone(),
                &path,
                &[("content-type", "application/json")],
                body,
            )
            .await;
            assert_json_error(
                &format!("{method} {path}"),
                &reply,
                400,
                &[
                    "is not a job id",
                    "ASCII digits only, no sign, spaces or leading zeros",
                ],
            );
        }
    }
    // "0" is a well-formed id that no job has (ids start at 1).
    let reply = call_with_headers(&c, Method::GET, "/v1/jobs/0", &[], vec![]).await;
    assert_json_error("GET /v1/jobs/0", &reply, 404, &["job 0 does not exist"]);
    // Nothing above touched job 1 or made a job.
    assert_ne!(c.job("1").await["state"], json!("cancelled"));
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_path_answers_an_unknown_method_with_405_json_and_allow() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let doc = c.get("/openapi.json").await;
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 11, "{paths:?}");
    let all = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ];
    for (path, item) in paths {
        let concrete = path.replace("{id}", "1").replace("{name}", "node-1");
        let documented: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| all.iter().any(|m| m.as_str().eq_ignore_ascii_case(k)))
            .map(|k| k.to_ascii_uppercase())
            .collect();
        assert!(!documented.is_empty(), "{path}: no operations");
        let mut expected_allow = documented.clone();
        if documented.iter().any(|m| m == "GET") {
            expected_allow.push("HEAD".into());
        }
        expected_allow.sort();
        for method in all
            .iter()
            .filter(|m| !documented.iter().any(|d| d == m.as_str()))
        {
            let reply = call_with_headers(&c, method.clone(), &concrete, &[], vec![]).await;
            let what = format!("{method} {concrete}");
            assert_json_error(
                &what,
                &reply,
                405,
                &[method.as_str(), &concrete, "allowed:"],
            );
            let mut allow: Vec<String> = reply.1["allow"]
                .to_str()
                .unwrap()
                .split(',')
                .map(|m| m.trim().to_string())
                .collect();
            allow.sort();
            assert_eq!(
                allow, expected_allow,
                "{what}: Allow differs from /openapi.json"
            );
        }
        // Every operation documents its error statuses with the JSON error body.
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().expect("responses");
            for (code, response) in responses {
                if code.starts_with('4') || (code.starts_with('5') && path != "/v1/health") {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        json!("#/components/schemas/ErrorBody"),
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }
    // The submission documents its JSON body with a real schema, and every status it returns.
    let submit = &doc["paths"]["/v1/jobs"]["post"];
    let content = &submit["requestBody"]["content"];
    assert_eq!(
        content["application/json"]["schema"]["$ref"],
        json!("#/components/schemas/JobSpecBody"),
        "{content}"
    );
    assert!(content["application/toml"].is_object(), "{content}");
    let codes: Vec<&str> = submit["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for code in [
        "201", "400", "404", "409", "413", "415", "422", "500", "503",
    ] {
        assert!(
            codes.contains(&code),
            "POST /v1/jobs lacks {code}: {codes:?}"
        );
    }
    let schemas = &doc["components"]["schemas"];
    let spec = &schemas["JobSpecBody"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["name", "launch", "resources"], "{spec}");
    let resources = &schemas["ResourcesBody"]["properties"];
    for key in [
        "nodes",
        "min_nodes",
        "procs_per_node",
        "gpus_per_node",
        "cpus_per_node",
        "memory_per_node_mib",
    ] {
        assert!(
            resources[key].is_object(),
            "resources.{key} missing: {resources}"
        );
    }
    let nodes = schemas["NodeCount"]["oneOf"]
        .as_array()
        .expect("nodes: oneOf");
    assert_eq!(nodes[0]["type"], json!("integer"));
    assert_eq!(nodes[1]["type"], json!("string"));
    for (schema, keys) in [
        ("LaunchBody", &["command", "workdir", "env"][..]),
        (
            "FailureBody",
            &["max_restarts", "hang_timeout", "hang_timeout_ms"],
        ),
        (
            "CheckpointBody",
            &["dir", "signal", "grace", "grace_ms", "keep"],
        ),
    ] {
        for key in keys {
            assert!(
                schemas[schema]["properties"][key].is_object(),
                "{schema}.{key} missing"
            );
        }
    }
    // A job's detail refers to the same schema for its stored spec.
    let stored = &schemas["JobDetail"];
    assert!(
        stored
            .to_string()
            .contains("\"#/components/schemas/JobSpecBody\""),
        "{stored}"
    );
    // Bearer tokens everywhere but on the public routes; every other route documents 401/403.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "{doc}"
    );
    assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
    assert_eq!(
        doc["paths"]["/v1/health"]["get"]["security"],
        serde_json::json!([])
    );
    assert_eq!(
        doc["paths"]["/v1/join"]["post"]["security"],
        serde_json::json!([])
    );
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if path == "/v1/health" || path == "/v1/join" {
            continue;
        }
        for (method, op) in ops.as_object().unwrap() {
            for code in ["401", "403"] {
                assert!(
                    op["responses"][code].is_object(),
                    "{method} {path} does not document {code}"
                );
            }
        }
    }
    c.stop().await;
}

/// Sends `request` as it is on a new connection and reads the response to its end: status,
/// content type and body (the server closes: the request says `Connection: close`).
async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT_LIMIT, stream.read_to_end(&mut response))
        .await
        .expect("the response within the limit")
        .ok();
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// REST clients that hold every REST slot (here a body that never finishes) make other REST
/// requests wait, but never the agents: heartbeats and registrations have their own allowance.
#[tokio::test]
async fn a_flood_of_rest_requests_does_not_starve_the_agents() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let c = start_tuned(dir.path(), None, |config| config.max_rest_requests = 1).await;
    // The one REST slot: a submission whose chunked body stops half-way.
    let mut hog = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    hog.write_all(
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"nam\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = c
        .http
        .get(format!("http://{}/v1/nodes", c.addr))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(
        waiting.as_ref().is_err_and(|e| e.is_timeout()),
        "a second REST request was served while the only slot was held: {waiting:?}"
    );
    // The agents are served at once.
    let mut agent = FakeAgent::connect(&c, 1).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), agent.register(4, 0))
        .await
        .expect("registration waited behind REST clients");
    tokio::time::timeout(Duration::from_secs(5), agent.heartbeat(vec![], vec![]))
        .await
        .expect("a heartbeat waited behind REST clients");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Once the hog goes, REST is served again.
    drop(hog);
    let (status, nodes) = c
        .call(reqwest::Method::GET, "/v1/nodes", None, vec![])
        .await;
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(nodes[0]["name"], "node-1");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_retried_with_its_idempotency_key_makes_one_job() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    agent.register(8, 0).await;
    let body = |name: &str| spec(name, 1, 1, 0).to_string().into_bytes();
    let submit = |key: &'static str, name: &'static str| submit_on(&c, key, body(name));
    let replayed = |headers: &reqwest::header::HeaderMap| {
        headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap().to_string())
    };

    let (status, headers, first) = submit("key-1", "train").await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(replayed(&headers), None);
    for _ in 0..3 {
        let (status, headers, again) = submit("key-1", "train").await;
        assert_eq!(status, 201, "{again}");
        assert_eq!(again, first, "a retry answers the first job");
        assert_eq!(replayed(&headers).as_deref(), Some("true"));
    }
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 1);

    // Retries racing each other still make one job.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url) = (c.http.clone(), c.url("/v1/jobs"));
        tasks.spawn(async move {
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", "key-2")
                .body(spec("eval", 1, 1, 0).to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers, response.json::<Value>().await.unwrap())
        });
    }
    let racing = tasks.join_all().await;
    let ids: std::collections::BTreeSet<String> = racing
        .iter()
        .map(|(status, _, body)| {
            assert_eq!(*status, 201, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{racing:?}");
    assert_eq!(
        racing
            .iter()
            .filter(|(_, h, _)| replayed(h).is_none())
            .count(),
        1,
        "one of them made the job"
    );
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 2);

    // The same key with another spec is refused.
    assert_json_error(
        "a reused key",
        &submit("key-1", "other").await,
        409,
        &[
            "Idempotency-Key",
            "key-1",
            "different request",
            &format!("job {}", first["id"].as_str().unwrap()),
        ],
    );
    // Malformed keys.
    let long = "k".repeat(129);
    for bad in ["", " ", "a\tb", long.as_str()] {
        assert_json_error(
            &format!("key {bad:?}"),
            &call_with_headers(
                &c,
                Method::POST,
                "/v1/jobs",
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", bad),
                ],
                body("train"),
            )
            .await,
            400,
            &["Idempotency-Key", "printable ASCII"],
        );
    }
    assert_json_error(
        "two keys",
        &call_with_headers(
            &c,
            Method::POST,
            "/v1/jobs",
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "key-3"),
                ("idempotency-key", "key-4"),
            ],
            body("train"),
        )
        .await,
        400,
        &["one Idempotency-Key"],
    );
    // Without a key every submission is a new job.
    c.submit(spec("train", 1, 1, 0)).await;
    c.submit(spec("train", 1, 1, 0)).await;
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 4);
    // The OpenAPI document describes the header.
    let openapi = c.get("/openapi.json").await;
    let post = &openapi["paths"]["/v1/jobs"]["post"];
    assert!(
        post["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header"),
        "{post}"
    );
    assert!(post["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
    drop(agent);
    c.stop().await;

    // The keys are in the replicated state: a retry after a restart still answers the first job.
    let c = start(dir.path(), None).await;
    let (status, headers, again) = submit_on(&c, "key-1", body("train")).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again, first);
    assert_eq!(replayed(&headers).as_deref(), Some("true"));
    assert_eq!(c.get("/v1/jobs").await.as_array().unwrap().len(), 4);
    c.stop().await;
}

async fn submit_on(
    c: &Running,
    key: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    call_with_headers(
        c,
        reqwest::Method::POST,
        "/v1/jobs",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", key),
        ],
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_shows_the_single_voter_leading_with_no_lag() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), None).await;
    let (status, before) = c
        .call(reqwest::Method::GET, "/v1/cluster", None, vec![])
        .await;
    assert_eq!(status, 200, "{before}");
    let health = c.get("/v1/health").await;
    let me = health["server_id"].as_u64().expect("a server id");
    assert_eq!(before["this_server"], json!(me), "{before}");
    assert_eq!(before["leader"]["id"], json!(me), "{before}");
    assert!(before["leader"]["address"].is_string(), "{before}");
    assert!(before["cluster_id"].is_string(), "{before}");
    let term = before["term"].as_u64().expect("a term");
    assert!(term >= 1, "{before}");
    let last = before["last_log_index"].as_u64().expect("a last log index");
    let applied = before["last_applied_index"]
        .as_u64()
        .expect("an applied index");
    assert!(applied <= last, "{before}");
    let members = before["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{before}");
    let m = &members[0];
    assert_eq!(m["id"], json!(me));
    assert_eq!(m["address"], before["leader"]["address"]);
    assert_eq!(m["role"], json!("leader"));
    assert_eq!(m["voter"], json!(true));
    assert_eq!(m["this_server"], json!(true));
    assert_eq!(m["lag"], json!(0), "{before}");
    assert_eq!(m["last_log_index"], json!(last));

    // A write (a node registers) moves the indices on; the term stays.
    FakeAgent::connect(&c, 1).await.register(4, 0).await;
    let after = c.get("/v1/cluster").await;
    assert_eq!(after["term"], json!(term), "{after}");
    assert!(after["last_log_index"].as_u64().unwrap() > last, "{after}");
    assert!(
        after["last_applied_index"].as_u64().unwrap() > applied,
        "{after}"
    );
    assert_eq!(after["members"][0]["lag"], json!(0), "{after}");

    // It is in the OpenAPI document, with its schema and the token's 401/403.
    let doc = c.get("/openapi.json").await;
    let op = &doc["paths"]["/v1/cluster"]["get"];
    assert!(op["responses"]["200"].is_object(), "{op}");
    assert!(op["responses"]["401"].is_object() && op["responses"]["403"].is_object());
    for schema in ["ClusterView", "MemberView", "ServerRef"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    c.stop().await;
}
