//! Property test: `State::apply` never panics and `check_invariants` holds after every step of
//! an arbitrary sequence of commands built from small random choices, including the commands the
//! long deterministic workload does not send (restarts, checkpoints, drains, removals, lost
//! nodes, gone attempts, batches). 256 cases, no persistence file.

use proptest::prelude::*;

use super::*;

/// The hosts the sequence starts with; removed ones may register again.
const HOSTS: [(&str, u32); 4] = [("node-1", 8), ("node-2", 8), ("node-3", 4), ("node-4", 0)];

/// A job id that exists most of the time, sometimes one that does not.
fn some_job(state: &State, rng: &mut Lcg) -> JobId {
    let live: Vec<JobId> = state
        .jobs
        .values()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.id)
        .collect();
    if !live.is_empty() && rng.below(4) != 0 {
        live[rng.below(live.len() as u64) as usize]
    } else {
        JobId(rng.below(state.last_job_id + 2))
    }
}

/// An attempt of `job`: its current one, an earlier one, or one from the future.
fn some_attempt(state: &State, job: JobId, rng: &mut Lcg) -> u32 {
    let current = state.jobs.get(&job).map_or(0, |j| j.attempt);
    match rng.below(5) {
        0 => current.saturating_sub(1),
        1 => current + 1,
        2 => u32::MAX,
        _ => current,
    }
}

fn some_node(rng: &mut Lcg) -> NodeId {
    match rng.below(6) {
        5 => id("node-9"),
        n => id(HOSTS[n as usize % HOSTS.len()].0),
    }
}

/// A spec of the kinds the cluster fits: fixed or elastic, with or without restarts, hang
/// detection and a `[checkpoint]` table.
fn some_spec(rng: &mut Lcg) -> JobSpec {
    let gpus = [0, 1, 2, 4][rng.below(4) as usize];
    let procs = if gpus == 0 { 1 + rng.below(2) } else { gpus };
    let nodes = match rng.below(3) {
        0 => "\"1:2\"".to_string(),
        1 => "\"1:3\"".to_string(),
        _ => (1 + rng.below(2)).to_string(),
    };
    let mut text = format!(
        "name = \"fuzz\"\n[launch]\ncommand = [\"true\"]\n[resources]\nnodes = {nodes}\n\
         procs_per_node = {procs}\ngpus_per_node = {gpus}\n[failure]\nmax_restarts = {}\n",
        rng.below(3)
    );
    if rng.below(2) == 0 {
        text.push_str("hang_timeout = \"10s\"\n");
    }
    if rng.below(2) == 0 {
        text.push_str(&format!(
            "[checkpoint]\ndir = \"/ckpt/{{job}}\"\nsignal = \"usr1\"\nkeep = {}\n",
            1 + rng.below(3)
        ));
    }
    JobSpec::from_toml(&text, "fuzz.toml").expect("fuzz spec is valid")
}

/// One command from `(choice, seed)`: the long workload's generator for most choices, the
/// other commands for the rest.
fn fuzz_command(state: &State, choice: u8, seed: u64, step: u64) -> Command {
    let mut rng = Lcg(seed);
    let at_ms = AT + step * 1_000;
    if state.nodes.is_empty() {
        let (name, gpus) = HOSTS[rng.below(HOSTS.len() as u64) as usize];
        return Command::RegisterNode {
            node: id(name),
            address: address(name),
            instance_id: format!("{name}-{step}"),
            resources: host(name, 16, gpus),
            port_range: PORTS,
            at_ms,
        };
    }
    match choice % 32 {
        0..=13 => random_command(state, &mut rng, step),
        14 | 15 => Command::SubmitJob {
            secret: format!("s{seed}"),
            resume_from_job: (rng.below(4) == 0).then(|| JobId(rng.below(state.last_job_id + 2))),
            spec: some_spec(&mut rng),
            at_ms,
        },
        16 | 17 => {
            // Reports with gone attempts, of the current or earlier attempts.
            let mut command = random_command(state, &mut rng, step);
            if let Command::ReportRanks { gone_attempts, .. } = &mut command {
                for job in state.jobs.values() {
                    if rng.below(2) == 0 {
                        gone_attempts.push((job.id, some_attempt(state, job.id, &mut rng)));
                    }
                    for r in &job.retired {
                        if rng.below(2) == 0 {
                            gone_attempts.push((job.id, r.attempt));
                        }
                    }
                }
            }
            command
        }
        18 | 19 => {
            let job = some_job(state, &mut rng);
            let end = [
                AttemptEnd::Failed,
                AttemptEnd::Hung,
                AttemptEnd::HostLost,
                AttemptEnd::Resize,
                AttemptEnd::Drained,
            ][rng.below(5) as usize];
            Command::RestartJob {
                job,
                attempt: some_attempt(state, job, &mut rng),
                reason: "fuzz".into(),
                end,
                at_ms,
            }
        }
        20 | 21 => {
            let job = some_job(state, &mut rng);
            Command::CommitCheckpoint {
                job,
                attempt: some_attempt(state, job, &mut rng),
                path: ["/ckpt/a", "/ckpt/b", "", "relative/c", "/ckpt/\u{0}"]
                    [rng.below(5) as usize]
                    .to_string(),
                step: [0, 1, 100, u64::MAX][rng.below(4) as usize],
                metrics: [None, Some("{}".to_string()), Some("{\"loss\":1.5}".into())]
                    [rng.below(3) as usize]
                    .clone(),
                at_ms,
            }
        }
        22 => Command::RequestCheckpoint {
            job: some_job(state, &mut rng),
        },
        23 | 24 => Command::SetNodeDrained {
            node: some_node(&mut rng),
            drained: rng.below(2) == 0,
        },
        25 => Command::RemoveNode {
            node: some_node(&mut rng),
            at_ms,
        },
        26 => Command::NodeLost {
            node: some_node(&mut rng),
            reason: "fuzz".into(),
            at_ms,
        },
        27 => {
            // A host fails or passes its pre-flight: jobs waiting to start there move.
            let node = some_node(&mut rng);
            let instance_id = state
                .nodes
                .get(&node)
                .map(|n| n.instance_id.clone())
                .unwrap_or_default();
            Command::SetNodeHealth {
                node,
                instance_id,
                unhealthy: (rng.below(2) == 0).then(|| "gpu-copy on GPU-x: fuzz".to_string()),
                at_ms,
            }
        }
        28 | 29 => {
            // A removed or lost host comes back, as the same agent or a new one.
            let (name, gpus) = HOSTS[rng.below(HOSTS.len() as u64) as usize];
            let instance_id = match state.nodes.get(&id(name)) {
                Some(node) if rng.below(2) == 0 => node.instance_id.clone(),
                _ => format!("{name}-{step}"),
            };
            Command::RegisterNode {
                node: id(name),
                address: address(name),
                instance_id,
                resources: host(name, 16, gpus),
                port_range: PORTS,
                at_ms,
            }
        }
        30 if rng.below(4) == 0 => Command::ForgetJobs {
            // Some ended and free, some live or holding shares: only the first kind may go.
            jobs: (0..3).map(|_| some_job(state, &mut rng)).collect(),
        },
        30 if rng.below(2) == 0 => Command::FailPendingJob {
            job: some_job(state, &mut rng),
            reason: "fuzz".into(),
            at_ms,
        },
        30 => {
            // Access: tokens come and go, agents are admitted under names (some taken), and
            // people's changes are audited.
            let token = format!("t{}", rng.below(4));
            let node = some_node(&mut rng);
            let command = match rng.below(4) {
                0 => Command::CreateToken {
                    record: TokenRecord {
                        id: token,
                        name: "fuzz".into(),
                        role: [Role::Agent, Role::Read, Role::Admin][rng.below(3) as usize],
                        namespace: None,
                        secret_sha256: secret_digest("s"),
                        created_at_ms: at_ms,
                        created_by: "fuzz".into(),
                        expires_at_ms: (rng.below(2) == 0).then_some(at_ms + 5_000),
                        revoked_at_ms: None,
                    },
                },
                1 => Command::RevokeToken { id: token, at_ms },
                2 => Command::AdmitAgent {
                    node,
                    fingerprint: format!("fp{}", rng.below(6)),
                    token_id: token,
                    at_ms,
                },
                _ => Command::SetNodeDrained {
                    node,
                    drained: rng.below(2) == 0,
                },
            };
            Command::Audited {
                actor: Actor {
                    name: "fuzz".into(),
                    namespace: None,
                },
                at_ms,
                command: Box::new(command),
            }
        }
        _ => {
            // A group commit of a few commands, each built against the state before the batch.
            let n = 1 + rng.below(3);
            let mut commands: Vec<Command> = (0..n)
                .map(|i| fuzz_command(state, rng.below(31) as u8, rng.below(u64::MAX), step + i))
                .collect();
            if rng.below(2) == 0 {
                // Rank output shipped in the same heartbeat (changes nothing in the state).
                let job = some_job(state, &mut rng);
                commands.push(Command::AppendLogs {
                    chunks: vec![LogRecord {
                        job,
                        attempt: some_attempt(state, job, &mut rng),
                        rank: rng.below(4) as u32,
                        offset: rng.below(1 << 20),
                        data: b"step\n".to_vec(),
                    }],
                });
            }
            if rng.below(4) == 0 {
                // A membership change recorded for the audit trail (changes nothing else).
                commands.push(Command::Audited {
                    actor: Actor {
                        name: "ops".into(),
                        namespace: None,
                    },
                    at_ms: step,
                    command: Box::new(Command::MembershipChanged {
                        change: "remove coordinator 3".into(),
                        refused: (rng.below(2) == 0).then(|| "server 3 is not a member".into()),
                    }),
                });
            }
            Command::Batch(commands)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_through_arbitrary_command_sequences(
        steps in proptest::collection::vec((any::<u8>(), any::<u64>()), 1..300)
    ) {
        let mut state = State::default();
        for (name, gpus) in HOSTS {
            register(&mut state, name, 16, gpus);
        }
        for (step, (choice, seed)) in steps.into_iter().enumerate() {
            let command = fuzz_command(&state, choice, seed, step as u64);
            state.apply(command);
            check_invariants(&state);
        }
    }
}

/// The generator reaches the new commands' effects, not just their rejections: over a few
/// deterministic sequences, each of them is applied (outcome not `Rejected`) at least once.
#[test]
fn the_fuzz_commands_are_applied_not_only_rejected() {
    let mut applied: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut rng = Lcg(0xf022);
    for _ in 0..20 {
        let mut state = State::default();
        for (name, gpus) in HOSTS {
            register(&mut state, name, 16, gpus);
        }
        for step in 0..150 {
            let command = fuzz_command(&state, rng.below(32) as u8, rng.below(u64::MAX), step);
            let kind = match &command {
                Command::RestartJob { .. } => "restart",
                Command::CommitCheckpoint { .. } => "commit",
                Command::RequestCheckpoint { .. } => "request",
                Command::SetNodeDrained { .. } => "drain",
                Command::RemoveNode { .. } => "remove",
                Command::NodeLost { .. } => "lost",
                Command::SetNodeHealth { .. } => "health",
                Command::ReportRanks { gone_attempts, .. } if !gone_attempts.is_empty() => "gone",
                Command::ForgetJobs { .. } => "forget",
                _ => "other",
            };
            let jobs_before = state.jobs.len();
            let outcome = state.apply(command);
            // Forgetting is applied when it removed a job (it is `Done` either way).
            let forgot = state.jobs.len() < jobs_before;
            if !matches!(outcome, CommandOutcome::Rejected { .. }) && (kind != "forget" || forgot) {
                *applied.entry(kind).or_default() += 1;
            }
            check_invariants(&state);
        }
    }
    for kind in [
        "restart", "commit", "request", "drain", "remove", "lost", "gone", "health", "forget",
    ] {
        assert!(
            applied.get(kind).copied().unwrap_or(0) > 0,
            "{kind} never applied: {applied:?}"
        );
    }
}
