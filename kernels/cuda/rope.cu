// Rotary embeddings with a host-computed (cos, sin) table (kernels/src/model.rs; the
// backend passes the table of the layer's kind), fused with appending the rotated k
// and the v of each row to its sequence's cache.
#include "common.cuh"

// Thread per (row, item), items being: the rotated pairs of q's heads, every pair of
// k's heads (pairs past rope_dim are stored unrotated), then the kv_dim elements of v.
// Pair i of a head is its elements (2i, 2i+1) ("normal" RoPE, Llama) or, with neox,
// (i, i + half) for i < half and (2i, 2i+1) past rope_dim (Gemma). A rotated pair
// (x0, x1) -> (x0*c - x1*s, x0*s + x1*c); k's pairs and v's elements are stored at
// position pos[r] of layer `layer` in the row's cache.
extern "C" __global__ void rope_store(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v,
                                      const float2* __restrict__ table, const int* __restrict__ pos,
                                      const unsigned long long* __restrict__ kptr,
                                      const unsigned long long* __restrict__ vptr, const int* __restrict__ cap,
                                      int layer, int n_head, int n_head_kv, int head_dim, int half, int neox,
                                      int rows) {
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
    const int a = neox && i < half ? i : 2 * i;
    const int b = neox && i < half ? i + half : 2 * i + 1;
    float* x = (is_q ? q + (size_t)r * n_head * head_dim : k + (size_t)r * kvd) + h * head_dim;
    float y0 = x[a];
    float y1 = x[b];
    if (i < half) {
        const float2 cs = table[(size_t)pos[r] * half + i];
        const float x0 = y0;
        const float x1 = y1;
        y0 = __fsub_rn(__fmul_rn(x0, cs.x), __fmul_rn(x1, cs.y));
        y1 = __fadd_rn(__fmul_rn(x0, cs.y), __fmul_rn(x1, cs.x));
        x[a] = y0;
        x[b] = y1;
    }
    if (!is_q) {
        float* c = sampo_cache_row(kptr, cap, r, layer, pos[r], kvd) + h * head_dim;
        c[a] = y0;
        c[b] = y1;
    }
}
