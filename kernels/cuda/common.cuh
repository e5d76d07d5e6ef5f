// Canonical arithmetic for the CUDA backend: the same text as kernels/src/math.rs and
// kernels/src/quant.rs, operation for operation. Compiled with --fmad=false and no
// fast-math; every add/mul/div/sqrt below is also spelled with its explicit
// round-to-nearest intrinsic so that no compiler can contract or reorder it.
#pragma once

#define SAMPO_LANES 32
#define SAMPO_QK 32
#define SAMPO_FULL_MASK 0xffffffffu

// Unroll the loop that follows (NVRTC); the host compiler of the emulator ignores it.
// Loops over a chunk's words must unroll so that every index is a constant and the
// words stay in registers (no `.local` memory; cuda_compile.rs checks).
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define SAMPO_UNROLL _Pragma("unroll")
#else
#define SAMPO_UNROLL
#endif

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

// exp(x) from basic operations; constants and steps as in math.rs. Every inexact
// constant is its f32 bit pattern, the same as math.rs writes (math::CONSTANT_BITS;
// cuda_compile.rs compares the two texts), so no decimal conversion can differ.
#define SAMPO_EXP_HI __int_as_float(0x42B17217)  // 88.72283: above, +inf
#define SAMPO_EXP_LO __int_as_float(0xC2CFF1B4)  // -103.97208: below, 0
#define SAMPO_LOG2E __int_as_float(0x3FB8AA3B)   // log2(e)
#define SAMPO_LN2_HI __int_as_float(0x3F317200)  // 0.69314575
#define SAMPO_LN2_LO __int_as_float(0x35BFBE8E)  // 1.4286068e-6
// Taylor coefficients 1/k! (correctly rounded f32 quotients): 1/5040 ... 1/2, 1.
#define SAMPO_EXP_P0 __int_as_float(0x39500D01)
#define SAMPO_EXP_P1 __int_as_float(0x3AB60B61)
#define SAMPO_EXP_P2 __int_as_float(0x3C088889)
#define SAMPO_EXP_P3 __int_as_float(0x3D2AAAAB)
#define SAMPO_EXP_P4 __int_as_float(0x3E2AAAAB)
#define SAMPO_EXP_P5 __int_as_float(0x3F000000)
#define SAMPO_EXP_P6 __int_as_float(0x3F800000)
// GELU (tanh approximation): A = 0.044715, K = 2 * sqrt(2 / pi).
#define SAMPO_GELU_A __int_as_float(0x3D372713)
#define SAMPO_GELU_K __int_as_float(0x3FCC422A)

__device__ __forceinline__ float sampo_pow2(int n) {
    return __int_as_float((n + 127) << 23);
}

__device__ __forceinline__ float sampo_exp(float x) {
    if (isnan(x)) return x;
    if (x > SAMPO_EXP_HI) return __int_as_float(0x7f800000);
    if (x < SAMPO_EXP_LO) return 0.0f;
    const float n = floorf(__fadd_rn(__fmul_rn(x, SAMPO_LOG2E), 0.5f));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, SAMPO_LN2_HI)), __fmul_rn(n, SAMPO_LN2_LO));
    // Horner order, highest coefficient first.
    float p = SAMPO_EXP_P0;
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P1);
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P2);
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P3);
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P4);
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P5);
    p = __fadd_rn(__fmul_rn(p, r), SAMPO_EXP_P6);
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

// GELU, tanh approximation, in math.rs gelu_tanh's canonical form:
// t = K * (x + A * ((x * x) * x)), gelu = x / (1 + exp(-t)).
__device__ __forceinline__ float sampo_gelu(float x) {
    const float t =
        __fmul_rn(SAMPO_GELU_K, __fadd_rn(x, __fmul_rn(SAMPO_GELU_A, __fmul_rn(__fmul_rn(x, x), x))));
    return __fdiv_rn(x, __fadd_rn(1.0f, sampo_exp(-t)));
}

// The gated FFN's activation (glu_quant, matmul_glu_*): SiLU (Llama) or GELU (Gemma).
#define SAMPO_ACT_SILU 0
#define SAMPO_ACT_GELU 1

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
#define SAMPO_Q5_0 6
#define SAMPO_Q5_1 7
#define SAMPO_Q8_0 8
#define SAMPO_Q2_K 10
#define SAMPO_Q3_K 11
#define SAMPO_Q4_K 12
#define SAMPO_Q5_K 13
#define SAMPO_Q6_K 14

__device__ __forceinline__ bool sampo_is_k(int ty) { return ty >= SAMPO_Q2_K && ty <= SAMPO_Q6_K; }

__device__ __forceinline__ int sampo_block_bytes(int ty) {
    switch (ty) {
        case SAMPO_Q4_0: return 18;
        case SAMPO_Q4_1: return 20;
        case SAMPO_Q5_0: return 22;
        case SAMPO_Q5_1: return 24;
        case SAMPO_Q8_0: return 34;
        case SAMPO_Q2_K: return 84;
        case SAMPO_Q3_K: return 110;
        case SAMPO_Q4_K: return 144;
        case SAMPO_Q5_K: return 176;
        default: return 210;  // Q6_K
    }
}

// Bytes of a row of `cols` elements of a block type.
__device__ __forceinline__ size_t sampo_row_bytes(int ty, int cols) {
    return (size_t)(cols / (sampo_is_k(ty) ? 256 : SAMPO_QK)) * sampo_block_bytes(ty);
}

#define SAMPO_F32 0
#define SAMPO_F16 1
#define SAMPO_BF16 30

// One 32-element chunk of a quantized row, decoded as quant.rs chunk::decode does:
// quants q (element 4k + b in byte b of q[k], signed), the integer scales of its two
// halves of 16 (sc0, sc1; 1 where the type has none), Q2_K's integer minimums (m0,
// m1), and the f32 factors dw, mw.
struct SampoChunk {
    int q[8];
    int sc0, sc1, m0, m1;
    float dw, mw;
};

// How the chunk's integer sums become its term (quant.rs chunk::Form).
#define SAMPO_FORM_PLAIN 0
#define SAMPO_FORM_MIN 1
#define SAMPO_FORM_SUBMIN 2

__device__ __forceinline__ int sampo_form(int ty) {
    if (ty == SAMPO_Q4_1 || ty == SAMPO_Q5_1 || ty == SAMPO_Q4_K || ty == SAMPO_Q5_K) return SAMPO_FORM_MIN;
    if (ty == SAMPO_Q2_K) return SAMPO_FORM_SUBMIN;
    return SAMPO_FORM_PLAIN;
}

// Q4_K/Q5_K scale and minimum j of the 12 packed bytes s (quant.rs k_scale_min).
__device__ __forceinline__ void sampo_k_scale_min(const unsigned char* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q3_K scale i (0..16) of the 12 packed bytes s, minus 32 (quant.rs q3k_scales).
__device__ __forceinline__ int sampo_q3k_scale(const unsigned char* s, int i) {
    const int lo = (s[i % 8] >> (4 * (i / 8))) & 0xf;
    const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

// Decode chunk c (elements 32c .. 32c + 32) of a row of block type ty.
__device__ __forceinline__ void sampo_decode_chunk(int ty, const unsigned char* row, int c, SampoChunk* ch) {
    int v[SAMPO_QK];
    ch->sc0 = 1;
    ch->sc1 = 1;
    ch->m0 = 0;
    ch->m1 = 0;
    ch->mw = 0.0f;
    if (!sampo_is_k(ty)) {
        const unsigned char* b = row + (size_t)c * sampo_block_bytes(ty);
        ch->dw = sampo_f16_at(b);
        if (ty == SAMPO_Q8_0) {
            SAMPO_UNROLL
            for (int i = 0; i < SAMPO_QK; ++i) v[i] = (signed char)b[2 + i];
        } else if (ty == SAMPO_Q4_0 || ty == SAMPO_Q4_1) {
            const unsigned char* q = b + (ty == SAMPO_Q4_1 ? 4 : 2);
            if (ty == SAMPO_Q4_1) ch->mw = sampo_f16_at(b + 2);
            SAMPO_UNROLL
            for (int i = 0; i < 16; ++i) {
                v[i] = (q[i] & 15) - (ty == SAMPO_Q4_0 ? 8 : 0);
                v[i + 16] = (q[i] >> 4) - (ty == SAMPO_Q4_0 ? 8 : 0);
            }
        } else {  // Q5_0, Q5_1: d [, m], 32 high bits, 16 bytes of nibbles
            const int at = ty == SAMPO_Q5_1 ? 4 : 2;
            if (ty == SAMPO_Q5_1) ch->mw = sampo_f16_at(b + 2);
            const unsigned int qh = (unsigned int)b[at] | ((unsigned int)b[at + 1] << 8) |
                                    ((unsigned int)b[at + 2] << 16) | ((unsigned int)b[at + 3] << 24);
            const unsigned char* q = b + at + 4;
            const int off = ty == SAMPO_Q5_0 ? 16 : 0;
            SAMPO_UNROLL
            for (int i = 0; i < 16; ++i) {
                v[i] = ((q[i] & 15) | (((qh >> i) & 1) << 4)) - off;
                v[i + 16] = ((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - off;
            }
        }
    } else {
        const unsigned char* b = row + (size_t)(c / 8) * sampo_block_bytes(ty);
        const int j = c % 8, h = j / 4, s = j % 4;
        if (ty == SAMPO_Q2_K) {
            ch->dw = sampo_f16_at(b + 80);
            ch->mw = sampo_f16_at(b + 82);
            SAMPO_UNROLL
            for (int l = 0; l < SAMPO_QK; ++l) v[l] = (b[16 + 32 * h + l] >> (2 * s)) & 3;
            ch->sc0 = b[2 * j] & 15;
            ch->sc1 = b[2 * j + 1] & 15;
            ch->m0 = b[2 * j] >> 4;
            ch->m1 = b[2 * j + 1] >> 4;
        } else if (ty == SAMPO_Q3_K) {
            ch->dw = sampo_f16_at(b + 108);
            SAMPO_UNROLL
            for (int l = 0; l < SAMPO_QK; ++l) {
                v[l] = ((b[32 + 32 * h + l] >> (2 * s)) & 3) - (((b[l] >> j) & 1) ? 0 : 4);
            }
            ch->sc0 = sampo_q3k_scale(b + 96, 2 * j);
            ch->sc1 = sampo_q3k_scale(b + 96, 2 * j + 1);
        } else if (ty == SAMPO_Q4_K || ty == SAMPO_Q5_K) {
            int sc, m;
            sampo_k_scale_min(b + 4, j, &sc, &m);
            // Exact products (11-bit significand times 6-bit integer); mw negated.
            ch->dw = __fmul_rn(sampo_f16_at(b), (float)sc);
            ch->mw = -__fmul_rn(sampo_f16_at(b + 2), (float)m);
            const int qs = ty == SAMPO_Q5_K ? 48 : 16;
            SAMPO_UNROLL
            for (int l = 0; l < SAMPO_QK; ++l) {
                int q = (b[qs + 32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                if (ty == SAMPO_Q5_K) q |= ((b[16 + l] >> j) & 1) << 4;
                v[l] = q;
            }
        } else {  // Q6_K
            ch->dw = sampo_f16_at(b + 208);
            SAMPO_UNROLL
            for (int l = 0; l < SAMPO_QK; ++l) {
                const int lo = (b[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 15;
                const int hi = (b[128 + 32 * h + l] >> (2 * s)) & 3;
                v[l] = (lo | (hi << 4)) - 32;
            }
            ch->sc0 = (signed char)b[192 + 2 * j];
            ch->sc1 = (signed char)b[192 + 2 * j + 1];
        }
    }
    SAMPO_UNROLL
    for (int k = 0; k < 8; ++k) {
        ch->q[k] = (int)((unsigned int)(v[4 * k] & 0xff) | ((unsigned int)(v[4 * k + 1] & 0xff) << 8) |
                         ((unsigned int)(v[4 * k + 2] & 0xff) << 16) | ((unsigned int)(v[4 * k + 3] & 0xff) << 24));
    }
}

// The chunk's canonical term against activation quants xq (8 ints of 4) with scale dx
// and sum sx (quant.rs Chunk::term): S = sc0 * sum_lo(q x) + sc1 * sum_hi(q x), exact;
// t = (dw * dx) * S [+ mw * sx | - (mw * dx) * M, M = m0 * sum_lo(x) + m1 * sum_hi(x)].
__device__ __forceinline__ float sampo_chunk_term(int form, const SampoChunk* ch, const int* xq, float dx, float sx) {
    int s0 = 0, s1 = 0;
    SAMPO_UNROLL
    for (int k = 0; k < 4; ++k) s0 = __dp4a(ch->q[k], xq[k], s0);
    SAMPO_UNROLL
    for (int k = 4; k < 8; ++k) s1 = __dp4a(ch->q[k], xq[k], s1);
    const float t = __fmul_rn(__fmul_rn(ch->dw, dx), __int2float_rn(ch->sc0 * s0 + ch->sc1 * s1));
    if (form == SAMPO_FORM_MIN) return __fadd_rn(t, __fmul_rn(ch->mw, sx));
    if (form == SAMPO_FORM_SUBMIN) {
        int x0 = 0, x1 = 0;
        SAMPO_UNROLL
        for (int k = 0; k < 4; ++k) x0 = __dp4a(0x01010101, xq[k], x0);
        SAMPO_UNROLL
        for (int k = 4; k < 8; ++k) x1 = __dp4a(0x01010101, xq[k], x1);
        const float m = __int2float_rn(ch->m0 * x0 + ch->m1 * x1);
        return __fsub_rn(t, __fmul_rn(__fmul_rn(ch->mw, dx), m));
    }
    return t;
}

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
    // (dw * sc_h) * q, plus mw (Min) or minus mw * m_h (SubMin), h the half of 16.
    SampoChunk ch;
    sampo_decode_chunk(ty, row, i / SAMPO_QK, &ch);
    const int j = i % SAMPO_QK;
    // Word j / 4 picked by a tree of selects on the bits of j, not by a run-time index
    // (which would put the chunk in local memory).
    const int a0 = (j & 4) ? ch.q[1] : ch.q[0], a1 = (j & 4) ? ch.q[3] : ch.q[2];
    const int a2 = (j & 4) ? ch.q[5] : ch.q[4], a3 = (j & 4) ? ch.q[7] : ch.q[6];
    const int b0 = (j & 8) ? a1 : a0, b1 = (j & 8) ? a3 : a2;
    const int word = (j & 16) ? b1 : b0;
    const int q = (signed char)(word >> (8 * (j % 4)));
    const bool hi = j >= 16;
    const int sc = hi ? ch.sc1 : ch.sc0;
    const int m = hi ? ch.m1 : ch.m0;
    const float v = __fmul_rn(__fmul_rn(ch.dw, (float)sc), (float)q);
    const int form = sampo_form(ty);
    if (form == SAMPO_FORM_MIN) return __fadd_rn(v, ch.mw);
    if (form == SAMPO_FORM_SUBMIN) return __fsub_rn(v, __fmul_rn(ch.mw, (float)m));
    return v;
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
