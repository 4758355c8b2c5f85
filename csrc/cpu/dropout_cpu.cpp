// CPU dropout kernels: the tile loop, keep-flag sources and mask sinks live in
// dropout_cpu_tiles.h, shared with the fused ops (fused_cpu.cpp).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/dropout_tiles.h"

namespace fastreg {
namespace {

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

// dropout_fwd_: the same kernel with the input as its output; returns the mask.
at::Tensor dropout_fwd_inplace_cpu(at::Tensor& input, double p, const at::Tensor& rng_state,
                                   c10::string_view mode_name) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  ForwardBuffers b = make_inplace_buffers(input, mode);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd_", [&] {
    scalar_t* data = b.out.mutable_data_ptr<scalar_t>();
    visit_sink(mode, b.mask, [&](const auto& sink) {
      dropout_tiles(static_cast<const scalar_t*>(data), data, input.numel(), p, philox, sink);
    });
  });
  finish_inplace(input, b);
  return b.mask;
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
    if (mode == MaskMode::Bits) {  // no byte flags: the bits applied directly
      const scalar_t* in = grad.const_data_ptr<scalar_t>();
      scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
      const uint32_t* words = reinterpret_cast<const uint32_t*>(mask.const_data_ptr<int32_t>());
      const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
      for_each_chunk(grad.numel(), kGrainTiles, [&](int64_t, int64_t first, int64_t count) {
        apply_bits(in + first, out + first, words + first / 32, count, scale);
      });
      return;
    }
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

#if FASTREG_X86_CLONES
namespace {
// C++ function multiversioning with the clones' targets: the loader's choice among them
// follows the same rules as for target_clones (macros such as __AVX2__ are per file, not
// per clone, so one body cannot tell).
__attribute__((target("default"))) const char* clone_name() { return "x86-64"; }
__attribute__((target("arch=x86-64-v3"))) const char* clone_name() { return "x86-64-v3"; }
__attribute__((target("arch=x86-64-v4"))) const char* clone_name() { return "x86-64-v4"; }
}  // namespace

const char* cpu_clone() { return clone_name(); }
#else
const char* cpu_clone() { return "portable"; }
#endif

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("dropout_fwd", &dropout_fwd_cpu);
  m.impl("dropout_fwd_", &dropout_fwd_inplace_cpu);
  m.impl("dropout_bwd", &dropout_bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace fastreg
