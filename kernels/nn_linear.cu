// Linear layers: one tiled GEMM with strided operands (activations times f32 weights, and the
// weight gradient in f32), and per-channel sums (bias gradients). The Rust side:
// src/nn/backend/cuda/mod.rs (linear) and norm.rs (channel sums).
//
// Shared pieces (act_at, the tiled GEMM, block sums) are in nn_common.cuh; every kernel body is a
// template over the activation type, instantiated below as NAME_f32, NAME_bf16 and NAME_f16.
#include "nn_common.cuh"

namespace senet {
namespace nnk {

// ------------------------------------------------------------------------------ matrices

// C(m, n) = [C(m, n) +] sum_k A(m, k) B(k, n) [+ bias[n]], C dense row-major M x N; sums in f32.
// Grid: (N tiles, M tiles).
template <class TA, class TB, class TC>
__device__ __forceinline__ void gemm(const TA* __restrict__ A, int64_t sa_m, int64_t sa_k, const TB* __restrict__ B,
                                     int64_t sb_k, int64_t sb_n, TC* __restrict__ C,
                                     const float* __restrict__ bias, uint32_t M, uint32_t N, uint32_t K,
                                     uint32_t accumulate) {
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4];
    tile_gemm(Strided<TA>{A, sa_m, sa_k}, Strided<TB>{B, sb_k, sb_n}, M, N, 0, K, m0, n0, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t n = n0 + tx * 4 + j;
            if (n >= N) continue;
            const float v = acc[i][j] + (bias != nullptr ? bias[n] : 0.0f);
            TC* out = C + static_cast<uint64_t>(m) * N + n;
            *out = from_f32<TC>(accumulate ? to_f32(*out) + v : v);
        }
    }
}

// out[c] (+)= sum over (sample, position) of NCHW a[n][c][p] (a bias gradient, f32). One block
// per channel. (NHWC activations take nn_nhwc_partial and nn_nhwc_finish.)
template <class T>
__device__ __forceinline__ void channel_sum(const T* __restrict__ a, float* __restrict__ out, uint32_t n, uint32_t c,
                                            uint64_t hw, uint32_t accumulate) {
    const uint32_t ch = blockIdx.x;
    double t = 0.0;
    for (uint32_t s = 0; s < n; ++s) {
        const T* plane = a + (static_cast<uint64_t>(s) * c + ch) * hw;
        for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) t += to_f32(plane[i]);
    }
    t = block_sum(t);
    if (threadIdx.x == 0) out[ch] = accumulate ? out[ch] + static_cast<float>(t) : static_cast<float>(t);
}

}  // namespace nnk
}  // namespace senet

using namespace senet;
using namespace senet::nnk;

// One extern "C" kernel per activation type: nn_..._f32, nn_..._bf16 and nn_..._f16.
#define SENET_NN_LINEAR_KERNELS(NAME, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_gemm_act_##NAME(const T* __restrict__ A, int64_t sa_m, int64_t sa_k, const float* __restrict__ B,       \
                           int64_t sb_k, int64_t sb_n, T* __restrict__ C, const float* __restrict__ bias,          \
                           uint32_t M, uint32_t N, uint32_t K, uint32_t accumulate) {                              \
        gemm<T, float, T>(A, sa_m, sa_k, B, sb_k, sb_n, C, bias, M, N, K, accumulate);                             \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_gemm_act_##NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_gemm_wgrad_##NAME(const T* __restrict__ A, int64_t sa_m, int64_t sa_k, const T* __restrict__ B,         \
                             int64_t sb_k, int64_t sb_n, float* __restrict__ C, const float* __restrict__ bias,    \
                             uint32_t M, uint32_t N, uint32_t K, uint32_t accumulate) {                            \
        gemm<T, T, float>(A, sa_m, sa_k, B, sb_k, sb_n, C, bias, M, N, K, accumulate);                             \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_gemm_wgrad_##NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_channel_sum_##NAME(const T* __restrict__ a, float* __restrict__ out, uint32_t n, uint32_t c,            \
                              uint64_t hw, uint32_t accumulate) {                                                  \
        channel_sum<T>(a, out, n, c, hw, accumulate);                                                              \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_channel_sum_##NAME)

SENET_NN_LINEAR_KERNELS(f32, float)
SENET_NN_LINEAR_KERNELS(bf16, __nv_bfloat16)
SENET_NN_LINEAR_KERNELS(f16, __half)
