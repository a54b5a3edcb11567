// Fully fused SE, forward and backward, one launch each, for Hopper (sm_90) and newer.
//
// A thread-block cluster of 8 CTAs owns one sample at a time (persistent: clusters stride over
// the batch). Each CTA stages its slice of the sample in shared memory (NCHW: a range of
// channels; NHWC: a range of pixels, all channels), so x (forward) or dy and x (backward) come
// from device memory once. The pooled vector, hidden units and channel weights cross CTAs
// through distributed shared memory (DSMEM); every cross-CTA sum runs in rank order, so results
// are deterministic. Weights are read from L2 once per sample per cluster.
//
// Forward bytes: read x once, write y once (2N), plus the residual with the epilogue.
// Backward bytes: read dy and x once, write dx once (3N); dg and du go out for the weight
// gradients, which the host computes with batched GEMMs afterwards.
//
// Shared memory per CTA (floats unless noted):
//   va[C] vb[C] vc[C]   per-channel exchange / full vectors
//   ha[D] hb[D]         per-hidden exchange / full vectors
//   slice(s) of T, 16-byte aligned, each with 16 bytes of slack for the 16-byte phase.
#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace senet {

constexpr int kCluster = 8;
constexpr int kFusedThreads = 512;
constexpr int kFusedWarps = kFusedThreads / 32;

struct Slice {
    uint32_t c0, c1;  // owned channels
    uint32_t j0, j1;  // owned hidden units
    uint64_t p0, p1;  // NHWC: owned pixels
    uint64_t count;   // elements in the slice
    __device__ Slice(const SeParams& p, uint32_t rank, bool nhwc) {
        const uint32_t cpc = (p.c + kCluster - 1) / kCluster;
        c0 = min(p.c, rank * cpc);
        c1 = min(p.c, c0 + cpc);
        const uint32_t dpc = (p.hidden + kCluster - 1) / kCluster;
        j0 = min(p.hidden, rank * dpc);
        j1 = min(p.hidden, j0 + dpc);
        const uint64_t rpc = (p.hw + kCluster - 1) / kCluster;
        p0 = min(p.hw, rank * rpc);
        p1 = min(p.hw, p0 + rpc);
        count = nhwc ? (p1 - p0) * p.c : static_cast<uint64_t>(c1 - c0) * p.hw;
    }
    // Offset of the slice's first element within sample n.
    __device__ uint64_t base(const SeParams& p, uint64_t n, bool nhwc) const {
        return n * p.c * p.hw + (nhwc ? p0 * p.c : static_cast<uint64_t>(c0) * p.hw);
    }
    __device__ uint32_t owner_c(const SeParams& p, uint32_t c) const {
        return c / ((p.c + kCluster - 1) / kCluster);
    }
    __device__ uint32_t owner_j(const SeParams& p, uint32_t j) const {
        return j / ((p.hidden + kCluster - 1) / kCluster);
    }
};

// Stage global [e0, e0 + count) into dst[off + i] (same 16-byte phase), streaming loads.
template <typename T>
__device__ __forceinline__ void stage_stream(const T* src, uint64_t e0, uint64_t count, T* dst, uint32_t off,
                                             bool vec) {
    constexpr int V = Vec<T>::N;
    const uint64_t head = vec ? aligned_head(src + e0, count) : count;
    for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) dst[off + i] = src[e0 + i];
    const uint64_t nvec = (count - head) / V;
#pragma unroll 4
    for (uint64_t v = threadIdx.x; v < nvec; v += blockDim.x)
        *reinterpret_cast<uint4*>(dst + off + head + v * V) = ld_vec_stream(src + e0 + head + v * V);
    for (uint64_t i = head + nvec * V + threadIdx.x; i < count; i += blockDim.x) dst[off + i] = src[e0 + i];
}

// Per-channel reduction of the staged slice (optionally of the product of two staged slices).
// NCHW: own channels, one warp per channel, result (times `scale`) into out[c].
// NHWC: all channels, one thread per channel over the slice's pixels, raw sums into out[c].
template <typename T, bool NHWC, bool PRODUCT>
__device__ __forceinline__ void reduce_slice(const SeParams& p, const Slice& sl, const T* a, uint32_t aoff,
                                             const T* b, uint32_t boff, float* out, float scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if constexpr (!NHWC) {
        for (uint32_t c = sl.c0 + warp; c < sl.c1; c += kFusedWarps) {
            const uint64_t r0 = static_cast<uint64_t>(c - sl.c0) * p.hw;
            float t = 0.0f;
            for (uint64_t i = lane; i < p.hw; i += 32) {
                const float av = to_f32(a[aoff + r0 + i]);
                t = PRODUCT ? fmaf(av, to_f32(b[boff + r0 + i]), t) : t + av;
            }
            t = warp_sum(t);
            if (lane == 0) out[c] = t * scale;
        }
    } else {
        const uint64_t rows = sl.p1 - sl.p0;
        for (uint32_t c = threadIdx.x; c < p.c; c += blockDim.x) {
            float t = 0.0f;
            for (uint64_t r = 0; r < rows; ++r) {
                const uint64_t i = r * p.c + c;
                const float av = to_f32(a[aoff + i]);
                t = PRODUCT ? fmaf(av, to_f32(b[boff + i]), t) : t + av;
            }
            out[c] = t;
        }
    }
}

// Walks the slice's elements (head / 16-byte body / tail), calling f(i, channel) per element
// index i relative to the slice start. Per-element channel without division in the body.
template <typename T, bool NHWC, typename F>
__device__ __forceinline__ void for_slice(const SeParams& p, const Slice& sl, uint64_t head, bool vec, F&& f) {
    constexpr int V = Vec<T>::N;
    auto chan = [&](uint64_t i) -> uint32_t {
        return NHWC ? static_cast<uint32_t>(i % p.c) : sl.c0 + static_cast<uint32_t>(i / p.hw);
    };
    const uint64_t h = vec ? head : sl.count;
    for (uint64_t i = threadIdx.x; i < h; i += blockDim.x) f.scalar(i, chan(i));
    const uint64_t nvec = (sl.count - h) / V;
    for (uint64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        const uint64_t i = h + v * V;
        uint32_t cs[V];
        uint32_t c = chan(i);
        uint64_t pos = NHWC ? c : (i % p.hw);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            cs[k] = c;
            if (NHWC) {
                if (++c == p.c) c = 0;
            } else if (++pos == p.hw) {
                pos = 0;
                ++c;
            }
        }
        f.vector(i, cs);
    }
    for (uint64_t i = h + nvec * V + threadIdx.x; i < sl.count; i += blockDim.x) f.scalar(i, chan(i));
}

template <typename T>
struct FwdScale {
    const T* xs;
    uint32_t off;
    const T* r;
    T* y;
    uint64_t e0;
    const float* s;  // shared, indexed by channel
    bool residual;
    __device__ __forceinline__ float f(float xv, float rv, float sc) const {
        return residual ? fmaxf(fmaf(sc, xv, rv), 0.0f) : sc * xv;
    }
    __device__ __forceinline__ void scalar(uint64_t i, uint32_t c) const {
        y[e0 + i] = from_f32<T>(f(to_f32(xs[off + i]), residual ? to_f32(r[e0 + i]) : 0.0f, s[c]));
    }
    __device__ __forceinline__ void vector(uint64_t i, const uint32_t (&cs)[Vec<T>::N]) const {
        constexpr int V = Vec<T>::N;
        float xv[V], rv[V], out[V];
        unpack<T>(*reinterpret_cast<const uint4*>(xs + off + i), xv);
        if (residual) unpack<T>(ld_vec_stream(r + e0 + i), rv);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = f(xv[k], residual ? rv[k] : 0.0f, s[cs[k]]);
        st_vec(y + e0 + i, pack<T>(out));
    }
};

template <typename T>
struct BwdMask {  // g = dy through the ReLU mask, in place in shared memory; writes d residual
    T* gs;
    uint32_t goff;
    const T* xs;
    uint32_t xoff;
    const T* r;
    T* dres;
    uint64_t e0;
    const float* s;
    __device__ __forceinline__ void scalar(uint64_t i, uint32_t c) const {
        const float pre = fmaf(s[c], to_f32(xs[xoff + i]), to_f32(r[e0 + i]));
        const T g = pre > 0.0f ? gs[goff + i] : from_f32<T>(0.0f);
        gs[goff + i] = g;
        dres[e0 + i] = g;
    }
    __device__ __forceinline__ void vector(uint64_t i, const uint32_t (&cs)[Vec<T>::N]) const {
        constexpr int V = Vec<T>::N;
        float g[V], xv[V], rv[V];
        unpack<T>(*reinterpret_cast<const uint4*>(gs + goff + i), g);
        unpack<T>(*reinterpret_cast<const uint4*>(xs + xoff + i), xv);
        unpack<T>(ld_vec_stream(r + e0 + i), rv);
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = fmaf(s[cs[k]], xv[k], rv[k]) > 0.0f ? g[k] : 0.0f;
        const uint4 packed = pack<T>(g);
        *reinterpret_cast<uint4*>(gs + goff + i) = packed;
        st_vec(dres + e0 + i, packed);
    }
};

template <typename T>
struct BwdDx {
    const T* gs;
    uint32_t goff;
    T* dx;
    uint64_t e0;
    const float* s;   // shared, by channel
    const float* dz;  // shared, by channel, already divided by HW
    bool accumulate;
    __device__ __forceinline__ void scalar(uint64_t i, uint32_t c) const {
        float v = fmaf(to_f32(gs[goff + i]), s[c], dz[c]);
        if (accumulate) v += to_f32(dx[e0 + i]);
        dx[e0 + i] = from_f32<T>(v);
    }
    __device__ __forceinline__ void vector(uint64_t i, const uint32_t (&cs)[Vec<T>::N]) const {
        constexpr int V = Vec<T>::N;
        float g[V], old[V], out[V];
        unpack<T>(*reinterpret_cast<const uint4*>(gs + goff + i), g);
        if (accumulate) unpack<T>(ld_vec_rw(dx + e0 + i), old);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = fmaf(g[k], s[cs[k]], dz[cs[k]]) + (accumulate ? old[k] : 0.0f);
        st_vec(dx + e0 + i, pack<T>(out));
    }
};

// Fills full[c] for every channel from the owner CTA's `own` array (DSMEM).
__device__ __forceinline__ void gather_channels(cg::cluster_group& cl, const SeParams& p, const Slice& sl, float* own,
                                                float* full) {
    for (uint32_t c = threadIdx.x; c < p.c; c += blockDim.x) full[c] = cl.map_shared_rank(own, sl.owner_c(p, c))[c];
}

__device__ __forceinline__ void gather_hidden(cg::cluster_group& cl, const SeParams& p, const Slice& sl, float* own,
                                              float* full) {
    for (uint32_t j = threadIdx.x; j < p.hidden; j += blockDim.x) full[j] = cl.map_shared_rank(own, sl.owner_j(p, j))[j];
}

// NHWC: full[c] = scale * sum over ranks (in order) of each CTA's partial[c].
__device__ __forceinline__ void sum_partials(cg::cluster_group& cl, const SeParams& p, float* partial, float* full,
                                             float scale) {
    for (uint32_t c = threadIdx.x; c < p.c; c += blockDim.x) {
        float t = 0.0f;
#pragma unroll
        for (int q = 0; q < kCluster; ++q) t += cl.map_shared_rank(partial, q)[c];
        full[c] = t * scale;
    }
}

// One warp per output row: out[row] = dot(W[row, :], v) over `len`, rows in [r0, r1).
template <typename F>
__device__ __forceinline__ void warp_rows(uint32_t r0, uint32_t r1, uint32_t len, const float* __restrict__ w,
                                          const float* v, F&& emit) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (uint32_t row = r0 + warp; row < r1; row += kFusedWarps) {
        float t = 0.0f;
        for (uint32_t k = lane; k < len; k += 32) t = fmaf(w[static_cast<uint64_t>(row) * len + k], v[k], t);
        t = warp_sum(t);
        if (lane == 0) emit(row, t);
    }
}

// Elements of the largest slice any rank owns (rank 0's).
__device__ __forceinline__ uint64_t slice_capacity(const SeParams& p, bool nhwc) {
    return nhwc ? ((p.hw + kCluster - 1) / kCluster) * p.c
                : static_cast<uint64_t>((p.c + kCluster - 1) / kCluster) * p.hw;
}

// Bytes of one staged slice buffer: capacity plus 16 bytes of phase slack, rounded to 16.
template <typename T>
__device__ __forceinline__ uint64_t slice_bytes(const SeParams& p, bool nhwc) {
    return ((slice_capacity(p, nhwc) * sizeof(T) + 16 + 15) / 16) * 16;
}

__device__ __forceinline__ uint64_t exchange_bytes(const SeParams& p) {
    return ((static_cast<uint64_t>(4 * p.c + 2 * p.hidden) * 4 + 15) / 16) * 16;
}

template <typename T, bool NHWC>
__device__ void fused_forward(const SeParams& p, const T* x, const T* r, T* y, const float* __restrict__ w1,
                              const float* __restrict__ b1, const float* __restrict__ w2,
                              const float* __restrict__ b2, float* __restrict__ z_out, float* __restrict__ h_out,
                              float* __restrict__ u_out, float* __restrict__ s_out) {
    cg::cluster_group cl = cg::this_cluster();
    SENET_DYNAMIC_SMEM(smem);
    const uint32_t C = p.c, D = p.hidden;
    float* va = reinterpret_cast<float*>(smem);  // NCHW: own z; NHWC: own partial sums
    float* vb = va + C;                          // full z
    float* vc = vb + C;                          // own s (exchange), then full s (NHWC)
    float* ha = vc + C;                          // own h
    float* hb = ha + D;                          // full u
    float* sfull = ha + 2 * D;                   // NHWC: full s
    T* xs = reinterpret_cast<T*>(smem + exchange_bytes(p));
    const uint32_t rank = cl.block_rank();
    const Slice sl(p, rank, NHWC);
    const bool residual = (p.flags & SENET_FLAG_RESIDUAL) != 0;
    const bool vec = (p.flags & SENET_FLAG_VEC) != 0;
    const bool bias = (p.flags & SENET_FLAG_BIAS) != 0;
    const uint32_t nclusters = gridDim.x / kCluster;

    for (uint64_t n = blockIdx.x / kCluster; n < p.n; n += nclusters) {
        const uint64_t e0 = sl.base(p, n, NHWC);
        const uint32_t off = vec ? misalign(x + e0) / sizeof(T) : 0u;
        const uint64_t head = aligned_head(x + e0, sl.count);
        stage_stream<T>(x, e0, sl.count, xs, off, vec);
        __syncthreads();
        reduce_slice<T, NHWC, false>(p, sl, xs, off, nullptr, 0, va, p.inv_hw);
        cl.sync();
        if constexpr (NHWC) {
            sum_partials(cl, p, va, vb, p.inv_hw);
        } else {
            gather_channels(cl, p, sl, va, vb);
        }
        __syncthreads();
        for (uint32_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) z_out[n * C + c] = vb[c];
        warp_rows(sl.j0, sl.j1, C, w1, vb, [&](uint32_t j, float acc) {
            const float h = acc + (bias ? b1[j] : 0.0f);
            ha[j] = h;
            h_out[n * D + j] = h;
            u_out[n * D + j] = act_fwd(p.act, h);
        });
        cl.sync();
        for (uint32_t j = threadIdx.x; j < D; j += blockDim.x)
            hb[j] = act_fwd(p.act, cl.map_shared_rank(ha, sl.owner_j(p, j))[j]);
        __syncthreads();
        warp_rows(sl.c0, sl.c1, D, w2, hb, [&](uint32_t c, float acc) {
            const float s = gate_fwd(p.gate, acc + (bias ? b2[c] : 0.0f));
            vc[c] = s;
            s_out[n * C + c] = s;
        });
        const float* s_by_c = vc;
        if constexpr (NHWC) {
            cl.sync();
            gather_channels(cl, p, sl, vc, sfull);
            s_by_c = sfull;
        }
        __syncthreads();
        FwdScale<T> op{xs, off, r, y, e0, s_by_c, residual};
        for_slice<T, NHWC>(p, sl, head, vec, op);
        cl.sync();  // nobody still reads this CTA's exchange arrays
    }
}

template <typename T, bool NHWC>
__device__ void fused_backward(const SeParams& p, const T* dy, const T* x, const T* r, const float* __restrict__ s_in,
                               const float* __restrict__ h_in, const float* __restrict__ w1,
                               const float* __restrict__ w2, T* dres, T* dx, float* __restrict__ dg_out,
                               float* __restrict__ du_out) {
    cg::cluster_group cl = cg::this_cluster();
    SENET_DYNAMIC_SMEM(smem);
    const uint32_t C = p.c, D = p.hidden;
    float* va = reinterpret_cast<float*>(smem);  // own ds partials (exchange), then own dz
    float* vb = va + C;                          // dg for every channel
    float* vc = vb + C;                          // s for every channel
    float* ha = vc + C;                          // own du (exchange)
    float* hb = ha + D;                          // du for every hidden unit
    float* vd = ha + 2 * D;                      // NHWC: dz for every channel
    T* gs = reinterpret_cast<T*>(smem + exchange_bytes(p));
    T* xs = reinterpret_cast<T*>(smem + exchange_bytes(p) + slice_bytes<T>(p, NHWC));
    const uint32_t rank = cl.block_rank();
    const Slice sl(p, rank, NHWC);
    const bool residual = (p.flags & SENET_FLAG_RESIDUAL) != 0;
    const bool vec = (p.flags & SENET_FLAG_VEC) != 0;
    const bool accumulate = (p.flags & SENET_FLAG_ACCUMULATE) != 0;
    const uint32_t nclusters = gridDim.x / kCluster;

    for (uint64_t n = blockIdx.x / kCluster; n < p.n; n += nclusters) {
        const uint64_t e0 = sl.base(p, n, NHWC);
        const uint32_t off = vec ? misalign(x + e0) / sizeof(T) : 0u;  // shared by dy, x, r, dx
        const uint64_t head = aligned_head(x + e0, sl.count);
        for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) vc[c] = s_in[n * C + c];
        stage_stream<T>(dy, e0, sl.count, gs, off, vec);
        stage_stream<T>(x, e0, sl.count, xs, off, vec);
        __syncthreads();
        if (residual) {
            BwdMask<T> op{gs, off, xs, off, r, dres, e0, vc};
            for_slice<T, NHWC>(p, sl, head, vec, op);
            __syncthreads();
        }
        reduce_slice<T, NHWC, true>(p, sl, gs, off, xs, off, va, 1.0f);
        cl.sync();
        if constexpr (NHWC) {
            sum_partials(cl, p, va, vb, 1.0f);
            for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) vb[c] *= gate_grad_from_s(p.gate, vc[c]);
        } else {
            for (uint32_t c = threadIdx.x; c < C; c += blockDim.x)
                vb[c] = cl.map_shared_rank(va, sl.owner_c(p, c))[c] * gate_grad_from_s(p.gate, vc[c]);
        }
        __syncthreads();
        for (uint32_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) dg_out[n * C + c] = vb[c];
        {
            // du[j] = act'(h[j]) * sum_c W2[c][j] dg[c]: one warp per owned hidden unit.
            const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
            for (uint32_t j = sl.j0 + warp; j < sl.j1; j += kFusedWarps) {
                float t = 0.0f;
                for (uint32_t c = lane; c < C; c += 32) t = fmaf(w2[static_cast<uint64_t>(c) * D + j], vb[c], t);
                t = warp_sum(t);
                if (lane == 0) {
                    const float du = t * act_grad(p.act, h_in[n * D + j]);
                    ha[j] = du;
                    du_out[n * D + j] = du;
                }
            }
        }
        cl.sync();
        gather_hidden(cl, p, sl, ha, hb);
        __syncthreads();
        // dz[c] / HW for owned channels: one thread per channel, W1 read along its rows.
        for (uint32_t c = sl.c0 + threadIdx.x; c < sl.c1; c += blockDim.x) {
            float t = 0.0f;
            for (uint32_t j = 0; j < D; ++j) t = fmaf(w1[static_cast<uint64_t>(j) * C + c], hb[j], t);
            va[c] = t * p.inv_hw;
        }
        const float* dz_by_c = va;
        if constexpr (NHWC) {
            cl.sync();
            gather_channels(cl, p, sl, va, vd);
            dz_by_c = vd;
        }
        __syncthreads();
        BwdDx<T> op{gs, off, dx, e0, vc, dz_by_c, accumulate};
        for_slice<T, NHWC>(p, sl, head, vec, op);
        cl.sync();
    }
}

}  // namespace senet

using namespace senet;

#define SENET_FUSED_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kFusedThreads, 1)              \
        se_fused_fwd_nchw_##NAME(SeParams p, const T* x, const T* r, T* y, const float* w1, const float* b1,     \
                                 const float* w2, const float* b2, float* z, float* h, float* u, float* s) {     \
        fused_forward<T, false>(p, x, r, y, w1, b1, w2, b2, z, h, u, s);                                        \
    }                                                                                                            \
    SENET_EMU_REGISTER(se_fused_fwd_nchw_##NAME) \
    extern "C" __global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kFusedThreads, 1)              \
        se_fused_fwd_nhwc_##NAME(SeParams p, const T* x, const T* r, T* y, const float* w1, const float* b1,     \
                                 const float* w2, const float* b2, float* z, float* h, float* u, float* s) {     \
        fused_forward<T, true>(p, x, r, y, w1, b1, w2, b2, z, h, u, s);                                         \
    }                                                                                                            \
    SENET_EMU_REGISTER(se_fused_fwd_nhwc_##NAME) \
    extern "C" __global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kFusedThreads, 1)              \
        se_fused_bwd_nchw_##NAME(SeParams p, const T* dy, const T* x, const T* r, const float* s, const float* h, \
                                 const float* w1, const float* w2, T* dres, T* dx, float* dg, float* du) {       \
        fused_backward<T, false>(p, dy, x, r, s, h, w1, w2, dres, dx, dg, du);                                  \
    }                                                                                                            \
    SENET_EMU_REGISTER(se_fused_bwd_nchw_##NAME) \
    extern "C" __global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(kFusedThreads, 1)              \
        se_fused_bwd_nhwc_##NAME(SeParams p, const T* dy, const T* x, const T* r, const float* s, const float* h, \
                                 const float* w1, const float* w2, T* dres, T* dx, float* dg, float* du) {       \
        fused_backward<T, true>(p, dy, x, r, s, h, w1, w2, dres, dx, dg, du);                                   \
    }                                                                                                            \
    SENET_EMU_REGISTER(se_fused_bwd_nhwc_##NAME)

SENET_FOR_EACH_DTYPE(SENET_FUSED_KERNELS)
