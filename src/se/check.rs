//! Judging a backend against the reference: the expected values, the size of what each
//! expected value sums, and the errors DESIGN.md's contract is stated in.
//!
//! Errors are relative L2 with DESIGN.md's tolerances. A value computed as a sum is measured
//! against the magnitudes of its summands rather than its own size: when a sum cancels (a
//! parameter gradient over a batch whose terms have both signs, a pooled mean of values of both
//! signs), f32 rounding of each term legitimately exceeds 1e-5 of the tiny result, and no f32
//! implementation could pass. The magnitude of a sum is the same sum over absolute values,
//! propagated through |W| the way the value itself is computed (the classical bound
//! |fl(sum) - sum| <= gamma_n sum |terms|); it equals |value| when nothing cancels, so where
//! there is no cancellation this is exactly DESIGN.md's relative error.
//!
//! Inputs from [`input`] never hold zeros (nor f16 subnormals). Values that meet a kink (the
//! ReLU's at 0, the hard sigmoid's at -3 and 3) are kept away from it, since there f32 and f64
//! may legitimately take different sides: [`weights_off_kinks`] for the excitation's hidden and
//! gate inputs, [`residual_off_kink`] for the epilogue's pre-activation.

use super::reference::{self, SeBackward, SeForward, SeSaved};
use super::{Activation, SeGrads, SeWeights};
use crate::error::Result;
use crate::tensor::{rel_l2_error, DType, Element, Layout, Shape, Tensor};

/// Random inputs with magnitudes in `[1/64, 1)` and random signs: never zero, never an f16
/// subnormal.
pub fn input<T: Element>(shape: Shape, layout: Layout, seed: u64) -> Result<Tensor<T>> {
    let u = crate::rng::uniform_vec(shape.numel(), -1.0, 1.0, seed);
    let v = u
        .iter()
        .map(|&u| T::from_f32(u.signum() * (1.0 / 64.0 + u.abs() * 63.0 / 64.0)))
        .collect();
    Tensor::from_vec(shape, layout, v)
}

/// `r` with the sign flipped wherever the epilogue's pre-activation `s x + r` lies within 1e-3
/// of its summands' size from the ReLU's kink: there f32 and the f64 reference may round to
/// different sides, and both masks are right. `s` does not depend on the residual.
pub fn residual_off_kink<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    mut r: Tensor<T>,
) -> Result<Tensor<T>> {
    let s = reference::forward(w, x, None)?.saved.s;
    let sh = x.shape();
    for n in 0..sh.n {
        for c in 0..sh.c {
            for p in 0..sh.hw() {
                let i = sh.offset(x.layout(), n, c, p);
                let sx = s[n * sh.c + c] * x.data()[i].to_f64();
                let rv = r.data()[i].to_f64();
                if (sx + rv).abs() < 1e-3 * (sx.abs() + rv.abs()) {
                    r.data_mut()[i] = T::from_f64(-rv);
                }
            }
        }
    }
    Ok(r)
}

/// Magnitudes (elementwise bounds on the summands) of every value a backend produces.
#[derive(Clone, Debug)]
pub struct Magnitudes {
    /// Of z (`[n][c]`).
    pub z: Vec<f64>,
    /// Of h and u (`[n][d]`).
    pub h: Vec<f64>,
    /// Of s (`[n][c]`).
    pub s: Vec<f64>,
    /// Of y.
    pub y: Vec<f64>,
    /// Of dx.
    pub dx: Vec<f64>,
    /// Of the parameter gradients.
    pub grads: SeGrads<f64>,
}

/// The reference's results on one set of inputs, with their magnitudes.
pub struct Expected {
    /// Reference forward.
    pub forward: SeForward,
    /// Reference backward.
    pub backward: SeBackward,
    /// u = act(h).
    pub u: Vec<f64>,
    /// Magnitudes for the sum-aware errors.
    pub mag: Magnitudes,
}

/// Runs the reference forward and backward and computes the magnitudes.
pub fn expected<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    r: Option<&Tensor<T>>,
    dy: &Tensor<T>,
) -> Result<Expected> {
    let forward = reference::forward(w, x, r)?;
    let backward = reference::backward(w, x, r, &forward.saved, dy)?;
    let u = forward
        .saved
        .h
        .iter()
        .map(|&h| w.config.activation.apply(h))
        .collect();
    let mag = magnitudes(w, x, r, dy, &forward.saved)?;
    Ok(Expected {
        forward,
        backward,
        u,
        mag,
    })
}

/// Summand magnitudes of the forward's sums: `M_z` (mean |x|, `[n][c]`), `M_h`
/// (`|b1| + |W1| M_z`, `[n][d]`) and `M_a` (`|b2| + |W2| M_h`, `[n][c]`; `|act(h)| <= |h|` for
/// both activations, so `M_h` bounds u too).
#[allow(clippy::needless_range_loop)] // indices mirror the reference's loops
fn forward_magnitudes<T: Element>(w: &SeWeights, x: &Tensor<T>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let sh = x.shape();
    let (n, c, d) = (sh.n, sh.c, w.config.hidden);
    let bias = |b: &Option<Vec<f32>>, i: usize| b.as_ref().map_or(0.0, |b| (b[i] as f64).abs());
    let mz = pooled_magnitudes(x);
    let mut mh = vec![0.0; n * d];
    let mut ma = vec![0.0; n * c];
    for nn in 0..n {
        for j in 0..d {
            let t: f64 = (0..c)
                .map(|cc| (w.w1[j * c + cc] as f64).abs() * mz[nn * c + cc])
                .sum();
            mh[nn * d + j] = bias(&w.b1, j) + t;
        }
        for cc in 0..c {
            let t: f64 = (0..d)
                .map(|j| (w.w2[cc * d + j] as f64).abs() * mh[nn * d + j])
                .sum();
            ma[nn * c + cc] = bias(&w.b2, cc) + t;
        }
    }
    (mz, mh, ma)
}

/// `M_z`: mean |x| per sample and channel, `[n][c]`.
fn pooled_magnitudes<T: Element>(x: &Tensor<T>) -> Vec<f64> {
    let sh = x.shape();
    let xd = x.to_f64_vec();
    let mut mz = vec![0.0; sh.n * sh.c];
    for nn in 0..sh.n {
        for cc in 0..sh.c {
            let t: f64 = (0..sh.hw())
                .map(|p| xd[sh.offset(x.layout(), nn, cc, p)].abs())
                .sum();
            mz[nn * sh.c + cc] = t / sh.hw() as f64;
        }
    }
    mz
}

/// f32's unit roundoff.
const UNIT: f64 = f32::EPSILON as f64 / 2.0;

/// The rounding error of a sum of `k` terms, relative to the sum of their magnitudes: the
/// probabilistic bound `lambda sqrt(k) u` (Higham and Mary, "A new approach to probabilistic
/// rounding error analysis", 2019), with lambda = 4. The worst case, `k u`, is reached only when
/// every rounding errs the same way; taking it makes the margin around a kink as wide as a
/// pooled mean over 56 x 56 pixels is large, leaving no weight that can move a value out.
fn gamma(k: usize) -> f64 {
    4.0 * (k as f64).sqrt() * UNIT
}

/// A value closer to a kink than this many times its f32 rounding-error bound is moved.
pub const KINK_MARGIN: f64 = 16.0;

/// The kinks of the excitation's functions: the ReLU's at 0 (h), the hard sigmoid's at -3 and 3
/// (a). SiLU and the sigmoid are smooth.
pub(crate) fn kinks(w: &SeWeights) -> (&'static [f64], &'static [f64]) {
    let h: &'static [f64] = match w.config.activation {
        Activation::Relu => &[0.0],
        Activation::Silu => &[],
    };
    let a: &'static [f64] = match w.config.gate {
        super::Gate::HardSigmoid => &[-3.0, 3.0],
        super::Gate::Sigmoid => &[],
    };
    (h, a)
}

/// Bounds on the f32 rounding errors of the excitation's values, whatever the order of the sums
/// (|fl(sum) - sum| <= gamma(k) sum |terms|, see [`gamma`]).
struct RoundingBounds {
    /// Of z, `[n][c]`: the pooled mean's, `(hw + 2) u mean|x|`.
    z: Vec<f64>,
    /// Of h, `[n][d]`: z's carried through |W1|, plus the layer's own.
    h: Vec<f64>,
    /// Of u = act(h), `[n][d]`.
    u: Vec<f64>,
    /// Of a, `[n][c]`: u's carried through |W2|, plus the layer's own.
    a: Vec<f64>,
}

#[allow(clippy::needless_range_loop)] // indices mirror the reference's loops
fn rounding_bounds<T: Element>(w: &SeWeights, x: &Tensor<T>, saved: &SeSaved) -> RoundingBounds {
    let sh = x.shape();
    let cfg = w.config;
    let (n, c, d, hw) = (sh.n, sh.c, cfg.hidden, sh.hw());
    let mz = pooled_magnitudes(x);
    let bias = |b: &Option<Vec<f32>>, i: usize| b.as_ref().map_or(0.0, |b| (b[i] as f64).abs());
    let ez: Vec<f64> = mz.iter().map(|m| gamma(hw + 2) * m).collect();
    let mut eh = vec![0.0; n * d];
    let mut eu = vec![0.0; n * d];
    let mut ea = vec![0.0; n * c];
    for nn in 0..n {
        for j in 0..d {
            let (mut terms, mut carried) = (bias(&w.b1, j), 0.0);
            for cc in 0..c {
                let w1 = (w.w1[j * c + cc] as f64).abs();
                terms += w1 * saved.z[nn * c + cc].abs();
                carried += w1 * ez[nn * c + cc];
            }
            eh[nn * d + j] = gamma(c + 1) * terms + carried;
            let h = saved.h[nn * d + j];
            // |act'| <= 1.1, plus the activation's own rounding.
            eu[nn * d + j] = 1.1 * eh[nn * d + j] + 4.0 * UNIT * cfg.activation.apply(h).abs();
        }
        for cc in 0..c {
            let (mut terms, mut carried) = (bias(&w.b2, cc), 0.0);
            for j in 0..d {
                let w2 = (w.w2[cc * d + j] as f64).abs();
                terms += w2 * cfg.activation.apply(saved.h[nn * d + j]).abs();
                carried += w2 * eu[nn * d + j];
            }
            ea[nn * c + cc] = gamma(d + 1) * terms + carried;
        }
    }
    RoundingBounds {
        z: ez,
        h: eh,
        u: eu,
        a: ea,
    }
}

/// How close, on input `x`, the excitation's values come to a kink of their functions (a
/// hidden pre-activation h to the ReLU's at 0, a gate input a to the hard sigmoid's at -3 and
/// 3), in units of each value's f32 rounding-error bound: below 1, f32 and the f64
/// reference may take different sides of the kink, and both derivatives are right. Infinite
/// when no function has a kink (or a value sits on one exactly, with no rounding error).
pub fn kink_distance<T: Element>(w: &SeWeights, x: &Tensor<T>) -> Result<f64> {
    let saved = reference::forward(w, x, None)?.saved;
    let e = rounding_bounds(w, x, &saved);
    let (hk, ak) = kinks(w);
    let dist = |v: f64, e: f64, ks: &[f64]| {
        ks.iter()
            .map(|k| {
                let gap = (v - k).abs();
                if e > 0.0 {
                    gap / e
                } else {
                    f64::INFINITY
                }
            })
            .fold(f64::INFINITY, f64::min)
    };
    let h = saved.h.iter().zip(&e.h).map(|(&v, &e)| dist(v, e, hk));
    let a = saved.a.iter().zip(&e.a).map(|(&v, &e)| dist(v, e, ak));
    Ok(h.chain(a).fold(f64::INFINITY, f64::min))
}

/// `w` with its excitation weights nudged so that, on input `x`, no hidden pre-activation h
/// (ReLU) or gate input a (hard sigmoid) lies within [`KINK_MARGIN`] times its f32
/// rounding-error bound of a kink ([`kink_distance`] `>= KINK_MARGIN` afterwards). There f32
/// and the f64 reference may take different sides, and both derivatives are right (seen:
/// h = 1.7e-8 in f64 and -1.1e-8 in f32, zeroing a whole row of dW1 in one and not the other).
/// The nudge changes the one weight of that row facing the largest input (or the bias) so the
/// value lands twice the margin from the kink, on the side it was on: a few weights move, by a
/// small fraction of their size, and the draw stays a random one. A nudge for one sample moves
/// the others too, so this repeats (at most 16 rounds).
///
/// An error when no weight can move a value: a row without bias whose inputs are all within
/// their own rounding error of 0 (pooled means that cancel, as with one channel whose few
/// pixels sum to almost nothing). Draw another `x` then.
pub fn weights_off_kinks<T: Element>(mut w: SeWeights, x: &Tensor<T>) -> Result<SeWeights> {
    let n = x.shape().n;
    let (hk, ak) = kinks(&w);
    for _ in 0..16 {
        let saved = reference::forward(&w, x, None)?.saved;
        let e = rounding_bounds(&w, x, &saved);
        let hidden = Layer {
            what: "h of hidden unit",
            values: &saved.h,
            bounds: &e.h,
            inputs: &saved.z,
            input_bounds: &e.z,
            kinks: hk,
        };
        if nudge(&hidden, n, &mut w.w1, w.b1.as_deref_mut())? {
            continue; // h changed: u, a and their bounds are stale
        }
        let u: Vec<f64> = saved
            .h
            .iter()
            .map(|&h| w.config.activation.apply(h))
            .collect();
        let gate = Layer {
            what: "a of channel",
            values: &saved.a,
            bounds: &e.a,
            inputs: &u,
            input_bounds: &e.u,
            kinks: ak,
        };
        if !nudge(&gate, n, &mut w.w2, w.b2.as_deref_mut())? {
            return Ok(w);
        }
    }
    Err(crate::error::Error::Config(
        "could not move the excitation's values off their kinks in 16 rounds".into(),
    ))
}

/// One fully connected layer of the excitation, as [`nudge`] sees it: outputs `[n][o]` with
/// their rounding-error bounds, inputs `[n][k]` with theirs, and the outputs' kinks.
struct Layer<'a> {
    what: &'static str,
    values: &'a [f64],
    bounds: &'a [f64],
    inputs: &'a [f64],
    input_bounds: &'a [f64],
    kinks: &'a [f64],
}

/// For every output of `layer` within [`KINK_MARGIN`] bounds of a kink, moves the weight
/// (`weights`, `[o][k]`) facing the sample's largest input, or else the output's bias, so the
/// output lands twice the margin from the kink on its side. Whether anything moved; an error
/// where nothing can.
fn nudge(
    layer: &Layer,
    n: usize,
    weights: &mut [f32],
    mut bias: Option<&mut [f32]>,
) -> Result<bool> {
    let (o, k) = (layer.values.len() / n, layer.inputs.len() / n);
    let mut moved = false;
    for nn in 0..n {
        let inputs = &layer.inputs[nn * k..(nn + 1) * k];
        let (im, vm) = argmax_abs(inputs);
        // Moving a weight by t moves its sum by t v and the sum's error bound by |t| (its
        // input's error + gamma(k + 1) |v|): of use only where v stands well clear of its own
        // error.
        let weight_moves = vm.abs()
            > 4.0 * KINK_MARGIN * (layer.input_bounds[nn * k + im] + gamma(k + 1) * vm.abs());
        for j in 0..o {
            let (v, e) = (layer.values[nn * o + j], layer.bounds[nn * o + j]);
            let Some(&kink) = layer
                .kinks
                .iter()
                .find(|&&kink| (v - kink).abs() < KINK_MARGIN * e)
            else {
                continue;
            };
            // The change that puts v twice the margin from the kink, on its side.
            let side = if v >= kink { 1.0 } else { -1.0 };
            let dv = kink + side * 2.0 * KINK_MARGIN * e - v;
            if weight_moves {
                weights[j * k + im] += (dv / vm) as f32;
            } else if let Some(b) = bias.as_deref_mut() {
                b[j] += dv as f32;
            } else {
                return Err(crate::error::Error::Config(format!(
                    "{} {j} of sample {nn} is within its rounding error of a kink and no \
                     weight can move it: draw another input",
                    layer.what
                )));
            }
            moved = true;
        }
    }
    Ok(moved)
}

/// An input from [`input`] and `w` moved off the kinks on it ([`weights_off_kinks`]): the
/// usual way to draw a case. Where the nudge cannot work for that `x` (pooled means that cancel
/// to within rounding, with no bias to move instead) the next `x` in the seed's sequence is
/// drawn, up to 8 times.
pub fn input_off_kinks<T: Element>(
    w: SeWeights,
    shape: Shape,
    layout: Layout,
    seed: u64,
) -> Result<(Tensor<T>, SeWeights)> {
    let mut k = 0u64;
    loop {
        let x = input::<T>(
            shape,
            layout,
            seed.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        )?;
        match weights_off_kinks(w.clone(), &x) {
            Ok(w) => return Ok((x, w)),
            Err(e) if k == 7 => return Err(e),
            Err(_) => k += 1,
        }
    }
}

/// Index and value of the element of largest magnitude (`(0, 0.0)` for an empty slice).
fn argmax_abs(v: &[f64]) -> (usize, f64) {
    v.iter().copied().enumerate().fold(
        (0, 0.0),
        |(bi, bv), (i, x)| {
            if x.abs() > bv.abs() {
                (i, x)
            } else {
                (bi, bv)
            }
        },
    )
}

#[allow(clippy::needless_range_loop)] // indices mirror the reference's loops
fn magnitudes<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    r: Option<&Tensor<T>>,
    dy: &Tensor<T>,
    saved: &SeSaved,
) -> Result<Magnitudes> {
    let sh = x.shape();
    let cfg = w.config;
    let (n, c, d, hw) = (sh.n, sh.c, cfg.hidden, sh.hw());
    let xd = x.to_f64_vec();
    let (mz, mh, ma) = forward_magnitudes(w, x);
    let ms: Vec<f64> = (0..n * c)
        .map(|a| (cfg.gate.derivative(saved.a[a]) * ma[a]).max(saved.s[a].abs()))
        .collect();
    // y = s x (+ r): |x| M_s (+ |r|).
    let mut my = vec![0.0; sh.numel()];
    let mut g = vec![0.0; sh.numel()];
    for nn in 0..n {
        for cc in 0..c {
            for p in 0..hw {
                let i = sh.offset(x.layout(), nn, cc, p);
                my[i] =
                    xd[i].abs() * ms[nn * c + cc] + r.map_or(0.0, |r| r.data()[i].to_f64().abs());
                // g = dy through the mask (the mask of the reference, off the kink by input choice).
                let masked =
                    r.is_some_and(|r| saved.s[nn * c + cc] * xd[i] + r.data()[i].to_f64() <= 0.0);
                g[i] = if masked { 0.0 } else { dy.data()[i].to_f64() };
            }
        }
    }
    let act_max = match cfg.activation {
        Activation::Relu => 1.0,
        Activation::Silu => 1.1, // max of SiLU' is 1.0998
    };
    let mut mg = SeGrads {
        dw1: vec![0.0; d * c],
        db1: cfg.bias.then(|| vec![0.0; d]),
        dw2: vec![0.0; c * d],
        db2: cfg.bias.then(|| vec![0.0; c]),
    };
    let mut mdx = vec![0.0; sh.numel()];
    for nn in 0..n {
        let mut m_dg = vec![0.0; c];
        for cc in 0..c {
            let ds: f64 = (0..hw)
                .map(|p| {
                    let i = sh.offset(x.layout(), nn, cc, p);
                    (g[i] * xd[i]).abs()
                })
                .sum();
            m_dg[cc] = ds * cfg.gate.derivative(saved.a[nn * c + cc]).abs();
        }
        let mut m_du = vec![0.0; d];
        for j in 0..d {
            let t: f64 = (0..c)
                .map(|cc| (w.w2[cc * d + j] as f64).abs() * m_dg[cc])
                .sum();
            m_du[j] = t * cfg.activation.derivative(saved.h[nn * d + j]).abs();
        }
        for cc in 0..c {
            for j in 0..d {
                mg.dw2[cc * d + j] += m_dg[cc] * act_max * mh[nn * d + j];
                mg.dw1[j * c + cc] += m_du[j] * mz[nn * c + cc];
            }
            let m_dz: f64 = (0..d)
                .map(|j| (w.w1[j * c + cc] as f64).abs() * m_du[j])
                .sum::<f64>()
                / hw as f64;
            for p in 0..hw {
                let i = sh.offset(x.layout(), nn, cc, p);
                mdx[i] = g[i].abs() * ms[nn * c + cc] + m_dz;
            }
        }
        if let Some(b) = mg.db2.as_mut() {
            b.iter_mut().zip(&m_dg).for_each(|(a, v)| *a += v);
        }
        if let Some(b) = mg.db1.as_mut() {
            b.iter_mut().zip(&m_du).for_each(|(a, v)| *a += v);
        }
    }
    Ok(Magnitudes {
        z: mz,
        h: mh,
        s: ms,
        y: my,
        dx: mdx,
        grads: mg,
    })
}

/// `||got - want|| / ||magnitude||`: relative L2 against the size of the summands (`inf` on
/// NaN or a length mismatch).
pub fn sum_error(got: &[f64], want: &[f64], magnitude: &[f64]) -> f64 {
    if got.len() != want.len() || magnitude.len() != want.len() || got.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = magnitude.iter().map(|m| m * m).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// What a backend produced (any subset), widened to f64.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Output.
    pub y: Option<Vec<f64>>,
    /// Saved means.
    pub z: Option<Vec<f64>>,
    /// Saved hidden pre-activations.
    pub h: Option<Vec<f64>>,
    /// Saved hidden activations.
    pub u: Option<Vec<f64>>,
    /// Saved channel weights.
    pub s: Option<Vec<f64>>,
    /// Input gradient.
    pub dx: Option<Vec<f64>>,
    /// Parameter gradients.
    pub grads: Option<SeGrads<f64>>,
    /// Residual gradient.
    pub dresidual: Option<Vec<f64>>,
}

/// One compared quantity.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Which value.
    pub what: &'static str,
    /// Its error (relative L2, against summand magnitudes for sums).
    pub err: f64,
    /// DESIGN.md's tolerance for it.
    pub tol: f64,
}

impl Check {
    /// Within tolerance (NaN never is).
    pub fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

/// Compares what a backend produced for activations of `dtype` with the reference: outputs
/// (y) at the dtype's output tolerance, gradients through activations (dx, d residual) at its
/// gradient tolerance, f32 intermediates (z, h, u, s) at 1e-5 and f32 parameter gradients at
/// 1e-4.
pub fn compare(exp: &Expected, obs: &Observed, dtype: DType) -> Vec<Check> {
    let mut out = Vec::new();
    let (ty, tg) = (dtype.output_tolerance(), dtype.grad_tolerance());
    let (ts, tw) = (DType::F32.output_tolerance(), DType::F32.grad_tolerance());
    let f = &exp.forward;
    let b = &exp.backward;
    let m = &exp.mag;
    fn push(
        out: &mut Vec<Check>,
        what: &'static str,
        got: &Option<Vec<f64>>,
        want: &[f64],
        mag: &[f64],
        tol: f64,
    ) {
        if let Some(g) = got {
            out.push(Check {
                what,
                err: sum_error(g, want, mag),
                tol,
            });
        }
    }
    push(&mut out, "y", &obs.y, &f.y, &m.y, ty);
    push(&mut out, "z", &obs.z, &f.saved.z, &m.z, ts);
    push(&mut out, "h", &obs.h, &f.saved.h, &m.h, ts);
    push(&mut out, "u", &obs.u, &exp.u, &m.h, ts);
    push(&mut out, "s", &obs.s, &f.saved.s, &m.s, ts);
    push(&mut out, "dx", &obs.dx, &b.dx, &m.dx, tg);
    if let Some(g) = &obs.grads {
        push(
            &mut out,
            "dw1",
            &Some(g.dw1.clone()),
            &b.grads.dw1,
            &m.grads.dw1,
            tw,
        );
        push(
            &mut out,
            "dw2",
            &Some(g.dw2.clone()),
            &b.grads.dw2,
            &m.grads.dw2,
            tw,
        );
        match (&g.db1, &b.grads.db1, &m.grads.db1) {
            (Some(got), Some(want), Some(mag)) => {
                push(&mut out, "db1", &Some(got.clone()), want, mag, tw)
            }
            (None, None, _) => {}
            _ => out.push(Check {
                what: "db1 present",
                err: f64::INFINITY,
                tol: 0.0,
            }),
        }
        match (&g.db2, &b.grads.db2, &m.grads.db2) {
            (Some(got), Some(want), Some(mag)) => {
                push(&mut out, "db2", &Some(got.clone()), want, mag, tw)
            }
            (None, None, _) => {}
            _ => out.push(Check {
                what: "db2 present",
                err: f64::INFINITY,
                tol: 0.0,
            }),
        }
    }
    match (&obs.dresidual, &b.dresidual) {
        (Some(got), Some(want)) => out.push(Check {
            what: "dresidual",
            err: rel_l2_error(got, want),
            tol: tg,
        }),
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) if obs.dx.is_some() => out.push(Check {
            what: "dresidual present",
            err: f64::INFINITY,
            tol: 0.0,
        }),
        _ => {}
    }
    out
}

/// Widens f32s.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Widens f32 gradients.
pub fn widen_grads(g: &SeGrads<f32>) -> SeGrads<f64> {
    SeGrads {
        dw1: widen(&g.dw1),
        db1: g.db1.as_deref().map(widen),
        dw2: widen(&g.dw2),
        db2: g.db2.as_deref().map(widen),
    }
}
