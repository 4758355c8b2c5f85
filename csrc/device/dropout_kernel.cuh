// The CUDA dropout machinery that every CUDA kernel of the dropout family shares: where
// a lane's keep bits come from (Philox, a bits mask, a bool mask), what the forward
// records for backward (bits, bool, nothing), and the one kernel that runs them and hands
// each lane's bits to an elementwise epilogue (dropout's scale, or a fused one).
//
// A warp works on chunks of 1024 elements (32 mask words). Each lane handles E
// consecutive elements per step (E = 8 for 16-bit types, 4 otherwise, so a lane moves 16
// bytes, 32 for float64), at element 1024 * chunk + E * (32 * step + lane): each step's
// loads and stores are contiguous across the warp, 128-bit per lane where aligned. The
// chunk's mask words are gathered with ballots so that lane t owns word t and writes it
// whole: no atomics, and the warp's word stores are coalesced.
// Everything here has internal linkage: each .cu file gets its own copy.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>

#include "cuda/cuda_launch.h"
#include "ops/dropout.h"

namespace fastreg {
namespace {

constexpr int64_t kChunk = 1024;  // elements per warp chunk: 32 mask words

template <typename scalar_t>
constexpr int lane_elements() {
  return sizeof(scalar_t) == 2 ? 8 : 4;
}

// Bits 0 .. min(remaining, E)-1 set: the lane's elements that lie before the end.
template <int E>
__device__ __forceinline__ uint32_t valid_bits(int64_t remaining) {
  return remaining >= E ? (1u << E) - 1u : (1u << remaining) - 1u;
}

// ---- Where the E keep bits of a lane come from (bit r: element e0 + r) ----

struct PhiloxBits {
  const int64_t* rng_state;  // (seed, offset) on the device: read in the kernel, so a
  KeepRule rule;             // CUDA graph replays whatever state the graph's draw left
  uint64_t seed = 0, offset = 0;

  __device__ void prepare() {
    seed = static_cast<uint64_t>(rng_state[0]);
    offset = static_cast<uint64_t>(rng_state[1]);
  }
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t /*n*/) const {
    uint32_t bits = 0;
#pragma unroll
    for (int b = 0; b < E / 4; ++b) {  // one Philox call per 4 elements
      const Philox4 r = philox_block(seed, offset, static_cast<uint64_t>(e0 / 4 + b));
#pragma unroll
      for (int i = 0; i < 4; ++i) bits |= uint32_t(rule.keep(r.v[i])) << (4 * b + i);
    }
    return bits;
  }
};

struct WordBits {
  const uint32_t* words;

  __device__ void prepare() {}
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t /*n*/) const {
    return (words[e0 >> 5] >> (e0 & 31)) & ((1u << E) - 1u);  // E divides 32 and e0
  }
};

template <int E>
struct alignas(E) ByteVec {
  uint8_t v[E];
};

struct BoolBits {
  const bool* mask;  // a fresh allocation: the E bytes of a lane are E-byte aligned

  __device__ void prepare() {}
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t n) const {
    uint32_t bits = 0;
    if (e0 + E <= n) {
      const ByteVec<E> m = *reinterpret_cast<const ByteVec<E>*>(mask + e0);
#pragma unroll
      for (int r = 0; r < E; ++r) bits |= uint32_t(m.v[r] != 0) << r;
    } else {
      for (int r = 0; e0 + r < n; ++r) bits |= uint32_t(mask[e0 + r]) << r;
    }
    return bits;
  }
};

// ---- What the forward keeps for backward ----

struct BitsSink {
  static constexpr bool kPacksWords = true;
  uint32_t* words;
  int64_t n_words;

  template <int E>
  __device__ void store_lane(int64_t, int64_t, uint32_t) const {}
  __device__ void store_word(int64_t w, uint32_t word) const {
    if (w < n_words) words[w] = word;
  }
};

struct BoolSink {
  static constexpr bool kPacksWords = false;
  bool* mask;

  template <int E>
  __device__ void store_lane(int64_t e0, int64_t n, uint32_t bits) const {
    if (e0 + E <= n) {
      ByteVec<E> m;
#pragma unroll
      for (int r = 0; r < E; ++r) m.v[r] = (bits >> r) & 1u;
      *reinterpret_cast<ByteVec<E>*>(mask + e0) = m;
    } else {
      for (int r = 0; e0 + r < n; ++r) mask[e0 + r] = (bits >> r) & 1u;
    }
  }
  __device__ void store_word(int64_t, uint32_t) const {}
};

struct NoSink {
  static constexpr bool kPacksWords = false;
  template <int E>
  __device__ void store_lane(int64_t, int64_t, uint32_t) const {}
  __device__ void store_word(int64_t, uint32_t) const {}
};

// Moves bit j of x (j < 32 / E) to bit E * j.
template <int E>
__device__ __forceinline__ uint32_t spread_bits(uint32_t x) {
  if constexpr (E == 4) {
    x &= 0xFFu;
    x = (x | (x << 12)) & 0x000F000Fu;
    x = (x | (x << 6)) & 0x03030303u;
    return (x | (x << 3)) & 0x11111111u;
  } else {
    static_assert(E == 8, "lanes hold 4 or 8 elements");
    x &= 0xFu;
    x = (x | (x << 14)) & 0x00030003u;
    return (x | (x << 7)) & 0x01010101u;
  }
}

// Step s of a chunk makes words E*s .. E*s+E-1, word E*s+g from lanes (32/E)*g onwards.
// Returns to lane E*s+g its word and 0 to every other lane. Every lane must call.
template <int E>
__device__ __forceinline__ uint32_t gather_word(uint32_t bits, int lane, int step) {
  uint32_t ballot[E];
#pragma unroll
  for (int r = 0; r < E; ++r) ballot[r] = __ballot_sync(kFullWarp, (bits >> r) & 1u);
  if (lane / E != step) return 0;
  const int shift = (lane % E) * (kWarp / E);
  uint32_t word = 0;
#pragma unroll
  for (int r = 0; r < E; ++r) word |= spread_bits<E>(ballot[r] >> shift) << r;
  return word;
}

template <typename scalar_t, int E>
struct alignas(E * sizeof(scalar_t)) Vec {
  scalar_t v[E];
};

// The one CUDA kernel: keep bits from `source`, recorded by `sink`, handed to
// `epilogue.apply<E>(e0, n, bits)` for elements e0 .. e0+E-1 (bit r: element e0 + r, 0
// past the end).
template <int E, typename Source, typename Sink, typename Epilogue>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dropout_kernel(int64_t n, Source source, Sink sink, Epilogue epilogue) {
  constexpr int kSteps = kChunk / (kWarp * E);
  source.prepare();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t chunk = warp; chunk < chunks; chunk += warps) {
    uint32_t word = 0;
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int64_t e0 = chunk * kChunk + static_cast<int64_t>(step * kWarp + lane) * E;
      uint32_t bits = 0;
      if (e0 < n) {
        bits = source.template get<E>(e0, n) & valid_bits<E>(n - e0);
        epilogue.template apply<E>(e0, n, bits);
        sink.template store_lane<E>(e0, n, bits);
      }
      if constexpr (Sink::kPacksWords) word |= gather_word<E>(bits, lane, step);
    }
    sink.store_word(chunk * kWarp + lane, word);
  }
}

// The epilogue of dropout_mask: the sink is all there is.
struct NoEpilogue {
  template <int E>
  __device__ void apply(int64_t, int64_t, uint32_t) const {}
};

// Launches the kernel with E = lane_elements<scalar_t>() on the current stream.
template <typename scalar_t, typename Source, typename Sink, typename Epilogue>
void launch_dropout_kernel(int64_t n, const Source& source, const Sink& sink,
                           const Epilogue& epilogue) {
  if (n == 0) return;
  constexpr int64_t kChunksPerBlock = kThreadsPerBlock / kWarp;
  const int64_t blocks = grid_size((n + kChunk * kChunksPerBlock - 1) / (kChunk * kChunksPerBlock));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dropout_kernel<lane_elements<scalar_t>()><<<blocks, kThreadsPerBlock, 0, stream>>>(
      n, source, sink, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether a lane's E-element vector loads and stores are aligned for every pointer given.
template <typename scalar_t>
bool lane_aligned(std::initializer_list<const void*> pointers) {
  constexpr uintptr_t kVecBytes = lane_elements<scalar_t>() * sizeof(scalar_t);
  for (const void* ptr : pointers) {
    if (reinterpret_cast<uintptr_t>(ptr) % kVecBytes != 0) return false;
  }
  return true;
}

template <typename F>
void visit_sink(MaskMode mode, const at::Tensor& mask, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsSink{reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()), mask.numel()});
    case MaskMode::Bool:
      return f(BoolSink{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(NoSink{});
  }
}

// `philox` is PhiloxBits or a wrapper of it (the fused ops skip Philox when p = 0).
template <typename Philox, typename F>
void visit_source(MaskMode mode, const at::Tensor& mask, const Philox& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(WordBits{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolBits{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

inline PhiloxBits make_philox(const at::Tensor& rng_state, double p) {
  return PhiloxBits{rng_state.data_ptr<int64_t>(), KeepRule::from_p(p)};
}

}  // namespace
}  // namespace fastreg
