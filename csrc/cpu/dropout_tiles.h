// The CPU dropout machinery that every CPU kernel of the dropout family shares: where a
// tile's keep flags come from (Philox, a bits mask, a bool mask), what the forward records
// for backward (bits, bool, nothing), and the one loop that runs them tile by tile and
// hands each tile's flags to an elementwise step (dropout's scale, or a fused epilogue).
//
// The work is cut into tiles of 256 elements (64 Philox blocks, 8 mask words) so that
// threads never share a mask word and each tile's Philox calls form one loop the compiler
// vectorizes across blocks. Everything here has internal linkage: each kernel file gets
// its own copy (the target_clones functions need it).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/cpu_features.h"
#include "cpu/parallel_claim.h"
#include "ops/dropout.h"

namespace fastreg {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kTileBlocks = kTile / 4;
constexpr int64_t kTileWords = kTile / 32;
constexpr int64_t kGrainTiles = 16;

// ---- Where the keep flags of a tile come from (one byte per element, 0 or 1) ----

#if FASTREG_X86_CLONES
// 1 where word >= threshold (unsigned: max(word, threshold) == word), else 0.
__attribute__((target("avx2"))) inline __m256i keep_flag_avx2(__m256i c, __m256i thr, __m256i one) {
  return _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(c, thr), c), one);
}

__attribute__((target("avx512f"))) inline __m512i keep_flag_avx512(__m512i c, __m512i thr,
                                                                   __m512i one) {
  return _mm512_maskz_mov_epi32(_mm512_cmp_epu32_mask(c, thr, _MM_CMPINT_NLT), one);
}

// The contract's Philox4x32-10 for a tile's 64 blocks, 8 blocks a vector (AVX2). The
// 32x32->64 products: vpmuludq on the even lanes and on the odd lanes shifted down, the
// high and low halves blended back into lane order. The keep flags of block b are the
// bytes of 32-bit lane b of k0 | k1 << 8 | k2 << 16 | k3 << 24: keep[4b + i] in memory.
// q0 is a multiple of 64, so the counter's low word never carries within a vector.
__attribute__((target("avx2"))) inline void philox_tile_avx2(uint64_t q0, RngState rng,
                                                             KeepRule rule, uint8_t* keep) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(rule.threshold));
  const __m256i one = _mm256_set1_epi32(1);
  for (int g = 0; g < kTileBlocks / 8; ++g) {
    const uint64_t q = q0 + 8 * g;
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q))),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset)));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i e0 = _mm256_mul_epu32(c0, m0),
                    o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i e1 = _mm256_mul_epu32(c2, m1),
                    o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
      const __m256i n0 =
          _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 =
          _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      philox_bump_key(k0, k1);
    }
    const __m256i bytes =
        _mm256_or_si256(_mm256_or_si256(keep_flag_avx2(c0, thr, one),
                                        _mm256_slli_epi32(keep_flag_avx2(c1, thr, one), 8)),
                        _mm256_or_si256(_mm256_slli_epi32(keep_flag_avx2(c2, thr, one), 16),
                                        _mm256_slli_epi32(keep_flag_avx2(c3, thr, one), 24)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 32 * g), bytes);
  }
}

// The same with AVX-512F: 16 blocks a vector.
__attribute__((target("avx512f"))) inline void philox_tile_avx512(uint64_t q0, RngState rng,
                                                                  KeepRule rule, uint8_t* keep) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(rule.threshold));
  const __m512i one = _mm512_set1_epi32(1);
  for (int g = 0; g < kTileBlocks / 16; ++g) {
    const uint64_t q = q0 + 16 * g;
    __m512i c0 =
        _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q))),
                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32)));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset)));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset >> 32)));
    uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i e0 = _mm512_mul_epu32(c0, m0),
                    o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i e1 = _mm512_mul_epu32(c2, m1),
                    o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e1, 32), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, e1, _mm512_slli_epi64(o1, 32));
      const __m512i n0 =
          _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      const __m512i n2 =
          _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      philox_bump_key(k0, k1);
    }
    const __m512i bytes =
        _mm512_or_si512(_mm512_or_si512(keep_flag_avx512(c0, thr, one),
                                        _mm512_slli_epi32(keep_flag_avx512(c1, thr, one), 8)),
                        _mm512_or_si512(_mm512_slli_epi32(keep_flag_avx512(c2, thr, one), 16),
                                        _mm512_slli_epi32(keep_flag_avx512(c3, thr, one), 24)));
    _mm512_storeu_si512(keep + 64 * g, bytes);
  }
}
#endif

struct PhiloxKeep {
  RngState rng;
  KeepRule rule;

  void operator()(int64_t tile, int64_t count, uint8_t* keep) const {
#if FASTREG_X86_CLONES
    if (!rule.drop_all) {
      const uint64_t q0 = static_cast<uint64_t>(tile) * kTileBlocks;
      switch (philox_isa()) {
        case PhiloxIsa::Avx512:
          return philox_tile_avx512(q0, rng, rule, keep);
        case PhiloxIsa::Avx2:
          return philox_tile_avx2(q0, rng, rule, keep);
        case PhiloxIsa::Portable:
          break;
      }
    }
#endif
    portable(tile, count, keep);
  }

  // The contract's Philox4x32-10, run round by round over the tile's 64 blocks held in
  // planar arrays, so each round is one loop the compiler vectorizes.
  FASTREG_TARGET_CLONES void portable(int64_t tile, int64_t /*count*/, uint8_t* keep) const {
    uint32_t c0[kTileBlocks], c1[kTileBlocks], c2[kTileBlocks], c3[kTileBlocks];
    const uint64_t q0 = static_cast<uint64_t>(tile) * kTileBlocks;
    for (int64_t b = 0; b < kTileBlocks; ++b) {
      c0[b] = static_cast<uint32_t>(q0 + b);
      c1[b] = static_cast<uint32_t>((q0 + b) >> 32);
      c2[b] = static_cast<uint32_t>(rng.offset);
      c3[b] = static_cast<uint32_t>(rng.offset >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int64_t b = 0; b < kTileBlocks; ++b) philox_round(c0[b], c1[b], c2[b], c3[b], k0, k1);
      philox_bump_key(k0, k1);
    }
    const KeepRule r = rule;
    for (int64_t b = 0; b < kTileBlocks; ++b) {
      keep[4 * b + 0] = r.keep(c0[b]);
      keep[4 * b + 1] = r.keep(c1[b]);
      keep[4 * b + 2] = r.keep(c2[b]);
      keep[4 * b + 3] = r.keep(c3[b]);
    }
  }
};

struct BitsKeep {
  const uint32_t* words;

  FASTREG_TARGET_CLONES void operator()(int64_t tile, int64_t count,
                                        uint8_t* __restrict keep) const {
    const uint32_t* w = words + tile * kTileWords;
    for (int64_t word = 0; word < (count + 31) / 32; ++word) {
      const uint32_t bits = w[word];
      for (int j = 0; j < 32; ++j) keep[32 * word + j] = (bits >> j) & 1u;
    }
  }
};

struct BoolKeep {
  const bool* mask;

  void operator()(int64_t tile, int64_t count, uint8_t* keep) const {
    std::memcpy(keep, mask + tile * kTile, count);
  }
};

// ---- What the forward keeps for backward ----

#if FASTREG_X86_CLONES
// 32 flags (bytes 0 or 1) to a word: each flag shifted into its byte's top bit, vpmovmskb.
__attribute__((target("avx2"))) inline void pack_bits_avx2(const uint8_t* keep, uint32_t* w,
                                                           int64_t words) {
  for (int64_t i = 0; i < words; ++i) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + 32 * i));
    w[i] = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(b, 7)));
  }
}
#endif

struct BitsSink {
  uint32_t* words;

  void operator()(int64_t tile, int64_t count, const uint8_t* __restrict keep) const {
#if FASTREG_X86_CLONES
    if (philox_isa() != PhiloxIsa::Portable) {  // the CPU has AVX2
      return pack_bits_avx2(keep, words + tile * kTileWords, (count + 31) / 32);
    }
#endif
    portable(tile, count, keep);
  }

  FASTREG_TARGET_CLONES void portable(int64_t tile, int64_t count,
                                      const uint8_t* __restrict keep) const {
    uint32_t* w = words + tile * kTileWords;
    for (int64_t word = 0; word < (count + 31) / 32; ++word) {
      uint32_t bits = 0;
      for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(keep[32 * word + j]) << j;
      w[word] = bits;
    }
  }
};

struct BoolSink {
  bool* mask;

  void operator()(int64_t tile, int64_t count, const uint8_t* keep) const {
    std::memcpy(mask + tile * kTile, keep, count);
  }
};

struct NoSink {
  void operator()(int64_t, int64_t, const uint8_t*) const {}
};

template <int kBytes>
struct UnsignedOfSize;
template <>
struct UnsignedOfSize<2> {
  using type = uint16_t;
};
template <>
struct UnsignedOfSize<4> {
  using type = uint32_t;
};
template <>
struct UnsignedOfSize<8> {
  using type = uint64_t;
};

#if FASTREG_X86_CLONES
// float16 with F16C, eight elements at a time: gcc does not vectorize _Float16
// conversions (each is one scalar vcvtph2ps / vcvtps2ph), so the float16 loops of
// apply_keep and apply_bits have these hand-written forms, used where the CPU has
// AVX2 and F16C (the AVX-512 forms below where the AVX-512 path is chosen). Same
// rounding as the scalar loops (round to nearest even, imm 0).
__attribute__((target("avx2,f16c"))) inline __m128i half8_scaled(const c10::Half* in,
                                                                 __m256 scale) {
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
  return _mm256_cvtps_ph(_mm256_mul_ps(v, scale), _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx2,f16c"))) void apply_keep_f16c(const c10::Half* in, c10::Half* out,
                                                          const uint8_t* keep, int64_t count,
                                                          float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t e = 0;
  for (; e + 8 <= count; e += 8) {
    const __m128i k =
        _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + e)));
    const __m128i lanes = _mm_sub_epi16(_mm_setzero_si128(), k);  // 0 or 0xffff
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + e),
                     _mm_and_si128(half8_scaled(in + e, s), lanes));
  }
  for (; e < count; ++e) {
    const uint16_t h = _cvtss_sh(_cvtsh_ss(in[e].x) * scale, _MM_FROUND_TO_NEAREST_INT);
    out[e].x = static_cast<uint16_t>(h & -static_cast<uint16_t>(keep[e]));
  }
}

__attribute__((target("avx2,f16c"))) void apply_bits_f16c(const c10::Half* in, c10::Half* out,
                                                          const uint32_t* words, int64_t count,
                                                          float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m128i bit = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t e = 0;
  for (; e + 8 <= count; e += 8) {
    const int byte = static_cast<int>((words[e / 32] >> (e % 32)) & 0xffu);
    const __m128i b = _mm_and_si128(_mm_set1_epi16(static_cast<int16_t>(byte)), bit);
    const __m128i lanes = _mm_cmpeq_epi16(b, bit);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + e),
                     _mm_and_si128(half8_scaled(in + e, s), lanes));
  }
  for (; e < count; ++e) {
    const uint16_t h = _cvtss_sh(_cvtsh_ss(in[e].x) * scale, _MM_FROUND_TO_NEAREST_INT);
    const uint16_t k = (words[e / 32] >> (e % 32)) & 1u;
    out[e].x = static_cast<uint16_t>(h & -k);
  }
}

// The same with AVX-512F, sixteen elements at a time: the keep flags become a mask
// register, and the masked multiply gives +0 in dropped lanes (NaN and infinity too),
// which converts to float16 +0. Used where the AVX-512 path is chosen (philox_isa()).
__attribute__((target("avx512f"))) inline __m256i half16_kept(const c10::Half* in, __m512 scale,
                                                              __mmask16 keep) {
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in)));
  return _mm512_cvtps_ph(_mm512_maskz_mul_ps(keep, v, scale), _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx512f,f16c"))) void apply_keep_f16_avx512(const c10::Half* in,
                                                                   c10::Half* out,
                                                                   const uint8_t* keep,
                                                                   int64_t count, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    const __m512i k =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + e)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e),
                        half16_kept(in + e, s, _mm512_test_epi32_mask(k, k)));
  }
  if (e < count) apply_keep_f16c(in + e, out + e, keep + e, count - e, scale);
}

// `words` holds the mask from element 0; e steps by 16, so a step's bits never straddle
// two words.
__attribute__((target("avx512f,f16c"))) void apply_bits_f16_avx512(const c10::Half* in,
                                                                   c10::Half* out,
                                                                   const uint32_t* words,
                                                                   int64_t count, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    const auto k = static_cast<__mmask16>(words[e / 32] >> (e % 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e), half16_kept(in + e, s, k));
  }
  for (; e < count; ++e) {
    const uint16_t h = _cvtss_sh(_cvtsh_ss(in[e].x) * scale, _MM_FROUND_TO_NEAREST_INT);
    const uint16_t k = (words[e / 32] >> (e % 32)) & 1u;
    out[e].x = static_cast<uint16_t>(h & -k);
  }
}
#endif

// Branch-free so it vectorizes (gcc will not if-convert `keep ? x * scale : 0`): the
// product is rounded for every element, then its bits are ANDed with all-ones or zero,
// so dropped elements are +0 also where the input is NaN or infinite. `keep` is the
// caller's stack buffer; __restrict says stores to `out` cannot change it.
template <typename scalar_t>
FASTREG_TARGET_CLONES void apply_keep(const scalar_t* in, scalar_t* out,
                                      const uint8_t* __restrict keep, int64_t count,
                                      at::opmath_type<scalar_t> scale) {
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (philox_isa() == PhiloxIsa::Avx512)
      return apply_keep_f16_avx512(in, out, keep, count, scale);
    if (have_f16c()) return apply_keep_f16c(in, out, keep, count, scale);
  }
#endif
  using bits_t = typename UnsignedOfSize<sizeof(scalar_t)>::type;
  for (int64_t e = 0; e < count; ++e) {
    const scalar_t kept = store_op<scalar_t>(load_op(in[e]) * scale);
    bits_t bits;
    std::memcpy(&bits, &kept, sizeof(bits));
    bits &= static_cast<bits_t>(-static_cast<bits_t>(keep[e]));
    std::memcpy(out + e, &bits, sizeof(bits));
  }
}

// Backward from a bits mask without the byte flags: each bit becomes its element's lane
// mask directly (shift, and, negate: vectorized across a word's 32 elements), in the same
// pass as the scale. `words` holds the mask from the run's first element (a multiple of 32).
template <typename scalar_t>
FASTREG_TARGET_CLONES void apply_bits(const scalar_t* in, scalar_t* out,
                                      const uint32_t* __restrict words, int64_t count,
                                      at::opmath_type<scalar_t> scale) {
#if FASTREG_X86_CLONES
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (philox_isa() == PhiloxIsa::Avx512)
      return apply_bits_f16_avx512(in, out, words, count, scale);
    if (have_f16c()) return apply_bits_f16c(in, out, words, count, scale);
  }
#endif
  using bits_t = typename UnsignedOfSize<sizeof(scalar_t)>::type;
  const int64_t full = count / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = words[w];
    const scalar_t* src = in + 32 * w;
    scalar_t* dst = out + 32 * w;
    for (int j = 0; j < 32; ++j) {
      const scalar_t kept = store_op<scalar_t>(load_op(src[j]) * scale);
      bits_t bits;
      std::memcpy(&bits, &kept, sizeof(bits));
      bits &= static_cast<bits_t>(-static_cast<bits_t>((word >> j) & 1u));
      std::memcpy(dst + j, &bits, sizeof(bits));
    }
  }
  for (int64_t e = 32 * full; e < count; ++e) {
    const scalar_t kept = store_op<scalar_t>(load_op(in[e]) * scale);
    bits_t bits;
    std::memcpy(&bits, &kept, sizeof(bits));
    bits &= static_cast<bits_t>(-static_cast<bits_t>((words[e / 32] >> (e % 32)) & 1u));
    std::memcpy(out + e, &bits, sizeof(bits));
  }
}

// Runs f(chunk, first, count) over chunks of `chunk_tiles` tiles (elements first ..
// first+count-1), the chunks claimed by the threads as parallel_claim says.
template <typename F>
void for_each_chunk(int64_t n, int64_t chunk_tiles, const F& f) {
  const int64_t chunk_elems = chunk_tiles * kTile;
  parallel_claim((n + chunk_elems - 1) / chunk_elems, [&](int64_t chunk) {
    const int64_t first = chunk * chunk_elems;
    f(chunk, first, std::min(chunk_elems, n - first));
  });
}

// The one CPU loop. Tiles are grouped into chunks of `chunk_tiles` tiles; a chunk is
// run by one thread, tile after tile, so whatever an elementwise step accumulates per
// chunk (the fused ops' bias-gradient partial sums) depends on the shape only, never on
// the number of threads. For each tile: keep flags from `keep_fn`, recorded by `sink`,
// then `apply(chunk, first, count, keep)` for elements first .. first+count-1. Flags
// past the end are zero so that the last mask word has no stray bits.
template <typename KeepFn, typename Sink, typename Apply>
void for_each_tile(int64_t n, int64_t chunk_tiles, const KeepFn& keep_fn, const Sink& sink,
                   const Apply& apply) {
  for_each_chunk(n, chunk_tiles, [&](int64_t chunk, int64_t chunk_first, int64_t chunk_count) {
    alignas(64) uint8_t keep[kTile];
    for (int64_t first = chunk_first; first < chunk_first + chunk_count; first += kTile) {
      const int64_t tile = first / kTile;
      const int64_t count = std::min(kTile, n - first);
      keep_fn(tile, count, keep);
      std::fill(keep + count, keep + kTile, uint8_t{0});
      sink(tile, count, keep);
      apply(chunk, first, count, static_cast<const uint8_t*>(keep));
    }
  });
}

// Dropout: the flags applied to `in` (when given) with the scale of p.
template <typename scalar_t, typename KeepFn, typename Sink>
void dropout_tiles(const scalar_t* in, scalar_t* out, int64_t n, double p, const KeepFn& keep_fn,
                   const Sink& sink) {
  const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
  for_each_tile(n, kGrainTiles, keep_fn, sink,
                [&](int64_t, int64_t first, int64_t count, const uint8_t* keep) {
                  if (in != nullptr) apply_keep(in + first, out + first, keep, count, scale);
                });
}

inline RngState read_rng_state(const at::Tensor& rng_state) {
  const int64_t* s = rng_state.data_ptr<int64_t>();
  return RngState{static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1])};
}

template <typename F>
void visit_sink(MaskMode mode, const at::Tensor& mask, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsSink{reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolSink{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(NoSink{});
  }
}

// `philox` is PhiloxKeep or a wrapper of it (the fused ops skip Philox when p = 0).
template <typename Philox, typename F>
void visit_keep(MaskMode mode, const at::Tensor& mask, const Philox& philox, F&& f) {
  switch (mode) {
    case MaskMode::Bits:
      return f(BitsKeep{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>())});
    case MaskMode::Bool:
      return f(BoolKeep{mask.data_ptr<bool>()});
    case MaskMode::Recompute:
      return f(philox);
  }
}

}  // namespace
}  // namespace fastreg
