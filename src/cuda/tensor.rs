//! Device tensors: a device buffer with a shape, a layout and an element type.

use super::buf::{Buf, DevElem};
use super::view::{DeviceId, DeviceView, DeviceViewMut};
use super::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::{Element, Layout, Shape, Tensor};

/// Element types the kernels are built for: `f32`, `half::f16`, `half::bf16`.
pub trait CudaElement: Element + DevElem {
    /// The suffix of this type's kernels (`se_scale_bf16`).
    const SUFFIX: &'static str;
}

impl CudaElement for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaElement for half::f16 {
    const SUFFIX: &'static str = "f16";
}
impl CudaElement for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// An activation tensor on a device. It may start `offset` elements into its allocation (to
/// test pointers that are not 16-byte aligned); every kernel handles any offset.
pub struct DeviceTensor<T: CudaElement> {
    buf: Buf<T>,
    offset: usize,
    shape: Shape,
    layout: Layout,
}

impl<T: CudaElement> std::fmt::Debug for DeviceTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceTensor<{}>({} {}, offset {})",
            T::DTYPE,
            self.shape,
            self.layout,
            self.offset
        )
    }
}

impl<T: CudaElement> DeviceTensor<T> {
    /// A zero-filled tensor.
    pub fn zeros(dev: &CudaDevice, shape: Shape, layout: Layout) -> Result<Self> {
        Self::zeros_at(dev, shape, layout, 0)
    }

    /// A zero-filled tensor whose first element sits `offset` elements into its allocation
    /// (test support: `testing::zeros_at_offset`).
    pub(crate) fn zeros_at(
        dev: &CudaDevice,
        shape: Shape,
        layout: Layout,
        offset: usize,
    ) -> Result<Self> {
        shape.validate()?;
        let len = shape
            .numel()
            .checked_add(offset)
            .ok_or_else(|| Error::Shape(format!("{shape} plus offset {offset} overflows")))?;
        Ok(DeviceTensor {
            buf: dev.alloc_zeros::<T>(len)?,
            offset,
            shape,
            layout,
        })
    }

    #[cfg(feature = "nn")]
    /// A tensor over an existing buffer (at offset 0); its contents are whatever the buffer
    /// holds.
    pub(crate) fn from_buf(buf: Buf<T>, shape: Shape, layout: Layout) -> Result<Self> {
        shape.validate()?;
        if buf.len() < shape.numel() {
            return Err(Error::Length {
                what: "device tensor buffer",
                got: buf.len(),
                expected: shape.numel(),
            });
        }
        Ok(DeviceTensor {
            buf,
            offset: 0,
            shape,
            layout,
        })
    }

    #[cfg(feature = "nn")]
    /// The buffer, given back.
    pub(crate) fn into_buf(self) -> Buf<T> {
        self.buf
    }

    /// Uploads a host tensor.
    pub fn from_host(dev: &CudaDevice, t: &Tensor<T>) -> Result<Self> {
        Self::from_host_at(dev, t, 0)
    }

    /// Uploads a host tensor so that its first element sits `offset` elements into the
    /// allocation (offset 1 of a 2-byte type gives a pointer that is not 16-byte aligned).
    pub(crate) fn from_host_at(dev: &CudaDevice, t: &Tensor<T>, offset: usize) -> Result<Self> {
        let mut d = Self::zeros_at(dev, t.shape(), t.layout(), offset)?;
        dev.write(&mut d.buf, offset, t.data())?;
        Ok(d)
    }

    /// Overwrites sample `n` with `data` (one sample's elements in this tensor's layout).
    pub fn write_sample(&mut self, dev: &CudaDevice, n: usize, data: &[T]) -> Result<()> {
        let per = self.shape.sample_numel();
        if n >= self.shape.n {
            return Err(Error::Shape(format!(
                "sample {n} of a batch of {}",
                self.shape.n
            )));
        }
        if data.len() != per {
            return Err(Error::Length {
                what: "sample data",
                got: data.len(),
                expected: per,
            });
        }
        dev.write(&mut self.buf, self.offset + n * per, data)
    }

    /// Downloads to a host tensor (waits for the stream).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Tensor<T>> {
        let data = dev.read(&self.buf, self.offset, self.shape.numel())?;
        Tensor::from_vec(self.shape, self.layout, data)
    }

    /// Overwrites every element with NaN (all bits set), so a kernel that forgets an element
    /// fails the comparison with the reference.
    pub(crate) fn poison_all(&mut self, dev: &CudaDevice) -> Result<()> {
        dev.fill_bytes(&mut self.buf, self.offset, self.shape.numel(), 0xff)
    }

    /// Copies another tensor's elements into this one (same shape and layout), on the device.
    pub fn copy_from(&mut self, dev: &CudaDevice, src: &DeviceTensor<T>) -> Result<()> {
        if src.shape != self.shape || src.layout != self.layout {
            return Err(Error::Shape(format!(
                "copy from {} {} into {} {}",
                src.shape, src.layout, self.shape, self.layout
            )));
        }
        dev.copy(
            &src.buf,
            src.offset,
            &mut self.buf,
            self.offset,
            self.shape.numel(),
        )
    }

    /// The logical shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Elements from the allocation's start to the first element.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes of the tensor's elements.
    pub fn bytes(&self) -> usize {
        self.shape.numel() * std::mem::size_of::<T>()
    }

    /// The device the tensor lives on.
    pub fn device(&self) -> DeviceId {
        self.buf.owner()
    }

    /// A read-only view of the tensor's elements, for the borrowed-memory API
    /// ([`se::cuda::forward_views`](crate::se::cuda::forward_views)) on `dev`.
    pub fn view(&self, dev: &CudaDevice) -> DeviceView<'_, T> {
        DeviceView::owned(self.addr(dev), self.shape.numel(), self.device())
    }

    /// A writable view of the tensor's elements, for the borrowed-memory API on `dev`.
    pub fn view_mut(&mut self, dev: &CudaDevice) -> DeviceViewMut<'_, T> {
        DeviceViewMut::owned(self.addr_mut(dev), self.shape.numel(), self.device())
    }

    /// Device address of the first element (for kernels that only read it).
    pub(crate) fn addr(&self, dev: &CudaDevice) -> u64 {
        dev.addr(&self.buf) + (self.offset * std::mem::size_of::<T>()) as u64
    }

    /// Device address of the first element, for kernels that write the tensor.
    pub(crate) fn addr_mut(&mut self, dev: &CudaDevice) -> u64 {
        self.addr(dev)
    }
}
