//! cuDNN convolutions for the CUDA backend ([`super::Cuda`]): forward, input gradient and
//! weight gradient through cuDNN's legacy convolution API, loaded at run time (cudarc's dynamic
//! loading), so the crate builds and runs without it and falls back to its own kernels.
//!
//! Four modes ([`DnnMode`]). With f32 activations [`ConvEngine::Cudnn`] is exact f32: the
//! descriptors ask for FMA math (cuDNN would otherwise use TF32 tensor cores for f32 data on
//! Ampere and later, rounding operands to 10 mantissa bits). [`ConvEngine::CudnnTf32`] allows
//! those tensor cores, as PyTorch does for f32 convolutions by default; it keeps f16's 10
//! mantissa bits and is checked against f16's tolerance. With bf16 or f16 activations
//! [`ConvEngine::Cudnn`] takes tensors and weights of that type, f32 compute and tensor-op
//! math (senet's kernels need compute capability 8.0 anyway, where both run on tensor cores). Both take only deterministic GEMM-family or direct algorithms (FFT and Winograd
//! transforms lose accuracy), so runs repeat bit for bit. Algorithms come from cuDNN's
//! heuristics (`..._v7`), with PyTorch's deterministic choices as the fallback, once per input
//! shape and geometry.
//!
//! Every cuDNN function used is looked up when the library is opened, so a library lacking one
//! is an error there rather than a panic inside cudarc later; the bindings are cuDNN 9's, so an
//! older library is refused. Enum values cuDNN writes into memory (the heuristics' results) are
//! read as plain integers, never as Rust enums. Nothing here runs on the kernel emulator.

use super::ConvGeom;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::{Layout, Shape};
use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::CudaStream;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// Which code runs the CUDA backend's convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvEngine {
    /// senet's implicit-GEMM kernels (kernels/nn_conv.cu): always available, and what the kernel
    /// emulator runs.
    Own,
    /// cuDNN, loaded at run time, deterministic algorithms: exact f32 (FMA math) with f32
    /// activations; bf16 / f16 tensors with f32 accumulation with narrow ones.
    Cudnn,
    /// cuDNN with TF32 tensor cores allowed (PyTorch's default for f32 convolutions):
    /// deterministic algorithms, f16-like accuracy.
    CudnnTf32,
    /// im2col and cuBLAS GEMMs (f32 compute; tensor cores for bf16 / f16), the engine where
    /// cuDNN is absent; on the kernel emulator senet's column-major GEMM stands in for cuBLAS,
    /// so the path (im2col, every GEMM's arguments, col2im) is checked without a GPU.
    Cublas,
}

impl fmt::Display for ConvEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConvEngine::Own => "own",
            ConvEngine::Cudnn => "cudnn",
            ConvEngine::CudnnTf32 => "cudnn-tf32",
            ConvEngine::Cublas => "cublas",
        })
    }
}

/// A request for a [`ConvEngine`]: one of them, or `auto` (exact cuDNN where it loads on a GPU
/// and has an algorithm for the convolution; im2col + cuBLAS on a GPU without cuDNN; else the
/// own kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConvChoice {
    /// [`ConvEngine::Cudnn`] on a GPU with the library on the loader's path, else
    /// [`ConvEngine::Cublas`] on a GPU with cuBLAS, else [`ConvEngine::Own`]; a convolution
    /// cuDNN has no acceptable algorithm for runs on the own kernels.
    #[default]
    Auto,
    /// This engine, or an error when it cannot run.
    Only(ConvEngine),
}

impl FromStr for ConvChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(ConvChoice::Auto),
            "own" | "senet" => Ok(ConvChoice::Only(ConvEngine::Own)),
            "cudnn" => Ok(ConvChoice::Only(ConvEngine::Cudnn)),
            "cudnn-tf32" | "tf32" => Ok(ConvChoice::Only(ConvEngine::CudnnTf32)),
            "cublas" | "im2col" => Ok(ConvChoice::Only(ConvEngine::Cublas)),
            other => Err(Error::Config(format!(
                "unknown convolution engine `{other}` (expected auto, own, cudnn, cudnn-tf32 or \
                 cublas)"
            ))),
        }
    }
}

impl ConvChoice {
    /// The choice named by the `SENET_CONV` environment variable (`auto` when unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var("SENET_CONV") {
            Ok(v) => v
                .parse()
                .map_err(|e| Error::Config(format!("SENET_CONV: {e}"))),
            Err(_) => Ok(ConvChoice::Auto),
        }
    }
}

fn status(what: &str) -> impl FnOnce(dnn::CudnnError) -> Error + '_ {
    move |e| Error::Cudnn(format!("{what}: {e:?}"))
}

/// Converts a size for a descriptor (cuDNN takes C ints).
fn cint(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds cuDNN's 32-bit sizes")))
}

/// Every cuDNN function this module calls.
const SYMBOLS: &[&str] = &[
    "cudnnGetVersion",
    "cudnnOpsVersionCheck",
    "cudnnCnnVersionCheck",
    "cudnnCreate",
    "cudnnDestroy",
    "cudnnSetStream",
    "cudnnCreateTensorDescriptor",
    "cudnnSetTensor4dDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnCreateFilterDescriptor",
    "cudnnSetFilter4dDescriptor",
    "cudnnDestroyFilterDescriptor",
    "cudnnCreateConvolutionDescriptor",
    "cudnnSetConvolution2dDescriptor",
    "cudnnSetConvolutionMathType",
    "cudnnSetConvolutionGroupCount",
    "cudnnDestroyConvolutionDescriptor",
    "cudnnGetConvolution2dForwardOutputDim",
    "cudnnGetConvolutionForwardAlgorithm_v7",
    "cudnnGetConvolutionForwardWorkspaceSize",
    "cudnnConvolutionForward",
    "cudnnGetConvolutionBackwardDataAlgorithm_v7",
    "cudnnGetConvolutionBackwardDataWorkspaceSize",
    "cudnnConvolutionBackwardData",
    "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
    "cudnnGetConvolutionBackwardFilterWorkspaceSize",
    "cudnnConvolutionBackwardFilter",
];

/// cuDNN's version number (e.g. 91000 for 9.10.0) when a usable library loads, else why not:
/// it must be on the loader's path, be cuDNN 9 (the bindings' version), have every function
/// senet calls, and pass its own sub-library checks. Needs no GPU.
pub fn cudnn_version() -> std::result::Result<usize, String> {
    // Probed by senet, not cudarc (which panics on a missing library).
    let lib = crate::cuda::libs::open("cudnn")
        .ok_or_else(|| "libcudnn.so.9 is not on the library path".to_string())?;
    if let Some(name) = crate::cuda::libs::missing_symbol(&lib, SYMBOLS) {
        return Err(format!("the cuDNN library found lacks {name}"));
    }
    let version = dnn::get_version();
    if version < 90000 {
        return Err(format!(
            "cuDNN {} is older than 9.0 (senet's bindings are cuDNN 9's)",
            version_string(version)
        ));
    }
    for check in ["cudnnOpsVersionCheck", "cudnnCnnVersionCheck"] {
        // SAFETY: the symbol exists (checked above); it takes nothing and returns a
        // cudnnStatus_t, a C enum read here as its integer.
        let f = unsafe { lib.get::<unsafe extern "C" fn() -> u32>(check.as_bytes()) }
            .map_err(|e| format!("{check}: {e}"))?;
        // SAFETY: as above.
        let code = unsafe { f() };
        if code != 0 {
            return Err(format!(
                "{check} returned status {code}: the cuDNN install is incomplete"
            ));
        }
    }
    Ok(version)
}

/// A cuDNN version number as `major.minor.patch` (9.x numbers them `M*10000 + m*100 + p`,
/// 8.x `M*1000 + m*100 + p`).
pub fn version_string(v: usize) -> String {
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_tensor_descriptor and destroyed only here.
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_filter_descriptor and destroyed only here.
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_convolution_descriptor and destroyed only here.
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

/// What a [`Dnn`] computes in: exact f32 (FMA math), f32 with TF32 tensor cores, or bf16 data
/// (tensors and weights in bf16, f32 accumulation, tensor cores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DnnMode {
    /// f32 data, FMA math.
    Exact,
    /// f32 data, TF32 tensor-op math allowed.
    Tf32,
    /// bf16 data with f32 compute, tensor-op math.
    Bf16,
    /// f16 data with f32 compute, tensor-op math.
    F16,
}

impl DnnMode {
    /// The descriptors' data type.
    fn data_type(self) -> sys::cudnnDataType_t {
        match self {
            DnnMode::Bf16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            DnnMode::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
            _ => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        }
    }

    /// Whether tensor-op math is allowed.
    fn tensor_ops(self) -> bool {
        self != DnnMode::Exact
    }
}

/// cuDNN's name for a layout (tensors, and filters: KCRS with NCHW, KRSC with NHWC).
fn format(layout: Layout) -> sys::cudnnTensorFormat_t {
    match layout {
        Layout::Nchw => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

fn tensor_desc(
    what: &str,
    s: Shape,
    dtype: sys::cudnnDataType_t,
    layout: Layout,
) -> Result<TensorDesc> {
    let d = TensorDesc(dnn::create_tensor_descriptor().map_err(status("creating a descriptor"))?);
    let dims = [
        cint(what, s.n)?,
        cint(what, s.c)?,
        cint(what, s.h)?,
        cint(what, s.w)?,
    ];
    // SAFETY: `d` is a live descriptor.
    unsafe { dnn::set_tensor4d_descriptor(d.0, format(layout), dtype, dims) }
        .map_err(status(what))?;
    Ok(d)
}

/// One convolution's descriptors and chosen algorithms (with their workspace bytes), or the
/// reason cuDNN has none for a pass.
struct Plan {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    fwd: Option<Choice<FwdAlgo>>,
    data: Option<Choice<DataAlgo>>,
    filter: Option<Choice<FilterAlgo>>,
}

impl Plan {
    /// The descriptors of a convolution of `g` from `xs` to `ys` (tensors in `layout`, the
    /// filter KCRS with NCHW and KRSC with NHWC, as PyTorch's channels-last convolutions have
    /// them; `g`'s groups; f32 with FMA math, f32 with tensor-op (TF32) math, or bf16 / f16
    /// data with f32 compute and tensor-op math, as `mode` says); algorithms are chosen later,
    /// with a handle.
    fn new(xs: Shape, ys: Shape, g: &ConvGeom, mode: DnnMode, layout: Layout) -> Result<Plan> {
        let dtype = mode.data_type();
        let x = tensor_desc("convolution input", xs, dtype, layout)?;
        let y = tensor_desc("convolution output", ys, dtype, layout)?;
        let w =
            FilterDesc(dnn::create_filter_descriptor().map_err(status("creating a descriptor"))?);
        let k = cint("kernel", g.kernel)?;
        let dims = [
            cint("output channels", g.out_ch)?,
            cint("input channels per group", g.in_per_group())?,
            k,
            k,
        ];
        // SAFETY: `w` is a live descriptor.
        unsafe { dnn::set_filter4d_descriptor(w.0, dtype, format(layout), dims) }
            .map_err(status("convolution weight"))?;
        let conv = ConvDesc(
            dnn::create_convolution_descriptor().map_err(status("creating a descriptor"))?,
        );
        let (pad, stride) = (cint("padding", g.padding)?, cint("stride", g.stride)?);
        let groups = cint("groups", g.groups)?;
        let math = if mode.tensor_ops() {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        // SAFETY: `conv` is a live descriptor.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .and_then(|_| dnn::set_convolution_math_type(conv.0, math))
            .and_then(|_| dnn::set_convolution_group_count(conv.0, groups))
        }
        .map_err(status("convolution geometry"))?;
        Ok(Plan {
            x,
            y,
            w,
            conv,
            fwd: None,
            data: None,
            filter: None,
        })
    }

    /// The output shape cuDNN derives from the descriptors (a check that they say what `g`
    /// says).
    #[cfg(test)]
    fn output_dims(&self) -> Result<[c_int; 4]> {
        let mut d = [0 as c_int; 4];
        let [n, c, h, w] = &mut d;
        // SAFETY: live descriptors; the four outputs are valid C ints.
        unsafe {
            sys::cudnnGetConvolution2dForwardOutputDim(self.conv.0, self.x.0, self.w.0, n, c, h, w)
        }
        .result()
        .map_err(status("output dimensions"))?;
        Ok(d)
    }
}

/// Largest workspace an algorithm may ask for.
const MAX_WORKSPACE: usize = 1 << 30;

/// One result of the `..._v7` heuristics, with the enums as the integers cuDNN wrote (a value a
/// newer cuDNN adds is then just a number, not an invalid Rust enum). The forward, backward-data
/// and backward-filter result structs share this layout.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Perf {
    algo: u32,
    status: u32,
    time: f32,
    memory: usize,
    determinism: u32,
    math_type: u32,
    reserved: [c_int; 3],
}

const _: () = {
    use std::mem::{align_of, size_of};
    assert!(size_of::<Perf>() == size_of::<sys::cudnnConvolutionFwdAlgoPerf_t>());
    assert!(size_of::<Perf>() == size_of::<sys::cudnnConvolutionBwdDataAlgoPerf_t>());
    assert!(size_of::<Perf>() == size_of::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>());
    assert!(align_of::<Perf>() == align_of::<sys::cudnnConvolutionFwdAlgoPerf_t>());
};

/// The first heuristics result that ran, is one of `allowed` (GEMM-family or direct; FFT and
/// Winograd transforms lose accuracy), is deterministic, uses the math the mode allows, and
/// fits the workspace cap.
fn pick(perf: &[Perf], n: c_int, allowed: &[u32], tensor_ops: bool) -> Option<u32> {
    const SUCCESS: u32 = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32;
    const DETERMINISTIC: u32 = sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32;
    use sys::cudnnMathType_t as M;
    let math_ok = |m: u32| {
        m == M::CUDNN_FMA_MATH as u32
            || m == M::CUDNN_DEFAULT_MATH as u32
            || (tensor_ops && m == M::CUDNN_TENSOR_OP_MATH as u32)
    };
    perf[..n.clamp(0, perf.len() as c_int) as usize]
        .iter()
        .find(|p| {
            p.status == SUCCESS
                && allowed.contains(&p.algo)
                && p.determinism == DETERMINISTIC
                && math_ok(p.math_type)
                && p.memory <= MAX_WORKSPACE
        })
        .map(|p| p.algo)
}

use sys::cudnnConvolutionBwdDataAlgo_t as DataAlgo;
use sys::cudnnConvolutionBwdFilterAlgo_t as FilterAlgo;
use sys::cudnnConvolutionFwdAlgo_t as FwdAlgo;

/// Forward algorithms allowed, in PyTorch's deterministic fallback order.
const FWD_ALGOS: [FwdAlgo; 4] = [
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
];
/// Input-gradient algorithms allowed (ALGO_0 is non-deterministic and filtered out by the
/// heuristics' flag; ALGO_1 is the fallback).
const DATA_ALGOS: [DataAlgo; 2] = [
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
    DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
];
/// Weight-gradient algorithms allowed (ALGO_0 and ALGO_3 are non-deterministic; ALGO_1 is the
/// fallback).
const FILTER_ALGOS: [FilterAlgo; 3] = [
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
    FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
];

/// Which convolution pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PassKind {
    Forward,
    Data,
    Filter,
}

/// A convolution pass with its device addresses.
pub(crate) enum Pass {
    /// `y = conv(x, w)`.
    Forward { x: u64, w: u64, y: u64 },
    /// `dx = conv_transpose(dy, w)`.
    Data { dy: u64, w: u64, dx: u64 },
    /// `dw += corr(x, dy)` (`dw = ...` without `accumulate`).
    Filter {
        x: u64,
        dy: u64,
        dw: u64,
        accumulate: bool,
    },
}

impl Pass {
    fn kind(&self) -> PassKind {
        match self {
            Pass::Forward { .. } => PassKind::Forward,
            Pass::Data { .. } => PassKind::Data,
            Pass::Filter { .. } => PassKind::Filter,
        }
    }
}

struct Inner {
    handle: sys::cudnnHandle_t,
    plans: HashMap<(Shape, ConvGeom, Layout), Plan>,
    /// Keeps the stream (and its context) alive until the handle is destroyed.
    stream: Arc<CudaStream>,
}

// SAFETY: the handle and descriptors are plain cuDNN objects; `Dnn` only touches them under its
// mutex, so one thread at a time uses them (cuDNN allows a handle on any thread whose current
// context is the handle's, which every call binds first).
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // The handle belongs to the stream's context: make it current (best effort) first.
        let _ = self.stream.context().bind_to_thread();
        self.plans.clear();
        // SAFETY: created by create_handle and destroyed only here.
        let _ = unsafe { dnn::destroy_handle(self.handle) };
    }
}

/// A cuDNN handle on the device's stream, with the plans made so far.
pub(crate) struct Dnn {
    inner: Mutex<Inner>,
    version: usize,
    mode: DnnMode,
}

impl fmt::Debug for Dnn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuDNN {}", self.version)
    }
}

impl Dnn {
    /// Opens cuDNN on `dev`'s stream, computing as `mode` says. Errors (never panics) on the
    /// emulator, and when no usable library loads ([`cudnn_version`]).
    pub(crate) fn open(dev: &CudaDevice, mode: DnnMode) -> Result<Dnn> {
        let (Some(stream), Some(ctx)) = (dev.stream(), dev.context()) else {
            return Err(Error::Unsupported(
                "cuDNN needs a GPU; the kernel emulator runs senet's own convolutions".into(),
            ));
        };
        let version = cudnn_version().map_err(|e| Error::Unsupported(format!("cuDNN: {e}")))?;
        ctx.bind_to_thread()
            .map_err(Error::driver("binding the context for cuDNN"))?;
        let handle = dnn::create_handle().map_err(status("creating a handle"))?;
        // From here the handle is destroyed by Inner's Drop on every path.
        let inner = Inner {
            handle,
            plans: HashMap::new(),
            stream: stream.clone(),
        };
        // SAFETY: a live handle; the stream belongs to the device's context, which is current.
        unsafe { dnn::set_stream(inner.handle, stream.cu_stream() as *mut _) }
            .map_err(status("setting the stream"))?;
        Ok(Dnn {
            inner: Mutex::new(inner),
            version,
            mode,
        })
    }

    /// cuDNN's version number (e.g. 90100 for 9.1.0).
    pub(crate) fn version(&self) -> usize {
        self.version
    }

    /// What this handle computes in.
    pub(crate) fn mode(&self) -> DnnMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chooses (once, then kept) the algorithms of `passes` for input `xs`, output `ys` and
    /// geometry `g`, and returns their workspace bytes in the same order. Errors when cuDNN has
    /// no acceptable algorithm for one of them; nothing has run then.
    pub(crate) fn prepare(
        &self,
        dev: &CudaDevice,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        layout: Layout,
        passes: &[PassKind],
    ) -> Result<Vec<usize>> {
        let mut inner = self.lock();
        bind(dev)?;
        let handle = inner.handle;
        let tensor_ops = self.mode.tensor_ops();
        let plan = Self::plan(&mut inner, xs, ys, g, self.mode, layout)?;
        passes
            .iter()
            .map(|k| match k {
                PassKind::Forward => Self::fwd_algo(handle, plan, tensor_ops).map(|a| a.1),
                PassKind::Data => Self::data_algo(handle, plan, tensor_ops).map(|a| a.1),
                PassKind::Filter => Self::filter_algo(handle, plan, tensor_ops).map(|a| a.1),
            })
            .collect()
    }

    /// Runs `pass` on the device's stream (asynchronously, as a kernel launch).
    ///
    /// # Safety
    /// The addresses in `pass` hold tensors of `xs` (x, dx) and `ys` (y, dy) in `layout`, and
    /// `g`'s weight (w, dw; KCRS with NCHW, KRSC with NHWC), in the mode's data type (f32, bf16 or f16); `ws` holds
    /// `ws_bytes` bytes, at least what [`Dnn::prepare`]
    /// returned for the pass (or is unused when that is 0).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        dev: &CudaDevice,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        layout: Layout,
        pass: Pass,
        ws: u64,
        ws_bytes: usize,
    ) -> Result<()> {
        let mut inner = self.lock();
        bind(dev)?;
        let handle = inner.handle;
        let tensor_ops = self.mode.tensor_ops();
        let plan = Self::plan(&mut inner, xs, ys, g, self.mode, layout)?;
        let (one, zero) = (1.0f32, 0.0f32);
        let alpha = &one as *const f32 as *const c_void;
        let ws_ptr = ws as *mut c_void;
        let p = |a: u64| a as *const c_void;
        let kind = pass.kind();
        // SAFETY (all three): the descriptors describe the tensors at these addresses (this
        // function's contract), the workspace is as large as the algorithm asked for, and
        // alpha / beta point at f32s, the scaling type of f32, bf16 and f16 data.
        match pass {
            Pass::Forward { x, w, y } => {
                let (algo, need) = Self::fwd_algo(handle, plan, tensor_ops)?;
                check_ws(need, ws_bytes)?;
                unsafe {
                    dnn::convolution_forward(
                        handle,
                        alpha,
                        plan.x.0,
                        p(x),
                        plan.w.0,
                        p(w),
                        plan.conv.0,
                        algo,
                        ws_ptr,
                        ws_bytes,
                        &zero as *const f32 as *const c_void,
                        plan.y.0,
                        y as *mut c_void,
                    )
                }
            }
            Pass::Data { dy, w, dx } => {
                let (algo, need) = Self::data_algo(handle, plan, tensor_ops)?;
                check_ws(need, ws_bytes)?;
                unsafe {
                    dnn::convolution_backward_data(
                        handle,
                        alpha,
                        plan.w.0,
                        p(w),
                        plan.y.0,
                        p(dy),
                        plan.conv.0,
                        algo,
                        ws_ptr,
                        ws_bytes,
                        &zero as *const f32 as *const c_void,
                        plan.x.0,
                        dx as *mut c_void,
                    )
                }
            }
            Pass::Filter {
                x,
                dy,
                dw,
                accumulate,
            } => {
                let (algo, need) = Self::filter_algo(handle, plan, tensor_ops)?;
                check_ws(need, ws_bytes)?;
                // beta = 1: the gradient accumulates into dw, as every backend's does (0 over a
                // zeroed bound gradient).
                unsafe {
                    dnn::convolution_backward_filter(
                        handle,
                        alpha,
                        plan.x.0,
                        p(x),
                        plan.y.0,
                        p(dy),
                        plan.conv.0,
                        algo,
                        ws_ptr,
                        ws_bytes,
                        if accumulate {
                            alpha
                        } else {
                            &zero as *const f32 as *const c_void
                        },
                        plan.w.0,
                        dw as *mut c_void,
                    )
                }
            }
        }
        .map_err(|e| Error::Cudnn(format!("convolution {kind:?} pass: {e:?}")))
    }

    fn plan<'a>(
        inner: &'a mut Inner,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        mode: DnnMode,
        layout: Layout,
    ) -> Result<&'a mut Plan> {
        use std::collections::hash_map::Entry;
        match inner.plans.entry((xs, *g, layout)) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Ok(e.insert(Plan::new(xs, ys, g, mode, layout)?)),
        }
    }

    fn fwd_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
        tensor_ops: bool,
    ) -> Result<(FwdAlgo, usize)> {
        let (x, w, conv, y) = (plan.x.0, plan.w.0, plan.conv.0, plan.y.0);
        choose(
            &mut plan.fwd,
            &FWD_ALGOS,
            &FWD_ALGOS,
            |a| a as u32,
            tensor_ops,
            "forward",
            // SAFETY: live descriptors; `perf` holds the results asked for, in the layout of
            // cuDNN's result struct (checked at compile time).
            |perf, n| unsafe {
                dnn::get_convolution_forward_algorithm(
                    handle,
                    x,
                    w,
                    conv,
                    y,
                    perf.len() as c_int,
                    n,
                    perf.as_mut_ptr().cast(),
                )
            },
            // SAFETY: live descriptors.
            |algo| unsafe {
                dnn::get_convolution_forward_workspace_size(handle, x, w, conv, y, algo)
            },
        )
    }

    fn data_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
        tensor_ops: bool,
    ) -> Result<(DataAlgo, usize)> {
        let (x, w, conv, y) = (plan.x.0, plan.w.0, plan.conv.0, plan.y.0);
        choose(
            &mut plan.data,
            &DATA_ALGOS,
            // Without a heuristic choice only ALGO_1 (deterministic) is tried.
            &[DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1],
            |a| a as u32,
            tensor_ops,
            "input-gradient",
            // SAFETY: as in fwd_algo.
            |perf, n| unsafe {
                dnn::get_convolution_backward_data_algorithm(
                    handle,
                    w,
                    y,
                    conv,
                    x,
                    perf.len() as c_int,
                    n,
                    perf.as_mut_ptr().cast(),
                )
            },
            // SAFETY: live descriptors.
            |algo| unsafe {
                dnn::get_convolution_backward_data_workspace_size(handle, w, y, conv, x, algo)
            },
        )
    }

    fn filter_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
        tensor_ops: bool,
    ) -> Result<(FilterAlgo, usize)> {
        let (x, w, conv, y) = (plan.x.0, plan.w.0, plan.conv.0, plan.y.0);
        choose(
            &mut plan.filter,
            &FILTER_ALGOS,
            &[FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1],
            |a| a as u32,
            tensor_ops,
            "weight-gradient",
            // SAFETY: as in fwd_algo.
            |perf, n| unsafe {
                dnn::get_convolution_backward_filter_algorithm(
                    handle,
                    x,
                    y,
                    conv,
                    w,
                    perf.len() as c_int,
                    n,
                    perf.as_mut_ptr().cast(),
                )
            },
            // SAFETY: live descriptors.
            |algo| unsafe {
                dnn::get_convolution_backward_filter_workspace_size(handle, x, y, conv, w, algo)
            },
        )
    }
}

/// A pass's kept algorithm and workspace bytes, or why cuDNN has none.
type Choice<A> = std::result::Result<(A, usize), String>;

/// Chooses a pass's algorithm once and keeps it in `slot`: the first result of `heuristics`
/// that [`pick`] accepts among `allowed`, then `fallback` in order; the first whose workspace
/// query succeeds within the cap wins.
#[allow(clippy::too_many_arguments)]
fn choose<A: Copy>(
    slot: &mut Option<Choice<A>>,
    allowed: &[A],
    fallback: &[A],
    code: fn(A) -> u32,
    tensor_ops: bool,
    what: &str,
    heuristics: impl FnOnce(&mut [Perf; 16], &mut c_int) -> std::result::Result<(), dnn::CudnnError>,
    workspace: impl Fn(A) -> std::result::Result<usize, dnn::CudnnError>,
) -> Result<(A, usize)> {
    if slot.is_none() {
        let mut perf = [Perf::default(); 16];
        let mut n: c_int = 0;
        let codes: Vec<u32> = allowed.iter().map(|&a| code(a)).collect();
        let first = heuristics(&mut perf, &mut n)
            .ok()
            .and_then(|_| pick(&perf, n, &codes, tensor_ops))
            .and_then(|c| allowed.iter().find(|&&a| code(a) == c).copied());
        let found = first
            .into_iter()
            .chain(fallback.iter().copied())
            .find_map(|a| {
                workspace(a)
                    .ok()
                    .filter(|&b| b <= MAX_WORKSPACE)
                    .map(|b| (a, b))
            });
        *slot = Some(found.ok_or_else(|| format!("no deterministic {what} algorithm")));
    }
    unpack(slot.as_ref())
}

/// A kept algorithm choice (or the reason there is none) as a result.
fn unpack<A: Copy>(choice: Option<&Choice<A>>) -> Result<(A, usize)> {
    match choice {
        Some(Ok(a)) => Ok(*a),
        Some(Err(e)) => Err(Error::Cudnn(e.clone())),
        None => Err(Error::Cudnn("no algorithm chosen".into())),
    }
}

fn bind(dev: &CudaDevice) -> Result<()> {
    match dev.context() {
        Some(ctx) => ctx
            .bind_to_thread()
            .map_err(Error::driver("binding the context for cuDNN")),
        None => Err(Error::Unsupported("cuDNN needs a GPU".into())),
    }
}

fn check_ws(need: usize, have: usize) -> Result<()> {
    if need > have {
        return Err(Error::Cudnn(format!(
            "workspace of {have} bytes, the algorithm needs {need}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heuristics filter: only successful, deterministic GEMM-family results within the
    /// workspace cap, FMA or default math (tensor-op math only where the mode allows it: TF32, bf16, f16), first one wins.
    #[test]
    fn the_algorithm_filter_keeps_exact_deterministic_choices() {
        use sys::cudnnMathType_t as M;
        let allowed = FWD_ALGOS.map(|a| a as u32);
        let fft = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT as u32;
        let gemm = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM as u32;
        let precomp = FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM as u32;
        let ok = |algo: u32| Perf {
            algo,
            status: 0,
            determinism: 1,
            math_type: M::CUDNN_FMA_MATH as u32,
            ..Perf::default()
        };
        let fast_but_bad = [
            Perf {
                status: 9,
                ..ok(precomp)
            },
            ok(fft),
            Perf {
                determinism: 0,
                ..ok(precomp)
            },
            Perf {
                memory: MAX_WORKSPACE + 1,
                ..ok(precomp)
            },
            Perf {
                math_type: M::CUDNN_TENSOR_OP_MATH as u32,
                ..ok(precomp)
            },
            ok(gemm),
        ];
        assert_eq!(pick(&fast_but_bad, 6, &allowed, false), Some(gemm));
        // Tensor-op math is taken where the mode allows it.
        assert_eq!(pick(&fast_but_bad, 6, &allowed, true), Some(precomp));
        // Only the first `n` results count, and `n` is clamped to the array.
        assert_eq!(pick(&fast_but_bad, 5, &allowed, false), None);
        assert_eq!(pick(&fast_but_bad, 99, &allowed, false), Some(gemm));
        assert_eq!(pick(&fast_but_bad, -1, &allowed, false), None);
    }

    #[test]
    fn versions_read_as_cudnn_numbers_them() {
        assert_eq!(version_string(90100), "9.1.0");
        assert_eq!(version_string(91002), "9.10.2");
        assert_eq!(version_string(8907), "8.9.7");
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse::<ConvChoice>().unwrap(), ConvChoice::Auto);
        assert_eq!(
            "own".parse::<ConvChoice>().unwrap(),
            ConvChoice::Only(ConvEngine::Own)
        );
        assert_eq!(
            " cuDNN ".parse::<ConvChoice>().unwrap(),
            ConvChoice::Only(ConvEngine::Cudnn)
        );
        assert_eq!(
            "cudnn-tf32".parse::<ConvChoice>().unwrap(),
            ConvChoice::Only(ConvEngine::CudnnTf32)
        );
        assert_eq!(
            "cublas".parse::<ConvChoice>().unwrap(),
            ConvChoice::Only(ConvEngine::Cublas)
        );
        assert!("cublass".parse::<ConvChoice>().is_err());
    }

    /// The descriptors say what the geometry says: cuDNN derives our output shape from them,
    /// for dense, strided, padded, grouped and depthwise convolutions. Needs only the library
    /// (no GPU); skipped where it does not load.
    #[test]
    fn descriptors_match_the_geometry() {
        if let Err(e) = cudnn_version() {
            eprintln!("skipped: {e}");
            return;
        }
        let cases = [
            (
                Shape::new(2, 3, 17, 17),
                ConvGeom::new(3, 8, 3, 1, 1, 1).unwrap(),
            ),
            (
                Shape::new(1, 16, 9, 7),
                ConvGeom::new(16, 32, 3, 2, 1, 4).unwrap(),
            ),
            (
                Shape::new(3, 8, 5, 5),
                ConvGeom::new(8, 8, 3, 1, 1, 8).unwrap(),
            ),
            (
                Shape::new(2, 4, 224, 224),
                ConvGeom::new(4, 64, 7, 2, 3, 1).unwrap(),
            ),
            (
                Shape::new(5, 64, 1, 1),
                ConvGeom::new(64, 10, 1, 1, 0, 1).unwrap(),
            ),
        ];
        for (xs, g) in cases {
            let ys = g.output_shape(xs).unwrap();
            for mode in [DnnMode::Exact, DnnMode::Tf32, DnnMode::Bf16, DnnMode::F16] {
                for layout in Layout::ALL {
                    let plan = Plan::new(xs, ys, &g, mode, layout).unwrap();
                    let d = plan.output_dims().unwrap();
                    assert_eq!(
                        d.map(|v| v as usize),
                        [ys.n, ys.c, ys.h, ys.w],
                        "{xs} {g:?} {mode:?} {layout}"
                    );
                }
            }
        }
    }

    #[test]
    fn cudnn_refuses_the_emulator() {
        let Ok(dev) = CudaDevice::emulator() else {
            return;
        };
        let e = Dnn::open(&dev, DnnMode::Exact).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }
}
