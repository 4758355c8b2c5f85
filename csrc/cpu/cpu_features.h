// Function multiversioning for the CPU kernels' hot loops: GCC and Clang on x86-64 emit
// an AVX2 clone next to the baseline one and pick at load time, so the wheel runs on
// any x86-64 CPU while AVX2 machines get 8-lane Philox.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FASTREG_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTREG_TARGET_CLONES
#endif
