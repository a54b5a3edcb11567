//! SE weights in PyTorch's layout.

use super::config::SeConfig;
use crate::error::{Error, Result};
use crate::rng;

/// How to initialise SE weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// PyTorch's default for `nn.Conv2d` / `nn.Linear`: weights and biases uniform in
    /// `[-1/sqrt(fan_in), 1/sqrt(fan_in))` (kaiming_uniform with `a = sqrt(5)`).
    PyTorchDefault,
    /// Kaiming normal, `fan_out`, ReLU gain (timm's ResNet init): weights `N(0, 2/fan_out)`,
    /// biases zero.
    KaimingNormal,
}

/// The excitation's parameters, in PyTorch's layout so checkpoints map one to one:
/// `w1` is `[hidden, channels]` (out, in), `w2` is `[channels, hidden]`; biases are optional.
#[derive(Clone, Debug, PartialEq)]
pub struct SeWeights {
    /// The configuration these weights belong to.
    pub config: SeConfig,
    /// FC1 weight, `[hidden][channels]`.
    pub w1: Vec<f32>,
    /// FC1 bias, `[hidden]` (present iff `config.bias`).
    pub b1: Option<Vec<f32>>,
    /// FC2 weight, `[channels][hidden]`.
    pub w2: Vec<f32>,
    /// FC2 bias, `[channels]` (present iff `config.bias`).
    pub b2: Option<Vec<f32>>,
}

impl SeWeights {
    /// Seeded initialisation.
    pub fn init(config: SeConfig, init: Init, seed: u64) -> Result<Self> {
        config.validate()?;
        let (c, d) = (config.channels, config.hidden);
        let (w1, b1, w2, b2) = match init {
            Init::PyTorchDefault => {
                let k1 = 1.0 / (c as f32).sqrt();
                let k2 = 1.0 / (d as f32).sqrt();
                (
                    rng::uniform_vec(d * c, -k1, k1, seed),
                    rng::uniform_vec(d, -k1, k1, seed ^ 0x5151),
                    rng::uniform_vec(c * d, -k2, k2, seed ^ 0xa2a2),
                    rng::uniform_vec(c, -k2, k2, seed ^ 0xf3f3),
                )
            }
            Init::KaimingNormal => (
                // fan_out of a 1x1 conv is its output channels.
                rng::normal_vec(d * c, (2.0 / d as f32).sqrt(), seed),
                vec![0.0; d],
                rng::normal_vec(c * d, (2.0 / c as f32).sqrt(), seed ^ 0xa2a2),
                vec![0.0; c],
            ),
        };
        Ok(SeWeights {
            config,
            w1,
            b1: config.bias.then_some(b1),
            w2,
            b2: config.bias.then_some(b2),
        })
    }

    /// Weights from explicit buffers; checks every length against `config`.
    pub fn from_parts(
        config: SeConfig,
        w1: Vec<f32>,
        b1: Option<Vec<f32>>,
        w2: Vec<f32>,
        b2: Option<Vec<f32>>,
    ) -> Result<Self> {
        let w = SeWeights {
            config,
            w1,
            b1,
            w2,
            b2,
        };
        w.validate()?;
        Ok(w)
    }

    /// Checks the config and every buffer's length (and that biases are present iff
    /// `config.bias`).
    pub fn validate(&self) -> Result<()> {
        self.view().validate()
    }

    /// The weights as borrowed slices.
    pub fn view(&self) -> SeWeightsRef<'_> {
        SeWeightsRef {
            config: self.config,
            w1: &self.w1,
            b1: self.b1.as_deref(),
            w2: &self.w2,
            b2: self.b2.as_deref(),
        }
    }
}

/// SE weights borrowed from someone else's buffers (a framework's parameters), in
/// [`SeWeights`]' layout: what the CPU path reads, without a copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeWeightsRef<'a> {
    /// The configuration these weights belong to.
    pub config: SeConfig,
    /// FC1 weight, `[hidden][channels]`.
    pub w1: &'a [f32],
    /// FC1 bias, `[hidden]` (present iff `config.bias`).
    pub b1: Option<&'a [f32]>,
    /// FC2 weight, `[channels][hidden]`.
    pub w2: &'a [f32],
    /// FC2 bias, `[channels]` (present iff `config.bias`).
    pub b2: Option<&'a [f32]>,
}

impl SeWeightsRef<'_> {
    /// Checks the config and every slice's length (and that biases are present iff
    /// `config.bias`).
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let (c, d) = (self.config.channels, self.config.hidden);
        check_len("w1", self.w1.len(), d * c)?;
        check_len("w2", self.w2.len(), c * d)?;
        match (self.b1, self.b2, self.config.bias) {
            (Some(b1), Some(b2), true) => {
                check_len("b1", b1.len(), d)?;
                check_len("b2", b2.len(), c)
            }
            (None, None, false) => Ok(()),
            _ => Err(Error::Config(format!(
                "biases must be present iff config.bias ({})",
                self.config.bias
            ))),
        }
    }
}

/// Parameter gradients written into someone else's buffers, shaped like [`SeWeightsRef`].
#[derive(Debug, PartialEq)]
pub struct SeGradsMut<'a> {
    /// d loss / d w1, `[hidden][channels]`.
    pub dw1: &'a mut [f32],
    /// d loss / d b1 (iff bias).
    pub db1: Option<&'a mut [f32]>,
    /// d loss / d w2, `[channels][hidden]`.
    pub dw2: &'a mut [f32],
    /// d loss / d b2 (iff bias).
    pub db2: Option<&'a mut [f32]>,
}

impl SeGradsMut<'_> {
    /// Checks every slice's length against `cfg` (and that biases are present iff `cfg.bias`).
    pub fn check(&self, cfg: &SeConfig) -> Result<()> {
        let (c, d) = (cfg.channels, cfg.hidden);
        check_len("grad dw1", self.dw1.len(), d * c)?;
        check_len("grad dw2", self.dw2.len(), c * d)?;
        match (&self.db1, &self.db2, cfg.bias) {
            (Some(b1), Some(b2), true) => {
                check_len("grad db1", b1.len(), d)?;
                check_len("grad db2", b2.len(), c)
            }
            (None, None, false) => Ok(()),
            _ => Err(Error::Config(format!(
                "bias gradients must be present iff config.bias ({})",
                cfg.bias
            ))),
        }
    }
}

/// `Err(Error::Length)` unless `got == expected`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            got,
            expected,
        })
    }
}

impl SeGrads<f32> {
    /// The gradients as borrowed mutable slices.
    pub fn view_mut(&mut self) -> SeGradsMut<'_> {
        SeGradsMut {
            dw1: &mut self.dw1,
            db1: self.db1.as_deref_mut(),
            dw2: &mut self.dw2,
            db2: self.db2.as_deref_mut(),
        }
    }
}

/// Gradients of the SE parameters, shaped like [`SeWeights`].
#[derive(Clone, Debug, PartialEq)]
pub struct SeGrads<V> {
    /// d loss / d w1, `[hidden][channels]`.
    pub dw1: Vec<V>,
    /// d loss / d b1 (iff bias).
    pub db1: Option<Vec<V>>,
    /// d loss / d w2, `[channels][hidden]`.
    pub dw2: Vec<V>,
    /// d loss / d b2 (iff bias).
    pub db2: Option<Vec<V>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_respects_bounds_and_bias() {
        let cfg = SeConfig::with_hidden(64, 4).unwrap();
        let w = SeWeights::init(cfg, Init::PyTorchDefault, 1).unwrap();
        assert!(w.w1.iter().all(|v| v.abs() <= 1.0 / 8.0));
        assert!(w.w2.iter().all(|v| v.abs() <= 0.5));
        assert!(w.validate().is_ok());
        let w2 = SeWeights::init(cfg.bias(false), Init::KaimingNormal, 1).unwrap();
        assert!(w2.b1.is_none() && w2.b2.is_none());
        assert_ne!(
            w.w1,
            SeWeights::init(cfg, Init::PyTorchDefault, 2).unwrap().w1
        );
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let cfg = SeConfig::with_hidden(8, 2).unwrap();
        assert!(SeWeights::from_parts(
            cfg,
            vec![0.0; 15],
            Some(vec![0.0; 2]),
            vec![0.0; 16],
            Some(vec![0.0; 8])
        )
        .is_err());
        assert!(SeWeights::from_parts(cfg, vec![0.0; 16], None, vec![0.0; 16], None).is_err());
        assert!(
            SeWeights::from_parts(cfg.bias(false), vec![0.0; 16], None, vec![0.0; 16], None)
                .is_ok()
        );
    }
}
