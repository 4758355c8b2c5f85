// CPU dropout kernels: the tile loop, keep-flag sources and mask sinks live in
// dropout_tiles.h, shared with the fused ops (fused_cpu.cpp).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/dropout_tiles.h"
#include "cpu/huge_pages.h"

namespace fastreg {
namespace {

// dropout_fwd, or dropout_fwd_ with `inplace`: the same tile loop run from src into out.
DropoutForward dropout_forward_cpu(const at::Tensor& input, double p, const at::Tensor& rng_state,
                                   c10::string_view mode_name, bool inplace) {
  const DropoutForward f = prepare_dropout_forward(input, p, rng_state, mode_name, inplace);
  const ForwardBuffers& b = f.buffers;
  if (!b.out.is_same(b.src)) advise_huge_pages(b.out);  // new, not yet written
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fastreg::dropout_fwd", [&] {
        visit_sink(f.mode, b.mask, [&](const auto& sink) {
          dropout_tiles(b.src.const_data_ptr<scalar_t>(), b.out.mutable_data_ptr<scalar_t>(),
                        input.numel(), p, philox, sink);
        });
      });
  return f;
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd_cpu(const at::Tensor& input, double p,
                                                   const at::Tensor& rng_state,
                                                   c10::string_view mode_name) {
  const DropoutForward f = dropout_forward_cpu(input, p, rng_state, mode_name, false);
  return {f.buffers.out, f.buffers.mask};
}

// dropout_fwd_ returns the mask; the input holds the output.
at::Tensor dropout_fwd_inplace_cpu(at::Tensor& input, double p, const at::Tensor& rng_state,
                                   c10::string_view mode_name) {
  const DropoutForward f = dropout_forward_cpu(input, p, rng_state, mode_name, true);
  finish_inplace(input, f.buffers);
  return f.buffers.mask;
}

at::Tensor dropout_bwd_cpu(const at::Tensor& grad, const at::Tensor& mask, double p,
                           const at::Tensor& rng_state, c10::string_view mode_name) {
  const MaskMode mode = prepare_dropout_backward(grad, mask, p, rng_state, mode_name);
  at::Tensor grad_input = at::empty_like(grad);
  advise_huge_pages(grad_input);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fastreg::dropout_bwd", [&] {
        const scalar_t* in = grad.const_data_ptr<scalar_t>();
        scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
        const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
        // A stored mask is applied a chunk at a time, straight from the mask (the bits, or
        // the bool flags as they are): no per-tile copy into flags, no per-tile call.
        if (mode == MaskMode::Bits) {
          const uint32_t* words = reinterpret_cast<const uint32_t*>(mask.const_data_ptr<int32_t>());
          for_each_chunk(grad.numel(), kGrainTiles, [&](int64_t, int64_t first, int64_t count) {
            apply_bits(in + first, out + first, words + first / 32, count, scale);
          });
        } else if (mode == MaskMode::Bool) {
          const uint8_t* flags = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
          for_each_chunk(grad.numel(), kGrainTiles, [&](int64_t, int64_t first, int64_t count) {
            apply_keep(in + first, out + first, flags + first, count, scale);
          });
        } else {
          dropout_tiles(in, out, grad.numel(), p, philox, NoSink{});
        }
      });
  return grad_input;
}

at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, c10::IntArrayRef size, double p) {
  at::Tensor mask = prepare_dropout_mask(rng_state, size, p);
  advise_huge_pages(mask);
  const PhiloxKeep philox{read_rng_state(rng_state), KeepRule::from_p(p)};
  dropout_tiles<float>(nullptr, nullptr, mask.numel(), p, philox, BoolSink{mask.data_ptr<bool>()});
  return mask;
}

}  // namespace

namespace {
PhiloxIsa best_philox_isa() {
#if FASTREG_X86_CLONES
  if (__builtin_cpu_supports("avx512f")) return PhiloxIsa::Avx512;
  if (__builtin_cpu_supports("avx2")) return PhiloxIsa::Avx2;
#endif
  return PhiloxIsa::Portable;
}

bool philox_isa_supported(PhiloxIsa isa) {
  return static_cast<int>(isa) <= static_cast<int>(best_philox_isa());
}

PhiloxIsa initial_philox_isa() {
  PhiloxIsa isa = best_philox_isa();
  if (const char* env = std::getenv("FASTREG_CPU_PHILOX")) {
    const std::string name(env);
    for (PhiloxIsa c : {PhiloxIsa::Portable, PhiloxIsa::Avx2, PhiloxIsa::Avx512}) {
      if (name == philox_isa_name(c) && philox_isa_supported(c)) isa = c;
    }
  }
  return isa;
}

std::atomic<int> g_philox_isa{static_cast<int>(initial_philox_isa())};
}  // namespace

PhiloxIsa philox_isa() {
  return static_cast<PhiloxIsa>(g_philox_isa.load(std::memory_order_relaxed));
}

const char* philox_isa_name(PhiloxIsa isa) {
  switch (isa) {
    case PhiloxIsa::Avx512:
      return "avx512";
    case PhiloxIsa::Avx2:
      return "avx2";
    case PhiloxIsa::Portable:
      break;
  }
  return "portable";
}

bool set_philox_isa(const std::string& name) {
  for (PhiloxIsa c : {PhiloxIsa::Portable, PhiloxIsa::Avx2, PhiloxIsa::Avx512}) {
    if (name == philox_isa_name(c) && philox_isa_supported(c)) {
      g_philox_isa.store(static_cast<int>(c), std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

#if FASTREG_X86_CLONES
namespace {
// C++ function multiversioning with the clones' targets: the loader's choice among them
// follows the same rules as for target_clones (macros such as __AVX2__ are per file, not
// per clone, so one body cannot tell).
__attribute__((target("default"))) const char* clone_name() { return "x86-64"; }
__attribute__((target("arch=x86-64-v3"))) const char* clone_name() { return "x86-64-v3"; }
__attribute__((target("arch=x86-64-v4"))) const char* clone_name() { return "x86-64-v4"; }
}  // namespace

const char* cpu_clone() { return clone_name(); }
#else
const char* cpu_clone() { return "portable"; }
#endif

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("dropout_fwd", &dropout_fwd_cpu);
  m.impl("dropout_fwd_", &dropout_fwd_inplace_cpu);
  m.impl("dropout_bwd", &dropout_bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace fastreg
