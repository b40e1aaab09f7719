//! Regression tests for bugs found in review: each asserts the behaviour a user relies on, and each
//! failed before its fix.

use std::sync::{Arc, Barrier};

use trainctl_coordinator::logs::LogStore;
use trainctl_coordinator::scheduler;
use trainctl_coordinator::state::{
    Command, CommandOutcome, GpuInfo, JobId, JobState, NodeId, NodeResources, RankObservation,
    RankPhase, State,
};
use trainctl_jobs::JobSpec;

fn node() -> NodeId {
    NodeId("node-1".into())
}

fn register(s: &mut State, instance: &str) -> CommandOutcome {
    s.apply(Command::RegisterNode {
        node: node(),
        address: "10.0.0.1".into(),
        instance_id: instance.into(),
        resources: NodeResources {
            containment: String::new(),
            hostname: "node-1".into(),
            cpus: 8,
            memory_mib: 1 << 16,
            gpus: (0..2)
                .map(|index| GpuInfo {
                    index,
                    name: "gpu".into(),
                    memory_mib: 80 << 10,
                    uuid: format!("GPU-{index}"),
                    ..Default::default()
                })
                .collect(),
            rdma_devices: vec![],
            advertised_interface: String::new(),
        },
        port_range: (29500, 29509),
        at_ms: 1,
    })
}

fn submit_and_place(s: &mut State, at_ms: u64) -> JobId {
    let spec = JobSpec::from_toml(
        "name = \"t\"\n[launch]\ncommand = [\"python3\", \"t.py\"]\n\
         [resources]\nnodes = 1\nprocs_per_node = 2\ngpus_per_node = 2\n",
        "t.toml",
    )
    .unwrap();
    let CommandOutcome::JobSubmitted { job } = s.apply(Command::SubmitJob {
        spec,
        at_ms,
        secret: String::new(),
        resume_from_job: None,
    }) else {
        panic!("not submitted")
    };
    if let Ok(placement) = scheduler::plan(&s.cluster_snapshot(), &s.jobs[&job].spec.resources) {
        assert_eq!(
            s.apply(Command::PlaceJob {
                job,
                placement,
                at_ms
            }),
            CommandOutcome::Done
        );
    }
    job
}

/// An agent cut off from the coordinator (partition, SIGSTOP, long GC pause) keeps its ranks running.
/// The coordinator declares the node lost and, in `lose_ranks_on`, releases the node's GPUs and
/// MASTER_PORT at once. When the *same* agent instance comes back it is told to register again;
/// `register_node` marks the node up with the already-released usage, and the scheduler hands the
/// same GPUs and port to the next job before the agent has even been told to stop the old ranks
/// (it learns that only from the heartbeat *after* registration, then gives them stop_grace_ms).
/// ARCHITECTURE.md: "Resources return only when processes are gone."
#[test]
fn a_cut_off_node_that_returns_keeps_its_gpus_and_port_held_while_old_ranks_may_run() {
    let mut s = State::default();
    assert_eq!(register(&mut s, "agent-a"), CommandOutcome::Done);
    let old = submit_and_place(&mut s, 2);
    for rank in 0..2 {
        let outcome = s.apply(Command::ReportRanks {
            gone_attempts: Vec::new(),
            node: node(),
            instance_id: "agent-a".into(),
            observations: vec![RankObservation {
                job: old,
                attempt: 0,
                rank,
                phase: RankPhase::Running,
                exit_code: None,
                message: None,
                pid: Some(100 + rank),
            }],
            idle_jobs: vec![],
            at_ms: 3,
        });
        assert_eq!(outcome, CommandOutcome::Done);
    }
    assert_eq!(s.jobs[&old].state, JobState::Running);

    // The agent goes silent; its ranks keep running on GPUs 0,1 with rank 0 listening on 29500.
    s.apply(Command::NodeLost {
        node: node(),
        reason: "no heartbeat for 10.0s".into(),
        at_ms: 4,
    });
    // Its job waits to be placed again; the node's share is retired, held for the old ranks.
    assert_eq!(s.jobs[&old].state, JobState::Pending);
    // The same agent process comes back (same instance id): nothing has confirmed its ranks ended.
    assert_eq!(register(&mut s, "agent-a"), CommandOutcome::Done);
    let new = submit_and_place(&mut s, 5);

    let old_share = s.jobs[&old].retired[0].clone();
    let new_job = &s.jobs[&new];
    assert_eq!(
        new_job.state,
        JobState::Pending,
        "job {new} was placed on GPUs {:?} / port {:?} while job {old}'s ranks on the same node \
         (GPUs {:?}, port {}) were never reported ended by the agent that runs them",
        new_job.allocation.as_ref().map(|a| a.nodes[0].gpus.clone()),
        new_job.allocation.as_ref().map(|a| a.master_port),
        old_share.gpus,
        old_share.port.unwrap_or_default(),
    );
}

/// Two heartbeats of one node can be in the coordinator at once: the agent's gRPC client gives up
/// after 10 s and sends the next heartbeat, while the first one's `spawn_blocking` log write (not
/// cancelled when the request is dropped) is still running, e.g. on a stalled disk. Both carry the
/// same chunk at the same offset. `LogStore::append` reads the length, then writes with O_APPEND,
/// so both can write: the stored log then holds the bytes twice, and every later offset is
/// shifted (later chunks are cut by the duplicated length: lines lost, and `complete: true`).
#[test]
fn concurrent_appends_of_the_same_chunk_store_it_once() {
    const TRIES: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let mut duplicated = 0;
    for i in 0..TRIES {
        let store = LogStore::new(dir.path().to_path_buf());
        let job = JobId(i as u64 + 1);
        store.append(job, 0, 0, 0, b"first\n").unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    store.append(job, 0, 0, 6, b"second\n").unwrap()
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let (lines, _) = store.read(job, 0, &[0], &Default::default()).unwrap();
        if lines.len() != 2 {
            duplicated += 1;
        }
    }
    assert_eq!(
        duplicated, 0,
        "{duplicated} of {TRIES} concurrent resends of one chunk were stored twice"
    );
}
