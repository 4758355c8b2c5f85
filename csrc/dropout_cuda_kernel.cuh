// The CUDA dropout machinery that every CUDA kernel of the dropout family shares: where
// the keep bits of a Philox block come from (Philox, a bits mask, a bool mask), what the
// forward records for backward (bits, bool, nothing), and the one kernel that runs them
// and hands each block's bits to an elementwise epilogue (dropout's scale, or a fused one).
//
// A warp works on chunks of 1024 elements. At step s (0..7) lane t handles Philox
// block q = 256 * chunk + 32 * s + t, i.e. elements 4q .. 4q+3, so each step's loads
// and stores are contiguous across the warp (128-bit for float32 when aligned). The 32
// mask words of a chunk are gathered with ballots so that lane t owns word t of the
// chunk and writes it whole: no atomics, and the warp's word stores are coalesced.
// Everything here has internal linkage: each .cu file gets its own copy.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>

#include "cuda_launch.h"
#include "dropout.h"

namespace fastreg {
namespace {

constexpr int kWarp = 32;
constexpr int kSteps = 8;
constexpr int64_t kChunkBlocks = kWarp * kSteps;  // Philox blocks per warp chunk
constexpr int64_t kChunk = 4 * kChunkBlocks;      // elements per warp chunk (32 words)
constexpr unsigned kFullWarp = 0xffffffffu;

// Bits 0 .. valid-1 set, for the elements of a block that lie before the end.
__device__ __forceinline__ uint32_t valid_bits(int64_t remaining) {
  return remaining >= 4 ? 0xFu : (1u << remaining) - 1u;
}

// ---- Where the 4 keep bits of Philox block q come from (bit r: element 4q + r) ----

struct PhiloxNibble {
  const int64_t* rng_state;  // (seed, offset) on the device: read in the kernel, so a
  KeepRule rule;             // CUDA graph replays whatever state the graph's draw left
  uint64_t seed = 0, offset = 0;

  __device__ void prepare() {
    seed = static_cast<uint64_t>(rng_state[0]);
    offset = static_cast<uint64_t>(rng_state[1]);
  }
  __device__ uint32_t operator()(int64_t q, int64_t /*n*/) const {
    const Philox4 r = philox_block(seed, offset, static_cast<uint64_t>(q));
    return uint32_t(rule.keep(r.v[0])) | uint32_t(rule.keep(r.v[1])) << 1 |
           uint32_t(rule.keep(r.v[2])) << 2 | uint32_t(rule.keep(r.v[3])) << 3;
  }
};

struct BitsNibble {
  const uint32_t* words;

  __device__ void prepare() {}
  __device__ uint32_t operator()(int64_t q, int64_t /*n*/) const {
    return (words[q >> 3] >> ((q & 7) * 4)) & 0xFu;
  }
};

struct BoolNibble {
  const bool* mask;  // fresh allocations: 4 bytes of block q are 4-byte aligned

  __device__ void prepare() {}
  __device__ uint32_t operator()(int64_t q, int64_t n) const {
    const int64_t e0 = 4 * q;
    if (e0 + 4 <= n) {
      const uchar4 m = *reinterpret_cast<const uchar4*>(mask + e0);
      return uint32_t(m.x != 0) | uint32_t(m.y != 0) << 1 | uint32_t(m.z != 0) << 2 |
             uint32_t(m.w != 0) << 3;
    }
    uint32_t nib = 0;
    for (int r = 0; e0 + r < n; ++r) nib |= uint32_t(mask[e0 + r]) << r;
    return nib;
  }
};

// ---- What the forward keeps for backward ----

struct BitsSink {
  static constexpr bool kPacksWords = true;
  uint32_t* words;
  int64_t n_words;

  __device__ void store_nibble(int64_t, int64_t, uint32_t) const {}
  __device__ void store_word(int64_t w, uint32_t word) const {
    if (w < n_words) words[w] = word;
  }
};

struct BoolSink {
  static constexpr bool kPacksWords = false;
  bool* mask;

  __device__ void store_nibble(int64_t e0, int64_t n, uint32_t nib) const {
    if (e0 + 4 <= n) {
      *reinterpret_cast<uchar4*>(mask + e0) =
          make_uchar4(nib & 1u, (nib >> 1) & 1u, (nib >> 2) & 1u, (nib >> 3) & 1u);
    } else {
      for (int r = 0; e0 + r < n; ++r) mask[e0 + r] = (nib >> r) & 1u;
    }
  }
  __device__ void store_word(int64_t, uint32_t) const {}
};

struct NoSink {
  static constexpr bool kPacksWords = false;
  __device__ void store_nibble(int64_t, int64_t, uint32_t) const {}
  __device__ void store_word(int64_t, uint32_t) const {}
};

// Spreads the low 8 bits of x to bits 0, 4, 8, ..., 28.
__device__ __forceinline__ uint32_t spread_nibble_bits(uint32_t x) {
  x &= 0xFFu;
  x = (x | (x << 12)) & 0x000F000Fu;
  x = (x | (x << 6)) & 0x03030303u;
  x = (x | (x << 3)) & 0x11111111u;
  return x;
}

// Step s of a chunk gives words 4s .. 4s+3 (lanes 8g .. 8g+7 make word 4s+g); returns
// to lane 4s+g its word and 0 to every other lane. Every lane of the warp must call.
__device__ __forceinline__ uint32_t gather_word(uint32_t nib, int lane, int step) {
  const uint32_t b0 = __ballot_sync(kFullWarp, nib & 1u);
  const uint32_t b1 = __ballot_sync(kFullWarp, nib & 2u);
  const uint32_t b2 = __ballot_sync(kFullWarp, nib & 4u);
  const uint32_t b3 = __ballot_sync(kFullWarp, nib & 8u);
  if (lane / 4 != step) return 0;
  const int shift = 8 * (lane % 4);
  return spread_nibble_bits(b0 >> shift) | spread_nibble_bits(b1 >> shift) << 1 |
         spread_nibble_bits(b2 >> shift) << 2 | spread_nibble_bits(b3 >> shift) << 3;
}

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

// The one CUDA kernel: keep bits from `source`, recorded by `sink`, handed to
// `epilogue(e0, n, nib)` for elements e0 .. e0+3 (bit r: element e0 + r, 0 past the end).
template <typename Source, typename Sink, typename Epilogue>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dropout_kernel(int64_t n, Source source, Sink sink, Epilogue epilogue) {
  source.prepare();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t chunk = warp; chunk < chunks; chunk += warps) {
    uint32_t word = 0;
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int64_t q = chunk * kChunkBlocks + step * kWarp + lane;
      const int64_t e0 = 4 * q;
      uint32_t nib = 0;
      if (e0 < n) {
        nib = source(q, n) & valid_bits(n - e0);
        epilogue(e0, n, nib);
        sink.store_nibble(e0, n, nib);
      }
      if constexpr (Sink::kPacksWords) word |= gather_word(nib, lane, step);
    }
    sink.store_word(chunk * kWarp + lane, word);
  }
}

// The epilogue of dropout_mask: the sink is all there is.
struct NoEpilogue {
  __device__ void operator()(int64_t, int64_t, uint32_t) const {}
};

template <typename Source, typename Sink, typename Epilogue>
void launch_dropout_kernel(int64_t n, const Source& source, const Sink& sink,
                           const Epilogue& epilogue) {
  if (n == 0) return;
  constexpr int64_t kChunksPerBlock = kThreadsPerBlock / kWarp;
  const int64_t blocks = grid_size((n + kChunk * kChunksPerBlock - 1) / (kChunk * kChunksPerBlock));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dropout_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(n, source, sink, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether 4-element vector loads and stores are aligned for every pointer given.
template <typename scalar_t>
bool vec4_aligned(std::initializer_list<const void*> pointers) {
  constexpr uintptr_t kVecBytes = 4 * sizeof(scalar_t);
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

// `philox` is PhiloxNibble or a wrapper of it (the fused ops skip Philox when p = 0).
template <typename Philox, typename F>
void visit_source(MaskMode mode, const at::Tensor& mask, const Philox& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsNibble{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolNibble{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

inline PhiloxNibble make_philox(const at::Tensor& rng_state, double p) {
  return PhiloxNibble{rng_state.data_ptr<int64_t>(), KeepRule::from_p(p)};
}

}  // namespace
}  // namespace fastreg
