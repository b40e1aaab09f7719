//! TEMPORARY: writes the format-0 fixtures with the code of the release that writes format 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder,
};
use redb::{ReadableDatabase, TableDefinition};
use trainctl_coordinator::raft::state_machine::StateMachineStore;
use trainctl_coordinator::raft::TypeConfig;
use trainctl_coordinator::scheduler;
use trainctl_coordinator::state::*;
use trainctl_jobs::JobSpec;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn host(name: &str, cpus: u32, gpus: u32) -> NodeResources {
    NodeResources {
        containment: "cgroup2 (cpu, memory)".into(),
        hostname: format!("{name}.example"),
        cpus,
        memory_mib: 64 << 10,
        gpus: (0..gpus)
            .map(|index| GpuInfo {
                index,
                name: "Test GPU".to_string(),
                memory_mib: 80 << 10,
                uuid: format!("GPU-{name}-{index}"),
            })
            .collect(),
        rdma_devices: vec![RdmaDeviceInfo {
            name: "mlx5_0".into(),
            ports: vec![RdmaPortInfo {
                port: 1,
                state: "ACTIVE".into(),
                link_layer: "InfiniBand".into(),
                rate: "200 Gb/sec".into(),
                gid_count: 4,
            }],
        }],
    }
}

fn spec(name: &str, nodes: &str, procs: u32, gpus: u32, extra: &str) -> JobSpec {
    let text = format!(
        "name = \"{name}\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\nenv = {{ SEED = \"7\" }}\n\
         [resources]\nnodes = {nodes}\nprocs_per_node = {procs}\ngpus_per_node = {gpus}\n{extra}"
    );
    JobSpec::from_toml(&text, "fixture.toml").expect("valid")
}

fn nid(s: &str) -> NodeId {
    NodeId(s.into())
}

struct Log {
    state: State,
    entries: Vec<Entry<TypeConfig>>,
    outcomes: Vec<String>,
}

impl Log {
    fn next_id(&self, term: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), self.entries.len() as u64)
    }
    fn push(&mut self, term: u64, command: Command) -> CommandOutcome {
        let outcome = self.state.apply(command.clone());
        self.outcomes.push(format!("{outcome:?}"));
        let log_id = self.next_id(term);
        self.entries.push(Entry {
            log_id,
            payload: EntryPayload::Normal(command),
        });
        outcome
    }
    fn job_of(o: CommandOutcome) -> JobId {
        match o {
            CommandOutcome::JobSubmitted { job } => job,
            other => panic!("{other:?}"),
        }
    }
    fn place(&mut self, job: JobId, at_ms: u64) {
        let placement = scheduler::plan(
            &self.state.cluster_snapshot(),
            &self.state.jobs[&job].spec.resources,
        )
        .expect("fits");
        let o = self.push(
            2,
            Command::PlaceJob {
                job,
                placement,
                at_ms,
            },
        );
        assert_eq!(o, CommandOutcome::Done);
    }
    fn report_all(&mut self, job: JobId, phase: RankPhase, exit: Option<i32>, at_ms: u64) {
        let j = &self.state.jobs[&job];
        let mut per_node: BTreeMap<NodeId, Vec<RankObservation>> = BTreeMap::new();
        for r in &j.ranks {
            per_node
                .entry(r.node.clone())
                .or_default()
                .push(RankObservation {
                    job,
                    attempt: j.attempt,
                    rank: r.rank,
                    phase,
                    exit_code: exit,
                    message: None,
                    pid: Some(4000 + r.rank),
                });
        }
        for (node, observations) in per_node {
            let instance_id = self.state.nodes[&node].instance_id.clone();
            let o = self.push(
                2,
                Command::ReportRanks {
                    node,
                    instance_id,
                    observations,
                    idle_jobs: vec![],
                    at_ms,
                    gone_attempts: vec![],
                },
            );
            assert_eq!(o, CommandOutcome::Done);
        }
    }
}

#[tokio::test]
#[ignore]
async fn write_v0_fixtures() {
    let mut log = Log {
        state: State::default(),
        entries: Vec::new(),
        outcomes: Vec::new(),
    };
    // What `raft.initialize` writes, then the first leader's blank entry.
    log.entries.push(Entry {
        log_id: LogId::new(CommittedLeaderId::new(0, 0), 0),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([1u64])],
            BTreeMap::from([(1u64, BasicNode::new("10.0.0.100:7070"))]),
        )),
    });
    log.entries.push(Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Blank,
    });
    let admin = Actor {
        name: "admin".into(),
        namespace: None,
    };
    let alice = Actor {
        name: "alice".into(),
        namespace: Some("research".into()),
    };
    const T: u64 = 1_700_000_000_000;
    log.push(
        1,
        Command::InitCluster {
            cluster_id: "c0ffee00c0ffee00c0ffee00c0ffee00".into(),
        },
    );
    let record = |id: &str, name: &str, role: Role, ns: Option<&str>| TokenRecord {
        id: id.into(),
        name: name.into(),
        role,
        namespace: ns.map(Into::into),
        secret_sha256: format!("{:0>64}", id),
        created_at_ms: T,
        created_by: "bootstrap".into(),
        expires_at_ms: None,
        revoked_at_ms: None,
    };
    log.push(
        1,
        Command::CreateToken {
            record: record("00000000000000a1", "root", Role::Admin, None),
        },
    );
    log.push(
        1,
        Command::Audited {
            actor: admin.clone(),
            at_ms: T + 10,
            command: Box::new(Command::CreateToken {
                record: record("00000000000000b2", "join", Role::Agent, None),
            }),
        },
    );
    log.push(
        1,
        Command::Audited {
            actor: admin.clone(),
            at_ms: T + 11,
            command: Box::new(Command::CreateToken {
                record: record("00000000000000c3", "alice", Role::Submit, Some("research")),
            }),
        },
    );
    for (i, (name, gpus)) in [("node-1", 8u32), ("node-2", 8), ("node-3", 4)]
        .into_iter()
        .enumerate()
    {
        let o = log.push(
            1,
            Command::AdmitAgent {
                node: nid(name),
                fingerprint: format!("{:0>64}", format!("f{i}")),
                token_id: "00000000000000b2".into(),
                at_ms: T + 20 + i as u64,
            },
        );
        assert_eq!(o, CommandOutcome::Done);
        let o = log.push(
            1,
            Command::RegisterNode {
                node: nid(name),
                address: format!("10.0.0.{}", i + 1),
                instance_id: format!("{name}-a"),
                resources: host(name, 32, gpus),
                port_range: (29500, 29509),
                at_ms: T + 30 + i as u64,
            },
        );
        assert_eq!(o, CommandOutcome::Done);
    }
    // A new term: leadership moved (the blank entry of term 2).
    let id = log.next_id(2);
    log.entries.push(Entry {
        log_id: id,
        payload: EntryPayload::Blank,
    });
    // Job 1: 2 nodes x 2 ranks x 2 GPUs with checkpoints and restarts, submitted by alice.
    let j1 = Log::job_of(log.push(
        2,
        Command::Audited {
            actor: alice.clone(),
            at_ms: T + 100,
            command: Box::new(Command::SubmitJob {
                spec: spec(
                    "pretrain",
                    "2",
                    2,
                    2,
                    "[failure]\nmax_restarts = 2\n[checkpoint]\ndir = \"/ckpt/{job}\"\nsignal = \"usr1\"\nkeep = 2\n",
                ),
                at_ms: T + 100,
                secret: "0123456789abcdef0123456789abcdef".into(),
                resume_from_job: None,
            }),
        },
    ));
    // Jobs 2 and 3 in one group commit: an elastic CPU job and one that will be cancelled.
    let o = log.push(
        2,
        Command::Batch(vec![
            Command::SubmitJob {
                spec: spec(
                    "elastic",
                    "\"1:2\"",
                    1,
                    0,
                    "[failure]\nhang_timeout = \"30s\"\n",
                ),
                at_ms: T + 101,
                secret: "11111111111111111111111111111111".into(),
                resume_from_job: None,
            },
            Command::SubmitJob {
                spec: spec("doomed", "1", 1, 1, ""),
                at_ms: T + 101,
                secret: "22222222222222222222222222222222".into(),
                resume_from_job: None,
            },
        ]),
    );
    let CommandOutcome::Batch(outs) = o else {
        panic!()
    };
    let j2 = Log::job_of(outs[0].clone());
    let j3 = Log::job_of(outs[1].clone());
    log.place(j1, T + 200);
    log.report_all(j1, RankPhase::Running, None, T + 210);
    log.place(j2, T + 201);
    log.report_all(j2, RankPhase::Running, None, T + 211);
    // A stale plan: rejected, and stays in the log.
    let stale = log.state.jobs[&j1]
        .allocation
        .as_ref()
        .map(|a| a.master_port)
        .unwrap();
    let o = log.push(
        2,
        Command::PlaceJob {
            job: j1,
            placement: scheduler::Placement {
                nodes: vec![scheduler::NodePlacement {
                    node: nid("node-1"),
                    gpus: vec![0, 1],
                }],
                master_port: stale,
            },
            at_ms: T + 220,
        },
    );
    assert!(matches!(o, CommandOutcome::Rejected { .. }));
    let o = log.push(
        2,
        Command::CommitCheckpoint {
            job: j1,
            attempt: 0,
            path: format!("/ckpt/{j1}/step-100"),
            step: 100,
            metrics: Some("{\"loss\":2.5}".into()),
            at_ms: T + 300,
        },
    );
    assert!(
        matches!(o, CommandOutcome::CheckpointCommitted { .. }),
        "{o:?}"
    );
    log.push(2, Command::RequestCheckpoint { job: j1 });
    let o = log.push(
        2,
        Command::CommitCheckpoint {
            job: j1,
            attempt: 0,
            path: format!("/ckpt/{j1}/step-200"),
            step: 200,
            metrics: None,
            at_ms: T + 310,
        },
    );
    assert!(
        matches!(o, CommandOutcome::CheckpointCommitted { .. }),
        "{o:?}"
    );
    // The leader restarts job 1 (hung); agents report the old attempt gone; placed again.
    let o = log.push(
        2,
        Command::RestartJob {
            job: j1,
            attempt: 0,
            reason: "no progress for 30s".into(),
            end: AttemptEnd::Hung,
            at_ms: T + 400,
        },
    );
    assert_eq!(o, CommandOutcome::Done);
    for node in ["node-1", "node-2"] {
        let instance_id = log.state.nodes[&nid(node)].instance_id.clone();
        log.push(
            2,
            Command::ReportRanks {
                node: nid(node),
                instance_id,
                observations: vec![],
                idle_jobs: vec![],
                at_ms: T + 410,
                gone_attempts: vec![(j1, 0)],
            },
        );
    }
    if log.state.jobs[&j1].state == JobState::Pending {
        log.place(j1, T + 420);
    }
    log.report_all(j1, RankPhase::Running, None, T + 430);
    log.report_all(j1, RankPhase::Exited, Some(0), T + 500);
    assert_eq!(log.state.jobs[&j1].state, JobState::Succeeded);
    // Job 4 resumes from job 1's newest checkpoint.
    let j4 = Log::job_of(log.push(
        2,
        Command::Audited {
            actor: alice.clone(),
            at_ms: T + 600,
            command: Box::new(Command::SubmitJob {
                spec: spec("finetune", "1", 1, 1, ""),
                at_ms: T + 600,
                secret: "44444444444444444444444444444444".into(),
                resume_from_job: Some(j1),
            }),
        },
    ));
    // Job 3 is cancelled by alice before it is placed.
    log.push(
        2,
        Command::Audited {
            actor: alice.clone(),
            at_ms: T + 610,
            command: Box::new(Command::CancelJob {
                job: j3,
                at_ms: T + 610,
            }),
        },
    );
    log.place(j4, T + 620);
    // node-3 is drained, then lost, then removed; its agent's token is revoked.
    log.push(
        2,
        Command::Audited {
            actor: admin.clone(),
            at_ms: T + 700,
            command: Box::new(Command::SetNodeDrained {
                node: nid("node-3"),
                drained: true,
            }),
        },
    );
    log.push(
        2,
        Command::NodeLost {
            node: nid("node-2"),
            reason: "no heartbeat for 10.0s".into(),
            at_ms: T + 710,
        },
    );
    // node-2's agent restarts: a new instance re-registers.
    log.push(
        2,
        Command::RegisterNode {
            node: nid("node-2"),
            address: "10.0.0.2".into(),
            instance_id: "node-2-b".into(),
            resources: host("node-2", 32, 8),
            port_range: (29500, 29509),
            at_ms: T + 720,
        },
    );
    // Job 5 can never fit once the cluster shrinks: failed while pending.
    let j5 = Log::job_of(log.push(
        2,
        Command::SubmitJob {
            spec: spec("huge", "3", 8, 8, ""),
            at_ms: T + 730,
            secret: "55555555555555555555555555555555".into(),
            resume_from_job: None,
        },
    ));
    log.push(
        2,
        Command::FailPendingJob {
            job: j5,
            reason: "needs 3 hosts of 8 GPUs; 2 exist".into(),
            at_ms: T + 740,
        },
    );
    log.push(
        2,
        Command::Audited {
            actor: admin.clone(),
            at_ms: T + 750,
            command: Box::new(Command::RemoveNode {
                node: nid("node-3"),
                at_ms: T + 750,
            }),
        },
    );
    log.push(
        2,
        Command::Audited {
            actor: admin.clone(),
            at_ms: T + 760,
            command: Box::new(Command::RevokeToken {
                id: "00000000000000c3".into(),
                at_ms: T + 760,
            }),
        },
    );
    // A second InitCluster is refused (and stays in the log).
    let o = log.push(
        2,
        Command::InitCluster {
            cluster_id: "other".into(),
        },
    );
    assert!(matches!(o, CommandOutcome::Rejected { .. }));
    eprintln!("{:#?}", log.outcomes);

    // The log, as LogStore::append writes each entry (format 0: the entry's JSON).
    let mut text = String::new();
    for e in &log.entries {
        text.push_str(&String::from_utf8(serde_json::to_vec(e).unwrap()).unwrap());
        text.push('\n');
    }
    std::fs::create_dir_all(DIR).unwrap();
    std::fs::write(format!("{DIR}/log-v0.jsonl"), text).unwrap();
    std::fs::write(
        format!("{DIR}/state-after-log.json"),
        serde_json::to_string_pretty(&log.state).unwrap() + "\n",
    )
    .unwrap();

    // The snapshot, as the state machine stores it after applying that log.
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("s.redb")).unwrap());
    let mut sm = StateMachineStore::open(db.clone()).unwrap();
    sm.apply(log.entries.clone()).await.unwrap();
    assert_eq!(sm.read(|s| s.clone()), log.state);
    sm.build_snapshot().await.unwrap();
    const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(SNAPSHOT).unwrap();
    let raw = t.get("current").unwrap().unwrap().value().to_vec();
    std::fs::write(
        format!("{DIR}/snapshot-v0.json"),
        [raw, b"\n".to_vec()].concat(),
    )
    .unwrap();
}
