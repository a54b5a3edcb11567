//! [`SqueezeExcite`]: an SE `candle_nn::Module` over [`super::se`].

use super::op::{pack_params, se_packed};
use crate::se::{Activation, Gate, SeConfig};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// An SE block as a candle module, running senet's fused op ([`super::se`]) with autograd.
///
/// Parameters are named and shaped as timm's `SEModule` and torchvision's / candle-transformers'
/// `SqueezeExcitation` name them, so their checkpoints load: `fc1.weight [d, C, 1, 1]`,
/// `fc1.bias [d]`, `fc2.weight [C, d, 1, 1]`, `fc2.bias [C]` (biases when `config.bias`).
/// Activation and gate come from the config (ReLU / SiLU, sigmoid / hard-sigmoid).
/// [`Module::forward`] computes `s * x`; [`SqueezeExcite::forward_residual`] the fused
/// `relu(s * x + residual)`.
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    config: SeConfig,
    w1: Tensor,
    b1: Option<Tensor>,
    w2: Tensor,
    b2: Option<Tensor>,
}

impl SqueezeExcite {
    /// Loads (or, with a `VarMap`-backed builder, creates with PyTorch's default init for 1x1
    /// convolutions) the block's parameters under `vb`: `fc1.weight`, `fc1.bias`, `fc2.weight`,
    /// `fc2.bias`, in `vb`'s dtype and device.
    pub fn new(config: SeConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(super::err)?;
        let (c, d) = (config.channels, config.hidden);
        let conv = |vb: VarBuilder, out: usize, inp: usize| -> Result<(Tensor, Option<Tensor>)> {
            // PyTorch's Conv2d default: kaiming_uniform(a = sqrt 5) on the weight, i.e.
            // U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
            let bound = 1.0 / (inp as f64).sqrt();
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let w = vb.get_with_hints((out, inp, 1, 1), "weight", init)?;
            let b = if config.bias {
                Some(vb.get_with_hints(out, "bias", init)?)
            } else {
                None
            };
            Ok((w, b))
        };
        let (w1, b1) = conv(vb.pp("fc1"), d, c)?;
        let (w2, b2) = conv(vb.pp("fc2"), c, d)?;
        Ok(SqueezeExcite {
            config,
            w1,
            b1,
            w2,
            b2,
        })
    }

    /// timm's `SEModule(channels, rd_ratio = 1 / reduction)`: hidden width `channels /
    /// reduction` rounded to a multiple of 8, bias, ReLU, sigmoid; names as [`SqueezeExcite::new`].
    pub fn timm(channels: usize, reduction: usize, vb: VarBuilder) -> Result<Self> {
        let config = SeConfig::with_reduction(channels, reduction).map_err(super::err)?;
        Self::new(config, vb)
    }

    /// The SE block of candle-transformers' (and torchvision's) EfficientNet:
    /// `SqueezeExcitation(in_channels, squeeze_channels)` with `fc1` / `fc2` 1x1 convolutions
    /// with bias, SiLU and sigmoid, loaded from the same names under `vb` (e.g.
    /// `features.1.0.block.1`).
    pub fn efficientnet(
        in_channels: usize,
        squeeze_channels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = SeConfig::with_hidden(in_channels, squeeze_channels)
            .map_err(super::err)?
            .activation(Activation::Silu)
            .gate(Gate::Sigmoid);
        Self::new(config, vb)
    }

    /// The block's configuration.
    pub fn config(&self) -> &SeConfig {
        &self.config
    }

    /// The parameters `(fc1.weight, fc1.bias, fc2.weight, fc2.bias)`.
    pub fn params(&self) -> (&Tensor, Option<&Tensor>, &Tensor, Option<&Tensor>) {
        (&self.w1, self.b1.as_ref(), &self.w2, self.b2.as_ref())
    }

    /// The parameters packed for [`super::se_packed`].
    pub fn packed_params(&self) -> Result<Tensor> {
        pack_params(
            &self.config,
            &self.w1,
            self.b1.as_ref(),
            &self.w2,
            self.b2.as_ref(),
        )
    }

    /// The fused residual epilogue: `relu(s * x + residual)`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        se_packed(x, &self.packed_params()?, Some(residual), &self.config)
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        se_packed(x, &self.packed_params()?, None, &self.config)
    }
}
