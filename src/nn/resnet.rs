//! ResNet / ResNeXt / SE-ResNet / SE-ResNeXt / SENet-154 as timm's `ResNet` defines them, plus
//! the small CIFAR-style layout, from one configuration.

use crate::error::{Error, Result};
use crate::nn::backend::{ConvGeom, PoolGeom};
use crate::nn::blocks::{BlockConfig, BlockKind, ResidualBlock, SeBlockConfig, StrideOn};
use crate::nn::layers::{BatchNorm2d, Conv2d, Dropout, GlobalAvgPool, Linear, MaxPool2d, Relu};
use crate::nn::network::Network;
use crate::nn::param::Real;
use crate::nn::seq::{Layer, Seq};

/// The stem: what turns the image into the first stage's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stem {
    /// One 7x7 stride-2 convolution with `width` outputs (ResNet; timm's `conv1`).
    Conv7 {
        /// Output channels.
        width: usize,
    },
    /// Three 3x3 convolutions, `width`, `width`, `2 * width`, the first with stride 2 (timm's
    /// `stem_type='deep'`, SENet-154; named `conv1.0`, `conv1.1`, ..., `conv1.6`).
    Deep {
        /// Width of the first two convolutions.
        width: usize,
    },
    /// One 3x3 stride-1 convolution (CIFAR-style ResNet-20/56).
    Conv3 {
        /// Output channels.
        width: usize,
    },
}

impl Stem {
    /// Channels the stem hands to the first stage.
    pub fn out_channels(&self) -> usize {
        match *self {
            Stem::Conv7 { width } | Stem::Conv3 { width } => width,
            Stem::Deep { width } => 2 * width,
        }
    }
}

/// A ResNet-family configuration (timm's `ResNet` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    /// Block family.
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: Vec<usize>,
    /// `planes` per stage (outputs are `planes * expansion`).
    pub channels: Vec<usize>,
    /// Groups of the 3x3 convolutions.
    pub cardinality: usize,
    /// Bottleneck base width.
    pub base_width: usize,
    /// Divides the first 1x1 convolution's width (2 for SENet-154).
    pub reduce_first: usize,
    /// Which convolution carries a block's stride.
    pub stride_on: StrideOn,
    /// Projection-shortcut kernel when striding (3 for SENet-154).
    pub down_kernel: usize,
    /// The stem.
    pub stem: Stem,
    /// The stem's max pool (timm: 3x3, stride 2, padding 1; Caffe: 3x3, stride 2, ceil mode).
    pub stem_pool: Option<PoolGeom>,
    /// SE per stage (`None`: no SE in that stage); its length must equal `layers`'.
    pub se: Vec<Option<SeBlockConfig>>,
    /// Input channels (3 for RGB, 1 for MNIST).
    pub in_chans: usize,
    /// Input height and width the model is meant for.
    pub input_size: (usize, usize),
    /// Classes.
    pub num_classes: usize,
    /// Dropout before the classifier (SENet-154: 0.2).
    pub drop_rate: f64,
    /// Zero-initialise each branch's last BN scale (timm's default).
    pub zero_init_last: bool,
}

impl ResNetConfig {
    /// timm's ImageNet ResNet: 7x7 stem, max pool, stages of 64/128/256/512 planes, no SE,
    /// 1000 classes at 224x224.
    pub fn imagenet(block: BlockKind, layers: &[usize]) -> Self {
        ResNetConfig {
            block,
            layers: layers.to_vec(),
            channels: vec![64, 128, 256, 512],
            cardinality: 1,
            base_width: 64,
            reduce_first: 1,
            stride_on: StrideOn::Conv3x3,
            down_kernel: 1,
            stem: Stem::Conv7 { width: 64 },
            stem_pool: Some(PoolGeom {
                kernel: 3,
                stride: 2,
                padding: 1,
                ceil_mode: false,
                count_include_pad: true,
            }),
            se: vec![None; layers.len()],
            in_chans: 3,
            input_size: (224, 224),
            num_classes: 1000,
            drop_rate: 0.0,
            zero_init_last: true,
        }
    }

    /// The CIFAR-style ResNet (He et al. section 4.2): a 3x3 stem of 16 channels, three
    /// stages of `n` basic blocks with 16/32/64 channels (depth `6n + 2`), no max pool;
    /// projection shortcuts (1x1 conv + BN) where the shape changes.
    pub fn cifar(n: usize, in_chans: usize, input_size: (usize, usize), classes: usize) -> Self {
        ResNetConfig {
            block: BlockKind::Basic,
            layers: vec![n; 3],
            channels: vec![16, 32, 64],
            stem: Stem::Conv3 { width: 16 },
            stem_pool: None,
            se: vec![None; 3],
            in_chans,
            input_size,
            num_classes: classes,
            ..ResNetConfig::imagenet(BlockKind::Basic, &[n; 3])
        }
    }

    /// The same configuration with SE (`opts`) in every stage.
    pub fn with_se(mut self, opts: SeBlockConfig) -> Self {
        self.se = vec![Some(opts); self.layers.len()];
        self
    }

    /// The configuration of block `index` of stage `stage`, given its input channels; an error
    /// for a stage the configuration does not have.
    pub fn block_config(&self, stage: usize, index: usize, in_ch: usize) -> Result<BlockConfig> {
        if stage >= self.channels.len() || stage >= self.se.len() {
            return Err(Error::Config(format!(
                "stage {stage} out of range ({} stages)",
                self.channels.len()
            )));
        }
        let stride = if stage == 0 || index > 0 { 1 } else { 2 };
        Ok(BlockConfig {
            kind: self.block,
            in_ch,
            planes: self.channels[stage],
            stride,
            cardinality: self.cardinality,
            base_width: self.base_width,
            reduce_first: self.reduce_first,
            stride_on: self.stride_on,
            down_kernel: self.down_kernel,
            se: self.se[stage],
            zero_init_last: self.zero_init_last,
        })
    }

    /// Checks the lists agree and every size is non-zero.
    pub fn validate(&self) -> Result<()> {
        let n = self.layers.len();
        if n == 0 || self.channels.len() != n || self.se.len() != n {
            return Err(Error::Config(format!(
                "ResNet needs equally long layers ({}), channels ({}) and se ({}) lists",
                n,
                self.channels.len(),
                self.se.len()
            )));
        }
        if self.in_chans == 0 || self.num_classes == 0 || self.layers.contains(&0) {
            return Err(Error::Config(
                "ResNet needs input channels, classes and at least one block per stage".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return Err(Error::Config(format!(
                "drop rate {} is not in [0, 1)",
                self.drop_rate
            )));
        }
        Ok(())
    }

    /// Builds the network (no parameter values are allocated).
    pub fn build<E: Real>(&self, name: &str) -> Result<Network<E>> {
        self.validate()?;
        let mut body = Seq::new();
        let conv = |i, o, k, s, p| -> Result<Layer<E>> {
            Ok(Layer::Conv2d(Conv2d::new(
                ConvGeom::new(i, o, k, s, p, 1)?,
                false,
            )))
        };
        let bn = |c| Layer::BatchNorm2d(BatchNorm2d::new(c));
        let relu = || Layer::Relu(Relu::new());
        let stem_out = self.stem.out_channels();
        match self.stem {
            Stem::Conv7 { width } => body.push("conv1", conv(self.in_chans, width, 7, 2, 3)?),
            Stem::Conv3 { width } => body.push("conv1", conv(self.in_chans, width, 3, 1, 1)?),
            Stem::Deep { width } => {
                body.push("conv1.0", conv(self.in_chans, width, 3, 2, 1)?);
                body.push("conv1.1", bn(width));
                body.push("conv1.2", relu());
                body.push("conv1.3", conv(width, width, 3, 1, 1)?);
                body.push("conv1.4", bn(width));
                body.push("conv1.5", relu());
                body.push("conv1.6", conv(width, stem_out, 3, 1, 1)?);
            }
        }
        body.push("bn1", bn(stem_out));
        body.push("act1", relu());
        if let Some(p) = self.stem_pool {
            body.push("maxpool", Layer::MaxPool2d(MaxPool2d::new(p)));
        }
        let mut in_ch = stem_out;
        for (stage, &blocks) in self.layers.iter().enumerate() {
            for index in 0..blocks {
                let cfg = self.block_config(stage, index, in_ch)?;
                in_ch = cfg.out_ch();
                body.push(
                    format!("layer{}.{index}", stage + 1),
                    Layer::Residual(Box::new(ResidualBlock::new(cfg)?)),
                );
            }
        }
        body.push("global_pool", Layer::GlobalAvgPool(GlobalAvgPool::new()));
        if self.drop_rate > 0.0 {
            body.push("head_drop", Layer::Dropout(Dropout::new(self.drop_rate)?));
        }
        body.push(
            "fc",
            Layer::Linear(Linear::new(in_ch, self.num_classes, true)),
        );
        Network::new(
            name,
            (self.in_chans, self.input_size.0, self.input_size.1),
            self.num_classes,
            body,
        )
    }
}
