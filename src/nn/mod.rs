//! SE networks: layers, residual blocks, the paper's SE integration variants, models by name,
//! forward and explicit backward passes, and timm-compatible checkpoints.
//!
//! - [`backend`]: the seam. Layers call a [`Backend`] for every primitive op; [`Reference`]
//!   (plain loops, f64 accumulation, `f32` or `f64` networks) and [`Cpu`] (im2col + GEMM,
//!   rayon) implement it, so one network runs on each.
//! - [`layers`]: Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, global average pooling,
//!   Linear, Dropout and the SE block ([`SqueezeExcite`], through the crate's SE op).
//! - [`chain`]: [`Chain`], a named sequence of layers (a BatchNorm + ReLU pair fused), and
//!   [`Leaf`], the plain layers a block's [`Branch`] holds.
//! - [`blocks`]: ResNet basic and bottleneck blocks, ResNeXt and SENet-154 bottlenecks, with SE
//!   standard, PRE, POST, Identity or after the 3x3 convolution ([`SePosition`]).
//! - [`seq`]: [`Layer`] (leaves, residual blocks, Inception modules) and [`Seq`], a network's
//!   body. Modules read bottom-up: layers -> chain -> blocks, inception -> seq -> network,
//!   resnet -> models.
//! - [`resnet`], [`inception`], [`models`]: the architectures and the registry by name.
//! - [`network`]: [`Network`], the API a training loop uses.
//! - [`checkpoint`]: safetensors with timm's names and shapes.
//!
//! Activations are NCHW host [`Tensor`](crate::Tensor)s. Every layer caches what its backward
//! needs when run in [`Mode::Train`] or [`Mode::Eval`].

pub mod backend;
pub mod blocks;
pub mod chain;
pub mod checkpoint;
pub mod inception;
pub mod layers;
pub mod models;
pub mod network;
pub mod param;
pub mod resnet;
pub mod seq;

pub use backend::{
    cublas_available, cudnn_version, cudnn_version_string, Backend, ConvChoice, ConvEngine,
    ConvGeom, Cpu, Cuda, NnAct, OpTime, PoolGeom, Profiled, Reference,
};
pub use blocks::{BlockConfig, BlockKind, ResidualBlock, SeBlockConfig, SePosition, StrideOn};
pub use chain::{Branch, Chain, ChainItem, Leaf};
pub use checkpoint::{StateData, StateDict, StateTensor};
pub use layers::{Module, SqueezeExcite};
pub use network::Network;
pub use param::{DeviceStore, Mode, Param, ParamInit, Real, Slot, SlotRef};
pub use resnet::{ResNetConfig, Stem};
pub use seq::{Layer, Seq};
