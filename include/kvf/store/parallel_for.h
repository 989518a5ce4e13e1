// parallel_for: runs work(i) for every i in [0, n) on up to `max_threads` threads, the calling one
// included, and returns when all are done. For a few milliseconds of memory-bound work that one core
// cannot finish in the time a copy engine moves the same bytes (hashing or decoding chunks); the
// threads are started per call, so each share should be well above their start-up (~20 us).
// Thread rules: work(i) runs on several threads at once, each index exactly once.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace kvf::store {

// Threads that parallel_for uses by default: the machine's cores, at most 8 (memory bandwidth,
// not cores, limits such work past that).
inline size_t default_parallel_threads() {
  return std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 8);
}

template <typename Work>
void parallel_for(size_t n, const Work& work, size_t max_threads = default_parallel_threads()) {
  const size_t threads = std::min(n, std::max<size_t>(max_threads, 1));
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) work(i);
    return;
  }
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t i = next++; i < n; i = next++) work(i);
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(run);
  run();
  for (std::thread& t : helpers) t.join();
}

}  // namespace kvf::store
