//! The fast CPU path against the f64 reference: every dtype x layout x activation x gate x bias x
//! epilogue, at friendly and unfriendly shapes, forward (y and every saved value) and backward
//! (dx, every parameter gradient, d residual), with fresh random inputs and NaN-poisoned outputs;
//! plus invalid inputs, which must be errors.
//!
//! Errors are judged by `senet::se::check` (DESIGN.md's relative L2 and tolerances, sums measured
//! against their summands' magnitudes). Why: sums that cancel are the one place
//! where ||ref|| is the wrong yardstick: a parameter gradient of C = 1 is a single sum of N
//! per-sample terms, and f32 rounding of those terms (about 1e-7 of each) can exceed 1e-4 of a
//! sum that cancels to 1/2000 of them (seen: dW1 terms ~0.05 summing to 2.7e-5), and ds sums
//! HW products g x of either sign. Every value computed as a sum is therefore measured against
//! the norm of the magnitudes of its summands (the classical bound |fl(sum) - sum| <=
//! gamma_n sum |terms|), propagated with absolute values the way the value itself is computed:
//! z against mean |x|; h and u against |b1| + |W1| M_z; s against gate'(a) (|b2| + |W2| M_h), or
//! |s| where larger; the parameter gradients and dx through M_ds = sum_hw |g x| (see
//! [`grad_magnitudes`]). Each magnitude is >= |value|, with equality when nothing cancels; the
//! tolerances are DESIGN.md's; y = s x + r against |x| M_s + |r|. d residual (dy or 0) keeps
//! plain rel L2.
//!
//! Runs inside a 2-thread rayon pool, and every case under each of the CPU path's schedules
//! (`Auto`, and `Grouped`, `Batched`, `PerSample` forced), so each one is checked whatever the
//! machine and whichever `Auto` would pick.

use half::{bf16, f16};
use senet::se::check::{self, Observed};
use senet::se::cpu::{self, CpuSaved};
use senet::se::reference;
use senet::{
    rel_l2_error, Activation, Element, Gate, Init, Layout, SeConfig, SeGrads, SeWeights, Shape,
    Tensor,
};

/// (n, c, h, w): C of 1, 3, 17; HW of 1, 3, 49; N of 1 and 5; then shapes that cross the
/// path's internal blocks (conversion pieces of 512, NHWC channel blocks, partial groups).
/// The small shapes (every act / gate / bias combination runs on each) and three larger ones
/// that reach the blocked paths. The quick tier takes four of the eighteen small shapes, still
/// covering each N, C and H x W value; SENET_FULL_TESTS=1 takes them all.
fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    if crate::common::full() {
        for n in [1, 5] {
            for c in [1, 3, 17] {
                for (h, w) in [(1, 1), (1, 3), (7, 7)] {
                    v.push(Shape::new(n, c, h, w));
                }
            }
        }
    } else {
        v.push(Shape::new(1, 1, 1, 1));
        v.push(Shape::new(5, 3, 1, 3));
        v.push(Shape::new(1, 17, 7, 7));
        v.push(Shape::new(5, 17, 1, 1));
    }
    v.push(Shape::new(1, 130, 24, 24)); // NCHW rows > 512 elements, several NHWC channel blocks
    v.push(Shape::new(2, 600, 2, 3)); // NHWC pixels > 512 channels, N = threads
    v.push(Shape::new(9, 20, 5, 5)); // groups of 2 with a last group of 1
    v
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a 2-thread pool")
}

fn weights(cfg: SeConfig, seed: u64) -> SeWeights {
    let mut w = SeWeights::init(cfg, Init::PyTorchDefault, seed).unwrap();
    if cfg.gate == Gate::HardSigmoid {
        // Push some gate inputs outside (-3, 3) so the hard sigmoid's flat parts are covered.
        // With a bias, channel 0's gate input sits near 5: saturated in every sweep.
        w.w2.iter_mut().for_each(|v| *v *= 6.0);
        if let Some(b2) = w.b2.as_mut() {
            b2.iter_mut().for_each(|v| *v *= 6.0);
            b2[0] = 5.0;
        }
    }
    w
}

#[derive(Default)]
struct Tally {
    cases: usize,
    saturated_gates: usize,
    masked: usize,
}

/// Fresh inputs with magnitudes in [1/64, 1) and random signs: never zero, and never in f16's
/// subnormal range, whose absolute spacing (6e-8) no relative tolerance can meet when a tensor
/// has a single element.
fn check(what: &str, got: &[f64], want: &[f64], tol: f64, ctx: &str) {
    let e = rel_l2_error(got, want);
    assert!(e <= tol, "{what}: rel L2 {e:e} > {tol:e} ({ctx})");
}

/// One case: forward and backward through `_into` with poisoned outputs, against the reference.
fn one_case<T: Element>(
    cfg: SeConfig,
    shape: Shape,
    layout: Layout,
    epi: bool,
    seed: u64,
    t: &mut Tally,
) {
    let ctx = format!(
        "{} {shape} {layout} {cfg} residual={epi} seed={seed}",
        T::DTYPE
    );
    let (x, w) = check::input_off_kinks::<T>(weights(cfg, seed), shape, layout, seed ^ 0x11)
        .unwrap_or_else(|e| panic!("{e} ({ctx})"));
    let r = check::residual_off_kink(
        &w,
        &x,
        check::input::<T>(shape, layout, seed ^ 0x22).unwrap(),
    )
    .unwrap();
    let dy = check::input::<T>(shape, layout, seed ^ 0x33).unwrap();
    let res = epi.then_some(&r);
    let exp = check::expected(&w, &x, res, &dy).unwrap();
    let judge = |obs: &Observed, what: &str| {
        for k in check::compare(&exp, obs, T::DTYPE) {
            assert!(
                k.pass(),
                "{} ({what}): error {:e} > {:e} ({ctx})",
                k.what,
                k.err,
                k.tol
            );
        }
    };

    for schedule in SCHEDULES {
        cpu::with_schedule(schedule, || {
            scheduled_case(&w, &x, res, &dy, &exp, &judge, t, seed, schedule)
        });
    }
    t.cases += 1;
}

/// Every schedule the CPU path has: each must give the reference's values on every case.
const SCHEDULES: [cpu::Schedule; 4] = [
    cpu::Schedule::Auto,
    cpu::Schedule::Grouped,
    cpu::Schedule::Batched,
    cpu::Schedule::PerSample,
];

/// [`one_case`]'s forward and backward under one schedule.
#[allow(clippy::too_many_arguments)]
fn scheduled_case<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    res: Option<&Tensor<T>>,
    dy: &Tensor<T>,
    exp: &check::Expected,
    judge: &dyn Fn(&Observed, &str),
    t: &mut Tally,
    seed: u64,
    schedule: cpu::Schedule,
) {
    let epi = res.is_some();
    let (shape, layout, cfg) = (x.shape(), x.layout(), w.config);
    let (n, c, d) = (shape.n, shape.c, cfg.hidden);
    let nan = T::from_f32(f32::NAN);
    let judge = |obs: &Observed, what: &str| judge(obs, &format!("{what}, {schedule:?}"));
    let mut y = Tensor::from_vec(shape, layout, vec![nan; shape.numel()]).unwrap();
    let mut saved = CpuSaved {
        z: vec![f32::NAN; n * c],
        h: vec![f32::NAN; n * d],
        u: vec![f32::NAN; n * d],
        s: vec![f32::NAN; n * c],
    };
    cpu::forward_into(w, x, res, &mut y, &mut saved).unwrap();
    judge(
        &Observed {
            y: Some(y.to_f64_vec()),
            z: Some(check::widen(&saved.z)),
            h: Some(check::widen(&saved.h)),
            u: Some(check::widen(&saved.u)),
            s: Some(check::widen(&saved.s)),
            ..Default::default()
        },
        "forward",
    );
    t.saturated_gates += exp
        .forward
        .saved
        .s
        .iter()
        .filter(|&&s| s == 0.0 || s == 1.0)
        .count();

    // Poisoned outputs; one accumulate run on top of known values.
    for accumulate in [false, true] {
        let base = check::input::<T>(shape, layout, seed ^ 0x44).unwrap();
        let mut dx = if accumulate {
            base.clone()
        } else {
            Tensor::from_vec(shape, layout, vec![nan; shape.numel()]).unwrap()
        };
        let mut dres =
            epi.then(|| Tensor::from_vec(shape, layout, vec![nan; shape.numel()]).unwrap());
        let mut grads = SeGrads {
            dw1: vec![f32::NAN; d * c],
            db1: cfg.bias.then(|| vec![f32::NAN; d]),
            dw2: vec![f32::NAN; c * d],
            db2: cfg.bias.then(|| vec![f32::NAN; c]),
        };
        cpu::backward_into(
            w,
            x,
            res,
            &saved,
            dy,
            &mut dx,
            accumulate,
            &mut grads,
            dres.as_mut(),
        )
        .unwrap();
        let mut dxv = dx.to_f64_vec();
        if accumulate {
            // Judge the gradient part: subtract the base exactly as the reference would add it.
            let b = base.to_f64_vec();
            let want: Vec<f64> = b.iter().zip(&exp.backward.dx).map(|(a, v)| a + v).collect();
            let mag: Vec<f64> = b
                .iter()
                .zip(&exp.mag.dx)
                .map(|(a, m)| a.abs() + m)
                .collect();
            let e = check::sum_error(&dxv, &want, &mag);
            assert!(
                e <= T::DTYPE.grad_tolerance(),
                "accumulated dx: error {e:e} ({schedule:?}, seed={seed}, {shape} {layout} {cfg})"
            );
            dxv = exp.backward.dx.clone();
        }
        judge(
            &Observed {
                dx: Some(dxv),
                grads: Some(check::widen_grads(&grads)),
                dresidual: dres.as_ref().map(|t| t.to_f64_vec()),
                ..Default::default()
            },
            if accumulate {
                "backward, accumulate"
            } else {
                "backward"
            },
        );
        if let Some(w) = &exp.backward.dresidual {
            t.masked += w.iter().filter(|&&v| v == 0.0).count();
        }
    }
}

/// (activation, gate, bias) settings for `shape`: every combination at the small shapes; the
/// three larger, block-crossing shapes get two that between them cover every setting once.
fn configs(shape: Shape) -> Vec<(Activation, Gate, bool)> {
    if shape.c <= 17 && shape.hw() <= 49 && shape.n <= 5 {
        let mut v = Vec::new();
        for act in Activation::ALL {
            for gate in Gate::ALL {
                for bias in [true, false] {
                    v.push((act, gate, bias));
                }
            }
        }
        v
    } else {
        vec![
            (Activation::Relu, Gate::Sigmoid, true),
            (Activation::Silu, Gate::HardSigmoid, false),
        ]
    }
}

fn sweep<T: Element>(seed: u64) -> Tally {
    let mut t = Tally::default();
    let mut k = 0u64;
    for shape in shapes() {
        for layout in Layout::ALL {
            for (act, gate, bias) in configs(shape) {
                for epi in [false, true] {
                    let hidden = 1 + shape.c / 3;
                    let cfg = SeConfig::with_hidden(shape.c, hidden)
                        .unwrap()
                        .activation(act)
                        .gate(gate)
                        .bias(bias);
                    k += 1;
                    let s = seed.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    one_case::<T>(cfg, shape, layout, epi, s, &mut t);
                }
            }
        }
    }
    t
}

fn run_sweep<T: Element>() {
    let seed = crate::common::seed(&format!("{} sweep", T::DTYPE));
    let t = pool().install(|| sweep::<T>(seed));
    let expected: usize = shapes().iter().map(|&s| configs(s).len() * 2 * 2).sum();
    assert_eq!(t.cases, expected);
    let small = if crate::common::full() { 18 } else { 4 };
    assert_eq!(expected, small * 8 * 4 + 3 * 2 * 4);
    // The sweep must have reached the hard sigmoid's flat parts and the epilogue's mask.
    assert!(
        t.saturated_gates > 0,
        "no saturated hard-sigmoid gate was tested"
    );
    assert!(t.masked > 0, "no element was masked by the epilogue's ReLU");
}

#[test]
fn f32_matches_reference() {
    run_sweep::<f32>();
}

#[test]
fn f16_matches_reference() {
    run_sweep::<f16>();
}

#[test]
fn bf16_matches_reference() {
    run_sweep::<bf16>();
}

#[test]
fn allocating_wrappers_match_into_variants() {
    let seed = senet::rng::fresh_seed();
    println!("seed {seed}");
    let shape = Shape::new(3, 17, 3, 3);
    let cfg = SeConfig::with_hidden(17, 4).unwrap();
    let w = weights(cfg, seed);
    for layout in Layout::ALL {
        let x = Tensor::<f32>::random(shape, layout, seed ^ 1).unwrap();
        let r = Tensor::<f32>::random(shape, layout, seed ^ 2).unwrap();
        let dy = Tensor::<f32>::random(shape, layout, seed ^ 3).unwrap();
        let f = cpu::forward(&w, &x, Some(&r)).unwrap();
        let mut y = Tensor::zeros(shape, layout).unwrap();
        let mut saved = CpuSaved::new(&cfg, shape.n);
        cpu::forward_into(&w, &x, Some(&r), &mut y, &mut saved).unwrap();
        assert_eq!(f.y, y);
        assert_eq!(f.saved, saved);
        let b = cpu::backward(&w, &x, Some(&r), &f.saved, &dy).unwrap();
        let mut dx = Tensor::zeros(shape, layout).unwrap();
        let mut dres = Tensor::zeros(shape, layout).unwrap();
        let mut grads = cpu::zero_grads(&cfg);
        cpu::backward_into(
            &w,
            &x,
            Some(&r),
            &saved,
            &dy,
            &mut dx,
            false,
            &mut grads,
            Some(&mut dres),
        )
        .unwrap();
        assert_eq!(b.dx, dx);
        assert_eq!(b.grads, grads);
        assert_eq!(b.dresidual, Some(dres));
        // And the wrappers agree with the reference.
        let want = reference::forward(&w, &x, Some(&r)).unwrap();
        check("y", &f.y.to_f64_vec(), &want.y, 1e-5, "wrapper");
    }
}

#[test]
fn invalid_inputs_are_errors() {
    let cfg = SeConfig::with_hidden(8, 2).unwrap();
    let w = SeWeights::init(cfg, Init::PyTorchDefault, 1).unwrap();
    let shape = Shape::new(2, 8, 3, 3);
    let x = Tensor::<f32>::random(shape, Layout::Nchw, 2).unwrap();
    let good_saved = cpu::forward(&w, &x, None).unwrap().saved;

    // Wrong channel count.
    let x7 = Tensor::<f32>::random(Shape::new(2, 7, 3, 3), Layout::Nchw, 3).unwrap();
    assert!(cpu::forward(&w, &x7, None).is_err());
    // Residual of another shape or layout.
    let r_shape = Tensor::<f32>::random(Shape::new(1, 8, 3, 3), Layout::Nchw, 4).unwrap();
    let r_layout = x.to_layout(Layout::Nhwc);
    assert!(cpu::forward(&w, &x, Some(&r_shape)).is_err());
    assert!(cpu::forward(&w, &x, Some(&r_layout)).is_err());
    // Output y of another shape or layout.
    let mut saved = CpuSaved::new(&cfg, 2);
    let mut y_small = Tensor::<f32>::zeros(Shape::new(1, 8, 3, 3), Layout::Nchw).unwrap();
    assert!(cpu::forward_into(&w, &x, None, &mut y_small, &mut saved).is_err());
    let mut y_nhwc = Tensor::<f32>::zeros(shape, Layout::Nhwc).unwrap();
    assert!(cpu::forward_into(&w, &x, None, &mut y_nhwc, &mut saved).is_err());
    // Saved buffers for another batch.
    let mut y = Tensor::<f32>::zeros(shape, Layout::Nchw).unwrap();
    let mut short = CpuSaved::new(&cfg, 1);
    assert!(cpu::forward_into(&w, &x, None, &mut y, &mut short).is_err());
    assert!(cpu::backward(&w, &x, None, &short, &x).is_err());
    let mut no_u = good_saved.clone();
    no_u.u.pop();
    assert!(cpu::backward(&w, &x, None, &no_u, &x).is_err());
    // Inconsistent weights: zero hidden width, a bias where the config has none, short w1.
    let mut zero_hidden = w.clone();
    zero_hidden.config.hidden = 0;
    assert!(cpu::forward(&zero_hidden, &x, None).is_err());
    let mut stray_bias = w.clone();
    stray_bias.config.bias = false;
    assert!(cpu::forward(&stray_bias, &x, None).is_err());
    let mut short_w1 = w.clone();
    short_w1.w1.pop();
    assert!(cpu::forward(&short_w1, &x, None).is_err());
    // dy of another layout; d residual without a residual (and the reverse); gradients for
    // another config.
    let dy_nhwc = x.to_layout(Layout::Nhwc);
    assert!(cpu::backward(&w, &x, None, &good_saved, &dy_nhwc).is_err());
    let mut dx = Tensor::<f32>::zeros(shape, Layout::Nchw).unwrap();
    let mut dres = Tensor::<f32>::zeros(shape, Layout::Nchw).unwrap();
    let mut grads = cpu::zero_grads(&cfg);
    let r = Tensor::<f32>::random(shape, Layout::Nchw, 5).unwrap();
    assert!(cpu::backward_into(
        &w,
        &x,
        None,
        &good_saved,
        &x,
        &mut dx,
        false,
        &mut grads,
        Some(&mut dres)
    )
    .is_err());
    assert!(cpu::backward_into(
        &w,
        &x,
        Some(&r),
        &good_saved,
        &x,
        &mut dx,
        false,
        &mut grads,
        None
    )
    .is_err());
    let mut other_grads = cpu::zero_grads(&cfg.bias(false));
    assert!(cpu::backward_into(
        &w,
        &x,
        None,
        &good_saved,
        &x,
        &mut dx,
        false,
        &mut other_grads,
        None
    )
    .is_err());
    let mut dx_small = Tensor::<f32>::zeros(Shape::new(1, 8, 3, 3), Layout::Nchw).unwrap();
    assert!(cpu::backward_into(
        &w,
        &x,
        None,
        &good_saved,
        &x,
        &mut dx_small,
        false,
        &mut grads,
        None
    )
    .is_err());
    // The same calls with matching buffers succeed, so the errors above are about the mismatch.
    assert!(cpu::backward_into(
        &w,
        &x,
        None,
        &good_saved,
        &x,
        &mut dx,
        false,
        &mut grads,
        None
    )
    .is_ok());
    assert!(cpu::backward_into(
        &w,
        &x,
        Some(&r),
        &good_saved,
        &x,
        &mut dx,
        false,
        &mut grads,
        Some(&mut dres)
    )
    .is_ok());
    assert!(cpu::forward_into(&w, &x, Some(&r), &mut y, &mut saved).is_ok());
    // Zero-sized dimensions cannot even make a tensor.
    assert!(Tensor::<f32>::zeros(Shape::new(0, 8, 3, 3), Layout::Nchw).is_err());
}

/// The slice API (`forward_slices` / `backward_slices`: a framework's buffers, no `Tensor`) on
/// every shape of the case list, both layouts, f32 / f16 / bf16, with every operand a sub-slice
/// of a larger buffer and the weights, saved state and gradients borrowed: the Tensor API's bits,
/// and within DESIGN.md's tolerance of the f64 reference.
#[test]
fn slice_api_matches_tensor_api_and_reference() {
    fn run<T: Element>(seed: u64) {
        use senet::se::cpu::{SeBackwardSlices, SeForwardSlices};
        let mut k = 0u64;
        for shape in shapes() {
            for layout in Layout::ALL {
                k += 1;
                let s = seed.wrapping_add(k * 7919);
                let cfg = SeConfig::with_hidden(shape.c, 1 + shape.c / 3)
                    .unwrap()
                    .bias(k.is_multiple_of(2))
                    .activation(if k.is_multiple_of(3) {
                        Activation::Silu
                    } else {
                        Activation::Relu
                    })
                    .gate(if k % 4 == 1 {
                        Gate::HardSigmoid
                    } else {
                        Gate::Sigmoid
                    });
                let (x, w) =
                    check::input_off_kinks::<T>(weights(cfg, s), shape, layout, s ^ 1).unwrap();
                let r =
                    check::residual_off_kink(&w, &x, check::input(shape, layout, s ^ 2).unwrap())
                        .unwrap();
                let dy = check::input::<T>(shape, layout, s ^ 3).unwrap();
                let want_f = cpu::forward(&w, &x, Some(&r)).unwrap();
                let want_b = cpu::backward(&w, &x, Some(&r), &want_f.saved, &dy).unwrap();

                // Every activation three elements into a buffer with room after it.
                let numel = shape.numel();
                let inside = |t: &Tensor<T>| {
                    let mut v = vec![T::from_f32(7.0); numel + 6];
                    v[3..3 + numel].copy_from_slice(t.data());
                    v
                };
                let (xb, rb, dyb) = (inside(&x), inside(&r), inside(&dy));
                let mut yb = vec![T::from_f32(f32::NAN); numel + 6];
                let mut saved = CpuSaved::new(&cfg, shape.n);
                cpu::forward_slices(
                    shape,
                    layout,
                    SeForwardSlices {
                        x: &xb[3..3 + numel],
                        residual: Some(&rb[3..3 + numel]),
                        y: &mut yb[3..3 + numel],
                        weights: w.view(),
                        saved: saved.view_mut(),
                    },
                )
                .unwrap();
                assert_eq!(&yb[3..3 + numel], want_f.y.data(), "{shape} {layout} y");
                assert!(yb[..3]
                    .iter()
                    .chain(&yb[3 + numel..])
                    .all(|v| v.to_f32().is_nan()));
                assert_eq!(saved, want_f.saved, "{shape} {layout} saved");

                let mut dxb = vec![T::from_f32(f32::NAN); numel + 6];
                let mut drb = vec![T::from_f32(f32::NAN); numel + 6];
                let mut grads = cpu::zero_grads(&cfg);
                cpu::backward_slices(
                    shape,
                    layout,
                    SeBackwardSlices {
                        x: &xb[3..3 + numel],
                        residual: Some(&rb[3..3 + numel]),
                        dy: &dyb[3..3 + numel],
                        weights: w.view(),
                        saved: saved.view(),
                        dx: &mut dxb[3..3 + numel],
                        accumulate: false,
                        dresidual: Some(&mut drb[3..3 + numel]),
                        grads: grads.view_mut(),
                    },
                )
                .unwrap();
                assert_eq!(&dxb[3..3 + numel], want_b.dx.data(), "{shape} {layout} dx");
                let dres = want_b.dresidual.as_ref().unwrap();
                assert_eq!(&drb[3..3 + numel], dres.data(), "{shape} {layout} dres");
                assert_eq!(grads, want_b.grads, "{shape} {layout} grads");

                // And against the f64 reference.
                let exp = check::expected(&w, &x, Some(&r), &dy).unwrap();
                let y: Vec<f64> = yb[3..3 + numel].iter().map(|v| v.to_f64()).collect();
                let dx: Vec<f64> = dxb[3..3 + numel].iter().map(|v| v.to_f64()).collect();
                let dr: Vec<f64> = drb[3..3 + numel].iter().map(|v| v.to_f64()).collect();
                let obs = Observed {
                    y: Some(y),
                    dx: Some(dx),
                    dresidual: Some(dr),
                    grads: Some(check::widen_grads(&grads)),
                    ..Default::default()
                };
                for c in check::compare(&exp, &obs, T::DTYPE) {
                    assert!(
                        c.pass(),
                        "{shape} {layout} {}: {:.3e} > {:.0e}",
                        c.what,
                        c.err,
                        c.tol
                    );
                }
            }
        }
        // Wrong lengths are errors, not panics.
        let shape = Shape::new(2, 8, 3, 3);
        let cfg = SeConfig::with_hidden(8, 2).unwrap();
        let w = weights(cfg, seed);
        let x = vec![T::from_f32(0.5); shape.numel()];
        let mut y = vec![T::from_f32(0.0); shape.numel() - 1];
        let mut saved = CpuSaved::new(&cfg, shape.n);
        let e = cpu::forward_slices(
            shape,
            Layout::Nchw,
            SeForwardSlices {
                x: &x,
                residual: None,
                y: &mut y,
                weights: w.view(),
                saved: saved.view_mut(),
            },
        );
        assert!(matches!(e, Err(senet::Error::Length { .. })), "{e:?}");
    }
    let seed = senet::rng::fresh_seed();
    println!("seed {seed}");
    pool().install(|| {
        run::<f32>(seed);
        run::<half::f16>(seed ^ 1);
        run::<half::bf16>(seed ^ 2);
    });
}

/// CI's failure of 2026-12-04 (f16, 2x600x2x3 NHWC, ReLU): with the weights as drawn, hidden
/// unit 115 of sample 1 has h = 1.7e-8 in f64 and -1.1e-8 in f32 (its summands are of size
/// 6.7), so the CPU path zeroed that row of dW1 and the reference did not. Both are right: the
/// case must be drawn off the kink, which `check::weights_off_kinks` does.
#[test]
fn a_hidden_unit_at_the_relu_kink_is_moved_off_it() {
    let cfg = SeConfig::with_hidden(600, 201).unwrap();
    let (shape, layout, seed) = (Shape::new(2, 600, 2, 3), Layout::Nhwc, 17963126102042839305);
    let x = check::input::<f16>(shape, layout, seed ^ 0x11).unwrap();
    let raw = weights(cfg, seed);
    let before = check::kink_distance(&raw, &x).unwrap();
    assert!(
        before < 1.0,
        "the seed no longer draws the CI case ({before})"
    );
    let moved = check::weights_off_kinks(raw.clone(), &x).unwrap();
    assert!(check::kink_distance(&moved, &x).unwrap() >= check::KINK_MARGIN);
    // A handful of W1's 120,600 weights, each by a fraction of the init's bound (1/sqrt(600)
    // = 0.041): the draw stays a random one.
    let changed: Vec<f32> = moved
        .w1
        .iter()
        .zip(&raw.w1)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (a - b).abs())
        .collect();
    assert!(
        !changed.is_empty() && changed.len() <= 10,
        "{} weights moved",
        changed.len()
    );
    assert!(changed.iter().all(|&d| d < 0.01), "moves {changed:?}");
    assert_eq!(moved.w2, raw.w2, "no gate kinks here: W2 untouched");
    // And the whole case passes under every schedule.
    pool().install(|| one_case::<f16>(cfg, shape, layout, true, seed, &mut Tally::default()));
}

/// Values exactly on a kink, built by hand: h = 0 (ReLU) for sample 0 and a = 3 (hard sigmoid)
/// for sample 1. Afterwards every h and a is at least `KINK_MARGIN` rounding-error bounds from
/// its kinks, each on its side, and no weight moved by as much as 1e-3 of itself. A row whose
/// only input pools to exactly 0 (no bias) cannot be moved: an error, and `input_off_kinks`
/// draws another x.
#[test]
fn weights_off_kinks_moves_values_exactly_on_a_kink() {
    let cfg = SeConfig::with_hidden(2, 2)
        .unwrap()
        .bias(false)
        .activation(Activation::Relu)
        .gate(Gate::HardSigmoid);
    let shape = Shape::new(2, 2, 1, 1);
    // HW = 1, so z = x: z0 = (0.5, 0.25), z1 = (0.75, -0.5).
    let x = Tensor::<f32>::from_vec(shape, Layout::Nchw, vec![0.5, 0.25, 0.75, -0.5]).unwrap();
    // h0 = (0.5 * 0.5 - 1 * 0.25, ...) = (0, 0.75); h1 = (0.875, 0.25).
    // a1[1] = 2 * 0.875 + 5 * 0.25 = 3.
    let w = SeWeights::from_parts(
        cfg,
        vec![0.5, -1.0, 1.0, 1.0],
        None,
        vec![1.0, 1.0, 2.0, 5.0],
        None,
    )
    .unwrap();
    let f = reference::forward(&w, &x, None).unwrap().saved;
    assert_eq!((f.h[0], f.a[3]), (0.0, 3.0), "the hand-built case");
    assert_eq!(check::kink_distance(&w, &x).unwrap(), 0.0);
    let moved = check::weights_off_kinks(w.clone(), &x).unwrap();
    assert!(check::kink_distance(&moved, &x).unwrap() >= check::KINK_MARGIN);
    let f = reference::forward(&moved, &x, None).unwrap().saved;
    assert!(
        f.h[0] > 0.0 && f.a[3] > 3.0,
        "each value kept its side (h {}, a {})",
        f.h[0],
        f.a[3]
    );
    for (got, was) in moved
        .w1
        .iter()
        .chain(&moved.w2)
        .zip(w.w1.iter().chain(&w.w2))
    {
        assert!(
            (got - was).abs() < 1e-3 * was.abs(),
            "a weight moved from {was} to {got}"
        );
    }
    assert_ne!(moved.w1, w.w1, "h was on the kink: W1 must have moved");
    assert_ne!(moved.w2, w.w2, "a was on a kink: W2 must have moved");

    // One channel whose pixels pool to exactly 0, no bias: nothing can move h.
    let cfg1 = SeConfig::with_hidden(1, 1).unwrap().bias(false);
    let x1 =
        Tensor::<f32>::from_vec(Shape::new(1, 1, 1, 2), Layout::Nchw, vec![0.5, -0.5]).unwrap();
    let w1 = SeWeights::from_parts(cfg1, vec![0.7], None, vec![1.0], None).unwrap();
    assert!(check::weights_off_kinks(w1, &x1).is_err());
}
