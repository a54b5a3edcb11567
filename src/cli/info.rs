//! `senet info`: what this build carries and which devices it sees.

use crate::cuda::{self, CudaDevice};
use std::process::ExitCode;

/// Options of `senet info`.
#[derive(clap::Args)]
pub struct Args {
    /// Print ptxas's per-kernel resource report (registers, shared memory, stack, spills).
    #[arg(long)]
    kernels: bool,
}

pub fn run(args: Args) -> crate::Result<ExitCode> {
    println!("senet {}", env!("CARGO_PKG_VERSION"));
    if cuda::kernels_built() {
        println!(
            "kernels: built by {} for sm_{:?}",
            cuda::kernels::NVCC_VERSION,
            cuda::kernels::ARCHS
        );
    } else {
        println!("kernels: not built (no nvcc at build time)");
    }
    if args.kernels {
        let report = cuda::ptxas_report();
        let spills = report
            .lines()
            .filter(|l| {
                !l.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
            })
            .count();
        print!("{report}");
        println!(
            "{} kernel builds, {} with a stack frame or spills",
            report.lines().count(),
            spills
        );
    }
    match CudaDevice::new(0) {
        Ok(dev) => {
            let i = dev.info();
            println!(
                "device 0: {} (sm_{}{}, {} SMs, {} MiB L2, {} GiB, driver {})",
                i.name,
                i.compute_capability.0,
                i.compute_capability.1,
                i.sm_count,
                i.l2_bytes >> 20,
                i.total_memory >> 30,
                i.driver_version
            );
        }
        Err(e) => println!("device: none ({e})"),
    }
    match crate::nn::cudnn_version() {
        Ok(v) => println!(
            "cuDNN: {} (the CUDA network backend's convolutions on a GPU; SENET_CONV=own \
             picks senet's kernels)",
            crate::nn::cudnn_version_string(v)
        ),
        Err(e) => println!("cuDNN: not available ({e})"),
    }
    match crate::nn::cublas_available() {
        Ok(()) => println!(
            "cuBLAS: loads (im2col + cuBLAS GEMM convolutions on a GPU without cuDNN; \
             SENET_CONV=cublas asks for them)"
        ),
        Err(e) => println!("cuBLAS: not available ({e})"),
    }
    Ok(ExitCode::SUCCESS)
}
