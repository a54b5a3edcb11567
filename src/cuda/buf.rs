//! Buffers that live either in CUDA device memory or, for the CPU emulator, in host memory that
//! is only ever touched through raw addresses (as device memory is).

use super::view::DeviceId;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use std::alloc::{self, Layout};
use std::marker::PhantomData;

/// Element types of device buffers: plain old data with an all-zeros value.
pub trait DevElem:
    DeviceRepr + ValidAsZeroBits + bytemuck::Pod + Default + Send + Sync + 'static
{
}
impl DevElem for f32 {}
impl DevElem for u32 {}
impl DevElem for u8 {}
impl DevElem for f64 {}
impl DevElem for half::f16 {}
impl DevElem for half::bf16 {}

/// A buffer of `T` on a device (or in the emulator's memory).
pub(crate) enum Buf<T: DevElem> {
    Cuda(CudaSlice<T>),
    Host(HostBuf<T>),
}

impl<T: DevElem> Buf<T> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Buf::Cuda(s) => s.len(),
            Buf::Host(h) => h.len,
        }
    }

    /// The device the buffer belongs to.
    pub(crate) fn owner(&self) -> DeviceId {
        match self {
            Buf::Cuda(s) => DeviceId::Cuda {
                ordinal: s.context().ordinal(),
                context: s.context().cu_ctx() as usize,
            },
            Buf::Host(h) => DeviceId::Emulator(h.owner),
        }
    }
}

/// Host memory standing in for device memory: 256-byte aligned (like cudaMalloc), zeroed, and
/// accessed only through raw addresses, never through Rust references that could alias a
/// kernel's writes.
pub(crate) struct HostBuf<T> {
    ptr: *mut u8,
    len: usize,
    /// The emulator instance that allocated it.
    owner: u64,
    layout: Layout,
    _t: PhantomData<T>,
}

// SAFETY: the buffer owns its allocation outright (like a CudaSlice owns device memory); every
// access goes through the device's synchronous operations, which take `&self` / `&mut self`.
unsafe impl<T: Send> Send for HostBuf<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Sync> Sync for HostBuf<T> {}

impl<T: DevElem> HostBuf<T> {
    pub(crate) fn zeros(len: usize, owner: u64) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?.max(1);
        let layout = Layout::from_size_align(bytes, 256).ok()?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(HostBuf {
            ptr,
            len,
            owner,
            layout,
            _t: PhantomData,
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Copies `src` to elements `[offset, offset + src.len())`.
    pub(crate) fn write(&mut self, offset: usize, src: &[T]) {
        assert!(
            offset + src.len() <= self.len,
            "host buffer write out of bounds"
        );
        // SAFETY: in bounds (checked), T is Pod, and the allocation is 256-byte aligned so
        // element `offset` is aligned for T.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (self.ptr as *mut T).add(offset), src.len())
        }
    }

    /// Copies elements `[offset, offset + len)` out.
    pub(crate) fn read(&self, offset: usize, len: usize) -> Vec<T> {
        assert!(offset + len <= self.len, "host buffer read out of bounds");
        let mut v = vec![T::default(); len];
        // SAFETY: in bounds (checked); T is Pod.
        unsafe {
            std::ptr::copy_nonoverlapping((self.ptr as *const T).add(offset), v.as_mut_ptr(), len)
        }
        v
    }

    /// Sets `len` elements from `offset` to the byte `b`.
    pub(crate) fn fill_bytes(&mut self, offset: usize, len: usize, b: u8) {
        assert!(offset + len <= self.len, "host buffer fill out of bounds");
        // SAFETY: in bounds (checked); every bit pattern is a valid T (Pod).
        unsafe { std::ptr::write_bytes((self.ptr as *mut T).add(offset), b, len) }
    }

    /// Copies `len` elements from `src[src_off..]` to `self[dst_off..]`.
    pub(crate) fn copy_from(
        &mut self,
        dst_off: usize,
        src: &HostBuf<T>,
        src_off: usize,
        len: usize,
    ) {
        assert!(
            dst_off + len <= self.len && src_off + len <= src.len,
            "host buffer copy out of bounds"
        );
        // SAFETY: both ranges in bounds; `ptr::copy` allows overlap.
        unsafe {
            std::ptr::copy(
                (src.ptr as *const T).add(src_off),
                (self.ptr as *mut T).add(dst_off),
                len,
            )
        }
    }
}

impl<T> Drop for HostBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeros` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}
