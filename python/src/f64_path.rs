//! float64 SE forward and backward with float64 weights: senet's reference math (DESIGN.md,
//! `senet::se::reference`) in plain loops, for `torch.autograd.gradcheck` (whose finite
//! differences need every operand, weights included, in f64; senet's own reference takes f32
//! weights). Saved state as the CPU path keeps it: `z`, `h`, `u = act(h)`, `s`; the gate's
//! derivative is taken from `s` (sigmoid: `s(1 - s)`, hard-sigmoid: 1/6 where `0 < s < 1`).

use crate::{slice, slice_mut, Problem};
use senet::Gate;

/// Pointers of one backward call (0 = absent).
pub(crate) struct BwdPtrs {
    pub x: usize,
    pub residual: usize,
    pub dy: usize,
    pub w: [usize; 4],
    pub saved: [usize; 4],
    pub dx: usize,
    pub dresidual: usize,
    pub grads: [usize; 4],
}

fn opt(p: usize) -> Option<usize> {
    (p != 0).then_some(p)
}

/// Forward in f64.
///
/// # Safety
/// Every pointer must hold its operand's size for `p`, as f64.
pub(crate) unsafe fn forward(
    p: Problem,
    x: usize,
    residual: usize,
    y: usize,
    w: [usize; 4],
    saved: [usize; 4],
) -> senet::Result<()> {
    let sh = p.shape;
    let cfg = p.config;
    let (n_, c_, d_, hw) = (sh.n, cfg.channels, cfg.hidden, sh.hw());
    let numel = sh.numel();
    let xd: &[f64] = slice(x, numel);
    let rd: Option<&[f64]> = opt(residual).map(|r| slice(r, numel));
    let yd: &mut [f64] = slice_mut(y, numel);
    let w1: &[f64] = slice(w[0], d_ * c_);
    let b1: Option<&[f64]> = opt(w[1]).map(|b| slice(b, d_));
    let w2: &[f64] = slice(w[2], c_ * d_);
    let b2: Option<&[f64]> = opt(w[3]).map(|b| slice(b, c_));
    let z: &mut [f64] = slice_mut(saved[0], n_ * c_);
    let h: &mut [f64] = slice_mut(saved[1], n_ * d_);
    let u: &mut [f64] = slice_mut(saved[2], n_ * d_);
    let s: &mut [f64] = slice_mut(saved[3], n_ * c_);
    for n in 0..n_ {
        for c in 0..c_ {
            let mut acc = 0.0;
            for q in 0..hw {
                acc += xd[sh.offset(p.layout, n, c, q)];
            }
            z[n * c_ + c] = acc / hw as f64;
        }
        for j in 0..d_ {
            let mut acc = b1.map_or(0.0, |b| b[j]);
            for c in 0..c_ {
                acc += w1[j * c_ + c] * z[n * c_ + c];
            }
            h[n * d_ + j] = acc;
            u[n * d_ + j] = cfg.activation.apply(acc);
        }
        for c in 0..c_ {
            let mut acc = b2.map_or(0.0, |b| b[c]);
            for j in 0..d_ {
                acc += w2[c * d_ + j] * u[n * d_ + j];
            }
            let sc = cfg.gate.apply(acc);
            s[n * c_ + c] = sc;
            for q in 0..hw {
                let i = sh.offset(p.layout, n, c, q);
                let v = sc * xd[i];
                yd[i] = match rd {
                    Some(r) => (v + r[i]).max(0.0),
                    None => v,
                };
            }
        }
    }
    Ok(())
}

/// Backward in f64 (parameter gradients overwritten).
///
/// # Safety
/// Every pointer must hold its operand's size for `p`, as f64.
pub(crate) unsafe fn backward(p: Problem, ptr: BwdPtrs) -> senet::Result<()> {
    let sh = p.shape;
    let cfg = p.config;
    let (n_, c_, d_, hw) = (sh.n, cfg.channels, cfg.hidden, sh.hw());
    let numel = sh.numel();
    let xd: &[f64] = slice(ptr.x, numel);
    let rd: Option<&[f64]> = opt(ptr.residual).map(|r| slice(r, numel));
    let dyd: &[f64] = slice(ptr.dy, numel);
    let w1: &[f64] = slice(ptr.w[0], d_ * c_);
    let w2: &[f64] = slice(ptr.w[2], c_ * d_);
    let z: &[f64] = slice(ptr.saved[0], n_ * c_);
    let h: &[f64] = slice(ptr.saved[1], n_ * d_);
    let u: &[f64] = slice(ptr.saved[2], n_ * d_);
    let s: &[f64] = slice(ptr.saved[3], n_ * c_);
    let dx: &mut [f64] = slice_mut(ptr.dx, numel);
    let mut dres: Option<&mut [f64]> = opt(ptr.dresidual).map(|r| slice_mut(r, numel));
    let dw1: &mut [f64] = slice_mut(ptr.grads[0], d_ * c_);
    let mut db1: Option<&mut [f64]> = opt(ptr.grads[1]).map(|b| slice_mut(b, d_));
    let dw2: &mut [f64] = slice_mut(ptr.grads[2], c_ * d_);
    let mut db2: Option<&mut [f64]> = opt(ptr.grads[3]).map(|b| slice_mut(b, c_));
    dw1.fill(0.0);
    dw2.fill(0.0);
    if let Some(b) = db1.as_deref_mut() {
        b.fill(0.0);
    }
    if let Some(b) = db2.as_deref_mut() {
        b.fill(0.0);
    }
    let mut dg = vec![0.0; c_];
    let mut du = vec![0.0; d_];
    let mut dz = vec![0.0; c_];
    for n in 0..n_ {
        // g = dy through the epilogue's ReLU mask (written to d residual), ds = sum g * x.
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            let mut ds = 0.0;
            for q in 0..hw {
                let i = sh.offset(p.layout, n, c, q);
                let g = match rd {
                    Some(r) if sc * xd[i] + r[i] <= 0.0 => 0.0,
                    _ => dyd[i],
                };
                if let Some(dr) = dres.as_deref_mut() {
                    dr[i] = g;
                }
                ds += g * xd[i];
            }
            let gate_d = match cfg.gate {
                Gate::Sigmoid => sc * (1.0 - sc),
                Gate::HardSigmoid => {
                    if sc > 0.0 && sc < 1.0 {
                        1.0 / 6.0
                    } else {
                        0.0
                    }
                }
            };
            dg[c] = ds * gate_d;
        }
        for j in 0..d_ {
            let mut acc = 0.0;
            for c in 0..c_ {
                acc += w2[c * d_ + j] * dg[c];
                dw2[c * d_ + j] += dg[c] * u[n * d_ + j];
            }
            du[j] = acc * cfg.activation.derivative(h[n * d_ + j]);
        }
        if let Some(b) = db2.as_deref_mut() {
            for c in 0..c_ {
                b[c] += dg[c];
            }
        }
        if let Some(b) = db1.as_deref_mut() {
            for j in 0..d_ {
                b[j] += du[j];
            }
        }
        for c in 0..c_ {
            let mut acc = 0.0;
            for j in 0..d_ {
                acc += w1[j * c_ + c] * du[j];
                dw1[j * c_ + c] += du[j] * z[n * c_ + c];
            }
            dz[c] = acc;
        }
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            let dzc = dz[c] / hw as f64;
            for q in 0..hw {
                let i = sh.offset(p.layout, n, c, q);
                let g = match rd {
                    Some(r) if sc * xd[i] + r[i] <= 0.0 => 0.0,
                    _ => dyd[i],
                };
                dx[i] = g * sc + dzc;
            }
        }
    }
    Ok(())
}
