//! Test support, kept apart from the API proper: NaN-poisoning of outputs before a kernel runs,
//! and device tensors that start at an element offset inside their allocation (pointers that are
//! not 16-byte aligned). senet's own tests use them, as DESIGN.md's numerics contract asks, and
//! so can anyone checking the kernels the same way; production code has no use for them.

use super::{CudaDevice, CudaElement, DeviceTensor};
use crate::error::Result;
use crate::se::cuda::{DeviceSeGrads, DeviceSeSaved};
use crate::tensor::{Layout, Shape, Tensor};

/// Overwrites every element with NaN (all bits set), so a kernel that forgets an element fails
/// the comparison with the reference.
pub trait Poison {
    /// Poisons every element on `dev` (queued on its stream).
    fn poison(&mut self, dev: &CudaDevice) -> Result<()>;
}

impl<T: CudaElement> Poison for DeviceTensor<T> {
    fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        self.poison_all(dev)
    }
}

impl Poison for DeviceSeSaved {
    fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        self.poison_all(dev)
    }
}

impl Poison for DeviceSeGrads {
    fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        self.poison_all(dev)
    }
}

/// A zero-filled tensor whose first element sits `offset` elements into its allocation.
pub fn zeros_at_offset<T: CudaElement>(
    dev: &CudaDevice,
    shape: Shape,
    layout: Layout,
    offset: usize,
) -> Result<DeviceTensor<T>> {
    DeviceTensor::zeros_at(dev, shape, layout, offset)
}

/// Uploads a host tensor so that its first element sits `offset` elements into the allocation
/// (offset 1 of a 2-byte type gives a pointer that is not 16-byte aligned).
pub fn from_host_at_offset<T: CudaElement>(
    dev: &CudaDevice,
    t: &Tensor<T>,
    offset: usize,
) -> Result<DeviceTensor<T>> {
    DeviceTensor::from_host_at(dev, t, offset)
}
