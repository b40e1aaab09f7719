//! A single-host NCCL all-reduce over this host's GPUs, through trainctl-ffi: one communicator per
//! GPU from this one process (`ncclCommInitAll`), a checked sum, then timed iterations.
//!
//! ```text
//! cargo build --release -p trainctl-ffi --example nccl_all_reduce
//! LD_LIBRARY_PATH=/path/to/nvidia/nccl/lib target/release/examples/nccl_all_reduce [MiB] [iterations] [libnccl path]
//! ```
//! Defaults: 64 MiB per GPU, 20 iterations, `libnccl.so.2` from the loader path. Exits 1 with the
//! reason when there is no GPU, no NCCL, or the result is wrong.

use std::path::Path;
use std::process::ExitCode;

use trainctl_ffi::{cuda, nccl};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = match args.first().map(|a| a.parse()) {
        None => 64,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            return usage(&format!(
                "MiB must be a whole number above 0, got '{}'",
                args[0]
            ))
        }
    };
    let iterations: u32 = match args.get(1).map(|a| a.parse()) {
        None => 20,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            return usage(&format!(
                "iterations must be a whole number above 0, got '{}'",
                args[1]
            ))
        }
    };
    let library = match args.get(2) {
        Some(path) => nccl::Nccl::open_path(Path::new(path)),
        None => nccl::Nccl::open(),
    };
    let nccl = match library {
        Ok(nccl) => nccl,
        Err(e) => return fail(&e.to_string()),
    };
    let gpus = match cuda::cuda_devices() {
        Ok(gpus) if !gpus.is_empty() => gpus,
        Ok(_) => return fail("the CUDA driver sees no GPU"),
        Err(e) => return fail(&e.to_string()),
    };
    let devices: Vec<i32> = gpus.iter().map(|g| g.ordinal as i32).collect();
    println!(
        "NCCL {} ({}), {} GPUs: {:?}",
        nccl.version(),
        nccl.library(),
        devices.len(),
        gpus.iter().map(|g| &g.name).collect::<Vec<_>>()
    );
    let elements = mib * (1 << 20) / std::mem::size_of::<f32>();
    match nccl::check::single_host_all_reduce(&nccl, &devices, elements, iterations) {
        Ok(r) => {
            println!(
                "all-reduce ok: {} bytes x {} GPUs, {:?} per iteration over {}, algbw {:.1} GB/s, busbw {:.1} GB/s",
                r.bytes,
                r.devices.len(),
                r.time_per_iteration,
                r.iterations,
                r.algorithm_gb_per_s,
                r.bus_gb_per_s
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("nccl_all_reduce: {problem}\nusage: nccl_all_reduce [MiB per GPU] [iterations] [path to libnccl.so.2]");
    ExitCode::from(2)
}

fn fail(reason: &str) -> ExitCode {
    eprintln!("nccl_all_reduce: {reason}");
    ExitCode::FAILURE
}
