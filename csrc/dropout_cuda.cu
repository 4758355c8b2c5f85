// CUDA dropout kernels.
//
// A warp works on chunks of 1024 elements (32 mask words). Each lane handles E
// consecutive elements per step (E = 8 for 16-bit types, 4 otherwise, so a lane moves 16
// bytes, 32 for float64), at element 1024 * chunk + E * (32 * step + lane): each step's
// loads and stores are contiguous across the warp, 128-bit per lane where aligned. The
// chunk's mask words are gathered with ballots so that lane t owns word t and writes it
// whole: no atomics, and the warp's word stores are coalesced.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_launch.h"
#include "dropout.h"

namespace fastreg {
namespace {

constexpr int kWarp = 32;
constexpr int64_t kChunk = 1024;  // elements per warp chunk: 32 mask words
constexpr unsigned kFullWarp = 0xffffffffu;

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

template <typename scalar_t, int E, bool kAligned>
__device__ __forceinline__ void apply_bits(const scalar_t* in, scalar_t* out, int64_t e0,
                                           int64_t n, uint32_t bits,
                                           at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (kAligned && e0 + E <= n) {
    Vec<scalar_t, E> v = *reinterpret_cast<const Vec<scalar_t, E>*>(in + e0);
#pragma unroll
    for (int r = 0; r < E; ++r) {
      v.v[r] = ((bits >> r) & 1u) ? static_cast<scalar_t>(static_cast<opmath_t>(v.v[r]) * scale)
                                  : static_cast<scalar_t>(0);
    }
    *reinterpret_cast<Vec<scalar_t, E>*>(out + e0) = v;
  } else {
    for (int r = 0; r < E && e0 + r < n; ++r) {
      out[e0 + r] = ((bits >> r) & 1u)
                        ? static_cast<scalar_t>(static_cast<opmath_t>(in[e0 + r]) * scale)
                        : static_cast<scalar_t>(0);
    }
  }
}

// The one CUDA kernel: keep bits from `source`, recorded by `sink`, applied to `in`
// (when given). `in` may equal `out`.
template <typename scalar_t, bool kAligned, typename Source, typename Sink>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dropout_kernel(const scalar_t* in, scalar_t* out, int64_t n,
                   at::opmath_type<scalar_t> scale, Source source, Sink sink) {
  constexpr int E = lane_elements<scalar_t>();
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
        if (in != nullptr) apply_bits<scalar_t, E, kAligned>(in, out, e0, n, bits, scale);
        sink.template store_lane<E>(e0, n, bits);
      }
      if constexpr (Sink::kPacksWords) word |= gather_word<E>(bits, lane, step);
    }
    sink.store_word(chunk * kWarp + lane, word);
  }
}

template <typename scalar_t, typename Source, typename Sink>
void launch_dropout(const scalar_t* in, scalar_t* out, int64_t n, double p, const Source& source,
                    const Sink& sink) {
  if (n == 0) return;
  constexpr int64_t kChunksPerBlock = kThreadsPerBlock / kWarp;
  const int64_t blocks = grid_size((n + kChunk * kChunksPerBlock - 1) / (kChunk * kChunksPerBlock));
  const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr uintptr_t kVecBytes = lane_elements<scalar_t>() * sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(in) % kVecBytes == 0 &&
                       reinterpret_cast<uintptr_t>(out) % kVecBytes == 0;
  if (aligned) {
    dropout_kernel<scalar_t, true><<<blocks, kThreadsPerBlock, 0, stream>>>(in, out, n, scale,
                                                                            source, sink);
  } else {
    dropout_kernel<scalar_t, false><<<blocks, kThreadsPerBlock, 0, stream>>>(in, out, n, scale,
                                                                             source, sink);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

template <typename F>
void visit_source(MaskMode mode, const at::Tensor& mask, const PhiloxBits& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(WordBits{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolBits{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

PhiloxBits make_philox(const at::Tensor& rng_state, double p) {
  return PhiloxBits{rng_state.data_ptr<int64_t>(), KeepRule::from_p(p)};
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cuda(const at::Tensor& input, double p,
                                                    const at::Tensor& rng_state,
                                                    c10::string_view mode_name) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  const c10::cuda::CUDAGuard guard(input.device());
  ForwardBuffers b = make_forward_buffers(input, mode);
  const PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd", [&] {
    visit_sink(mode, b.mask, [&](const auto& sink) {
      launch_dropout(b.src.const_data_ptr<scalar_t>(), b.out.mutable_data_ptr<scalar_t>(),
                     input.numel(), p, philox, sink);
    });
  });
  return {b.out, b.mask};
}

at::Tensor dropout_bwd_cuda(const at::Tensor& grad, const at::Tensor& mask, double p,
                            const at::Tensor& rng_state, c10::string_view mode_name) {
  check_dropout_args(grad, p);
  check_rng_state(rng_state, grad);
  const MaskMode mode = parse_mask_mode(mode_name);
  check_backward_args(grad, mask, mode);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::empty_like(grad);
  const PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::dropout_bwd", [&] {
    visit_source(mode, mask, philox, [&](const auto& source) {
      launch_dropout(grad.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                     grad.numel(), p, source, NoSink{});
    });
  });
  return grad_input;
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, c10::IntArrayRef size, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
  const c10::cuda::CUDAGuard guard(rng_state.device());
  at::Tensor mask = at::empty(size, rng_state.options().dtype(at::kBool));
  check_rng_state(rng_state, mask);
  launch_dropout<float>(nullptr, nullptr, mask.numel(), p, make_philox(rng_state, p),
                        BoolSink{mask.data_ptr<bool>()});
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("dropout_fwd", &dropout_fwd_cuda);
  m.impl("dropout_bwd", &dropout_bwd_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace fastreg
