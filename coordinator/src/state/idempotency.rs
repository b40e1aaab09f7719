//! Idempotent submission: `POST /v1/jobs` with an `Idempotency-Key` creates a job once, however
//! often it is retried (after a timeout, a 503, a leader change).
//!
//! The API wraps the `SubmitJob` in [`Command::Idempotent`] with the key and a digest of the
//! request (SHA-256 of the spec and `resume_from`, computed by the leader before the write and
//! carried in the command, so no replica depends on how its version serializes a spec). Applying it
//! looks the key up in [`IdempotencyKeys`], scoped by the submitter: the [`Actor`] of the
//! [`Command::Audited`] around it (token name and namespace, the job's `owner`), or the empty actor
//! for a bare command. Keys of different submitters never collide, and a submitter cannot learn
//! another's job ids by guessing keys.
//!
//! - Unknown key: the submission is applied; if it made a job, the key is recorded with the job id.
//! - Known key, same digest: nothing changes; [`CommandOutcome::JobReplayed`] names the first job.
//! - Known key, another digest: nothing changes; [`CommandOutcome::IdempotencyKeyReused`].
//!
//! Because the decision is taken by `apply`, in log order, two retries racing through different
//! leaders still make one job. A refused submission (invalid spec) records nothing: a retry is
//! judged afresh.
//!
//! Bounded and deterministic: a key is forgotten [`IDEMPOTENCY_KEY_TTL_MS`] after the `at_ms` of the
//! submission that recorded it (judged by the `at_ms` of later commands, never the clock), and at
//! most [`IDEMPOTENCY_KEYS_MAX`] are kept, the oldest recorded forgotten first.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trainctl_jobs::JobSpec;

use super::{rejected, Actor, Command, CommandOutcome, JobId, State};

/// How long a key is remembered after the submission that recorded it: a day.
pub const IDEMPOTENCY_KEY_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Most keys remembered; past it the oldest recorded is forgotten first.
pub const IDEMPOTENCY_KEYS_MAX: usize = 100_000;
/// Longest idempotency key, in characters (each printable ASCII).
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 128;

/// Whether `key` is acceptable as an idempotency key: 1 to [`IDEMPOTENCY_KEY_CHARS_MAX`] printable
/// ASCII characters (space to `~`), not all spaces.
pub fn idempotency_key_problem(key: &str) -> Option<String> {
    let ok = !key.trim().is_empty()
        && key.len() <= IDEMPOTENCY_KEY_CHARS_MAX
        && key.bytes().all(|b| (0x20..=0x7e).contains(&b));
    (!ok).then(|| {
        let shown: String = key.escape_debug().take(70).collect();
        format!(
            "`{shown}` is not a valid Idempotency-Key: use 1 to {IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII \
             characters (a random UUID or 32 hex digits is a good key)"
        )
    })
}

/// The digest a key is recorded with: SHA-256 (hex) of the submission's spec and `resume_from`.
/// The same request retried gives the same digest; any change to either gives another.
pub fn request_digest(spec: &JobSpec, resume_from_job: Option<JobId>) -> String {
    // Struct fields serialize in declaration order and maps are BTreeMaps: a canonical form.
    let bytes = serde_json::to_vec(&(spec, resume_from_job)).expect("a job spec serializes");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A submitter's key: token name, namespace, key.
pub(super) type ScopedKey = Arc<(String, Option<String>, String)>;

pub(super) fn scoped(submitter: &Actor, key: &str) -> ScopedKey {
    Arc::new((
        submitter.name.clone(),
        submitter.namespace.clone(),
        key.to_string(),
    ))
}

/// What a key was recorded for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// The job the first submission with the key made.
    pub job: JobId,
    /// [`request_digest`] of that submission.
    pub digest: String,
    /// When it was submitted (its command's `at_ms`).
    pub at_ms: u64,
}

impl KeyUse {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.at_ms.saturating_add(IDEMPOTENCY_KEY_TTL_MS)
    }
}

/// One remembered key, as snapshots store it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub submitter: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub key: String,
    pub digest: String,
    pub job: JobId,
    pub at_ms: u64,
}

/// The remembered idempotency keys, by submitter and key, in the order they were recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<KeyRecord>", into = "Vec<KeyRecord>")]
pub struct IdempotencyKeys {
    uses: BTreeMap<ScopedKey, KeyUse>,
    /// The keys of `uses`, oldest recorded first.
    order: VecDeque<ScopedKey>,
}

impl IdempotencyKeys {
    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.uses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uses.is_empty()
    }

    /// What `submitter`'s `key` was recorded for, unless forgotten or expired at `now_ms`.
    pub fn get(&self, submitter: &Actor, key: &str, now_ms: u64) -> Option<&KeyUse> {
        self.uses
            .get(&scoped(submitter, key))
            .filter(|u| !u.expired(now_ms))
    }

    /// Forgets the oldest recorded keys while they are expired at `now_ms`. (The leader's clock
    /// may step back, so a younger key can sit behind an older one; [`Self::get`] never returns
    /// an expired key either way.)
    pub(super) fn expire(&mut self, now_ms: u64) {
        while let Some(oldest) = self.order.front() {
            if !self.uses.get(oldest).is_some_and(|u| u.expired(now_ms)) {
                break;
            }
            let oldest = self.order.pop_front().expect("just seen");
            self.uses.remove(&oldest);
        }
    }

    pub(super) fn record(&mut self, key: ScopedKey, key_use: KeyUse) {
        if self.uses.insert(key.clone(), key_use).is_some() {
            // An expired key used again: it moves to the back.
            self.order.retain(|k| k != &key);
        }
        self.order.push_back(key);
        while self.uses.len() > IDEMPOTENCY_KEYS_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.uses.remove(&oldest);
        }
    }
}

impl From<Vec<KeyRecord>> for IdempotencyKeys {
    fn from(records: Vec<KeyRecord>) -> Self {
        let mut keys = IdempotencyKeys::default();
        for r in records {
            keys.record(
                Arc::new((r.submitter, r.namespace, r.key)),
                KeyUse {
                    job: r.job,
                    digest: r.digest,
                    at_ms: r.at_ms,
                },
            );
        }
        keys
    }
}

impl From<IdempotencyKeys> for Vec<KeyRecord> {
    fn from(keys: IdempotencyKeys) -> Self {
        keys.order
            .iter()
            .filter_map(|k| {
                let u = keys.uses.get(k)?;
                Some(KeyRecord {
                    submitter: k.0.clone(),
                    namespace: k.1.clone(),
                    key: k.2.clone(),
                    digest: u.digest.clone(),
                    job: u.job,
                    at_ms: u.at_ms,
                })
            })
            .collect()
    }
}

impl State {
    /// Applies `submit` (a [`Command::SubmitJob`]) once per `submitter` and `key`; see the module.
    pub(super) fn apply_idempotent(
        &mut self,
        submitter: &Actor,
        key: String,
        digest: String,
        submit: Command,
    ) -> CommandOutcome {
        let Command::SubmitJob { at_ms, .. } = &submit else {
            return rejected("only a job submission takes an idempotency key");
        };
        let at_ms = *at_ms;
        if let Some(problem) = idempotency_key_problem(&key) {
            return rejected(problem);
        }
        self.idempotency.expire(at_ms);
        if let Some(first) = self.idempotency.get(submitter, &key, at_ms) {
            let job = first.job;
            return if first.digest == digest {
                CommandOutcome::JobReplayed { job }
            } else {
                CommandOutcome::IdempotencyKeyReused { job }
            };
        }
        let outcome = self.apply(submit);
        if let CommandOutcome::JobSubmitted { job } = outcome {
            self.idempotency
                .record(scoped(submitter, &key), KeyUse { job, digest, at_ms });
        }
        outcome
    }
}
