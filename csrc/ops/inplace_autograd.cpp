// The Autograd and ADInplaceOrView kernels of the operators that write into their
// arguments (dropout_fwd_, penalty_grad_, prox_l1_), as torch's own in-place ops have:
// - ADInplaceOrView bumps the version counter of every tensor written, so that autograd
//   refuses a backward that would read a saved tensor changed since (without it, a loss
//   that saved a weight, then prox_l1_ on that weight, then backward gave a silently
//   wrong gradient);
// - Autograd: the ops are not differentiable, so with grad mode on a written tensor that
//   requires grad is an error that names it (fastreg.dropout(..., inplace=True)
//   differentiates dropout_fwd_ through its own autograd.Function, which calls the op
//   with grad mode off; fastreg.penalty_grad_ and prox_l1_ run under no_grad).
// Both are unboxed: torch's boxed fallbacks would convert each Tensor[] to IValues and
// back on every call, a fifth of the penalty API's host time for 148 tensors.
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelow*
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "ops/op_handles.h"

namespace fastreg {
namespace {

void check_not_differentiated(at::TensorList written, const char* op, const char* name) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t i = 0; i < written.size(); ++i) {
    TORCH_CHECK(!written[i].requires_grad(), op, ": ", name, "[", i, "] requires grad, but ", op,
                " writes it in place and is not differentiable; call it under "
                "torch.no_grad()");
  }
}

void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

// ---- Autograd: the check, then the kernels below ----

void penalty_grad_autograd(at::TensorList grads, at::TensorList params, c10::ArrayRef<double> l1,
                           c10::ArrayRef<double> l2) {
  check_not_differentiated(grads, "fastreg::penalty_grad_", "grads");
  at::AutoDispatchBelowAutograd below;
  op::penalty_grad_().call(grads, params, l1, l2);
}

void prox_l1_autograd(at::TensorList params, c10::ArrayRef<double> threshold) {
  check_not_differentiated(params, "fastreg::prox_l1_", "params");
  at::AutoDispatchBelowAutograd below;
  op::prox_l1_().call(params, threshold);
}

at::Tensor dropout_fwd_inplace_autograd(at::Tensor& input, double p, const at::Tensor& rng_state,
                                        c10::string_view mask_mode) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && input.requires_grad()),
              "fastreg::dropout_fwd_: input requires grad, but the operator writes it in place "
              "and is not differentiable; use fastreg.dropout(input, p, inplace=True)");
  at::AutoDispatchBelowAutograd below;
  return op::dropout_fwd_().call(input, p, rng_state, mask_mode);
}

// ---- ADInplaceOrView: the version counters, then the device kernels ----

void penalty_grad_inplace(at::TensorList grads, at::TensorList params, c10::ArrayRef<double> l1,
                          c10::ArrayRef<double> l2) {
  bump_versions(grads);
  at::AutoDispatchBelowADInplaceOrView below;
  op::penalty_grad_().call(grads, params, l1, l2);
}

void prox_l1_inplace(at::TensorList params, c10::ArrayRef<double> threshold) {
  bump_versions(params);
  at::AutoDispatchBelowADInplaceOrView below;
  op::prox_l1_().call(params, threshold);
}

at::Tensor dropout_fwd_inplace_view(at::Tensor& input, double p, const at::Tensor& rng_state,
                                    c10::string_view mask_mode) {
  torch::autograd::impl::bump_version(input);
  at::AutoDispatchBelowADInplaceOrView below;
  return op::dropout_fwd_().call(input, p, rng_state, mask_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("penalty_grad_", &penalty_grad_autograd);
  m.impl("prox_l1_", &prox_l1_autograd);
  m.impl("dropout_fwd_", &dropout_fwd_inplace_autograd);
}

TORCH_LIBRARY_IMPL(fastreg, ADInplaceOrView, m) {
  m.impl("penalty_grad_", &penalty_grad_inplace);
  m.impl("prox_l1_", &prox_l1_inplace);
  m.impl("dropout_fwd_", &dropout_fwd_inplace_view);
}

}  // namespace fastreg
