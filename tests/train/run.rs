//! The training side: the learning-rate schedule, the label-smoothed cross-entropy (value and
//! gradient against a direct f64 formula and finite differences), top-k, SGD against a hand
//! computation, resume that continues bit for bit, a short run whose loss falls, run folders,
//! and the `senet` commands end to end on tiny generated data.

use senet::nn::{Cpu, Mode, Reference, SlotRef};
use senet::tensor::{Layout, Shape, Tensor};
use senet::train::data::{DataKind, DataSplit, InMemory};
use senet::train::loss::{cross_entropy, topk_correct};
use senet::train::metrics::read_csv;
use senet::train::schedule::{Decay, LrSchedule};
use senet::train::trainer::evaluate;
use senet::train::{DataSpec, Device, ModelSpec, Sgd, TrainConfig, Trainer};
use senet::{rel_l2_error, rng, Error};
use std::path::Path;

// ---- schedule ----

#[test]
fn step_schedule_divides_by_ten_every_k_epochs() {
    // The paper: 0.6, divided by 10 every 30 of 100 epochs.
    let s = LrSchedule::paper(0.6, 100);
    s.validate().unwrap();
    let spe = 50;
    let at = |epoch: f64| s.at((epoch * spe as f64).round() as u64, spe);
    assert_eq!(at(0.0), 0.6);
    assert_eq!(at(29.98), 0.6);
    assert!((at(30.0) - 0.06).abs() < 1e-15);
    assert!((at(59.98) - 0.06).abs() < 1e-15);
    assert!((at(60.0) - 0.006).abs() < 1e-15);
    assert!((at(99.98) - 0.0006).abs() < 1e-15);
    // Scaled: 10 epochs decay at 3, 6, 9.
    let s = LrSchedule::paper(0.1, 10);
    assert_eq!(s.at(2 * spe as u64 + 49, spe), 0.1);
    assert!((s.at(3 * spe as u64, spe) - 0.01).abs() < 1e-16);
}

#[test]
fn warm_up_and_cosine() {
    let s = LrSchedule {
        base: 0.4,
        decay: Decay::Cosine,
        warmup: 2.0,
        epochs: 10.0,
    };
    s.validate().unwrap();
    let spe = 10;
    // Linear warm-up over 20 steps: 0.02, 0.04, ..., 0.4.
    assert!((s.at(0, spe) - 0.02).abs() < 1e-12);
    assert!((s.at(9, spe) - 0.2).abs() < 1e-12);
    assert!((s.at(19, spe) - 0.4).abs() < 1e-12);
    // Then half a cosine over the remaining 8 epochs.
    assert!((s.at(20, spe) - 0.4).abs() < 1e-12);
    assert!((s.at(60, spe) - 0.2).abs() < 1e-12);
    assert!(s.at(99, spe) < 0.4 * 1e-3);
    let mut prev = f64::INFINITY;
    for step in 20..100 {
        let lr = s.at(step, spe);
        assert!(lr <= prev, "cosine decreases");
        prev = lr;
    }
    // Warm-up into a step decay.
    let w = LrSchedule {
        warmup: 1.0,
        ..LrSchedule::paper(0.1, 10)
    };
    assert!((w.at(4, 10) - 0.05).abs() < 1e-12);
    assert_eq!(w.at(10, 10), 0.1);
    for bad in [
        LrSchedule { base: 0.0, ..s },
        LrSchedule { warmup: 10.0, ..s },
        LrSchedule {
            decay: Decay::Step {
                every: 0.0,
                gamma: 0.1,
            },
            ..s
        },
        LrSchedule {
            base: f64::NAN,
            ..s
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

// ---- loss ----

/// The loss straight from its definition: -sum_j q_j log p_j, in f64.
fn direct_loss(z: &[f32], labels: &[usize], k: usize, eps: f64) -> f64 {
    let mut total = 0.0;
    for (i, &y) in labels.iter().enumerate() {
        let row: Vec<f64> = z[i * k..(i + 1) * k].iter().map(|&v| v as f64).collect();
        let denom: f64 = row.iter().map(|v| v.exp()).sum();
        for (j, v) in row.iter().enumerate() {
            let q = eps / k as f64 + if j == y { 1.0 - eps } else { 0.0 };
            total -= q * (v.exp() / denom).ln();
        }
    }
    total / labels.len() as f64
}

#[test]
fn label_smoothed_cross_entropy_value_and_gradient() {
    let seed = rng::fresh_seed();
    println!("seed {seed}");
    let (n, k) = (5, 7);
    let z: Vec<f32> = rng::uniform_vec(n * k, -3.0, 3.0, seed);
    let labels: Vec<usize> = (0..n).map(|i| (i * 3 + seed as usize) % k).collect();
    let logits = Tensor::from_vec(Shape::new(n, k, 1, 1), Layout::Nchw, z.clone()).unwrap();
    for eps in [0.0, 0.1, 0.5] {
        let out = cross_entropy(&logits, &labels, eps).unwrap();
        let want = direct_loss(&z, &labels, k, eps);
        assert!(
            (out.loss - want).abs() < 1e-12 * want.abs().max(1.0),
            "eps {eps}: {} vs {want}",
            out.loss
        );
        // Central finite differences on the f32 logits (the denominator is the actual f32
        // step, so rounding of z +- h does not bias the slope).
        let h = 1e-3f32;
        let mut fd = vec![0f64; n * k];
        for (idx, d) in fd.iter_mut().enumerate() {
            let (mut up, mut down) = (z.clone(), z.clone());
            up[idx] += h;
            down[idx] -= h;
            let step = up[idx] as f64 - down[idx] as f64;
            *d = (direct_loss(&up, &labels, k, eps) - direct_loss(&down, &labels, k, eps)) / step;
        }
        let g: Vec<f64> = out.grad.data().iter().map(|&v| v as f64).collect();
        let err = rel_l2_error(&g, &fd);
        assert!(err < 1e-5, "eps {eps}: gradient error {err:.2e}");
        // Each row of (softmax - q) / N sums to zero.
        for i in 0..n {
            let s: f64 = g[i * k..(i + 1) * k].iter().sum();
            assert!(s.abs() < 1e-7, "row {i} sums to {s}");
        }
    }
    // Zero logits: ln K whatever the smoothing; huge logits stay finite.
    let zeros = Tensor::zeros(Shape::new(2, 4, 1, 1), Layout::Nchw).unwrap();
    for eps in [0.0, 0.3] {
        let l = cross_entropy(&zeros, &[1, 3], eps).unwrap().loss;
        assert!((l - 4f64.ln()).abs() < 1e-12);
    }
    let big = Tensor::from_vec(Shape::new(1, 3, 1, 1), Layout::Nchw, vec![1e4, -1e4, 0.0]).unwrap();
    let out = cross_entropy(&big, &[1], 0.1).unwrap();
    assert!(out.loss.is_finite() && out.grad.data().iter().all(|v| v.is_finite()));
    assert!((out.loss - direct_stable(&[1e4, -1e4, 0.0], 1, 0.1)).abs() < 1e-9);
    // Bad inputs are errors.
    assert!(cross_entropy(&logits, &labels[..4], 0.1).is_err());
    assert!(cross_entropy(&logits, &[7, 0, 0, 0, 0], 0.1).is_err());
    assert!(cross_entropy(&logits, &labels, 1.0).is_err());
    let spatial = Tensor::<f32>::zeros(Shape::new(1, 2, 2, 1), Layout::Nchw).unwrap();
    assert!(cross_entropy(&spatial, &[0], 0.0).is_err());
}

/// `logsumexp(z) - sum q z` for one row, computed with the max shifted out.
fn direct_stable(z: &[f64], y: usize, eps: f64) -> f64 {
    let k = z.len() as f64;
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    let qz: f64 = z
        .iter()
        .enumerate()
        .map(|(j, v)| (eps / k + if j == y { 1.0 - eps } else { 0.0 }) * v)
        .sum();
    lse - qz
}

#[test]
fn top_k_counts_ranks() {
    let z = vec![
        0.1, 0.5, 0.2, 0.9, // ranks: 3 > 1 > 2 > 0
        1.0, 1.0, 0.0, -1.0, // tie between 0 and 1
    ];
    let l = Tensor::from_vec(Shape::new(2, 4, 1, 1), Layout::Nchw, z).unwrap();
    assert_eq!(topk_correct(&l, &[3, 0], 1).unwrap(), 2);
    assert_eq!(topk_correct(&l, &[1, 1], 1).unwrap(), 0);
    assert_eq!(topk_correct(&l, &[1, 1], 2).unwrap(), 2);
    assert_eq!(topk_correct(&l, &[2, 2], 2).unwrap(), 0);
    assert_eq!(topk_correct(&l, &[2, 2], 3).unwrap(), 2);
    assert_eq!(topk_correct(&l, &[0, 3], 4).unwrap(), 2);
}

// ---- optimiser ----

fn tiny_model(se: bool) -> ModelSpec {
    ModelSpec {
        blocks: Some(1),
        width: Some(4),
        ..ModelSpec::named(if se {
            "seresnet20_mnist"
        } else {
            "resnet20_mnist"
        })
    }
}

#[test]
fn sgd_follows_pytorch_rule() {
    let mut net = tiny_model(false).build(1, 3, 8).unwrap();
    net.init_weights(1);
    let w0: Vec<Vec<f32>> = net.parameters().map(|(_, p)| p.value.clone()).collect();
    let mut opt = Sgd::new(0.9, 0.01).unwrap();
    let grads = |s: u64| -> Vec<Vec<f32>> {
        w0.iter()
            .enumerate()
            .map(|(i, w)| rng::uniform_vec(w.len(), -1.0, 1.0, s * 1000 + i as u64))
            .collect()
    };
    let (g1, g2) = (grads(1), grads(2));
    for (lr, g) in [(0.1f32, &g1), (0.05, &g2)] {
        for ((_, p), gi) in net.parameters_mut().zip(g.iter()) {
            p.grad = gi.clone();
        }
        opt.step(&mut net, lr).unwrap();
    }
    for (((name, p), w), (a, b)) in net.parameters().zip(&w0).zip(g1.iter().zip(&g2)) {
        for i in 0..w.len() {
            // Step 1: buf = g1 + wd w0; w1 = w0 - 0.1 buf.
            let buf1 = a[i] + 0.01 * w[i];
            let w1 = w[i] - 0.1 * buf1;
            // Step 2: buf = 0.9 buf + g2 + wd w1; w2 = w1 - 0.05 buf.
            let buf2 = 0.9 * buf1 + (b[i] + 0.01 * w1);
            let w2 = w1 - 0.05 * buf2;
            assert!(
                (p.value[i] - w2).abs() <= 1e-6 * (1.0 + w2.abs()),
                "{name}[{i}]"
            );
            assert!((opt.buffers()[&name][i] - buf2).abs() <= 1e-6 * (1.0 + buf2.abs()));
        }
    }
    // Buffers round-trip exactly; a buffer for a parameter the network lacks is an error.
    let bytes = opt.to_safetensors_bytes().unwrap();
    let mut back = Sgd::new(0.9, 0.01).unwrap();
    back.load_safetensors_bytes(&bytes, &net).unwrap();
    assert_eq!(back, opt);
    let wide = ModelSpec {
        width: Some(8),
        ..tiny_model(false)
    }
    .build(1, 3, 8)
    .unwrap();
    assert!(back.load_safetensors_bytes(&bytes, &wide).is_err());
    assert_eq!(back, opt, "a failed load leaves the optimiser unchanged");
    assert!(back.load_safetensors_bytes(b"junk", &net).is_err());
    assert!(Sgd::new(1.5, 0.0).is_err() && Sgd::new(0.9, -1.0).is_err());
}

// ---- synthetic data: three classes, a bright square in one of three places ----

fn squares(n: usize, size: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let noise = rng::uniform_vec(n * size * size, 0.0, 80.0, seed);
    let mut px: Vec<u8> = noise.into_iter().map(|v| v as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
    let s = size / 3;
    for (i, &l) in labels.iter().enumerate() {
        let (r0, c0) = [(0, 0), (0, 2 * s), (2 * s, s)][l as usize];
        for r in r0..r0 + s {
            for c in c0..c0 + s {
                px[i * size * size + r * size + c] = 230;
            }
        }
    }
    (px, labels)
}

fn squares_split(train: usize, test: usize, size: usize) -> DataSplit {
    let set = |n, seed, name| {
        let (px, l) = squares(n, size, seed);
        InMemory::new(
            name,
            (1, size, size),
            3,
            px,
            l.into_iter().map(u16::from).collect(),
        )
        .unwrap()
    };
    DataSplit::in_memory(
        set(train, 1, "train"),
        set(test, 2, "test"),
        DataKind::Digits,
    )
    .unwrap()
}

fn idx_file(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// The squares as MNIST-style IDX files in `dir`.
fn write_squares_idx(dir: &Path, train: usize, test: usize, size: usize) {
    for (prefix, n, seed) in [("train", train, 1), ("t10k", test, 2)] {
        let (px, l) = squares(n, size, seed);
        let s = size as u32;
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            idx_file(&[n as u32, s, s], &px),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            idx_file(&[n as u32], &l),
        )
        .unwrap();
    }
}

fn tiny_config(data: DataSpec, split: &DataSplit, epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::paper(tiny_model(true), data, split, epochs, 8);
    c.schedule.base = 0.1;
    c.eval_batch_size = 16;
    c.seed = 5;
    c
}

/// Every state entry (parameters, buffers, counters) by name, as bits.
fn state_bits(t: &Trainer<impl senet::nn::Backend<f32>>) -> Vec<(String, Vec<u64>)> {
    let mut out = Vec::new();
    t.net().visit_state(&mut |name, slot| {
        let bits = match slot {
            SlotRef::Param(p) | SlotRef::Buffer(p) => {
                p.value.iter().map(|v| v.to_bits() as u64).collect()
            }
            SlotRef::Counter(c) => vec![c as u64],
        };
        out.push((name, bits));
    });
    out
}

fn same_training<B: senet::nn::Backend<f32>>(a: &Trainer<B>, b: &Trainer<B>) {
    assert_eq!(state_bits(a), state_bits(b), "network state differs");
    assert_eq!(a.optimizer(), b.optimizer(), "momentum buffers differ");
    let (sa, sb) = (a.state(), b.state());
    assert_eq!(
        (sa.epoch, sa.step_in_epoch, sa.global_step, sa.best),
        (sb.epoch, sb.step_in_epoch, sb.global_step, sb.best)
    );
    assert_eq!(sa.history.len(), sb.history.len());
    for (x, y) in sa.history.iter().zip(&sb.history) {
        // Everything but the clock.
        assert_eq!(
            (x.epoch, x.lr, x.train_loss, x.train_top1, x.train_top5),
            (y.epoch, y.lr, y.train_loss, y.train_top1, y.train_top5)
        );
        assert_eq!(
            (x.test_loss, x.test_top1, x.test_top5),
            (y.test_loss, y.test_top1, y.test_top5)
        );
    }
}

/// Train 2 epochs of 6 steps straight through, and again stopping after `stop` steps, saving,
/// and resuming from the folder (config, data, weights, momentum, state); compare bit for bit.
fn resume_case<B: senet::nn::Backend<f32> + Clone>(backend: B, stop: usize) {
    resume_case_on(backend, Device::Cpu, stop, 6)
}

/// As [`resume_case`], on `device`, with `per_epoch` steps of 8 samples per epoch.
fn resume_case_on<B: senet::nn::Backend<f32> + Clone>(
    backend: B,
    device: Device,
    stop: usize,
    per_epoch: usize,
) {
    let data_dir = tempfile::tempdir().unwrap();
    write_squares_idx(data_dir.path(), 8 * per_epoch, 12, 9);
    let spec = DataSpec::Idx(data_dir.path().to_path_buf());
    let split = spec.load().unwrap();
    let mut config = tiny_config(spec, &split, 2);
    config.device = device;

    let mut straight = Trainer::new(backend.clone(), config.clone(), &split).unwrap();
    assert_eq!(straight.steps_per_epoch(), per_epoch);
    straight.fit(None, &mut ()).unwrap();
    assert_eq!(straight.state().global_step, 2 * per_epoch as u64);

    let run = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(backend.clone(), config.clone(), &split).unwrap();
    config.save(run.path()).unwrap();
    let mut left = stop;
    while left > 0 {
        left -= first.train_steps(Some(left), &mut ()).unwrap();
        if first.state().step_in_epoch == first.steps_per_epoch() {
            first.finish_epoch(&mut ()).unwrap();
        }
    }
    first.save_checkpoint(run.path()).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(backend, run.path(), None).unwrap();
    assert_eq!(resumed.state().global_step, stop as u64);
    resumed.fit(Some(run.path()), &mut ()).unwrap();
    same_training(&straight, &resumed);
}

#[test]
fn resume_continues_bit_for_bit_mid_epoch() {
    resume_case(Reference, 4);
}

#[test]
fn resume_continues_bit_for_bit_at_an_epoch_boundary() {
    resume_case(Reference, 6);
}

#[test]
fn resume_on_the_fast_cpu_backend_with_one_thread() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| resume_case(Cpu, 9));
}

/// The CUDA backend sums in a fixed order everywhere, so a resumed run matches too (on the
/// kernel emulator here; on a GPU as well when one is present).
#[test]
fn resume_on_the_cuda_backend() {
    for be in crate::nn_common::cuda_backends_announced() {
        let device = if be.device().is_emulator() {
            Device::CudaEmu
        } else {
            Device::Cuda
        };
        // Three steps an epoch: the emulator is slow; stopping at 2 is mid-epoch.
        resume_case_on(be, device, 2, 3);
    }
}

#[test]
fn a_short_run_learns_and_leaves_a_run_folder() {
    let split = squares_split(96, 30, 12);
    let mut c = TrainConfig::paper(tiny_model(true), DataSpec::Digits, &split, 4, 8);
    c.schedule = LrSchedule {
        base: 0.1,
        decay: Decay::Cosine,
        warmup: 0.5,
        epochs: 4.0,
    };
    c.label_smoothing = 0.0;
    c.eval_batch_size = 16;
    c.seed = 11;
    let mut t = Trainer::new(Cpu, c, &split).unwrap();
    let before = t.evaluate(&mut ()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    t.fit(Some(dir.path()), &mut ()).unwrap();
    let h = &t.state().history;
    assert_eq!(h.len(), 4);
    println!("before: {before:?}\nafter: {h:#?}");
    // Untrained: about ln 3 = 1.10 and 1/3 right; the squares are easy.
    let last = &h[3];
    assert!(
        last.train_loss < 0.3 * before.loss && last.train_loss < h[0].train_loss,
        "training loss {} (untrained {}) -> {}",
        h[0].train_loss,
        before.loss,
        last.train_loss
    );
    assert!(
        last.test_loss < 0.3 * before.loss,
        "test loss {} -> {}",
        before.loss,
        last.test_loss
    );
    assert!(last.test_top1 >= 0.9, "test top-1 {}", last.test_top1);
    // The folder: config, metrics, curves, checkpoints that load and evaluate the same.
    let d = dir.path();
    assert_eq!(TrainConfig::load(d).unwrap(), *t.config());
    let rows = read_csv(&d.join("metrics.csv")).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3].test_top1, last.test_top1);
    let png = image::open(d.join("curves.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    let mut net = t.config().model.build(1, 3, 12).unwrap();
    net.load_safetensors(d.join("model.safetensors")).unwrap();
    let again = evaluate(
        &Cpu,
        &mut net,
        t.test_set().clone(),
        &t.config().augment,
        16,
        0.0,
        1,
        &mut (),
    )
    .unwrap();
    assert_eq!(again.top1, last.test_top1);
    let (best, epoch) = t.state().best;
    net.load_safetensors(d.join("best.safetensors")).unwrap();
    let b = evaluate(
        &Cpu,
        &mut net,
        t.test_set().clone(),
        &t.config().augment,
        16,
        0.0,
        1,
        &mut (),
    )
    .unwrap();
    assert_eq!(b.top1, best);
    assert_eq!(h[epoch - 1].test_top1, best);
    // Logits in inference mode are finite.
    let x = Tensor::<f32>::random(Shape::new(2, 1, 12, 12), Layout::Nchw, 1).unwrap();
    assert!(net
        .forward(&Cpu, x, Mode::Infer)
        .unwrap()
        .data()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn bad_configs_are_errors() {
    let split = squares_split(16, 6, 9);
    let ok = tiny_config(DataSpec::Digits, &split, 1);
    assert!(Trainer::new(Cpu, ok.clone(), &split).is_ok());
    let cuda = Trainer::new(
        Cpu,
        TrainConfig {
            device: Device::Cuda,
            ..ok.clone()
        },
        &split,
    );
    // The config names the device the backend must be.
    match cuda {
        Err(e @ Error::Config(_)) => assert!(e.to_string().contains("--device cuda"), "{e}"),
        other => panic!("expected a device mismatch, got {:?}", other.err()),
    }
    // And the precision its activations must have.
    let bf16 = Trainer::new(
        Cpu,
        TrainConfig {
            precision: senet::train::Precision::Bf16,
            ..ok.clone()
        },
        &split,
    );
    match bf16 {
        Err(e @ Error::Config(_)) => assert!(e.to_string().contains("bf16"), "{e}"),
        other => panic!("expected a precision mismatch, got {:?}", other.err()),
    }
    for bad in [
        TrainConfig {
            batch_size: 17,
            ..ok.clone()
        },
        TrainConfig {
            label_smoothing: 1.0,
            ..ok.clone()
        },
        TrainConfig {
            model: ModelSpec::named("nonesuch"),
            ..ok.clone()
        },
        TrainConfig {
            model: ModelSpec {
                blocks: Some(0),
                ..tiny_model(true)
            },
            ..ok.clone()
        },
        TrainConfig {
            epochs: 0,
            ..ok.clone()
        },
    ] {
        assert!(Trainer::new(Cpu, bad.clone(), &split).is_err(), "{bad:?}");
    }
    // A checkpoint of another model does not load, and leaves the trainer as it was.
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(Cpu, ok.clone(), &split).unwrap();
    t.train_steps(Some(1), &mut ()).unwrap();
    t.save_checkpoint(dir.path()).unwrap();
    let mut plain = Trainer::new(
        Cpu,
        TrainConfig {
            model: tiny_model(false),
            ..ok
        },
        &split,
    )
    .unwrap();
    let before = state_bits(&plain);
    assert!(plain.load_checkpoint(dir.path()).is_err());
    assert_eq!(state_bits(&plain), before);
    assert_eq!(plain.state().global_step, 0);
}

// ---- the command-line tool ----

fn senet(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_senet"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn senet_train_eval_plot_and_ablate_commands() {
    let data = tempfile::tempdir().unwrap();
    write_squares_idx(data.path(), 64, 16, 9);
    let spec = format!("idx:{}", data.path().display());
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("se");
    let run_s = run.display().to_string();
    let tiny = [
        "--data",
        &spec,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--blocks",
        "1",
        "--width",
        "4",
        "--lr",
        "0.1",
        "--quiet",
    ];
    let (ok, text) = senet(&[&["train", "--run-dir", &run_s][..], &tiny[..]].concat());
    assert!(ok, "{text}");
    assert!(
        text.contains("epoch   2") && text.contains("done: test top-1"),
        "{text}"
    );
    for f in [
        "config.json",
        "metrics.csv",
        "curves.png",
        "model.safetensors",
        "state.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // The same folder again is refused; --resume of a finished run trains nothing more, and
    // --epochs extends it.
    let (ok, text) = senet(&[&["train", "--run-dir", &run_s][..], &tiny[..]].concat());
    assert!(!ok && text.contains("--resume"), "{text}");
    let (ok, text) = senet(&["train", "--resume", &run_s, "--epochs", "3", "--quiet"]);
    assert!(ok && text.contains("epoch   3"), "{text}");
    assert_eq!(read_csv(&run.join("metrics.csv")).unwrap().len(), 3);

    let (ok, text) = senet(&["eval", &run_s]);
    assert!(
        ok && text.contains("top-1") && text.contains("over 16 images"),
        "{text}"
    );
    let ckpt = run.join("best.safetensors").display().to_string();
    let (ok, text) = senet(&[
        "eval",
        &ckpt,
        "--model",
        "seresnet20_mnist",
        "--data",
        &spec,
    ]);
    // A bare checkpoint of a resized model needs the run's shape: a clear error, no panic.
    assert!(!ok && text.contains("error"), "{text}");

    let plain = runs.path().join("plain").display().to_string();
    let (ok, text) = senet(
        &[
            &["train", "--model", "resnet20_mnist", "--run-dir", &plain][..],
            &tiny[..],
        ]
        .concat(),
    );
    assert!(ok, "{text}");
    let png = runs.path().join("both.png").display().to_string();
    let (ok, text) = senet(&["plot", &run_s, &plain, "-o", &png]);
    assert!(ok, "{text}");
    assert!(image::open(&png).is_ok());

    // Without a GPU, --device cuda is a clear error (with one it would train).
    if senet::cuda::CudaDevice::new(0).is_err() {
        let (ok, text) = senet(&["train", "--device", "cuda", "--data", &spec]);
        assert!(!ok && text.contains("CUDA"), "{text}");
    }

    let abl = runs.path().join("abl").display().to_string();
    let (ok, text) = senet(&[
        "ablate",
        "--data",
        &spec,
        "--groups",
        "se,integration",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--blocks",
        "1",
        "--width",
        "4",
        "--quiet",
        "--out",
        &abl,
    ]);
    assert!(ok, "{text}");
    let table = std::fs::read_to_string(runs.path().join("abl/ablation.md")).unwrap();
    for row in [
        "| no SE |",
        "| SE r=4 standard |",
        "| pre |",
        "| post |",
        "| identity |",
    ] {
        assert!(table.contains(row), "{row} missing from\n{table}");
    }
    assert!(image::open(runs.path().join("abl/ablation.png")).is_ok());
    let (ok, text) = senet(&["ablate", "--groups", "nonsense"]);
    assert!(!ok && text.contains("unknown ablation"), "{text}");
}

/// `senet train`, `eval` and `net-bench` on the CUDA backend, through the kernel emulator: the
/// GPU code path end to end from the command line.
#[test]
fn senet_commands_on_the_cuda_emulator() {
    if senet::cuda::CudaDevice::emulator().is_err() {
        eprintln!("skipped: this build has no kernel emulator");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    write_squares_idx(data.path(), 32, 16, 9);
    let spec = format!("idx:{}", data.path().display());
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("emu");
    let run_s = run.display().to_string();
    let (ok, text) = senet(&[
        "train",
        "--device",
        "cuda-emu",
        "--data",
        &spec,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--blocks",
        "1",
        "--width",
        "4",
        "--quiet",
        "--run-dir",
        &run_s,
    ]);
    assert!(
        ok && text.contains("senet CPU emulator")
            && text.contains("senet's own f32 convolution kernels")
            && text.contains("done: test top-1"),
        "{text}"
    );
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("cuda-emu"), "{config}");
    let (ok, text) = senet(&["eval", &run_s, "--device", "cuda-emu"]);
    assert!(ok && text.contains("senet CPU emulator"), "{text}");
    let csv = runs.path().join("net-bench.csv");
    let (ok, text) = senet(&[
        "net-bench",
        "--device",
        "cuda-emu",
        "--model",
        "seresnet20_cifar",
        "--batch",
        "2",
        "--size",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--csv",
        &csv.display().to_string(),
    ]);
    assert!(ok, "{text}");
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");
    assert!(
        rows.lines().skip(1).all(|l| l.contains("cuda-emu")),
        "{rows}"
    );

    // Mixed precision from the command line: the run's config records it, eval and net-bench
    // take it, and the CPU refuses it with a clear error.
    let run16 = runs.path().join("emu-bf16");
    let run16_s = run16.display().to_string();
    let (ok, text) = senet(&[
        "train",
        "--device",
        "cuda-emu",
        "--precision",
        "bf16",
        "--layout",
        "nhwc",
        "--data",
        &spec,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--blocks",
        "1",
        "--width",
        "4",
        "--quiet",
        "--run-dir",
        &run16_s,
    ]);
    assert!(
        ok && text.contains("bf16 activations (NHWC)") && text.contains("done: test top-1"),
        "{text}"
    );
    let config = std::fs::read_to_string(run16.join("config.json")).unwrap();
    assert!(config.contains("\"precision\": \"bf16\""), "{config}");
    let (ok, text) = senet(&[
        "eval",
        &run16_s,
        "--device",
        "cuda-emu",
        "--precision",
        "bf16",
    ]);
    // Trained NHWC, evaluated NCHW: the layout is the device's business, not the model's.
    assert!(ok && text.contains("bf16 activations (NCHW)"), "{text}");
    let csv16 = runs.path().join("net-bench-bf16.csv");
    let (ok, text) = senet(&[
        "net-bench",
        "--device",
        "cuda-emu",
        "--precision",
        "bf16",
        "--layout",
        "nhwc",
        "--model",
        "seresnet20_cifar",
        "--batch",
        "2",
        "--size",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--modes",
        "infer",
        "--csv",
        &csv16.display().to_string(),
    ]);
    assert!(ok, "{text}");
    let rows = std::fs::read_to_string(&csv16).unwrap();
    assert!(
        rows.lines().skip(1).all(|l| l.contains(",bf16,nhwc,")),
        "{rows}"
    );
    // f16: a training step with loss scaling through the command line.
    let (ok, text) = senet(&[
        "net-bench",
        "--device",
        "cuda-emu",
        "--precision",
        "f16",
        "--model",
        "seresnet20_cifar",
        "--batch",
        "2",
        "--size",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--modes",
        "train",
    ]);
    assert!(
        ok && text.contains("f16 activations") && text.contains("| f16 | nchw | 2 | train |"),
        "{text}"
    );
    let (ok, text) = senet(&["net-bench", "--device", "cpu", "--precision", "bf16"]);
    assert!(
        !ok && text.contains("bf16 activations need the CUDA backend"),
        "{text}"
    );
    let (ok, text) = senet(&["train", "--device", "cpu", "--layout", "nhwc"]);
    assert!(
        !ok && text.contains("nhwc activations need the CUDA backend"),
        "{text}"
    );
}

/// An f16 run that overflows at any scale (the stem's weights scaled by 1e6, so its outputs
/// pass f16's 65504): the loss scaler skips each step, halving its scale, and the run stops
/// with an error naming bf16 once the scale is below 1; no parameter was updated before that.
#[test]
fn an_f16_run_that_overflows_at_any_scale_stops_clearly() {
    let Ok(dev) = senet::cuda::CudaDevice::emulator() else {
        eprintln!("skipped: this build has no kernel emulator");
        return;
    };
    let be = senet::nn::Cuda::<half::f16>::open(dev, senet::nn::ConvChoice::Auto).unwrap();
    // Batches of 4: the overflow does not depend on the batch, the emulator's time does.
    let split = squares_split(4 * 20, 8, 12);
    let mut c = tiny_config(DataSpec::Digits, &split, 1);
    c.device = Device::CudaEmu;
    c.precision = senet::train::Precision::F16;
    c.batch_size = 4;
    let mut t = Trainer::new(be, c, &split).unwrap();
    assert_eq!(t.state().scaler.as_ref().map(|s| s.scale()), Some(65536.0));
    // The stem convolution's outputs reach about 1e6: past f16's 65504.
    for (name, p) in t.net_mut().parameters_mut() {
        if name.starts_with("conv1") {
            p.value.iter_mut().for_each(|v| *v *= 1e6);
        }
    }
    let params = |t: &Trainer<_>| -> Vec<Vec<f32>> {
        t.net().parameters().map(|(_, p)| p.value.clone()).collect()
    };
    let before = params(&t);
    let e = t.train_steps(Some(19), &mut ()).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
    let sc = t.state().scaler.clone().unwrap();
    assert!(sc.scale() < 1.0, "scale {}", sc.scale());
    assert_eq!(sc.skipped(), 17, "65536 halved 17 times is below 1");
    // Parameters and momentum are untouched (the forwards did move BatchNorm's running
    // statistics, as PyTorch's skipped steps do).
    assert!(params(&t) == before, "a skipped step changed a parameter");
    assert!(
        t.optimizer().buffers().is_empty(),
        "a skipped step made momentum"
    );
}

/// A size no machine has is an error naming the bytes, not an abort: the process exits with
/// the tool's error status (not a signal) and says "out of memory".
#[test]
fn a_tensor_too_large_for_memory_is_an_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_senet"))
        .args([
            "bench",
            "--shapes",
            "1x1x100000x100000",
            "--dtypes",
            "f32",
            "--layouts",
            "nchw",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("out of memory") && text.contains("40000000000"),
        "{text}"
    );
    // And in the library: a tensor of 2^40 elements is OutOfMemory with its byte count.
    let huge = senet::Shape::new(1 << 20, 1 << 10, 32, 32);
    match senet::Tensor::<f32>::zeros(huge, senet::Layout::Nchw) {
        Err(senet::Error::OutOfMemory { bytes, .. }) => assert_eq!(bytes, 1 << 42),
        other => panic!("{:?}", other.map(|t| t.shape())),
    }
}
