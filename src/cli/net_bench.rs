//! `senet net-bench`: the time of one training step (forward, loss, backward, SGD update) and of
//! one inference forward of a whole network, per backend and batch size.

use super::train::open_cuda;
use crate::nn::{models, Backend, Cpu, Mode, Network, Profiled};
use crate::train::loss::cross_entropy;
use crate::train::optim::{step_with, LossScaler, Sgd};
use crate::train::{Device, Precision};
use crate::{rng, Error, Layout, Result, Tensor};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model from the registry (`senet models`).
    #[arg(long, default_value = "seresnet50")]
    model: String,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    batch: Vec<usize>,
    /// Input height and width (the model's own size when omitted).
    #[arg(long)]
    size: Option<usize>,
    /// cpu, cuda or cuda-emu.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// What to time: train (a full step), infer (forward in inference mode), or both.
    #[arg(long, value_delimiter = ',', default_value = "train,infer")]
    modes: Vec<String>,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also write the rows as CSV here.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Activations: f32 (exact), or bf16 / f16 (mixed precision: narrow activations, f32
    /// parameters, gradients and SGD state; f16 steps with loss scaling; CUDA devices only).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Layout of activations on the device: nchw, or nhwc (channels-last, the layout cuDNN's
    /// tensor-core convolutions prefer; CUDA devices only).
    #[arg(long, default_value = "nchw")]
    layout: crate::Layout,
    /// After timing, run this many more steps per batch and mode with every op timed (the
    /// device synchronised after each) and print where the time goes, by op kind.
    #[arg(long, default_value_t = 0)]
    profile: usize,
}

struct Row {
    batch: usize,
    mode: &'static str,
    median_ms: f64,
    min_ms: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.iters == 0 || args.batch.contains(&0) {
        return Err(Error::Config(
            "--iters and every --batch must be positive".into(),
        ));
    }
    let mut modes = Vec::new();
    for m in &args.modes {
        match m.as_str() {
            "train" => modes.push("train"),
            "infer" => modes.push("infer"),
            _ => return Err(Error::Config(format!("unknown mode `{m}` (train, infer)"))),
        }
    }
    super::train::check_layout(args.device, args.layout)?;
    let (device, layout) = (args.device, args.layout);
    let rows = match args.precision {
        Precision::F32 if device == Device::Cpu => bench(&Cpu, &args, &modes)?,
        Precision::F32 => bench(&open_cuda::<f32>(device, layout)?, &args, &modes)?,
        Precision::Bf16 => bench(&open_cuda::<half::bf16>(device, layout)?, &args, &modes)?,
        Precision::F16 => bench(&open_cuda::<half::f16>(device, layout)?, &args, &modes)?,
    };
    println!(
        "| model | device | precision | layout | batch | mode | median ms | min ms | images/s |"
    );
    println!("|---|---|---|---|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            args.model,
            args.device,
            args.precision,
            args.layout,
            r.batch,
            r.mode,
            r.median_ms,
            r.min_ms,
            r.batch as f64 / (r.median_ms / 1e3)
        );
    }
    if let Some(path) = &args.csv {
        let mut csv = String::from("model,device,precision,layout,batch,mode,median_ms,min_ms\n");
        for r in &rows {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{:.4},{:.4}\n",
                args.model,
                args.device,
                args.precision,
                args.layout,
                r.batch,
                r.mode,
                r.median_ms,
                r.min_ms
            ));
        }
        std::fs::write(path, csv).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The optimiser of a timed training step: SGD, with dynamic loss scaling for f16 activations
/// (as `senet train` steps).
struct Opt {
    sgd: Sgd,
    scaler: Option<LossScaler>,
}

/// One step of `mode` (a training step with the loss and the SGD update, or an inference
/// forward).
fn step<B: Backend<f32>>(
    be: &B,
    net: &mut Network<f32>,
    sgd: &mut Opt,
    x: &Tensor<f32>,
    labels: &[usize],
    mode: &str,
) -> Result<()> {
    if mode == "train" {
        let logits = net.forward(be, x.clone(), Mode::Train)?;
        let mut loss = cross_entropy(&logits, labels, 0.0)?;
        if let Some(sc) = &sgd.scaler {
            sc.scale_grad(&mut loss.grad);
        }
        net.zero_grad();
        net.backward(be, loss.grad)?;
        step_with(sgd.scaler.as_mut(), be, net, &mut sgd.sgd, 0.01)?;
    } else {
        net.forward(be, x.clone(), Mode::Infer)?;
    }
    Ok(())
}

/// Runs `steps` steps through a [`Profiled`] copy of the backend and prints the time per op
/// kind per step, with what the ops leave unexplained (host work: loss, SGD, layer glue).
#[allow(clippy::too_many_arguments)]
fn profile<B: Backend<f32> + Clone>(
    be: &B,
    net: &mut Network<f32>,
    sgd: &mut Opt,
    x: &Tensor<f32>,
    labels: &[usize],
    mode: &str,
    steps: usize,
    median_ms: f64,
) -> Result<()> {
    let p = Profiled::new(be.clone());
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&p, net, sgd, x, labels, mode)?;
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let ops = p.report();
    let in_ops: f64 = ops.iter().map(|o| o.total.as_secs_f64() * 1e3).sum::<f64>() / steps as f64;
    println!(
        "\nprofile: batch {} {mode}, {steps} step(s); profiled step {wall:.2} ms (unprofiled median \
         {median_ms:.2} ms)",
        x.shape().n
    );
    println!("| op | calls per step | ms per step | % of profiled step |");
    println!("|---|---:|---:|---:|");
    for o in &ops {
        let ms = o.total.as_secs_f64() * 1e3 / steps as f64;
        println!(
            "| {} | {} | {:.3} | {:.1} |",
            o.op,
            o.calls / steps as u64,
            ms,
            100.0 * ms / wall
        );
    }
    let rest = (wall - in_ops).max(0.0);
    println!(
        "| (outside the backend: loss, SGD, layer glue) | | {rest:.3} | {:.1} |",
        100.0 * rest / wall
    );
    Ok(())
}

fn bench<B: Backend<f32> + Clone>(be: &B, args: &Args, modes: &[&'static str]) -> Result<Vec<Row>> {
    let mut net: Network<f32> = models::create(&args.model, 0)?;
    net.set_input_grad(false);
    let (c, h, w) = net.input_size();
    let (h, w) = args.size.map_or((h, w), |s| (s, s));
    let classes = net.num_classes();
    let mut sgd = Opt {
        sgd: Sgd::new(0.9, 1e-4)?,
        scaler: (be.precision() == "f16").then(LossScaler::default),
    };
    // Parameters stay on a device backend across steps, as in `senet train`.
    net.bind(be)?;
    let mut rows = Vec::new();
    for &n in &args.batch {
        let shape = crate::Shape::try_new(n, c, h, w)?;
        let x = Tensor::from_vec(
            shape,
            Layout::Nchw,
            rng::uniform_vec(shape.numel(), -1.0, 1.0, n as u64),
        )?;
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        for &mode in modes {
            let mut times = Vec::with_capacity(args.iters);
            for it in 0..args.warmup + args.iters {
                eprint!(
                    "\r{} batch {n} {mode}: {}/{}   ",
                    args.model,
                    it + 1,
                    args.warmup + args.iters
                );
                let t0 = Instant::now();
                step(be, &mut net, &mut sgd, &x, &labels, mode)?;
                be.synchronize()?;
                if it >= args.warmup {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!();
            times.sort_by(f64::total_cmp);
            let median_ms = times[times.len() / 2];
            if args.profile > 0 {
                profile(
                    be,
                    &mut net,
                    &mut sgd,
                    &x,
                    &labels,
                    mode,
                    args.profile,
                    median_ms,
                )?;
            }
            rows.push(Row {
                batch: n,
                mode,
                median_ms,
                min_ms: times[0],
            });
        }
    }
    Ok(rows)
}
