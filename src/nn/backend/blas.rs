//! cuBLAS for the im2col convolution engine ([`super::ConvEngine::Cublas`]): cudarc's `cublas`
//! bindings, the library loaded at run time. One handle on the device's stream; every GEMM is
//! `cublasGemmStridedBatchedEx` with f32 compute (TF32 only where the mode allows it). On the
//! kernel emulator the CUDA backend runs `nn_blas_*` from kernels/nn_conv.cu instead, a GEMM with
//! this call's exact column-major contract, so CI checks every argument the backend passes.

use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys};
use cudarc::driver::CudaStream;
use std::ffi::{c_int, c_longlong, c_void};
use std::fmt;
use std::sync::{Arc, Mutex};

/// Every cuBLAS function this module calls.
const SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetMathMode",
    "cublasGemmStridedBatchedEx",
];

/// Whether a usable cuBLAS loads (on the loader's path, with every function senet calls), or
/// why not. Needs no GPU.
pub fn cublas_available() -> std::result::Result<(), String> {
    // Probed by senet, not cudarc (which panics on a missing library).
    let lib = crate::cuda::libs::open("cublas")
        .ok_or_else(|| "libcublas is not on the library path".to_string())?;
    match crate::cuda::libs::missing_symbol(&lib, SYMBOLS) {
        Some(name) => Err(format!("the cuBLAS library found lacks {name}")),
        None => Ok(()),
    }
}

/// The element type of GEMM operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlasType {
    F32,
    Bf16,
    F16,
}

impl BlasType {
    fn data_type(self) -> sys::cudaDataType {
        match self {
            BlasType::F32 => sys::cudaDataType::CUDA_R_32F,
            BlasType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            BlasType::F16 => sys::cudaDataType::CUDA_R_16F,
        }
    }
}

/// One strided-batched GEMM, cuBLAS's column-major contract: for z in 0..batch,
/// `C_z = op(A_z) op(B_z) + beta C_z` with op(A) m x k, op(B) k x n, `X_z = X + z stride_x`
/// (elements), leading dimensions in elements; C is not read when beta is 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    /// 0 (write C) or 1 (add to C).
    pub beta: f32,
}

fn int(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds cuBLAS's 32-bit sizes")))
}

struct Inner {
    handle: sys::cublasHandle_t,
    /// Keeps the stream (and its context) alive until the handle is destroyed.
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is a plain cuBLAS object; `Blas` only touches it under its mutex, with the
// handle's context bound first.
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: created by create_handle and destroyed only here.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}

/// A cuBLAS handle on the device's stream.
pub(crate) struct Blas {
    inner: Mutex<Inner>,
    tf32: bool,
}

impl fmt::Debug for Blas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuBLAS (tf32 {})", self.tf32)
    }
}

impl Blas {
    /// Opens cuBLAS on `dev`'s stream; `tf32` lets f32 GEMMs use TF32 tensor cores. Errors
    /// (never panics) on the emulator and when no usable library loads.
    pub(crate) fn open(dev: &CudaDevice, tf32: bool) -> Result<Blas> {
        let (Some(stream), Some(ctx)) = (dev.stream(), dev.context()) else {
            return Err(Error::Unsupported(
                "cuBLAS needs a GPU; the kernel emulator runs senet's stand-in GEMM".into(),
            ));
        };
        cublas_available().map_err(|e| Error::Unsupported(format!("cuBLAS: {e}")))?;
        ctx.bind_to_thread()
            .map_err(Error::driver("binding the context for cuBLAS"))?;
        let handle = blas::create_handle()
            .map_err(|e| Error::Unsupported(format!("cuBLAS: creating a handle: {e:?}")))?;
        let inner = Inner {
            handle,
            stream: stream.clone(),
        };
        // SAFETY: a live handle; the stream belongs to the device's context, which is current.
        unsafe { blas::set_stream(inner.handle, stream.cu_stream() as *mut _) }
            .map_err(|e| Error::Unsupported(format!("cuBLAS: setting the stream: {e:?}")))?;
        // Default math, and no reduced-precision reductions: a bf16 / f16 output is rounded
        // once from f32 sums (split-K partials stay f32), as the emulator's stand-in does.
        // (DEFAULT_MATH is 0, so the flag alone is the combination.)
        // SAFETY: a live handle whose context is current.
        let status = unsafe {
            sys::cublasSetMathMode(
                inner.handle,
                sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Unsupported(format!(
                "cuBLAS: setting the math mode: {status:?}"
            )));
        }
        Ok(Blas {
            inner: Mutex::new(inner),
            tf32,
        })
    }

    /// Runs `g` on the device's stream (asynchronously), A and B of `ab`, C of `c`, f32 compute.
    ///
    /// # Safety
    /// The addresses in `g` hold what its sizes, leading dimensions and strides reach, in
    /// those types, on this handle's device.
    pub(crate) unsafe fn gemm(
        &self,
        dev: &CudaDevice,
        g: &Gemm,
        ab: BlasType,
        c: BlasType,
    ) -> Result<()> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !dev.stream().is_some_and(|s| Arc::ptr_eq(s, &inner.stream)) {
            return Err(Error::Config(
                "a cuBLAS handle used with another device's backend".into(),
            ));
        }
        // The handle's own context.
        inner
            .stream
            .context()
            .bind_to_thread()
            .map_err(Error::driver("binding the context for cuBLAS"))?;
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let compute = if self.tf32 && ab == BlasType::F32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let (alpha, beta) = (1.0f32, g.beta);
        let stride = |v: usize| v as c_longlong;
        // SAFETY: the handle is live and its context current; the operands are as this
        // function's contract says; alpha and beta point at f32s, the scaling type of f32
        // compute.
        unsafe {
            blas::gemm_strided_batched_ex(
                inner.handle,
                op(g.transa),
                op(g.transb),
                int("GEMM rows", g.m)?,
                int("GEMM columns", g.n)?,
                int("GEMM depth", g.k)?,
                &alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                ab.data_type(),
                int("lda", g.lda)?,
                stride(g.stride_a),
                g.b as *const c_void,
                ab.data_type(),
                int("ldb", g.ldb)?,
                stride(g.stride_b),
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                c.data_type(),
                int("ldc", g.ldc)?,
                stride(g.stride_c),
                int("GEMM batch", g.batch)?,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Unsupported(format!("cuBLAS GEMM: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS needs a GPU: on the emulator opening it is an error saying so (the backend runs
    /// the stand-in GEMM there instead), never a panic.
    #[test]
    fn cublas_refuses_the_emulator() {
        let Ok(dev) = CudaDevice::emulator() else {
            return;
        };
        let e = Blas::open(&dev, false).unwrap_err();
        assert!(e.to_string().contains("needs a GPU"), "{e}");
    }

    /// Where the library is on the loader's path (CI adds PyTorch's), every function senet
    /// calls resolves; elsewhere the reason is said.
    #[test]
    fn cublas_availability_is_reported() {
        match cublas_available() {
            Ok(()) => {}
            Err(e) => {
                assert!(!e.is_empty());
                eprintln!("skipped: {e}");
            }
        }
    }
}
