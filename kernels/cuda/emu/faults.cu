// Test-only kernels, compiled into the CUDA emulator alone (emu.cpp includes this file;
// NVRTC never sees it): each commits one fault that a GPU leaves undefined or
// order-dependent, so that tests can check the emulator refuses or exposes it.
// kernels/tests/cuda_emulated.rs launches them by name.
#include "../common.cuh"

// Lane 5 of every warp exits; the others then shuffle with the full mask, which names
// lane 5 (undefined on hardware).
extern "C" __global__ void emu_fault_exited_lane(float* out) {
    const int lane = threadIdx.x % SAMPO_LANES;
    if (lane == 5) return;
    float v = (float)threadIdx.x;
    v = __shfl_xor_sync(SAMPO_FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// Odd and even lanes of a warp shuffle at different call sites (divergent shuffles).
extern "C" __global__ void emu_fault_divergent_shuffle(float* out) {
    const int lane = threadIdx.x % SAMPO_LANES;
    float v = (float)threadIdx.x;
    if (lane % 2 == 1) {
        v = __shfl_xor_sync(SAMPO_FULL_MASK, v, 1);
    } else {
        v = __fadd_rn(__shfl_xor_sync(SAMPO_FULL_MASK, v, 1), 1.0f);
    }
    out[threadIdx.x] = v;
}

// Half a warp waits for the warp, the other half for the block: neither can pass.
extern "C" __global__ void emu_fault_deadlock(float* out) {
    const int lane = threadIdx.x % SAMPO_LANES;
    if (lane < 16) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// The legal pattern every kernel uses: whole warps exit (their rows are past the end)
// and the remaining warps reduce with full-mask shuffles.
extern "C" __global__ void emu_ok_whole_warp_exits(float* out, int live_warps) {
    if ((int)(threadIdx.x / SAMPO_LANES) >= live_warps) return;
    out[threadIdx.x] = sampo_butterfly((float)(threadIdx.x % SAMPO_LANES));
}

// An inter-block race: block b reads what block b - 1 writes. One after another, in
// order, seen[b] = b; in any other order some block reads 0.
extern "C" __global__ void emu_race_between_blocks(int* buf, int* seen) {
    if (threadIdx.x != 0) return;
    seen[blockIdx.x] = buf[blockIdx.x];
    buf[blockIdx.x + 1] = (int)blockIdx.x + 1;
}
