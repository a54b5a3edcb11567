// Elementwise kernels and data movement: ReLU / add / multiply and their gradients, dropout
// masks, conversions between f32 and the activation type, layout changes (NCHW <-> NHWC),
// channel concatenation, split-sum reduction, and the optimiser (SGD, loss-scale unscaling).
// The Rust side: src/nn/backend/cuda/pointwise.rs, memory.rs and mod.rs (optimiser).
//
// Shared pieces (act_at, the tiled GEMM, block sums) are in nn_common.cuh; every kernel body is a
// template over the activation type, instantiated below as NAME_f32, NAME_bf16 and NAME_f16.
#include "nn_common.cuh"

namespace senet {
namespace nnk {

// ------------------------------------------------------------------------------ pointwise

#define NN_EW_RELU 0u      /* y = a < 0 ? 0 : a (NaN passes) */
#define NN_EW_RELU_BWD 1u  /* y = b > 0 ? a : 0 (a = dy, b = the ReLU's output) */
#define NN_EW_ADD 2u       /* y = a + b */
#define NN_EW_ADD_RELU 3u  /* y = max(a + b, 0) (NaN passes) */
#define NN_EW_MUL 4u       /* y = a * b (dropout masks) */

template <class T>
__device__ __forceinline__ void pointwise(uint32_t op, const T* __restrict__ a, const T* __restrict__ b,
                                          T* __restrict__ y, uint64_t total) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const float v = to_f32(a[i]);
        float r;
        switch (op) {
            case NN_EW_RELU: r = v < 0.0f ? 0.0f : v; break;
            case NN_EW_RELU_BWD: r = to_f32(b[i]) > 0.0f ? v : 0.0f; break;
            case NN_EW_ADD: r = v + to_f32(b[i]); break;
            case NN_EW_MUL: r = v * to_f32(b[i]); break;
            default: {
                const float t = v + to_f32(b[i]);
                r = t < 0.0f ? 0.0f : t;
                break;
            }
        }
        y[i] = from_f32<T>(r);
    }
}

template <class T>
__device__ __forceinline__ void relayout(const T* __restrict__ src, T* __restrict__ dst, uint64_t n, uint64_t c,
                                         uint64_t hw, uint32_t to_nhwc) {
    const uint64_t total = n * c * hw;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        if (to_nhwc) {
            const uint64_t smp = i / (hw * c), r = i % (hw * c);
            dst[i] = src[(smp * c + r % c) * hw + r / c];
        } else {
            const uint64_t smp = i / (c * hw), r = i % (c * hw);
            dst[i] = src[(smp * hw + r % hw) * c + r / hw];
        }
    }
}

// For each of `rows` rows, cnt consecutive elements from src (row stride src_c, from column
// src_off) to dst (row stride dst_c, from column dst_off): channel concatenation and splitting
// of NHWC activations (a row is a pixel).
template <class T>
__device__ __forceinline__ void copy_cols(const T* __restrict__ src, T* __restrict__ dst, uint64_t rows,
                                          uint64_t src_c, uint64_t src_off, uint64_t dst_c, uint64_t dst_off,
                                          uint64_t cnt) {
    const uint64_t total = rows * cnt;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint64_t r = i / cnt, j = i % cnt;
        dst[r * dst_c + dst_off + j] = src[r * src_c + src_off + j];
    }
}

// A convolution weight [k][c][rs] (f32, PyTorch's KCRS) as [k][rs][c] of T (KRSC: cuDNN's filter
// layout for NHWC activations).

template <class S, class D>
__device__ __forceinline__ void convert(const S* __restrict__ src, D* __restrict__ dst, uint64_t n) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
        dst[i] = from_f32<D>(to_f32(src[i]));
}

// y = a * m with an f32 mask (a dropout mask and its 1 / (1 - p) scale, kept in f32 so the scale
// is not rounded to a narrow type), one rounding to T.
template <class T>
__device__ __forceinline__ void mask(const T* __restrict__ a, const float* __restrict__ m, T* __restrict__ y,
                                     uint64_t n) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
        y[i] = from_f32<T>(to_f32(a[i]) * m[i]);
}

// dst[i] (+)= src[i] in f32: a parameter gradient cuDNN formed in the activation type, added
// to the f32 one.
template <class T>
__device__ __forceinline__ void grad_from_act(const T* __restrict__ src, float* __restrict__ dst, uint64_t n,
                                              uint32_t accumulate) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
        dst[i] = accumulate ? dst[i] + to_f32(src[i]) : to_f32(src[i]);
}

}  // namespace nnk
}  // namespace senet

using namespace senet;
using namespace senet::nnk;

// One extern "C" kernel per activation type: nn_..._f32, nn_..._bf16 and nn_..._f16.
#define SENET_NN_POINTWISE_KERNELS(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_pointwise_##NAME(uint32_t op, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,      \
                            uint64_t total) {                                                                      \
        pointwise<T>(op, a, b, y, total);                                                                          \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_pointwise_##NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_to_act_##NAME(const float* __restrict__ src, T* __restrict__ dst, uint64_t n) {                         \
        convert<float, T>(src, dst, n);                                                                            \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_to_act_##NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_grad_from_act_##NAME(const T* __restrict__ src, float* __restrict__ dst, uint64_t n,                    \
                                uint32_t accumulate) {                                                             \
        grad_from_act<T>(src, dst, n, accumulate);                                                                 \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_grad_from_act_##NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_mask_##NAME(const T* __restrict__ a, const float* __restrict__ m, T* __restrict__ y, uint64_t n) {      \
        mask<T>(a, m, y, n);                                                                                       \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_mask_##NAME)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_relayout_##NAME(const T* __restrict__ src, T* __restrict__ dst, uint64_t n, uint64_t c, uint64_t hw,    \
                           uint32_t to_nhwc) {                                                                     \
        relayout<T>(src, dst, n, c, hw, to_nhwc);                                                                  \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_relayout_##NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_copy_cols_##NAME(const T* __restrict__ src, T* __restrict__ dst, uint64_t rows, uint64_t src_c,         \
                            uint64_t src_off, uint64_t dst_c, uint64_t dst_off, uint64_t cnt) {                    \
        copy_cols<T>(src, dst, rows, src_c, src_off, dst_c, dst_off, cnt);                                         \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_copy_cols_##NAME)

SENET_NN_POINTWISE_KERNELS(f32, float)
SENET_NN_POINTWISE_KERNELS(bf16, __nv_bfloat16)
SENET_NN_POINTWISE_KERNELS(f16, __half)

// out[i] (+)= sum over z in order of partial[z * len + i].
extern "C" __global__ void __launch_bounds__(256)
    nn_sum_splits_f32(const float* __restrict__ partial, float* __restrict__ out, uint64_t len, uint32_t splits,
                      uint32_t accumulate) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        float t = 0.0f;
        for (uint32_t z = 0; z < splits; ++z) t += partial[z * len + i];
        out[i] = accumulate ? out[i] + t : t;
    }
}
SENET_EMU_REGISTER(nn_sum_splits_f32)

// Loss scaling: g *= factor, and flag[0] = 1 when a result is not finite. Atomically: plain
// stores of the same value from several threads are still a data race in CUDA's memory model
// (ThreadSanitizer on the emulator reported it).
extern "C" __global__ void __launch_bounds__(256)
    nn_unscale_f32(float* __restrict__ g, uint64_t n, float factor, uint32_t* __restrict__ flag) {
    bool bad = false;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const float v = g[i] * factor;
        g[i] = v;
        bad |= !(fabsf(v) <= 3.402823466e38f);  // NaN fails the comparison
    }
    if (bad) atomicOr(flag, 1u);
}
SENET_EMU_REGISTER(nn_unscale_f32)

// One SGD step with momentum and weight decay, PyTorch's rule in the host optimiser's order and
// rounding (no fused multiply-adds, so device and host updates agree bit for bit):
// g = grad + wd * w; buf = first ? g : momentum * buf + g; w = w - lr * buf. A null grad reads
// as zeros (a gradient zeroed and not written since).
extern "C" __global__ void __launch_bounds__(256)
    nn_sgd_f32(float* __restrict__ w, const float* __restrict__ grad, float* __restrict__ buf, uint64_t n,
               float lr, float momentum, float wd, uint32_t first) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const float wi = w[i];
        const float g = __fadd_rn(grad ? grad[i] : 0.0f, __fmul_rn(wd, wi));
        const float b = first ? g : __fadd_rn(__fmul_rn(momentum, buf[i]), g);
        buf[i] = b;
        w[i] = __fsub_rn(wi, __fmul_rn(lr, b));
    }
}
SENET_EMU_REGISTER(nn_sgd_f32)
