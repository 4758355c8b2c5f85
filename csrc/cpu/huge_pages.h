// Transparent huge pages for the CPU kernels' large fresh outputs.
//
// Why: glibc maps every block above 32 MiB (its largest mmap threshold) afresh and unmaps
// it when freed, so a kernel that writes a new 64 MiB output takes a page fault for each
// of its 16,384 4 KiB pages on every call; at 2^24 float32 elements those faults cost more
// than the dropout itself (docs/cpu-kernels.md). Advised with MADV_HUGEPAGE before the
// kernel first writes it, such a block takes one fault per 2 MiB where the system allows
// huge pages on request (transparent_hugepage "madvise", the usual default). Smaller
// blocks are left alone: glibc serves them from heap memory that an earlier call already
// faulted in, which huge pages would only make the kernel zero again. It is advice: where
// huge pages are off, or the call fails, nothing changes but the speed; the bits written
// are the same. Where memory is fragmented, the system's transparent_hugepage/defrag
// setting decides whether such a fault waits for compaction; FASTREG_CPU_HUGE_PAGES=0 in
// the environment turns the advice off.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastreg {

// `fresh`: a tensor the kernel has just allocated, best before its first write (pages
// already written stay small until the system's khugepaged merges them, if ever).
inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  constexpr size_t kMinBytes = size_t{32} << 20;  // glibc's largest mmap threshold
  static const bool enabled = [] {
    const char* env = std::getenv("FASTREG_CPU_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  if (!enabled || !fresh.is_cpu() || !fresh.has_storage()) return;
  const size_t bytes = fresh.storage().nbytes();
  if (bytes < kMinBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(fresh.storage().data());
  // the whole 2 MiB pages inside the block (madvise wants a page-aligned start)
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

}  // namespace fastreg
