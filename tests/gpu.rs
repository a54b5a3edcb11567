//! Every GPU kernel and path against the f64 reference, on a real device (tests/common/cases.rs
//! has the per-case checks).
//!
//! Without a device each test prints "skipped: no CUDA device" and passes; with
//! SENET_REQUIRE_GPU=1 a missing device fails. Each test collects every mismatch before failing,
//! so one run on a GPU machine reports all of them.

mod common;

use common::cases;
use common::*;
use half::{bf16, f16};
use senet::cuda::{CudaElement, DeviceTensor};
use senet::se::cuda::{self as secuda, DeviceSeWeights, SeOptions, SePath};
use senet::{Activation, Gate, Layout, Shape, Tensor};

fn unfriendly_shapes() -> Vec<Shape> {
    vec![
        Shape::new(1, 1, 1, 1),
        Shape::new(2, 3, 1, 3),
        Shape::new(1, 17, 7, 7),
        Shape::new(3, 17, 1, 1),
        Shape::new(2, 1000, 1, 3),
        Shape::new(2, 1000, 7, 7),
        Shape::new(1, 3, 3, 1),
        Shape::new(2, 24, 45, 45),
        Shape::new(300, 40, 2, 3),
        Shape::new(1, 64, 56, 57),
    ]
}

fn friendly_shapes() -> Vec<Shape> {
    vec![
        Shape::new(2, 256, 56, 56),
        Shape::new(2, 512, 28, 28),
        Shape::new(2, 1024, 14, 14),
        Shape::new(2, 2048, 7, 7),
    ]
}

/// SENET_GPU_CASES=small: a reduced list for slow runs (compute-sanitizer).
fn small() -> bool {
    std::env::var("SENET_GPU_CASES").as_deref() == Ok("small")
}

fn run_all<T: CudaElement>(layout: Layout) {
    let Some(dev) = gpu() else { return };
    let seed = seed(&format!("gpu {} {layout}", T::DTYPE));
    let list = if small() {
        let shapes = [
            Shape::new(2, 3, 1, 3),
            Shape::new(1, 17, 7, 7),
            Shape::new(2, 24, 45, 45),
            Shape::new(2, 512, 28, 28),
        ];
        cases::cases(layout, &shapes, 0)
    } else {
        let mut shapes = unfriendly_shapes();
        shapes.extend(friendly_shapes());
        cases::cases(layout, &shapes, usize::MAX)
    };
    cases::run_all::<T>(&dev, &format!("gpu {layout}"), &list, seed);
}

#[test]
fn gpu_f32_nchw() {
    run_all::<f32>(Layout::Nchw);
}
#[test]
fn gpu_f32_nhwc() {
    run_all::<f32>(Layout::Nhwc);
}
#[test]
fn gpu_f16_nchw() {
    run_all::<f16>(Layout::Nchw);
}
#[test]
fn gpu_f16_nhwc() {
    run_all::<f16>(Layout::Nhwc);
}
#[test]
fn gpu_bf16_nchw() {
    run_all::<bf16>(Layout::Nchw);
}
#[test]
fn gpu_bf16_nhwc() {
    run_all::<bf16>(Layout::Nhwc);
}

/// Writing y over x gives what the out-of-place forward gives.
#[test]
fn gpu_in_place_forward() {
    let Some(dev) = gpu() else { return };
    cases::in_place_matches(&dev, seed("in_place"));
}

/// Bad input is an error before any launch, never a panic.
#[test]
fn gpu_invalid_inputs_are_errors() {
    let Some(dev) = gpu() else { return };
    cases::invalid_inputs_are_errors(&dev);
}

/// More than 2^31 elements: the 64-bit index path of squeeze and scale.
#[test]
fn gpu_more_than_2_pow_31_elements() {
    use rayon::prelude::*;
    let Some(dev) = gpu() else { return };
    if dev.info().total_memory < (12usize << 30) {
        println!("skipped: needs 12 GiB of device memory");
        return;
    }
    for layout in Layout::ALL {
        // C = 8: whole 16-byte vectors per pixel in NHWC, so the vector paths carry the load.
        let shape = Shape::new(1, 8, 16385, 16385);
        assert!(shape.numel() > 1 << 31);
        let pattern = |i: usize| -> bf16 {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
            bf16::from_f32(h as f32 / 512.0 - 1.0)
        };
        let data: Vec<bf16> = (0..shape.numel()).into_par_iter().map(pattern).collect();
        let x = Tensor::from_vec(shape, layout, data).unwrap();
        let w = weights(8, 2, true, Activation::Relu, Gate::Sigmoid, 3);
        let dw = DeviceSeWeights::upload(&dev, &w).unwrap();
        let xd = DeviceTensor::from_host(&dev, &x).unwrap();
        let out = secuda::forward(
            &dev,
            &dw,
            &xd,
            None,
            SeOptions::with_path(SePath::ThreeKernel),
        )
        .unwrap();
        let sv = out.saved.download(&dev).unwrap();
        // Reference means in f64, in parallel.
        let hw = shape.hw();
        let z: Vec<f64> = (0..shape.n * shape.c)
            .into_par_iter()
            .map(|nc| {
                let (n, c) = (nc / shape.c, nc % shape.c);
                (0..hw)
                    .map(|p| x.data()[shape.offset(layout, n, c, p)].to_f64())
                    .sum::<f64>()
                    / hw as f64
            })
            .collect();
        assert_close(&format!("{layout} z"), &f64s(&sv.z), &z, 1e-5);
        let y = out.y.to_host(&dev).unwrap();
        // y = s * x element-wise, checked everywhere (the tail beyond 2^31 included).
        let worst = (0..shape.numel())
            .into_par_iter()
            .map(|i| {
                let (n, rest) = (i / shape.sample_numel(), i % shape.sample_numel());
                let c = match layout {
                    Layout::Nchw => rest / hw,
                    Layout::Nhwc => rest % shape.c,
                };
                let want = sv.s[n * shape.c + c] as f64 * x.data()[i].to_f64();
                let got = y.data()[i].to_f64();
                if got.is_nan() {
                    f64::INFINITY
                } else {
                    (got - want).abs()
                }
            })
            .reduce(|| 0.0, f64::max);
        assert!(worst <= 1e-2, "{layout}: worst |y - s x| = {worst}");
    }
}
