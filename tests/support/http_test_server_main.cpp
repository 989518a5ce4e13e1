// kvf-http-test-server: the HTTP control server over a small in-memory ControlApi, for the curl
// integration test (tests/integration/http_api.sh) until the daemon serves the real store. Prints
// "listening on HOST:PORT" and serves until SIGTERM or SIGINT. Built for tests only.
#include <pthread.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/control/control_api.h"
#include "kvf/control/http_server.h"
#include "kvf/protocol/chunk_key.h"

namespace {

using namespace kvf;
using namespace kvf::control;

// Chunk keys held per model, with a pin flag; lookups hash tokens the way engines do (ChunkHasher
// over the model's fingerprint). Node "local" holds everything; "peer" is a reachable node,
// "unreachable" one that answers kUnavailable. Thread-safe through one mutex.
class MemoryControlApi : public ControlApi {
 public:
  static constexpr uint64_t kEntryBytes = 1 << 20;

  void seed(const std::string& model, uint32_t chunks) {
    std::vector<uint32_t> tokens(static_cast<size_t>(chunks) * protocol::kDefaultChunkTokens);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
    std::lock_guard lock(mutex_);
    for (const auto& key : hasher(model).hash(tokens)) entries_[key] = Entry{model, false};
  }

  Result<LookupResult> lookup(const LookupRequest& request) override {
    std::lock_guard lock(mutex_);
    ++lookups_;
    if (request.model != "m")
      return Status(ErrorCode::kInvalidArgument, "unknown model '" + request.model + "'");
    const auto keys =
        request.by_tokens() ? hasher(request.model).hash(request.tokens()) : request.chunk_keys();
    LookupResult result;
    result.query_chunks = static_cast<uint32_t>(keys.size());
    uint32_t held = 0;
    while (held < keys.size() && entries_.count(keys[held]) != 0) ++held;
    if (held > 0) {
      result.matches.push_back(
          {"local", "", static_cast<uint64_t>(held) * protocol::kDefaultChunkTokens, held, Tier::kDram});
    }
    return result;
  }
  Result<PinResult> pin(const PinRequest& request) override { return set_pin(request, true); }
  Result<PinResult> unpin(const PinRequest& request) override { return set_pin(request, false); }
  Result<ClearResult> clear(const ClearRequest& request) override {
    std::lock_guard lock(mutex_);
    ClearResult result;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool hit = request.scope == ClearRequest::Scope::kAll ||
                       (request.scope == ClearRequest::Scope::kModel && it->second.model == request.model) ||
                       (request.scope == ClearRequest::Scope::kKeys &&
                        std::find(request.keys.begin(), request.keys.end(), it->first) != request.keys.end());
      if (hit) {
        ++result.cleared;
        result.freed_bytes += kEntryBytes;
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
    return result;
  }
  Result<MoveResult> move(const MoveRequest& request) override {
    if (request.from != "local")
      return Status(ErrorCode::kNotFound, "no node '" + request.from + "' holds entries here");
    if (request.to == "unreachable")
      return Status(ErrorCode::kUnavailable, "node 'unreachable' does not answer");
    if (request.to != "peer") return Status(ErrorCode::kNotFound, "no node named '" + request.to + "'");
    std::lock_guard lock(mutex_);
    MoveResult result;
    for (const auto& key : request.keys) {
      if (entries_.count(key) == 0) {
        result.not_found.push_back(key);
        continue;
      }
      ++result.moved;
      result.bytes += kEntryBytes;
      if (!request.copy) entries_.erase(key);
    }
    return result;
  }
  Result<CompressResult> compress(const CompressRequest& request) override {
    if (request.codec != "identity") {
      return Status(ErrorCode::kInvalidArgument,
                    "codec '" + request.codec + "' does not exist (have: identity)");
    }
    std::lock_guard lock(mutex_);
    CompressResult result;
    if (request.all) {
      result.compressed = entries_.size();
    } else {
      for (const auto& key : request.keys) {
        if (entries_.count(key) == 0) {
          result.not_found.push_back(key);
        } else {
          ++result.compressed;
        }
      }
    }
    result.bytes_before = result.bytes_after = result.compressed * kEntryBytes;
    return result;
  }
  HealthReport health() override { return HealthReport{true, "local", "test", 0, {}}; }
  Result<ControlStats> stats() override {
    std::lock_guard lock(mutex_);
    ControlStats stats;
    stats.node = "local";
    stats.entries = entries_.size();
    for (const auto& [key, entry] : entries_) stats.pinned_entries += entry.pinned ? 1 : 0;
    stats.lookups = lookups_;
    stats.tiers.push_back({Tier::kDram, 1ull << 30, entries_.size() * kEntryBytes, entries_.size(), 0, 0, 0});
    return stats;
  }
  Result<std::string> metrics() override {
    std::lock_guard lock(mutex_);
    return "# HELP kvf_store_entries Entries held.\n# TYPE kvf_store_entries gauge\nkvf_store_entries " +
           std::to_string(entries_.size()) + "\n";
  }

 private:
  struct Entry {
    std::string model;
    bool pinned = false;
  };

  static protocol::ChunkHasher hasher(const std::string& model) {
    protocol::KvLayoutDesc layout;
    layout.num_layers = 32;
    layout.block_tokens = 16;
    layout.kv_heads = 8;
    layout.head_dim = 128;
    layout.dtype_bytes = 2;
    return protocol::ChunkHasher(protocol::model_fingerprint(model, layout));
  }

  Result<PinResult> set_pin(const PinRequest& request, bool pinned) {
    std::lock_guard lock(mutex_);
    PinResult result;
    for (const auto& key : request.keys) {
      auto it = entries_.find(key);
      if (it == entries_.end()) {
        result.not_found.push_back(key);
      } else if (it->second.pinned != pinned) {
        it->second.pinned = pinned;
        ++result.changed;
      }
    }
    return result;
  }

  std::mutex mutex_;
  std::map<protocol::ChunkKey, Entry> entries_;
  uint64_t lookups_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options cli("kvf-http-test-server",
                       "HTTP control server over an in-memory ControlApi (tests only)");
  cli.add_options()                                                                                //
      ("host", "address to listen on", cxxopts::value<std::string>()->default_value("127.0.0.1"))  //
      ("port", "port (0: any)", cxxopts::value<uint16_t>()->default_value("0"))                    //
      ("max-body-bytes", "body limit", cxxopts::value<size_t>()->default_value("1048576"))         //
      ("seed-chunks", "chunks of model 'm' held from the start (tokens 0, 1, 2, ...)",             //
       cxxopts::value<uint32_t>()->default_value("0"))                                             //
      ("help", "this text");
  HttpServerOptions options;
  auto api = std::make_shared<MemoryControlApi>();
  try {
    const auto args = cli.parse(argc, argv);
    if (args.count("help") != 0) {
      std::cout << cli.help() << "\n";
      return 0;
    }
    options.host = args["host"].as<std::string>();
    options.port = args["port"].as<uint16_t>();
    options.max_body_bytes = args["max-body-bytes"].as<size_t>();
    api->seed("m", args["seed-chunks"].as<uint32_t>());
  } catch (const std::exception& e) {
    std::cerr << "kvf-http-test-server: " << e.what() << "\n";
    return 2;
  }

  // Block the stop signals before any thread starts, so that only sigwait below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto server = HttpControlServer::start(api, options);
  if (!server.ok()) {
    std::cerr << "kvf-http-test-server: " << server.status().to_string() << "\n";
    return 1;
  }
  std::cout << "listening on " << server.value()->address() << std::endl;
  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::cout << "stopping on signal " << signal << std::endl;
  server.value()->stop();
  return 0;
}
