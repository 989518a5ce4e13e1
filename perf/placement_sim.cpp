#include "placement_sim.h"

#include <algorithm>
#include <cmath>
#include <list>
#include <random>

namespace kvf::perf {
namespace {

using protocol::Tier;
using store::PlacementState;
using store::PlannerConfig;
using store::PlannerEntry;

double recompute_seconds(const TraceConfig& config, uint32_t tokens) {
  return config.prefill_seconds_per_token * tokens;
}

PlannerEntry entry_of(const TraceConfig& config, const Trace& trace, uint32_t context) {
  PlannerEntry e;
  e.raw_bytes = uint64_t{trace.tokens[context]} * config.bytes_per_token;
  e.recompute_seconds = recompute_seconds(config, trace.tokens[context]);
  e.quality_scale = trace.sensitivity[context];
  return e;
}

// Sums over requests. A context's first request cannot hit under any policy (a compulsory
// miss): the "reuse" figures leave those out, so that they compare what policies can change.
struct Tally {
  double delay = 0, quality = 0;
  double reuse_delay = 0, reuse_quality = 0;
  uint64_t dram = 0, ssd = 0, miss = 0, reuse_requests = 0;
  std::vector<bool> seen;

  explicit Tally(size_t contexts) : seen(contexts, false) {}
  void add(uint32_t context, double d, double q, int where) {
    delay += d;
    quality += q;
    (where == 0 ? dram : where == 1 ? ssd : miss) += 1;
    if (seen[context]) {
      reuse_delay += d;
      reuse_quality += q;
      ++reuse_requests;
    }
    seen[context] = true;
  }
  SimResult result(std::string policy, uint64_t n) const {
    SimResult r;
    r.policy = std::move(policy);
    const double count = static_cast<double>(std::max<uint64_t>(1, n));
    const double reuses = static_cast<double>(std::max<uint64_t>(1, reuse_requests));
    r.mean_delay_seconds = delay / count;
    r.mean_quality = quality / count;
    r.reuse_delay_seconds = reuse_delay / reuses;
    r.reuse_quality = reuse_quality / reuses;
    r.dram_hits = static_cast<double>(dram) / count;
    r.ssd_hits = static_cast<double>(ssd) / count;
    r.misses = static_cast<double>(miss) / count;
    return r;
  }
};

// One LRU tier of whole entries: most recent at the front.
class LruTier {
 public:
  explicit LruTier(uint64_t capacity, size_t contexts)
      : capacity_(capacity), where_(contexts), in_(contexts, false) {}
  bool contains(uint32_t c) const { return in_[c]; }
  void touch(uint32_t c) { order_.splice(order_.begin(), order_, where_[c]); }
  void erase(uint32_t c, uint64_t bytes) {
    order_.erase(where_[c]);
    in_[c] = false;
    used_ -= bytes;
  }
  // Inserts at the front; returns the entries evicted to make room (least recent first).
  std::vector<uint32_t> insert(uint32_t c, uint64_t bytes, const std::vector<uint64_t>& size_of) {
    std::vector<uint32_t> evicted;
    while (used_ + bytes > capacity_ && !order_.empty()) {
      const uint32_t victim = order_.back();
      erase(victim, size_of[victim]);
      evicted.push_back(victim);
    }
    order_.push_front(c);
    where_[c] = order_.begin();
    in_[c] = true;
    used_ += bytes;
    return evicted;
  }
  bool fits_ever(uint64_t bytes) const { return bytes <= capacity_; }
  bool fits_now(uint64_t bytes) const { return used_ + bytes <= capacity_; }

 private:
  uint64_t capacity_;
  uint64_t used_ = 0;
  std::list<uint32_t> order_;
  std::vector<std::list<uint32_t>::iterator> where_;
  std::vector<bool> in_;
};

}  // namespace

Trace make_trace(const TraceConfig& config) {
  Trace trace;
  std::mt19937_64 rng(config.seed);
  const uint32_t lo = std::max<uint32_t>(256, config.min_tokens) / 256;
  const uint32_t hi = std::max(lo, config.max_tokens / 256);
  std::uniform_int_distribution<uint32_t> chunks(lo, hi);
  trace.tokens.resize(config.contexts);
  for (uint32_t& t : trace.tokens) t = chunks(rng) * 256;
  // Sensitivity to compression, log-normal around 1 (sigma 0: every context alike).
  std::normal_distribution<double> normal(0.0, 1.0);
  trace.sensitivity.resize(config.contexts);
  for (double& s : trace.sensitivity)
    s = config.sensitivity_sigma > 0 ? std::exp(config.sensitivity_sigma * normal(rng)) : 1.0;

  std::vector<double> cdf(config.contexts);
  double sum = 0;
  for (uint32_t r = 0; r < config.contexts; ++r) {
    sum += 1.0 / std::pow(static_cast<double>(r + 1), config.zipf);
    cdf[r] = sum;
  }
  std::vector<uint32_t> context_of_rank(config.contexts);
  for (uint32_t r = 0; r < config.contexts; ++r) context_of_rank[r] = r;
  std::shuffle(context_of_rank.begin(), context_of_rank.end(), rng);

  std::uniform_real_distribution<double> uniform(0.0, sum);
  std::uniform_int_distribution<uint32_t> any_rank(0, config.contexts - 1);
  std::vector<bool> seen(config.contexts, false);
  trace.requests.reserve(config.requests);
  for (uint64_t i = 0; i < config.requests; ++i) {
    if (config.drift_every > 0 && i > 0 && i % config.drift_every == 0) {
      const auto swaps = static_cast<uint32_t>(config.drift_fraction * config.contexts);
      for (uint32_t s = 0; s < swaps; ++s)
        std::swap(context_of_rank[any_rank(rng)], context_of_rank[any_rank(rng)]);
    }
    const double u = uniform(rng);
    const auto rank = static_cast<uint32_t>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    const uint32_t c = context_of_rank[std::min(rank, config.contexts - 1)];
    trace.requests.push_back(c);
    if (!seen[c]) {
      seen[c] = true;
      trace.working_set_bytes += uint64_t{trace.tokens[c]} * config.bytes_per_token;
    }
  }
  return trace;
}

SimResult simulate_static(const TraceConfig& config, const Trace& trace, const PlannerConfig& node,
                          int codec) {
  const size_t n = trace.tokens.size();
  std::vector<uint64_t> size_of(n);
  for (uint32_t c = 0; c < n; ++c)
    size_of[c] = store::placement_bytes(node, entry_of(config, trace, c), codec);
  LruTier dram(node.dram_bytes, n);
  LruTier ssd(node.ssd_bytes, n);
  Tally tally(n);

  // Puts an entry into DRAM; what falls out spills to the SSD, and what falls out of that is gone.
  auto store_in_dram = [&](uint32_t c) {
    if (!dram.fits_ever(size_of[c])) {
      if (ssd.fits_ever(size_of[c])) ssd.insert(c, size_of[c], size_of);
      return;
    }
    for (uint32_t spilled : dram.insert(c, size_of[c], size_of)) {
      if (ssd.fits_ever(size_of[spilled])) ssd.insert(spilled, size_of[spilled], size_of);
    }
  };
  for (uint32_t c : trace.requests) {
    const PlannerEntry e = entry_of(config, trace, c);
    if (dram.contains(c)) {
      dram.touch(c);
      const PlacementState p{codec, Tier::kDram};
      tally.add(c, store::load_delay_seconds(node, e, p), store::placement_quality(node, e, p), 0);
    } else if (ssd.contains(c)) {
      const PlacementState p{codec, Tier::kSsd};
      tally.add(c, store::load_delay_seconds(node, e, p), store::placement_quality(node, e, p), 1);
      ssd.erase(c, size_of[c]);  // reads promote
      store_in_dram(c);
    } else {
      tally.add(c, e.recompute_seconds, 1.0, 2);
      store_in_dram(c);
    }
  }
  return tally.result("static " + node.codecs[static_cast<size_t>(codec)].name + " + LRU",
                      trace.requests.size());
}

SimResult simulate_adaptive(const TraceConfig& config, const Trace& trace, const PlannerConfig& node,
                            const AdaptiveConfig& adaptive) {
  // The store's machinery is the static policy's (LRU in each tier, spills, promotions on SSD
  // hits, misses stored in DRAM); what the planner adds is each entry's codec, chosen by its
  // predicted reuse, and at every re-plan which entries stay, where, and in which codec.
  const size_t n = trace.tokens.size();
  std::vector<int> codec_of(n, store::kNotStored);  // the codec an entry is held in (or will be stored in)
  std::vector<int> planned_codec(n, store::kNotStored);
  std::vector<Tier> planned_tier(n, Tier::kDram);
  std::vector<bool> planned_drop(n, false);
  std::vector<uint64_t> size_of(n, 0);
  std::vector<double> count(n, 0.0);
  std::vector<uint64_t> last_access(n, 0);
  LruTier dram(node.dram_bytes, n);
  LruTier ssd(node.ssd_bytes, n);
  uint64_t recodes = 0;
  Tally tally(n);
  const double decay_per_request = std::log(2.0) / adaptive.reuse_half_life;

  auto reuse_at = [&](uint32_t c, uint64_t now) {
    return count[c] * std::exp(-decay_per_request * static_cast<double>(now - last_access[c]));
  };
  // The codec an entry of this reuse is best stored in, on its own (capacity aside): what a miss
  // uses when the last plan did not cover the entry.
  auto best_codec = [&](uint32_t c, double reuse) {
    PlannerEntry e = entry_of(config, trace, c);
    e.reuse = std::max(1.0, reuse);
    int best = 0;
    double best_utility = -1e300;
    for (int k = 0; k < static_cast<int>(node.codecs.size()); ++k) {
      const double u =
          e.reuse * (store::placement_quality(node, e, PlacementState{k, Tier::kDram}) -
                     node.delay_weight * store::load_delay_seconds(node, e, PlacementState{k, Tier::kDram}));
      if (u > best_utility) {
        best_utility = u;
        best = k;
      }
    }
    return best;
  };
  auto spill = [&](const std::vector<uint32_t>& evicted) {
    for (uint32_t v : evicted) {
      if (ssd.fits_ever(size_of[v])) ssd.insert(v, size_of[v], size_of);
    }
  };
  auto put_in_dram = [&](uint32_t c) {
    if (dram.fits_ever(size_of[c])) {
      spill(dram.insert(c, size_of[c], size_of));
    } else if (ssd.fits_ever(size_of[c])) {
      ssd.insert(c, size_of[c], size_of);
    }
  };
  auto remove = [&](uint32_t c) {
    if (dram.contains(c)) dram.erase(c, size_of[c]);
    if (ssd.contains(c)) ssd.erase(c, size_of[c]);
  };
  auto set_codec = [&](uint32_t c, int codec) {
    codec_of[c] = codec;
    size_of[c] = store::placement_bytes(node, entry_of(config, trace, c), codec);
  };

  for (uint64_t i = 0; i < trace.requests.size(); ++i) {
    if (i > 0 && i % adaptive.replan_every == 0) {
      std::vector<PlannerEntry> entries(n);
      for (uint32_t c = 0; c < n; ++c) {
        entries[c] = entry_of(config, trace, c);
        entries[c].reuse = reuse_at(c, i);
        if (dram.contains(c) || ssd.contains(c)) {
          entries[c].current = PlacementState{codec_of[c], dram.contains(c) ? Tier::kDram : Tier::kSsd};
        }
      }
      const std::vector<PlacementState> plan = store::plan_placement(node, entries);
      // Leave and shrink first, then move up, so that the moves find the room the plan counted on.
      std::vector<uint32_t> to_dram;
      for (uint32_t c = 0; c < n; ++c) {
        planned_codec[c] = plan[c].codec;
        planned_tier[c] = plan[c].tier;
        planned_drop[c] = plan[c].codec == store::kNotStored && entries[c].reuse > 0;
        const bool held = dram.contains(c) || ssd.contains(c);
        if (!held) continue;
        if (plan[c].codec == store::kNotStored) {
          remove(c);
          continue;
        }
        if (plan[c].codec != codec_of[c] || (plan[c].tier == Tier::kDram) != dram.contains(c)) {
          if (plan[c].codec != codec_of[c]) ++recodes;
          remove(c);
          set_codec(c, plan[c].codec);
          if (plan[c].tier == Tier::kDram) {
            to_dram.push_back(c);
          } else if (ssd.fits_ever(size_of[c])) {
            ssd.insert(c, size_of[c], size_of);
          }
        }
      }
      for (uint32_t c : to_dram) put_in_dram(c);
    }
    const uint32_t c = trace.requests[i];
    const PlannerEntry e = entry_of(config, trace, c);
    if (dram.contains(c)) {
      dram.touch(c);
      tally.add(c, store::load_delay_seconds(node, e, PlacementState{codec_of[c], Tier::kDram}),
                store::placement_quality(node, e, PlacementState{codec_of[c], Tier::kDram}), 0);
    } else if (ssd.contains(c)) {
      tally.add(c, store::load_delay_seconds(node, e, PlacementState{codec_of[c], Tier::kSsd}),
                store::placement_quality(node, e, PlacementState{codec_of[c], Tier::kSsd}), 1);
      if (planned_codec[c] != store::kNotStored && planned_tier[c] == Tier::kSsd) {
        ssd.touch(c);  // the plan keeps it on the SSD
      } else {
        ssd.erase(c, size_of[c]);  // reads promote
        put_in_dram(c);
      }
    } else {
      tally.add(c, e.recompute_seconds, 1.0, 2);
      // Recomputed: stored where and how the plan says. An entry the plan has not seen yet is
      // admitted to DRAM only into free room (it must not push out entries the plan chose), else
      // to the SSD, in the codec best for its reuse on its own.
      if (planned_codec[c] != store::kNotStored) {
        set_codec(c, planned_codec[c]);
        if (planned_tier[c] == Tier::kDram) {
          put_in_dram(c);
        } else if (ssd.fits_ever(size_of[c])) {
          ssd.insert(c, size_of[c], size_of);
        }
      } else if (!planned_drop[c]) {
        set_codec(c, best_codec(c, reuse_at(c, i) + 1.0));
        if (dram.fits_now(size_of[c])) {
          dram.insert(c, size_of[c], size_of);
        } else if (ssd.fits_ever(size_of[c])) {
          ssd.insert(c, size_of[c], size_of);
        }
      }
    }
    count[c] = reuse_at(c, i) + 1.0;
    last_access[c] = i;
  }
  SimResult r = tally.result("adaptive", trace.requests.size());
  r.delay_weight = node.delay_weight;
  r.recodes = recodes;
  return r;
}

}  // namespace kvf::perf
