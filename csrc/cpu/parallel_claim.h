// The work split of every CPU kernel: items (chunks of a kernel's elements) claimed one at
// a time by the intra-op threads.
//
// Why not a fixed share per thread (at::parallel_for's split): on a machine shared with
// other work a thread that is descheduled leaves the others idle at the end of the loop
// (with fixed shares, 2 threads ran slower than 1). Why not one shared counter: every
// claim then moves the counter's cache line between cores, and the threads' items
// interleave, so no thread streams through contiguous memory; at 2^18 float32 elements
// the bits-mask backward took 54 us with 2 threads against 39 with 1.
//
// So each worker starts with a contiguous share of the items, claimed item by item from a
// counter on a cache line of its own (no traffic between cores while every worker runs),
// and once its share is done it claims what is left of the others' shares, in turn. A
// descheduled worker loses to the others every item it has not started. What an item
// computes must not depend on the thread that runs it (it never does here): results keep
// their bits for any number of threads and any schedule.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace fastreg {
namespace {

// Runs f(item) once for every item in [0, items), on up to at::get_num_threads() threads.
template <typename F>
void parallel_claim(int64_t items, const F& f) {
  const int64_t workers = std::min<int64_t>(items, at::get_num_threads());
  if (workers <= 1) {
    for (int64_t item = 0; item < items; ++item) f(item);
    return;
  }
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  const std::unique_ptr<Share[]> shares(new Share[workers]);
  for (int64_t w = 0; w < workers; ++w) {
    shares[w].next.store(items * w / workers, std::memory_order_relaxed);
    shares[w].end = items * (w + 1) / workers;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // One worker a thread, except where the loop runs inline (a nested parallel region):
    // then the first worker claims everything and the others find nothing left.
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t k = 0; k < workers; ++k) {
        Share& share = shares[(worker + k) % workers];
        for (int64_t item = share.next.fetch_add(1, std::memory_order_relaxed); item < share.end;
             item = share.next.fetch_add(1, std::memory_order_relaxed)) {
          f(item);
        }
      }
    }
  });
}

}  // namespace
}  // namespace fastreg
