// Launch configuration for fastreg's grid-stride CUDA kernels, computed in one place.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "device/common.h"

namespace fastreg {

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

}  // namespace fastreg
