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

/// SENET_GPU_CASES=small: a reduced list for slow runs (compute-sanitizer memcheck, synccheck);
/// `tiny`: two shapes, two combinations each, for racecheck (which did not finish the small list
/// in 110 s on an H200).
fn cases_setting() -> Option<String> {
    std::env::var("SENET_GPU_CASES").ok()
}

fn run_all<T: CudaElement>(layout: Layout) {
    let Some(dev) = gpu() else { return };
    let seed = seed(&format!("gpu {} {layout}", T::DTYPE));
    let setting = cases_setting();
    let list = if setting.as_deref() == Some("tiny") {
        let shapes = [Shape::new(1, 17, 7, 7), Shape::new(2, 24, 45, 45)];
        cases::cases(layout, &shapes, |_| 2)
    } else if setting.as_deref() == Some("small") {
        let shapes = [
            Shape::new(2, 3, 1, 3),
            Shape::new(1, 17, 7, 7),
            Shape::new(2, 24, 45, 45),
            Shape::new(2, 512, 28, 28),
        ];
        cases::cases(layout, &shapes, |_| 4)
    } else {
        let mut shapes = unfriendly_shapes();
        shapes.extend(friendly_shapes());
        cases::cases(layout, &shapes, |_| 8)
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

/// Cluster launches at several sizes in turn (a larger after a smaller).
#[test]
fn gpu_cluster_sizes_in_any_order() {
    let Some(dev) = gpu() else { return };
    cases::cluster_sizes_in_any_order(&dev, seed("cluster sizes"));
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

/// The caller's stream and memory: a handle made from a stream of the caller's (cudarc
/// `CudaSlice`s allocated on it as operands, a caller workspace) runs forward and backward on
/// that stream: the results are right after synchronising only that stream, and the same calls
/// captured into a CUDA graph on the stream (raw-address views, as PyTorch passes them) and
/// replayed give the same bits; so every launch and fill went to that stream. GPU operands
/// handed to an emulator handle, and emulator operands handed to the GPU, are refused.
#[test]
fn gpu_callers_stream_memory_and_graph_capture() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{CudaSlice, DevicePtr};
    use senet::cuda::{CudaDevice, DeviceView, DeviceViewMut};
    use senet::se::check;
    use senet::se::cuda::{
        Direction, SeBackwardViews, SeForwardViews, SeGradViewsMut, SeSavedViews, SeSavedViewsMut,
        SeWeightViews,
    };
    let Some(own) = gpu() else { return };
    let seed = seed("gpu caller stream");
    let stream = own.context().unwrap().new_stream().unwrap();
    let dev = CudaDevice::from_stream(stream.clone()).unwrap();
    assert_eq!(dev.id(), own.id(), "one context, one device identity");
    let (shape, layout) = (Shape::new(3, 40, 9, 11), Layout::Nhwc);
    let w = weights(40, 8, true, Activation::Relu, Gate::Sigmoid, seed);
    let (x, w) = check::input_off_kinks::<bf16>(w, shape, layout, seed + 1).unwrap();
    let cfg = w.config;
    let r =
        check::residual_off_kink(&w, &x, check::input(shape, layout, seed + 2).unwrap()).unwrap();
    let dy = check::input::<bf16>(shape, layout, seed + 3).unwrap();
    let exp = check::expected(&w, &x, Some(&r), &dy).unwrap();
    let (n, c, d, numel) = (shape.n, 40, 8, shape.numel());
    let up = |v: &[f32]| stream.clone_htod(v).unwrap();
    let (w1, b1, w2, b2) = (
        up(&w.w1),
        up(w.b1.as_ref().unwrap()),
        up(&w.w2),
        up(w.b2.as_ref().unwrap()),
    );
    let (xs, rs, dys) = (
        stream.clone_htod(x.data()).unwrap(),
        stream.clone_htod(r.data()).unwrap(),
        stream.clone_htod(dy.data()).unwrap(),
    );
    let zeros = |len: usize| stream.alloc_zeros::<f32>(len).unwrap();
    let (mut z, mut h, mut u, mut s) = (zeros(n * c), zeros(n * d), zeros(n * d), zeros(n * c));
    let (mut dw1, mut db1, mut dw2, mut db2) = (zeros(d * c), zeros(d), zeros(c * d), zeros(c));
    let mut y = stream.alloc_zeros::<bf16>(numel).unwrap();
    let mut dx = stream.alloc_zeros::<bf16>(numel).unwrap();
    let mut dres = stream.alloc_zeros::<bf16>(numel).unwrap();
    let opts = SeOptions::default();
    let ws_bytes = [Direction::Forward, Direction::Backward]
        .map(|dir| {
            secuda::workspace_bytes(&dev, &cfg, shape, layout, senet::DType::BF16, dir, opts)
                .unwrap()
        })
        .into_iter()
        .max()
        .unwrap();
    let mut ws: CudaSlice<u8> = stream.alloc_zeros(ws_bytes).unwrap();

    // 1. Views of the caller's cudarc buffers, on the caller's stream.
    {
        let weights = SeWeightViews {
            w1: DeviceView::from_cudarc(&dev, &w1),
            b1: Some(DeviceView::from_cudarc(&dev, &b1)),
            w2: DeviceView::from_cudarc(&dev, &w2),
            b2: Some(DeviceView::from_cudarc(&dev, &b2)),
        };
        let args = SeForwardViews {
            x: DeviceView::from_cudarc(&dev, &xs),
            residual: Some(DeviceView::from_cudarc(&dev, &rs)),
            y: DeviceViewMut::from_cudarc(&dev, &mut y),
            weights,
            saved: SeSavedViewsMut {
                z: DeviceViewMut::from_cudarc(&dev, &mut z),
                h: DeviceViewMut::from_cudarc(&dev, &mut h),
                u: DeviceViewMut::from_cudarc(&dev, &mut u),
                s: DeviceViewMut::from_cudarc(&dev, &mut s),
            },
        };
        let wsv = DeviceViewMut::from_cudarc(&dev, &mut ws);
        secuda::forward_views(&dev, &cfg, shape, layout, args, wsv, opts).unwrap();
    }
    {
        let args = SeBackwardViews {
            x: DeviceView::from_cudarc(&dev, &xs),
            residual: Some(DeviceView::from_cudarc(&dev, &rs)),
            dy: DeviceView::from_cudarc(&dev, &dys),
            weights: SeWeightViews {
                w1: DeviceView::from_cudarc(&dev, &w1),
                b1: Some(DeviceView::from_cudarc(&dev, &b1)),
                w2: DeviceView::from_cudarc(&dev, &w2),
                b2: Some(DeviceView::from_cudarc(&dev, &b2)),
            },
            saved: SeSavedViews {
                z: DeviceView::from_cudarc(&dev, &z),
                h: DeviceView::from_cudarc(&dev, &h),
                u: DeviceView::from_cudarc(&dev, &u),
                s: DeviceView::from_cudarc(&dev, &s),
            },
            dx: DeviceViewMut::from_cudarc(&dev, &mut dx),
            accumulate: false,
            dresidual: Some(DeviceViewMut::from_cudarc(&dev, &mut dres)),
            grads: SeGradViewsMut {
                dw1: DeviceViewMut::from_cudarc(&dev, &mut dw1),
                db1: Some(DeviceViewMut::from_cudarc(&dev, &mut db1)),
                dw2: DeviceViewMut::from_cudarc(&dev, &mut dw2),
                db2: Some(DeviceViewMut::from_cudarc(&dev, &mut db2)),
            },
        };
        let wsv = DeviceViewMut::from_cudarc(&dev, &mut ws);
        secuda::backward_views(&dev, &cfg, shape, layout, args, wsv, opts).unwrap();
    }
    stream.synchronize().unwrap();
    let host = |v: &CudaSlice<f32>| stream.clone_dtoh(v).unwrap();
    let host16 = |v: &CudaSlice<bf16>| stream.clone_dtoh(v).unwrap();
    let obs = check::Observed {
        y: Some(host16(&y).iter().map(|v| v.to_f64()).collect()),
        z: Some(check::widen(&host(&z))),
        h: Some(check::widen(&host(&h))),
        u: Some(check::widen(&host(&u))),
        s: Some(check::widen(&host(&s))),
        dx: Some(host16(&dx).iter().map(|v| v.to_f64()).collect()),
        dresidual: Some(host16(&dres).iter().map(|v| v.to_f64()).collect()),
        grads: Some(check::widen_grads(&senet::SeGrads {
            dw1: host(&dw1),
            db1: Some(host(&db1)),
            dw2: host(&dw2),
            db2: Some(host(&db2)),
        })),
    };
    let bad: Vec<_> = check::compare(&exp, &obs, senet::DType::BF16)
        .into_iter()
        .filter(|c| !c.pass())
        .map(|c| format!("{}: {:.3e} > {:.0e}", c.what, c.err, c.tol))
        .collect();
    assert!(bad.is_empty(), "caller-stream results: {bad:?}");
    let first = (host16(&y), host16(&dx), host(&dw1), host(&s));

    // 2. The same calls captured into a graph on the caller's stream, then replayed.
    let addr = |p: u64| p;
    let a = |sl: &CudaSlice<f32>| addr(sl.device_ptr(&stream).0);
    let a16 = |sl: &CudaSlice<bf16>| addr(sl.device_ptr(&stream).0);
    let (px, pr, pdy, py, pdx, pdres) =
        (a16(&xs), a16(&rs), a16(&dys), a16(&y), a16(&dx), a16(&dres));
    let (pz, ph, pu, ps) = (a(&z), a(&h), a(&u), a(&s));
    let (pw1, pb1, pw2, pb2) = (a(&w1), a(&b1), a(&w2), a(&b2));
    let (pdw1, pdb1, pdw2, pdb2) = (a(&dw1), a(&db1), a(&dw2), a(&db2));
    let pws = ws.device_ptr(&stream).0;
    // SAFETY (every raw view): the addresses are the cudarc buffers above, alive and sized so,
    // used on this stream only.
    let weights = || unsafe {
        SeWeightViews {
            w1: DeviceView::from_raw(&dev, pw1, d * c),
            b1: Some(DeviceView::from_raw(&dev, pb1, d)),
            w2: DeviceView::from_raw(&dev, pw2, c * d),
            b2: Some(DeviceView::from_raw(&dev, pb2, c)),
        }
    };
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    unsafe {
        let args = SeForwardViews {
            x: DeviceView::<bf16>::from_raw(&dev, px, numel),
            residual: Some(DeviceView::from_raw(&dev, pr, numel)),
            y: DeviceViewMut::from_raw(&dev, py, numel),
            weights: weights(),
            saved: SeSavedViewsMut {
                z: DeviceViewMut::from_raw(&dev, pz, n * c),
                h: DeviceViewMut::from_raw(&dev, ph, n * d),
                u: DeviceViewMut::from_raw(&dev, pu, n * d),
                s: DeviceViewMut::from_raw(&dev, ps, n * c),
            },
        };
        let wsv = DeviceViewMut::from_raw(&dev, pws, ws_bytes);
        secuda::forward_views(&dev, &cfg, shape, layout, args, wsv, opts).unwrap();
        let args = SeBackwardViews {
            x: DeviceView::<bf16>::from_raw(&dev, px, numel),
            residual: Some(DeviceView::from_raw(&dev, pr, numel)),
            dy: DeviceView::from_raw(&dev, pdy, numel),
            weights: weights(),
            saved: SeSavedViews {
                z: DeviceView::from_raw(&dev, pz, n * c),
                h: DeviceView::from_raw(&dev, ph, n * d),
                u: DeviceView::from_raw(&dev, pu, n * d),
                s: DeviceView::from_raw(&dev, ps, n * c),
            },
            dx: DeviceViewMut::from_raw(&dev, pdx, numel),
            accumulate: false,
            dresidual: Some(DeviceViewMut::from_raw(&dev, pdres, numel)),
            grads: SeGradViewsMut {
                dw1: DeviceViewMut::from_raw(&dev, pdw1, d * c),
                db1: Some(DeviceViewMut::from_raw(&dev, pdb1, d)),
                dw2: DeviceViewMut::from_raw(&dev, pdw2, c * d),
                db2: Some(DeviceViewMut::from_raw(&dev, pdb2, c)),
            },
        };
        let wsv = DeviceViewMut::from_raw(&dev, pws, ws_bytes);
        secuda::backward_views(&dev, &cfg, shape, layout, args, wsv, opts).unwrap();
    }
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded the op's launches");
    let names = graph::kernel_names(graph.cu_graph());
    assert!(
        names.iter().filter(|n| n.starts_with("se_")).count() >= 2,
        "senet's forward and backward kernels are in the graph captured on the caller's stream: {names:?}"
    );
    for out in [&mut y, &mut dx] {
        stream.memset_zeros(out).unwrap();
    }
    for out in [&mut dw1, &mut s] {
        stream.memset_zeros(out).unwrap();
    }
    graph.launch().unwrap();
    stream.synchronize().unwrap();
    let replay = (host16(&y), host16(&dx), host(&dw1), host(&s));
    assert!(
        replay
            .0
            .iter()
            .zip(&first.0)
            .all(|(a, b)| a.to_bits() == b.to_bits())
            && replay
                .1
                .iter()
                .zip(&first.1)
                .all(|(a, b)| a.to_bits() == b.to_bits())
            && replay
                .2
                .iter()
                .zip(&first.2)
                .all(|(a, b)| a.to_bits() == b.to_bits())
            && replay
                .3
                .iter()
                .zip(&first.3)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the graph replay differs from the direct run"
    );

    // 3. GPU vs emulator operands are refused both ways.
    if let Ok(emu) = CudaDevice::emulator() {
        common::views::wrong_device_operands_are_refused(&own, &emu, &w);
        common::views::wrong_device_operands_are_refused(&emu, &own, &w);
    }
}
