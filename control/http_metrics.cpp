// HttpMetrics: a mutex-guarded map is enough here; a request costs far more than one uncontended
// lock, and the label set is small and fixed.
#include "http_metrics.h"

namespace kvf::control {

void HttpMetrics::record(std::string_view route, unsigned status) {
  std::lock_guard lock(mutex_);
  ++requests_[{std::string(route), status}];
}

std::string HttpMetrics::render() const {
  std::string out;
  out += "# HELP kvf_http_requests_total Control API requests answered, by route and HTTP status code.\n";
  out += "# TYPE kvf_http_requests_total counter\n";
  {
    std::lock_guard lock(mutex_);
    for (const auto& [labels, count] : requests_) {
      out += "kvf_http_requests_total{route=\"" + labels.first + "\",code=\"" +
             std::to_string(labels.second) + "\"} " + std::to_string(count) + "\n";
    }
  }
  out += "# HELP kvf_http_connections_accepted_total Control API connections accepted.\n";
  out += "# TYPE kvf_http_connections_accepted_total counter\n";
  out += "kvf_http_connections_accepted_total " + std::to_string(accepted_.load(std::memory_order_relaxed)) +
         "\n";
  out += "# HELP kvf_http_connections_open Control API connections open now.\n";
  out += "# TYPE kvf_http_connections_open gauge\n";
  out += "kvf_http_connections_open " + std::to_string(open_connections()) + "\n";
  return out;
}

}  // namespace kvf::control
