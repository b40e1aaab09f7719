//! The built-in example workload behind `trainctl example-train`: deterministic data-parallel
//! training of a small MLP on synthetic data, used to check a cluster end to end without Python,
//! including checkpoints, restarts and elastic resizes.
//!
//! The model is `y = w2 · tanh(W1 x + b1) + b2` with 16 inputs and 16 hidden units (289
//! parameters), trained with plain SGD on the mean squared error against a "teacher" network of the
//! same shape. The dataset, the teacher and the initial parameters all derive from the seed. At each
//! step the global batch is cut into one contiguous shard per rank; each rank sums its shard's
//! gradients, the sums are all-reduced and divided by the global batch size, and every rank takes
//! the same step.
//!
//! # Why the result does not depend on the world size, nor on restarts
//!
//! Floating-point addition is not associative, so summing gradients in f32 gives bits that depend
//! on how the examples were split across ranks and in which order the ring added the partial sums.
//! Instead each rank converts every *per-example* gradient (and squared error) to fixed point: the
//! f32 value times 2^[`GRAD_FRACTION_BITS`], rounded to the nearest `i64` (an exact, deterministic
//! operation in f64). These integers are summed on the rank and then across ranks with
//! [`Collective::all_reduce_sum_i64`]. Integer addition is associative and commutative, so the
//! global sum is exactly the sum of the global batch's per-example integers, whatever the world
//! size, the shard boundaries or the ring's order of addition. A per-example value must stay within
//! ±2^62 / global batch (in fixed point) so that no partial sum can overflow; a value outside that
//! range, or one that is not finite, stops the run with [`ExampleError::GradientOverflow`] on every
//! rank (the count of such values travels in the same all-reduce). With 32 fraction bits that
//! leaves about ±2^23 per example at the default batch, far beyond any gradient of a converging run,
//! while the rounding error, 2^-33, is below f32 precision for gradients of interest.
//!
//! Each per-example gradient is a function of the parameters and of the example alone, and every
//! rank holds the same parameters (they start from the seed and are broadcast from rank 0), so by
//! induction over the steps the parameters after step `n` are a function of the seed, the batch,
//! the learning rate and `n` only: the same bits at any world size.
//!
//! Restarts are covered by the same argument: the example indices of step `n` are
//! `(n - 1) * batch + j` (mod the dataset size), a function of the step alone, and SGD has no state
//! besides the parameters, so a checkpoint holding the exact f32 bits of the parameters after step
//! `n` (plus the seed, batch and learning rate, checked on load) lets a later attempt, at any world
//! size, continue with step `n + 1` and end with the same bits as an uninterrupted run. (This
//! assumes one build of trainctl on one platform: `tanh` comes from the platform's maths library.)
//!
//! # The trainctl contract
//!
//! [`run_options_from_env`] reads what trainctl's agent gives every rank: `TRAINCTL_CHECKPOINT_DIR`
//! (rank 0 writes `step-<n>/params.bin` there every `--checkpoint-every` steps, atomically, and
//! commits it with [`crate::checkpoint::commit_checkpoint`]), `TRAINCTL_RESUME_FROM` /
//! `TRAINCTL_RESUME_STEP` (every rank loads the parameters and continues after that step),
//! `TRAINCTL_AGENT_URL` / `TRAINCTL_JOB_TOKEN`, and `TORCHELASTIC_RESTART_COUNT` /
//! `TRAINCTL_ATTEMPT`. `SIGUSR1` asks rank 0 to checkpoint at the next step boundary.
//! [`rendezvous_config_from_env`] reads where the ranks meet: `MASTER_ADDR:MASTER_PORT`, served by
//! the agent's TCPStore when `TORCHELASTIC_USE_AGENT_STORE=True` (as trainctl's agent launches
//! ranks), or by rank 0's listener otherwise.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::checkpoint::{AgentEndpoint, CheckpointError};
use crate::nccl::open_host;
use crate::params_file::{self, Snapshot, WORKLOAD_VERSION};
use crate::prng::{mix64, SplitMix64};
use crate::schedule::chunk_range;
use crate::{
    Collective, CollectiveError, NcclCollective, NcclOptions, RdmaOptions, RdmaRing,
    RendezvousConfig, TcpRing,
};

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
/// Checkpoint interval, in steps, when `TRAINCTL_CHECKPOINT_DIR` is set and `--checkpoint-every`
/// is not given.
pub const DEFAULT_CHECKPOINT_EVERY: u32 = 10;
/// Fraction bits of the fixed-point gradients: a per-example value `g` is reduced as
/// `round(g * 2^GRAD_FRACTION_BITS)`.
pub const GRAD_FRACTION_BITS: u32 = 32;
/// Every partial or global fixed-point sum stays within ±this, so no `i64` sum can overflow.
const FIXED_POINT_SUM_LIMIT: i64 = 1 << 62;
/// Longest `--step-delay-ms`.
const MAX_STEP_DELAY_MS: u64 = 3_600_000;
/// Exit code of an injected failure (`--fail-at-step`).
pub const INJECTED_FAILURE_EXIT_CODE: i32 = 3;

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
    /// Mean loss over the global batch at each step this run took, before that step's update.
    pub losses: Vec<f32>,
    /// [`params_checksum`] of the final parameters.
    pub checksum: u64,
    /// Number of parameters.
    pub param_count: usize,
    /// The step the run resumed after (0 when it started from scratch); `losses[0]` is step
    /// `start_step + 1`.
    pub start_step: u32,
    /// Checkpoints this rank wrote (only rank 0 writes), in order.
    pub checkpoints: Vec<CheckpointRecord>,
}

/// One checkpoint written by rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// The step the parameters are after.
    pub step: u32,
    /// The step directory, `<checkpoint dir>/step-<step>`.
    pub path: PathBuf,
    /// Whether the agent acknowledged the commit. False when it refused or could not be reached,
    /// or when no agent was configured.
    pub committed: bool,
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
    /// A per-example gradient or loss left the fixed-point range (or was not finite).
    #[error("gradients left the fixed-point range at step {step} ({count} examples); the training diverged: lower the learning rate (--lr {lr})")]
    GradientOverflow {
        /// The step, counted from 1.
        step: u32,
        /// Examples, over all ranks, with a value out of range.
        count: i64,
        /// The learning rate used.
        lr: f32,
    },
    /// The checkpoint to resume from could not be read.
    #[error("cannot resume from {path}: {problem}")]
    Resume {
        /// `TRAINCTL_RESUME_FROM`.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// The checkpoint to resume from belongs to another configuration or step.
    #[error("cannot resume from {path}: {problem}")]
    ResumeMismatch {
        /// `TRAINCTL_RESUME_FROM`.
        path: PathBuf,
        /// What differs, and how to fix it.
        problem: String,
    },
    /// The ranks do not start from the same step.
    #[error("the ranks do not all resume after the same step (this rank: step {step}); every rank must get the same TRAINCTL_RESUME_FROM")]
    ResumeDisagreement {
        /// This rank's starting step.
        step: u32,
    },
    /// `--fail-at-step` asked this rank to fail here.
    #[error("injected failure at step {step} (--fail-at-step)")]
    InjectedFailure {
        /// The step after which the rank failed.
        step: u32,
    },
}

const USAGE: &str = "usage: trainctl example-train [--steps N] [--seed S] [--batch B] [--lr X]
                              [--device cpu|cuda] [--transport tcp|rdma]
                              [--checkpoint-every N] [--step-delay-ms N]
                              [--fail-at-step N | --hang-at-step N] [--fail-rank R] [--fail-attempt A]

Deterministic data-parallel training of a small MLP on synthetic data, to check a cluster
end to end. The final parameters are bit-identical for any world size and across restarts.
Reads RANK, WORLD_SIZE, MASTER_ADDR (an IP address), MASTER_PORT, and optionally
TRAINCTL_NODE_ADDR and TRAINCTL_RENDEZVOUS_TIMEOUT_SECS from the environment. With
TORCHELASTIC_USE_AGENT_STORE=True the ranks meet through the TCPStore the launcher's agent serves
at MASTER_ADDR:MASTER_PORT; otherwise rank 0 listens there. Under trainctl
also TRAINCTL_CHECKPOINT_DIR, TRAINCTL_RESUME_FROM, TRAINCTL_RESUME_STEP, TRAINCTL_AGENT_URL,
TRAINCTL_JOB_TOKEN and TORCHELASTIC_RESTART_COUNT (or TRAINCTL_ATTEMPT). SIGUSR1 makes rank 0
checkpoint at the next step.

  --steps N             SGD steps in all, counting those before a resume (default 30)
  --seed S              seed of data, teacher and initial parameters (default 42)
  --batch B             global batch size, split across ranks (default 128)
  --lr X                learning rate (default 0.2)
  --device D            where the gradients are all-reduced: cpu (default; the ring of --transport)
                        or cuda (NCCL on this rank's GPU: the one CUDA_VISIBLE_DEVICES names, or
                        LOCAL_RANK's when several are visible; TRAINCTL_NCCL_LIBRARY overrides
                        where libnccl.so.2 is found). The checksum is the same on either
  --transport T         the ring's transport with --device cpu: tcp (default) or rdma (RC queue
                        pairs of libibverbs on TRAINCTL_RDMA_DEVICE, else NCCL_IB_HCA's first
                        device, else the first ACTIVE port; GID index NCCL_IB_GID_INDEX)
  --checkpoint-every N  rank 0 checkpoints every N steps into TRAINCTL_CHECKPOINT_DIR
                        (default 10 when it is set; 0 for none)
  --step-delay-ms N     sleep N ms after each step (default 0)
  --fail-at-step N      rank --fail-rank exits with code 3 after step N, on attempt --fail-attempt
  --hang-at-step N      rank --fail-rank stops and sleeps forever after step N, likewise
  --fail-rank R         the rank --fail-at-step / --hang-at-step applies to (default 0)
  --fail-attempt A      the attempt they apply to (default 0)";

const ACCEPTED_FLAGS: &str = "--steps N, --seed S, --batch B, --lr X, --device cpu|cuda, --transport tcp|rdma, --checkpoint-every N, --step-delay-ms N, --fail-at-step N, --hang-at-step N, --fail-rank R, --fail-attempt A";

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Exit with [`INJECTED_FAILURE_EXIT_CODE`] (`--fail-at-step`).
    Exit,
    /// Stop printing and sleep forever (`--hang-at-step`), for hang detection.
    Hang,
}

/// A fault to inject, for tests and chaos demos: rank `rank` does `kind` after step `step`, on
/// attempt `attempt` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exit or hang.
    pub kind: FaultKind,
    /// After this step (counted from 1).
    pub step: u32,
    /// On this rank.
    pub rank: u32,
    /// On this attempt (`TORCHELASTIC_RESTART_COUNT`).
    pub attempt: u32,
}

/// Where `example-train` all-reduces (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// Host memory, over the ring of [`Transport`].
    #[default]
    Cpu,
    /// This rank's GPU, over NCCL ([`NcclCollective`]).
    Cuda,
}

/// The ring's transport with `--device cpu` (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP connections ([`TcpRing`]).
    #[default]
    Tcp,
    /// RDMA writes between RC queue pairs ([`RdmaRing`]).
    Rdma,
}

/// Everything `trainctl example-train` accepts on its command line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExampleArgs {
    /// The hyperparameters, which must be the same on every rank and every attempt.
    pub train: TrainConfig,
    /// `--device`.
    pub device: DeviceChoice,
    /// `--transport`; `None` when not given (TCP).
    pub transport: Option<Transport>,
    /// `--checkpoint-every`; `None` when not given.
    pub checkpoint_every: Option<u32>,
    /// `--step-delay-ms`.
    pub step_delay_ms: u64,
    /// `--fail-at-step` / `--hang-at-step` with `--fail-rank` and `--fail-attempt`.
    pub fault: Option<Fault>,
}

/// Parses the flags of `trainctl example-train` (also as `--flag=value`); missing flags keep their
/// defaults. The error says which argument was wrong and what is accepted.
pub fn parse_args(args: &[String]) -> Result<ExampleArgs, String> {
    let mut parsed = ExampleArgs::default();
    let cfg = &mut parsed.train;
    let (mut fail_at, mut hang_at, mut fail_rank, mut fail_attempt) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let expects = match flag {
            "--steps" | "--fail-at-step" | "--hang-at-step" => {
                format!("a whole number from 1 to {MAX_STEPS}")
            }
            "--seed" => "a whole number from 0 to 18446744073709551615".to_string(),
            "--batch" => format!("a whole number from 1 to {MAX_GLOBAL_BATCH}"),
            "--lr" => "a positive number such as 0.05".to_string(),
            "--checkpoint-every" => format!("a whole number from 0 (none) to {MAX_STEPS}"),
            "--step-delay-ms" => format!("a whole number from 0 to {MAX_STEP_DELAY_MS}"),
            "--fail-rank" => format!("a whole number below {}", crate::MAX_WORLD_SIZE),
            "--fail-attempt" => "a whole number from 0".to_string(),
            "--device" => "cpu or cuda".to_string(),
            "--transport" => "tcp or rdma".to_string(),
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
        let step = || {
            value
                .parse::<u32>()
                .ok()
                .filter(|s| (1..=MAX_STEPS).contains(s))
                .ok_or_else(bad)
        };
        match flag {
            "--steps" => cfg.steps = step()?,
            "--seed" => cfg.seed = value.parse().map_err(|_| bad())?,
            "--batch" => {
                cfg.global_batch = value
                    .parse()
                    .ok()
                    .filter(|b| (1..=MAX_GLOBAL_BATCH).contains(b))
                    .ok_or_else(bad)?
            }
            "--lr" => {
                cfg.lr = value
                    .parse()
                    .ok()
                    .filter(|lr: &f32| lr.is_finite() && *lr > 0.0)
                    .ok_or_else(bad)?
            }
            "--checkpoint-every" => {
                parsed.checkpoint_every = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_STEPS)
                        .ok_or_else(bad)?,
                )
            }
            "--step-delay-ms" => {
                parsed.step_delay_ms = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_STEP_DELAY_MS)
                    .ok_or_else(bad)?
            }
            "--device" => {
                parsed.device = match value.as_str() {
                    "cpu" => DeviceChoice::Cpu,
                    "cuda" => DeviceChoice::Cuda,
                    _ => return Err(bad()),
                }
            }
            "--transport" => {
                parsed.transport = Some(match value.as_str() {
                    "tcp" => Transport::Tcp,
                    "rdma" => Transport::Rdma,
                    _ => return Err(bad()),
                })
            }
            "--fail-at-step" => fail_at = Some(step()?),
            "--hang-at-step" => hang_at = Some(step()?),
            "--fail-rank" => {
                fail_rank = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|r| *r < crate::MAX_WORLD_SIZE)
                        .ok_or_else(bad)?,
                )
            }
            _ => fail_attempt = Some(value.parse::<u32>().map_err(|_| bad())?),
        }
    }
    if parsed.device == DeviceChoice::Cuda && parsed.transport.is_some() {
        return Err(
            "--transport applies to --device cpu: with --device cuda NCCL chooses its own transport (InfiniBand or RoCE through NCCL_IB_*, else sockets)"
                .to_string(),
        );
    }
    let (kind, step) = match (fail_at, hang_at) {
        (Some(_), Some(_)) => {
            return Err(
                "--fail-at-step and --hang-at-step exclude each other: give one".to_string(),
            )
        }
        (Some(s), None) => (FaultKind::Exit, s),
        (None, Some(s)) => (FaultKind::Hang, s),
        (None, None) => {
            if fail_rank.is_some() || fail_attempt.is_some() {
                return Err(
                    "--fail-rank and --fail-attempt need --fail-at-step or --hang-at-step"
                        .to_string(),
                );
            }
            return Ok(parsed);
        }
    };
    parsed.fault = Some(Fault {
        kind,
        step,
        rank: fail_rank.unwrap_or(0),
        attempt: fail_attempt.unwrap_or(0),
    });
    Ok(parsed)
}

/// Where a run resumes from: `TRAINCTL_RESUME_FROM` and `TRAINCTL_RESUME_STEP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The committed checkpoint: a step directory holding `params.bin`, or the file itself.
    pub path: PathBuf,
    /// The step the agent says it holds; checked against the file. `None` trusts the file.
    pub step: Option<u64>,
}

/// How a run checkpoints, resumes and misbehaves, beyond the hyperparameters. The default is a
/// plain run: no checkpoints, no resume, attempt 0.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `TRAINCTL_CHECKPOINT_DIR`: where rank 0 writes checkpoints. `None`: no checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint after every this many steps (0: only on request).
    pub checkpoint_every: u32,
    /// The checkpoint to continue from.
    pub resume: Option<ResumePoint>,
    /// The attempt number, 0 first (`TORCHELASTIC_RESTART_COUNT` / `TRAINCTL_ATTEMPT`).
    pub attempt: u32,
    /// The agent to commit checkpoints to. `None`: checkpoints are written but not committed.
    pub agent: Option<AgentEndpoint>,
    /// Why `agent` is `None`, for the "not committed" message (default: `TRAINCTL_AGENT_URL` is
    /// not set).
    pub agent_missing: Option<String>,
    /// Polled by rank 0 at every step boundary; when set, rank 0 clears it and checkpoints at once
    /// (the `SIGUSR1` flag under `trainctl`).
    pub checkpoint_now: Option<&'static AtomicBool>,
    /// A fault to inject.
    pub fault: Option<Fault>,
    /// Sleep after each step.
    pub step_delay: Duration,
}

/// Builds the [`RunOptions`] of a rank from its command line and trainctl's variables, read
/// through `get`:
///
/// - `TRAINCTL_CHECKPOINT_DIR`: enables checkpoints, every `--checkpoint-every` steps (default
///   [`DEFAULT_CHECKPOINT_EVERY`]);
/// - `TRAINCTL_RESUME_FROM`, `TRAINCTL_RESUME_STEP`: the checkpoint to resume from;
/// - `TRAINCTL_AGENT_URL`, `TRAINCTL_JOB_TOKEN`: where to commit (optional: without them
///   checkpoints are written but not committed);
/// - `TORCHELASTIC_RESTART_COUNT`, else `TRAINCTL_ATTEMPT`: the attempt, default 0.
///
/// `checkpoint_now` is left unset: [`example_train_from_env`] installs the signal handler.
pub fn run_options_from_env(
    args: &ExampleArgs,
    get: impl Fn(&str) -> Option<String>,
) -> Result<RunOptions, ExampleError> {
    let nonempty = |var: &str| get(var).filter(|v| !v.trim().is_empty());
    let checkpoint_dir = nonempty("TRAINCTL_CHECKPOINT_DIR").map(PathBuf::from);
    let checkpoint_every = match (&checkpoint_dir, args.checkpoint_every) {
        (None, _) => 0,
        (Some(_), Some(n)) => n,
        (Some(_), None) => DEFAULT_CHECKPOINT_EVERY,
    };
    let number = |var: &'static str, value: String| {
        value.trim().parse::<u64>().map_err(|_| ExampleError::Env {
            var,
            problem: format!("`{value}` is not valid: expected a whole number"),
        })
    };
    let resume = match nonempty("TRAINCTL_RESUME_FROM") {
        None => None,
        Some(path) => Some(ResumePoint {
            path: PathBuf::from(path),
            step: nonempty("TRAINCTL_RESUME_STEP")
                .map(|v| number("TRAINCTL_RESUME_STEP", v))
                .transpose()?,
        }),
    };
    let mut attempt = 0;
    for var in ["TORCHELASTIC_RESTART_COUNT", "TRAINCTL_ATTEMPT"] {
        if let Some(v) = nonempty(var) {
            attempt = u32::try_from(number(var, v)?).map_err(|_| ExampleError::Env {
                var,
                problem: "is out of range".to_string(),
            })?;
            break;
        }
    }
    let (agent, agent_missing) = match AgentEndpoint::from_env_with(&get) {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(RunOptions {
        checkpoint_dir,
        checkpoint_every,
        resume,
        attempt,
        agent,
        agent_missing,
        checkpoint_now: None,
        fault: args.fault,
        step_delay: Duration::from_millis(args.step_delay_ms),
    })
}

/// Builds this rank's [`RendezvousConfig`] from launcher variables, read through `get` (pass
/// `|k| std::env::var(k).ok()` for the process environment):
///
/// - `RANK`, `WORLD_SIZE`, `MASTER_PORT`: required whole numbers;
/// - `MASTER_ADDR`: required IP address (host names are not resolved);
/// - `TRAINCTL_NODE_ADDR`: optional IP address to listen on and advertise; default all interfaces,
///   advertising the address this rank reaches rank 0 from;
/// - `TRAINCTL_RENDEZVOUS_TIMEOUT_SECS`: optional, default [`DEFAULT_RENDEZVOUS_TIMEOUT_SECS`];
/// - `TORCHELASTIC_USE_AGENT_STORE`: exactly `True` (torchrun's test, `== str(True)`) when the
///   launcher's agent serves a TCPStore at `MASTER_ADDR:MASTER_PORT` and every rank is its client
///   ([`RendezvousConfig::use_agent_store`]); anything else, or unset, and rank 0 listens there.
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
    let use_agent_store = get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
    Ok(RendezvousConfig {
        rank,
        world_size,
        master_addr,
        master_port,
        bind_addr,
        timeout: Duration::from_secs(timeout_secs),
        use_agent_store,
    })
}

/// Trains the example model over `coll` from scratch, without checkpoints: [`example_train_with`]
/// with the default [`RunOptions`].
pub fn example_train(
    cfg: &TrainConfig,
    coll: &mut dyn Collective,
    out: &mut dyn Write,
) -> Result<TrainSummary, ExampleError> {
    example_train_with(cfg, &RunOptions::default(), coll, out)
}

/// Trains the example model over `coll`, writing `step i/n loss x` per step and then
/// `final checksum 0x<16 hex digits> params <n>` to `out`; when resuming, first
/// `resumed from <path> at step <n> (attempt <a>)`. Rank 0 also writes a line per checkpoint.
///
/// Every rank must call this with the same `cfg` and the same resume point. Checkpoint write and
/// commit failures are reported on standard error and training continues.
pub fn example_train_with(
    cfg: &TrainConfig,
    opts: &RunOptions,
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
    let mut start_step = 0u32;
    if let Some(resume) = &opts.resume {
        let snap = load_resume_point(cfg, resume)?;
        start_step = snap.step as u32;
        model.params = snap.params;
        writeln!(
            out,
            "resumed from {} at step {start_step} (attempt {})",
            resume.path.display(),
            opts.attempt
        )
        .map_err(ExampleError::Output)?;
    }
    // Every rank must continue from the same step: the sums of s and s^2 over the ranks equal
    // world * s and world * s^2 only if every rank has the same s.
    let s = i64::from(start_step);
    let mut agree = [s, s * s];
    coll.all_reduce_sum_i64(&mut agree)?;
    if agree != [world as i64 * s, world as i64 * s * s] {
        return Err(ExampleError::ResumeDisagreement { step: start_step });
    }
    // Every rank derives (or loads) the same parameters; broadcasting rank 0's copy still makes
    // that a property of the collective rather than an assumption, as in real data-parallel
    // training.
    coll.broadcast_f32(&mut model.params, 0)?;

    // Fixed-point sums: the gradient, then the squared error, then how many examples had a value
    // out of range. One all-reduce carries all three.
    let loss_slot = PARAM_COUNT;
    let overflow_slot = PARAM_COUNT + 1;
    let mut sums = vec![0i64; PARAM_COUNT + 2];
    let mut grad = vec![0.0f32; PARAM_COUNT];
    let per_example_limit = FIXED_POINT_SUM_LIMIT / batch as i64;
    let mut losses = Vec::new();
    let mut checkpoints = Vec::new();
    for step in start_step + 1..=cfg.steps {
        sums.fill(0);
        for j in shard.clone() {
            let index = (u64::from(step - 1) * batch as u64 + j as u64) % DATASET_EXAMPLE_COUNT;
            let x = example_input(cfg.seed, index);
            let target = teacher.forward(&x).0;
            grad.fill(0.0);
            let sq = model.accumulate_gradient(&x, target, &mut grad);
            let mut in_range = true;
            for (sum, g) in sums.iter_mut().zip(grad.iter().chain([&sq])) {
                match to_fixed(*g, per_example_limit) {
                    Some(q) => *sum = sum.wrapping_add(q),
                    None => in_range = false,
                }
            }
            if !in_range {
                sums[overflow_slot] += 1;
            }
        }
        coll.all_reduce_sum_i64(&mut sums)?;
        if sums[overflow_slot] != 0 {
            return Err(ExampleError::GradientOverflow {
                step,
                count: sums[overflow_slot],
                lr: cfg.lr,
            });
        }
        let loss = (from_fixed(sums[loss_slot]) / batch as f64) as f32;
        if !loss.is_finite() {
            return Err(ExampleError::Diverged {
                step,
                loss,
                lr: cfg.lr,
            });
        }
        writeln!(out, "step {step}/{} loss {loss:.6}", cfg.steps).map_err(ExampleError::Output)?;
        losses.push(loss);
        let scale = f64::from(cfg.lr) / batch as f64;
        for (p, g) in model.params.iter_mut().zip(&sums[..PARAM_COUNT]) {
            *p = (f64::from(*p) - scale * from_fixed(*g)) as f32;
        }

        if rank == 0 {
            let now = opts
                .checkpoint_now
                .is_some_and(|flag| flag.swap(false, Ordering::SeqCst));
            let periodic = opts.checkpoint_every != 0 && step.is_multiple_of(opts.checkpoint_every);
            if now || periodic {
                if let Some(record) = checkpoint(cfg, opts, step, &model.params, loss, now, out)? {
                    checkpoints.push(record);
                }
            }
        }
        if let Some(fault) = opts.fault {
            if fault.step == step && fault.rank as usize == rank && fault.attempt == opts.attempt {
                match fault.kind {
                    FaultKind::Exit => {
                        writeln!(out, "injected failure at step {step}")
                            .and_then(|()| out.flush())
                            .map_err(ExampleError::Output)?;
                        return Err(ExampleError::InjectedFailure { step });
                    }
                    FaultKind::Hang => {
                        let _ = out.flush();
                        loop {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                    }
                }
            }
        }
        if !opts.step_delay.is_zero() {
            out.flush().map_err(ExampleError::Output)?;
            std::thread::sleep(opts.step_delay);
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
        start_step,
        checkpoints,
    })
}

/// `value` in fixed point, or `None` when it is not finite or beyond ±`limit` in fixed point.
fn to_fixed(value: f32, limit: i64) -> Option<i64> {
    // Exact: f32 to f64 is exact and so is scaling by a power of two; `round` is deterministic.
    let scaled = (f64::from(value) * (GRAD_FRACTION_BITS as f64).exp2()).round();
    (scaled.is_finite() && scaled.abs() <= limit as f64).then_some(scaled as i64)
}

fn from_fixed(sum: i64) -> f64 {
    sum as f64 * (-(GRAD_FRACTION_BITS as f64)).exp2()
}

/// Reads the resume point and checks that it belongs to this configuration.
fn load_resume_point(cfg: &TrainConfig, resume: &ResumePoint) -> Result<Snapshot, ExampleError> {
    let snap = params_file::read(&resume.path).map_err(|problem| ExampleError::Resume {
        path: resume.path.clone(),
        problem,
    })?;
    let mismatch = |problem: String| ExampleError::ResumeMismatch {
        path: resume.path.clone(),
        problem,
    };
    if snap.workload_version != WORKLOAD_VERSION
        || snap.fraction_bits != GRAD_FRACTION_BITS
        || snap.params.len() != PARAM_COUNT
    {
        return Err(mismatch(format!(
            "it was written by another version of example-train (workload version {}, {} parameters; this one is version {WORKLOAD_VERSION}, {PARAM_COUNT} parameters)",
            snap.workload_version,
            snap.params.len()
        )));
    }
    let mut differs = Vec::new();
    if snap.seed != cfg.seed {
        differs.push(format!("--seed {} (this run: {})", snap.seed, cfg.seed));
    }
    if snap.global_batch != cfg.global_batch {
        differs.push(format!(
            "--batch {} (this run: {})",
            snap.global_batch, cfg.global_batch
        ));
    }
    if snap.lr.to_bits() != cfg.lr.to_bits() {
        differs.push(format!("--lr {} (this run: {})", snap.lr, cfg.lr));
    }
    if !differs.is_empty() {
        return Err(mismatch(format!(
            "it was written with {}; resume with the same flags, or start without TRAINCTL_RESUME_FROM",
            differs.join(", ")
        )));
    }
    if let Some(step) = resume.step {
        if step != snap.step {
            return Err(mismatch(format!(
                "TRAINCTL_RESUME_STEP is {step} but the checkpoint holds step {}",
                snap.step
            )));
        }
    }
    if snap.step > u64::from(MAX_STEPS) {
        return Err(mismatch(format!(
            "its step {} is beyond the largest, {MAX_STEPS}",
            snap.step
        )));
    }
    if let Some(bad) = snap.params.iter().position(|p| !p.is_finite()) {
        return Err(ExampleError::Resume {
            path: resume.path.clone(),
            problem: format!("parameter {bad} is not a finite number"),
        });
    }
    Ok(snap)
}

/// Rank 0's checkpoint after `step`: writes it atomically and commits it. Failures to write or to
/// commit go to standard error and return `Ok`, so that training continues; only a failure to
/// write the log is an error.
fn checkpoint(
    cfg: &TrainConfig,
    opts: &RunOptions,
    step: u32,
    params: &[f32],
    loss: f32,
    requested: bool,
    out: &mut dyn Write,
) -> Result<Option<CheckpointRecord>, ExampleError> {
    let stderr = |msg: String| {
        let _ = writeln!(io::stderr(), "trainctl example-train: {msg}");
    };
    let Some(dir) = &opts.checkpoint_dir else {
        stderr(format!(
            "checkpoint requested at step {step}, but TRAINCTL_CHECKPOINT_DIR is not set; not checkpointing"
        ));
        return Ok(None);
    };
    let bytes = params_file::encode(&Snapshot {
        workload_version: WORKLOAD_VERSION,
        step: u64::from(step),
        seed: cfg.seed,
        global_batch: cfg.global_batch,
        lr: cfg.lr,
        fraction_bits: GRAD_FRACTION_BITS,
        params: params.to_vec(),
    });
    let path = match params_file::write_atomic(dir, u64::from(step), &bytes) {
        Ok(path) => path,
        Err(e) => {
            stderr(format!(
                "cannot write checkpoint step {step} in {}: {e}; training continues",
                dir.display()
            ));
            return Ok(None);
        }
    };
    let commit = match (&opts.agent, path.to_str()) {
        (None, _) => Err(opts.agent_missing.clone().unwrap_or_else(|| {
            CheckpointError::MissingEnv {
                var: crate::checkpoint::AGENT_URL_VAR,
            }
            .to_string()
        })),
        (Some(_), None) => Err("its path is not UTF-8".to_string()),
        (Some(agent), Some(p)) => agent
            .commit(p, u64::from(step), Some(&format!("{{\"loss\":{loss}}}")))
            .map_err(|e: CheckpointError| e.to_string()),
    };
    let committed = commit.is_ok();
    let line = match (commit, requested) {
        (Ok(_), true) => format!("checkpoint now: committed step {step}"),
        (Ok(_), false) => format!("checkpoint step {step} committed: {}", path.display()),
        (Err(e), _) if opts.agent.is_none() => format!(
            "checkpoint step {step} written to {} but not committed: {e}",
            path.display()
        ),
        (Err(e), _) => {
            stderr(format!(
                "checkpoint step {step} written to {} but not committed: {e}; training continues",
                path.display()
            ));
            return Ok(Some(CheckpointRecord {
                step,
                path,
                committed,
            }));
        }
    };
    writeln!(out, "{line}").map_err(ExampleError::Output)?;
    Ok(Some(CheckpointRecord {
        step,
        path,
        committed,
    }))
}

/// Reads the launcher's environment, installs the `SIGUSR1` ("checkpoint now") handler, joins the
/// other ranks over [`TcpRing`] and trains, printing to standard output. `args` are the flags
/// [`parse_args`] accepts.
pub fn example_train_from_env(args: &[String]) -> Result<TrainSummary, ExampleError> {
    let parsed = parse_args(args).map_err(ExampleError::Args)?;
    let get = |k: &str| std::env::var(k).ok();
    let mut opts = run_options_from_env(&parsed, get)?;
    match crate::signal::install_checkpoint_signal() {
        Ok(flag) => opts.checkpoint_now = Some(flag),
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "trainctl example-train: cannot install the SIGUSR1 handler: {e}"
            );
        }
    }
    if parsed.checkpoint_every.is_some_and(|n| n > 0) && opts.checkpoint_dir.is_none() {
        let _ = writeln!(
            io::stderr(),
            "trainctl example-train: --checkpoint-every is ignored: TRAINCTL_CHECKPOINT_DIR is not set (the job has no [checkpoint] table)"
        );
    }
    train_on_backend(&parsed, &opts, get)
}

/// Opens the backend `args` choose (host checks first, so a host without CUDA, NCCL or an RDMA
/// device fails before it waits on any peer), meets the other ranks and trains, printing to
/// standard output. GPU and RDMA backends end in order: every rank waits for the others to
/// finish before it tears its communicator down.
fn train_on_backend(
    args: &ExampleArgs,
    opts: &RunOptions,
    get: impl Fn(&str) -> Option<String>,
) -> Result<TrainSummary, ExampleError> {
    let stdout = io::stdout();
    match (args.device, args.transport.unwrap_or_default()) {
        (DeviceChoice::Cpu, Transport::Tcp) => {
            let rdzv = rendezvous_config_from_env(&get)?;
            let mut ring = TcpRing::connect(rdzv)?;
            example_train_with(&args.train, opts, &mut ring, &mut stdout.lock())
        }
        (DeviceChoice::Cuda, _) => {
            let nccl_opts = nccl_options_from_env(&get)?;
            // The host first: without CUDA or NCCL, say so before asking for launcher variables.
            open_host(&nccl_opts)?;
            let rdzv = rendezvous_config_from_env(&get)?;
            let mut coll = NcclCollective::connect(rdzv, &nccl_opts)?;
            let nccl = coll.nccl();
            let _ = writeln!(
                io::stderr(),
                "trainctl example-train: NCCL {} ({}) on {}, rank {} of {}, communicator ready in {} ms",
                nccl.version(),
                nccl.library(),
                coll.device(),
                coll.rank(),
                coll.world_size(),
                coll.init_time().as_millis()
            );
            let summary = example_train_with(&args.train, opts, &mut coll, &mut stdout.lock())?;
            coll.finish();
            Ok(summary)
        }
        (DeviceChoice::Cpu, Transport::Rdma) => {
            let rdma_opts = RdmaOptions::from_env(&get).map_err(ExampleError::Args)?;
            crate::rdma::check_host(&rdma_opts)?;
            let rdzv = rendezvous_config_from_env(&get)?;
            let mut ring = RdmaRing::connect(rdzv, &rdma_opts)?;
            let summary = example_train_with(&args.train, opts, &mut ring, &mut stdout.lock())?;
            ring.finish();
            Ok(summary)
        }
    }
}

/// The NCCL backend's options from the environment, read through `get`: `LOCAL_RANK` (which
/// visible GPU, when several are) and `TRAINCTL_NCCL_LIBRARY` (a path to `libnccl.so.2` instead
/// of the loader's search).
pub fn nccl_options_from_env(
    get: impl Fn(&str) -> Option<String>,
) -> Result<NcclOptions, ExampleError> {
    let local_rank = match get("LOCAL_RANK").filter(|v| !v.trim().is_empty()) {
        None => None,
        Some(v) => Some(v.trim().parse::<u32>().map_err(|_| ExampleError::Env {
            var: "LOCAL_RANK",
            problem: format!("`{v}` is not valid: expected a whole number"),
        })?),
    };
    Ok(NcclOptions {
        library: get("TRAINCTL_NCCL_LIBRARY")
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from),
        local_rank,
        ..NcclOptions::default()
    })
}

/// The process exit code for `e`: 2 for what must be fixed before a run can start (arguments,
/// environment, the checkpoint to resume from, a backend this host cannot run), 3 for an injected
/// failure, 1 for the rest.
pub fn exit_code(e: &ExampleError) -> i32 {
    match e {
        ExampleError::Args(_)
        | ExampleError::Env { .. }
        | ExampleError::ResumeMismatch { .. }
        | ExampleError::Collective(CollectiveError::Unavailable { .. }) => 2,
        ExampleError::InjectedFailure { .. } => INJECTED_FAILURE_EXIT_CODE,
        _ => 1,
    }
}

/// Entry point of `trainctl example-train [args]`: runs [`example_train_from_env`] and returns the
/// process exit code (0 success, 1 failure, 2 bad arguments, environment or checkpoint to resume
/// from, [`INJECTED_FAILURE_EXIT_CODE`] for `--fail-at-step`). Errors go to standard error; nothing
/// here panics.
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
            if matches!(e, ExampleError::Args(_)) {
                let _ = writeln!(io::stderr(), "{USAGE}");
            }
            exit_code(&e)
        }
    }
}

/// FNV-1a (64-bit) over the little-endian bytes of `params`: a cheap fingerprint for checking that
/// runs and ranks ended with bit-identical parameters.
pub fn params_checksum(params: &[f32]) -> u64 {
    params
        .iter()
        .fold(FNV_OFFSET, |hash, p| fnv1a(hash, &p.to_le_bytes()))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a (64-bit) over `bytes`.
pub(crate) fn params_checksum_bytes(bytes: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, bytes)
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
    fn device_and_transport_choose_the_backend_and_refuse_what_cannot_mix() {
        type Case<'a> = (&'a str, Result<(DeviceChoice, Option<Transport>), &'a str>);
        let cases: &[Case] = &[
            ("", Ok((DeviceChoice::Cpu, None))),
            ("--device cpu", Ok((DeviceChoice::Cpu, None))),
            ("--device=cuda", Ok((DeviceChoice::Cuda, None))),
            ("--transport rdma", Ok((DeviceChoice::Cpu, Some(Transport::Rdma)))),
            (
                "--device cpu --transport=tcp",
                Ok((DeviceChoice::Cpu, Some(Transport::Tcp))),
            ),
            (
                "--device gpu",
                Err("--device `gpu` is not valid: expected cpu or cuda"),
            ),
            (
                "--transport ib",
                Err("--transport `ib` is not valid: expected tcp or rdma"),
            ),
            ("--device", Err("--device needs a value: cpu or cuda")),
            (
                "--device cuda --transport rdma",
                Err("--transport applies to --device cpu: with --device cuda NCCL chooses its own transport"),
            ),
        ];
        for (line, want) in cases {
            match (parse_args(&args(line)), want) {
                (Ok(got), Ok(pair)) => assert_eq!((got.device, got.transport), *pair, "{line}"),
                (Err(e), Err(prefix)) => assert!(e.starts_with(prefix), "{line}: {e}"),
                (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn exit_codes_separate_setup_errors_from_failed_runs() {
        let unavailable = ExampleError::Collective(CollectiveError::Unavailable {
            backend: "nccl",
            missing: "no GPU".to_owned(),
        });
        let lost = ExampleError::Collective(CollectiveError::Aborted {
            reason: "a peer is gone".to_owned(),
        });
        let cases = [
            (ExampleError::Args("x".to_owned()), 2),
            (
                ExampleError::Env {
                    var: "RANK",
                    problem: "x".to_owned(),
                },
                2,
            ),
            (unavailable, 2),
            (lost, 1),
            (ExampleError::InjectedFailure { step: 3 }, 3),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(&e), code, "{e}");
        }
    }

    #[test]
    fn a_backend_this_host_cannot_run_is_named_before_any_rendezvous() {
        // No launcher variables at all: the host check comes first, and no peer is waited for.
        let no_env = |_: &str| None;
        let opts = RunOptions::default();
        let cuda = parse_args(&args("--device cuda")).unwrap();
        if trainctl_ffi::cuda::driver_present() {
            crate::testing::skip(
                "this host has a CUDA driver: the missing-GPU error cannot be seen",
            );
        } else {
            let err = train_on_backend(&cuda, &opts, no_env).unwrap_err();
            assert_eq!(exit_code(&err), 2, "{err}");
            assert!(
                err.to_string().starts_with(
                    "the nccl backend cannot run on this host: no CUDA driver library (libcuda.so.1)"
                ),
                "{err}"
            );
        }
        let rdma = parse_args(&args("--transport rdma")).unwrap();
        match train_on_backend(&rdma, &opts, no_env) {
            Err(err @ ExampleError::Collective(CollectiveError::Unavailable { .. })) => {
                assert_eq!(exit_code(&err), 2);
                assert!(err.to_string().contains("--transport tcp"), "{err}");
            }
            // Past the host check, the missing launcher variables are the error.
            Err(ExampleError::Env { .. }) => crate::testing::skip(
                "this host has an ACTIVE RDMA port: the missing-device error cannot be seen",
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nccl_options_read_local_rank_and_the_library_path() {
        let o = nccl_options_from_env(env(&[
            ("LOCAL_RANK", "3"),
            ("TRAINCTL_NCCL_LIBRARY", "/opt/nccl/lib/libnccl.so.2"),
        ]))
        .unwrap();
        assert_eq!(o.local_rank, Some(3));
        assert_eq!(o.library, Some(PathBuf::from("/opt/nccl/lib/libnccl.so.2")));
        let o = nccl_options_from_env(env(&[])).unwrap();
        assert_eq!((o.local_rank, o.library), (None, None));
        let err = nccl_options_from_env(env(&[("LOCAL_RANK", "x")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable LOCAL_RANK: `x` is not valid: expected a whole number"
        );
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
            let got = parse_args(&args(line)).unwrap();
            assert_eq!(&got.train, want, "{line:?}");
            assert_eq!(
                (got.checkpoint_every, got.step_delay_ms, got.fault),
                (None, 0, None)
            );
        }
        let got = parse_args(&args(
            "--checkpoint-every 5 --step-delay-ms=20 --fail-at-step 7 --fail-rank 1 --fail-attempt 2",
        ))
        .unwrap();
        assert_eq!(got.checkpoint_every, Some(5));
        assert_eq!(got.step_delay_ms, 20);
        assert_eq!(
            got.fault,
            Some(Fault {
                kind: FaultKind::Exit,
                step: 7,
                rank: 1,
                attempt: 2
            })
        );
        let got = parse_args(&args("--hang-at-step 3 --checkpoint-every 0")).unwrap();
        assert_eq!(got.checkpoint_every, Some(0));
        assert_eq!(
            got.fault,
            Some(Fault {
                kind: FaultKind::Hang,
                step: 3,
                rank: 0,
                attempt: 0
            })
        );
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
            (
                "--checkpoint-every -1",
                "--checkpoint-every `-1` is not valid",
            ),
            ("--step-delay-ms x", "--step-delay-ms `x` is not valid"),
            ("--fail-at-step 0", "--fail-at-step `0` is not valid"),
            (
                "--fail-at-step 2 --hang-at-step 3",
                "--fail-at-step and --hang-at-step exclude each other",
            ),
            (
                "--fail-rank 1",
                "--fail-rank and --fail-attempt need --fail-at-step",
            ),
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
                use_agent_store: false,
            }
        );
        // torchrun's test is `== str(True)`: only the exact word selects the agent's store.
        for (value, want) in [("True", true), ("true", false), ("1", false), ("", false)] {
            let cfg =
                rendezvous_config_from_env(env(&with(&[("TORCHELASTIC_USE_AGENT_STORE", value)])))
                    .unwrap();
            assert_eq!(cfg.use_agent_store, want, "{value:?}");
        }
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
    fn run_options_read_the_trainctl_contract() {
        let plain = run_options_from_env(&ExampleArgs::default(), env(BASE)).unwrap();
        assert_eq!(plain.checkpoint_dir, None);
        assert_eq!(plain.checkpoint_every, 0);
        assert_eq!(plain.resume, None);
        assert_eq!(plain.attempt, 0);
        assert_eq!(plain.agent, None);
        assert!(
            plain
                .agent_missing
                .as_deref()
                .unwrap()
                .contains("TRAINCTL_AGENT_URL is not set"),
            "{plain:?}"
        );

        let full = with(&[
            ("TRAINCTL_CHECKPOINT_DIR", "/ckpt/job-1"),
            ("TRAINCTL_RESUME_FROM", "/ckpt/job-1/step-20"),
            ("TRAINCTL_RESUME_STEP", "20"),
            ("TRAINCTL_AGENT_URL", "http://127.0.0.2:41234"),
            ("TRAINCTL_JOB_TOKEN", "tok"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TRAINCTL_ATTEMPT", "5"),
        ]);
        let opts = run_options_from_env(&ExampleArgs::default(), env(&full)).unwrap();
        assert_eq!(opts.checkpoint_dir, Some(PathBuf::from("/ckpt/job-1")));
        assert_eq!(opts.checkpoint_every, DEFAULT_CHECKPOINT_EVERY);
        assert_eq!(
            opts.resume,
            Some(ResumePoint {
                path: "/ckpt/job-1/step-20".into(),
                step: Some(20)
            })
        );
        assert_eq!(opts.attempt, 2);
        assert_eq!(opts.agent.as_ref().unwrap().url, "http://127.0.0.2:41234");
        let every = ExampleArgs {
            checkpoint_every: Some(3),
            ..ExampleArgs::default()
        };
        assert_eq!(
            run_options_from_env(&every, env(&full))
                .unwrap()
                .checkpoint_every,
            3
        );
        let attempt = with(&[("TRAINCTL_ATTEMPT", "4")]);
        assert_eq!(
            run_options_from_env(&every, env(&attempt)).unwrap().attempt,
            4
        );
        let bad = with(&[
            ("TRAINCTL_RESUME_FROM", "/c"),
            ("TRAINCTL_RESUME_STEP", "x"),
        ]);
        let err = run_options_from_env(&every, env(&bad)).unwrap_err();
        assert!(
            err.to_string().contains("TRAINCTL_RESUME_STEP: `x`"),
            "{err}"
        );
    }

    #[test]
    fn fixed_point_round_trips_and_refuses_what_could_overflow() {
        let limit = FIXED_POINT_SUM_LIMIT / 128;
        assert_eq!(to_fixed(1.5, limit), Some(3 << 31));
        assert_eq!(to_fixed(-0.0, limit), Some(0));
        assert_eq!(from_fixed(to_fixed(-0.25, limit).unwrap()), -0.25);
        assert_eq!(to_fixed(f32::NAN, limit), None);
        assert_eq!(to_fixed(f32::INFINITY, limit), None);
        assert_eq!(to_fixed(1e10, limit), None);
        // 128 values at the limit still sum without overflow.
        let q = to_fixed(((limit as f64) * (-32f64).exp2()) as f32 * 0.999, limit).unwrap();
        assert!(q.checked_mul(128).is_some());
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
