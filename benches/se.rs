//! Criterion benchmarks of SE forward and backward at ResNet-50's four stage shapes,
//! (C, H, W) = (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7), at batch 32 and 1,
//! f32 and bf16, NCHW and NHWC, for every backend this machine has.
//!
//! One group per direction and shape (`fwd/32x256x56x56`), one benchmark per backend, dtype and
//! layout (`cpu/f32/nchw`). Throughput is the bytes the op must move (DESIGN.md): forward 2N
//! (read x, write y), backward 3N (read dy and x, write dx), N = tensor bytes.
//!
//! The reference (the f64 oracle, plain loops) runs at batch 1 only: at batch 32 one call takes
//! seconds. The CUDA backend runs when a device is present (each iteration waits for the
//! stream); without one its `skip` says why. `senet gpu-bench` is the finer GPU measurement
//! (CUDA events, rotating inputs, every path, a copy of the same bytes in the same run).
//!
//! `cargo bench --bench se -- --quick` runs the whole suite in a few minutes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use senet::cuda::{CudaDevice, CudaElement, DeviceTensor};
use senet::se::cuda::{self as secuda, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights, SeOptions};
use senet::se::{cpu, reference};
use senet::{Element, Init, Layout, SeConfig, SeWeights, Shape, Tensor};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The CUDA device, opened once (None without one).
fn gpu() -> Option<&'static Arc<CudaDevice>> {
    static DEV: OnceLock<Option<Arc<CudaDevice>>> = OnceLock::new();
    DEV.get_or_init(|| CudaDevice::new(0).ok()).as_ref()
}

/// ResNet-50's SE stage shapes (C, H, W).
const STAGES: [(usize, usize, usize); 4] =
    [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)];
const BATCHES: [usize; 2] = [32, 1];

#[derive(Clone, Copy, Debug)]
enum Backend {
    Reference,
    Cpu,
    Cuda,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Cuda, Backend::Cpu, Backend::Reference];

    fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }

    /// Why this backend does not run `shape` here, if it does not.
    fn skip(self, shape: Shape) -> Option<&'static str> {
        match self {
            Backend::Reference if shape.n > 1 => Some("the f64 reference runs at batch 1 only"),
            Backend::Cuda if gpu().is_none() => Some("no CUDA device (or no kernels built)"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Fwd,
    Bwd,
}

/// Inputs for one benchmark.
struct Case<T> {
    w: SeWeights,
    x: Tensor<T>,
    dy: Tensor<T>,
}

impl<T: Element> Case<T> {
    fn new(shape: Shape, layout: Layout) -> Self {
        let cfg = SeConfig::with_reduction(shape.c, 16).expect("config");
        Case {
            w: SeWeights::init(cfg, Init::PyTorchDefault, 1).expect("weights"),
            x: Tensor::random(shape, layout, 2).expect("x"),
            dy: Tensor::random(shape, layout, 3).expect("dy"),
        }
    }
}

fn bench_one<T: CudaElement>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    backend: Backend,
    dir: Direction,
    shape: Shape,
    layout: Layout,
) {
    let id = BenchmarkId::from_parameter(format!("{}/{}/{layout}", backend.name(), T::DTYPE));
    let case = Case::<T>::new(shape, layout);
    let (w, x, dy) = (&case.w, &case.x, &case.dy);
    match (backend, dir) {
        (Backend::Cpu, Direction::Fwd) => {
            let mut y = Tensor::zeros(shape, layout).expect("y");
            let mut saved = cpu::CpuSaved::new(&w.config, shape.n);
            g.bench_function(id, |b| {
                b.iter(|| cpu::forward_into(w, x, None, &mut y, &mut saved).expect("forward"))
            });
        }
        (Backend::Cpu, Direction::Bwd) => {
            let saved = cpu::forward(w, x, None).expect("forward").saved;
            let mut dx = Tensor::zeros(shape, layout).expect("dx");
            let mut grads = cpu::zero_grads(&w.config);
            g.bench_function(id, |b| {
                b.iter(|| {
                    cpu::backward_into(w, x, None, &saved, dy, &mut dx, false, &mut grads, None)
                        .expect("backward")
                })
            });
        }
        (Backend::Reference, Direction::Fwd) => {
            g.bench_function(id, |b| {
                b.iter(|| reference::forward(w, x, None).expect("forward"))
            });
        }
        (Backend::Reference, Direction::Bwd) => {
            let saved = reference::forward(w, x, None).expect("forward").saved;
            g.bench_function(id, |b| {
                b.iter(|| reference::backward(w, x, None, &saved, dy).expect("backward"))
            });
        }
        (Backend::Cuda, dir) => {
            let dev = gpu().expect("skip() checked the device");
            let dw = DeviceSeWeights::upload(dev, w).expect("weights");
            let xd = DeviceTensor::from_host(dev, x).expect("x");
            let dyd = DeviceTensor::from_host(dev, dy).expect("dy");
            let mut out = DeviceTensor::<T>::zeros(dev, shape, layout).expect("y");
            let mut saved = DeviceSeSaved::new(dev, w.config, shape.n).expect("saved");
            let mut grads = DeviceSeGrads::new(dev, w.config).expect("grads");
            let opts = SeOptions::default();
            secuda::forward_into(dev, &dw, &xd, None, &mut out, &mut saved, opts).expect("forward");
            g.bench_function(id, |b| {
                b.iter(|| {
                    match dir {
                        Direction::Fwd => {
                            secuda::forward_into(dev, &dw, &xd, None, &mut out, &mut saved, opts)
                        }
                        Direction::Bwd => secuda::backward_into(
                            dev, &dw, &xd, None, &saved, &dyd, &mut out, false, &mut grads, None,
                            opts,
                        ),
                    }
                    .expect("cuda");
                    dev.synchronize().expect("synchronize");
                })
            });
        }
    }
}

fn se(c: &mut Criterion) {
    for n in BATCHES {
        for (ch, h, wd) in STAGES {
            let shape = Shape::new(n, ch, h, wd);
            for (dir, name, moved) in [(Direction::Fwd, "fwd", 2), (Direction::Bwd, "bwd", 3)] {
                let mut g = c.benchmark_group(format!("{name}/{shape}"));
                g.sample_size(10)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(1));
                for backend in Backend::ALL {
                    if let Some(why) = backend.skip(shape) {
                        eprintln!("skipped {}: {why}", backend.name());
                        continue;
                    }
                    for layout in Layout::ALL {
                        g.throughput(Throughput::Bytes((moved * shape.numel() * 4) as u64));
                        bench_one::<f32>(&mut g, backend, dir, shape, layout);
                        g.throughput(Throughput::Bytes((moved * shape.numel() * 2) as u64));
                        bench_one::<bf16>(&mut g, backend, dir, shape, layout);
                    }
                }
                g.finish();
            }
        }
    }
}

criterion_group!(benches, se);
criterion_main!(benches);
