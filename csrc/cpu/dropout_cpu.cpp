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
  const DropoutForward f = prepare_dropout_forward(input, p, rng_state, mode_name);
  const MaskMode mode = f.mode;
  const ForwardBuffers& b = f.buffers;
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
  const MaskMode mode = prepare_dropout_backward(grad, mask, p, rng_state, mode_name);
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
  at::Tensor mask = prepare_dropout_mask(rng_state, size, p);
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
