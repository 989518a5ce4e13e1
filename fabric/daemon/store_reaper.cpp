#include "store_reaper.h"

#include <pthread.h>

#include <spdlog/spdlog.h>

namespace kvf::daemon {

StoreReaper::StoreReaper(store::ChunkStore& store, std::chrono::milliseconds interval)
    : store_(store), interval_(interval), thread_([this] { run(); }) {}

StoreReaper::~StoreReaper() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void StoreReaper::run() {
  pthread_setname_np(pthread_self(), "kvfd-reaper");
  std::unique_lock lock(mu_);
  while (!wake_.wait_for(lock, interval_, [this] { return stop_; })) {
    lock.unlock();
    const store::ReapResult r = store_.reap_expired(store::StoreClock::now());
    if (r.reservations > 0 || r.leases > 0) {
      spdlog::info("reaper: freed {} expired reservation(s) and {} expired lease(s)", r.reservations,
                   r.leases);
    }
    lock.lock();
  }
}

}  // namespace kvf::daemon
