// RMSNorm (fused with the residual add and the quantization that follow it) and the
// plain residual add, following kernels/src/math.rs rms_norm and kernels/src/cpu.rs.
#include "common.cuh"

// The residual add, RMSNorm and the activation quantization of the normed row, in one
// warp per row: x += add (when add is not null); y_i = (x_i * scale) * w_i with
// scale = 1 / sqrt(ss / n + eps), ss the canonical sum of squares; then each block of
// 32 of y quantized (sampo_quantize_block). Lane l owns elements l, l + 32, ...
// throughout, so every step reads only what the same thread wrote.
extern "C" __global__ void add_norm_quant(float* __restrict__ x, const float* __restrict__ add,
                                          const float* __restrict__ w, float* __restrict__ y,
                                          signed char* __restrict__ qs, float* __restrict__ d_out,
                                          float* __restrict__ s_out, int n, int rows, float eps) {
    const int r = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (r >= rows) return;
    float* xr = x + (size_t)r * n;
    float* yr = y + (size_t)r * n;
    if (add != nullptr) {
        const float* ar = add + (size_t)r * n;
        for (int i = lane; i < n; i += SAMPO_LANES) xr[i] = __fadd_rn(xr[i], ar[i]);
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
        sampo_quantize_block(v, qs, d_out, s_out, (size_t)r * nb + b, lane);
    }
}

// RMSNorm in place of each row of `n` floats, one warp per row, with add_norm_quant's
// arithmetic (canonical sum of squares, y_i = (x_i * scale) * w_i): the QK-norm of each
// head (rows of head_dim) and the post-norms of a block's output (rows of n_embd).
extern "C" __global__ void rms_norm_rows(float* __restrict__ x, const float* __restrict__ w, int n, int rows,
                                         float eps) {
    const int r = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (r >= rows) return;
    float* xr = x + (size_t)r * n;
    float l = 0.0f;
    for (int i = lane; i < n; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(xr[i], xr[i]));
    const float ss = sampo_butterfly(l);
    const float mean = __fdiv_rn(ss, (float)n);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    // Each lane rewrites only the elements it summed.
    for (int i = lane; i < n; i += SAMPO_LANES) xr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
}

// x *= s, elementwise (the embedding scale).
extern "C" __global__ void scale_inplace(float* __restrict__ x, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __fmul_rn(x[i], s);
}

// x += y, elementwise.
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __fadd_rn(x[i], y[i]);
}

// out[j] = x[idx[j]], rows of `cols` floats (the rows whose logits are wanted).
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ idx,
                                       float* __restrict__ out, int cols, int n) {
    const int j = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n || i >= cols) return;
    out[(size_t)j * cols + i] = x[(size_t)idx[j] * cols + i];
}
