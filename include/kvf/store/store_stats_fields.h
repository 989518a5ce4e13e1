// StoreStats field by field: each field's name, whether it is a gauge or a counter, and a pointer
// to it, in one table. The store RPC sends stats as (name, value) pairs built from it, the client
// reads them back by name (a field the daemon does not send stays 0), and /metrics renders it.
// Constant data and pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvf/store/store_stats.h"

namespace kvf::store {

struct StoreStatsField {
  std::string_view name;  // snake_case, as in StoreStats
  bool counter;           // false: a gauge
  uint64_t StoreStats::*member;
  std::string_view help;  // one line for Prometheus' HELP
};

std::span<const StoreStatsField> store_stats_fields();

std::vector<std::pair<std::string, uint64_t>> store_stats_to_pairs(const StoreStats& s);
// Unknown names are ignored (a newer daemon may send more).
StoreStats store_stats_from_pairs(std::span<const std::pair<std::string, uint64_t>> pairs);

}  // namespace kvf::store
