// The fused ops' element math, shared by the CPU kernels, the CUDA kernels and the CUDA
// simulator (host and device): the activations and their derivatives, and where an
// element finds its bias.
//
// Element math, in op-math T (float32; float64 for float64), for the output's i-th memory
// slot with keep flag k (the dropout contract of philox.h) and bias index j(i):
//     z    = x + bias[j]          (z = x when there is no bias)
//     bias_dropout_add:  out = residual + (k ? z * scale : 0)
//     bias_act_dropout:  out = k ? act(z) * scale : 0
//     backward:          grad_input = k ? act'(z) * (grad * scale) : 0
// each rounded once to the dtype at the end. The bias, scale and residual steps use
// mul_rn/add_rn so nvcc cannot contract them into an FMA: with no activation (or relu) the
// CUDA result is bit for bit the CPU's and the reference's. The transcendental activations
// follow torch's formulas op for op, with erf/tanh/exp from below on the CPU (float32),
// the CUDA libm on the device, glibc for float64: those agree to a few ulps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device/common.h"
#include "device/rounding.h"

namespace fastreg {

enum class Activation { None, Relu, Gelu, GeluTanh, Silu };

// v where keep is 1, +0 where it is 0 (also for a NaN or infinite v). On the host without
// a branch, v's bits ANDed with a mask: gcc does not if-convert `keep ? v : 0` once it has
// sunk v's computation into one arm (it might trap), and the loop would stay scalar.
template <typename T>
FASTREG_HD T masked(T v, uint32_t keep) {
#if defined(__CUDA_ARCH__)
  return keep ? v : T(0);
#else
  using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  bits_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= bits_t(0) - static_cast<bits_t>(keep);
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
#endif
}

// ---- float32 exp, erf and tanh that the CPU kernels' loops can vectorize ----
// Calls of glibc's scalar expf/erff/tanhf keep gcc from vectorizing a loop (a gelu
// kernel ran 3.5x slower than torch's vectorized one). These are branch-free, so the
// AVX2 clones of the CPU loops vectorize them. exp: Cephes' expf (Cody-Waite reduction,
// degree-5 polynomial; about 1 ulp), its argument clamped to [-87, 87] (results there
// are below 2e-38 or above 6e37, which the activations treat as 0 and infinity). erf:
// Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, the formula and order of torch's own
// vectorized erf. tanh: Cephes' tanhf (relative error about 2e-7). On the device the
// CUDA libm is used, and for float64 glibc's.

// Always inlined: the CPU loops are target_clones functions (arch=x86-64-v4, v3), and gcc
// will not inline a plain inline function built for another arch into them; called out
// of line, exp_cpu kept the gelu and silu loops scalar (gelu 2^20 float32 forward 9 ms).
#define FASTREG_CPU_INLINE inline __attribute__((always_inline))

// No selects: gcc's jump threading turns a select into control flow around float
// operations, which it then will not if-convert (they might trap), and the loop stays
// scalar. Ranges are handled with integer min/max and masks on the bits instead.
FASTREG_CPU_INLINE uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
FASTREG_CPU_INLINE float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
// All ones where the condition holds, else 0.
FASTREG_CPU_INLINE uint32_t mask_if(bool condition) {
  return 0u - static_cast<uint32_t>(condition);
}

FASTREG_CPU_INLINE float exp_cpu(float x) {
  const float log2e = 1.44269504088896341f, c1 = 0.693359375f, c2 = -2.12194440e-4f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer n, held in
                                    // the low mantissa bits (|n| < 2^22)
  const uint32_t xb = bits_of(x);
  const uint32_t nan = mask_if((xb & 0x7FFFFFFFu) > 0x7F800000u) & 0x7FC00000u;
  x = float_of(std::min(xb & 0x7FFFFFFFu, 0x42AE0000u) | (xb & 0x80000000u));  // |x| <= 87
  const float shifted = x * log2e + magic;
  const float n = shifted - magic;
  const float r = (x - n * c1) - n * c2;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                     4.1665795894e-2f) *
                        r +
                    1.6666665459e-1f) *
                       r +
                   5.0000001201e-1f) *
                      (r * r) +
                  r + 1.0f;
  const float two_n = float_of((bits_of(shifted) - bits_of(magic) + 127u) << 23);
  return float_of(bits_of(p * two_n) | nan);  // NaN stays NaN
}

FASTREG_CPU_INLINE float erf_cpu(float x) {
  const float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f,
              a4 = -1.453152027f, a5 = 1.061405429f;
  const float ax = std::fabs(x);
  const float t = 1.0f / (p * ax + 1.0f);
  const float r = (((a5 * t + a4) * t + a3) * t + a2) * t + a1;
  return std::copysign(1.0f - r * t * exp_cpu(-(ax * ax)), x);
}

FASTREG_CPU_INLINE float tanh_cpu(float x) {
  const float ax = std::fabs(x);
  const float large = 1.0f - 2.0f / (exp_cpu(ax + ax) + 1.0f);  // for |x| >= 0.625
  const float z = x * x;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) *
                           z -
                       3.33332819422e-1f) *
                          z * ax +
                      ax;
  const uint32_t use_large = mask_if(bits_of(ax) >= 0x3F200000u);  // NaN: large is NaN
  return std::copysign(float_of((bits_of(large) & use_large) | (bits_of(small) & ~use_large)), x);
}

FASTREG_HD float erf_(float x) {
#if defined(__CUDA_ARCH__)
  return ::erff(x);
#else
  return erf_cpu(x);
#endif
}
FASTREG_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_cpu(x);
#endif
}
FASTREG_HD float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return tanh_cpu(x);
#endif
}
FASTREG_HD double erf_(double x) { return ::erf(x); }
FASTREG_HD double exp_(double x) { return ::exp(x); }
FASTREG_HD double tanh_(double x) { return ::tanh(x); }

// ---- Activations: forward(z) and backward(z, v) = act'(z) * v, torch's formulas ----
// (aten/src/ATen/native/cpu/Activation.cpp, GeluKernel and SiLU, scalar paths; the
// constants are rounded once from double). fastreg/reference.py writes the same steps.

template <Activation A>
struct Act;

template <>
struct Act<Activation::None> {
  template <typename T>
  static FASTREG_HD T forward(T z) {
    return z;
  }
  template <typename T>
  static FASTREG_HD T backward(T, T v) {
    return v;
  }
};

// relu(z) = z <= 0 ? 0 : z (NaN passes, as in torch); its gradient is torch's
// threshold_backward: 0 where z <= 0, else v (exactly, also for infinite v).
template <>
struct Act<Activation::Relu> {
  template <typename T>
  static FASTREG_HD T forward(T z) {
    return z <= T(0) ? T(0) : z;
  }
  template <typename T>
  static FASTREG_HD T backward(T z, T v) {
    return masked(v, static_cast<uint32_t>(!(z <= T(0))));
  }
};

// gelu(z) = z / 2 * (1 + erf(z / sqrt(2)))
template <>
struct Act<Activation::Gelu> {
  template <typename T>
  static FASTREG_HD T forward(T z) {
    const T alpha = static_cast<T>(0.70710678118654752440);  // M_SQRT1_2
    return z * T(0.5) * (T(1) + erf_(z * alpha));
  }
  template <typename T>
  static FASTREG_HD T backward(T z, T v) {
    const T alpha = static_cast<T>(0.70710678118654752440);
    const T beta = static_cast<T>(0.39894228040143267794);  // M_2_SQRTPI * M_SQRT1_2 / 2
    const T cdf = T(0.5) * (T(1) + erf_(z * alpha));
    const T pdf = beta * exp_(z * z * T(-0.5));
    return v * (cdf + z * pdf);
  }
};

// gelu_tanh(z) = z / 2 * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 z^3)))
template <>
struct Act<Activation::GeluTanh> {
  template <typename T>
  static FASTREG_HD T forward(T z) {
    const T beta = static_cast<T>(0.79788456080286535588);  // M_SQRT2 * M_2_SQRTPI / 2
    const T kappa = static_cast<T>(0.044715);
    const T z_cube = z * z * z;
    const T inner = beta * (z + kappa * z_cube);
    return T(0.5) * z * (T(1) + tanh_(inner));
  }
  template <typename T>
  static FASTREG_HD T backward(T z, T v) {
    const T beta = static_cast<T>(0.79788456080286535588);
    const T kappa = static_cast<T>(0.044715);
    const T kappa3 = static_cast<T>(3 * 0.044715);
    const T z_sq = z * z;
    const T z_cube = z_sq * z;
    const T inner = beta * (z + kappa * z_cube);
    const T tanh_inner = tanh_(inner);
    const T left = T(0.5) * z;
    const T right = T(1) + tanh_inner;
    const T left_derivative = T(0.5) * right;
    const T tanh_derivative = T(1) - tanh_inner * tanh_inner;
    const T inner_derivative = beta * (T(1) + kappa3 * z_sq);
    const T right_derivative = left * tanh_derivative * inner_derivative;
    return v * (left_derivative + right_derivative);
  }
};

// silu(z) = z / (1 + exp(-z))
template <>
struct Act<Activation::Silu> {
  template <typename T>
  static FASTREG_HD T forward(T z) {
    return z / (T(1) + exp_(-z));
  }
  template <typename T>
  static FASTREG_HD T backward(T z, T v) {
    const T sigmoid = T(1) / (T(1) + exp_(-z));
    return v * (sigmoid * (T(1) + z * (T(1) - sigmoid)));
  }
};

// ---- Where element i finds its bias ----

// The bias broadcasts over the last dimension. The kernels walk the output in memory
// order; for a dense layout the last dimension's index of memory slot i is
// (i / stride(-1)) % size(-1): the dimensions with smaller strides fill exactly
// stride(-1) slots, those with larger strides step in multiples of stride(-1) * size(-1).
// (For a contiguous tensor i % C; for channels_last 4-D with bias over W, (i / C) % W.)
struct BiasLayout {
  int64_t stride;
  int64_t size;

  FASTREG_HD int64_t index(int64_t i) const { return (i / stride) % size; }
};

}  // namespace fastreg
