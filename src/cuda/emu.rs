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

/// Planted-bug tests: one tiny test-only kernel per bug class (kernels/emu/planted.cu), each
/// launched on the emulator and required to be caught by the detector of this build (plain,
/// or `SENET_EMU_SANITIZE` = thread / address / initcheck; scripts/sanitize.sh runs them all).
/// A sanitizer stops the process, so those cases run in a child process (this test binary,
/// filtered to the one test, with `SENET_PLANTED_CHILD=1`) whose failure and report are checked.
#[cfg(all(test, senet_emu))]
mod planted {
    use super::launch;
    use std::ffi::c_void;
    use std::process::Command;

    /// The build's checking mode ("" for a plain build).
    fn mode() -> &'static str {
        if cfg!(senet_emu_sanitize = "thread") {
            "thread"
        } else if cfg!(senet_emu_sanitize = "address") {
            "address"
        } else if cfg!(senet_emu_sanitize = "initcheck") {
            "initcheck"
        } else {
            ""
        }
    }

    fn child() -> bool {
        std::env::var_os("SENET_PLANTED_CHILD").is_some()
    }

    /// `var`'s value in this process (scripts/sanitize.sh's suppressions and the like) with `add`.
    fn with_env(var: &str, add: &str) -> String {
        format!("{} {add}", std::env::var(var).unwrap_or_default())
    }

    /// Runs test `name` alone in a child process; returns (success, stdout + stderr).
    fn run_child(name: &str) -> (bool, String) {
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(exe)
            .args([
                "--exact",
                &format!("cuda::emu::planted::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SENET_PLANTED_CHILD", "1")
            .env(
                "TSAN_OPTIONS",
                with_env("TSAN_OPTIONS", "halt_on_error=1 exitcode=66"),
            )
            .env(
                "ASAN_OPTIONS",
                with_env("ASAN_OPTIONS", "detect_leaks=0 verify_asan_link_order=0"),
            )
            .env(
                "UBSAN_OPTIONS",
                with_env("UBSAN_OPTIONS", "print_stacktrace=1"),
            )
            .output()
            .expect("run the child test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Asserts the child run of `name` failed and its report names every string of `needles`.
    fn expect_caught(name: &str, needles: &[&str]) {
        let (ok, text) = run_child(name);
        assert!(!ok, "{name}: the planted bug was not caught:\n{text}");
        for n in needles {
            assert!(text.contains(n), "{name}: report lacks {n:?}:\n{text}");
        }
        eprintln!("{name}: caught as expected");
    }

    fn arg<T>(v: &mut T) -> *mut c_void {
        v as *mut T as *mut c_void
    }

    /// A 256-byte-aligned zeroed host buffer standing in for device memory.
    fn buf<T: crate::cuda::DevElem>(len: usize) -> crate::cuda::buf::HostBuf<T> {
        crate::cuda::buf::HostBuf::zeros(len, 0).expect("host buffer")
    }

    fn missing_sync(fixed: bool) -> crate::error::Result<Vec<f32>> {
        let out = buf::<f32>(64);
        let mut p = out.addr();
        let name = if fixed {
            "senet_planted_missing_sync_fixed"
        } else {
            "senet_planted_missing_sync"
        };
        // SAFETY: one pointer argument to 64 floats, 64 threads.
        unsafe { launch(name, (1, 1, 1), (64, 1, 1), 0, 1, &mut [arg(&mut p)])? };
        Ok(out.read(0, 64))
    }

    fn expected_neighbours() -> Vec<f32> {
        (0..64).map(|t| ((t + 1) % 64) as f32).collect()
    }

    #[test]
    fn planted_missing_sync() {
        // The fixed kernel is clean under every detector.
        if !child() {
            assert_eq!(missing_sync(true).unwrap(), expected_neighbours());
        }
        match mode() {
            "thread" if !child() => expect_caught(
                "planted_missing_sync",
                &[
                    "ThreadSanitizer: data race",
                    "senet_planted_missing_sync",
                    "planted.cu",
                ],
            ),
            "initcheck" => {
                let err = missing_sync(false).unwrap_err().to_string();
                assert!(
                    err.contains("initcheck") && err.contains("__shared__ s"),
                    "{err}"
                );
            }
            _ => {
                // Plain and address builds (or the TSan child): in the emulator's default order
                // thread t reads slot t + 1 before thread t + 1 writes it, so it sees the poison
                // the block's shared memory starts with, never the neighbour's value. With a
                // seeded shuffle (SENET_EMU_SEED) some threads may read a written value, never all.
                let got = missing_sync(false).unwrap();
                assert_ne!(got, expected_neighbours());
                assert!(got.iter().any(|v| v.is_nan()), "{got:?}");
            }
        }
    }

    fn block_race(fixed: bool, blocks: u32) -> crate::error::Result<u32> {
        let c = buf::<u32>(1);
        let mut p = c.addr();
        let name = if fixed {
            "senet_planted_block_race_fixed"
        } else {
            "senet_planted_block_race"
        };
        // SAFETY: one pointer to a u32.
        unsafe { launch(name, (blocks, 1, 1), (32, 1, 1), 0, 1, &mut [arg(&mut p)])? };
        Ok(c.read(0, 1)[0])
    }

    #[test]
    fn planted_block_race() {
        if child() {
            block_race(false, 64).unwrap();
            return;
        }
        assert_eq!(block_race(true, 64).unwrap(), 64);
        if mode() == "thread" {
            expect_caught(
                "planted_block_race",
                &[
                    "ThreadSanitizer: data race",
                    "senet_planted_block_race",
                    "planted.cu",
                    "SENET_EMU_SEED=",
                ],
            );
        } else {
            eprintln!(
                "planted_block_race: cross-block races need the thread build (scripts/sanitize.sh)"
            );
        }
    }

    fn misaligned(via_helper: bool) -> crate::error::Result<()> {
        let input = buf::<u8>(64);
        let out = buf::<u32>(4);
        let (mut i, mut off, mut via, mut o) = (input.addr(), 4u32, via_helper as u32, out.addr());
        // SAFETY: 64 input bytes (the load reads bytes 4..20), one uint4 out.
        unsafe {
            launch(
                "senet_planted_misaligned",
                (1, 1, 1),
                (1, 1, 1),
                0,
                1,
                &mut [arg(&mut i), arg(&mut off), arg(&mut via), arg(&mut o)],
            )
        }
    }

    #[test]
    fn planted_misaligned_vector() {
        if child() {
            let _ = misaligned(false);
            return;
        }
        // Every build: the vector helpers check alignment and name the kernel and address.
        let err = misaligned(true).unwrap_err().to_string();
        assert!(
            err.contains("misaligned 16-byte __ldg")
                && err.contains("senet_planted_misaligned")
                && err.contains("% 16 = 4"),
            "{err}"
        );
        if mode() == "address" {
            expect_caught(
                "planted_misaligned_vector",
                &[
                    "misaligned address",
                    "senet_planted_misaligned",
                    "planted.cu",
                ],
            );
        }
    }

    #[test]
    fn planted_oob_global() {
        let run = || {
            let input = buf::<f32>(16);
            let out = buf::<f32>(16);
            let (mut i, mut o, mut n) = (input.addr(), out.addr(), 16u32);
            // SAFETY: the planted bug reads in[16] (past the end) on purpose, in the checked child.
            unsafe {
                launch(
                    "senet_planted_oob_global",
                    (1, 1, 1),
                    (16, 1, 1),
                    0,
                    1,
                    &mut [arg(&mut i), arg(&mut o), arg(&mut n)],
                )
            }
        };
        if child() {
            let _ = run();
            return;
        }
        if mode() == "address" {
            expect_caught(
                "planted_oob_global",
                &[
                    "AddressSanitizer: heap-buffer-overflow",
                    "senet_planted_oob_global",
                    "planted.cu",
                    "0 bytes to the right of 64-byte region",
                ],
            );
        } else {
            eprintln!("planted_oob_global: out-of-bounds reads need the address build (scripts/sanitize.sh)");
        }
    }

    #[test]
    fn planted_oob_dynamic_smem() {
        let run = || {
            let out = buf::<f32>(16);
            let (mut o, mut n) = (out.addr(), 16u32);
            // SAFETY: the planted bug reads dynamic shared memory past its end, in the child.
            unsafe {
                launch(
                    "senet_planted_oob_dynamic_smem",
                    (1, 1, 1),
                    (16, 1, 1),
                    64,
                    1,
                    &mut [arg(&mut o), arg(&mut n)],
                )
            }
        };
        if child() {
            let _ = run();
            return;
        }
        if mode() == "address" {
            expect_caught(
                "planted_oob_dynamic_smem",
                &[
                    "AddressSanitizer: heap-buffer-overflow",
                    "senet_planted_oob_dynamic_smem",
                    "0 bytes to the right of 64-byte region",
                ],
            );
        } else {
            eprintln!(
                "planted_oob_dynamic_smem: out-of-bounds reads need the address build (scripts/sanitize.sh)"
            );
        }
    }

    fn uninit(dynamic: bool) -> crate::error::Result<Vec<f32>> {
        let out = buf::<f32>(64);
        let (mut o, mut d) = (out.addr(), dynamic as u32);
        // SAFETY: 64 floats out, 64 threads, 256 bytes of dynamic shared memory.
        unsafe {
            launch(
                "senet_planted_uninit_shared",
                (1, 1, 1),
                (64, 1, 1),
                256,
                1,
                &mut [arg(&mut o), arg(&mut d)],
            )?
        };
        Ok(out.read(0, 64))
    }

    #[test]
    fn planted_uninit_shared() {
        for dynamic in [false, true] {
            if mode() == "initcheck" {
                let err = uninit(dynamic).unwrap_err().to_string();
                let what = if dynamic {
                    "dynamic shared memory + "
                } else {
                    "__shared__ st + "
                };
                assert!(err.contains("initcheck") && err.contains(what), "{err}");
                // The reported byte is in the unwritten second half (offsets 128..256).
                let off: usize = err
                    .split(what)
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{err}"));
                assert!((128..256).contains(&off), "{err}");
            } else {
                // Every build poisons shared memory per block: the unwritten half reads NaN
                // (and stays NaN on a second launch, which an unpoisoned static would not).
                for _ in 0..2 {
                    let got = uninit(dynamic).unwrap();
                    assert!(got[..32].iter().all(|&v| v == 1.0), "{got:?}");
                    assert!(got[32..].iter().all(|v| v.is_nan()), "{got:?}");
                }
            }
        }
    }
}
