// A CPU emulator of the CUDA execution model, just large enough to run sampo's
// kernels unchanged: every CUDA thread of a block is a fiber, warp shuffles and
// barriers are rendezvous between fibers, blocks run one after another. It checks the
// kernels' logic (indexing, reductions, the canonical order) on machines without a
// GPU; the float operations are the host's IEEE single precision, compiled without
// contraction, which is what the explicit __f*_rn intrinsics ask of the device.
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
#define __shared__ static

namespace sampo_emu {
void warp_barrier();
void block_barrier();
uint32_t shfl(uint32_t v, int src_lane);
int lane_id();
}  // namespace sampo_emu

inline void __syncthreads() { sampo_emu::block_barrier(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { sampo_emu::warp_barrier(); }

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

inline float __shfl_xor_sync(unsigned int, float v, int off) {
    return __uint_as_float(sampo_emu::shfl(sampo_emu_bits(v), sampo_emu::lane_id() ^ off));
}
inline int __shfl_xor_sync(unsigned int, int v, int off) {
    return (int)sampo_emu::shfl((uint32_t)v, sampo_emu::lane_id() ^ off);
}
inline float __shfl_sync(unsigned int, float v, int src) { return __uint_as_float(sampo_emu::shfl(sampo_emu_bits(v), src)); }
inline int __shfl_sync(unsigned int, int v, int src) { return (int)sampo_emu::shfl((uint32_t)v, src); }

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
