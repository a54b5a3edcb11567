//! The learning-rate schedule, evaluated per step.
//!
//! With `t` the epochs completed before a step (`step / steps_per_epoch`, fractional):
//! - warm-up (`warmup` epochs, optional): the rate rises linearly, `base * (step + 1) /
//!   (warmup * steps_per_epoch)`, reaching `base` at the end of the warm-up;
//! - [`Decay::Step`] (the paper's): `base * gamma ^ floor(t / every)`; the paper divides by 10
//!   every 30 of 100 epochs (`every = 30`, `gamma = 0.1`);
//! - [`Decay::Cosine`]: after the warm-up, `base * (1 + cos(pi * (t - warmup) / (epochs -
//!   warmup))) / 2`.

use crate::error::{Error, Result};

/// How the rate decays after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Decay {
    /// Multiply by `gamma` every `every` epochs (may be fractional).
    Step {
        /// Epochs between decays.
        every: f64,
        /// The factor (the paper: 0.1).
        gamma: f64,
    },
    /// Half a cosine from `base` to 0 over the epochs after the warm-up.
    Cosine,
}

/// A learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// The peak rate (the paper: 0.6 at batch 1024).
    pub base: f64,
    /// The decay.
    pub decay: Decay,
    /// Linear warm-up, in epochs (0: none).
    pub warmup: f64,
    /// Length of the run in epochs (the cosine's end).
    pub epochs: f64,
}

impl LrSchedule {
    /// The paper's step schedule scaled to `epochs`: divide by 10 every `0.3 * epochs` epochs
    /// (30 of the paper's 100), no warm-up.
    pub fn paper(base: f64, epochs: usize) -> Self {
        LrSchedule {
            base,
            decay: Decay::Step {
                every: (3 * epochs) as f64 / 10.0,
                gamma: 0.1,
            },
            warmup: 0.0,
            epochs: epochs as f64,
        }
    }

    /// Checks every number is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let ok = self.base.is_finite()
            && self.base > 0.0
            && self.warmup.is_finite()
            && self.warmup >= 0.0
            && self.epochs.is_finite()
            && self.epochs > 0.0
            && match self.decay {
                Decay::Step { every, gamma } => every > 0.0 && (0.0..=1.0).contains(&gamma),
                Decay::Cosine => self.warmup < self.epochs,
            };
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "invalid learning-rate schedule {self:?}"
            )))
        }
    }

    /// The rate of global step `step` (0-based) with `steps_per_epoch` steps an epoch.
    pub fn at(&self, step: u64, steps_per_epoch: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        let t = step as f64 / spe;
        let warm_steps = self.warmup * spe;
        if (step as f64) < warm_steps {
            return self.base * (step as f64 + 1.0) / warm_steps;
        }
        match self.decay {
            Decay::Step { every, gamma } => self.base * gamma.powi((t / every).floor() as i32),
            Decay::Cosine => {
                let span = (self.epochs - self.warmup).max(f64::MIN_POSITIVE);
                let progress = ((t - self.warmup) / span).clamp(0.0, 1.0);
                self.base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
