//! Times an SE network's inference forward on the fast CPU backend (f32, NCHW).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example seresnet50_cpu -- [--model seresnet50]
//!     [--batch 1] [--size 224] [--warmup 3] [--iters 20] [--train] [--export DIR]
//! ```
//! `--train` times a training step instead: forward in train mode plus backward.
//! `--export DIR` also writes `DIR/weights.safetensors` (timm names) and `DIR/io.safetensors`
//! (`input`, `logits`), so a script can load the weights into timm and compare;
//! `--random-bn` randomizes BatchNorm scales and statistics first (timm's initialisation zeroes
//! each branch's last BN scale, which would hide the branches from such a comparison).

use safetensors::tensor::{Dtype, TensorView};
use senet::nn::{models, Cpu, Mode, Slot};
use senet::{Layout, Shape, Tensor};
use std::time::Instant;

fn main() -> senet::Result<()> {
    let mut model = "seresnet50".to_string();
    let (mut batch, mut size, mut warmup, mut iters) = (1usize, 224usize, 3usize, 20usize);
    let mut export: Option<String> = None;
    let mut random_bn = false;
    let mut train = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| senet::Error::Config(format!("{a} needs a value")))
        };
        match a.as_str() {
            "--model" => model = val()?,
            "--batch" => batch = parse(&val()?)?,
            "--size" => size = parse(&val()?)?,
            "--warmup" => warmup = parse(&val()?)?,
            "--iters" => iters = parse(&val()?)?,
            "--export" => export = Some(val()?),
            "--random-bn" => random_bn = true,
            "--train" => train = true,
            other => return Err(senet::Error::Config(format!("unknown argument {other}"))),
        }
    }
    let mut net = models::create::<f32>(&model, 0)?;
    if random_bn {
        let mut k = 0u64;
        net.visit_state_mut(&mut |name, slot| {
            k += 1;
            let (p, lo, hi) = match slot {
                // BatchNorm scales are the only 1-d weights.
                Slot::Param(p) if p.shape().len() == 1 && name.ends_with("weight") => (p, 0.5, 1.5),
                Slot::Buffer(p) if name.ends_with("running_var") => (p, 0.5, 1.5),
                Slot::Buffer(p) => (p, -0.1, 0.1),
                _ => return,
            };
            let v = senet::rng::uniform_vec(p.numel(), lo, hi, k);
            p.set(v).expect("same length");
        });
    }
    let c = net.input_size().0;
    let x = Tensor::<f32>::random(Shape::try_new(batch, c, size, size)?, Layout::Nchw, 1)?;
    let mut times = Vec::with_capacity(iters);
    let mut logits = None;
    for i in 0..warmup + iters {
        let t = Instant::now();
        let y = if train {
            let y = net.forward(&Cpu, x.clone(), Mode::Train)?;
            let dy = Tensor::random(y.shape(), Layout::Nchw, 2)?;
            net.backward(&Cpu, dy)?;
            y
        } else {
            net.forward(&Cpu, x.clone(), Mode::Infer)?
        };
        let dt = t.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            times.push(dt);
        }
        logits = Some(y);
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let min = times.first().copied().unwrap_or(f64::NAN);
    println!(
        "senet {model} {} batch {batch} {size}x{size} f32 cpu threads {}: median {median:.2} ms, min {min:.2} ms over {iters} runs",
        if train { "train step" } else { "forward" },
        rayon::current_num_threads()
    );
    if let (Some(dir), Some(y)) = (export, logits) {
        std::fs::create_dir_all(&dir).map_err(senet::Error::io(dir.clone()))?;
        net.save_safetensors(format!("{dir}/weights.safetensors"))?;
        let bytes = |t: &Tensor<f32>| -> Vec<u8> {
            t.data().iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        let (xb, yb) = (bytes(&x), bytes(&y));
        let xs = x.shape();
        let views = vec![
            (
                "input",
                TensorView::new(Dtype::F32, vec![xs.n, xs.c, xs.h, xs.w], &xb),
            ),
            (
                "logits",
                TensorView::new(Dtype::F32, vec![xs.n, y.shape().c], &yb),
            ),
        ];
        let views: Vec<(&str, TensorView<'_>)> = views
            .into_iter()
            .map(|(n, v)| v.map(|v| (n, v)))
            .collect::<Result<_, _>>()
            .map_err(|e| senet::Error::Format(e.to_string()))?;
        let out =
            safetensors::serialize(views, None).map_err(|e| senet::Error::Format(e.to_string()))?;
        std::fs::write(format!("{dir}/io.safetensors"), out)
            .map_err(senet::Error::io(format!("{dir}/io.safetensors")))?;
        println!("wrote {dir}/weights.safetensors and {dir}/io.safetensors");
    }
    Ok(())
}

fn parse(s: &str) -> senet::Result<usize> {
    s.parse()
        .map_err(|_| senet::Error::Config(format!("not a number: {s}")))
}
