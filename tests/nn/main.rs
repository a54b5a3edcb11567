//! The networks' tests in one binary (feature `nn`): every backend's ops and networks against
//! the reference (`backends`, on the emulator and a GPU when present), checkpoints, gradient
//! checks, the model registry, timm's logits, and training.

#[path = "../nn_common/mod.rs"]
mod nn_common;

mod backends;
mod checkpoint;
mod gradcheck;
mod models;
mod timm_fixtures;
mod training;
