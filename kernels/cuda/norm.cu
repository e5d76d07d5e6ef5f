// RMSNorm (fused with the residual add before it and the quantization after it),
// following kernels/src/math.rs rms_norm and kernels/src/cpu.rs.
#include "common.cuh"

// The residual add, RMSNorm and the activation quantization of the normed row, in one
// warp per row: x += add (when add is not null), the added row first RMS-normed with
// weights add_w when those are given (a block's post-norm: the arithmetic below,
// without writing the normed row back); y_i = (x_i * scale) * w_i with
// scale = 1 / sqrt(ss / n + eps), ss the canonical sum of squares; then each block of
// 32 of y quantized (sampo_quantize_block). Output row j is input row idx[j] (all rows
// in order when idx is null): the last layer's add and the gather of the rows whose
// logits are wanted, in the same launch as the output norm. Lane l owns elements l,
// l + 32, ... throughout, so every step reads only what the same thread wrote.
extern "C" __global__ void add_norm_quant(float* __restrict__ x, const float* __restrict__ add,
                                          const float* __restrict__ add_w, const int* __restrict__ idx,
                                          const float* __restrict__ w, float* __restrict__ y,
                                          signed char* __restrict__ qs, float* __restrict__ d_out,
                                          float* __restrict__ s_out, int n, int rows, float eps) {
    const int j = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (j >= rows) return;
    const int r = idx != nullptr ? idx[j] : j;
    float* xr = x + (size_t)r * n;
    float* yr = y + (size_t)j * n;
    if (add != nullptr) {
        const float* ar = add + (size_t)r * n;
        if (add_w != nullptr) {
            float l = 0.0f;
            for (int i = lane; i < n; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(ar[i], ar[i]));
            const float ss = sampo_butterfly(l);
            const float mean = __fdiv_rn(ss, (float)n);
            const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
            for (int i = lane; i < n; i += SAMPO_LANES) {
                xr[i] = __fadd_rn(xr[i], __fmul_rn(__fmul_rn(ar[i], scale), add_w[i]));
            }
        } else {
            for (int i = lane; i < n; i += SAMPO_LANES) xr[i] = __fadd_rn(xr[i], ar[i]);
        }
    }
    float l = 0.0f;
    for (int i = lane; i < n; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(xr[i], xr[i]));
    const float ss = sampo_butterfly(l);
    const float mean = __fdiv_rn(ss, (float)n);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    const int nb = n / SAMPO_QK;
    for (int b = 0; b < nb; ++b) {
        const int i = b * SAMPO_QK + lane;
        const float v = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
        yr[i] = v;
        sampo_quantize_block(v, qs, d_out, s_out, (size_t)j * nb + b, lane);
    }
}
