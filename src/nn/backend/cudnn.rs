//! cuDNN convolutions for the CUDA backend ([`super::Cuda`]): forward, input gradient and
//! weight gradient through cuDNN's legacy convolution API, loaded at run time (cudarc's dynamic
//! loading), so the crate builds and runs without it and falls back to its own kernels.
//!
//! Exact f32: the descriptors ask for FMA math (no TF32 tensor cores, which cuDNN would
//! otherwise use for f32 on Ampere and later and which round operands to 10 mantissa bits), and
//! only deterministic algorithms are taken, so a run repeats bit for bit as with the own
//! kernels. Algorithms come from cuDNN's heuristics (`..._v7`), once per shape and geometry.
//!
//! Nothing here can run on the kernel emulator: a CUDA backend on the emulator always uses the
//! own kernels.

use super::ConvGeom;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::Shape;
use cudarc::cudnn::{result as dnn, sys};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

/// Which code runs the CUDA backend's convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvEngine {
    /// senet's implicit-GEMM kernels (kernels/nn.cu): always available, and what the kernel
    /// emulator runs.
    Own,
    /// cuDNN, loaded at run time (f32 with FMA math, deterministic algorithms).
    Cudnn,
}

impl fmt::Display for ConvEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConvEngine::Own => "own",
            ConvEngine::Cudnn => "cudnn",
        })
    }
}

/// A request for a [`ConvEngine`]: one of them, or `auto` (cuDNN where it loads on a GPU,
/// else the own kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConvChoice {
    /// cuDNN on a GPU with the library on the loader's path, else [`ConvEngine::Own`].
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
            other => Err(Error::Config(format!(
                "unknown convolution engine `{other}` (expected auto, own or cudnn)"
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

/// cuDNN's version number (e.g. 91000 for 9.10.0) when the library loads, else why not. Needs
/// no GPU: it only loads the library and asks.
pub fn cudnn_version() -> std::result::Result<usize, String> {
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcudnn (.so.9 or .so.8) is not on the library path".into());
    }
    std::panic::catch_unwind(dnn::get_version)
        .map_err(|_| "the cuDNN library found lacks cudnnGetVersion".to_string())
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

fn tensor_desc(what: &str, s: Shape) -> Result<TensorDesc> {
    let d = TensorDesc(dnn::create_tensor_descriptor().map_err(status("creating a descriptor"))?);
    let dims = [
        cint(what, s.n)?,
        cint(what, s.c)?,
        cint(what, s.h)?,
        cint(what, s.w)?,
    ];
    // SAFETY: `d` is a live descriptor.
    unsafe {
        dnn::set_tensor4d_descriptor(
            d.0,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            dims,
        )
    }
    .map_err(status(what))?;
    Ok(d)
}

/// One convolution's descriptors and chosen algorithms (with their workspace bytes).
struct Plan {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

impl Plan {
    /// The descriptors of a convolution of `g` from `xs` to `ys` (f32 NCHW, FMA math, `g`'s
    /// groups); algorithms are chosen later, with a handle.
    fn new(xs: Shape, ys: Shape, g: &ConvGeom) -> Result<Plan> {
        let x = tensor_desc("convolution input", xs)?;
        let y = tensor_desc("convolution output", ys)?;
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
        unsafe {
            dnn::set_filter4d_descriptor(
                w.0,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dims,
            )
        }
        .map_err(status("convolution weight"))?;
        let conv = ConvDesc(
            dnn::create_convolution_descriptor().map_err(status("creating a descriptor"))?,
        );
        let (pad, stride) = (cint("padding", g.padding)?, cint("stride", g.stride)?);
        let groups = cint("groups", g.groups)?;
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
            .and_then(|_| {
                dnn::set_convolution_math_type(conv.0, sys::cudnnMathType_t::CUDNN_FMA_MATH)
            })
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

/// The first acceptable algorithm of a heuristics list: a GEMM-family or direct one (`$ok`;
/// FFT and Winograd transforms lose accuracy the f32 contract does not allow), deterministic,
/// without tensor-op math, within the workspace cap.
macro_rules! pick {
    ($perf:expr, $n:expr, $what:expr, $ok:pat) => {{
        let found = $perf[..$n.clamp(0, $perf.len() as c_int) as usize]
            .iter()
            .find(|p| {
                p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                    && matches!(p.algo, $ok)
                    && p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
                    && matches!(
                        p.mathType,
                        sys::cudnnMathType_t::CUDNN_FMA_MATH
                            | sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
                    )
                    && p.memory <= MAX_WORKSPACE
            })
            .map(|p| p.algo);
        found.ok_or_else(|| {
            Error::Cudnn(format!("no deterministic f32 algorithm for the {}", $what))
        })
    }};
}

struct Inner {
    handle: sys::cudnnHandle_t,
    plans: HashMap<(Shape, ConvGeom), Plan>,
}

// SAFETY: the handle and descriptors are plain cuDNN objects; `Dnn` only touches them under its
// mutex, so one thread at a time uses them (cuDNN allows a handle on any thread whose current
// context is the handle's, which every call binds first).
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by create_handle and destroyed only here.
        let _ = unsafe { dnn::destroy_handle(self.handle) };
    }
}

/// Which convolution pass to run.
pub(crate) enum Pass {
    /// `y = conv(x, w)`.
    Forward { x: u64, w: u64, y: u64 },
    /// `dx = conv_transpose(dy, w)`.
    Data { dy: u64, w: u64, dx: u64 },
    /// `dw += corr(x, dy)`.
    Filter { x: u64, dy: u64, dw: u64 },
}

/// A cuDNN handle on the device's stream, with the plans made so far.
pub(crate) struct Dnn {
    inner: Mutex<Inner>,
    version: usize,
}

impl fmt::Debug for Dnn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuDNN {}", self.version)
    }
}

impl Dnn {
    /// Opens cuDNN on `dev`'s stream. Errors (never panics) on the emulator, when the library
    /// is not on the loader's path, or when it lacks what senet calls.
    pub(crate) fn open(dev: &CudaDevice) -> Result<Dnn> {
        let (Some(stream), Some(ctx)) = (dev.stream(), dev.context()) else {
            return Err(Error::Unsupported(
                "cuDNN needs a GPU; the kernel emulator runs senet's own convolutions".into(),
            ));
        };
        cudnn_version().map_err(|e| Error::Unsupported(format!("cuDNN: {e}")))?;
        ctx.bind_to_thread()
            .map_err(Error::driver("binding the context for cuDNN"))?;
        let cu_stream = stream.cu_stream();
        // cudarc resolves each symbol on first use and panics on a missing one: keep that inside.
        let opened = std::panic::catch_unwind(move || -> Result<(usize, usize)> {
            let version = dnn::get_version();
            let handle = dnn::create_handle().map_err(status("creating a handle"))?;
            // SAFETY: `handle` was just created; the stream belongs to the device's context.
            if let Err(e) = unsafe { dnn::set_stream(handle, cu_stream as *mut _) } {
                // SAFETY: as above; not used again.
                let _ = unsafe { dnn::destroy_handle(handle) };
                return Err(status("setting the stream")(e));
            }
            Ok((version, handle as usize))
        })
        .map_err(|_| {
            Error::Unsupported("the cuDNN library found lacks a function senet calls".into())
        })??;
        let (version, handle) = opened;
        if version < 8000 {
            return Err(Error::Unsupported(format!(
                "cuDNN {version} is older than 8.0"
            )));
        }
        Ok(Dnn {
            inner: Mutex::new(Inner {
                handle: handle as sys::cudnnHandle_t,
                plans: HashMap::new(),
            }),
            version,
        })
    }

    /// cuDNN's version number (e.g. 90100 for 9.1.0).
    pub(crate) fn version(&self) -> usize {
        self.version
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Workspace bytes `pass` needs for input shape `xs`, output `ys` and geometry `g` (choosing
    /// and keeping its algorithm on first use).
    pub(crate) fn workspace(
        &self,
        dev: &CudaDevice,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        pass: &Pass,
    ) -> Result<usize> {
        let mut inner = self.lock();
        bind(dev)?;
        let handle = inner.handle;
        let plan = Self::plan(&mut inner, xs, ys, g)?;
        Ok(match pass {
            Pass::Forward { .. } => Self::fwd_algo(handle, plan)?.1,
            Pass::Data { .. } => Self::data_algo(handle, plan)?.1,
            Pass::Filter { .. } => Self::filter_algo(handle, plan)?.1,
        })
    }

    /// Runs `pass` on the device's stream (asynchronously, as a kernel launch).
    ///
    /// # Safety
    /// The addresses in `pass` hold tensors of `xs` (x, dx), `ys` (y, dy) and `g`'s weight
    /// shape (w, dw) in f32; `ws` holds `ws_bytes` bytes, at least [`Dnn::workspace`] of the
    /// same pass (or is unused when that is 0).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        dev: &CudaDevice,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        pass: Pass,
        ws: u64,
        ws_bytes: usize,
    ) -> Result<()> {
        let mut inner = self.lock();
        bind(dev)?;
        let handle = inner.handle;
        let plan = Self::plan(&mut inner, xs, ys, g)?;
        let (one, zero) = (1.0f32, 0.0f32);
        let alpha = &one as *const f32 as *const c_void;
        let ws_ptr = ws as *mut c_void;
        let p = |a: u64| a as *const c_void;
        // SAFETY (all three): the descriptors describe the tensors at these addresses (this
        // function's contract), the workspace is as large as the algorithm asked for, and
        // alpha / beta point at f32s, the scaling type of f32 data.
        match pass {
            Pass::Forward { x, w, y } => {
                let (algo, need) = Self::fwd_algo(handle, plan)?;
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
                .map_err(status("convolution forward"))
            }
            Pass::Data { dy, w, dx } => {
                let (algo, need) = Self::data_algo(handle, plan)?;
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
                .map_err(status("convolution input gradient"))
            }
            Pass::Filter { x, dy, dw } => {
                let (algo, need) = Self::filter_algo(handle, plan)?;
                check_ws(need, ws_bytes)?;
                // beta = 1: the gradient accumulates into dw, as every backend's does.
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
                        alpha,
                        plan.w.0,
                        dw as *mut c_void,
                    )
                }
                .map_err(status("convolution weight gradient"))
            }
        }
    }

    fn plan<'a>(inner: &'a mut Inner, xs: Shape, ys: Shape, g: &ConvGeom) -> Result<&'a mut Plan> {
        use std::collections::hash_map::Entry;
        match inner.plans.entry((xs, *g)) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Ok(e.insert(Plan::new(xs, ys, g)?)),
        }
    }

    fn fwd_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
    ) -> Result<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
        if let Some(a) = plan.fwd {
            return Ok(a);
        }
        // SAFETY: all-zero bytes are a valid perf struct (enums start at 0, numbers 0).
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 16] = unsafe { std::mem::zeroed() };
        let mut n: c_int = 0;
        // SAFETY: live descriptors; `perf` holds the 16 results asked for.
        unsafe {
            dnn::get_convolution_forward_algorithm(
                handle,
                plan.x.0,
                plan.w.0,
                plan.conv.0,
                plan.y.0,
                perf.len() as c_int,
                &mut n,
                perf.as_mut_ptr(),
            )
        }
        .map_err(status("choosing a forward algorithm"))?;
        use sys::cudnnConvolutionFwdAlgo_t as A;
        let algo = pick!(
            perf,
            n,
            "forward",
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
                | A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
                | A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM
                | A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT
        )?;
        // SAFETY: live descriptors.
        let bytes = unsafe {
            dnn::get_convolution_forward_workspace_size(
                handle,
                plan.x.0,
                plan.w.0,
                plan.conv.0,
                plan.y.0,
                algo,
            )
        }
        .map_err(status("forward workspace size"))?;
        plan.fwd = Some((algo, bytes));
        Ok((algo, bytes))
    }

    fn data_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
    ) -> Result<(sys::cudnnConvolutionBwdDataAlgo_t, usize)> {
        if let Some(a) = plan.data {
            return Ok(a);
        }
        // SAFETY: all-zero bytes are a valid perf struct.
        let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 16] = unsafe { std::mem::zeroed() };
        let mut n: c_int = 0;
        // SAFETY: live descriptors; `perf` holds the 16 results asked for.
        unsafe {
            dnn::get_convolution_backward_data_algorithm(
                handle,
                plan.w.0,
                plan.y.0,
                plan.conv.0,
                plan.x.0,
                perf.len() as c_int,
                &mut n,
                perf.as_mut_ptr(),
            )
        }
        .map_err(status("choosing an input-gradient algorithm"))?;
        use sys::cudnnConvolutionBwdDataAlgo_t as A;
        let algo = pick!(
            perf,
            n,
            "input gradient",
            A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 | A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1
        )?;
        // SAFETY: live descriptors.
        let bytes = unsafe {
            dnn::get_convolution_backward_data_workspace_size(
                handle,
                plan.w.0,
                plan.y.0,
                plan.conv.0,
                plan.x.0,
                algo,
            )
        }
        .map_err(status("input-gradient workspace size"))?;
        plan.data = Some((algo, bytes));
        Ok((algo, bytes))
    }

    fn filter_algo(
        handle: sys::cudnnHandle_t,
        plan: &mut Plan,
    ) -> Result<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)> {
        if let Some(a) = plan.filter {
            return Ok(a);
        }
        // SAFETY: all-zero bytes are a valid perf struct.
        let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 16] =
            unsafe { std::mem::zeroed() };
        let mut n: c_int = 0;
        // SAFETY: live descriptors; `perf` holds the 16 results asked for.
        unsafe {
            dnn::get_convolution_backward_filter_algorithm(
                handle,
                plan.x.0,
                plan.y.0,
                plan.conv.0,
                plan.w.0,
                perf.len() as c_int,
                &mut n,
                perf.as_mut_ptr(),
            )
        }
        .map_err(status("choosing a weight-gradient algorithm"))?;
        use sys::cudnnConvolutionBwdFilterAlgo_t as A;
        let algo = pick!(
            perf,
            n,
            "weight gradient",
            A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0
                | A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
                | A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3
        )?;
        // SAFETY: live descriptors.
        let bytes = unsafe {
            dnn::get_convolution_backward_filter_workspace_size(
                handle,
                plan.x.0,
                plan.y.0,
                plan.conv.0,
                plan.w.0,
                algo,
            )
        }
        .map_err(status("weight-gradient workspace size"))?;
        plan.filter = Some((algo, bytes));
        Ok((algo, bytes))
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
        assert!("cublas".parse::<ConvChoice>().is_err());
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
            let plan = Plan::new(xs, ys, &g).unwrap();
            let d = plan.output_dims().unwrap();
            assert_eq!(
                d.map(|v| v as usize),
                [ys.n, ys.c, ys.h, ys.w],
                "{xs} {g:?}"
            );
        }
    }

    #[test]
    fn cudnn_refuses_the_emulator() {
        let Ok(dev) = CudaDevice::emulator() else {
            return;
        };
        let e = Dnn::open(&dev).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }
}
