// The host side of the CUDA dropout family (device code: device/dropout_kernel.cuh): the
// launch of the one dropout kernel, and the keep-bit sources and mask sinks made from
// tensors. Shared by dropout_cuda.cu and the fused ops' files.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

#include "cuda/cuda_launch.h"
#include "device/dropout_kernel.cuh"
#include "ops/dropout.h"

namespace fastreg {

// Launches the dropout kernel with E = lane_elements<scalar_t>() on the current stream.
template <typename scalar_t, typename Source, typename Sink, typename Epilogue>
void launch_dropout_kernel(int64_t n, const Source& source, const Sink& sink,
                           const Epilogue& epilogue) {
  if (n == 0) return;
  constexpr int64_t kChunksPerBlock = kThreadsPerBlock / kWarp;
  constexpr int64_t kBlockElements = kDropoutChunk * kChunksPerBlock;
  launch(device::dropout_kernel<device::lane_elements<scalar_t>(), Source, Sink, Epilogue>,
         grid_size((n + kBlockElements - 1) / kBlockElements), kThreadsPerBlock, 0,
         current_stream(), n, source, sink, epilogue);
}

// Whether every pointer given allows `bytes`-byte vector accesses (null pointers do).
inline bool aligned_to(int64_t bytes, std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) {
    if (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) != 0) return false;
  }
  return true;
}

// Whether a lane's E-element vector loads and stores are aligned for every pointer given.
template <typename scalar_t>
bool lane_aligned(std::initializer_list<const void*> pointers) {
  return aligned_to(device::lane_elements<scalar_t>() * sizeof(scalar_t), pointers);
}

template <typename F>
void visit_sink(MaskMode mode, const at::Tensor& mask, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(
          device::BitsSink{reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()), mask.numel()});
    case MaskMode::Bool:
      return f(device::BoolSink{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(device::NoSink{});
  }
}

// The source of a backward's keep bits. `philox` is PhiloxBits or MaybePhiloxBits; a
// bool mask may be any view (the op's caller can pass one), so its alignment is checked
// for the lanes of `scalar_t`.
template <typename scalar_t, typename Philox, typename F>
void visit_source(MaskMode mode, const at::Tensor& mask, const Philox& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(device::WordBits{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool: {
      const bool* m = mask.data_ptr<bool>();
      return f(device::BoolBits{m, aligned_to(device::lane_elements<scalar_t>(), {m})});
    }
    case MaskMode::Recompute:
      return f(philox);
  }
}

inline device::PhiloxBits make_philox(const at::Tensor& rng_state, double p) {
  return device::PhiloxBits{rng_state.data_ptr<int64_t>(), KeepRule::from_p(p)};
}

// Philox, skipped when p's threshold keeps every element (the fused ops at p = 0).
inline device::MaybePhiloxBits make_maybe_philox(const at::Tensor& rng_state, double p) {
  const KeepRule rule = KeepRule::from_p(p);
  return device::MaybePhiloxBits{make_philox(rng_state, p), !rule.drop_all && rule.threshold == 0};
}

}  // namespace fastreg
