// PlacementService: kvfabricd's adaptive placement. Every interval it re-plans, for every entry
// of the node's store, a codec and a tier with store::PlacementPlanner (utility = predicted reuse
// x (quality - delay_weight x load delay), greedy by marginal utility under the DRAM and SSD
// capacities) and applies what changed: entries the plan does not keep are cleared, entries
// planned for the SSD tier are demoted (ChunkStore::demote), entries planned for DRAM that are on
// the SSD are promoted (a lease taken and released), and entries planned in DRAM with another
// codec are re-encoded through the control API's compress (so /compress and the service encode
// alike). Reuse is predicted per entry from its loads (ChunkStore's EntryInfo::loads): an
// exponentially decayed count of the loads seen in past intervals (half-life from the policy),
// plus a base for entries not yet loaded, so a prefix just stored is not dropped before anyone
// could reuse it. Pinned entries stay as they are; their bytes are taken off the DRAM budget.
// Entries whose codec no profile describes, or whose model the topology does not know, are left
// alone (counted as unplanned). Lossy codecs are never undone (the planner offers an entry held
// lossy only codecs of equal or lower quality).
//
// The policy comes from a JSON file named by the topology (store.placement.policy):
//   {"profiles": [{"name": "raw", "codec": "identity", "size_ratio": 1, "quality": 1,
//                  "decode_gbps": 0}, ...],       // as kvfabric-codec-quality --profiles-out
//    "delay_weight": 1.0, "dram_gbps": 50, "ssd_gbps": 2,
//    "recompute_us_per_token": 20, "reuse_half_life_s": 600, "base_reuse": 0.5,
//    "dram_fill": 0.9}                            // all but "profiles" optional (these defaults)
// read_placement_policy reports every problem with the file's name and the field.
//
// Threads: the service runs its own thread (one re-plan at a time); run_once() may also be called
// directly (tests), from one thread at a time. metrics() may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kvf/control/store_control_api.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/store/chunk_store.h"
#include "kvf/store/placement_planner.h"

namespace kvf::control {

struct PlacementPolicy {
  store::PlannerConfig planner;  // codecs, bandwidths and delay_weight; capacities come from the store
  double recompute_seconds_per_token = 20e-6;  // what a dropped chunk costs to prefill again
  double reuse_half_life_seconds = 600;        // how fast past loads stop predicting future ones
  double base_reuse = 0.5;                     // predicted loads of an entry with none yet
  double dram_fill = 0.9;                      // the share of the arena the plan may fill
};

// Parses the policy file (see above). kNotFound when it cannot be opened, kInvalidArgument naming
// the file and field for anything malformed or out of range (no profiles, no identity profile,
// unknown codec names, ratios outside (0, 2], qualities outside [0, 1], negative rates).
Result<PlacementPolicy> read_placement_policy(const std::string& path);
// The codec profiles of such a file alone (kvfabric-codec-quality --profiles-out writes them; the
// placement bench reads them); same errors.
Result<std::vector<store::CodecProfile>> read_codec_profiles(const std::string& path);

// What one re-plan did.
struct PlacementRound {
  uint64_t entries = 0;    // entries in the store when it started
  uint64_t planned = 0;    // of those, entries the planner placed (the rest: pinned or unplanned)
  uint64_t unplanned = 0;  // codec without a profile, or model unknown to the topology
  uint64_t recoded = 0;    // re-encoded with the planned codec
  uint64_t demoted = 0;    // DRAM -> SSD
  uint64_t promoted = 0;   // SSD -> DRAM
  uint64_t dropped = 0;    // not kept (cheaper to recompute)
  uint64_t failed = 0;     // changes that did not apply (the entry was leased, cleared, ...)
  double utility = 0;      // the plan's summed utility
  std::string to_string() const;
};

class PlacementService {
 public:
  // `topology`, `store` and `api` must outlive the service. With `interval` zero no thread runs
  // (call run_once()).
  PlacementService(const fabric::Topology& topology, store::ChunkStore& store, StoreControlApi& api,
                   PlacementPolicy policy, std::chrono::milliseconds interval);
  ~PlacementService();
  PlacementService(const PlacementService&) = delete;
  PlacementService& operator=(const PlacementService&) = delete;

  // One re-plan, now, with `elapsed` as the time since the last one (for the reuse decay).
  PlacementRound run_once(std::chrono::duration<double> elapsed);
  // Prometheus lines: rounds run and the totals of what they did.
  std::string metrics() const;

 private:
  struct Reuse {
    uint64_t loads_seen = 0;  // EntryInfo::loads at the last round
    double score = 0;         // decayed loads per half-life
  };
  void run();

  const fabric::Topology& topology_;
  store::ChunkStore& store_;
  StoreControlApi& api_;
  const PlacementPolicy policy_;
  const std::chrono::milliseconds interval_;
  std::unordered_map<protocol::ChunkKey, Reuse> reuse_;
  std::atomic<uint64_t> rounds_{0}, recoded_{0}, demoted_{0}, promoted_{0}, dropped_{0}, failed_{0};
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after everything above is made
};

}  // namespace kvf::control
