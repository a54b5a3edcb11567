//! `senet verify`: every backend against the f64 reference on fresh random inputs, and the
//! reference's gradients against finite differences. Exits non-zero on any failure.

use half::{bf16, f16};
use senet::cuda::{CudaDevice, CudaElement, DeviceTensor};
use senet::se::cuda::{self as secuda, DeviceSeWeights, SeOptions, SePath};
use senet::se::gradcheck::finite_differences;
use senet::se::reference;
use senet::{
    rel_l2_error, Activation, DType, Element, Error, Gate, Init, Layout, Result, SeConfig,
    SeWeights, Shape, Tensor,
};
use std::process::ExitCode;

/// Options of `senet verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Shapes NxCxHxW, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["2x64x14x14".to_string(), "1x17x7x7".to_string(), "3x3x1x5".to_string()])]
    shapes: Vec<String>,
    /// Element types.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["f32".to_string(), "f16".to_string(), "bf16".to_string()])]
    dtypes: Vec<String>,
    /// Layouts.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["nchw".to_string(), "nhwc".to_string()])]
    layouts: Vec<String>,
    /// Backends: reference (finite differences), cuda (when a device is present).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["reference".to_string(), "cuda".to_string()])]
    backends: Vec<String>,
    /// Seed (default: fresh each run, printed).
    #[arg(long)]
    seed: Option<u64>,
}

/// One checked quantity.
struct Check {
    what: &'static str,
    got: Vec<f64>,
    want: Vec<f64>,
    tol: f64,
}

struct Row {
    shape: String,
    dtype: String,
    layout: String,
    backend: String,
    worst: String,
    err: f64,
    tol: f64,
}

impl Row {
    fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

/// The check with the largest error relative to its tolerance.
fn worst(checks: &[Check]) -> (&'static str, f64, f64) {
    checks
        .iter()
        .map(|c| (c.what, rel_l2_error(&c.got, &c.want), c.tol))
        .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)))
        .unwrap_or(("-", 0.0, 1.0))
}

fn random_weights(
    c: usize,
    bias: bool,
    act: Activation,
    gate: Gate,
    seed: u64,
) -> Result<SeWeights> {
    let cfg = SeConfig::with_reduction(c, 16)?
        .bias(bias)
        .activation(act)
        .gate(gate);
    let mut w = SeWeights::init(cfg, Init::PyTorchDefault, seed)?;
    for v in w.w1.iter_mut().chain(w.w2.iter_mut()) {
        *v *= 2.0;
    }
    Ok(w)
}

/// The variants every backend runs: (gate, bias, epilogue, activation).
fn variants() -> Vec<(Gate, bool, bool, Activation)> {
    let mut v = Vec::new();
    for gate in Gate::ALL {
        for bias in [true, false] {
            for epilogue in [false, true] {
                let act = if gate == Gate::HardSigmoid && bias && epilogue {
                    Activation::Silu
                } else {
                    Activation::Relu
                };
                v.push((gate, bias, epilogue, act));
            }
        }
    }
    v
}

fn reference_rows(seed: u64, rows: &mut Vec<Row>) -> Result<()> {
    let shape = Shape::new(2, 5, 2, 3);
    for (k, (gate, bias, epilogue, act)) in variants().into_iter().enumerate() {
        let s = seed.wrapping_add(k as u64 * 31);
        let cfg = SeConfig::with_hidden(5, 3)?
            .bias(bias)
            .activation(act)
            .gate(gate);
        let w = SeWeights::init(cfg, Init::PyTorchDefault, s)?;
        let x = Tensor::<f64>::random(shape, Layout::Nchw, s + 1)?;
        let r = if epilogue {
            Some(Tensor::<f64>::random(shape, Layout::Nchw, s + 2)?)
        } else {
            None
        };
        let probe = Tensor::<f64>::random(shape, Layout::Nchw, s + 3)?;
        let f = reference::forward(&w, &x, r.as_ref())?;
        let b = reference::backward(&w, &x, r.as_ref(), &f.saved, &probe)?;
        let fd = finite_differences(&w, &x, r.as_ref(), &probe)?;
        let tol = 1e-6;
        let mut checks = vec![
            Check {
                what: "dx",
                got: b.dx,
                want: fd.dx,
                tol,
            },
            Check {
                what: "dw1",
                got: b.grads.dw1,
                want: fd.grads.dw1,
                tol,
            },
            Check {
                what: "dw2",
                got: b.grads.dw2,
                want: fd.grads.dw2,
                tol,
            },
        ];
        for (what, g, f) in [
            ("db1", b.grads.db1, fd.grads.db1),
            ("db2", b.grads.db2, fd.grads.db2),
            ("dresidual", b.dresidual, fd.dresidual),
        ] {
            if let (Some(g), Some(f)) = (g, f) {
                checks.push(Check {
                    what,
                    got: g,
                    want: f,
                    tol,
                });
            }
        }
        let (name, err, tol) = worst(&checks);
        rows.push(Row {
            shape: shape.to_string(),
            dtype: "f64".into(),
            layout: "nchw".into(),
            backend: format!(
                "reference vs finite diff ({gate}, {act}, bias={bias}, epilogue={epilogue})"
            ),
            worst: name.into(),
            err,
            tol,
        });
    }
    Ok(())
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn cuda_rows<T: CudaElement>(
    dev: &CudaDevice,
    shape: Shape,
    layout: Layout,
    seed: u64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let mut paths = vec![SePath::Auto, SePath::ThreeKernel, SePath::L2Chunked];
    if dev.has_clusters() {
        paths.push(SePath::Cluster);
    }
    for path in paths {
        let mut all = Vec::new();
        for (k, (gate, bias, epilogue, act)) in variants().into_iter().enumerate() {
            let s = seed.wrapping_add(k as u64 * 131);
            let w = random_weights(shape.c, bias, act, gate, s)?;
            let x = Tensor::<T>::random(shape, layout, s + 1)?;
            let r = if epilogue {
                Some(Tensor::<T>::random(shape, layout, s + 2)?)
            } else {
                None
            };
            let dy = Tensor::<T>::random(shape, layout, s + 3)?;
            let rf = reference::forward(&w, &x, r.as_ref())?;
            let rb = reference::backward(&w, &x, r.as_ref(), &rf.saved, &dy)?;
            let dw = DeviceSeWeights::upload(dev, &w)?;
            let xd = DeviceTensor::from_host(dev, &x)?;
            let rd = r
                .as_ref()
                .map(|t| DeviceTensor::from_host(dev, t))
                .transpose()?;
            let dyd = DeviceTensor::from_host(dev, &dy)?;
            let opts = SeOptions {
                path,
                chunk_samples: (path == SePath::L2Chunked).then_some(1),
            };
            let out = match secuda::forward(dev, &dw, &xd, rd.as_ref(), opts) {
                Err(Error::Unsupported(_)) => break,
                o => o?,
            };
            let back = secuda::backward(dev, &dw, &xd, rd.as_ref(), &out.saved, &dyd, opts)?;
            let sv = out.saved.download(dev)?;
            let g = back.grads.download(dev)?;
            let (ty, tg) = (T::DTYPE.output_tolerance(), T::DTYPE.grad_tolerance());
            all.push(Check {
                what: "y",
                got: out.y.to_host(dev)?.to_f64_vec(),
                want: rf.y,
                tol: ty,
            });
            all.push(Check {
                what: "s",
                got: f64s(&sv.s),
                want: rf.saved.s,
                tol: 1e-5,
            });
            all.push(Check {
                what: "dx",
                got: back.dx.to_host(dev)?.to_f64_vec(),
                want: rb.dx,
                tol: tg,
            });
            all.push(Check {
                what: "dw1",
                got: f64s(&g.dw1),
                want: rb.grads.dw1,
                tol: 1e-4,
            });
            all.push(Check {
                what: "dw2",
                got: f64s(&g.dw2),
                want: rb.grads.dw2,
                tol: 1e-4,
            });
            if let (Some(a), Some(b)) = (&g.db1, rb.grads.db1) {
                all.push(Check {
                    what: "db1",
                    got: f64s(a),
                    want: b,
                    tol: 1e-4,
                });
            }
            if let (Some(a), Some(b)) = (&g.db2, rb.grads.db2) {
                all.push(Check {
                    what: "db2",
                    got: f64s(a),
                    want: b,
                    tol: 1e-4,
                });
            }
            if let (Some(a), Some(b)) = (&back.dresidual, rb.dresidual) {
                all.push(Check {
                    what: "dresidual",
                    got: a.to_host(dev)?.to_f64_vec(),
                    want: b,
                    tol: tg,
                });
            }
        }
        if all.is_empty() {
            continue;
        }
        let (name, err, tol) = worst(&all);
        rows.push(Row {
            shape: shape.to_string(),
            dtype: T::DTYPE.to_string(),
            layout: layout.to_string(),
            backend: format!("cuda {path}"),
            worst: name.into(),
            err,
            tol,
        });
    }
    Ok(())
}

pub fn run(args: Args) -> Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(senet::rng::fresh_seed);
    println!("senet verify: seed {seed} (replay with --seed {seed})");
    let shapes: Vec<Shape> = args
        .shapes
        .iter()
        .map(|s| crate::gpu_bench::parse_shape(s))
        .collect::<Result<_>>()?;
    let dtypes: Vec<DType> = args
        .dtypes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    let layouts: Vec<Layout> = args
        .layouts
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    let want = |b: &str| args.backends.iter().any(|x| x == b || x == "all");
    let mut rows = Vec::new();
    if want("reference") {
        reference_rows(seed, &mut rows)?;
    }
    if want("cuda") {
        match CudaDevice::new(0) {
            Ok(dev) => {
                for &shape in &shapes {
                    for &dtype in &dtypes {
                        for &layout in &layouts {
                            match dtype {
                                DType::F32 => {
                                    cuda_rows::<f32>(&dev, shape, layout, seed, &mut rows)?
                                }
                                DType::F16 => {
                                    cuda_rows::<f16>(&dev, shape, layout, seed, &mut rows)?
                                }
                                DType::BF16 => {
                                    cuda_rows::<bf16>(&dev, shape, layout, seed, &mut rows)?
                                }
                                DType::F64 => {}
                            }
                        }
                    }
                }
            }
            Err(e) if e.is_no_gpu() => println!("cuda: skipped ({e})"),
            Err(e) => return Err(e),
        }
    }
    println!(
        "| shape | dtype | layout | backend | worst check | rel. error | tolerance | result |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2e} | {:.0e} | {} |",
            r.shape,
            r.dtype,
            r.layout,
            r.backend,
            r.worst,
            r.err,
            r.tol,
            if r.pass() { "pass" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.pass()).count();
    println!("{} checks, {} failed", rows.len(), failed);
    let _ = <f32 as Element>::DTYPE;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
