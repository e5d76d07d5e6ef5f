// The gated FFN's activation fused with the quantization of its result for the down
// projection: g = act(g) * u (kernels/src/cpu.rs), then quantize_act's steps on each
// block of 32. The architecture picks act: SiLU (Llama) or GELU (Gemma).
#include "common.cuh"

// One warp per block of 32 elements; lane l owns element 32 * block + l.
extern "C" __global__ void glu_quant(float* __restrict__ g, const float* __restrict__ u,
                                     signed char* __restrict__ qs, float* __restrict__ d_out,
                                     float* __restrict__ s_out, int n_blocks, int act) {
    const int block = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (block >= n_blocks) return;
    const size_t i = (size_t)block * SAMPO_QK + lane;
    const float a = act == SAMPO_ACT_GELU ? sampo_gelu(g[i]) : sampo_silu(g[i]);
    const float v = __fmul_rn(a, u[i]);
    g[i] = v;
    sampo_quantize_block(v, qs, d_out, s_out, block, lane);
}
