//! `senet gpu-bench`: SE forward and backward on the GPU against a device-to-device copy of the
//! same bytes, timed with CUDA events in the same run.
//!
//! For each shape, dtype, layout and path: warm-up, then `--iters` timed calls, each bracketed by
//! events, rotating through enough input sets that they do not all fit in L2; the median is
//! reported. Forward must move 2N bytes (read x, write y) and backward 3N (read dy and x, write
//! dx), N = tensor bytes; "% copy" is the achieved fraction of the copy's bandwidth.

use crate::cuda::{CudaDevice, CudaElement, DeviceTensor};
use crate::se::cuda::{
    self as secuda, choose_path, DeviceSeGrads, DeviceSeSaved, DeviceSeWeights, Direction,
    SeOptions, SePath,
};
use crate::{DType, Error, Init, Layout, Result, SeConfig, SeWeights, Shape, Tensor};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use half::bf16;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `senet gpu-bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Shapes NxCxHxW, comma separated. Default: the ResNet-50 stages at batch 256, 8 and 1.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Element types.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["bf16".to_string(), "f32".to_string()])]
    dtypes: Vec<String>,
    /// Layouts.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["nchw".to_string(), "nhwc".to_string()])]
    layouts: Vec<String>,
    /// Paths to time (auto, three-kernel, l2-chunked, cluster); unsupported ones are skipped.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["auto".to_string(), "three-kernel".to_string(), "l2-chunked".to_string(), "cluster".to_string()])]
    paths: Vec<String>,
    /// Timed calls per measurement (median reported).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed calls first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Skip the backward pass.
    #[arg(long)]
    forward_only: bool,
    /// Also write the table as CSV to this file.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
}

fn default_shapes() -> Vec<Shape> {
    let stages = [(256, 56), (512, 28), (1024, 14), (2048, 7)];
    let mut v = Vec::new();
    for n in [256, 8, 1] {
        for (c, hw) in stages {
            v.push(Shape::new(n, c, hw, hw));
        }
    }
    v
}

struct Timer {
    stream: Arc<cudarc::driver::CudaStream>,
    events: Vec<(CudaEvent, CudaEvent)>,
}

impl Timer {
    fn new(dev: &Arc<CudaDevice>, n: usize) -> Result<Self> {
        let (Some(ctx), Some(stream)) = (dev.context(), dev.stream()) else {
            return Err(Error::Unsupported(
                "gpu-bench times a real CUDA device, not the emulator".into(),
            ));
        };
        let mk = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error::Driver {
                    context: "creating an event".into(),
                    source: e,
                })
        };
        let events = (0..n).map(|_| Ok((mk()?, mk()?))).collect::<Result<_>>()?;
        Ok(Timer {
            stream: stream.clone(),
            events,
        })
    }

    /// Median milliseconds of `f(i)` over the timer's iterations (after `warmup` untimed calls).
    fn median(&self, warmup: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        for i in 0..warmup {
            f(i)?;
        }
        let stream = &self.stream;
        for (i, (a, b)) in self.events.iter().enumerate() {
            a.record(stream).map_err(|e| Error::Driver {
                context: "event".into(),
                source: e,
            })?;
            f(warmup + i)?;
            b.record(stream).map_err(|e| Error::Driver {
                context: "event".into(),
                source: e,
            })?;
        }
        stream.synchronize().map_err(|e| Error::Driver {
            context: "synchronizing".into(),
            source: e,
        })?;
        let mut t: Vec<f64> = self
            .events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map(|v| v as f64))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Driver {
                context: "event timing".into(),
                source: e,
            })?;
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }
}

struct Row {
    shape: Shape,
    layout: Layout,
    dtype: DType,
    path: String,
    auto_fwd: SePath,
    auto_bwd: SePath,
    copy_ms: f64,
    fwd_ms: Option<f64>,
    bwd_ms: Option<f64>,
}

impl Row {
    fn fwd_frac(&self) -> Option<f64> {
        self.fwd_ms.map(|t| self.copy_ms / t)
    }
    fn bwd_frac(&self) -> Option<f64> {
        self.bwd_ms.map(|t| 1.5 * self.copy_ms / t)
    }
}

fn bench_one<T: CudaElement>(
    dev: &Arc<CudaDevice>,
    shape: Shape,
    layout: Layout,
    paths: &[SePath],
    args: &Args,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let cfg = SeConfig::with_reduction(shape.c, 16)?;
    let w = SeWeights::init(cfg, Init::PyTorchDefault, 7)?;
    let dw = DeviceSeWeights::upload(dev, &w)?;
    let bytes = shape.numel() * std::mem::size_of::<T>();
    // Enough input sets that together they exceed three L2s (at least 2).
    let sets = (3 * dev.info().l2_bytes).div_ceil(bytes).clamp(2, 64);
    let proto_shape = Shape::new(1, shape.c, shape.h, shape.w);
    let proto = Tensor::<T>::random(proto_shape, layout, 11)?;
    let mk = |set: usize| -> Result<DeviceTensor<T>> {
        // Each sample a different rotation of one random sample: real data, cheap to make.
        let mut t = DeviceTensor::<T>::zeros(dev, shape, layout)?;
        let p = proto.data();
        let mut sample = Vec::with_capacity(p.len());
        for n in 0..shape.n {
            let k = (n * 37 + set * 101) % p.len();
            sample.clear();
            sample.extend_from_slice(&p[k..]);
            sample.extend_from_slice(&p[..k]);
            t.write_sample(dev, n, &sample)?;
        }
        Ok(t)
    };
    let xs: Vec<_> = (0..sets).map(mk).collect::<Result<_>>()?;
    let dys: Vec<_> = if args.forward_only {
        Vec::new()
    } else {
        (0..sets).map(|i| mk(i + 101)).collect::<Result<_>>()?
    };
    let mut ys: Vec<_> = (0..sets)
        .map(|_| DeviceTensor::<T>::zeros(dev, shape, layout))
        .collect::<Result<_>>()?;
    let mut saved: Vec<_> = (0..sets)
        .map(|_| DeviceSeSaved::new(dev, cfg, shape.n))
        .collect::<Result<_>>()?;
    let mut grads = DeviceSeGrads::new(dev, cfg)?;
    let timer = Timer::new(dev, args.iters.max(1))?;

    let copy_ms = timer.median(args.warmup, |i| ys[i % sets].copy_from(dev, &xs[i % sets]))?;
    let esize = std::mem::size_of::<T>();
    let auto_fwd = choose_path(dev, &cfg, shape, layout, esize, Direction::Forward);
    let auto_bwd = choose_path(dev, &cfg, shape, layout, esize, Direction::Backward);
    for &path in paths {
        let opts = SeOptions::with_path(path);
        let fwd = timer.median(args.warmup, |i| {
            let k = i % sets;
            secuda::forward_into(dev, &dw, &xs[k], None, &mut ys[k], &mut saved[k], opts)
                .map(|_| ())
        });
        let fwd_ms = match fwd {
            Ok(t) => Some(t),
            Err(Error::Unsupported(_)) => None,
            Err(e) => return Err(e),
        };
        let mut bwd_ms = None;
        if !args.forward_only && fwd_ms.is_some() {
            // ys doubles as dx: its values are no longer needed.
            let r = timer.median(args.warmup, |i| {
                let k = i % sets;
                secuda::backward_into(
                    dev, &dw, &xs[k], None, &saved[k], &dys[k], &mut ys[k], false, &mut grads,
                    None, opts,
                )
                .map(|_| ())
            });
            bwd_ms = match r {
                Ok(t) => Some(t),
                Err(Error::Unsupported(_)) => None,
                Err(e) => return Err(e),
            };
        }
        if fwd_ms.is_none() && bwd_ms.is_none() {
            continue;
        }
        let name = if path == SePath::Auto {
            format!("auto={}/{}", auto_fwd, auto_bwd)
        } else {
            path.to_string()
        };
        rows.push(Row {
            shape,
            layout,
            dtype: T::DTYPE,
            path: name,
            auto_fwd,
            auto_bwd,
            copy_ms,
            fwd_ms,
            bwd_ms,
        });
    }
    Ok(())
}

fn fmt_opt(v: Option<f64>, scale: f64, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{:.*}", prec, x * scale))
}

pub fn run(args: Args) -> Result<ExitCode> {
    let dev = CudaDevice::new(0)?;
    let info = dev.info().clone();
    println!(
        "device: {} (sm_{}{}, {} SMs, {} MiB L2), driver {}, kernels by {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.l2_bytes >> 20,
        info.driver_version,
        crate::cuda::kernels::NVCC_VERSION
    );
    let shapes = if args.shapes.is_empty() {
        default_shapes()
    } else {
        super::parse_all(&args.shapes)?
    };
    let dtypes: Vec<DType> = super::parse_all(&args.dtypes)?;
    let layouts: Vec<Layout> = super::parse_all(&args.layouts)?;
    let paths: Vec<SePath> = super::parse_all(&args.paths)?;
    let mut rows = Vec::new();
    let total = shapes.len() * dtypes.len() * layouts.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    for &shape in &shapes {
        for &dtype in &dtypes {
            for &layout in &layouts {
                bar.set_message(format!("{shape} {dtype} {layout}"));
                match dtype {
                    DType::F32 => bench_one::<f32>(&dev, shape, layout, &paths, &args, &mut rows)?,
                    DType::BF16 => {
                        bench_one::<bf16>(&dev, shape, layout, &paths, &args, &mut rows)?
                    }
                    DType::F16 => {
                        bench_one::<half::f16>(&dev, shape, layout, &paths, &args, &mut rows)?
                    }
                    DType::F64 => return Err(Error::Unsupported("f64 has no GPU kernels".into())),
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let header =
        "| shape | layout | dtype | path | copy us | fwd us | fwd % copy | bwd us | bwd % copy |";
    println!("{header}\n|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from(
        "shape,layout,dtype,path,auto_fwd,auto_bwd,copy_us,fwd_us,fwd_frac,bwd_us,bwd_frac\n",
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} |",
            r.shape,
            r.layout,
            r.dtype,
            r.path,
            r.copy_ms * 1e3,
            fmt_opt(r.fwd_ms, 1e3, 1),
            fmt_opt(r.fwd_frac(), 100.0, 0),
            fmt_opt(r.bwd_ms, 1e3, 1),
            fmt_opt(r.bwd_frac(), 100.0, 0)
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.3},{},{},{},{}\n",
            r.shape,
            r.layout,
            r.dtype,
            r.path,
            r.auto_fwd,
            r.auto_bwd,
            r.copy_ms * 1e3,
            fmt_opt(r.fwd_ms, 1e3, 3),
            fmt_opt(r.fwd_frac(), 1.0, 4),
            fmt_opt(r.bwd_ms, 1e3, 3),
            fmt_opt(r.bwd_frac(), 1.0, 4)
        ));
    }
    if let Some(p) = &args.csv {
        std::fs::File::create(p)
            .and_then(|mut f| f.write_all(csv.as_bytes()))
            .map_err(Error::io(format!("writing {}", p.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}
