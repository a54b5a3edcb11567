//! Seeded random numbers for inputs, weights and tests.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// The generator used everywhere: reproducible from a `u64` seed.
pub type SeedRng = rand::rngs::StdRng;

/// A generator seeded with `seed`.
pub fn seeded(seed: u64) -> SeedRng {
    SeedRng::seed_from_u64(seed)
}

/// `len` values drawn uniformly from `[lo, hi)`.
pub fn uniform_vec(len: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut next = uniform_stream(lo, hi, seed);
    (0..len).map(|_| next()).collect()
}

/// The values of [`uniform_vec`], one per call, in the same order.
pub fn uniform_stream(lo: f32, hi: f32, seed: u64) -> impl FnMut() -> f32 {
    let mut rng = seeded(seed);
    move || rng.gen_range(lo..hi)
}

/// `len` values drawn from a normal distribution with mean 0 and standard deviation `std`.
pub fn normal_vec(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = seeded(seed);
    match Normal::new(0.0f32, std.max(0.0)) {
        Ok(d) => (0..len).map(|_| d.sample(&mut rng)).collect(),
        Err(_) => vec![0.0; len],
    }
}

/// A fresh seed from the operating system, for tests that must see new inputs every run.
/// Printed by callers so a failure can be replayed.
pub fn fresh_seed() -> u64 {
    rand::thread_rng().gen()
}
