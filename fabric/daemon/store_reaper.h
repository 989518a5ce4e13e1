// StoreReaper: a thread that frees what dead or stuck clients hold in a ChunkStore, every
// `interval`: reservations whose writer did not commit within the store's reservation timeout and
// leases whose reader overran the lease timeout (ChunkStore::reap_expired). Disconnected clients
// are freed at once by the RPC server; this catches the ones that stay connected but stop.
// Thread rules: construct and destroy from one owner; the destructor stops and joins the thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "kvf/store/chunk_store.h"

namespace kvf::daemon {

class StoreReaper {
 public:
  StoreReaper(store::ChunkStore& store, std::chrono::milliseconds interval);
  ~StoreReaper();
  StoreReaper(const StoreReaper&) = delete;
  StoreReaper& operator=(const StoreReaper&) = delete;

 private:
  void run();

  store::ChunkStore& store_;
  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace kvf::daemon
