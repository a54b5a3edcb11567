//! Eval-mode logits of small networks match timm's. The fixtures (tiny timm ResNet-family
//! models with randomized BatchNorm statistics, an input, and timm's logits in f64 and f32)
//! come from tests/fixtures/gen_timm_fixtures.py; torch and timm are needed only to
//! regenerate them.

use safetensors::tensor::{Dtype, SafeTensors};
use senet::nn::{BlockKind, Cpu, Mode, Network, Reference, ResNetConfig, SeBlockConfig, Stem};
use senet::{rel_l2_error, Layout, Shape, Tensor};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/timm")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Rust twin of each configuration in gen_timm_fixtures.py.
fn config(name: &str) -> ResNetConfig {
    let mut c = match name {
        "tiny_seresnet_basic" => {
            let mut c = ResNetConfig::imagenet(BlockKind::Basic, &[1, 1, 1, 1]);
            c.channels = vec![8, 12, 16, 24];
            c.num_classes = 10;
            c.with_se(SeBlockConfig::default())
        }
        "tiny_senet" => {
            let mut c = ResNetConfig::imagenet(BlockKind::Bottleneck, &[1, 2, 1, 1]);
            c.channels = vec![8, 16, 16, 32];
            c.cardinality = 4;
            c.base_width = 16;
            c.stem = Stem::Deep { width: 8 };
            c.reduce_first = 2;
            c.down_kernel = 3;
            c.num_classes = 7;
            c.drop_rate = 0.2;
            c.with_se(SeBlockConfig::default())
        }
        "tiny_resnet_bottleneck" => {
            let mut c = ResNetConfig::imagenet(BlockKind::Bottleneck, &[2, 1, 1, 1]);
            c.channels = vec![8, 8, 16, 16];
            c.num_classes = 5;
            c
        }
        _ => unreachable!(),
    };
    c.input_size = (32, 32);
    c
}

fn f32_tensor(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn f64_tensor(st: &SafeTensors<'_>, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F64);
    t.data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_match_timm() {
    for name in [
        "tiny_seresnet_basic",
        "tiny_senet",
        "tiny_resnet_bottleneck",
    ] {
        let weights = fixture(&format!("{name}.safetensors"));
        let io_bytes = fixture(&format!("{name}_io.safetensors"));
        let io = SafeTensors::deserialize(&io_bytes).unwrap();
        let (xs, x) = f32_tensor(&io, "input");
        let want64 = f64_tensor(&io, "logits_f64");
        let (_, want32) = f32_tensor(&io, "logits_f32");
        let shape = Shape::new(xs[0], xs[1], xs[2], xs[3]);
        let x = Tensor::from_vec(shape, Layout::Nchw, x).unwrap();

        // Fast CPU backend, f32: within f32 tolerance of timm's f64 logits.
        let mut net: Network<f32> = config(name).build(name).unwrap();
        net.load_safetensors_bytes(&weights).unwrap();
        for mode in [Mode::Infer, Mode::Eval] {
            let y = net.forward(&Cpu, x.clone(), mode).unwrap();
            let e = rel_l2_error(&y.to_f64_vec(), &want64);
            assert!(e <= 1e-5, "{name} cpu {mode}: relative error {e:.3e}");
        }
        let e32 = rel_l2_error(
            &want32.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &want64,
        );
        eprintln!("{name}: timm f32 vs timm f64 {e32:.2e}");

        // Reference backend in f64: agrees with timm in f64 to near rounding.
        let mut net64: Network<f64> = config(name).build(name).unwrap();
        net64.load_safetensors_bytes(&weights).unwrap();
        let y = net64.forward(&Reference, x.cast(), Mode::Infer).unwrap();
        let e = rel_l2_error(y.data(), &want64);
        assert!(e <= 1e-6, "{name} reference f64: relative error {e:.3e}");

        // Our checkpoint holds exactly timm's tensors (names, dtypes, shapes, values), so it
        // loads in timm with strict=True.
        let ours_bytes = net.to_safetensors_bytes().unwrap();
        let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
        let theirs = SafeTensors::deserialize(&weights).unwrap();
        let mut a: Vec<String> = ours.names().into_iter().map(String::from).collect();
        let mut b: Vec<String> = theirs.names().into_iter().map(String::from).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names");
        for n in &b {
            let (x, y) = (ours.tensor(n).unwrap(), theirs.tensor(n).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{name}: {n} dtype");
            assert_eq!(x.shape(), y.shape(), "{name}: {n} shape");
            assert_eq!(x.data(), y.data(), "{name}: {n} values");
        }
    }
}
