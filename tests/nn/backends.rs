//! The fast CPU backend against the f64 reference: every op, then whole small networks,
//! forward and backward, within DESIGN.md's f32 tolerances (outputs 1e-5, gradients 1e-4,
//! relative L2, on the same rounded inputs); on an instance where the reference's own formulas
//! in f32 already miss those, within 4x of that run (`close_conditioned`).

use crate::nn_common::{random_tensor, randomize_network, seed};
use senet::nn::backend::{Backend, ConvGeom, Cpu, PoolGeom, Reference};
use senet::nn::blocks::{BlockKind, SeBlockConfig, SePosition, StrideOn};
use senet::nn::inception::{InceptionModule, InceptionPool, InceptionSpec};
use senet::nn::layers::{GlobalAvgPool, Linear};
use senet::nn::{Branch, Layer, Mode, Module, Network, ResNetConfig, Seq, Stem};
use senet::{rel_l2_error, rng, Shape, Tensor};

const OUT_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
/// DESIGN.md's bf16 tolerance, outputs and gradients alike.
const BF16_TOL: f64 = 1e-2;
/// DESIGN.md's f16 tolerance, outputs and gradients alike.
const F16_TOL: f64 = 2e-3;

/// The output tolerance of the op checks: f32's, or the narrow type's while this thread's
/// inputs are rounded to it (`crate::nn_common::set_narrow_inputs`, the narrow backends' tests).
fn out_tol() -> f64 {
    match crate::nn_common::narrow_inputs() {
        crate::nn_common::Narrow::None => OUT_TOL,
        crate::nn_common::Narrow::Bf16 => BF16_TOL,
        crate::nn_common::Narrow::F16 => F16_TOL,
    }
}

/// The gradient tolerance of the op checks (as [`out_tol`]).
fn grad_tol() -> f64 {
    match crate::nn_common::narrow_inputs() {
        crate::nn_common::Narrow::None => GRAD_TOL,
        crate::nn_common::Narrow::Bf16 => BF16_TOL,
        crate::nn_common::Narrow::F16 => F16_TOL,
    }
}

fn f64s(t: &Tensor<f32>) -> Vec<f64> {
    t.to_f64_vec()
}

fn vec_f32(n: usize, seed: u64) -> Vec<f32> {
    rng::uniform_vec(n, -1.0, 1.0, seed)
}

fn close(label: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_l2_error(got, want);
    assert!(e <= tol, "{label}: relative error {e:.3e} > {tol:.0e}");
}

/// One parameter's gradients: name, backend, f64 reference, reference in f32.
type LayerGrads<'a> = (&'a String, &'a Vec<f64>, &'a Vec<f64>, &'a Vec<f64>);

/// How far a backend may exceed the error of the reference's own formulas run in f32 on an
/// ill-conditioned instance (see [`close_conditioned`]).
const NAIVE_FACTOR: f64 = 4.0;

/// [`close`], unless plain f32 arithmetic cannot meet `tol` on this instance: `naive` is the
/// same computation by the reference backend in f32 (the f64 oracle's formulas, rounded at every
/// step). Random parameters now and then make an instance ill-conditioned for f32 (a ReLU that
/// lets through a few values just above zero, each the small difference of BatchNorm terms near
/// 1, which a later BatchNorm scales up by 1/sigma = 3000): then even the oracle's own formulas
/// in f32 miss `tol`, and no f32 backend can be held to it. There the bound is
/// `NAIVE_FACTOR` times the naive error (said on stderr); everywhere else (the naive error
/// below `tol / NAIVE_FACTOR`, in practice 1e-6 or less) it is `tol` itself.
fn close_conditioned(label: &str, got: &[f64], want: &[f64], naive: &[f64], tol: f64) {
    close_within_f32_error(label, got, want, rel_l2_error(naive, want), tol);
}

/// [`close_conditioned`] with the yardstick's error given: what f32 arithmetic costs on this
/// instance.
fn close_within_f32_error(label: &str, got: &[f64], want: &[f64], e_naive: f64, tol: f64) {
    let bound = tol.max(NAIVE_FACTOR * e_naive);
    if bound > tol {
        eprintln!(
            "{label}: ill-conditioned in f32 (f32's own error here: {e_naive:.3e}); \
             bound {bound:.3e}"
        );
    }
    let e = rel_l2_error(got, want);
    assert!(
        e <= bound,
        "{label}: relative error {e:.3e} > {bound:.0e} (f32's own error here: {e_naive:.3e})"
    );
}

fn check_convolution<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    check_convolution_within(be, OUT_TOL, GRAD_TOL);
}

/// [`check_convolution`] with the given output and gradient tolerances.
fn check_convolution_within<B: Backend<f32, T = Tensor<f32>>>(be: &B, out_tol: f64, grad_tol: f64) {
    let s = seed("conv");
    let cases = [
        // (in, out, k, stride, pad, groups, bias, input)
        (3, 8, 7, 2, 3, 1, false, Shape::new(1, 3, 17, 15)),
        (8, 16, 3, 1, 1, 1, true, Shape::new(1, 8, 9, 9)),
        (8, 16, 3, 2, 1, 4, false, Shape::new(3, 8, 10, 7)),
        (16, 8, 1, 1, 0, 1, false, Shape::new(4, 16, 5, 5)),
        (16, 8, 1, 2, 0, 1, true, Shape::new(2, 16, 7, 7)),
        (6, 6, 3, 1, 1, 6, false, Shape::new(1, 6, 4, 3)),
        (5, 7, 3, 2, 0, 1, false, Shape::new(1, 5, 3, 3)),
        (4, 4, 3, 1, 1, 2, false, Shape::new(2, 4, 1, 1)),
        // A long weight-gradient depth (4 x 24 x 24): the CUDA backend splits it.
        (4, 6, 3, 1, 1, 1, true, Shape::new(4, 4, 24, 24)),
    ];
    for (k, &(i, o, ks, st, p, g, bias, xs)) in cases.iter().enumerate() {
        let label = format!("conv {i}->{o} k{ks} s{st} p{p} g{g} on {xs}");
        let geom = ConvGeom::new(i, o, ks, st, p, g).unwrap();
        let seed = s ^ (k as u64 * 1000);
        let x32: Tensor<f32> = random_tensor(xs, seed);
        let x64: Tensor<f64> = x32.cast();
        let w32 = vec_f32(geom.weight_len(), seed ^ 1);
        let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
        let b32 = bias.then(|| vec_f32(o, seed ^ 2));
        let b64: Option<Vec<f64>> = b32.as_ref().map(|b| b.iter().map(|&v| v as f64).collect());
        let y = be.conv2d(&x32, &w32, b32.as_deref(), &geom).unwrap();
        let yr = Reference.conv2d(&x64, &w64, b64.as_deref(), &geom).unwrap();
        assert_eq!(y.shape(), yr.shape(), "{label}");
        close(&label, &f64s(&y), yr.data(), out_tol);

        let dy32: Tensor<f32> = random_tensor(y.shape(), seed ^ 3);
        let dy64: Tensor<f64> = dy32.cast();
        let (mut dw, mut db) = (vec![0.0f32; w32.len()], vec![0.0f32; o]);
        let (mut dwr, mut dbr) = (vec![0.0f64; w32.len()], vec![0.0f64; o]);
        // Gradients accumulate: start both from the same non-zero values.
        dw.iter_mut().for_each(|v| *v = 0.25);
        dwr.iter_mut().for_each(|v| *v = 0.25);
        let dx = be
            .conv2d_backward(
                &x32,
                &w32,
                &dy32,
                &geom,
                &mut dw,
                bias.then_some(&mut db[..]),
                true,
            )
            .unwrap()
            .unwrap();
        let dxr = Reference
            .conv2d_backward(
                &x64,
                &w64,
                &dy64,
                &geom,
                &mut dwr,
                bias.then_some(&mut dbr[..]),
                true,
            )
            .unwrap()
            .unwrap();
        close(&format!("{label} dx"), &f64s(&dx), dxr.data(), grad_tol);
        let dw64: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
        close(&format!("{label} dw"), &dw64, &dwr, grad_tol);
        if bias {
            let db64: Vec<f64> = db.iter().map(|&v| v as f64).collect();
            close(&format!("{label} db"), &db64, &dbr, grad_tol);
        }
        // Without the input gradient, the weight gradient is the same.
        let mut dw2 = vec![0.25f32; w32.len()];
        let none = be
            .conv2d_backward(&x32, &w32, &dy32, &geom, &mut dw2, None, false)
            .unwrap();
        assert!(none.is_none());
        assert_eq!(dw2, dw, "{label}: dw without dx");
    }
}

fn check_pointwise_ops<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    let s = seed("pointwise");
    let xs = Shape::new(3, 5, 6, 7);
    let x32: Tensor<f32> = random_tensor(xs, s);
    let x64: Tensor<f64> = x32.cast();
    let dy32: Tensor<f32> = random_tensor(xs, s ^ 1);
    let dy64: Tensor<f64> = dy32.cast();

    let st = be.batch_norm_stats(&x32).unwrap();
    let str_ = Reference.batch_norm_stats(&x64).unwrap();
    close("bn mean", &st.mean, &str_.mean, out_tol());
    close("bn var", &st.var, &str_.var, out_tol());

    let a32 = vec_f32(5, s ^ 2);
    let b32 = vec_f32(5, s ^ 3);
    let a64: Vec<f64> = a32.iter().map(|&v| v as f64).collect();
    let b64: Vec<f64> = b32.iter().map(|&v| v as f64).collect();
    for relu in [false, true] {
        let y = be.channel_affine(x32.clone(), &a32, &b32, relu).unwrap();
        let yr = Reference
            .channel_affine(x64.clone(), &a64, &b64, relu)
            .unwrap();
        close("channel affine", &f64s(&y), yr.data(), out_tol());
    }
    let invstd: Vec<f64> = str_.var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    for batch_stats in [true, false] {
        let (mut dg, mut db) = (vec![0.0f32; 5], vec![0.0f32; 5]);
        let (mut dgr, mut dbr) = (vec![0.0f64; 5], vec![0.0f64; 5]);
        let dx = be
            .batch_norm_backward(
                &x32,
                &dy32,
                &str_.mean,
                &invstd,
                &a32,
                batch_stats,
                &mut dg,
                &mut db,
            )
            .unwrap();
        let dxr = Reference
            .batch_norm_backward(
                &x64,
                &dy64,
                &str_.mean,
                &invstd,
                &a64,
                batch_stats,
                &mut dgr,
                &mut dbr,
            )
            .unwrap();
        close("bn dx", &f64s(&dx), dxr.data(), grad_tol());
        close(
            "bn dgamma",
            &dg.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &dgr,
            grad_tol(),
        );
        close(
            "bn dbeta",
            &db.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &dbr,
            grad_tol(),
        );
    }

    // The fused ReLUs (affine + ReLU, add + ReLU) let NaN through, as PyTorch's ReLU does.
    let mut xn = x32.clone();
    xn.data_mut()[7] = f32::NAN;
    let y = be.channel_affine(xn.clone(), &a32, &b32, true).unwrap();
    assert!(
        y.data()[7].is_nan(),
        "fused affine+ReLU turned NaN into {}",
        y.data()[7]
    );
    let y = be.add(xn.clone(), &dy32, true).unwrap();
    assert!(
        y.data()[7].is_nan(),
        "add+ReLU turned NaN into {}",
        y.data()[7]
    );

    // Dropout's mask multiply (zeros and 1 / keep), as the network's training forward runs it.
    let mask32: Vec<f32> = rng::uniform_vec(xs.numel(), 0.0, 1.0, s ^ 14)
        .into_iter()
        .map(|u| if u < 0.3 { 0.0 } else { 1.0 / 0.7 })
        .collect();
    let mask64: Vec<f64> = mask32.iter().map(|&v| v as f64).collect();
    let y = be.mul_mask(x32.clone(), &mask32).unwrap();
    let yr = Reference.mul_mask(x64.clone(), &mask64).unwrap();
    close("dropout mask", &f64s(&y), yr.data(), out_tol());

    let y = be.relu(x32.clone()).unwrap();
    let yr = Reference.relu(x64.clone()).unwrap();
    close("relu", &f64s(&y), yr.data(), 0.0);
    let d = be.relu_backward(&y, dy32.clone()).unwrap();
    let dr = Reference.relu_backward(&yr, dy64.clone()).unwrap();
    close("relu backward", &f64s(&d), dr.data(), 0.0);
    for relu in [false, true] {
        let y = be.add(x32.clone(), &dy32, relu).unwrap();
        let yr = Reference.add(x64.clone(), &dy64, relu).unwrap();
        close("add", &f64s(&y), yr.data(), out_tol());
    }

    for (k, st, p, ceil) in [
        (3, 2, 1, false),
        (3, 2, 0, true),
        (3, 1, 1, true),
        (2, 2, 0, false),
    ] {
        let g = PoolGeom::new(k, st, p, ceil).unwrap();
        let (y, arg) = be.max_pool2d(&x32, &g).unwrap();
        let (yr, argr) = Reference.max_pool2d(&x64, &g).unwrap();
        close("max pool", &f64s(&y), yr.data(), 0.0);
        assert_eq!(be.download_indices(&arg).unwrap(), argr, "max pool indices");
        let dy: Tensor<f32> = random_tensor(y.shape(), s ^ 9);
        let dx = be.max_pool2d_backward(&dy, &arg, xs).unwrap();
        let dxr = Reference
            .max_pool2d_backward(&dy.cast(), &argr, xs)
            .unwrap();
        close("max pool backward", &f64s(&dx), dxr.data(), grad_tol());
        for include in [true, false] {
            let g = PoolGeom {
                count_include_pad: include,
                ..g
            };
            let y = be.avg_pool2d(&x32, &g).unwrap();
            let yr = Reference.avg_pool2d(&x64, &g).unwrap();
            close("avg pool", &f64s(&y), yr.data(), out_tol());
            let dx = be.avg_pool2d_backward(&dy, &g, xs).unwrap();
            let dxr = Reference.avg_pool2d_backward(&dy.cast(), &g, xs).unwrap();
            close("avg pool backward", &f64s(&dx), dxr.data(), grad_tol());
        }
    }

    let y = be.global_avg_pool(&x32).unwrap();
    let yr = Reference.global_avg_pool(&x64).unwrap();
    close("global pool", &f64s(&y), yr.data(), out_tol());
    let dy: Tensor<f32> = random_tensor(y.shape(), s ^ 10);
    let dx = be.global_avg_pool_backward(&dy, xs).unwrap();
    let dxr = Reference.global_avg_pool_backward(&dy.cast(), xs).unwrap();
    close("global pool backward", &f64s(&dx), dxr.data(), grad_tol());

    let k = xs.sample_numel();
    let w32 = vec_f32(11 * k, s ^ 11);
    let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
    let b32 = vec_f32(11, s ^ 12);
    let b64: Vec<f64> = b32.iter().map(|&v| v as f64).collect();
    let y = be.linear(&x32, &w32, Some(&b32), 11).unwrap();
    let yr = Reference.linear(&x64, &w64, Some(&b64), 11).unwrap();
    close("linear", &f64s(&y), yr.data(), out_tol());
    let dy: Tensor<f32> = random_tensor(y.shape(), s ^ 13);
    let (mut dw, mut db) = (vec![0.0f32; w32.len()], vec![0.0f32; 11]);
    let (mut dwr, mut dbr) = (vec![0.0f64; w32.len()], vec![0.0f64; 11]);
    let dx = be
        .linear_backward(&x32, &w32, &dy, &mut dw, Some(&mut db))
        .unwrap();
    let dxr = Reference
        .linear_backward(&x64, &w64, &dy.cast(), &mut dwr, Some(&mut dbr))
        .unwrap();
    close("linear dx", &f64s(&dx), dxr.data(), grad_tol());
    close(
        "linear dw",
        &dw.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &dwr,
        grad_tol(),
    );
    close(
        "linear db",
        &db.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &dbr,
        grad_tol(),
    );
}

fn check_shape_errors<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    let x: Tensor<f32> = random_tensor(Shape::new(1, 3, 4, 4), 1);
    let g = ConvGeom::new(4, 4, 3, 1, 1, 1).unwrap();
    assert!(be.conv2d(&x, &vec![0.0; g.weight_len()], None, &g).is_err());
    let g = ConvGeom::new(3, 4, 3, 1, 1, 1).unwrap();
    assert!(be.conv2d(&x, &[0.0; 5], None, &g).is_err());
    assert!(be
        .channel_affine(x.clone(), &[1.0; 2], &[0.0; 3], false)
        .is_err());
    let y: Tensor<f32> = random_tensor(Shape::new(1, 3, 4, 5), 1);
    assert!(be.add(x.clone(), &y, true).is_err());
    assert!(be.linear(&x, &[0.0; 10], None, 2).is_err());
    let big = PoolGeom::new(5, 1, 0, false).unwrap();
    assert!(be.max_pool2d(&x, &big).is_err());
    // An NHWC host tensor is refused (the host backends) or taken for what it is (the CUDA
    // backend converts it on the device).
    let nhwc = x.to_layout(senet::Layout::Nhwc);
    if let Ok(y) = be.relu(nhwc) {
        let want = be.relu(x.clone()).unwrap();
        assert_eq!(y.layout(), senet::Layout::Nchw, "relu of an NHWC input");
        assert_eq!(y.data(), want.data(), "relu of an NHWC input");
    }
}

/// A layer's forward on backend `be` from and to host tensors.
fn layer_forward<B: Backend<f32>>(
    be: &B,
    l: &mut Layer<f32>,
    x: &Tensor<f32>,
    mode: Mode,
) -> Tensor<f32> {
    let x = be.upload(x.clone()).unwrap();
    be.download(l.forward(be, x, mode).unwrap()).unwrap()
}

/// True when any element is positive in one output and not in the other: a ReLU decision
/// that f32 rounding flipped (the gradient is discontinuous there, so comparing backward passes
/// across it is meaningless).
fn sign_flip(a: &Tensor<f32>, b: &Tensor<f64>) -> bool {
    a.data()
        .iter()
        .zip(b.data())
        .any(|(x, y)| (*x > 0.0) != (*y > 0.0))
}

/// Runs the layers of `s32` and `s64` forward on clones from the same input and reports a
/// ReLU flip at any layer output (looking inside residual blocks' branches and shortcuts).
fn seq_flips<B: Backend<f32>>(
    be: &B,
    s32: &Seq<f32>,
    s64: &Seq<f64>,
    x: &Tensor<f32>,
    mode: Mode,
) -> bool {
    let mut x = x.clone();
    for ((_, l32), (_, l64)) in s32.layers().iter().zip(s64.layers()) {
        if layer_flips(be, l32, l64, &x, mode) {
            return true;
        }
        let y = l64.clone().forward(&Reference, x.cast(), mode).unwrap();
        x = y.cast();
    }
    false
}

fn layer_flips<B: Backend<f32>>(
    be: &B,
    l32: &Layer<f32>,
    l64: &Layer<f64>,
    x: &Tensor<f32>,
    mode: Mode,
) -> bool {
    // Only these layers end in a ReLU (blocks and Inception modules possibly followed by an SE
    // scale, which keeps signs).
    if !matches!(
        l32,
        Layer::Relu(_) | Layer::Residual(_) | Layer::Inception(_)
    ) {
        return false;
    }
    let y32 = layer_forward(be, &mut l32.clone(), x, mode);
    let y64 = l64.clone().forward(&Reference, x.cast(), mode).unwrap();
    if sign_flip(&y32, &y64) {
        return true;
    }
    let seq = |c: &Branch<f32>| -> Seq<f32> {
        c.layers()
            .iter()
            .fold(Seq::new(), |s, (n, l)| s.with(n.clone(), l.clone().into()))
    };
    let seq64 = |c: &Branch<f64>| -> Seq<f64> {
        c.layers()
            .iter()
            .fold(Seq::new(), |s, (n, l)| s.with(n.clone(), l.clone().into()))
    };
    match (l32, l64) {
        (Layer::Residual(a), Layer::Residual(b)) => {
            seq_flips(be, &seq(a.branch()), &seq64(b.branch()), x, mode)
                || matches!((a.shortcut(), b.shortcut()), (Some(p), Some(q)) if seq_flips(be, &seq(p), &seq64(q), x, mode))
        }
        // Every branch of an Inception module reads the module's input.
        (Layer::Inception(a), Layer::Inception(b)) => a
            .branches()
            .iter()
            .zip(b.branches())
            .any(|(p, q)| seq_flips(be, &seq(p), &seq64(q), x, mode)),
        _ => false,
    }
}

/// Compares `net` (f32 on the CPU backend) with the same weights in f64 on the reference:
/// logits of a whole forward pass in `mode`; then, layer by layer, each layer's forward and
/// backward from the same (f32-representable) input and output gradient, with its input
/// gradient, parameter gradients and updated running statistics. Comparing layer by layer
/// keeps one layer's rounding from moving a ReLU decision in another; a layer whose own f32
/// rounding flips a ReLU decision is skipped (at most one per network).
fn compare_networks<B: Backend<f32>>(
    be: &B,
    label: &str,
    mut net: Network<f32>,
    mut reference: Network<f64>,
    x: Shape,
    mode: Mode,
    s: u64,
) {
    randomize_network(&mut net, s);
    reference
        .load_state_dict(&net.state_dict().unwrap())
        .unwrap();
    // The same f32 network on the reference backend: the yardstick of what f32 rounding alone
    // does to this instance (see `close_conditioned`).
    let mut naive = net.clone();
    let x32: Tensor<f32> = random_tensor(x, s ^ 5);
    net.reseed_dropout(3);
    reference.reseed_dropout(3);
    let y = net.clone().forward(be, x32.clone(), mode).unwrap();
    let yr = reference
        .clone()
        .forward(&Reference, x32.cast(), mode)
        .unwrap();
    close(
        &format!("{label} {mode} logits"),
        &f64s(&y),
        yr.data(),
        OUT_TOL,
    );
    if mode == Mode::Infer {
        return;
    }

    // Layer by layer: inputs and output gradients from the f64 run, rounded to f32 for both.
    let n = net.body().layers().len();
    let mut inputs = Vec::with_capacity(n);
    let mut h: Tensor<f32> = x32;
    // On a copy, so the reference's running statistics are updated once, in the loop below.
    let mut probe = reference.clone();
    for i in 0..n {
        inputs.push(h.clone());
        let (_, l) = &mut probe.body_mut().layers_mut()[i];
        if let Layer::Dropout(d) = l {
            d.reseed(3);
        }
        h = l.forward(&Reference, h.cast(), mode).unwrap().cast();
    }
    let mut dy: Tensor<f32> = random_tensor(h.shape(), s ^ 6);
    let mut skipped: Option<String> = None;
    // Layers whose naive run flipped a ReLU: their gradients are held to the plain tolerance.
    let mut naive_exact: Vec<String> = Vec::new();
    for i in (0..n).rev() {
        let name = net.body().layers()[i].0.clone();
        let what = format!("{label} {mode} {name}");
        let flipped = layer_flips(
            be,
            &net.body().layers()[i].1,
            &reference.body().layers()[i].1,
            &inputs[i],
            mode,
        );
        // A naive run whose own rounding flips a ReLU is no yardstick: compare with `tol` then.
        let naive_flipped = layer_flips(
            &Reference,
            &naive.body().layers()[i].1,
            &reference.body().layers()[i].1,
            &inputs[i],
            mode,
        );
        let (_, l32) = &mut net.body_mut().layers_mut()[i];
        let (_, l64) = &mut reference.body_mut().layers_mut()[i];
        let (_, ln) = &mut naive.body_mut().layers_mut()[i];
        if let (Layer::Dropout(a), Layer::Dropout(b), Layer::Dropout(c)) =
            (&mut *l32, &mut *l64, &mut *ln)
        {
            a.reseed(3);
            b.reseed(3);
            c.reseed(3);
        }
        // Re-run both forward (the reference's recorded run above saw the same input), then
        // backward from the same gradient.
        let y32 = layer_forward(be, l32, &inputs[i], mode);
        let y64 = l64.forward(&Reference, inputs[i].cast(), mode).unwrap();
        let yn = layer_forward(&Reference, ln, &inputs[i], mode);
        let yardstick = |t: &Tensor<f32>, want: &Tensor<f64>| {
            if naive_flipped {
                want.data().to_vec()
            } else {
                f64s(t)
            }
        };
        close_conditioned(
            &format!("{what} output"),
            &f64s(&y32),
            y64.data(),
            &yardstick(&yn, &y64),
            OUT_TOL,
        );
        let dx32 = be
            .download(l32.backward(be, be.upload(dy.clone()).unwrap()).unwrap())
            .unwrap();
        let dx64 = l64.backward(&Reference, dy.cast()).unwrap();
        let dxn = ln.backward(&Reference, dy.clone()).unwrap();
        dy = dx64.cast();
        if flipped {
            assert!(
                skipped.is_none(),
                "{what}: a second layer with a flipped ReLU decision"
            );
            eprintln!("{what}: f32 rounding flips a ReLU decision; backward not compared");
            skipped = Some(format!("{name}."));
            continue;
        }
        close_conditioned(
            &format!("{what} dx"),
            &f64s(&dx32),
            dx64.data(),
            &yardstick(&dxn, &dx64),
            GRAD_TOL,
        );
        if naive_flipped {
            naive_exact.push(format!("{name}."));
        }
    }

    // Parameter gradients, per layer: all of a layer's gradients together within GRAD_TOL
    // (relative L2). Not tensor by tensor: some are sums with heavy cancellation (a bias
    // feeding a training-mode BatchNorm, an SE bias behind one), whose f32 rounding is
    // relative to their terms rather than their value. The per-op tests above check each
    // gradient op on its own, and the f64 gradient checks check the formulas.
    let g = crate::nn_common::grads(&mut net);
    let gr = crate::nn_common::grads(&mut reference);
    let gn = crate::nn_common::grads(&mut naive);
    assert_eq!(g.len(), gr.len());
    assert_eq!(g.len(), gn.len());
    for (name, _) in net.body().layers() {
        let prefix = format!("{name}.");
        if skipped.as_deref() == Some(prefix.as_str()) {
            continue;
        }
        let own: Vec<LayerGrads> = g
            .iter()
            .zip(&gr)
            .zip(&gn)
            .filter(|(((n, _), _), _)| n.starts_with(&prefix))
            .map(|(((n, a), (_, b)), (_, c))| (n, a, b, c))
            .collect();
        if own.is_empty() {
            continue;
        }
        let all_a: Vec<f64> = own
            .iter()
            .flat_map(|(_, a, ..)| a.iter().copied())
            .collect();
        let all_b: Vec<f64> = own
            .iter()
            .flat_map(|(_, _, b, _)| b.iter().copied())
            .collect();
        let all_n: Vec<f64> = if naive_exact.contains(&prefix) {
            all_b.clone()
        } else {
            own.iter().flat_map(|(.., c)| c.iter().copied()).collect()
        };
        close_conditioned(
            &format!("{label} {mode} {name} gradients"),
            &all_a,
            &all_b,
            &all_n,
            GRAD_TOL,
        );
        for (n, a, b, _) in own {
            assert_eq!(a.len(), b.len(), "{label}: {n} gradient length");
            assert!(a.iter().all(|v| v.is_finite()), "{label}: {n} not finite");
        }
    }
    let (sd, sdr) = (net.state_dict().unwrap(), reference.state_dict().unwrap());
    for (k, v) in &sd {
        if let (senet::nn::StateData::F32(a), senet::nn::StateData::F32(b)) =
            (&v.data, &sdr[k].data)
        {
            let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            close(&format!("{label} {mode} state {k}"), &a, &b, OUT_TOL);
        }
    }
}

fn small_configs() -> Vec<(&'static str, ResNetConfig, Shape)> {
    let se = |position, bias| SeBlockConfig {
        reduction: 2,
        divisor: 1,
        bias,
        position,
    };
    let mut basic = ResNetConfig::imagenet(BlockKind::Basic, &[2, 1]);
    basic.channels = vec![8, 12];
    basic.num_classes = 7;
    basic.se = vec![Some(se(SePosition::Standard, true)); 2];
    let mut caffe = ResNetConfig::imagenet(BlockKind::Bottleneck, &[1, 2]);
    caffe.channels = vec![4, 6];
    caffe.stem = Stem::Conv7 { width: 8 };
    caffe.stem_pool = Some(PoolGeom::new(3, 2, 0, true).unwrap());
    caffe.stride_on = StrideOn::FirstConv1x1;
    caffe.se = vec![
        Some(se(SePosition::Identity, true)),
        Some(se(SePosition::Post, false)),
    ];
    caffe.num_classes = 5;
    let mut senet = ResNetConfig::imagenet(BlockKind::Bottleneck, &[1, 1]);
    senet.channels = vec![4, 8];
    senet.cardinality = 2;
    senet.base_width = 32;
    senet.reduce_first = 2;
    senet.down_kernel = 3;
    senet.stem = Stem::Deep { width: 4 };
    senet.drop_rate = 0.2;
    senet.se = vec![
        Some(se(SePosition::After3x3, true)),
        Some(se(SePosition::Pre, true)),
    ];
    senet.num_classes = 6;
    vec![
        ("basic", basic, Shape::new(3, 3, 20, 20)),
        ("caffe", caffe, Shape::new(2, 3, 23, 23)),
        ("senet", senet, Shape::new(4, 3, 16, 16)),
    ]
}

/// The small networks a training test runs: all of them with SENET_FULL_TESTS=1, else only the
/// `pick`-th (so that between the tests every network still trains).
fn training_configs(pick: usize) -> Vec<(&'static str, ResNetConfig, Shape)> {
    let all = small_configs();
    if crate::nn_common::full() {
        return all;
    }
    let k = pick % all.len();
    all.into_iter().skip(k).take(1).collect()
}

fn check_small_networks<B: Backend<f32>>(be: &B) {
    for (name, cfg, x) in small_configs() {
        for mode in [Mode::Train, Mode::Eval, Mode::Infer] {
            let s = seed(name);
            let net = cfg.build::<f32>(name).unwrap();
            let twin = cfg.build::<f64>(name).unwrap();
            compare_networks(be, name, net, twin, x, mode, s);
        }
    }
}

fn check_inception_network<B: Backend<f32>>(be: &B) {
    let spec = InceptionSpec {
        name: "x",
        n1x1: 4,
        n3x3: (3, 5),
        d3x3: (2, 4),
        pool: InceptionPool::Avg,
        proj: 3,
        stride: 1,
    };
    let down = InceptionSpec {
        name: "y",
        n1x1: 0,
        pool: InceptionPool::Max,
        proj: 0,
        stride: 2,
        ..spec
    };
    let se = Some(SeBlockConfig {
        reduction: 4,
        divisor: 1,
        ..SeBlockConfig::default()
    });
    for mode in [Mode::Train, Mode::Infer] {
        let s = seed("inception");
        let net: Network<f32> = inception_net("inception", &spec, &down, se);
        let twin: Network<f64> = inception_net("inception", &spec, &down, se);
        compare_networks(be, "inception", net, twin, Shape::new(2, 3, 8, 8), mode, s);
    }
}

fn inception_net<E: senet::nn::Real>(
    name: &str,
    a: &InceptionSpec,
    b: &InceptionSpec,
    se: Option<SeBlockConfig>,
) -> Network<E> {
    let c1 = a.out_channels(3);
    let c2 = b.out_channels(c1);
    let body = Seq::new()
        .with(
            "",
            Layer::Inception(Box::new(InceptionModule::new(a, 3, se).unwrap())),
        )
        .with(
            "",
            Layer::Inception(Box::new(InceptionModule::new(b, c1, se).unwrap())),
        )
        .with("pool", Layer::GlobalAvgPool(GlobalAvgPool::new()))
        .with("fc", Layer::Linear(Linear::new(c2, 4, true)));
    Network::new(name, (3, 8, 8), 4, body).unwrap()
}

fn check_invalid_geometries<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    let x: Tensor<f32> = random_tensor(Shape::new(1, 4, 5, 5), 2);
    let bad = ConvGeom {
        in_ch: 4,
        out_ch: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
        groups: 0,
    };
    assert!(be.conv2d(&x, &[0.0; 36], None, &bad).is_err());
    assert!(Reference
        .conv2d(&x.cast::<f64>(), &[0.0; 36], None, &bad)
        .is_err());
    let bad = PoolGeom {
        kernel: 3,
        stride: 0,
        padding: 1,
        ceil_mode: false,
        count_include_pad: true,
    };
    assert!(be.max_pool2d(&x, &bad).is_err());
    assert!(be.avg_pool2d(&x, &bad).is_err());
    let mut cfg = senet::nn::BlockConfig::new(BlockKind::Bottleneck, 4, 2, 2);
    cfg.down_kernel = 0;
    assert!(senet::nn::ResidualBlock::<f32>::new(cfg).is_err());
    cfg.down_kernel = 3;
    cfg.cardinality = 0;
    assert!(senet::nn::ResidualBlock::<f32>::new(cfg).is_err());
}

/// The SE op's backward by the reference's formulas (src/se/reference.rs) in f32 arithmetic,
/// forward included: what plain f32 can do on an instance (NCHW inputs).
struct SeNaive {
    dx: Vec<f64>,
    dw1: Vec<f64>,
    dw2: Vec<f64>,
    dresidual: Option<Vec<f64>>,
}

fn se_backward_in_f32(
    w: &senet::SeWeights,
    x: &Tensor<f32>,
    residual: Option<&Tensor<f32>>,
    dy: &Tensor<f32>,
) -> SeNaive {
    let cfg = w.config;
    let sh = x.shape();
    let (n_, c_, hw, d_) = (sh.n, sh.c, sh.hw(), cfg.hidden);
    let (xd, dyd) = (x.data(), dy.data());
    let f = |v: f64| v as f32;
    let act = |v: f32| f(cfg.activation.apply(v as f64));
    let (mut z, mut h, mut a, mut s) = (
        vec![0f32; n_ * c_],
        vec![0f32; n_ * d_],
        vec![0f32; n_ * c_],
        vec![0f32; n_ * c_],
    );
    for n in 0..n_ {
        for c in 0..c_ {
            let p0 = (n * c_ + c) * hw;
            z[n * c_ + c] = xd[p0..p0 + hw].iter().sum::<f32>() / hw as f32;
        }
        for j in 0..d_ {
            let mut acc = w.b1.as_ref().map_or(0.0, |b| b[j]);
            for c in 0..c_ {
                acc += w.w1[j * c_ + c] * z[n * c_ + c];
            }
            h[n * d_ + j] = acc;
        }
        for c in 0..c_ {
            let mut acc = w.b2.as_ref().map_or(0.0, |b| b[c]);
            for j in 0..d_ {
                acc += w.w2[c * d_ + j] * act(h[n * d_ + j]);
            }
            a[n * c_ + c] = acc;
            s[n * c_ + c] = f(cfg.gate.apply(acc as f64));
        }
    }
    let mut g = vec![0f32; sh.numel()];
    let mut ds = vec![0f32; n_ * c_];
    for n in 0..n_ {
        for c in 0..c_ {
            let sc = s[n * c_ + c];
            for p in 0..hw {
                let i = (n * c_ + c) * hw + p;
                g[i] = match residual {
                    Some(r) if sc * xd[i] + r.data()[i] <= 0.0 => 0.0,
                    _ => dyd[i],
                };
                ds[n * c_ + c] += g[i] * xd[i];
            }
        }
    }
    let dg: Vec<f32> = (0..n_ * c_)
        .map(|i| ds[i] * f(cfg.gate.derivative(a[i] as f64)))
        .collect();
    let (mut dw2, mut du) = (vec![0f32; c_ * d_], vec![0f32; n_ * d_]);
    for n in 0..n_ {
        for c in 0..c_ {
            for j in 0..d_ {
                dw2[c * d_ + j] += dg[n * c_ + c] * act(h[n * d_ + j]);
                du[n * d_ + j] += w.w2[c * d_ + j] * dg[n * c_ + c];
            }
        }
        for j in 0..d_ {
            du[n * d_ + j] *= f(cfg.activation.derivative(h[n * d_ + j] as f64));
        }
    }
    let (mut dw1, mut dz) = (vec![0f32; d_ * c_], vec![0f32; n_ * c_]);
    for n in 0..n_ {
        for j in 0..d_ {
            for c in 0..c_ {
                dw1[j * c_ + c] += du[n * d_ + j] * z[n * c_ + c];
                dz[n * c_ + c] += w.w1[j * c_ + c] * du[n * d_ + j];
            }
        }
    }
    let dx = (0..sh.numel())
        .map(|i| {
            let nc = i / hw;
            (g[i] * s[nc] + dz[nc] / hw as f32) as f64
        })
        .collect();
    let wide = |v: Vec<f32>| v.into_iter().map(|x| x as f64).collect::<Vec<_>>();
    SeNaive {
        dx,
        dw1: wide(dw1),
        dw2: wide(dw2),
        dresidual: residual.map(|_| wide(g)),
    }
}

fn check_se_op<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    let s = seed("se op");
    let xs = Shape::new(2, 12, 5, 3);
    let cfg = senet::SeConfig::with_hidden(12, 3).unwrap();
    let w = senet::SeWeights::init(cfg, senet::Init::PyTorchDefault, s).unwrap();
    let x32: Tensor<f32> = random_tensor(xs, s ^ 1);
    let r32: Tensor<f32> = random_tensor(xs, s ^ 2);
    let dy32: Tensor<f32> = random_tensor(xs, s ^ 3);
    for residual in [false, true] {
        let r = residual.then_some(&r32);
        let r64 = r.map(|t| t.cast::<f64>());
        let (y, saved) = be.se_forward(&w, &x32, r).unwrap();
        let (yr, savedr) = Reference
            .se_forward(&w, &x32.cast::<f64>(), r64.as_ref())
            .unwrap();
        close("se forward", &f64s(&y), yr.data(), out_tol());
        let b = be.se_backward(&w, &x32, r, &saved, &dy32).unwrap();
        let br = Reference
            .se_backward(&w, &x32.cast(), r64.as_ref(), &savedr, &dy32.cast())
            .unwrap();
        // What f32 costs on this instance, the yardstick where it is ill-conditioned (a hidden
        // unit's gradient, a sum over the channels, that nearly cancels): the larger of the
        // reference's formulas run in f32 and the exact result's change when every input moves
        // by up to half an f32 ulp (three random draws), so no one lucky rounding sets it.
        let bn = se_backward_in_f32(&w, &x32, r, &dy32);
        let mut yard = [
            rel_l2_error(&bn.dx, br.dx.data()),
            rel_l2_error(&bn.dw1, &br.grads.dw1),
            rel_l2_error(&bn.dw2, &br.grads.dw2),
            match (&bn.dresidual, &br.dresidual) {
                (Some(d), Some(dr)) => rel_l2_error(d, dr.data()),
                _ => 0.0,
            },
        ];
        for k in 0..3u64 {
            let mut state = s ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k + 1));
            let mut nudge = |t: &Tensor<f32>| {
                let v = t
                    .data()
                    .iter()
                    .map(|&v| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                        v as f64 * (1.0 + u * f32::EPSILON as f64 / 2.0)
                    })
                    .collect();
                Tensor::<f64>::from_vec(t.shape(), senet::Layout::Nchw, v).unwrap()
            };
            let (xp, dyp) = (nudge(&x32), nudge(&dy32));
            let rp = r.map(&mut nudge);
            let (_, sp) = Reference.se_forward(&w, &xp, rp.as_ref()).unwrap();
            let bp = Reference
                .se_backward(&w, &xp, rp.as_ref(), &sp, &dyp)
                .unwrap();
            let e = [
                rel_l2_error(bp.dx.data(), br.dx.data()),
                rel_l2_error(&bp.grads.dw1, &br.grads.dw1),
                rel_l2_error(&bp.grads.dw2, &br.grads.dw2),
                match (&bp.dresidual, &br.dresidual) {
                    (Some(d), Some(dr)) => rel_l2_error(d.data(), dr.data()),
                    _ => 0.0,
                },
            ];
            for (y, e) in yard.iter_mut().zip(e) {
                *y = y.max(e);
            }
        }
        let t = grad_tol();
        close_within_f32_error("se dx", &f64s(&b.dx), br.dx.data(), yard[0], t);
        close_within_f32_error("se dw1", &b.grads.dw1, &br.grads.dw1, yard[1], t);
        close_within_f32_error("se dw2", &b.grads.dw2, &br.grads.dw2, yard[2], t);
        assert_eq!(b.dresidual.is_some(), residual);
        if let (Some(d), Some(dr)) = (&b.dresidual, &br.dresidual) {
            close_within_f32_error("se dresidual", &f64s(d), dr.data(), yard[3], t);
        }
    }
}

// ------------------------------------------------------------------ the backends under test

#[test]
fn convolution_matches_reference() {
    check_convolution(&Cpu);
}

#[test]
fn cuda_convolution_matches_reference() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_convolution(&crate::nn_common::OnHost(&be));
    }
}

/// cuDNN with TF32 tensor cores (a GPU with cuDNN only): TF32 keeps f16's 10 mantissa bits,
/// so it is held to DESIGN.md's f16 tolerance, 2e-3, outputs and gradients alike.
#[test]
fn cuda_tf32_convolution_within_f16_tolerance() {
    for be in crate::nn_common::cuda_tf32_backends() {
        check_convolution_within(&crate::nn_common::OnHost(&be), 2e-3, 2e-3);
    }
}

// bf16 activations (mixed precision): each op on bf16-rounded inputs, within DESIGN.md's bf16
// tolerance of the f64 reference.

#[test]
fn cuda_bf16_convolution_within_bf16_tolerance() {
    crate::nn_common::set_bf16_inputs(true);
    for be in crate::nn_common::cuda_bf16_backends() {
        check_convolution_within(&crate::nn_common::OnHost(&be), BF16_TOL, BF16_TOL);
    }
}

#[test]
fn cuda_bf16_pointwise_ops_within_bf16_tolerance() {
    crate::nn_common::set_bf16_inputs(true);
    for be in crate::nn_common::cuda_bf16_backends() {
        check_pointwise_ops(&crate::nn_common::OnHost(&be));
    }
}

#[test]
fn cuda_bf16_se_op_within_bf16_tolerance() {
    crate::nn_common::set_bf16_inputs(true);
    for be in crate::nn_common::cuda_bf16_backends() {
        check_se_op(&crate::nn_common::OnHost(&be));
    }
}

/// The data-movement ops in bf16 and f16 are exact: channel concat and split of narrow
/// values, zeros, and a dropout mask whose f32 scale (1 / 0.7, not a narrow value) multiplies in
/// f32 and rounds once, as checked against the host product rounded to the activation type.
#[test]
fn cuda_bf16_data_movement_is_exact() {
    crate::nn_common::set_bf16_inputs(true);
    check_narrow_data_movement(crate::nn_common::cuda_bf16_backends());
}

#[test]
fn cuda_f16_data_movement_is_exact() {
    crate::nn_common::set_narrow_inputs(crate::nn_common::Narrow::F16);
    check_narrow_data_movement(crate::nn_common::cuda_f16_backends());
}

fn check_narrow_data_movement<A: senet::nn::NnAct>(backends: Vec<senet::nn::Cuda<A>>) {
    use senet::nn::Backend;
    let s = seed(&format!("{:?} movement", A::DTYPE));
    for be in backends {
        let be = crate::nn_common::OnHost(&be);
        let parts: Vec<Tensor<f32>> = [3usize, 1, 5]
            .iter()
            .enumerate()
            .map(|(i, &c)| random_tensor(Shape::new(2, c, 3, 5), s ^ i as u64))
            .collect();
        let cat = be.concat_channels(&parts).unwrap();
        let want = Cpu.concat_channels(&parts).unwrap();
        assert_eq!(cat.data(), want.data(), "concat");
        let back = be.split_channels(&cat, &[3, 1, 5]).unwrap();
        for (got, want) in back.iter().zip(&parts) {
            assert_eq!(got.data(), want.data(), "split");
        }
        let z = be.zeros(Shape::new(2, 3, 4, 1)).unwrap();
        assert!(z.data().iter().all(|&v| v == 0.0), "zeros");
        let x = &parts[2];
        let mask: Vec<f32> = (0..x.shape().numel())
            .map(|i| {
                if (s >> (i % 64)) & 1 == 1 {
                    1.0 / 0.7
                } else {
                    0.0
                }
            })
            .collect();
        let y = be.mul_mask(x.clone(), &mask).unwrap();
        for ((&g, &v), &m) in y.data().iter().zip(x.data()).zip(&mask) {
            let w = A::from_f32(v * m).to_f32();
            assert_eq!(g, w, "dropout mask: {v} * {m}");
        }
    }
}

/// A convolution whose samples x groups exceed the grid's z limit (`max_grid_yz`: 65,535 on a
/// GPU, 1,024 on the emulator) runs in sample chunks (the CUDA backend's forward and
/// input-gradient kernels): every chunk lands at its own samples, for f32 and bf16 activations
/// alike.
fn check_sample_chunks<B: Backend<f32, T = Tensor<f32>>>(be: &B, max_grid_yz: u32, tol: f64) {
    let s = seed("conv chunks");
    // 17 samples of c groups: chunks of max_grid_yz / c = 14 samples, then 3.
    let c = max_grid_yz as usize / 15 + 1;
    let geom = ConvGeom::new(c, c, 1, 1, 0, c).unwrap();
    let x32: Tensor<f32> = random_tensor(Shape::new(17, c, 1, 2), s);
    let w32 = vec_f32(geom.weight_len(), s ^ 1);
    let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
    let y = be.conv2d(&x32, &w32, None, &geom).unwrap();
    let yr = Reference
        .conv2d(&x32.cast::<f64>(), &w64, None, &geom)
        .unwrap();
    close("chunked conv", &f64s(&y), yr.data(), tol);
    let dy32: Tensor<f32> = random_tensor(y.shape(), s ^ 2);
    let mut dw = vec![0.0f32; w32.len()];
    let mut dwr = vec![0.0f64; w32.len()];
    let dx = be
        .conv2d_backward(&x32, &w32, &dy32, &geom, &mut dw, None, true)
        .unwrap()
        .unwrap();
    let dxr = Reference
        .conv2d_backward(&x32.cast(), &w64, &dy32.cast(), &geom, &mut dwr, None, true)
        .unwrap()
        .unwrap();
    close("chunked conv dx", &f64s(&dx), dxr.data(), tol);
    let dw64: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
    close("chunked conv dw", &dw64, &dwr, tol);
}

#[test]
fn cuda_convolution_sample_chunks() {
    for be in crate::nn_common::cuda_backends() {
        let limit = be.device().info().max_grid_yz;
        check_sample_chunks(&crate::nn_common::OnHost(&be), limit, OUT_TOL);
    }
    crate::nn_common::set_bf16_inputs(true);
    for be in crate::nn_common::cuda_bf16_backends() {
        let limit = be.device().info().max_grid_yz;
        check_sample_chunks(&crate::nn_common::OnHost(&be), limit, BF16_TOL);
    }
}

// f16 activations: each op on f16-rounded inputs within DESIGN.md's f16 tolerance.

#[test]
fn cuda_f16_ops_within_f16_tolerance() {
    crate::nn_common::set_narrow_inputs(crate::nn_common::Narrow::F16);
    for be in crate::nn_common::cuda_f16_backends() {
        let h = crate::nn_common::OnHost(&be);
        check_convolution_within(&h, F16_TOL, F16_TOL);
        check_pointwise_ops(&h);
        check_se_op(&h);
        check_shape_errors(&h);
    }
}

/// Loss scaling by a power of two changes nothing but the range: on the CPU backend (host
/// gradients) and on the CUDA backends with bound parameters (the unscale kernel), steps with
/// a scaler give bit for bit the parameters of plain steps, and the scale doubles after
/// `growth_interval` finite steps.
fn check_loss_scaling_is_exact<B: Backend<f32>>(be: &B, bind: bool) {
    use senet::train::loss::cross_entropy;
    use senet::train::optim::{LossScaler, Sgd};
    let (name, cfg, xs) = small_configs().remove(2);
    let s = seed(name);
    let mut plain = cfg.build::<f32>(name).unwrap();
    plain.init_weights(s);
    let mut scaled = plain.clone();
    if bind {
        plain.bind(be).unwrap();
        scaled.bind(be).unwrap();
    }
    let x: Tensor<f32> = random_tensor(xs, s ^ 1);
    let labels: Vec<usize> = (0..xs.n).map(|i| i % cfg.num_classes).collect();
    let (mut o1, mut o2) = (Sgd::new(0.9, 1e-4).unwrap(), Sgd::new(0.9, 1e-4).unwrap());
    let mut scaler = LossScaler::new(1024.0, 2).unwrap();
    for step in 0..3 {
        plain.reseed_dropout(step);
        scaled.reseed_dropout(step);
        let logits = plain.forward(be, x.clone(), Mode::Train).unwrap();
        let out = cross_entropy(&logits, &labels, 0.0).unwrap();
        plain.zero_grad();
        plain.backward_params(be, out.grad).unwrap();
        o1.step_on(be, &mut plain, 0.05).unwrap();
        let logits = scaled.forward(be, x.clone(), Mode::Train).unwrap();
        let mut out = cross_entropy(&logits, &labels, 0.0).unwrap();
        scaler.scale_grad(&mut out.grad);
        scaled.zero_grad();
        scaled.backward_params(be, out.grad).unwrap();
        assert!(scaler.step(be, &mut scaled, &mut o2, 0.05).unwrap());
    }
    assert_eq!(scaler.scale(), 2048.0, "doubled after two finite steps");
    assert_eq!(scaler.skipped(), 0);
    if bind {
        plain.unbind().unwrap();
        scaled.unbind().unwrap();
    }
    for ((n, a), (_, b)) in plain.parameters().zip(scaled.parameters()) {
        assert_eq!(a.value, b.value, "{n}");
    }
}

#[test]
fn loss_scaling_is_exact_on_the_host() {
    check_loss_scaling_is_exact(&Cpu, false);
}

#[test]
fn cuda_loss_scaling_is_exact_on_the_device() {
    for be in crate::nn_common::cuda_backends() {
        check_loss_scaling_is_exact(&be, true);
    }
}

/// With f16 activations a scale too large (2^24: the loss gradient alone overflows f16)
/// overflows the backward: the step is skipped (no
/// parameter or momentum changes), the scale halves, and a later step at a workable scale
/// trains.
#[test]
fn cuda_f16_loss_scaling_skips_overflowing_steps() {
    use senet::train::loss::cross_entropy;
    use senet::train::optim::{LossScaler, Sgd};
    for be in crate::nn_common::cuda_f16_backends() {
        let (name, cfg, xs) = small_configs().remove(0);
        let s = seed(name);
        let mut net = cfg.build::<f32>(name).unwrap();
        net.init_weights(s);
        let before: Vec<Vec<f32>> = net.parameters().map(|(_, p)| p.value.clone()).collect();
        net.bind(&be).unwrap();
        let x: Tensor<f32> = random_tensor(xs, s ^ 1);
        let labels: Vec<usize> = (0..xs.n).map(|i| i % cfg.num_classes).collect();
        let mut opt = Sgd::new(0.9, 0.0).unwrap();
        let huge = 2f32.powi(24);
        let mut scaler = LossScaler::new(huge, 1000).unwrap();
        let mut step = |net: &mut Network<f32>, scaler: &mut LossScaler| {
            let logits = net.forward(&be, x.clone(), Mode::Train).unwrap();
            let mut out = cross_entropy(&logits, &labels, 0.0).unwrap();
            scaler.scale_grad(&mut out.grad);
            net.zero_grad();
            net.backward_params(&be, out.grad).unwrap();
            scaler.step(&be, net, &mut opt, 0.05).unwrap()
        };
        assert!(!step(&mut net, &mut scaler), "2^24 must overflow f16");
        assert_eq!(scaler.scale(), huge / 2.0);
        assert_eq!(scaler.skipped(), 1);
        for ((n, p), b) in net.parameters().zip(&before) {
            let store = p.device_store().expect("bound");
            assert_eq!(
                &store.read_value().unwrap(),
                b,
                "{n}: changed by a skipped step"
            );
            assert!(store.read_momentum().unwrap().is_none(), "{n}: momentum");
        }
        let mut taken = 0;
        if crate::nn_common::full() {
            // Halving all the way down to a workable scale.
            for _ in 0..40 {
                if step(&mut net, &mut scaler) {
                    taken += 1;
                    break;
                }
            }
        } else {
            // A workable scale at once: the halving itself is checked above.
            scaler = LossScaler::new(1024.0, 1000).unwrap();
            taken += usize::from(step(&mut net, &mut scaler));
        }
        assert_eq!(taken, 1, "a step at some scale below 2^24 is finite");
        net.unbind().unwrap();
        let after: Vec<Vec<f32>> = net.parameters().map(|(_, p)| p.value.clone()).collect();
        assert_ne!(before, after, "the finite step updated the parameters");
    }
}

#[test]
fn cuda_bf16_shape_errors_are_errors() {
    for be in crate::nn_common::cuda_bf16_backends() {
        check_shape_errors(&crate::nn_common::OnHost(&be));
        check_invalid_geometries(&crate::nn_common::OnHost(&be));
    }
}

#[test]
fn pointwise_ops_match_reference() {
    check_pointwise_ops(&Cpu);
}

#[test]
fn cuda_pointwise_ops_match_reference() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_pointwise_ops(&crate::nn_common::OnHost(&be));
    }
}

#[test]
fn shape_errors_are_errors() {
    check_shape_errors(&Cpu);
}

#[test]
fn cuda_shape_errors_are_errors() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_shape_errors(&crate::nn_common::OnHost(&be));
    }
}

#[test]
fn small_networks_match_reference() {
    check_small_networks(&Cpu);
}

#[test]
fn cuda_small_networks_match_reference() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_small_networks(&be);
    }
}

#[test]
fn inception_network_matches_reference() {
    check_inception_network(&Cpu);
}

#[test]
fn cuda_inception_network_matches_reference() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_inception_network(&be);
    }
}

#[test]
fn invalid_geometries_are_errors_not_panics() {
    check_invalid_geometries(&Cpu);
}

#[test]
fn cuda_invalid_geometries_are_errors_not_panics() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_invalid_geometries(&crate::nn_common::OnHost(&be));
    }
}

#[test]
fn se_op_matches_reference() {
    check_se_op(&Cpu);
}

#[test]
fn cuda_se_op_matches_reference() {
    for be in crate::nn_common::cuda_backends_announced() {
        check_se_op(&crate::nn_common::OnHost(&be));
    }
}

/// After the first training step the CUDA backend takes every activation, gradient, parameter
/// upload, SE buffer and temporary from its pool: later steps allocate no device memory at all
/// (counted by the pool and, independently, by the device handle).
#[test]
fn cuda_training_steps_reuse_device_memory() {
    // Both layouts: NHWC adds reduction partials and flatten copies, from the pool too.
    let backends = crate::nn_common::cuda_backends_announced()
        .into_iter()
        .chain(crate::nn_common::cuda_nhwc_backends::<f32>());
    for (k, be) in backends.enumerate() {
        for (name, cfg, xs) in training_configs(2 + k) {
            let mut net = cfg.build::<f32>(name).unwrap();
            net.init_weights(seed(name));
            let x: Tensor<f32> = random_tensor(xs, 1);
            let step = |net: &mut Network<f32>| {
                let logits = net.forward(&be, x.clone(), Mode::Train).unwrap();
                let dl: Tensor<f32> = random_tensor(logits.shape(), 2);
                net.zero_grad();
                net.backward_params(&be, dl).unwrap();
            };
            step(&mut net);
            let first = be.allocations();
            let on_device = be.device().allocations();
            assert!(first > 0, "{name}: nothing came from the pool");
            step(&mut net);
            step(&mut net);
            assert_eq!(be.allocations(), first, "{name}: a later step allocated");
            assert_eq!(
                be.device().allocations(),
                on_device,
                "{name}: a later step allocated device memory outside the pool"
            );
        }
    }
}

/// The convolution engine is a choice the backend reports: on the emulator `auto` and `own`
/// give the own kernels, and asking for cuDNN is an error that says why (never a panic).
#[test]
fn cuda_conv_engine_choice_on_the_emulator() {
    use senet::nn::{ConvChoice, ConvEngine};
    let Ok(dev) = senet::cuda::CudaDevice::emulator() else {
        eprintln!("skipped: no emulator in this build");
        return;
    };
    for choice in [ConvChoice::Auto, ConvChoice::Only(ConvEngine::Own)] {
        let b = senet::nn::Cuda::with_conv(dev.clone(), choice).unwrap();
        assert_eq!(b.conv_engine(), ConvEngine::Own);
        assert!(
            b.describe().contains("own f32 convolution kernels"),
            "{}",
            b.describe()
        );
    }
    assert_eq!(
        senet::nn::Cuda::new(dev.clone()).conv_engine(),
        ConvEngine::Own
    );
    let e =
        senet::nn::Cuda::with_conv(dev.clone(), ConvChoice::Only(ConvEngine::Cudnn)).unwrap_err();
    assert!(e.to_string().contains("cuDNN needs a GPU"), "{e}");
    // The im2col engine on the emulator: its stand-in GEMM, said so.
    let b = senet::nn::Cuda::with_conv(dev.clone(), ConvChoice::Only(ConvEngine::Cublas)).unwrap();
    assert_eq!(b.conv_engine(), ConvEngine::Cublas);
    assert!(
        b.describe().contains("stands in for cuBLAS"),
        "{}",
        b.describe()
    );
    // The same for bf16 activations; TF32 is an f32 mode and refused there.
    for choice in [ConvChoice::Auto, ConvChoice::Only(ConvEngine::Own)] {
        let b = senet::nn::Cuda::bf16(dev.clone(), choice).unwrap();
        assert_eq!(b.conv_engine(), ConvEngine::Own);
        assert!(
            b.describe().contains("own bf16 convolution kernels"),
            "{}",
            b.describe()
        );
    }
    let e = senet::nn::Cuda::bf16(dev.clone(), ConvChoice::Only(ConvEngine::Cudnn)).unwrap_err();
    assert!(e.to_string().contains("cuDNN needs a GPU"), "{e}");
    let e = senet::nn::Cuda::bf16(dev, ConvChoice::Only(ConvEngine::CudnnTf32)).unwrap_err();
    assert!(e.to_string().contains("cudnn-tf32"), "{e}");
}

/// A profiled backend computes exactly what the backend it wraps computes, and accounts for
/// every op: each convolution's forward has its backward in a training step, and each op kind
/// was called at least once with a time recorded.
#[test]
fn profiled_backend_is_transparent_and_counts_every_op() {
    use senet::nn::Profiled;
    for (name, cfg, xs) in small_configs() {
        let mut a = cfg.build::<f32>(name).unwrap();
        a.init_weights(seed(name));
        let mut b = a.clone();
        let x: Tensor<f32> = random_tensor(xs, 7);
        let p = Profiled::new(Cpu);
        let la = a.forward(&Cpu, x.clone(), Mode::Train).unwrap();
        let lb = b.forward(&p, x, Mode::Train).unwrap();
        assert_eq!(la.data(), lb.data(), "{name}: logits");
        let dl: Tensor<f32> = random_tensor(la.shape(), 8);
        a.zero_grad();
        b.zero_grad();
        a.backward_params(&Cpu, dl.clone()).unwrap();
        b.backward_params(&p, dl).unwrap();
        assert_eq!(
            crate::nn_common::grads(&mut a),
            crate::nn_common::grads(&mut b),
            "{name}: gradients"
        );
        let report = p.report();
        let calls = |f: &dyn Fn(&str) -> bool| -> u64 {
            report.iter().filter(|o| f(&o.op)).map(|o| o.calls).sum()
        };
        let fwd = calls(&|op| op.starts_with("conv2d") && !op.ends_with("backward"));
        let bwd = calls(&|op| op.starts_with("conv2d") && op.ends_with("backward"));
        assert!(
            fwd > 0 && fwd == bwd,
            "{name}: {fwd} conv forwards, {bwd} backwards"
        );
        assert!(
            calls(&|op| op.starts_with("batch_norm_stats")) > 0,
            "{name}"
        );
        assert!(report.iter().all(|o| o.calls > 0), "{name}");
        // Nothing ran on a device, so no device op shows up.
        assert!(
            report.iter().all(|o| !o.op.contains("device")),
            "{name}: {report:?}"
        );
        p.reset();
        assert!(p.report().is_empty());
    }
}

/// Training with the convolution and linear parameters bound to the CUDA backend (values,
/// gradients and momentum in device memory, the SGD update as a kernel) gives the same
/// parameters, bit for bit, as the same steps with host parameters and the host optimiser.
#[test]
fn cuda_bound_parameters_train_exactly_as_host_ones() {
    use senet::train::optim::Sgd;
    for be in crate::nn_common::cuda_backends_announced() {
        for (name, cfg, xs) in training_configs(2) {
            let mut host = cfg.build::<f32>(name).unwrap();
            host.init_weights(seed(name));
            let mut dev = host.clone();
            let bound = dev.bind(&be).unwrap();
            assert!(bound > 0, "{name}: nothing bound");
            assert!(dev.is_bound() && !host.is_bound());
            let (_, w) = dev.parameters().find(|(_, p)| p.is_bound()).unwrap();
            assert!(
                w.values("w").is_err(),
                "{name}: a bound value read on the host"
            );
            assert!(dev.state_dict().is_err(), "{name}: a bound network saved");
            // Every parameter of the layers with device ops is bound (all of them here).
            for (n, p) in dev.parameters() {
                assert_eq!(p.is_bound(), p.is_bindable(), "{name}: {n}");
            }
            assert!(
                !host.parameters().any(|(n, _)| n.contains("se.fc"))
                    || dev
                        .parameters()
                        .any(|(n, p)| n.contains("se.fc") && p.is_bound()),
                "{name}: SE parameters not bound"
            );
            let (mut opt_h, mut opt_d) =
                (Sgd::new(0.9, 1e-3).unwrap(), Sgd::new(0.9, 1e-3).unwrap());
            // Steps of every kind: zero_grad + backward; two backwards accumulating; zero_grad
            // and no backward (weight decay and momentum only); then the bound network is
            // unbound and bound again (fresh storage: its gradient comes along and its momentum
            // is seeded from the gathered host copy) before a last ordinary step.
            for step in 0..5u64 {
                if step == 4 {
                    opt_d.gather(&dev).unwrap();
                    dev.unbind().unwrap();
                    dev.bind(&be).unwrap();
                }
                let x: Tensor<f32> = random_tensor(xs, 10 + step);
                for (net, opt) in [(&mut host, &mut opt_h), (&mut dev, &mut opt_d)] {
                    if step != 1 {
                        net.zero_grad();
                    }
                    if step != 2 {
                        let logits = net.forward(&be, x.clone(), Mode::Train).unwrap();
                        let dl: Tensor<f32> = random_tensor(logits.shape(), 20 + step);
                        net.backward_params(&be, dl).unwrap();
                    }
                    if step != 0 {
                        opt.step_on(&be, net, 0.05).unwrap();
                    }
                }
            }
            // Evaluation and inference read the bound parameters and running statistics.
            let x: Tensor<f32> = random_tensor(xs, 99);
            for mode in [Mode::Eval, Mode::Infer] {
                let a = host.forward(&be, x.clone(), mode).unwrap();
                let b = dev.forward(&be, x.clone(), mode).unwrap();
                let bits =
                    |t: &Tensor<f32>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{name}: {mode} logits");
            }
            opt_d.gather(&dev).unwrap();
            dev.unbind().unwrap();
            assert!(!dev.is_bound());
            // Running statistics and batch counters too.
            assert_eq!(
                host.state_dict().unwrap(),
                dev.state_dict().unwrap(),
                "{name}"
            );
            for ((n, a), (_, b)) in host.parameters().zip(dev.parameters()) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.value), bits(&b.value), "{name}: {n} values");
                assert_eq!(bits(&a.grad), bits(&b.grad), "{name}: {n} gradient");
            }
            assert_eq!(opt_h.buffers(), opt_d.buffers(), "{name}: momentum");
        }
    }
}

/// Mixed precision trains: on each small network, with parameters bound to the bf16 backend
/// (f32 master weights, gradients and momentum on the device; bf16 activations), ten SGD steps
/// on one batch lower the cross-entropy to under 0.8 of where it started, and the first step's
/// loss is within 1e-2 (relative) of the f32 backend's on the same weights and batch.
#[test]
fn cuda_bf16_training_steps_lower_the_loss() {
    check_narrow_training(crate::nn_common::cuda_bf16_backends(), false, 0);
}

/// As `cuda_bf16_training_steps_lower_the_loss`, with f16 activations and dynamic loss scaling
/// (PyTorch's default scale, 65536).
#[test]
fn cuda_f16_training_steps_lower_the_loss() {
    check_narrow_training(crate::nn_common::cuda_f16_backends(), true, 1);
}

fn check_narrow_training<A: senet::nn::NnAct>(
    narrow: Vec<senet::nn::Cuda<A>>,
    scale: bool,
    pick: usize,
) {
    use senet::train::loss::cross_entropy;
    use senet::train::optim::{LossScaler, Sgd};
    let f32s = crate::nn_common::cuda_backends();
    for (be, exact) in narrow.iter().zip(&f32s) {
        for (name, cfg, xs) in training_configs(pick) {
            let s = seed(name);
            let mut net = cfg.build::<f32>(name).unwrap();
            net.init_weights(s);
            let x: Tensor<f32> = random_tensor(xs, s ^ 1);
            let k = cfg.num_classes;
            let labels: Vec<usize> = (0..xs.n).map(|i| (s as usize >> (i % 32)) % k).collect();
            let first_f32 = {
                let logits = net.clone().forward(exact, x.clone(), Mode::Train).unwrap();
                cross_entropy(&logits, &labels, 0.0).unwrap().loss
            };
            net.bind(be).unwrap();
            let mut opt = Sgd::new(0.9, 0.0).unwrap();
            let mut scaler = scale.then(LossScaler::default);
            let mut losses = Vec::new();
            for _ in 0..10 {
                let logits = net.forward(be, x.clone(), Mode::Train).unwrap();
                let mut out = cross_entropy(&logits, &labels, 0.0).unwrap();
                losses.push(out.loss);
                if let Some(sc) = &scaler {
                    sc.scale_grad(&mut out.grad);
                }
                net.zero_grad();
                net.backward_params(be, out.grad).unwrap();
                senet::train::optim::step_with(scaler.as_mut(), be, &mut net, &mut opt, 0.05)
                    .unwrap();
            }
            let skipped = scaler.as_ref().map_or(0, |s| s.skipped());
            eprintln!(
                "{name}: {} losses {losses:.4?}; f32 first {first_f32:.4}; skipped {skipped}",
                A::SUFFIX
            );
            assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
            assert!(
                (losses[0] - first_f32).abs() <= 1e-2 * first_f32,
                "{name}: first {} loss {} vs f32 {first_f32}",
                A::SUFFIX,
                losses[0]
            );
            let last = *losses.last().unwrap();
            assert!(
                last < 0.8 * losses[0],
                "{name}: the loss went from {} to {last}",
                losses[0]
            );
        }
    }
}

/// With bound parameters a steady training step allocates no device memory either (the
/// gradients and momentum buffers are made in the first step).
#[test]
fn cuda_bound_training_steps_reuse_device_memory() {
    use senet::train::optim::Sgd;
    let backends = crate::nn_common::cuda_backends()
        .into_iter()
        .chain(crate::nn_common::cuda_nhwc_backends::<f32>());
    for (k, be) in backends.enumerate() {
        for (name, cfg, xs) in training_configs(1 + k) {
            let mut net = cfg.build::<f32>(name).unwrap();
            net.init_weights(seed(name));
            net.bind(&be).unwrap();
            let mut opt = Sgd::new(0.9, 1e-4).unwrap();
            let x: Tensor<f32> = random_tensor(xs, 1);
            let mut step = |net: &mut Network<f32>| {
                let logits = net.forward(&be, x.clone(), Mode::Train).unwrap();
                let dl: Tensor<f32> = random_tensor(logits.shape(), 2);
                net.zero_grad();
                net.backward_params(&be, dl).unwrap();
                opt.step_on(&be, net, 0.01).unwrap();
            };
            step(&mut net);
            let on_device = be.device().allocations();
            step(&mut net);
            step(&mut net);
            assert_eq!(
                be.device().allocations(),
                on_device,
                "{name}: a later step allocated"
            );
        }
    }
}

/// Misuse of bound parameters is an error, never a wrong result: an operand of the wrong
/// length, binding to a second backend (which leaves the first binding intact), the host
/// optimiser on a bound network (refused before anything is updated), setting a bound
/// value; and a clone of a bound network is an unbound copy that shares nothing.
#[test]
fn cuda_bound_parameter_misuse_is_an_error() {
    use senet::nn::Param;
    use senet::train::optim::Sgd;
    for be in crate::nn_common::cuda_backends() {
        let (name, cfg, xs) = small_configs().remove(0);
        let mut net = cfg.build::<f32>(name).unwrap();
        net.init_weights(seed(name));
        let before: Vec<Vec<f32>> = net.parameters().map(|(_, p)| p.value.clone()).collect();
        let n = net.bind(&be).unwrap();
        assert!(n > 0);
        // A bound operand of the wrong length.
        let mut w = Param::<f32>::new(&[1], senet::nn::ParamInit::Ones).bindable();
        w.init(1);
        assert!(be.bind(&mut w).unwrap());
        let x = be.upload(random_tensor(Shape::new(1, 4, 1, 1), 3)).unwrap();
        assert!(be.linear_p(&x, &w, None, 3).is_err());
        let g = ConvGeom::new(4, 3, 1, 1, 0, 1).unwrap();
        assert!(be.conv2d_p(&x, &w, None, &g).is_err());
        // A second backend: an error, and the first binding stays.
        let other = senet::nn::Cuda::new(be.device().clone());
        assert!(net.bind(&other).is_err());
        assert!(net.is_bound());
        assert_eq!(net.bind(&be).unwrap(), n);
        // The host optimiser and the other backend refuse, and change nothing.
        let logits = net.forward(&be, random_tensor(xs, 4), Mode::Train).unwrap();
        net.zero_grad();
        net.backward_params(&be, random_tensor(logits.shape(), 5))
            .unwrap();
        assert!(Sgd::new(0.9, 0.0).unwrap().step(&mut net, 0.1).is_err());
        assert!(Sgd::new(0.9, 0.0)
            .unwrap()
            .step_on(&other, &mut net, 0.1)
            .is_err());
        // A clone is an unbound copy with the same values.
        let copy = net.clone();
        assert!(!copy.is_bound());
        let (_, p) = net.parameters_mut().find(|(_, p)| p.is_bound()).unwrap();
        assert!(p.set(vec![0.0; p.numel()]).is_err());
        net.unbind().unwrap();
        let now: Vec<Vec<f32>> = net.parameters().map(|(_, p)| p.value.clone()).collect();
        assert_eq!(now, before, "a refused step changed a parameter");
        let copied: Vec<Vec<f32>> = copy.parameters().map(|(_, p)| p.value.clone()).collect();
        assert_eq!(copied, before);
    }
}

// ------------------------------------------------------------------ NHWC (channels-last)

/// The CUDA backend with NHWC activations: every op (convolutions through the kernels'
/// channels-last indexing or cuDNN's NHWC descriptors and KRSC filters, BatchNorm, pooling,
/// linear layers on flattened NHWC features, SE), within DESIGN.md's f32 tolerances of the
/// reference, shape errors still errors, and host tensors of either layout taken.
#[test]
fn cuda_nhwc_ops_match_reference() {
    for be in crate::nn_common::cuda_nhwc_backends::<f32>() {
        let h = crate::nn_common::OnHost(&be);
        check_convolution(&h);
        check_pointwise_ops(&h);
        check_se_op(&h);
        check_shape_errors(&h);
        check_invalid_geometries(&h);
    }
}

/// Whole small networks of every block variant and the Inception network (channel concat and
/// split of NHWC activations), layer by layer and end to end, forward and backward, against the
/// reference, with NHWC activations on the device.
#[test]
fn cuda_nhwc_networks_match_reference() {
    for be in crate::nn_common::cuda_nhwc_backends::<f32>() {
        check_small_networks(&be);
        check_inception_network(&be);
    }
}

/// senet's own network kernels do the same arithmetic whatever the layout (the convolutions,
/// pooling and elementwise kernels in the same order; BatchNorm's and the bias gradients' NHWC
/// reductions add the same f32 values in f64 in another order, which for these sizes rounds to
/// the same f32), so training steps with NHWC activations give the NCHW steps' logits,
/// gradients, parameters, momentum and running statistics bit for bit on every small network
/// without its SE blocks. cuDNN chooses different algorithms per layout, so its backends are
/// held to the reference instead.
#[test]
fn cuda_nhwc_own_kernels_equal_nchw_bit_for_bit() {
    use senet::nn::ConvEngine;
    use senet::train::optim::Sgd;
    let nchw: Vec<_> = crate::nn_common::cuda_backends()
        .into_iter()
        .filter(|b| b.conv_engine() == ConvEngine::Own)
        .collect();
    assert!(!nchw.is_empty() || senet::cuda::CudaDevice::emulator().is_err());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for a in nchw {
        let b = senet::nn::Cuda::<f32>::open(
            a.device().clone(),
            senet::nn::ConvChoice::Only(ConvEngine::Own),
        )
        .unwrap()
        .with_layout(senet::Layout::Nhwc)
        .with_poison(true);
        for (name, mut cfg, xs) in small_configs() {
            // Without SE: the SE op's kernels are per layout (an NHWC squeeze reduces pixel
            // tiles in another order), so SE blocks agree within rounding, not bit for bit;
            // the networks' tests above hold them to the reference.
            cfg.se = vec![None; cfg.se.len()];
            let mut na = cfg.build::<f32>(name).unwrap();
            na.init_weights(seed(name));
            let mut nb = na.clone();
            na.bind(&a).unwrap();
            nb.bind(&b).unwrap();
            let (mut oa, mut ob) = (Sgd::new(0.9, 1e-4).unwrap(), Sgd::new(0.9, 1e-4).unwrap());
            // Two steps reach momentum; SENET_FULL_TESTS=1 runs three.
            let steps = if crate::nn_common::full() { 3 } else { 2 };
            for step in 0..steps {
                let x: Tensor<f32> = random_tensor(xs, 40 + step);
                let la = na.forward(&a, x.clone(), Mode::Train).unwrap();
                let lb = nb.forward(&b, x, Mode::Train).unwrap();
                assert_eq!(
                    bits(la.data()),
                    bits(lb.data()),
                    "{name}: step {step} logits"
                );
                let dl: Tensor<f32> = random_tensor(la.shape(), 50 + step);
                na.zero_grad();
                nb.zero_grad();
                na.backward_params(&a, dl.clone()).unwrap();
                nb.backward_params(&b, dl).unwrap();
                oa.step_on(&a, &mut na, 0.05).unwrap();
                ob.step_on(&b, &mut nb, 0.05).unwrap();
            }
            let x: Tensor<f32> = random_tensor(xs, 99);
            for mode in [Mode::Eval, Mode::Infer] {
                let la = na.forward(&a, x.clone(), mode).unwrap();
                let lb = nb.forward(&b, x.clone(), mode).unwrap();
                assert_eq!(bits(la.data()), bits(lb.data()), "{name}: {mode} logits");
            }
            oa.gather(&na).unwrap();
            ob.gather(&nb).unwrap();
            na.unbind().unwrap();
            nb.unbind().unwrap();
            assert_eq!(na.state_dict().unwrap(), nb.state_dict().unwrap(), "{name}");
            for ((n, p), (_, q)) in na.parameters().zip(nb.parameters()) {
                assert_eq!(bits(&p.value), bits(&q.value), "{name}: {n} values");
                assert_eq!(bits(&p.grad), bits(&q.grad), "{name}: {n} gradient");
            }
            assert_eq!(oa.buffers(), ob.buffers(), "{name}: momentum");
        }
    }
}

/// bf16 activations in NHWC, the fast configuration: each op within DESIGN.md's bf16
/// tolerance, data movement exact, and ten SGD steps on each small network lower the loss.
#[test]
fn cuda_nhwc_bf16_ops_within_bf16_tolerance() {
    crate::nn_common::set_bf16_inputs(true);
    for be in crate::nn_common::cuda_nhwc_backends::<half::bf16>() {
        let h = crate::nn_common::OnHost(&be);
        check_convolution_within(&h, BF16_TOL, BF16_TOL);
        check_pointwise_ops(&h);
        check_se_op(&h);
    }
    check_narrow_data_movement(crate::nn_common::cuda_nhwc_backends::<half::bf16>());
}

/// f16 activations in NHWC: each op within DESIGN.md's f16 tolerance (the NHWC BatchNorm
/// reductions and backward in f16 among them), data movement exact.
#[test]
fn cuda_nhwc_f16_ops_within_f16_tolerance() {
    crate::nn_common::set_narrow_inputs(crate::nn_common::Narrow::F16);
    for be in crate::nn_common::cuda_nhwc_backends::<half::f16>() {
        let h = crate::nn_common::OnHost(&be);
        check_convolution_within(&h, F16_TOL, F16_TOL);
        check_pointwise_ops(&h);
        check_se_op(&h);
    }
    check_narrow_data_movement(crate::nn_common::cuda_nhwc_backends::<half::f16>());
}

#[test]
fn cuda_nhwc_bf16_training_steps_lower_the_loss() {
    check_narrow_training(
        crate::nn_common::cuda_nhwc_backends::<half::bf16>(),
        false,
        2,
    );
}

/// The per-channel reductions (BatchNorm statistics, BatchNorm backward plain and through its
/// fused ReLU, bias gradients) over enough rows that the NHWC kernels split them (2697 pixels in
/// 6 splits, the last one short) and over channels that do not fill their 32-wide blocks (70),
/// against the reference; parameter gradients accumulate onto what was there.
fn check_channel_reductions<B: Backend<f32, T = Tensor<f32>>>(be: &B) {
    let s = seed("channel reductions");
    let xs = Shape::new(3, 70, 29, 31);
    let c = xs.c;
    let x32: Tensor<f32> = random_tensor(xs, s);
    let x64: Tensor<f64> = x32.cast();
    let dy32: Tensor<f32> = random_tensor(xs, s ^ 1);
    let st = be.batch_norm_stats(&x32).unwrap();
    let str_ = Reference.batch_norm_stats(&x64).unwrap();
    close("bn mean (many rows)", &st.mean, &str_.mean, out_tol());
    close("bn var (many rows)", &st.var, &str_.var, out_tol());
    let g32 = vec_f32(c, s ^ 2);
    let g64: Vec<f64> = g32.iter().map(|&v| v as f64).collect();
    let invstd: Vec<f64> = str_.var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    let start = vec_f32(c, s ^ 3);
    let start64: Vec<f64> = start.iter().map(|&v| v as f64).collect();
    let y32 = be.relu(dy32.clone()).unwrap(); // a ReLU output to mask with: half the entries zero
    for (fused, batch_stats) in [(false, true), (true, true), (false, false)] {
        let (mut dg, mut db) = (start.clone(), start.clone());
        let (mut dgr, mut dbr) = (start64.clone(), start64.clone());
        let dx = if fused {
            be.batch_norm_relu_backward(
                &x32,
                &y32,
                dy32.clone(),
                &str_.mean,
                &invstd,
                &g32,
                batch_stats,
                &mut dg,
                &mut db,
            )
        } else {
            be.batch_norm_backward(
                &x32,
                &dy32,
                &str_.mean,
                &invstd,
                &g32,
                batch_stats,
                &mut dg,
                &mut db,
            )
        }
        .unwrap();
        let dxr = Reference
            .batch_norm_relu_backward(
                &x64,
                &(if fused {
                    y32.cast()
                } else {
                    Tensor::<f64>::from_vec(xs, senet::Layout::Nchw, vec![1.0; xs.numel()]).unwrap()
                }),
                dy32.cast(),
                &str_.mean,
                &invstd,
                &g64,
                batch_stats,
                &mut dgr,
                &mut dbr,
            )
            .unwrap();
        let what =
            format!("bn backward (many rows, fused relu {fused}, batch stats {batch_stats})");
        close(&what, &f64s(&dx), dxr.data(), grad_tol());
        let f = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        close(&format!("{what} dgamma"), &f(&dg), &dgr, grad_tol());
        close(&format!("{what} dbeta"), &f(&db), &dbr, grad_tol());
    }
    // A bias gradient: a 1x1 convolution's, summed over every pixel, onto earlier values.
    let geom = ConvGeom::new(c, 9, 1, 1, 0, 1).unwrap();
    let w32 = vec_f32(geom.weight_len(), s ^ 4);
    let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
    let dy: Tensor<f32> = random_tensor(geom.output_shape(xs).unwrap(), s ^ 5);
    let (mut dw, mut db) = (vec![0.0f32; w32.len()], vec_f32(9, s ^ 6));
    let (mut dwr, mut dbr) = (
        vec![0.0f64; w32.len()],
        db.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    be.conv2d_backward(&x32, &w32, &dy, &geom, &mut dw, Some(&mut db), false)
        .unwrap();
    Reference
        .conv2d_backward(
            &x64,
            &w64,
            &dy.cast(),
            &geom,
            &mut dwr,
            Some(&mut dbr),
            false,
        )
        .unwrap();
    let f = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
    close("conv bias gradient (many rows)", &f(&db), &dbr, grad_tol());
    close(
        "conv weight gradient (many rows)",
        &f(&dw),
        &dwr,
        grad_tol(),
    );
}

#[test]
fn channel_reductions_over_many_rows_match_reference() {
    check_channel_reductions(&Cpu);
}

#[test]
fn cuda_channel_reductions_over_many_rows_match_reference() {
    for be in crate::nn_common::cuda_backends() {
        check_channel_reductions(&crate::nn_common::OnHost(&be));
    }
    for be in crate::nn_common::cuda_nhwc_backends::<f32>() {
        check_channel_reductions(&crate::nn_common::OnHost(&be));
    }
}

// ------------------------------------------------------------------ the im2col + GEMM engine

/// Convolutions by im2col and GEMMs (cuBLAS on a GPU; on the emulator senet's column-major GEMM
/// with cuBLAS's contract, so every GEMM argument is checked here), forward, input and weight
/// gradients, dense, strided, grouped, depthwise, with bias, both layouts, f32 within
/// DESIGN.md's tolerances and bf16 within its own; then with a column budget of one sample's
/// columns, so every convolution runs in single-sample chunks (weight gradients summed over
/// the chunks).
#[test]
fn cuda_im2col_convolution_matches_reference() {
    for layout in senet::Layout::ALL {
        for be in crate::nn_common::cuda_im2col_backends::<f32>(layout) {
            check_convolution(&crate::nn_common::OnHost(&be));
            check_convolution(&crate::nn_common::OnHost(&be.with_col_budget(1)));
        }
    }
}

#[test]
fn cuda_im2col_bf16_convolution_within_bf16_tolerance() {
    crate::nn_common::set_bf16_inputs(true);
    for layout in senet::Layout::ALL {
        for be in crate::nn_common::cuda_im2col_backends::<half::bf16>(layout) {
            check_convolution_within(&crate::nn_common::OnHost(&be), BF16_TOL, BF16_TOL);
        }
    }
}

#[test]
fn cuda_im2col_f16_convolution_within_f16_tolerance() {
    crate::nn_common::set_narrow_inputs(crate::nn_common::Narrow::F16);
    for layout in senet::Layout::ALL {
        for be in crate::nn_common::cuda_im2col_backends::<half::f16>(layout) {
            check_convolution_within(&crate::nn_common::OnHost(&be), F16_TOL, F16_TOL);
        }
    }
}

/// Whole networks with their convolutions on the im2col engine: every small network and the
/// Inception network, layer by layer, forward and backward, both layouts.
#[test]
fn cuda_im2col_networks_match_reference() {
    for layout in senet::Layout::ALL {
        for be in crate::nn_common::cuda_im2col_backends::<f32>(layout) {
            assert_eq!(be.conv_engine(), senet::nn::ConvEngine::Cublas);
            check_small_networks(&be);
            check_inception_network(&be);
        }
    }
}

/// With bound parameters the weight gradient after `zero_grad` is written by the first chunk's
/// GEMM (beta 0) and added to by the later ones (beta 1): in single-sample chunks it equals,
/// bit for bit, the gradient of host parameters (uploaded zeros, beta 1 throughout) on the same
/// engine, for every small network in both layouts.
#[test]
fn cuda_im2col_bound_gradients_sum_over_chunks() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (k, layout) in senet::Layout::ALL.into_iter().enumerate() {
        for be in crate::nn_common::cuda_im2col_backends::<f32>(layout) {
            let be = be.with_col_budget(1);
            for (name, cfg, xs) in training_configs(k) {
                let mut host = cfg.build::<f32>(name).unwrap();
                host.init_weights(seed(name));
                let mut dev = host.clone();
                dev.bind(&be).unwrap();
                let x: Tensor<f32> = random_tensor(xs, 5);
                let mut dl = None;
                for net in [&mut host, &mut dev] {
                    // Twice: a bound gradient reads as zero after zero_grad once it exists.
                    for _ in 0..2 {
                        net.zero_grad();
                        let logits = net.forward(&be, x.clone(), Mode::Train).unwrap();
                        let d = dl
                            .get_or_insert_with(|| random_tensor::<f32>(logits.shape(), 6))
                            .clone();
                        net.backward_params(&be, d).unwrap();
                    }
                }
                dev.unbind().unwrap();
                for ((n, a), (_, b)) in host.parameters().zip(dev.parameters()) {
                    assert_eq!(
                        bits(&a.grad),
                        bits(&b.grad),
                        "{name} {layout}: {n} gradient"
                    );
                }
            }
        }
    }
}
