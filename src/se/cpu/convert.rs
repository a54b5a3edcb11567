//! Conversions between f16 / bf16 and f32 in bulk, through small stack buffers.

use super::*;

/// True when `T` is f32 itself (so its slices are borrowed, not converted).
#[inline(always)]
pub(super) fn is_f32<T: Element>() -> bool {
    T::DTYPE == DType::F32 && size_of::<T>() == 4
}

/// Widens `src` into `dst` (same length), in bulk.
#[inline(always)]
pub(super) fn load<T: Element>(src: &[T], dst: &mut [f32]) {
    match T::DTYPE {
        DType::F32 if size_of::<T>() == 4 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 if size_of::<T>() == 2 => {
            bytemuck::cast_slice::<T, f16>(src).convert_to_f32_slice(dst)
        }
        DType::BF16 if size_of::<T>() == 2 => {
            for (d, &b) in dst.iter_mut().zip(bytemuck::cast_slice::<T, u16>(src)) {
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
}

/// Rounds `src` into `dst` (same length, round to nearest even), in bulk.
#[inline(always)]
pub(super) fn store<T: Element>(src: &[f32], dst: &mut [T]) {
    match T::DTYPE {
        DType::F32 if size_of::<T>() == 4 => {
            bytemuck::cast_slice_mut::<T, f32>(dst).copy_from_slice(src)
        }
        DType::F16 if size_of::<T>() == 2 => {
            bytemuck::cast_slice_mut::<T, f16>(dst).convert_from_f32_slice(src)
        }
        DType::BF16 if size_of::<T>() == 2 => {
            for (d, &v) in bytemuck::cast_slice_mut::<T, u16>(dst).iter_mut().zip(src) {
                *d = bf16_bits(v);
            }
        }
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = T::from_f32(v);
            }
        }
    }
}

/// `half::bf16::from_f32(v).to_bits()` in a form the compiler vectorises: round to nearest
/// even by adding 0x7fff plus the kept lowest bit; NaNs stay quiet NaNs.
#[inline(always)]
pub(super) fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// `src` as f32: borrowed when `T` is f32, else widened into `buf`.
#[inline(always)]
pub(super) fn view<'b, T: Element>(src: &'b [T], buf: &'b mut [f32; PIECE]) -> &'b [f32] {
    if is_f32::<T>() {
        bytemuck::cast_slice(src)
    } else {
        let b = &mut buf[..src.len()];
        load(src, b);
        b
    }
}

/// Runs `f` on `dst` as f32: directly when `T` is f32, else on `buf` (widened from `dst` first
/// when `load_old`) and rounded back.
#[inline(always)]
pub(super) fn emit<T: Element>(
    dst: &mut [T],
    buf: &mut [f32; PIECE],
    load_old: bool,
    f: impl FnOnce(&mut [f32]),
) {
    if is_f32::<T>() {
        f(bytemuck::cast_slice_mut(dst))
    } else {
        let b = &mut buf[..dst.len()];
        if load_old {
            load(dst, b);
        }
        f(b);
        store(b, dst);
    }
}
