// kvfabric-placement-bench: issue 6's trace-driven comparison of placement policies. Runs the
// same Zipf trace (many contexts, DRAM smaller than the working set, an SSD tier at a set
// bandwidth) through each static codec with LRU and through the adaptive planner at a sweep of
// delay weights, then reports, for each static codec, the adaptive policy's mean load delay at a
// quality at least as high (its anchor is the static codec in the same run) and the ratio.
// Codec profiles (size ratio, quality, decode speed) come from --profiles, as written by
// kvfabric-codec-quality --profiles-out.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/protocol/kv_codec.h"
#include "perf_util.h"
#include "kvf/control/placement_service.h"
#include "placement_sim.h"

namespace {

using kvf::perf::SimResult;

// The profiles file, read as kvfabricd reads a placement policy's profiles (one parser, one set of
// checks).
std::vector<kvf::store::CodecProfile> read_profiles(const std::string& path) {
  auto profiles = kvf::control::read_codec_profiles(path);
  if (!profiles.ok()) throw std::runtime_error(profiles.status().message());
  return std::move(profiles.value());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

SimResult median_of(const std::vector<SimResult>& runs) {
  SimResult r = runs.front();
  auto pick = [&](auto field) {
    std::vector<double> v;
    for (const SimResult& s : runs) v.push_back(s.*field);
    return median(v);
  };
  r.mean_delay_seconds = pick(&SimResult::mean_delay_seconds);
  r.mean_quality = pick(&SimResult::mean_quality);
  r.reuse_delay_seconds = pick(&SimResult::reuse_delay_seconds);
  r.reuse_quality = pick(&SimResult::reuse_quality);
  r.dram_hits = pick(&SimResult::dram_hits);
  r.ssd_hits = pick(&SimResult::ssd_hits);
  r.misses = pick(&SimResult::misses);
  return r;
}

nlohmann::json to_json(const SimResult& r) {
  return {{"policy", r.policy},
          {"delay_weight", r.delay_weight},
          {"mean_delay_ms", r.mean_delay_seconds * 1e3},
          {"mean_quality", r.mean_quality},
          {"dram_hits", r.dram_hits},
          {"ssd_hits", r.ssd_hits},
          {"misses", r.misses},
          {"recodes", r.recodes}};
}

void print_row(const SimResult& r) {
  std::printf("%-26s %8.3g %9.2f %8.4f %10.2f %8.4f %6.1f%% %6.1f%% %6.1f%%\n", r.policy.c_str(),
              r.delay_weight, r.mean_delay_seconds * 1e3, r.mean_quality, r.reuse_delay_seconds * 1e3,
              r.reuse_quality, r.dram_hits * 100, r.ssd_hits * 100, r.misses * 100);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-placement-bench",
                           "Static codecs with LRU vs the adaptive placement planner on a Zipf trace.");
  options.add_options()("profiles", "codec profiles JSON (kvfabric-codec-quality --profiles-out)",
                        cxxopts::value<std::string>())("contexts", "distinct contexts",
                                                       cxxopts::value<uint32_t>()->default_value("2000"))(
      "requests", "requests in the trace", cxxopts::value<uint64_t>()->default_value("40000"))(
      "zipf", "Zipf exponent of context popularity", cxxopts::value<double>()->default_value("0.9"))(
      "min-tokens", "shortest context", cxxopts::value<uint32_t>()->default_value("1024"))(
      "max-tokens", "longest context", cxxopts::value<uint32_t>()->default_value("16384"))(
      "bytes-per-token", "raw KV bytes a token (Llama-3-8B bf16: 131072)",
      cxxopts::value<uint64_t>()->default_value("131072"))(
      "prefill-us-per-token", "recompute cost (H200 reference engine, 8192 tokens: 57)",
      cxxopts::value<double>()->default_value("57"))("dram-fraction",
                                                     "DRAM store size as a fraction of the working set",
                                                     cxxopts::value<double>()->default_value("0.1"))(
      "ssd-fraction", "SSD tier size as a fraction of the working set",
      cxxopts::value<double>()->default_value("0.5"))("dram-gbps",
                                                      "DRAM store -> GPU GB/s (pinned copy on the H200: 55)",
                                                      cxxopts::value<double>()->default_value("50"))(
      "ssd-gbps", "SSD tier GB/s", cxxopts::value<double>()->default_value("2"))(
      "sensitivity-sigma", "spread of the contexts' sensitivity to compression (log-normal sigma; 0: alike)",
      cxxopts::value<double>()->default_value("0"))("drift-every", "requests between popularity shifts",
                                                    cxxopts::value<uint64_t>()->default_value("5000"))(
      "replan-every", "requests between adaptive re-plans", cxxopts::value<uint64_t>()->default_value("200"))(
      "half-life", "reuse estimate's half-life in requests", cxxopts::value<double>()->default_value("4000"))(
      "weights", "delay weights to sweep (quality per second)",
      cxxopts::value<std::vector<double>>()->default_value(
          "0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1,2,5,10,20,50,100,1000"))(
      "seeds", "traces (seeds 1..N); figures are medians over them",
      cxxopts::value<uint32_t>()->default_value("3"))("json", "write the results here",
                                                      cxxopts::value<std::string>())("h,help", "this help");
  try {
    const auto args = options.parse(argc, argv);
    if (args.count("help")) {
      std::cout << options.help() << "\n";
      return 0;
    }
    if (!args.count("profiles")) throw std::runtime_error("--profiles FILE is required");
    const auto profiles = read_profiles(args["profiles"].as<std::string>());
    kvf::perf::TraceConfig trace_config;
    trace_config.contexts = args["contexts"].as<uint32_t>();
    trace_config.requests = args["requests"].as<uint64_t>();
    trace_config.zipf = args["zipf"].as<double>();
    trace_config.min_tokens = args["min-tokens"].as<uint32_t>();
    trace_config.max_tokens = args["max-tokens"].as<uint32_t>();
    trace_config.bytes_per_token = args["bytes-per-token"].as<uint64_t>();
    trace_config.prefill_seconds_per_token = args["prefill-us-per-token"].as<double>() * 1e-6;
    trace_config.drift_every = args["drift-every"].as<uint64_t>();
    trace_config.sensitivity_sigma = args["sensitivity-sigma"].as<double>();
    if (trace_config.contexts == 0 || trace_config.requests == 0) throw std::runtime_error("empty trace");
    kvf::perf::AdaptiveConfig adaptive;
    adaptive.replan_every = std::max<uint64_t>(1, args["replan-every"].as<uint64_t>());
    adaptive.reuse_half_life = args["half-life"].as<double>();
    const auto weights = args["weights"].as<std::vector<double>>();
    const uint32_t seeds = std::max<uint32_t>(1, args["seeds"].as<uint32_t>());

    std::vector<std::vector<SimResult>> static_runs(profiles.size());
    std::vector<std::vector<SimResult>> adaptive_runs(weights.size());
    uint64_t working_set = 0;
    for (uint32_t seed = 1; seed <= seeds; ++seed) {
      trace_config.seed = seed;
      const kvf::perf::Trace trace = kvf::perf::make_trace(trace_config);
      working_set = trace.working_set_bytes;
      kvf::store::PlannerConfig node;
      node.codecs = profiles;
      node.dram_bytes =
          static_cast<uint64_t>(args["dram-fraction"].as<double>() * static_cast<double>(working_set));
      node.ssd_bytes =
          static_cast<uint64_t>(args["ssd-fraction"].as<double>() * static_cast<double>(working_set));
      node.dram_bytes_per_second = args["dram-gbps"].as<double>() * 1e9;
      node.ssd_bytes_per_second = args["ssd-gbps"].as<double>() * 1e9;
      std::fprintf(stderr, "seed %u: %zu contexts, %.1f GiB working set, DRAM %.1f GiB, SSD %.1f GiB\n", seed,
                   trace.tokens.size(), static_cast<double>(working_set) / (1ull << 30),
                   static_cast<double>(node.dram_bytes) / (1ull << 30),
                   static_cast<double>(node.ssd_bytes) / (1ull << 30));
      // Static policies and adaptive weights alternate within each seed.
      for (size_t i = 0; i < std::max(profiles.size(), weights.size()); ++i) {
        if (i < profiles.size()) {
          static_runs[i].push_back(
              kvf::perf::simulate_static(trace_config, trace, node, static_cast<int>(i)));
        }
        if (i < weights.size()) {
          node.delay_weight = weights[i];
          adaptive_runs[i].push_back(kvf::perf::simulate_adaptive(trace_config, trace, node, adaptive));
        }
      }
      std::fprintf(stderr, "seed %u done\n", seed);
    }

    std::printf(
        "trace: %u contexts, %lu requests, Zipf %.2f, %u-%u tokens, working set %.1f GiB; medians of %u "
        "seeds\n",
        trace_config.contexts, static_cast<unsigned long>(trace_config.requests), trace_config.zipf,
        trace_config.min_tokens, trace_config.max_tokens, static_cast<double>(working_set) / (1ull << 30),
        seeds);
    std::printf("delay and quality: over all requests; reuse: over requests whose context was seen before\n");
    std::printf("%-26s %8s %9s %8s %10s %8s %7s %7s %7s\n", "policy", "weight", "delay ms", "quality",
                "reuse ms", "reuse q", "DRAM", "SSD", "miss");
    std::vector<SimResult> statics, adaptives;
    for (const auto& runs : static_runs) statics.push_back(median_of(runs));
    for (size_t i = 0; i < adaptive_runs.size(); ++i) {
      adaptives.push_back(median_of(adaptive_runs[i]));
      adaptives.back().delay_weight = weights[i];
    }
    for (const SimResult& r : statics) print_row(r);
    for (const SimResult& r : adaptives) print_row(r);

    // At equal quality: for each static codec, the adaptive run with the lowest delay among those
    // whose quality is at least the static codec's; on the reuse requests (what caching can
    // change) and, beside it, on all requests.
    std::printf("\nat equal quality (adaptive's best delay at a quality >= the static codec's):\n");
    std::printf("%-24s %10s %8s %12s %8s %7s %13s\n", "static policy", "reuse ms", "reuse q", "adaptive ms",
                "weight", "ratio", "all-req ratio");
    nlohmann::json comparisons = nlohmann::json::array();
    for (const SimResult& st : statics) {
      const SimResult* match = nullptr;
      const SimResult* match_all = nullptr;
      for (const SimResult& a : adaptives) {
        if (a.reuse_quality + 1e-9 >= st.reuse_quality &&
            (match == nullptr || a.reuse_delay_seconds < match->reuse_delay_seconds)) {
          match = &a;
        }
        if (a.mean_quality + 1e-9 >= st.mean_quality &&
            (match_all == nullptr || a.mean_delay_seconds < match_all->mean_delay_seconds)) {
          match_all = &a;
        }
      }
      const double ratio = match ? st.reuse_delay_seconds / match->reuse_delay_seconds : 0.0;
      const double ratio_all = match_all ? st.mean_delay_seconds / match_all->mean_delay_seconds : 0.0;
      if (match == nullptr) {
        std::printf("%-24s %10.2f %8.4f %12s\n", st.policy.c_str(), st.reuse_delay_seconds * 1e3,
                    st.reuse_quality, "none");
      } else {
        std::printf("%-24s %10.2f %8.4f %12.2f %8.3g %6.2fx %12.2fx\n", st.policy.c_str(),
                    st.reuse_delay_seconds * 1e3, st.reuse_quality, match->reuse_delay_seconds * 1e3,
                    match->delay_weight, ratio, ratio_all);
      }
      comparisons.push_back({{"static", to_json(st)},
                             {"adaptive", match ? to_json(*match) : nlohmann::json()},
                             {"ratio", ratio},
                             {"ratio_all_requests", ratio_all}});
    }
    if (args.count("json")) {
      nlohmann::json out;
      out["statics"] = nlohmann::json::array();
      for (const auto& r : statics) out["statics"].push_back(to_json(r));
      out["adaptive"] = nlohmann::json::array();
      for (const auto& r : adaptives) out["adaptive"].push_back(to_json(r));
      out["comparisons"] = comparisons;
      out["working_set_bytes"] = working_set;
      if (kvf::Status s = kvf::perf::write_json_file(args["json"].as<std::string>(), out); !s.ok())
        throw std::runtime_error(s.message());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvfabric-placement-bench: %s\n", e.what());
    return 2;
  }
}
