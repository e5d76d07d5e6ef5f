// Grouped-query attention over the KV cache, following kernels/src/cpu.rs:
// scores are canonical dots times the scale, softmax with the canonical sum, and the
// weighted sum of values sequential in t for each output element.
//
// Each sequence's cache is its own allocation, laid out [layer][cap][kv_dim] for K and
// the same for V (rope_store in rope.cu appends to it); row r of a batch finds its
// sequence through kptr[r], vptr[r], cap[r] and its position through pos[r]. Everything
// that changes between decode steps is in those device arrays, so one captured graph
// serves every step.
#include "common.cuh"

// One block per (head, row). `scores` is scratch of rows * n_head * max_t floats.
// A row at position p attends to positions first..=p, first = max(0, p + 1 - window)
// for a sliding-window layer (window > 0), 0 otherwise; the softmax sum's lanes count
// from `first`, as the CPU's score vector does.
// Any warp may compute any score (each is a whole canonical dot); warp 0 alone does the
// softmax sum (its order is the contract); thread i owns output element i.
// With qs not null, the output is also quantized for the output projection (quant.cu
// quantize_act's blocks of 32 of the [rows][n_head * head_dim] output, the same
// arithmetic), which needs head_dim a multiple of 32: then each warp's 32 lanes hold
// one whole block, and every lane of a warp takes the same number of turns of the loop.
extern "C" __global__ void attention(const float* __restrict__ q, const unsigned long long* __restrict__ kptr,
                                     const unsigned long long* __restrict__ vptr, const int* __restrict__ cap,
                                     const int* __restrict__ pos, float* __restrict__ out, float* __restrict__ scores,
                                     int layer, int n_head, int n_head_kv, int head_dim, int max_t, float scale,
                                     int window, signed char* __restrict__ qs, float* __restrict__ d_out,
                                     float* __restrict__ s_out) {
    const int h = blockIdx.x;
    const int r = blockIdx.y;
    const int lane = threadIdx.x % SAMPO_LANES;
    const int warp = threadIdx.x / SAMPO_LANES;
    const int warps = blockDim.x / SAMPO_LANES;
    const int d = n_head * head_dim;
    const int kvd = n_head_kv * head_dim;
    const int kh = h / (n_head / n_head_kv);
    const int last = pos[r];
    const int first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    const float* qh = q + (size_t)r * d + h * head_dim;
    const float* kc = sampo_cache_row(kptr, cap, r, layer, 0, kvd) + kh * head_dim;
    const float* vc = sampo_cache_row(vptr, cap, r, layer, 0, kvd) + kh * head_dim;
    float* s = scores + ((size_t)r * n_head + h) * max_t;
    for (int t = first + warp; t <= last; t += warps) {
        const float* kt = kc + (size_t)t * kvd;
        float l = 0.0f;
        for (int i = lane; i < head_dim; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(qh[i], kt[i]));
        const float dot = sampo_butterfly(l);
        if (lane == 0) s[t] = __fmul_rn(dot, scale);
    }
    __syncthreads();
    if (warp == 0) {
        // max (exact, any order), exp(s - max), canonical sum: lane (t - first) % 32,
        // increasing t.
        float m = -__int_as_float(0x7f800000);
        for (int t = first + lane; t <= last; t += SAMPO_LANES) m = fmaxf(m, s[t]);
        m = sampo_warp_max(m);
        float l = 0.0f;
        for (int t = first + lane; t <= last; t += SAMPO_LANES) {
            const float e = sampo_exp(__fsub_rn(s[t], m));
            s[t] = e;
            l = __fadd_rn(l, e);
        }
        const float sum = sampo_butterfly(l);
        for (int t = first + lane; t <= last; t += SAMPO_LANES) s[t] = __fdiv_rn(s[t], sum);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int t = first; t <= last; ++t) acc = __fadd_rn(acc, __fmul_rn(s[t], vc[(size_t)t * kvd + i]));
        const size_t e = (size_t)r * d + h * head_dim + i;
        out[e] = acc;
        if (qs != nullptr) sampo_quantize_block(acc, qs, d_out, s_out, e / SAMPO_QK, lane);
    }
}
