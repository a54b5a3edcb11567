//! BN-Inception (Ioffe and Szegedy 2015, as ported from Caffe by Cadene) and the paper's
//! SE-Inception: SE on each Inception module's output.
//!
//! Layer names follow Cadene's `bninception` (`conv1_7x7_s2`, `inception_3a_1x1_bn`, ...);
//! each module's SE is `inception_3a_se.fc1` / `.fc2`.

use crate::error::Result;
use crate::nn::backend::ActTensor;
use crate::nn::backend::{Backend, ConvGeom, PoolGeom};
use crate::nn::blocks::SeBlockConfig;
use crate::nn::chain::{Branch, Chain, Leaf};
use crate::nn::layers::{
    no_forward, AvgPool2d, BatchNorm2d, Conv2d, MaxPool2d, Module, Relu, SqueezeExcite,
};
use crate::nn::param::{Mode, Real, Visit, VisitMut};
use crate::tensor::Shape;

/// The pooling branch of an Inception module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InceptionPool {
    /// 3x3 average pool (stride 1, padding 1, ceil mode).
    Avg,
    /// 3x3 max pool (stride 1 and padding 1, or stride 2 and ceil mode when the module
    /// downsamples).
    Max,
}

/// One Inception module's widths (the BN-Inception paper's table 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InceptionSpec {
    /// Name stem, e.g. `3a`.
    pub name: &'static str,
    /// 1x1 branch width (0: no such branch).
    pub n1x1: usize,
    /// 3x3 branch: reduce width and output width.
    pub n3x3: (usize, usize),
    /// Double-3x3 branch: reduce width and output width (of both 3x3 convolutions).
    pub d3x3: (usize, usize),
    /// Pooling branch kind.
    pub pool: InceptionPool,
    /// Projection after the pool (0: the pooled input passes through).
    pub proj: usize,
    /// 1, or 2 for the downsampling modules (3c, 4e).
    pub stride: usize,
}

impl InceptionSpec {
    /// Output channels for `in_ch` input channels.
    pub fn out_channels(&self, in_ch: usize) -> usize {
        let pool = if self.proj == 0 { in_ch } else { self.proj };
        self.n1x1 + self.n3x3.1 + self.d3x3.1 + pool
    }
}

/// BN-Inception's ten modules.
pub const BN_INCEPTION: [InceptionSpec; 10] = {
    use InceptionPool::{Avg, Max};
    const fn m(
        name: &'static str,
        n1x1: usize,
        n3x3: (usize, usize),
        d3x3: (usize, usize),
        pool: InceptionPool,
        proj: usize,
        stride: usize,
    ) -> InceptionSpec {
        InceptionSpec {
            name,
            n1x1,
            n3x3,
            d3x3,
            pool,
            proj,
            stride,
        }
    }
    [
        m("3a", 64, (64, 64), (64, 96), Avg, 32, 1),
        m("3b", 64, (64, 96), (64, 96), Avg, 64, 1),
        m("3c", 0, (128, 160), (64, 96), Max, 0, 2),
        m("4a", 224, (64, 96), (96, 128), Avg, 128, 1),
        m("4b", 192, (96, 128), (96, 128), Avg, 128, 1),
        m("4c", 160, (128, 160), (128, 160), Avg, 128, 1),
        m("4d", 96, (128, 192), (160, 192), Avg, 128, 1),
        m("4e", 0, (128, 192), (192, 256), Max, 0, 2),
        m("5a", 352, (192, 320), (160, 224), Avg, 128, 1),
        m("5b", 352, (192, 320), (192, 224), Max, 128, 1),
    ]
};

/// Appends `conv -> bn -> relu` named `<name>`, `<name>_bn`, `<relu>`.
pub(crate) fn conv_bn_relu<E: Real, L: From<Leaf<E>>>(
    s: &mut Chain<L>,
    name: &str,
    relu: &str,
    g: ConvGeom,
) -> Result<()> {
    s.push(name, Leaf::Conv2d(Conv2d::new(g, true)).into());
    s.push(
        format!("{name}_bn"),
        Leaf::BatchNorm2d(BatchNorm2d::new(g.out_ch)).into(),
    );
    s.push(relu, Leaf::Relu(Relu::new()).into());
    Ok(())
}

/// An Inception module: parallel branches concatenated along channels, then SE (if any).
#[derive(Clone, Debug)]
pub struct InceptionModule<E> {
    branches: Vec<Branch<E>>,
    se: Option<(String, SqueezeExcite<E>)>,
    sizes: Option<Vec<usize>>,
}

impl<E: Real> InceptionModule<E> {
    /// The parallel branches, in concatenation order.
    pub fn branches(&self) -> &[Branch<E>] {
        &self.branches
    }

    /// Builds module `spec` for `in_ch` input channels, with SE on its output if `se` is set.
    pub fn new(spec: &InceptionSpec, in_ch: usize, se: Option<SeBlockConfig>) -> Result<Self> {
        let p = format!("inception_{}_", spec.name);
        let s = spec.stride;
        let mut branches = Vec::new();
        if spec.n1x1 > 0 {
            let mut b = Branch::new();
            conv_bn_relu(
                &mut b,
                &format!("{p}1x1"),
                &format!("{p}relu_1x1"),
                ConvGeom::new(in_ch, spec.n1x1, 1, 1, 0, 1)?,
            )?;
            branches.push(b);
        }
        let mut b = Branch::new();
        conv_bn_relu(
            &mut b,
            &format!("{p}3x3_reduce"),
            &format!("{p}relu_3x3_reduce"),
            ConvGeom::new(in_ch, spec.n3x3.0, 1, 1, 0, 1)?,
        )?;
        conv_bn_relu(
            &mut b,
            &format!("{p}3x3"),
            &format!("{p}relu_3x3"),
            ConvGeom::new(spec.n3x3.0, spec.n3x3.1, 3, s, 1, 1)?,
        )?;
        branches.push(b);
        let mut b = Branch::new();
        conv_bn_relu(
            &mut b,
            &format!("{p}double_3x3_reduce"),
            &format!("{p}relu_double_3x3_reduce"),
            ConvGeom::new(in_ch, spec.d3x3.0, 1, 1, 0, 1)?,
        )?;
        conv_bn_relu(
            &mut b,
            &format!("{p}double_3x3_1"),
            &format!("{p}relu_double_3x3_1"),
            ConvGeom::new(spec.d3x3.0, spec.d3x3.1, 3, 1, 1, 1)?,
        )?;
        conv_bn_relu(
            &mut b,
            &format!("{p}double_3x3_2"),
            &format!("{p}relu_double_3x3_2"),
            ConvGeom::new(spec.d3x3.1, spec.d3x3.1, 3, s, 1, 1)?,
        )?;
        branches.push(b);
        let geom = if s == 1 {
            PoolGeom::new(3, 1, 1, true)?
        } else {
            PoolGeom::new(3, s, 0, true)?
        };
        let pool = match spec.pool {
            InceptionPool::Avg => Leaf::AvgPool2d(AvgPool2d::new(geom)),
            InceptionPool::Max => Leaf::MaxPool2d(MaxPool2d::new(geom)),
        };
        let mut b = Branch::new().with(format!("{p}pool"), pool);
        if spec.proj > 0 {
            conv_bn_relu(
                &mut b,
                &format!("{p}pool_proj"),
                &format!("{p}relu_pool_proj"),
                ConvGeom::new(in_ch, spec.proj, 1, 1, 0, 1)?,
            )?;
        }
        branches.push(b);
        let se = match se {
            Some(o) => Some((
                format!("{p}se."),
                SqueezeExcite::new(o.config(spec.out_channels(in_ch))?)?,
            )),
            None => None,
        };
        Ok(InceptionModule {
            branches,
            se,
            sizes: None,
        })
    }
}

impl<E: Real> Module<E> for InceptionModule<E> {
    fn forward<B: Backend<E>>(&mut self, b: &B, x: B::T, mode: Mode) -> Result<B::T> {
        let mut outs = Vec::with_capacity(self.branches.len());
        let last = self.branches.len() - 1;
        let mut x = Some(x);
        for (i, br) in self.branches.iter_mut().enumerate() {
            let input = if i == last {
                x.take().ok_or_else(|| no_forward("inception"))?
            } else {
                x.as_ref().ok_or_else(|| no_forward("inception"))?.clone()
            };
            outs.push(br.forward(b, input, mode)?);
        }
        self.sizes = mode
            .records()
            .then(|| outs.iter().map(|t| t.shape().c).collect());
        let y = b.concat_channels(&outs)?;
        match &mut self.se {
            Some((_, se)) => se.forward(b, y, mode),
            None => Ok(y),
        }
    }

    fn backward<B: Backend<E>>(&mut self, b: &B, dy: B::T) -> Result<B::T> {
        let sizes = self.sizes.take().ok_or_else(|| no_forward("inception"))?;
        let dy = match &mut self.se {
            Some((_, se)) => se.backward(b, dy)?,
            None => dy,
        };
        let parts = b.split_channels(&dy, &sizes)?;
        let mut dx: Option<B::T> = None;
        for (br, d) in self.branches.iter_mut().zip(parts) {
            let g = br.backward(b, d)?;
            dx = Some(match dx {
                Some(acc) => b.add(acc, &g, false)?,
                None => g,
            });
        }
        dx.ok_or_else(|| no_forward("inception"))
    }

    fn visit<'a>(&'a self, prefix: &str, f: Visit<'a, '_, E>) {
        for br in &self.branches {
            br.visit(prefix, f);
        }
        if let Some((name, se)) = &self.se {
            se.visit(&format!("{prefix}{name}"), f);
        }
    }

    fn visit_mut<'a>(&'a mut self, prefix: &str, f: VisitMut<'a, '_, E>) {
        for br in &mut self.branches {
            br.visit_mut(prefix, f);
        }
        if let Some((name, se)) = &mut self.se {
            se.visit_mut(&format!("{prefix}{name}"), f);
        }
    }

    fn output_shape(&self, x: Shape) -> Result<Shape> {
        let mut c = 0;
        let mut first: Option<Shape> = None;
        for br in &self.branches {
            let s = br.output_shape(x)?;
            if let Some(f) = first {
                if (f.h, f.w) != (s.h, s.w) {
                    return Err(crate::Error::Shape(format!(
                        "inception branches disagree: {f} vs {s} for input {x}"
                    )));
                }
            }
            first = Some(s);
            c += s.c;
        }
        let f = first.ok_or_else(|| crate::Error::Shape("inception without branches".into()))?;
        Ok(Shape::new(x.n, c, f.h, f.w))
    }

    fn macs(&self, x: Shape) -> Result<u64> {
        let mut total = 0;
        for br in &self.branches {
            total += br.macs(x)?;
        }
        if let Some((_, se)) = &self.se {
            total += se.macs(self.output_shape(x)?)?;
        }
        Ok(total)
    }
}
