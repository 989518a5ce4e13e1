// kvfabric-store-tool: an engine's side of the node store, from the command line, on StoreClient.
// It stores and loads synthetic chunks (keys and bytes derived from --seed, so a second process can
// check the bytes independently) through the daemon's shared arena, and is what the integration
// tests run as "engine" processes. Each put records the model fingerprint the keys were hashed with
// (the tool's own model, or --model of --topology). Exit codes: 0 ok, 1 bytes did not verify, 2 usage, 3 a
// store error (printed).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/fabric/topology.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/store/store_client.h"
#include "kvf/store/store_stats_fields.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

constexpr int kOk = 0;
constexpr int kVerifyFailed = 1;
constexpr int kUsage = 2;
constexpr int kStoreError = 3;

uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// --keys-file: keys given by the caller (e.g. `kvfabric-ctl keys --model M --tokens ...`, so that a
// router's lookup by tokens finds them) replace the seed's chain; the bytes still come from --seed.
std::vector<protocol::ChunkKey> g_given_keys;

// The model fingerprint the chain is hashed with and every put records: the tool's own model, or
// --model of --topology (so that the daemon's /clear {"model": M} finds the chunks).
protocol::ChunkKey g_model = protocol::model_fingerprint("kvfabric-store-tool", protocol::KvLayoutDesc{});

// The chain of chunk keys of a synthetic prompt: chunk i's tokens are {seed, i}.
std::vector<protocol::ChunkKey> chunk_keys(uint64_t seed, uint32_t chunks) {
  if (!g_given_keys.empty()) {
    return {g_given_keys.begin(), g_given_keys.begin() + std::min<size_t>(chunks, g_given_keys.size())};
  }
  const protocol::ChunkHasher hasher(g_model, 2);
  std::vector<protocol::ChunkKey> keys;
  protocol::ChunkKey previous;
  for (uint32_t i = 0; i < chunks; ++i) {
    const uint32_t tokens[2] = {static_cast<uint32_t>(seed), i};
    previous = hasher.next(previous, tokens);
    keys.push_back(previous);
  }
  return keys;
}

std::vector<uint8_t> chunk_bytes(uint64_t seed, uint32_t index, uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  uint64_t state = seed * 1000003u + index;
  for (uint64_t i = 0; i < bytes; i += 8) {
    const uint64_t v = splitmix(state);
    std::memcpy(out.data() + i, &v, std::min<uint64_t>(8, bytes - i));
  }
  return out;
}

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

int store_error(const char* what, const Status& s, Clock::time_point started) {
  std::printf("%s: error: %s (after %.0f ms)\n", what, s.to_string().c_str(), ms_since(started));
  return kStoreError;
}

// A digest over the chunk checksums, in order: the writer's and the reader's must match.
uint64_t digest(const std::vector<uint64_t>& sums) {
  return store::chunk_checksum(reinterpret_cast<const uint8_t*>(sums.data()), sums.size() * sizeof(uint64_t));
}

int put(store::StoreClient& client, uint64_t seed, uint32_t chunks, uint64_t bytes, double hold_s) {
  const auto started = Clock::now();
  const auto keys = chunk_keys(seed, chunks);
  std::vector<uint64_t> sums;
  uint32_t stored = 0, present = 0;
  for (uint32_t i = 0; i < chunks; ++i) {
    const std::vector<uint8_t> data = chunk_bytes(seed, i, bytes);
    sums.push_back(store::chunk_checksum(data.data(), data.size()));
    auto r = client.reserve(keys[i], bytes, g_model);
    if (!r.ok() && r.status().code() == ErrorCode::kAborted) {
      ++present;  // stored already (or being stored): a content address is written once
      continue;
    }
    if (!r.ok()) return store_error("put", r.status(), started);
    std::span<uint8_t> dst = client.bytes(*r);
    if (dst.size() != data.size())
      return store_error("put", Status(ErrorCode::kPeerLost, "reservation lost"), started);
    std::memcpy(dst.data(), data.data(), data.size());  // straight into the shared arena
    if (hold_s > 0) {
      std::printf(
          "put: holding reservation %llu of chunk %u (%llu bytes at offset %llu) before commit, pid %d\n",
          static_cast<unsigned long long>(r->reservation.id), i, static_cast<unsigned long long>(bytes),
          static_cast<unsigned long long>(r->reservation.offset), static_cast<int>(getpid()));
      std::fflush(stdout);
      std::this_thread::sleep_for(std::chrono::duration<double>(hold_s));
    }
    if (Status s = client.commit(*r); !s.ok()) return store_error("put", s, started);
    ++stored;
  }
  std::printf("put: stored %u chunks, %u already present, %llu bytes each, digest %016llx (%.1f ms)\n",
              stored, present, static_cast<unsigned long long>(bytes),
              static_cast<unsigned long long>(digest(sums)), ms_since(started));
  return kOk;
}

int get(store::StoreClient& client, uint64_t seed, uint32_t chunks, uint64_t bytes) {
  const auto started = Clock::now();
  const auto keys = chunk_keys(seed, chunks);
  std::vector<uint64_t> sums;
  uint32_t bad = 0;
  for (uint32_t i = 0; i < chunks; ++i) {
    const std::vector<uint8_t> expected = chunk_bytes(seed, i, bytes);
    auto lease = client.acquire(keys[i]);
    if (!lease.ok()) return store_error("get", lease.status(), started);
    std::span<const uint8_t> data = client.bytes(*lease);  // read in place from the shared arena
    const uint64_t sum = store::chunk_checksum(data.data(), data.size());
    sums.push_back(sum);
    if (data.size() != expected.size() || std::memcmp(data.data(), expected.data(), data.size()) != 0 ||
        sum != lease->lease.checksum) {
      std::printf("get: chunk %u (%s): bytes differ from what the writer stored\n", i,
                  keys[i].to_hex().c_str());
      ++bad;
    }
    if (Status s = client.release(*lease); !s.ok()) return store_error("get", s, started);
  }
  if (bad > 0) {
    std::printf("get: FAILED: %u of %u chunks differ\n", bad, chunks);
    return kVerifyFailed;
  }
  std::printf("get: verified %u chunks, %llu bytes each, digest %016llx (%.1f ms)\n", chunks,
              static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(digest(sums)),
              ms_since(started));
  return kOk;
}

int lookup(store::StoreClient& client, uint64_t seed, uint32_t chunks) {
  const auto started = Clock::now();
  auto matched = client.lookup(chunk_keys(seed, chunks));
  if (!matched.ok()) return store_error("lookup", matched.status(), started);
  std::printf("lookup: %zu of %u chunks held\n", *matched, chunks);
  return kOk;
}

int stats(store::StoreClient& client) {
  const auto started = Clock::now();
  auto s = client.stats();
  if (!s.ok()) return store_error("stats", s.status(), started);
  for (const auto& f : store::store_stats_fields()) {
    std::printf("%.*s=%llu\n", static_cast<int>(f.name.size()), f.name.data(),
                static_cast<unsigned long long>((*s).*f.member));
  }
  return kOk;
}

// Calls stats() every interval on one client and prints each outcome: how an engine sees the
// daemon go away and come back.
int probe(store::StoreClient& client, uint32_t count, uint32_t interval_ms) {
  int last = kOk;
  for (uint32_t i = 0; i < count; ++i) {
    const auto started = Clock::now();
    auto s = client.stats();
    if (s.ok()) {
      std::printf("probe %u: ok entries=%llu (%.1f ms)\n", i, static_cast<unsigned long long>(s->entries),
                  ms_since(started));
      last = kOk;
    } else {
      std::printf("probe %u: error %s (%.1f ms)\n", i, s.status().to_string().c_str(), ms_since(started));
      last = kStoreError;
    }
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
  }
  return last;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-store-tool",
                       "engine-side store operations against a running kvfabricd:\n"
                       "  hello | keys | put | get | lookup | stats | clear | probe");
  cli.add_options()                                                                                       //
      ("command", "hello, keys, put, get, lookup, stats, clear or probe", cxxopts::value<std::string>())  //
      ("socket", "the daemon's store socket", cxxopts::value<std::string>(), "PATH")                      //
      ("timeout-ms", "deadline of each call", cxxopts::value<int64_t>()->default_value("5000"), "MS")     //
      ("seed", "derives the chunk keys and bytes", cxxopts::value<uint64_t>()->default_value("1"))        //
      ("chunks", "chunks in the chain", cxxopts::value<uint32_t>()->default_value("8"))                   //
      ("keys-file", "the chain's keys from a file, not --seed", cxxopts::value<std::string>(), "FILE")    //
      ("topology", "with --model: the topology that names the model", cxxopts::value<std::string>())      //
      ("model", "the topology's model the chunks belong to (keys and what put records)",                  //
       cxxopts::value<std::string>(), "NAME")                                                             //
      ("by-model", "clear: only the chunks of the model (--model, or the tool's own)")                    //
      ("bytes", "bytes per chunk", cxxopts::value<uint64_t>()->default_value("65536"))                    //
      ("hold-before-commit", "put: after writing each chunk wait this many seconds before committing",    //
       cxxopts::value<double>()->default_value("0"), "S")                                                 //
      ("count", "probe: calls to make", cxxopts::value<uint32_t>()->default_value("10"))                  //
      ("interval-ms", "probe: pause between calls", cxxopts::value<uint32_t>()->default_value("200"))     //
      ("h,help", "print this help");
  cli.parse_positional({"command"});
  cli.positional_help("COMMAND");
  const auto args = cli.parse(argc, argv);
  if (args.count("help") || args.count("command") == 0) {
    std::cout << cli.help() << '\n';
    return args.count("help") ? kOk : kUsage;
  }
  const std::string command = args["command"].as<std::string>();
  const uint64_t seed = args["seed"].as<uint64_t>();
  uint32_t chunks = args["chunks"].as<uint32_t>();
  if (args.count("keys-file")) {
    std::ifstream in(args["keys-file"].as<std::string>());
    std::string line;
    while (in >> line) {
      auto key = protocol::ChunkKey::from_hex(line);
      if (!key.ok()) {
        std::cerr << "kvfabric-store-tool: --keys-file: '" << line << "' is not a chunk key\n";
        return kUsage;
      }
      g_given_keys.push_back(key.value());
    }
    if (g_given_keys.empty()) {
      std::cerr << "kvfabric-store-tool: --keys-file holds no keys\n";
      return kUsage;
    }
    if (args.count("chunks") == 0) chunks = static_cast<uint32_t>(g_given_keys.size());
    chunks = std::min<uint32_t>(chunks, static_cast<uint32_t>(g_given_keys.size()));
  }
  if (args.count("model") != args.count("topology")) {
    std::cerr << "kvfabric-store-tool: --model and --topology go together\n";
    return kUsage;
  }
  if (args.count("model")) {
    auto loaded = fabric::load_topology_file(args["topology"].as<std::string>());
    if (!loaded.topology) {
      std::cerr << "kvfabric-store-tool: --topology:";
      for (const auto& problem : loaded.problems) std::cerr << "\n  " << problem.to_string();
      std::cerr << "\n";
      return kUsage;
    }
    const std::string name = args["model"].as<std::string>();
    const fabric::ModelSpec* model = loaded.topology->find_model(name);
    if (model == nullptr) {
      std::cerr << "kvfabric-store-tool: --model: the topology has no model '" << name << "'\n";
      return kUsage;
    }
    g_model = protocol::model_fingerprint(model->name, model->layout);
  }
  const uint64_t bytes = args["bytes"].as<uint64_t>();
  if (command == "keys") {  // the chain's keys as hex, one a line (for curl /lookup, /pin, /clear)
    for (const auto& key : chunk_keys(seed, chunks)) std::printf("%s\n", key.to_hex().c_str());
    return kOk;
  }
  if (args.count("socket") == 0) {
    std::cerr << "kvfabric-store-tool: " << command << " needs --socket PATH (the daemon's store socket)\n";
    return kUsage;
  }
  store::StoreClientOptions options;
  options.socket_path = args["socket"].as<std::string>();
  options.client_name = "kvfabric-store-tool " + command + " pid " + std::to_string(getpid());
  options.call_timeout = std::chrono::milliseconds(args["timeout-ms"].as<int64_t>());
  options.connect_timeout = options.call_timeout;
  store::StoreClient client(options);
  if (command == "hello") {
    const auto started = Clock::now();
    if (Status s = client.connect(); !s.ok()) return store_error("hello", s, started);
    std::printf("hello: node %s, arena of %llu bytes mapped\n", client.node().c_str(),
                static_cast<unsigned long long>(client.arena_bytes()));
    return kOk;
  }
  if (command == "put") return put(client, seed, chunks, bytes, args["hold-before-commit"].as<double>());
  if (command == "get") return get(client, seed, chunks, bytes);
  if (command == "lookup") return lookup(client, seed, chunks);
  if (command == "stats") return stats(client);
  if (command == "probe")
    return probe(client, args["count"].as<uint32_t>(), args["interval-ms"].as<uint32_t>());
  if (command == "clear") {
    const auto started = Clock::now();
    auto r = args.count("by-model") ? client.clear_model(g_model) : client.clear_all();
    if (!r.ok()) return store_error("clear", r.status(), started);
    std::printf("clear: removed %llu entries (%llu bytes)\n", static_cast<unsigned long long>(r->removed),
                static_cast<unsigned long long>(r->bytes));
    return kOk;
  }
  std::cerr << "kvfabric-store-tool: unknown command '" << command << "' (see --help)\n";
  return kUsage;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kvfabric-store-tool: " << e.what() << " (see --help)\n";
    return kUsage;
  }
}
