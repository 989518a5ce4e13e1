#include "kvf/store/placement_planner.h"

#include <algorithm>
#include <cmath>
#include <queue>

namespace kvf::store {
namespace {

using protocol::Tier;

struct Option {
  PlacementState placement;
  uint64_t bytes = 0;
  double gain = 0;  // utility over the entry's fallback
};

// One step along an entry's hull: from option `from` (or nothing) to option `to`.
struct Step {
  double density = 0;
  uint32_t entry = 0;
  uint32_t hull_index = 0;
  bool operator<(const Step& other) const {
    if (density != other.density) return density < other.density;
    return entry > other.entry;  // ties: lower entries first, so plans are deterministic
  }
};

double utility(const PlannerConfig& config, const PlannerEntry& entry, const PlacementState& placement) {
  return entry.reuse * (placement_quality(config, entry, placement) -
                        config.delay_weight * load_delay_seconds(config, entry, placement));
}

bool codec_allowed(const PlannerConfig& config, const PlannerEntry& entry, int codec) {
  if (entry.current.codec == kNotStored || entry.current.codec == codec) return true;
  // Lossy bytes cannot become better ones: only codecs of equal or lower quality.
  return config.codecs[static_cast<size_t>(codec)].quality <=
         config.codecs[static_cast<size_t>(entry.current.codec)].quality;
}

// The upper convex hull of (bytes, gain) from the origin, keeping only options that add gain.
std::vector<Option> hull_of(std::vector<Option> options) {
  std::sort(options.begin(), options.end(), [](const Option& a, const Option& b) {
    return a.bytes != b.bytes ? a.bytes < b.bytes : a.gain > b.gain;
  });
  std::vector<Option> hull;
  for (const Option& o : options) {
    if (o.gain <= (hull.empty() ? 0.0 : hull.back().gain)) continue;
    // Drop points that fall below the segment from their predecessor to this one.
    while (!hull.empty()) {
      const double prev_bytes = hull.size() >= 2 ? static_cast<double>(hull[hull.size() - 2].bytes) : 0.0;
      const double prev_gain = hull.size() >= 2 ? hull[hull.size() - 2].gain : 0.0;
      const Option& last = hull.back();
      const double slope_last =
          (last.gain - prev_gain) / std::max(1.0, static_cast<double>(last.bytes) - prev_bytes);
      const double slope_new =
          (o.gain - prev_gain) / std::max(1.0, static_cast<double>(o.bytes) - prev_bytes);
      if (slope_new >= slope_last) {
        hull.pop_back();
      } else {
        break;
      }
    }
    hull.push_back(o);
  }
  return hull;
}

// Fills `capacity` greedily by gain per byte along each candidate entry's hull of options in `tier`,
// relative to `fallback[e]`. Entries already placed (placed[e]) are skipped.
uint64_t fill_tier(const PlannerConfig& config, std::span<const PlannerEntry> entries, Tier tier,
                   uint64_t capacity, const std::vector<double>& fallback, std::vector<PlacementState>& plan,
                   std::vector<bool>& placed) {
  std::vector<std::vector<Option>> hulls(entries.size());
  std::priority_queue<Step> heap;
  for (uint32_t e = 0; e < entries.size(); ++e) {
    if (placed[e] || entries[e].reuse <= 0) continue;
    std::vector<Option> options;
    for (int c = 0; c < static_cast<int>(config.codecs.size()); ++c) {
      if (!codec_allowed(config, entries[e], c)) continue;
      const PlacementState p{c, tier};
      const double gain = utility(config, entries[e], p) - fallback[e];
      if (gain > 0) options.push_back({p, placement_bytes(config, entries[e], c), gain});
    }
    hulls[e] = hull_of(std::move(options));
    if (!hulls[e].empty()) {
      const Option& first = hulls[e][0];
      heap.push({first.gain / static_cast<double>(std::max<uint64_t>(1, first.bytes)), e, 0});
    }
  }
  uint64_t used = 0;
  std::vector<int> chosen(entries.size(), -1);
  while (!heap.empty()) {
    const Step step = heap.top();
    heap.pop();
    const std::vector<Option>& hull = hulls[step.entry];
    const uint64_t before = chosen[step.entry] < 0 ? 0 : hull[static_cast<size_t>(chosen[step.entry])].bytes;
    const uint64_t extra = hull[step.hull_index].bytes - before;
    if (extra > capacity - used) continue;  // does not fit: this entry stays where it is
    used += extra;
    chosen[step.entry] = static_cast<int>(step.hull_index);
    if (step.hull_index + 1 < hull.size()) {
      const Option& next = hull[step.hull_index + 1];
      const double d_gain = next.gain - hull[step.hull_index].gain;
      const double d_bytes =
          static_cast<double>(std::max<uint64_t>(1, next.bytes - hull[step.hull_index].bytes));
      heap.push({d_gain / d_bytes, step.entry, step.hull_index + 1});
    }
  }
  for (uint32_t e = 0; e < entries.size(); ++e) {
    if (chosen[e] < 0) continue;
    plan[e] = hulls[e][static_cast<size_t>(chosen[e])].placement;
    placed[e] = true;
  }
  return used;
}

}  // namespace

uint64_t placement_bytes(const PlannerConfig& config, const PlannerEntry& entry, int codec) {
  if (codec == kNotStored) return 0;
  return static_cast<uint64_t>(
      std::ceil(static_cast<double>(entry.raw_bytes) * config.codecs[static_cast<size_t>(codec)].size_ratio));
}

double placement_quality(const PlannerConfig& config, const PlannerEntry& entry,
                         const PlacementState& placement) {
  if (placement.codec == kNotStored) return 1.0;
  const double loss =
      (1.0 - config.codecs[static_cast<size_t>(placement.codec)].quality) * entry.quality_scale;
  return std::clamp(1.0 - loss, 0.0, 1.0);
}

double load_delay_seconds(const PlannerConfig& config, const PlannerEntry& entry,
                          const PlacementState& placement) {
  if (placement.codec == kNotStored) return entry.recompute_seconds;
  const CodecProfile& codec = config.codecs[static_cast<size_t>(placement.codec)];
  const double bytes = static_cast<double>(placement_bytes(config, entry, placement.codec));
  double delay = bytes / config.dram_bytes_per_second;
  if (placement.tier == Tier::kSsd) delay += bytes / config.ssd_bytes_per_second;
  if (codec.decode_bytes_per_second > 0)
    delay += static_cast<double>(entry.raw_bytes) / codec.decode_bytes_per_second;
  return delay;
}

std::vector<PlacementState> plan_placement(const PlannerConfig& config, std::span<const PlannerEntry> entries,
                                           PlanTotals* totals) {
  std::vector<PlacementState> plan(entries.size());
  std::vector<bool> placed(entries.size(), false);
  std::vector<double> not_stored(entries.size());
  std::vector<double> ssd_fallback(entries.size());
  for (size_t e = 0; e < entries.size(); ++e) {
    not_stored[e] = utility(config, entries[e], PlacementState{});
    ssd_fallback[e] = not_stored[e];
    if (config.ssd_bytes == 0) continue;
    for (int c = 0; c < static_cast<int>(config.codecs.size()); ++c) {
      if (!codec_allowed(config, entries[e], c)) continue;
      if (placement_bytes(config, entries[e], c) > config.ssd_bytes) continue;
      ssd_fallback[e] = std::max(ssd_fallback[e], utility(config, entries[e], PlacementState{c, Tier::kSsd}));
    }
  }
  // DRAM first, valued over what the entry would get on the SSD; then the SSD for the rest; then
  // whatever DRAM is left for entries the SSD could not take, valued over not keeping them.
  uint64_t dram = fill_tier(config, entries, Tier::kDram, config.dram_bytes, ssd_fallback, plan, placed);
  const uint64_t ssd = fill_tier(config, entries, Tier::kSsd, config.ssd_bytes, not_stored, plan, placed);
  dram += fill_tier(config, entries, Tier::kDram, config.dram_bytes - dram, not_stored, plan, placed);
  if (totals != nullptr) {
    totals->dram_bytes = dram;
    totals->ssd_bytes = ssd;
    totals->utility = 0;
    for (size_t e = 0; e < entries.size(); ++e) totals->utility += utility(config, entries[e], plan[e]);
  }
  return plan;
}

}  // namespace kvf::store
