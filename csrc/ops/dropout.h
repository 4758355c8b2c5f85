// Host-side pieces that the CPU and CUDA dropout kernels share: the mask modes, the
// checks the dispatcher-level ops make, and how outputs and masks are allocated.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "device/philox.h"

namespace fastreg {

// What the forward keeps for backward.
enum class MaskMode { Bits, Bool, Recompute };

inline MaskMode parse_mask_mode(c10::string_view mode) {
  if (mode == "bits") return MaskMode::Bits;
  if (mode == "bool") return MaskMode::Bool;
  if (mode == "recompute") return MaskMode::Recompute;
  TORCH_CHECK_VALUE(false, "mask must be 'bits', 'bool' or 'recompute', but got '",
                    std::string(mode), "'");
}

// Bits mode packs element i into bit i % 32 of 32-bit word i / 32.
inline int64_t mask_words(int64_t numel) { return (numel + 31) / 32; }

struct RngState {
  uint64_t seed;
  uint64_t offset;
};

inline void check_rng_state(const at::Tensor& rng_state, const at::Tensor& like) {
  TORCH_CHECK(
      rng_state.scalar_type() == at::kLong && rng_state.numel() == 2 && rng_state.is_contiguous(),
      "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(rng_state.device() == like.device(), "rng_state must be on ", like.device(),
              ", but is on ", rng_state.device());
}

inline void check_probability(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ",
                    p);
}

inline void check_dropout_args(const at::Tensor& input, double p) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()) && input.scalar_type() != at::kFloat8_e4m3fn &&
          input.scalar_type() != at::kFloat8_e5m2,
      "input must be float16, bfloat16, float32 or float64, but got ", input.scalar_type());
  check_probability(p);
}

// scale = 1 / (1 - p), computed in double and rounded once to the op-math type.
template <typename opmath_t>
opmath_t dropout_scale(double p) {
  return p >= 1.0 ? opmath_t(0) : static_cast<opmath_t>(1.0 / (1.0 - p));
}

// The forward's buffers. Out of place (dropout_fwd), the output has the input's layout when
// the input is dense (empty_like keeps its strides); a non-dense input is first gathered
// into the output, and the kernel then runs in place. In place (dropout_fwd_), a dense
// input is its own output, so nothing of the input's size is allocated; a non-dense input
// is gathered into the buffer that the out-of-place forward would return (same strides,
// so the same mask), run in place there, and copied back by finish_inplace. Either way
// element i of the contract is out's i-th memory slot, and src is out or dense with out's
// strides.
struct ForwardBuffers {
  at::Tensor src;
  at::Tensor out;
  at::Tensor mask;
};

// What the forward keeps for backward, for an output `out` (bool masks take its strides).
inline at::Tensor make_mask(const at::Tensor& out, MaskMode mode) {
  switch (mode) {
    case MaskMode::Bits:
      return at::empty({mask_words(out.numel())}, out.options().dtype(at::kInt));
    case MaskMode::Bool:
      return at::empty_like(out, out.options().dtype(at::kBool));
    case MaskMode::Recompute:
      break;
  }
  return at::empty({0}, out.options().dtype(at::kInt));
}

inline ForwardBuffers make_forward_buffers(const at::Tensor& input, MaskMode mode, bool inplace) {
  const bool dense = input.is_non_overlapping_and_dense();
  ForwardBuffers b;
  b.out = inplace && dense ? input : at::empty_like(input);
  b.src = input;
  if (!b.out.is_same(input) && (!dense || input.strides() != b.out.strides())) {
    b.out.copy_(input);  // gathered: the kernel runs in place in out
    b.src = b.out;
  }
  b.mask = make_mask(b.out, mode);
  return b;
}

inline void finish_inplace(at::Tensor& input, const ForwardBuffers& b) {
  if (!b.out.is_same(input)) input.copy_(b.out);
}

// Backward applies the forward's mask to a gradient that the Python layer has already
// given the forward output's layout.
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& mask, MaskMode mode) {
  TORCH_CHECK(grad.is_non_overlapping_and_dense(),
              "grad must be dense (fastreg gives it the forward output's layout)");
  switch (mode) {
    case MaskMode::Bits:
      TORCH_CHECK(mask.scalar_type() == at::kInt && mask.numel() == mask_words(grad.numel()),
                  "a bits mask must be int32 with ", mask_words(grad.numel()), " words");
      break;
    case MaskMode::Bool:
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == grad.sizes() &&
                      mask.strides() == grad.strides(),
                  "a bool mask must have grad's shape and strides");
      break;
    case MaskMode::Recompute:
      break;
  }
  TORCH_CHECK(mask.device() == grad.device(), "mask must be on ", grad.device());
}

// ---- The ops' set-up, the same on every device ----
// On CUDA the caller sets the device guard first, so that buffers land on the input's device.

// The checked arguments and allocated buffers of dropout_fwd, or of dropout_fwd_ with
// `inplace` (see make_forward_buffers).
struct DropoutForward {
  MaskMode mode;
  ForwardBuffers buffers;
};

inline DropoutForward prepare_dropout_forward(const at::Tensor& input, double p,
                                              const at::Tensor& rng_state,
                                              c10::string_view mode_name, bool inplace = false) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  return {mode, make_forward_buffers(input, mode, inplace)};
}

// The checked mask mode of a backward (dropout_bwd, bias_act_dropout_bwd).
inline MaskMode prepare_dropout_backward(const at::Tensor& grad, const at::Tensor& mask, double p,
                                         const at::Tensor& rng_state, c10::string_view mode_name) {
  check_dropout_args(grad, p);
  check_rng_state(rng_state, grad);
  const MaskMode mode = parse_mask_mode(mode_name);
  check_backward_args(grad, mask, mode);
  return mode;
}

// The bool mask of dropout_mask, allocated after the checks.
inline at::Tensor prepare_dropout_mask(const at::Tensor& rng_state, c10::IntArrayRef size,
                                       double p) {
  check_probability(p);
  at::Tensor mask = at::empty(size, rng_state.options().dtype(at::kBool));
  check_rng_state(rng_state, mask);
  return mask;
}

}  // namespace fastreg
