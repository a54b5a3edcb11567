//! The CUDA backend: every op of [`Backend`] as kernels of `kernels/nn.cu` (convolutions as
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
//! slices each op uploads. Activations are f32 ([`Cuda::new`]) or bf16 for mixed precision
//! ([`Cuda::bf16`]: parameters, their gradients and every sum stay f32 or f64); NCHW only;
//! reductions run in a fixed order, so results repeat bit for bit.

use super::blas::{Blas, BlasType, Gemm};
use super::cudnn::{ConvChoice, ConvEngine, Dnn, DnnMode, Pass, PassKind};
use super::{
    check_bn_lens, check_len, check_split, concat_shape, same_shape, ActTensor, Backend,
    BnDeviceSaved, BnParamsMut, BnRun, BnStats, ConvGeom, PoolGeom, SeBackward, SeLayerParams,
    SeLayerParamsMut,
};
use crate::cuda::abi::NnConvParams;
use crate::cuda::{Buf, CudaDevice, CudaElement, DevElem, DeviceTensor, Module};
use crate::error::{Error, Result};
use crate::nn::param::{DeviceStore, Param};
use crate::se::cuda::{self as se_gpu, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights};
use crate::se::{SeConfig, SeWeights};
use crate::tensor::{Layout, Shape, Tensor};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The kernels' block size.
const THREADS: u32 = 256;
/// GEMM tile edge (TM = TN in nn.cu).
const TILE: usize = 64;
/// The most blocks along grid.y / grid.z.
/// The grid's y and z limit on a GPU; a device may say less ([`DeviceInfo::max_grid_yz`]: the
/// emulator does, so the tests reach the chunking paths on small shapes).
///
/// [`DeviceInfo::max_grid_yz`]: crate::cuda::DeviceInfo::max_grid_yz
const MAX_GRID_YZ: usize = 65_535;
/// Elements of A the im2col engine's column buffer may hold by default (64 Mi: 128 MiB of bf16).
const COL_BUDGET: usize = 64 << 20;

/// The im2col engine's GEMMs.
#[derive(Debug)]
enum GemmEngine {
    /// cuBLAS on a GPU.
    Cublas(Blas),
    /// kernels/nn.cu's `nn_blas_*`, cuBLAS's column-major contract, on the emulator.
    StandIn,
}

/// A kernel argument: the address of a value the launch copies.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

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

/// A device address for a kernel argument.
trait Addr {
    fn at(&self, dev: &CudaDevice) -> u64;
}

impl<T: crate::cuda::DevElem> Addr for Buf<T> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        dev.addr(self)
    }
}

impl Addr for DeviceTensor<f32> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.addr(dev)
    }
}

impl<A: Addr + ?Sized> Addr for Arc<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        (**self).at(dev)
    }
}

impl<A: Addr + ?Sized> Addr for &A {
    fn at(&self, dev: &CudaDevice) -> u64 {
        (**self).at(dev)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool({} allocations)",
            self.misses.load(Ordering::Relaxed)
        )
    }
}

/// Device buffers kept for reuse (a caching allocator): free buffers by element type and exact
/// length. A training step repeats its shapes, so after the first step outputs and
/// temporaries come from here instead of the driver.
/// A free buffer of some element type (a `Buf<T>`, downcast on reuse).
type FreeBuf = Box<dyn Any + Send>;

#[derive(Default)]
struct Pool {
    free: Mutex<HashMap<(TypeId, usize), Vec<FreeBuf>>>,
    misses: AtomicUsize,
}

impl Pool {
    fn get<T: DevElem>(&self, len: usize) -> Option<Buf<T>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let b = free.get_mut(&(TypeId::of::<T>(), len))?.pop()?;
        b.downcast::<Buf<T>>().ok().map(|b| *b)
    }

    fn put<T: DevElem>(&self, b: Buf<T>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.entry((TypeId::of::<T>(), b.len()))
            .or_default()
            .push(Box::new(b));
    }
}

/// A pooled buffer: goes back to the pool when dropped.
struct PoolBuf<T: DevElem> {
    buf: Option<Buf<T>>,
    pool: Arc<Pool>,
}

impl<T: DevElem> std::ops::Deref for PoolBuf<T> {
    type Target = Buf<T>;
    fn deref(&self) -> &Buf<T> {
        self.buf
            .as_ref()
            .expect("a pooled buffer is present until dropped")
    }
}

impl<T: DevElem> std::ops::DerefMut for PoolBuf<T> {
    fn deref_mut(&mut self) -> &mut Buf<T> {
        self.buf
            .as_mut()
            .expect("a pooled buffer is present until dropped")
    }
}

impl<T: DevElem> Drop for PoolBuf<T> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

impl<T: DevElem> Addr for PoolBuf<T> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        dev.addr(&**self)
    }
}

/// A device tensor whose buffer goes back to the pool (when it came from one).
struct Pooled<A: NnAct> {
    t: Option<DeviceTensor<A>>,
    pool: Option<Arc<Pool>>,
}

impl<A: NnAct> Pooled<A> {
    fn tensor(&self) -> &DeviceTensor<A> {
        self.t
            .as_ref()
            .expect("a pooled tensor is present until dropped")
    }

    fn tensor_mut(&mut self) -> &mut DeviceTensor<A> {
        self.t
            .as_mut()
            .expect("a pooled tensor is present until dropped")
    }
}

impl<A: NnAct> From<DeviceTensor<A>> for Pooled<A> {
    fn from(t: DeviceTensor<A>) -> Self {
        Pooled {
            t: Some(t),
            pool: None,
        }
    }
}

impl<A: NnAct> Addr for Pooled<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.tensor().addr(dev)
    }
}

impl<A: NnAct> Drop for Pooled<A> {
    fn drop(&mut self) {
        if let (Some(t), Some(p)) = (self.t.take(), &self.pool) {
            p.put(t.into_buf());
        }
    }
}

/// An activation of the CUDA backend: an NCHW tensor of `A` (f32, or bf16 for mixed
/// precision) in device memory. Clones share the memory (the backend never writes a tensor it
/// was given); the last one dropped hands the buffer back to the backend's pool.
pub struct GpuTensor<A: NnAct = f32>(Arc<Pooled<A>>);

impl<A: NnAct> Clone for GpuTensor<A> {
    fn clone(&self) -> Self {
        GpuTensor(self.0.clone())
    }
}

impl<A: NnAct> GpuTensor<A> {
    fn wrap(t: impl Into<Pooled<A>>) -> Self {
        GpuTensor(Arc::new(t.into()))
    }

    /// The device tensor.
    pub fn device_tensor(&self) -> &DeviceTensor<A> {
        self.0.tensor()
    }
}

impl<A: NnAct> Addr for GpuTensor<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.device_tensor().addr(dev)
    }
}

impl<A: NnAct> std::fmt::Debug for GpuTensor<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuTensor<{}>({})",
            A::SUFFIX,
            self.device_tensor().shape()
        )
    }
}

impl<A: NnAct> ActTensor for GpuTensor<A> {
    fn shape(&self) -> Shape {
        self.device_tensor().shape()
    }
}

/// Where each max-pool output's maximum came from (flat NCHW input indices, whatever the
/// layout), in device memory, with the shapes and geometry it is valid for (so a backward
/// cannot route a gradient with indices of another pooling).
#[derive(Clone)]
pub struct GpuIndices {
    buf: Arc<PoolBuf<u32>>,
    input: Shape,
    output: Shape,
    geom: PoolGeom,
}

impl std::fmt::Debug for GpuIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuIndices({} -> {})", self.input, self.output)
    }
}

/// What the SE forward keeps for its backward: the device buffers of [`se_gpu::forward`], from
/// the backend's pool and back to it when the last clone drops.
#[derive(Clone)]
pub struct CudaSeSaved(Arc<PooledSeSaved>);

struct PooledSeSaved {
    saved: Option<DeviceSeSaved>,
    pool: Arc<Pool>,
}

impl PooledSeSaved {
    fn get(&self) -> &DeviceSeSaved {
        self.saved
            .as_ref()
            .expect("the saved state is present until dropped")
    }
}

impl Drop for PooledSeSaved {
    fn drop(&mut self) {
        if let Some(s) = self.saved.take() {
            for b in s.into_bufs() {
                self.pool.put(b);
            }
        }
    }
}

impl std::fmt::Debug for CudaSeSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaSeSaved")
    }
}

/// A parameter operand of an op: host values (uploaded for the op) or a device address (a
/// bound parameter's storage).
enum PArg<'a> {
    Host(&'a [f32]),
    Dev { addr: u64, len: usize },
}

impl PArg<'_> {
    /// Checks the operand holds `n` elements.
    fn check(&self, what: &'static str, n: usize) -> Result<()> {
        match self {
            PArg::Host(v) => check_len(what, v.len(), n),
            PArg::Dev { len, .. } => check_len(what, *len, n),
        }
    }
}

/// Where an op puts a parameter gradient: a host slice (accumulated into) or a bound
/// parameter's device gradient (accumulated into, or written over when zeroed).
enum GArg<'a> {
    Host(&'a mut [f32]),
    /// `zeroed` is the storage's "reads as zero" flag, cleared once the op has written.
    Dev {
        addr: u64,
        len: usize,
        accumulate: bool,
        zeroed: &'a AtomicBool,
    },
}

impl GArg<'_> {
    fn check(&self, what: &'static str, n: usize) -> Result<()> {
        match self {
            GArg::Host(v) => check_len(what, v.len(), n),
            GArg::Dev { len, .. } => check_len(what, *len, n),
        }
    }
}

/// A gradient destination during an op (see [`Cuda::g_start`]).
struct GradTarget<'a> {
    addr: u64,
    accumulate: bool,
    host: Option<(&'a mut [f32], PoolBuf<f32>)>,
    zeroed: Option<&'a AtomicBool>,
}

/// A parameter bound to a [`Cuda`] backend: its values, gradient and SGD momentum in device
/// memory ([`Backend::bind`], [`Network::bind`](crate::nn::Network::bind)).
pub struct CudaParam {
    owner: u64,
    dev: Arc<CudaDevice>,
    len: usize,
    value: Buf<f32>,
    grad: Mutex<Option<Buf<f32>>>,
    /// The gradient reads as zero (zero_grad since the last write): the next backward writes
    /// over it instead of adding.
    grad_zero: AtomicBool,
    momentum: Mutex<Option<Buf<f32>>>,
}

impl std::fmt::Debug for CudaParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaParam({} values)", self.len)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CudaParam {
    fn value_addr(&self, dev: &CudaDevice) -> Result<u64> {
        if !std::ptr::eq(dev, &*self.dev) {
            return Err(Error::Config(
                "a bound parameter's device differs from the backend's".into(),
            ));
        }
        Ok(dev.addr(&self.value))
    }

    /// The gradient's address and whether a write there accumulates (false while it reads as
    /// zero, after zero_grad: the caller clears that with [`CudaParam::written`] once its op
    /// has run); allocates the gradient, zeroed, on first use.
    fn grad_target(&self, dev: &CudaDevice) -> Result<(u64, bool)> {
        let mut g = lock(&self.grad);
        if g.is_none() {
            *g = Some(dev.alloc_zeros::<f32>(self.len)?);
        }
        let addr = g.as_ref().map_or(0, |b| dev.addr(b));
        Ok((addr, !self.grad_zero.load(Ordering::Relaxed)))
    }

    /// Records that an op wrote the gradient (it no longer reads as zero).
    fn written(&self) {
        self.grad_zero.store(false, Ordering::Relaxed);
    }
}

impl CudaParam {
    /// The gradient's address for a kernel that adds to it: zero-filled first when the
    /// gradient reads as zero (after zero_grad, or never written).
    fn grad_target_zeroed(&self, dev: &CudaDevice) -> Result<u64> {
        let (addr, accumulate) = self.grad_target(dev)?;
        if !accumulate {
            let mut g = lock(&self.grad);
            if let Some(b) = g.as_mut() {
                dev.fill_bytes(b, 0, self.len, 0)?;
            }
        }
        Ok(addr)
    }
}

impl DeviceStore for CudaParam {
    fn owner(&self) -> u64 {
        self.owner
    }

    fn read_value(&self) -> Result<Vec<f32>> {
        self.dev.read(&self.value, 0, self.len)
    }

    fn read_grad(&self) -> Result<Option<Vec<f32>>> {
        let g = lock(&self.grad);
        match &*g {
            None => Ok(None),
            Some(_) if self.grad_zero.load(Ordering::Relaxed) => Ok(Some(vec![0.0; self.len])),
            Some(b) => self.dev.read(b, 0, self.len).map(Some),
        }
    }

    fn read_momentum(&self) -> Result<Option<Vec<f32>>> {
        match &*lock(&self.momentum) {
            None => Ok(None),
            Some(b) => self.dev.read(b, 0, self.len).map(Some),
        }
    }

    fn zero_grad(&self) {
        if lock(&self.grad).is_some() {
            self.grad_zero.store(true, Ordering::Relaxed);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What the device BatchNorm forward keeps for backward: the mean and invstd it normalised
/// with (batch or running), in device memory.
struct CudaBnSaved {
    mean: PoolBuf<f64>,
    invstd: PoolBuf<f64>,
    batch_stats: bool,
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

    /// The name of nn.cu kernel `base` for this backend's activations (`nn_affine_bf16`).
    fn k(base: &str) -> String {
        format!("{base}_{}", A::SUFFIX)
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

    /// A buffer of `len` elements from the pool (or the driver); contents undefined. Handing
    /// it back is the caller's business ([`Pool::put`]).
    fn take_raw<T: DevElem>(&self, len: usize) -> Result<Buf<T>> {
        let len = len.max(1);
        match self.pool.get::<T>(len) {
            Some(b) => Ok(b),
            None => {
                self.pool.misses.fetch_add(1, Ordering::Relaxed);
                self.dev.alloc_zeros::<T>(len)
            }
        }
    }

    /// A buffer of `len` elements from the pool (or the driver), back to the pool when dropped;
    /// contents undefined.
    fn take<T: DevElem>(&self, len: usize) -> Result<PoolBuf<T>> {
        Ok(PoolBuf {
            buf: Some(self.take_raw(len)?),
            pool: self.pool.clone(),
        })
    }

    /// SE weights in pooled buffers (give them back with [`Cuda::give_back`]).
    fn se_weights(&self, w: &SeWeights) -> Result<DeviceSeWeights> {
        let opt = |b: Option<&Vec<f32>>| b.map(|b| self.take_raw(b.len())).transpose();
        let bufs = [
            Some(self.take_raw(w.w1.len())?),
            opt(w.b1.as_ref())?,
            Some(self.take_raw(w.w2.len())?),
            opt(w.b2.as_ref())?,
        ];
        DeviceSeWeights::write_into(&self.dev, w, bufs)
    }

    /// Returns buffers to the pool.
    fn give_back(&self, bufs: impl IntoIterator<Item = Buf<f32>>) {
        for b in bufs {
            self.pool.put(b);
        }
    }

    /// A pooled buffer holding a copy of `data`.
    fn up<T: DevElem>(&self, data: &[T]) -> Result<PoolBuf<T>> {
        let mut b = self.take::<T>(data.len())?;
        self.dev.write(&mut b, 0, data)?;
        Ok(b)
    }

    /// A pooled buffer of activations holding `data` (converted on the device when `A` is not
    /// f32).
    fn to_act(&self, data: &[f32]) -> Result<PoolBuf<A>> {
        if is_f32::<A>() {
            // A is f32 here, so the cast is the identity (never a reinterpretation).
            if let Ok(same) = bytemuck::try_cast_slice::<f32, A>(data) {
                return self.up(same);
            }
        }
        let up = self.up(data)?;
        self.convert_to_act(self.addr(&up), data.len())
    }

    /// A pooled buffer of `n` activations converted from the `n` floats at device address
    /// `src`.
    fn convert_to_act(&self, src: u64, n: usize) -> Result<PoolBuf<A>> {
        let out = self.out::<A>(n)?;
        let (dst, len) = (self.addr(&out), n as u64);
        let mut args = [arg(&src), arg(&dst), arg(&len)];
        // SAFETY: nn_to_act_A(src, dst, n): src holds n floats (the callers' buffers), `out`
        // n elements of A.
        unsafe { self.launch_flat("nn_to_act", n, &mut args)? };
        Ok(out)
    }

    /// The address of convolution `g`'s weight (KCRS floats at `wp`) as cuDNN takes it: of
    /// cuDNN's data type, KCRS with NCHW activations and KRSC with NHWC ones. `wp` itself for
    /// f32 NCHW, else a copy kept alive in `keep`.
    fn dnn_weight(&self, wp: u64, g: &ConvGeom, keep: &mut Vec<PoolBuf<A>>) -> Result<u64> {
        let n = g.weight_len();
        if self.layout == Layout::Nchw {
            return self.act_weight(wp, n, keep);
        }
        let out = self.out::<A>(n)?;
        let (dst, k, c, rs) = (
            self.addr(&out),
            g.out_ch as u64,
            g.in_per_group() as u64,
            (g.kernel * g.kernel) as u64,
        );
        let mut args = [arg(&wp), arg(&dst), arg(&k), arg(&c), arg(&rs)];
        // SAFETY: nn_weight_krsc_A(w, dst, k, c, rs): w holds k * c * rs floats (the weight of
        // g), `out` as many elements of A.
        unsafe { self.launch_flat("nn_weight_krsc", n, &mut args)? };
        keep.push(out);
        Ok(dst)
    }

    /// `dst = src` with the other layout (NCHW -> NHWC when `to_nhwc`), `s` elements of A.
    fn relayout_into(&self, src: u64, dst: u64, s: Shape, to_nhwc: bool) -> Result<()> {
        let (n, c, hw, t) = (s.n as u64, s.c as u64, s.hw() as u64, to_nhwc as u32);
        let mut args = [arg(&src), arg(&dst), arg(&n), arg(&c), arg(&hw), arg(&t)];
        // SAFETY: nn_relayout_A(src, dst, n, c, hw, to_nhwc): src and dst hold s.numel()
        // elements of A (the callers' buffers).
        unsafe { self.launch_flat("nn_relayout", s.numel(), &mut args) }
    }

    /// A pooled NCHW copy of `x` when this backend is NHWC and `x` has more than one pixel
    /// (where the layouts differ), for ops that read an activation as flat features.
    fn nchw_copy(&self, x: &GpuTensor<A>) -> Result<Option<PoolBuf<A>>> {
        let s = x.shape();
        if self.layout == Layout::Nchw || s.hw() == 1 {
            return Ok(None);
        }
        let b = self.out::<A>(s.numel())?;
        self.relayout_into(self.addr(&x), self.addr(&b), s, false)?;
        Ok(Some(b))
    }

    /// Copies channels [c0, c0 + part.c) of `src` (with `src_c` channels) to channels
    /// [d0, ..) of `dst` (with `dst_c`), activations in this backend's layout: `part` is the
    /// copied block's shape. One kernel for every sample: NHWC rows are pixels (a channel is
    /// one element of a row), NCHW rows are samples (a channel is a plane of hw elements).
    #[allow(clippy::too_many_arguments)]
    fn copy_channels(
        &self,
        src: u64,
        src_c: usize,
        c0: usize,
        dst: u64,
        dst_c: usize,
        d0: usize,
        part: Shape,
    ) -> Result<()> {
        let (rows, unit) = match self.layout {
            Layout::Nhwc => (part.n * part.hw(), 1),
            Layout::Nchw => (part.n, part.hw()),
        };
        let rows = rows as u64;
        let (sc, so, dc, dof, cnt) = (
            (src_c * unit) as u64,
            (c0 * unit) as u64,
            (dst_c * unit) as u64,
            (d0 * unit) as u64,
            (part.c * unit) as u64,
        );
        let mut args = [
            arg(&src),
            arg(&dst),
            arg(&rows),
            arg(&sc),
            arg(&so),
            arg(&dc),
            arg(&dof),
            arg(&cnt),
        ];
        // SAFETY: nn_copy_cols_A(src, dst, rows, src_c, src_off, dst_c, dst_off, cnt): src
        // holds rows x src_c units, dst rows x dst_c, and c0 + part.c <= src_c, d0 + part.c
        // <= dst_c (the callers' shapes), so every access stays in its row.
        unsafe { self.launch_flat("nn_copy_cols", part.numel(), &mut args) }
    }

    /// A pooled output buffer (poisoned when asked).
    fn out<T: DevElem>(&self, len: usize) -> Result<PoolBuf<T>> {
        let mut b = self.take::<T>(len)?;
        if self.poison {
            self.dev.fill_bytes(&mut b, 0, len.max(1), 0xff)?;
        }
        Ok(b)
    }

    fn down<T: crate::cuda::DevElem>(&self, b: &Buf<T>, len: usize) -> Result<Vec<T>> {
        self.dev.read(b, 0, len)
    }

    fn addr<X: Addr + ?Sized>(&self, a: &X) -> u64 {
        a.at(&self.dev)
    }

    /// A pooled output tensor in this backend's layout (poisoned when asked; otherwise its
    /// contents are stale).
    fn out_t(&self, shape: Shape) -> Result<Pooled<A>> {
        shape.validate()?;
        let b = self.out::<A>(shape.numel())?;
        self.pooled(b, shape)
    }

    /// A pooled buffer as a tensor of `shape` in this backend's layout.
    fn pooled(&self, b: PoolBuf<A>, shape: Shape) -> Result<Pooled<A>> {
        self.pooled_in(b, shape, self.layout)
    }

    /// A pooled buffer as a tensor of `shape` in `layout`.
    fn pooled_in(&self, mut b: PoolBuf<A>, shape: Shape, layout: Layout) -> Result<Pooled<A>> {
        let buf = b.buf.take().expect("a fresh pooled buffer");
        match DeviceTensor::from_buf(buf, shape, layout) {
            Ok(t) => Ok(Pooled {
                t: Some(t),
                pool: Some(self.pool.clone()),
            }),
            Err(e) => Err(e),
        }
    }

    /// Launches `name` from nn.cu with 256-thread blocks.
    ///
    /// # Safety
    /// `args` match the kernel's parameters and every address covers what the kernel touches
    /// for the sizes among them.
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            self.dev
                .launch(Module::Nn, name, grid, (THREADS, 1, 1), 0, 1, args)
        }
    }

    /// Launches nn.cu kernel `base` for this backend's activations on enough 256-thread blocks
    /// for `n` items (grid-stride kernels cover the rest).
    ///
    /// # Safety
    /// As [`Cuda::launch`].
    unsafe fn launch_flat(&self, base: &str, n: usize, args: &mut [*mut c_void]) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.launch(&Self::k(base), (blocks(n, THREADS as usize), 1, 1), args) }
    }

    // ------------------------------------------------------------------ convolution / linear
    // cores on device addresses: parameters come either from the host (uploaded for the op)
    // or from a bound parameter's device storage.

    /// The device address of a parameter operand, uploading host values into `keep`.
    fn p_addr(&self, p: PArg<'_>, keep: &mut Vec<PoolBuf<f32>>) -> Result<u64> {
        match p {
            PArg::Host(v) => {
                let b = self.up(v)?;
                let a = self.addr(&b);
                keep.push(b);
                Ok(a)
            }
            PArg::Dev { addr, .. } => Ok(addr),
        }
    }

    /// Where a gradient goes: a host slice (uploaded, accumulated on the device, downloaded by
    /// [`Cuda::g_finish`]) or a bound parameter's device gradient.
    fn g_start<'a>(&self, g: GArg<'a>) -> Result<GradTarget<'a>> {
        match g {
            GArg::Host(v) => {
                let b = self.up(v)?;
                Ok(GradTarget {
                    addr: self.addr(&b),
                    accumulate: true,
                    host: Some((v, b)),
                    zeroed: None,
                })
            }
            GArg::Dev {
                addr,
                accumulate,
                zeroed,
                ..
            } => Ok(GradTarget {
                addr,
                accumulate,
                host: None,
                zeroed: Some(zeroed),
            }),
        }
    }

    /// After the op wrote the gradient: copies a host one back, or marks a bound one written.
    fn g_finish(&self, t: GradTarget<'_>) -> Result<()> {
        if let Some((v, b)) = t.host {
            let n = v.len();
            v.copy_from_slice(&self.down(&b, n)?);
        }
        if let Some(z) = t.zeroed {
            z.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    fn conv_fwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        b: Option<PArg<'_>>,
        g: &ConvGeom,
    ) -> Result<GpuTensor<A>> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        w.check("conv weight", g.weight_len())?;
        if let Some(b) = &b {
            b.check("conv bias", g.out_ch)?;
        }
        let mut keep = Vec::new();
        if let Some((d, ws)) = self.dnn_for(xs, ys, g, &[PassKind::Forward])? {
            let wp = self.p_addr(w, &mut keep)?;
            let mut keep_w = Vec::new();
            let wp = self.dnn_weight(wp, g, &mut keep_w)?;
            let y = self.out_t(ys)?;
            let pass = Pass::Forward {
                x: self.addr(&x),
                w: wp,
                y: self.addr(&y),
            };
            self.run_dnn(d, xs, ys, g, pass, ws[0])?;
            let y = GpuTensor::wrap(y);
            return match b {
                Some(b) => {
                    let bp = self.p_addr(b, &mut keep)?;
                    // A null scale: the affine kernel adds the bias alone. (With narrow
                    // activations the sum rounds a second time, after cuDNN's output; the own
                    // kernel adds the bias before its one rounding. No SE-ResNet convolution
                    // has a bias.)
                    self.affine_at(&y, 0, bp, false)
                }
                None => Ok(y),
            };
        }
        if self.im2col.is_some() {
            let wp = self.p_addr(w, &mut keep)?;
            let y = self.conv_fwd_im2col(x, wp, g, xs, ys)?;
            return match b {
                Some(b) => {
                    let bp = self.p_addr(b, &mut keep)?;
                    self.affine_at(&y, 0, bp, false)
                }
                None => Ok(y),
            };
        }
        let mut p = self.conv_params(g, xs, ys)?;
        if b.is_some() {
            p.flags |= crate::cuda::abi::SENET_NN_BIAS;
        }
        let wp = self.p_addr(w, &mut keep)?;
        let bp = match b {
            Some(b) => self.p_addr(b, &mut keep)?,
            None => 0,
        };
        let y = self.out_t(ys)?;
        let chunk = self.sample_chunk(g);
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let xp = self.addr(&x) + (n0 * xs.sample_numel() * size_of::<A>()) as u64;
            let yp = self.addr(&y) + (n0 * ys.sample_numel() * size_of::<A>()) as u64;
            let mut args = [arg(&pc), arg(&xp), arg(&wp), arg(&bp), arg(&yp)];
            let grid = (
                grid_x(ys.hw(), TILE)?,
                grid_y(g.out_per_group(), TILE, self.max_yz())?,
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_fwd_A(p, x, w, bias, y): x and y point at sample n0 of buffers
            // holding xs and ys; nn samples follow; w holds the weight; bias out_ch floats when
            // the flag is set.
            unsafe { self.launch(&Self::k("nn_conv_fwd"), grid, &mut args)? };
        }
        Ok(GpuTensor::wrap(y))
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_bwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        dw: GArg<'_>,
        db: Option<GArg<'_>>,
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        same_shape(dy.shape(), ys, "conv gradient vs output")?;
        w.check("conv weight", g.weight_len())?;
        dw.check("conv weight gradient", g.weight_len())?;
        if let Some(db) = &db {
            db.check("conv bias gradient", g.out_ch)?;
        }
        let (xp, dyp) = (self.addr(&x), self.addr(&dy));
        if let Some(db) = db {
            let t = self.g_start(db)?;
            self.channel_sum(dyp, t.addr, ys, t.accumulate)?;
            self.g_finish(t)?;
        }
        let passes: &[PassKind] = if need_dx {
            &[PassKind::Filter, PassKind::Data]
        } else {
            &[PassKind::Filter]
        };
        let mut keep = Vec::new();
        if let Some((d, ws)) = self.dnn_for(xs, ys, g, passes)? {
            let t = self.g_start(dw)?;
            if is_f32::<A>() && self.layout == Layout::Nchw {
                let pass = Pass::Filter {
                    x: xp,
                    dy: dyp,
                    dw: t.addr,
                    accumulate: t.accumulate,
                };
                self.run_dnn(d, xs, ys, g, pass, ws[0])?;
            } else {
                // cuDNN forms the gradient in A (KRSC with NHWC); it is added to the f32 KCRS
                // one after.
                let n = g.weight_len();
                let tmp = self.out::<A>(n)?;
                let pass = Pass::Filter {
                    x: xp,
                    dy: dyp,
                    dw: self.addr(&tmp),
                    accumulate: false,
                };
                self.run_dnn(d, xs, ys, g, pass, ws[0])?;
                let (src, dst, len, acc) = (self.addr(&tmp), t.addr, n as u64, t.accumulate as u32);
                if self.layout == Layout::Nhwc {
                    let (k, c, rs) = (
                        g.out_ch as u64,
                        g.in_per_group() as u64,
                        (g.kernel * g.kernel) as u64,
                    );
                    let mut args = [arg(&src), arg(&dst), arg(&k), arg(&c), arg(&rs), arg(&acc)];
                    // SAFETY: nn_grad_from_krsc_A(src, dst, k, c, rs, accumulate): tmp holds
                    // n = k * c * rs elements of A, the gradient target n floats.
                    unsafe { self.launch_flat("nn_grad_from_krsc", n, &mut args)? };
                } else {
                    let mut args = [arg(&src), arg(&dst), arg(&len), arg(&acc)];
                    // SAFETY: nn_grad_from_act_A(src, dst, n, accumulate): tmp holds n
                    // elements of A, the gradient target n floats.
                    unsafe { self.launch_flat("nn_grad_from_act", n, &mut args)? };
                }
            }
            self.g_finish(t)?;
            if !need_dx {
                return Ok(None);
            }
            let wp = self.p_addr(w, &mut keep)?;
            let mut keep_w = Vec::new();
            let wp = self.dnn_weight(wp, g, &mut keep_w)?;
            let dx = self.out_t(xs)?;
            let pass = Pass::Data {
                dy: dyp,
                w: wp,
                dx: self.addr(&dx),
            };
            self.run_dnn(d, xs, ys, g, pass, ws[1])?;
            return Ok(Some(GpuTensor::wrap(dx)));
        }
        if self.im2col.is_some() {
            let t = self.g_start(dw)?;
            let wp = self.p_addr(w, &mut keep)?;
            let dx = self.conv_bwd_im2col(x, wp, dy, g, (t.addr, t.accumulate), need_dx)?;
            self.g_finish(t)?;
            return Ok(dx);
        }
        let mut p = self.conv_params(g, xs, ys)?;
        // Weight gradient (accumulated into dw's current values, or written over a zeroed
        // bound gradient), split along its long depth (samples x output pixels) when the
        // output alone gives too few blocks.
        let t = self.g_start(dw)?;
        p.flags = self.conv_layout_flag()
            | if t.accumulate {
                crate::cuda::abi::SENET_NN_ACCUMULATE
            } else {
                0
            };
        let (splits, kps) = self.weight_grad_splits(g, xs.n * ys.hw());
        let partial = if splits > 1 {
            Some(self.out::<f32>(splits as usize * g.weight_len())?)
        } else {
            None
        };
        let (dwp, pp) = (t.addr, partial.as_ref().map_or(0, |b| self.addr(b)));
        let mut args = [
            arg(&p),
            arg(&xp),
            arg(&dyp),
            arg(&dwp),
            arg(&pp),
            arg(&splits),
            arg(&kps),
        ];
        let z = g.groups * splits as usize;
        if z > self.max_yz() {
            return Err(Error::Shape(format!("{} groups are too many", g.groups)));
        }
        let grid = (
            grid_x(g.in_per_group() * g.kernel * g.kernel, TILE)?,
            grid_y(g.out_per_group(), TILE, self.max_yz())?,
            z as u32,
        );
        // SAFETY: nn_conv_bwd_weight_A(p, x, dy, dw, partial, splits, k_per_split): x holds
        // xs, dy holds ys, dw the weight, partial splits weights when splits > 1; the splits
        // cover the depth (weight_grad_splits).
        unsafe { self.launch(&Self::k("nn_conv_bwd_weight"), grid, &mut args)? };
        if splits > 1 {
            let (len, acc) = (g.weight_len() as u64, t.accumulate as u32);
            let mut args = [arg(&pp), arg(&dwp), arg(&len), arg(&splits), arg(&acc)];
            // SAFETY: nn_sum_splits_f32(partial, out, len, splits, accumulate): partial holds
            // splits * len floats, dw len.
            unsafe {
                self.launch(
                    "nn_sum_splits_f32",
                    (blocks(g.weight_len(), THREADS as usize), 1, 1),
                    &mut args,
                )?
            };
        }
        self.g_finish(t)?;
        if !need_dx {
            return Ok(None);
        }
        let wp = self.p_addr(w, &mut keep)?;
        let dx = self.out_t(xs)?;
        let chunk = self.sample_chunk(g);
        p.flags = self.conv_layout_flag();
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let dyp = self.addr(&dy) + (n0 * ys.sample_numel() * size_of::<A>()) as u64;
            let dxp = self.addr(&dx) + (n0 * xs.sample_numel() * size_of::<A>()) as u64;
            let mut args = [arg(&pc), arg(&dyp), arg(&wp), arg(&dxp)];
            let grid = (
                grid_x(xs.hw(), TILE)?,
                grid_y(g.in_per_group(), TILE, self.max_yz())?,
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_bwd_data_A(p, dy, w, dx): dy and dx point at sample n0 of
            // buffers holding ys and xs; w holds the weight.
            unsafe { self.launch(&Self::k("nn_conv_bwd_data"), grid, &mut args)? };
        }
        Ok(Some(GpuTensor::wrap(dx)))
    }

    /// The im2col engine's GEMM operand type for A.
    fn blas_type() -> BlasType {
        match A::SUFFIX {
            "bf16" => BlasType::Bf16,
            "f16" => BlasType::F16,
            _ => BlasType::F32,
        }
    }

    /// One strided-batched GEMM of the im2col engine (operands of A; C of A, or f32 with
    /// `c_f32`): cuBLAS on a GPU, `nn_blas_*` (the same contract) on the emulator.
    ///
    /// # Safety
    /// The addresses in `g` hold what its sizes, leading dimensions and strides reach.
    unsafe fn blas_gemm(&self, g: &Gemm, c_f32: bool) -> Result<()> {
        let c_type = if c_f32 {
            BlasType::F32
        } else {
            Self::blas_type()
        };
        if let Some(GemmEngine::Cublas(b)) = self.im2col.as_deref() {
            // SAFETY: forwarded from this function's contract.
            return unsafe { b.gemm(&self.dev, g, Self::blas_type(), c_type) };
        }
        let int = |what: &str, v: usize| small(what, v);
        let (ta, tb) = (g.transa as u32, g.transb as u32);
        let (m, n, k) = (
            int("GEMM rows", g.m)?,
            int("GEMM columns", g.n)?,
            int("GEMM depth", g.k)?,
        );
        let (alpha, beta) = (1.0f32, g.beta);
        let (lda, sa, ldb, sb, ldc, sc) = (
            g.lda as i64,
            g.stride_a as i64,
            g.ldb as i64,
            g.stride_b as i64,
            g.ldc as i64,
            g.stride_c as i64,
        );
        let mut args = [
            arg(&ta),
            arg(&tb),
            arg(&m),
            arg(&n),
            arg(&k),
            arg(&alpha),
            arg(&g.a),
            arg(&lda),
            arg(&sa),
            arg(&g.b),
            arg(&ldb),
            arg(&sb),
            arg(&beta),
            arg(&g.c),
            arg(&ldc),
            arg(&sc),
        ];
        if g.batch > self.max_yz() {
            return Err(Error::Shape(format!(
                "a GEMM batch of {} is too large",
                g.batch
            )));
        }
        let grid = (
            grid_x(g.n, TILE)?,
            grid_y(g.m, TILE, self.max_yz())?,
            g.batch.max(1) as u32,
        );
        let name = Self::k(if c_f32 {
            "nn_blas_f32out"
        } else {
            "nn_blas_act"
        });
        // SAFETY: nn_blas_{act,f32out}_A(transa, transb, m, n, k, alpha, A, lda, sa, B, ldb, sb,
        // beta, C, ldc, sc): the operands as this function's contract says.
        unsafe { self.launch(&name, grid, &mut args) }
    }

    /// Samples per im2col chunk: as many as fit the column budget (at least one). The budget
    /// counts elements of A; the input gradient's f32 dcol has as many elements.
    fn col_chunk(&self, g: &ConvGeom, xs: Shape, ys: Shape) -> usize {
        let per = (g.groups * ys.hw() * g.in_per_group() * g.kernel * g.kernel).max(1);
        (self.col_budget / per)
            .clamp(1, xs.n.max(1))
            .min(self.max_yz())
    }

    /// The columns of samples [n0, n0 + nn) of `x` into a pooled buffer:
    /// col[group][sample][pixel][k].
    fn im2col(
        &self,
        x: u64,
        p: &NnConvParams,
        n0: usize,
        nn: usize,
        xs: Shape,
    ) -> Result<PoolBuf<A>> {
        let pc = NnConvParams { n: nn as u32, ..*p };
        let total = p.groups as usize * nn * (p.oh as usize * p.ow as usize) * p.kdepth as usize;
        let col = self.out::<A>(total)?;
        let (xp, cp) = (
            x + (n0 * xs.sample_numel() * size_of::<A>()) as u64,
            self.addr(&col),
        );
        let mut args = [arg(&pc), arg(&xp), arg(&cp)];
        // SAFETY: nn_im2col_A(p, x, col): x points at sample n0 of a buffer holding xs (nn
        // samples follow), col holds groups * nn * P * K elements.
        unsafe { self.launch_flat("nn_im2col", total, &mut args)? };
        Ok(col)
    }

    /// A convolution's weight (KCRS floats at `wp`) in A for the im2col GEMMs: `wp` itself for
    /// f32, else a converted copy kept in `keep`.
    fn act_weight(&self, wp: u64, n: usize, keep: &mut Vec<PoolBuf<A>>) -> Result<u64> {
        if is_f32::<A>() {
            return Ok(wp);
        }
        let b = self.convert_to_act(wp, n)?;
        let a = self.addr(&b);
        keep.push(b);
        Ok(a)
    }

    /// y = conv(x, w) by im2col and one strided-batched GEMM per group and chunk of samples.
    fn conv_fwd_im2col(
        &self,
        x: &GpuTensor<A>,
        wp: u64,
        g: &ConvGeom,
        xs: Shape,
        ys: Shape,
    ) -> Result<GpuTensor<A>> {
        let p = self.conv_params(g, xs, ys)?;
        let mut keep = Vec::new();
        let wa = self.act_weight(wp, g.weight_len(), &mut keep)?;
        let y = self.out_t(ys)?;
        let (pix, kg, ocg, oc) = (ys.hw(), p.kdepth as usize, g.out_per_group(), g.out_ch);
        let e = size_of::<A>() as u64;
        let chunk = self.col_chunk(g, xs, ys);
        let nhwc = self.layout == Layout::Nhwc;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let col = self.im2col(self.addr(&x), &p, n0, nn, xs)?;
            let y0 = self.addr(&y) + (n0 * ys.sample_numel()) as u64 * e;
            for gi in 0..g.groups {
                let colg = self.addr(&col) + (gi * nn * pix * kg) as u64 * e;
                let wg = wa + (gi * ocg * kg) as u64 * e;
                let gm = if nhwc {
                    // y[s][p][g ocg + o] = sum_k W[o][k] col[p][k]: C (ocg x P, ld oc).
                    Gemm {
                        transa: true,
                        transb: false,
                        m: ocg,
                        n: pix,
                        k: kg,
                        a: wg,
                        lda: kg,
                        stride_a: 0,
                        b: colg,
                        ldb: kg,
                        stride_b: pix * kg,
                        c: y0 + (gi * ocg) as u64 * e,
                        ldc: oc,
                        stride_c: pix * oc,
                        batch: nn,
                        beta: 0.0,
                    }
                } else {
                    // y[s][g ocg + o][p]: C (P x ocg, ld P) = col (P x K) W^T (K x ocg).
                    Gemm {
                        transa: true,
                        transb: false,
                        m: pix,
                        n: ocg,
                        k: kg,
                        a: colg,
                        lda: kg,
                        stride_a: pix * kg,
                        b: wg,
                        ldb: kg,
                        stride_b: 0,
                        c: y0 + (gi * ocg * pix) as u64 * e,
                        ldc: pix,
                        stride_c: oc * pix,
                        batch: nn,
                        beta: 0.0,
                    }
                };
                // SAFETY: col holds groups x nn x P x K elements, the weight oc x K, y the
                // chunk's nn samples of ys; the GEMM reaches only those.
                unsafe { self.blas_gemm(&gm, false)? };
            }
        }
        Ok(GpuTensor::wrap(y))
    }

    /// The im2col engine's backward: the weight gradient (f32, at `dw.0`, added when `dw.1`)
    /// as one GEMM per group and chunk over samples x pixels, then (with `need_dx`) dcol = W^T
    /// dy per sample (f32) and col2im.
    fn conv_bwd_im2col(
        &self,
        x: &GpuTensor<A>,
        wp: u64,
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        (dwp, accumulate): (u64, bool),
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        let xs = x.shape();
        let ys = dy.shape();
        let p = self.conv_params(g, xs, ys)?;
        let mut keep = Vec::new();
        let (pix, kg, ocg, oc) = (ys.hw(), p.kdepth as usize, g.out_per_group(), g.out_ch);
        let e = size_of::<A>() as u64;
        let chunk = self.col_chunk(g, xs, ys);
        let nhwc = self.layout == Layout::Nhwc;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let col = self.im2col(self.addr(&x), &p, n0, nn, xs)?;
            // dy of the chunk with channels innermost ([s][p][oc]): as stored (NHWC), or
            // converted.
            let dy0 = self.addr(&dy) + (n0 * ys.sample_numel()) as u64 * e;
            let cs = Shape::try_new(nn, oc, ys.h, ys.w)?;
            let conv = if nhwc {
                None
            } else {
                let b = self.out::<A>(cs.numel())?;
                self.relayout_into(dy0, self.addr(&b), cs, true)?;
                Some(b)
            };
            let dyc = conv.as_ref().map_or(dy0, |b| self.addr(b));
            for gi in 0..g.groups {
                // dW^T (K x ocg, ld K) (+)= col (K x nn P) dy^T (nn P x ocg).
                let gm = Gemm {
                    transa: false,
                    transb: true,
                    m: kg,
                    n: ocg,
                    k: nn * pix,
                    a: self.addr(&col) + (gi * nn * pix * kg) as u64 * e,
                    lda: kg,
                    stride_a: 0,
                    b: dyc + (gi * ocg) as u64 * e,
                    ldb: oc,
                    stride_b: 0,
                    c: dwp + (gi * ocg * kg * size_of::<f32>()) as u64,
                    ldc: kg,
                    stride_c: 0,
                    batch: 1,
                    beta: if accumulate || n0 > 0 { 1.0 } else { 0.0 },
                };
                // SAFETY: col holds groups x nn x P x K elements, dyc nn P rows of oc, dw the
                // weight's oc x K floats.
                unsafe { self.blas_gemm(&gm, true)? };
            }
        }
        if !need_dx {
            return Ok(None);
        }
        let wa = self.act_weight(wp, g.weight_len(), &mut keep)?;
        let dx = self.out_t(xs)?;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let dcol = self.out::<f32>(g.groups * nn * pix * kg)?;
            let dy0 = self.addr(&dy) + (n0 * ys.sample_numel()) as u64 * e;
            for gi in 0..g.groups {
                // dcol[g][s] (K x P, ld K) = W_g^T (K x ocg) dy_g[s] (ocg x P).
                let (b, ldb, stride_b, transb) = if nhwc {
                    (dy0 + (gi * ocg) as u64 * e, oc, pix * oc, false)
                } else {
                    (dy0 + (gi * ocg * pix) as u64 * e, pix, oc * pix, true)
                };
                let gm = Gemm {
                    transa: false,
                    transb,
                    m: kg,
                    n: pix,
                    k: ocg,
                    a: wa + (gi * ocg * kg) as u64 * e,
                    lda: kg,
                    stride_a: 0,
                    b,
                    ldb,
                    stride_b,
                    c: self.addr(&dcol) + (gi * nn * pix * kg * size_of::<f32>()) as u64,
                    ldc: kg,
                    stride_c: pix * kg,
                    batch: nn,
                    beta: 0.0,
                };
                // SAFETY: the weight holds oc x K elements, dy the chunk's samples of ys, dcol
                // groups x nn x P x K floats.
                unsafe { self.blas_gemm(&gm, true)? };
            }
            let pc = NnConvParams { n: nn as u32, ..p };
            let (dcp, dxp) = (
                self.addr(&dcol),
                self.addr(&dx) + (n0 * xs.sample_numel()) as u64 * e,
            );
            let mut args = [arg(&pc), arg(&dcp), arg(&dxp)];
            // SAFETY: nn_col2im_A(p, dcol, dx): dcol holds groups x nn x P x K floats, dx
            // points at sample n0 of a buffer holding xs (nn samples follow).
            unsafe { self.launch_flat("nn_col2im", nn * xs.sample_numel(), &mut args)? };
        }
        Ok(Some(GpuTensor::wrap(dx)))
    }

    fn linear_fwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        b: Option<PArg<'_>>,
        out: usize,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let k = s.sample_numel();
        w.check("linear weight", out * k)?;
        if let Some(b) = &b {
            b.check("linear bias", out)?;
        }
        let ys = Shape::try_new(s.n, out, 1, 1)?;
        let mut keep = Vec::new();
        let wp = self.p_addr(w, &mut keep)?;
        let bp = match b {
            Some(b) => self.p_addr(b, &mut keep)?,
            None => 0,
        };
        let y = self.out_t(ys)?;
        let ki = small("linear inputs", k)? as i64;
        // The features in NCHW order (PyTorch's flatten), whatever the layout.
        let xc = self.nchw_copy(x)?;
        let xp = xc.as_ref().map_or(self.addr(&x), |b| self.addr(b));
        // y[n][o] = sum_j x[n][j] W[o][j] + b[o]
        self.gemm(
            false,
            xp,
            (ki, 1),
            wp,
            (1, ki),
            self.addr(&y),
            bp,
            (s.n, out, k),
            false,
        )?;
        Ok(GpuTensor::wrap(y))
    }

    fn linear_bwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        dy: &GpuTensor<A>,
        dw: GArg<'_>,
        db: Option<GArg<'_>>,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let ds = dy.shape();
        let (k, out) = (s.sample_numel(), ds.c);
        same_shape(ds, Shape::new(s.n, out, 1, 1), "linear gradient")?;
        w.check("linear weight", out * k)?;
        dw.check("linear weight gradient", out * k)?;
        if let Some(db) = &db {
            db.check("linear bias gradient", out)?;
        }
        let mut keep = Vec::new();
        let wp = self.p_addr(w, &mut keep)?;
        let (ki, oi) = (
            small("linear inputs", k)? as i64,
            small("linear outputs", out)? as i64,
        );
        if let Some(db) = db {
            let t = self.g_start(db)?;
            self.channel_sum(self.addr(&dy), t.addr, ds, t.accumulate)?;
            self.g_finish(t)?;
        }
        // dW[o][j] += sum_n dy[n][o] x[n][j] (x's features in NCHW order)
        let xc = self.nchw_copy(x)?;
        let xp = xc.as_ref().map_or(self.addr(&x), |b| self.addr(b));
        let t = self.g_start(dw)?;
        self.gemm(
            true,
            self.addr(&dy),
            (1, oi),
            xp,
            (ki, 1),
            t.addr,
            0,
            (out, k, s.n),
            t.accumulate,
        )?;
        self.g_finish(t)?;
        // dx[n][j] = sum_o dy[n][o] W[o][j] (in NCHW order: into a scratch buffer converted
        // after when the layouts differ)
        let dx = self.out_t(s)?;
        let scratch = match xc {
            Some(_) => Some(self.out::<A>(s.numel())?),
            None => None,
        };
        let dxp = scratch.as_ref().map_or(self.addr(&dx), |b| self.addr(b));
        self.gemm(
            false,
            self.addr(&dy),
            (oi, 1),
            wp,
            (ki, 1),
            dxp,
            0,
            (s.n, k, out),
            false,
        )?;
        if let Some(b) = &scratch {
            self.relayout_into(self.addr(b), self.addr(&dx), s, true)?;
        }
        Ok(GpuTensor::wrap(dx))
    }

    /// `y = a[c] x + b[c]` (then ReLU) with `a`, `b` at device addresses (`a` = 0: a bias add).
    fn affine_at(&self, x: &GpuTensor<A>, ap: u64, bp: u64, relu: bool) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let y = self.out_t(s)?;
        let (xp, yp) = (self.addr(&x), self.addr(&y));
        let (total, c, hw, r, nhwc) = (
            s.numel() as u64,
            small("channels", s.c)?,
            s.hw() as u64,
            relu as u32,
            self.nhwc(),
        );
        let mut args = [
            arg(&xp),
            arg(&yp),
            arg(&ap),
            arg(&bp),
            arg(&total),
            arg(&c),
            arg(&hw),
            arg(&r),
            arg(&nhwc),
        ];
        // SAFETY: nn_affine_A(x, y, a, b, total, c, hw, relu, nhwc): x, y hold `total` elements of
        // A, b holds c floats and a does too or is null (the callers' contract).
        unsafe { self.launch_flat("nn_affine", s.numel(), &mut args)? };
        Ok(GpuTensor::wrap(y))
    }

    /// The SE op's forward with its weights in `dw` (pooled buffers, given back after).
    fn se_fwd_with(
        &self,
        dw: DeviceSeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
    ) -> Result<(GpuTensor<A>, CudaSeSaved)> {
        let config = dw.config();
        let mut y = self.out_t(x.shape())?;
        let (n, c, d) = (x.shape().n, config.channels, config.hidden);
        let bufs = [
            self.take_raw(n * c)?,
            self.take_raw(n * d)?,
            self.take_raw(n * d)?,
            self.take_raw(n * c)?,
        ];
        let mut sv = DeviceSeSaved::from_bufs(config, n, bufs)?;
        if self.poison {
            sv.poison(&self.dev)?;
        }
        se_gpu::forward_into(
            &self.dev,
            &dw,
            x.device_tensor(),
            residual.map(|r| r.device_tensor()),
            y.tensor_mut(),
            &mut sv,
            Default::default(),
        )?;
        self.give_back(dw.into_bufs());
        let saved = PooledSeSaved {
            saved: Some(sv),
            pool: self.pool.clone(),
        };
        Ok((GpuTensor::wrap(y), CudaSeSaved(Arc::new(saved))))
    }

    /// The SE op's backward with its weights in `dw` (given back after): `dx`, the parameter
    /// gradients in pooled buffers (the caller gives them back), `d residual`.
    fn se_bwd_with(
        &self,
        dw: DeviceSeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
        saved: &CudaSeSaved,
        dy: &GpuTensor<A>,
    ) -> Result<(GpuTensor<A>, DeviceSeGrads, Option<GpuTensor<A>>)> {
        let config = dw.config();
        let mut dx = self.out_t(x.shape())?;
        let mut dres = residual.map(|r| self.out_t(r.shape())).transpose()?;
        let (c, d, bias) = (config.channels, config.hidden, config.bias);
        let opt = |n: usize| bias.then(|| self.take_raw(n)).transpose();
        let bufs = [
            Some(self.take_raw(d * c)?),
            opt(d)?,
            Some(self.take_raw(c * d)?),
            opt(c)?,
        ];
        let mut grads = DeviceSeGrads::from_bufs(config, bufs)?;
        if self.poison {
            grads.poison(&self.dev)?;
        }
        se_gpu::backward_into(
            &self.dev,
            &dw,
            x.device_tensor(),
            residual.map(|r| r.device_tensor()),
            saved.0.get(),
            dy.device_tensor(),
            dx.tensor_mut(),
            false,
            &mut grads,
            dres.as_mut().map(|d| d.tensor_mut()),
            Default::default(),
        )?;
        self.give_back(dw.into_bufs());
        Ok((GpuTensor::wrap(dx), grads, dres.map(GpuTensor::wrap)))
    }

    /// SE weights copied (on the device) from parameters bound here into pooled buffers;
    /// `None` when none of them is bound, an error when only some are.
    fn se_bound_weights(
        &self,
        config: SeConfig,
        p: &SeLayerParams<'_, f32>,
    ) -> Result<Option<DeviceSeWeights>> {
        let all = [
            Some(p.fc1_weight),
            p.fc1_bias,
            Some(p.fc2_weight),
            p.fc2_bias,
        ];
        let mut stores = Vec::new();
        for q in all.iter().flatten() {
            stores.push(self.bound(q)?);
        }
        if stores.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut bufs: [Option<Buf<f32>>; 4] = [None, None, None, None];
        let mut it = stores.into_iter();
        for (slot, q) in bufs.iter_mut().zip(all) {
            if q.is_none() {
                continue;
            }
            let Some(Some(c)) = it.next() else {
                return Err(Error::Config("SE parameters are partly bound".into()));
            };
            let mut b = self.take_raw::<f32>(c.len)?;
            self.dev.copy(&c.value, 0, &mut b, 0, c.len)?;
            *slot = Some(b);
        }
        DeviceSeWeights::from_bufs(config, bufs).map(Some)
    }

    /// `dst = (accumulate ? dst : 0) + src` over `n` floats (device addresses).
    fn add_into(&self, dst: u64, src: u64, n: usize, accumulate: bool) -> Result<()> {
        let (len, splits, acc) = (n as u64, 1u32, accumulate as u32);
        let mut args = [arg(&src), arg(&dst), arg(&len), arg(&splits), arg(&acc)];
        // SAFETY: nn_sum_splits_f32(partial, out, len, splits = 1, accumulate): src and dst
        // hold n floats each and do not overlap (the callers' buffers).
        unsafe {
            self.launch(
                "nn_sum_splits_f32",
                (blocks(n, THREADS as usize), 1, 1),
                &mut args,
            )
        }
    }

    // ------------------------------------------------------------------ bound parameters

    /// This backend's storage of `p`, if `p` is bound here; an error if it is bound to another
    /// backend.
    fn bound<'a>(&self, p: &'a Param<f32>) -> Result<Option<&'a CudaParam>> {
        let Some(store) = p.device_store() else {
            return Ok(None);
        };
        match store.as_any().downcast_ref::<CudaParam>() {
            Some(c) if c.owner == self.id => Ok(Some(c)),
            _ => Err(Error::Config(
                "a parameter is bound to another backend; unbind the network first".into(),
            )),
        }
    }

    /// A parameter operand: the bound storage's address, or the host values.
    fn p_arg<'a>(&self, p: &'a Param<f32>, what: &str) -> Result<PArg<'a>> {
        Ok(match self.bound(p)? {
            Some(c) => PArg::Dev {
                addr: c.value_addr(&self.dev)?,
                len: c.len,
            },
            None => PArg::Host(p.values(what)?),
        })
    }

    /// A gradient destination: the bound storage's gradient (allocated zeroed on first use;
    /// written over after a zero_grad), or the host gradient.
    fn g_arg<'a>(&self, p: &'a mut Param<f32>) -> Result<GArg<'a>> {
        if p.is_bound() {
            // Downgrade the borrow for 'a (the branch returns, so `p` is not used again).
            let p: &'a Param<f32> = p;
            let c = self
                .bound(p)?
                .ok_or_else(|| Error::Config("unbound".into()))?;
            let (addr, accumulate) = c.grad_target(&self.dev)?;
            return Ok(GArg::Dev {
                addr,
                len: c.len,
                accumulate,
                zeroed: &c.grad_zero,
            });
        }
        Ok(GArg::Host(p.grad_mut()))
    }

    /// Operand and gradient destination of a weight in one backward pass.
    fn wg_args<'a>(&self, w: &'a mut Param<f32>, what: &str) -> Result<(PArg<'a>, GArg<'a>)> {
        if w.is_bound() {
            let w: &'a Param<f32> = w;
            let c = self
                .bound(w)?
                .ok_or_else(|| Error::Config("unbound".into()))?;
            let v = c.value_addr(&self.dev)?;
            let (addr, accumulate) = c.grad_target(&self.dev)?;
            let dev_arg = GArg::Dev {
                addr,
                len: c.len,
                accumulate,
                zeroed: &c.grad_zero,
            };
            return Ok((
                PArg::Dev {
                    addr: v,
                    len: c.len,
                },
                dev_arg,
            ));
        }
        let (v, g) = w.value_and_grad(what)?;
        Ok((PArg::Host(v), GArg::Host(g)))
    }

    /// cuDNN with the workspace bytes of `passes` when it runs this convolution: `None` for the
    /// own kernels (no cuDNN, or with `auto` none of its acceptable algorithms fits; then
    /// nothing has run yet).
    fn dnn_for(
        &self,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        passes: &[PassKind],
    ) -> Result<Option<(&Dnn, Vec<usize>)>> {
        let Some(d) = &self.dnn else {
            return Ok(None);
        };
        match d.prepare(&self.dev, xs, ys, g, self.layout, passes) {
            Ok(ws) => Ok(Some((d, ws))),
            Err(Error::Cudnn(_)) if self.dnn_auto => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Runs one cuDNN convolution pass with a workspace of `bytes` from the pool.
    fn run_dnn(
        &self,
        d: &Dnn,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        pass: Pass,
        bytes: usize,
    ) -> Result<()> {
        let ws = if bytes > 0 {
            Some(self.take::<f32>(bytes.div_ceil(4))?)
        } else {
            None
        };
        let wp = ws.as_ref().map_or(0, |b| self.addr(b));
        // SAFETY: the callers pass addresses of tensors of xs / ys in this backend's layout and
        // of g's weight (KCRS with NCHW, KRSC with NHWC: dnn_weight, and the filter pass's
        // temporary), in A (the Dnn of a Cuda<A> is opened in A's mode), as `Dnn::run` requires; the
        // workspace holds at least `bytes` bytes.
        unsafe { d.run(&self.dev, xs, ys, g, self.layout, pass, wp, bytes) }
    }

    fn conv_params(&self, g: &ConvGeom, xs: Shape, ys: Shape) -> Result<NnConvParams> {
        // Every size, and the products the kernels form, fits a 32-bit signed integer.
        small(
            "output pixels x batch",
            xs.n.saturating_mul(ys.h).saturating_mul(ys.w),
        )?;
        small(
            "padded input pixels",
            xs.h.saturating_add(g.padding)
                .saturating_mul(xs.w.saturating_add(g.padding)),
        )?;
        small(
            "output extent",
            (ys.h.max(ys.w) + 1)
                .saturating_mul(g.stride)
                .saturating_add(g.kernel),
        )?;
        small(
            "output channels per group x taps",
            g.out_per_group()
                .saturating_mul(g.kernel)
                .saturating_mul(g.kernel),
        )?;
        small("groups", g.groups)?;
        if g.groups > self.max_yz() {
            return Err(Error::Shape(format!(
                "{} convolution groups exceed the CUDA grid",
                g.groups
            )));
        }
        Ok(NnConvParams {
            n: small("batch", xs.n)?,
            c: small("input channels", xs.c)?,
            h: small("input height", xs.h)?,
            w: small("input width", xs.w)?,
            oc: small("output channels", ys.c)?,
            oh: small("output height", ys.h)?,
            ow: small("output width", ys.w)?,
            k: small("kernel", g.kernel)?,
            stride: small("stride", g.stride)?,
            pad: small("padding", g.padding)?,
            groups: small("groups", g.groups)?,
            icg: small("input channels per group", g.in_per_group())?,
            ocg: small("output channels per group", g.out_per_group())?,
            kdepth: small(
                "convolution depth",
                g.in_per_group()
                    .saturating_mul(g.kernel)
                    .saturating_mul(g.kernel),
            )?,
            flags: self.conv_layout_flag(),
            reserved: 0,
        })
    }

    /// How many ways to split the weight gradient's depth `k` (samples x output pixels), and
    /// the depth per split (a multiple of the 16-deep K tile): enough blocks for twice the
    /// SMs, each split at least 512 deep.
    fn weight_grad_splits(&self, g: &ConvGeom, k: usize) -> (u32, u32) {
        const TK: usize = 16;
        const MIN_DEPTH: usize = 512;
        let tiles = (g.in_per_group() * g.kernel * g.kernel).div_ceil(TILE)
            * g.out_per_group().div_ceil(TILE)
            * g.groups;
        let want = (2 * self.dev.info().sm_count as usize).div_ceil(tiles.max(1));
        let most = (k / MIN_DEPTH).max(1);
        let most = most.min(self.max_yz() / g.groups.max(1)).max(1);
        let splits = want.clamp(1, most);
        let kps = k.div_ceil(splits).div_ceil(TK) * TK;
        let splits = k.div_ceil(kps.max(1)).max(1);
        (splits as u32, kps as u32)
    }

    /// BatchNorm backward, with `relu_y` the output of a fused ReLU (masks dy).
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        same_shape(dy.shape(), s, "batch norm gradient")?;
        check_bn_lens(
            s.c,
            [
                mean.len(),
                invstd.len(),
                gamma.len(),
                dgamma.len(),
                dbeta.len(),
            ],
        )?;
        let (mb, ib, gb) = (self.up(mean)?, self.up(invstd)?, self.up(gamma)?);
        let (dgb, dbb) = (self.up(dgamma)?, self.up(dbeta)?);
        let per_channel = [
            self.addr(&mb),
            self.addr(&ib),
            self.addr(&gb),
            self.addr(&dgb),
            self.addr(&dbb),
        ];
        let dx = self.bn_bwd_at(x, relu_y, dy, per_channel, batch_stats)?;
        dgamma.copy_from_slice(&self.down(&dgb, s.c)?);
        dbeta.copy_from_slice(&self.down(&dbb, s.c)?);
        Ok(dx)
    }

    /// The BatchNorm backward kernel on device addresses `[mean, invstd, gamma, dgamma,
    /// dbeta]` (c elements each; dgamma and dbeta are added to).
    fn bn_bwd_at(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        per_channel: [u64; 5],
        batch_stats: bool,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        same_shape(dy.shape(), s, "batch norm gradient")?;
        if let Some(y) = relu_y {
            same_shape(y.shape(), s, "batch norm fused ReLU output")?;
        }
        let dx = self.out_t(s)?;
        let [mp, ip, gp, dgp, dbp] = per_channel;
        if self.layout == Layout::Nhwc {
            return self.bn_bwd_nhwc(x, relu_y, dy, per_channel, batch_stats, dx);
        }
        let ptrs = [
            self.addr(&x),
            self.addr(&dy),
            relu_y.map_or(0, |y| self.addr(&y)),
            mp,
            ip,
            gp,
            dgp,
            dbp,
            self.addr(&dx),
        ];
        let (n, c, hw, bs) = (
            small("batch", s.n)?,
            small("channels", s.c)?,
            s.hw() as u64,
            batch_stats as u32,
        );
        let mut args = [
            arg(&ptrs[0]),
            arg(&ptrs[1]),
            arg(&ptrs[2]),
            arg(&ptrs[3]),
            arg(&ptrs[4]),
            arg(&ptrs[5]),
            arg(&ptrs[6]),
            arg(&ptrs[7]),
            arg(&ptrs[8]),
            arg(&n),
            arg(&c),
            arg(&hw),
            arg(&bs),
        ];
        // SAFETY: nn_bn_bwd_A(x, dy, relu_y, mean, invstd, gamma, dgamma, dbeta, dx, n, c,
        // hw, batch_stats), NCHW: x, dy, dx (and relu_y) hold s (checked above); the per-channel
        // buffers hold c elements each (the callers' contract).
        unsafe { self.launch(&Self::k("nn_bn_bwd"), (c.max(1), 1, 1), &mut args)? };
        Ok(GpuTensor::wrap(dx))
    }

    /// BatchNorm backward for NHWC activations: split partial sums of d and d xhat, added in
    /// order into f64 per-channel sums (and into dbeta, dgamma), then dx elementwise.
    fn bn_bwd_nhwc(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        [mp, ip, gp, dgp, dbp]: [u64; 5],
        batch_stats: bool,
        dx: Pooled<A>,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let rows = s.n * s.hw();
        let (rps, splits) = self.nhwc_splits(rows);
        let part = self.out::<f64>(2 * splits as usize * s.c)?;
        let sd = self.out::<f64>(s.c)?;
        let sdx = self.out::<f64>(s.c)?;
        let (xp, dyp, ryp, pp) = (
            self.addr(&x),
            self.addr(&dy),
            relu_y.map_or(0, |y| self.addr(&y)),
            self.addr(&part),
        );
        let (rows_u, c) = (rows as u64, small("channels", s.c)?);
        let mut args = [
            arg(&xp),
            arg(&dyp),
            arg(&ryp),
            arg(&mp),
            arg(&ip),
            arg(&pp),
            arg(&rows_u),
            arg(&c),
            arg(&rps),
            arg(&splits),
        ];
        // SAFETY: nn_nhwc_bn_bwd_partial_A(x, dy, relu_y, mean, invstd, part, rows, c, rps,
        // splits): x, dy (and relu_y) hold rows * c elements of A (shapes checked by the
        // caller), mean and invstd c doubles, part 2 * splits * c doubles.
        unsafe {
            self.launch(
                &Self::k("nn_nhwc_bn_bwd_partial"),
                (s.c.div_ceil(32) as u32, splits, 1),
                &mut args,
            )?
        };
        let second = pp + (splits as usize * s.c * size_of::<f64>()) as u64;
        self.nhwc_finish(pp, splits, s.c, 1.0, self.addr(&sd), dbp, true)?;
        self.nhwc_finish(second, splits, s.c, 1.0, self.addr(&sdx), dgp, true)?;
        let (sdp, sdxp, dxp) = (self.addr(&sd), self.addr(&sdx), self.addr(&dx));
        let (total, m, bs) = (s.numel() as u64, rows as f64, batch_stats as u32);
        let mut args = [
            arg(&xp),
            arg(&dyp),
            arg(&ryp),
            arg(&mp),
            arg(&ip),
            arg(&gp),
            arg(&sdp),
            arg(&sdxp),
            arg(&dxp),
            arg(&total),
            arg(&c),
            arg(&m),
            arg(&bs),
        ];
        // SAFETY: nn_nhwc_bn_bwd_apply_A(x, dy, relu_y, mean, invstd, gamma, sd, sdx, dx,
        // total, c, m, batch_stats): x, dy, relu_y and dx hold total elements of A, the
        // per-channel buffers c each.
        unsafe { self.launch_flat("nn_nhwc_bn_bwd_apply", s.numel(), &mut args)? };
        Ok(GpuTensor::wrap(dx))
    }

    /// Rows per split and splits of the NHWC per-channel reductions over `rows` rows (pixels
    /// of every sample): splits of 512 rows, fewer where the grid would overflow. A function
    /// of the shape only (below the emulator's smaller grid limit, 512 Ki rows: beyond it the
    /// emulator splits differently from a GPU), so results do not depend on the device.
    fn nhwc_splits(&self, rows: usize) -> (u64, u32) {
        const MIN_ROWS: usize = 512;
        let splits = rows
            .div_ceil(MIN_ROWS)
            .clamp(1, MAX_GRID_YZ.min(self.max_yz()));
        let rps = rows.div_ceil(splits).max(1);
        (rps as u64, rows.div_ceil(rps).max(1) as u32)
    }

    /// Per-channel partial sums over split rows of the NHWC activation of shape `s` at `x` (of
    /// squared deviations from the f64 `mean` at that address, when not 0): a pooled buffer of
    /// splits * c doubles, and the splits.
    fn nhwc_partial(&self, x: u64, mean: u64, s: Shape) -> Result<(PoolBuf<f64>, u32)> {
        let rows = s.n * s.hw();
        let (rps, splits) = self.nhwc_splits(rows);
        let part = self.out::<f64>(splits as usize * s.c)?;
        let (pp, rows, c) = (self.addr(&part), rows as u64, small("channels", s.c)?);
        let mut args = [
            arg(&x),
            arg(&mean),
            arg(&pp),
            arg(&rows),
            arg(&c),
            arg(&rps),
        ];
        // SAFETY: nn_nhwc_partial_A(x, mean, part, rows, c, rps): x holds rows * c elements of
        // A, mean c doubles (or is null), part splits * c doubles; the grid covers c / 32 x
        // splits blocks of rps rows.
        unsafe {
            self.launch(
                &Self::k("nn_nhwc_partial"),
                (s.c.div_ceil(32) as u32, splits, 1),
                &mut args,
            )?
        };
        Ok((part, splits))
    }

    /// Adds the splits of an NHWC partial-sum buffer at `part` in order: `out_d` (f64, divided
    /// by `div`) and / or `out_f` (f32, added when `accumulate`), each skipped at address 0.
    #[allow(clippy::too_many_arguments)]
    fn nhwc_finish(
        &self,
        part: u64,
        splits: u32,
        c: usize,
        div: f64,
        out_d: u64,
        out_f: u64,
        accumulate: bool,
    ) -> Result<()> {
        let (cu, acc) = (small("channels", c)?, accumulate as u32);
        let mut args = [
            arg(&part),
            arg(&splits),
            arg(&cu),
            arg(&div),
            arg(&out_d),
            arg(&out_f),
            arg(&acc),
        ];
        // SAFETY: nn_nhwc_finish(part, splits, c, div, out_d, out_f, accumulate): part holds
        // splits * c doubles, out_d c doubles and out_f c floats where not null.
        unsafe {
            self.launch(
                "nn_nhwc_finish",
                (blocks(c, THREADS as usize), 1, 1),
                &mut args,
            )
        }
    }

    /// Per-channel batch mean and biased variance (f64) of `x`, left on the device.
    fn bn_stats_dev(&self, x: &GpuTensor<A>) -> Result<(PoolBuf<f64>, PoolBuf<f64>)> {
        let s = x.shape();
        let mean = self.out::<f64>(s.c)?;
        let var = self.out::<f64>(s.c)?;
        let (xp, mp, vp) = (self.addr(&x), self.addr(&mean), self.addr(&var));
        if self.layout == Layout::Nhwc {
            // Two passes, as the NCHW kernel: the mean, then squared deviations from it.
            let m = (s.n * s.hw()) as f64;
            let (part, splits) = self.nhwc_partial(xp, 0, s)?;
            self.nhwc_finish(self.addr(&part), splits, s.c, m, mp, 0, false)?;
            let (part, splits) = self.nhwc_partial(xp, mp, s)?;
            self.nhwc_finish(self.addr(&part), splits, s.c, m, vp, 0, false)?;
            return Ok((mean, var));
        }
        let (n, c, hw) = (small("batch", s.n)?, small("channels", s.c)?, s.hw() as u64);
        let mut args = [arg(&xp), arg(&mp), arg(&vp), arg(&n), arg(&c), arg(&hw)];
        // SAFETY: nn_bn_stats_A(x, mean, var, n, c, hw): x holds s (NCHW), mean and var c
        // doubles.
        unsafe { self.launch(&Self::k("nn_bn_stats"), (c.max(1), 1, 1), &mut args)? };
        Ok((mean, var))
    }

    /// Samples per launch so that samples x groups fits grid.z.
    fn sample_chunk(&self, g: &ConvGeom) -> usize {
        (self.max_yz() / g.groups).max(1)
    }

    /// The device's grid.y / grid.z limit.
    fn max_yz(&self) -> usize {
        (self.dev.info().max_grid_yz as usize).min(MAX_GRID_YZ)
    }

    #[allow(clippy::too_many_arguments)]
    /// `C (+)= A B (+ bias)`. With `wgrad`, A and B are activations and C an f32 parameter
    /// gradient (`nn_gemm_wgrad`); otherwise A and C are activations and B f32 parameters
    /// (`nn_gemm_act`). All f32 with f32 activations.
    fn gemm(
        &self,
        wgrad: bool,
        a: u64,
        (sa_m, sa_k): (i64, i64),
        b: u64,
        (sb_k, sb_n): (i64, i64),
        c: u64,
        bias: u64,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let (mu, nu, ku) = (
            small("GEMM rows", m)?,
            small("GEMM columns", n)?,
            small("GEMM depth", k)?,
        );
        let acc = accumulate as u32;
        let mut args = [
            arg(&a),
            arg(&sa_m),
            arg(&sa_k),
            arg(&b),
            arg(&sb_k),
            arg(&sb_n),
            arg(&c),
            arg(&bias),
            arg(&mu),
            arg(&nu),
            arg(&ku),
            arg(&acc),
        ];
        let grid = (grid_x(n, TILE)?, grid_y(m, TILE, self.max_yz())?, 1);
        let name = Self::k(if wgrad {
            "nn_gemm_wgrad"
        } else {
            "nn_gemm_act"
        });
        // SAFETY: nn_gemm_{act,wgrad}_A(A, sa_m, sa_k, B, sb_k, sb_n, C, bias, M, N, K,
        // accumulate); the callers pass buffers of at least M*K (A), K*N (B), M*N (C) and N
        // (bias) elements of the kernel's types in the strides given.
        unsafe { self.launch(&name, grid, &mut args) }
    }

    /// out[c] (+)= sum over samples and positions of a (per-channel sums of an activation of
    /// shape `s` in this backend's layout).
    fn channel_sum(&self, a: u64, out: u64, s: Shape, accumulate: bool) -> Result<()> {
        if self.layout == Layout::Nhwc {
            let (part, splits) = self.nhwc_partial(a, 0, s)?;
            return self.nhwc_finish(self.addr(&part), splits, s.c, 1.0, 0, out, accumulate);
        }
        let (n, c, hw, acc) = (
            small("batch", s.n)?,
            small("channels", s.c)?,
            s.hw() as u64,
            accumulate as u32,
        );
        let mut args = [arg(&a), arg(&out), arg(&n), arg(&c), arg(&hw), arg(&acc)];
        // SAFETY: nn_channel_sum_A(a, out, n, c, hw, accumulate); a holds s.numel() elements
        // of A (NCHW), out s.c floats.
        unsafe { self.launch(&Self::k("nn_channel_sum"), (c.max(1), 1, 1), &mut args) }
    }

    fn pointwise(
        &self,
        op: u32,
        a: &GpuTensor<A>,
        b: Option<&GpuTensor<A>>,
    ) -> Result<GpuTensor<A>> {
        let s = a.shape();
        let total = s.numel() as u64;
        let y = self.out_t(s)?;
        let (ap, bp, yp) = (self.addr(&a), b.map_or(0, |b| self.addr(&b)), self.addr(&y));
        let mut args = [arg(&op), arg(&ap), arg(&bp), arg(&yp), arg(&total)];
        // SAFETY: nn_pointwise_A(op, a, b, y, total); a and y hold `total` floats, and b does
        // for the ops that read it (callers pass b for exactly those).
        unsafe { self.launch_flat("nn_pointwise", s.numel(), &mut args)? };
        Ok(GpuTensor::wrap(y))
    }

    fn pool_args(g: &PoolGeom, xs: Shape, ys: Shape) -> Result<[u32; 8]> {
        Ok([
            small("planes", xs.n * xs.c)?,
            small("pool input height", xs.h)?,
            small("pool input width", xs.w)?,
            small("pool output height", ys.h)?,
            small("pool output width", ys.w)?,
            small("pool kernel", g.kernel)?,
            small("pool stride", g.stride)?,
            small("pool padding", g.padding)?,
        ])
    }

    /// The grid of a pooling kernel over the pixels of `s` (nc planes): (pixels, planes) for
    /// NCHW, flat for NHWC (the kernels' for_each_pixel).
    fn pool_grid(&self, s: Shape, nc: u32) -> Result<(u32, u32, u32)> {
        Ok(match self.layout {
            Layout::Nchw => (
                grid_x(s.hw(), THREADS as usize)?,
                (nc as usize).clamp(1, self.max_yz()) as u32,
                1,
            ),
            Layout::Nhwc => (blocks(s.numel(), THREADS as usize), 1, 1),
        })
    }

    fn check_pool_sizes(xs: Shape, ys: Shape, g: &PoolGeom) -> Result<()> {
        small("pool input plane", xs.hw())?;
        small("pool output plane", ys.hw())?;
        small(
            "pool extent",
            (ys.h.max(ys.w) + 1)
                .saturating_mul(g.stride)
                .saturating_add(g.kernel)
                .saturating_add(xs.h.max(xs.w))
                .saturating_add(g.padding),
        )?;
        Ok(())
    }
}

const EW_RELU: u32 = 0;
const EW_RELU_BWD: u32 = 1;
const EW_ADD: u32 = 2;
const EW_ADD_RELU: u32 = 3;

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
        let mut args = [arg(&ap), arg(&bp), arg(&yp), arg(&total)];
        // SAFETY: nn_mask_A(a, m, y, n): x and y hold `total` elements of A, the mask `total`
        // floats.
        unsafe { self.launch_flat("nn_mask", s.numel(), &mut args)? };
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
            let mut args = [arg(&gp), arg(&n), arg(&factor), arg(&fp)];
            // SAFETY: nn_unscale_f32(g, n, factor, flag): g is this parameter's bound gradient
            // of n floats, flag one u32.
            unsafe {
                self.launch(
                    "nn_unscale_f32",
                    (blocks(c.len, THREADS as usize), 1, 1),
                    &mut args,
                )?
            };
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
        let mut args = [
            arg(&wp),
            arg(&gp),
            arg(&mp),
            arg(&len),
            arg(&lr),
            arg(&momentum),
            arg(&weight_decay),
            arg(&first),
        ];
        // SAFETY: nn_sgd_f32(w, grad, buf, n, lr, momentum, wd, first): w, buf (and grad unless
        // null) hold n floats: the bound storage of this parameter.
        unsafe { self.launch("nn_sgd_f32", (blocks(n, THREADS as usize), 1, 1), &mut args)? };
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
        let mut args = [
            arg(&ptrs[0]),
            arg(&ptrs[1]),
            arg(&ptrs[2]),
            arg(&ptrs[3]),
            arg(&ptrs[4]),
            arg(&ptrs[5]),
            arg(&ptrs[6]),
            arg(&ptrs[7]),
            arg(&ptrs[8]),
            arg(&ptrs[9]),
            arg(&cc),
            arg(&run.eps),
            arg(&run.momentum),
            arg(&unbias),
            arg(&train),
        ];
        // SAFETY: nn_bn_prepare_f32(bmean, bvar, gamma, beta, rm, rv, mean_out, invstd_out, a,
        // b, c, eps, mo, unbias, train): every per-channel buffer holds c elements (the bound
        // storages were checked above); bmean / bvar are read only in training and mean_out
        // written only outside it, so the null ones are never touched.
        unsafe {
            self.launch(
                "nn_bn_prepare_f32",
                (blocks(c, THREADS as usize), 1, 1),
                &mut args,
            )?
        };
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
        let mut args = [
            arg(&xp),
            arg(&yp),
            arg(&ap),
            arg(&nc),
            arg(&c),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&nhwc),
        ];
        let grid = self.pool_grid(ys, nc)?;
        // SAFETY: nn_maxpool_fwd_A(x, y, arg, nc, c, h, w, oh, ow, k, s, pad, nhwc): x holds
        // xs, y and arg hold ys (nc = n * c planes).
        unsafe { self.launch(&Self::k("nn_maxpool_fwd"), grid, &mut args)? };
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
        let mut args = [
            arg(&dyp),
            arg(&ap),
            arg(&dxp),
            arg(&nc),
            arg(&c),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&nhwc),
        ];
        // SAFETY: nn_maxpool_bwd_A(dy, arg, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc): dy and
        // arg hold ys elements (shapes checked against the indices'), dx input; the kernel
        // only compares index values, never writes through them.
        unsafe {
            self.launch(
                &Self::k("nn_maxpool_bwd"),
                self.pool_grid(input, nc)?,
                &mut args,
            )?
        };
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
        let mut args = [
            arg(&xp),
            arg(&yp),
            arg(&nc),
            arg(&c),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&inc),
            arg(&nhwc),
        ];
        let grid = self.pool_grid(ys, nc)?;
        // SAFETY: nn_avgpool_fwd_A(x, y, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc): x holds
        // xs, y ys.
        unsafe { self.launch(&Self::k("nn_avgpool_fwd"), grid, &mut args)? };
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
        let mut args = [
            arg(&dyp),
            arg(&qp),
            arg(&nc),
            arg(&c),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&inc),
            arg(&nhwc),
        ];
        // SAFETY: nn_avgpool_div_A(dy, q, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc): dy holds
        // ys elements of A, q ys floats.
        unsafe {
            self.launch(
                &Self::k("nn_avgpool_div"),
                self.pool_grid(ys, nc)?,
                &mut args,
            )?
        };
        let mut args = [
            arg(&qp),
            arg(&dxp),
            arg(&nc),
            arg(&c),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&nhwc),
        ];
        // SAFETY: nn_avgpool_bwd_A(q, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc): q holds ys,
        // dx input.
        unsafe {
            self.launch(
                &Self::k("nn_avgpool_bwd"),
                self.pool_grid(input, nc)?,
                &mut args,
            )?
        };
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
        let mut args = [arg(&xp), arg(&yp), arg(&nc), arg(&c), arg(&hw), arg(&nhwc)];
        let grid = match self.layout {
            Layout::Nchw => ((planes as u32).max(1), 1, 1),
            Layout::Nhwc => (blocks(planes, THREADS as usize), 1, 1),
        };
        // SAFETY: nn_gap_fwd_A(x, y, nc, c, hw, nhwc): x holds planes * hw elements, y planes.
        unsafe { self.launch(&Self::k("nn_gap_fwd"), grid, &mut args)? };
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
        let mut args = [
            arg(&dyp),
            arg(&dxp),
            arg(&total),
            arg(&c),
            arg(&hw),
            arg(&nhwc),
        ];
        // SAFETY: nn_gap_bwd_A(dy, dx, total, c, hw, nhwc): dy holds total / hw elements, dx
        // total.
        unsafe { self.launch_flat("nn_gap_bwd", input.numel(), &mut args)? };
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
