// CPU dropout kernels. The work is cut into tiles of 256 elements (64 Philox blocks,
// 8 mask words) so that threads never share a mask word and each tile's Philox calls
// form one loop the compiler vectorizes across blocks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cpu_features.h"
#include "dropout.h"

namespace fastreg {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kTileBlocks = kTile / 4;
constexpr int64_t kTileWords = kTile / 32;
constexpr int64_t kGrainTiles = 16;

// ---- Where the keep flags of a tile come from (one byte per element, 0 or 1) ----

struct PhiloxKeep {
  RngState rng;
  KeepRule rule;

  // The contract's Philox4x32-10, run round by round over the tile's 64 blocks held in
  // planar arrays, so each round is one loop the compiler vectorizes (8 lanes on AVX2).
  FASTREG_TARGET_CLONES void operator()(int64_t tile, int64_t /*count*/, uint8_t* keep) const {
    uint32_t c0[kTileBlocks], c1[kTileBlocks], c2[kTileBlocks], c3[kTileBlocks];
    const uint64_t q0 = static_cast<uint64_t>(tile) * kTileBlocks;
    for (int64_t b = 0; b < kTileBlocks; ++b) {
      c0[b] = static_cast<uint32_t>(q0 + b);
      c1[b] = static_cast<uint32_t>((q0 + b) >> 32);
      c2[b] = static_cast<uint32_t>(rng.offset);
      c3[b] = static_cast<uint32_t>(rng.offset >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int64_t b = 0; b < kTileBlocks; ++b) philox_round(c0[b], c1[b], c2[b], c3[b], k0, k1);
      philox_bump_key(k0, k1);
    }
    const KeepRule r = rule;
    for (int64_t b = 0; b < kTileBlocks; ++b) {
      keep[4 * b + 0] = r.keep(c0[b]);
      keep[4 * b + 1] = r.keep(c1[b]);
      keep[4 * b + 2] = r.keep(c2[b]);
      keep[4 * b + 3] = r.keep(c3[b]);
    }
  }
};

struct BitsKeep {
  const uint32_t* words;

  FASTREG_TARGET_CLONES void operator()(int64_t tile, int64_t count, uint8_t* __restrict keep) const {
    const uint32_t* w = words + tile * kTileWords;
    for (int64_t word = 0; word < (count + 31) / 32; ++word) {
      const uint32_t bits = w[word];
      for (int j = 0; j < 32; ++j) keep[32 * word + j] = (bits >> j) & 1u;
    }
  }
};

struct BoolKeep {
  const bool* mask;

  void operator()(int64_t tile, int64_t count, uint8_t* keep) const {
    std::memcpy(keep, mask + tile * kTile, count);
  }
};

// ---- What the forward keeps for backward ----

struct BitsSink {
  uint32_t* words;

  FASTREG_TARGET_CLONES void operator()(int64_t tile, int64_t count,
                                        const uint8_t* __restrict keep) const {
    uint32_t* w = words + tile * kTileWords;
    for (int64_t word = 0; word < (count + 31) / 32; ++word) {
      uint32_t bits = 0;
      for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(keep[32 * word + j]) << j;
      w[word] = bits;
    }
  }
};

struct BoolSink {
  bool* mask;

  void operator()(int64_t tile, int64_t count, const uint8_t* keep) const {
    std::memcpy(mask + tile * kTile, keep, count);
  }
};

struct NoSink {
  void operator()(int64_t, int64_t, const uint8_t*) const {}
};

template <int kBytes> struct UnsignedOfSize;
template <> struct UnsignedOfSize<2> { using type = uint16_t; };
template <> struct UnsignedOfSize<4> { using type = uint32_t; };
template <> struct UnsignedOfSize<8> { using type = uint64_t; };

// Branch-free so it vectorizes (gcc will not if-convert `keep ? x * scale : 0`): the
// product is rounded for every element, then its bits are ANDed with all-ones or zero,
// so dropped elements are +0 also where the input is NaN or infinite. `keep` is the
// caller's stack buffer; __restrict says stores to `out` cannot change it.
template <typename scalar_t>
FASTREG_TARGET_CLONES void apply_keep(const scalar_t* in, scalar_t* out,
                                      const uint8_t* __restrict keep, int64_t count,
                                      at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  using bits_t = typename UnsignedOfSize<sizeof(scalar_t)>::type;
  for (int64_t e = 0; e < count; ++e) {
    const scalar_t kept = static_cast<scalar_t>(static_cast<opmath_t>(in[e]) * scale);
    bits_t bits;
    std::memcpy(&bits, &kept, sizeof(bits));
    bits &= static_cast<bits_t>(-static_cast<bits_t>(keep[e]));
    std::memcpy(out + e, &bits, sizeof(bits));
  }
}

// The one CPU loop: keep flags from `keep_fn`, recorded by `sink`, applied to `in`
// (when given) with the scale of p. Tiles past the end are zero-padded so that the
// last mask word has no stray bits.
template <typename scalar_t, typename KeepFn, typename Sink>
void dropout_tiles(const scalar_t* in, scalar_t* out, int64_t n, double p, const KeepFn& keep_fn,
                   const Sink& sink) {
  const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t begin, int64_t end) {
    alignas(64) uint8_t keep[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kTile;
      const int64_t count = std::min(kTile, n - first);
      keep_fn(tile, count, keep);
      std::fill(keep + count, keep + kTile, uint8_t{0});
      sink(tile, count, keep);
      if (in != nullptr) apply_keep(in + first, out + first, keep, count, scale);
    }
  });
}

RngState read_rng_state(const at::Tensor& rng_state) {
  const int64_t* s = rng_state.data_ptr<int64_t>();
  return RngState{static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1])};
}

template <typename F>
void visit_sink(MaskMode mode, const at::Tensor& mask, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsSink{reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolSink{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(NoSink{});
  }
}

template <typename F>
void visit_keep(MaskMode mode, const at::Tensor& mask, const PhiloxKeep& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsKeep{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolKeep{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cpu(const at::Tensor& input, double p,
                                                   const at::Tensor& rng_state,
                                                   c10::string_view mode_name) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  ForwardBuffers b = make_forward_buffers(input, mode);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd", [&] {
    visit_sink(mode, b.mask, [&](const auto& sink) {
      dropout_tiles(b.src.const_data_ptr<scalar_t>(), b.out.mutable_data_ptr<scalar_t>(),
                    input.numel(), p, philox, sink);
    });
  });
  return {b.out, b.mask};
}

at::Tensor dropout_bwd_cpu(const at::Tensor& grad, const at::Tensor& mask, double p,
                           const at::Tensor& rng_state, c10::string_view mode_name) {
  check_dropout_args(grad, p);
  check_rng_state(rng_state, grad);
  const MaskMode mode = parse_mask_mode(mode_name);
  check_backward_args(grad, mask, mode);
  at::Tensor grad_input = at::empty_like(grad);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::dropout_bwd", [&] {
    visit_keep(mode, mask, philox, [&](const auto& keep_fn) {
      dropout_tiles(grad.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                    grad.numel(), p, keep_fn, NoSink{});
    });
  });
  return grad_input;
}

at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, c10::IntArrayRef size, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
  at::Tensor mask = at::empty(size, rng_state.options().dtype(at::kBool));
  check_rng_state(rng_state, mask);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  dropout_tiles<float>(nullptr, nullptr, mask.numel(), p, philox, BoolSink{mask.data_ptr<bool>()});
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("dropout_fwd", &dropout_fwd_cpu);
  m.impl("dropout_bwd", &dropout_bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace fastreg
