//! The backend seam: the primitive operations every layer is written against.
//!
//! Layers hold parameters and caches and call a [`Backend`] for the arithmetic, so one network
//! runs on every backend:
//! - [`Reference`]: plain loops with f64 accumulation, for any [`Real`] (`f32` or `f64`). The
//!   oracle, and the backend of the gradient checks (in f64).
//! - [`Cpu`]: fast and multi-threaded (`f32`): im2col + GEMM convolutions on rayon.
//! - [`Cuda`]: the network kernels of `kernels/nn_*.cu` and the SE kernels on a CUDA device or the kernel
//!   emulator (`f32`), activations in device memory.
//!
//! Activations are NCHW, stored as the backend's [`Backend::T`] (host tensors for `Reference`
//! and `Cpu`, device memory for `Cuda`). Every op validates its shapes and returns
//! [`Error::Shape`](crate::Error) instead of panicking.

mod blas;
mod cpu;
mod cuda;
mod cudnn;
mod profile;
mod reference;

pub use blas::cublas_available;
pub use cpu::Cpu;
pub use cuda::{Cuda, CudaParam, CudaSeSaved, GpuTensor, NnAct};
pub use cudnn::{cudnn_version, version_string as cudnn_version_string, ConvChoice, ConvEngine};
pub use profile::{OpTime, Profiled};
pub use reference::Reference;

use crate::error::{Error, Result};
use crate::nn::param::{Param, Real};
use crate::se::{SeConfig, SeGrads, SeWeights};
use crate::tensor::{Layout, Shape, Tensor};

/// A 2-d convolution's geometry (square kernel, stride and padding, no dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Kernel size (square).
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Groups (1: dense; `in_ch`: depthwise; ResNeXt's cardinality).
    pub groups: usize,
}

impl ConvGeom {
    /// A validated geometry: every size non-zero and both channel counts divisible by `groups`.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Self> {
        let g = ConvGeom {
            in_ch,
            out_ch,
            kernel,
            stride,
            padding,
            groups,
        };
        g.validate()?;
        Ok(g)
    }

    /// Checks every size is non-zero and both channel counts are divisible by `groups` (the
    /// fields are public, so ops check again before using a geometry).
    pub fn validate(&self) -> Result<()> {
        let ConvGeom {
            in_ch,
            out_ch,
            kernel,
            stride,
            groups,
            ..
        } = *self;
        if in_ch == 0 || out_ch == 0 || kernel == 0 || stride == 0 || groups == 0 {
            return Err(Error::Config(format!(
                "convolution {self:?} has a zero size"
            )));
        }
        if in_ch % groups != 0 || out_ch % groups != 0 {
            return Err(Error::Config(format!(
                "convolution channels {in_ch} -> {out_ch} are not divisible by {groups} groups"
            )));
        }
        Ok(())
    }

    /// Input channels per group.
    pub fn in_per_group(&self) -> usize {
        self.in_ch / self.groups
    }

    /// Output channels per group.
    pub fn out_per_group(&self) -> usize {
        self.out_ch / self.groups
    }

    /// The weight's shape, `[out, in / groups, k, k]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_ch, self.in_per_group(), self.kernel, self.kernel]
    }

    /// Elements of the weight.
    pub fn weight_len(&self) -> usize {
        self.weight_shape().iter().product()
    }

    /// The output shape for input `x`; an error if the channels differ or the kernel does not
    /// fit the padded input.
    pub fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.validate()?;
        if x.c != self.in_ch {
            return Err(Error::Shape(format!(
                "convolution expects {} input channels, got {x}",
                self.in_ch
            )));
        }
        let oh = conv_out(x.h, self.kernel, self.stride, self.padding)?;
        let ow = conv_out(x.w, self.kernel, self.stride, self.padding)?;
        Ok(Shape::new(x.n, self.out_ch, oh, ow))
    }

    /// Multiply-accumulates of one forward pass at input `x`.
    pub fn macs(&self, x: Shape) -> Result<u64> {
        let y = self.output_shape(x)?;
        Ok(y.numel() as u64 * (self.in_per_group() * self.kernel * self.kernel) as u64)
    }
}

fn conv_out(size: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    let padded = padded_size(size, p)?;
    if padded < k {
        return Err(Error::Shape(format!(
            "kernel {k} does not fit input {size} with padding {p}"
        )));
    }
    Ok((padded - k) / s + 1)
}

/// `size + 2 * p`, or an error where that overflows (absurd padding, not a panic).
fn padded_size(size: usize, p: usize) -> Result<usize> {
    p.checked_mul(2)
        .and_then(|t| t.checked_add(size))
        .ok_or_else(|| Error::Shape(format!("padding {p} on size {size} overflows")))
}

/// A 2-d pooling window's geometry (PyTorch's `MaxPool2d` / `AvgPool2d` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolGeom {
    /// Window size (square).
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Implicit padding on each side (`-inf` for max, zeros for average).
    pub padding: usize,
    /// Round the output size up (Caffe, Cadene's SE-ResNet and BN-Inception) instead of down.
    pub ceil_mode: bool,
    /// Average pooling only: count padded zeros in the divisor (PyTorch's default).
    pub count_include_pad: bool,
}

impl PoolGeom {
    /// A validated geometry (`padding <= kernel / 2`, as PyTorch requires).
    pub fn new(kernel: usize, stride: usize, padding: usize, ceil_mode: bool) -> Result<Self> {
        let g = PoolGeom {
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad: true,
        };
        g.validate()?;
        Ok(g)
    }

    /// Checks kernel and stride are non-zero and the padding at most half the kernel (the
    /// fields are public, so ops check again before using a geometry).
    pub fn validate(&self) -> Result<()> {
        if self.kernel == 0 || self.stride == 0 {
            return Err(Error::Config(
                "pooling kernel and stride must be non-zero".into(),
            ));
        }
        if self.padding > self.kernel / 2 {
            return Err(Error::Config(format!(
                "pooling padding {} exceeds half the kernel {}",
                self.padding, self.kernel
            )));
        }
        Ok(())
    }

    /// Output size along one axis of `size`, as PyTorch computes it (a window must start inside
    /// the input or its left padding).
    pub fn out_size(&self, size: usize) -> Result<usize> {
        self.validate()?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let padded = padded_size(size, p)?;
        if padded < k {
            return Err(Error::Shape(format!(
                "pooling window {k} does not fit input {size} with padding {p}"
            )));
        }
        let span = padded - k;
        let mut out = if self.ceil_mode {
            span.div_ceil(s) + 1
        } else {
            span / s + 1
        };
        if self.ceil_mode && (out - 1) * s >= size + p {
            out -= 1;
        }
        Ok(out)
    }

    /// The output shape for input `x`.
    pub fn output_shape(&self, x: Shape) -> Result<Shape> {
        Ok(Shape::new(
            x.n,
            x.c,
            self.out_size(x.h)?,
            self.out_size(x.w)?,
        ))
    }

    /// The window of output index `o` along an axis of `size`: `(start, end)` clipped to the
    /// input, and the average's divisor extent (clipped to the padded input only).
    #[inline]
    pub(crate) fn window(&self, o: usize, size: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end_padded = (start + self.kernel as isize).min((size + self.padding) as isize);
        let extent = (end_padded - start) as usize;
        let lo = start.max(0) as usize;
        let hi = (start + self.kernel as isize).min(size as isize).max(0) as usize;
        (lo, hi.max(lo), extent)
    }
}

/// Batch statistics of a BatchNorm input: per-channel mean and biased variance.
#[derive(Clone, Debug, PartialEq)]
pub struct BnStats {
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Biased variance per channel (divided by `N * H * W`).
    pub var: Vec<f64>,
}

/// Gradients from [`Backend::se_backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct SeBackward<T> {
    /// d loss / d x.
    pub dx: T,
    /// Parameter gradients (f64 from the reference op, widened from f32 otherwise).
    pub grads: SeGrads<f64>,
    /// d loss / d residual (the fused epilogue only).
    pub dresidual: Option<T>,
}

/// An activation tensor as a backend stores it: a host [`Tensor`] for the CPU backends, device
/// memory for [`Cuda`]. Cloning may share storage (backends never write an input in place).
pub trait ActTensor: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// The NCHW shape.
    fn shape(&self) -> Shape;
}

impl<E: Real> ActTensor for Tensor<E> {
    fn shape(&self) -> Shape {
        Tensor::shape(self)
    }
}

/// `g *= factor` on the host (each product rounded once to `E`, as the device kernel does for
/// f32); true when every result is finite.
pub(crate) fn unscale_host<E: Real>(g: &mut [E], factor: f32) -> bool {
    let f = factor as f64;
    let mut finite = true;
    for v in g.iter_mut() {
        let r = v.to_f64() * f;
        *v = E::from_f64(r);
        finite &= v.to_f64().is_finite();
    }
    finite
}

/// The primitive operations of a network, on NCHW activations of `E` stored as the backend's
/// [`Backend::T`] (host tensors, or device memory).
///
/// Ops that take a tensor by value may reuse its buffer for the result. Weights use PyTorch's
/// layouts (convolution `[out, in / groups, k, k]`, linear `[out, in]`). Gradient outputs that
/// are slices are *accumulated into* (`+=`), so parameter gradients sum over calls.
pub trait Backend<E: Real>: Sync {
    /// An activation tensor.
    type T: ActTensor;

    /// What max pooling records for its backward (the position of each window's maximum).
    type PoolIdx: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// What the SE forward keeps for its backward.
    type SeSaved: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// Moves a host NCHW tensor to the backend.
    fn upload(&self, x: Tensor<E>) -> Result<Self::T>;

    /// Moves an activation back to the host.
    fn download(&self, x: Self::T) -> Result<Tensor<E>>;

    /// The flat input index of each max-pool output's maximum, on the host.
    fn download_indices(&self, idx: &Self::PoolIdx) -> Result<Vec<u32>>;

    /// Zeros of `shape`.
    fn zeros(&self, shape: Shape) -> Result<Self::T>;

    /// `x * mask`, element by element (dropout; `mask` has one value per element).
    fn mul_mask(&self, x: Self::T, mask: &[E]) -> Result<Self::T>;

    /// Channel concatenation (Inception's output).
    fn concat_channels(&self, parts: &[Self::T]) -> Result<Self::T>;

    /// Splits the channels into pieces of `sizes` (the adjoint of [`Backend::concat_channels`]).
    fn split_channels(&self, x: &Self::T, sizes: &[usize]) -> Result<Vec<Self::T>>;

    /// A short name for reports (`reference`, `cpu`).
    fn name(&self) -> &'static str;

    /// The element type activations are kept in: `"f32"` unless the backend keeps them in a
    /// narrower one (the CUDA backend's `"bf16"`, mixed precision).
    fn precision(&self) -> &'static str {
        "f32"
    }

    /// Waits until every op issued so far has finished (a device backend's queue); host
    /// backends finish each op before returning, so the default does nothing.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// `y = conv(x, w) + b`.
    fn conv2d(&self, x: &Self::T, w: &[E], b: Option<&[E]>, g: &ConvGeom) -> Result<Self::T>;

    /// Convolution backward: accumulates `dw` (and `db`), returns `dx` when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        x: &Self::T,
        w: &[E],
        dy: &Self::T,
        g: &ConvGeom,
        dw: &mut [E],
        db: Option<&mut [E]>,
        need_dx: bool,
    ) -> Result<Option<Self::T>>;

    /// Per-channel mean and biased variance over `N, H, W`.
    fn batch_norm_stats(&self, x: &Self::T) -> Result<BnStats>;

    /// `y = a[c] * x + b[c]`, then ReLU when `relu` (BatchNorm's affine, optionally fused).
    fn channel_affine(&self, x: Self::T, a: &[E], b: &[E], relu: bool) -> Result<Self::T>;

    /// BatchNorm backward given its input `x`, the statistics it normalised with (`mean`,
    /// `invstd`), and whether those were batch statistics (train) or running ones (eval).
    /// Accumulates `dgamma`, `dbeta`; returns `dx`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        x: &Self::T,
        dy: &Self::T,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[E],
        batch_stats: bool,
        dgamma: &mut [E],
        dbeta: &mut [E],
    ) -> Result<Self::T>;

    /// BatchNorm backward through the ReLU that followed it (the two fused): `y` is the ReLU's
    /// output and `dy` the gradient there. The default masks `dy` and calls
    /// [`Backend::batch_norm_backward`].
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_backward(
        &self,
        x: &Self::T,
        y: &Self::T,
        dy: Self::T,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[E],
        batch_stats: bool,
        dgamma: &mut [E],
        dbeta: &mut [E],
    ) -> Result<Self::T> {
        let d = self.relu_backward(y, dy)?;
        self.batch_norm_backward(x, &d, mean, invstd, gamma, batch_stats, dgamma, dbeta)
    }

    /// `max(x, 0)`, in place.
    fn relu(&self, x: Self::T) -> Result<Self::T>;

    /// ReLU backward from its output `y`: `dy * (y > 0)`.
    fn relu_backward(&self, y: &Self::T, dy: Self::T) -> Result<Self::T>;

    /// `a + b`, then ReLU when `relu` (the residual add).
    fn add(&self, a: Self::T, b: &Self::T, relu: bool) -> Result<Self::T>;

    /// Max pooling; returns the output and, per output, the flat input index of its maximum.
    fn max_pool2d(&self, x: &Self::T, g: &PoolGeom) -> Result<(Self::T, Self::PoolIdx)>;

    /// Max pooling backward: routes `dy` to the recorded maxima of an input of `input` shape.
    fn max_pool2d_backward(
        &self,
        dy: &Self::T,
        argmax: &Self::PoolIdx,
        input: Shape,
    ) -> Result<Self::T>;

    /// Average pooling.
    fn avg_pool2d(&self, x: &Self::T, g: &PoolGeom) -> Result<Self::T>;

    /// Average pooling backward to an input of `input` shape.
    fn avg_pool2d_backward(&self, dy: &Self::T, g: &PoolGeom, input: Shape) -> Result<Self::T>;

    /// Global average pooling: `[n, c, h, w] -> [n, c, 1, 1]`.
    fn global_avg_pool(&self, x: &Self::T) -> Result<Self::T>;

    /// Global average pooling backward to an input of `input` shape.
    fn global_avg_pool_backward(&self, dy: &Self::T, input: Shape) -> Result<Self::T>;

    /// Fully connected: `x` is `[n, k, h, w]` flattened to `[n, k*h*w]`, `w` is `[out, k*h*w]`;
    /// returns `[n, out, 1, 1]`.
    fn linear(&self, x: &Self::T, w: &[E], b: Option<&[E]>, out: usize) -> Result<Self::T>;

    /// Fully connected backward: accumulates `dw`, `db`; returns `dx` shaped like `x`.
    fn linear_backward(
        &self,
        x: &Self::T,
        w: &[E],
        dy: &Self::T,
        dw: &mut [E],
        db: Option<&mut [E]>,
    ) -> Result<Self::T>;

    /// Binds `p` to this backend: its values move into the backend's storage and stay there
    /// (with its gradient and optimiser state) until [`Param::unbind`], so ops and the SGD
    /// update ([`Backend::sgd_step`]) stop copying them. Returns false, leaving `p` alone, for a
    /// backend that computes on host values (the default).
    fn bind(&self, p: &mut Param<E>) -> Result<bool> {
        let _ = p;
        Ok(false)
    }

    /// True when device storage with owner `id` ([`crate::nn::DeviceStore::owner`]) belongs
    /// to this backend (never for host backends).
    fn owns(&self, id: u64) -> bool {
        let _ = id;
        false
    }

    /// [`Backend::conv2d`] with the weight and bias as parameters (bound here, or on the host).
    fn conv2d_p(
        &self,
        x: &Self::T,
        w: &Param<E>,
        b: Option<&Param<E>>,
        g: &ConvGeom,
    ) -> Result<Self::T> {
        let b = b.map(|b| b.values("conv bias")).transpose()?;
        self.conv2d(x, w.values("conv weight")?, b, g)
    }

    /// [`Backend::conv2d_backward`] accumulating into the parameters' gradients.
    fn conv2d_backward_p(
        &self,
        x: &Self::T,
        w: &mut Param<E>,
        dy: &Self::T,
        g: &ConvGeom,
        b: Option<&mut Param<E>>,
        need_dx: bool,
    ) -> Result<Option<Self::T>> {
        let db = b.map(|b| b.grad_mut());
        let (w, dw) = w.value_and_grad("conv weight")?;
        self.conv2d_backward(x, w, dy, g, dw, db, need_dx)
    }

    /// [`Backend::linear`] with the weight and bias as parameters.
    fn linear_p(
        &self,
        x: &Self::T,
        w: &Param<E>,
        b: Option<&Param<E>>,
        out: usize,
    ) -> Result<Self::T> {
        let b = b.map(|b| b.values("linear bias")).transpose()?;
        self.linear(x, w.values("linear weight")?, b, out)
    }

    /// [`Backend::linear_backward`] accumulating into the parameters' gradients.
    fn linear_backward_p(
        &self,
        x: &Self::T,
        w: &mut Param<E>,
        dy: &Self::T,
        b: Option<&mut Param<E>>,
    ) -> Result<Self::T> {
        let db = b.map(|b| b.grad_mut());
        let (w, dw) = w.value_and_grad("linear weight")?;
        self.linear_backward(x, w, dy, dw, db)
    }

    /// One SGD step (PyTorch's rule, as [`crate::train::optim::Sgd`]) of a parameter bound to
    /// this backend, on the device; `momentum_init` seeds the momentum buffer when the storage
    /// has none yet (a resumed run). Returns false when `p` is not bound here (the caller
    /// updates it on the host); a bound parameter no backward pass reached is left alone.
    fn sgd_step(
        &self,
        p: &mut Param<E>,
        momentum_init: Option<&[f32]>,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    ) -> Result<bool> {
        let _ = (p, momentum_init, lr, momentum, weight_decay);
        Ok(false)
    }

    /// Loss scaling's unscale-and-check: multiplies every gradient of `params` by `factor`
    /// where it lives and returns whether all of them are finite afterwards. Parameters without
    /// a gradient are skipped. The default handles host gradients and refuses bound ones.
    fn unscale_grads(&self, params: &mut [&mut Param<E>], factor: f32) -> Result<bool> {
        let mut finite = true;
        for p in params.iter_mut() {
            if p.is_bound() {
                return Err(Error::Config(
                    "a bound parameter's gradient can only be unscaled by its backend".into(),
                ));
            }
            finite &= unscale_host(&mut p.grad, factor);
        }
        Ok(finite)
    }

    /// Takes back a tensor its owner no longer needs, so the backend may reuse its buffer for
    /// a later output. The default drops it.
    fn recycle(&self, t: Self::T) {
        drop(t);
    }

    /// SE forward through the crate's SE op: `y = s * x`, or with `residual` the fused
    /// epilogue `y = relu(s * x + residual)`.
    fn se_forward(
        &self,
        w: &SeWeights,
        x: &Self::T,
        residual: Option<&Self::T>,
    ) -> Result<(Self::T, Self::SeSaved)>;

    /// BatchNorm forward on the device with parameters and running statistics bound to this
    /// backend (updating the running statistics there in training); `None` when they are on
    /// the host (the default: the layer then runs [`Backend::batch_norm_stats`] and
    /// [`Backend::channel_affine`] with host arithmetic).
    fn batch_norm_p(
        &self,
        x: &Self::T,
        p: BnParamsMut<'_, E>,
        run: BnRun,
    ) -> Result<Option<(Self::T, BnDeviceSaved)>> {
        let _ = (x, p, run);
        Ok(None)
    }

    /// Backward of [`Backend::batch_norm_p`] (through the fused ReLU's output `relu_y` when
    /// given), accumulating into the bound parameters' gradients.
    fn batch_norm_backward_p(
        &self,
        x: &Self::T,
        relu_y: Option<&Self::T>,
        dy: Self::T,
        saved: &BnDeviceSaved,
        weight: &mut Param<E>,
        bias: &mut Param<E>,
    ) -> Result<Self::T> {
        let _ = (x, relu_y, dy, saved, weight, bias);
        Err(Error::Unsupported(format!(
            "backend `{}` has no device BatchNorm",
            self.name()
        )))
    }

    /// [`Backend::se_forward`] with the weights as parameters (bound here, or on the host).
    fn se_forward_p(
        &self,
        config: SeConfig,
        p: SeLayerParams<'_, E>,
        x: &Self::T,
        residual: Option<&Self::T>,
    ) -> Result<(Self::T, Self::SeSaved)> {
        self.se_forward(&se_weights(config, &p)?, x, residual)
    }

    /// [`Backend::se_backward`] accumulating into the parameters' gradients; returns `d x`
    /// and, with the epilogue, `d residual`.
    fn se_backward_p(
        &self,
        config: SeConfig,
        p: SeLayerParamsMut<'_, E>,
        x: &Self::T,
        residual: Option<&Self::T>,
        saved: &Self::SeSaved,
        dy: &Self::T,
    ) -> Result<(Self::T, Option<Self::T>)> {
        let w = se_weights(config, &p.as_ref())?;
        let out = self.se_backward(&w, x, residual, saved, dy)?;
        add_se_grads(p, out.grads)?;
        Ok((out.dx, out.dresidual))
    }

    /// SE backward through the crate's SE op.
    fn se_backward(
        &self,
        w: &SeWeights,
        x: &Self::T,
        residual: Option<&Self::T>,
        saved: &Self::SeSaved,
        dy: &Self::T,
    ) -> Result<SeBackward<Self::T>>;
}

/// A BatchNorm layer's parameters and running statistics, as an op takes them.
#[derive(Debug)]
pub struct BnParamsMut<'a, E> {
    /// Scale (gamma).
    pub weight: &'a mut Param<E>,
    /// Shift (beta).
    pub bias: &'a mut Param<E>,
    /// Running mean (a buffer).
    pub running_mean: &'a mut Param<E>,
    /// Running variance (a buffer).
    pub running_var: &'a mut Param<E>,
}

/// How a BatchNorm forward normalises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnRun {
    /// Batch statistics (and the running ones updated), else the running statistics.
    pub train: bool,
    /// Running-statistics momentum.
    pub momentum: f64,
    /// Added to the variance.
    pub eps: f64,
    /// A ReLU fused after the affine.
    pub relu: bool,
}

/// What a device BatchNorm forward ([`Backend::batch_norm_p`]) keeps for its backward.
pub type BnDeviceSaved = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// An SE block's parameters (timm's `fc1` / `fc2` 1x1 convolutions), as an op takes them.
#[derive(Clone, Copy, Debug)]
pub struct SeLayerParams<'a, E> {
    /// FC1 weight, `[hidden, C, 1, 1]`.
    pub fc1_weight: &'a Param<E>,
    /// FC1 bias, `[hidden]`.
    pub fc1_bias: Option<&'a Param<E>>,
    /// FC2 weight, `[C, hidden, 1, 1]`.
    pub fc2_weight: &'a Param<E>,
    /// FC2 bias, `[C]`.
    pub fc2_bias: Option<&'a Param<E>>,
}

/// [`SeLayerParams`] with their gradients writable (backward).
#[derive(Debug)]
pub struct SeLayerParamsMut<'a, E> {
    /// FC1 weight.
    pub fc1_weight: &'a mut Param<E>,
    /// FC1 bias.
    pub fc1_bias: Option<&'a mut Param<E>>,
    /// FC2 weight.
    pub fc2_weight: &'a mut Param<E>,
    /// FC2 bias.
    pub fc2_bias: Option<&'a mut Param<E>>,
}

impl<E> SeLayerParamsMut<'_, E> {
    /// The parameters read-only.
    pub fn as_ref(&self) -> SeLayerParams<'_, E> {
        SeLayerParams {
            fc1_weight: self.fc1_weight,
            fc1_bias: self.fc1_bias.as_deref(),
            fc2_weight: self.fc2_weight,
            fc2_bias: self.fc2_bias.as_deref(),
        }
    }
}

/// The host values of SE parameters in the SE op's form (f32, PyTorch layout).
pub fn se_weights<E: Real>(config: SeConfig, p: &SeLayerParams<'_, E>) -> Result<SeWeights> {
    let f = |p: &Param<E>, what: &str| -> Result<Vec<f32>> {
        Ok(p.values(what)?.iter().map(|v| v.to_f32()).collect())
    };
    let b1 = p.fc1_bias.map(|b| f(b, "SE fc1 bias")).transpose()?;
    let b2 = p.fc2_bias.map(|b| f(b, "SE fc2 bias")).transpose()?;
    SeWeights::from_parts(
        config,
        f(p.fc1_weight, "SE fc1 weight")?,
        b1,
        f(p.fc2_weight, "SE fc2 weight")?,
        b2,
    )
}

/// Adds SE parameter gradients (as the SE op returns them) to the host gradients.
fn add_se_grads<E: Real>(p: SeLayerParamsMut<'_, E>, g: SeGrads<f64>) -> Result<()> {
    let add = |p: &mut Param<E>, g: &[f64]| -> Result<()> {
        let g: Vec<E> = g.iter().map(|&v| E::from_f64(v)).collect();
        p.accumulate(&g)
    };
    add(p.fc1_weight, &g.dw1)?;
    add(p.fc2_weight, &g.dw2)?;
    if let (Some(p), Some(g)) = (p.fc1_bias, g.db1) {
        add(p, &g)?;
    }
    if let (Some(p), Some(g)) = (p.fc2_bias, g.db2) {
        add(p, &g)?;
    }
    Ok(())
}

/// Checks `t` is NCHW and returns its shape.
pub(crate) fn nchw<E: Real>(t: &Tensor<E>, what: &str) -> Result<Shape> {
    if t.layout() != Layout::Nchw {
        return Err(Error::Shape(format!(
            "{what} must be NCHW, got {}",
            t.layout()
        )));
    }
    Ok(t.shape())
}

/// Checks two shapes are equal.
pub(crate) fn same_shape(a: Shape, b: Shape, what: &str) -> Result<()> {
    if a != b {
        return Err(Error::Shape(format!("{what}: {a} vs {b}")));
    }
    Ok(())
}

/// Checks a slice length.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Length {
            what,
            got,
            expected,
        });
    }
    Ok(())
}

/// A new NCHW tensor from data (the length was computed from `shape`).
pub(crate) fn tensor<E: Real>(shape: Shape, data: Vec<E>) -> Result<Tensor<E>> {
    Tensor::from_vec(shape, Layout::Nchw, data)
}

/// Checks a BatchNorm backward's per-channel lengths (mean, invstd, gamma, dgamma, dbeta) are
/// all `c`.
pub(crate) fn check_bn_lens(c: usize, lens: [usize; 5]) -> Result<()> {
    let what = [
        "batch norm mean",
        "batch norm invstd",
        "batch norm weight",
        "batch norm weight gradient",
        "batch norm bias gradient",
    ];
    for (what, len) in what.into_iter().zip(lens) {
        check_len(what, len, c)?;
    }
    Ok(())
}

/// The shape of a channel concatenation of tensors of `shapes` (same n, h, w).
pub(crate) fn concat_shape(mut shapes: impl Iterator<Item = Shape>) -> Result<Shape> {
    let first = shapes
        .next()
        .ok_or_else(|| Error::Shape("concatenation of no tensors".into()))?;
    let mut c = first.c;
    for s in shapes {
        if s.n != first.n || s.h != first.h || s.w != first.w {
            return Err(Error::Shape(format!(
                "cannot concatenate {s} with {first} along channels"
            )));
        }
        c += s.c;
    }
    Shape::try_new(first.n, c, first.h, first.w)
}

/// Checks channel groups `sizes` add up to `s`'s channels.
pub(crate) fn check_split(s: Shape, sizes: &[usize]) -> Result<()> {
    if sizes.iter().sum::<usize>() != s.c {
        return Err(Error::Shape(format!(
            "cannot split {s} into channel groups {sizes:?}"
        )));
    }
    Ok(())
}

/// `x * mask` on the host (dropout).
pub(crate) fn host_mul_mask<E: Real>(mut x: Tensor<E>, mask: &[E]) -> Result<Tensor<E>> {
    check_len("dropout mask", mask.len(), x.data().len())?;
    x.data_mut()
        .iter_mut()
        .zip(mask)
        .for_each(|(v, &m)| *v *= m);
    Ok(x)
}

/// Channel concatenation of NCHW tensors (Inception's output).
pub(crate) fn host_concat_channels<E: Real>(parts: &[Tensor<E>]) -> Result<Tensor<E>> {
    for p in parts {
        nchw(p, "concatenation input")?;
    }
    let out = concat_shape(parts.iter().map(|p| p.shape()))?;
    let mut data = Vec::with_capacity(out.numel());
    for n in 0..out.n {
        for p in parts {
            let k = p.shape().sample_numel();
            data.extend_from_slice(&p.data()[n * k..(n + 1) * k]);
        }
    }
    tensor(out, data)
}

/// Splits an NCHW tensor's channels into pieces of `sizes` (the adjoint of
/// [`host_concat_channels`]).
pub(crate) fn host_split_channels<E: Real>(
    x: &Tensor<E>,
    sizes: &[usize],
) -> Result<Vec<Tensor<E>>> {
    let s = x.shape();
    check_split(s, sizes)?;
    let hw = s.hw();
    let mut out = Vec::with_capacity(sizes.len());
    let mut c0 = 0;
    for &c in sizes {
        let mut data = Vec::with_capacity(s.n * c * hw);
        for n in 0..s.n {
            let base = (n * s.c + c0) * hw;
            data.extend_from_slice(&x.data()[base..base + c * hw]);
        }
        out.push(tensor(Shape::try_new(s.n, c, s.h, s.w)?, data)?);
        c0 += c;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_sizes_follow_pytorch() {
        // timm stem pool: 3x3 s2 p1 on 112 -> 56; Cadene: 3x3 s2 ceil on 112 -> 56, on 111 -> 55.
        let timm = PoolGeom::new(3, 2, 1, false).unwrap();
        assert_eq!(timm.out_size(112).unwrap(), 56);
        let caffe = PoolGeom::new(3, 2, 0, true).unwrap();
        assert_eq!(caffe.out_size(112).unwrap(), 56);
        assert_eq!(caffe.out_size(111).unwrap(), 55);
        assert_eq!(caffe.out_size(6).unwrap(), 3);
        // floor mode on 6: (6-3)/2+1 = 2.
        assert_eq!(
            PoolGeom::new(3, 2, 0, false).unwrap().out_size(6).unwrap(),
            2
        );
        // ceil mode never starts a window in the right padding: 5, k2 s2 p1 -> 3 + 1 -> 3.
        assert_eq!(
            PoolGeom::new(2, 2, 1, true).unwrap().out_size(5).unwrap(),
            3
        );
        assert!(PoolGeom::new(3, 2, 2, false).is_err());
        assert!(PoolGeom::new(3, 1, 0, false).unwrap().out_size(2).is_err());
    }

    #[test]
    fn conv_geometry() {
        let g = ConvGeom::new(8, 16, 3, 2, 1, 4).unwrap();
        assert_eq!(g.weight_shape(), [16, 2, 3, 3]);
        let y = g.output_shape(Shape::new(2, 8, 7, 6)).unwrap();
        assert_eq!(y, Shape::new(2, 16, 4, 3));
        assert_eq!(
            g.macs(Shape::new(2, 8, 7, 6)).unwrap(),
            (2 * 16 * 12 * 18) as u64
        );
        assert!(g.output_shape(Shape::new(1, 7, 7, 7)).is_err());
        assert!(ConvGeom::new(6, 16, 3, 1, 1, 4).is_err());
        assert!(ConvGeom::new(8, 16, 0, 1, 1, 1).is_err());
    }
}
