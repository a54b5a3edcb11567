// The CPU side of cuda_emu.h: fibers, barriers, clusters, the kernel registry and the launch
// entry point the Rust crate calls. Built by build.rs together with every kernels/*.cu.
#include <setjmp.h>
#include <ucontext.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

namespace senet_emu {

thread_local ThreadState* g_thread = nullptr;
thread_local BlockState* g_block_state = nullptr;

namespace {

constexpr std::size_t kStack = 32 * 1024;
constexpr std::size_t kMaxThreads = 1024;

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

enum class St { Run, Block, Warp, Cluster, Done };

struct Cluster;

// A fiber starts on its own stack through ucontext once; after that, switches go through
// _setjmp/_longjmp, which unlike swapcontext save no signal mask (no system call per switch).
struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    bool started = false;
    ThreadState ts;
    St st = St::Run;
};

struct Block {
    ~Block() { give_stacks(std::move(stacks)); }
    BlockState bs;
    std::vector<Fiber> fibers;
    std::unique_ptr<char[]> stacks;
    jmp_buf sched;
    Fiber* cur = nullptr;
    std::vector<unsigned char> dsmem;
    std::vector<uint64_t> slots;  // one per thread, for shuffles
    std::vector<int> partner;     // the lane each thread reads in the current shuffle
    Cluster* cluster = nullptr;
    unsigned int rank = 0;
    std::string error;
    void* fn = nullptr;
    Thunk thunk = nullptr;
    void** args = nullptr;
};

struct Cluster {
    unsigned int size = 1;
    std::vector<Block*> blocks;
    std::mutex m;
    std::condition_variable cv;
    unsigned int arrived = 0;
    unsigned long generation = 0;
    bool broken = false;
};

thread_local Block* g_run = nullptr;

std::map<std::string, std::pair<void*, Thunk>>& registry() {
    static std::map<std::string, std::pair<void*, Thunk>> r;
    return r;
}

void park(St s) {
    Block* b = g_run;
    b->cur->st = s;
    if (_setjmp(b->cur->jb) == 0) _longjmp(b->sched, 1);
}

void fiber_entry() {
    Block* b = g_run;
    b->thunk(b->fn, b->args);
    b->cur->st = St::Done;
    _longjmp(b->sched, 1);
}

// Runs fiber f until it parks or finishes.
void resume(Block* b, Fiber& f) {
    b->cur = &f;
    g_thread = &f.ts;
    if (_setjmp(b->sched) == 0) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.uc);
        }
        _longjmp(f.jb, 1);
    }
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

// Runs every thread of one block to completion. Returns false with b->error set on a barrier
// that can never be released (divergent __syncthreads / shuffle / cluster.sync).
bool run_block(Block* b) {
    const unsigned int n = b->bs.block_dim.x * b->bs.block_dim.y * b->bs.block_dim.z;
    b->fibers.assign(n, Fiber{});
    if (!b->stacks) b->stacks = take_stacks();
    b->slots.assign(n, 0);
    b->partner.assign(n, 0);
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
    }
    const unsigned int warps = (n + 31) / 32;
    for (;;) {
        for (unsigned int i = 0; i < n; ++i) {
            Fiber& f = b->fibers[i];
            if (f.st != St::Run) continue;
            resume(b, f);
            if (!b->error.empty()) return false;
        }
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
            continue;
        }
        if (at_cluster == live && b->cluster) {
            if (!cluster_barrier(b->cluster)) {
                b->error = "cluster.sync: not every block of the cluster arrived (divergent barrier or a failed block)";
                return false;
            }
            for (auto& f : b->fibers) if (f.st == St::Cluster) f.st = St::Run;
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

}  // namespace

unsigned char* dynamic_smem() { return g_run->dsmem.data(); }

void syncthreads() { park(St::Block); }

void warp_exchange(uint64_t value, uint64_t* out, int lane_xor) {
    Block* b = g_run;
    const unsigned int me = b->cur->ts.linear;
    b->slots[me] = value;
    park(St::Warp);  // everyone in the warp has written
    const unsigned int src = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned int>(lane_xor & 31));
    *out = src < b->slots.size() ? b->slots[src] : value;
    park(St::Warp);  // everyone has read before the slots are reused
}

void cluster_sync() {
    if (!g_run->cluster) fail("cluster.sync() in a kernel launched without a cluster");
    park(St::Cluster);
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

void fail(const char* msg) {
    Block* b = g_run;
    b->error = msg;
    _longjmp(b->sched, 1);  // the fiber is never resumed
}

void register_kernel(const char* name, void* fn, Thunk thunk) { registry()[name] = {fn, thunk}; }

}  // namespace senet_emu

using namespace senet_emu;

// Runs kernel `name` to completion. Returns 0, or 1 with a message in err.
extern "C" int senet_emu_launch(const char* name, const unsigned int* grid, const unsigned int* block,
                                unsigned int smem, unsigned int cluster, void** args, char* err, std::size_t errlen) {
    auto set_err = [&](const std::string& m) {
        std::snprintf(err, errlen, "%s", m.c_str());
        return 1;
    };
    auto it = registry().find(name);
    if (it == registry().end()) return set_err(std::string("no emulated kernel named ") + name);
    const dim3 g{grid[0], grid[1], grid[2]}, bd{block[0], block[1], block[2]};
    if (bd.x * bd.y * bd.z == 0 || bd.x * bd.y * bd.z > 1024) return set_err("block size must be 1..1024 threads");
    if (g.x == 0 || g.y == 0 || g.z == 0) return set_err("empty grid");
    if (cluster == 0) cluster = 1;
    if (g.x % cluster != 0) return set_err("grid.x is not a multiple of the cluster size");
    auto setup = [&](Block& b, unsigned int x, unsigned int y, unsigned int z) {
        b.bs.block_idx = dim3{x, y, z};
        b.bs.block_dim = bd;
        b.bs.grid_dim = g;
        b.dsmem.assign(smem, 0xA5);  // shared memory starts as garbage, as on a GPU
        b.fn = it->second.first;
        b.thunk = it->second.second;
        b.args = args;
        b.error.clear();
    };
    if (cluster == 1) {
        auto b = std::make_unique<Block>();
        for (unsigned int z = 0; z < g.z; ++z)
            for (unsigned int y = 0; y < g.y; ++y)
                for (unsigned int x = 0; x < g.x; ++x) {
                    setup(*b, x, y, z);
                    if (!run_block(b.get())) return set_err(std::string(name) + ": " + b->error);
                }
        return 0;
    }
    for (unsigned int z = 0; z < g.z; ++z)
        for (unsigned int y = 0; y < g.y; ++y)
            for (unsigned int x0 = 0; x0 < g.x; x0 += cluster) {
                Cluster c;
                c.size = cluster;
                std::vector<std::unique_ptr<Block>> blocks;
                for (unsigned int r = 0; r < cluster; ++r) {
                    blocks.push_back(std::make_unique<Block>());
                    setup(*blocks.back(), x0 + r, y, z);
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
                for (auto& b : blocks)
                    if (!b->error.empty()) return set_err(std::string(name) + ": " + b->error);
            }
    return 0;
}
