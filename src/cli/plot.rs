//! `senet plot`: the training curves of one or several runs on one chart (SE against plain,
//! as in the paper's figure).

use crate::train::metrics::read_csv;
use crate::train::plot::{curves, Series};
use crate::train::TrainConfig;
use crate::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

/// Options of `senet plot`.
#[derive(clap::Args)]
pub struct Args {
    /// Run folders (each with metrics.csv).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output PNG.
    #[arg(long, short, default_value = "curves.png")]
    out: PathBuf,
    /// Legend labels, comma-separated [default: each run's model].
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Chart title.
    #[arg(long)]
    title: Option<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(l) = &args.labels {
        if l.len() != args.runs.len() {
            return Err(Error::Config(format!(
                "{} labels for {} runs",
                l.len(),
                args.runs.len()
            )));
        }
    }
    let mut series = Vec::new();
    let mut data = Vec::new();
    for (i, dir) in args.runs.iter().enumerate() {
        let metrics = read_csv(&dir.join("metrics.csv"))?;
        let config = TrainConfig::load(dir).ok();
        let label = match (&args.labels, &config) {
            (Some(l), _) => l[i].clone(),
            (None, Some(c)) => c.model.name.clone(),
            (None, None) => dir.display().to_string(),
        };
        if let Some(c) = &config {
            if !data.contains(&c.data.to_string()) {
                data.push(c.data.to_string());
            }
        }
        series.push(Series { label, metrics });
    }
    let title = args.title.clone().unwrap_or_else(|| {
        let names: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
        format!("{} on {}", names.join(" vs "), data.join(", "))
    });
    curves(&series, &title, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
