//! The `[checkpoint]` table's rules: `dir` placeholders and the "checkpoint now" signal.

use crate::CheckpointPolicy;

/// Placeholders `checkpoint.dir` may contain, with what each becomes.
pub(crate) const PLACEHOLDERS: &[(&str, &str)] =
    &[("{job}", "the job id"), ("{name}", "the job name")];

pub(crate) const DIR_ACCEPTED: &str = "(accepted: a directory on storage every host shares, absolute or relative to the job's workdir, which may contain {job} (the job id) and {name} (the job name), e.g. \"/shared/ckpt/{name}-{job}\")";

/// Signals a rank may be asked to checkpoint with, by canonical name, with their Linux numbers.
pub(crate) const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGCONT", 18),
    ("SIGURG", 23),
    ("SIGWINCH", 28),
];

/// Signals that are refused, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "SIGKILL",
        "SIGKILL cannot be caught, so no rank could checkpoint on it",
    ),
    (
        "SIGSTOP",
        "SIGSTOP cannot be caught; it freezes the rank instead of asking it to checkpoint",
    ),
];

pub(crate) fn signal_accepted() -> String {
    let names: Vec<&str> = SIGNALS.iter().map(|&(n, _)| n).collect();
    format!(
        "(accepted: {}; case-insensitive, with or without SIG, e.g. \"SIGUSR1\" or \"usr1\"; leave signal out to send none)",
        names.join(", ")
    )
}

/// The canonical name (`"SIGUSR1"`) of a signal written as `"SIGUSR1"`, `"usr1"`, ...; the
/// error says what is wrong, without the accepted list.
pub(crate) fn parse_signal(text: &str) -> Result<&'static str, String> {
    let upper = text.trim().to_ascii_uppercase();
    if upper.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if upper.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "write the signal's name, not its number {text:?}, e.g. \"SIGUSR1\""
        ));
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    if let Some(&(canonical, _)) = SIGNALS.iter().find(|&&(n, _)| n == name) {
        return Ok(canonical);
    }
    if let Some(&(_, why)) = REFUSED.iter().find(|&&(n, _)| n == name) {
        return Err(why.to_owned());
    }
    Err(format!(
        "{text:?} is not a signal trainctl sends as a checkpoint request"
    ))
}

/// What is wrong with a `checkpoint.dir`, without the accepted part; `None` when it is fine.
pub(crate) fn dir_problem(dir: &str) -> Option<String> {
    if dir.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if dir.contains('\0') {
        return Some("must not contain a NUL character".to_owned());
    }
    if dir.len() > crate::limits::CHECKPOINT_DIR_BYTES_MAX {
        return Some(format!(
            "is {} bytes long, more than {}",
            dir.len(),
            crate::limits::CHECKPOINT_DIR_BYTES_MAX
        ));
    }
    let mut rest = dir;
    while let Some(open) = rest.find('{') {
        rest = &rest[open..];
        if let Some(&(placeholder, _)) = PLACEHOLDERS.iter().find(|(p, _)| rest.starts_with(p)) {
            rest = &rest[placeholder.len()..];
            continue;
        }
        let known: Vec<&str> = PLACEHOLDERS.iter().map(|&(p, _)| p).collect();
        let known = known.join(" and ");
        return Some(match rest.find('}') {
            Some(close) => format!(
                "unknown placeholder {:?}; the placeholders are {known}",
                &rest[..=close]
            ),
            None => format!("has a '{{' that starts no placeholder; the placeholders are {known}"),
        });
    }
    None
}

impl CheckpointPolicy {
    /// `dir` with `{job}` and `{name}` replaced; pure string work (a relative result is still
    /// relative to the job's workdir).
    ///
    /// ```
    /// use trainctl_jobs::CheckpointPolicy;
    ///
    /// let policy = CheckpointPolicy {
    ///     dir: "/ckpt/{name}-{job}".into(),
    ///     signal: None,
    ///     grace_ms: 120_000,
    ///     keep: None,
    /// };
    /// assert_eq!(policy.expand_dir(42, "ddp"), "/ckpt/ddp-42");
    /// ```
    pub fn expand_dir(&self, job_id: u64, job_name: &str) -> String {
        let mut out = String::with_capacity(self.dir.len());
        let mut rest = self.dir.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            rest = &rest[open..];
            if let Some(after) = rest.strip_prefix("{job}") {
                out.push_str(&job_id.to_string());
                rest = after;
            } else if let Some(after) = rest.strip_prefix("{name}") {
                out.push_str(job_name);
                rest = after;
            } else {
                out.push('{');
                rest = &rest[1..];
            }
        }
        out.push_str(rest);
        out
    }

    /// The signal's number (Linux numbering: SIGHUP 1, SIGINT 2, SIGQUIT 3, SIGUSR1 10,
    /// SIGUSR2 12, SIGALRM 14, SIGTERM 15, SIGCONT 18, SIGURG 23, SIGWINCH 28), if a signal is
    /// set and is one of those (written in any form [`crate::JobSpec::from_toml`] accepts).
    pub fn signal_number(&self) -> Option<i32> {
        let name = parse_signal(self.signal.as_deref()?).ok()?;
        SIGNALS.iter().find(|&&(n, _)| n == name).map(|&(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &str, signal: Option<&str>) -> CheckpointPolicy {
        CheckpointPolicy {
            dir: dir.into(),
            signal: signal.map(String::from),
            grace_ms: 0,
            keep: None,
        }
    }

    #[test]
    fn expands_placeholders_once() {
        let cases: &[(&str, &str)] = &[
            ("/ckpt/{job}", "/ckpt/7"),
            ("ckpt/{name}/{job}/{job}", "ckpt/my-job/7/7"),
            ("/plain", "/plain"),
            ("/odd/{x}/{", "/odd/{x}/{"),
            ("{name}{job}", "my-job7"),
        ];
        for &(dir, want) in cases {
            assert_eq!(policy(dir, None).expand_dir(7, "my-job"), want, "{dir}");
        }
        // A name that looks like a placeholder is not expanded again.
        assert_eq!(policy("{name}", None).expand_dir(1, "{job}"), "{job}");
    }

    #[test]
    fn signal_numbers() {
        let cases: &[(Option<&str>, Option<i32>)] = &[
            (None, None),
            (Some("SIGUSR1"), Some(10)),
            (Some("usr2"), Some(12)),
            (Some("SIGTERM"), Some(15)),
            (Some("SIGHUP"), Some(1)),
            (Some("SIGWINCH"), Some(28)),
            (Some("SIGKILL"), None),
            (Some("bogus"), None),
        ];
        for &(signal, want) in cases {
            assert_eq!(policy("/c", signal).signal_number(), want, "{signal:?}");
        }
    }

    #[test]
    fn dir_problems() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/ckpt/{job}", None),
            ("ckpt/{name}-{job}", None),
            ("", Some("must not be empty")),
            ("/a\0b", Some("NUL")),
            (
                "/ckpt/{jobid}",
                Some("unknown placeholder \"{jobid}\"; the placeholders are {job} and {name}"),
            ),
            ("/ckpt/{", Some("a '{' that starts no placeholder")),
        ];
        for &(dir, want) in cases {
            let got = dir_problem(dir);
            match want {
                None => assert_eq!(got, None, "{dir}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{dir}: {got:?}"
                ),
            }
        }
        assert!(dir_problem(&"a".repeat(4097)).is_some_and(|p| p.contains("more than 4096")));
    }
}
