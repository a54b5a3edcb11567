//! The im2col + GEMM convolution engine ([`ConvEngine::Cublas`]): columns of a chunk of
//! samples, then one strided-batched GEMM per group and chunk through cuBLAS on a GPU or its
//! column-major stand-in on the emulator.

use super::*;

/// The im2col engine's GEMMs.
#[derive(Debug)]
pub(super) enum GemmEngine {
    /// cuBLAS on a GPU.
    Cublas(Blas),
    /// kernels/nn_conv.cu's `nn_blas_*`, cuBLAS's column-major contract, on the emulator.
    StandIn,
}

impl<A: NnAct> Cuda<A> {
    /// The im2col engine's GEMM operand type for A.
    pub(super) fn blas_type() -> BlasType {
        match A::SUFFIX {
            "bf16" => BlasType::Bf16,
            "f16" => BlasType::F16,
            _ => BlasType::F32,
        }
    }

    /// One strided-batched GEMM of the im2col engine (operands of A; C of A, or f32 with
    /// `c_f32`): cuBLAS on a GPU, `nn_blas_*` (the same contract) on the emulator.
    ///
    /// # Safety
    /// The addresses in `g` hold what its sizes, leading dimensions and strides reach.
    pub(super) unsafe fn blas_gemm(&self, g: &Gemm, c_f32: bool) -> Result<()> {
        let c_type = if c_f32 {
            BlasType::F32
        } else {
            Self::blas_type()
        };
        if let Some(GemmEngine::Cublas(b)) = self.im2col.as_deref() {
            // SAFETY: forwarded from this function's contract.
            return unsafe { b.gemm(&self.dev, g, Self::blas_type(), c_type) };
        }
        let int = |what: &str, v: usize| small(what, v);
        let (ta, tb) = (g.transa as u32, g.transb as u32);
        let (m, n, k) = (
            int("GEMM rows", g.m)?,
            int("GEMM columns", g.n)?,
            int("GEMM depth", g.k)?,
        );
        let (alpha, beta) = (1.0f32, g.beta);
        let (lda, sa, ldb, sb, ldc, sc) = (
            g.lda as i64,
            g.stride_a as i64,
            g.ldb as i64,
            g.stride_b as i64,
            g.ldc as i64,
            g.stride_c as i64,
        );
        if g.batch > self.max_yz() {
            return Err(Error::Shape(format!(
                "a GEMM batch of {} is too large",
                g.batch
            )));
        }
        let grid = (
            grid_x(g.n, TILE)?,
            grid_y(g.m, TILE, self.max_yz())?,
            g.batch.max(1) as u32,
        );
        let (a, b) = (In(g.a), In(g.b));
        // SAFETY: the operands as this function's contract says.
        unsafe {
            if c_f32 {
                let k = kargs::NnBlasF32out {
                    transa: ta,
                    transb: tb,
                    m,
                    n,
                    k,
                    alpha,
                    A: a,
                    lda,
                    sa,
                    B: b,
                    ldb,
                    sb,
                    beta,
                    C: Out(g.c),
                    ldc,
                    sc,
                };
                self.launch(&k, grid)
            } else {
                let k = kargs::NnBlasAct {
                    transa: ta,
                    transb: tb,
                    m,
                    n,
                    k,
                    alpha,
                    A: a,
                    lda,
                    sa,
                    B: b,
                    ldb,
                    sb,
                    beta,
                    C: Out(g.c),
                    ldc,
                    sc,
                };
                self.launch(&k, grid)
            }
        }
    }

    /// Samples per im2col chunk: as many as fit the column budget (at least one). The budget
    /// counts elements of A; the input gradient's f32 dcol has as many elements.
    pub(super) fn col_chunk(&self, g: &ConvGeom, xs: Shape, ys: Shape) -> usize {
        let per = (g.groups * ys.hw() * g.in_per_group() * g.kernel * g.kernel).max(1);
        (self.col_budget / per)
            .clamp(1, xs.n.max(1))
            .min(self.max_yz())
    }

    /// The columns of samples [n0, n0 + nn) of `x` into a pooled buffer:
    /// col[group][sample][pixel][k].
    pub(super) fn im2col(
        &self,
        x: u64,
        p: &NnConvParams,
        n0: usize,
        nn: usize,
        xs: Shape,
    ) -> Result<PoolBuf<A>> {
        let pc = NnConvParams { n: nn as u32, ..*p };
        let total = p.groups as usize * nn * (p.oh as usize * p.ow as usize) * p.kdepth as usize;
        let col = self.out::<A>(total)?;
        let (xp, cp) = (
            x + (n0 * xs.sample_numel() * size_of::<A>()) as u64,
            self.addr(&col),
        );
        let args = kargs::NnIm2col {
            p: pc,
            x: In(xp),
            col: Out(cp),
        };
        // SAFETY: nn_im2col_A(p, x, col): x points at sample n0 of a buffer holding xs (nn
        // samples follow), col holds groups * nn * P * K elements.
        unsafe { self.launch_flat(&args, total)? };
        Ok(col)
    }

    /// y = conv(x, w) by im2col and one strided-batched GEMM per group and chunk of samples.
    pub(super) fn conv_fwd_im2col(
        &self,
        x: &GpuTensor<A>,
        wp: u64,
        g: &ConvGeom,
        xs: Shape,
        ys: Shape,
    ) -> Result<GpuTensor<A>> {
        let p = self.conv_params(g, xs, ys)?;
        let mut keep = Vec::new();
        let wa = self.act_weight(wp, g.weight_len(), &mut keep)?;
        let y = self.out_t(ys)?;
        let (pix, kg, ocg, oc) = (ys.hw(), p.kdepth as usize, g.out_per_group(), g.out_ch);
        let e = size_of::<A>() as u64;
        let chunk = self.col_chunk(g, xs, ys);
        let nhwc = self.layout == Layout::Nhwc;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let col = self.im2col(self.addr(&x), &p, n0, nn, xs)?;
            let y0 = self.addr(&y) + (n0 * ys.sample_numel()) as u64 * e;
            for gi in 0..g.groups {
                let colg = self.addr(&col) + (gi * nn * pix * kg) as u64 * e;
                let wg = wa + (gi * ocg * kg) as u64 * e;
                let gm = if nhwc {
                    // y[s][p][g ocg + o] = sum_k W[o][k] col[p][k]: C (ocg x P, ld oc).
                    Gemm {
                        transa: true,
                        transb: false,
                        m: ocg,
                        n: pix,
                        k: kg,
                        a: wg,
                        lda: kg,
                        stride_a: 0,
                        b: colg,
                        ldb: kg,
                        stride_b: pix * kg,
                        c: y0 + (gi * ocg) as u64 * e,
                        ldc: oc,
                        stride_c: pix * oc,
                        batch: nn,
                        beta: 0.0,
                    }
                } else {
                    // y[s][g ocg + o][p]: C (P x ocg, ld P) = col (P x K) W^T (K x ocg).
                    Gemm {
                        transa: true,
                        transb: false,
                        m: pix,
                        n: ocg,
                        k: kg,
                        a: colg,
                        lda: kg,
                        stride_a: pix * kg,
                        b: wg,
                        ldb: kg,
                        stride_b: 0,
                        c: y0 + (gi * ocg * pix) as u64 * e,
                        ldc: pix,
                        stride_c: oc * pix,
                        batch: nn,
                        beta: 0.0,
                    }
                };
                // SAFETY: col holds groups x nn x P x K elements, the weight oc x K, y the
                // chunk's nn samples of ys; the GEMM reaches only those.
                unsafe { self.blas_gemm(&gm, false)? };
            }
        }
        Ok(GpuTensor::wrap(y))
    }

    /// The im2col engine's backward: the weight gradient (f32, at `dw.0`, added when `dw.1`)
    /// as one GEMM per group and chunk over samples x pixels, then (with `need_dx`) dcol = W^T
    /// dy per sample (f32) and col2im.
    pub(super) fn conv_bwd_im2col(
        &self,
        x: &GpuTensor<A>,
        wp: u64,
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        (dwp, accumulate): (u64, bool),
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        let xs = x.shape();
        let ys = dy.shape();
        let p = self.conv_params(g, xs, ys)?;
        let mut keep = Vec::new();
        let (pix, kg, ocg, oc) = (ys.hw(), p.kdepth as usize, g.out_per_group(), g.out_ch);
        let e = size_of::<A>() as u64;
        let chunk = self.col_chunk(g, xs, ys);
        let nhwc = self.layout == Layout::Nhwc;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let col = self.im2col(self.addr(&x), &p, n0, nn, xs)?;
            // dy of the chunk with channels innermost ([s][p][oc]): as stored (NHWC), or
            // converted.
            let dy0 = self.addr(&dy) + (n0 * ys.sample_numel()) as u64 * e;
            let cs = Shape::try_new(nn, oc, ys.h, ys.w)?;
            let conv = if nhwc {
                None
            } else {
                let b = self.out::<A>(cs.numel())?;
                self.relayout_into(dy0, self.addr(&b), cs, true)?;
                Some(b)
            };
            let dyc = conv.as_ref().map_or(dy0, |b| self.addr(b));
            for gi in 0..g.groups {
                // dW^T (K x ocg, ld K) (+)= col (K x nn P) dy^T (nn P x ocg).
                let gm = Gemm {
                    transa: false,
                    transb: true,
                    m: kg,
                    n: ocg,
                    k: nn * pix,
                    a: self.addr(&col) + (gi * nn * pix * kg) as u64 * e,
                    lda: kg,
                    stride_a: 0,
                    b: dyc + (gi * ocg) as u64 * e,
                    ldb: oc,
                    stride_b: 0,
                    c: dwp + (gi * ocg * kg * size_of::<f32>()) as u64,
                    ldc: kg,
                    stride_c: 0,
                    batch: 1,
                    beta: if accumulate || n0 > 0 { 1.0 } else { 0.0 },
                };
                // SAFETY: col holds groups x nn x P x K elements, dyc nn P rows of oc, dw the
                // weight's oc x K floats.
                unsafe { self.blas_gemm(&gm, true)? };
            }
        }
        if !need_dx {
            return Ok(None);
        }
        let wa = self.act_weight(wp, g.weight_len(), &mut keep)?;
        let dx = self.out_t(xs)?;
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let dcol = self.out::<f32>(g.groups * nn * pix * kg)?;
            let dy0 = self.addr(&dy) + (n0 * ys.sample_numel()) as u64 * e;
            for gi in 0..g.groups {
                // dcol[g][s] (K x P, ld K) = W_g^T (K x ocg) dy_g[s] (ocg x P).
                let (b, ldb, stride_b, transb) = if nhwc {
                    (dy0 + (gi * ocg) as u64 * e, oc, pix * oc, false)
                } else {
                    (dy0 + (gi * ocg * pix) as u64 * e, pix, oc * pix, true)
                };
                let gm = Gemm {
                    transa: false,
                    transb,
                    m: kg,
                    n: pix,
                    k: ocg,
                    a: wa + (gi * ocg * kg) as u64 * e,
                    lda: kg,
                    stride_a: 0,
                    b,
                    ldb,
                    stride_b,
                    c: self.addr(&dcol) + (gi * nn * pix * kg * size_of::<f32>()) as u64,
                    ldc: kg,
                    stride_c: pix * kg,
                    batch: nn,
                    beta: 0.0,
                };
                // SAFETY: the weight holds oc x K elements, dy the chunk's samples of ys, dcol
                // groups x nn x P x K floats.
                unsafe { self.blas_gemm(&gm, true)? };
            }
            let pc = NnConvParams { n: nn as u32, ..p };
            let (dcp, dxp) = (
                self.addr(&dcol),
                self.addr(&dx) + (n0 * xs.sample_numel()) as u64 * e,
            );
            let args = kargs::NnCol2im {
                p: pc,
                dcol: In(dcp),
                dx: Out(dxp),
            };
            // SAFETY: nn_col2im_A(p, dcol, dx): dcol holds groups x nn x P x K floats, dx
            // points at sample n0 of a buffer holding xs (nn samples follow).
            unsafe { self.launch_flat(&args, nn * xs.sample_numel())? };
        }
        Ok(Some(GpuTensor::wrap(dx)))
    }
}
