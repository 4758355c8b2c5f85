// Autograd of fastreg::dropout_fwd, in C++ for every device: the node keeps the mask
// (nothing in recompute mode), the rng_state and the output's strides, and its backward
// is dropout_bwd. Written out, as penalty's is, because torch.library.register_autograd's
// Python wrapper cost about 30 us a call, forward and backward: more than the kernels
// below 2^18 elements on the CPU. (dropout_bwd's own autograd, the double backward, and
// the in-place form's autograd.Function stay in Python: fastreg/_ops.py, dropout.py.)
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops/autograd_node.h"
#include "ops/op_handles.h"

namespace fastreg {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// grad copied into a new tensor of its sizes and `stride`. Compiled autograd traces the
// node with a placeholder for the incoming gradient (torch.zeros([0, 123456789]) in torch
// 2.14), bound to the real gradient's place in the graph: what the node computes from the
// placeholder's sizes would be recorded with them, and a layout made inline (a permute
// by the output's dimension order, as before) failed on every output that is not 2-d. An
// operator is recorded with its arguments and runs on the real gradient. On the
// placeholder itself (no elements; its rank is not the output's) it returns a copy.
at::Tensor grad_with_strides_kernel(const at::Tensor& grad, c10::SymIntArrayRef stride) {
  if (grad.dim() != static_cast<int64_t>(stride.size())) {
    TORCH_CHECK(grad.sym_numel() == 0, "fastreg::grad_with_strides: grad has ", grad.dim(),
                " dimensions, but stride has ", stride.size());
    return grad.clone();
  }
  at::Tensor out = at::empty_strided_symint(grad.sym_sizes(), stride, grad.options());
  TORCH_CHECK(out.is_non_overlapping_and_dense(), "fastreg::grad_with_strides: stride ", stride,
              " is not a dense, non-overlapping layout of grad's sizes ", grad.sym_sizes());
  return out.copy_(grad);
}

struct DropoutBackward0 : public Node {
  SavedVariable mask, rng_state;
  double p = 0.0;
  std::string mode;
  // The output's strides: mask bit i belongs to the output's i-th memory slot, so the
  // incoming gradient is given this layout before the mask is applied.
  std::vector<c10::SymInt> stride;

  std::string name() const override { return "DropoutBackward0"; }

  variable_list apply(variable_list&& grads) override {
    return backward(std::move(grads), /*compiled=*/false);
  }

  // The gradient in the output's layout (the bool mask also wants its exact strides).
  // Under compiled autograd the copy is recorded as the operator grad_with_strides
  // (see grad_with_strides_kernel above); eagerly its kernel is called directly.
  at::Tensor in_output_layout(const at::Tensor& grad, bool compiled) const {
    if (compiled) return op::grad_with_strides().call(grad, stride);
    if (grad.sym_strides() == c10::SymIntArrayRef(stride)) return grad;
    return grad_with_strides_kernel(grad, stride);
  }

  variable_list backward(variable_list&& grads, bool compiled) {
    // The mask output has no gradient; an undefined one for the output stays undefined
    // (no zero tensor of the input's size is made for it).
    if (!grads[0].defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const at::Tensor grad = in_output_layout(grads[0], compiled);
    const at::Tensor saved_mask = mask.unpack(), saved_state = rng_state.unpack();
    if (at::GradMode::is_enabled()) {
      // create_graph: through dropout_bwd's autograd (the double backward)
      return {op::dropout_bwd().call(grad, saved_mask, p, saved_state, mode)};
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {op::dropout_bwd().call(grad, saved_mask, p, saved_state, mode)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    mask.reset_data();
    rng_state.reset_data();
  }

#ifdef FASTREG_COMPILED_AUTOGRAD
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(mask, false);
    args.collect(rng_state, false);
    args.collect(p);
    args.collect(mode);
    // The strides as plain ints (collected SymInts would be the graph's size inputs):
    // a node is made by an eager forward, whose strides are concrete.
    for (const c10::SymInt& s : stride) {
      const std::optional<int64_t> value = s.maybe_as_int();
      TORCH_CHECK(value.has_value(),
                  "fastreg::dropout_fwd: compiled autograd of an output "
                  "with symbolic strides is not supported");
      args.collect(*value);
    }
  }

  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    swap.before(mask);
    swap.before(rng_state);
    variable_list result = backward(variable_list(inputs), /*compiled=*/true);
    swap.after(mask);
    swap.after(rng_state);
    return result;
  }
#endif
};

std::tuple<at::Tensor, at::Tensor> dropout_fwd_autograd(const at::Tensor& input, double p,
                                                        const at::Tensor& rng_state,
                                                        c10::string_view mode) {
  check_no_forward_grad(input, "fastreg::dropout_fwd", "input", false);
  std::tuple<at::Tensor, at::Tensor> result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = op::dropout_fwd().call(input, p, rng_state, mode);
  }
  if (!at::GradMode::is_enabled() || !input.requires_grad()) return result;
  at::Tensor& out = std::get<0>(result);
  const at::Tensor& mask = std::get<1>(result);
  NodePtr node = make_node<DropoutBackward0>();
  auto* backward = static_cast<DropoutBackward0*>(node.get());
  backward->set_next_edges(torch::autograd::collect_next_edges(input));
  backward->mask = SavedVariable(mask, /*is_output=*/false);  // not differentiable
  backward->rng_state = SavedVariable(rng_state, /*is_output=*/false);
  backward->p = p;
  backward->mode = std::string(mode);
  const c10::SymIntArrayRef stride = out.sym_strides();
  backward->stride.assign(stride.begin(), stride.end());
  torch::autograd::set_history(out, node);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) { m.impl("dropout_fwd", &dropout_fwd_autograd); }

TORCH_LIBRARY_IMPL(fastreg, CompositeExplicitAutograd, m) {
  m.impl("grad_with_strides", &grad_with_strides_kernel);
}

}  // namespace fastreg
