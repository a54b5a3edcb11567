//! Parameters, buffers, the element trait for networks, and the forward mode.

use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::Element;
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real number type a network computes in: `f32` (every backend) or `f64` (the reference
/// backend, for gradient checks).
pub trait Real:
    Element
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// How a network runs forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Training: BatchNorm uses (and updates) batch statistics, dropout is on, and every layer
    /// records what its backward pass needs.
    Train,
    /// Evaluation with gradients: running statistics, no dropout, and layers still record what
    /// backward needs (gradient checks, fine-tuning with frozen statistics).
    Eval,
    /// Inference: like [`Mode::Eval`] but nothing is recorded, so `backward` is an error.
    Infer,
}

impl Mode {
    /// True when layers must keep what their backward pass needs.
    pub fn records(self) -> bool {
        !matches!(self, Mode::Infer)
    }

    /// True in training mode (batch statistics, dropout).
    pub fn is_train(self) -> bool {
        matches!(self, Mode::Train)
    }
}

/// How a parameter or buffer is filled by [`Param::init`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation (timm's Kaiming-normal, fan-out).
    Normal(f32),
    /// Uniform in `[-bound, bound)` (PyTorch's default for `Linear` and SE convolutions).
    Uniform(f32),
}

/// A named tensor of a network: a trainable parameter or a buffer (BatchNorm running
/// statistics), with its gradient.
///
/// Values are allocated lazily: a freshly built network knows every shape (so counting
/// parameters is cheap) but holds no values until [`Param::init`], [`Param::set`] or a
/// checkpoint load fills them.
#[derive(Clone, Debug, PartialEq)]
pub struct Param<E> {
    shape: Vec<usize>,
    init: Init,
    /// The values, row-major in PyTorch's layout; empty until initialised.
    pub value: Vec<E>,
    /// The accumulated gradient, shaped like `value`; empty until the first backward pass
    /// (or [`Param::grad_mut`]).
    pub grad: Vec<E>,
}

impl<E: Real> Param<E> {
    /// A parameter of `shape` that [`Param::init`] fills according to `init`; allocates nothing.
    pub fn new(shape: &[usize], init: Init) -> Self {
        Param {
            shape: shape.to_vec(),
            init,
            value: Vec::new(),
            grad: Vec::new(),
        }
    }

    /// The shape (PyTorch's, e.g. `[out, in / groups, kh, kw]` for a convolution).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True once values are present.
    pub fn is_initialised(&self) -> bool {
        self.value.len() == self.numel()
    }

    /// Fills the values from `seed` according to the parameter's [`Init`].
    pub fn init(&mut self, seed: u64) {
        let n = self.numel();
        self.value = match self.init {
            Init::Zeros => vec![E::ZERO; n],
            Init::Ones => vec![E::ONE; n],
            Init::Normal(std) => rng::normal_vec(n, std, seed)
                .into_iter()
                .map(E::from_f32)
                .collect(),
            Init::Uniform(b) => rng::uniform_vec(n, -b, b, seed)
                .into_iter()
                .map(E::from_f32)
                .collect(),
        };
        self.grad.clear();
    }

    /// Sets the values; `values` must hold exactly [`Param::numel`] elements.
    pub fn set(&mut self, values: Vec<E>) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::Length {
                what: "parameter values",
                got: values.len(),
                expected: self.numel(),
            });
        }
        self.value = values;
        Ok(())
    }

    /// The values, or an error naming `what` if they were never initialised.
    pub fn values(&self, what: &str) -> Result<&[E]> {
        if self.is_initialised() {
            Ok(&self.value)
        } else {
            Err(Error::Config(format!(
                "{what} is not initialised (call init_weights or load a checkpoint)"
            )))
        }
    }

    /// The gradient buffer, allocated as zeros on first use.
    pub fn grad_mut(&mut self) -> &mut [E] {
        let n = self.numel();
        if self.grad.len() != n {
            self.grad = vec![E::ZERO; n];
        }
        &mut self.grad
    }

    /// The values (an error naming `what` if uninitialised) and the gradient buffer (allocated
    /// as zeros on first use), borrowed together for a backward pass.
    pub fn value_and_grad(&mut self, what: &str) -> Result<(&[E], &mut [E])> {
        self.values(what)?;
        self.grad_mut();
        Ok((&self.value, &mut self.grad))
    }

    /// Adds `g` to the gradient.
    pub fn accumulate(&mut self, g: &[E]) -> Result<()> {
        if g.len() != self.numel() {
            return Err(Error::Length {
                what: "parameter gradient",
                got: g.len(),
                expected: self.numel(),
            });
        }
        for (a, &b) in self.grad_mut().iter_mut().zip(g) {
            *a += b;
        }
        Ok(())
    }

    /// Sets the gradient to zero (keeping its allocation).
    pub fn zero_grad(&mut self) {
        for g in &mut self.grad {
            *g = E::ZERO;
        }
    }
}

/// One entry of a network's state, handed to a visitor under its timm name.
#[derive(Debug)]
pub enum Slot<'a, E> {
    /// A trainable parameter (`conv1.weight`, `layer1.0.se.fc1.bias`, ...).
    Param(&'a mut Param<E>),
    /// A buffer that is saved but not trained (`bn1.running_mean`, `bn1.running_var`).
    Buffer(&'a mut Param<E>),
    /// BatchNorm's `num_batches_tracked` (an int64 scalar in PyTorch).
    Counter(&'a mut i64),
}

/// A read-only view of a [`Slot`].
#[derive(Debug, Clone, Copy)]
pub enum SlotRef<'a, E> {
    /// A trainable parameter.
    Param(&'a Param<E>),
    /// A buffer.
    Buffer(&'a Param<E>),
    /// A counter.
    Counter(i64),
}

/// A visitor over mutable state entries: `(name, slot)`.
pub type VisitMut<'a, 'f, E> = &'f mut dyn FnMut(String, Slot<'a, E>);
/// A visitor over read-only state entries: `(name, slot)`.
pub type Visit<'a, 'f, E> = &'f mut dyn FnMut(String, SlotRef<'a, E>);

/// A stable 64-bit hash of a parameter name (FNV-1a), so each parameter's seed depends on its
/// name, not on the order parameters are visited in.
pub(crate) fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Train => "train",
            Mode::Eval => "eval",
            Mode::Infer => "infer",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_values_and_grads() {
        let mut p = Param::<f32>::new(&[4, 3, 1, 1], Init::Normal(0.5));
        assert_eq!(p.numel(), 12);
        assert!(!p.is_initialised());
        assert!(p.values("w").is_err());
        p.init(3);
        assert!(p.is_initialised());
        assert!(p.value.iter().any(|&v| v != 0.0));
        assert!(p.grad.is_empty());
        p.accumulate(&[1.0; 12]).unwrap();
        p.accumulate(&[0.5; 12]).unwrap();
        assert_eq!(p.grad, vec![1.5; 12]);
        assert!(p.accumulate(&[1.0; 11]).is_err());
        p.zero_grad();
        assert_eq!(p.grad, vec![0.0; 12]);
        assert!(p.set(vec![0.0; 5]).is_err());
    }

    #[test]
    fn name_seeds_differ() {
        assert_ne!(name_seed(1, "a.weight"), name_seed(1, "b.weight"));
        assert_ne!(name_seed(1, "a.weight"), name_seed(2, "a.weight"));
    }
}
