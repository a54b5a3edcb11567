//! The elementwise segments the passes are made of: scale (and the fused epilogue), the
//! per-channel sums of backward, and dx, over runs of elements in either layout.

use super::*;

/// Per-channel values over a run of elements: one value for an NCHW channel row, a slice (one
/// per channel) for an NHWC pixel.
pub(super) trait Scales: Copy {
    /// The value for element `i` of the run.
    fn get(self, i: usize) -> f32;
    /// The values for elements `k0..k0 + n` of the run.
    fn sub(self, k0: usize, n: usize) -> Self;
}

impl Scales for f32 {
    #[inline(always)]
    fn get(self, _: usize) -> f32 {
        self
    }
    #[inline(always)]
    fn sub(self, _: usize, _: usize) -> Self {
        self
    }
}

impl Scales for &[f32] {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        self[i]
    }
    #[inline(always)]
    fn sub(self, k0: usize, n: usize) -> Self {
        &self[k0..][..n]
    }
}

/// Stack buffers for converting f16/bf16 pieces (unused, and optimised away, for f32).
pub(super) struct Bufs {
    pub(super) a: [f32; PIECE],
    pub(super) b: [f32; PIECE],
    pub(super) c: [f32; PIECE],
    pub(super) d: [f32; PIECE],
}

impl Bufs {
    #[inline(always)]
    pub(super) fn new() -> Self {
        Bufs {
            a: [0.0; PIECE],
            b: [0.0; PIECE],
            c: [0.0; PIECE],
            d: [0.0; PIECE],
        }
    }
}

/// The epilogue's pre-activation, one expression for forward and for backward's mask.
#[inline(always)]
pub(super) fn epilogue_pre(s: f32, x: f32, r: f32) -> f32 {
    s * x + r
}

/// y = s * x, or relu(s * x + r), over one run.
#[inline(always)]
pub(super) fn fwd_seg<T: Element, S: Scales>(
    x: &[T],
    r: Option<&[T]>,
    y: &mut [T],
    s: S,
    bufs: &mut Bufs,
) {
    let Bufs { a, b, c, .. } = bufs;
    let len = y.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let sv = s.sub(k0, n);
        match r {
            None => emit(&mut y[k0..][..n], c, false, |yv| {
                for i in 0..n {
                    yv[i] = sv.get(i) * xv[i];
                }
            }),
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                emit(&mut y[k0..][..n], c, false, |yv| {
                    for i in 0..n {
                        yv[i] = epilogue_pre(sv.get(i), xv[i], rv[i]).max(0.0);
                    }
                })
            }
        }
    }
}

/// sum of g * x over one NCHW channel row with weight `s` (g = dy through the mask).
#[inline(always)]
pub(super) fn dsum_seg<T: Element>(
    x: &[T],
    r: Option<&[T]>,
    dy: &[T],
    s: f32,
    bufs: &mut Bufs,
) -> f32 {
    let Bufs { a, b, c, .. } = bufs;
    let len = x.len();
    let mut acc = 0.0;
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let gv = view(&dy[k0..][..n], c);
        acc += match r {
            None => dot(gv, xv),
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                masked_dot(gv, xv, rv, s)
            }
        };
    }
    acc
}

/// ds[k] += g * x over one NHWC pixel's run of channels with weights `s`.
#[inline(always)]
pub(super) fn dsum_cols<T: Element>(
    x: &[T],
    r: Option<&[T]>,
    dy: &[T],
    s: &[f32],
    ds: &mut [f32],
    bufs: &mut Bufs,
) {
    let Bufs { a, b, c, .. } = bufs;
    let len = x.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let xv = view(&x[k0..][..n], a);
        let gv = view(&dy[k0..][..n], c);
        let acc = &mut ds[k0..][..n];
        match r {
            None => {
                for i in 0..n {
                    acc[i] += gv[i] * xv[i];
                }
            }
            Some(r) => {
                let rv = view(&r[k0..][..n], b);
                let sv = &s[k0..][..n];
                for i in 0..n {
                    let keep = epilogue_pre(sv[i], xv[i], rv[i]) > 0.0;
                    acc[i] += if keep { gv[i] * xv[i] } else { 0.0 };
                }
            }
        }
    }
}

/// dx = g * s + dzh (+ dx) and d residual = g over one run.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn dx_seg<T: Element, S: Scales>(
    x: &[T],
    r: Option<&[T]>,
    dy: &[T],
    s: S,
    dzh: S,
    dx: &mut [T],
    mut dres: Option<&mut [T]>,
    accumulate: bool,
    bufs: &mut Bufs,
) {
    let Bufs { a, b, c, d } = bufs;
    let len = dx.len();
    for k0 in (0..len).step_by(PIECE) {
        let n = PIECE.min(len - k0);
        let sv = s.sub(k0, n);
        let zv = dzh.sub(k0, n);
        let g: &[f32] = match r {
            None => view(&dy[k0..][..n], c),
            Some(r) => {
                let xv = view(&x[k0..][..n], a);
                let rv = view(&r[k0..][..n], b);
                let dyv: &[f32] = view(&dy[k0..][..n], c);
                let gb = &mut d[..n];
                for i in 0..n {
                    let keep = epilogue_pre(sv.get(i), xv[i], rv[i]) > 0.0;
                    gb[i] = if keep { dyv[i] } else { 0.0 };
                }
                if let Some(dr) = dres.as_deref_mut() {
                    store(gb, &mut dr[k0..][..n]);
                }
                gb
            }
        };
        // `a` and `b` are free again (their views are dead): reuse `a` for dx's conversion.
        emit(&mut dx[k0..][..n], a, accumulate, |dv| {
            if accumulate {
                for i in 0..n {
                    dv[i] += g[i] * sv.get(i) + zv.get(i);
                }
            } else {
                for i in 0..n {
                    dv[i] = g[i] * sv.get(i) + zv.get(i);
                }
            }
        });
    }
}
