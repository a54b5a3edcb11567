//! The training loop: [`TrainConfig`] (everything a run needs, saved as `config.json`),
//! [`Trainer`] (network, optimiser, position), evaluation, run folders and resume.
//!
//! A run folder holds:
//! - `config.json`: the [`TrainConfig`];
//! - `metrics.csv`: one row of [`EpochMetrics`] per epoch;
//! - `curves.png`: loss and top-1 error against epochs ([`crate::train::plot`]);
//! - `model.safetensors`: the network (the [`crate::nn::checkpoint`] format, timm names) after
//!   the last finished epoch, and `best.safetensors`, the one with the best test top-1;
//! - `optimizer.safetensors`: the momentum buffers; `state.json`: the [`TrainState`] (epoch,
//!   step, metrics so far). With the seed in the config these are the whole random state of
//!   the run, so [`Trainer::resume`] continues it exactly: bit for bit on a backend whose
//!   arithmetic is deterministic ([`crate::nn::Reference`], or [`crate::nn::Cpu`] on one
//!   thread; with several threads the CPU backend sums convolution weight gradients in an
//!   order that work stealing decides, so two runs, resumed or not, agree only to rounding).

use crate::error::{Error, Result};
use crate::nn::{models, Backend, Mode, Network, SeBlockConfig, SePosition, Stem};
use crate::train::augment::Augment;
use crate::train::data::{DataSpec, DataSplit, Dataset, Subset};
use crate::train::loader::{epoch_order, num_batches, Loader, Sampling};
use crate::train::loss::{cross_entropy, topk_correct};
use crate::train::metrics::{write_csv, EpochMetrics};
use crate::train::optim::Sgd;
use crate::train::plot;
use crate::train::schedule::LrSchedule;
use crate::train::{seed_for, Stream};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// Where the network runs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The fast CPU backend ([`crate::nn::Cpu`]).
    #[default]
    Cpu,
    /// The CUDA backend ([`crate::nn::Cuda`]) on GPU 0.
    Cuda,
    /// The CUDA backend on the CPU emulator of the kernels: slow, for checking the GPU code
    /// path on machines without a GPU.
    #[serde(rename = "cuda-emu")]
    CudaEmu,
}

impl Device {
    /// The CUDA backend this device names, opening the device (`None` for the CPU), with the
    /// convolution engine the `SENET_CONV` environment variable asks for (`auto`, the default:
    /// exact cuDNN where it loads on a GPU, else cuBLAS; `own`; `cudnn`; `cudnn-tf32`; `cublas`). Errors clearly when
    /// there is no GPU (or no emulator in this build), or when cuDNN is asked for and cannot
    /// run.
    pub fn cuda_backend(self) -> Result<Option<crate::nn::Cuda>> {
        match self {
            Device::Cpu => Ok(None),
            _ => self.cuda_backend_of::<f32>().map(Some),
        }
    }

    /// [`Device::cuda_backend`] with activations of `A` (bf16 or f16 for mixed precision):
    /// an error for the CPU, and as [`crate::nn::Cuda::open`] says.
    pub fn cuda_backend_of<A: crate::nn::NnAct>(self) -> Result<crate::nn::Cuda<A>> {
        use crate::cuda::CudaDevice;
        use crate::nn::{ConvChoice, Cuda};
        match self {
            Device::Cpu => Err(Error::Config(format!(
                "{} activations need the CUDA backend (--device cuda or cuda-emu)",
                A::SUFFIX
            ))),
            Device::Cuda => Cuda::open(CudaDevice::new(0)?, ConvChoice::from_env()?),
            Device::CudaEmu => Cuda::open(CudaDevice::emulator()?, ConvChoice::from_env()?),
        }
    }
}

impl Device {
    /// Checks that a backend named `backend` (its [`crate::nn::Backend::name`]) is the kind this
    /// device names (`cpu` takes the CPU backends, `cuda` and `cuda-emu` the CUDA one), so a
    /// run's config.json says where it ran.
    pub fn check_backend(self, backend: &str) -> Result<()> {
        let ok = match self {
            Device::Cpu => backend == "cpu" || backend == "reference",
            Device::Cuda | Device::CudaEmu => backend == "cuda",
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the config says --device {self}, but the trainer was given the {backend} backend"
            )))
        }
    }
}

/// The element type of a run's activations (parameters, their gradients and the optimiser
/// state are f32 either way).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 activations: the exact mode.
    #[default]
    F32,
    /// bf16 activations and activation gradients (mixed precision; the CUDA backend only).
    Bf16,
    /// f16 activations and activation gradients with dynamic loss scaling
    /// ([`crate::train::optim::LossScaler`]; the CUDA backend only).
    F16,
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            _ => Err(Error::Config(format!(
                "unknown precision `{s}` (f32, bf16 or f16)"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "cuda-emu" => Ok(Device::CudaEmu),
            _ => Err(Error::Config(format!(
                "unknown device `{s}` (cpu, cuda or cuda-emu)"
            ))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::CudaEmu => "cuda-emu",
        })
    }
}

/// SE options as saved in a config (mirrors [`SeBlockConfig`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeSpec {
    /// Reduction ratio `r`.
    pub reduction: usize,
    /// Rounding divisor of the hidden width (1: exactly `C / r`).
    pub divisor: usize,
    /// Biases in the FC layers.
    pub bias: bool,
    /// `standard`, `pre`, `post`, `identity` or `after3x3`.
    pub position: String,
}

/// The name of an SE position in configs and tables.
pub fn position_name(p: SePosition) -> &'static str {
    match p {
        SePosition::Standard => "standard",
        SePosition::Pre => "pre",
        SePosition::Post => "post",
        SePosition::Identity => "identity",
        SePosition::After3x3 => "after3x3",
    }
}

impl SeSpec {
    /// The spec of `o`.
    pub fn from_options(o: SeBlockConfig) -> Self {
        SeSpec {
            reduction: o.reduction,
            divisor: o.divisor,
            bias: o.bias,
            position: position_name(o.position).into(),
        }
    }

    /// The options this spec names.
    pub fn options(&self) -> Result<SeBlockConfig> {
        let position = SePosition::ALL
            .into_iter()
            .find(|p| position_name(*p) == self.position)
            .ok_or_else(|| Error::Config(format!("unknown SE position `{}`", self.position)))?;
        Ok(SeBlockConfig {
            reduction: self.reduction,
            divisor: self.divisor,
            bias: self.bias,
            position,
        })
    }
}

/// A model: a registry name, optionally with SE replaced per stage (ResNet family only).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    /// The registry name ([`crate::nn::models::MODELS`]).
    pub name: String,
    /// SE per stage (`None` in a stage: no SE), replacing the model's own; `None`: as named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se: Option<Vec<Option<SeSpec>>>,
    /// Zero-initialise each residual branch's last BatchNorm scale (timm's default, Goyal et
    /// al.'s trick). Off by default: the paper initialises with He et al.'s scheme only, and
    /// starting every branch at zero slows the first epochs of the small networks severalfold
    /// (PyTorch shows the same). ResNet-family models only.
    #[serde(default)]
    pub zero_init_last: bool,
    /// Blocks in every stage, replacing the model's (1 makes the CIFAR-style ResNet-20 a
    /// ResNet-8); ResNet-family models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<usize>,
    /// Width of the stem and the first stage, each later stage doubling it, replacing the
    /// model's (16 for the CIFAR-style models); ResNet-family models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
}

impl ModelSpec {
    /// The registry model `name` as it is.
    pub fn named(name: impl Into<String>) -> Self {
        ModelSpec {
            name: name.into(),
            se: None,
            zero_init_last: false,
            blocks: None,
            width: None,
        }
    }

    /// Builds the network (no weights yet) for images of `channels x crop x crop` and
    /// `classes` classes. ResNet-family models are rebuilt for that input and class count;
    /// other models must already match.
    pub fn build(&self, channels: usize, classes: usize, crop: usize) -> Result<Network<f32>> {
        if let Some(mut cfg) = models::resnet_config(&self.name) {
            cfg.in_chans = channels;
            cfg.num_classes = classes;
            cfg.input_size = (crop, crop);
            cfg.zero_init_last = self.zero_init_last;
            if let Some(b) = self.blocks {
                cfg.layers = vec![b; cfg.layers.len()];
            }
            if let Some(w) = self.width {
                cfg.channels = (0..cfg.channels.len()).map(|i| w << i).collect();
                cfg.stem = match cfg.stem {
                    Stem::Conv7 { .. } => Stem::Conv7 { width: w },
                    Stem::Conv3 { .. } => Stem::Conv3 { width: w },
                    Stem::Deep { .. } => Stem::Deep { width: w },
                };
            }
            if let Some(se) = &self.se {
                if se.len() != cfg.layers.len() {
                    return Err(Error::Config(format!(
                        "`{}` has {} stages, the SE override {}",
                        self.name,
                        cfg.layers.len(),
                        se.len()
                    )));
                }
                cfg.se = se
                    .iter()
                    .map(|s| s.as_ref().map(SeSpec::options).transpose())
                    .collect::<Result<_>>()?;
            }
            return cfg.build(&self.name);
        }
        if self.se.is_some() || self.blocks.is_some() || self.width.is_some() {
            return Err(Error::Config(format!(
                "`{}` is not a ResNet-family model; SE per stage, blocks and width cannot be set",
                self.name
            )));
        }
        let net = models::build::<f32>(&self.name)?;
        if net.input_size().0 != channels || net.num_classes() != classes {
            return Err(Error::Config(format!(
                "`{}` takes {} channels to {} classes; the data has {channels} and {classes}",
                self.name,
                net.input_size().0,
                net.num_classes()
            )));
        }
        Ok(net)
    }
}

/// Everything a training run needs; saved in its folder as `config.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub model: ModelSpec,
    /// The data set.
    pub data: DataSpec,
    /// Train on this many samples (a fixed random subset), or all.
    pub train_size: Option<usize>,
    /// Test on this many samples (a fixed random subset), or all.
    pub test_size: Option<usize>,
    /// Epochs.
    pub epochs: usize,
    /// Training batch size (incomplete last batches are dropped).
    pub batch_size: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// Label smoothing of the loss.
    pub label_smoothing: f64,
    /// Augmentation and normalisation.
    pub augment: Augment,
    /// Seed of every random draw (initialisation, shuffles, augmentation, dropout).
    pub seed: u64,
    /// Batches prepared ahead by the loader thread.
    pub prefetch: usize,
    /// Where the network runs.
    pub device: Device,
    /// The activations' element type (configs saved before it existed read as f32).
    #[serde(default)]
    pub precision: Precision,
}

/// The paper's learning rate, 0.6 at batch 1024, scaled linearly to `batch_size`.
pub fn paper_lr(batch_size: usize) -> f64 {
    0.6 * batch_size as f64 / 1024.0
}

impl TrainConfig {
    /// The paper's recipe for `model` on `data` (loaded as `split`), scaled: learning rate
    /// [`paper_lr`], momentum 0.9, weight decay 1e-4, step decay by 10 at 30% of the epochs
    /// ([`LrSchedule::paper`]), label smoothing 0.1, augmentation [`Augment::defaults`].
    pub fn paper(
        model: ModelSpec,
        data: DataSpec,
        split: &DataSplit,
        epochs: usize,
        batch_size: usize,
    ) -> Self {
        TrainConfig {
            model,
            data,
            train_size: None,
            test_size: None,
            epochs,
            batch_size,
            eval_batch_size: 250,
            momentum: 0.9,
            weight_decay: 1e-4,
            schedule: LrSchedule::paper(paper_lr(batch_size), epochs),
            label_smoothing: 0.1,
            augment: Augment::defaults(
                split.kind,
                split.image_size,
                None,
                split.mean.clone(),
                split.std.clone(),
            ),
            seed: 0,
            prefetch: 2,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }

    /// Writes `dir/config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Format(format!("serialising the config: {e}")))?;
        write_atomic(&dir.join("config.json"), s.as_bytes())
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let s =
            std::fs::read_to_string(&p).map_err(Error::io(format!("reading {}", p.display())))?;
        serde_json::from_str(&s).map_err(|e| Error::Format(format!("{}: {e}", p.display())))
    }
}

/// Where a run stands; with the config's seed, all the state a resume needs besides the
/// weights and momentum buffers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Epochs finished (trained and evaluated).
    pub epoch: usize,
    /// Steps done in the current epoch.
    pub step_in_epoch: usize,
    /// Steps done in the run.
    pub global_step: u64,
    /// The current epoch's summed loss (loss times batch size, per step).
    pub loss_sum: f64,
    /// The current epoch's top-1 hits.
    pub correct1: u64,
    /// The current epoch's top-5 hits.
    pub correct5: u64,
    /// The current epoch's training samples seen.
    pub seen: u64,
    /// The current epoch's training seconds.
    pub train_seconds: f64,
    /// The learning rate of the last step.
    pub last_lr: f64,
    /// Seconds of training and evaluation since the run started.
    pub elapsed_seconds: f64,
    /// Every finished epoch's metrics.
    pub history: Vec<EpochMetrics>,
    /// The best test top-1 so far and its epoch (1-based; 0: none yet).
    pub best: (f64, usize),
    /// The loss scaler of an f16 run (its scale carries over a resume).
    #[serde(default)]
    pub scaler: Option<crate::train::optim::LossScaler>,
}

/// What one training step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepInfo {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Steps done in this epoch, this one included.
    pub step: usize,
    /// Steps in an epoch.
    pub steps: usize,
    /// This step's loss.
    pub loss: f64,
    /// The epoch's mean loss so far.
    pub epoch_loss: f64,
    /// The epoch's top-1 accuracy so far.
    pub epoch_top1: f64,
    /// The epoch's training images per second so far.
    pub images_per_s: f64,
    /// This step's learning rate.
    pub lr: f64,
}

/// Evaluation results.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean loss.
    pub loss: f64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
    /// Images evaluated.
    pub images: usize,
    /// Seconds taken.
    pub seconds: f64,
}

/// Receives progress (progress bars, logs). Every method does nothing by default; `()` is
/// the silent observer.
pub trait Observer {
    /// An epoch starts (or resumes at step `done`).
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize, _done: usize) {}
    /// A training step finished.
    fn step(&mut self, _info: &StepInfo) {}
    /// An evaluation of `_batches` batches starts.
    fn eval_start(&mut self, _batches: usize) {}
    /// An evaluation batch finished.
    fn eval_batch(&mut self) {}
    /// An epoch finished, evaluated and (in a run folder) saved.
    fn epoch_end(&mut self, _metrics: &EpochMetrics) {}
}

impl Observer for () {}

/// Evaluates `net` in inference mode on `ds` with the evaluation transform of `aug`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend<f32>>(
    backend: &B,
    net: &mut Network<f32>,
    ds: Arc<dyn Dataset>,
    aug: &Augment,
    batch_size: usize,
    smoothing: f64,
    prefetch: usize,
    obs: &mut dyn Observer,
) -> Result<EvalResult> {
    if batch_size == 0 || ds.is_empty() {
        return Err(Error::Config(
            "evaluation needs a positive batch size and a non-empty data set".into(),
        ));
    }
    aug.validate(ds.channels())?;
    let t0 = Instant::now();
    let nb = num_batches(ds.len(), batch_size, false);
    obs.eval_start(nb);
    let order: Vec<usize> = (0..ds.len()).collect();
    let loader = Loader::spawn(
        ds.clone(),
        order,
        batch_size,
        0..nb,
        aug.clone(),
        Sampling::Eval,
        prefetch,
    );
    let k5 = 5.min(net.num_classes());
    let (mut loss, mut c1, mut c5, mut n, mut batches) = (0.0, 0, 0, 0, 0);
    for batch in loader {
        let batch = batch?;
        let logits = net.forward(backend, batch.x, Mode::Infer)?;
        let out = cross_entropy(&logits, &batch.labels, smoothing)?;
        loss += out.loss * batch.labels.len() as f64;
        c1 += topk_correct(&logits, &batch.labels, 1)?;
        c5 += topk_correct(&logits, &batch.labels, k5)?;
        n += batch.labels.len();
        batches += 1;
        drop(logits);
        obs.eval_batch();
    }
    if batches != nb {
        return Err(Error::Config(format!(
            "the data loader stopped after {batches} of {nb} batches"
        )));
    }
    Ok(EvalResult {
        loss: loss / n as f64,
        top1: c1 as f64 / n as f64,
        top5: c5 as f64 / n as f64,
        images: n,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The seed that picks `train_size` training samples.
pub const TRAIN_SUBSET: u64 = 1;
/// The seed that picks `test_size` test samples.
pub const TEST_SUBSET: u64 = 2;

/// `n` samples of `ds` chosen by a shuffle seeded with `which` ([`TRAIN_SUBSET`] or
/// [`TEST_SUBSET`]), or all of `ds` when `n` is `None` or not smaller. Subsets are a property
/// of the data, not of the run: the seed is fixed, so every run (and `senet eval`) with the
/// same size sees the same samples.
pub fn subset(ds: &Arc<dyn Dataset>, n: Option<usize>, which: u64) -> Result<Arc<dyn Dataset>> {
    Ok(match n {
        Some(n) if n < ds.len() => Arc::new(Subset::random(ds.clone(), n, which)?),
        _ => ds.clone(),
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming {}", tmp.display())))
}

/// A training run: network, optimiser and position, on backend `B`.
pub struct Trainer<B: Backend<f32>> {
    backend: B,
    config: TrainConfig,
    net: Network<f32>,
    opt: Sgd,
    state: TrainState,
    train: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
}

impl<B: Backend<f32>> Trainer<B> {
    /// A fresh run of `config` on `data` (the loaded `config.data`): checks the config,
    /// selects the subsets, builds and initialises the network.
    pub fn new(backend: B, config: TrainConfig, data: &DataSplit) -> Result<Self> {
        config.device.check_backend(backend.name())?;
        if backend.precision() != config.precision.to_string() {
            return Err(Error::Config(format!(
                "the config asks for {} activations but the backend keeps {} ones",
                config.precision,
                backend.precision()
            )));
        }
        config.schedule.validate()?;
        if config.batch_size == 0 || config.eval_batch_size == 0 || config.epochs == 0 {
            return Err(Error::Config(
                "epochs and batch sizes must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&config.label_smoothing) {
            return Err(Error::Config(format!(
                "label smoothing {} is not in [0, 1)",
                config.label_smoothing
            )));
        }
        let channels = data.train.channels();
        config.augment.validate(channels)?;
        let train = subset(&data.train, config.train_size, TRAIN_SUBSET)?;
        let test = subset(&data.test, config.test_size, TEST_SUBSET)?;
        if train.len() < config.batch_size {
            return Err(Error::Config(format!(
                "{} training samples do not fill one batch of {}",
                train.len(),
                config.batch_size
            )));
        }
        if test.is_empty() {
            return Err(Error::Config("the test set is empty".into()));
        }
        let mut net = config
            .model
            .build(channels, data.num_classes(), config.augment.crop)?;
        net.init_weights(seed_for(config.seed, Stream::Init, 0));
        net.set_input_grad(false);
        let opt = Sgd::new(config.momentum as f32, config.weight_decay as f32)?;
        let scaler =
            (config.precision == Precision::F16).then(crate::train::optim::LossScaler::default);
        Ok(Trainer {
            backend,
            config,
            net,
            opt,
            state: TrainState {
                scaler,
                ..TrainState::default()
            },
            train,
            test,
        })
    }

    /// Continues the run saved in `dir`: reads its config (with `epochs` replaced when given;
    /// the schedule keeps its saved length unless the caller changes it), loads its data, and
    /// restores network, optimiser and state.
    pub fn resume(backend: B, dir: &Path, epochs: Option<usize>) -> Result<Self> {
        let mut config = TrainConfig::load(dir)?;
        if let Some(e) = epochs {
            config.epochs = e;
        }
        let data = config.data.load()?;
        let mut t = Trainer::new(backend, config, &data)?;
        t.load_checkpoint(dir)?;
        Ok(t)
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The network.
    pub fn net(&self) -> &Network<f32> {
        &self.net
    }

    /// The network, mutably.
    pub fn net_mut(&mut self) -> &mut Network<f32> {
        &mut self.net
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Sgd {
        &self.opt
    }

    /// Where the run stands.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The training samples (after `train_size`).
    pub fn train_set(&self) -> &Arc<dyn Dataset> {
        &self.train
    }

    /// The test samples (after `test_size`).
    pub fn test_set(&self) -> &Arc<dyn Dataset> {
        &self.test
    }

    /// Steps in an epoch (whole batches).
    pub fn steps_per_epoch(&self) -> usize {
        num_batches(self.train.len(), self.config.batch_size, true)
    }

    /// Trains up to `max_steps` steps (all the current epoch's remaining steps with `None`),
    /// stopping at the end of the epoch; returns the steps done. The epoch is finished
    /// (evaluated, counted) by [`Trainer::finish_epoch`].
    ///
    /// On a device backend the convolution and linear parameters are bound to it for the
    /// duration ([`Network::bind`]): they, their gradients and their momentum stay in device
    /// memory and the SGD update runs there; on return (error or not) they are back on the
    /// host, momentum included.
    pub fn train_steps(
        &mut self,
        max_steps: Option<usize>,
        obs: &mut dyn Observer,
    ) -> Result<usize> {
        self.net.bind(&self.backend)?;
        let r = self.train_steps_bound(max_steps, obs);
        // Bring everything back whatever happened; the first error wins.
        let g = self.opt.gather(&self.net);
        let u = self.net.unbind();
        let done = r?;
        g?;
        u?;
        Ok(done)
    }

    fn train_steps_bound(
        &mut self,
        max_steps: Option<usize>,
        obs: &mut dyn Observer,
    ) -> Result<usize> {
        let spe = self.steps_per_epoch();
        let start = self.state.step_in_epoch;
        let end = max_steps.map_or(spe, |m| start.saturating_add(m).min(spe));
        if start >= end {
            return Ok(0);
        }
        let (seed, epoch) = (self.config.seed, self.state.epoch);
        let loader = Loader::spawn(
            self.train.clone(),
            epoch_order(self.train.len(), seed, epoch),
            self.config.batch_size,
            start..end,
            self.config.augment.clone(),
            Sampling::Train { seed, epoch },
            self.config.prefetch,
        );
        let k5 = 5.min(self.net.num_classes());
        let mut done = 0;
        let mut t = Instant::now();
        for batch in loader {
            let batch = batch?;
            let lr = self.config.schedule.at(self.state.global_step, spe);
            self.net
                .reseed_dropout(seed_for(seed, Stream::Dropout, self.state.global_step));
            let logits = self.net.forward(&self.backend, batch.x, Mode::Train)?;
            let mut out = cross_entropy(&logits, &batch.labels, self.config.label_smoothing)?;
            let c1 = topk_correct(&logits, &batch.labels, 1)?;
            let c5 = topk_correct(&logits, &batch.labels, k5)?;
            drop(logits);
            if let Some(sc) = &self.state.scaler {
                sc.scale_grad(&mut out.grad);
            }
            self.net.zero_grad();
            self.net.backward_params(&self.backend, out.grad)?;
            crate::train::optim::step_with(
                self.state.scaler.as_mut(),
                &self.backend,
                &mut self.net,
                &mut self.opt,
                lr as f32,
            )?;
            // With a loss scaler (f16) a step whose gradients (or loss) overflow is skipped, the
            // parameters left alone, until the scale falls below 1: scaling cannot help then.
            if let Some(sc) = self.state.scaler.as_ref().filter(|sc| sc.scale() < 1.0) {
                return Err(Error::Config(format!(
                    "f16 overflows even without loss scaling ({} steps skipped, scale {}) at \
                     epoch {} step {}: train in bf16, or lower the learning rate",
                    sc.skipped(),
                    sc.scale(),
                    epoch + 1,
                    self.state.step_in_epoch + 1
                )));
            }
            if !out.loss.is_finite() && self.state.scaler.is_none() {
                return Err(Error::Config(format!(
                    "the loss diverged ({}) at epoch {} step {}; lower the learning rate",
                    out.loss,
                    epoch + 1,
                    self.state.step_in_epoch + 1
                )));
            }
            let n = batch.labels.len();
            let s = &mut self.state;
            if out.loss.is_finite() {
                s.loss_sum += out.loss * n as f64;
                s.correct1 += c1 as u64;
                s.correct5 += c5 as u64;
                s.seen += n as u64;
            }
            s.step_in_epoch += 1;
            s.global_step += 1;
            s.last_lr = lr;
            let dt = t.elapsed().as_secs_f64();
            t = Instant::now();
            s.train_seconds += dt;
            s.elapsed_seconds += dt;
            done += 1;
            obs.step(&StepInfo {
                epoch,
                step: s.step_in_epoch,
                steps: spe,
                loss: out.loss,
                epoch_loss: s.loss_sum / s.seen.max(1) as f64,
                epoch_top1: s.correct1 as f64 / s.seen.max(1) as f64,
                images_per_s: s.seen as f64 / s.train_seconds.max(1e-9),
                lr,
            });
        }
        if done != end - start {
            return Err(Error::Config(format!(
                "the data loader stopped after {done} of {} batches",
                end - start
            )));
        }
        Ok(done)
    }

    /// Evaluates on the test set (inference mode; touches no training state).
    pub fn evaluate(&mut self, obs: &mut dyn Observer) -> Result<EvalResult> {
        evaluate(
            &self.backend,
            &mut self.net,
            self.test.clone(),
            &self.config.augment,
            self.config.eval_batch_size,
            self.config.label_smoothing,
            self.config.prefetch,
            obs,
        )
    }

    /// Ends the current epoch once its steps are done: evaluates, records its metrics and
    /// moves to the next epoch. An error if steps remain.
    pub fn finish_epoch(&mut self, obs: &mut dyn Observer) -> Result<EpochMetrics> {
        let spe = self.steps_per_epoch();
        if self.state.step_in_epoch < spe {
            return Err(Error::Config(format!(
                "epoch {} has {} of {spe} steps left",
                self.state.epoch + 1,
                spe - self.state.step_in_epoch
            )));
        }
        let ev = self.evaluate(obs)?;
        let s = &mut self.state;
        s.elapsed_seconds += ev.seconds;
        let seen = s.seen.max(1) as f64;
        let m = EpochMetrics {
            epoch: s.epoch + 1,
            lr: s.last_lr,
            train_loss: s.loss_sum / seen,
            train_top1: s.correct1 as f64 / seen,
            train_top5: s.correct5 as f64 / seen,
            test_loss: ev.loss,
            test_top1: ev.top1,
            test_top5: ev.top5,
            images_per_s: s.seen as f64 / s.train_seconds.max(1e-9),
            train_seconds: s.train_seconds,
            eval_seconds: ev.seconds,
            elapsed_seconds: s.elapsed_seconds,
        };
        if m.test_top1 > s.best.0 || s.best.1 == 0 {
            s.best = (m.test_top1, m.epoch);
        }
        s.history.push(m.clone());
        s.epoch += 1;
        s.step_in_epoch = 0;
        s.loss_sum = 0.0;
        s.correct1 = 0;
        s.correct5 = 0;
        s.seen = 0;
        s.train_seconds = 0.0;
        Ok(m)
    }

    /// Trains to the configured number of epochs. With `run_dir`, writes the config first and
    /// after every epoch the checkpoint, `metrics.csv` and `curves.png`.
    pub fn fit(&mut self, run_dir: Option<&Path>, obs: &mut dyn Observer) -> Result<()> {
        if let Some(d) = run_dir {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
            self.config.save(d)?;
        }
        while self.state.epoch < self.config.epochs {
            let spe = self.steps_per_epoch();
            obs.epoch_start(
                self.state.epoch,
                self.config.epochs,
                spe,
                self.state.step_in_epoch,
            );
            self.train_steps(None, obs)?;
            let m = self.finish_epoch(obs)?;
            if let Some(d) = run_dir {
                self.save_checkpoint(d)?;
                self.write_reports(d)?;
            }
            obs.epoch_end(&m);
        }
        Ok(())
    }

    /// Writes `metrics.csv` and `curves.png` for the epochs so far.
    pub fn write_reports(&self, dir: &Path) -> Result<()> {
        write_csv(&dir.join("metrics.csv"), &self.state.history)?;
        let label = self.config.model.name.clone();
        plot::curves(
            &[plot::Series {
                label,
                metrics: self.state.history.clone(),
            }],
            &format!("{} on {}", self.config.model.name, self.config.data),
            &dir.join("curves.png"),
        )
    }

    /// Saves the network, the momentum buffers and the state to `dir` (and the network as
    /// `best.safetensors` when the last finished epoch is the best so far).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let model = self.net.to_safetensors_bytes()?;
        write_atomic(&dir.join("model.safetensors"), &model)?;
        if self.state.best.1 != 0
            && self.state.best.1 == self.state.epoch
            && self.state.step_in_epoch == 0
        {
            write_atomic(&dir.join("best.safetensors"), &model)?;
        }
        write_atomic(
            &dir.join("optimizer.safetensors"),
            &self.opt.to_safetensors_bytes()?,
        )?;
        let state = serde_json::to_string_pretty(&self.state)
            .map_err(|e| Error::Format(format!("serialising the training state: {e}")))?;
        write_atomic(&dir.join("state.json"), state.as_bytes())
    }

    /// Restores the network, the momentum buffers and the state saved in `dir`.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("state.json");
        let s =
            std::fs::read_to_string(&p).map_err(Error::io(format!("reading {}", p.display())))?;
        let state: TrainState =
            serde_json::from_str(&s).map_err(|e| Error::Format(format!("{}: {e}", p.display())))?;
        if state.step_in_epoch > self.steps_per_epoch() {
            return Err(Error::Format(format!(
                "{}: step {} is past the {} steps of an epoch (different data or batch size?)",
                p.display(),
                state.step_in_epoch,
                self.steps_per_epoch()
            )));
        }
        let mut net = self.net.clone();
        net.load_safetensors(dir.join("model.safetensors"))?;
        let mut opt = self.opt.clone();
        opt.load(&dir.join("optimizer.safetensors"), &net)?;
        self.net = net;
        self.opt = opt;
        self.state = state;
        Ok(())
    }
}
