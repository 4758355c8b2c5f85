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

#include <algorithm>
#include <numeric>
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

struct DropoutBackward0 : public Node {
  SavedVariable mask, rng_state;
  double p = 0.0;
  std::string mode;
  // The output's layout: mask bit i belongs to the output's i-th memory slot, so the
  // incoming gradient is given this layout before the mask is applied. `order` lists
  // the output's dimensions from the outermost in memory to the innermost.
  std::vector<c10::SymInt> stride;
  std::vector<int64_t> order;

  std::string name() const override { return "DropoutBackward0"; }

  variable_list apply(variable_list&& grads) override {
    return backward(std::move(grads), /*compiled=*/false);
  }

  // The gradient in the output's layout (the bool mask also wants its exact strides).
  // Compiled autograd traces the node with a placeholder gradient whose sizes and
  // strides are not the real one's: there no size may be read from it, and the layout
  // is made by permuting to the output's memory order, cloning and permuting back (the
  // same memory order; a size-1 dimension's stride may differ, which the bool mode's
  // check would refuse loudly), unconditionally.
  at::Tensor in_output_layout(const at::Tensor& grad, bool compiled) const {
    if (compiled) {
      std::vector<int64_t> inverse(order.size());
      for (size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
      return grad.permute(order).clone(at::MemoryFormat::Contiguous).permute(inverse);
    }
    if (grad.sym_strides() == c10::SymIntArrayRef(stride)) return grad;
    return at::empty_strided_symint(grad.sym_sizes(), stride, grad.options()).copy_(grad);
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
    args.collect(order);
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
  backward->order.resize(stride.size());
  std::iota(backward->order.begin(), backward->order.end(), 0);
  std::stable_sort(backward->order.begin(), backward->order.end(),
                   [&](int64_t a, int64_t b) { return stride[a] > stride[b]; });
  torch::autograd::set_history(out, node);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) { m.impl("dropout_fwd", &dropout_fwd_autograd); }

}  // namespace fastreg
