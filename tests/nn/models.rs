//! The model registry: parameter counts equal the published (timm) ones, names and shapes are
//! timm's, and building is cheap.

use senet::nn::{models, Network, SlotRef};

/// `sum(p.numel() for p in timm.create_model(name).parameters())`, timm 1.0.
const TIMM_COUNTS: &[(&str, usize)] = &[
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
    ("seresnet18", 11_779_624),
    ("seresnet34", 21_960_416),
    ("seresnet50", 28_088_024),
    ("seresnet101", 49_326_872),
    ("seresnet152", 66_821_848),
    ("resnext50_32x4d", 25_028_904),
    ("resnext101_32x4d", 44_177_704),
    ("seresnext50_32x4d", 27_559_896),
    ("seresnext101_32x4d", 48_955_416),
    ("senet154", 115_088_984),
];

#[test]
fn parameter_counts_match_timm() {
    for &(name, expected) in TIMM_COUNTS {
        let net: Network<f32> = models::build(name).unwrap();
        assert_eq!(net.num_params(), expected, "{name}");
        // Building allocates no parameter values.
        assert!(!net.is_initialised(), "{name}");
    }
}

#[test]
fn every_registered_model_builds() {
    for m in models::MODELS {
        let net: Network<f32> = models::build(m.name).unwrap();
        assert!(net.num_params() > 0, "{}", m.name);
        assert!(net.macs().unwrap() > 0, "{}", m.name);
    }
    assert!(models::build::<f32>("resnet51").is_err());
}

fn state_shapes(net: &Network<f32>) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    net.visit_state(&mut |name, slot| {
        let shape = match slot {
            SlotRef::Param(p) | SlotRef::Buffer(p) => p.shape().to_vec(),
            SlotRef::Counter(_) => vec![],
        };
        out.push((name, shape));
    });
    out
}

#[test]
fn timm_names_and_shapes() {
    let net: Network<f32> = models::build("seresnet50").unwrap();
    let s = state_shapes(&net);
    let get = |n: &str| {
        s.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no tensor {n}"))
    };
    assert_eq!(get("conv1.weight"), vec![64, 3, 7, 7]);
    assert_eq!(get("bn1.running_var"), vec![64]);
    assert_eq!(get("bn1.num_batches_tracked"), Vec::<usize>::new());
    assert_eq!(get("layer1.0.se.fc1.weight"), vec![16, 256, 1, 1]);
    assert_eq!(get("layer1.0.se.fc1.bias"), vec![16]);
    assert_eq!(get("layer1.0.se.fc2.weight"), vec![256, 16, 1, 1]);
    assert_eq!(get("layer1.0.downsample.0.weight"), vec![256, 64, 1, 1]);
    assert_eq!(get("layer4.2.se.fc1.weight"), vec![128, 2048, 1, 1]);
    assert_eq!(get("fc.weight"), vec![1000, 2048]);
    // timm's seresnet50 state dict has 53 convs/BNs... count entries: 5 per BN, 1 per conv,
    // 4 per SE, 2 for fc.
    let bns = s
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean"))
        .count();
    let convs = s
        .iter()
        .filter(|(k, v)| k.ends_with("weight") && v.len() == 4)
        .count();
    assert_eq!(bns, 53);
    assert_eq!(convs, 53 + 16 * 2);

    let net: Network<f32> = models::build("senet154").unwrap();
    let s = state_shapes(&net);
    let names: Vec<&str> = s.iter().map(|(k, _)| k.as_str()).collect();
    for n in [
        "conv1.0.weight",
        "conv1.1.running_mean",
        "conv1.3.weight",
        "conv1.4.weight",
        "conv1.6.weight",
        "bn1.weight",
        "layer2.0.downsample.0.weight",
        "layer3.35.se.fc2.bias",
    ] {
        assert!(names.contains(&n), "senet154 lacks {n}");
    }
    let ds = s
        .iter()
        .find(|(k, _)| k == "layer2.0.downsample.0.weight")
        .unwrap();
    assert_eq!(ds.1, vec![512, 256, 3, 3]);
    let c2 = s
        .iter()
        .find(|(k, _)| k == "layer1.0.conv2.weight")
        .unwrap();
    // width 256 in 64 groups; first 1x1 is width / 2 = 128.
    assert_eq!(c2.1, vec![256, 2, 3, 3]);
}

#[test]
fn macs_match_published_figures() {
    // ResNet-50 at 224x224: 4.09 GMACs (4.1 "GFLOPs" in the ResNet and SE papers); SE adds
    // about 0.01.
    let r50: Network<f32> = models::build("resnet50").unwrap();
    let se50: Network<f32> = models::build("seresnet50").unwrap();
    let (a, b) = (
        r50.macs().unwrap() as f64 / 1e9,
        se50.macs().unwrap() as f64 / 1e9,
    );
    assert!((a - 4.09).abs() < 0.03, "resnet50 {a} GMACs");
    assert!(b > a && b - a < 0.03, "seresnet50 {b} vs {a}");
}
