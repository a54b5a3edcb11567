//! The SE op on borrowed memory: the caller's activations, weights, saved state, gradients and
//! workspace as device views ([`DeviceView`], [`DeviceViewMut`]), on the handle's stream (the
//! caller's, with [`CudaDevice::from_stream`]).
//!
//! This is the op's one implementation: the owned-tensor API ([`forward_into`](super::forward_into)
//! and friends) builds views of its buffers and calls it, with the handle's own workspace.
//!
//! Before anything is queued every operand is checked: it belongs to the handle's device
//! ([`Error::WrongDevice`] naming it otherwise), has the length the shape and config give, and no
//! output overlaps another operand (forward may write `y` exactly over `x`). So a bad call
//! writes nothing. The workspace ([`workspace_bytes`]) holds the split reductions' partials and
//! tickets and backward's intermediates; the op clears the tickets on the stream itself, so any
//! memory will do (a caching allocator's, uninitialised) and the op can be captured in a CUDA
//! graph.

use super::launch::{self, BwdPtrs, Ctx, FwdPtrs, Mode, Need};
use super::{resolve, Direction, SeOptions, SePath};
use crate::cuda::{CudaDevice, CudaElement, DeviceView, DeviceViewMut};
use crate::error::{Error, Result};
use crate::se::weights::check_len;
use crate::se::SeConfig;
use crate::tensor::{DType, Layout, Shape};
use std::cell::Cell;

/// The SE weights as device views, f32 in PyTorch's layout: `w1` `[hidden][channels]`, `b1`
/// `[hidden]`, `w2` `[channels][hidden]`, `b2` `[channels]`; the biases exactly when the config
/// has them.
#[derive(Debug)]
pub struct SeWeightViews<'a> {
    /// First FC layer's weight.
    pub w1: DeviceView<'a, f32>,
    /// First FC layer's bias.
    pub b1: Option<DeviceView<'a, f32>>,
    /// Second FC layer's weight.
    pub w2: DeviceView<'a, f32>,
    /// Second FC layer's bias.
    pub b2: Option<DeviceView<'a, f32>>,
}

/// What forward saves for backward, as writable device views, f32: `z` and `s`
/// `[n][channels]`, `h` (hidden pre-activation) and `u` (its activation) `[n][hidden]`.
#[derive(Debug)]
pub struct SeSavedViewsMut<'a> {
    /// Squeezed means.
    pub z: DeviceViewMut<'a, f32>,
    /// Hidden pre-activation.
    pub h: DeviceViewMut<'a, f32>,
    /// Hidden activation.
    pub u: DeviceViewMut<'a, f32>,
    /// Channel weights (the gate's output).
    pub s: DeviceViewMut<'a, f32>,
}

/// The saved state forward wrote, read by backward (shapes as [`SeSavedViewsMut`]).
#[derive(Debug)]
pub struct SeSavedViews<'a> {
    /// Squeezed means.
    pub z: DeviceView<'a, f32>,
    /// Hidden pre-activation.
    pub h: DeviceView<'a, f32>,
    /// Hidden activation.
    pub u: DeviceView<'a, f32>,
    /// Channel weights.
    pub s: DeviceView<'a, f32>,
}

/// Parameter gradients as writable device views, f32, shaped as [`SeWeightViews`]; overwritten
/// by backward.
#[derive(Debug)]
pub struct SeGradViewsMut<'a> {
    /// d loss / d w1.
    pub dw1: DeviceViewMut<'a, f32>,
    /// d loss / d b1.
    pub db1: Option<DeviceViewMut<'a, f32>>,
    /// d loss / d w2.
    pub dw2: DeviceViewMut<'a, f32>,
    /// d loss / d b2.
    pub db2: Option<DeviceViewMut<'a, f32>>,
}

/// One forward call's operands. `x`, `residual` and `y` hold the shape's elements in its layout;
/// with `residual` the fused epilogue `y = relu(s * x + residual)` runs, else `y = s * x`. `y`
/// may be exactly `x` (in place, through views made from raw addresses).
#[derive(Debug)]
pub struct SeForwardViews<'a, T> {
    /// The input.
    pub x: DeviceView<'a, T>,
    /// The residual of the fused epilogue.
    pub residual: Option<DeviceView<'a, T>>,
    /// The output.
    pub y: DeviceViewMut<'a, T>,
    /// The weights.
    pub weights: SeWeightViews<'a>,
    /// Where forward writes what backward needs.
    pub saved: SeSavedViewsMut<'a>,
}

/// One backward call's operands: the forward's inputs and saved state, `dy`, and the outputs.
/// With `accumulate`, `dx` gets the gradient added to what it holds; parameter gradients are
/// overwritten. `dresidual` is given exactly when `residual` is.
#[derive(Debug)]
pub struct SeBackwardViews<'a, T> {
    /// The forward's input.
    pub x: DeviceView<'a, T>,
    /// The forward's residual.
    pub residual: Option<DeviceView<'a, T>>,
    /// d loss / d y.
    pub dy: DeviceView<'a, T>,
    /// The weights.
    pub weights: SeWeightViews<'a>,
    /// What forward saved.
    pub saved: SeSavedViews<'a>,
    /// d loss / d x.
    pub dx: DeviceViewMut<'a, T>,
    /// Add to `dx` instead of overwriting it.
    pub accumulate: bool,
    /// d loss / d residual.
    pub dresidual: Option<DeviceViewMut<'a, T>>,
    /// Parameter gradients.
    pub grads: SeGradViewsMut<'a>,
}

/// Bytes of workspace an SE call of this configuration, shape, layout, dtype and direction needs
/// on `dev` with `opts` (with or without a residual: the larger). A workspace may start at any
/// address; one sized for a shape serves every smaller call of the same path.
///
/// Errors when the shape or config is invalid, or the path `opts` forces cannot run the shape.
pub fn workspace_bytes(
    dev: &CudaDevice,
    config: &SeConfig,
    shape: Shape,
    layout: Layout,
    dtype: DType,
    direction: Direction,
    opts: SeOptions,
) -> Result<usize> {
    let esize = match dtype {
        DType::F32 | DType::F16 | DType::BF16 => dtype.size(),
        DType::F64 => {
            return Err(Error::Unsupported(
                "the SE kernels take f32, f16 or bf16 activations, not f64".into(),
            ))
        }
    };
    check_problem(config, shape)?;
    let path = resolve(dev, config, shape, layout, esize, direction, opts.path)?;
    let a = need(
        dev, config, shape, layout, esize, direction, path, &opts, false,
    )?;
    let b = need(
        dev, config, shape, layout, esize, direction, path, &opts, true,
    )?;
    Ok(a.max(b).bytes())
}

fn check_problem(config: &SeConfig, shape: Shape) -> Result<()> {
    config.validate()?;
    shape.validate()?;
    if shape.c != config.channels {
        return Err(Error::Shape(format!(
            "input {shape} has {} channels, the SE block expects {}",
            shape.c, config.channels
        )));
    }
    Ok(())
}

/// A stand-in address for operands that are present, while sizing (nothing is launched).
const PRESENT: u64 = 256;

/// What a call needs of the workspace: the launch sequence walked without launching.
#[allow(clippy::too_many_arguments)]
fn need(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    esize: usize,
    dir: Direction,
    path: SePath,
    opts: &SeOptions,
    residual: bool,
) -> Result<Need> {
    let cell = Cell::new(Need::default());
    let cx = Ctx {
        dev,
        suffix: "",
        esize,
        cfg: *cfg,
        hw: shape.hw(),
        layout,
        mode: Mode::Size(&cell),
    };
    let r = if residual { PRESENT } else { 0 };
    match dir {
        Direction::Forward => {
            let p = FwdPtrs {
                x: PRESENT,
                r,
                y: PRESENT,
                ..FwdPtrs::default()
            };
            launch::run_forward(&cx, shape, path, opts, &p)?;
        }
        Direction::Backward => {
            let p = BwdPtrs {
                x: PRESENT,
                r,
                dy: PRESENT,
                dx: PRESENT,
                dres: r,
                ..BwdPtrs::default()
            };
            launch::run_backward(&cx, shape, path, opts, &p, false)?;
            let (n, c, d) = (shape.n, cfg.channels, cfg.hidden);
            cell.set(Need {
                inter: [n * c, n * d, n * c],
                ..cell.get()
            });
        }
    }
    Ok(cell.get())
}

/// An operand's address range in bytes, for the overlap check.
struct Range {
    name: &'static str,
    addr: u64,
    bytes: u64,
    output: bool,
}

fn range<T>(name: &'static str, addr: u64, len: usize, output: bool) -> Range {
    Range {
        name,
        addr,
        bytes: (len * std::mem::size_of::<T>()) as u64,
        output,
    }
}

/// No output overlaps another operand, except the pairs in `allowed` when their ranges are equal.
fn check_overlaps(ranges: &[Range], allowed: &[(&str, &str)]) -> Result<()> {
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if !(a.output || b.output) || a.bytes == 0 || b.bytes == 0 {
                continue;
            }
            let disjoint = a.addr + a.bytes <= b.addr || b.addr + b.bytes <= a.addr;
            if disjoint {
                continue;
            }
            let same = a.addr == b.addr && a.bytes == b.bytes;
            let ok = allowed
                .iter()
                .any(|&(p, q)| (p, q) == (a.name, b.name) || (q, p) == (a.name, b.name));
            if !(same && ok) {
                return Err(Error::Config(format!(
                    "`{}` overlaps `{}` (an output must not share memory with another operand)",
                    a.name, b.name
                )));
            }
        }
    }
    Ok(())
}

fn check_weights(dev: &CudaDevice, cfg: &SeConfig, w: &SeWeightViews) -> Result<()> {
    let (c, d) = (cfg.channels, cfg.hidden);
    w.w1.check_on(dev, "w1")?;
    w.w2.check_on(dev, "w2")?;
    for (b, name) in [(&w.b1, "b1"), (&w.b2, "b2")] {
        if let Some(b) = b {
            b.check_on(dev, name)?;
        }
    }
    check_len("w1", w.w1.len(), d * c)?;
    check_len("w2", w.w2.len(), c * d)?;
    match (&w.b1, &w.b2, cfg.bias) {
        (Some(b1), Some(b2), true) => {
            check_len("b1", b1.len(), d)?;
            check_len("b2", b2.len(), c)
        }
        (None, None, false) => Ok(()),
        _ => Err(Error::Config(format!(
            "the biases b1 and b2 must be given exactly when the config has them ({})",
            cfg.bias
        ))),
    }
}

/// Workspace for one call: the caller's view, or the handle's own.
pub(super) enum Workspace<'w, 'a> {
    Caller(&'w DeviceViewMut<'a, u8>),
    Own,
}

/// Carves the workspace, clears the tickets on the stream, and runs `f` with the launch
/// context.
#[allow(clippy::too_many_arguments)]
fn with_workspace<T: CudaElement>(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    need: Need,
    ws: Workspace,
    f: impl FnOnce(&Ctx) -> Result<()>,
) -> Result<()> {
    let run = |base: u64| -> Result<()> {
        let regions = need.carve(base);
        // SAFETY: the tickets region lies inside the workspace (carved from a workspace of
        // at least `need.bytes()` bytes), which this call alone uses until its launches finish.
        unsafe { dev.fill_raw(regions.tickets, need.tickets * 4, 0) }?;
        let cx = Ctx {
            dev,
            suffix: T::SUFFIX,
            esize: std::mem::size_of::<T>(),
            cfg: *cfg,
            hw: shape.hw(),
            layout,
            mode: Mode::Run(regions),
        };
        f(&cx)
    };
    match ws {
        Workspace::Caller(w) => run(w.addr()),
        Workspace::Own => {
            let own = dev.workspace(need.bytes())?;
            let base = own
                .as_ref()
                .map(|b| dev.addr(b))
                .ok_or_else(|| Error::Config("the workspace was not allocated".into()))?;
            run(base)
        }
    }
}

fn check_workspace(dev: &CudaDevice, ws: &Workspace, need: &Need) -> Result<()> {
    if let Workspace::Caller(w) = ws {
        w.check_on(dev, "workspace")?;
        if w.len() < need.bytes() {
            return Err(Error::Length {
                what: "workspace (bytes; see se::cuda::workspace_bytes)",
                got: w.len(),
                expected: need.bytes(),
            });
        }
    }
    Ok(())
}

/// SE forward on borrowed memory: writes `y` and the saved state, using `workspace`
/// ([`workspace_bytes`] bytes at least) for scratch. Returns the path that ran.
///
/// Asynchronous: returns once the work is queued on `dev`'s stream; the results are ready when
/// the stream reaches that point. Errors before queueing anything (so nothing is written) on a
/// wrong-device operand ([`Error::WrongDevice`]), a wrong length, overlapping outputs, a too
/// small workspace, or a path that cannot run the shape.
pub fn forward_views<T: CudaElement>(
    dev: &CudaDevice,
    config: &SeConfig,
    shape: Shape,
    layout: Layout,
    args: SeForwardViews<'_, T>,
    workspace: DeviceViewMut<'_, u8>,
    opts: SeOptions,
) -> Result<SePath> {
    forward_with(
        dev,
        config,
        shape,
        layout,
        &args,
        Workspace::Caller(&workspace),
        opts,
    )
}

/// [`forward_views`] with the workspace either the caller's or the handle's own.
pub(super) fn forward_with<T: CudaElement>(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    a: &SeForwardViews<'_, T>,
    ws: Workspace,
    opts: SeOptions,
) -> Result<SePath> {
    check_problem(cfg, shape)?;
    let (n, c, d, numel) = (shape.n, cfg.channels, cfg.hidden, shape.numel());
    a.x.check_on(dev, "x")?;
    if let Some(r) = &a.residual {
        r.check_on(dev, "residual")?;
    }
    a.y.check_on(dev, "y")?;
    check_weights(dev, cfg, &a.weights)?;
    let sv = &a.saved;
    for (v, name) in [
        (&sv.z, "saved z"),
        (&sv.h, "saved h"),
        (&sv.u, "saved u"),
        (&sv.s, "saved s"),
    ] {
        v.check_on(dev, name)?;
    }
    check_len("x", a.x.len(), numel)?;
    if let Some(r) = &a.residual {
        check_len("residual", r.len(), numel)?;
    }
    check_len("y", a.y.len(), numel)?;
    check_len("saved z", sv.z.len(), n * c)?;
    check_len("saved h", sv.h.len(), n * d)?;
    check_len("saved u", sv.u.len(), n * d)?;
    check_len("saved s", sv.s.len(), n * c)?;
    let mut ranges = vec![
        range::<T>("x", a.x.addr(), numel, false),
        range::<T>("y", a.y.addr(), numel, true),
        range::<f32>("w1", a.weights.w1.addr(), d * c, false),
        range::<f32>("w2", a.weights.w2.addr(), c * d, false),
        range::<f32>("saved z", sv.z.addr(), n * c, true),
        range::<f32>("saved h", sv.h.addr(), n * d, true),
        range::<f32>("saved u", sv.u.addr(), n * d, true),
        range::<f32>("saved s", sv.s.addr(), n * c, true),
    ];
    if let Some(r) = &a.residual {
        ranges.push(range::<T>("residual", r.addr(), numel, false));
    }
    if let (Some(b1), Some(b2)) = (&a.weights.b1, &a.weights.b2) {
        ranges.push(range::<f32>("b1", b1.addr(), d, false));
        ranges.push(range::<f32>("b2", b2.addr(), c, false));
    }
    if let Workspace::Caller(w) = &ws {
        ranges.push(range::<u8>("workspace", w.addr(), w.len(), true));
    }
    check_overlaps(&ranges, &[("x", "y")])?;

    let esize = std::mem::size_of::<T>();
    let path = resolve(
        dev,
        cfg,
        shape,
        layout,
        esize,
        Direction::Forward,
        opts.path,
    )?;
    let need = need(
        dev,
        cfg,
        shape,
        layout,
        esize,
        Direction::Forward,
        path,
        &opts,
        a.residual.is_some(),
    )?;
    check_workspace(dev, &ws, &need)?;
    let ptrs = FwdPtrs {
        x: a.x.addr(),
        r: a.residual.as_ref().map_or(0, |r| r.addr()),
        y: a.y.addr(),
        w1: a.weights.w1.addr(),
        b1: a.weights.b1.as_ref().map_or(0, |b| b.addr()),
        w2: a.weights.w2.addr(),
        b2: a.weights.b2.as_ref().map_or(0, |b| b.addr()),
        z: sv.z.addr(),
        h: sv.h.addr(),
        u: sv.u.addr(),
        s: sv.s.addr(),
    };
    with_workspace::<T>(dev, cfg, shape, layout, need, ws, |cx| {
        launch::run_forward(cx, shape, path, &opts, &ptrs)
    })?;
    Ok(path)
}

/// SE backward on borrowed memory: writes `dx` (or adds to it), the parameter gradients and
/// `dresidual`, using `workspace` ([`workspace_bytes`] bytes at least). Returns the path that
/// ran.
///
/// Asynchronous, and checked before anything is queued, as [`forward_views`].
pub fn backward_views<T: CudaElement>(
    dev: &CudaDevice,
    config: &SeConfig,
    shape: Shape,
    layout: Layout,
    args: SeBackwardViews<'_, T>,
    workspace: DeviceViewMut<'_, u8>,
    opts: SeOptions,
) -> Result<SePath> {
    backward_with(
        dev,
        config,
        shape,
        layout,
        &args,
        Workspace::Caller(&workspace),
        opts,
    )
}

/// [`backward_views`] with the workspace either the caller's or the handle's own.
pub(super) fn backward_with<T: CudaElement>(
    dev: &CudaDevice,
    cfg: &SeConfig,
    shape: Shape,
    layout: Layout,
    a: &SeBackwardViews<'_, T>,
    ws: Workspace,
    opts: SeOptions,
) -> Result<SePath> {
    check_problem(cfg, shape)?;
    let (n, c, d, numel) = (shape.n, cfg.channels, cfg.hidden, shape.numel());
    a.x.check_on(dev, "x")?;
    if let Some(r) = &a.residual {
        r.check_on(dev, "residual")?;
    }
    a.dy.check_on(dev, "dy")?;
    check_weights(dev, cfg, &a.weights)?;
    let sv = &a.saved;
    for (v, name) in [
        (&sv.z, "saved z"),
        (&sv.h, "saved h"),
        (&sv.u, "saved u"),
        (&sv.s, "saved s"),
    ] {
        v.check_on(dev, name)?;
    }
    a.dx.check_on(dev, "dx")?;
    if let Some(r) = &a.dresidual {
        r.check_on(dev, "dresidual")?;
    }
    let g = &a.grads;
    g.dw1.check_on(dev, "dw1")?;
    g.dw2.check_on(dev, "dw2")?;
    for (b, name) in [(&g.db1, "db1"), (&g.db2, "db2")] {
        if let Some(b) = b {
            b.check_on(dev, name)?;
        }
    }
    if a.residual.is_some() != a.dresidual.is_some() {
        return Err(Error::Config(
            "d residual must be given exactly when the residual is".into(),
        ));
    }
    if (g.db1.is_some(), g.db2.is_some()) != (cfg.bias, cfg.bias) {
        return Err(Error::Config(format!(
            "the bias gradients db1 and db2 must be given exactly when the config has biases ({})",
            cfg.bias
        )));
    }
    check_len("x", a.x.len(), numel)?;
    if let Some(r) = &a.residual {
        check_len("residual", r.len(), numel)?;
    }
    check_len("dy", a.dy.len(), numel)?;
    check_len("saved z", sv.z.len(), n * c)?;
    check_len("saved h", sv.h.len(), n * d)?;
    check_len("saved u", sv.u.len(), n * d)?;
    check_len("saved s", sv.s.len(), n * c)?;
    check_len("dx", a.dx.len(), numel)?;
    if let Some(r) = &a.dresidual {
        check_len("dresidual", r.len(), numel)?;
    }
    check_len("dw1", g.dw1.len(), d * c)?;
    check_len("dw2", g.dw2.len(), c * d)?;
    if let (Some(b1), Some(b2)) = (&g.db1, &g.db2) {
        check_len("db1", b1.len(), d)?;
        check_len("db2", b2.len(), c)?;
    }
    let mut ranges = vec![
        range::<T>("x", a.x.addr(), numel, false),
        range::<T>("dy", a.dy.addr(), numel, false),
        range::<T>("dx", a.dx.addr(), numel, true),
        range::<f32>("w1", a.weights.w1.addr(), d * c, false),
        range::<f32>("w2", a.weights.w2.addr(), c * d, false),
        range::<f32>("saved z", sv.z.addr(), n * c, false),
        range::<f32>("saved h", sv.h.addr(), n * d, false),
        range::<f32>("saved u", sv.u.addr(), n * d, false),
        range::<f32>("saved s", sv.s.addr(), n * c, false),
        range::<f32>("dw1", g.dw1.addr(), d * c, true),
        range::<f32>("dw2", g.dw2.addr(), c * d, true),
    ];
    if let Some(r) = &a.residual {
        ranges.push(range::<T>("residual", r.addr(), numel, false));
    }
    if let Some(r) = &a.dresidual {
        ranges.push(range::<T>("dresidual", r.addr(), numel, true));
    }
    if let (Some(b1), Some(b2)) = (&g.db1, &g.db2) {
        ranges.push(range::<f32>("db1", b1.addr(), d, true));
        ranges.push(range::<f32>("db2", b2.addr(), c, true));
    }
    if let Workspace::Caller(w) = &ws {
        ranges.push(range::<u8>("workspace", w.addr(), w.len(), true));
    }
    check_overlaps(&ranges, &[])?;

    let esize = std::mem::size_of::<T>();
    let path = resolve(
        dev,
        cfg,
        shape,
        layout,
        esize,
        Direction::Backward,
        opts.path,
    )?;
    let need = need(
        dev,
        cfg,
        shape,
        layout,
        esize,
        Direction::Backward,
        path,
        &opts,
        a.residual.is_some(),
    )?;
    check_workspace(dev, &ws, &need)?;
    let ptrs = BwdPtrs {
        x: a.x.addr(),
        r: a.residual.as_ref().map_or(0, |r| r.addr()),
        dy: a.dy.addr(),
        w1: a.weights.w1.addr(),
        w2: a.weights.w2.addr(),
        z: sv.z.addr(),
        h: sv.h.addr(),
        u: sv.u.addr(),
        s: sv.s.addr(),
        dx: a.dx.addr(),
        dres: a.dresidual.as_ref().map_or(0, |r| r.addr()),
        dw1: g.dw1.addr(),
        db1: g.db1.as_ref().map_or(0, |b| b.addr()),
        dw2: g.dw2.addr(),
        db2: g.db2.as_ref().map_or(0, |b| b.addr()),
    };
    with_workspace::<T>(dev, cfg, shape, layout, need, ws, |cx| {
        launch::run_backward(cx, shape, path, &opts, &ptrs, a.accumulate)
    })?;
    Ok(path)
}
