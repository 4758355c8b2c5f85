// The penalty's CUDA kernels, multi-tensor in the manner of PyTorch's multi_tensor_apply.
// Device code only: the host side (tables filled from tensors, launches) is
// csrc/cuda/penalty_cuda.cu.
//
// A table of tensors (pointers, sizes, coefficients, dtypes) goes to the kernel by value,
// as its parameter; each tensor is cut into chunks of kPenaltyChunk elements, and each
// block takes whole chunks (grid-stride over the chunks of the launch), finding its tensor
// by a binary search of the table's chunk offsets. All four dtypes share one launch. The
// table stays within the 4 KB of kernel parameters that every CUDA version torch >= 2.4
// supports (CUDA 12.1 allows 32 KB, but needs driver r530+ and Volta+), so a list longer
// than kReduceSlots (or kElementwiseSlots) tensors takes several launches.
//
// The value: a block sums its chunk (per-thread sums in the op-math type, a fixed tree
// over the block), combines the two sums with the tensor's coefficients in double and
// writes the chunk's own slot; a one-block kernel then adds the slots in a fixed order.
// No atomics: the same bits every run.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>

#include "device/common.h"
#include "device/penalty_math.h"

namespace fastreg {
namespace device {

constexpr int kUnroll = 4;  // loads in flight per thread in the reduction
constexpr std::size_t kParamBytes = 4096;

enum DTypeCode : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// ---- Tables ----

constexpr int kReduceSlots = 96;

struct ReduceTable {
  const void* data[kReduceSlots];
  int64_t numel[kReduceSlots];
  double l1[kReduceSlots];
  double l2[kReduceSlots];
  int64_t chunk_begin[kReduceSlots + 1];  // first chunk of tensor t; [n]: all chunks
  uint8_t dtype[kReduceSlots];
  int n;
};
static_assert(sizeof(ReduceTable) + sizeof(double*) <= kParamBytes,
              "the reduction table must fit the 4 KB of kernel parameters");

constexpr int kElementwiseSlots = 80;

struct ElementwiseTable {
  const void* in[kElementwiseSlots];
  void* out[kElementwiseSlots];
  int64_t numel[kElementwiseSlots];
  double a[kElementwiseSlots];  // (l1, 2 * l2) or (threshold, 0)
  double b[kElementwiseSlots];
  int64_t chunk_begin[kElementwiseSlots + 1];
  uint8_t dtype[kElementwiseSlots];
  int n;
};
static_assert(sizeof(ElementwiseTable) + sizeof(void*) + sizeof(bool) <= kParamBytes,
              "the elementwise table must fit the 4 KB of kernel parameters");

// The tensor whose chunks hold chunk c: the last t with chunk_begin[t] <= c (the same
// for every thread of the block).
template <typename Table>
__device__ __forceinline__ int tensor_of_chunk(const Table& table, int64_t c) {
  int lo = 0, hi = table.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.chunk_begin[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Where chunk c lies: its tensor t and elements first .. first+count-1 of it.
struct ChunkSpan {
  int t;
  int64_t first, count;
};

template <typename Table>
__device__ __forceinline__ ChunkSpan chunk_span(const Table& table, int64_t c) {
  const int t = tensor_of_chunk(table, c);
  const int64_t first = (c - table.chunk_begin[t]) * kPenaltyChunk;
  const int64_t left = table.numel[t] - first;
  return {t, first, left < kPenaltyChunk ? left : kPenaltyChunk};
}

// Calls f(scalar_t{}) with the C++ type of a table's dtype code: the same branch for the
// whole block.
template <typename F>
__device__ __forceinline__ void visit_dtype(uint8_t code, F&& f) {
  switch (code) {
    case kF32:
      return f(float{});
    case kF16:
      return f(c10::Half{});
    case kBF16:
      return f(c10::BFloat16{});
    default:
      return f(double{});
  }
}

// ---- Reduction ----

__device__ __forceinline__ float abs_value(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_value(double v) { return fabs(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(kFullWarp, v, offset);
  }
  return v;
}

// The block's sum of v, in thread 0, by a fixed tree. Every thread must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreadsPerBlock / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreadsPerBlock / kWarp ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // warp_sums is written again by the next call
  return v;
}

// The share l1 * sum|x| + l2 * sum x**2 of `count` elements from `first` (thread 0's
// return value). Each thread visits its elements in a fixed order.
template <typename scalar_t>
__device__ double chunk_value(const void* data, int64_t first, int64_t count, double l1,
                              double l2) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(data) + first;
  acc_t s1 = 0, s2 = 0;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreadsPerBlock < count; i += kUnroll * kThreadsPerBlock) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = static_cast<acc_t>(x[i + u * kThreadsPerBlock]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      s1 += abs_value(v[u]);
      s2 += v[u] * v[u];
    }
  }
  for (; i < count; i += kThreadsPerBlock) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s1 += abs_value(v);
    s2 += v * v;
  }
  s1 = block_sum(s1);
  s2 = block_sum(s2);
  double value = 0.0;
  if (l1 != 0.0) value += l1 * static_cast<double>(s1);
  if (l2 != 0.0) value += l2 * static_cast<double>(s2);
  return value;
}

__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    penalty_reduce_kernel(ReduceTable table, double* partials) {
  const int64_t chunks = table.chunk_begin[table.n];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkSpan s = chunk_span(table, c);
    double value = 0.0;
    visit_dtype(table.dtype[s.t], [&](auto tag) {
      value = chunk_value<decltype(tag)>(table.data[s.t], s.first, s.count, table.l1[s.t],
                                         table.l2[s.t]);
    });
    if (threadIdx.x == 0) partials[c] = value;
  }
}

// One block: the partials in a fixed order (per-thread strided sums, then the tree).
template <typename out_t>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    penalty_final_kernel(const double* partials, int64_t n, out_t* out) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreadsPerBlock) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = static_cast<out_t>(sum);
}

// ---- Elementwise ops ----

template <typename scalar_t, ElementwiseMode kMode>
__device__ void elementwise_chunk(const void* in_data, void* out_data, int64_t first, int64_t count,
                                  double a, double b, double g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = static_cast<const scalar_t*>(in_data) + first;
  scalar_t* out = static_cast<scalar_t*>(out_data) + first;  // may be `in`
  const acc_t ca = static_cast<acc_t>(a);
  const acc_t cb = static_cast<acc_t>(b);
  const acc_t g_op = static_cast<acc_t>(g);
  const bool use_l1 = a != 0.0;
  const bool use_l2 = b != 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreadsPerBlock) {
    const acc_t w = static_cast<acc_t>(in[i]);
    if constexpr (kMode == ElementwiseMode::Grad) {
      out[i] = (use_l1 || use_l2)
                   ? static_cast<scalar_t>(mul_rn(g_op, penalty_slope(w, ca, cb, use_l1, use_l2)))
                   : static_cast<scalar_t>(0);
    } else if constexpr (kMode == ElementwiseMode::AddGrad) {
      out[i] = static_cast<scalar_t>(
          add_rn(static_cast<acc_t>(out[i]), penalty_slope(w, ca, cb, use_l1, use_l2)));
    } else {
      out[i] = static_cast<scalar_t>(soft_threshold(w, ca));
    }
  }
}

// grad_out (Grad mode only) is the penalty's 0-dim incoming gradient, float32 or float64.
template <ElementwiseMode kMode>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    penalty_elementwise_kernel(ElementwiseTable table, const void* grad_out, bool grad_out_double) {
  double g = 1.0;
  if constexpr (kMode == ElementwiseMode::Grad) {
    g = grad_out_double ? *static_cast<const double*>(grad_out)
                        : static_cast<double>(*static_cast<const float*>(grad_out));
  }
  const int64_t chunks = table.chunk_begin[table.n];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkSpan s = chunk_span(table, c);
    visit_dtype(table.dtype[s.t], [&](auto tag) {
      elementwise_chunk<decltype(tag), kMode>(table.in[s.t], table.out[s.t], s.first, s.count,
                                              table.a[s.t], table.b[s.t], g);
    });
  }
}

}  // namespace device
}  // namespace fastreg
