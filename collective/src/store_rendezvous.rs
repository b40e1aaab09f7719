//! Rendezvous through the TCPStore that trainctl's agent serves at `MASTER_ADDR:MASTER_PORT`
//! (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank, rank 0 included, is a client of the store,
//! and the agent gives every attempt an empty keyspace.
//!
//! # Keys
//!
//! All under `trainctl/rdzv/` (torch's own keys start with `/`, so they never collide):
//!
//! - `rank/<r>`: a counter each rank `ADD`s 1 to; the claimant that reads back anything but 1 is a
//!   second process with the same rank.
//! - `addr/<r>`: rank `r`'s [`Join`] (rank, world size, data address), in the collective's wire
//!   format.
//! - `session`: rank 0's session id (8 bytes, little-endian), set before rank 0 counts itself in.
//! - `joined`: a counter each rank `ADD`s 1 to once its world size agrees with rank 0's.
//! - `verdict`: how the rendezvous ended, written once with `COMPARE_SET` (the first verdict
//!   stands, and a writer that lost the race reads the winner): `complete`, written by the rank
//!   whose `ADD` of `joined` reached the world size, or an abort ([`Reply::Abort`] in the wire
//!   format), written by the rank that found the problem.
//!
//! # Steps of one rank
//!
//! 1. Claim `rank/<r>`: not 1 is [`CollectiveError::DuplicateRank`].
//! 2. Publish `addr/<r>` (rank 0 also `session`).
//! 3. Any rank but 0 waits for `addr/0` and compares world sizes: a difference is
//!    [`CollectiveError::WorldSizeMismatch`] with rank 0's as the expected one.
//! 4. Count in at `joined`; the rank that makes it `world_size` writes `complete`.
//! 5. Wait for `verdict`. `complete`: `MULTI_GET` every `addr/<r>` and `session`, check them, and
//!    build the ring. An abort: fail with its error.
//!
//! Every failure a rank finds (duplicate rank, world-size mismatch, timeout) is written as the
//! verdict before the rank gives up, so every rank that is waiting reports the same cause, as
//! with rank 0's listener. A rank whose timeout expires first lists the ranks that never
//! published `addr/<r>` (one pipelined `CHECK` per rank) in its verdict.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::error::{CollectiveError, Secs};
use crate::store_client::{StoreClient, StoreError};
use crate::tcp::{
    abort_error, bind_data_listener, build_ring, local_addr, new_session_id, RendezvousConfig,
    TcpRing,
};
use crate::wire::{self, Abort, Join, Reply, WireError};

/// Prefix of every key this rendezvous uses (no leading `/`: torch's keys have one).
const KEY_PREFIX: &str = "trainctl/rdzv/";
/// The verdict of a rendezvous every rank joined.
const VERDICT_COMPLETE: &[u8] = b"complete";

fn rank_key(rank: u32) -> String {
    format!("{KEY_PREFIX}rank/{rank}")
}

fn addr_key(rank: u32) -> String {
    format!("{KEY_PREFIX}addr/{rank}")
}

fn joined_key() -> String {
    format!("{KEY_PREFIX}joined")
}

fn session_key() -> String {
    format!("{KEY_PREFIX}session")
}

fn verdict_key() -> String {
    format!("{KEY_PREFIX}verdict")
}

/// How a rendezvous ended, as recorded under `verdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Complete,
    Abort(Abort),
}

impl Verdict {
    fn encode(&self) -> Vec<u8> {
        match self {
            Verdict::Complete => VERDICT_COMPLETE.to_vec(),
            Verdict::Abort(abort) => wire::encode_reply(&Reply::Abort(abort.clone())),
        }
    }

    fn decode(bytes: &[u8]) -> Result<Verdict, String> {
        if bytes == VERDICT_COMPLETE {
            return Ok(Verdict::Complete);
        }
        match wire::read_reply(&mut &bytes[..]) {
            Ok(Reply::Abort(abort)) => Ok(Verdict::Abort(abort)),
            Ok(Reply::Table { .. }) => Err("an address table".to_string()),
            Err(WireError::Mismatch(detail)) => Err(detail),
            Err(WireError::Io(e)) => Err(format!("a truncated message ({e})")),
        }
    }
}

/// Meets the other ranks through the store at `master_addr:master_port` and builds the ring.
pub(crate) fn connect_through_store(cfg: &RendezvousConfig) -> Result<TcpRing, CollectiveError> {
    let deadline = Instant::now() + cfg.timeout;
    let addr = cfg.master_socket_addr();
    let data = bind_data_listener(cfg.bind_addr)?;
    let store = StoreClient::connect(addr, deadline, cfg.timeout).map_err(|e| match e {
        StoreError::Io(last_error) => CollectiveError::StoreUnreachable {
            addr,
            timeout: cfg.timeout,
            last_error,
        },
        StoreError::Timeout | StoreError::Protocol(_) => {
            store_error(addr, cfg.timeout, "doing the store handshake", e)
        }
    })?;
    let mut rdzv = StoreRendezvous {
        cfg,
        store,
        addr,
        deadline,
    };
    let (session, addrs) = rdzv.run(&data)?;
    // The store connection is not needed once the table is known.
    drop(rdzv);
    build_ring(cfg.rank, cfg.world_size, session, &addrs, data, cfg.timeout)
}

/// Maps a store failure to the error a caller branches on.
fn store_error(
    addr: SocketAddr,
    timeout: Duration,
    during: &'static str,
    e: StoreError,
) -> CollectiveError {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the store sent no reply within {}", Secs(timeout)),
        )
    };
    match e {
        StoreError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            CollectiveError::StoreLost {
                addr,
                during,
                source: timed_out(),
            }
        }
        StoreError::Io(source) => CollectiveError::StoreLost {
            addr,
            during,
            source,
        },
        StoreError::Timeout => CollectiveError::StoreLost {
            addr,
            during,
            source: timed_out(),
        },
        StoreError::Protocol(detail) => CollectiveError::ProtocolMismatch { peer: addr, detail },
    }
}

/// One rank's side of a store rendezvous in progress.
struct StoreRendezvous<'a> {
    cfg: &'a RendezvousConfig,
    store: StoreClient,
    /// The store's address (`master_addr:master_port`).
    addr: SocketAddr,
    deadline: Instant,
}

impl StoreRendezvous<'_> {
    fn lost(&self, during: &'static str) -> impl Fn(StoreError) -> CollectiveError {
        let (addr, timeout) = (self.addr, self.cfg.timeout);
        move |e| store_error(addr, timeout, during, e)
    }

    /// Steps 1 to 5 of the module docs: the session id and every rank's data address.
    fn run(&mut self, data: &TcpListener) -> Result<(u64, Vec<SocketAddr>), CollectiveError> {
        let (rank, n) = (self.cfg.rank, self.cfg.world_size);

        let claims = self
            .store
            .add(&rank_key(rank), 1)
            .map_err(self.lost("claiming its rank"))?;
        if claims != 1 {
            return Err(self.give_up(Abort::DuplicateRank { rank }));
        }

        let ip = if self.cfg.bind_addr.is_unspecified() {
            self.store
                .local_addr()
                .map_err(|e| self.lost("reading the local address")(StoreError::Io(e)))?
                .ip()
        } else {
            self.cfg.bind_addr
        };
        let port = local_addr(data, "read the data listener's address")?.port();
        let join = Join {
            rank,
            world_size: n,
            data_addr: SocketAddr::new(ip, port),
        };
        self.store
            .set(&addr_key(rank), &wire::encode_join(&join))
            .map_err(self.lost("publishing its address"))?;
        if rank == 0 {
            let session = new_session_id(join.data_addr);
            self.store
                .set(&session_key(), &session.to_le_bytes())
                .map_err(self.lost("publishing the session id"))?;
        }

        if rank != 0 {
            if !self.wait(addr_key(0), "waiting for rank 0's address")? {
                let abort = self.timeout_abort()?;
                return Err(self.give_up(abort));
            }
            let value = self
                .store
                .get(&addr_key(0))
                .map_err(self.lost("reading rank 0's address"))?;
            let rank0 = self.decode_join(0, &value)?;
            if rank0.world_size != n {
                return Err(self.give_up(Abort::WorldSizeMismatch {
                    expected: rank0.world_size,
                    rank,
                    got: n,
                }));
            }
        }

        let joined = self
            .store
            .add(&joined_key(), 1)
            .map_err(self.lost("counting itself in"))?;
        let verdict = if joined == i64::from(n) {
            self.record(&Verdict::Complete)?
        } else if self.wait(verdict_key(), "waiting for the other ranks")? {
            let value = self
                .store
                .get(&verdict_key())
                .map_err(self.lost("reading the rendezvous verdict"))?;
            self.decode_verdict(&value)?
        } else {
            // The keys may have arrived since: whichever verdict was recorded first stands.
            let abort = self.timeout_abort()?;
            match self.record(&Verdict::Abort(abort.clone())) {
                Ok(standing) => standing,
                Err(_) => return Err(abort_error(abort, self.addr)),
            }
        };
        if let Verdict::Abort(abort) = verdict {
            return Err(abort_error(abort, self.addr));
        }

        let mut keys: Vec<String> = (0..n).map(addr_key).collect();
        keys.push(session_key());
        let mut values = self
            .store
            .multi_get(&keys)
            .map_err(self.lost("reading the address table"))?;
        let session = values.pop().unwrap_or_default();
        let session = <[u8; 8]>::try_from(session.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| CollectiveError::ProtocolMismatch {
                peer: self.addr,
                detail: format!(
                    "the session id under {} is {} bytes, not 8",
                    session_key(),
                    session.len()
                ),
            })?;
        let entries = values
            .iter()
            .zip(0..n)
            .map(|(value, r)| self.decode_join(r, value))
            .collect::<Result<Vec<Join>, _>>()?;
        let addrs = address_table(rank, n, &entries)?;
        Ok((session, addrs))
    }

    /// Waits for `key` until the rendezvous deadline: false if it did not appear.
    fn wait(&mut self, key: String, during: &'static str) -> Result<bool, CollectiveError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.store.wait(&[key], left) {
            Ok(()) => Ok(true),
            Err(StoreError::Timeout) => Ok(false),
            Err(e) => Err(self.lost(during)(e)),
        }
    }

    /// Records `verdict` unless one is recorded already; returns the one that stands.
    fn record(&mut self, verdict: &Verdict) -> Result<Verdict, CollectiveError> {
        let stored = self
            .store
            .compare_set(&verdict_key(), b"", &verdict.encode())
            .map_err(self.lost("recording the rendezvous verdict"))?;
        self.decode_verdict(&stored)
    }

    /// This rank found `abort`: records it for the others and returns the error to report (the
    /// cause recorded first, if another rank's came before; this rank's own if the rendezvous
    /// completed without it or the store cannot be reached).
    fn give_up(&mut self, abort: Abort) -> CollectiveError {
        match self.record(&Verdict::Abort(abort.clone())) {
            Ok(Verdict::Abort(first)) => abort_error(first, self.addr),
            Ok(Verdict::Complete) | Err(_) => abort_error(abort, self.addr),
        }
    }

    /// The rendezvous deadline passed: the timeout, naming the ranks that never published an
    /// address.
    fn timeout_abort(&mut self) -> Result<Abort, CollectiveError> {
        let n = self.cfg.world_size;
        let keys: Vec<String> = (0..n).map(addr_key).collect();
        let present = self
            .store
            .check_each(&keys)
            .map_err(self.lost("listing the ranks that joined"))?;
        let missing: Vec<u32> = (0..n).filter(|&r| !present[r as usize]).collect();
        Ok(Abort::Timeout {
            timeout_ms: u64::try_from(self.cfg.timeout.as_millis()).unwrap_or(u64::MAX),
            joined: n - missing.len() as u32,
            missing,
        })
    }

    fn decode_verdict(&self, value: &[u8]) -> Result<Verdict, CollectiveError> {
        Verdict::decode(value).map_err(|what| CollectiveError::ProtocolMismatch {
            peer: self.addr,
            detail: format!(
                "the store holds {what} under {}, not a rendezvous verdict; is another program using the store's {KEY_PREFIX} keys?",
                verdict_key()
            ),
        })
    }

    fn decode_join(&self, rank: u32, value: &[u8]) -> Result<Join, CollectiveError> {
        let bad = |detail: String| CollectiveError::ProtocolMismatch {
            peer: self.addr,
            detail: format!("the entry under {}: {detail}", addr_key(rank)),
        };
        let join = wire::read_join(&mut &value[..]).map_err(|e| match e {
            WireError::Mismatch(detail) => bad(detail),
            WireError::Io(e) => bad(format!("truncated ({e})")),
        })?;
        if join.rank != rank {
            return Err(bad(format!("it names rank {}", join.rank)));
        }
        Ok(join)
    }
}

/// Every rank's data address, by rank, from every rank's published entry (`entries[r]` is rank
/// `r`'s). Rank 0's world size is the expected one, as with rank 0's listener.
fn address_table(
    this_rank: u32,
    world_size: u32,
    entries: &[Join],
) -> Result<Vec<SocketAddr>, CollectiveError> {
    let expected = entries.first().map_or(world_size, |e| e.world_size);
    if expected != world_size {
        return Err(CollectiveError::WorldSizeMismatch {
            expected,
            rank: this_rank,
            got: world_size,
        });
    }
    if let Some(e) = entries.iter().find(|e| e.world_size != expected) {
        return Err(CollectiveError::WorldSizeMismatch {
            expected,
            rank: e.rank,
            got: e.world_size,
        });
    }
    Ok(entries.iter().map(|e| e.data_addr).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rank: u32, world_size: u32) -> Join {
        Join {
            rank,
            world_size,
            data_addr: SocketAddr::new([127, 0, 0, 1].into(), 1000 + rank as u16),
        }
    }

    #[test]
    fn keys_never_collide_with_torchs() {
        for key in [
            rank_key(3),
            addr_key(3),
            joined_key(),
            session_key(),
            verdict_key(),
        ] {
            assert!(key.starts_with("trainctl/rdzv/"), "{key}");
        }
        assert_eq!(addr_key(12), "trainctl/rdzv/addr/12");
    }

    #[test]
    fn verdicts_round_trip_and_foreign_values_are_named() {
        let cases = [
            Verdict::Complete,
            Verdict::Abort(Abort::DuplicateRank { rank: 4 }),
            Verdict::Abort(Abort::WorldSizeMismatch {
                expected: 2,
                rank: 1,
                got: 3,
            }),
            Verdict::Abort(Abort::Timeout {
                timeout_ms: 500,
                joined: 3,
                missing: vec![2],
            }),
        ];
        for v in cases {
            assert_eq!(Verdict::decode(&v.encode()), Ok(v.clone()), "{v:?}");
        }
        let err = Verdict::decode(b"done").unwrap_err();
        assert!(
            err.contains("expected a trainctl collective message"),
            "{err}"
        );
        let table = wire::encode_reply(&Reply::Table {
            session: 1,
            addrs: vec![],
        });
        assert_eq!(
            Verdict::decode(&table).unwrap_err(),
            "an address table".to_string()
        );
    }

    #[test]
    fn address_table_checks_world_sizes_against_rank_0s() {
        let table = address_table(1, 3, &[entry(0, 3), entry(1, 3), entry(2, 3)]).unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(table[2].port(), 1002);

        let mismatch = |rank, n, entries: &[Join]| match address_table(rank, n, entries) {
            Err(CollectiveError::WorldSizeMismatch {
                expected,
                rank,
                got,
            }) => (expected, rank, got),
            other => panic!("{other:?}"),
        };
        // This rank disagrees with rank 0.
        assert_eq!(mismatch(1, 3, &[entry(0, 2), entry(1, 3)]), (2, 1, 3));
        // Another rank disagrees with rank 0.
        assert_eq!(
            mismatch(0, 3, &[entry(0, 3), entry(1, 3), entry(2, 4)]),
            (3, 2, 4)
        );
    }
}
