//! The fast CPU path against the f64 reference: every dtype x layout x activation x gate x bias x
//! epilogue, at friendly and unfriendly shapes, forward (y and every saved value) and backward
//! (dx, every parameter gradient, d residual), with fresh random inputs and NaN-poisoned outputs;
//! plus invalid inputs, which must be errors.
//!
//! Errors are DESIGN.md's relative L2 with its tolerances. Sums that cancel are the one place
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
//! Runs inside a 2-thread rayon pool so both of the CPU path's schedules are exercised whatever
//! the machine: batch < 2 x threads takes the split-each-sample path, larger batches the
//! whole-sample groups (with a partial last group).

use half::{bf16, f16};
use senet::se::cpu::{self, CpuSaved};
use senet::se::reference;
use senet::{
    rel_l2_error, Activation, DType, Element, Gate, Init, Layout, SeConfig, SeGrads, SeWeights,
    Shape, Tensor,
};

/// (n, c, h, w): C of 1, 3, 17; HW of 1, 3, 49; N of 1 and 5; then shapes that cross the
/// path's internal blocks (conversion pieces of 512, NHWC channel blocks, partial groups).
fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    for n in [1, 5] {
        for c in [1, 3, 17] {
            for (h, w) in [(1, 1), (1, 3), (7, 7)] {
                v.push(Shape::new(n, c, h, w));
            }
        }
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

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
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
fn input<T: Element>(shape: Shape, layout: Layout, seed: u64) -> Tensor<T> {
    let u = senet::rng::uniform_vec(shape.numel(), -1.0, 1.0, seed);
    let v = u
        .iter()
        .map(|&u| T::from_f32(u.signum() * (1.0 / 64.0 + u.abs() * 63.0 / 64.0)))
        .collect();
    Tensor::from_vec(shape, layout, v).unwrap()
}

/// `r` with the sign flipped wherever the epilogue's pre-activation s x + r lies within 1e-3 of
/// its summands' size from the ReLU's kink: there f32 and the f64 reference may round to
/// different sides (seen: f32 0 against f64 4e-9), and both masks are right. s does not depend
/// on the residual, so the reference computes it first.
fn residual_off_kink<T: Element>(w: &SeWeights, x: &Tensor<T>, r: Tensor<T>) -> Tensor<T> {
    let s = reference::forward(w, x, None).unwrap().saved.s;
    let sh = x.shape();
    let mut r = r;
    for n in 0..sh.n {
        for c in 0..sh.c {
            for p in 0..sh.hw() {
                let i = sh.offset(x.layout(), n, c, p);
                let sx = s[n * sh.c + c] * x.data()[i].to_f64();
                let rv = r.data()[i].to_f64();
                if (sx + rv).abs() < 1e-3 * (sx.abs() + rv.abs()) {
                    r.data_mut()[i] = T::from_f64(-rv);
                }
            }
        }
    }
    r
}

fn check(what: &str, got: &[f64], want: &[f64], tol: f64, ctx: &str) {
    let e = rel_l2_error(got, want);
    assert!(e <= tol, "{what}: rel L2 {e:e} > {tol:e} ({ctx})");
}

/// ||got - want|| / ||magnitude|| <= tol, where `magnitude` bounds the summands of `want`
/// elementwise (|want| <= magnitude). NaN never passes.
fn check_sum(what: &str, got: &[f64], want: &[f64], magnitude: &[f64], tol: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length ({ctx})");
    assert!(got.iter().all(|v| !v.is_nan()), "{what}: NaN ({ctx})");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = magnitude.iter().map(|m| m * m).sum();
    let e = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    assert!(e <= tol, "{what}: rel L2 {e:e} > {tol:e} ({ctx})");
}

struct SavedMagnitudes {
    z: Vec<f64>,
    h: Vec<f64>,
    s: Vec<f64>,
}

/// Magnitudes of the summands behind z, h (and u) and s, propagated from |x| through |W|.
fn saved_magnitudes<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    saved: &reference::SeSaved,
) -> SavedMagnitudes {
    let sh = x.shape();
    let (n, c, d, hw) = (sh.n, sh.c, w.config.hidden, sh.hw());
    let abs_x = Tensor::<f64>::from_vec(
        sh,
        x.layout(),
        x.to_f64_vec().iter().map(|v| v.abs()).collect(),
    )
    .unwrap();
    let mut z = vec![0.0; n * c];
    for nn in 0..n {
        for cc in 0..c {
            let t: f64 = (0..hw).map(|p| abs_x.get(nn, cc, p / sh.w, p % sh.w)).sum();
            z[nn * c + cc] = t / hw as f64;
        }
    }
    let bias = |b: &Option<Vec<f32>>, i: usize| b.as_ref().map_or(0.0, |b| (b[i] as f64).abs());
    let mut h = vec![0.0; n * d];
    let mut s = vec![0.0; n * c];
    for nn in 0..n {
        for j in 0..d {
            let t: f64 = (0..c)
                .map(|cc| (w.w1[j * c + cc] as f64).abs() * z[nn * c + cc])
                .sum();
            h[nn * d + j] = bias(&w.b1, j) + t;
        }
        for cc in 0..c {
            let t: f64 = (0..d)
                .map(|j| (w.w2[cc * d + j] as f64).abs() * h[nn * d + j])
                .sum();
            let a = nn * c + cc;
            let ma = bias(&w.b2, cc) + t;
            s[a] = (w.config.gate.derivative(saved.a[a]) * ma).max(saved.s[a].abs());
        }
    }
    SavedMagnitudes { z, h, s }
}

/// Magnitudes of the summands behind every backward sum, propagated like the backward itself
/// with absolute values: M_ds = sum_hw |g x|, M_dg = |gate'| M_ds, M_du = |act'| |W2|^T M_dg,
/// M_dW2 = sum_n M_dg M_u (M_u = max|act'| M_h: u carries h's error), M_dW1 = sum_n M_du M_z,
/// M_dz = |W1|^T M_du. Returns the parameter gradients' magnitudes and M_dz / HW (`[n][c]`).
#[allow(clippy::needless_range_loop)] // indices mirror the reference's loops
fn grad_magnitudes<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    g: &[f64],
    saved: &reference::SeSaved,
    ms: &SavedMagnitudes,
) -> (SeGrads<f64>, Vec<f64>) {
    let act_max = match w.config.activation {
        Activation::Relu => 1.0,
        Activation::Silu => 1.1, // max of SiLU' is 1.0998
    };
    let sh = x.shape();
    let cfg = w.config;
    let (n, c, d, hw) = (sh.n, sh.c, cfg.hidden, sh.hw());
    let xd = x.to_f64_vec();
    let mut m = SeGrads {
        dw1: vec![0.0; d * c],
        db1: cfg.bias.then(|| vec![0.0; d]),
        dw2: vec![0.0; c * d],
        db2: cfg.bias.then(|| vec![0.0; c]),
    };
    let mut m_dzh = vec![0.0; n * c];
    for nn in 0..n {
        let mut m_dg = vec![0.0; c];
        for cc in 0..c {
            let ds: f64 = (0..hw)
                .map(|p| {
                    let i = sh.offset(x.layout(), nn, cc, p);
                    (g[i] * xd[i]).abs()
                })
                .sum();
            m_dg[cc] = ds * cfg.gate.derivative(saved.a[nn * c + cc]).abs();
        }
        let mut m_du = vec![0.0; d];
        for j in 0..d {
            let t: f64 = (0..c)
                .map(|cc| (w.w2[cc * d + j] as f64).abs() * m_dg[cc])
                .sum();
            m_du[j] = t * cfg.activation.derivative(saved.h[nn * d + j]).abs();
        }
        for cc in 0..c {
            for j in 0..d {
                let m_u = act_max * ms.h[nn * d + j];
                m.dw2[cc * d + j] += m_dg[cc] * m_u;
                m.dw1[j * c + cc] += m_du[j] * ms.z[nn * c + cc];
            }
            let dz: f64 = (0..d)
                .map(|j| (w.w1[j * c + cc] as f64).abs() * m_du[j])
                .sum();
            m_dzh[nn * c + cc] = dz / hw as f64;
        }
        if let Some(b) = m.db2.as_mut() {
            b.iter_mut().zip(&m_dg).for_each(|(a, v)| *a += v);
        }
        if let Some(b) = m.db1.as_mut() {
            b.iter_mut().zip(&m_du).for_each(|(a, v)| *a += v);
        }
    }
    (m, m_dzh)
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
    let w = weights(cfg, seed);
    let x = input::<T>(shape, layout, seed ^ 0x11);
    let r = residual_off_kink(&w, &x, input::<T>(shape, layout, seed ^ 0x22));
    let dy = input::<T>(shape, layout, seed ^ 0x33);
    let res = epi.then_some(&r);
    let (n, c, d) = (shape.n, shape.c, cfg.hidden);
    let nan = T::from_f32(f32::NAN);

    let want = reference::forward(&w, &x, res).unwrap();
    let mut y = Tensor::from_vec(shape, layout, vec![nan; shape.numel()]).unwrap();
    let mut saved = CpuSaved {
        z: vec![f32::NAN; n * c],
        h: vec![f32::NAN; n * d],
        u: vec![f32::NAN; n * d],
        s: vec![f32::NAN; n * c],
    };
    cpu::forward_into(&w, &x, res, &mut y, &mut saved).unwrap();
    let out_tol = T::DTYPE.output_tolerance();
    let f32_tol = DType::F32.output_tolerance();
    let m = saved_magnitudes(&w, &x, &want.saved);
    // y = s x (+ r): magnitude |x| M_s (+ |r|).
    let (xd, rd) = (x.to_f64_vec(), r.to_f64_vec());
    let y_mag: Vec<f64> = (0..shape.numel())
        .map(|i| {
            let (nn, cc) = match layout {
                Layout::Nchw => (i / shape.sample_numel(), (i / shape.hw()) % c),
                Layout::Nhwc => (i / shape.sample_numel(), i % c),
            };
            xd[i].abs() * m.s[nn * c + cc] + if epi { rd[i].abs() } else { 0.0 }
        })
        .collect();
    check_sum("y", &y.to_f64_vec(), &want.y, &y_mag, out_tol, &ctx);
    check_sum("z", &f64s(&saved.z), &want.saved.z, &m.z, f32_tol, &ctx);
    check_sum("h", &f64s(&saved.h), &want.saved.h, &m.h, f32_tol, &ctx);
    let want_u: Vec<f64> = want
        .saved
        .h
        .iter()
        .map(|&h| cfg.activation.apply(h))
        .collect();
    check_sum("u", &f64s(&saved.u), &want_u, &m.h, f32_tol, &ctx);
    check_sum("s", &f64s(&saved.s), &want.saved.s, &m.s, f32_tol, &ctx);
    t.saturated_gates += want
        .saved
        .s
        .iter()
        .filter(|&&s| s == 0.0 || s == 1.0)
        .count();

    let wantb = reference::backward(&w, &x, res, &want.saved, &dy).unwrap();
    // g = dy through the mask; dx = g s + dz / HW elementwise: its magnitude is |g| M_s + M_dz / HW.
    let g_ref: Vec<f64> = wantb.dresidual.clone().unwrap_or_else(|| dy.to_f64_vec());
    let (mag, m_dzh) = grad_magnitudes(&w, &x, &g_ref, &want.saved, &m);
    let dx_mag: Vec<f64> = (0..shape.numel())
        .map(|i| {
            let (nn, cc) = match layout {
                Layout::Nchw => (i / shape.sample_numel(), (i / shape.hw()) % c),
                Layout::Nhwc => (i / shape.sample_numel(), i % c),
            };
            g_ref[i].abs() * m.s[nn * c + cc] + m_dzh[nn * c + cc]
        })
        .collect();
    let grad_tol = T::DTYPE.grad_tolerance();
    let f32_grad_tol = DType::F32.grad_tolerance();
    // Poisoned outputs; one accumulate run on top of known values.
    for accumulate in [false, true] {
        let base = input::<T>(shape, layout, seed ^ 0x44);
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
            &w,
            &x,
            res,
            &saved,
            &dy,
            &mut dx,
            accumulate,
            &mut grads,
            dres.as_mut(),
        )
        .unwrap();
        let (want_dx, dx_mag) = if accumulate {
            let b = base.to_f64_vec();
            let sum = b.iter().zip(&wantb.dx).map(|(a, v)| a + v).collect();
            let mag = b.iter().zip(&dx_mag).map(|(a, m)| a.abs() + m).collect();
            (sum, mag)
        } else {
            (wantb.dx.clone(), dx_mag.clone())
        };
        let ctx = format!("{ctx} accumulate={accumulate}");
        check_sum("dx", &dx.to_f64_vec(), &want_dx, &dx_mag, grad_tol, &ctx);
        // Parameter gradients are f32 whatever T: the f32 tolerance.
        let tol = f32_grad_tol;
        check_sum(
            "dW1",
            &f64s(&grads.dw1),
            &wantb.grads.dw1,
            &mag.dw1,
            tol,
            &ctx,
        );
        check_sum(
            "dW2",
            &f64s(&grads.dw2),
            &wantb.grads.dw2,
            &mag.dw2,
            tol,
            &ctx,
        );
        match (&grads.db1, &wantb.grads.db1, &mag.db1) {
            (Some(g), Some(w), Some(m)) => check_sum("db1", &f64s(g), w, m, tol, &ctx),
            (None, None, None) => {}
            _ => panic!("db1 presence differs ({ctx})"),
        }
        match (&grads.db2, &wantb.grads.db2, &mag.db2) {
            (Some(g), Some(w), Some(m)) => check_sum("db2", &f64s(g), w, m, tol, &ctx),
            (None, None, None) => {}
            _ => panic!("db2 presence differs ({ctx})"),
        }
        match (&dres, &wantb.dresidual) {
            (Some(g), Some(w)) => {
                check("dresidual", &g.to_f64_vec(), w, grad_tol, &ctx);
                t.masked += w.iter().filter(|&&v| v == 0.0).count();
            }
            (None, None) => {}
            _ => panic!("d residual presence differs ({ctx})"),
        }
    }
    t.cases += 1;
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
    let seed = senet::rng::fresh_seed();
    println!("{} seed {seed}", T::DTYPE);
    let t = pool().install(|| sweep::<T>(seed));
    let expected: usize = shapes().iter().map(|&s| configs(s).len() * 2 * 2).sum();
    assert_eq!(t.cases, expected);
    assert_eq!(expected, 18 * 8 * 4 + 3 * 2 * 4);
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
