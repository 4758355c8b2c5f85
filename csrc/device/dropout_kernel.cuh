// The CUDA dropout machinery that every kernel of the dropout family shares: where a lane's
// keep bits come from (Philox, a bits mask, a bool mask), what the forward records for
// backward (bits, bool, nothing), the one kernel that runs them and hands each lane's bits
// to an elementwise epilogue, and dropout's own epilogue (the fused ones are in
// fused_epilogues.cuh). Device code only: the host side is csrc/cuda/dropout_launch.h.
//
// A warp works on chunks of kDropoutChunk = 1024 elements (32 mask words). Each lane
// handles E consecutive elements per step (E = 8 for 16-bit types, 4 otherwise, so a lane
// moves 16 bytes, 32 for float64), at element 1024 * chunk + E * (32 * step + lane): each
// step's loads and stores are contiguous across the warp, 128-bit per lane where aligned.
// The chunk's mask words are gathered with ballots so that lane t owns word t and writes
// it whole: no atomics, and the warp's word stores are coalesced.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "device/common.h"
#include "device/philox.h"

namespace fastreg {
namespace device {

template <typename scalar_t>
constexpr int lane_elements() {
  return sizeof(scalar_t) == 2 ? 8 : 4;
}

// Bits 0 .. min(remaining, E)-1 set: the lane's elements that lie before the end.
template <int E>
__device__ __forceinline__ uint32_t valid_bits(int64_t remaining) {
  return remaining >= E ? (1u << E) - 1u : (1u << remaining) - 1u;
}

template <typename scalar_t, int E>
struct alignas(E * sizeof(scalar_t)) Vec {
  scalar_t v[E];
};

// ---- Where the E keep bits of a lane come from (bit r: element e0 + r) ----

// Each source's prepared() is what the kernel's threads use: a copy with what it reads
// from device memory once (a kernel that wrote into its parameter instead kept that
// parameter in local memory and reloaded it for every chunk).

struct PhiloxBits {
  const int64_t* rng_state;  // (seed, offset) on the device: read in the kernel, so a
  KeepRule rule;             // CUDA graph replays whatever state the graph's draw left
  uint64_t seed = 0, offset = 0;

  __device__ PhiloxBits prepared() const {
    return {rng_state, rule, static_cast<uint64_t>(rng_state[0]),
            static_cast<uint64_t>(rng_state[1])};
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

// Philox, or every bit set when p's threshold is 0 (eval mode and p = 0 run the fused ops
// with p = 0): the contract keeps every element then, so Philox can be skipped.
struct MaybePhiloxBits {
  PhiloxBits philox;
  bool keep_all;

  __device__ MaybePhiloxBits prepared() const {
    return {keep_all ? philox : philox.prepared(), keep_all};
  }
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t n) const {
    return keep_all ? (1u << E) - 1u : philox.template get<E>(e0, n);
  }
};

struct WordBits {
  const uint32_t* words;

  __device__ WordBits prepared() const { return *this; }
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
  const bool* mask;
  bool aligned;  // mask allows a lane's E-byte loads (a view of a mask may start anywhere)

  __device__ BoolBits prepared() const { return *this; }
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t n) const {
    uint32_t bits = 0;
    if (aligned && e0 + E <= n) {
      const ByteVec<E> m = load_vector<ByteVec<E>>(mask + e0);
#pragma unroll
      for (int r = 0; r < E; ++r) bits |= uint32_t(m.v[r] != 0) << r;
    } else {
      for (int r = 0; r < E && e0 + r < n; ++r) bits |= uint32_t(mask[e0 + r]) << r;
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
  bool* mask;  // a fresh allocation: the E bytes of a lane are E-byte aligned

  template <int E>
  __device__ void store_lane(int64_t e0, int64_t n, uint32_t bits) const {
    if (e0 + E <= n) {
      ByteVec<E> m;
#pragma unroll
      for (int r = 0; r < E; ++r) m.v[r] = (bits >> r) & 1u;
      store_vector(mask + e0, m);
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

// The one kernel of the dropout family: keep bits from `source`, recorded by `sink`,
// handed to `epilogue.apply<E>(e0, n, bits)` for elements e0 .. e0+E-1 (bit r: element
// e0 + r, 0 past the end). A grid-stride loop over the chunks, one warp per chunk.
template <int E, typename Source, typename Sink, typename Epilogue>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    dropout_kernel(int64_t n, Source source, Sink sink, Epilogue epilogue) {
  constexpr int kSteps = kDropoutChunk / (kWarp * E);
  const Source src = source.prepared();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t chunks = (n + kDropoutChunk - 1) / kDropoutChunk;
  for (int64_t chunk = warp; chunk < chunks; chunk += warps) {
    uint32_t word = 0;
    const int64_t lane_first = chunk * kDropoutChunk + lane * E;
    // Not unrolled: the 4 or 8 copies of a step's Philox and epilogue made the kernels
    // (and the extension) 6x larger and took registers; unrolling would not put two
    // steps' loads in flight anyway, since `in` may be `out` and a step stores before the
    // next one loads. The SM's other warps hide the latency.
#pragma unroll 1
    for (int step = 0; step < kSteps; ++step) {
      const int64_t e0 = lane_first + step * kWarp * E;
      uint32_t bits = 0;
      if (e0 < n) {
        bits = src.template get<E>(e0, n) & valid_bits<E>(n - e0);
        epilogue.template apply<E>(e0, n, bits);
        sink.template store_lane<E>(e0, n, bits);
      }
      if constexpr (Sink::kPacksWords) word |= gather_word<E>(bits, lane, step);
    }
    sink.store_word(chunk * kWarp + lane, word);
  }
}

// ---- Epilogues ----

// The epilogue of dropout_mask: the sink is all there is.
struct NoEpilogue {
  template <int E>
  __device__ void apply(int64_t, int64_t, uint32_t) const {}
};

// Dropout's epilogue: the kept elements of `in` scaled, the others 0. `in` may equal
// `out`. kAligned: in and out allow a lane's vector accesses.
template <typename scalar_t, bool kAligned>
struct ScaleEpilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  scalar_t* out;
  opmath_t scale;

  __device__ __forceinline__ scalar_t element(scalar_t v, uint32_t keep) const {
    return keep ? static_cast<scalar_t>(static_cast<opmath_t>(v) * scale)
                : static_cast<scalar_t>(0);
  }

  template <int E>
  __device__ void apply(int64_t e0, int64_t n, uint32_t bits) const {
    if (kAligned && e0 + E <= n) {
      Vec<scalar_t, E> v = load_vector<Vec<scalar_t, E>>(in + e0);
#pragma unroll
      for (int r = 0; r < E; ++r) v.v[r] = element(v.v[r], (bits >> r) & 1u);
      store_vector(out + e0, v);
    } else {
      for (int r = 0; r < E && e0 + r < n; ++r) out[e0 + r] = element(in[e0 + r], (bits >> r) & 1u);
    }
  }
};

}  // namespace device
}  // namespace fastreg
