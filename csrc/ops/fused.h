// The fused ops' host side, shared by the CPU and CUDA glue: the activation names, the
// bias layout of an output tensor, the checks the dispatcher-level ops make and the
// forward ops' set-up. The element math is in device/fused_math.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "device/fused_math.h"
#include "ops/dropout.h"

namespace fastreg {

inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(false,
                    "activation must be 'none', 'relu', 'gelu', 'gelu_tanh' or 'silu', "
                    "but got '",
                    std::string(name), "'");
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime activation.
template <typename F>
void visit_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::None:
      return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::Relu:
      return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu:
      return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh:
      return f(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu:
      return f(std::integral_constant<Activation, Activation::Silu>{});
  }
}
inline BiasLayout bias_layout(const at::Tensor& out) {
  if (out.dim() == 0) return BiasLayout{1, 1};
  const int64_t size = out.size(-1);
  // A last dimension of size 1 may have any stride: every element takes bias[0].
  if (size <= 1) return BiasLayout{std::max<int64_t>(out.numel(), 1), 1};
  return BiasLayout{out.stride(-1), size};
}

// ---- Checks (the Python layer checks first; these guard direct calls of the ops) ----

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& input) {
  if (!bias.has_value()) return;
  TORCH_CHECK(input.dim() >= 1 && bias->dim() == 1 && bias->size(0) == input.size(-1),
              "bias must have shape (", input.dim() >= 1 ? input.size(-1) : 0,
              ",) to broadcast over input's last dimension, but got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias must have input's dtype ",
              input.scalar_type(), ", but got ", bias->scalar_type());
  TORCH_CHECK(bias->device() == input.device(), "bias must be on ", input.device(), ", but is on ",
              bias->device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), name, " must have input's shape ", input.sizes(),
              ", but got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must have input's dtype ",
              input.scalar_type(), ", but got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), name, " must be on ", input.device(), ", but is on ",
              t.device());
}

// The backward reads input (and bias) only for an activation's derivative; input then
// has grad's layout (the Python layer gives both the forward output's strides).
inline void check_fused_backward_args(const at::Tensor& grad,
                                      const c10::optional<at::Tensor>& input,
                                      const c10::optional<at::Tensor>& bias, Activation act,
                                      bool bias_grad) {
  if (act != Activation::None) {
    TORCH_CHECK(input.has_value(), "the backward of an activation needs the forward's input");
    check_same(*input, "input", grad);
    TORCH_CHECK(input->strides() == grad.strides(), "input must have grad's strides ",
                grad.strides(), ", but has ", input->strides());
    check_bias(bias, grad);
  }
  TORCH_CHECK(!bias_grad || grad.dim() >= 1, "a bias gradient needs at least 1 dimension");
}

// The bias as a contiguous op-math vector: converted once, exactly.
inline at::Tensor opmath_bias(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  const auto op = bias->scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return bias->to(op).contiguous();
}

// `t`, or a copy of it with `like`'s strides: the kernels read every operand in the
// output's memory order.
inline at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

// ---- The forward ops' set-up, the same on every device ----

// The checked arguments and allocated buffers of bias_dropout_add_fwd (with a residual)
// and bias_act_dropout_fwd (residual null). On CUDA the caller sets the device guard
// first, so that the buffers land on the input's device.
struct FusedForward {
  MaskMode mode;
  ForwardBuffers buffers;
  at::Tensor bias;      // op-math, contiguous; undefined without a bias
  at::Tensor residual;  // with the output's strides; undefined without a residual
};

inline FusedForward prepare_fused_forward(const at::Tensor& input,
                                          const c10::optional<at::Tensor>& bias,
                                          const at::Tensor* residual, double p,
                                          const at::Tensor& rng_state, c10::string_view mode_name) {
  check_bias(bias, input);
  if (residual != nullptr) check_same(*residual, "residual", input);
  DropoutForward d = prepare_dropout_forward(input, p, rng_state, mode_name);
  FusedForward f{d.mode, std::move(d.buffers), opmath_bias(bias), at::Tensor()};
  if (residual != nullptr) f.residual = with_strides_of(*residual, f.buffers.out);
  return f;
}

// The checked mask mode and activation of bias_act_dropout_bwd.
struct FusedBackward {
  MaskMode mode;
  Activation act;
};

inline FusedBackward prepare_fused_backward(const at::Tensor& grad,
                                            const c10::optional<at::Tensor>& input,
                                            const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& mask, double p,
                                            c10::string_view activation,
                                            const at::Tensor& rng_state, c10::string_view mode_name,
                                            bool bias_grad) {
  const MaskMode mode = prepare_dropout_backward(grad, mask, p, rng_state, mode_name);
  const Activation act = parse_activation(activation);
  check_fused_backward_args(grad, input, bias, act, bias_grad);
  return {mode, act};
}

}  // namespace fastreg
