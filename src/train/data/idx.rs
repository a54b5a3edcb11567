//! IDX files (MNIST, Fashion-MNIST), raw or gzipped, and the digits embedded in the crate.
//!
//! An IDX file is a big-endian header, `0x00 0x00 <type> <dims>`, one `u32` size per
//! dimension, then the values. Images are type `0x08` (unsigned byte) with 3 dimensions
//! (count, rows, columns); labels are type `0x08` with 1 dimension.

use super::{read_file, DataKind, DataSplit, Dataset, InMemory};
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The embedded images: 10,000 MNIST digits (see `data/mnist-10k/README.md`).
pub const DIGITS_IMAGES_GZ: &[u8] = include_bytes!("../../../data/mnist-10k/images.idx3-ubyte.gz");
/// The embedded labels.
pub const DIGITS_LABELS_GZ: &[u8] = include_bytes!("../../../data/mnist-10k/labels.idx1-ubyte.gz");

/// Largest decompressed file accepted (a guard against a corrupt or hostile `.gz`).
const MAX_BYTES: u64 = 1 << 32;

/// Un-gzips `bytes` if they start with the gzip magic; returns them as they are otherwise.
pub fn maybe_gunzip(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::new();
        GzDecoder::new(&bytes[..])
            .take(MAX_BYTES)
            .read_to_end(&mut out)
            .map_err(|e| Error::Format(format!("{what}: bad gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX file of unsigned bytes: `(dimensions, values)`.
pub fn parse_idx(bytes: &[u8], what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |m: String| Error::Format(format!("{what}: {m}"));
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        )));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if ndims == 0 || bytes.len() < header {
        return Err(bad(format!("truncated IDX header ({ndims} dimensions)")));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if bytes.len() - header != numel {
        return Err(bad(format!(
            "dimensions {dims:?} need {numel} bytes of data, the file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// An in-memory set from IDX image and label bytes (each raw or gzipped); the classes are
/// `0..=max label` (at least `min_classes`).
pub fn from_idx_bytes(
    name: &str,
    images: Vec<u8>,
    labels: Vec<u8>,
    min_classes: usize,
) -> Result<InMemory> {
    let (idims, pixels) = parse_idx(&maybe_gunzip(images, name)?, &format!("{name} images"))?;
    let (ldims, labels) = parse_idx(&maybe_gunzip(labels, name)?, &format!("{name} labels"))?;
    if idims.len() != 3 || idims[1] == 0 || idims[2] == 0 {
        return Err(Error::Format(format!(
            "{name} images: expected 3 dimensions (count, rows, columns), got {idims:?}"
        )));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(Error::Format(format!(
            "{name}: {} images but labels of dimensions {ldims:?}",
            idims[0]
        )));
    }
    let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    InMemory::new(
        name,
        (1, idims[1], idims[2]),
        classes.max(min_classes),
        pixels,
        labels.into_iter().map(u16::from).collect(),
    )
}

/// The 10,000 digits embedded in the crate, split by class: of each digit's occurrences
/// (in file order) every fifth one (the 5th, 10th, ...) is a test sample, the rest train.
/// That gives 8,004 training and 1,996 test digits, each class split 4 : 1.
pub fn embedded_digits() -> Result<DataSplit> {
    let all = from_idx_bytes(
        "digits",
        DIGITS_IMAGES_GZ.to_vec(),
        DIGITS_LABELS_GZ.to_vec(),
        10,
    )?;
    let (train, test) = stratified_split(all.labels(), all.num_classes(), 5);
    DataSplit::in_memory(
        all.select("digits-train", &train)?,
        all.select("digits-test", &test)?,
        DataKind::Digits,
    )
}

/// Splits sample indices by label: the `every`-th, `2 * every`-th, ... occurrence of each
/// label goes to the second list, the rest to the first.
pub fn stratified_split(labels: &[u16], classes: usize, every: usize) -> (Vec<usize>, Vec<usize>) {
    let mut seen = vec![0usize; classes.max(1)];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, &l) in labels.iter().enumerate() {
        let k = (l as usize).min(seen.len() - 1);
        seen[k] += 1;
        if seen[k].is_multiple_of(every) {
            b.push(i);
        } else {
            a.push(i);
        }
    }
    (a, b)
}

/// Finds `<stem>` or `<stem>.gz` in `dir` for each spelling of `stem`.
fn find(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    for s in stems {
        for name in [s.to_string(), format!("{s}.gz")] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(Error::Format(format!(
        "{}: no {} (or .gz) found",
        dir.display(),
        stems[0]
    )))
}

/// MNIST / Fashion-MNIST IDX files in `dir` (`train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, also spelt
/// with a dot before `idx`, each raw or `.gz`).
pub fn load_dir(dir: &Path) -> Result<DataSplit> {
    let set = |prefix: &str| -> Result<InMemory> {
        let images = find(
            dir,
            &[
                &format!("{prefix}-images-idx3-ubyte"),
                &format!("{prefix}-images.idx3-ubyte"),
            ],
        )?;
        let labels = find(
            dir,
            &[
                &format!("{prefix}-labels-idx1-ubyte"),
                &format!("{prefix}-labels.idx1-ubyte"),
            ],
        )?;
        from_idx_bytes(
            &images.display().to_string(),
            read_file(&images)?,
            read_file(&labels)?,
            10,
        )
    };
    DataSplit::in_memory(set("train")?, set("t10k")?, DataKind::Digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_split_is_stratified() {
        let d = embedded_digits().unwrap();
        assert_eq!(d.train.len(), 8004);
        assert_eq!(d.test.len(), 1996);
        assert_eq!(d.num_classes(), 10);
        assert_eq!(d.image_size, Some((28, 28)));
        let mut counts = [0usize; 10];
        for i in 0..d.test.len() {
            counts[d.test.label(i).unwrap()] += 1;
        }
        // floor(n_k / 5) of each class's count (README: 1001, 1127, 991, ...).
        assert_eq!(counts, [200, 225, 198, 206, 196, 172, 202, 214, 188, 195]);
        // MNIST's pixel mean is about 0.13.
        assert!((0.1..0.16).contains(&d.mean[0]), "{:?}", d.mean);
    }
}
