#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cuda;
pub mod error;
mod linalg;
#[cfg(feature = "nn")]
pub mod nn;
pub mod rng;
pub mod se;
pub mod tensor;
#[cfg(feature = "nn")]
pub mod train;

pub use error::{Error, Result};
pub use se::{Activation, Gate, Init, SeConfig, SeGrads, SeWeights};
pub use tensor::{advise_huge_pages, rel_l2_error, DType, Element, Layout, Shape, Tensor};
