//! The API a training loop uses: forward(Train) -> loss -> backward -> parameters_mut (SGD with
//! momentum and weight decay) -> zero_grad -> forward(Infer). A small SE network must fit a
//! small synthetic task on the fast CPU backend and on the CUDA backend.

use senet::nn::{Backend, BlockKind, Cpu, Mode, ResNetConfig, SeBlockConfig, Stem};
use senet::{rng, Layout, Shape, Tensor};

/// Mean softmax cross-entropy of logits `[n, k, 1, 1]` and its gradient.
fn cross_entropy(logits: &Tensor<f32>, labels: &[usize]) -> (f64, Tensor<f32>) {
    let s = logits.shape();
    let k = s.c;
    let mut loss = 0.0;
    let mut grad = vec![0.0f32; s.numel()];
    for (i, &label) in labels.iter().enumerate() {
        let row = &logits.data()[i * k..(i + 1) * k];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        loss += z.ln() + max - row[label] as f64;
        for j in 0..k {
            let p = (row[j] as f64 - max).exp() / z;
            let t = if j == label { 1.0 } else { 0.0 };
            grad[i * k + j] = ((p - t) / labels.len() as f64) as f32;
        }
    }
    (
        loss / labels.len() as f64,
        Tensor::from_vec(s, Layout::Nchw, grad).unwrap(),
    )
}

#[test]
fn a_small_se_network_learns() {
    learns(&Cpu);
}

/// The same training run on the CUDA backend: the emulator always, a GPU when present. The
/// 40-step run takes minutes on the emulator, so without SENET_FULL_TESTS=1 the CUDA backend
/// instead follows the CPU backend's first steps: the same losses (to f32 rounding) step by
/// step, from the same weights and data, through the same SGD.
#[test]
fn a_small_se_network_learns_on_cuda() {
    for be in crate::nn_common::cuda_backends_announced() {
        if crate::nn_common::full() {
            learns(&be);
        } else {
            let seed = crate::nn_common::seed("training");
            let cpu = losses(&Cpu, 6, seed);
            let cuda = losses(&be, 6, seed);
            eprintln!("cpu {cpu:.6?}\ncuda {cuda:.6?}");
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs(),
                    "step {i}: cpu loss {a} vs cuda {b}"
                );
            }
            assert!(cuda[5] < cuda[0], "the loss did not fall: {cuda:?}");
        }
    }
}

fn learns<B: Backend<f32>>(be: &B) {
    let (net, x, labels, last, first) = train(be, 40, crate::nn_common::seed("training"));
    check_learned(be, net, x, labels, first, last);
}

/// The loss after each of `steps` SGD steps.
fn losses<B: Backend<f32>>(be: &B, steps: usize, seed: u64) -> Vec<f64> {
    let mut out = Vec::new();
    train_with(be, steps, seed, &mut |loss| out.push(loss));
    out
}

fn train<B: Backend<f32>>(
    be: &B,
    steps: usize,
    seed: u64,
) -> (senet::nn::Network<f32>, Tensor<f32>, Vec<usize>, f64, f64) {
    let mut first = None;
    let mut last = 0.0;
    let (net, x, labels) = train_with(be, steps, seed, &mut |loss| {
        first.get_or_insert(loss);
        last = loss;
    });
    (net, x, labels, last, first.unwrap_or(f64::NAN))
}

/// Trains the tiny SE network `steps` SGD steps from weights and data made from `seed`,
/// reporting each step's loss.
fn train_with<B: Backend<f32>>(
    be: &B,
    steps: usize,
    seed: u64,
    report: &mut dyn FnMut(f64),
) -> (senet::nn::Network<f32>, Tensor<f32>, Vec<usize>) {
    let mut cfg = ResNetConfig::cifar(1, 1, (12, 12), 3);
    cfg.channels = vec![4, 8, 8];
    cfg.stem = Stem::Conv3 { width: 4 };
    cfg.block = BlockKind::Basic;
    cfg.se = vec![
        Some(SeBlockConfig {
            reduction: 2,
            divisor: 1,
            ..SeBlockConfig::default()
        });
        3
    ];
    let mut net = cfg.build::<f32>("tiny").unwrap();
    net.init_weights(seed);
    net.set_input_grad(false);

    // Three classes: a bright square in one of three places, plus noise.
    let n = 24;
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let noise = rng::uniform_vec(n * 144, -0.3, 0.3, seed ^ 1);
    let mut x = noise;
    for (i, &l) in labels.iter().enumerate() {
        let (r0, c0) = [(1, 1), (1, 7), (7, 4)][l];
        for r in r0..r0 + 4 {
            for c in c0..c0 + 4 {
                x[i * 144 + r * 12 + c] += 1.0;
            }
        }
    }
    let x = Tensor::from_vec(Shape::new(n, 1, 12, 12), Layout::Nchw, x).unwrap();

    let (lr, momentum, wd) = (0.1f32, 0.9f32, 1e-4f32);
    let mut velocity: Vec<Vec<f32>> = Vec::new();
    for _ in 0..steps {
        let logits = net.forward(be, x.clone(), Mode::Train).unwrap();
        let (loss, dlogits) = cross_entropy(&logits, &labels);
        report(loss);
        net.zero_grad();
        net.backward(be, dlogits).unwrap();
        for (i, (_, p)) in net.parameters_mut().enumerate() {
            if velocity.len() <= i {
                velocity.push(vec![0.0; p.numel()]);
            }
            let v = &mut velocity[i];
            for ((w, g), m) in p.value.iter_mut().zip(&p.grad).zip(v.iter_mut()) {
                *m = momentum * *m + *g + wd * *w;
                *w -= lr * *m;
            }
        }
    }
    (net, x, labels)
}

fn check_learned<B: Backend<f32>>(
    be: &B,
    mut net: senet::nn::Network<f32>,
    x: Tensor<f32>,
    labels: Vec<usize>,
    first: f64,
    last: f64,
) {
    let n = labels.len();
    // Chance is ln 3 = 1.1; 40 steps usually reach below 0.1 (seen up to 0.35).
    assert!(
        last.is_finite() && last < 0.5 * first,
        "loss {first} -> {last}"
    );
    let accuracy = |net: &mut senet::nn::Network<f32>, mode: Mode| {
        let logits = net.forward(be, x.clone(), mode).unwrap();
        labels
            .iter()
            .enumerate()
            .filter(|(i, &l)| {
                let row = &logits.data()[i * 3..(i + 1) * 3];
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(j, _)| j)
                    == Some(l)
            })
            .count()
    };
    // With batch statistics the fit is (nearly) perfect; with running statistics, which lag
    // 40 steps of momentum 0.1, it must still be far above chance (1 in 3).
    let train_correct = accuracy(&mut net, Mode::Train);
    assert!(
        train_correct * 10 >= n * 9,
        "{train_correct} of {n} correct (batch statistics)"
    );
    let eval_correct = accuracy(&mut net, Mode::Infer);
    assert!(
        eval_correct * 3 >= n * 2,
        "{eval_correct} of {n} correct (running statistics)"
    );
    // Backward after an inference forward is an error, not a panic.
    assert!(net
        .backward(
            be,
            Tensor::zeros(Shape::new(n, 3, 1, 1), Layout::Nchw).unwrap()
        )
        .is_err());
}
