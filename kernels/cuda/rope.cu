// Rotary embeddings with the host-computed (cos, sin) table (kernels/src/model.rs).
#include "common.cuh"

// Thread per (row, head, pair): (x0, x1) -> (x0*c - x1*s, x0*s + x1*c).
extern "C" __global__ void rope(float* __restrict__ x, const float2* __restrict__ table, const int* __restrict__ pos,
                                int n_heads, int head_dim, int half, int rows) {
    const int r = blockIdx.y;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows || idx >= n_heads * half) return;
    const int h = idx / half;
    const int i = idx % half;
    const float2 cs = table[(size_t)pos[r] * half + i];
    float* v = x + (size_t)r * n_heads * head_dim + h * head_dim;
    const float x0 = v[2 * i];
    const float x1 = v[2 * i + 1];
    v[2 * i] = __fsub_rn(__fmul_rn(x0, cs.x), __fmul_rn(x1, cs.y));
    v[2 * i + 1] = __fadd_rn(__fmul_rn(x0, cs.y), __fmul_rn(x1, cs.x));
}
