//! One call's problem: the pass order a call runs ([`Plan`]), the shapes and weights, and the
//! forward and backward passes over one sample or a group of samples.

use super::*;

/// The pass order one call runs (a resolved [`Schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Groups of this many whole samples per task.
    Grouped(usize),
    /// Each pass over the whole batch.
    Batched,
    /// One sample at a time, each pass split over the threads.
    PerSample,
}

/// One call's shapes and weights, and the passes over one sample or group of samples.
pub(super) struct Problem<'a> {
    pub(super) w1: &'a [f32],
    pub(super) b1: Option<&'a [f32]>,
    pub(super) w2: &'a [f32],
    pub(super) b2: Option<&'a [f32]>,
    pub(super) act: Activation,
    pub(super) gate: Gate,
    pub(super) layout: Layout,
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) d: usize,
    pub(super) hw: usize,
    /// Elements per sample.
    pub(super) sample: usize,
}

/// Backward's read-only inputs.
pub(super) struct BwdArgs<'a, T> {
    pub(super) x: &'a [T],
    pub(super) r: Option<&'a [T]>,
    pub(super) dy: &'a [T],
    pub(super) saved: CpuSavedRef<'a>,
    pub(super) accumulate: bool,
}

impl<'a> Problem<'a> {
    avx2_dispatch! {
        /// z[k] = mean over pixels of channel `c0 + k` of one sample.
        fn squeeze / squeeze_avx2 => squeeze_impl<T>(&self, x: &[T], c0: usize, z: &mut [f32])
    }
    avx2_dispatch! {
        /// y = s * x (or relu(s * x + r)) over whole units of one sample starting at unit
        /// `u0`; `s` is the sample's `[c]` channel weights.
        fn scale / scale_avx2 => scale_impl<T>(
            &self, x: &[T], r: Option<&[T]>, y: &mut [T], u0: usize, s: &[f32]
        )
    }
    pub(super) fn new(w: SeWeightsRef<'a>, sh: Shape, layout: Layout) -> Self {
        Problem {
            w1: w.w1,
            b1: w.b1,
            w2: w.w2,
            b2: w.b2,
            act: w.config.activation,
            gate: w.config.gate,
            layout,
            n: sh.n,
            c: sh.c,
            d: w.config.hidden,
            hw: sh.hw(),
            sample: sh.sample_numel(),
        }
    }

    /// How to order the passes (see [`Schedule`]): forced by [`with_schedule`], else chosen
    /// from the shape. `elem` is the element size in bytes, `inputs` the number of
    /// activation-sized tensors the passes read (x, plus dy and the residual).
    ///
    /// `Auto` runs few samples one at a time and otherwise groups, except that the backward
    /// turns to `Batched` when a group's share of the weights (W1 and W2, 8 C D bytes, read
    /// by the grouped schedule once per group) is at least the group's activation bytes: there
    /// its four GEMMs over the batch beat re-reading the weights per group (ResNet-50's last
    /// stage: 0.89 vs 1.15 ms, benches/NOTES.md). The forward keeps its groups at every
    /// ResNet-50 shape (its batched form re-reads x and measured 15-25% slower).
    pub(super) fn plan(&self, threads: usize, elem: usize, inputs: usize, backward: bool) -> Plan {
        let group_bytes = |g: usize| g * self.sample * elem * inputs;
        let g = (GROUP_BYTES / group_bytes(1).max(1)).clamp(1, TILE);
        let g = g.min((self.n / (2 * threads)).max(1));
        match SCHEDULE.with(|c| c.get()) {
            Schedule::Grouped => Plan::Grouped(g),
            Schedule::Batched => Plan::Batched,
            Schedule::PerSample => Plan::PerSample,
            Schedule::Auto if threads > 1 && self.n < 2 * threads => Plan::PerSample,
            Schedule::Auto if backward && 8 * self.c * self.d >= group_bytes(g) => Plan::Batched,
            Schedule::Auto => Plan::Grouped(g),
        }
    }

    /// Backward scratch floats per sample: ds, dg, dz (`c` each) and du (`d`), stored as four
    /// `[n][..]` regions.
    pub(super) fn scratch_stride(&self) -> usize {
        3 * self.c + self.d
    }

    /// Elements of one parallel unit of a sample: a channel row (NCHW) or a pixel (NHWC).
    pub(super) fn unit(&self) -> usize {
        match self.layout {
            Layout::Nchw => self.hw,
            Layout::Nhwc => self.c,
        }
    }

    /// Units per parallel piece of one sample, for `threads` threads.
    pub(super) fn units_per_task(&self, threads: usize) -> usize {
        let units = self.sample / self.unit();
        let by_size = MIN_TASK_ELEMS.div_ceil(self.unit());
        let by_threads = units.div_ceil(4 * threads);
        by_size.max(by_threads).max(1)
    }

    /// Channels per parallel piece of the NHWC squeeze (strided runs of this many elements).
    pub(super) fn channels_per_task(&self, threads: usize) -> usize {
        self.c.div_ceil(2 * threads).max(64).next_multiple_of(16)
    }

    // ---------------------------------------------------------------- forward passes

    /// z[k] = mean over pixels of channel `c0 + k` of one sample.
    #[inline(always)]
    pub(super) fn squeeze_impl<T: Element>(&self, x: &[T], c0: usize, z: &mut [f32]) {
        let inv = 1.0 / self.hw as f32;
        let mut buf = [0f32; PIECE];
        match self.layout {
            Layout::Nchw => {
                let rows = &x[c0 * self.hw..][..z.len() * self.hw];
                for (zc, row) in z.iter_mut().zip(rows.chunks_exact(self.hw)) {
                    let mut acc = 0.0;
                    for piece in row.chunks(PIECE) {
                        acc += sum(view(piece, &mut buf));
                    }
                    *zc = acc * inv;
                }
            }
            Layout::Nhwc => {
                let cb = z.len();
                z.fill(0.0);
                for pix in x.chunks_exact(self.c) {
                    let seg = &pix[c0..][..cb];
                    for (zp, piece) in z.chunks_mut(PIECE).zip(seg.chunks(PIECE)) {
                        add_to(zp, view(piece, &mut buf));
                    }
                }
                z.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }

    /// [`Self::squeeze`] of a whole sample, split over the threads.
    pub(super) fn squeeze_par<T: Element>(&self, x: &[T], z: &mut [f32], threads: usize) {
        let per = match self.layout {
            Layout::Nchw => self.units_per_task(threads),
            Layout::Nhwc => self.channels_per_task(threads),
        };
        z.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, zc)| self.squeeze(x, i * per, zc));
    }

    /// The excitation for `m` samples: `z` is `[m][c]`; writes h, u (`[m][d]`) and s (`[m][c]`).
    /// Each weight row is read once per call and shared by up to four samples' dot products.
    pub(super) fn excite(&self, z: &[f32], h: &mut [f32], u: &mut [f32], s: &mut [f32]) {
        let (c, d) = (self.c, self.d);
        fc(self.w1, self.b1, c, z, h, d);
        u.copy_from_slice(h);
        act_slice(self.act, u);
        fc(self.w2, self.b2, d, u, s, c);
        gate_slice(self.gate, s);
    }

    /// [`Self::excite`] for the whole batch: each FC reads its weights once for all samples
    /// ([`fc_batch`]), split over the threads by blocks of weight rows.
    pub(super) fn excite_batch(
        &self,
        z: &[f32],
        h: &mut [f32],
        u: &mut [f32],
        s: &mut [f32],
        threads: usize,
    ) {
        let (c, d) = (self.c, self.d);
        fc_batch(self.w1, self.b1, c, z, h, d, threads);
        u.copy_from_slice(h);
        act_slice(self.act, u);
        fc_batch(self.w2, self.b2, d, u, s, c, threads);
        gate_slice(self.gate, s);
    }

    /// y = s * x (or relu(s * x + r)) over whole units of one sample starting at unit `u0`;
    /// `s` is the sample's `[c]` channel weights.
    #[inline(always)]
    pub(super) fn scale_impl<T: Element>(
        &self,
        x: &[T],
        r: Option<&[T]>,
        y: &mut [T],
        u0: usize,
        s: &[f32],
    ) {
        let mut bufs = Bufs::new();
        let unit = self.unit();
        for (i, yu) in y.chunks_mut(unit).enumerate() {
            let xu = &x[i * unit..][..unit];
            let ru = r.map(|r| &r[i * unit..][..unit]);
            match self.layout {
                Layout::Nchw => fwd_seg(xu, ru, yu, s[u0 + i], &mut bufs),
                Layout::Nhwc => fwd_seg(xu, ru, yu, s, &mut bufs),
            }
        }
    }

    /// [`Self::scale`] of a whole sample, split over the threads.
    pub(super) fn scale_par<T: Element>(
        &self,
        x: &[T],
        r: Option<&[T]>,
        y: &mut [T],
        s: &[f32],
        threads: usize,
    ) {
        let upt = self.units_per_task(threads);
        let step = upt * self.unit();
        y.par_chunks_mut(step).enumerate().for_each(|(i, yc)| {
            let xc = &x[i * step..][..yc.len()];
            let rc = r.map(|r| &r[i * step..][..yc.len()]);
            self.scale(xc, rc, yc, i * upt, s);
        });
    }

    // ---------------------------------------------------------------- backward passes

    /// Backward over every sample: fills dx (and d residual) and the per-sample scratch rows
    /// (ds, dg, dz, du) that [`Self::param_grads`] reads.
    pub(super) fn backward<T: Element>(
        &self,
        a: &BwdArgs<'_, T>,
        dx: &mut [T],
        dres: Option<&mut [T]>,
        scratch: &mut [f32],
    ) {
        let (se, c, d) = (self.sample, self.c, self.d);
        let threads = rayon::current_num_threads();
        let inputs = if a.r.is_some() { 3 } else { 2 };
        let (ds, rest) = scratch.split_at_mut(self.n * c);
        let (dg, rest) = rest.split_at_mut(self.n * c);
        let (dz, du) = rest.split_at_mut(self.n * c);
        let g = match self.plan(threads, size_of::<T>(), inputs, true) {
            Plan::Grouped(g) => g,
            Plan::Batched => {
                // ds for every sample, the excitation's backward as GEMMs over the batch, then
                // dx (and d residual) for every sample.
                ds.par_chunks_mut(c)
                    .enumerate()
                    .for_each(|(n, dsn)| self.dsum(&Sample::of(a, n, se, c), 0, dsn));
                let mut e = Excited { ds, dg, dz, du };
                self.dexcite(a.saved.h, a.saved.s, &mut e, threads);
                let dz = &*e.dz;
                let one = |n: usize, dxn: &mut [T], drn: Option<&mut [T]>| {
                    let dzn = &dz[n * c..][..c];
                    self.dscale(&Sample::of(a, n, se, c), 0, dzn, dxn, drn, a.accumulate)
                };
                match dres {
                    Some(dr) => dx
                        .par_chunks_mut(se)
                        .zip(dr.par_chunks_mut(se))
                        .enumerate()
                        .for_each(|(n, (dxn, drn))| one(n, dxn, Some(drn))),
                    None => dx
                        .par_chunks_mut(se)
                        .enumerate()
                        .for_each(|(n, dxn)| one(n, dxn, None)),
                }
                return;
            }
            Plan::PerSample => {
                // One sample at a time, each pass split over the threads.
                let mut dres = dres;
                for n in 0..self.n {
                    let one = Sample::of(a, n, se, c);
                    let (rc, rd) = (n * c..(n + 1) * c, n * d..(n + 1) * d);
                    let mut e = Excited {
                        ds: &mut ds[rc.clone()],
                        dg: &mut dg[rc.clone()],
                        dz: &mut dz[rc],
                        du: &mut du[rd.clone()],
                    };
                    self.dsum_par(&one, e.ds, threads);
                    self.dexcite(&a.saved.h[rd], one.s, &mut e, threads);
                    let dxn = &mut dx[n * se..][..se];
                    let drn = dres.as_deref_mut().map(|d| &mut d[n * se..][..se]);
                    self.dscale_par(&one, e.dz, dxn, drn, a.accumulate, threads);
                }
                return;
            }
        };
        let task = |gi: usize, dx: &mut [T], mut dres: Option<&mut [T]>, mut e: Excited<'_>| {
            let n0 = gi * g;
            let m = e.dg.len() / c;
            for k in 0..m {
                let one = Sample::of(a, n0 + k, se, c);
                self.dsum(&one, 0, &mut e.ds[k * c..][..c]);
            }
            let h = &a.saved.h[n0 * d..][..m * d];
            let s = &a.saved.s[n0 * c..][..m * c];
            self.dexcite(h, s, &mut e, 1);
            for k in 0..m {
                let one = Sample::of(a, n0 + k, se, c);
                let dxk = &mut dx[k * se..][..se];
                let drk = dres.as_deref_mut().map(|d| &mut d[k * se..][..se]);
                self.dscale(&one, 0, &e.dz[k * c..][..c], dxk, drk, a.accumulate);
            }
        };
        let regions = ds
            .par_chunks_mut(g * c)
            .zip(dg.par_chunks_mut(g * c))
            .zip(dz.par_chunks_mut(g * c))
            .zip(du.par_chunks_mut(g * d))
            .map(|(((ds, dg), dz), du)| Excited { ds, dg, dz, du });
        match dres {
            Some(dr) => dx
                .par_chunks_mut(g * se)
                .zip(dr.par_chunks_mut(g * se))
                .zip(regions)
                .enumerate()
                .for_each(|(gi, ((dx, dr), e))| task(gi, dx, Some(dr), e)),
            None => dx
                .par_chunks_mut(g * se)
                .zip(regions)
                .enumerate()
                .for_each(|(gi, (dx, e))| task(gi, dx, None, e)),
        }
    }

    /// ds[k] = sum over pixels of g * x for channel `c0 + k` of one sample, g = dy through the
    /// epilogue's mask.
    pub(super) fn dsum<T: Element>(&self, one: &Sample<'_, T>, c0: usize, ds: &mut [f32]) {
        let mut bufs = Bufs::new();
        let hw = self.hw;
        match self.layout {
            Layout::Nchw => {
                for (k, dsk) in ds.iter_mut().enumerate() {
                    let at = (c0 + k) * hw;
                    let r = one.r.map(|r| &r[at..][..hw]);
                    *dsk = dsum_seg(
                        &one.x[at..][..hw],
                        r,
                        &one.dy[at..][..hw],
                        one.s[c0 + k],
                        &mut bufs,
                    );
                }
            }
            Layout::Nhwc => {
                let (c, cb) = (self.c, ds.len());
                ds.fill(0.0);
                for p in 0..hw {
                    let at = p * c + c0;
                    let r = one.r.map(|r| &r[at..][..cb]);
                    let s = &one.s[c0..][..cb];
                    dsum_cols(&one.x[at..][..cb], r, &one.dy[at..][..cb], s, ds, &mut bufs);
                }
            }
        }
    }

    /// [`Self::dsum`] of a whole sample, split over the threads.
    pub(super) fn dsum_par<T: Element>(&self, one: &Sample<'_, T>, ds: &mut [f32], threads: usize) {
        let per = match self.layout {
            Layout::Nchw => self.units_per_task(threads),
            Layout::Nhwc => self.channels_per_task(threads),
        };
        ds.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, dc)| self.dsum(one, i * per, dc));
    }

    /// The excitation's backward for `m` samples (`e.ds` filled, `[m][c]`): writes dg, du and
    /// dz / hw. `h` is `[m][d]`, `s` is `[m][c]`. du and dz are one GEMM each over the `m`
    /// samples, split over `threads` when large enough (the batched schedule passes the whole
    /// batch; a group's task passes 1).
    pub(super) fn dexcite(&self, h: &[f32], s: &[f32], e: &mut Excited<'_>, threads: usize) {
        let (c, d) = (self.c, self.d);
        let m = e.dg.len() / c;
        for ((g, &dsv), &sv) in e.dg.iter_mut().zip(e.ds.iter()).zip(s) {
            *g = dsv * gate_grad(self.gate, sv);
        }
        // du = (dg W2) * act'(h), then dz / hw = (du W1) / hw: W2 is [c][d], W1 is [d][c].
        let w2 = (self.w2, d as isize, 1);
        let par = gemm_par(m * c * d, threads);
        sgemm(m, d, c, e.du, (&*e.dg, c as isize, 1), w2, false, par);
        for (v, &hv) in e.du.iter_mut().zip(h) {
            *v *= act_grad(self.act, hv);
        }
        let (w1, inv) = ((self.w1, c as isize, 1), 1.0 / self.hw as f32);
        sgemm_scaled(m, c, d, e.dz, (&*e.du, d as isize, 1), w1, false, inv, par);
    }

    /// dx = g * s + dz / hw (plus dx's old value with `accumulate`) and d residual = g over
    /// whole units of one sample starting at unit `u0`; `dzh` is the sample's `[c]` dz / hw.
    pub(super) fn dscale<T: Element>(
        &self,
        one: &Sample<'_, T>,
        u0: usize,
        dzh: &[f32],
        dx: &mut [T],
        mut dres: Option<&mut [T]>,
        accumulate: bool,
    ) {
        let mut bufs = Bufs::new();
        let unit = self.unit();
        let base = u0 * unit;
        for (i, dxu) in dx.chunks_mut(unit).enumerate() {
            let at = base + i * unit;
            let x = &one.x[at..][..unit];
            let r = one.r.map(|r| &r[at..][..unit]);
            let dy = &one.dy[at..][..unit];
            let dr = dres.as_deref_mut().map(|d| &mut d[i * unit..][..unit]);
            match self.layout {
                Layout::Nchw => {
                    let cc = u0 + i;
                    dx_seg(x, r, dy, one.s[cc], dzh[cc], dxu, dr, accumulate, &mut bufs)
                }
                Layout::Nhwc => dx_seg(x, r, dy, one.s, dzh, dxu, dr, accumulate, &mut bufs),
            }
        }
    }

    /// [`Self::dscale`] of a whole sample, split over the threads.
    pub(super) fn dscale_par<T: Element>(
        &self,
        one: &Sample<'_, T>,
        dzh: &[f32],
        dx: &mut [T],
        dres: Option<&mut [T]>,
        accumulate: bool,
        threads: usize,
    ) {
        let upt = self.units_per_task(threads);
        let step = upt * self.unit();
        match dres {
            Some(dr) => dx
                .par_chunks_mut(step)
                .zip(dr.par_chunks_mut(step))
                .enumerate()
                .for_each(|(i, (dxc, drc))| {
                    self.dscale(one, i * upt, dzh, dxc, Some(drc), accumulate)
                }),
            None => dx
                .par_chunks_mut(step)
                .enumerate()
                .for_each(|(i, dxc)| self.dscale(one, i * upt, dzh, dxc, None, accumulate)),
        }
    }

    /// dW1, dW2 (and the biases') from every sample's dg and du in `scratch`, batched over the
    /// samples and split over the threads by blocks of output rows.
    pub(super) fn param_grads(&self, saved: &CpuSavedRef, scratch: &[f32], grads: &mut SeGradsMut) {
        let (c, d, n) = (self.c, self.d, self.n);
        let dg = &scratch[n * c..][..n * c];
        let du = &scratch[3 * n * c..][..n * d];
        let par = gemm_par(n * c * d, rayon::current_num_threads());
        // dW2 = dg^T u ([c][d]) and dW1 = du^T z ([d][c]), the transposes read in place.
        let (ci, di) = (c as isize, d as isize);
        sgemm(
            c,
            d,
            n,
            grads.dw2,
            (dg, 1, ci),
            (saved.u, di, 1),
            false,
            par,
        );
        sgemm(
            d,
            c,
            n,
            grads.dw1,
            (du, 1, di),
            (saved.z, ci, 1),
            false,
            par,
        );
        if let Some(db2) = grads.db2.as_deref_mut() {
            db2.fill(0.0);
            for k in 0..n {
                add_to(db2, &dg[k * c..][..c]);
            }
        }
        if let Some(db1) = grads.db1.as_deref_mut() {
            db1.fill(0.0);
            for k in 0..n {
                add_to(db1, &du[k * d..][..d]);
            }
        }
    }
}

/// Backward's per-sample excitation gradients for a run of samples, each `[m][..]`.
pub(super) struct Excited<'e> {
    /// sum over pixels of g * x, `[m][c]`.
    pub(super) ds: &'e mut [f32],
    /// ds * gate', `[m][c]`.
    pub(super) dg: &'e mut [f32],
    /// dz / hw, `[m][c]`.
    pub(super) dz: &'e mut [f32],
    /// d loss / d h, `[m][d]`.
    pub(super) du: &'e mut [f32],
}

/// One sample's backward inputs.
pub(super) struct Sample<'a, T> {
    pub(super) x: &'a [T],
    pub(super) r: Option<&'a [T]>,
    pub(super) dy: &'a [T],
    pub(super) s: &'a [f32],
}

impl<'a, T: Element> Sample<'a, T> {
    pub(super) fn of(a: &BwdArgs<'a, T>, n: usize, se: usize, c: usize) -> Self {
        Sample {
            x: &a.x[n * se..][..se],
            r: a.r.map(|r| &r[n * se..][..se]),
            dy: &a.dy[n * se..][..se],
            s: &a.saved.s[n * c..][..c],
        }
    }
}
