//! Run-time loaded bindings to vendor libraries.
//!
//! `trainctl-ffi` owns every call into a library that trainctl does not link at build time: today the
//! CUDA driver (`libcuda.so`, through cudarc with `dynamic-loading`); later NCCL (`libnccl.so.2`) and
//! libibverbs (`libibverbs.so.1`), each with bindings generated ahead of time and opened with
//! `dlopen` when first needed. One binary therefore starts on a laptop, a CPU-only host and a GPU
//! host alike: a missing library is an ordinary error value here, never a failure to start and
//! never a panic.
//!
//! Every `unsafe` block of the workspace that touches a vendor library lives in this crate, each with
//! a `// SAFETY:` line. The crate deliberately does not decide anything: it does not pick GPUs,
//! build NCCL environments, log, or retry. Callers above (the agent's discovery, the collective
//! layer) turn these facts and errors into decisions.
//!
//! # Layout
//! - [`cuda`]: is a CUDA driver present, and which devices does it see (name, memory, UUID).

pub mod cuda;
