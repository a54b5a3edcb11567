// The network kernels (activations NCHW, or NHWC where a kernel takes `nhwc` or its convolution
// flags say SENET_NN_NHWC; activations in f32, or in bf16 for mixed precision, with parameters,
// gradients of parameters and every sum in f32 or f64): convolutions as implicit GEMMs (no im2col buffer), linear
// layers, BatchNorm statistics / affine / backward, ReLU and the residual add, max / average /
// global pooling forward and backward. Every reduction runs in a fixed order (no float atomics),
// so results are the same bits every run.
//
// One tiled GEMM serves every matrix product: out(m, n) = sum_k A(m, k) * B(k, n), where A and
// B are functors that compute an element's address (or return 0 for padding), so a convolution
// reads its input in place:
//   forward      M = out channels / group, N = output pixels, K = (in channel, kh, kw)
//   input grad   M = in channels / group,  N = input pixels,  K = (out channel, kh, kw)
//   weight grad  M = out channels / group, N = (in channel, kh, kw), K = (sample, output pixel)
//
// This header holds what the network kernel files (nn_conv, nn_linear, nn_norm, nn_pool,
// nn_pointwise) share: the activation offset, the tiled GEMM and the block sum.
#pragma once
#include "common.cuh"

namespace senet {
namespace nnk {

constexpr int TM = 64, TN = 64, TK = 16;  // 256 threads, a 4x4 micro-tile each

// The offset of element (sample s, channel ch, pixel pix) of an activation with c channels and
// hw pixels per sample: NCHW, or NHWC when `nhwc`.
__device__ __forceinline__ uint64_t act_at(uint32_t nhwc, uint64_t s, uint64_t ch, uint64_t pix, uint64_t c,
                                           uint64_t hw) {
    return nhwc ? (s * hw + pix) * c + ch : (s * c + ch) * hw + pix;
}

// The (m0, n0) tile of sum over k in [kb, ke) of a(m, k) * b(k, n), into acc (thread (tx, ty)
// holds rows m0 + 4 ty + i, columns n0 + 4 tx + j).
template <class LA, class LB>
__device__ __forceinline__ void tile_gemm(const LA& a, const LB& b, uint32_t M, uint32_t N, uint32_t kb,
                                          uint32_t K, uint32_t m0, uint32_t n0, float (&acc)[4][4]) {
    __shared__ float As[TK][TM + 4];
    __shared__ float Bs[TK][TN + 4];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (uint32_t k0 = kb; k0 < K; k0 += TK) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256;
            const int mm = e / TK, kk = e % TK;
            const uint32_t gm = m0 + mm;
            const uint32_t gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < K) ? a(gm, gk) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256;
            const int nn = e % TN, kk = e / TN;
            const uint32_t gn = n0 + nn;
            const uint32_t gk = k0 + kk;
            Bs[kk][nn] = (gn < N && gk < K) ? b(gk, gn) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
}

template <class T>
struct Strided {  // M(r, c) = ptr[r * sr + c * sc]
    const T* ptr;
    int64_t sr, sc;
    __device__ float operator()(uint32_t r, uint32_t c) const { return to_f32(ptr[r * sr + c * sc]); }
};

// Block sum of a double over 256 threads, in a fixed tree order; every thread gets the total.
__device__ __forceinline__ double block_sum(double v) {
    __shared__ double red[256];
    __syncthreads();
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    return red[0];
}

// PyTorch's pooling window along one axis: [lo, hi) clipped to the input, and the divisor extent

}  // namespace nnk
}  // namespace senet
