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

// ------------------------------------------------------------------------------ entry points

// One extern "C" kernel per activation type: nn_..._f32 and nn_..._bf16.
#define SENET_NN_KERNELS(NAME, T)                                                                                  \
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
        nn_channel_sum_##NAME(const T* __restrict__ a, float* __restrict__ out, uint32_t n, uint32_t c,            \
                              uint64_t hw, uint32_t accumulate) {                                                  \
        channel_sum<T>(a, out, n, c, hw, accumulate);                                                              \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_channel_sum_##NAME)                                                                      \
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
        nn_pointwise_##NAME(uint32_t op, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,      \
                            uint64_t total) {                                                                      \
        pointwise<T>(op, a, b, y, total);                                                                          \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_pointwise_##NAME)                                                                        \
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
    SENET_EMU_REGISTER(nn_gap_bwd_##NAME)                                                                          \
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
        nn_to_act_##NAME(const float* __restrict__ src, T* __restrict__ dst, uint64_t n) {                         \
        convert<float, T>(src, dst, n);                                                                            \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_to_act_##NAME)                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        nn_from_act_##NAME(const T* __restrict__ src, float* __restrict__ dst, uint64_t n) {                       \
        convert<T, float>(src, dst, n);                                                                            \
    }                                                                                                              \
    SENET_EMU_REGISTER(nn_from_act_##NAME)                                                                         \
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
    SENET_EMU_REGISTER(nn_copy_cols_##NAME)                                                                        \
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
    SENET_EMU_REGISTER(nn_nhwc_bn_bwd_apply_##NAME)                                                                \
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

SENET_NN_KERNELS(f32, float)
SENET_NN_KERNELS(bf16, __nv_bfloat16)
SENET_NN_KERNELS(f16, __half)

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

// Loss scaling: g *= factor, and flag[0] = 1 when a result is not finite (every writer stores
// the same value, so the unordered writes agree).
extern "C" __global__ void __launch_bounds__(256)
    nn_unscale_f32(float* __restrict__ g, uint64_t n, float factor, uint32_t* __restrict__ flag) {
    bool bad = false;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
        const float v = g[i] * factor;
        g[i] = v;
        bad |= !(fabsf(v) <= 3.402823466e38f);  // NaN fails the comparison
    }
    if (bad) flag[0] = 1u;
}
SENET_EMU_REGISTER(nn_unscale_f32)

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
