// Pooling: max pooling (with argmax indices), average pooling (PyTorch's padding and divisor
// rules), global average pooling, forward and backward, NCHW and NHWC. The Rust side:
// src/nn/backend/cuda/pooling.rs.
//
// Shared pieces (act_at, the tiled GEMM, block sums) are in nn_common.cuh; every kernel body is a
// template over the activation type, instantiated below as NAME_f32, NAME_bf16 and NAME_f16.
#include "nn_common.cuh"

namespace senet {
namespace nnk {

// clipped to the padded input only (PoolGeom::window in Rust).
__device__ __forceinline__ void pool_window(uint32_t o, uint32_t size, uint32_t k, uint32_t s, uint32_t pad,
                                            uint32_t& lo, uint32_t& hi, uint32_t& extent) {
    const int start = static_cast<int>(o * s) - static_cast<int>(pad);
    const int end_pad = min(start + static_cast<int>(k), static_cast<int>(size + pad));
    extent = static_cast<uint32_t>(end_pad - start);
    const int l = max(start, 0);
    const int h = max(min(start + static_cast<int>(k), static_cast<int>(size)), 0);
    lo = static_cast<uint32_t>(l);
    hi = static_cast<uint32_t>(max(h, l));
}

// ------------------------------------------------------------------------------ pooling

// Pooling kernels visit (plane, pixel) pairs, plane = sample * c + channel, through
// for_each_pixel: with NCHW on a (pixels, planes) grid, a warp on consecutive pixels of a plane;
// with NHWC on a flat grid-stride loop in storage order, a warp on consecutive channels of a
// pixel. Either way they read and write activations through act_at; max-pool indices and the
// average pool's divided gradients (internal) are in NCHW order whatever the layout.
template <class F>
__device__ __forceinline__ void for_each_pixel(uint32_t nhwc, uint32_t nc, uint32_t c, uint32_t npix, F f) {
    if (nhwc) {
        const uint64_t total = static_cast<uint64_t>(nc) * npix;
        for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
             i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
            const uint32_t ch = static_cast<uint32_t>(i % c);
            const uint64_t rest = i / c;
            const uint32_t pix = static_cast<uint32_t>(rest % npix), smp = static_cast<uint32_t>(rest / npix);
            f(smp * c + ch, pix);
        }
    } else {
        const uint32_t r = blockIdx.x * blockDim.x + threadIdx.x;
        if (r >= npix) return;
        for (uint32_t plane = blockIdx.y; plane < nc; plane += gridDim.y) f(plane, r);
    }
}

// Max pooling, one thread per output: the first maximum wins, a NaN replaces any value (as the
// reference does). `arg` gets the flat NCHW input index.
template <class T>
__device__ __forceinline__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ y, uint32_t* __restrict__ arg,
                                            uint32_t nc, uint32_t c, uint32_t h, uint32_t w, uint32_t oh,
                                            uint32_t ow, uint32_t k, uint32_t s, uint32_t pad, uint32_t nhwc) {
    const uint64_t in_hw = static_cast<uint64_t>(h) * w, out_hw = static_cast<uint64_t>(oh) * ow;
    for_each_pixel(nhwc, nc, c, oh * ow, [&](uint32_t plane, uint32_t r) {
        const uint32_t smp = plane / c, ch = plane % c;
        uint32_t h0, h1, w0, w1, e;
        pool_window(r / ow, h, k, s, pad, h0, h1, e);
        pool_window(r % ow, w, k, s, pad, w0, w1, e);
        bool any = false;
        float best = 0.0f;
        uint32_t bp = 0;
        for (uint32_t ih = h0; ih < h1; ++ih)
            for (uint32_t iw = w0; iw < w1; ++iw) {
                const uint32_t pix = ih * w + iw;
                const float v = to_f32(x[act_at(nhwc, smp, ch, pix, c, in_hw)]);
                if (!any || v > best || v != v) {  // v != v: NaN
                    any = true;
                    best = v;
                    bp = pix;
                }
            }
        y[act_at(nhwc, smp, ch, r, c, out_hw)] = from_f32<T>(best);
        arg[static_cast<uint64_t>(plane) * out_hw + r] = static_cast<uint32_t>(plane * in_hw + bp);
    });
}

// The outputs whose pooling window (PyTorch's, pool_window) covers input position i along one
// axis: [lo, hi] (empty when lo > hi). Sizes fit in int (the host checks).
__device__ __forceinline__ void covering(uint32_t i, uint32_t out, uint32_t k, uint32_t s, uint32_t pad, int& lo,
                                         int& hi) {
    const int ki = static_cast<int>(k), si = static_cast<int>(s);
    const int t = static_cast<int>(i + pad);
    lo = t >= ki ? (t - ki) / si + 1 : 0;
    hi = min(t / si, static_cast<int>(out) - 1);
}

// Max pooling backward as a gather, one thread per input element: the gradients of the outputs
// whose recorded maximum is this element, added in output order (f32, then one rounding), so
// results repeat bit for bit and no index can send a write astray.
template <class T>
__device__ __forceinline__ void maxpool_bwd(const T* __restrict__ dy, const uint32_t* __restrict__ arg,
                                            T* __restrict__ dx, uint32_t nc, uint32_t c, uint32_t h, uint32_t w,
                                            uint32_t oh, uint32_t ow, uint32_t k, uint32_t s, uint32_t pad,
                                            uint32_t nhwc) {
    const uint64_t in_hw = static_cast<uint64_t>(h) * w, out_hw = static_cast<uint64_t>(oh) * ow;
    for_each_pixel(nhwc, nc, c, h * w, [&](uint32_t plane, uint32_t r) {
        const uint32_t smp = plane / c, ch = plane % c;
        const uint32_t ih = r / w, iw = r % w;
        const uint64_t me = plane * in_hw + r;
        int a0, a1, b0, b1;
        covering(ih, oh, k, s, pad, a0, a1);
        covering(iw, ow, k, s, pad, b0, b1);
        float t = 0.0f;
        for (int a = a0; a <= a1; ++a)
            for (int b = b0; b <= b1; ++b) {
                const uint32_t o = static_cast<uint32_t>(a) * ow + static_cast<uint32_t>(b);
                if (arg[plane * out_hw + o] == me) t += to_f32(dy[act_at(nhwc, smp, ch, o, c, out_hw)]);
            }
        dx[act_at(nhwc, smp, ch, r, c, in_hw)] = from_f32<T>(t);
    });
}

__device__ __forceinline__ float avg_divisor(uint32_t include_pad, uint32_t h0, uint32_t h1, uint32_t w0,
                                             uint32_t w1, uint32_t eh, uint32_t ew) {
    // Products in float: a huge padded window must not wrap a 32-bit integer.
    return include_pad ? static_cast<float>(eh) * static_cast<float>(ew)
                       : static_cast<float>(h1 - h0) * static_cast<float>(w1 - w0);
}

// Average pooling, one thread per output.
template <class T>
__device__ __forceinline__ void avgpool_fwd(const T* __restrict__ x, T* __restrict__ y, uint32_t nc, uint32_t c,
                                            uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k,
                                            uint32_t s, uint32_t pad, uint32_t include_pad, uint32_t nhwc) {
    const uint64_t in_hw = static_cast<uint64_t>(h) * w, out_hw = static_cast<uint64_t>(oh) * ow;
    for_each_pixel(nhwc, nc, c, oh * ow, [&](uint32_t pl, uint32_t r) {
        const uint32_t smp = pl / c, ch = pl % c;
        uint32_t h0, h1, w0, w1, eh, ew;
        pool_window(r / ow, h, k, s, pad, h0, h1, eh);
        pool_window(r % ow, w, k, s, pad, w0, w1, ew);
        float t = 0.0f;
        for (uint32_t ih = h0; ih < h1; ++ih)
            for (uint32_t iw = w0; iw < w1; ++iw) t += to_f32(x[act_at(nhwc, smp, ch, ih * w + iw, c, in_hw)]);
        y[act_at(nhwc, smp, ch, r, c, out_hw)] = from_f32<T>(t / avg_divisor(include_pad, h0, h1, w0, w1, eh, ew));
    });
}

// Average pooling backward, step 1: each output's gradient divided by its window's divisor
// (into an f32 buffer, NCHW order).
template <class T>
__device__ __forceinline__ void avgpool_div(const T* __restrict__ dy, float* __restrict__ q, uint32_t nc, uint32_t c,
                                            uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k,
                                            uint32_t s, uint32_t pad, uint32_t include_pad, uint32_t nhwc) {
    const uint64_t out_hw = static_cast<uint64_t>(oh) * ow;
    for_each_pixel(nhwc, nc, c, oh * ow, [&](uint32_t pl, uint32_t r) {
        uint32_t h0, h1, w0, w1, eh, ew;
        pool_window(r / ow, h, k, s, pad, h0, h1, eh);
        pool_window(r % ow, w, k, s, pad, w0, w1, ew);
        const float div = avg_divisor(include_pad, h0, h1, w0, w1, eh, ew);
        q[static_cast<uint64_t>(pl) * out_hw + r] = to_f32(dy[act_at(nhwc, pl / c, pl % c, r, c, out_hw)]) / div;
    });
}

// Average pooling backward, step 2: one thread per input element gathers the divided gradients
// of every output window that covers it (no atomics).
template <class T>
__device__ __forceinline__ void avgpool_bwd(const float* __restrict__ q, T* __restrict__ dx, uint32_t nc, uint32_t c,
                                            uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k,
                                            uint32_t s, uint32_t pad, uint32_t nhwc) {
    for_each_pixel(nhwc, nc, c, h * w, [&](uint32_t pl, uint32_t r) {
        const uint64_t plane = pl;
        const uint32_t ih = r / w, iw = r % w;
        int a0, a1, b0, b1;
        covering(ih, oh, k, s, pad, a0, a1);
        covering(iw, ow, k, s, pad, b0, b1);
        float t = 0.0f;
        for (int a = a0; a <= a1; ++a) {
            uint32_t h0, h1, eh;
            pool_window(static_cast<uint32_t>(a), h, k, s, pad, h0, h1, eh);
            if (ih < h0 || ih >= h1) continue;
            for (int b = b0; b <= b1; ++b) {
                uint32_t w0, w1, ew;
                pool_window(static_cast<uint32_t>(b), w, k, s, pad, w0, w1, ew);
                if (iw < w0 || iw >= w1) continue;
                t += q[(plane * oh + a) * ow + b];
            }
        }
        dx[act_at(nhwc, pl / c, pl % c, r, c, static_cast<uint64_t>(h) * w)] = from_f32<T>(t);
    });
}

// Global average pooling, f64 sums. NCHW: one block per (sample, channel) plane; NHWC: one
// thread per plane, adjacent threads on adjacent channels, summing its pixels in order. The
// output [n, c, 1, 1] is the same in both layouts.
template <class T>
__device__ __forceinline__ void gap_fwd(const T* __restrict__ x, T* __restrict__ y, uint32_t nc, uint32_t c,
                                        uint64_t hw, uint32_t nhwc) {
    if (nhwc) {
        for (uint64_t pl = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pl < nc;
             pl += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
            const uint64_t smp = pl / c, ch = pl % c;
            double t = 0.0;
            for (uint64_t i = 0; i < hw; ++i) t += to_f32(x[(smp * hw + i) * c + ch]);
            y[pl] = from_f32<T>(static_cast<float>(t / static_cast<double>(hw)));
        }
        return;
    }
    const uint64_t pl = blockIdx.x;
    double t = 0.0;
    for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) t += to_f32(x[pl * hw + i]);
    t = block_sum(t);
    if (threadIdx.x == 0) y[pl] = from_f32<T>(static_cast<float>(t / static_cast<double>(hw)));
}

// Global average pooling backward: dx = dy[plane] / hw.
template <class T>
__device__ __forceinline__ void gap_bwd(const T* __restrict__ dy, T* __restrict__ dx, uint64_t total, uint32_t c,
                                        uint64_t hw, uint32_t nhwc) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint64_t plane = nhwc ? (i / (hw * c)) * c + i % c : i / hw;
        dx[i] = from_f32<T>(to_f32(dy[plane]) / static_cast<float>(hw));
    }
}

// dst = src in the other layout: NCHW -> NHWC when `to_nhwc`, else NHWC -> NCHW (one thread per
// destination element).

}  // namespace nnk
}  // namespace senet

using namespace senet;
using namespace senet::nnk;

// One extern "C" kernel per activation type: nn_..._f32, nn_..._bf16 and nn_..._f16.
#define SENET_NN_POOL_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_maxpool_fwd_##NAME(const T* __restrict__ x, T* __restrict__ y, uint32_t* __restrict__ arg, uint32_t nc, \
                              uint32_t c, uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k,            \
                              uint32_t s, uint32_t pad, uint32_t nhwc) {                                           \
        maxpool_fwd<T>(x, y, arg, nc, c, h, w, oh, ow, k, s, pad, nhwc);                                           \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_maxpool_fwd_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_maxpool_bwd_##NAME(const T* __restrict__ dy, const uint32_t* __restrict__ arg, T* __restrict__ dx,      \
                              uint32_t nc, uint32_t c, uint32_t h, uint32_t w, uint32_t oh, uint32_t ow,           \
                              uint32_t k, uint32_t s, uint32_t pad, uint32_t nhwc) {                               \
        maxpool_bwd<T>(dy, arg, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc);                                         \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_maxpool_bwd_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_avgpool_fwd_##NAME(const T* __restrict__ x, T* __restrict__ y, uint32_t nc, uint32_t c, uint32_t h,     \
                              uint32_t w, uint32_t oh, uint32_t ow, uint32_t k, uint32_t s, uint32_t pad,          \
                              uint32_t include_pad, uint32_t nhwc) {                                               \
        avgpool_fwd<T>(x, y, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc);                                   \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_avgpool_fwd_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_avgpool_div_##NAME(const T* __restrict__ dy, float* __restrict__ q, uint32_t nc, uint32_t c,            \
                              uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k, uint32_t s,            \
                              uint32_t pad, uint32_t include_pad, uint32_t nhwc) {                                 \
        avgpool_div<T>(dy, q, nc, c, h, w, oh, ow, k, s, pad, include_pad, nhwc);                                  \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_avgpool_div_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_avgpool_bwd_##NAME(const float* __restrict__ q, T* __restrict__ dx, uint32_t nc, uint32_t c,            \
                              uint32_t h, uint32_t w, uint32_t oh, uint32_t ow, uint32_t k, uint32_t s,            \
                              uint32_t pad, uint32_t nhwc) {                                                       \
        avgpool_bwd<T>(q, dx, nc, c, h, w, oh, ow, k, s, pad, nhwc);                                               \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_avgpool_bwd_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_gap_fwd_##NAME(const T* __restrict__ x, T* __restrict__ y, uint32_t nc, uint32_t c, uint64_t hw,        \
                          uint32_t nhwc) {                                                                         \
        gap_fwd<T>(x, y, nc, c, hw, nhwc);                                                                         \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_gap_fwd_##NAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_gap_bwd_##NAME(const T* __restrict__ dy, T* __restrict__ dx, uint64_t total, uint32_t c, uint64_t hw,   \
                          uint32_t nhwc) {                                                                         \
        gap_bwd<T>(dy, dx, total, c, hw, nhwc);                                                                    \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_gap_bwd_##NAME)

SENET_NN_POOL_KERNELS(f32, float)
SENET_NN_POOL_KERNELS(bf16, __nv_bfloat16)
SENET_NN_POOL_KERNELS(f16, __half)
