//! Parameters bound to the backend ([`CudaParam`]: values, gradient and momentum in device
//! memory) and the operands ops take them as: host slices uploaded per call, or device
//! addresses of bound storage.

use super::*;

/// A parameter operand of an op: host values (uploaded for the op) or a device address (a
/// bound parameter's storage).
pub(super) enum PArg<'a> {
    Host(&'a [f32]),
    Dev { addr: u64, len: usize },
}

impl PArg<'_> {
    /// Checks the operand holds `n` elements.
    pub(super) fn check(&self, what: &'static str, n: usize) -> Result<()> {
        match self {
            PArg::Host(v) => check_len(what, v.len(), n),
            PArg::Dev { len, .. } => check_len(what, *len, n),
        }
    }
}

/// Where an op puts a parameter gradient: a host slice (accumulated into) or a bound
/// parameter's device gradient (accumulated into, or written over when zeroed).
pub(super) enum GArg<'a> {
    Host(&'a mut [f32]),
    /// `zeroed` is the storage's "reads as zero" flag, cleared once the op has written.
    Dev {
        addr: u64,
        len: usize,
        accumulate: bool,
        zeroed: &'a AtomicBool,
    },
}

impl GArg<'_> {
    pub(super) fn check(&self, what: &'static str, n: usize) -> Result<()> {
        match self {
            GArg::Host(v) => check_len(what, v.len(), n),
            GArg::Dev { len, .. } => check_len(what, *len, n),
        }
    }
}

/// A gradient destination during an op (see [`Cuda::g_start`]).
pub(super) struct GradTarget<'a> {
    pub(super) addr: u64,
    pub(super) accumulate: bool,
    pub(super) host: Option<(&'a mut [f32], PoolBuf<f32>)>,
    pub(super) zeroed: Option<&'a AtomicBool>,
}

/// A parameter bound to a [`Cuda`] backend: its values, gradient and SGD momentum in device
/// memory ([`Backend::bind`], [`Network::bind`](crate::nn::Network::bind)).
pub struct CudaParam {
    pub(super) owner: u64,
    pub(super) dev: Arc<CudaDevice>,
    pub(super) len: usize,
    pub(super) value: Buf<f32>,
    pub(super) grad: Mutex<Option<Buf<f32>>>,
    /// The gradient reads as zero (zero_grad since the last write): the next backward writes
    /// over it instead of adding.
    pub(super) grad_zero: AtomicBool,
    pub(super) momentum: Mutex<Option<Buf<f32>>>,
}

impl std::fmt::Debug for CudaParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaParam({} values)", self.len)
    }
}

impl CudaParam {
    pub(super) fn value_addr(&self, dev: &CudaDevice) -> Result<u64> {
        if !std::ptr::eq(dev, &*self.dev) {
            return Err(Error::Config(
                "a bound parameter's device differs from the backend's".into(),
            ));
        }
        Ok(dev.addr(&self.value))
    }

    /// The gradient's address and whether a write there accumulates (false while it reads as
    /// zero, after zero_grad: the caller clears that with [`CudaParam::written`] once its op
    /// has run); allocates the gradient, zeroed, on first use.
    pub(super) fn grad_target(&self, dev: &CudaDevice) -> Result<(u64, bool)> {
        let mut g = lock(&self.grad);
        if g.is_none() {
            *g = Some(dev.alloc_zeros::<f32>(self.len)?);
        }
        let addr = g.as_ref().map_or(0, |b| dev.addr(b));
        Ok((addr, !self.grad_zero.load(Ordering::Relaxed)))
    }

    /// Records that an op wrote the gradient (it no longer reads as zero).
    pub(super) fn written(&self) {
        self.grad_zero.store(false, Ordering::Relaxed);
    }
}

impl CudaParam {
    /// The gradient's address for a kernel that adds to it: zero-filled first when the
    /// gradient reads as zero (after zero_grad, or never written).
    pub(super) fn grad_target_zeroed(&self, dev: &CudaDevice) -> Result<u64> {
        let (addr, accumulate) = self.grad_target(dev)?;
        if !accumulate {
            let mut g = lock(&self.grad);
            if let Some(b) = g.as_mut() {
                dev.fill_bytes(b, 0, self.len, 0)?;
            }
        }
        Ok(addr)
    }
}

impl DeviceStore for CudaParam {
    fn owner(&self) -> u64 {
        self.owner
    }

    fn read_value(&self) -> Result<Vec<f32>> {
        self.dev.read(&self.value, 0, self.len)
    }

    fn read_grad(&self) -> Result<Option<Vec<f32>>> {
        let g = lock(&self.grad);
        match &*g {
            None => Ok(None),
            Some(_) if self.grad_zero.load(Ordering::Relaxed) => Ok(Some(vec![0.0; self.len])),
            Some(b) => self.dev.read(b, 0, self.len).map(Some),
        }
    }

    fn read_momentum(&self) -> Result<Option<Vec<f32>>> {
        match &*lock(&self.momentum) {
            None => Ok(None),
            Some(b) => self.dev.read(b, 0, self.len).map(Some),
        }
    }

    fn zero_grad(&self) {
        if lock(&self.grad).is_some() {
            self.grad_zero.store(true, Ordering::Relaxed);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<A: NnAct> Cuda<A> {
    // ------------------------------------------------------------------ convolution / linear
    // cores on device addresses: parameters come either from the host (uploaded for the op)
    // or from a bound parameter's device storage.

    /// The device address of a parameter operand, uploading host values into `keep`.
    pub(super) fn p_addr(&self, p: PArg<'_>, keep: &mut Vec<PoolBuf<f32>>) -> Result<u64> {
        match p {
            PArg::Host(v) => {
                let b = self.up(v)?;
                let a = self.addr(&b);
                keep.push(b);
                Ok(a)
            }
            PArg::Dev { addr, .. } => Ok(addr),
        }
    }

    /// Where a gradient goes: a host slice (uploaded, accumulated on the device, downloaded by
    /// [`Cuda::g_finish`]) or a bound parameter's device gradient.
    pub(super) fn g_start<'a>(&self, g: GArg<'a>) -> Result<GradTarget<'a>> {
        match g {
            GArg::Host(v) => {
                let b = self.up(v)?;
                Ok(GradTarget {
                    addr: self.addr(&b),
                    accumulate: true,
                    host: Some((v, b)),
                    zeroed: None,
                })
            }
            GArg::Dev {
                addr,
                accumulate,
                zeroed,
                ..
            } => Ok(GradTarget {
                addr,
                accumulate,
                host: None,
                zeroed: Some(zeroed),
            }),
        }
    }

    /// After the op wrote the gradient: copies a host one back, or marks a bound one written.
    pub(super) fn g_finish(&self, t: GradTarget<'_>) -> Result<()> {
        if let Some((v, b)) = t.host {
            let n = v.len();
            v.copy_from_slice(&self.down(&b, n)?);
        }
        if let Some(z) = t.zeroed {
            z.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ bound parameters

    /// This backend's storage of `p`, if `p` is bound here; an error if it is bound to another
    /// backend.
    pub(super) fn bound<'a>(&self, p: &'a Param<f32>) -> Result<Option<&'a CudaParam>> {
        let Some(store) = p.device_store() else {
            return Ok(None);
        };
        match store.as_any().downcast_ref::<CudaParam>() {
            Some(c) if c.owner == self.id => Ok(Some(c)),
            _ => Err(Error::Config(
                "a parameter is bound to another backend; unbind the network first".into(),
            )),
        }
    }

    /// A parameter operand: the bound storage's address, or the host values.
    pub(super) fn p_arg<'a>(&self, p: &'a Param<f32>, what: &str) -> Result<PArg<'a>> {
        Ok(match self.bound(p)? {
            Some(c) => PArg::Dev {
                addr: c.value_addr(&self.dev)?,
                len: c.len,
            },
            None => PArg::Host(p.values(what)?),
        })
    }

    /// A gradient destination: the bound storage's gradient (allocated zeroed on first use;
    /// written over after a zero_grad), or the host gradient.
    pub(super) fn g_arg<'a>(&self, p: &'a mut Param<f32>) -> Result<GArg<'a>> {
        if p.is_bound() {
            // Downgrade the borrow for 'a (the branch returns, so `p` is not used again).
            let p: &'a Param<f32> = p;
            let c = self
                .bound(p)?
                .ok_or_else(|| Error::Config("unbound".into()))?;
            let (addr, accumulate) = c.grad_target(&self.dev)?;
            return Ok(GArg::Dev {
                addr,
                len: c.len,
                accumulate,
                zeroed: &c.grad_zero,
            });
        }
        Ok(GArg::Host(p.grad_mut()))
    }

    /// Operand and gradient destination of a weight in one backward pass.
    pub(super) fn wg_args<'a>(
        &self,
        w: &'a mut Param<f32>,
        what: &str,
    ) -> Result<(PArg<'a>, GArg<'a>)> {
        if w.is_bound() {
            let w: &'a Param<f32> = w;
            let c = self
                .bound(w)?
                .ok_or_else(|| Error::Config("unbound".into()))?;
            let v = c.value_addr(&self.dev)?;
            let (addr, accumulate) = c.grad_target(&self.dev)?;
            let dev_arg = GArg::Dev {
                addr,
                len: c.len,
                accumulate,
                zeroed: &c.grad_zero,
            };
            return Ok((
                PArg::Dev {
                    addr: v,
                    len: c.len,
                },
                dev_arg,
            ));
        }
        let (v, g) = w.value_and_grad(what)?;
        Ok((PArg::Host(v), GArg::Host(g)))
    }
}
