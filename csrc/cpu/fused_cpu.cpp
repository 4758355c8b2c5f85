// CPU kernels of the fused ops: dropout's tile loop and keep-flag sources and sinks
// (dropout_tiles.h) with a fused elementwise step, the element math of device/fused_math.h.
// Backward writes the input gradient and, in the same pass, sums the bias gradient into
// per-chunk partial rows that are then added in chunk order: no atomics, and the result
// depends on the shape only, not on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/dropout_tiles.h"
#include "cpu/huge_pages.h"
#include "ops/fused.h"

namespace fastreg {
namespace {

// Philox, or every flag set when p's threshold is 0 (eval mode and p = 0 run the fused
// ops with p = 0): the contract keeps every element then, so Philox can be skipped.
struct FusedPhiloxKeep {
  PhiloxKeep philox;
  bool keep_all;

  void operator()(int64_t tile, int64_t count, uint8_t* keep) const {
    if (keep_all) {
      std::memset(keep, 1, count);
    } else {
      philox(tile, count, keep);
    }
  }
};

FusedPhiloxKeep make_philox(const at::Tensor& rng_state, double p) {
  const KeepRule rule = KeepRule::from_p(p);
  return FusedPhiloxKeep{PhiloxKeep{read_rng_state(rng_state), rule},
                         !rule.drop_all && rule.threshold == 0};
}

// Calls f(offset, length, j, contiguous) for the runs of elements first .. first+count-1
// that share a bias pattern: with `contiguous` element first+offset+k takes bias j+k (the
// last dimension is innermost in memory), otherwise every element of the run takes bias j.
template <typename F>
void for_each_bias_run(int64_t first, int64_t count, BiasLayout layout, F&& f) {
  if (layout.stride == 1) {
    int64_t j = first % layout.size;
    for (int64_t off = 0; off < count; j = 0) {
      const int64_t len = std::min(count - off, layout.size - j);
      f(off, len, j, true);
      off += len;
    }
  } else {
    int64_t k = first % layout.stride, j = layout.index(first);
    for (int64_t off = 0; off < count; k = 0, j = j + 1 == layout.size ? 0 : j + 1) {
      const int64_t len = std::min(count - off, layout.stride - k);
      f(off, len, j, false);
      off += len;
    }
  }
}

// The bias of a run as a pointer to `len` op-math values: into the bias itself when the
// run is contiguous, else `row` filled with the run's one value.
template <typename T>
const T* bias_of_run(const T* bias, int64_t j, bool contiguous, int64_t len, T* row) {
  if (contiguous) return bias + j;
  std::fill(row, row + len, bias[j]);
  return row;
}

// ---- Forward: out = [residual +] (keep ? act(x [+ bias]) * scale : 0) ----

// kBias is a template parameter: gcc does not unswitch a loop whose body holds an inlined
// activation, and a test inside it would keep the loop from vectorizing.
template <typename scalar_t, Activation A, bool kResidual, bool kBias>
FASTREG_TARGET_CLONES void forward_run(const scalar_t* x, const at::opmath_type<scalar_t>* bias,
                                       const scalar_t* residual, scalar_t* out,
                                       const uint8_t* __restrict keep, int64_t len,
                                       at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t e = 0; e < len; ++e) {
    opmath_t z = load_op(x[e]);
    if constexpr (kBias) z = add_rn(z, bias[e]);
    opmath_t t = masked(mul_rn(Act<A>::forward(z), scale), keep[e]);
    if constexpr (kResidual) t = add_rn(load_op(residual[e]), t);
    out[e] = store_op<scalar_t>(t);
  }
}

// float16 where the CPU has F16C: the run's inputs converted to float (exactly), the
// float loop (the same float operations as the float16 one), the result rounded once to
// float16 (round to nearest even, as store_op): the same bits, in vectors.
template <typename scalar_t, Activation A, bool kResidual, bool kBias>
void forward_dispatch(const scalar_t* x, const at::opmath_type<scalar_t>* bias,
                      const scalar_t* residual, scalar_t* out, const uint8_t* keep, int64_t len,
                      at::opmath_type<scalar_t> scale) {
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (have_f16c() && len <= kTile) {
      alignas(64) float xf[kTile], rf[kTile], of[kTile];
      half_to_float_n(x, xf, len);
      if constexpr (kResidual) half_to_float_n(residual, rf, len);
      forward_run<float, A, kResidual, kBias>(xf, bias, kResidual ? rf : nullptr, of, keep, len,
                                              scale);
      float_to_half_n(of, out, len);
      return;
    }
  }
#endif
  forward_run<scalar_t, A, kResidual, kBias>(x, bias, residual, out, keep, len, scale);
}

template <typename scalar_t, Activation A, bool kResidual>
struct ForwardStep {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;     // may equal out (a non-dense input gathered into out)
  const opmath_t* bias;  // null: no bias
  const scalar_t* residual;
  scalar_t* out;
  opmath_t scale;
  BiasLayout layout;

  void operator()(int64_t /*chunk*/, int64_t first, int64_t count, const uint8_t* keep) const {
    if (bias == nullptr) {
      forward_dispatch<scalar_t, A, kResidual, false>(x + first, nullptr,
                                                      kResidual ? residual + first : nullptr,
                                                      out + first, keep, count, scale);
      return;
    }
    alignas(64) opmath_t row[kTile];
    for_each_bias_run(first, count, layout,
                      [&](int64_t off, int64_t len, int64_t j, bool contiguous) {
                        const int64_t e = first + off;
                        forward_dispatch<scalar_t, A, kResidual, true>(
                            x + e, bias_of_run(bias, j, contiguous, len, row),
                            kResidual ? residual + e : nullptr, out + e, keep + off, len, scale);
                      });
  }
};

template <typename scalar_t, Activation A, bool kResidual>
void run_forward(const ForwardBuffers& b, const at::Tensor& bias, const at::Tensor& residual,
                 double p, MaskMode mode, const at::Tensor& rng_state) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (!b.out.is_same(b.src)) advise_huge_pages(b.out);  // new, not yet written
  const ForwardStep<scalar_t, A, kResidual> step{
      b.src.const_data_ptr<scalar_t>(),
      bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr,
      kResidual ? residual.const_data_ptr<scalar_t>() : nullptr,
      b.out.mutable_data_ptr<scalar_t>(),
      dropout_scale<opmath_t>(p),
      bias_layout(b.out)};
  const FusedPhiloxKeep philox = make_philox(rng_state, p);
  visit_sink(mode, b.mask, [&](const auto& sink) {
    for_each_tile(b.out.numel(), kGrainTiles, philox, sink, step);
  });
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_fwd_cpu(const at::Tensor& input,
                                                            const c10::optional<at::Tensor>& bias,
                                                            const at::Tensor& residual, double p,
                                                            const at::Tensor& rng_state,
                                                            c10::string_view mode_name) {
  const FusedForward f = prepare_fused_forward(input, bias, &residual, p, rng_state, mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastreg::bias_dropout_add_fwd", [&] {
                                    run_forward<scalar_t, Activation::None, true>(
                                        f.buffers, f.bias, f.residual, p, f.mode, rng_state);
                                  });
  return {f.buffers.out, f.buffers.mask};
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_fwd_cpu(const at::Tensor& input,
                                                            const c10::optional<at::Tensor>& bias,
                                                            double p, c10::string_view activation,
                                                            const at::Tensor& rng_state,
                                                            c10::string_view mode_name) {
  const Activation act = parse_activation(activation);
  const FusedForward f = prepare_fused_forward(input, bias, nullptr, p, rng_state, mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fastreg::bias_act_dropout_fwd", [&] {
                                    visit_activation(act, [&](auto tag) {
                                      run_forward<scalar_t, decltype(tag)::value, false>(
                                          f.buffers, f.bias, at::Tensor(), p, f.mode, rng_state);
                                    });
                                  });
  return {f.buffers.out, f.buffers.mask};
}

// ---- Backward: grad_input = keep ? act'(z) * (grad * scale) : 0, and its column sums ----

template <typename scalar_t, Activation A, bool kBias>
FASTREG_TARGET_CLONES void backward_run(const scalar_t* grad, const scalar_t* x,
                                        const at::opmath_type<scalar_t>* bias, scalar_t* grad_input,
                                        const uint8_t* __restrict keep, int64_t len,
                                        at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t e = 0; e < len; ++e) {
    opmath_t v = mul_rn(load_op(grad[e]), scale);
    if constexpr (A != Activation::None) {
      opmath_t z = load_op(x[e]);
      if constexpr (kBias) z = add_rn(z, bias[e]);
      v = Act<A>::backward(z, v);
    }
    grad_input[e] = store_op<scalar_t>(masked(v, keep[e]));
  }
}

// float16 with F16C, as forward_dispatch.
template <typename scalar_t, Activation A, bool kBias>
void backward_dispatch(const scalar_t* grad, const scalar_t* x,
                       const at::opmath_type<scalar_t>* bias, scalar_t* grad_input,
                       const uint8_t* keep, int64_t len, at::opmath_type<scalar_t> scale) {
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (have_f16c() && len <= kTile) {
      alignas(64) float gf[kTile], xf[kTile], of[kTile];
      half_to_float_n(grad, gf, len);
      if constexpr (A != Activation::None) half_to_float_n(x, xf, len);
      backward_run<float, A, kBias>(gf, A != Activation::None ? xf : nullptr, bias, of, keep, len,
                                    scale);
      float_to_half_n(of, grad_input, len);
      return;
    }
  }
#endif
  backward_run<scalar_t, A, kBias>(grad, x, bias, grad_input, keep, len, scale);
}

// Adds a run of the input gradient (its dtype values, in op-math) to the chunk's partial
// bias-gradient row at acc: element k to acc[k] for a contiguous run, all to acc[0] else.
template <typename scalar_t>
FASTREG_TARGET_CLONES void accumulate_run(const scalar_t* v, int64_t len,
                                          at::opmath_type<scalar_t>* acc, bool contiguous) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (contiguous) {
    for (int64_t e = 0; e < len; ++e) acc[e] += load_op(v[e]);
  } else {
    opmath_t sum = 0;
    for (int64_t e = 0; e < len; ++e) sum += load_op(v[e]);
    acc[0] += sum;
  }
}

template <typename scalar_t, Activation A>
struct BackwardStep {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  const scalar_t* x;     // null when A is None
  const opmath_t* bias;  // null: no bias in z
  scalar_t* grad_input;
  opmath_t scale;
  BiasLayout layout;
  opmath_t* partials;  // chunks x layout.size, or null: no bias gradient

  void operator()(int64_t chunk, int64_t first, int64_t count, const uint8_t* keep) const {
    if (bias == nullptr && partials == nullptr) {
      backward_dispatch<scalar_t, A, false>(grad + first, x ? x + first : nullptr, nullptr,
                                            grad_input + first, keep, count, scale);
      return;
    }
    alignas(64) opmath_t row[kTile];
    opmath_t* acc = partials ? partials + chunk * layout.size : nullptr;
    for_each_bias_run(
        first, count, layout, [&](int64_t off, int64_t len, int64_t j, bool contiguous) {
          const int64_t e = first + off;
          if (bias != nullptr) {
            backward_dispatch<scalar_t, A, true>(grad + e, x + e,
                                                 bias_of_run(bias, j, contiguous, len, row),
                                                 grad_input + e, keep + off, len, scale);
          } else {
            backward_dispatch<scalar_t, A, false>(grad + e, x ? x + e : nullptr, nullptr,
                                                  grad_input + e, keep + off, len, scale);
          }
          if (acc != nullptr) accumulate_run(grad_input + e, len, acc + j, contiguous);
        });
  }
};

// Chunks for the bias-gradient reduction, from the shape only: at most 128 (threads to
// spare on any machine) and at most numel / (8 n), so that the partial rows hold at most
// an eighth as many values as the gradient.
int64_t reduction_chunk_tiles(int64_t numel, int64_t n_bias) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(128, numel / (8 * n_bias)));
  return std::max(kGrainTiles, (tiles + max_chunks - 1) / max_chunks);
}

// grad_bias[j] = sum over chunks, in chunk order, of partials[chunk][j]; rounded once.
template <typename scalar_t>
void sum_partials(const at::opmath_type<scalar_t>* partials, int64_t chunks, int64_t n,
                  scalar_t* grad_bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(end - begin, opmath_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      const opmath_t* row = partials + c * n + begin;
      for (int64_t j = 0; j < end - begin; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < end - begin; ++j) grad_bias[begin + j] = static_cast<scalar_t>(acc[j]);
  });
}

std::tuple<at::Tensor, at::Tensor> bias_act_dropout_bwd_cpu(
    const at::Tensor& grad, const c10::optional<at::Tensor>& input,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mask, double p,
    c10::string_view activation, const at::Tensor& rng_state, c10::string_view mode_name,
    bool bias_grad) {
  const FusedBackward checked = prepare_fused_backward(grad, input, bias, mask, p, activation,
                                                       rng_state, mode_name, bias_grad);
  const MaskMode mode = checked.mode;
  const Activation act = checked.act;
  at::Tensor grad_input = at::empty_like(grad);
  advise_huge_pages(grad_input);
  const int64_t n_bias = grad.dim() >= 1 ? grad.size(-1) : 0;
  at::Tensor grad_bias = at::empty({bias_grad ? n_bias : 0}, grad.options());
  const at::Tensor bias_op = act == Activation::None ? at::Tensor() : opmath_bias(bias);
  const BiasLayout layout = bias_layout(grad);
  const int64_t n = grad.numel();
  const int64_t chunk_tiles = bias_grad ? reduction_chunk_tiles(n, layout.size) : kGrainTiles;
  const int64_t chunks = ((n + kTile - 1) / kTile + chunk_tiles - 1) / chunk_tiles;
  const FusedPhiloxKeep philox = make_philox(rng_state, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::bias_act_dropout_bwd", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        at::Tensor partials;
        if (bias_grad) {
          partials = at::zeros({chunks, layout.size},
                               grad.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
        }
        visit_activation(act, [&](auto tag) {
          constexpr Activation A = decltype(tag)::value;
          const BackwardStep<scalar_t, A> step{
              grad.const_data_ptr<scalar_t>(),
              A == Activation::None ? nullptr : input->const_data_ptr<scalar_t>(),
              bias_op.defined() ? bias_op.const_data_ptr<opmath_t>() : nullptr,
              grad_input.mutable_data_ptr<scalar_t>(),
              dropout_scale<opmath_t>(p),
              layout,
              bias_grad ? partials.mutable_data_ptr<opmath_t>() : nullptr};
          visit_keep(mode, mask, philox, [&](const auto& keep_fn) {
            for_each_tile(n, chunk_tiles, keep_fn, NoSink{}, step);
          });
        });
        if (bias_grad) {
          sum_partials(partials.const_data_ptr<opmath_t>(), chunks, n_bias,
                       grad_bias.mutable_data_ptr<scalar_t>());
        }
      });
  return {grad_input, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("bias_dropout_add_fwd", &bias_dropout_add_fwd_cpu);
  m.impl("bias_act_dropout_fwd", &bias_act_dropout_fwd_cpu);
  m.impl("bias_act_dropout_bwd", &bias_act_dropout_bwd_cpu);
}

}  // namespace fastreg
