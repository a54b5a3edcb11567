//! Shapes, memory layouts, element types and a plain host tensor.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

/// Memory layout of a 4-d activation tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[n][c][h][w]`: each channel's plane is contiguous (PyTorch's default).
    Nchw,
    /// `[n][h][w][c]`: each pixel's channels are contiguous (channels-last).
    Nhwc,
}

impl Layout {
    /// Both layouts, for tests and benchmarks that sweep them.
    pub const ALL: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

    /// Lower-case name (`nchw`, `nhwc`).
    pub fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            _ => Err(Error::Config(format!(
                "unknown layout `{s}` (nchw or nhwc)"
            ))),
        }
    }
}

/// A vector of `len` copies of `value`, or [`Error::OutOfMemory`] naming `what` when the memory
/// cannot be had (sizes that come from a caller must not abort the process).
pub(crate) fn try_vec<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve(&mut v, len, what)?;
    advise_huge_pages(v.spare_capacity_mut());
    v.resize(len, value);
    Ok(v)
}

/// `len` zeros from the allocator's zeroed memory, advised for huge pages, or
/// [`Error::OutOfMemory`] naming `what`. A large block comes from `calloc` straight from the OS,
/// already zero: nothing writes it twice (once to zero it, once with the result), and its pages
/// are faulted in by whichever threads write them first, in parallel.
pub(crate) fn try_zeros<T: bytemuck::Zeroable>(len: usize, what: &str) -> Result<Vec<T>> {
    let v =
        bytemuck::allocation::try_zeroed_vec(len).map_err(|()| out_of_memory::<T>(len, what))?;
    advise_huge_pages(&v);
    Ok(v)
}

/// Asks the OS for transparent huge pages on a freshly allocated buffer (its 2 MiB-aligned part)
/// before anything writes to it; buffers under 4 MiB are left alone.
///
/// A fresh large allocation is mapped lazily: the first write to each 4 KiB page faults into the
/// kernel, which zeroes it. For a 100 MB activation that is 25,000 faults, several times the SE
/// op's own time on the CPU (benches/results/2026-12-04-torch-op-cpu.md). With huge pages it is
/// 50. senet's own outputs ([`Tensor::zeros`], the candle op's and the PyTorch op's outputs) are
/// advised; a caller that allocates its own outputs can advise them too. Advisory only: it
/// changes no contents, errors are ignored, and it does nothing off Linux or where the system
/// disables transparent huge pages.
pub fn advise_huge_pages<T>(buf: &[T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(buf);
    if bytes < 2 * HUGE {
        return;
    }
    let ptr = buf.as_ptr() as usize;
    let start = ptr.next_multiple_of(HUGE);
    let end = (ptr + bytes) / HUGE * HUGE;
    if end > start {
        #[cfg(target_os = "linux")]
        // SAFETY: [start, end) lies inside `buf`'s allocation; MADV_HUGEPAGE changes no contents
        // and no mapping the program can observe.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Reserves room for `extra` more elements, or [`Error::OutOfMemory`] naming `what`.
pub(crate) fn reserve<T>(v: &mut Vec<T>, extra: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(extra)
        .map_err(|_| out_of_memory::<T>(extra, what))
}

/// [`Error::OutOfMemory`] for `len` elements of `T`, naming `what`.
fn out_of_memory<T>(len: usize, what: &str) -> Error {
    Error::OutOfMemory {
        what: what.to_string(),
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    }
}

/// Logical shape of an activation tensor: batch, channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Shape {
    /// A shape; call [`Shape::validate`] (or use [`Shape::try_new`]) before trusting it.
    pub const fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Shape { n, c, h, w }
    }

    /// A validated shape: every dimension non-zero and the element count fits in `usize`.
    pub fn try_new(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let s = Shape::new(n, c, h, w);
        s.validate()?;
        Ok(s)
    }

    /// Checks every dimension is non-zero and the element count does not overflow.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.c == 0 || self.h == 0 || self.w == 0 {
            return Err(Error::Shape(format!("{self} has a zero-sized dimension")));
        }
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(self.h))
            .and_then(|v| v.checked_mul(self.w))
            .ok_or_else(|| Error::Shape(format!("{self} overflows the element count")))?;
        Ok(())
    }

    /// Spatial size `h * w`.
    pub const fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Number of elements.
    pub const fn numel(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Elements in one sample (`c * h * w`).
    pub const fn sample_numel(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Flat offset of element `(n, c, p)` (`p = h * w_dim + w`) in `layout`.
    #[inline(always)]
    pub fn offset(&self, layout: Layout, n: usize, c: usize, p: usize) -> usize {
        match layout {
            Layout::Nchw => (n * self.c + c) * self.hw() + p,
            Layout::Nhwc => (n * self.hw() + p) * self.c + c,
        }
    }
}

impl std::str::FromStr for Shape {
    type Err = Error;
    /// Parses `NxCxHxW` (as printed by `Display`), validated.
    fn from_str(s: &str) -> Result<Self> {
        let dims: Vec<usize> = s
            .split('x')
            .map(|d| d.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Config(format!("shape `{s}`: expected NxCxHxW")))?;
        match dims[..] {
            [n, c, h, w] => Shape::try_new(n, c, h, w),
            _ => Err(Error::Config(format!("shape `{s}`: expected NxCxHxW"))),
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}x{}", self.n, self.c, self.h, self.w)
    }
}

/// Run-time tag of an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
    /// 64-bit IEEE float (reference and gradient checks only).
    F64,
}

impl DType {
    /// Lower-case name (`f32`, `f16`, `bf16`, `f64`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    /// The relative-L2 tolerance DESIGN.md sets for outputs in this type.
    pub fn output_tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1e-2,
            DType::F64 => 1e-12,
        }
    }

    /// The relative-L2 tolerance for gradients in this type.
    pub fn grad_tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-4,
            DType::F16 => 2e-3,
            DType::BF16 => 1e-2,
            DType::F64 => 1e-10,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            "f64" => Ok(DType::F64),
            _ => Err(Error::Config(format!(
                "unknown dtype `{s}` (f32, f16, bf16)"
            ))),
        }
    }
}

/// An activation element type: `f32`, `half::f16`, `half::bf16`, and `f64` for the reference.
///
/// Weights and accumulation are always f32 (f64 in the reference) whatever the element type.
pub trait Element:
    Copy + Default + Send + Sync + PartialEq + fmt::Debug + bytemuck::Pod + 'static
{
    /// The run-time tag.
    const DTYPE: DType;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Rounds from f32 (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Rounds from f64.
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// A host tensor: a shape, a layout, and its elements in that layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Shape,
    layout: Layout,
    data: Vec<T>,
}

impl<T: Element> Tensor<T> {
    /// Wraps `data`, checking the shape and that `data` holds exactly `shape.numel()` elements.
    pub fn from_vec(shape: Shape, layout: Layout, data: Vec<T>) -> Result<Self> {
        shape.validate()?;
        if data.len() != shape.numel() {
            return Err(Error::Length {
                what: "tensor data",
                got: data.len(),
                expected: shape.numel(),
            });
        }
        Ok(Tensor {
            shape,
            layout,
            data,
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Shape, layout: Layout) -> Result<Self> {
        shape.validate()?;
        Ok(Tensor {
            shape,
            layout,
            data: try_zeros(shape.numel(), "a host tensor")?,
        })
    }

    /// A tensor of values drawn uniformly from `[-1, 1)` with a seeded generator, rounded to `T`.
    pub fn random(shape: Shape, layout: Layout, seed: u64) -> Result<Self> {
        shape.validate()?;
        // Fallible first, so a size no machine has is an error rather than an abort.
        let mut data = try_vec(0, T::default(), "a host tensor")?;
        reserve(&mut data, shape.numel(), "a host tensor")?;
        let mut values = crate::rng::uniform_stream(-1.0, 1.0, seed);
        data.extend((0..shape.numel()).map(|_| T::from_f32(values())));
        Ok(Tensor {
            shape,
            layout,
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The elements, in layout order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The elements, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }

    /// The element at `(n, c, h, w)`.
    pub fn get(&self, n: usize, c: usize, h: usize, w: usize) -> T {
        self.data[self.shape.offset(self.layout, n, c, h * self.shape.w + w)]
    }

    /// The same values in another layout (a copy; the same tensor if the layout matches).
    pub fn to_layout(&self, layout: Layout) -> Tensor<T> {
        if layout == self.layout {
            return self.clone();
        }
        let s = self.shape;
        let mut data = vec![T::default(); s.numel()];
        for n in 0..s.n {
            for c in 0..s.c {
                for p in 0..s.hw() {
                    data[s.offset(layout, n, c, p)] = self.data[s.offset(self.layout, n, c, p)];
                }
            }
        }
        Tensor {
            shape: s,
            layout,
            data,
        }
    }

    /// The same values converted to another element type (rounding through f64).
    pub fn cast<U: Element>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape,
            layout: self.layout,
            data: self.data.iter().map(|v| U::from_f64(v.to_f64())).collect(),
        }
    }

    /// The elements widened to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data.iter().map(|v| v.to_f64()).collect()
    }
}

/// Relative L2 error `||out - reference|| / ||reference||`; `inf` if any value is NaN or the
/// lengths differ. A zero reference gives the absolute error norm.
pub fn rel_l2_error(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() || r.is_nan() {
            return f64::INFINITY;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_and_huge_page_advice() {
        // Large enough to be advised (and mapped fresh), in every element type.
        let n = 3 << 20;
        let a: Vec<f32> = try_zeros(n, "test").unwrap();
        assert!(a.len() == n && a.iter().all(|v| v.to_bits() == 0));
        let b: Vec<bf16> = try_zeros(n + 1, "test").unwrap();
        assert!(b.len() == n + 1 && b.iter().all(|v| v.to_bits() == 0));
        let t = Tensor::<f16>::zeros(Shape::new(1, 3, 1024, 1024), Layout::Nhwc).unwrap();
        assert!(t.data().iter().all(|v| v.to_bits() == 0));
        // Advice on small, empty and unaligned slices is a no-op, never a fault.
        advise_huge_pages::<f32>(&[]);
        advise_huge_pages(&a[1..17]);
        advise_huge_pages(&b[3..]);
        // An allocation the system cannot give is an error, not an abort.
        match try_zeros::<f64>(usize::MAX / 16, "the impossible") {
            Err(Error::OutOfMemory { what, .. }) => assert_eq!(what, "the impossible"),
            other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
        }
    }

    #[test]
    fn zero_dims_and_overflow_are_errors() {
        assert!(Shape::try_new(0, 3, 4, 4).is_err());
        assert!(Shape::try_new(1, 3, 4, 0).is_err());
        assert!(Shape::try_new(usize::MAX, 2, 1, 1).is_err());
        assert!(Shape::try_new(2, 3, 4, 5).is_ok());
    }

    #[test]
    fn shapes_parse_and_print() {
        let s: Shape = "2x3x4x5".parse().unwrap();
        assert_eq!(s, Shape::new(2, 3, 4, 5));
        assert_eq!(s.to_string().parse::<Shape>().unwrap(), s);
        assert!("2x3x4".parse::<Shape>().is_err());
        assert!("2x0x4x5".parse::<Shape>().is_err());
        assert!("2xax4x5".parse::<Shape>().is_err());
    }

    #[test]
    fn offsets_follow_layouts() {
        let s = Shape::new(2, 3, 2, 2);
        assert_eq!(
            s.offset(Layout::Nchw, 1, 2, 3),
            (3 + 2) * 4 + 3 /* (n*C + c)*HW + p */
        );
        assert_eq!(
            s.offset(Layout::Nhwc, 1, 2, 3),
            (4 + 3) * 3 + 2 /* (n*HW + p)*C + c */
        );
    }

    #[test]
    fn layout_round_trip() {
        let t = Tensor::<f32>::random(Shape::new(2, 5, 3, 3), Layout::Nchw, 7).unwrap();
        let u = t.to_layout(Layout::Nhwc);
        assert_ne!(t.data(), u.data());
        assert_eq!(t.get(1, 4, 2, 1), u.get(1, 4, 2, 1));
        assert_eq!(u.to_layout(Layout::Nchw), t);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let e = Tensor::<f32>::from_vec(Shape::new(1, 2, 2, 2), Layout::Nchw, vec![0.0; 7]);
        assert!(matches!(
            e,
            Err(Error::Length {
                got: 7,
                expected: 8,
                ..
            })
        ));
    }

    #[test]
    fn rel_error_rejects_nan() {
        assert_eq!(rel_l2_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_l2_error(&[f64::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_l2_error(&[1.0], &[1.0, 2.0]).is_infinite());
    }
}
