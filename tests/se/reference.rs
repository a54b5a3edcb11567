//! The oracle's own tests: a case computed by hand, layout agreement, finite differences for
//! every gradient, reduced-precision inputs, and invalid inputs.

use crate::common::*;
use half::{bf16, f16};
use senet::se::gradcheck::{clear_of_kinks, finite_differences};
use senet::se::reference::{backward, forward};
use senet::{Activation, Element, Gate, Layout, SeConfig, SeWeights, Shape, Tensor};

/// N=1, C=2, H=1, W=2, hidden 1, hard-sigmoid gate (exact arithmetic).
/// x: channel 0 = [1, 3], channel 1 = [2, 4]  ->  z = [2, 3]
/// h = 0.5*2 - 0.25*3 + 0.25 = 0.5, u = relu(h) = 0.5
/// a = [2*0.5 + 0, -4*0.5 + 1] = [1, -1];  s = (a + 3) / 6 = [2/3, 1/3]
/// y = [2/3, 2, 2/3, 4/3]
/// Backward with dy = 1: ds = [1+3, 2+4] = [4, 6]; dg = ds / 6 = [2/3, 1]; db2 = dg
/// dW2 = dg * u = [1/3, 1/2]; du = (2 * 2/3 - 4 * 1) * relu'(0.5) = -8/3; db1 = -8/3
/// dW1 = du * z = [-16/3, -8]; dz = W1^T du = [-4/3, 2/3]
/// dx = dy * s + dz / 2 = [2/3 - 2/3, 2/3 - 2/3, 1/3 + 1/3, 1/3 + 1/3] = [0, 0, 2/3, 2/3]
#[test]
fn tiny_case_by_hand() {
    let cfg = SeConfig::with_hidden(2, 1).unwrap().gate(Gate::HardSigmoid);
    let w = SeWeights::from_parts(
        cfg,
        vec![0.5, -0.25],
        Some(vec![0.25]),
        vec![2.0, -4.0],
        Some(vec![0.0, 1.0]),
    )
    .unwrap();
    let shape = Shape::new(1, 2, 1, 2);
    let x = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![1.0, 3.0, 2.0, 4.0]).unwrap();
    let f = forward(&w, &x, None).unwrap();
    let close = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12) && a.len() == b.len()
    };
    assert!(close(&f.saved.z, &[2.0, 3.0]));
    assert!(close(&f.saved.h, &[0.5]));
    assert!(close(&f.saved.s, &[2.0 / 3.0, 1.0 / 3.0]));
    assert!(
        close(&f.y, &[2.0 / 3.0, 2.0, 2.0 / 3.0, 4.0 / 3.0]),
        "{:?}",
        f.y
    );

    let dy = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![1.0; 4]).unwrap();
    let b = backward(&w, &x, None, &f.saved, &dy).unwrap();
    assert!(close(&b.grads.db2.unwrap(), &[2.0 / 3.0, 1.0]));
    assert!(close(&b.grads.dw2, &[1.0 / 3.0, 0.5]));
    assert!(close(&b.grads.db1.unwrap(), &[-8.0 / 3.0]));
    assert!(close(&b.grads.dw1, &[-16.0 / 3.0, -8.0]));
    assert!(
        close(&b.dx, &[0.0, 0.0, 2.0 / 3.0, 2.0 / 3.0]),
        "{:?}",
        b.dx
    );
}

#[test]
fn layouts_agree() {
    let seed = seed("layouts_agree");
    let shape = Shape::new(3, 7, 3, 5);
    let w = weights(7, 3, true, Activation::Relu, Gate::Sigmoid, seed);
    let x = tensor::<f32>(shape, Layout::Nchw, seed + 1);
    let r = tensor::<f32>(shape, Layout::Nchw, seed + 2);
    let dy = tensor::<f32>(shape, Layout::Nchw, seed + 3);
    let (xh, rh, dyh) = (
        x.to_layout(Layout::Nhwc),
        r.to_layout(Layout::Nhwc),
        dy.to_layout(Layout::Nhwc),
    );
    let f1 = forward(&w, &x, Some(&r)).unwrap();
    let f2 = forward(&w, &xh, Some(&rh)).unwrap();
    assert_eq!(f1.saved, f2.saved);
    let b1 = backward(&w, &x, Some(&r), &f1.saved, &dy).unwrap();
    let b2 = backward(&w, &xh, Some(&rh), &f2.saved, &dyh).unwrap();
    // Same values at the same logical positions.
    for n in 0..shape.n {
        for c in 0..shape.c {
            for p in 0..shape.hw() {
                let (i, j) = (
                    shape.offset(Layout::Nchw, n, c, p),
                    shape.offset(Layout::Nhwc, n, c, p),
                );
                assert!((f1.y[i] - f2.y[j]).abs() < 1e-12);
                assert!((b1.dx[i] - b2.dx[j]).abs() < 1e-12);
            }
        }
    }
    assert_close("dw1", &b2.grads.dw1, &b1.grads.dw1, 1e-12);
    assert_close("dw2", &b2.grads.dw2, &b1.grads.dw2, 1e-12);
}

#[test]
fn finite_differences_every_gradient() {
    let seed = seed("finite_differences");
    let shape = Shape::new(2, 5, 2, 3);
    let mut cases = 0;
    for gate in Gate::ALL {
        for act in Activation::ALL {
            for bias in [true, false] {
                for epilogue in [false, true] {
                    let mut s = seed.wrapping_add(cases * 101);
                    cases += 1;
                    // Differences across a kink are wrong, not the backward: draw until clear.
                    let (w, x, r) = (0..1000)
                        .find_map(|_| {
                            s = s.wrapping_add(0x9e37_79b9);
                            let w = weights(5, 3, bias, act, gate, s);
                            let x = tensor::<f64>(shape, Layout::Nchw, s + 1);
                            let r = epilogue.then(|| tensor::<f64>(shape, Layout::Nchw, s + 2));
                            clear_of_kinks(&w, &x, r.as_ref())
                                .unwrap()
                                .then_some((w, x, r))
                        })
                        .expect("a case clear of the kinks in 1000 draws");
                    let probe = tensor::<f64>(shape, Layout::Nchw, s + 3);
                    let f = forward(&w, &x, r.as_ref()).unwrap();
                    let b = backward(&w, &x, r.as_ref(), &f.saved, &probe).unwrap();
                    let label = format!("{gate} {act} bias={bias} epilogue={epilogue}");
                    let fd = finite_differences(&w, &x, r.as_ref(), &probe).unwrap();
                    let tol = 1e-6;
                    assert_close(&format!("{label} dx"), &b.dx, &fd.dx, tol);
                    assert_close(&format!("{label} dw1"), &b.grads.dw1, &fd.grads.dw1, tol);
                    assert_close(&format!("{label} dw2"), &b.grads.dw2, &fd.grads.dw2, tol);
                    assert_eq!(b.grads.db1.is_some(), bias);
                    assert_eq!(fd.grads.db1.is_some(), bias);
                    if let (Some(g), Some(f)) = (&b.grads.db1, &fd.grads.db1) {
                        assert_close(&format!("{label} db1"), g, f, tol);
                    }
                    if let (Some(g), Some(f)) = (&b.grads.db2, &fd.grads.db2) {
                        assert_close(&format!("{label} db2"), g, f, tol);
                    }
                    assert_eq!(b.dresidual.is_some(), epilogue);
                    if let (Some(g), Some(f)) = (&b.dresidual, &fd.dresidual) {
                        assert_close(&format!("{label} dresidual"), g, f, tol);
                    }
                }
            }
        }
    }
    assert_eq!(cases, 16);
}

/// `clear_of_kinks` refuses a case with a value on each kind of kink, built by hand from the
/// hand-computed case above: h at the ReLU's 0, a at the hard sigmoid's 3, and the epilogue's
/// s x + r at 0; and accepts the case itself.
#[test]
fn clear_of_kinks_sees_each_kink() {
    let cfg = SeConfig::with_hidden(2, 1).unwrap().gate(Gate::HardSigmoid);
    let shape = Shape::new(1, 2, 1, 2);
    let x = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![1.0, 3.0, 2.0, 4.0]).unwrap();
    let w = |b1: f32, b2: f32| {
        SeWeights::from_parts(
            cfg,
            vec![0.5, -0.25],
            Some(vec![b1]),
            vec![2.0, -4.0],
            Some(vec![0.0, b2]),
        )
        .unwrap()
    };
    // h = 0.5 * 2 - 0.25 * 3 + b1 = 0.25 + b1; a[1] = -4 relu(h) + b2 (b2 - 2 at b1 = 0.25).
    assert!(
        clear_of_kinks(&w(0.25, 1.0), &x, None).unwrap(),
        "the hand case is clear"
    );
    assert!(!clear_of_kinks(&w(-0.25, 1.0), &x, None).unwrap(), "h = 0");
    assert!(
        !clear_of_kinks(&w(0.25, 5.0), &x, None).unwrap(),
        "a[1] = 3"
    );
    // s = [2/3, 1/3]: x[0] = 1 with r[0] = -2/3 puts s x + r at 0 (up to rounding).
    let r = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![-2.0 / 3.0, 0.5, 0.5, 0.5]).unwrap();
    assert!(
        !clear_of_kinks(&w(0.25, 1.0), &x, Some(&r)).unwrap(),
        "s x + r = 0"
    );
    let r = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![0.5; 4]).unwrap();
    assert!(clear_of_kinks(&w(0.25, 1.0), &x, Some(&r)).unwrap());
}

/// f16 / bf16 through the reference: rounding the inputs costs at most the dtype's tolerance on
/// a well-conditioned output (no epilogue), and outputs stored back in the dtype stay within
/// the tolerance of the f64 results on the same rounded inputs (with the epilogue too).
fn reduced_precision_round_trip<T: Element>() {
    let seed = seed(&format!("round_trip_{}", T::DTYPE));
    let shape = Shape::new(2, 24, 5, 5);
    let tol = T::DTYPE.output_tolerance();
    let w = weights(24, 8, true, Activation::Relu, Gate::Sigmoid, seed);
    let x32 = tensor::<f32>(shape, Layout::Nhwc, seed + 1);
    let xt = x32.cast::<T>();
    assert_close(
        "inputs rounded to the dtype",
        &xt.to_f64_vec(),
        &x32.to_f64_vec(),
        tol,
    );
    let exact = forward(&w, &x32, None).unwrap();
    let low = forward(&w, &xt, None).unwrap();
    assert_close("y from rounded inputs", &low.y, &exact.y, tol);
    assert_close("s from rounded inputs", &low.saved.s, &exact.saved.s, tol);

    let rt = tensor::<f32>(shape, Layout::Nhwc, seed + 2).cast::<T>();
    let dyt = tensor::<f32>(shape, Layout::Nhwc, seed + 3).cast::<T>();
    let f = forward(&w, &xt, Some(&rt)).unwrap();
    let b = backward(&w, &xt, Some(&rt), &f.saved, &dyt).unwrap();
    let stored = |v: &[f64]| -> Vec<f64> { v.iter().map(|&e| T::from_f64(e).to_f64()).collect() };
    assert_close("y stored in the dtype", &stored(&f.y), &f.y, tol);
    assert_close(
        "dx stored in the dtype",
        &stored(&b.dx),
        &b.dx,
        T::DTYPE.grad_tolerance(),
    );
    let dres = b.dresidual.as_ref().unwrap();
    assert_close(
        "dresidual stored in the dtype",
        &stored(dres),
        dres,
        T::DTYPE.grad_tolerance(),
    );
}

#[test]
fn f16_round_trip() {
    reduced_precision_round_trip::<f16>();
}

#[test]
fn bf16_round_trip() {
    reduced_precision_round_trip::<bf16>();
}

#[test]
fn invalid_inputs_are_errors() {
    let w = weights(4, 2, true, Activation::Relu, Gate::Sigmoid, 1);
    let x = tensor::<f32>(Shape::new(2, 4, 3, 3), Layout::Nchw, 2);
    // Channel mismatch.
    let bad_c = tensor::<f32>(Shape::new(2, 5, 3, 3), Layout::Nchw, 3);
    assert!(forward(&w, &bad_c, None).is_err());
    // Residual of another shape or layout.
    let r_shape = tensor::<f32>(Shape::new(2, 4, 3, 2), Layout::Nchw, 4);
    assert!(forward(&w, &x, Some(&r_shape)).is_err());
    let r_layout = tensor::<f32>(Shape::new(2, 4, 3, 3), Layout::Nhwc, 4);
    assert!(forward(&w, &x, Some(&r_layout)).is_err());
    // Zero-sized dims cannot make a tensor at all.
    assert!(Tensor::<f32>::zeros(Shape::new(0, 4, 3, 3), Layout::Nchw).is_err());
    assert!(Tensor::<f32>::from_vec(Shape::new(2, 4, 3, 0), Layout::Nchw, vec![]).is_err());
    // Weights whose lengths disagree with their config.
    let mut broken = w.clone();
    broken.w2.pop();
    assert!(forward(&broken, &x, None).is_err());
    // Saved state of the wrong length, and a gradient of the wrong shape.
    let f = forward(&w, &x, None).unwrap();
    let mut saved = f.saved.clone();
    saved.z.pop();
    let dy = tensor::<f32>(x.shape(), Layout::Nchw, 5);
    assert!(backward(&w, &x, None, &saved, &dy).is_err());
    let dy_bad = tensor::<f32>(x.shape(), Layout::Nhwc, 5);
    assert!(backward(&w, &x, None, &f.saved, &dy_bad).is_err());
    // Hidden width 0 and channels 0 are config errors.
    assert!(SeConfig::with_hidden(4, 0).is_err());
    assert!(SeConfig::with_reduction(0, 16).is_err());
}
