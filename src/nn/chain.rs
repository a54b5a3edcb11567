//! [`Chain`], a named sequence of layers run in order, and [`Leaf`], the plain layers: what the
//! branches of residual blocks and Inception modules are made of ([`Branch`]). A network's body
//! is a chain of [`Layer`](crate::nn::Layer)s, which adds those composite pieces
//! ([`Seq`](crate::nn::Seq), in seq.rs). The modules read bottom-up: layers -> chain ->
//! blocks, inception -> seq -> network, models.

use crate::error::Result;
use crate::nn::backend::Backend;
use crate::nn::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d, Module, Relu,
    SqueezeExcite,
};
use crate::nn::param::{Mode, Real, Visit, VisitMut};
use crate::tensor::Shape;

/// A plain layer (no blocks or modules inside).
#[derive(Clone, Debug)]
pub enum Leaf<E> {
    /// A convolution.
    Conv2d(Conv2d<E>),
    /// Batch normalisation.
    BatchNorm2d(BatchNorm2d<E>),
    /// ReLU.
    Relu(Relu<E>),
    /// Max pooling.
    MaxPool2d(MaxPool2d),
    /// Average pooling.
    AvgPool2d(AvgPool2d),
    /// Global average pooling.
    GlobalAvgPool(GlobalAvgPool),
    /// A fully connected layer.
    Linear(Linear<E>),
    /// Dropout.
    Dropout(Dropout<E>),
    /// An SE block on its own (`y = s * x`).
    SqueezeExcite(SqueezeExcite<E>),
}

/// Calls `$e` with `$l` bound to the layer inside any [`Leaf`] variant.
macro_rules! each_leaf {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            Leaf::Conv2d($l) => $e,
            Leaf::BatchNorm2d($l) => $e,
            Leaf::Relu($l) => $e,
            Leaf::MaxPool2d($l) => $e,
            Leaf::AvgPool2d($l) => $e,
            Leaf::GlobalAvgPool($l) => $e,
            Leaf::Linear($l) => $e,
            Leaf::Dropout($l) => $e,
            Leaf::SqueezeExcite($l) => $e,
        }
    };
}

impl<E: Real> Module<E> for Leaf<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        each_leaf!(self, l => Module::<E>::forward(l, b, x, mode))
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        each_leaf!(self, l => Module::<E>::backward(l, b, dy))
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        each_leaf!(self, l => Module::<E>::visit(l, prefix, f))
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        each_leaf!(self, l => Module::<E>::visit_mut(l, prefix, f))
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        each_leaf!(self, l => Module::<E>::output_shape(l, x))
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        each_leaf!(self, l => Module::<E>::macs(l, x))
    }
}

/// What a [`Chain`] needs of its items beyond [`Module`]: a view of BatchNorm and ReLU layers,
/// so that a BatchNorm followed by a ReLU runs as one fused pass.
pub trait ChainItem<E: Real>: Module<E> {
    /// The layer as a BatchNorm, if it is one.
    fn as_batchnorm(&mut self) -> Option<&mut BatchNorm2d<E>>;
    /// The layer as a ReLU, if it is one.
    fn as_relu(&mut self) -> Option<&mut Relu<E>>;
}

impl<E: Real> ChainItem<E> for Leaf<E> {
    fn as_batchnorm(&mut self) -> Option<&mut BatchNorm2d<E>> {
        match self {
            Leaf::BatchNorm2d(b) => Some(b),
            _ => None,
        }
    }

    fn as_relu(&mut self) -> Option<&mut Relu<E>> {
        match self {
            Leaf::Relu(r) => Some(r),
            _ => None,
        }
    }
}

/// A sequence of named layers, run in order (and backward in reverse). A layer's parameters are
/// named `<layer name>.<parameter>`; names may contain dots (`conv1.0`, `downsample.1`).
///
/// A BatchNorm followed by a ReLU runs as one fused pass in every mode (and, when recording,
/// one fused backward: [`BatchNorm2d::forward_fused_relu`](crate::nn::layers::BatchNorm2d)).
#[derive(Clone, Debug)]
pub struct Chain<L> {
    layers: Vec<(String, L)>,
}

/// A branch of a residual block or an Inception module: a chain of plain layers.
pub type Branch<E> = Chain<Leaf<E>>;

impl<L> Default for Chain<L> {
    fn default() -> Self {
        Chain { layers: Vec::new() }
    }
}

impl<L> Chain<L> {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a layer named `name`.
    pub fn push(&mut self, name: impl Into<String>, layer: L) {
        self.layers.push((name.into(), layer));
    }

    /// Appends a layer (builder form).
    pub fn with(mut self, name: impl Into<String>, layer: L) -> Self {
        self.push(name, layer);
        self
    }

    /// The layers and their names.
    pub fn layers(&self) -> &[(String, L)] {
        &self.layers
    }

    /// The layers, mutably.
    pub fn layers_mut(&mut self) -> &mut [(String, L)] {
        &mut self.layers
    }

    /// True when there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

fn child_prefix(prefix: &str, name: &str) -> String {
    if name.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}{name}.")
    }
}

impl<E: Real, L: ChainItem<E>> Module<E> for Chain<L> {
    fn forward<B: Backend<E>>(&mut self, b: &B, mut x: B::T, mode: Mode) -> Result<B::T> {
        let mut i = 0;
        while i < self.layers.len() {
            // BatchNorm followed by ReLU: one pass (and one fused backward when recording).
            if let [(_, first), (_, second), ..] = &mut self.layers[i..] {
                if let (Some(bn), Some(r)) = (first.as_batchnorm(), second.as_relu()) {
                    x = bn.forward_fused_relu(b, x, mode)?;
                    r.mark_fused(mode);
                    i += 2;
                    continue;
                }
            }
            x = self.layers[i].1.forward(b, x, mode)?;
            i += 1;
        }
        Ok(x)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, mut dy: B::T) -> Result<B::T> {
        for (_, l) in self.layers.iter_mut().rev() {
            dy = l.backward(b, dy)?;
        }
        Ok(dy)
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        for (name, l) in &self.layers {
            l.visit(&child_prefix(prefix, name), f);
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        for (name, l) in &mut self.layers {
            l.visit_mut(&child_prefix(prefix, name), f);
        }
    }

    fn output_shape(&self, mut x: Shape) -> Result<Shape> {
        for (_, l) in &self.layers {
            x = l.output_shape(x)?;
        }
        Ok(x)
    }

    fn macs(&self, mut x: Shape) -> Result<u64> {
        let mut total = 0;
        for (_, l) in &self.layers {
            total += l.macs(x)?;
            x = l.output_shape(x)?;
        }
        Ok(total)
    }
}
