// Activation quantization, quantized and float matrix products and the embedding
// lookup, following kernels/src/quant.rs and kernels/src/cpu.rs.
#include "common.cuh"

// One warp per activation block of 32 (the attention output's quantization).
extern "C" __global__ void quantize_act(const float* __restrict__ x, signed char* __restrict__ qs,
                                        float* __restrict__ d_out, float* __restrict__ s_out, int n_blocks) {
    const int block = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (block >= n_blocks) return;
    sampo_quantize_block(x[(size_t)block * SAMPO_QK + lane], qs, d_out, s_out, block, lane);
}

// Activation rows each warp of matmul_q serves, so a weight block is read once for them.
#define SAMPO_MM_ROWS 4

// out[r, row] = canonical dot of weight row `row` with activation row `r`, for up to
// three matrices of block type TY that share the input (q/k/v, gate/up): one launch,
// their rows one after another in the grid (rows1 = 0 / rows2 = 0 for fewer). One warp
// per weight row and group of SAMPO_MM_ROWS activation rows; lane l takes chunks of 32
// l, l + 32, ... in increasing order (the integer dot is exact, any order), then the
// butterfly.
//
// One kernel per block type (the extern "C" instances below): with TY a constant every
// per-type branch folds away and every loop over a chunk's words has a constant trip
// count, so it unrolls and the words live in registers. (A single kernel taking the type
// at run time indexed its words with a run-time bound: a local-memory array in the
// innermost loop. cuda_compile.rs checks the PTX has no `.local`.)
// Lane partials of one weight row's canonical dot with activation rows r0 ..
// r0 + SAMPO_MM_ROWS (those below n_act): lane l adds the terms of chunks l, l + 32, ...
// in increasing order into l[k]; the caller's butterfly finishes each dot.
template <int TY>
__device__ __forceinline__ void sampo_row_partials(const unsigned char* __restrict__ wrow, int nb, int lane, int r0,
                                                   int n_act, const signed char* __restrict__ qs,
                                                   const float* __restrict__ xd, const float* __restrict__ xs,
                                                   float* l) {
    SAMPO_UNROLL
    for (int k = 0; k < SAMPO_MM_ROWS; ++k) l[k] = 0.0f;
    for (int b = lane; b < nb; b += SAMPO_LANES) {
        if constexpr (TY == SAMPO_Q4_0 || TY == SAMPO_Q4_1 || TY == SAMPO_Q8_0) {
            // Direct path: block term (dw * dx) * isum, plus mw * sx for Q4_1 (the same
            // integers and roundings as the chunk term with unit scales). Blocks are
            // 2-byte aligned (18, 20 and 34 bytes), so the quants are read as 16-bit
            // halves.
            constexpr int bb = TY == SAMPO_Q8_0 ? 34 : TY == SAMPO_Q4_1 ? 20 : 18;
            constexpr int nw = TY == SAMPO_Q8_0 ? 8 : 4;
            const unsigned char* wb = wrow + (size_t)b * bb;
            const unsigned short* w16 = (const unsigned short*)(wb + (TY == SAMPO_Q4_1 ? 4 : 2));
            int wq[nw];
            SAMPO_UNROLL
            for (int j = 0; j < nw; ++j) {
                wq[j] = (int)((unsigned int)w16[2 * j] | ((unsigned int)w16[2 * j + 1] << 16));
            }
            const float dw = sampo_f16_at(wb);
            const float mw = TY == SAMPO_Q4_1 ? sampo_f16_at(wb + 2) : 0.0f;
            SAMPO_UNROLL
            for (int k = 0; k < SAMPO_MM_ROWS; ++k) {
                const int r = r0 + k;
                if (r >= n_act) break;
                const size_t ab = (size_t)r * nb + b;
                const int* xq = (const int*)(qs + ab * SAMPO_QK);
                int isum = 0;
                if constexpr (TY == SAMPO_Q8_0) {
                    SAMPO_UNROLL
                    for (int j = 0; j < 8; ++j) isum = __dp4a(wq[j], xq[j], isum);
                } else {
                    // Byte j holds element j (low nibble) and element j + 16 (high nibble).
                    SAMPO_UNROLL
                    for (int j = 0; j < 4; ++j) {
                        const unsigned int u = (unsigned int)wq[j];
                        isum = __dp4a((int)(u & 0x0f0f0f0fu), xq[j], isum);
                        isum = __dp4a((int)((u >> 4) & 0x0f0f0f0fu), xq[4 + j], isum);
                    }
                    if constexpr (TY == SAMPO_Q4_0) {
                        // sum (q - 8) x = sum q x - 8 sum x, exactly.
                        int sx = 0;
                        SAMPO_UNROLL
                        for (int j = 0; j < 8; ++j) sx = __dp4a(0x01010101, xq[j], sx);
                        isum -= 8 * sx;
                    }
                }
                float t = __fmul_rn(__fmul_rn(dw, xd[ab]), __int2float_rn(isum));
                if constexpr (TY == SAMPO_Q4_1) t = __fadd_rn(t, __fmul_rn(mw, xs[ab]));
                l[k] = __fadd_rn(l[k], t);
            }
        } else {
            // Q5_0, Q5_1 and the K-quants: each chunk of 32 decoded once (common.cuh),
            // then its canonical term for every activation row.
            SampoChunk ch;
            sampo_decode_chunk(TY, wrow, b, &ch);
            SAMPO_UNROLL
            for (int k = 0; k < SAMPO_MM_ROWS; ++k) {
                const int r = r0 + k;
                if (r >= n_act) break;
                const size_t ab = (size_t)r * nb + b;
                l[k] = __fadd_rn(l[k],
                                 sampo_chunk_term(sampo_form(TY), &ch, (const int*)(qs + ab * SAMPO_QK), xd[ab], xs[ab]));
            }
        }
    }
}

template <int TY>
__device__ __forceinline__ void sampo_matmul_q(const unsigned char* __restrict__ w0, float* __restrict__ out0,
                                               int rows0, const unsigned char* __restrict__ w1,
                                               float* __restrict__ out1, int rows1,
                                               const unsigned char* __restrict__ w2, float* __restrict__ out2,
                                               int rows2, int cols, const signed char* __restrict__ qs,
                                               const float* __restrict__ xd, const float* __restrict__ xs,
                                               int n_act) {
    int row = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int r0 = blockIdx.y * SAMPO_MM_ROWS;
    const int lane = threadIdx.x % SAMPO_LANES;
    const unsigned char* w = w0;
    float* out = out0;
    int rows = rows0;
    if (row >= rows0) {
        row -= rows0;
        w = w1;
        out = out1;
        rows = rows1;
        if (row >= rows1) {
            row -= rows1;
            w = w2;
            out = out2;
            rows = rows2;
        }
    }
    if (row >= rows) return;
    const int nb = cols / SAMPO_QK;
    float l[SAMPO_MM_ROWS];
    sampo_row_partials<TY>(w + (size_t)row * sampo_row_bytes(TY, cols), nb, lane, r0, n_act, qs, xd, xs, l);
    SAMPO_UNROLL
    for (int k = 0; k < SAMPO_MM_ROWS; ++k) {
        const float v = sampo_butterfly(l[k]);
        if (lane == 0 && r0 + k < n_act) out[(size_t)(r0 + k) * rows + row] = v;
    }
}

// The gated FFN's first half in one launch: gate and up products of block type TY,
// the activation, and the quantization of the result for the down projection —
// matmul_q's two dots, then ffn.cu glu_quant's arithmetic on them, bit for bit. A
// block is 32 warps: warp w owns output j = 32 * blockIdx.x + w (gate row j and up row
// j) for activation rows r0 .. r0 + SAMPO_MM_ROWS; the 32 values of a quantization
// block meet in shared memory, and warp k quantizes activation row r0 + k's. Writes
// g[r, j] = act(gate) * up (the float result, for float down weights) and qs_out,
// d_out, s_out, which must not be the input's buffers (other blocks still read those).
#define SAMPO_GLU_WARPS 32
template <int TY>
__device__ __forceinline__ void sampo_matmul_glu(const unsigned char* __restrict__ wg,
                                                 const unsigned char* __restrict__ wu, float* __restrict__ g,
                                                 int ff, int cols, const signed char* __restrict__ qs,
                                                 const float* __restrict__ xd, const float* __restrict__ xs,
                                                 int n_act, int act, signed char* __restrict__ qs_out,
                                                 float* __restrict__ d_out, float* __restrict__ s_out) {
    __shared__ float tile[SAMPO_MM_ROWS][SAMPO_GLU_WARPS];
    const int warp = threadIdx.x / SAMPO_LANES;
    const int lane = threadIdx.x % SAMPO_LANES;
    const int j = blockIdx.x * SAMPO_GLU_WARPS + warp;
    const int r0 = blockIdx.y * SAMPO_MM_ROWS;
    const int nb = cols / SAMPO_QK;
    const size_t row_bytes = sampo_row_bytes(TY, cols);
    float lg[SAMPO_MM_ROWS], lu[SAMPO_MM_ROWS];
    sampo_row_partials<TY>(wg + (size_t)j * row_bytes, nb, lane, r0, n_act, qs, xd, xs, lg);
    sampo_row_partials<TY>(wu + (size_t)j * row_bytes, nb, lane, r0, n_act, qs, xd, xs, lu);
    SAMPO_UNROLL
    for (int k = 0; k < SAMPO_MM_ROWS; ++k) {
        const float gv = sampo_butterfly(lg[k]);
        const float uv = sampo_butterfly(lu[k]);
        const float v = __fmul_rn(act == SAMPO_ACT_GELU ? sampo_gelu(gv) : sampo_silu(gv), uv);
        if (lane == 0) {
            tile[k][warp] = v;
            if (r0 + k < n_act) g[(size_t)(r0 + k) * ff + j] = v;
        }
    }
    __syncthreads();
    if (warp < SAMPO_MM_ROWS && r0 + warp < n_act) {
        const int r = r0 + warp;
        sampo_quantize_block(tile[warp][lane], qs_out, d_out, s_out, (size_t)r * (ff / SAMPO_QK) + blockIdx.x, lane);
    }
}

// The instances: matmul_<type> and matmul_glu_<type>, one per block type the CPU
// backend multiplies (the backend's Kernel::matmul_q / matmul_glu map a GGUF type to
// their names).
#define SAMPO_MATMUL_Q(name, glu, TY)                                                                                   \
    extern "C" __global__ void name(const unsigned char* __restrict__ w0, float* __restrict__ out0, int rows0,     \
                                    const unsigned char* __restrict__ w1, float* __restrict__ out1, int rows1,     \
                                    const unsigned char* __restrict__ w2, float* __restrict__ out2, int rows2,     \
                                    int cols, const signed char* __restrict__ qs, const float* __restrict__ xd,    \
                                    const float* __restrict__ xs, int n_act) {                                     \
        sampo_matmul_q<TY>(w0, out0, rows0, w1, out1, rows1, w2, out2, rows2, cols, qs, xd, xs, n_act);            \
    }                                                                                                              \
    extern "C" __global__ void glu(const unsigned char* __restrict__ wg, const unsigned char* __restrict__ wu,      \
                                   float* __restrict__ g, int ff, int cols, const signed char* __restrict__ qs,     \
                                   const float* __restrict__ xd, const float* __restrict__ xs, int n_act, int act, \
                                   signed char* __restrict__ qs_out, float* __restrict__ d_out,                    \
                                   float* __restrict__ s_out) {                                                    \
        sampo_matmul_glu<TY>(wg, wu, g, ff, cols, qs, xd, xs, n_act, act, qs_out, d_out, s_out);                   \
    }
SAMPO_MATMUL_Q(matmul_q4_0, matmul_glu_q4_0, SAMPO_Q4_0)
SAMPO_MATMUL_Q(matmul_q4_1, matmul_glu_q4_1, SAMPO_Q4_1)
SAMPO_MATMUL_Q(matmul_q5_0, matmul_glu_q5_0, SAMPO_Q5_0)
SAMPO_MATMUL_Q(matmul_q5_1, matmul_glu_q5_1, SAMPO_Q5_1)
SAMPO_MATMUL_Q(matmul_q8_0, matmul_glu_q8_0, SAMPO_Q8_0)
SAMPO_MATMUL_Q(matmul_q2_k, matmul_glu_q2_k, SAMPO_Q2_K)
SAMPO_MATMUL_Q(matmul_q3_k, matmul_glu_q3_k, SAMPO_Q3_K)
SAMPO_MATMUL_Q(matmul_q4_k, matmul_glu_q4_k, SAMPO_Q4_K)
SAMPO_MATMUL_Q(matmul_q5_k, matmul_glu_q5_k, SAMPO_Q5_K)
SAMPO_MATMUL_Q(matmul_q6_k, matmul_glu_q6_k, SAMPO_Q6_K)

// Float weights (F32, F16, BF16): out[r, row] = canonical dot of the dequantized row
// with the unquantized activation row, element i into lane i % 32. One warp per (row, r).
extern "C" __global__ void matmul_f(const unsigned char* __restrict__ w, int ty, int rows, int cols, int row_bytes,
                                    const float* __restrict__ x, float* __restrict__ out, int n_act) {
    const int row = blockIdx.x * (blockDim.x / SAMPO_LANES) + threadIdx.x / SAMPO_LANES;
    const int r = blockIdx.y;
    const int lane = threadIdx.x % SAMPO_LANES;
    if (row >= rows || r >= n_act) return;
    const unsigned char* wrow = w + (size_t)row * row_bytes;
    const float* xr = x + (size_t)r * cols;
    float l = 0.0f;
    for (int i = lane; i < cols; i += SAMPO_LANES) l = __fadd_rn(l, __fmul_rn(sampo_dequant(ty, wrow, i), xr[i]));
    const float v = sampo_butterfly(l);
    if (lane == 0) out[(size_t)r * rows + row] = v;
}

// Embedding rows of any supported type: out[r, i] = dequant(table[tokens[r]])[i], times
// `scale` when `scaled` (Gemma's embedding scale: the CPU's x * scale, one rounding).
extern "C" __global__ void embed(const unsigned char* __restrict__ table, int ty, int row_bytes,
                                 const unsigned int* __restrict__ tokens, float* __restrict__ out, int cols, int n,
                                 int scaled, float scale) {
    const int r = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n || i >= cols) return;
    const float v = sampo_dequant(ty, table + (size_t)tokens[r] * row_bytes, i);
    out[(size_t)r * cols + i] = scaled ? __fmul_rn(v, scale) : v;
}
