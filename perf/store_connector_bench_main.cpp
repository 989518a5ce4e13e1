// kvfabric-store-connector-bench: an engine's store put and get through StoreConnector against a
// running kvfabricd, timed: put = store() of a request's chunks from the engine's paged blocks into
// the store arena (reserve -> copy -> commit, which the daemon checksums), get = load() of them
// into other blocks (lease -> checksum check -> copy -> release). With --mem cuda:N the blocks are
// GPU memory and the copies are the connector's GPU path (GPU <-> the pinned arena); --mem host is
// the memcpy path. The default request is Llama-3-8B-shaped: 32 layers x 512 blocks of 16 tokens,
// K and V of 32 KiB each per block (8 KV heads x 128 dims x bf16) = 1 GiB in 32 chunks of 256
// tokens, shuffled block ids on both sides.
//   --verify: one put and get first, every loaded byte compared with the source (random data,
//             poisoned destination, blocks outside the request untouched); exit 1 if not.
// Each iteration: put (timed), get (timed), then the chunks are cleared from the store. GB/s is all
// bytes over all timed calls, as kvfabric-perf and the anchors report it; --json writes
// {"results": [put, get]} with mode, bytes, iters, seconds, gbps, p50_us, p99_us.
// Exit: 0 ok, 1 verify or a store call failed, 2 usage.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/engines/store_connector.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "perf_util.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;
constexpr uint8_t kPoison = 0xA5;

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "kvfabric-store-connector-bench: %s\n", message.c_str());
  return code;
}

// The engine's pool: one buffer per layer, in host or GPU memory, with a host mirror for filling
// and checking.
struct Pool {
  std::vector<std::vector<uint8_t>> host;
  std::vector<gpudirect::DeviceBuffer> gpu;
  std::vector<uint8_t*> layers;
  bool on_gpu = false;

  Status upload() {
    for (size_t l = 0; on_gpu && l < layers.size(); ++l) {
      if (Status s = gpudirect::copy_sync(layers[l], host[l].data(), host[l].size()); !s.ok()) return s;
    }
    return Status::Ok();
  }
  Status download() {
    for (size_t l = 0; on_gpu && l < layers.size(); ++l) {
      if (Status s = gpudirect::copy_sync(host[l].data(), layers[l], host[l].size()); !s.ok()) return s;
    }
    return Status::Ok();
  }
};

struct Figures {
  double seconds = 0;
  double gbps = 0;
  double p50_us = 0;
  double p99_us = 0;
};

Figures figures(const std::vector<double>& micros, uint64_t bytes) {
  Figures f;
  f.seconds = std::accumulate(micros.begin(), micros.end(), 0.0) / 1e6;
  f.gbps =
      f.seconds > 0 ? static_cast<double>(bytes) * static_cast<double>(micros.size()) / f.seconds / 1e9 : 0;
  f.p50_us = perf::percentile(micros, 50);
  f.p99_us = perf::percentile(micros, 99);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-store-connector-bench",
                           "store put/get through the engine connector against a running kvfabricd");
  options.add_options()                                                //
      ("socket", "kvfabricd's socket", cxxopts::value<std::string>())  //
      ("mem", "the engine's KV blocks: host or cuda:N",
       cxxopts::value<std::string>()->default_value("cuda:0"))  //
      ("model", "model name (part of the chunk keys)",
       cxxopts::value<std::string>()->default_value("llama8b"))                                            //
      ("layers", "layers", cxxopts::value<uint32_t>()->default_value("32"))                                //
      ("blocks", "blocks of the request", cxxopts::value<uint32_t>()->default_value("512"))                //
      ("block-tokens", "tokens per block", cxxopts::value<uint32_t>()->default_value("16"))                //
      ("kv-heads", "KV heads", cxxopts::value<uint32_t>()->default_value("8"))                             //
      ("head-dim", "head dimension (bf16)", cxxopts::value<uint32_t>()->default_value("128"))              //
      ("chunk-tokens", "tokens per chunk", cxxopts::value<uint32_t>()->default_value("256"))               //
      ("iters", "timed put+get pairs", cxxopts::value<uint32_t>()->default_value("20"))                    //
      ("verify", "one verified put and get before timing")                                                 //
      ("no-verify-loads", "get without the per-chunk checksum check (to see what it costs)")               //
      ("seed", "data and token seed (0: from the clock)", cxxopts::value<uint64_t>()->default_value("0"))  //
      ("json", "write results as JSON", cxxopts::value<std::string>())                                     //
      ("h,help", "print this help");
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    return fail(2, e.what());
  }
  if (args.count("help")) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  if (!args.count("socket")) return fail(2, "--socket is required");
  const std::string mem = args["mem"].as<std::string>();
  if (mem != "host" && mem.rfind("cuda:", 0) != 0) return fail(2, "--mem must be host or cuda:N");

  protocol::KvLayoutDesc desc;
  desc.kind = protocol::KvLayoutKind::kFlashAttention;
  desc.num_layers = args["layers"].as<uint32_t>();
  const uint32_t request_blocks = args["blocks"].as<uint32_t>();
  // Spare blocks beyond the request's: the verify pass checks that loads leave them alone.
  desc.num_blocks = request_blocks + std::max(1u, request_blocks / 8);
  desc.block_tokens = args["block-tokens"].as<uint32_t>();
  desc.kv_heads = args["kv-heads"].as<uint32_t>();
  desc.head_dim = args["head-dim"].as<uint32_t>();
  desc.dtype_bytes = 2;
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return fail(2, layout.status().to_string());
  const uint32_t chunk_tokens = args["chunk-tokens"].as<uint32_t>();
  if (chunk_tokens == 0 || chunk_tokens % desc.block_tokens != 0 ||
      (uint64_t{request_blocks} * desc.block_tokens) % chunk_tokens != 0) {
    return fail(2, "the request (" + std::to_string(request_blocks) + " blocks of " +
                       std::to_string(desc.block_tokens) + " tokens) must be whole chunks of " +
                       std::to_string(chunk_tokens) + " tokens");
  }

  uint64_t seed = args["seed"].as<uint64_t>();
  if (seed == 0) seed = static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  std::mt19937_64 rng(seed);

  Pool pool;
  pool.on_gpu = mem != "host";
  pool.host.assign(desc.num_layers, std::vector<uint8_t>(layout->layer_bytes(), kPoison));
  for (uint32_t l = 0; l < desc.num_layers; ++l) {
    if (!pool.on_gpu) {
      pool.layers.push_back(pool.host[l].data());
      continue;
    }
    auto buffer = gpudirect::DeviceBuffer::allocate(std::atoi(mem.c_str() + 5), layout->layer_bytes());
    if (!buffer.ok()) return fail(1, "GPU layer buffer: " + buffer.status().to_string());
    pool.layers.push_back(static_cast<uint8_t*>(buffer->data()));
    pool.gpu.push_back(std::move(buffer.value()));
  }

  store::StoreClient client(
      store::StoreClientOptions{args["socket"].as<std::string>(), "store-connector-bench"});
  engines::StoreConnectorOptions copts;
  copts.model = args["model"].as<std::string>();
  copts.layout = desc;
  copts.chunk_tokens = chunk_tokens;
  copts.verify_loads = args.count("no-verify-loads") == 0;
  copts.memory = pool.on_gpu ? engines::LayerMemory::kCuda : engines::LayerMemory::kHost;
  auto connector = engines::StoreConnector::create(client, copts, pool.layers);
  if (!connector.ok()) return fail(1, connector.status().to_string());

  // The request: random tokens (a fresh prompt per run: nothing of it is stored yet), its blocks
  // at shuffled ids for the put and at other shuffled ids for the get.
  const uint32_t tokens_n = request_blocks * desc.block_tokens;
  std::vector<uint32_t> tokens(tokens_n);
  for (auto& t : tokens) t = static_cast<uint32_t>(rng() % 128000);
  auto shuffled = [&](uint64_t s) {
    std::vector<uint32_t> ids(desc.num_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), std::mt19937_64(s));
    ids.resize(request_blocks);
    return ids;
  };
  const std::vector<uint32_t> put_table = shuffled(seed + 1), get_table = shuffled(seed + 2);
  protocol::ChunkHasher hasher(protocol::model_fingerprint(copts.model, desc), chunk_tokens);
  const std::vector<protocol::ChunkKey> keys = hasher.hash(tokens);
  const uint32_t chunks = static_cast<uint32_t>(keys.size());
  const uint64_t total = uint64_t{chunks} * connector->chunk_bytes();
  std::printf(
      "store connector bench: %u layers x %u blocks x %u parts x %llu bytes = %.1f MiB in %u chunks, "
      "%s, shuffled blocks, %s\n",
      desc.num_layers, request_blocks, layout->parts(), static_cast<unsigned long long>(layout->part_bytes()),
      static_cast<double>(total) / (1 << 20), chunks,
      pool.on_gpu ? ("GPU " + std::to_string(connector->device()) + " memory").c_str() : "host memory",
      copts.verify_loads ? "loads check checksums" : "loads skip checksums");

  auto put = [&]() -> Status {
    auto r = connector->store(tokens, put_table);
    if (!r.ok()) return r.status();
    if (r->stored != chunks) {
      return Status(ErrorCode::kInternal, "put stored " + std::to_string(r->stored) + " of " +
                                              std::to_string(chunks) + " chunks (" +
                                              std::to_string(r->already_stored) + " already there)");
    }
    return Status::Ok();
  };
  auto get = [&]() -> Status {
    auto r = connector->load(tokens, get_table);
    if (!r.ok()) return r.status();
    if (r->chunks != chunks) {
      return Status(ErrorCode::kInternal, "get loaded " + std::to_string(r->chunks) + " of " +
                                              std::to_string(chunks) +
                                              " chunks (evicted? the arena must hold the request)");
    }
    return Status::Ok();
  };
  auto clear = [&]() -> Status {
    auto r = client.clear(keys);
    return r.ok() ? Status::Ok() : r.status();
  };

  // Random source data (the first put also page-locks the arena: not timed).
  for (auto& layer : pool.host) {
    for (size_t i = 0; i + 8 <= layer.size(); i += 8) {
      const uint64_t x = rng();
      std::memcpy(layer.data() + i, &x, 8);
    }
  }
  if (Status s = pool.upload(); !s.ok()) return fail(1, s.to_string());
  const std::vector<std::vector<uint8_t>> source = pool.host;
  if (Status s = put(); !s.ok()) return fail(1, "put: " + s.to_string());
  if (args.count("verify")) {
    for (auto& layer : pool.host) std::fill(layer.begin(), layer.end(), kPoison);
    if (Status s = pool.upload(); !s.ok()) return fail(1, s.to_string());
    if (Status s = get(); !s.ok()) return fail(1, "get: " + s.to_string());
    if (Status s = pool.download(); !s.ok()) return fail(1, s.to_string());
    std::vector<bool> loaded(desc.num_blocks, false);
    for (uint32_t b : get_table) loaded[b] = true;
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      for (uint32_t i = 0; i < request_blocks; ++i) {
        for (uint32_t p = 0; p < layout->parts(); ++p) {
          const auto part = static_cast<protocol::KvPart>(p);
          const protocol::ByteExtent want = layout->extent(put_table[i], part);
          const protocol::ByteExtent got = layout->extent(get_table[i], part);
          if (std::memcmp(source[l].data() + want.offset, pool.host[l].data() + got.offset, want.length) !=
              0) {
            return fail(1, "VERIFY FAILED: layer " + std::to_string(l) + " request block " +
                               std::to_string(i) + " part " + std::to_string(p) +
                               " differs from what was put");
          }
        }
      }
      for (uint32_t b = 0; b < desc.num_blocks; ++b) {
        if (loaded[b]) continue;
        for (uint32_t p = 0; p < layout->parts(); ++p) {
          const protocol::ByteExtent e = layout->extent(b, static_cast<protocol::KvPart>(p));
          const uint8_t* at = pool.host[l].data() + e.offset;
          if (std::any_of(at, at + e.length, [](uint8_t v) { return v != kPoison; })) {
            return fail(1, "VERIFY FAILED: layer " + std::to_string(l) + " block " + std::to_string(b) +
                               " is outside the request but was written");
          }
        }
      }
    }
    std::printf("every byte verified (%llu bytes put from random blocks, got into poisoned other blocks)\n",
                static_cast<unsigned long long>(total));
  } else if (Status s = get(); !s.ok()) {  // warm-up
    return fail(1, "get: " + s.to_string());
  }
  if (Status s = clear(); !s.ok()) return fail(1, "clear: " + s.to_string());

  const uint32_t iters = std::max(1u, args["iters"].as<uint32_t>());
  std::vector<double> put_us, get_us;
  for (uint32_t i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    if (Status s = put(); !s.ok()) return fail(1, "put: " + s.to_string());
    auto t1 = Clock::now();
    if (Status s = get(); !s.ok()) return fail(1, "get: " + s.to_string());
    auto t2 = Clock::now();
    if (Status s = clear(); !s.ok()) return fail(1, "clear: " + s.to_string());
    put_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    get_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  const Figures p = figures(put_us, total), g = figures(get_us, total);
  std::printf("%-8s %12s %8s %10s %10s %10s\n", "mode", "bytes", "iters", "GB/s", "p50_us", "p99_us");
  for (const auto& [name, f] : {std::pair{"put", p}, std::pair{"get", g}}) {
    std::printf("%-8s %12llu %8u %10.2f %10.1f %10.1f\n", name, static_cast<unsigned long long>(total), iters,
                f.gbps, f.p50_us, f.p99_us);
  }
  if (args.count("json") != 0) {
    nlohmann::json j;
    j["results"] = nlohmann::json::array();
    for (const auto& [name, f] : {std::pair{"put", p}, std::pair{"get", g}}) {
      j["results"].push_back({{"mode", name},
                              {"bytes", total},
                              {"iters", iters},
                              {"seconds", f.seconds},
                              {"gbps", f.gbps},
                              {"p50_us", f.p50_us},
                              {"p99_us", f.p99_us}});
    }
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), j); !s.ok())
      return fail(1, s.message());
  }
  return 0;
}
