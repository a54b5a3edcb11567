//! The fast CPU path: SE forward, backward and the fused residual epilogue, multi-threaded with
//! rayon, for every [`Element`] type (f32, f16 and bf16 in bulk; f64 works too) in NCHW and NHWC.
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
        fn $name<$T: Element>(&self, $($a: $t),*) {
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

// ------------------------------------------------------------------------------ the problem

/// The pass order one call runs (a resolved [`Schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Groups of this many whole samples per task.
    Grouped(usize),
    /// Each pass over the whole batch.
    Batched,
    /// One sample at a time, each pass split over the threads.
    PerSample,
}

/// One call's shapes and weights, and the passes over one sample or group of samples.
struct Problem<'a> {
    w1: &'a [f32],
    b1: Option<&'a [f32]>,
    w2: &'a [f32],
    b2: Option<&'a [f32]>,
    act: Activation,
    gate: Gate,
    layout: Layout,
    n: usize,
    c: usize,
    d: usize,
    hw: usize,
    /// Elements per sample.
    sample: usize,
}

/// Backward's read-only inputs.
struct BwdArgs<'a, T> {
    x: &'a [T],
    r: Option<&'a [T]>,
    dy: &'a [T],
    saved: CpuSavedRef<'a>,
    accumulate: bool,
}

impl<'a> Problem<'a> {
    avx2_dispatch! {
        /// z[k] = mean over pixels of channel `c0 + k` of one sample.
        fn squeeze / squeeze_avx2 => squeeze_impl<T>(&self, x: &[T], c0: usize, z: &mut [f32])
    }
    avx2_dispatch! {
        /// y = s * x (or relu(s * x + r)) over whole units of one sample starting at unit
        /// `u0`; `s` is the sample's `[c]` channel weights.
        fn scale / scale_avx2 => scale_impl<T>(
            &self, x: &[T], r: Option<&[T]>, y: &mut [T], u0: usize, s: &[f32]
        )
    }
    fn new(w: SeWeightsRef<'a>, sh: Shape, layout: Layout) -> Self {
        Problem {
            w1: w.w1,
            b1: w.b1,
            w2: w.w2,
            b2: w.b2,
            act: w.config.activation,
            gate: w.config.gate,
            layout,
            n: sh.n,
            c: sh.c,
            d: w.config.hidden,
            hw: sh.hw(),
            sample: sh.sample_numel(),
        }
    }

    /// How to order the passes (see [`Schedule`]): forced by [`with_schedule`], else chosen
    /// from the shape. `elem` is the element size in bytes, `inputs` the number of
    /// activation-sized tensors the passes read (x, plus dy and the residual).
    ///
    /// `Auto` runs few samples one at a time and otherwise groups, except that the backward
    /// turns to `Batched` when a group's share of the weights (W1 and W2, 8 C D bytes, read
    /// by the grouped schedule once per group) is at least the group's activation bytes: there
    /// its four GEMMs over the batch beat re-reading the weights per group (ResNet-50's last
    /// stage: 0.89 vs 1.15 ms, benches/NOTES.md). The forward keeps its groups at every
    /// ResNet-50 shape (its batched form re-reads x and measured 15-25% slower).
    fn plan(&self, threads: usize, elem: usize, inputs: usize, backward: bool) -> Plan {
        let group_bytes = |g: usize| g * self.sample * elem * inputs;
        let g = (GROUP_BYTES / group_bytes(1).max(1)).clamp(1, TILE);
        let g = g.min((self.n / (2 * threads)).max(1));
        match SCHEDULE.with(|c| c.get()) {
            Schedule::Grouped => Plan::Grouped(g),
            Schedule::Batched => Plan::Batched,
            Schedule::PerSample => Plan::PerSample,
            Schedule::Auto if threads > 1 && self.n < 2 * threads => Plan::PerSample,
            Schedule::Auto if backward && 8 * self.c * self.d >= group_bytes(g) => Plan::Batched,
            Schedule::Auto => Plan::Grouped(g),
        }
    }

    /// Backward scratch floats per sample: ds, dg, dz (`c` each) and du (`d`), stored as four
    /// `[n][..]` regions.
    fn scratch_stride(&self) -> usize {
        3 * self.c + self.d
    }

    /// Elements of one parallel unit of a sample: a channel row (NCHW) or a pixel (NHWC).
    fn unit(&self) -> usize {
        match self.layout {
            Layout::Nchw => self.hw,
            Layout::Nhwc => self.c,
        }
    }

    /// Units per parallel piece of one sample, for `threads` threads.
    fn units_per_task(&self, threads: usize) -> usize {
        let units = self.sample / self.unit();
        let by_size = MIN_TASK_ELEMS.div_ceil(self.unit());
        let by_threads = units.div_ceil(4 * threads);
        by_size.max(by_threads).max(1)
    }

    /// Channels per parallel piece of the NHWC squeeze (strided runs of this many elements).
    fn channels_per_task(&self, threads: usize) -> usize {
        self.c.div_ceil(2 * threads).max(64).next_multiple_of(16)
    }

    // ---------------------------------------------------------------- forward passes

    /// z[k] = mean over pixels of channel `c0 + k` of one sample.
    #[inline(always)]
    fn squeeze_impl<T: Element>(&self, x: &[T], c0: usize, z: &mut [f32]) {
        let inv = 1.0 / self.hw as f32;
        let mut buf = [0f32; PIECE];
        match self.layout {
            Layout::Nchw => {
                let rows = &x[c0 * self.hw..][..z.len() * self.hw];
                for (zc, row) in z.iter_mut().zip(rows.chunks_exact(self.hw)) {
                    let mut acc = 0.0;
                    for piece in row.chunks(PIECE) {
                        acc += sum(view(piece, &mut buf));
                    }
                    *zc = acc * inv;
                }
            }
            Layout::Nhwc => {
                let cb = z.len();
                z.fill(0.0);
                for pix in x.chunks_exact(self.c) {
                    let seg = &pix[c0..][..cb];
                    for (zp, piece) in z.chunks_mut(PIECE).zip(seg.chunks(PIECE)) {
                        add_to(zp, view(piece, &mut buf));
                    }
                }
                z.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }

    /// [`Self::squeeze`] of a whole sample, split over the threads.
    fn squeeze_par<T: Element>(&self, x: &[T], z: &mut [f32], threads: usize) {
        let per = match self.layout {
            Layout::Nchw => self.units_per_task(threads),
            Layout::Nhwc => self.channels_per_task(threads),
        };
        z.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, zc)| self.squeeze(x, i * per, zc));
    }

    /// The excitation for `m` samples: `z` is `[m][c]`; writes h, u (`[m][d]`) and s (`[m][c]`).
    /// Each weight row is read once per call and shared by up to four samples' dot products.
    fn excite(&self, z: &[f32], h: &mut [f32], u: &mut [f32], s: &mut [f32]) {
        let (c, d) = (self.c, self.d);
        fc(self.w1, self.b1, c, z, h, d);
        u.copy_from_slice(h);
        act_slice(self.act, u);
        fc(self.w2, self.b2, d, u, s, c);
        gate_slice(self.gate, s);
    }

    /// [`Self::excite`] for the whole batch: each FC reads its weights once for all samples
    /// ([`fc_batch`]), split over the threads by blocks of weight rows.
    fn excite_batch(&self, z: &[f32], h: &mut [f32], u: &mut [f32], s: &mut [f32], threads: usize) {
        let (c, d) = (self.c, self.d);
        fc_batch(self.w1, self.b1, c, z, h, d, threads);
        u.copy_from_slice(h);
        act_slice(self.act, u);
        fc_batch(self.w2, self.b2, d, u, s, c, threads);
        gate_slice(self.gate, s);
    }

    /// y = s * x (or relu(s * x + r)) over whole units of one sample starting at unit `u0`;
    /// `s` is the sample's `[c]` channel weights.
    #[inline(always)]
    fn scale_impl<T: Element>(&self, x: &[T], r: Option<&[T]>, y: &mut [T], u0: usize, s: &[f32]) {
        let mut bufs = Bufs::new();
        let unit = self.unit();
        for (i, yu) in y.chunks_mut(unit).enumerate() {
            let xu = &x[i * unit..][..unit];
            let ru = r.map(|r| &r[i * unit..][..unit]);
            match self.layout {
                Layout::Nchw => fwd_seg(xu, ru, yu, s[u0 + i], &mut bufs),
                Layout::Nhwc => fwd_seg(xu, ru, yu, s, &mut bufs),
            }
        }
    }

    /// [`Self::scale`] of a whole sample, split over the threads.
    fn scale_par<T: Element>(
        &self,
        x: &[T],
        r: Option<&[T]>,
        y: &mut [T],
        s: &[f32],
        threads: usize,
    ) {
        let upt = self.units_per_task(threads);
        let step = upt * self.unit();
        y.par_chunks_mut(step).enumerate().for_each(|(i, yc)| {
            let xc = &x[i * step..][..yc.len()];
            let rc = r.map(|r| &r[i * step..][..yc.len()]);
            self.scale(xc, rc, yc, i * upt, s);
        });
    }

    // ---------------------------------------------------------------- backward passes

    /// Backward over every sample: fills dx (and d residual) and the per-sample scratch rows
    /// (ds, dg, dz, du) that [`Self::param_grads`] reads.
    fn backward<T: Element>(
        &self,
        a: &BwdArgs<'_, T>,
        dx: &mut [T],
        dres: Option<&mut [T]>,
        scratch: &mut [f32],
    ) {
        let (se, c, d) = (self.sample, self.c, self.d);
        let threads = rayon::current_num_threads();
        let inputs = if a.r.is_some() { 3 } else { 2 };
        let (ds, rest) = scratch.split_at_mut(self.n * c);
        let (dg, rest) = rest.split_at_mut(self.n * c);
        let (dz, du) = rest.split_at_mut(self.n * c);
        let g = match self.plan(threads, size_of::<T>(), inputs, true) {
            Plan::Grouped(g) => g,
            Plan::Batched => {
                // ds for every sample, the excitation's backward as GEMMs over the batch, then
                // dx (and d residual) for every sample.
                ds.par_chunks_mut(c)
                    .enumerate()
                    .for_each(|(n, dsn)| self.dsum(&Sample::of(a, n, se, c), 0, dsn));
                let mut e = Excited { ds, dg, dz, du };
                self.dexcite(a.saved.h, a.saved.s, &mut e, threads);
                let dz = &*e.dz;
                let one = |n: usize, dxn: &mut [T], drn: Option<&mut [T]>| {
                    let dzn = &dz[n * c..][..c];
                    self.dscale(&Sample::of(a, n, se, c), 0, dzn, dxn, drn, a.accumulate)
                };
                match dres {
                    Some(dr) => dx
                        .par_chunks_mut(se)
                        .zip(dr.par_chunks_mut(se))
                        .enumerate()
                        .for_each(|(n, (dxn, drn))| one(n, dxn, Some(drn))),
                    None => dx
                        .par_chunks_mut(se)
                        .enumerate()
                        .for_each(|(n, dxn)| one(n, dxn, None)),
                }
                return;
            }
            Plan::PerSample => {
                // One sample at a time, each pass split over the threads.
                let mut dres = dres;
                for n in 0..self.n {
                    let one = Sample::of(a, n, se, c);
                    let (rc, rd) = (n * c..(n + 1) * c, n * d..(n + 1) * d);
                    let mut e = Excited {
                        ds: &mut ds[rc.clone()],
                        dg: &mut dg[rc.clone()],
                        dz: &mut dz[rc],
                        du: &mut du[rd.clone()],
                    };
                    self.dsum_par(&one, e.ds, threads);
                    self.dexcite(&a.saved.h[rd], one.s, &mut e, threads);
                    let dxn = &mut dx[n * se..][..se];
                    let drn = dres.as_deref_mut().map(|d| &mut d[n * se..][..se]);
                    self.dscale_par(&one, e.dz, dxn, drn, a.accumulate, threads);
                }
                return;
            }
        };
        let task = |gi: usize, dx: &mut [T], mut dres: Option<&mut [T]>, mut e: Excited<'_>| {
            let n0 = gi * g;
            let m = e.dg.len() / c;
            for k in 0..m {
                let one = Sample::of(a, n0 + k, se, c);
                self.dsum(&one, 0, &mut e.ds[k * c..][..c]);
            }
            let h = &a.saved.h[n0 * d..][..m * d];
            let s = &a.saved.s[n0 * c..][..m * c];
            self.dexcite(h, s, &mut e, 1);
            for k in 0..m {
                let one = Sample::of(a, n0 + k, se, c);
                let dxk = &mut dx[k * se..][..se];
                let drk = dres.as_deref_mut().map(|d| &mut d[k * se..][..se]);
                self.dscale(&one, 0, &e.dz[k * c..][..c], dxk, drk, a.accumulate);
            }
        };
        let regions = ds
            .par_chunks_mut(g * c)
            .zip(dg.par_chunks_mut(g * c))
            .zip(dz.par_chunks_mut(g * c))
            .zip(du.par_chunks_mut(g * d))
            .map(|(((ds, dg), dz), du)| Excited { ds, dg, dz, du });
        match dres {
            Some(dr) => dx
                .par_chunks_mut(g * se)
                .zip(dr.par_chunks_mut(g * se))
                .zip(regions)
                .enumerate()
                .for_each(|(gi, ((dx, dr), e))| task(gi, dx, Some(dr), e)),
            None => dx
                .par_chunks_mut(g * se)
                .zip(regions)
                .enumerate()
                .for_each(|(gi, (dx, e))| task(gi, dx, None, e)),
        }
    }

    /// ds[k] = sum over pixels of g * x for channel `c0 + k` of one sample, g = dy through the
    /// epilogue's mask.
    fn dsum<T: Element>(&self, one: &Sample<'_, T>, c0: usize, ds: &mut [f32]) {
        let mut bufs = Bufs::new();
        let hw = self.hw;
        match self.layout {
            Layout::Nchw => {
                for (k, dsk) in ds.iter_mut().enumerate() {
                    let at = (c0 + k) * hw;
                    let r = one.r.map(|r| &r[at..][..hw]);
                    *dsk = dsum_seg(
                        &one.x[at..][..hw],
                        r,
                        &one.dy[at..][..hw],
                        one.s[c0 + k],
                        &mut bufs,
                    );
                }
            }
            Layout::Nhwc => {
                let (c, cb) = (self.c, ds.len());
                ds.fill(0.0);
                for p in 0..hw {
                    let at = p * c + c0;
                    let r = one.r.map(|r| &r[at..][..cb]);
                    let s = &one.s[c0..][..cb];
                    dsum_cols(&one.x[at..][..cb], r, &one.dy[at..][..cb], s, ds, &mut bufs);
                }
            }
        }
    }

    /// [`Self::dsum`] of a whole sample, split over the threads.
    fn dsum_par<T: Element>(&self, one: &Sample<'_, T>, ds: &mut [f32], threads: usize) {
        let per = match self.layout {
            Layout::Nchw => self.units_per_task(threads),
            Layout::Nhwc => self.channels_per_task(threads),
        };
        ds.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, dc)| self.dsum(one, i * per, dc));
    }

    /// The excitation's backward for `m` samples (`e.ds` filled, `[m][c]`): writes dg, du and
    /// dz / hw. `h` is `[m][d]`, `s` is `[m][c]`. du and dz are one GEMM each over the `m`
    /// samples, split over `threads` when large enough (the batched schedule passes the whole
    /// batch; a group's task passes 1).
    fn dexcite(&self, h: &[f32], s: &[f32], e: &mut Excited<'_>, threads: usize) {
        let (c, d) = (self.c, self.d);
        let m = e.dg.len() / c;
        for ((g, &dsv), &sv) in e.dg.iter_mut().zip(e.ds.iter()).zip(s) {
            *g = dsv * gate_grad(self.gate, sv);
        }
        // du = (dg W2) * act'(h), then dz / hw = (du W1) / hw: W2 is [c][d], W1 is [d][c].
        let w2 = (self.w2, d as isize, 1);
        let par = gemm_par(m * c * d, threads);
        sgemm(m, d, c, e.du, (&*e.dg, c as isize, 1), w2, false, par);
        for (v, &hv) in e.du.iter_mut().zip(h) {
            *v *= act_grad(self.act, hv);
        }
        let (w1, inv) = ((self.w1, c as isize, 1), 1.0 / self.hw as f32);
        sgemm_scaled(m, c, d, e.dz, (&*e.du, d as isize, 1), w1, false, inv, par);
    }

    /// dx = g * s + dz / hw (plus dx's old value with `accumulate`) and d residual = g over
    /// whole units of one sample starting at unit `u0`; `dzh` is the sample's `[c]` dz / hw.
    fn dscale<T: Element>(
        &self,
        one: &Sample<'_, T>,
        u0: usize,
        dzh: &[f32],
        dx: &mut [T],
        mut dres: Option<&mut [T]>,
        accumulate: bool,
    ) {
        let mut bufs = Bufs::new();
        let unit = self.unit();
        let base = u0 * unit;
        for (i, dxu) in dx.chunks_mut(unit).enumerate() {
            let at = base + i * unit;
            let x = &one.x[at..][..unit];
            let r = one.r.map(|r| &r[at..][..unit]);
            let dy = &one.dy[at..][..unit];
            let dr = dres.as_deref_mut().map(|d| &mut d[i * unit..][..unit]);
            match self.layout {
                Layout::Nchw => {
                    let cc = u0 + i;
                    dx_seg(x, r, dy, one.s[cc], dzh[cc], dxu, dr, accumulate, &mut bufs)
                }
                Layout::Nhwc => dx_seg(x, r, dy, one.s, dzh, dxu, dr, accumulate, &mut bufs),
            }
        }
    }

    /// [`Self::dscale`] of a whole sample, split over the threads.
    fn dscale_par<T: Element>(
        &self,
        one: &Sample<'_, T>,
        dzh: &[f32],
        dx: &mut [T],
        dres: Option<&mut [T]>,
        accumulate: bool,
        threads: usize,
    ) {
        let upt = self.units_per_task(threads);
        let step = upt * self.unit();
        match dres {
            Some(dr) => dx
                .par_chunks_mut(step)
                .zip(dr.par_chunks_mut(step))
                .enumerate()
                .for_each(|(i, (dxc, drc))| {
                    self.dscale(one, i * upt, dzh, dxc, Some(drc), accumulate)
                }),
            None => dx
                .par_chunks_mut(step)
                .enumerate()
                .for_each(|(i, dxc)| self.dscale(one, i * upt, dzh, dxc, None, accumulate)),
        }
    }

    /// dW1, dW2 (and the biases') from every sample's dg and du in `scratch`, batched over the
    /// samples and split over the threads by blocks of output rows.
    fn param_grads(&self, saved: &CpuSavedRef, scratch: &[f32], grads: &mut SeGradsMut) {
        let (c, d, n) = (self.c, self.d, self.n);
        let dg = &scratch[n * c..][..n * c];
        let du = &scratch[3 * n * c..][..n * d];
        let par = gemm_par(n * c * d, rayon::current_num_threads());
        // dW2 = dg^T u ([c][d]) and dW1 = du^T z ([d][c]), the transposes read in place.
        let (ci, di) = (c as isize, d as isize);
        sgemm(
            c,
            d,
            n,
            grads.dw2,
            (dg, 1, ci),
            (saved.u, di, 1),
            false,
            par,
        );
        sgemm(
            d,
            c,
            n,
            grads.dw1,
            (du, 1, di),
            (saved.z, ci, 1),
            false,
            par,
        );
        if let Some(db2) = grads.db2.as_deref_mut() {
            db2.fill(0.0);
            for k in 0..n {
                add_to(db2, &dg[k * c..][..c]);
            }
        }
        if let Some(db1) = grads.db1.as_deref_mut() {
            db1.fill(0.0);
            for k in 0..n {
                add_to(db1, &du[k * d..][..d]);
            }
        }
    }
}

/// Backward's per-sample excitation gradients for a run of samples, each `[m][..]`.
struct Excited<'e> {
    /// sum over pixels of g * x, `[m][c]`.
    ds: &'e mut [f32],
    /// ds * gate', `[m][c]`.
    dg: &'e mut [f32],
    /// dz / hw, `[m][c]`.
    dz: &'e mut [f32],
    /// d loss / d h, `[m][d]`.
    du: &'e mut [f32],
}

/// One sample's backward inputs.
struct Sample<'a, T> {
    x: &'a [T],
    r: Option<&'a [T]>,
    dy: &'a [T],
    s: &'a [f32],
}

impl<'a, T: Element> Sample<'a, T> {
    fn of(a: &BwdArgs<'a, T>, n: usize, se: usize, c: usize) -> Self {
        Sample {
            x: &a.x[n * se..][..se],
            r: a.r.map(|r| &r[n * se..][..se]),
            dy: &a.dy[n * se..][..se],
            s: &a.saved.s[n * c..][..c],
        }
    }
}

// ------------------------------------------------------------------------------ segments

/// Per-channel values over a run of elements: one value for an NCHW channel row, a slice (one
/// per channel) for an NHWC pixel.
trait Scales: Copy {
    /// The value for element `i` of the run.
    fn get(self, i: usize) -> f32;
    /// The values for elements `k0..k0 + n` of the run.
    fn sub(self, k0: usize, n: usize) -> Self;
}

impl Scales for f32 {
    #[inline(always)]
    fn get(self, _: usize) -> f32 {
        self
    }
    #[inline(always)]
    fn sub(self, _: usize, _: usize) -> Self {
        self
    }
}

impl Scales for &[f32] {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        self[i]
    }
    #[inline(always)]
    fn sub(self, k0: usize, n: usize) -> Self {
        &self[k0..][..n]
    }
}

/// Stack buffers for converting f16/bf16 pieces (unused, and optimised away, for f32).
struct Bufs {
    a: [f32; PIECE],
    b: [f32; PIECE],
    c: [f32; PIECE],
    d: [f32; PIECE],
}

impl Bufs {
    #[inline(always)]
    fn new() -> Self {
        Bufs {
            a: [0.0; PIECE],
            b: [0.0; PIECE],
            c: [0.0; PIECE],
            d: [0.0; PIECE],
        }
    }
}

/// The epilogue's pre-activation, one expression for forward and for backward's mask.
#[inline(always)]
fn epilogue_pre(s: f32, x: f32, r: f32) -> f32 {
    s * x + r
}

/// y = s * x, or relu(s * x + r), over one run.
#[inline(always)]
fn fwd_seg<T: Element, S: Scales>(x: &[T], r: Option<&[T]>, y: &mut [T], s: S, bufs: &mut Bufs) {
    let Bufs { a, b, c, .. } = bufs;
    let len = y.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let sv = s.sub(k0, n);
        match r {
            None => emit(&mut y[k0..][..n], c, false, |yv| {
                for i in 0..n {
                    yv[i] = sv.get(i) * xv[i];
                }
            }),
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                emit(&mut y[k0..][..n], c, false, |yv| {
                    for i in 0..n {
                        yv[i] = epilogue_pre(sv.get(i), xv[i], rv[i]).max(0.0);
                    }
                })
            }
        }
    }
}

/// sum of g * x over one NCHW channel row with weight `s` (g = dy through the mask).
#[inline(always)]
fn dsum_seg<T: Element>(x: &[T], r: Option<&[T]>, dy: &[T], s: f32, bufs: &mut Bufs) -> f32 {
    let Bufs { a, b, c, .. } = bufs;
    let len = x.len();
    let mut acc = 0.0;
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let gv = view(&dy[k0..][..n], c);
        acc += match r {
            None => dot(gv, xv),
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                masked_dot(gv, xv, rv, s)
            }
        };
    }
    acc
}

/// ds[k] += g * x over one NHWC pixel's run of channels with weights `s`.
#[inline(always)]
fn dsum_cols<T: Element>(
    x: &[T],
    r: Option<&[T]>,
    dy: &[T],
    s: &[f32],
    ds: &mut [f32],
    bufs: &mut Bufs,
) {
    let Bufs { a, b, c, .. } = bufs;
    let len = x.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let gv = view(&dy[k0..][..n], c);
        let acc = &mut ds[k0..][..n];
        match r {
            None => {
                for i in 0..n {
                    acc[i] += gv[i] * xv[i];
                }
            }
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                let sv = &s[k0..][..n];
                for i in 0..n {
                    let keep = epilogue_pre(sv[i], xv[i], rv[i]) > 0.0;
                    acc[i] += if keep { gv[i] * xv[i] } else { 0.0 };
                }
            }
        }
    }
}

/// dx = g * s + dzh (+ dx) and d residual = g over one run.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dx_seg<T: Element, S: Scales>(
    x: &[T],
    r: Option<&[T]>,
    dy: &[T],
    s: S,
    dzh: S,
    dx: &mut [T],
    mut dres: Option<&mut [T]>,
    accumulate: bool,
    bufs: &mut Bufs,
) {
    let Bufs { a, b, c, d } = bufs;
    let len = dx.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let sv = s.sub(k0, n);
        let zv = dzh.sub(k0, n);
        let g: &[f32] = match r {
            None => view(&dy[k0..][..n], c),
            Some(r) => {
                let xv = view(&x[k0..][..n], a);
                let rv = view(&r[k0..][..n], b);
                let dyv: &[f32] = view(&dy[k0..][..n], c);
                let gb = &mut d[..n];
                for i in 0..n {
                    let keep = epilogue_pre(sv.get(i), xv[i], rv[i]) > 0.0;
                    gb[i] = if keep { dyv[i] } else { 0.0 };
                }
                if let Some(dr) = dres.as_deref_mut() {
                    store(gb, &mut dr[k0..][..n]);
                }
                gb
            }
        };
        // `a` and `b` are free again (their views are dead): reuse `a` for dx's conversion.
        emit(&mut dx[k0..][..n], a, accumulate, |dv| {
            if accumulate {
                for i in 0..n {
                    dv[i] += g[i] * sv.get(i) + zv.get(i);
                }
            } else {
                for i in 0..n {
                    dv[i] = g[i] * sv.get(i) + zv.get(i);
                }
            }
        });
    }
}

// ------------------------------------------------------------------------------ excitation GEMMs

/// The `gemm` crate's parallelism for an `m x n x k` product of `macs` multiply-adds: split
/// over the threads only when each gets enough work to pay for the hand-off.
fn gemm_par(macs: usize, threads: usize) -> Parallelism {
    if threads > 1 && macs >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// True when the CPU has AVX-512F: [`fc`] then runs 16-wide dot kernels ([`avx512`]).
#[inline]
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the CPU has AVX2 and FMA: the excitation's small GEMMs then run a copy of their
/// kernels compiled for those (8-wide fused multiply-adds instead of the baseline's 4-wide SSE2
/// multiplies and adds; measured in benches/NOTES.md).
#[inline]
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// a * b + c, fused when `FMA` (only instantiated inside AVX2+FMA code; elsewhere `mul_add`
/// would be a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// y[i][j] = b[j] + dot(w[j], x[i]): `w` is `[o][k]`, `x` is `[m][k]`, `y` is `[m][o]`.
fn fc(w: &[f32], b: Option<&[f32]>, k: usize, x: &[f32], y: &mut [f32], o: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        // SAFETY: `fc_avx512` needs only AVX-512F, which this CPU has (checked just above);
        // everything it touches is a bounds-checked safe slice.
        return unsafe { fc_avx512(w, b, k, x, y, o) };
    }
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: `fc_fma` needs only the AVX2 and FMA instructions, which this CPU has (checked
        // just above); everything it touches is a bounds-checked safe slice.
        return unsafe { fc_fma(w, b, k, x, y, o) };
    }
    fc_impl(w, b, k, x, y, o, dot4::<false>, dot2x4_portable)
}

/// [`fc`] over a whole batch: `y = x w^T + b` with `w` `[o][k]`, `x` `[n][k]`, `y` `[n][o]`.
/// Each task takes a block of weight rows (small enough to stay in L2) and computes their dot
/// products with every sample into its own `[n][rows]` block, so each weight row comes from
/// memory once per call; the blocks are then copied into `y` row by row. (The `gemm` crate
/// measured 3-6x slower here: both operands are contiguous along k, which its packing handles
/// poorly.)
fn fc_batch(
    w: &[f32],
    b: Option<&[f32]>,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    o: usize,
    threads: usize,
) {
    let n = x.len() / k;
    let rows = o.div_ceil(4 * threads).next_multiple_of(4);
    FC_SCRATCH.with(|cell| {
        // Taken and put back, as backward's scratch is; a nested call gets a fresh buffer.
        let mut blocks = std::mem::take(&mut *cell.borrow_mut());
        blocks.clear();
        blocks.resize(o * n, 0.0);
        blocks
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, blk)| {
                let (j0, r) = (i * rows, blk.len() / n);
                let bias = b.map(|b| &b[j0..][..r]);
                fc(&w[j0 * k..][..r * k], bias, k, x, blk, r);
            });
        for (blk, j0) in blocks.chunks(rows * n).zip((0..o).step_by(rows)) {
            let r = blk.len() / n;
            for (yi, bi) in y.chunks_exact_mut(o).zip(blk.chunks_exact(r)) {
                yi[j0..][..r].copy_from_slice(bi);
            }
        }
        *cell.borrow_mut() = blocks;
    });
}

thread_local! {
    /// [`fc_batch`]'s per-task output blocks, kept between calls.
    static FC_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`avx2::dot2x4`]'s portable form: two [`dot4`]s.
fn dot2x4_portable(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    [
        dot4::<false>(w0, x[0], x[1], x[2], x[3]),
        dot4::<false>(w1, x[0], x[1], x[2], x[3]),
    ]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fc_fma(w: &[f32], b: Option<&[f32]>, k: usize, x: &[f32], y: &mut [f32], o: usize) {
    fc_impl(
        w,
        b,
        k,
        x,
        y,
        o,
        |w, x0, x1, x2, x3| avx2::dot4(w, [x0, x1, x2, x3]),
        |w0, w1, xs| avx2::dot2x4(w0, w1, xs),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fc_avx512(w: &[f32], b: Option<&[f32]>, k: usize, x: &[f32], y: &mut [f32], o: usize) {
    fc_impl(
        w,
        b,
        k,
        x,
        y,
        o,
        |w, x0, x1, x2, x3| avx512::dot4(w, [x0, x1, x2, x3]),
        |w0, w1, xs| avx512::dot2x4(w0, w1, xs),
    )
}

/// The dot products of [`fc`]: four samples at a time with `dot2x4` (two weight rows) and
/// `dot4` (an odd last row); samples beyond a multiple of four against four weight rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fc_impl(
    w: &[f32],
    b: Option<&[f32]>,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    o: usize,
    dot4: impl Fn(&[f32], &[f32], &[f32], &[f32], &[f32]) -> [f32; 4],
    dot2x4: impl Fn(&[f32], &[f32], [&[f32]; 4]) -> [[f32; 4]; 2],
) {
    let m = x.len() / k;
    let bias = |j: usize| b.map_or(0.0, |b| b[j]);
    let full = m / 4 * 4;
    // Four samples per pass over the weights.
    for i0 in (0..full).step_by(4) {
        let row = |t: usize| &x[(i0 + t) * k..][..k];
        let (x0, x1, x2, x3) = (row(0), row(1), row(2), row(3));
        // Two weight rows at a time share each load of the samples.
        for j in (0..o / 2 * 2).step_by(2) {
            let d = dot2x4(&w[j * k..][..k], &w[(j + 1) * k..][..k], [x0, x1, x2, x3]);
            for (q, dq) in d.iter().enumerate() {
                for (t, dt) in dq.iter().enumerate() {
                    y[(i0 + t) * o + j + q] = bias(j + q) + dt;
                }
            }
        }
        for j in o / 2 * 2..o {
            let d = dot4(&w[j * k..][..k], x0, x1, x2, x3);
            for (t, dt) in d.iter().enumerate() {
                y[(i0 + t) * o + j] = bias(j) + dt;
            }
        }
    }
    // The last samples one at a time, each against four weight rows (the dot products are
    // symmetric); a short last group of rows repeats its last row.
    for i in full..m {
        let xi = &x[i * k..][..k];
        for j0 in (0..o).step_by(4) {
            let q = (o - j0).min(4);
            let wr = |t: usize| &w[(j0 + t.min(q - 1)) * k..][..k];
            let d = dot4(xi, wr(0), wr(1), wr(2), wr(3));
            for (t, dt) in d.iter().enumerate().take(q) {
                y[i * o + j0 + t] = bias(j0 + t) + dt;
            }
        }
    }
}

/// Eight f32 lanes: one AVX2 register.
type V8 = [f32; 8];

/// Lane-wise a * b + c.
#[inline(always)]
fn vfma<const FMA: bool>(a: V8, b: V8, c: V8) -> V8 {
    let mut r = [0f32; 8];
    for l in 0..8 {
        r[l] = madd::<FMA>(a[l], b[l], c[l]);
    }
    r
}

/// The eight lanes at `s[at..at + 8]`.
#[inline(always)]
fn v8(s: &[f32], at: usize) -> V8 {
    let mut v = [0f32; 8];
    v.copy_from_slice(&s[at..at + 8]);
    v
}

/// Four dot products of `w` with `x0..x3` (all of `w`'s length) sharing each load of `w`: eight
/// accumulators of eight lanes (one AVX2 register each), as whole-register values so the compiler
/// keeps them in registers.
#[inline(always)]
fn dot4<const FMA: bool>(w: &[f32], x0: &[f32], x1: &[f32], x2: &[f32], x3: &[f32]) -> [f32; 4] {
    let k = w.len();
    let (x0, x1, x2, x3) = (&x0[..k], &x1[..k], &x2[..k], &x3[..k]);
    let n = k / 16 * 16;
    let z = [0f32; 8];
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
    let mut k0 = 0;
    while k0 < n {
        let (wa, wb) = (v8(w, k0), v8(w, k0 + 8));
        a0 = vfma::<FMA>(wa, v8(x0, k0), a0);
        a1 = vfma::<FMA>(wb, v8(x0, k0 + 8), a1);
        a2 = vfma::<FMA>(wa, v8(x1, k0), a2);
        a3 = vfma::<FMA>(wb, v8(x1, k0 + 8), a3);
        a4 = vfma::<FMA>(wa, v8(x2, k0), a4);
        a5 = vfma::<FMA>(wb, v8(x2, k0 + 8), a5);
        a6 = vfma::<FMA>(wa, v8(x3, k0), a6);
        a7 = vfma::<FMA>(wb, v8(x3, k0 + 8), a7);
        k0 += 16;
    }
    let pairs = [(a0, a1, x0), (a2, a3, x1), (a4, a5, x2), (a6, a7, x3)];
    let mut out = [0f32; 4];
    for (o, (a, b, x)) in out.iter_mut().zip(pairs) {
        let mut v = 0.0;
        for l in 0..8 {
            v += a[l] + b[l];
        }
        for i in n..k {
            v = madd::<FMA>(w[i], x[i], v);
        }
        *o = v;
    }
    out
}

/// Hand-vectorised AVX2 kernels. The compiler's own vectoriser packs [`dot4`]'s four samples
/// into the lanes of 128-bit registers (gathers and shuffles, measured 3x slower), so the dot
/// products are written with intrinsics. No `unsafe` here: `__m256` is `bytemuck::Pod`, so loads
/// are plain casts of `[f32; 8]`, and the arithmetic intrinsics are safe inside functions that
/// enable their target features.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_hadd_ps, _mm256_setzero_ps, _mm_add_ps,
    };

    #[inline(always)]
    fn ld(v: &[f32; 8]) -> __m256 {
        bytemuck::cast(*v)
    }

    /// The first `n` (a multiple of 8) elements of `s` as vectors.
    #[inline(always)]
    fn vecs(s: &[f32], n: usize) -> &[[f32; 8]] {
        bytemuck::cast_slice(&s[..n])
    }

    /// Four dot products of `w` with `x[r]` (each at least `w`'s length), sharing each load of
    /// `w`: two accumulators per sample.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let k = w.len();
        let n = k / 16 * 16;
        let wv = vecs(w, n);
        let xv = [vecs(x[0], n), vecs(x[1], n), vecs(x[2], n), vecs(x[3], n)];
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..wv.len()).step_by(2) {
            let (wa, wb) = (ld(&wv[i]), ld(&wv[i + 1]));
            for r in 0..4 {
                acc[2 * r] = _mm256_fmadd_ps(wa, ld(&xv[r][i]), acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(wb, ld(&xv[r][i + 1]), acc[2 * r + 1]);
            }
        }
        // Reduce the four samples' lanes together: two horizontal-add rounds leave each
        // sample's partial sums in one lane of each 128-bit half; adding the halves finishes.
        let s = |r: usize| _mm256_add_ps(acc[2 * r], acc[2 * r + 1]);
        let h = _mm256_hadd_ps(_mm256_hadd_ps(s(0), s(1)), _mm256_hadd_ps(s(2), s(3)));
        let v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut out: [f32; 4] = bytemuck::cast(v);
        for (r, o) in out.iter_mut().enumerate() {
            for i in n..k {
                *o = w[i].mul_add(x[r][i], *o);
            }
        }
        out
    }

    /// Eight dot products: rows `w0` and `w1` (equal lengths) with each of `x[r]` (at least that
    /// long). Each load of a sample feeds two multiply-adds: 6 loads per 8 FMAs against
    /// [`dot4`]'s 10.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = w0.len();
        let n = k / 8 * 8;
        let (u, v) = (vecs(w0, n), vecs(&w1[..k], n));
        let xv = [vecs(x[0], n), vecs(x[1], n), vecs(x[2], n), vecs(x[3], n)];
        let mut a = [_mm256_setzero_ps(); 8];
        for i in 0..u.len() {
            let (p, q) = (ld(&u[i]), ld(&v[i]));
            for r in 0..4 {
                let xr = ld(&xv[r][i]);
                a[r] = _mm256_fmadd_ps(p, xr, a[r]);
                a[4 + r] = _mm256_fmadd_ps(q, xr, a[4 + r]);
            }
        }
        let reduce = |b: usize| -> [f32; 4] {
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(a[b], a[b + 1]),
                _mm256_hadd_ps(a[b + 2], a[b + 3]),
            );
            bytemuck::cast(_mm_add_ps(
                _mm256_castps256_ps128(h),
                _mm256_extractf128_ps::<1>(h),
            ))
        };
        let mut out = [reduce(0), reduce(4)];
        for (row, w) in out.iter_mut().zip([w0, w1]) {
            for (r, o) in row.iter_mut().enumerate() {
                for i in n..k {
                    *o = w[i].mul_add(x[r][i], *o);
                }
            }
        }
        out
    }
}

/// AVX-512 forms of [`avx2`]'s dot kernels: sixteen lanes per register, so half the
/// instructions for the same products (Zen 4/5 and recent Intel cores run them at full width).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_reduce_add_ps, _mm512_setzero_ps};

    #[inline(always)]
    fn ld(v: &[f32; 16]) -> __m512 {
        bytemuck::cast(*v)
    }

    /// The first `n` (a multiple of 16) elements of `s` as vectors.
    #[inline(always)]
    fn vecs(s: &[f32], n: usize) -> &[[f32; 16]] {
        bytemuck::cast_slice(&s[..n])
    }

    /// Adds the scalar products past the last whole vector.
    #[inline(always)]
    fn tail(w: &[f32], x: &[f32], from: usize, acc: f32) -> f32 {
        w[from..]
            .iter()
            .zip(&x[from..w.len()])
            .fold(acc, |a, (&p, &q)| p.mul_add(q, a))
    }

    /// Four dot products of `w` with `x[r]` (each at least `w`'s length).
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let k = w.len();
        let n = k / 16 * 16;
        let wv = vecs(w, n);
        let xv = [vecs(x[0], n), vecs(x[1], n), vecs(x[2], n), vecs(x[3], n)];
        let mut acc = [_mm512_setzero_ps(); 4];
        for (i, wi) in wv.iter().enumerate() {
            let p = ld(wi);
            for r in 0..4 {
                acc[r] = _mm512_fmadd_ps(p, ld(&xv[r][i]), acc[r]);
            }
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            out[r] = tail(w, x[r], n, _mm512_reduce_add_ps(acc[r]));
        }
        out
    }

    /// Eight dot products: rows `w0` and `w1` (equal lengths) with each of `x[r]` (at least
    /// that long); each load of a sample feeds two multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = w0.len();
        let n = k / 16 * 16;
        let (u, v) = (vecs(w0, n), vecs(&w1[..k], n));
        let xv = [vecs(x[0], n), vecs(x[1], n), vecs(x[2], n), vecs(x[3], n)];
        let mut a = [_mm512_setzero_ps(); 8];
        for i in 0..u.len() {
            let (p, q) = (ld(&u[i]), ld(&v[i]));
            for r in 0..4 {
                let xr = ld(&xv[r][i]);
                a[r] = _mm512_fmadd_ps(p, xr, a[r]);
                a[4 + r] = _mm512_fmadd_ps(q, xr, a[4 + r]);
            }
        }
        let mut out = [[0f32; 4]; 2];
        for (b, (row, w)) in out.iter_mut().zip([w0, w1]).enumerate() {
            for (r, o) in row.iter_mut().enumerate() {
                *o = tail(w, x[r], n, _mm512_reduce_add_ps(a[4 * b + r]));
            }
        }
        out
    }
}

// ------------------------------------------------------------------------------ conversions

/// True when `T` is f32 itself (so its slices are borrowed, not converted).
#[inline(always)]
fn is_f32<T: Element>() -> bool {
    T::DTYPE == DType::F32 && size_of::<T>() == 4
}

/// Widens `src` into `dst` (same length), in bulk.
#[inline(always)]
fn load<T: Element>(src: &[T], dst: &mut [f32]) {
    match T::DTYPE {
        DType::F32 if size_of::<T>() == 4 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 if size_of::<T>() == 2 => {
            bytemuck::cast_slice::<T, f16>(src).convert_to_f32_slice(dst)
        }
        DType::BF16 if size_of::<T>() == 2 => {
            for (d, &b) in dst.iter_mut().zip(bytemuck::cast_slice::<T, u16>(src)) {
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
}

/// Rounds `src` into `dst` (same length, round to nearest even), in bulk.
#[inline(always)]
fn store<T: Element>(src: &[f32], dst: &mut [T]) {
    match T::DTYPE {
        DType::F32 if size_of::<T>() == 4 => {
            bytemuck::cast_slice_mut::<T, f32>(dst).copy_from_slice(src)
        }
        DType::F16 if size_of::<T>() == 2 => {
            bytemuck::cast_slice_mut::<T, f16>(dst).convert_from_f32_slice(src)
        }
        DType::BF16 if size_of::<T>() == 2 => {
            for (d, &v) in bytemuck::cast_slice_mut::<T, u16>(dst).iter_mut().zip(src) {
                *d = bf16_bits(v);
            }
        }
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = T::from_f32(v);
            }
        }
    }
}

/// `half::bf16::from_f32(v).to_bits()` in a form the compiler vectorises: round to nearest
/// even by adding 0x7fff plus the kept lowest bit; NaNs stay quiet NaNs.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// `src` as f32: borrowed when `T` is f32, else widened into `buf`.
#[inline(always)]
fn view<'b, T: Element>(src: &'b [T], buf: &'b mut [f32; PIECE]) -> &'b [f32] {
    if is_f32::<T>() {
        bytemuck::cast_slice(src)
    } else {
        let b = &mut buf[..src.len()];
        load(src, b);
        b
    }
}

/// Runs `f` on `dst` as f32: directly when `T` is f32, else on `buf` (widened from `dst` first
/// when `load_old`) and rounded back.
#[inline(always)]
fn emit<T: Element>(
    dst: &mut [T],
    buf: &mut [f32; PIECE],
    load_old: bool,
    f: impl FnOnce(&mut [f32]),
) {
    if is_f32::<T>() {
        f(bytemuck::cast_slice_mut(dst))
    } else {
        let b = &mut buf[..dst.len()];
        if load_old {
            load(dst, b);
        }
        f(b);
        store(b, dst);
    }
}

// ------------------------------------------------------------------------------ small math

/// Lanes of the vector accumulators (independent chains the compiler maps to SIMD registers).
const LANES: usize = 16;

#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    let mut v = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// Sum of `v`, in f32 with [`LANES`] accumulators.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = v.chunks_exact(LANES);
    for ch in &mut it {
        for i in 0..LANES {
            acc[i] += ch[i];
        }
    }
    it.remainder().iter().sum::<f32>() + hsum(acc)
}

/// Dot product of two equal-length slices.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(x, y)| x * y)
        .sum();
    tail + hsum(acc)
}

/// sum of g * x where `s * x + r > 0`.
#[inline(always)]
fn masked_dot(g: &[f32], x: &[f32], r: &[f32], s: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = g.len() / LANES * LANES;
    for k in (0..n).step_by(LANES) {
        let (gc, xc, rc) = (&g[k..][..LANES], &x[k..][..LANES], &r[k..][..LANES]);
        for i in 0..LANES {
            let keep = epilogue_pre(s, xc[i], rc[i]) > 0.0;
            acc[i] += if keep { gc[i] * xc[i] } else { 0.0 };
        }
    }
    let mut tail = 0.0;
    for i in n..g.len() {
        if epilogue_pre(s, x[i], r[i]) > 0.0 {
            tail += g[i] * x[i];
        }
    }
    tail + hsum(acc)
}

/// y += x.
#[inline(always)]
fn add_to(y: &mut [f32], x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += xi;
    }
}

/// e^x, branch-free so loops over slices vectorise: x = k ln 2 + r with |r| <= ln 2 / 2, e^r
/// by its Taylor series to r^7 (truncation below 5e-9), 2^k by building the exponent. Inputs are
/// clamped to [-87, 88], where e^x stays a normal f32. Relative error about 2e-7 (see tests).
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split in two (Cephes) so k * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to integer
    let x = x.clamp(-87.0, 88.0);
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// The logistic function without overflow: e = e^-|x|, then 1 / (1 + e) or e / (1 + e).
#[inline(always)]
fn sigmoid_fast(x: f32) -> f32 {
    let e = exp_fast(-x.abs());
    let t = 1.0 / (1.0 + e);
    if x >= 0.0 {
        t
    } else {
        e * t
    }
}

/// act(h) in place.
fn act_slice(a: Activation, v: &mut [f32]) {
    match a {
        Activation::Relu => v.iter_mut().for_each(|h| *h = h.max(0.0)),
        Activation::Silu => v.iter_mut().for_each(|h| *h *= sigmoid_fast(*h)),
    }
}

/// gate(a) in place.
fn gate_slice(g: Gate, v: &mut [f32]) {
    match g {
        Gate::Sigmoid => v.iter_mut().for_each(|a| *a = sigmoid_fast(*a)),
        Gate::HardSigmoid => v
            .iter_mut()
            .for_each(|a| *a = (*a + 3.0).clamp(0.0, 6.0) / 6.0),
    }
}

#[inline(always)]
fn act_grad(a: Activation, h: f32) -> f32 {
    match a {
        Activation::Relu => {
            if h > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = sigmoid_fast(h);
            s * (1.0 + h * (1.0 - s))
        }
    }
}

/// gate'(a) from s = gate(a): s(1 - s) for the sigmoid; 1/6 where 0 < s < 1 (that is, strictly
/// inside (-3, 3)) for the hard sigmoid.
#[inline(always)]
fn gate_grad(g: Gate, s: f32) -> f32 {
    match g {
        Gate::Sigmoid => s * (1.0 - s),
        Gate::HardSigmoid => {
            if s > 0.0 && s < 1.0 {
                1.0 / 6.0
            } else {
                0.0
            }
        }
    }
}

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
