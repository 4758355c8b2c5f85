// CPU penalty kernels. The tensors are laid end to end in one concatenated element
// space, cut into chunks of kChunk elements; threads take whole chunks. A chunk's
// partial sum depends only on its elements (each tensor piece in it is summed with
// kLanes lane accumulators, lanes combined by a fixed tree, pieces added in order),
// and the partials are added in chunk order: the value has the same bits for any
// number of threads, and from run to run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/huge_pages.h"
#include "cpu/parallel_claim.h"
#include "ops/penalty.h"

// setup.py compiles this with -ffp-contract=off: the gradients are promised bit-exact
// against one-rounding-per-op torch ops, which an fma would break.

namespace fastreg {
namespace {

constexpr int64_t kChunk = 4096;      // elements: fixed chunk boundaries, whatever the threads
constexpr int64_t kGrainChunks = 16;  // chunks a thread takes at least (64K elements)

// A tensor's place in the concatenated element space.
struct Segment {
  const void* in;
  void* out;  // elementwise ops only
  int64_t begin, numel;
  double a, b;
  at::ScalarType dtype;
};

// Calls f(segment, first, count) for the pieces of [lo, hi), first local to the segment.
template <typename F>
void for_each_piece(const std::vector<Segment>& segments, int64_t lo, int64_t hi, F&& f) {
  auto it = std::upper_bound(segments.begin(), segments.end(), lo,
                             [](int64_t x, const Segment& s) { return x < s.begin + s.numel; });
  for (; it != segments.end() && it->begin < hi; ++it) {
    const int64_t first = std::max(lo, it->begin) - it->begin;
    const int64_t last = std::min(hi, it->begin + it->numel) - it->begin;
    f(*it, first, last - first);
  }
}

// Runs body(chunk, segment, first, count) over the pieces of every chunk. Threads claim
// groups of kGrainChunks chunks as parallel_claim says; which thread runs a chunk never
// changes what the chunk computes.
template <typename Body>
void parallel_chunks(const std::vector<Segment>& segments, int64_t total, const Body& body) {
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  parallel_claim((chunks + kGrainChunks - 1) / kGrainChunks, [&](int64_t g) {
    const int64_t last = std::min(chunks, (g + 1) * kGrainChunks);
    for (int64_t c = g * kGrainChunks; c < last; ++c) {
      for_each_piece(
          segments, c * kChunk, std::min(total, (c + 1) * kChunk),
          [&](const Segment& s, int64_t first, int64_t count) { body(c, s, first, count); });
    }
  });
}

// ---- Reduction ----

// Lane accumulators: 32 float lanes are 4 AVX2 vectors for each of the two sums (8
// independent add chains hide the add latency); 16 double lanes likewise.
template <typename acc_t>
constexpr int kLanes = sizeof(acc_t) == 4 ? 32 : 16;

#if FASTREG_X86_CLONES
// The float16 lane sums with F16C, accumulated in registers: lane l is element l % 8 of
// vector l / 8 (the same lanes, and the same float operations in the same order, as the
// loop below). Converting into a stack buffer first made each 64-byte load of it wait on
// two 32-byte stores that the CPU could not forward: 4.5x slower than bfloat16.
// Returns the number of elements summed (a multiple of 32); a and q get the lane sums.
__attribute__((target("avx2,f16c"))) inline int64_t abs_sq_sums_f16c(const c10::Half* x, int64_t n,
                                                                     float* a, float* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 abs_sum[4], sq_sum[4];
  for (int k = 0; k < 4; ++k) abs_sum[k] = sq_sum[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i + 8 * k)));
      abs_sum[k] = _mm256_add_ps(abs_sum[k], _mm256_andnot_ps(sign, v));
      sq_sum[k] = _mm256_add_ps(sq_sum[k], _mm256_mul_ps(v, v));
    }
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(a + 8 * k, abs_sum[k]);
    _mm256_storeu_ps(q + 8 * k, sq_sum[k]);
  }
  return i;
}
#endif

// sum|x| and sum x**2 of n elements in acc_t. Element i goes to lane i % kLanes; the
// lanes are combined by a fixed pairwise tree.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTREG_TARGET_CLONES void abs_sq_sums(const scalar_t* x, int64_t n, acc_t* s1, acc_t* s2) {
  constexpr int L = kLanes<acc_t>;
  acc_t a[L] = {}, q[L] = {};
  int64_t i = 0;
  bool done = false;
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // gcc does not vectorize float16 conversions
    static_assert(L == 32, "abs_sq_sums_f16c keeps 32 lanes");
    if (have_f16c()) {
      i = abs_sq_sums_f16c(x, n, a, q);
      done = true;
    }
  }
#endif
  if (!done) {
    for (; i + L <= n; i += L) {
      for (int l = 0; l < L; ++l) {
        const acc_t v = load_op(x[i + l]);
        a[l] += std::abs(v);
        q[l] += v * v;
      }
    }
  }
  for (int l = 0; i + l < n; ++l) {
    const acc_t v = load_op(x[i + l]);
    a[l] += std::abs(v);
    q[l] += v * v;
  }
  // Below L elements the lanes from the first power of two >= n on are +0, and adding
  // +0 to a lane (a sum of non-negative terms) leaves its bits: the tree starts there.
  int top = L;
  if (n < L) {
    top = 1;
    while (top < n) top *= 2;
  }
  for (int width = top / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      a[l] += a[l + width];
      q[l] += q[l + width];
    }
  }
  *s1 = a[0];
  *s2 = q[0];
}

// A piece's share of the value, in double.
double piece_value(const Segment& s, int64_t first, int64_t count) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, s.dtype, "fastreg::penalty", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        acc_t s1, s2;
        abs_sq_sums(static_cast<const scalar_t*>(s.in) + first, count, &s1, &s2);
        double value = 0.0;
        if (s.a != 0.0) value += s.a * static_cast<double>(s1);
        if (s.b != 0.0) value += s.b * static_cast<double>(s2);
        return value;
      });
}

at::Tensor penalty_cpu(at::TensorList params, c10::ArrayRef<double> l1, c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  TORCH_CHECK_VALUE(!params.empty(), "params must not be empty (its device gives the result's)");
  const std::vector<ReductionInput> inputs = reduction_inputs(params, l1, l2);
  std::vector<Segment> segments;
  segments.reserve(inputs.size());
  int64_t total = 0;
  for (const ReductionInput& input : inputs) {
    segments.push_back({input.src->const_data_ptr(), nullptr, total, input.src->numel(), input.l1,
                        input.l2, input.src->scalar_type()});
    total += input.src->numel();
  }
  std::vector<double> partials((total + kChunk - 1) / kChunk, 0.0);
  double* partial = partials.data();
  parallel_chunks(segments, total, [&](int64_t c, const Segment& s, int64_t first, int64_t count) {
    partial[c] += piece_value(s, first, count);  // only chunk c's thread writes it
  });
  double value = 0.0;
  for (const double p : partials) value += p;
  at::Tensor out = at::empty({}, params[0].options().dtype(penalty_result_type(params)));
  if (out.scalar_type() == at::kDouble) {
    *out.mutable_data_ptr<double>() = value;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

// ---- Elementwise ops ----

template <typename scalar_t, bool kL1, bool kL2, typename acc_t = at::opmath_type<scalar_t>>
FASTREG_TARGET_CLONES void grad_loop(const scalar_t* w, scalar_t* out, int64_t n, acc_t g, acc_t l1,
                                     acc_t two_l2) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t slope = penalty_slope(load_op(w[i]), l1, two_l2, kL1, kL2);
    out[i] = store_op<scalar_t>(mul_rn(g, slope));
  }
}

template <typename scalar_t, bool kL1, bool kL2, typename acc_t = at::opmath_type<scalar_t>>
FASTREG_TARGET_CLONES void add_grad_loop(const scalar_t* w, scalar_t* out, int64_t n, acc_t l1,
                                         acc_t two_l2) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t slope = penalty_slope(load_op(w[i]), l1, two_l2, kL1, kL2);
    out[i] = store_op<scalar_t>(add_rn(load_op(out[i]), slope));
  }
}

// In place through one pointer, so that the compiler sees no aliasing to guard against.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTREG_TARGET_CLONES void prox_loop(scalar_t* w, int64_t n, acc_t t) {
  for (int64_t i = 0; i < n; ++i) {
    w[i] = store_op<scalar_t>(soft_threshold(load_op(w[i]), t));
  }
}

template <typename F>
void visit_terms(bool use_l1, bool use_l2, F&& f) {
  if (use_l1 && use_l2) return f(std::true_type{}, std::true_type{});
  if (use_l1) return f(std::true_type{}, std::false_type{});
  return f(std::false_type{}, std::true_type{});  // the both-zero case never gets here
}

// One op over `count` elements of in and out (the same pointer for Prox).
template <typename scalar_t>
void elementwise_run(ElementwiseMode mode, double g, double a_, double b_, const scalar_t* in,
                     scalar_t* out, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(a_), b = static_cast<acc_t>(b_);
  if (mode == ElementwiseMode::Prox) return prox_loop<scalar_t>(out, count, a);
  if (a_ == 0.0 && b_ == 0.0) {  // only Grad gets tensors without a term: gradient 0
    std::fill(out, out + count, static_cast<scalar_t>(0));
    return;
  }
  visit_terms(a_ != 0.0, b_ != 0.0, [&](auto use_l1, auto use_l2) {
    if (mode == ElementwiseMode::Grad) {
      grad_loop<scalar_t, decltype(use_l1)::value, decltype(use_l2)::value>(
          in, out, count, static_cast<acc_t>(g), a, b);
    } else {
      add_grad_loop<scalar_t, decltype(use_l1)::value, decltype(use_l2)::value>(in, out, count, a,
                                                                                b);
    }
  });
}

#if FASTREG_X86_CLONES
// float16 with F16C: gcc does not vectorize _Float16 conversions (each is one scalar
// vcvtph2ps / vcvtps2ph), so the float16 loops are written with AVX2 intrinsics, 8
// elements a vector: converted to float (float16's op-math type), the same float
// operations as penalty_slope and soft_threshold (each rounded once, no fma), rounded back
// once: the same bits as the float16 loop. (They converted blocks of 512 through stack
// buffers before: 1.4x the bfloat16 time, the buffers' traffic outweighing the work.)
#define FASTREG_F16C __attribute__((target("avx2,f16c"), always_inline)) inline

FASTREG_F16C __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FASTREG_F16C void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// penalty_slope, 8 lanes: sign = float(w > 0) - float(w < 0) (0 for nan and both zeros).
template <bool kL1, bool kL2>
FASTREG_F16C __m256 slope8(__m256 w, __m256 l1, __m256 two_l2) {
  if constexpr (kL1) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(w, zero, _CMP_GT_OQ), one),
                                      _mm256_and_ps(_mm256_cmp_ps(w, zero, _CMP_LT_OQ), one));
    if constexpr (kL2) {
      return _mm256_add_ps(_mm256_mul_ps(l1, sign), _mm256_mul_ps(two_l2, w));
    } else {
      return _mm256_mul_ps(l1, sign);
    }
  } else {
    return _mm256_mul_ps(two_l2, w);
  }
}

// soft_threshold, 8 lanes. vmaxps(a, b) is a > b ? a : b and vminps(a, b) is a < b ? a : b
// (b when either is nan, or both are zeros), so max(-t, w) is the first select,
// w < -t ? -t : w, bit for bit; min(t, that) is the second, w > t ? t : clamped, because
// t >= 0 (check_coefficients): w > t leaves clamped = w, and w <= t leaves clamped <= t.
FASTREG_F16C __m256 soft_threshold8(__m256 w, __m256 t) {
  const __m256 minus_t = _mm256_xor_ps(t, _mm256_set1_ps(-0.0f));
  return _mm256_sub_ps(w, _mm256_min_ps(t, _mm256_max_ps(minus_t, w)));
}

// The multiple of 8 elements of [0, count) through the vector loops; returns how many.
template <bool kL1, bool kL2>
__attribute__((target("avx2,f16c"))) int64_t grad_loop_f16c(ElementwiseMode mode, float g, float l1,
                                                            float two_l2, const c10::Half* in,
                                                            c10::Half* out, int64_t count) {
  const __m256 gv = _mm256_set1_ps(g), l1v = _mm256_set1_ps(l1), l2v = _mm256_set1_ps(two_l2);
  int64_t i = 0;
  if (mode == ElementwiseMode::Grad) {
    for (; i + 8 <= count; i += 8) {
      store8(out + i, _mm256_mul_ps(gv, slope8<kL1, kL2>(load8(in + i), l1v, l2v)));
    }
  } else {
    for (; i + 8 <= count; i += 8) {
      store8(out + i, _mm256_add_ps(load8(out + i), slope8<kL1, kL2>(load8(in + i), l1v, l2v)));
    }
  }
  return i;
}

__attribute__((target("avx2,f16c"))) int64_t prox_loop_f16c(float t, c10::Half* w, int64_t count) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(w + i, soft_threshold8(load8(w + i), tv));
  return i;
}

// The last count % 8 elements: converted to float, the float loop, rounded back.
void elementwise_tail_f16c(ElementwiseMode mode, double g, double a, double b, const c10::Half* in,
                           c10::Half* out, int64_t m) {
  float w[8], o[8];
  half_to_float_n(in, w, m);
  if (mode == ElementwiseMode::AddGrad) half_to_float_n(out, o, m);
  float* result = mode == ElementwiseMode::Prox ? w : o;
  elementwise_run<float>(mode, g, a, b, w, result, m);
  float_to_half_n(result, out, m);
}

void elementwise_run_f16c(ElementwiseMode mode, double g, double a, double b, const c10::Half* in,
                          c10::Half* out, int64_t count) {
  int64_t done = 0;
  if (mode == ElementwiseMode::Prox) {
    done = prox_loop_f16c(static_cast<float>(a), out, count);
  } else if (a != 0.0 || b != 0.0) {
    visit_terms(a != 0.0, b != 0.0, [&](auto use_l1, auto use_l2) {
      done = grad_loop_f16c<decltype(use_l1)::value, decltype(use_l2)::value>(
          mode, static_cast<float>(g), static_cast<float>(a), static_cast<float>(b), in, out,
          count);
    });
  } else {
    return elementwise_run<c10::Half>(mode, g, a, b, in, out, count);  // a fill with 0
  }
  if (done < count) elementwise_tail_f16c(mode, g, a, b, in + done, out + done, count - done);
}
#undef FASTREG_F16C
#endif

template <typename scalar_t>
void elementwise_piece_of(ElementwiseMode mode, double g, const Segment& s, int64_t first,
                          int64_t count) {
  const scalar_t* in = static_cast<const scalar_t*>(s.in) + first;
  scalar_t* out = static_cast<scalar_t*>(s.out) + first;
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (have_f16c()) return elementwise_run_f16c(mode, g, s.a, s.b, in, out, count);
  }
#endif
  elementwise_run<scalar_t>(mode, g, s.a, s.b, in, out, count);
}

void elementwise_piece(ElementwiseMode mode, double g, const Segment& s, int64_t first,
                       int64_t count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, s.dtype, "fastreg::penalty_elementwise",
      [&] { elementwise_piece_of<scalar_t>(mode, g, s, first, count); });
}

void run_elementwise(const std::vector<ElementwiseJob>& jobs, ElementwiseMode mode, double g) {
  std::vector<Segment> segments;
  segments.reserve(jobs.size());
  int64_t total = 0;
  for (const ElementwiseJob& job : jobs) {
    segments.push_back({job.in->const_data_ptr(), job.out->mutable_data_ptr(), total,
                        job.in->numel(), job.a, job.b, job.in->scalar_type()});
    total += job.in->numel();
  }
  parallel_chunks(segments, total, [&](int64_t, const Segment& s, int64_t first, int64_t count) {
    elementwise_piece(mode, g, s, first, count);
  });
}

std::vector<at::Tensor> penalty_backward_cpu(const at::Tensor& grad_out, at::TensorList params,
                                             c10::ArrayRef<double> l1, c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  const at::Tensor g = penalty_grad_out(grad_out, params.empty() ? grad_out : params[0]);
  const double g_value =
      g.scalar_type() == at::kDouble ? *g.const_data_ptr<double>() : *g.const_data_ptr<float>();
  std::vector<at::Tensor> grads;
  const std::vector<ElementwiseJob> jobs = backward_jobs(params, l1, l2, grads);
  for (const at::Tensor& grad : grads) advise_huge_pages(grad);
  run_elementwise(jobs, ElementwiseMode::Grad, g_value);
  return grads;
}

void penalty_grad_cpu(at::TensorList grads, at::TensorList params, c10::ArrayRef<double> l1,
                      c10::ArrayRef<double> l2) {
  check_penalty_args(params, l1, l2);
  const std::vector<ElementwiseJob> jobs = add_grad_jobs(grads, params, l1, l2);
  run_elementwise(jobs, ElementwiseMode::AddGrad, 1.0);
  finish_jobs(jobs);
}

void prox_l1_cpu(at::TensorList params, c10::ArrayRef<double> threshold) {
  check_penalty_tensors(params, "params");
  check_coefficients(threshold, params.size(), "threshold");
  const std::vector<ElementwiseJob> jobs = prox_jobs(params, threshold);
  run_elementwise(jobs, ElementwiseMode::Prox, 1.0);
  finish_jobs(jobs);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("penalty", &penalty_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("penalty_grad_", &penalty_grad_cpu);
  m.impl("prox_l1_", &prox_l1_cpu);
}

}  // namespace fastreg
