//! Training SE networks: data sets, augmentation, loss, optimiser, learning-rate schedule, the
//! training loop with checkpoints and resume, metrics files and plots, and the paper's
//! ablations.
//!
//! The recipe is Hu et al.'s (section 4 and appendix), every number an option:
//! - [`optim::Sgd`]: SGD with momentum 0.9 and weight decay 1e-4 (PyTorch's update rule);
//! - [`schedule::LrSchedule`]: the learning rate divided by 10 every `k` epochs (the paper: 0.6
//!   for batch 1024, every 30 of 100 epochs), with optional linear warm-up and cosine decay;
//! - [`loss::cross_entropy`]: softmax cross-entropy with label smoothing, top-1 / top-5;
//! - [`augment::Augment`]: random scale (shorter side drawn from a range, the paper's
//!   `[256, 480]`), random crop (224), horizontal and optional vertical flips, per-channel mean
//!   subtraction and normalisation; evaluation resizes the shorter side (256) and centre-crops;
//! - [`data`]: IDX (MNIST, Fashion-MNIST), CIFAR-10/100 binaries and ImageFolder trees, plus
//!   10,000 real MNIST digits embedded in the crate ([`data::DataSpec::Digits`]);
//! - [`loader::Loader`]: batches assembled (decoded, augmented) on a prefetch thread, in
//!   parallel with compute;
//! - [`trainer::Trainer`]: the loop, evaluation, run folders (config, metrics CSV, curves,
//!   checkpoints) and resume that continues bit for bit on a deterministic backend.
//!
//! Randomness is counter-based: every random draw (epoch shuffles, each sample's augmentation,
//! dropout masks) comes from a generator seeded by [`seed_for`] from the run's seed and the
//! draw's position (epoch, sample, step). So the whole random state of a run is its seed plus
//! its position, which a checkpoint saves.

pub mod ablate;
pub mod augment;
pub mod data;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use augment::{Augment, CropParams};
pub use data::{DataKind, DataSpec, DataSplit, Dataset, Image};
pub use loss::{cross_entropy, topk_correct};
pub use metrics::EpochMetrics;
pub use optim::Sgd;
pub use schedule::{Decay, LrSchedule};
pub use trainer::{Device, ModelSpec, Observer, Precision, TrainConfig, TrainState, Trainer};

/// Random streams, one per kind of draw, so that draws of one kind never shift another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The order of the training samples in an epoch (index: the epoch).
    Shuffle = 1,
    /// One sample's augmentation (index: epoch and position in the epoch's order).
    Augment = 2,
    /// Dropout masks of one training step (index: the global step).
    Dropout = 3,
    /// Weight initialisation.
    Init = 4,
    /// Choosing a subset of a data set (index: which subset).
    Subset = 5,
}

/// The seed of draw `index` of `stream` in a run seeded with `seed` (SplitMix64 finalisers,
/// so neighbouring indices give unrelated generators).
pub fn seed_for(seed: u64, stream: Stream, index: u64) -> u64 {
    let a = splitmix(seed ^ (stream as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    splitmix(a ^ splitmix(index))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_input() {
        let s = seed_for(7, Stream::Augment, 3);
        assert_eq!(s, seed_for(7, Stream::Augment, 3));
        assert_ne!(s, seed_for(8, Stream::Augment, 3));
        assert_ne!(s, seed_for(7, Stream::Shuffle, 3));
        assert_ne!(s, seed_for(7, Stream::Augment, 4));
    }
}
