//! The oracle's own tests: a case computed by hand, layout agreement, finite differences for
//! every gradient, reduced-precision inputs, and invalid inputs.

mod common;

use common::*;
use half::{bf16, f16};
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
    let w = SeWeights::from_parts(cfg, vec![0.5, -0.25], Some(vec![0.25]), vec![2.0, -4.0], Some(vec![0.0, 1.0]))
        .unwrap();
    let shape = Shape::new(1, 2, 1, 2);
    let x = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![1.0, 3.0, 2.0, 4.0]).unwrap();
    let f = forward(&w, &x, None).unwrap();
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12) && a.len() == b.len();
    assert!(close(&f.saved.z, &[2.0, 3.0]));
    assert!(close(&f.saved.h, &[0.5]));
    assert!(close(&f.saved.s, &[2.0 / 3.0, 1.0 / 3.0]));
    assert!(close(&f.y, &[2.0 / 3.0, 2.0, 2.0 / 3.0, 4.0 / 3.0]), "{:?}", f.y);

    let dy = Tensor::<f64>::from_vec(shape, Layout::Nchw, vec![1.0; 4]).unwrap();
    let b = backward(&w, &x, None, &f.saved, &dy).unwrap();
    assert!(close(&b.grads.db2.unwrap(), &[2.0 / 3.0, 1.0]));
    assert!(close(&b.grads.dw2, &[1.0 / 3.0, 0.5]));
    assert!(close(&b.grads.db1.unwrap(), &[-8.0 / 3.0]));
    assert!(close(&b.grads.dw1, &[-16.0 / 3.0, -8.0]));
    assert!(close(&b.dx, &[0.0, 0.0, 2.0 / 3.0, 2.0 / 3.0]), "{:?}", b.dx);
}

#[test]
fn layouts_agree() {
    let seed = seed("layouts_agree");
    let shape = Shape::new(3, 7, 3, 5);
    let w = weights(7, 3, true, Activation::Relu, Gate::Sigmoid, seed);
    let x = tensor::<f32>(shape, Layout::Nchw, seed + 1);
    let r = tensor::<f32>(shape, Layout::Nchw, seed + 2);
    let dy = tensor::<f32>(shape, Layout::Nchw, seed + 3);
    let (xh, rh, dyh) = (x.to_layout(Layout::Nhwc), r.to_layout(Layout::Nhwc), dy.to_layout(Layout::Nhwc));
    let f1 = forward(&w, &x, Some(&r)).unwrap();
    let f2 = forward(&w, &xh, Some(&rh)).unwrap();
    assert_eq!(f1.saved, f2.saved);
    let b1 = backward(&w, &x, Some(&r), &f1.saved, &dy).unwrap();
    let b2 = backward(&w, &xh, Some(&rh), &f2.saved, &dyh).unwrap();
    // Same values at the same logical positions.
    for n in 0..shape.n {
        for c in 0..shape.c {
            for p in 0..shape.hw() {
                let (i, j) = (shape.offset(Layout::Nchw, n, c, p), shape.offset(Layout::Nhwc, n, c, p));
                assert!((f1.y[i] - f2.y[j]).abs() < 1e-12);
                assert!((b1.dx[i] - b2.dx[j]).abs() < 1e-12);
            }
        }
    }
    assert_close("dw1", &b2.grads.dw1, &b1.grads.dw1, 1e-12);
    assert_close("dw2", &b2.grads.dw2, &b1.grads.dw2, 1e-12);
}

/// Loss = sum(y * probe). Returns it in f64.
fn loss(w: &SeWeights, x: &Tensor<f64>, r: Option<&Tensor<f64>>, probe: &[f64]) -> f64 {
    forward(w, x, r).unwrap().y.iter().zip(probe).map(|(a, b)| a * b).sum()
}

/// Central differences of every weight: perturbs one f32 weight by about 2^-12 (measuring the
/// perturbation actually stored) and differences the f64 loss.
fn fd_weights(w: &SeWeights, x: &Tensor<f64>, r: Option<&Tensor<f64>>, probe: &[f64], which: usize) -> Vec<f64> {
    let len = match which {
        0 => w.w1.len(),
        1 => w.b1.as_ref().unwrap().len(),
        2 => w.w2.len(),
        _ => w.b2.as_ref().unwrap().len(),
    };
    (0..len)
        .map(|i| {
            let mut evals = [0.0f64; 2];
            let mut vals = [0.0f64; 2];
            for (k, sign) in [1.0f32, -1.0].into_iter().enumerate() {
                let mut wp = w.clone();
                let slot = match which {
                    0 => &mut wp.w1[i],
                    1 => &mut wp.b1.as_mut().unwrap()[i],
                    2 => &mut wp.w2[i],
                    _ => &mut wp.b2.as_mut().unwrap()[i],
                };
                *slot += sign * 2f32.powi(-12);
                vals[k] = *slot as f64;
                evals[k] = loss(&wp, x, r, probe);
            }
            (evals[0] - evals[1]) / (vals[0] - vals[1])
        })
        .collect()
}

fn fd_input(w: &SeWeights, x: &Tensor<f64>, r: Option<&Tensor<f64>>, probe: &[f64], wrt_residual: bool) -> Vec<f64> {
    let eps = 1e-6;
    let len = x.data().len();
    (0..len)
        .map(|i| {
            let mut e = [0.0; 2];
            for (k, sign) in [1.0, -1.0].into_iter().enumerate() {
                let (mut xp, mut rp) = (x.clone(), r.cloned());
                if wrt_residual {
                    rp.as_mut().unwrap().data_mut()[i] += sign * eps;
                } else {
                    xp.data_mut()[i] += sign * eps;
                }
                e[k] = loss(w, &xp, rp.as_ref(), probe);
            }
            (e[0] - e[1]) / (2.0 * eps)
        })
        .collect()
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
                    let s = seed.wrapping_add(cases * 101);
                    cases += 1;
                    let w = weights(5, 3, bias, act, gate, s);
                    let x = tensor::<f64>(shape, Layout::Nchw, s + 1);
                    let r = epilogue.then(|| tensor::<f64>(shape, Layout::Nchw, s + 2));
                    let probe = tensor::<f64>(shape, Layout::Nchw, s + 3);
                    let f = forward(&w, &x, r.as_ref()).unwrap();
                    let b = backward(&w, &x, r.as_ref(), &f.saved, &probe).unwrap();
                    let label = format!("{gate} {act} bias={bias} epilogue={epilogue}");
                    let tol = 1e-6;
                    assert_close(&format!("{label} dx"), &b.dx, &fd_input(&w, &x, r.as_ref(), probe.data(), false), tol);
                    assert_close(&format!("{label} dw1"), &b.grads.dw1, &fd_weights(&w, &x, r.as_ref(), probe.data(), 0), tol);
                    assert_close(&format!("{label} dw2"), &b.grads.dw2, &fd_weights(&w, &x, r.as_ref(), probe.data(), 2), tol);
                    if bias {
                        assert_close(&format!("{label} db1"), b.grads.db1.as_ref().unwrap(), &fd_weights(&w, &x, r.as_ref(), probe.data(), 1), tol);
                        assert_close(&format!("{label} db2"), b.grads.db2.as_ref().unwrap(), &fd_weights(&w, &x, r.as_ref(), probe.data(), 3), tol);
                    } else {
                        assert!(b.grads.db1.is_none() && b.grads.db2.is_none());
                    }
                    if epilogue {
                        assert_close(
                            &format!("{label} dresidual"),
                            b.dresidual.as_ref().unwrap(),
                            &fd_input(&w, &x, r.as_ref(), probe.data(), true),
                            tol,
                        );
                    }
                }
            }
        }
    }
    assert_eq!(cases, 16);
}

fn reduced_precision_round_trip<T: Element>() {
    let seed = seed(&format!("round_trip_{}", T::DTYPE));
    let shape = Shape::new(2, 24, 5, 5);
    let w = weights(24, 8, true, Activation::Relu, Gate::Sigmoid, seed);
    let x32 = tensor::<f32>(shape, Layout::Nhwc, seed + 1);
    let r32 = tensor::<f32>(shape, Layout::Nhwc, seed + 2);
    let exact = forward(&w, &x32, Some(&r32)).unwrap();
    let (xt, rt) = (x32.cast::<T>(), r32.cast::<T>());
    let low = forward(&w, &xt, Some(&rt)).unwrap();
    // Outputs rounded to T as a kernel would store them.
    let stored: Vec<f64> = low.y.iter().map(|&v| T::from_f64(v).to_f64()).collect();
    let tol = T::DTYPE.output_tolerance();
    assert_close("y from rounded inputs", &stored, &exact.y, tol);
    assert_close("s from rounded inputs", &low.saved.s, &exact.saved.s, tol);
    let dy32 = tensor::<f32>(shape, Layout::Nhwc, seed + 3);
    let bx = backward(&w, &x32, Some(&r32), &exact.saved, &dy32).unwrap();
    let bl = backward(&w, &xt, Some(&rt), &low.saved, &dy32.cast::<T>()).unwrap();
    let gtol = T::DTYPE.grad_tolerance();
    assert_close("dx from rounded inputs", &bl.dx, &bx.dx, gtol);
    assert_close("dw1 from rounded inputs", &bl.grads.dw1, &bx.grads.dw1, gtol);
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
