//! The replicated control plane with real processes: three `trainctl coordinator`s (TLS and
//! tokens on, as in production) that bootstrap and join, agents and the CLI given the member
//! list, and faults: the leader killed under a submission load, a job through five failovers, a
//! follower restarted, a member's disk wiped and the member replaced, joins that must fail.
//! Five voters too (by hand and with `trainctl dev --coordinators 5`): two lost (the leader
//! among them) lose no write, a third lost refuses writes, and one restarted resumes them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    eventually, free_port, free_port_on, job_file, lock_cluster_addresses, nodes_up, signal,
    start_with_env, trainctl, Proc,
};
use serde_json::Value;

/// N coordinators on 127.0.0.1 (the first bootstraps, the others join it) and agents on
/// 127.0.0.2, ... given every coordinator's address.
struct Group {
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    /// Agents first: dropped (stopped) before the coordinators.
    agents: Vec<Proc>,
    coordinators: Vec<Option<Proc>>,
    /// The data dir of each coordinator slot (a replaced member gets a new one).
    data_dirs: Vec<PathBuf>,
    /// Extra flags of every coordinator.
    flags: Vec<String>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Group {
    fn start(n: usize, agents: u32) -> Group {
        Group::start_with(n, agents, &[])
    }

    fn start_with(n: usize, agents: u32, flags: &[&str]) -> Group {
        Group::start_on(&vec!["127.0.0.1"; n], agents, flags)
    }

    /// A group of `hosts.len()` coordinators, coordinator `i` on loopback address `hosts[i]` (at
    /// a port free there).
    fn start_on(hosts: &[&str], agents: u32, flags: &[&str]) -> Group {
        let lock = lock_cluster_addresses();
        let dir = tempfile::tempdir().unwrap();
        let n = hosts.len();
        let addrs: Vec<String> = hosts
            .iter()
            .map(|ip| format!("{ip}:{}", free_port_on(ip)))
            .collect();
        let data_dirs = (0..n).map(|i| dir.path().join(format!("c{i}"))).collect();
        let mut group = Group {
            dir,
            addrs,
            agents: Vec::new(),
            coordinators: (0..n).map(|_| None).collect(),
            data_dirs,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            _lock: lock,
        };
        group.start_coordinator(0);
        eventually(Duration::from_secs(30), "the admin token", || {
            group.admin_token_file().exists().then_some(())
        });
        for i in 1..n {
            group.start_coordinator(i);
        }
        group.wait_voters(n);
        if agents > 0 {
            let token = group.cli(&["token", "create", "--role", "agent"]);
            assert!(token.status.success(), "{token:?}");
            let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
            for i in 1..=agents {
                group.start_agent(i, &token);
            }
            eventually(Duration::from_secs(60), "every agent up", || {
                let nodes: Value =
                    serde_json::from_slice(&group.cli(&["nodes", "-o", "json"]).stdout).ok()?;
                (nodes_up(&nodes)? == agents as usize).then_some(())
            });
        }
        group
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("cluster.log")
    }

    fn ca_cert(&self) -> PathBuf {
        self.data_dirs[0].join("tls").join("ca.pem")
    }

    fn admin_token_file(&self) -> PathBuf {
        self.data_dirs[0].join("admin.token")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.admin_token_file())
            .unwrap()
            .trim()
            .to_string()
    }

    fn urls(&self) -> String {
        self.addrs
            .iter()
            .map(|a| format!("https://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts coordinator `i` on its data dir: the first bootstraps, the others join the
    /// first (a no-op check once their data dir holds the cluster).
    fn start_coordinator(&mut self, i: usize) {
        let data = self.data_dirs[i].display().to_string();
        let mut args = vec![
            "coordinator".to_string(),
            "--data-dir".into(),
            data,
            "--listen".into(),
            self.addrs[i].clone(),
        ];
        args.extend(self.flags.iter().cloned());
        let token = self.token_if_written();
        if i > 0 {
            let others: Vec<String> = self
                .addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| a.clone())
                .collect();
            args.extend([
                "--join".into(),
                others.join(","),
                "--ca-cert".into(),
                self.ca_cert().display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| ("TRAINCTL_TOKEN", t))
            .into_iter()
            .collect();
        self.coordinators[i] = Some(start_with_env(&args, &env, &self.log()));
    }

    fn token_if_written(&self) -> Option<String> {
        std::fs::read_to_string(self.admin_token_file())
            .ok()
            .map(|t| t.trim().to_string())
    }

    fn start_agent(&mut self, i: u32, join_token: &str) {
        let name = format!("host-{i}");
        let data = self.dir.path().join(format!("agent-{i}"));
        let ports = format!("{}-{}", 29500 + i * 100, 29599 + i * 100);
        let advertise = format!("127.0.0.{}", i + 1);
        let urls = self.urls();
        let ca = self.ca_cert();
        let args = [
            "agent",
            "--coordinator",
            &urls,
            "--ca-cert",
            ca.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            &name,
            "--advertise-addr",
            &advertise,
            "--port-range",
            &ports,
        ];
        let agent = start_with_env(&args, &[("TRAINCTL_JOIN_TOKEN", join_token)], &self.log());
        self.agents.push(agent);
    }

    /// SIGKILLs coordinator `i` (its host lost at once).
    fn kill(&mut self, i: usize) {
        let mut proc = self.coordinators[i].take().expect("coordinator runs");
        signal(proc.0.id(), libc::SIGKILL);
        let _ = proc.0.wait();
        std::mem::forget(proc);
    }

    fn command(&self, addr: &str) -> Command {
        let mut cmd = Command::new(trainctl());
        cmd.env("TRAINCTL_ADDR", addr)
            .env("TRAINCTL_TOKEN", self.token())
            .env("TRAINCTL_CA_CERT", self.ca_cert())
            .env("TRAINCTL_CONFIG", "/nonexistent/trainctl-config.toml")
            .stdin(Stdio::null());
        cmd
    }

    /// `trainctl ARGS` given every coordinator.
    fn cli(&self, args: &[&str]) -> Output {
        self.command(&self.urls()).args(args).output().unwrap()
    }

    /// `trainctl ARGS` given only coordinator `i`.
    fn cli_at(&self, i: usize, args: &[&str]) -> Output {
        self.command(&format!("https://{}", self.addrs[i]))
            .args(args)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "trainctl {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `GET path` on coordinator `i` with curl (a client no one here wrote).
    fn curl(&self, i: usize, path: &str) -> (u16, Value) {
        curl_answer(&self.curl_command(i, "GET", path).output().unwrap())
    }

    /// `curl -X METHOD` of `path` on coordinator `i` with the admin token, at most 20 s; more
    /// arguments (headers, a body) may be added. [`curl_answer`] reads its output.
    fn curl_command(&self, i: usize, method: &str, path: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--cacert",
        ])
        .arg(self.ca_cert())
        .args(["-H", &format!("Authorization: Bearer {}", self.token())])
        .arg(format!("https://{}{path}", self.addrs[i]))
        .stdin(Stdio::null());
        cmd
    }

    /// The Raft server id of the member serving at coordinator slot `i`'s address now.
    fn member_id(&self, i: usize) -> u64 {
        let view = self.json(&["cluster", "-o", "json"]);
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["address"] == self.addrs[i].as_str())
            .unwrap_or_else(|| panic!("no member at {}: {view}", self.addrs[i]))["id"]
            .as_u64()
            .unwrap()
    }

    /// The index of the leading coordinator, as the live ones report it.
    fn leader(&self) -> usize {
        eventually(Duration::from_secs(30), "a leader", || {
            let view: Value =
                serde_json::from_slice(&self.cli(&["cluster", "-o", "json"]).stdout).ok()?;
            let addr = view["leader"]["address"].as_str()?.to_string();
            let i = self.addrs.iter().position(|a| *a == addr)?;
            self.coordinators[i].is_some().then_some(i)
        })
    }

    /// Waits until the group has `n` voters, none lagging.
    fn wait_voters(&self, n: usize) {
        eventually(
            Duration::from_secs(60),
            &format!("{n} voters caught up"),
            || {
                let view: Value =
                    serde_json::from_slice(&self.cli(&["cluster", "-o", "json"]).stdout).ok()?;
                let members = view["members"].as_array()?;
                let voters = members.iter().filter(|m| m["voter"] == true).count();
                let caught_up = members.iter().all(|m| m["lag"] == 0);
                (voters == n && caught_up).then_some(())
            },
        );
    }

    /// Job names in the state, with how often each occurs.
    fn job_names(&self) -> BTreeMap<String, Vec<String>> {
        by_name(&self.json(&["list", "-o", "json"]))
    }
}

/// The status and JSON body of a curl run by [`Group::curl_command`] (status 0 and `null` when
/// it got no answer).
fn curl_answer(out: &Output) -> (u16, Value) {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The ids of a job listing (`GET /v1/jobs`, `trainctl list -o json`) by job name.
fn by_name(jobs: &Value) -> BTreeMap<String, Vec<String>> {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for job in jobs
        .as_array()
        .unwrap_or_else(|| panic!("not a job list: {jobs}"))
    {
        names
            .entry(job["name"].as_str().unwrap().to_string())
            .or_default()
            .push(job["id"].to_string().trim_matches('"').to_string());
    }
    names
}

fn short_job(dir: &Path, name: &str) -> PathBuf {
    job_file(
        dir,
        name,
        &format!(
            "name = \"{name}\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        ),
    )
}

#[test]
fn any_coordinator_takes_any_request_and_reads_are_linearizable() {
    let group = Group::start(3, 1);
    let leader = group.leader();
    let follower = (leader + 1) % 3;
    // A write through a follower is forwarded to the leader, in one hop, transparently.
    let job = short_job(group.dir.path(), "via-follower");
    let out = group.cli_at(follower, &["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // Read right after from the other follower: the write is there (linearizable).
    let other = 3 - leader - follower;
    let (status, jobs) = group.curl(other, "/v1/jobs");
    assert_eq!(status, 200, "{jobs}");
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["name"] == "via-follower"),
        "{jobs}"
    );
    // ?stale answers from the follower's own state; it too catches up.
    eventually(
        Duration::from_secs(10),
        "the stale read to see the job",
        || {
            let (status, jobs) = group.curl(other, "/v1/jobs?stale");
            (status == 200 && jobs.to_string().contains("via-follower")).then_some(())
        },
    );
    // ?local shows the follower's own view of the group.
    let (_, view) = group.curl(other, "/v1/cluster?local");
    assert_eq!(
        view["this_server"],
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["this_server"] == true)
            .unwrap()["id"]
    );
    // Every coordinator agrees on the leader and the cluster id.
    let ids: Vec<Value> = (0..3)
        .map(|i| group.curl(i, "/v1/health").1["cluster_id"].clone())
        .collect();
    assert!(
        ids[0].is_string() && ids.iter().all(|id| *id == ids[0]),
        "{ids:?}"
    );
    // A removed-then-unknown path, a bad token: answered like on a single coordinator.
    let out = group
        .command(&format!("https://{}", group.addrs[follower]))
        .env("TRAINCTL_TOKEN", "tctl_nope_nope")
        .args(["list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{out:?}"
    );
}

#[test]
fn the_leader_killed_under_a_submission_load_loses_and_doubles_nothing() {
    let mut group = Group::start(3, 1);
    let dir = group.dir.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    // name -> the id the CLI was told, for every acknowledged submission.
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Default::default();
    let attempted: Arc<Mutex<Vec<String>>> = Default::default();
    let load = {
        let (stop, acked, attempted) = (stop.clone(), acked.clone(), attempted.clone());
        let (urls, token, ca) = (group.urls(), group.token(), group.ca_cert());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("load-{n}");
                let file = short_job(&dir, &name);
                attempted.lock().unwrap().push(name.clone());
                let out = Command::new(trainctl())
                    .args(["submit", file.to_str().unwrap(), "-o", "json"])
                    .env("TRAINCTL_ADDR", &urls)
                    .env("TRAINCTL_TOKEN", &token)
                    .env("TRAINCTL_CA_CERT", &ca)
                    .env("TRAINCTL_CONFIG", "/nonexistent/trainctl-config.toml")
                    .output()
                    .unwrap();
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    let id = v["id"].to_string().trim_matches('"').to_string();
                    acked.lock().unwrap().insert(name, id);
                }
            }
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        let leader = group.leader();
        group.kill(leader);
        // The survivors elect a leader and take writes again.
        let before = acked.lock().unwrap().len();
        eventually(
            Duration::from_secs(20),
            "writes to resume after the kill",
            || (acked.lock().unwrap().len() > before + 2).then_some(()),
        );
        group.start_coordinator(leader);
        group.wait_voters(3);
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "too few submissions went through: {}",
        acked.len()
    );
    let names = group.job_names();
    for (name, id) in &acked {
        assert_eq!(
            names.get(name),
            Some(&vec![id.clone()]),
            "acknowledged submission {name} (job {id}) must exist exactly once"
        );
    }
    for (name, ids) in &names {
        assert_eq!(ids.len(), 1, "{name} exists {} times: {ids:?}", ids.len());
    }
    // Every coordinator holds the same jobs.
    group.wait_voters(3);
    let counts: Vec<usize> = (0..3)
        .map(|i| {
            let (status, jobs) = group.curl(i, "/v1/jobs?stale");
            assert_eq!(status, 200);
            jobs.as_array().unwrap().len()
        })
        .collect();
    assert!(
        counts.iter().all(|c| *c == names.len()),
        "{counts:?} vs {}",
        names.len()
    );
}

#[test]
fn a_job_runs_through_five_leader_failovers_and_keeps_every_log_line() {
    let mut group = Group::start(3, 2);
    let lines = 80;
    let job = job_file(
        group.dir.path(),
        "chatty",
        &format!(
            "name = \"chatty\"\n[launch]\ncommand = [\"sh\", \"-c\", \"for i in $(seq 1 {lines}); do echo line-$i; sleep 0.3; done\"]\n[resources]\nnodes = 2\nprocs_per_node = 1\n"
        ),
    );
    let out = group.cli(&["submit", job.to_str().unwrap(), "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"]
        .to_string()
        .trim_matches('"')
        .to_string();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(3));
        let leader = group.leader();
        group.kill(leader);
        group.leader();
        group.start_coordinator(leader);
    }
    let job = eventually(Duration::from_secs(120), "the job to end", || {
        let job = group.json(&["status", &id, "-o", "json"]);
        matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(job)
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 0,
        "no restart: the ranks never noticed: {job}"
    );
    let out = group.cli(&["logs", &id]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for rank in 0..2 {
        for i in 1..=lines {
            let line = format!("rank {rank}] line-{i}\n");
            assert_eq!(
                text.matches(&line).count(),
                1,
                "rank {rank} line-{i} must be in the logs exactly once:\n{text}"
            );
        }
    }
}

#[test]
fn a_restarted_follower_catches_up_and_a_wiped_member_is_replaced() {
    let mut group = Group::start(3, 1);
    let leader = group.leader();
    let follower = (leader + 1) % 3;
    group.kill(follower);
    for n in 0..5 {
        let job = short_job(group.dir.path(), &format!("while-down-{n}"));
        let out = group.cli(&["submit", job.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }
    let term_before = group.json(&["cluster", "-o", "json"])["term"].as_u64();
    let started = Instant::now();
    group.start_coordinator(follower);
    eventually(
        Duration::from_secs(30),
        "the restarted follower to catch up",
        || {
            let (status, jobs) = group.curl(follower, "/v1/jobs?stale");
            (status == 200 && jobs.as_array()?.len() == 5).then_some(())
        },
    );
    eprintln!("restarted follower caught up in {:?}", started.elapsed());
    // It came back with an older log and listened before it could campaign: no election, the
    // same leader in the same term (raft/elections.rs).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        group.leader(),
        leader,
        "the returning member disturbed the leader"
    );
    let term_after = group.json(&["cluster", "-o", "json"])["term"].as_u64();
    assert!(term_before.is_some(), "the cluster view has a term");
    assert_eq!(
        term_after, term_before,
        "an election ran while the member came back"
    );

    // A member's disk is lost: remove it, and join a new server in its place.
    let lost_id = group.member_id(follower);
    group.kill(follower);
    std::fs::remove_dir_all(&group.data_dirs[follower]).unwrap();
    // Joining at the address of a member that is still listed is refused with what to do.
    group.start_coordinator(follower);
    let refused = eventually(Duration::from_secs(30), "the join to be refused", || {
        let proc = group.coordinators[follower].as_mut()?;
        proc.0.try_wait().ok().flatten()
    });
    assert!(!refused.success());
    let log = std::fs::read_to_string(group.log()).unwrap();
    assert!(
        log.contains("cluster remove"),
        "the refusal says how to replace: {log}"
    );
    group.coordinators[follower] = None;
    std::fs::remove_dir_all(&group.data_dirs[follower]).ok();
    let out = group.cli(&["cluster", "remove", &lost_id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    // Membership changes are in the audit trail, with who made them.
    let audit = group.json(&["audit", "-o", "json"]).to_string();
    assert!(
        audit.contains(&format!("remove coordinator {lost_id}")),
        "{audit}"
    );
    assert!(
        audit.contains("is already a member"),
        "the refused grant too: {audit}"
    );
    group.start_coordinator(follower);
    group.wait_voters(3);
    let view = group.json(&["cluster", "-o", "json"]);
    let ids: Vec<u64> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&lost_id) && ids.len() == 3, "{view}");
    let (status, jobs) = group.curl(follower, "/v1/jobs?stale");
    assert_eq!(
        (status, jobs.as_array().map(Vec::len)),
        (200, Some(5)),
        "{jobs}"
    );

    // Leadership handed over on request.
    let target = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] != "leader")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let out = group.cli(&[
        "cluster",
        "transfer-leader",
        &target.to_string(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(10), "the new leader", || {
        let view = group.json(&["cluster", "-o", "json"]);
        (view["leader"]["id"] == target).then_some(())
    });

    // A member removed while it runs can not disturb the others: its elections (higher terms)
    // are refused, so the leader and the term stay.
    let view = group.json(&["cluster", "-o", "json"]);
    let removed = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] != "leader")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let out = group.cli(&["cluster", "remove", &removed.to_string()]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_secs(4));
    let after = group.json(&["cluster", "-o", "json"]);
    assert_eq!(after["leader"]["id"], target, "{after}");
    assert_eq!(
        after["term"], view["term"],
        "no election was forced: {after}"
    );
    assert_eq!(after["members"].as_array().unwrap().len(), 2, "{after}");
    let job = short_job(group.dir.path(), "after-removal");
    let out = group.cli(&["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn joins_that_can_not_work_say_why() {
    let _lock = lock_cluster_addresses();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| -> Output {
        let mut cmd = Command::new(trainctl());
        cmd.args(args)
            .env_remove("TRAINCTL_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{args:?} did not exit"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).to_string();
    // Cluster A.
    let a = dir.path().join("a");
    let a_addr = format!("127.0.0.1:{}", free_port());
    let _a = common::start(
        &[
            "coordinator",
            "--data-dir",
            a.to_str().unwrap(),
            "--listen",
            &a_addr,
        ],
        &dir.path().join("a.log"),
    );
    eventually(Duration::from_secs(30), "A's token", || {
        a.join("admin.token").exists().then_some(())
    });
    let a_token = std::fs::read_to_string(a.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let a_ca = a.join("tls").join("ca.pem");
    let listen = format!("127.0.0.1:{}", free_port());
    let fresh = dir.path().join("fresh");
    let join = |target: &str| {
        vec![
            "coordinator".to_string(),
            "--data-dir".into(),
            fresh.display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--join".into(),
            target.to_string(),
            "--ca-cert".into(),
            a_ca.display().to_string(),
        ]
    };
    // Nothing listens there.
    let nobody = format!("127.0.0.1:{}", free_port());
    let args = join(&nobody);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args, &[("TRAINCTL_TOKEN", &a_token)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach a coordinator"),
        "{}",
        stderr(&out)
    );
    // No token.
    let args = join(&a_addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admin token"), "{}", stderr(&out));
    // A token that is not an admin's.
    let read = Command::new(trainctl())
        .args(["token", "create", "--role", "read"])
        .env("TRAINCTL_ADDR", &a_addr)
        .env("TRAINCTL_TOKEN", &a_token)
        .env("TRAINCTL_CA_CERT", &a_ca)
        .env("TRAINCTL_CONFIG", "/nonexistent/trainctl-config.toml")
        .output()
        .unwrap();
    let read = String::from_utf8(read.stdout).unwrap().trim().to_string();
    let out = run(&args, &[("TRAINCTL_TOKEN", &read)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refused to let this server join"),
        "{}",
        stderr(&out)
    );
    // Cluster B's data dir can not join A.
    let b = dir.path().join("b");
    let b_addr = format!("127.0.0.1:{}", free_port());
    {
        let _b = common::start(
            &[
                "coordinator",
                "--data-dir",
                b.to_str().unwrap(),
                "--listen",
                &b_addr,
            ],
            &dir.path().join("b.log"),
        );
        eventually(Duration::from_secs(30), "B's token", || {
            b.join("admin.token").exists().then_some(())
        });
    }
    let out = run(
        &[
            "coordinator",
            "--data-dir",
            b.to_str().unwrap(),
            "--listen",
            &b_addr,
            "--join",
            &a_addr,
            "--ca-cert",
            a_ca.to_str().unwrap(),
        ],
        &[("TRAINCTL_TOKEN", &a_token)],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a data dir belongs to one cluster"),
        "{}",
        stderr(&out)
    );
}

/// Three network namespaces joined by a bridge in the root namespace (10.77.N.1-3, the root at
/// .254), so a test can cut one coordinator's host off the network. Removed when dropped.
struct Net {
    tag: String,
    subnet: String,
}

impl Net {
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    fn new() -> Net {
        let pid = std::process::id();
        let tag = format!("tc{}", pid % 100_000);
        let subnet = format!("10.77.{}", pid % 250);
        let net = Net { tag, subnet };
        let bridge = format!("{}br", net.tag);
        Net::ip(&["link", "add", &bridge, "type", "bridge"]);
        Net::ip(&[
            "addr",
            "add",
            &format!("{}.254/24", net.subnet),
            "dev",
            &bridge,
        ]);
        Net::ip(&["link", "set", &bridge, "up"]);
        for i in 1..=3 {
            let ns = net.ns(i);
            let (host, inner) = (format!("{}h{i}", net.tag), format!("{}n{i}", net.tag));
            Net::ip(&["netns", "add", &ns]);
            Net::ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            Net::ip(&["link", "set", &inner, "netns", &ns]);
            Net::ip(&["link", "set", &host, "master", &bridge]);
            Net::ip(&["link", "set", &host, "up"]);
            let addr = format!("{}/24", net.addr(i));
            Net::ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            Net::ip(&["-n", &ns, "link", "set", &inner, "up"]);
            Net::ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn ns(&self, i: usize) -> String {
        format!("{}ns{i}", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.subnet)
    }

    /// Cuts host `i` off the others (and off the root namespace), or joins it again.
    fn set_connected(&self, i: usize, up: bool) {
        let host = format!("{}h{i}", self.tag);
        Net::ip(&["link", "set", &host, if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=3 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.tag)])
            .output();
    }
}

#[test]
fn a_partitioned_leader_can_not_commit_and_steps_down_after_healing() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let _lock = lock_cluster_addresses();
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new();
    let log = dir.path().join("cluster.log");
    let data = |i: usize| dir.path().join(format!("c{i}"));
    let listen = |i: usize| format!("{}:7470", net.addr(i));
    let ca = data(1).join("tls").join("ca.pem");
    // Coordinator i in namespace i.
    let start = |i: usize, token: Option<&str>| -> Proc {
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            net.ns(i),
            trainctl().display().to_string(),
            "coordinator".into(),
            "--data-dir".into(),
            data(i).display().to_string(),
            "--listen".into(),
            listen(i),
        ];
        if i > 1 {
            args.extend([
                "--join".into(),
                listen(1),
                "--ca-cert".into(),
                ca.display().to_string(),
            ]);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(t) = token {
            cmd.env("TRAINCTL_TOKEN", t);
        }
        Proc(cmd.spawn().unwrap())
    };
    let mut coordinators = vec![start(1, None)];
    eventually(Duration::from_secs(30), "the admin token", || {
        data(1).join("admin.token").exists().then_some(())
    });
    let token = std::fs::read_to_string(data(1).join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    coordinators.push(start(2, Some(&token)));
    coordinators.push(start(3, Some(&token)));
    // curl from namespace `from` (0: the root) to coordinator `to`.
    let curl = |from: usize,
                to: usize,
                method: &str,
                path: &str,
                body: Option<(&str, &str)>|
     -> (u16, String) {
        let mut args: Vec<String> = Vec::new();
        if from > 0 {
            args.extend(["ip".into(), "netns".into(), "exec".into(), net.ns(from)]);
        }
        args.extend([
            "curl".into(),
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "-w".into(),
            "\n%{http_code}".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "-H".into(),
            format!("Authorization: Bearer {token}"),
            "-X".into(),
            method.into(),
        ]);
        if let Some((content_type, b)) = body {
            args.extend([
                "-H".into(),
                format!("Content-Type: {content_type}"),
                "--data-binary".into(),
                b.into(),
            ]);
        }
        args.push(format!("https://{}{path}", listen(to)));
        let out = Command::new(&args[0]).args(&args[1..]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    };
    let leader_seen_by = |from: usize, to: usize| -> Option<usize> {
        let (status, body) = curl(from, to, "GET", "/v1/cluster?local", None);
        let view: Value = serde_json::from_str(&body).ok()?;
        let addr = view["leader"]["address"].as_str()?;
        (status == 200).then(|| (1..=3).find(|i| listen(*i) == addr))?
    };
    eventually(Duration::from_secs(60), "three voters", || {
        let (_, body) = curl(0, 1, "GET", "/v1/cluster", None);
        let view: Value = serde_json::from_str(&body).ok()?;
        let voters = view["members"]
            .as_array()?
            .iter()
            .filter(|m| m["voter"] == true)
            .count();
        (voters == 3).then_some(())
    });
    let old = leader_seen_by(0, 1).expect("a leader");
    let majority: Vec<usize> = (1..=3).filter(|i| *i != old).collect();
    net.set_connected(old, false);
    // The majority elects a new leader among themselves.
    let new = eventually(
        Duration::from_secs(20),
        "a new leader on the majority side",
        || leader_seen_by(0, majority[0]).filter(|l| majority.contains(l)),
    );
    // The old leader's own clients get errors, never a stale success: it can not commit...
    let minority = serde_json::json!({ "name": "minority", "role": "read" }).to_string();
    let (status, body) = curl(
        old,
        old,
        "POST",
        "/v1/tokens",
        Some(("application/json", &minority)),
    );
    assert_eq!(status, 503, "a write on the cut-off leader: {body}");
    // ... nor confirm it still leads for a read.
    let (status, body) = curl(old, old, "GET", "/v1/jobs", None);
    assert_eq!(status, 503, "a read on the cut-off leader: {body}");
    // The majority takes writes, through either member.
    let token = serde_json::json!({ "name": "after-split", "role": "read" }).to_string();
    let (status, body) = curl(
        0,
        majority[1],
        "POST",
        "/v1/tokens",
        Some(("application/json", &token)),
    );
    assert_eq!(status, 201, "a write on the majority side: {body}");
    // Heal: the old leader steps down and follows the new one; one leader in all.
    net.set_connected(old, true);
    eventually(
        Duration::from_secs(30),
        "the old leader to follow the new one",
        || (leader_seen_by(old, old)? == new).then_some(()),
    );
    for i in 1..=3 {
        assert_eq!(
            leader_seen_by(0, i),
            Some(new),
            "server {i} agrees on the leader"
        );
    }
    // The minority's write never happened; the majority's reached the old leader too.
    let (status, body) = curl(0, new, "GET", "/v1/tokens", None);
    assert_eq!(status, 200);
    assert!(!body.contains("\"minority\""), "{body}");
    eventually(
        Duration::from_secs(20),
        "the old leader to catch up",
        || {
            let (status, body) = curl(0, old, "GET", "/v1/tokens?stale", None);
            (status == 200 && body.contains("after-split")).then_some(())
        },
    );
    drop(coordinators);
}

#[test]
fn a_member_that_caught_up_from_a_snapshot_fills_in_the_logs_it_lacks() {
    // Snapshots every 20 entries, so a new member catches up from one (and gets no log files).
    let mut group = Group::start_with(3, 1, &["--snapshot-logs", "20"]);
    let lines = 40;
    let job = job_file(
        group.dir.path(),
        "chatty",
        &format!(
            "name = \"chatty\"\n[launch]\ncommand = [\"sh\", \"-c\", \"for i in $(seq 1 {lines}); do echo line-$i; sleep 0.05; done\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"
        ),
    );
    let out = group.cli(&["submit", job.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{out:?}");
    // Enough later writes for the log holding the job's output to be snapshotted and purged.
    for n in 0..30 {
        let out = group.cli(&[
            "token",
            "create",
            "--role",
            "read",
            "--name",
            &format!("filler-{n}"),
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    // Replace a follower: it joins empty and catches up from a snapshot.
    let leader = group.leader();
    let follower = (leader + 1) % 3;
    let old_id = group.member_id(follower).to_string();
    group.kill(follower);
    let out = group.cli(&["cluster", "remove", &old_id]);
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_dir_all(&group.data_dirs[follower]).unwrap();
    group.start_coordinator(follower);
    group.wait_voters(3);
    // The entries that carried the job's output were purged behind a snapshot before the new
    // member joined: it got the state from the snapshot, and fills in the log files from the
    // others in the background, before anyone reads them.
    let job_logs = group.data_dirs[follower].join("logs").join("job-1");
    let leader_logs = group.data_dirs[leader].join("logs").join("job-1");
    let rank_file = |dir: &Path| std::fs::read(dir.join("attempt-0").join("rank-0.log")).ok();
    let expected = rank_file(&leader_logs).expect("the leader's copy of the log");
    eventually(
        Duration::from_secs(30),
        "the new member to fill in the log",
        || (rank_file(&job_logs)? == expected).then_some(()),
    );
    let log = std::fs::read_to_string(group.log()).unwrap();
    assert!(
        log.contains("rank logs complete after installing a snapshot"),
        "the new member caught up from a snapshot"
    );
    // It leads, and answers the logs in full: it fetched what it lacked from the others.
    let new_id = group.member_id(follower).to_string();
    let out = group.cli(&["cluster", "transfer-leader", &new_id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(group.leader(), follower);
    let out = group.cli(&["logs", "1"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 1..=lines {
        assert_eq!(
            text.matches(&format!("line-{i}\n")).count(),
            1,
            "line-{i} exactly once:\n{text}"
        );
    }
}

#[test]
fn dev_runs_three_coordinators_and_the_cli_survives_losing_one() {
    let dev = common::DevCluster::start_with(1, &["--coordinators", "3"], &[]);
    // The CLI as a user runs it: the context `dev` wrote, no address given.
    let cli = |args: &[&str]| dev.cli_from_context(args);
    let config = std::fs::read_to_string(dev.config_file()).unwrap();
    assert_eq!(config.matches("https://127.0.0.1:").count(), 3, "{config}");
    let out = cli(&["cluster", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let voters = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .count();
    assert_eq!(voters, 3, "{view}");
    // Kill the first coordinator (the one the context lists first, and the first leader).
    let marker = format!(
        "{} --listen",
        dev.data_dir
            .path()
            .join("cluster")
            .join("coordinator")
            .display()
    );
    let pids = common::processes_with(&marker);
    assert_eq!(pids.len(), 1, "{marker}: {pids:?}");
    signal(pids[0], libc::SIGKILL);
    let job = short_job(dev.data_dir.path(), "after-a-coordinator-died");
    let out = cli(&["submit", job.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{out:?}");
}

/// The five-voter group's coordinators: loopback addresses no other test listens on.
const FIVE_HOSTS: [&str; 5] = [
    "127.0.0.71",
    "127.0.0.72",
    "127.0.0.73",
    "127.0.0.74",
    "127.0.0.75",
];

/// The id `trainctl submit -o json` printed; panics with its error if it failed.
fn submitted_id(out: &Output) -> String {
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id"].to_string().trim_matches('"').to_string()
}

/// Asserts that every acknowledged job (`acked`: name -> id) is in `jobs` exactly once with the
/// id its submitter was told, and that no job name occurs twice.
fn assert_each_once(jobs: &Value, acked: &BTreeMap<String, String>, whose: &str) {
    let names = by_name(jobs);
    for (name, id) in acked {
        assert_eq!(
            names.get(name),
            Some(&vec![id.clone()]),
            "{whose}: acknowledged job {name} (id {id}) must be there exactly once: {jobs}"
        );
    }
    for (name, ids) in &names {
        assert_eq!(
            ids.len(),
            1,
            "{whose}: {name} exists {} times: {ids:?}",
            ids.len()
        );
    }
}

/// Asserts that each coordinator in `live` answers a (linearizable) job listing with every
/// acknowledged job exactly once, and that its own replicated state (`?stale`, no leader asked)
/// holds them exactly once too when it has caught up.
fn assert_every_member_holds(group: &Group, live: &[usize], acked: &BTreeMap<String, String>) {
    for &i in live {
        let (status, jobs) = group.curl(i, "/v1/jobs");
        assert_eq!(
            status, 200,
            "a linearizable read on coordinator {i}: {jobs}"
        );
        assert_each_once(&jobs, acked, &format!("coordinator {i}"));
        let own = eventually(
            Duration::from_secs(20),
            &format!("coordinator {i}'s own state to hold every acknowledged job"),
            || {
                let (status, jobs) = group.curl(i, "/v1/jobs?stale");
                let names = by_name(&jobs);
                (status == 200 && acked.keys().all(|n| names.contains_key(n))).then_some(jobs)
            },
        );
        assert_each_once(&own, acked, &format!("coordinator {i}'s own state"));
    }
}

#[test]
fn five_coordinators_lose_two_without_losing_a_write_and_refuse_writes_without_a_quorum() {
    let mut group = Group::start_on(&FIVE_HOSTS, 1, &[]);
    let started = Instant::now();
    let dir = group.dir.path().to_path_buf();

    // Five voters and one leader, through the CLI and through curl on every member.
    let view = group.json(&["cluster", "-o", "json"]);
    let members = view["members"].as_array().unwrap();
    let mut addresses: Vec<&str> = members
        .iter()
        .map(|m| m["address"].as_str().unwrap())
        .collect();
    addresses.sort();
    assert_eq!(addresses, group.addrs, "{view}");
    assert!(members.iter().all(|m| m["voter"] == true), "{view}");
    let leaders: Vec<&Value> = members.iter().filter(|m| m["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{view}");
    assert_eq!(leaders[0]["id"], view["leader"]["id"], "{view}");
    for i in 0..5 {
        let (status, seen) = group.curl(i, "/v1/cluster");
        assert_eq!(status, 200, "GET /v1/cluster on coordinator {i}: {seen}");
        assert_eq!(seen["leader"], view["leader"], "coordinator {i}: {seen}");
        assert_eq!(seen["members"].as_array().map(Vec::len), Some(5), "{seen}");
        // Each member's own view names the same leader: no second one anywhere.
        eventually(
            Duration::from_secs(10),
            &format!("coordinator {i} to know the leader"),
            || {
                let (_, local) = group.curl(i, "/v1/cluster?local");
                (local["leader"]["id"] == view["leader"]["id"]).then_some(())
            },
        );
    }

    // A job through each member (followers forward in one hop); every member reads them all.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..5 {
        let name = format!("via-{i}");
        let file = short_job(&dir, &name);
        let id = submitted_id(&group.cli_at(i, &["submit", file.to_str().unwrap(), "-o", "json"]));
        acked.insert(name, id);
    }
    assert_every_member_holds(&group, &[0, 1, 2, 3, 4], &acked);

    // SIGKILL the leader and a follower: the CLI, given every member, finds the new leader.
    let first = group.leader();
    let second = (first + 1) % 5;
    group.kill(first);
    group.kill(second);
    let killed_at = Instant::now();
    for n in 0..3 {
        let name = format!("after-two-lost-{n}");
        let file = short_job(&dir, &name);
        let id = submitted_id(&group.cli(&["submit", file.to_str().unwrap(), "-o", "json"]));
        if n == 0 {
            eprintln!(
                "first write after losing two acknowledged in {:?}",
                killed_at.elapsed()
            );
        }
        acked.insert(name, id);
    }
    let survivors: Vec<usize> = (0..5).filter(|i| ![first, second].contains(i)).collect();
    assert_every_member_holds(&group, &survivors, &acked);
    let leader = group.leader();
    assert!(survivors.contains(&leader), "{leader} leads");
    let view = group.json(&["cluster", "-o", "json"]);
    assert_eq!(
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"] == true)
            .count(),
        5,
        "the lost members are still voters: {view}"
    );

    // A third lost: two of five can not commit. The leader left behind refuses writes and
    // linearizable reads with a clear error instead of answering.
    let third = *survivors.iter().find(|i| **i != leader).unwrap();
    group.kill(third);
    let follower = *survivors
        .iter()
        .find(|i| **i != leader && **i != third)
        .unwrap();
    let refused_at = Instant::now();
    let spec = r#"{"name":"no-quorum","launch":{"command":["true"]},"resources":{"nodes":1,"procs_per_node":1}}"#;
    let submission = group
        .curl_command(follower, "POST", "/v1/jobs")
        .args([
            "-H",
            "Content-Type: application/json",
            "-H",
            "Idempotency-Key: no-quorum-1",
            "--data",
            spec,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let read = group
        .curl_command(leader, "GET", "/v1/jobs")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cli_write = group
        .command(&group.urls())
        .args(["token", "create", "--role", "read", "--name", "no-quorum"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let no_quorum = |text: &str| {
        text.contains("not confirmed by a majority")
            || text.contains("no coordinator leads right now")
    };
    let (status, body) = curl_answer(&submission.wait_with_output().unwrap());
    eprintln!("submission refused after {:?}", refused_at.elapsed());
    assert_eq!(status, 503, "a submission without a quorum: {body}");
    assert!(no_quorum(body["error"].as_str().unwrap_or("")), "{body}");
    let (status, body) = curl_answer(&read.wait_with_output().unwrap());
    eprintln!("read refused after {:?}", refused_at.elapsed());
    assert_eq!(status, 503, "a linearizable read without a quorum: {body}");
    let error = body["error"].as_str().unwrap_or("");
    assert!(
        error.contains("could not confirm with a majority") || no_quorum(error),
        "{body}"
    );
    let out = cli_write.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a write without a quorum: {out:?}");
    assert!(no_quorum(&stderr), "{stderr}");
    eprintln!("refused without a quorum in {:?}", refused_at.elapsed());

    // The first one killed (the old leader) restarts on its data dir: three of five again.
    group.start_coordinator(first);
    let restarted_at = Instant::now();
    let file = short_job(&dir, "after-restart");
    let id = submitted_id(&group.cli(&["submit", file.to_str().unwrap(), "-o", "json"]));
    eprintln!(
        "writes resumed {:?} after the restart",
        restarted_at.elapsed()
    );
    acked.insert("after-restart".into(), id);
    // The refused submission, retried by the same client with its key: one job, whether or not
    // the refused attempt took effect once the quorum was back.
    let (status, body) = curl_answer(
        &group
            .curl_command(first, "POST", "/v1/jobs")
            .args([
                "-H",
                "Content-Type: application/json",
                "-H",
                "Idempotency-Key: no-quorum-1",
                "--data",
                spec,
            ])
            .output()
            .unwrap(),
    );
    assert!(
        matches!(status, 200 | 201),
        "the retried submission: {status} {body}"
    );
    let id = body["id"].to_string().trim_matches('"').to_string();
    acked.insert("no-quorum".into(), id);
    assert_every_member_holds(&group, &[leader, follower, first], &acked);
    eprintln!("five voters formed; the rest took {:?}", started.elapsed());
}

#[test]
fn dev_runs_five_coordinators_and_the_cli_survives_losing_two() {
    let dev = common::DevCluster::start_at("127.0.0.81", 1, &["--coordinators", "5"], &[]);
    // The CLI as a user runs it: the context `dev` wrote, no address given.
    let cli = |args: &[&str]| dev.cli_from_context(args);
    let config = std::fs::read_to_string(dev.config_file()).unwrap();
    assert_eq!(config.matches("https://127.0.0.81:").count(), 5, "{config}");
    let out = cli(&["cluster", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let members = view["members"].as_array().unwrap();
    assert_eq!(
        members.iter().filter(|m| m["voter"] == true).count(),
        5,
        "{view}"
    );
    let leaders: Vec<&Value> = members.iter().filter(|m| m["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{view}");
    let out = cli(&[
        "submit",
        short_job(dev.data_dir.path(), "five").to_str().unwrap(),
        "--wait",
    ]);
    assert!(out.status.success(), "{out:?}");

    // Kill the leader and another coordinator. `dev` starts coordinator k (from 0) on the k-th
    // port after the first, with its data in `coordinator` or `coordinator-<k+1>`.
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
    let base = port(&dev.addr);
    let leader = port(view["leader"]["address"].as_str().unwrap()) - base;
    for k in [leader, (leader + 1) % 5] {
        let dir = if k == 0 {
            "coordinator".to_string()
        } else {
            format!("coordinator-{}", k + 1)
        };
        let marker = format!(
            "{} --listen",
            dev.data_dir.path().join("cluster").join(dir).display()
        );
        let pids = common::processes_with(&marker);
        assert_eq!(pids.len(), 1, "{marker}: {pids:?}");
        signal(pids[0], libc::SIGKILL);
    }
    let out = cli(&[
        "submit",
        short_job(dev.data_dir.path(), "after-two-died")
            .to_str()
            .unwrap(),
        "--wait",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["cluster", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        after["leader"]["id"].is_u64() && after["leader"]["id"] != view["leader"]["id"],
        "a new leader: {after}"
    );
    let out = cli(&["list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let names = by_name(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        ["after-two-died", "five"],
        "{names:?}"
    );
    assert!(names.values().all(|ids| ids.len() == 1), "{names:?}");
}
