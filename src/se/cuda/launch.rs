//! The kernel sequences of the SE op over raw device addresses, and the workspace they use.
//!
//! Every sequence runs in one of two [`Mode`]s: `Run` queues the launches, `Size` walks the same
//! code without launching and records what each launch needs of the workspace (split partials,
//! tickets), so [`workspace_bytes`](super::workspace_bytes) and the launches cannot disagree.

use super::{chunk_samples, SeOptions, SePath, CLUSTER, FUSED_THREADS, STAGE_BYTES};
use super::{cluster_smem_bytes, Direction};
use crate::cuda::abi::{self, SeGemmParams, SeParams};
use crate::cuda::kargs::{self, In, Kernel, Out};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::se::SeConfig;
use crate::tensor::{Layout, Shape};
use std::cell::Cell;

/// What one call needs of the workspace: tickets (u32), split partials (f32), and backward's
/// intermediates dg, du, dz (f32 each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Need {
    pub(super) tickets: usize,
    pub(super) partials: usize,
    pub(super) inter: [usize; 3],
}

/// Workspace regions start on this alignment; a workspace may start anywhere (one alignment's
/// worth of slack is counted in).
const ALIGN: usize = 256;
/// Most splits of H*W per (sample, channel tile) in the NHWC squeeze: enough blocks for a
/// batch-1 stage-1 tensor (64 x 49 pixels at 1x256x56x56), a short final sum.
const NHWC_MAX_SPLITS: usize = 64;

fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

impl Need {
    /// With a launch's tickets and partials taken into the maxima.
    fn with(self, tickets: usize, partials: usize) -> Need {
        Need {
            tickets: self.tickets.max(tickets),
            partials: self.partials.max(partials),
            ..self
        }
    }

    /// The larger of two needs, field by field.
    pub(super) fn max(self, o: Need) -> Need {
        Need {
            tickets: self.tickets.max(o.tickets),
            partials: self.partials.max(o.partials),
            inter: [0, 1, 2].map(|i| self.inter[i].max(o.inter[i])),
        }
    }

    /// Bytes of workspace this need takes, wherever the workspace starts.
    pub(super) fn bytes(&self) -> usize {
        ALIGN
            + aligned(self.tickets * 4)
            + aligned(self.partials * 4)
            + self.inter.iter().map(|&f| aligned(f * 4)).sum::<usize>()
    }

    /// The regions of a workspace starting at `base`.
    pub(super) fn carve(&self, base: u64) -> Regions {
        let mut at = base.div_ceil(ALIGN as u64) * ALIGN as u64;
        let mut take = |bytes: usize| {
            let p = at;
            at += aligned(bytes) as u64;
            p
        };
        Regions {
            tickets: take(self.tickets * 4),
            partials: take(self.partials * 4),
            dg: take(self.inter[0] * 4),
            du: take(self.inter[1] * 4),
            dz: take(self.inter[2] * 4),
        }
    }
}

/// Where a call's scratch lives in its workspace.
#[derive(Clone, Copy, Debug)]
pub(super) struct Regions {
    pub(super) tickets: u64,
    pub(super) partials: u64,
    pub(super) dg: u64,
    pub(super) du: u64,
    pub(super) dz: u64,
}

/// One squeeze / dgate launch: kernel, grid, block, what it needs of the workspace, parameters.
/// Which squeeze (or dgate) kernel a reduction runs.
#[derive(Clone, Copy, Debug)]
enum Reduce {
    NchwStaged,
    NchwRows,
    Nhwc,
    NhwcVec,
}

struct ReducePlan {
    kernel: Reduce,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    tickets: usize,
    partials: usize,
    params: SeParams,
}

/// Whether a launch sequence runs, or only measures the workspace it needs.
pub(super) enum Mode<'a> {
    /// Records each launch's needs; launches nothing (operand addresses are placeholders).
    Size(&'a Cell<Need>),
    /// Launches, with the split partials and tickets in these workspace regions.
    Run(Regions),
}

/// Everything a launch sequence needs: the device, the dtype's kernel suffix and size, the
/// problem, and where its scratch lives.
pub(super) struct Ctx<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) suffix: &'static str,
    pub(super) esize: usize,
    pub(super) cfg: SeConfig,
    pub(super) hw: usize,
    pub(super) layout: Layout,
    pub(super) mode: Mode<'a>,
}

pub(super) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernels' 32-bit limit")))
}

/// True when every non-null pointer shares one 16-byte phase.
fn same_phase(ptrs: &[u64]) -> bool {
    let mut it = ptrs.iter().filter(|&&p| p != 0).map(|p| p & 15);
    match it.next() {
        Some(first) => it.all(|p| p == first),
        None => true,
    }
}

impl Ctx<'_> {
    fn base_params(&self, n: usize) -> SeParams {
        SeParams {
            n: n as u64,
            hw: self.hw as u64,
            hw_split: self.hw as u64,
            c: self.cfg.channels as u32,
            hidden: self.cfg.hidden as u32,
            layout: match self.layout {
                Layout::Nchw => abi::SENET_LAYOUT_NCHW,
                Layout::Nhwc => abi::SENET_LAYOUT_NHWC,
            },
            act: match self.cfg.activation {
                crate::se::Activation::Relu => abi::SENET_ACT_RELU,
                crate::se::Activation::Silu => abi::SENET_ACT_SILU,
            },
            gate: match self.cfg.gate {
                crate::se::Gate::Sigmoid => abi::SENET_GATE_SIGMOID,
                crate::se::Gate::HardSigmoid => abi::SENET_GATE_HARDSIGMOID,
            },
            flags: if self.cfg.bias {
                abi::SENET_FLAG_BIAS
            } else {
                0
            },
            splits: 1,
            rows: 0,
            inv_hw: 1.0 / self.hw as f32,
            reserved: 0,
        }
    }

    fn sms(&self) -> usize {
        self.dev.info().sm_count as usize
    }

    /// The device's grid.y / grid.z limit.
    fn max_yz(&self) -> usize {
        self.dev.info().max_grid_yz as usize
    }

    /// The addresses of the split partials and the tickets (placeholders when sizing).
    fn scratch(&self) -> (u64, u64) {
        match &self.mode {
            Mode::Run(r) => (r.partials, r.tickets),
            Mode::Size(_) => (0, 0),
        }
    }

    /// Squeeze (pool) or its gradient (dgate) over `n` samples.
    /// Pool: ins = [x], outs: out = z. Grad: ins = [dy, x, r, s], dres, out = dg.
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        grad: bool,
        n: usize,
        dy: u64,
        x: u64,
        r: u64,
        s: u64,
        dres: u64,
        out: u64,
    ) -> Result<()> {
        let plan = |aligned: bool| -> Result<ReducePlan> {
            let mut p = self.base_params(n);
            let (c, hw, esize) = (self.cfg.channels, self.hw, self.esize);
            let v = 16 / esize;
            if r != 0 {
                p.flags |= abi::SENET_FLAG_RESIDUAL;
            }
            let (kernel, grid, block, tickets, ws) = match self.layout {
                Layout::Nchw => {
                    if same_phase(&[dy, x, r, dres]) {
                        p.flags |= abi::SENET_FLAG_VEC;
                    }
                    let rows = n * c;
                    if hw * esize <= 2048 {
                        let per = (STAGE_BYTES / (hw * esize)).max(1);
                        p.rows = u32_of(per, "rows per block")?;
                        let blocks = rows.div_ceil(per);
                        (
                            Reduce::NchwStaged,
                            (u32_of(blocks, "blocks")?, 1, 1),
                            (256, 1, 1),
                            0,
                            0,
                        )
                    } else {
                        let blocks = rows.div_ceil(8);
                        let want = if blocks < 2 * self.sms() {
                            (2 * self.sms()).div_ceil(blocks)
                        } else {
                            1
                        };
                        let max_splits = hw.div_ceil(32 * v * 4).max(1);
                        let splits = want.clamp(1, max_splits.min(self.max_yz()));
                        let per = hw.div_ceil(splits).div_ceil(8) * 8;
                        let splits = hw.div_ceil(per);
                        p.splits = splits as u32;
                        p.hw_split = per as u64;
                        let ws = if splits > 1 { splits * rows } else { 0 };
                        (
                            Reduce::NchwRows,
                            (u32_of(blocks, "blocks")?, splits as u32, 1),
                            (256, 1, 1),
                            blocks,
                            ws,
                        )
                    }
                }
                Layout::Nhwc => {
                    let vec = aligned && c % v == 0;
                    let tile = 32 * if vec { v } else { 1 };
                    let blocks = n * c.div_ceil(tile);
                    let want = (4 * self.sms()).div_ceil(blocks).max(1);
                    // At most NHWC_MAX_SPLITS: the last block adds the partials (8 chains of
                    // splits / 8 dependent loads).
                    let cap = hw.div_ceil(8).clamp(1, self.max_yz().min(NHWC_MAX_SPLITS));
                    let splits = want.clamp(1, cap);
                    let per = hw.div_ceil(splits);
                    let splits = hw.div_ceil(per);
                    p.splits = splits as u32;
                    p.hw_split = per as u64;
                    let ws = if splits > 1 { splits * n * c } else { 0 };
                    (
                        if vec { Reduce::NhwcVec } else { Reduce::Nhwc },
                        (u32_of(blocks, "blocks")?, splits as u32, 1),
                        (32, 8, 1),
                        blocks,
                        ws,
                    )
                }
            };
            Ok(ReducePlan {
                kernel,
                grid,
                block,
                tickets,
                partials: ws,
                params: p,
            })
        };
        let aligned = [dy, x, r, dres].iter().all(|&q| q % 16 == 0);
        let (kernel, grid, block, p) = match &self.mode {
            Mode::Size(need) => {
                // The vector path (chosen per pointer) changes the grid: size for both.
                for a in [true, false] {
                    let pl = plan(a)?;
                    need.set(need.get().with(pl.tickets, pl.partials));
                }
                return Ok(());
            }
            Mode::Run(_) => {
                let pl = plan(aligned)?;
                (pl.kernel, pl.grid, pl.block, pl.params)
            }
        };
        let (wsp, tkp) = self.scratch();
        let (ws, tickets, ty) = (Out(wsp), Out(tkp), Some(self.suffix));
        // SAFETY (every launch below): the arguments are the kernel's (squeeze.cu); every
        // address covers the sizes `p` describes (checked by the callers); the workspace regions
        // were sized by this same plan.
        macro_rules! pool {
            ($k:ident) => {
                unsafe {
                    self.dev.launch_kernel(
                        &kargs::$k {
                            p,
                            x: In(x),
                            z: Out(out),
                            ws,
                            tickets,
                        },
                        ty,
                        grid,
                        block,
                        0,
                        1,
                    )
                }
            };
        }
        macro_rules! dgate {
            ($k:ident) => {
                unsafe {
                    self.dev.launch_kernel(
                        &kargs::$k {
                            p,
                            dy: In(dy),
                            x: In(x),
                            r: In(r),
                            s: In(s),
                            dres: Out(dres),
                            dg: Out(out),
                            ws,
                            tickets,
                        },
                        ty,
                        grid,
                        block,
                        0,
                        1,
                    )
                }
            };
        }
        match (grad, kernel) {
            (false, Reduce::NchwStaged) => pool!(SePoolNchwStaged),
            (false, Reduce::NchwRows) => pool!(SePoolNchwRows),
            (false, Reduce::Nhwc) => pool!(SePoolNhwc),
            (false, Reduce::NhwcVec) => pool!(SePoolNhwcVec),
            (true, Reduce::NchwStaged) => dgate!(SeDgateNchwStaged),
            (true, Reduce::NchwRows) => dgate!(SeDgateNchwRows),
            (true, Reduce::Nhwc) => dgate!(SeDgateNhwc),
            (true, Reduce::NhwcVec) => dgate!(SeDgateNhwcVec),
        }
    }

    /// out = epilogue(A B) with the strides of SeGemmParams.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: u64,
        (sa_m, sa_k): (usize, usize),
        bmat: u64,
        (sb_k, sb_n): (usize, usize),
        out: u64,
        out2: u64,
        bias: u64,
        aux: u64,
        epilogue: u32,
    ) -> Result<()> {
        // Split K so that the grid fills the machine and each block runs a few K tiles: these
        // GEMMs are small and latency-bound, not FLOP-bound.
        let tiles = m.div_ceil(32) * n.div_ceil(32);
        let splits = if k > 128 && tiles < 4 * self.sms() {
            (4 * self.sms())
                .div_ceil(tiles)
                .min(k.div_ceil(128))
                .clamp(1, 64)
        } else {
            1
        };
        let kps = k.div_ceil(splits).div_ceil(32) * 32;
        let splits = k.div_ceil(kps);
        let p = SeGemmParams {
            sa_m: sa_m as i64,
            sa_k: sa_k as i64,
            sb_k: sb_k as i64,
            sb_n: sb_n as i64,
            m: u32_of(m, "gemm m")?,
            n: u32_of(n, "gemm n")?,
            k: u32_of(k, "gemm k")?,
            k_splits: splits as u32,
            k_per_split: kps as u32,
            epilogue,
            act: self.base_params(1).act,
            gate: self.base_params(1).gate,
            flags: if bias != 0 { abi::SENET_FLAG_BIAS } else { 0 },
            reserved: 0,
        };
        let gy = m.div_ceil(32);
        if gy > self.max_yz() {
            return Err(Error::Shape(format!(
                "gemm with {m} rows exceeds the grid limit"
            )));
        }
        let grid = (
            u32_of(n.div_ceil(32), "gemm grid")?,
            gy as u32,
            splits as u32,
        );
        let ws = if splits > 1 { splits * m * n } else { 0 };
        if let Mode::Size(need) = &self.mode {
            need.set(need.get().with(grid.0 as usize * grid.1 as usize, ws));
            return Ok(());
        }
        let (wsp, tkp) = self.scratch();
        let args = kargs::SeGemmF32 {
            p,
            A: In(a),
            B: In(bmat),
            C: Out(out),
            C2: Out(out2),
            bias: In(bias),
            aux: In(aux),
            ws: Out(wsp),
            tickets: Out(tkp),
        };
        // SAFETY: A, B, out (and out2 / bias / aux where the epilogue reads them) cover the
        // m x k, k x n and m x n ranges the strides describe; the workspace regions were sized by
        // this same plan.
        unsafe { self.dev.launch_kernel(&args, None, grid, (256, 1, 1), 0, 1) }
    }

    fn colsum(&self, input: u64, out: u64, rows: usize, cols: usize) -> Result<()> {
        if let Mode::Size(_) = self.mode {
            return Ok(());
        }
        let (rows32, cols32) = (u32_of(rows, "rows")?, u32_of(cols, "cols")?);
        let args = kargs::SeColsumF32 {
            r#in: In(input),
            out: Out(out),
            rows: rows32,
            cols: cols32,
            accumulate: 0,
        };
        let grid = (cols32.div_ceil(256), 1, 1);
        // SAFETY: `input` holds rows x cols floats, `out` cols.
        unsafe { self.dev.launch_kernel(&args, None, grid, (256, 1, 1), 0, 1) }
    }

    /// The element-wise pass: scale (forward) or dx (backward) over `n` samples.
    #[allow(clippy::too_many_arguments)]
    fn elementwise(
        &self,
        dx: bool,
        n: usize,
        a: u64,
        r_or_dz: u64,
        s: u64,
        out: u64,
        accumulate: bool,
    ) -> Result<()> {
        if let Mode::Size(_) = self.mode {
            return Ok(());
        }
        let mut p = self.base_params(n);
        let total = n * self.cfg.channels * self.hw;
        let phase_ptrs = if dx { [a, out, 0] } else { [a, r_or_dz, out] };
        if same_phase(&phase_ptrs) {
            p.flags |= abi::SENET_FLAG_VEC;
        }
        if !dx && r_or_dz != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        if dx && accumulate {
            p.flags |= abi::SENET_FLAG_ACCUMULATE;
        }
        let v = 16 / self.esize;
        let blocks = total.div_ceil(v * 256 * 4).clamp(1, self.sms() * 8);
        let (grid, block, ty) = ((blocks as u32, 1, 1), (256, 1, 1), Some(self.suffix));
        // SAFETY: the tensors hold n * c * hw elements, s and dz n * c floats.
        unsafe {
            if dx {
                let k = kargs::SeDx {
                    p,
                    g: In(a),
                    s: In(s),
                    dz: In(r_or_dz),
                    dx: Out(out),
                };
                self.dev.launch_kernel(&k, ty, grid, block, 0, 1)
            } else {
                let k = kargs::SeScale {
                    p,
                    x: In(a),
                    r: In(r_or_dz),
                    s: In(s),
                    y: Out(out),
                };
                self.dev.launch_kernel(&k, ty, grid, block, 0, 1)
            }
        }
    }
}

// ------------------------------------------------------------------------------ forward

/// The device addresses of one forward call's operands (0: absent).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FwdPtrs {
    pub(super) x: u64,
    pub(super) r: u64,
    pub(super) y: u64,
    pub(super) w1: u64,
    pub(super) b1: u64,
    pub(super) w2: u64,
    pub(super) b2: u64,
    pub(super) z: u64,
    pub(super) h: u64,
    pub(super) u: u64,
    pub(super) s: u64,
}

/// Queues (or sizes) SE forward on path `path` (already resolved).
pub(super) fn run_forward(
    cx: &Ctx,
    shape: Shape,
    path: SePath,
    opts: &SeOptions,
    ptrs: &FwdPtrs,
) -> Result<()> {
    let (dev, cfg, layout, esize) = (cx.dev, cx.cfg, cx.layout, cx.esize);
    let (c, d) = (cfg.channels, cfg.hidden);
    let FwdPtrs {
        x: xp,
        r: rp,
        y: yp,
        w1,
        b1,
        w2,
        b2,
        z: zp,
        h: hp,
        u: up,
        s: sp,
    } = *ptrs;
    if path == SePath::Cluster {
        if let Mode::Size(_) = cx.mode {
            return Ok(());
        }
        let mut p = cx.base_params(shape.n);
        if rp != 0 {
            p.flags |= abi::SENET_FLAG_RESIDUAL;
        }
        if same_phase(&[xp, rp, yp]) {
            p.flags |= abi::SENET_FLAG_VEC;
        }
        let smem = cluster_smem_bytes(&cfg, shape, layout, esize, Direction::Forward);
        macro_rules! fused {
            ($k:ident) => {{
                let k = kargs::$k {
                    p,
                    x: In(xp),
                    r: In(rp),
                    y: Out(yp),
                    w1: In(w1),
                    b1: In(b1),
                    w2: In(w2),
                    b2: In(b2),
                    z: Out(zp),
                    h: Out(hp),
                    u: Out(up),
                    s: Out(sp),
                };
                let grid = cluster_grid(dev, &k, cx.suffix, smem, shape.n)?;
                // SAFETY: x, r, y hold n * c * hw elements, the saved buffers n * c (z, s) and
                // n * d (h, u) floats, the weights the config's sizes.
                unsafe {
                    dev.launch_kernel(
                        &k,
                        Some(cx.suffix),
                        (grid, 1, 1),
                        (FUSED_THREADS, 1, 1),
                        smem as u32,
                        CLUSTER as u32,
                    )
                }?
            }};
        }
        match layout {
            Layout::Nchw => fused!(SeFusedFwdNchw),
            Layout::Nhwc => fused!(SeFusedFwdNhwc),
        }
        return Ok(());
    }
    let streams = if rp != 0 { 2 } else { 1 };
    let chunk = chunk_samples(dev, shape, esize, streams, opts, path);
    let per = (shape.sample_numel() * esize) as u64;
    let mut n0 = 0;
    while n0 < shape.n {
        let nc = chunk.min(shape.n - n0);
        let off = n0 as u64 * per;
        let (x_, r_, y_) = (xp + off, if rp != 0 { rp + off } else { 0 }, yp + off);
        let (z_, s_) = (zp + (n0 * c * 4) as u64, sp + (n0 * c * 4) as u64);
        let (h_, u_) = (hp + (n0 * d * 4) as u64, up + (n0 * d * 4) as u64);
        cx.reduce(false, nc, 0, x_, 0, 0, 0, z_)?;
        // FC1: h = z W1^T + b1, u = act(h).  B(k = c, j) = W1[j][c].
        cx.gemm(
            (nc, d, c),
            z_,
            (c, 1),
            w1,
            (1, c),
            h_,
            u_,
            b1,
            0,
            abi::SENET_EPI_FC1,
        )?;
        // FC2: s = gate(u W2^T + b2).  B(k = j, c) = W2[c][j].
        cx.gemm(
            (nc, c, d),
            u_,
            (d, 1),
            w2,
            (1, d),
            s_,
            0,
            b2,
            0,
            abi::SENET_EPI_FC2,
        )?;
        cx.elementwise(false, nc, x_, r_, s_, y_, false)?;
        n0 += nc;
    }
    Ok(())
}

/// How many clusters of the cluster kernel `K` (type suffix `ty`) with `smem` bytes of shared
/// memory per CTA can be resident at once (cached by the device handle).
pub(super) fn resident_clusters<K: Kernel>(
    dev: &CudaDevice,
    ty: &str,
    smem: usize,
) -> Result<usize> {
    let name = format!("{}_{ty}", K::NAME);
    dev.max_active_clusters(K::MODULE, &name, CLUSTER as u32, FUSED_THREADS, smem as u32)
}

/// How many CTAs the cluster kernel `K` (type suffix `ty`) runs on: as many whole clusters as
/// fit at once, at most one per sample.
fn cluster_grid<K: Kernel>(
    dev: &CudaDevice,
    _k: &K,
    ty: &str,
    smem: usize,
    n: usize,
) -> Result<u32> {
    let clusters = resident_clusters::<K>(dev, ty, smem)?;
    if clusters == 0 {
        return Err(Error::Unsupported(format!(
            "no cluster of {CLUSTER} CTAs with {smem} bytes of shared memory fits on {}",
            dev.info().name
        )));
    }
    u32_of(clusters.min(n) * CLUSTER, "cluster grid")
}

// ------------------------------------------------------------------------------ backward

/// The device addresses of one backward call's operands (0: absent): inputs, the forward's
/// saved state, outputs, and the workspace's intermediates dg [n][c], du [n][d], dz [n][c].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct BwdPtrs {
    pub(super) x: u64,
    pub(super) r: u64,
    pub(super) dy: u64,
    pub(super) w1: u64,
    pub(super) w2: u64,
    pub(super) z: u64,
    pub(super) h: u64,
    pub(super) u: u64,
    pub(super) s: u64,
    pub(super) dx: u64,
    pub(super) dres: u64,
    pub(super) dw1: u64,
    pub(super) db1: u64,
    pub(super) dw2: u64,
    pub(super) db2: u64,
}

/// Queues (or sizes) SE backward on path `path` (already resolved).
pub(super) fn run_backward(
    cx: &Ctx,
    shape: Shape,
    path: SePath,
    opts: &SeOptions,
    ptrs: &BwdPtrs,
    accumulate: bool,
) -> Result<()> {
    let (dev, layout, esize) = (cx.dev, cx.layout, cx.esize);
    let (n, c, d) = (shape.n, cx.cfg.channels, cx.cfg.hidden);
    let BwdPtrs {
        x: xp,
        r: rp,
        dy: dyp,
        w1,
        w2,
        z: zp,
        h: hp,
        u: up,
        s: sp,
        dx: dxp,
        dres: dresp,
        dw1,
        db1,
        dw2,
        db2,
    } = *ptrs;
    let (dgp, dup, dzp) = match &cx.mode {
        Mode::Run(r) => (r.dg, r.du, r.dz),
        Mode::Size(_) => (0, 0, 0),
    };
    if path == SePath::Cluster {
        // The cluster kernel needs no split scratch (dg and du are sized by the caller); only the
        // parameter GEMMs below are sized.
        if let Mode::Run(_) = cx.mode {
            let mut p = cx.base_params(n);
            if rp != 0 {
                p.flags |= abi::SENET_FLAG_RESIDUAL;
            }
            if accumulate {
                p.flags |= abi::SENET_FLAG_ACCUMULATE;
            }
            if same_phase(&[dyp, xp, rp, dresp, dxp]) {
                p.flags |= abi::SENET_FLAG_VEC;
            }
            let smem = cluster_smem_bytes(&cx.cfg, shape, layout, esize, Direction::Backward);
            macro_rules! fused {
                ($k:ident) => {{
                    let k = kargs::$k {
                        p,
                        dy: In(dyp),
                        x: In(xp),
                        r: In(rp),
                        s: In(sp),
                        h: In(hp),
                        w1: In(w1),
                        w2: In(w2),
                        dres: Out(dresp),
                        dx: Out(dxp),
                        dg: Out(dgp),
                        du: Out(dup),
                    };
                    let grid = cluster_grid(dev, &k, cx.suffix, smem, n)?;
                    // SAFETY: activations hold n * c * hw elements, s and dg n * c, h and du
                    // n * d floats.
                    unsafe {
                        dev.launch_kernel(
                            &k,
                            Some(cx.suffix),
                            (grid, 1, 1),
                            (FUSED_THREADS, 1, 1),
                            smem as u32,
                            CLUSTER as u32,
                        )
                    }?
                }};
            }
            match layout {
                Layout::Nchw => fused!(SeFusedBwdNchw),
                Layout::Nhwc => fused!(SeFusedBwdNhwc),
            }
        }
    } else {
        let streams = if rp != 0 { 3 } else { 2 };
        let chunk = chunk_samples(dev, shape, esize, streams, opts, path);
        let per = (shape.sample_numel() * esize) as u64;
        let mut n0 = 0;
        while n0 < n {
            let nc = chunk.min(n - n0);
            let off = n0 as u64 * per;
            let at = |p: u64| if p != 0 { p + off } else { 0 };
            let (nc4, nd4) = ((n0 * c * 4) as u64, (n0 * d * 4) as u64);
            cx.reduce(
                true,
                nc,
                at(dyp),
                at(xp),
                at(rp),
                sp + nc4,
                at(dresp),
                dgp + nc4,
            )?;
            // du = (dg W2) * act'(h): B(k = c, j) = W2[c][j].
            cx.gemm(
                (nc, d, c),
                dgp + nc4,
                (c, 1),
                w2,
                (d, 1),
                dup + nd4,
                0,
                0,
                hp + nd4,
                abi::SENET_EPI_DU,
            )?;
            // dz = du W1: B(k = j, c) = W1[j][c].
            cx.gemm(
                (nc, c, d),
                dup + nd4,
                (d, 1),
                w1,
                (c, 1),
                dzp + nc4,
                0,
                0,
                0,
                abi::SENET_EPI_STORE,
            )?;
            let g = if rp != 0 { at(dresp) } else { at(dyp) };
            cx.elementwise(true, nc, g, dzp + nc4, sp + nc4, at(dxp), accumulate)?;
            n0 += nc;
        }
    }
    // Parameter gradients over the whole batch, in fixed order.
    // dW2 = dg^T u: A(m = c, k = n) = dg[n][c]; B(k = n, j) = u[n][j].
    cx.gemm(
        (c, d, n),
        dgp,
        (1, c),
        up,
        (d, 1),
        dw2,
        0,
        0,
        0,
        abi::SENET_EPI_STORE,
    )?;
    // dW1 = du^T z: A(m = j, k = n) = du[n][j]; B(k = n, c) = z[n][c].
    cx.gemm(
        (d, c, n),
        dup,
        (1, d),
        zp,
        (c, 1),
        dw1,
        0,
        0,
        0,
        abi::SENET_EPI_STORE,
    )?;
    if db1 != 0 && db2 != 0 {
        cx.colsum(dgp, db2, n, c)?;
        cx.colsum(dup, db1, n, d)?;
    }
    Ok(())
}
