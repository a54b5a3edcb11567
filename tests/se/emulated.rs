//! The GPU kernels and every path run on the CPU emulator (kernels/emu) against the reference:
//! the same kernel sources and launch code as on a GPU, so indexing, vector-path and alignment
//! logic, split reductions, barriers and the cluster kernels' DSMEM exchanges are checked on
//! machines without one. Timing and the hardware memory model are not; tests/gpu.rs is the
//! real thing.

use crate::common::cases;
use crate::common::*;
use half::{bf16, f16};
use senet::cuda::{CudaDevice, CudaElement};
use senet::{Layout, Shape};
use std::sync::Arc;

fn emulator() -> Option<Arc<CudaDevice>> {
    match CudaDevice::emulator() {
        Ok(d) => Some(d),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: {e}");
            None
        }
    }
}

/// Unfriendly shapes (C = 1, 3, 17, 300; HW = 1, 3, 15, 49, 1089; N = 1, 2, 3) that between
/// them reach every kernel variant: NCHW staged and split-row pooling (1x8x33x33: splits with
/// partials and tickets), NHWC vector and scalar tiles, split-K GEMMs with tickets (C = 300),
/// the cluster kernels over more samples than resident clusters. With SENET_FULL_TESTS=1 also
/// C = 1000, a batch of 130 and of 300 (split-K over samples in the weight gradients),
/// mid-sized shapes whose samples span several CTAs of a cluster and several chunks, and a
/// sample whose cluster forward fits but backward does not.
fn shapes() -> Vec<Shape> {
    let mut v = vec![
        Shape::new(1, 1, 1, 1),
        Shape::new(2, 3, 1, 3),
        Shape::new(1, 17, 7, 7),
        Shape::new(3, 16, 3, 5),
        Shape::new(1, 8, 33, 33),
        Shape::new(2, 300, 1, 3),
    ];
    if full() {
        v.extend([
            Shape::new(2, 1000, 1, 3),
            Shape::new(130, 8, 1, 2),
            Shape::new(3, 17, 1, 1),
            Shape::new(2, 24, 45, 45),
            Shape::new(300, 40, 2, 3),
            Shape::new(2, 64, 28, 28),
            Shape::new(1, 72, 56, 57),
            // A cluster forward fits (one 120 KB slice per CTA), its backward (two) does not.
            Shape::new(1, 8, 150, 200),
        ]);
    }
    v
}

fn run<T: CudaElement>(layout: Layout) {
    let Some(dev) = emulator() else { return };
    let seed = seed(&format!("emulated {} {layout}", T::DTYPE));
    // Every gate x bias x epilogue at the small shapes; half of them, rotating, above. Under a
    // checking emulator (scripts/sanitize.sh): every shape, half its combinations; one under
    // ThreadSanitizer (each launch's fibers cost ~1 s there), rotating so all appear.
    let big = if full() { 20_000 } else { 2_000 };
    let list = cases::cases(layout, &shapes(), |s| match sanitizer().as_deref() {
        Some("thread") => 1,
        Some(_) => 4,
        None if s.numel() > big => 4,
        None => 8,
    });
    cases::run_all::<T>(&dev, &format!("emulated {layout}"), &list, seed);
}

#[test]
fn emulated_f32_nchw() {
    run::<f32>(Layout::Nchw);
}
#[test]
fn emulated_f32_nhwc() {
    run::<f32>(Layout::Nhwc);
}
#[test]
fn emulated_f16_nchw() {
    run::<f16>(Layout::Nchw);
}
#[test]
fn emulated_f16_nhwc() {
    run::<f16>(Layout::Nhwc);
}
#[test]
fn emulated_bf16_nchw() {
    run::<bf16>(Layout::Nchw);
}
#[test]
fn emulated_bf16_nhwc() {
    run::<bf16>(Layout::Nhwc);
}

#[test]
fn emulated_in_place_forward() {
    let Some(dev) = emulator() else { return };
    cases::in_place_matches(&dev, seed("emulated in_place"));
}

/// Cluster launches at several sizes in turn (a larger after a smaller).
#[test]
fn emulated_cluster_sizes_in_any_order() {
    let Some(dev) = emulator() else { return };
    cases::cluster_sizes_in_any_order(&dev, seed("emulated cluster sizes"));
}

#[test]
fn emulated_invalid_inputs_are_errors() {
    let Some(dev) = emulator() else { return };
    cases::invalid_inputs_are_errors(&dev);
}

/// Every operand of forward and backward from a second emulator instance is refused, naming
/// the operand, before anything is written.
#[test]
fn emulated_wrong_device_operands_are_refused() {
    let (Some(a), Some(b)) = (emulator(), emulator()) else {
        return;
    };
    assert_ne!(a.id(), b.id());
    let w = weights(
        12,
        4,
        true,
        senet::Activation::Relu,
        senet::Gate::Sigmoid,
        seed("emulated wrong device"),
    );
    crate::common::views::wrong_device_operands_are_refused(&a, &b, &w);
}
