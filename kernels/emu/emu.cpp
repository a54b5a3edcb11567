// The CPU side of cuda_emu.h: fibers, barriers, clusters, the kernel registry and the launch
// entry point the Rust crate calls. Built by build.rs together with every kernels/*.cu.
//
// Checking builds (build.rs, SENET_EMU_SANITIZE; see README.md in this folder). This file is
// compiled on its own and never instrumented: only kernel code is checked.
// - thread:    ThreadSanitizer. Every CUDA thread is a TSan fiber, switched without implied
//              synchronisation; each barrier is annotated as the happens-before it is on a GPU
//              (__syncthreads per block, a shuffle per warp, cluster.sync per cluster); blocks
//              of a grid run on several OS threads at once.
// - address:   AddressSanitizer + UndefinedBehaviorSanitizer (alignment of vector accesses).
//              Fiber stack switches are announced to ASan.
// - initcheck: every load and store of the kernels is instrumented (GCC's outline
//              kernel-address instrumentation, whose callbacks are defined below), and a read of
//              shared memory that no thread of the running block wrote fails the launch.
// In every build: shared memory (static and dynamic) is poisoned (0xFF bytes: NaN in every
// float type) at the start of each block; SENET_EMU_SEED=N runs the fibers between barriers
// and the blocks of a grid in a seeded random order; SENET_EMU_THREADS=N runs blocks on N OS
// threads.
#include <setjmp.h>
#include <unistd.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

// build.rs compiles this file on its own, never instrumented, and defines the build's mode.
#if defined(SENET_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(SENET_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#endif
#if defined(SENET_EMU_TSAN) || defined(SENET_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(SENET_EMU_ASAN)
// ASan: stack switches go through swapcontext, announced with start/finish_switch_fiber.
#define SENET_EMU_UCONTEXT 1
#endif


// The kernels' object (build.rs's generated unit).
extern "C" void senet_emu_kernels_linked();

namespace senet_emu {

thread_local ThreadState* g_thread = nullptr;
thread_local BlockState* g_block_state = nullptr;

namespace {

constexpr std::size_t kStack = 32 * 1024;
constexpr std::size_t kMaxThreads = 1024;
constexpr unsigned char kPoison = 0xFF;

// ------------------------------------------------------------------ configuration
struct Config {
    bool shuffle = false;       // seeded random order of fibers and blocks
    unsigned long long seed = 0;
    unsigned int workers = 1;   // OS threads running the blocks of a grid
};

#if defined(SENET_EMU_TSAN) || defined(SENET_EMU_ASAN) || defined(SENET_EMU_INITCHECK)
constexpr bool kChecking = true;
#else
constexpr bool kChecking = false;
#endif

const Config& config() {
    static const Config c = [] {
        Config c;
        if (const char* s = std::getenv("SENET_EMU_SEED"); s && *s) {
            c.shuffle = true;
            c.seed = std::strtoull(s, nullptr, 0);
        } else if (kChecking) {
            // Checking builds explore a new interleaving each run; the seed is printed on failure.
            c.shuffle = true;
            c.seed = static_cast<unsigned long long>(
                std::chrono::steady_clock::now().time_since_epoch().count());
        }
        c.workers = kChecking ? 2 : 1;
        if (const char* s = std::getenv("SENET_EMU_THREADS"); s && *s) {
            long n = std::strtol(s, nullptr, 10);
            if (n >= 1 && n <= 64) c.workers = static_cast<unsigned int>(n);
        }
        return c;
    }();
    return c;
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
void shuffle(std::vector<T>& v, uint64_t& s) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix(s) % i]);
}

// Fiber stacks, reused across blocks and launches (a block needs up to 32 MiB of them).
std::mutex g_pool_m;
std::vector<std::unique_ptr<char[]>> g_pool;

std::unique_ptr<char[]> take_stacks() {
    std::lock_guard<std::mutex> lk(g_pool_m);
    if (!g_pool.empty()) {
        auto p = std::move(g_pool.back());
        g_pool.pop_back();
        return p;
    }
    return std::unique_ptr<char[]>(new char[kMaxThreads * kStack]);
}

void give_stacks(std::unique_ptr<char[]> p) {
    std::lock_guard<std::mutex> lk(g_pool_m);
    if (p && g_pool.size() < 16) g_pool.push_back(std::move(p));
}

#if defined(SENET_EMU_TSAN)
// TSan fibers, created once and reused by every Block object (each is a few mmap'd regions that
// TSan never gives back: creating them per block or per cluster exhausts the process's memory
// mappings). Two Block objects running at once never share one.
std::mutex g_tsan_m;
std::vector<void*> g_tsan_free;

void* take_tsan_fiber() {
    std::lock_guard<std::mutex> lk(g_tsan_m);
    if (g_tsan_free.empty()) return __tsan_create_fiber(0);
    void* f = g_tsan_free.back();
    g_tsan_free.pop_back();
    return f;
}

void give_tsan_fibers(std::vector<void*>& v) {
    std::lock_guard<std::mutex> lk(g_tsan_m);
    g_tsan_free.insert(g_tsan_free.end(), v.begin(), v.end());
    v.clear();
}
#endif

enum class St { Run, Block, Warp, Cluster, Done };

struct Cluster;

// A fiber starts on its own stack through ucontext once; after that, switches go through
// _setjmp/_longjmp, which unlike swapcontext save no signal mask (no system call per switch).
// The address build switches with swapcontext (announced to ASan); the thread build keeps
// _setjmp/_longjmp and announces each switch to TSan (__tsan_switch_to_fiber).
struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    bool started = false;
    ThreadState ts;
    St st = St::Run;
    unsigned long gen = 0;  // barrier generation when it parked (which token to acquire)
#if defined(SENET_EMU_TSAN)
    void* tsan = nullptr;
#endif
#if defined(SENET_EMU_ASAN)
    void* fake_stack = nullptr;
#endif
};

// Happens-before tokens of one block (TSan synchronises on their addresses). Allocated per
// block and freed after it, so a later block on the same OS thread inherits no ordering.
struct Tokens {
    char block[2];
    char warp[32][2];
    char done;
    char start;  // released by the scheduler before the block's threads run: they see its setup
};

// A static __shared__ variable met in the running block (registered by SENET_EMU_SHARED).
struct SharedVar {
    unsigned char* p;
    std::size_t n;
    const char* name;
    std::vector<unsigned char> written;  // initcheck builds
};

struct Block {
    ~Block() {
        give_stacks(std::move(stacks));
#if defined(SENET_EMU_TSAN)
        give_tsan_fibers(tsan_pool);
#endif
    }
    BlockState bs;
    std::vector<Fiber> fibers;
    std::unique_ptr<char[]> stacks;
    jmp_buf sched;
    ucontext_t sched_uc;
    Fiber* cur = nullptr;
    std::vector<unsigned char> dsmem;
    std::vector<unsigned char> dsmem_written;  // initcheck builds
    std::vector<SharedVar> statics;
    std::vector<uint64_t> slots;  // one per thread, for shuffles
    std::vector<unsigned int> order;
    uint64_t rng = 0;
    unsigned long bar_gen = 0, cluster_gen = 0;
    unsigned long warp_gen[32] = {};
    std::unique_ptr<Tokens> tok;
    char* done_token = nullptr;  // released by every finished thread; acquired by the launcher
    std::unique_ptr<char> retire{new char};  // released by finished threads; acquired by the next block
    Cluster* cluster = nullptr;
    unsigned int rank = 0;
    std::string error;
    const char* name = "";
    void* fn = nullptr;
    Thunk thunk = nullptr;
    void** args = nullptr;
#if defined(SENET_EMU_TSAN)
    void* tsan_sched = nullptr;
    // TSan fibers, one per thread slot, kept across the blocks this Block object runs.
    std::vector<void*> tsan_pool;
#endif
#if defined(SENET_EMU_ASAN)
    const void* sched_bottom = nullptr;
    std::size_t sched_size = 0;
#endif
};

struct Cluster {
    unsigned int size = 1;
    std::vector<Block*> blocks;
    std::mutex m;
    std::condition_variable cv;
    unsigned int arrived = 0;
    unsigned long generation = 0;
    bool broken = false;
    std::unique_ptr<char[]> tok{new char[2]};
};

thread_local Block* g_run = nullptr;
thread_local bool g_in_kernel = false;

std::map<std::string, std::pair<void*, Thunk>>& registry() {
    static std::map<std::string, std::pair<void*, Thunk>> r;
    return r;
}

// ------------------------------------------------------------------ switching
// dying: the fiber is never resumed. failing: it stops the launch with b->error, which the
// scheduler reads (a synchronising switch, for TSan: the launch ends anyway).
void to_scheduler(Block* b, bool dying, bool failing = false) {
    Fiber* f = b->cur;
    g_in_kernel = false;
#if defined(SENET_EMU_TSAN)
    // TSan: the jump buffer is set while this fiber is TSan's current one, then the switch.
    const unsigned flags = failing ? 0 : __tsan_switch_to_fiber_no_sync;
    if (dying) {
        __tsan_switch_to_fiber(b->tsan_sched, flags);
        _longjmp(b->sched, 1);
    }
    if (_setjmp(f->jb) == 0) {
        __tsan_switch_to_fiber(b->tsan_sched, flags);
        _longjmp(b->sched, 1);
    }
#elif defined(SENET_EMU_UCONTEXT)
#if defined(SENET_EMU_ASAN)
    __sanitizer_start_switch_fiber(dying ? nullptr : &f->fake_stack, b->sched_bottom, b->sched_size);
#endif
    swapcontext(&f->uc, &b->sched_uc);
#if defined(SENET_EMU_ASAN)
    __sanitizer_finish_switch_fiber(f->fake_stack, &b->sched_bottom, &b->sched_size);
#endif
    (void)dying;
    (void)failing;
#else
    (void)failing;
    if (dying) _longjmp(b->sched, 1);
    if (_setjmp(f->jb) == 0) _longjmp(b->sched, 1);
#endif
    g_in_kernel = true;
}

void park(St s) {
    Block* b = g_run;
    b->cur->st = s;
    to_scheduler(b, false);
}

void fiber_entry() {
    Block* b = g_run;
#if defined(SENET_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &b->sched_bottom, &b->sched_size);
#endif
#if defined(SENET_EMU_TSAN)
    __tsan_acquire(&b->tok->start);  // the fiber may be reused: order it after this block's setup
#endif
    g_in_kernel = true;
    b->thunk(b->fn, b->args);
    b = g_run;
    b->cur->st = St::Done;
#if defined(SENET_EMU_TSAN)
    __tsan_release(b->done_token);
    __tsan_release(b->retire.get());
#endif
    to_scheduler(b, true);
}

// Runs fiber f until it parks or finishes.
void resume(Block* b, Fiber& f) {
    b->cur = &f;
    g_thread = &f.ts;
#if defined(SENET_EMU_TSAN)
    if (_setjmp(b->sched) == 0) {
        __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
        if (!f.started) {
            f.started = true;
            setcontext(&f.uc);
        }
        _longjmp(f.jb, 1);
    }
#elif defined(SENET_EMU_UCONTEXT)
    f.started = true;
#if defined(SENET_EMU_ASAN)
    void* fake = nullptr;
    char* bottom = static_cast<char*>(f.uc.uc_stack.ss_sp);
    __sanitizer_start_switch_fiber(&fake, bottom, f.uc.uc_stack.ss_size);
#endif
    swapcontext(&b->sched_uc, &f.uc);
#if defined(SENET_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
#else
    if (_setjmp(b->sched) == 0) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.uc);
        }
        _longjmp(f.jb, 1);
    }
#endif
}

// Waits for every block of the cluster at the OS level. Returns false if the wait timed out
// (some block never reached its cluster.sync: divergent barrier).
bool cluster_barrier(Cluster* c) {
    std::unique_lock<std::mutex> lk(c->m);
    if (c->broken) return false;
    const unsigned long gen = c->generation;
    if (++c->arrived == c->size) {
        c->arrived = 0;
        ++c->generation;
        c->cv.notify_all();
        return true;
    }
    const bool ok = c->cv.wait_for(lk, std::chrono::seconds(30), [&] { return c->generation != gen || c->broken; });
    if (!ok || c->broken) {
        c->broken = true;
        c->cv.notify_all();
        return false;
    }
    return true;
}

void break_cluster(Cluster* c) {
    std::lock_guard<std::mutex> lk(c->m);
    c->broken = true;
    c->cv.notify_all();
}

std::string where(const Block* b) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "block (%u,%u,%u)", b->bs.block_idx.x, b->bs.block_idx.y, b->bs.block_idx.z);
    std::string s = msg;
    if (b->cur) {
        std::snprintf(msg, sizeof msg, ", thread (%u,%u,%u)", b->cur->ts.tid.x, b->cur->ts.tid.y, b->cur->ts.tid.z);
        s += msg;
    }
    return s;
}

std::string seed_note() {
    if (!config().shuffle) return "";
    char msg[128];
    std::snprintf(msg, sizeof msg, " [schedule seed %llu: rerun with SENET_EMU_SEED=%llu]", config().seed,
                  config().seed);
    return msg;
}

// Runs every thread of one block to completion. Returns false with b->error set on a barrier
// that can never be released (divergent __syncthreads / shuffle / cluster.sync).
bool run_block(Block* b) {
    const unsigned int n = b->bs.block_dim.x * b->bs.block_dim.y * b->bs.block_dim.z;
    b->fibers.assign(n, Fiber{});
    if (!b->stacks) b->stacks = take_stacks();
    b->slots.assign(n, 0);
    b->statics.clear();
    b->cur = nullptr;
    b->bar_gen = b->cluster_gen = 0;
    std::fill(std::begin(b->warp_gen), std::end(b->warp_gen), 0ul);
    b->tok.reset(new Tokens);
    std::fill(b->dsmem.begin(), b->dsmem.end(), kPoison);
#if defined(SENET_EMU_INITCHECK)
    b->dsmem_written.assign(b->dsmem.size(), 0);
#endif
#if defined(SENET_EMU_TSAN)
    // This block's threads happen after the earlier blocks this OS thread ran: they reuse their
    // fiber stacks, static __shared__ variables (thread_local) and shared-memory buffer, which
    // would otherwise look racy. (So TSan sees races between blocks on different OS threads
    // only; blocks are spread over the workers in a random order, see README.md.)
    __tsan_acquire(b->retire.get());
    __tsan_release(&b->tok->start);
    b->tsan_sched = __tsan_get_current_fiber();
#endif
#if defined(SENET_EMU_ASAN)
    __asan_unpoison_memory_region(b->stacks.get(), static_cast<std::size_t>(n) * kStack);
#endif
    g_run = b;
    g_block_state = &b->bs;
    for (unsigned int i = 0; i < n; ++i) {
        Fiber& f = b->fibers[i];
        f.ts.linear = i;
        f.ts.tid.x = i % b->bs.block_dim.x;
        f.ts.tid.y = (i / b->bs.block_dim.x) % b->bs.block_dim.y;
        f.ts.tid.z = i / (b->bs.block_dim.x * b->bs.block_dim.y);
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = b->stacks.get() + static_cast<std::size_t>(i) * kStack;
        f.uc.uc_stack.ss_size = kStack;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, fiber_entry, 0);
#if defined(SENET_EMU_TSAN)
        if (b->tsan_pool.size() <= i) b->tsan_pool.push_back(take_tsan_fiber());
        f.tsan = b->tsan_pool[i];
#endif
    }
    struct Cleanup {
        Block* b;
        ~Cleanup() {
#if defined(SENET_EMU_TSAN)
            // The block is over: what its threads allocated or wrote is the scheduler's now.
            __tsan_acquire(b->retire.get());
#endif
            b->cur = nullptr;
        }
    } cleanup{b};
    b->order.resize(n);
    for (unsigned int i = 0; i < n; ++i) b->order[i] = i;
    const unsigned int warps = (n + 31) / 32;
    for (;;) {
        if (config().shuffle) shuffle(b->order, b->rng);
        for (unsigned int i : b->order) {
            Fiber& f = b->fibers[i];
            if (f.st != St::Run) continue;
            resume(b, f);
            if (!b->error.empty()) return false;
        }
        b->cur = nullptr;
        // Release rules, innermost first.
        bool released = false;
        for (unsigned int w = 0; w < warps; ++w) {
            bool all = true, any = false;
            for (unsigned int i = w * 32; i < std::min(n, (w + 1) * 32); ++i) {
                St s = b->fibers[i].st;
                if (s == St::Done) continue;
                any = true;
                if (s != St::Warp) all = false;
            }
            if (any && all) {
                for (unsigned int i = w * 32; i < std::min(n, (w + 1) * 32); ++i)
                    if (b->fibers[i].st == St::Warp) b->fibers[i].st = St::Run;
                ++b->warp_gen[w];
                released = true;
            }
        }
        if (released) continue;
        unsigned int live = 0, at_block = 0, at_cluster = 0;
        for (auto& f : b->fibers) {
            if (f.st == St::Done) continue;
            ++live;
            at_block += f.st == St::Block;
            at_cluster += f.st == St::Cluster;
        }
        if (live == 0) return true;
        if (at_block == live) {
            for (auto& f : b->fibers) if (f.st == St::Block) f.st = St::Run;
            ++b->bar_gen;
            continue;
        }
        if (at_cluster == live && b->cluster) {
            if (!cluster_barrier(b->cluster)) {
                b->error = "cluster.sync: not every block of the cluster arrived (divergent barrier or a failed block)";
                return false;
            }
            for (auto& f : b->fibers) if (f.st == St::Cluster) f.st = St::Run;
            ++b->cluster_gen;
            continue;
        }
        char msg[256];
        std::snprintf(msg, sizeof msg,
                      "deadlock in block (%u,%u,%u): %u live threads, %u at __syncthreads, %u at cluster.sync, "
                      "the rest at a warp shuffle (divergent barrier)",
                      b->bs.block_idx.x, b->bs.block_idx.y, b->bs.block_idx.z, live, at_block, at_cluster);
        b->error = msg;
        return false;
    }
}

// Printed when a sanitizer stops the process (a race, an out-of-bounds access, a misaligned
// vector access): which kernel, block and thread, and the schedule seed to rerun it with.
void on_sanitizer_death() {
    Block* b = g_run;
    if (b) {
        std::fprintf(stderr, "senet emulator: stopped in kernel %s, %s%s\n", b->name, where(b).c_str(),
                     seed_note().c_str());
    } else {
        std::fprintf(stderr, "senet emulator: stopped outside a kernel%s\n", seed_note().c_str());
    }
}

}  // namespace

unsigned char* dynamic_smem() { return g_run->dsmem.data(); }

void syncthreads() {
    Block* b = g_run;
    Fiber* f = b->cur;
    f->gen = b->bar_gen;
#if defined(SENET_EMU_TSAN)
    __tsan_release(&b->tok->block[f->gen & 1]);
#endif
    park(St::Block);
#if defined(SENET_EMU_TSAN)
    __tsan_acquire(&b->tok->block[f->gen & 1]);
#endif
}

static void warp_barrier(Block* b) {
    Fiber* f = b->cur;
    const unsigned int w = f->ts.linear / 32;
    f->gen = b->warp_gen[w];
#if defined(SENET_EMU_TSAN)
    __tsan_release(&b->tok->warp[w][f->gen & 1]);
#endif
    park(St::Warp);
#if defined(SENET_EMU_TSAN)
    __tsan_acquire(&b->tok->warp[w][f->gen & 1]);
#endif
}

void warp_exchange(uint64_t value, uint64_t* out, int lane_xor) {
    Block* b = g_run;
    const unsigned int me = b->cur->ts.linear;
    b->slots[me] = value;
    warp_barrier(b);  // everyone in the warp has written
    const unsigned int src = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned int>(lane_xor & 31));
    *out = src < b->slots.size() ? b->slots[src] : value;
    warp_barrier(b);  // everyone has read before the slots are reused
}

void cluster_sync() {
    Block* b = g_run;
    if (!b->cluster) fail("cluster.sync() in a kernel launched without a cluster");
    Fiber* f = b->cur;
    f->gen = b->cluster_gen;
#if defined(SENET_EMU_TSAN)
    __tsan_release(&b->cluster->tok[f->gen & 1]);
#endif
    park(St::Cluster);
#if defined(SENET_EMU_TSAN)
    __tsan_acquire(&b->cluster->tok[f->gen & 1]);
#endif
}

unsigned int cluster_rank() { return g_run->cluster ? g_run->rank : 0; }

void* map_shared_rank(void* p, unsigned int rank) {
    Block* b = g_run;
    if (!b->cluster || rank >= b->cluster->size) fail("map_shared_rank: rank outside the cluster");
    auto* c = static_cast<unsigned char*>(p);
    unsigned char* base = b->dsmem.data();
    if (c < base || c >= base + b->dsmem.size())
        fail("map_shared_rank: pointer is not in dynamic shared memory (the emulator maps only that)");
    Block* other = b->cluster->blocks[rank];
    return other->dsmem.data() + (c - base);
}

void shared_var(void* p, std::size_t n, const char* name) {
    Block* b = g_run;
    for (auto& v : b->statics)
        if (v.p == p) return;
    // First thread of this block to reach the declaration: the variable starts as garbage.
    // (Written byte by byte through volatile, never through memset, so TSan, whose memset
    // interceptor would record it, sees only the kernel's own accesses.)
    volatile unsigned char* q = static_cast<unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) q[i] = kPoison;
    SharedVar v{static_cast<unsigned char*>(p), n, name, {}};
#if defined(SENET_EMU_INITCHECK)
    v.written.assign(n, 0);
#endif
    b->statics.push_back(std::move(v));
}

void check_vector_align(const void* p, const char* what) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    if ((a & 15u) == 0) return;
    Block* b = g_run;
    char msg[320];
    std::snprintf(msg, sizeof msg, "misaligned 16-byte %s at %p (address %% 16 = %u) in %s (a GPU faults)", what, p,
                  static_cast<unsigned>(a & 15u), where(b).c_str());
    fail(msg);
}

void fail(const char* msg) {
    Block* b = g_run;
    b->error = msg;
    to_scheduler(b, true, true);  // the fiber is never resumed
    std::abort();
}

void register_kernel(const char* name, void* fn, Thunk thunk) { registry()[name] = {fn, thunk}; }

#if defined(SENET_EMU_INITCHECK)
namespace {
// The shadow bytes covering [a, a + n), or nullptr when that is not shared memory of the
// running block (or of its cluster).
unsigned char* shadow_of(Block* b, uintptr_t a, std::size_t n, std::string* what) {
    auto in = [&](const unsigned char* p, std::size_t len) {
        return a >= reinterpret_cast<uintptr_t>(p) && a + n <= reinterpret_cast<uintptr_t>(p) + len;
    };
    auto check_block = [&](Block* o) -> unsigned char* {
        if (!o->dsmem.empty() && in(o->dsmem.data(), o->dsmem.size())) {
            const std::size_t off = a - reinterpret_cast<uintptr_t>(o->dsmem.data());
            if (what) *what = "dynamic shared memory + " + std::to_string(off) + " bytes" +
                              (o == b ? "" : " (of cluster rank " + std::to_string(o->rank) + ")");
            return o->dsmem_written.data() + off;
        }
        return nullptr;
    };
    if (unsigned char* s = check_block(b)) return s;
    for (auto& v : b->statics)
        if (in(v.p, v.n)) {
            const std::size_t off = a - reinterpret_cast<uintptr_t>(v.p);
            if (what) *what = std::string("__shared__ ") + v.name + " + " + std::to_string(off) + " bytes";
            return v.written.data() + off;
        }
    if (b->cluster)
        for (Block* o : b->cluster->blocks)
            if (o != b)
                if (unsigned char* s = check_block(o)) return s;
    return nullptr;
}

void initcheck_load(uintptr_t a, std::size_t n) {
    if (!g_in_kernel) return;
    Block* b = g_run;
    if (!b) return;
    unsigned char* s = shadow_of(b, a, n, nullptr);
    if (!s) return;
    for (std::size_t i = 0; i < n; ++i) {
        if (s[i]) continue;
        std::string what;
        shadow_of(b, a, n, &what);
        static thread_local char msg[512];
        std::snprintf(msg, sizeof msg,
                      "initcheck: %s read %zu bytes of %s that no thread of this block wrote (address %p)",
                      where(b).c_str(), n, what.c_str(), reinterpret_cast<void*>(a));
        g_in_kernel = false;
        fail(msg);
    }
}

void initcheck_store(uintptr_t a, std::size_t n) {
    if (!g_in_kernel) return;
    Block* b = g_run;
    if (!b) return;
    if (unsigned char* s = shadow_of(b, a, n, nullptr)) std::memset(s, 1, n);
}
}  // namespace
#endif

}  // namespace senet_emu

#if defined(SENET_EMU_INITCHECK)
// GCC's outline kernel-address instrumentation calls these for every load and store of the
// instrumented code (build.rs: -fsanitize=kernel-address, call threshold 0).
extern "C" {
#define SENET_EMU_HOOK(n)                                                                                     \
    void __asan_load##n##_noabort(uintptr_t a) { senet_emu::initcheck_load(a, n); }              \
    void __asan_store##n##_noabort(uintptr_t a) { senet_emu::initcheck_store(a, n); }
SENET_EMU_HOOK(1)
SENET_EMU_HOOK(2)
SENET_EMU_HOOK(4)
SENET_EMU_HOOK(8)
SENET_EMU_HOOK(16)
#undef SENET_EMU_HOOK
void __asan_loadN_noabort(uintptr_t a, std::size_t n) { senet_emu::initcheck_load(a, n); }
void __asan_storeN_noabort(uintptr_t a, std::size_t n) { senet_emu::initcheck_store(a, n); }
void __asan_handle_no_return() {}
// Dynamic-initialisation order checks (globals instrumentation is off; these remain).
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init() {}
}
#endif

using namespace senet_emu;

namespace {
// SENET_EMU_COVERAGE=PREFIX: at exit, PREFIX.<pid> lists every registered kernel ("registered
// NAME") and every kernel launched ("launched NAME"); scripts/sanitize.sh checks that its runs
// launch every kernel.
std::mutex g_cov_m;
std::map<std::string, unsigned long>* g_launched = nullptr;

void write_coverage() {
    const char* prefix = std::getenv("SENET_EMU_COVERAGE");
    if (!prefix || !*prefix) return;
    std::string path = std::string(prefix) + "." + std::to_string(static_cast<long>(getpid()));
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) return;
    for (auto& kv : registry()) std::fprintf(f, "registered %s\n", kv.first.c_str());
    std::lock_guard<std::mutex> lk(g_cov_m);
    if (g_launched)
        for (auto& kv : *g_launched) std::fprintf(f, "launched %s\n", kv.first.c_str());
    std::fclose(f);
}

void note_launch(const char* name) {
    static const bool on = [] {
        const char* p = std::getenv("SENET_EMU_COVERAGE");
        if (!p || !*p) return false;
        std::atexit(write_coverage);
        return true;
    }();
    if (!on) return;
    std::lock_guard<std::mutex> lk(g_cov_m);
    if (!g_launched) g_launched = new std::map<std::string, unsigned long>;
    ++(*g_launched)[name];
}

void setup_block(Block& b, dim3 idx, dim3 bd, dim3 g, unsigned int smem, const char* name, void* fn,
                              Thunk thunk, void** args, uint64_t rng, char* done) {
    b.bs.block_idx = idx;
    b.bs.block_dim = bd;
    b.bs.grid_dim = g;
#if defined(SENET_EMU_ASAN)
    // Its own heap block, exactly the launch's size: ASan's redzone starts at the end.
    std::vector<unsigned char>().swap(b.dsmem);
#endif
    b.dsmem.assign(smem, kPoison);  // shared memory starts as garbage, as on a GPU
    b.name = name;
    b.fn = fn;
    b.thunk = thunk;
    b.args = args;
    b.error.clear();
    b.rng = rng;
    b.done_token = done;
}

uint64_t launch_seed(const char* name, const dim3& g, const dim3& bd, unsigned int smem) {
    uint64_t h = config().seed ^ 0xcbf29ce484222325ull;
    for (const char* p = name; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ull;
    for (unsigned int v : {g.x, g.y, g.z, bd.x, bd.y, bd.z, smem}) h = (h ^ v) * 0x100000001b3ull;
    return h;
}
}  // namespace

// Runs kernel `name` to completion. Returns 0, or 1 with a message in err.
extern "C" int senet_emu_launch(const char* name, const unsigned int* grid, const unsigned int* block,
                                             unsigned int smem, unsigned int cluster, void** args, char* err,
                                             std::size_t errlen) {
#if defined(SENET_EMU_TSAN) || defined(SENET_EMU_ASAN)
    static const bool hooked = [] {
        __sanitizer_set_death_callback(on_sanitizer_death);
        return true;
    }();
    (void)hooked;
#endif
    auto set_err = [&](const std::string& m) {
        std::snprintf(err, errlen, "%s%s", m.c_str(), seed_note().c_str());
        return 1;
    };
    auto it = registry().find(name);
    if (it == registry().end()) return set_err(std::string("no emulated kernel named ") + name);
    note_launch(name);
    senet_emu_kernels_linked();
    const dim3 g{grid[0], grid[1], grid[2]}, bd{block[0], block[1], block[2]};
    if (bd.x * bd.y * bd.z == 0 || bd.x * bd.y * bd.z > 1024) return set_err("block size must be 1..1024 threads");
    if (g.x == 0 || g.y == 0 || g.z == 0) return set_err("empty grid");
    if (cluster == 0) cluster = 1;
    if (g.x % cluster != 0) return set_err("grid.x is not a multiple of the cluster size");
    uint64_t rng = launch_seed(name, g, bd, smem);
    const uint64_t base = splitmix(rng);
    // One done-token per worker: every finished thread releases it, this thread acquires them
    // all after the workers end, so the next launch (and the host) sees every kernel write.
    std::unique_ptr<char[]> done(new char[64]);
    auto setup = [&](Block& b, unsigned int x, unsigned int y, unsigned int z, unsigned int worker) {
        // Each block's fiber order depends on the launch's seed and its index only, not on
        // which worker runs it or when.
        uint64_t s = base ^ (((static_cast<uint64_t>(z) * g.y + y) * g.x + x) * 0x9E3779B97F4A7C15ull);
        setup_block(b, dim3{x, y, z}, bd, g, smem, name, it->second.first, it->second.second, args, splitmix(s),
                    &done[worker % 64]);
    };
    auto acquire_done = [&] {
#if defined(SENET_EMU_TSAN)
        for (int i = 0; i < 64; ++i) __tsan_acquire(&done[i]);
#endif
    };
    if (cluster == 1) {
        std::vector<dim3> order;
        order.reserve(static_cast<std::size_t>(g.x) * g.y * g.z);
        for (unsigned int z = 0; z < g.z; ++z)
            for (unsigned int y = 0; y < g.y; ++y)
                for (unsigned int x = 0; x < g.x; ++x) order.push_back(dim3{x, y, z});
        if (config().shuffle) shuffle(order, rng);
        const unsigned int workers =
            static_cast<unsigned int>(std::min<std::size_t>(config().workers, order.size()));
        std::atomic<std::size_t> next{0};
        std::atomic<bool> stop{false};
        std::mutex em;
        std::string first_error;
        // Each worker keeps one Block (fibers, stacks) and pulls blocks until the grid is done.
        auto work = [&](unsigned int worker) {
            auto b = std::make_unique<Block>();
            for (;;) {
                if (stop.load()) return;
                const std::size_t i = next.fetch_add(1);
                if (i >= order.size()) return;
                setup(*b, order[i].x, order[i].y, order[i].z, worker);
                if (!run_block(b.get())) {
                    std::lock_guard<std::mutex> lk(em);
                    if (first_error.empty()) first_error = b->error;
                    stop.store(true);
                    return;
                }
            }
        };
        if (workers <= 1) {
            work(0);
        } else {
            std::vector<std::thread> threads;
            for (unsigned int w = 0; w < workers; ++w) threads.emplace_back(work, w);
            for (auto& t : threads) t.join();
        }
        g_run = nullptr;
        acquire_done();
        if (!first_error.empty()) return set_err(std::string(name) + ": " + first_error);
        return 0;
    }
    std::vector<dim3> order;
    for (unsigned int z = 0; z < g.z; ++z)
        for (unsigned int y = 0; y < g.y; ++y)
            for (unsigned int x0 = 0; x0 < g.x; x0 += cluster) order.push_back(dim3{x0, y, z});
    if (config().shuffle) shuffle(order, rng);
    for (const dim3& o : order) {
        Cluster c;
        c.size = cluster;
        std::vector<std::unique_ptr<Block>> blocks;
        for (unsigned int r = 0; r < cluster; ++r) {
            blocks.push_back(std::make_unique<Block>());
            setup(*blocks.back(), o.x + r, o.y, o.z, r);
            blocks.back()->cluster = &c;
            blocks.back()->rank = r;
            c.blocks.push_back(blocks.back().get());
        }
        std::vector<std::thread> threads;
        for (unsigned int r = 0; r < cluster; ++r)
            threads.emplace_back([&, r] {
                if (!run_block(blocks[r].get())) break_cluster(&c);
            });
        for (auto& t : threads) t.join();
        acquire_done();
        for (auto& b : blocks)
            if (!b->error.empty()) return set_err(std::string(name) + ": " + b->error);
    }
    return 0;
}
