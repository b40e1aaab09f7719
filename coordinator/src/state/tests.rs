//! Table-driven tests of `State::apply`: fixtures build the cluster a line at a time, and
//! `check_invariants` runs after the steps that move resources.

use super::*;
use crate::scheduler::{self, NodePlacement};

mod fuzz;
mod idempotency;

/// Every node's lease range in these tests: ten ports.
const PORTS: (u16, u16) = (29500, 29509);
const AT: u64 = 1_000;

fn id(name: &str) -> NodeId {
    NodeId(name.to_string())
}

fn host(name: &str, cpus: u32, gpus: u32) -> NodeResources {
    NodeResources {
        containment: String::new(),
        hostname: format!("{name}.example"),
        cpus,
        memory_mib: 64 << 10,
        gpus: (0..gpus)
            .map(|index| GpuInfo {
                index,
                name: "Test GPU".to_string(),
                memory_mib: 80 << 10,
                uuid: format!("GPU-{name}-{index}"),
                ..Default::default()
            })
            .collect(),
        rdma_devices: Vec::new(),
        advertised_interface: String::new(),
    }
}

/// The address a test node registers with: `node-3` is 10.0.0.3.
fn address(name: &str) -> String {
    let n = name.rsplit('-').next().unwrap_or("0");
    format!("10.0.0.{n}")
}

fn register_instance(
    state: &mut State,
    name: &str,
    instance: &str,
    cpus: u32,
    gpus: u32,
) -> CommandOutcome {
    state.apply(Command::RegisterNode {
        node: id(name),
        address: address(name),
        instance_id: instance.to_string(),
        resources: host(name, cpus, gpus),
        port_range: PORTS,
        at_ms: AT,
    })
}

/// Registers `name` with its first agent instance, `<name>-a`.
fn register(state: &mut State, name: &str, cpus: u32, gpus: u32) {
    let outcome = register_instance(state, name, &format!("{name}-a"), cpus, gpus);
    assert_eq!(outcome, CommandOutcome::Done, "register {name}");
}

fn spec(nodes: u32, procs: u32, gpus: u32) -> JobSpec {
    let text = format!(
        "name = \"train\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\n\
         [resources]\nnodes = {nodes}\nprocs_per_node = {procs}\ngpus_per_node = {gpus}\n"
    );
    JobSpec::from_toml(&text, "test.toml").expect("test spec is valid")
}

fn submit(state: &mut State, nodes: u32, procs: u32, gpus: u32) -> JobId {
    submit_spec(state, spec(nodes, procs, gpus))
}

fn submit_spec(state: &mut State, spec: JobSpec) -> JobId {
    match state.apply(Command::SubmitJob {
        spec,
        at_ms: AT,
        secret: String::new(),
        resume_from_job: None,
    }) {
        CommandOutcome::JobSubmitted { job } => job,
        other => panic!("submit: {other:?}"),
    }
}

/// What the leader would propose for `job` now.
fn plan_for(state: &State, job: JobId) -> Placement {
    scheduler::plan(&state.cluster_snapshot(), &state.jobs[&job].spec.resources)
        .expect("the job fits")
}

fn apply_place(state: &mut State, job: JobId, placement: Placement) -> CommandOutcome {
    state.apply(Command::PlaceJob {
        job,
        placement,
        at_ms: AT + 1,
    })
}

/// Plans `job` on the current snapshot and commits the plan.
fn place(state: &mut State, job: JobId) -> Placement {
    let placement = plan_for(state, job);
    let outcome = apply_place(state, job, placement.clone());
    assert_eq!(outcome, CommandOutcome::Done, "place job {job}");
    check_invariants(state);
    placement
}

fn observation(
    state: &State,
    job: JobId,
    rank: u32,
    phase: RankPhase,
    exit: Option<i32>,
) -> RankObservation {
    RankObservation {
        job,
        attempt: state.jobs[&job].attempt,
        rank,
        phase,
        exit_code: exit,
        message: (phase == RankPhase::FailedToStart).then(|| "no such file: python3".into()),
        pid: Some(1000 + rank),
    }
}

/// `node`'s current agent reports one rank of `job`'s current attempt.
fn report(
    state: &mut State,
    node: &str,
    job: JobId,
    rank: u32,
    phase: RankPhase,
    exit: Option<i32>,
) -> CommandOutcome {
    let obs = observation(state, job, rank, phase, exit);
    let instance_id = state.nodes[&id(node)].instance_id.clone();
    let outcome = state.apply(Command::ReportRanks {
        gone_attempts: Vec::new(),
        node: id(node),
        instance_id,
        observations: vec![obs],
        idle_jobs: Vec::new(),
        at_ms: AT + 2,
    });
    check_invariants(state);
    outcome
}

/// Every rank of `job` reports `phase` from its own node.
fn report_all(state: &mut State, job: JobId, phase: RankPhase, exit: Option<i32>) {
    let ranks: Vec<(String, u32)> = state.jobs[&job]
        .ranks
        .iter()
        .map(|r| (r.node.0.clone(), r.rank))
        .collect();
    for (node, rank) in ranks {
        assert_eq!(
            report(state, &node, job, rank, phase, exit),
            CommandOutcome::Done
        );
    }
}

fn report_idle(state: &mut State, node: &str, jobs: Vec<JobId>) -> CommandOutcome {
    let instance_id = state.nodes[&id(node)].instance_id.clone();
    let outcome = state.apply(Command::ReportRanks {
        gone_attempts: Vec::new(),
        node: id(node),
        instance_id,
        observations: Vec::new(),
        idle_jobs: jobs,
        at_ms: AT + 3,
    });
    check_invariants(state);
    outcome
}

/// `node`'s agent reports it runs nothing of `attempt` of `job` any more.
fn report_gone(state: &mut State, node: &str, job: JobId, attempt: u32) {
    let instance_id = state.nodes[&id(node)].instance_id.clone();
    let outcome = state.apply(Command::ReportRanks {
        node: id(node),
        instance_id,
        observations: Vec::new(),
        idle_jobs: Vec::new(),
        at_ms: AT + 3,
        gone_attempts: vec![(job, attempt)],
    });
    assert_eq!(outcome, CommandOutcome::Done);
    check_invariants(state);
}

fn cancel(state: &mut State, job: JobId) -> CommandOutcome {
    let outcome = state.apply(Command::CancelJob { job, at_ms: AT + 4 });
    check_invariants(state);
    outcome
}

fn lose(state: &mut State, node: &str) -> CommandOutcome {
    let outcome = state.apply(Command::NodeLost {
        node: id(node),
        reason: "no heartbeat for 10.0s".into(),
        at_ms: AT + 5,
    });
    check_invariants(state);
    outcome
}

fn job_state(state: &State, job: JobId) -> JobState {
    state.jobs[&job].state
}

fn usage<'a>(state: &'a State, node: &str) -> &'a NodeUsage {
    &state.nodes[&id(node)].usage
}

fn idle(state: &State, node: &str) -> bool {
    usage(state, node) == &NodeUsage::default()
}

fn released(state: &State, job: JobId, node: &str) -> bool {
    let allocation = state.jobs[&job].allocation.as_ref().expect("placed");
    let share = allocation.nodes.iter().find(|na| na.node == id(node));
    share.expect("the job has a share there").released
}

fn assert_rejected(outcome: CommandOutcome, words: &str) {
    match outcome {
        CommandOutcome::Rejected { reason } => {
            assert!(reason.contains(words), "`{reason}` lacks `{words}`")
        }
        other => panic!("expected a rejection naming `{words}`, got {other:?}"),
    }
}

/// Node usage is exactly the sum of the unreleased allocations on it, no GPU or port is held by
/// two jobs, every held GPU exists, and a node never gives more than it has.
fn check_invariants(state: &State) {
    // Access: each identity was admitted by a known agent token, one identity per node name, the
    // audit trail within its bound.
    let mut named: BTreeSet<&NodeId> = BTreeSet::new();
    for identity in state.identities.values() {
        let token = state
            .tokens
            .get(&identity.token_id)
            .expect("identity of a known token");
        assert_eq!(
            token.role,
            Role::Agent,
            "identity admitted by a {} token",
            token.role
        );
        assert!(
            named.insert(&identity.node),
            "two identities for {}",
            identity.node
        );
    }
    assert!(state.audit.len() <= AUDIT_ENTRIES_MAX);
    let mut expected: BTreeMap<NodeId, NodeUsage> = state
        .nodes
        .keys()
        .map(|n| (n.clone(), NodeUsage::default()))
        .collect();
    let mut gpu_owner: BTreeMap<(NodeId, u32), JobId> = BTreeMap::new();
    for job in state.jobs.values() {
        // Shares of earlier attempts stay held until their processes are confirmed gone.
        for r in &job.retired {
            let u = expected
                .get_mut(&r.node)
                .expect("retired share on a known node");
            u.cpus += r.cpus;
            u.memory_mib += r.memory_mib;
            for g in &r.gpus {
                if let Some(other) = gpu_owner.insert((r.node.clone(), *g), job.id) {
                    panic!("GPU {g} of {} given to jobs {other} and {}", r.node, job.id);
                }
                u.gpus.insert(*g);
            }
            if let Some(p) = r.port {
                assert!(u.ports.insert(p), "port {p} of {} leased twice", r.node);
            }
        }
        let Some(allocation) = &job.allocation else {
            assert!(
                job.ranks.is_empty(),
                "job {} has ranks but no allocation",
                job.id
            );
            continue;
        };
        for na in allocation.nodes.iter().filter(|na| !na.released) {
            if !job.state.is_terminal() {
                let node = &state.nodes[&na.node];
                assert_eq!(
                    node.status,
                    NodeStatus::Up,
                    "live job {} holds down node {}",
                    job.id,
                    na.node
                );
            }
            let u = expected
                .get_mut(&na.node)
                .expect("allocation on a known node");
            u.cpus += na.cpus;
            u.memory_mib += na.memory_mib;
            for g in &na.gpus {
                if let Some(other) = gpu_owner.insert((na.node.clone(), *g), job.id) {
                    panic!(
                        "GPU {g} of {} given to jobs {other} and {}",
                        na.node, job.id
                    );
                }
                u.gpus.insert(*g);
            }
            if na.group_rank == 0 {
                assert!(
                    u.ports.insert(allocation.master_port),
                    "port {} of {} leased twice",
                    allocation.master_port,
                    na.node
                );
            }
        }
        if job.state.is_terminal() {
            // An ended job holds a node only while some rank there may still run: one not yet
            // ended, or one lost with its node whose agent has not said it is gone.
            for na in allocation.nodes.iter().filter(|na| !na.released) {
                assert!(
                    na.awaiting_agent
                        || job
                            .ranks
                            .iter()
                            .any(|r| r.node == na.node && !r.phase.is_terminal()),
                    "ended job {} holds {} with every rank there ended",
                    job.id,
                    na.node
                );
            }
        }
    }
    for (node_id, node) in &state.nodes {
        assert_eq!(node.usage, expected[node_id], "usage of {node_id}");
        assert!(
            node.usage.cpus <= node.resources.cpus,
            "{node_id} overcommitted"
        );
        for g in &node.usage.gpus {
            assert!(
                node.resources.gpus.iter().any(|gpu| gpu.index == *g),
                "{node_id} lends GPU {g} it does not have"
            );
        }
    }
    for job_id in &state.queue {
        assert_eq!(
            state.jobs[job_id].state,
            JobState::Pending,
            "queued job {job_id}"
        );
    }
    let pending = state.jobs.values().filter(|j| j.state == JobState::Pending);
    assert_eq!(
        pending.count(),
        state.queue.len(),
        "every pending job is queued"
    );
}

/// Two 8-GPU, 32-CPU nodes.
fn two_nodes() -> State {
    let mut state = State::default();
    register(&mut state, "node-1", 32, 8);
    register(&mut state, "node-2", 32, 8);
    state
}

/// Two nodes and a placed job of 2 nodes x 2 ranks x 2 GPUs, ranks 0-1 on node-1, 2-3 on node-2.
fn placed_job() -> (State, JobId) {
    let mut state = two_nodes();
    let job = submit(&mut state, 2, 2, 2);
    let placement = plan_for(&state, job);
    let nodes = [
        NodePlacement {
            node: id("node-1"),
            gpus: vec![0, 1],
        },
        NodePlacement {
            node: id("node-2"),
            gpus: vec![0, 1],
        },
    ];
    let placement = Placement {
        nodes: nodes.to_vec(),
        ..placement
    };
    assert_eq!(
        apply_place(&mut state, job, placement),
        CommandOutcome::Done
    );
    (state, job)
}

fn running_job() -> (State, JobId) {
    let (mut state, job) = placed_job();
    report_all(&mut state, job, RankPhase::Running, None);
    assert_eq!(job_state(&state, job), JobState::Running);
    (state, job)
}

#[test]
fn submissions_get_ids_in_order_and_queue_first_come_first_served() {
    let mut state = State::default();
    let ids: Vec<JobId> = (0..3).map(|_| submit(&mut state, 1, 1, 0)).collect();
    assert_eq!(ids, [JobId(1), JobId(2), JobId(3)]);
    assert_eq!(state.queue, ids);
    for id in &ids {
        let job = &state.jobs[id];
        assert_eq!(job.state, JobState::Pending);
        assert_eq!((job.attempt, job.submitted_at_ms), (0, AT));
        assert!(job.allocation.is_none() && job.ranks.is_empty());
    }
    // `apply` does not re-run spec validation (the API is the gate, before the write): a spec in the
    // log is applied as it was accepted, even one today's rules refuse, so a later release's rules
    // never change what an old log replays to. (The API's refusal: tests/in_process.rs.)
    let mut refused_today = spec(1, 1, 0);
    refused_today.name = "Train".into();
    assert!(refused_today.validate().is_err());
    assert_eq!(submit_spec(&mut state, refused_today), JobId(4));
    assert_eq!(submit(&mut state, 1, 1, 0), JobId(5));
    check_invariants(&state);
}

#[test]
fn placement_consumes_resources_and_leases_the_port_on_group_rank_0s_node() {
    let mut state = two_nodes();
    let job = submit(&mut state, 2, 4, 4);
    let placement = place(&mut state, job);
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Starting);
    assert_eq!(j.started_at_ms, Some(AT + 1));
    assert!(state.queue.is_empty());
    let allocation = j.allocation.as_ref().unwrap();
    let first = placement.nodes[0].node.clone();
    let second = placement.nodes[1].node.clone();
    assert_eq!(allocation.master_addr, address(&first.0));
    assert_eq!(allocation.master_port, PORTS.0);
    assert_eq!(
        state.nodes[&first].usage.ports,
        BTreeSet::from([PORTS.0]),
        "the port is leased on group rank 0's node"
    );
    assert!(state.nodes[&second].usage.ports.is_empty());
    for (group_rank, node) in [&first, &second].into_iter().enumerate() {
        let u = &state.nodes[node].usage;
        assert_eq!(u.cpus, 4, "cpus_per_node defaults to procs_per_node");
        assert_eq!(u.gpus.len(), 4);
        let na = &allocation.nodes[group_rank];
        assert_eq!((&na.node, na.group_rank), (node, group_rank as u32));
        assert_eq!(na.gpus, placement.nodes[group_rank].gpus);
        assert!(!na.released);
    }
    let ranks: Vec<(u32, u32, &str, RankPhase)> = j
        .ranks
        .iter()
        .map(|r| (r.rank, r.local_rank, r.node.0.as_str(), r.phase))
        .collect();
    let want: Vec<(u32, u32, &str, RankPhase)> = (0..8)
        .map(|r| {
            let node = if r < 4 { &first } else { &second };
            (r, r % 4, node.0.as_str(), RankPhase::Pending)
        })
        .collect();
    assert_eq!(ranks, want);

    // A second job takes the other GPUs and the next port.
    let second_job = submit(&mut state, 1, 4, 4);
    let p2 = place(&mut state, second_job);
    let port2 = state.jobs[&second_job]
        .allocation
        .as_ref()
        .unwrap()
        .master_port;
    if p2.nodes[0].node == first {
        assert_eq!(port2, PORTS.0 + 1, "the first node's next free port");
    }
    // Now nothing fits: a third 4-GPU job stays queued.
    let third = submit(&mut state, 1, 4, 4);
    let left = if p2.nodes[0].node == first {
        &second
    } else {
        &first
    };
    assert_eq!(state.nodes[left].usage.gpus.len(), 4);
    let _ = place(&mut state, third);
    let full = submit(&mut state, 1, 1, 1);
    assert!(scheduler::plan(&state.cluster_snapshot(), &state.jobs[&full].spec.resources).is_err());
    assert_eq!(state.queue, [full]);
}

#[test]
fn stale_plans_are_rejected_and_change_nothing() {
    type Stale = fn(&mut State, &mut Placement, JobId);
    // (what made the plan stale, words of the rejection)
    let cases: &[(&str, Stale, &str)] = &[
        (
            "node down",
            |s, _, _| assert_eq!(lose(s, "node-2"), CommandOutcome::Done),
            "node-2 which is down",
        ),
        (
            "GPUs taken by another job",
            |s, p, _| {
                let other = submit(s, 1, 1, 1);
                let mut theirs = plan_for(s, other);
                theirs.nodes[0] = NodePlacement {
                    node: p.nodes[1].node.clone(),
                    gpus: vec![p.nodes[1].gpus[0]],
                };
                theirs.master_port = PORTS.1;
                assert_eq!(apply_place(s, other, theirs), CommandOutcome::Done);
            },
            "no longer has room",
        ),
        (
            "CPUs taken by another job",
            |s, p, _| {
                let mut big = spec(1, 1, 0);
                big.resources.cpus_per_node = 31;
                let other = submit_spec(s, big);
                let theirs = Placement {
                    nodes: vec![NodePlacement {
                        node: p.nodes[0].node.clone(),
                        gpus: vec![],
                    }],
                    master_port: PORTS.1,
                };
                assert_eq!(apply_place(s, other, theirs), CommandOutcome::Done);
            },
            "no longer has room",
        ),
        (
            "port taken by another job",
            |s, p, _| {
                let other = submit(s, 1, 1, 1);
                let theirs = Placement {
                    nodes: vec![NodePlacement {
                        node: p.nodes[0].node.clone(),
                        gpus: vec![7],
                    }],
                    master_port: p.master_port,
                };
                assert_eq!(apply_place(s, other, theirs), CommandOutcome::Done);
            },
            "is taken",
        ),
        (
            "port outside the node's range",
            |_, p, _| p.master_port = PORTS.1 + 1,
            "outside the range",
        ),
        (
            "unknown node",
            |_, p, _| p.nodes[1].node = id("node-9"),
            "unknown node node-9",
        ),
        (
            "node used twice",
            |_, p, _| p.nodes[1] = p.nodes[0].clone(),
            "twice",
        ),
        (
            "too few nodes",
            |_, p, _| {
                p.nodes.pop();
            },
            "plan has 1 nodes",
        ),
        (
            "wrong GPU count",
            |_, p, _| {
                p.nodes[0].gpus.pop();
            },
            "no longer has room",
        ),
        (
            "GPU the node does not have",
            |_, p, _| p.nodes[0].gpus[0] = 8,
            "no longer has room",
        ),
        (
            "job cancelled meanwhile",
            |s, _, job| assert_eq!(cancel(s, job), CommandOutcome::Done),
            "cancelled, not pending",
        ),
    ];
    for (what, make_stale, words) in cases {
        let mut state = two_nodes();
        let job = submit(&mut state, 2, 2, 2);
        let mut placement = plan_for(&state, job);
        make_stale(&mut state, &mut placement, job);
        let before = state.clone();
        match apply_place(&mut state, job, placement) {
            CommandOutcome::Rejected { reason } => {
                assert!(reason.contains(words), "{what}: `{reason}` lacks `{words}`")
            }
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
        assert_eq!(state, before, "{what}: a rejected plan changes nothing");
        check_invariants(&state);
    }
    let mut state = two_nodes();
    assert_rejected(
        apply_place(
            &mut state,
            JobId(42),
            Placement {
                nodes: vec![],
                master_port: PORTS.0,
            },
        ),
        "job 42 does not exist",
    );
}

#[test]
fn a_plan_naming_one_gpu_twice_is_rejected() {
    let mut state = two_nodes();
    let job = submit(&mut state, 1, 2, 2);
    let mut placement = plan_for(&state, job);
    placement.nodes[0].gpus = vec![3, 3];
    let before = state.clone();
    assert_rejected(
        apply_place(&mut state, job, placement),
        "no longer has room",
    );
    assert_eq!(state, before);
}

#[test]
fn all_ranks_running_makes_the_job_running() {
    let (mut state, job) = placed_job();
    for (node, rank) in [("node-1", 0), ("node-1", 1), ("node-2", 2)] {
        report(&mut state, node, job, rank, RankPhase::Running, None);
        assert_eq!(
            job_state(&state, job),
            JobState::Starting,
            "after rank {rank}"
        );
    }
    report(&mut state, "node-2", job, 3, RankPhase::Running, None);
    assert_eq!(job_state(&state, job), JobState::Running);
    assert_eq!(state.jobs[&job].ranks[3].pid, Some(1003));
}

#[test]
fn all_ranks_exiting_0_succeeds_and_returns_every_resource() {
    let (mut state, job) = running_job();
    for (node, rank) in [("node-1", 0), ("node-1", 1), ("node-2", 2)] {
        report(&mut state, node, job, rank, RankPhase::Exited, Some(0));
        assert_eq!(
            job_state(&state, job),
            JobState::Running,
            "after rank {rank}"
        );
    }
    assert!(!idle(&state, "node-1") && !idle(&state, "node-2"));
    report(&mut state, "node-2", job, 3, RankPhase::Exited, Some(0));
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(
        (j.reason.as_deref(), j.finished_at_ms),
        (None, Some(AT + 2))
    );
    assert!(idle(&state, "node-1") && idle(&state, "node-2"));
    assert!(released(&state, job, "node-1") && released(&state, job, "node-2"));
}

#[test]
fn a_nonzero_exit_fails_the_gang_and_nodes_are_released_as_their_ranks_end() {
    let (mut state, job) = running_job();
    report(&mut state, "node-2", job, 2, RankPhase::Exited, Some(0));
    report(&mut state, "node-2", job, 3, RankPhase::Exited, Some(7));
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(
        j.reason.as_deref(),
        Some("rank 3 on node-2 exited with code 7")
    );
    // node-2's ranks have all ended: its share is back. node-1's ranks still run: held.
    assert!(released(&state, job, "node-2") && idle(&state, "node-2"));
    assert!(!released(&state, job, "node-1"));
    assert_eq!(usage(&state, "node-1").ports, BTreeSet::from([PORTS.0]));
    // The agent stops node-1's ranks (SIGTERM): the share comes back, the reason stays.
    report(&mut state, "node-1", job, 0, RankPhase::Exited, Some(-15));
    assert!(!released(&state, job, "node-1"), "rank 1 still runs");
    report(&mut state, "node-1", job, 1, RankPhase::Exited, Some(-15));
    assert!(released(&state, job, "node-1") && idle(&state, "node-1"));
    let j = &state.jobs[&job];
    assert_eq!(
        j.reason.as_deref(),
        Some("rank 3 on node-2 exited with code 7")
    );
    assert_eq!(j.ranks[0].exit_code, Some(-15));
}

#[test]
fn exit_reasons_name_rank_node_and_how() {
    // (phase, exit code, reason)
    let cases: &[(RankPhase, Option<i32>, &str)] = &[
        (
            RankPhase::Exited,
            Some(1),
            "rank 2 on node-2 exited with code 1",
        ),
        (
            RankPhase::Exited,
            Some(-9),
            "rank 2 on node-2 was killed by signal 9",
        ),
        (RankPhase::Exited, None, "rank 2 on node-2 exited"),
        (
            RankPhase::FailedToStart,
            None,
            "rank 2 on node-2 failed to start: no such file: python3",
        ),
    ];
    for (phase, exit, want) in cases {
        let (mut state, job) = placed_job();
        report(&mut state, "node-2", job, 2, *phase, *exit);
        let j = &state.jobs[&job];
        assert_eq!(j.state, JobState::Failed, "{want}");
        assert_eq!(j.reason.as_deref(), Some(*want));
    }
}

#[test]
fn failed_to_start_fails_the_job_with_the_message() {
    let (mut state, job) = placed_job();
    report(&mut state, "node-1", job, 0, RankPhase::Running, None);
    report(&mut state, "node-1", job, 1, RankPhase::FailedToStart, None);
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Failed);
    let reason = j.reason.as_deref().unwrap();
    assert!(reason.contains("no such file: python3"), "{reason}");
    assert_eq!(j.ranks[1].message.as_deref(), Some("no such file: python3"));
    // node-2's ranks never started: the agent there says it runs nothing of the job.
    assert!(!released(&state, job, "node-2"));
    assert_eq!(
        report_idle(&mut state, "node-2", vec![job]),
        CommandOutcome::Done
    );
    assert!(released(&state, job, "node-2") && idle(&state, "node-2"));
    let ranks = &state.jobs[&job].ranks;
    assert_eq!(
        (ranks[2].phase, ranks[3].phase),
        (RankPhase::Lost, RankPhase::Lost)
    );
}

#[test]
fn cancelling_a_pending_job_takes_it_out_of_the_queue() {
    let mut state = State::default();
    let a = submit(&mut state, 1, 1, 0);
    let b = submit(&mut state, 1, 1, 0);
    assert_eq!(cancel(&mut state, a), CommandOutcome::Done);
    let j = &state.jobs[&a];
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.reason.as_deref(), Some("cancelled by user"));
    assert_eq!(j.finished_at_ms, Some(AT + 4));
    assert_eq!(state.queue, [b]);
}

#[test]
fn cancelling_a_running_job_holds_its_resources_until_the_ranks_end() {
    let (mut state, job) = running_job();
    assert_eq!(cancel(&mut state, job), CommandOutcome::Done);
    assert_eq!(job_state(&state, job), JobState::Cancelled);
    assert!(!released(&state, job, "node-1") && !released(&state, job, "node-2"));
    assert_eq!(usage(&state, "node-1").gpus.len(), 2);
    // Not assigned any more: the agents stop the ranks.
    assert_eq!(state.jobs_assigned_to(&id("node-1")).count(), 0);
    report(&mut state, "node-1", job, 0, RankPhase::Exited, Some(-15));
    report(&mut state, "node-1", job, 1, RankPhase::Exited, Some(-9));
    assert!(released(&state, job, "node-1") && idle(&state, "node-1"));
    assert!(!released(&state, job, "node-2"));
    // node-2's agent stopped them and forgot them: it reports the job idle.
    assert_eq!(
        report_idle(&mut state, "node-2", vec![job]),
        CommandOutcome::Done
    );
    assert!(idle(&state, "node-2"));
    let j = &state.jobs[&job];
    assert_eq!(
        j.state,
        JobState::Cancelled,
        "the exits do not change how it ended"
    );
    assert_eq!(j.reason.as_deref(), Some("cancelled by user"));
}

#[test]
fn idle_reports_for_live_jobs_are_ignored() {
    let (mut state, job) = running_job();
    let before = state.clone();
    assert_eq!(
        report_idle(&mut state, "node-1", vec![job, JobId(99)]),
        CommandOutcome::Done
    );
    assert_eq!(
        state, before,
        "a running job is not released by an idle report"
    );
}

#[test]
fn cancelling_an_ended_or_unknown_job_is_rejected() {
    let (mut state, succeeded) = running_job();
    report_all(&mut state, succeeded, RankPhase::Exited, Some(0));
    let failed = submit(&mut state, 1, 1, 0);
    place(&mut state, failed);
    let node = state.jobs[&failed].ranks[0].node.0.clone();
    report(&mut state, &node, failed, 0, RankPhase::Exited, Some(1));
    let cancelled = submit(&mut state, 1, 1, 0);
    assert_eq!(cancel(&mut state, cancelled), CommandOutcome::Done);
    for (job, words) in [
        (succeeded, "already succeeded"),
        (failed, "already failed"),
        (cancelled, "already cancelled"),
        (JobId(77), "job 77 does not exist"),
    ] {
        let before = state.clone();
        assert_rejected(cancel(&mut state, job), words);
        assert_eq!(state, before);
    }
}

#[test]
fn a_lost_node_places_its_jobs_again_and_holds_its_share_until_its_agent_answers() {
    let (mut state, job) = running_job();
    // A job on node-1 alone is not touched.
    let bystander = submit(&mut state, 1, 1, 1);
    let mut p = plan_for(&state, bystander);
    p.nodes[0].node = id("node-1");
    p.nodes[0].gpus = vec![5];
    p.master_port = PORTS.0 + 1;
    assert_eq!(apply_place(&mut state, bystander, p), CommandOutcome::Done);
    report(&mut state, "node-1", bystander, 0, RankPhase::Running, None);

    assert_eq!(lose(&mut state, "node-2"), CommandOutcome::Done);
    let n = &state.nodes[&id("node-2")];
    assert_eq!(n.status, NodeStatus::Down);
    assert_eq!(n.status_reason.as_deref(), Some("no heartbeat for 10.0s"));
    let j = &state.jobs[&job];
    // Placed again as the next attempt, at the head of the queue; a host loss is free.
    assert_eq!((j.state, j.attempt, j.restarts), (JobState::Pending, 1, 0));
    assert_eq!(state.queue.front(), Some(&job));
    let end = j.attempts[0].end.as_deref().unwrap();
    assert!(end.contains("node node-2 was lost"), "{end}");
    assert!(end.contains("no heartbeat"), "{end}");
    // Its ranks may still run behind a partition: node-2's share is held until its agent
    // answers; node-1's until its agent reports attempt 0 gone.
    let retired: Vec<(&str, bool)> = j
        .retired
        .iter()
        .map(|r| (r.node.0.as_str(), r.awaiting_agent))
        .collect();
    assert_eq!(retired, [("node-1", false), ("node-2", true)]);
    assert!(!idle(&state, "node-2"));
    assert_eq!(job_state(&state, bystander), JobState::Running);
    // Not placed while attempt 0 may still run on node-1.
    assert_rejected(
        apply_place(
            &mut state,
            job,
            Placement {
                nodes: vec![],
                master_port: PORTS.0,
            },
        ),
        "plan has 0 nodes",
    );
    report_gone(&mut state, "node-1", job, 0);
    assert_eq!(state.jobs[&job].retired.len(), 1);
    assert_eq!(usage(&state, "node-1").gpus, BTreeSet::from([5]));
    // A lost node takes no work and cannot be lost twice.
    assert!(
        !state
            .cluster_snapshot()
            .nodes
            .iter()
            .find(|c| c.node == id("node-2"))
            .unwrap()
            .up
    );
    assert_rejected(lose(&mut state, "node-2"), "already down");
    assert_rejected(lose(&mut state, "node-7"), "no node named node-7");
}

#[test]
fn a_new_agent_instance_places_the_jobs_that_ran_there_again() {
    let (mut state, job) = running_job();
    let outcome = register_instance(&mut state, "node-1", "node-1-b", 32, 8);
    assert_eq!(outcome, CommandOutcome::Done);
    check_invariants(&state);
    let j = &state.jobs[&job];
    assert_eq!((j.state, j.attempt), (JobState::Pending, 1));
    let end = j.attempts[0].end.as_deref().unwrap();
    assert!(end.contains("the agent on node-1 restarted"), "{end}");
    // The new agent reaped the old ranks: node-1 is free at once; node-2 waits for its report.
    assert!(idle(&state, "node-1"));
    assert!(!idle(&state, "node-2"));
    let n = &state.nodes[&id("node-1")];
    assert_eq!(
        (n.instance_id.as_str(), n.status),
        ("node-1-b", NodeStatus::Up)
    );
}

#[test]
fn the_same_agent_instance_registering_again_changes_nothing() {
    let (mut state, job) = running_job();
    let before = state.clone();
    let outcome = register_instance(&mut state, "node-1", "node-1-a", 32, 8);
    assert_eq!(outcome, CommandOutcome::Done);
    assert_eq!(state, before);
    assert_eq!(job_state(&state, job), JobState::Running);
    assert_rejected(
        state.apply(Command::RegisterNode {
            node: id("node-3"),
            address: address("node-3"),
            instance_id: "x".into(),
            resources: host("node-3", 4, 0),
            port_range: (30000, 29999),
            at_ms: AT,
        }),
        "is empty",
    );
    assert!(!state.nodes.contains_key(&id("node-3")));
}

#[test]
fn a_cut_off_agent_that_returns_frees_its_share_only_once_it_runs_nothing() {
    let (mut state, job) = running_job();
    lose(&mut state, "node-2");
    // The same agent process registers again: its old ranks may still be running.
    register_instance(&mut state, "node-2", "node-2-a", 32, 8);
    assert_eq!(state.nodes[&id("node-2")].status, NodeStatus::Up);
    assert!(!idle(&state, "node-2"), "held while its ranks may run");
    // Once it reports no running rank of attempt 0, the share comes back.
    report_gone(&mut state, "node-2", job, 0);
    assert!(idle(&state, "node-2"));
    report_gone(&mut state, "node-1", job, 0);
    assert!(idle(&state, "node-1"));
    assert!(state.jobs[&job].retired.is_empty());
    // Now the next attempt can be placed on the same hosts.
    place(&mut state, job);
    assert_eq!(job_state(&state, job), JobState::Starting);
    assert_eq!(state.jobs[&job].attempts.len(), 2);
}

#[test]
fn a_lost_node_that_comes_back_is_up_and_takes_work_again() {
    let (mut state, job) = running_job();
    lose(&mut state, "node-2");
    register_instance(&mut state, "node-2", "node-2-b", 32, 8);
    check_invariants(&state);
    assert_eq!(state.nodes[&id("node-2")].status, NodeStatus::Up);
    assert_eq!(state.nodes[&id("node-2")].status_reason, None);
    assert_eq!(job_state(&state, job), JobState::Pending);
    assert!(idle(&state, "node-2"));
}

#[test]
fn stale_and_misdirected_reports_are_ignored() {
    let (mut state, job) = placed_job();
    report(&mut state, "node-1", job, 0, RankPhase::Running, None);
    let obs = |state: &State, rank| observation(state, job, rank, RankPhase::Exited, Some(1));
    type Make = fn(&State, JobId, RankObservation) -> Command;
    // (what, the command, whether apply says Rejected)
    let cases: &[(&str, Make, bool)] = &[
        (
            "a previous agent instance",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-1"),
                instance_id: "node-1-old".into(),
                observations: vec![o],
                idle_jobs: vec![],
                at_ms: AT,
            },
            true,
        ),
        (
            "an unknown node",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-9"),
                instance_id: "node-9-a".into(),
                observations: vec![o],
                idle_jobs: vec![],
                at_ms: AT,
            },
            true,
        ),
        (
            "another attempt",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-1"),
                instance_id: "node-1-a".into(),
                observations: vec![RankObservation {
                    attempt: o.attempt + 1,
                    ..o
                }],
                idle_jobs: vec![],
                at_ms: AT,
            },
            false,
        ),
        (
            "a rank of another node",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-2"),
                instance_id: "node-2-a".into(),
                observations: vec![o],
                idle_jobs: vec![],
                at_ms: AT,
            },
            false,
        ),
        (
            "a rank the job does not have",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-1"),
                instance_id: "node-1-a".into(),
                observations: vec![RankObservation { rank: 40, ..o }],
                idle_jobs: vec![],
                at_ms: AT,
            },
            false,
        ),
        (
            "a job that does not exist",
            |_, _, o| Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: id("node-1"),
                instance_id: "node-1-a".into(),
                observations: vec![RankObservation {
                    job: JobId(99),
                    ..o
                }],
                idle_jobs: vec![JobId(99)],
                at_ms: AT,
            },
            false,
        ),
    ];
    for (what, make, is_rejected) in cases {
        let before = state.clone();
        let command = make(&state, job, obs(&state, 0));
        let outcome = state.apply(command);
        assert_eq!(
            matches!(outcome, CommandOutcome::Rejected { .. }),
            *is_rejected,
            "{what}: {outcome:?}"
        );
        assert_eq!(state, before, "{what}: changed the state");
        // `before` shares the jobs, as a snapshot being written does: an ignored report must not
        // copy one (`Arc::make_mut`).
        assert!(
            Arc::ptr_eq(&state.jobs[&job], &before.jobs[&job]),
            "{what}: copied the job"
        );
    }
    // A rank that has ended stays ended, whatever a later report says.
    report(&mut state, "node-1", job, 1, RankPhase::Exited, Some(3));
    let before = state.clone();
    report(&mut state, "node-1", job, 1, RankPhase::Running, None);
    report(&mut state, "node-1", job, 1, RankPhase::Exited, Some(0));
    assert_eq!(state, before);
    assert!(Arc::ptr_eq(&state.jobs[&job], &before.jobs[&job]));
}

/// A small deterministic generator (64-bit LCG, Knuth's constants) so the sequence is the same
/// on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One step of a random-ish workload: a command chosen from what makes sense in `state`.
fn random_command(state: &State, rng: &mut Lcg, step: u64) -> Command {
    let nodes: Vec<&Node> = state.nodes.values().collect();
    let at_ms = AT + step;
    match rng.below(20) {
        0 | 1 => {
            // Sizes that fit the cluster when it is empty, so the queue keeps moving.
            let gpus = [0, 1, 2, 4][rng.below(4) as usize];
            let procs = if gpus == 0 {
                1 + rng.below(2) as u32
            } else {
                gpus
            };
            Command::SubmitJob {
                secret: String::new(),
                resume_from_job: None,
                spec: spec(1 + rng.below(2) as u32, procs, gpus),
                at_ms,
            }
        }
        2..=5 => {
            // Sometimes the plan is made stale on purpose, as a slow leader's would be.
            let Some(head) = state.queue.front() else {
                return Command::CancelJob {
                    job: JobId(1 + rng.below(state.last_job_id + 1)),
                    at_ms,
                };
            };
            let res = &state.jobs[head].spec.resources;
            let mut placement = match scheduler::plan(&state.cluster_snapshot(), res) {
                Ok(p) => p,
                Err(_) => Placement {
                    nodes: nodes
                        .iter()
                        .take(res.nodes as usize)
                        .map(|n| NodePlacement {
                            node: n.id.clone(),
                            gpus: (0..res.gpus_per_node).collect(),
                        })
                        .collect(),
                    master_port: PORTS.0,
                },
            };
            if rng.below(4) == 0 {
                placement.master_port = PORTS.0 + rng.below(3) as u16;
            }
            Command::PlaceJob {
                job: *head,
                placement,
                at_ms,
            }
        }
        6..=14 => {
            // An agent reports some of its ranks.
            let node = nodes[rng.below(nodes.len() as u64) as usize];
            let mut observations = Vec::new();
            let mut idle_jobs = Vec::new();
            for job in state.jobs.values().filter(|j| j.allocation.is_some()) {
                if job.state.is_terminal() && rng.below(3) == 0 {
                    idle_jobs.push(job.id);
                    continue;
                }
                for r in job.ranks.iter().filter(|r| r.node == node.id) {
                    if rng.below(2) == 0 {
                        continue;
                    }
                    let (phase, exit) = match rng.below(8) {
                        0..=3 => (RankPhase::Running, None),
                        4 | 5 => (RankPhase::Exited, Some(0)),
                        6 => (RankPhase::Exited, Some(1)),
                        _ => (RankPhase::FailedToStart, None),
                    };
                    observations.push(RankObservation {
                        job: job.id,
                        attempt: job.attempt,
                        rank: r.rank,
                        phase,
                        exit_code: exit,
                        message: None,
                        pid: Some(r.rank + 100),
                    });
                }
            }
            let stale = rng.below(10) == 0;
            Command::ReportRanks {
                gone_attempts: Vec::new(),
                node: node.id.clone(),
                instance_id: if stale {
                    "an-old-agent".into()
                } else {
                    node.instance_id.clone()
                },
                observations,
                idle_jobs,
                at_ms,
            }
        }
        15 => Command::CancelJob {
            job: JobId(1 + rng.below(state.last_job_id.max(1))),
            at_ms,
        },
        16 => {
            let node = nodes[rng.below(nodes.len() as u64) as usize];
            Command::NodeLost {
                node: node.id.clone(),
                reason: "no heartbeat".into(),
                at_ms,
            }
        }
        _ => {
            // An agent registers again: the same process after a lost node, or a new one.
            let node = nodes[rng.below(nodes.len() as u64) as usize];
            let instance_id = if rng.below(2) == 0 {
                node.instance_id.clone()
            } else {
                format!("{}-{step}", node.id)
            };
            Command::RegisterNode {
                node: node.id.clone(),
                address: node.address.clone(),
                instance_id,
                resources: node.resources.clone(),
                port_range: node.port_range,
                at_ms,
            }
        }
    }
}

/// Applies a long deterministic workload, checking the invariants after every step; returns
/// every command, the final state and the job states seen on the way.
fn random_workload(seed: u64, steps: u64) -> (Vec<Command>, State, BTreeSet<&'static str>) {
    let mut state = State::default();
    for (name, gpus) in [("node-1", 8), ("node-2", 8), ("node-3", 4), ("node-4", 0)] {
        register(&mut state, name, 16, gpus);
    }
    let mut rng = Lcg(seed);
    let mut commands = Vec::new();
    let mut seen = BTreeSet::new();
    for step in 0..steps {
        let command = random_command(&state, &mut rng, step);
        commands.push(command.clone());
        state.apply(command.clone());
        check_invariants(&state);
        seen.extend(state.jobs.values().map(|j| j.state.as_str()));
    }
    (commands, state, seen)
}

#[test]
fn invariants_hold_through_a_long_random_workload() {
    // check_invariants runs after every step; here, check the workload went everywhere.
    for seed in [1, 2, 3, 0x5eed] {
        let (_, state, seen) = random_workload(seed, 1500);
        let all = [
            "pending",
            "starting",
            "running",
            "succeeded",
            "failed",
            "cancelled",
        ];
        assert_eq!(seen, BTreeSet::from(all), "seed {seed}: states reached");
        let ended = state
            .jobs
            .values()
            .filter(|j| j.state.is_terminal())
            .count();
        assert!(ended > 50, "seed {seed}: only {ended} jobs ended");
    }
}

#[test]
fn a_batch_applies_its_commands_in_order_with_one_outcome_each() {
    let mut batched = State::default();
    let mut one_by_one = State::default();
    let spec = |name: &str| {
        JobSpec::from_toml(
            &format!("name = \"{name}\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = 1\nprocs_per_node = 1\n"),
            "test.toml",
        )
        .unwrap()
    };
    let commands = vec![
        Command::SubmitJob {
            secret: String::new(),
            resume_from_job: None,
            spec: spec("a"),
            at_ms: AT,
        },
        Command::CancelJob {
            job: JobId(1),
            at_ms: AT,
        },
        Command::CancelJob {
            job: JobId(1),
            at_ms: AT,
        },
        Command::SubmitJob {
            secret: String::new(),
            resume_from_job: None,
            spec: spec("b"),
            at_ms: AT,
        },
    ];
    let outcome = batched.apply(Command::Batch(commands.clone()));
    let expected: Vec<CommandOutcome> = commands.into_iter().map(|c| one_by_one.apply(c)).collect();
    assert_eq!(outcome, CommandOutcome::Batch(expected.clone()));
    assert_eq!(expected[0], CommandOutcome::JobSubmitted { job: JobId(1) });
    assert!(
        matches!(expected[2], CommandOutcome::Rejected { .. }),
        "second cancel sees the first"
    );
    assert_eq!(expected[3], CommandOutcome::JobSubmitted { job: JobId(2) });
    assert_eq!(batched, one_by_one);
}

#[test]
fn apply_is_deterministic() {
    let (commands, _, _) = random_workload(7, 800);
    let replay = |commands: &[Command]| {
        let mut state = State::default();
        for (name, gpus) in [("node-1", 8), ("node-2", 8), ("node-3", 4), ("node-4", 0)] {
            register(&mut state, name, 16, gpus);
        }
        let outcomes: Vec<CommandOutcome> =
            commands.iter().cloned().map(|c| state.apply(c)).collect();
        (state, outcomes)
    };
    let (a, outcomes_a) = replay(&commands);
    let (b, outcomes_b) = replay(&commands);
    assert_eq!(a, b);
    assert_eq!(outcomes_a, outcomes_b);
    assert_eq!(a, random_workload(7, 800).1);
}

#[test]
fn state_round_trips_through_json() {
    let (_, state, _) = random_workload(11, 600);
    assert!(state.jobs.values().any(|j| j.allocation.is_some()));
    let json = serde_json::to_vec(&state).unwrap();
    let back: State = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, state);
    // And a state in the middle of things: placed, running, with leases held.
    let (state, _) = running_job();
    let back: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(back, state);
}

fn spec_text(extra_resources: &str, tables: &str) -> JobSpec {
    let text = format!(
        "name = \"train\"\n[launch]\ncommand = [\"python3\", \"train.py\"]\nworkdir = \"/work\"\n\
         [resources]\nprocs_per_node = 2\ngpus_per_node = 2\n{extra_resources}\n{tables}"
    );
    JobSpec::from_toml(&text, "test.toml").expect("test spec is valid")
}

/// Two nodes and a running job of 2 nodes x 2 ranks with this budget and checkpoint table.
fn running_job_with(tables: &str) -> (State, JobId) {
    let mut state = two_nodes();
    let job = submit_spec(&mut state, spec_text("nodes = 2", tables));
    place(&mut state, job);
    report_all(&mut state, job, RankPhase::Running, None);
    (state, job)
}

fn commit(state: &mut State, job: JobId, attempt: u32, path: &str, step: u64) -> CommandOutcome {
    let outcome = state.apply(Command::CommitCheckpoint {
        job,
        attempt,
        path: path.to_string(),
        step,
        metrics: None,
        at_ms: AT + step,
    });
    check_invariants(state);
    outcome
}

#[test]
fn a_crash_within_the_budget_restarts_the_gang_in_place_with_a_new_port() {
    let (mut state, job) = running_job_with("[failure]\nmax_restarts = 2\n");
    let before = state.jobs[&job].allocation.clone().unwrap();
    report(&mut state, "node-2", job, 3, RankPhase::Exited, Some(1));
    let j = &state.jobs[&job];
    assert_eq!((j.state, j.attempt, j.restarts), (JobState::Starting, 1, 1));
    let after = j.allocation.clone().unwrap();
    assert_eq!(after.nodes, before.nodes, "the same hosts and GPUs");
    assert_ne!(
        after.master_port, before.master_port,
        "a fresh rendezvous port"
    );
    assert!(j.ranks.iter().all(|r| r.phase == RankPhase::Pending));
    assert_eq!(
        j.attempts[0].end.as_deref(),
        Some("rank 3 on node-2 exited with code 1")
    );
    // The old port stays held until the old rank 0's host reports attempt 0 gone.
    assert!(usage(&state, "node-1").ports.contains(&before.master_port));
    // Reports of the old attempt change nothing.
    let stale = state.clone();
    let o = RankObservation {
        attempt: 0,
        ..observation(&state, job, 0, RankPhase::Exited, Some(1))
    };
    let instance_id = state.nodes[&id("node-1")].instance_id.clone();
    state.apply(Command::ReportRanks {
        node: id("node-1"),
        instance_id,
        observations: vec![o],
        idle_jobs: vec![],
        at_ms: AT,
        gone_attempts: vec![],
    });
    assert_eq!(state, stale);
    report_gone(&mut state, "node-1", job, 0);
    assert!(!usage(&state, "node-1").ports.contains(&before.master_port));
    // The new attempt runs to the end.
    report_all(&mut state, job, RankPhase::Running, None);
    report_all(&mut state, job, RankPhase::Exited, Some(0));
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.attempts[1].end.as_deref(), Some("succeeded"));
    assert!(idle(&state, "node-1") && idle(&state, "node-2"));
}

#[test]
fn a_spent_budget_fails_the_job_with_the_first_failure_in_report_order() {
    let (mut state, job) = running_job_with("[failure]\nmax_restarts = 1\n");
    report(&mut state, "node-1", job, 1, RankPhase::Exited, Some(-9));
    assert_eq!(state.jobs[&job].attempt, 1);
    report_all(&mut state, job, RankPhase::Running, None);
    // Rank 3 fails first, then rank 0 (higher and lower numbers, in that order, one report).
    let instance_id = state.nodes[&id("node-2")].instance_id.clone();
    let first = RankObservation {
        message: Some("last output:\n  boom".into()),
        ..observation(&state, job, 3, RankPhase::Exited, Some(7))
    };
    state.apply(Command::ReportRanks {
        node: id("node-2"),
        instance_id,
        observations: vec![
            first,
            observation(&state, job, 2, RankPhase::Exited, Some(1)),
        ],
        idle_jobs: vec![],
        at_ms: AT,
        gone_attempts: vec![],
    });
    check_invariants(&state);
    let j = &state.jobs[&job];
    assert_eq!((j.state, j.restarts), (JobState::Failed, 1));
    let reason = j.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("rank 3 on node-2 exited with code 7\nlast output:\n  boom"),
        "{reason}"
    );
    assert!(
        reason.contains("all 1 restart of the budget were used"),
        "{reason}"
    );
    assert_eq!(
        j.attempts[0].end.as_deref(),
        Some("rank 1 on node-1 was killed by signal 9")
    );
}

#[test]
fn the_leader_restarts_hung_and_growing_gangs_only_on_their_current_attempt() {
    let (mut state, job) =
        running_job_with("[failure]\nmax_restarts = 1\nhang_timeout = \"10m\"\n");
    let restart = |attempt, end| Command::RestartJob {
        job,
        attempt,
        reason: "hung: no progress for 10m since step 12".into(),
        end,
        at_ms: AT,
    };
    assert_rejected(state.apply(restart(3, AttemptEnd::Hung)), "not 3");
    assert_eq!(
        state.apply(restart(0, AttemptEnd::Hung)),
        CommandOutcome::Done
    );
    check_invariants(&state);
    let j = &state.jobs[&job];
    assert_eq!((j.attempt, j.restarts, j.state), (1, 1, JobState::Starting));
    // A resize does not spend the budget and places the gang again.
    assert_eq!(
        state.apply(restart(1, AttemptEnd::Resize)),
        CommandOutcome::Done
    );
    let j = &state.jobs[&job];
    assert_eq!((j.attempt, j.restarts, j.state), (2, 1, JobState::Pending));
    // A second hang would exceed the budget: the job fails.
    for attempt in [0, 1] {
        report_gone(&mut state, "node-1", job, attempt);
        report_gone(&mut state, "node-2", job, attempt);
    }
    place(&mut state, job);
    assert_eq!(
        state.apply(restart(2, AttemptEnd::Hung)),
        CommandOutcome::Done
    );
    assert_eq!(job_state(&state, job), JobState::Failed);
}

#[test]
fn checkpoints_are_recorded_per_attempt_inside_the_dir_and_pruned_by_keep() {
    let (mut state, job) = running_job_with(
        "[failure]\nmax_restarts = 1\n[checkpoint]\ndir = \"ckpt/{name}-{job}\"\nkeep = 2\n",
    );
    let dir = format!("/work/ckpt/train-{job}");
    assert_eq!(
        state.jobs[&job].checkpoint_dir().as_deref(),
        Some(dir.as_str())
    );
    let cases: &[(&str, u32, &str)] = &[
        ("/etc/passwd", 0, "outside the job's checkpoint dir"),
        ("/work/ckpt/train-1/../../x", 0, "outside"),
        ("", 0, "1 to 4096 bytes"),
        ("step-1", 5, "attempt 5 of job 1 is over"),
    ];
    for (path, attempt, words) in cases {
        assert_rejected(commit(&mut state, job, *attempt, path, 1), words);
    }
    let committed = |pruned: &[&str]| CommandOutcome::CheckpointCommitted {
        pruned: pruned.iter().map(|p| p.to_string()).collect(),
    };
    let p = |step: u64| format!("{dir}/step-{step}");
    assert_eq!(commit(&mut state, job, 0, &p(10), 10), committed(&[]));
    // A retried commit (lost reply) is recorded once.
    assert_eq!(commit(&mut state, job, 0, &p(10), 10), committed(&[]));
    assert_eq!(commit(&mut state, job, 0, "step-20", 20), committed(&[]));
    assert_eq!(commit(&mut state, job, 0, &p(30), 30), committed(&[&p(10)]));
    let steps: Vec<u64> = state.jobs[&job]
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [20, 30]);
    // The next attempt resumes from the newest; the old attempt can no longer commit.
    report(&mut state, "node-1", job, 0, RankPhase::Exited, Some(1));
    let j = &state.jobs[&job];
    assert_eq!(j.resume_point().map(|c| c.step), Some(30));
    assert_rejected(commit(&mut state, job, 0, &p(40), 40), "is over");
    // Another job can start from it.
    let other = state.apply(Command::SubmitJob {
        spec: spec_text("nodes = 1", ""),
        at_ms: AT,
        secret: "s".into(),
        resume_from_job: Some(job),
    });
    let CommandOutcome::JobSubmitted { job: other } = other else {
        panic!("{other:?}")
    };
    assert_eq!(state.jobs[&other].resume_point().map(|c| c.step), Some(30));
    assert_rejected(
        state.apply(Command::SubmitJob {
            spec: spec_text("nodes = 1", ""),
            at_ms: AT,
            secret: "s".into(),
            resume_from_job: Some(JobId(77)),
        }),
        "does not exist",
    );
}

#[test]
fn attempt_tokens_differ_per_job_and_attempt() {
    let a = attempt_token("secret", JobId(1), 0);
    assert_eq!(a.len(), 64);
    assert_eq!(a, attempt_token("secret", JobId(1), 0));
    assert_ne!(a, attempt_token("secret", JobId(1), 1));
    assert_ne!(a, attempt_token("secret", JobId(2), 0));
    assert_ne!(a, attempt_token("other", JobId(1), 0));
}

#[test]
fn an_elastic_gang_takes_what_fits_shrinks_when_a_host_is_lost_and_never_below_min() {
    let mut state = State::default();
    for n in 1..=3 {
        register(&mut state, &format!("node-{n}"), 32, 2);
    }
    let job = submit_spec(&mut state, spec_text("nodes = \"2:4\"", ""));
    place(&mut state, job);
    assert_eq!(state.jobs[&job].ranks.len(), 6, "3 hosts fit, not 4");
    report_all(&mut state, job, RankPhase::Running, None);
    lose(&mut state, "node-3");
    for n in ["node-1", "node-2"] {
        report_gone(&mut state, n, job, 0);
    }
    place(&mut state, job);
    let j = &state.jobs[&job];
    assert_eq!((j.ranks.len(), j.attempt, j.restarts), (4, 1, 0));
    let world: Vec<u32> = j.attempts.iter().map(|a| a.world_size).collect();
    assert_eq!(world, [6, 4]);
    report_all(&mut state, job, RankPhase::Running, None);
    lose(&mut state, "node-2");
    report_gone(&mut state, "node-1", job, 1);
    let err = scheduler::plan(&state.cluster_snapshot(), &state.jobs[&job].spec.resources);
    assert!(
        matches!(err, Err(scheduler::Unschedulable::NoRoomNow(_))),
        "{err:?}"
    );
}

#[test]
fn drained_nodes_take_no_work_and_only_idle_or_down_nodes_are_removed() {
    let (mut state, job) = running_job();
    let drain = |node: &str, drained| Command::SetNodeDrained {
        node: id(node),
        drained,
    };
    let remove = |node: &str| Command::RemoveNode {
        node: id(node),
        at_ms: AT,
    };
    assert_rejected(state.apply(remove("node-2")), "drain it first");
    assert_eq!(state.apply(drain("node-2", true)), CommandOutcome::Done);
    let up = |state: &State, node: &str| {
        state
            .cluster_snapshot()
            .nodes
            .iter()
            .any(|c| c.node == id(node) && c.up)
    };
    assert!(!up(&state, "node-2"));
    assert_rejected(state.apply(remove("node-2")), "still runs job");
    assert_eq!(state.apply(drain("node-2", false)), CommandOutcome::Done);
    assert!(up(&state, "node-2"));
    // A down node whose share is held (its ranks may run) is removed, and what it held freed.
    lose(&mut state, "node-2");
    assert_eq!(state.apply(remove("node-2")), CommandOutcome::Done);
    check_invariants(&state);
    assert!(!state.nodes.contains_key(&id("node-2")));
    assert!(state.jobs[&job]
        .retired
        .iter()
        .all(|r| r.node != id("node-2")));
    // The job now needs 2 hosts of a 1-host cluster: the scheduler says never.
    let err = scheduler::plan(&state.cluster_snapshot(), &state.jobs[&job].spec.resources);
    assert!(
        matches!(err, Err(scheduler::Unschedulable::NeverFits(_))),
        "{err:?}"
    );
    assert_rejected(state.apply(remove("node-9")), "no node named node-9");
}

#[test]
fn job_ids_have_one_spelling() {
    for (text, id) in [
        ("0", 0),
        ("1", 1),
        ("42", 42),
        ("18446744073709551615", u64::MAX),
    ] {
        assert_eq!(text.parse::<JobId>(), Ok(JobId(id)), "{text}");
    }
    for text in [
        "",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1\n",
        "\t1",
        "01",
        "00",
        "1.0",
        "1e3",
        "0x1",
        "1_000",
        "\u{ff11}",
        "18446744073709551616",
    ] {
        let err = text.parse::<JobId>().unwrap_err();
        assert!(err.contains("is not a job id"), "{text:?}: {err}");
        assert!(
            !err.contains('\n'),
            "{text:?}: the message escapes control characters: {err}"
        );
    }
}

fn token_record(id: &str, name: &str, role: Role) -> TokenRecord {
    TokenRecord {
        id: id.to_string(),
        name: name.to_string(),
        role,
        namespace: None,
        secret_sha256: secret_digest("secret"),
        created_at_ms: AT,
        created_by: "admin".into(),
        expires_at_ms: None,
        revoked_at_ms: None,
    }
}

fn admit(state: &mut State, node: &str, fingerprint: &str, token: &str) -> CommandOutcome {
    state.apply(Command::AdmitAgent {
        node: id(node),
        fingerprint: fingerprint.to_string(),
        token_id: token.to_string(),
        at_ms: AT,
    })
}

#[test]
fn a_node_name_belongs_to_one_identity_until_the_node_is_removed() {
    let mut state = State::default();
    state.apply(Command::CreateToken {
        record: token_record("a1", "rack-1", Role::Agent),
    });
    state.apply(Command::CreateToken {
        record: token_record("s1", "ci", Role::Submit),
    });
    assert_eq!(
        admit(&mut state, "node-1", "fp-1", "a1"),
        CommandOutcome::Done
    );
    // Again with the same certificate: idempotent.
    assert_eq!(
        admit(&mut state, "node-1", "fp-1", "a1"),
        CommandOutcome::Done
    );
    // Another certificate for the same name: refused, whatever the token.
    let CommandOutcome::Rejected { reason } = admit(&mut state, "node-1", "fp-2", "a1") else {
        panic!("a second identity took node-1");
    };
    assert!(
        reason.contains("belongs to another agent identity"),
        "{reason}"
    );
    // Only agent tokens admit agents; unknown tokens admit nothing.
    assert!(matches!(
        admit(&mut state, "node-2", "fp-3", "s1"),
        CommandOutcome::Rejected { .. }
    ));
    assert!(matches!(
        admit(&mut state, "node-2", "fp-3", "zz"),
        CommandOutcome::Rejected { .. }
    ));
    assert_eq!(state.node_of_identity("fp-1"), Some(&id("node-1")));
    // Removing the node (here never registered) frees the name for a new identity.
    register(&mut state, "node-1", 8, 0);
    state.apply(Command::NodeLost {
        node: id("node-1"),
        reason: "gone".into(),
        at_ms: AT,
    });
    assert_eq!(
        state.apply(Command::RemoveNode {
            node: id("node-1"),
            at_ms: AT
        }),
        CommandOutcome::Done
    );
    assert_eq!(state.node_of_identity("fp-1"), None);
    assert_eq!(
        admit(&mut state, "node-1", "fp-2", "a1"),
        CommandOutcome::Done
    );
}

#[test]
fn revoking_a_join_token_forgets_its_agents_and_drains_their_nodes() {
    let mut state = State::default();
    for (token, name) in [("a1", "rack-1"), ("a2", "rack-2")] {
        state.apply(Command::CreateToken {
            record: token_record(token, name, Role::Agent),
        });
    }
    for (node, fp, token) in [("node-1", "fp-1", "a1"), ("node-2", "fp-2", "a2")] {
        assert_eq!(admit(&mut state, node, fp, token), CommandOutcome::Done);
        register(&mut state, node, 8, 0);
    }
    assert_eq!(
        state.apply(Command::RevokeToken {
            id: "a1".into(),
            at_ms: AT + 1
        }),
        CommandOutcome::Done
    );
    assert_eq!(state.node_of_identity("fp-1"), None);
    assert!(state.nodes[&id("node-1")].drained);
    assert_eq!(state.node_of_identity("fp-2"), Some(&id("node-2")));
    assert!(!state.nodes[&id("node-2")].drained);
    assert_eq!(state.tokens["a1"].revoked_at_ms, Some(AT + 1));
    // A revoked token admits no one, and is not revoked twice.
    assert!(matches!(
        admit(&mut state, "node-3", "fp-3", "a1"),
        CommandOutcome::Rejected { .. }
    ));
    assert!(matches!(
        state.apply(Command::RevokeToken {
            id: "a1".into(),
            at_ms: AT
        }),
        CommandOutcome::Rejected { .. }
    ));
}

#[test]
fn tokens_are_validated_and_bounded() {
    let mut state = State::default();
    let table: &[(&str, Option<&str>, bool)] = &[
        ("ci", None, true),
        ("team.a_1-x", Some("team-a"), true),
        ("", None, false),
        ("Has-Upper", None, false),
        ("evil\u{1b}[2J", None, false),
        ("ok", Some("bad namespace"), false),
        (&"x".repeat(64), None, false),
    ];
    for (i, (name, namespace, ok)) in table.iter().enumerate() {
        let mut record = token_record(&format!("t{i}"), name, Role::Read);
        record.namespace = namespace.map(str::to_string);
        let outcome = state.apply(Command::CreateToken { record });
        assert_eq!(
            outcome == CommandOutcome::Done,
            *ok,
            "{name:?} {namespace:?}: {outcome:?}"
        );
    }
    // Ids are unique.
    assert!(matches!(
        state.apply(Command::CreateToken {
            record: token_record("t0", "again", Role::Read)
        }),
        CommandOutcome::Rejected { .. }
    ));
}

#[test]
fn audited_commands_record_who_and_how_and_the_trail_is_bounded() {
    let mut state = State::default();
    register(&mut state, "node-1", 8, 0);
    let actor = Actor {
        name: "alice".into(),
        namespace: Some("team-a".into()),
    };
    let outcome = state.apply(Command::Audited {
        actor: actor.clone(),
        at_ms: AT,
        command: Box::new(Command::SubmitJob {
            spec: spec(1, 1, 0),
            at_ms: AT,
            secret: String::new(),
            resume_from_job: None,
        }),
    });
    let CommandOutcome::JobSubmitted { job } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(state.jobs[&job].owner, Some(actor.clone()));
    state.apply(Command::Audited {
        actor: actor.clone(),
        at_ms: AT,
        command: Box::new(Command::CancelJob {
            job: JobId(99),
            at_ms: AT,
        }),
    });
    let trail: Vec<(&str, &str, &str)> = state
        .audit
        .iter()
        .map(|a| (a.by.as_str(), a.action.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        trail,
        [
            ("alice", "submit job `train` as job 1", "done"),
            ("alice", "cancel job 99", "refused: job 99 does not exist"),
        ]
    );
    for i in 0..(AUDIT_ENTRIES_MAX + 5) {
        state.apply(Command::Audited {
            actor: actor.clone(),
            at_ms: AT + i as u64,
            command: Box::new(Command::SetNodeDrained {
                node: id("node-1"),
                drained: i % 2 == 0,
            }),
        });
    }
    assert_eq!(state.audit.len(), AUDIT_ENTRIES_MAX);
    assert_eq!(
        state.audit.back().unwrap().at_ms,
        AT + AUDIT_ENTRIES_MAX as u64 + 4
    );
}

#[test]
fn append_logs_records_only_how_far_each_log_is_committed() {
    let (mut state, job) = running_job();
    let chunk = |rank: u32, offset: u64, data: &[u8]| LogRecord {
        job,
        attempt: 0,
        rank,
        offset,
        data: data.to_vec(),
    };
    // (chunks, committed bytes of rank 0 and rank 1 after them)
    let steps: Vec<(Vec<LogRecord>, Option<u64>, Option<u64>)> = vec![
        (vec![], None, None),
        (
            vec![chunk(0, 0, b"step 1\n"), chunk(0, 7, b"step 2\n")],
            Some(14),
            None,
        ),
        // Resent bytes (an agent told to resend) do not move it back.
        (vec![chunk(0, 0, b"step 1\n")], Some(14), None),
        // A chunk past the committed end (a gap) does not extend it.
        (vec![chunk(0, 100, b"late\n")], Some(14), None),
        (vec![chunk(1, 0, b"r1\n")], Some(14), Some(3)),
        // A job that does not exist: nothing.
        (
            vec![LogRecord {
                job: JobId(99),
                ..chunk(0, 0, b"x\n")
            }],
            Some(14),
            Some(3),
        ),
    ];
    for (chunks, rank0, rank1) in steps {
        let before = state.clone();
        let command = Command::AppendLogs { chunks };
        assert_eq!(
            state.apply(command.clone()),
            CommandOutcome::Done,
            "{command:?}"
        );
        let committed = |rank: u32| {
            state.jobs[&job]
                .log_bytes
                .get(&0)
                .and_then(|r| r.get(&rank))
                .copied()
        };
        assert_eq!((committed(0), committed(1)), (rank0, rank1), "{command:?}");
        // Nothing else changes.
        let mut without_logs = state.clone();
        std::sync::Arc::make_mut(without_logs.jobs.get_mut(&job).unwrap()).log_bytes =
            before.jobs[&job].log_bytes.clone();
        assert!(
            without_logs == before,
            "{command:?} changed more than log_bytes"
        );
    }
    let batched = state.apply(Command::Batch(vec![Command::AppendLogs {
        chunks: vec![chunk(0, 14, b"step 3\n")],
    }]));
    assert_eq!(batched, CommandOutcome::Batch(vec![CommandOutcome::Done]));
    assert_eq!(state.jobs[&job].log_bytes[&0][&0], 21);
}

#[test]
fn log_records_are_base64_in_the_log() {
    let command = Command::AppendLogs {
        chunks: vec![LogRecord {
            job: JobId(3),
            attempt: 1,
            rank: 2,
            offset: 10,
            data: b"loss 0.5\n\xff".to_vec(),
        }],
    };
    let json = serde_json::to_string(&command).unwrap();
    assert_eq!(
        json,
        r#"{"AppendLogs":{"chunks":[{"job":3,"attempt":1,"rank":2,"offset":10,"data":"bG9zcyAwLjUK/w=="}]}}"#
    );
    assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), command);
    assert!(serde_json::from_str::<Command>(&json.replace("bG9z", "b!9z")).is_err());
}

#[test]
fn membership_changes_are_audited_and_change_nothing_else() {
    let (mut state, _) = running_job();
    let before = state.clone();
    let actor = Actor {
        name: "ops".into(),
        namespace: None,
    };
    let cases = [
        (None, CommandOutcome::Done, "done"),
        (
            Some("server 9 is not a member".to_string()),
            CommandOutcome::Rejected {
                reason: "server 9 is not a member".into(),
            },
            "refused: server 9 is not a member",
        ),
    ];
    for (refused, outcome, recorded) in cases {
        let command = Command::Audited {
            actor: actor.clone(),
            at_ms: 5,
            command: Box::new(Command::MembershipChanged {
                change: "remove coordinator 9".into(),
                refused,
            }),
        };
        assert_eq!(state.apply(command), outcome);
        let entry = state.audit.back().unwrap();
        assert_eq!(
            (
                entry.by.as_str(),
                entry.action.as_str(),
                entry.outcome.as_str()
            ),
            ("ops", "remove coordinator 9", recorded)
        );
    }
    let mut without_audit = state.clone();
    without_audit.audit = before.audit.clone();
    assert!(without_audit == before);
}

fn set_health(state: &mut State, node: &str, unhealthy: Option<&str>) -> CommandOutcome {
    let instance_id = state.nodes[&id(node)].instance_id.clone();
    let outcome = state.apply(Command::SetNodeHealth {
        node: id(node),
        instance_id,
        unhealthy: unhealthy.map(str::to_string),
        at_ms: AT + 5,
    });
    check_invariants(state);
    outcome
}

#[test]
fn an_unhealthy_node_gets_no_placement_and_says_why() {
    let mut state = two_nodes();
    assert_eq!(
        set_health(&mut state, "node-1", Some("gpu-copy on GPU-node-1-0: slow")),
        CommandOutcome::Done
    );
    let node = &state.nodes[&id("node-1")];
    assert_eq!(
        node.health.unhealthy.as_deref(),
        Some("gpu-copy on GPU-node-1-0: slow")
    );
    assert_eq!(node.health.since_ms, AT + 5);
    // One host's worth: node-2 only. Two hosts' worth: not now, and the reason names node-1.
    let one = submit(&mut state, 1, 1, 4);
    let placement = place(&mut state, one);
    assert_eq!(placement.nodes[0].node, id("node-2"));
    let two = submit(&mut state, 2, 1, 1);
    let err = scheduler::plan(&state.cluster_snapshot(), &state.jobs[&two].spec.resources)
        .expect_err("node-1 is unhealthy");
    assert!(
        err.to_string().contains(
            "1 host failed its pre-flight checks (node-1: gpu-copy on GPU-node-1-0: slow)"
        ),
        "{err}"
    );
    // A plan computed before the verdict is refused when it meets it.
    let stale = Placement {
        nodes: vec![
            NodePlacement {
                node: id("node-1"),
                gpus: vec![0],
            },
            NodePlacement {
                node: id("node-2"),
                gpus: vec![4],
            },
        ],
        master_port: PORTS.0,
    };
    assert_rejected(
        apply_place(&mut state, two, stale),
        "node-1 which failed its pre-flight checks",
    );
    // Healthy again: placeable again.
    assert_eq!(set_health(&mut state, "node-1", None), CommandOutcome::Done);
    assert!(state.nodes[&id("node-1")].health.unhealthy.is_none());
    place(&mut state, two);
}

#[test]
fn health_reports_of_another_agent_or_node_are_rejected_and_repeats_change_nothing() {
    let mut state = two_nodes();
    assert_rejected(
        state.apply(Command::SetNodeHealth {
            node: id("node-1"),
            instance_id: "an-old-agent".into(),
            unhealthy: Some("x".into()),
            at_ms: AT,
        }),
        "an earlier agent of node node-1",
    );
    assert_rejected(
        state.apply(Command::SetNodeHealth {
            node: id("node-9"),
            instance_id: "node-9-a".into(),
            unhealthy: None,
            at_ms: AT,
        }),
        "no node named node-9",
    );
    set_health(&mut state, "node-1", Some("x"));
    let before = state.clone();
    assert_eq!(
        set_health(&mut state, "node-1", Some("x")),
        CommandOutcome::Done
    );
    assert_eq!(
        state, before,
        "the same verdict again changes nothing (not even since_ms)"
    );
    // A new agent on the host keeps the verdict until it reports its own.
    register_instance(&mut state, "node-1", "node-1-b", 32, 8);
    assert_eq!(
        state.nodes[&id("node-1")].health.unhealthy.as_deref(),
        Some("x")
    );
}

#[test]
fn a_job_whose_ranks_have_not_started_on_a_failing_host_is_placed_elsewhere_for_free() {
    // node-1 and node-2 hold the gang; node-3 is spare.
    let (mut state, job) = placed_job();
    register(&mut state, "node-3", 32, 8);
    // node-2's ranks start; node-1's agent checks its GPUs first, and they fail.
    for rank in [2, 3] {
        report(&mut state, "node-2", job, rank, RankPhase::Running, None);
    }
    set_health(
        &mut state,
        "node-1",
        Some("gpu-copy on GPU-node-1-0: injected"),
    );
    let j = &state.jobs[&job];
    assert_eq!(j.state, JobState::Pending, "back in the queue");
    assert_eq!(j.attempt, 1);
    assert_eq!(j.restarts, 0, "no restart of the budget used");
    assert!(
        j.attempts[0]
            .end
            .as_deref()
            .unwrap()
            .contains("host node-1 failed its pre-flight checks: gpu-copy on GPU-node-1-0"),
        "{:?}",
        j.attempts
    );
    assert_eq!(state.queue.front(), Some(&job));
    // Both agents report the old attempt gone; the next plan avoids node-1.
    report_gone(&mut state, "node-1", job, 0);
    report_gone(&mut state, "node-2", job, 0);
    let placement = place(&mut state, job);
    let hosts: Vec<&str> = placement.nodes.iter().map(|n| n.node.0.as_str()).collect();
    assert!(!hosts.contains(&"node-1"), "{hosts:?}");
    assert_eq!(hosts.len(), 2);

    // A running job is left alone by a later failing verdict of its host.
    report_all(&mut state, job, RankPhase::Running, None);
    set_health(
        &mut state,
        "node-2",
        Some("rdma-port-active on mlx5_0 port 1: DOWN"),
    );
    assert_eq!(job_state(&state, job), JobState::Running);
    assert_eq!(state.jobs[&job].attempt, 1);
}

/// What the job index answers for `state` (live jobs; jobs holding something on node-1, node-2),
/// checked against the same state loaded from JSON, whose index is not built and which scans.
fn indexed(state: &State) -> (Vec<JobId>, Vec<JobId>, Vec<JobId>) {
    let ids = |jobs: Box<dyn Iterator<Item = &Job> + '_>| jobs.map(|j| j.id).collect::<Vec<_>>();
    let answer = |s: &State| {
        (
            ids(s.live_jobs()),
            ids(s.jobs_holding_on(&id("node-1"))),
            ids(s.jobs_holding_on(&id("node-2"))),
        )
    };
    let loaded: State = serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap();
    assert!(!loaded.index.is_built());
    let got = answer(state);
    assert_eq!(got, answer(&loaded), "the index and a scan disagree");
    got
}

#[test]
fn the_job_index_follows_gangs_from_placement_to_their_last_rank() {
    let (mut state, first) = running_job();
    assert!(state.index.is_built(), "applying a command builds it");
    let queued = submit(&mut state, 1, 1, 1);
    assert_eq!(
        indexed(&state),
        (vec![first], vec![first], vec![first]),
        "a queued job is neither live nor on a node"
    );
    // Cancelled: no longer live, but held on both nodes until its ranks are gone.
    assert_eq!(cancel(&mut state, first), CommandOutcome::Done);
    assert_eq!(indexed(&state), (vec![], vec![first], vec![first]));
    report(&mut state, "node-1", first, 0, RankPhase::Exited, Some(-15));
    report(&mut state, "node-1", first, 1, RankPhase::Exited, Some(-15));
    assert_eq!(indexed(&state), (vec![], vec![], vec![first]));
    assert_eq!(
        report_idle(&mut state, "node-2", vec![first]),
        CommandOutcome::Done
    );
    assert_eq!(indexed(&state), (vec![], vec![], vec![]), "all released");
    // The queued job is placed on one node.
    let placement = plan_for(&state, queued);
    let node = placement.nodes[0].node.clone();
    assert_eq!(
        apply_place(&mut state, queued, placement),
        CommandOutcome::Done
    );
    let on_node = |n: &str| if node == id(n) { vec![queued] } else { vec![] };
    assert_eq!(
        indexed(&state),
        (vec![queued], on_node("node-1"), on_node("node-2"))
    );
    // Its node is lost: the shares stay held (retired or awaiting the agent), whatever the job does.
    lose(&mut state, &node.0);
    let (_, one, two) = indexed(&state);
    assert_eq!((one, two), (on_node("node-1"), on_node("node-2")));
    check_invariants(&state);
}

#[test]
fn a_loaded_state_builds_its_index_on_the_first_command() {
    let (state, job) = running_job();
    let mut loaded: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert!(!loaded.index.is_built());
    assert_eq!(
        loaded.jobs_assigned_to(&id("node-1")).count(),
        1,
        "a scan answers meanwhile"
    );
    assert_eq!(loaded, state, "the index is not part of the state's value");
    submit(&mut loaded, 1, 1, 1);
    assert!(loaded.index.is_built());
    assert_eq!(indexed(&loaded), (vec![job], vec![job], vec![job]));
}

/// Two nodes and `n` 1-rank jobs run to success one after the other, the i-th finished at `i` s.
fn finished_jobs(n: u64) -> (State, Vec<JobId>) {
    let mut state = two_nodes();
    let mut ids = Vec::new();
    for i in 0..n {
        let job = submit(&mut state, 1, 1, 1);
        place(&mut state, job);
        report_all(&mut state, job, RankPhase::Exited, Some(0));
        assert_eq!(job_state(&state, job), JobState::Succeeded);
        std::sync::Arc::make_mut(state.jobs.get_mut(&job).unwrap()).finished_at_ms =
            Some((i + 1) * 1000);
        ids.push(job);
    }
    (state, ids)
}

#[test]
fn retention_forgets_jobs_past_their_age_and_the_oldest_beyond_the_count() {
    use super::retention::{jobs_to_forget, JobRetention};
    let (mut state, ids) = finished_jobs(4);
    let running = submit(&mut state, 1, 1, 1);
    place(&mut state, running);
    let rule = |max_age_ms, max_finished| JobRetention {
        max_age_ms,
        max_finished,
    };
    // (rule, now, limit) -> forgotten; jobs ended at 1, 2, 3 and 4 s.
    let cases: [(JobRetention, u64, usize, &[usize]); 6] = [
        (rule(10_000, 10), 5_000, 100, &[]),
        (rule(3_000, 10), 5_000, 100, &[0, 1]), // ended 4 s and 3 s before
        (rule(10_000, 3), 5_000, 100, &[0]),    // one over the count
        (rule(10_000, 0), 5_000, 100, &[0, 1, 2, 3]),
        (rule(3_000, 1), 5_000, 100, &[0, 1, 2]), // both rules
        (rule(0, 10), 5_000, 2, &[0, 1]),         // the limit, oldest first
    ];
    for (rule, now, limit, want) in cases {
        let want: Vec<JobId> = want.iter().map(|&i| ids[i]).collect();
        assert_eq!(jobs_to_forget(&state, now, &rule, limit), want, "{rule:?}");
    }
    // Applied: the named finished jobs go, the running one and an unknown id change nothing.
    let named = vec![ids[0], running, JobId(999)];
    assert_eq!(
        state.apply(Command::ForgetJobs { jobs: named }),
        CommandOutcome::Done
    );
    assert!(!state.jobs.contains_key(&ids[0]) && state.was_forgotten(ids[0]));
    assert!(state.jobs.contains_key(&running) && !state.was_forgotten(running));
    assert!(!state.was_forgotten(JobId(999)), "never existed");
    check_invariants(&state);
}

#[test]
fn retention_keeps_a_finished_job_until_its_ranks_let_go() {
    use super::retention::forgettable;
    let (mut state, job) = running_job();
    assert_eq!(cancel(&mut state, job), CommandOutcome::Done);
    assert!(
        !forgettable(&state.jobs[&job]),
        "its ranks still hold both nodes"
    );
    state.apply(Command::ForgetJobs { jobs: vec![job] });
    assert!(state.jobs.contains_key(&job), "kept while it holds shares");
    report_idle(&mut state, "node-1", vec![job]);
    report_idle(&mut state, "node-2", vec![job]);
    assert!(forgettable(&state.jobs[&job]));
    state.apply(Command::ForgetJobs { jobs: vec![job] });
    assert!(state.was_forgotten(job));
    assert!(idle(&state, "node-1") && idle(&state, "node-2"));
    // A later job is placed on the freed hosts as usual, with the next id.
    let next = submit(&mut state, 2, 2, 2);
    assert_eq!(next, JobId(job.0 + 1));
    place(&mut state, next);
    check_invariants(&state);
}

/// A snapshot is written from a copy of the state taken under the lock; the jobs are shared with
/// the live state, so a command applied meanwhile must copy a job before changing it.
#[test]
fn a_copy_for_a_snapshot_does_not_see_later_commands() {
    let (mut state, job) = running_job();
    let copy = state.clone();
    assert!(
        std::sync::Arc::ptr_eq(&copy.jobs[&job], &state.jobs[&job]),
        "shared, not copied"
    );
    assert_eq!(cancel(&mut state, job), CommandOutcome::Done);
    let other = submit(&mut state, 1, 1, 1);
    assert_eq!(job_state(&state, job), JobState::Cancelled);
    assert_eq!(
        job_state(&copy, job),
        JobState::Running,
        "the copy kept its job"
    );
    assert!(!copy.jobs.contains_key(&other));
    assert_eq!(
        serde_json::to_value(&copy).unwrap(),
        serde_json::to_value(running_job().0).unwrap(),
        "the copy serializes as the state it was taken from"
    );
}

#[test]
fn the_queue_head_is_placed_whole_waits_for_room_or_its_old_ranks_or_fails_if_it_never_fits() {
    use scheduler::{queue_head, QueueHead};

    let mut state = two_nodes();
    assert_eq!(queue_head(&state), QueueHead::Idle, "an empty queue");

    // Fits: placed as `plan` would place it, and only the head is considered.
    let first = submit(&mut state, 2, 2, 8);
    let second = submit(&mut state, 1, 1, 1);
    assert_eq!(
        queue_head(&state),
        QueueHead::Place {
            job: first,
            placement: plan_for(&state, first),
        }
    );
    place(&mut state, first);

    // The second fits no GPU now: it waits, and nothing behind it jumps ahead.
    let third = submit(&mut state, 1, 1, 0);
    assert_eq!(
        queue_head(&state),
        QueueHead::NoRoomNow,
        "job {third} would fit, but job {second} is ahead of it"
    );

    // A gang restarting at another size waits for its previous attempt's ranks to be gone.
    let mut elastic = State::default();
    for node in ["node-1", "node-2", "node-3"] {
        register(&mut elastic, node, 32, 8);
    }
    let job = submit_spec(
        &mut elastic,
        spec_text("nodes = 2", "[failure]\nmax_restarts = 1\n"),
    );
    place(&mut elastic, job);
    report_all(&mut elastic, job, RankPhase::Running, None);
    let hosts: Vec<String> = elastic.jobs[&job]
        .allocation
        .iter()
        .flat_map(|a| a.nodes.iter().map(|n| n.node.0.clone()))
        .collect();
    let resize = Command::RestartJob {
        job,
        attempt: 0,
        reason: "resize".into(),
        end: AttemptEnd::Resize,
        at_ms: AT,
    };
    assert_eq!(elastic.apply(resize), CommandOutcome::Done);
    assert_eq!(queue_head(&elastic), QueueHead::Idle, "old ranks still run");
    for host in &hosts {
        report_gone(&mut elastic, host, job, 0);
    }
    assert!(matches!(queue_head(&elastic), QueueHead::Place { job: j, .. } if j == job));

    // The cluster shrank under a queued 2-host job: it can never run, so it fails, naming why.
    let mut shrunk = two_nodes();
    let waiting = submit(&mut shrunk, 2, 1, 1);
    lose(&mut shrunk, "node-2");
    assert_eq!(
        shrunk.apply(Command::RemoveNode {
            node: id("node-2"),
            at_ms: AT
        }),
        CommandOutcome::Done
    );
    match queue_head(&shrunk) {
        QueueHead::Fail { job, reason } => {
            assert_eq!(job, waiting);
            assert!(
                reason.starts_with("can never run here any more: the job needs 2 hosts"),
                "{reason}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}
