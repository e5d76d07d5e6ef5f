// A CPU emulator of the CUDA execution model, just large enough to run sampo's
// kernels unchanged: every CUDA thread of a block is a fiber, warp shuffles and
// barriers are rendezvous between fibers, blocks run one after another in a shuffled
// order (a seeded permutation per launch, so a kernel whose blocks depend on each
// other's order fails here as it would on a GPU). It checks the kernels' logic
// (indexing, reductions, the canonical order) on machines without a GPU; the float
// operations are the host's IEEE single precision, compiled without contraction, which
// is what the explicit __f*_rn intrinsics ask of the device.
//
// What the hardware leaves undefined the emulator refuses, failing the launch: a
// full-mask warp shuffle or __syncwarp when a lane of the warp has exited (or does not
// exist), lanes of one warp meeting at different shuffle call sites (divergent
// shuffles), any other mask, and barriers that can never be passed (deadlock).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct float2 {
    float x, y;
};

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
// Shared memory is per block: the blocks of a launch run one at a time on the
// launching thread, so a thread-local static serves every block in turn (a plain static
// would be shared by launches running on other threads at the same time).
#define __shared__ static thread_local

namespace sampo_emu {
// `file` and `line` name the call site of the intrinsic (its default arguments): every
// lane of a warp must meet at the same one.
void warp_sync(unsigned int mask, const char* file, int line);
void block_barrier();
uint32_t shfl(unsigned int mask, uint32_t v, int src_lane, const char* file, int line);
int lane_id();
}  // namespace sampo_emu

#define SAMPO_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads() { sampo_emu::block_barrier(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu, SAMPO_EMU_SITE) { sampo_emu::warp_sync(mask, file, line); }

inline uint32_t sampo_emu_bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
inline int __float_as_int(float f) { return (int)sampo_emu_bits(f); }

inline float __shfl_xor_sync(unsigned int mask, float v, int off, SAMPO_EMU_SITE) {
    return __uint_as_float(sampo_emu::shfl(mask, sampo_emu_bits(v), sampo_emu::lane_id() ^ off, file, line));
}
inline int __shfl_xor_sync(unsigned int mask, int v, int off, SAMPO_EMU_SITE) {
    return (int)sampo_emu::shfl(mask, (uint32_t)v, sampo_emu::lane_id() ^ off, file, line);
}
inline float __shfl_sync(unsigned int mask, float v, int src, SAMPO_EMU_SITE) {
    return __uint_as_float(sampo_emu::shfl(mask, sampo_emu_bits(v), src, file, line));
}
inline int __shfl_sync(unsigned int mask, int v, int src, SAMPO_EMU_SITE) {
    return (int)sampo_emu::shfl(mask, (uint32_t)v, src, file, line);
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __int2float_rn(int i) { return (float)i; }
inline unsigned int __clz(unsigned int x) { return x == 0 ? 32 : (unsigned int)__builtin_clz(x); }
inline int __dp4a(int a, int b, int c) {
    for (int k = 0; k < 4; ++k) c += (int)(int8_t)(a >> (8 * k)) * (int)(int8_t)(b >> (8 * k));
    return c;
}
using std::isnan;
