// Rotary embeddings with the host-computed (cos, sin) table (kernels/src/model.rs),
// fused with appending the rotated k and the v of each row to its sequence's cache.
#include "common.cuh"

// Thread per (row, item), items being: the rotated pairs of q's heads, every pair of
// k's heads (pairs past rope_dim are stored unrotated), then the kv_dim elements of v.
// A rotated pair (x0, x1) -> (x0*c - x1*s, x0*s + x1*c); k's pairs and v's elements are
// stored at position pos[r] of layer `layer` in the row's cache.
extern "C" __global__ void rope_store(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v,
                                      const float2* __restrict__ table, const int* __restrict__ pos,
                                      const unsigned long long* __restrict__ kptr,
                                      const unsigned long long* __restrict__ vptr, const int* __restrict__ cap,
                                      int layer, int n_head, int n_head_kv, int head_dim, int half, int rows) {
    const int r = blockIdx.y;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int kvd = n_head_kv * head_dim;
    const int q_pairs = n_head * half;
    const int k_pairs = kvd / 2;
    if (r >= rows || idx >= q_pairs + k_pairs + kvd) return;
    if (idx >= q_pairs + k_pairs) {
        const int i = idx - q_pairs - k_pairs;
        sampo_cache_row(vptr, cap, r, layer, pos[r], kvd)[i] = v[(size_t)r * kvd + i];
        return;
    }
    const bool is_q = idx < q_pairs;
    const int pairs_per_head = is_q ? half : head_dim / 2;
    const int j = is_q ? idx : idx - q_pairs;
    const int h = j / pairs_per_head;
    const int i = j % pairs_per_head;
    float* x = is_q ? q + (size_t)r * n_head * head_dim : k + (size_t)r * kvd;
    float* e = x + h * head_dim + 2 * i;
    float y0 = e[0];
    float y1 = e[1];
    if (i < half) {
        const float2 cs = table[(size_t)pos[r] * half + i];
        const float x0 = y0;
        const float x1 = y1;
        y0 = __fsub_rn(__fmul_rn(x0, cs.x), __fmul_rn(x1, cs.y));
        y1 = __fadd_rn(__fmul_rn(x0, cs.y), __fmul_rn(x1, cs.x));
        e[0] = y0;
        e[1] = y1;
    }
    if (!is_q) {
        float* c = sampo_cache_row(kptr, cap, r, layer, pos[r], kvd) + h * head_dim + 2 * i;
        c[0] = y0;
        c[1] = y1;
    }
}
