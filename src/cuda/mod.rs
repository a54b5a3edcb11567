//! The CUDA side: device handles, device tensors, the kernel ABI and the embedded kernels.
//!
//! Nothing here panics on a machine without a GPU: [`CudaDevice::new`] reports a missing driver,
//! a missing device, or kernels that were not built as typed [`Error`](crate::Error)s.
//! [`CudaDevice::emulator`] runs the same kernels on the CPU, for tests.

pub mod abi;
mod buf;
mod device;
mod emu;
pub(crate) mod libs;
mod tensor;
pub mod testing;
mod view;

pub(crate) use buf::Buf;
pub use buf::DevElem;
pub use device::{CudaDevice, DeviceInfo};
pub use tensor::{CudaElement, DeviceTensor};
pub use view::{DeviceId, DeviceView, DeviceViewMut};

/// The kernels build.rs embedded (fatbins per module), the nvcc that built them, and ptxas's
/// resource report.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// True if this build carries GPU kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    kernels::KERNELS_BUILT
}

/// True if this build carries the CPU emulator of the kernels.
pub fn emulator_built() -> bool {
    emu::available()
}

/// ptxas's resource report for every kernel and arch: registers, shared memory, stack frame,
/// spills. Empty-ish when the kernels were not built.
pub fn ptxas_report() -> &'static str {
    kernels::PTXAS_REPORT
}

/// Kernel modules, one per `kernels/*.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Squeeze,
    Scale,
    Excite,
    Fused,
    #[cfg(feature = "nn")]
    Nn,
}

impl Module {
    pub(crate) const COUNT: usize = 5;

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Module::Squeeze => "squeeze",
            Module::Scale => "scale",
            Module::Excite => "excite",
            Module::Fused => "fused",
            #[cfg(feature = "nn")]
            Module::Nn => "nn",
        }
    }

    pub(crate) fn fatbin(self) -> &'static [u8] {
        match self {
            Module::Squeeze => kernels::SQUEEZE,
            Module::Scale => kernels::SCALE,
            Module::Excite => kernels::EXCITE,
            Module::Fused => kernels::FUSED,
            #[cfg(feature = "nn")]
            Module::Nn => kernels::NN,
        }
    }
}
