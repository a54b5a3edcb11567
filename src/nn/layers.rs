//! Layers: each holds its parameters and the cache its backward pass needs, and calls a
//! [`Backend`] for the arithmetic.
//!
//! Parameter names and shapes follow PyTorch (`weight`, `bias`, `running_mean`, ...), so a
//! network's names are timm's.

use crate::error::{Error, Result};
use crate::nn::backend::{Backend, ConvGeom, PoolGeom};
use crate::nn::param::{Init, Mode, Param, Real, Slot, SlotRef, Visit, VisitMut};
use crate::rng;
use crate::se::{SeConfig, SeGrads, SeWeights};
use crate::tensor::{Layout, Shape, Tensor};
use rand::Rng;
use std::any::Any;
use std::sync::Arc;

/// A network piece with a forward and an explicit backward pass.
///
/// `forward` takes its input by value (layers reuse buffers and keep what backward needs);
/// `backward` takes `d loss / d output`, *accumulates* parameter gradients, and returns
/// `d loss / d input`. Backward is valid once after a forward in [`Mode::Train`] or
/// [`Mode::Eval`]; after [`Mode::Infer`] it is an error.
pub trait Module<E: Real> {
    /// The forward pass.
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>>;

    /// The backward pass of the last recorded forward.
    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>>;

    /// Visits every parameter, buffer and counter, named `prefix` + its PyTorch name.
    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>);

    /// [`Module::visit`], mutably.
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>);

    /// The output shape for an input of shape `x` (an error if `x` does not fit).
    fn output_shape(&self, x: Shape) -> Result<Shape>;

    /// Multiply-accumulates of one forward pass at input `x` (convolutions, linear layers and
    /// SE excitations).
    fn macs(&self, x: Shape) -> Result<u64>;
}

/// The error for a backward pass without a recorded forward.
pub(crate) fn no_forward(what: &str) -> Error {
    Error::Config(format!(
        "{what}: backward called without a recorded forward (run forward in Train or Eval mode)"
    ))
}

fn nchw_tensor<E: Real>(shape: Shape, data: Vec<E>) -> Result<Tensor<E>> {
    Tensor::from_vec(shape, Layout::Nchw, data)
}

/// Keeps `x` for backward when `mode` records; otherwise hands it back to the backend.
fn keep<E: Real, B: Backend<E>>(b: &B, x: Tensor<E>, mode: Mode) -> Option<Tensor<E>> {
    if mode.records() {
        Some(x)
    } else {
        b.recycle(x);
        None
    }
}

/// `nn.Conv2d`: square kernel, stride, padding, groups, optional bias.
#[derive(Clone, Debug)]
pub struct Conv2d<E> {
    geom: ConvGeom,
    /// Weight, `[out, in / groups, k, k]`.
    pub weight: Param<E>,
    /// Bias, `[out]`.
    pub bias: Option<Param<E>>,
    /// Whether backward computes `d loss / d input` (off for a network's first layer).
    pub input_grad: bool,
    cache: Option<Tensor<E>>,
}

impl<E: Real> Conv2d<E> {
    /// A convolution initialised as timm does (Kaiming normal, fan-out, ReLU gain; bias
    /// uniform in `+-1/sqrt(fan_in)`).
    pub fn new(geom: ConvGeom, bias: bool) -> Self {
        let k2 = geom.kernel * geom.kernel;
        let fan_out = (geom.out_ch * k2) as f32;
        let fan_in = (geom.in_per_group() * k2) as f32;
        Conv2d {
            geom,
            weight: Param::new(&geom.weight_shape(), Init::Normal((2.0 / fan_out).sqrt())),
            bias: bias.then(|| Param::new(&[geom.out_ch], Init::Uniform(1.0 / fan_in.sqrt()))),
            input_grad: true,
            cache: None,
        }
    }

    /// The geometry.
    pub fn geom(&self) -> &ConvGeom {
        &self.geom
    }
}

impl<E: Real> Module<E> for Conv2d<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let bias = match &self.bias {
            Some(p) => Some(p.values("conv bias")?),
            None => None,
        };
        let y = b.conv2d(&x, self.weight.values("conv weight")?, bias, &self.geom)?;
        self.cache = keep(b, x, mode);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let x = self.cache.take().ok_or_else(|| no_forward("conv"))?;
        let (w, dw) = self.weight.value_and_grad("conv weight")?;
        let db = self.bias.as_mut().map(|p| p.grad_mut());
        let dx = b.conv2d_backward(&x, w, &dy, &self.geom, dw, db, self.input_grad)?;
        b.recycle(dy);
        match dx {
            Some(dx) => {
                b.recycle(x);
                Ok(dx)
            }
            // The caller asked for no input gradient: hand back zeros of the right shape.
            None => Tensor::zeros(x.shape(), Layout::Nchw),
        }
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        f(format!("{prefix}weight"), SlotRef::Param(&self.weight));
        if let Some(b) = &self.bias {
            f(format!("{prefix}bias"), SlotRef::Param(b));
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        f(format!("{prefix}weight"), Slot::Param(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(format!("{prefix}bias"), Slot::Param(b));
        }
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.geom.output_shape(x)
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        self.geom.macs(x)
    }
}

#[derive(Clone, Debug)]
struct BnCache<E> {
    x: Tensor<E>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    batch_stats: bool,
}

/// `nn.BatchNorm2d`: batch statistics in training (updating the running ones with
/// `momentum`), running statistics otherwise.
#[derive(Clone, Debug)]
pub struct BatchNorm2d<E> {
    channels: usize,
    /// `eps` added to the variance.
    pub eps: f64,
    /// Running-statistics momentum (PyTorch's convention: `new = (1 - m) * old + m * batch`).
    pub momentum: f64,
    /// Scale (gamma), `[C]`.
    pub weight: Param<E>,
    /// Shift (beta), `[C]`.
    pub bias: Param<E>,
    /// Running mean, `[C]` (a buffer).
    pub running_mean: Param<E>,
    /// Running (unbiased) variance, `[C]` (a buffer).
    pub running_var: Param<E>,
    /// Training batches seen.
    pub num_batches_tracked: i64,
    cache: Option<BnCache<E>>,
}

impl<E: Real> BatchNorm2d<E> {
    /// PyTorch's defaults: `eps = 1e-5`, `momentum = 0.1`, weight 1, bias 0.
    pub fn new(channels: usize) -> Self {
        BatchNorm2d {
            channels,
            eps: 1e-5,
            momentum: 0.1,
            weight: Param::new(&[channels], Init::Ones),
            bias: Param::new(&[channels], Init::Zeros),
            running_mean: Param::new(&[channels], Init::Zeros),
            running_var: Param::new(&[channels], Init::Ones),
            num_batches_tracked: 0,
            cache: None,
        }
    }

    /// Initialises the scale to zero (timm's `zero_init_last` for a residual branch's last BN).
    pub fn zero_init(mut self) -> Self {
        self.weight = Param::new(&[self.channels], Init::Zeros);
        self
    }

    /// Forward with the following ReLU fused in (inference only, nothing recorded).
    pub fn forward_relu<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>) -> Result<Tensor<E>> {
        let (a, s, _, _) = self.running_affine(x.shape())?;
        self.cache = None;
        b.channel_affine(x, &a, &s, true)
    }

    /// The per-channel affine `(a, b)` from the running statistics, with `mean` and `invstd`.
    #[allow(clippy::type_complexity)]
    fn running_affine(&self, x: Shape) -> Result<(Vec<E>, Vec<E>, Vec<f64>, Vec<f64>)> {
        self.check(x)?;
        let mean: Vec<f64> = self
            .running_mean
            .values("batch norm running_mean")?
            .iter()
            .map(|v| v.to_f64())
            .collect();
        let invstd: Vec<f64> = self
            .running_var
            .values("batch norm running_var")?
            .iter()
            .map(|v| 1.0 / (v.to_f64() + self.eps).sqrt())
            .collect();
        let (a, s) = self.affine(&mean, &invstd)?;
        Ok((a, s, mean, invstd))
    }

    fn affine(&self, mean: &[f64], invstd: &[f64]) -> Result<(Vec<E>, Vec<E>)> {
        let g = self.weight.values("batch norm weight")?;
        let bt = self.bias.values("batch norm bias")?;
        let a: Vec<f64> = (0..self.channels)
            .map(|c| g[c].to_f64() * invstd[c])
            .collect();
        let s = (0..self.channels)
            .map(|c| E::from_f64(bt[c].to_f64() - mean[c] * a[c]))
            .collect();
        Ok((a.into_iter().map(E::from_f64).collect(), s))
    }

    fn check(&self, x: Shape) -> Result<()> {
        if x.c != self.channels {
            return Err(Error::Shape(format!(
                "batch norm has {} channels, input is {x}",
                self.channels
            )));
        }
        Ok(())
    }
}

impl<E: Real> Module<E> for BatchNorm2d<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let s = x.shape();
        self.check(s)?;
        let (a, sh, mean, invstd) = if mode.is_train() {
            let m = s.n * s.hw();
            if m < 2 {
                return Err(Error::Shape(format!(
                    "batch norm in training needs more than one value per channel, input is {s}"
                )));
            }
            let st = b.batch_norm_stats(&x)?;
            let invstd: Vec<f64> = st.var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
            let (a, sh) = self.affine(&st.mean, &invstd)?;
            // Running statistics use the unbiased variance, as PyTorch does.
            let mo = self.momentum;
            let unbias = m as f64 / (m as f64 - 1.0);
            let rm = &mut self.running_mean;
            rm.values("batch norm running_mean")?;
            for (r, &mu) in rm.value.iter_mut().zip(&st.mean) {
                *r = E::from_f64((1.0 - mo) * r.to_f64() + mo * mu);
            }
            let rv = &mut self.running_var;
            rv.values("batch norm running_var")?;
            for (r, &v) in rv.value.iter_mut().zip(&st.var) {
                *r = E::from_f64((1.0 - mo) * r.to_f64() + mo * v * unbias);
            }
            self.num_batches_tracked += 1;
            (a, sh, st.mean, invstd)
        } else {
            self.running_affine(s)?
        };
        if mode.records() {
            let y = b.channel_affine(x.clone(), &a, &sh, false)?;
            self.cache = Some(BnCache {
                x,
                mean,
                invstd,
                batch_stats: mode.is_train(),
            });
            Ok(y)
        } else {
            self.cache = None;
            b.channel_affine(x, &a, &sh, false)
        }
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let c = self.cache.take().ok_or_else(|| no_forward("batch norm"))?;
        let (gamma, dgamma) = self.weight.value_and_grad("batch norm weight")?;
        let dbeta = self.bias.grad_mut();
        b.batch_norm_backward(
            &c.x,
            &dy,
            &c.mean,
            &c.invstd,
            gamma,
            c.batch_stats,
            dgamma,
            dbeta,
        )
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        f(format!("{prefix}weight"), SlotRef::Param(&self.weight));
        f(format!("{prefix}bias"), SlotRef::Param(&self.bias));
        f(
            format!("{prefix}running_mean"),
            SlotRef::Buffer(&self.running_mean),
        );
        f(
            format!("{prefix}running_var"),
            SlotRef::Buffer(&self.running_var),
        );
        f(
            format!("{prefix}num_batches_tracked"),
            SlotRef::Counter(self.num_batches_tracked),
        );
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        f(format!("{prefix}weight"), Slot::Param(&mut self.weight));
        f(format!("{prefix}bias"), Slot::Param(&mut self.bias));
        f(
            format!("{prefix}running_mean"),
            Slot::Buffer(&mut self.running_mean),
        );
        f(
            format!("{prefix}running_var"),
            Slot::Buffer(&mut self.running_var),
        );
        f(
            format!("{prefix}num_batches_tracked"),
            Slot::Counter(&mut self.num_batches_tracked),
        );
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.check(x)?;
        Ok(x)
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

/// `nn.ReLU`.
#[derive(Clone, Debug, Default)]
pub struct Relu<E> {
    cache: Option<Tensor<E>>,
}

impl<E: Real> Relu<E> {
    /// A ReLU.
    pub fn new() -> Self {
        Relu { cache: None }
    }
}

impl<E: Real> Module<E> for Relu<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let y = b.relu(x)?;
        self.cache = mode.records().then(|| y.clone());
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let y = self.cache.take().ok_or_else(|| no_forward("relu"))?;
        b.relu_backward(&y, dy)
    }

    fn visit<'a>(&'a self, _: &str, _: Visit<'a, '_, E>) {}
    fn visit_mut<'a>(&'a mut self, _: &str, _: VisitMut<'a, '_, E>) {}

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        Ok(x)
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

/// `nn.MaxPool2d` (with `ceil_mode`, as Caffe-derived models use).
#[derive(Clone, Debug)]
pub struct MaxPool2d {
    geom: PoolGeom,
    cache: Option<(Vec<u32>, Shape)>,
}

impl MaxPool2d {
    /// A max pool with this geometry.
    pub fn new(geom: PoolGeom) -> Self {
        MaxPool2d { geom, cache: None }
    }
}

impl<E: Real> Module<E> for MaxPool2d {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let (y, arg) = b.max_pool2d(&x, &self.geom)?;
        self.cache = mode.records().then_some((arg, x.shape()));
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let (arg, s) = self.cache.take().ok_or_else(|| no_forward("max pool"))?;
        b.max_pool2d_backward(&dy, &arg, s)
    }

    fn visit<'a>(&'a self, _: &str, _: Visit<'a, '_, E>) {}
    fn visit_mut<'a>(&'a mut self, _: &str, _: VisitMut<'a, '_, E>) {}

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.geom.output_shape(x)
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

/// `nn.AvgPool2d` (`ceil_mode` and `count_include_pad` as in PyTorch).
#[derive(Clone, Debug)]
pub struct AvgPool2d {
    geom: PoolGeom,
    cache: Option<Shape>,
}

impl AvgPool2d {
    /// An average pool with this geometry.
    pub fn new(geom: PoolGeom) -> Self {
        AvgPool2d { geom, cache: None }
    }
}

impl<E: Real> Module<E> for AvgPool2d {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let y = b.avg_pool2d(&x, &self.geom)?;
        self.cache = mode.records().then_some(x.shape());
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let s = self.cache.take().ok_or_else(|| no_forward("avg pool"))?;
        b.avg_pool2d_backward(&dy, &self.geom, s)
    }

    fn visit<'a>(&'a self, _: &str, _: Visit<'a, '_, E>) {}
    fn visit_mut<'a>(&'a mut self, _: &str, _: VisitMut<'a, '_, E>) {}

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.geom.output_shape(x)
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

/// Global average pooling, `[n, c, h, w] -> [n, c, 1, 1]`.
#[derive(Clone, Debug, Default)]
pub struct GlobalAvgPool {
    cache: Option<Shape>,
}

impl GlobalAvgPool {
    /// A global average pool.
    pub fn new() -> Self {
        GlobalAvgPool { cache: None }
    }
}

impl<E: Real> Module<E> for GlobalAvgPool {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        let y = b.global_avg_pool(&x)?;
        self.cache = mode.records().then_some(x.shape());
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let s = self.cache.take().ok_or_else(|| no_forward("global pool"))?;
        b.global_avg_pool_backward(&dy, s)
    }

    fn visit<'a>(&'a self, _: &str, _: Visit<'a, '_, E>) {}
    fn visit_mut<'a>(&'a mut self, _: &str, _: VisitMut<'a, '_, E>) {}

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        Ok(Shape::new(x.n, x.c, 1, 1))
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

/// `nn.Linear` on the flattened input: `[n, c, h, w] -> [n, out, 1, 1]`.
#[derive(Clone, Debug)]
pub struct Linear<E> {
    in_features: usize,
    out_features: usize,
    /// Weight, `[out, in]`.
    pub weight: Param<E>,
    /// Bias, `[out]`.
    pub bias: Option<Param<E>>,
    cache: Option<Tensor<E>>,
}

impl<E: Real> Linear<E> {
    /// A linear layer with PyTorch's default initialisation (uniform in `+-1/sqrt(in)`).
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        Linear {
            in_features,
            out_features,
            weight: Param::new(&[out_features, in_features], Init::Uniform(bound)),
            bias: bias.then(|| Param::new(&[out_features], Init::Uniform(bound))),
            cache: None,
        }
    }

    fn check(&self, x: Shape) -> Result<()> {
        if x.sample_numel() != self.in_features {
            return Err(Error::Shape(format!(
                "linear layer takes {} features, input is {x}",
                self.in_features
            )));
        }
        Ok(())
    }
}

impl<E: Real> Module<E> for Linear<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        self.check(x.shape())?;
        let bias = match &self.bias {
            Some(p) => Some(p.values("linear bias")?),
            None => None,
        };
        let y = b.linear(
            &x,
            self.weight.values("linear weight")?,
            bias,
            self.out_features,
        )?;
        self.cache = mode.records().then_some(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        let x = self.cache.take().ok_or_else(|| no_forward("linear"))?;
        let (w, dw) = self.weight.value_and_grad("linear weight")?;
        let db = self.bias.as_mut().map(|p| p.grad_mut());
        b.linear_backward(&x, w, &dy, dw, db)
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        f(format!("{prefix}weight"), SlotRef::Param(&self.weight));
        if let Some(b) = &self.bias {
            f(format!("{prefix}bias"), SlotRef::Param(b));
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        f(format!("{prefix}weight"), Slot::Param(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(format!("{prefix}bias"), Slot::Param(b));
        }
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.check(x)?;
        Ok(Shape::new(x.n, self.out_features, 1, 1))
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        self.check(x)?;
        Ok((x.n * self.in_features * self.out_features) as u64)
    }
}

/// `nn.Dropout` (inverted: kept values are scaled by `1 / (1 - p)`), active in
/// [`Mode::Train`] only. Masks come from a seeded generator advanced on every training pass.
#[derive(Clone, Debug)]
pub struct Dropout<E> {
    p: f64,
    seed: u64,
    calls: u64,
    cache: Option<Option<Vec<E>>>,
}

impl<E: Real> Dropout<E> {
    /// Dropout with probability `p` in `[0, 1)`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Config(format!(
                "dropout probability {p} is not in [0, 1)"
            )));
        }
        Ok(Dropout {
            p,
            seed: 0x5e_d0,
            calls: 0,
            cache: None,
        })
    }

    /// Restarts the mask sequence from `seed` (for reproducible training and gradient checks).
    pub fn reseed(&mut self, seed: u64) {
        self.seed = seed;
        self.calls = 0;
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl<E: Real> Module<E> for Dropout<E> {
    fn forward<B: Backend<E>>(
        &mut self,
        _b: &B,
        mut x: Tensor<E>,
        mode: Mode,
    ) -> Result<Tensor<E>> {
        if !mode.is_train() || self.p == 0.0 {
            self.cache = mode.records().then_some(None);
            return Ok(x);
        }
        let mut r = rng::seeded(self.seed ^ self.calls.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.calls += 1;
        let keep = E::from_f64(1.0 / (1.0 - self.p));
        let mask: Vec<E> = (0..x.data().len())
            .map(|_| {
                if r.gen::<f64>() < self.p {
                    E::ZERO
                } else {
                    keep
                }
            })
            .collect();
        x.data_mut()
            .iter_mut()
            .zip(&mask)
            .for_each(|(v, &m)| *v *= m);
        self.cache = Some(Some(mask));
        Ok(x)
    }

    fn backward<B: Backend<E>>(&mut self, _b: &B, mut dy: Tensor<E>) -> Result<Tensor<E>> {
        match self.cache.take().ok_or_else(|| no_forward("dropout"))? {
            None => Ok(dy),
            Some(mask) => {
                if mask.len() != dy.data().len() {
                    return Err(Error::Length {
                        what: "dropout gradient",
                        got: dy.data().len(),
                        expected: mask.len(),
                    });
                }
                dy.data_mut()
                    .iter_mut()
                    .zip(&mask)
                    .for_each(|(v, &m)| *v *= m);
                Ok(dy)
            }
        }
    }

    fn visit<'a>(&'a self, _: &str, _: Visit<'a, '_, E>) {}
    fn visit_mut<'a>(&'a mut self, _: &str, _: VisitMut<'a, '_, E>) {}

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        Ok(x)
    }

    fn macs(&self, _x: Shape) -> Result<u64> {
        Ok(0)
    }
}

#[derive(Clone, Debug)]
struct SeCache<E> {
    x: Tensor<E>,
    residual: Option<Tensor<E>>,
    /// The backend's `SeSaved`, type-erased (layers are generic over the element, not the
    /// backend); backward downcasts it.
    saved: Arc<dyn Any + Send + Sync>,
}

/// The SE block (timm's `SEModule` names: `fc1`, `fc2` as 1x1 convolutions), computed by the
/// crate's SE op through the backend. With a residual it is the fused epilogue
/// `relu(s * x + residual)`.
#[derive(Clone, Debug)]
pub struct SqueezeExcite<E> {
    config: SeConfig,
    /// FC1 weight, `[hidden, C, 1, 1]`.
    pub fc1_weight: Param<E>,
    /// FC1 bias, `[hidden]` (when the config has biases).
    pub fc1_bias: Option<Param<E>>,
    /// FC2 weight, `[C, hidden, 1, 1]`.
    pub fc2_weight: Param<E>,
    /// FC2 bias, `[C]`.
    pub fc2_bias: Option<Param<E>>,
    cache: Option<SeCache<E>>,
}

impl<E: Real> SqueezeExcite<E> {
    /// An SE block for `config`, initialised as timm does (its FCs are 1x1 convolutions).
    pub fn new(config: SeConfig) -> Result<Self> {
        config.validate()?;
        let (c, d) = (config.channels, config.hidden);
        let bias = config.bias;
        Ok(SqueezeExcite {
            config,
            fc1_weight: Param::new(&[d, c, 1, 1], Init::Normal((2.0 / d as f32).sqrt())),
            fc1_bias: bias.then(|| Param::new(&[d], Init::Uniform(1.0 / (c as f32).sqrt()))),
            fc2_weight: Param::new(&[c, d, 1, 1], Init::Normal((2.0 / c as f32).sqrt())),
            fc2_bias: bias.then(|| Param::new(&[c], Init::Uniform(1.0 / (d as f32).sqrt()))),
            cache: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SeConfig {
        &self.config
    }

    /// The weights in the SE op's form (f32, PyTorch layout).
    pub fn weights(&self) -> Result<SeWeights> {
        let f = |p: &Param<E>, what: &str| -> Result<Vec<f32>> {
            Ok(p.values(what)?.iter().map(|v| v.to_f32()).collect())
        };
        let b1 = match &self.fc1_bias {
            Some(p) => Some(f(p, "SE fc1 bias")?),
            None => None,
        };
        let b2 = match &self.fc2_bias {
            Some(p) => Some(f(p, "SE fc2 bias")?),
            None => None,
        };
        SeWeights::from_parts(
            self.config,
            f(&self.fc1_weight, "SE fc1 weight")?,
            b1,
            f(&self.fc2_weight, "SE fc2 weight")?,
            b2,
        )
    }

    /// `relu(s * x + residual)` (the fused epilogue).
    pub fn forward_fused<B: Backend<E>>(
        &mut self,
        b: &B,
        x: Tensor<E>,
        residual: Tensor<E>,
        mode: Mode,
    ) -> Result<Tensor<E>> {
        self.run(b, x, Some(residual), mode)
    }

    /// Backward of [`SqueezeExcite::forward_fused`]: `(d x, d residual)`.
    pub fn backward_fused<B: Backend<E>>(
        &mut self,
        b: &B,
        dy: Tensor<E>,
    ) -> Result<(Tensor<E>, Tensor<E>)> {
        let (dx, dr) = self.run_backward(b, dy)?;
        let dr = dr.ok_or_else(|| {
            Error::Config("SE backward_fused after a forward without a residual".into())
        })?;
        Ok((dx, dr))
    }

    fn run<B: Backend<E>>(
        &mut self,
        b: &B,
        x: Tensor<E>,
        residual: Option<Tensor<E>>,
        mode: Mode,
    ) -> Result<Tensor<E>> {
        let w = self.weights()?;
        let (y, saved) = b.se_forward(&w, &x, residual.as_ref())?;
        if mode.records() {
            self.cache = Some(SeCache {
                x,
                residual,
                saved: Arc::new(saved),
            });
        } else {
            self.cache = None;
            b.recycle(x);
            if let Some(r) = residual {
                b.recycle(r);
            }
        }
        Ok(y)
    }

    fn run_backward<B: Backend<E>>(
        &mut self,
        b: &B,
        dy: Tensor<E>,
    ) -> Result<(Tensor<E>, Option<Tensor<E>>)> {
        let c = self.cache.take().ok_or_else(|| no_forward("SE"))?;
        let saved = c.saved.downcast_ref::<B::SeSaved>().ok_or_else(|| {
            Error::Config(format!(
                "SE backward on backend `{}` after a forward on another backend",
                b.name()
            ))
        })?;
        let w = self.weights()?;
        let out = b.se_backward(&w, &c.x, c.residual.as_ref(), saved, &dy)?;
        let SeGrads { dw1, db1, dw2, db2 } = out.grads;
        accumulate(&mut self.fc1_weight, &dw1)?;
        accumulate(&mut self.fc2_weight, &dw2)?;
        if let (Some(p), Some(g)) = (&mut self.fc1_bias, db1) {
            accumulate(p, &g)?;
        }
        if let (Some(p), Some(g)) = (&mut self.fc2_bias, db2) {
            accumulate(p, &g)?;
        }
        Ok((out.dx, out.dresidual))
    }

    fn check(&self, x: Shape) -> Result<()> {
        if x.c != self.config.channels {
            return Err(Error::Shape(format!(
                "SE block has {} channels, input is {x}",
                self.config.channels
            )));
        }
        Ok(())
    }
}

fn accumulate<E: Real>(p: &mut Param<E>, g: &[f64]) -> Result<()> {
    let g: Vec<E> = g.iter().map(|&v| E::from_f64(v)).collect();
    p.accumulate(&g)
}

impl<E: Real> Module<E> for SqueezeExcite<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        self.run(b, x, None, mode)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: Tensor<E>) -> Result<Tensor<E>> {
        Ok(self.run_backward(b, dy)?.0)
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        f(
            format!("{prefix}fc1.weight"),
            SlotRef::Param(&self.fc1_weight),
        );
        if let Some(p) = &self.fc1_bias {
            f(format!("{prefix}fc1.bias"), SlotRef::Param(p));
        }
        f(
            format!("{prefix}fc2.weight"),
            SlotRef::Param(&self.fc2_weight),
        );
        if let Some(p) = &self.fc2_bias {
            f(format!("{prefix}fc2.bias"), SlotRef::Param(p));
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        f(
            format!("{prefix}fc1.weight"),
            Slot::Param(&mut self.fc1_weight),
        );
        if let Some(p) = &mut self.fc1_bias {
            f(format!("{prefix}fc1.bias"), Slot::Param(p));
        }
        f(
            format!("{prefix}fc2.weight"),
            Slot::Param(&mut self.fc2_weight),
        );
        if let Some(p) = &mut self.fc2_bias {
            f(format!("{prefix}fc2.bias"), Slot::Param(p));
        }
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        self.check(x)?;
        Ok(x)
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        self.check(x)?;
        // Two FCs per sample plus the scale (one multiply per element).
        Ok((x.n * 2 * self.config.channels * self.config.hidden + x.numel()) as u64)
    }
}

/// Channel concatenation of NCHW tensors (Inception's output).
pub(crate) fn concat_channels<E: Real>(parts: &[Tensor<E>]) -> Result<Tensor<E>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::Shape("concatenation of no tensors".into()))?
        .shape();
    let mut c = 0;
    for p in parts {
        let s = p.shape();
        if s.n != first.n || s.h != first.h || s.w != first.w || p.layout() != Layout::Nchw {
            return Err(Error::Shape(format!(
                "cannot concatenate {s} with {first} along channels"
            )));
        }
        c += s.c;
    }
    let out = Shape::try_new(first.n, c, first.h, first.w)?;
    let mut data = Vec::with_capacity(out.numel());
    for n in 0..first.n {
        for p in parts {
            let k = p.shape().sample_numel();
            data.extend_from_slice(&p.data()[n * k..(n + 1) * k]);
        }
    }
    nchw_tensor(out, data)
}

/// Splits an NCHW tensor's channels into pieces of `sizes` (the adjoint of
/// [`concat_channels`]).
pub(crate) fn split_channels<E: Real>(x: &Tensor<E>, sizes: &[usize]) -> Result<Vec<Tensor<E>>> {
    let s = x.shape();
    if sizes.iter().sum::<usize>() != s.c {
        return Err(Error::Shape(format!(
            "cannot split {s} into channel groups {sizes:?}"
        )));
    }
    let hw = s.hw();
    let mut out = Vec::with_capacity(sizes.len());
    let mut c0 = 0;
    for &c in sizes {
        let mut data = Vec::with_capacity(s.n * c * hw);
        for n in 0..s.n {
            let base = (n * s.c + c0) * hw;
            data.extend_from_slice(&x.data()[base..base + c * hw]);
        }
        out.push(nchw_tensor(Shape::try_new(s.n, c, s.h, s.w)?, data)?);
        c0 += c;
    }
    Ok(out)
}
