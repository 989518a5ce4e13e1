// Counters of the HTTP control server itself (requests by route and status code, connections),
// appended to the ControlApi's metrics on GET /metrics. Thread-safe: io threads record, any thread
// renders.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

namespace kvf::control {

class HttpMetrics {
 public:
  // route is a fixed label ("/lookup", or "other" for unknown paths, so that clients cannot grow
  // the label set without bound).
  void record(std::string_view route, unsigned status);
  void connection_opened() {
    accepted_.fetch_add(1, std::memory_order_relaxed);
    open_.fetch_add(1, std::memory_order_relaxed);
  }
  void connection_closed() { open_.fetch_sub(1, std::memory_order_relaxed); }
  int64_t open_connections() const { return open_.load(std::memory_order_relaxed); }
  // Prometheus text format, version 0.0.4.
  std::string render() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, unsigned>, uint64_t> requests_;
  std::atomic<uint64_t> accepted_{0};
  std::atomic<int64_t> open_{0};
};

}  // namespace kvf::control
