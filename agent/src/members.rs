//! The coordinators an agent knows, and which one it talks to next.
//!
//! The control plane is a Raft group of coordinators, and only its leader serves agents. The agent
//! holds the member list: at start the operator's (`--coordinator a,b,c`) after the members it
//! learnt before (kept in `<data-dir>/coordinators`, [`MEMBERS_FILE`]); then the list every heartbeat
//! reply carries, so it learns new members and forgets removed ones. The operator's list is always
//! at the end of the candidates, so it is still tried when every learnt member fails.
//!
//! It talks to one coordinator at a time. When that one fails, [`next_target`] (pure) decides where
//! to go: to the leader a coordinator named (`x-trainctl-leader`) at once, otherwise to the next
//! candidate after a short backoff ([`retry_backoff`]: 100 ms doubling to 1 s), so a leader change
//! costs the agent about a second. Ranks keep running all the while.

use std::path::Path;
use std::time::Duration;

/// The file in the agent's data dir holding the coordinators learnt from the last heartbeat reply,
/// one `host:port` a line.
pub const MEMBERS_FILE: &str = "coordinators";
/// Most coordinators kept from a reply (a Raft group has 3 or 5; more is a broken or hostile reply).
pub const MEMBERS_MAX: usize = 64;
/// Longest coordinator address accepted from a reply or the members file, in characters.
pub const MEMBER_ADDRESS_CHARS_MAX: usize = 256;
/// First wait before trying the next coordinator when the last failed without naming the leader.
pub const RETRY_BACKOFF_MIN_MS: u64 = 100;
/// Longest such wait.
pub const RETRY_BACKOFF_MAX_MS: u64 = 1_000;
/// Failures in a row after which even a named leader is tried only after the backoff (two
/// coordinators naming each other, each with a stale view, must not make the agent spin).
pub const HINTS_FOLLOWED_AT_ONCE_MAX: u32 = 3;

/// How talking to the current coordinator failed, as far as the choice of the next one goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The coordinator answered that it does not lead; `leader` is the address it named, if any.
    NotLeader { leader: Option<String> },
    /// No answer: connection refused or reset, a timeout, a TLS or HTTP/2 failure.
    Unreachable,
}

/// Where to go next, and after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The coordinator URL to talk to next.
    pub target: String,
    /// How long to wait before the next request.
    pub wait: Duration,
}

/// Wait before the next try after `failures` failures in a row: 100 ms, doubling, at most
/// [`RETRY_BACKOFF_MAX_MS`].
pub fn retry_backoff(failures: u32) -> Duration {
    let ms = RETRY_BACKOFF_MIN_MS.saturating_mul(1 << failures.clamp(1, 16).saturating_sub(1));
    Duration::from_millis(ms.min(RETRY_BACKOFF_MAX_MS))
}

/// The URL of the coordinator at `address` (`host:port`, as the cluster names its members):
/// `https://` with TLS, `http://` without. An address that is already a URL is kept as it is.
pub fn member_url(address: &str, tls: bool) -> String {
    let address = address.trim().trim_end_matches('/');
    if address.contains("://") {
        address.to_string()
    } else {
        format!("{}://{address}", if tls { "https" } else { "http" })
    }
}

/// The coordinators to try, in order: the learnt ones (`known`, URLs), then those of the operator's
/// list (`configured`) not among them. Each once.
pub fn candidates(known: &[String], configured: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in known.iter().chain(configured) {
        let url = url.trim_end_matches('/').to_string();
        if !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

/// Where to go after `failure` of `current`, the `failures`-th in a row (1 for the first). Pure.
///
/// - A named leader other than `current` is tried at once (after the backoff once
///   [`HINTS_FOLLOWED_AT_ONCE_MAX`] failures have piled up), whether or not it is a candidate yet:
///   the next heartbeat reply brings the new member list.
/// - Otherwise the candidate after `current` (wrapping around; the first when `current` is none of
///   them), after [`retry_backoff`].
pub fn next_target(
    candidates: &[String],
    current: &str,
    failure: &Failure,
    failures: u32,
    tls: bool,
) -> Retry {
    let current = current.trim_end_matches('/');
    if let Failure::NotLeader {
        leader: Some(leader),
    } = failure
    {
        let leader = member_url(leader, tls);
        if usable_address(&leader) && leader != current {
            let wait = if failures <= HINTS_FOLLOWED_AT_ONCE_MAX {
                Duration::ZERO
            } else {
                retry_backoff(failures)
            };
            return Retry {
                target: leader,
                wait,
            };
        }
    }
    let target = match candidates.iter().position(|c| c == current) {
        Some(i) => candidates[(i + 1) % candidates.len()].clone(),
        None => candidates
            .first()
            .cloned()
            .unwrap_or_else(|| current.to_string()),
    };
    Retry {
        target,
        wait: retry_backoff(failures),
    }
}

/// Whether `address` is something the agent may connect to: printable ASCII without spaces or
/// slashes after the scheme, at most [`MEMBER_ADDRESS_CHARS_MAX`] characters.
fn usable_address(address: &str) -> bool {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    !rest.is_empty()
        && address.len() <= MEMBER_ADDRESS_CHARS_MAX
        && rest.chars().all(|c| c.is_ascii_graphic() && c != '/')
}

/// The member addresses of a heartbeat reply that the agent keeps: usable ones, each once, at most
/// [`MEMBERS_MAX`]. Empty when the reply named none (the agent then keeps what it knows).
pub fn accepted_members(reply: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for address in reply {
        let address = address.trim();
        if usable_address(address) && !out.iter().any(|a| a == address) {
            out.push(address.to_string());
        }
        if out.len() == MEMBERS_MAX {
            break;
        }
    }
    out
}

/// The members kept in `data_dir` ([`MEMBERS_FILE`]); none when the file is absent or unreadable.
pub fn load(data_dir: &Path) -> Vec<String> {
    match std::fs::read_to_string(data_dir.join(MEMBERS_FILE)) {
        Ok(text) => accepted_members(&text.lines().map(str::to_string).collect::<Vec<_>>()),
        Err(_) => Vec::new(),
    }
}

/// Keeps `members` in `data_dir` ([`MEMBERS_FILE`]), replacing the file whole (written aside, then
/// renamed), so a crash leaves the old list or the new one.
pub fn store(data_dir: &Path, members: &[String]) -> std::io::Result<()> {
    let path = data_dir.join(MEMBERS_FILE);
    let aside = data_dir.join(format!("{MEMBERS_FILE}.new"));
    let mut text = members.join("\n");
    text.push('\n');
    std::fs::write(&aside, text)?;
    std::fs::rename(&aside, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_next_coordinator_is_the_named_leader_or_the_next_one_after_a_backoff() {
        let abc = urls(&["https://a:7470", "https://b:7470", "https://c:7470"]);
        let not_leader = |l: Option<&str>| Failure::NotLeader {
            leader: l.map(str::to_string),
        };
        /// (candidates, current, failure, failures in a row) -> (target, wait in ms)
        type Case<'a> = (&'a [String], &'a str, Failure, u32, &'a str, u64);
        let cases: Vec<Case> = vec![
            // The leader is named: go there at once.
            (
                &abc,
                "https://a:7470",
                not_leader(Some("c:7470")),
                1,
                "https://c:7470",
                0,
            ),
            // ... even if the agent does not know it yet (a member that just joined).
            (
                &abc,
                "https://a:7470",
                not_leader(Some("d:7470")),
                1,
                "https://d:7470",
                0,
            ),
            // A full URL as the name is taken as it is.
            (
                &abc,
                "https://a:7470",
                not_leader(Some("https://b:7470")),
                2,
                "https://b:7470",
                0,
            ),
            // Named leaders that keep failing are followed only after the backoff.
            (
                &abc,
                "https://a:7470",
                not_leader(Some("b:7470")),
                4,
                "https://b:7470",
                800,
            ),
            // No leader named, or the current one named (a stale view): the next after a backoff.
            (
                &abc,
                "https://a:7470",
                not_leader(None),
                1,
                "https://b:7470",
                100,
            ),
            (
                &abc,
                "https://a:7470",
                not_leader(Some("a:7470")),
                1,
                "https://b:7470",
                100,
            ),
            // An unusable name is ignored.
            (
                &abc,
                "https://a:7470",
                not_leader(Some("x y:1")),
                1,
                "https://b:7470",
                100,
            ),
            // Unreachable: the next one, wrapping around, the backoff growing to 1 s.
            (
                &abc,
                "https://b:7470",
                Failure::Unreachable,
                2,
                "https://c:7470",
                200,
            ),
            (
                &abc,
                "https://c:7470",
                Failure::Unreachable,
                3,
                "https://a:7470",
                400,
            ),
            (
                &abc,
                "https://c:7470",
                Failure::Unreachable,
                9,
                "https://a:7470",
                1_000,
            ),
            // The current one is no candidate (a named leader that died): start from the first.
            (
                &abc,
                "https://d:7470",
                Failure::Unreachable,
                1,
                "https://a:7470",
                100,
            ),
            // One coordinator: try it again.
            (
                &abc[..1],
                "https://a:7470",
                Failure::Unreachable,
                1,
                "https://a:7470",
                100,
            ),
        ];
        for (candidates, current, failure, failures, target, wait_ms) in cases {
            let retry = next_target(candidates, current, &failure, failures, true);
            assert_eq!(
                retry,
                Retry {
                    target: target.to_string(),
                    wait: Duration::from_millis(wait_ms)
                },
                "from {current} after {failure:?} (failure {failures})"
            );
        }
        // Without TLS a named leader is an http:// URL.
        let plain = urls(&["http://a:7470", "http://b:7470"]);
        let retry = next_target(
            &plain,
            "http://a:7470",
            &not_leader(Some("b:7470")),
            1,
            false,
        );
        assert_eq!(retry.target, "http://b:7470");
    }

    #[test]
    fn the_backoff_grows_from_100_ms_to_1_s() {
        let waits: Vec<u64> = (0..=6)
            .map(|n| retry_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn learnt_members_come_first_and_the_operators_list_stays_at_the_end() {
        let known = urls(&["https://b:7470", "https://d:7470"]);
        let configured = urls(&["https://a:7470", "https://b:7470/", "https://c:7470"]);
        assert_eq!(
            candidates(&known, &configured),
            [
                "https://b:7470",
                "https://d:7470",
                "https://a:7470",
                "https://c:7470"
            ]
        );
        assert_eq!(candidates(&[], &configured[..1]), ["https://a:7470"]);
    }

    #[test]
    fn a_replys_member_list_is_kept_only_where_usable_and_bounded() {
        let reply = urls(&[
            "10.0.0.1:7470",
            " 10.0.0.2:7470 ",
            "10.0.0.1:7470",
            "",
            "a b:1",
            "x/y:1",
        ]);
        assert_eq!(accepted_members(&reply), ["10.0.0.1:7470", "10.0.0.2:7470"]);
        let many: Vec<String> = (0..100).map(|i| format!("10.0.{i}.1:7470")).collect();
        assert_eq!(accepted_members(&many).len(), MEMBERS_MAX);
        let long = vec![format!("{}:1", "h".repeat(MEMBER_ADDRESS_CHARS_MAX))];
        assert!(accepted_members(&long).is_empty());
    }

    #[test]
    fn member_urls_take_the_scheme_of_the_agents_tls_setting() {
        assert_eq!(member_url("10.0.0.1:7470", true), "https://10.0.0.1:7470");
        assert_eq!(member_url("[::1]:7470", false), "http://[::1]:7470");
        assert_eq!(member_url("https://c:1/", false), "https://c:1");
    }

    #[test]
    fn the_member_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let members = urls(&["10.0.0.1:7470", "10.0.0.2:7470"]);
        store(dir.path(), &members).unwrap();
        assert_eq!(load(dir.path()), members);
        store(dir.path(), &members[1..]).unwrap();
        assert_eq!(load(dir.path()), &members[1..]);
    }
}
