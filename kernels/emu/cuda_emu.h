// senet's CPU emulation of the CUDA subset its kernels use, so the same kernels/*.cu sources
// compile with a host C++ compiler and run on the CPU (tests and CI without a GPU).
//
// Model: one fiber per CUDA thread; a block's fibers run on one OS thread and switch only at
// barriers (__syncthreads, warp shuffles, cluster.sync), so code between barriers runs as if
// each thread ran alone. The blocks of a thread-block cluster run on separate OS threads at the
// same time, with a real barrier for cluster.sync and real cross-block shared-memory access;
// other grids' blocks run on SENET_EMU_THREADS OS threads (1 by default, 2 in checking builds).
// Static __shared__ variables are thread_local (one copy per OS thread); build.rs registers each
// declaration (SENET_EMU_SHARED) so it is poisoned per block and initcheck can watch it.
// README.md in this folder: what the checking builds (TSan, ASan + UBSan, initcheck) catch, and
// what this cannot show (timing, the hardware memory model beyond the annotated barriers, bank
// conflicts).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define SENET_DYNAMIC_SMEM(name) unsigned char* name = senet_emu::dynamic_smem()

struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace senet_emu {

struct ThreadState {
    dim3 tid;
    unsigned int linear;
};

struct BlockState {
    dim3 block_idx, block_dim, grid_dim;
};

extern thread_local ThreadState* g_thread;
extern thread_local BlockState* g_block_state;

unsigned char* dynamic_smem();
void syncthreads();
void warp_exchange(uint64_t value, uint64_t* out, int src_lane_xor);
void cluster_sync();
unsigned int cluster_rank();
void* map_shared_rank(void* p, unsigned int rank);
void shared_var(void* p, std::size_t bytes, const char* name);
void check_vector_align(const void* p, const char* what);
[[noreturn]] void fail(const char* msg);

}  // namespace senet_emu

// Added by build.rs after each static __shared__ declaration (same line): registers the variable
// with the running block, which poisons it once per block and (initcheck) tracks its writes.
#define SENET_EMU_SHARED(name) senet_emu::shared_var(static_cast<void*>(&(name)), sizeof(name), #name)

#define threadIdx (senet_emu::g_thread->tid)
#define blockIdx (senet_emu::g_block_state->block_idx)
#define blockDim (senet_emu::g_block_state->block_dim)
#define gridDim (senet_emu::g_block_state->grid_dim)

inline void __syncthreads() { senet_emu::syncthreads(); }
inline double __drcp_rn(double x) { return 1.0 / x; }
// Single-rounding float arithmetic (never contracted into an FMA: the emulator builds with
// -ffp-contract=off and nvcc with --fmad=false; an FMA a kernel wants is an explicit fmaf).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

template <typename T>
inline T __shfl_xor_sync(unsigned int /*mask*/, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t bits = 0, out = 0;
    std::memcpy(&bits, &v, sizeof(T));
    senet_emu::warp_exchange(bits, &out, lane_mask);
    T r;
    std::memcpy(&r, &out, sizeof(T));
    return r;
}

// Cache-hinted loads and stores are plain accesses on the CPU.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
// 16-byte vector forms check the alignment a GPU faults on (naming the kernel and address);
// plain dereferences of a misaligned uint4 are caught by UBSan in the address build.
inline uint4 __ldg(const uint4* p) {
    senet_emu::check_vector_align(p, "__ldg");
    return *p;
}
inline uint4 __ldcs(const uint4* p) {
    senet_emu::check_vector_align(p, "__ldcs");
    return *p;
}
inline uint4 __ldcg(const uint4* p) {
    senet_emu::check_vector_align(p, "__ldcg");
    return *p;
}
inline void __stcs(uint4* p, uint4 v) {
    senet_emu::check_vector_align(p, "__stcs");
    *p = v;
}

template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}

// ------------------------------------------------------------------ f16 and bf16
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h) {
    const uint32_t sign = (h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ffu, f;
    if (exp == 0x1f) {
        f = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            f = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            f = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        f = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    std::memcpy(&out, &f, 4);
    return out;
}

inline __half __float2half_rn(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    __half h;
    if (ax >= 0x7f800000u) {  // inf or nan
        h.bits = sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);
        return h;
    }
    if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
        h.bits = sign | 0x7c00u;
        return h;
    }
    if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        const float af = std::fabs(v);
        // value / 2^-24, rounded to nearest even
        const float scaled = af * 16777216.0f;
        float r = std::nearbyint(scaled);
        h.bits = sign | static_cast<uint16_t>(r);
        return h;
    }
    const uint32_t exp = ((ax >> 23) - 112) << 10;
    const uint32_t man = ax & 0x7fffffu;
    uint32_t bits = exp | (man >> 13);
    const uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (bits & 1u))) ++bits;
    h.bits = sign | static_cast<uint16_t>(bits);
    return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t f = static_cast<uint32_t>(b.bits) << 16;
    float out;
    std::memcpy(&out, &f, 4);
    return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    __nv_bfloat16 b;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        b.bits = static_cast<uint16_t>((x >> 16) | 0x40u);
        return b;
    }
    const uint32_t lsb = (x >> 16) & 1u;
    x += 0x7fffu + lsb;
    b.bits = static_cast<uint16_t>(x >> 16);
    return b;
}

// ------------------------------------------------------------------ cooperative groups
namespace cooperative_groups {
struct cluster_group {
    unsigned int block_rank() const { return senet_emu::cluster_rank(); }
    void sync() const { senet_emu::cluster_sync(); }
    template <typename T>
    T* map_shared_rank(T* p, unsigned int rank) const {
        return static_cast<T*>(senet_emu::map_shared_rank(static_cast<void*>(p), rank));
    }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

// ------------------------------------------------------------------ kernel registry
namespace senet_emu {
using Thunk = void (*)(void* fn, void** args);

void register_kernel(const char* name, void* fn, Thunk thunk);

template <typename... A, std::size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
void thunk_for(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}

struct Registrar {
    template <typename... A>
    Registrar(const char* name, void (*fn)(A...)) {
        register_kernel(name, reinterpret_cast<void*>(fn), &thunk_for<A...>);
    }
};
}  // namespace senet_emu

#define SENET_EMU_REGISTER(fn) static senet_emu::Registrar senet_emu_registrar_##fn(#fn, &fn);
