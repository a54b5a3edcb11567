//! The fast CPU backend (`f32`): convolutions as im2col + GEMM (the `gemm` crate), every op
//! multi-threaded with rayon.
//!
//! The SE op goes through one adapter (`se_op_forward` / `se_op_backward` below) into the fast
//! CPU SE op, `crate::se::cpu`.
//!
//! Work is split one of two ways: with at least as many independent GEMMs (samples x groups)
//! as threads, each thread takes whole GEMMs and runs them single-threaded; otherwise (batch 1,
//! dense convolutions) the GEMM itself is parallel.

use super::{
    check_bn_lens, check_len, nchw, reference::index_fits, same_shape, tensor, Backend, BnStats,
    ConvGeom, PoolGeom, SeBackward,
};
use crate::error::{Error, Result};
use crate::linalg::sgemm;
use crate::se::{cpu as se_cpu, SeGrads, SeWeights};
use crate::tensor::{Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Mutex;

/// The fast CPU backend, for `f32` networks. Uses rayon's global thread pool (set its size with
/// `RAYON_NUM_THREADS`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// What the SE op keeps between forward and backward on this backend.
pub type CpuSeSaved = se_cpu::CpuSaved;

// The SE op adapter: the fast CPU SE op, with its f32 gradients widened for the network.

/// SE forward for the CPU backend.
fn se_op_forward(
    w: &SeWeights,
    x: &Tensor<f32>,
    residual: Option<&Tensor<f32>>,
) -> Result<(Vec<f32>, CpuSeSaved)> {
    let f = se_cpu::forward(w, x, residual)?;
    Ok((f.y.into_vec(), f.saved))
}

/// SE backward for the CPU backend: `(dx, grads, dresidual)`.
#[allow(clippy::type_complexity)]
fn se_op_backward(
    w: &SeWeights,
    x: &Tensor<f32>,
    residual: Option<&Tensor<f32>>,
    saved: &CpuSeSaved,
    dy: &Tensor<f32>,
) -> Result<(Vec<f32>, SeGrads<f64>, Option<Vec<f32>>)> {
    let b = se_cpu::backward(w, x, residual, saved, dy)?;
    Ok((
        b.dx.into_vec(),
        crate::se::check::widen_grads(&b.grads),
        b.dresidual.map(Tensor::into_vec),
    ))
}

/// Fills one im2col row (input channel plane `x`, kernel tap `(kh, kw)`) of `ho * wo` columns.
#[allow(clippy::too_many_arguments)]
fn im2col_row(
    x: &[f32],
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    g: &ConvGeom,
    ho: usize,
    wo: usize,
    out: &mut [f32],
) {
    let (s, p) = (g.stride, g.padding);
    let (lo, hi) = valid_range(w, kw, s, p, wo);
    for oh in 0..ho {
        let dst = &mut out[oh * wo..(oh + 1) * wo];
        let ih = (oh * s + kh).wrapping_sub(p);
        if ih >= h {
            dst.fill(0.0);
            continue;
        }
        let src = &x[ih * w..(ih + 1) * w];
        dst[..lo].fill(0.0);
        dst[hi..].fill(0.0);
        if lo < hi {
            let i0 = lo * s + kw - p;
            if s == 1 {
                dst[lo..hi].copy_from_slice(&src[i0..i0 + (hi - lo)]);
            } else {
                for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                    *d = src[i0 + j * s];
                }
            }
        }
    }
}

/// Adds one column-matrix row back into an input plane (the adjoint of [`im2col_row`]).
#[allow(clippy::too_many_arguments)]
fn col2im_row(
    col: &[f32],
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    g: &ConvGeom,
    ho: usize,
    wo: usize,
    x: &mut [f32],
) {
    let (s, p) = (g.stride, g.padding);
    let (lo, hi) = valid_range(w, kw, s, p, wo);
    if lo >= hi {
        return;
    }
    for oh in 0..ho {
        let ih = (oh * s + kh).wrapping_sub(p);
        if ih >= h {
            continue;
        }
        let src = &col[oh * wo..(oh + 1) * wo];
        let dst = &mut x[ih * w..(ih + 1) * w];
        let i0 = lo * s + kw - p;
        if s == 1 {
            for (d, &v) in dst[i0..i0 + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                *d += v;
            }
        } else {
            for (j, &v) in src[lo..hi].iter().enumerate() {
                dst[i0 + j * s] += v;
            }
        }
    }
}

/// The output columns `[lo, hi)` whose input column `ow * s + kw - p` lies inside `[0, w)`.
fn valid_range(w: usize, kw: usize, s: usize, p: usize, wo: usize) -> (usize, usize) {
    let lo = if p > kw { (p - kw).div_ceil(s) } else { 0 };
    let hi = if w + p > kw {
        (w + p - kw).div_ceil(s)
    } else {
        0
    };
    (lo.min(wo), hi.min(wo))
}

/// True when the convolution reads its input directly as the column matrix.
fn is_pointwise(g: &ConvGeom) -> bool {
    g.kernel == 1 && g.stride == 1 && g.padding == 0
}

/// Builds the column matrix of one sample and group (`[cig * k * k][ho * wo]`).
#[allow(clippy::too_many_arguments)]
fn im2col(
    xs: Shape,
    xn: &[f32],
    grp: usize,
    g: &ConvGeom,
    ho: usize,
    wo: usize,
    col: &mut [f32],
    parallel: bool,
) {
    let (k, cig, hw) = (g.kernel, g.in_per_group(), xs.hw());
    let row = |(r, out): (usize, &mut [f32])| {
        let ci = r / (k * k);
        let (kh, kw) = ((r / k) % k, r % k);
        let c = grp * cig + ci;
        im2col_row(
            &xn[c * hw..(c + 1) * hw],
            xs.h,
            xs.w,
            kh,
            kw,
            g,
            ho,
            wo,
            out,
        );
    };
    if parallel {
        col.par_chunks_mut(ho * wo).enumerate().for_each(row);
    } else {
        col.chunks_mut(ho * wo).enumerate().for_each(row);
    }
}

/// Adds the column-matrix gradient of one sample and group back into `dxn`.
#[allow(clippy::too_many_arguments)]
fn col2im(
    xs: Shape,
    dxn: &mut [f32],
    grp: usize,
    g: &ConvGeom,
    ho: usize,
    wo: usize,
    col: &[f32],
    parallel: bool,
) {
    let (k, cig, hw) = (g.kernel, g.in_per_group(), xs.hw());
    let planes = &mut dxn[grp * cig * hw..(grp + 1) * cig * hw];
    let plane = |(ci, dst): (usize, &mut [f32])| {
        for kh in 0..k {
            for kw in 0..k {
                let r = (ci * k + kh) * k + kw;
                col2im_row(
                    &col[r * ho * wo..(r + 1) * ho * wo],
                    xs.h,
                    xs.w,
                    kh,
                    kw,
                    g,
                    ho,
                    wo,
                    dst,
                );
            }
        }
    };
    if parallel {
        planes.par_chunks_mut(hw).enumerate().for_each(plane);
    } else {
        planes.chunks_mut(hw).enumerate().for_each(plane);
    }
}

/// Activation buffers handed back through [`Backend::recycle`], reused by later ops so large
/// outputs are not freshly mapped (and page-faulted in) for every layer.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// At most this many buffers wait in the pool.
const POOL_BUFFERS: usize = 16;

/// A zeroed buffer of `n` elements, from the pool when a large enough one is there.
fn zeroed(n: usize) -> Vec<f32> {
    let mut v = pooled(n);
    v.clear();
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` elements with unspecified (but initialised) contents: stale values from
/// the pool, or zeros. Only for outputs the caller then overwrites entirely.
fn overwritten(n: usize) -> Vec<f32> {
    let mut v = pooled(n);
    v.resize(n, 0.0);
    v.truncate(n);
    v
}

/// The smallest pooled buffer with room for `n` elements, or a new empty one.
fn pooled(n: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        // The smallest buffer that fits, so big ones stay for big requests.
        let i = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n)
            .min_by_key(|(_, b)| b.capacity())?
            .0;
        Some(pool.swap_remove(i))
    });
    reused.unwrap_or_default()
}

thread_local! {
    /// Per-thread scratch for column matrices, reused across calls so the large im2col
    /// buffers are not reallocated (and page-faulted in) for every convolution.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch buffers (taken out for the call, so a nested
/// call on the same thread sees fresh, empty ones rather than a borrow conflict).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let (mut a, mut b) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut a, &mut b);
    SCRATCH.with(|s| *s.borrow_mut() = (a, b));
    r
}

/// True when there are enough independent GEMMs to give each thread whole ones.
fn split_items(items: usize) -> bool {
    items >= rayon::current_num_threads().max(2)
}

impl Backend<f32> for Cpu {
    type SeSaved = CpuSeSaved;

    type T = Tensor<f32>;
    type PoolIdx = Vec<u32>;

    fn upload(&self, x: Tensor<f32>) -> Result<Tensor<f32>> {
        Ok(x)
    }

    fn download(&self, x: Tensor<f32>) -> Result<Tensor<f32>> {
        Ok(x)
    }

    fn download_indices(&self, idx: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(idx.clone())
    }

    fn zeros(&self, shape: Shape) -> Result<Tensor<f32>> {
        Tensor::zeros(shape, crate::tensor::Layout::Nchw)
    }

    fn mul_mask(&self, x: Tensor<f32>, mask: &[f32]) -> Result<Tensor<f32>> {
        super::host_mul_mask(x, mask)
    }

    fn concat_channels(&self, parts: &[Tensor<f32>]) -> Result<Tensor<f32>> {
        super::host_concat_channels(parts)
    }

    fn split_channels(&self, x: &Tensor<f32>, sizes: &[usize]) -> Result<Vec<Tensor<f32>>> {
        super::host_split_channels(x, sizes)
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn conv2d(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        g: &ConvGeom,
    ) -> Result<Tensor<f32>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        check_len("conv weight", w.len(), g.weight_len())?;
        if let Some(b) = b {
            check_len("conv bias", b.len(), g.out_ch)?;
        }
        let (cig, cog, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
        let (ho, wo, howo) = (ys.h, ys.w, ys.hw());
        let kk = cig * k * k;
        let mut y = overwritten(ys.numel());
        let items = ys.n * g.groups;
        let split = split_items(items);
        let run = |item: usize, yg: &mut [f32], col: &mut Vec<f32>, par: bool| {
            let (n, grp) = (item / g.groups, item % g.groups);
            let xn = &x.data()[n * xs.sample_numel()..(n + 1) * xs.sample_numel()];
            let wg = &w[grp * cog * kk..(grp + 1) * cog * kk];
            let colm: &[f32] = if is_pointwise(g) {
                &xn[grp * cig * howo..(grp + 1) * cig * howo]
            } else {
                col.resize(kk * howo, 0.0);
                im2col(xs, xn, grp, g, ho, wo, col, par);
                col
            };
            let gp = if par {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            };
            sgemm(
                cog,
                howo,
                kk,
                yg,
                (wg, kk as isize, 1),
                (colm, howo as isize, 1),
                false,
                gp,
            );
            if let Some(b) = b {
                for (o, row) in yg.chunks_mut(howo).enumerate() {
                    let bv = b[grp * cog + o];
                    row.iter_mut().for_each(|v| *v += bv);
                }
            }
        };
        if split {
            y.par_chunks_mut(cog * howo)
                .enumerate()
                .for_each(|(item, yg)| with_scratch(|col, _| run(item, yg, col, false)));
        } else {
            with_scratch(|col, _| {
                for (item, yg) in y.chunks_mut(cog * howo).enumerate() {
                    run(item, yg, col, true);
                }
            });
        }
        tensor(ys, y)
    }

    fn conv2d_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        g: &ConvGeom,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        need_dx: bool,
    ) -> Result<Option<Tensor<f32>>> {
        let xs = nchw(x, "conv input")?;
        let ys = g.output_shape(xs)?;
        same_shape(nchw(dy, "conv gradient")?, ys, "conv gradient vs output")?;
        check_len("conv weight", w.len(), g.weight_len())?;
        check_len("conv weight gradient", dw.len(), g.weight_len())?;
        let (cig, cog, k) = (g.in_per_group(), g.out_per_group(), g.kernel);
        let (ho, wo, howo) = (ys.h, ys.w, ys.hw());
        let kk = cig * k * k;
        let wlen = g.weight_len();
        if let Some(db) = db {
            check_len("conv bias gradient", db.len(), g.out_ch)?;
            let sums: Vec<f64> = (0..g.out_ch)
                .into_par_iter()
                .map(|co| {
                    (0..ys.n)
                        .map(|n| {
                            let base = (n * ys.c + co) * howo;
                            dy.data()[base..base + howo]
                                .iter()
                                .map(|&v| v as f64)
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            db.iter_mut().zip(sums).for_each(|(d, s)| *d += s as f32);
        }
        let mut dx = if need_dx {
            zeroed(xs.numel())
        } else {
            Vec::new()
        };
        // One sample: accumulates its weight gradient into `dwacc` and writes its input
        // gradient into `dxn` (empty when not needed).
        let sample = |n: usize,
                      dwacc: &mut [f32],
                      dxn: &mut [f32],
                      col: &mut Vec<f32>,
                      dcol: &mut Vec<f32>,
                      par: bool| {
            let xn = &x.data()[n * xs.sample_numel()..(n + 1) * xs.sample_numel()];
            let dyn_ = &dy.data()[n * ys.sample_numel()..(n + 1) * ys.sample_numel()];
            let gp = if par {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            };
            for grp in 0..g.groups {
                let dyg = &dyn_[grp * cog * howo..(grp + 1) * cog * howo];
                let colm: &[f32] = if is_pointwise(g) {
                    &xn[grp * cig * howo..(grp + 1) * cig * howo]
                } else {
                    col.resize(kk * howo, 0.0);
                    im2col(xs, xn, grp, g, ho, wo, col, par);
                    col
                };
                // dW_g += dY_g (cog x howo) * col^T (howo x kk)
                sgemm(
                    cog,
                    kk,
                    howo,
                    &mut dwacc[grp * cog * kk..(grp + 1) * cog * kk],
                    (dyg, howo as isize, 1),
                    (colm, 1, howo as isize),
                    true,
                    gp,
                );
                if dxn.is_empty() {
                    continue;
                }
                let wg = &w[grp * cog * kk..(grp + 1) * cog * kk];
                if is_pointwise(g) {
                    // dx_g = W_g^T (kk x cog) * dY_g, written straight into the input gradient.
                    sgemm(
                        kk,
                        howo,
                        cog,
                        &mut dxn[grp * cig * howo..(grp + 1) * cig * howo],
                        (wg, 1, kk as isize),
                        (dyg, howo as isize, 1),
                        false,
                        gp,
                    );
                } else {
                    dcol.resize(kk * howo, 0.0);
                    sgemm(
                        kk,
                        howo,
                        cog,
                        dcol,
                        (wg, 1, kk as isize),
                        (dyg, howo as isize, 1),
                        false,
                        gp,
                    );
                    col2im(xs, dxn, grp, g, ho, wo, dcol, par);
                }
            }
        };
        if split_items(ys.n) {
            let sn = xs.sample_numel();
            let partial = if need_dx {
                dx.par_chunks_mut(sn)
                    .enumerate()
                    .fold(
                        || vec![0.0f32; wlen],
                        |mut acc, (n, dxn)| {
                            with_scratch(|col, dcol| sample(n, &mut acc, dxn, col, dcol, false));
                            acc
                        },
                    )
                    .reduce(|| vec![0.0f32; wlen], add_vecs)
            } else {
                (0..ys.n)
                    .into_par_iter()
                    .fold(
                        || vec![0.0f32; wlen],
                        |mut acc, n| {
                            with_scratch(|col, dcol| {
                                sample(n, &mut acc, &mut [], col, dcol, false)
                            });
                            acc
                        },
                    )
                    .reduce(|| vec![0.0f32; wlen], add_vecs)
            };
            dw.iter_mut().zip(&partial).for_each(|(d, p)| *d += p);
        } else {
            let sn = xs.sample_numel();
            with_scratch(|col, dcol| {
                for n in 0..ys.n {
                    let dxn: &mut [f32] = if need_dx {
                        &mut dx[n * sn..(n + 1) * sn]
                    } else {
                        &mut []
                    };
                    sample(n, dw, dxn, col, dcol, true);
                }
            });
        }
        if need_dx {
            Ok(Some(tensor(xs, dx)?))
        } else {
            Ok(None)
        }
    }

    fn batch_norm_stats(&self, x: &Tensor<f32>) -> Result<BnStats> {
        let s = nchw(x, "batch norm input")?;
        let m = (s.n * s.hw()) as f64;
        let hw = s.hw();
        let (mean, var): (Vec<f64>, Vec<f64>) = (0..s.c)
            .into_par_iter()
            .map(|c| {
                let planes = || (0..s.n).map(move |n| &x.data()[(n * s.c + c) * hw..][..hw]);
                let mu = planes().map(sum_f64).sum::<f64>() / m;
                let muf = mu as f32;
                let sq: f64 = planes()
                    .map(|p| chunked_sum(p, |v| (v - muf) * (v - muf)))
                    .sum();
                (mu, sq / m)
            })
            .unzip();
        Ok(BnStats { mean, var })
    }

    fn channel_affine(
        &self,
        mut x: Tensor<f32>,
        a: &[f32],
        b: &[f32],
        relu: bool,
    ) -> Result<Tensor<f32>> {
        let s = nchw(&x, "channel affine input")?;
        check_len("channel scale", a.len(), s.c)?;
        check_len("channel shift", b.len(), s.c)?;
        x.data_mut()
            .par_chunks_mut(s.hw())
            .enumerate()
            .for_each(|(nc, p)| {
                let (av, bv) = (a[nc % s.c], b[nc % s.c]);
                if relu {
                    p.iter_mut().for_each(|v| *v = relu_keep_nan(av * *v + bv));
                } else {
                    p.iter_mut().for_each(|v| *v = av * *v + bv);
                }
            });
        Ok(x)
    }

    fn batch_norm_backward(
        &self,
        x: &Tensor<f32>,
        dy: &Tensor<f32>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<Tensor<f32>> {
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
        let hw = s.hw();
        let m = (s.n * hw) as f64;
        let sums: Vec<(f64, f64)> = (0..s.c)
            .into_par_iter()
            .map(|c| {
                let (mu, is) = (mean[c] as f32, invstd[c] as f32);
                let (mut sd, mut sdx) = (0.0f64, 0.0f64);
                for n in 0..s.n {
                    let base = (n * s.c + c) * hw;
                    let (xp, dp) = (&x.data()[base..base + hw], &dy.data()[base..base + hw]);
                    sd += sum_f64(dp);
                    sdx += chunked_sum2(xp, dp, |xv, dv| dv * (xv - mu)) * is as f64;
                }
                (sd, sdx)
            })
            .collect();
        for (c, &(sd, sdx)) in sums.iter().enumerate() {
            dgamma[c] += sdx as f32;
            dbeta[c] += sd as f32;
        }
        let mut dx = overwritten(s.numel());
        dx.par_chunks_mut(hw).enumerate().for_each(|(nc, out)| {
            let c = nc % s.c;
            let base = nc * hw;
            let (mu, is) = (mean[c] as f32, invstd[c] as f32);
            let k = gamma[c] * is;
            let xs = &x.data()[base..base + hw];
            let ds = &dy.data()[base..base + hw];
            if batch_stats {
                let (md, mdx) = ((sums[c].0 / m) as f32, (sums[c].1 / m) as f32);
                for ((o, &xv), &dv) in out.iter_mut().zip(xs).zip(ds) {
                    *o = k * (dv - md - (xv - mu) * is * mdx);
                }
            } else {
                for (o, &dv) in out.iter_mut().zip(ds) {
                    *o = k * dv;
                }
            }
        });
        tensor(s, dx)
    }

    fn relu(&self, mut x: Tensor<f32>) -> Result<Tensor<f32>> {
        nchw(&x, "relu input")?;
        x.data_mut().par_chunks_mut(1 << 14).for_each(|c| {
            c.iter_mut().for_each(|v| {
                if *v < 0.0 {
                    *v = 0.0
                }
            })
        });
        Ok(x)
    }

    fn relu_backward(&self, y: &Tensor<f32>, mut dy: Tensor<f32>) -> Result<Tensor<f32>> {
        same_shape(nchw(&dy, "relu gradient")?, nchw(y, "relu output")?, "relu")?;
        dy.data_mut()
            .par_chunks_mut(1 << 14)
            .zip(y.data().par_chunks(1 << 14))
            .for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(d, &y)| {
                    if y.is_nan() || y <= 0.0 {
                        *d = 0.0
                    }
                })
            });
        Ok(dy)
    }

    fn add(&self, mut a: Tensor<f32>, b: &Tensor<f32>, relu: bool) -> Result<Tensor<f32>> {
        same_shape(nchw(&a, "add lhs")?, nchw(b, "add rhs")?, "residual add")?;
        a.data_mut()
            .par_chunks_mut(1 << 14)
            .zip(b.data().par_chunks(1 << 14))
            .for_each(|(x, y)| {
                if relu {
                    x.iter_mut()
                        .zip(y)
                        .for_each(|(x, &y)| *x = relu_keep_nan(*x + y));
                } else {
                    x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
                }
            });
        Ok(a)
    }

    fn max_pool2d(&self, x: &Tensor<f32>, g: &PoolGeom) -> Result<(Tensor<f32>, Vec<u32>)> {
        let xs = nchw(x, "max pool input")?;
        let ys = g.output_shape(xs)?;
        index_fits(xs)?;
        let mut y = overwritten(ys.numel());
        let mut arg = vec![0u32; ys.numel()];
        let (ihw, ohw) = (xs.hw(), ys.hw());
        y.par_chunks_mut(ohw)
            .zip(arg.par_chunks_mut(ohw))
            .enumerate()
            .try_for_each(|(nc, (yp, ap))| {
                let xp = &x.data()[nc * ihw..(nc + 1) * ihw];
                for oh in 0..ys.h {
                    let (h0, h1, _) = g.window(oh, xs.h);
                    for ow in 0..ys.w {
                        let (w0, w1, _) = g.window(ow, xs.w);
                        let (mut best, mut bi) = (f32::NEG_INFINITY, usize::MAX);
                        for ih in h0..h1 {
                            for iw in w0..w1 {
                                let v = xp[ih * xs.w + iw];
                                if bi == usize::MAX || v > best || v.is_nan() {
                                    best = v;
                                    bi = ih * xs.w + iw;
                                }
                            }
                        }
                        if bi == usize::MAX {
                            return Err(Error::Shape(format!(
                                "max pool window outside input {xs}"
                            )));
                        }
                        yp[oh * ys.w + ow] = best;
                        ap[oh * ys.w + ow] = (nc * ihw + bi) as u32;
                    }
                }
                Ok(())
            })?;
        Ok((tensor(ys, y)?, arg))
    }

    fn max_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        argmax: &Vec<u32>,
        input: Shape,
    ) -> Result<Tensor<f32>> {
        let ys = nchw(dy, "max pool gradient")?;
        check_len("max pool indices", argmax.len(), ys.numel())?;
        if ys.n != input.n || ys.c != input.c {
            return Err(Error::Shape(format!(
                "max pool gradient {ys} does not match input {input}"
            )));
        }
        let (ihw, ohw) = (input.hw(), ys.hw());
        let mut dx = zeroed(input.numel());
        dx.par_chunks_mut(ihw)
            .enumerate()
            .try_for_each(|(nc, dp)| {
                let base = nc * ihw;
                for (&i, &d) in argmax[nc * ohw..(nc + 1) * ohw]
                    .iter()
                    .zip(&dy.data()[nc * ohw..(nc + 1) * ohw])
                {
                    let j = (i as usize).wrapping_sub(base);
                    *dp.get_mut(j).ok_or_else(|| {
                        Error::Shape(format!("max pool index {i} outside its plane"))
                    })? += d;
                }
                Ok::<(), Error>(())
            })?;
        tensor(input, dx)
    }

    fn avg_pool2d(&self, x: &Tensor<f32>, g: &PoolGeom) -> Result<Tensor<f32>> {
        let xs = nchw(x, "avg pool input")?;
        let ys = g.output_shape(xs)?;
        let mut y = overwritten(ys.numel());
        let (ihw, ohw) = (xs.hw(), ys.hw());
        y.par_chunks_mut(ohw).enumerate().for_each(|(nc, yp)| {
            let xp = &x.data()[nc * ihw..(nc + 1) * ihw];
            for oh in 0..ys.h {
                let (h0, h1, eh) = g.window(oh, xs.h);
                for ow in 0..ys.w {
                    let (w0, w1, ew) = g.window(ow, xs.w);
                    let mut acc = 0.0f32;
                    for ih in h0..h1 {
                        acc += xp[ih * xs.w + w0..ih * xs.w + w1].iter().sum::<f32>();
                    }
                    yp[oh * ys.w + ow] = acc / divisor(g, h0, h1, w0, w1, eh, ew);
                }
            }
        });
        tensor(ys, y)
    }

    fn avg_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        g: &PoolGeom,
        input: Shape,
    ) -> Result<Tensor<f32>> {
        let ys = nchw(dy, "avg pool gradient")?;
        same_shape(ys, g.output_shape(input)?, "avg pool gradient vs output")?;
        let (ihw, ohw) = (input.hw(), ys.hw());
        let mut dx = zeroed(input.numel());
        dx.par_chunks_mut(ihw).enumerate().for_each(|(nc, dp)| {
            let dyp = &dy.data()[nc * ohw..(nc + 1) * ohw];
            for oh in 0..ys.h {
                let (h0, h1, eh) = g.window(oh, input.h);
                for ow in 0..ys.w {
                    let (w0, w1, ew) = g.window(ow, input.w);
                    let d = dyp[oh * ys.w + ow] / divisor(g, h0, h1, w0, w1, eh, ew);
                    for ih in h0..h1 {
                        dp[ih * input.w + w0..ih * input.w + w1]
                            .iter_mut()
                            .for_each(|v| *v += d);
                    }
                }
            }
        });
        tensor(input, dx)
    }

    fn global_avg_pool(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = nchw(x, "global pool input")?;
        let y = x
            .data()
            .par_chunks(s.hw())
            .map(|p| (sum_f64(p) / s.hw() as f64) as f32)
            .collect();
        tensor(Shape::new(s.n, s.c, 1, 1), y)
    }

    fn global_avg_pool_backward(&self, dy: &Tensor<f32>, input: Shape) -> Result<Tensor<f32>> {
        same_shape(
            nchw(dy, "global pool gradient")?,
            Shape::new(input.n, input.c, 1, 1),
            "global pool gradient",
        )?;
        let hw = input.hw();
        let mut dx = zeroed(input.numel());
        dx.par_chunks_mut(hw)
            .zip(dy.data().par_iter())
            .for_each(|(p, &d)| p.fill(d / hw as f32));
        tensor(input, dx)
    }

    fn linear(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        out: usize,
    ) -> Result<Tensor<f32>> {
        let s = nchw(x, "linear input")?;
        let k = s.sample_numel();
        check_len("linear weight", w.len(), out * k)?;
        let mut y = vec![0.0f32; s.n * out];
        if let Some(b) = b {
            check_len("linear bias", b.len(), out)?;
            y.chunks_mut(out).for_each(|r| r.copy_from_slice(b));
        }
        // y (n x out) += x (n x k) * W^T (k x out)
        sgemm(
            s.n,
            out,
            k,
            &mut y,
            (x.data(), k as isize, 1),
            (w, 1, k as isize),
            true,
            Parallelism::Rayon(0),
        );
        tensor(Shape::try_new(s.n, out, 1, 1)?, y)
    }

    fn linear_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> Result<Tensor<f32>> {
        let s = nchw(x, "linear input")?;
        let ds = nchw(dy, "linear gradient")?;
        let (k, out) = (s.sample_numel(), ds.c);
        same_shape(ds, Shape::new(s.n, out, 1, 1), "linear gradient")?;
        check_len("linear weight", w.len(), out * k)?;
        check_len("linear weight gradient", dw.len(), out * k)?;
        if let Some(db) = db {
            check_len("linear bias gradient", db.len(), out)?;
            for (o, d) in db.iter_mut().enumerate() {
                *d += (0..s.n).map(|n| dy.data()[n * out + o]).sum::<f32>();
            }
        }
        // dW (out x k) += dY^T (out x n) * X (n x k)
        sgemm(
            out,
            k,
            s.n,
            dw,
            (dy.data(), 1, out as isize),
            (x.data(), k as isize, 1),
            true,
            Parallelism::Rayon(0),
        );
        // dX (n x k) = dY (n x out) * W (out x k)
        let mut dx = zeroed(s.numel());
        sgemm(
            s.n,
            k,
            out,
            &mut dx,
            (dy.data(), out as isize, 1),
            (w, k as isize, 1),
            false,
            Parallelism::Rayon(0),
        );
        tensor(s, dx)
    }

    fn recycle(&self, t: Tensor<f32>) {
        let v = t.into_vec();
        // Small buffers are cheap to allocate; keep the large ones.
        if v.capacity() < 1 << 14 {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() == POOL_BUFFERS {
                // Drop the smallest to make room.
                if let Some((i, _)) = pool.iter().enumerate().min_by_key(|(_, b)| b.capacity()) {
                    if pool[i].capacity() < v.capacity() {
                        pool.swap_remove(i);
                    }
                }
            }
            if pool.len() < POOL_BUFFERS {
                pool.push(v);
            }
        }
    }

    fn se_forward(
        &self,
        w: &SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
    ) -> Result<(Tensor<f32>, Self::SeSaved)> {
        let s = nchw(x, "SE input")?;
        let (y, saved) = se_op_forward(w, x, residual)?;
        Ok((tensor(s, y)?, saved))
    }

    fn se_backward(
        &self,
        w: &SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
        saved: &Self::SeSaved,
        dy: &Tensor<f32>,
    ) -> Result<SeBackward<Tensor<f32>>> {
        let s = nchw(x, "SE input")?;
        let (dx, grads, dres) = se_op_backward(w, x, residual, saved, dy)?;
        Ok(SeBackward {
            dx: tensor(s, dx)?,
            grads,
            dresidual: dres.map(|d| tensor(s, d)).transpose()?,
        })
    }
}

/// Elements summed in f32 before the partial sum joins the f64 total: short enough to keep
/// f32 rounding near 1e-7 relative, long enough to vectorise.
const CHUNK: usize = 256;
/// Independent f32 accumulators per chunk (one AVX-512 register).
const LANES: usize = 16;

/// `sum(f(v))` over `p`: 16 f32 lanes within chunks of 256 elements, chunks added in f64.
#[inline]
fn chunked_sum(p: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    p.chunks(CHUNK)
        .map(|c| {
            let mut acc = [0.0f32; LANES];
            let mut it = c.chunks_exact(LANES);
            for v in &mut it {
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += f(x);
                }
            }
            let tail: f32 = it.remainder().iter().map(|&x| f(x)).sum();
            acc.iter().sum::<f32>() as f64 + tail as f64
        })
        .sum()
}

/// `sum(f(a, b))` over two equally long slices, accumulated like [`chunked_sum`].
#[inline]
fn chunked_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    a.chunks(CHUNK)
        .zip(b.chunks(CHUNK))
        .map(|(ca, cb)| {
            let mut acc = [0.0f32; LANES];
            let (mut ia, mut ib) = (ca.chunks_exact(LANES), cb.chunks_exact(LANES));
            for (va, vb) in (&mut ia).zip(&mut ib) {
                for ((s, &x), &y) in acc.iter_mut().zip(va).zip(vb) {
                    *s += f(x, y);
                }
            }
            let tail: f32 = ia
                .remainder()
                .iter()
                .zip(ib.remainder())
                .map(|(&x, &y)| f(x, y))
                .sum();
            acc.iter().sum::<f32>() as f64 + tail as f64
        })
        .sum()
}

fn sum_f64(p: &[f32]) -> f64 {
    chunked_sum(p, |v| v)
}

fn add_vecs(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    a
}

fn divisor(g: &PoolGeom, h0: usize, h1: usize, w0: usize, w1: usize, eh: usize, ew: usize) -> f32 {
    let d = if g.count_include_pad {
        eh * ew
    } else {
        (h1 - h0) * (w1 - w0)
    };
    d.max(1) as f32
}

/// `max(v, 0)` that lets NaN through, as PyTorch's ReLU does (so a diverging run shows NaN
/// instead of zeros).
#[inline(always)]
fn relu_keep_nan(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}
