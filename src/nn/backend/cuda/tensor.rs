//! The backend's device tensors: activations ([`GpuTensor`]), max-pool indices
//! ([`GpuIndices`]) and the SE op's saved state ([`CudaSeSaved`]), all returned to the pool
//! when dropped.

use super::*;

/// An activation of the CUDA backend: an NCHW tensor of `A` (f32, or bf16 for mixed
/// precision) in device memory. Clones share the memory (the backend never writes a tensor it
/// was given); the last one dropped hands the buffer back to the backend's pool.
pub struct GpuTensor<A: NnAct = f32>(pub(super) Arc<Pooled<A>>);

impl<A: NnAct> Clone for GpuTensor<A> {
    fn clone(&self) -> Self {
        GpuTensor(self.0.clone())
    }
}

impl<A: NnAct> GpuTensor<A> {
    pub(super) fn wrap(t: impl Into<Pooled<A>>) -> Self {
        GpuTensor(Arc::new(t.into()))
    }

    /// The device tensor.
    pub fn device_tensor(&self) -> &DeviceTensor<A> {
        self.0.tensor()
    }
}

impl<A: NnAct> Addr for GpuTensor<A> {
    fn at(&self, dev: &CudaDevice) -> u64 {
        self.device_tensor().addr(dev)
    }
}

impl<A: NnAct> std::fmt::Debug for GpuTensor<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuTensor<{}>({})",
            A::SUFFIX,
            self.device_tensor().shape()
        )
    }
}

impl<A: NnAct> ActTensor for GpuTensor<A> {
    fn shape(&self) -> Shape {
        self.device_tensor().shape()
    }
}

/// Where each max-pool output's maximum came from (flat NCHW input indices, whatever the
/// layout), in device memory, with the shapes and geometry it is valid for (so a backward
/// cannot route a gradient with indices of another pooling).
#[derive(Clone)]
pub struct GpuIndices {
    pub(super) buf: Arc<PoolBuf<u32>>,
    pub(super) input: Shape,
    pub(super) output: Shape,
    pub(super) geom: PoolGeom,
}

impl std::fmt::Debug for GpuIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuIndices({} -> {})", self.input, self.output)
    }
}

/// What the SE forward keeps for its backward: the device buffers of [`se_gpu::forward`], from
/// the backend's pool and back to it when the last clone drops.
#[derive(Clone)]
pub struct CudaSeSaved(pub(super) Arc<PooledSeSaved>);

pub(super) struct PooledSeSaved {
    pub(super) saved: Option<DeviceSeSaved>,
    pub(super) pool: Arc<Pool>,
}

impl PooledSeSaved {
    pub(super) fn get(&self) -> &DeviceSeSaved {
        self.saved
            .as_ref()
            .expect("the saved state is present until dropped")
    }
}

impl Drop for PooledSeSaved {
    fn drop(&mut self) {
        if let Some(s) = self.saved.take() {
            for b in s.into_bufs() {
                self.pool.put(b);
            }
        }
    }
}

impl std::fmt::Debug for CudaSeSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaSeSaved")
    }
}
