//! The example workload over real TCP rings: determinism, convergence, and independence of the
//! global batch from the world size.

mod common;

use common::run_ranks;
use trainctl_collective::{
    example_train, example_train_main, Collective, TcpRing, TrainConfig, TrainSummary,
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
fn the_global_batch_does_not_depend_on_the_world_size() {
    let cfg = TrainConfig {
        steps: 10,
        ..TrainConfig::default()
    };
    let runs: Vec<Vec<f32>> = [1u32, 2, 4]
        .into_iter()
        .map(|w| train(w, cfg.clone())[0].0.losses.clone())
        .collect();
    for (w, losses) in [2, 4].iter().zip(&runs[1..]) {
        for (step, (a, b)) in runs[0].iter().zip(losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1e-3),
                "world {w} step {step}: {b} vs {a} on one rank"
            );
        }
    }
    // More ranks than examples in a batch: some ranks hold empty shards.
    let tiny = TrainConfig {
        global_batch: 3,
        steps: 3,
        ..TrainConfig::default()
    };
    let one = train(1, tiny.clone())[0].0.losses.clone();
    let five = train(5, tiny)[0].0.losses.clone();
    for (a, b) in one.iter().zip(&five) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-3), "{a} vs {b}");
    }
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
}

#[test]
fn main_returns_usage_exit_codes_without_reading_the_environment() {
    assert_eq!(example_train_main(&["--epochs".into(), "3".into()]), 2);
    assert_eq!(example_train_main(&["--help".into()]), 0);
}
