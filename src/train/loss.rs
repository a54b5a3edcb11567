//! Softmax cross-entropy with label smoothing, and top-k accuracy.
//!
//! With `K` classes and smoothing `eps`, the target of a sample labelled `y` is
//! `q_j = (1 - eps) [j == y] + eps / K` (Szegedy et al.'s label-smoothing regularisation, which
//! the paper's SENet-154 used). The loss of logits `z` is
//! `-sum_j q_j log softmax(z)_j = logsumexp(z) - sum_j q_j z_j`, averaged over the batch, and
//! its gradient is `(softmax(z) - q) / N`. Accumulation is in f64.

use crate::error::{Error, Result};
use crate::tensor::{Layout, Tensor};

/// The loss and its gradient for a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// Mean loss over the batch.
    pub loss: f64,
    /// `d loss / d logits`, shaped like the logits.
    pub grad: Tensor<f32>,
}

fn rows<'a>(logits: &'a Tensor<f32>, labels: &[usize]) -> Result<(usize, &'a [f32])> {
    let s = logits.shape();
    if logits.layout() != Layout::Nchw || s.h != 1 || s.w != 1 {
        return Err(Error::Shape(format!(
            "logits must be [n, classes, 1, 1] NCHW, got {s} {}",
            logits.layout()
        )));
    }
    if labels.len() != s.n {
        return Err(Error::Length {
            what: "labels",
            got: labels.len(),
            expected: s.n,
        });
    }
    if let Some(&l) = labels.iter().find(|&&l| l >= s.c) {
        return Err(Error::Config(format!(
            "label {l} is not below the {} classes of the logits",
            s.c
        )));
    }
    Ok((s.c, logits.data()))
}

/// Mean label-smoothed cross-entropy of `logits` (`[n, classes, 1, 1]`) against `labels`, and
/// its gradient; `smoothing` in `[0, 1)` (0: plain cross-entropy).
pub fn cross_entropy(logits: &Tensor<f32>, labels: &[usize], smoothing: f64) -> Result<LossOutput> {
    if !(0.0..1.0).contains(&smoothing) {
        return Err(Error::Config(format!(
            "label smoothing {smoothing} is not in [0, 1)"
        )));
    }
    let (k, data) = rows(logits, labels)?;
    let n = labels.len();
    let mut grad = vec![0f32; data.len()];
    let mut total = 0.0;
    let off = smoothing / k as f64;
    for (i, &y) in labels.iter().enumerate() {
        let row = &data[i * k..(i + 1) * k];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let mut target_dot = 0.0;
        for (j, (&z, g)) in row.iter().zip(&mut grad[i * k..(i + 1) * k]).enumerate() {
            let q = off + if j == y { 1.0 - smoothing } else { 0.0 };
            target_dot += q * z as f64;
            let p = (z as f64 - lse).exp();
            *g = ((p - q) / n as f64) as f32;
        }
        total += lse - target_dot;
    }
    Ok(LossOutput {
        loss: total / n as f64,
        grad: Tensor::from_vec(logits.shape(), Layout::Nchw, grad)?,
    })
}

/// How many samples have their label among the `k` largest logits (ties broken toward the
/// lower class index, so a constant row counts as a hit only for labels below `k`).
pub fn topk_correct(logits: &Tensor<f32>, labels: &[usize], k: usize) -> Result<usize> {
    let (c, data) = rows(logits, labels)?;
    Ok(labels
        .iter()
        .enumerate()
        .filter(|&(i, &y)| {
            let row = &data[i * c..(i + 1) * c];
            let v = row[y];
            // Rank of y: classes that beat it (greater, or equal with a lower index).
            let better = row
                .iter()
                .enumerate()
                .filter(|&(j, &z)| z > v || (z == v && j < y) || z.is_nan())
                .count();
            !v.is_nan() && better < k
        })
        .count())
}
