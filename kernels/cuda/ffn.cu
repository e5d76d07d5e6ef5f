// SwiGLU: g = silu(g) * u, elementwise (kernels/src/cpu.rs).
#include "common.cuh"

extern "C" __global__ void swiglu(float* __restrict__ g, const float* __restrict__ u, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] = __fmul_rn(sampo_silu(g[i]), u[i]);
}
