// Activation quantization, quantized matrix-vector/matrix products and the Q8_0
// embedding lookup, following kernels/src/quant.rs.
#include "common.cuh"

// One warp per activation block of 32: amax, dx = amax / 127, inv, q_i =
// round_half_away(x_i * inv) clamped to [-127, 127], sx = dx * sum q_i.
extern "C" __global__ void quantize_act(const float* __restrict__ x, signed char* __restrict__ qs,
                                        float* __restrict__ d_out, float* __restrict__ s_out, int n_blocks) {
    const int block = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (block >= n_blocks) return;
    const float v = x[block * SAMPO_QK + lane];
    const float amax = sampo_warp_max(fabsf(v));
    const float d = __fdiv_rn(amax, 127.0f);
    const float inv = d == 0.0f ? 0.0f : __fdiv_rn(1.0f, d);
    float r = roundf(__fmul_rn(v, inv));
    r = fminf(fmaxf(r, -127.0f), 127.0f);
    const int q = (int)r;
    qs[block * SAMPO_QK + lane] = (signed char)q;
    const int sum = sampo_warp_isum(q);
    if (lane == 0) {
        d_out[block] = d;
        s_out[block] = __fmul_rn(d, __int2float_rn(sum));
    }
}

// Exact integer dot of one weight block with one activation block.
__device__ __forceinline__ int block_isum(int ty, const unsigned char* w, const signed char* x) {
    int s = 0;
    if (ty == SAMPO_Q8_0) {
        for (int i = 0; i < SAMPO_QK; ++i) s += (int)(signed char)w[2 + i] * (int)x[i];
    } else if (ty == SAMPO_Q4_0) {
        for (int j = 0; j < 16; ++j) {
            const int q = w[2 + j];
            s += ((q & 15) - 8) * (int)x[j] + ((q >> 4) - 8) * (int)x[j + 16];
        }
    } else {
        for (int j = 0; j < 16; ++j) {
            const int q = w[4 + j];
            s += (q & 15) * (int)x[j] + (q >> 4) * (int)x[j + 16];
        }
    }
    return s;
}

// out[r, row] = canonical dot of weight row `row` with activation row `r`: one warp
// per (row, r); lane l takes blocks l, l + 32, ... in increasing order, then the
// butterfly. Block term: (dw * dx) * isum, plus mw * sx for Q4_1.
extern "C" __global__ void matmul_q(const unsigned char* __restrict__ w, int ty, int rows, int cols,
                                    const signed char* __restrict__ qs, const float* __restrict__ xd,
                                    const float* __restrict__ xs, float* __restrict__ out, int n_act) {
    const int row = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int r = blockIdx.y;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (row >= rows || r >= n_act) return;
    const int nb = cols / SAMPO_QK;
    const int bb = sampo_block_bytes(ty);
    const unsigned char* wrow = w + (size_t)row * nb * bb;
    float l = 0.0f;
    for (int b = lane; b < nb; b += SAMPO_LANES) {
        const unsigned char* wb = wrow + (size_t)b * bb;
        const int ab = r * nb + b;
        const int isum = block_isum(ty, wb, qs + (size_t)ab * SAMPO_QK);
        const float dw = sampo_f16_at(wb);
        float t = __fmul_rn(__fmul_rn(dw, xd[ab]), __int2float_rn(isum));
        if (ty == SAMPO_Q4_1) {
            t = __fadd_rn(t, __fmul_rn(sampo_f16_at(wb + 2), xs[ab]));
        }
        l = __fadd_rn(l, t);
    }
    const float v = sampo_butterfly(l);
    if (lane == 0) out[(size_t)r * rows + row] = v;
}

// Embedding rows from a Q8_0 table: out[r, i] = d * q.
extern "C" __global__ void embed_q8_0(const unsigned char* __restrict__ table, const unsigned int* __restrict__ tokens,
                                      float* __restrict__ out, int cols, int n) {
    const int r = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n || i >= cols) return;
    const int nb = cols / SAMPO_QK;
    const unsigned char* row = table + (size_t)tokens[r] * nb * 34;
    const unsigned char* blk = row + (size_t)(i / SAMPO_QK) * 34;
    out[(size_t)r * cols + i] = __fmul_rn(sampo_f16_at(blk), (float)(signed char)blk[2 + i % SAMPO_QK]);
}
