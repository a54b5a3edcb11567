//! Device memory of the CUDA backend: the caching pool every activation, gradient and
//! temporary comes from (a steady training step allocates nothing), pooled buffers, uploads,
//! downloads and layout conversions.

use super::*;

/// A device address for a kernel argument.
pub(super) trait Addr {
    fn at(&self, dev: &CudaDevice) -> u64;
}

impl<T: crate::cuda::DevElem> Addr for Buf<T> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        dev.addr(self)
    }
}

impl Addr for DeviceTensor<f32> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.addr(dev)
    }
}

impl<A: Addr + ?Sized> Addr for Arc<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        (**self).at(dev)
    }
}

impl<A: Addr + ?Sized> Addr for &A {
    fn at(&self, dev: &CudaDevice) -> u64 {
        (**self).at(dev)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool({} allocations)",
            self.misses.load(Ordering::Relaxed)
        )
    }
}

/// Device buffers kept for reuse (a caching allocator): free buffers by element type and exact
/// length. A training step repeats its shapes, so after the first step outputs and
/// temporaries come from here instead of the driver.
/// A free buffer of some element type (a `Buf<T>`, downcast on reuse).
pub(super) type FreeBuf = Box<dyn Any + Send>;

#[derive(Default)]
pub(super) struct Pool {
    pub(super) free: Mutex<HashMap<(TypeId, usize), Vec<FreeBuf>>>,
    pub(super) misses: AtomicUsize,
}

impl Pool {
    pub(super) fn get<T: DevElem>(&self, len: usize) -> Option<Buf<T>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let b = free.get_mut(&(TypeId::of::<T>(), len))?.pop()?;
        b.downcast::<Buf<T>>().ok().map(|b| *b)
    }

    pub(super) fn put<T: DevElem>(&self, b: Buf<T>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.entry((TypeId::of::<T>(), b.len()))
            .or_default()
            .push(Box::new(b));
    }
}

/// A pooled buffer: goes back to the pool when dropped.
pub(super) struct PoolBuf<T: DevElem> {
    pub(super) buf: Option<Buf<T>>,
    pub(super) pool: Arc<Pool>,
}

impl<T: DevElem> std::ops::Deref for PoolBuf<T> {
    type Target = Buf<T>;
    fn deref(&self) -> &Buf<T> {
        self.buf
            .as_ref()
            .expect("a pooled buffer is present until dropped")
    }
}

impl<T: DevElem> std::ops::DerefMut for PoolBuf<T> {
    fn deref_mut(&mut self) -> &mut Buf<T> {
        self.buf
            .as_mut()
            .expect("a pooled buffer is present until dropped")
    }
}

impl<T: DevElem> Drop for PoolBuf<T> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

impl<T: DevElem> Addr for PoolBuf<T> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        dev.addr(&**self)
    }
}

/// A device tensor whose buffer goes back to the pool (when it came from one).
pub(super) struct Pooled<A: NnAct> {
    pub(super) t: Option<DeviceTensor<A>>,
    pub(super) pool: Option<Arc<Pool>>,
}

impl<A: NnAct> Pooled<A> {
    pub(super) fn tensor(&self) -> &DeviceTensor<A> {
        self.t
            .as_ref()
            .expect("a pooled tensor is present until dropped")
    }

    pub(super) fn tensor_mut(&mut self) -> &mut DeviceTensor<A> {
        self.t
            .as_mut()
            .expect("a pooled tensor is present until dropped")
    }
}

impl<A: NnAct> From<DeviceTensor<A>> for Pooled<A> {
    fn from(t: DeviceTensor<A>) -> Self {
        Pooled {
            t: Some(t),
            pool: None,
        }
    }
}

impl<A: NnAct> Addr for Pooled<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.tensor().addr(dev)
    }
}

impl<A: NnAct> Drop for Pooled<A> {
    fn drop(&mut self) {
        if let (Some(t), Some(p)) = (self.t.take(), &self.pool) {
            p.put(t.into_buf());
        }
    }
}

impl<A: NnAct> Cuda<A> {
    /// A buffer of `len` elements from the pool (or the driver); contents undefined. Handing
    /// it back is the caller's business ([`Pool::put`]).
    pub(super) fn take_raw<T: DevElem>(&self, len: usize) -> Result<Buf<T>> {
        let len = len.max(1);
        match self.pool.get::<T>(len) {
            Some(b) => Ok(b),
            None => {
                self.pool.misses.fetch_add(1, Ordering::Relaxed);
                self.dev.alloc_zeros::<T>(len)
            }
        }
    }

    /// A buffer of `len` elements from the pool (or the driver), back to the pool when dropped;
    /// contents undefined.
    pub(super) fn take<T: DevElem>(&self, len: usize) -> Result<PoolBuf<T>> {
        Ok(PoolBuf {
            buf: Some(self.take_raw(len)?),
            pool: self.pool.clone(),
        })
    }

    /// Returns buffers to the pool.
    pub(super) fn give_back(&self, bufs: impl IntoIterator<Item = Buf<f32>>) {
        for b in bufs {
            self.pool.put(b);
        }
    }

    /// A pooled buffer holding a copy of `data`.
    pub(super) fn up<T: DevElem>(&self, data: &[T]) -> Result<PoolBuf<T>> {
        let mut b = self.take::<T>(data.len())?;
        self.dev.write(&mut b, 0, data)?;
        Ok(b)
    }

    /// A pooled buffer of activations holding `data` (converted on the device when `A` is not
    /// f32).
    pub(super) fn to_act(&self, data: &[f32]) -> Result<PoolBuf<A>> {
        if is_f32::<A>() {
            // A is f32 here, so the cast is the identity (never a reinterpretation).
            if let Ok(same) = bytemuck::try_cast_slice::<f32, A>(data) {
                return self.up(same);
            }
        }
        let up = self.up(data)?;
        self.convert_to_act(self.addr(&up), data.len())
    }

    /// A pooled buffer of `n` activations converted from the `n` floats at device address
    /// `src`.
    pub(super) fn convert_to_act(&self, src: u64, n: usize) -> Result<PoolBuf<A>> {
        let out = self.out::<A>(n)?;
        let (dst, len) = (self.addr(&out), n as u64);
        let args = kargs::NnToAct {
            src: In(src),
            dst: Out(dst),
            n: len,
        };
        // SAFETY: nn_to_act_A(src, dst, n): src holds n floats (the callers' buffers), `out`
        // n elements of A.
        unsafe { self.launch_flat(&args, n)? };
        Ok(out)
    }

    /// `dst = src` with the other layout (NCHW -> NHWC when `to_nhwc`), `s` elements of A.
    pub(super) fn relayout_into(&self, src: u64, dst: u64, s: Shape, to_nhwc: bool) -> Result<()> {
        let (n, c, hw, t) = (s.n as u64, s.c as u64, s.hw() as u64, to_nhwc as u32);
        let args = kargs::NnRelayout {
            src: In(src),
            dst: Out(dst),
            n,
            c,
            hw,
            to_nhwc: t,
        };
        // SAFETY: nn_relayout_A(src, dst, n, c, hw, to_nhwc): src and dst hold s.numel()
        // elements of A (the callers' buffers).
        unsafe { self.launch_flat(&args, s.numel()) }
    }

    /// A pooled NCHW copy of `x` when this backend is NHWC and `x` has more than one pixel
    /// (where the layouts differ), for ops that read an activation as flat features.
    pub(super) fn nchw_copy(&self, x: &GpuTensor<A>) -> Result<Option<PoolBuf<A>>> {
        let s = x.shape();
        if self.layout == Layout::Nchw || s.hw() == 1 {
            return Ok(None);
        }
        let b = self.out::<A>(s.numel())?;
        self.relayout_into(self.addr(&x), self.addr(&b), s, false)?;
        Ok(Some(b))
    }

    /// Copies channels [c0, c0 + part.c) of `src` (with `src_c` channels) to channels
    /// [d0, ..) of `dst` (with `dst_c`), activations in this backend's layout: `part` is the
    /// copied block's shape. One kernel for every sample: NHWC rows are pixels (a channel is
    /// one element of a row), NCHW rows are samples (a channel is a plane of hw elements).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_channels(
        &self,
        src: u64,
        src_c: usize,
        c0: usize,
        dst: u64,
        dst_c: usize,
        d0: usize,
        part: Shape,
    ) -> Result<()> {
        let (rows, unit) = match self.layout {
            Layout::Nhwc => (part.n * part.hw(), 1),
            Layout::Nchw => (part.n, part.hw()),
        };
        let rows = rows as u64;
        let (sc, so, dc, dof, cnt) = (
            (src_c * unit) as u64,
            (c0 * unit) as u64,
            (dst_c * unit) as u64,
            (d0 * unit) as u64,
            (part.c * unit) as u64,
        );
        let args = kargs::NnCopyCols {
            src: In(src),
            dst: Out(dst),
            rows,
            src_c: sc,
            src_off: so,
            dst_c: dc,
            dst_off: dof,
            cnt,
        };
        // SAFETY: nn_copy_cols_A(src, dst, rows, src_c, src_off, dst_c, dst_off, cnt): src
        // holds rows x src_c units, dst rows x dst_c, and c0 + part.c <= src_c, d0 + part.c
        // <= dst_c (the callers' shapes), so every access stays in its row.
        unsafe { self.launch_flat(&args, part.numel()) }
    }

    /// A pooled output buffer (poisoned when asked).
    pub(super) fn out<T: DevElem>(&self, len: usize) -> Result<PoolBuf<T>> {
        let mut b = self.take::<T>(len)?;
        if self.poison {
            self.dev.fill_bytes(&mut b, 0, len.max(1), 0xff)?;
        }
        Ok(b)
    }

    pub(super) fn down<T: crate::cuda::DevElem>(&self, b: &Buf<T>, len: usize) -> Result<Vec<T>> {
        self.dev.read(b, 0, len)
    }

    pub(super) fn addr<X: Addr + ?Sized>(&self, a: &X) -> u64 {
        a.at(&self.dev)
    }

    /// A pooled output tensor in this backend's layout (poisoned when asked; otherwise its
    /// contents are stale).
    pub(super) fn out_t(&self, shape: Shape) -> Result<Pooled<A>> {
        shape.validate()?;
        let b = self.out::<A>(shape.numel())?;
        self.pooled(b, shape)
    }

    /// A pooled buffer as a tensor of `shape` in this backend's layout.
    pub(super) fn pooled(&self, b: PoolBuf<A>, shape: Shape) -> Result<Pooled<A>> {
        self.pooled_in(b, shape, self.layout)
    }

    /// A pooled buffer as a tensor of `shape` in `layout`.
    pub(super) fn pooled_in(
        &self,
        mut b: PoolBuf<A>,
        shape: Shape,
        layout: Layout,
    ) -> Result<Pooled<A>> {
        let buf = b.buf.take().expect("a fresh pooled buffer");
        match DeviceTensor::from_buf(buf, shape, layout) {
            Ok(t) => Ok(Pooled {
                t: Some(t),
                pool: Some(self.pool.clone()),
            }),
            Err(e) => Err(e),
        }
    }
}
