// Compiles fastreg's CUDA sources (csrc/cuda/*.cu and the device code they include) with a
// host compiler for the CUDA simulator. Included first in every simulated translation unit
// (see fastreg/_cudasim.py):
//  1. torch's headers and the standard ones, which must see a host compiler;
//  2. then __CUDA_ARCH__, so that the kernels' device branches are what runs (intrinsics such
//     as __fmul_rn, the CUDA-only code paths), and the CUDA keywords defined away;
//  3. the built-ins (threadIdx, ...) and intrinsics, on the simulator's runtime.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "sim/cuda_shim.h is for host compilers: it simulates CUDA"
#endif
#if !defined(FASTREG_CUDA_SIM)
#error "compile the simulated CUDA sources with -DFASTREG_CUDA_SIM"
#endif

// 1. Everything the CUDA sources include from torch and the standard library.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "sim/runtime.h"

// 2. The device branches, and the keywords.
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function's static storage is its block's shared memory.
#define __shared__ static

// 3. Built-ins and intrinsics.
#define threadIdx (::fastreg::sim::thread_idx())
#define blockIdx (::fastreg::sim::block_idx())
#define blockDim (::fastreg::sim::block_dim())
#define gridDim (::fastreg::sim::grid_dim())
#define warpSize 32

// Arithmetic rounded as written (the simulated sources are compiled with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

inline void __syncthreads() { ::fastreg::sim::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fastreg::sim::collective(::fastreg::sim::Collective::SyncWarp, mask, 0, 0, 32);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(
      ::fastreg::sim::collective(::fastreg::sim::Collective::Ballot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      ::fastreg::sim::collective(::fastreg::sim::Collective::Any, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      ::fastreg::sim::collective(::fastreg::sim::Collective::All, mask, predicate != 0, 0, 32));
}

#define FASTREG_SIM_SHUFFLE(name, kind)                                                       \
  template <typename T>                                                                       \
  T name(unsigned mask, T value, int arg, int width = 32) {                                   \
    return ::fastreg::sim::from_bits<T>(::fastreg::sim::collective(                           \
        ::fastreg::sim::Collective::kind, mask, ::fastreg::sim::to_bits(value), arg, width)); \
  }
FASTREG_SIM_SHUFFLE(__shfl_sync, Shfl)
FASTREG_SIM_SHUFFLE(__shfl_up_sync, ShflUp)
FASTREG_SIM_SHUFFLE(__shfl_down_sync, ShflDown)
FASTREG_SIM_SHUFFLE(__shfl_xor_sync, ShflXor)
#undef FASTREG_SIM_SHUFFLE

// Atomics: threads switch only at collectives and barriers, so a read-modify-write is
// atomic as written.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
