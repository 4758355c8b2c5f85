// Function multiversioning for the CPU kernels' hot loops: GCC and Clang on x86-64 emit
// clones for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 with FMA, F16C, BMI2) and the x86-64
// baseline, and pick one at load time (ifunc), so the wheel runs on any x86-64 CPU while
// newer ones get wide Philox and hardware float16 conversion.
//
// setup.py compiles with -ffp-contract=off, which holds in every clone: the v3 and v4
// clones may use FMA instructions only where the source writes one (it never does), so
// results stay bit-identical across clones.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FASTREG_X86_CLONES 1
#define FASTREG_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTREG_X86_CLONES 0
#define FASTREG_TARGET_CLONES
#endif

namespace fastreg {

// Which clone the loader picked on this CPU: "x86-64-v4", "x86-64-v3", "x86-64" (the
// baseline) or "portable" (no clones on this compiler or architecture). Same dispatch
// rules as FASTREG_TARGET_CLONES (defined in dropout_cpu.cpp).
const char* cpu_clone();

// The Philox code path of the CPU kernels (PhiloxKeep in dropout_tiles.h): hand-written
// AVX-512 (16 blocks a vector) or AVX2 (8 blocks), or the portable round-by-round loop
// that the compiler vectorizes. Chosen once from the CPU (FASTREG_CPU_PHILOX=portable,
// avx2 or avx512 in the environment overrides it); set_philox_isa switches it at run
// time, for tests that compare the paths bit for bit. All give the same bits.
enum class PhiloxIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };
PhiloxIsa philox_isa();
const char* philox_isa_name(PhiloxIsa isa);
// False (and no change) when the CPU lacks the instructions or the name is unknown.
bool set_philox_isa(const std::string& name);

// Loads a value into its op-math type and rounds one back. For float16 this goes through
// the compiler's _Float16 (IEEE round-to-nearest-even, as c10's conversion) rather than
// c10::Half's conversion, whose hardware path is chosen by the translation unit's macros
// (__F16C__), not by the clone: inlined into an x86-64-v3 or v4 clone the _Float16 cast is
// one vcvtph2ps / vcvtps2ph, in the baseline clone a libgcc call.
template <typename T>
inline __attribute__((always_inline)) auto load_op(T v) {
  return static_cast<at::opmath_type<T>>(v);
}

template <typename T>
inline __attribute__((always_inline)) T store_op(at::opmath_type<T> v) {
  return static_cast<T>(v);
}

#if FASTREG_X86_CLONES
inline bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}

// n float16 values to float and back (round to nearest even), any n; only where have_f16c().
__attribute__((target("avx2,f16c"))) inline void half_to_float_n(const c10::Half* in, float* out,
                                                                 int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(in[i].x);
}

__attribute__((target("avx2,f16c"))) inline void float_to_half_n(const float* in, c10::Half* out,
                                                                 int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) out[i].x = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

#if defined(__FLT16_MAX__) && !defined(__CUDACC__)
template <>
inline __attribute__((always_inline)) auto load_op<c10::Half>(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof(h));
  return static_cast<float>(h);
}

template <>
inline __attribute__((always_inline)) c10::Half store_op<c10::Half>(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return c10::Half(bits, c10::Half::from_bits());
}
#endif

}  // namespace fastreg
