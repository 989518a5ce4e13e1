// StoreControlApi: the ControlApi of one node, over that node's ChunkStore: what kvfabricd serves
// on its HTTP port. Lookups hash tokens with the topology's model (fingerprint and chunk size), the
// way engines do, and report the node's own store (tier dram); pin, unpin and clear (all or keys)
// act on the store; health, stats and metrics read it. Not built yet, and answered with
// kUnavailable saying so: move (needs remote fetch between daemons), compress (no codecs yet) and
// clear by model (the store does not record which model a chunk belongs to).
// Thread-safe: every method may be called from several threads at once (the store is).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvf/control/control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/store/chunk_store.h"

namespace kvf::control {

class StoreControlApi final : public ControlApi {
 public:
  // Extra Prometheus lines (e.g. the RPC server's counters), appended to metrics(); may be empty.
  using ExtraMetrics = std::function<std::string()>;

  // `topology` and `store` must outlive this object; `node` is a node of `topology`.
  StoreControlApi(const fabric::Topology& topology, std::string node, store::ChunkStore& store,
                  ExtraMetrics extra_metrics = {});

  Result<LookupResult> lookup(const LookupRequest& request) override;
  Result<PinResult> pin(const PinRequest& request) override;
  Result<PinResult> unpin(const PinRequest& request) override;
  Result<ClearResult> clear(const ClearRequest& request) override;
  Result<MoveResult> move(const MoveRequest& request) override;
  Result<CompressResult> compress(const CompressRequest& request) override;
  HealthReport health() override;
  Result<ControlStats> stats() override;
  Result<std::string> metrics() override;

 private:
  const fabric::Topology& topology_;
  std::string node_;
  store::ChunkStore& store_;
  ExtraMetrics extra_metrics_;
  std::chrono::steady_clock::time_point started_;
  std::atomic<uint64_t> lookups_{0};
};

}  // namespace kvf::control
