//! Data sets: labelled images in memory (IDX, CIFAR) or on disk (ImageFolder), the embedded
//! digits, and [`DataSpec`], the string a user names a data set with.
//!
//! Images are 8-bit and planar (`C x H x W`). Reading never panics on a bad file: a missing,
//! truncated or malformed file is an [`Error::Format`] or [`Error::Io`] naming it.

pub mod cifar;
pub mod folder;
pub mod idx;

use crate::error::{Error, Result};
use crate::train::{seed_for, Stream};
use rand::seq::SliceRandom;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// An 8-bit image, planar: `data[(c * height + y) * width + x]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Channels (1 for grey, 3 for RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// The pixels, `channels * height * width` of them.
    pub data: Vec<u8>,
}

impl Image {
    /// Wraps planar pixels, checking sizes are non-zero and `data` has exactly
    /// `channels * height * width` bytes.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<u8>) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 {
            return Err(Error::Shape(format!(
                "image {channels}x{height}x{width} has a zero size"
            )));
        }
        if data.len() != channels * height * width {
            return Err(Error::Length {
                what: "image pixels",
                got: data.len(),
                expected: channels * height * width,
            });
        }
        Ok(Image {
            channels,
            height,
            width,
            data,
        })
    }

    /// The pixel at channel `c`, row `y`, column `x`.
    pub fn at(&self, c: usize, y: usize, x: usize) -> u8 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// A labelled image data set. Indices run over `0..len()`.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of classes; labels are in `0..num_classes()`.
    fn num_classes(&self) -> usize;

    /// Channels of every image.
    fn channels(&self) -> usize;

    /// The label of sample `i` (cheap: no image is read).
    fn label(&self, i: usize) -> Result<usize>;

    /// The image of sample `i` (ImageFolder decodes the file here).
    fn image(&self, i: usize) -> Result<Image>;

    /// One line saying what this is (name, size, classes).
    fn describe(&self) -> String;
}

/// Images of one size held in memory (IDX and CIFAR files load into this).
#[derive(Clone, Debug)]
pub struct InMemory {
    name: String,
    channels: usize,
    height: usize,
    width: usize,
    num_classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u16>,
}

impl InMemory {
    /// `labels.len()` images of `channels x height x width`, planar, back to back in `pixels`;
    /// an error if the lengths disagree or a label is not below `num_classes`.
    pub fn new(
        name: impl Into<String>,
        (channels, height, width): (usize, usize, usize),
        num_classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u16>,
    ) -> Result<Self> {
        let name = name.into();
        let per = channels * height * width;
        if per == 0 || num_classes == 0 {
            return Err(Error::Format(format!(
                "{name}: images of {channels}x{height}x{width} in {num_classes} classes"
            )));
        }
        if pixels.len() != per * labels.len() {
            return Err(Error::Format(format!(
                "{name}: {} pixel bytes for {} images of {per}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(Error::Format(format!(
                "{name}: label {l} of sample {i} is not below {num_classes} classes"
            )));
        }
        Ok(InMemory {
            name,
            channels,
            height,
            width,
            num_classes,
            pixels,
            labels,
        })
    }

    /// Image height and width.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// The labels.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }

    /// Per-channel mean and standard deviation of the pixels, scaled to `[0, 1]`.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let hw = self.height * self.width;
        let per = self.channels * hw;
        let mut sum = vec![0f64; self.channels];
        let mut sq = vec![0f64; self.channels];
        for img in self.pixels.chunks_exact(per) {
            for (c, plane) in img.chunks_exact(hw).enumerate() {
                let (s, q) = plane.iter().fold((0u64, 0u64), |(s, q), &p| {
                    (s + p as u64, q + (p as u64) * (p as u64))
                });
                sum[c] += s as f64;
                sq[c] += q as f64;
            }
        }
        let n = (self.labels.len() * hw).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n / 255.0).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| ((q / n / 65025.0 - m * m).max(0.0).sqrt() as f32).max(1e-3))
            .collect();
        (mean.into_iter().map(|m| m as f32).collect(), std)
    }

    /// The samples at `indices` as a new in-memory set (an error for an index out of range).
    pub fn select(&self, name: impl Into<String>, indices: &[usize]) -> Result<InMemory> {
        let per = self.channels * self.height * self.width;
        let mut pixels = Vec::with_capacity(per * indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Config(format!(
                    "{}: sample {i} out of range ({} samples)",
                    self.name,
                    self.len()
                )));
            }
            pixels.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
            labels.push(self.labels[i]);
        }
        InMemory::new(
            name,
            (self.channels, self.height, self.width),
            self.num_classes,
            pixels,
            labels,
        )
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn label(&self, i: usize) -> Result<usize> {
        self.labels
            .get(i)
            .map(|&l| l as usize)
            .ok_or_else(|| out_of_range(&self.name, i, self.len()))
    }

    fn image(&self, i: usize) -> Result<Image> {
        if i >= self.len() {
            return Err(out_of_range(&self.name, i, self.len()));
        }
        let per = self.channels * self.height * self.width;
        Image::new(
            self.channels,
            self.height,
            self.width,
            self.pixels[i * per..(i + 1) * per].to_vec(),
        )
    }

    fn describe(&self) -> String {
        format!(
            "{}: {} images of {}x{}x{}, {} classes",
            self.name,
            self.len(),
            self.channels,
            self.height,
            self.width,
            self.num_classes
        )
    }
}

fn out_of_range(name: &str, i: usize, len: usize) -> Error {
    Error::Config(format!("{name}: sample {i} out of range ({len} samples)"))
}

/// A view of some samples of another data set.
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// The samples `indices` of `inner` (an error for an index out of range).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&i) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(out_of_range(&inner.describe(), i, inner.len()));
        }
        Ok(Subset { inner, indices })
    }

    /// `n` samples of `inner` chosen by a shuffle seeded with `seed` (all of them, in the
    /// shuffled order, if `n >= len`).
    pub fn random(inner: Arc<dyn Dataset>, n: usize, seed: u64) -> Result<Self> {
        let mut idx: Vec<usize> = (0..inner.len()).collect();
        idx.shuffle(&mut crate::rng::seeded(seed_for(seed, Stream::Subset, 0)));
        idx.truncate(n);
        Subset::new(inner, idx)
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    fn channels(&self) -> usize {
        self.inner.channels()
    }

    fn label(&self, i: usize) -> Result<usize> {
        let j = *self
            .indices
            .get(i)
            .ok_or_else(|| out_of_range("subset", i, self.len()))?;
        self.inner.label(j)
    }

    fn image(&self, i: usize) -> Result<Image> {
        let j = *self
            .indices
            .get(i)
            .ok_or_else(|| out_of_range("subset", i, self.len()))?;
        self.inner.image(j)
    }

    fn describe(&self) -> String {
        format!("{} samples of [{}]", self.len(), self.inner.describe())
    }
}

/// What kind of images a data set holds; picks the augmentation defaults
/// ([`crate::train::Augment::defaults`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Small grey digits or clothes (MNIST, Fashion-MNIST): no flips.
    Digits,
    /// Small colour photos (CIFAR): horizontal flips.
    Tiny,
    /// Photos of any size (ImageFolder, the ImageNet layout): the paper's recipe as is.
    Photos,
}

/// A train / test pair with what the augmentation needs to know about it.
#[derive(Clone)]
pub struct DataSplit {
    /// Training samples.
    pub train: Arc<dyn Dataset>,
    /// Test (validation) samples.
    pub test: Arc<dyn Dataset>,
    /// The kind of images.
    pub kind: DataKind,
    /// The images' size, when they all share one (IDX, CIFAR); `None` for ImageFolder.
    pub image_size: Option<(usize, usize)>,
    /// Per-channel mean of the training pixels in `[0, 1]` (ImageNet's for ImageFolder).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the training pixels (ImageNet's for ImageFolder).
    pub std: Vec<f32>,
}

impl DataSplit {
    /// A split of two in-memory sets, with the normalisation measured on `train`.
    pub fn in_memory(train: InMemory, test: InMemory, kind: DataKind) -> Result<Self> {
        if train.image_size() != test.image_size() || train.channels() != test.channels() {
            return Err(Error::Format(format!(
                "train and test images differ: {} vs {}",
                train.describe(),
                test.describe()
            )));
        }
        let (mean, std) = train.channel_stats();
        Ok(DataSplit {
            image_size: Some(train.image_size()),
            train: Arc::new(train),
            test: Arc::new(test),
            kind,
            mean,
            std,
        })
    }

    /// Number of classes (the larger of the two sets').
    pub fn num_classes(&self) -> usize {
        self.train.num_classes().max(self.test.num_classes())
    }
}

/// ImageNet's per-channel mean (RGB, in `[0, 1]`), the normalisation of ImageFolder sets.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A data set by name, as the command line takes it:
/// - `digits` (also `mnist-10k`): the 10,000 MNIST digits embedded in the crate, split
///   8,004 / 1,996 ([`idx::embedded_digits`]);
/// - `idx:DIR`: MNIST or Fashion-MNIST IDX files (`train-images-idx3-ubyte`,
///   `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw
///   or `.gz`);
/// - `cifar10:DIR`, `cifar100:DIR`: the binary versions (`data_batch_1.bin` ... /
///   `train.bin`, `test.bin`);
/// - `folder:DIR`: `DIR/train/<class>/*.{jpg,jpeg,png}` and `DIR/val/<class>/...` (or
///   `DIR/test`), the ImageNet layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataSpec {
    /// The embedded digits.
    Digits,
    /// IDX files in a folder.
    Idx(PathBuf),
    /// CIFAR-10 binaries in a folder.
    Cifar10(PathBuf),
    /// CIFAR-100 binaries in a folder.
    Cifar100(PathBuf),
    /// An ImageFolder tree.
    Folder(PathBuf),
}

impl DataSpec {
    /// Reads the data set.
    pub fn load(&self) -> Result<DataSplit> {
        match self {
            DataSpec::Digits => idx::embedded_digits(),
            DataSpec::Idx(dir) => idx::load_dir(dir),
            DataSpec::Cifar10(dir) => cifar::load_dir(dir, cifar::Variant::Cifar10),
            DataSpec::Cifar100(dir) => cifar::load_dir(dir, cifar::Variant::Cifar100),
            DataSpec::Folder(dir) => folder::load_dir(dir),
        }
    }
}

impl FromStr for DataSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "digits" || s == "mnist-10k" {
            return Ok(DataSpec::Digits);
        }
        let bad = || {
            Error::Config(format!(
                "unknown data set `{s}`: expected digits, idx:DIR, cifar10:DIR, cifar100:DIR \
                 or folder:DIR"
            ))
        };
        let (kind, dir) = s.split_once(':').ok_or_else(bad)?;
        if dir.is_empty() {
            return Err(bad());
        }
        let dir = PathBuf::from(dir);
        Ok(match kind {
            "idx" | "mnist" | "fashion-mnist" => DataSpec::Idx(dir),
            "cifar10" => DataSpec::Cifar10(dir),
            "cifar100" => DataSpec::Cifar100(dir),
            "folder" | "imagefolder" => DataSpec::Folder(dir),
            _ => return Err(bad()),
        })
    }
}

impl TryFrom<String> for DataSpec {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DataSpec> for String {
    fn from(d: DataSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Digits => f.write_str("digits"),
            DataSpec::Idx(d) => write!(f, "idx:{}", d.display()),
            DataSpec::Cifar10(d) => write!(f, "cifar10:{}", d.display()),
            DataSpec::Cifar100(d) => write!(f, "cifar100:{}", d.display()),
            DataSpec::Folder(d) => write!(f, "folder:{}", d.display()),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip() {
        for s in [
            "digits",
            "idx:/d/mnist",
            "cifar10:c",
            "cifar100:c",
            "folder:/x",
        ] {
            let d: DataSpec = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("mnist-10k".parse::<DataSpec>().unwrap(), DataSpec::Digits);
        assert!("svhn:/x".parse::<DataSpec>().is_err());
        assert!("idx:".parse::<DataSpec>().is_err());
        assert!("cifar10".parse::<DataSpec>().is_err());
    }

    #[test]
    fn in_memory_checks_and_stats() {
        let px = vec![0u8, 255, 0, 255, 10, 10, 10, 10];
        assert!(InMemory::new("t", (1, 2, 2), 2, px.clone(), vec![0]).is_err());
        assert!(InMemory::new("t", (1, 2, 2), 2, px.clone(), vec![0, 2]).is_err());
        let m = InMemory::new("t", (2, 1, 2), 2, px[2..6].to_vec(), vec![1]).unwrap();
        let (mean, std) = m.channel_stats();
        assert!((mean[0] - 0.5).abs() < 1e-6 && (std[0] - 0.5).abs() < 1e-6);
        assert!((mean[1] - 10.0 / 255.0).abs() < 1e-6 && std[1] <= 1e-3);
        assert_eq!(m.image(0).unwrap().at(1, 0, 1), 10);
        assert!(m.image(1).is_err() && m.label(1).is_err());
        let s = m.select("s", &[0, 0]).unwrap();
        assert_eq!(s.len(), 2);
        assert!(m.select("s", &[3]).is_err());
    }
}
