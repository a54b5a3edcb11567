//! Max and average pooling: geometry checks, kernel arguments and grids in both layouts.

use super::*;

impl<A: NnAct> Cuda<A> {
    pub(super) fn pool_args(g: &PoolGeom, xs: Shape, ys: Shape) -> Result<[u32; 8]> {
        Ok([
            small("planes", xs.n * xs.c)?,
            small("pool input height", xs.h)?,
            small("pool input width", xs.w)?,
            small("pool output height", ys.h)?,
            small("pool output width", ys.w)?,
            small("pool kernel", g.kernel)?,
            small("pool stride", g.stride)?,
            small("pool padding", g.padding)?,
        ])
    }

    /// The grid of a pooling kernel over the pixels of `s` (nc planes): (pixels, planes) for
    /// NCHW, flat for NHWC (the kernels' for_each_pixel).
    pub(super) fn pool_grid(&self, s: Shape, nc: u32) -> Result<(u32, u32, u32)> {
        Ok(match self.layout {
            Layout::Nchw => (
                grid_x(s.hw(), THREADS as usize)?,
                (nc as usize).clamp(1, self.max_yz()) as u32,
                1,
            ),
            Layout::Nhwc => (blocks(s.numel(), THREADS as usize), 1, 1),
        })
    }

    pub(super) fn check_pool_sizes(xs: Shape, ys: Shape, g: &PoolGeom) -> Result<()> {
        small("pool input plane", xs.hw())?;
        small("pool output plane", ys.hw())?;
        small(
            "pool extent",
            (ys.h.max(ys.w) + 1)
                .saturating_mul(g.stride)
                .saturating_add(g.kernel)
                .saturating_add(xs.h.max(xs.w))
                .saturating_add(g.padding),
        )?;
        Ok(())
    }
}
