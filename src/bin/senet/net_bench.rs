//! `senet net-bench`: the time of one training step (forward, loss, backward, SGD update) and of
//! one inference forward of a whole network, per backend and batch size.

use crate::train::announce_cuda;
use senet::nn::{models, Backend, Cpu, Mode, Network};
use senet::train::loss::cross_entropy;
use senet::train::optim::Sgd;
use senet::train::Device;
use senet::{rng, Error, Layout, Result, Tensor};
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
    let rows = match args.device.cuda_backend()? {
        None => bench(&Cpu, &args, &modes)?,
        Some(b) => {
            announce_cuda(&b);
            bench(&b, &args, &modes)?
        }
    };
    println!("| model | device | batch | mode | median ms | min ms | images/s |");
    println!("|---|---|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            args.model,
            args.device,
            r.batch,
            r.mode,
            r.median_ms,
            r.min_ms,
            r.batch as f64 / (r.median_ms / 1e3)
        );
    }
    if let Some(path) = &args.csv {
        let mut csv = String::from("model,device,batch,mode,median_ms,min_ms\n");
        for r in &rows {
            csv.push_str(&format!(
                "{},{},{},{},{:.4},{:.4}\n",
                args.model, args.device, r.batch, r.mode, r.median_ms, r.min_ms
            ));
        }
        std::fs::write(path, csv).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn bench<B: Backend<f32>>(be: &B, args: &Args, modes: &[&'static str]) -> Result<Vec<Row>> {
    let mut net: Network<f32> = models::create(&args.model, 0)?;
    net.set_input_grad(false);
    let (c, h, w) = net.input_size();
    let (h, w) = args.size.map_or((h, w), |s| (s, s));
    let classes = net.num_classes();
    let mut sgd = Sgd::new(0.9, 1e-4)?;
    let mut rows = Vec::new();
    for &n in &args.batch {
        let shape = senet::Shape::try_new(n, c, h, w)?;
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
                if mode == "train" {
                    let logits = net.forward(be, x.clone(), Mode::Train)?;
                    let loss = cross_entropy(&logits, &labels, 0.0)?;
                    net.zero_grad();
                    net.backward(be, loss.grad)?;
                    sgd.step(&mut net, 0.01)?;
                } else {
                    net.forward(be, x.clone(), Mode::Infer)?;
                }
                if it >= args.warmup {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!();
            times.sort_by(f64::total_cmp);
            rows.push(Row {
                batch: n,
                mode,
                median_ms: times[times.len() / 2],
                min_ms: times[0],
            });
        }
    }
    Ok(rows)
}
