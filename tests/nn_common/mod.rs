//! Helpers shared by the network tests.
#![allow(dead_code)]

use senet::nn::{Module, Network, Real, Slot};
use senet::rng;
use senet::{Layout, Shape, Tensor};

/// The exhaustive tier: `SENET_FULL_TESTS=1` (CI sets it) trains every small network in the
/// training tests and runs the long training runs; without it each such test takes one network
/// (a different one per test, so between them every block variant still trains).
pub fn full() -> bool {
    std::env::var("SENET_FULL_TESTS").as_deref() == Ok("1")
}

/// A fresh seed, printed so a failure can be replayed (`SENET_TEST_SEED=...`).
pub fn seed(label: &str) -> u64 {
    let s = std::env::var("SENET_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rng::fresh_seed);
    eprintln!("{label}: seed {s}");
    s
}

/// Rounds to a multiple of 2^-20, so the value and the value plus or minus 2^-20 or 2^-21
/// are exact in f32 when below 1 in magnitude (the SE op takes f32 weights).
pub fn quantize(v: f64) -> f64 {
    (v * (1u64 << 20) as f64).round() / (1u64 << 20) as f64
}

/// The element type test inputs are rounded to on this thread (for a narrow-activation backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// No rounding beyond [`quantize`].
    None,
    /// bf16.
    Bf16,
    /// f16.
    F16,
}

thread_local! {
    static NARROW: std::cell::Cell<Narrow> = const { std::cell::Cell::new(Narrow::None) };
}

/// While set, [`random_tensor`] on this thread rounds its values to that type (inputs and
/// output gradients of a narrow backend are then exact, as DESIGN.md's "same rounded inputs"
/// asks).
pub fn set_narrow_inputs(n: Narrow) {
    NARROW.with(|c| c.set(n));
}

/// [`set_narrow_inputs`] with bf16 (`on`) or none.
pub fn set_bf16_inputs(on: bool) {
    set_narrow_inputs(if on { Narrow::Bf16 } else { Narrow::None });
}

/// This thread's rounding of test inputs.
pub fn narrow_inputs() -> Narrow {
    NARROW.with(|c| c.get())
}

/// Whether this thread's inputs are rounded to bf16.
pub fn bf16_inputs() -> bool {
    narrow_inputs() == Narrow::Bf16
}

/// `v` rounded (and widened back) as [`set_narrow_inputs`] says.
pub fn round_input(v: f64) -> f64 {
    match narrow_inputs() {
        Narrow::None => v,
        Narrow::Bf16 => half::bf16::from_f64(v).to_f64(),
        Narrow::F16 => half::f16::from_f64(v).to_f64(),
    }
}

/// A random NCHW tensor with values in `[-1, 1)`, quantized (and rounded to bf16 under
/// [`set_bf16_inputs`]).
pub fn random_tensor<E: Real>(s: Shape, seed: u64) -> Tensor<E> {
    let v = rng::uniform_vec(s.numel(), -1.0, 1.0, seed)
        .into_iter()
        .map(|x| E::from_f64(round_input(quantize(x as f64))))
        .collect();
    Tensor::from_vec(s, Layout::Nchw, v).unwrap()
}

/// Sets every parameter and buffer of a state visitor to random, quantized values:
/// parameters in `[-0.6, 0.6)`, running means in `[-0.3, 0.3)`, running variances in
/// `[0.5, 1.5)`; BatchNorm scales away from zero (`0.3 <= |gamma| < 0.6`, random sign) and
/// BatchNorm shifts small (`[-0.15, 0.15)`). A scale near zero, or a shift that makes the
/// following ReLU zero a whole channel, hands the next BatchNorm a (nearly) constant channel,
/// whose normalisation amplifies f32 rounding ~1000x: a degenerate instance no tolerance fits
/// (it failed `inception_network_matches_reference` about once in 2000 seeds).
pub fn randomize_slots<'a, E: Real>(seed: u64) -> impl FnMut(String, Slot<'a, E>) {
    let mut k = 0u64;
    // The last two parameters set: a BatchNorm visits weight, bias, then running_mean.
    let mut last: Vec<(String, &'a mut senet::nn::Param<E>)> = Vec::new();
    let fill = |p: &mut senet::nn::Param<E>, lo: f32, hi: f32, s: u64| {
        let v = rng::uniform_vec(p.numel(), lo, hi, s)
            .into_iter()
            .map(|x| E::from_f64(quantize(x as f64)))
            .collect();
        p.set(v).unwrap();
    };
    move |name: String, slot: Slot<'a, E>| {
        k += 1;
        let s = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match slot {
            Slot::Param(p) => {
                fill(p, -0.6, 0.6, s);
                if last.len() == 2 {
                    last.remove(0);
                }
                last.push((name, p));
            }
            Slot::Buffer(p) if name.ends_with("running_var") => fill(p, 0.5, 1.5, s),
            Slot::Buffer(p) => {
                fill(p, -0.3, 0.3, s);
                if let Some(prefix) = name.strip_suffix("running_mean") {
                    for (n, q) in last.drain(..) {
                        if n.strip_suffix("weight") == Some(prefix) {
                            let signs = rng::uniform_vec(q.numel(), -1.0, 1.0, s ^ 1);
                            let mag = rng::uniform_vec(q.numel(), 0.3, 0.6, s ^ 2);
                            let v = signs
                                .iter()
                                .zip(&mag)
                                .map(|(g, m)| E::from_f64(quantize((m * g.signum()) as f64)))
                                .collect();
                            q.set(v).unwrap();
                        } else if n.strip_suffix("bias") == Some(prefix) {
                            fill(q, -0.15, 0.15, s ^ 3);
                        }
                    }
                }
            }
            Slot::Counter(c) => *c = 3,
        }
    }
}

/// Randomizes a module's parameters and buffers.
pub fn randomize_module<E: Real, M: Module<E>>(m: &mut M, seed: u64) {
    let mut f = randomize_slots::<E>(seed);
    m.visit_mut("", &mut f);
}

/// Randomizes a network's parameters and buffers.
pub fn randomize_network<E: Real>(net: &mut Network<E>, seed: u64) {
    let mut f = randomize_slots::<E>(seed);
    net.visit_state_mut(&mut f);
}

/// Every trainable parameter's gradient, by name.
pub fn grads<E: Real>(net: &mut Network<E>) -> Vec<(String, Vec<f64>)> {
    net.parameters_mut()
        .map(|(n, p)| (n, p.grad.iter().map(|v| v.to_f64()).collect()))
        .collect()
}

/// The CUDA network backends to test, with poisoned outputs: the kernel emulator (when this
/// build has it) and a real device when one is present (its own convolution kernels, and
/// cuDNN's where the library loads). Without a device it prints one "skipped" line; with
/// SENET_REQUIRE_GPU=1 a missing device is a failure. SENET_TEST_EMULATOR=0 leaves the
/// emulator out (GPU machines, where it only costs time).
pub fn cuda_backends() -> Vec<senet::nn::Cuda> {
    backends_of(false)
}

/// The mixed-precision CUDA backends with activations of `A` to test, as [`cuda_backends`],
/// each announced.
pub fn cuda_narrow_backends<A: senet::nn::NnAct>() -> Vec<senet::nn::Cuda<A>> {
    backends_of(true)
}

/// [`cuda_backends`] with activations of `A`, each announced on stderr when `announce`.
fn backends_of<A: senet::nn::NnAct>(announce: bool) -> Vec<senet::nn::Cuda<A>> {
    use senet::cuda::CudaDevice;
    use senet::nn::{ConvChoice, ConvEngine, Cuda};
    use std::io::Write;
    let mut out = Vec::new();
    if std::env::var("SENET_TEST_EMULATOR").as_deref() != Ok("0") {
        match CudaDevice::emulator() {
            Ok(d) => out.push(Cuda::<A>::open(d, ConvChoice::Auto).expect("emulator backend")),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "skipped on the emulator: {e}");
            }
        }
    }
    let require = std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1");
    let dev = if senet::cuda::kernels_built() {
        CudaDevice::new(0)
    } else {
        Err(senet::Error::KernelsNotBuilt)
    };
    match dev {
        Ok(d) => {
            out.push(
                Cuda::<A>::open(d.clone(), ConvChoice::Only(ConvEngine::Own)).expect("own kernels"),
            );
            match Cuda::<A>::open(d, ConvChoice::Only(ConvEngine::Cudnn)) {
                Ok(b) => out.push(b),
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "skipped cuDNN convolutions: {e}");
                }
            }
        }
        Err(e) => {
            assert!(
                !require,
                "SENET_REQUIRE_GPU=1 but no usable CUDA device: {e}"
            );
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
        }
    }
    out.into_iter()
        .map(|b| {
            if announce {
                let _ = writeln!(std::io::stderr(), "CUDA backend: {}", b.describe());
            }
            b.with_poison(true)
        })
        .collect()
}

/// [`cuda_backends`] with activations of `A` kept NHWC (channels-last) on the device, each
/// announced.
pub fn cuda_nhwc_backends<A: senet::nn::NnAct>() -> Vec<senet::nn::Cuda<A>> {
    use std::io::Write;
    backends_of(false)
        .into_iter()
        .map(|b| {
            let b = b.with_layout(senet::tensor::Layout::Nhwc);
            let _ = writeln!(std::io::stderr(), "CUDA backend: {}", b.describe());
            b
        })
        .collect()
}

/// The CUDA backends with the im2col engine ([`senet::nn::ConvEngine::Cublas`]) and
/// activations of `A` in `layout`, each announced: on the emulator (senet's column-major GEMM
/// standing in for cuBLAS) and on GPU 0 with cuBLAS when there is one (SENET_REQUIRE_GPU=1
/// makes its absence a failure, as in [`cuda_backends`]).
pub fn cuda_im2col_backends<A: senet::nn::NnAct>(
    layout: senet::tensor::Layout,
) -> Vec<senet::nn::Cuda<A>> {
    use senet::cuda::CudaDevice;
    use senet::nn::{ConvChoice, ConvEngine, Cuda};
    use std::io::Write;
    let choice = ConvChoice::Only(ConvEngine::Cublas);
    let mut devs = Vec::new();
    if std::env::var("SENET_TEST_EMULATOR").as_deref() != Ok("0") {
        if let Ok(d) = CudaDevice::emulator() {
            devs.push(d);
        }
    }
    let require = std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1");
    let dev = if senet::cuda::kernels_built() {
        CudaDevice::new(0)
    } else {
        Err(senet::Error::KernelsNotBuilt)
    };
    match dev {
        Ok(d) => devs.push(d),
        Err(e) => {
            assert!(
                !require,
                "SENET_REQUIRE_GPU=1 but no usable CUDA device: {e}"
            );
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
        }
    }
    devs.into_iter()
        .map(|d| {
            let b = Cuda::<A>::open(d, choice)
                .expect("the im2col engine (cuBLAS on a GPU)")
                .with_layout(layout)
                .with_poison(true);
            let _ = writeln!(std::io::stderr(), "CUDA backend: {}", b.describe());
            b
        })
        .collect()
}

/// [`cuda_narrow_backends`] with bf16 activations.
pub fn cuda_bf16_backends() -> Vec<senet::nn::Cuda<half::bf16>> {
    cuda_narrow_backends()
}

/// [`cuda_narrow_backends`] with f16 activations.
pub fn cuda_f16_backends() -> Vec<senet::nn::Cuda<half::f16>> {
    cuda_narrow_backends()
}

/// The CUDA backend with cuDNN's TF32 convolutions on GPU 0, when there is a GPU with cuDNN
/// (else none, with a "skipped" line; SENET_REQUIRE_GPU=1 makes a missing GPU a failure, as in
/// [`cuda_backends`]).
pub fn cuda_tf32_backends() -> Vec<senet::nn::Cuda> {
    use senet::nn::{ConvChoice, ConvEngine, Cuda};
    use std::io::Write;
    let require = std::env::var("SENET_REQUIRE_GPU").as_deref() == Ok("1");
    let dev = if senet::cuda::kernels_built() {
        senet::cuda::CudaDevice::new(0)
    } else {
        Err(senet::Error::KernelsNotBuilt)
    };
    match dev {
        Ok(d) => match Cuda::with_conv(d, ConvChoice::Only(ConvEngine::CudnnTf32)) {
            Ok(b) => {
                let _ = writeln!(std::io::stderr(), "CUDA backend: {}", b.describe());
                vec![b.with_poison(true)]
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "skipped cuDNN convolutions: {e}");
                Vec::new()
            }
        },
        Err(e) => {
            assert!(
                !require,
                "SENET_REQUIRE_GPU=1 but no usable CUDA device: {e}"
            );
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
            Vec::new()
        }
    }
}

/// [`cuda_backends`], each announced on stderr (device and convolution engine), so a failure's
/// output says which one failed.
pub fn cuda_backends_announced() -> Vec<senet::nn::Cuda> {
    use std::io::Write;
    let all = cuda_backends();
    for b in &all {
        let _ = writeln!(std::io::stderr(), "CUDA backend: {}", b.describe());
    }
    all
}

/// A backend seen through host tensors: every op uploads its inputs to `B` and downloads its
/// outputs, so op-level tests written for host tensors run on any backend.
pub struct OnHost<'a, B>(pub &'a B);

impl<B: senet::nn::Backend<f32>> senet::nn::Backend<f32> for OnHost<'_, B> {
    type T = Tensor<f32>;
    type PoolIdx = B::PoolIdx;
    type SeSaved = B::SeSaved;

    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn precision(&self) -> &'static str {
        self.0.precision()
    }
    fn upload(&self, x: Tensor<f32>) -> senet::Result<Tensor<f32>> {
        Ok(x)
    }
    fn download(&self, x: Tensor<f32>) -> senet::Result<Tensor<f32>> {
        Ok(x)
    }
    fn download_indices(&self, i: &B::PoolIdx) -> senet::Result<Vec<u32>> {
        self.0.download_indices(i)
    }
    fn zeros(&self, s: Shape) -> senet::Result<Tensor<f32>> {
        self.0.download(self.0.zeros(s)?)
    }
    fn mul_mask(&self, x: Tensor<f32>, m: &[f32]) -> senet::Result<Tensor<f32>> {
        let x = self.0.upload(x)?;
        self.0.download(self.0.mul_mask(x, m)?)
    }
    fn concat_channels(&self, parts: &[Tensor<f32>]) -> senet::Result<Tensor<f32>> {
        let p: Vec<B::T> = parts
            .iter()
            .map(|t| self.0.upload(t.clone()))
            .collect::<senet::Result<_>>()?;
        self.0.download(self.0.concat_channels(&p)?)
    }
    fn split_channels(&self, x: &Tensor<f32>, sizes: &[usize]) -> senet::Result<Vec<Tensor<f32>>> {
        let x = self.0.upload(x.clone())?;
        self.0
            .split_channels(&x, sizes)?
            .into_iter()
            .map(|t| self.0.download(t))
            .collect()
    }
    fn conv2d(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        g: &senet::nn::ConvGeom,
    ) -> senet::Result<Tensor<f32>> {
        let x = self.0.upload(x.clone())?;
        self.0.download(self.0.conv2d(&x, w, b, g)?)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        g: &senet::nn::ConvGeom,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        need_dx: bool,
    ) -> senet::Result<Option<Tensor<f32>>> {
        let (x, dy) = (self.0.upload(x.clone())?, self.0.upload(dy.clone())?);
        self.0
            .conv2d_backward(&x, w, &dy, g, dw, db, need_dx)?
            .map(|t| self.0.download(t))
            .transpose()
    }
    fn batch_norm_stats(&self, x: &Tensor<f32>) -> senet::Result<senet::nn::backend::BnStats> {
        self.0.batch_norm_stats(&self.0.upload(x.clone())?)
    }
    fn channel_affine(
        &self,
        x: Tensor<f32>,
        a: &[f32],
        b: &[f32],
        relu: bool,
    ) -> senet::Result<Tensor<f32>> {
        let x = self.0.upload(x)?;
        self.0.download(self.0.channel_affine(x, a, b, relu)?)
    }
    fn batch_norm_backward(
        &self,
        x: &Tensor<f32>,
        dy: &Tensor<f32>,
        mean: &[f64],
        invstd: &[f64],
        gamma: &[f32],
        batch_stats: bool,
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> senet::Result<Tensor<f32>> {
        let (x, dy) = (self.0.upload(x.clone())?, self.0.upload(dy.clone())?);
        self.0.download(self.0.batch_norm_backward(
            &x,
            &dy,
            mean,
            invstd,
            gamma,
            batch_stats,
            dgamma,
            dbeta,
        )?)
    }
    fn relu(&self, x: Tensor<f32>) -> senet::Result<Tensor<f32>> {
        let x = self.0.upload(x)?;
        self.0.download(self.0.relu(x)?)
    }
    fn relu_backward(&self, y: &Tensor<f32>, dy: Tensor<f32>) -> senet::Result<Tensor<f32>> {
        let (y, dy) = (self.0.upload(y.clone())?, self.0.upload(dy)?);
        self.0.download(self.0.relu_backward(&y, dy)?)
    }
    fn add(&self, a: Tensor<f32>, b: &Tensor<f32>, relu: bool) -> senet::Result<Tensor<f32>> {
        let (a, b) = (self.0.upload(a)?, self.0.upload(b.clone())?);
        self.0.download(self.0.add(a, &b, relu)?)
    }
    fn max_pool2d(
        &self,
        x: &Tensor<f32>,
        g: &senet::nn::PoolGeom,
    ) -> senet::Result<(Tensor<f32>, B::PoolIdx)> {
        let (y, i) = self.0.max_pool2d(&self.0.upload(x.clone())?, g)?;
        Ok((self.0.download(y)?, i))
    }
    fn max_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        argmax: &B::PoolIdx,
        input: Shape,
    ) -> senet::Result<Tensor<f32>> {
        let dy = self.0.upload(dy.clone())?;
        self.0
            .download(self.0.max_pool2d_backward(&dy, argmax, input)?)
    }
    fn avg_pool2d(&self, x: &Tensor<f32>, g: &senet::nn::PoolGeom) -> senet::Result<Tensor<f32>> {
        self.0
            .download(self.0.avg_pool2d(&self.0.upload(x.clone())?, g)?)
    }
    fn avg_pool2d_backward(
        &self,
        dy: &Tensor<f32>,
        g: &senet::nn::PoolGeom,
        input: Shape,
    ) -> senet::Result<Tensor<f32>> {
        let dy = self.0.upload(dy.clone())?;
        self.0.download(self.0.avg_pool2d_backward(&dy, g, input)?)
    }
    fn global_avg_pool(&self, x: &Tensor<f32>) -> senet::Result<Tensor<f32>> {
        self.0
            .download(self.0.global_avg_pool(&self.0.upload(x.clone())?)?)
    }
    fn global_avg_pool_backward(
        &self,
        dy: &Tensor<f32>,
        input: Shape,
    ) -> senet::Result<Tensor<f32>> {
        let dy = self.0.upload(dy.clone())?;
        self.0
            .download(self.0.global_avg_pool_backward(&dy, input)?)
    }
    fn linear(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        b: Option<&[f32]>,
        out: usize,
    ) -> senet::Result<Tensor<f32>> {
        let x = self.0.upload(x.clone())?;
        self.0.download(self.0.linear(&x, w, b, out)?)
    }
    fn linear_backward(
        &self,
        x: &Tensor<f32>,
        w: &[f32],
        dy: &Tensor<f32>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) -> senet::Result<Tensor<f32>> {
        let (x, dy) = (self.0.upload(x.clone())?, self.0.upload(dy.clone())?);
        self.0.download(self.0.linear_backward(&x, w, &dy, dw, db)?)
    }
    fn se_forward(
        &self,
        w: &senet::SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
    ) -> senet::Result<(Tensor<f32>, B::SeSaved)> {
        let x = self.0.upload(x.clone())?;
        let r = residual.map(|r| self.0.upload(r.clone())).transpose()?;
        let (y, saved) = self.0.se_forward(w, &x, r.as_ref())?;
        Ok((self.0.download(y)?, saved))
    }
    fn se_backward(
        &self,
        w: &senet::SeWeights,
        x: &Tensor<f32>,
        residual: Option<&Tensor<f32>>,
        saved: &B::SeSaved,
        dy: &Tensor<f32>,
    ) -> senet::Result<senet::nn::backend::SeBackward<Tensor<f32>>> {
        let x = self.0.upload(x.clone())?;
        let r = residual.map(|r| self.0.upload(r.clone())).transpose()?;
        let dy = self.0.upload(dy.clone())?;
        let b = self.0.se_backward(w, &x, r.as_ref(), saved, &dy)?;
        Ok(senet::nn::backend::SeBackward {
            dx: self.0.download(b.dx)?,
            grads: b.grads,
            dresidual: b.dresidual.map(|d| self.0.download(d)).transpose()?,
        })
    }
}
