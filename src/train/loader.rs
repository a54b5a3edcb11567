//! Batches: read, augment and stack samples on a prefetch thread (the samples of a batch in
//! parallel on rayon), so data preparation overlaps the network's compute.

use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::{Layout, Shape, Tensor};
use crate::train::augment::Augment;
use crate::train::data::Dataset;
use crate::train::{seed_for, Stream};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A batch: images `[n, c, crop, crop]` (NCHW) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The batch's index in its epoch.
    pub index: usize,
    /// The images.
    pub x: Tensor<f32>,
    /// The labels.
    pub labels: Vec<usize>,
}

/// How samples are transformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Training augmentation; sample `p` of epoch `epoch` draws from
    /// `seed_for(seed, Augment, epoch << 32 | p)`.
    Train {
        /// The run's seed.
        seed: u64,
        /// The epoch (0-based).
        epoch: usize,
    },
    /// The evaluation transform (deterministic).
    Eval,
}

/// The sample order of training epoch `epoch`: a permutation of `0..len` seeded by the run's
/// seed and the epoch.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng::seeded(seed_for(
        seed,
        Stream::Shuffle,
        epoch as u64,
    )));
    order
}

/// Builds batch `b` of `order` (samples `b * batch_size ..`) on the calling thread.
pub fn make_batch(
    ds: &dyn Dataset,
    order: &[usize],
    batch_size: usize,
    b: usize,
    aug: &Augment,
    sampling: Sampling,
) -> Result<Batch> {
    let start = b * batch_size;
    let end = (start + batch_size).min(order.len());
    if start >= end {
        return Err(Error::Config(format!(
            "batch {b} of {batch_size} is past the {} samples",
            order.len()
        )));
    }
    let c = ds.channels();
    let per = aug.sample_len(c);
    let n = end - start;
    let mut x = vec![0f32; n * per];
    let labels = x
        .par_chunks_mut(per)
        .enumerate()
        .map(|(k, out)| {
            let pos = start + k;
            let i = order[pos];
            let img = ds.image(i)?;
            if img.channels != c {
                return Err(Error::Format(format!(
                    "sample {i} has {} channels, the data set {c}",
                    img.channels
                )));
            }
            match sampling {
                Sampling::Train { seed, epoch } => {
                    let s = seed_for(seed, Stream::Augment, ((epoch as u64) << 32) | pos as u64);
                    aug.train_sample(&img, &mut rng::seeded(s), out)?;
                }
                Sampling::Eval => aug.eval_sample(&img, out)?,
            }
            ds.label(i)
        })
        .collect::<Result<Vec<usize>>>()?;
    let x = Tensor::from_vec(Shape::try_new(n, c, aug.crop, aug.crop)?, Layout::Nchw, x)?;
    Ok(Batch {
        index: b,
        x,
        labels,
    })
}

/// Number of batches of `batch_size` in `len` samples (`drop_last`: whole batches only).
pub fn num_batches(len: usize, batch_size: usize, drop_last: bool) -> usize {
    if batch_size == 0 {
        0
    } else if drop_last {
        len / batch_size
    } else {
        len.div_ceil(batch_size)
    }
}

/// Batches `range` of an epoch, built ahead on a background thread (at most `depth` ready and
/// waiting). Iterating yields each batch or the error that stopped the thread; dropping the
/// loader stops the thread.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts the prefetch thread for batches `range` of `order`.
    pub fn spawn(
        ds: Arc<dyn Dataset>,
        order: Vec<usize>,
        batch_size: usize,
        range: Range<usize>,
        aug: Augment,
        sampling: Sampling,
        depth: usize,
    ) -> Loader {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("senet-loader".into())
            .spawn(move || {
                for b in range {
                    let batch = make_batch(ds.as_ref(), &order, batch_size, b, &aug, sampling);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
        match handle {
            Ok(h) => Loader {
                rx: Some(rx),
                handle: Some(h),
            },
            Err(e) => {
                // No thread: hand the error to the first `next`.
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(Error::io("starting the data loader thread")(e)));
                Loader {
                    rx: Some(rx),
                    handle: None,
                }
            }
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, so it returns.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
