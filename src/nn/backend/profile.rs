//! [`Profiled`]: any backend, with the time of each of its ops summed by op kind, so a whole
//! network's step reads as "which layer costs what" (`senet net-bench --profile`).
//!
//! Every op waits for the device before its clock stops ([`Backend::synchronize`]), so a GPU's
//! time lands on the op that spent it; that removes the overlap of host and device work, so the
//! profiled step is slower than an unprofiled one and its total is reported separately.

use super::{
    Backend, BnDeviceSaved, BnParamsMut, BnRun, BnStats, ConvGeom, PoolGeom, SeBackward,
    SeLayerParams, SeLayerParamsMut,
};
use crate::error::Result;
use crate::nn::param::{Param, Real};
use crate::se::{SeConfig, SeWeights};
use crate::tensor::{Shape, Tensor};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One op kind's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op kind (`conv2d 3x3`, `batch_norm_stats`, `se_forward`, ...).
    pub op: String,
    /// Calls.
    pub calls: u64,
    /// Total time, the device's work included.
    pub total: Duration,
}

/// A backend whose ops are timed (see the module docs). Results are those of the inner
/// backend, bit for bit.
#[derive(Debug)]
pub struct Profiled<B> {
    inner: B,
    times: Mutex<BTreeMap<String, (u64, Duration)>>,
}

impl<B> Profiled<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            times: Mutex::new(BTreeMap::new()),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The times so far, longest total first.
    pub fn report(&self) -> Vec<OpTime> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<OpTime> = times
            .iter()
            .map(|(op, &(calls, total))| OpTime {
                op: op.clone(),
                calls,
                total,
            })
            .collect();
        v.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.op.cmp(&b.op)));
        v
    }

    /// Forgets the times so far.
    pub fn reset(&self) {
        self.times.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn record(&self, op: String, dt: Duration) {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let e = times.entry(op).or_insert((0, Duration::ZERO));
        e.0 += 1;
        e.1 += dt;
    }
}

/// The profile key of a convolution: kernel size, and whether it is grouped or depthwise.
fn conv_kind(g: &ConvGeom) -> String {
    let group = if g.groups == 1 {
        ""
    } else if g.groups == g.in_ch {
        " depthwise"
    } else {
        " grouped"
    };
    format!("{}x{}{group}", g.kernel, g.kernel)
}

impl<B> Profiled<B> {
    /// Runs `f`, waits for the device, and adds the time to `op`.
    fn time<E: Real, R>(&self, op: impl Into<String>, f: impl FnOnce(&B) -> Result<R>) -> Result<R>
    where
        B: Backend<E>,
    {
        self.time_if::<E, R>(op, f, |_| true)
    }

    /// [`Profiled::time`], counted only when `ran` says the backend did the work (an op that
    /// declines, for host parameters, leaves the time to the ops the caller runs instead).
    fn time_if<E: Real, R>(
        &self,
        op: impl Into<String>,
        f: impl FnOnce(&B) -> Result<R>,
        ran: impl FnOnce(&R) -> bool,
    ) -> Result<R>
    where
        B: Backend<E>,
    {
        let t0 = Instant::now();
        let r = f(&self.inner)?;
        if ran(&r) {
            self.inner.synchronize()?;
            self.record(op.into(), t0.elapsed());
        }
        Ok(r)
    }
}

/// The profile key of an SE pass (`dir` is `forward` or `backward`), with the fused epilogue
/// told apart.
fn se_kind(dir: &str, residual: bool) -> String {
    if residual {
        format!("se_{dir} (+residual+relu)")
    } else {
        format!("se_{dir}")
    }
}

impl<E: Real, B: Backend<E>> Backend<E> for Profiled<B> {
    type T = B::T;
    type PoolIdx = B::PoolIdx;
    type SeSaved = B::SeSaved;

    fn upload(&self, x: Tensor<E>) -> Result<Self::T> {
        self.time::<E, _>("upload", |b| b.upload(x))
    }

    fn download(&self, x: Self::T) -> Result<Tensor<E>> {
        self.time::<E, _>("download", |b| b.download(x))
    }

    fn download_indices(&self, idx: &Self::PoolIdx) -> Result<Vec<u32>> {
        self.time::<E, _>("download_indices", |b| b.download_indices(idx))
    }

    fn zeros(&self, shape: Shape) -> Result<Self::T> {
        self.time::<E, _>("zeros", |b| b.zeros(shape))
    }

    fn mul_mask(&self, x: Self::T, mask: &[E]) -> Result<Self::T> {
        self.time::<E, _>("dropout mask", |b| b.mul_mask(x, mask))
    }

    fn concat_channels(&self, parts: &[Self::T]) -> Result<Self::T> {
        self.time::<E, _>("concat_channels", |b| b.concat_channels(parts))
    }

    fn split_channels(&self, x: &Self::T, sizes: &[usize]) -> Result<Vec<Self::T>> {
        self.time::<E, _>("split_channels", |b| b.split_channels(x, sizes))
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn precision(&self) -> &'static str {
        self.inner.precision()
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn conv2d(&self, x: &Self::T, w: &[E], bias: Option<&[E]>, g: &ConvGeom) -> Result<Self::T> {
        self.time::<E, _>(format!("conv2d {}", conv_kind(g)), |b| {
            b.conv2d(x, w, bias, g)
        })
    }

    fn conv2d_backward(
        &self,
        x: &Self::T,
        w: &[E],
        dy: &Self::T,
        g: &ConvGeom,
        dw: &mut [E],
        db: Option<&mut [E]>,
        need_dx: bool,
    ) -> Result<Option<Self::T>> {
        self.time::<E, _>(format!("conv2d {} backward", conv_kind(g)), |b| {
            b.conv2d_backward(x, w, dy, g, dw, db, need_dx)
        })
    }

    fn bind(&self, p: &mut Param<E>) -> Result<bool> {
        self.inner.bind(p)
    }

    fn owns(&self, id: u64) -> bool {
        self.inner.owns(id)
    }

    fn conv2d_p(
        &self,
        x: &Self::T,
        w: &Param<E>,
        bias: Option<&Param<E>>,
        g: &ConvGeom,
    ) -> Result<Self::T> {
        self.time::<E, _>(format!("conv2d {}", conv_kind(g)), |b| {
            b.conv2d_p(x, w, bias, g)
        })
    }

    fn conv2d_backward_p(
        &self,
        x: &Self::T,
        w: &mut Param<E>,
        dy: &Self::T,
        g: &ConvGeom,
        bias: Option<&mut Param<E>>,
        need_dx: bool,
    ) -> Result<Option<Self::T>> {
        self.time::<E, _>(format!("conv2d {} backward", conv_kind(g)), |b| {
            b.conv2d_backward_p(x, w, dy, g, bias, need_dx)
        })
    }

    fn linear_p(
        &self,
        x: &Self::T,
        w: &Param<E>,
        bias: Option<&Param<E>>,
        out: usize,
    ) -> Result<Self::T> {
        self.time::<E, _>("linear", |b| b.linear_p(x, w, bias, out))
    }

    fn linear_backward_p(
        &self,
        x: &Self::T,
        w: &mut Param<E>,
        dy: &Self::T,
        bias: Option<&mut Param<E>>,
    ) -> Result<Self::T> {
        self.time::<E, _>("linear backward", |b| b.linear_backward_p(x, w, dy, bias))
    }

    fn unscale_grads(&self, params: &mut [&mut Param<E>], factor: f32) -> Result<bool> {
        self.time::<E, _>("unscale_grads", |b| b.unscale_grads(params, factor))
    }

    fn sgd_step(
        &self,
        p: &mut Param<E>,
        momentum_init: Option<&[f32]>,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    ) -> Result<bool> {
        self.time_if::<E, _>(
            "sgd_step (device)",
            |b| b.sgd_step(p, momentum_init, lr, momentum, weight_decay),
            |done| *done,
        )
    }

    fn batch_norm_p(
        &self,
        x: &Self::T,
        p: BnParamsMut<'_, E>,
        run: BnRun,
    ) -> Result<Option<(Self::T, BnDeviceSaved)>> {
        let op = match (run.train, run.relu) {
            (true, true) => "batch_norm train+relu (device)",
            (true, false) => "batch_norm train (device)",
            (false, true) => "batch_norm eval+relu (device)",
            (false, false) => "batch_norm eval (device)",
        };
        self.time_if::<E, _>(op, |b| b.batch_norm_p(x, p, run), Option::is_some)
    }

    fn batch_norm_backward_p(
        &self,
        x: &Self::T,
        relu_y: Option<&Self::T>,
        dy: Self::T,
        saved: &BnDeviceSaved,
        weight: &mut Param<E>,
        bias: &mut Param<E>,
    ) -> Result<Self::T> {
        let op = if relu_y.is_some() {
            "batch_norm+relu backward (device)"
        } else {
            "batch_norm backward (device)"
        };
        self.time::<E, _>(op, |b| {
            b.batch_norm_backward_p(x, relu_y, dy, saved, weight, bias)
        })
    }

    fn batch_norm_stats(&self, x: &Self::T) -> Result<BnStats> {
        self.time::<E, _>("batch_norm_stats", |b| b.batch_norm_stats(x))
    }

    fn channel_affine(&self, x: Self::T, a: &[E], bias: &[E], relu: bool) -> Result<Self::T> {
        let op = if relu {
            "batch_norm affine+relu"
        } else {
            "batch_norm affine"
        };
        self.time::<E, _>(op, |b| b.channel_affine(x, a, bias, relu))
    }

    fn batch_norm_backward(
        &self,
        x: &Self::T,
        dy: &Self::T,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[E],
        batch_stats: bool,
        dgamma: &mut [E],
        dbeta: &mut [E],
    ) -> Result<Self::T> {
        self.time::<E, _>("batch_norm backward", |b| {
            b.batch_norm_backward(x, dy, mean, invstd, gamma, batch_stats, dgamma, dbeta)
        })
    }

    fn batch_norm_relu_backward(
        &self,
        x: &Self::T,
        y: &Self::T,
        dy: Self::T,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[E],
        batch_stats: bool,
        dgamma: &mut [E],
        dbeta: &mut [E],
    ) -> Result<Self::T> {
        self.time::<E, _>("batch_norm+relu backward", |b| {
            b.batch_norm_relu_backward(x, y, dy, mean, invstd, gamma, batch_stats, dgamma, dbeta)
        })
    }

    fn relu(&self, x: Self::T) -> Result<Self::T> {
        self.time::<E, _>("relu", |b| b.relu(x))
    }

    fn relu_backward(&self, y: &Self::T, dy: Self::T) -> Result<Self::T> {
        self.time::<E, _>("relu backward", |b| b.relu_backward(y, dy))
    }

    fn add(&self, a: Self::T, x: &Self::T, relu: bool) -> Result<Self::T> {
        let op = if relu { "add+relu" } else { "add" };
        self.time::<E, _>(op, |b| b.add(a, x, relu))
    }

    fn max_pool2d(&self, x: &Self::T, g: &PoolGeom) -> Result<(Self::T, Self::PoolIdx)> {
        self.time::<E, _>("max_pool2d", |b| b.max_pool2d(x, g))
    }

    fn max_pool2d_backward(
        &self,
        dy: &Self::T,
        argmax: &Self::PoolIdx,
        input: Shape,
    ) -> Result<Self::T> {
        self.time::<E, _>("max_pool2d backward", |b| {
            b.max_pool2d_backward(dy, argmax, input)
        })
    }

    fn avg_pool2d(&self, x: &Self::T, g: &PoolGeom) -> Result<Self::T> {
        self.time::<E, _>("avg_pool2d", |b| b.avg_pool2d(x, g))
    }

    fn avg_pool2d_backward(&self, dy: &Self::T, g: &PoolGeom, input: Shape) -> Result<Self::T> {
        self.time::<E, _>("avg_pool2d backward", |b| {
            b.avg_pool2d_backward(dy, g, input)
        })
    }

    fn global_avg_pool(&self, x: &Self::T) -> Result<Self::T> {
        self.time::<E, _>("global_avg_pool", |b| b.global_avg_pool(x))
    }

    fn global_avg_pool_backward(&self, dy: &Self::T, input: Shape) -> Result<Self::T> {
        self.time::<E, _>("global_avg_pool backward", |b| {
            b.global_avg_pool_backward(dy, input)
        })
    }

    fn linear(&self, x: &Self::T, w: &[E], bias: Option<&[E]>, out: usize) -> Result<Self::T> {
        self.time::<E, _>("linear", |b| b.linear(x, w, bias, out))
    }

    fn linear_backward(
        &self,
        x: &Self::T,
        w: &[E],
        dy: &Self::T,
        dw: &mut [E],
        db: Option<&mut [E]>,
    ) -> Result<Self::T> {
        self.time::<E, _>("linear backward", |b| b.linear_backward(x, w, dy, dw, db))
    }

    fn recycle(&self, t: Self::T) {
        self.inner.recycle(t)
    }

    fn se_forward(
        &self,
        w: &SeWeights,
        x: &Self::T,
        residual: Option<&Self::T>,
    ) -> Result<(Self::T, Self::SeSaved)> {
        let op = se_kind("forward", residual.is_some());
        self.time::<E, _>(op, |b| b.se_forward(w, x, residual))
    }

    fn se_forward_p(
        &self,
        config: SeConfig,
        p: SeLayerParams<'_, E>,
        x: &Self::T,
        residual: Option<&Self::T>,
    ) -> Result<(Self::T, Self::SeSaved)> {
        let op = se_kind("forward", residual.is_some());
        self.time::<E, _>(op, |b| b.se_forward_p(config, p, x, residual))
    }

    fn se_backward_p(
        &self,
        config: SeConfig,
        p: SeLayerParamsMut<'_, E>,
        x: &Self::T,
        residual: Option<&Self::T>,
        saved: &Self::SeSaved,
        dy: &Self::T,
    ) -> Result<(Self::T, Option<Self::T>)> {
        let op = se_kind("backward", residual.is_some());
        self.time::<E, _>(op, |b| b.se_backward_p(config, p, x, residual, saved, dy))
    }

    fn se_backward(
        &self,
        w: &SeWeights,
        x: &Self::T,
        residual: Option<&Self::T>,
        saved: &Self::SeSaved,
        dy: &Self::T,
    ) -> Result<SeBackward<Self::T>> {
        let op = se_kind("backward", residual.is_some());
        self.time::<E, _>(op, |b| b.se_backward(w, x, residual, saved, dy))
    }
}
