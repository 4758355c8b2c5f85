// The fused ops' epilogues for the dropout kernel (dropout_kernel.cuh): the element math of
// fused_math.h applied to a lane's E elements. Device code only: the host side is
// csrc/cuda/fused_cuda.h.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "device/dropout_kernel.cuh"
#include "device/fused_math.h"

namespace fastreg {
namespace device {

// The bias values of a lane's elements e0 .. e0+E-1: one division per lane, then steps.
template <int E, typename T>
__device__ __forceinline__ void bias_of_lane(const T* bias, BiasLayout layout, int64_t e0, T b[E]) {
  const int64_t outer = e0 / layout.stride;
  int64_t k = e0 - outer * layout.stride;
  int64_t j = outer % layout.size;
#pragma unroll
  for (int r = 0; r < E; ++r) {
    b[r] = bias[j];
    if (++k == layout.stride) {
      k = 0;
      if (++j == layout.size) j = 0;
    }
  }
}

// ---- Forward: out = [residual +] (keep ? act(x [+ bias]) * scale : 0) ----

template <typename scalar_t, Activation A, bool kResidual>
struct ForwardEpilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;     // may equal out (a non-dense input gathered into out)
  const opmath_t* bias;  // null: no bias
  const scalar_t* residual;
  scalar_t* out;
  opmath_t scale;
  BiasLayout layout;
  bool aligned;  // x, residual and out allow a lane's vector accesses

  __device__ __forceinline__ scalar_t element(scalar_t xv, opmath_t b, scalar_t rv,
                                              bool keep) const {
    opmath_t z = static_cast<opmath_t>(xv);
    if (bias != nullptr) z = add_rn(z, b);
    opmath_t t = keep ? mul_rn(Act<A>::forward(z), scale) : opmath_t(0);
    if constexpr (kResidual) t = add_rn(static_cast<opmath_t>(rv), t);
    return static_cast<scalar_t>(t);
  }

  template <int E>
  __device__ void apply(int64_t e0, int64_t n, uint32_t bits) const {
    using V = Vec<scalar_t, E>;
    opmath_t b[E] = {};
    if (bias != nullptr) bias_of_lane<E>(bias, layout, e0, b);
    if (aligned && e0 + E <= n) {
      const V xv = load_vector<V>(x + e0);
      V rv = xv;
      if constexpr (kResidual) rv = load_vector<V>(residual + e0);
      V o;
#pragma unroll
      for (int r = 0; r < E; ++r) o.v[r] = element(xv.v[r], b[r], rv.v[r], (bits >> r) & 1u);
      store_vector(out + e0, o);
    } else {
#pragma unroll
      for (int r = 0; r < E; ++r) {  // unrolled, so that b stays in registers
        if (e0 + r < n) {
          const scalar_t rv = kResidual ? residual[e0 + r] : scalar_t(0);
          out[e0 + r] = element(x[e0 + r], b[r], rv, (bits >> r) & 1u);
        }
      }
    }
  }
};

// ---- Backward: grad_input = keep ? act'(z) * (grad * scale) : 0 ----

template <typename scalar_t, Activation A>
struct BackwardEpilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  const scalar_t* x;     // null when A is None
  const opmath_t* bias;  // null: no bias in z
  scalar_t* grad_input;
  opmath_t scale;
  BiasLayout layout;
  bool aligned;  // grad, x and grad_input allow a lane's vector accesses

  __device__ __forceinline__ scalar_t element(scalar_t g, scalar_t xv, opmath_t b,
                                              bool keep) const {
    if (!keep) return scalar_t(0);
    opmath_t v = mul_rn(static_cast<opmath_t>(g), scale);
    if constexpr (A != Activation::None) {
      opmath_t z = static_cast<opmath_t>(xv);
      if (bias != nullptr) z = add_rn(z, b);
      v = Act<A>::backward(z, v);
    }
    return static_cast<scalar_t>(v);
  }

  template <int E>
  __device__ void apply(int64_t e0, int64_t n, uint32_t bits) const {
    using V = Vec<scalar_t, E>;
    opmath_t b[E] = {};
    if (A != Activation::None && bias != nullptr) bias_of_lane<E>(bias, layout, e0, b);
    if (aligned && e0 + E <= n) {
      const V gv = load_vector<V>(grad + e0);
      V xv = gv;
      if constexpr (A != Activation::None) xv = load_vector<V>(x + e0);
      V o;
#pragma unroll
      for (int r = 0; r < E; ++r) o.v[r] = element(gv.v[r], xv.v[r], b[r], (bits >> r) & 1u);
      store_vector(grad_input + e0, o);
    } else {
#pragma unroll
      for (int r = 0; r < E; ++r) {  // unrolled, so that b stays in registers
        if (e0 + r < n) {
          const scalar_t xv = A != Activation::None ? x[e0 + r] : scalar_t(0);
          grad_input[e0 + r] = element(grad[e0 + r], xv, b[r], (bits >> r) & 1u);
        }
      }
    }
  }
};

}  // namespace device
}  // namespace fastreg
