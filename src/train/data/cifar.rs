//! CIFAR-10 and CIFAR-100, binary versions.
//!
//! Each record is the label byte(s) then 3,072 pixel bytes: the red plane, the green plane,
//! the blue plane, each 32x32 row-major. CIFAR-10 records have one label byte (0-9); CIFAR-100
//! records have two, coarse (0-19) then fine (0-99), and the fine label is used.

use super::{read_file, DataKind, DataSplit, InMemory};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Pixel bytes of one image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// 10 classes; `data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`.
    Cifar10,
    /// 100 fine classes; `train.bin`, `test.bin`.
    Cifar100,
}

impl Variant {
    /// Label bytes before each image.
    pub fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    /// Number of classes.
    pub fn classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    fn files(self) -> (Vec<&'static str>, &'static str, &'static str) {
        match self {
            Variant::Cifar10 => (
                vec![
                    "data_batch_1.bin",
                    "data_batch_2.bin",
                    "data_batch_3.bin",
                    "data_batch_4.bin",
                    "data_batch_5.bin",
                ],
                "test_batch.bin",
                "cifar-10-batches-bin",
            ),
            Variant::Cifar100 => (vec!["train.bin"], "test.bin", "cifar-100-binary"),
        }
    }
}

/// Appends the records of one binary file to `pixels` and `labels`.
pub fn parse_records(
    bytes: &[u8],
    variant: Variant,
    what: &str,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u16>,
) -> Result<()> {
    let rec = variant.label_bytes() + IMAGE_BYTES;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(Error::Format(format!(
            "{what}: {} bytes is not a whole number of {rec}-byte {variant:?} records",
            bytes.len()
        )));
    }
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = r[variant.label_bytes() - 1] as usize;
        if label >= variant.classes() {
            return Err(Error::Format(format!(
                "{what}: record {i} has label {label}, not below {}",
                variant.classes()
            )));
        }
        labels.push(label as u16);
        pixels.extend_from_slice(&r[variant.label_bytes()..]);
    }
    Ok(())
}

fn load_files(paths: &[PathBuf], variant: Variant, name: &str) -> Result<InMemory> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for p in paths {
        let bytes = read_file(p)?;
        parse_records(
            &bytes,
            variant,
            &p.display().to_string(),
            &mut pixels,
            &mut labels,
        )?;
    }
    InMemory::new(name, (3, 32, 32), variant.classes(), pixels, labels)
}

/// The binary files in `dir`, or in its `cifar-10-batches-bin` / `cifar-100-binary` folder.
pub fn load_dir(dir: &Path, variant: Variant) -> Result<DataSplit> {
    let (train, test, sub) = variant.files();
    let base = if dir.join(test).is_file() {
        dir.to_path_buf()
    } else if dir.join(sub).join(test).is_file() {
        dir.join(sub)
    } else {
        return Err(Error::Format(format!(
            "{}: no {test} here or in {sub}/ (expected the {variant:?} binary version)",
            dir.display()
        )));
    };
    let train: Vec<PathBuf> = train.iter().map(|f| base.join(f)).collect();
    DataSplit::in_memory(
        load_files(&train, variant, &format!("{}/train", base.display()))?,
        load_files(
            &[base.join(test)],
            variant,
            &format!("{}/test", base.display()),
        )?,
        DataKind::Tiny,
    )
}
