//! The reference backend: plain loops, f64 accumulation, no cleverness. It is the oracle the
//! fast backends are compared with and is never tuned.

use super::{
    check_bn_lens, check_len, nchw, same_shape, tensor, Backend, BnStats, ConvGeom, PoolGeom,
    SeBackward,
};
use crate::error::{Error, Result};
use crate::nn::param::Real;
use crate::se::{reference as se_ref, SeWeights};
use crate::tensor::{Shape, Tensor};

/// The reference backend, for `f32` and `f64` networks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl<E: Real> Backend<E> for Reference {
    type SeSaved = se_ref::SeSaved;

    type T = Tensor<E>;
    type PoolIdx = Vec<u32>;

    fn upload(&self, x: Tensor<E>) -> Result<Tensor<E>> {
        Ok(x)
    }

    fn download(&self, x: Tensor<E>) -> Result<Tensor<E>> {
        Ok(x)
    }

    fn download_indices(&self, idx: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(idx.clone())
    }

    fn zeros(&self, shape: Shape) -> Result<Tensor<E>> {
        Tensor::zeros(shape, crate::tensor::Layout::Nchw)
    }

    fn mul_mask(&self, x: Tensor<E>, mask: &[E]) -> Result<Tensor<E>> {
        super::host_mul_mask(x, mask)
    }

    fn concat_channels(&self, parts: &[Tensor<E>]) -> Result<Tensor<E>> {
        super::host_concat_channels(parts)
    }

    fn split_channels(&self, x: &Tensor<E>, sizes: &[usize]) -> Result<Vec<Tensor<E>>> {
        super::host_split_channels(x, sizes)
    }

    fn name(&self) -> &'static str {
        "reference"
    }

    fn conv2d(&self, x: &Tensor<E>, w: &[E], b: Option<&[E]>, g: &ConvGeom) -> Result<Tensor<E>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        check_len("conv weight", w.len(), g.weight_len())?;
        if let Some(b) = b {
            check_len("conv bias", b.len(), g.out_ch)?;
        }
        let (cig, cog, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
        let xd = x.data();
        let mut y = vec![E::ZERO; ys.numel()];
        for n in 0..ys.n {
            for co in 0..g.out_ch {
                let grp = co / cog;
                for oh in 0..ys.h {
                    for ow in 0..ys.w {
                        let mut acc = b.map_or(0.0, |b| b[co].to_f64());
                        for ci in 0..cig {
                            let c = grp * cig + ci;
                            for kh in 0..k {
                                let Some(ih) = tap(oh, kh, g.stride, g.padding, xs.h) else {
                                    continue;
                                };
                                for kw in 0..k {
                                    let Some(iw) = tap(ow, kw, g.stride, g.padding, xs.w) else {
                                        continue;
                                    };
                                    let xv = xd[((n * xs.c + c) * xs.h + ih) * xs.w + iw];
                                    let wv = w[((co * cig + ci) * k + kh) * k + kw];
                                    acc += xv.to_f64() * wv.to_f64();
                                }
                            }
                        }
                        y[((n * ys.c + co) * ys.h + oh) * ys.w + ow] = E::from_f64(acc);
                    }
                }
            }
        }
        tensor(ys, y)
    }

    fn conv2d_backward(
        &self,
        x: &Tensor<E>,
        w: &[E],
        dy: &Tensor<E>,
        g: &ConvGeom,
        dw: &mut [E],
        db: Option<&mut [E]>,
        need_dx: bool,
    ) -> Result<Option<Tensor<E>>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        same_shape(nchw(dy, "conv gradient")?, ys, "conv gradient vs output")?;
        check_len("conv weight", w.len(), g.weight_len())?;
        check_len("conv weight gradient", dw.len(), g.weight_len())?;
        let (cig, cog, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
        let (xd, dyd) = (x.data(), dy.data());
        if let Some(db) = db {
            check_len("conv bias gradient", db.len(), g.out_ch)?;
            for (co, dbv) in db.iter_mut().enumerate() {
                let mut acc = 0.0;
                for n in 0..ys.n {
                    let base = (n * ys.c + co) * ys.h * ys.w;
                    acc += dyd[base..base + ys.h * ys.w]
                        .iter()
                        .map(|v| v.to_f64())
                        .sum::<f64>();
                }
                *dbv += E::from_f64(acc);
            }
        }
        // dw[co, ci, kh, kw] = sum_{n, oh, ow} dy[n, co, oh, ow] * x[n, c, ih, iw]
        for co in 0..g.out_ch {
            let grp = co / cog;
            for ci in 0..cig {
                let c = grp * cig + ci;
                for kh in 0..k {
                    for kw in 0..k {
                        let mut acc = 0.0;
                        for n in 0..ys.n {
                            for oh in 0..ys.h {
                                let Some(ih) = tap(oh, kh, g.stride, g.padding, xs.h) else {
                                    continue;
                                };
                                for ow in 0..ys.w {
                                    let Some(iw) = tap(ow, kw, g.stride, g.padding, xs.w) else {
                                        continue;
                                    };
                                    acc += dyd[((n * ys.c + co) * ys.h + oh) * ys.w + ow].to_f64()
                                        * xd[((n * xs.c + c) * xs.h + ih) * xs.w + iw].to_f64();
                                }
                            }
                        }
                        dw[((co * cig + ci) * k + kh) * k + kw] += E::from_f64(acc);
                    }
                }
            }
        }
        if !need_dx {
            return Ok(None);
        }
        let mut dx = vec![0.0f64; xs.numel()];
        for n in 0..ys.n {
            for co in 0..g.out_ch {
                let grp = co / cog;
                for oh in 0..ys.h {
                    for ow in 0..ys.w {
                        let d = dyd[((n * ys.c + co) * ys.h + oh) * ys.w + ow].to_f64();
                        for ci in 0..cig {
                            let c = grp * cig + ci;
                            for kh in 0..k {
                                let Some(ih) = tap(oh, kh, g.stride, g.padding, xs.h) else {
                                    continue;
                                };
                                for kw in 0..k {
                                    let Some(iw) = tap(ow, kw, g.stride, g.padding, xs.w) else {
                                        continue;
                                    };
                                    dx[((n * xs.c + c) * xs.h + ih) * xs.w + iw] +=
                                        d * w[((co * cig + ci) * k + kh) * k + kw].to_f64();
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Some(tensor(xs, dx.into_iter().map(E::from_f64).collect())?))
    }

    fn batch_norm_stats(&self, x: &Tensor<E>) -> Result<BnStats> {
        let s = nchw(x, "batch norm input")?;
        let m = (s.n * s.hw()) as f64;
        let mut mean = vec![0.0; s.c];
        let mut var = vec![0.0; s.c];
        for c in 0..s.c {
            let mut acc = 0.0;
            for n in 0..s.n {
                acc += plane(x, s, n, c).iter().map(|v| v.to_f64()).sum::<f64>();
            }
            let mu = acc / m;
            let mut sq = 0.0;
            for n in 0..s.n {
                sq += plane(x, s, n, c)
                    .iter()
                    .map(|v| (v.to_f64() - mu).powi(2))
                    .sum::<f64>();
            }
            mean[c] = mu;
            var[c] = sq / m;
        }
        Ok(BnStats { mean, var })
    }

    fn channel_affine(&self, mut x: Tensor<E>, a: &[E], b: &[E], relu: bool) -> Result<Tensor<E>> {
        let s = nchw(&x, "channel affine input")?;
        check_len("channel scale", a.len(), s.c)?;
        check_len("channel shift", b.len(), s.c)?;
        let hw = s.hw();
        for (i, v) in x.data_mut().iter_mut().enumerate() {
            let c = (i / hw) % s.c;
            let r = a[c].to_f64() * v.to_f64() + b[c].to_f64();
            // NaN passes, as in PyTorch.
            *v = E::from_f64(if relu && r < 0.0 { 0.0 } else { r });
        }
        Ok(x)
    }

    fn batch_norm_backward(
        &self,
        x: &Tensor<E>,
        dy: &Tensor<E>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[E],
        batch_stats: bool,
        dgamma: &mut [E],
        dbeta: &mut [E],
    ) -> Result<Tensor<E>> {
        let s = nchw(x, "batch norm input")?;
        same_shape(nchw(dy, "batch norm gradient")?, s, "batch norm gradient")?;
        check_bn_lens(
            s.c,
            [
                mean.len(),
                invstd.len(),
                gamma.len(),
                dgamma.len(),
                dbeta.len(),
            ],
        )?;
        let m = (s.n * s.hw()) as f64;
        let mut dx = vec![E::ZERO; s.numel()];
        for c in 0..s.c {
            let (mu, is, gm) = (mean[c], invstd[c], gamma[c].to_f64());
            let (mut sum_dy, mut sum_dy_xh) = (0.0, 0.0);
            for n in 0..s.n {
                for (xv, dv) in plane(x, s, n, c).iter().zip(plane(dy, s, n, c)) {
                    let xh = (xv.to_f64() - mu) * is;
                    sum_dy += dv.to_f64();
                    sum_dy_xh += dv.to_f64() * xh;
                }
            }
            dgamma[c] += E::from_f64(sum_dy_xh);
            dbeta[c] += E::from_f64(sum_dy);
            for n in 0..s.n {
                let base = (n * s.c + c) * s.hw();
                for p in 0..s.hw() {
                    let xh = (x.data()[base + p].to_f64() - mu) * is;
                    let d = dy.data()[base + p].to_f64();
                    let v = if batch_stats {
                        gm * is * (d - sum_dy / m - xh * sum_dy_xh / m)
                    } else {
                        gm * is * d
                    };
                    dx[base + p] = E::from_f64(v);
                }
            }
        }
        tensor(s, dx)
    }

    fn relu(&self, mut x: Tensor<E>) -> Result<Tensor<E>> {
        nchw(&x, "relu input")?;
        for v in x.data_mut() {
            // NaN propagates, as in PyTorch.
            if *v < E::ZERO {
                *v = E::ZERO;
            }
        }
        Ok(x)
    }

    fn relu_backward(&self, y: &Tensor<E>, mut dy: Tensor<E>) -> Result<Tensor<E>> {
        same_shape(nchw(&dy, "relu gradient")?, nchw(y, "relu output")?, "relu")?;
        for (d, &v) in dy.data_mut().iter_mut().zip(y.data()) {
            // Only a positive output passes the gradient (not zero, not NaN).
            if v.partial_cmp(&E::ZERO) != Some(std::cmp::Ordering::Greater) {
                *d = E::ZERO;
            }
        }
        Ok(dy)
    }

    fn add(&self, mut a: Tensor<E>, b: &Tensor<E>, relu: bool) -> Result<Tensor<E>> {
        same_shape(nchw(&a, "add lhs")?, nchw(b, "add rhs")?, "residual add")?;
        for (x, &y) in a.data_mut().iter_mut().zip(b.data()) {
            let r = x.to_f64() + y.to_f64();
            *x = E::from_f64(if relu && r < 0.0 { 0.0 } else { r });
        }
        Ok(a)
    }

    fn max_pool2d(&self, x: &Tensor<E>, g: &PoolGeom) -> Result<(Tensor<E>, Vec<u32>)> {
        let xs = nchw(x, "max pool input")?;
        let ys = g.output_shape(xs)?;
        index_fits(xs)?;
        let mut y = vec![E::ZERO; ys.numel()];
        let mut arg = vec![0u32; ys.numel()];
        for nc in 0..xs.n * xs.c {
            for oh in 0..ys.h {
                let (h0, h1, _) = g.window(oh, xs.h);
                for ow in 0..ys.w {
                    let (w0, w1, _) = g.window(ow, xs.w);
                    let mut best: Option<(E, usize)> = None;
                    for ih in h0..h1 {
                        for iw in w0..w1 {
                            let i = (nc * xs.h + ih) * xs.w + iw;
                            let v = x.data()[i];
                            // PyTorch: the first maximum wins; NaN propagates.
                            if best.is_none_or(|(b, _)| v > b || v.to_f64().is_nan()) {
                                best = Some((v, i));
                            }
                        }
                    }
                    let (v, i) = best.ok_or_else(|| {
                        Error::Shape(format!("max pool window outside input {xs}"))
                    })?;
                    let o = (nc * ys.h + oh) * ys.w + ow;
                    y[o] = v;
                    arg[o] = i as u32;
                }
            }
        }
        Ok((tensor(ys, y)?, arg))
    }

    fn max_pool2d_backward(
        &self,
        dy: &Tensor<E>,
        argmax: &Vec<u32>,
        input: Shape,
    ) -> Result<Tensor<E>> {
        let ys = nchw(dy, "max pool gradient")?;
        check_len("max pool indices", argmax.len(), ys.numel())?;
        let mut dx = vec![0.0f64; input.numel()];
        for (&i, d) in argmax.iter().zip(dy.data()) {
            let slot = dx
                .get_mut(i as usize)
                .ok_or_else(|| Error::Shape(format!("max pool index {i} outside input {input}")))?;
            *slot += d.to_f64();
        }
        tensor(input, dx.into_iter().map(E::from_f64).collect())
    }

    fn avg_pool2d(&self, x: &Tensor<E>, g: &PoolGeom) -> Result<Tensor<E>> {
        let xs = nchw(x, "avg pool input")?;
        let ys = g.output_shape(xs)?;
        let mut y = vec![E::ZERO; ys.numel()];
        for nc in 0..xs.n * xs.c {
            for oh in 0..ys.h {
                let (h0, h1, eh) = g.window(oh, xs.h);
                for ow in 0..ys.w {
                    let (w0, w1, ew) = g.window(ow, xs.w);
                    let mut acc = 0.0;
                    for ih in h0..h1 {
                        for iw in w0..w1 {
                            acc += x.data()[(nc * xs.h + ih) * xs.w + iw].to_f64();
                        }
                    }
                    let div = avg_divisor(g, h0, h1, w0, w1, eh, ew)?;
                    y[(nc * ys.h + oh) * ys.w + ow] = E::from_f64(acc / div);
                }
            }
        }
        tensor(ys, y)
    }

    fn avg_pool2d_backward(&self, dy: &Tensor<E>, g: &PoolGeom, input: Shape) -> Result<Tensor<E>> {
        let ys = nchw(dy, "avg pool gradient")?;
        same_shape(ys, g.output_shape(input)?, "avg pool gradient vs output")?;
        let mut dx = vec![0.0f64; input.numel()];
        for nc in 0..input.n * input.c {
            for oh in 0..ys.h {
                let (h0, h1, eh) = g.window(oh, input.h);
                for ow in 0..ys.w {
                    let (w0, w1, ew) = g.window(ow, input.w);
                    let div = avg_divisor(g, h0, h1, w0, w1, eh, ew)?;
                    let d = dy.data()[(nc * ys.h + oh) * ys.w + ow].to_f64() / div;
                    for ih in h0..h1 {
                        for iw in w0..w1 {
                            dx[(nc * input.h + ih) * input.w + iw] += d;
                        }
                    }
                }
            }
        }
        tensor(input, dx.into_iter().map(E::from_f64).collect())
    }

    fn global_avg_pool(&self, x: &Tensor<E>) -> Result<Tensor<E>> {
        let s = nchw(x, "global pool input")?;
        let y = (0..s.n * s.c)
            .map(|nc| {
                let p = &x.data()[nc * s.hw()..(nc + 1) * s.hw()];
                E::from_f64(p.iter().map(|v| v.to_f64()).sum::<f64>() / s.hw() as f64)
            })
            .collect();
        tensor(Shape::new(s.n, s.c, 1, 1), y)
    }

    fn global_avg_pool_backward(&self, dy: &Tensor<E>, input: Shape) -> Result<Tensor<E>> {
        same_shape(
            nchw(dy, "global pool gradient")?,
            Shape::new(input.n, input.c, 1, 1),
            "global pool gradient",
        )?;
        let hw = input.hw();
        let dx = (0..input.numel())
            .map(|i| E::from_f64(dy.data()[i / hw].to_f64() / hw as f64))
            .collect();
        tensor(input, dx)
    }

    fn linear(&self, x: &Tensor<E>, w: &[E], b: Option<&[E]>, out: usize) -> Result<Tensor<E>> {
        let s = nchw(x, "linear input")?;
        let k = s.sample_numel();
        check_len("linear weight", w.len(), out * k)?;
        if let Some(b) = b {
            check_len("linear bias", b.len(), out)?;
        }
        let mut y = vec![E::ZERO; s.n * out];
        for n in 0..s.n {
            let xr = &x.data()[n * k..(n + 1) * k];
            for o in 0..out {
                let mut acc = b.map_or(0.0, |b| b[o].to_f64());
                for (xv, wv) in xr.iter().zip(&w[o * k..(o + 1) * k]) {
                    acc += xv.to_f64() * wv.to_f64();
                }
                y[n * out + o] = E::from_f64(acc);
            }
        }
        tensor(Shape::try_new(s.n, out, 1, 1)?, y)
    }

    fn linear_backward(
        &self,
        x: &Tensor<E>,
        w: &[E],
        dy: &Tensor<E>,
        dw: &mut [E],
        db: Option<&mut [E]>,
    ) -> Result<Tensor<E>> {
        let s = nchw(x, "linear input")?;
        let ds = nchw(dy, "linear gradient")?;
        let (k, out) = (s.sample_numel(), ds.c);
        same_shape(ds, Shape::new(s.n, out, 1, 1), "linear gradient")?;
        check_len("linear weight", w.len(), out * k)?;
        check_len("linear weight gradient", dw.len(), out * k)?;
        let (xd, dyd) = (x.data(), dy.data());
        if let Some(db) = db {
            check_len("linear bias gradient", db.len(), out)?;
            for (o, d) in db.iter_mut().enumerate() {
                *d += E::from_f64((0..s.n).map(|n| dyd[n * out + o].to_f64()).sum());
            }
        }
        for o in 0..out {
            for j in 0..k {
                let acc: f64 = (0..s.n)
                    .map(|n| dyd[n * out + o].to_f64() * xd[n * k + j].to_f64())
                    .sum();
                dw[o * k + j] += E::from_f64(acc);
            }
        }
        let mut dx = vec![E::ZERO; s.numel()];
        for n in 0..s.n {
            for j in 0..k {
                let acc: f64 = (0..out)
                    .map(|o| dyd[n * out + o].to_f64() * w[o * k + j].to_f64())
                    .sum();
                dx[n * k + j] = E::from_f64(acc);
            }
        }
        tensor(s, dx)
    }

    fn se_forward(
        &self,
        w: &SeWeights,
        x: &Tensor<E>,
        residual: Option<&Tensor<E>>,
    ) -> Result<(Tensor<E>, Self::SeSaved)> {
        let s = nchw(x, "SE input")?;
        let f = se_ref::forward(w, x, residual)?;
        Ok((
            tensor(s, f.y.into_iter().map(E::from_f64).collect())?,
            f.saved,
        ))
    }

    fn se_backward(
        &self,
        w: &SeWeights,
        x: &Tensor<E>,
        residual: Option<&Tensor<E>>,
        saved: &Self::SeSaved,
        dy: &Tensor<E>,
    ) -> Result<SeBackward<Tensor<E>>> {
        let s = nchw(x, "SE input")?;
        let b = se_ref::backward(w, x, residual, saved, dy)?;
        let cast = |v: Vec<f64>| tensor(s, v.into_iter().map(E::from_f64).collect());
        Ok(SeBackward {
            dx: cast(b.dx)?,
            grads: b.grads,
            dresidual: b.dresidual.map(cast).transpose()?,
        })
    }
}

/// The input index of output `o`, kernel tap `k`, or `None` in the padding.
#[inline(always)]
fn tap(o: usize, k: usize, stride: usize, pad: usize, size: usize) -> Option<usize> {
    let i = (o * stride + k).checked_sub(pad)?;
    (i < size).then_some(i)
}

/// One `(n, c)` plane.
fn plane<E: Real>(x: &Tensor<E>, s: Shape, n: usize, c: usize) -> &[E] {
    let base = (n * s.c + c) * s.hw();
    &x.data()[base..base + s.hw()]
}

/// The average pool's divisor for a window.
fn avg_divisor(
    g: &PoolGeom,
    h0: usize,
    h1: usize,
    w0: usize,
    w1: usize,
    eh: usize,
    ew: usize,
) -> Result<f64> {
    let d = if g.count_include_pad {
        eh * ew
    } else {
        (h1 - h0) * (w1 - w0)
    };
    if d == 0 {
        return Err(Error::Shape("average pool window is empty".into()));
    }
    Ok(d as f64)
}

/// Max pooling records indices as u32.
pub(crate) fn index_fits(s: Shape) -> Result<()> {
    if s.numel() > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "max pool input {s} has more than 2^32 elements"
        )));
    }
    Ok(())
}
