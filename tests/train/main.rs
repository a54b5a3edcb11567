//! The training stack's tests in one binary (feature `nn`): data sets and augmentation
//! (`data`), and the loop, its schedule, loss, optimiser, resume and the CLI (`run`).

#[path = "../nn_common/mod.rs"]
mod nn_common;

mod data;
mod run;
