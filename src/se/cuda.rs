//! SE on the GPU: forward and backward over device tensors.
//!
//! Three ways to run the same math, picked per call by [`SePath`]:
//! - [`SePath::ThreeKernel`]: squeeze, excitation (two batched GEMM launches with fused
//!   epilogues) and scale over the whole batch; x is read twice (3N bytes forward).
//! - [`SePath::L2Chunked`]: the same kernels over chunks of samples sized to stay in L2, so the
//!   second read of x (and dy) mostly hits L2.
//! - [`SePath::Cluster`] (sm_90+): one launch; a cluster of 8 CTAs holds a sample in shared
//!   memory, so x is read once (2N forward, 3N backward).
//!
//! [`SePath::Auto`] picks by shape, dtype and device. All paths agree with
//! [`reference`](super::reference) within DESIGN.md's tolerances and are deterministic.

use super::{check_shapes, weights::check_len, SeConfig, SeGrads, SeWeights};
use crate::cuda::abi::{self, SeGemmParams, SeParams};
use crate::cuda::{Buf, CudaDevice, CudaElement, DeviceTensor, Module};
use crate::error::{Error, Result};
use crate::tensor::{Layout, Shape};
use std::ffi::c_void;

/// A kernel argument: the address of a value the launch copies.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
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

    /// The buffers, for reuse.
    pub(crate) fn into_bufs(self) -> [Buf<f32>; 4] {
        [self.z, self.h, self.u, self.s]
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
    pub fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
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

    /// The buffers, for reuse.
    pub(crate) fn into_bufs(self) -> impl Iterator<Item = Buf<f32>> {
        [Some(self.dw1), self.db1, Some(self.dw2), self.db2]
            .into_iter()
            .flatten()
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
    pub fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
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

const FUSED_THREADS: u32 = 512;
const CLUSTER: usize = 8;
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
/// The cluster kernel when it fits on chip and the per-sample weight reads stay small next to
/// the sample (they come from L2 once per sample); otherwise L2-chunking when the tensors
/// touched exceed half the L2; otherwise the three-kernel path.
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
    if cluster_fits(dev, cfg, shape, layout, esize, dir)
        && weight_bytes * 4 <= sample_bytes
        && shape.n >= 2
    {
        return SePath::Cluster;
    }
    let streams = if dir == Direction::Forward { 1 } else { 2 };
    if streams * shape.numel() * esize > dev.info().l2_bytes / 2 {
        SePath::L2Chunked
    } else {
        SePath::ThreeKernel
    }
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

// ------------------------------------------------------------------------------ launching

/// Everything a launch sequence needs: the device, the dtype's kernel suffix and size.
struct Ctx<'a> {
    dev: &'a CudaDevice,
    suffix: &'static str,
    esize: usize,
    cfg: SeConfig,
    hw: usize,
    layout: Layout,
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernels' 32-bit limit")))
}

/// True when every non-null pointer shares one 16-byte phase.
fn same_phase(ptrs: &[u64]) -> bool {
    let mut it = ptrs.iter().filter(|&&p| p != 0).map(|p| p & 15);
    match it.next() {
        Some(first) => it.all(|p| p == first),
        None => true,
    }
}

impl Ctx<'_> {
    fn base_params(&self, n: usize) -> SeParams {
        SeParams {
            n: n as u64,
            hw: self.hw as u64,
            hw_split: self.hw as u64,
            c: self.cfg.channels as u32,
            hidden: self.cfg.hidden as u32,
            layout: match self.layout {
                Layout::Nchw => abi::SENET_LAYOUT_NCHW,
                Layout::Nhwc => abi::SENET_LAYOUT_NHWC,
            },
            act: match self.cfg.activation {
                super::Activation::Relu => abi::SENET_ACT_RELU,
                super::Activation::Silu => abi::SENET_ACT_SILU,
            },
            gate: match self.cfg.gate {
                super::Gate::Sigmoid => abi::SENET_GATE_SIGMOID,
                super::Gate::HardSigmoid => abi::SENET_GATE_HARDSIGMOID,
            },
            flags: if self.cfg.bias {
                abi::SENET_FLAG_BIAS
            } else {
                0
            },
            splits: 1,
            rows: 0,
            inv_hw: 1.0 / self.hw as f32,
            reserved: 0,
        }
    }

    fn sms(&self) -> usize {
        self.dev.info().sm_count as usize
    }

    /// Squeeze (pool) or its gradient (dgate) over `n` samples.
    /// Pool: ins = [x], outs: out = z. Grad: ins = [dy, x, r, s], dres, out = dg.
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        grad: bool,
        n: usize,
        dy: u64,
        x: u64,
        r: u64,
        s: u64,
        dres: u64,
        out: u64,
    ) -> Result<()> {
        let mut p = self.base_params(n);
        let (c, hw, esize) = (self.cfg.channels, self.hw, self.esize);
        let v = 16 / esize;
        if r != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        let family = if grad { "se_dgate" } else { "se_pool" };
        let (name, grid, block, tickets, ws) = match self.layout {
            Layout::Nchw => {
                if same_phase(&[dy, x, r, dres]) {
                    p.flags |= abi::SENET_FLAG_VEC;
                }
                let rows = n * c;
                if hw * esize <= 2048 {
                    let per = (STAGE_BYTES / (hw * esize)).max(1);
                    p.rows = u32_of(per, "rows per block")?;
                    let blocks = rows.div_ceil(per);
                    (
                        format!("{family}_nchw_staged_{}", self.suffix),
                        (u32_of(blocks, "blocks")?, 1, 1),
                        (256, 1, 1),
                        0,
                        0,
                    )
                } else {
                    let blocks = rows.div_ceil(8);
                    let want = if blocks < 2 * self.sms() {
                        (2 * self.sms()).div_ceil(blocks)
                    } else {
                        1
                    };
                    let max_splits = hw.div_ceil(32 * v * 4).max(1);
                    let splits = want.clamp(1, max_splits.min(65535));
                    let per = hw.div_ceil(splits).div_ceil(8) * 8;
                    let splits = hw.div_ceil(per);
                    p.splits = splits as u32;
                    p.hw_split = per as u64;
                    let ws = if splits > 1 { splits * rows } else { 0 };
                    (
                        format!("{family}_nchw_rows_{}", self.suffix),
                        (u32_of(blocks, "blocks")?, splits as u32, 1),
                        (256, 1, 1),
                        blocks,
                        ws,
                    )
                }
            }
            Layout::Nhwc => {
                let aligned = [dy, x, r, dres].iter().all(|&q| q % 16 == 0);
                let vec = aligned && c % v == 0;
                let tile = 32 * if vec { v } else { 1 };
                let blocks = n * c.div_ceil(tile);
                let want = (4 * self.sms()).div_ceil(blocks).max(1);
                let splits = want.clamp(1, hw.div_ceil(8).clamp(1, 65535));
                let per = hw.div_ceil(splits);
                let splits = hw.div_ceil(per);
                p.splits = splits as u32;
                p.hw_split = per as u64;
                let ws = if splits > 1 { splits * n * c } else { 0 };
                let name = format!(
                    "{family}_nhwc{}_{}",
                    if vec { "_vec" } else { "" },
                    self.suffix
                );
                (
                    name,
                    (u32_of(blocks, "blocks")?, splits as u32, 1),
                    (32, 8, 1),
                    blocks,
                    ws,
                )
            }
        };
        let scratch = self.dev.scratch(ws, tickets)?;
        let (wsp, tkp) = scratch.addrs(self.dev)?;
        let mut args: Vec<*mut c_void> = if grad {
            vec![
                arg(&p),
                arg(&dy),
                arg(&x),
                arg(&r),
                arg(&s),
                arg(&dres),
                arg(&out),
                arg(&wsp),
                arg(&tkp),
            ]
        } else {
            vec![arg(&p), arg(&x), arg(&out), arg(&wsp), arg(&tkp)]
        };
        // SAFETY: argument types and order match the kernel's signature in squeeze.cu; every
        // address covers the sizes `p` describes (checked by the callers); scratch stays locked.
        unsafe {
            self.dev
                .launch(Module::Squeeze, &name, grid, block, 0, 1, &mut args)
        }?;
        drop(scratch);
        Ok(())
    }

    /// out = epilogue(A B) with the strides of SeGemmParams.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: u64,
        (sa_m, sa_k): (usize, usize),
        bmat: u64,
        (sb_k, sb_n): (usize, usize),
        out: u64,
        out2: u64,
        bias: u64,
        aux: u64,
        epilogue: u32,
    ) -> Result<()> {
        // Split K so that the grid fills the machine and each block runs a few K tiles: these
        // GEMMs are small and latency-bound, not FLOP-bound.
        let tiles = m.div_ceil(32) * n.div_ceil(32);
        let splits = if k > 128 && tiles < 4 * self.sms() {
            (4 * self.sms())
                .div_ceil(tiles)
                .min(k.div_ceil(128))
                .clamp(1, 64)
        } else {
            1
        };
        let kps = k.div_ceil(splits).div_ceil(32) * 32;
        let splits = k.div_ceil(kps);
        let p = SeGemmParams {
            sa_m: sa_m as i64,
            sa_k: sa_k as i64,
            sb_k: sb_k as i64,
            sb_n: sb_n as i64,
            m: u32_of(m, "gemm m")?,
            n: u32_of(n, "gemm n")?,
            k: u32_of(k, "gemm k")?,
            k_splits: splits as u32,
            k_per_split: kps as u32,
            epilogue,
            act: self.base_params(1).act,
            gate: self.base_params(1).gate,
            flags: if bias != 0 { abi::SENET_FLAG_BIAS } else { 0 },
            reserved: 0,
        };
        let gy = m.div_ceil(32);
        if gy > 65535 {
            return Err(Error::Shape(format!(
                "gemm with {m} rows exceeds the grid limit"
            )));
        }
        let grid = (
            u32_of(n.div_ceil(32), "gemm grid")?,
            gy as u32,
            splits as u32,
        );
        let ws = if splits > 1 { splits * m * n } else { 0 };
        let scratch = self.dev.scratch(ws, grid.0 as usize * grid.1 as usize)?;
        let (wsp, tkp) = scratch.addrs(self.dev)?;
        let mut args = [
            arg(&p),
            arg(&a),
            arg(&bmat),
            arg(&out),
            arg(&out2),
            arg(&bias),
            arg(&aux),
            arg(&wsp),
            arg(&tkp),
        ];
        // SAFETY: matches se_gemm_f32's signature; A, B, out (and out2 / bias / aux where the
        // epilogue reads them) cover the m x k, k x n and m x n ranges the strides describe.
        unsafe {
            self.dev.launch(
                Module::Excite,
                "se_gemm_f32",
                grid,
                (256, 1, 1),
                0,
                1,
                &mut args,
            )
        }?;
        drop(scratch);
        Ok(())
    }

    fn colsum(&self, input: u64, out: u64, rows: usize, cols: usize) -> Result<()> {
        let (rows32, cols32, acc) = (u32_of(rows, "rows")?, u32_of(cols, "cols")?, 0u32);
        let mut args = [
            arg(&input),
            arg(&out),
            arg(&rows32),
            arg(&cols32),
            arg(&acc),
        ];
        let grid = (cols32.div_ceil(256), 1, 1);
        // SAFETY: matches se_colsum_f32; `input` holds rows x cols floats, `out` cols.
        unsafe {
            self.dev.launch(
                Module::Excite,
                "se_colsum_f32",
                grid,
                (256, 1, 1),
                0,
                1,
                &mut args,
            )
        }
    }

    /// The element-wise pass: scale (forward) or dx (backward) over `n` samples.
    #[allow(clippy::too_many_arguments)]
    fn elementwise(
        &self,
        dx: bool,
        n: usize,
        a: u64,
        r_or_dz: u64,
        s: u64,
        out: u64,
        accumulate: bool,
    ) -> Result<()> {
        let mut p = self.base_params(n);
        let total = n * self.cfg.channels * self.hw;
        let phase_ptrs = if dx { [a, out, 0] } else { [a, r_or_dz, out] };
        if same_phase(&phase_ptrs) {
            p.flags |= abi::SENET_FLAG_VEC;
        }
        if !dx && r_or_dz != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        if dx && accumulate {
            p.flags |= abi::SENET_FLAG_ACCUMULATE;
        }
        let v = 16 / self.esize;
        let blocks = total.div_ceil(v * 256 * 4).clamp(1, self.sms() * 8);
        let name = format!("{}_{}", if dx { "se_dx" } else { "se_scale" }, self.suffix);
        let mut args = if dx {
            [arg(&p), arg(&a), arg(&s), arg(&r_or_dz), arg(&out)]
        } else {
            [arg(&p), arg(&a), arg(&r_or_dz), arg(&s), arg(&out)]
        };
        // SAFETY: matches se_scale_* (p, x, r, s, y) / se_dx_* (p, g, s, dz, dx); the tensors
        // hold n * c * hw elements, s and dz n * c floats.
        unsafe {
            self.dev.launch(
                Module::Scale,
                &name,
                (blocks as u32, 1, 1),
                (256, 1, 1),
                0,
                1,
                &mut args,
            )
        }
    }
}

// ------------------------------------------------------------------------------ forward

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

/// SE forward into existing buffers (no allocation besides reused scratch). Returns the path
/// that ran.
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
    let yp = y.addr_mut(dev);
    run_forward::<T>(
        dev,
        w,
        x.shape(),
        x.layout(),
        x.addr(dev),
        residual.map_or(0, |r| r.addr(dev)),
        yp,
        saved,
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
    let xp = x.addr_mut(dev);
    run_forward::<T>(
        dev,
        w,
        x.shape(),
        x.layout(),
        xp,
        residual.map_or(0, |r| r.addr(dev)),
        xp,
        saved,
        opts,
    )
}

fn check_saved(saved: &DeviceSeSaved, cfg: &SeConfig, n: usize) -> Result<()> {
    if saved.config != *cfg {
        return Err(Error::Config(format!(
            "saved state is for {}, weights are {}",
            saved.config, cfg
        )));
    }
    check_len("saved batch", saved.n, n)
}

#[allow(clippy::too_many_arguments)]
fn run_forward<T: CudaElement>(
    dev: &CudaDevice,
    w: &DeviceSeWeights,
    shape: Shape,
    layout: Layout,
    xp: u64,
    rp: u64,
    yp: u64,
    saved: &mut DeviceSeSaved,
    opts: SeOptions,
) -> Result<SePath> {
    let cfg = w.config;
    check_saved(saved, &cfg, shape.n)?;
    let esize = std::mem::size_of::<T>();
    let path = resolve(
        dev,
        &cfg,
        shape,
        layout,
        esize,
        Direction::Forward,
        opts.path,
    )?;
    let cx = Ctx {
        dev,
        suffix: T::SUFFIX,
        esize,
        cfg,
        hw: shape.hw(),
        layout,
    };
    let (c, d) = (cfg.channels, cfg.hidden);
    let (w1, w2) = (dev.addr(&w.w1), dev.addr(&w.w2));
    let b1 = w.b1.as_ref().map_or(0, |b| dev.addr(b));
    let b2 = w.b2.as_ref().map_or(0, |b| dev.addr(b));
    let (zp, hp, up, sp) = (
        dev.addr(&saved.z),
        dev.addr(&saved.h),
        dev.addr(&saved.u),
        dev.addr(&saved.s),
    );
    if path == SePath::Cluster {
        let mut p = cx.base_params(shape.n);
        if rp != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        if same_phase(&[xp, rp, yp]) {
            p.flags |= abi::SENET_FLAG_VEC;
        }
        let name = format!("se_fused_fwd_{}_{}", layout.name(), T::SUFFIX);
        let smem = cluster_smem_bytes(&cfg, shape, layout, esize, Direction::Forward);
        let grid = cluster_grid(dev, &name, smem, shape.n)?;
        let mut args = [
            arg(&p),
            arg(&xp),
            arg(&rp),
            arg(&yp),
            arg(&w1),
            arg(&b1),
            arg(&w2),
            arg(&b2),
            arg(&zp),
            arg(&hp),
            arg(&up),
            arg(&sp),
        ];
        // SAFETY: matches se_fused_fwd_*; x, r, y hold n * c * hw elements, the saved buffers
        // n * c (z, s) and n * d (h, u) floats, the weights the config's sizes.
        unsafe {
            dev.launch(
                Module::Fused,
                &name,
                (grid, 1, 1),
                (FUSED_THREADS, 1, 1),
                smem as u32,
                CLUSTER as u32,
                &mut args,
            )
        }?;
        return Ok(path);
    }
    let streams = if rp != 0 { 2 } else { 1 };
    let chunk = chunk_samples(dev, shape, esize, streams, &opts, path);
    let per = (shape.sample_numel() * esize) as u64;
    let mut n0 = 0;
    while n0 < shape.n {
        let nc = chunk.min(shape.n - n0);
        let off = n0 as u64 * per;
        let (x_, r_, y_) = (xp + off, if rp != 0 { rp + off } else { 0 }, yp + off);
        let (z_, s_) = (zp + (n0 * c * 4) as u64, sp + (n0 * c * 4) as u64);
        let (h_, u_) = (hp + (n0 * d * 4) as u64, up + (n0 * d * 4) as u64);
        cx.reduce(false, nc, 0, x_, 0, 0, 0, z_)?;
        // FC1: h = z W1^T + b1, u = act(h).  B(k = c, j) = W1[j][c].
        cx.gemm(
            (nc, d, c),
            z_,
            (c, 1),
            w1,
            (1, c),
            h_,
            u_,
            b1,
            0,
            abi::SENET_EPI_FC1,
        )?;
        // FC2: s = gate(u W2^T + b2).  B(k = j, c) = W2[c][j].
        cx.gemm(
            (nc, c, d),
            u_,
            (d, 1),
            w2,
            (1, d),
            s_,
            0,
            b2,
            0,
            abi::SENET_EPI_FC2,
        )?;
        cx.elementwise(false, nc, x_, r_, s_, y_, false)?;
        n0 += nc;
    }
    Ok(path)
}

fn cluster_grid(dev: &CudaDevice, name: &str, smem: usize, n: usize) -> Result<u32> {
    let clusters = dev.max_active_clusters(
        Module::Fused,
        name,
        CLUSTER as u32,
        FUSED_THREADS,
        smem as u32,
    )?;
    if clusters == 0 {
        return Err(Error::Unsupported(format!(
            "no cluster of {CLUSTER} CTAs with {smem} bytes of shared memory fits on {}",
            dev.info().name
        )));
    }
    u32_of(clusters.min(n) * CLUSTER, "cluster grid")
}

// ------------------------------------------------------------------------------ backward

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
    let shape = x.shape();
    let layout = x.layout();
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
    if residual.is_some() != dresidual.is_some() {
        return Err(Error::Config(
            "d residual must be given exactly when the residual is".into(),
        ));
    }
    if grads.config != cfg {
        return Err(Error::Config(format!(
            "gradients are for {}, weights are {}",
            grads.config, cfg
        )));
    }
    check_saved(saved, &cfg, shape.n)?;
    let esize = std::mem::size_of::<T>();
    let path = resolve(
        dev,
        &cfg,
        shape,
        layout,
        esize,
        Direction::Backward,
        opts.path,
    )?;
    let cx = Ctx {
        dev,
        suffix: T::SUFFIX,
        esize,
        cfg,
        hw: shape.hw(),
        layout,
    };
    let (n, c, d) = (shape.n, cfg.channels, cfg.hidden);
    let (xp, dyp, dxp) = (x.addr(dev), dy.addr(dev), dx.addr_mut(dev));
    let rp = residual.map_or(0, |r| r.addr(dev));
    let dresp = dresidual.map_or(0, |r| r.addr_mut(dev));
    let (w1, w2) = (dev.addr(&w.w1), dev.addr(&w.w2));
    let (zp, hp, up, sp) = (
        dev.addr(&saved.z),
        dev.addr(&saved.h),
        dev.addr(&saved.u),
        dev.addr(&saved.s),
    );
    // dg [n][c], du [n][d], dz [n][c]: every element is written before it is read.
    let bwd = dev.backward_scratch([n * c, n * d, n * c])?;
    let [Some(dg), Some(du), Some(dz)] = &bwd.bufs else {
        return Err(Error::Config("backward scratch was not allocated".into()));
    };
    let (dgp, dup) = (dev.addr(dg), dev.addr(du));

    if path == SePath::Cluster {
        let mut p = cx.base_params(n);
        if rp != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        if accumulate {
            p.flags |= abi::SENET_FLAG_ACCUMULATE;
        }
        if same_phase(&[dyp, xp, rp, dresp, dxp]) {
            p.flags |= abi::SENET_FLAG_VEC;
        }
        let name = format!("se_fused_bwd_{}_{}", layout.name(), T::SUFFIX);
        let smem = cluster_smem_bytes(&cfg, shape, layout, esize, Direction::Backward);
        let grid = cluster_grid(dev, &name, smem, n)?;
        let mut args = [
            arg(&p),
            arg(&dyp),
            arg(&xp),
            arg(&rp),
            arg(&sp),
            arg(&hp),
            arg(&w1),
            arg(&w2),
            arg(&dresp),
            arg(&dxp),
            arg(&dgp),
            arg(&dup),
        ];
        // SAFETY: matches se_fused_bwd_*; activations hold n * c * hw elements, s and dg n * c,
        // h and du n * d floats.
        unsafe {
            dev.launch(
                Module::Fused,
                &name,
                (grid, 1, 1),
                (FUSED_THREADS, 1, 1),
                smem as u32,
                CLUSTER as u32,
                &mut args,
            )
        }?;
    } else {
        let dzp = dev.addr(dz);
        let streams = if rp != 0 { 3 } else { 2 };
        let chunk = chunk_samples(dev, shape, esize, streams, &opts, path);
        let per = (shape.sample_numel() * esize) as u64;
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let off = n0 as u64 * per;
            let at = |p: u64| if p != 0 { p + off } else { 0 };
            let (nc4, nd4) = ((n0 * c * 4) as u64, (n0 * d * 4) as u64);
            cx.reduce(
                true,
                nc,
                at(dyp),
                at(xp),
                at(rp),
                sp + nc4,
                at(dresp),
                dgp + nc4,
            )?;
            // du = (dg W2) * act'(h): B(k = c, j) = W2[c][j].
            cx.gemm(
                (nc, d, c),
                dgp + nc4,
                (c, 1),
                w2,
                (d, 1),
                dup + nd4,
                0,
                0,
                hp + nd4,
                abi::SENET_EPI_DU,
            )?;
            // dz = du W1: B(k = j, c) = W1[j][c].
            cx.gemm(
                (nc, c, d),
                dup + nd4,
                (d, 1),
                w1,
                (c, 1),
                dzp + nc4,
                0,
                0,
                0,
                abi::SENET_EPI_STORE,
            )?;
            let g = if rp != 0 { at(dresp) } else { at(dyp) };
            cx.elementwise(true, nc, g, dzp + nc4, sp + nc4, at(dxp), accumulate)?;
            n0 += nc;
        }
    }
    // Parameter gradients over the whole batch, in fixed order.
    let (dw1, dw2) = (dev.addr(&grads.dw1), dev.addr(&grads.dw2));
    // dW2 = dg^T u: A(m = c, k = n) = dg[n][c]; B(k = n, j) = u[n][j].
    cx.gemm(
        (c, d, n),
        dgp,
        (1, c),
        up,
        (d, 1),
        dw2,
        0,
        0,
        0,
        abi::SENET_EPI_STORE,
    )?;
    // dW1 = du^T z: A(m = j, k = n) = du[n][j]; B(k = n, c) = z[n][c].
    cx.gemm(
        (d, c, n),
        dup,
        (1, d),
        zp,
        (c, 1),
        dw1,
        0,
        0,
        0,
        abi::SENET_EPI_STORE,
    )?;
    if let (Some(db1), Some(db2)) = (&grads.db1, &grads.db2) {
        cx.colsum(dgp, dev.addr(db2), n, c)?;
        cx.colsum(dup, dev.addr(db1), n, d)?;
    }
    drop(bwd);
    Ok(path)
}
