// The one interface between fastreg's CUDA glue and the CUDA runtime: kernel launches, the
// launch configuration, the current stream, the device guard and the registration of the
// CUDA kernels. Every launch goes through launch(); no `<<<...>>>` anywhere else. The CUDA
// simulator (csrc/sim) compiles the same glue against sim/launch.h, which defines these
// names for CPU tensors.
#pragma once

#include "device/common.h"

#if defined(FASTREG_CUDA_SIM)
#include "sim/launch.h"
#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace fastreg {

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

// Every kernel runs on the current stream: under CUDA graph capture and torch.compile's
// reduce-overhead mode, work on another stream would race.
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Blocks for `work_blocks` blocks' worth of work, capped at what the device keeps
// resident at once: the grid-stride loops cover the rest without a second wave.
inline int64_t grid_size(int64_t work_blocks) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t resident = static_cast<int64_t>(sms) * (threads_per_sm / kThreadsPerBlock);
  return std::max<int64_t>(1, std::min(work_blocks, resident));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t grid, int block, std::size_t shared_bytes,
            Stream stream, Args&&... args) {
  // A .h is formatted as C++, which would split the launch's >>>.
  // clang-format off
  kernel<<<static_cast<unsigned>(grid), block, shared_bytes, stream>>>(
      std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastreg

// Registers the CUDA kernels of an op family.
#define FASTREG_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fastreg, CUDA, m)

#endif
