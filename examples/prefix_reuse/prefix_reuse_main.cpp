// kvfabric-prefix-reuse: a prefix-reuse workload on the reference engine (the CPU, or one GPU with
// --gpu N, where --shape llama3-8b runs the Llama-3-8B shape), run twice: once
// recomputing every prompt, once through the engine connector (KvConnector) and the node's store
// (kvfabricd). Two workloads: multi-round chat (a shared system prompt, several users, each round
// appending the user's turn and the engine's answer to that user's history) and long documents
// (several questions about each document). Reports time to first token, throughput and the store's
// hit rate for both passes, and checks that every request gives exactly the same tokens with the
// store as without (exit 1 if not): a loaded prefix must be indistinguishable from a computed one.
//
//   kvfabric-prefix-reuse --store /tmp/kvfabric-local.sock [--workload chat|doc|both] ...
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "kvf/engines/engine_model.h"
#include "kvf/engines/kv_connector.h"
#include "kvf/engines/synthetic_prompt.h"
#include "kvf/store/store_client.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

constexpr int kOk = 0, kFailed = 1, kUsage = 2;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct Workload {
  std::string name;
  uint32_t users = 0, rounds = 0, system_tokens = 0, turn_tokens = 0;  // chat
  uint32_t docs = 0, questions = 0, doc_tokens = 0;                    // doc (turn_tokens: a question)
  uint32_t new_tokens = 0;
  uint64_t seed = 1;
  bool overlap_saves = false;
};

struct RequestOutcome {
  std::vector<uint32_t> tokens;
  uint64_t prompt_tokens = 0;
  uint64_t loaded_tokens = 0;
  double ttft_ms = 0;
};

struct PassReport {
  std::vector<RequestOutcome> requests;
  double seconds = 0;
};

// One engine: the model, a pool of blocks, and (store pass) the connector.
class Engine {
 public:
  // overlap_saves: a request's store runs on while later requests compute (as in an engine: its
  // blocks are freed once get_finished() lists it); otherwise each request waits for its store.
  Engine(engines::EngineModel& model, engines::KvPool& pool, engines::KvConnector* connector,
         bool overlap_saves)
      : model_(model), pool_(pool), connector_(connector), overlap_saves_(overlap_saves) {}

  // The end of a pass: every store done, every block free again.
  Status drain() {
    if (connector_ == nullptr) return Status::Ok();
    Status s = connector_->wait_for_save();
    reclaim();
    if (!held_.empty())
      return Status(ErrorCode::kInternal, "the connector still holds finished requests' blocks");
    return s;
  }

  Result<RequestOutcome> run(engines::RequestId id, const std::vector<uint32_t>& prompt, uint32_t n_new) {
    const uint32_t block_tokens = model_.shape().block_tokens;
    const auto blocks = static_cast<uint32_t>((prompt.size() + n_new - 1 + block_tokens - 1) / block_tokens);
    // Fresh, shuffled block ids every request: a loaded prefix must not depend on where the
    // previous request's KV happened to lie.
    std::vector<uint32_t> table(pool_.layout().desc().num_blocks);
    std::iota(table.begin(), table.end(), 0u);
    std::shuffle(table.begin(), table.end(), std::mt19937_64(id * 7919));
    // Blocks an earlier request's store still reads are not handed out again.
    reclaim();
    if (table.size() - held_blocks() < blocks && connector_ != nullptr) {
      (void)connector_->wait_for_save();
      reclaim();
    }
    std::erase_if(table, [&](uint32_t b) { return held_set_.count(b) != 0; });
    if (table.size() < blocks) return Status(ErrorCode::kOutOfMemory, "the KV pool is too small");
    table.resize(blocks);

    RequestOutcome out;
    out.prompt_tokens = prompt.size();
    const auto started = Clock::now();
    uint64_t loaded = 0;
    engines::EngineModel::LayerSavedFn on_layer;
    if (connector_ != nullptr) {
      auto matched = connector_->get_num_new_matched_tokens(id, prompt, 0);
      if (!matched.ok()) return matched.status();
      if (Status s = connector_->update_state_after_alloc(id, table, matched.value()); !s.ok()) return s;
      if (Status s = connector_->start_load_kv(); !s.ok()) return s;
      Status waited = connector_->wait_for_load(id);
      if (waited.ok()) {
        loaded = matched.value();
      } else {  // the store lost it in between, or it failed its check: compute it instead
        spdlog::warn("request {}: load failed ({}); recomputing", id, waited.to_string());
        (void)connector_->get_block_ids_with_load_errors();
      }
      // On a GPU the layer's writes are still queued on the model's stream: the connector records
      // an event there, and its store waits for it.
      on_layer = [this, id](uint32_t layer, void* stream) {
        Status s = stream != nullptr ? connector_->save_kv_layer(id, layer, stream)
                                     : connector_->save_kv_layer(id, layer);
        if (!s.ok()) save_error_ = s;
      };
    }
    const std::span<const uint32_t> all(prompt);
    auto first = model_.prefill_from(static_cast<uint32_t>(loaded), all.subspan(loaded), table, pool_.view(),
                                     on_layer);
    if (!first.ok()) return first.status();
    out.ttft_ms = ms_between(started, Clock::now());
    out.loaded_tokens = loaded;
    out.tokens.push_back(*first);
    for (uint32_t i = 1; i < n_new; ++i) {
      auto next = model_.decode_step(static_cast<uint32_t>(prompt.size() + i - 1), out.tokens.back(), table,
                                     pool_.view());
      if (!next.ok()) return next.status();
      out.tokens.push_back(*next);
    }
    if (connector_ != nullptr) {
      if (!save_error_.ok()) return std::exchange(save_error_, Status::Ok());
      if (!overlap_saves_) {
        if (Status s = connector_->wait_for_save(); !s.ok())
          spdlog::warn("request {}: store failed: {}", id, s.to_string());
      }
      auto later = connector_->request_finished(id);
      if (!later.ok()) return later.status();
      if (later.value()) {
        // Only while saves overlap: wait_for_save returned otherwise, so nothing was pending.
        if (!overlap_saves_)
          return Status(ErrorCode::kInternal, "the connector still holds a saved request's blocks");
        held_[id] = table;
        held_set_.insert(table.begin(), table.end());
      }
    }
    return out;
  }

 private:
  engines::EngineModel& model_;
  engines::KvPool& pool_;
  engines::KvConnector* connector_;
  bool overlap_saves_;
  Status save_error_;
  std::unordered_map<engines::RequestId, std::vector<uint32_t>> held_;  // finished, store still reading
  std::unordered_set<uint32_t> held_set_;

  size_t held_blocks() const { return held_set_.size(); }
  // Frees the blocks of requests whose stores have ended.
  void reclaim() {
    if (connector_ == nullptr) return;
    for (engines::RequestId id : connector_->get_finished().sending) {
      auto it = held_.find(id);
      if (it == held_.end()) continue;
      for (uint32_t b : it->second) held_set_.erase(b);
      held_.erase(it);
    }
  }
};

// Every prompt of the workload, in order; each request's answer joins that user's history (chat).
Result<PassReport> run_pass(const Workload& w, engines::EngineModel& model, engines::KvPool& pool,
                            engines::KvConnector* connector, engines::RequestId& next_id, const char* pass) {
  const uint32_t vocab = model.shape().vocab;
  Engine engine(model, pool, connector, w.overlap_saves);
  PassReport report;
  // Not measured: one request of unrelated tokens first, so that one-time set-up (cuBLAS's first
  // launches, page-locking the store's arena for GPU copies: a second or more for gigabytes) is
  // not charged to the workload, as an engine pays it at start-up.
  {
    const auto warm = engines::synthetic_prompt(std::min<uint32_t>(512, model.shape().block_tokens * 32),
                                                vocab, w.seed * 0x9E3779B97F4A7C15ull + 0xC0FFEE);
    auto outcome = engine.run(next_id++, warm, 2);
    if (!outcome.ok()) return Status(outcome.status().code(), "warm-up: " + outcome.status().message());
    if (Status s = engine.drain(); !s.ok()) return Status(s.code(), "warm-up: " + s.message());
  }
  const auto started = Clock::now();
  auto one = [&](const std::vector<uint32_t>& prompt,
                 const std::string& what) -> Result<std::vector<uint32_t>> {
    auto outcome = engine.run(next_id++, prompt, w.new_tokens);
    if (!outcome.ok()) return Status(outcome.status().code(), what + ": " + outcome.status().message());
    std::printf("  %-9s %-24s %5llu-token prompt, %5llu loaded, TTFT %8.2f ms\n", pass, what.c_str(),
                static_cast<unsigned long long>(outcome->prompt_tokens),
                static_cast<unsigned long long>(outcome->loaded_tokens), outcome->ttft_ms);
    std::fflush(stdout);
    report.requests.push_back(outcome.value());
    return outcome->tokens;
  };
  if (w.name == "chat") {
    const std::vector<uint32_t> system = engines::synthetic_prompt(w.system_tokens, vocab, w.seed);
    std::vector<std::vector<uint32_t>> history(w.users, system);
    for (uint32_t r = 0; r < w.rounds; ++r) {
      for (uint32_t u = 0; u < w.users; ++u) {
        const auto turn =
            engines::synthetic_prompt(w.turn_tokens, vocab, w.seed * 1000003 + u * 1009 + r + 1);
        history[u].insert(history[u].end(), turn.begin(), turn.end());
        auto answer = one(history[u], "user " + std::to_string(u) + " round " + std::to_string(r));
        if (!answer.ok()) return answer.status();
        history[u].insert(history[u].end(), answer->begin(), answer->end());
      }
    }
  } else {
    for (uint32_t q = 0; q < w.questions; ++q) {
      for (uint32_t d = 0; d < w.docs; ++d) {
        std::vector<uint32_t> prompt = engines::synthetic_prompt(w.doc_tokens, vocab, w.seed * 7 + d + 1);
        const auto question = engines::synthetic_prompt(w.turn_tokens, vocab, w.seed * 31 + d * 101 + q + 1);
        prompt.insert(prompt.end(), question.begin(), question.end());
        auto answer = one(prompt, "doc " + std::to_string(d) + " question " + std::to_string(q));
        if (!answer.ok()) return answer.status();
      }
    }
  }
  // Overlapped stores belong to the pass: its time ends when the last one has.
  if (Status s = engine.drain(); !s.ok()) spdlog::warn("{} pass: store failed: {}", pass, s.to_string());
  report.seconds = ms_between(started, Clock::now()) / 1e3;
  return report;
}

struct Summary {
  double ttft_mean = 0, ttft_p50 = 0, hit_rate = 0, requests_per_s = 0, tokens_per_s = 0;
};

Summary summarize(const PassReport& r, uint32_t new_tokens) {
  Summary s;
  std::vector<double> ttft;
  uint64_t prompt = 0, loaded = 0;
  for (const RequestOutcome& o : r.requests) {
    ttft.push_back(o.ttft_ms);
    prompt += o.prompt_tokens;
    loaded += o.loaded_tokens;
  }
  if (ttft.empty()) return s;
  s.ttft_mean = std::accumulate(ttft.begin(), ttft.end(), 0.0) / static_cast<double>(ttft.size());
  std::sort(ttft.begin(), ttft.end());
  s.ttft_p50 = ttft[ttft.size() / 2];
  s.hit_rate = prompt == 0 ? 0 : static_cast<double>(loaded) / static_cast<double>(prompt);
  s.requests_per_s = static_cast<double>(r.requests.size()) / r.seconds;
  s.tokens_per_s = static_cast<double>(r.requests.size() * new_tokens) / r.seconds;
  return s;
}

int run(int argc, char** argv) {
  cxxopts::Options cli(
      "kvfabric-prefix-reuse",
      "Prefix-reuse workloads on the reference engine (CPU or GPU), with and without the store");
  cli.add_options()  //
      ("store", "the node daemon's Unix socket (kvfabricd --topology ... --node ...)",
       cxxopts::value<std::string>())  //
      ("model", "the model's name in chunk keys",
       cxxopts::value<std::string>()->default_value("tiny-reference"))                         //
      ("workload", "chat | doc | both", cxxopts::value<std::string>()->default_value("both"))  //
      ("users", "chat: users", cxxopts::value<uint32_t>()->default_value("3"))                 //
      ("rounds", "chat: rounds per user", cxxopts::value<uint32_t>()->default_value("3"))      //
      ("system-tokens", "chat: the shared system prompt",
       cxxopts::value<uint32_t>()->default_value("256"))  //
      ("turn-tokens", "chat: a user's turn; doc: a question",
       cxxopts::value<uint32_t>()->default_value("40"))                                             //
      ("docs", "doc: documents", cxxopts::value<uint32_t>()->default_value("2"))                    //
      ("doc-tokens", "doc: a document", cxxopts::value<uint32_t>()->default_value("512"))           //
      ("questions", "doc: questions per document", cxxopts::value<uint32_t>()->default_value("3"))  //
      ("new", "tokens generated per request", cxxopts::value<uint32_t>()->default_value("8"))       //
      ("chunk-tokens", "tokens per store chunk (a whole number of 16-token blocks)",
       cxxopts::value<uint32_t>()->default_value("64"))                                //
      ("seed", "weights and prompts", cxxopts::value<uint64_t>()->default_value("1"))  //
      ("overlap-saves",
       "a request's store runs on while later requests compute (its blocks are freed "
       "once the connector lists it finished); default: each request waits for its store")                  //
      ("shape", "tiny | llama3-8b (GPU only)", cxxopts::value<std::string>()->default_value("tiny"))        //
      ("gpu", "run the engine on this GPU (default: the CPU)", cxxopts::value<int>()->default_value("-1"))  //
      ("v,verbose", "log more")                                                                             //
      ("h,help", "print this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help") != 0) {
    std::cout << cli.help() << '\n';
    return kOk;
  }
  if (args.count("store") == 0) {
    std::cerr << "kvfabric-prefix-reuse: --store SOCKET is needed (the node daemon's Unix socket)\n";
    return kUsage;
  }
  spdlog::set_level(args.count("verbose") != 0 ? spdlog::level::info : spdlog::level::warn);
  const std::string which = args["workload"].as<std::string>();
  if (which != "chat" && which != "doc" && which != "both") {
    std::cerr << "kvfabric-prefix-reuse: --workload is chat, doc or both, not '" << which << "'\n";
    return kUsage;
  }
  const uint64_t seed = args["seed"].as<uint64_t>();
  const uint32_t new_tokens = args["new"].as<uint32_t>();
  if (new_tokens == 0) {
    std::cerr << "kvfabric-prefix-reuse: --new must be at least 1\n";
    return kUsage;
  }
  std::vector<Workload> workloads;
  if (which != "doc") {
    Workload w{"chat",
               args["users"].as<uint32_t>(),
               args["rounds"].as<uint32_t>(),
               args["system-tokens"].as<uint32_t>(),
               args["turn-tokens"].as<uint32_t>(),
               0,
               0,
               0,
               new_tokens,
               seed,
               args.count("overlap-saves") != 0};
    workloads.push_back(w);
  }
  if (which != "chat") {
    Workload w{"doc",
               0,
               0,
               0,
               args["turn-tokens"].as<uint32_t>(),
               args["docs"].as<uint32_t>(),
               args["questions"].as<uint32_t>(),
               args["doc-tokens"].as<uint32_t>(),
               new_tokens,
               seed,
               args.count("overlap-saves") != 0};
    workloads.push_back(w);
  }
  const std::string shape_name = args["shape"].as<std::string>();
  const int gpu = args["gpu"].as<int>();
  if ((shape_name != "tiny" && shape_name != "llama3-8b") || (shape_name == "llama3-8b" && gpu < 0)) {
    std::cerr << "kvfabric-prefix-reuse: --shape is tiny or llama3-8b (the latter with --gpu N)\n";
    return kUsage;
  }
  const engines::ModelShape shape =
      shape_name == "tiny" ? engines::ModelShape::tiny() : engines::ModelShape::llama3_8b();
  uint64_t longest = 0;
  for (const Workload& w : workloads) {
    longest = std::max<uint64_t>(
        longest, w.name == "chat"
                     ? uint64_t{w.system_tokens} + uint64_t{w.rounds} * (w.turn_tokens + new_tokens)
                     : uint64_t{w.doc_tokens} + w.turn_tokens);
  }
  if (longest + new_tokens > (uint64_t{1} << 20)) {
    std::cerr << "kvfabric-prefix-reuse: the longest prompt (" << longest << " tokens) is too long\n";
    return kUsage;
  }
  const auto loading = Clock::now();
  auto model = engines::EngineModel::create(shape, seed, gpu, static_cast<uint32_t>(longest + new_tokens));
  if (!model.ok()) {
    std::cerr << "kvfabric-prefix-reuse: model: " << model.status().to_string() << '\n';
    return kFailed;
  }
  if (gpu >= 0) std::printf("model on cuda:%d in %.0f ms\n", gpu, ms_between(loading, Clock::now()));
  const uint32_t block_tokens = shape.block_tokens;
  // Room for a request and (overlapping saves) a few finished ones whose stores still read them.
  const uint32_t pools = args.count("overlap-saves") != 0 ? 4 : 2;
  const auto pool_blocks = static_cast<uint32_t>(pools * ((longest + new_tokens) / block_tokens + 2));
  auto pool = engines::KvPool::create(shape.kv_layout_desc(pool_blocks), gpu, 0xA5);
  if (!pool.ok()) {
    std::cerr << "kvfabric-prefix-reuse: KV pool: " << pool.status().to_string() << '\n';
    return kFailed;
  }
  store::StoreClientOptions client_options;
  client_options.socket_path = args["store"].as<std::string>();
  client_options.client_name = "kvfabric-prefix-reuse";
  store::StoreClient client(client_options);
  engines::KvConnectorOptions options;
  options.model = args["model"].as<std::string>();
  options.chunk_tokens = args["chunk-tokens"].as<uint32_t>();
  options.store = &client;
  options.memory = gpu < 0 ? engines::LayerMemory::kHost : engines::LayerMemory::kCuda;
  auto connector = engines::KvConnector::create(options);
  if (!connector.ok()) {
    std::cerr << "kvfabric-prefix-reuse: connector: " << connector.status().to_string() << '\n';
    return kFailed;
  }
  if (Status s = connector.value()->register_kv_caches(pool->view()); !s.ok()) {
    std::cerr << "kvfabric-prefix-reuse: register_kv_caches: " << s.to_string() << '\n';
    return kFailed;
  }
  if (Status s = client.connect(); !s.ok()) {
    std::cerr << "kvfabric-prefix-reuse: the store at " << args["store"].as<std::string>() << ": "
              << s.to_string() << '\n';
    return kFailed;
  }
  std::printf("kvfabric-prefix-reuse: %s, chunks of %u tokens, store %s\n", shape.to_string().c_str(),
              options.chunk_tokens, args["store"].as<std::string>().c_str());
  engines::RequestId next_id = 1;
  bool identical = true;
  for (const Workload& w : workloads) {
    std::printf("%s workload:\n", w.name.c_str());
    auto baseline = run_pass(w, *model.value(), pool.value(), nullptr, next_id, "recompute");
    if (!baseline.ok()) {
      std::cerr << "kvfabric-prefix-reuse: " << w.name << " (recompute): " << baseline.status().to_string()
                << '\n';
      return kFailed;
    }
    auto reused = run_pass(w, *model.value(), pool.value(), connector.value().get(), next_id, "store");
    if (!reused.ok()) {
      std::cerr << "kvfabric-prefix-reuse: " << w.name << " (store): " << reused.status().to_string() << '\n';
      return kFailed;
    }
    uint32_t same = 0, hits = 0;
    double hit_recompute_ms = 0, hit_store_ms = 0;  // the requests that loaded a prefix, both ways
    for (size_t i = 0; i < baseline->requests.size() && i < reused->requests.size(); ++i) {
      same += baseline->requests[i].tokens == reused->requests[i].tokens ? 1 : 0;
      if (reused->requests[i].loaded_tokens == 0) continue;
      ++hits;
      hit_recompute_ms += baseline->requests[i].ttft_ms;
      hit_store_ms += reused->requests[i].ttft_ms;
    }
    const auto n = static_cast<uint32_t>(baseline->requests.size());
    identical = identical && same == n && reused->requests.size() == n;
    const Summary a = summarize(baseline.value(), new_tokens), b = summarize(reused.value(), new_tokens);
    std::printf("%s: %u requests\n", w.name.c_str(), n);
    std::printf(
        "  %-10s TTFT mean %8.2f ms p50 %8.2f ms | %7.2f requests/s %8.1f tokens/s | store hit rate "
        "%5.1f%%\n",
        "recompute", a.ttft_mean, a.ttft_p50, a.requests_per_s, a.tokens_per_s, 100 * a.hit_rate);
    std::printf(
        "  %-10s TTFT mean %8.2f ms p50 %8.2f ms | %7.2f requests/s %8.1f tokens/s | store hit rate "
        "%5.1f%%\n",
        "store", b.ttft_mean, b.ttft_p50, b.requests_per_s, b.tokens_per_s, 100 * b.hit_rate);
    std::printf(
        "%s: store vs recompute: TTFT %.2fx faster (mean), throughput %.2fx; tokens identical in %u of %u "
        "requests\n",
        w.name.c_str(), b.ttft_mean > 0 ? a.ttft_mean / b.ttft_mean : 0.0,
        a.requests_per_s > 0 ? b.requests_per_s / a.requests_per_s : 0.0, same, n);
    if (hits > 0) {
      std::printf(
          "%s: the %u requests that loaded a prefix: TTFT mean %.2f ms with the store vs %.2f ms recomputed: "
          "%.2fx faster\n",
          w.name.c_str(), hits, hit_store_ms / hits, hit_recompute_ms / hits,
          hit_store_ms > 0 ? hit_recompute_ms / hit_store_ms : 0.0);
    }
  }
  if (!identical) {
    std::printf("FAILED: a request gave other tokens with the store than without\n");
    return kFailed;
  }
  std::printf("every request gave the same tokens with the store as without\n");
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // cxxopts reports bad options by throwing
    std::cerr << "kvfabric-prefix-reuse: " << e.what() << '\n';
    return kUsage;
  }
}
