//! The CUDA backend: every op of [`Backend`] as kernels of `kernels/nn.cu` (convolutions as
//! implicit GEMMs, BatchNorm, pooling, linear, pointwise) and the crate's SE kernels, on a
//! [`CudaDevice`] — a GPU, or the CPU emulator of the kernels in tests.
//!
//! **Stage 1 of the CUDA network backend (see docs/cuda-network-backend.md).** The [`Backend`]
//! seam takes and returns host tensors, so each op uploads its inputs, runs its kernels and
//! downloads its outputs. That makes every kernel testable against the reference through the
//! unchanged network code, and `senet train --device cuda` correct, but not fast: activations
//! cross the bus on every op. Device-resident activations and parameters need the seam's
//! associated storage types (stage 2).
//!
//! f32 and NCHW only; reductions run in a fixed order, so results repeat bit for bit.

use super::{
    check_len, nchw, same_shape, tensor, Backend, BnStats, ConvGeom, PoolGeom, SeBackward,
};
use crate::cuda::abi::NnConvParams;
use crate::cuda::{Buf, CudaDevice, DeviceTensor, Module};
use crate::error::{Error, Result};
use crate::se::cuda::{self as se_gpu, DeviceSeSaved, DeviceSeWeights};
use crate::se::SeWeights;
use crate::tensor::{Layout, Shape, Tensor};
use std::ffi::c_void;
use std::sync::Arc;

/// The kernels' block size.
const THREADS: u32 = 256;
/// GEMM tile edge (TM = TN in nn.cu).
const TILE: usize = 64;
/// The most blocks along grid.y / grid.z.
const MAX_GRID_YZ: usize = 65_535;

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

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).clamp(1, 1 << 20) as u32
}

/// What the SE forward keeps for its backward: the device buffers of [`se_gpu::forward`].
#[derive(Clone)]
pub struct CudaSeSaved(Arc<DeviceSeSaved>);

impl std::fmt::Debug for CudaSeSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaSeSaved")
    }
}

/// The network backend on a CUDA device (f32, NCHW). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Cuda {
    dev: Arc<CudaDevice>,
    poison: bool,
}

impl Cuda {
    /// A backend on `dev` (a GPU from [`CudaDevice::new`], or [`CudaDevice::emulator`]).
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        Cuda { dev, poison: false }
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

    fn up<T: crate::cuda::DevElem>(&self, data: &[T]) -> Result<Buf<T>> {
        self.dev.upload(data)
    }

    /// A fresh output buffer (poisoned when asked).
    fn out<T: crate::cuda::DevElem>(&self, len: usize) -> Result<Buf<T>> {
        let mut b = self.dev.alloc_zeros::<T>(len)?;
        if self.poison {
            self.dev.fill_bytes(&mut b, 0, len.max(1), 0xff)?;
        }
        Ok(b)
    }

    fn down<T: crate::cuda::DevElem>(&self, b: &Buf<T>, len: usize) -> Result<Vec<T>> {
        self.dev.read(b, 0, len)
    }

    fn addr<T: crate::cuda::DevElem>(&self, b: &Buf<T>) -> u64 {
        self.dev.addr(b)
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

    /// A host tensor from a device buffer of `shape`.
    fn tensor_from(&self, b: &Buf<f32>, shape: Shape) -> Result<Tensor<f32>> {
        tensor(shape, self.down(b, shape.numel())?)
    }

    fn conv_params(&self, g: &ConvGeom, xs: Shape, ys: Shape) -> Result<NnConvParams> {
        // Every size, and the products the kernels form, fits a 32-bit signed integer.
        small("output pixels x batch", xs.n * ys.h * ys.w)?;
        small(
            "padded input pixels",
            (xs.h + g.padding) * (xs.w + g.padding),
        )?;
        small("output extent", (ys.h.max(ys.w) + 1) * g.stride + g.kernel)?;
        small(
            "output channels per group x taps",
            g.out_per_group() * g.kernel * g.kernel,
        )?;
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
            kdepth: small("convolution depth", g.in_per_group() * g.kernel * g.kernel)?,
            flags: 0,
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
        let most = most.min(MAX_GRID_YZ / g.groups.max(1)).max(1);
        let splits = want.clamp(1, most);
        let kps = k.div_ceil(splits).div_ceil(TK) * TK;
        let splits = k.div_ceil(kps.max(1)).max(1);
        (splits as u32, kps as u32)
    }

    /// Samples per launch so that samples x groups fits grid.z.
    fn sample_chunk(g: &ConvGeom) -> usize {
        (MAX_GRID_YZ / g.groups).max(1)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
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
        if m.div_ceil(TILE) > MAX_GRID_YZ {
            return Err(Error::Shape(format!("GEMM with {m} rows is too tall")));
        }
        let grid = (blocks(n, TILE), blocks(m, TILE), 1);
        // SAFETY: nn_gemm_f32(A, sa_m, sa_k, B, sb_k, sb_n, C, bias, M, N, K, accumulate); the
        // callers pass buffers of at least M*K (A), K*N (B), M*N (C) and N (bias) floats in the
        // strides given.
        unsafe { self.launch("nn_gemm_f32", grid, &mut args) }
    }

    /// out[c] (+)= sum over samples and positions of a (per-channel sums of `[n][c][hw]`).
    fn channel_sum(&self, a: u64, out: u64, s: Shape, accumulate: bool) -> Result<()> {
        let (n, c, hw, acc) = (
            small("batch", s.n)?,
            small("channels", s.c)?,
            s.hw() as u64,
            accumulate as u32,
        );
        let mut args = [arg(&a), arg(&out), arg(&n), arg(&c), arg(&hw), arg(&acc)];
        // SAFETY: nn_channel_sum_f32(a, out, n, c, hw, accumulate); a holds s.numel() floats,
        // out s.c.
        unsafe { self.launch("nn_channel_sum_f32", (c.max(1), 1, 1), &mut args) }
    }

    fn pointwise(&self, op: u32, a: &Tensor<f32>, b: Option<&Tensor<f32>>) -> Result<Tensor<f32>> {
        let s = a.shape();
        let total = s.numel() as u64;
        let ab = self.up(a.data())?;
        let bb = b.map(|b| self.up(b.data())).transpose()?;
        let y = self.out::<f32>(s.numel())?;
        let (ap, bp, yp) = (
            self.addr(&ab),
            bb.as_ref().map_or(0, |b| self.addr(b)),
            self.addr(&y),
        );
        let mut args = [arg(&op), arg(&ap), arg(&bp), arg(&yp), arg(&total)];
        // SAFETY: nn_pointwise_f32(op, a, b, y, total); a and y hold `total` floats, and b does
        // for the ops that read it (callers pass b for exactly those).
        unsafe {
            self.launch(
                "nn_pointwise_f32",
                (blocks(s.numel(), THREADS as usize), 1, 1),
                &mut args,
            )?
        };
        self.tensor_from(&y, s)
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

    fn check_pool_sizes(xs: Shape, ys: Shape, g: &PoolGeom) -> Result<()> {
        small("pool input plane", xs.hw())?;
        small("pool output plane", ys.hw())?;
        small(
            "pool extent",
            (ys.h.max(ys.w) + 1) * g.stride + g.kernel + xs.h.max(xs.w) + g.padding,
        )?;
        Ok(())
    }
}

const EW_RELU: u32 = 0;
const EW_RELU_BWD: u32 = 1;
const EW_ADD: u32 = 2;
const EW_ADD_RELU: u32 = 3;

impl Backend<f32> for Cuda {
    type SeSaved = CudaSeSaved;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn conv2d(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        g: &ConvGeom,
    ) -> Result<Tensor<f32>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        check_len("conv weight", w.len(), g.weight_len())?;
        if let Some(b) = b {
            check_len("conv bias", b.len(), g.out_ch)?;
        }
        let mut p = self.conv_params(g, xs, ys)?;
        if b.is_some() {
            p.flags |= crate::cuda::abi::SENET_NN_BIAS;
        }
        let xb = self.up(x.data())?;
        let wb = self.up(w)?;
        let bb = b.map(|b| self.up(b)).transpose()?;
        let y = self.out::<f32>(ys.numel())?;
        let chunk = Self::sample_chunk(g);
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let xp = self.addr(&xb) + (n0 * xs.sample_numel() * 4) as u64;
            let yp = self.addr(&y) + (n0 * ys.sample_numel() * 4) as u64;
            let (wp, bp) = (self.addr(&wb), bb.as_ref().map_or(0, |b| self.addr(b)));
            let mut args = [arg(&pc), arg(&xp), arg(&wp), arg(&bp), arg(&yp)];
            let grid = (
                blocks(ys.hw(), TILE),
                blocks(g.out_per_group(), TILE),
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_fwd_f32(p, x, w, bias, y): x and y point at sample n0 of buffers
            // holding xs and ys; nn samples follow; w holds the weight; bias out_ch floats when
            // the flag is set.
            unsafe { self.launch("nn_conv_fwd_f32", grid, &mut args)? };
        }
        self.tensor_from(&y, ys)
    }

    fn conv2d_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        g: &ConvGeom,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        need_dx: bool,
    ) -> Result<Option<Tensor<f32>>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        same_shape(nchw(dy, "conv gradient")?, ys, "conv gradient vs output")?;
        check_len("conv weight", w.len(), g.weight_len())?;
        check_len("conv weight gradient", dw.len(), g.weight_len())?;
        if let Some(db) = &db {
            check_len("conv bias gradient", db.len(), g.out_ch)?;
        }
        let mut p = self.conv_params(g, xs, ys)?;
        let xb = self.up(x.data())?;
        let dyb = self.up(dy.data())?;
        let (xp, dyp) = (self.addr(&xb), self.addr(&dyb));
        if let Some(db) = db {
            let dbb = self.up(db)?;
            self.channel_sum(dyp, self.addr(&dbb), ys, true)?;
            db.copy_from_slice(&self.down(&dbb, g.out_ch)?);
        }
        // Weight gradient (accumulated into dw's current values), split along its long depth
        // (samples x output pixels) when the output alone gives too few blocks.
        let dwb = self.up(dw)?;
        p.flags = crate::cuda::abi::SENET_NN_ACCUMULATE;
        let (splits, kps) = self.weight_grad_splits(g, xs.n * ys.hw());
        let partial = if splits > 1 {
            Some(self.out::<f32>(splits as usize * g.weight_len())?)
        } else {
            None
        };
        let (dwp, pp) = (
            self.addr(&dwb),
            partial.as_ref().map_or(0, |b| self.addr(b)),
        );
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
        if z > MAX_GRID_YZ {
            return Err(Error::Shape(format!("{} groups are too many", g.groups)));
        }
        let grid = (
            blocks(g.in_per_group() * g.kernel * g.kernel, TILE),
            blocks(g.out_per_group(), TILE),
            z as u32,
        );
        // SAFETY: nn_conv_bwd_weight_f32(p, x, dy, dw, partial, splits, k_per_split): x holds
        // xs, dy holds ys, dw the weight, partial splits weights when splits > 1; the splits
        // cover the depth (weight_grad_splits).
        unsafe { self.launch("nn_conv_bwd_weight_f32", grid, &mut args)? };
        if splits > 1 {
            let (len, acc) = (g.weight_len() as u64, 1u32);
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
        dw.copy_from_slice(&self.down(&dwb, g.weight_len())?);
        if !need_dx {
            return Ok(None);
        }
        let wb = self.up(w)?;
        let dx = self.out::<f32>(xs.numel())?;
        let chunk = Self::sample_chunk(g);
        p.flags = 0;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let dyp = self.addr(&dyb) + (n0 * ys.sample_numel() * 4) as u64;
            let dxp = self.addr(&dx) + (n0 * xs.sample_numel() * 4) as u64;
            let wp = self.addr(&wb);
            let mut args = [arg(&pc), arg(&dyp), arg(&wp), arg(&dxp)];
            let grid = (
                blocks(xs.hw(), TILE),
                blocks(g.in_per_group(), TILE),
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_bwd_data_f32(p, dy, w, dx): dy and dx point at sample n0 of
            // buffers holding ys and xs; w holds the weight.
            unsafe { self.launch("nn_conv_bwd_data_f32", grid, &mut args)? };
        }
        Ok(Some(self.tensor_from(&dx, xs)?))
    }

    fn batch_norm_stats(&self, x: &Tensor<f32>) -> Result<BnStats> {
        let s = nchw(x, "batch norm input")?;
        let xb = self.up(x.data())?;
        let mean = self.out::<f64>(s.c)?;
        let var = self.out::<f64>(s.c)?;
        let (xp, mp, vp) = (self.addr(&xb), self.addr(&mean), self.addr(&var));
        let (n, c, hw) = (small("batch", s.n)?, small("channels", s.c)?, s.hw() as u64);
        let mut args = [arg(&xp), arg(&mp), arg(&vp), arg(&n), arg(&c), arg(&hw)];
        // SAFETY: nn_bn_stats_f32(x, mean, var, n, c, hw): x holds s, mean and var c doubles.
        unsafe { self.launch("nn_bn_stats_f32", (c.max(1), 1, 1), &mut args)? };
        Ok(BnStats {
            mean: self.down(&mean, s.c)?,
            var: self.down(&var, s.c)?,
        })
    }

    fn channel_affine(
        &self,
        x: Tensor<f32>,
        a: &[f32],
        b: &[f32],
        relu: bool,
    ) -> Result<Tensor<f32>> {
        let s = nchw(&x, "channel affine input")?;
        check_len("channel scale", a.len(), s.c)?;
        check_len("channel shift", b.len(), s.c)?;
        let xb = self.up(x.data())?;
        let (ab, bb) = (self.up(a)?, self.up(b)?);
        let y = self.out::<f32>(s.numel())?;
        let (xp, yp, ap, bp) = (
            self.addr(&xb),
            self.addr(&y),
            self.addr(&ab),
            self.addr(&bb),
        );
        let (total, c, hw, r) = (
            s.numel() as u64,
            small("channels", s.c)?,
            s.hw() as u64,
            relu as u32,
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
        ];
        // SAFETY: nn_affine_f32(x, y, a, b, total, c, hw, relu): x, y hold `total` floats, a, b
        // hold c.
        unsafe {
            self.launch(
                "nn_affine_f32",
                (blocks(s.numel(), THREADS as usize), 1, 1),
                &mut args,
            )?
        };
        self.tensor_from(&y, s)
    }

    fn batch_norm_backward(
        &self,
        x: &Tensor<f32>,
        dy: &Tensor<f32>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<Tensor<f32>> {
        let s = nchw(x, "batch norm input")?;
        same_shape(nchw(dy, "batch norm gradient")?, s, "batch norm gradient")?;
        for (what, len) in [
            ("batch norm mean", mean.len()),
            ("batch norm invstd", invstd.len()),
            ("batch norm weight", gamma.len()),
            ("batch norm weight gradient", dgamma.len()),
            ("batch norm bias gradient", dbeta.len()),
        ] {
            check_len(what, len, s.c)?;
        }
        let (xb, dyb) = (self.up(x.data())?, self.up(dy.data())?);
        let (mb, ib, gb) = (self.up(mean)?, self.up(invstd)?, self.up(gamma)?);
        let (dgb, dbb) = (self.up(dgamma)?, self.up(dbeta)?);
        let dx = self.out::<f32>(s.numel())?;
        let ptrs = [
            self.addr(&xb),
            self.addr(&dyb),
            self.addr(&mb),
            self.addr(&ib),
            self.addr(&gb),
            self.addr(&dgb),
            self.addr(&dbb),
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
            arg(&n),
            arg(&c),
            arg(&hw),
            arg(&bs),
        ];
        // SAFETY: nn_bn_bwd_f32(x, dy, mean, invstd, gamma, dgamma, dbeta, dx, n, c, hw,
        // batch_stats): x, dy, dx hold s; the per-channel buffers c elements each.
        unsafe { self.launch("nn_bn_bwd_f32", (c.max(1), 1, 1), &mut args)? };
        dgamma.copy_from_slice(&self.down(&dgb, s.c)?);
        dbeta.copy_from_slice(&self.down(&dbb, s.c)?);
        self.tensor_from(&dx, s)
    }

    fn relu(&self, x: Tensor<f32>) -> Result<Tensor<f32>> {
        nchw(&x, "relu input")?;
        self.pointwise(EW_RELU, &x, None)
    }

    fn relu_backward(&self, y: &Tensor<f32>, dy: Tensor<f32>) -> Result<Tensor<f32>> {
        same_shape(nchw(&dy, "relu gradient")?, nchw(y, "relu output")?, "relu")?;
        self.pointwise(EW_RELU_BWD, &dy, Some(y))
    }

    fn add(&self, a: Tensor<f32>, b: &Tensor<f32>, relu: bool) -> Result<Tensor<f32>> {
        same_shape(nchw(&a, "add lhs")?, nchw(b, "add rhs")?, "residual add")?;
        self.pointwise(if relu { EW_ADD_RELU } else { EW_ADD }, &a, Some(b))
    }

    fn max_pool2d(&self, x: &Tensor<f32>, g: &PoolGeom) -> Result<(Tensor<f32>, Vec<u32>)> {
        let xs = nchw(x, "max pool input")?;
        let ys = g.output_shape(xs)?;
        super::reference::index_fits(xs)?;
        Self::check_pool_sizes(xs, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, xs, ys)?;
        let xb = self.up(x.data())?;
        let y = self.out::<f32>(ys.numel())?;
        let am = self.out::<u32>(ys.numel())?;
        let (xp, yp, ap) = (self.addr(&xb), self.addr(&y), self.addr(&am));
        let mut args = [
            arg(&xp),
            arg(&yp),
            arg(&ap),
            arg(&nc),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
        ];
        let grid = (
            blocks(ys.hw(), THREADS as usize),
            (nc as usize).clamp(1, MAX_GRID_YZ) as u32,
            1,
        );
        // SAFETY: nn_maxpool_fwd_f32(x, y, arg, nc, h, w, oh, ow, k, s, pad): x holds xs, y and
        // arg hold ys.
        unsafe { self.launch("nn_maxpool_fwd_f32", grid, &mut args)? };
        Ok((self.tensor_from(&y, ys)?, self.down(&am, ys.numel())?))
    }

    fn max_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        argmax: &[u32],
        input: Shape,
    ) -> Result<Tensor<f32>> {
        let ys = nchw(dy, "max pool gradient")?;
        check_len("max pool indices", argmax.len(), ys.numel())?;
        if ys.n != input.n || ys.c != input.c {
            return Err(Error::Shape(format!(
                "max pool gradient {ys} does not match input {input}"
            )));
        }
        // The kernel gives each (sample, channel) plane to one thread: every index must lie in
        // its own output's plane.
        let (ip, op) = (input.hw(), ys.hw());
        for (o, &i) in argmax.iter().enumerate() {
            let plane = o / op.max(1);
            if (i as usize) / ip.max(1) != plane || i as usize >= input.numel() {
                return Err(Error::Shape(format!(
                    "max pool index {i} of output {o} lies outside its plane of input {input}"
                )));
            }
        }
        let nc = (input.n * input.c) as u64;
        let dyb = self.up(dy.data())?;
        let ab = self.up(argmax)?;
        let dx = self.out::<f32>(input.numel())?;
        let (dyp, ap, dxp) = (self.addr(&dyb), self.addr(&ab), self.addr(&dx));
        let (ipu, opu) = (ip as u64, op as u64);
        let mut args = [
            arg(&dyp),
            arg(&ap),
            arg(&dxp),
            arg(&nc),
            arg(&ipu),
            arg(&opu),
        ];
        // SAFETY: nn_maxpool_bwd_f32(dy, arg, dx, nc, in_plane, out_plane): dy and arg hold
        // nc * out_plane elements, every index checked to lie in its plane of dx (nc * in_plane).
        unsafe {
            self.launch(
                "nn_maxpool_bwd_f32",
                (blocks(nc as usize, THREADS as usize), 1, 1),
                &mut args,
            )?
        };
        self.tensor_from(&dx, input)
    }

    fn avg_pool2d(&self, x: &Tensor<f32>, g: &PoolGeom) -> Result<Tensor<f32>> {
        let xs = nchw(x, "avg pool input")?;
        let ys = g.output_shape(xs)?;
        Self::check_pool_sizes(xs, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, xs, ys)?;
        let inc = g.count_include_pad as u32;
        let xb = self.up(x.data())?;
        let y = self.out::<f32>(ys.numel())?;
        let (xp, yp) = (self.addr(&xb), self.addr(&y));
        let mut args = [
            arg(&xp),
            arg(&yp),
            arg(&nc),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&inc),
        ];
        let grid = (
            blocks(ys.hw(), THREADS as usize),
            (nc as usize).clamp(1, MAX_GRID_YZ) as u32,
            1,
        );
        // SAFETY: nn_avgpool_fwd_f32(x, y, nc, h, w, oh, ow, k, s, pad, include_pad): x holds
        // xs, y ys.
        unsafe { self.launch("nn_avgpool_fwd_f32", grid, &mut args)? };
        self.tensor_from(&y, ys)
    }

    fn avg_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        g: &PoolGeom,
        input: Shape,
    ) -> Result<Tensor<f32>> {
        let ys = nchw(dy, "avg pool gradient")?;
        same_shape(ys, g.output_shape(input)?, "avg pool gradient vs output")?;
        Self::check_pool_sizes(input, ys, g)?;
        let [nc, h, w, oh, ow, k, st, pad] = Self::pool_args(g, input, ys)?;
        let inc = g.count_include_pad as u32;
        let dyb = self.up(dy.data())?;
        let q = self.out::<f32>(ys.numel())?;
        let dx = self.out::<f32>(input.numel())?;
        let (dyp, qp, dxp) = (self.addr(&dyb), self.addr(&q), self.addr(&dx));
        let planes = (nc as usize).clamp(1, MAX_GRID_YZ) as u32;
        let mut args = [
            arg(&dyp),
            arg(&qp),
            arg(&nc),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
            arg(&inc),
        ];
        // SAFETY: nn_avgpool_div_f32(dy, q, nc, h, w, oh, ow, k, s, pad, include_pad): dy and
        // q hold ys.
        unsafe {
            self.launch(
                "nn_avgpool_div_f32",
                (blocks(ys.hw(), THREADS as usize), planes, 1),
                &mut args,
            )?
        };
        let mut args = [
            arg(&qp),
            arg(&dxp),
            arg(&nc),
            arg(&h),
            arg(&w),
            arg(&oh),
            arg(&ow),
            arg(&k),
            arg(&st),
            arg(&pad),
        ];
        // SAFETY: nn_avgpool_bwd_f32(q, dx, nc, h, w, oh, ow, k, s, pad): q holds ys, dx input.
        unsafe {
            self.launch(
                "nn_avgpool_bwd_f32",
                (blocks(input.hw(), THREADS as usize), planes, 1),
                &mut args,
            )?
        };
        self.tensor_from(&dx, input)
    }

    fn global_avg_pool(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = nchw(x, "global pool input")?;
        let planes = s.n * s.c;
        if planes > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "global pool over {s}: too many planes"
            )));
        }
        let xb = self.up(x.data())?;
        let y = self.out::<f32>(planes)?;
        let (xp, yp, hw) = (self.addr(&xb), self.addr(&y), s.hw() as u64);
        let mut args = [arg(&xp), arg(&yp), arg(&hw)];
        // SAFETY: nn_gap_fwd_f32(x, y, hw): x holds planes * hw floats, y planes.
        unsafe { self.launch("nn_gap_fwd_f32", ((planes as u32).max(1), 1, 1), &mut args)? };
        self.tensor_from(&y, Shape::new(s.n, s.c, 1, 1))
    }

    fn global_avg_pool_backward(&self, dy: &Tensor<f32>, input: Shape) -> Result<Tensor<f32>> {
        same_shape(
            nchw(dy, "global pool gradient")?,
            Shape::new(input.n, input.c, 1, 1),
            "global pool gradient",
        )?;
        let dyb = self.up(dy.data())?;
        let dx = self.out::<f32>(input.numel())?;
        let (dyp, dxp) = (self.addr(&dyb), self.addr(&dx));
        let (total, hw) = (input.numel() as u64, input.hw() as u64);
        let mut args = [arg(&dyp), arg(&dxp), arg(&total), arg(&hw)];
        // SAFETY: nn_gap_bwd_f32(dy, dx, total, hw): dy holds total / hw floats, dx total.
        unsafe {
            self.launch(
                "nn_gap_bwd_f32",
                (blocks(input.numel(), THREADS as usize), 1, 1),
                &mut args,
            )?
        };
        self.tensor_from(&dx, input)
    }

    fn linear(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        out: usize,
    ) -> Result<Tensor<f32>> {
        let s = nchw(x, "linear input")?;
        let k = s.sample_numel();
        check_len("linear weight", w.len(), out * k)?;
        if let Some(b) = b {
            check_len("linear bias", b.len(), out)?;
        }
        let ys = Shape::try_new(s.n, out, 1, 1)?;
        let (xb, wb) = (self.up(x.data())?, self.up(w)?);
        let bb = b.map(|b| self.up(b)).transpose()?;
        let y = self.out::<f32>(ys.numel())?;
        let ki = small("linear inputs", k)? as i64;
        // y[n][o] = sum_j x[n][j] W[o][j] + b[o]
        self.gemm(
            self.addr(&xb),
            (ki, 1),
            self.addr(&wb),
            (1, ki),
            self.addr(&y),
            bb.as_ref().map_or(0, |b| self.addr(b)),
            (s.n, out, k),
            false,
        )?;
        self.tensor_from(&y, ys)
    }

    fn linear_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> Result<Tensor<f32>> {
        let s = nchw(x, "linear input")?;
        let ds = nchw(dy, "linear gradient")?;
        let (k, out) = (s.sample_numel(), ds.c);
        same_shape(ds, Shape::new(s.n, out, 1, 1), "linear gradient")?;
        check_len("linear weight", w.len(), out * k)?;
        check_len("linear weight gradient", dw.len(), out * k)?;
        if let Some(db) = &db {
            check_len("linear bias gradient", db.len(), out)?;
        }
        let (xb, wb, dyb) = (self.up(x.data())?, self.up(w)?, self.up(dy.data())?);
        let (ki, oi) = (
            small("linear inputs", k)? as i64,
            small("linear outputs", out)? as i64,
        );
        if let Some(db) = db {
            let dbb = self.up(db)?;
            self.channel_sum(self.addr(&dyb), self.addr(&dbb), ds, true)?;
            db.copy_from_slice(&self.down(&dbb, out)?);
        }
        // dW[o][j] += sum_n dy[n][o] x[n][j]
        let dwb = self.up(dw)?;
        self.gemm(
            self.addr(&dyb),
            (1, oi),
            self.addr(&xb),
            (ki, 1),
            self.addr(&dwb),
            0,
            (out, k, s.n),
            true,
        )?;
        dw.copy_from_slice(&self.down(&dwb, out * k)?);
        // dx[n][j] = sum_o dy[n][o] W[o][j]
        let dx = self.out::<f32>(s.numel())?;
        self.gemm(
            self.addr(&dyb),
            (oi, 1),
            self.addr(&wb),
            (ki, 1),
            self.addr(&dx),
            0,
            (s.n, k, out),
            false,
        )?;
        self.tensor_from(&dx, s)
    }

    fn se_forward(
        &self,
        w: &SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
    ) -> Result<(Tensor<f32>, Self::SeSaved)> {
        nchw(x, "SE input")?;
        let dw = DeviceSeWeights::upload(&self.dev, w)?;
        let xd = DeviceTensor::from_host(&self.dev, x)?;
        let rd = residual
            .map(|r| DeviceTensor::from_host(&self.dev, r))
            .transpose()?;
        let out = se_gpu::forward(&self.dev, &dw, &xd, rd.as_ref(), Default::default())?;
        Ok((out.y.to_host(&self.dev)?, CudaSeSaved(Arc::new(out.saved))))
    }

    fn se_backward(
        &self,
        w: &SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
        saved: &Self::SeSaved,
        dy: &Tensor<f32>,
    ) -> Result<SeBackward<f32>> {
        nchw(x, "SE input")?;
        let dw = DeviceSeWeights::upload(&self.dev, w)?;
        let xd = DeviceTensor::from_host(&self.dev, x)?;
        let rd = residual
            .map(|r| DeviceTensor::from_host(&self.dev, r))
            .transpose()?;
        let dyd = DeviceTensor::from_host(&self.dev, dy)?;
        let b = se_gpu::backward(
            &self.dev,
            &dw,
            &xd,
            rd.as_ref(),
            &saved.0,
            &dyd,
            Default::default(),
        )?;
        let grads = b.grads.download(&self.dev)?;
        let to_nchw = |t: Tensor<f32>| -> Result<Tensor<f32>> {
            if t.layout() == Layout::Nchw {
                Ok(t)
            } else {
                Ok(t.to_layout(Layout::Nchw))
            }
        };
        Ok(SeBackward {
            dx: to_nchw(b.dx.to_host(&self.dev)?)?,
            grads: crate::se::check::widen_grads(&grads),
            dresidual: b
                .dresidual
                .map(|d| d.to_host(&self.dev).and_then(to_nchw))
                .transpose()?,
        })
    }
}
