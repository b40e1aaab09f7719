//! `trainctl store`, the TCPStore server, against clients no one here wrote: torch's own
//! `TCPStore` client doing every operation (with the answers compared to those of torch's own
//! libuv and legacy servers), `init_process_group("env://")` with the agent-store contract, and
//! ten thousand connections at once.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{python_with_torch, repo, trainctl};
use trainctl_store::{Namespace, StoreClient};

/// A `trainctl store` process, killed when dropped.
struct Store {
    child: Child,
    addr: String,
}

impl Store {
    fn start() -> Store {
        let mut child = Command::new(trainctl())
            .args(["store", "--listen", "127.0.0.1:0", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trainctl store");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the store's address");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("store printed {line:?}: {e}"));
        Store {
            child,
            addr: v["address"].as_str().expect("address").to_string(),
        }
    }

    fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store_ops(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(python_with_torch())
        .arg(repo().join("tests/python/store_ops.py"))
        .args(args)
        .output()
        .expect("run store_ops.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "store_ops.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn torchs_client_gets_the_same_answers_from_trainctl_as_from_torchs_own_servers() {
    let store = Store::start();
    let ours = store_ops(&["127.0.0.1", store.port()]);
    let libuv = store_ops(&["--torch", "libuv"]);
    let legacy = store_ops(&["--torch", "legacy"]);
    assert_eq!(ours.last().unwrap()["op"], "done", "{ours:?}");
    assert!(ours.len() > 30, "every operation ran: {ours:?}");
    for (i, (a, b)) in ours.iter().zip(&libuv).enumerate() {
        assert_eq!(a, b, "line {i}: trainctl vs torch's libuv server");
    }
    assert_eq!(ours.len(), libuv.len());
    // torch's legacy server has no queues: every one of its answers is trainctl's too.
    for line in &legacy {
        assert!(
            ours.contains(line),
            "legacy answered {line}, trainctl did not"
        );
    }
}

#[test]
fn init_process_group_finds_its_peers_through_trainctl_store() {
    let store = Store::start();
    let script = r#"
import os, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} sum {t.item()}", flush=True)
dist.destroy_process_group()
"#;
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(python_with_torch())
                .args(["-c", script])
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", store.port())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                // Every rank is a client: nobody but trainctl serves the store.
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("rank {rank} sum 3.0")), "{stdout}");
    }
}

/// Raises this process's soft open-file limit to its hard limit; returns the limit.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

#[test]
fn ten_thousand_connections_rendezvous_at_once() {
    const CLIENTS: usize = 10_000;
    let limit = raise_open_files();
    assert!(
        limit >= CLIENTS as u64 + 500,
        "this test needs {} open files; the limit is {limit} (raise ulimit -n)",
        CLIENTS + 500
    );
    let store = Store::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Every client connects and checks in, then waits for the last one (a rendezvous).
        let mut clients = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let client = StoreClient::connect(&store.addr, Namespace::Workers)
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            clients.push(client);
        }
        let mut tasks = Vec::with_capacity(CLIENTS);
        for mut c in clients {
            tasks.push(tokio::spawn(async move {
                if c.add("/arrived", 1).await.unwrap() == CLIENTS as i64 {
                    c.set("/all-here", b"1").await.unwrap();
                }
                c.wait(&["/all-here"], Duration::from_secs(60))
                    .await
                    .unwrap();
                c
            }));
        }
        let mut clients = Vec::with_capacity(CLIENTS);
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        // All 10 000 are still connected and served.
        assert_eq!(
            clients[CLIENTS - 1].get("/arrived").await.unwrap(),
            CLIENTS.to_string().as_bytes()
        );
        assert_eq!(clients[0].num_keys().await.unwrap(), 2);
    });
}
