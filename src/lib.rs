//! # senet
//!
//! Squeeze-and-Excitation (Hu et al., arXiv 1709.01507) made fast on NVIDIA GPUs and checked
//! against an f64 oracle.
//!
//! - [`se::reference`]: the oracle every other backend is judged against.
//! - [`se::cuda`] and [`cuda`]: hand-written CUDA kernels behind a safe API over `cudarc`.
//! - [`nn`]: SE networks (SE-ResNet, SE-ResNeXt, SENet-154, SE-Inception) with forward and
//!   backward passes on a reference and a fast CPU backend, and timm-compatible checkpoints.
//!
//! Shapes and layouts live in [`tensor`]; every fallible call returns [`Error`].
#![warn(missing_docs)]

pub mod cuda;
pub mod error;
pub mod nn;
pub mod rng;
pub mod se;
pub mod tensor;

pub use error::{Error, Result};
pub use se::{Activation, Gate, Init, SeConfig, SeGrads, SeWeights};
pub use tensor::{rel_l2_error, DType, Element, Layout, Shape, Tensor};
