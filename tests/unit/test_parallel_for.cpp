// parallel_for on the process's worker pool: every index runs exactly once, for any count and
// thread limit; several threads calling at once; calls made from inside work(); and work spread
// over more than one thread where the machine has more than one core.
#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/store/parallel_for.h"

using kvf::store::default_parallel_threads;
using kvf::store::parallel_for;

TEST_CASE("parallel_for runs every index exactly once") {
  for (size_t n : {size_t{0}, size_t{1}, size_t{2}, size_t{17}, size_t{1000}}) {
    for (size_t threads : {size_t{1}, size_t{2}, size_t{5}, default_parallel_threads(), size_t{100}}) {
      INFO("n " << n << ", threads " << threads);
      std::vector<std::atomic<int>> runs(n);
      parallel_for(
          n, [&](size_t i) { runs[i]++; }, threads);
      for (size_t i = 0; i < n; ++i) REQUIRE(runs[i].load() == 1);
    }
  }
}

TEST_CASE("parallel_for from several threads at once, and from inside work()") {
  constexpr size_t kCallers = 6, kOuter = 8, kInner = 50;
  std::vector<std::atomic<int>> runs(kCallers * kOuter * kInner);
  std::vector<std::thread> callers;
  for (size_t c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 20; ++round) {
        parallel_for(kOuter, [&](size_t o) {
          parallel_for(kInner, [&](size_t i) { runs[(c * kOuter + o) * kInner + i]++; });
        });
      }
    });
  }
  for (auto& t : callers) t.join();
  for (auto& r : runs) REQUIRE(r.load() == 20);
}

TEST_CASE("parallel_for spreads work over threads where there are cores") {
  if (default_parallel_threads() < 2) {
    WARN("one core: nothing to spread over");
    return;
  }
  std::mutex mutex;
  std::set<std::thread::id> seen;
  std::atomic<int> arrived{0};
  // Each index waits (bounded) until two have started: only two threads at once get past it.
  parallel_for(
      2,
      [&](size_t) {
        arrived++;
        for (int spin = 0; spin < 2000000 && arrived.load() < 2; ++spin) std::this_thread::yield();
        std::lock_guard lock(mutex);
        seen.insert(std::this_thread::get_id());
      },
      2);
  CHECK(arrived.load() == 2);
  CHECK(seen.size() == 2);
}
