//! Device tensors: a device buffer with a shape, a layout and an element type.

use super::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::{Element, Layout, Shape, Tensor};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};

/// Element types the kernels are built for: `f32`, `half::f16`, `half::bf16`.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {
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
    buf: CudaSlice<T>,
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
        Self::zeros_at_offset(dev, shape, layout, 0)
    }

    /// A zero-filled tensor whose first element sits `offset` elements into its allocation.
    pub fn zeros_at_offset(
        dev: &CudaDevice,
        shape: Shape,
        layout: Layout,
        offset: usize,
    ) -> Result<Self> {
        shape.validate()?;
        let buf = dev
            .stream()
            .alloc_zeros::<T>(shape.numel() + offset)
            .map_err(Error::driver("allocating a device tensor"))?;
        Ok(DeviceTensor {
            buf,
            offset,
            shape,
            layout,
        })
    }

    /// Uploads a host tensor.
    pub fn from_host(dev: &CudaDevice, t: &Tensor<T>) -> Result<Self> {
        Self::from_host_at_offset(dev, t, 0)
    }

    /// Uploads a host tensor so that its first element sits `offset` elements into the
    /// allocation (offset 1 of a 2-byte type gives a pointer that is not 16-byte aligned).
    pub fn from_host_at_offset(dev: &CudaDevice, t: &Tensor<T>, offset: usize) -> Result<Self> {
        let mut d = Self::zeros_at_offset(dev, t.shape(), t.layout(), offset)?;
        let n = t.data().len();
        let mut view = d.buf.slice_mut(offset..offset + n);
        dev.stream()
            .memcpy_htod(t.data(), &mut view)
            .map_err(Error::driver("copying a tensor to the device"))?;
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
        let start = self.offset + n * per;
        let mut view = self.buf.slice_mut(start..start + per);
        dev.stream()
            .memcpy_htod(data, &mut view)
            .map_err(Error::driver("copying a sample to the device"))
    }

    /// Downloads to a host tensor (waits for the stream).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Tensor<T>> {
        let view = self
            .buf
            .slice(self.offset..self.offset + self.shape.numel());
        let data = dev
            .stream()
            .clone_dtoh(&view)
            .map_err(Error::driver("copying a tensor to the host"))?;
        Tensor::from_vec(self.shape, self.layout, data)
    }

    /// Overwrites every element with NaN (all bits set), so a kernel that forgets an element
    /// fails the comparison with the reference.
    pub fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        let ptr = self.ptr(dev);
        let bytes = self.shape.numel() * std::mem::size_of::<T>();
        // SAFETY: the range lies inside this tensor's allocation, which lives on dev's stream;
        // all-ones bit patterns are NaN in f32, f16 and bf16, valid values of T.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, dev.stream().cu_stream())
        }
        .map_err(Error::driver("poisoning a tensor"))
    }

    /// Copies another tensor's elements into this one (same shape and layout), on the device.
    pub fn copy_from(&mut self, dev: &CudaDevice, src: &DeviceTensor<T>) -> Result<()> {
        if src.shape != self.shape || src.layout != self.layout {
            return Err(Error::Shape(format!(
                "copy from {} {} into {} {}",
                src.shape, src.layout, self.shape, self.layout
            )));
        }
        let n = self.shape.numel();
        let from = src.buf.slice(src.offset..src.offset + n);
        let mut to = self.buf.slice_mut(self.offset..self.offset + n);
        dev.stream()
            .memcpy_dtod(&from, &mut to)
            .map_err(Error::driver("device-to-device copy"))
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

    /// Device address of the first element.
    pub(crate) fn ptr(&self, dev: &CudaDevice) -> u64 {
        let (p, _sync) = self.buf.device_ptr(dev.stream());
        p + (self.offset * std::mem::size_of::<T>()) as u64
    }
}

/// Device address of a buffer's first element.
pub(crate) fn slice_ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
    let (p, _sync) = s.device_ptr(dev.stream());
    p
}
