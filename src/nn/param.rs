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
pub enum ParamInit {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation (timm's Kaiming-normal, fan-out).
    Normal(f32),
    /// Uniform in `[-bound, bound)` (PyTorch's default for `Linear` and SE convolutions).
    Uniform(f32),
}

/// A parameter's storage on a device backend while the parameter is bound to it
/// ([`crate::nn::Network::bind`]): its values, gradient and optimiser state live there, and the
/// host copies are empty until [`Param::unbind`].
pub trait DeviceStore: Send + Sync + fmt::Debug + std::any::Any {
    /// The backend instance that owns the storage.
    fn owner(&self) -> u64;
    /// Copies the values to the host.
    fn read_value(&self) -> Result<Vec<f32>>;
    /// Copies the gradient to the host: `None` when no backward pass has reached the
    /// parameter since it was bound (zeros after [`Param::zero_grad`]).
    fn read_grad(&self) -> Result<Option<Vec<f32>>>;
    /// Copies the optimiser's momentum to the host: `None` before the first update.
    fn read_momentum(&self) -> Result<Option<Vec<f32>>>;
    /// Marks the gradient zero (the next backward pass overwrites instead of adding).
    fn zero_grad(&self);
    /// The storage as `Any`, for its backend to downcast.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A named tensor of a network: a trainable parameter or a buffer (BatchNorm running
/// statistics), with its gradient.
///
/// Values are allocated lazily: a freshly built network knows every shape (so counting
/// parameters is cheap) but holds no values until [`Param::init`], [`Param::set`] or a
/// checkpoint load fills them.
///
/// A parameter bound to a device backend ([`crate::nn::Network::bind`]) keeps its values and
/// gradient there: `value` and `grad` are empty and [`Param::values`] is an error until
/// [`Param::unbind`] brings them back. A clone of a bound parameter is an unbound copy (its
/// values and gradient read back from the device; left uninitialised if that read fails), so
/// clones never share device state.
#[derive(Debug)]
pub struct Param<E> {
    shape: Vec<usize>,
    init: ParamInit,
    /// The values, row-major in PyTorch's layout; empty until initialised (and while bound).
    pub value: Vec<E>,
    /// The accumulated gradient, shaped like `value`; empty until the first backward pass
    /// (or [`Param::grad_mut`]), and while bound.
    pub grad: Vec<E>,
    bound: Option<Bound<E>>,
    /// Whether [`crate::nn::Network::bind`] moves it to a device backend (the parameters of
    /// layers whose ops take bound parameters: convolutions and linear layers).
    bindable: bool,
}

/// A parameter's device binding: the storage, and how its f32 values become `E`.
#[derive(Clone, Debug)]
struct Bound<E> {
    store: std::sync::Arc<dyn DeviceStore>,
    from_f32: fn(f32) -> E,
}

impl<E: Clone> Clone for Param<E> {
    fn clone(&self) -> Self {
        let (value, grad) = match &self.bound {
            None => (self.value.clone(), self.grad.clone()),
            Some(Bound { store, from_f32 }) => {
                let widen = |v: Vec<f32>| v.into_iter().map(*from_f32).collect::<Vec<E>>();
                match (store.read_value(), store.read_grad()) {
                    (Ok(v), Ok(g)) if v.len() == self.shape.iter().product::<usize>() => {
                        (widen(v), g.map(widen).unwrap_or_default())
                    }
                    _ => (Vec::new(), Vec::new()),
                }
            }
        };
        Param {
            shape: self.shape.clone(),
            init: self.init,
            value,
            grad,
            bound: None,
            bindable: self.bindable,
        }
    }
}

impl<E: PartialEq> PartialEq for Param<E> {
    /// Equal shapes, inits, values and gradients, and the same device storage (or none).
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape
            && self.init == other.init
            && self.bindable == other.bindable
            && self.value == other.value
            && self.grad == other.grad
            && match (&self.bound, &other.bound) {
                (None, None) => true,
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(&a.store, &b.store),
                _ => false,
            }
    }
}

impl<E: Real> Param<E> {
    /// A parameter of `shape` that [`Param::init`] fills according to `init`; allocates nothing.
    pub fn new(shape: &[usize], init: ParamInit) -> Self {
        Param {
            shape: shape.to_vec(),
            init,
            value: Vec::new(),
            grad: Vec::new(),
            bound: None,
            bindable: false,
        }
    }

    /// Marks the parameter as one [`crate::nn::Network::bind`] moves to a device backend.
    pub fn bindable(mut self) -> Self {
        self.bindable = true;
        self
    }

    /// True for a parameter [`crate::nn::Network::bind`] moves to a device backend.
    pub fn is_bindable(&self) -> bool {
        self.bindable
    }

    /// True while the values live on a device backend.
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// The device storage while bound.
    pub fn device_store(&self) -> Option<&std::sync::Arc<dyn DeviceStore>> {
        self.bound.as_ref().map(|b| &b.store)
    }

    /// Hands the values to `store` (a backend's [`crate::nn::Backend::bind`]): the host copies
    /// are dropped until [`Param::unbind`].
    pub fn bind_store(&mut self, store: std::sync::Arc<dyn DeviceStore>) {
        self.value = Vec::new();
        self.grad = Vec::new();
        self.bound = Some(Bound {
            store,
            from_f32: E::from_f32,
        });
    }

    /// Brings values and gradient back from the device storage (if bound) and drops it.
    /// On error the parameter stays bound.
    pub fn unbind(&mut self) -> Result<()> {
        let Some(Bound { store, .. }) = &self.bound else {
            return Ok(());
        };
        let value: Vec<E> = store.read_value()?.into_iter().map(E::from_f32).collect();
        let grad: Vec<E> = store
            .read_grad()?
            .map(|g| g.into_iter().map(E::from_f32).collect())
            .unwrap_or_default();
        if value.len() != self.numel() {
            return Err(Error::Length {
                what: "parameter values from the device",
                got: value.len(),
                expected: self.numel(),
            });
        }
        if !grad.is_empty() && grad.len() != self.numel() {
            return Err(Error::Length {
                what: "parameter gradient from the device",
                got: grad.len(),
                expected: self.numel(),
            });
        }
        self.value = value;
        self.grad = grad;
        self.bound = None;
        Ok(())
    }

    fn bound_error(&self, what: &str) -> Error {
        Error::Config(format!(
            "{what} lives on a device backend (bound); unbind the network to read it on the host"
        ))
    }

    /// The shape (PyTorch's, e.g. `[out, in / groups, kh, kw]` for a convolution).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True once values are present (on the host, or on the device while bound).
    pub fn is_initialised(&self) -> bool {
        self.bound.is_some() || self.value.len() == self.numel()
    }

    /// Fills the values from `seed` according to the parameter's [`ParamInit`] (dropping a device
    /// binding: the new values replace the device's).
    pub fn init(&mut self, seed: u64) {
        self.bound = None;
        let n = self.numel();
        self.value = match self.init {
            ParamInit::Zeros => vec![E::ZERO; n],
            ParamInit::Ones => vec![E::ONE; n],
            ParamInit::Normal(std) => rng::normal_vec(n, std, seed)
                .into_iter()
                .map(E::from_f32)
                .collect(),
            ParamInit::Uniform(b) => rng::uniform_vec(n, -b, b, seed)
                .into_iter()
                .map(E::from_f32)
                .collect(),
        };
        self.grad.clear();
    }

    /// Sets the values; `values` must hold exactly [`Param::numel`] elements (an error while
    /// bound: unbind first).
    pub fn set(&mut self, values: Vec<E>) -> Result<()> {
        if self.bound.is_some() {
            return Err(self.bound_error("a parameter being set"));
        }
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

    /// The values, or an error naming `what` if they were never initialised or are bound to a
    /// device backend.
    pub fn values(&self, what: &str) -> Result<&[E]> {
        if self.bound.is_some() {
            return Err(self.bound_error(what));
        }
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

    /// Adds `g` to the gradient (an error while bound: the backend accumulates there).
    pub fn accumulate(&mut self, g: &[E]) -> Result<()> {
        if self.bound.is_some() {
            return Err(self.bound_error("a parameter gradient"));
        }
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

    /// Sets the gradient to zero (keeping its allocation; on the device while bound).
    pub fn zero_grad(&mut self) {
        if let Some(b) = &self.bound {
            b.store.zero_grad();
        }
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
        let mut p = Param::<f32>::new(&[4, 3, 1, 1], ParamInit::Normal(0.5));
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

    /// A device store for the binding tests: fixed values, a gradient once written.
    #[derive(Debug)]
    struct FakeStore {
        zeroed: std::sync::atomic::AtomicBool,
    }

    impl DeviceStore for FakeStore {
        fn owner(&self) -> u64 {
            7
        }
        fn read_value(&self) -> Result<Vec<f32>> {
            Ok(vec![2.0; 6])
        }
        fn read_grad(&self) -> Result<Option<Vec<f32>>> {
            let z = self.zeroed.load(std::sync::atomic::Ordering::Relaxed);
            Ok(Some(vec![if z { 0.0 } else { 0.5 }; 6]))
        }
        fn read_momentum(&self) -> Result<Option<Vec<f32>>> {
            Ok(None)
        }
        fn zero_grad(&self) {
            self.zeroed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn fake() -> std::sync::Arc<dyn DeviceStore> {
        std::sync::Arc::new(FakeStore {
            zeroed: false.into(),
        })
    }

    #[test]
    fn a_bound_parameter_lives_on_its_store_until_unbound() {
        let mut p = Param::<f32>::new(&[2, 3], ParamInit::Ones).bindable();
        assert!(p.is_bindable());
        p.init(1);
        p.bind_store(fake());
        assert!(p.is_bound() && p.is_initialised());
        assert!(p.value.is_empty() && p.grad.is_empty());
        assert!(p.values("w").is_err());
        assert!(p.value_and_grad("w").is_err());
        assert!(p.accumulate(&[1.0; 6]).is_err());
        // A clone is an unbound copy read from the device.
        let q = p.clone();
        assert!(!q.is_bound());
        assert_eq!(q.value, vec![2.0; 6]);
        assert_ne!(p, q);
        p.unbind().unwrap();
        assert!(!p.is_bound());
        assert_eq!(p.value, vec![2.0; 6]);
        assert_eq!(p.grad, vec![0.5; 6]);
        assert_eq!(p, q);
        // zero_grad reaches the store.
        let mut r = Param::<f32>::new(&[6], ParamInit::Zeros);
        r.bind_store(fake());
        r.zero_grad();
        r.unbind().unwrap();
        assert_eq!(r.grad, vec![0.0; 6]);
        // Setting values while bound is an error; init replaces the device's values.
        r.bind_store(fake());
        assert!(r.set(vec![3.0; 6]).is_err());
        assert!(r.is_bound());
        r.init(2);
        assert!(!r.is_bound());
        r.set(vec![3.0; 6]).unwrap();
        assert_eq!(r.values("r").unwrap(), &[3.0; 6]);
    }

    #[test]
    fn name_seeds_differ() {
        assert_ne!(name_seed(1, "a.weight"), name_seed(1, "b.weight"));
        assert_ne!(name_seed(1, "a.weight"), name_seed(2, "a.weight"));
    }
}
