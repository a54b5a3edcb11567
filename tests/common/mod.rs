//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cases;
pub mod graph;
pub mod views;

use senet::cuda::CudaDevice;
use senet::{Activation, Gate, Init, Layout, SeConfig, SeWeights, Shape, Tensor};
use std::sync::Arc;

/// The exhaustive tier: `SENET_FULL_TESTS=1` (CI sets it) runs the full case lists, the large
/// shapes and the long training runs. Without it each test runs a smaller list that still
/// covers every kernel, path, dtype, layout, gate, bias and epilogue, so `cargo test` stays quick.
pub fn full() -> bool {
    std::env::var("SENET_FULL_TESTS").as_deref() == Ok("1")
}

/// The sanitizer tier: the checking emulator's mode (`thread`, `address`, `initcheck`) when
/// scripts/sanitize.sh runs the suite (`SENET_EMU_SANITIZE`). The SE lists then take every shape
/// of the quick list with four of each shape's eight gate / bias / epilogue combinations (one
/// under `thread`), rotating so each appears, as the checked kernels run several times slower.
pub fn sanitizer() -> Option<String> {
    std::env::var("SENET_EMU_SANITIZE")
        .ok()
        .filter(|v| !v.is_empty())
}

/// A fresh seed per call (printed, so a failure can be replayed with SENET_TEST_SEED).
pub fn seed(label: &str) -> u64 {
    let s = match std::env::var("SENET_TEST_SEED") {
        Ok(v) => v.parse().expect("SENET_TEST_SEED must be a u64"),
        Err(_) => senet::rng::fresh_seed(),
    };
    println!("{label}: seed {s}");
    s
}

/// The device every GPU test uses. Without a driver, a device or built kernels it prints one
/// "skipped: no CUDA device" line and returns None; with SENET_REQUIRE_GPU=1 that is a failure.
pub fn gpu() -> Option<Arc<CudaDevice>> {
    let require = std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1");
    let err = if senet::cuda::kernels_built() {
        match CudaDevice::new(0) {
            Ok(d) => return Some(d),
            Err(e) => e.to_string(),
        }
    } else {
        senet::Error::KernelsNotBuilt.to_string()
    };
    if require {
        panic!("SENET_REQUIRE_GPU=1 but no usable CUDA device: {err}");
    }
    // Written to stderr directly (not through print!), so libtest's capture does not hide it.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({err})");
    None
}

/// SE weights with random values (biases too), seeded.
pub fn weights(
    c: usize,
    d: usize,
    bias: bool,
    act: Activation,
    gate: Gate,
    seed: u64,
) -> SeWeights {
    let cfg = SeConfig::with_hidden(c, d)
        .unwrap()
        .bias(bias)
        .activation(act)
        .gate(gate);
    let mut w = SeWeights::init(cfg, Init::PyTorchDefault, seed).unwrap();
    // Larger weights than the default init so the gate leaves its linear region sometimes.
    for v in w.w1.iter_mut().chain(w.w2.iter_mut()) {
        *v *= 2.0;
    }
    w
}

/// A random tensor in `[-1, 1)`, rounded to T.
pub fn tensor<T: senet::Element>(shape: Shape, layout: Layout, seed: u64) -> Tensor<T> {
    Tensor::random(shape, layout, seed).unwrap()
}

/// Asserts relative L2 error within `tol`, naming what failed.
#[track_caller]
pub fn assert_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    let e = senet::rel_l2_error(out, reference);
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.1e}");
}

/// f32 slice widened.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
