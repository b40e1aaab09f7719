//! libibverbs (`libibverbs.so.1`), opened at run time: RDMA devices, ports and GIDs, and the
//! objects of an RC connection (protection domain, memory region, completion queue, queue pair)
//! with RDMA write with immediate.
//!
//! Every object is an RAII handle that frees itself on drop and holds an `Arc` to what it was made
//! from, so a parent (the device context, the protection domain) outlives its children whatever
//! order the caller drops them in. `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` are `static
//! inline` in verbs.h (no symbol in the library): they are called here the way the header does,
//! through the provider's function pointers in `context->ops`.
//!
//! The pure parts (port attributes, GIDs, the queue pair record peers exchange, the attributes of
//! each queue pair transition) are in [`port`], [`gid`] and [`qp`], tested without a device.
//!
//! A loopback check on one port: open the device, make one [`QueuePair`], [`QueuePair::connect`]
//! it to its own [`QueuePair::local_info`], post a receive, write with immediate into its own
//! buffer, and poll both completions.

use std::ffi::{c_int, c_void, CStr, OsStr};
use std::fmt;
use std::sync::Arc;

use crate::sys::verbs as sys;

pub mod gid;
mod ops;
pub mod port;
pub mod qp;

pub use gid::{Gid, GidType};
pub use port::{LinkLayer, Mtu, PortState};
pub use qp::QpInfo;

/// The file name the loader is asked for: libibverbs' soname (rdma-core).
pub const LIBRARY_NAME: &str = "libibverbs.so.1";

/// Why a verbs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// The library could not be opened.
    #[error(
        "cannot open the RDMA verbs library {library}: {reason}. Install rdma-core's libibverbs \
         (Debian/Ubuntu: apt-get install libibverbs1 ibverbs-providers; RHEL: dnf install libibverbs)"
    )]
    NotFound {
        /// The name or path that was tried.
        library: String,
        /// The loader's message.
        reason: String,
    },
    /// The library lacks a function this module calls.
    #[error("{library} lacks the function {symbol}: it is not libibverbs, or one too old (rdma-core 17 or newer is needed)")]
    MissingSymbol {
        /// The library that was opened.
        library: String,
        /// The missing function.
        symbol: &'static str,
    },
    /// A verbs call failed; `errno` is the error number it returned or set.
    #[error("{call} failed: {message} (errno {errno})")]
    Call {
        /// The function that failed.
        call: &'static str,
        /// The error number.
        errno: i32,
        /// Its text (strerror).
        message: String,
    },
    /// The device's provider left an operation out of `context->ops`.
    #[error("the RDMA provider of this device does not implement {0}")]
    Unsupported(&'static str),
    /// A caller's argument was refused before the library was called.
    #[error("invalid argument to {call}: {reason}")]
    InvalidArgument {
        /// The function that was called.
        call: &'static str,
        /// What was wrong and what is accepted.
        reason: String,
    },
    /// A bounded wait ended before everything expected arrived.
    #[error("{what}: timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// A check's data came back wrong.
    #[error("RDMA check failed: {0}")]
    CheckFailed(String),
    /// A work request completed with an error status.
    #[error("work request {wr_id} completed with {message} (status {status}, vendor error {vendor_err:#x})")]
    WorkCompletion {
        /// The work request's id.
        wr_id: u64,
        /// `ibv_wc_status`.
        status: u32,
        /// `ibv_wc_status_str`.
        message: String,
        /// The provider's own code.
        vendor_err: u32,
    },
}

impl VerbsError {
    fn call(call: &'static str, errno: i32) -> VerbsError {
        let message = std::io::Error::from_raw_os_error(errno).to_string();
        VerbsError::Call {
            call,
            errno,
            message,
        }
    }

    /// A failure of a call that returns NULL or -1 and sets `errno`.
    fn last_os_error(call: &'static str) -> VerbsError {
        VerbsError::call(
            call,
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )
    }
}

/// Turns a call's non-zero return value (an errno, or -1 with errno set) into an error.
fn check(call: &'static str, ret: c_int) -> Result<(), VerbsError> {
    match ret {
        0 => Ok(()),
        -1 => Err(VerbsError::last_os_error(call)),
        errno => Err(VerbsError::call(call, errno.abs())),
    }
}

/// The opened libibverbs. It is never unloaded (providers may keep threads and state that
/// outlive the handles), like every library of this crate.
pub struct Verbs {
    lib: std::mem::ManuallyDrop<sys::VerbsLib>,
    library: String,
}

impl fmt::Debug for Verbs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verbs")
            .field("library", &self.library)
            .finish()
    }
}

const REQUIRED_SYMBOLS: &[&str] = &[
    "ibv_get_device_list",
    "ibv_free_device_list",
    "ibv_get_device_name",
    "ibv_get_device_guid",
    "ibv_open_device",
    "ibv_close_device",
    "ibv_query_device",
    "ibv_query_port",
    "ibv_query_gid",
    "ibv_alloc_pd",
    "ibv_dealloc_pd",
    "ibv_reg_mr",
    "ibv_dereg_mr",
    "ibv_create_cq",
    "ibv_destroy_cq",
    "ibv_create_qp",
    "ibv_destroy_qp",
    "ibv_modify_qp",
    "ibv_wc_status_str",
];

fn missing_symbol(lib: &sys::VerbsLib) -> Option<&'static str> {
    let present = [
        lib.ibv_get_device_list.is_ok(),
        lib.ibv_free_device_list.is_ok(),
        lib.ibv_get_device_name.is_ok(),
        lib.ibv_get_device_guid.is_ok(),
        lib.ibv_open_device.is_ok(),
        lib.ibv_close_device.is_ok(),
        lib.ibv_query_device.is_ok(),
        lib.ibv_query_port.is_ok(),
        lib.ibv_query_gid.is_ok(),
        lib.ibv_alloc_pd.is_ok(),
        lib.ibv_dealloc_pd.is_ok(),
        lib.ibv_reg_mr.is_ok(),
        lib.ibv_dereg_mr.is_ok(),
        lib.ibv_create_cq.is_ok(),
        lib.ibv_destroy_cq.is_ok(),
        lib.ibv_create_qp.is_ok(),
        lib.ibv_destroy_qp.is_ok(),
        lib.ibv_modify_qp.is_ok(),
        lib.ibv_wc_status_str.is_ok(),
    ];
    REQUIRED_SYMBOLS
        .iter()
        .zip(present)
        .find(|(_, ok)| !ok)
        .map(|(name, _)| *name)
}

impl Verbs {
    /// Opens `libibverbs.so.1` through the loader's ordinary search.
    pub fn open() -> Result<Arc<Verbs>, VerbsError> {
        Verbs::open_library(OsStr::new(LIBRARY_NAME))
    }

    /// Opens `library` (a name for the loader to search, or a path).
    pub fn open_library(library: &OsStr) -> Result<Arc<Verbs>, VerbsError> {
        let name = library.to_string_lossy().into_owned();
        // SAFETY: opening libibverbs runs its initialisers, which only set up the library's state
        // (provider lists are read later, on the first device list). Symbols are looked up by the
        // names verbs.h declares with the signatures bindgen generated from it.
        let lib = unsafe { sys::VerbsLib::new(library) }.map_err(|e| VerbsError::NotFound {
            library: name.clone(),
            reason: crate::error_chain(&e),
        })?;
        if let Some(symbol) = missing_symbol(&lib) {
            return Err(VerbsError::MissingSymbol {
                library: name,
                symbol,
            });
        }
        Ok(Arc::new(Verbs {
            lib: std::mem::ManuallyDrop::new(lib),
            library: name,
        }))
    }

    /// The name or path the library was opened by.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// The RDMA devices of this host (`ibv_get_device_list`). A host without any, or whose
    /// kernel has no RDMA support (`ENOSYS`: no `/sys/class/infiniband_verbs`), has an empty list,
    /// not an error; [`DeviceList::kernel_has_rdma`] tells the two apart.
    pub fn devices(self: &Arc<Self>) -> Result<DeviceList, VerbsError> {
        let mut count: c_int = 0;
        // SAFETY: the symbol is present (checked at open); `count` is a live out-pointer.
        let list = unsafe { self.lib.ibv_get_device_list(&mut count) };
        if list.is_null() {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc_enosys()) {
                return Ok(DeviceList {
                    verbs: Arc::clone(self),
                    list,
                    count: 0,
                    kernel_has_rdma: false,
                });
            }
            return Err(VerbsError::call(
                "ibv_get_device_list",
                err.raw_os_error().unwrap_or(0),
            ));
        }
        Ok(DeviceList {
            verbs: Arc::clone(self),
            list,
            count: usize::try_from(count).unwrap_or(0),
            kernel_has_rdma: true,
        })
    }

    fn wc_status_str(&self, status: u32) -> String {
        // SAFETY: the symbol is present; it accepts any status and returns a static string.
        let ptr = unsafe { self.lib.ibv_wc_status_str(status) };
        if ptr.is_null() {
            return format!("status {status}");
        }
        // SAFETY: non-null, NUL-terminated and static (a string literal inside libibverbs).
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// `ENOSYS` on Linux (the crate has no libc dependency; the value is fixed by the kernel ABI).
const fn libc_enosys() -> i32 {
    38
}

/// The device list (`ibv_free_device_list` on drop). Devices opened from it stay valid after it
/// is dropped.
pub struct DeviceList {
    verbs: Arc<Verbs>,
    list: *mut *mut sys::ibv_device,
    count: usize,
    kernel_has_rdma: bool,
}

impl fmt::Debug for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|d| d.name)).finish()
    }
}

/// One entry of a [`DeviceList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Its index in the list.
    pub index: usize,
    /// The kernel's name, e.g. `mlx5_0`.
    pub name: String,
    /// The node GUID, in host order.
    pub guid: u64,
}

impl DeviceList {
    /// The number of devices.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the kernel has RDMA support at all; `false` when `ibv_get_device_list` failed with
    /// `ENOSYS` (no uverbs driver loaded, as in most containers and VMs), which is reported as an
    /// empty list.
    pub fn kernel_has_rdma(&self) -> bool {
        self.kernel_has_rdma
    }

    fn device(&self, index: usize) -> Option<*mut sys::ibv_device> {
        if index >= self.count {
            return None;
        }
        // SAFETY: `list` holds `count` device pointers (libibverbs' contract for a successful
        // ibv_get_device_list), and `index < count`; the list lives until drop.
        Some(unsafe { *self.list.add(index) })
    }

    /// The devices' names and GUIDs.
    pub fn iter(&self) -> impl Iterator<Item = DeviceEntry> + '_ {
        (0..self.count).filter_map(|index| {
            let dev = self.device(index)?;
            // SAFETY: `dev` is a device of the live list; both calls only read it, and the name
            // is a NUL-terminated string inside the device, copied before the list can go.
            let (name_ptr, guid) = unsafe {
                (
                    self.verbs.lib.ibv_get_device_name(dev),
                    self.verbs.lib.ibv_get_device_guid(dev),
                )
            };
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                // SAFETY: non-null and NUL-terminated, owned by the live device.
                unsafe { CStr::from_ptr(name_ptr) }
                    .to_string_lossy()
                    .into_owned()
            };
            Some(DeviceEntry {
                index,
                name,
                guid: u64::from_be(guid),
            })
        })
    }

    /// Opens the device at `index` (`ibv_open_device`).
    pub fn open(&self, index: usize) -> Result<Context, VerbsError> {
        let dev = self
            .device(index)
            .ok_or_else(|| VerbsError::InvalidArgument {
                call: "ibv_open_device",
                reason: format!("device index {index}: this host has {} devices", self.count),
            })?;
        // SAFETY: `dev` is a device of the live list; the context it returns keeps its own
        // reference to the device, so it may outlive the list.
        let ctx = unsafe { self.verbs.lib.ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(VerbsError::last_os_error("ibv_open_device"));
        }
        Ok(Context {
            inner: Arc::new(ContextInner {
                verbs: Arc::clone(&self.verbs),
                ctx,
            }),
        })
    }

    /// Opens the device named `name` (e.g. `mlx5_0`).
    pub fn open_by_name(&self, name: &str) -> Result<Context, VerbsError> {
        let entry =
            self.iter()
                .find(|d| d.name == name)
                .ok_or_else(|| VerbsError::InvalidArgument {
                    call: "ibv_open_device",
                    reason: format!(
                        "no RDMA device named '{name}'; this host has: {}",
                        if self.is_empty() {
                            "none".to_owned()
                        } else {
                            self.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
                        }
                    ),
                })?;
        self.open(entry.index)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if self.list.is_null() {
            return;
        }
        // SAFETY: the list came from ibv_get_device_list and is freed once, here.
        unsafe { self.verbs.lib.ibv_free_device_list(self.list) };
    }
}

struct ContextInner {
    verbs: Arc<Verbs>,
    ctx: *mut sys::ibv_context,
}

// SAFETY: libibverbs objects are thread-safe (rdma-core documents every verb as callable from any
// thread); the pointer is only freed by drop, which runs once when the last Arc goes.
unsafe impl Send for ContextInner {}
// SAFETY: as for Send.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc to this context, so none is alive; the context
        // is closed once, here. An error cannot be reported from drop.
        let _ = unsafe { self.verbs.lib.ibv_close_device(self.ctx) };
    }
}

/// Device-wide facts (`ibv_query_device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAttributes {
    /// Firmware version.
    pub firmware: String,
    /// Node GUID, host order.
    pub node_guid: u64,
    /// PCI vendor id.
    pub vendor_id: u32,
    /// The vendor's part id.
    pub vendor_part_id: u32,
    /// Number of physical ports.
    pub port_count: u8,
    /// Most queue pairs.
    pub max_qp: i32,
    /// Most completion queue entries.
    pub max_cqe: i32,
    /// Largest memory region in bytes.
    pub max_mr_size: u64,
}

/// One port's state (`ibv_query_port`).
#[derive(Debug, Clone, PartialEq)]
pub struct PortAttributes {
    /// The port number (from 1).
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// Physical state code (5 = LinkUp).
    pub phys_state: u8,
    /// InfiniBand or Ethernet (RoCE).
    pub link_layer: LinkLayer,
    /// Active MTU, `None` for an unknown code.
    pub active_mtu: Option<Mtu>,
    /// Raw active speed code.
    pub active_speed: u8,
    /// Raw active width code.
    pub active_width: u8,
    /// Link rate in Gb/s, `None` when a code is unknown.
    pub rate_gbps: Option<f64>,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// GID table length.
    pub gid_table_len: u32,
}

/// One GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// Its index.
    pub index: u32,
    /// The GID.
    pub gid: Gid,
    /// Its type; `None` where the library is older than `ibv_query_gid_ex` (rdma-core 32).
    pub gid_type: Option<GidType>,
}

/// An open device (`ibv_close_device` when it and everything made from it are dropped).
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("ctx", &self.inner.ctx)
            .finish()
    }
}

impl Context {
    fn lib(&self) -> &sys::VerbsLib {
        &self.inner.verbs.lib
    }

    /// Device-wide facts.
    pub fn query_device(&self) -> Result<DeviceAttributes, VerbsError> {
        let mut attr = sys::ibv_device_attr::default();
        // SAFETY: the context is open; `attr` is a live ibv_device_attr to fill.
        check("ibv_query_device", unsafe {
            self.lib().ibv_query_device(self.inner.ctx, &mut attr)
        })?;
        // The firmware field is a NUL-terminated string of at most 64 bytes; a missing NUL gives "".
        let fw: Vec<u8> = attr.fw_ver.iter().map(|c| *c as u8).collect();
        let firmware = CStr::from_bytes_until_nul(&fw)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(DeviceAttributes {
            firmware,
            node_guid: u64::from_be(attr.node_guid),
            vendor_id: attr.vendor_id,
            vendor_part_id: attr.vendor_part_id,
            port_count: attr.phys_port_cnt,
            max_qp: attr.max_qp,
            max_cqe: attr.max_cqe,
            max_mr_size: attr.max_mr_size,
        })
    }

    /// One port's state. Ports are numbered from 1.
    pub fn query_port(&self, port: u8) -> Result<PortAttributes, VerbsError> {
        let mut attr = sys::ibv_port_attr::default();
        // SAFETY: the context is open. The exported `ibv_query_port` takes the older, shorter
        // `_compat_ibv_port_attr`; verbs.h's inline wrapper passes a zeroed full `ibv_port_attr`
        // cast to it when the provider has no extended query, as done here; the buffer is at
        // least as large as what the library writes.
        check("ibv_query_port", unsafe {
            self.lib().ibv_query_port(
                self.inner.ctx,
                port,
                (&mut attr as *mut sys::ibv_port_attr).cast(),
            )
        })?;
        Ok(PortAttributes {
            port,
            state: PortState::from_raw(attr.state),
            phys_state: attr.phys_state,
            link_layer: LinkLayer::from_raw(attr.link_layer),
            active_mtu: Mtu::from_raw(attr.active_mtu),
            active_speed: attr.active_speed,
            active_width: attr.active_width,
            rate_gbps: port::link_rate_gbps(attr.active_speed, attr.active_width),
            lid: attr.lid,
            gid_table_len: u32::try_from(attr.gid_tbl_len).unwrap_or(0),
        })
    }

    /// The GID at `index` of `port`'s table, with its type where the library can say
    /// (`ibv_query_gid_ex`, else `ibv_query_gid`).
    pub fn query_gid(&self, port: u8, index: u32) -> Result<GidEntry, VerbsError> {
        if self.lib()._ibv_query_gid_ex.is_ok() {
            let mut entry = sys::ibv_gid_entry::default();
            // SAFETY: the symbol is present (checked just above); the context is open; `entry` is
            // a live ibv_gid_entry and its size is passed, as verbs.h's inline wrapper does.
            let ret = unsafe {
                self.lib()._ibv_query_gid_ex(
                    self.inner.ctx,
                    u32::from(port),
                    index,
                    &mut entry,
                    0,
                    std::mem::size_of::<sys::ibv_gid_entry>(),
                )
            };
            check("ibv_query_gid_ex", ret)?;
            // SAFETY: reading the 16 raw bytes of a plain-data union.
            let gid = Gid(unsafe { entry.gid.raw });
            return Ok(GidEntry {
                index,
                gid,
                gid_type: Some(GidType::from_raw(entry.gid_type)),
            });
        }
        let slot = c_int::try_from(index).map_err(|_| VerbsError::InvalidArgument {
            call: "ibv_query_gid",
            reason: format!("GID index {index}: accepted 0 to {}", c_int::MAX),
        })?;
        let mut gid = sys::ibv_gid::default();
        // SAFETY: the context is open; `gid` is a live 16-byte union to fill.
        check("ibv_query_gid", unsafe {
            self.lib()
                .ibv_query_gid(self.inner.ctx, port, slot, &mut gid)
        })?;
        // SAFETY: reading the 16 raw bytes of a plain-data union.
        Ok(GidEntry {
            index,
            gid: Gid(unsafe { gid.raw }),
            gid_type: None,
        })
    }

    /// Every non-empty entry of `port`'s GID table (entries the kernel has not filled are
    /// skipped).
    pub fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>, VerbsError> {
        let len = self.query_port(port)?.gid_table_len;
        Ok((0..len)
            .filter_map(|i| self.query_gid(port, i).ok())
            .filter(|e| !e.gid.is_zero())
            .collect())
    }

    /// A protection domain (`ibv_alloc_pd`).
    pub fn alloc_pd(&self) -> Result<ProtectionDomain, VerbsError> {
        // SAFETY: the context is open.
        let pd = unsafe { self.lib().ibv_alloc_pd(self.inner.ctx) };
        if pd.is_null() {
            return Err(VerbsError::last_os_error("ibv_alloc_pd"));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                ctx: Arc::clone(&self.inner),
                pd,
            }),
        })
    }

    /// A completion queue with room for at least `entries` completions (`ibv_create_cq`).
    pub fn create_cq(&self, entries: u32) -> Result<CompletionQueue, VerbsError> {
        let cqe = c_int::try_from(entries)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| VerbsError::InvalidArgument {
                call: "ibv_create_cq",
                reason: format!("{entries} entries: accepted 1 to {}", c_int::MAX),
            })?;
        // SAFETY: the context is open; no completion channel and no user context are passed
        // (both may be NULL), completion vector 0 always exists.
        let cq = unsafe {
            self.lib().ibv_create_cq(
                self.inner.ctx,
                cqe,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(VerbsError::last_os_error("ibv_create_cq"));
        }
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                ctx: Arc::clone(&self.inner),
                cq,
            }),
        })
    }
}

struct PdInner {
    ctx: Arc<ContextInner>,
    pd: *mut sys::ibv_pd,
}

// SAFETY: see ContextInner.
unsafe impl Send for PdInner {}
// SAFETY: see ContextInner.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an Arc to this domain, so none is alive;
        // freed once, here.
        let _ = unsafe { self.ctx.verbs.lib.ibv_dealloc_pd(self.pd) };
    }
}

/// Memory access rights of a registration (`IBV_ACCESS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u32);

impl Access {
    /// The device may write the memory (needed for receives and for remote writes).
    pub const LOCAL_WRITE: Access = Access(sys::IBV_ACCESS_LOCAL_WRITE);
    /// A peer may RDMA-write the memory.
    pub const REMOTE_WRITE: Access = Access(sys::IBV_ACCESS_REMOTE_WRITE);
    /// A peer may RDMA-read the memory.
    pub const REMOTE_READ: Access = Access(sys::IBV_ACCESS_REMOTE_READ);

    /// The raw flags.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
}

/// A protection domain (`ibv_dealloc_pd` when it and its children are dropped).
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("pd", &self.inner.pd)
            .finish()
    }
}

impl ProtectionDomain {
    fn lib(&self) -> &sys::VerbsLib {
        &self.inner.ctx.verbs.lib
    }

    /// Registers a zeroed buffer of `len` bytes that this region owns (`ibv_reg_mr`).
    pub fn register(&self, len: usize, access: Access) -> Result<MemoryRegion, VerbsError> {
        if len == 0 {
            return Err(VerbsError::InvalidArgument {
                call: "ibv_reg_mr",
                reason: "a memory region of 0 bytes: accepted 1 byte or more".to_owned(),
            });
        }
        let mut buffer = vec![0u8; len].into_boxed_slice();
        // SAFETY: the buffer is `len` live bytes owned by the region made here, which keeps it
        // (at the same address: a boxed slice never moves its heap block) until after
        // `ibv_dereg_mr` in drop.
        let mr = unsafe { self.reg_mr(buffer.as_mut_ptr().cast(), len, access) }?;
        Ok(MemoryRegion {
            pd: Arc::clone(&self.inner),
            mr,
            buffer: Some(buffer),
        })
    }

    /// Registers memory this crate does not own, such as a GPU buffer for GPUDirect RDMA.
    ///
    /// # Safety
    /// `addr..addr + len` stays allocated, and is not reused for anything else, until the
    /// returned region is dropped; the device and any peer given its rkey may read or write it
    /// (per `access`) at any time until then.
    pub unsafe fn register_raw(
        &self,
        addr: *mut c_void,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion, VerbsError> {
        // SAFETY: the memory's validity is this function's own contract, passed on.
        let mr = unsafe { self.reg_mr(addr, len, access) }?;
        Ok(MemoryRegion {
            pd: Arc::clone(&self.inner),
            mr,
            buffer: None,
        })
    }

    /// `ibv_reg_mr`; the caller keeps `addr..addr + len` valid until `ibv_dereg_mr`.
    unsafe fn reg_mr(
        &self,
        addr: *mut c_void,
        len: usize,
        access: Access,
    ) -> Result<*mut sys::ibv_mr, VerbsError> {
        let flags = c_int::try_from(access.bits()).unwrap_or(0);
        // SAFETY: the domain is live; the memory's validity is the caller's contract. The
        // exported `ibv_reg_mr` is what verbs.h's macro calls when no optional-range flag is set
        // (none is offered here).
        let mr = unsafe { self.lib().ibv_reg_mr(self.inner.pd, addr, len, flags) };
        if mr.is_null() {
            return Err(VerbsError::last_os_error("ibv_reg_mr"));
        }
        Ok(mr)
    }

    /// An RC queue pair using `send_cq` and `recv_cq` (`ibv_create_qp`), in state RESET, with
    /// room for `max_send_wr` and `max_recv_wr` outstanding requests of one scatter entry each.
    pub fn create_rc_qp(
        &self,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> Result<QueuePair, VerbsError> {
        let mut init = sys::ibv_qp_init_attr {
            send_cq: send_cq.inner.cq,
            recv_cq: recv_cq.inner.cq,
            cap: sys::ibv_qp_cap {
                max_send_wr,
                max_recv_wr,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: the domain and both queues are live (and stay so: the queue pair holds Arcs
        // to them); `init` is a filled ibv_qp_init_attr that the library reads and updates.
        let qp = unsafe { self.lib().ibv_create_qp(self.inner.pd, &mut init) };
        if qp.is_null() {
            return Err(VerbsError::last_os_error("ibv_create_qp"));
        }
        Ok(QueuePair {
            pd: Arc::clone(&self.inner),
            _send_cq: Arc::clone(&send_cq.inner),
            _recv_cq: Arc::clone(&recv_cq.inner),
            qp,
            psn: qp::random_psn(),
        })
    }
}

/// A registered memory region (`ibv_dereg_mr` on drop).
pub struct MemoryRegion {
    pd: Arc<PdInner>,
    mr: *mut sys::ibv_mr,
    buffer: Option<Box<[u8]>>,
}

// SAFETY: see ContextInner; the owned buffer is plain bytes.
unsafe impl Send for MemoryRegion {}
// SAFETY: `&self` methods only read the region's keys and the buffer.
unsafe impl Sync for MemoryRegion {}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &self.addr())
            .field("len", &self.len())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl MemoryRegion {
    fn raw(&self) -> &sys::ibv_mr {
        // SAFETY: `mr` came from a successful ibv_reg_mr and is deregistered only in drop.
        unsafe { &*self.mr }
    }

    /// The registered address.
    pub fn addr(&self) -> u64 {
        self.raw().addr as u64
    }

    /// The registered length in bytes.
    pub fn len(&self) -> usize {
        self.raw().length
    }

    /// Whether the region is empty (never: registration refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The local key, for this host's work requests.
    pub fn lkey(&self) -> u32 {
        self.raw().lkey
    }

    /// The remote key, for a peer's RDMA writes.
    pub fn rkey(&self) -> u32 {
        self.raw().rkey
    }

    /// The owned buffer's bytes (`None` for [`ProtectionDomain::register_raw`]). Read it after
    /// the completion of the writes into it; a peer with the rkey may write it at any time.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.buffer.as_deref()
    }

    /// The owned buffer, to fill before sending from it.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        self.buffer.as_deref_mut()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: deregistered once, here, before the owned buffer (a later field) is freed.
        let _ = unsafe { self.pd.ctx.verbs.lib.ibv_dereg_mr(self.mr) };
    }
}

struct CqInner {
    ctx: Arc<ContextInner>,
    cq: *mut sys::ibv_cq,
}

// SAFETY: see ContextInner; polling a CQ from several threads is allowed by libibverbs (providers
// lock it).
unsafe impl Send for CqInner {}
// SAFETY: as for Send.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: queue pairs using this queue hold an Arc to it, so none is alive; destroyed
        // once, here.
        let _ = unsafe { self.ctx.verbs.lib.ibv_destroy_cq(self.cq) };
    }
}

/// A completed work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id given when it was posted.
    pub wr_id: u64,
    /// The opcode (`IBV_WC_*`): e.g. RDMA write (1) or receive of a write with immediate (129).
    pub opcode: u32,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// The immediate value, in host order, when the completion carries one.
    pub imm_data: Option<u32>,
    /// The local queue pair.
    pub qp_num: u32,
}

impl WorkCompletion {
    /// `IBV_WC_RDMA_WRITE`.
    pub const OPCODE_RDMA_WRITE: u32 = sys::IBV_WC_RDMA_WRITE;
    /// `IBV_WC_RECV_RDMA_WITH_IMM`.
    pub const OPCODE_RECV_RDMA_WITH_IMM: u32 = sys::IBV_WC_RECV_RDMA_WITH_IMM;
}

/// A completion queue (`ibv_destroy_cq` when it and its queue pairs are dropped).
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("cq", &self.inner.cq)
            .finish()
    }
}

/// The most completions one [`CompletionQueue::poll`] takes.
pub const POLL_BATCH: usize = 16;

impl CompletionQueue {
    /// Takes up to [`POLL_BATCH`] completions without waiting (`ibv_poll_cq`, through the
    /// provider's `ops.poll_cq`). A completion with an error status ends the batch as
    /// [`VerbsError::WorkCompletion`]; the ones before it are lost with it, which only matters to
    /// a caller that goes on after an error (a failed RC queue pair is dead anyway).
    pub fn poll(&self) -> Result<Vec<WorkCompletion>, VerbsError> {
        let mut wcs = [sys::ibv_wc::default(); POLL_BATCH];
        // SAFETY: the queue is live (destroyed only when the last Arc of it goes).
        let n = unsafe { ops::poll_cq(self.inner.cq, &mut wcs) }?;
        ops::completions(&wcs[..n], |status| {
            self.inner.ctx.verbs.wc_status_str(status)
        })
    }

    /// Polls until `count` completions arrived or `timeout` passed (busy-polling: for checks and
    /// tests, not a data path).
    pub fn wait(
        &self,
        count: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<WorkCompletion>, VerbsError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < count {
            got.extend(self.poll()?);
            if std::time::Instant::now() > deadline {
                return Err(VerbsError::Timeout {
                    what: format!("{} of {count} completions", got.len()),
                    after: timeout,
                });
            }
            std::hint::spin_loop();
        }
        Ok(got)
    }
}

/// A reliable-connected queue pair (`ibv_destroy_qp` on drop).
pub struct QueuePair {
    pd: Arc<PdInner>,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
    qp: *mut sys::ibv_qp,
    psn: u32,
}

// SAFETY: see ContextInner; posting to one QP from several threads is allowed by libibverbs
// (providers lock their queues).
unsafe impl Send for QueuePair {}
// SAFETY: as for Send.
unsafe impl Sync for QueuePair {}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qpn())
            .finish()
    }
}

impl QueuePair {
    fn lib(&self) -> &sys::VerbsLib {
        &self.pd.ctx.verbs.lib
    }

    /// The queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: `qp` came from a successful ibv_create_qp and is destroyed only in drop.
        unsafe { (*self.qp).qp_num }
    }

    /// This end's record for the peer: the port's LID and MTU, the GID at `gid_index`, this
    /// queue pair's number and first PSN, and `mr` as the buffer the peer may write.
    pub fn local_info(
        &self,
        port: u8,
        gid_index: u32,
        mr: &MemoryRegion,
    ) -> Result<QpInfo, VerbsError> {
        let ctx = Context {
            inner: Arc::clone(&self.pd.ctx),
        };
        let attrs = ctx.query_port(port)?;
        let gid = ctx.query_gid(port, gid_index)?.gid;
        Ok(QpInfo {
            port,
            lid: attrs.lid,
            gid,
            gid_index: u8::try_from(gid_index).unwrap_or(u8::MAX),
            mtu: attrs.active_mtu.unwrap_or(Mtu::B1024),
            qpn: self.qpn(),
            psn: self.psn,
            addr: mr.addr(),
            len: mr.len() as u64,
            rkey: mr.rkey(),
        })
    }

    fn modify(&self, call: &'static str, t: qp::QpTransition) -> Result<(), VerbsError> {
        let mut attr = t.attr;
        let mask = c_int::try_from(t.mask).unwrap_or(0);
        // SAFETY: the queue pair is live; `attr` is a filled ibv_qp_attr whose set fields are
        // exactly those named in `mask` (built by the pure functions of `qp`).
        check(call, unsafe {
            self.lib().ibv_modify_qp(self.qp, &mut attr, mask)
        })
    }

    /// RESET -> INIT -> RTR -> RTS towards `remote` (which may be this queue pair's own record,
    /// for a loopback), through local `port` and the local GID at `gid_index`, letting the peer
    /// write and read the local buffers registered with those rights.
    pub fn connect(
        &self,
        port: u8,
        gid_index: u32,
        local_mtu: Mtu,
        remote: &QpInfo,
    ) -> Result<(), VerbsError> {
        let sgid = u8::try_from(gid_index).map_err(|_| VerbsError::InvalidArgument {
            call: "ibv_modify_qp",
            reason: format!("GID index {gid_index}: accepted 0 to 255"),
        })?;
        let access = (Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ).bits();
        self.modify("ibv_modify_qp(INIT)", qp::init_transition(port, access))?;
        let mtu = port::path_mtu(local_mtu, remote.mtu);
        self.modify(
            "ibv_modify_qp(RTR)",
            qp::rtr_transition(port, sgid, mtu, remote),
        )?;
        self.modify("ibv_modify_qp(RTS)", qp::rts_transition(self.psn))
    }

    /// Posts a receive with no buffer (`ibv_post_recv`): what an RDMA write with immediate
    /// consumes on the target to report its immediate value.
    pub fn post_recv(&self, wr_id: u64) -> Result<(), VerbsError> {
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        };
        // SAFETY: the queue pair is live; the request has no scatter entries, so names no memory.
        unsafe { ops::post_recv(self.qp, &mut wr) }
    }

    /// Posts a signalled RDMA write with immediate (`ibv_post_send`): `write.len` bytes from
    /// `mr` at `write.local_offset` to the peer's `remote.addr + write.remote_offset`, carrying
    /// `write.imm`. The peer gets a receive completion with the immediate; this side a send
    /// completion with `write.wr_id`. The range must lie inside both `mr` and the peer's buffer.
    pub fn post_write_with_imm(
        &self,
        mr: &MemoryRegion,
        remote: &QpInfo,
        write: WriteWithImm,
    ) -> Result<(), VerbsError> {
        let length = write.check_bounds(mr.len(), remote.len)?;
        let mut sge = sys::ibv_sge::default();
        let mut wr =
            ops::write_with_imm_request(&write, length, mr.addr(), mr.lkey(), remote, &mut sge);
        // SAFETY: the queue pair is live; the request's one scatter entry lies inside `mr`
        // (checked above), which stays registered while borrowed here and, after return, until
        // it is dropped (deregistration stops the device's access to it).
        unsafe { ops::post_send(self.qp, &mut wr) }
    }
}

/// One RDMA write with immediate, for [`QueuePair::post_write_with_imm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteWithImm {
    /// The id of the sender's completion.
    pub wr_id: u64,
    /// Where in the local region the bytes start.
    pub local_offset: usize,
    /// How many bytes (at most `u32::MAX`).
    pub len: usize,
    /// Where in the peer's buffer they go.
    pub remote_offset: u64,
    /// The immediate value, host order (sent in network order).
    pub imm: u32,
}

impl WriteWithImm {
    /// Checks that the write lies inside a local region of `local_len` bytes and a peer buffer
    /// of `remote_len` bytes, and fits one work request; returns its length as the request takes
    /// it.
    pub fn check_bounds(&self, local_len: usize, remote_len: u64) -> Result<u32, VerbsError> {
        let invalid = |reason: String| VerbsError::InvalidArgument {
            call: "ibv_post_send",
            reason,
        };
        let (offset, len, remote_offset) = (self.local_offset, self.len, self.remote_offset);
        if offset.checked_add(len).is_none_or(|end| end > local_len) {
            return Err(invalid(format!(
                "bytes {offset}..{offset}+{len} are outside the local region of {local_len} bytes"
            )));
        }
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > remote_len)
        {
            return Err(invalid(format!(
                "bytes {remote_offset}..{remote_offset}+{len} are outside the peer's buffer of {remote_len} bytes"
            )));
        }
        u32::try_from(len)
            .map_err(|_| invalid(format!("{len} bytes: at most {} in one write", u32::MAX)))
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroyed once, here; the queues and domain it used are kept alive by the Arcs
        // this struct holds until after this call.
        let _ = unsafe { self.lib().ibv_destroy_qp(self.qp) };
    }
}

/// The result of [`loopback_write`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoopbackReport {
    /// The device used.
    pub device: String,
    /// The port used.
    pub port: u8,
    /// The GID index used.
    pub gid_index: u32,
    /// Bytes written.
    pub bytes: usize,
    /// From posting the write to both completions.
    pub elapsed: std::time::Duration,
}

/// An RDMA write with immediate from a queue pair to itself on one port of `device`: registers
/// `2 * bytes`, writes a pattern from the first half into the second, and checks the data, the
/// immediate and both completions. The pre-flight check of a host's RDMA path without a peer.
pub fn loopback_write(
    verbs: &Arc<Verbs>,
    device: &str,
    port: u8,
    gid_index: u32,
    bytes: usize,
) -> Result<LoopbackReport, VerbsError> {
    const IMM: u32 = 0x7472_6e63; // "trnc"
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
    if bytes == 0 {
        return Err(VerbsError::InvalidArgument {
            call: "loopback_write",
            reason: "0 bytes: accepted 1 or more".to_owned(),
        });
    }
    let ctx = verbs.devices()?.open_by_name(device)?;
    let port_attrs = ctx.query_port(port)?;
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(4)?;
    let mut mr = pd.register(
        2 * bytes,
        Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
    )?;
    if let Some(buf) = mr.bytes_mut() {
        buf[..bytes]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = loopback_pattern(i));
    }
    let qp = pd.create_rc_qp(&cq, &cq, 2, 2)?;
    let me = qp.local_info(port, gid_index, &mr)?;
    qp.connect(
        port,
        gid_index,
        port_attrs.active_mtu.unwrap_or(Mtu::B1024),
        &me,
    )?;
    qp.post_recv(2)?;
    let start = std::time::Instant::now();
    qp.post_write_with_imm(
        &mr,
        &me,
        WriteWithImm {
            wr_id: 1,
            local_offset: 0,
            len: bytes,
            remote_offset: bytes as u64,
            imm: IMM,
        },
    )?;
    let completions = cq.wait(2, TIMEOUT)?;
    let elapsed = start.elapsed();
    verify_loopback(&completions, IMM, mr.bytes().unwrap_or_default(), bytes)?;
    Ok(LoopbackReport {
        device: device.to_owned(),
        port,
        gid_index,
        bytes,
        elapsed,
    })
}

/// Byte `i` of the loopback check's data (251 is prime, so the pattern does not line up with
/// any power-of-two block).
fn loopback_pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Checks the outcome of [`loopback_write`]: a receive completion (wr_id 2) carrying `imm`, and
/// the second half of `data` (`bytes` long) holding the pattern written from the first half.
fn verify_loopback(
    completions: &[WorkCompletion],
    imm: u32,
    data: &[u8],
    bytes: usize,
) -> Result<(), VerbsError> {
    let recv = completions.iter().find(|c| c.wr_id == 2).ok_or_else(|| {
        VerbsError::CheckFailed(format!("no receive completion among {completions:?}"))
    })?;
    if recv.imm_data != Some(imm) {
        return Err(VerbsError::CheckFailed(format!(
            "the receive carried immediate {:?}, expected {imm:#x}",
            recv.imm_data
        )));
    }
    if data.len() < 2 * bytes {
        return Err(VerbsError::CheckFailed(format!(
            "the region holds {} bytes, expected {}",
            data.len(),
            2 * bytes
        )));
    }
    if let Some(i) = (0..bytes).find(|i| data[bytes + i] != loopback_pattern(*i)) {
        return Err(VerbsError::CheckFailed(format!(
            "byte {i} arrived as {}, expected {}",
            data[bytes + i],
            loopback_pattern(i)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_results_are_checked() {
        let bytes = 300;
        let good: Vec<u8> = (0..2 * bytes)
            .map(|i| loopback_pattern(i % bytes))
            .collect();
        let mut corrupt = good.clone();
        corrupt[bytes + 260] ^= 1;
        let recv = |imm| WorkCompletion {
            wr_id: 2,
            opcode: WorkCompletion::OPCODE_RECV_RDMA_WITH_IMM,
            byte_len: 0,
            imm_data: imm,
            qp_num: 7,
        };
        let send = WorkCompletion {
            wr_id: 1,
            opcode: WorkCompletion::OPCODE_RDMA_WRITE,
            imm_data: None,
            ..recv(None)
        };
        // (completions, data, None for success or a piece of the error)
        let cases: [(Vec<WorkCompletion>, &[u8], Option<&str>); 5] = [
            (vec![send, recv(Some(9))], &good, None),
            (vec![send], &good, Some("no receive completion")),
            (
                vec![recv(Some(8)), send],
                &good,
                Some("immediate Some(8), expected 0x9"),
            ),
            (
                vec![recv(Some(9))],
                &corrupt,
                Some("byte 260 arrived as 8, expected 9"),
            ),
            (
                vec![recv(Some(9))],
                &good[..bytes],
                Some("holds 300 bytes, expected 600"),
            ),
        ];
        for (completions, data, want) in cases {
            match (verify_loopback(&completions, 9, data, bytes), want) {
                (Ok(()), None) => {}
                (Err(e), Some(text)) => assert!(e.to_string().contains(text), "{e}"),
                (got, want) => panic!("{completions:?}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn handles_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Verbs>();
        send_sync::<Context>();
        send_sync::<ProtectionDomain>();
        send_sync::<MemoryRegion>();
        send_sync::<CompletionQueue>();
        send_sync::<QueuePair>();
    }

    #[test]
    fn call_errors_carry_errno_text() {
        let cases = [
            (
                0,
                "ibv_reg_mr",
                12,
                "Cannot allocate memory (os error 12) (errno 12)",
            ),
            (22, "ibv_modify_qp", 22, "Invalid argument"),
        ];
        for (ret, call, errno, text) in cases {
            let err = if ret == 0 {
                VerbsError::call(call, errno)
            } else {
                check(call, ret).expect_err("non-zero")
            };
            match &err {
                VerbsError::Call { errno: got, .. } => assert_eq!(*got, errno),
                other => panic!("{other:?}"),
            }
            assert!(
                err.to_string().starts_with(&format!("{call} failed: ")),
                "{err}"
            );
            assert!(err.to_string().contains(text), "{err}");
        }
        assert!(check("x", 0).is_ok());
    }

    #[test]
    fn a_missing_library_is_a_typed_error() {
        let err =
            Verbs::open_library(OsStr::new("/nonexistent/libibverbs.so.1")).expect_err("no file");
        assert!(matches!(err, VerbsError::NotFound { .. }), "{err:?}");
        assert!(
            err.to_string().contains("No such file") && err.to_string().contains("libibverbs1"),
            "{err}"
        );
        let err = Verbs::open_library(OsStr::new("libc.so.6")).expect_err("not verbs");
        assert!(
            matches!(
                err,
                VerbsError::MissingSymbol {
                    symbol: "ibv_get_device_list",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn writes_must_lie_inside_both_buffers() {
        let w = |local_offset, len, remote_offset| WriteWithImm {
            wr_id: 0,
            local_offset,
            len,
            remote_offset,
            imm: 0,
        };
        // (write, local region bytes, peer buffer bytes, Ok(length) or a piece of the error)
        let cases: [(WriteWithImm, usize, u64, Result<u32, &str>); 7] = [
            (w(0, 4096, 0), 4096, 4096, Ok(4096)),
            (w(4096, 4096, 4096), 8192, 8192, Ok(4096)),
            (w(0, 0, 0), 1, 1, Ok(0)),
            (
                w(1, 4096, 0),
                4096,
                8192,
                Err("bytes 1..1+4096 are outside the local region of 4096 bytes"),
            ),
            (
                w(0, 10, 8190),
                4096,
                8192,
                Err("bytes 8190..8190+10 are outside the peer's buffer of 8192 bytes"),
            ),
            (
                w(usize::MAX, 2, 0),
                4096,
                4096,
                Err("outside the local region"),
            ),
            (
                w(0, 1 << 32, 0),
                usize::MAX,
                u64::MAX,
                Err("at most 4294967295 in one write"),
            ),
        ];
        for (write, local, remote, want) in cases {
            match (write.check_bounds(local, remote), want) {
                (Ok(len), Ok(want)) => assert_eq!(len, want, "{write:?}"),
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{write:?}: {e}"),
                (got, want) => panic!("{write:?}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn access_flags_combine() {
        let all = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
        assert_eq!(
            all.bits(),
            sys::IBV_ACCESS_LOCAL_WRITE
                | sys::IBV_ACCESS_REMOTE_WRITE
                | sys::IBV_ACCESS_REMOTE_READ
        );
        assert_eq!(all.bits(), 0b111);
    }
}
