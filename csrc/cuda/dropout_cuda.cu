// CUDA dropout ops: tensor glue and registration. The kernel, its keep-bit sources, mask
// sinks and dropout's epilogue are device code in device/dropout_kernel.cuh, launched
// through cuda/dropout_launch.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/dropout_launch.h"

namespace fastreg {
namespace {

// Keep bits from `source`, recorded by `sink`, applied to `in` when given.
template <typename scalar_t, typename Source, typename Sink>
void launch_dropout(const scalar_t* in, scalar_t* out, int64_t n, double p, const Source& source,
                    const Sink& sink) {
  if (in == nullptr) return launch_dropout_kernel<scalar_t>(n, source, sink, device::NoEpilogue{});
  const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
  if (lane_aligned<scalar_t>({in, out})) {
    launch_dropout_kernel<scalar_t>(n, source, sink,
                                    device::ScaleEpilogue<scalar_t, true>{in, out, scale});
  } else {
    launch_dropout_kernel<scalar_t>(n, source, sink,
                                    device::ScaleEpilogue<scalar_t, false>{in, out, scale});
  }
}

// dropout_fwd, or dropout_fwd_ with `inplace`: the same kernel run from src into out.
DropoutForward dropout_forward_cuda(const at::Tensor& input, double p, const at::Tensor& rng_state,
                                    c10::string_view mode_name, bool inplace) {
  const DeviceGuard guard(input.device());
  const DropoutForward f = prepare_dropout_forward(input, p, rng_state, mode_name, inplace);
  const ForwardBuffers& b = f.buffers;
  const device::PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd", [&] {
        visit_sink(f.mode, b.mask, [&](const auto& sink) {
          launch_dropout(b.src.const_data_ptr<scalar_t>(), b.out.mutable_data_ptr<scalar_t>(),
                         input.numel(), p, philox, sink);
        });
      });
  return f;
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cuda(const at::Tensor& input, double p,
                                                    const at::Tensor& rng_state,
                                                    c10::string_view mode_name) {
  const DropoutForward f = dropout_forward_cuda(input, p, rng_state, mode_name, false);
  return {f.buffers.out, f.buffers.mask};
}

// dropout_fwd_ returns the mask; the input holds the output.
at::Tensor dropout_fwd_inplace_cuda(at::Tensor& input, double p, const at::Tensor& rng_state,
                                    c10::string_view mode_name) {
  const DropoutForward f = dropout_forward_cuda(input, p, rng_state, mode_name, true);
  finish_inplace(input, f.buffers);
  return f.buffers.mask;
}

at::Tensor dropout_bwd_cuda(const at::Tensor& grad, const at::Tensor& mask, double p,
                            const at::Tensor& rng_state, c10::string_view mode_name) {
  const DeviceGuard guard(grad.device());
  const MaskMode mode = prepare_dropout_backward(grad, mask, p, rng_state, mode_name);
  at::Tensor grad_input = at::empty_like(grad);
  const device::PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::dropout_bwd", [&] {
        visit_source<scalar_t>(mode, mask, philox, [&](const auto& source) {
          launch_dropout(grad.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                         grad.numel(), p, source, device::NoSink{});
        });
      });
  return grad_input;
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, c10::IntArrayRef size, double p) {
  const DeviceGuard guard(rng_state.device());
  at::Tensor mask = prepare_dropout_mask(rng_state, size, p);
  launch_dropout<float>(nullptr, nullptr, mask.numel(), p, make_philox(rng_state, p),
                        device::BoolSink{mask.data_ptr<bool>()});
  return mask;
}

}  // namespace

FASTREG_CUDA_IMPL(m) {
  m.impl("dropout_fwd", &dropout_fwd_cuda);
  m.impl("dropout_fwd_", &dropout_fwd_inplace_cuda);
  m.impl("dropout_bwd", &dropout_bwd_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace fastreg
