// Fiber scheduler and launcher of the CUDA emulator (see emu.h).
#include "emu.h"

#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// The kernels, unchanged.
#include "../quant.cu"
#include "../norm.cu"
#include "../attention.cu"
#include "../ffn.cu"
#include "../sampling.cu"
// Test-only kernels that commit the faults the emulator must refuse.
#include "faults.cu"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// Switching fibers: on x86-64 a minimal switch of the callee-saved registers (glibc's
// swapcontext also saves the signal mask, a system call per switch, which made the
// emulator ten times slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void sampo_emu_switch(void** save_sp, void* new_sp);
asm(R"(
    .text
    .globl sampo_emu_switch
    .type sampo_emu_switch, @function
sampo_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sampo_emu_switch, .-sampo_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#define SAMPO_EMU_ASM_SWITCH 1
#endif

namespace sampo_emu {
namespace {

constexpr size_t kStack = 64 * 1024;

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;
    std::unique_ptr<char[]> stack;  // kStack bytes, reused across launches
    bool done = false;
    // What a parked fiber waits for: a warp (1) or block (2) barrier generation to
    // pass. The scheduler does not resume it before then.
    int wait_kind = 0;
    int wait_gen = 0;
    unsigned shuffles = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t main;
    int cur = 0;
    int n = 0;
    int live = 0;
    std::vector<int> warp_live, warp_arrived, warp_gen;
    // The call site where the current generation of each warp's rendezvous meets (set
    // by its first lane), and how many lanes the last release let through.
    std::vector<const char*> warp_file;
    std::vector<int> warp_line, warp_met;
    int block_arrived = 0, block_gen = 0;
    std::vector<uint32_t> slots[2];
    const std::function<void()>* body = nullptr;
    // The launch's first fault (a negative code), its message.
    int fault = 0;
    std::string message;
};

// Fiber wait kinds: a warp (1) or block (2) barrier generation; 3: a fiber that
// faulted, never resumed.
constexpr int kWaitWarp = 1, kWaitBlock = 2, kWaitFaulted = 3;

thread_local Block* g = nullptr;
thread_local void* g_main_sp = nullptr;

#if SAMPO_EMU_ASM_SWITCH
void yield() { sampo_emu_switch(&g->fibers[g->cur].sp, g_main_sp); }

[[noreturn]] void trampoline() {
    (*g->body)();
    g->fibers[g->cur].done = true;
    void* dead = nullptr;
    sampo_emu_switch(&dead, g_main_sp);
    __builtin_unreachable();
}
#else
void yield() { swapcontext(&g->fibers[g->cur].ctx, &g->main); }

void trampoline() {
    (*g->body)();
    g->fibers[g->cur].done = true;
    // Returning switches to uc_link (the scheduler).
}
#endif

// Release barriers that every live thread has reached (also after a thread exits).
void release_ready(int warp) {
    if (g->warp_arrived[warp] > 0 && g->warp_arrived[warp] >= g->warp_live[warp]) {
        g->warp_met[warp] = g->warp_arrived[warp];
        g->warp_arrived[warp] = 0;
        g->warp_gen[warp]++;
    }
    if (g->block_arrived > 0 && g->block_arrived >= g->live) {
        g->block_arrived = 0;
        g->block_gen++;
    }
}

// Apart from run_grid's loops: getcontext returns twice.
__attribute__((noinline)) void init_fiber(Fiber& f, ucontext_t* link) {
    f.done = false;
    f.wait_kind = 0;
    f.shuffles = 0;
#if SAMPO_EMU_ASM_SWITCH
    (void)link;
    // A stack that "returns" into trampoline with the ABI's alignment: six zeroed
    // callee-saved registers, the entry address, then a fake return address.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.get()) + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&trampoline);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
    return;
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = link;
    makecontext(&f.ctx, trampoline, 0);
}

}  // namespace

int lane_id() { return g->cur % 32; }

void park(int kind, int gen) {
    Fiber& f = g->fibers[g->cur];
    f.wait_kind = kind;
    f.wait_gen = gen;
    yield();
    f.wait_kind = 0;
}

// Fail the launch (the first fault wins) and park this fiber for good: the scheduler
// stops at once, and the next launch starts every fiber afresh.
[[gnu::format(printf, 2, 3)]] void fail(int code, const char* fmt, ...) {
    if (g->fault == 0) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        char where[96];
        snprintf(where, sizeof where, "block (%u, %u, %u), thread %d: ", blockIdx.x, blockIdx.y, blockIdx.z, g->cur);
        g->fault = code;
        g->message = std::string(where) + buf;
    }
    g->fibers[g->cur].wait_kind = kWaitFaulted;
    yield();
}

void warp_barrier() {
    const int w = g->cur / 32;
    const int gen = g->warp_gen[w];
    g->warp_arrived[w]++;
    release_ready(w);
    if (g->warp_gen[w] == gen) park(kWaitWarp, gen);
}

// A full-mask rendezvous of the warp at one call site: every lane of the warp must
// arrive, at the same site, none having exited.
void warp_meet(unsigned int mask, const char* what, const char* file, int line) {
    if (mask != 0xffffffffu) {
        fail(-6, "%s with mask %#x at %s:%d: the emulator runs full-warp (0xffffffff) masks only", what, mask, file,
             line);
    }
    const int w = g->cur / 32;
    if (g->warp_arrived[w] == 0) {
        g->warp_file[w] = file;
        g->warp_line[w] = line;
    } else if (g->warp_line[w] != line || std::strcmp(g->warp_file[w], file) != 0) {
        fail(-5, "divergent %s: lane %d is at %s:%d while other lanes of its warp wait at %s:%d", what, g->cur % 32,
             file, line, g->warp_file[w], g->warp_line[w]);
    }
    warp_barrier();
    if (g->warp_met[w] < 32) {
        fail(-4, "full-mask %s at %s:%d with %d of the warp's 32 lanes (the others have exited or do not exist)", what,
             file, line, g->warp_met[w]);
    }
}

void warp_sync(unsigned int mask, const char* file, int line) { warp_meet(mask, "__syncwarp", file, line); }

void block_barrier() {
    const int gen = g->block_gen;
    g->block_arrived++;
    release_ready(g->cur / 32);
    if (g->block_gen == gen) park(kWaitBlock, gen);
}

// One barrier per shuffle: consecutive shuffles of a warp use alternate slot arrays,
// and no lane can write a slot array again before every lane has passed the barrier
// of the shuffle in between (having read this one).
uint32_t shfl(unsigned int mask, uint32_t v, int src_lane, const char* file, int line) {
    Fiber& me = g->fibers[g->cur];
    std::vector<uint32_t>& slots = g->slots[me.shuffles++ & 1];
    slots[g->cur] = v;
    warp_meet(mask, "warp shuffle", file, line);
    // Every lane of the warp is live and has written its slot.
    return slots[(g->cur & ~31) + (src_lane & 31)];
}

uint64_t splitmix64(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The last failed launch's message on this thread.
thread_local std::string g_error;

// Runs every block of the grid, in the order of a permutation seeded by `order_seed`
// (0: one after another, x fastest). Returns 0 or the first fault's code.
int run_grid(dim3 grid, dim3 block, uint64_t order_seed, const std::function<void()>& body) {
    const int n = (int)(block.x * block.y * block.z);
    const int warps = (n + 31) / 32;
    // Fibers and their stacks live as long as the thread: launches are many and small.
    thread_local Block b;
    if ((int)b.fibers.size() < n) b.fibers.resize(n);
    for (auto& f : b.fibers)
        if (!f.stack) f.stack.reset(new char[kStack]);
    b.n = n;
    b.slots[0].assign(n, 0);
    b.slots[1].assign(n, 0);
    b.body = &body;
    b.fault = 0;
    b.message.clear();
    Block* saved = g;
    g = &b;
    gridDim = grid;
    blockDim = block;
    // The block order: a GPU runs blocks concurrently and in no promised order, so a
    // kernel must not depend on it; a different permutation per launch makes a kernel
    // that does give wrong results here.
    const uint64_t total = (uint64_t)grid.x * grid.y * grid.z;
    std::vector<uint64_t> order(total);
    std::iota(order.begin(), order.end(), uint64_t(0));
    if (order_seed != 0) {
        uint64_t st = order_seed;
        for (uint64_t k = total; k > 1; --k) std::swap(order[k - 1], order[splitmix64(st) % k]);
    }
    for (const uint64_t lin : order) {
        blockIdx = dim3{(unsigned)(lin % grid.x), (unsigned)(lin / grid.x % grid.y), (unsigned)(lin / grid.x / grid.y)};
        b.live = n;
        b.warp_live.assign(warps, 0);
        for (int i = 0; i < n; ++i) b.warp_live[i / 32]++;
        b.warp_arrived.assign(warps, 0);
        b.warp_gen.assign(warps, 0);
        b.warp_file.assign(warps, nullptr);
        b.warp_line.assign(warps, 0);
        b.warp_met.assign(warps, 0);
        b.block_arrived = 0;
        b.block_gen = 0;
        for (int i = 0; i < n; ++i) init_fiber(b.fibers[i], &b.main);
        while (b.live > 0) {
            bool ran = false;
            for (int i = 0; i < n; ++i) {
                const Fiber& f = b.fibers[i];
                if (f.done || f.wait_kind == kWaitFaulted) continue;
                if (f.wait_kind == kWaitWarp && b.warp_gen[i / 32] == f.wait_gen) continue;
                if (f.wait_kind == kWaitBlock && b.block_gen == f.wait_gen) continue;
                ran = true;
                b.cur = i;
                threadIdx =
                    dim3{(unsigned)i % block.x, ((unsigned)i / block.x) % block.y, (unsigned)i / (block.x * block.y)};
#if SAMPO_EMU_ASM_SWITCH
                sampo_emu_switch(&g_main_sp, b.fibers[i].sp);
#else
                swapcontext(&b.main, &b.fibers[i].ctx);
#endif
                if (b.fault != 0) {
                    g_error = b.message;
                    g = saved;
                    return b.fault;
                }
                if (b.fibers[i].done) {
                    b.live--;
                    b.warp_live[i / 32]--;
                    release_ready(i / 32);
                }
            }
            if (!ran) {
                // Every live thread waits at a barrier that the others never reach.
                char buf[128];
                snprintf(buf, sizeof buf, "block (%u, %u, %u): deadlock: %d live threads all wait at barriers",
                         blockIdx.x, blockIdx.y, blockIdx.z, b.live);
                b.fault = -7;
                g_error = buf;
                g = saved;
                return b.fault;
            }
        }
    }
    g = saved;
    return 0;
}


}  // namespace sampo_emu

namespace {

template <typename T>
T from_slot(uint64_t v) {
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<uintptr_t>(v));
    } else {
        T t;
        std::memcpy(&t, &v, sizeof(T));
        return t;
    }
}

template <typename... A, size_t... I>
void call(void (*k)(A...), const uint64_t* a, std::index_sequence<I...>) {
    k(from_slot<A>(a[I])...);
}

struct Entry {
    const char* name;
    int nargs;
    void (*invoke)(void* fn, const uint64_t* args);
    void* fn;
};

template <typename... A>
Entry entry(const char* name, void (*k)(A...)) {
    return Entry{name, (int)sizeof...(A),
                 [](void* fn, const uint64_t* args) {
                     call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
                 },
                 reinterpret_cast<void*>(k)};
}

const Entry kKernels[] = {
    entry("quantize_act", quantize_act),
    entry("matmul_q4_0", matmul_q4_0),
    entry("matmul_q4_1", matmul_q4_1),
    entry("matmul_q5_0", matmul_q5_0),
    entry("matmul_q5_1", matmul_q5_1),
    entry("matmul_q8_0", matmul_q8_0),
    entry("matmul_q2_k", matmul_q2_k),
    entry("matmul_q3_k", matmul_q3_k),
    entry("matmul_q4_k", matmul_q4_k),
    entry("matmul_q5_k", matmul_q5_k),
    entry("matmul_q6_k", matmul_q6_k),
    entry("matmul_glu_q4_0", matmul_glu_q4_0),
    entry("matmul_glu_q4_1", matmul_glu_q4_1),
    entry("matmul_glu_q5_0", matmul_glu_q5_0),
    entry("matmul_glu_q5_1", matmul_glu_q5_1),
    entry("matmul_glu_q8_0", matmul_glu_q8_0),
    entry("matmul_glu_q2_k", matmul_glu_q2_k),
    entry("matmul_glu_q3_k", matmul_glu_q3_k),
    entry("matmul_glu_q4_k", matmul_glu_q4_k),
    entry("matmul_glu_q5_k", matmul_glu_q5_k),
    entry("matmul_glu_q6_k", matmul_glu_q6_k),
    entry("matmul_f", matmul_f),
    entry("embed", embed),
    entry("add_norm_quant", add_norm_quant),
    entry("attention", attention),
    entry("glu_quant", glu_quant),
    entry("sample_rows", sample_rows),
    entry("emu_fault_exited_lane", emu_fault_exited_lane),
    entry("emu_fault_divergent_shuffle", emu_fault_divergent_shuffle),
    entry("emu_fault_deadlock", emu_fault_deadlock),
    entry("emu_ok_whole_warp_exits", emu_ok_whole_warp_exits),
    entry("emu_race_between_blocks", emu_race_between_blocks),
};

}  // namespace

// 0: ran; -1: no such kernel; -2: wrong argument count; -3: bad launch shape; -4: a
// full-mask warp rendezvous with exited lanes; -5: divergent warp rendezvous; -6: a
// mask other than the full warp; -7: deadlock (sampo_emu_last_error says more).
// Blocks run in the order of a permutation seeded by order_seed (0: in order).
extern "C" int sampo_emu_launch(const char* name, const unsigned int* grid, const unsigned int* block,
                                const uint64_t* args, int nargs, uint64_t order_seed) {
    sampo_emu::g_error.clear();
    for (const Entry& e : kKernels) {
        if (std::string(e.name) != name) continue;
        if (e.nargs != nargs) return -2;
        const dim3 gd{grid[0], grid[1], grid[2]};
        const dim3 bd{block[0], block[1], block[2]};
        if (bd.x * bd.y * bd.z == 0 || bd.x * bd.y * bd.z > 1024 || gd.x * gd.y * gd.z == 0) return -3;
        std::vector<uint64_t> copy(args, args + nargs);
        const std::function<void()> body = [&]() { e.invoke(e.fn, copy.data()); };
        const int code = sampo_emu::run_grid(gd, bd, order_seed, body);
        return code;
    }
    return -1;
}

// The message of this thread's last failed launch (valid until its next launch).
extern "C" const char* sampo_emu_last_error() { return sampo_emu::g_error.c_str(); }
