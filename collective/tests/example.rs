//! The example workload over real TCP rings: determinism, convergence, bit-identical results at
//! any world size, and checkpoints and resumes (interrupted runs end like uninterrupted ones).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;

use common::run_ranks;
use trainctl_collective::{
    example_train, example_train_main, example_train_with, AgentEndpoint, Collective, ExampleError,
    Fault, FaultKind, ResumePoint, RunOptions, TcpRing, TrainConfig, TrainSummary,
};

fn train(world: u32, cfg: TrainConfig) -> Vec<(TrainSummary, String)> {
    run_ranks(world, move |mut ring: TcpRing| {
        let mut out = Vec::new();
        let summary = example_train(&cfg, &mut ring, &mut out).unwrap();
        (summary, String::from_utf8(out).unwrap())
    })
}

#[test]
fn same_seed_and_world_size_give_the_same_checksum_on_every_rank_and_run() {
    let cfg = TrainConfig::default();
    let first = train(3, cfg.clone());
    let second = train(3, cfg.clone());
    let checksum = first[0].0.checksum;
    for (rank, (summary, _)) in first.iter().chain(&second).enumerate() {
        assert_eq!(summary.checksum, checksum, "run/rank {rank}");
    }
    // Every rank prints the same log, and it has the documented shape.
    for (_, log) in &first {
        assert_eq!(log, &first[0].1);
    }
    print!("{}", first[0].1);
    let lines: Vec<&str> = first[0].1.lines().collect();
    assert_eq!(lines.len(), cfg.steps as usize + 1);
    assert!(lines[2].starts_with("step 3/30 loss "), "{}", lines[2]);
    let want_last = format!("final checksum {checksum:#018x} params 289");
    assert_eq!(lines[30], want_last);
    assert_eq!(
        want_last.len(),
        "final checksum 0x".len() + 16 + " params 289".len()
    );

    let other_seed = train(3, TrainConfig { seed: 7, ..cfg });
    assert_ne!(other_seed[0].0.checksum, checksum);
}

#[test]
fn loss_decreases() {
    let summary = &train(2, TrainConfig::default())[0].0;
    let first = summary.losses[0];
    let last = *summary.losses.last().unwrap();
    assert!(last < 0.5 * first, "loss went from {first} to {last}");
}

#[test]
fn the_result_is_bit_identical_at_any_world_size() {
    let cfg = TrainConfig::default();
    let four = train(4, cfg.clone());
    let two = train(2, cfg.clone());
    assert_eq!(four[0].0.checksum, two[0].0.checksum);
    // Not just the checksum: every loss, and so the whole log, is the same bits.
    assert_eq!(four[0].0.losses, two[0].0.losses);
    assert_eq!(four[0].1, two[0].1);
    for w in [1u32, 3] {
        assert_eq!(train(w, cfg.clone())[0].1, two[0].1, "world {w}");
    }
    // More ranks than examples in a batch: some ranks hold empty shards.
    let tiny = TrainConfig {
        global_batch: 3,
        steps: 3,
        ..TrainConfig::default()
    };
    assert_eq!(
        train(1, tiny.clone())[0].0,
        train(5, tiny)[0].0,
        "world 1 vs 5"
    );
}

/// A fresh, empty directory under the system temporary directory.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trainctl-example-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type RankResult = Result<(TrainSummary, String), String>;

/// Runs `world` ranks with options `opts(rank)`.
fn train_with(
    world: u32,
    cfg: TrainConfig,
    opts: impl Fn(u32) -> RunOptions + Send + Sync + 'static,
) -> Vec<RankResult> {
    run_ranks(world, move |mut ring: TcpRing| {
        let mut out = Vec::new();
        let o = opts(ring.rank());
        let result = example_train_with(&cfg, &o, &mut ring, &mut out);
        let log = String::from_utf8(out).unwrap();
        match result {
            Ok(summary) => Ok((summary, log)),
            Err(ExampleError::InjectedFailure { step }) => Err(format!("injected {step}\n{log}")),
            Err(e) => Err(format!("{e}\n{log}")),
        }
    })
}

fn checkpointing(dir: &Path, every: u32) -> RunOptions {
    RunOptions {
        checkpoint_dir: Some(dir.to_path_buf()),
        checkpoint_every: every,
        ..RunOptions::default()
    }
}

#[test]
fn an_interrupted_run_resumed_at_another_world_size_ends_like_an_uninterrupted_one() {
    let cfg = TrainConfig::default();
    let uninterrupted = train(3, cfg.clone())[0].0.checksum;
    let dir = scratch_dir("resume");

    // Attempt 0, 4 ranks: checkpoints every 5 steps, rank 1 fails after step 12.
    let fault = Fault {
        kind: FaultKind::Exit,
        step: 12,
        rank: 1,
        attempt: 0,
    };
    let first = {
        let dir = dir.clone();
        train_with(4, cfg.clone(), move |_| RunOptions {
            fault: Some(fault),
            ..checkpointing(&dir, 5)
        })
    };
    let failed = first[1].as_ref().unwrap_err();
    assert!(failed.starts_with("injected 12\n"), "{failed}");
    assert!(failed.contains("step 12/30 loss"), "{failed}");
    assert!(
        failed.ends_with("injected failure at step 12\n"),
        "{failed}"
    );
    for (rank, r) in first.iter().enumerate() {
        assert!(r.is_err(), "rank {rank} should have lost its peer");
    }
    // Rank 0 wrote steps 5 and 10; nobody else wrote; no agent, so nothing was committed.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["step-10", "step-5"]);
    let log0 = first[0].as_ref().unwrap_err();
    assert!(
        log0.contains(&format!(
            "checkpoint step 10 written to {} but not committed: environment variable TRAINCTL_AGENT_URL is not set",
            dir.join("step-10").display()
        )),
        "{log0}"
    );

    // Attempt 1, 2 ranks, resuming from step 10 with the same fault options (attempt 0 only).
    let resume = ResumePoint {
        path: dir.join("step-10"),
        step: Some(10),
    };
    let second = {
        let (dir, resume) = (dir.clone(), resume.clone());
        train_with(2, cfg.clone(), move |_| RunOptions {
            resume: Some(resume.clone()),
            attempt: 1,
            fault: Some(fault),
            ..checkpointing(&dir, 5)
        })
    };
    for r in &second {
        let (summary, log) = r.as_ref().unwrap();
        assert_eq!(summary.checksum, uninterrupted);
        assert_eq!(summary.start_step, 10);
        assert_eq!(summary.losses.len(), 20);
        let first_line = log.lines().next().unwrap();
        assert_eq!(
            first_line,
            format!(
                "resumed from {} at step 10 (attempt 1)",
                resume.path.display()
            )
        );
        assert!(log.contains("\nstep 11/30 loss "), "{log}");
    }
    let written: Vec<u32> = second[0]
        .as_ref()
        .unwrap()
        .0
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(written, [15, 20, 25, 30]);
    assert!(second[1].as_ref().unwrap().0.checkpoints.is_empty());

    // A third attempt from the last checkpoint (the params file itself, no step given) at world
    // size 1 has nothing left to do and reports the same checksum.
    let last = ResumePoint {
        path: dir.join("step-30").join("params.bin"),
        step: None,
    };
    let third = train_with(1, cfg.clone(), move |_| RunOptions {
        resume: Some(last.clone()),
        ..RunOptions::default()
    });
    let (summary, _) = third[0].as_ref().unwrap();
    assert_eq!((summary.checksum, summary.losses.len()), (uninterrupted, 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_with_another_configuration_or_step_is_a_clear_error() {
    let dir = scratch_dir("mismatch");
    let cfg = TrainConfig {
        steps: 4,
        ..TrainConfig::default()
    };
    let d = dir.clone();
    let r = train_with(1, cfg.clone(), move |_| checkpointing(&d, 2));
    assert!(r[0].is_ok());
    let try_resume = |cfg: TrainConfig, step: Option<u64>| {
        let path = dir.join("step-4");
        let mut out = Vec::new();
        let mut ring = solo_ring();
        let opts = RunOptions {
            resume: Some(ResumePoint { path, step }),
            ..RunOptions::default()
        };
        example_train_with(&cfg, &opts, &mut ring, &mut out)
            .unwrap_err()
            .to_string()
    };
    let err = try_resume(
        TrainConfig {
            seed: 7,
            lr: 0.1,
            ..cfg.clone()
        },
        None,
    );
    assert!(
        err.contains("it was written with --seed 42 (this run: 7), --lr 0.2 (this run: 0.1); resume with the same flags"),
        "{err}"
    );
    let err = try_resume(cfg.clone(), Some(3));
    assert!(
        err.contains("TRAINCTL_RESUME_STEP is 3 but the checkpoint holds step 4"),
        "{err}"
    );
    std::fs::write(dir.join("junk"), b"not a checkpoint").unwrap();
    let mut ring = solo_ring();
    let opts = RunOptions {
        resume: Some(ResumePoint {
            path: dir.join("junk"),
            step: None,
        }),
        ..RunOptions::default()
    };
    let err = example_train_with(&cfg, &opts, &mut ring, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, ExampleError::Resume { .. }), "{err}");
    assert!(
        err.to_string().contains("not an example-train checkpoint"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stand-in for the agent: answers every request with `status` and records each request's
/// first line and body.
struct FakeAgent {
    url: String,
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakeAgent {
    fn start(status: &'static str) -> FakeAgent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = conn.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len || n == 0 {
                            break (head.to_string(), body.to_string());
                        }
                    }
                };
                assert!(head.contains("\r\nAuthorization: Bearer tok\r\n"), "{head}");
                let first = head.lines().next().unwrap().to_string();
                seen.lock().unwrap().push((first, body));
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{{\"error\":\"no\"}}"
                );
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        FakeAgent { url, requests }
    }

    fn endpoint(&self) -> AgentEndpoint {
        AgentEndpoint {
            url: self.url.clone(),
            token: "tok".to_string(),
        }
    }
}

#[test]
fn rank_0_commits_each_checkpoint_and_a_requested_one_at_once() {
    static NOW: AtomicBool = AtomicBool::new(true);
    let agent = FakeAgent::start("200 OK");
    let dir = scratch_dir("commit");
    let cfg = TrainConfig {
        steps: 10,
        ..TrainConfig::default()
    };
    let (d, endpoint) = (dir.clone(), agent.endpoint());
    let runs = train_with(2, cfg.clone(), move |rank| RunOptions {
        agent: Some(endpoint.clone()),
        // Only rank 0 acts on the flag; in a real job each process has its own.
        checkpoint_now: (rank == 0).then_some(&NOW),
        ..checkpointing(&d, 4)
    });
    let (summary, log) = runs[0].as_ref().unwrap();
    let steps = checkpoint_steps(summary);
    assert_eq!(steps, [(1, true), (4, true), (8, true)]);
    assert!(
        log.contains("\ncheckpoint now: committed step 1\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "\ncheckpoint step 4 committed: {}\n",
            dir.join("step-4").display()
        )),
        "{log}"
    );
    let requests = agent.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    for ((line, body), step) in requests.iter().zip([1, 4, 8]) {
        assert_eq!(line, "POST /v1/checkpoints HTTP/1.1");
        let path = dir.join(format!("step-{step}"));
        let want = format!(
            "{{\"path\":\"{}\",\"step\":{step},\"metrics\":{{\"loss\":",
            path.display()
        );
        assert!(body.starts_with(&want), "{body}");
    }
    // Rank 1 neither wrote nor committed; checkpointing changed nothing in the result.
    assert!(runs[1].as_ref().unwrap().0.checkpoints.is_empty());
    assert_eq!(summary.checksum, train(2, cfg.clone())[0].0.checksum);

    // An agent that refuses: the checkpoint is written, not reported committed, training goes on.
    let refusing = FakeAgent::start("503 Service Unavailable");
    let dir2 = scratch_dir("commit-refused");
    let (d, endpoint) = (dir2.clone(), refusing.endpoint());
    let runs = train_with(1, cfg.clone(), move |_| RunOptions {
        agent: Some(endpoint.clone()),
        ..checkpointing(&d, 5)
    });
    let (summary, log) = runs[0].as_ref().unwrap();
    let steps = checkpoint_steps(summary);
    assert_eq!(steps, [(5, false), (10, false)]);
    assert!(!log.contains("committed"), "{log}");
    assert!(dir2.join("step-10").join("params.bin").is_file());
    assert_eq!(refusing.requests.lock().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

fn solo_ring() -> TcpRing {
    TcpRing::connect(trainctl_collective::RendezvousConfig {
        rank: 0,
        world_size: 1,
        master_addr: "127.0.0.1".parse().unwrap(),
        master_port: 1,
        bind_addr: "127.0.0.1".parse().unwrap(),
        timeout: std::time::Duration::from_secs(1),
        use_agent_store: false,
    })
    .unwrap()
}

#[test]
fn example_train_rejects_a_bad_config_instead_of_panicking() {
    let mut ring = TcpRing::connect(trainctl_collective::RendezvousConfig {
        rank: 0,
        world_size: 1,
        master_addr: "127.0.0.1".parse().unwrap(),
        master_port: 1,
        bind_addr: "127.0.0.1".parse().unwrap(),
        timeout: std::time::Duration::from_secs(1),
        use_agent_store: false,
    })
    .unwrap();
    assert_eq!(ring.world_size(), 1);
    let cfg = TrainConfig {
        lr: f32::NAN,
        ..TrainConfig::default()
    };
    let err = example_train(&cfg, &mut ring, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("lr is NaN"), "{err}");
    let cfg = TrainConfig {
        lr: 1e6,
        steps: 50,
        ..TrainConfig::default()
    };
    let err = example_train(&cfg, &mut ring, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("lower the learning rate"), "{err}");
    assert!(
        matches!(err, ExampleError::GradientOverflow { .. }),
        "{err:?}"
    );
}

#[test]
fn main_returns_usage_exit_codes_without_reading_the_environment() {
    assert_eq!(example_train_main(&["--epochs".into(), "3".into()]), 2);
    assert_eq!(example_train_main(&["--help".into()]), 0);
    assert_eq!(example_train_main(&["--fail-rank".into(), "1".into()]), 2);
}

/// (step, committed) of every checkpoint a run wrote.
fn checkpoint_steps(summary: &TrainSummary) -> Vec<(u32, bool)> {
    summary
        .checkpoints
        .iter()
        .map(|c| (c.step, c.committed))
        .collect()
}
