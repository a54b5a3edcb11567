// Test-only kernels, each with one planted bug of a class the GPU exposes and the checking
// builds of the emulator must catch (src/cuda/emu.rs, tests `planted_*`). Compiled into the
// emulator only (build.rs), never by nvcc.

// Missing __syncthreads: each thread reads its neighbour's shared-memory write with no barrier
// between (TSan: data race; plain builds: the neighbour's slot is still poison in the default
// order; initcheck: a read of a word no thread of the block wrote yet).
extern "C" __global__ void senet_planted_missing_sync(float* out) {
    __shared__ float s[64]; SENET_EMU_SHARED(s);
    const unsigned int t = threadIdx.x, n = blockDim.x;
    s[t] = static_cast<float>(t);
    // BUG: __syncthreads() missing here.
    out[t] = s[(t + 1) % n];
}
SENET_EMU_REGISTER(senet_planted_missing_sync)

// The fixed form of the kernel above (a clean run for every detector).
extern "C" __global__ void senet_planted_missing_sync_fixed(float* out) {
    __shared__ float s[64]; SENET_EMU_SHARED(s);
    const unsigned int t = threadIdx.x, n = blockDim.x;
    s[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = s[(t + 1) % n];
}
SENET_EMU_REGISTER(senet_planted_missing_sync_fixed)

// Two blocks (or more) racing on one global word without a ticket: a plain read-modify-write.
extern "C" __global__ void senet_planted_block_race(unsigned int* counter) {
    if (threadIdx.x == 0) *counter = *counter + 1u;  // BUG: not atomicAdd, no ticket
}
SENET_EMU_REGISTER(senet_planted_block_race)

// The fixed form: an atomic increment.
extern "C" __global__ void senet_planted_block_race_fixed(unsigned int* counter) {
    if (threadIdx.x == 0) atomicAdd(counter, 1u);
}
SENET_EMU_REGISTER(senet_planted_block_race_fixed)

// A 16-byte vector load at an address that is not 16-byte aligned (`offset` bytes past an
// aligned buffer). via_helper: through __ldg (the emulator's own alignment check, every build);
// otherwise a plain dereference (UBSan's alignment check, address builds).
extern "C" __global__ void senet_planted_misaligned(const unsigned char* in, unsigned int offset,
                                                    unsigned int via_helper, uint4* out) {
    const uint4* p = reinterpret_cast<const uint4*>(in + offset);  // BUG: offset % 16 != 0
    out[threadIdx.x] = via_helper ? __ldg(p) : *p;
}
SENET_EMU_REGISTER(senet_planted_misaligned)

// Reads one element past the end of `in` (n elements): the last thread's in[t + 1].
extern "C" __global__ void senet_planted_oob_global(const float* in, float* out, unsigned int n) {
    const unsigned int t = threadIdx.x;
    if (t < n) out[t] = in[t + 1];  // BUG: t + 1 == n for the last thread
}
SENET_EMU_REGISTER(senet_planted_oob_global)

// Reads one float past the end of dynamic shared memory (launched with n floats of it).
extern "C" __global__ void senet_planted_oob_dynamic_smem(float* out, unsigned int n) {
    SENET_DYNAMIC_SMEM(raw);
    float* s = reinterpret_cast<float*>(raw);
    const unsigned int t = threadIdx.x;
    if (t < n) s[t] = static_cast<float>(t);
    __syncthreads();
    if (t < n) out[t] = s[t + 1];  // BUG: s[n] is past the end
}
SENET_EMU_REGISTER(senet_planted_oob_dynamic_smem)

// Reads shared memory that no thread of the block wrote: only the first half of the block
// fills s (static: dynamic == 0) or dynamic shared memory (dynamic == 1), everyone reads its own.
extern "C" __global__ void senet_planted_uninit_shared(float* out, unsigned int dynamic) {
    __shared__ float st[64]; SENET_EMU_SHARED(st);
    SENET_DYNAMIC_SMEM(raw);
    float* s = dynamic ? reinterpret_cast<float*>(raw) : st;
    const unsigned int t = threadIdx.x;
    if (t < blockDim.x / 2) s[t] = 1.0f;  // BUG: the second half is never written
    __syncthreads();
    out[t] = s[t];
}
SENET_EMU_REGISTER(senet_planted_uninit_shared)
