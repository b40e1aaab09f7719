//! Who may send Raft messages: only other coordinators of this cluster.
//!
//! Found in review: one unauthenticated `POST /internal/raft/append` with a crafted entry rewrote the
//! state, a malformed one panicked openraft, and vote requests with a higher term deposed the leader.
//! Now every Raft message carries `X-Trainctl-Peer: v1 <from> <unix ms> <hmac>`, an HMAC-SHA256 with the
//! cluster's peer secret over the sender, the time, the path and the body. A message without a valid
//! signature (401), from a server that is not a member of the current membership, or from this server
//! itself (403), or an append that is not a well-formed run of log entries (400) never reaches openraft.
//!
//! The secret lives in `<data-dir>/peer.secret` (mode 0600), made by the first coordinator of a cluster;
//! a coordinator that joins is given a copy. This authenticates peers but does not encrypt: TLS between
//! coordinators is what the security issue asks for next, and replaces the secret by certificates.

use std::fs;
use std::io;
use std::path::Path;

use hmac::{Hmac, Mac};
use openraft::raft::AppendEntriesRequest;
use sha2::Sha256;

use super::{ServerId, TypeConfig};

/// The header carrying a Raft message's signature.
pub const PEER_HEADER: &str = "x-trainctl-peer";
/// A signed message older or newer than this (against our clock) is refused.
pub const PEER_CLOCK_SKEW_MAX_MS: u64 = 60_000;
/// Bytes of randomness in a new peer secret.
pub const PEER_SECRET_BYTES: usize = 32;
/// The file holding the secret in a coordinator's data dir.
pub const PEER_SECRET_FILE: &str = "peer.secret";

/// Why a Raft message was refused before reaching openraft.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    #[error("Raft messages are accepted only from this cluster's coordinators: no {PEER_HEADER} signature")]
    Missing,
    #[error("malformed {PEER_HEADER} header (expected `v1 <server id> <unix ms> <hex hmac>`)")]
    Malformed,
    #[error("the signature is {skew_ms} ms away from this coordinator's clock (at most {PEER_CLOCK_SKEW_MAX_MS} ms is accepted)")]
    Stale { skew_ms: u64 },
    #[error("bad signature: the sender does not hold this cluster's peer secret")]
    BadSignature,
}

/// The cluster's shared secret for signing Raft messages.
#[derive(Clone)]
pub struct PeerSecret(Vec<u8>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl PeerSecret {
    /// A secret from raw bytes (tests, or a copy handed to a joining coordinator).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        PeerSecret(bytes)
    }

    /// Reads `<data_dir>/peer.secret`, making a new random one (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> io::Result<Self> {
        let path = data_dir.join(PEER_SECRET_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = decode_hex(text.trim()).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is not a hex secret", path.display()),
                    )
                })?;
                Ok(PeerSecret(bytes))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let bytes: Vec<u8> = (0..PEER_SECRET_BYTES).map(|_| rand::random()).collect();
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                writeln!(file, "{}", encode_hex(&bytes))?;
                file.sync_all()?;
                Ok(PeerSecret(bytes))
            }
            Err(e) => Err(e),
        }
    }

    /// The secret, hex, as a joining coordinator receives it.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// Stores a secret received as hex in `<data_dir>/peer.secret` (mode 0600), replacing any.
    pub fn store_hex(data_dir: &Path, hex: &str) -> io::Result<Self> {
        let bytes = decode_hex(hex.trim())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "the peer secret is not hex")
            })?;
        trainctl_tls::write_private_file(
            &data_dir.join(PEER_SECRET_FILE),
            format!("{hex}\n").as_bytes(),
        )?;
        Ok(PeerSecret(bytes))
    }

    fn mac(&self, from: ServerId, at_ms: u64, path: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(format!("v1\n{from}\n{at_ms}\n{path}\n").as_bytes());
        mac.update(body);
        mac
    }

    /// The header value signing a message from `from` to `path` with `body`, at `at_ms`.
    pub fn sign(&self, from: ServerId, at_ms: u64, path: &str, body: &[u8]) -> String {
        let tag = self.mac(from, at_ms, path, body).finalize().into_bytes();
        format!("v1 {from} {at_ms} {}", encode_hex(&tag))
    }

    /// Checks a header value; returns the sender's server id.
    pub fn verify(
        &self,
        header: Option<&str>,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<ServerId, PeerAuthError> {
        let header = header.ok_or(PeerAuthError::Missing)?;
        let mut parts = header.split(' ');
        let (Some("v1"), Some(from), Some(at), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(PeerAuthError::Malformed);
        };
        let from: ServerId = from.parse().map_err(|_| PeerAuthError::Malformed)?;
        let at_ms: u64 = at.parse().map_err(|_| PeerAuthError::Malformed)?;
        let tag = decode_hex(tag).ok_or(PeerAuthError::Malformed)?;
        let skew_ms = now_ms.abs_diff(at_ms);
        if skew_ms > PEER_CLOCK_SKEW_MAX_MS {
            return Err(PeerAuthError::Stale { skew_ms });
        }
        self.mac(from, at_ms, path, body)
            .verify_slice(&tag)
            .map_err(|_| PeerAuthError::BadSignature)?;
        Ok(from)
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Why an append is not a well-formed run of entries openraft can take (None: it is). Entries must
/// follow `prev_log_id` with consecutive indexes and terms that never go down nor exceed the sender's
/// vote. openraft trusts its peers on this; a malformed append once panicked it.
pub fn append_problem(rpc: &AppendEntriesRequest<TypeConfig>) -> Option<String> {
    let vote_term = rpc.vote.leader_id().term;
    let first_index = rpc.prev_log_id.map_or(0, |p| p.index + 1);
    let mut last_term = rpc.prev_log_id.map_or(0, |p| p.leader_id.term);
    if last_term > vote_term {
        return Some(format!(
            "prev_log_id term {last_term} is above the sender's term {vote_term}"
        ));
    }
    for (expected_index, entry) in (first_index..).zip(&rpc.entries) {
        let id = entry.log_id;
        if id.index != expected_index {
            return Some(format!(
                "entry at index {} where index {expected_index} was expected",
                id.index
            ));
        }
        if id.leader_id.term < last_term || id.leader_id.term > vote_term {
            return Some(format!(
                "entry {} has term {} (expected {last_term} to {vote_term})",
                id.index, id.leader_id.term
            ));
        }
        last_term = id.leader_id.term;
    }
    if let Some(committed) = rpc.leader_commit {
        if committed.leader_id.term > vote_term {
            return Some(format!(
                "leader_commit term {} is above the sender's term {vote_term}",
                committed.leader_id.term
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_only_for_its_sender_path_body_time_and_secret() {
        let secret = PeerSecret::from_bytes(vec![7; 32]);
        let header = secret.sign(2, 1_000_000, "/internal/raft/append", b"{}");
        let ok = secret.verify(Some(&header), "/internal/raft/append", b"{}", 1_000_500);
        assert_eq!(ok, Ok(2));
        let other = PeerSecret::from_bytes(vec![8; 32]);
        let forged_from = header.replacen("v1 2 ", "v1 3 ", 1);
        /// (what, header, path, body, now, the refusal)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a str,
            &'a [u8],
            u64,
            PeerAuthError,
        );
        let cases: Vec<Case> = vec![
            (
                "no header",
                None,
                "/internal/raft/append",
                b"{}",
                1_000_000,
                PeerAuthError::Missing,
            ),
            (
                "garbage",
                Some("Bearer x"),
                "/internal/raft/append",
                b"{}",
                1_000_000,
                PeerAuthError::Malformed,
            ),
            (
                "another path",
                Some(&header),
                "/internal/raft/vote",
                b"{}",
                1_000_000,
                PeerAuthError::BadSignature,
            ),
            (
                "another body",
                Some(&header),
                "/internal/raft/append",
                b"{\"x\":1}",
                1_000_000,
                PeerAuthError::BadSignature,
            ),
            (
                "another sender",
                Some(&forged_from),
                "/internal/raft/append",
                b"{}",
                1_000_000,
                PeerAuthError::BadSignature,
            ),
            (
                "replayed later",
                Some(&header),
                "/internal/raft/append",
                b"{}",
                1_070_000,
                PeerAuthError::Stale { skew_ms: 70_000 },
            ),
        ];
        for (what, header, path, body, now, expected) in cases {
            assert_eq!(
                secret.verify(header, path, body, now),
                Err(expected),
                "{what}"
            );
        }
        assert_eq!(
            other.verify(Some(&header), "/internal/raft/append", b"{}", 1_000_000),
            Err(PeerAuthError::BadSignature),
            "another cluster's secret"
        );
    }

    #[test]
    fn the_secret_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let a = PeerSecret::load_or_create(dir.path()).unwrap();
        let b = PeerSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), PEER_SECRET_BYTES);
        let mode = fs::metadata(dir.path().join(PEER_SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn malformed_appends_are_named() {
        let request = |json: serde_json::Value| -> AppendEntriesRequest<TypeConfig> {
            serde_json::from_value(json).unwrap()
        };
        let vote = |term: u64| serde_json::json!({"leader_id": {"term": term, "node_id": 2}, "committed": true});
        let log_id = |term: u64, index: u64| serde_json::json!({"leader_id": {"term": term, "node_id": 2}, "index": index});
        let blank = |term: u64, index: u64| serde_json::json!({"log_id": log_id(term, index), "payload": "Blank"});
        let cases = [
            (
                "empty heartbeat",
                serde_json::json!({"vote": vote(3), "prev_log_id": log_id(3, 4), "entries": [], "leader_commit": null}),
                None,
            ),
            (
                "a run of entries",
                serde_json::json!({"vote": vote(3), "prev_log_id": log_id(2, 4), "entries": [blank(2, 5), blank(3, 6)], "leader_commit": log_id(2, 5)}),
                None,
            ),
            (
                "a gap (the index-out-of-bounds panic)",
                serde_json::json!({"vote": vote(200), "prev_log_id": log_id(1, 3), "entries": [blank(200, 5)], "leader_commit": null}),
                Some("index 5 where index 4"),
            ),
            (
                "a term above the vote",
                serde_json::json!({"vote": vote(3), "prev_log_id": null, "entries": [blank(9, 0)], "leader_commit": null}),
                Some("term 9"),
            ),
            (
                "terms going down",
                serde_json::json!({"vote": vote(3), "prev_log_id": log_id(3, 0), "entries": [blank(2, 1)], "leader_commit": null}),
                Some("term 2"),
            ),
        ];
        for (what, json, expected) in cases {
            let problem = append_problem(&request(json));
            match expected {
                None => assert_eq!(problem, None, "{what}"),
                Some(words) => assert!(
                    problem.as_deref().is_some_and(|p| p.contains(words)),
                    "{what}: {problem:?}"
                ),
            }
        }
    }
}
