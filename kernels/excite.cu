// The excitation family: the two FC layers and their gradients as small f32 GEMMs with fused
// epilogues, batched over samples so each weight tile is read once per block of 32 samples.
//
//   out[m][n] = epilogue(sum_k A(m, k) * B(k, n)),  A(m, k) = A[m*sa_m + k*sa_k], B likewise.
//
// Forward:  FC1  A = z [n][C],  B(k, j) = W1[j][k], epilogue h = acc + b1, u = act(h)
//           FC2  A = u [n][d],  B(k, c) = W2[c][k], epilogue s = gate(acc + b2)
// Backward: du = (dg W2) * act'(h); dz = du W1; dW2 = dg^T u; dW1 = du^T z (plain stores).
// Bias gradients are column sums (se_colsum), one thread per column, in row order.
//
// Split-K along grid.z for long K (FC1 at large C, weight gradients at large batch): each split
// writes a partial tile; the last split to arrive (integer ticket) adds them in split order and
// runs the epilogue, so results are the same bits every run.
#include "common.cuh"

namespace senet {

constexpr int BM = 32, BN = 32, BK = 32;

__device__ __forceinline__ float epilogue(const SeGemmParams& p, float acc, uint32_t m, uint32_t n,
                                          const float* __restrict__ bias, const float* __restrict__ aux,
                                          float* __restrict__ c2) {
    switch (p.epilogue) {
        case SENET_EPI_FC1: {
            const float h = acc + ((p.flags & SENET_FLAG_BIAS) ? bias[n] : 0.0f);
            c2[static_cast<uint64_t>(m) * p.n + n] = act_fwd(p.act, h);
            return h;
        }
        case SENET_EPI_FC2:
            return gate_fwd(p.gate, acc + ((p.flags & SENET_FLAG_BIAS) ? bias[n] : 0.0f));
        case SENET_EPI_DU:
            return acc * act_grad(p.act, aux[static_cast<uint64_t>(m) * p.n + n]);
        default:
            return acc;
    }
}

__device__ void gemm(const SeGemmParams& p, const float* __restrict__ A, const float* __restrict__ B,
                     float* __restrict__ C, float* __restrict__ C2, const float* __restrict__ bias,
                     const float* __restrict__ aux, float* __restrict__ ws, unsigned int* __restrict__ tickets) {
    __shared__ float As[BK][BM + 1];
    __shared__ float Bs[BK][BN + 1];
    const int tid = threadIdx.x;      // 256 threads
    const int tx = tid % 16, ty = tid / 16;
    const uint32_t m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const uint32_t kb = blockIdx.z * p.k_per_split;
    const uint32_t ke = min(p.k, kb + p.k_per_split);
    const bool a_k_fast = p.sa_k == 1;
    const bool b_n_fast = p.sb_n == 1;

    float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    for (uint32_t k0 = kb; k0 < ke; k0 += BK) {
        // A tile: BM x BK = 1024 elements, 4 per thread, along whichever stride is unit.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256;
            const int mm = a_k_fast ? e / BK : e % BM;
            const int kk = a_k_fast ? e % BK : e / BM;
            const uint32_t gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < p.m && gk < ke) ? A[gm * p.sa_m + gk * p.sa_k] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256;
            const int nn = b_n_fast ? e % BN : e / BK;
            const int kk = b_n_fast ? e / BN : e % BK;
            const uint32_t gn = n0 + nn, gk = k0 + kk;
            Bs[kk][nn] = (gn < p.n && gk < ke) ? B[gk * p.sb_k + gn * p.sb_n] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float a0 = As[kk][ty * 2], a1 = As[kk][ty * 2 + 1];
            const float b0 = Bs[kk][tx * 2], b1 = Bs[kk][tx * 2 + 1];
            acc[0][0] = fmaf(a0, b0, acc[0][0]);
            acc[0][1] = fmaf(a0, b1, acc[0][1]);
            acc[1][0] = fmaf(a1, b0, acc[1][0]);
            acc[1][1] = fmaf(a1, b1, acc[1][1]);
        }
        __syncthreads();
    }

    const uint64_t plane = static_cast<uint64_t>(p.m) * p.n;
    if (p.k_splits > 1) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint32_t gm = m0 + ty * 2 + i, gn = n0 + tx * 2 + j;
                if (gm < p.m && gn < p.n) ws[blockIdx.z * plane + static_cast<uint64_t>(gm) * p.n + gn] = acc[i][j];
            }
        unsigned int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
        if (!ticket_arrive_last(ticket, p.k_splits)) return;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint32_t gm = m0 + ty * 2 + i, gn = n0 + tx * 2 + j;
                float t = 0.0f;
                if (gm < p.m && gn < p.n)
                    for (uint32_t z = 0; z < p.k_splits; ++z) t += __ldcg(ws + z * plane + static_cast<uint64_t>(gm) * p.n + gn);
                acc[i][j] = t;
            }
        ticket_reset(ticket);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const uint32_t gm = m0 + ty * 2 + i, gn = n0 + tx * 2 + j;
            if (gm < p.m && gn < p.n)
                C[static_cast<uint64_t>(gm) * p.n + gn] = epilogue(p, acc[i][j], gm, gn, bias, aux, C2);
        }
}

}  // namespace senet

using namespace senet;

extern "C" __global__ void __launch_bounds__(256)
    se_gemm_f32(SeGemmParams p, const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                float* __restrict__ C2, const float* __restrict__ bias, const float* __restrict__ aux,
                float* __restrict__ ws, unsigned int* __restrict__ tickets) {
    gemm(p, A, B, C, C2, bias, aux, ws, tickets);
}
SENET_EMU_REGISTER(se_gemm_f32)

// out[j] = sum_i in[i * cols + j] (+ out[j] with accumulate), rows summed in order.
extern "C" __global__ void __launch_bounds__(256)
    se_colsum_f32(const float* __restrict__ in, float* __restrict__ out, uint32_t rows, uint32_t cols,
                  uint32_t accumulate) {
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float t = 0.0f;
    for (uint32_t i = 0; i < rows; ++i) t += in[static_cast<uint64_t>(i) * cols + j];
    out[j] = accumulate ? out[j] + t : t;
}
SENET_EMU_REGISTER(se_colsum_f32)
