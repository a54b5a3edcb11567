//! The Rust side of the kernel emulator (kernels/emu): availability and the launch call.

use crate::error::{Error, Result};
#[cfg(senet_emu)]
use std::ffi::c_char;
use std::ffi::{c_void, CString};

#[cfg(senet_emu)]
extern "C" {
    fn senet_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        cluster: u32,
        args: *mut *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
}

/// True if build.rs compiled the emulator.
pub(crate) fn available() -> bool {
    cfg!(senet_emu)
}

/// Runs kernel `name` on the CPU to completion.
///
/// # Safety
/// As [`CudaDevice::launch`](super::CudaDevice): `args` match the kernel's parameters and every
/// address among them is a live host allocation covering what the kernel touches.
#[allow(unused_variables)]
pub(crate) unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    cluster: u32,
    args: &mut [*mut c_void],
) -> Result<()> {
    #[cfg(senet_emu)]
    {
        let cname =
            CString::new(name).map_err(|_| Error::Config(format!("kernel name {name:?}")))?;
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        let mut err = vec![0u8; 512];
        // SAFETY: the name and arrays are valid for the call; `args` per this function's
        // contract; `err` holds `err.len()` bytes.
        let rc = unsafe {
            senet_emu_launch(
                cname.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                smem,
                cluster,
                args.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            return Err(Error::KernelFailed(
                String::from_utf8_lossy(&err[..end]).into_owned(),
            ));
        }
        Ok(())
    }
    #[cfg(not(senet_emu))]
    {
        let _ = CString::new(name);
        Err(Error::Unsupported(
            "this build has no kernel emulator".into(),
        ))
    }
}
