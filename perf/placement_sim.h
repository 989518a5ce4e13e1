// placement_sim: the trace-driven workload of issue 6's placement benchmark. A trace is many
// contexts (a shared document or conversation each, of varied lengths) requested with Zipf
// popularity that drifts over time; a simulated node has a DRAM store smaller than the working set
// and an SSD tier at a set bandwidth. Each request either loads its context's KV (from DRAM or SSD,
// at the codec's size and quality) or recomputes it. Policies compared on the same trace:
//   static: every entry in one codec, LRU in DRAM, LRU-evicted entries spill to the SSD (itself
//           LRU), SSD hits promote to DRAM, misses store into DRAM;
//   adaptive: store::plan_placement re-run every `replan_every` requests over decayed reuse counts;
//           entries are stored, recoded (to lower quality only), moved or dropped as planned.
// Single-threaded; plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvf/store/placement_planner.h"

namespace kvf::perf {

struct TraceConfig {
  uint32_t contexts = 2000;
  uint64_t requests = 40000;
  double zipf = 0.9;
  uint32_t min_tokens = 1024;
  uint32_t max_tokens = 16384;
  uint64_t bytes_per_token = 131072;         // Llama-3-8B, bf16: 32 layers x 2 x 8 heads x 128 x 2 bytes
  double prefill_seconds_per_token = 57e-6;  // H200, the GPU reference engine at 8192 tokens
  uint64_t drift_every = 5000;               // requests between popularity shifts (0: none)
  double drift_fraction = 0.1;               // of the ranks swapped at each shift
  // Contexts differ in how much compression hurts them: each context's quality loss under a codec
  // is the codec's average loss times a log-normal factor of this sigma (0: all alike).
  double sensitivity_sigma = 0.0;
  uint64_t seed = 1;
};

struct Trace {
  std::vector<uint32_t> tokens;     // per context
  std::vector<double> sensitivity;  // per context: its quality-loss factor
  std::vector<uint32_t> requests;   // context ids
  uint64_t working_set_bytes = 0;   // raw KV of every context requested
};

Trace make_trace(const TraceConfig& config);

struct SimResult {
  std::string policy;
  double delay_weight = 0;  // adaptive only
  double mean_delay_seconds = 0;
  double mean_quality = 0;
  // The same over requests whose context was requested before (compulsory misses left out).
  double reuse_delay_seconds = 0;
  double reuse_quality = 0;
  double dram_hits = 0;  // fractions of requests
  double ssd_hits = 0;
  double misses = 0;
  uint64_t recodes = 0;  // adaptive: entries re-encoded to a lower-quality codec
};

// `node` gives the capacities, bandwidths and codec profiles; `codec` indexes node.codecs.
SimResult simulate_static(const TraceConfig& config, const Trace& trace, const store::PlannerConfig& node,
                          int codec);

struct AdaptiveConfig {
  uint64_t replan_every = 200;
  double reuse_half_life = 4000;  // requests
};
SimResult simulate_adaptive(const TraceConfig& config, const Trace& trace, const store::PlannerConfig& node,
                            const AdaptiveConfig& adaptive);

}  // namespace kvf::perf
