// Autograd of fastreg::penalty, in C++ for every device.
//
// Why not torch.library.register_autograd, as for the other ops: its wrapper flattens
// the Tensor[] argument through pytree on every call, forward and backward, which
// costs several microseconds per tensor: about 1.2 ms for a 100-tensor model, more
// than the whole fused kernel, and the kernel's point is to replace a per-parameter
// Python loop. A C++ autograd Function takes the list as one at::TensorList.
// (penalty_backward's own autograd, the double backward, stays in fastreg/_ops.py.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_penalty(at::TensorList params, c10::ArrayRef<double> l1,
                        c10::ArrayRef<double> l2) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastreg::penalty", "")
          .typed<at::Tensor(at::TensorList, c10::ArrayRef<double>, c10::ArrayRef<double>)>();
  return op.call(params, l1, l2);
}

std::vector<at::Tensor> call_penalty_backward(const at::Tensor& grad_out, at::TensorList params,
                                              c10::ArrayRef<double> l1,
                                              c10::ArrayRef<double> l2) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastreg::penalty_backward", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                         c10::ArrayRef<double>, c10::ArrayRef<double>)>();
  return op.call(grad_out, params, l1, l2);
}

class PenaltyFunction : public torch::autograd::Function<PenaltyFunction> {
 public:
  // The list must come as at::TensorList: that is what makes each tensor an input of
  // the autograd node (ExtractVariables), followed by l1 and l2.
  static at::Tensor forward(AutogradContext* ctx, at::TensorList params,
                            c10::ArrayRef<double> l1, c10::ArrayRef<double> l2) {
    // Only the parameters that need a gradient are saved, and get one.
    std::vector<int64_t> wanted;
    variable_list saved;
    std::vector<double> wanted_l1, wanted_l2;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].requires_grad()) continue;
      wanted.push_back(static_cast<int64_t>(i));
      saved.push_back(params[i]);
      wanted_l1.push_back(l1.size() > i ? l1[i] : 0.0);  // sizes are checked by the kernel
      wanted_l2.push_back(l2.size() > i ? l2[i] : 0.0);
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(params.size());
    ctx->saved_data["wanted"] = wanted;
    ctx->saved_data["l1"] = wanted_l1;
    ctx->saved_data["l2"] = wanted_l2;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_penalty(params, l1, l2);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list params = ctx->get_saved_variables();
    const std::vector<int64_t> wanted = ctx->saved_data["wanted"].toIntVector();
    const std::vector<double> l1 = ctx->saved_data["l1"].toDoubleVector();
    const std::vector<double> l2 = ctx->saved_data["l2"].toDoubleVector();
    variable_list grads(ctx->saved_data["n"].toInt() + 2);  // params..., l1, l2
    if (wanted.empty() || !grad_outputs[0].defined()) return grads;
    std::vector<at::Tensor> computed;
    if (at::GradMode::is_enabled()) {
      // create_graph: through penalty_backward's autograd (the double backward)
      computed = call_penalty_backward(grad_outputs[0], params, l1, l2);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      computed = call_penalty_backward(grad_outputs[0], params, l1, l2);
    }
    for (size_t k = 0; k < wanted.size(); ++k) grads[wanted[k]] = computed[k];
    return grads;
  }
};

at::Tensor penalty_autograd(at::TensorList params, c10::ArrayRef<double> l1,
                            c10::ArrayRef<double> l2) {
  return PenaltyFunction::apply(params, l1, l2);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) { m.impl("penalty", &penalty_autograd); }

}  // namespace fastreg
