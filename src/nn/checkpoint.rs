//! Checkpoints: safetensors files with timm's names and shapes, so a state dict saved from
//! timm (`safetensors.torch.save_file(model.state_dict(), path)`) loads here and ours loads in
//! timm.
//!
//! Parameters and BatchNorm running statistics are F32; `num_batches_tracked` is an I64
//! scalar (shape `[]`). Loading is strict and all-or-nothing: a missing or unexpected tensor,
//! a wrong shape or a wrong dtype is an [`Error::Format`] naming it, and the network is left
//! unchanged. The one exception is PyTorch's: a checkpoint without `num_batches_tracked`
//! counters (many published ResNet-family weights) loads, the counters keep their values, and
//! one note on stderr says so.

use crate::error::{Error, Result};
use crate::nn::network::Network;
use crate::nn::param::{Real, Slot, SlotRef};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The values of one state entry.
#[derive(Clone, Debug, PartialEq)]
pub enum StateData {
    /// Parameters and buffers.
    F32(Vec<f32>),
    /// Counters (`num_batches_tracked`).
    I64(Vec<i64>),
}

/// One named tensor of a state dict.
#[derive(Clone, Debug, PartialEq)]
pub struct StateTensor {
    /// PyTorch's shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: StateData,
}

/// A state dict: timm name -> tensor, in name order.
pub type StateDict = BTreeMap<String, StateTensor>;

impl<E: Real> Network<E> {
    /// The state dict (parameters, running statistics, counters) as f32 / i64 tensors; an
    /// error if any value is uninitialised or bound to a device backend.
    pub fn state_dict(&self) -> Result<StateDict> {
        if self.is_bound() {
            return Err(Error::Config(format!(
                "`{}` has parameters bound to a device backend; unbind it before saving",
                self.name()
            )));
        }
        let mut out = StateDict::new();
        let mut missing = Vec::new();
        self.visit_state(&mut |name, slot| match slot {
            SlotRef::Param(p) | SlotRef::Buffer(p) => {
                if !p.is_initialised() {
                    missing.push(name);
                    return;
                }
                let data = p.value.iter().map(|v| v.to_f32()).collect();
                out.insert(
                    name,
                    StateTensor {
                        shape: p.shape().to_vec(),
                        data: StateData::F32(data),
                    },
                );
            }
            SlotRef::Counter(c) => {
                out.insert(
                    name,
                    StateTensor {
                        shape: vec![],
                        data: StateData::I64(vec![c]),
                    },
                );
            }
        });
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "cannot save `{}`: {} tensors are uninitialised (first: {})",
                self.name(),
                missing.len(),
                missing[0]
            )));
        }
        Ok(out)
    }

    /// Loads a state dict (strict: every tensor present with the right shape and dtype, no
    /// extras); on error the network is unchanged.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let views: HashMap<&str, Entry<'_>> = sd
            .iter()
            .map(|(k, t)| {
                let e = match &t.data {
                    StateData::F32(v) => Entry::F32(v),
                    StateData::I64(v) => Entry::I64(v),
                };
                (k.as_str(), Entry::with_shape(e, &t.shape))
            })
            .collect();
        self.load_entries(&views)
    }

    /// The state dict serialised as safetensors bytes (metadata `format: pt`, like timm's).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let sd = self.state_dict()?;
        let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = sd
            .into_iter()
            .map(|(name, t)| match t.data {
                StateData::F32(v) => (
                    name,
                    Dtype::F32,
                    t.shape,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                StateData::I64(v) => (
                    name,
                    Dtype::I64,
                    t.shape,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, dt, shape, data)| {
                TensorView::new(*dt, shape.clone(), data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| Error::Format(format!("tensor `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Format(format!("serialising `{}`: {e}", self.name())))
    }

    /// Writes the state dict to a safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        std::fs::write(path, bytes).map_err(Error::io(format!("writing {}", path.display())))
    }

    /// Loads safetensors bytes (strict, all-or-nothing; see the module docs).
    pub fn load_safetensors_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Format(format!("not a safetensors file: {e}")))?;
        let tensors = st.tensors();
        let mut views = HashMap::new();
        for (name, v) in &tensors {
            let e = match v.dtype() {
                Dtype::F32 => Entry::Bytes(Dtype::F32, v.shape(), v.data()),
                Dtype::I64 => Entry::Bytes(Dtype::I64, v.shape(), v.data()),
                other => Entry::Other(other, v.shape()),
            };
            views.insert(name.as_str(), e);
        }
        self.load_entries(&views)
    }

    /// Loads a safetensors file (strict, all-or-nothing).
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
        self.load_safetensors_bytes(&bytes)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))
    }

    fn load_entries(&mut self, entries: &HashMap<&str, Entry<'_>>) -> Result<()> {
        // Pass 1: check every expected tensor against the file and decode it.
        let mut expected = Vec::new();
        self.visit_state(&mut |name, slot| {
            let (shape, is_counter) = match slot {
                SlotRef::Param(p) | SlotRef::Buffer(p) => (p.shape().to_vec(), false),
                SlotRef::Counter(_) => (vec![], true),
            };
            expected.push((name, shape, is_counter));
        });
        let mut missing = Vec::new();
        let mut counters_kept = 0usize;
        let mut decoded: HashMap<String, Decoded> = HashMap::new();
        for (name, shape, is_counter) in &expected {
            let Some(e) = entries.get(name.as_str()) else {
                // BatchNorm's `num_batches_tracked` is absent from many published checkpoints
                // (and from any dict saved with floating-point tensors only): PyTorch keeps the
                // module's own counter then, and so does senet.
                if *is_counter {
                    counters_kept += 1;
                } else {
                    missing.push(name.clone());
                }
                continue;
            };
            let want = if *is_counter { Dtype::I64 } else { Dtype::F32 };
            let (got_dt, got_shape) = e.meta();
            if got_dt != want {
                return Err(Error::Format(format!(
                    "tensor `{name}` has dtype {got_dt}, expected {want}"
                )));
            }
            if got_shape != shape.as_slice() {
                return Err(Error::Format(format!(
                    "tensor `{name}` has shape {got_shape:?}, expected {shape:?}"
                )));
            }
            decoded.insert(name.clone(), e.decode(name)?);
        }
        if !missing.is_empty() {
            return Err(Error::Format(format!(
                "{} tensors missing from the checkpoint for `{}`: {}",
                missing.len(),
                self.name(),
                preview(&missing)
            )));
        }
        let mut extra: Vec<String> = entries
            .keys()
            .filter(|k| !decoded.contains_key(**k))
            .map(|k| k.to_string())
            .collect();
        if !extra.is_empty() {
            extra.sort();
            return Err(Error::Format(format!(
                "{} unexpected tensors in the checkpoint for `{}`: {}",
                extra.len(),
                self.name(),
                preview(&extra)
            )));
        }
        // Pass 2: assign.
        let mut failure = None;
        self.visit_state_mut(&mut |name, slot| {
            let Some(d) = decoded.remove(&name) else {
                return;
            };
            match (slot, d) {
                (Slot::Param(p) | Slot::Buffer(p), Decoded::F32(v)) => {
                    let v = v.into_iter().map(E::from_f32).collect();
                    if let Err(e) = p.set(v) {
                        failure.get_or_insert(e);
                    }
                    p.grad.clear();
                }
                (Slot::Counter(c), Decoded::I64(v)) => *c = v,
                _ => {
                    failure.get_or_insert(Error::Format(format!("tensor `{name}`: kind mismatch")));
                }
            }
        });
        match failure {
            Some(e) => Err(e),
            None => {
                if counters_kept > 0 {
                    eprintln!(
                        "note: the checkpoint has no `num_batches_tracked` for {counters_kept} \
                         BatchNorm layers of `{}`; their counters are kept, as PyTorch does",
                        self.name()
                    );
                }
                Ok(())
            }
        }
    }
}

fn preview(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(5)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 5 {
        s.push_str(", ...");
    }
    s
}

/// A tensor to load, from a state dict or a safetensors file.
enum Entry<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
    Shaped(Box<Entry<'a>>, &'a [usize]),
    Bytes(Dtype, &'a [usize], &'a [u8]),
    Other(Dtype, &'a [usize]),
}

enum Decoded {
    F32(Vec<f32>),
    I64(i64),
}

impl<'a> Entry<'a> {
    fn with_shape(e: Entry<'a>, shape: &'a [usize]) -> Entry<'a> {
        Entry::Shaped(Box::new(e), shape)
    }

    fn meta(&self) -> (Dtype, &[usize]) {
        match self {
            Entry::Shaped(e, s) => (e.meta().0, s),
            Entry::F32(_) => (Dtype::F32, &[]),
            Entry::I64(_) => (Dtype::I64, &[]),
            Entry::Bytes(d, s, _) | Entry::Other(d, s) => (*d, s),
        }
    }

    fn decode(&self, name: &str) -> Result<Decoded> {
        let numel: usize = self.meta().1.iter().product();
        let bad_len = |got: usize| {
            Error::Format(format!(
                "tensor `{name}` holds {got} values for {numel} elements"
            ))
        };
        match self {
            Entry::Shaped(e, _) => match e.as_ref() {
                Entry::F32(v) if v.len() == numel => Ok(Decoded::F32(v.to_vec())),
                Entry::I64(v) if v.len() == 1 && numel == 1 => Ok(Decoded::I64(v[0])),
                Entry::F32(v) => Err(bad_len(v.len())),
                Entry::I64(v) => Err(bad_len(v.len())),
                other => other.decode(name),
            },
            Entry::Bytes(Dtype::F32, _, b) => {
                if b.len() != numel * 4 {
                    return Err(bad_len(b.len() / 4));
                }
                Ok(Decoded::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            Entry::Bytes(Dtype::I64, _, b) => {
                if b.len() != 8 || numel != 1 {
                    return Err(bad_len(b.len() / 8));
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(Decoded::I64(i64::from_le_bytes(a)))
            }
            Entry::Bytes(d, _, _) | Entry::Other(d, _) => Err(Error::Format(format!(
                "tensor `{name}` has unsupported dtype {d}"
            ))),
            Entry::F32(_) | Entry::I64(_) => {
                Err(Error::Format(format!("tensor `{name}` has no shape")))
            }
        }
    }
}
