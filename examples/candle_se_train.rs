//! A small SE network written in candle, with senet's `SqueezeExcite` as its SE blocks, trained
//! for a few steps on the 10,000 MNIST digits embedded in senet; prints the loss falling.
//!
//! `cargo run --release --features candle --example candle_se_train [steps]`
//!
//! The network: conv 3x3 (1 -> 16) + ReLU, SE (plain), max-pool, conv 3x3 (16 -> 32) + ReLU,
//! conv 3x3 (32 -> 32) with SE's fused residual epilogue `relu(s * x + shortcut)`, global
//! average pool, linear 32 -> 10. AdamW, batch 64, on candle's CPU device.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{
    conv2d, linear, AdamW, Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap,
};
use rand::seq::SliceRandom;
use senet::candle::SqueezeExcite;
use senet::train::data::DataSpec;
use senet::{Activation, SeConfig};

struct Net {
    conv1: Conv2d,
    se1: SqueezeExcite,
    conv2: Conv2d,
    conv3: Conv2d,
    se3: SqueezeExcite,
    fc: Linear,
}

impl Net {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let se_cfg = |c: usize| {
            SeConfig::with_reduction(c, 4)
                .map(|cfg| cfg.activation(Activation::Silu))
                .map_err(candle_core::Error::wrap)
        };
        Ok(Net {
            conv1: conv2d(1, 16, 3, pad, vb.pp("conv1"))?,
            se1: SqueezeExcite::new(se_cfg(16)?, vb.pp("se1"))?,
            conv2: conv2d(16, 32, 3, pad, vb.pp("conv2"))?,
            conv3: conv2d(32, 32, 3, pad, vb.pp("conv3"))?,
            se3: SqueezeExcite::new(se_cfg(32)?, vb.pp("se3"))?,
            fc: linear(32, 10, vb.pp("fc"))?,
        })
    }
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv1.forward(x)?.relu()?;
        let x = self.se1.forward(&x)?.max_pool2d(2)?;
        let shortcut = self.conv2.forward(&x)?.relu()?;
        let x = self.conv3.forward(&shortcut)?;
        let x = self.se3.forward_residual(&x, &shortcut)?;
        let x = x.mean(D::Minus1)?.mean(D::Minus1)?;
        self.fc.forward(&x)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(60), |s| s.parse())?;
    let batch = 64;
    let dev = Device::Cpu;
    let data = DataSpec::Digits.load()?;
    let train = &data.train;
    let (mean, std) = (data.mean[0], data.std[0]);
    println!("{}", train.describe());

    let varmap = VarMap::new();
    let net = Net::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut opt = AdamW::new_lr(varmap.all_vars(), 3e-3)?;

    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut senet::rng::seeded(7));
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let idx = &order[(step * batch) % (order.len() - batch)..][..batch];
        let mut pixels = Vec::with_capacity(batch * 28 * 28);
        let mut labels = Vec::with_capacity(batch);
        for &i in idx {
            let img = train.image(i)?;
            pixels.extend(img.data.iter().map(|&p| (p as f32 / 255.0 - mean) / std));
            labels.push(train.label(i)? as u32);
        }
        let x = Tensor::from_vec(pixels, (batch, 1, 28, 28), &dev)?;
        let y = Tensor::from_vec(labels, batch, &dev)?;
        let loss = candle_nn::loss::cross_entropy(&net.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        losses.push(l);
        if step % 10 == 0 || step + 1 == steps {
            println!("step {step:3}  loss {l:.4}");
        }
    }
    let k = (steps / 5).max(1);
    let first = losses[..k].iter().sum::<f32>() / k as f32;
    let last = losses[steps - k..].iter().sum::<f32>() / k as f32;
    println!("mean loss of the first {k} steps {first:.4}, of the last {k} {last:.4}");
    if last >= first {
        return Err("the loss did not fall".into());
    }
    Ok(())
}
