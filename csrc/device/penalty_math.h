// The penalty's elementwise formulas (host and device), shared by the CPU kernels, the
// CUDA kernels and the CUDA simulator; fastreg/reference.py mirrors them op for op.
//
// Definitions (Keras' L1L2, no 1/2 factor), per tensor w with coefficients l1, l2:
//   value    l1 * sum|w| + l2 * sum w**2
//   slope    l1 * sign(w) + 2 * l2 * w          (sign(0) = sign(nan) = 0, as torch.sign)
//   prox     w - clamp(w, -t, t)                 (= sign(w) * max(|w| - t, 0), +0 for zeros)
// A term whose coefficient is zero is left out rather than multiplied by zero, so an
// infinite weight gives an infinite l1 penalty, not nan.
#pragma once

#include "device/common.h"
#include "device/rounding.h"

namespace fastreg {

// ---- Elementwise formulas, each operation rounded on its own ----
// The gradients are promised bit-exact against the reference, which runs one torch op
// per operation; nvcc would otherwise contract a * b + c into one fma. (The C++ side is
// compiled with -ffp-contract=off, see setup.py.)

// d(penalty)/dw in the op-math type: l1 * sign(w) + two_l2 * w, with the terms whose
// coefficient is zero left out (use_l1, use_l2; both false gives 0).
template <typename acc_t>
FASTREG_HD acc_t penalty_slope(acc_t w, acc_t l1, acc_t two_l2, bool use_l1, bool use_l2) {
  // branch-free, so that the CPU loops vectorize
  const acc_t sign = static_cast<acc_t>(w > acc_t(0)) - static_cast<acc_t>(w < acc_t(0));
  if (use_l1 && use_l2) return add_rn(mul_rn(l1, sign), mul_rn(two_l2, w));
  if (use_l1) return mul_rn(l1, sign);
  if (use_l2) return mul_rn(two_l2, w);
  return acc_t(0);
}

// The proximal step of t * |w| (soft thresholding): w - clamp(w, -t, t), as the
// reference writes it. |w| <= t gives +0, nan stays nan (the clamp keeps it). Written
// with selects of values that need no guard, so that the CPU loop vectorizes.
template <typename acc_t>
FASTREG_HD acc_t soft_threshold(acc_t w, acc_t t) {
  acc_t clamped = w < -t ? -t : w;
  clamped = w > t ? t : clamped;
  return w - clamped;
}

// The penalty's elementwise ops, by what they write.
enum class ElementwiseMode {
  Grad,     // out = grad_out * slope(in)                  (penalty_backward)
  AddGrad,  // out = out + slope(in)                       (penalty_grad_)
  Prox,     // out = soft_threshold(in, a), out is in      (prox_l1_)
};

}  // namespace fastreg
