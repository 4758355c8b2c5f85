// What every piece of device code shares: the host/device qualifier, the launch geometry
// and vector memory accesses. Compiled by nvcc, by g++ for the CPU kernels, and by the
// CUDA simulator (csrc/sim), which defines the CUDA keywords away.
#pragma once

#include <cstdint>

#if defined(FASTREG_CUDA_SIM)
#include "sim/runtime.h"
#endif

#if defined(__CUDACC__)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline __attribute__((always_inline))
#endif

namespace fastreg {

constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kThreadsPerBlock = 256;  // every fastreg kernel's block size
// Every kernel's __launch_bounds__ asks that 4 blocks fit on an SM: at most 64 registers
// per thread, so that 1024 threads' 16-byte loads are in flight. Without the bound, ptxas
// kept a few loop-invariant values in local memory (LDL/STL) in about 25 kernels while
// using 32-48 registers; with it none does (tools/sass_report.py checks both).
constexpr int kMinBlocksPerSm = 4;
// Elements per warp work item of the dropout kernels: 32 mask words of 32 bits, so that
// lane t of the warp owns word t.
constexpr int64_t kDropoutChunk = 32 * 32;
// Elements per block work item of the penalty kernels.
constexpr int64_t kPenaltyChunk = 65536;

// One vector access of sizeof(V) bytes (128-bit loads and stores on the GPU for a 16-byte
// V). The caller has checked that p is aligned to alignof(V): a GPU faults on a misaligned
// vector access, and the simulator checks it.
template <typename V>
FASTREG_HD V load_vector(const void* p) {
#if defined(FASTREG_CUDA_SIM)
  sim::check_aligned(p, alignof(V), "load");
#endif
  return *reinterpret_cast<const V*>(p);
}

template <typename V>
FASTREG_HD void store_vector(void* p, const V& v) {
#if defined(FASTREG_CUDA_SIM)
  sim::check_aligned(p, alignof(V), "store");
#endif
  *reinterpret_cast<V*>(p) = v;
}

}  // namespace fastreg
