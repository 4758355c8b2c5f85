// Philox4x32-10 and the dropout keep rule: the single source of fastreg's randomness.
//
// The RNG contract, shared by the CPU kernels, the CUDA kernels and fastreg/reference.py:
// for a call with 64-bit seed S and offset O, element i (its position in memory in the
// output) takes q = i / 4, r = i % 4 and computes
//     philox4x32_10(counter = (q lo, q hi, O lo, O hi), key = (S lo, S hi))
// Element i is kept iff output word r >= t, with t = floor(p * 2^32) for p < 1; p = 1
// drops everything. Kept values are x * scale, scale = 1 / (1 - p) rounded once to the
// op-math type (float32, float64 for float64), the product rounded once to the dtype.
#pragma once

#include <cstdint>

#include "device/common.h"

namespace fastreg {

struct Philox4 {
  uint32_t v[4];
};

// One Philox4x32 round on the counter words, with round key (k0, k1). The products are
// plain 64-bit multiplies: nvcc emits mul.hi/mul.lo and gcc vectorizes them across
// lanes (see the CPU kernels, which run this round over 64 blocks at once).
FASTREG_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                             uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
  const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// The key schedule: a Weyl sequence added between rounds.
FASTREG_HD void philox_bump_key(uint32_t& k0, uint32_t& k1) {
  k0 += 0x9E3779B9u;
  k1 += 0xBB67AE85u;
}

constexpr int kPhiloxRounds = 10;

// Philox4x32-10 (Salmon et al., SC'11; the constants of Random123).
FASTREG_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    philox_bump_key(k0, k1);
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words of Philox block q (elements 4q .. 4q+3) for seed and offset.
FASTREG_HD Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The keep rule's parameters for a drop probability p in [0, 1]. The threshold is
// computed in double on the host so every device compares against the same integer.
struct KeepRule {
  uint32_t threshold;  // keep iff word >= threshold
  bool drop_all;       // p == 1: no word passes

  static KeepRule from_p(double p) {
    KeepRule rule;
    rule.drop_all = p >= 1.0;
    rule.threshold = rule.drop_all ? 0u : static_cast<uint32_t>(p * 4294967296.0);
    return rule;
  }

  FASTREG_HD bool keep(uint32_t word) const { return !drop_all && word >= threshold; }
};

}  // namespace fastreg
