//! Borrowed device memory: views of buffers senet does not own (a framework's activations,
//! weights, gradients and workspace), each knowing the device it belongs to.
//!
//! A view is an address, a length in elements and an owner ([`DeviceId`]). Every op checks each
//! operand's owner against the handle it runs on before it queues anything, so a buffer of another
//! device is [`Error::WrongDevice`](crate::Error::WrongDevice) naming the operand, never a wrong
//! read.
//!
//! Views of cudarc buffers take part in cudarc's stream synchronisation: making the view makes
//! the handle's stream wait for the buffer's last use on another stream (when the context tracks
//! events), and dropping the view records the use. Drop views only after the op that read or
//! wrote them has returned: the op queues its launches before it returns, so the recorded event
//! follows them.

use super::buf::DevElem;
use super::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::marker::PhantomData;
use std::ops::Range;

/// The device a buffer belongs to: a CUDA context on a device, or one instance of the CPU
/// emulator. [`CudaDevice::id`] gives a handle's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceId {
    /// A CUDA context (its `CUcontext` address) on device `ordinal`.
    Cuda {
        /// Device ordinal.
        ordinal: usize,
        /// The context's handle, as an address.
        context: usize,
    },
    /// One instance of the kernel emulator ([`CudaDevice::emulator`]).
    Emulator(u64),
    /// Memory that is no device's: a raw address the driver does not know.
    Unknown,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceId::Cuda { ordinal, context } => {
                write!(f, "CUDA device {ordinal} (context {context:#x})")
            }
            DeviceId::Emulator(i) => write!(f, "kernel emulator #{i}"),
            DeviceId::Unknown => f.write_str("no device known to the driver"),
        }
    }
}

/// The owner of a cudarc buffer: its stream's context.
fn cudarc_owner<T, S: DeviceSlice<T>>(s: &S) -> DeviceId {
    let ctx = s.stream().context();
    DeviceId::Cuda {
        ordinal: ctx.ordinal(),
        context: ctx.cu_ctx() as usize,
    }
}

/// A read-only view of `len` elements of type `T` at a device address.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    addr: u64,
    len: usize,
    owner: DeviceId,
    _guard: Option<SyncOnDrop<'a>>,
    _t: PhantomData<&'a [T]>,
}

/// A writable view of `len` elements of type `T` at a device address.
#[derive(Debug)]
pub struct DeviceViewMut<'a, T> {
    addr: u64,
    len: usize,
    owner: DeviceId,
    _guard: Option<SyncOnDrop<'a>>,
    _t: PhantomData<&'a mut [T]>,
}

fn sub_range(len: usize, r: &Range<usize>) -> Result<()> {
    if r.start <= r.end && r.end <= len {
        Ok(())
    } else {
        Err(Error::Length {
            what: "device view range",
            got: len,
            expected: r.end.max(r.start),
        })
    }
}

macro_rules! view_common {
    ($name:ident) => {
        impl<'a, T: DevElem> $name<'a, T> {
            /// Elements in the view.
            pub fn len(&self) -> usize {
                self.len
            }

            /// True for a view of no elements.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            /// The device address of the first element.
            pub fn addr(&self) -> u64 {
                self.addr
            }

            /// The device the memory belongs to.
            pub fn device(&self) -> DeviceId {
                self.owner
            }

            /// Elements `range` of this view (the view's synchronisation goes with it).
            pub fn slice(self, range: Range<usize>) -> Result<Self> {
                sub_range(self.len, &range)?;
                Ok($name {
                    addr: self.addr + (range.start * std::mem::size_of::<T>()) as u64,
                    len: range.end - range.start,
                    ..self
                })
            }

            /// Errors with [`Error::WrongDevice`] naming `operand` unless the memory belongs to
            /// `dev`.
            pub(crate) fn check_on(&self, dev: &CudaDevice, operand: &'static str) -> Result<()> {
                check_owner(self.owner, dev, operand)
            }

            /// A view of memory senet owns (a [`DeviceTensor`](super::DeviceTensor) or scratch),
            /// used only on its handle's one stream, so no cudarc event is needed.
            pub(crate) fn owned(addr: u64, len: usize, owner: DeviceId) -> Self {
                $name {
                    addr,
                    len,
                    owner,
                    _guard: None,
                    _t: PhantomData,
                }
            }
        }
    };
}

view_common!(DeviceView);
view_common!(DeviceViewMut);

/// Errors with [`Error::WrongDevice`] naming `operand` unless `owner` is `dev`.
pub(crate) fn check_owner(owner: DeviceId, dev: &CudaDevice, operand: &'static str) -> Result<()> {
    if owner == dev.id() {
        Ok(())
    } else {
        Err(Error::WrongDevice {
            operand,
            detail: format!("it belongs to {owner}, the op runs on {}", dev.id()),
        })
    }
}

impl<'a, T: DevElem> DeviceView<'a, T> {
    /// A view of a cudarc buffer (`CudaSlice` or `CudaView`) for an op on `dev`: `dev`'s stream
    /// waits for the buffer's last write on another stream, and the read is recorded when the view
    /// is dropped. A buffer of another context (or one handed to the emulator) makes a view that
    /// every op refuses with [`Error::WrongDevice`].
    pub fn from_cudarc<S: DevicePtr<T>>(dev: &'a CudaDevice, s: &'a S) -> Self {
        let owner = cudarc_owner(s);
        let (addr, guard) = match dev.stream() {
            Some(stream) if owner == dev.id() => s.device_ptr(stream),
            // Refused by every op: the address is only reported, never used.
            _ => s.device_ptr(s.stream()),
        };
        DeviceView {
            addr,
            len: s.len(),
            owner,
            _guard: Some(guard),
            _t: PhantomData,
        }
    }

    /// A view of `len` elements at device address `addr` for an op on `dev`. On a GPU the driver
    /// is asked which device the address belongs to (memory of another device, or host memory,
    /// is then refused by every op); on the emulator the address is taken to be an emulator
    /// allocation of `dev`.
    ///
    /// # Safety
    /// `addr` must point to `len` readable elements of `T` that stay allocated, and are not
    /// written by anyone else, until every op queued with the view has finished on the device.
    pub unsafe fn from_raw(dev: &CudaDevice, addr: u64, len: usize) -> Self {
        DeviceView {
            addr,
            len,
            owner: dev.owner_of_address(addr),
            _guard: None,
            _t: PhantomData,
        }
    }
}

impl<'a, T: DevElem> DeviceViewMut<'a, T> {
    /// A writable view of a cudarc buffer (`CudaSlice` or `CudaViewMut`) for an op on `dev`:
    /// `dev`'s stream waits for the buffer's last use on another stream, and the write is
    /// recorded when the view is dropped. A buffer of another context makes a view that every op
    /// refuses with [`Error::WrongDevice`].
    pub fn from_cudarc<S: DevicePtrMut<T>>(dev: &'a CudaDevice, s: &'a mut S) -> Self {
        let owner = cudarc_owner(s);
        let len = s.len();
        let (addr, guard) = match dev.stream() {
            Some(stream) if owner == dev.id() => s.device_ptr_mut(stream),
            _ => {
                let stream = s.stream().clone();
                let (addr, guard) = s.device_ptr_mut(&stream);
                drop(guard);
                return DeviceViewMut {
                    addr,
                    len,
                    owner,
                    _guard: None,
                    _t: PhantomData,
                };
            }
        };
        DeviceViewMut {
            addr,
            len,
            owner,
            _guard: Some(guard),
            _t: PhantomData,
        }
    }

    /// A writable view of `len` elements at device address `addr` for an op on `dev` (owner
    /// found as [`DeviceView::from_raw`] does).
    ///
    /// # Safety
    /// `addr` must point to `len` writable elements of `T` that stay allocated, and are not read
    /// or written by anyone else, until every op queued with the view has finished on the device.
    pub unsafe fn from_raw(dev: &CudaDevice, addr: u64, len: usize) -> Self {
        DeviceViewMut {
            addr,
            len,
            owner: dev.owner_of_address(addr),
            _guard: None,
            _t: PhantomData,
        }
    }

    /// A read-only view of the same memory (for an op that reads what an earlier one wrote).
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView::owned(self.addr, self.len, self.owner)
    }
}
