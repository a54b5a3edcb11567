// BatchNorm: statistics (NCHW per-channel blocks; NHWC split partial sums and their in-order
// finish), the coefficients and running statistics on the device, the affine (+ ReLU) apply,
// and the backward in both layouts. f64 sums throughout. The Rust side: src/nn/backend/cuda/norm.rs.
//
// Shared pieces (act_at, the tiled GEMM, block sums) are in nn_common.cuh; every kernel body is a
// template over the activation type, instantiated below as NAME_f32, NAME_bf16 and NAME_f16.
#include "nn_common.cuh"

namespace senet {
namespace nnk {

// ------------------------------------------------------------------------------ BatchNorm

// Per-channel mean and biased variance of NCHW x (two passes, f64 sums). One block per channel.
// (NHWC activations take nn_nhwc_partial and nn_nhwc_finish.)
template <class T>
__device__ __forceinline__ void bn_stats(const T* __restrict__ x, double* __restrict__ mean, double* __restrict__ var,
                                         uint32_t n, uint32_t c, uint64_t hw) {
    const uint32_t ch = blockIdx.x;
    const double m = static_cast<double>(n) * static_cast<double>(hw);
    double t = 0.0;
    for (uint32_t s = 0; s < n; ++s) {
        const T* plane = x + (static_cast<uint64_t>(s) * c + ch) * hw;
        for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) t += to_f32(plane[i]);
    }
    const double mu = block_sum(t) / m;
    double q = 0.0;
    for (uint32_t s = 0; s < n; ++s) {
        const T* plane = x + (static_cast<uint64_t>(s) * c + ch) * hw;
        for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) {
            const double d = to_f32(plane[i]) - mu;
            q += d * d;
        }
    }
    q = block_sum(q);
    if (threadIdx.x == 0) {
        mean[ch] = mu;
        var[ch] = q / m;
    }
}

// y = a[c] x + b[c] (a null `a` reads as ones: a bias add), then ReLU when `relu` (NaN passes,
// as in PyTorch).
template <class T>
__device__ __forceinline__ void affine(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ a,
                                       const float* __restrict__ b, uint64_t total, uint32_t c, uint64_t hw,
                                       uint32_t relu, uint32_t nhwc) {
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint32_t ch = static_cast<uint32_t>(nhwc ? i % c : (i / hw) % c);
        const float r = fmaf(a != nullptr ? a[ch] : 1.0f, to_f32(x[i]), b[ch]);
        y[i] = from_f32<T>((relu && r < 0.0f) ? 0.0f : r);
    }
}

// BatchNorm backward of NCHW activations (NHWC: nn_nhwc_bn_bwd_partial / apply), one block per
// channel: dgamma += sum dy xhat, dbeta += sum dy, and
// dx = gamma invstd (dy - mean(dy) - xhat mean(dy xhat)) with batch statistics, or
// gamma invstd dy with running ones. With `relu_y` (the output of a ReLU fused after the
// BatchNorm), dy is first masked to where relu_y > 0.
template <class T>
__device__ __forceinline__ void bn_bwd(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ relu_y,
                                       const double* __restrict__ mean, const double* __restrict__ invstd,
                                       const float* __restrict__ gamma, float* __restrict__ dgamma,
                                       float* __restrict__ dbeta, T* __restrict__ dx, uint32_t n, uint32_t c,
                                       uint64_t hw, uint32_t batch_stats) {
    const uint32_t ch = blockIdx.x;
    const double mu = mean[ch], is = invstd[ch];
    double sd = 0.0, sdx = 0.0;
    for (uint32_t s = 0; s < n; ++s)
        for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) {
            const uint64_t e = (static_cast<uint64_t>(s) * c + ch) * hw + i;
            const double d = (relu_y == nullptr || to_f32(relu_y[e]) > 0.0f) ? to_f32(dy[e]) : 0.0f;
            sd += d;
            sdx += d * ((to_f32(x[e]) - mu) * is);
        }
    sd = block_sum(sd);
    sdx = block_sum(sdx);
    if (threadIdx.x == 0) {
        dgamma[ch] += static_cast<float>(sdx);
        dbeta[ch] += static_cast<float>(sd);
    }
    const double m = static_cast<double>(n) * static_cast<double>(hw);
    const double gi = static_cast<double>(gamma[ch]) * is;
    const double inv_m = __drcp_rn(m);  // a reciprocal, not a division: no call, no spill
    const double md = sd * inv_m, mdx = sdx * inv_m;
    for (uint32_t s = 0; s < n; ++s)
        for (uint64_t i = threadIdx.x; i < hw; i += blockDim.x) {
            const uint64_t e = (static_cast<uint64_t>(s) * c + ch) * hw + i;
            const double d = (relu_y == nullptr || to_f32(relu_y[e]) > 0.0f) ? to_f32(dy[e]) : 0.0f;
            const double v = batch_stats ? gi * (d - md - (to_f32(x[e]) - mu) * is * mdx) : gi * d;
            dx[e] = from_f32<T>(static_cast<float>(v));
        }
}

// ------------------------------------------------------------------------------ NHWC reductions
// Per-channel sums over the rows (the pixels of every sample) of NHWC activations, split over
// grid.y so that large batches fill the device: block (x, y) covers channels [32 x, 32 x + 32)
// and rows [y rps, (y + 1) rps); a warp reads 32 consecutive channels of a row (coalesced), the
// block's 8 warps take every 8th row, each thread sums its rows in order (f64), and the block
// adds its 8 row lanes in order into part[y * c + ch]. nn_nhwc_finish then adds the splits in
// order: the same bits every run. Grid: (ceil(c / 32), splits), 256 threads.
constexpr uint32_t NHWC_LANES = 8;

// Sums of x (mean null) or of squared deviations from mean.
template <class T>
__device__ __forceinline__ void nhwc_partial(const T* __restrict__ x, const double* __restrict__ mean,
                                             double* __restrict__ part, uint64_t rows, uint32_t c, uint64_t rps) {
    __shared__ double red[NHWC_LANES][32];
    const uint32_t tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const uint32_t ch = blockIdx.x * 32 + tx;
    const uint64_t r0 = static_cast<uint64_t>(blockIdx.y) * rps;
    const uint64_t r1 = r0 + rps < rows ? r0 + rps : rows;
    double t = 0.0;
    if (ch < c) {
        const double mu = mean != nullptr ? mean[ch] : 0.0;
        for (uint64_t r = r0 + ty; r < r1; r += NHWC_LANES) {
            const float v = to_f32(x[r * c + ch]);
            if (mean != nullptr) {
                const double d = v - mu;
                t += d * d;
            } else {
                t += v;
            }
        }
    }
    red[ty][tx] = t;
    __syncthreads();
    if (ty == 0 && ch < c) {
        double sum = 0.0;
        for (uint32_t i = 0; i < NHWC_LANES; ++i) sum += red[i][tx];
        part[static_cast<uint64_t>(blockIdx.y) * c + ch] = sum;
    }
}

// BatchNorm backward's two sums (as bn_bwd): sum d into part[y * c + ch] and sum d xhat into
// part[(splits + y) * c + ch], d = dy masked by relu_y > 0 when relu_y is given.
template <class T>
__device__ __forceinline__ void nhwc_bn_bwd_partial(const T* __restrict__ x, const T* __restrict__ dy,
                                                    const T* __restrict__ relu_y, const double* __restrict__ mean,
                                                    const double* __restrict__ invstd, double* __restrict__ part,
                                                    uint64_t rows, uint32_t c, uint64_t rps, uint32_t splits) {
    __shared__ double red[2][NHWC_LANES][32];
    const uint32_t tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const uint32_t ch = blockIdx.x * 32 + tx;
    const uint64_t r0 = static_cast<uint64_t>(blockIdx.y) * rps;
    const uint64_t r1 = r0 + rps < rows ? r0 + rps : rows;
    double sd = 0.0, sdx = 0.0;
    if (ch < c) {
        const double mu = mean[ch], is = invstd[ch];
        for (uint64_t r = r0 + ty; r < r1; r += NHWC_LANES) {
            const uint64_t e = r * c + ch;
            const double d = (relu_y == nullptr || to_f32(relu_y[e]) > 0.0f) ? to_f32(dy[e]) : 0.0f;
            sd += d;
            sdx += d * ((to_f32(x[e]) - mu) * is);
        }
    }
    red[0][ty][tx] = sd;
    red[1][ty][tx] = sdx;
    __syncthreads();
    if (ty == 0 && ch < c) {
        double a = 0.0, b = 0.0;
        for (uint32_t i = 0; i < NHWC_LANES; ++i) {
            a += red[0][i][tx];
            b += red[1][i][tx];
        }
        part[static_cast<uint64_t>(blockIdx.y) * c + ch] = a;
        part[(static_cast<uint64_t>(splits) + blockIdx.y) * c + ch] = b;
    }
}

// BatchNorm backward's dx for NHWC activations, elementwise, from the per-channel sums sd and
// sdx (bn_bwd's formula and rounding).
template <class T>
__device__ __forceinline__ void nhwc_bn_bwd_apply(const T* __restrict__ x, const T* __restrict__ dy,
                                                  const T* __restrict__ relu_y, const double* __restrict__ mean,
                                                  const double* __restrict__ invstd, const float* __restrict__ gamma,
                                                  const double* __restrict__ sd, const double* __restrict__ sdx,
                                                  T* __restrict__ dx, uint64_t total, uint32_t c, double m,
                                                  uint32_t batch_stats) {
    const double inv_m = __drcp_rn(m);
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint32_t ch = static_cast<uint32_t>(i % c);
        const double mu = mean[ch], is = invstd[ch];
        const double gi = static_cast<double>(gamma[ch]) * is;
        const double md = sd[ch] * inv_m, mdx = sdx[ch] * inv_m;
        const double d = (relu_y == nullptr || to_f32(relu_y[i]) > 0.0f) ? to_f32(dy[i]) : 0.0f;
        const double v = batch_stats ? gi * (d - md - (to_f32(x[i]) - mu) * is * mdx) : gi * d;
        dx[i] = from_f32<T>(static_cast<float>(v));
    }
}

}  // namespace nnk
}  // namespace senet

using namespace senet;
using namespace senet::nnk;

// One extern "C" kernel per activation type: nn_..._f32, nn_..._bf16 and nn_..._f16.
#define SENET_NN_NORM_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_bn_stats_##NAME(const T* __restrict__ x, double* __restrict__ mean, double* __restrict__ var,           \
                           uint32_t n, uint32_t c, uint64_t hw) {                                                  \
        bn_stats<T>(x, mean, var, n, c, hw);                                                                       \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_bn_stats_##NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_affine_##NAME(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ a,                  \
                         const float* __restrict__ b, uint64_t total, uint32_t c, uint64_t hw, uint32_t relu,      \
                         uint32_t nhwc) {                                                                          \
        affine<T>(x, y, a, b, total, c, hw, relu, nhwc);                                                           \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_affine_##NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_bn_bwd_##NAME(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ relu_y,          \
                         const double* __restrict__ mean, const double* __restrict__ invstd,                       \
                         const float* __restrict__ gamma, float* __restrict__ dgamma, float* __restrict__ dbeta,   \
                         T* __restrict__ dx, uint32_t n, uint32_t c, uint64_t hw, uint32_t batch_stats) {          \
        bn_bwd<T>(x, dy, relu_y, mean, invstd, gamma, dgamma, dbeta, dx, n, c, hw, batch_stats);                   \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_bn_bwd_##NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_nhwc_partial_##NAME(const T* __restrict__ x, const double* __restrict__ mean,                           \
                               double* __restrict__ part, uint64_t rows, uint32_t c, uint64_t rps) {               \
        nhwc_partial<T>(x, mean, part, rows, c, rps);                                                              \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_nhwc_partial_##NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_nhwc_bn_bwd_partial_##NAME(const T* __restrict__ x, const T* __restrict__ dy,                           \
                                      const T* __restrict__ relu_y, const double* __restrict__ mean,               \
                                      const double* __restrict__ invstd, double* __restrict__ part, uint64_t rows, \
                                      uint32_t c, uint64_t rps, uint32_t splits) {                                 \
        nhwc_bn_bwd_partial<T>(x, dy, relu_y, mean, invstd, part, rows, c, rps, splits);                           \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_nhwc_bn_bwd_partial_##NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_nhwc_bn_bwd_apply_##NAME(const T* __restrict__ x, const T* __restrict__ dy,                             \
                                    const T* __restrict__ relu_y,                                                  \
                                    const double* __restrict__ mean, const double* __restrict__ invstd,            \
                                    const float* __restrict__ gamma, const double* __restrict__ sd,                \
                                    const double* __restrict__ sdx, T* __restrict__ dx, uint64_t total,            \
                                    uint32_t c, double m, uint32_t batch_stats) {                                  \
        nhwc_bn_bwd_apply<T>(x, dy, relu_y, mean, invstd, gamma, sd, sdx, dx, total, c, m, batch_stats);           \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_nhwc_bn_bwd_apply_##NAME)

SENET_NN_NORM_KERNELS(f32, float)
SENET_NN_NORM_KERNELS(bf16, __nv_bfloat16)
SENET_NN_NORM_KERNELS(f16, __half)

// The splits of nn_nhwc_partial added in order, one thread per channel: s = sum over z of
// part[z * c + ch], then out_d[ch] = s / div (f64) when out_d is given, and out_f[ch] (+)= s
// (f32, added when accumulate) when out_f is.
extern "C" __global__ void __launch_bounds__(256)
    nn_nhwc_finish(const double* __restrict__ part, uint32_t splits, uint32_t c, double div,
                   double* __restrict__ out_d, float* __restrict__ out_f, uint32_t accumulate) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0;
    for (uint32_t z = 0; z < splits; ++z) s += part[static_cast<uint64_t>(z) * c + ch];
    if (out_d != nullptr) out_d[ch] = s / div;
    if (out_f != nullptr) out_f[ch] = accumulate ? out_f[ch] + static_cast<float>(s) : static_cast<float>(s);
}
SENET_EMU_REGISTER(nn_nhwc_finish)

// BatchNorm's per-channel coefficients on the device, in the host layer's f64 order and
// rounding (no contraction), one thread per channel:
//   training (`train`): invstd = 1 / sqrt(var + eps) from the batch statistics, and the running
//     statistics move: rm = (1 - mo) rm + mo mean, rv = (1 - mo) rv + (mo var) unbias;
//   otherwise: mean = rm, invstd = 1 / sqrt(rv + eps) (and `mean_out` gets that mean);
//   then a = gamma invstd, b = beta - mean a (a in f64 before both roundings to f32).
extern "C" __global__ void __launch_bounds__(256)
    nn_bn_prepare_f32(const double* __restrict__ bmean, const double* __restrict__ bvar,
                      const float* __restrict__ gamma, const float* __restrict__ beta, float* __restrict__ rm,
                      float* __restrict__ rv, double* __restrict__ mean_out, double* __restrict__ invstd_out,
                      float* __restrict__ a, float* __restrict__ b, uint32_t c, double eps, double mo,
                      double unbias, uint32_t train) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double mean, is;
    if (train) {
        mean = bmean[ch];
        const double var = bvar[ch];
        is = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, eps)));
        const double keep = __dsub_rn(1.0, mo);
        rm[ch] = static_cast<float>(__dadd_rn(__dmul_rn(keep, static_cast<double>(rm[ch])), __dmul_rn(mo, mean)));
        rv[ch] = static_cast<float>(
            __dadd_rn(__dmul_rn(keep, static_cast<double>(rv[ch])), __dmul_rn(__dmul_rn(mo, var), unbias)));
    } else {
        mean = static_cast<double>(rm[ch]);
        is = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(static_cast<double>(rv[ch]), eps)));
        mean_out[ch] = mean;
    }
    invstd_out[ch] = is;
    const double av = __dmul_rn(static_cast<double>(gamma[ch]), is);
    a[ch] = static_cast<float>(av);
    b[ch] = static_cast<float>(__dsub_rn(static_cast<double>(beta[ch]), __dmul_rn(mean, av)));
}
SENET_EMU_REGISTER(nn_bn_prepare_f32)
