//! `senet bench`: time SE forward and backward per shape, layout, dtype and backend, next to a
//! memcpy of the same bytes timed in the same run.
//!
//! Bytes moved (DESIGN.md's yardstick): forward 2N (read x, write y), backward 3N (read dy and
//! x, write dx), N = tensor bytes; with `--residual` one more N each way (read the residual;
//! write d residual). GB/s is those bytes over the median time; "of memcpy" divides it by the
//! rate of a parallel memcpy (read + write counted) on the same threads. The minimum is printed
//! too: on a shared machine it is the time least disturbed by other processes.

use crate::se::{cpu, reference};
use crate::{DType, Element, Error, Init, Layout, Result, SeConfig, SeWeights, Shape, Tensor};
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// ResNet-50's four SE stage shapes at batch 32.
const DEFAULT_SHAPES: &str = "32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7";

/// Options of `senet bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Shapes as NxCxHxW, comma-separated.
    #[arg(long, default_value = DEFAULT_SHAPES, value_delimiter = ',')]
    shapes: Vec<ShapeArg>,
    /// Element types (f32, f16, bf16).
    #[arg(long, default_value = "f32,bf16", value_delimiter = ',')]
    dtypes: Vec<DType>,
    /// Layouts (nchw, nhwc).
    #[arg(long, default_value = "nchw,nhwc", value_delimiter = ',')]
    layouts: Vec<Layout>,
    /// Backends (cpu, reference; cpu-grouped, cpu-batched, cpu-per-sample force a CPU
    /// schedule). The reference is the f64 oracle: slow, meant for batch 1.
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    backends: Vec<Backend>,
    /// Directions (fwd, bwd).
    #[arg(long, default_value = "fwd,bwd", value_delimiter = ',')]
    directions: Vec<Direction>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed runs per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// SE reduction ratio (hidden width C / r rounded as timm does).
    #[arg(long, default_value_t = 16)]
    reduction: usize,
    /// Benchmark the fused epilogue y = relu(s * x + residual).
    #[arg(long)]
    residual: bool,
    /// Print the table as Markdown.
    #[arg(long)]
    markdown: bool,
}

/// A shape on the command line, `NxCxHxW`.
#[derive(Clone, Copy, Debug)]
struct ShapeArg(Shape);

impl FromStr for ShapeArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        s.parse().map(ShapeArg)
    }
}

/// Which implementation runs. A new backend (CUDA) is one more variant here and one more arm in
/// [`Backend::prepare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// The f64 oracle ([`crate::se::reference`]).
    Reference,
    /// The fast CPU path ([`crate::se::cpu`]), with its schedule picked per shape (`Auto`) or
    /// forced, to compare schedules side by side.
    Cpu(cpu::Schedule),
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu(cpu::Schedule::Auto) => "cpu",
            Backend::Cpu(cpu::Schedule::Grouped) => "cpu-grouped",
            Backend::Cpu(cpu::Schedule::Batched) => "cpu-batched",
            Backend::Cpu(cpu::Schedule::PerSample) => "cpu-per-sample",
        }
    }

    /// Builds the timed closures for one case, or says why this backend cannot run it here.
    fn prepare<'a, T: Element>(self, case: &'a Case<T>) -> Result<Runner<'a>> {
        match self {
            Backend::Reference => Ok(reference_runner(case)),
            Backend::Cpu(schedule) => cpu_runner(case, schedule),
        }
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "reference" | "ref" => Ok(Backend::Reference),
            "cpu" => Ok(Backend::Cpu(cpu::Schedule::Auto)),
            other => match other.strip_prefix("cpu-").map(str::parse) {
                Some(Ok(schedule)) => Ok(Backend::Cpu(schedule)),
                _ => Err(Error::Config(format!(
                    "unknown backend `{s}` (cpu, cpu-grouped, cpu-batched, cpu-per-sample, \
                     reference)"
                ))),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Fwd,
    Bwd,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Fwd => "fwd",
            Direction::Bwd => "bwd",
        })
    }
}

impl FromStr for Direction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fwd" | "forward" => Ok(Direction::Fwd),
            "bwd" | "backward" => Ok(Direction::Bwd),
            _ => Err(Error::Config(format!("unknown direction `{s}` (fwd, bwd)"))),
        }
    }
}

/// One case's inputs.
struct Case<T> {
    w: SeWeights,
    x: Tensor<T>,
    r: Option<Tensor<T>>,
    dy: Tensor<T>,
}

/// A backend's timed forward and backward for one case.
struct Runner<'a> {
    fwd: Box<dyn FnMut() -> Result<()> + 'a>,
    bwd: Box<dyn FnMut() -> Result<()> + 'a>,
}

fn reference_runner<T: Element>(case: &Case<T>) -> Runner<'_> {
    Runner {
        fwd: Box::new(move || reference::forward(&case.w, &case.x, case.r.as_ref()).map(drop)),
        bwd: Box::new(move || {
            // The reference has no separate saved state to reuse; its forward is not timed.
            let saved = reference::forward(&case.w, &case.x, case.r.as_ref())?.saved;
            reference::backward(&case.w, &case.x, case.r.as_ref(), &saved, &case.dy).map(drop)
        }),
    }
}

fn cpu_runner<T: Element>(case: &Case<T>, schedule: cpu::Schedule) -> Result<Runner<'_>> {
    let (shape, layout) = (case.x.shape(), case.x.layout());
    let mut y = Tensor::<T>::zeros(shape, layout)?;
    let mut saved = cpu::CpuSaved::new(&case.w.config, shape.n);
    cpu::forward_into(&case.w, &case.x, case.r.as_ref(), &mut y, &mut saved)?;
    let saved_bwd = saved.clone();
    let mut dx = Tensor::<T>::zeros(shape, layout)?;
    let mut dres = case
        .r
        .as_ref()
        .map(|_| Tensor::<T>::zeros(shape, layout))
        .transpose()?;
    let mut grads = cpu::zero_grads(&case.w.config);
    Ok(Runner {
        fwd: Box::new(move || {
            cpu::with_schedule(schedule, || {
                cpu::forward_into(&case.w, &case.x, case.r.as_ref(), &mut y, &mut saved)
            })
        }),
        bwd: Box::new(move || {
            cpu::with_schedule(schedule, || {
                cpu::backward_into(
                    &case.w,
                    &case.x,
                    case.r.as_ref(),
                    &saved_bwd,
                    &case.dy,
                    &mut dx,
                    false,
                    &mut grads,
                    dres.as_mut(),
                )
            })
        }),
    })
}

/// One row of the table.
struct Row {
    shape: Shape,
    layout: Layout,
    dtype: DType,
    backend: &'static str,
    dir: Direction,
    median: Duration,
    min: Duration,
    bytes: usize,
    memcpy_gbs: f64,
}

impl Row {
    fn gbs(&self) -> f64 {
        self.bytes as f64 / self.median.as_secs_f64() / 1e9
    }
}

/// Median and minimum of `iters` timed calls of `f` after one warm-up call.
fn time_calls(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(Duration, Duration)> {
    f()?;
    let mut t = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed());
    }
    t.sort();
    Ok((t[t.len() / 2], t[0]))
}

/// Read + write GB/s of a parallel memcpy of `bytes` bytes on the current rayon pool.
fn memcpy_gbs(bytes: usize, iters: usize) -> Result<f64> {
    use rayon::prelude::*;
    let src = crate::tensor::try_vec(bytes, 1u8, "the memcpy baseline's source")?;
    let mut dst = crate::tensor::try_vec(bytes, 0u8, "the memcpy baseline's destination")?;
    let chunk = (bytes / (4 * rayon::current_num_threads())).max(1 << 16);
    let (t, _) = time_calls(iters, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / t.as_secs_f64() / 1e9)
}

#[allow(clippy::too_many_arguments)]
fn run_dtype<T: Element>(
    args: &Args,
    shape: Shape,
    layout: Layout,
    w: &SeWeights,
    seed: u64,
    memcpy: f64,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let case = Case::<T> {
        w: w.clone(),
        x: Tensor::random(shape, layout, seed)?,
        r: args
            .residual
            .then(|| Tensor::random(shape, layout, seed ^ 1))
            .transpose()?,
        dy: Tensor::random(shape, layout, seed ^ 2)?,
    };
    let n_bytes = shape.numel() * std::mem::size_of::<T>();
    let extra = usize::from(args.residual);
    for &backend in &args.backends {
        let mut runner = backend.prepare(&case)?;
        // The reference is plain f64 loops: a few runs are plenty.
        let iters = match backend {
            Backend::Reference => args.iters.min(3),
            _ => args.iters,
        };
        for &dir in &args.directions {
            bar.set_message(format!(
                "{shape} {layout} {} {} {dir}",
                T::DTYPE,
                backend.name()
            ));
            let ((median, min), bytes) = match dir {
                Direction::Fwd => (time_calls(iters, &mut runner.fwd)?, (2 + extra) * n_bytes),
                Direction::Bwd => (
                    time_calls(iters, &mut runner.bwd)?,
                    (3 + 2 * extra) * n_bytes,
                ),
            };
            rows.push(Row {
                shape,
                layout,
                dtype: T::DTYPE,
                backend: backend.name(),
                dir,
                median,
                min,
                bytes,
                memcpy_gbs: memcpy,
            });
            bar.inc(1);
        }
    }
    Ok(())
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        builder = builder.num_threads(t);
    }
    let pool = builder
        .build()
        .map_err(|e| Error::Config(format!("thread pool: {e}")))?;
    let threads = pool.current_num_threads();
    let total = args.shapes.len()
        * args.layouts.len()
        * args.dtypes.len()
        * args.backends.len()
        * args.directions.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    pool.install(|| -> Result<()> {
        for ShapeArg(shape) in &args.shapes {
            let cfg = SeConfig::with_reduction(shape.c, args.reduction)?;
            let w = SeWeights::init(cfg, Init::PyTorchDefault, 7)?;
            for &dtype in &args.dtypes {
                let n_bytes = shape.numel() * dtype.size();
                bar.set_message(format!("memcpy {n_bytes} bytes"));
                let memcpy = memcpy_gbs(n_bytes, args.iters)?;
                for &layout in &args.layouts {
                    let (s, l, r) = (*shape, layout, &mut rows);
                    match dtype {
                        DType::F32 => run_dtype::<f32>(&args, s, l, &w, 11, memcpy, &bar, r)?,
                        DType::F16 => run_dtype::<f16>(&args, s, l, &w, 11, memcpy, &bar, r)?,
                        DType::BF16 => run_dtype::<bf16>(&args, s, l, &w, 11, memcpy, &bar, r)?,
                        DType::F64 => {
                            return Err(Error::Config("f64 is the reference's type only".into()))
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    println!(
        "senet bench: {threads} threads, {} timed runs per row (median), reduction {}{}",
        args.iters,
        args.reduction,
        if args.residual {
            ", fused residual epilogue"
        } else {
            ""
        }
    );
    print_table(&rows, args.markdown);
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Row], markdown: bool) {
    let head = [
        "shape",
        "layout",
        "dtype",
        "backend",
        "dir",
        "median ms",
        "min ms",
        "GB/s",
        "of memcpy",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.shape.to_string(),
                r.layout.to_string(),
                r.dtype.to_string(),
                r.backend.to_string(),
                r.dir.to_string(),
                format!("{:.3}", r.median.as_secs_f64() * 1e3),
                format!("{:.3}", r.min.as_secs_f64() * 1e3),
                format!("{:.1}", r.gbs()),
                format!("{:.2}", r.gbs() / r.memcpy_gbs),
            ]
        })
        .collect();
    if markdown {
        println!("| {} |", head.join(" | "));
        println!("|{}", "---|".repeat(head.len()));
        for c in &cells {
            println!("| {} |", c.join(" | "));
        }
        return;
    }
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.len());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .zip(width)
            .map(|(s, w)| format!("{s:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(&head.map(String::from)));
    for c in &cells {
        println!("{}", line(c));
    }
    let copy: Vec<String> = {
        let mut seen: Vec<(usize, f64)> = Vec::new();
        for r in rows {
            let n = r.shape.numel() * r.dtype.size();
            if !seen.iter().any(|&(b, _)| b == n) {
                seen.push((n, r.memcpy_gbs));
            }
        }
        seen.iter()
            .map(|(b, g)| format!("{:.1} MB: {g:.1} GB/s", *b as f64 / 1e6))
            .collect()
    };
    println!("memcpy (read + write): {}", copy.join(", "));
}
