//! The CUDA backend: every op of [`Backend`] as the kernels of `kernels/nn_*.cu` (convolutions as
//! implicit GEMMs, BatchNorm, pooling, linear, pointwise) and the crate's SE kernels, on a
//! [`CudaDevice`] — a GPU, or the CPU emulator of the kernels in tests.
//!
//! Convolutions run through cuDNN where it loads on a GPU ([`ConvEngine::Cudnn`], exact f32 and
//! deterministic algorithms) and through the own implicit-GEMM kernels otherwise
//! ([`ConvEngine::Own`]; always on the emulator); [`Cuda::conv_engine`] says which.
//!
//! Activations live in device memory ([`GpuTensor`]); only a network's input and logits cross
//! the bus. Parameters bound to the backend ([`Backend::bind`], [`crate::nn::Network::bind`]:
//! what the trainer does for its steps) keep their values, gradients and SGD momentum (and
//! BatchNorm's running statistics) in device memory ([`CudaParam`]) and are updated there by
//! kernels ([`Backend::sgd_step`], [`Backend::batch_norm_p`]); unbound parameters are host
//! slices each op uploads. Activations are f32 ([`Cuda::new`]) or bf16 / f16 for mixed
//! precision ([`Cuda::bf16`], [`Cuda::f16`]: parameters, their gradients and every sum stay f32
//! or f64), NCHW or NHWC ([`Cuda::with_layout`]); reductions run in a fixed order, so results
//! repeat bit for bit.
//!
//! This file holds the backend's type, its constructors and the [`Backend`] trait's ops, which
//! call into one module per concern: `memory` (the caching pool, uploads, layout conversions),
//! `tensor` (device activations, pool indices, SE saved state), `param` (bound parameters and
//! parameter operands), `conv` (own and cuDNN convolutions, linear layers), `im2col` (the
//! im2col + cuBLAS engine), `norm` (BatchNorm), `pooling`, `pointwise`, and `se` (SE blocks
//! through `se::cuda`).

use super::blas::{Blas, BlasType, Gemm};
use super::cudnn::{ConvChoice, ConvEngine, Dnn, DnnMode, Pass, PassKind};
use super::{
    check_bn_lens, check_len, check_split, concat_shape, same_shape, ActTensor, Backend,
    BnDeviceSaved, BnParamsMut, BnRun, BnStats, ConvGeom, PoolGeom, SeBackward, SeLayerParams,
    SeLayerParamsMut,
};
use crate::cuda::abi::NnConvParams;
use crate::cuda::kargs::{self, In, Kernel, Out};
use crate::cuda::{Buf, CudaDevice, CudaElement, DevElem, DeviceTensor};
use crate::error::{Error, Result};
use crate::nn::param::{DeviceStore, Param};
use crate::se::cuda::{self as se_gpu, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights};
use crate::se::{SeConfig, SeWeights};
use crate::tensor::{Layout, Shape, Tensor};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

mod conv;
mod im2col;
mod memory;
mod norm;
mod param;
mod pointwise;
mod pooling;
mod se;
mod tensor;

use im2col::*;
use memory::*;
use norm::*;
pub use param::CudaParam;
use param::*;
use pointwise::*;
use tensor::*;
pub use tensor::{CudaSeSaved, GpuIndices, GpuTensor};

/// The kernels' block size.
const THREADS: u32 = 256;
/// GEMM tile edge (TM = TN in nn_common.cuh).
const TILE: usize = 64;
/// The most blocks along grid.y / grid.z.
/// The grid's y and z limit on a GPU; a device may say less ([`DeviceInfo::max_grid_yz`]: the
/// emulator does, so the tests reach the chunking paths on small shapes).
///
/// [`DeviceInfo::max_grid_yz`]: crate::cuda::DeviceInfo::max_grid_yz
const MAX_GRID_YZ: usize = 65_535;
/// Elements of A the im2col engine's column buffer may hold by default (64 Mi: 128 MiB of bf16).
const COL_BUDGET: usize = 64 << 20;

/// Checks a size the kernels hold in 32-bit (signed) integers.
fn small(what: &str, v: usize) -> Result<u32> {
    if v > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "{what} = {v} exceeds the CUDA backend's 32-bit index range"
        )));
    }
    Ok(v as u32)
}

/// Blocks for a grid-stride kernel: enough to cover `n` items, capped (the kernel loops).
fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).clamp(1, 1 << 20) as u32
}

/// grid.x for a kernel with one block per `per` items and no loop: all of them, or an error.
fn grid_x(n: usize, per: usize) -> Result<u32> {
    let b = n.div_ceil(per).max(1);
    if b > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "{n} items need more than 2^31 - 1 blocks"
        )));
    }
    Ok(b as u32)
}

/// grid.y likewise (at most `limit` blocks: the device's [`CudaDevice::info`] says).
fn grid_y(n: usize, per: usize, limit: usize) -> Result<u32> {
    let b = n.div_ceil(per).max(1);
    if b > limit {
        return Err(Error::Shape(format!(
            "{n} items need more than {limit} blocks along grid.y"
        )));
    }
    Ok(b as u32)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when the activation type is f32 (no conversions around cuDNN).
fn is_f32<A: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<f32>()
}

/// Distinguishes backend instances (a bound parameter names its owner).
static NEXT_BACKEND_ID: AtomicU64 = AtomicU64::new(1);

/// An activation element type of the CUDA backend: `f32` (the exact mode), `half::bf16` or
/// `half::f16` (mixed precision: narrow activations and activation gradients, with f32
/// parameters, parameter gradients, optimiser state and every sum; f16 wants loss scaling,
/// [`crate::train::optim::LossScaler`]). Sealed.
pub trait NnAct: CudaElement + sealed::Sealed {}
impl NnAct for f32 {}
impl NnAct for half::bf16 {}
impl NnAct for half::f16 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// The network backend on a CUDA device (NCHW), with activations of `A`: f32 ([`Cuda::new`]),
/// or bf16 / f16 for mixed precision ([`Cuda::bf16`], [`Cuda::f16`], [`Cuda::open`]). Cheap to
/// clone.
#[derive(Debug)]
pub struct Cuda<A: NnAct = f32> {
    dev: Arc<CudaDevice>,
    poison: bool,
    pool: Arc<Pool>,
    /// cuDNN for the convolutions; `None` runs the own kernels.
    dnn: Option<Arc<Dnn>>,
    /// With [`ConvChoice::Auto`]: a convolution cuDNN has no acceptable algorithm for runs on
    /// the own kernels instead of failing.
    dnn_auto: bool,
    /// The im2col engine's GEMMs ([`ConvEngine::Cublas`]); `None` runs cuDNN or the own
    /// kernels.
    im2col: Option<Arc<GemmEngine>>,
    /// Elements of A the im2col engine's column buffer may hold (samples are chunked to fit).
    col_budget: usize,
    /// This backend's identity (clones share it): parameters bound here name it.
    id: u64,
    /// The layout of activations on the device.
    layout: Layout,
    act: std::marker::PhantomData<fn() -> A>,
}

impl<A: NnAct> Clone for Cuda<A> {
    fn clone(&self) -> Self {
        Cuda {
            dev: self.dev.clone(),
            poison: self.poison,
            pool: self.pool.clone(),
            dnn: self.dnn.clone(),
            dnn_auto: self.dnn_auto,
            im2col: self.im2col.clone(),
            col_budget: self.col_budget,
            id: self.id,
            layout: self.layout,
            act: std::marker::PhantomData,
        }
    }
}

impl Cuda<f32> {
    /// A backend on `dev` (a GPU from [`CudaDevice::new`], or [`CudaDevice::emulator`]), with
    /// f32 activations and convolutions through cuDNN when it loads on a GPU and the own
    /// kernels otherwise ([`ConvChoice::Auto`]).
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        let dnn = Dnn::open(&dev, DnnMode::Exact).ok().map(Arc::new);
        Self::assemble(dev, dnn, true)
    }

    /// A backend on `dev` with f32 activations whose convolutions run as `choice` says. Errors
    /// when cuDNN is asked for and cannot run (the emulator, no library on the loader's path),
    /// with the reason.
    pub fn with_conv(dev: Arc<CudaDevice>, choice: ConvChoice) -> Result<Self> {
        Self::open(dev, choice)
    }
}

impl Cuda<half::bf16> {
    /// A mixed-precision backend on `dev`: bf16 activations and activation gradients (every
    /// op reads and writes them, summing in f32 or f64), f32 parameters, parameter gradients
    /// and SGD state ([`Cuda::open`] with bf16).
    pub fn bf16(dev: Arc<CudaDevice>, choice: ConvChoice) -> Result<Self> {
        Self::open(dev, choice)
    }
}

impl Cuda<half::f16> {
    /// A mixed-precision backend on `dev` with f16 activations and activation gradients
    /// ([`Cuda::open`] with f16). f16's range is narrow (largest 65504, smallest normal
    /// 6.1e-5): train with loss scaling ([`crate::train::optim::LossScaler`]).
    pub fn f16(dev: Arc<CudaDevice>, choice: ConvChoice) -> Result<Self> {
        Self::open(dev, choice)
    }
}

impl<A: NnAct> Cuda<A> {
    /// A backend on `dev` with activations of `A`, convolutions as `choice` says: cuDNN (for
    /// f32 exact FMA math, or TF32 tensor cores with `cudnn-tf32`; for bf16 and f16 tensors
    /// and weights of that type with f32 accumulation on tensor cores, the weights rounded per
    /// call and weight gradients formed in that type, then added to the f32 ones), or senet's
    /// own kernels (f32 weights and sums; always on the emulator). `auto` takes cuDNN where it
    /// loads on a GPU and has an algorithm for a convolution. Errors when cuDNN is asked for
    /// and cannot run, and for `cudnn-tf32` with narrow activations (TF32 is an f32 mode).
    pub fn open(dev: Arc<CudaDevice>, choice: ConvChoice) -> Result<Self> {
        let narrow = match A::SUFFIX {
            "bf16" => Some(DnnMode::Bf16),
            "f16" => Some(DnnMode::F16),
            _ => None,
        };
        let mode = match (choice, narrow) {
            (ConvChoice::Only(ConvEngine::CudnnTf32), Some(_)) => {
                return Err(Error::Config(format!(
                    "cudnn-tf32 is a mode for f32 activations; with {} ones use cudnn, own or \
                     auto",
                    A::SUFFIX
                )))
            }
            (ConvChoice::Only(ConvEngine::CudnnTf32), None) => DnnMode::Tf32,
            (_, Some(m)) => m,
            (_, None) => DnnMode::Exact,
        };
        let emulated = dev.stream().is_none();
        let dnn = match choice {
            ConvChoice::Auto => Dnn::open(&dev, mode).ok().map(Arc::new),
            ConvChoice::Only(ConvEngine::Own | ConvEngine::Cublas) => None,
            ConvChoice::Only(_) => Some(Arc::new(Dnn::open(&dev, mode)?)),
        };
        let im2col = match choice {
            ConvChoice::Only(ConvEngine::Cublas) if emulated => Some(GemmEngine::StandIn),
            ConvChoice::Only(ConvEngine::Cublas) => {
                Some(GemmEngine::Cublas(Blas::open(&dev, false)?))
            }
            ConvChoice::Auto if dnn.is_none() && !emulated => {
                Blas::open(&dev, false).ok().map(GemmEngine::Cublas)
            }
            _ => None,
        };
        let mut b = Self::assemble(dev, dnn, choice == ConvChoice::Auto);
        b.im2col = im2col.map(Arc::new);
        Ok(b)
    }

    /// Caps the im2col engine's column buffer at `elements` (samples are chunked to fit; at
    /// least one sample's columns are always made). For tests of the chunking.
    #[doc(hidden)]
    pub fn with_col_budget(mut self, elements: usize) -> Self {
        self.col_budget = elements.max(1);
        self
    }

    fn assemble(dev: Arc<CudaDevice>, dnn: Option<Arc<Dnn>>, dnn_auto: bool) -> Self {
        Cuda {
            dev,
            poison: false,
            pool: Arc::new(Pool::default()),
            dnn,
            dnn_auto,
            im2col: None,
            col_budget: COL_BUDGET,
            id: NEXT_BACKEND_ID.fetch_add(1, Ordering::Relaxed),
            layout: Layout::Nchw,
            act: std::marker::PhantomData,
        }
    }

    /// This backend with its activations in `layout` on the device: [`Layout::Nhwc`]
    /// (channels-last, as PyTorch's `channels_last`; cuDNN's tensor-core convolutions prefer
    /// it, with KRSC filters made from the KCRS weights per call) or [`Layout::Nchw`] (the
    /// default). Host tensors cross in either layout: [`Backend::upload`] converts on the
    /// device, [`Backend::download`] returns NCHW, max-pool indices stay NCHW flat indices.
    /// Set it before making tensors: an activation made by a backend in one layout must not
    /// reach one in the other (as with devices, keep one backend per network).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The layout of activations on the device.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The kernels' `nhwc` argument.
    fn nhwc(&self) -> u32 {
        (self.layout == Layout::Nhwc) as u32
    }

    /// The convolution kernels' layout flag.
    fn conv_layout_flag(&self) -> u32 {
        match self.layout {
            Layout::Nhwc => crate::cuda::abi::SENET_NN_NHWC,
            Layout::Nchw => 0,
        }
    }

    /// Which code runs the convolutions.
    pub fn conv_engine(&self) -> ConvEngine {
        if self.im2col.is_some() {
            return ConvEngine::Cublas;
        }
        match &self.dnn {
            Some(d) if d.mode() == DnnMode::Tf32 => ConvEngine::CudnnTf32,
            Some(_) => ConvEngine::Cudnn,
            None => ConvEngine::Own,
        }
    }

    /// A line for logs: the device and the convolution engine (with cuDNN's version).
    pub fn describe(&self) -> String {
        let conv = match &self.dnn {
            Some(d) => format!(
                "cuDNN {} convolutions ({}, deterministic algorithms{})",
                super::cudnn::version_string(d.version()),
                match d.mode() {
                    DnnMode::Tf32 => "TF32 tensor cores",
                    DnnMode::Exact => "exact f32, FMA math",
                    DnnMode::Bf16 => "bf16 tensor cores, f32 accumulation",
                    DnnMode::F16 => "f16 tensor cores, f32 accumulation",
                },
                if self.dnn_auto {
                    ", senet's kernels where cuDNN has none"
                } else {
                    ""
                }
            ),
            None => match self.im2col.as_deref() {
                Some(GemmEngine::Cublas(_)) => format!(
                    "im2col + cuBLAS {} GEMMs (f32 compute) convolutions",
                    A::SUFFIX
                ),
                Some(GemmEngine::StandIn) => format!(
                    "im2col + GEMM convolutions ({} operands; senet's column-major GEMM stands \
                     in for cuBLAS on the emulator)",
                    A::SUFFIX
                ),
                None => format!("senet's own {} convolution kernels", A::SUFFIX),
            },
        };
        format!(
            "{}, {} activations ({}), {conv}",
            self.dev.info().name,
            A::SUFFIX,
            self.layout.name().to_uppercase()
        )
    }

    /// With `on`, every output buffer is filled with NaN before its kernel runs, so an element a
    /// kernel fails to write shows up in the result (the tests' poison, DESIGN.md Numerics).
    pub fn with_poison(mut self, on: bool) -> Self {
        self.poison = on;
        self
    }

    /// The device the ops run on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Device buffers allocated from the driver so far (the pool's misses): constant once a
    /// training step has run, as every later step reuses the same sizes.
    pub fn allocations(&self) -> usize {
        self.pool.misses.load(Ordering::Relaxed)
    }

    /// Frees the buffers the pool keeps (they are allocated again when needed).
    pub fn release_cached(&self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Launches network kernel `k` (for this backend's activation type when the kernel is
    /// instantiated per type) with 256-thread blocks.
    ///
    /// # Safety
    /// Every address in `k` covers what the kernel touches for the sizes among its arguments.
    unsafe fn launch<K: Kernel>(&self, k: &K, grid: (u32, u32, u32)) -> Result<()> {
        let ty = K::TYPED.then_some(A::SUFFIX);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.dev.launch_kernel(k, ty, grid, (THREADS, 1, 1), 0, 1) }
    }

    /// Launches network kernel `k` on enough 256-thread blocks for `n` items (grid-stride
    /// kernels cover the rest).
    ///
    /// # Safety
    /// As [`Cuda::launch`].
    unsafe fn launch_flat<K: Kernel>(&self, k: &K, n: usize) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.launch(k, (blocks(n, THREADS as usize), 1, 1)) }
    }
}

impl<A: NnAct> Backend<f32> for Cuda<A> {
    type T = GpuTensor<A>;
    type PoolIdx = GpuIndices;
    type SeSaved = CudaSeSaved;

    /// Uploads an NCHW or NHWC host tensor (converted to this backend's layout on the device).
    fn upload(&self, x: Tensor<f32>) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let b = self.to_act(x.data())?;
        if x.layout() == self.layout || s.hw() == 1 {
            return Ok(GpuTensor::wrap(self.pooled(b, s)?));
        }
        let y = self.out::<A>(s.numel())?;
        self.relayout_into(self.addr(&b), self.addr(&y), s, self.layout == Layout::Nhwc)?;
        Ok(GpuTensor::wrap(self.pooled(y, s)?))
    }

    /// Downloads an activation as an NCHW host tensor (an NHWC one is converted on the device
    /// first).
    fn download(&self, x: GpuTensor<A>) -> Result<Tensor<f32>> {
        let t = match self.nchw_copy(&x)? {
            Some(b) => self
                .pooled_in(b, x.shape(), Layout::Nchw)?
                .tensor()
                .to_host(&self.dev)?,
            None => x.device_tensor().to_host(&self.dev)?,
        };
        // A one-pixel NHWC tensor is already in NCHW order.
        let t = Tensor::from_vec(t.shape(), Layout::Nchw, t.into_vec())?;
        if let Some(t) = (&t as &dyn Any).downcast_ref::<Tensor<f32>>() {
            return Ok(t.clone());
        }
        let v = t.data().iter().map(|v| v.to_f32()).collect();
        Tensor::from_vec(t.shape(), Layout::Nchw, v)
    }

    fn download_indices(&self, idx: &GpuIndices) -> Result<Vec<u32>> {
        self.down(&idx.buf, idx.output.numel())
    }

    fn zeros(&self, shape: Shape) -> Result<GpuTensor<A>> {
        shape.validate()?;
        let mut b = self.take::<A>(shape.numel())?;
        self.dev.fill_bytes(&mut b, 0, shape.numel(), 0)?;
        Ok(GpuTensor::wrap(self.pooled(b, shape)?))
    }

    fn mul_mask(&self, x: GpuTensor<A>, mask: &[f32]) -> Result<GpuTensor<A>> {
        let s = x.shape();
        check_len("dropout mask", mask.len(), s.numel())?;
        // The mask stays f32, so its 1 / (1 - p) scale is not rounded to a narrow type. It
        // comes in NCHW order.
        let m = if self.layout == Layout::Nhwc && s.hw() > 1 {
            let t = Tensor::from_vec(s, Layout::Nchw, mask.to_vec())?.to_layout(Layout::Nhwc);
            self.up(t.data())?
        } else {
            self.up(mask)?
        };
        let y = self.out_t(s)?;
        let (ap, bp, yp, total) = (
            self.addr(&x),
            self.addr(&m),
            self.addr(&y),
            s.numel() as u64,
        );
        let args = kargs::NnMask {
            a: In(ap),
            m: In(bp),
            y: Out(yp),
            n: total,
        };
        // SAFETY: nn_mask_A(a, m, y, n): x and y hold `total` elements of A, the mask `total`
        // floats.
        unsafe { self.launch_flat(&args, s.numel())? };
        Ok(GpuTensor::wrap(y))
    }

    fn concat_channels(&self, parts: &[GpuTensor<A>]) -> Result<GpuTensor<A>> {
        let out = concat_shape(parts.iter().map(|p| p.shape()))?;
        let y = self.out_t(out)?;
        let mut c0 = 0;
        for p in parts {
            let s = p.shape();
            self.copy_channels(self.addr(p), s.c, 0, self.addr(&y), out.c, c0, s)?;
            c0 += s.c;
        }
        Ok(GpuTensor::wrap(y))
    }

    fn split_channels(&self, x: &GpuTensor<A>, sizes: &[usize]) -> Result<Vec<GpuTensor<A>>> {
        let s = x.shape();
        check_split(s, sizes)?;
        let mut out = Vec::with_capacity(sizes.len());
        let mut c0 = 0;
        for &c in sizes {
            let ps = Shape::try_new(s.n, c, s.h, s.w)?;
            let y = self.out_t(ps)?;
            self.copy_channels(self.addr(x), s.c, c0, self.addr(&y), c, 0, ps)?;
            out.push(GpuTensor::wrap(y));
            c0 += c;
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn precision(&self) -> &'static str {
        A::SUFFIX
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn conv2d(
        &self,
        x: &GpuTensor<A>,
        w: &[f32],
        b: Option<&[f32]>,
        g: &ConvGeom,
    ) -> Result<GpuTensor<A>> {
        self.conv_fwd(x, PArg::Host(w), b.map(PArg::Host), g)
    }

    fn conv2d_backward(
        &self,
        x: &GpuTensor<A>,
        w: &[f32],
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        self.conv_bwd(
            x,
            PArg::Host(w),
            dy,
            g,
            GArg::Host(dw),
            db.map(GArg::Host),
            need_dx,
        )
    }

    fn owns(&self, id: u64) -> bool {
        id == self.id
    }

    fn bind(&self, p: &mut Param<f32>) -> Result<bool> {
        if self.bound(p)?.is_some() {
            return Ok(true);
        }
        let v = p.values("a parameter")?;
        // A gradient already on the host comes along (the host optimiser would use it).
        let grad = match &p.grad {
            g if g.is_empty() => None,
            g if g.len() == v.len() => Some(self.dev.upload(g)?),
            g => {
                return Err(Error::Length {
                    what: "parameter gradient",
                    got: g.len(),
                    expected: v.len(),
                })
            }
        };
        let store = CudaParam {
            owner: self.id,
            dev: self.dev.clone(),
            len: v.len(),
            value: self.dev.upload(v)?,
            grad: Mutex::new(grad),
            grad_zero: AtomicBool::new(false),
            momentum: Mutex::new(None),
        };
        p.bind_store(Arc::new(store));
        Ok(true)
    }

    fn conv2d_p(
        &self,
        x: &GpuTensor<A>,
        w: &Param<f32>,
        b: Option<&Param<f32>>,
        g: &ConvGeom,
    ) -> Result<GpuTensor<A>> {
        let wa = self.p_arg(w, "conv weight")?;
        let ba = b.map(|b| self.p_arg(b, "conv bias")).transpose()?;
        self.conv_fwd(x, wa, ba, g)
    }

    fn conv2d_backward_p(
        &self,
        x: &GpuTensor<A>,
        w: &mut Param<f32>,
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        b: Option<&mut Param<f32>>,
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        let db = b.map(|b| self.g_arg(b)).transpose()?;
        let (wa, dw) = self.wg_args(w, "conv weight")?;
        self.conv_bwd(x, wa, dy, g, dw, db, need_dx)
    }

    fn linear_p(
        &self,
        x: &GpuTensor<A>,
        w: &Param<f32>,
        b: Option<&Param<f32>>,
        out: usize,
    ) -> Result<GpuTensor<A>> {
        let wa = self.p_arg(w, "linear weight")?;
        let ba = b.map(|b| self.p_arg(b, "linear bias")).transpose()?;
        self.linear_fwd(x, wa, ba, out)
    }

    fn linear_backward_p(
        &self,
        x: &GpuTensor<A>,
        w: &mut Param<f32>,
        dy: &GpuTensor<A>,
        b: Option<&mut Param<f32>>,
    ) -> Result<GpuTensor<A>> {
        let db = b.map(|b| self.g_arg(b)).transpose()?;
        let (wa, dw) = self.wg_args(w, "linear weight")?;
        self.linear_bwd(x, wa, dy, dw, db)
    }

    fn unscale_grads(&self, params: &mut [&mut Param<f32>], factor: f32) -> Result<bool> {
        let mut flag = self.take::<u32>(1)?;
        self.dev.fill_bytes(&mut flag, 0, 1, 0)?;
        let fp = self.addr(&flag);
        let mut finite = true;
        for p in params.iter_mut() {
            let Some(c) = self.bound(p)? else {
                if p.is_bound() {
                    return Err(Error::Config(
                        "a parameter bound to another backend cannot be unscaled here".into(),
                    ));
                }
                finite &= super::unscale_host(&mut p.grad, factor);
                continue;
            };
            let gl = lock(&c.grad);
            let Some(gb) = gl.as_ref() else { continue };
            if c.grad_zero.load(Ordering::Relaxed) {
                continue; // reads as zero: stays zero, and finite
            }
            let (gp, n) = (self.dev.addr(gb), c.len as u64);
            let args = kargs::NnUnscaleF32 {
                g: Out(gp),
                n,
                factor,
                flag: Out(fp),
            };
            // SAFETY: nn_unscale_f32(g, n, factor, flag): g is this parameter's bound gradient
            // of n floats, flag one u32.
            unsafe { self.launch(&args, (blocks(c.len, THREADS as usize), 1, 1))? };
        }
        let bad = self.down(&flag, 1)?;
        Ok(finite && bad[0] == 0)
    }

    fn sgd_step(
        &self,
        p: &mut Param<f32>,
        momentum_init: Option<&[f32]>,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    ) -> Result<bool> {
        let Some(c) = self.bound(p)? else {
            return Ok(false);
        };
        let n = c.len;
        let gl = lock(&c.grad);
        let Some(gb) = gl.as_ref() else {
            // No backward pass reached it: left alone, as PyTorch skips a None grad.
            return Ok(true);
        };
        let gp = if c.grad_zero.load(Ordering::Relaxed) {
            0
        } else {
            self.dev.addr(gb)
        };
        let mut ml = lock(&c.momentum);
        let first = match (&*ml, momentum_init) {
            (Some(_), _) => false,
            (None, Some(init)) => {
                check_len("momentum buffer", init.len(), n)?;
                *ml = Some(self.dev.upload(init)?);
                false
            }
            (None, None) => {
                *ml = Some(self.dev.alloc_zeros::<f32>(n)?);
                true
            }
        };
        let mp = ml.as_ref().map_or(0, |b| self.dev.addr(b));
        let wp = c.value_addr(&self.dev)?;
        let (len, first) = (n as u64, first as u32);
        let args = kargs::NnSgdF32 {
            w: Out(wp),
            grad: In(gp),
            buf: Out(mp),
            n: len,
            lr,
            momentum,
            wd: weight_decay,
            first,
        };
        // SAFETY: nn_sgd_f32(w, grad, buf, n, lr, momentum, wd, first): w, buf (and grad unless
        // null) hold n floats: the bound storage of this parameter.
        unsafe { self.launch(&args, (blocks(n, THREADS as usize), 1, 1))? };
        Ok(true)
    }

    fn batch_norm_stats(&self, x: &GpuTensor<A>) -> Result<BnStats> {
        let c = x.shape().c;
        let (mean, var) = self.bn_stats_dev(x)?;
        Ok(BnStats {
            mean: self.down(&mean, c)?,
            var: self.down(&var, c)?,
        })
    }

    fn batch_norm_p(
        &self,
        x: &GpuTensor<A>,
        p: BnParamsMut<'_, f32>,
        run: BnRun,
    ) -> Result<Option<(GpuTensor<A>, BnDeviceSaved)>> {
        let all = [
            self.bound(p.weight)?,
            self.bound(p.bias)?,
            self.bound(p.running_mean)?,
            self.bound(p.running_var)?,
        ];
        if all.iter().all(Option::is_none) {
            return Ok(None);
        }
        let [Some(gw), Some(gb), Some(rm), Some(rv)] = all else {
            return Err(Error::Config(
                "BatchNorm parameters are partly bound".into(),
            ));
        };
        let s = x.shape();
        check_bn_lens(s.c, [gw.len, gb.len, rm.len, rv.len, s.c])?;
        let c = s.c;
        let m = s.n * s.hw();
        if run.train && m < 2 {
            return Err(Error::Shape(format!(
                "batch norm in training needs more than one value per channel, input is {s}"
            )));
        }
        let (mean, var) = if run.train {
            let (mean, var) = self.bn_stats_dev(x)?;
            (mean, Some(var))
        } else {
            (self.out::<f64>(c)?, None)
        };
        let invstd = self.out::<f64>(c)?;
        let (a, b) = (self.out::<f32>(c)?, self.out::<f32>(c)?);
        let ptrs = [
            if run.train { self.addr(&mean) } else { 0 },
            var.as_ref().map_or(0, |v| self.addr(v)),
            gw.value_addr(&self.dev)?,
            gb.value_addr(&self.dev)?,
            rm.value_addr(&self.dev)?,
            rv.value_addr(&self.dev)?,
            if run.train { 0 } else { self.addr(&mean) },
            self.addr(&invstd),
            self.addr(&a),
            self.addr(&b),
        ];
        let cc = small("channels", c)?;
        let unbias = if run.train {
            m as f64 / (m as f64 - 1.0)
        } else {
            1.0
        };
        let train = run.train as u32;
        let args = kargs::NnBnPrepareF32 {
            bmean: In(ptrs[0]),
            bvar: In(ptrs[1]),
            gamma: In(ptrs[2]),
            beta: In(ptrs[3]),
            rm: Out(ptrs[4]),
            rv: Out(ptrs[5]),
            mean_out: Out(ptrs[6]),
            invstd_out: Out(ptrs[7]),
            a: Out(ptrs[8]),
            b: Out(ptrs[9]),
            c: cc,
            eps: run.eps,
            mo: run.momentum,
            unbias,
            train,
        };
        // SAFETY: nn_bn_prepare_f32(bmean, bvar, gamma, beta, rm, rv, mean_out, invstd_out, a,
        // b, c, eps, mo, unbias, train): every per-channel buffer holds c elements (the bound
        // storages were checked above); bmean / bvar are read only in training and mean_out
        // written only outside it, so the null ones are never touched.
        unsafe { self.launch(&args, (blocks(c, THREADS as usize), 1, 1))? };
        let y = self.affine_at(x, self.addr(&a), self.addr(&b), run.relu)?;
        let saved: BnDeviceSaved = Arc::new(CudaBnSaved {
            mean,
            invstd,
            batch_stats: run.train,
        });
        Ok(Some((y, saved)))
    }

    fn batch_norm_backward_p(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: GpuTensor<A>,
        saved: &BnDeviceSaved,
        weight: &mut Param<f32>,
        bias: &mut Param<f32>,
    ) -> Result<GpuTensor<A>> {
        let st = saved.downcast_ref::<CudaBnSaved>().ok_or_else(|| {
            Error::Config("BatchNorm backward with state from another backend".into())
        })?;
        let (Some(gw), Some(gb)) = (self.bound(weight)?, self.bound(bias)?) else {
            return Err(Error::Config(
                "BatchNorm backward on the device with parameters on the host".into(),
            ));
        };
        let c = x.shape().c;
        check_bn_lens(c, [gw.len, gb.len, c, c, c])?;
        let dg = gw.grad_target_zeroed(&self.dev)?;
        let db = gb.grad_target_zeroed(&self.dev)?;
        let per_channel = [
            self.addr(&st.mean),
            self.addr(&st.invstd),
            gw.value_addr(&self.dev)?,
            dg,
            db,
        ];
        let dx = self.bn_bwd_at(x, relu_y, &dy, per_channel, st.batch_stats)?;
        gw.written();
        gb.written();
        Ok(dx)
    }

    fn channel_affine(
        &self,
        x: GpuTensor<A>,
        a: &[f32],
        b: &[f32],
        relu: bool,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        check_len("channel scale", a.len(), s.c)?;
        check_len("channel shift", b.len(), s.c)?;
        let (ab, bb) = (self.up(a)?, self.up(b)?);
        self.affine_at(&x, self.addr(&ab), self.addr(&bb), relu)
    }

    fn batch_norm_backward(
        &self,
        x: &GpuTensor<A>,
        dy: &GpuTensor<A>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<GpuTensor<A>> {
        self.bn_backward(x, None, dy, mean, invstd, gamma, batch_stats, dgamma, dbeta)
    }

    fn batch_norm_relu_backward(
        &self,
        x: &GpuTensor<A>,
        y: &GpuTensor<A>,
        dy: GpuTensor<A>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<GpuTensor<A>> {
        same_shape(y.shape(), x.shape(), "fused ReLU output")?;
        self.bn_backward(
            x,
            Some(y),
            &dy,
            mean,
            invstd,
            gamma,
            batch_stats,
            dgamma,
            dbeta,
        )
    }

    fn relu(&self, x: GpuTensor<A>) -> Result<GpuTensor<A>> {
        self.pointwise(EW_RELU, &x, None)
    }

    fn relu_backward(&self, y: &GpuTensor<A>, dy: GpuTensor<A>) -> Result<GpuTensor<A>> {
        same_shape(dy.shape(), y.shape(), "relu")?;
        self.pointwise(EW_RELU_BWD, &dy, Some(y))
    }

    fn add(&self, a: GpuTensor<A>, b: &GpuTensor<A>, relu: bool) -> Result<GpuTensor<A>> {
        same_shape(a.shape(), b.shape(), "residual add")?;
        self.pointwise(if relu { EW_ADD_RELU } else { EW_ADD }, &a, Some(b))
    }

    fn max_pool2d(&self, x: &GpuTensor<A>, g: &PoolGeom) -> Result<(GpuTensor<A>, GpuIndices)> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        super::reference::index_fits(xs)?;
        Self::check_pool_sizes(xs, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, xs, ys)?;
        let y = self.out_t(ys)?;
        let am = self.out::<u32>(ys.numel())?;
        let (xp, yp, ap) = (self.addr(&x), self.addr(&y), self.addr(&am));
        let (c, nhwc) = (xs.c as u32, self.nhwc());
        let args = kargs::NnMaxpoolFwd {
            x: In(xp),
            y: Out(yp),
            arg: Out(ap),
            nc,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: st,
            pad,
            nhwc,
        };
        let grid = self.pool_grid(ys, nc)?;
        // SAFETY: nn_maxpool_fwd_A(x, y, arg, nc, c, h, w, oh, ow, k, s, pad, nhwc): x holds
        // xs, y and arg hold ys (nc = n * c planes).
        unsafe { self.launch(&args, grid)? };
        Ok((
            GpuTensor::wrap(y),
            GpuIndices {
                buf: Arc::new(am),
                input: xs,
                output: ys,
                geom: *g,
            },
        ))
    }

    fn max_pool2d_backward(
        &self,
        dy: &GpuTensor<A>,
        argmax: &GpuIndices,
        input: Shape,
    ) -> Result<GpuTensor<A>> {
        let ys = dy.shape();
        // The indices come from this backend's max_pool2d; check they are for this shape (the
        // gather compares them with each input's own index, so stale ones route nothing).
        if argmax.output != ys || argmax.input != input {
            return Err(Error::Shape(format!(
                "max pool indices for {} -> {} used with gradient {ys} and input {input}",
                argmax.input, argmax.output
            )));
        }
        let g = &argmax.geom;
        Self::check_pool_sizes(input, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, input, ys)?;
        let dx = self.out_t(input)?;
        let (dyp, ap, dxp) = (self.addr(&dy), self.addr(&argmax.buf), self.addr(&dx));
        let (c, nhwc) = (input.c as u32, self.nhwc());
        let args = kargs::NnMaxpoolBwd {
            dy: In(dyp),
            arg: In(ap),
            dx: Out(dxp),
            nc,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: st,
            pad,
            nhwc,
        };
        // SAFETY: nn_maxpool_bwd_A(dy, arg, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc): dy and
        // arg hold ys elements (shapes checked against the indices'), dx input; the kernel
        // only compares index values, never writes through them.
        unsafe { self.launch(&args, self.pool_grid(input, nc)?)? };
        Ok(GpuTensor::wrap(dx))
    }

    fn avg_pool2d(&self, x: &GpuTensor<A>, g: &PoolGeom) -> Result<GpuTensor<A>> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        Self::check_pool_sizes(xs, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, xs, ys)?;
        let inc = g.count_include_pad as u32;
        let y = self.out_t(ys)?;
        let (xp, yp) = (self.addr(&x), self.addr(&y));
        let (c, nhwc) = (xs.c as u32, self.nhwc());
        let args = kargs::NnAvgpoolFwd {
            x: In(xp),
            y: Out(yp),
            nc,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: st,
            pad,
            include_pad: inc,
            nhwc,
        };
        let grid = self.pool_grid(ys, nc)?;
        // SAFETY: nn_avgpool_fwd_A(x, y, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc): x holds
        // xs, y ys.
        unsafe { self.launch(&args, grid)? };
        Ok(GpuTensor::wrap(y))
    }

    fn avg_pool2d_backward(
        &self,
        dy: &GpuTensor<A>,
        g: &PoolGeom,
        input: Shape,
    ) -> Result<GpuTensor<A>> {
        let ys = dy.shape();
        same_shape(ys, g.output_shape(input)?, "avg pool gradient vs output")?;
        Self::check_pool_sizes(input, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, input, ys)?;
        let inc = g.count_include_pad as u32;
        // The divided gradients stay in f32 whatever the activations' type.
        let q = self.out::<f32>(ys.numel())?;
        let dx = self.out_t(input)?;
        let (dyp, qp, dxp) = (self.addr(&dy), self.addr(&q), self.addr(&dx));
        let (c, nhwc) = (input.c as u32, self.nhwc());
        let args = kargs::NnAvgpoolDiv {
            dy: In(dyp),
            q: Out(qp),
            nc,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: st,
            pad,
            include_pad: inc,
            nhwc,
        };
        // SAFETY: nn_avgpool_div_A(dy, q, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc): dy holds
        // ys elements of A, q ys floats.
        unsafe { self.launch(&args, self.pool_grid(ys, nc)?)? };
        let args = kargs::NnAvgpoolBwd {
            q: In(qp),
            dx: Out(dxp),
            nc,
            c,
            h,
            w,
            oh,
            ow,
            k,
            s: st,
            pad,
            nhwc,
        };
        // SAFETY: nn_avgpool_bwd_A(q, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc): q holds ys,
        // dx input.
        unsafe { self.launch(&args, self.pool_grid(input, nc)?)? };
        Ok(GpuTensor::wrap(dx))
    }

    fn global_avg_pool(&self, x: &GpuTensor<A>) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let planes = s.n * s.c;
        if planes > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "global pool over {s}: too many planes"
            )));
        }
        let y = self.out_t(Shape::new(s.n, s.c, 1, 1))?;
        let (xp, yp, hw) = (self.addr(&x), self.addr(&y), s.hw() as u64);
        let (nc, c, nhwc) = (planes as u32, s.c as u32, self.nhwc());
        let args = kargs::NnGapFwd {
            x: In(xp),
            y: Out(yp),
            nc,
            c,
            hw,
            nhwc,
        };
        let grid = match self.layout {
            Layout::Nchw => ((planes as u32).max(1), 1, 1),
            Layout::Nhwc => (blocks(planes, THREADS as usize), 1, 1),
        };
        // SAFETY: nn_gap_fwd_A(x, y, nc, c, hw, nhwc): x holds planes * hw elements, y planes.
        unsafe { self.launch(&args, grid)? };
        Ok(GpuTensor::wrap(y))
    }

    fn global_avg_pool_backward(&self, dy: &GpuTensor<A>, input: Shape) -> Result<GpuTensor<A>> {
        same_shape(
            dy.shape(),
            Shape::new(input.n, input.c, 1, 1),
            "global pool gradient",
        )?;
        let dx = self.out_t(input)?;
        let (dyp, dxp) = (self.addr(&dy), self.addr(&dx));
        let (total, hw) = (input.numel() as u64, input.hw() as u64);
        let (c, nhwc) = (input.c as u32, self.nhwc());
        let args = kargs::NnGapBwd {
            dy: In(dyp),
            dx: Out(dxp),
            total,
            c,
            hw,
            nhwc,
        };
        // SAFETY: nn_gap_bwd_A(dy, dx, total, c, hw, nhwc): dy holds total / hw elements, dx
        // total.
        unsafe { self.launch_flat(&args, input.numel())? };
        Ok(GpuTensor::wrap(dx))
    }

    fn linear(
        &self,
        x: &GpuTensor<A>,
        w: &[f32],
        b: Option<&[f32]>,
        out: usize,
    ) -> Result<GpuTensor<A>> {
        self.linear_fwd(x, PArg::Host(w), b.map(PArg::Host), out)
    }

    fn linear_backward(
        &self,
        x: &GpuTensor<A>,
        w: &[f32],
        dy: &GpuTensor<A>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> Result<GpuTensor<A>> {
        self.linear_bwd(x, PArg::Host(w), dy, GArg::Host(dw), db.map(GArg::Host))
    }

    fn se_forward(
        &self,
        w: &SeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
    ) -> Result<(GpuTensor<A>, Self::SeSaved)> {
        let dw = self.se_weights(w)?;
        self.se_fwd_with(dw, x, residual)
    }

    fn se_backward(
        &self,
        w: &SeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
        saved: &Self::SeSaved,
        dy: &GpuTensor<A>,
    ) -> Result<SeBackward<GpuTensor<A>>> {
        let dw = self.se_weights(w)?;
        let (dx, grads, dres) = self.se_bwd_with(dw, x, residual, saved, dy)?;
        let host = grads.download(&self.dev)?;
        self.give_back(grads.into_bufs());
        Ok(SeBackward {
            dx,
            grads: crate::se::check::widen_grads(&host),
            dresidual: dres,
        })
    }

    fn se_forward_p(
        &self,
        config: SeConfig,
        p: SeLayerParams<'_, f32>,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
    ) -> Result<(GpuTensor<A>, Self::SeSaved)> {
        match self.se_bound_weights(config, &p)? {
            Some(dw) => self.se_fwd_with(dw, x, residual),
            None => self.se_forward(&super::se_weights(config, &p)?, x, residual),
        }
    }

    fn se_backward_p(
        &self,
        config: SeConfig,
        p: SeLayerParamsMut<'_, f32>,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
        saved: &Self::SeSaved,
        dy: &GpuTensor<A>,
    ) -> Result<(GpuTensor<A>, Option<GpuTensor<A>>)> {
        let Some(dw) = self.se_bound_weights(config, &p.as_ref())? else {
            let w = super::se_weights(config, &p.as_ref())?;
            let out = self.se_backward(&w, x, residual, saved, dy)?;
            super::add_se_grads(p, out.grads)?;
            return Ok((out.dx, out.dresidual));
        };
        let (dx, grads, dres) = self.se_bwd_with(dw, x, residual, saved, dy)?;
        // Add (or, after a zero_grad, copy) each gradient into its bound storage.
        let targets = [
            Some(&*p.fc1_weight),
            p.fc1_bias.as_deref(),
            Some(&*p.fc2_weight),
            p.fc2_bias.as_deref(),
        ];
        let gbufs: Vec<Buf<f32>> = grads.into_bufs().collect();
        let mut gi = gbufs.iter();
        for t in targets.into_iter().flatten() {
            let (Some(c), Some(g)) = (self.bound(t)?, gi.next()) else {
                return Err(Error::Config("SE parameters are partly bound".into()));
            };
            check_len("SE gradient", g.len(), c.len)?;
            let (addr, accumulate) = c.grad_target(&self.dev)?;
            self.add_into(addr, self.dev.addr(g), c.len, accumulate)?;
            c.written();
        }
        self.give_back(gbufs);
        Ok((dx, dres))
    }
}
