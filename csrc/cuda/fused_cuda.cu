// CUDA kernels of the fused ops: dropout's kernel, keep-bit sources and sinks
// (dropout_cuda_kernel.cuh) with fused epilogues, the element math of fused.h. The bias
// gradient is torch's sum over the input gradient (at::sum: a tree reduction whose
// cross-block pass runs in a fixed order, no float atomics, deterministic), in op-math.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "device/dropout_kernel.cuh"
#include "ops/fused.h"

namespace fastreg {
namespace {

// Philox, or every bit set when p's threshold is 0 (eval mode and p = 0 run the fused
// ops with p = 0): the contract keeps every element then, so Philox can be skipped.
struct FusedPhiloxBits {
  PhiloxBits philox;
  bool keep_all;

  __device__ void prepare() {
    if (!keep_all) philox.prepare();
  }
  template <int E>
  __device__ uint32_t get(int64_t e0, int64_t n) const {
    return keep_all ? (1u << E) - 1u : philox.template get<E>(e0, n);
  }
};

FusedPhiloxBits make_fused_philox(const at::Tensor& rng_state, double p) {
  const KeepRule rule = KeepRule::from_p(p);
  return FusedPhiloxBits{make_philox(rng_state, p), !rule.drop_all && rule.threshold == 0};
}

// The bias values of a lane's elements e0 .. e0+E-1: one division per lane, then steps.
template <int E, typename T>
__device__ __forceinline__ void bias_of_lane(const T* bias, BiasLayout layout, int64_t e0,
                                             T b[E]) {
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
  const scalar_t* x;  // may equal out (a non-dense input gathered into out)
  const opmath_t* bias;  // null: no bias
  const scalar_t* residual;
  scalar_t* out;
  opmath_t scale;
  BiasLayout layout;
  bool aligned;  // x, residual and out allow a lane's vector accesses

  __device__ __forceinline__ scalar_t element(scalar_t xv, opmath_t b, scalar_t rv, bool keep) const {
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
      const V xv = *reinterpret_cast<const V*>(x + e0);
      V rv = xv;
      if constexpr (kResidual) rv = *reinterpret_cast<const V*>(residual + e0);
      V o;
#pragma unroll
      for (int r = 0; r < E; ++r) o.v[r] = element(xv.v[r], b[r], rv.v[r], (bits >> r) & 1u);
      *reinterpret_cast<V*>(out + e0) = o;
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

template <typename scalar_t, Activation A, bool kResidual>
void launch_forward(const ForwardBuffers& b, const at::Tensor& bias, const at::Tensor& residual,
                    double p, MaskMode mode, const at::Tensor& rng_state) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x = b.src.const_data_ptr<scalar_t>();
  const scalar_t* r = kResidual ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = b.out.mutable_data_ptr<scalar_t>();
  const ForwardEpilogue<scalar_t, A, kResidual> epilogue{
      x, bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr, r, out,
      dropout_scale<opmath_t>(p), bias_layout(b.out), lane_aligned<scalar_t>({x, r, out})};
  const FusedPhiloxBits philox = make_fused_philox(rng_state, p);
  visit_sink(mode, b.mask, [&](const auto& sink) {
    launch_dropout_kernel<scalar_t>(b.out.numel(), philox, sink, epilogue);
  });
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
    double p, const at::Tensor& rng_state, c10::string_view mode_name) {
  const c10::cuda::CUDAGuard guard(input.device());
  const FusedForward f = prepare_fused_forward(input, bias, &residual, p, rng_state, mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::bias_dropout_add_fwd", [&] {
    launch_forward<scalar_t, Activation::None, true>(f.buffers, f.bias, f.residual, p, f.mode, rng_state);
  });
  return {f.buffers.out, f.buffers.mask};
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& bias, double p,
    c10::string_view activation, const at::Tensor& rng_state, c10::string_view mode_name) {
  const Activation act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(input.device());
  const FusedForward f = prepare_fused_forward(input, bias, nullptr, p, rng_state, mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::bias_act_dropout_fwd", [&] {
    visit_activation(act, [&](auto tag) {
      launch_forward<scalar_t, decltype(tag)::value, false>(f.buffers, f.bias, at::Tensor(), p, f.mode, rng_state);
    });
  });
  return {f.buffers.out, f.buffers.mask};
}

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

  __device__ __forceinline__ scalar_t element(scalar_t g, scalar_t xv, opmath_t b, bool keep) const {
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
      const V gv = *reinterpret_cast<const V*>(grad + e0);
      V xv = gv;
      if constexpr (A != Activation::None) xv = *reinterpret_cast<const V*>(x + e0);
      V o;
#pragma unroll
      for (int r = 0; r < E; ++r) o.v[r] = element(gv.v[r], xv.v[r], b[r], (bits >> r) & 1u);
      *reinterpret_cast<V*>(grad_input + e0) = o;
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

// The bias gradient: grad_input summed over all but its last dimension, in op-math,
// rounded once.
at::Tensor sum_to_bias(const at::Tensor& grad_input) {
  if (grad_input.dim() == 1) return grad_input.clone(at::MemoryFormat::Contiguous);
  const auto op = grad_input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> dims(grad_input.dim() - 1);
  std::iota(dims.begin(), dims.end(), int64_t{0});
  return at::sum(grad_input, dims, /*keepdim=*/false, op).to(grad_input.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_bwd_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& input,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mask, double p,
    c10::string_view activation, const at::Tensor& rng_state, c10::string_view mode_name,
    bool bias_grad) {
  check_dropout_args(grad, p);
  check_rng_state(rng_state, grad);
  const MaskMode mode = parse_mask_mode(mode_name);
  const Activation act = parse_activation(activation);
  check_backward_args(grad, mask, mode);
  check_fused_backward_args(grad, input, bias, act, bias_grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::empty_like(grad);
  const at::Tensor bias_op = act == Activation::None ? at::Tensor() : opmath_bias(bias);
  const FusedPhiloxBits philox = make_fused_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::bias_act_dropout_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    visit_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* x = A == Activation::None ? nullptr : input->const_data_ptr<scalar_t>();
      scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
      const BackwardEpilogue<scalar_t, A> epilogue{
          g, x, bias_op.defined() ? bias_op.const_data_ptr<opmath_t>() : nullptr, gi,
          dropout_scale<opmath_t>(p), bias_layout(grad), lane_aligned<scalar_t>({g, x, gi})};
      visit_source(mode, mask, philox, [&](const auto& source) {
        launch_dropout_kernel<scalar_t>(grad.numel(), source, NoSink{}, epilogue);
      });
    });
  });
  at::Tensor grad_bias = bias_grad ? sum_to_bias(grad_input) : at::empty({0}, grad.options());
  return {grad_input, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("bias_dropout_add_fwd", &bias_dropout_add_fwd_cuda);
  m.impl("bias_act_dropout_fwd", &bias_act_dropout_fwd_cuda);
  m.impl("bias_act_dropout_bwd", &bias_act_dropout_bwd_cuda);
}

}  // namespace fastreg
