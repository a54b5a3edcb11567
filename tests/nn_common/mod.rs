//! Helpers shared by the network tests.
#![allow(dead_code)]

use senet::nn::{Module, Network, Real, Slot};
use senet::rng;
use senet::{Layout, Shape, Tensor};

/// A fresh seed, printed so a failure can be replayed (`SENET_TEST_SEED=...`).
pub fn seed(label: &str) -> u64 {
    let s = std::env::var("SENET_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rng::fresh_seed);
    eprintln!("{label}: seed {s}");
    s
}

/// Rounds to a multiple of 2^-20, so the value and the value plus or minus 2^-20 or 2^-21
/// are exact in f32 when below 1 in magnitude (the SE op takes f32 weights).
pub fn quantize(v: f64) -> f64 {
    (v * (1u64 << 20) as f64).round() / (1u64 << 20) as f64
}

/// A random NCHW tensor with values in `[-1, 1)`, quantized.
pub fn random_tensor<E: Real>(s: Shape, seed: u64) -> Tensor<E> {
    let v = rng::uniform_vec(s.numel(), -1.0, 1.0, seed)
        .into_iter()
        .map(|x| E::from_f64(quantize(x as f64)))
        .collect();
    Tensor::from_vec(s, Layout::Nchw, v).unwrap()
}

/// Sets every parameter and buffer of a state visitor to random, quantized values:
/// parameters in `[-0.6, 0.6)`, running means in `[-0.3, 0.3)`, running variances in
/// `[0.5, 1.5)`.
pub fn randomize_slots<'a, E: Real>(seed: u64) -> impl FnMut(String, Slot<'a, E>) {
    let mut k = 0u64;
    move |name: String, slot: Slot<'a, E>| {
        k += 1;
        let s = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (p, lo, hi) = match slot {
            Slot::Param(p) => (p, -0.6, 0.6),
            Slot::Buffer(p) if name.ends_with("running_var") => (p, 0.5, 1.5),
            Slot::Buffer(p) => (p, -0.3, 0.3),
            Slot::Counter(c) => {
                *c = 3;
                return;
            }
        };
        let v = rng::uniform_vec(p.numel(), lo, hi, s)
            .into_iter()
            .map(|x| E::from_f64(quantize(x as f64)))
            .collect();
        p.set(v).unwrap();
    }
}

/// Randomizes a module's parameters and buffers.
pub fn randomize_module<E: Real, M: Module<E>>(m: &mut M, seed: u64) {
    let mut f = randomize_slots::<E>(seed);
    m.visit_mut("", &mut f);
}

/// Randomizes a network's parameters and buffers.
pub fn randomize_network<E: Real>(net: &mut Network<E>, seed: u64) {
    let mut f = randomize_slots::<E>(seed);
    net.visit_state_mut(&mut f);
}

/// Every trainable parameter's gradient, by name.
pub fn grads<E: Real>(net: &mut Network<E>) -> Vec<(String, Vec<f64>)> {
    net.parameters_mut()
        .map(|(n, p)| (n, p.grad.iter().map(|v| v.to_f64()).collect()))
        .collect()
}

/// The CUDA network backends to test, with poisoned outputs: the kernel emulator (when this
/// build has it) and a real device when one is present. Without a device it prints one
/// "skipped" line; with SENET_REQUIRE_GPU=1 a missing device is a failure.
/// SENET_TEST_EMULATOR=0 leaves the emulator out (GPU machines, where it only costs time).
pub fn cuda_backends() -> Vec<senet::nn::Cuda> {
    use senet::cuda::CudaDevice;
    use std::io::Write;
    let mut out = Vec::new();
    if std::env::var("SENET_TEST_EMULATOR").as_deref() != Ok("0") {
        match CudaDevice::emulator() {
            Ok(d) => out.push(senet::nn::Cuda::new(d).with_poison(true)),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "skipped on the emulator: {e}");
            }
        }
    }
    let require = std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1");
    let err = if senet::cuda::kernels_built() {
        match CudaDevice::new(0) {
            Ok(d) => {
                out.push(senet::nn::Cuda::new(d).with_poison(true));
                return out;
            }
            Err(e) => e.to_string(),
        }
    } else {
        senet::Error::KernelsNotBuilt.to_string()
    };
    assert!(
        !require,
        "SENET_REQUIRE_GPU=1 but no usable CUDA device: {err}"
    );
    let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({err})");
    out
}
