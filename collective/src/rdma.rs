//! [`RdmaRing`]: the ring all-reduce over RDMA, reliable-connected queue pairs of libibverbs
//! (through `trainctl_ffi::verbs`, opened at run time; all `unsafe` stays in `ffi/`).
//!
//! # Bring-up ([`RdmaRing::connect`])
//!
//! 1. The host is checked before any peer waits on this rank: libibverbs, an RDMA device with an
//!    ACTIVE port ([`RdmaOptions`]: `TRAINCTL_RDMA_DEVICE`, else entry `LOCAL_RANK` of `NCCL_IB_HCA`, which
//!    trainctl's agent sets from discovery, else the first device with an ACTIVE port). None is
//!    [`CollectiveError::Unavailable`], naming what is missing.
//! 2. Each rank registers a work buffer and `SLOTS` receive slots of `SLOT_BYTES`, and creates two
//!    queue pairs: one towards the next rank (it writes data, receives credits) and one towards
//!    the previous rank (it receives data, writes credits).
//! 3. The ordinary rendezvous builds a TCP ring; over it every rank all-gathers its two
//!    [`QpInfo`] records (`bootstrap::all_gather_bytes`, 2 x 56 bytes), connects its queue pair
//!    to the next rank with that rank's "previous" record and the other with the previous rank's
//!    "next" record, and posts its receives. The TCP ring stays as the watchdog's control ring
//!    (`crate::watchdog`), as for NCCL.
//!
//! # An all-reduce
//!
//! The buffer is copied into the registered work buffer, then the plan of `rdma::plan` runs step
//! by step: post the step's writes while the credit window allows, and take completions:
//! a receipt is checked against the next expected immediate, added (reduce-scatter) or copied
//! (all-gather) from its slot into the work buffer, its receive is posted again and a credit goes
//! back; a credit opens the window. A step ends when its writes have completed and its receipts
//! are consumed (a receipt of a later step waits in its slot, uncredited, until then). The result
//! is copied back. The sum order is the TCP ring's, so results are bit-identical to it.
//!
//! Broadcast and barrier reuse the sum: the root's f32 bit patterns (other ranks adding zeros)
//! summed as i64, exactly; a barrier is a one-element sum.
//!
//! # What has run
//!
//! Everything up to the verbs calls is tested here: the plan, immediates and credits; the engine
//! (`Ring`, generic over `RcPair`) on every rank's thread over an in-memory model of RC
//! semantics, bit-identical to the TCP ring; the record exchange through a real rendezvous; the
//! device choice; the errors of a host without RDMA. The verbs calls under the engine
//! (`VerbsPair`) need an RDMA device and have not run on the development machine (README,
//! "Hardware support").

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use trainctl_ffi::verbs::{
    Access, CompletionQueue, MemoryRegion, PortState, QpInfo, QueuePair, Verbs, VerbsError,
    WorkCompletion, WriteWithImm,
};

use trainctl_ffi::verbs::qp::QP_INFO_BYTES;

use crate::bootstrap;
use crate::watchdog::{Watchdog, WatchdogLimits, Watched};
use crate::{AbortHandle, Collective, CollectiveError, RendezvousConfig, TcpRing};

mod plan;

use plan::{CreditWindow, Geometry, Imm, Phase, Step, Transfer};

/// The backend's name in messages.
const BACKEND: &str = "rdma";
/// Bytes per receive slot (one RDMA write at most).
pub const SLOT_BYTES: usize = 1 << 20;
/// Receive slots per rank: how many writes may be in flight towards it.
pub const SLOTS: usize = 4;
/// Bytes of the work buffer registered at bring-up; a larger all-reduce registers a larger one.
const INITIAL_WORK_BYTES: usize = 1 << 20;
/// Bytes of the buffer credits are written into.
const CREDIT_REGION_BYTES: usize = 64;
/// Bytes a credit writes: one, not zero, since some HCAs read a scatter entry of length 0 as
/// 2 GiB (mlx4/mlx5 data segments), and the request always carries one entry.
const CREDIT_WRITE_BYTES: usize = 1;
/// Default for [`RdmaOptions::heartbeat_timeout`].
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 60;
/// Default for [`RdmaOptions::op_timeout`].
pub const DEFAULT_OP_TIMEOUT_SECS: u64 = 600;

/// Work request ids: the kind in the top byte.
const WR_DATA: u64 = 1 << 56;
const WR_CREDIT: u64 = 2 << 56;
const WR_RECV_DATA: u64 = 3 << 56;
const WR_RECV_CREDIT: u64 = 4 << 56;
const WR_KIND_MASK: u64 = 0xff << 56;

/// How an [`RdmaRing`] is brought up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOptions {
    /// The device name (`mlx5_0`); `None`: the first device with an ACTIVE port.
    pub device: Option<String>,
    /// The port, from 1; `None`: the device's first ACTIVE port.
    pub port: Option<u8>,
    /// The GID index (RoCE v2 needs the right one; trainctl's agent sets `NCCL_IB_GID_INDEX`).
    pub gid_index: u32,
    /// Longest one operation may take before the watchdog aborts it; `None`: no limit.
    pub op_timeout: Option<Duration>,
    /// Longest a heartbeat round may take before the peers count as stuck.
    pub heartbeat_timeout: Duration,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            device: None,
            port: None,
            gid_index: 0,
            op_timeout: Some(Duration::from_secs(DEFAULT_OP_TIMEOUT_SECS)),
            heartbeat_timeout: Duration::from_secs(DEFAULT_HEARTBEAT_TIMEOUT_SECS),
        }
    }
}

impl RdmaOptions {
    /// Options from the environment, read through `get`: `TRAINCTL_RDMA_DEVICE` (`name` or
    /// `name:port`), else entry `LOCAL_RANK` (modulo the list's length) of `NCCL_IB_HCA` (NCCL's syntax: an optional `=` or
    /// `^` prefix, `name[:port]` entries separated by commas; an exclusion list `^...` names no
    /// device to use and is ignored); `NCCL_IB_GID_INDEX` for the GID index (default 0).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<RdmaOptions, String> {
        let mut opts = RdmaOptions::default();
        let chosen = match get("TRAINCTL_RDMA_DEVICE").filter(|v| !v.trim().is_empty()) {
            Some(v) => Some(("TRAINCTL_RDMA_DEVICE", v)),
            None => get("NCCL_IB_HCA")
                .filter(|v| !v.trim().is_empty() && !v.trim().starts_with('^'))
                .map(|v| ("NCCL_IB_HCA", v)),
        };
        if let Some((var, value)) = chosen {
            // The agent gives every local rank of a host the same NCCL_IB_HCA list (NCCL needs one
            // list per host); local ranks spread over it, LOCAL_RANK modulo its length.
            let entries: Vec<&str> = value.trim().trim_start_matches('=').split(',').collect();
            let local_rank = get("LOCAL_RANK")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let pick = if var == "NCCL_IB_HCA" {
                local_rank % entries.len()
            } else {
                0
            };
            let first = entries[pick].trim().to_owned();
            let (name, port) = match first.split_once(':') {
                Some((name, port)) => {
                    let port = port.parse::<u8>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!("{var}: port `{port}` in `{first}` is not valid: expected 1 to 255")
                    })?;
                    (name.to_owned(), Some(port))
                }
                None => (first.clone(), None),
            };
            if name.is_empty() {
                return Err(format!(
                    "{var}=`{value}` names no device: expected a device such as mlx5_0 or mlx5_0:1"
                ));
            }
            opts.device = Some(name);
            opts.port = port;
        }
        if let Some(v) = get("NCCL_IB_GID_INDEX").filter(|v| !v.trim().is_empty()) {
            opts.gid_index = v.trim().parse::<u32>().map_err(|_| {
                format!("NCCL_IB_GID_INDEX `{v}` is not valid: expected a whole number such as 3")
            })?;
        }
        Ok(opts)
    }
}

/// A port of a device, as [`choose_port`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortView {
    /// The device's name.
    pub(crate) device: String,
    /// The port number.
    pub(crate) port: u8,
    /// Whether the port is ACTIVE.
    pub(crate) active: bool,
}

/// The device and port to use, pure: the one asked for (which must exist and be ACTIVE), else
/// the first ACTIVE port of any device. The error says what exists.
pub(crate) fn choose_port(
    ports: &[PortView],
    device: Option<&str>,
    port: Option<u8>,
) -> Result<(String, u8), String> {
    let listing = || {
        if ports.is_empty() {
            "libibverbs lists no RDMA device on this host".to_owned()
        } else {
            let all: Vec<String> = ports
                .iter()
                .map(|p| {
                    format!(
                        "{}:{} {}",
                        p.device,
                        p.port,
                        if p.active { "ACTIVE" } else { "not active" }
                    )
                })
                .collect();
            format!("this host has {}", all.join(", "))
        }
    };
    let fits =
        |p: &&PortView| device.is_none_or(|d| p.device == d) && port.is_none_or(|n| p.port == n);
    match ports.iter().filter(fits).find(|p| p.active) {
        Some(p) => Ok((p.device.clone(), p.port)),
        None => {
            let wanted = match (device, port) {
                (Some(d), Some(n)) => format!("port {d}:{n} is not an ACTIVE RDMA port"),
                (Some(d), None) => format!("device {d} has no ACTIVE port"),
                (None, Some(n)) => format!("no device has an ACTIVE port {n}"),
                (None, None) => "no ACTIVE RDMA port".to_owned(),
            };
            Err(format!("{wanted}: {}", listing()))
        }
    }
}

/// Checks that this host can run the RDMA ring with `opts` (libibverbs, an ACTIVE port), without
/// meeting any peer; the error names what is missing.
pub fn check_host(opts: &RdmaOptions) -> Result<(), CollectiveError> {
    open_port(opts).map(|_| ())
}

/// Opens libibverbs and the device and port to use, or says what is missing.
fn open_port(
    opts: &RdmaOptions,
) -> Result<(Arc<Verbs>, trainctl_ffi::verbs::Context, u8), CollectiveError> {
    let unavailable = |missing: String| CollectiveError::Unavailable {
        backend: BACKEND,
        missing,
    };
    let verbs = Verbs::open().map_err(|e| unavailable(e.to_string()))?;
    let devices = verbs.devices().map_err(|e| unavailable(e.to_string()))?;
    let mut ports = Vec::new();
    for entry in devices.iter() {
        let Ok(ctx) = devices.open(entry.index) else {
            continue;
        };
        let count = ctx.query_device().map(|a| a.port_count).unwrap_or(0);
        for port in 1..=count {
            if let Ok(attrs) = ctx.query_port(port) {
                ports.push(PortView {
                    device: entry.name.clone(),
                    port,
                    active: attrs.state == PortState::Active,
                });
            }
        }
    }
    let (device, port) = choose_port(&ports, opts.device.as_deref(), opts.port).map_err(|e| {
        unavailable(format!(
            "{e}{}; use --transport tcp, or run where an RDMA device is up",
            if devices.kernel_has_rdma() {
                ""
            } else {
                " (the kernel has no RDMA support loaded)"
            }
        ))
    })?;
    let ctx = devices
        .open_by_name(&device)
        .map_err(|e| unavailable(e.to_string()))?;
    Ok((verbs, ctx, port))
}

fn verbs_err(during: &'static str) -> impl Fn(VerbsError) -> CollectiveError {
    move |e| CollectiveError::Device {
        backend: BACKEND,
        during,
        source: Box::new(e),
    }
}

/// What the watchdog aborts: a flag the completion loop checks.
struct AbortFlag(AtomicBool);

impl Watched for AbortFlag {
    fn async_error(&self) -> Option<String> {
        None
    }
    fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn no_init_to_interrupt(_reason: &str) {
    // The queue pairs are connected before the watchdog starts: nothing blocks in between.
}

/// A [`Collective`] over RDMA writes with immediate between RC queue pairs (module docs).
pub struct RdmaRing {
    rank: u32,
    world_size: u32,
    link: Option<Ring<VerbsPair>>,
    watchdog: Watchdog,
    abort: Arc<AbortFlag>,
    broken: Option<String>,
}

/// What the ring engine ([`Ring`]) needs of a rank's two RC connections: RDMA verbs in
/// production ([`VerbsPair`]), an in-memory model of RC semantics in the tests.
pub(crate) trait RcPair {
    /// The work buffer, grown to at least `bytes` (registered anew when larger).
    fn work(&mut self, bytes: usize) -> Result<&mut [u8], CollectiveError>;
    /// `len` bytes of the receive slots from `slot_start`, and the work bytes `local`, together.
    fn slot_and_work(
        &mut self,
        slot_start: usize,
        len: usize,
        local: Range<usize>,
    ) -> (&[u8], &mut [u8]);
    /// An RDMA write with immediate of the work bytes `local` to `remote_offset` of the next
    /// rank's receive slots.
    fn write_data(
        &self,
        local: Range<usize>,
        remote_offset: u64,
        imm: u32,
        wr_id: u64,
    ) -> Result<(), CollectiveError>;
    /// A one-byte write with a credit immediate to the previous rank.
    fn write_credit(&self, imm: u32, wr_id: u64) -> Result<(), CollectiveError>;
    /// A receive for the previous rank's next data write.
    fn post_data_recv(&self, wr_id: u64) -> Result<(), CollectiveError>;
    /// A receive for the next rank's next credit.
    fn post_credit_recv(&self, wr_id: u64) -> Result<(), CollectiveError>;
    /// The completions that arrived, without waiting.
    fn poll(&self) -> Result<Vec<WorkCompletion>, CollectiveError>;
}

/// A rank's two RC queue pairs and registered memory (world of two or more).
struct VerbsPair {
    pd: trainctl_ffi::verbs::ProtectionDomain,
    cq: CompletionQueue,
    /// Towards the next rank: data out, credits in.
    to_next: QueuePair,
    /// Towards the previous rank: data in, credits out.
    to_prev: QueuePair,
    /// The next rank's receive slots (its `to_prev` record).
    next_slots: QpInfo,
    /// The previous rank's credit region (its `to_next` record).
    prev_credit: QpInfo,
    work: MemoryRegion,
    slots: MemoryRegion,
    credit: MemoryRegion,
}

/// The ring all-reduce engine of one rank over an [`RcPair`]: the plan, credits and receipts.
pub(crate) struct Ring<P> {
    pair: P,
    rank: u32,
    prev_rank: u32,
    world: u32,
    slots: usize,
    slot_bytes: usize,
    /// Writes to the next rank not yet credited back; spans operations.
    window: CreditWindow,
    /// Data writes made to the next rank, all operations together.
    writes_total: u64,
    /// Receipts from the previous rank, all operations together.
    receipts_total: u64,
    /// The immediates of receipts that arrived for a later step (or operation), still in their
    /// slots; checked against the plan when their step comes.
    ahead: VecDeque<u32>,
}

impl std::fmt::Debug for RdmaRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaRing")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl RdmaRing {
    /// Brings up this rank (module docs).
    pub fn connect(
        rdzv: RendezvousConfig,
        opts: &RdmaOptions,
    ) -> Result<RdmaRing, CollectiveError> {
        let (_verbs, ctx, port) = open_port(opts)?;
        let mut control = TcpRing::connect(rdzv)?;
        let (rank, world_size) = (control.rank(), control.world_size());
        let link = if world_size > 1 {
            let pair = VerbsPair::connect(&ctx, port, opts.gid_index, &mut control)?;
            Some(Ring::new(pair, rank, world_size, SLOTS, SLOT_BYTES))
        } else {
            None
        };
        let limits = WatchdogLimits {
            op_timeout: opts.op_timeout,
            heartbeat_timeout: opts.heartbeat_timeout,
        };
        let watchdog = Watchdog::start(control, limits, no_init_to_interrupt)?;
        let abort = Arc::new(AbortFlag(AtomicBool::new(false)));
        watchdog.watch(abort.clone());
        Ok(RdmaRing {
            rank,
            world_size,
            link,
            watchdog,
            abort,
            broken: None,
        })
    }

    /// Ends the ring in order: waits (up to a minute) until every rank has finished too. True
    /// when every rank finished.
    pub fn finish(self) -> bool {
        self.watchdog.finish(Duration::from_secs(60))
    }

    fn run_op(
        &mut self,
        op: impl FnOnce(&mut Ring<VerbsPair>, &AbortFlag) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken {
                cause: cause.clone(),
            });
        }
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        self.watchdog.op_started();
        let result = op(link, &self.abort);
        self.watchdog.op_finished();
        let result = match (result, self.watchdog.aborted()) {
            (_, Some(reason)) => Err(CollectiveError::Aborted { reason }),
            (result, None) => result,
        };
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            self.watchdog.fail();
        }
        result
    }
}

/// An element type the RDMA ring sums: its little-endian bytes and its addition (the TCP ring's).
trait Elem: Copy + Default {
    const SIZE: usize;
    fn put_le(self, dst: &mut [u8]);
    fn get_le(src: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn put_le(self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.to_le_bytes());
    }
    fn get_le(src: &[u8]) -> Self {
        f32::from_le_bytes([src[0], src[1], src[2], src[3]])
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Elem for i64 {
    const SIZE: usize = 8;
    fn put_le(self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.to_le_bytes());
    }
    fn get_le(src: &[u8]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(src);
        i64::from_le_bytes(b)
    }
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
}

/// Adds (reduce-scatter) or copies (all-gather) the receipt's slot bytes into the work bytes.
fn consume<T: Elem>(phase: Phase, slot: &[u8], dst: &mut [u8]) {
    match phase {
        Phase::ReduceScatter => {
            for (d, s) in dst
                .chunks_exact_mut(T::SIZE)
                .zip(slot.chunks_exact(T::SIZE))
            {
                T::get_le(d).add(T::get_le(s)).put_le(d);
            }
        }
        Phase::AllGather => dst.copy_from_slice(&slot[..dst.len()]),
    }
}

impl VerbsPair {
    /// Registers memory, creates both queue pairs, exchanges their records over `control`,
    /// connects them and posts every receive; returns once every rank has done so.
    fn connect(
        ctx: &trainctl_ffi::verbs::Context,
        port: u8,
        gid_index: u32,
        control: &mut TcpRing,
    ) -> Result<VerbsPair, CollectiveError> {
        let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        let port_attrs = ctx
            .query_port(port)
            .map_err(verbs_err("querying the RDMA port"))?;
        let pd = ctx
            .alloc_pd()
            .map_err(verbs_err("allocating a protection domain"))?;
        let cq = ctx
            .create_cq((4 * SLOTS + 8) as u32)
            .map_err(verbs_err("creating a completion queue"))?;
        let work = pd
            .register(INITIAL_WORK_BYTES, access)
            .map_err(verbs_err("registering the work buffer"))?;
        let slots = pd
            .register(SLOTS * SLOT_BYTES, access)
            .map_err(verbs_err("registering the receive slots"))?;
        let credit = pd
            .register(CREDIT_REGION_BYTES, access)
            .map_err(verbs_err("registering the credit region"))?;
        let qp = |what| {
            pd.create_rc_qp(&cq, &cq, (2 * SLOTS) as u32, (2 * SLOTS) as u32)
                .map_err(verbs_err(what))
        };
        let to_next = qp("creating the queue pair to the next rank")?;
        let to_prev = qp("creating the queue pair to the previous rank")?;
        // The previous rank writes data into our slots through `to_prev`; the next rank writes
        // credits into our credit region through `to_next`.
        let prev_record = to_prev
            .local_info(port, gid_index, &slots)
            .map_err(verbs_err("reading the local queue pair record"))?;
        let next_record = to_next
            .local_info(port, gid_index, &credit)
            .map_err(verbs_err("reading the local queue pair record"))?;
        let mut mine = Vec::with_capacity(2 * QP_INFO_BYTES);
        mine.extend_from_slice(&prev_record.encode());
        mine.extend_from_slice(&next_record.encode());
        let all = bootstrap::all_gather_bytes(control, &mine)?;
        let (rank, world) = (control.rank() as usize, control.world_size() as usize);
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let (next_slots, prev_credit) =
            peer_records(&all, next, prev).map_err(|detail| CollectiveError::Device {
                backend: BACKEND,
                during: "exchanging queue pair records",
                source: detail.into(),
            })?;
        let mtu = port_attrs
            .active_mtu
            .unwrap_or(trainctl_ffi::verbs::Mtu::B1024);
        to_next
            .connect(port, gid_index, mtu, &next_slots)
            .map_err(verbs_err("connecting the queue pair to the next rank"))?;
        to_prev
            .connect(port, gid_index, mtu, &prev_credit)
            .map_err(verbs_err("connecting the queue pair to the previous rank"))?;
        for i in 0..SLOTS as u64 {
            to_prev
                .post_recv(WR_RECV_DATA | i)
                .map_err(verbs_err("posting receives"))?;
            to_next
                .post_recv(WR_RECV_CREDIT | i)
                .map_err(verbs_err("posting receives"))?;
        }
        // Every rank's receives are posted before any rank writes: one more round on the ring.
        control.barrier()?;
        Ok(VerbsPair {
            pd,
            cq,
            to_next,
            to_prev,
            next_slots,
            prev_credit,
            work,
            slots,
            credit,
        })
    }
}

impl RcPair for VerbsPair {
    fn work(&mut self, bytes: usize) -> Result<&mut [u8], CollectiveError> {
        if self.work.len() < bytes {
            self.work = self
                .pd
                .register(bytes, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
                .map_err(verbs_err("registering a larger work buffer"))?;
        }
        Ok(self
            .work
            .bytes_mut()
            .expect("a registered buffer of its own"))
    }

    fn slot_and_work(
        &mut self,
        slot_start: usize,
        len: usize,
        local: Range<usize>,
    ) -> (&[u8], &mut [u8]) {
        let slots = self.slots.bytes().expect("a registered buffer of its own");
        let work = self
            .work
            .bytes_mut()
            .expect("a registered buffer of its own");
        (&slots[slot_start..slot_start + len], &mut work[local])
    }

    fn write_data(
        &self,
        local: Range<usize>,
        remote_offset: u64,
        imm: u32,
        wr_id: u64,
    ) -> Result<(), CollectiveError> {
        self.to_next
            .post_write_with_imm(
                &self.work,
                &self.next_slots,
                WriteWithImm {
                    wr_id,
                    local_offset: local.start,
                    len: local.len(),
                    remote_offset,
                    imm,
                },
            )
            .map_err(verbs_err("posting an RDMA write to the next rank"))
    }

    fn write_credit(&self, imm: u32, wr_id: u64) -> Result<(), CollectiveError> {
        self.to_prev
            .post_write_with_imm(
                &self.credit,
                &self.prev_credit,
                WriteWithImm {
                    wr_id,
                    local_offset: 0,
                    len: CREDIT_WRITE_BYTES,
                    remote_offset: 0,
                    imm,
                },
            )
            .map_err(verbs_err("posting a credit to the previous rank"))
    }

    fn post_data_recv(&self, wr_id: u64) -> Result<(), CollectiveError> {
        self.to_prev
            .post_recv(wr_id)
            .map_err(verbs_err("posting a receive"))
    }

    fn post_credit_recv(&self, wr_id: u64) -> Result<(), CollectiveError> {
        self.to_next
            .post_recv(wr_id)
            .map_err(verbs_err("posting a receive"))
    }

    fn poll(&self) -> Result<Vec<WorkCompletion>, CollectiveError> {
        self.cq.poll().map_err(verbs_err("polling completions"))
    }
}

impl<P: RcPair> Ring<P> {
    /// The engine of `rank` in a world of `world` over `pair`, whose receives are posted, with
    /// `slots` receive slots of `slot_bytes` on every rank.
    pub(crate) fn new(pair: P, rank: u32, world: u32, slots: usize, slot_bytes: usize) -> Ring<P> {
        Ring {
            pair,
            rank,
            prev_rank: (rank + world - 1) % world,
            world,
            slots,
            slot_bytes,
            window: CreditWindow::new(slots),
            writes_total: 0,
            receipts_total: 0,
            ahead: VecDeque::new(),
        }
    }

    /// The ring all-reduce of `buf` (module docs).
    fn all_reduce<T: Elem>(
        &mut self,
        buf: &mut [T],
        abort: &AbortFlag,
    ) -> Result<(), CollectiveError> {
        let bytes = buf.len() * T::SIZE;
        if bytes == 0 {
            return Ok(());
        }
        let geometry = Geometry {
            len: buf.len(),
            elem_bytes: T::SIZE,
            slot_bytes: self.slot_bytes,
            slots: self.slots,
            write_base: self.writes_total,
            receipt_base: self.receipts_total,
        };
        let steps =
            plan::plan(self.rank as usize, self.world as usize, &geometry).map_err(|e| {
                CollectiveError::Unsupported {
                    backend: BACKEND,
                    what: e.to_string(),
                    accepted: "buffers whose chunks fit 65536 slots",
                }
            })?;
        let work = self.pair.work(bytes)?;
        for (v, dst) in buf.iter().zip(work.chunks_exact_mut(T::SIZE)) {
            v.put_le(dst);
        }
        for step in &steps {
            self.run_step::<T>(step, abort)?;
            self.writes_total += step.writes.len() as u64;
            self.receipts_total += step.receipts.len() as u64;
        }
        debug_assert!(self.window.outstanding() <= self.slots as u64);
        let work = self.pair.work(bytes)?;
        for (v, src) in buf.iter_mut().zip(work.chunks_exact(T::SIZE)) {
            *v = T::get_le(src);
        }
        Ok(())
    }

    fn run_step<T: Elem>(&mut self, step: &Step, abort: &AbortFlag) -> Result<(), CollectiveError> {
        let mut next_write = 0;
        let mut writes_done = 0;
        let mut consumed = 0;
        // Receipts of this step that arrived while an earlier step ran.
        let mut arrived = 0;
        while arrived < step.receipts.len() {
            let Some(imm) = self.ahead.pop_front() else {
                break;
            };
            check_receipt(
                Some(imm),
                Some(step.receipts[arrived].imm),
                self.rank,
                self.prev_rank,
            )?;
            arrived += 1;
        }
        while writes_done < step.writes.len() || consumed < step.receipts.len() {
            if abort.0.load(Ordering::SeqCst) {
                return Err(CollectiveError::Aborted {
                    reason: "aborted by the watchdog".to_owned(),
                });
            }
            while next_write < step.writes.len() && self.window.can_send() {
                let t = &step.writes[next_write];
                let remote = (t.slot * self.slot_bytes) as u64;
                self.pair.write_data(
                    t.local.clone(),
                    remote,
                    t.imm,
                    WR_DATA | next_write as u64,
                )?;
                self.window.on_send();
                next_write += 1;
            }
            while consumed < arrived {
                self.consume_receipt::<T>(&step.receipts[consumed])?;
                consumed += 1;
            }
            for wc in self.pair.poll()? {
                match wc.wr_id & WR_KIND_MASK {
                    WR_DATA => writes_done += 1,
                    WR_CREDIT => {}
                    WR_RECV_DATA => match (step.receipts.get(arrived), wc.imm_data) {
                        (Some(t), imm) => {
                            check_receipt(imm, Some(t.imm), self.rank, self.prev_rank)?;
                            arrived += 1;
                        }
                        // Data of a later step: it waits in its slot, uncredited.
                        (None, Some(imm)) => self.ahead.push_back(imm),
                        (None, None) => check_receipt(None, None, self.rank, self.prev_rank)?,
                    },
                    WR_RECV_CREDIT => {
                        let credit = match wc.imm_data.map(Imm::decode) {
                            Some(Imm::Credit { slots }) => slots,
                            other => {
                                return Err(protocol(format!(
                                    "expected a credit from the next rank, got {other:?}"
                                )))
                            }
                        };
                        self.window
                            .on_credit(credit)
                            .map_err(|e| protocol(e.to_string()))?;
                        self.pair.post_credit_recv(wc.wr_id)?;
                    }
                    other => {
                        return Err(protocol(format!(
                            "a completion with unknown work request id {other:#x}"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Consumes one receipt: slot into the work buffer, receive re-posted, credit sent back.
    fn consume_receipt<T: Elem>(&mut self, t: &Transfer) -> Result<(), CollectiveError> {
        let (slot, work) =
            self.pair
                .slot_and_work(t.slot * self.slot_bytes, t.local.len(), t.local.clone());
        consume::<T>(t.phase, slot, work);
        self.pair.post_data_recv(WR_RECV_DATA | t.slot as u64)?;
        self.pair
            .write_credit(Imm::Credit { slots: 1 }.encode(), WR_CREDIT | t.slot as u64)
    }
}

/// Checks a data receipt's immediate (`None`: the write carried none) against the one expected
/// next (`None`: nothing more was expected).
fn check_receipt(
    got: Option<u32>,
    expected: Option<u32>,
    rank: u32,
    prev: u32,
) -> Result<(), CollectiveError> {
    match (got, expected) {
        (Some(got), Some(want)) if got == want => Ok(()),
        (got, want) => Err(CollectiveError::OpMismatch {
            rank,
            peer: prev,
            ours: format!(
                "an all-reduce expecting {}",
                want.map_or("nothing more".to_owned(), |w| Imm::decode(w).to_string())
            ),
            theirs: format!(
                "one that wrote {}",
                got.map_or("no immediate".to_owned(), |g| Imm::decode(g).to_string())
            ),
        }),
    }
}

/// A peer broke the RDMA ring's protocol (a credit or completion that cannot happen).
fn protocol(detail: String) -> CollectiveError {
    CollectiveError::Device {
        backend: BACKEND,
        during: "running the all-reduce",
        source: detail.into(),
    }
}

/// The next rank's "previous" record (its receive slots) and the previous rank's "next" record
/// (its credit region), from every rank's two records.
fn peer_records(all: &[Vec<u8>], next: usize, prev: usize) -> Result<(QpInfo, QpInfo), String> {
    let record = |rank: usize, which: usize| {
        let bytes = all
            .get(rank)
            .and_then(|r| r.get(which * QP_INFO_BYTES..(which + 1) * QP_INFO_BYTES))
            .ok_or_else(|| format!("rank {rank} sent no queue pair record"))?;
        QpInfo::decode(bytes).map_err(|e| format!("rank {rank}'s queue pair record: {e}"))
    };
    Ok((record(next, 0)?, record(prev, 1)?))
}

impl Collective for RdmaRing {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.run_op(|ring, abort| ring.all_reduce(buf, abort))
    }

    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CollectiveError> {
        self.run_op(|ring, abort| ring.all_reduce(buf, abort))
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: u32) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidRoot {
                root,
                world_size: self.world_size,
            });
        }
        let mine = self.rank == root;
        let mut bits: Vec<i64> = buf
            .iter()
            .map(|v| if mine { i64::from(v.to_bits()) } else { 0 })
            .collect();
        self.all_reduce_sum_i64(&mut bits)?;
        for (v, b) in buf.iter_mut().zip(bits) {
            *v = f32::from_bits(b as u32);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_sum_i64(&mut [0])
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(AbortHandle::new(self.watchdog.abort_fn()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn options_come_from_trainctls_and_ncclss_variables() {
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            Result<(Option<&'a str>, Option<u8>, u32), &'a str>,
        );
        let cases: &[Case] = &[
            (&[], Ok((None, None, 0))),
            (
                &[("NCCL_IB_HCA", "mlx5_2:1,mlx5_3:1")],
                Ok((Some("mlx5_2"), Some(1), 0)),
            ),
            (&[("NCCL_IB_HCA", "=mlx5_0")], Ok((Some("mlx5_0"), None, 0))),
            // Local ranks spread over the host's list.
            (
                &[("NCCL_IB_HCA", "=mlx5_2:1,mlx5_3:1"), ("LOCAL_RANK", "1")],
                Ok((Some("mlx5_3"), Some(1), 0)),
            ),
            (
                &[("NCCL_IB_HCA", "=mlx5_2:1,mlx5_3:1"), ("LOCAL_RANK", "2")],
                Ok((Some("mlx5_2"), Some(1), 0)),
            ),
            (
                &[("TRAINCTL_RDMA_DEVICE", "rxe0"), ("LOCAL_RANK", "3")],
                Ok((Some("rxe0"), None, 0)),
            ),
            // An exclusion list names nothing to use.
            (&[("NCCL_IB_HCA", "^mlx5_1")], Ok((None, None, 0))),
            (
                &[
                    ("TRAINCTL_RDMA_DEVICE", "rxe0:2"),
                    ("NCCL_IB_HCA", "mlx5_0"),
                ],
                Ok((Some("rxe0"), Some(2), 0)),
            ),
            (&[("NCCL_IB_GID_INDEX", "3")], Ok((None, None, 3))),
            (
                &[("NCCL_IB_GID_INDEX", "x")],
                Err("NCCL_IB_GID_INDEX `x` is not valid"),
            ),
            (
                &[("TRAINCTL_RDMA_DEVICE", "mlx5_0:0")],
                Err("TRAINCTL_RDMA_DEVICE: port `0`"),
            ),
            (
                &[("NCCL_IB_HCA", ":1")],
                Err("NCCL_IB_HCA=`:1` names no device"),
            ),
        ];
        for (vars, want) in cases {
            let got = RdmaOptions::from_env(env(vars));
            match (&got, want) {
                (Ok(o), Ok((device, port, gid))) => {
                    assert_eq!(
                        (o.device.as_deref(), o.port, o.gid_index),
                        (*device, *port, *gid),
                        "{vars:?}"
                    )
                }
                (Err(e), Err(prefix)) => assert!(e.starts_with(prefix), "{vars:?}: {e}"),
                _ => panic!("{vars:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn port(device: &str, port: u8, active: bool) -> PortView {
        PortView {
            device: device.to_owned(),
            port,
            active,
        }
    }

    #[test]
    fn the_port_is_the_one_asked_for_or_the_first_active_one() {
        let host = [
            port("mlx5_0", 1, false),
            port("mlx5_1", 1, true),
            port("mlx5_1", 2, true),
        ];
        type Case<'a> = (
            &'a [PortView],
            Option<&'a str>,
            Option<u8>,
            Result<(&'a str, u8), &'a str>,
        );
        let cases: &[Case] = &[
            (&host, None, None, Ok(("mlx5_1", 1))),
            (&host, Some("mlx5_1"), Some(2), Ok(("mlx5_1", 2))),
            (&host, None, Some(2), Ok(("mlx5_1", 2))),
            (
                &host,
                Some("mlx5_0"),
                None,
                Err("device mlx5_0 has no ACTIVE port: this host has mlx5_0:1 not active, mlx5_1:1 ACTIVE, mlx5_1:2 ACTIVE"),
            ),
            (&host, Some("mlx5_9"), Some(1), Err("port mlx5_9:1 is not an ACTIVE RDMA port")),
            (&[], None, None, Err("no ACTIVE RDMA port: libibverbs lists no RDMA device on this host")),
        ];
        for (ports, device, p, want) in cases {
            let got = choose_port(ports, *device, *p);
            match (&got, want) {
                (Ok((d, n)), Ok((wd, wn))) => assert_eq!((d.as_str(), *n), (*wd, *wn)),
                (Err(e), Err(prefix)) => assert!(e.starts_with(prefix), "{e}"),
                _ => panic!("{device:?} {p:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn record(qpn: u32, rkey: u32) -> QpInfo {
        QpInfo {
            port: 1,
            lid: 7,
            gid: trainctl_ffi::verbs::Gid([0; 16]),
            gid_index: 0,
            mtu: trainctl_ffi::verbs::Mtu::B4096,
            qpn,
            psn: 5,
            addr: 0x1000,
            len: (SLOTS * SLOT_BYTES) as u64,
            rkey,
        }
    }

    #[test]
    fn queue_pair_records_travel_through_the_rendezvous_and_pair_up() {
        use crate::testing::{run_ranks, Path};
        // Rank r publishes (prev record: qpn 100 + r, next record: qpn 200 + r), as Link::connect
        // does, through the real rendezvous; each rank must pick its next rank's "prev" record
        // and its previous rank's "next" record.
        let picked = run_ranks(3, Path::Store, |mut ring| {
            let r = ring.rank();
            let mut mine = record(100 + r, 1).encode().to_vec();
            mine.extend_from_slice(&record(200 + r, 2).encode());
            let all = bootstrap::all_gather_bytes(&mut ring, &mine).unwrap();
            let (n, p) = ((r as usize + 1) % 3, (r as usize + 2) % 3);
            let (next, prev) = peer_records(&all, n, p).unwrap();
            (next.qpn, prev.qpn)
        });
        assert_eq!(picked, vec![(101, 202), (102, 200), (100, 201)]);
    }

    #[test]
    fn a_bad_record_names_the_rank_that_sent_it() {
        let good = [record(1, 1).encode(), record(2, 2).encode()].concat();
        let mut bad = good.clone();
        bad[0] = b'X';
        let err = peer_records(&[good.clone(), bad], 1, 0).unwrap_err();
        assert!(
            err.starts_with("rank 1's queue pair record: a queue pair record starts with"),
            "{err}"
        );
        let err = peer_records(&[good], 1, 0).unwrap_err();
        assert_eq!(err, "rank 1 sent no queue pair record");
    }

    #[test]
    fn receipts_are_checked_against_the_plan() {
        let data = |step, segment| {
            Imm::Data {
                phase: Phase::ReduceScatter,
                step,
                segment,
            }
            .encode()
        };
        let check = |got, want| check_receipt(got, want, 2, 1);
        assert!(check(Some(data(1, 0)), Some(data(1, 0))).is_ok());
        let err = check(Some(data(1, 1)), Some(data(1, 0)))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "collective mismatch: this rank (rank 2) called an all-reduce expecting ReduceScatter step 1 segment 0 but rank 1 called one that wrote ReduceScatter step 1 segment 1; every rank must call the same collectives in the same order with the same lengths"
        );
        assert!(check(None, Some(data(0, 0))).is_err());
        assert!(check(Some(Imm::Credit { slots: 1 }.encode()), Some(data(0, 0))).is_err());
        assert!(check(Some(data(0, 0)), None).is_err());
    }

    #[test]
    fn receipts_add_in_the_reduce_scatter_and_copy_in_the_all_gather() {
        let slot: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut work: Vec<u8> = [1.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        consume::<f32>(Phase::ReduceScatter, &slot, &mut work);
        assert_eq!(
            work,
            [2.5f32, 2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        consume::<f32>(Phase::AllGather, &slot, &mut work);
        assert_eq!(work, slot);
        let mut ints: Vec<u8> = i64::MAX.to_le_bytes().to_vec();
        consume::<i64>(Phase::ReduceScatter, &1i64.to_le_bytes(), &mut ints);
        assert_eq!(ints, i64::MIN.to_le_bytes(), "wrapping, as the TCP ring");
    }

    #[test]
    fn without_an_rdma_device_connect_names_what_is_missing() {
        let devices = Verbs::open()
            .ok()
            .and_then(|v| v.devices().ok().map(|d| d.len()));
        if devices.is_some_and(|n| n > 0) {
            return crate::testing::skip("this host has an RDMA device: the error cannot be seen");
        }
        let rdzv = RendezvousConfig {
            rank: 0,
            world_size: 2,
            master_addr: [127, 0, 0, 1].into(),
            master_port: 1,
            bind_addr: [127, 0, 0, 1].into(),
            timeout: Duration::from_millis(10),
            use_agent_store: false,
        };
        // The host is checked before the rendezvous: no peer is waited for.
        let err = RdmaRing::connect(rdzv, &RdmaOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::Unavailable {
                    backend: "rdma",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("the rdma backend cannot run on this host: "),
            "{msg}"
        );
        assert!(msg.contains("--transport tcp"), "{msg}");
    }

    /// The ring engine over an in-memory model of two RC connections per rank: writes land at
    /// once, in order, each consuming a receive the reader posted (none posted is an error, as
    /// a receiver-not-ready would be), and a write into a slot the reader has not consumed yet
    /// is an error. Every rank runs the real `Ring` on its own thread.
    mod engine {
        use std::sync::mpsc;
        use std::sync::Mutex;

        use super::*;

        /// One rank's end of the fabric, shared with its neighbours.
        struct End {
            slots: Mutex<Vec<u8>>,
            full: Mutex<Vec<bool>>,
            cq: Mutex<VecDeque<WorkCompletion>>,
            data_recvs: Mutex<VecDeque<u64>>,
            credit_recvs: Mutex<VecDeque<u64>>,
        }

        struct FakePair {
            me: Arc<End>,
            next: Arc<End>,
            prev: Arc<End>,
            work: Vec<u8>,
            scratch: Vec<u8>,
            slot_bytes: usize,
        }

        fn completion(wr_id: u64, opcode: u32, imm: Option<u32>) -> WorkCompletion {
            WorkCompletion {
                wr_id,
                opcode,
                byte_len: 0,
                imm_data: imm,
                qp_num: 0,
            }
        }

        fn fault(what: String) -> CollectiveError {
            protocol(format!("fake fabric: {what}"))
        }

        /// A write with immediate arrives: the receiver's posted receive `recv` completes with
        /// `imm` on its CQ, and the sender's write `wr_id` on the sender's.
        fn complete_write(receiver: &End, recv: u64, imm: u32, sender: &End, wr_id: u64) {
            receiver.cq.lock().unwrap().push_back(completion(
                recv,
                WorkCompletion::OPCODE_RECV_RDMA_WITH_IMM,
                Some(imm),
            ));
            sender.cq.lock().unwrap().push_back(completion(
                wr_id,
                WorkCompletion::OPCODE_RDMA_WRITE,
                None,
            ));
        }

        impl RcPair for FakePair {
            fn work(&mut self, bytes: usize) -> Result<&mut [u8], CollectiveError> {
                if self.work.len() < bytes {
                    self.work.resize(bytes, 0);
                }
                Ok(&mut self.work)
            }

            fn slot_and_work(
                &mut self,
                slot_start: usize,
                len: usize,
                local: Range<usize>,
            ) -> (&[u8], &mut [u8]) {
                self.scratch.clear();
                self.scratch.extend_from_slice(
                    &self.me.slots.lock().unwrap()[slot_start..slot_start + len],
                );
                (&self.scratch, &mut self.work[local])
            }

            fn write_data(
                &self,
                local: Range<usize>,
                remote_offset: u64,
                imm: u32,
                wr_id: u64,
            ) -> Result<(), CollectiveError> {
                let start = remote_offset as usize;
                let slot = start / self.slot_bytes;
                let recv = self
                    .next
                    .data_recvs
                    .lock()
                    .unwrap()
                    .pop_front()
                    .ok_or_else(|| {
                        fault("a data write found no receive posted (receiver not ready)".into())
                    })?;
                {
                    let mut full = self.next.full.lock().unwrap();
                    if full[slot] {
                        return Err(fault(format!(
                            "slot {slot} overwritten before it was consumed"
                        )));
                    }
                    full[slot] = true;
                }
                self.next.slots.lock().unwrap()[start..start + local.len()]
                    .copy_from_slice(&self.work[local]);
                complete_write(&self.next, recv, imm, &self.me, wr_id);
                Ok(())
            }

            fn write_credit(&self, imm: u32, wr_id: u64) -> Result<(), CollectiveError> {
                // The credit for a slot goes out once the slot is consumed.
                let slot = (wr_id & !WR_KIND_MASK) as usize;
                self.me.full.lock().unwrap()[slot] = false;
                let recv = self
                    .prev
                    .credit_recvs
                    .lock()
                    .unwrap()
                    .pop_front()
                    .ok_or_else(|| {
                        fault("a credit found no receive posted (receiver not ready)".into())
                    })?;
                complete_write(&self.prev, recv, imm, &self.me, wr_id);
                Ok(())
            }

            fn post_data_recv(&self, wr_id: u64) -> Result<(), CollectiveError> {
                self.me.data_recvs.lock().unwrap().push_back(wr_id);
                Ok(())
            }

            fn post_credit_recv(&self, wr_id: u64) -> Result<(), CollectiveError> {
                self.me.credit_recvs.lock().unwrap().push_back(wr_id);
                Ok(())
            }

            fn poll(&self) -> Result<Vec<WorkCompletion>, CollectiveError> {
                let mut cq = self.me.cq.lock().unwrap();
                let n = cq.len().min(trainctl_ffi::verbs::POLL_BATCH);
                let batch = cq.drain(..n).collect();
                drop(cq);
                std::thread::yield_now();
                Ok(batch)
            }
        }

        /// The engines of a `world`-rank ring with `slots` slots of `slot_bytes`, receives posted
        /// as `VerbsPair::connect` posts them.
        fn rings(world: u32, slots: usize, slot_bytes: usize) -> Vec<Ring<FakePair>> {
            let ends: Vec<Arc<End>> = (0..world)
                .map(|_| {
                    Arc::new(End {
                        slots: Mutex::new(vec![0; slots * slot_bytes]),
                        full: Mutex::new(vec![false; slots]),
                        cq: Mutex::new(VecDeque::new()),
                        data_recvs: Mutex::new(
                            (0..slots as u64).map(|i| WR_RECV_DATA | i).collect(),
                        ),
                        credit_recvs: Mutex::new(
                            (0..slots as u64).map(|i| WR_RECV_CREDIT | i).collect(),
                        ),
                    })
                })
                .collect();
            (0..world)
                .map(|r| {
                    let at = |i: u32| Arc::clone(&ends[(i % world) as usize]);
                    let pair = FakePair {
                        me: at(r),
                        next: at(r + 1),
                        prev: at(r + world - 1),
                        work: Vec::new(),
                        scratch: Vec::new(),
                        slot_bytes,
                    };
                    Ring::new(pair, r, world, slots, slot_bytes)
                })
                .collect()
        }

        /// Rank `r`'s input of operation `op`: values whose f32 sums depend on the order.
        fn input(r: u32, op: usize, len: usize) -> (Vec<i64>, Vec<f32>) {
            let ints = (0..len)
                .map(|i| (i as i64 * 1_000_003) ^ (i64::from(r) << 40) ^ op as i64)
                .collect();
            let floats = (0..len)
                .map(|i| ((i * 7 + r as usize * 13 + op) % 97) as f32 * 0.1 + 1e-3 * r as f32)
                .collect();
            (ints, floats)
        }

        /// Lengths of the consecutive operations: segments, empty chunks, one element.
        const LENS: [usize; 5] = [37, 1, 200, 3, 64];

        type Outcome = Vec<(Vec<i64>, Vec<u32>)>;

        fn run_all<F>(world: u32, mut per_rank: F) -> Vec<Result<Outcome, String>>
        where
            F: FnMut(u32) -> Box<dyn FnOnce() -> Result<Outcome, String> + Send>,
        {
            let (tx, rx) = mpsc::channel();
            for r in 0..world {
                let job = per_rank(r);
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send((r, job()));
                });
            }
            drop(tx);
            let mut out: Vec<Option<Result<Outcome, String>>> = (0..world).map(|_| None).collect();
            for _ in 0..world {
                let (r, result) = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("every rank finishes: the engine deadlocked?");
                out[r as usize] = Some(result);
            }
            out.into_iter().map(Option::unwrap).collect()
        }

        #[test]
        fn the_engine_sums_like_the_tcp_ring_under_tight_credits_across_operations() {
            use crate::testing::{run_ranks, Path};
            for (world, slots, slot_bytes) in [(2, 1, 8), (3, 2, 16), (4, 2, 8), (5, 3, 24)] {
                let mut engines: Vec<Option<Ring<FakePair>>> = rings(world, slots, slot_bytes)
                    .into_iter()
                    .map(Some)
                    .collect();
                let got = run_all(world, |r| {
                    let mut ring = engines[r as usize].take().unwrap();
                    Box::new(move || {
                        let abort = AbortFlag(AtomicBool::new(false));
                        let mut out = Vec::new();
                        for (op, len) in LENS.iter().enumerate() {
                            let (mut ints, mut floats) = input(r, op, *len);
                            ring.all_reduce(&mut ints, &abort)
                                .map_err(|e| e.to_string())?;
                            ring.all_reduce(&mut floats, &abort)
                                .map_err(|e| e.to_string())?;
                            out.push((ints, floats.iter().map(|f| f.to_bits()).collect()));
                        }
                        Ok(out)
                    })
                });
                let want = run_ranks(world, Path::RankZero, |mut tcp| {
                    let r = tcp.rank();
                    let mut out = Vec::new();
                    for (op, len) in LENS.iter().enumerate() {
                        let (mut ints, mut floats) = input(r, op, *len);
                        tcp.all_reduce_sum_i64(&mut ints).unwrap();
                        tcp.all_reduce_sum_f32(&mut floats).unwrap();
                        out.push((
                            ints,
                            floats.iter().map(|f| f.to_bits()).collect::<Vec<u32>>(),
                        ));
                    }
                    out
                });
                for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                    let g = g
                        .as_ref()
                        .unwrap_or_else(|e| panic!("world {world} rank {r}: {e}"));
                    assert_eq!(g, w, "world {world} slots {slots}x{slot_bytes} rank {r}");
                }
            }
        }

        #[test]
        fn ranks_that_call_different_lengths_fail_with_a_mismatch_not_wrong_data() {
            let mut engines: Vec<Option<Ring<FakePair>>> =
                rings(2, 2, 8).into_iter().map(Some).collect();
            // The watchdog's part: a rank that fails makes the other abort.
            let abort = Arc::new(AbortFlag(AtomicBool::new(false)));
            let got = run_all(2, |r| {
                let mut ring = engines[r as usize].take().unwrap();
                let abort = Arc::clone(&abort);
                Box::new(move || {
                    // Rank 1 reduces 3 more elements: its segments differ from step 0 on.
                    let mut ints = vec![1i64; 16 + 3 * r as usize];
                    let result = ring.all_reduce(&mut ints, &abort);
                    if result.is_err() {
                        abort.abort();
                    }
                    result.map_err(|e| e.to_string())?;
                    Ok(vec![(ints, Vec::new())])
                })
            });
            assert!(
                got.iter()
                    .any(|r| r.as_ref().is_err_and(|e| e.contains("collective mismatch"))),
                "{got:?}"
            );
        }

        #[test]
        fn an_abort_ends_a_wait_for_a_peer_that_never_writes() {
            let mut engines = rings(2, 2, 8);
            let mut lonely = engines.remove(0);
            let abort = AbortFlag(AtomicBool::new(false));
            abort.abort();
            let err = lonely.all_reduce(&mut [1i64, 2, 3], &abort).unwrap_err();
            assert!(matches!(err, CollectiveError::Aborted { .. }), "{err}");
        }
    }
}
