// What every piece of device code shares: the host/device qualifier and the launch
// geometry. Compiled by nvcc, by g++ for the CPU kernels, and by the CUDA simulator
// (csrc/sim), which defines the CUDA keywords away.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(FASTREG_CUDA_SIM)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline __attribute__((always_inline))
#endif

namespace fastreg {

constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kThreadsPerBlock = 256;  // every fastreg kernel's block size

}  // namespace fastreg
