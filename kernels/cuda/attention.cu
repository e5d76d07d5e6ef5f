// Grouped-query attention over the KV cache, following kernels/src/cpu.rs: scores are
// canonical dots times the scale, softmax with the canonical sum, and the weighted sum
// of values sequential in t for each output element.
#include "common.cuh"

// One warp per (row, head). `scores` is scratch of rows * n_head * max_t floats.
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ kc,
                                     const float* __restrict__ vc, float* __restrict__ out,
                                     float* __restrict__ scores, const int* __restrict__ pos, int n_head,
                                     int n_head_kv, int head_dim, int max_t, float scale) {
    const int r = blockIdx.y;
    const int h = blockIdx.x;
    const int lane = threadIdx.x;
    const int d = n_head * head_dim;
    const int kvd = n_head_kv * head_dim;
    const int kh = h / (n_head / n_head_kv);
    const int last = pos[r];
    const float* qh = q + (size_t)r * d + h * head_dim;
    float* s = scores + ((size_t)r * n_head + h) * max_t;
    // Scores: s_t = dot(q_h, k_t) * scale, canonical over head_dim.
    for (int t = 0; t <= last; ++t) {
        const float* kt = kc + (size_t)t * kvd + kh * head_dim;
        float l = 0.0f;
        for (int i = lane; i < head_dim; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(qh[i], kt[i]));
        const float dot = sampo_butterfly(l);
        if (lane == 0) s[t] = __fmul_rn(dot, scale);
    }
    __syncwarp();
    // Softmax: max (exact), exp(s - max), canonical sum (lane t % 32, increasing t).
    float m = -__int_as_float(0x7f800000);
    for (int t = lane; t <= last; t += SAMPO_LANES) m = fmaxf(m, s[t]);
    m = sampo_warp_max(m);
    float l = 0.0f;
    for (int t = lane; t <= last; t += SAMPO_LANES) {
        const float e = sampo_exp(__fsub_rn(s[t], m));
        s[t] = e;
        l = __fadd_rn(l, e);
    }
    const float sum = sampo_butterfly(l);
    __syncwarp();
    for (int t = lane; t <= last; t += SAMPO_LANES) s[t] = __fdiv_rn(s[t], sum);
    __syncwarp();
    // o[i] = sum_t p_t * v_t[i], sequential in t.
    for (int i = lane; i < head_dim; i += SAMPO_LANES) {
        float acc = 0.0f;
        for (int t = 0; t <= last; ++t) acc = __fadd_rn(acc, __fmul_rn(s[t], vc[(size_t)t * kvd + kh * head_dim + i]));
        out[(size_t)r * d + h * head_dim + i] = acc;
    }
}
