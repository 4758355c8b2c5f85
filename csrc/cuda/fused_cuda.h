// The host side of the fused ops' CUDA kernels (device code: device/fused_epilogues.cuh):
// the launches for one activation, instantiated in a translation unit per activation
// (fused_<activation>_cuda.cu) so that a build compiles them in parallel, and called by the
// ops in fused_cuda.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/dropout_launch.h"
#include "device/fused_epilogues.cuh"
#include "ops/fused.h"

namespace fastreg {

// out = [residual +] (keep ? act(x [+ bias]) * scale : 0) into f.buffers; a residual only
// with no activation (bias_dropout_add).
template <typename scalar_t, Activation A, bool kResidual>
void launch_fused_forward(const FusedForward& f, double p, const at::Tensor& rng_state) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ForwardBuffers& b = f.buffers;
  const scalar_t* x = b.src.const_data_ptr<scalar_t>();
  const scalar_t* r = kResidual ? f.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = b.out.mutable_data_ptr<scalar_t>();
  const device::ForwardEpilogue<scalar_t, A, kResidual> epilogue{
      x,
      f.bias.defined() ? f.bias.const_data_ptr<opmath_t>() : nullptr,
      r,
      out,
      dropout_scale<opmath_t>(p),
      bias_layout(b.out),
      lane_aligned<scalar_t>({x, r, out})};
  const device::MaybePhiloxBits philox = make_maybe_philox(rng_state, p);
  visit_sink(f.mode, b.mask, [&](const auto& sink) {
    launch_dropout_kernel<scalar_t>(b.out.numel(), philox, sink, epilogue);
  });
}

template <Activation A>
void fused_forward_cuda(const FusedForward& f, double p, const at::Tensor& rng_state) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, f.buffers.out.scalar_type(), "fastreg::fused_fwd", [&] {
        if constexpr (A == Activation::None) {
          if (f.residual.defined()) return launch_fused_forward<scalar_t, A, true>(f, p, rng_state);
        }
        launch_fused_forward<scalar_t, A, false>(f, p, rng_state);
      });
}

// grad_input = keep ? act'(x [+ bias]) * (grad * scale) : 0. input and bias_op (op-math)
// are read only for an activation.
template <Activation A>
void fused_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& input,
                         const at::Tensor& bias_op, const at::Tensor& mask, double p,
                         const at::Tensor& rng_state, MaskMode mode, const at::Tensor& grad_input) {
  const device::MaybePhiloxBits philox = make_maybe_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::fused_bwd", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        const scalar_t* x = A == Activation::None ? nullptr : input->const_data_ptr<scalar_t>();
        scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
        const device::BackwardEpilogue<scalar_t, A> epilogue{
            g,
            x,
            bias_op.defined() ? bias_op.const_data_ptr<opmath_t>() : nullptr,
            gi,
            dropout_scale<opmath_t>(p),
            bias_layout(grad),
            lane_aligned<scalar_t>({g, x, gi})};
        visit_source<scalar_t>(mode, mask, philox, [&](const auto& source) {
          launch_dropout_kernel<scalar_t>(grad.numel(), source, device::NoSink{}, epilogue);
        });
      });
}

// Each activation's launches are compiled once, in its own translation unit.
#define FASTREG_FUSED_CUDA_INSTANTIATE(A)                                                   \
  template void fused_forward_cuda<A>(const FusedForward&, double, const at::Tensor&);      \
  template void fused_backward_cuda<A>(const at::Tensor&, const c10::optional<at::Tensor>&, \
                                       const at::Tensor&, const at::Tensor&, double,        \
                                       const at::Tensor&, MaskMode, const at::Tensor&);

#define FASTREG_FUSED_CUDA_DECLARE(A)                                                              \
  extern template void fused_forward_cuda<A>(const FusedForward&, double, const at::Tensor&);      \
  extern template void fused_backward_cuda<A>(const at::Tensor&, const c10::optional<at::Tensor>&, \
                                              const at::Tensor&, const at::Tensor&, double,        \
                                              const at::Tensor&, MaskMode, const at::Tensor&);

FASTREG_FUSED_CUDA_DECLARE(Activation::None)
FASTREG_FUSED_CUDA_DECLARE(Activation::Relu)
FASTREG_FUSED_CUDA_DECLARE(Activation::Gelu)
FASTREG_FUSED_CUDA_DECLARE(Activation::GeluTanh)
FASTREG_FUSED_CUDA_DECLARE(Activation::Silu)

}  // namespace fastreg
