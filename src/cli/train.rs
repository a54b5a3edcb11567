//! `senet train`: trains a network with the paper's recipe (scaled by options) into a run
//! folder, or resumes one.

use crate::nn::{Backend, Cpu};
use crate::train::data::DataSplit;
use crate::train::trainer::{paper_lr, StepInfo};
use crate::train::{
    Augment, DataSpec, Decay, Device, EpochMetrics, LrSchedule, ModelSpec, Observer, Precision,
    TrainConfig, Trainer,
};
use crate::{Error, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

/// The default model: the small SE-ResNet for 28x28 digits.
pub const DEFAULT_MODEL: &str = "seresnet20_mnist";

/// The recipe: every number of the paper's, as an option (shared with `senet ablate`).
#[derive(clap::Args, Clone, Debug)]
pub struct Recipe {
    /// Data set: digits (embedded MNIST, the default), idx:DIR, cifar10:DIR, cifar100:DIR or
    /// folder:DIR (ImageFolder: DIR/train/<class>/*.jpg, DIR/val/<class>/...).
    #[arg(long, default_value = "digits")]
    pub data: DataSpec,
    /// Epochs [default: 6 for train, 3 for ablate; the paper: 100].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default: 64 for train, 32 for ablate; the paper: 1024 on 64 GPUs].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 0.6 * batch / 1024, the paper's 0.6 at 1024, scaled].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Divide the learning rate every this many epochs [default: 30% of the epochs, the
    /// paper's 30 of 100].
    #[arg(long)]
    pub lr_step: Option<f64>,
    /// The step decay's factor.
    #[arg(long, default_value_t = 0.1)]
    pub lr_gamma: f64,
    /// Learning-rate decay: step (the paper's, by --lr-gamma every --lr-step epochs) or cosine
    /// [default: step for train, cosine for ablate].
    #[arg(long)]
    pub schedule: Option<ScheduleKind>,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Label smoothing (as the paper's SENet-154; 0 turns it off).
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Crop size [default: the native size of small images, 224 for folders].
    #[arg(long)]
    pub crop: Option<usize>,
    /// Smallest training shorter side [default: crop * 256 / 224].
    #[arg(long)]
    pub scale_min: Option<usize>,
    /// Largest training shorter side [default: crop * 480 / 224 for folders, crop * 288 / 224
    /// for small images].
    #[arg(long)]
    pub scale_max: Option<usize>,
    /// Evaluation shorter side before the centre crop [default: crop * 256 / 224].
    #[arg(long)]
    pub eval_resize: Option<usize>,
    /// Random horizontal flips [default: off for digits, on otherwise].
    #[arg(long)]
    pub hflip: Option<bool>,
    /// Random vertical flips.
    #[arg(long, default_value_t = false)]
    pub vflip: bool,
    /// Per-channel mean, comma-separated [default: measured on the training set; ImageNet's
    /// for folders].
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation, comma-separated [default: as --mean].
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// Train on a fixed random subset of this many samples.
    #[arg(long)]
    pub train_size: Option<usize>,
    /// Test on a fixed random subset of this many samples.
    #[arg(long)]
    pub test_size: Option<usize>,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 250)]
    pub eval_batch_size: usize,
    /// Seed of initialisation, shuffles, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batches prepared ahead by the loader thread.
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// cpu; cuda (GPU 0); or cuda-emu (the CUDA backend on the CPU emulator of the kernels:
    /// slow, for checking the GPU path without a GPU).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Activations: f32 (exact), bf16 or f16 (mixed precision: narrow activations and
    /// activation gradients, f32 parameters, gradients and momentum; f16 with dynamic loss
    /// scaling; --device cuda or cuda-emu).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

/// The learning-rate decay, as the command line names it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Divide by --lr-gamma every --lr-step epochs.
    Step,
    /// Half a cosine to zero.
    Cosine,
}

/// The defaults a command gives the recipe.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Learning-rate decay.
    pub schedule: ScheduleKind,
}

impl Recipe {
    /// The configuration for `model` on the loaded `split`, with `d` the calling command's
    /// defaults.
    pub fn config(&self, model: ModelSpec, split: &DataSplit, d: Defaults) -> TrainConfig {
        let (epochs, batch) = (d.epochs, d.batch);
        let epochs = self.epochs.unwrap_or(epochs);
        let batch = self.batch_size.unwrap_or(batch);
        let mut c = TrainConfig::paper(model, self.data.clone(), split, epochs, batch);
        let base = self.lr.unwrap_or(paper_lr(batch));
        c.schedule = LrSchedule {
            base,
            decay: match self.schedule.unwrap_or(d.schedule) {
                ScheduleKind::Cosine => Decay::Cosine,
                ScheduleKind::Step => Decay::Step {
                    every: self.lr_step.unwrap_or((3 * epochs) as f64 / 10.0),
                    gamma: self.lr_gamma,
                },
            },
            warmup: self.warmup,
            epochs: epochs as f64,
        };
        c.momentum = self.momentum;
        c.weight_decay = self.weight_decay;
        c.label_smoothing = self.label_smoothing;
        let d = Augment::defaults(
            split.kind,
            split.image_size,
            self.crop,
            self.mean.clone().unwrap_or(split.mean.clone()),
            self.std.clone().unwrap_or(split.std.clone()),
        );
        c.augment = Augment {
            scale_min: self.scale_min.unwrap_or(d.scale_min),
            scale_max: self.scale_max.unwrap_or(d.scale_max),
            eval_resize: self.eval_resize.unwrap_or(d.eval_resize),
            hflip: self.hflip.unwrap_or(d.hflip),
            vflip: self.vflip,
            ..d
        };
        c.train_size = self.train_size;
        c.test_size = self.test_size;
        c.eval_batch_size = self.eval_batch_size;
        c.seed = self.seed;
        c.prefetch = self.prefetch;
        c.device = self.device;
        c.precision = self.precision;
        c
    }
}

/// Options of `senet train`.
#[derive(clap::Args)]
pub struct Args {
    /// Model from the registry (`senet models`); ResNet-family models are rebuilt for the data's
    /// channels, classes and crop. The plain twin of the default is resnet20_mnist.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Zero-initialise each residual branch's last BN scale (timm's default; off as in the
    /// paper).
    #[arg(long)]
    zero_init_last: bool,
    /// Blocks per stage, replacing the model's (ResNet family; 1 turns ResNet-20 into ResNet-8).
    #[arg(long)]
    blocks: Option<usize>,
    /// Stem and first-stage width, doubling per stage, replacing the model's (ResNet family).
    #[arg(long)]
    width: Option<usize>,
    #[command(flatten)]
    recipe: Recipe,
    /// Run folder name under runs/ [default: <UTC time>-<model>].
    #[arg(long)]
    name: Option<String>,
    /// Run folder (overrides --name).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder with its saved config (only --epochs may change it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// No progress bars (the per-epoch lines are still printed).
    #[arg(long)]
    quiet: bool,
    /// Layout of activations on the device: nchw, or nhwc (channels-last, the layout cuDNN's
    /// tensor-core convolutions prefer; CUDA devices only; a run may resume in either).
    #[arg(long, default_value = "nchw")]
    layout: crate::Layout,
}

/// The defaults of `senet train`: 6 epochs of batch 64 keep the default run on the embedded
/// digits to a few minutes on two cores (the paper: 100 epochs of 1024), the paper's step
/// decay.
pub const DEFAULTS: Defaults = Defaults {
    epochs: 6,
    batch: 64,
    schedule: ScheduleKind::Step,
};

/// `YYYYMMDD-HHMMSS` in UTC.
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Progress bars (epoch and batch) and one printed line per epoch.
pub struct Progress {
    multi: MultiProgress,
    epochs: ProgressBar,
    batches: ProgressBar,
    label: String,
}

impl Progress {
    /// Bars for a run called `label` (hidden with `quiet` or when stderr is not a terminal).
    pub fn new(label: &str, quiet: bool) -> Self {
        let multi = if quiet {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let style = |t: &str| ProgressStyle::with_template(t).expect("valid progress template");
        let epochs = multi.add(ProgressBar::new(1));
        epochs.set_style(style(
            "{prefix:>6} {bar:30.cyan/blue} {pos}/{len} epochs [{elapsed_precise} < {eta_precise}] {msg}",
        ));
        epochs.set_prefix("run");
        let batches = multi.add(ProgressBar::new(1));
        batches.set_style(style(
            "{prefix:>6} {bar:30.green/white} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        ));
        Progress {
            multi,
            epochs,
            batches,
            label: label.to_string(),
        }
    }

    /// Prints a line above the bars.
    pub fn println(&self, s: &str) {
        if self.multi.println(s).is_err() || self.epochs.is_hidden() {
            println!("{s}");
        }
    }

    /// Removes the bars.
    pub fn finish(&self) {
        self.batches.finish_and_clear();
        self.epochs.finish_and_clear();
    }
}

impl Observer for Progress {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize, done: usize) {
        self.epochs.set_length(epochs as u64);
        self.epochs.set_position(epoch as u64);
        self.batches.set_prefix(format!("ep {}", epoch + 1));
        self.batches.set_length(steps as u64);
        self.batches.reset();
        self.batches.set_position(done as u64);
    }

    fn step(&mut self, s: &StepInfo) {
        self.batches.set_position(s.step as u64);
        self.batches.set_message(format!(
            "loss {:.4} acc {:.2}% {:.0} img/s lr {:.3e}",
            s.epoch_loss,
            100.0 * s.epoch_top1,
            s.images_per_s,
            s.lr
        ));
    }

    fn eval_start(&mut self, batches: usize) {
        self.batches.set_prefix("test");
        self.batches.set_length(batches as u64);
        self.batches.reset();
        self.batches.set_message("");
    }

    fn eval_batch(&mut self) {
        self.batches.inc(1);
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        self.epochs.set_position(m.epoch as u64);
        self.epochs
            .set_message(format!("test top-1 {:.2}%", 100.0 * m.test_top1));
        self.println(&format!(
            "{} epoch {:>3}: train loss {:.4} top-1 {:.2}% | test loss {:.4} top-1 {:.2}% top-5 {:.2}% | {:.0} img/s, {:.1} s + {:.1} s eval, {:.1} s total",
            self.label,
            m.epoch,
            m.train_loss,
            100.0 * m.train_top1,
            m.test_loss,
            100.0 * m.test_top1,
            100.0 * m.test_top5,
            m.images_per_s,
            m.train_seconds,
            m.eval_seconds,
            m.elapsed_seconds
        ));
    }
}

/// Fits `trainer` into `dir` with progress output and prints the summary.
pub fn fit_with_progress<B: Backend<f32>>(
    trainer: &mut Trainer<B>,
    dir: &Path,
    label: &str,
    quiet: bool,
) -> Result<()> {
    let mut progress = Progress::new(label, quiet);
    let r = trainer.fit(Some(dir), &mut progress);
    progress.finish();
    r
}

/// Errors when `layout` asks for NHWC activations on the CPU (whose backends are NCHW).
pub fn check_layout(device: Device, layout: crate::Layout) -> Result<()> {
    if device == Device::Cpu && layout != crate::Layout::Nchw {
        return Err(Error::Config(format!(
            "{layout} activations need the CUDA backend (--device cuda or cuda-emu); the CPU \
             backends are NCHW"
        )));
    }
    Ok(())
}

/// The CUDA backend `device` names (not the CPU), with activations of `A` kept in `layout`,
/// announced.
pub fn open_cuda<A: crate::nn::NnAct>(
    device: Device,
    layout: crate::Layout,
) -> Result<crate::nn::Cuda<A>> {
    let b = device.cuda_backend_of::<A>()?.with_layout(layout);
    announce_cuda(&b);
    Ok(b)
}

/// Says what the CUDA network backend runs, once per command.
pub fn announce_cuda<A: crate::nn::NnAct>(b: &crate::nn::Cuda<A>) {
    let cc = b.device().info().compute_capability;
    println!(
        "device: {} (compute capability {}.{}); activations, parameters, gradients, momentum and \
         BatchNorm statistics stay on the device while training (SENET_CONV=auto|own|cudnn|\
         cudnn-tf32|cublas picks the convolutions)",
        b.describe(),
        cc.0,
        cc.1
    );
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (device, precision) = match &args.resume {
        Some(dir) => {
            let c = TrainConfig::load(dir)?;
            (c.device, c.precision)
        }
        None => (args.recipe.device, args.recipe.precision),
    };
    check_layout(device, args.layout)?;
    let layout = args.layout;
    match precision {
        Precision::Bf16 => run_on(open_cuda::<half::bf16>(device, layout)?, args),
        Precision::F16 => run_on(open_cuda::<half::f16>(device, layout)?, args),
        Precision::F32 if device == Device::Cpu => run_on(Cpu, args),
        Precision::F32 => run_on(open_cuda::<f32>(device, layout)?, args),
    }
}

fn run_on<B: Backend<f32>>(backend: B, args: Args) -> Result<ExitCode> {
    let (mut trainer, dir) = match &args.resume {
        Some(dir) => {
            let t = Trainer::resume(backend, dir, args.recipe.epochs)?;
            println!(
                "resuming {} at epoch {} step {} of {} epochs",
                dir.display(),
                t.state().epoch + 1,
                t.state().step_in_epoch,
                t.config().epochs
            );
            (t, dir.clone())
        }
        None => {
            let split = args.recipe.data.load()?;
            let model = ModelSpec {
                zero_init_last: args.zero_init_last,
                blocks: args.blocks,
                width: args.width,
                ..ModelSpec::named(&args.model)
            };
            let config = args.recipe.config(model, &split, DEFAULTS);
            let dir = match (&args.run_dir, &args.name) {
                (Some(d), _) => d.clone(),
                (None, Some(n)) => PathBuf::from("runs").join(n),
                (None, None) => {
                    PathBuf::from("runs").join(format!("{}-{}", timestamp(), args.model))
                }
            };
            if dir.join("state.json").exists() {
                return Err(Error::Config(format!(
                    "{} already holds a run; pass --resume {} to continue it, or another --name",
                    dir.display(),
                    dir.display()
                )));
            }
            (Trainer::new(backend, config, &split)?, dir)
        }
    };
    let c = trainer.config();
    println!(
        "{} ({} parameters) on {}: train {} / test {} samples, {} epochs of {} steps (batch {}), lr {} ({:?}), {} threads",
        c.model.name,
        trainer.net().num_params(),
        c.data,
        trainer.train_set().len(),
        trainer.test_set().len(),
        c.epochs,
        trainer.steps_per_epoch(),
        c.batch_size,
        c.schedule.base,
        c.schedule.decay,
        rayon::current_num_threads()
    );
    println!("run folder: {}", dir.display());
    let label = trainer.config().model.name.clone();
    fit_with_progress(&mut trainer, &dir, &label, args.quiet)?;
    let s = trainer.state();
    if let Some(m) = s.history.last() {
        println!(
            "done: test top-1 {:.2}% top-5 {:.2}% after {} epochs, {:.1} s (best top-1 {:.2}% at epoch {})",
            100.0 * m.test_top1,
            100.0 * m.test_top5,
            m.epoch,
            m.elapsed_seconds,
            100.0 * s.best.0,
            s.best.1
        );
    }
    println!(
        "wrote {}/{{config.json, metrics.csv, curves.png, model.safetensors, best.safetensors, optimizer.safetensors, state.json}}",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
