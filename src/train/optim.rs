//! SGD with momentum and weight decay, PyTorch's update rule (no dampening, no Nesterov):
//! `g = grad + weight_decay * w;  buf = momentum * buf + g;  w -= lr * buf` (the first step
//! sets `buf = g`). Weight decay applies to every parameter, as PyTorch's `SGD` does by default.
//!
//! The momentum buffers save to and load from safetensors under `<parameter>.momentum_buffer`,
//! so a resumed run continues exactly where it stopped.

use crate::error::{Error, Result};
use crate::nn::{Backend, Network};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

const SUFFIX: &str = ".momentum_buffer";

/// SGD state: hyper-parameters and one momentum buffer per parameter (by timm name).
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    /// Momentum (the paper: 0.9).
    pub momentum: f32,
    /// L2 weight decay (the paper: 1e-4).
    pub weight_decay: f32,
    buffers: BTreeMap<String, Vec<f32>>,
}

impl Sgd {
    /// An optimiser with no momentum history yet.
    pub fn new(momentum: f32, weight_decay: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&momentum) || weight_decay.is_nan() || weight_decay < 0.0 {
            return Err(Error::Config(format!(
                "momentum {momentum} must be in [0, 1) and weight decay {weight_decay} >= 0"
            )));
        }
        Ok(Sgd {
            momentum,
            weight_decay,
            buffers: BTreeMap::new(),
        })
    }

    /// The momentum buffers by parameter name.
    pub fn buffers(&self) -> &BTreeMap<String, Vec<f32>> {
        &self.buffers
    }

    /// One update of every parameter of `net` that has a gradient, with learning rate `lr`.
    /// Parameters without a gradient (never reached by backward) are left alone, as PyTorch
    /// skips parameters whose `grad` is `None`. All parameters must be on the host (an error
    /// names a bound one: use [`Sgd::step_on`]).
    pub fn step(&mut self, net: &mut Network<f32>, lr: f32) -> Result<()> {
        self.step_on(&crate::nn::Reference, net, lr)
    }

    /// [`Sgd::step`] where parameters bound to `backend` are updated there
    /// ([`Backend::sgd_step`], the same rule and rounding) and the rest on the host. The
    /// momentum of a bound parameter lives with it on the device; [`Sgd::gather`] copies it
    /// back before the optimiser state is saved or the network unbound.
    pub fn step_on<B: Backend<f32>>(
        &mut self,
        backend: &B,
        net: &mut Network<f32>,
        lr: f32,
    ) -> Result<()> {
        let (m, wd) = (self.momentum, self.weight_decay);
        // Refuse before updating anything if a bound parameter belongs to another backend.
        for (name, p) in net.parameters() {
            if let Some(s) = p.device_store() {
                if !backend.owns(s.owner()) {
                    return Err(Error::Config(format!(
                        "parameter `{name}` is bound to a device backend this step cannot \
                         update (the host optimiser, or another backend): use step_on with \
                         its backend, or unbind the network"
                    )));
                }
            }
        }
        for (name, p) in net.parameters_mut() {
            if p.is_bound() {
                let init = self.buffers.get(&name).map(|v| &v[..]);
                if backend.sgd_step(p, init, lr, m, wd)? {
                    continue;
                }
                return Err(Error::Config(format!(
                    "parameter `{name}` is bound to a backend that cannot update it"
                )));
            }
            if p.grad.is_empty() {
                continue;
            }
            if p.grad.len() != p.value.len() {
                return Err(Error::Length {
                    what: "parameter gradient",
                    got: p.grad.len(),
                    expected: p.value.len(),
                });
            }
            match self.buffers.get_mut(&name) {
                Some(buf) => {
                    if buf.len() != p.value.len() {
                        return Err(Error::Length {
                            what: "momentum buffer",
                            got: buf.len(),
                            expected: p.value.len(),
                        });
                    }
                    for ((w, &g), b) in p.value.iter_mut().zip(&p.grad).zip(buf.iter_mut()) {
                        let g = g + wd * *w;
                        *b = m * *b + g;
                        *w -= lr * *b;
                    }
                }
                None => {
                    let mut buf = Vec::with_capacity(p.value.len());
                    for (w, &g) in p.value.iter_mut().zip(&p.grad) {
                        let g = g + wd * *w;
                        buf.push(g);
                        *w -= lr * g;
                    }
                    self.buffers.insert(name, buf);
                }
            }
        }
        Ok(())
    }

    /// Copies the momentum of every parameter of `net` bound to a device backend into this
    /// optimiser's buffers (call before saving the state or unbinding the network).
    pub fn gather(&mut self, net: &Network<f32>) -> Result<()> {
        for (name, p) in net.parameters() {
            if let Some(store) = p.device_store() {
                if let Some(m) = store.read_momentum()? {
                    self.buffers.insert(name, m);
                }
            }
        }
        Ok(())
    }

    /// The momentum buffers as safetensors bytes (`<parameter>.momentum_buffer`, F32, flat).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .buffers
            .iter()
            .map(|(k, v)| {
                (
                    format!("{k}{SUFFIX}"),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.len(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, data, n)| {
                TensorView::new(Dtype::F32, vec![*n], data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| Error::Format(format!("momentum buffer `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, None)
            .map_err(|e| Error::Format(format!("serialising the optimiser state: {e}")))
    }

    /// Replaces the momentum buffers with those in safetensors `bytes`, checking each against
    /// the parameter of that name in `net` (every buffer must name a parameter and match its
    /// size); on error the optimiser is unchanged.
    pub fn load_safetensors_bytes(&mut self, bytes: &[u8], net: &Network<f32>) -> Result<()> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Format(format!("optimiser state is not safetensors: {e}")))?;
        let sizes: BTreeMap<String, usize> =
            net.parameters().map(|(n, p)| (n, p.numel())).collect();
        let mut buffers = BTreeMap::new();
        for (name, view) in st.tensors() {
            let param = name.strip_suffix(SUFFIX).ok_or_else(|| {
                Error::Format(format!("optimiser state: unexpected tensor `{name}`"))
            })?;
            let want = *sizes.get(param).ok_or_else(|| {
                Error::Format(format!(
                    "optimiser state: `{param}` is not a parameter of `{}`",
                    net.name()
                ))
            })?;
            if view.dtype() != Dtype::F32 || view.data().len() != 4 * want {
                return Err(Error::Format(format!(
                    "optimiser state: `{name}` is {:?} with {} bytes, expected F32 x {want}",
                    view.dtype(),
                    view.data().len()
                )));
            }
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            buffers.insert(param.to_string(), v);
        }
        self.buffers = buffers;
        Ok(())
    }

    /// Writes the momentum buffers to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_safetensors_bytes()?)
            .map_err(Error::io(format!("writing {}", path.display())))
    }

    /// Loads the momentum buffers from a safetensors file (see
    /// [`Sgd::load_safetensors_bytes`]).
    pub fn load(&mut self, path: &Path, net: &Network<f32>) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
        self.load_safetensors_bytes(&bytes, net)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))
    }
}

/// Dynamic loss scaling for f16 activations (PyTorch's `GradScaler` rule): the loss gradient is
/// multiplied by [`LossScaler::scale`] before backward, so small activation gradients stay
/// above f16's underflow; [`LossScaler::step`] then divides the parameter gradients by it where
/// they live, and updates only when all of them are finite. A step with an overflow is skipped
/// and halves the scale; `growth_interval` finite steps in a row double it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    scale: f32,
    growth_interval: u32,
    good_steps: u32,
    skipped: u64,
}

impl Default for LossScaler {
    /// PyTorch's defaults: scale 65536, doubled after 2000 finite steps.
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            growth_interval: 2000,
            good_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// A scaler starting at `scale` (a power of two keeps the unscaling exact), doubling it
    /// after `growth_interval` finite steps in a row.
    pub fn new(scale: f32, growth_interval: u32) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) || growth_interval == 0 {
            return Err(Error::Config(format!(
                "loss scale {scale} must be positive and finite, growth interval \
                 {growth_interval} positive"
            )));
        }
        Ok(LossScaler {
            scale,
            growth_interval,
            ..Default::default()
        })
    }

    /// The factor the loss gradient is multiplied by before backward.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Multiplies a loss gradient by [`LossScaler::scale`] (before backward).
    pub fn scale_grad(&self, grad: &mut crate::tensor::Tensor<f32>) {
        let s = self.scale;
        grad.data_mut().iter_mut().for_each(|g| *g *= s);
    }

    /// Steps skipped so far for a gradient that was not finite.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Unscales every gradient of `net` (on `backend` where bound), then takes the SGD step
    /// when all are finite; otherwise leaves the parameters and momentum alone and halves the
    /// scale. Returns whether the step was taken.
    pub fn step<B: Backend<f32>>(
        &mut self,
        backend: &B,
        net: &mut Network<f32>,
        opt: &mut Sgd,
        lr: f32,
    ) -> Result<bool> {
        let finite = {
            let mut params: Vec<&mut crate::nn::Param<f32>> =
                net.parameters_mut().map(|(_, p)| p).collect();
            backend.unscale_grads(&mut params, 1.0 / self.scale)?
        };
        if finite {
            opt.step_on(backend, net, lr)?;
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.good_steps = 0;
                let grown = self.scale * 2.0;
                if grown.is_finite() {
                    self.scale = grown;
                }
            }
        } else {
            self.good_steps = 0;
            self.skipped += 1;
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
        }
        Ok(finite)
    }
}

/// One optimiser step after backward: through `scaler` when there is one ([`LossScaler::step`],
/// false when it skipped the step), else a plain [`Sgd::step_on`] (always true).
pub fn step_with<B: Backend<f32>>(
    scaler: Option<&mut LossScaler>,
    backend: &B,
    net: &mut Network<f32>,
    opt: &mut Sgd,
    lr: f32,
) -> Result<bool> {
    match scaler {
        Some(sc) => sc.step(backend, net, opt, lr),
        None => opt.step_on(backend, net, lr).map(|()| true),
    }
}
