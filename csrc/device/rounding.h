// Arithmetic rounded as written: each product and sum rounded on its own, so results are
// bit-exact against the reference, which runs one torch op per operation. nvcc would
// otherwise contract a * b + c into one fma; the C++ side is compiled with
// -ffp-contract=off (setup.py). Shared by the fused and penalty kernels.
#pragma once

#include "device/common.h"

namespace fastreg {

FASTREG_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTREG_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTREG_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTREG_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace fastreg
