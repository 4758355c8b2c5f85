// CUDA penalty kernels, multi-tensor in the manner of PyTorch's multi_tensor_apply.
//
// A table of tensors (pointers, sizes, coefficients, dtypes) goes to the kernel by
// value, as its parameter; each tensor is cut into chunks of kChunk elements, and each
// block takes whole chunks (grid-stride over the chunks of the launch), finding its
// tensor by a binary search of the table's chunk offsets. All four dtypes share one
// launch. The table stays within the 4 KB of kernel parameters that every CUDA version
// torch >= 2.4 supports (CUDA 12.1 allows 32 KB, but needs driver r530+ and Volta+), so
// a list longer than kReduceSlots (or kElementwiseSlots) tensors takes several
// launches. Nothing is copied to the device: under CUDA graph capture the tables are
// kernel parameters of the graph's nodes, and the incoming gradient is read from
// device memory, so nothing synchronises with the host.
//
// The value: a block sums its chunk (per-thread sums in the op-math type, a fixed tree
// over the block), combines the two sums with the tensor's coefficients in double and
// writes the chunk's own slot; a one-block kernel then adds the slots in a fixed order.
// No atomics: the same bits every run.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cuda/cuda_launch.h"
#include "ops/penalty.h"

namespace fastreg {
namespace {

constexpr int64_t kChunk = 65536;  // elements per block work item
constexpr int kUnroll = 4;  // loads in flight per thread in the reduction
constexpr size_t kParamBytes = 4096;

enum DTypeCode : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

uint8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    case at::kDouble:
      return kF64;
    default:
      TORCH_CHECK(false, "fastreg penalty: unsupported dtype ", t);
  }
  return kF32;  // not reached
}

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

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

__global__ void __launch_bounds__(kThreadsPerBlock)
    penalty_reduce_kernel(ReduceTable table, double* partials) {
  const int64_t chunks = table.chunk_begin[table.n];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int t = tensor_of_chunk(table, c);
    const int64_t first = (c - table.chunk_begin[t]) * kChunk;
    const int64_t left = table.numel[t] - first;
    const int64_t count = left < kChunk ? left : kChunk;
    const void* data = table.data[t];
    double value;
    switch (table.dtype[t]) {  // the same branch for the whole block
      case kF32:
        value = chunk_value<float>(data, first, count, table.l1[t], table.l2[t]);
        break;
      case kF16:
        value = chunk_value<c10::Half>(data, first, count, table.l1[t], table.l2[t]);
        break;
      case kBF16:
        value = chunk_value<c10::BFloat16>(data, first, count, table.l1[t], table.l2[t]);
        break;
      default:
        value = chunk_value<double>(data, first, count, table.l1[t], table.l2[t]);
        break;
    }
    if (threadIdx.x == 0) partials[c] = value;
  }
}

// One block: the partials in a fixed order (per-thread strided sums, then the tree).
template <typename out_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    penalty_final_kernel(const double* partials, int64_t n, out_t* out) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreadsPerBlock) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = static_cast<out_t>(sum);
}

at::Tensor penalty_cuda(at::TensorList params, c10::ArrayRef<double> l1,
                        c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  TORCH_CHECK_VALUE(!params.empty(), "params must not be empty (its device gives the result's)");
  const c10::cuda::CUDAGuard guard(params[0].device());
  // Dense sources (contiguous copies of non-dense tensors) live until the kernels ran:
  // the caching allocator reuses their memory only for later work on this stream.
  const std::vector<ReductionInput> inputs = reduction_inputs(params, l1, l2);
  const at::ScalarType result_type = penalty_result_type(params);
  at::Tensor out = at::empty({}, params[0].options().dtype(result_type));
  int64_t total_chunks = 0;
  for (const ReductionInput& input : inputs) total_chunks += chunks_of(input.src.numel());
  if (total_chunks == 0) return out.zero_();
  at::Tensor partials = at::empty({total_chunks}, params[0].options().dtype(at::kDouble));
  double* slots = partials.mutable_data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  ReduceTable table{};
  int64_t launch_chunks = 0;  // chunks in the table being filled
  const auto launch = [&] {
    table.chunk_begin[table.n] = launch_chunks;
    penalty_reduce_kernel<<<grid_size(launch_chunks), kThreadsPerBlock, 0, stream>>>(table,
                                                                                     slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    slots += launch_chunks;
    launch_chunks = 0;
    table.n = 0;
  };
  for (const ReductionInput& input : inputs) {
    if (table.n == kReduceSlots) launch();
    const int t = table.n++;
    table.data[t] = input.src.const_data_ptr();
    table.numel[t] = input.src.numel();
    table.l1[t] = input.l1;
    table.l2[t] = input.l2;
    table.dtype[t] = dtype_code(input.src.scalar_type());
    table.chunk_begin[t] = launch_chunks;
    launch_chunks += chunks_of(input.src.numel());
  }
  if (table.n > 0) launch();

  const double* all = partials.const_data_ptr<double>();
  if (result_type == at::kDouble) {
    penalty_final_kernel<double><<<1, kThreadsPerBlock, 0, stream>>>(
        all, total_chunks, out.mutable_data_ptr<double>());
  } else {
    penalty_final_kernel<float><<<1, kThreadsPerBlock, 0, stream>>>(
        all, total_chunks, out.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- Elementwise ops ----

template <typename scalar_t, ElementwiseMode kMode>
__device__ void elementwise_chunk(const void* in_data, void* out_data, int64_t first,
                                  int64_t count, double a, double b, double g) {
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
__global__ void __launch_bounds__(kThreadsPerBlock)
    penalty_elementwise_kernel(ElementwiseTable table, const void* grad_out,
                               bool grad_out_double) {
  double g = 1.0;
  if constexpr (kMode == ElementwiseMode::Grad) {
    g = grad_out_double ? *static_cast<const double*>(grad_out)
                        : static_cast<double>(*static_cast<const float*>(grad_out));
  }
  const int64_t chunks = table.chunk_begin[table.n];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int t = tensor_of_chunk(table, c);
    const int64_t first = (c - table.chunk_begin[t]) * kChunk;
    const int64_t left = table.numel[t] - first;
    const int64_t count = left < kChunk ? left : kChunk;
    const void* in = table.in[t];
    void* out = table.out[t];
    switch (table.dtype[t]) {
      case kF32:
        elementwise_chunk<float, kMode>(in, out, first, count, table.a[t], table.b[t], g);
        break;
      case kF16:
        elementwise_chunk<c10::Half, kMode>(in, out, first, count, table.a[t], table.b[t], g);
        break;
      case kBF16:
        elementwise_chunk<c10::BFloat16, kMode>(in, out, first, count, table.a[t], table.b[t],
                                                g);
        break;
      default:
        elementwise_chunk<double, kMode>(in, out, first, count, table.a[t], table.b[t], g);
        break;
    }
  }
}

// Launches the elementwise kernel over the jobs, kElementwiseSlots tensors at a time.
template <ElementwiseMode kMode>
void run_elementwise(const std::vector<ElementwiseJob>& jobs, const at::Tensor& grad_out) {
  if (jobs.empty()) return;
  const void* g = grad_out.defined() ? grad_out.const_data_ptr() : nullptr;
  const bool g_double = grad_out.defined() && grad_out.scalar_type() == at::kDouble;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ElementwiseTable table{};
  int64_t launch_chunks = 0;
  const auto launch = [&] {
    table.chunk_begin[table.n] = launch_chunks;
    penalty_elementwise_kernel<kMode>
        <<<grid_size(launch_chunks), kThreadsPerBlock, 0, stream>>>(table, g, g_double);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_chunks = 0;
    table.n = 0;
  };
  for (const ElementwiseJob& job : jobs) {
    if (table.n == kElementwiseSlots) launch();
    const int t = table.n++;
    table.in[t] = job.in.const_data_ptr();
    table.out[t] = job.out.mutable_data_ptr();
    table.numel[t] = job.in.numel();
    table.a[t] = job.a;
    table.b[t] = job.b;
    table.dtype[t] = dtype_code(job.in.scalar_type());
    table.chunk_begin[t] = launch_chunks;
    launch_chunks += chunks_of(job.in.numel());
  }
  if (table.n > 0) launch();
}

std::vector<at::Tensor> penalty_backward_cuda(const at::Tensor& grad_out, at::TensorList params,
                                              c10::ArrayRef<double> l1,
                                              c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  const at::Tensor& like = params.empty() ? grad_out : params[0];
  const c10::cuda::CUDAGuard guard(like.device());
  const at::Tensor g = penalty_grad_out(grad_out, like);
  std::vector<at::Tensor> grads;
  const std::vector<ElementwiseJob> jobs = backward_jobs(params, l1, l2, grads);
  run_elementwise<ElementwiseMode::Grad>(jobs, g);
  return grads;
}

void penalty_grad_cuda(at::TensorList grads, at::TensorList params, c10::ArrayRef<double> l1,
                       c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  check_grads_length(grads, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::vector<ElementwiseJob> jobs = add_grad_jobs(grads, params, l1, l2);
  run_elementwise<ElementwiseMode::AddGrad>(jobs, at::Tensor());
  finish_jobs(jobs);
}

void prox_l1_cuda(at::TensorList params, c10::ArrayRef<double> threshold) {
  check_penalty_tensors(params, "params");
  check_coefficients(threshold, params.size(), "threshold");
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::vector<ElementwiseJob> jobs = prox_jobs(params, threshold);
  run_elementwise<ElementwiseMode::Prox>(jobs, at::Tensor());
  finish_jobs(jobs);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("penalty", &penalty_cuda);
  m.impl("penalty_backward", &penalty_backward_cuda);
  m.impl("penalty_grad_", &penalty_grad_cuda);
  m.impl("prox_l1_", &prox_l1_cuda);
}

}  // namespace fastreg
