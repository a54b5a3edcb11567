//! [`Network`]: a whole model, the API a trainer uses.

use crate::error::{Error, Result};
use crate::nn::backend::Backend;
use crate::nn::layers::Module;
use crate::nn::param::{name_seed, Mode, Param, Real, Slot, SlotRef};
use crate::nn::seq::{Layer, Seq};
use crate::tensor::{Shape, Tensor};

/// A classification network: a named [`Seq`] of layers from image to logits.
///
/// The training loop is:
/// `forward(b, x, Mode::Train)` -> loss and `d loss / d logits` -> `backward(b, dlogits)` ->
/// [`Network::parameters_mut`] (each [`Param`] holds `value` and `grad`) for the optimiser ->
/// [`Network::zero_grad`]; evaluate with [`Mode::Infer`] (or [`Mode::Eval`]).
///
/// A freshly built network knows every parameter's shape but holds no values: call
/// [`Network::init_weights`] or load a checkpoint ([`Network::load_safetensors`]).
#[derive(Clone, Debug)]
pub struct Network<E> {
    name: String,
    input: (usize, usize, usize),
    num_classes: usize,
    body: Seq<E>,
}

impl<E: Real> Network<E> {
    /// A network named `name` taking `(channels, height, width)` images to `num_classes`
    /// logits through `body`; checks that the body maps that input to `[n, num_classes, 1, 1]`.
    pub fn new(
        name: impl Into<String>,
        input: (usize, usize, usize),
        num_classes: usize,
        body: Seq<E>,
    ) -> Result<Self> {
        let net = Network {
            name: name.into(),
            input,
            num_classes,
            body,
        };
        let out = net.body.output_shape(net.input_shape(1)?)?;
        if out != Shape::new(1, num_classes, 1, 1) {
            return Err(Error::Config(format!(
                "network `{}` maps its input to {out}, expected 1x{num_classes}x1x1",
                net.name
            )));
        }
        Ok(net)
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The default input size `(channels, height, width)`.
    pub fn input_size(&self) -> (usize, usize, usize) {
        self.input
    }

    /// The default input shape for a batch of `n`.
    pub fn input_shape(&self, n: usize) -> Result<Shape> {
        Shape::try_new(n, self.input.0, self.input.1, self.input.2)
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The layers.
    pub fn body(&self) -> &Seq<E> {
        &self.body
    }

    /// The layers, mutably.
    pub fn body_mut(&mut self) -> &mut Seq<E> {
        &mut self.body
    }

    /// Logits `[n, num_classes, 1, 1]` for images `x` (`[n, c, h, w]`, NCHW; other spatial
    /// sizes work where the layers allow). The input moves to the backend and the logits back;
    /// everything between stays where the backend keeps activations.
    pub fn forward<B: Backend<E>>(&mut self, b: &B, x: Tensor<E>, mode: Mode) -> Result<Tensor<E>> {
        if x.shape().c != self.input.0 {
            return Err(Error::Shape(format!(
                "`{}` takes {} input channels, got {}",
                self.name,
                self.input.0,
                x.shape()
            )));
        }
        let x = b.upload(x)?;
        let y = self.body.forward(b, x, mode)?;
        b.download(y)
    }

    /// Backward from `d loss / d logits`: accumulates every parameter's gradient and returns
    /// `d loss / d input` (zeros if [`Network::set_input_grad`] turned it off).
    pub fn backward<B: Backend<E>>(&mut self, b: &B, dlogits: Tensor<E>) -> Result<Tensor<E>> {
        let dy = b.upload(dlogits)?;
        let dx = self.body.backward(b, dy)?;
        b.download(dx)
    }

    /// [`Network::backward`] for training: accumulates the parameter gradients and hands the
    /// input gradient back to the backend instead of returning it.
    pub fn backward_params<B: Backend<E>>(&mut self, b: &B, dlogits: Tensor<E>) -> Result<()> {
        let dy = b.upload(dlogits)?;
        let dx = self.body.backward(b, dy)?;
        b.recycle(dx);
        Ok(())
    }

    /// Whether backward computes the gradient with respect to the input image (a trainer
    /// can turn it off to skip the first convolution's input gradient).
    pub fn set_input_grad(&mut self, on: bool) {
        if let Some((_, Layer::Conv2d(c))) = self.body.layers_mut().first_mut() {
            c.input_grad = on;
        }
    }

    /// Every trainable parameter with its timm name.
    pub fn parameters_mut(&mut self) -> impl Iterator<Item = (String, &mut Param<E>)> {
        let mut out = Vec::new();
        self.body.visit_mut("", &mut |name, slot| {
            if let Slot::Param(p) = slot {
                out.push((name, p));
            }
        });
        out.into_iter()
    }

    /// Every trainable parameter with its timm name, read-only.
    pub fn parameters(&self) -> impl Iterator<Item = (String, &Param<E>)> {
        let mut out = Vec::new();
        self.body.visit("", &mut |name, slot| {
            if let SlotRef::Param(p) = slot {
                out.push((name, p));
            }
        });
        out.into_iter()
    }

    /// Visits every state entry (parameters, buffers, counters) by timm name.
    pub fn visit_state<'a>(&'a self, f: &mut dyn FnMut(String, SlotRef<'a, E>)) {
        self.body.visit("", f);
    }

    /// Visits every state entry mutably.
    pub fn visit_state_mut<'a>(&'a mut self, f: &mut dyn FnMut(String, Slot<'a, E>)) {
        self.body.visit_mut("", f);
    }

    /// Number of trainable parameters (cheap: needs no values).
    pub fn num_params(&self) -> usize {
        self.parameters().map(|(_, p)| p.numel()).sum()
    }

    /// Multiply-accumulates of one forward pass for a batch of one at the default input size.
    pub fn macs(&self) -> Result<u64> {
        self.body.macs(self.input_shape(1)?)
    }

    /// Multiply-accumulates of one forward pass at input `x`.
    pub fn macs_at(&self, x: Shape) -> Result<u64> {
        self.body.macs(x)
    }

    /// Binds the parameters (and BatchNorm's running statistics) of the layers that can use
    /// them on `backend`'s device (convolution, linear, SE and BatchNorm layers:
    /// [`Param::is_bindable`]) to it ([`Backend::bind`]):
    /// their values, gradients and SGD momentum then stay in device memory across steps, and
    /// reading them on the host is an error until [`Network::unbind`]. Returns how many are
    /// bound (0 for host backends). On error the parameters this call bound are unbound again
    /// and those bound before are left as they were.
    pub fn bind<B: Backend<E>>(&mut self, backend: &B) -> Result<usize> {
        let mut bound = 0;
        let mut fresh = Vec::new();
        let mut err = None;
        self.body.visit_mut("", &mut |name, slot| {
            if let (Slot::Param(p) | Slot::Buffer(p), None) = (slot, &err) {
                if p.is_bindable() {
                    let was = p.is_bound();
                    match backend.bind(p) {
                        Ok(true) => {
                            bound += 1;
                            if !was {
                                fresh.push(name);
                            }
                        }
                        Ok(false) => {}
                        Err(e) => err = Some(e),
                    }
                }
            }
        });
        let Some(e) = err else {
            return Ok(bound);
        };
        // Values just uploaded are still the host's: bring them back (best effort: the
        // binding error is the one to report).
        self.body.visit_mut("", &mut |name, slot| {
            if let Slot::Param(p) | Slot::Buffer(p) = slot {
                if fresh.contains(&name) {
                    let _ = p.unbind();
                }
            }
        });
        Err(e)
    }

    /// Brings every bound parameter's values and gradient back to the host ([`Param::unbind`];
    /// gather an optimiser's device momentum first). Parameters whose copy fails stay bound,
    /// and the first error is returned.
    pub fn unbind(&mut self) -> Result<()> {
        let mut err = None;
        self.body.visit_mut("", &mut |_, slot| {
            if let Slot::Param(p) | Slot::Buffer(p) = slot {
                if let Err(e) = p.unbind() {
                    err.get_or_insert(e);
                }
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// True when some parameter or buffer is bound to a device backend.
    pub fn is_bound(&self) -> bool {
        let mut any = false;
        self.body.visit("", &mut |_, slot| {
            if let SlotRef::Param(p) | SlotRef::Buffer(p) = slot {
                any |= p.is_bound();
            }
        });
        any
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.parameters_mut() {
            p.zero_grad();
        }
    }

    /// Initialises every parameter and buffer (timm's scheme; each parameter's stream is
    /// seeded from `seed` and its name) and resets BatchNorm counters.
    pub fn init_weights(&mut self, seed: u64) {
        self.body.visit_mut("", &mut |name, slot| match slot {
            Slot::Param(p) | Slot::Buffer(p) => p.init(name_seed(seed, &name)),
            Slot::Counter(c) => *c = 0,
        });
    }

    /// True once every parameter and buffer holds values.
    pub fn is_initialised(&self) -> bool {
        let mut ok = true;
        self.body.visit("", &mut |_, slot| {
            if let SlotRef::Param(p) | SlotRef::Buffer(p) = slot {
                ok &= p.is_initialised();
            }
        });
        ok
    }

    /// Restarts every dropout layer's mask sequence from `seed`.
    pub fn reseed_dropout(&mut self, seed: u64) {
        fn walk<E: Real>(s: &mut Seq<E>, seed: u64) {
            for (_, l) in s.layers_mut() {
                if let Layer::Dropout(d) = l {
                    d.reseed(seed);
                }
            }
        }
        walk(&mut self.body, seed);
    }
}
