// The CUDA simulator's runtime: runs a kernel's blocks one after another on the calling OS
// thread, each block's threads as fibers, with CUDA's execution semantics for what
// fastreg's kernels use.
//
// Lockstep: every runnable thread of the block runs until it reaches a warp collective
// (__ballot_sync, __shfl_*_sync, __any/__all_sync, __syncwarp) or __syncthreads, or
// returns; then the collectives whose participants have all arrived complete (a
// collective's participants are the lanes of its mask), and the barrier completes once
// every thread that has not returned waits at it. A launch fails with a clear error, and
// no further block runs, when
//   - a collective can never complete: a lane of its mask has returned, waits at
//     __syncthreads, or waits in another collective (lanes of one warp in different
//     collectives), or its mask leaves out the calling lane;
//   - a thread faults (a misaligned vector access, see check_aligned).
// Nothing is concurrent, so the schedule is deterministic: the same launch with the same
// configuration gives the same result, whatever the machine.
//
// What it cannot show: races that need the weak memory model (only the block orders that
// the configuration picks are tried), timing and occupancy, nvcc's code generation, real
// hardware faults beyond the checks above.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

namespace fastreg {
namespace sim {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The order in which a launch runs its blocks.
enum class BlockOrder { Forward, Reverse, Random };

struct Config {
  BlockOrder order = BlockOrder::Forward;
  int64_t resident_blocks = 4;  // grid_size() caps grids at this, so grid-stride loops iterate
  uint64_t seed = 0;            // of the random block order
};

// The configuration that launches use: from FASTREG_CUDASIM_ORDER (forward, reverse,
// random), FASTREG_CUDASIM_BLOCKS and FASTREG_CUDASIM_SEED at first use, then set().
Config& config();
void configure(const std::string& order, int64_t resident_blocks, uint64_t seed);

// The running thread's coordinates (the simulator's threadIdx and friends).
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();

// Runs `body` as the kernel of every thread of a (grid x block) launch.
void run_grid(int64_t grid, int block, const std::function<void()>& body);

// Statistics of the launches so far (for tests that check that grid-stride loops iterate
// and that every order ran).
struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t collectives = 0;
};
Stats& stats();

// ---- Warp collectives and the barrier: park the calling thread until they complete ----

enum class Collective { Ballot, Any, All, Shfl, ShflUp, ShflDown, ShflXor, SyncWarp };

// The collective's result for this lane: a ballot's bits, or the value it reads.
uint64_t collective(Collective kind, unsigned mask, uint64_t value, int arg, int width);
void syncthreads();

// Ends the launch with `what` (a fault a GPU would raise) from inside a kernel.
[[noreturn]] void fault(const std::string& what);

inline void check_aligned(const void* ptr, std::size_t alignment, const char* access) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % alignment != 0) {
    fault(std::string("misaligned ") + std::to_string(alignment) + "-byte vector " + access +
          " at address " + std::to_string(reinterpret_cast<std::uintptr_t>(ptr)) +
          " (a GPU raises 'misaligned address' and the CUDA context is lost)");
  }
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace sim
}  // namespace fastreg
