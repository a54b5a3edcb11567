//! The custom op: operand checks, packing, the CPU forward and backward, autograd.

use super::{err, memory_layout, to_memory_layout};
use crate::se::cpu::{self, CpuSaved, SeBackwardSlices, SeForwardSlices};
use crate::se::{SeConfig, SeGradsMut, SeWeightsRef};
use crate::tensor::{try_zeros, Element, Layout, Shape};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout as CLayout, Result,
    Shape as CShape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};
use std::sync::Mutex;

/// Packs the parameters into the 1-D tensor [`se_packed`] takes:
/// `[w1 (d*C) | b1 (d) | w2 (C*d) | b2 (C)]`, biases only when `config.bias`.
///
/// `w1` is `[d, C]` or timm's 1x1 convolution weight `[d, C, 1, 1]`, `w2` is `[C, d]` or
/// `[C, d, 1, 1]`, `b1` is `[d]`, `b2` is `[C]`. All share one dtype (f32, f16 or bf16) and one
/// device. Gradients flow back to each piece (`Tensor::cat`). Errors when a shape disagrees with
/// `config`, a bias is missing or extra, or dtypes or devices differ.
pub fn pack_params(
    config: &SeConfig,
    w1: &Tensor,
    b1: Option<&Tensor>,
    w2: &Tensor,
    b2: Option<&Tensor>,
) -> Result<Tensor> {
    config.validate().map_err(err)?;
    let (c, d) = (config.channels, config.hidden);
    if b1.is_some() != config.bias || b2.is_some() != config.bias {
        bail!(
            "senet se: the config says bias = {}, but b1 is {} and b2 is {}",
            config.bias,
            given(b1),
            given(b2)
        );
    }
    let dtype = w1.dtype();
    check_float("w1", dtype)?;
    let mut pieces = Vec::with_capacity(4);
    for (name, t, rows, cols) in [("w1", Some(w1), d, c), ("w2", Some(w2), c, d)]
        .into_iter()
        .chain([("b1", b1, d, 0), ("b2", b2, c, 0)])
    {
        let Some(t) = t else { continue };
        let ok = match t.dims() {
            [r] => cols == 0 && *r == rows,
            [r, k] => cols != 0 && (*r, *k) == (rows, cols),
            [r, k, 1, 1] => cols != 0 && (*r, *k) == (rows, cols),
            _ => false,
        };
        if !ok {
            let want = if cols == 0 {
                format!("[{rows}]")
            } else {
                format!("[{rows}, {cols}] or [{rows}, {cols}, 1, 1]")
            };
            bail!(
                "senet se: {name} has shape {:?}, expected {want} (config {config})",
                t.dims()
            );
        }
        if t.dtype() != dtype {
            bail!(
                "senet se: {name} is {:?} but w1 is {dtype:?}; the parameters share one dtype",
                t.dtype()
            );
        }
        if !t.device().same_device(w1.device()) {
            bail!("senet se: {name} is on another device than w1");
        }
        pieces.push((name, t.flatten_all()?));
    }
    // Packed order: w1, b1, w2, b2.
    let order = ["w1", "b1", "w2", "b2"];
    pieces.sort_by_key(|(name, _)| order.iter().position(|o| o == name));
    let pieces: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
    Tensor::cat(&pieces, 0)
}

/// Splits a packed gradient (or parameter) tensor, as [`pack_params`] lays it out, into
/// `(w1 [d, C], b1 [d], w2 [C, d], b2 [C])` (views, no copy).
pub fn unpack_grads(
    config: &SeConfig,
    packed: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Tensor, Option<Tensor>)> {
    let (c, d) = (config.channels, config.hidden);
    if packed.dims() != [config.num_params()] {
        bail!(
            "senet se: packed parameters have shape {:?}, expected [{}] for {config}",
            packed.dims(),
            config.num_params()
        );
    }
    let w1 = packed.narrow(0, 0, d * c)?.reshape((d, c))?;
    let mut off = d * c;
    let b1 = if config.bias {
        off += d;
        Some(packed.narrow(0, off - d, d)?)
    } else {
        None
    };
    let w2 = packed.narrow(0, off, c * d)?.reshape((c, d))?;
    off += c * d;
    let b2 = if config.bias {
        Some(packed.narrow(0, off, c)?)
    } else {
        None
    };
    Ok((w1, b1, w2, b2))
}

/// SE on candle tensors, with autograd: `y = gate(W2 act(W1 mean_hw(x) + b1) + b2) * x`, or with
/// `residual` the fused epilogue `y = relu(s * x + residual)`.
///
/// `x` is `[N, C, H, W]` (contiguous, or NHWC memory permuted to that shape: see the module
/// docs), `residual` has `x`'s shape and dtype, the parameters are shaped as
/// [`pack_params`] says. The result has `x`'s shape, dtype and memory layout. Packs the
/// parameters into one tensor per call (a copy of the weights, small next to the activation);
/// [`se_packed`] avoids it.
///
/// Errors (never panics) on wrong shapes, dtypes or devices, and a `config` that disagrees with
/// the parameters.
pub fn se(
    x: &Tensor,
    w1: &Tensor,
    b1: Option<&Tensor>,
    w2: &Tensor,
    b2: Option<&Tensor>,
    residual: Option<&Tensor>,
    config: &SeConfig,
) -> Result<Tensor> {
    let params = pack_params(config, w1, b1, w2, b2)?;
    se_packed(x, &params, residual, config)
}

/// [`se`] with the parameters already packed (`[config.num_params()]`, laid out as
/// [`pack_params`] does; f32, f16 or bf16, on `x`'s device). The gradient for `params` comes back
/// packed the same way ([`unpack_grads`] splits it).
pub fn se_packed(
    x: &Tensor,
    params: &Tensor,
    residual: Option<&Tensor>,
    config: &SeConfig,
) -> Result<Tensor> {
    config.validate().map_err(err)?;
    let shape = nchw_shape("x", x)?;
    if shape.c != config.channels {
        bail!(
            "senet se: x has {} channels, the config {} ({config})",
            shape.c,
            config.channels
        );
    }
    check_activation_dtype("x", x.dtype())?;
    check_float("params", params.dtype())?;
    if params.dims() != [config.num_params()] {
        bail!(
            "senet se: packed parameters have shape {:?}, expected [{}] for {config}",
            params.dims(),
            config.num_params()
        );
    }
    if !params.device().same_device(x.device()) {
        bail!("senet se: the parameters are on another device than x");
    }
    let (x, layout) = match memory_layout(x.layout()) {
        Some(l) => (x.clone(), l),
        None => (x.contiguous()?, Layout::Nchw),
    };
    // senet's weights are f32 whatever the activations: other dtypes are widened here, with
    // autograd (the gradient comes back in the parameters' dtype).
    let params = if params.dtype() == DType::F32 {
        params.contiguous()?
    } else {
        params.to_dtype(DType::F32)?.contiguous()?
    };
    let op = SeOp {
        config: *config,
        layout,
        saved: Mutex::new(None),
    };
    let y = match residual {
        None => x.apply_op2(&params, op)?,
        Some(r) => {
            if r.dims() != x.dims() {
                bail!(
                    "senet se: residual has shape {:?}, x {:?}",
                    r.dims(),
                    x.dims()
                );
            }
            if r.dtype() != x.dtype() {
                bail!("senet se: residual is {:?}, x {:?}", r.dtype(), x.dtype());
            }
            if !r.device().same_device(x.device()) {
                bail!("senet se: the residual is on another device than x");
            }
            let r = to_memory_layout(r, layout)?;
            x.apply_op3(&params, &r, op)?
        }
    };
    // The op's output is contiguous in `layout`; candle sees it in that shape.
    match layout {
        Layout::Nchw => Ok(y),
        Layout::Nhwc => y.permute((0, 3, 1, 2)),
    }
}

fn given(t: Option<&Tensor>) -> &'static str {
    if t.is_some() {
        "given"
    } else {
        "not given"
    }
}

fn check_float(what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => bail!("senet se: {what} is {other:?}; f32, f16 or bf16 expected"),
    }
}

fn check_activation_dtype(what: &str, dtype: DType) -> Result<()> {
    check_float(what, dtype)
}

/// senet's shape of a rank-4 NCHW-shaped tensor.
fn nchw_shape(what: &str, t: &Tensor) -> Result<Shape> {
    match *t.dims() {
        [n, c, h, w] => Shape::try_new(n, c, h, w).map_err(err),
        _ => bail!(
            "senet se: {what} has shape {:?}; [N, C, H, W] expected",
            t.dims()
        ),
    }
}

/// What forward keeps for backward, where the forward ran.
enum Saved {
    Cpu(CpuSaved),
    #[cfg(feature = "candle-cuda")]
    Cuda(super::cuda::CudaSaved),
}

/// One call of the op: its config, the activation's memory layout, and (after forward) the
/// saved state.
pub(super) struct SeOp {
    pub(super) config: SeConfig,
    pub(super) layout: Layout,
    saved: Mutex<Option<Saved>>,
}

/// A typed slice of a CPU storage at a layout's offset, `numel` long.
fn cpu_slice<'a, T: WithDType>(
    what: &str,
    s: &'a CpuStorage,
    l: &CLayout,
    numel: usize,
) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match v.get(l.start_offset()..l.start_offset() + numel) {
        Some(v) => Ok(v),
        None => bail!("senet se: {what}'s storage is shorter than its layout"),
    }
}

/// The packed parameters (f32: [`se_packed`] converts others before the op).
fn params_f32<'a>(s: &'a CpuStorage, l: &CLayout, numel: usize) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        bail!("senet se: the packed parameters are not contiguous");
    }
    cpu_slice::<f32>("params", s, l, numel)
}

impl SeOp {
    /// The activation's shape, checking `l` is laid out as the op expects.
    pub(super) fn shape_of(&self, what: &str, l: &CLayout) -> Result<Shape> {
        let shape = match *l.dims() {
            [n, c, h, w] => Shape::try_new(n, c, h, w).map_err(err)?,
            _ => bail!(
                "senet se: {what} has shape {:?}; [N, C, H, W] expected",
                l.dims()
            ),
        };
        if memory_layout(l) != Some(self.layout) {
            bail!(
                "senet se: {what} (shape {:?}, strides {:?}) is not {} memory",
                l.dims(),
                l.stride(),
                self.layout
            );
        }
        Ok(shape)
    }

    /// The output's shape as candle sees it: NCHW, or NHWC for channels-last memory.
    pub(super) fn out_shape(&self, s: Shape) -> CShape {
        match self.layout {
            Layout::Nchw => CShape::from((s.n, s.c, s.h, s.w)),
            Layout::Nhwc => CShape::from((s.n, s.h, s.w, s.c)),
        }
    }

    /// Borrowed weights over a packed f32 parameter slice.
    pub(super) fn weights<'a>(&self, p: &'a [f32]) -> Result<SeWeightsRef<'a>> {
        let (c, d) = (self.config.channels, self.config.hidden);
        if p.len() != self.config.num_params() {
            bail!(
                "senet se: {} packed parameters, expected {}",
                p.len(),
                self.config.num_params()
            );
        }
        let (w1, rest) = p.split_at(d * c);
        let (b1, rest) = if self.config.bias {
            let (b, r) = rest.split_at(d);
            (Some(b), r)
        } else {
            (None, rest)
        };
        let (w2, rest) = rest.split_at(c * d);
        let b2 = self.config.bias.then_some(rest);
        Ok(SeWeightsRef {
            config: self.config,
            w1,
            b1,
            w2,
            b2,
        })
    }

    fn store(&self, saved: Saved) -> Result<()> {
        match self.saved.lock() {
            Ok(mut g) => {
                *g = Some(saved);
                Ok(())
            }
            Err(_) => bail!("senet se: the op's saved state is poisoned"),
        }
    }

    fn cpu_forward(
        &self,
        x: (&CpuStorage, &CLayout),
        p: (&CpuStorage, &CLayout),
        r: Option<(&CpuStorage, &CLayout)>,
    ) -> Result<(CpuStorage, CShape)> {
        let shape = self.shape_of("x", x.1)?;
        if let Some((rs, rl)) = r {
            if self.shape_of("residual", rl)? != shape || rs.dtype() != x.0.dtype() {
                bail!("senet se: the residual differs from x in shape or dtype");
            }
        }
        let params = params_f32(p.0, p.1, self.config.num_params())?;
        let weights = self.weights(params)?;
        let mut saved = CpuSaved::new(&self.config, shape.n);
        let y = match x.0.dtype() {
            DType::F32 => CpuStorage::F32(self.cpu_fwd_t(x, r, shape, weights, &mut saved)?),
            DType::F16 => CpuStorage::F16(self.cpu_fwd_t(x, r, shape, weights, &mut saved)?),
            DType::BF16 => CpuStorage::BF16(self.cpu_fwd_t(x, r, shape, weights, &mut saved)?),
            other => bail!("senet se: x is {other:?}; f32, f16 or bf16 expected"),
        };
        self.store(Saved::Cpu(saved))?;
        Ok((y, self.out_shape(shape)))
    }

    fn cpu_fwd_t<T: Element + WithDType>(
        &self,
        x: (&CpuStorage, &CLayout),
        r: Option<(&CpuStorage, &CLayout)>,
        shape: Shape,
        weights: SeWeightsRef<'_>,
        saved: &mut CpuSaved,
    ) -> Result<Vec<T>> {
        let numel = shape.numel();
        let xs = cpu_slice::<T>("x", x.0, x.1, numel)?;
        let rs = r
            .map(|(s, l)| cpu_slice::<T>("residual", s, l, numel))
            .transpose()?;
        let mut y = try_zeros(numel, "the SE output").map_err(err)?;
        cpu::forward_slices(
            shape,
            self.layout,
            SeForwardSlices {
                x: xs,
                residual: rs,
                y: &mut y,
                weights,
                saved: saved.view_mut(),
            },
        )
        .map_err(err)?;
        Ok(y)
    }

    /// Gradients for `(x, params, residual)` given `dy` (shaped as the op's output).
    fn backward(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let guard = match self.saved.lock() {
            Ok(g) => g,
            Err(_) => bail!("senet se: the op's saved state is poisoned"),
        };
        let (dx, dp, dr) = match guard.as_ref() {
            Some(Saved::Cpu(saved)) => self.cpu_backward(x, params, residual, &dy, saved)?,
            #[cfg(feature = "candle-cuda")]
            Some(Saved::Cuda(saved)) => self.cuda_backward(x, params, residual, &dy, saved)?,
            None => bail!("senet se: backward before forward (no saved state)"),
        };
        let to_nchw = |t: Tensor| match self.layout {
            Layout::Nchw => Ok(t),
            Layout::Nhwc => t.permute((0, 3, 1, 2)),
        };
        Ok((to_nchw(dx)?, dp, dr.map(to_nchw).transpose()?))
    }

    fn cpu_backward(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        dy: &Tensor,
        saved: &CpuSaved,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.cpu_bwd_t::<f32>(x, params, residual, dy, saved),
            DType::F16 => self.cpu_bwd_t::<f16>(x, params, residual, dy, saved),
            DType::BF16 => self.cpu_bwd_t::<bf16>(x, params, residual, dy, saved),
            other => bail!("senet se: x is {other:?}; f32, f16 or bf16 expected"),
        }
    }

    fn cpu_bwd_t<T: Element + WithDType>(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        dy: &Tensor,
        saved: &CpuSaved,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (xs, xl) = x.storage_and_layout();
        let shape = self.shape_of("x", xl)?;
        let numel = shape.numel();
        let out_shape = self.out_shape(shape);
        let (ps, pl) = params.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        if dyl.dims() != out_shape.dims() || !dyl.is_contiguous() {
            bail!("senet se: the output gradient has shape {:?}", dyl.dims());
        }
        let rsl = residual.map(|r| r.storage_and_layout());
        let (Storage::Cpu(xs), Storage::Cpu(ps), Storage::Cpu(dys)) = (&*xs, &*ps, &*dys) else {
            bail!("senet se: the forward ran on the CPU but a backward operand is elsewhere");
        };
        let rs = match &rsl {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => {
                    self.shape_of("residual", l)?;
                    Some(cpu_slice::<T>("residual", s, l, numel)?)
                }
                _ => bail!("senet se: the residual is not on the CPU"),
            },
            None => None,
        };
        let params = params_f32(ps, pl, self.config.num_params())?;
        let weights = self.weights(params)?;
        let mut dx = try_zeros(numel, "the SE input gradient").map_err(err)?;
        let mut dres = match rs {
            Some(_) => Some(try_zeros(numel, "the residual gradient").map_err(err)?),
            None => None,
        };
        let mut grads = vec![0f32; self.config.num_params()];
        cpu::backward_slices(
            shape,
            self.layout,
            SeBackwardSlices {
                x: cpu_slice::<T>("x", xs, xl, numel)?,
                residual: rs,
                dy: cpu_slice::<T>("dy", dys, dyl, numel)?,
                weights,
                saved: saved.view(),
                dx: &mut dx,
                accumulate: false,
                dresidual: dres.as_deref_mut(),
                grads: grads_mut(&self.config, &mut grads),
            },
        )
        .map_err(err)?;
        let dev = Device::Cpu;
        let dx = Tensor::from_vec(dx, out_shape.clone(), &dev)?;
        let dres = dres
            .map(|v| Tensor::from_vec(v, out_shape, &dev))
            .transpose()?;
        let grads = Tensor::from_vec(grads, self.config.num_params(), &dev)?;
        Ok((dx, grads, dres))
    }
}

/// Mutable gradient views over a packed buffer (the [`pack_params`] order).
pub(super) fn grads_mut<'a>(config: &SeConfig, g: &'a mut [f32]) -> SeGradsMut<'a> {
    let (c, d) = (config.channels, config.hidden);
    let (dw1, rest) = g.split_at_mut(d * c);
    let (db1, rest) = if config.bias {
        let (b, r) = rest.split_at_mut(d);
        (Some(b), r)
    } else {
        (None, rest)
    };
    let (dw2, rest) = rest.split_at_mut(c * d);
    let db2 = if config.bias { Some(rest) } else { None };
    SeGradsMut { dw1, db1, dw2, db2 }
}

impl CustomOp2 for SeOp {
    fn name(&self) -> &'static str {
        "senet-se"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> Result<(CpuStorage, CShape)> {
        self.cpu_forward((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> Result<(candle_core::CudaStorage, CShape)> {
        let (y, saved, shape) = self.cuda_forward((s1, l1), (s2, l2), None)?;
        self.store(Saved::Cuda(saved))?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, _) = self.backward(x, params, None, grad)?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for SeOp {
    fn name(&self) -> &'static str {
        "senet-se-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, CShape)> {
        self.cpu_forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> Result<(candle_core::CudaStorage, CShape)> {
        let (y, saved, shape) = self.cuda_forward((s1, l1), (s2, l2), Some((s3, l3)))?;
        self.store(Saved::Cuda(saved))?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, dr) = self.backward(x, params, Some(residual), grad)?;
        Ok((Some(dx), Some(dp), dr))
    }
}
