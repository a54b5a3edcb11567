//! Small math: sums and dots with several accumulators, fast exp and sigmoid, activations
//! and gates and their derivatives.

use super::*;

/// Lanes of the vector accumulators (independent chains the compiler maps to SIMD registers).
pub(super) const LANES: usize = 16;

#[inline(always)]
pub(super) fn hsum(acc: [f32; LANES]) -> f32 {
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
pub(super) fn sum(v: &[f32]) -> f32 {
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn masked_dot(g: &[f32], x: &[f32], r: &[f32], s: f32) -> f32 {
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
pub(super) fn add_to(y: &mut [f32], x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += xi;
    }
}

/// e^x, branch-free so loops over slices vectorise: x = k ln 2 + r with |r| <= ln 2 / 2, e^r
/// by its Taylor series to r^7 (truncation below 5e-9), 2^k by building the exponent. Inputs are
/// clamped to [-87, 88], where e^x stays a normal f32. Relative error about 2e-7 (see tests).
#[inline(always)]
pub(super) fn exp_fast(x: f32) -> f32 {
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
pub(super) fn sigmoid_fast(x: f32) -> f32 {
    let e = exp_fast(-x.abs());
    let t = 1.0 / (1.0 + e);
    if x >= 0.0 {
        t
    } else {
        e * t
    }
}

/// act(h) in place.
pub(super) fn act_slice(a: Activation, v: &mut [f32]) {
    match a {
        Activation::Relu => v.iter_mut().for_each(|h| *h = h.max(0.0)),
        Activation::Silu => v.iter_mut().for_each(|h| *h *= sigmoid_fast(*h)),
    }
}

/// gate(a) in place.
pub(super) fn gate_slice(g: Gate, v: &mut [f32]) {
    match g {
        Gate::Sigmoid => v.iter_mut().for_each(|a| *a = sigmoid_fast(*a)),
        Gate::HardSigmoid => v
            .iter_mut()
            .for_each(|a| *a = (*a + 3.0).clamp(0.0, 6.0) / 6.0),
    }
}

#[inline(always)]
pub(super) fn act_grad(a: Activation, h: f32) -> f32 {
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
pub(super) fn gate_grad(g: Gate, s: f32) -> f32 {
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
