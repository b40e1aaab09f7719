//! The built-in example workload behind `trainctl example-train`: deterministic data-parallel
//! training of a small MLP on synthetic data, used to check a cluster end to end without Python.
//!
//! The model is `y = w2 · tanh(W1 x + b1) + b2` with 16 inputs and 16 hidden units (289
//! parameters), trained with plain SGD on the mean squared error against a "teacher" network of the
//! same shape. The dataset, the teacher and the initial parameters all derive from the seed. At each
//! step the global batch is cut into one contiguous shard per rank; each rank sums its shard's
//! gradients, the sums are all-reduced and divided by the global batch size, and every rank takes
//! the same step. So the global batch, and hence the training, is the same for any world size, and
//! the same seed and world size give bit-identical parameters.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::prng::{mix64, SplitMix64};
use crate::schedule::chunk_range;
use crate::{Collective, CollectiveError, RendezvousConfig, TcpRing};

/// Inputs per example.
const INPUT_COUNT: usize = 16;
/// Hidden units.
const HIDDEN_COUNT: usize = 16;
/// Parameters of the model: W1, b1, w2, b2.
pub const PARAM_COUNT: usize = HIDDEN_COUNT * INPUT_COUNT + HIDDEN_COUNT + HIDDEN_COUNT + 1;
/// Examples in the synthetic dataset; batches wrap around it.
const DATASET_EXAMPLE_COUNT: u64 = 8192;
/// Most steps a run may ask for.
const MAX_STEPS: u32 = 1_000_000;
/// Largest global batch a run may ask for.
const MAX_GLOBAL_BATCH: u32 = 1 << 20;
/// Rendezvous timeout when `TRAINCTL_RENDEZVOUS_TIMEOUT_SECS` is not set.
pub const DEFAULT_RENDEZVOUS_TIMEOUT_SECS: u64 = 300;

// Independent random streams derived from the seed.
const STREAM_TEACHER: u64 = 0x7465_6163_6865_7200;
const STREAM_INIT: u64 = 0x696e_6974_0000_0000;
const STREAM_DATA: u64 = 0x6461_7461_0000_0000;

/// Training hyperparameters of the example workload.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// SGD steps to take (`--steps`).
    pub steps: u32,
    /// Seed of the dataset, the teacher network and the initial parameters (`--seed`).
    pub seed: u64,
    /// Examples per step across all ranks (`--batch`).
    pub global_batch: u32,
    /// Learning rate (`--lr`).
    pub lr: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 30,
            seed: 42,
            global_batch: 128,
            lr: 0.2,
        }
    }
}

impl TrainConfig {
    /// Checks the limits `parse_args` enforces, for configs built in code.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(format!(
                "steps is {}: expected 1 to {MAX_STEPS}",
                self.steps
            ));
        }
        if !(1..=MAX_GLOBAL_BATCH).contains(&self.global_batch) {
            return Err(format!(
                "batch is {}: expected 1 to {MAX_GLOBAL_BATCH}",
                self.global_batch
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "lr is {}: expected a positive number such as 0.05",
                self.lr
            ));
        }
        Ok(())
    }
}

/// What a training run ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Mean loss over the global batch at each step, before that step's update.
    pub losses: Vec<f32>,
    /// [`params_checksum`] of the final parameters.
    pub checksum: u64,
    /// Number of parameters.
    pub param_count: usize,
}

/// Why the example workload failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExampleError {
    /// A command-line argument was wrong; the message says which and what is accepted.
    #[error("{0}")]
    Args(String),
    /// An environment variable set by the launcher was missing or malformed.
    #[error("environment variable {var}: {problem}")]
    Env {
        /// The variable's name.
        var: &'static str,
        /// What was wrong and what is accepted.
        problem: String,
    },
    /// Rendezvous or a collective failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The training log could not be written.
    #[error("cannot write the training log: {0}")]
    Output(#[source] io::Error),
    /// The loss stopped being a finite number.
    #[error("loss became {loss} at step {step}; lower the learning rate (--lr {lr})")]
    Diverged {
        /// The step, counted from 1.
        step: u32,
        /// The loss seen.
        loss: f32,
        /// The learning rate used.
        lr: f32,
    },
}

const USAGE: &str = "usage: trainctl example-train [--steps N] [--seed S] [--batch B] [--lr X]

Deterministic data-parallel training of a small MLP on synthetic data, to check a cluster
end to end. Reads RANK, WORLD_SIZE, MASTER_ADDR (an IP address), MASTER_PORT, and optionally
TRAINCTL_NODE_ADDR and TRAINCTL_RENDEZVOUS_TIMEOUT_SECS from the environment.

  --steps N   SGD steps (default 30)
  --seed S    seed of data, teacher and initial parameters (default 42)
  --batch B   global batch size, split across ranks (default 128)
  --lr X      learning rate (default 0.2)";

const ACCEPTED_FLAGS: &str = "--steps N, --seed S, --batch B, --lr X";

/// Parses `--steps N --seed S --batch B --lr X` (also `--steps=N`); missing flags keep their
/// defaults. The error says which argument was wrong and what is accepted.
pub fn parse_args(args: &[String]) -> Result<TrainConfig, String> {
    let mut cfg = TrainConfig::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let expects = match flag {
            "--steps" => format!("a whole number from 1 to {MAX_STEPS}"),
            "--seed" => "a whole number from 0 to 18446744073709551615".to_string(),
            "--batch" => format!("a whole number from 1 to {MAX_GLOBAL_BATCH}"),
            "--lr" => "a positive number such as 0.05".to_string(),
            _ if flag.starts_with('-') => {
                return Err(format!(
                    "unknown flag `{flag}`; accepted flags: {ACCEPTED_FLAGS}"
                ))
            }
            _ => {
                return Err(format!(
                    "unexpected argument `{arg}`; accepted flags: {ACCEPTED_FLAGS}"
                ))
            }
        };
        let value = match inline.or_else(|| it.next().cloned()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value: {expects}")),
        };
        let bad = || format!("{flag} `{value}` is not valid: expected {expects}");
        match flag {
            "--steps" => {
                cfg.steps = value
                    .parse()
                    .ok()
                    .filter(|s| (1..=MAX_STEPS).contains(s))
                    .ok_or_else(bad)?
            }
            "--seed" => cfg.seed = value.parse().map_err(|_| bad())?,
            "--batch" => {
                cfg.global_batch = value
                    .parse()
                    .ok()
                    .filter(|b| (1..=MAX_GLOBAL_BATCH).contains(b))
                    .ok_or_else(bad)?
            }
            _ => {
                cfg.lr = value
                    .parse()
                    .ok()
                    .filter(|lr: &f32| lr.is_finite() && *lr > 0.0)
                    .ok_or_else(bad)?
            }
        }
    }
    Ok(cfg)
}

/// Builds this rank's [`RendezvousConfig`] from launcher variables, read through `get` (pass
/// `|k| std::env::var(k).ok()` for the process environment):
///
/// - `RANK`, `WORLD_SIZE`, `MASTER_PORT`: required whole numbers;
/// - `MASTER_ADDR`: required IP address (host names are not resolved);
/// - `TRAINCTL_NODE_ADDR`: optional IP address to listen on and advertise; default all interfaces,
///   advertising the address this rank reaches rank 0 from;
/// - `TRAINCTL_RENDEZVOUS_TIMEOUT_SECS`: optional, default [`DEFAULT_RENDEZVOUS_TIMEOUT_SECS`].
pub fn rendezvous_config_from_env(
    get: impl Fn(&str) -> Option<String>,
) -> Result<RendezvousConfig, ExampleError> {
    let env_err = |var: &'static str, problem: String| ExampleError::Env { var, problem };
    let required = |var: &'static str| {
        get(var).ok_or_else(|| {
            env_err(
                var,
                "is not set; the launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every rank".to_string(),
            )
        })
    };
    let number = |var: &'static str, value: String, expects: &str| {
        value
            .trim()
            .parse::<u64>()
            .map_err(|_| env_err(var, format!("`{value}` is not valid: expected {expects}")))
    };
    let ip = |var: &'static str, value: String| {
        value.trim().parse::<IpAddr>().map_err(|_| {
            env_err(
                var,
                format!("`{value}` is not an IP address: expected one such as 10.0.0.5 or 127.0.0.1 (host names are not resolved)"),
            )
        })
    };

    let world_size = number(
        "WORLD_SIZE",
        required("WORLD_SIZE")?,
        "a whole number of ranks",
    )?;
    let world_size = u32::try_from(world_size)
        .ok()
        .filter(|w| (1..=crate::MAX_WORLD_SIZE).contains(w))
        .ok_or_else(|| {
            env_err(
                "WORLD_SIZE",
                format!(
                    "{world_size} is out of range: expected 1 to {}",
                    crate::MAX_WORLD_SIZE
                ),
            )
        })?;
    let rank = number("RANK", required("RANK")?, "a whole number")?;
    let rank = u32::try_from(rank)
        .ok()
        .filter(|r| *r < world_size)
        .ok_or_else(|| {
            env_err(
                "RANK",
                format!(
                    "{rank} is out of range for WORLD_SIZE={world_size}: expected 0 to {}",
                    world_size - 1
                ),
            )
        })?;
    let master_addr = ip("MASTER_ADDR", required("MASTER_ADDR")?)?;
    let port_expects = "a port number from 1 to 65535";
    let master_port = number("MASTER_PORT", required("MASTER_PORT")?, port_expects)?;
    let master_port = u16::try_from(master_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            env_err(
                "MASTER_PORT",
                format!("{master_port} is out of range: expected {port_expects}"),
            )
        })?;
    let bind_addr = match get("TRAINCTL_NODE_ADDR") {
        Some(v) if !v.trim().is_empty() => ip("TRAINCTL_NODE_ADDR", v)?,
        _ => match master_addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
    };
    let timeout_secs = match get("TRAINCTL_RENDEZVOUS_TIMEOUT_SECS") {
        Some(v) => number(
            "TRAINCTL_RENDEZVOUS_TIMEOUT_SECS",
            v,
            "a whole number of seconds",
        )?,
        None => DEFAULT_RENDEZVOUS_TIMEOUT_SECS,
    };
    Ok(RendezvousConfig {
        rank,
        world_size,
        master_addr,
        master_port,
        bind_addr,
        timeout: Duration::from_secs(timeout_secs),
    })
}

/// Trains the example model over `coll`, writing `step i/n loss x` per step and then
/// `final checksum 0x<16 hex digits> params <n>` to `out`.
///
/// Every rank must call this with the same `cfg`; every rank prints the same lines.
pub fn example_train(
    cfg: &TrainConfig,
    coll: &mut dyn Collective,
    out: &mut dyn Write,
) -> Result<TrainSummary, ExampleError> {
    cfg.validate().map_err(ExampleError::Args)?;
    let world = coll.world_size() as usize;
    let rank = coll.rank() as usize;
    let batch = cfg.global_batch as usize;
    let shard = chunk_range(batch, world, rank);
    let teacher = Mlp::random(cfg.seed ^ STREAM_TEACHER, 2.0);
    let mut model = Mlp::random(cfg.seed ^ STREAM_INIT, 1.0);
    // Every rank derives the same initial parameters; broadcasting rank 0's copy still makes that a
    // property of the collective rather than an assumption, as in real data-parallel training.
    coll.broadcast_f32(&mut model.params, 0)?;

    // Gradient sums, with the loss sum in the last slot so one all-reduce carries both.
    let mut grad = vec![0.0f32; PARAM_COUNT + 1];
    let mut losses = Vec::with_capacity(cfg.steps as usize);
    for step in 1..=cfg.steps {
        grad.fill(0.0);
        for j in shard.clone() {
            let index = (u64::from(step - 1) * batch as u64 + j as u64) % DATASET_EXAMPLE_COUNT;
            let x = example_input(cfg.seed, index);
            let target = teacher.forward(&x).0;
            grad[PARAM_COUNT] += model.accumulate_gradient(&x, target, &mut grad[..PARAM_COUNT]);
        }
        coll.all_reduce_sum_f32(&mut grad)?;
        let loss = grad[PARAM_COUNT] / batch as f32;
        if !loss.is_finite() {
            return Err(ExampleError::Diverged {
                step,
                loss,
                lr: cfg.lr,
            });
        }
        writeln!(out, "step {step}/{} loss {loss:.6}", cfg.steps).map_err(ExampleError::Output)?;
        losses.push(loss);
        let scale = cfg.lr / batch as f32;
        for (p, g) in model.params.iter_mut().zip(&grad[..PARAM_COUNT]) {
            *p -= scale * g;
        }
    }
    let checksum = params_checksum(&model.params);
    writeln!(out, "final checksum {checksum:#018x} params {PARAM_COUNT}")
        .map_err(ExampleError::Output)?;
    out.flush().map_err(ExampleError::Output)?;
    Ok(TrainSummary {
        losses,
        checksum,
        param_count: PARAM_COUNT,
    })
}

/// Reads the launcher's environment, joins the other ranks over [`TcpRing`] and trains, printing
/// to standard output. `args` are the flags [`parse_args`] accepts.
pub fn example_train_from_env(args: &[String]) -> Result<TrainSummary, ExampleError> {
    let cfg = parse_args(args).map_err(ExampleError::Args)?;
    let rdzv = rendezvous_config_from_env(|k| std::env::var(k).ok())?;
    let mut ring = TcpRing::connect(rdzv)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    example_train(&cfg, &mut ring, &mut out)
}

/// Entry point of `trainctl example-train [args]`: runs [`example_train_from_env`] and returns the
/// process exit code (0 success, 1 failure, 2 bad arguments or environment). Errors go to standard
/// error; nothing here panics.
pub fn example_train_main(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        let _ = writeln!(io::stdout(), "{USAGE}");
        return 0;
    }
    match example_train_from_env(args) {
        Ok(_) => 0,
        Err(e) => {
            let mut msg = format!("trainctl example-train: {e}");
            let mut source = std::error::Error::source(&e);
            // `Collective` is transparent: its message already includes its source's.
            if matches!(e, ExampleError::Collective(_)) {
                source = source.and_then(std::error::Error::source);
            }
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            let _ = writeln!(io::stderr(), "{msg}");
            match e {
                ExampleError::Args(_) => {
                    let _ = writeln!(io::stderr(), "{USAGE}");
                    2
                }
                ExampleError::Env { .. } => 2,
                _ => 1,
            }
        }
    }
}

/// FNV-1a (64-bit) over the little-endian bytes of `params`: a cheap fingerprint for checking that
/// runs and ranks ended with bit-identical parameters.
pub fn params_checksum(params: &[f32]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for p in params {
        for byte in p.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// Input `index` of the synthetic dataset: uniform in [-1, 1) per coordinate.
fn example_input(seed: u64, index: u64) -> [f32; INPUT_COUNT] {
    let mut rng = SplitMix64::new(mix64(seed ^ STREAM_DATA).wrapping_add(mix64(index)));
    let mut x = [0.0f32; INPUT_COUNT];
    for v in &mut x {
        *v = rng.next_signed_unit();
    }
    x
}

/// `y = w2 · tanh(W1 x + b1) + b2`, parameters flattened as W1 (row-major), b1, w2, b2.
struct Mlp {
    params: Vec<f32>,
}

const B1: usize = HIDDEN_COUNT * INPUT_COUNT;
const W2: usize = B1 + HIDDEN_COUNT;
const B2: usize = W2 + HIDDEN_COUNT;

impl Mlp {
    /// Weights uniform in ±`gain`/sqrt(fan-in), biases uniform in ±`gain`/4.
    fn random(seed: u64, gain: f32) -> Mlp {
        let mut rng = SplitMix64::new(seed);
        let mut params = vec![0.0f32; PARAM_COUNT];
        let w1_scale = gain / (INPUT_COUNT as f32).sqrt();
        let w2_scale = gain / (HIDDEN_COUNT as f32).sqrt();
        for (i, p) in params.iter_mut().enumerate() {
            let scale = match i {
                _ if i < B1 => w1_scale,
                _ if (W2..B2).contains(&i) => w2_scale,
                _ => gain / 4.0,
            };
            *p = rng.next_signed_unit() * scale;
        }
        Mlp { params }
    }

    /// The output and the hidden activations.
    fn forward(&self, x: &[f32; INPUT_COUNT]) -> (f32, [f32; HIDDEN_COUNT]) {
        let p = &self.params;
        let mut h = [0.0f32; HIDDEN_COUNT];
        for (k, hk) in h.iter_mut().enumerate() {
            let row = &p[k * INPUT_COUNT..(k + 1) * INPUT_COUNT];
            let z: f32 = row.iter().zip(x).map(|(w, xi)| w * xi).sum::<f32>() + p[B1 + k];
            *hk = z.tanh();
        }
        let y = p[W2..B2].iter().zip(&h).map(|(w, hk)| w * hk).sum::<f32>() + p[B2];
        (y, h)
    }

    /// Adds the gradient of `(y - target)^2` to `grad` and returns that squared error.
    fn accumulate_gradient(&self, x: &[f32; INPUT_COUNT], target: f32, grad: &mut [f32]) -> f32 {
        let p = &self.params;
        let (y, h) = self.forward(x);
        let err = y - target;
        let dy = 2.0 * err;
        for k in 0..HIDDEN_COUNT {
            grad[W2 + k] += dy * h[k];
            let dz = dy * p[W2 + k] * (1.0 - h[k] * h[k]);
            grad[B1 + k] += dz;
            for (g, xi) in grad[k * INPUT_COUNT..(k + 1) * INPUT_COUNT]
                .iter_mut()
                .zip(x)
            {
                *g += dz * xi;
            }
        }
        grad[B2] += dy;
        err * err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parse_args_accepts_flags_and_names_mistakes() {
        let ok: &[(&str, TrainConfig)] = &[
            ("", TrainConfig::default()),
            (
                "--steps 5 --seed 7 --batch 32 --lr 0.1",
                TrainConfig {
                    steps: 5,
                    seed: 7,
                    global_batch: 32,
                    lr: 0.1,
                },
            ),
            (
                "--steps=5 --lr=0.5",
                TrainConfig {
                    steps: 5,
                    lr: 0.5,
                    ..TrainConfig::default()
                },
            ),
        ];
        for (line, want) in ok {
            assert_eq!(parse_args(&args(line)).as_ref(), Ok(want), "{line:?}");
        }
        let bad: &[(&str, &str)] = &[
            (
                "--epochs 3",
                "unknown flag `--epochs`; accepted flags: --steps N",
            ),
            ("-v", "unknown flag `-v`"),
            ("train", "unexpected argument `train`"),
            ("--steps", "--steps needs a value: a whole number from 1 to"),
            (
                "--steps 0",
                "--steps `0` is not valid: expected a whole number from 1",
            ),
            ("--steps ten", "--steps `ten` is not valid"),
            ("--seed -1", "--seed `-1` is not valid"),
            ("--batch 0", "--batch `0` is not valid"),
            (
                "--lr -0.1",
                "--lr `-0.1` is not valid: expected a positive number",
            ),
            ("--lr NaN", "--lr `NaN` is not valid"),
            ("--lr inf", "--lr `inf` is not valid"),
        ];
        for (line, want) in bad {
            let err = parse_args(&args(line)).unwrap_err();
            assert!(err.contains(want), "{line:?}: {err}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASE: &[(&str, &str)] = &[
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "29500"),
    ];

    fn with(overrides: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = BASE
            .iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(overrides.iter().filter(|(_, val)| !val.is_empty()));
        v
    }

    #[test]
    fn env_config_reads_the_launcher_variables() {
        let cfg = rendezvous_config_from_env(env(BASE)).unwrap();
        assert_eq!(
            cfg,
            RendezvousConfig {
                rank: 1,
                world_size: 4,
                master_addr: "10.0.0.5".parse().unwrap(),
                master_port: 29500,
                bind_addr: "0.0.0.0".parse().unwrap(),
                timeout: Duration::from_secs(DEFAULT_RENDEZVOUS_TIMEOUT_SECS),
            }
        );
        let cfg = rendezvous_config_from_env(env(&with(&[
            ("TRAINCTL_NODE_ADDR", "10.0.0.7"),
            ("TRAINCTL_RENDEZVOUS_TIMEOUT_SECS", "12"),
        ])))
        .unwrap();
        assert_eq!(cfg.bind_addr, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(cfg.timeout, Duration::from_secs(12));
        let cfg = rendezvous_config_from_env(env(&with(&[("MASTER_ADDR", "::1")]))).unwrap();
        assert_eq!(cfg.bind_addr, "::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn env_config_errors_name_the_variable_and_what_is_accepted() {
        // An empty value in an override removes the variable.
        let cases: &[(&[(&'static str, &'static str)], &str)] = &[
            (&[("RANK", "")], "environment variable RANK: is not set"),
            (
                &[("RANK", "x")],
                "RANK: `x` is not valid: expected a whole number",
            ),
            (
                &[("RANK", "4")],
                "RANK: 4 is out of range for WORLD_SIZE=4: expected 0 to 3",
            ),
            (&[("WORLD_SIZE", "0")], "WORLD_SIZE: 0 is out of range"),
            (
                &[("MASTER_ADDR", "node-1")],
                "MASTER_ADDR: `node-1` is not an IP address",
            ),
            (
                &[("MASTER_PORT", "0")],
                "MASTER_PORT: 0 is out of range: expected a port number",
            ),
            (
                &[("MASTER_PORT", "70000")],
                "MASTER_PORT: 70000 is out of range",
            ),
            (
                &[("TRAINCTL_NODE_ADDR", "eth0")],
                "TRAINCTL_NODE_ADDR: `eth0` is not an IP address",
            ),
            (
                &[("TRAINCTL_RENDEZVOUS_TIMEOUT_SECS", "1m")],
                "TRAINCTL_RENDEZVOUS_TIMEOUT_SECS: `1m` is not valid",
            ),
        ];
        for (overrides, want) in cases {
            let err = rendezvous_config_from_env(env(&with(overrides)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{overrides:?}: {err}");
        }
    }

    #[test]
    fn checksum_is_fnv1a_over_little_endian_bytes() {
        assert_eq!(params_checksum(&[]), 0xcbf2_9ce4_8422_2325);
        // FNV-1a of the bytes 00 00 80 3f (1.0f32), computed independently.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [0x00u8, 0x00, 0x80, 0x3f] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(params_checksum(&[1.0]), h);
        assert_ne!(params_checksum(&[0.0]), params_checksum(&[-0.0]));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let model = Mlp::random(3, 1.0);
        let teacher = Mlp::random(4, 2.0);
        let x = example_input(5, 0);
        let target = teacher.forward(&x).0;
        let mut grad = vec![0.0f32; PARAM_COUNT];
        model.accumulate_gradient(&x, target, &mut grad);
        for &i in &[0, 17, B1, B1 + 3, W2, W2 + 9, B2] {
            let eps = 1e-2f32;
            let loss_at = |delta: f32| {
                let mut m = Mlp {
                    params: model.params.clone(),
                };
                m.params[i] += delta;
                let e = m.forward(&x).0 - target;
                e * e
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            assert!(
                (numeric - grad[i]).abs() <= 1e-2 * (1.0 + numeric.abs()),
                "param {i}: analytic {} numeric {numeric}",
                grad[i]
            );
        }
    }
}
