//! The oracle: SE forward and backward in plain loops with f64 accumulation.
//!
//! Every other backend is judged against this file, so it stays simple and is never tuned.
//! Inputs of any [`Element`] type are widened to f64 (so the reference sees exactly the rounded
//! values a kernel sees); outputs are f64, unrounded.

use super::{check_activation, SeWeights};
use crate::error::Result;
use crate::se::SeGrads;
use crate::tensor::{Element, Tensor};

/// What the forward pass keeps for backward (all `[n][..]`, row-major, f64).
#[derive(Clone, Debug, PartialEq)]
pub struct SeSaved {
    /// Squeezed means, `[n][channels]`.
    pub z: Vec<f64>,
    /// Hidden pre-activation `W1 z + b1`, `[n][hidden]`.
    pub h: Vec<f64>,
    /// Gate pre-activation `W2 act(h) + b2`, `[n][channels]`.
    pub a: Vec<f64>,
    /// Channel weights `gate(a)`, `[n][channels]`.
    pub s: Vec<f64>,
}

/// The forward pass's results.
#[derive(Clone, Debug, PartialEq)]
pub struct SeForward {
    /// The output, in the input's layout.
    pub y: Vec<f64>,
    /// What backward needs.
    pub saved: SeSaved,
}

/// The backward pass's results.
#[derive(Clone, Debug, PartialEq)]
pub struct SeBackward {
    /// d loss / d x, in the input's layout.
    pub dx: Vec<f64>,
    /// Parameter gradients.
    pub grads: SeGrads<f64>,
    /// d loss / d residual (the epilogue only).
    pub dresidual: Option<Vec<f64>>,
}

/// SE forward. With `residual`, the fused epilogue `y = relu(s * x + residual)`; otherwise
/// `y = s * x`. `residual` must match `x` in shape and layout.
pub fn forward<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
) -> Result<SeForward> {
    check_activation(w, x, residual, None)?;
    let s_ = x.shape();
    let (n_, c_, hw, d_) = (s_.n, s_.c, s_.hw(), w.config.hidden);
    let layout = x.layout();
    let xd = x.data();

    let mut z = vec![0.0; n_ * c_];
    for n in 0..n_ {
        for c in 0..c_ {
            let mut acc = 0.0f64;
            for p in 0..hw {
                acc += xd[s_.offset(layout, n, c, p)].to_f64();
            }
            z[n * c_ + c] = acc / hw as f64;
        }
    }
    let (h, a, s) = excite(w, &z, n_);

    let mut y = vec![0.0; s_.numel()];
    for n in 0..n_ {
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            for p in 0..hw {
                let i = s_.offset(layout, n, c, p);
                let v = sc * xd[i].to_f64();
                y[i] = match residual {
                    Some(r) => (v + r.data()[i].to_f64()).max(0.0),
                    None => v,
                };
            }
        }
    }
    let _ = d_;
    Ok(SeForward {
        y,
        saved: SeSaved { z, h, a, s },
    })
}

/// The excitation on pooled means `z` (`[n][channels]`): returns `(h, a, s)`.
pub fn excite(w: &SeWeights, z: &[f64], n_: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let cfg = w.config;
    let (c_, d_) = (cfg.channels, cfg.hidden);
    let mut h = vec![0.0; n_ * d_];
    let mut a = vec![0.0; n_ * c_];
    let mut s = vec![0.0; n_ * c_];
    for n in 0..n_ {
        for j in 0..d_ {
            let mut acc = w.b1.as_ref().map_or(0.0, |b| b[j] as f64);
            for c in 0..c_ {
                acc += w.w1[j * c_ + c] as f64 * z[n * c_ + c];
            }
            h[n * d_ + j] = acc;
        }
        for c in 0..c_ {
            let mut acc = w.b2.as_ref().map_or(0.0, |b| b[c] as f64);
            for j in 0..d_ {
                acc += w.w2[c * d_ + j] as f64 * cfg.activation.apply(h[n * d_ + j]);
            }
            a[n * c_ + c] = acc;
            s[n * c_ + c] = cfg.gate.apply(acc);
        }
    }
    (h, a, s)
}

/// SE backward, given the forward's inputs, what it saved, and `dy`.
///
/// Returns `dx`, the parameter gradients, and with the epilogue `d residual`
/// (`dy` through the ReLU mask of `s * x + residual`).
pub fn backward<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
    saved: &SeSaved,
    dy: &Tensor<T>,
) -> Result<SeBackward> {
    check_activation(w, x, residual, Some(dy))?;
    let cfg = w.config;
    let sh = x.shape();
    let (n_, c_, hw, d_) = (sh.n, sh.c, sh.hw(), cfg.hidden);
    let layout = x.layout();
    let (xd, dyd) = (x.data(), dy.data());
    let SeSaved { z, h, a, s } = saved;
    super::check_saved_len(n_, c_, d_, z.len(), h.len(), s.len())?;

    // g = dy through the epilogue's ReLU mask; ds = sum_hw g * x.
    let mut g = vec![0.0; sh.numel()];
    let mut ds = vec![0.0; n_ * c_];
    for n in 0..n_ {
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            let mut acc = 0.0;
            for p in 0..hw {
                let i = sh.offset(layout, n, c, p);
                let xv = xd[i].to_f64();
                let gv = match residual {
                    Some(r) if sc * xv + r.data()[i].to_f64() <= 0.0 => 0.0,
                    _ => dyd[i].to_f64(),
                };
                g[i] = gv;
                acc += gv * xv;
            }
            ds[n * c_ + c] = acc;
        }
    }

    let dg: Vec<f64> = (0..n_ * c_)
        .map(|i| ds[i] * cfg.gate.derivative(a[i]))
        .collect();
    let mut dw2 = vec![0.0; c_ * d_];
    let mut db2 = vec![0.0; c_];
    let mut du = vec![0.0; n_ * d_];
    for n in 0..n_ {
        for c in 0..c_ {
            let gnc = dg[n * c_ + c];
            db2[c] += gnc;
            for j in 0..d_ {
                dw2[c * d_ + j] += gnc * cfg.activation.apply(h[n * d_ + j]);
                du[n * d_ + j] += w.w2[c * d_ + j] as f64 * gnc;
            }
        }
        for j in 0..d_ {
            du[n * d_ + j] *= cfg.activation.derivative(h[n * d_ + j]);
        }
    }
    let mut dw1 = vec![0.0; d_ * c_];
    let mut db1 = vec![0.0; d_];
    let mut dz = vec![0.0; n_ * c_];
    for n in 0..n_ {
        for j in 0..d_ {
            let u = du[n * d_ + j];
            db1[j] += u;
            for c in 0..c_ {
                dw1[j * c_ + c] += u * z[n * c_ + c];
                dz[n * c_ + c] += w.w1[j * c_ + c] as f64 * u;
            }
        }
    }

    let mut dx = vec![0.0; sh.numel()];
    for n in 0..n_ {
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            let dzc = dz[n * c_ + c] / hw as f64;
            for p in 0..hw {
                let i = sh.offset(layout, n, c, p);
                dx[i] = g[i] * sc + dzc;
            }
        }
    }
    Ok(SeBackward {
        dx,
        grads: SeGrads {
            dw1,
            db1: cfg.bias.then_some(db1),
            dw2,
            db2: cfg.bias.then_some(db2),
        },
        dresidual: residual.map(|_| g),
    })
}
