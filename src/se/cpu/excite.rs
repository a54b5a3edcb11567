//! The excitation's small GEMMs: FC layers over one sample or a tile of samples, with
//! AVX-512 and AVX2 + FMA dot kernels chosen at run time, and the batched GEMMs of the
//! parameter gradients.

use super::*;

/// The `gemm` crate's parallelism for an `m x n x k` product of `macs` multiply-adds: split
/// over the threads only when each gets enough work to pay for the hand-off.
pub(super) fn gemm_par(macs: usize, threads: usize) -> Parallelism {
    if threads > 1 && macs >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// True when the CPU has AVX-512F: [`fc`] then runs 16-wide dot kernels ([`avx512`]).
#[inline]
pub(super) fn avx512_available() -> bool {
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
pub(super) fn fma_available() -> bool {
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
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// y[i][j] = b[j] + dot(w[j], x[i]): `w` is `[o][k]`, `x` is `[m][k]`, `y` is `[m][o]`.
pub(super) fn fc(w: &[f32], b: Option<&[f32]>, k: usize, x: &[f32], y: &mut [f32], o: usize) {
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
pub(super) fn fc_batch(
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
pub(super) fn dot2x4_portable(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    [
        dot4::<false>(w0, x[0], x[1], x[2], x[3]),
        dot4::<false>(w1, x[0], x[1], x[2], x[3]),
    ]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn fc_fma(w: &[f32], b: Option<&[f32]>, k: usize, x: &[f32], y: &mut [f32], o: usize) {
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
pub(super) fn fc_avx512(
    w: &[f32],
    b: Option<&[f32]>,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    o: usize,
) {
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
pub(super) fn fc_impl(
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
pub(super) type V8 = [f32; 8];

/// Lane-wise a * b + c.
#[inline(always)]
pub(super) fn vfma<const FMA: bool>(a: V8, b: V8, c: V8) -> V8 {
    let mut r = [0f32; 8];
    for l in 0..8 {
        r[l] = madd::<FMA>(a[l], b[l], c[l]);
    }
    r
}

/// The eight lanes at `s[at..at + 8]`.
#[inline(always)]
pub(super) fn v8(s: &[f32], at: usize) -> V8 {
    let mut v = [0f32; 8];
    v.copy_from_slice(&s[at..at + 8]);
    v
}

/// Four dot products of `w` with `x0..x3` (all of `w`'s length) sharing each load of `w`: eight
/// accumulators of eight lanes (one AVX2 register each), as whole-register values so the compiler
/// keeps them in registers.
#[inline(always)]
pub(super) fn dot4<const FMA: bool>(
    w: &[f32],
    x0: &[f32],
    x1: &[f32],
    x2: &[f32],
    x3: &[f32],
) -> [f32; 4] {
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
    pub(super) fn ld(v: &[f32; 8]) -> __m256 {
        bytemuck::cast(*v)
    }

    /// The first `n` (a multiple of 8) elements of `s` as vectors.
    #[inline(always)]
    pub(super) fn vecs(s: &[f32], n: usize) -> &[[f32; 8]] {
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
    pub(super) fn ld(v: &[f32; 16]) -> __m512 {
        bytemuck::cast(*v)
    }

    /// The first `n` (a multiple of 16) elements of `s` as vectors.
    #[inline(always)]
    pub(super) fn vecs(s: &[f32], n: usize) -> &[[f32; 16]] {
        bytemuck::cast_slice(&s[..n])
    }

    /// Adds the scalar products past the last whole vector.
    #[inline(always)]
    pub(super) fn tail(w: &[f32], x: &[f32], from: usize, acc: f32) -> f32 {
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
