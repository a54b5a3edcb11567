// The scale family: element-wise passes that apply per-(sample, channel) values.
//
// Forward (scale): y = s * x, or with the fused epilogue y = relu(s * x + residual).
//                  y may alias x (in place).
// Backward (dx):   dx = g * s + dz / HW, with g = dy (or d residual from the epilogue);
//                  with SENET_FLAG_ACCUMULATE, dx += that instead.
//
// The tensor is one flat range: a scalar head up to the first 16-byte boundary, a vector body
// (16-byte loads and stores, several in flight per thread), a scalar tail. Vectors are used
// only when every pointer shares one 16-byte phase (SENET_FLAG_VEC, decided by the host).
#include "common.cuh"

namespace senet {

constexpr int kUnroll = 4;

// A fixed step through the flat tensor, divided once: ChannelCursor::advance then moves a cursor
// by it with adds and compares only.
struct ChannelStride {
    uint64_t q;   // NCHW: step / hw; NHWC: step / (hw * c)
    uint64_t r;   // NCHW: step % hw; NHWC: step % (hw * c)
    uint64_t rc;  // NHWC: step % c
    __device__ __forceinline__ ChannelStride(const SeParams& p, uint64_t step) {
        const uint64_t per = p.layout == SENET_LAYOUT_NCHW ? p.hw : p.hw * p.c;
        q = step / per;
        r = step - q * per;
        rc = p.layout == SENET_LAYOUT_NCHW ? 0 : step % p.c;
    }
};

// Maps a flat element index to the index of its (sample, channel) in [n][c] arrays, and steps
// it forward (one element, or a ChannelStride) without dividing. Only the constructor divides:
// the vector loop builds one cursor per thread, not one per vector (a 64-bit division per
// 16-byte vector held the scale and dx passes to 64-72% of copy bandwidth on an H200).
struct ChannelCursor {
    uint64_t sidx;  // n * c + channel
    uint64_t a;     // NCHW: position in the hw plane; NHWC: channel
    uint64_t b;     // NHWC: position in the sample's hw * c elements
    ChannelCursor() = default;
    __device__ __forceinline__ ChannelCursor(const SeParams& p, uint64_t i) {
        if (p.layout == SENET_LAYOUT_NCHW) {
            sidx = i / p.hw;
            a = i - sidx * p.hw;
            b = 0;
        } else {
            const uint64_t per = p.hw * p.c;
            const uint64_t n = i / per;
            b = i - n * per;
            a = b % p.c;
            sidx = n * p.c + a;
        }
    }
    __device__ __forceinline__ void next(const SeParams& p) {
        if (p.layout == SENET_LAYOUT_NCHW) {
            if (++a == p.hw) {
                a = 0;
                ++sidx;
            }
        } else {
            ++b;
            if (++a == p.c) {
                a = 0;
                // Crossing into the next sample when the sample's elements are exhausted.
                if (b == p.hw * p.c) {
                    b = 0;
                    sidx += 1;  // (n + 1) * c + 0 == n * c + (c - 1) + 1
                } else {
                    sidx -= p.c - 1;
                }
            } else {
                ++sidx;
            }
        }
    }
    // Moves the cursor forward by the stride's step.
    __device__ __forceinline__ void advance(const SeParams& p, const ChannelStride& st) {
        if (p.layout == SENET_LAYOUT_NCHW) {
            a += st.r;
            sidx += st.q;
            if (a >= p.hw) {
                a -= p.hw;
                ++sidx;
            }
        } else {
            const uint64_t per = p.hw * p.c;
            uint64_t dn = st.q;  // samples crossed
            b += st.r;
            if (b >= per) {
                b -= per;
                ++dn;
            }
            uint64_t na = a + st.rc;  // b % c moves by step % c (per is a multiple of c)
            if (na >= p.c) na -= p.c;
            sidx = sidx - a + dn * p.c + na;
            a = na;
        }
    }
};

template <typename T>
struct ScaleOp {
    const T* x;
    const T* r;
    const float* s;
    T* y;
    bool residual;
    __device__ __forceinline__ float apply(float xv, float rv, uint64_t sidx) const {
        float v = residual ? fmaf(s[sidx], xv, rv) : s[sidx] * xv;
        return residual ? fmaxf(v, 0.0f) : v;
    }
    __device__ __forceinline__ void scalar(const SeParams& p, uint64_t i) const {
        ChannelCursor cur(p, i);
        y[i] = from_f32<T>(apply(to_f32(x[i]), residual ? to_f32(r[i]) : 0.0f, cur.sidx));
    }
    template <int U>
    __device__ __forceinline__ void vectors(const SeParams& p, const uint64_t (&idx)[U], const bool (&ok)[U],
                                            const ChannelCursor (&at)[U]) const {
        constexpr int V = Vec<T>::N;
        uint4 xv[U], rv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (ok[u]) {
                xv[u] = ld_vec_stream(x + idx[u]);
                if (residual) rv[u] = ld_vec_stream(r + idx[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            float xf[V], rf[V], out[V];
            unpack<T>(xv[u], xf);
            if (residual) unpack<T>(rv[u], rf);
            ChannelCursor cur = at[u];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                out[k] = apply(xf[k], residual ? rf[k] : 0.0f, cur.sidx);
                cur.next(p);
            }
            st_vec(y + idx[u], pack<T>(out));
        }
    }
};

template <typename T>
struct DxOp {
    const T* g;
    const float* s;
    const float* dz;
    T* dx;
    float inv_hw;
    bool accumulate;
    __device__ __forceinline__ float apply(float gv, float old, uint64_t sidx) const {
        float v = fmaf(gv, s[sidx], dz[sidx] * inv_hw);
        return accumulate ? v + old : v;
    }
    __device__ __forceinline__ void scalar(const SeParams& p, uint64_t i) const {
        ChannelCursor cur(p, i);
        dx[i] = from_f32<T>(apply(to_f32(g[i]), accumulate ? to_f32(dx[i]) : 0.0f, cur.sidx));
    }
    template <int U>
    __device__ __forceinline__ void vectors(const SeParams& p, const uint64_t (&idx)[U], const bool (&ok)[U],
                                            const ChannelCursor (&at)[U]) const {
        constexpr int V = Vec<T>::N;
        uint4 gv[U], ov[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (ok[u]) {
                gv[u] = ld_vec_stream(g + idx[u]);
                if (accumulate) ov[u] = ld_vec_rw(dx + idx[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            float gf[V], of[V], out[V];
            unpack<T>(gv[u], gf);
            if (accumulate) unpack<T>(ov[u], of);
            ChannelCursor cur = at[u];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                out[k] = apply(gf[k], accumulate ? of[k] : 0.0f, cur.sidx);
                cur.next(p);
            }
            st_vec(dx + idx[u], pack<T>(out));
        }
    }
};

// Head / vector body / tail over the flat tensor, grid-stride.
template <typename T, typename Op>
__device__ void elementwise(const SeParams& p, const Op& op, const void* phase_ptr) {
    constexpr int V = Vec<T>::N;
    const uint64_t total = p.n * p.c * p.hw;
    const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const uint64_t nthreads = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    const uint64_t head =
        (p.flags & SENET_FLAG_VEC) ? aligned_head(static_cast<const T*>(phase_ptr), total) : total;
    for (uint64_t i = tid; i < head; i += nthreads) op.scalar(p, i);
    const uint64_t nvec = (total - head) / V;
    if (tid < nvec) {
        // Consecutive vectors of one thread are nthreads * V elements apart.
        ChannelCursor cur(p, head + tid * V);
        const ChannelStride step(p, nthreads * V);
        for (uint64_t v0 = tid; v0 < nvec; v0 += nthreads * kUnroll) {
            uint64_t idx[kUnroll];
            bool ok[kUnroll];
            ChannelCursor at[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const uint64_t v = v0 + u * nthreads;
                ok[u] = v < nvec;
                idx[u] = head + v * V;
                at[u] = cur;
                cur.advance(p, step);
            }
            op.template vectors<kUnroll>(p, idx, ok, at);
        }
    }
    for (uint64_t i = head + nvec * V + tid; i < total; i += nthreads) op.scalar(p, i);
}

}  // namespace senet

using namespace senet;

#define SENET_SCALE_KERNELS(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) se_scale_##NAME(                                  \
        SeParams p, const T* x, const T* r, const float* __restrict__ s, T* y) {                        \
        ScaleOp<T> op{x, r, s, y, (p.flags & SENET_FLAG_RESIDUAL) != 0};                                \
        elementwise<T>(p, op, x);                                                                       \
    }                                                                                                   \
    SENET_EMU_REGISTER(se_scale_##NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) se_dx_##NAME(                                     \
        SeParams p, const T* g, const float* __restrict__ s, const float* __restrict__ dz, T* dx) {     \
        DxOp<T> op{g, s, dz, dx, p.inv_hw, (p.flags & SENET_FLAG_ACCUMULATE) != 0};                     \
        elementwise<T>(p, op, g);                                                                       \
    }                                                                                                   \
    SENET_EMU_REGISTER(se_dx_##NAME)

SENET_FOR_EACH_DTYPE(SENET_SCALE_KERNELS)
