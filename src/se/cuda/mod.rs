//! SE on the GPU: forward and backward, over device tensors senet owns or over the caller's
//! memory.
//!
//! Two front doors to one implementation:
//! - owned: [`forward`], [`forward_into`], [`backward`], [`backward_into`] over
//!   [`DeviceTensor`]s and [`DeviceSeWeights`], scratch from the handle;
//! - borrowed ([`forward_views`], [`backward_views`]): device views of a framework's buffers
//!   (activations, weights, saved state, gradients) and a caller workspace
//!   ([`workspace_bytes`]), on the handle's stream (the caller's with
//!   [`CudaDevice::from_stream`]); nothing is allocated, copied or synchronised.
//!
//! Every entry point is asynchronous: it returns once its work is queued on the handle's stream.
//!
//! Three ways to run the same math, picked per call by [`SePath`]:
//! - [`SePath::ThreeKernel`]: squeeze, excitation (two batched GEMM launches with fused
//!   epilogues) and scale over the whole batch; x is read twice (3N bytes forward).
//! - [`SePath::L2Chunked`]: the same kernels over chunks of samples sized to stay in L2, so the
//!   second read of x (and dy) mostly hits L2.
//! - [`SePath::Cluster`] (sm_90+): one launch; a cluster of 8 CTAs holds a sample in shared
//!   memory, so x is read once (2N forward, 3N backward).
//!
//! [`SePath::Auto`] picks by shape, dtype and device ([`choose_path`]). All paths agree with
//! [`reference`](super::reference) within DESIGN.md's tolerances and are deterministic.

mod launch;
mod views;

pub use views::{
    backward_views, forward_views, workspace_bytes, SeBackwardViews, SeForwardViews,
    SeGradViewsMut, SeSavedViews, SeSavedViewsMut, SeWeightViews,
};

use super::{check_shapes, weights::check_len, SeConfig, SeGrads, SeWeights};
use crate::cuda::{Buf, CudaDevice, CudaElement, DeviceTensor, DeviceView, DeviceViewMut};
use crate::error::{Error, Result};
use crate::tensor::{Layout, Shape};
use views::Workspace;

fn view<T: crate::cuda::DevElem>(dev: &CudaDevice, b: &Buf<T>) -> DeviceView<'static, T> {
    DeviceView::owned(dev.addr(b), b.len(), b.owner())
}

fn view_mut<T: crate::cuda::DevElem>(
    dev: &CudaDevice,
    b: &mut Buf<T>,
) -> DeviceViewMut<'static, T> {
    DeviceViewMut::owned(dev.addr(b), b.len(), b.owner())
}

/// Which kernels run an SE pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SePath {
    /// Let the heuristic choose (see [`choose_path`]).
    #[default]
    Auto,
    /// Squeeze, excitation, scale over the whole batch.
    ThreeKernel,
    /// The same kernels over chunks of samples that stay in L2.
    L2Chunked,
    /// One launch of the thread-block-cluster kernel (sm_90+, samples that fit on chip).
    Cluster,
}

impl SePath {
    /// The concrete paths.
    pub const CONCRETE: [SePath; 3] = [SePath::ThreeKernel, SePath::L2Chunked, SePath::Cluster];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            SePath::Auto => "auto",
            SePath::ThreeKernel => "three-kernel",
            SePath::L2Chunked => "l2-chunked",
            SePath::Cluster => "cluster",
        }
    }
}

impl std::fmt::Display for SePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SePath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(SePath::Auto),
            "three-kernel" | "3k" => Ok(SePath::ThreeKernel),
            "l2-chunked" | "chunked" => Ok(SePath::L2Chunked),
            "cluster" | "fused" => Ok(SePath::Cluster),
            _ => Err(Error::Config(format!(
                "unknown path `{s}` (auto, three-kernel, l2-chunked, cluster)"
            ))),
        }
    }
}

/// Options for one SE call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeOptions {
    /// The path to run; `Auto` by default.
    pub path: SePath,
    /// Samples per chunk for [`SePath::L2Chunked`]; sized from the L2 cache when `None`.
    pub chunk_samples: Option<usize>,
}

impl SeOptions {
    /// Options forcing `path`.
    pub fn with_path(path: SePath) -> Self {
        SeOptions {
            path,
            chunk_samples: None,
        }
    }
}

#[cfg(feature = "nn")]
/// Splits SE-shaped buffers (`[w1, b1, w2, b2]` or their gradients: `hidden x C`, `hidden`,
/// `C x hidden`, `C`, the biases exactly when `config` has them) into the two weights and two
/// optional biases, or an error naming `what` when they do not fit.
#[allow(clippy::type_complexity)]
fn se_shaped(
    config: SeConfig,
    bufs: [Option<Buf<f32>>; 4],
    what: &str,
) -> Result<(Buf<f32>, Option<Buf<f32>>, Buf<f32>, Option<Buf<f32>>)> {
    config.validate()?;
    let (c, d) = (config.channels, config.hidden);
    let bias = |n: usize| config.bias.then_some(n);
    let fits = |b: &Option<Buf<f32>>, want: Option<usize>| match (b, want) {
        (Some(b), Some(n)) => b.len() == n.max(1),
        (None, None) => true,
        _ => false,
    };
    let wants = [Some(d * c), bias(d), Some(c * d), bias(c)];
    if !bufs.iter().zip(wants).all(|(b, w)| fits(b, w)) {
        return Err(Error::Shape(format!("{what} do not match the config")));
    }
    match bufs {
        [Some(w1), b1, Some(w2), b2] => Ok((w1, b1, w2, b2)),
        _ => Err(Error::Shape(format!("{what} do not match the config"))),
    }
}

/// SE weights on a device (f32, PyTorch layout).
pub struct DeviceSeWeights {
    config: SeConfig,
    w1: Buf<f32>,
    b1: Option<Buf<f32>>,
    w2: Buf<f32>,
    b2: Option<Buf<f32>>,
}

impl DeviceSeWeights {
    /// Uploads host weights (validated first).
    pub fn upload(dev: &CudaDevice, w: &SeWeights) -> Result<Self> {
        w.validate()?;
        Ok(DeviceSeWeights {
            config: w.config,
            w1: dev.upload(&w.w1)?,
            b1: w.b1.as_deref().map(|b| dev.upload(b)).transpose()?,
            w2: dev.upload(&w.w2)?,
            b2: w.b2.as_deref().map(|b| dev.upload(b)).transpose()?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> SeConfig {
        self.config
    }

    /// Views of the weights, for [`forward_views`] / [`backward_views`] on `dev`.
    pub fn views(&self, dev: &CudaDevice) -> SeWeightViews<'_> {
        SeWeightViews {
            w1: view(dev, &self.w1),
            b1: self.b1.as_ref().map(|b| view(dev, b)),
            w2: view(dev, &self.w2),
            b2: self.b2.as_ref().map(|b| view(dev, b)),
        }
    }

    #[cfg(feature = "nn")]
    /// Host weights written into caller buffers (`[w1, b1, w2, b2]`, the biases only when the
    /// config has them), each exactly its tensor's length: the network backend's pooled
    /// buffers.
    pub(crate) fn write_into(
        dev: &CudaDevice,
        w: &SeWeights,
        bufs: [Option<Buf<f32>>; 4],
    ) -> Result<Self> {
        w.validate()?;
        let mut d = Self::from_bufs(w.config, bufs)?;
        dev.write(&mut d.w1, 0, &w.w1)?;
        dev.write(&mut d.w2, 0, &w.w2)?;
        for (b, src) in [(&mut d.b1, &w.b1), (&mut d.b2, &w.b2)] {
            if let (Some(b), Some(src)) = (b, src) {
                dev.write(b, 0, src)?;
            }
        }
        Ok(d)
    }

    #[cfg(feature = "nn")]
    /// Caller buffers that already hold the weights (`[w1, b1, w2, b2]`, the biases exactly
    /// when the config has them, each its tensor's length).
    pub(crate) fn from_bufs(config: SeConfig, bufs: [Option<Buf<f32>>; 4]) -> Result<Self> {
        let (w1, b1, w2, b2) = se_shaped(config, bufs, "SE weight buffers")?;
        Ok(DeviceSeWeights {
            config,
            w1,
            b1,
            w2,
            b2,
        })
    }

    #[cfg(feature = "nn")]
    /// The buffers, for reuse.
    pub(crate) fn into_bufs(self) -> impl Iterator<Item = Buf<f32>> {
        [Some(self.w1), self.b1, Some(self.w2), self.b2]
            .into_iter()
            .flatten()
    }
}

/// What the forward pass keeps for backward, on the device: z, h (hidden pre-activation),
/// u = act(h) and s, each `[n][..]` f32.
pub struct DeviceSeSaved {
    n: usize,
    config: SeConfig,
    z: Buf<f32>,
    h: Buf<f32>,
    u: Buf<f32>,
    s: Buf<f32>,
}

/// [`DeviceSeSaved`] copied to the host: the same f32 values the CPU path saves.
pub type HostSeSaved = super::cpu::CpuSaved;

impl DeviceSeSaved {
    /// Buffers for a batch of `n` samples.
    pub fn new(dev: &CudaDevice, config: SeConfig, n: usize) -> Result<Self> {
        config.validate()?;
        if n == 0 {
            return Err(Error::Shape("batch of 0 samples".into()));
        }
        let (c, d) = (config.channels, config.hidden);
        Ok(DeviceSeSaved {
            n,
            config,
            z: dev.alloc_zeros::<f32>(n * c)?,
            h: dev.alloc_zeros::<f32>(n * d)?,
            u: dev.alloc_zeros::<f32>(n * d)?,
            s: dev.alloc_zeros::<f32>(n * c)?,
        })
    }

    #[cfg(feature = "nn")]
    /// Caller buffers (`z, h, u, s`: `n * channels`, `n * hidden`, `n * hidden`,
    /// `n * channels` elements) as the saved state of a batch of `n`.
    pub(crate) fn from_bufs(config: SeConfig, n: usize, bufs: [Buf<f32>; 4]) -> Result<Self> {
        config.validate()?;
        if n == 0 {
            return Err(Error::Shape("batch of 0 samples".into()));
        }
        let (c, d) = (config.channels, config.hidden);
        let [z, h, u, s] = bufs;
        for (b, want) in [(&z, n * c), (&h, n * d), (&u, n * d), (&s, n * c)] {
            if b.len() != want.max(1) {
                return Err(Error::Length {
                    what: "SE saved-state buffer",
                    got: b.len(),
                    expected: want,
                });
            }
        }
        Ok(DeviceSeSaved {
            n,
            config,
            z,
            h,
            u,
            s,
        })
    }

    #[cfg(feature = "nn")]
    /// The buffers, for reuse.
    pub(crate) fn into_bufs(self) -> [Buf<f32>; 4] {
        [self.z, self.h, self.u, self.s]
    }

    /// Read-only views (for [`backward_views`]) on `dev`.
    pub fn views(&self, dev: &CudaDevice) -> SeSavedViews<'_> {
        SeSavedViews {
            z: view(dev, &self.z),
            h: view(dev, &self.h),
            u: view(dev, &self.u),
            s: view(dev, &self.s),
        }
    }

    /// Writable views (for [`forward_views`]) on `dev`.
    pub fn views_mut(&mut self, dev: &CudaDevice) -> SeSavedViewsMut<'_> {
        SeSavedViewsMut {
            z: view_mut(dev, &mut self.z),
            h: view_mut(dev, &mut self.h),
            u: view_mut(dev, &mut self.u),
            s: view_mut(dev, &mut self.s),
        }
    }

    /// Copies the saved values to the host.
    pub fn download(&self, dev: &CudaDevice) -> Result<HostSeSaved> {
        let (c, d) = (self.config.channels, self.config.hidden);
        Ok(HostSeSaved {
            z: dev.read(&self.z, 0, self.n * c)?,
            h: dev.read(&self.h, 0, self.n * d)?,
            u: dev.read(&self.u, 0, self.n * d)?,
            s: dev.read(&self.s, 0, self.n * c)?,
        })
    }

    /// Poisons every buffer with NaN (tests).
    pub(crate) fn poison_all(&mut self, dev: &CudaDevice) -> Result<()> {
        for b in [&mut self.z, &mut self.h, &mut self.u, &mut self.s] {
            poison_f32(dev, b)?;
        }
        Ok(())
    }
}

/// Parameter gradients on the device.
pub struct DeviceSeGrads {
    config: SeConfig,
    dw1: Buf<f32>,
    db1: Option<Buf<f32>>,
    dw2: Buf<f32>,
    db2: Option<Buf<f32>>,
}

impl DeviceSeGrads {
    /// Zeroed gradient buffers for `config`.
    pub fn new(dev: &CudaDevice, config: SeConfig) -> Result<Self> {
        config.validate()?;
        let (c, d) = (config.channels, config.hidden);
        Ok(DeviceSeGrads {
            config,
            dw1: dev.alloc_zeros::<f32>(d * c)?,
            db1: config.bias.then(|| dev.alloc_zeros::<f32>(d)).transpose()?,
            dw2: dev.alloc_zeros::<f32>(c * d)?,
            db2: config.bias.then(|| dev.alloc_zeros::<f32>(c)).transpose()?,
        })
    }

    #[cfg(feature = "nn")]
    /// Caller buffers as gradient storage for `config` (`[dw1, db1, dw2, db2]`, the biases
    /// exactly when the config has them); contents are overwritten by a backward pass.
    pub(crate) fn from_bufs(config: SeConfig, bufs: [Option<Buf<f32>>; 4]) -> Result<Self> {
        let (dw1, db1, dw2, db2) = se_shaped(config, bufs, "SE gradient buffers")?;
        Ok(DeviceSeGrads {
            config,
            dw1,
            db1,
            dw2,
            db2,
        })
    }

    #[cfg(feature = "nn")]
    /// The buffers, for reuse.
    pub(crate) fn into_bufs(self) -> impl Iterator<Item = Buf<f32>> {
        [Some(self.dw1), self.db1, Some(self.dw2), self.db2]
            .into_iter()
            .flatten()
    }

    /// Writable views (for [`backward_views`]) on `dev`.
    pub fn views_mut(&mut self, dev: &CudaDevice) -> SeGradViewsMut<'_> {
        SeGradViewsMut {
            dw1: view_mut(dev, &mut self.dw1),
            db1: self.db1.as_mut().map(|b| view_mut(dev, b)),
            dw2: view_mut(dev, &mut self.dw2),
            db2: self.db2.as_mut().map(|b| view_mut(dev, b)),
        }
    }

    /// Copies the gradients to the host.
    pub fn download(&self, dev: &CudaDevice) -> Result<SeGrads<f32>> {
        let (c, d) = (self.config.channels, self.config.hidden);
        Ok(SeGrads {
            dw1: dev.read(&self.dw1, 0, d * c)?,
            db1: self.db1.as_ref().map(|b| dev.read(b, 0, d)).transpose()?,
            dw2: dev.read(&self.dw2, 0, c * d)?,
            db2: self.db2.as_ref().map(|b| dev.read(b, 0, c)).transpose()?,
        })
    }

    /// Poisons every buffer with NaN (tests).
    pub(crate) fn poison_all(&mut self, dev: &CudaDevice) -> Result<()> {
        poison_f32(dev, &mut self.dw1)?;
        poison_f32(dev, &mut self.dw2)?;
        for b in [&mut self.db1, &mut self.db2].into_iter().flatten() {
            poison_f32(dev, b)?;
        }
        Ok(())
    }
}

fn poison_f32(dev: &CudaDevice, b: &mut Buf<f32>) -> Result<()> {
    let n = b.len();
    dev.fill_bytes(b, 0, n, 0xff)
}

/// A forward pass's results.
pub struct SeForwardOutput<T: CudaElement> {
    /// The output.
    pub y: DeviceTensor<T>,
    /// What backward needs.
    pub saved: DeviceSeSaved,
    /// The path that ran.
    pub path: SePath,
}

/// A backward pass's results.
pub struct SeBackwardOutput<T: CudaElement> {
    /// d loss / d x.
    pub dx: DeviceTensor<T>,
    /// Parameter gradients.
    pub grads: DeviceSeGrads,
    /// d loss / d residual (with the epilogue).
    pub dresidual: Option<DeviceTensor<T>>,
    /// The path that ran.
    pub path: SePath,
}

// ------------------------------------------------------------------------------ path choice

/// Threads per CTA of the cluster kernels.
const FUSED_THREADS: u32 = 512;
/// CTAs per cluster.
const CLUSTER: usize = 8;
/// Bytes of input one block of the staged squeeze kernels takes at a time.
const STAGE_BYTES: usize = 8192;

/// Which direction a path is chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The forward pass.
    Forward,
    /// The backward pass.
    Backward,
}

/// Dynamic shared memory the cluster kernel needs per CTA, in bytes.
pub fn cluster_smem_bytes(
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
) -> usize {
    let round16 = |b: usize| b.div_ceil(16) * 16;
    let cap = match layout {
        Layout::Nchw => cfg.channels.div_ceil(CLUSTER) * shape.hw(),
        Layout::Nhwc => shape.hw().div_ceil(CLUSTER) * cfg.channels,
    };
    let slices = if dir == Direction::Forward { 1 } else { 2 };
    round16((4 * cfg.channels + 2 * cfg.hidden) * 4) + slices * round16(cap * esize + 16)
}

/// Whether the cluster path can run this shape on `dev`.
pub fn cluster_fits(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
) -> bool {
    dev.has_clusters()
        && cluster_smem_bytes(cfg, shape, layout, esize, dir) <= dev.info().max_smem_per_block
}

/// The path [`SePath::Auto`] resolves to.
///
/// The cluster kernel when every sample's cluster is resident at once (one CTA per SM: at most
/// `sm_count / 8` samples, and at least 2), the sample fits on chip, the driver reports
/// occupancy for it, and the per-sample weight reads stay small next to it; otherwise the
/// three-kernel path (also when the occupancy query is refused: never an error).
///
/// Set from the first measurements on an H200 (benches/results/2026-12-04-gpu-nvidia-h200-run1.md):
/// at batch 8 the cluster kernel was the fastest path at most ResNet-50 stages (forward
/// 24.6 us against three-kernel 35.3 at 8x512x28x28 bf16); at batch 256, where the clusters
/// run in many waves, the three-kernel path was the fastest at 15 of 16 stage / dtype / layout
/// points in each direction, and L2 chunking never was (it is kept as an explicit choice).
pub fn choose_path(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
) -> SePath {
    let sample_bytes = shape.sample_numel() * esize;
    let weight_bytes = 2 * cfg.channels * cfg.hidden * 4;
    let one_wave = shape.n >= 2 && shape.n * CLUSTER <= dev.info().sm_count as usize;
    if one_wave
        && weight_bytes * 4 <= sample_bytes
        && cluster_fits(dev, cfg, shape, layout, esize, dir)
        && cluster_resident(dev, cfg, shape, layout, esize, dir)
    {
        SePath::Cluster
    } else {
        SePath::ThreeKernel
    }
}

/// Whether the driver reports room for at least one cluster of the fused kernel at this shape's
/// shared memory (cached per kernel and size). A refused query or no occupancy sends
/// [`SePath::Auto`] to the three-kernel path instead of failing the call. The 2-byte types ask
/// for the bf16 kernel (the f16 one is the same code).
fn cluster_resident(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
) -> bool {
    use crate::cuda::kargs::{SeFusedBwdNchw, SeFusedBwdNhwc, SeFusedFwdNchw, SeFusedFwdNhwc};
    let ty = if esize == 4 { "f32" } else { "bf16" };
    let smem = cluster_smem_bytes(cfg, shape, layout, esize, dir);
    let resident = match (dir, layout) {
        (Direction::Forward, Layout::Nchw) => {
            launch::resident_clusters::<SeFusedFwdNchw>(dev, ty, smem)
        }
        (Direction::Forward, Layout::Nhwc) => {
            launch::resident_clusters::<SeFusedFwdNhwc>(dev, ty, smem)
        }
        (Direction::Backward, Layout::Nchw) => {
            launch::resident_clusters::<SeFusedBwdNchw>(dev, ty, smem)
        }
        (Direction::Backward, Layout::Nhwc) => {
            launch::resident_clusters::<SeFusedBwdNhwc>(dev, ty, smem)
        }
    };
    matches!(resident, Ok(n) if n > 0)
}

fn resolve(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
    path: SePath,
) -> Result<SePath> {
    match path {
        SePath::Auto => Ok(choose_path(dev, cfg, shape, layout, esize, dir)),
        SePath::Cluster if !dev.has_clusters() => Err(Error::Unsupported(format!(
            "the cluster path needs sm_90 or newer (and a build with sm_90); {} is sm_{}{}",
            dev.info().name,
            dev.info().compute_capability.0,
            dev.info().compute_capability.1
        ))),
        SePath::Cluster if !cluster_fits(dev, cfg, shape, layout, esize, dir) => Err(Error::Unsupported(format!(
            "a {shape} {layout} sample needs {} bytes of shared memory per CTA on the cluster path; the device allows {}",
            cluster_smem_bytes(cfg, shape, layout, esize, dir),
            dev.info().max_smem_per_block
        ))),
        p => Ok(p),
    }
}

fn chunk_samples(
    dev: &CudaDevice,
    shape: Shape,
    esize: usize,
    streams: usize,
    opts: &SeOptions,
    path: SePath,
) -> usize {
    match path {
        SePath::L2Chunked => opts
            .chunk_samples
            .unwrap_or_else(|| {
                (dev.info().l2_bytes * 2 / 5) / (streams * shape.sample_numel() * esize).max(1)
            })
            .clamp(1, shape.n),
        _ => shape.n,
    }
}

// ------------------------------------------------------------------------------ owned front door

fn check_saved(saved: &DeviceSeSaved, cfg: &SeConfig, n: usize) -> Result<()> {
    if saved.config != *cfg {
        return Err(Error::Config(format!(
            "saved state is for {}, weights are {}",
            saved.config, cfg
        )));
    }
    check_len("saved batch", saved.n, n)
}

/// SE forward: returns y and what backward needs. With `residual`, the fused epilogue
/// `y = relu(s * x + residual)`.
pub fn forward<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    x: &DeviceTensor<T>,
    residual: Option<&DeviceTensor<T>>,
    opts: SeOptions,
) -> Result<SeForwardOutput<T>> {
    check_shapes(
        &w.config,
        x.shape(),
        x.layout(),
        residual.map(|r| (r.shape(), r.layout())),
        None,
    )?;
    let mut y = DeviceTensor::zeros(dev, x.shape(), x.layout())?;
    let mut saved = DeviceSeSaved::new(dev, w.config, x.shape().n)?;
    let path = forward_into(dev, w, x, residual, &mut y, &mut saved, opts)?;
    Ok(SeForwardOutput { y, saved, path })
}

/// SE forward into existing buffers (no allocation besides the handle's reused workspace).
/// Returns the path that ran.
pub fn forward_into<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    x: &DeviceTensor<T>,
    residual: Option<&DeviceTensor<T>>,
    y: &mut DeviceTensor<T>,
    saved: &mut DeviceSeSaved,
    opts: SeOptions,
) -> Result<SePath> {
    check_shapes(
        &w.config,
        x.shape(),
        x.layout(),
        residual.map(|r| (r.shape(), r.layout())),
        Some((y.shape(), y.layout())),
    )?;
    check_saved(saved, &w.config, x.shape().n)?;
    let args = SeForwardViews {
        x: x.view(dev),
        residual: residual.map(|r| r.view(dev)),
        y: y.view_mut(dev),
        weights: w.views(dev),
        saved: saved.views_mut(dev),
    };
    views::forward_with(
        dev,
        &w.config,
        x.shape(),
        x.layout(),
        &args,
        Workspace::Own,
        opts,
    )
}

/// SE forward writing y over x (inference; x is gone afterwards, so backward is not possible
/// from these buffers).
pub fn forward_in_place<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    x: &mut DeviceTensor<T>,
    residual: Option<&DeviceTensor<T>>,
    saved: &mut DeviceSeSaved,
    opts: SeOptions,
) -> Result<SePath> {
    check_shapes(
        &w.config,
        x.shape(),
        x.layout(),
        residual.map(|r| (r.shape(), r.layout())),
        None,
    )?;
    check_saved(saved, &w.config, x.shape().n)?;
    let (shape, layout) = (x.shape(), x.layout());
    let xv = x.view_mut(dev);
    let args = SeForwardViews {
        x: DeviceView::owned(xv.addr(), xv.len(), xv.device()),
        residual: residual.map(|r| r.view(dev)),
        y: xv,
        weights: w.views(dev),
        saved: saved.views_mut(dev),
    };
    views::forward_with(dev, &w.config, shape, layout, &args, Workspace::Own, opts)
}

/// SE backward: returns dx, the parameter gradients and (with the epilogue) d residual.
pub fn backward<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    x: &DeviceTensor<T>,
    residual: Option<&DeviceTensor<T>>,
    saved: &DeviceSeSaved,
    dy: &DeviceTensor<T>,
    opts: SeOptions,
) -> Result<SeBackwardOutput<T>> {
    check_shapes(
        &w.config,
        x.shape(),
        x.layout(),
        residual.map(|r| (r.shape(), r.layout())),
        Some((dy.shape(), dy.layout())),
    )?;
    let mut dx = DeviceTensor::zeros(dev, x.shape(), x.layout())?;
    let mut grads = DeviceSeGrads::new(dev, w.config)?;
    let mut dres = residual
        .map(|_| DeviceTensor::zeros(dev, x.shape(), x.layout()))
        .transpose()?;
    let path = backward_into(
        dev,
        w,
        x,
        residual,
        saved,
        dy,
        &mut dx,
        false,
        &mut grads,
        dres.as_mut(),
        opts,
    )?;
    Ok(SeBackwardOutput {
        dx,
        grads,
        dresidual: dres,
        path,
    })
}

/// SE backward into existing buffers. With `accumulate`, dx gets the gradient added to what it
/// holds (a residual network adds the identity path's gradient); parameter gradients are
/// overwritten. `dresidual` must be given exactly when `residual` is.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    x: &DeviceTensor<T>,
    residual: Option<&DeviceTensor<T>>,
    saved: &DeviceSeSaved,
    dy: &DeviceTensor<T>,
    dx: &mut DeviceTensor<T>,
    accumulate: bool,
    grads: &mut DeviceSeGrads,
    dresidual: Option<&mut DeviceTensor<T>>,
    opts: SeOptions,
) -> Result<SePath> {
    let cfg = w.config;
    let (shape, layout) = (x.shape(), x.layout());
    check_shapes(
        &cfg,
        shape,
        layout,
        residual.map(|r| (r.shape(), r.layout())),
        Some((dy.shape(), dy.layout())),
    )?;
    check_shapes(
        &cfg,
        shape,
        layout,
        dresidual.as_ref().map(|r| (r.shape(), r.layout())),
        Some((dx.shape(), dx.layout())),
    )?;
    if grads.config != cfg {
        return Err(Error::Config(format!(
            "gradients are for {}, weights are {}",
            grads.config, cfg
        )));
    }
    check_saved(saved, &cfg, shape.n)?;
    let args = SeBackwardViews {
        x: x.view(dev),
        residual: residual.map(|r| r.view(dev)),
        dy: dy.view(dev),
        weights: w.views(dev),
        saved: saved.views(dev),
        dx: dx.view_mut(dev),
        accumulate,
        dresidual: dresidual.map(|r| r.view_mut(dev)),
        grads: grads.views_mut(dev),
    };
    views::backward_with(dev, &cfg, shape, layout, &args, Workspace::Own, opts)
}
