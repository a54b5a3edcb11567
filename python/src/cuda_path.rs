//! The CUDA path: torch's CUDA tensors through senet's kernels, on the stream torch hands over
//! (`torch.cuda.current_stream().cuda_stream`) and in memory torch allocated (operands, outputs,
//! saved state, gradients and the workspace, all from its caching allocator). Nothing here
//! allocates device memory or synchronises: the launches are queued on torch's stream and
//! the results are ready where torch's stream semantics say.
//!
//! Not yet run on a GPU (no device was available to the sessions so far).

use crate::{py_err, Problem};
use pyo3::prelude::*;
use senet::cuda::{CudaDevice, CudaElement, DeviceView, DeviceViewMut};
use senet::se::cuda::{
    backward_views, forward_views, workspace_bytes, Direction, SeBackwardViews, SeForwardViews,
    SeGradViewsMut, SeOptions, SeSavedViews, SeSavedViewsMut, SeWeightViews,
};
use senet::DType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A senet device handle per (device ordinal, stream): senet's kernel modules load once per
/// context, so handles are kept (a stream handle is only an identifier; a later stream at the
/// same address is the same `CUstream` to the driver).
type Devices = Mutex<HashMap<(usize, usize), Arc<CudaDevice>>>;

fn device(ordinal: usize, stream: usize) -> senet::Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Devices> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&(ordinal, stream)) {
        return Ok(d.clone());
    }
    // SAFETY: torch's stream belongs to device `ordinal`'s primary context (the one torch uses)
    // and lives as long as torch's stream object, which the caller holds for the call.
    let d = unsafe { CudaDevice::from_raw_stream(stream as _, ordinal)? };
    devices.insert((ordinal, stream), d.clone());
    Ok(d)
}

/// Workspace bytes for a call (forward or backward) on CUDA.
pub(crate) fn workspace(
    p: &Problem,
    dtype: DType,
    ordinal: usize,
    stream: usize,
    backward: bool,
) -> PyResult<usize> {
    let dev = device(ordinal, stream).map_err(py_err)?;
    let dir = if backward {
        Direction::Backward
    } else {
        Direction::Forward
    };
    workspace_bytes(
        &dev,
        &p.config,
        p.shape,
        p.layout,
        dtype,
        dir,
        SeOptions::default(),
    )
    .map_err(py_err)
}

/// Device addresses of one call (0 = absent), as the Python side passes them.
pub(crate) struct CudaPtrs {
    pub x: usize,
    pub residual: usize,
    /// y (forward) or dy (backward).
    pub y_or_dy: usize,
    pub w: [usize; 4],
    pub saved: [usize; 4],
    /// dx, dresidual, dw1, db1, dw2, db2 (backward only).
    pub grads: [usize; 6],
    pub workspace: (usize, usize),
}

/// A read-only view of `len` elements at `addr` on `dev`.
///
/// # Safety
/// `addr` holds `len` elements of `T` in `dev`'s context for the call.
unsafe fn view<'a, T: senet::cuda::DevElem>(
    dev: &CudaDevice,
    addr: usize,
    len: usize,
) -> DeviceView<'a, T> {
    unsafe { DeviceView::from_raw(dev, addr as u64, len) }
}

/// A writable view (see [`view`]).
///
/// # Safety
/// As [`view`], and nothing else writes the memory during the call.
unsafe fn view_mut<'a, T: senet::cuda::DevElem>(
    dev: &CudaDevice,
    addr: usize,
    len: usize,
) -> DeviceViewMut<'a, T> {
    unsafe { DeviceViewMut::from_raw(dev, addr as u64, len) }
}

/// # Safety
/// The weight pointers hold the config's sizes (f32) on `dev`.
unsafe fn weights<'a>(dev: &CudaDevice, p: &Problem, w: [usize; 4]) -> SeWeightViews<'a> {
    let (c, d) = (p.config.channels, p.config.hidden);
    unsafe {
        SeWeightViews {
            w1: view(dev, w[0], d * c),
            b1: (w[1] != 0).then(|| view(dev, w[1], d)),
            w2: view(dev, w[2], c * d),
            b2: (w[3] != 0).then(|| view(dev, w[3], c)),
        }
    }
}

/// Queues SE forward on torch's stream.
///
/// # Safety
/// Every pointer holds its operand's size on device `ordinal` (senet_torch allocated them with
/// torch for this problem), and the tensors live until the stream has run the op.
pub(crate) unsafe fn forward<T: CudaElement>(
    p: &Problem,
    ordinal: usize,
    stream: usize,
    ptr: &CudaPtrs,
) -> senet::Result<()> {
    let dev = device(ordinal, stream)?;
    let (numel, n, c, d) = (
        p.shape.numel(),
        p.shape.n,
        p.config.channels,
        p.config.hidden,
    );
    // SAFETY: per this function's contract.
    unsafe {
        let args = SeForwardViews::<T> {
            x: view(&dev, ptr.x, numel),
            residual: (ptr.residual != 0).then(|| view(&dev, ptr.residual, numel)),
            y: view_mut(&dev, ptr.y_or_dy, numel),
            weights: weights(&dev, p, ptr.w),
            saved: SeSavedViewsMut {
                z: view_mut(&dev, ptr.saved[0], n * c),
                h: view_mut(&dev, ptr.saved[1], n * d),
                u: view_mut(&dev, ptr.saved[2], n * d),
                s: view_mut(&dev, ptr.saved[3], n * c),
            },
        };
        let ws = view_mut(&dev, ptr.workspace.0, ptr.workspace.1);
        forward_views(
            &dev,
            &p.config,
            p.shape,
            p.layout,
            args,
            ws,
            SeOptions::default(),
        )?;
    }
    Ok(())
}

/// Queues SE backward on torch's stream.
///
/// # Safety
/// As [`forward`].
pub(crate) unsafe fn backward<T: CudaElement>(
    p: &Problem,
    ordinal: usize,
    stream: usize,
    ptr: &CudaPtrs,
) -> senet::Result<()> {
    let dev = device(ordinal, stream)?;
    let (numel, n, c, d) = (
        p.shape.numel(),
        p.shape.n,
        p.config.channels,
        p.config.hidden,
    );
    let g = ptr.grads;
    // SAFETY: per this function's contract.
    unsafe {
        let args = SeBackwardViews::<T> {
            x: view(&dev, ptr.x, numel),
            residual: (ptr.residual != 0).then(|| view(&dev, ptr.residual, numel)),
            dy: view(&dev, ptr.y_or_dy, numel),
            weights: weights(&dev, p, ptr.w),
            saved: SeSavedViews {
                z: view(&dev, ptr.saved[0], n * c),
                h: view(&dev, ptr.saved[1], n * d),
                u: view(&dev, ptr.saved[2], n * d),
                s: view(&dev, ptr.saved[3], n * c),
            },
            dx: view_mut(&dev, g[0], numel),
            accumulate: false,
            dresidual: (g[1] != 0).then(|| view_mut(&dev, g[1], numel)),
            grads: SeGradViewsMut {
                dw1: view_mut(&dev, g[2], d * c),
                db1: (g[3] != 0).then(|| view_mut(&dev, g[3], d)),
                dw2: view_mut(&dev, g[4], c * d),
                db2: (g[5] != 0).then(|| view_mut(&dev, g[5], c)),
            },
        };
        let ws = view_mut(&dev, ptr.workspace.0, ptr.workspace.1);
        backward_views(
            &dev,
            &p.config,
            p.shape,
            p.layout,
            args,
            ws,
            SeOptions::default(),
        )?;
    }
    Ok(())
}
