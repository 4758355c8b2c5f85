// The fused ops on CUDA: tensor glue and registration. The launches of each activation
// are compiled in fused_<activation>_cuda.cu (cuda/fused_cuda.h). The bias gradient is
// torch's sum over the input gradient (at::sum: a tree reduction whose cross-block pass runs
// in a fixed order, no float atomics, deterministic), in op-math.
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "cuda/fused_cuda.h"

namespace fastreg {
namespace {

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_fwd_cuda(const at::Tensor& input,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& residual, double p,
                                                             const at::Tensor& rng_state,
                                                             c10::string_view mode_name) {
  const DeviceGuard guard(input.device());
  const FusedForward f = prepare_fused_forward(input, bias, &residual, p, rng_state, mode_name);
  fused_forward_cuda<Activation::None>(f, p, rng_state);
  return {f.buffers.out, f.buffers.mask};
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_fwd_cuda(const at::Tensor& input,
                                                             const c10::optional<at::Tensor>& bias,
                                                             double p, c10::string_view activation,
                                                             const at::Tensor& rng_state,
                                                             c10::string_view mode_name) {
  const Activation act = parse_activation(activation);
  const DeviceGuard guard(input.device());
  const FusedForward f = prepare_fused_forward(input, bias, nullptr, p, rng_state, mode_name);
  visit_activation(act,
                   [&](auto tag) { fused_forward_cuda<decltype(tag)::value>(f, p, rng_state); });
  return {f.buffers.out, f.buffers.mask};
}

// The bias gradient: grad_input summed over all but its last dimension, in op-math,
// rounded once.
at::Tensor sum_to_bias(const at::Tensor& grad_input) {
  if (grad_input.dim() == 1) return grad_input.clone(at::MemoryFormat::Contiguous);
  const auto op = grad_input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> dims(grad_input.dim() - 1);
  std::iota(dims.begin(), dims.end(), int64_t{0});
  return at::sum(grad_input, dims, /*keepdim=*/false, op).to(grad_input.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_bwd_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& input,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mask, double p,
    c10::string_view activation, const at::Tensor& rng_state, c10::string_view mode_name,
    bool bias_grad) {
  const DeviceGuard guard(grad.device());
  const FusedBackward b = prepare_fused_backward(grad, input, bias, mask, p, activation, rng_state,
                                                 mode_name, bias_grad);
  at::Tensor grad_input = at::empty_like(grad);
  const at::Tensor bias_op = b.act == Activation::None ? at::Tensor() : opmath_bias(bias);
  visit_activation(b.act, [&](auto tag) {
    fused_backward_cuda<decltype(tag)::value>(grad, input, bias_op, mask, p, rng_state, b.mode,
                                              grad_input);
  });
  at::Tensor grad_bias = bias_grad ? sum_to_bias(grad_input) : at::empty({0}, grad.options());
  return {grad_input, grad_bias};
}

}  // namespace

FASTREG_CUDA_IMPL(m) {
  m.impl("bias_dropout_add_fwd", &bias_dropout_add_fwd_cuda);
  m.impl("bias_act_dropout_fwd", &bias_act_dropout_fwd_cuda);
  m.impl("bias_act_dropout_bwd", &bias_act_dropout_bwd_cuda);
}

}  // namespace fastreg
