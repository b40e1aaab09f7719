//! NCCL (`libnccl.so.2`), opened at run time: version, unique ids, communicators and all-reduce.
//!
//! Three layers, as cudarc's `nccl/{sys,result,safe}`: the generated [`crate::sys::nccl`] bindings;
//! [`check`], which turns an `ncclResult_t` into a [`NcclError`] carrying `ncclGetErrorString` and
//! `ncclGetLastError` text; and the safe types here: [`Nccl`] (the opened library, its version
//! checked), [`UniqueId`] (the 128 bytes rank 0 sends through a rendezvous) and [`Communicator`]
//! (RAII: `ncclCommDestroy` on drop, unless it was aborted).
//!
//! The library is found by the dynamic loader's ordinary search (`LD_LIBRARY_PATH`, the ld.so cache,
//! the system directories), so the copy in PyTorch's `nvidia-nccl-cu12`/`-cu13` wheel works once its
//! `lib` directory is on `LD_LIBRARY_PATH`; or by an explicit path ([`Nccl::open_path`]).
//! Nothing here panics when the library is missing, too old or lacks a symbol: each is an error.
//!
//! Bring-up shapes this API supports:
//! - one rank per process: rank 0 calls [`Nccl::unique_id`], sends [`UniqueId::as_bytes`] to the
//!   others, each binds its GPU to the thread and calls [`Communicator::init_rank`];
//! - one process driving every GPU of a host: [`Communicator::init_all`] over device ordinals, then
//!   one [`Communicator::all_reduce`] per GPU inside [`Nccl::group`].

use std::ffi::{c_int, c_void, CStr, OsStr};
use std::fmt;
use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::sys::nccl as sys;

pub mod check;

/// The file name the loader is asked for: NCCL's soname, the only name its pip wheels ship.
pub const LIBRARY_NAME: &str = "libnccl.so.2";

/// The `libnccl.so.2` of NVIDIA's NCCL wheel (`nvidia-nccl-cu12`/`-cu13`, which PyTorch's CUDA
/// wheels also pull in) installed in the Python virtual environment at `venv`, if there is one.
pub fn wheel_library(venv: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|d| {
            d.path()
                .join("site-packages/nvidia/nccl/lib")
                .join(LIBRARY_NAME)
        })
        .find(|p| p.is_file())
}

/// The size of an NCCL unique id in bytes (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = sys::NCCL_UNIQUE_ID_BYTES as usize;

/// An NCCL release, decoded from `ncclGetVersion`'s integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NcclVersion {
    /// Major version (2 for every NCCL in use today).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl NcclVersion {
    /// The oldest NCCL this crate accepts by default: 2.18, the release PyTorch 2.1's wheels
    /// shipped. Every function bound here (`ncclGetLastError` arrived in 2.13) exists there.
    pub const MINIMUM: NcclVersion = NcclVersion {
        major: 2,
        minor: 18,
        patch: 0,
    };

    /// Decodes `ncclGetVersion`'s integer, the inverse of nccl.h's `NCCL_VERSION(X,Y,Z)`: releases
    /// up to 2.8 encode `X*1000 + Y*100 + Z`, later ones `X*10000 + Y*100 + Z`.
    pub fn from_code(code: u32) -> NcclVersion {
        if code < 10_000 {
            NcclVersion {
                major: code / 1000,
                minor: (code % 1000) / 100,
                patch: code % 100,
            }
        } else {
            NcclVersion {
                major: code / 10_000,
                minor: (code / 100) % 100,
                patch: code % 100,
            }
        }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// An `ncclResult_t` other than `ncclSuccess`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclStatus {
    /// `ncclUnhandledCudaError`: a CUDA call inside NCCL failed.
    UnhandledCudaError,
    /// `ncclSystemError`: a system call failed (socket, shared memory, ...).
    SystemError,
    /// `ncclInternalError`: an NCCL bug or a corrupted state.
    InternalError,
    /// `ncclInvalidArgument`: a bad argument (pointer, count, rank, ...).
    InvalidArgument,
    /// `ncclInvalidUsage`: a call out of order (e.g. two ranks on one GPU).
    InvalidUsage,
    /// `ncclRemoteError`: a peer failed or went away.
    RemoteError,
    /// `ncclInProgress`: a non-blocking operation has not finished.
    InProgress,
    /// `ncclTimeout`: an operation timed out.
    Timeout,
    /// A code this crate does not know (a newer NCCL).
    Other(u32),
}

impl NcclStatus {
    /// The status of a raw result code, `None` for `ncclSuccess`.
    pub fn from_raw(code: u32) -> Option<NcclStatus> {
        Some(match code {
            sys::ncclSuccess => return None,
            sys::ncclUnhandledCudaError => NcclStatus::UnhandledCudaError,
            sys::ncclSystemError => NcclStatus::SystemError,
            sys::ncclInternalError => NcclStatus::InternalError,
            sys::ncclInvalidArgument => NcclStatus::InvalidArgument,
            sys::ncclInvalidUsage => NcclStatus::InvalidUsage,
            sys::ncclRemoteError => NcclStatus::RemoteError,
            sys::ncclInProgress => NcclStatus::InProgress,
            sys::ncclTimeout => NcclStatus::Timeout,
            other => NcclStatus::Other(other),
        })
    }

    /// The raw `ncclResult_t` value.
    pub fn raw(self) -> u32 {
        match self {
            NcclStatus::UnhandledCudaError => sys::ncclUnhandledCudaError,
            NcclStatus::SystemError => sys::ncclSystemError,
            NcclStatus::InternalError => sys::ncclInternalError,
            NcclStatus::InvalidArgument => sys::ncclInvalidArgument,
            NcclStatus::InvalidUsage => sys::ncclInvalidUsage,
            NcclStatus::RemoteError => sys::ncclRemoteError,
            NcclStatus::InProgress => sys::ncclInProgress,
            NcclStatus::Timeout => sys::ncclTimeout,
            NcclStatus::Other(code) => code,
        }
    }
}

/// Why an NCCL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// The library could not be opened (not installed, not on the loader's path, wrong file).
    #[error(
        "cannot open the NCCL library {library}: {reason}. Install NCCL (the pip wheel \
         nvidia-nccl-cu12 or nvidia-nccl-cu13, or the system package libnccl2) and put the \
         directory holding {LIBRARY_NAME} on LD_LIBRARY_PATH, or give its full path"
    )]
    NotFound {
        /// The name or path that was tried.
        library: String,
        /// The loader's own message (dlerror).
        reason: String,
    },
    /// The library opened but lacks a function trainctl calls: it is too old or not NCCL.
    #[error(
        "{library} lacks the function {symbol}: it is not NCCL, or an NCCL older than {}; \
         install NCCL {} or newer",
        NcclVersion::MINIMUM,
        NcclVersion::MINIMUM
    )]
    MissingSymbol {
        /// The library that was opened.
        library: String,
        /// The missing function.
        symbol: &'static str,
    },
    /// The library is older than required.
    #[error(
        "{library} is NCCL {found}, older than the {required} trainctl needs; install a newer NCCL"
    )]
    TooOld {
        /// The library that was opened.
        library: String,
        /// Its version.
        found: NcclVersion,
        /// The minimum that was asked for.
        required: NcclVersion,
    },
    /// An NCCL call returned an error.
    #[error("{call} failed: {status:?} ({message}){}", last_error_suffix(.last_error))]
    Call {
        /// The NCCL function that failed, e.g. `ncclCommInitRank`.
        call: &'static str,
        /// Its result code.
        status: NcclStatus,
        /// `ncclGetErrorString` for the code.
        message: String,
        /// `ncclGetLastError`: NCCL's description of what went wrong, empty when it has none.
        last_error: String,
    },
    /// A caller's argument was refused before NCCL was called.
    #[error("invalid argument to {call}: {reason}")]
    InvalidArgument {
        /// The function that was called.
        call: &'static str,
        /// What was wrong and what is accepted.
        reason: String,
    },
    /// The communicator was aborted; it cannot be used any more.
    #[error("the NCCL communicator was aborted")]
    Aborted,
    /// No CUDA driver library on this host: nothing can run on a GPU.
    #[error(
        "the CUDA driver library (libcuda.so) is not installed on this host; NCCL needs a GPU"
    )]
    NoCuda,
    /// A check's all-reduce produced a wrong value.
    #[error(
        "all-reduce gave a wrong result: rank {rank}, element {index} is {got}, expected {want}"
    )]
    WrongResult {
        /// The rank whose buffer was wrong.
        rank: usize,
        /// The first wrong element.
        index: usize,
        /// Its value.
        got: f64,
        /// The value it should have had.
        want: f64,
    },
    /// A CUDA driver call made by this module (through cudarc) failed.
    #[error("CUDA call failed: {0}")]
    Cuda(#[from] cudarc::driver::DriverError),
}

fn last_error_suffix(last_error: &str) -> String {
    if last_error.is_empty() {
        String::new()
    } else {
        format!(": {last_error}")
    }
}

/// The functions this module calls; each must be present after opening.
const REQUIRED_SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommInitAll",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclCommGetAsyncError",
    "ncclCommCount",
    "ncclCommCuDevice",
    "ncclCommUserRank",
    "ncclAllReduce",
    "ncclGroupStart",
    "ncclGroupEnd",
];

fn missing_symbol(lib: &sys::NcclLib) -> Option<&'static str> {
    let present = [
        lib.ncclGetVersion.is_ok(),
        lib.ncclGetUniqueId.is_ok(),
        lib.ncclCommInitRank.is_ok(),
        lib.ncclCommInitAll.is_ok(),
        lib.ncclCommDestroy.is_ok(),
        lib.ncclCommAbort.is_ok(),
        lib.ncclGetErrorString.is_ok(),
        lib.ncclGetLastError.is_ok(),
        lib.ncclCommGetAsyncError.is_ok(),
        lib.ncclCommCount.is_ok(),
        lib.ncclCommCuDevice.is_ok(),
        lib.ncclCommUserRank.is_ok(),
        lib.ncclAllReduce.is_ok(),
        lib.ncclGroupStart.is_ok(),
        lib.ncclGroupEnd.is_ok(),
    ];
    REQUIRED_SYMBOLS
        .iter()
        .zip(present)
        .find(|(_, ok)| !ok)
        .map(|(name, _)| *name)
}

/// The opened NCCL library, every function this module calls present and its version checked.
///
/// The library is never unloaded, even when the last `Arc<Nccl>` goes: NCCL keeps threads of its
/// own (the bootstrap root that `ncclGetUniqueId` starts, proxy threads), and unmapping their code
/// under them would crash the process.
pub struct Nccl {
    lib: ManuallyDrop<sys::NcclLib>,
    library: String,
    version: NcclVersion,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl")
            .field("library", &self.library)
            .field("version", &self.version)
            .finish()
    }
}

impl Nccl {
    /// Opens `libnccl.so.2` through the loader's ordinary search, requiring
    /// [`NcclVersion::MINIMUM`].
    pub fn open() -> Result<Arc<Nccl>, NcclError> {
        Nccl::open_with(OsStr::new(LIBRARY_NAME), NcclVersion::MINIMUM)
    }

    /// Opens the NCCL library at `path` (a file path, or a bare name for the loader to search),
    /// requiring [`NcclVersion::MINIMUM`].
    pub fn open_path(path: &Path) -> Result<Arc<Nccl>, NcclError> {
        Nccl::open_with(path.as_os_str(), NcclVersion::MINIMUM)
    }

    /// Opens `library` (a name for the loader to search, or a path) and requires version `minimum`.
    pub fn open_with(library: &OsStr, minimum: NcclVersion) -> Result<Arc<Nccl>, NcclError> {
        let name = library.to_string_lossy().into_owned();
        // SAFETY: opening a shared library runs its initialisers; NCCL's only set up internal
        // state and have no preconditions. The symbols are looked up by the names nccl.h
        // declares, with the signatures bindgen generated from that header.
        let lib = unsafe { sys::NcclLib::new(library) }.map_err(|e| NcclError::NotFound {
            library: name.clone(),
            reason: crate::error_chain(&e),
        })?;
        if let Some(symbol) = missing_symbol(&lib) {
            return Err(NcclError::MissingSymbol {
                library: name,
                symbol,
            });
        }
        let mut code: c_int = 0;
        // SAFETY: `ncclGetVersion` is present (checked above) and writes one int through a valid
        // pointer to a live local.
        let status = unsafe { lib.ncclGetVersion(&mut code) };
        let nccl = Nccl {
            lib: ManuallyDrop::new(lib),
            library: name,
            version: NcclVersion::from_code(0),
        };
        nccl.check("ncclGetVersion", status)?;
        let version = NcclVersion::from_code(u32::try_from(code).unwrap_or(0));
        if version < minimum {
            return Err(NcclError::TooOld {
                library: nccl.library,
                found: version,
                required: minimum,
            });
        }
        Ok(Arc::new(Nccl { version, ..nccl }))
    }

    /// The library's version (`ncclGetVersion`).
    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// The name or path the library was opened by.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// A new unique id (`ncclGetUniqueId`), made by rank 0 and sent to every other rank. Works
    /// without a GPU: NCCL only picks a network interface and a port.
    pub fn unique_id(&self) -> Result<UniqueId, NcclError> {
        let mut id = sys::ncclUniqueId::default();
        // SAFETY: the symbol is present (checked at open); `id` is a live, writable ncclUniqueId.
        let status = unsafe { self.lib.ncclGetUniqueId(&mut id) };
        self.check("ncclGetUniqueId", status)?;
        Ok(UniqueId(id.internal.map(|b| b as u8)))
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`, so that collectives issued inside it
    /// on several communicators (one per GPU, from one thread) progress together. `ncclGroupEnd`
    /// is called even when `f` fails; `f`'s error wins over the group's.
    pub fn group<R>(&self, f: impl FnOnce() -> Result<R, NcclError>) -> Result<R, NcclError> {
        // SAFETY: the symbol is present (checked at open); group calls take no arguments.
        let status = unsafe { self.lib.ncclGroupStart() };
        self.check("ncclGroupStart", status)?;
        let result = f();
        // SAFETY: as above; this closes the group opened just before.
        let status = unsafe { self.lib.ncclGroupEnd() };
        let end = self.check("ncclGroupEnd", status);
        let value = result?;
        end.map(|()| value)
    }

    /// Turns a result code into `Ok` or a [`NcclError::Call`] with NCCL's error strings.
    fn check(&self, call: &'static str, status: sys::ncclResult_t) -> Result<(), NcclError> {
        self.check_comm(call, status, std::ptr::null_mut())
    }

    fn check_comm(
        &self,
        call: &'static str,
        status: sys::ncclResult_t,
        comm: sys::ncclComm_t,
    ) -> Result<(), NcclError> {
        let Some(status) = NcclStatus::from_raw(status) else {
            return Ok(());
        };
        // SAFETY: both symbols are present (checked at open). `ncclGetErrorString` accepts any
        // code and returns a static string; `ncclGetLastError` accepts NULL (the last error of
        // any call) or a communicator that is still alive, which `comm` is at every call site.
        let (message, last_error) = unsafe {
            (
                c_string(self.lib.ncclGetErrorString(status.raw())),
                c_string(self.lib.ncclGetLastError(comm)),
            )
        };
        Err(NcclError::Call {
            call,
            status,
            message,
            last_error,
        })
    }
}

/// Copies a C string owned by the library; NULL becomes "".
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for the duration of the call.
unsafe fn c_string(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated by the caller's contract.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The 128-byte id that names one NCCL communicator before it exists: rank 0 makes it, every rank
/// passes the same bytes to [`Communicator::init_rank`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

impl UniqueId {
    /// The id's bytes, to send through a rendezvous or store.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    /// An id received from rank 0; exactly [`UNIQUE_ID_BYTES`] bytes are accepted.
    pub fn from_bytes(bytes: &[u8]) -> Result<UniqueId, NcclError> {
        let array: [u8; UNIQUE_ID_BYTES] =
            bytes.try_into().map_err(|_| NcclError::InvalidArgument {
                call: "UniqueId::from_bytes",
                reason: format!(
                    "an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {}",
                    bytes.len()
                ),
            })?;
        Ok(UniqueId(array))
    }

    fn to_sys(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first bytes hold the socket address NCCL listens on; enough to tell ids apart.
        write!(f, "UniqueId(")?;
        for b in &self.0[..16] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Element types NCCL reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `ncclInt8`.
    I8,
    /// `ncclUint8`.
    U8,
    /// `ncclInt32`.
    I32,
    /// `ncclUint32`.
    U32,
    /// `ncclInt64`.
    I64,
    /// `ncclUint64`.
    U64,
    /// `ncclFloat16`.
    F16,
    /// `ncclFloat32`.
    F32,
    /// `ncclFloat64`.
    F64,
    /// `ncclBfloat16`.
    BF16,
}

impl DataType {
    /// The raw `ncclDataType_t`.
    pub fn raw(self) -> sys::ncclDataType_t {
        match self {
            DataType::I8 => sys::ncclInt8,
            DataType::U8 => sys::ncclUint8,
            DataType::I32 => sys::ncclInt32,
            DataType::U32 => sys::ncclUint32,
            DataType::I64 => sys::ncclInt64,
            DataType::U64 => sys::ncclUint64,
            DataType::F16 => sys::ncclFloat16,
            DataType::F32 => sys::ncclFloat32,
            DataType::F64 => sys::ncclFloat64,
            DataType::BF16 => sys::ncclBfloat16,
        }
    }

    /// The size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 => 1,
            DataType::F16 | DataType::BF16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }
}

/// Rust element types with an NCCL data type, for the typed [`Communicator::all_reduce`].
pub trait NcclType: DeviceRepr {
    /// The matching NCCL type.
    const DATA_TYPE: DataType;
}

macro_rules! nccl_type {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl NcclType for $t { const DATA_TYPE: DataType = DataType::$d; })*
    };
}
nccl_type!(i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64);

/// Reduction operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// `ncclSum`.
    Sum,
    /// `ncclProd`.
    Prod,
    /// `ncclMax`.
    Max,
    /// `ncclMin`.
    Min,
    /// `ncclAvg` (the sum divided by the number of ranks).
    Avg,
}

impl ReduceOp {
    /// The raw `ncclRedOp_t`.
    pub fn raw(self) -> sys::ncclRedOp_t {
        match self {
            ReduceOp::Sum => sys::ncclSum,
            ReduceOp::Prod => sys::ncclProd,
            ReduceOp::Max => sys::ncclMax,
            ReduceOp::Min => sys::ncclMin,
            ReduceOp::Avg => sys::ncclAvg,
        }
    }
}

/// Checks a rank and world size before they reach NCCL.
pub fn validate_rank(world_size: usize, rank: usize) -> Result<(c_int, c_int), NcclError> {
    let invalid = |reason: String| NcclError::InvalidArgument {
        call: "ncclCommInitRank",
        reason,
    };
    let world = c_int::try_from(world_size)
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| {
            invalid(format!(
                "world size {world_size}: accepted 1 to {}",
                c_int::MAX
            ))
        })?;
    let rank_c = c_int::try_from(rank)
        .ok()
        .filter(|r| *r < world)
        .ok_or_else(|| {
            invalid(format!(
                "rank {rank}: accepted 0 to {} for world size {world_size}",
                world - 1
            ))
        })?;
    Ok((world, rank_c))
}

/// One rank's NCCL communicator. `ncclCommDestroy` runs on drop, unless [`Communicator::abort`]
/// ran first.
///
/// Calls that enqueue work on the communicator are serialised by an internal lock (NCCL does not
/// allow two threads to use one communicator at once). [`Communicator::abort`] and
/// [`Communicator::async_error`] do not take that lock: a watchdog thread holding an
/// `Arc<Communicator>` can abort a communicator whose owner is blocked inside NCCL, the way NCCL
/// documents `ncclCommAbort` for a dead peer.
pub struct Communicator {
    nccl: Arc<Nccl>,
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
    op_lock: Mutex<()>,
}

// SAFETY: an `ncclComm_t` is a heap object of the NCCL library, not tied to the thread that made
// it; NCCL requires only that one thread at a time issues work on it, which `op_lock` ensures, and
// documents `ncclCommAbort`/`ncclCommGetAsyncError` as callable from another thread.
unsafe impl Send for Communicator {}
// SAFETY: see `Send`: every `&self` method that enqueues work takes `op_lock`.
unsafe impl Sync for Communicator {}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("comm", &self.comm)
            .field("aborted", &self.aborted.load(Ordering::Relaxed))
            .finish()
    }
}

impl Communicator {
    /// Joins the communicator named by `id` as `rank` of `world_size` (`ncclCommInitRank`).
    /// Blocks until every rank has joined.
    ///
    /// The GPU is the calling thread's current CUDA device: bind it first (cudarc's
    /// `CudaContext::bind_to_thread`). NCCL refuses two ranks of one communicator on one GPU.
    pub fn init_rank(
        nccl: &Arc<Nccl>,
        id: &UniqueId,
        world_size: usize,
        rank: usize,
    ) -> Result<Communicator, NcclError> {
        let (world, rank) = validate_rank(world_size, rank)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: the symbol is present (checked at open); `comm` is a live out-pointer; the id is
        // passed by value as nccl.h declares; world and rank were checked to be in range.
        let status = unsafe {
            nccl.lib
                .ncclCommInitRank(&mut comm, world, id.to_sys(), rank)
        };
        nccl.check_comm("ncclCommInitRank", status, comm)?;
        Ok(Communicator::wrap(nccl, comm))
    }

    /// One communicator per listed CUDA device ordinal, all in this process (`ncclCommInitAll`):
    /// the single-host shape, where element `i` is rank `i` on `devices[i]`.
    pub fn init_all(nccl: &Arc<Nccl>, devices: &[i32]) -> Result<Vec<Communicator>, NcclError> {
        let count = c_int::try_from(devices.len())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| NcclError::InvalidArgument {
                call: "ncclCommInitAll",
                reason: format!("{} devices given: accepted 1 or more", devices.len()),
            })?;
        let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: the symbol is present; `comms` has room for `count` handles and `devices` holds
        // `count` ordinals, both alive for the call.
        let status = unsafe {
            nccl.lib
                .ncclCommInitAll(comms.as_mut_ptr(), count, devices.as_ptr())
        };
        nccl.check("ncclCommInitAll", status)?;
        Ok(comms
            .into_iter()
            .map(|comm| Communicator::wrap(nccl, comm))
            .collect())
    }

    fn wrap(nccl: &Arc<Nccl>, comm: sys::ncclComm_t) -> Communicator {
        Communicator {
            nccl: Arc::clone(nccl),
            comm,
            aborted: AtomicBool::new(false),
            op_lock: Mutex::new(()),
        }
    }

    fn live(&self) -> Result<(), NcclError> {
        if self.aborted.load(Ordering::Acquire) {
            Err(NcclError::Aborted)
        } else {
            Ok(())
        }
    }

    fn query(
        &self,
        call: &'static str,
        f: impl FnOnce(sys::ncclComm_t, *mut c_int) -> u32,
    ) -> Result<usize, NcclError> {
        self.live()?;
        let mut value: c_int = 0;
        let status = f(self.comm, &mut value);
        self.nccl.check_comm(call, status, self.comm)?;
        Ok(usize::try_from(value).unwrap_or(0))
    }

    /// This communicator's rank (`ncclCommUserRank`).
    pub fn rank(&self) -> Result<usize, NcclError> {
        // SAFETY: the symbol is present; the communicator is alive (not aborted, not dropped) and
        // the out-pointer is a live local.
        self.query("ncclCommUserRank", |c, v| unsafe {
            self.nccl.lib.ncclCommUserRank(c, v)
        })
    }

    /// The number of ranks (`ncclCommCount`).
    pub fn world_size(&self) -> Result<usize, NcclError> {
        // SAFETY: as for `rank`.
        self.query("ncclCommCount", |c, v| unsafe {
            self.nccl.lib.ncclCommCount(c, v)
        })
    }

    /// The CUDA device ordinal this rank runs on (`ncclCommCuDevice`).
    pub fn device(&self) -> Result<usize, NcclError> {
        // SAFETY: as for `rank`.
        self.query("ncclCommCuDevice", |c, v| unsafe {
            self.nccl.lib.ncclCommCuDevice(c, v)
        })
    }

    /// An error NCCL met in the background (a peer died, a network failure), or `None`
    /// (`ncclCommGetAsyncError`). Poll it while waiting on a stream; on an error, [`abort`].
    ///
    /// [`abort`]: Communicator::abort
    pub fn async_error(&self) -> Result<Option<NcclError>, NcclError> {
        self.live()?;
        let mut async_status: sys::ncclResult_t = sys::ncclSuccess;
        // SAFETY: the symbol is present; the communicator is alive; the out-pointer is a live
        // local. NCCL documents this call as safe from any thread.
        let status = unsafe {
            self.nccl
                .lib
                .ncclCommGetAsyncError(self.comm, &mut async_status)
        };
        self.nccl
            .check_comm("ncclCommGetAsyncError", status, self.comm)?;
        Ok(self
            .nccl
            .check_comm("(asynchronous)", async_status, self.comm)
            .err())
    }

    /// Aborts the communicator (`ncclCommAbort`): pending operations stop, its resources are
    /// freed, and every later call on it returns [`NcclError::Aborted`]. Safe to call from another
    /// thread while the owner is blocked in NCCL; only the first call has an effect.
    pub fn abort(&self) -> Result<(), NcclError> {
        if self.aborted.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // SAFETY: the symbol is present; the flag swap above makes this the only abort, and drop
        // skips `ncclCommDestroy` once the flag is set, so the handle is freed exactly once.
        let status = unsafe { self.nccl.lib.ncclCommAbort(self.comm) };
        self.nccl.check("ncclCommAbort", status)
    }

    /// All-reduce of `count` elements from `send` into `recv` on `stream` (`ncclAllReduce`). The
    /// call only enqueues the work; synchronise the stream to wait for it. `send == recv` is an
    /// in-place all-reduce.
    ///
    /// # Safety
    /// - `send` and `recv` are device pointers on this communicator's GPU (or pointers NCCL can
    ///   reach there, such as registered host memory), each valid for `count` elements of `dtype`
    ///   until the work on `stream` completes, and not freed or written by anything else before.
    /// - `stream` is NULL (the legacy default stream) or a live CUDA stream of this
    ///   communicator's device.
    pub unsafe fn all_reduce_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        op: ReduceOp,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        let _guard = self.op_lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.live()?;
        // SAFETY: the symbol is present and the communicator alive (checked under the op lock, so
        // no other enqueue runs at the same time); the buffers and stream are valid by this
        // function's contract; dtype and op are values nccl.h defines.
        let status = unsafe {
            self.nccl.lib.ncclAllReduce(
                send,
                recv,
                count,
                dtype.raw(),
                op.raw(),
                self.comm,
                stream.cast(),
            )
        };
        self.nccl.check_comm("ncclAllReduce", status, self.comm)
    }

    /// All-reduce of device buffers allocated with cudarc, on `stream`: `recv[i] = op(send[i] of
    /// every rank)`. Refuses buffers of different lengths, or a stream of another GPU than this
    /// communicator's.
    pub fn all_reduce<T: NcclType>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
        stream: &CudaStream,
    ) -> Result<(), NcclError> {
        let (count, stream_ptr) = self.check_buffers(
            send.len(),
            recv.len(),
            &[send.ordinal(), recv.ordinal()],
            stream,
        )?;
        let (send_ptr, _send_sync) = send.device_ptr(stream);
        let (recv_ptr, _recv_sync) = recv.device_ptr_mut(stream);
        // SAFETY: both slices live on the stream's device, which `check_buffers` found to be this
        // communicator's, hold `count` elements of `T`, and stay borrowed (and so alive and not
        // written by Rust code) until the guards that make later users of them wait for the
        // stream are dropped after this call.
        unsafe {
            self.all_reduce_raw(
                send_ptr as *const c_void,
                recv_ptr as *mut c_void,
                count,
                T::DATA_TYPE,
                op,
                stream_ptr,
            )
        }
    }

    /// In-place all-reduce of one cudarc device buffer on `stream`.
    pub fn all_reduce_in_place<T: NcclType>(
        &self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
        stream: &CudaStream,
    ) -> Result<(), NcclError> {
        let (count, stream_ptr) =
            self.check_buffers(buf.len(), buf.len(), &[buf.ordinal()], stream)?;
        let (ptr, _sync) = buf.device_ptr_mut(stream);
        // SAFETY: as in `all_reduce`, with one buffer used as both input and output, which NCCL
        // documents as the in-place form.
        unsafe {
            self.all_reduce_raw(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::DATA_TYPE,
                op,
                stream_ptr,
            )
        }
    }

    fn check_buffers(
        &self,
        send_len: usize,
        recv_len: usize,
        buffer_devices: &[usize],
        stream: &CudaStream,
    ) -> Result<(usize, *mut c_void), NcclError> {
        let device = self.device()?;
        check_all_reduce_args(
            send_len,
            recv_len,
            buffer_devices,
            stream.context().ordinal(),
            device,
        )?;
        Ok((send_len, stream.cu_stream().cast()))
    }
}

/// Checks a typed all-reduce's arguments: equal lengths, and buffers and stream on the
/// communicator's device.
pub fn check_all_reduce_args(
    send_len: usize,
    recv_len: usize,
    buffer_devices: &[usize],
    stream_device: usize,
    comm_device: usize,
) -> Result<(), NcclError> {
    let invalid = |reason: String| NcclError::InvalidArgument {
        call: "ncclAllReduce",
        reason,
    };
    if send_len != recv_len {
        return Err(invalid(format!(
            "send has {send_len} elements and recv {recv_len}: they must be equal"
        )));
    }
    if stream_device != comm_device {
        return Err(invalid(format!(
            "the stream is on CUDA device {stream_device}, the communicator on {comm_device}"
        )));
    }
    if let Some(other) = buffer_devices.iter().find(|d| **d != comm_device) {
        return Err(invalid(format!(
            "a buffer is on CUDA device {other}, the communicator on {comm_device}"
        )));
    }
    Ok(())
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if *self.aborted.get_mut() {
            return;
        }
        // SAFETY: the symbol is present; the communicator was made by NCCL, was not aborted, and
        // `drop` runs once with no other user (it holds `&mut self`). A failure cannot be
        // reported from drop; the resources are then leaked, not freed twice.
        let _ = unsafe { self.nccl.lib.ncclCommDestroy(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wheel_library_is_found_in_a_venvs_site_packages_only() {
        let venv = std::env::temp_dir().join(format!("trainctl-ffi-venv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&venv);
        assert_eq!(wheel_library(&venv), None, "no venv");
        let lib = venv.join("lib/python3.11/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        assert_eq!(
            wheel_library(&venv),
            None,
            "a venv without the library file"
        );
        std::fs::write(lib.join(LIBRARY_NAME), b"").unwrap();
        assert_eq!(wheel_library(&venv), Some(lib.join(LIBRARY_NAME)));
        std::fs::remove_dir_all(&venv).unwrap();
    }

    #[test]
    fn version_codes_decode_in_both_encodings() {
        let cases = [
            (2708, (2, 7, 8)),
            (2804, (2, 8, 4)),
            (21805, (2, 18, 5)),
            (22803, (2, 28, 3)),
            (23007, (2, 30, 7)),
            (30000, (3, 0, 0)),
        ];
        for (code, (major, minor, patch)) in cases {
            assert_eq!(
                NcclVersion::from_code(code),
                NcclVersion {
                    major,
                    minor,
                    patch
                },
                "code {code}"
            );
        }
        assert_eq!(
            NcclVersion::from_code(sys::NCCL_VERSION_CODE).to_string(),
            "2.30.7"
        );
    }

    #[test]
    fn versions_order_by_release() {
        let v = |major, minor, patch| NcclVersion {
            major,
            minor,
            patch,
        };
        assert!(v(2, 9, 0) > v(2, 8, 4));
        assert!(v(2, 18, 0) > v(2, 17, 9));
        assert!(NcclVersion::from_code(2708) < NcclVersion::MINIMUM);
        assert!(NcclVersion::from_code(21805) >= NcclVersion::MINIMUM);
    }

    #[test]
    fn statuses_round_trip_and_success_is_none() {
        assert_eq!(NcclStatus::from_raw(sys::ncclSuccess), None);
        for code in 1..=9 {
            let status = NcclStatus::from_raw(code).expect("an error code");
            assert_eq!(status.raw(), code);
        }
        assert_eq!(NcclStatus::from_raw(6), Some(NcclStatus::RemoteError));
        assert_eq!(NcclStatus::from_raw(42), Some(NcclStatus::Other(42)));
    }

    #[test]
    fn unique_ids_take_exactly_128_bytes() {
        let bytes: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let id = UniqueId::from_bytes(&bytes).expect("128 bytes");
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        assert_eq!(UniqueId::from_bytes(id.as_bytes()).expect("round trip"), id);
        assert_eq!(id.to_sys().internal[127] as u8, 127);
        for len in [0, 127, 129, 256] {
            let err = UniqueId::from_bytes(&vec![0; len]).expect_err("wrong length");
            assert!(
                err.to_string()
                    .contains(&format!("is 128 bytes, got {len}")),
                "{err}"
            );
        }
    }

    #[test]
    fn ranks_are_checked_before_nccl() {
        let cases: [(usize, usize, Option<&str>); 6] = [
            (1, 0, None),
            (8, 7, None),
            (0, 0, Some("world size 0")),
            (4, 4, Some("rank 4: accepted 0 to 3")),
            (usize::MAX, 0, Some("world size")),
            (2, usize::MAX, Some("accepted 0 to 1")),
        ];
        for (world, rank, want) in cases {
            match (validate_rank(world, rank), want) {
                (Ok((w, r)), None) => assert_eq!((w as usize, r as usize), (world, rank)),
                (Err(e), Some(text)) => {
                    assert!(e.to_string().contains(text), "{world}/{rank}: {e}")
                }
                (got, want) => panic!("world {world} rank {rank}: got {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn data_types_match_nccl_and_sizes() {
        let cases = [
            (DataType::I8, 0, 1),
            (DataType::U8, 1, 1),
            (DataType::I32, 2, 4),
            (DataType::U32, 3, 4),
            (DataType::I64, 4, 8),
            (DataType::U64, 5, 8),
            (DataType::F16, 6, 2),
            (DataType::F32, 7, 4),
            (DataType::F64, 8, 8),
            (DataType::BF16, 9, 2),
        ];
        for (dtype, raw, size) in cases {
            assert_eq!((dtype.raw(), dtype.size_bytes()), (raw, size), "{dtype:?}");
        }
        assert_eq!(<f32 as NcclType>::DATA_TYPE, DataType::F32);
        let ops = [
            (ReduceOp::Sum, 0),
            (ReduceOp::Prod, 1),
            (ReduceOp::Max, 2),
            (ReduceOp::Min, 3),
            (ReduceOp::Avg, 4),
        ];
        for (op, raw) in ops {
            assert_eq!(op.raw(), raw, "{op:?}");
        }
    }

    #[test]
    fn a_missing_library_is_a_typed_error_naming_it() {
        let err =
            Nccl::open_path(Path::new("/nonexistent/libnccl.so.2")).expect_err("no such file");
        match &err {
            NcclError::NotFound { library, reason } => {
                assert_eq!(library, "/nonexistent/libnccl.so.2");
                assert!(reason.contains("No such file"), "{reason}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(err.to_string().contains("LD_LIBRARY_PATH"), "{err}");
    }

    #[test]
    fn a_library_that_is_not_nccl_lacks_its_symbols() {
        // libc is on every Linux host and has none of NCCL's functions.
        let err =
            Nccl::open_with(OsStr::new("libc.so.6"), NcclVersion::MINIMUM).expect_err("not NCCL");
        match err {
            NcclError::MissingSymbol { library, symbol } => {
                assert_eq!((library.as_str(), symbol), ("libc.so.6", "ncclGetVersion"));
            }
            other => panic!("expected MissingSymbol, got {other:?}"),
        }
    }

    #[test]
    fn all_reduce_arguments_must_match_the_communicators_device() {
        // (send len, recv len, buffer devices, stream device, communicator device, error piece)
        type Case = (
            usize,
            usize,
            &'static [usize],
            usize,
            usize,
            Option<&'static str>,
        );
        let cases: [Case; 5] = [
            (8, 8, &[1, 1], 1, 1, None),
            (8, 8, &[0], 0, 0, None),
            (8, 4, &[0, 0], 0, 0, Some("send has 8 elements and recv 4")),
            (
                8,
                8,
                &[0, 0],
                1,
                0,
                Some("the stream is on CUDA device 1, the communicator on 0"),
            ),
            (
                8,
                8,
                &[0, 2],
                0,
                0,
                Some("a buffer is on CUDA device 2, the communicator on 0"),
            ),
        ];
        for (send, recv, buffers, stream, comm, want) in cases {
            match (
                check_all_reduce_args(send, recv, buffers, stream, comm),
                want,
            ) {
                (Ok(()), None) => {}
                (Err(e), Some(text)) => assert!(e.to_string().contains(text), "{e}"),
                (got, want) => panic!(
                    "{send}/{recv}/{buffers:?}/{stream}/{comm}: got {got:?}, wanted {want:?}"
                ),
            }
        }
    }

    #[test]
    fn handles_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Nccl>();
        send_sync::<Communicator>();
        send_sync::<UniqueId>();
    }

    #[test]
    fn call_errors_carry_nccl_text() {
        let err = NcclError::Call {
            call: "ncclCommInitRank",
            status: NcclStatus::InvalidUsage,
            message: "invalid usage (run with NCCL_DEBUG=WARN for details)".into(),
            last_error: "Duplicate GPU detected".into(),
        };
        assert_eq!(
            err.to_string(),
            "ncclCommInitRank failed: InvalidUsage (invalid usage (run with NCCL_DEBUG=WARN for details)): \
             Duplicate GPU detected"
        );
        let quiet = NcclError::Call {
            call: "ncclGroupEnd",
            status: NcclStatus::Timeout,
            message: "timeout".into(),
            last_error: String::new(),
        };
        assert_eq!(quiet.to_string(), "ncclGroupEnd failed: Timeout (timeout)");
    }
}
