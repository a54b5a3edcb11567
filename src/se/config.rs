//! The SE block's hyper-parameters.

use crate::error::{Error, Result};
use std::fmt;

/// The excitation's hidden activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)` (the paper's choice).
    Relu,
    /// `x * sigmoid(x)` (SiLU / swish, as in EfficientNet-style SE).
    Silu,
}

/// The gate that turns the excitation into channel weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    /// `1 / (1 + exp(-x))` (the paper's choice).
    Sigmoid,
    /// `relu6(x + 3) / 6` (MobileNetV3's hard-sigmoid).
    HardSigmoid,
}

impl Activation {
    /// Both activations.
    pub const ALL: [Activation; 2] = [Activation::Relu, Activation::Silu];

    /// `act(h)`.
    #[inline(always)]
    pub fn apply(self, h: f64) -> f64 {
        match self {
            Activation::Relu => h.max(0.0),
            Activation::Silu => h * sigmoid(h),
        }
    }

    /// `act'(h)` (ReLU's derivative at 0 is taken as 0, as PyTorch does).
    #[inline(always)]
    pub fn derivative(self, h: f64) -> f64 {
        match self {
            Activation::Relu => {
                if h > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Silu => {
                let s = sigmoid(h);
                s * (1.0 + h * (1.0 - s))
            }
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }
}

impl Gate {
    /// Both gates.
    pub const ALL: [Gate; 2] = [Gate::Sigmoid, Gate::HardSigmoid];

    /// `gate(a)`.
    #[inline(always)]
    pub fn apply(self, a: f64) -> f64 {
        match self {
            Gate::Sigmoid => sigmoid(a),
            Gate::HardSigmoid => (a + 3.0).clamp(0.0, 6.0) / 6.0,
        }
    }

    /// `gate'(a)` (hard-sigmoid's derivative is 1/6 strictly inside (-3, 3), else 0).
    #[inline(always)]
    pub fn derivative(self, a: f64) -> f64 {
        match self {
            Gate::Sigmoid => {
                let s = sigmoid(a);
                s * (1.0 - s)
            }
            Gate::HardSigmoid => {
                if a > -3.0 && a < 3.0 {
                    1.0 / 6.0
                } else {
                    0.0
                }
            }
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Sigmoid => "sigmoid",
            Gate::HardSigmoid => "hardsigmoid",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The logistic function, computed without overflow for large `|x|`.
#[inline(always)]
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// timm's `make_divisible(v, divisor, round_limit=0)`: `v` rounded to the nearest multiple of
/// `divisor`, at least `divisor`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor.max(1) as f64;
    let rounded = ((v + d / 2.0) / d).floor() * d;
    (rounded as usize).max(divisor.max(1))
}

/// An SE block's configuration: channels, hidden width, bias, activation and gate.
///
/// Build with [`SeConfig::with_reduction`] (hidden width from a reduction ratio, rounded as timm
/// rounds it) or [`SeConfig::with_hidden`], then adjust with the `bias`, `activation` and `gate`
/// builders. Every constructor validates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeConfig {
    /// Channels `C` of the feature map.
    pub channels: usize,
    /// Hidden width `d` of the excitation (`C / r`, rounded).
    pub hidden: usize,
    /// Whether both FC layers carry a bias.
    pub bias: bool,
    /// The hidden activation.
    pub activation: Activation,
    /// The gate.
    pub gate: Gate,
}

impl SeConfig {
    /// `channels` with hidden width `channels / reduction` rounded to a multiple of 8 (at least
    /// 8), as timm's `SEModule` does; bias on, ReLU, sigmoid.
    pub fn with_reduction(channels: usize, reduction: usize) -> Result<Self> {
        if reduction == 0 {
            return Err(Error::Config("reduction ratio must be at least 1".into()));
        }
        if channels == 0 {
            return Err(Error::Config("channels must be at least 1".into()));
        }
        let hidden = make_divisible(channels as f64 / reduction as f64, 8);
        Self::with_hidden(channels, hidden)
    }

    /// `channels` with an explicit hidden width; bias on, ReLU, sigmoid.
    pub fn with_hidden(channels: usize, hidden: usize) -> Result<Self> {
        let cfg = SeConfig {
            channels,
            hidden,
            bias: true,
            activation: Activation::Relu,
            gate: Gate::Sigmoid,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sets whether the FC layers have biases.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the hidden activation.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Sets the gate.
    pub fn gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Checks channels and hidden width are non-zero and within the kernels' 32-bit limits.
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(Error::Config("channels must be at least 1".into()));
        }
        if self.hidden == 0 {
            return Err(Error::Config("hidden width must be at least 1".into()));
        }
        if self.channels > (1 << 24) || self.hidden > (1 << 24) {
            return Err(Error::Config(format!(
                "channels {} / hidden {} exceed 2^24",
                self.channels, self.hidden
            )));
        }
        Ok(())
    }

    /// Number of parameters (both FC weights, plus biases when on).
    pub fn num_params(&self) -> usize {
        let w = 2 * self.channels * self.hidden;
        if self.bias {
            w + self.channels + self.hidden
        } else {
            w
        }
    }
}

impl fmt::Display for SeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "C={} d={} {} {} {}",
            self.channels,
            self.hidden,
            if self.bias { "bias" } else { "nobias" },
            self.activation,
            self.gate
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_rounding() {
        // timm SEModule(channels, rd_ratio=1/16, rd_divisor=8): 256 -> 16, 2048 -> 128, 64 -> 8.
        assert_eq!(SeConfig::with_reduction(256, 16).unwrap().hidden, 16);
        assert_eq!(SeConfig::with_reduction(2048, 16).unwrap().hidden, 128);
        assert_eq!(SeConfig::with_reduction(64, 16).unwrap().hidden, 8);
        assert_eq!(SeConfig::with_reduction(17, 4).unwrap().hidden, 8);
        assert_eq!(SeConfig::with_reduction(1000, 2).unwrap().hidden, 504);
    }

    #[test]
    fn invalid_configs_are_errors() {
        assert!(SeConfig::with_reduction(0, 16).is_err());
        assert!(SeConfig::with_reduction(64, 0).is_err());
        assert!(SeConfig::with_hidden(64, 0).is_err());
        assert!(SeConfig::with_hidden(0, 4).is_err());
    }

    #[test]
    fn gates_and_activations() {
        assert!((Gate::Sigmoid.apply(0.0) - 0.5).abs() < 1e-15);
        assert_eq!(Gate::HardSigmoid.apply(-4.0), 0.0);
        assert_eq!(Gate::HardSigmoid.apply(4.0), 1.0);
        assert_eq!(Gate::HardSigmoid.derivative(1.0), 1.0 / 6.0);
        assert_eq!(Gate::HardSigmoid.derivative(3.5), 0.0);
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert!((Activation::Silu.apply(1.0) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        assert!(sigmoid(-1000.0).is_finite() && sigmoid(1000.0) == 1.0);
    }
}
