// The squeeze family: reductions over H*W for each (sample, channel).
//
// Forward (pool):  z[n,c]  = (1/HW) * sum_hw x
// Backward (dgate): ds[n,c] = sum_hw g * x, with g = dy (or dy through the epilogue's ReLU mask,
//                   recomputed from x, s and the residual, and written out as d residual);
//                   the kernel emits dg = ds * gate'(s) directly.
//
// One pass over the inputs, f32 accumulation, and a fixed summation order everywhere: when a
// (sample, channel) is split across blocks along H*W, each block writes a partial and the last
// block to arrive (an integer ticket) adds the partials in split order, so every run gives the
// same bits.
//
// Three shapes of work:
//  - nchw_rows:   NCHW with long rows (H*W): one warp per (row, split), 16-byte loads.
//  - nchw_staged: NCHW with short rows: a block stages a run of whole rows through shared memory
//                 with 16-byte loads, then each thread sums one row.
//  - nhwc:        NHWC: a block covers one sample, a tile of channels (a warp wide) and a split of
//                 H*W; warps stride over pixels; 16-byte loads when C allows.
#include "common.cuh"

namespace senet {

constexpr int kRowsWarps = 8;           // warps (rows) per block in nchw_rows
constexpr int kStageBytes = 8192;       // bytes staged per input array in nchw_staged
constexpr int kNhwcWarps = 8;           // pixel-parallel warps in nhwc

// What a reduction reads, per element, and what it emits per (sample, channel).
template <typename T, bool GRAD>
struct ReduceArgs {
    const T* __restrict__ x;
    const T* __restrict__ dy;  // GRAD only
    const T* __restrict__ r;   // GRAD with residual only
    const float* __restrict__ s;
    T* __restrict__ dres;      // GRAD with residual only
    float* __restrict__ out;   // z (pool) or dg (grad), [n][c]
    float* __restrict__ ws;    // split partials, [splits][n * c]
    unsigned int* __restrict__ tickets;
};

// Per-element contribution: x for pooling; g * x for the gradient (writing d residual).
template <typename T, bool GRAD>
__device__ __forceinline__ float contrib(const ReduceArgs<T, GRAD>& a, bool residual, uint64_t i, float sc) {
    float xv = to_f32(a.x[i]);
    if constexpr (!GRAD) {
        return xv;
    } else {
        float g = to_f32(a.dy[i]);
        if (residual) {
            float pre = fmaf(sc, xv, to_f32(a.r[i]));
            g = pre > 0.0f ? g : 0.0f;
            a.dres[i] = from_f32<T>(g);
        }
        return g * xv;
    }
}

template <typename T, bool GRAD>
__device__ __forceinline__ float contrib_vec(const ReduceArgs<T, GRAD>& a, bool residual, uint64_t i, float sc) {
    constexpr int V = Vec<T>::N;
    float xv[V];
    unpack<T>(ld_vec(a.x + i), xv);
    float acc = 0.0f;
    if constexpr (!GRAD) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc += xv[k];
    } else {
        float g[V];
        unpack<T>(ld_vec(a.dy + i), g);
        if (residual) {
            float rv[V];
            unpack<T>(ld_vec(a.r + i), rv);
#pragma unroll
            for (int k = 0; k < V; ++k) g[k] = fmaf(sc, xv[k], rv[k]) > 0.0f ? g[k] : 0.0f;
            st_vec(a.dres + i, pack<T>(g));
        }
#pragma unroll
        for (int k = 0; k < V; ++k) acc = fmaf(g[k], xv[k], acc);
    }
    return acc;
}

template <bool GRAD>
__device__ __forceinline__ float finalize(const SeParams& p, const float* s, uint64_t nc, float sum) {
    if constexpr (GRAD) {
        return sum * gate_grad_from_s(p.gate, s[nc]);
    } else {
        return sum * p.inv_hw;
    }
}

// ------------------------------------------------------------------------------- nchw_rows
template <typename T, bool GRAD>
__device__ void reduce_nchw_rows(const SeParams& p, const ReduceArgs<T, GRAD>& a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint64_t rows = p.n * p.c;
    const uint64_t row = static_cast<uint64_t>(blockIdx.x) * kRowsWarps + warp;
    const uint32_t split = blockIdx.y;
    const bool residual = GRAD && (p.flags & SENET_FLAG_RESIDUAL);
    float sum = 0.0f;
    if (row < rows) {
        const uint64_t p0 = split * p.hw_split;
        const uint64_t p1 = min(p.hw, p0 + p.hw_split);
        const uint64_t count = p1 > p0 ? p1 - p0 : 0;
        const uint64_t e0 = row * p.hw + p0;
        const float sc = GRAD ? a.s[row] : 0.0f;
        constexpr int V = Vec<T>::N;
        const uint64_t head = (p.flags & SENET_FLAG_VEC) ? aligned_head(a.x + e0, count) : count;
        for (uint64_t i = lane; i < head; i += 32) sum += contrib<T, GRAD>(a, residual, e0 + i, sc);
        const uint64_t nvec = (count - head) / V;
#pragma unroll 4
        for (uint64_t v = lane; v < nvec; v += 32) sum += contrib_vec<T, GRAD>(a, residual, e0 + head + v * V, sc);
        for (uint64_t i = head + nvec * V + lane; i < count; i += 32) sum += contrib<T, GRAD>(a, residual, e0 + i, sc);
        sum = warp_sum(sum);
    }
    if (p.splits == 1) {
        if (row < rows && lane == 0) a.out[row] = finalize<GRAD>(p, a.s, row, sum);
        return;
    }
    if (row < rows && lane == 0) a.ws[split * rows + row] = sum;
    if (ticket_arrive_last(a.tickets + blockIdx.x, p.splits)) {
        if (row < rows && lane == 0) {
            float total = 0.0f;
            for (uint32_t k = 0; k < p.splits; ++k) total += __ldcg(a.ws + k * rows + row);
            a.out[row] = finalize<GRAD>(p, a.s, row, total);
        }
        ticket_reset(a.tickets + blockIdx.x);
    }
}

// ----------------------------------------------------------------------------- nchw_staged
// Copies elements [e0, e0 + count) of `src` into `dst`, placed so that dst[off + i] holds
// src[e0 + i] with the same 16-byte phase as global memory (so the middle moves as vectors).
template <typename T>
__device__ __forceinline__ void stage(const T* __restrict__ src, uint64_t e0, uint32_t count, T* dst, uint32_t off,
                                      bool vec) {
    constexpr int V = Vec<T>::N;
    const uint32_t head = vec ? static_cast<uint32_t>(aligned_head(src + e0, count)) : count;
    for (uint32_t i = threadIdx.x; i < head; i += blockDim.x) dst[off + i] = src[e0 + i];
    const uint32_t nvec = (count - head) / V;
#pragma unroll 4
    for (uint32_t v = threadIdx.x; v < nvec; v += blockDim.x)
        *reinterpret_cast<uint4*>(dst + off + head + v * V) = ld_vec(src + e0 + head + v * V);
    for (uint32_t i = head + nvec * V + threadIdx.x; i < count; i += blockDim.x) dst[off + i] = src[e0 + i];
}

template <typename T, bool GRAD>
__device__ void reduce_nchw_staged(const SeParams& p, const ReduceArgs<T, GRAD>& a) {
    constexpr int CAP = kStageBytes / sizeof(T) + 16 / sizeof(T);
    __shared__ __align__(16) T xs[CAP];
    __shared__ __align__(16) T gs[GRAD ? CAP : 1];
    __shared__ __align__(16) T rs[GRAD ? CAP : 1];
    const bool residual = GRAD && (p.flags & SENET_FLAG_RESIDUAL);
    const bool vec = (p.flags & SENET_FLAG_VEC) != 0;
    const uint64_t rows_total = p.n * p.c;
    const uint64_t row0 = static_cast<uint64_t>(blockIdx.x) * p.rows;
    const uint32_t nrows = static_cast<uint32_t>(min(static_cast<uint64_t>(p.rows), rows_total - row0));
    const uint32_t hw = static_cast<uint32_t>(p.hw);
    const uint32_t count = nrows * hw;
    const uint64_t e0 = row0 * p.hw;
    const uint32_t off = vec ? misalign(a.x + e0) / sizeof(T) : 0u;

    stage<T>(a.x, e0, count, xs, off, vec);
    if constexpr (GRAD) {
        stage<T>(a.dy, e0, count, gs, off, vec);
        if (residual) stage<T>(a.r, e0, count, rs, off, vec);
    }
    __syncthreads();
    if constexpr (GRAD) {
        if (residual) {
            // Mask in place (gs becomes g) and write d residual, coalesced.
            for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) {
                const float sc = a.s[row0 + i / hw];
                const float pre = fmaf(sc, to_f32(xs[off + i]), to_f32(rs[off + i]));
                const T g = pre > 0.0f ? gs[off + i] : from_f32<T>(0.0f);
                gs[off + i] = g;
                a.dres[e0 + i] = g;
            }
            __syncthreads();
        }
    }
    for (uint32_t r = threadIdx.x; r < nrows; r += blockDim.x) {
        float sum = 0.0f;
        const uint32_t b = off + r * hw;
        for (uint32_t i = 0; i < hw; ++i) {
            if constexpr (GRAD) {
                sum = fmaf(to_f32(gs[b + i]), to_f32(xs[b + i]), sum);
            } else {
                sum += to_f32(xs[b + i]);
            }
        }
        a.out[row0 + r] = finalize<GRAD>(p, a.s, row0 + r, sum);
    }
}

// ------------------------------------------------------------------------------------ nhwc
template <typename T, bool GRAD, int V>
__device__ void reduce_nhwc(const SeParams& p, const ReduceArgs<T, GRAD>& a) {
    __shared__ float red[kNhwcWarps][32 * V];
    const int lane = threadIdx.x, wy = threadIdx.y;
    const uint32_t tile_c = 32 * V;
    const uint32_t ctiles = (p.c + tile_c - 1) / tile_c;
    const uint64_t n = blockIdx.x / ctiles;
    const uint32_t ct = blockIdx.x % ctiles;
    const uint32_t split = blockIdx.y;
    const uint32_t c0 = ct * tile_c + lane * V;
    const bool residual = GRAD && (p.flags & SENET_FLAG_RESIDUAL);
    const uint64_t p0 = split * p.hw_split;
    const uint64_t p1 = min(p.hw, p0 + p.hw_split);

    float acc[V];
    float sc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        acc[k] = 0.0f;
        sc[k] = (GRAD && c0 + k < p.c) ? a.s[n * p.c + c0 + k] : 0.0f;
    }
    if (c0 < p.c) {
#pragma unroll 4
        for (uint64_t px = p0 + wy; px < p1; px += kNhwcWarps) {
            const uint64_t i = (n * p.hw + px) * p.c + c0;
            if constexpr (V == 1) {
                acc[0] += contrib<T, GRAD>(a, residual, i, sc[0]);
            } else {
                float xv[V];
                unpack<T>(ld_vec(a.x + i), xv);
                if constexpr (GRAD) {
                    float g[V];
                    unpack<T>(ld_vec(a.dy + i), g);
                    if (residual) {
                        float rv[V];
                        unpack<T>(ld_vec(a.r + i), rv);
#pragma unroll
                        for (int k = 0; k < V; ++k) g[k] = fmaf(sc[k], xv[k], rv[k]) > 0.0f ? g[k] : 0.0f;
                        st_vec(a.dres + i, pack<T>(g));
                    }
#pragma unroll
                    for (int k = 0; k < V; ++k) acc[k] = fmaf(g[k], xv[k], acc[k]);
                } else {
#pragma unroll
                    for (int k = 0; k < V; ++k) acc[k] += xv[k];
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) red[wy][lane * V + k] = acc[k];
    __syncthreads();
    // Warp 0 adds the pixel-parallel partials in a fixed order.
    float sum[V];
    if (wy == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < kNhwcWarps; ++w) t += red[w][lane * V + k];
            sum[k] = t;
        }
    }
    const uint64_t nc0 = n * p.c + c0;
    if (p.splits == 1) {
        if (wy == 0) {
#pragma unroll
            for (int k = 0; k < V; ++k)
                if (c0 + k < p.c) a.out[nc0 + k] = finalize<GRAD>(p, a.s, nc0 + k, sum[k]);
        }
        return;
    }
    const uint64_t plane = p.n * p.c;
    if (wy == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k)
            if (c0 + k < p.c) a.ws[split * plane + nc0 + k] = sum[k];
    }
    if (ticket_arrive_last(a.tickets + blockIdx.x, p.splits)) {
        // Warp w adds splits w, w + 8, ... in order, then warp 0 adds the warps' sums in order:
        // a fixed order (the same bits every run) and a dependent chain of splits / 8 loads, not
        // splits (one warp adding 392 partials serially took 273 us at 1x256x56x56 bf16 on an
        // H200). red is free again: warp 0 read it before the ticket's barrier.
        float t[V];
#pragma unroll
        for (int k = 0; k < V; ++k) t[k] = 0.0f;
#pragma unroll 1
        for (uint32_t sidx = wy; sidx < p.splits; sidx += kNhwcWarps) {
#pragma unroll
            for (int k = 0; k < V; ++k)
                if (c0 + k < p.c) t[k] += __ldcg(a.ws + sidx * plane + nc0 + k);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) red[wy][lane * V + k] = t[k];
        __syncthreads();
        if (wy == 0) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                if (c0 + k < p.c) {
                    float total = 0.0f;
#pragma unroll
                    for (int w = 0; w < kNhwcWarps; ++w) total += red[w][lane * V + k];
                    a.out[nc0 + k] = finalize<GRAD>(p, a.s, nc0 + k, total);
                }
            }
        }
        ticket_reset(a.tickets + blockIdx.x);
    }
}

}  // namespace senet

using namespace senet;

#define SENET_POOL_ARGS(T) \
    ReduceArgs<T, false> { x, nullptr, nullptr, nullptr, nullptr, z, ws, tickets }
#define SENET_GRAD_ARGS(T) \
    ReduceArgs<T, true> { x, dy, r, s, dres, dg, ws, tickets }

#define SENET_SQUEEZE_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) se_pool_nchw_rows_##NAME(                                \
        SeParams p, const T* __restrict__ x, float* __restrict__ z, float* __restrict__ ws,                    \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nchw_rows<T, false>(p, SENET_POOL_ARGS(T));                                                     \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_pool_nchw_rows_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_pool_nchw_staged_##NAME(                              \
        SeParams p, const T* __restrict__ x, float* __restrict__ z, float* __restrict__ ws,                    \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nchw_staged<T, false>(p, SENET_POOL_ARGS(T));                                                   \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_pool_nchw_staged_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_pool_nhwc_##NAME(                                     \
        SeParams p, const T* __restrict__ x, float* __restrict__ z, float* __restrict__ ws,                    \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nhwc<T, false, 1>(p, SENET_POOL_ARGS(T));                                                       \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_pool_nhwc_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_pool_nhwc_vec_##NAME(                                 \
        SeParams p, const T* __restrict__ x, float* __restrict__ z, float* __restrict__ ws,                    \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nhwc<T, false, Vec<T>::N>(p, SENET_POOL_ARGS(T));                                               \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_pool_nhwc_vec_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_dgate_nchw_rows_##NAME(                               \
        SeParams p, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,                \
        const float* __restrict__ s, T* __restrict__ dres, float* __restrict__ dg, float* __restrict__ ws,     \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nchw_rows<T, true>(p, SENET_GRAD_ARGS(T));                                                      \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_dgate_nchw_rows_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_dgate_nchw_staged_##NAME(                             \
        SeParams p, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,                \
        const float* __restrict__ s, T* __restrict__ dres, float* __restrict__ dg, float* __restrict__ ws,     \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nchw_staged<T, true>(p, SENET_GRAD_ARGS(T));                                                    \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_dgate_nchw_staged_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_dgate_nhwc_##NAME(                                    \
        SeParams p, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,                \
        const float* __restrict__ s, T* __restrict__ dres, float* __restrict__ dg, float* __restrict__ ws,     \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nhwc<T, true, 1>(p, SENET_GRAD_ARGS(T));                                                        \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_dgate_nhwc_##NAME) \
    extern "C" __global__ void __launch_bounds__(256) se_dgate_nhwc_vec_##NAME(                                \
        SeParams p, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,                \
        const float* __restrict__ s, T* __restrict__ dres, float* __restrict__ dg, float* __restrict__ ws,     \
        unsigned int* __restrict__ tickets) {                                                                  \
        reduce_nhwc<T, true, Vec<T>::N>(p, SENET_GRAD_ARGS(T));                                                \
    }                                                                                                          \
    SENET_EMU_REGISTER(se_dgate_nhwc_vec_##NAME)

SENET_FOR_EACH_DTYPE(SENET_SQUEEZE_KERNELS)
