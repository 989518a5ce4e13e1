// parallel_for: runs work(i) for every i in [0, n) on up to `max_threads` threads, the calling one
// included, and returns when all are done. For milliseconds of memory-bound work that one core
// cannot finish in the time a copy engine moves the same bytes (hashing or decoding chunks).
// The helpers come from one pool per process (default_parallel_threads() - 1 threads, started on
// first use and kept: starting 15 threads per 32 MiB chunk cost a third of the hash rate on the
// GPU machine). Calls from several threads at once share the pool; a call made inside work() runs
// too (its caller works on it, and idle helpers join).
// Thread rules: any thread; work(i) runs on several threads at once, each index exactly once.
#pragma once

#include <cstddef>
#include <functional>

namespace kvf::store {

// The pool's size, the calling thread included: the machine's cores, at most 16 (hashing 32 MiB
// chunks on the GPU machine's Xeon: 7.6 GB/s on one thread, 43 on 8, 73 on 16).
size_t default_parallel_threads();

void parallel_for(size_t n, const std::function<void(size_t)>& work,
                  size_t max_threads = default_parallel_threads());

}  // namespace kvf::store
