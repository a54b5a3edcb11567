//! ImageFolder: one folder per class of JPEG / PNG files (torchvision's layout, ImageNet's).
//!
//! Classes are the sub-folders of the root, sorted by name; each class's images are found
//! recursively (files ending in `.jpg`, `.jpeg` or `.png`, any case; other files are skipped),
//! sorted by path. Images are decoded when a sample is read, to RGB.

use super::{DataKind, DataSplit, Dataset, Image, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An ImageFolder tree.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| {
            let e = e.to_ascii_lowercase();
            e == "jpg" || e == "jpeg" || e == "png"
        })
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(Error::io(format!("listing {}", dir.display())))?;
    let mut v = Vec::new();
    for e in rd {
        v.push(
            e.map_err(Error::io(format!("listing {}", dir.display())))?
                .path(),
        );
    }
    v.sort();
    Ok(v)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Scans `root`. With `classes`, the class list is given (a validation tree uses the
    /// training tree's) and a sub-folder not in it is an error; without, the sub-folders are
    /// the classes. An error if there is no image at all.
    pub fn open(root: &Path, classes: Option<&[String]>) -> Result<Self> {
        let dirs: Vec<PathBuf> = sorted_entries(root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        let names: Vec<String> = dirs
            .iter()
            .map(|d| {
                d.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let classes: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => names.clone(),
        };
        if classes.is_empty() {
            return Err(Error::Format(format!(
                "{}: no class folders (expected <root>/<class>/<image>)",
                root.display()
            )));
        }
        let mut items = Vec::new();
        for (dir, name) in dirs.iter().zip(&names) {
            let label = classes.iter().position(|c| c == name).ok_or_else(|| {
                Error::Format(format!(
                    "{}: class folder `{name}` is not a training class",
                    root.display()
                ))
            })?;
            let mut files = Vec::new();
            walk(dir, &mut files)?;
            items.extend(files.into_iter().map(|f| (f, label)));
        }
        if items.is_empty() {
            return Err(Error::Format(format!(
                "{}: no .jpg, .jpeg or .png files under the class folders",
                root.display()
            )));
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            items,
        })
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The file of sample `i`.
    pub fn path(&self, i: usize) -> Option<&Path> {
        self.items.get(i).map(|(p, _)| p.as_path())
    }
}

/// Decodes a JPEG or PNG file (format from its contents) to a planar RGB image.
pub fn decode_file(path: &Path) -> Result<Image> {
    let bytes = super::read_file(path)?;
    decode_bytes(&bytes, &path.display().to_string())
}

/// Decodes JPEG or PNG bytes (format from the contents) to a planar RGB image; `what` names
/// the source in errors.
pub fn decode_bytes(bytes: &[u8], what: &str) -> Result<Image> {
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Format(format!("{what}: {e}")))?
        .decode()
        .map_err(|e| Error::Format(format!("{what}: cannot decode image: {e}")))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hw = w * h;
    let mut data = vec![0u8; 3 * hw];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        data[i] = px[0];
        data[hw + i] = px[1];
        data[2 * hw + i] = px[2];
    }
    Image::new(3, h, w, data)
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn channels(&self) -> usize {
        3
    }

    fn label(&self, i: usize) -> Result<usize> {
        self.items.get(i).map(|x| x.1).ok_or_else(|| {
            Error::Config(format!("{}: sample {i} out of range", self.root.display()))
        })
    }

    fn image(&self, i: usize) -> Result<Image> {
        let (p, _) = self.items.get(i).ok_or_else(|| {
            Error::Config(format!("{}: sample {i} out of range", self.root.display()))
        })?;
        decode_file(p)
    }

    fn describe(&self) -> String {
        format!(
            "{}: {} images, {} classes",
            self.root.display(),
            self.items.len(),
            self.classes.len()
        )
    }
}

/// `dir/train` and `dir/val` (or `dir/test`), the validation classes named as in training;
/// normalised with ImageNet's mean and standard deviation.
pub fn load_dir(dir: &Path) -> Result<DataSplit> {
    let train = ImageFolder::open(&dir.join("train"), None)?;
    let val_dir = ["val", "test"]
        .iter()
        .map(|v| dir.join(v))
        .find(|p| p.is_dir())
        .ok_or_else(|| Error::Format(format!("{}: no val/ or test/ folder", dir.display())))?;
    let test = ImageFolder::open(&val_dir, Some(train.classes()))?;
    Ok(DataSplit {
        train: Arc::new(train),
        test: Arc::new(test),
        kind: DataKind::Photos,
        image_size: None,
        mean: IMAGENET_MEAN.to_vec(),
        std: IMAGENET_STD.to_vec(),
    })
}
