// Small threading tools shared by transports that wrap an inner transport:
//  - HelperThreads: threads for work that blocks on a peer (connecting back, importing a region,
//    joining or closing an NCCL communicator), which must not run on a progress thread. Started
//    from any thread, all joined by join_all() (a destructor's job; it also joins helpers started
//    while it runs).
//  - call_on(transport, fn): runs fn on the transport's progress thread and waits for its result;
//    setup calls only, never from that thread itself.
#pragma once

#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "kvf/fabric/transport.h"

namespace kvf::fabric {

class HelperThreads {
 public:
  HelperThreads() = default;
  HelperThreads(const HelperThreads&) = delete;
  HelperThreads& operator=(const HelperThreads&) = delete;
  ~HelperThreads() { join_all(); }

  template <typename Work>
  void spawn(Work&& work) {
    std::lock_guard lock(mutex_);
    threads_.emplace_back(std::forward<Work>(work));
  }

  void join_all() {
    for (;;) {
      std::vector<std::thread> batch;
      {
        std::lock_guard lock(mutex_);
        batch.swap(threads_);
      }
      if (batch.empty()) return;
      for (std::thread& t : batch) t.join();
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::thread> threads_;
};

template <typename T>
T call_on(Transport& transport, const std::function<T()>& fn) {
  std::promise<T> promise;
  auto future = promise.get_future();
  transport.post([&] { promise.set_value(fn()); });
  return future.get();
}

}  // namespace kvf::fabric
