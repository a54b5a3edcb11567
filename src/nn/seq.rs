//! [`Layer`], the closed set of network pieces (the plain [`Leaf`] layers plus residual blocks
//! and Inception modules), and [`Seq`], a named sequence of them: a network's body.

use crate::error::Result;
use crate::nn::backend::Backend;
use crate::nn::blocks::ResidualBlock;
use crate::nn::chain::{Chain, ChainItem, Leaf};
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

/// A network's body: a chain of [`Layer`]s (see [`Chain`] for naming and the fused
/// BatchNorm + ReLU).
pub type Seq<E> = Chain<Layer<E>>;

impl<E: Real> ChainItem<E> for Layer<E> {
    fn as_batchnorm(&mut self) -> Option<&mut BatchNorm2d<E>> {
        match self {
            Layer::BatchNorm2d(b) => Some(b),
            _ => None,
        }
    }

    fn as_relu(&mut self) -> Option<&mut Relu<E>> {
        match self {
            Layer::Relu(r) => Some(r),
            _ => None,
        }
    }
}

impl<E> From<Leaf<E>> for Layer<E> {
    fn from(l: Leaf<E>) -> Self {
        match l {
            Leaf::Conv2d(l) => Layer::Conv2d(l),
            Leaf::BatchNorm2d(l) => Layer::BatchNorm2d(l),
            Leaf::Relu(l) => Layer::Relu(l),
            Leaf::MaxPool2d(l) => Layer::MaxPool2d(l),
            Leaf::AvgPool2d(l) => Layer::AvgPool2d(l),
            Leaf::GlobalAvgPool(l) => Layer::GlobalAvgPool(l),
            Leaf::Linear(l) => Layer::Linear(l),
            Leaf::Dropout(l) => Layer::Dropout(l),
            Leaf::SqueezeExcite(l) => Layer::SqueezeExcite(l),
        }
    }
}
