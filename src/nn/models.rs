//! The model registry: every named architecture, built from timm's definitions.
//!
//! [`build`] returns a network with every shape known but no values (cheap, so parameter
//! counts of SENet-154 cost nothing); [`create`] also initialises the weights.

use crate::error::{Error, Result};
use crate::nn::backend::ConvGeom;
use crate::nn::backend::PoolGeom;
use crate::nn::blocks::{BlockKind, SeBlockConfig};
use crate::nn::inception::{conv_bn_relu, InceptionModule, BN_INCEPTION};
use crate::nn::layers::{GlobalAvgPool, Linear, MaxPool2d};
use crate::nn::network::Network;
use crate::nn::param::Real;
use crate::nn::resnet::{ResNetConfig, Stem};
use crate::nn::seq::{Layer, Seq};

/// A registry entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    /// The name (timm's where timm has the model).
    pub name: &'static str,
    /// One line on what it is.
    pub description: &'static str,
}

const fn entry(name: &'static str, description: &'static str) -> ModelEntry {
    ModelEntry { name, description }
}

/// Every model [`build`] knows.
pub const MODELS: &[ModelEntry] = &[
    entry("resnet18", "ResNet-18 (basic blocks 2-2-2-2)"),
    entry("resnet34", "ResNet-34 (basic blocks 3-4-6-3)"),
    entry("resnet50", "ResNet-50 (bottlenecks 3-4-6-3)"),
    entry("resnet101", "ResNet-101 (bottlenecks 3-4-23-3)"),
    entry("resnet152", "ResNet-152 (bottlenecks 3-8-36-3)"),
    entry("seresnet18", "SE-ResNet-18"),
    entry("seresnet34", "SE-ResNet-34"),
    entry("seresnet50", "SE-ResNet-50"),
    entry("seresnet101", "SE-ResNet-101"),
    entry("seresnet152", "SE-ResNet-152"),
    entry("resnext50_32x4d", "ResNeXt-50 (32x4d)"),
    entry("resnext101_32x4d", "ResNeXt-101 (32x4d)"),
    entry("seresnext50_32x4d", "SE-ResNeXt-50 (32x4d)"),
    entry("seresnext101_32x4d", "SE-ResNeXt-101 (32x4d)"),
    entry(
        "senet154",
        "SENet-154 (64x4d, deep stem, 3x3 downsample, dropout 0.2)",
    ),
    entry("bn_inception", "BN-Inception (Caffe layout)"),
    entry(
        "se_bn_inception",
        "SE-BN-Inception (SE on every Inception module's output)",
    ),
    entry("resnet20_cifar", "CIFAR ResNet-20, 32x32x3, 10 classes"),
    entry("seresnet20_cifar", "CIFAR SE-ResNet-20 (r=4), 32x32x3"),
    entry("resnet56_cifar", "CIFAR ResNet-56, 32x32x3, 10 classes"),
    entry("seresnet56_cifar", "CIFAR SE-ResNet-56 (r=4), 32x32x3"),
    entry("resnet20_mnist", "ResNet-20 layout for 28x28x1 (MNIST)"),
    entry("seresnet20_mnist", "SE-ResNet-20 (r=4) for 28x28x1 (MNIST)"),
];

/// The SE of the small CIFAR/MNIST models: their stages have 16/32/64 channels, where timm's
/// `r = 16` rounded up to 8 would be a reduction of 2; use `r = 4` exactly.
pub fn small_se() -> SeBlockConfig {
    SeBlockConfig {
        reduction: 4,
        divisor: 1,
        ..SeBlockConfig::default()
    }
}

/// The configuration of a ResNet-family model, or `None` if `name` is not one.
pub fn resnet_config(name: &str) -> Option<ResNetConfig> {
    use BlockKind::{Basic, Bottleneck};
    let se = SeBlockConfig::default();
    let resnext = |layers: &[usize]| ResNetConfig {
        cardinality: 32,
        base_width: 4,
        ..ResNetConfig::imagenet(Bottleneck, layers)
    };
    Some(match name {
        "resnet18" => ResNetConfig::imagenet(Basic, &[2, 2, 2, 2]),
        "resnet34" => ResNetConfig::imagenet(Basic, &[3, 4, 6, 3]),
        "resnet50" => ResNetConfig::imagenet(Bottleneck, &[3, 4, 6, 3]),
        "resnet101" => ResNetConfig::imagenet(Bottleneck, &[3, 4, 23, 3]),
        "resnet152" => ResNetConfig::imagenet(Bottleneck, &[3, 8, 36, 3]),
        "seresnet18" => ResNetConfig::imagenet(Basic, &[2, 2, 2, 2]).with_se(se),
        "seresnet34" => ResNetConfig::imagenet(Basic, &[3, 4, 6, 3]).with_se(se),
        "seresnet50" => ResNetConfig::imagenet(Bottleneck, &[3, 4, 6, 3]).with_se(se),
        "seresnet101" => ResNetConfig::imagenet(Bottleneck, &[3, 4, 23, 3]).with_se(se),
        "seresnet152" => ResNetConfig::imagenet(Bottleneck, &[3, 8, 36, 3]).with_se(se),
        "resnext50_32x4d" => resnext(&[3, 4, 6, 3]),
        "resnext101_32x4d" => resnext(&[3, 4, 23, 3]),
        "seresnext50_32x4d" => resnext(&[3, 4, 6, 3]).with_se(se),
        "seresnext101_32x4d" => resnext(&[3, 4, 23, 3]).with_se(se),
        "senet154" => ResNetConfig {
            cardinality: 64,
            base_width: 4,
            reduce_first: 2,
            down_kernel: 3,
            stem: Stem::Deep { width: 64 },
            drop_rate: 0.2,
            ..ResNetConfig::imagenet(Bottleneck, &[3, 8, 36, 3])
        }
        .with_se(se),
        "resnet20_cifar" => ResNetConfig::cifar(3, 3, (32, 32), 10),
        "seresnet20_cifar" => ResNetConfig::cifar(3, 3, (32, 32), 10).with_se(small_se()),
        "resnet56_cifar" => ResNetConfig::cifar(9, 3, (32, 32), 10),
        "seresnet56_cifar" => ResNetConfig::cifar(9, 3, (32, 32), 10).with_se(small_se()),
        "resnet20_mnist" => ResNetConfig::cifar(3, 1, (28, 28), 10),
        "seresnet20_mnist" => ResNetConfig::cifar(3, 1, (28, 28), 10).with_se(small_se()),
        _ => return None,
    })
}

/// The Caffe / Cadene stem pool (3x3, stride 2, no padding, ceil mode), for configurations
/// that follow the original SENet release rather than timm.
pub fn caffe_stem_pool() -> PoolGeom {
    PoolGeom {
        kernel: 3,
        stride: 2,
        padding: 0,
        ceil_mode: true,
        count_include_pad: true,
    }
}

/// Builds model `name` with no parameter values (see [`Network::init_weights`] and
/// [`Network::load_safetensors`]).
pub fn build<E: Real>(name: &str) -> Result<Network<E>> {
    if let Some(cfg) = resnet_config(name) {
        return cfg.build(name);
    }
    match name {
        "bn_inception" => bn_inception(name, None, 1000),
        "se_bn_inception" => bn_inception(name, Some(SeBlockConfig::default()), 1000),
        _ => Err(Error::Config(format!(
            "unknown model `{name}`; known: {}",
            MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Builds model `name` and initialises its weights from `seed`.
pub fn create<E: Real>(name: &str, seed: u64) -> Result<Network<E>> {
    let mut net = build(name)?;
    net.init_weights(seed);
    Ok(net)
}

/// BN-Inception (with SE on every module's output when `se` is set), for `classes` classes
/// at 224x224.
pub fn bn_inception<E: Real>(
    name: &str,
    se: Option<SeBlockConfig>,
    classes: usize,
) -> Result<Network<E>> {
    let mut body = Seq::new();
    conv_bn_relu(
        &mut body,
        "conv1_7x7_s2",
        "conv1_relu_7x7",
        ConvGeom::new(3, 64, 7, 2, 3, 1)?,
    )?;
    let pool = || -> Result<Layer<E>> {
        Ok(Layer::MaxPool2d(MaxPool2d::new(PoolGeom::new(
            3, 2, 0, true,
        )?)))
    };
    body.push("pool1_3x3_s2", pool()?);
    conv_bn_relu(
        &mut body,
        "conv2_3x3_reduce",
        "conv2_relu_3x3_reduce",
        ConvGeom::new(64, 64, 1, 1, 0, 1)?,
    )?;
    conv_bn_relu(
        &mut body,
        "conv2_3x3",
        "conv2_relu_3x3",
        ConvGeom::new(64, 192, 3, 1, 1, 1)?,
    )?;
    body.push("pool2_3x3_s2", pool()?);
    let mut c = 192;
    for spec in &BN_INCEPTION {
        body.push(
            "",
            Layer::Inception(Box::new(InceptionModule::new(spec, c, se)?)),
        );
        c = spec.out_channels(c);
    }
    body.push("global_pool", Layer::GlobalAvgPool(GlobalAvgPool::new()));
    body.push("last_linear", Layer::Linear(Linear::new(c, classes, true)));
    Network::new(name, (3, 224, 224), classes, body)
}
