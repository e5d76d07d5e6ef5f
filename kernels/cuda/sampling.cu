// Token sampling on the device: an exact port of kernels/src/sampling.rs `sample`, so
// that only the chosen ids need to leave the device. One block per row of logits.
//
// The host sampler's order is total (descending key, then ascending id; key(v) is v
// with NaN as -inf, compared by f32::total_cmp), so its result is a function of the
// logits alone and can be reproduced without its algorithm:
//   - greedy: an argmax whose combine (higher value; lower id on equal values) is
//     associative, so any reduction tree gives the host's answer;
//   - sampled: the candidate set (top-k, found by radix selection, no sort), then the
//     candidates' order codes sorted (a stable LSD radix sort of keys alone: equal
//     keys are interchangeable, so the ids need not travel), the weights in parallel,
//     and one thread folding them in candidate order -- the host's sum, bit for bit.
//     The host's three folds (total, top-p cut, draw) are prefixes of one fold, so one
//     sequential pass stores every prefix and the cut and the draw are searches over
//     it. The drawn position is mapped back to an id by counting, in id order, the
//     tokens that share its key.
// Integer reductions use shuffles and scans (exact in any order); there are no atomics.
#include "common.cuh"

// Scratch per row in `aux`: 16 radix counts per thread, then 64 words of slots.
#define SAMPO_SAMPLE_SLOTS 64
// Words of `params` per row (see sample_rows).
#define SAMPO_SAMPLE_WORDS 8
#define SAMPO_NONE 0xffffffffu

#define SAMPO_RED_MIN 0
#define SAMPO_RED_OR 1
#define SAMPO_RED_AND 2

// sampling.rs key(): NaN orders as -inf.
__device__ __forceinline__ float sampo_sample_key(float v) {
    return isnan(v) ? __uint_as_float(0xff800000u) : v;
}

// Order code of a logit: ascending codes are the host's candidate order by value
// (descending f32::total_cmp of key(v)); +0 comes before -0, as total_cmp has it.
__device__ __forceinline__ unsigned int sampo_order_code(float v) {
    unsigned int u = (unsigned int)__float_as_int(sampo_sample_key(v));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

// A per-thread digit histogram indexed by a run-time digit would live in local memory
// (slow, and refused by the compile test): these reach its 16 counters through
// compile-time indices only, so they stay in registers.
__device__ __forceinline__ int sampo_get16(const int (&c)[16], unsigned int d) {
    int r = 0;
    SAMPO_UNROLL
    for (int e = 0; e < 16; ++e) r = d == (unsigned int)e ? c[e] : r;
    return r;
}

__device__ __forceinline__ void sampo_bump16(int (&c)[16], unsigned int d) {
    SAMPO_UNROLL
    for (int e = 0; e < 16; ++e) c[e] += d == (unsigned int)e ? 1 : 0;
}

// The key value an order code stands for (the inverse of sampo_order_code).
__device__ __forceinline__ float sampo_code_value(unsigned int c) {
    const unsigned int u = ~c;
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// sampling.rs splitmix64 and uniform: 24 random bits over 2^24, exact.
__device__ __forceinline__ unsigned long long sampo_splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float sampo_uniform(unsigned long long seed, unsigned long long counter) {
    const unsigned long long x = sampo_splitmix64(sampo_splitmix64(seed) ^ (counter * 0xD6E8FEB86659FD93ull));
    return __fdiv_rn((float)(unsigned int)(x >> 40), 16777216.0f);
}

__device__ __forceinline__ int sampo_imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ unsigned int sampo_red(unsigned int a, unsigned int b, int op) {
    if (op == SAMPO_RED_MIN) return a < b ? a : b;
    if (op == SAMPO_RED_OR) return a | b;
    return a & b;
}

// The block's min / or / and of one word per thread; every thread gets it.
__device__ unsigned int sampo_block_reduce(unsigned int v, int op, int* slots) {
    const int lane = threadIdx.x % SAMPO_LANES, warp = threadIdx.x / SAMPO_LANES;
    const int warps = blockDim.x / SAMPO_LANES;
    for (int off = 16; off > 0; off >>= 1) {
        v = sampo_red(v, (unsigned int)__shfl_xor_sync(SAMPO_FULL_MASK, (int)v, off), op);
    }
    if (lane == 0) slots[warp] = (int)v;
    __syncthreads();
    if (warp == 0) {
        const unsigned int identity = op == SAMPO_RED_OR ? 0u : 0xffffffffu;
        unsigned int w = lane < warps ? (unsigned int)slots[lane] : identity;
        for (int off = 16; off > 0; off >>= 1) {
            w = sampo_red(w, (unsigned int)__shfl_xor_sync(SAMPO_FULL_MASK, (int)w, off), op);
        }
        if (lane == 0) slots[32] = (int)w;
    }
    __syncthreads();
    const unsigned int r = (unsigned int)slots[32];
    __syncthreads();
    return r;
}

__device__ __forceinline__ int sampo_warp_incl_scan(int x, int lane) {
    for (int off = 1; off < SAMPO_LANES; off <<= 1) {
        const int y = __shfl_sync(SAMPO_FULL_MASK, x, lane >= off ? lane - off : lane);
        if (lane >= off) x += y;
    }
    return x;
}

// Exclusive prefix sum of one int per thread in thread order; *total gets the sum.
__device__ int sampo_block_excl_scan(int v, int* slots, int* total) {
    const int lane = threadIdx.x % SAMPO_LANES, warp = threadIdx.x / SAMPO_LANES;
    const int warps = blockDim.x / SAMPO_LANES;
    const int x = sampo_warp_incl_scan(v, lane);
    if (lane == SAMPO_LANES - 1) slots[warp] = x;
    __syncthreads();
    if (warp == 0) {
        // Each lane reads and rewrites only its own slot.
        const int s = sampo_warp_incl_scan(lane < warps ? slots[lane] : 0, lane);
        if (lane < warps) slots[lane] = s;
    }
    __syncthreads();
    const int before = warp > 0 ? slots[warp - 1] : 0;
    *total = slots[warps - 1];
    __syncthreads();
    return before + x - v;
}

// Greedy: sampling.rs argmax (highest key, lowest id on ties); 0 for an empty row.
__device__ void sampo_argmax_row(const float* l, int n, unsigned int* out, int* slots) {
    const int t = threadIdx.x, lane = t % SAMPO_LANES, warp = t / SAMPO_LANES;
    const int warps = blockDim.x / SAMPO_LANES;
    float bv = __uint_as_float(0xff800000u);
    int bi = 0x7fffffff;
    // Ascending ids: the first of equal maxima stays, as in the host's loop.
    for (int i = t; i < n; i += blockDim.x) {
        const float v = sampo_sample_key(l[i]);
        if (bi == 0x7fffffff || v > bv) {
            bv = v;
            bi = i;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(SAMPO_FULL_MASK, bv, off);
        const int oi = __shfl_xor_sync(SAMPO_FULL_MASK, bi, off);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        slots[warp] = __float_as_int(bv);
        slots[32 + warp] = bi;
    }
    __syncthreads();
    if (t == 0) {
        for (int w = 1; w < warps; ++w) {
            const float ov = __int_as_float(slots[w]);
            const int oi = slots[32 + w];
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        *out = n > 0 ? (unsigned int)bi : 0u;
    }
}

// Choose one token per row of `n` logits, as sampling.rs `sample` does.
// params, 8 words per row: [0] 1 = greedy (temperature 0 or n <= 1); [1] temperature
// (f32 bits); [2] k, the candidate count (top_k where 0 < top_k < n, else n); [3] top_p
// (f32 bits); [4, 5] seed (low, high); [6, 7] step (low, high).
// keys: 2n words of scratch per row; aux: 16 * blockDim.x + 64 words per row.
// blockDim.x: a multiple of 32, at most 1024. One block per row.
// `out`, `keys` and `aux` are how the block's threads talk (written by some, read by
// others after a barrier), so none of them is __restrict__: on a restrict pointer the
// compiler may assume a barrier changes nothing behind it and move a load above the
// barrier that orders it — which NVRTC did (the selection's slots were read before
// thread 0 wrote them, on an H200; the emulator's barrier is an opaque call, so it
// never showed).
extern "C" __global__ void sample_rows(const float* __restrict__ logits, const unsigned int* __restrict__ params,
                                       unsigned int* out, unsigned int* keys, unsigned int* aux, int n, int rows) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int T = blockDim.x, t = threadIdx.x;
    const float* l = logits + (size_t)r * n;
    const unsigned int* p = params + (size_t)r * SAMPO_SAMPLE_WORDS;
    unsigned int* cnt = aux + (size_t)r * (16 * T + SAMPO_SAMPLE_SLOTS);
    int* slots = (int*)(cnt + 16 * T);
    if ((p[0] & 1u) != 0 || n <= 1) {
        sampo_argmax_row(l, n, out + r, slots);
        return;
    }
    const float temp = __uint_as_float(p[1]);
    int k = (int)p[2];
    if (k < 1 || k > n) k = n;
    const float top_p = __uint_as_float(p[3]);
    const unsigned long long seed = (unsigned long long)p[4] | ((unsigned long long)p[5] << 32);
    const unsigned long long step = (unsigned long long)p[6] | ((unsigned long long)p[7] << 32);
    unsigned int* src = keys + (size_t)r * 2 * n;
    unsigned int* dst = src + n;
    if (t == 0) out[r] = SAMPO_NONE;

    // 1. The candidates' codes (any order: only their multiset matters).
    if (k < n) {
        // Radix selection of the k-th smallest code, 4 bits at a time from the top:
        // `prefix` under `mask` narrows to it; `rank` is its rank among the codes that
        // share the prefix so far.
        unsigned int prefix = 0, mask = 0;
        int rank = k;
        for (int shift = 28; shift >= 0; shift -= 4) {
            int c[16];
            SAMPO_UNROLL
            for (int d = 0; d < 16; ++d) c[d] = 0;
            for (int i = t; i < n; i += T) {
                const unsigned int code = sampo_order_code(l[i]);
                if ((code & mask) == prefix) sampo_bump16(c, (code >> shift) & 15u);
            }
            SAMPO_UNROLL
            for (int d = 0; d < 16; ++d) cnt[d * T + t] = (unsigned int)c[d];
            __syncthreads();
            const int lane = t % SAMPO_LANES, warp = t / SAMPO_LANES;
            for (int d = warp; d < 16; d += T / SAMPO_LANES) {
                int s = 0;
                for (int j = lane; j < T; j += SAMPO_LANES) s += (int)cnt[d * T + j];
                s = sampo_warp_isum(s);
                if (lane == 0) slots[32 + d] = s;
            }
            __syncthreads();
            if (t == 0) {
                int d = 0;
                while (d < 15 && rank > slots[32 + d]) rank -= slots[32 + d++];
                slots[0] = d;
                slots[1] = rank;
            }
            __syncthreads();
            prefix |= (unsigned int)slots[0] << shift;
            mask |= 15u << shift;
            rank = slots[1];
            __syncthreads();
        }
        // Every code below the k-th, then `rank` copies of it.
        const int below = k - rank;
        int c = 0;
        for (int i = t; i < n; i += T) c += sampo_order_code(l[i]) < prefix ? 1 : 0;
        int total;
        int at = sampo_block_excl_scan(c, slots, &total);
        for (int i = t; i < n; i += T) {
            const unsigned int code = sampo_order_code(l[i]);
            if (code < prefix) src[at++] = code;
        }
        for (int j = below + t; j < k; j += T) src[j] = prefix;
    } else {
        for (int i = t; i < n; i += T) src[i] = sampo_order_code(l[i]);
    }
    const int m = k;
    __syncthreads();

    // 2. Sort the m codes: stable LSD radix sort, 4 bits a pass, each thread a
    // contiguous run; a digit that no two codes differ in is skipped.
    {
        unsigned int o = 0, a = 0xffffffffu;
        for (int j = t; j < m; j += T) {
            o |= src[j];
            a &= src[j];
        }
        // Two statements: every thread must make the two block-wide calls in one order.
        const unsigned int any = sampo_block_reduce(o, SAMPO_RED_OR, slots);
        const unsigned int all = sampo_block_reduce(a, SAMPO_RED_AND, slots);
        const unsigned int diff = any ^ all;
        const int run = (m + T - 1) / T;
        const int lo = sampo_imin(m, t * run), hi = sampo_imin(m, lo + run);
        for (int shift = 0; shift < 32; shift += 4) {
            if (((diff >> shift) & 15u) == 0) continue;
            int c[16];
            SAMPO_UNROLL
            for (int d = 0; d < 16; ++d) c[d] = 0;
            for (int j = lo; j < hi; ++j) sampo_bump16(c, (src[j] >> shift) & 15u);
            SAMPO_UNROLL
            for (int d = 0; d < 16; ++d) cnt[d * T + t] = (unsigned int)c[d];
            __syncthreads();
            // Offsets: an exclusive scan of the counts in (digit, thread) order, each
            // thread scanning 16 consecutive entries of it.
            int loc[16];
            int s = 0;
            SAMPO_UNROLL
            for (int j = 0; j < 16; ++j) {
                loc[j] = (int)cnt[16 * t + j];
                s += loc[j];
            }
            int total;
            int acc = sampo_block_excl_scan(s, slots, &total);
            SAMPO_UNROLL
            for (int j = 0; j < 16; ++j) {
                cnt[16 * t + j] = (unsigned int)acc;
                acc += loc[j];
            }
            __syncthreads();
            SAMPO_UNROLL
            for (int d = 0; d < 16; ++d) c[d] = (int)cnt[d * T + t];
            for (int j = lo; j < hi; ++j) {
                const unsigned int v = src[j];
                const unsigned int digit = (v >> shift) & 15u;
                dst[sampo_get16(c, digit)] = v;
                sampo_bump16(c, digit);
            }
            __syncthreads();
            unsigned int* tmp = src;
            src = dst;
            dst = tmp;
        }
    }

    // 3. Weights exp((key - max) / T) in parallel, then their running sum in candidate
    // order by one thread: w[j] becomes the host's accumulator after candidate j.
    float* w = (float*)dst;
    const float mx = sampo_code_value(src[0]);
    for (int j = t; j < m; j += T) w[j] = sampo_exp(__fdiv_rn(__fsub_rn(sampo_code_value(src[j]), mx), temp));
    __syncthreads();
    if (t == 0) {
        float acc = 0.0f;
        int j = 0;
        // Loads run ahead of the dependent adds.
        for (; j + 8 <= m; j += 8) {
            float v[8];
            for (int u = 0; u < 8; ++u) v[u] = w[j + u];
            for (int u = 0; u < 8; ++u) {
                acc = __fadd_rn(acc, v[u]);
                w[j + u] = acc;
            }
        }
        for (; j < m; ++j) {
            acc = __fadd_rn(acc, w[j]);
            w[j] = acc;
        }
    }
    __syncthreads();

    // 4. top-p: keep up to the first prefix that reaches top_p * total.
    int keep = m;
    if (top_p < 1.0f) {
        const float target = __fmul_rn(top_p, w[m - 1]);
        unsigned int first = SAMPO_NONE;
        for (int j = t; j < m; j += T) {
            if (w[j] >= target) {
                first = (unsigned int)j;
                break;
            }
        }
        first = sampo_block_reduce(first, SAMPO_RED_MIN, slots);
        if (first != SAMPO_NONE) keep = (int)first + 1;
    }

    // 5. The draw: the first kept prefix above r = u * kept, else the last kept.
    const float rr = __fmul_rn(sampo_uniform(seed, step), w[keep - 1]);
    unsigned int pick = SAMPO_NONE;
    for (int j = t; j < keep; j += T) {
        if (rr < w[j]) {
            pick = (unsigned int)j;
            break;
        }
    }
    pick = sampo_block_reduce(pick, SAMPO_RED_MIN, slots);
    const int pos = pick != SAMPO_NONE ? (int)pick : keep - 1;

    // 6. The id at candidate position `pos`: its code K, and its rank among the
    // candidates with code K is its rank, in id order, among all tokens with code K.
    const unsigned int key = src[pos];
    unsigned int first = SAMPO_NONE;
    for (int j = t; j <= pos; j += T) {
        if (src[j] == key) {
            first = (unsigned int)j;
            break;
        }
    }
    first = sampo_block_reduce(first, SAMPO_RED_MIN, slots);
    const int want = pos - (int)first;
    const int run = (n + T - 1) / T;
    const int lo = sampo_imin(n, t * run), hi = sampo_imin(n, lo + run);
    int c = 0;
    for (int i = lo; i < hi; ++i) c += sampo_order_code(l[i]) == key ? 1 : 0;
    int total;
    int q = sampo_block_excl_scan(c, slots, &total);
    if (want >= q && want < q + c) {
        for (int i = lo; i < hi; ++i) {
            if (sampo_order_code(l[i]) != key) continue;
            if (q == want) {
                out[r] = (unsigned int)i;
                break;
            }
            ++q;
        }
    }
}
