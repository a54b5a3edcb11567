//! `senet`: the command-line tool. Each subcommand lives in its own module.

mod bench;
mod gpu_bench;
mod info;
mod models;
mod verify;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Squeeze-and-Excitation: verify kernels, benchmark them, train and evaluate SE networks.
#[derive(Parser)]
#[command(name = "senet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every backend against the f64 reference (and the reference by finite differences).
    Verify(verify::Args),
    /// Time SE forward and backward on the GPU against a device-to-device copy.
    GpuBench(gpu_bench::Args),
    /// Print the build (kernels, nvcc, ptxas report) and the devices found.
    Info(info::Args),
    /// Time SE forward and backward per shape, layout, dtype and backend against a memcpy.
    Bench(bench::Args),
    /// List the model registry: parameters, GFLOPs and input size of each network.
    Models(models::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(a) => verify::run(a),
        Command::Info(a) => info::run(a),
        Command::GpuBench(a) => gpu_bench::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Models(a) => models::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
