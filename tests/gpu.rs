//! Every GPU kernel and path against the f64 reference.
//!
//! Without a device each test prints "skipped: no CUDA device" and passes; with
//! SENET_REQUIRE_GPU=1 a missing device fails. Each test collects every mismatch before failing,
//! so one run on a GPU machine reports all of them.
//!
//! Per case: fresh random inputs; outputs poisoned with NaN before every launch; forward (y and
//! the saved z, h, u, s) and backward (dx, d residual, dW1, db1, dW2, db2) compared with the
//! reference; each path run twice and required to give the same bits; dx accumulation checked.

mod common;

use common::*;
use half::{bf16, f16};
use senet::cuda::{CudaDevice, CudaElement, DeviceTensor};
use senet::se::cuda::{
    self as secuda, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights, SeOptions, SePath,
};
use senet::se::reference;
use senet::{Activation, Element, Error, Gate, Layout, SeConfig, Shape, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    shape: Shape,
    layout: Layout,
    gate: Gate,
    act: Activation,
    bias: bool,
    epilogue: bool,
    /// Element offsets of (x, residual, dy, outputs) inside their allocations.
    offsets: [usize; 4],
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} bias={} epi={} off={:?}",
            self.shape, self.layout, self.gate, self.act, self.bias, self.epilogue, self.offsets
        )
    }
}

fn paths(dev: &CudaDevice) -> Vec<(SePath, SeOptions)> {
    let mut v = vec![
        (
            SePath::ThreeKernel,
            SeOptions::with_path(SePath::ThreeKernel),
        ),
        // One sample per chunk: the most chunks, so every offset computation is exercised.
        (
            SePath::L2Chunked,
            SeOptions {
                path: SePath::L2Chunked,
                chunk_samples: Some(1),
            },
        ),
        (SePath::Auto, SeOptions::default()),
    ];
    if dev.has_clusters() {
        v.push((SePath::Cluster, SeOptions::with_path(SePath::Cluster)));
    }
    v
}

fn bits<T: Element>(t: &Tensor<T>) -> Vec<u8> {
    bytemuck::cast_slice(t.data()).to_vec()
}

fn f32bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs one case on every path; returns the failures.
fn run_case<T: CudaElement>(dev: &CudaDevice, case: Case, seed: u64) -> Vec<String> {
    let mut fails = Vec::new();
    let (shape, layout) = (case.shape, case.layout);
    let c = shape.c;
    let d = SeConfig::with_reduction(c, 16).unwrap().hidden;
    let w = weights(c, d, case.bias, case.act, case.gate, seed);
    let x = tensor::<T>(shape, layout, seed + 1);
    let r = case.epilogue.then(|| tensor::<T>(shape, layout, seed + 2));
    let dy = tensor::<T>(shape, layout, seed + 3);
    let acc0 = tensor::<T>(shape, layout, seed + 4);
    let rf = reference::forward(&w, &x, r.as_ref()).unwrap();
    let rb = reference::backward(&w, &x, r.as_ref(), &rf.saved, &dy).unwrap();
    let tol_y = T::DTYPE.output_tolerance();
    let tol_dx = T::DTYPE.grad_tolerance();
    // f32 values computed from the same rounded inputs with f32 accumulation.
    let (tol_saved, tol_wgrad) = (1e-5, 1e-4);

    let [ox, or, ody, oo] = case.offsets;
    let dw = DeviceSeWeights::upload(dev, &w).unwrap();
    let xd = DeviceTensor::from_host_at_offset(dev, &x, ox).unwrap();
    let rd = r
        .as_ref()
        .map(|r| DeviceTensor::from_host_at_offset(dev, r, or).unwrap());
    let dyd = DeviceTensor::from_host_at_offset(dev, &dy, ody).unwrap();
    let mut yd = DeviceTensor::<T>::zeros_at_offset(dev, shape, layout, oo).unwrap();
    let mut dxd = DeviceTensor::<T>::zeros_at_offset(dev, shape, layout, oo).unwrap();
    let mut dresd = r
        .as_ref()
        .map(|_| DeviceTensor::<T>::zeros_at_offset(dev, shape, layout, oo + 1).unwrap());
    let mut saved = DeviceSeSaved::new(dev, w.config, shape.n).unwrap();
    let mut grads = DeviceSeGrads::new(dev, w.config).unwrap();

    for (label, opts) in paths(dev) {
        let tag = format!("[{} {} {case}]", T::DTYPE, label);
        let mut fwd_bits = None;
        let mut bwd_bits = None;
        for run in 0..2 {
            yd.poison(dev).unwrap();
            saved.poison(dev).unwrap();
            let ran =
                match secuda::forward_into(dev, &dw, &xd, rd.as_ref(), &mut yd, &mut saved, opts) {
                    Ok(p) => p,
                    Err(Error::Unsupported(why)) if label == SePath::Cluster => {
                        if run == 0 {
                            println!("{tag}: cluster path not available for this shape: {why}");
                        }
                        break;
                    }
                    Err(e) => {
                        fails.push(format!("{tag} forward error: {e}"));
                        break;
                    }
                };
            if label != SePath::Auto && ran != label {
                fails.push(format!("{tag} forced path ran as {ran}"));
            }
            let y = yd.to_host(dev).unwrap();
            let sv = saved.download(dev).unwrap();
            if run == 0 {
                let checks: [(&str, Vec<f64>, &[f64], f64); 4] = [
                    ("y", y.to_f64_vec(), &rf.y, tol_y),
                    ("z", f64s(&sv.z), &rf.saved.z, tol_saved),
                    ("h", f64s(&sv.h), &rf.saved.h, tol_saved),
                    ("s", f64s(&sv.s), &rf.saved.s, tol_saved),
                ];
                for (what, got, want, tol) in checks {
                    let e = senet::rel_l2_error(&got, want);
                    if e > tol {
                        fails.push(format!("{tag} forward {what}: rel err {e:.3e} > {tol:.0e}"));
                    }
                }
                let u_ref: Vec<f64> = rf.saved.h.iter().map(|&h| case.act.apply(h)).collect();
                let e = senet::rel_l2_error(&f64s(&sv.u), &u_ref);
                if e > tol_saved {
                    fails.push(format!("{tag} forward u: rel err {e:.3e}"));
                }
                fwd_bits = Some((bits(&y), f32bits(&sv.s), f32bits(&sv.z)));
            } else if fwd_bits != Some((bits(&y), f32bits(&sv.s), f32bits(&sv.z))) {
                fails.push(format!("{tag} forward: second run differs in bits"));
            }

            // Backward from the saved state this path produced.
            dxd.poison(dev).unwrap();
            grads.poison(dev).unwrap();
            if let Some(dr) = dresd.as_mut() {
                dr.poison(dev).unwrap();
            }
            if let Err(e) = secuda::backward_into(
                dev,
                &dw,
                &xd,
                rd.as_ref(),
                &saved,
                &dyd,
                &mut dxd,
                false,
                &mut grads,
                dresd.as_mut(),
                opts,
            ) {
                fails.push(format!("{tag} backward error: {e}"));
                break;
            }
            let dx = dxd.to_host(dev).unwrap();
            let g = grads.download(dev).unwrap();
            let dres = dresd.as_ref().map(|t| t.to_host(dev).unwrap());
            if run == 0 {
                let mut checks: Vec<(&str, Vec<f64>, &[f64], f64)> = vec![
                    ("dx", dx.to_f64_vec(), &rb.dx, tol_dx),
                    ("dw1", f64s(&g.dw1), &rb.grads.dw1, tol_wgrad),
                    ("dw2", f64s(&g.dw2), &rb.grads.dw2, tol_wgrad),
                ];
                if let (Some(a), Some(b)) = (&g.db1, &rb.grads.db1) {
                    checks.push(("db1", f64s(a), b, tol_wgrad));
                }
                if let (Some(a), Some(b)) = (&g.db2, &rb.grads.db2) {
                    checks.push(("db2", f64s(a), b, tol_wgrad));
                }
                if let (Some(a), Some(b)) = (&dres, &rb.dresidual) {
                    checks.push(("dresidual", a.to_f64_vec(), b, tol_dx));
                }
                if case.bias != g.db1.is_some() {
                    fails.push(format!(
                        "{tag} bias gradients present={} expected={}",
                        g.db1.is_some(),
                        case.bias
                    ));
                }
                for (what, got, want, tol) in checks {
                    let e = senet::rel_l2_error(&got, want);
                    if e > tol {
                        fails.push(format!(
                            "{tag} backward {what}: rel err {e:.3e} > {tol:.0e}"
                        ));
                    }
                }
                bwd_bits = Some((bits(&dx), f32bits(&g.dw1), f32bits(&g.dw2)));
            } else if bwd_bits != Some((bits(&dx), f32bits(&g.dw1), f32bits(&g.dw2))) {
                fails.push(format!("{tag} backward: second run differs in bits"));
            }
        }
        // Accumulating into an existing gradient: dx = acc0 + gradient.
        if fwd_bits.is_some() {
            let mut dxa = DeviceTensor::from_host_at_offset(dev, &acc0, oo).unwrap();
            if let Some(dr) = dresd.as_mut() {
                dr.poison(dev).unwrap();
            }
            match secuda::backward_into(
                dev,
                &dw,
                &xd,
                rd.as_ref(),
                &saved,
                &dyd,
                &mut dxa,
                true,
                &mut grads,
                dresd.as_mut(),
                opts,
            ) {
                Ok(_) => {
                    let got = dxa.to_host(dev).unwrap().to_f64_vec();
                    let want: Vec<f64> = rb
                        .dx
                        .iter()
                        .zip(acc0.data())
                        .map(|(g, a)| g + a.to_f64())
                        .collect();
                    let e = senet::rel_l2_error(&got, &want);
                    if e > tol_dx {
                        fails.push(format!("{tag} accumulate dx: rel err {e:.3e}"));
                    }
                }
                Err(e) => fails.push(format!("{tag} accumulate error: {e}")),
            }
        }
    }
    fails
}

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

fn cases(layout: Layout) -> Vec<Case> {
    if small() {
        let shapes = [
            Shape::new(2, 3, 1, 3),
            Shape::new(1, 17, 7, 7),
            Shape::new(2, 24, 45, 45),
            Shape::new(2, 512, 28, 28),
        ];
        let mut out = Vec::new();
        for (i, shape) in shapes.into_iter().enumerate() {
            for (j, (gate, epilogue)) in [(Gate::Sigmoid, false), (Gate::HardSigmoid, true)]
                .into_iter()
                .enumerate()
            {
                let offsets = if (i + j) % 2 == 0 {
                    [0; 4]
                } else {
                    [1, 3, 2, 0]
                };
                out.push(Case {
                    shape,
                    layout,
                    gate,
                    act: Activation::Relu,
                    bias: (i + j) % 2 == 0,
                    epilogue,
                    offsets,
                });
            }
        }
        return out;
    }
    let mut out = Vec::new();
    let mut k = 0usize;
    for shape in unfriendly_shapes() {
        for gate in Gate::ALL {
            for bias in [true, false] {
                for epilogue in [false, true] {
                    // Offsets: aligned; all misaligned alike; misaligned differently.
                    let offsets = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 3, 2, 0]][k % 3];
                    let act = if k % 4 == 3 {
                        Activation::Silu
                    } else {
                        Activation::Relu
                    };
                    k += 1;
                    out.push(Case {
                        shape,
                        layout,
                        gate,
                        act,
                        bias,
                        epilogue,
                        offsets,
                    });
                }
            }
        }
    }
    for shape in friendly_shapes() {
        for gate in Gate::ALL {
            for bias in [true, false] {
                for epilogue in [false, true] {
                    out.push(Case {
                        shape,
                        layout,
                        gate,
                        act: Activation::Relu,
                        bias,
                        epilogue,
                        offsets: [0; 4],
                    });
                }
            }
        }
    }
    out
}

fn run_all<T: CudaElement>(layout: Layout) {
    let Some(dev) = gpu() else { return };
    let seed = seed(&format!("gpu {} {layout}", T::DTYPE));
    let mut fails = Vec::new();
    let all = cases(layout);
    for (i, case) in all.iter().enumerate() {
        fails.extend(run_case::<T>(
            &dev,
            *case,
            seed.wrapping_add(i as u64 * 7919),
        ));
    }
    println!(
        "{} {layout}: {} cases x {} paths, {} failures",
        T::DTYPE,
        all.len(),
        paths(&dev).len(),
        fails.len()
    );
    for f in &fails {
        println!("FAIL {f}");
    }
    assert!(fails.is_empty(), "{} failures (listed above)", fails.len());
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
    let seed = seed("in_place");
    for layout in Layout::ALL {
        let shape = Shape::new(3, 40, 9, 9);
        let w = weights(40, 8, true, Activation::Relu, Gate::Sigmoid, seed);
        let x = tensor::<bf16>(shape, layout, seed + 1);
        let r = tensor::<bf16>(shape, layout, seed + 2);
        let dw = DeviceSeWeights::upload(&dev, &w).unwrap();
        let xd = DeviceTensor::from_host(&dev, &x).unwrap();
        let rd = DeviceTensor::from_host(&dev, &r).unwrap();
        for (_, opts) in paths(&dev) {
            let out = secuda::forward(&dev, &dw, &xd, Some(&rd), opts).unwrap();
            let mut xin = DeviceTensor::from_host(&dev, &x).unwrap();
            let mut saved = DeviceSeSaved::new(&dev, w.config, shape.n).unwrap();
            secuda::forward_in_place(&dev, &dw, &mut xin, Some(&rd), &mut saved, opts).unwrap();
            assert_eq!(
                bits(&xin.to_host(&dev).unwrap()),
                bits(&out.y.to_host(&dev).unwrap()),
                "{layout} {:?}",
                opts.path
            );
        }
    }
}

/// Bad input is an error before any launch, never a panic.
#[test]
fn gpu_invalid_inputs_are_errors() {
    let Some(dev) = gpu() else { return };
    let w = weights(8, 8, true, Activation::Relu, Gate::Sigmoid, 1);
    let dw = DeviceSeWeights::upload(&dev, &w).unwrap();
    let x = DeviceTensor::<f32>::zeros(&dev, Shape::new(2, 8, 3, 3), Layout::Nchw).unwrap();
    let wrong_c = DeviceTensor::<f32>::zeros(&dev, Shape::new(2, 9, 3, 3), Layout::Nchw).unwrap();
    let wrong_layout =
        DeviceTensor::<f32>::zeros(&dev, Shape::new(2, 8, 3, 3), Layout::Nhwc).unwrap();
    let opts = SeOptions::default();
    assert!(secuda::forward(&dev, &dw, &wrong_c, None, opts).is_err());
    assert!(secuda::forward(&dev, &dw, &x, Some(&wrong_layout), opts).is_err());
    let out = secuda::forward(&dev, &dw, &x, None, opts).unwrap();
    assert!(secuda::backward(&dev, &dw, &x, None, &out.saved, &wrong_layout, opts).is_err());
    let small_saved = DeviceSeSaved::new(&dev, w.config, 1).unwrap();
    let dy = DeviceTensor::<f32>::zeros(&dev, Shape::new(2, 8, 3, 3), Layout::Nchw).unwrap();
    assert!(secuda::backward(&dev, &dw, &x, None, &small_saved, &dy, opts).is_err());
    assert!(DeviceTensor::<f32>::zeros(&dev, Shape::new(2, 0, 3, 3), Layout::Nchw).is_err());
    // A sample too large for the cluster path is refused with Unsupported, not run wrongly.
    if dev.has_clusters() {
        let big =
            DeviceTensor::<f32>::zeros(&dev, Shape::new(1, 8, 512, 512), Layout::Nchw).unwrap();
        let r = secuda::forward(&dev, &dw, &big, None, SeOptions::with_path(SePath::Cluster));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{:?}", r.err());
    }
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
        let shape = Shape::new(2, 4, 16385, 16385);
        assert!(shape.numel() > 1 << 31);
        let pattern = |i: usize| -> bf16 {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
            bf16::from_f32(h as f32 / 512.0 - 1.0)
        };
        let data: Vec<bf16> = (0..shape.numel()).into_par_iter().map(pattern).collect();
        let x = Tensor::from_vec(shape, layout, data).unwrap();
        let w = weights(4, 2, true, Activation::Relu, Gate::Sigmoid, 3);
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
