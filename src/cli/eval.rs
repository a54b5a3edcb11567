//! `senet eval`: top-1 / top-5 of a checkpoint on a data set.

use super::train::Progress;
use crate::nn::Cpu;
use crate::train::trainer::{evaluate, subset, TEST_SUBSET, TRAIN_SUBSET};
use crate::train::{Augment, DataSpec, Dataset, Device, ModelSpec, Precision, TrainConfig};
use crate::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `senet eval`.
#[derive(clap::Args)]
pub struct Args {
    /// A run folder (its config gives model, data and normalisation; its model.safetensors is
    /// evaluated, or best.safetensors with --best), or a .safetensors checkpoint (then --model
    /// is needed, and the normalisation is measured on --data's training set).
    path: PathBuf,
    /// Evaluate the run's best.safetensors instead of its last model.safetensors.
    #[arg(long)]
    best: bool,
    /// Model for a bare checkpoint (a run folder's config names it).
    #[arg(long)]
    model: Option<String>,
    /// Data set [default: the run's, or digits].
    #[arg(long)]
    data: Option<DataSpec>,
    /// Evaluate the training split instead of the test split (evaluation transform).
    #[arg(long)]
    train_split: bool,
    /// Evaluate a fixed random subset of this many samples [default: the run's train_size or
    /// test_size (the same samples it was measured on), or all].
    #[arg(long)]
    size: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 250)]
    batch_size: usize,
    /// cpu; cuda (GPU 0); or cuda-emu (the CUDA backend on the CPU emulator, slow).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Activations: f32, or bf16 / f16 (mixed precision; --device cuda or cuda-emu).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Layout of activations on the device: nchw, or nhwc (channels-last, the layout cuDNN's
    /// tensor-core convolutions prefer; CUDA devices only).
    #[arg(long, default_value = "nchw")]
    layout: crate::Layout,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (model, data, augment, smoothing, checkpoint, sizes) = if args.path.is_dir() {
        let c = TrainConfig::load(&args.path)?;
        let file = if args.best {
            "best.safetensors"
        } else {
            "model.safetensors"
        };
        let model = match &args.model {
            Some(m) if *m != c.model.name => {
                return Err(Error::Config(format!(
                    "the run trained `{}`, not `{m}`",
                    c.model.name
                )))
            }
            _ => c.model,
        };
        (
            model,
            args.data.clone().unwrap_or(c.data),
            Some(c.augment),
            c.label_smoothing,
            args.path.join(file),
            (c.train_size, c.test_size),
        )
    } else {
        let model = args.model.clone().ok_or_else(|| {
            Error::Config(format!(
                "{} is not a run folder: pass --model for a bare checkpoint",
                args.path.display()
            ))
        })?;
        (
            ModelSpec::named(model),
            args.data.clone().unwrap_or(DataSpec::Digits),
            None,
            0.0,
            args.path.clone(),
            (None, None),
        )
    };
    let split = data.load()?;
    let augment = augment.unwrap_or_else(|| {
        Augment::defaults(
            split.kind,
            split.image_size,
            None,
            split.mean.clone(),
            split.std.clone(),
        )
    });
    let mut net = model.build(split.train.channels(), split.num_classes(), augment.crop)?;
    net.load_safetensors(&checkpoint)?;
    let ds: Arc<dyn Dataset> = if args.train_split {
        subset(&split.train, args.size.or(sizes.0), TRAIN_SUBSET)?
    } else {
        subset(&split.test, args.size.or(sizes.1), TEST_SUBSET)?
    };
    println!(
        "evaluating {} ({}, {} parameters) on {}",
        checkpoint.display(),
        model.name,
        net.num_params(),
        ds.describe()
    );
    let mut progress = Progress::new("eval", false);
    enum Be {
        Host,
        F32(crate::nn::Cuda),
        Bf16(crate::nn::Cuda<half::bf16>),
        F16(crate::nn::Cuda<half::f16>),
    }
    super::train::check_layout(args.device, args.layout)?;
    use super::train::open_cuda;
    let (device, layout) = (args.device, args.layout);
    let be = match args.precision {
        Precision::F32 if device == Device::Cpu => Be::Host,
        Precision::F32 => Be::F32(open_cuda(device, layout)?),
        Precision::Bf16 => Be::Bf16(open_cuda(device, layout)?),
        Precision::F16 => Be::F16(open_cuda(device, layout)?),
    };
    let run = |net: &mut crate::nn::Network<f32>, progress: &mut Progress| {
        macro_rules! on {
            ($b:expr) => {
                evaluate(
                    $b,
                    net,
                    ds.clone(),
                    &augment,
                    args.batch_size,
                    smoothing,
                    2,
                    progress,
                )
            };
        }
        match &be {
            Be::Host => on!(&Cpu),
            Be::F32(b) => on!(b),
            Be::Bf16(b) => on!(b),
            Be::F16(b) => on!(b),
        }
    };
    let r = run(&mut net, &mut progress);
    progress.finish();
    let r = r?;
    println!(
        "top-1 {:.2}% (error {:.2}%), top-5 {:.2}% (error {:.2}%), loss {:.4} over {} images in {:.1} s ({:.0} img/s)",
        100.0 * r.top1,
        100.0 * (1.0 - r.top1),
        100.0 * r.top5,
        100.0 * (1.0 - r.top5),
        r.loss,
        r.images,
        r.seconds,
        r.images as f64 / r.seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}
