//! The borrowed-memory API (`se::cuda::{forward_views, backward_views}`) checked against the
//! owned-tensor API: the same case, bit for bit, with every operand inside larger caller buffers
//! at element offsets (outputs through raw-address views), outputs and workspace poisoned first,
//! one workspace reused across cases of different shapes; and every operand from another device
//! refused before anything is written.

use senet::cuda::testing::Poison;
use senet::cuda::{CudaDevice, CudaElement, DeviceTensor, DeviceView, DeviceViewMut};
use senet::se::cuda::{
    self as secuda, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights, Direction, SeBackwardViews,
    SeForwardViews, SeGradViewsMut, SeOptions, SeSavedViews, SeSavedViewsMut, SeWeightViews,
};
use senet::{Element, Error, Layout, SeWeights, Shape, Tensor};

/// Forward's outputs as bits: y, then saved s, z, h, u.
pub type FwdBits = (Vec<u8>, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);
/// Backward's outputs as bits: dx, dw1, dw2, db1, db2, d residual.
pub type BwdBits = (
    Vec<u8>,
    Vec<u32>,
    Vec<u32>,
    Option<Vec<u32>>,
    Option<Vec<u32>>,
    Option<Vec<u8>>,
);

/// A workspace shared by every case of a run (grown when a case needs more).
#[derive(Default)]
pub struct SharedWorkspace(Option<DeviceTensor<f32>>);

fn flat(len: usize) -> Shape {
    Shape::new(1, 1, 1, len.max(1))
}

fn bits<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn f32bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Places each slice after the previous one plus a gap, in one host vector: returns the vector
/// and each slice's element offset.
fn pack<T: Copy + Default>(parts: &[(&[T], usize)]) -> (Vec<T>, Vec<usize>) {
    let mut out = Vec::new();
    let mut offs = Vec::new();
    for (p, gap) in parts {
        out.resize(out.len() + gap, T::default());
        offs.push(out.len());
        out.extend_from_slice(p);
    }
    out.push(T::default());
    (out, offs)
}

/// Offsets of slices of the given lengths with gaps, and the total length.
fn layout_of(parts: &[(usize, usize)]) -> (Vec<usize>, usize) {
    let mut at = 0;
    let mut offs = Vec::new();
    for (len, gap) in parts {
        at += gap;
        offs.push(at);
        at += len;
    }
    (offs, at + 1)
}

/// # Safety
/// `off..off + len` lies inside `t`, which outlives the view and is not otherwise used meanwhile.
unsafe fn raw_mut<'a, T: CudaElement, U: senet::cuda::DevElem>(
    dev: &CudaDevice,
    t: &DeviceTensor<T>,
    off_bytes: usize,
    len: usize,
) -> DeviceViewMut<'a, U> {
    let base = t.view(dev).addr();
    unsafe { DeviceViewMut::from_raw(dev, base + off_bytes as u64, len) }
}

/// # Safety
/// As [`raw_mut`], read-only.
unsafe fn raw<'a, T: CudaElement, U: senet::cuda::DevElem>(
    dev: &CudaDevice,
    t: &DeviceTensor<T>,
    off_bytes: usize,
    len: usize,
) -> DeviceView<'a, U> {
    let base = t.view(dev).addr();
    unsafe { DeviceView::from_raw(dev, base + off_bytes as u64, len) }
}

/// Runs forward then backward (from the saved state forward wrote) through the borrowed API on
/// `opts`, every operand inside a larger buffer: activations 256 bytes apart or more and then
/// `offsets` (x, residual, dy, outputs) elements in, as the owned run placed them (the vector
/// paths, and so the summation order, are chosen per pointer: equal bits need equal alignment);
/// weights, saved state and gradients at odd 4-byte offsets. Returns the bits to compare with
/// the owned run.
#[allow(clippy::too_many_arguments)]
pub fn run_views<T: CudaElement>(
    dev: &CudaDevice,
    shared: &mut SharedWorkspace,
    w: &SeWeights,
    x: &Tensor<T>,
    r: Option<&Tensor<T>>,
    dy: &Tensor<T>,
    offsets: [usize; 4],
    opts: SeOptions,
) -> Result<(FwdBits, BwdBits), Error> {
    let (shape, layout) = (x.shape(), x.layout());
    let cfg = w.config;
    let (n, c, d, numel) = (shape.n, cfg.channels, cfg.hidden, shape.numel());
    let [ox, or, ody, oo] = offsets;
    let es = std::mem::size_of::<T>();

    // Inputs: x, residual, dy in one buffer; weights in another.
    let r_data: Vec<T> = r.map(|r| r.data().to_vec()).unwrap_or_default();
    // Gaps that keep each activation's 256-byte phase at its offset.
    let block = 256 / es;
    let gap = |prev_end: usize, want: usize| {
        let start = (prev_end + block).div_ceil(block) * block + want;
        start - prev_end
    };
    let g_x = gap(0, ox);
    let g_r = gap(g_x + numel, or);
    let g_dy = gap(g_x + numel + g_r + r_data.len(), ody);
    let (inp, io) = pack(&[(x.data(), g_x), (&r_data, g_r), (dy.data(), g_dy)]);
    let inp = DeviceTensor::from_host(dev, &Tensor::from_vec(flat(inp.len()), Layout::Nchw, inp)?)?;
    let no_bias: Vec<f32> = Vec::new();
    let (wv, wo) = pack(&[
        (&w.w1[..], 1),
        (w.b1.as_deref().unwrap_or(&no_bias), 2),
        (&w.w2[..], 3),
        (w.b2.as_deref().unwrap_or(&no_bias), 1),
    ]);
    let wt = DeviceTensor::from_host(dev, &Tensor::from_vec(flat(wv.len()), Layout::Nchw, wv)?)?;

    // Outputs: y, dx, d residual; saved state and gradients. Poisoned.
    let g_y = gap(0, oo);
    let g_dx = gap(g_y + numel, oo);
    let g_dr = gap(g_y + numel + g_dx + numel, oo);
    let (oo_, olen) = layout_of(&[(numel, g_y), (numel, g_dx), (numel, g_dr)]);
    let mut out = DeviceTensor::<T>::zeros(dev, flat(olen), Layout::Nchw)?;
    out.poison(dev)?;
    let (fo, flen) = layout_of(&[
        (n * c, 1),
        (n * d, 2),
        (n * d, 1),
        (n * c, 3),
        (d * c, 1),
        (d, 2),
        (c * d, 1),
        (c, 2),
    ]);
    let mut f = DeviceTensor::<f32>::zeros(dev, flat(flen), Layout::Nchw)?;
    f.poison(dev)?;

    // The workspace: the shared one, grown to the larger direction's need, starting 4 bytes into
    // its allocation, poisoned (stale tickets and partials must not matter).
    let need = [Direction::Forward, Direction::Backward]
        .into_iter()
        .map(|dir| secuda::workspace_bytes(dev, &cfg, shape, layout, T::DTYPE, dir, opts))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    if shared
        .0
        .as_ref()
        .is_none_or(|t| t.shape().numel() * 4 < need + 4)
    {
        shared.0 = Some(DeviceTensor::zeros(dev, flat(need / 4 + 2), Layout::Nchw)?);
    }
    let ws_t = shared.0.as_mut().expect("allocated above");
    ws_t.poison(dev)?;
    let ws_t = shared.0.as_ref().expect("allocated above");

    let bias = cfg.bias;
    // SAFETY (every raw view below): the ranges lie inside the buffers laid out above, which
    // live until the end of this function; each output range is used by one view at a time.
    let weights = || unsafe {
        SeWeightViews {
            w1: raw(dev, &wt, wo[0] * 4, d * c),
            b1: bias.then(|| raw(dev, &wt, wo[1] * 4, d)),
            w2: raw(dev, &wt, wo[2] * 4, c * d),
            b2: bias.then(|| raw(dev, &wt, wo[3] * 4, c)),
        }
    };
    let fwd = SeForwardViews {
        x: inp.view(dev).slice(io[0]..io[0] + numel)?,
        residual: match r {
            Some(_) => Some(inp.view(dev).slice(io[1]..io[1] + numel)?),
            None => None,
        },
        y: unsafe { raw_mut(dev, &out, oo_[0] * es, numel) },
        weights: weights(),
        saved: unsafe {
            SeSavedViewsMut {
                z: raw_mut(dev, &f, fo[0] * 4, n * c),
                h: raw_mut(dev, &f, fo[1] * 4, n * d),
                u: raw_mut(dev, &f, fo[2] * 4, n * d),
                s: raw_mut(dev, &f, fo[3] * 4, n * c),
            }
        },
    };
    let ws = unsafe { raw_mut::<f32, u8>(dev, ws_t, 4, ws_t.shape().numel() * 4 - 4) };
    secuda::forward_views(dev, &cfg, shape, layout, fwd, ws, opts)?;

    let bwd = SeBackwardViews {
        x: inp.view(dev).slice(io[0]..io[0] + numel)?,
        residual: match r {
            Some(_) => Some(inp.view(dev).slice(io[1]..io[1] + numel)?),
            None => None,
        },
        dy: inp.view(dev).slice(io[2]..io[2] + numel)?,
        weights: weights(),
        saved: unsafe {
            SeSavedViews {
                z: raw(dev, &f, fo[0] * 4, n * c),
                h: raw(dev, &f, fo[1] * 4, n * d),
                u: raw(dev, &f, fo[2] * 4, n * d),
                s: raw(dev, &f, fo[3] * 4, n * c),
            }
        },
        dx: unsafe { raw_mut(dev, &out, oo_[1] * es, numel) },
        accumulate: false,
        dresidual: r.map(|_| unsafe { raw_mut(dev, &out, oo_[2] * es, numel) }),
        grads: unsafe {
            SeGradViewsMut {
                dw1: raw_mut(dev, &f, fo[4] * 4, d * c),
                db1: bias.then(|| raw_mut(dev, &f, fo[5] * 4, d)),
                dw2: raw_mut(dev, &f, fo[6] * 4, c * d),
                db2: bias.then(|| raw_mut(dev, &f, fo[7] * 4, c)),
            }
        },
    };
    let ws = unsafe { raw_mut::<f32, u8>(dev, ws_t, 4, ws_t.shape().numel() * 4 - 4) };
    secuda::backward_views(dev, &cfg, shape, layout, bwd, ws, opts)?;

    let o = out.to_host(dev)?;
    let o = o.data();
    let fh = f.to_host(dev)?;
    let fh = fh.data();
    let fs = |i: usize, len: usize| f32bits(&fh[fo[i]..fo[i] + len]);
    let fwd_bits = (
        bits(&o[oo_[0]..oo_[0] + numel]),
        fs(3, n * c),
        fs(0, n * c),
        fs(1, n * d),
        fs(2, n * d),
    );
    let bwd_bits = (
        bits(&o[oo_[1]..oo_[1] + numel]),
        fs(4, d * c),
        fs(6, c * d),
        bias.then(|| fs(5, d)),
        bias.then(|| fs(7, c)),
        r.map(|_| bits(&o[oo_[2]..oo_[2] + numel])),
    );
    Ok((fwd_bits, bwd_bits))
}

/// One device's full set of SE operands, each its own buffer.
struct Side {
    x: DeviceTensor<f32>,
    r: DeviceTensor<f32>,
    dy: DeviceTensor<f32>,
    y: DeviceTensor<f32>,
    dx: DeviceTensor<f32>,
    dres: DeviceTensor<f32>,
    w: DeviceSeWeights,
    saved: DeviceSeSaved,
    grads: DeviceSeGrads,
    ws: DeviceTensor<f32>,
}

impl Side {
    fn new(dev: &CudaDevice, w: &SeWeights, x: &Tensor<f32>, ws_bytes: usize) -> Side {
        let (shape, layout) = (x.shape(), x.layout());
        let t = || DeviceTensor::from_host(dev, x).unwrap();
        let mut s = Side {
            x: t(),
            r: t(),
            dy: t(),
            y: t(),
            dx: t(),
            dres: t(),
            w: DeviceSeWeights::upload(dev, w).unwrap(),
            saved: DeviceSeSaved::new(dev, w.config, shape.n).unwrap(),
            grads: DeviceSeGrads::new(dev, w.config).unwrap(),
            ws: DeviceTensor::zeros(dev, flat(ws_bytes / 4 + 1), Layout::Nchw).unwrap(),
        };
        let _ = layout;
        s.poison(dev);
        s
    }

    fn poison(&mut self, dev: &CudaDevice) {
        for t in [&mut self.y, &mut self.dx, &mut self.dres] {
            t.poison(dev).unwrap();
        }
        self.saved.poison(dev).unwrap();
        self.grads.poison(dev).unwrap();
    }

    /// Every output still holds the poison (all bits set).
    fn untouched(&self, dev: &CudaDevice) -> bool {
        let all = |v: &[u8]| v.iter().all(|&b| b == 0xff);
        let t = |t: &DeviceTensor<f32>| all(bytemuck::cast_slice(t.to_host(dev).unwrap().data()));
        let sv = self.saved.download(dev).unwrap();
        let g = self.grads.download(dev).unwrap();
        let f = |v: &[f32]| all(bytemuck::cast_slice(v));
        t(&self.y)
            && t(&self.dx)
            && t(&self.dres)
            && [&sv.z, &sv.h, &sv.u, &sv.s].iter().all(|v| f(v))
            && f(&g.dw1)
            && f(&g.dw2)
            && g.db1.as_deref().is_none_or(f)
            && g.db2.as_deref().is_none_or(f)
    }
}

/// A workspace tensor's bytes as a workspace view.
fn ws_view<'a>(dev: &CudaDevice, t: &'a DeviceTensor<f32>) -> DeviceViewMut<'a, u8> {
    let len = t.shape().numel() * 4;
    // SAFETY: the tensor's own bytes, used by one call at a time.
    unsafe { DeviceViewMut::from_raw(dev, t.view(dev).addr(), len) }
}

/// Every operand of forward and backward taken, one at a time, from device `b` while the op runs
/// on device `a`: each call is `Error::WrongDevice` naming that operand, and nothing on `a` is
/// written.
pub fn wrong_device_operands_are_refused(a: &CudaDevice, b: &CudaDevice, w: &SeWeights) {
    let shape = Shape::new(2, w.config.channels, 3, 5);
    let x = Tensor::<f32>::random(shape, Layout::Nchw, 7).unwrap();
    let opts = SeOptions::default();
    let cfg = w.config;
    let ws_bytes = [Direction::Forward, Direction::Backward]
        .map(|dir| {
            secuda::workspace_bytes(a, &cfg, shape, Layout::Nchw, senet::DType::F32, dir, opts)
                .unwrap()
        })
        .into_iter()
        .max()
        .unwrap();
    let mut sa = Side::new(a, w, &x, ws_bytes);
    let mut sb = Side::new(b, w, &x, ws_bytes);

    let fwd_ops = [
        "x",
        "residual",
        "y",
        "w1",
        "b1",
        "w2",
        "b2",
        "saved z",
        "saved h",
        "saved u",
        "saved s",
        "workspace",
    ];
    for bad in fwd_ops {
        let got = {
            let wa = sa.w.views(a);
            let wb = sb.w.views(b);
            let (sva, svb) = (sa.saved.views_mut(a), sb.saved.views_mut(b));
            let pick = |name: &str| name == bad;
            let args = SeForwardViews {
                x: if pick("x") {
                    sb.x.view(b)
                } else {
                    sa.x.view(a)
                },
                residual: Some(if pick("residual") {
                    sb.r.view(b)
                } else {
                    sa.r.view(a)
                }),
                y: if pick("y") {
                    sb.y.view_mut(b)
                } else {
                    sa.y.view_mut(a)
                },
                weights: SeWeightViews {
                    w1: if pick("w1") { wb.w1 } else { wa.w1 },
                    b1: if pick("b1") { wb.b1 } else { wa.b1 },
                    w2: if pick("w2") { wb.w2 } else { wa.w2 },
                    b2: if pick("b2") { wb.b2 } else { wa.b2 },
                },
                saved: SeSavedViewsMut {
                    z: if pick("saved z") { svb.z } else { sva.z },
                    h: if pick("saved h") { svb.h } else { sva.h },
                    u: if pick("saved u") { svb.u } else { sva.u },
                    s: if pick("saved s") { svb.s } else { sva.s },
                },
            };
            let ws = if pick("workspace") {
                ws_view(b, &sb.ws)
            } else {
                ws_view(a, &sa.ws)
            };
            secuda::forward_views(a, &cfg, shape, Layout::Nchw, args, ws, opts)
        };
        match got {
            Err(Error::WrongDevice { operand, .. }) => {
                assert_eq!(operand, bad, "forward named the wrong operand")
            }
            other => panic!("forward with `{bad}` from another device: {other:?}"),
        }
        assert!(
            sa.untouched(a),
            "forward wrote outputs despite a wrong-device `{bad}`"
        );
    }

    let bwd_ops = [
        "x",
        "residual",
        "dy",
        "w1",
        "b1",
        "w2",
        "b2",
        "saved z",
        "saved h",
        "saved u",
        "saved s",
        "dx",
        "dresidual",
        "dw1",
        "db1",
        "dw2",
        "db2",
        "workspace",
    ];
    for bad in bwd_ops {
        let got = {
            let wa = sa.w.views(a);
            let wb = sb.w.views(b);
            let (sva, svb) = (sa.saved.views(a), sb.saved.views(b));
            let (ga, gb) = (sa.grads.views_mut(a), sb.grads.views_mut(b));
            let pick = |name: &str| name == bad;
            let args = SeBackwardViews {
                x: if pick("x") {
                    sb.x.view(b)
                } else {
                    sa.x.view(a)
                },
                residual: Some(if pick("residual") {
                    sb.r.view(b)
                } else {
                    sa.r.view(a)
                }),
                dy: if pick("dy") {
                    sb.dy.view(b)
                } else {
                    sa.dy.view(a)
                },
                weights: SeWeightViews {
                    w1: if pick("w1") { wb.w1 } else { wa.w1 },
                    b1: if pick("b1") { wb.b1 } else { wa.b1 },
                    w2: if pick("w2") { wb.w2 } else { wa.w2 },
                    b2: if pick("b2") { wb.b2 } else { wa.b2 },
                },
                saved: SeSavedViews {
                    z: if pick("saved z") { svb.z } else { sva.z },
                    h: if pick("saved h") { svb.h } else { sva.h },
                    u: if pick("saved u") { svb.u } else { sva.u },
                    s: if pick("saved s") { svb.s } else { sva.s },
                },
                dx: if pick("dx") {
                    sb.dx.view_mut(b)
                } else {
                    sa.dx.view_mut(a)
                },
                accumulate: false,
                dresidual: Some(if pick("dresidual") {
                    sb.dres.view_mut(b)
                } else {
                    sa.dres.view_mut(a)
                }),
                grads: SeGradViewsMut {
                    dw1: if pick("dw1") { gb.dw1 } else { ga.dw1 },
                    db1: if pick("db1") { gb.db1 } else { ga.db1 },
                    dw2: if pick("dw2") { gb.dw2 } else { ga.dw2 },
                    db2: if pick("db2") { gb.db2 } else { ga.db2 },
                },
            };
            let ws = if pick("workspace") {
                ws_view(b, &sb.ws)
            } else {
                ws_view(a, &sa.ws)
            };
            secuda::backward_views(a, &cfg, shape, Layout::Nchw, args, ws, opts)
        };
        match got {
            Err(Error::WrongDevice { operand, .. }) => {
                assert_eq!(operand, bad, "backward named the wrong operand")
            }
            other => panic!("backward with `{bad}` from another device: {other:?}"),
        }
        assert!(
            sa.untouched(a),
            "backward wrote outputs despite a wrong-device `{bad}`"
        );
    }
    // And a correct call on `a` still runs (the refusals left no state behind).
    sa.poison(a);
    let args = SeForwardViews {
        x: sa.x.view(a),
        residual: Some(sa.r.view(a)),
        y: sa.y.view_mut(a),
        weights: sa.w.views(a),
        saved: sa.saved.views_mut(a),
    };
    let ws = ws_view(a, &sa.ws);
    secuda::forward_views(a, &cfg, shape, Layout::Nchw, args, ws, opts).unwrap();
    assert!(!sa.untouched(a));
}
