//! [`Layer`], the closed set of network pieces, and [`Seq`], a named sequence of them.

use crate::error::Result;
use crate::nn::backend::Backend;
use crate::nn::blocks::ResidualBlock;
use crate::nn::inception::InceptionModule;
use crate::nn::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d, Module, Relu,
    SqueezeExcite,
};
use crate::nn::param::{Mode, Real, Visit, VisitMut};
use crate::tensor::Shape;

/// Every kind of network piece.
#[derive(Clone, Debug)]
pub enum Layer<E> {
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
    /// A residual block.
    Residual(Box<ResidualBlock<E>>),
    /// An Inception module.
    Inception(Box<InceptionModule<E>>),
}

macro_rules! each {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            Layer::Conv2d($l) => $e,
            Layer::BatchNorm2d($l) => $e,
            Layer::Relu($l) => $e,
            Layer::MaxPool2d($l) => $e,
            Layer::AvgPool2d($l) => $e,
            Layer::GlobalAvgPool($l) => $e,
            Layer::Linear($l) => $e,
            Layer::Dropout($l) => $e,
            Layer::SqueezeExcite($l) => $e,
            Layer::Residual($l) => $e,
            Layer::Inception($l) => $e,
        }
    };
}

impl<E: Real> Module<E> for Layer<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        each!(self, l => Module::<E>::forward(l.as_mut(), b, x, mode))
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        each!(self, l => Module::<E>::backward(l.as_mut(), b, dy))
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        each!(self, l => Module::<E>::visit(l.as_ref(), prefix, f))
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        each!(self, l => Module::<E>::visit_mut(l.as_mut(), prefix, f))
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        each!(self, l => Module::<E>::output_shape(l.as_ref(), x))
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        each!(self, l => Module::<E>::macs(l.as_ref(), x))
    }
}

/// Lets `each!` call through boxes and plain values alike.
trait AsLayer {
    fn as_ref(&self) -> &Self {
        self
    }
    fn as_mut(&mut self) -> &mut Self {
        self
    }
}

impl<E> AsLayer for Conv2d<E> {}
impl<E> AsLayer for BatchNorm2d<E> {}
impl<E> AsLayer for Relu<E> {}
impl AsLayer for MaxPool2d {}
impl AsLayer for AvgPool2d {}
impl AsLayer for GlobalAvgPool {}
impl<E> AsLayer for Linear<E> {}
impl<E> AsLayer for Dropout<E> {}
impl<E> AsLayer for SqueezeExcite<E> {}

/// A sequence of named layers, run in order (and backward in reverse). A layer's parameters are
/// named `<layer name>.<parameter>`; names may contain dots (`conv1.0`, `downsample.1`).
///
/// A BatchNorm followed by a ReLU runs as one fused pass in every mode (and, when recording,
/// one fused backward: [`BatchNorm2d::forward_fused_relu`](crate::nn::layers::BatchNorm2d)).
#[derive(Clone, Debug, Default)]
pub struct Seq<E> {
    layers: Vec<(String, Layer<E>)>,
}

impl<E: Real> Seq<E> {
    /// An empty sequence.
    pub fn new() -> Self {
        Seq { layers: Vec::new() }
    }

    /// Appends a layer named `name`.
    pub fn push(&mut self, name: impl Into<String>, layer: Layer<E>) {
        self.layers.push((name.into(), layer));
    }

    /// Appends a layer (builder form).
    pub fn with(mut self, name: impl Into<String>, layer: Layer<E>) -> Self {
        self.push(name, layer);
        self
    }

    /// The layers and their names.
    pub fn layers(&self) -> &[(String, Layer<E>)] {
        &self.layers
    }

    /// The layers, mutably.
    pub fn layers_mut(&mut self) -> &mut [(String, Layer<E>)] {
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

impl<E: Real> Module<E> for Seq<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, mut x: B::T, mode: Mode) -> Result<B::T> {
        let mut i = 0;
        while i < self.layers.len() {
            // BatchNorm followed by ReLU: one pass (and one fused backward when recording).
            if let [(_, Layer::BatchNorm2d(bn)), (_, Layer::Relu(r)), ..] = &mut self.layers[i..] {
                x = bn.forward_fused_relu(b, x, mode)?;
                r.mark_fused(mode);
                i += 2;
                continue;
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
