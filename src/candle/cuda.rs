//! The op on candle's CUDA device (feature `candle-cuda`): senet's kernels on candle's stream,
//! reading candle's buffers in place and writing into buffers allocated from candle's device.
//!
//! senet's [`CudaDevice`] for a candle stream is made once and cached (it holds the loaded
//! kernel modules); every launch is queued on candle's stream and nothing synchronises.

use super::err;
use super::op::SeOp;
use crate::cuda::{CudaDevice, CudaElement, DeviceView, DeviceViewMut};
use crate::se::cuda::{
    self as se_cuda, Direction, SeBackwardViews, SeForwardViews, SeGradViewsMut, SeSavedViews,
    SeSavedViewsMut, SeWeightViews,
};
use crate::tensor::Shape;
use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaStorage, DType, Layout as CLayout, Result, Shape as CShape, Storage, Tensor,
};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

/// What the forward saved, in buffers of candle's device (f32, `[n][..]`).
pub(super) struct CudaSaved {
    z: CudaSlice<f32>,
    h: CudaSlice<f32>,
    u: CudaSlice<f32>,
    s: CudaSlice<f32>,
}

/// senet's device handle on `stream` (made once per stream and kept).
fn senet_device(stream: &Arc<CudaStream>) -> Result<Arc<CudaDevice>> {
    static CACHE: Mutex<Vec<(usize, Arc<CudaDevice>)>> = Mutex::new(Vec::new());
    let key = stream.cu_stream() as usize;
    let Ok(mut cache) = CACHE.lock() else {
        bail!("senet se: the device cache is poisoned");
    };
    if let Some((_, d)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(d.clone());
    }
    let d = CudaDevice::from_stream(stream.clone()).map_err(err)?;
    cache.push((key, d.clone()));
    Ok(d)
}

/// `numel` elements of a candle CUDA storage from the layout's offset.
fn view<'a, T: CudaDType + DeviceRepr>(
    what: &str,
    s: &'a CudaStorage,
    l: &CLayout,
    numel: usize,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    let off = l.start_offset();
    if off + numel > slice.len() {
        bail!("senet se: {what}'s storage is shorter than its layout");
    }
    Ok(slice.slice(off..off + numel))
}

/// Weight views over a packed f32 parameter buffer (the `pack_params` order).
fn weight_views<'a>(
    dev: &'a CudaDevice,
    op: &SeOp,
    parts: &'a [CudaView<'a, f32>; 4],
) -> SeWeightViews<'a> {
    SeWeightViews {
        w1: DeviceView::from_cudarc(dev, &parts[0]),
        b1: op
            .config
            .bias
            .then(|| DeviceView::from_cudarc(dev, &parts[1])),
        w2: DeviceView::from_cudarc(dev, &parts[2]),
        b2: op
            .config
            .bias
            .then(|| DeviceView::from_cudarc(dev, &parts[3])),
    }
}

/// The packed parameters cut into w1, b1, w2, b2 (empty views for absent biases).
fn param_parts<'a>(op: &SeOp, p: &'a CudaView<'a, f32>) -> Result<[CudaView<'a, f32>; 4]> {
    let (c, d) = (op.config.channels, op.config.hidden);
    if p.len() != op.config.num_params() {
        bail!(
            "senet se: {} packed parameters, expected {}",
            p.len(),
            op.config.num_params()
        );
    }
    let nb1 = if op.config.bias { d } else { 0 };
    let w1 = p.slice(0..d * c);
    let b1 = p.slice(d * c..d * c + nb1);
    let w2 = p.slice(d * c + nb1..2 * d * c + nb1);
    let b2 = p.slice(2 * d * c + nb1..);
    Ok([w1, b1, w2, b2])
}

/// A buffer of `len` elements from candle's device (contents undefined until a kernel writes).
fn alloc<T: DeviceRepr>(dev: &candle_core::CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernels before anything reads it (the ops
    // overwrite their outputs; the workspace is cleared by the op where it needs to be).
    unsafe { dev.alloc::<T>(len.max(1)) }
}

impl SeOp {
    pub(super) fn cuda_forward(
        &self,
        x: (&CudaStorage, &CLayout),
        p: (&CudaStorage, &CLayout),
        r: Option<(&CudaStorage, &CLayout)>,
    ) -> Result<(CudaStorage, CudaSaved, CShape)> {
        let shape = self.shape_of("x", x.1)?;
        if let Some((_, rl)) = r {
            if self.shape_of("residual", rl)? != shape {
                bail!("senet se: the residual differs from x in shape");
            }
        }
        if !p.1.is_contiguous() {
            bail!("senet se: the packed parameters are not contiguous");
        }
        match x.0.dtype() {
            DType::F32 => self.cuda_fwd_t::<f32>(x, p, r, shape),
            DType::F16 => self.cuda_fwd_t::<f16>(x, p, r, shape),
            DType::BF16 => self.cuda_fwd_t::<bf16>(x, p, r, shape),
            other => bail!("senet se: x is {other:?}; f32, f16 or bf16 expected"),
        }
    }

    fn cuda_fwd_t<T: CudaElement + CudaDType>(
        &self,
        x: (&CudaStorage, &CLayout),
        p: (&CudaStorage, &CLayout),
        r: Option<(&CudaStorage, &CLayout)>,
        shape: Shape,
    ) -> Result<(CudaStorage, CudaSaved, CShape)> {
        let cdev = x.0.device.clone();
        let dev = senet_device(&cdev.cuda_stream())?;
        let (n, c, d, numel) = (shape.n, shape.c, self.config.hidden, shape.numel());
        let xv = view::<T>("x", x.0, x.1, numel)?;
        let rv = r
            .map(|(s, l)| view::<T>("residual", s, l, numel))
            .transpose()?;
        let pv = view::<f32>("params", p.0, p.1, self.config.num_params())?;
        let parts = param_parts(self, &pv)?;
        let mut y = alloc::<T>(&cdev, numel)?;
        let mut saved = CudaSaved {
            z: alloc(&cdev, n * c)?,
            h: alloc(&cdev, n * d)?,
            u: alloc(&cdev, n * d)?,
            s: alloc(&cdev, n * c)?,
        };
        let bytes = se_cuda::workspace_bytes(
            &dev,
            &self.config,
            shape,
            self.layout,
            T::DTYPE,
            Direction::Forward,
            Default::default(),
        )
        .map_err(err)?;
        let mut ws = alloc::<u8>(&cdev, bytes)?;
        {
            let args = SeForwardViews {
                x: DeviceView::from_cudarc(&dev, &xv),
                residual: rv.as_ref().map(|r| DeviceView::from_cudarc(&dev, r)),
                y: DeviceViewMut::from_cudarc(&dev, &mut y),
                weights: weight_views(&dev, self, &parts),
                saved: SeSavedViewsMut {
                    z: DeviceViewMut::from_cudarc(&dev, &mut saved.z),
                    h: DeviceViewMut::from_cudarc(&dev, &mut saved.h),
                    u: DeviceViewMut::from_cudarc(&dev, &mut saved.u),
                    s: DeviceViewMut::from_cudarc(&dev, &mut saved.s),
                },
            };
            let ws = DeviceViewMut::from_cudarc(&dev, &mut ws);
            se_cuda::forward_views(
                &dev,
                &self.config,
                shape,
                self.layout,
                args,
                ws,
                Default::default(),
            )
            .map_err(err)?;
        }
        let y = CudaStorage::wrap_cuda_slice(y, cdev);
        Ok((y, saved, self.out_shape(shape)))
    }

    pub(super) fn cuda_backward(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        dy: &Tensor,
        saved: &CudaSaved,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.cuda_bwd_t::<f32>(x, params, residual, dy, saved),
            DType::F16 => self.cuda_bwd_t::<f16>(x, params, residual, dy, saved),
            DType::BF16 => self.cuda_bwd_t::<bf16>(x, params, residual, dy, saved),
            other => bail!("senet se: x is {other:?}; f32, f16 or bf16 expected"),
        }
    }

    fn cuda_bwd_t<T: CudaElement + CudaDType>(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        dy: &Tensor,
        saved: &CudaSaved,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (xs, xl) = x.storage_and_layout();
        let shape = self.shape_of("x", xl)?;
        let numel = shape.numel();
        let out_shape = self.out_shape(shape);
        let (ps, pl) = params.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        if dyl.dims() != out_shape.dims() || !dyl.is_contiguous() || !pl.is_contiguous() {
            bail!("senet se: the output gradient has shape {:?}", dyl.dims());
        }
        let rsl = residual.map(|r| r.storage_and_layout());
        let (Storage::Cuda(xs), Storage::Cuda(ps), Storage::Cuda(dys)) = (&*xs, &*ps, &*dys) else {
            bail!("senet se: the forward ran on CUDA but a backward operand is elsewhere");
        };
        let rv = match &rsl {
            Some((s, l)) => match &**s {
                Storage::Cuda(s) => {
                    self.shape_of("residual", l)?;
                    Some(view::<T>("residual", s, l, numel)?)
                }
                _ => bail!("senet se: the residual is not on the CUDA device"),
            },
            None => None,
        };
        let cdev = xs.device.clone();
        let dev = senet_device(&cdev.cuda_stream())?;
        let xv = view::<T>("x", xs, xl, numel)?;
        let dyv = view::<T>("dy", dys, dyl, numel)?;
        let pv = view::<f32>("params", ps, pl, self.config.num_params())?;
        let parts = param_parts(self, &pv)?;
        let mut dx = alloc::<T>(&cdev, numel)?;
        let mut dres = rv.as_ref().map(|_| alloc::<T>(&cdev, numel)).transpose()?;
        let mut grads = alloc::<f32>(&cdev, self.config.num_params())?;
        let bytes = se_cuda::workspace_bytes(
            &dev,
            &self.config,
            shape,
            self.layout,
            T::DTYPE,
            Direction::Backward,
            Default::default(),
        )
        .map_err(err)?;
        let mut ws = alloc::<u8>(&cdev, bytes)?;
        {
            let (c, d) = (self.config.channels, self.config.hidden);
            let nb1 = if self.config.bias { d } else { 0 };
            let mut g = grads.slice_mut(..);
            let (mut dw1, mut rest) = g.split_at_mut(d * c);
            let (mut db1, mut rest) = rest.split_at_mut(nb1);
            let (mut dw2, mut db2) = rest.split_at_mut(c * d);
            let args = SeBackwardViews {
                x: DeviceView::from_cudarc(&dev, &xv),
                residual: rv.as_ref().map(|r| DeviceView::from_cudarc(&dev, r)),
                dy: DeviceView::from_cudarc(&dev, &dyv),
                weights: weight_views(&dev, self, &parts),
                saved: SeSavedViews {
                    z: DeviceView::from_cudarc(&dev, &saved.z),
                    h: DeviceView::from_cudarc(&dev, &saved.h),
                    u: DeviceView::from_cudarc(&dev, &saved.u),
                    s: DeviceView::from_cudarc(&dev, &saved.s),
                },
                dx: DeviceViewMut::from_cudarc(&dev, &mut dx),
                accumulate: false,
                dresidual: dres.as_mut().map(|r| DeviceViewMut::from_cudarc(&dev, r)),
                grads: SeGradViewsMut {
                    dw1: DeviceViewMut::from_cudarc(&dev, &mut dw1),
                    db1: self
                        .config
                        .bias
                        .then(|| DeviceViewMut::from_cudarc(&dev, &mut db1)),
                    dw2: DeviceViewMut::from_cudarc(&dev, &mut dw2),
                    db2: self
                        .config
                        .bias
                        .then(|| DeviceViewMut::from_cudarc(&dev, &mut db2)),
                },
            };
            let ws = DeviceViewMut::from_cudarc(&dev, &mut ws);
            se_cuda::backward_views(
                &dev,
                &self.config,
                shape,
                self.layout,
                args,
                ws,
                Default::default(),
            )
            .map_err(err)?;
        }
        let wrap = |s: CudaSlice<T>, shape: CShape| {
            Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(s, cdev.clone())),
                shape,
                BackpropOp::none(),
                false,
            )
        };
        let dx = wrap(dx, out_shape.clone());
        let dres = dres.map(|s| wrap(s, out_shape));
        let grads = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(grads, cdev.clone())),
            self.config.num_params(),
            BackpropOp::none(),
            false,
        );
        Ok((dx, grads, dres))
    }
}
