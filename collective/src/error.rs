//! The one error type of the collectives, and the small formatters its messages use.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong in rendezvous or in a collective operation.
///
/// Variants carry the rank, address and limit involved so that a caller can branch on them
/// (retry a rendezvous on [`CollectiveError::RendezvousTimeout`], restart the attempt on
/// [`CollectiveError::PeerLost`]) and so that the message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// The world size is zero or above [`crate::MAX_WORLD_SIZE`].
    #[error("bad world size {world_size}: expected 1..={max}", max = crate::MAX_WORLD_SIZE)]
    InvalidWorldSize {
        /// The world size given.
        world_size: u32,
    },

    /// A rank that does not exist in a world of this size.
    #[error("rank {rank} does not exist in a world of size {world_size} (ranks are 0..={last})", last = world_size.saturating_sub(1))]
    InvalidRank {
        /// The rank given.
        rank: u32,
        /// The world size it was checked against.
        world_size: u32,
    },

    /// A broadcast root that is not a rank of this world.
    #[error("broadcast root {root} does not exist in a world of size {world_size}")]
    InvalidRoot {
        /// The root given.
        root: u32,
        /// The world size.
        world_size: u32,
    },

    /// Rank 0 could not listen for the rendezvous because the port is taken.
    #[error("cannot listen for the rendezvous on {addr}: port {port} is already in use (another job, or a rank 0 left over from an earlier attempt?); choose another MASTER_PORT", port = addr.port())]
    AddressInUse {
        /// The master address and port rank 0 tried to listen on.
        addr: SocketAddr,
    },

    /// A listener could not be bound for another reason (address not on this host, permission).
    #[error("cannot listen on {addr} for the {purpose}: {source}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// What the listener was for: "rendezvous" or "ring data connections".
        purpose: &'static str,
        /// The operating system's error.
        source: io::Error,
    },

    /// The rendezvous timeout passed and not every rank joined.
    ///
    /// Every rank that did join reports the same error: the one from rank 0 listening, or, through
    /// the agent's store, the one from the rank whose timeout expired first.
    #[error("rendezvous at {addr} timed out after {timeout}: {joined} of {world_size} ranks joined (missing: {missing})", timeout = Secs(*timeout), missing = RankList(missing))]
    RendezvousTimeout {
        /// The rendezvous (master) address.
        addr: SocketAddr,
        /// The rendezvous timeout that expired.
        timeout: Duration,
        /// How many ranks had joined, rank 0 included.
        joined: u32,
        /// The expected world size.
        world_size: u32,
        /// The ranks that never joined, in ascending order.
        missing: Vec<u32>,
    },

    /// A rank other than 0 could not reach rank 0 before its timeout.
    #[error("rendezvous at {addr} timed out after {timeout}: could not reach rank 0 ({last_error}); check that rank 0 is running and that MASTER_ADDR and MASTER_PORT are right", timeout = Secs(*timeout))]
    MasterUnreachable {
        /// The rendezvous (master) address.
        addr: SocketAddr,
        /// This rank's rendezvous timeout.
        timeout: Duration,
        /// The error of the last connection attempt.
        last_error: io::Error,
    },

    /// A rank could not reach the agent's rendezvous store before its timeout
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`).
    #[error("rendezvous at {addr} timed out after {timeout}: could not reach the store that trainctl's agent serves there ({last_error}); with TORCHELASTIC_USE_AGENT_STORE=True the launcher's agent, not rank 0, serves MASTER_ADDR:MASTER_PORT: check that it is running and that MASTER_ADDR and MASTER_PORT are right", timeout = Secs(*timeout))]
    StoreUnreachable {
        /// The store's (master) address.
        addr: SocketAddr,
        /// This rank's rendezvous timeout.
        timeout: Duration,
        /// The error of the last connection attempt.
        last_error: io::Error,
    },

    /// The connection to the agent's rendezvous store failed, or the store stopped answering,
    /// during the rendezvous.
    #[error("lost the connection to the rendezvous store at {addr} while {during}: {source} (the store closes a rank's connection when it refuses a request or starts a new attempt)")]
    StoreLost {
        /// The store's (master) address.
        addr: SocketAddr,
        /// What this rank was doing, e.g. "publishing its address".
        during: &'static str,
        /// The error (reset, end of stream, no reply in time).
        source: io::Error,
    },

    /// This rank joined, but rank 0 sent neither the address table nor a reason to stop.
    #[error("rendezvous at {addr}: joined rank 0 but got no address table within {waited}; rank 0 may be stuck", waited = Secs(*waited))]
    RendezvousNoReply {
        /// The rendezvous (master) address.
        addr: SocketAddr,
        /// How long this rank waited after joining.
        waited: Duration,
    },

    /// Ranks disagree about the world size.
    #[error("world size mismatch: rank 0 was started with world size {expected} but rank {rank} with {got}; every rank must get the same WORLD_SIZE")]
    WorldSizeMismatch {
        /// Rank 0's world size.
        expected: u32,
        /// The rank that disagrees.
        rank: u32,
        /// That rank's world size.
        got: u32,
    },

    /// Two processes claimed the same rank.
    #[error("rank {rank} joined the rendezvous twice; every process needs a distinct RANK")]
    DuplicateRank {
        /// The rank claimed twice.
        rank: u32,
    },

    /// The peer does not speak this protocol (another program, or another trainctl version).
    #[error("protocol mismatch with {peer}: {detail}")]
    ProtocolMismatch {
        /// The remote address of the connection.
        peer: SocketAddr,
        /// What was wrong.
        detail: String,
    },

    /// A ring neighbour turned out to be a different rank, or from a different rendezvous.
    #[error("unexpected peer at {peer}: {detail}")]
    UnexpectedPeer {
        /// The remote address of the connection.
        peer: SocketAddr,
        /// What did not match.
        detail: String,
    },

    /// Connecting to a ring neighbour failed (refused, unreachable, timed out).
    #[error("cannot connect to rank {rank} at {addr}: {source}")]
    PeerConnect {
        /// The neighbour's rank.
        rank: u32,
        /// The data address it advertised.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },

    /// A neighbour closed or reset its connection (it exited or crashed).
    #[error("lost the connection to rank {rank} while {during}: {source} (did rank {rank} exit or crash?)")]
    PeerLost {
        /// The neighbour's rank.
        rank: u32,
        /// What this rank was doing, e.g. "receiving all_reduce data".
        during: &'static str,
        /// The operating system's error (reset, broken pipe, end of stream).
        source: io::Error,
    },

    /// A neighbour sent or accepted nothing for longer than the operation timeout.
    #[error("rank {rank} did not respond within {timeout} while {during}; is it stuck, or busy elsewhere instead of calling the same collective?", timeout = Secs(*timeout))]
    PeerTimeout {
        /// The neighbour's rank.
        rank: u32,
        /// What this rank was doing.
        during: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// Ranks called different collectives, or the same one with different lengths or roots.
    #[error("collective mismatch: this rank (rank {rank}) called {ours} but rank {peer} called {theirs}; every rank must call the same collectives in the same order with the same lengths")]
    OpMismatch {
        /// This rank.
        rank: u32,
        /// The neighbour that disagrees.
        peer: u32,
        /// This rank's call, e.g. "all_reduce_sum_f32 #3 (len 1024)".
        ours: String,
        /// The neighbour's call.
        theirs: String,
    },

    /// An earlier operation failed; the ring's connections are in an unknown state.
    #[error("the collective is unusable after an earlier error ({cause}); tear it down and rendezvous again")]
    Broken {
        /// The message of the first error.
        cause: String,
    },

    /// This backend cannot run on this host: a library or device it needs is missing. Setup,
    /// not a fault of the run: nothing was started.
    #[error("the {backend} backend cannot run on this host: {missing}")]
    Unavailable {
        /// The backend, e.g. "nccl" or "rdma".
        backend: &'static str,
        /// What is missing and how to provide it.
        missing: String,
    },

    /// The backend does not do what was asked (an element type, or device memory on a host
    /// backend).
    #[error("{what} is not supported by the {backend} backend; it accepts {accepted}")]
    Unsupported {
        /// The backend, e.g. "tcp".
        backend: &'static str,
        /// What was asked, e.g. "an all-reduce of f64 host buffers".
        what: String,
        /// What it accepts.
        accepted: &'static str,
    },

    /// The collective was aborted (by its watchdog, or through an [`crate::AbortHandle`]); every
    /// later operation fails with [`CollectiveError::Broken`].
    #[error("the collective was aborted: {reason}")]
    Aborted {
        /// Why: a peer's failure, an operation past its timeout, NCCL's asynchronous error.
        reason: String,
    },

    /// A GPU, NCCL or RDMA library call failed.
    #[error("{backend} failed while {during}: {source}")]
    Device {
        /// The backend, e.g. "nccl".
        backend: &'static str,
        /// What this rank was doing, e.g. "creating the NCCL communicator".
        during: &'static str,
        /// The library's error (`ffi::nccl::NcclError`, a CUDA driver error,
        /// `ffi::verbs::VerbsError`).
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Any other local IO failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "start the sender thread".
        context: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
}

/// Formats a list of ranks as "2, 5, 7", or "none", eliding the middle of long lists.
pub(crate) struct RankList<'a>(pub(crate) &'a [u32]);

/// How many ranks a [`RankList`] shows before eliding the rest.
const RANK_LIST_SHOWN_COUNT: usize = 16;

impl fmt::Display for RankList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, rank) in self.0.iter().take(RANK_LIST_SHOWN_COUNT).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{rank}")?;
        }
        if self.0.len() > RANK_LIST_SHOWN_COUNT {
            write!(f, " and {} more", self.0.len() - RANK_LIST_SHOWN_COUNT)?;
        }
        Ok(())
    }
}

/// Formats a duration the way a user wrote it: "60s", "500ms", "1500ms".
pub(crate) struct Secs(pub(crate) Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{:.3}s", d.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_list_formats() {
        let cases: &[(&[u32], &str)] = &[
            (&[], "none"),
            (&[2], "2"),
            (&[1, 3, 4], "1, 3, 4"),
            (
                &(0..20).collect::<Vec<_>>(),
                "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 and 4 more",
            ),
        ];
        for (ranks, want) in cases {
            assert_eq!(RankList(ranks).to_string(), *want);
        }
    }

    #[test]
    fn durations_format() {
        let cases = [
            (Duration::from_secs(60), "60s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(2_300), "0.002s"),
            (Duration::ZERO, "0s"),
        ];
        for (d, want) in cases {
            assert_eq!(Secs(d).to_string(), want, "{d:?}");
        }
    }

    #[test]
    fn rendezvous_timeout_message_names_address_and_missing_ranks() {
        let err = CollectiveError::RendezvousTimeout {
            addr: "127.0.0.2:29500".parse().unwrap(),
            timeout: Duration::from_secs(60),
            joined: 3,
            world_size: 4,
            missing: vec![2],
        };
        assert_eq!(
            err.to_string(),
            "rendezvous at 127.0.0.2:29500 timed out after 60s: 3 of 4 ranks joined (missing: 2)"
        );
    }

    #[test]
    fn address_in_use_message_names_the_port() {
        let err = CollectiveError::AddressInUse {
            addr: "127.0.0.1:29500".parse().unwrap(),
        };
        let msg = err.to_string();
        assert!(msg.contains("port 29500 is already in use"), "{msg}");
        assert!(msg.contains("MASTER_PORT"), "{msg}");
    }
}
