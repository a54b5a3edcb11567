//! Checkpoints: a safetensors round trip, and clear errors for a missing or extra tensor, a
//! wrong shape, or a wrong dtype.

use crate::nn_common::{random_tensor, randomize_network, seed};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use senet::nn::{models, Cpu, Mode, Network, StateData};
use senet::{Error, Shape};

fn small() -> Network<f32> {
    models::build("seresnet20_mnist").unwrap()
}

#[test]
fn round_trip_restores_every_tensor_and_the_outputs() {
    let s = seed("checkpoint");
    let mut a = small();
    randomize_network(&mut a, s);
    let dir = std::env::temp_dir().join(format!("senet-ckpt-{s}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    a.save_safetensors(&path).unwrap();

    let mut b = small();
    assert!(!b.is_initialised());
    b.load_safetensors(&path).unwrap();
    assert!(b.is_initialised());
    assert_eq!(a.state_dict().unwrap(), b.state_dict().unwrap());
    let x = random_tensor(Shape::new(2, 1, 28, 28), s);
    let ya = a.forward(&Cpu, x.clone(), Mode::Infer).unwrap();
    let yb = b.forward(&Cpu, x, Mode::Infer).unwrap();
    assert_eq!(ya.data(), yb.data());
    std::fs::remove_dir_all(&dir).ok();

    // The file carries timm's names, dtypes and shapes.
    let bytes = a.to_safetensors_bytes().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("layer1.0.se.fc1.weight").unwrap();
    assert_eq!(
        (t.dtype(), t.shape()),
        (Dtype::F32, &[4usize, 16, 1, 1][..])
    );
    let t = st.tensor("bn1.num_batches_tracked").unwrap();
    assert_eq!((t.dtype(), t.shape()), (Dtype::I64, &[][..]));
    assert_eq!(i64::from_le_bytes(t.data().try_into().unwrap()), 3);
}

/// Re-serialises `bytes` after `edit` changes the list of `(name, dtype, shape, data)`.
fn edited(
    bytes: &[u8],
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut list: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut list);
    let views: Vec<(String, TensorView<'_>)> = list
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn load_err(bytes: &[u8]) -> String {
    let mut net = small();
    let e = net.load_safetensors_bytes(bytes).unwrap_err();
    assert!(matches!(e, Error::Format(_)), "{e:?}");
    // A failed load leaves the network untouched.
    assert!(!net.is_initialised());
    e.to_string()
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let mut a = small();
    a.init_weights(1);
    let good = a.to_safetensors_bytes().unwrap();

    let missing = edited(&good, |l| l.retain(|(n, ..)| n != "layer2.1.se.fc2.bias"));
    let e = load_err(&missing);
    assert!(
        e.contains("missing") && e.contains("layer2.1.se.fc2.bias"),
        "{e}"
    );

    let extra = edited(&good, |l| {
        l.push(("head.extra".into(), Dtype::F32, vec![2], vec![0; 8]))
    });
    let e = load_err(&extra);
    assert!(e.contains("unexpected") && e.contains("head.extra"), "{e}");

    let shape = edited(&good, |l| {
        let t = l.iter_mut().find(|(n, ..)| n == "conv1.weight").unwrap();
        t.2 = vec![16, 1, 9, 1];
    });
    let e = load_err(&shape);
    assert!(e.contains("conv1.weight") && e.contains("shape"), "{e}");

    let dtype = edited(&good, |l| {
        let t = l.iter_mut().find(|(n, ..)| n == "fc.bias").unwrap();
        t.1 = Dtype::F16;
        t.3.truncate(t.3.len() / 2);
    });
    let e = load_err(&dtype);
    assert!(e.contains("fc.bias") && e.contains("dtype"), "{e}");

    let e = load_err(b"definitely not safetensors");
    assert!(e.contains("safetensors"), "{e}");

    // An uninitialised network cannot be saved.
    assert!(small().to_safetensors_bytes().is_err());
    // A missing file is an I/O error naming the path.
    let e = small()
        .load_safetensors("/nonexistent/x.safetensors")
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.safetensors"), "{e}");
}

#[test]
fn state_dict_round_trip_across_element_types() {
    let mut a = small();
    a.init_weights(9);
    let sd = a.state_dict().unwrap();
    let mut b: Network<f64> = models::build("seresnet20_mnist").unwrap();
    b.load_state_dict(&sd).unwrap();
    assert_eq!(b.state_dict().unwrap(), sd);
    let mut bad = sd.clone();
    let t = bad.get_mut("fc.weight").unwrap();
    if let StateData::F32(v) = &mut t.data {
        v.pop();
    }
    assert!(b.load_state_dict(&bad).is_err());
}

/// A state dict without BatchNorm's `num_batches_tracked` (many published ResNet-family
/// checkpoints, any dict saved with floating-point tensors only) loads as in PyTorch: every
/// other tensor is taken and the counters keep their values. Other missing or extra tensors
/// are still errors.
#[test]
fn checkpoints_without_batch_counters_load_as_in_pytorch() {
    let s = seed("counters");
    let mut a = small();
    randomize_network(&mut a, s);
    let good = a.to_safetensors_bytes().unwrap();
    let stripped = edited(&good, |l| {
        l.retain(|(n, ..)| !n.ends_with("num_batches_tracked"))
    });
    let removed = SafeTensors::deserialize(&good).unwrap().len()
        - SafeTensors::deserialize(&stripped).unwrap().len();
    assert!(removed > 10, "the model has BatchNorm counters to drop");

    // Into a network whose counters moved: the floats are the file's, the counters its own.
    let mut b = small();
    b.init_weights(s ^ 1);
    let x = random_tensor(Shape::new(2, 1, 28, 28), s);
    b.forward(&Cpu, x.clone(), Mode::Train).unwrap();
    b.forward(&Cpu, x, Mode::Train).unwrap();
    let before = b.state_dict().unwrap();
    b.load_safetensors_bytes(&stripped).unwrap();
    let (want, got) = (a.state_dict().unwrap(), b.state_dict().unwrap());
    for (name, t) in &got {
        if name.ends_with("num_batches_tracked") {
            assert_eq!(t, &before[name], "{name}: the counter was not kept");
            assert_eq!(t.data, StateData::I64(vec![2]), "{name}");
        } else {
            assert_eq!(t, &want[name], "{name}: not loaded");
        }
    }

    // Still strict about everything else.
    let also_missing = edited(&stripped, |l| l.retain(|(n, ..)| n != "fc.weight"));
    let e = load_err(&also_missing);
    assert!(e.contains("missing") && e.contains("fc.weight"), "{e}");
    assert!(!e.contains("num_batches_tracked"), "{e}");
    let extra = edited(&stripped, |l| {
        l.push(("head.extra".into(), Dtype::F32, vec![2], vec![0; 8]))
    });
    let e = load_err(&extra);
    assert!(e.contains("unexpected") && e.contains("head.extra"), "{e}");
}
