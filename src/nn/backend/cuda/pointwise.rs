//! Elementwise kernels: ReLU and its gradient, additions (with ReLU), accumulation.

use super::*;

pub(super) const EW_RELU: u32 = 0;
pub(super) const EW_RELU_BWD: u32 = 1;
pub(super) const EW_ADD: u32 = 2;
pub(super) const EW_ADD_RELU: u32 = 3;

impl<A: NnAct> Cuda<A> {
    /// `dst = (accumulate ? dst : 0) + src` over `n` floats (device addresses).
    pub(super) fn add_into(&self, dst: u64, src: u64, n: usize, accumulate: bool) -> Result<()> {
        let (len, splits, acc) = (n as u64, 1u32, accumulate as u32);
        let args = kargs::NnSumSplitsF32 {
            partial: In(src),
            out: Out(dst),
            len,
            splits,
            accumulate: acc,
        };
        // SAFETY: nn_sum_splits_f32(partial, out, len, splits = 1, accumulate): src and dst
        // hold n floats each and do not overlap (the callers' buffers).
        unsafe { self.launch(&args, (blocks(n, THREADS as usize), 1, 1)) }
    }

    pub(super) fn pointwise(
        &self,
        op: u32,
        a: &GpuTensor<A>,
        b: Option<&GpuTensor<A>>,
    ) -> Result<GpuTensor<A>> {
        let s = a.shape();
        let total = s.numel() as u64;
        let y = self.out_t(s)?;
        let (ap, bp, yp) = (self.addr(&a), b.map_or(0, |b| self.addr(&b)), self.addr(&y));
        let args = kargs::NnPointwise {
            op,
            a: In(ap),
            b: In(bp),
            y: Out(yp),
            total,
        };
        // SAFETY: nn_pointwise_A(op, a, b, y, total); a and y hold `total` floats, and b does
        // for the ops that read it (callers pass b for exactly those).
        unsafe { self.launch_flat(&args, s.numel())? };
        Ok(GpuTensor::wrap(y))
    }
}
