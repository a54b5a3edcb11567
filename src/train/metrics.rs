//! Per-epoch metrics and their CSV file.

use crate::error::{Error, Result};
use std::path::Path;

/// What one epoch measured. Accuracies are fractions in `[0, 1]`; training numbers are over
/// the epoch's augmented batches in training mode (as the paper's training curves), test
/// numbers over the evaluation transform in inference mode.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// The epoch, counted from 1.
    pub epoch: usize,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss (the objective, label smoothing included).
    pub train_loss: f64,
    /// Training top-1 accuracy.
    pub train_top1: f64,
    /// Training top-5 accuracy.
    pub train_top5: f64,
    /// Mean test loss (same objective).
    pub test_loss: f64,
    /// Test top-1 accuracy.
    pub test_top1: f64,
    /// Test top-5 accuracy.
    pub test_top5: f64,
    /// Training images per second over the epoch's steps.
    pub images_per_s: f64,
    /// Seconds of the epoch's training steps.
    pub train_seconds: f64,
    /// Seconds of the epoch's evaluation.
    pub eval_seconds: f64,
    /// Seconds since the run started (training and evaluation, across resumes).
    pub elapsed_seconds: f64,
}

/// The CSV header, the field names in order.
pub const CSV_HEADER: &str = "epoch,lr,train_loss,train_top1,train_top5,test_loss,test_top1,\
test_top5,images_per_s,train_seconds,eval_seconds,elapsed_seconds";

impl EpochMetrics {
    fn csv_row(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{:.1},{:.3},{:.3},{:.3}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.train_top1,
            self.train_top5,
            self.test_loss,
            self.test_top1,
            self.test_top5,
            self.images_per_s,
            self.train_seconds,
            self.eval_seconds,
            self.elapsed_seconds
        )
    }

    fn from_csv_row(line: &str, what: &str) -> Result<Self> {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 12 {
            return Err(Error::Format(format!(
                "{what}: {} fields, expected 12",
                f.len()
            )));
        }
        let num = |i: usize| -> Result<f64> {
            f[i].parse()
                .map_err(|_| Error::Format(format!("{what}: field {} is `{}`", i + 1, f[i])))
        };
        Ok(EpochMetrics {
            epoch: f[0]
                .parse()
                .map_err(|_| Error::Format(format!("{what}: epoch `{}`", f[0])))?,
            lr: num(1)?,
            train_loss: num(2)?,
            train_top1: num(3)?,
            train_top5: num(4)?,
            test_loss: num(5)?,
            test_top1: num(6)?,
            test_top5: num(7)?,
            images_per_s: num(8)?,
            train_seconds: num(9)?,
            eval_seconds: num(10)?,
            elapsed_seconds: num(11)?,
        })
    }
}

/// Writes `rows` as CSV with [`CSV_HEADER`].
pub fn write_csv(path: &Path, rows: &[EpochMetrics]) -> Result<()> {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        s.push_str(&r.csv_row());
        s.push('\n');
    }
    std::fs::write(path, s).map_err(Error::io(format!("writing {}", path.display())))
}

/// Reads a metrics CSV written by [`write_csv`].
pub fn read_csv(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text =
        std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(CSV_HEADER) {
        return Err(Error::Format(format!(
            "{}: not a senet metrics file (header differs)",
            path.display()
        )));
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| EpochMetrics::from_csv_row(l, &format!("{} line {}", path.display(), i + 2)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let m = EpochMetrics {
            epoch: 3,
            lr: 0.0375,
            train_loss: 0.61234567891,
            train_top1: 0.9,
            train_top5: 1.0,
            test_loss: 0.5,
            test_top1: 0.987,
            test_top5: 0.999,
            images_per_s: 150.5,
            train_seconds: 40.25,
            eval_seconds: 3.5,
            elapsed_seconds: 130.0,
        };
        let dir = std::env::temp_dir().join(format!("senet-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.csv");
        write_csv(&p, &[m.clone(), m.clone()]).unwrap();
        assert_eq!(read_csv(&p).unwrap(), vec![m.clone(), m]);
        std::fs::write(&p, "a,b\n1,2\n").unwrap();
        assert!(read_csv(&p).is_err());
        std::fs::write(&p, format!("{CSV_HEADER}\n1,x,3\n")).unwrap();
        assert!(read_csv(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
