// The simulator's own test kernels, compiled like the simulated CUDA sources: kernels that
// must complete with known results (collectives, the barrier, shared memory, block
// orders) and kernels with planted synchronisation bugs that must fail the launch.
// tests/test_cudasim.py runs each by name.
#include "sim/cuda_shim.h"

#include <functional>
#include <map>

#include "cuda/cuda_launch.h"

namespace fastreg {
namespace sim {
namespace {

// Every lane's results of the collectives, 8 values per thread.
__global__ void collectives_kernel(int64_t* out) {
  const int lane = threadIdx.x % 32;
  int64_t* o = out + 8 * (blockIdx.x * blockDim.x + threadIdx.x);
  o[0] = __ballot_sync(kFullWarp, lane % 3 == 0);
  o[1] = __shfl_down_sync(kFullWarp, lane * 10, 3);
  o[2] = __shfl_up_sync(kFullWarp, lane * 10, 5, 16);
  o[3] = __shfl_xor_sync(kFullWarp, lane * 10, 9);
  o[4] = __shfl_sync(kFullWarp, static_cast<double>(lane) + 0.5, 7, 8) * 2;
  o[5] = __any_sync(kFullWarp, lane == 31);
  o[6] = __all_sync(kFullWarp, lane < 31);
  // A collective of half a warp: only the lanes of its mask take part.
  o[7] = lane < 16 ? static_cast<int64_t>(__ballot_sync(0x0000ffffu, lane % 2)) : -1;
}

// The block's sum through __shared__ memory and __syncthreads, one per block.
__global__ void shared_sum_kernel(int64_t* out) {
  __shared__ int64_t partial[kThreadsPerBlock];
  partial[threadIdx.x] = threadIdx.x + 1000 * blockIdx.x;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The same with its first __syncthreads removed: thread 0 reads partial[128] before thread
// 128 of this block wrote it (it holds the previous block's value).
__global__ void missing_sync_kernel(int64_t* out) {
  __shared__ int64_t partial[kThreadsPerBlock];
  partial[threadIdx.x] = threadIdx.x + 1000 * blockIdx.x;
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The order in which blocks ran: out[k] = the k-th block to start.
__global__ void block_order_kernel(int64_t* out, int64_t* counter) {
  if (threadIdx.x == 0) out[atomicAdd(counter, int64_t{1})] = blockIdx.x;
}

// ---- Planted bugs: each must fail the launch with a clear message ----

__global__ void deadlock_kernel(int64_t*) {
  if (threadIdx.x % 32 < 16) {
    __ballot_sync(kFullWarp, 1);
  } else {
    __syncthreads();
  }
}

__global__ void different_collectives_kernel(int64_t* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x] = lane < 16 ? __ballot_sync(kFullWarp, 1) : __shfl_sync(kFullWarp, lane, 0);
}

__global__ void exited_lane_kernel(int64_t* out) {
  if (threadIdx.x % 32 == 7) return;
  out[threadIdx.x] = __ballot_sync(kFullWarp, 1);
}

__global__ void mask_without_self_kernel(int64_t* out) {
  out[threadIdx.x] = __ballot_sync(threadIdx.x % 32 == 5 ? 1u : kFullWarp, 1);
}

__global__ void misaligned_vector_kernel(int64_t* out) {
  struct alignas(16) Four {
    int32_t v[4];
  };
  const char* base = reinterpret_cast<const char*>(out);
  const Four f = load_vector<Four>(base + 4);  // 4 bytes past a 16-byte boundary
  out[0] = f.v[0];
}

using Kernel = void (*)(int64_t*);

struct Case {
  Kernel kernel;
  int64_t grid;
  int64_t out_elements;  // per block
};

const std::map<std::string, Case>& cases() {
  static const std::map<std::string, Case> all = {
      {"collectives", {collectives_kernel, 2, 8 * kThreadsPerBlock}},
      {"shared_sum", {shared_sum_kernel, 3, 1}},
      {"missing_sync", {missing_sync_kernel, 3, 1}},
      {"deadlock", {deadlock_kernel, 1, kThreadsPerBlock}},
      {"different_collectives", {different_collectives_kernel, 1, kThreadsPerBlock}},
      {"exited_lane", {exited_lane_kernel, 1, kThreadsPerBlock}},
      {"mask_without_self", {mask_without_self_kernel, 1, kThreadsPerBlock}},
      {"misaligned_vector", {misaligned_vector_kernel, 1, 4}},
  };
  return all;
}

}  // namespace

std::vector<std::string> selftest_names() {
  std::vector<std::string> names{"block_order"};
  for (const auto& entry : cases()) names.push_back(entry.first);
  return names;
}

// Runs the named test kernel on a fresh int64 buffer (zeros) and returns the buffer.
at::Tensor selftest(const std::string& name) {
  if (name == "block_order") {
    constexpr int64_t kBlocks = 64;
    at::Tensor out = at::full({kBlocks}, -1, at::kLong);
    at::Tensor counter = at::zeros({1}, at::kLong);
    launch(block_order_kernel, kBlocks, kThreadsPerBlock, 0, current_stream(),
           out.data_ptr<int64_t>(), counter.data_ptr<int64_t>());
    return out;
  }
  const auto it = cases().find(name);
  TORCH_CHECK_VALUE(it != cases().end(), "no simulator self-test named '", name, "'");
  const Case& c = it->second;
  at::Tensor out = at::zeros({c.grid * c.out_elements}, at::kLong);
  launch(c.kernel, c.grid, kThreadsPerBlock, 0, current_stream(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace sim
}  // namespace fastreg
