//! `senet::candle`: the custom op's forward and every gradient through candle's autograd, against
//! candle's own composed SE graph and senet's f64 reference; layouts, dtypes, the module, errors.
//!
//! The quick tier runs every act / gate / bias / residual combination in both layouts and in f32
//! and bf16 on a rotating set of odd shapes; `SENET_FULL_TESTS=1` runs every shape with every
//! combination. With the `candle-cuda` feature the same body runs on candle's CUDA device when
//! there is one (`SENET_REQUIRE_GPU=1` makes its absence a failure).

mod common;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use common::{full, seed};
use rand::{Rng, SeedableRng};
use senet::candle::{memory_layout, se, se_packed, unpack_grads, SqueezeExcite};
use senet::se::check;
use senet::{Activation, Gate, Layout, SeConfig, SeWeights, Shape};

/// Shapes `(N, C, H, W, d)`: C of 1, 3, 17 and 1000, HW of 1, 49 and odd rectangles, N of 1 and 5.
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 1),
    (5, 3, 7, 7, 2),
    (1, 17, 3, 5, 4),
    (5, 17, 1, 1, 8),
    (2, 1000, 7, 7, 16),
    (5, 3, 1, 3, 1),
    (1, 1000, 1, 1, 64),
];

#[derive(Clone, Copy, Debug)]
struct Case {
    shape: Shape,
    d: usize,
    layout: Layout,
    act: Activation,
    gate: Gate,
    bias: bool,
    residual: bool,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut k = 0;
    for layout in Layout::ALL {
        for act in Activation::ALL {
            for gate in Gate::ALL {
                for bias in [false, true] {
                    for residual in [false, true] {
                        let shapes: Vec<_> = if full() {
                            SHAPES.to_vec()
                        } else {
                            k += 1;
                            vec![SHAPES[k % SHAPES.len()]]
                        };
                        for (n, c, h, w, d) in shapes {
                            v.push(Case {
                                shape: Shape::new(n, c, h, w),
                                d,
                                layout,
                                act,
                                gate,
                                bias,
                                residual,
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

/// A tensor in NCHW shape with its memory in `layout`, from NCHW-ordered values.
fn in_layout(values: Vec<f32>, s: Shape, layout: Layout, dtype: DType, dev: &Device) -> Tensor {
    let t = Tensor::from_vec(values, (s.n, s.c, s.h, s.w), dev).unwrap();
    let t = t.to_dtype(dtype).unwrap();
    match layout {
        Layout::Nchw => t,
        Layout::Nhwc => t
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap(),
    }
}

/// A tensor's values as f64 in `layout`'s memory order (what senet's Tensor holds).
fn values_in(t: &Tensor, layout: Layout) -> Vec<f64> {
    let t = t.to_dtype(DType::F64).unwrap();
    let t = match layout {
        Layout::Nchw => t,
        Layout::Nhwc => t.permute((0, 2, 3, 1)).unwrap(),
    };
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A senet tensor holding exactly `t`'s values (already rounded to `t`'s dtype).
fn senet_tensor(t: &Tensor, s: Shape, layout: Layout) -> senet::Tensor<f32> {
    let v = values_in(t, layout).into_iter().map(|v| v as f32).collect();
    senet::Tensor::from_vec(s, layout, v).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// candle's own SE, composed as candle-transformers' models write it (in f32).
fn composed(
    x: &Tensor,
    w1: &Tensor,
    b1: Option<&Tensor>,
    w2: &Tensor,
    b2: Option<&Tensor>,
    residual: Option<&Tensor>,
    cfg: &SeConfig,
) -> candle_core::Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let z = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
    let z = z.reshape((n, c))?;
    let mut h = z.matmul(&w1.t()?)?;
    if let Some(b1) = b1 {
        h = h.broadcast_add(b1)?;
    }
    let u = match cfg.activation {
        Activation::Relu => h.relu()?,
        Activation::Silu => h.silu()?,
    };
    let mut a = u.matmul(&w2.t()?)?;
    if let Some(b2) = b2 {
        a = a.broadcast_add(b2)?;
    }
    let s = match cfg.gate {
        Gate::Sigmoid => candle_nn::ops::sigmoid(&a)?,
        Gate::HardSigmoid => ((a + 3.0)?.clamp(0f32, 6f32)? / 6.0)?,
    };
    let y = x.broadcast_mul(&s.reshape((n, c, 1, 1))?)?;
    match residual {
        Some(r) => (y + r)?.relu(),
        None => Ok(y),
    }
}

/// Error of `out` against `reference`, asserted within `tol`: relative L2 measured against
/// `magnitude`, the size of the summands each value is computed from (`check::sum_error`; it is
/// plain relative L2 where nothing cancels). A parameter gradient of a single sample is one
/// hidden unit's back-propagated sum times the means: when that sum cancels, f32 rounding of its
/// terms legitimately exceeds 1e-4 of the small result, for senet and candle alike.
#[track_caller]
fn close(what: &str, case: &Case, out: &[f64], reference: &[f64], magnitude: &[f64], tol: f64) {
    let e = check::sum_error(out, reference, magnitude);
    assert!(
        e <= tol,
        "{case:?}: {what}: relative L2 error {e:.3e} > {tol:.1e}"
    );
}

/// One case on `dev` in `dtype`: forward and all gradients, against the reference and candle.
fn check(case: &Case, dtype: DType, dev: &Device, rng: &mut rand::rngs::StdRng) {
    let s = case.shape;
    let cfg = SeConfig::with_hidden(s.c, case.d)
        .unwrap()
        .bias(case.bias)
        .activation(case.act)
        .gate(case.gate);
    let numel = s.numel();
    let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let xv = uniform(numel, 1.0);
    // Residual kept off the ReLU kink (|s * x| < 1 <= |r|), both signs.
    let rv: Vec<f32> = uniform(numel, 1.0)
        .into_iter()
        .map(|v| v.signum() * (1.5 + v.abs()))
        .collect();
    let gv = uniform(numel, 1.0);
    let w_scale = 2.0 / (s.c as f32).sqrt();
    let w1v = uniform(case.d * s.c, w_scale);
    let b1v = uniform(case.d, 0.5);
    let w2v = uniform(s.c * case.d, 2.0 / (case.d as f32).sqrt());
    let b2v = uniform(s.c, 0.5);

    // The op's operands, as Vars so autograd reaches them.
    let x = Var::from_tensor(&in_layout(xv, s, case.layout, dtype, dev)).unwrap();
    // Hidden and gate inputs kept off their kinks on the (rounded) x, where f32 and f64 may
    // take different sides (`check::weights_off_kinks`).
    let nudged = check::weights_off_kinks(
        SeWeights::from_parts(
            cfg,
            w1v,
            case.bias.then_some(b1v.clone()),
            w2v,
            case.bias.then_some(b2v.clone()),
        )
        .unwrap(),
        &senet_tensor(&x, s, case.layout),
    )
    .unwrap();
    let (w1v, w2v) = (nudged.w1, nudged.w2);
    let b1v = nudged.b1.unwrap_or(b1v);
    let b2v = nudged.b2.unwrap_or(b2v);
    let r = Var::from_tensor(&in_layout(rv, s, case.layout, dtype, dev)).unwrap();
    let g = in_layout(gv, s, case.layout, dtype, dev);
    let param = |v: Vec<f32>, shape: &[usize]| {
        let t = Tensor::from_vec(v, shape, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    };
    let w1 = param(w1v, &[case.d, s.c, 1, 1]);
    let b1 = param(b1v, &[case.d]);
    let w2 = param(w2v, &[s.c, case.d]);
    let b2 = param(b2v, &[s.c]);
    let b1o = case.bias.then_some(b1.as_tensor());
    let b2o = case.bias.then_some(b2.as_tensor());
    let ro = case.residual.then_some(r.as_tensor());

    let y = se(x.as_tensor(), &w1, b1o, &w2, b2o, ro, &cfg).unwrap();
    assert_eq!(y.dims(), x.dims());
    assert_eq!(y.dtype(), dtype);
    assert_eq!(
        memory_layout(y.layout()),
        memory_layout(x.layout()),
        "{case:?}"
    );
    let loss = (&y * &g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| grads.get(v).expect("a gradient").clone();

    // The f64 reference on the same (rounded) values.
    let weights = SeWeights::from_parts(
        cfg,
        flat(&w1).into_iter().map(|v| v as f32).collect(),
        case.bias
            .then(|| flat(&b1).into_iter().map(|v| v as f32).collect()),
        flat(&w2).into_iter().map(|v| v as f32).collect(),
        case.bias
            .then(|| flat(&b2).into_iter().map(|v| v as f32).collect()),
    )
    .unwrap();
    let xs = senet_tensor(&x, s, case.layout);
    let rs = senet_tensor(&r, s, case.layout);
    let gs = senet_tensor(&g, s, case.layout);
    let rs = case.residual.then_some(&rs);
    let exp = check::expected(&weights, &xs, rs, &gs).unwrap();
    let (fwd, bwd, mag) = (&exp.forward, &exp.backward, &exp.mag);
    // d residual is the output's gradient through the ReLU mask: nothing is summed.
    let dr_mag: Option<Vec<f64>> = bwd
        .dresidual
        .as_ref()
        .map(|d| d.iter().map(|v| v.abs()).collect());

    let dt = match dtype {
        DType::F32 => senet::DType::F32,
        DType::F16 => senet::DType::F16,
        _ => senet::DType::BF16,
    };
    let (otol, gtol) = (dt.output_tolerance(), dt.grad_tolerance());
    let act = |t: &Tensor| values_in(t, case.layout);
    close("y", case, &act(&y), &fwd.y, &mag.y, otol);
    close("dx", case, &act(&grad(&x)), &bwd.dx, &mag.dx, gtol);
    let g1 = (&mag.grads.dw1, &mag.grads.dw2);
    close("dw1", case, &flat(&grad(&w1)), &bwd.grads.dw1, g1.0, gtol);
    close("dw2", case, &flat(&grad(&w2)), &bwd.grads.dw2, g1.1, gtol);
    let (db1, db2) = (&bwd.grads.db1, &bwd.grads.db2);
    let (mb1, mb2) = (&mag.grads.db1, &mag.grads.db2);
    if case.bias {
        let (db1, db2) = (db1.as_ref().unwrap(), db2.as_ref().unwrap());
        let (mb1, mb2) = (mb1.as_ref().unwrap(), mb2.as_ref().unwrap());
        close("db1", case, &flat(&grad(&b1)), db1, mb1, gtol);
        close("db2", case, &flat(&grad(&b2)), db2, mb2, gtol);
    } else {
        assert!(grads.get(&b1).is_none() && grads.get(&b2).is_none());
    }
    if case.residual {
        let dr = bwd.dresidual.as_ref().unwrap();
        let dr_mag = dr_mag.as_ref().unwrap();
        close("dresidual", case, &act(&grad(&r)), dr, dr_mag, gtol);
    } else {
        assert!(grads.get(&r).is_none());
    }

    // candle's composed graph in f32 on the same values: forward and every gradient.
    let f32v = |v: &Var| Var::from_tensor(&v.to_dtype(DType::F32).unwrap()).unwrap();
    let (cx, cr, cw1, cb1, cw2, cb2) = (
        f32v(&x),
        f32v(&r),
        f32v(&w1),
        f32v(&b1),
        f32v(&w2),
        f32v(&b2),
    );
    let cw1m = cw1.reshape((case.d, s.c)).unwrap();
    let cy = composed(
        &cx,
        &cw1m,
        case.bias.then_some(cb1.as_tensor()),
        &cw2,
        case.bias.then_some(cb2.as_tensor()),
        case.residual.then_some(cr.as_tensor()),
        &cfg,
    )
    .unwrap();
    let cg = g.to_dtype(DType::F32).unwrap();
    let cgrads = (&cy * &cg).unwrap().sum_all().unwrap().backward().unwrap();
    let cgrad = |v: &Var| cgrads.get(v).expect("a gradient").clone();
    close("y vs candle", case, &act(&y), &act(&cy), &mag.y, otol);
    let dx_c = act(&cgrad(&cx));
    close("dx vs candle", case, &act(&grad(&x)), &dx_c, &mag.dx, gtol);
    let dw1_c = flat(&cgrad(&cw1));
    close("dw1 vs candle", case, &flat(&grad(&w1)), &dw1_c, g1.0, gtol);
    let dw2_c = flat(&cgrad(&cw2));
    close("dw2 vs candle", case, &flat(&grad(&w2)), &dw2_c, g1.1, gtol);
    if case.bias {
        let (mb1, mb2) = (mb1.as_ref().unwrap(), mb2.as_ref().unwrap());
        let db1_c = flat(&cgrad(&cb1));
        close("db1 vs candle", case, &flat(&grad(&b1)), &db1_c, mb1, gtol);
        let db2_c = flat(&cgrad(&cb2));
        close("db2 vs candle", case, &flat(&grad(&b2)), &db2_c, mb2, gtol);
    }
    if case.residual {
        let dr_c = act(&cgrad(&cr));
        let dr_mag = dr_mag.as_ref().unwrap();
        close("dr vs candle", case, &act(&grad(&r)), &dr_c, dr_mag, gtol);
    }
}

fn run_all(dev: &Device, label: &str) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed(label));
    let cases = cases();
    for case in &cases {
        for dtype in [DType::F32, DType::BF16] {
            check(case, dtype, dev, &mut rng);
        }
    }
    println!("{label}: {} cases x f32, bf16", cases.len());
}

#[test]
fn op_matches_reference_and_candle_on_cpu() {
    run_all(&Device::Cpu, "candle cpu");
}

#[test]
fn f16_forward_and_backward() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("candle f16"));
    for layout in Layout::ALL {
        let case = Case {
            shape: Shape::new(2, 17, 3, 5),
            d: 4,
            layout,
            act: Activation::Silu,
            gate: Gate::Sigmoid,
            bias: true,
            residual: true,
        };
        check(&case, DType::F16, &Device::Cpu, &mut rng);
    }
}

#[test]
fn other_strides_are_made_contiguous() {
    // x with H and W transposed (neither NCHW nor NHWC memory): copied, then the same answer.
    let dev = Device::Cpu;
    let cfg = SeConfig::with_hidden(6, 3).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 6, 5, 3), &dev).unwrap();
    let xt = x.transpose(2, 3).unwrap();
    assert_eq!(memory_layout(xt.layout()), None);
    let w1 = Tensor::randn(0f32, 0.5, (3, 6), &dev).unwrap();
    let w2 = Tensor::randn(0f32, 0.5, (6, 3), &dev).unwrap();
    let b1 = Tensor::randn(0f32, 0.5, 3, &dev).unwrap();
    let b2 = Tensor::randn(0f32, 0.5, 6, &dev).unwrap();
    let y = se(&xt, &w1, Some(&b1), &w2, Some(&b2), None, &cfg).unwrap();
    let yc = se(
        &xt.contiguous().unwrap(),
        &w1,
        Some(&b1),
        &w2,
        Some(&b2),
        None,
        &cfg,
    )
    .unwrap();
    let want = composed(&xt, &w1, Some(&b1), &w2, Some(&b2), None, &cfg).unwrap();
    assert_eq!(flat(&y), flat(&yc));
    assert!(senet::rel_l2_error(&flat(&y), &flat(&want)) < 1e-5);
    // A residual in the other layout than x is converted to x's.
    let r = Tensor::randn(0f32, 1.0, (2, 6, 5, 3), &dev).unwrap();
    let r_nhwc = in_layout(
        flat(&r).iter().map(|&v| v as f32).collect(),
        Shape::new(2, 6, 5, 3),
        Layout::Nhwc,
        DType::F32,
        &dev,
    );
    let y1 = se(&x, &w1, Some(&b1), &w2, Some(&b2), Some(&r), &cfg).unwrap();
    let y2 = se(&x, &w1, Some(&b1), &w2, Some(&b2), Some(&r_nhwc), &cfg).unwrap();
    assert_eq!(flat(&y1), flat(&y2));
}

#[test]
fn packed_parameters_and_their_gradient() {
    let dev = Device::Cpu;
    let cfg = SeConfig::with_hidden(5, 2).unwrap();
    let shape = Shape::new(3, 5, 2, 2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("candle packed"));
    let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let xv = uniform(shape.numel(), 1.0);
    let x = Var::from_tensor(&in_layout(xv, shape, Layout::Nchw, DType::F32, &dev)).unwrap();
    let p = Tensor::from_vec(uniform(cfg.num_params(), 0.5), cfg.num_params(), &dev).unwrap();
    let p = Var::from_tensor(&p).unwrap();
    let y = se_packed(&x, &p, None, &cfg).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dp = grads.get(&p).unwrap();
    let (w1, b1, w2, b2) = unpack_grads(&cfg, &p).unwrap();
    let (dw1, db1, dw2, db2) = unpack_grads(&cfg, dp).unwrap();
    // The same values through the unpacked entry point, with candle's graph as the judge.
    let want = composed(&x, &w1, b1.as_ref(), &w2, b2.as_ref(), None, &cfg).unwrap();
    assert!(senet::rel_l2_error(&flat(&y), &flat(&want)) < 1e-5);
    let (vw1, vb1, vw2, vb2) = (
        Var::from_tensor(&w1).unwrap(),
        Var::from_tensor(b1.as_ref().unwrap()).unwrap(),
        Var::from_tensor(&w2).unwrap(),
        Var::from_tensor(b2.as_ref().unwrap()).unwrap(),
    );
    let cg = composed(&x, &vw1, Some(&vb1), &vw2, Some(&vb2), None, &cfg)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // Gradients are batch sums: judged against their summands' size (see `close`).
    let f32s = |t: &Tensor| flat(t).into_iter().map(|v| v as f32).collect::<Vec<_>>();
    let weights = SeWeights::from_parts(
        cfg,
        f32s(&w1),
        Some(f32s(b1.as_ref().unwrap())),
        f32s(&w2),
        Some(f32s(b2.as_ref().unwrap())),
    )
    .unwrap();
    let ones = senet::Tensor::from_vec(shape, Layout::Nchw, vec![1.0; shape.numel()]).unwrap();
    let xs = senet_tensor(&x, shape, Layout::Nchw);
    let mag = check::expected(&weights, &xs, None, &ones)
        .unwrap()
        .mag
        .grads;
    let m = [
        &mag.dw1,
        mag.db1.as_ref().unwrap(),
        &mag.dw2,
        mag.db2.as_ref().unwrap(),
    ];
    for ((got, v), m) in [
        (dw1, &vw1),
        (db1.unwrap(), &vb1),
        (dw2, &vw2),
        (db2.unwrap(), &vb2),
    ]
    .into_iter()
    .zip(m)
    {
        let e = check::sum_error(&flat(&got), &flat(cg.get(v).unwrap()), m);
        assert!(e < 1e-4, "{e}");
    }
}

#[test]
fn module_uses_timm_names_and_matches_candle() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let se_mod = SqueezeExcite::timm(64, 16, vb.pp("se")).unwrap();
    assert_eq!(se_mod.config().hidden, 8);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<(String, Vec<usize>)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    drop(data);
    names.sort();
    assert_eq!(
        names,
        vec![
            ("se.fc1.bias".to_string(), vec![8]),
            ("se.fc1.weight".to_string(), vec![8, 64, 1, 1]),
            ("se.fc2.bias".to_string(), vec![64]),
            ("se.fc2.weight".to_string(), vec![64, 8, 1, 1]),
        ]
    );

    // A checkpoint's tensors load by those names; forward equals candle's composed graph.
    let (c, d) = (24, 6);
    let mut ts = std::collections::HashMap::new();
    ts.insert(
        "fc1.weight".to_string(),
        Tensor::randn(0f32, 0.3, (d, c, 1, 1), &dev).unwrap(),
    );
    ts.insert(
        "fc1.bias".to_string(),
        Tensor::randn(0f32, 0.3, d, &dev).unwrap(),
    );
    ts.insert(
        "fc2.weight".to_string(),
        Tensor::randn(0f32, 0.3, (c, d, 1, 1), &dev).unwrap(),
    );
    ts.insert(
        "fc2.bias".to_string(),
        Tensor::randn(0f32, 0.3, c, &dev).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &dev);
    let eff = SqueezeExcite::efficientnet(c, d, vb).unwrap();
    assert_eq!(eff.config().activation, Activation::Silu);
    let x = Tensor::randn(0f32, 1.0, (2, c, 5, 5), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (2, c, 5, 5), &dev).unwrap();
    let w1 = ts["fc1.weight"].reshape((d, c)).unwrap();
    let w2 = ts["fc2.weight"].reshape((c, d)).unwrap();
    let (b1, b2) = (&ts["fc1.bias"], &ts["fc2.bias"]);
    let want = composed(&x, &w1, Some(b1), &w2, Some(b2), None, eff.config()).unwrap();
    let got = eff.forward(&x).unwrap();
    assert!(senet::rel_l2_error(&flat(&got), &flat(&want)) < 1e-5);
    let want = composed(&x, &w1, Some(b1), &w2, Some(b2), Some(&r), eff.config()).unwrap();
    let got = eff.forward_residual(&x, &r).unwrap();
    assert!(senet::rel_l2_error(&flat(&got), &flat(&want)) < 1e-5);
    // A checkpoint without the biases is an error for a biased block, not a panic.
    let mut nob = ts.clone();
    nob.remove("fc2.bias");
    let vb = VarBuilder::from_tensors(nob, DType::F32, &dev);
    assert!(SqueezeExcite::efficientnet(c, d, vb).is_err());
}

#[test]
fn bad_operands_are_errors() {
    let dev = Device::Cpu;
    let cfg = SeConfig::with_hidden(4, 2).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
    let w1 = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
    let w2 = Tensor::randn(0f32, 1.0, (4, 2), &dev).unwrap();
    let b1 = Tensor::randn(0f32, 1.0, 2, &dev).unwrap();
    let b2 = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
    let ok = se(&x, &w1, Some(&b1), &w2, Some(&b2), None, &cfg);
    assert!(ok.is_ok());
    let err = |r: candle_core::Result<Tensor>, want: &str| {
        let e = r.expect_err("an error").to_string();
        assert!(e.contains(want), "`{e}` does not mention `{want}`");
    };
    // Rank, channels, weight shapes, biases against the config.
    let x3 = x.reshape((2, 4, 9)).unwrap();
    err(
        se(&x3, &w1, Some(&b1), &w2, Some(&b2), None, &cfg),
        "[N, C, H, W]",
    );
    let x5 = Tensor::randn(0f32, 1.0, (2, 5, 3, 3), &dev).unwrap();
    err(
        se(&x5, &w1, Some(&b1), &w2, Some(&b2), None, &cfg),
        "channels",
    );
    err(se(&x, &w2, Some(&b1), &w2, Some(&b2), None, &cfg), "w1");
    err(se(&x, &w1, Some(&b1), &w1, Some(&b2), None, &cfg), "w2");
    err(se(&x, &w1, Some(&b2), &w2, Some(&b2), None, &cfg), "b1");
    err(se(&x, &w1, None, &w2, None, None, &cfg), "bias");
    err(
        se(&x, &w1, Some(&b1), &w2, Some(&b2), None, &cfg.bias(false)),
        "bias",
    );
    // Dtypes: integer or f64 activations, mixed parameter dtypes, a residual of another dtype.
    let xi = x.to_dtype(DType::U32).unwrap();
    err(se(&xi, &w1, Some(&b1), &w2, Some(&b2), None, &cfg), "U32");
    let xd = x.to_dtype(DType::F64).unwrap();
    err(se(&xd, &w1, Some(&b1), &w2, Some(&b2), None, &cfg), "F64");
    let w1h = w1.to_dtype(DType::BF16).unwrap();
    err(se(&x, &w1h, Some(&b1), &w2, Some(&b2), None, &cfg), "dtype");
    let rb = x.to_dtype(DType::BF16).unwrap();
    err(
        se(&x, &w1, Some(&b1), &w2, Some(&b2), Some(&rb), &cfg),
        "residual",
    );
    // A residual of another shape; packed parameters of the wrong length.
    let r = Tensor::randn(0f32, 1.0, (2, 4, 3, 4), &dev).unwrap();
    err(
        se(&x, &w1, Some(&b1), &w2, Some(&b2), Some(&r), &cfg),
        "residual",
    );
    let p = Tensor::zeros(cfg.num_params() + 1, DType::F32, &dev).unwrap();
    err(se_packed(&x, &p, None, &cfg), "packed");
    // bf16 parameters with f32 activations are fine (senet computes in f32).
    let pb = senet::candle::pack_params(&cfg, &w1, Some(&b1), &w2, Some(&b2))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert!(se_packed(&x, &pb, None, &cfg).is_ok());
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;

    /// candle's CUDA device 0, or None (printed) when there is none; SENET_REQUIRE_GPU=1 makes
    /// the absence a failure.
    fn device() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                if std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("SENET_REQUIRE_GPU=1 but candle has no CUDA device: {e}");
                }
                eprintln!("skipped: no CUDA device ({e})");
                None
            }
        }
    }

    #[test]
    fn op_matches_reference_and_candle_on_cuda() {
        if let Some(dev) = device() {
            run_all(&dev, "candle cuda");
        }
    }

    /// senet's kernels are queued on candle's own stream: the op's forward and backward through
    /// candle's autograd, captured into a CUDA graph on that stream, leave senet's kernels
    /// (`se_*`) among the graph's kernel nodes, and replaying the graph gives the eager results
    /// bit for bit (nothing ran elsewhere, nothing synchronised).
    #[test]
    fn op_runs_on_candles_stream() {
        use cudarc::driver::sys;
        let Some(dev) = device() else { return };
        let Device::Cuda(cd) = &dev else {
            panic!("candle's CUDA device 0 is not a CUDA device: {dev:?}")
        };
        let stream = cd.cuda_stream();
        let cfg = SeConfig::with_hidden(32, 8).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 32, 7, 7), &dev).unwrap()).unwrap();
        let w1 = Tensor::randn(0f32, 0.3, (8, 32), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 0.3, (32, 8), &dev).unwrap();
        let b2 = Tensor::randn(0f32, 0.3, 32, &dev).unwrap();
        let run = || {
            let y = se(x.as_tensor(), &w1, Some(&b1), &w2, Some(&b2), None, &cfg).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).expect("a gradient for x").clone();
            (y, dx)
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|v| v.to_bits()).collect()
        };
        // Eagerly first: loads the kernels and makes senet's handle for this stream.
        let (y0, dx0) = run();
        let (y0, dx0) = (bits(&y0), bits(&dx0));
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let (y, dx) = run();
        let graph = stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("the capture recorded launches");
        let names = common::graph::kernel_names(graph.cu_graph());
        assert!(
            names.iter().filter(|n| n.starts_with("se_")).count() >= 2,
            "senet's forward and backward kernels on candle's stream: {names:?}"
        );
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        assert_eq!(bits(&y), y0, "replayed forward");
        assert_eq!(bits(&dx), dx0, "replayed input gradient");
    }

    #[test]
    fn mismatched_devices_are_errors() {
        let Some(dev) = device() else { return };
        let cfg = SeConfig::with_hidden(4, 2).unwrap().bias(false);
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let w1 = Tensor::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (4, 2), &Device::Cpu).unwrap();
        assert!(se(&x, &w1, None, &w2, None, None, &cfg).is_err());
        let w1 = w1.to_device(&dev).unwrap();
        let w2 = w2.to_device(&dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu).unwrap();
        assert!(se(&x, &w1, None, &w2, None, Some(&r), &cfg).is_err());
        assert!(se(&x, &w1, None, &w2, None, None, &cfg).is_ok());
    }
}
