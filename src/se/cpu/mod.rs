//! The fast CPU path: SE forward, backward and the fused residual epilogue, multi-threaded with
//! rayon, for every [`Element`] type (f32, f16 and bf16 in bulk; f64 works too) in NCHW and NHWC.
//!
//! This file holds the public types and entry points; the work is in `problem` (the pass order
//! a call runs and the passes over samples), `segments` (the elementwise runs: scale, epilogue,
//! per-channel sums, dx), `excite` (the FC layers' small GEMMs and their SIMD dot kernels),
//! `convert` (f16 / bf16 to and from f32 in bulk) and `math` (sums, dots, fast exp, gates).
//!
//! # Contract
//!
//! The same math as [`super::reference`] (see DESIGN.md), with f32 weights and f32 accumulation
//! whatever the element type: f16/bf16 activations are widened in bulk into small stack buffers,
//! computed on in f32 and rounded (to nearest even) once on the way out. Results agree with the
//! f64 reference within DESIGN.md's tolerances.
//!
//! # How it is fast
//!
//! SE is memory-bound: forward must read x and write y (2N bytes for an N-byte tensor), backward
//! must read dy and x and write dx (3N). The pass over x that computes the channel means and the
//! pass that scales it are split by the excitation, so the second pass only runs at memory speed
//! if the sample is still in cache. The work is therefore cut by samples:
//!
//! - Many samples (at least two per thread): each rayon task owns a group of whole samples
//!   (up to [`GROUP_BYTES`] of them, at most [`TILE`]) and runs squeeze, excitation and scale on
//!   them back to back, so x comes from memory once and the excitation's small GEMMs read each
//!   weight row once per group (AVX-512 or AVX2+FMA kernels chosen at run time where the CPU
//!   has them). No barriers: one thread's reads overlap another's writes.
//! - Backward where the weights outweigh a group's activations (ResNet-50's last stage): each
//!   pass over the whole batch instead, with the excitation's four GEMMs (du, dz, dW1, dW2)
//!   over all samples at once, so the weights are read once per call.
//! - Few samples (batch 1): one sample at a time, with the squeeze and the scale each split over
//!   the threads (channel rows for NCHW, channel blocks or pixel rows for NHWC).
//!
//! [`Schedule`] names these orders; [`with_schedule`] forces one (benchmarks, tests). Parameter
//! gradients are GEMMs over all samples once every group is done (the `gemm` crate).
//!
//! # Saved state
//!
//! [`CpuSaved`] keeps z, h (hidden pre-activation), u = act(h) and s, each `[n][..]` f32 (the
//! device path's layout). The gate's derivative is taken from s: sigmoid' = s(1 - s),
//! hard-sigmoid' = 1/6 where 0 < s < 1. The epilogue's ReLU mask is recomputed in backward as
//! `s * x + residual > 0`, with the same f32 expression forward used.

use super::{check_activation, check_saved_len, check_shapes, weights::check_len};
use super::{Activation, Gate, SeConfig, SeGrads, SeGradsMut, SeWeights, SeWeightsRef};
use crate::error::{Error, Result};
use crate::linalg::{sgemm, sgemm_scaled};
use crate::tensor::{DType, Element, Layout, Shape, Tensor};
use gemm::Parallelism;
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::size_of;

/// Elements converted at a time between f16/bf16 and the f32 stack buffers.
const PIECE: usize = 512;
/// Most samples one task owns: the excitation GEMMs are register-tiled over this many samples.
pub const TILE: usize = 4;
/// Bytes of input one task's sample group may span: small enough to stay cached (L2, else the
/// L3) between the squeeze and the scale, large enough that ResNet-50's last stage (400 KB f32
/// samples) fills a [`TILE`]-sample GEMM tile (measured in benches/NOTES.md).
pub const GROUP_BYTES: usize = 2 << 20;
/// Smallest number of elements a parallel piece of one sample gets (batch-1 path).
const MIN_TASK_ELEMS: usize = 16 * 1024;

// ------------------------------------------------------------------------------ public types

/// What [`forward`] keeps for [`backward`]: all `[n][..]`, row-major, f32.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuSaved {
    /// Squeezed means, `[n][channels]`.
    pub z: Vec<f32>,
    /// Hidden pre-activation `W1 z + b1`, `[n][hidden]`.
    pub h: Vec<f32>,
    /// Hidden activation `act(h)`, `[n][hidden]`.
    pub u: Vec<f32>,
    /// Channel weights `gate(W2 u + b2)`, `[n][channels]`.
    pub s: Vec<f32>,
}

impl CpuSaved {
    /// Zeroed buffers sized for `n` samples of `config` (to pass to [`forward_into`]).
    pub fn new(config: &SeConfig, n: usize) -> Self {
        let (c, d) = (config.channels, config.hidden);
        CpuSaved {
            z: vec![0.0; n * c],
            h: vec![0.0; n * d],
            u: vec![0.0; n * d],
            s: vec![0.0; n * c],
        }
    }

    /// The saved state as borrowed slices (for [`backward_slices`]).
    pub fn view(&self) -> CpuSavedRef<'_> {
        CpuSavedRef {
            z: &self.z,
            h: &self.h,
            u: &self.u,
            s: &self.s,
        }
    }

    /// The buffers as borrowed mutable slices (for [`forward_slices`]).
    pub fn view_mut(&mut self) -> CpuSavedMut<'_> {
        CpuSavedMut {
            z: &mut self.z,
            h: &mut self.h,
            u: &mut self.u,
            s: &mut self.s,
        }
    }
}

/// [`CpuSaved`] in someone else's buffers, read by backward: `z`, `s` `[n][channels]`, `h`, `u`
/// `[n][hidden]`, f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuSavedRef<'a> {
    /// Squeezed means.
    pub z: &'a [f32],
    /// Hidden pre-activation.
    pub h: &'a [f32],
    /// Hidden activation.
    pub u: &'a [f32],
    /// Channel weights.
    pub s: &'a [f32],
}

/// Buffers forward writes its saved state into (shaped as [`CpuSavedRef`]).
#[derive(Debug, PartialEq)]
pub struct CpuSavedMut<'a> {
    /// Squeezed means.
    pub z: &'a mut [f32],
    /// Hidden pre-activation.
    pub h: &'a mut [f32],
    /// Hidden activation.
    pub u: &'a mut [f32],
    /// Channel weights.
    pub s: &'a mut [f32],
}

fn check_saved(lens: [usize; 4], n: usize, c: usize, d: usize) -> Result<()> {
    let [z, h, u, s] = lens;
    check_saved_len(n, c, d, z, h, s)?;
    check_len("saved u", u, n * d)
}

/// One forward call's operands as slices: `x`, `residual`, `y` hold the shape's elements in its
/// layout; with `residual` the fused epilogue `y = relu(s * x + residual)` runs.
#[derive(Debug)]
pub struct SeForwardSlices<'a, T> {
    /// The input.
    pub x: &'a [T],
    /// The residual of the fused epilogue.
    pub residual: Option<&'a [T]>,
    /// The output.
    pub y: &'a mut [T],
    /// The weights (their config is the op's).
    pub weights: SeWeightsRef<'a>,
    /// Where forward writes what backward needs.
    pub saved: CpuSavedMut<'a>,
}

/// One backward call's operands as slices. With `accumulate`, `dx` gets the gradient added to
/// what it holds; parameter gradients are overwritten; `dresidual` is given exactly when
/// `residual` is.
#[derive(Debug)]
pub struct SeBackwardSlices<'a, T> {
    /// The forward's input.
    pub x: &'a [T],
    /// The forward's residual.
    pub residual: Option<&'a [T]>,
    /// d loss / d y.
    pub dy: &'a [T],
    /// The weights.
    pub weights: SeWeightsRef<'a>,
    /// What forward saved.
    pub saved: CpuSavedRef<'a>,
    /// d loss / d x.
    pub dx: &'a mut [T],
    /// Add to `dx` instead of overwriting it.
    pub accumulate: bool,
    /// d loss / d residual.
    pub dresidual: Option<&'a mut [T]>,
    /// Parameter gradients.
    pub grads: SeGradsMut<'a>,
}

/// [`forward`]'s results.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuForward<T> {
    /// The output, in the input's shape and layout.
    pub y: Tensor<T>,
    /// What backward needs.
    pub saved: CpuSaved,
}

/// [`backward`]'s results.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBackward<T> {
    /// d loss / d x, in the input's layout.
    pub dx: Tensor<T>,
    /// Parameter gradients (f32).
    pub grads: SeGrads<f32>,
    /// d loss / d residual (the epilogue only): dy through the ReLU mask.
    pub dresidual: Option<Tensor<T>>,
}

/// Zeroed parameter gradients shaped for `config` (to pass to [`backward_into`]).
pub fn zero_grads(config: &SeConfig) -> SeGrads<f32> {
    let (c, d) = (config.channels, config.hidden);
    SeGrads {
        dw1: vec![0.0; d * c],
        db1: config.bias.then(|| vec![0.0; d]),
        dw2: vec![0.0; c * d],
        db2: config.bias.then(|| vec![0.0; c]),
    }
}

/// How the CPU path orders its passes over a batch (see the module docs). [`Schedule::Auto`]
/// picks from the shape; the others force one order, for benchmarks and tests
/// ([`with_schedule`]). Every schedule computes the same values up to f32 rounding order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Chosen per call from the shape and the thread count.
    #[default]
    Auto,
    /// Each task owns a group of whole samples and runs squeeze, excitation and scale on it
    /// while it is cached; the weights are read once per group.
    Grouped,
    /// Each pass over the whole batch: squeeze every sample, then each FC as one GEMM over all
    /// samples (weights read once), then scale every sample. Pays a second read of x, from the
    /// cache when the batch fits in it.
    Batched,
    /// One sample at a time, each pass split over the threads.
    PerSample,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Schedule::Auto),
            "grouped" => Ok(Schedule::Grouped),
            "batched" => Ok(Schedule::Batched),
            "per-sample" | "per_sample" | "persample" => Ok(Schedule::PerSample),
            _ => Err(Error::Config(format!(
                "unknown CPU schedule `{s}` (auto, grouped, batched, per-sample)"
            ))),
        }
    }
}

thread_local! {
    /// The schedule [`with_schedule`] forces on this thread's calls.
    static SCHEDULE: std::cell::Cell<Schedule> = const { std::cell::Cell::new(Schedule::Auto) };
}

/// Runs `f` with every CPU SE call made from this thread forced to `schedule` (restored
/// afterwards, also when `f` panics). Calls made on other threads are not affected.
pub fn with_schedule<R>(schedule: Schedule, f: impl FnOnce() -> R) -> R {
    struct Restore(Schedule);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCHEDULE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SCHEDULE.with(|c| c.replace(schedule)));
    f()
}

// ------------------------------------------------------------------------------ entry points

/// SE forward. With `residual`, the fused epilogue `y = relu(s * x + residual)`; otherwise
/// `y = s * x`.
///
/// Errors (never panics) when the weights are inconsistent, `x` does not have
/// `config.channels` channels, or `residual` differs from `x` in shape or layout.
pub fn forward<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
) -> Result<CpuForward<T>> {
    check_activation(w, x, residual, None)?;
    let mut y = Tensor::zeros(x.shape(), x.layout())?;
    let mut saved = CpuSaved::new(&w.config, x.shape().n);
    forward_into(w, x, residual, &mut y, &mut saved)?;
    Ok(CpuForward { y, saved })
}

/// SE forward into caller buffers: `y` (the shape and layout of `x`) and `saved`
/// ([`CpuSaved::new`] for `x`'s batch). Allocates nothing.
///
/// Errors as [`forward`] does, and when `y` or `saved` is sized for another shape.
pub fn forward_into<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
    y: &mut Tensor<T>,
    saved: &mut CpuSaved,
) -> Result<()> {
    check_activation(w, x, residual, None)?;
    same_as_x("output y", x, y.shape(), y.layout())?;
    forward_slices(
        x.shape(),
        x.layout(),
        SeForwardSlices {
            x: x.data(),
            residual: residual.map(|r| r.data()),
            y: y.data_mut(),
            weights: w.view(),
            saved: saved.view_mut(),
        },
    )
}

/// SE forward on plain slices (a framework's buffers, no [`Tensor`] and no copy): `shape` and
/// `layout` describe `x`, `residual` and `y`. Allocates nothing.
///
/// Errors (never panics) when the weights are inconsistent, the shape does not have the
/// config's channels, or a slice has the wrong length.
pub fn forward_slices<T: Element>(
    shape: Shape,
    layout: Layout,
    args: SeForwardSlices<'_, T>,
) -> Result<()> {
    let w = args.weights;
    w.validate()?;
    check_shapes(&w.config, shape, layout, None, None)?;
    let numel = shape.numel();
    check_len("x", args.x.len(), numel)?;
    if let Some(r) = args.residual {
        check_len("residual", r.len(), numel)?;
    }
    check_len("y", args.y.len(), numel)?;
    let sh = shape;
    let CpuSavedMut { z, h, u, s } = args.saved;
    check_saved(
        [z.len(), h.len(), u.len(), s.len()],
        sh.n,
        sh.c,
        w.config.hidden,
    )?;
    let p = Problem::new(w, sh, layout);
    let xs = args.x;
    let rs = args.residual;
    let ys = args.y;
    let (se, c, d) = (p.sample, p.c, p.d);

    let threads = rayon::current_num_threads();
    let inputs = if rs.is_some() { 2 } else { 1 };
    match p.plan(threads, size_of::<T>(), inputs, false) {
        Plan::Grouped(g) => {
            // Whole-sample groups, one task each: squeeze, excite, scale while the group is
            // cached.
            ys.par_chunks_mut(g * se)
                .zip(z.par_chunks_mut(g * c))
                .zip(h.par_chunks_mut(g * d))
                .zip(u.par_chunks_mut(g * d))
                .zip(s.par_chunks_mut(g * c))
                .enumerate()
                .for_each(|(gi, ((((y, z), h), u), s))| {
                    let m = z.len() / c;
                    let x = &xs[gi * g * se..][..m * se];
                    let r = rs.map(|r| &r[gi * g * se..][..m * se]);
                    for k in 0..m {
                        p.squeeze(&x[k * se..][..se], 0, &mut z[k * c..][..c]);
                    }
                    p.excite(z, h, u, s);
                    for k in 0..m {
                        let xk = &x[k * se..][..se];
                        let rk = r.map(|r| &r[k * se..][..se]);
                        p.scale(xk, rk, &mut y[k * se..][..se], 0, &s[k * c..][..c]);
                    }
                });
        }
        Plan::Batched => {
            // Squeeze every sample, both FCs as GEMMs over the batch, scale every sample.
            z.par_chunks_mut(c)
                .enumerate()
                .for_each(|(n, zn)| p.squeeze(&xs[n * se..][..se], 0, zn));
            p.excite_batch(z, h, u, s, threads);
            ys.par_chunks_mut(se)
                .zip(s.par_chunks(c))
                .enumerate()
                .for_each(|(n, (y, sn))| {
                    let r = rs.map(|r| &r[n * se..][..se]);
                    p.scale(&xs[n * se..][..se], r, y, 0, sn);
                });
        }
        Plan::PerSample => {
            // One at a time, each pass split over the threads.
            for n in 0..sh.n {
                let x = &xs[n * se..][..se];
                let r = rs.map(|r| &r[n * se..][..se]);
                let (zn, sn) = (&mut z[n * c..][..c], &mut s[n * c..][..c]);
                p.squeeze_par(x, zn, threads);
                p.excite(zn, &mut h[n * d..][..d], &mut u[n * d..][..d], sn);
                p.scale_par(x, r, &mut ys[n * se..][..se], sn, threads);
            }
        }
    }
    Ok(())
}

/// SE backward, given the forward's inputs, what it saved, and `dy`.
///
/// Returns `dx`, the parameter gradients, and with the epilogue `d residual` (dy through the
/// ReLU mask of `s * x + residual`). Errors (never panics) on inconsistent weights, shapes,
/// layouts or saved lengths.
pub fn backward<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
    saved: &CpuSaved,
    dy: &Tensor<T>,
) -> Result<CpuBackward<T>> {
    check_activation(w, x, residual, Some(dy))?;
    let mut dx = Tensor::zeros(x.shape(), x.layout())?;
    let mut grads = zero_grads(&w.config);
    let mut dres = residual
        .map(|_| Tensor::zeros(x.shape(), x.layout()))
        .transpose()?;
    backward_into(
        w,
        x,
        residual,
        saved,
        dy,
        &mut dx,
        false,
        &mut grads,
        dres.as_mut(),
    )?;
    Ok(CpuBackward {
        dx,
        grads,
        dresidual: dres,
    })
}

/// SE backward into caller buffers. With `accumulate`, `dx` gets the gradient added to what it
/// holds (a residual network adds the identity path's gradient); otherwise it is overwritten.
/// Parameter gradients are overwritten (`grads` shaped by [`zero_grads`]); `dresidual` must be
/// given exactly when `residual` is. Reuses a per-thread scratch buffer (4 floats per channel
/// and sample), so repeated calls allocate nothing.
///
/// Errors as [`backward`] does, and when an output is sized for another shape or config.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
    saved: &CpuSaved,
    dy: &Tensor<T>,
    dx: &mut Tensor<T>,
    accumulate: bool,
    grads: &mut SeGrads<f32>,
    dresidual: Option<&mut Tensor<T>>,
) -> Result<()> {
    check_activation(w, x, residual, Some(dy))?;
    same_as_x("gradient dx", x, dx.shape(), dx.layout())?;
    if let Some(dr) = &dresidual {
        same_as_x("gradient d residual", x, dr.shape(), dr.layout())?;
    }
    backward_slices(
        x.shape(),
        x.layout(),
        SeBackwardSlices {
            x: x.data(),
            residual: residual.map(|r| r.data()),
            dy: dy.data(),
            weights: w.view(),
            saved: saved.view(),
            dx: dx.data_mut(),
            accumulate,
            dresidual: dresidual.map(|t| t.data_mut()),
            grads: grads.view_mut(),
        },
    )
}

/// SE backward on plain slices (a framework's buffers, no [`Tensor`] and no copy): `shape` and
/// `layout` describe every activation slice. Reuses a per-thread scratch buffer, so repeated
/// calls allocate nothing.
///
/// Errors (never panics) on inconsistent weights, a shape without the config's channels, a
/// slice of the wrong length, or `dresidual` given without `residual` (or the reverse).
pub fn backward_slices<T: Element>(
    shape: Shape,
    layout: Layout,
    args: SeBackwardSlices<'_, T>,
) -> Result<()> {
    let w = args.weights;
    w.validate()?;
    let cfg = w.config;
    check_shapes(&cfg, shape, layout, None, None)?;
    let numel = shape.numel();
    check_len("x", args.x.len(), numel)?;
    check_len("dy", args.dy.len(), numel)?;
    check_len("dx", args.dx.len(), numel)?;
    if let Some(r) = args.residual {
        check_len("residual", r.len(), numel)?;
    }
    if let Some(r) = &args.dresidual {
        check_len("dresidual", r.len(), numel)?;
    }
    if args.residual.is_some() != args.dresidual.is_some() {
        return Err(Error::Config(
            "d residual must be given exactly when the residual is".into(),
        ));
    }
    let sh = shape;
    let sv = args.saved;
    check_saved(
        [sv.z.len(), sv.h.len(), sv.u.len(), sv.s.len()],
        sh.n,
        sh.c,
        cfg.hidden,
    )?;
    let mut grads = args.grads;
    grads.check(&cfg)?;
    let p = Problem::new(w, sh, layout);
    let stride = p.scratch_stride();
    SCRATCH.with(|cell| {
        // Take the buffer (a nested call on this thread, e.g. from a rayon join, then simply
        // gets a fresh one) and put it back for the next call.
        let mut scratch = std::mem::take(&mut *cell.borrow_mut());
        scratch.clear();
        scratch.resize(sh.n * stride, 0.0);
        let bargs = BwdArgs {
            x: args.x,
            r: args.residual,
            dy: args.dy,
            saved: sv,
            accumulate: args.accumulate,
        };
        p.backward(&bargs, args.dx, args.dresidual, &mut scratch);
        p.param_grads(&sv, &scratch, &mut grads);
        *cell.borrow_mut() = scratch;
    });
    Ok(())
}

thread_local! {
    /// Backward's per-sample scratch (ds, dg, dz, du), kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn same_as_x<T: Element>(what: &str, x: &Tensor<T>, shape: Shape, layout: Layout) -> Result<()> {
    if shape != x.shape() || layout != x.layout() {
        return Err(Error::Shape(format!(
            "{what} is {shape} {layout}, input is {} {}",
            x.shape(),
            x.layout()
        )));
    }
    Ok(())
}

/// Defines `$name`, which runs `$imp` for f16/bf16 through a copy compiled for AVX2, FMA and
/// F16C when the CPU has them (`$fast`), else the portable build. Measured (benches/NOTES.md):
/// the forward's conversions gain about a fifth in bf16; f32 gains nothing (memory-bound) and the
/// backward passes lost time in such copies, so they stay portable.
macro_rules! avx2_dispatch {
    (
        $(#[$doc:meta])*
        fn $name:ident / $fast:ident => $imp:ident<$T:ident>(&self, $($a:ident: $t:ty),* $(,)?)
    ) => {
        $(#[$doc])*
        pub(super) fn $name<$T: Element>(&self, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if !is_f32::<$T>() && fma_available() && std::arch::is_x86_feature_detected!("f16c") {
                // SAFETY: the copy needs only AVX2, FMA and F16C, which this CPU has (checked
                // just above); everything it touches is a bounds-checked safe slice.
                return unsafe { self.$fast::<$T>($($a),*) };
            }
            self.$imp::<$T>($($a),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $fast<$T: Element>(&self, $($a: $t),*) {
            self.$imp::<$T>($($a),*)
        }
    };
}

mod convert;
mod excite;
mod math;
mod problem;
mod segments;

use convert::*;
use excite::*;
use math::*;
use problem::*;
use segments::*;

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_rounding_matches_half() {
        let seed = crate::rng::fresh_seed();
        println!("seed {seed}");
        let mut vals = crate::rng::uniform_vec(10_000, -1e4, 1e4, seed);
        vals.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON * 64.0, // a tie: rounds to even
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ]);
        for v in vals {
            assert_eq!(
                bf16_bits(v),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
    }

    #[test]
    fn fast_exp_and_sigmoid_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_sig = 0f64;
        for i in -86_900..=87_900 {
            let x = i as f32 * 1e-3;
            let e = (x as f64).exp();
            worst_exp = worst_exp.max(((exp_fast(x) as f64) - e).abs() / e);
            let s = crate::se::sigmoid(x as f64);
            worst_sig = worst_sig.max(((sigmoid_fast(x) as f64) - s).abs() / s);
        }
        assert!(worst_exp < 5e-7, "exp rel error {worst_exp:e}");
        assert!(worst_sig < 5e-7, "sigmoid rel error {worst_sig:e}");
        assert!(sigmoid_fast(1e4) == 1.0 && sigmoid_fast(-1e4) >= 0.0);
        assert!(exp_fast(1000.0).is_finite() && exp_fast(-1000.0) >= 0.0);
    }

    #[test]
    fn gemm_kernels_match_plain_loops() {
        let seed = crate::rng::fresh_seed();
        println!("seed {seed}");
        for (m, k, o) in [(1, 1, 1), (3, 17, 5), (5, 70, 33), (4, 128, 9), (6, 40, 70)] {
            let w = crate::rng::uniform_vec(o * k, -1.0, 1.0, seed);
            let x = crate::rng::uniform_vec(m * k, -1.0, 1.0, seed ^ 1);
            let b = crate::rng::uniform_vec(o, -1.0, 1.0, seed ^ 2);
            // The dispatched kernels (AVX2 where the CPU has it) and the portable fallbacks.
            let mut y = vec![f32::NAN; m * o];
            let mut y_portable = vec![f32::NAN; m * o];
            fc(&w, Some(&b), k, &x, &mut y, o);
            fc_impl(
                &w,
                Some(&b),
                k,
                &x,
                &mut y_portable,
                o,
                dot4::<false>,
                dot2x4_portable,
            );
            for (a, p) in y.iter().zip(&y_portable) {
                assert!((a - p).abs() < 1e-4, "fc portable {m}x{k}x{o}");
            }
            for i in 0..m {
                for j in 0..o {
                    let want: f64 = b[j] as f64
                        + (0..k)
                            .map(|t| w[j * k + t] as f64 * x[i * k + t] as f64)
                            .sum::<f64>();
                    assert!((y[i * o + j] as f64 - want).abs() < 1e-4, "fc {m}x{k}x{o}");
                }
            }
            // Each instruction-set copy this CPU can run, not only the one `fc` dispatches to.
            #[cfg(target_arch = "x86_64")]
            {
                let mut copies: Vec<(&str, Vec<f32>)> = Vec::new();
                if fma_available() {
                    let mut v = vec![f32::NAN; m * o];
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    unsafe { fc_fma(&w, Some(&b), k, &x, &mut v, o) };
                    copies.push(("avx2", v));
                }
                if avx512_available() {
                    let mut v = vec![f32::NAN; m * o];
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    unsafe { fc_avx512(&w, Some(&b), k, &x, &mut v, o) };
                    copies.push(("avx512", v));
                }
                for (name, v) in copies {
                    for (a, p) in v.iter().zip(&y_portable) {
                        assert!((a - p).abs() < 1e-4, "fc {name} {m}x{k}x{o}");
                    }
                }
            }
            // The batched form, split over 1 and 3 threads' worth of row blocks.
            for threads in [1, 3] {
                let mut yb = vec![f32::NAN; m * o];
                fc_batch(&w, Some(&b), k, &x, &mut yb, o, threads);
                for (a, p) in yb.iter().zip(&y) {
                    assert!(
                        (a - p).abs() < 1e-4,
                        "fc_batch {m}x{k}x{o} threads {threads}"
                    );
                }
            }
        }
    }

    #[test]
    fn sums_and_dots_match_plain_loops() {
        let seed = crate::rng::fresh_seed();
        println!("seed {seed}");
        for len in [0, 1, 15, 16, 17, 49, 100] {
            let a = crate::rng::uniform_vec(len, -1.0, 1.0, seed);
            let b = crate::rng::uniform_vec(len, -1.0, 1.0, seed ^ 1);
            let r = crate::rng::uniform_vec(len, -1.0, 1.0, seed ^ 2);
            let plain_sum: f64 = a.iter().map(|&v| v as f64).sum();
            let plain_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let plain_masked: f64 = (0..len)
                .filter(|&i| 0.7 * b[i] + r[i] > 0.0)
                .map(|i| a[i] as f64 * b[i] as f64)
                .sum();
            assert!((sum(&a) as f64 - plain_sum).abs() < 1e-4, "len {len}");
            assert!((dot(&a, &b) as f64 - plain_dot).abs() < 1e-4, "len {len}");
            let m = masked_dot(&a, &b, &r, 0.7) as f64;
            assert!((m - plain_masked).abs() < 1e-4, "len {len}");
        }
    }
}
