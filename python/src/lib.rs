//! `senet_torch._senet`: senet's SE op for Python, on tensors passed as raw pointers.
//!
//! The Python side (senet_torch/ops.py) owns every buffer: it allocates outputs, saved state and
//! gradients with torch, checks dtypes, devices and contiguity, and passes `data_ptr()` integers
//! with the shape, layout and config. This module rebuilds slices over those buffers (no copy)
//! and runs senet's fast CPU path (f32, f16, bf16) or, for f64, an f64 version of the reference
//! math with f64 weights (for `torch.autograd.gradcheck`). The GIL is released while it runs, and
//! CPU work runs on torch's own OpenMP threads (see `omp`).
//!
//! Every function checks what it can (config, shape, null pointers) and raises `ValueError`;
//! the sizes behind the pointers are the caller's contract (senet_torch checks them).

use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use senet::se::cpu::{
    backward_slices, forward_slices, CpuSavedMut, CpuSavedRef, SeBackwardSlices, SeForwardSlices,
};
use senet::se::{SeGradsMut, SeWeightsRef};
use senet::{Activation, Element, Gate, Layout, SeConfig, Shape};

mod cuda_path;
mod f64_path;
mod omp;

/// Maps a senet error to a Python exception (ValueError for bad input, RuntimeError otherwise).
fn py_err(e: senet::Error) -> PyErr {
    match e {
        senet::Error::Shape(_) | senet::Error::Length { .. } | senet::Error::Config(_) => {
            PyValueError::new_err(format!("senet: {e}"))
        }
        other => PyRuntimeError::new_err(format!("senet: {other}")),
    }
}

/// Problems with fewer elements than this run on one thread (measured: at 1x64x1x1 a call on two
/// threads cost ~35 us more than the work).
const SERIAL_BELOW: usize = 1 << 15;

/// Runs a CPU call's work with the GIL released, on torch's threads ([`omp::run`]): one thread
/// below [`SERIAL_BELOW`] elements.
fn run_cpu(
    py: Python<'_>,
    p: Problem,
    run: impl FnOnce() -> senet::Result<()> + Send + 'static,
) -> PyResult<()> {
    py.detach(|| omp::run(p.shape.numel() < SERIAL_BELOW, run))
        .map_err(PyRuntimeError::new_err)?
        .map_err(py_err)
}

/// The op's static description, parsed and validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub shape: Shape,
    pub layout: Layout,
    pub config: SeConfig,
}

fn problem(
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
) -> PyResult<Problem> {
    let layout = match layout {
        "nchw" => Layout::Nchw,
        "nhwc" => Layout::Nhwc,
        other => {
            return Err(PyValueError::new_err(format!(
                "senet: layout must be 'nchw' or 'nhwc', got {other:?}"
            )))
        }
    };
    let activation = match activation {
        "relu" => Activation::Relu,
        "silu" => Activation::Silu,
        other => {
            return Err(PyValueError::new_err(format!(
                "senet: activation must be 'relu' or 'silu', got {other:?}"
            )))
        }
    };
    let gate = match gate {
        "sigmoid" => Gate::Sigmoid,
        "hard_sigmoid" => Gate::HardSigmoid,
        other => {
            return Err(PyValueError::new_err(format!(
                "senet: gate must be 'sigmoid' or 'hard_sigmoid', got {other:?}"
            )))
        }
    };
    let (n, c, h, w) = shape;
    let shape = Shape::try_new(n, c, h, w).map_err(py_err)?;
    let config = SeConfig::with_hidden(c, hidden)
        .map_err(py_err)?
        .bias(bias)
        .activation(activation)
        .gate(gate);
    Ok(Problem {
        shape,
        layout,
        config,
    })
}

/// A required pointer: non-null.
fn req(what: &str, p: usize) -> PyResult<usize> {
    if p == 0 {
        Err(PyValueError::new_err(format!(
            "senet: {what} is a null pointer"
        )))
    } else {
        Ok(p)
    }
}

/// `Some(p)` for a non-null pointer.
fn opt(p: usize) -> Option<usize> {
    (p != 0).then_some(p)
}

/// A slice over `len` elements at address `p`.
///
/// # Safety
/// `p` must point to `len` initialised, aligned `T`s that live and are not mutated elsewhere
/// for `'a`.
unsafe fn slice<'a, T>(p: usize, len: usize) -> &'a [T] {
    std::slice::from_raw_parts(p as *const T, len)
}

/// A mutable slice over `len` elements at address `p`.
///
/// # Safety
/// As [`slice`], and no other reference to the memory exists for `'a`.
unsafe fn slice_mut<'a, T>(p: usize, len: usize) -> &'a mut [T] {
    std::slice::from_raw_parts_mut(p as *mut T, len)
}

/// Pointers of one forward call (0 = absent).
#[derive(Clone, Copy)]
struct FwdPtrs {
    x: usize,
    residual: usize,
    y: usize,
    w: [usize; 4],
    saved: [usize; 4],
}

/// Pointers of one backward call (0 = absent).
#[derive(Clone, Copy)]
struct BwdPtrs {
    x: usize,
    residual: usize,
    dy: usize,
    w: [usize; 4],
    saved: [usize; 4],
    dx: usize,
    dresidual: usize,
    grads: [usize; 4],
}

/// The weights at `w = [w1, b1, w2, b2]`, f32.
///
/// # Safety
/// The pointers must hold the config's weight sizes.
unsafe fn weights_f32<'a>(cfg: SeConfig, w: [usize; 4]) -> SeWeightsRef<'a> {
    let (c, d) = (cfg.channels, cfg.hidden);
    SeWeightsRef {
        config: cfg,
        w1: slice(w[0], d * c),
        b1: opt(w[1]).map(|p| slice(p, d)),
        w2: slice(w[2], c * d),
        b2: opt(w[3]).map(|p| slice(p, c)),
    }
}

/// [`senet::advise_huge_pages`] on the `bytes` at `ptr` (an output torch has just allocated, not
/// yet touched).
fn advise_huge_pages(ptr: usize, bytes: usize) {
    if ptr == 0 {
        return;
    }
    // SAFETY: torch allocated `bytes` at `ptr` for this call's output; only the range is used.
    senet::advise_huge_pages(unsafe { std::slice::from_raw_parts(ptr as *const u8, bytes) });
}

/// # Safety
/// Every pointer must hold its operand's size for `p` (the Python side allocates them).
unsafe fn forward_cpu<T: Element>(p: Problem, ptr: FwdPtrs) -> senet::Result<()> {
    let numel = p.shape.numel();
    let (n, c, d) = (p.shape.n, p.config.channels, p.config.hidden);
    advise_huge_pages(ptr.y, numel * std::mem::size_of::<T>());
    forward_slices(
        p.shape,
        p.layout,
        SeForwardSlices::<T> {
            x: slice(ptr.x, numel),
            residual: opt(ptr.residual).map(|r| slice(r, numel)),
            y: slice_mut(ptr.y, numel),
            weights: weights_f32(p.config, ptr.w),
            saved: CpuSavedMut {
                z: slice_mut(ptr.saved[0], n * c),
                h: slice_mut(ptr.saved[1], n * d),
                u: slice_mut(ptr.saved[2], n * d),
                s: slice_mut(ptr.saved[3], n * c),
            },
        },
    )
}

/// # Safety
/// Every pointer must hold its operand's size for `p`.
unsafe fn backward_cpu<T: Element>(p: Problem, ptr: BwdPtrs) -> senet::Result<()> {
    let numel = p.shape.numel();
    let (n, c, d) = (p.shape.n, p.config.channels, p.config.hidden);
    advise_huge_pages(ptr.dx, numel * std::mem::size_of::<T>());
    if ptr.dresidual != 0 {
        advise_huge_pages(ptr.dresidual, numel * std::mem::size_of::<T>());
    }
    backward_slices(
        p.shape,
        p.layout,
        SeBackwardSlices::<T> {
            x: slice(ptr.x, numel),
            residual: opt(ptr.residual).map(|r| slice(r, numel)),
            dy: slice(ptr.dy, numel),
            weights: weights_f32(p.config, ptr.w),
            saved: CpuSavedRef {
                z: slice(ptr.saved[0], n * c),
                h: slice(ptr.saved[1], n * d),
                u: slice(ptr.saved[2], n * d),
                s: slice(ptr.saved[3], n * c),
            },
            dx: slice_mut(ptr.dx, numel),
            accumulate: false,
            dresidual: opt(ptr.dresidual).map(|r| slice_mut(r, numel)),
            grads: SeGradsMut {
                dw1: slice_mut(ptr.grads[0], d * c),
                db1: opt(ptr.grads[1]).map(|g| slice_mut(g, d)),
                dw2: slice_mut(ptr.grads[2], c * d),
                db2: opt(ptr.grads[3]).map(|g| slice_mut(g, c)),
            },
        },
    )
}

/// Checks the pointers a call needs are present: residual iff d residual (backward), biases
/// iff the config has them.
fn check_ptrs(cfg: &SeConfig, w: [usize; 4], saved: [usize; 4]) -> PyResult<()> {
    req("w1", w[0])?;
    req("w2", w[2])?;
    if cfg.bias != (w[1] != 0) || cfg.bias != (w[3] != 0) {
        return Err(PyValueError::new_err(format!(
            "senet: biases must be given iff bias={}",
            cfg.bias
        )));
    }
    for (name, p) in ["z", "h", "u", "s"].iter().zip(saved) {
        req(name, p)?;
    }
    Ok(())
}

/// SE forward on CPU buffers: `y = gate(W2 act(W1 mean(x) + b1) + b2) * x`, or with a residual
/// `y = relu(s * x + residual)`; fills the saved state `z, h, u, s` (f32, or f64 for f64).
///
/// `dtype` is "float32", "bfloat16", "float16" or "float64" (activations; weights and saved
/// state are float32, or float64 for float64). Pointers are `tensor.data_ptr()`; 0 means absent.
#[pyfunction]
#[pyo3(signature = (dtype, layout, shape, hidden, bias, activation, gate, x, residual, y, w1, b1, w2, b2, z, h, u, s))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    dtype: &str,
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
    x: usize,
    residual: usize,
    y: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    z: usize,
    h: usize,
    u: usize,
    s: usize,
) -> PyResult<()> {
    let p = problem(layout, shape, hidden, bias, activation, gate)?;
    let ptr = FwdPtrs {
        x: req("x", x)?,
        residual,
        y: req("y", y)?,
        w: [w1, b1, w2, b2],
        saved: [z, h, u, s],
    };
    check_ptrs(&p.config, ptr.w, ptr.saved)?;
    let dt = dtype_of(dtype).map_err(py_err)?;
    let run = move || -> senet::Result<()> {
        // SAFETY: senet_torch allocated every buffer with the sizes this problem implies and
        // keeps the tensors alive for the call; outputs do not alias inputs.
        unsafe {
            match dt {
                Dt::F32 => forward_cpu::<f32>(p, ptr),
                Dt::BF16 => forward_cpu::<bf16>(p, ptr),
                Dt::F16 => forward_cpu::<f16>(p, ptr),
                Dt::F64 => f64_path::forward(p, ptr.x, ptr.residual, ptr.y, ptr.w, ptr.saved),
            }
        }
    };
    run_cpu(py, p, run)
}

/// SE backward on CPU buffers: writes `dx`, `d residual` (iff the forward had a residual) and
/// the parameter gradients `dw1, db1, dw2, db2` (overwritten), from the forward's `x`,
/// `residual`, saved state and `dy`. Same dtypes and pointer conventions as [`forward`].
#[pyfunction]
#[pyo3(signature = (dtype, layout, shape, hidden, bias, activation, gate, x, residual, dy, w1, b1, w2, b2, z, h, u, s, dx, dresidual, dw1, db1, dw2, db2))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    dtype: &str,
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
    x: usize,
    residual: usize,
    dy: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    z: usize,
    h: usize,
    u: usize,
    s: usize,
    dx: usize,
    dresidual: usize,
    dw1: usize,
    db1: usize,
    dw2: usize,
    db2: usize,
) -> PyResult<()> {
    let p = problem(layout, shape, hidden, bias, activation, gate)?;
    let ptr = BwdPtrs {
        x: req("x", x)?,
        residual,
        dy: req("dy", dy)?,
        w: [w1, b1, w2, b2],
        saved: [z, h, u, s],
        dx: req("dx", dx)?,
        dresidual,
        grads: [dw1, db1, dw2, db2],
    };
    check_ptrs(&p.config, ptr.w, ptr.saved)?;
    check_ptrs(&p.config, ptr.grads, ptr.saved)?;
    if (residual != 0) != (dresidual != 0) {
        return Err(PyValueError::new_err(
            "senet: d residual must be given exactly when the residual is",
        ));
    }
    let dt = dtype_of(dtype).map_err(py_err)?;
    let run = move || -> senet::Result<()> {
        // SAFETY: as in `forward`.
        unsafe {
            match dt {
                Dt::F32 => backward_cpu::<f32>(p, ptr),
                Dt::BF16 => backward_cpu::<bf16>(p, ptr),
                Dt::F16 => backward_cpu::<f16>(p, ptr),
                Dt::F64 => f64_path::backward(
                    p,
                    f64_path::BwdPtrs {
                        x: ptr.x,
                        residual: ptr.residual,
                        dy: ptr.dy,
                        w: ptr.w,
                        saved: ptr.saved,
                        dx: ptr.dx,
                        dresidual: ptr.dresidual,
                        grads: ptr.grads,
                    },
                ),
            }
        }
    };
    run_cpu(py, p, run)
}

#[derive(Clone, Copy)]
enum Dt {
    F32,
    BF16,
    F16,
    F64,
}

fn dtype_of(dtype: &str) -> senet::Result<Dt> {
    Ok(match dtype {
        "float32" => Dt::F32,
        "bfloat16" => Dt::BF16,
        "float16" => Dt::F16,
        "float64" => Dt::F64,
        other => {
            return Err(senet::Error::Config(format!(
                "dtype must be float32, bfloat16, float16 or float64, got {other:?}"
            )))
        }
    })
}

/// Whether this build can run the op on CUDA tensors: senet's kernels were compiled into it
/// (nvcc was found when the wheel was built). A driver and a device are checked at the call.
#[pyfunction]
fn cuda_supported() -> bool {
    senet::cuda::kernels_built()
}

fn cuda_dtype(dtype: &str) -> PyResult<senet::DType> {
    match dtype_of(dtype).map_err(py_err)? {
        Dt::F32 => Ok(senet::DType::F32),
        Dt::BF16 => Ok(senet::DType::BF16),
        Dt::F16 => Ok(senet::DType::F16),
        Dt::F64 => Err(pyo3::exceptions::PyTypeError::new_err(
            "senet: float64 runs on the CPU only (the kernels take float32, bfloat16, float16)",
        )),
    }
}

/// Workspace bytes the CUDA op needs for this problem on device `device` (forward, or backward
/// when `backward`); senet_torch allocates them with torch.
#[pyfunction]
#[pyo3(signature = (dtype, layout, shape, hidden, bias, activation, gate, device, stream, backward))]
#[allow(clippy::too_many_arguments)]
fn cuda_workspace_bytes(
    dtype: &str,
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
    device: usize,
    stream: usize,
    backward: bool,
) -> PyResult<usize> {
    let p = problem(layout, shape, hidden, bias, activation, gate)?;
    cuda_path::workspace(&p, cuda_dtype(dtype)?, device, stream, backward)
}

/// [`forward`] on CUDA tensors of device `device`, queued on `stream` (torch's current stream)
/// with `workspace` (`workspace_len` bytes, from [`cuda_workspace_bytes`]).
#[pyfunction]
#[pyo3(signature = (dtype, layout, shape, hidden, bias, activation, gate, device, stream, x, residual, y, w1, b1, w2, b2, z, h, u, s, workspace, workspace_len))]
#[allow(clippy::too_many_arguments)]
fn forward_cuda(
    dtype: &str,
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
    device: usize,
    stream: usize,
    x: usize,
    residual: usize,
    y: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    z: usize,
    h: usize,
    u: usize,
    s: usize,
    workspace: usize,
    workspace_len: usize,
) -> PyResult<()> {
    let p = problem(layout, shape, hidden, bias, activation, gate)?;
    check_ptrs(&p.config, [w1, b1, w2, b2], [z, h, u, s])?;
    let ptr = cuda_path::CudaPtrs {
        x: req("x", x)?,
        residual,
        y_or_dy: req("y", y)?,
        w: [w1, b1, w2, b2],
        saved: [z, h, u, s],
        grads: [0; 6],
        workspace: (workspace, workspace_len),
    };
    // SAFETY: senet_torch allocated every buffer on `device` with torch for this problem and
    // keeps the tensors alive (torch's allocator orders reuse on the stream).
    unsafe {
        match cuda_dtype(dtype)? {
            senet::DType::F32 => cuda_path::forward::<f32>(&p, device, stream, &ptr),
            senet::DType::BF16 => cuda_path::forward::<bf16>(&p, device, stream, &ptr),
            _ => cuda_path::forward::<f16>(&p, device, stream, &ptr),
        }
    }
    .map_err(py_err)
}

/// [`backward`] on CUDA tensors (see [`forward_cuda`]).
#[pyfunction]
#[pyo3(signature = (dtype, layout, shape, hidden, bias, activation, gate, device, stream, x, residual, dy, w1, b1, w2, b2, z, h, u, s, dx, dresidual, dw1, db1, dw2, db2, workspace, workspace_len))]
#[allow(clippy::too_many_arguments)]
fn backward_cuda(
    dtype: &str,
    layout: &str,
    shape: (usize, usize, usize, usize),
    hidden: usize,
    bias: bool,
    activation: &str,
    gate: &str,
    device: usize,
    stream: usize,
    x: usize,
    residual: usize,
    dy: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    z: usize,
    h: usize,
    u: usize,
    s: usize,
    dx: usize,
    dresidual: usize,
    dw1: usize,
    db1: usize,
    dw2: usize,
    db2: usize,
    workspace: usize,
    workspace_len: usize,
) -> PyResult<()> {
    let p = problem(layout, shape, hidden, bias, activation, gate)?;
    check_ptrs(&p.config, [w1, b1, w2, b2], [z, h, u, s])?;
    let ptr = cuda_path::CudaPtrs {
        x: req("x", x)?,
        residual,
        y_or_dy: req("dy", dy)?,
        w: [w1, b1, w2, b2],
        saved: [z, h, u, s],
        grads: [
            req("dx", dx)?,
            dresidual,
            req("dw1", dw1)?,
            db1,
            req("dw2", dw2)?,
            db2,
        ],
        workspace: (workspace, workspace_len),
    };
    // SAFETY: as in forward_cuda.
    unsafe {
        match cuda_dtype(dtype)? {
            senet::DType::F32 => cuda_path::backward::<f32>(&p, device, stream, &ptr),
            senet::DType::BF16 => cuda_path::backward::<bf16>(&p, device, stream, &ptr),
            _ => cuda_path::backward::<f16>(&p, device, stream, &ptr),
        }
    }
    .map_err(py_err)
}

/// Chooses the threads CPU calls run on: `"openmp"` (torch's own OpenMP threads, the default
/// where torch's OpenMP runtime is loaded) or `"rayon"` (rayon's global pool). For benchmarks.
#[pyfunction]
fn set_cpu_pool(name: &str) -> PyResult<()> {
    omp::set_pool(name).map_err(PyValueError::new_err)
}

/// The pool CPU calls run on now: `"openmp"` or `"rayon"`.
#[pyfunction]
fn cpu_pool() -> &'static str {
    omp::pool()
}

/// How many threads a CPU call made now from this thread runs on (torch's OpenMP thread count
/// on this thread with the "openmp" pool, rayon's global pool size with "rayon").
#[pyfunction]
fn cpu_threads(py: Python<'_>) -> PyResult<usize> {
    py.detach(|| omp::run(false, rayon::current_num_threads))
        .map_err(PyRuntimeError::new_err)
}

/// The extension module `senet_torch._senet`.
#[pymodule]
fn _senet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_pool, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_pool, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_supported, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(forward_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(backward_cuda, m)?)?;
    Ok(())
}
