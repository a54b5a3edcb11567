//! Criterion group `candle`: SE in candle on the CPU at ResNet-50's four stage shapes, batch 32,
//! f32, NCHW, side by side in one run:
//!
//! - `candle-composed`: candle's own SE as candle-transformers' models write it (mean, two
//!   matmuls, activation, sigmoid, broadcast multiply);
//! - `senet-candle`: `senet::candle::se` (packs the parameters per call);
//! - `senet-candle-packed`: `senet::candle::se_packed` on parameters kept packed;
//! - `senet-cpu`: senet's own CPU path (`se::cpu::forward` / `backward`) on the same shape;
//! - `candle-autograd` (fwd+bwd only): what candle's `backward()` itself does around any op whose
//!   input is a `Var`, at this shape, with no op at all: seed `dy = ones_like(y)` and accumulate
//!   the input's gradient as `zeros_like(x) + dx` (two fresh full-size tensors and an add). No
//!   custom op can avoid it; `senet-cpu` plus it is the floor for `senet-candle`'s fwd+bwd.
//!
//! `fwd` is the forward; `fwd+bwd` adds the backward through candle's autograd (`y.backward()`,
//! which seeds `dy = 1`, with `x` and every parameter a `Var`); for senet's own path, forward
//! then backward with a ready `dy`.
//!
//! `cargo bench --features candle --bench candle`

use candle_core::{Device, Tensor, Var, D};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use senet::se::cpu;
use senet::{Init, Layout, SeConfig, SeWeights, Shape};
use std::time::Duration;

const STAGES: [(usize, usize, usize); 4] =
    [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)];
const BATCH: usize = 32;

/// candle's composed SE (ReLU, sigmoid, biases), as candle-transformers writes it.
fn composed(x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, b2: &Tensor) -> Tensor {
    let (n, c, _, _) = x.dims4().unwrap();
    let z = x
        .mean_keepdim(D::Minus1)
        .unwrap()
        .mean_keepdim(D::Minus2)
        .unwrap()
        .reshape((n, c))
        .unwrap();
    let h = z
        .matmul(&w1.t().unwrap())
        .unwrap()
        .broadcast_add(b1)
        .unwrap();
    let u = h.relu().unwrap();
    let a = u
        .matmul(&w2.t().unwrap())
        .unwrap()
        .broadcast_add(b2)
        .unwrap();
    let s = candle_nn::ops::sigmoid(&a).unwrap();
    x.broadcast_mul(&s.reshape((n, c, 1, 1)).unwrap()).unwrap()
}

fn bench(cr: &mut Criterion) {
    let dev = Device::Cpu;
    for (c, h, w) in STAGES {
        let cfg = SeConfig::with_reduction(c, 16).unwrap();
        let d = cfg.hidden;
        let shape = Shape::new(BATCH, c, h, w);
        let weights = SeWeights::init(cfg, Init::PyTorchDefault, 1).unwrap();
        let xs = senet::Tensor::<f32>::random(shape, Layout::Nchw, 2).unwrap();
        let dys =
            senet::Tensor::<f32>::from_vec(shape, Layout::Nchw, vec![1.0; shape.numel()]).unwrap();

        let x = Var::from_tensor(&Tensor::from_slice(xs.data(), (BATCH, c, h, w), &dev).unwrap())
            .unwrap();
        let var = |v: &[f32], s: &[usize]| {
            Var::from_tensor(&Tensor::from_slice(v, s, &dev).unwrap()).unwrap()
        };
        let w1 = var(&weights.w1, &[d, c]);
        let b1 = var(weights.b1.as_deref().unwrap(), &[d]);
        let w2 = var(&weights.w2, &[c, d]);
        let b2 = var(weights.b2.as_deref().unwrap(), &[c]);
        let packed = Var::from_tensor(
            &senet::candle::pack_params(&cfg, &w1, Some(&b1), &w2, Some(&b2)).unwrap(),
        )
        .unwrap();

        let mut g = cr.benchmark_group(format!("candle/{BATCH}x{c}x{h}x{w}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));

        // Forward.
        g.bench_function(BenchmarkId::new("fwd", "candle-composed"), |b| {
            b.iter(|| composed(&x, &w1, &b1, &w2, &b2))
        });
        g.bench_function(BenchmarkId::new("fwd", "senet-candle"), |b| {
            b.iter(|| senet::candle::se(&x, &w1, Some(&b1), &w2, Some(&b2), None, &cfg).unwrap())
        });
        g.bench_function(BenchmarkId::new("fwd", "senet-candle-packed"), |b| {
            b.iter(|| senet::candle::se_packed(&x, &packed, None, &cfg).unwrap())
        });
        g.bench_function(BenchmarkId::new("fwd", "senet-cpu"), |b| {
            b.iter(|| cpu::forward(&weights, &xs, None).unwrap())
        });

        // Forward + backward.
        g.bench_function(BenchmarkId::new("fwd+bwd", "candle-composed"), |b| {
            b.iter(|| composed(&x, &w1, &b1, &w2, &b2).backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("fwd+bwd", "senet-candle"), |b| {
            b.iter(|| {
                senet::candle::se(&x, &w1, Some(&b1), &w2, Some(&b2), None, &cfg)
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("fwd+bwd", "senet-candle-packed"), |b| {
            b.iter(|| {
                senet::candle::se_packed(&x, &packed, None, &cfg)
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("fwd+bwd", "candle-autograd"), |b| {
            b.iter(|| {
                let dy = x.ones_like().unwrap().contiguous().unwrap();
                x.zeros_like().unwrap().add(&dy).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("fwd+bwd", "senet-cpu"), |b| {
            b.iter(|| {
                let f = cpu::forward(&weights, &xs, None).unwrap();
                cpu::backward(&weights, &xs, None, &f.saved, &dys).unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(candle, bench);
criterion_main!(candle);
