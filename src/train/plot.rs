//! PNG charts with plotters' bitmap backend: training curves of one or several runs on one
//! chart (the paper's figure of ResNet-50 against SE-ResNet-50), and the ablation bars.
//!
//! Text uses DejaVu Sans Mono, embedded in the crate (`assets/fonts`, Bitstream Vera
//! licence), so charts render the same on machines without system fonts.

use crate::error::{Error, Result};
use crate::train::metrics::EpochMetrics;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

/// One run's curves.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend label.
    pub label: String,
    /// Its epochs.
    pub metrics: Vec<EpochMetrics>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn font_ready() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Format(
            "the embedded chart font does not parse".into(),
        ))
    }
}

/// 1-2-5 ticks from `lo` to `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut t = Vec::new();
    let mut decade = 10f64.powi(lo.log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if v >= lo && v <= hi {
                t.push(v);
            }
        }
        decade *= 10.0;
    }
    t
}

fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Format(format!("drawing the chart: {e:?}"))
}

fn save_png(path: &Path, buf: &[u8], (w, h): (u32, u32)) -> Result<()> {
    image::save_buffer_with_format(
        path,
        buf,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Format(format!("writing {}: {e}", path.display())))
}

/// Draws top-1 error (%, log scale) and loss against epochs for every run, training dashed
/// and test solid, one colour per run, and writes the PNG to `path`.
pub fn curves(series: &[Series], title: &str, path: &Path) -> Result<()> {
    font_ready()?;
    let (w, h) = (1200u32, 520u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let all: Vec<&EpochMetrics> = series.iter().flat_map(|s| &s.metrics).collect();
    let max_epoch = all.iter().map(|m| m.epoch).max().unwrap_or(1).max(2) as f64;
    let errs = all
        .iter()
        .flat_map(|m| [1.0 - m.train_top1, 1.0 - m.test_top1])
        .map(|e| (e * 100.0).max(0.01));
    let (lo, hi) = errs.fold((f64::INFINITY, 0f64), |(a, b), e| (a.min(e), b.max(e)));
    let (lo, hi) = if lo.is_finite() {
        (lo / 1.3, hi * 1.3)
    } else {
        (0.1, 100.0)
    };
    let loss_hi = all
        .iter()
        .flat_map(|m| [m.train_loss, m.test_loss])
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-3)
        * 1.1;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(w / 2);
        let mut err_chart = ChartBuilder::on(&left)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                1f64..max_epoch,
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            )
            .map_err(plot_err)?;
        let epochs = max_epoch as usize;
        let x_fmt = |v: &f64| format!("{v:.0}");
        let y_fmt = |v: &f64| {
            if *v >= 10.0 {
                format!("{v:.0}")
            } else if *v >= 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        };
        err_chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("top-1 error (%), log scale")
            .x_labels(epochs)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .light_line_style(WHITE)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        let mut loss_chart = ChartBuilder::on(&right)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(1f64..max_epoch, 0f64..loss_hi)
            .map_err(plot_err)?;
        loss_chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("loss")
            .x_labels(epochs)
            .x_label_formatter(&x_fmt)
            .light_line_style(WHITE)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts = |f: &dyn Fn(&EpochMetrics) -> f64| -> Vec<(f64, f64)> {
                s.metrics.iter().map(|m| (m.epoch as f64, f(m))).collect()
            };
            let err = |v: f64| ((1.0 - v) * 100.0).max(0.01);
            let train_err = pts(&|m| err(m.train_top1));
            let test_err = pts(&|m| err(m.test_top1));
            let train_loss = pts(&|m| m.train_loss);
            let test_loss = pts(&|m| m.test_loss);
            let solid = color.stroke_width(2);
            err_chart
                .draw_series(LineSeries::new(test_err.clone(), solid))
                .map_err(plot_err)?
                .label(format!("{} test", s.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], solid));
            err_chart
                .draw_series(DashedLineSeries::new(train_err.clone(), 6, 4, solid))
                .map_err(plot_err)?
                .label(format!("{} train", s.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], solid));
            err_chart
                .draw_series(
                    test_err
                        .iter()
                        .chain(&train_err)
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(plot_err)?;
            loss_chart
                .draw_series(LineSeries::new(test_loss.clone(), solid))
                .map_err(plot_err)?;
            loss_chart
                .draw_series(DashedLineSeries::new(train_loss.clone(), 6, 4, solid))
                .map_err(plot_err)?;
            loss_chart
                .draw_series(
                    test_loss
                        .iter()
                        .chain(&train_loss)
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(plot_err)?;
        }
        err_chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    save_png(path, &buf, (w, h))
}

/// Draws one horizontal bar per `(label, value)` (e.g. top-1 error in %), the value printed
/// at the bar's end, and writes the PNG to `path`.
pub fn bars(rows: &[(String, f64)], title: &str, x_desc: &str, path: &Path) -> Result<()> {
    font_ready()?;
    if rows.is_empty() {
        return Err(Error::Config("nothing to plot".into()));
    }
    let (w, h) = (1000u32, (140 + 34 * rows.len()) as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let max = rows
        .iter()
        .map(|r| r.1)
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-6)
        * 1.2;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let n = rows.len() as i32;
        let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(230)
            // A segmented range 0..m has m + 1 slots: 0..n - 1 gives one per bar.
            .build_cartesian_2d(0f64..max, (0..n - 1).into_segmented())
            .map_err(plot_err)?;
        let fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => labels
                .get((n - 1 - *i) as usize)
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .x_desc(x_desc)
            .y_labels(rows.len())
            .y_label_formatter(&fmt)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        for (k, (_, v)) in rows.iter().enumerate() {
            let i = n - 1 - k as i32;
            let v = if v.is_finite() { *v } else { 0.0 };
            let color = COLORS[k % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (v, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.8).filled(),
                )))
                .map_err(plot_err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {v:.2}"),
                    (v, SegmentValue::CenterOf(i)),
                    ("sans-serif", 14),
                )))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    save_png(path, &buf, (w, h))
}
