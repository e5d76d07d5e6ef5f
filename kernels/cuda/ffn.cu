// SwiGLU fused with the quantization of its result for the down projection:
// g = silu(g) * u (kernels/src/cpu.rs), then quantize_act's steps on each block of 32.
#include "common.cuh"

// One warp per block of 32 elements; lane l owns element 32 * block + l.
extern "C" __global__ void swiglu_quant(float* __restrict__ g, const float* __restrict__ u,
                                        signed char* __restrict__ qs, float* __restrict__ d_out,
                                        float* __restrict__ s_out, int n_blocks) {
    const int block = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (block >= n_blocks) return;
    const size_t i = (size_t)block * SAMPO_QK + lane;
    const float v = __fmul_rn(sampo_silu(g[i]), u[i]);
    g[i] = v;
    sampo_quantize_block(v, qs, d_out, s_out, block, lane);
}
