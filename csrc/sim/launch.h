// cuda/cuda_launch.h's interface for the CUDA simulator: the same names, on CPU tensors.
// A launch runs the kernel's blocks one by one (sim/runtime.h); grid_size() caps grids at
// the configured number of resident blocks, so that grid-stride loops iterate; the
// simulated kernels are registered as the CPU kernels of the fastreg operators, in a
// module of their own (fastreg/_cudasim.py) that is loaded instead of fastreg._C.
#pragma once

#include <c10/core/Device.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "sim/runtime.h"

namespace fastreg {

struct Stream {};
inline Stream current_stream() { return {}; }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline int64_t grid_size(int64_t work_blocks) {
  return std::max<int64_t>(1, std::min(work_blocks, sim::config().resident_blocks));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t grid, int block, std::size_t /*shared_bytes*/,
            Stream, Args&&... args) {
  // The parameters are converted once, as a launch does; each thread gets its own copy.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  sim::run_grid(grid, block, [&] { std::apply(kernel, params); });
}

}  // namespace fastreg

#define FASTREG_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fastreg, CPU, m)
