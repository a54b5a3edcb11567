// Shared device helpers: element types, 16-byte vectors, activations, reductions, tickets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "abi.h"

// Under the CPU emulator (kernels/emu, SENET_EMU) these register each kernel by name and map
// dynamic shared memory; on the GPU they are the plain CUDA forms.
#ifndef SENET_EMU
#define SENET_EMU_REGISTER(fn)
#define SENET_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "senet kernels need compute capability 8.0 or newer (bf16 arithmetic)"
#endif

namespace senet {

// ---------------------------------------------------------------- element conversions

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Elements in one 16-byte vector.
template <typename T> struct Vec {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[Vec<T>::N]) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) f[i] = to_f32(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[Vec<T>::N]) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_f32<T>(f[i]);
    return v;
}

// Global loads and stores. `ld_stream`/`st_stream` mark data used once (evict first); the
// default path keeps lines in L2 for a second pass.
__device__ __forceinline__ uint4 ld_vec(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
// A coherent load, for buffers the same kernel also writes (accumulation into dx).
__device__ __forceinline__ uint4 ld_vec_rw(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint4 ld_vec_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void st_vec(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ void st_vec_stream(void* p, uint4 v) { __stcs(reinterpret_cast<uint4*>(p), v); }

template <typename T> __device__ __forceinline__ float ld_scalar(const T* p) { return to_f32(p[0]); }

// ---------------------------------------------------------------- activations and gates

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_fwd(uint32_t act, float h) {
    return act == SENET_ACT_SILU ? h * sigmoidf_(h) : fmaxf(h, 0.0f);
}

__device__ __forceinline__ float act_grad(uint32_t act, float h) {
    if (act == SENET_ACT_SILU) {
        float s = sigmoidf_(h);
        return s * (1.0f + h * (1.0f - s));
    }
    return h > 0.0f ? 1.0f : 0.0f;
}

__device__ __forceinline__ float gate_fwd(uint32_t gate, float a) {
    return gate == SENET_GATE_HARDSIGMOID ? fminf(fmaxf(a + 3.0f, 0.0f), 6.0f) / 6.0f : sigmoidf_(a);
}

// gate'(a) from s = gate(a): sigmoid' = s (1 - s); hard-sigmoid' = 1/6 strictly inside its ramp.
__device__ __forceinline__ float gate_grad_from_s(uint32_t gate, float s) {
    if (gate == SENET_GATE_HARDSIGMOID) return (s > 0.0f && s < 1.0f) ? (1.0f / 6.0f) : 0.0f;
    return s * (1.0f - s);
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Alignment helpers. `aligned_head` is the number of T elements from `p` up to the next 16-byte
// boundary (0 if already aligned), clamped to `count`.
template <typename T>
__device__ __forceinline__ uint64_t aligned_head(const T* p, uint64_t count) {
    uint64_t h = ((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T);
    return h < count ? h : count;
}

__device__ __forceinline__ uint32_t misalign(const void* p) {
    return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Split-reduction tickets. Every block of a group calls this after writing its partials; it
// returns true in exactly one block of the group, the last to arrive, which then combines the
// partials in a fixed order (so results do not depend on which block came last) and must reset
// the ticket with `ticket_reset` for the next launch.
__device__ __forceinline__ bool ticket_arrive_last(unsigned int* ticket, uint32_t members) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        unsigned int prev = atomicAdd(ticket, 1u);
        last = (prev == members - 1u);
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

__device__ __forceinline__ void ticket_reset(unsigned int* ticket) {
    if (threadIdx.x == 0 && threadIdx.y == 0) *ticket = 0u;
}

}  // namespace senet

// Stamps out one extern "C" kernel per element type: NAME_f32, NAME_f16, NAME_bf16.
#define SENET_FOR_EACH_DTYPE(MACRO) \
    MACRO(f32, float)               \
    MACRO(f16, __half)              \
    MACRO(bf16, __nv_bfloat16)
