// CUDA dropout kernels: the kernel, keep-bit sources and mask sinks live in
// dropout_cuda_kernel.cuh, shared with the fused ops (fused_cuda.cu).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device/dropout_kernel.cuh"

namespace fastreg {
namespace {

template <typename scalar_t, int E, bool kAligned>
__device__ __forceinline__ void apply_bits(const scalar_t* in, scalar_t* out, int64_t e0,
                                           int64_t n, uint32_t bits,
                                           at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (kAligned && e0 + E <= n) {
    Vec<scalar_t, E> v = *reinterpret_cast<const Vec<scalar_t, E>*>(in + e0);
#pragma unroll
    for (int r = 0; r < E; ++r) {
      v.v[r] = ((bits >> r) & 1u) ? static_cast<scalar_t>(static_cast<opmath_t>(v.v[r]) * scale)
                                  : static_cast<scalar_t>(0);
    }
    *reinterpret_cast<Vec<scalar_t, E>*>(out + e0) = v;
  } else {
    for (int r = 0; r < E && e0 + r < n; ++r) {
      out[e0 + r] = ((bits >> r) & 1u)
                        ? static_cast<scalar_t>(static_cast<opmath_t>(in[e0 + r]) * scale)
                        : static_cast<scalar_t>(0);
    }
  }
}

// Dropout's epilogue: the kept elements of `in` scaled, the others 0. `in` may equal `out`.
template <typename scalar_t, bool kAligned>
struct ScaleEpilogue {
  const scalar_t* in;
  scalar_t* out;
  at::opmath_type<scalar_t> scale;

  template <int E>
  __device__ void apply(int64_t e0, int64_t n, uint32_t bits) const {
    apply_bits<scalar_t, E, kAligned>(in, out, e0, n, bits, scale);
  }
};

// Keep bits from `source`, recorded by `sink`, applied to `in` when given.
template <typename scalar_t, typename Source, typename Sink>
void launch_dropout(const scalar_t* in, scalar_t* out, int64_t n, double p, const Source& source,
                    const Sink& sink) {
  if (in == nullptr) return launch_dropout_kernel<scalar_t>(n, source, sink, NoEpilogue{});
  const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
  if (lane_aligned<scalar_t>({in, out})) {
    launch_dropout_kernel<scalar_t>(n, source, sink, ScaleEpilogue<scalar_t, true>{in, out, scale});
  } else {
    launch_dropout_kernel<scalar_t>(n, source, sink, ScaleEpilogue<scalar_t, false>{in, out, scale});
  }
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cuda(const at::Tensor& input, double p,
                                                    const at::Tensor& rng_state,
                                                    c10::string_view mode_name) {
  check_dropout_args(input, p);
  check_rng_state(rng_state, input);
  const MaskMode mode = parse_mask_mode(mode_name);
  const c10::cuda::CUDAGuard guard(input.device());
  ForwardBuffers b = make_forward_buffers(input, mode);
  const PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd", [&] {
    visit_sink(mode, b.mask, [&](const auto& sink) {
      launch_dropout(b.src.const_data_ptr<scalar_t>(), b.out.mutable_data_ptr<scalar_t>(),
                     input.numel(), p, philox, sink);
    });
  });
  return {b.out, b.mask};
}

at::Tensor dropout_bwd_cuda(const at::Tensor& grad, const at::Tensor& mask, double p,
                            const at::Tensor& rng_state, c10::string_view mode_name) {
  check_dropout_args(grad, p);
  check_rng_state(rng_state, grad);
  const MaskMode mode = parse_mask_mode(mode_name);
  check_backward_args(grad, mask, mode);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::empty_like(grad);
  const PhiloxBits philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::dropout_bwd", [&] {
    visit_source(mode, mask, philox, [&](const auto& source) {
      launch_dropout(grad.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                     grad.numel(), p, source, NoSink{});
    });
  });
  return grad_input;
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng_state, c10::IntArrayRef size, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
  const c10::cuda::CUDAGuard guard(rng_state.device());
  at::Tensor mask = at::empty(size, rng_state.options().dtype(at::kBool));
  check_rng_state(rng_state, mask);
  launch_dropout<float>(nullptr, nullptr, mask.numel(), p, make_philox(rng_state, p),
                        BoolSink{mask.data_ptr<bool>()});
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("dropout_fwd", &dropout_fwd_cuda);
  m.impl("dropout_bwd", &dropout_bwd_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace fastreg
