//! Idempotency keys of submissions: a retry returns the first job and creates nothing; a reused key
//! with another request is refused; keys expire after a day, the oldest fall out past the bound,
//! and each submitter has their own.

use super::*;
use crate::state::idempotency::scoped;

fn alice() -> Actor {
    Actor {
        name: "alice".into(),
        namespace: None,
    }
}

fn actor(name: &str, namespace: Option<&str>) -> Actor {
    Actor {
        name: name.into(),
        namespace: namespace.map(str::to_string),
    }
}

fn spec_named(name: &str) -> JobSpec {
    let mut s = spec(1, 1, 0);
    s.name = name.to_string();
    s
}

/// What the API writes for a submission with `key`, on behalf of `by`.
fn keyed(by: &Actor, key: &str, spec: JobSpec, at_ms: u64) -> Command {
    let digest = request_digest(&spec, None);
    Command::Audited {
        actor: by.clone(),
        at_ms,
        command: Box::new(Command::Idempotent {
            key: key.to_string(),
            digest,
            submit: Box::new(Command::SubmitJob {
                spec,
                at_ms,
                secret: String::new(),
                resume_from_job: None,
            }),
        }),
    }
}

fn cluster() -> State {
    let mut state = State::default();
    register(&mut state, "node-1", 8, 0);
    state
}

#[test]
fn a_retry_with_the_same_key_returns_the_first_job_and_creates_nothing() {
    let mut state = cluster();
    let first = state.apply(keyed(&alice(), "k-1", spec_named("train"), AT));
    assert_eq!(first, CommandOutcome::JobSubmitted { job: JobId(1) });
    let before = state.clone();
    for retry in 1..=3 {
        let again = state.apply(keyed(&alice(), "k-1", spec_named("train"), AT + retry));
        assert_eq!(again, CommandOutcome::JobReplayed { job: JobId(1) });
    }
    assert_eq!(state.jobs.len(), 1);
    assert_eq!(state.queue.len(), 1);
    assert_eq!(state.last_job_id, 1);
    assert_eq!(state.jobs, before.jobs, "a replay changes no job");
    assert_eq!(state.idempotency, before.idempotency);
    assert_eq!(state.jobs[&JobId(1)].owner, Some(alice()));
    // Another key is another job.
    let other = state.apply(keyed(&alice(), "k-2", spec_named("train"), AT + 5));
    assert_eq!(other, CommandOutcome::JobSubmitted { job: JobId(2) });
    let trail: Vec<(&str, &str)> = state
        .audit
        .iter()
        .map(|a| (a.action.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(trail[0], ("submit job `train` as job 1", "done"));
    assert_eq!(
        trail[1],
        (
            "submit job `train`, a retry (same idempotency key) of job 1",
            "nothing new"
        )
    );
    assert_eq!(trail.len(), 5);
}

#[test]
fn the_same_key_with_another_request_is_refused() {
    let mut state = cluster();
    state.apply(keyed(&alice(), "k", spec_named("train"), AT));
    let other = state.apply(keyed(&alice(), "k", spec_named("eval"), AT + 1));
    assert_eq!(
        other,
        CommandOutcome::IdempotencyKeyReused { job: JobId(1) }
    );
    assert_eq!(state.jobs.len(), 1);
    assert_eq!(
        state.audit.back().map(|a| a.outcome.as_str()),
        Some("refused: its idempotency key was used for job 1, another request")
    );
    // The first request still replays.
    let again = state.apply(keyed(&alice(), "k", spec_named("train"), AT + 2));
    assert_eq!(again, CommandOutcome::JobReplayed { job: JobId(1) });

    // The digest covers the spec and `resume_from`, and nothing else.
    let train = spec_named("train");
    assert_eq!(request_digest(&train, None), request_digest(&train, None));
    assert_eq!(request_digest(&train, None).len(), 64);
    assert_ne!(
        request_digest(&train, None),
        request_digest(&train, Some(JobId(1)))
    );
    let mut env = train.clone();
    env.launch.env.insert("SEED".into(), "1".into());
    assert_ne!(request_digest(&train, None), request_digest(&env, None));
}

#[test]
fn keys_expire_a_day_after_their_submission() {
    let mut state = cluster();
    state.apply(keyed(&alice(), "k", spec_named("train"), AT));
    let last_moment = AT + IDEMPOTENCY_KEY_TTL_MS - 1;
    assert_eq!(
        state.apply(keyed(&alice(), "k", spec_named("train"), last_moment)),
        CommandOutcome::JobReplayed { job: JobId(1) }
    );
    let a_day_later = AT + IDEMPOTENCY_KEY_TTL_MS;
    assert_eq!(
        state.apply(keyed(&alice(), "k", spec_named("eval"), a_day_later)),
        CommandOutcome::JobSubmitted { job: JobId(2) },
        "an expired key is free again, whatever it was used for"
    );
    assert_eq!(state.idempotency.len(), 1);
    assert_eq!(
        state.apply(keyed(&alice(), "k", spec_named("eval"), a_day_later + 1)),
        CommandOutcome::JobReplayed { job: JobId(2) }
    );
    // Expiry follows the commands' `at_ms`, not the order of recording: a key recorded while the
    // leader's clock stood earlier is still judged by its own time.
    let mut state = cluster();
    state.apply(keyed(&alice(), "late", spec_named("train"), AT + 1_000));
    state.apply(keyed(&alice(), "early", spec_named("train"), AT));
    let t = AT + IDEMPOTENCY_KEY_TTL_MS + 500;
    assert_eq!(
        state.apply(keyed(&alice(), "early", spec_named("train"), t)),
        CommandOutcome::JobSubmitted { job: JobId(3) }
    );
    assert_eq!(
        state.apply(keyed(&alice(), "late", spec_named("train"), t)),
        CommandOutcome::JobReplayed { job: JobId(1) }
    );
    // Other keys' submissions clear the expired ones.
    state.apply(keyed(
        &alice(),
        "other",
        spec_named("train"),
        AT + 3 * IDEMPOTENCY_KEY_TTL_MS,
    ));
    assert_eq!(state.idempotency.len(), 1);
}

#[test]
fn past_the_bound_the_oldest_key_is_forgotten_first() {
    let mut state = cluster();
    for i in 0..IDEMPOTENCY_KEYS_MAX {
        state.idempotency.record(
            scoped(&alice(), &format!("k-{i}")),
            KeyUse {
                job: JobId(1_000_000 + i as u64),
                digest: String::new(),
                at_ms: AT,
            },
        );
    }
    assert_eq!(state.idempotency.len(), IDEMPOTENCY_KEYS_MAX);
    let newest = state.apply(keyed(&alice(), "newest", spec_named("train"), AT + 1));
    assert_eq!(newest, CommandOutcome::JobSubmitted { job: JobId(1) });
    assert_eq!(state.idempotency.len(), IDEMPOTENCY_KEYS_MAX);
    assert!(state.idempotency.get(&alice(), "k-0", AT + 1).is_none());
    assert!(state.idempotency.get(&alice(), "k-1", AT + 1).is_some());
    assert!(state.idempotency.get(&alice(), "newest", AT + 1).is_some());
    // The forgotten key makes a new job.
    assert_eq!(
        state.apply(keyed(&alice(), "k-0", spec_named("train"), AT + 2)),
        CommandOutcome::JobSubmitted { job: JobId(2) }
    );
    assert!(state.idempotency.get(&alice(), "k-1", AT + 2).is_none());
    assert_eq!(state.idempotency.len(), IDEMPOTENCY_KEYS_MAX);
}

#[test]
fn keys_are_per_submitter() {
    let mut state = cluster();
    let submitters = [
        actor("alice", None),
        actor("bob", None),
        actor("alice", Some("team-a")),
        actor("alice", Some("team-b")),
    ];
    for (i, by) in submitters.iter().enumerate() {
        assert_eq!(
            state.apply(keyed(by, "same", spec_named("train"), AT)),
            CommandOutcome::JobSubmitted {
                job: JobId(i as u64 + 1)
            },
            "{by:?}"
        );
        assert_eq!(state.jobs[&JobId(i as u64 + 1)].owner.as_ref(), Some(by));
    }
    for (i, by) in submitters.iter().enumerate() {
        assert_eq!(
            state.apply(keyed(by, "same", spec_named("train"), AT + 1)),
            CommandOutcome::JobReplayed {
                job: JobId(i as u64 + 1)
            },
            "{by:?}"
        );
    }
    // A bare command (no `Audited` around it) has the empty submitter's keys.
    let bare = |at_ms| Command::Idempotent {
        key: "same".into(),
        digest: request_digest(&spec_named("train"), None),
        submit: Box::new(Command::SubmitJob {
            spec: spec_named("train"),
            at_ms,
            secret: String::new(),
            resume_from_job: None,
        }),
    };
    assert_eq!(
        state.apply(bare(AT)),
        CommandOutcome::JobSubmitted { job: JobId(5) }
    );
    assert_eq!(
        state.apply(bare(AT + 1)),
        CommandOutcome::JobReplayed { job: JobId(5) }
    );
}

#[test]
fn refused_submissions_and_bad_keys_record_nothing() {
    let mut state = cluster();
    let mut resume = keyed(&alice(), "k", spec_named("train"), AT);
    if let Command::Audited { command, .. } = &mut resume {
        if let Command::Idempotent { submit, .. } = command.as_mut() {
            if let Command::SubmitJob {
                resume_from_job, ..
            } = submit.as_mut()
            {
                *resume_from_job = Some(JobId(7));
            }
        }
    }
    assert_eq!(
        state.apply(resume),
        rejected("job 7 does not exist"),
        "refused as without a key"
    );
    assert!(state.idempotency.is_empty());
    // The key is free: the same key with a good request makes the job.
    assert_eq!(
        state.apply(keyed(&alice(), "k", spec_named("train"), AT + 1)),
        CommandOutcome::JobSubmitted { job: JobId(1) }
    );

    for bad in [
        "",
        "   ",
        "tab\there",
        "é",
        &"x".repeat(IDEMPOTENCY_KEY_CHARS_MAX + 1),
    ] {
        let outcome = state.apply(keyed(&alice(), bad, spec_named("train"), AT));
        assert!(
            matches!(&outcome, CommandOutcome::Rejected { reason } if reason.contains("Idempotency-Key")),
            "{bad:?}: {outcome:?}"
        );
        assert!(idempotency_key_problem(bad).is_some(), "{bad:?}");
    }
    for good in ["a", "a b", "~!\"#", &"x".repeat(IDEMPOTENCY_KEY_CHARS_MAX)] {
        assert_eq!(idempotency_key_problem(good), None, "{good:?}");
    }
    let not_a_submission = Command::Idempotent {
        key: "k".into(),
        digest: String::new(),
        submit: Box::new(Command::CancelJob {
            job: JobId(1),
            at_ms: AT,
        }),
    };
    assert_eq!(
        state.apply(not_a_submission),
        rejected("only a job submission takes an idempotency key")
    );
    assert_eq!(state.jobs.len(), 1);
    assert_eq!(state.idempotency.len(), 1);
}

#[test]
fn keys_survive_a_snapshot_in_order_and_old_snapshots_and_logs_still_load() {
    let mut state = cluster();
    for (i, key) in ["c", "a", "b"].iter().enumerate() {
        state.apply(keyed(&alice(), key, spec_named("train"), AT + i as u64));
    }
    state.apply(keyed(
        &actor("bob", Some("ns")),
        "a",
        spec_named("eval"),
        AT + 3,
    ));
    let json = serde_json::to_value(&state).unwrap();
    let keys: Vec<(&str, &str)> = json["idempotency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["submitter"].as_str().unwrap(), r["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [("alice", "c"), ("alice", "a"), ("alice", "b"), ("bob", "a")]
    );
    let restored: State = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(restored, state);

    // A snapshot from before idempotency keys.
    let mut old = json;
    old.as_object_mut().unwrap().remove("idempotency");
    let restored: State = serde_json::from_value(old).unwrap();
    assert!(restored.idempotency.is_empty());

    // A log entry of a plain submission reads as it always did.
    let plain = Command::SubmitJob {
        spec: spec_named("train"),
        at_ms: AT,
        secret: String::new(),
        resume_from_job: None,
    };
    let text = serde_json::to_string(&plain).unwrap();
    assert!(!text.contains("Idempotent"));
    assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), plain);
    let keyed = keyed(&alice(), "k", spec_named("train"), AT);
    let text = serde_json::to_string(&keyed).unwrap();
    assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), keyed);
}
