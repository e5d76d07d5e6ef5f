// RMSNorm and residual adds, following kernels/src/math.rs rms_norm.
#include "common.cuh"

// One warp per row: canonical sum of squares, mean = ss / n,
// scale = 1 / sqrt(mean + eps), y_i = (x_i * scale) * w_i.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                    int n, int rows, float eps) {
    const int r = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float l = 0.0f;
    for (int i = lane; i < n; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(xr[i], xr[i]));
    const float ss = sampo_butterfly(l);
    const float mean = __fdiv_rn(ss, (float)n);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int i = lane; i < n; i += SAMPO_LANES) y[(size_t)r * n + i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
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
