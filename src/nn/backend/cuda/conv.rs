//! Convolutions and linear layers: senet's implicit-GEMM kernels (grouped, chunked by samples
//! to fit the grid), cuDNN where it runs, and the weight layouts each needs.

use super::*;

/// A convolution weight's (output channels, input channels per group, kernel area): the dims the
/// KCRS <-> KRSC kernels take.
fn krsc_dims(g: &ConvGeom) -> (u64, u64, u64) {
    (
        g.out_ch as u64,
        g.in_per_group() as u64,
        (g.kernel * g.kernel) as u64,
    )
}

impl<A: NnAct> Cuda<A> {
    /// The address of convolution `g`'s weight (KCRS floats at `wp`) as cuDNN takes it: of
    /// cuDNN's data type, KCRS with NCHW activations and KRSC with NHWC ones. `wp` itself for
    /// f32 NCHW, else a copy kept alive in `keep`.
    pub(super) fn dnn_weight(
        &self,
        wp: u64,
        g: &ConvGeom,
        keep: &mut Vec<PoolBuf<A>>,
    ) -> Result<u64> {
        let n = g.weight_len();
        if self.layout == Layout::Nchw {
            return self.act_weight(wp, n, keep);
        }
        let out = self.out::<A>(n)?;
        let dst = self.addr(&out);
        let (k, c, rs) = krsc_dims(g);
        let args = kargs::NnWeightKrsc {
            w: In(wp),
            dst: Out(dst),
            k,
            c,
            rs,
        };
        // SAFETY: nn_weight_krsc_A(w, dst, k, c, rs): w holds k * c * rs floats (the weight of
        // g), `out` as many elements of A.
        unsafe { self.launch_flat(&args, n)? };
        keep.push(out);
        Ok(dst)
    }

    /// Writes (or with `accumulate` adds) the weight gradient cuDNN formed in A at `tmp` (KCRS,
    /// or KRSC with NHWC activations) into the f32 KCRS gradient at `dst`.
    ///
    /// # Safety
    /// `dst` is a device address holding `g.weight_len()` floats that no other stream uses.
    pub(super) unsafe fn dnn_grad_to_f32(
        &self,
        tmp: &PoolBuf<A>,
        dst: u64,
        g: &ConvGeom,
        accumulate: bool,
    ) -> Result<()> {
        let n = g.weight_len();
        if tmp.len() < n {
            return Err(Error::Shape(format!(
                "cuDNN weight gradient: {} elements for a {n}-element weight",
                tmp.len()
            )));
        }
        let (src, acc) = (self.addr(tmp), accumulate as u32);
        if self.layout == Layout::Nhwc {
            let (k, c, rs) = krsc_dims(g);
            let args = kargs::NnGradFromKrsc {
                src: In(src),
                dst: Out(dst),
                k,
                c,
                rs,
                accumulate: acc,
            };
            // SAFETY: nn_grad_from_krsc_A(src, dst, k, c, rs, accumulate): tmp holds at least
            // n = k * c * rs elements of A (checked), dst n floats (this function's contract).
            unsafe { self.launch_flat(&args, n) }
        } else {
            let args = kargs::NnGradFromAct {
                src: In(src),
                dst: Out(dst),
                n: n as u64,
                accumulate: acc,
            };
            // SAFETY: nn_grad_from_act_A(src, dst, n, accumulate): tmp holds at least n
            // elements of A (checked), dst n floats (this function's contract).
            unsafe { self.launch_flat(&args, n) }
        }
    }

    pub(super) fn conv_fwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        b: Option<PArg<'_>>,
        g: &ConvGeom,
    ) -> Result<GpuTensor<A>> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        w.check("conv weight", g.weight_len())?;
        if let Some(b) = &b {
            b.check("conv bias", g.out_ch)?;
        }
        let mut keep = Vec::new();
        if let Some((d, ws)) = self.dnn_for(xs, ys, g, &[PassKind::Forward])? {
            let wp = self.p_addr(w, &mut keep)?;
            let mut keep_w = Vec::new();
            let wp = self.dnn_weight(wp, g, &mut keep_w)?;
            let y = self.out_t(ys)?;
            let pass = Pass::Forward {
                x: self.addr(&x),
                w: wp,
                y: self.addr(&y),
            };
            self.run_dnn(d, xs, ys, g, pass, ws[0])?;
            let y = GpuTensor::wrap(y);
            return match b {
                Some(b) => {
                    let bp = self.p_addr(b, &mut keep)?;
                    // A null scale: the affine kernel adds the bias alone. (With narrow
                    // activations the sum rounds a second time, after cuDNN's output; the own
                    // kernel adds the bias before its one rounding. No SE-ResNet convolution
                    // has a bias.)
                    self.affine_at(&y, 0, bp, false)
                }
                None => Ok(y),
            };
        }
        if self.im2col.is_some() {
            let wp = self.p_addr(w, &mut keep)?;
            let y = self.conv_fwd_im2col(x, wp, g, xs, ys)?;
            return match b {
                Some(b) => {
                    let bp = self.p_addr(b, &mut keep)?;
                    self.affine_at(&y, 0, bp, false)
                }
                None => Ok(y),
            };
        }
        let mut p = self.conv_params(g, xs, ys)?;
        if b.is_some() {
            p.flags |= crate::cuda::abi::SENET_NN_BIAS;
        }
        let wp = self.p_addr(w, &mut keep)?;
        let bp = match b {
            Some(b) => self.p_addr(b, &mut keep)?,
            None => 0,
        };
        let y = self.out_t(ys)?;
        let chunk = self.sample_chunk(g);
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let xp = self.addr(&x) + (n0 * xs.sample_numel() * size_of::<A>()) as u64;
            let yp = self.addr(&y) + (n0 * ys.sample_numel() * size_of::<A>()) as u64;
            let args = kargs::NnConvFwd {
                p: pc,
                x: In(xp),
                w: In(wp),
                bias: In(bp),
                y: Out(yp),
            };
            let grid = (
                grid_x(ys.hw(), TILE)?,
                grid_y(g.out_per_group(), TILE, self.max_yz())?,
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_fwd_A(p, x, w, bias, y): x and y point at sample n0 of buffers
            // holding xs and ys; nn samples follow; w holds the weight; bias out_ch floats when
            // the flag is set.
            unsafe { self.launch(&args, grid)? };
        }
        Ok(GpuTensor::wrap(y))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_bwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        dy: &GpuTensor<A>,
        g: &ConvGeom,
        dw: GArg<'_>,
        db: Option<GArg<'_>>,
        need_dx: bool,
    ) -> Result<Option<GpuTensor<A>>> {
        let xs = x.shape();
        let ys = g.output_shape(xs)?;
        same_shape(dy.shape(), ys, "conv gradient vs output")?;
        w.check("conv weight", g.weight_len())?;
        dw.check("conv weight gradient", g.weight_len())?;
        if let Some(db) = &db {
            db.check("conv bias gradient", g.out_ch)?;
        }
        let (xp, dyp) = (self.addr(&x), self.addr(&dy));
        if let Some(db) = db {
            let t = self.g_start(db)?;
            self.channel_sum(dyp, t.addr, ys, t.accumulate)?;
            self.g_finish(t)?;
        }
        let passes: &[PassKind] = if need_dx {
            &[PassKind::Filter, PassKind::Data]
        } else {
            &[PassKind::Filter]
        };
        let mut keep = Vec::new();
        if let Some((d, ws)) = self.dnn_for(xs, ys, g, passes)? {
            let t = self.g_start(dw)?;
            if is_f32::<A>() && self.layout == Layout::Nchw {
                let pass = Pass::Filter {
                    x: xp,
                    dy: dyp,
                    dw: t.addr,
                    accumulate: t.accumulate,
                };
                self.run_dnn(d, xs, ys, g, pass, ws[0])?;
            } else {
                // cuDNN forms the gradient in A (KRSC with NHWC); it is added to the f32 KCRS
                // one after.
                let n = g.weight_len();
                let tmp = self.out::<A>(n)?;
                let pass = Pass::Filter {
                    x: xp,
                    dy: dyp,
                    dw: self.addr(&tmp),
                    accumulate: false,
                };
                self.run_dnn(d, xs, ys, g, pass, ws[0])?;
                // SAFETY: t.addr is the gradient target of g's weight: n floats.
                unsafe { self.dnn_grad_to_f32(&tmp, t.addr, g, t.accumulate)? };
            }
            self.g_finish(t)?;
            if !need_dx {
                return Ok(None);
            }
            let wp = self.p_addr(w, &mut keep)?;
            let mut keep_w = Vec::new();
            let wp = self.dnn_weight(wp, g, &mut keep_w)?;
            let dx = self.out_t(xs)?;
            let pass = Pass::Data {
                dy: dyp,
                w: wp,
                dx: self.addr(&dx),
            };
            self.run_dnn(d, xs, ys, g, pass, ws[1])?;
            return Ok(Some(GpuTensor::wrap(dx)));
        }
        if self.im2col.is_some() {
            let t = self.g_start(dw)?;
            let wp = self.p_addr(w, &mut keep)?;
            let dx = self.conv_bwd_im2col(x, wp, dy, g, (t.addr, t.accumulate), need_dx)?;
            self.g_finish(t)?;
            return Ok(dx);
        }
        let mut p = self.conv_params(g, xs, ys)?;
        // Weight gradient (accumulated into dw's current values, or written over a zeroed
        // bound gradient), split along its long depth (samples x output pixels) when the
        // output alone gives too few blocks.
        let t = self.g_start(dw)?;
        p.flags = self.conv_layout_flag()
            | if t.accumulate {
                crate::cuda::abi::SENET_NN_ACCUMULATE
            } else {
                0
            };
        let (splits, kps) = self.weight_grad_splits(g, xs.n * ys.hw());
        let partial = if splits > 1 {
            Some(self.out::<f32>(splits as usize * g.weight_len())?)
        } else {
            None
        };
        let (dwp, pp) = (t.addr, partial.as_ref().map_or(0, |b| self.addr(b)));
        let args = kargs::NnConvBwdWeight {
            p,
            x: In(xp),
            dy: In(dyp),
            dw: Out(dwp),
            partial: Out(pp),
            splits,
            k_per_split: kps,
        };
        let z = g.groups * splits as usize;
        if z > self.max_yz() {
            return Err(Error::Shape(format!("{} groups are too many", g.groups)));
        }
        let grid = (
            grid_x(g.in_per_group() * g.kernel * g.kernel, TILE)?,
            grid_y(g.out_per_group(), TILE, self.max_yz())?,
            z as u32,
        );
        // SAFETY: nn_conv_bwd_weight_A(p, x, dy, dw, partial, splits, k_per_split): x holds
        // xs, dy holds ys, dw the weight, partial splits weights when splits > 1; the splits
        // cover the depth (weight_grad_splits).
        unsafe { self.launch(&args, grid)? };
        if splits > 1 {
            let (len, acc) = (g.weight_len() as u64, t.accumulate as u32);
            let args = kargs::NnSumSplitsF32 {
                partial: In(pp),
                out: Out(dwp),
                len,
                splits,
                accumulate: acc,
            };
            // SAFETY: nn_sum_splits_f32(partial, out, len, splits, accumulate): partial holds
            // splits * len floats, dw len.
            unsafe { self.launch(&args, (blocks(g.weight_len(), THREADS as usize), 1, 1))? };
        }
        self.g_finish(t)?;
        if !need_dx {
            return Ok(None);
        }
        let wp = self.p_addr(w, &mut keep)?;
        let dx = self.out_t(xs)?;
        let chunk = self.sample_chunk(g);
        p.flags = self.conv_layout_flag();
        for n0 in (0..xs.n).step_by(chunk) {
            let nn = chunk.min(xs.n - n0);
            let pc = NnConvParams { n: nn as u32, ..p };
            let dyp = self.addr(&dy) + (n0 * ys.sample_numel() * size_of::<A>()) as u64;
            let dxp = self.addr(&dx) + (n0 * xs.sample_numel() * size_of::<A>()) as u64;
            let args = kargs::NnConvBwdData {
                p: pc,
                dy: In(dyp),
                w: In(wp),
                dx: Out(dxp),
            };
            let grid = (
                grid_x(xs.hw(), TILE)?,
                grid_y(g.in_per_group(), TILE, self.max_yz())?,
                (nn * g.groups) as u32,
            );
            // SAFETY: nn_conv_bwd_data_A(p, dy, w, dx): dy and dx point at sample n0 of
            // buffers holding ys and xs; w holds the weight.
            unsafe { self.launch(&args, grid)? };
        }
        Ok(Some(GpuTensor::wrap(dx)))
    }

    /// A convolution's weight (KCRS floats at `wp`) in A for the im2col GEMMs: `wp` itself for
    /// f32, else a converted copy kept in `keep`.
    pub(super) fn act_weight(&self, wp: u64, n: usize, keep: &mut Vec<PoolBuf<A>>) -> Result<u64> {
        if is_f32::<A>() {
            return Ok(wp);
        }
        let b = self.convert_to_act(wp, n)?;
        let a = self.addr(&b);
        keep.push(b);
        Ok(a)
    }

    pub(super) fn linear_fwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        b: Option<PArg<'_>>,
        out: usize,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let k = s.sample_numel();
        w.check("linear weight", out * k)?;
        if let Some(b) = &b {
            b.check("linear bias", out)?;
        }
        let ys = Shape::try_new(s.n, out, 1, 1)?;
        let mut keep = Vec::new();
        let wp = self.p_addr(w, &mut keep)?;
        let bp = match b {
            Some(b) => self.p_addr(b, &mut keep)?,
            None => 0,
        };
        let y = self.out_t(ys)?;
        let ki = small("linear inputs", k)? as i64;
        // The features in NCHW order (PyTorch's flatten), whatever the layout.
        let xc = self.nchw_copy(x)?;
        let xp = xc.as_ref().map_or(self.addr(&x), |b| self.addr(b));
        // y[n][o] = sum_j x[n][j] W[o][j] + b[o]
        self.gemm(
            false,
            xp,
            (ki, 1),
            wp,
            (1, ki),
            self.addr(&y),
            bp,
            (s.n, out, k),
            false,
        )?;
        Ok(GpuTensor::wrap(y))
    }

    pub(super) fn linear_bwd(
        &self,
        x: &GpuTensor<A>,
        w: PArg<'_>,
        dy: &GpuTensor<A>,
        dw: GArg<'_>,
        db: Option<GArg<'_>>,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let ds = dy.shape();
        let (k, out) = (s.sample_numel(), ds.c);
        same_shape(ds, Shape::new(s.n, out, 1, 1), "linear gradient")?;
        w.check("linear weight", out * k)?;
        dw.check("linear weight gradient", out * k)?;
        if let Some(db) = &db {
            db.check("linear bias gradient", out)?;
        }
        let mut keep = Vec::new();
        let wp = self.p_addr(w, &mut keep)?;
        let (ki, oi) = (
            small("linear inputs", k)? as i64,
            small("linear outputs", out)? as i64,
        );
        if let Some(db) = db {
            let t = self.g_start(db)?;
            self.channel_sum(self.addr(&dy), t.addr, ds, t.accumulate)?;
            self.g_finish(t)?;
        }
        // dW[o][j] += sum_n dy[n][o] x[n][j] (x's features in NCHW order)
        let xc = self.nchw_copy(x)?;
        let xp = xc.as_ref().map_or(self.addr(&x), |b| self.addr(b));
        let t = self.g_start(dw)?;
        self.gemm(
            true,
            self.addr(&dy),
            (1, oi),
            xp,
            (ki, 1),
            t.addr,
            0,
            (out, k, s.n),
            t.accumulate,
        )?;
        self.g_finish(t)?;
        // dx[n][j] = sum_o dy[n][o] W[o][j] (in NCHW order: into a scratch buffer converted
        // after when the layouts differ)
        let dx = self.out_t(s)?;
        let scratch = match xc {
            Some(_) => Some(self.out::<A>(s.numel())?),
            None => None,
        };
        let dxp = scratch.as_ref().map_or(self.addr(&dx), |b| self.addr(b));
        self.gemm(
            false,
            self.addr(&dy),
            (oi, 1),
            wp,
            (ki, 1),
            dxp,
            0,
            (s.n, k, out),
            false,
        )?;
        if let Some(b) = &scratch {
            self.relayout_into(self.addr(b), self.addr(&dx), s, true)?;
        }
        Ok(GpuTensor::wrap(dx))
    }

    /// cuDNN with the workspace bytes of `passes` when it runs this convolution: `None` for the
    /// own kernels (no cuDNN, or with `auto` none of its acceptable algorithms fits; then
    /// nothing has run yet).
    pub(super) fn dnn_for(
        &self,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        passes: &[PassKind],
    ) -> Result<Option<(&Dnn, Vec<usize>)>> {
        let Some(d) = &self.dnn else {
            return Ok(None);
        };
        match d.prepare(&self.dev, xs, ys, g, self.layout, passes) {
            Ok(ws) => Ok(Some((d, ws))),
            Err(Error::Cudnn(_)) if self.dnn_auto => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Runs one cuDNN convolution pass with a workspace of `bytes` from the pool.
    pub(super) fn run_dnn(
        &self,
        d: &Dnn,
        xs: Shape,
        ys: Shape,
        g: &ConvGeom,
        pass: Pass,
        bytes: usize,
    ) -> Result<()> {
        let ws = if bytes > 0 {
            Some(self.take::<f32>(bytes.div_ceil(4))?)
        } else {
            None
        };
        let wp = ws.as_ref().map_or(0, |b| self.addr(b));
        // SAFETY: the callers pass addresses of tensors of xs / ys in this backend's layout and
        // of g's weight (KCRS with NCHW, KRSC with NHWC: dnn_weight, and the filter pass's
        // temporary), in A (the Dnn of a Cuda<A> is opened in A's mode), as `Dnn::run` requires; the
        // workspace holds at least `bytes` bytes.
        unsafe { d.run(&self.dev, xs, ys, g, self.layout, pass, wp, bytes) }
    }

    pub(super) fn conv_params(&self, g: &ConvGeom, xs: Shape, ys: Shape) -> Result<NnConvParams> {
        // Every size, and the products the kernels form, fits a 32-bit signed integer.
        small(
            "output pixels x batch",
            xs.n.saturating_mul(ys.h).saturating_mul(ys.w),
        )?;
        small(
            "padded input pixels",
            xs.h.saturating_add(g.padding)
                .saturating_mul(xs.w.saturating_add(g.padding)),
        )?;
        small(
            "output extent",
            (ys.h.max(ys.w) + 1)
                .saturating_mul(g.stride)
                .saturating_add(g.kernel),
        )?;
        small(
            "output channels per group x taps",
            g.out_per_group()
                .saturating_mul(g.kernel)
                .saturating_mul(g.kernel),
        )?;
        small("groups", g.groups)?;
        if g.groups > self.max_yz() {
            return Err(Error::Shape(format!(
                "{} convolution groups exceed the CUDA grid",
                g.groups
            )));
        }
        Ok(NnConvParams {
            n: small("batch", xs.n)?,
            c: small("input channels", xs.c)?,
            h: small("input height", xs.h)?,
            w: small("input width", xs.w)?,
            oc: small("output channels", ys.c)?,
            oh: small("output height", ys.h)?,
            ow: small("output width", ys.w)?,
            k: small("kernel", g.kernel)?,
            stride: small("stride", g.stride)?,
            pad: small("padding", g.padding)?,
            groups: small("groups", g.groups)?,
            icg: small("input channels per group", g.in_per_group())?,
            ocg: small("output channels per group", g.out_per_group())?,
            kdepth: small(
                "convolution depth",
                g.in_per_group()
                    .saturating_mul(g.kernel)
                    .saturating_mul(g.kernel),
            )?,
            flags: self.conv_layout_flag(),
            reserved: 0,
        })
    }

    /// How many ways to split the weight gradient's depth `k` (samples x output pixels), and
    /// the depth per split (a multiple of the 16-deep K tile): enough blocks for twice the
    /// SMs, each split at least 512 deep.
    pub(super) fn weight_grad_splits(&self, g: &ConvGeom, k: usize) -> (u32, u32) {
        const TK: usize = 16;
        const MIN_DEPTH: usize = 512;
        let tiles = (g.in_per_group() * g.kernel * g.kernel).div_ceil(TILE)
            * g.out_per_group().div_ceil(TILE)
            * g.groups;
        let want = (2 * self.dev.info().sm_count as usize).div_ceil(tiles.max(1));
        let most = (k / MIN_DEPTH).max(1);
        let most = most.min(self.max_yz() / g.groups.max(1)).max(1);
        let splits = want.clamp(1, most);
        let kps = k.div_ceil(splits).div_ceil(TK) * TK;
        let splits = k.div_ceil(kps.max(1)).max(1);
        (splits as u32, kps as u32)
    }

    /// Samples per launch so that samples x groups fits grid.z.
    pub(super) fn sample_chunk(&self, g: &ConvGeom) -> usize {
        (self.max_yz() / g.groups).max(1)
    }

    /// The device's grid.y / grid.z limit.
    pub(super) fn max_yz(&self) -> usize {
        (self.dev.info().max_grid_yz as usize).min(MAX_GRID_YZ)
    }

    #[allow(clippy::too_many_arguments)]
    /// `C (+)= A B (+ bias)`. With `wgrad`, A and B are activations and C an f32 parameter
    /// gradient (`nn_gemm_wgrad`); otherwise A and C are activations and B f32 parameters
    /// (`nn_gemm_act`). All f32 with f32 activations.
    pub(super) fn gemm(
        &self,
        wgrad: bool,
        a: u64,
        (sa_m, sa_k): (i64, i64),
        b: u64,
        (sb_k, sb_n): (i64, i64),
        c: u64,
        bias: u64,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let (mu, nu, ku) = (
            small("GEMM rows", m)?,
            small("GEMM columns", n)?,
            small("GEMM depth", k)?,
        );
        let grid = (grid_x(n, TILE)?, grid_y(m, TILE, self.max_yz())?, 1);
        let (a, b, bias, accumulate) = (In(a), In(b), In(bias), accumulate as u32);
        // SAFETY: the callers pass buffers of at least M*K (A), K*N (B), M*N (C) and N (bias)
        // elements of the kernel's types in the strides given.
        unsafe {
            if wgrad {
                let k = kargs::NnGemmWgrad {
                    A: a,
                    sa_m,
                    sa_k,
                    B: b,
                    sb_k,
                    sb_n,
                    C: Out(c),
                    bias,
                    M: mu,
                    N: nu,
                    K: ku,
                    accumulate,
                };
                self.launch(&k, grid)
            } else {
                let k = kargs::NnGemmAct {
                    A: a,
                    sa_m,
                    sa_k,
                    B: b,
                    sb_k,
                    sb_n,
                    C: Out(c),
                    bias,
                    M: mu,
                    N: nu,
                    K: ku,
                    accumulate,
                };
                self.launch(&k, grid)
            }
        }
    }
}

/// The layout and type conversions around cuDNN's convolutions (weights to KRSC and to the
/// activation type, cuDNN's weight gradient back to f32 KCRS, plain or accumulated) on the
/// emulator, which has no cuDNN: the kernels run here as they would beside it, on poisoned
/// outputs, against a host permutation; every value is exact (one rounding to A, or a widening).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Element;

    fn check<A: NnAct + Element>() {
        let dev = match CudaDevice::emulator() {
            Ok(d) => d,
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        };
        // Grouped, with a rectangular in-per-group x kernel-area block: k = 6, c = 3, rs = 9.
        let g = ConvGeom::new(6, 6, 3, 1, 1, 2).unwrap();
        let (k, c, rs) = (g.out_ch, g.in_per_group(), g.kernel * g.kernel);
        let n = g.weight_len();
        assert_eq!(n, k * c * rs);
        let kcrs = |kk: usize, cc: usize, p: usize| (kk * c + cc) * rs + p;
        let krsc = |kk: usize, cc: usize, p: usize| (kk * rs + p) * c + cc;
        let w = crate::rng::uniform_vec(n, -2.0, 2.0, 7);
        for layout in Layout::ALL {
            let be = Cuda::<A>::open(dev.clone(), ConvChoice::Auto)
                .unwrap()
                .with_layout(layout)
                .with_poison(true);
            let tag = format!("{:?} {layout}", A::DTYPE);
            let wb = be.up(&w).unwrap();
            let wp = be.addr(&wb);

            // f32 -> A, element for element (nn_to_act_A).
            let act = be.convert_to_act(wp, n).unwrap();
            let got: Vec<A> = be.down(&act, n).unwrap();
            for (i, (g, v)) in got.iter().zip(&w).enumerate() {
                assert_eq!(*g, A::from_f32(*v), "{tag} to_act [{i}]");
            }

            // The weight as cuDNN takes it (nn_weight_krsc_A with NHWC).
            let mut keep = Vec::new();
            let dp = be.dnn_weight(wp, &g, &mut keep).unwrap();
            if layout == Layout::Nchw && is_f32::<A>() {
                assert_eq!(dp, wp, "{tag}: f32 NCHW takes the weight in place");
            } else {
                let b = keep.last().expect("a converted copy is kept");
                assert_eq!(dp, be.addr(b));
                let got: Vec<A> = be.down(b, n).unwrap();
                for kk in 0..k {
                    for cc in 0..c {
                        for p in 0..rs {
                            let at = if layout == Layout::Nhwc {
                                krsc(kk, cc, p)
                            } else {
                                kcrs(kk, cc, p)
                            };
                            let want = A::from_f32(w[kcrs(kk, cc, p)]);
                            assert_eq!(got[at], want, "{tag} weight k={kk} c={cc} rs={p}");
                        }
                    }
                }
            }

            // cuDNN's gradient in A (KRSC with NHWC) into the f32 KCRS one (nn_grad_from_krsc_A,
            // nn_grad_from_act_A), written and accumulated.
            let src: Vec<A> = crate::rng::uniform_vec(n, -1.0, 1.0, 11)
                .into_iter()
                .map(A::from_f32)
                .collect();
            let tmp = be.up(&src).unwrap();
            let prior = crate::rng::uniform_vec(n, -1.0, 1.0, 13);
            for accumulate in [false, true] {
                let dst = be.up(&prior).unwrap();
                // SAFETY: dst holds n = g.weight_len() floats, used by this thread only.
                unsafe { be.dnn_grad_to_f32(&tmp, be.addr(&dst), &g, accumulate) }.unwrap();
                let got: Vec<f32> = be.down(&dst, n).unwrap();
                for kk in 0..k {
                    for cc in 0..c {
                        for p in 0..rs {
                            let i = kcrs(kk, cc, p);
                            let from = if layout == Layout::Nhwc {
                                src[krsc(kk, cc, p)]
                            } else {
                                src[i]
                            };
                            let want = if accumulate {
                                prior[i] + from.to_f32()
                            } else {
                                from.to_f32()
                            };
                            assert_eq!(
                                got[i].to_bits(),
                                want.to_bits(),
                                "{tag} gradient accumulate={accumulate} k={kk} c={cc} rs={p}"
                            );
                        }
                    }
                }
            }
            // A buffer shorter than the weight is refused before any launch.
            let short = be.up(&src[..n - 1]).unwrap();
            let dst = be.up(&prior).unwrap();
            // SAFETY: as above.
            let e = unsafe { be.dnn_grad_to_f32(&short, be.addr(&dst), &g, false) };
            assert!(matches!(e, Err(Error::Shape(_))), "{tag}: {e:?}");
        }
    }

    #[test]
    fn emulated_cudnn_conversions_f32() {
        check::<f32>();
    }
    #[test]
    fn emulated_cudnn_conversions_bf16() {
        check::<half::bf16>();
    }
    #[test]
    fn emulated_cudnn_conversions_f16() {
        check::<half::f16>();
    }
}
