//! The SE op's tests in one binary: the f64 reference's own checks (finite differences, a case
//! by hand), the fast CPU path against it, and the GPU kernels on the CPU emulator
//! (tests/gpu.rs runs the same cases on a real device).

mod codegen;
#[path = "../common/mod.rs"]
mod common;
mod cpu;
mod emulated;
mod reference;
