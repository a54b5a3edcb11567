//! Augmentation and evaluation transforms (Hu et al., section 4 / appendix): random scale,
//! random crop, flips, per-channel normalisation; evaluation resizes the shorter side and
//! centre-crops.
//!
//! Resizing is bilinear with half-pixel centres (OpenCV's and PyTorch's `align_corners=False`,
//! no antialiasing), and only the crop window of the resized image is ever computed. Every
//! output is `channels x crop x crop` floats, `(pixel / 255 - mean[c]) / std[c]`.
//!
//! ## Defaults, scaled from the paper's to the input size
//!
//! The paper trains at 224 from a shorter side drawn from `[256, 480]` and evaluates a 224
//! centre crop of a 256 resize. [`Augment::defaults`] keeps those ratios for photos; for small
//! images (digits, CIFAR) the crop is the native size `s` and:
//! - evaluation resizes to `round(s * 256 / 224)` (32 for 28x28 digits, 37 for CIFAR's 32);
//! - training draws the shorter side from `[round(s * 256 / 224), round(s * 288 / 224)]`
//!   (`[32, 36]` for digits, `[37, 41]` for CIFAR): the paper's lower end, with the upper end cut
//!   from 480/224 = 2.1x to 288/224 = 1.3x, because a digit fills 20 of its 28 pixels and a 2x
//!   zoom would crop most of it away;
//! - horizontal flips are on for CIFAR and photos, off for digits (a flipped digit is another
//!   glyph); vertical flips are off everywhere. Every value is an option.

use crate::error::{Error, Result};
use crate::rng::SeedRng;
use crate::train::data::{DataKind, Image};
use rand::Rng;

/// The transform configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Training: the smallest shorter side drawn (the paper: 256).
    pub scale_min: usize,
    /// Training: the largest shorter side drawn (the paper: 480).
    pub scale_max: usize,
    /// The square crop fed to the network (the paper: 224).
    pub crop: usize,
    /// Training: flip left-right with probability 1/2.
    pub hflip: bool,
    /// Training: flip upside-down with probability 1/2.
    pub vflip: bool,
    /// Evaluation: the shorter side is resized to this before the centre crop (the paper: 256).
    pub eval_resize: usize,
    /// Per-channel mean subtracted, in `[0, 1]` pixel units.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
}

/// Where one sample's crop comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropParams {
    /// The resized image's `(height, width)`.
    pub scaled: (usize, usize),
    /// The crop's top-left corner in the resized image, `(row, column)`.
    pub offset: (usize, usize),
    /// Mirror left-right.
    pub hflip: bool,
    /// Mirror upside-down.
    pub vflip: bool,
}

/// `round(v * num / den)` in integers.
fn scale_round(v: usize, num: usize, den: usize) -> usize {
    (v * num + den / 2) / den
}

impl Augment {
    /// The paper's ImageNet recipe: shorter side in `[256, 480]`, 224 crop, horizontal flips,
    /// evaluation at 256 -> 224.
    pub fn paper(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Augment {
            scale_min: 256,
            scale_max: 480,
            crop: 224,
            hflip: true,
            vflip: false,
            eval_resize: 256,
            mean,
            std,
        }
    }

    /// Defaults for a data set (see the module docs): `crop` defaults to the images' native
    /// size (`image_size`) for small images and 224 for photos.
    pub fn defaults(
        kind: DataKind,
        image_size: Option<(usize, usize)>,
        crop: Option<usize>,
        mean: Vec<f32>,
        std: Vec<f32>,
    ) -> Self {
        let native = image_size.map(|(h, w)| h.min(w));
        match kind {
            DataKind::Photos => {
                let c = crop.unwrap_or(224);
                Augment {
                    scale_min: scale_round(c, 256, 224),
                    scale_max: scale_round(c, 480, 224),
                    crop: c,
                    eval_resize: scale_round(c, 256, 224),
                    ..Augment::paper(mean, std)
                }
            }
            DataKind::Digits | DataKind::Tiny => {
                let c = crop.or(native).unwrap_or(32);
                Augment {
                    scale_min: scale_round(c, 256, 224),
                    scale_max: scale_round(c, 288, 224),
                    crop: c,
                    hflip: kind == DataKind::Tiny,
                    vflip: false,
                    eval_resize: scale_round(c, 256, 224),
                    mean,
                    std,
                }
            }
        }
    }

    /// Checks the sizes (non-zero; the crop fits every resize) and that `mean` and `std` have
    /// one positive-std entry per channel.
    pub fn validate(&self, channels: usize) -> Result<()> {
        self.validate_sizes()?;
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(Error::Config(format!(
                "normalisation has {} means and {} stds for {channels} channels",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.std.iter().any(|&s| s.is_nan() || s <= 0.0) {
            return Err(Error::Config(format!(
                "normalisation stds must be positive: {:?}",
                self.std
            )));
        }
        Ok(())
    }

    /// Checks the sizes: a positive crop that fits every training and evaluation resize.
    pub fn validate_sizes(&self) -> Result<()> {
        if self.crop == 0 {
            return Err(Error::Config("crop size must be positive".into()));
        }
        if self.scale_min < self.crop || self.scale_max < self.scale_min {
            return Err(Error::Config(format!(
                "training scale range [{}, {}] must satisfy crop {} <= min <= max",
                self.scale_min, self.scale_max, self.crop
            )));
        }
        if self.eval_resize < self.crop {
            return Err(Error::Config(format!(
                "evaluation resize {} is smaller than the crop {}",
                self.eval_resize, self.crop
            )));
        }
        Ok(())
    }

    /// Floats per output sample for `channels`.
    pub fn sample_len(&self, channels: usize) -> usize {
        channels * self.crop * self.crop
    }

    /// The `(height, width)` of an `h x w` image whose shorter side is resized to `side`
    /// (aspect ratio kept, the longer side rounded).
    pub fn resized((h, w): (usize, usize), side: usize) -> (usize, usize) {
        if h <= w {
            (side, scale_round(w, side, h).max(side))
        } else {
            (scale_round(h, side, w).max(side), side)
        }
    }

    /// Draws a training crop for an `h x w` image: a shorter side uniform in
    /// `[scale_min, scale_max]`, a crop position uniform over the resized image, and each
    /// enabled flip with probability 1/2. An error if the sizes are invalid
    /// ([`Augment::validate_sizes`]) or the image is empty.
    pub fn train_params(&self, size: (usize, usize), rng: &mut SeedRng) -> Result<CropParams> {
        self.check_image(size)?;
        let side = rng.gen_range(self.scale_min..=self.scale_max);
        let scaled = Augment::resized(size, side);
        let oy = rng.gen_range(0..=scaled.0 - self.crop);
        let ox = rng.gen_range(0..=scaled.1 - self.crop);
        let hflip = self.hflip && rng.gen_bool(0.5);
        let vflip = self.vflip && rng.gen_bool(0.5);
        Ok(CropParams {
            scaled,
            offset: (oy, ox),
            hflip,
            vflip,
        })
    }

    /// The evaluation crop: shorter side resized to `eval_resize`, centred crop, no flips.
    /// Errors as [`Augment::train_params`].
    pub fn eval_params(&self, size: (usize, usize)) -> Result<CropParams> {
        self.check_image(size)?;
        let scaled = Augment::resized(size, self.eval_resize);
        Ok(CropParams {
            scaled,
            offset: ((scaled.0 - self.crop) / 2, (scaled.1 - self.crop) / 2),
            hflip: false,
            vflip: false,
        })
    }

    fn check_image(&self, (h, w): (usize, usize)) -> Result<()> {
        self.validate_sizes()?;
        if h == 0 || w == 0 {
            return Err(Error::Shape(format!("image {h}x{w} is empty")));
        }
        Ok(())
    }

    /// Renders the crop `p` of `img` into `out` (`channels x crop x crop`), normalised.
    pub fn render(&self, img: &Image, p: &CropParams, out: &mut [f32]) -> Result<()> {
        self.validate(img.channels)?;
        // The fields are public: check the image is consistent before indexing it.
        if img.height == 0
            || img.width == 0
            || img.data.len() != img.channels * img.height * img.width
        {
            return Err(Error::Shape(format!(
                "image {}x{}x{} holds {} bytes",
                img.channels,
                img.height,
                img.width,
                img.data.len()
            )));
        }
        let c = self.crop;
        if out.len() != self.sample_len(img.channels) {
            return Err(Error::Length {
                what: "augmented sample",
                got: out.len(),
                expected: self.sample_len(img.channels),
            });
        }
        if p.offset.0 + c > p.scaled.0 || p.offset.1 + c > p.scaled.1 {
            return Err(Error::Config(format!(
                "crop {c} at {:?} does not fit a resize to {:?}",
                p.offset, p.scaled
            )));
        }
        // Source coordinate of each output row / column: (index, next index, weight of next).
        let taps = |n_out: usize, offset: usize, scaled: usize, src: usize, flip: bool| {
            (0..n_out)
                .map(|i| {
                    let i = if flip { n_out - 1 - i } else { i };
                    let pos = ((offset + i) as f64 + 0.5) * src as f64 / scaled as f64 - 0.5;
                    let pos = pos.clamp(0.0, (src - 1) as f64);
                    let i0 = pos.floor() as usize;
                    let i1 = (i0 + 1).min(src - 1);
                    (i0, i1, (pos - i0 as f64) as f32)
                })
                .collect::<Vec<_>>()
        };
        let rows = taps(c, p.offset.0, p.scaled.0, img.height, p.vflip);
        let cols = taps(c, p.offset.1, p.scaled.1, img.width, p.hflip);
        let plane = img.height * img.width;
        for (ch, out_plane) in out.chunks_exact_mut(c * c).enumerate() {
            let src = &img.data[ch * plane..(ch + 1) * plane];
            let scale = 1.0 / (255.0 * self.std[ch]);
            let shift = self.mean[ch] / self.std[ch];
            for (&(y0, y1, fy), out_row) in rows.iter().zip(out_plane.chunks_exact_mut(c)) {
                let (r0, r1) = (
                    &src[y0 * img.width..(y0 + 1) * img.width],
                    &src[y1 * img.width..(y1 + 1) * img.width],
                );
                for (&(x0, x1, fx), o) in cols.iter().zip(out_row.iter_mut()) {
                    let top = r0[x0] as f32 * (1.0 - fx) + r0[x1] as f32 * fx;
                    let bottom = r1[x0] as f32 * (1.0 - fx) + r1[x1] as f32 * fx;
                    let v = top * (1.0 - fy) + bottom * fy;
                    *o = v * scale - shift;
                }
            }
        }
        Ok(())
    }

    /// A training sample: [`Augment::train_params`] then [`Augment::render`].
    pub fn train_sample(&self, img: &Image, rng: &mut SeedRng, out: &mut [f32]) -> Result<()> {
        let p = self.train_params((img.height, img.width), rng)?;
        self.render(img, &p, out)
    }

    /// An evaluation sample: [`Augment::eval_params`] then [`Augment::render`].
    pub fn eval_sample(&self, img: &Image, out: &mut [f32]) -> Result<()> {
        let p = self.eval_params((img.height, img.width))?;
        self.render(img, &p, out)
    }
}
