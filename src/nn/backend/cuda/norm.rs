//! BatchNorm on the device: statistics, the affine pass, backward in both layouts (NHWC
//! through split per-channel reductions added in a fixed order).

use super::*;

/// What the device BatchNorm forward keeps for backward: the mean and invstd it normalised
/// with (batch or running), in device memory.
pub(super) struct CudaBnSaved {
    pub(super) mean: PoolBuf<f64>,
    pub(super) invstd: PoolBuf<f64>,
    pub(super) batch_stats: bool,
}

impl<A: NnAct> Cuda<A> {
    /// `y = a[c] x + b[c]` (then ReLU) with `a`, `b` at device addresses (`a` = 0: a bias add).
    pub(super) fn affine_at(
        &self,
        x: &GpuTensor<A>,
        ap: u64,
        bp: u64,
        relu: bool,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let y = self.out_t(s)?;
        let (xp, yp) = (self.addr(&x), self.addr(&y));
        let (total, c, hw, r, nhwc) = (
            s.numel() as u64,
            small("channels", s.c)?,
            s.hw() as u64,
            relu as u32,
            self.nhwc(),
        );
        let args = kargs::NnAffine {
            x: In(xp),
            y: Out(yp),
            a: In(ap),
            b: In(bp),
            total,
            c,
            hw,
            relu: r,
            nhwc,
        };
        // SAFETY: nn_affine_A(x, y, a, b, total, c, hw, relu, nhwc): x, y hold `total` elements of
        // A, b holds c floats and a does too or is null (the callers' contract).
        unsafe { self.launch_flat(&args, s.numel())? };
        Ok(GpuTensor::wrap(y))
    }

    /// BatchNorm backward, with `relu_y` the output of a fused ReLU (masks dy).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_backward(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        same_shape(dy.shape(), s, "batch norm gradient")?;
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
        let (mb, ib, gb) = (self.up(mean)?, self.up(invstd)?, self.up(gamma)?);
        let (dgb, dbb) = (self.up(dgamma)?, self.up(dbeta)?);
        let per_channel = [
            self.addr(&mb),
            self.addr(&ib),
            self.addr(&gb),
            self.addr(&dgb),
            self.addr(&dbb),
        ];
        let dx = self.bn_bwd_at(x, relu_y, dy, per_channel, batch_stats)?;
        dgamma.copy_from_slice(&self.down(&dgb, s.c)?);
        dbeta.copy_from_slice(&self.down(&dbb, s.c)?);
        Ok(dx)
    }

    /// The BatchNorm backward kernel on device addresses `[mean, invstd, gamma, dgamma,
    /// dbeta]` (c elements each; dgamma and dbeta are added to).
    pub(super) fn bn_bwd_at(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        per_channel: [u64; 5],
        batch_stats: bool,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        same_shape(dy.shape(), s, "batch norm gradient")?;
        if let Some(y) = relu_y {
            same_shape(y.shape(), s, "batch norm fused ReLU output")?;
        }
        let dx = self.out_t(s)?;
        let [mp, ip, gp, dgp, dbp] = per_channel;
        if self.layout == Layout::Nhwc {
            return self.bn_bwd_nhwc(x, relu_y, dy, per_channel, batch_stats, dx);
        }
        let ptrs = [
            self.addr(&x),
            self.addr(&dy),
            relu_y.map_or(0, |y| self.addr(&y)),
            mp,
            ip,
            gp,
            dgp,
            dbp,
            self.addr(&dx),
        ];
        let (n, c, hw, bs) = (
            small("batch", s.n)?,
            small("channels", s.c)?,
            s.hw() as u64,
            batch_stats as u32,
        );
        let args = kargs::NnBnBwd {
            x: In(ptrs[0]),
            dy: In(ptrs[1]),
            relu_y: In(ptrs[2]),
            mean: In(ptrs[3]),
            invstd: In(ptrs[4]),
            gamma: In(ptrs[5]),
            dgamma: Out(ptrs[6]),
            dbeta: Out(ptrs[7]),
            dx: Out(ptrs[8]),
            n,
            c,
            hw,
            batch_stats: bs,
        };
        // SAFETY: nn_bn_bwd_A(x, dy, relu_y, mean, invstd, gamma, dgamma, dbeta, dx, n, c,
        // hw, batch_stats), NCHW: x, dy, dx (and relu_y) hold s (checked above); the per-channel
        // buffers hold c elements each (the callers' contract).
        unsafe { self.launch(&args, (c.max(1), 1, 1))? };
        Ok(GpuTensor::wrap(dx))
    }

    /// BatchNorm backward for NHWC activations: split partial sums of d and d xhat, added in
    /// order into f64 per-channel sums (and into dbeta, dgamma), then dx elementwise.
    pub(super) fn bn_bwd_nhwc(
        &self,
        x: &GpuTensor<A>,
        relu_y: Option<&GpuTensor<A>>,
        dy: &GpuTensor<A>,
        [mp, ip, gp, dgp, dbp]: [u64; 5],
        batch_stats: bool,
        dx: Pooled<A>,
    ) -> Result<GpuTensor<A>> {
        let s = x.shape();
        let rows = s.n * s.hw();
        let (rps, splits) = self.nhwc_splits(rows);
        let part = self.out::<f64>(2 * splits as usize * s.c)?;
        let sd = self.out::<f64>(s.c)?;
        let sdx = self.out::<f64>(s.c)?;
        let (xp, dyp, ryp, pp) = (
            self.addr(&x),
            self.addr(&dy),
            relu_y.map_or(0, |y| self.addr(&y)),
            self.addr(&part),
        );
        let (rows_u, c) = (rows as u64, small("channels", s.c)?);
        let args = kargs::NnNhwcBnBwdPartial {
            x: In(xp),
            dy: In(dyp),
            relu_y: In(ryp),
            mean: In(mp),
            invstd: In(ip),
            part: Out(pp),
            rows: rows_u,
            c,
            rps,
            splits,
        };
        // SAFETY: nn_nhwc_bn_bwd_partial_A(x, dy, relu_y, mean, invstd, part, rows, c, rps,
        // splits): x, dy (and relu_y) hold rows * c elements of A (shapes checked by the
        // caller), mean and invstd c doubles, part 2 * splits * c doubles.
        unsafe { self.launch(&args, (s.c.div_ceil(32) as u32, splits, 1))? };
        let second = pp + (splits as usize * s.c * size_of::<f64>()) as u64;
        self.nhwc_finish(pp, splits, s.c, 1.0, self.addr(&sd), dbp, true)?;
        self.nhwc_finish(second, splits, s.c, 1.0, self.addr(&sdx), dgp, true)?;
        let (sdp, sdxp, dxp) = (self.addr(&sd), self.addr(&sdx), self.addr(&dx));
        let (total, m, bs) = (s.numel() as u64, rows as f64, batch_stats as u32);
        let args = kargs::NnNhwcBnBwdApply {
            x: In(xp),
            dy: In(dyp),
            relu_y: In(ryp),
            mean: In(mp),
            invstd: In(ip),
            gamma: In(gp),
            sd: In(sdp),
            sdx: In(sdxp),
            dx: Out(dxp),
            total,
            c,
            m,
            batch_stats: bs,
        };
        // SAFETY: nn_nhwc_bn_bwd_apply_A(x, dy, relu_y, mean, invstd, gamma, sd, sdx, dx,
        // total, c, m, batch_stats): x, dy, relu_y and dx hold total elements of A, the
        // per-channel buffers c each.
        unsafe { self.launch_flat(&args, s.numel())? };
        Ok(GpuTensor::wrap(dx))
    }

    /// Rows per split and splits of the NHWC per-channel reductions over `rows` rows (pixels
    /// of every sample): splits of 512 rows, fewer where the grid would overflow. A function
    /// of the shape only (below the emulator's smaller grid limit, 512 Ki rows: beyond it the
    /// emulator splits differently from a GPU), so results do not depend on the device.
    pub(super) fn nhwc_splits(&self, rows: usize) -> (u64, u32) {
        const MIN_ROWS: usize = 512;
        let splits = rows
            .div_ceil(MIN_ROWS)
            .clamp(1, MAX_GRID_YZ.min(self.max_yz()));
        let rps = rows.div_ceil(splits).max(1);
        (rps as u64, rows.div_ceil(rps).max(1) as u32)
    }

    /// Per-channel partial sums over split rows of the NHWC activation of shape `s` at `x` (of
    /// squared deviations from the f64 `mean` at that address, when not 0): a pooled buffer of
    /// splits * c doubles, and the splits.
    pub(super) fn nhwc_partial(&self, x: u64, mean: u64, s: Shape) -> Result<(PoolBuf<f64>, u32)> {
        let rows = s.n * s.hw();
        let (rps, splits) = self.nhwc_splits(rows);
        let part = self.out::<f64>(splits as usize * s.c)?;
        let (pp, rows, c) = (self.addr(&part), rows as u64, small("channels", s.c)?);
        let args = kargs::NnNhwcPartial {
            x: In(x),
            mean: In(mean),
            part: Out(pp),
            rows,
            c,
            rps,
        };
        // SAFETY: nn_nhwc_partial_A(x, mean, part, rows, c, rps): x holds rows * c elements of
        // A, mean c doubles (or is null), part splits * c doubles; the grid covers c / 32 x
        // splits blocks of rps rows.
        unsafe { self.launch(&args, (s.c.div_ceil(32) as u32, splits, 1))? };
        Ok((part, splits))
    }

    /// Adds the splits of an NHWC partial-sum buffer at `part` in order: `out_d` (f64, divided
    /// by `div`) and / or `out_f` (f32, added when `accumulate`), each skipped at address 0.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn nhwc_finish(
        &self,
        part: u64,
        splits: u32,
        c: usize,
        div: f64,
        out_d: u64,
        out_f: u64,
        accumulate: bool,
    ) -> Result<()> {
        let (cu, acc) = (small("channels", c)?, accumulate as u32);
        let args = kargs::NnNhwcFinish {
            part: In(part),
            splits,
            c: cu,
            div,
            out_d: Out(out_d),
            out_f: Out(out_f),
            accumulate: acc,
        };
        // SAFETY: nn_nhwc_finish(part, splits, c, div, out_d, out_f, accumulate): part holds
        // splits * c doubles, out_d c doubles and out_f c floats where not null.
        unsafe { self.launch(&args, (blocks(c, THREADS as usize), 1, 1)) }
    }

    /// Per-channel batch mean and biased variance (f64) of `x`, left on the device.
    pub(super) fn bn_stats_dev(&self, x: &GpuTensor<A>) -> Result<(PoolBuf<f64>, PoolBuf<f64>)> {
        let s = x.shape();
        let mean = self.out::<f64>(s.c)?;
        let var = self.out::<f64>(s.c)?;
        let (xp, mp, vp) = (self.addr(&x), self.addr(&mean), self.addr(&var));
        if self.layout == Layout::Nhwc {
            // Two passes, as the NCHW kernel: the mean, then squared deviations from it.
            let m = (s.n * s.hw()) as f64;
            let (part, splits) = self.nhwc_partial(xp, 0, s)?;
            self.nhwc_finish(self.addr(&part), splits, s.c, m, mp, 0, false)?;
            let (part, splits) = self.nhwc_partial(xp, mp, s)?;
            self.nhwc_finish(self.addr(&part), splits, s.c, m, vp, 0, false)?;
            return Ok((mean, var));
        }
        let (n, c, hw) = (small("batch", s.n)?, small("channels", s.c)?, s.hw() as u64);
        let args = kargs::NnBnStats {
            x: In(xp),
            mean: Out(mp),
            var: Out(vp),
            n,
            c,
            hw,
        };
        // SAFETY: nn_bn_stats_A(x, mean, var, n, c, hw): x holds s (NCHW), mean and var c
        // doubles.
        unsafe { self.launch(&args, (c.max(1), 1, 1))? };
        Ok((mean, var))
    }

    /// out[c] (+)= sum over samples and positions of a (per-channel sums of an activation of
    /// shape `s` in this backend's layout).
    pub(super) fn channel_sum(&self, a: u64, out: u64, s: Shape, accumulate: bool) -> Result<()> {
        if self.layout == Layout::Nhwc {
            let (part, splits) = self.nhwc_partial(a, 0, s)?;
            return self.nhwc_finish(self.addr(&part), splits, s.c, 1.0, 0, out, accumulate);
        }
        let (n, c, hw, acc) = (
            small("batch", s.n)?,
            small("channels", s.c)?,
            s.hw() as u64,
            accumulate as u32,
        );
        let args = kargs::NnChannelSum {
            a: In(a),
            out: Out(out),
            n,
            c,
            hw,
            accumulate: acc,
        };
        // SAFETY: nn_channel_sum_A(a, out, n, c, hw, accumulate); a holds s.numel() elements
        // of A (NCHW), out s.c floats.
        unsafe { self.launch(&args, (c.max(1), 1, 1)) }
    }
}
