/* senet kernel ABI: the parameter structs kernels take by value.
 *
 * bindgen turns this header into src/cuda/abi.rs (checked in; CI proves it matches). Keep it C:
 * fixed-width fields, largest first, no pointers (device pointers travel as separate kernel
 * arguments so cudarc can track them). Every struct's size and alignment is pinned below and
 * asserted again on the Rust side.
 */
#ifndef SENET_ABI_H
#define SENET_ABI_H

#include <stdint.h>

/* Activation layouts. */
#define SENET_LAYOUT_NCHW 0u
#define SENET_LAYOUT_NHWC 1u

/* Hidden activations. */
#define SENET_ACT_RELU 0u
#define SENET_ACT_SILU 1u

/* Gates. */
#define SENET_GATE_SIGMOID 0u
#define SENET_GATE_HARDSIGMOID 1u

/* SeParams.flags bits. */
#define SENET_FLAG_RESIDUAL 1u   /* fused epilogue: y = relu(s * x + residual) */
#define SENET_FLAG_ACCUMULATE 2u /* gradient kernels add into the output instead of overwriting */
#define SENET_FLAG_BIAS 4u       /* the FC layers carry biases */
#define SENET_FLAG_VEC 8u        /* every pointer of the launch shares one 16-byte alignment */

/* SeGemmParams.epilogue values. */
#define SENET_EPI_STORE 0u /* C = acc */
#define SENET_EPI_FC1 1u   /* C = acc + bias (hidden pre-activation), C2 = act(C) */
#define SENET_EPI_FC2 2u   /* C = gate(acc + bias) */
#define SENET_EPI_DU 3u    /* C = acc * act'(aux) */

/* One SE launch over a block of samples. */
typedef struct SeParams {
    uint64_t n;        /* samples in this launch */
    uint64_t hw;       /* H * W */
    uint64_t hw_split; /* pooling kernels: elements of hw per split (a multiple of 8) */
    uint32_t c;        /* channels */
    uint32_t hidden;   /* excitation width */
    uint32_t layout;   /* SENET_LAYOUT_* */
    uint32_t act;      /* SENET_ACT_* */
    uint32_t gate;     /* SENET_GATE_* */
    uint32_t flags;    /* SENET_FLAG_* */
    uint32_t splits;   /* pooling kernels: blocks that share one (sample, channel tile) along hw */
    uint32_t rows;     /* pooling kernels (NCHW, short rows): rows staged per block */
    float inv_hw;      /* 1 / hw */
    uint32_t reserved;
} SeParams;

/* out[m][n] = epilogue(sum_k A(m, k) * B(k, n)), f32, strides in elements. */
typedef struct SeGemmParams {
    int64_t sa_m; /* A(m, k) = A[m * sa_m + k * sa_k] */
    int64_t sa_k;
    int64_t sb_k; /* B(k, n) = B[k * sb_k + n * sb_n] */
    int64_t sb_n;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t k_splits;    /* split-K factor (grid.z) */
    uint32_t k_per_split; /* K elements per split, a multiple of the K tile */
    uint32_t epilogue;    /* SENET_EPI_* */
    uint32_t act;
    uint32_t gate;
    uint32_t flags; /* SENET_FLAG_BIAS */
    uint32_t reserved;
} SeGemmParams;

/* NnConvParams.flags bits. */
#define SENET_NN_BIAS 1u       /* the forward adds a per-output-channel bias */
#define SENET_NN_ACCUMULATE 2u /* the weight gradient adds into dw instead of overwriting */
#define SENET_NN_NHWC 4u       /* activations (x, y and their gradients) are NHWC, not NCHW */

/* One convolution (NCHW or NHWC activations, square kernel, groups), for the network kernels of nn_*.cu. */
typedef struct NnConvParams {
    uint32_t n;      /* batch */
    uint32_t c;      /* input channels */
    uint32_t h;      /* input height */
    uint32_t w;      /* input width */
    uint32_t oc;     /* output channels */
    uint32_t oh;     /* output height */
    uint32_t ow;     /* output width */
    uint32_t k;      /* kernel size */
    uint32_t stride;
    uint32_t pad;
    uint32_t groups;
    uint32_t icg;    /* input channels per group */
    uint32_t ocg;    /* output channels per group */
    uint32_t kdepth; /* icg * k * k: the forward GEMM's depth */
    uint32_t flags;  /* SENET_NN_* */
    uint32_t reserved;
} NnConvParams;

#define SENET_SE_PARAMS_SIZE 64
#define SENET_SE_PARAMS_ALIGN 8
#define SENET_GEMM_PARAMS_SIZE 72
#define SENET_GEMM_PARAMS_ALIGN 8
#define SENET_NN_CONV_PARAMS_SIZE 64
#define SENET_NN_CONV_PARAMS_ALIGN 4

#if defined(__cplusplus)
static_assert(sizeof(SeParams) == SENET_SE_PARAMS_SIZE, "SeParams size");
static_assert(alignof(SeParams) == SENET_SE_PARAMS_ALIGN, "SeParams alignment");
static_assert(sizeof(SeGemmParams) == SENET_GEMM_PARAMS_SIZE, "SeGemmParams size");
static_assert(alignof(SeGemmParams) == SENET_GEMM_PARAMS_ALIGN, "SeGemmParams alignment");
static_assert(sizeof(NnConvParams) == SENET_NN_CONV_PARAMS_SIZE, "NnConvParams size");
static_assert(alignof(NnConvParams) == SENET_NN_CONV_PARAMS_ALIGN, "NnConvParams alignment");
#else
_Static_assert(sizeof(SeParams) == SENET_SE_PARAMS_SIZE, "SeParams size");
_Static_assert(sizeof(SeGemmParams) == SENET_GEMM_PARAMS_SIZE, "SeGemmParams size");
_Static_assert(sizeof(NnConvParams) == SENET_NN_CONV_PARAMS_SIZE, "NnConvParams size");
#endif

#endif /* SENET_ABI_H */
