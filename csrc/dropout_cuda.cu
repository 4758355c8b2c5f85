// CUDA dropout kernels.
//
// A warp works on chunks of 1024 elements. At step s (0..7) lane t handles Philox
// block q = 256 * chunk + 32 * s + t, i.e. elements 4q .. 4q+3, so each step's loads
// and stores are contiguous across the warp (128-bit for float32 when aligned). The 32
// mask words of a chunk are gathered with ballots so that lane t owns word t of the
// chunk and writes it whole: no atomics, and the warp's word stores are coalesced.
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

template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void apply_nibble(const scalar_t* in, scalar_t* out, int64_t e0,
                                             int64_t n, uint32_t nib,
                                             at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (kAligned && e0 + 4 <= n) {
    Vec4<scalar_t> v = *reinterpret_cast<const Vec4<scalar_t>*>(in + e0);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      v.v[r] = ((nib >> r) & 1u) ? static_cast<scalar_t>(static_cast<opmath_t>(v.v[r]) * scale)
                                 : static_cast<scalar_t>(0);
    }
    *reinterpret_cast<Vec4<scalar_t>*>(out + e0) = v;
  } else {
    for (int r = 0; r < 4 && e0 + r < n; ++r) {
      out[e0 + r] = ((nib >> r) & 1u)
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
        if (in != nullptr) apply_nibble<scalar_t, kAligned>(in, out, e0, n, nib, scale);
        sink.store_nibble(e0, n, nib);
      }
      if constexpr (Sink::kPacksWords) word |= gather_word(nib, lane, step);
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
  constexpr uintptr_t kVecBytes = 4 * sizeof(scalar_t);
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
void visit_source(MaskMode mode, const at::Tensor& mask, const PhiloxNibble& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsNibble{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolNibble{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

PhiloxNibble make_philox(const at::Tensor& rng_state, double p) {
  return PhiloxNibble{rng_state.data_ptr<int64_t>(), KeepRule::from_p(p)};
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cuda(const at::Tensor& input, double p,
                                                    const at::Tensor& rng_state,
                                                    c10::string_view mode_name) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  const c10::cuda::CUDAGuard guard(input.device());
  ForwardBuffers b = make_forward_buffers(input, mode);
  const PhiloxNibble philox = make_philox(rng_state, p);
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
  const PhiloxNibble philox = make_philox(rng_state, p);
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
