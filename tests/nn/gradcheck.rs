//! Central-difference gradient checks of every layer and block variant on the reference
//! backend in f64.
//!
//! Parameters and inputs are quantized to multiples of 2^-20 and the steps are 2^-20 down to
//! 2^-23, so perturbed SE weights stay exact in the SE op's f32 weights. In f64 the central
//! difference is then accurate to ~1e-9 relative, and gradients must agree to 1e-6 (relative
//! L2 per tensor), plus an absolute allowance of 1e-8 * sum|y * r| per component (about 100
//! times the rounding noise of a central difference of the loss; it only matters for gradients
//! that are zero, such as a bias before a training-mode BatchNorm). A component whose step
//! sizes never agree sits on a ReLU or max-pool kink; it is skipped, and at most 2% may be.

use crate::nn_common::{quantize, random_tensor, randomize_module, randomize_network, seed};
use senet::nn::backend::{ConvGeom, PoolGeom, Reference};
use senet::nn::blocks::{
    BlockConfig, BlockKind, ResidualBlock, SeBlockConfig, SePosition, StrideOn,
};
use senet::nn::inception::{InceptionModule, InceptionPool, InceptionSpec};
use senet::nn::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d, Relu, SqueezeExcite,
};
use senet::nn::{Mode, Module, Network, ResNetConfig, Slot, Stem};
use senet::se::SeConfig;
use senet::{rel_l2_error, rng, Shape, Tensor};

const EPS: f64 = 1.0 / (1u64 << 20) as f64;
const TOL: f64 = 1e-6;

/// What a gradient check drives: a forward, a backward, and the parameters.
trait Subject {
    fn fwd(&mut self, x: Tensor<f64>) -> Tensor<f64>;
    fn bwd(&mut self, dy: Tensor<f64>) -> Tensor<f64>;
    fn params<'a>(&'a mut self, f: &mut dyn FnMut(String, Slot<'a, f64>));
}

struct Mod<M> {
    m: M,
    mode: Mode,
}

impl<M: Module<f64>> Subject for Mod<M> {
    fn fwd(&mut self, x: Tensor<f64>) -> Tensor<f64> {
        self.m.forward(&Reference, x, self.mode).unwrap()
    }
    fn bwd(&mut self, dy: Tensor<f64>) -> Tensor<f64> {
        self.m.backward(&Reference, dy).unwrap()
    }
    fn params<'a>(&'a mut self, f: &mut dyn FnMut(String, Slot<'a, f64>)) {
        self.m.visit_mut("", f)
    }
}

struct Net {
    net: Network<f64>,
    mode: Mode,
}

impl Subject for Net {
    fn fwd(&mut self, x: Tensor<f64>) -> Tensor<f64> {
        // The same dropout mask on every forward.
        self.net.reseed_dropout(11);
        self.net.forward(&Reference, x, self.mode).unwrap()
    }
    fn bwd(&mut self, dy: Tensor<f64>) -> Tensor<f64> {
        self.net.backward(&Reference, dy).unwrap()
    }
    fn params<'a>(&'a mut self, f: &mut dyn FnMut(String, Slot<'a, f64>)) {
        self.net.visit_state_mut(f)
    }
}

fn loss(y: &Tensor<f64>, r: &[f64]) -> f64 {
    y.data().iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Changes element `i` of parameter number `which` by `delta`; returns the old value.
fn nudge<S: Subject>(s: &mut S, which: usize, i: usize, delta: f64) {
    let mut k = 0;
    s.params(&mut |_, slot| {
        if let Slot::Param(p) = slot {
            if k == which {
                p.value[i] += delta;
            }
            k += 1;
        }
    });
}

/// Indices to probe in a tensor of `n` elements: all of them up to `max`, else a random set.
fn probe(n: usize, max: usize, seed: u64) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let u = rng::uniform_vec(max, 0.0, 1.0, seed);
    let mut v: Vec<usize> = u
        .iter()
        .map(|&f| ((f as f64 * n as f64) as usize).min(n - 1))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A central difference whose steps `h` and `h / 2` agree, trying `h` = 2^-20 down to 2^-22
/// (a ReLU or max-pool kink closer than the step makes the two disagree); `None` when no
/// pair agrees.
///
/// "Agree" is as strict as the comparison itself: within half of [`TOL`] relative plus the
/// absolute rounding allowance `atol`, so a kink too small to tell apart from smoothness at
/// that level cannot bias the check.
fn numeric(atol: f64, mut f: impl FnMut(f64) -> f64) -> Option<f64> {
    let mut d = |h: f64| (f(h) - f(-h)) / (2.0 * h);
    let mut prev = d(EPS);
    for k in 1..=3 {
        let next = d(EPS / (1u64 << k) as f64);
        if (prev - next).abs() <= 0.5 * TOL * prev.abs() + atol {
            return Some(prev);
        }
        prev = next;
    }
    None
}

struct Tally {
    checked: usize,
    kinks: usize,
}

fn compare(
    label: &str,
    what: &str,
    analytic: &[f64],
    numeric: &[Option<f64>],
    atol: f64,
    t: &mut Tally,
) {
    let (mut a, mut n) = (Vec::new(), Vec::new());
    for (x, y) in analytic.iter().zip(numeric) {
        t.checked += 1;
        match y {
            Some(y) => {
                a.push(*x);
                n.push(*y);
            }
            None => t.kinks += 1,
        }
    }
    let diff: f64 = a
        .iter()
        .zip(&n)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = n.iter().map(|y| y * y).sum::<f64>().sqrt();
    let bound = TOL * norm + atol * (a.len() as f64).sqrt();
    assert!(
        diff <= bound && a.iter().all(|v| v.is_finite()),
        "{label}: {what}: |analytic - numeric| = {diff:.3e} > {bound:.3e} (relative {:.3e}; \
         analytic {a:?}, numeric {n:?})",
        rel_l2_error(&a, &n)
    );
}

/// Checks `d loss / d input` and `d loss / d every parameter` of `s` at `x`.
fn gradcheck<S: Subject>(label: &str, s: &mut S, x: Tensor<f64>, seed: u64) {
    let y = s.fwd(x.clone());
    let r: Vec<f64> = rng::uniform_vec(y.data().len(), -1.0, 1.0, seed ^ 1)
        .into_iter()
        .map(|v| quantize(v as f64))
        .collect();
    let dy = Tensor::from_vec(y.shape(), y.layout(), r.clone()).unwrap();
    s.params(&mut |_, slot| {
        if let Slot::Param(p) = slot {
            p.zero_grad();
        }
    });
    let atol = 1e-8
        * y.data()
            .iter()
            .zip(&r)
            .map(|(a, b)| (a * b).abs())
            .sum::<f64>()
            .max(1.0);
    let dx = s.bwd(dy);
    assert_eq!(dx.shape(), x.shape(), "{label}: dx shape");
    assert!(
        dx.data().iter().all(|v| v.is_finite()),
        "{label}: dx not finite"
    );
    let mut t = Tally {
        checked: 0,
        kinks: 0,
    };

    // Input gradient.
    let idx = probe(x.data().len(), 24, seed ^ 2);
    let num: Vec<Option<f64>> = idx
        .iter()
        .map(|&i| {
            numeric(atol, |d| {
                let mut xp = x.clone();
                xp.data_mut()[i] += d;
                loss(&s.fwd(xp), &r)
            })
        })
        .collect();
    let ana: Vec<f64> = idx.iter().map(|&i| dx.data()[i]).collect();
    compare(label, "input", &ana, &num, atol, &mut t);

    // Parameter gradients.
    let mut params = Vec::new();
    s.params(&mut |name, slot| {
        if let Slot::Param(p) = slot {
            params.push((name, p.numel(), p.grad.clone()));
        }
    });
    for (k, (name, numel, grad)) in params.iter().enumerate() {
        assert_eq!(grad.len(), *numel, "{label}: {name} has no gradient");
        let idx = probe(*numel, 8, seed ^ (k as u64 + 3));
        let num: Vec<Option<f64>> = idx
            .iter()
            .map(|&i| {
                numeric(atol, |d| {
                    nudge(s, k, i, d);
                    let l = loss(&s.fwd(x.clone()), &r);
                    nudge(s, k, i, -d);
                    l
                })
            })
            .collect();
        let ana: Vec<f64> = idx.iter().map(|&i| grad[i]).collect();
        compare(label, name, &ana, &num, atol, &mut t);
    }
    assert!(
        t.kinks * 50 <= t.checked,
        "{label}: {} of {} components hit a kink",
        t.kinks,
        t.checked
    );
}

fn check_module<M: Module<f64>>(label: &str, mut m: M, x: Shape, mode: Mode) {
    let s = seed(label);
    randomize_module(&mut m, s);
    let x = random_tensor(x, s ^ 99);
    gradcheck(label, &mut Mod { m, mode }, x, s);
}

#[test]
fn conv2d() {
    let cases = [
        // (in, out, k, stride, pad, groups, bias, input)
        (3, 4, 3, 1, 1, 1, true, Shape::new(2, 3, 5, 5)),
        (4, 6, 3, 2, 1, 2, false, Shape::new(2, 4, 6, 5)),
        (4, 4, 1, 1, 0, 1, false, Shape::new(1, 4, 3, 3)),
        (4, 8, 1, 2, 0, 4, true, Shape::new(2, 4, 5, 5)),
        (2, 3, 7, 2, 3, 1, false, Shape::new(1, 2, 9, 7)),
    ];
    for (i, o, k, st, p, g, bias, x) in cases {
        let conv = Conv2d::new(ConvGeom::new(i, o, k, st, p, g).unwrap(), bias);
        for mode in [Mode::Eval, Mode::Train] {
            check_module(
                &format!("conv {i}->{o} k{k} s{st} p{p} g{g} {mode}"),
                conv.clone(),
                x,
                mode,
            );
        }
    }
}

#[test]
fn batch_norm() {
    for mode in [Mode::Train, Mode::Eval] {
        check_module(
            &format!("batch norm {mode}"),
            BatchNorm2d::new(3),
            Shape::new(2, 3, 3, 2),
            mode,
        );
    }
}

#[test]
fn pointwise_and_pooling_layers() {
    let x = Shape::new(2, 3, 7, 6);
    check_module("relu", Relu::new(), x, Mode::Train);
    for (k, s, p, ceil) in [
        (3, 2, 1, false),
        (3, 2, 0, true),
        (2, 2, 0, false),
        (3, 1, 1, true),
    ] {
        let g = PoolGeom::new(k, s, p, ceil).unwrap();
        check_module(
            &format!("max pool {g:?}"),
            MaxPool2d::new(g),
            x,
            Mode::Train,
        );
        for include in [true, false] {
            let g = PoolGeom {
                count_include_pad: include,
                ..g
            };
            check_module(
                &format!("avg pool {g:?}"),
                AvgPool2d::new(g),
                x,
                Mode::Train,
            );
        }
    }
    check_module("global avg pool", GlobalAvgPool::new(), x, Mode::Train);
    check_module(
        "linear",
        Linear::new(3 * 2 * 2, 5, true),
        Shape::new(3, 3, 2, 2),
        Mode::Train,
    );
    check_module(
        "linear no bias",
        Linear::new(4, 3, false),
        Shape::new(2, 4, 1, 1),
        Mode::Train,
    );
}

#[test]
fn dropout() {
    // A fixed mask (the generator restarts before each forward).
    struct Fixed(Dropout<f64>);
    impl Module<f64> for Fixed {
        fn forward<B: senet::nn::Backend<f64>>(
            &mut self,
            b: &B,
            x: B::T,
            mode: Mode,
        ) -> senet::Result<B::T> {
            self.0.reseed(5);
            self.0.forward(b, x, mode)
        }
        fn backward<B: senet::nn::Backend<f64>>(&mut self, b: &B, dy: B::T) -> senet::Result<B::T> {
            self.0.backward(b, dy)
        }
        fn visit<'a>(&'a self, _: &str, _: senet::nn::param::Visit<'a, '_, f64>) {}
        fn visit_mut<'a>(&'a mut self, _: &str, _: senet::nn::param::VisitMut<'a, '_, f64>) {}
        fn output_shape(&self, x: Shape) -> senet::Result<Shape> {
            Ok(x)
        }
        fn macs(&self, _: Shape) -> senet::Result<u64> {
            Ok(0)
        }
    }
    check_module(
        "dropout",
        Fixed(Dropout::new(0.4).unwrap()),
        Shape::new(2, 3, 4, 4),
        Mode::Train,
    );
    // And the mask really drops about p of the values, scaling the rest by 1/(1-p).
    let mut d = Dropout::<f64>::new(0.4).unwrap();
    let x = Tensor::from_vec(
        Shape::new(1, 1, 100, 100),
        senet::Layout::Nchw,
        vec![1.0; 10_000],
    )
    .unwrap();
    let y = d.forward(&Reference, x, Mode::Train).unwrap();
    let zeros = y.data().iter().filter(|&&v| v == 0.0).count();
    assert!((3_500..4_500).contains(&zeros), "{zeros} dropped");
    assert!(y
        .data()
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.6).abs() < 1e-12));
}

#[test]
fn squeeze_excite() {
    for (c, d, bias) in [(6, 3, true), (5, 2, false), (8, 8, true)] {
        let cfg = SeConfig::with_hidden(c, d).unwrap().bias(bias);
        check_module(
            &format!("SE C={c} d={d} bias={bias}"),
            SqueezeExcite::new(cfg).unwrap(),
            Shape::new(2, c, 3, 3),
            Mode::Train,
        );
    }
}

fn se(position: SePosition, bias: bool) -> SeBlockConfig {
    SeBlockConfig {
        reduction: 2,
        divisor: 1,
        bias,
        position,
    }
}

#[test]
fn basic_blocks_with_every_se_position() {
    let mut positions: Vec<Option<SePosition>> = vec![None];
    positions.extend(
        SePosition::ALL
            .iter()
            .filter(|&&p| p != SePosition::After3x3)
            .map(|&p| Some(p)),
    );
    for pos in positions {
        for (in_ch, planes, stride) in [(4, 4, 1), (4, 6, 2)] {
            let mut cfg = BlockConfig::new(BlockKind::Basic, in_ch, planes, stride);
            cfg.se = pos.map(|p| se(p, true));
            let block = ResidualBlock::<f64>::new(cfg).unwrap();
            check_module(
                &format!("basic {in_ch}->{planes} s{stride} SE {pos:?}"),
                block,
                Shape::new(2, in_ch, 4, 4),
                Mode::Train,
            );
        }
    }
    let mut cfg = BlockConfig::new(BlockKind::Basic, 4, 4, 1);
    cfg.se = Some(se(SePosition::After3x3, true));
    assert!(ResidualBlock::<f64>::new(cfg).is_err());
}

#[test]
fn bottleneck_blocks_with_every_se_position() {
    let mut positions: Vec<Option<SePosition>> = vec![None];
    positions.extend(SePosition::ALL.iter().map(|&p| Some(p)));
    for pos in positions {
        // ResNet bottleneck, stride on the 3x3, projection shortcut.
        let mut cfg = BlockConfig::new(BlockKind::Bottleneck, 4, 2, 2);
        cfg.se = pos.map(|p| se(p, true));
        check_module(
            &format!("bottleneck SE {pos:?}"),
            ResidualBlock::<f64>::new(cfg).unwrap(),
            Shape::new(2, 4, 5, 5),
            Mode::Train,
        );
    }
    // ResNeXt (cardinality 2, base width 64 -> width 4) with the identity shortcut, SE without
    // biases, in eval mode.
    let mut cfg = BlockConfig::new(BlockKind::Bottleneck, 8, 2, 1);
    cfg.cardinality = 2;
    cfg.base_width = 64;
    cfg.se = Some(se(SePosition::Standard, false));
    check_module(
        "resnext bottleneck eval",
        ResidualBlock::<f64>::new(cfg).unwrap(),
        Shape::new(2, 8, 3, 3),
        Mode::Eval,
    );
    // SENet-154 style: reduce_first 2, cardinality 2, 3x3 strided projection; and the Caffe
    // SE-ResNet stride on the first 1x1.
    for stride_on in [StrideOn::Conv3x3, StrideOn::FirstConv1x1] {
        let mut cfg = BlockConfig::new(BlockKind::Bottleneck, 4, 2, 2);
        cfg.cardinality = 2;
        cfg.base_width = 64;
        cfg.reduce_first = 2;
        cfg.down_kernel = 3;
        cfg.stride_on = stride_on;
        cfg.se = Some(se(SePosition::Standard, true));
        check_module(
            &format!("senet154 bottleneck {stride_on:?}"),
            ResidualBlock::<f64>::new(cfg).unwrap(),
            Shape::new(2, 4, 5, 5),
            Mode::Train,
        );
    }
}

#[test]
fn inception_module_with_se() {
    for (pool, proj, stride) in [
        (InceptionPool::Avg, 2, 1),
        (InceptionPool::Max, 0, 2),
        (InceptionPool::Max, 3, 1),
    ] {
        let spec = InceptionSpec {
            name: "t",
            n1x1: if stride == 1 { 2 } else { 0 },
            n3x3: (2, 3),
            d3x3: (2, 2),
            pool,
            proj,
            stride,
        };
        let m =
            InceptionModule::<f64>::new(&spec, 3, Some(se(SePosition::Standard, true))).unwrap();
        check_module(
            &format!("inception {pool:?} proj {proj} s{stride}"),
            m,
            // Even sizes: a stride-2 module's 3x3 conv and ceil-mode pool then agree.
            Shape::new(2, 3, 6, 6),
            Mode::Train,
        );
    }
}

#[test]
fn small_networks() {
    let mut cfg = ResNetConfig::imagenet(BlockKind::Basic, &[1, 1]);
    cfg.channels = vec![4, 6];
    cfg.stem = Stem::Deep { width: 2 };
    cfg.num_classes = 5;
    cfg.drop_rate = 0.3;
    cfg.se = vec![Some(se(SePosition::Standard, true)), None];
    for mode in [Mode::Train, Mode::Eval] {
        let s = seed("small network");
        let mut net = cfg.build::<f64>("tiny").unwrap();
        randomize_network(&mut net, s);
        let x = random_tensor(Shape::new(2, 3, 12, 12), s ^ 7);
        gradcheck(
            &format!("tiny seresnet {mode}"),
            &mut Net { net, mode },
            x,
            s,
        );
    }
    // Bottleneck network with a strided first 1x1 (Caffe layout), ceil-mode stem pool.
    let mut cfg = ResNetConfig::imagenet(BlockKind::Bottleneck, &[1, 1]);
    cfg.channels = vec![2, 3];
    cfg.stem = Stem::Conv7 { width: 4 };
    cfg.stem_pool = Some(PoolGeom::new(3, 2, 0, true).unwrap());
    cfg.stride_on = StrideOn::FirstConv1x1;
    cfg.num_classes = 3;
    cfg.se = vec![
        Some(se(SePosition::Pre, true)),
        Some(se(SePosition::Post, false)),
    ];
    let s = seed("caffe network");
    let mut net = cfg.build::<f64>("tiny-caffe").unwrap();
    randomize_network(&mut net, s);
    let x = random_tensor(Shape::new(2, 3, 13, 13), s ^ 7);
    gradcheck(
        "tiny caffe seresnet",
        &mut Net {
            net,
            mode: Mode::Train,
        },
        x,
        s,
    );
}
