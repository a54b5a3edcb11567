//! `senet`: the command-line tool (feature `cli`). Each subcommand lives in its own module;
//! `src/bin/senet.rs` only calls [`main`], so the tool is compiled once, with the library.

mod ablate;
mod bench;
mod eval;
mod gpu_bench;
mod info;
mod models;
mod net_bench;
mod plot;
mod train;
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
    /// Time a whole network's training step and inference forward per backend and batch.
    NetBench(net_bench::Args),
    /// Train a network with the paper's recipe (scaled by options) into a run folder.
    Train(train::Args),
    /// Top-1 / top-5 of a checkpoint or run on a data set.
    Eval(eval::Args),
    /// The paper's ablations at small scale: no SE vs SE, ratio r, SE per stage, integration.
    Ablate(ablate::Args),
    /// Training curves of one or several runs on one chart.
    Plot(plot::Args),
}

/// Parses every string of a list option (`--dtypes f32,bf16`).
fn parse_all<T: std::str::FromStr<Err = crate::Error>>(items: &[String]) -> crate::Result<Vec<T>> {
    items.iter().map(|s| s.parse()).collect()
}

/// Runs the tool on the process's arguments; the exit code says whether the command succeeded.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(a) => verify::run(a),
        Command::Info(a) => info::run(a),
        Command::GpuBench(a) => gpu_bench::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Models(a) => models::run(a),
        Command::NetBench(a) => net_bench::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Ablate(a) => ablate::run(a),
        Command::Plot(a) => plot::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
