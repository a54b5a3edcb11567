//! Residual blocks: ResNet basic and bottleneck, ResNeXt bottleneck (cardinality, base width),
//! the SENet-154 bottleneck (`reduce_first = 2`), with SE placed as in the paper's ablation.
//!
//! Names follow timm's `BasicBlock` / `Bottleneck`: `conv1`, `bn1`, `conv2`, `bn2`, `conv3`,
//! `bn3`, `se.fc1`, `se.fc2`, `downsample.0` (conv), `downsample.1` (BN).

use crate::error::{Error, Result};
use crate::nn::backend::{Backend, ConvGeom};
use crate::nn::chain::{Branch, Leaf};
use crate::nn::layers::{no_forward, BatchNorm2d, Conv2d, Module, Relu, SqueezeExcite};
use crate::nn::param::{Mode, Real, Visit, VisitMut};
use crate::se::{make_divisible, SeConfig};
use crate::tensor::Shape;

/// Where a residual block applies SE (Hu et al., section 6.5 and table 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SePosition {
    /// On the residual branch, before the add (the paper's design; timm's): computed as the
    /// fused epilogue `relu(s * branch + shortcut)`.
    Standard,
    /// Before the residual unit: the branch sees `SE(x)`, the shortcut sees `x`.
    Pre,
    /// After the add and its ReLU: `SE(relu(branch + shortcut))`.
    Post,
    /// On the identity branch, in parallel with the residual unit:
    /// `relu(branch(x) + SE(shortcut(x)))`.
    Identity,
    /// Inside a bottleneck's branch, right after the 3x3 convolution (and its BN and ReLU), on
    /// its `width` channels (table 15).
    After3x3,
}

impl SePosition {
    /// Every position.
    pub const ALL: [SePosition; 5] = [
        SePosition::Standard,
        SePosition::Pre,
        SePosition::Post,
        SePosition::Identity,
        SePosition::After3x3,
    ];
}

/// How a block's SE is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeBlockConfig {
    /// Reduction ratio `r` (hidden = `C / r`, rounded to a multiple of `divisor`).
    pub reduction: usize,
    /// Rounding divisor of the hidden width (timm: 8; 1 keeps `C / r` exactly, at least 1).
    pub divisor: usize,
    /// Whether the FC layers have biases (timm, Cadene and Caffe: yes).
    pub bias: bool,
    /// Where SE sits in the block.
    pub position: SePosition,
}

impl Default for SeBlockConfig {
    /// timm's SE: `r = 16`, divisor 8, biases, standard position.
    fn default() -> Self {
        SeBlockConfig {
            reduction: 16,
            divisor: 8,
            bias: true,
            position: SePosition::Standard,
        }
    }
}

impl SeBlockConfig {
    /// The SE configuration for `channels`.
    pub fn config(&self, channels: usize) -> Result<SeConfig> {
        if self.reduction == 0 {
            return Err(Error::Config(
                "SE reduction ratio must be at least 1".into(),
            ));
        }
        let hidden = if self.divisor <= 1 {
            (channels / self.reduction).max(1)
        } else {
            make_divisible(channels as f64 / self.reduction as f64, self.divisor)
        };
        Ok(SeConfig::with_hidden(channels, hidden)?.bias(self.bias))
    }
}

/// The two block families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1, 3x3 (grouped for ResNeXt), 1x1 (ResNet-50 and deeper), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Which convolution of a bottleneck carries the stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrideOn {
    /// The 3x3 convolution (timm, torchvision "ResNet v1.5").
    Conv3x3,
    /// The first 1x1 convolution (Caffe's and Cadene's SE-ResNet / SE-ResNeXt).
    FirstConv1x1,
}

/// A residual block's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockConfig {
    /// Basic or bottleneck.
    pub kind: BlockKind,
    /// Input channels.
    pub in_ch: usize,
    /// `planes` (output channels = `planes * expansion`).
    pub planes: usize,
    /// Stride of the block (1 or 2).
    pub stride: usize,
    /// Groups of the 3x3 convolution (ResNeXt's cardinality).
    pub cardinality: usize,
    /// Bottleneck width per group at `planes = 64` (ResNeXt's `d`; 64 for ResNet).
    pub base_width: usize,
    /// The first 1x1 convolution's width is `width / reduce_first` (2 for SENet-154).
    pub reduce_first: usize,
    /// Which convolution carries the stride.
    pub stride_on: StrideOn,
    /// Kernel of the projection shortcut when it strides (1, or 3 for SENet-154).
    pub down_kernel: usize,
    /// The SE block, if any.
    pub se: Option<SeBlockConfig>,
    /// Initialise the branch's last BN scale to zero (timm's `zero_init_last`).
    pub zero_init_last: bool,
}

impl BlockConfig {
    /// A block with timm's defaults: no grouping, stride on the 3x3, no SE.
    pub fn new(kind: BlockKind, in_ch: usize, planes: usize, stride: usize) -> Self {
        BlockConfig {
            kind,
            in_ch,
            planes,
            stride,
            cardinality: 1,
            base_width: 64,
            reduce_first: 1,
            stride_on: StrideOn::Conv3x3,
            down_kernel: 1,
            se: None,
            zero_init_last: true,
        }
    }

    /// Output channels.
    pub fn out_ch(&self) -> usize {
        self.planes * self.kind.expansion()
    }

    /// Width of the 3x3 convolution (timm: `floor(planes * base_width / 64) * cardinality`).
    pub fn width(&self) -> usize {
        match self.kind {
            BlockKind::Basic => self.planes,
            BlockKind::Bottleneck => (self.planes * self.base_width / 64) * self.cardinality,
        }
    }
}

/// A residual block: `relu(branch(x) + shortcut(x))` with SE where [`SePosition`] says.
#[derive(Clone, Debug)]
pub struct ResidualBlock<E> {
    config: BlockConfig,
    branch: Branch<E>,
    shortcut: Option<Branch<E>>,
    /// SE outside the branch (every position but [`SePosition::After3x3`]).
    se: Option<SqueezeExcite<E>>,
    /// The ReLU output of the add (when it is not fused into SE), for backward.
    add_out: Option<crate::nn::layers::Stash>,
}

impl<E: Real> ResidualBlock<E> {
    /// Builds the block; allocates no parameter values.
    pub fn new(cfg: BlockConfig) -> Result<Self> {
        if cfg.in_ch == 0
            || cfg.planes == 0
            || cfg.stride == 0
            || cfg.reduce_first == 0
            || cfg.down_kernel == 0
        {
            return Err(Error::Config(format!("invalid block {cfg:?}")));
        }
        let out = cfg.out_ch();
        let width = cfg.width();
        let mut branch = Branch::new();
        let bn = |c| Leaf::BatchNorm2d(BatchNorm2d::new(c));
        let last_bn = |c| {
            let b = BatchNorm2d::new(c);
            Leaf::BatchNorm2d(if cfg.zero_init_last { b.zero_init() } else { b })
        };
        let relu = || Leaf::Relu(Relu::new());
        let conv = |i, o, k, s, p, g| -> Result<Leaf<E>> {
            Ok(Leaf::Conv2d(Conv2d::new(
                ConvGeom::new(i, o, k, s, p, g)?,
                false,
            )))
        };
        let se_pos = cfg.se.map(|s| s.position);
        match cfg.kind {
            BlockKind::Basic => {
                if cfg.cardinality != 1 || cfg.base_width != 64 {
                    return Err(Error::Config(
                        "a basic block has no groups or base width (use a bottleneck)".into(),
                    ));
                }
                if se_pos == Some(SePosition::After3x3) {
                    return Err(Error::Config(
                        "SE after the 3x3 convolution applies to bottleneck blocks".into(),
                    ));
                }
                let first = width / cfg.reduce_first;
                branch.push("conv1", conv(cfg.in_ch, first, 3, cfg.stride, 1, 1)?);
                branch.push("bn1", bn(first));
                branch.push("act1", relu());
                branch.push("conv2", conv(first, out, 3, 1, 1, 1)?);
                branch.push("bn2", last_bn(out));
            }
            BlockKind::Bottleneck => {
                let first = width / cfg.reduce_first;
                if first == 0 || width == 0 {
                    return Err(Error::Config(format!("bottleneck {cfg:?} has zero width")));
                }
                let (s1, s3) = match cfg.stride_on {
                    StrideOn::Conv3x3 => (1, cfg.stride),
                    StrideOn::FirstConv1x1 => (cfg.stride, 1),
                };
                branch.push("conv1", conv(cfg.in_ch, first, 1, s1, 0, 1)?);
                branch.push("bn1", bn(first));
                branch.push("act1", relu());
                branch.push("conv2", conv(first, width, 3, s3, 1, cfg.cardinality)?);
                branch.push("bn2", bn(width));
                branch.push("act2", relu());
                if se_pos == Some(SePosition::After3x3) {
                    let opts = cfg.se.unwrap_or_default();
                    branch.push(
                        "se",
                        Leaf::SqueezeExcite(SqueezeExcite::new(opts.config(width)?)?),
                    );
                }
                branch.push("conv3", conv(width, out, 1, 1, 0, 1)?);
                branch.push("bn3", last_bn(out));
            }
        }
        let shortcut = if cfg.stride != 1 || cfg.in_ch != out {
            let k = if cfg.stride == 1 { 1 } else { cfg.down_kernel };
            let pad = ((cfg.stride - 1) + (k - 1)) / 2;
            Some(
                Branch::new()
                    .with("downsample.0", conv(cfg.in_ch, out, k, cfg.stride, pad, 1)?)
                    .with("downsample.1", bn(out)),
            )
        } else {
            None
        };
        let se = match cfg.se {
            Some(opts) if opts.position != SePosition::After3x3 => {
                let c = if opts.position == SePosition::Pre {
                    cfg.in_ch
                } else {
                    out
                };
                Some(SqueezeExcite::new(opts.config(c)?)?)
            }
            _ => None,
        };
        Ok(ResidualBlock {
            config: cfg,
            branch,
            shortcut,
            se,
            add_out: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The residual branch (convolutions, BNs, ReLUs, and SE when it sits after the 3x3).
    pub fn branch(&self) -> &Branch<E> {
        &self.branch
    }

    /// The projection shortcut, if the block has one.
    pub fn shortcut(&self) -> Option<&Branch<E>> {
        self.shortcut.as_ref()
    }

    fn position(&self) -> Option<SePosition> {
        self.se.as_ref().and(self.config.se.map(|s| s.position))
    }

    fn run_shortcut<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        match &mut self.shortcut {
            Some(s) => s.forward(b, x, mode),
            None => Ok(x),
        }
    }

    fn shortcut_backward<B: Backend<E>>(&mut self, b: &B, d: B::T) -> Result<B::T> {
        match &mut self.shortcut {
            Some(s) => s.backward(b, d),
            None => Ok(d),
        }
    }

    fn se_mut(&mut self) -> Result<&mut SqueezeExcite<E>> {
        self.se
            .as_mut()
            .ok_or_else(|| Error::Config("residual block has no SE".into()))
    }

    /// `relu(a + b)`, keeping the output for backward when recording.
    fn add_relu<B: Backend<E>>(&mut self, b: &B, a: B::T, r: B::T, mode: Mode) -> Result<B::T> {
        let y = b.add(a, &r, true)?;
        b.recycle(r);
        self.add_out = mode
            .records()
            .then(|| crate::nn::layers::Stash::new(y.clone()));
        Ok(y)
    }

    fn add_relu_backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let y = self
            .add_out
            .take()
            .ok_or_else(|| no_forward("residual add"))?;
        b.relu_backward(y.get::<B::T>()?, dy)
    }
}

impl<E: Real> Module<E> for ResidualBlock<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        match self.position() {
            None => {
                let id = self.run_shortcut(b, x.clone(), mode)?;
                let br = self.branch.forward(b, x, mode)?;
                self.add_relu(b, br, id, mode)
            }
            Some(SePosition::Standard) => {
                let id = self.run_shortcut(b, x.clone(), mode)?;
                let br = self.branch.forward(b, x, mode)?;
                self.se_mut()?.forward_fused(b, br, id, mode)
            }
            Some(SePosition::Pre) => {
                let id = self.run_shortcut(b, x.clone(), mode)?;
                let xs = self.se_mut()?.forward(b, x, mode)?;
                let br = self.branch.forward(b, xs, mode)?;
                self.add_relu(b, br, id, mode)
            }
            Some(SePosition::Post) => {
                let id = self.run_shortcut(b, x.clone(), mode)?;
                let br = self.branch.forward(b, x, mode)?;
                let t = self.add_relu(b, br, id, mode)?;
                self.se_mut()?.forward(b, t, mode)
            }
            Some(SePosition::Identity) => {
                let id = self.run_shortcut(b, x.clone(), mode)?;
                let ids = self.se_mut()?.forward(b, id, mode)?;
                let br = self.branch.forward(b, x, mode)?;
                self.add_relu(b, br, ids, mode)
            }
            Some(SePosition::After3x3) => Err(Error::Config(
                "SE after the 3x3 convolution lives in the branch".into(),
            )),
        }
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let (dbranch_in, dshort_in) = match self.position() {
            None => {
                let g = self.add_relu_backward(b, dy)?;
                let dx = self.branch.backward(b, g.clone())?;
                (dx, g)
            }
            Some(SePosition::Standard) => {
                let (dbr, did) = self.se_mut()?.backward_fused(b, dy)?;
                (self.branch.backward(b, dbr)?, did)
            }
            Some(SePosition::Pre) => {
                let g = self.add_relu_backward(b, dy)?;
                let dxs = self.branch.backward(b, g.clone())?;
                (self.se_mut()?.backward(b, dxs)?, g)
            }
            Some(SePosition::Post) => {
                let dt = self.se_mut()?.backward(b, dy)?;
                let g = self.add_relu_backward(b, dt)?;
                (self.branch.backward(b, g.clone())?, g)
            }
            Some(SePosition::Identity) => {
                let g = self.add_relu_backward(b, dy)?;
                let dx = self.branch.backward(b, g.clone())?;
                (dx, self.se_mut()?.backward(b, g)?)
            }
            Some(SePosition::After3x3) => {
                return Err(Error::Config(
                    "SE after the 3x3 convolution lives in the branch".into(),
                ))
            }
        };
        let dshort = self.shortcut_backward(b, dshort_in)?;
        let dx = b.add(dbranch_in, &dshort, false)?;
        b.recycle(dshort);
        Ok(dx)
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        self.branch.visit(prefix, f);
        if let Some(se) = &self.se {
            se.visit(&format!("{prefix}se."), f);
        }
        if let Some(s) = &self.shortcut {
            s.visit(prefix, f);
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        self.branch.visit_mut(prefix, f);
        if let Some(se) = &mut self.se {
            se.visit_mut(&format!("{prefix}se."), f);
        }
        if let Some(s) = &mut self.shortcut {
            s.visit_mut(prefix, f);
        }
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        let y = self.branch.output_shape(x)?;
        let id = match &self.shortcut {
            Some(s) => s.output_shape(x)?,
            None => x,
        };
        if y != id {
            return Err(Error::Shape(format!(
                "residual branch gives {y} but the shortcut gives {id} for input {x}"
            )));
        }
        Ok(y)
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        let y = self.output_shape(x)?;
        let mut total = self.branch.macs(x)?;
        if let Some(s) = &self.shortcut {
            total += s.macs(x)?;
        }
        if let Some(se) = &self.se {
            let at = if self.config.se.map(|s| s.position) == Some(SePosition::Pre) {
                x
            } else {
                y
            };
            total += se.macs(at)?;
        }
        Ok(total)
    }
}
