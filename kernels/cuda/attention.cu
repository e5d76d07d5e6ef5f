// Grouped-query attention over the KV cache, with what comes between the q/k/v
// products and it — QK-norm (Gemma), RoPE and the append of this pass's k and v to the
// cache — in the same launch. Follows kernels/src/cpu.rs: each head of q and k RMS-normed
// (when the layer has the weights) then rotated; scores are canonical dots times the
// scale; softmax with the canonical sum; the weighted sum of values sequential in t for
// each output element (math.rs: that order is the contract, so one thread owns each
// element and no split across warps or blocks can change it).
//
// Each sequence's cache is its own allocation, laid out [layer][cap][kv_dim] for K and
// the same for V; row r of a batch finds its sequence through kptr[r], vptr[r], cap[r],
// its position through pos[r], and the first row of its sequence in this pass through
// run[r]. Everything that changes between decode steps is in those device arrays, so
// one captured graph serves every step.
#include "common.cuh"

// Warps per block (one block per (head, row)); the host launches 32 * this many threads.
#define SAMPO_ATTN_WARPS 8
// Floats of the block's shared memory: the rotated q head (head_dim), then the scores
// of up to `shared_t` positions (or as many as fit); longer contexts keep their scores
// in the global scratch.
#define SAMPO_ATTN_SMEM 11264

// Element i of one head (`x`, head_dim floats) as the CPU has it before the dot products:
// RMS-normed (y = (x * scale) * w, when w is not null), then, for i < 2 * half, rotated
// with the (cos, sin) pairs of its position `cs`: pair j is (2j, 2j + 1) ("normal"
// RoPE, Llama) or (j, j + half) with neox (Gemma); (x0, x1) -> (x0*c - x1*s, x0*s + x1*c).
// Each element is computed whole from its pair, so any thread may compute any element.
__device__ __forceinline__ float sampo_qk_elem(const float* __restrict__ x, const float* __restrict__ w, float scale,
                                               const float2* __restrict__ cs, int i, int half, int neox) {
    if (i >= 2 * half) return w != nullptr ? __fmul_rn(__fmul_rn(x[i], scale), w[i]) : x[i];
    const int j = neox ? (i < half ? i : i - half) : i / 2;
    const int a = neox ? j : 2 * j;
    const int b = neox ? j + half : 2 * j + 1;
    float x0 = x[a], x1 = x[b];
    if (w != nullptr) {
        x0 = __fmul_rn(__fmul_rn(x0, scale), w[a]);
        x1 = __fmul_rn(__fmul_rn(x1, scale), w[b]);
    }
    const float2 c = cs[j];
    return i == a ? __fsub_rn(__fmul_rn(x0, c.x), __fmul_rn(x1, c.y)) : __fadd_rn(__fmul_rn(x0, c.y), __fmul_rn(x1, c.x));
}

// The RMSNorm scale of one head (norm.cu's arithmetic: canonical sum of squares,
// 1 / sqrt(ss / n + eps)), computed by a whole warp; 1 when there is no norm.
__device__ __forceinline__ float sampo_head_scale(const float* __restrict__ x, const float* __restrict__ w, int n,
                                                  float eps, int lane) {
    if (w == nullptr) return 1.0f;
    float l = 0.0f;
    for (int i = lane; i < n; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(x[i], x[i]));
    const float ss = sampo_butterfly(l);
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)n), eps)));
}

// One block of SAMPO_ATTN_WARPS warps per (head h, row r); needs head_dim <= the block's
// threads (the host checks). Row r at position p attends to positions first..=p,
// first = max(0, p + 1 - window) for a sliding-window layer (window > 0), 0 otherwise.
//
// 1. q's head, normed and rotated, into shared memory. The block of the first q head of
//    each KV head also writes its row's k (normed, rotated) and v to the cache at p.
// 2. Scores, any warp any position (each is a whole canonical dot). Positions of this
//    pass (>= p0, the position of row run[r]) are not read from the cache — other blocks
//    of this launch write them — but made from the pass's k rows the same way step 1
//    makes them; earlier positions come from the cache.
// 3. Softmax: the maximum (exact, any order), exp(s - max) by any thread, the sum by warp
//    0 in the canonical order (lane (t - first) % 32, increasing t), the division.
// 4. The weighted sum of values: thread i owns output element i, sequential in t.
// With qs not null, the output is also quantized for the output projection (quant.cu
// quantize_act's blocks of 32 of the [rows][n_head * head_dim] output), which needs
// head_dim a multiple of 32: then warp w's lanes hold block w of the head.
// Scores beyond `shared_t` positions (or what fits) go to `scores`, rows * n_head * max_t
// floats of scratch. The block's threads exchange them there across barriers, so
// `scores` is not __restrict__ (sampling.cu sample_rows says why).
extern "C" __global__ void attention(const float* __restrict__ q, const unsigned long long* __restrict__ kptr,
                                     const unsigned long long* __restrict__ vptr, const int* __restrict__ cap,
                                     const int* __restrict__ pos, float* __restrict__ out, float* scores,
                                     int layer, int n_head, int n_head_kv, int head_dim, int max_t, float scale,
                                     int window, signed char* __restrict__ qs, float* __restrict__ d_out,
                                     float* __restrict__ s_out, const float* __restrict__ k,
                                     const float* __restrict__ v, const int* __restrict__ run,
                                     const float2* __restrict__ table, int half, int neox,
                                     const float* __restrict__ q_norm, const float* __restrict__ k_norm, float eps,
                                     int shared_t) {
    __shared__ float sm[SAMPO_ATTN_SMEM];
    __shared__ float red[SAMPO_ATTN_WARPS + 1];
    const int h = blockIdx.x;
    const int r = blockIdx.y;
    const int tid = threadIdx.x;
    const int lane = tid % SAMPO_LANES;
    const int warp = tid / SAMPO_LANES;
    const int warps = blockDim.x / SAMPO_LANES;
    const int hd = head_dim;
    const int d = n_head * hd;
    const int kvd = n_head_kv * hd;
    const int group = n_head / n_head_kv;
    const int kh = h / group;
    const int last = pos[r];
    const int first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    const int n_t = last - first + 1;
    const int rf = run[r];
    const int p0 = pos[rf];
    float* qr = sm;
    const int room = SAMPO_ATTN_SMEM - hd;
    float* s = n_t <= (shared_t < room ? shared_t : room) ? sm + hd : scores + ((size_t)r * n_head + h) * max_t;
    // This pass's k and v rows of this KV head: position t >= p0 is row rf + (t - p0).
#define SAMPO_PASS_ROW(x, t) ((x) + (size_t)(rf + (t) - p0) * kvd + kh * hd)
    const float* kc = sampo_cache_row(kptr, cap, r, layer, 0, kvd) + kh * hd;
    const float* vc = sampo_cache_row(vptr, cap, r, layer, 0, kvd) + kh * hd;

    // 1. Every warp finds the norm scales (the same bits); threads split the elements.
    const float* qh = q + (size_t)r * d + h * hd;
    const float q_scale = sampo_head_scale(qh, q_norm, hd, eps, lane);
    for (int i = tid; i < hd; i += blockDim.x) qr[i] = sampo_qk_elem(qh, q_norm, q_scale, table + (size_t)last * half, i, half, neox);
    if (h % group == 0) {
        const float* kh_row = SAMPO_PASS_ROW(k, last);
        const float k_scale = sampo_head_scale(kh_row, k_norm, hd, eps, lane);
        float* kdst = sampo_cache_row(kptr, cap, r, layer, last, kvd) + kh * hd;
        float* vdst = sampo_cache_row(vptr, cap, r, layer, last, kvd) + kh * hd;
        for (int i = tid; i < hd; i += blockDim.x) {
            kdst[i] = sampo_qk_elem(kh_row, k_norm, k_scale, table + (size_t)last * half, i, half, neox);
            vdst[i] = SAMPO_PASS_ROW(v, last)[i];
        }
    }
    __syncthreads();

    // 2. Scores. The branch is uniform across a warp (t is), so its shuffles meet.
    for (int t = first + warp; t <= last; t += warps) {
        float l = 0.0f;
        if (t < p0) {
            const float* kt = kc + (size_t)t * kvd;
            for (int i = lane; i < hd; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(qr[i], kt[i]));
        } else {
            const float* kt = SAMPO_PASS_ROW(k, t);
            const float k_scale = sampo_head_scale(kt, k_norm, hd, eps, lane);
            for (int i = lane; i < hd; i += SAMPO_LANES) {
                l = __fadd_rn(l, __fmul_rn(qr[i], sampo_qk_elem(kt, k_norm, k_scale, table + (size_t)t * half, i, half, neox)));
            }
        }
        const float dot = sampo_butterfly(l);
        if (lane == 0) s[t - first] = __fmul_rn(dot, scale);
    }
    __syncthreads();

    // 3. Softmax.
    float m = -__int_as_float(0x7f800000);
    for (int j = tid; j < n_t; j += blockDim.x) m = fmaxf(m, s[j]);
    m = sampo_warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, red[w]);
    for (int j = tid; j < n_t; j += blockDim.x) s[j] = sampo_exp(__fsub_rn(s[j], m));
    __syncthreads();
    if (warp == 0) {
        float l = 0.0f;
        for (int j = lane; j < n_t; j += SAMPO_LANES) l = __fadd_rn(l, s[j]);
        const float sum = sampo_butterfly(l);
        if (lane == 0) red[SAMPO_ATTN_WARPS] = sum;
    }
    __syncthreads();
    const float sum = red[SAMPO_ATTN_WARPS];
    for (int j = tid; j < n_t; j += blockDim.x) s[j] = __fdiv_rn(s[j], sum);
    __syncthreads();

    // 4. The weighted sum of values, and the output's quantization.
    if (tid < hd) {
        float acc = 0.0f;
        for (int j = 0; j < n_t; ++j) {
            const int t = first + j;
            const float vt = t < p0 ? vc[(size_t)t * kvd + tid] : SAMPO_PASS_ROW(v, t)[tid];
            acc = __fadd_rn(acc, __fmul_rn(s[j], vt));
        }
        const size_t e = (size_t)r * d + h * hd + tid;
        out[e] = acc;
        if (qs != nullptr) sampo_quantize_block(acc, qs, d_out, s_out, e / SAMPO_QK, lane);
    }
}
#undef SAMPO_PASS_ROW
