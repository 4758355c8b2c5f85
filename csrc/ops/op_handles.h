// Typed handles of fastreg's operators, for C++ code that calls them through the
// dispatcher (the autograd kernels and the penalty API's fast path): each is looked up
// once. The signatures are the schemas' in csrc/ops/schema.cpp.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

namespace fastreg {
namespace op {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline const auto& penalty() {
  static const auto handle =
      find<at::Tensor(at::TensorList, c10::ArrayRef<double>, c10::ArrayRef<double>)>(
          "fastreg::penalty");
  return handle;
}

inline const auto& penalty_backward() {
  static const auto handle =
      find<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, c10::ArrayRef<double>,
                                   c10::ArrayRef<double>)>("fastreg::penalty_backward");
  return handle;
}

inline const auto& penalty_grad_() {
  static const auto handle =
      find<void(at::TensorList, at::TensorList, c10::ArrayRef<double>, c10::ArrayRef<double>)>(
          "fastreg::penalty_grad_");
  return handle;
}

inline const auto& prox_l1_() {
  static const auto handle = find<void(at::TensorList, c10::ArrayRef<double>)>("fastreg::prox_l1_");
  return handle;
}

inline const auto& dropout_fwd() {
  static const auto handle = find<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, double, const at::Tensor&, c10::string_view)>("fastreg::dropout_fwd");
  return handle;
}

inline const auto& dropout_bwd() {
  static const auto handle =
      find<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                      c10::string_view)>("fastreg::dropout_bwd");
  return handle;
}

inline const auto& grad_with_strides() {
  static const auto handle =
      find<at::Tensor(const at::Tensor&, c10::SymIntArrayRef)>("fastreg::grad_with_strides");
  return handle;
}

inline const auto& dropout_fwd_() {
  static const auto handle =
      find<at::Tensor(at::Tensor&, double, const at::Tensor&, c10::string_view)>(
          "fastreg::dropout_fwd_");
  return handle;
}

}  // namespace op
}  // namespace fastreg
