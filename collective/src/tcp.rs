//! [`TcpRing`]: rendezvous of the ranks, then a ring of TCP connections carrying the collectives.
//!
//! Rendezvous takes one of two paths, chosen by [`RendezvousConfig::use_agent_store`]; both end
//! with every rank holding the same session id and address table, or every rank reporting the
//! same cause (timeout with the missing ranks, world-size mismatch, duplicate rank):
//!
//! - **Through the agent's store** (`TORCHELASTIC_USE_AGENT_STORE=True`, how trainctl's agent
//!   launches ranks): the agent serves a TCPStore at the master address, empty for every attempt,
//!   and every rank, rank 0 included, is a client of it (`crate::store_rendezvous`): each rank
//!   binds its data listener, claims its rank, publishes its data address and world size, and
//!   waits for the others' entries; rank 0 publishes the session id.
//! - **Through rank 0** (otherwise: the example run by hand or by another launcher): rank 0
//!   listens on the master address ([`MasterListener`]); every other rank binds a data listener,
//!   connects to rank 0 (retrying until its timeout, since rank 0 may start later) and sends a
//!   `Join { rank, world_size, data_addr }`. Rank 0 checks that world sizes agree and ranks are
//!   unique, then sends every rank the address table, or the reason it gave up.
//!
//! Each rank then connects to rank + 1, accepts from rank - 1, and both ends check a hello naming
//! the rendezvous session and the ranks.
//!
//! Data: each rank owns a sender thread that writes to the next rank while the calling thread reads
//! from the previous one, so a ring of large messages never deadlocks on full socket buffers. The
//! all-reduce moves its chunks in segments, each passed on as soon as it is summed (pipelined; the
//! bytes on the wire are those of whole chunks in order). A large all-reduce (1 MiB or more)
//! copies nothing to send: a sender thread scoped to the operation borrows the caller's buffer one
//! segment at a time (`all_reduce_lending`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::CollectiveError;
use crate::schedule::{all_gather_step, chunk_range, next_send_is_this_recv, reduce_scatter_step};
use crate::wire::{self, Abort, Hello, HelloAck, Join, OpHeader, OpKind, Reply, WireError};
use crate::{Collective, MAX_WORLD_SIZE};

/// First pause between attempts to reach rank 0 or a ring neighbour; doubles up to the maximum.
const CONNECT_RETRY_MIN_MS: u64 = 10;
/// Longest pause between connection attempts.
const CONNECT_RETRY_MAX_MS: u64 = 500;
/// How often a listener waiting for connections checks its deadline.
const ACCEPT_POLL_INTERVAL_MS: u64 = 5;
/// How long rank 0 waits for the join message of a connection it accepted.
const JOIN_READ_TIMEOUT_MS: u64 = 2_000;
/// How long past its own timeout a joined rank waits for rank 0's verdict (table or abort): rank 0
/// started before this rank joined, so its own timeout has expired by then.
const REPLY_GRACE_MS: u64 = 2_000;
/// Broadcast forwards the buffer in segments of this many bytes, so ranks down the ring start
/// forwarding before the whole buffer has arrived.
const BROADCAST_SEGMENT_BYTES: usize = 1 << 20;
/// Byte each rank passes around the ring in a barrier.
const BARRIER_TOKEN: u8 = 0xba;
/// The all-reduce sends, sums and forwards its chunks in segments of this many bytes (see
/// `all_reduce_body`): small enough for a segment's passes to stay in cache, large enough that the
/// hand-over to the sender thread costs little.
const ALL_REDUCE_SEGMENT_BYTES: usize = 256 << 10;
/// All-reduces of at least this many bytes send straight from the caller's buffer, through a
/// sender thread of their own (`all_reduce_lending`); smaller ones copy each segment to the ring's
/// sender thread instead, which costs less than starting a thread. Measured on 2 cores (medians,
/// release, lending everything against this threshold): 4 KiB 160 against 97 us, 64 KiB 185
/// against 121 us on 2 ranks; lending wins from about 192 KiB on 2 ranks but still loses at 512
/// KiB on 4 (1 507 against 1 167 us), so the threshold sits above both.
const LENDING_MIN_BYTES: usize = 1 << 20;
/// Spare send buffers a ring keeps for reuse, in bytes of capacity all together. A broadcast's
/// root queues its whole buffer at once (64 MiB: 64 segments of 1 MiB), so this many bytes of
/// segments come back to be reused by the next operation instead of being allocated and
/// page-faulted anew. (All-reduces of 1 MiB or more lend the caller's buffer and use no pool.)
const SEND_BUFFER_POOL_MAX_BYTES: usize = 64 << 20;
/// Smaller sent buffers (headers, barrier tokens) are dropped rather than pooled, so that they do
/// not take the places of segment buffers, which would then be allocated (and page-faulted) anew.
const SEND_BUFFER_POOL_MIN_BYTES: usize = 4 << 10;

/// Where and how one rank meets the others.
///
/// [`crate::rendezvous_config_from_env`] fills this from `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
/// `MASTER_PORT`, `TRAINCTL_NODE_ADDR` and `TORCHELASTIC_USE_AGENT_STORE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// This process's rank, `0..world_size`.
    pub rank: u32,
    /// Number of ranks in the job, `1..=MAX_WORLD_SIZE`.
    pub world_size: u32,
    /// The rendezvous address: the agent's store, or where rank 0 listens.
    pub master_addr: IpAddr,
    /// The rendezvous port: the agent's store's, or the one rank 0 listens on.
    pub master_port: u16,
    /// Address this rank's ring data listener binds to (port chosen by the system). If unspecified
    /// (`0.0.0.0` or `::`), the rank listens on every interface and advertises the local address of
    /// its connection to the store or to rank 0 (rank 0 listening advertises `master_addr`).
    pub bind_addr: IpAddr,
    /// How long the rendezvous may take: rank 0 listening waits this long for every rank to join,
    /// and a rank retries reaching rank 0 or the store, and waits for the other ranks there, until
    /// this long after it started. The ring connections after the rendezvous get the same time
    /// again.
    pub timeout: Duration,
    /// Whether a TCPStore served by the launcher's agent is at `master_addr:master_port`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`, torchrun's contract): every rank, rank 0 included,
    /// then meets the others as a client of that store, and nothing binds the master port. When
    /// false, rank 0 listens there itself ([`MasterListener`]).
    pub use_agent_store: bool,
}

impl RendezvousConfig {
    /// The rendezvous address: `master_addr:master_port`.
    pub fn master_socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.master_addr, self.master_port)
    }

    fn validate(&self) -> Result<(), CollectiveError> {
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(CollectiveError::InvalidWorldSize {
                world_size: self.world_size,
            });
        }
        if self.rank >= self.world_size {
            return Err(CollectiveError::InvalidRank {
                rank: self.rank,
                world_size: self.world_size,
            });
        }
        Ok(())
    }
}

/// Rank 0's side of a rendezvous, bound but not yet waiting for the other ranks.
///
/// [`TcpRing::connect`] does both steps for rank 0; splitting them lets a caller listen on port 0
/// and learn the port ([`MasterListener::local_addr`]) before telling the other ranks.
#[derive(Debug)]
pub struct MasterListener {
    cfg: RendezvousConfig,
    listener: TcpListener,
    started: Instant,
}

impl MasterListener {
    /// Listens on `master_addr:master_port` for rank 0. The rendezvous timeout counts from here.
    ///
    /// Fails with [`CollectiveError::AddressInUse`] if something already listens on that port, and
    /// refuses a configuration with [`RendezvousConfig::use_agent_store`] (the agent's store holds
    /// that port).
    pub fn bind(cfg: RendezvousConfig) -> Result<MasterListener, CollectiveError> {
        cfg.validate()?;
        if cfg.use_agent_store {
            return Err(CollectiveError::Io {
                context: "rank 0 does not listen for the rendezvous when the agent serves the store",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "MasterListener::bind called with use_agent_store (TORCHELASTIC_USE_AGENT_STORE=True)",
                ),
            });
        }
        if cfg.rank != 0 {
            return Err(CollectiveError::Io {
                context: "only rank 0 listens for the rendezvous",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("MasterListener::bind called with rank {}", cfg.rank),
                ),
            });
        }
        let addr = cfg.master_socket_addr();
        // std's listener sets SO_REUSEADDR on Unix, which only permits rebinding over connections
        // in TIME_WAIT; a port another socket listens on still fails with AddrInUse.
        let listener = TcpListener::bind(addr).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => CollectiveError::AddressInUse { addr },
            _ => CollectiveError::Bind {
                addr,
                purpose: "rendezvous",
                source: e,
            },
        })?;
        Ok(MasterListener {
            cfg,
            listener,
            started: Instant::now(),
        })
    }

    /// The address actually listened on (with the system's port if `master_port` was 0).
    pub fn local_addr(&self) -> Result<SocketAddr, CollectiveError> {
        self.listener.local_addr().map_err(|e| CollectiveError::Io {
            context: "read the rendezvous listener's address",
            source: e,
        })
    }

    /// Waits for every other rank to join, sends them the address table and builds the ring.
    pub fn accept_ring(self) -> Result<TcpRing, CollectiveError> {
        let n = self.cfg.world_size;
        if n == 1 {
            return Ok(TcpRing::solo());
        }
        let addr = self.local_addr()?;
        let data = bind_data_listener(self.cfg.bind_addr)?;
        let data_port = local_addr(&data, "read the data listener's address")?.port();
        let own_ip = if self.cfg.bind_addr.is_unspecified() {
            self.cfg.master_addr
        } else {
            self.cfg.bind_addr
        };
        let deadline = self.started + self.cfg.timeout;
        let mut table: Vec<Option<SocketAddr>> = vec![None; n as usize];
        table[0] = Some(SocketAddr::new(own_ip, data_port));
        let mut joined_count: u32 = 1;
        let mut conns: Vec<TcpStream> = Vec::new();

        set_nonblocking(&self.listener, true)?;
        while joined_count < n {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        let missing: Vec<u32> =
                            (0..n).filter(|&r| table[r as usize].is_none()).collect();
                        let abort = Abort::Timeout {
                            timeout_ms: u64::try_from(self.cfg.timeout.as_millis())
                                .unwrap_or(u64::MAX),
                            joined: joined_count,
                            missing: missing.clone(),
                        };
                        send_abort(&mut conns, &abort);
                        return Err(CollectiveError::RendezvousTimeout {
                            addr,
                            timeout: self.cfg.timeout,
                            joined: joined_count,
                            world_size: n,
                            missing,
                        });
                    }
                    thread::sleep(
                        Duration::from_millis(ACCEPT_POLL_INTERVAL_MS).min(deadline - now),
                    );
                    continue;
                }
                // Transient accept failures (a connection reset before it was accepted, a full
                // file table) are retried until the deadline.
                Err(_) => {
                    thread::sleep(Duration::from_millis(ACCEPT_POLL_INTERVAL_MS));
                    continue;
                }
            };
            let wait = remaining(deadline).min(Duration::from_millis(JOIN_READ_TIMEOUT_MS));
            let join = match prepare_stream(&stream, Some(wait)) {
                Ok(()) => wire::read_join(&mut stream),
                Err(e) => Err(WireError::Io(e)),
            };
            let join = match join {
                Ok(join) => join,
                Err(WireError::Mismatch(detail)) => {
                    conns.push(stream);
                    send_abort(
                        &mut conns,
                        &Abort::Other(format!(
                            "a connection from {peer} to rank 0 was not a trainctl rank: {detail}"
                        )),
                    );
                    return Err(CollectiveError::ProtocolMismatch { peer, detail });
                }
                // A rank that connected and vanished before joining counts as not joined; if it
                // comes back it can still join before the deadline.
                Err(WireError::Io(_)) => continue,
            };
            conns.push(stream);
            let abort = if join.world_size != n {
                Some(Abort::WorldSizeMismatch {
                    expected: n,
                    rank: join.rank,
                    got: join.world_size,
                })
            } else if join.rank == 0 || join.rank >= n || table[join.rank as usize].is_some() {
                Some(Abort::DuplicateRank { rank: join.rank })
            } else {
                None
            };
            if let Some(abort) = abort {
                send_abort(&mut conns, &abort);
                return Err(abort_error(abort, addr));
            }
            table[join.rank as usize] = Some(join.data_addr);
            joined_count += 1;
        }

        let addrs: Vec<SocketAddr> = table.into_iter().flatten().collect();
        let session = new_session_id(addr);
        let reply = wire::encode_reply(&Reply::Table {
            session,
            addrs: addrs.clone(),
        });
        for conn in &mut conns {
            // A rank that died after joining shows up as a failed ring connection below.
            let _ = conn.write_all(&reply);
        }
        drop(conns);
        build_ring(0, n, session, &addrs, data, self.cfg.timeout)
    }
}

/// A [`Collective`] over TCP: a ring of connections, each rank sending to rank + 1 and receiving
/// from rank - 1.
///
/// `all_reduce_sum_f32` is the bandwidth-optimal ring (reduce-scatter then all-gather), so each rank
/// sends and receives about `2 * (world_size - 1) / world_size` times the buffer. Results are
/// bit-identical on every rank and, for a given world size, from run to run.
///
/// After any failed operation the ring is unusable and every later call returns
/// [`CollectiveError::Broken`]; rendezvous again to continue.
#[derive(Debug)]
pub struct TcpRing {
    rank: u32,
    world_size: u32,
    link: Option<Link>,
    seq: u64,
    broken: Option<String>,
    op_timeout: Option<Duration>,
}

/// The two connections of a rank in a ring of two or more.
#[derive(Debug)]
struct Link {
    prev_rank: u32,
    next_rank: u32,
    prev: TcpStream,
    prev_addr: SocketAddr,
    /// A handle on the connection the sender thread writes to, to set timeouts and shut it down.
    next_ctl: TcpStream,
    jobs: Option<Sender<Vec<u8>>>,
    done: Receiver<io::Result<Vec<u8>>>,
    in_flight: usize,
    /// The first failed write since the last flush.
    send_error: Option<io::Error>,
    sender: Option<JoinHandle<()>>,
    /// Buffers the sender thread gave back, for the next messages.
    pool: Vec<Vec<u8>>,
    /// Capacity of the buffers in `pool`, at most [`SEND_BUFFER_POOL_MAX_BYTES`].
    pool_bytes: usize,
}

impl TcpRing {
    /// Meets the other ranks and builds the ring. With [`RendezvousConfig::use_agent_store`] every
    /// rank is a client of the agent's store at `master_addr:master_port`; otherwise rank 0 listens
    /// there and the others connect to it. Returns once every rank is connected to its neighbours.
    ///
    /// With `world_size == 1` no socket is opened at all.
    pub fn connect(cfg: RendezvousConfig) -> Result<TcpRing, CollectiveError> {
        cfg.validate()?;
        if cfg.world_size == 1 {
            return Ok(TcpRing::solo());
        }
        if cfg.use_agent_store {
            return crate::store_rendezvous::connect_through_store(&cfg);
        }
        if cfg.rank == 0 {
            return MasterListener::bind(cfg)?.accept_ring();
        }
        join(&cfg)
    }

    /// Sets how long one operation may wait on a neighbour before failing with
    /// [`CollectiveError::PeerTimeout`]. `None` (the default) waits forever, which suits ranks
    /// that may spend minutes between collectives on compute or checkpoints. Must not be zero.
    pub fn set_op_timeout(&mut self, timeout: Option<Duration>) -> Result<(), CollectiveError> {
        if let Some(link) = &self.link {
            let set = link
                .prev
                .set_read_timeout(timeout)
                .and_then(|()| link.next_ctl.set_write_timeout(timeout));
            set.map_err(|e| CollectiveError::Io {
                context: "set the operation timeout",
                source: e,
            })?;
        }
        self.op_timeout = timeout;
        Ok(())
    }

    fn solo() -> TcpRing {
        TcpRing {
            rank: 0,
            world_size: 1,
            link: None,
            seq: 0,
            broken: None,
            op_timeout: None,
        }
    }

    /// Runs one operation; any failure leaves the ring broken.
    fn run_op(
        &mut self,
        header: (OpKind, u64, u32),
        body: impl FnOnce(&mut TcpRing) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken {
                cause: cause.clone(),
            });
        }
        if self.link.is_none() {
            return Ok(());
        }
        let mut result = self.start_op(header.0, header.1, header.2);
        if result.is_ok() {
            result = body(self);
        }
        if result.is_ok() {
            result = self.flush_sends();
        }
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            // Closing both connections makes the neighbours fail too instead of waiting forever
            // for data this rank will never send, so the failure travels around the ring.
            if let Some(link) = &self.link {
                link.shut_down();
            }
        }
        result
    }

    /// Tells the next rank which operation this is and checks the previous rank's announcement.
    fn start_op(&mut self, kind: OpKind, len: u64, root: u32) -> Result<(), CollectiveError> {
        self.seq += 1;
        let ours = OpHeader {
            seq: self.seq,
            kind,
            len,
            root,
        };
        self.queue_send(wire::encode_op(&ours))?;
        let timeout = self.op_timeout;
        let rank = self.rank;
        let link = self.link_mut()?;
        let theirs = wire::read_op(&mut link.prev).map_err(|e| match e {
            WireError::Io(e) => {
                peer_error(link.prev_rank, "receiving a collective header", timeout, e)
            }
            WireError::Mismatch(detail) => CollectiveError::ProtocolMismatch {
                peer: link.prev_addr,
                detail,
            },
        })?;
        if theirs != ours {
            // Only our small header is in flight: deliver it before the connections close, so
            // the next rank reports the same mismatch rather than a lost connection.
            let peer = link.prev_rank;
            let _ = self.flush_sends();
            return Err(CollectiveError::OpMismatch {
                rank,
                peer,
                ours: ours.to_string(),
                theirs: theirs.to_string(),
            });
        }
        Ok(())
    }

    fn link_mut(&mut self) -> Result<&mut Link, CollectiveError> {
        self.link.as_mut().ok_or_else(|| CollectiveError::Io {
            context: "use the ring",
            source: io::Error::new(io::ErrorKind::NotConnected, "a world of one has no ring"),
        })
    }

    /// A cleared buffer for an outgoing message, reusing one the sender thread gave back.
    fn take_buf(&mut self) -> Vec<u8> {
        self.take_buf_len(0)
    }

    /// A buffer of exactly `len` bytes for an outgoing message, reusing one the sender thread gave
    /// back. Its bytes are unspecified: the caller overwrites them all. A reused buffer that held
    /// a message of the same length (the segments of an all-reduce) is not filled first.
    fn take_buf_len(&mut self, len: usize) -> Vec<u8> {
        let Some(link) = self.link.as_mut() else {
            return vec![0; len];
        };
        while let Ok(done) = link.done.try_recv() {
            link.sent(done);
        }
        let mut buf = match link.pool.pop() {
            Some(buf) => {
                link.pool_bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        };
        buf.resize(len, 0);
        buf
    }

    fn queue_send(&mut self, bytes: Vec<u8>) -> Result<(), CollectiveError> {
        let link = self.link_mut()?;
        let jobs = link.jobs.as_ref().ok_or_else(sender_gone)?;
        jobs.send(bytes).map_err(|_| sender_gone())?;
        link.in_flight += 1;
        Ok(())
    }

    fn send_elems<T: Elem>(&mut self, values: &[T]) -> Result<(), CollectiveError> {
        if values.is_empty() {
            return Ok(());
        }
        let mut buf = self.take_buf_len(std::mem::size_of_val(values));
        if cfg!(target_endian = "little") {
            // The wire's byte order is the host's: one copy of the values' own bytes.
            buf.copy_from_slice(bytemuck::cast_slice(values));
        } else {
            for (dst, v) in buf.chunks_exact_mut(T::SIZE).zip(values) {
                dst.copy_from_slice(bytemuck::bytes_of(&v.to_from_le()));
            }
        }
        self.queue_send(buf)
    }

    /// Reads exactly `into.len()` bytes from the previous rank into `into`.
    fn recv_into(&mut self, into: &mut [u8], during: &'static str) -> Result<(), CollectiveError> {
        let timeout = self.op_timeout;
        let link = self.link.as_mut().ok_or_else(sender_gone)?;
        link.prev
            .read_exact(into)
            .map_err(|e| peer_error(link.prev_rank, during, timeout, e))
    }

    /// Reads the next `dst.len()` elements from the previous rank straight into `dst`, and, with
    /// `forward`, queues the same bytes on to the next rank.
    fn recv_elems_into<T: Elem>(
        &mut self,
        dst: &mut [T],
        forward: bool,
        during: &'static str,
    ) -> Result<(), CollectiveError> {
        self.recv_into(bytemuck::cast_slice_mut(dst), during)?;
        if forward {
            let mut fwd = self.take_buf_len(std::mem::size_of_val(dst));
            fwd.copy_from_slice(bytemuck::cast_slice(dst));
            self.queue_send(fwd)?;
        }
        for v in dst.iter_mut() {
            *v = v.to_from_le(); // nothing on a little-endian host
        }
        Ok(())
    }

    /// Waits until the sender thread has handed every queued message to the kernel.
    fn flush_sends(&mut self) -> Result<(), CollectiveError> {
        let timeout = self.op_timeout;
        let link = self.link_mut()?;
        while link.in_flight > 0 {
            let done = link.done.recv().map_err(|_| sender_gone())?;
            link.sent(done);
        }
        match link.send_error.take() {
            Some(e) => Err(peer_error(link.next_rank, "sending", timeout, e)),
            None => Ok(()),
        }
    }

    /// The ring all-reduce for any element type: reduce-scatter with `T::add`, then all-gather.
    /// Each chunk is summed in the same order (starting at its first rank and travelling
    /// forward) on every run.
    ///
    /// Pipelined by segments of [`ALL_REDUCE_SEGMENT_BYTES`]: the chunk a rank receives at one
    /// step is the chunk it sends at the next (`schedule::next_send_is_this_recv`), so each
    /// segment goes on to the next rank as soon as it is summed (or, in the all-gather, received)
    /// instead of after the whole chunk; the ranks down the ring start on it while this rank
    /// receives the next segment, and every pass over a segment stays in cache. The bytes on the
    /// wire are the same as without segments: each chunk whole and in order, chunk after chunk.
    fn all_reduce_body<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        if cfg!(target_endian = "little") && std::mem::size_of_val(buf) >= LENDING_MIN_BYTES {
            self.all_reduce_lending(buf)
        } else {
            self.all_reduce_copying(buf)
        }
    }

    /// The ring all-reduce through the ring's own sender thread: each segment sent is first
    /// copied into a send buffer the thread owns. For small buffers, where starting a thread for
    /// the operation ([`TcpRing::all_reduce_lending`]) would cost more than the copies.
    fn all_reduce_copying<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        let n = self.world_size as usize;
        let rank = self.rank as usize;
        let len = buf.len();
        let seg = (ALL_REDUCE_SEGMENT_BYTES / T::SIZE).max(1);
        let (first, _) = reduce_scatter_step(rank, n, 0);
        for piece in buf[chunk_range(len, n, first)].chunks(seg) {
            self.send_elems(piece)?;
        }
        // Each received segment lands here, in the element type, and is summed from here.
        let mut incoming: Vec<T> = vec![T::zeroed(); seg.min(len)];
        for step in 0..n - 1 {
            let (_, recv) = reduce_scatter_step(rank, n, step);
            // Summed, this chunk is the next step's send, or after the last step the chunk this
            // rank owns, which the all-gather sends first.
            debug_assert!(next_send_is_this_recv(rank, n, step));
            let range = chunk_range(len, n, recv);
            for start in range.clone().step_by(seg) {
                let dst = &mut buf[start..(start + seg).min(range.end)];
                let got = &mut incoming[..dst.len()];
                self.recv_into(bytemuck::cast_slice_mut(got), "receiving all_reduce data")?;
                for (d, s) in dst.iter_mut().zip(got.iter()) {
                    *d = d.add(s.to_from_le());
                }
                self.send_elems(dst)?;
            }
        }
        for step in 0..n - 1 {
            let (_, recv) = all_gather_step(rank, n, step);
            // Every step but the last passes the chunk on, byte for byte.
            let forward = step + 2 < n;
            let range = chunk_range(len, n, recv);
            for start in range.clone().step_by(seg) {
                let dst = &mut buf[start..(start + seg).min(range.end)];
                self.recv_elems_into(dst, forward, "receiving all_reduce results")?;
            }
        }
        Ok(())
    }

    /// The same ring, segments and bytes on the wire as [`TcpRing::all_reduce_copying`], but
    /// nothing is copied to be sent: the caller's buffer is cut into its segments, and a sender
    /// thread scoped to this operation borrows each segment in turn (lent over a channel, given
    /// back once written), so the kernel reads the bytes straight from the caller's buffer, as
    /// gloo does. The calling thread takes a segment back before it writes to it again. Only on a
    /// little-endian host, where the values' own bytes are the wire's.
    fn all_reduce_lending<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CollectiveError> {
        // The operation's header is queued on the ring's own sender thread: it goes out first.
        self.flush_sends()?;
        let n = self.world_size as usize;
        let rank = self.rank as usize;
        let timeout = self.op_timeout;
        let link = self.link_mut()?;
        let (prev_rank, next_rank) = (link.prev_rank, link.next_rank);
        let (prev, next) = (&link.prev, &link.next_ctl);
        let seg = (ALL_REDUCE_SEGMENT_BYTES / T::SIZE).max(1);
        let incoming_len = seg.min(buf.len());
        let mut segments = Segments::split(buf, n, seg);
        let send_failed = AtomicBool::new(false);
        thread::scope(|scope| {
            let (lend, to_send) = mpsc::channel::<(usize, &mut [T])>();
            let (give_back, returned) = mpsc::channel::<(usize, &mut [T])>();
            let send_failed = &send_failed;
            let sender = thread::Builder::new()
                .name(format!("collective-lend-r{rank}"))
                .spawn_scoped(scope, move || -> io::Result<()> {
                    let mut out = next;
                    for (index, segment) in to_send {
                        if let Err(e) = out.write_all(bytemuck::cast_slice(segment)) {
                            send_failed.store(true, Ordering::SeqCst);
                            // Wakes the calling thread if it waits for the previous rank.
                            let _ = prev.shutdown(Shutdown::Both);
                            return Err(e);
                        }
                        // Once the calling thread has received everything it stops taking
                        // segments back, but the ones still queued must go out all the same.
                        let _ = give_back.send((index, segment));
                    }
                    Ok(())
                })
                .map_err(|e| CollectiveError::Io {
                    context: "start the all_reduce's sender thread",
                    source: e,
                })?;
            let mut lending = Lending {
                segments: &mut segments,
                lend,
                returned,
            };
            let received = lending.run(rank, n, incoming_len, prev);
            // Read before this thread shuts the connection down, which fails the sender too.
            let send_failed_first = send_failed.load(Ordering::SeqCst);
            if received.is_err() && !send_failed_first {
                // Unblocks the sender if the next rank stopped reading.
                let _ = next.shutdown(Shutdown::Both);
            }
            drop(lending);
            let sent = sender.join().unwrap_or_else(|_| {
                Err(io::Error::other("the all_reduce's sender thread panicked"))
            });
            let send_error = |e| peer_error(next_rank, "sending all_reduce data", timeout, e);
            match (received, sent) {
                (Ok(()), Ok(())) => Ok(()),
                (Ok(()), Err(e)) | (Err(LendingError::SenderStopped), Err(e)) => Err(send_error(e)),
                (Err(LendingError::Recv { .. }), Err(e)) if send_failed_first => Err(send_error(e)),
                (Err(LendingError::Recv { during, source }), _) => {
                    Err(peer_error(prev_rank, during, timeout, source))
                }
                (Err(LendingError::SenderStopped), Ok(())) => Err(sender_gone()),
            }
        })
    }

    fn broadcast_body(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError> {
        let n = self.world_size;
        let last = (root + n - 1) % n; // the rank before the root forwards nothing
        for segment in buf.chunks_mut(BROADCAST_SEGMENT_BYTES / 4) {
            if self.rank == root {
                self.send_elems(segment)?;
                continue;
            }
            self.recv_elems_into(segment, self.rank != last, "receiving broadcast data")?;
        }
        Ok(())
    }

    /// After the header exchange each rank knows its predecessor arrived; `world_size - 2` more
    /// hops of a token make that every rank.
    fn barrier_body(&mut self) -> Result<(), CollectiveError> {
        for _ in 2..self.world_size {
            let mut token = self.take_buf();
            token.push(BARRIER_TOKEN);
            self.queue_send(token)?;
            let mut got = [0u8; 1];
            self.recv_into(&mut got, "waiting at a barrier")?;
            if got[0] != BARRIER_TOKEN {
                let link = self.link_mut()?;
                return Err(CollectiveError::ProtocolMismatch {
                    peer: link.prev_addr,
                    detail: format!(
                        "expected barrier token {BARRIER_TOKEN:#04x}, got {:#04x}",
                        got[0]
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run_op(
            (OpKind::AllReduceSumF32, buf.len() as u64, 0),
            |ring: &mut TcpRing| ring.all_reduce_body(buf),
        )
    }

    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        self.run_op(
            (OpKind::AllReduceSumI64, buf.len() as u64, 0),
            |ring: &mut TcpRing| ring.all_reduce_body(buf),
        )
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidRoot {
                root,
                world_size: self.world_size,
            });
        }
        self.run_op(
            (OpKind::BroadcastF32, buf.len() as u64, root),
            |ring: &mut TcpRing| ring.broadcast_body(buf, root),
        )
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.run_op((OpKind::Barrier, 0, 0), TcpRing::barrier_body)
    }

    // Host memory, f32 and i64 only, no stream, no abort handle (a closed connection or the
    // operation timeout ends a wait): the trait's defaults.
    fn backend(&self) -> &'static str {
        "tcp"
    }
}

impl Link {
    /// Takes back a message the sender thread finished: its buffer goes to the pool (if the pool
    /// has room and the buffer is worth keeping), its error is kept for the next flush.
    fn sent(&mut self, done: io::Result<Vec<u8>>) {
        self.in_flight -= 1;
        match done {
            Ok(buf)
                if buf.capacity() >= SEND_BUFFER_POOL_MIN_BYTES
                    && self.pool_bytes + buf.capacity() <= SEND_BUFFER_POOL_MAX_BYTES =>
            {
                self.pool_bytes += buf.capacity();
                self.pool.push(buf);
            }
            Ok(_) => {}
            Err(e) => {
                self.send_error.get_or_insert(e);
            }
        }
    }

    /// Closes both connections; also unblocks a sender thread stuck writing to a neighbour that
    /// stopped reading. Data already written is still delivered before the end of stream.
    fn shut_down(&self) {
        let _ = self.next_ctl.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shut_down();
        self.jobs = None;
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

/// The caller's buffer cut into an all-reduce's segments: each chunk's (`schedule::chunk_range`),
/// in order, [`ALL_REDUCE_SEGMENT_BYTES`] each but a chunk's last. A slot is empty while its
/// segment is lent to the sender thread.
struct Segments<'b, T> {
    slots: Vec<Option<&'b mut [T]>>,
    /// Index of the first slot of chunk `c`, then one past the last slot.
    chunk_starts: Vec<usize>,
}

impl<'b, T> Segments<'b, T> {
    fn split(buf: &'b mut [T], chunks: usize, seg: usize) -> Segments<'b, T> {
        let len = buf.len();
        let mut slots = Vec::new();
        let mut chunk_starts = Vec::with_capacity(chunks + 1);
        let mut rest = buf;
        for c in 0..chunks {
            chunk_starts.push(slots.len());
            let (mut chunk, after) = rest.split_at_mut(chunk_range(len, chunks, c).len());
            rest = after;
            while !chunk.is_empty() {
                let (segment, after) = chunk.split_at_mut(seg.min(chunk.len()));
                slots.push(Some(segment));
                chunk = after;
            }
        }
        chunk_starts.push(slots.len());
        Segments {
            slots,
            chunk_starts,
        }
    }

    /// The slots of chunk `c`, in order.
    fn of_chunk(&self, c: usize) -> Range<usize> {
        self.chunk_starts[c]..self.chunk_starts[c + 1]
    }
}

/// Why the calling thread of [`TcpRing::all_reduce_lending`] stopped.
enum LendingError {
    Recv {
        during: &'static str,
        source: io::Error,
    },
    /// The sender thread is gone (it failed to write): the send error is the cause.
    SenderStopped,
}

/// The calling thread's side of [`TcpRing::all_reduce_lending`].
struct Lending<'s, 'b, T> {
    segments: &'s mut Segments<'b, T>,
    lend: Sender<(usize, &'b mut [T])>,
    returned: Receiver<(usize, &'b mut [T])>,
}

impl<'b, T: Elem> Lending<'_, 'b, T> {
    /// Reduce-scatter then all-gather, in the order of [`TcpRing::all_reduce_copying`].
    fn run(
        &mut self,
        rank: usize,
        n: usize,
        incoming_len: usize,
        prev: &TcpStream,
    ) -> Result<(), LendingError> {
        let mut prev = prev;
        let (first, _) = reduce_scatter_step(rank, n, 0);
        for i in self.segments.of_chunk(first) {
            let segment = self.take(i)?;
            self.lend(i, segment)?;
        }
        let mut incoming: Vec<T> = vec![T::zeroed(); incoming_len];
        for step in 0..n - 1 {
            let (_, recv) = reduce_scatter_step(rank, n, step);
            for i in self.segments.of_chunk(recv) {
                let dst = self.take(i)?;
                let got = &mut incoming[..dst.len()];
                prev.read_exact(bytemuck::cast_slice_mut(got))
                    .map_err(|source| LendingError::Recv {
                        during: "receiving all_reduce data",
                        source,
                    })?;
                for (d, s) in dst.iter_mut().zip(got.iter()) {
                    *d = d.add(*s);
                }
                self.lend(i, dst)?;
            }
        }
        for step in 0..n - 1 {
            let (_, recv) = all_gather_step(rank, n, step);
            let forward = step + 2 < n;
            for i in self.segments.of_chunk(recv) {
                let dst = self.take(i)?;
                prev.read_exact(bytemuck::cast_slice_mut(dst))
                    .map_err(|source| LendingError::Recv {
                        during: "receiving all_reduce results",
                        source,
                    })?;
                if forward {
                    self.lend(i, dst)?;
                }
            }
        }
        Ok(())
    }

    /// Segment `i`, waiting for the sender thread to give it back if it is lent.
    fn take(&mut self, i: usize) -> Result<&'b mut [T], LendingError> {
        loop {
            if let Some(segment) = self.segments.slots[i].take() {
                return Ok(segment);
            }
            let (j, segment) = self
                .returned
                .recv()
                .map_err(|_| LendingError::SenderStopped)?;
            self.segments.slots[j] = Some(segment);
        }
    }

    fn lend(&mut self, i: usize, segment: &'b mut [T]) -> Result<(), LendingError> {
        self.lend
            .send((i, segment))
            .map_err(|_| LendingError::SenderStopped)
    }
}

/// An element type the ring reduces: plain old data, whose little-endian bytes are its wire form.
/// On a little-endian host (every host trainctl runs on today) the ring sends and receives the
/// values' own bytes, with no per-element conversion.
trait Elem: bytemuck::Pod + Send {
    /// Bytes on the wire.
    const SIZE: usize = std::mem::size_of::<Self>();
    /// The value with its bytes in little-endian order, or back: nothing on a little-endian host.
    fn to_from_le(self) -> Self;
    /// The reduction.
    fn add(self, other: Self) -> Self;
}

impl Elem for f32 {
    fn to_from_le(self) -> Self {
        f32::from_bits(self.to_bits().to_le())
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Elem for i64 {
    fn to_from_le(self) -> Self {
        self.to_le()
    }
    /// Wrapping, so the sum is exact modulo 2^64 and independent of the order of addition.
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
}

fn sender_gone() -> CollectiveError {
    CollectiveError::Io {
        context: "hand data to the ring's sender thread",
        source: io::Error::new(io::ErrorKind::BrokenPipe, "the sender thread has stopped"),
    }
}

/// Maps an IO error on a neighbour's connection to the variant a caller branches on.
fn peer_error(
    rank: u32,
    during: &'static str,
    timeout: Option<Duration>,
    e: io::Error,
) -> CollectiveError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::PeerTimeout {
            rank,
            during,
            timeout: timeout.unwrap_or_default(),
        },
        _ => CollectiveError::PeerLost {
            rank,
            during,
            source: e,
        },
    }
}

pub(crate) fn abort_error(abort: Abort, addr: SocketAddr) -> CollectiveError {
    match abort {
        Abort::Timeout {
            timeout_ms,
            joined,
            missing,
        } => CollectiveError::RendezvousTimeout {
            addr,
            timeout: Duration::from_millis(timeout_ms),
            joined,
            world_size: joined + missing.len() as u32,
            missing,
        },
        Abort::WorldSizeMismatch {
            expected,
            rank,
            got,
        } => CollectiveError::WorldSizeMismatch {
            expected,
            rank,
            got,
        },
        Abort::DuplicateRank { rank } => CollectiveError::DuplicateRank { rank },
        Abort::Other(detail) => CollectiveError::ProtocolMismatch { peer: addr, detail },
    }
}

fn send_abort(conns: &mut [TcpStream], abort: &Abort) {
    let bytes = wire::encode_reply(&Reply::Abort(abort.clone()));
    for conn in conns {
        // Best effort: the rank may already be gone, and rank 0 reports the cause itself.
        let _ = conn.write_all(&bytes);
    }
}

/// A rank other than 0: joins through rank 0, then builds the ring.
fn join(cfg: &RendezvousConfig) -> Result<TcpRing, CollectiveError> {
    let deadline = Instant::now() + cfg.timeout;
    let master = cfg.master_socket_addr();
    let data = bind_data_listener(cfg.bind_addr)?;
    let mut stream =
        connect_until(master, deadline).map_err(|e| CollectiveError::MasterUnreachable {
            addr: master,
            timeout: cfg.timeout,
            last_error: e,
        })?;
    let lost = |during, e| CollectiveError::PeerLost {
        rank: 0,
        during,
        source: e,
    };
    let wait = cfg.timeout + Duration::from_millis(REPLY_GRACE_MS);
    prepare_stream(&stream, Some(wait))
        .map_err(|e| lost("setting up the rendezvous connection", e))?;
    let ip = if cfg.bind_addr.is_unspecified() {
        stream
            .local_addr()
            .map_err(|e| lost("reading the local address", e))?
            .ip()
    } else {
        cfg.bind_addr
    };
    let port = local_addr(&data, "read the data listener's address")?.port();
    let msg = Join {
        rank: cfg.rank,
        world_size: cfg.world_size,
        data_addr: SocketAddr::new(ip, port),
    };
    stream
        .write_all(&wire::encode_join(&msg))
        .map_err(|e| lost("sending the join message", e))?;
    let (session, addrs) = match wire::read_reply(&mut stream) {
        Ok(Reply::Table { session, addrs }) => (session, addrs),
        Ok(Reply::Abort(abort)) => return Err(abort_error(abort, master)),
        Err(WireError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(CollectiveError::RendezvousNoReply {
                addr: master,
                waited: wait,
            })
        }
        Err(WireError::Io(e)) => return Err(lost("waiting for the address table", e)),
        Err(WireError::Mismatch(detail)) => {
            return Err(CollectiveError::ProtocolMismatch {
                peer: master,
                detail,
            })
        }
    };
    if addrs.len() != cfg.world_size as usize {
        return Err(CollectiveError::ProtocolMismatch {
            peer: master,
            detail: format!(
                "address table has {} entries for a world of {}",
                addrs.len(),
                cfg.world_size
            ),
        });
    }
    drop(stream);
    build_ring(cfg.rank, cfg.world_size, session, &addrs, data, cfg.timeout)
}

/// Connects to the next rank, accepts the previous one, checks both hellos and starts the sender.
pub(crate) fn build_ring(
    rank: u32,
    n: u32,
    session: u64,
    addrs: &[SocketAddr],
    data: TcpListener,
    timeout: Duration,
) -> Result<TcpRing, CollectiveError> {
    let deadline = Instant::now() + timeout;
    let next_rank = (rank + 1) % n;
    let prev_rank = (rank + n - 1) % n;
    let next_addr = addrs[next_rank as usize];

    let mut next =
        connect_until(next_addr, deadline).map_err(|e| CollectiveError::PeerConnect {
            rank: next_rank,
            addr: next_addr,
            source: e,
        })?;
    let next_err = |during, e| peer_error(next_rank, during, Some(timeout), e);
    prepare_stream(&next, Some(remaining(deadline)))
        .map_err(|e| next_err("setting up the ring connection", e))?;
    let hello = Hello {
        session,
        from: rank,
        to: next_rank,
    };
    next.write_all(&wire::encode_hello(&hello))
        .map_err(|e| next_err("sending the ring hello", e))?;

    let prev_err = |during, e| peer_error(prev_rank, during, Some(timeout), e);
    let (mut prev, prev_addr) = accept_until(&data, deadline)
        .map_err(|e| prev_err("waiting for its ring connection", e))?;
    drop(data);
    prepare_stream(&prev, Some(remaining(deadline)))
        .map_err(|e| prev_err("setting up the ring connection", e))?;
    let got = wire::read_hello(&mut prev).map_err(|e| match e {
        WireError::Io(e) => prev_err("receiving the ring hello", e),
        WireError::Mismatch(detail) => CollectiveError::ProtocolMismatch {
            peer: prev_addr,
            detail,
        },
    })?;
    let want = Hello {
        session,
        from: prev_rank,
        to: rank,
    };
    if got != want {
        return Err(CollectiveError::UnexpectedPeer {
            peer: prev_addr,
            detail: format!(
                "expected rank {prev_rank} of session {session:#x} to connect to rank {rank}, got rank {} of session {:#x} connecting to rank {}",
                got.from, got.session, got.to
            ),
        });
    }
    prev.write_all(&wire::encode_hello_ack(&HelloAck {
        session,
        from: rank,
    }))
    .map_err(|e| prev_err("acknowledging the ring hello", e))?;

    next.set_read_timeout(Some(remaining(deadline)))
        .map_err(|e| next_err("setting up the ring connection", e))?;
    let ack = wire::read_hello_ack(&mut next).map_err(|e| match e {
        WireError::Io(e) => next_err("receiving the ring hello acknowledgement", e),
        WireError::Mismatch(detail) => CollectiveError::ProtocolMismatch {
            peer: next_addr,
            detail,
        },
    })?;
    if ack.session != session || ack.from != next_rank {
        return Err(CollectiveError::UnexpectedPeer {
            peer: next_addr,
            detail: format!(
                "expected rank {next_rank} of session {session:#x} at this address, got rank {} of session {:#x}",
                ack.from, ack.session
            ),
        });
    }

    // Operations wait without a limit unless `set_op_timeout` says otherwise.
    let no_timeout = |s: &TcpStream| {
        s.set_read_timeout(None)
            .and_then(|()| s.set_write_timeout(None))
    };
    no_timeout(&prev).map_err(|e| prev_err("setting up the ring connection", e))?;
    no_timeout(&next).map_err(|e| next_err("setting up the ring connection", e))?;

    let next_ctl = next.try_clone().map_err(|e| CollectiveError::Io {
        context: "clone the ring connection",
        source: e,
    })?;
    let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = mpsc::channel::<io::Result<Vec<u8>>>();
    let sender = thread::Builder::new()
        .name(format!("collective-send-r{rank}"))
        .spawn(move || {
            for buf in jobs_rx {
                let result = next.write_all(&buf).map(|()| buf);
                if done_tx.send(result).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| CollectiveError::Io {
            context: "start the ring's sender thread",
            source: e,
        })?;

    Ok(TcpRing {
        rank,
        world_size: n,
        link: Some(Link {
            prev_rank,
            next_rank,
            prev,
            prev_addr,
            next_ctl,
            jobs: Some(jobs_tx),
            done: done_rx,
            in_flight: 0,
            send_error: None,
            sender: Some(sender),
            pool: Vec::new(),
            pool_bytes: 0,
        }),
        seq: 0,
        broken: None,
        op_timeout: None,
    })
}

pub(crate) fn bind_data_listener(ip: IpAddr) -> Result<TcpListener, CollectiveError> {
    let addr = SocketAddr::new(ip, 0);
    TcpListener::bind(addr).map_err(|e| CollectiveError::Bind {
        addr,
        purpose: "ring data connections",
        source: e,
    })
}

pub(crate) fn local_addr(
    l: &TcpListener,
    context: &'static str,
) -> Result<SocketAddr, CollectiveError> {
    l.local_addr()
        .map_err(|e| CollectiveError::Io { context, source: e })
}

fn set_nonblocking(l: &TcpListener, on: bool) -> Result<(), CollectiveError> {
    l.set_nonblocking(on).map_err(|e| CollectiveError::Io {
        context: "configure a listener",
        source: e,
    })
}

/// Blocking mode, no Nagle delay (collectives are latency-bound on small messages), read timeout.
fn prepare_stream(s: &TcpStream, read_timeout: Option<Duration>) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(read_timeout)
}

/// Time left before `deadline`, never zero (a zero timeout means "none" to some socket calls).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects to `addr`, retrying with backoff until `deadline`; returns the last error.
fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    let mut pause = Duration::from_millis(CONNECT_RETRY_MIN_MS);
    loop {
        let err = match TcpStream::connect_timeout(&addr, remaining(deadline)) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(err);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(CONNECT_RETRY_MAX_MS));
    }
}

/// Accepts one connection before `deadline`.
fn accept_until(l: &TcpListener, deadline: Instant) -> io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok(accepted) => return Ok(accepted),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection arrived in time",
                    ));
                }
                thread::sleep(Duration::from_millis(ACCEPT_POLL_INTERVAL_MS).min(deadline - now));
            }
            Err(e) => return Err(e),
        }
    }
}

/// An id that tells this rendezvous apart from earlier ones on the same address, so a connection
/// left over from a previous attempt is refused by the ring hello.
pub(crate) fn new_session_id(addr: SocketAddr) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = u64::from(std::process::id());
    crate::prng::mix64(nanos ^ (pid << 32) ^ u64::from(addr.port()))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(20);

    fn cfg(rank: u32, world_size: u32, port: u16) -> RendezvousConfig {
        RendezvousConfig {
            rank,
            world_size,
            master_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            master_port: port,
            bind_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            timeout: TEST_TIMEOUT,
            use_agent_store: false,
        }
    }

    /// Runs `f` on every rank of a ring of `world` threads; results by rank.
    fn run_ranks<T: Send + 'static>(
        world: u32,
        f: impl Fn(TcpRing) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let master = MasterListener::bind(cfg(0, world, 0)).unwrap();
        let port = master.local_addr().unwrap().port();
        let f = Arc::new(f);
        let mut handles = Vec::new();
        let f0 = Arc::clone(&f);
        handles.push(thread::spawn(move || f0(master.accept_ring().unwrap())));
        for rank in 1..world {
            let f = Arc::clone(&f);
            handles.push(thread::spawn(move || {
                f(TcpRing::connect(cfg(rank, world, port)).unwrap())
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Whole numbers, so f32 sums are exact in any order.
    fn f32_input(rank: u32, i: usize) -> f32 {
        ((i * 31 + rank as usize * 7) % 4093) as f32 - 2000.0
    }

    /// Large values, so the i64 sums wrap.
    fn i64_input(rank: u32, i: usize) -> i64 {
        (i as i64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as i64) ^ i64::from(rank)
    }

    /// Lengths around the segment size: one segment per chunk, several with a partial last one,
    /// uneven chunks; run in a row on one ring, longest first, so that reused send buffers of
    /// another length must be overwritten in full.
    fn segment_lengths(world: u32) -> Vec<usize> {
        let seg = ALL_REDUCE_SEGMENT_BYTES / 4;
        let w = world as usize;
        vec![3 * seg * w + 7, seg * w, seg * w - 1, seg + 1, 5]
    }

    #[test]
    fn segmented_all_reduce_gives_exact_sums_across_segment_boundaries() {
        for world in [2u32, 3, 5] {
            let got = run_ranks(world, move |mut ring| {
                let rank = ring.rank();
                let mut out = Vec::new();
                for len in segment_lengths(world) {
                    let mut f: Vec<f32> = (0..len).map(|i| f32_input(rank, i)).collect();
                    ring.all_reduce_sum_f32(&mut f).unwrap();
                    let mut n: Vec<i64> = (0..len).map(|i| i64_input(rank, i)).collect();
                    ring.all_reduce_sum_i64(&mut n).unwrap();
                    out.push((f, n));
                }
                ring.barrier().unwrap();
                out
            });
            for (rank, results) in got.iter().enumerate() {
                for (len, (f, n)) in segment_lengths(world).into_iter().zip(results) {
                    let want_f: Vec<f32> = (0..len)
                        .map(|i| (0..world).map(|r| f32_input(r, i)).sum())
                        .collect();
                    let want_n: Vec<i64> = (0..len)
                        .map(|i| (0..world).fold(0i64, |acc, r| acc.wrapping_add(i64_input(r, i))))
                        .collect();
                    assert!(*f == want_f, "world {world} rank {rank} len {len}: f32");
                    assert!(*n == want_n, "world {world} rank {rank} len {len}: i64");
                }
            }
        }
    }

    /// The segments cover the buffer in order, each within one chunk, a chunk's last one the only
    /// short one; the chunk's slots are its segments.
    #[test]
    fn segments_cut_each_chunk_in_order() {
        for (len, chunks, seg) in [
            (0, 2, 4),
            (5, 3, 4),
            (16, 4, 4),
            (17, 4, 4),
            (100, 3, 7),
            (3, 5, 2),
        ] {
            let mut buf: Vec<usize> = (0..len).collect();
            let segments = Segments::split(&mut buf, chunks, seg);
            let mut next = 0;
            for c in 0..chunks {
                let range = chunk_range(len, chunks, c);
                let slots = segments.of_chunk(c);
                assert_eq!(
                    slots.len(),
                    range.len().div_ceil(seg),
                    "{len} {chunks} {seg} chunk {c}"
                );
                for (k, i) in slots.enumerate() {
                    let segment = segments.slots[i].as_deref().unwrap();
                    let want: Vec<usize> = (range.start + k * seg
                        ..(range.start + (k + 1) * seg).min(range.end))
                        .collect();
                    assert_eq!(
                        segment,
                        &want[..],
                        "{len} {chunks} {seg} chunk {c} segment {k}"
                    );
                    next += segment.len();
                }
            }
            assert_eq!(next, len);
            assert_eq!(segments.slots.len(), *segments.chunk_starts.last().unwrap());
        }
    }

    /// A rank that dies in the middle of a large all-reduce's data, after the header: both of
    /// its neighbours fail with a lost peer instead of hanging. Which peer each names depends on
    /// which connection fails first (rank 0 reads from the dead rank, rank 1 writes to it, and
    /// each shuts its connections down as it fails), but the first to fail names rank 2.
    #[test]
    fn a_rank_that_dies_mid_way_through_a_large_all_reduce_fails_both_neighbours() {
        let len = 4 * LENDING_MIN_BYTES / 4;
        let errs = run_ranks(3, move |mut ring| {
            if ring.rank() == 2 {
                ring.start_op(OpKind::AllReduceSumF32, len as u64, 0)
                    .unwrap();
                // The header is out before this rank dies, so its neighbours fail in the data.
                ring.flush_sends().unwrap();
                let mut some = vec![0u8; ALL_REDUCE_SEGMENT_BYTES];
                ring.recv_into(&mut some, "test").unwrap();
                drop(ring);
                return None;
            }
            let err = ring.all_reduce_sum_f32(&mut vec![1.0; len]).unwrap_err();
            let later = ring.barrier().unwrap_err();
            assert!(matches!(later, CollectiveError::Broken { .. }), "{later}");
            Some(err)
        });
        let named: Vec<u32> = errs[..2]
            .iter()
            .map(|e| match e.as_ref().unwrap() {
                CollectiveError::PeerLost { rank, during, .. } => {
                    assert!(during.contains("all_reduce data"), "{during}");
                    *rank
                }
                other => panic!("expected a lost peer, got {other}"),
            })
            .collect();
        assert!(named.contains(&2), "{named:?}");
    }

    /// A neighbour that sent its header and then stops (never sends its data, never reads): the
    /// operation timeout ends a lending all-reduce in its data phase, naming that neighbour.
    #[test]
    fn op_timeout_ends_a_lending_all_reduce_whose_neighbour_stalls_after_the_header() {
        let len = 4 * LENDING_MIN_BYTES / 4;
        let errs = run_ranks(2, move |mut ring| {
            if ring.rank() == 1 {
                ring.start_op(OpKind::AllReduceSumF32, len as u64, 0)
                    .unwrap();
                ring.flush_sends().unwrap();
                thread::sleep(Duration::from_millis(1500));
                return None;
            }
            ring.set_op_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let started = Instant::now();
            let err = ring.all_reduce_sum_f32(&mut vec![1.0; len]).unwrap_err();
            Some((err, started.elapsed()))
        });
        let (err, took) = errs[0].as_ref().unwrap();
        match err {
            CollectiveError::PeerTimeout {
                rank: 1,
                during,
                timeout,
            } => {
                assert!(during.contains("all_reduce data"), "{during}");
                assert_eq!(*timeout, Duration::from_millis(200));
            }
            other => panic!("expected PeerTimeout from rank 1, got {other}"),
        }
        assert!(*took < Duration::from_millis(1400), "took {took:?}");
    }

    /// The lending path and the copying path give the same bits (the same order of summation) on
    /// the same random input, on every rank.
    #[test]
    fn lending_and_copying_all_reduces_give_identical_bits() {
        let len = LENDING_MIN_BYTES / 4 + 12_345;
        for world in [2u32, 3, 4] {
            let got = run_ranks(world, move |mut ring| {
                let mut rng = crate::prng::SplitMix64::new(0x5eed ^ u64::from(ring.rank()));
                let input: Vec<f32> = (0..len).map(|_| rng.next_signed_unit() * 1e3).collect();
                let mut lent = input.clone();
                ring.all_reduce_sum_f32(&mut lent).unwrap();
                let mut copied = input;
                ring.run_op(
                    (OpKind::AllReduceSumF32, len as u64, 0),
                    |r: &mut TcpRing| r.all_reduce_copying(&mut copied),
                )
                .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                (bits(&lent), bits(&copied))
            });
            for (rank, (lent, copied)) in got.iter().enumerate() {
                assert!(
                    lent == copied,
                    "world {world} rank {rank}: the paths differ"
                );
                assert!(
                    *lent == got[0].0,
                    "world {world} rank {rank}: differs from rank 0"
                );
            }
        }
    }

    /// The pool keeps segment buffers up to its byte budget and drops small ones.
    #[test]
    fn the_send_pool_stays_within_its_budget() {
        let pools = run_ranks(2, |mut ring| {
            // Below the size that lends the caller's buffer: this one goes through the pool.
            let mut buf = vec![1.0f32; LENDING_MIN_BYTES / 4 - 1];
            assert!(buf.len() * 4 > 2 * ALL_REDUCE_SEGMENT_BYTES);
            ring.all_reduce_sum_f32(&mut buf).unwrap();
            ring.barrier().unwrap();
            let link = ring.link.as_ref().unwrap();
            let caps: Vec<usize> = link.pool.iter().map(Vec::capacity).collect();
            (link.pool_bytes, caps)
        });
        for (bytes, caps) in pools {
            assert!(!caps.is_empty(), "segment buffers came back to the pool");
            assert_eq!(bytes, caps.iter().sum::<usize>());
            assert!(bytes <= SEND_BUFFER_POOL_MAX_BYTES);
            assert!(
                caps.iter().all(|&c| c >= SEND_BUFFER_POOL_MIN_BYTES),
                "{caps:?}"
            );
        }
    }
}
