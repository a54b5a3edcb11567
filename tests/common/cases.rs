//! One SE case on a device (real or emulated), every path, against the reference; shared by
//! tests/gpu.rs and tests/se/emulated.rs.
//!
//! Per case: fresh random inputs (never zero, residual kept off the ReLU kink); outputs poisoned
//! with NaN before every launch; forward (y and the saved z, h, u, s) and backward (dx,
//! d residual, dW1, db1, dW2, db2) judged by `senet::se::check`; each path run twice and
//! required to give the same bits; accumulation into an existing dx checked.

use super::views::{self, SharedWorkspace};
use super::{tensor, weights};
use half::bf16;
use senet::cuda::testing::{self, Poison};
use senet::cuda::{CudaDevice, CudaElement, DeviceTensor};
use senet::se::check::{self, Observed};
use senet::se::cuda::{
    self as secuda, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights, SeOptions, SePath,
};
use senet::{Activation, Element, Error, Gate, Layout, SeConfig, Shape, Tensor};

/// One configuration to run.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub shape: Shape,
    pub layout: Layout,
    pub gate: Gate,
    pub act: Activation,
    pub bias: bool,
    pub epilogue: bool,
    /// Element offsets of (x, residual, dy, outputs) inside their allocations.
    pub offsets: [usize; 4],
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

/// Every path the device has: three-kernel, L2-chunked with one sample per chunk (the most
/// chunks), auto, and the cluster kernel where available.
pub fn paths(dev: &CudaDevice) -> Vec<(SePath, SeOptions)> {
    let mut v = vec![
        (
            SePath::ThreeKernel,
            SeOptions::with_path(SePath::ThreeKernel),
        ),
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

/// For each shape, `per_shape(shape)` (1 to 8) of its eight gate x bias x epilogue
/// combinations: a window that starts one combination later at each shape, so over a few
/// shapes every combination appears. The cases taken rotate through aligned, uniformly
/// misaligned and differently misaligned buffers, and every fourth takes SiLU.
pub fn cases(layout: Layout, shapes: &[Shape], per_shape: impl Fn(Shape) -> usize) -> Vec<Case> {
    let mut out = Vec::new();
    let mut m = 0usize;
    for (i, &shape) in shapes.iter().enumerate() {
        let keep = per_shape(shape).clamp(1, 8);
        let mut j = 0usize;
        for gate in Gate::ALL {
            for bias in [true, false] {
                for epilogue in [false, true] {
                    let slot = (j + 8 - i % 8) % 8;
                    j += 1;
                    if slot >= keep {
                        continue;
                    }
                    let offsets = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 3, 2, 0]][m % 3];
                    let act = if m % 4 == 3 {
                        Activation::Silu
                    } else {
                        Activation::Relu
                    };
                    m += 1;
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
    out
}

fn bits<T: Element>(t: &Tensor<T>) -> Vec<u8> {
    bytemuck::cast_slice(t.data()).to_vec()
}

fn f32bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn judge(
    tag: &str,
    stage: &str,
    exp: &check::Expected,
    obs: &Observed,
    dtype: senet::DType,
    fails: &mut Vec<String>,
) {
    for c in check::compare(exp, obs, dtype) {
        if !c.pass() {
            fails.push(format!(
                "{tag} {stage} {}: error {:.3e} > {:.0e}",
                c.what, c.err, c.tol
            ));
        }
    }
}

/// Runs one case on every path; returns the failures. Each path also runs once through the
/// borrowed-memory API (tests/common/views.rs), which must give the owned API's bits, with
/// `shared` as its workspace.
pub fn run_case<T: CudaElement>(
    dev: &CudaDevice,
    case: Case,
    seed: u64,
    shared: &mut SharedWorkspace,
) -> Vec<String> {
    let mut fails = Vec::new();
    let (shape, layout) = (case.shape, case.layout);
    let c = shape.c;
    let d = SeConfig::with_reduction(c, 16).unwrap().hidden;
    let w = weights(c, d, case.bias, case.act, case.gate, seed);
    let (x, w) = check::input_off_kinks::<T>(w, shape, layout, seed + 1).unwrap();
    let r = case.epilogue.then(|| {
        check::residual_off_kink(&w, &x, check::input::<T>(shape, layout, seed + 2).unwrap())
            .unwrap()
    });
    let dy = check::input::<T>(shape, layout, seed + 3).unwrap();
    let acc0 = check::input::<T>(shape, layout, seed + 4).unwrap();
    let exp = check::expected(&w, &x, r.as_ref(), &dy).unwrap();

    let [ox, or, ody, oo] = case.offsets;
    let dw = DeviceSeWeights::upload(dev, &w).unwrap();
    let xd = testing::from_host_at_offset(dev, &x, ox).unwrap();
    let rd = r
        .as_ref()
        .map(|r| testing::from_host_at_offset(dev, r, or).unwrap());
    let dyd = testing::from_host_at_offset(dev, &dy, ody).unwrap();
    let mut yd = testing::zeros_at_offset::<T>(dev, shape, layout, oo).unwrap();
    let mut dxd = testing::zeros_at_offset::<T>(dev, shape, layout, oo).unwrap();
    // d residual shares the outputs' alignment, so its 16-byte store paths run too.
    let mut dresd = r
        .as_ref()
        .map(|_| testing::zeros_at_offset::<T>(dev, shape, layout, oo).unwrap());
    let mut saved = DeviceSeSaved::new(dev, w.config, shape.n).unwrap();
    let mut grads = DeviceSeGrads::new(dev, w.config).unwrap();

    for (label, opts) in paths(dev) {
        let tag = format!("[{} {} {case}]", T::DTYPE, label);
        let mut fwd_bits = None;
        let mut bwd_bits = None;
        let mut backward_ran = true;
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
            let this_fwd = (
                bits(&y),
                f32bits(&sv.s),
                f32bits(&sv.z),
                f32bits(&sv.h),
                f32bits(&sv.u),
            );
            if run == 0 {
                let obs = Observed {
                    y: Some(y.to_f64_vec()),
                    z: Some(check::widen(&sv.z)),
                    h: Some(check::widen(&sv.h)),
                    u: Some(check::widen(&sv.u)),
                    s: Some(check::widen(&sv.s)),
                    ..Default::default()
                };
                judge(&tag, "forward", &exp, &obs, T::DTYPE, &mut fails);
                fwd_bits = Some(this_fwd);
            } else if fwd_bits.as_ref() != Some(&this_fwd) {
                fails.push(format!("{tag} forward: second run differs in bits"));
            }

            // Backward from the saved state this path produced.
            dxd.poison(dev).unwrap();
            grads.poison(dev).unwrap();
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
                &mut dxd,
                false,
                &mut grads,
                dresd.as_mut(),
                opts,
            ) {
                Ok(_) => {}
                // The backward stages dy and x (twice the forward's shared memory): a shape whose
                // forward fits the cluster path may not fit its backward.
                Err(Error::Unsupported(why)) if label == SePath::Cluster => {
                    if run == 0 {
                        println!("{tag}: cluster backward not available for this shape: {why}");
                    }
                    backward_ran = false;
                    break;
                }
                Err(e) => {
                    fails.push(format!("{tag} backward error: {e}"));
                    break;
                }
            }
            let dx = dxd.to_host(dev).unwrap();
            let g = grads.download(dev).unwrap();
            let dres = dresd.as_ref().map(|t| t.to_host(dev).unwrap());
            let this_bwd = (
                bits(&dx),
                f32bits(&g.dw1),
                f32bits(&g.dw2),
                g.db1.as_deref().map(f32bits),
                g.db2.as_deref().map(f32bits),
                dres.as_ref().map(bits),
            );
            if run == 0 {
                let obs = Observed {
                    dx: Some(dx.to_f64_vec()),
                    grads: Some(check::widen_grads(&g)),
                    dresidual: dres.as_ref().map(|t| t.to_f64_vec()),
                    ..Default::default()
                };
                judge(&tag, "backward", &exp, &obs, T::DTYPE, &mut fails);
                // The same call through the borrowed API: the owned API's bits.
                match views::run_views(dev, shared, &w, &x, r.as_ref(), &dy, case.offsets, opts) {
                    Ok((vf, vb)) => {
                        if fwd_bits.as_ref() != Some(&vf) {
                            fails.push(format!("{tag} views forward differs from owned in bits"));
                        }
                        if vb != this_bwd {
                            fails.push(format!("{tag} views backward differs from owned in bits"));
                        }
                    }
                    Err(e) => fails.push(format!("{tag} views error: {e}")),
                }
                bwd_bits = Some(this_bwd);
            } else if bwd_bits.as_ref() != Some(&this_bwd) {
                fails.push(format!("{tag} backward: second run differs in bits"));
            }
        }
        // Accumulating into an existing gradient: dx = acc0 + gradient.
        if fwd_bits.is_some() && backward_ran {
            let mut dxa = testing::from_host_at_offset(dev, &acc0, oo).unwrap();
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
                    let want: Vec<f64> = exp
                        .backward
                        .dx
                        .iter()
                        .zip(acc0.data())
                        .map(|(g, a)| g + a.to_f64())
                        .collect();
                    let mag: Vec<f64> = exp
                        .mag
                        .dx
                        .iter()
                        .zip(acc0.data())
                        .map(|(m, a)| m + a.to_f64().abs())
                        .collect();
                    let e = check::sum_error(&got, &want, &mag);
                    if e > T::DTYPE.grad_tolerance() {
                        fails.push(format!("{tag} accumulate dx: error {e:.3e}"));
                    }
                }
                Err(e) => fails.push(format!("{tag} accumulate error: {e}")),
            }
        }
    }
    fails
}

/// Runs every case, prints a summary and every failure, then asserts none failed.
pub fn run_all<T: CudaElement>(dev: &CudaDevice, label: &str, cases: &[Case], seed: u64) {
    let mut fails = Vec::new();
    let mut shared = SharedWorkspace::default();
    for (i, case) in cases.iter().enumerate() {
        fails.extend(run_case::<T>(
            dev,
            *case,
            seed.wrapping_add(i as u64 * 7919),
            &mut shared,
        ));
    }
    println!(
        "{label} {}: {} cases x {} paths on {}, {} failures",
        T::DTYPE,
        cases.len(),
        paths(dev).len(),
        dev.info().name,
        fails.len()
    );
    for f in &fails {
        println!("FAIL {f}");
    }
    assert!(fails.is_empty(), "{} failures (listed above)", fails.len());
}

/// Writing y over x gives what the out-of-place forward gives.
pub fn in_place_matches(dev: &CudaDevice, seed: u64) {
    for layout in Layout::ALL {
        let shape = Shape::new(3, 40, 9, 9);
        let w = weights(40, 8, true, Activation::Relu, Gate::Sigmoid, seed);
        let x = tensor::<bf16>(shape, layout, seed + 1);
        let r = tensor::<bf16>(shape, layout, seed + 2);
        let dw = DeviceSeWeights::upload(dev, &w).unwrap();
        let xd = DeviceTensor::from_host(dev, &x).unwrap();
        let rd = DeviceTensor::from_host(dev, &r).unwrap();
        for (_, opts) in paths(dev) {
            let out = secuda::forward(dev, &dw, &xd, Some(&rd), opts).unwrap();
            let mut xin = DeviceTensor::from_host(dev, &x).unwrap();
            let mut saved = DeviceSeSaved::new(dev, w.config, shape.n).unwrap();
            secuda::forward_in_place(dev, &dw, &mut xin, Some(&rd), &mut saved, opts).unwrap();
            assert_eq!(
                bits(&xin.to_host(dev).unwrap()),
                bits(&out.y.to_host(dev).unwrap()),
                "{layout} {:?}",
                opts.path
            );
        }
    }
}

/// The cluster kernels at several sizes in turn, a larger one again after a smaller one (as the
/// SE blocks of one network step run): each launch gets the shared memory it needs, and a
/// repeated size gives the bits it gave the first time. (The first GPU run found the shared-
/// memory limit lowered by a smaller size's occupancy query, failing the next larger launch.)
pub fn cluster_sizes_in_any_order(dev: &CudaDevice, seed: u64) {
    if !dev.has_clusters() {
        println!("skipped: no cluster kernels on {}", dev.info().name);
        return;
    }
    let opts = SeOptions::with_path(SePath::Cluster);
    // (channels, hw): shared memory per CTA falls from the first to the second; the third
    // needs more than the default 48 KiB.
    let sizes = [(16, 28), (32, 14), (64, 56)];
    for layout in Layout::ALL {
        let mut first: Vec<Option<(Vec<u8>, Vec<u8>)>> = vec![None; sizes.len()];
        for &i in &[0, 1, 0, 2, 1, 0] {
            let (c, hw) = sizes[i];
            let shape = Shape::new(2, c, hw, hw);
            let s = seed + i as u64 * 10;
            let w = weights(c, c / 4, true, Activation::Relu, Gate::Sigmoid, s);
            let dw = DeviceSeWeights::upload(dev, &w).unwrap();
            let x = DeviceTensor::from_host(dev, &tensor::<f32>(shape, layout, s + 1)).unwrap();
            let dy = DeviceTensor::from_host(dev, &tensor::<f32>(shape, layout, s + 2)).unwrap();
            let what = format!("{shape} {layout} (size {i})");
            let fwd = secuda::forward(dev, &dw, &x, None, opts)
                .unwrap_or_else(|e| panic!("forward {what}: {e}"));
            assert_eq!(fwd.path, SePath::Cluster, "{what}");
            let bwd = secuda::backward(dev, &dw, &x, None, &fwd.saved, &dy, opts)
                .unwrap_or_else(|e| panic!("backward {what}: {e}"));
            let got = (
                bits(&fwd.y.to_host(dev).unwrap()),
                bits(&bwd.dx.to_host(dev).unwrap()),
            );
            match &first[i] {
                None => first[i] = Some(got),
                Some(f) => assert!(f == &got, "{what}: not the bits of its first run"),
            }
        }
    }
}

/// Bad input is an error before any launch, never a panic.
pub fn invalid_inputs_are_errors(dev: &CudaDevice) {
    let w = weights(8, 8, true, Activation::Relu, Gate::Sigmoid, 1);
    let dw = DeviceSeWeights::upload(dev, &w).unwrap();
    let x = DeviceTensor::<f32>::zeros(dev, Shape::new(2, 8, 3, 3), Layout::Nchw).unwrap();
    let wrong_c = DeviceTensor::<f32>::zeros(dev, Shape::new(2, 9, 3, 3), Layout::Nchw).unwrap();
    let wrong_layout =
        DeviceTensor::<f32>::zeros(dev, Shape::new(2, 8, 3, 3), Layout::Nhwc).unwrap();
    let opts = SeOptions::default();
    assert!(secuda::forward(dev, &dw, &wrong_c, None, opts).is_err());
    assert!(secuda::forward(dev, &dw, &x, Some(&wrong_layout), opts).is_err());
    let out = secuda::forward(dev, &dw, &x, None, opts).unwrap();
    assert!(secuda::backward(dev, &dw, &x, None, &out.saved, &wrong_layout, opts).is_err());
    let small_saved = DeviceSeSaved::new(dev, w.config, 1).unwrap();
    let dy = DeviceTensor::<f32>::zeros(dev, Shape::new(2, 8, 3, 3), Layout::Nchw).unwrap();
    assert!(secuda::backward(dev, &dw, &x, None, &small_saved, &dy, opts).is_err());
    assert!(DeviceTensor::<f32>::zeros(dev, Shape::new(2, 0, 3, 3), Layout::Nchw).is_err());
    // A sample too large for the cluster path is refused with Unsupported, not run wrongly.
    if dev.has_clusters() {
        let big =
            DeviceTensor::<f32>::zeros(dev, Shape::new(1, 8, 512, 512), Layout::Nchw).unwrap();
        let r = secuda::forward(dev, &dw, &big, None, SeOptions::with_path(SePath::Cluster));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{:?}", r.err());
    }
}
