//! Layers: each holds its parameters and the cache its backward pass needs, and calls a
//! [`Backend`] for the arithmetic.
//!
//! Parameter names and shapes follow PyTorch (`weight`, `bias`, `running_mean`, ...), so a
//! network's names are timm's.

use crate::error::{Error, Result};
use crate::nn::backend::{
    ActTensor, Backend, BnDeviceSaved, BnParamsMut, BnRun, ConvGeom, PoolGeom, SeLayerParams,
    SeLayerParamsMut,
};
use crate::nn::param::{Mode, Param, ParamInit, Real, Slot, SlotRef, Visit, VisitMut};
use crate::rng;
use crate::se::{SeConfig, SeWeights};
use crate::tensor::Shape;
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T>;

    /// The backward pass of the last recorded forward.
    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T>;

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

/// What a layer keeps for backward (an activation, max-pool indices), type-erased: layers are
/// generic over the element, not the backend, so the backend's types are downcast at backward.
#[derive(Clone)]
pub(crate) struct Stash(Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Stash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stash")
    }
}

fn other_backend() -> Error {
    Error::Config("backward ran on another backend than its forward".into())
}

impl Stash {
    pub(crate) fn new<T: Any + Clone + Send + Sync>(t: T) -> Self {
        Stash(Arc::new(t))
    }

    /// The kept value (shared with clones of the layer).
    pub(crate) fn get<T: Any + Clone + Send + Sync>(&self) -> Result<&T> {
        self.0.downcast_ref::<T>().ok_or_else(other_backend)
    }

    /// The kept value by value (a copy only when a clone of the layer shares it).
    pub(crate) fn take<T: Any + Clone + Send + Sync>(self) -> Result<T> {
        let a = self.0.downcast::<T>().map_err(|_| other_backend())?;
        Ok(Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone()))
    }
}

/// Keeps `x` for backward when `mode` records; otherwise hands it back to the backend.
fn keep<E: Real, B: Backend<E>>(b: &B, x: B::T, mode: Mode) -> Option<Stash> {
    if mode.records() {
        Some(Stash::new(x))
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
    cache: Option<Stash>,
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
            weight: Param::new(
                &geom.weight_shape(),
                ParamInit::Normal((2.0 / fan_out).sqrt()),
            )
            .bindable(),
            bias: bias.then(|| {
                Param::new(&[geom.out_ch], ParamInit::Uniform(1.0 / fan_in.sqrt())).bindable()
            }),
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let y = b.conv2d_p(&x, &self.weight, self.bias.as_ref(), &self.geom)?;
        self.cache = keep(b, x, mode);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let x: B::T = self
            .cache
            .take()
            .ok_or_else(|| no_forward("conv"))?
            .take()?;
        let dx = b.conv2d_backward_p(
            &x,
            &mut self.weight,
            &dy,
            &self.geom,
            self.bias.as_mut(),
            self.input_grad,
        )?;
        b.recycle(dy);
        match dx {
            Some(dx) => {
                b.recycle(x);
                Ok(dx)
            }
            // The caller asked for no input gradient: hand back zeros of the right shape.
            None => b.zeros(x.shape()),
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
struct BnCache {
    x: Stash,
    /// The output of a ReLU fused into this layer (its backward then masks the gradient).
    relu_y: Option<Stash>,
    stats: BnKept,
    batch_stats: bool,
}

/// The statistics a BatchNorm forward normalised with, for its backward.
#[derive(Clone)]
enum BnKept {
    /// On the host (host parameters).
    Host { mean: Vec<f64>, invstd: Vec<f64> },
    /// In the backend (parameters bound to a device backend).
    Device(BnDeviceSaved),
}

impl std::fmt::Debug for BnKept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BnKept::Host { mean, .. } => write!(f, "Host({} channels)", mean.len()),
            BnKept::Device(_) => f.write_str("Device"),
        }
    }
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
    cache: Option<BnCache>,
}

impl<E: Real> BatchNorm2d<E> {
    /// PyTorch's defaults: `eps = 1e-5`, `momentum = 0.1`, weight 1, bias 0.
    pub fn new(channels: usize) -> Self {
        BatchNorm2d {
            channels,
            eps: 1e-5,
            momentum: 0.1,
            weight: Param::new(&[channels], ParamInit::Ones).bindable(),
            bias: Param::new(&[channels], ParamInit::Zeros).bindable(),
            running_mean: Param::new(&[channels], ParamInit::Zeros).bindable(),
            running_var: Param::new(&[channels], ParamInit::Ones).bindable(),
            num_batches_tracked: 0,
            cache: None,
        }
    }

    /// Initialises the scale to zero (timm's `zero_init_last` for a residual branch's last BN).
    pub fn zero_init(mut self) -> Self {
        self.weight = Param::new(&[self.channels], ParamInit::Zeros).bindable();
        self
    }

    /// Forward with the following ReLU fused in (inference only, nothing recorded).
    pub fn forward_relu<B: Backend<E>>(&mut self, b: &B, x: B::T) -> Result<B::T> {
        self.cache = None;
        if let Some((y, _)) = self.on_device(b, &x, false, true)? {
            return Ok(y);
        }
        let (a, s, _, _) = self.running_affine(x.shape())?;
        b.channel_affine(x, &a, &s, true)
    }

    /// The backend's device BatchNorm, when the parameters are bound to it.
    fn on_device<B: Backend<E>>(
        &mut self,
        b: &B,
        x: &B::T,
        train: bool,
        relu: bool,
    ) -> Result<Option<(B::T, BnDeviceSaved)>> {
        self.check(x.shape())?;
        let p = BnParamsMut {
            weight: &mut self.weight,
            bias: &mut self.bias,
            running_mean: &mut self.running_mean,
            running_var: &mut self.running_var,
        };
        let run = BnRun {
            train,
            momentum: self.momentum,
            eps: self.eps,
            relu,
        };
        b.batch_norm_p(x, p, run)
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
        for (what, len) in [
            ("batch norm weight", g.len()),
            ("batch norm bias", bt.len()),
            ("batch norm mean", mean.len()),
            ("batch norm invstd", invstd.len()),
        ] {
            if len != self.channels {
                return Err(Error::Length {
                    what,
                    got: len,
                    expected: self.channels,
                });
            }
        }
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

impl<E: Real> BatchNorm2d<E> {
    /// Forward with the following ReLU fused in, in any mode: one pass computes
    /// `relu(a x + b)`, and when recording, backward masks the gradient with the kept output
    /// ([`Backend::batch_norm_relu_backward`]). The ReLU layer itself is then skipped
    /// ([`Relu::mark_fused`]).
    pub fn forward_fused_relu<B: Backend<E>>(
        &mut self,
        b: &B,
        x: B::T,
        mode: Mode,
    ) -> Result<B::T> {
        if !mode.records() {
            return self.forward_relu(b, x);
        }
        self.forward_impl(b, x, mode, true)
    }

    fn forward_impl<B: Backend<E>>(
        &mut self,
        b: &B,
        x: B::T,
        mode: Mode,
        relu: bool,
    ) -> Result<B::T> {
        let s = x.shape();
        self.check(s)?;
        if let Some((y, saved)) = self.on_device(b, &x, mode.is_train(), relu)? {
            if mode.is_train() {
                self.num_batches_tracked += 1;
            }
            self.cache = mode.records().then(|| BnCache {
                x: Stash::new(x),
                relu_y: relu.then(|| Stash::new(y.clone())),
                stats: BnKept::Device(saved),
                batch_stats: mode.is_train(),
            });
            return Ok(y);
        }
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
            let y = b.channel_affine(x.clone(), &a, &sh, relu)?;
            self.cache = Some(BnCache {
                x: Stash::new(x),
                relu_y: relu.then(|| Stash::new(y.clone())),
                stats: BnKept::Host { mean, invstd },
                batch_stats: mode.is_train(),
            });
            Ok(y)
        } else {
            self.cache = None;
            b.channel_affine(x, &a, &sh, relu)
        }
    }
}

impl<E: Real> Module<E> for BatchNorm2d<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        self.forward_impl(b, x, mode, false)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let c = self.cache.take().ok_or_else(|| no_forward("batch norm"))?;
        let x = c.x.get::<B::T>()?;
        let relu_y = match &c.relu_y {
            Some(y) => Some(y.get::<B::T>()?),
            None => None,
        };
        let (mean, invstd) = match &c.stats {
            BnKept::Device(saved) => {
                return b.batch_norm_backward_p(
                    x,
                    relu_y,
                    dy,
                    saved,
                    &mut self.weight,
                    &mut self.bias,
                );
            }
            BnKept::Host { mean, invstd } => (mean, invstd),
        };
        let (gamma, dgamma) = self.weight.value_and_grad("batch norm weight")?;
        let dbeta = self.bias.grad_mut();
        match &c.relu_y {
            Some(y) => b.batch_norm_relu_backward(
                x,
                y.get::<B::T>()?,
                dy,
                mean,
                invstd,
                gamma,
                c.batch_stats,
                dgamma,
                dbeta,
            ),
            None => {
                b.batch_norm_backward(x, &dy, mean, invstd, gamma, c.batch_stats, dgamma, dbeta)
            }
        }
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
    cache: Option<Stash>,
    /// The preceding BatchNorm computed this ReLU (forward and backward) in the last pass.
    fused: bool,
    _e: std::marker::PhantomData<E>,
}

impl<E: Real> Relu<E> {
    /// A ReLU.
    pub fn new() -> Self {
        Relu {
            cache: None,
            fused: false,
            _e: std::marker::PhantomData,
        }
    }

    /// Records that the preceding BatchNorm ran this ReLU ([`BatchNorm2d::forward_fused_relu`]):
    /// this layer's backward then passes the gradient through unchanged.
    pub fn mark_fused(&mut self, mode: Mode) {
        self.cache = None;
        self.fused = mode.records();
    }
}

impl<E: Real> Module<E> for Relu<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let y = b.relu(x)?;
        self.fused = false;
        self.cache = mode.records().then(|| Stash::new(y.clone()));
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        if std::mem::take(&mut self.fused) {
            return Ok(dy);
        }
        let y = self.cache.take().ok_or_else(|| no_forward("relu"))?;
        b.relu_backward(y.get::<B::T>()?, dy)
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
    cache: Option<(Stash, Shape)>,
}

impl MaxPool2d {
    /// A max pool with this geometry.
    pub fn new(geom: PoolGeom) -> Self {
        MaxPool2d { geom, cache: None }
    }
}

impl<E: Real> Module<E> for MaxPool2d {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let (y, arg) = b.max_pool2d(&x, &self.geom)?;
        self.cache = mode.records().then(|| (Stash::new(arg), x.shape()));
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let (arg, s) = self.cache.take().ok_or_else(|| no_forward("max pool"))?;
        b.max_pool2d_backward(&dy, arg.get::<B::PoolIdx>()?, s)
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let y = b.avg_pool2d(&x, &self.geom)?;
        self.cache = mode.records().then_some(x.shape());
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let y = b.global_avg_pool(&x)?;
        self.cache = mode.records().then_some(x.shape());
        b.recycle(x);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
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
    cache: Option<Stash>,
}

impl<E: Real> Linear<E> {
    /// A linear layer with PyTorch's default initialisation (uniform in `+-1/sqrt(in)`).
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        Linear {
            in_features,
            out_features,
            weight: Param::new(&[out_features, in_features], ParamInit::Uniform(bound)).bindable(),
            bias: bias.then(|| Param::new(&[out_features], ParamInit::Uniform(bound)).bindable()),
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        self.check(x.shape())?;
        let y = b.linear_p(&x, &self.weight, self.bias.as_ref(), self.out_features)?;
        self.cache = keep(b, x, mode);
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let x = self.cache.take().ok_or_else(|| no_forward("linear"))?;
        b.linear_backward_p(x.get::<B::T>()?, &mut self.weight, &dy, self.bias.as_mut())
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
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        if !mode.is_train() || self.p == 0.0 {
            self.cache = mode.records().then_some(None);
            return Ok(x);
        }
        let mut r = rng::seeded(self.seed ^ self.calls.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.calls += 1;
        let keep = E::from_f64(1.0 / (1.0 - self.p));
        let mask: Vec<E> = (0..x.shape().numel())
            .map(|_| {
                if r.gen::<f64>() < self.p {
                    E::ZERO
                } else {
                    keep
                }
            })
            .collect();
        let y = b.mul_mask(x, &mask)?;
        self.cache = Some(Some(mask));
        Ok(y)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        match self.cache.take().ok_or_else(|| no_forward("dropout"))? {
            None => Ok(dy),
            Some(mask) => {
                if mask.len() != dy.shape().numel() {
                    return Err(Error::Length {
                        what: "dropout gradient",
                        got: dy.shape().numel(),
                        expected: mask.len(),
                    });
                }
                b.mul_mask(dy, &mask)
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
struct SeCache {
    x: Stash,
    residual: Option<Stash>,
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
    cache: Option<SeCache>,
}

impl<E: Real> SqueezeExcite<E> {
    /// An SE block for `config`, initialised as timm does (its FCs are 1x1 convolutions).
    pub fn new(config: SeConfig) -> Result<Self> {
        config.validate()?;
        let (c, d) = (config.channels, config.hidden);
        let bias = config.bias;
        Ok(SqueezeExcite {
            config,
            fc1_weight: Param::new(&[d, c, 1, 1], ParamInit::Normal((2.0 / d as f32).sqrt()))
                .bindable(),
            fc1_bias: bias
                .then(|| Param::new(&[d], ParamInit::Uniform(1.0 / (c as f32).sqrt())).bindable()),
            fc2_weight: Param::new(&[c, d, 1, 1], ParamInit::Normal((2.0 / c as f32).sqrt()))
                .bindable(),
            fc2_bias: bias
                .then(|| Param::new(&[c], ParamInit::Uniform(1.0 / (d as f32).sqrt())).bindable()),
            cache: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SeConfig {
        &self.config
    }

    /// The weights in the SE op's form (f32, PyTorch layout); an error while bound.
    pub fn weights(&self) -> Result<SeWeights> {
        crate::nn::backend::se_weights(self.config, &self.params())
    }

    fn params(&self) -> SeLayerParams<'_, E> {
        SeLayerParams {
            fc1_weight: &self.fc1_weight,
            fc1_bias: self.fc1_bias.as_ref(),
            fc2_weight: &self.fc2_weight,
            fc2_bias: self.fc2_bias.as_ref(),
        }
    }

    /// `relu(s * x + residual)` (the fused epilogue).
    pub fn forward_fused<B: Backend<E>>(
        &mut self,
        b: &B,
        x: B::T,
        residual: B::T,
        mode: Mode,
    ) -> Result<B::T> {
        self.run(b, x, Some(residual), mode)
    }

    /// Backward of [`SqueezeExcite::forward_fused`]: `(d x, d residual)`.
    pub fn backward_fused<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<(B::T, B::T)> {
        let (dx, dr) = self.run_backward(b, dy)?;
        let dr = dr.ok_or_else(|| {
            Error::Config("SE backward_fused after a forward without a residual".into())
        })?;
        Ok((dx, dr))
    }

    fn run<B: Backend<E>>(
        &mut self,
        b: &B,
        x: B::T,
        residual: Option<B::T>,
        mode: Mode,
    ) -> Result<B::T> {
        let (y, saved) = b.se_forward_p(self.config, self.params(), &x, residual.as_ref())?;
        if mode.records() {
            self.cache = Some(SeCache {
                x: Stash::new(x),
                residual: residual.map(Stash::new),
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

    fn run_backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<(B::T, Option<B::T>)> {
        let c = self.cache.take().ok_or_else(|| no_forward("SE"))?;
        let saved = c.saved.downcast_ref::<B::SeSaved>().ok_or_else(|| {
            Error::Config(format!(
                "SE backward on backend `{}` after a forward on another backend",
                b.name()
            ))
        })?;
        let residual = match &c.residual {
            Some(r) => Some(r.get::<B::T>()?),
            None => None,
        };
        let p = SeLayerParamsMut {
            fc1_weight: &mut self.fc1_weight,
            fc1_bias: self.fc1_bias.as_mut(),
            fc2_weight: &mut self.fc2_weight,
            fc2_bias: self.fc2_bias.as_mut(),
        };
        b.se_backward_p(self.config, p, c.x.get::<B::T>()?, residual, saved, &dy)
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

impl<E: Real> Module<E> for SqueezeExcite<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        self.run(b, x, None, mode)
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
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
