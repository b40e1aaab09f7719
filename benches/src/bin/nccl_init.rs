//! NCCL bring-up through trainctl-ffi, one rank on one GPU, timed in stages, for the comparison
//! with torch's `init_process_group("nccl")` + first all-reduce that
//! `benches/scripts/nccl_init_driver.py` runs (issue 9: "not slower"). One process is one sample:
//! a CUDA context and NCCL's state are made once per process, as in a training job.
//!
//! Stages, each on the wall clock:
//! - `ctx_ms`: the CUDA context of the GPU (`CudaContext::new`), a stream, the buffer copied to
//!   the GPU (torch's side: `torch.cuda.init()`, `set_device`, the tensor);
//! - `init_ms`: `Nccl::open` (dlopen of `libnccl.so.2`), `ncclGetUniqueId`, `ncclCommInitRank`
//!   (torch's side: `init_process_group`);
//! - `first_allreduce_ms`: the first `ncclAllReduce` of `--elements` f32 and the stream's
//!   synchronisation (torch's side: the first `all_reduce` and `torch.cuda.synchronize()`,
//!   which is where torch 2.x creates its NCCL communicator unless given a device id);
//! - `bringup_ms` = `init_ms` + `first_allreduce_ms`, the figure compared, and `total_ms`.
//!
//! ```text
//! nccl_init [--elements N] [--device ORDINAL] [--library PATH]
//! ```
//! Prints one JSON line; exits 2 without a CUDA driver or GPU, 1 on any other failure.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use cudarc::driver::CudaContext;
use trainctl_ffi::cuda;
use trainctl_ffi::nccl::{Communicator, Nccl, ReduceOp};

/// Default buffer: 1 Mi f32 (4 MiB), as the driver's torch side.
const DEFAULT_ELEMENTS: usize = 1 << 20;

struct Args {
    elements: usize,
    device: usize,
    library: Option<String>,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut parsed = Args {
        elements: DEFAULT_ELEMENTS,
        device: 0,
        library: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--elements" => {
                parsed.elements = value.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("--elements `{value}`: expected a whole number above 0")
                })?
            }
            "--device" => {
                parsed.device = value
                    .parse()
                    .with_context(|| format!("--device `{value}`: expected a CUDA ordinal"))?
            }
            "--library" => parsed.library = Some(value.clone()),
            other => bail!(
                "unknown flag `{other}`; accepted: --elements N, --device ORDINAL, --library PATH"
            ),
        }
    }
    Ok(parsed)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nccl_init: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !cuda::driver_present() {
        eprintln!("nccl_init: no CUDA driver library (libcuda.so.1) on this host");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nccl_init: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<String> {
    let start = Instant::now();
    let ctx = CudaContext::new(args.device).context("open the GPU")?;
    ctx.bind_to_thread().context("bind the GPU")?;
    let stream = ctx.new_stream().context("create a stream")?;
    let mut buf = stream
        .clone_htod(&vec![1.0f32; args.elements])
        .context("copy the buffer to the GPU")?;
    stream.synchronize().context("synchronise")?;
    let ctx_ms = ms(start);

    let init = Instant::now();
    let nccl = match &args.library {
        Some(path) => Nccl::open_path(Path::new(path)),
        None => Nccl::open(),
    }?;
    let id = nccl.unique_id()?;
    let comm = Communicator::init_rank(&nccl, &id, 1, 0)?;
    let init_ms = ms(init);

    let first = Instant::now();
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, &stream)?;
    stream.synchronize().context("wait for the all-reduce")?;
    let first_allreduce_ms = ms(first);
    let total_ms = ms(start);

    let host = stream.clone_dtoh(&buf).context("copy the result back")?;
    if let Some((i, v)) = host.iter().enumerate().find(|(_, v)| **v != 1.0) {
        bail!("element {i} is {v} after a one-rank sum of 1.0");
    }
    Ok(format!(
        "{{\"impl\":\"trainctl\",\"nccl\":\"{}\",\"device\":{},\"elements\":{},\"ctx_ms\":{ctx_ms:.3},\"init_ms\":{init_ms:.3},\"first_allreduce_ms\":{first_allreduce_ms:.3},\"bringup_ms\":{:.3},\"total_ms\":{total_ms:.3}}}",
        nccl.version(),
        args.device,
        args.elements,
        init_ms + first_allreduce_ms
    ))
}
