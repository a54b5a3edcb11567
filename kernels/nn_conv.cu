// Convolutions: the implicit-GEMM engine (forward, input gradient, weight gradient, reading
// activations in place through the conv_tap functors), the im2col engine (im2col, col2im and
// blas_gemm, the emulator's stand-in for cuBLAS with its column-major contract), and the
// weight relayouts to and from cuDNN's KRSC filter order. The Rust side: src/nn/backend/cuda/
// conv.rs and im2col.rs.
//
// Shared pieces (act_at, the tiled GEMM, block sums) are in nn_common.cuh; every kernel body is a
// template over the activation type, instantiated below as NAME_f32, NAME_bf16 and NAME_f16.
#include "nn_common.cuh"

namespace senet {
namespace nnk {

// The input value under kernel tap (ci, kh, kw) of output pixel (oh, ow), or 0 in the padding.
template <class T>
__device__ __forceinline__ float conv_tap(const NnConvParams& p, const T* __restrict__ x, uint32_t sample,
                                          uint32_t group, uint32_t kidx, uint32_t pix) {
    const uint32_t kk2 = p.k * p.k;
    const uint32_t ci = kidx / kk2, r = kidx % kk2;
    const uint32_t kh = r / p.k, kw = r % p.k;
    const uint32_t oh = pix / p.ow, ow = pix % p.ow;
    const int ih = static_cast<int>(oh * p.stride + kh) - static_cast<int>(p.pad);
    const int iw = static_cast<int>(ow * p.stride + kw) - static_cast<int>(p.pad);
    if (ih < 0 || iw < 0 || ih >= static_cast<int>(p.h) || iw >= static_cast<int>(p.w)) return 0.0f;
    const uint64_t c = static_cast<uint64_t>(group) * p.icg + ci;
    const uint32_t at = static_cast<uint32_t>(ih) * p.w + static_cast<uint32_t>(iw);
    return to_f32(x[act_at(p.flags & SENET_NN_NHWC, sample, c, at, p.c, static_cast<uint64_t>(p.h) * p.w)]);
}

struct ConvFwdA {  // W(m, k) of group g
    const NnConvParams& p;
    const float* w;
    uint32_t g;
    __device__ float operator()(uint32_t m, uint32_t k) const {
        return w[(static_cast<uint64_t>(g) * p.ocg + m) * p.kdepth + k];
    }
};

template <class T>
struct ConvFwdB {  // im2col(x)(k, pixel) of one sample
    const NnConvParams& p;
    const T* x;
    uint32_t s, g;
    __device__ float operator()(uint32_t k, uint32_t pix) const { return conv_tap(p, x, s, g, k, pix); }
};

struct ConvDataA {  // W(ci, (oc, kh, kw)) of group g
    const NnConvParams& p;
    const float* w;
    uint32_t g;
    __device__ float operator()(uint32_t ci, uint32_t k) const {
        const uint32_t kk2 = p.k * p.k;
        const uint32_t oc = k / kk2, r = k % kk2;
        return w[((static_cast<uint64_t>(g) * p.ocg + oc) * p.icg + ci) * kk2 + r];
    }
};

template <class T>
struct ConvDataB {  // dy((oc, kh, kw), input pixel): the output pixel whose tap (kh, kw) reads it
    const NnConvParams& p;
    const T* dy;
    uint32_t s, g;
    __device__ float operator()(uint32_t k, uint32_t pix) const {
        const uint32_t kk2 = p.k * p.k;
        const uint32_t oc = k / kk2, r = k % kk2;
        const uint32_t kh = r / p.k, kw = r % p.k;
        const int th = static_cast<int>(pix / p.w + p.pad) - static_cast<int>(kh);
        const int tw = static_cast<int>(pix % p.w + p.pad) - static_cast<int>(kw);
        if (th < 0 || tw < 0) return 0.0f;
        const uint32_t uh = static_cast<uint32_t>(th), uw = static_cast<uint32_t>(tw);
        if (uh % p.stride != 0 || uw % p.stride != 0) return 0.0f;
        const uint32_t oh = uh / p.stride, ow = uw / p.stride;
        if (oh >= p.oh || ow >= p.ow) return 0.0f;
        const uint64_t c = static_cast<uint64_t>(g) * p.ocg + oc;
        return to_f32(dy[act_at(p.flags & SENET_NN_NHWC, s, c, oh * p.ow + ow, p.oc,
                                static_cast<uint64_t>(p.oh) * p.ow)]);
    }
};

template <class T>
struct ConvWgtA {  // dy(oc, (sample, pixel)) of group g
    const NnConvParams& p;
    const T* dy;
    uint32_t g;
    __device__ float operator()(uint32_t oc, uint32_t q) const {
        const uint32_t P = p.oh * p.ow;
        const uint64_t s = q / P, pix = q % P;
        return to_f32(dy[act_at(p.flags & SENET_NN_NHWC, s, static_cast<uint64_t>(g) * p.ocg + oc, pix, p.oc, P)]);
    }
};

template <class T>
struct ConvWgtB {  // im2col(x)((sample, pixel), k) of group g
    const NnConvParams& p;
    const T* x;
    uint32_t g;
    __device__ float operator()(uint32_t q, uint32_t k) const {
        const uint32_t P = p.oh * p.ow;
        return conv_tap(p, x, q / P, g, k, q % P);
    }
};

// ------------------------------------------------------------------------------ convolution
// Each kernel body is a template over the activation type T (float or __nv_bfloat16); the
// extern "C" entry points at the end of the file instantiate it as NAME_f32 and NAME_bf16.

// y = conv(x, w) (+ bias). Grid: (output-pixel tiles, out-channel tiles, samples * groups).
template <class T>
__device__ __forceinline__ void conv_fwd(const NnConvParams& p, const T* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ bias, T* __restrict__ y) {
    const uint32_t s = blockIdx.z / p.groups, g = blockIdx.z % p.groups;
    const uint32_t P = p.oh * p.ow;
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4];
    tile_gemm(ConvFwdA{p, w, g}, ConvFwdB<T>{p, x, s, g}, p.ocg, P, 0, p.kdepth, m0, n0, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t m = m0 + ty * 4 + i;
        if (m >= p.ocg) continue;
        const uint64_t c = static_cast<uint64_t>(g) * p.ocg + m;
        const float b = (p.flags & SENET_NN_BIAS) ? bias[c] : 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t n = n0 + tx * 4 + j;
            if (n < P) y[act_at(p.flags & SENET_NN_NHWC, s, c, n, p.oc, P)] = from_f32<T>(acc[i][j] + b);
        }
    }
}

// dx = conv_transpose(dy, w). Grid: (input-pixel tiles, in-channel tiles, samples * groups).
template <class T>
__device__ __forceinline__ void conv_bwd_data(const NnConvParams& p, const T* __restrict__ dy,
                                              const float* __restrict__ w, T* __restrict__ dx) {
    const uint32_t s = blockIdx.z / p.groups, g = blockIdx.z % p.groups;
    const uint32_t HW = p.h * p.w;
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const uint32_t K = p.ocg * p.k * p.k;
    float acc[4][4];
    tile_gemm(ConvDataA{p, w, g}, ConvDataB<T>{p, dy, s, g}, p.icg, HW, 0, K, m0, n0, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t m = m0 + ty * 4 + i;
        if (m >= p.icg) continue;
        const uint64_t c = static_cast<uint64_t>(g) * p.icg + m;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t n = n0 + tx * 4 + j;
            if (n < HW) dx[act_at(p.flags & SENET_NN_NHWC, s, c, n, p.c, HW)] = from_f32<T>(acc[i][j]);
        }
    }
}

// dw (+)= sum over samples and output pixels of dy * im2col(x) (dw in f32). Grid: (tap tiles,
// out-channel tiles, groups * splits). The GEMM depth (samples x output pixels) is long and the
// output small, so it is split `splits` ways (k_per_split each, a multiple of the K tile): with
// one split the block writes dw; otherwise split z writes its partial sums to partial[z]
// (out_ch * kdepth floats each) and nn_sum_splits_f32 adds them in split order.
template <class T>
__device__ __forceinline__ void conv_bwd_weight(const NnConvParams& p, const T* __restrict__ x,
                                                const T* __restrict__ dy, float* __restrict__ dw,
                                                float* __restrict__ partial, uint32_t splits,
                                                uint32_t k_per_split) {
    const uint32_t g = blockIdx.z % p.groups, split = blockIdx.z / p.groups;
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const uint32_t K = p.n * p.oh * p.ow;
    const uint32_t kb = split * k_per_split, ke = min(K, kb + k_per_split);
    float acc[4][4];
    tile_gemm(ConvWgtA<T>{p, dy, g}, ConvWgtB<T>{p, x, g}, p.ocg, p.kdepth, kb, ke, m0, n0, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const uint64_t plane = static_cast<uint64_t>(p.oc) * p.kdepth;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t m = m0 + ty * 4 + i;
        if (m >= p.ocg) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t n = n0 + tx * 4 + j;
            if (n >= p.kdepth) continue;
            const uint64_t at = (static_cast<uint64_t>(g) * p.ocg + m) * p.kdepth + n;
            if (splits > 1) {
                partial[split * plane + at] = acc[i][j];
            } else {
                dw[at] = (p.flags & SENET_NN_ACCUMULATE) ? dw[at] + acc[i][j] : acc[i][j];
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void weight_krsc(const float* __restrict__ w, T* __restrict__ dst, uint64_t k, uint64_t c,
                                            uint64_t rs) {
    const uint64_t total = k * c * rs;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint64_t o = i / (rs * c), r = (i % (rs * c)) / c, ci = i % c;
        dst[i] = from_f32<T>(w[(o * c + ci) * rs + r]);
    }
}

// dst (KCRS, f32) (+)= src (KRSC, T): a weight gradient cuDNN formed for NHWC activations.
template <class T>
__device__ __forceinline__ void grad_from_krsc(const T* __restrict__ src, float* __restrict__ dst, uint64_t k,
                                               uint64_t c, uint64_t rs, uint32_t accumulate) {
    const uint64_t total = k * c * rs;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint64_t o = i / (c * rs), ci = (i % (c * rs)) / rs, r = i % rs;
        const float v = to_f32(src[(o * rs + r) * c + ci]);
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// ------------------------------------------------------------------------------ im2col + GEMM
// The im2col convolution engine: im2col writes the input taps of a chunk of samples as
// col[group][sample][pixel][k] (k = (ci, kh, kw), PyTorch's weight order, contiguous), a GEMM
// (cuBLAS on a GPU; blas_gemm below, with cuBLAS's exact column-major semantics, on the
// emulator) multiplies, and col2im gathers the input gradient from dcol (same layout, f32).

// One operand of a column-major GEMM: op(M)(i, l) = M[i + l ld], or M[l + i ld] transposed.
template <class T>
struct ColMajor {
    const T* p;
    int64_t ld;
    uint32_t trans;
    __device__ float operator()(uint32_t i, uint32_t l) const {
        return to_f32(trans ? p[l + static_cast<int64_t>(i) * ld] : p[i + static_cast<int64_t>(l) * ld]);
    }
};

// cublasGemmStridedBatchedEx's contract (f32 compute): for batch z = blockIdx.z,
// C_z = alpha op(A_z) op(B_z) + beta C_z, column-major, op(A) m x k, op(B) k x n, X_z = X + z
// stride_x; C is not read when beta is 0. Grid: (n tiles, m tiles, batch).
template <class TA, class TB, class TC>
__device__ __forceinline__ void blas_gemm(uint32_t transa, uint32_t transb, uint32_t m, uint32_t n, uint32_t k,
                                          float alpha, const TA* __restrict__ A, int64_t lda, int64_t sa,
                                          const TB* __restrict__ B, int64_t ldb, int64_t sb, float beta,
                                          TC* __restrict__ C, int64_t ldc, int64_t sc) {
    const int64_t z = blockIdx.z;
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    float acc[4][4];
    tile_gemm(ColMajor<TA>{A + z * sa, lda, transa}, ColMajor<TB>{B + z * sb, ldb, transb}, m, n, 0, k, m0, n0,
              acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    TC* Cz = C + z * sc;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t r = m0 + ty * 4 + i;
        if (r >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t col = n0 + tx * 4 + j;
            if (col >= n) continue;
            TC* out = Cz + r + static_cast<int64_t>(col) * ldc;
            const float v = alpha * acc[i][j];
            *out = from_f32<TC>(beta != 0.0f ? v + beta * to_f32(*out) : v);
        }
    }
}

// col[g][s][pix][k] = the input under tap k of output pixel pix (0 in the padding), for the
// p.n samples at x. One thread per col element.
template <class T>
__device__ __forceinline__ void im2col(const NnConvParams& p, const T* __restrict__ x, T* __restrict__ col) {
    const uint64_t P = static_cast<uint64_t>(p.oh) * p.ow, K = p.kdepth;
    const uint64_t total = static_cast<uint64_t>(p.groups) * p.n * P * K;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const uint32_t kidx = static_cast<uint32_t>(i % K);
        const uint64_t r = i / K;
        const uint32_t pix = static_cast<uint32_t>(r % P);
        const uint64_t gs = r / P;
        const uint32_t s = static_cast<uint32_t>(gs % p.n), g = static_cast<uint32_t>(gs / p.n);
        col[i] = from_f32<T>(conv_tap(p, x, s, g, kidx, pix));
    }
}

// dx = the sum, over the taps (kh, kw) whose output pixel reads it, of dcol[g][s][pix][k] (f32),
// in tap order; one thread per dx element of the p.n samples at dx (storage order).
template <class T>
__device__ __forceinline__ void col2im(const NnConvParams& p, const float* __restrict__ dcol, T* __restrict__ dx) {
    const uint32_t nhwc = p.flags & SENET_NN_NHWC;
    const uint64_t HW = static_cast<uint64_t>(p.h) * p.w, P = static_cast<uint64_t>(p.oh) * p.ow, K = p.kdepth;
    const uint64_t total = static_cast<uint64_t>(p.n) * p.c * HW;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        uint32_t s, c, pix;
        if (nhwc) {
            c = static_cast<uint32_t>(i % p.c);
            pix = static_cast<uint32_t>((i / p.c) % HW);
            s = static_cast<uint32_t>(i / (p.c * HW));
        } else {
            pix = static_cast<uint32_t>(i % HW);
            c = static_cast<uint32_t>((i / HW) % p.c);
            s = static_cast<uint32_t>(i / (HW * p.c));
        }
        const uint32_t g = c / p.icg, ci = c % p.icg;
        const uint32_t ih = pix / p.w, iw = pix % p.w;
        const float* base = dcol + (static_cast<uint64_t>(g) * p.n + s) * P * K;
        float t = 0.0f;
        for (uint32_t kh = 0; kh < p.k; ++kh) {
            const int th = static_cast<int>(ih + p.pad) - static_cast<int>(kh);
            if (th < 0 || th % static_cast<int>(p.stride) != 0) continue;
            const uint32_t oh = static_cast<uint32_t>(th) / p.stride;
            if (oh >= p.oh) continue;
            for (uint32_t kw = 0; kw < p.k; ++kw) {
                const int tw = static_cast<int>(iw + p.pad) - static_cast<int>(kw);
                if (tw < 0 || tw % static_cast<int>(p.stride) != 0) continue;
                const uint32_t ow = static_cast<uint32_t>(tw) / p.stride;
                if (ow >= p.ow) continue;
                t += base[(static_cast<uint64_t>(oh) * p.ow + ow) * K + (ci * p.k + kh) * p.k + kw];
            }
        }
        dx[i] = from_f32<T>(t);
    }
}

// dst[i] = src[i] converted (f32 <-> bf16 / f16, or a copy): host tensors, f32 weights and f32
// sums to and from activations.

}  // namespace nnk
}  // namespace senet

using namespace senet;
using namespace senet::nnk;

// One extern "C" kernel per activation type: nn_..._f32, nn_..._bf16 and nn_..._f16.
#define SENET_NN_CONV_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_conv_fwd_##NAME(NnConvParams p, const T* __restrict__ x, const float* __restrict__ w,                   \
                           const float* __restrict__ bias, T* __restrict__ y) {                                    \
        conv_fwd<T>(p, x, w, bias, y);                                                                             \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_conv_fwd_##NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_conv_bwd_data_##NAME(NnConvParams p, const T* __restrict__ dy, const float* __restrict__ w,             \
                                T* __restrict__ dx) {                                                              \
        conv_bwd_data<T>(p, dy, w, dx);                                                                            \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_conv_bwd_data_##NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_conv_bwd_weight_##NAME(NnConvParams p, const T* __restrict__ x, const T* __restrict__ dy,               \
                                  float* __restrict__ dw, float* __restrict__ partial, uint32_t splits,            \
                                  uint32_t k_per_split) {                                                          \
        conv_bwd_weight<T>(p, x, dy, dw, partial, splits, k_per_split);                                            \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_conv_bwd_weight_##NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_weight_krsc_##NAME(const float* __restrict__ w, T* __restrict__ dst, uint64_t k, uint64_t c,            \
                              uint64_t rs) {                                                                       \
        weight_krsc<T>(w, dst, k, c, rs);                                                                          \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_weight_krsc_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_grad_from_krsc_##NAME(const T* __restrict__ src, float* __restrict__ dst, uint64_t k, uint64_t c,       \
                                 uint64_t rs, uint32_t accumulate) {                                               \
        grad_from_krsc<T>(src, dst, k, c, rs, accumulate);                                                         \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_grad_from_krsc_##NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_blas_act_##NAME(uint32_t transa, uint32_t transb, uint32_t m, uint32_t n, uint32_t k, float alpha,      \
                           const T* __restrict__ A, int64_t lda, int64_t sa, const T* __restrict__ B, int64_t ldb, \
                           int64_t sb, float beta, T* __restrict__ C, int64_t ldc, int64_t sc) {                   \
        blas_gemm<T, T, T>(transa, transb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc);              \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_blas_act_##NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_blas_f32out_##NAME(uint32_t transa, uint32_t transb, uint32_t m, uint32_t n, uint32_t k, float alpha,   \
                              const T* __restrict__ A, int64_t lda, int64_t sa, const T* __restrict__ B,           \
                              int64_t ldb, int64_t sb, float beta, float* __restrict__ C, int64_t ldc,             \
                              int64_t sc) {                                                                        \
        blas_gemm<T, T, float>(transa, transb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc);          \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_blas_f32out_##NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_im2col_##NAME(NnConvParams p, const T* __restrict__ x, T* __restrict__ col) {                          \
        im2col<T>(p, x, col);                                                                                      \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_im2col_##NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_col2im_##NAME(NnConvParams p, const float* __restrict__ dcol, T* __restrict__ dx) {                    \
        col2im<T>(p, dcol, dx);                                                                                    \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_col2im_##NAME)

SENET_NN_CONV_KERNELS(f32, float)
SENET_NN_CONV_KERNELS(bf16, __nv_bfloat16)
SENET_NN_CONV_KERNELS(f16, __half)
