// Canonical arithmetic for the CUDA backend: the same text as kernels/src/math.rs and
// kernels/src/quant.rs, operation for operation. Compiled with --fmad=false and no
// fast-math; every add/mul/div/sqrt below is also spelled with its explicit
// round-to-nearest intrinsic so that no compiler can contract or reorder it.
#pragma once

#define SAMPO_LANES 32
#define SAMPO_QK 32
#define SAMPO_FULL_MASK 0xffffffffu

// Canonical reduction, step 2: lane j holds l_j; for off in 16, 8, 4, 2, 1:
// l_j = l_j + l_{j+off} (for j < off). Lane 0 ends with the result, which every lane
// receives. f32 addition is commutative, so x + shfl(x) gives the CPU's bits.
__device__ __forceinline__ float sampo_butterfly(float v) {
    for (int off = 16; off > 0; off >>= 1) {
        v = __fadd_rn(v, __shfl_xor_sync(SAMPO_FULL_MASK, v, off));
    }
    return __shfl_sync(SAMPO_FULL_MASK, v, 0);
}

// Maximum over a warp: order-free, exact.
__device__ __forceinline__ float sampo_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(SAMPO_FULL_MASK, v, off));
    }
    return __shfl_sync(SAMPO_FULL_MASK, v, 0);
}

__device__ __forceinline__ int sampo_warp_isum(int v) {
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(SAMPO_FULL_MASK, v, off);
    }
    return __shfl_sync(SAMPO_FULL_MASK, v, 0);
}

// exp(x) from basic operations; constants and steps as in math.rs.
#define SAMPO_EXP_HI 88.72283f
#define SAMPO_EXP_LO -103.97208f
#define SAMPO_LOG2E 1.44269504088896340736f
#define SAMPO_LN2_HI 0.69314575f
#define SAMPO_LN2_LO 1.4286068e-6f

__device__ __forceinline__ float sampo_pow2(int n) {
    return __int_as_float((n + 127) << 23);
}

__device__ __forceinline__ float sampo_exp(float x) {
    if (isnan(x)) return x;
    if (x > SAMPO_EXP_HI) return __int_as_float(0x7f800000);
    if (x < SAMPO_EXP_LO) return 0.0f;
    const float n = floorf(__fadd_rn(__fmul_rn(x, SAMPO_LOG2E), 0.5f));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, SAMPO_LN2_HI)), __fmul_rn(n, SAMPO_LN2_LO));
    // Taylor coefficients 1/k! as f32 (each a correctly rounded quotient), Horner order.
    const float c[7] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f};
    float p = c[0];
    for (int k = 1; k < 7; ++k) p = __fadd_rn(__fmul_rn(p, r), c[k]);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    const int ni = (int)n;
    const int a = ni / 2;
    const int b = ni - a;
    return __fmul_rn(__fmul_rn(p, sampo_pow2(a)), sampo_pow2(b));
}

// silu(x) = x / (1 + exp(-x)).
__device__ __forceinline__ float sampo_silu(float x) {
    return __fdiv_rn(x, __fadd_rn(1.0f, sampo_exp(-x)));
}

// Exact f16 -> f32 widening, as quant.rs f16_to_f32.
__device__ __forceinline__ float sampo_f16(unsigned short h) {
    const unsigned int sign = ((unsigned int)(h & 0x8000u)) << 16;
    const unsigned int e = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    unsigned int bits;
    if (e == 0 && man == 0) {
        bits = sign;
    } else if (e == 0) {
        const unsigned int shift = __clz(man) - 21;
        man = (man << shift) & 0x3ffu;
        bits = sign | ((113u - shift) << 23) | (man << 13);
    } else if (e == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (man << 13);
    }
    return __uint_as_float(bits);
}

// Little-endian f16 at an unaligned byte address.
__device__ __forceinline__ float sampo_f16_at(const unsigned char* p) {
    return sampo_f16((unsigned short)(p[0] | (p[1] << 8)));
}

// GGML block types (the GGUF type codes).
#define SAMPO_Q4_0 2
#define SAMPO_Q4_1 3
#define SAMPO_Q8_0 8

__device__ __forceinline__ int sampo_block_bytes(int ty) {
    return ty == SAMPO_Q8_0 ? 34 : (ty == SAMPO_Q4_1 ? 20 : 18);
}

#define SAMPO_F32 0
#define SAMPO_F16 1
#define SAMPO_BF16 30

// Element i of a row of type ty, as quant.rs dequantize_row computes it.
__device__ __forceinline__ float sampo_dequant(int ty, const unsigned char* row, int i) {
    if (ty == SAMPO_F32) {
        const unsigned char* p = row + 4 * (size_t)i;
        return __uint_as_float((unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) |
                               ((unsigned int)p[3] << 24));
    }
    if (ty == SAMPO_F16) return sampo_f16_at(row + 2 * (size_t)i);
    if (ty == SAMPO_BF16) {
        const unsigned char* p = row + 2 * (size_t)i;
        return __uint_as_float(((unsigned int)p[0] << 16) | ((unsigned int)p[1] << 24));
    }
    const int j = i % SAMPO_QK;
    const unsigned char* blk = row + (size_t)(i / SAMPO_QK) * sampo_block_bytes(ty);
    const float d = sampo_f16_at(blk);
    if (ty == SAMPO_Q8_0) return __fmul_rn(d, (float)(signed char)blk[2 + j]);
    const unsigned char* q = blk + (ty == SAMPO_Q4_1 ? 4 : 2);
    const int v = j < 16 ? (q[j] & 15) : (q[j - 16] >> 4);
    if (ty == SAMPO_Q4_1) return __fadd_rn(__fmul_rn(d, (float)v), sampo_f16_at(blk + 2));
    return __fmul_rn(d, __fsub_rn((float)v, 8.0f));
}

// Row r's KV cache at position t of `layer`: ptrs[r] is laid out [layer][cap[r]][kvd].
__device__ __forceinline__ float* sampo_cache_row(const unsigned long long* ptrs, const int* cap, int r, int layer,
                                                  int t, int kvd) {
    return (float*)ptrs[r] + ((size_t)layer * cap[r] + t) * kvd;
}

// Activation quantization of one block of 32 held by a warp, lane l holding element l
// (quant.rs quantize_act): amax, dx = amax / 127, inv = dx == 0 ? 0 : 1 / dx,
// q = round_half_away(v * inv) clamped to [-127, 127] (NaN -> 0, as Rust's `as i8`),
// sx = dx * sum q.
__device__ __forceinline__ void sampo_quantize_block(float v, signed char* qs, float* d_out, float* s_out,
                                                     size_t block, int lane) {
    const float amax = sampo_warp_max(fabsf(v));
    const float d = __fdiv_rn(amax, 127.0f);
    const float inv = d == 0.0f ? 0.0f : __fdiv_rn(1.0f, d);
    float r = roundf(__fmul_rn(v, inv));
    r = isnan(r) ? 0.0f : fminf(fmaxf(r, -127.0f), 127.0f);
    const int q = (int)r;
    qs[block * SAMPO_QK + lane] = (signed char)q;
    const int sum = sampo_warp_isum(q);
    if (lane == 0) {
        d_out[block] = d;
        s_out[block] = __fmul_rn(d, __int2float_rn(sum));
    }
}
