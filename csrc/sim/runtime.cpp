// The CUDA simulator's scheduler: see runtime.h for the semantics.
//
// Fibers: thread i of every block runs on fiber i, which has its own stack (mmap'ed, with a
// guard page), starts once through makecontext/setcontext and then loops: run the kernel
// for the current block, park as returned, run it again for the next block. Threads and
// the scheduler switch with _setjmp/_longjmp, which unlike swapcontext make no system call
// (a block of 256 threads switches twice per thread for every warp collective). Under
// AddressSanitizer every switch is announced with __sanitizer_start/finish_switch_fiber,
// so that it knows which stack is in use. A failed launch abandons its fibers' stacks;
// they start afresh at the next launch.
// _longjmp between stacks must not be the fortified __longjmp_chk, which refuses to jump
// to a frame it does not find below the current one on the same stack.
#undef _FORTIFY_SOURCE
#include "sim/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <csetjmp>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTREG_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTREG_SIM_ASAN 1
#endif
#endif

#if defined(FASTREG_SIM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace fastreg {
namespace sim {
namespace {

#if defined(FASTREG_SIM_ASAN)
constexpr std::size_t kStackBytes = 512 * 1024;  // instrumented frames are larger
#else
constexpr std::size_t kStackBytes = 128 * 1024;
#endif

enum class State { Runnable, InCollective, AtBarrier, Done };

struct Thread {
  std::jmp_buf jmp;
  ucontext_t start;
  bool started = false;
  State state = State::Runnable;
  Dim3 idx;
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
  // The collective it waits in, and its result.
  Collective kind = Collective::SyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
};

// A stack with a PROT_NONE guard page below it: an overflow faults instead of
// overwriting the next thread's stack.
class Stack {
 public:
  Stack() {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kStackBytes + page;
    base_ = static_cast<char*>(
        mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) throw std::runtime_error("cudasim: cannot map a fiber stack");
    mprotect(base_, page, PROT_NONE);
    bottom_ = base_ + page;
  }
  ~Stack() { munmap(base_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return bottom_; }

 private:
  char* base_;
  char* bottom_;
  std::size_t bytes_;
};

const char* name_of(Collective kind) {
  switch (kind) {
    case Collective::Ballot:
      return "__ballot_sync";
    case Collective::Any:
      return "__any_sync";
    case Collective::All:
      return "__all_sync";
    case Collective::Shfl:
      return "__shfl_sync";
    case Collective::ShflUp:
      return "__shfl_up_sync";
    case Collective::ShflDown:
      return "__shfl_down_sync";
    case Collective::ShflXor:
      return "__shfl_xor_sync";
    case Collective::SyncWarp:
      return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

// The launch running on this OS thread. Launches are serialised by a mutex: the
// simulated kernels keep __shared__ arrays in static storage, one block at a time.
struct Launch {
  const std::function<void()>* body = nullptr;
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<Thread>& threads;  // the fibers' threads; the first block_dim of them run
  int current = -1;
  std::jmp_buf scheduler;
  std::string fault;
  void* scheduler_fake_stack = nullptr;
};

// The scheduler's stack (the calling OS thread's), as AddressSanitizer reports it.
const void* scheduler_stack_bottom = nullptr;
std::size_t scheduler_stack_size = 0;

Launch* active = nullptr;

// The fibers: a stack and a thread for each thread index used so far.
std::vector<std::unique_ptr<Stack>>& stacks() {
  static std::vector<std::unique_ptr<Stack>> all;
  return all;
}
std::vector<Thread>& fiber_threads() {
  static std::vector<Thread> all(1024);  // never reallocated: a started context stays put
  return all;
}

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("cudasim: " + what); }

// ---- Switching (AddressSanitizer is told of every stack change) ----

inline void start_switch(void** save, const void* bottom, std::size_t size) {
#if defined(FASTREG_SIM_ASAN)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

inline void finish_switch(void* saved, const void** old_bottom, std::size_t* old_size) {
#if defined(FASTREG_SIM_ASAN)
  __sanitizer_finish_switch_fiber(saved, old_bottom, old_size);
#else
  (void)saved, (void)old_bottom, (void)old_size;
#endif
}

// From the running thread back to the scheduler; returns when the scheduler resumes it.
void yield_to_scheduler() {
  Launch& l = *active;
  Thread& t = l.threads[l.current];
  if (_setjmp(t.jmp) == 0) {
    start_switch(&t.fake_stack, scheduler_stack_bottom, scheduler_stack_size);
    _longjmp(l.scheduler, 1);
  }
  finish_switch(t.fake_stack, nullptr, nullptr);
}

// A fiber's life: the kernel of one block after another (of whichever launch is active
// when it is resumed).
void fiber_main() {
  finish_switch(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
  for (;;) {
    (*active->body)();
    active->threads[active->current].state = State::Done;
    yield_to_scheduler();
  }
}

// Runs thread i until it parks or returns.
void resume(Launch& l, int i) {
  Thread& t = l.threads[i];
  l.current = i;
  if (_setjmp(l.scheduler) == 0) {
    start_switch(&l.scheduler_fake_stack, stacks()[i]->bottom(), kStackBytes);
    if (!t.started) {
      t.started = true;
      setcontext(&t.start);
    }
    _longjmp(t.jmp, 1);
  }
  finish_switch(l.scheduler_fake_stack, nullptr, nullptr);
  l.current = -1;
}

std::string where(const Launch& l, int warp) {
  return "block " + std::to_string(l.block_idx.x) + ", warp " + std::to_string(warp);
}

// The lane a shuffle reads, or -1 for its own value.
int shuffle_source(const Thread& t, int lane) {
  const int w = t.width;
  const int segment = lane & ~(w - 1);
  switch (t.kind) {
    case Collective::Shfl:
      return segment + (t.arg & (w - 1));
    case Collective::ShflUp:
      return (lane - segment) >= t.arg ? lane - t.arg : -1;
    case Collective::ShflDown:
      return (lane - segment) + t.arg < w ? lane + t.arg : -1;
    case Collective::ShflXor: {
      const int src = lane ^ t.arg;
      return (src & ~(w - 1)) > segment ? -1 : src;
    }
    default:
      return -1;
  }
}

// Completes every warp collective whose lanes have all arrived; fails on one that never
// can. Returns whether any completed.
bool complete_collectives(Launch& l) {
  bool progressed = false;
  const int n = static_cast<int>(l.block_dim.x);
  for (int base = 0; base < n; base += 32) {
    const int warp = base / 32;
    const int lanes = std::min(32, n - base);
    for (int lane = 0; lane < lanes; ++lane) {
      const Thread& t = l.threads[base + lane];
      if (t.state == State::InCollective && ((t.mask >> lane) & 1u) == 0) {
        fail(where(l, warp) + ": lane " + std::to_string(lane) + " calls " + name_of(t.kind) +
             "(mask " + hex(t.mask) + ") with a mask that leaves itself out");
      }
    }
    for (int lane = 0; lane < lanes; ++lane) {
      const Thread& t = l.threads[base + lane];
      if (t.state != State::InCollective) continue;
      // (the message is only made for an error: this loop runs at every collective)
      const auto call = [&t] {
        return std::string(name_of(t.kind)) + "(mask " + hex(t.mask) + ")";
      };
      for (int m = 0; m < 32; ++m) {
        if (((t.mask >> m) & 1u) == 0) continue;
        if (m >= lanes) {
          fail(where(l, warp) + ": " + call() + " names lane " + std::to_string(m) +
               ", which this block of " + std::to_string(n) + " threads does not have");
        }
        const Thread& o = l.threads[base + m];
        const auto other = [m] { return "lane " + std::to_string(m); };
        if (o.state == State::Done) {
          fail(where(l, warp) + ": lane " + std::to_string(lane) + " waits in " + call() + " but " +
               other() +
               " of its mask has returned (the mask does not match the "
               "lanes that reach the collective)");
        }
        if (o.state == State::AtBarrier) {
          fail("deadlock in " + where(l, warp) + ": lane " + std::to_string(lane) + " waits in " +
               call() + " while " + other() + " waits at __syncthreads");
        }
        if (o.kind != t.kind || o.mask != t.mask) {
          fail(where(l, warp) + ": lanes of one warp in different collectives: lane " +
               std::to_string(lane) + " in " + call() + ", " + other() + " in " + name_of(o.kind) +
               "(mask " + hex(o.mask) + ")");
        }
      }
      // Every lane of the mask is here: compute each one's result.
      uint64_t ballot = 0;
      for (int m = 0; m < 32; ++m) {
        if ((t.mask >> m) & 1u) ballot |= uint64_t(l.threads[base + m].value != 0) << m;
      }
      for (int m = 0; m < 32; ++m) {
        if (((t.mask >> m) & 1u) == 0) continue;
        Thread& o = l.threads[base + m];
        switch (o.kind) {
          case Collective::Ballot:
            o.result = ballot;
            break;
          case Collective::Any:
            o.result = ballot != 0;
            break;
          case Collective::All:
            o.result = ballot == t.mask;
            break;
          case Collective::SyncWarp:
            o.result = 0;
            break;
          default: {
            const int src = shuffle_source(o, m);
            if (src < 0 || src == m) {
              o.result = o.value;
            } else if (src >= lanes || ((t.mask >> src) & 1u) == 0) {
              fail(where(l, warp) + ": lane " + std::to_string(m) + " in " + call() +
                   " reads lane " + std::to_string(src) + ", which is not in the mask");
            } else {
              o.result = l.threads[base + src].value;
            }
          }
        }
      }
      for (int m = 0; m < 32; ++m) {
        if ((t.mask >> m) & 1u) l.threads[base + m].state = State::Runnable;
      }
      ++stats().collectives;
      progressed = true;
    }
  }
  return progressed;
}

// Releases __syncthreads once every thread that has not returned waits at it.
bool complete_barrier(Launch& l) {
  const int n = static_cast<int>(l.block_dim.x);
  bool any = false;
  for (int i = 0; i < n; ++i) {
    const State s = l.threads[i].state;
    if (s == State::AtBarrier) any = true;
    if (s == State::InCollective || s == State::Runnable) return false;
  }
  if (!any) return false;
  for (int i = 0; i < n; ++i) {
    if (l.threads[i].state == State::AtBarrier) l.threads[i].state = State::Runnable;
  }
  return true;
}

void run_block(Launch& l) {
  const int n = static_cast<int>(l.block_dim.x);
  for (int i = 0; i < n; ++i) {
    Thread& t = l.threads[i];
    t.state = State::Runnable;
    t.idx.x = static_cast<unsigned>(i) % l.block_dim.x;
    t.idx.y = static_cast<unsigned>(i) / l.block_dim.x % l.block_dim.y;
    t.idx.z = static_cast<unsigned>(i) / (l.block_dim.x * l.block_dim.y);
    if (!t.started) {
#if defined(FASTREG_SIM_ASAN)
      // A fiber abandoned by a failed launch left its frames' redzones poisoned.
      __asan_unpoison_memory_region(stacks()[i]->bottom(), kStackBytes);
#endif
      getcontext(&t.start);
      t.start.uc_stack.ss_sp = stacks()[i]->bottom();
      t.start.uc_stack.ss_size = kStackBytes;
      t.start.uc_link = nullptr;
      makecontext(&t.start, fiber_main, 0);
    }
  }
  for (;;) {
    bool all_done = true;
    for (int i = 0; i < n; ++i) {
      if (l.threads[i].state == State::Runnable) resume(l, i);
      if (!l.fault.empty())
        fail("block " + std::to_string(l.block_idx.x) + ", thread " + std::to_string(i) + ": " +
             l.fault);
      all_done = all_done && l.threads[i].state == State::Done;
    }
    if (all_done) return;
    if (complete_collectives(l) || complete_barrier(l)) continue;
    std::string states;
    for (int i = 0; i < n; ++i) {
      const Thread& t = l.threads[i];
      if (t.state == State::AtBarrier) states += " " + std::to_string(i) + ":__syncthreads";
      if (t.state == State::InCollective) states += " " + std::to_string(i) + ":" + name_of(t.kind);
    }
    fail("deadlock in block " + std::to_string(l.block_idx.x) +
         ": no thread can go on (waiting:" + states.substr(0, 400) + ")");
  }
}

Thread& current_thread() {
  if (active == nullptr || active->current < 0)
    fail("a device function was called outside a launch");
  return active->threads[active->current];
}

BlockOrder parse_order(const std::string& order) {
  if (order == "forward") return BlockOrder::Forward;
  if (order == "reverse") return BlockOrder::Reverse;
  if (order == "random") return BlockOrder::Random;
  throw std::invalid_argument(
      "cudasim: the block order must be 'forward', 'reverse' or 'random', "
      "but got '" +
      order + "'");
}

}  // namespace

Config& config() {
  static Config c = [] {
    Config from_env;
    if (const char* order = std::getenv("FASTREG_CUDASIM_ORDER"))
      from_env.order = parse_order(order);
    if (const char* blocks = std::getenv("FASTREG_CUDASIM_BLOCKS")) {
      from_env.resident_blocks = std::max<int64_t>(1, std::atoll(blocks));
    }
    if (const char* seed = std::getenv("FASTREG_CUDASIM_SEED"))
      from_env.seed = std::strtoull(seed, nullptr, 10);
    return from_env;
  }();
  return c;
}

void configure(const std::string& order, int64_t resident_blocks, uint64_t seed) {
  if (resident_blocks < 1) {
    throw std::invalid_argument("cudasim: resident_blocks must be at least 1, but got " +
                                std::to_string(resident_blocks));
  }
  Config& c = config();
  c.order = parse_order(order);
  c.resident_blocks = resident_blocks;
  c.seed = seed;
}

Stats& stats() {
  static Stats s;
  return s;
}

const Dim3& thread_idx() { return current_thread().idx; }
const Dim3& block_idx() { return active->block_idx; }
const Dim3& block_dim() { return active->block_dim; }
const Dim3& grid_dim() { return active->grid_dim; }

uint64_t collective(Collective kind, unsigned mask, uint64_t value, int arg, int width) {
  Thread& t = current_thread();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fault(std::string(name_of(kind)) + " with width " + std::to_string(width) +
          ", which is not a power of 2 up to 32");
  }
  t.state = State::InCollective;
  t.kind = kind;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  yield_to_scheduler();
  return t.result;
}

void syncthreads() {
  current_thread().state = State::AtBarrier;
  yield_to_scheduler();
}

void fault(const std::string& what) {
  current_thread();  // fails outside a launch
  active->fault = what;
  active->threads[active->current].state = State::Done;
  yield_to_scheduler();  // the launch fails: never resumed
  std::abort();
}

void run_grid(int64_t grid, int block, const std::function<void()>& body) {
  static std::mutex one_launch_at_a_time;
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  if (grid < 1 || grid > 0x7fffffff) fail("grid of " + std::to_string(grid) + " blocks");
  if (block < 1 || block > 1024) fail("block of " + std::to_string(block) + " threads");
  while (static_cast<int>(stacks().size()) < block) stacks().push_back(std::make_unique<Stack>());

  Launch l{&body, {}, {}, {}, fiber_threads()};
  l.block_dim.x = static_cast<unsigned>(block);
  l.grid_dim.x = static_cast<unsigned>(grid);
  std::vector<int64_t> order(grid);
  std::iota(order.begin(), order.end(), int64_t{0});
  const Config& c = config();
  Stats& s = stats();
  if (c.order == BlockOrder::Reverse) std::reverse(order.begin(), order.end());
  if (c.order == BlockOrder::Random) {
    std::mt19937_64 rng(c.seed + static_cast<uint64_t>(s.launches));
    std::shuffle(order.begin(), order.end(), rng);
  }
  ++s.launches;
  active = &l;
  try {
    for (const int64_t b : order) {
      l.block_idx.x = static_cast<unsigned>(b);
      run_block(l);
      ++s.blocks;
    }
  } catch (...) {
    // The fibers stopped inside the kernel: they start afresh at the next launch.
    for (Thread& t : fiber_threads()) t.started = false;
    active = nullptr;
    throw;
  }
  active = nullptr;
}

}  // namespace sim
}  // namespace fastreg
