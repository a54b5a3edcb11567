//! SE as a [candle](https://github.com/huggingface/candle) custom op with autograd, and an SE
//! [`candle_nn::Module`] ([`SqueezeExcite`]) with timm's parameter names (feature `candle`).
//!
//! candle has no SE op: its models compose it from mean, two 1x1 convolutions, an activation, a
//! sigmoid and a broadcast multiply, several passes over the activation. [`se`] runs senet's
//! fused op instead, on the CPU through [`crate::se::cpu`] (f32, f16, bf16) and, with the
//! `candle-cuda` feature, on candle's own CUDA stream and buffers through
//! [`crate::se::cuda::forward_views`] (no copy, no host round trip).
//!
//! # Operands and autograd
//!
//! candle's custom ops take at most three tensors, so the four parameters travel as one packed
//! 1-D tensor `[w1 (d*C) | b1 (d) | w2 (C*d) | b2 (C)]` (biases only when the config has them):
//! [`se`] packs them with `Tensor::cat` (autograd flows back to each piece), [`se_packed`] takes
//! a tensor the caller keeps packed and so skips that copy. The op records itself with
//! `apply_op2` / `apply_op3`, so `Tensor::backward` (and `Var`s) get gradients for `x`, the
//! parameters and the residual, all computed by senet's backward: the op keeps the forward's
//! saved state (`z`, `h`, `u`, `s`: a few floats per sample and channel) for it.
//!
//! # Layouts and dtypes
//!
//! `x` has candle's NCHW shape `[N, C, H, W]` and is either contiguous (NCHW in memory) or a
//! channels-last tensor: NHWC-contiguous memory permuted to NCHW shape (`x.permute((0, 3, 1,
//! 2))`, what a candle user holds). Any other stride pattern is made contiguous first (a copy,
//! with autograd). The output, `dx` and `d residual` have `x`'s memory layout. `x` and the
//! residual share a dtype (f32, f16 or bf16); the parameters are f32, f16 or bf16 (senet computes
//! in f32 whatever they are; their gradients come back in their own dtype).
//!
//! Errors, never panics: wrong ranks or shapes, a config that disagrees with the parameters,
//! unsupported dtypes and operands on different devices are candle errors.
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use senet::candle::{se, SqueezeExcite};
//! use senet::{Activation, SeConfig};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! // timm's SEModule(256, rd_ratio=1/16): fc1 256 -> 16, ReLU, fc2 16 -> 256, sigmoid.
//! let block = SqueezeExcite::timm(256, 16, vb.pp("se"))?;
//! let x = Tensor::randn(0f32, 1.0, (8, 256, 14, 14), &dev)?;
//! let y = block.forward(&x)?;                         // s * x
//! let y2 = block.forward_residual(&x, &x)?;           // relu(s * x + residual), one pass
//! let grads = y.sum_all()?.backward()?;               // senet's backward through candle's autograd
//! // Channels-last: NHWC memory permuted to NCHW shape works as is (and y keeps that layout).
//! let x_cl = x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))?;
//! let y_cl = block.forward(&x_cl)?;
//! // The functional op: any act / gate / bias / residual combination from the config.
//! let cfg = SeConfig::with_hidden(256, 16)?.activation(Activation::Silu).bias(false);
//! let (w1, w2) = (Tensor::randn(0f32, 0.1, (16, 256), &dev)?, Tensor::randn(0f32, 0.1, (256, 16), &dev)?);
//! let y3 = se(&x, &w1, None, &w2, None, None, &cfg)?;
//! # let _ = (y2, grads, y_cl, y3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "candle-cuda")]
mod cuda;
mod module;
mod op;

pub use module::SqueezeExcite;
pub use op::{pack_params, se, se_packed, unpack_grads};

use crate::tensor::Layout;
use candle_core::{Result, Tensor};

/// The memory layout of a 4-D tensor in candle's NCHW shape: contiguous NCHW, or NHWC memory
/// permuted to NCHW shape. `None` for any other stride pattern (or another rank). Dimensions of
/// size 1 may have any stride; where both layouts fit (`C == 1` or `H * W == 1`, the same memory
/// order) the answer is NCHW.
pub fn memory_layout(layout: &candle_core::Layout) -> Option<Layout> {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.len() != 4 {
        return None;
    }
    let (c, h, w) = (dims[1], dims[2], dims[3]);
    let fits = |want: [usize; 4]| (0..4).all(|i| dims[i] == 1 || stride[i] == want[i]);
    if fits([c * h * w, h * w, w, 1]) {
        Some(Layout::Nchw)
    } else if fits([h * w * c, 1, w * c, c]) {
        Some(Layout::Nhwc)
    } else {
        None
    }
}

/// `t` (NCHW shape) with its memory in `layout`: itself when it already is, else a copy (with
/// autograd) laid out so.
pub fn to_memory_layout(t: &Tensor, layout: Layout) -> Result<Tensor> {
    if memory_layout(t.layout()) == Some(layout) {
        return Ok(t.clone());
    }
    match layout {
        Layout::Nchw => t.contiguous(),
        Layout::Nhwc => t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2)),
    }
}

/// senet's errors as candle errors.
fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}
