//! Central-difference gradients of the reference, to check its backward pass.
//!
//! The loss is `sum(y * probe)`, so its gradient with respect to `y` is `probe`. Inputs are f64
//! and perturbed by 1e-6; weights are stored as f32, so each weight is perturbed by about
//! 2^-12 and the perturbation actually stored is used in the quotient. Differences are only
//! right away from the kinks of ReLU and the hard sigmoid: [`clear_of_kinks`] says whether a
//! case is.

use super::reference::forward;
use super::{SeGrads, SeWeights};
use crate::error::Result;
use crate::tensor::Tensor;

/// Finite-difference gradients, shaped like the reference backward's outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct FdGradients {
    /// d loss / d x.
    pub dx: Vec<f64>,
    /// Parameter gradients.
    pub grads: SeGrads<f64>,
    /// d loss / d residual (with the epilogue).
    pub dresidual: Option<Vec<f64>>,
}

fn loss(w: &SeWeights, x: &Tensor<f64>, r: Option<&Tensor<f64>>, probe: &[f64]) -> Result<f64> {
    Ok(forward(w, x, r)?
        .y
        .iter()
        .zip(probe)
        .map(|(a, b)| a * b)
        .sum())
}

#[derive(Clone, Copy)]
enum Param {
    W1,
    B1,
    W2,
    B2,
}

fn slot(w: &mut SeWeights, p: Param) -> Option<&mut Vec<f32>> {
    match p {
        Param::W1 => Some(&mut w.w1),
        Param::B1 => w.b1.as_mut(),
        Param::W2 => Some(&mut w.w2),
        Param::B2 => w.b2.as_mut(),
    }
}

fn fd_param(
    w: &SeWeights,
    x: &Tensor<f64>,
    r: Option<&Tensor<f64>>,
    probe: &[f64],
    p: Param,
) -> Result<Option<Vec<f64>>> {
    let len = match slot(&mut w.clone(), p) {
        Some(v) => v.len(),
        None => return Ok(None),
    };
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let mut l = [0.0; 2];
        let mut v = [0.0; 2];
        for (k, sign) in [1.0f32, -1.0].into_iter().enumerate() {
            let mut wp = w.clone();
            let e = &mut slot(&mut wp, p).expect("present")[i];
            *e += sign * 2f32.powi(-12);
            v[k] = *e as f64;
            l[k] = loss(&wp, x, r, probe)?;
        }
        out.push((l[0] - l[1]) / (v[0] - v[1]));
    }
    Ok(Some(out))
}

fn fd_tensor(
    w: &SeWeights,
    x: &Tensor<f64>,
    r: Option<&Tensor<f64>>,
    probe: &[f64],
    residual: bool,
) -> Result<Vec<f64>> {
    let eps = 1e-6;
    let mut out = Vec::with_capacity(x.data().len());
    for i in 0..x.data().len() {
        let mut l = [0.0; 2];
        for (k, sign) in [1.0, -1.0].into_iter().enumerate() {
            let (mut xp, mut rp) = (x.clone(), r.cloned());
            match (residual, rp.as_mut()) {
                (true, Some(rt)) => rt.data_mut()[i] += sign * eps,
                _ => xp.data_mut()[i] += sign * eps,
            }
            l[k] = loss(w, &xp, rp.as_ref(), probe)?;
        }
        out.push((l[0] - l[1]) / (2.0 * eps));
    }
    Ok(out)
}

/// Central-difference gradients of `sum(forward(w, x, residual).y * probe)` with respect to x,
/// every parameter, and the residual. Costs two forward passes per element: tiny shapes only.
pub fn finite_differences(
    w: &SeWeights,
    x: &Tensor<f64>,
    residual: Option<&Tensor<f64>>,
    probe: &Tensor<f64>,
) -> Result<FdGradients> {
    super::check_activation(w, x, residual, Some(probe))?;
    let p = probe.data();
    Ok(FdGradients {
        dx: fd_tensor(w, x, residual, p, false)?,
        grads: SeGrads {
            dw1: fd_param(w, x, residual, p, Param::W1)?.unwrap_or_default(),
            db1: fd_param(w, x, residual, p, Param::B1)?,
            dw2: fd_param(w, x, residual, p, Param::W2)?.unwrap_or_default(),
            db2: fd_param(w, x, residual, p, Param::B2)?,
        },
        dresidual: residual
            .map(|_| fd_tensor(w, x, residual, p, true))
            .transpose()?,
    })
}

/// Whether central differences can be trusted on `(w, x, residual)`: every value that meets a
/// kink (a hidden pre-activation h at the ReLU's 0, a gate input a at the hard sigmoid's -3 and
/// 3, the epilogue's `s x + r` at its ReLU's 0) lies further from it than four times what
/// [`finite_differences`]'s perturbations can move it (a weight by 2^-12, an input by 1e-6).
/// Differences across a kink mix both sides' slopes, and are wrong where the backward is
/// right: draw another case when this is false.
pub fn clear_of_kinks(
    w: &SeWeights,
    x: &Tensor<f64>,
    residual: Option<&Tensor<f64>>,
) -> Result<bool> {
    use super::Gate;
    let (hk, ak) = super::check::kinks(w);
    let near = |v: f64, ks: &[f64], step: f64| ks.iter().any(|k| (v - k).abs() <= 4.0 * step);
    let saved = forward(w, x, residual)?.saved;
    let cfg = w.config;
    let sh = x.shape();
    let (c, d, hw) = (sh.c, cfg.hidden, sh.hw());
    let (wstep, xstep) = (2f64.powi(-12), 1e-6);
    let max_abs = |v: &[f32]| v.iter().fold(0.0f64, |m, &a| m.max((a as f64).abs()));
    let (w1max, w2max) = (max_abs(&w.w1), max_abs(&w.w2));
    let gate_slope = match cfg.gate {
        Gate::Sigmoid => 0.25,
        Gate::HardSigmoid => 1.0 / 6.0,
    };
    for n in 0..sh.n {
        let z = &saved.z[n * c..(n + 1) * c];
        let h = &saved.h[n * d..(n + 1) * d];
        let a = &saved.a[n * c..(n + 1) * c];
        let zmax = z.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let umax = h
            .iter()
            .fold(1.0f64, |m, &v| m.max(cfg.activation.apply(v).abs()));
        // One weight or one input moves at a time: h by a W1 / b1 step times z, or by W1 times
        // an x step; a by a W2 / b2 step times u, or by W2 times the move of one u (|act'| <= 1.1).
        let dh = wstep * zmax + w1max * xstep;
        let da = wstep * umax + w2max * 1.1 * dh;
        if h.iter().any(|&v| near(v, hk, dh)) || a.iter().any(|&v| near(v, ak, da)) {
            return Ok(false);
        }
        if let Some(r) = residual {
            for cc in 0..c {
                let s = saved.s[n * c + cc];
                for p in 0..hw {
                    let i = sh.offset(x.layout(), n, cc, p);
                    let xv = x.data()[i];
                    let t = s * xv + r.data()[i];
                    let dt = xv.abs() * gate_slope * da + (s.abs() + 1.0) * xstep;
                    if near(t, &[0.0], dt) {
                        return Ok(false);
                    }
                }
            }
        }
    }
    Ok(true)
}
