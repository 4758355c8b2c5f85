// What fastreg's hand-written autograd nodes (penalty_autograd.cpp,
// dropout_autograd.cpp) share: making a node in the pointer type this torch's edges
// hold, and the compiled-autograd interface when this torch has it in the form used.
#pragma once

#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/function.h>
#include <torch/version.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>

// Compiled autograd (torch._dynamo.compiled_autograd) asks every node for its saved
// state; the interface in this form (const compiled_args) is torch >= 2.8's.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define FASTREG_COMPILED_AUTOGRAD 1
#include <torch/csrc/dynamo/compiled_autograd.h>
#endif

namespace fastreg {

// The node's pointer type: std::shared_ptr<Node> in older torch, c10::intrusive_ptr<Node>
// in newer (whatever an Edge holds).
using NodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;

template <typename N, typename Ptr = NodePtr>
Ptr make_node() {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return Ptr(std::make_shared<N>());
  } else {
    return Ptr(c10::make_intrusive<N>());
  }
}

// The nodes have no forward-mode derivative: while a forward-AD level is open, a dual
// input is refused (a plain output would silently drop its tangent). `name` is the
// argument's, indexed when it is a list.
inline void check_no_forward_grad(at::TensorList tensors, const char* op, const char* name,
                                  bool indexed) {
  // try_get_by_idx, not has_any_level, which torch 2.11 does not have
  if (!torch::autograd::ForwardADLevel::try_get_by_idx(/*idx=*/0)) return;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i]._fw_grad(/*level=*/0).defined(), op, ": ", name,
                indexed ? "[" + std::to_string(i) + "]" : std::string(),
                " has a forward-mode tangent, but ", op, " has no forward-mode derivative");
  }
}

}  // namespace fastreg
