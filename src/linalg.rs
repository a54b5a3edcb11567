//! Dense f32 matrix products for the CPU paths: a bounds-checked safe front for the `gemm`
//! crate (AVX-512 / AVX2 kernels chosen at run time, rayon-parallel on request).

use gemm::Parallelism;

/// `c (m x n) = a (m x k) * b (k x n)` (or `c += ...` with `acc`), each operand given by its
/// row and column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    acc: bool,
    par: Parallelism,
) {
    sgemm_scaled(m, n, k, c, a, b, acc, 1.0, par)
}

/// `c (m x n) = scale * a (m x k) * b (k x n)` (or `c += ...` with `acc`), each operand given by its
/// row and column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_scaled(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    acc: bool,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The extents each operand's strides reach must lie inside its slice.
    let reach = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows.saturating_sub(1)) * rs.unsigned_abs() + (cols.saturating_sub(1)) * cs.unsigned_abs()
    };
    assert!(c.len() > reach(m, n, n as isize, 1));
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.0.len() > reach(m, k, a.1, a.2));
    assert!(b.0.len() > reach(k, n, b.1, b.2));
    // SAFETY: the assertions above keep every access inside the three slices; `c` does not
    // alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}
