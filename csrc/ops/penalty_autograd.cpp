// Autograd of fastreg::penalty, in C++ for every device.
//
// Why not torch.library.register_autograd, as for the other ops: its wrapper flattens
// the Tensor[] argument through pytree on every call, forward and backward, which
// costs several microseconds per tensor: about 1.2 ms for a 100-tensor model, more
// than the whole fused kernel, and the kernel's point is to replace a per-parameter
// Python loop. A C++ autograd Function takes the list as one at::TensorList.
// penalty_backward's own autograd (the double backward) is here too: see
// penalty_backward_autograd.
// The node is written out (not torch::autograd::Function<T>, whose CppNode<T> keeps
// per-input metadata, a set of the inputs and boxed saved data: a microsecond or more per
// tensor) and named PenaltyBackward0 (a CppNode's grad_fn prints as "<PenaltyFunction>>").
#include <ATen/SavedTensorHooks.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <sstream>
#include <utility>
#include <vector>

#include "ops/autograd_node.h"
#include "ops/op_handles.h"
#include "ops/penalty.h"

namespace fastreg {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The parameters are kept as plain tensors with the versions they had in the forward:
// what a SavedVariable keeps of an input (the tensor itself), without its construction,
// which looks up saved-tensor hooks for every tensor (a tenth of the call on 1,000 tiny
// tensors). The version check and the backward-twice error are SavedVariable's own, by
// hand. While saved-tensor hooks are active (torch.autograd.graph.saved_tensors_hooks,
// save_on_cpu) the node keeps SavedVariables, which run them.
//
// d(penalty)/d(params[i]) = grad_out * slope_i(params[i]), for the parameters that
// required grad in the forward (the node's next edges are all params, in order).
struct PenaltyBackward0 : public Node {
  std::vector<at::Tensor> kept;      // the parameters that need a gradient (no hooks) ...
  std::vector<uint32_t> versions;    // ... and their versions in the forward
  std::vector<SavedVariable> saved;  // the same, while saved-tensor hooks were active
  bool released = false;
  std::vector<int64_t> wanted;  // their indices in params
  std::vector<double> l1, l2;   // their coefficients

  std::string name() const override { return "PenaltyBackward0"; }

  // SavedVariable::unpack's checks and error messages, for the kept tensors
  void check_kept() const {
    TORCH_CHECK(!released, torch::autograd::ERR_BACKWARD_TWICE);
    for (size_t k = 0; k < kept.size(); ++k) {
      const at::Tensor& p = kept[k];
      const uint32_t version = p._version();
      if (version == versions[k]) continue;
      std::ostringstream message;
      message << "one of the variables needed for gradient computation has been modified "
                 "by an inplace operation: ["
              << p.toString() << " " << p.sizes() << "]";
      if (p.grad_fn()) {
        message << ", which is output " << p.output_nr() << " of " << p.grad_fn()->name() << ",";
      }
      message << " is at version " << version << "; expected version " << versions[k]
              << " instead.";
      if (!torch::autograd::AnomalyMode::is_enabled()) {
        message << " Hint: enable anomaly detection to find the operation that failed to "
                   "compute its gradient, with torch.autograd.set_detect_anomaly(True).";
      } else {
        message << " Hint: the backtrace further above shows the operation that failed to "
                   "compute its gradient. The variable in question was changed in there "
                   "or anywhere later. Good luck!";
      }
      TORCH_CHECK(false, message.str());
    }
  }

  // The gradients; check_versions false where compiled autograd swapped in its proxies
  // (compiled_args checked the kept tensors).
  variable_list run(const at::Tensor& grad_out, bool check_versions) {
    variable_list grads(num_outputs());
    if (wanted.empty() || !grad_out.defined()) return grads;
    variable_list unpacked;
    if (saved.empty()) {
      if (check_versions) check_kept();
    } else {
      unpacked.reserve(saved.size());
      for (const SavedVariable& s : saved) unpacked.push_back(s.unpack());
    }
    const at::TensorList params = saved.empty() ? at::TensorList(kept) : at::TensorList(unpacked);
    std::vector<at::Tensor> computed;
    if (at::GradMode::is_enabled()) {
      // create_graph: through penalty_backward's autograd (penalty_backward_autograd)
      computed = op::penalty_backward().call(grad_out, params, l1, l2);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      computed = op::penalty_backward().call(grad_out, params, l1, l2);
    }
    for (size_t k = 0; k < wanted.size(); ++k) grads[wanted[k]] = std::move(computed[k]);
    return grads;
  }

  variable_list apply(variable_list&& grad_outputs) override {
    return run(grad_outputs[0], /*check_versions=*/true);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& s : saved) s.reset_data();
    kept.clear();
    released = true;
  }

#ifdef FASTREG_COMPILED_AUTOGRAD
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    check_kept();  // what collecting a SavedVariable checks (it unpacks it)
    args.collect(kept);
    args.collect(saved, false);
    args.collect(wanted);
    args.collect(l1);
    args.collect(l2);
  }

  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    swap.before(kept);
    swap.before(saved);
    variable_list result = run(inputs[0], /*check_versions=*/false);
    swap.after(saved);
    swap.after(kept);
    return result;
  }
#endif
};

at::Tensor penalty_autograd(at::TensorList params, c10::ArrayRef<double> l1,
                            c10::ArrayRef<double> l2) {
  check_no_forward_grad(params, "fastreg::penalty", "params", true);
  at::Tensor result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = op::penalty().call(params, l1, l2);
  }
  if (!at::GradMode::is_enabled()) return result;
  // one read of each parameter's autograd state: its edge (none when it needs no grad)
  torch::autograd::edge_list edges;
  edges.reserve(params.size());
  size_t wanted = 0;
  for (const at::Tensor& p : params) {
    if (p.requires_grad()) {
      edges.push_back(torch::autograd::impl::gradient_edge(p));
      ++wanted;
    } else {
      edges.emplace_back();
    }
  }
  if (wanted == 0) return result;
  NodePtr node = make_node<PenaltyBackward0>();
  auto* backward = static_cast<PenaltyBackward0*>(node.get());
  backward->set_next_edges(std::move(edges));
  // what SavedVariable's constructor asks: are saved-tensor hooks active?
  const bool hooked =
      at::SavedTensorDefaultHooks::is_enabled() &&
      torch::autograd::Engine::get_default_engine().get_default_saved_variable_hooks();
  // reserved: growing `saved` by reallocation moves and destroys SavedVariables
  if (hooked) {
    backward->saved.reserve(wanted);
  } else {
    backward->kept.reserve(wanted);
    backward->versions.reserve(wanted);
  }
  backward->wanted.reserve(wanted);
  backward->l1.reserve(wanted);
  backward->l2.reserve(wanted);
  for (size_t i = 0; i < params.size(); ++i) {
    if (!backward->next_edge(i).is_valid()) continue;
    if (hooked) {
      backward->saved.emplace_back(params[i], /*is_output=*/false);
    } else {
      backward->kept.push_back(params[i]);
      backward->versions.push_back(params[i]._version());
    }
    backward->wanted.push_back(static_cast<int64_t>(i));
    backward->l1.push_back(i < l1.size() ? l1[i] : 0.0);  // (a fake kernel checks no sizes)
    backward->l2.push_back(i < l2.size() ? l2[i] : 0.0);
  }
  torch::autograd::set_history(result, node);
  return result;
}

// penalty_backward with grad mode on and an input that requires grad (create_graph, or
// torch.func.grad, which runs every backward so): the same gradients as differentiable
// tensor operations, in fastreg/reference.py's order (penalty_backward, penalty_slope),
// whose own autograd gives every higher derivative. A Python formula registered with
// torch.library.register_autograd would not do: torch.func's transforms refuse the
// autograd.Function it is wrapped in (pytorch/pytorch#168393), so torch.func.grad of a
// loss with a penalty failed. Otherwise the kernels, below autograd.
std::vector<at::Tensor> penalty_backward_autograd(const at::Tensor& grad_out, at::TensorList params,
                                                  c10::ArrayRef<double> l1,
                                                  c10::ArrayRef<double> l2) {
  bool differentiable = grad_out.requires_grad();
  for (const at::Tensor& p : params) differentiable = differentiable || p.requires_grad();
  if (!at::GradMode::is_enabled() || !differentiable) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op::penalty_backward().call(grad_out, params, l1, l2);
  }
  check_penalty_args(params, l1, l2);
  const at::Tensor g = penalty_grad_out(grad_out, params.empty() ? grad_out : params[0]);
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = params[i];
    if (l1[i] == 0.0 && l2[i] == 0.0) {
      grads.push_back(at::zeros_like(w));
      continue;
    }
    // l1 * sign(w) + 2 * l2 * w in the op-math type, a zero coefficient's term left out
    const at::Tensor x = w.to(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    at::Tensor slope;
    if (l1[i] != 0.0 && l2[i] != 0.0) {
      slope = x.sign() * l1[i] + x * (2.0 * l2[i]);
    } else if (l1[i] != 0.0) {
      slope = x.sign() * l1[i];
    } else {
      slope = x * (2.0 * l2[i]);
    }
    grads.push_back((g.to(x.scalar_type()) * slope).to(w.scalar_type()));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("penalty", &penalty_autograd);
  m.impl("penalty_backward", &penalty_backward_autograd);
}

}  // namespace fastreg
