// PlacementPlanner: the adaptive policy that picks, per stored context, a codec and a tier (DRAM,
// SSD, or not kept) to get the most out of the node's DRAM at a quality budget (the AdaptCache
// approach). Each choice has a utility
//     reuse x (quality - delay_weight x load_delay)
// where reuse is the entry's predicted number of future loads, quality is the codec's (1 for
// lossless; a lossy codec's measured next-token agreement), and load_delay is the time to bring
// the entry to the engine: encoded bytes / the tier's bandwidth + decoding. Not keeping an entry
// means recomputing it on its next use: quality 1 and the recompute time as its delay. The plan
// maximises the summed utility under the DRAM and SSD capacities, greedily by marginal utility per
// byte (a multiple-choice knapsack: each entry's options on their upper convex hull, DRAM filled
// first, the SSD from what is left). delay_weight trades delay for quality: 0 keeps everything
// lossless; large values compress hard.
// Entries differ in how well they tolerate compression (AdaptCache's observation); each entry's
// quality_scale, from the error estimate its encoder recorded, scales the codecs' quality loss.
// Lossy compression cannot be undone: an entry held with a lossy codec is only offered codecs of
// equal or lower quality (or dropping), never a better one.
// Pure computation on the caller's data; no state, safe from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/tier.h"

namespace kvf::store {

// What a codec does to an entry, as measured (perf/RESULTS.md): encoded / raw bytes, the quality
// of what it decodes to, and how fast the engine decodes it (raw bytes per second; 0 = free).
struct CodecProfile {
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;
  std::string name;  // e.g. "int4" or "drop50"; codecs may repeat with other parameters
  double size_ratio = 1.0;
  double quality = 1.0;
  double decode_bytes_per_second = 0;
};

struct PlannerConfig {
  std::vector<CodecProfile> codecs;
  uint64_t dram_bytes = 0;
  uint64_t ssd_bytes = 0;
  double dram_bytes_per_second = 50e9;  // DRAM store -> the engine's GPU
  double ssd_bytes_per_second = 2e9;    // SSD tier -> the engine (reads promote through DRAM)
  double delay_weight = 1.0;            // quality units per second of load delay
};

inline constexpr int kNotStored = -1;

struct PlacementState {
  int codec = kNotStored;  // index into PlannerConfig::codecs, or kNotStored
  protocol::Tier tier = protocol::Tier::kDram;
  bool operator==(const PlacementState&) const = default;
};

struct PlannerEntry {
  uint64_t raw_bytes = 0;
  double reuse = 0;              // predicted future loads
  double recompute_seconds = 0;  // what a miss costs
  // How much this entry suffers from lossy codecs, from the error its encoder recorded: a codec's
  // quality loss (1 - quality) is multiplied by it (1: as measured on average; 0: not at all).
  double quality_scale = 1.0;
  PlacementState current;  // what the store holds now (limits which codecs are possible)
};

struct PlanTotals {
  uint64_t dram_bytes = 0;
  uint64_t ssd_bytes = 0;
  double utility = 0;
};

// The load delay and quality of an entry under a placement (kNotStored: recompute, quality 1).
double load_delay_seconds(const PlannerConfig& config, const PlannerEntry& entry,
                          const PlacementState& placement);
double placement_quality(const PlannerConfig& config, const PlannerEntry& entry,
                         const PlacementState& placement);
uint64_t placement_bytes(const PlannerConfig& config, const PlannerEntry& entry, int codec);

// One placement per entry, in order. `totals`, when given, receives the bytes used and the utility.
std::vector<PlacementState> plan_placement(const PlannerConfig& config, std::span<const PlannerEntry> entries,
                                           PlanTotals* totals = nullptr);

}  // namespace kvf::store
