// Host-side pieces that the CPU and CUDA penalty glue share: the checks the
// dispatcher-level ops make and the dense buffers each kernel reads and writes. The
// elementwise formulas are in device/penalty_math.h.

#pragma once

#include <ATen/ATen.h>
#include <c10/util/MaybeOwned.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "device/penalty_math.h"

namespace fastreg {

// ---- Checks the ops make (the Python front end makes them first, with names) ----

inline bool is_penalty_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_penalty_tensors(at::TensorList tensors, const char* name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(is_penalty_dtype(t.scalar_type()), name, "[", i,
                     "] must be float16, bfloat16, float32 or float64, but got ", t.scalar_type());
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, "[", i, "] must be a strided tensor");
    TORCH_CHECK(t.device() == tensors[0].device(), "all tensors must be on one device, but ", name,
                "[0] is on ", tensors[0].device(), " and ", name, "[", i, "] on ", t.device());
  }
}

inline void check_coefficients(c10::ArrayRef<double> values, size_t n, const char* name) {
  TORCH_CHECK_VALUE(values.size() == n, name, " must give one value per tensor (", n, "), but has ",
                    values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK_VALUE(values[i] >= 0.0 && std::isfinite(values[i]), name,
                      " must be non-negative and finite, but ", name, "[", i, "] is ", values[i]);
  }
}

inline void check_penalty_args(at::TensorList params, c10::ArrayRef<double> l1,
                               c10::ArrayRef<double> l2) {
  check_penalty_tensors(params, "params");
  check_coefficients(l1, params.size(), "l1");
  check_coefficients(l2, params.size(), "l2");
}

// float32, or float64 when any tensor is float64.
inline at::ScalarType penalty_result_type(at::TensorList params) {
  for (const at::Tensor& p : params) {
    if (p.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// The incoming gradient of the penalty's 0-dim output, as float32 or float64; the
// kernels read it from memory (no host synchronisation on CUDA).
inline at::Tensor penalty_grad_out(const at::Tensor& grad_out, const at::Tensor& like) {
  TORCH_CHECK(grad_out.numel() == 1, "grad_out must hold one element, but has ", grad_out.numel());
  TORCH_CHECK(grad_out.device() == like.device(), "grad_out must be on ", like.device(),
              ", but is on ", grad_out.device());
  const bool keep = grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kDouble;
  return (keep ? grad_out : grad_out.to(at::kFloat)).reshape({});
}

// ---- Buffers ----

// The buffers below borrow the caller's tensors (c10::MaybeOwned) and own only the
// temporaries they make: a copy of a tensor would cost a reference-count round trip and,
// for a tensor with a Python object, a reference to that object under the GIL (0.1 us a
// tensor, a large share of the host time of a call on many small tensors).
using TensorRef = c10::MaybeOwned<at::Tensor>;

// A tensor whose elements the kernels can walk in memory order: itself when dense
// (any strides), else a contiguous copy. Only the order of a sum depends on it.
inline TensorRef dense_source(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? TensorRef::borrowed(t)
                                          : TensorRef::owned(t.contiguous());
}

// One tensor's share of the reduction.
struct ReductionInput {
  TensorRef src;  // dense
  double l1, l2;
};

// The tensors the value reads: empty tensors and tensors whose coefficients are both
// zero contribute nothing and are not read.
inline std::vector<ReductionInput> reduction_inputs(at::TensorList params, c10::ArrayRef<double> l1,
                                                    c10::ArrayRef<double> l2) {
  std::vector<ReductionInput> inputs;
  inputs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0 || (l1[i] == 0.0 && l2[i] == 0.0)) continue;
    inputs.push_back({dense_source(params[i]), l1[i], l2[i]});
  }
  return inputs;
}

// One tensor's share of an elementwise op: `in` is read and `out` written element by
// element in memory order, so both are dense with the same strides (out may be in).
// When out is a temporary, `write_back` receives it after the kernels.
struct ElementwiseJob {
  TensorRef in, out, write_back;
  double a, b;  // (l1, 2 * l2) for gradients, (threshold, 0) for prox
};

inline void finish_jobs(const std::vector<ElementwiseJob>& jobs) {
  for (const ElementwiseJob& job : jobs) {
    if (job.write_back->defined()) job.write_back->copy_(*job.out);
  }
}

// penalty_backward: one gradient per parameter, with the parameter's layout when it is
// dense (empty_like keeps it, as the fake kernel does), contiguous otherwise.
inline std::vector<ElementwiseJob> backward_jobs(at::TensorList params, c10::ArrayRef<double> l1,
                                                 c10::ArrayRef<double> l2,
                                                 std::vector<at::Tensor>& grads) {
  std::vector<ElementwiseJob> jobs;
  jobs.reserve(params.size());
  grads.clear();
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    grads.push_back(at::empty_like(p));
    const at::Tensor& out = grads.back();
    if (p.numel() == 0) continue;
    if (!p.is_non_overlapping_and_dense() || p.strides() != out.strides()) {
      out.copy_(p);  // the kernel then runs in place on out
      jobs.push_back(
          {TensorRef::borrowed(out), TensorRef::borrowed(out), TensorRef(), l1[i], 2.0 * l2[i]});
    } else {
      jobs.push_back(
          {TensorRef::borrowed(p), TensorRef::borrowed(out), TensorRef(), l1[i], 2.0 * l2[i]});
    }
  }
  return jobs;
}

// penalty_grad_: grads[i] += slope(params[i]) in place. A gradient whose layout differs
// from its parameter's goes through a temporary with the parameter's dense layout.
inline void check_grads_length(at::TensorList grads, at::TensorList params) {
  TORCH_CHECK_VALUE(grads.size() == params.size(),
                    "grads and params must have the same "
                    "length, but have ",
                    grads.size(), " and ", params.size());
}

inline std::vector<ElementwiseJob> add_grad_jobs(at::TensorList grads, at::TensorList params,
                                                 c10::ArrayRef<double> l1,
                                                 c10::ArrayRef<double> l2) {
  check_grads_length(grads, params);
  check_penalty_tensors(grads, "grads");
  std::vector<ElementwiseJob> jobs;
  jobs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(
        g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device(),
        "grads[", i, "] must have the shape, dtype and device of params[", i, "]");
    if (p.numel() == 0 || (l1[i] == 0.0 && l2[i] == 0.0)) continue;
    if (p.is_non_overlapping_and_dense() && g.is_non_overlapping_and_dense() &&
        p.strides() == g.strides()) {
      jobs.push_back(
          {TensorRef::borrowed(p), TensorRef::borrowed(g), TensorRef(), l1[i], 2.0 * l2[i]});
    } else {
      TensorRef in = dense_source(p);
      at::Tensor tmp = at::empty_like(*in);
      tmp.copy_(g);
      jobs.push_back({std::move(in), TensorRef::owned(std::move(tmp)), TensorRef::borrowed(g),
                      l1[i], 2.0 * l2[i]});
    }
  }
  return jobs;
}

// prox_l1_: in place; threshold 0 is the identity and is skipped.
inline std::vector<ElementwiseJob> prox_jobs(at::TensorList params,
                                             c10::ArrayRef<double> threshold) {
  std::vector<ElementwiseJob> jobs;
  jobs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0 || threshold[i] == 0.0) continue;
    if (p.is_non_overlapping_and_dense()) {
      jobs.push_back(
          {TensorRef::borrowed(p), TensorRef::borrowed(p), TensorRef(), threshold[i], 0.0});
    } else {
      at::Tensor tmp = p.contiguous();
      jobs.push_back({TensorRef::owned(at::Tensor(tmp)), TensorRef::owned(std::move(tmp)),
                      TensorRef::borrowed(p), threshold[i], 0.0});
    }
  }
  return jobs;
}

}  // namespace fastreg
