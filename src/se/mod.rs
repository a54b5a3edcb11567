//! The SE op: configuration, weights, and its three implementations.
//!
//! - [`reference`](mod@reference): the oracle (plain loops, f64 accumulation).
//! - [`cpu`]: the fast multi-threaded CPU path.
//! - [`cuda`]: the GPU kernels.

pub mod check;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod gradcheck;
pub mod reference;
pub mod weights;

pub use config::{make_divisible, sigmoid, Activation, Gate, SeConfig};
pub use weights::{Init, SeGrads, SeGradsMut, SeWeights, SeWeightsRef};

use crate::error::{Error, Result};
use crate::tensor::{Element, Layout, Shape, Tensor};

/// Checks an activation (and the optional residual and gradient) against the weights: the
/// weights are consistent, `x` has `config.channels` channels, and the others match `x`'s shape
/// and layout.
pub(crate) fn check_activation<T: Element>(
    w: &SeWeights,
    x: &Tensor<T>,
    residual: Option<&Tensor<T>>,
    dy: Option<&Tensor<T>>,
) -> Result<()> {
    w.validate()?;
    check_shapes(
        &w.config,
        x.shape(),
        x.layout(),
        residual.map(|r| (r.shape(), r.layout())),
        dy.map(|d| (d.shape(), d.layout())),
    )
}

/// Shape-level form of [`check_activation`], shared with the device API.
pub(crate) fn check_shapes(
    cfg: &SeConfig,
    x: Shape,
    layout: Layout,
    residual: Option<(Shape, Layout)>,
    dy: Option<(Shape, Layout)>,
) -> Result<()> {
    x.validate()?;
    if x.c != cfg.channels {
        return Err(Error::Shape(format!(
            "input {x} has {} channels, the SE block expects {}",
            x.c, cfg.channels
        )));
    }
    for (what, other) in [("residual", residual), ("gradient dy", dy)] {
        if let Some((s, l)) = other {
            if s != x || l != layout {
                return Err(Error::Shape(format!(
                    "{what} is {s} {l}, input is {x} {layout}"
                )));
            }
        }
    }
    Ok(())
}

/// Checks the lengths of saved forward state against `n`, `c`, `d`.
pub(crate) fn check_saved_len(
    n: usize,
    c: usize,
    d: usize,
    z: usize,
    h: usize,
    s: usize,
) -> Result<()> {
    weights::check_len("saved z", z, n * c)?;
    weights::check_len("saved h", h, n * d)?;
    weights::check_len("saved s", s, n * c)
}
