// kvfabric-connector-check: an "engine" process for the store connector's integration tests. It
// owns a paged KV pool (a small Llama-like layout) in host memory, or with --mem cuda:N in GPU N's
// memory (cudaMalloc'd layer buffers: the connector's GPU path), and
//   store  fills the blocks of a prompt (tokens and bytes derived from --seed; block ids from
//          --table-seed) and stores its full chunks through the node's kvfabricd;
//   load   poisons its pool, loads the stored prefix of the prompt into other block ids and checks
//          every byte of every loaded block against what `store` wrote, and that nothing else
//          changed; --layers loads layer by layer and checks that when layer l is reported, layer
//          l is complete (and, in host memory, layer l+1 not yet touched: the GPU path copies
//          later layers while earlier ones are reported); --expect-fail: the load must fail with
//          kVerifyFailed and leave every block poisoned;
//   corrupt flips one byte of chunk --chunk of the prompt inside the store's arena (a test's
//          stand-in for memory corruption: the next load must refuse the chunk);
//   lookup prints how many tokens of the prompt the store holds.
// --diverge-after N: the prompt's tokens from N on differ from the seed's (a shared prefix).
// A pool in GPU memory is filled and checked through host mirrors (copies to and from the GPU).
// Exit: 0 ok, 1 bytes or counts wrong, 2 usage, 3 a store error.
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/engines/store_connector.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/kv_codec.h"

namespace {

using namespace kvf;

constexpr uint8_t kPoison = 0xA5;

protocol::KvLayoutDesc test_layout() {
  protocol::KvLayoutDesc d;
  d.kind = protocol::KvLayoutKind::kFlashAttention;
  d.num_layers = 4;
  d.num_blocks = 256;
  d.block_tokens = 16;
  d.kv_heads = 2;
  d.head_dim = 64;
  d.dtype_bytes = 2;
  return d;
}

std::vector<uint32_t> prompt(uint64_t seed, uint32_t n, uint32_t diverge_after) {
  std::mt19937_64 rng(seed);
  std::mt19937_64 other(seed ^ 0x5eed);
  std::vector<uint32_t> t(n);
  for (uint32_t i = 0; i < n; ++i) {
    const uint64_t a = rng(), b = other();
    t[i] = static_cast<uint32_t>((i < diverge_after ? a : b) % 128000);
  }
  return t;
}

std::vector<uint32_t> table(uint64_t seed, uint32_t blocks, uint32_t pool) {
  std::vector<uint32_t> ids(pool);
  std::iota(ids.begin(), ids.end(), 0u);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(static_cast<uint32_t>(seed)));
  ids.resize(blocks);
  return ids;
}

// The byte at `i` of (logical block, layer, part) for prompt seed `seed`: independent of block ids.
uint8_t pattern(uint64_t seed, uint32_t logical, uint32_t layer, uint32_t part, uint64_t i) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (uint64_t{logical} << 40) ^ (uint64_t{layer} << 32) ^
               (uint64_t{part} << 24) ^ (i >> 3);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return static_cast<uint8_t>(x >> (8 * (i & 7)));
}

int fail(int code, const std::string& what) {
  std::fprintf(stderr, "kvfabric-connector-check: %s\n", what.c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-connector-check", "an engine process for the store connector test");
  options.add_options()("command", "store | load | corrupt | lookup", cxxopts::value<std::string>())  //
      ("socket", "kvfabricd's socket", cxxopts::value<std::string>())                                 //
      ("model", "model name", cxxopts::value<std::string>()->default_value("m"))                      //
      ("seed", "prompt seed", cxxopts::value<uint64_t>()->default_value("1"))                         //
      ("tokens", "prompt length", cxxopts::value<uint32_t>()->default_value("1000"))                  //
      ("diverge-after", "tokens shared with the seed's prompt",
       cxxopts::value<uint32_t>()->default_value("4294967295"))                                           //
      ("table-seed", "block ids of this engine", cxxopts::value<uint64_t>()->default_value("1"))          //
      ("chunk-tokens", "tokens per chunk", cxxopts::value<uint32_t>()->default_value("64"))               //
      ("layers", "load layer by layer")                                                                   //
      ("mem", "the pool's memory: host or cuda:N", cxxopts::value<std::string>()->default_value("host"))  //
      ("chunk", "corrupt: which chunk of the prompt", cxxopts::value<uint32_t>()->default_value("0"))     //
      ("expect-fail", "load: the load must be refused (a corrupt chunk), nothing written")                //
      ("finite",
       "store/load: the bytes are finite bf16 values (|x| < 2), as KV is, so lossy codecs take them")  //
      ("codec",
       "load: the store holds the chunks encoded with this codec (the daemon's /compress): each "
       "loaded block must equal what `store` wrote after the CPU codec's encode and decode",
       cxxopts::value<std::string>()->default_value("identity"))  //
      ("expect-tokens", "load/lookup: the tokens that must be found",
       cxxopts::value<int64_t>()->default_value("-1"));
  options.parse_positional({"command"});
  const auto args = options.parse(argc, argv);
  if (!args.count("command") || !args.count("socket")) return fail(2, "usage: COMMAND --socket PATH ...");
  const std::string command = args["command"].as<std::string>();
  const uint64_t seed = args["seed"].as<uint64_t>();
  const uint32_t n = args["tokens"].as<uint32_t>();
  const auto tokens = prompt(seed, n, args["diverge-after"].as<uint32_t>());
  const protocol::KvLayoutDesc desc = test_layout();
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return fail(1, layout.status().to_string());
  const uint32_t blocks = (n + desc.block_tokens - 1) / desc.block_tokens;
  const auto ids = table(args["table-seed"].as<uint64_t>(), blocks, desc.num_blocks);

  // The pool in host memory; with --mem cuda:N it is the host mirror of the GPU layer buffers.
  std::vector<std::vector<uint8_t>> pool(desc.num_layers,
                                         std::vector<uint8_t>(layout->layer_bytes(), kPoison));
  const std::string mem = args["mem"].as<std::string>();
  const bool on_gpu = mem != "host";
  if (on_gpu && mem.rfind("cuda:", 0) != 0) return fail(2, "--mem must be host or cuda:N, got '" + mem + "'");
  std::vector<gpudirect::DeviceBuffer> gpu_pool;
  std::vector<uint8_t*> layers;
  for (auto& l : pool) {
    if (!on_gpu) {
      layers.push_back(l.data());
      continue;
    }
    auto buffer = gpudirect::DeviceBuffer::allocate(std::atoi(mem.c_str() + 5), l.size());
    if (!buffer.ok()) return fail(3, "GPU pool: " + buffer.status().to_string());
    if (Status s = gpudirect::fill_device(buffer->data(), kPoison, l.size()); !s.ok())
      return fail(3, s.to_string());
    layers.push_back(static_cast<uint8_t*>(buffer->data()));
    gpu_pool.push_back(std::move(buffer.value()));
  }
  // Host mirror <-> GPU pool, one layer; nothing to do for a host pool.
  auto upload = [&](uint32_t l) -> Status {
    return on_gpu ? gpudirect::copy_sync(layers[l], pool[l].data(), pool[l].size()) : Status::Ok();
  };
  auto download = [&](uint32_t l) -> Status {
    return on_gpu ? gpudirect::copy_sync(pool[l].data(), layers[l], pool[l].size()) : Status::Ok();
  };
  store::StoreClient client(
      store::StoreClientOptions{args["socket"].as<std::string>(), "connector-check " + command});
  engines::StoreConnectorOptions copts{args["model"].as<std::string>(), desc,
                                       args["chunk-tokens"].as<uint32_t>()};
  auto connector = engines::StoreConnector::create(client, copts, layers);
  if (!connector.ok()) return fail(3, connector.status().to_string());
  const int64_t expect = args["expect-tokens"].as<int64_t>();

  // The byte `store` writes at i of (logical block, layer, part); with --finite every 16-bit value's
  // top exponent bit is cleared, so each is a finite bf16 below 2 in magnitude.
  const bool finite = args.count("finite") > 0;
  auto data_byte = [&](uint32_t b, uint32_t l, uint32_t p, uint64_t i) -> uint8_t {
    const uint8_t v = pattern(seed, b, l, p, i);
    return finite && (i & 1) ? static_cast<uint8_t>(v & 0xBF) : v;
  };
  auto each_block = [&](auto&& fn) {
    for (uint32_t b = 0; b < blocks; ++b) {
      for (uint32_t l = 0; l < desc.num_layers; ++l) {
        for (uint32_t p = 0; p < layout->parts(); ++p) {
          const protocol::ByteExtent e = layout->extent(ids[b], static_cast<protocol::KvPart>(p));
          fn(b, l, p, pool[l].data() + e.offset, e.length);
        }
      }
    }
  };

  if (command == "lookup") {
    auto held = connector->lookup(tokens);
    if (!held.ok()) return fail(3, held.status().to_string());
    std::printf("lookup: %llu of %u tokens held\n", static_cast<unsigned long long>(*held), n);
    if (expect >= 0 && static_cast<int64_t>(*held) != expect)
      return fail(1, "expected " + std::to_string(expect));
    return 0;
  }
  if (command == "store") {
    each_block([&](uint32_t b, uint32_t l, uint32_t p, uint8_t* at, uint64_t len) {
      for (uint64_t i = 0; i < len; ++i) at[i] = data_byte(b, l, p, i);
    });
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      if (Status s = upload(l); !s.ok()) return fail(3, s.to_string());
    }
    auto stored = connector->store(tokens, ids);
    if (!stored.ok()) return fail(3, stored.status().to_string());
    std::printf("store: %u chunks stored, %u already stored, %llu bytes\n", stored->stored,
                stored->already_stored, static_cast<unsigned long long>(stored->bytes));
    return 0;
  }
  if (command == "corrupt") {
    protocol::ChunkHasher hasher(protocol::model_fingerprint(copts.model, desc), copts.chunk_tokens);
    const auto keys = hasher.hash(tokens);
    const uint32_t chunk = args["chunk"].as<uint32_t>();
    if (chunk >= keys.size())
      return fail(2, "--chunk " + std::to_string(chunk) + ": the prompt has fewer chunks");
    auto lease = client.acquire(keys[chunk]);
    if (!lease.ok()) return fail(3, "corrupt: " + lease.status().to_string());
    std::span<const uint8_t> bytes = client.bytes(lease.value());
    if (bytes.empty()) return fail(3, "corrupt: the lease's bytes are not mapped");
    // The arena is shared memory mapped writable; a lease only promises that the store does not
    // change the bytes, which is exactly what this simulates going wrong.
    const size_t at = bytes.size() / 2;
    const_cast<uint8_t*>(bytes.data())[at] ^= 0xFF;
    (void)client.release(lease.value());
    std::printf("corrupt: flipped byte %zu of chunk %u (%zu bytes)\n", at, chunk, bytes.size());
    return 0;
  }
  if (command != "load") return fail(2, "unknown command '" + command + "'");

  std::vector<uint32_t> reported;
  std::string order_problem;
  const uint32_t blocks_per_chunk = connector->blocks_per_chunk();
  // What a loaded block must hold: the pattern `store` wrote, or, when the store re-encoded the
  // chunks, what the CPU codec makes of each whole chunk of it (encode, then decode).
  auto codec = protocol::parse_codec(args["codec"].as<std::string>());
  if (!codec.ok()) return fail(2, "--codec: " + codec.status().message());
  std::vector<std::vector<uint8_t>> expected_part;  // [((b * layers) + l) * parts + p]
  auto part_index = [&](uint32_t b, uint32_t l, uint32_t p) {
    return (uint64_t{b} * desc.num_layers + l) * layout->parts() + p;
  };
  if (codec.value() != protocol::KvCodec::kIdentity) {
    expected_part.resize(uint64_t{blocks} * desc.num_layers * layout->parts());
    const protocol::KvChunkGeometry geometry{
        desc.num_layers, layout->parts(), blocks_per_chunk, desc.block_tokens, desc.kv_heads * desc.head_dim,
        desc.dtype_bytes};
    protocol::KvCodecParams params;
    params.codec = codec.value();
    auto bound = gpudirect::max_encoded_bytes(params, geometry);
    if (!bound.ok()) return fail(2, bound.status().to_string());
    std::vector<uint8_t> raw(geometry.raw_bytes()), encoded(*bound), decoded(geometry.raw_bytes());
    const uint64_t part_bytes = layout->part_bytes();
    for (uint32_t first = 0; first + blocks_per_chunk <= blocks; first += blocks_per_chunk) {
      uint64_t at = 0;  // the store's order: layer, block of the chunk, part
      for (uint32_t l = 0; l < desc.num_layers; ++l)
        for (uint32_t b = first; b < first + blocks_per_chunk; ++b)
          for (uint32_t p = 0; p < layout->parts(); ++p, at += part_bytes)
            for (uint64_t i = 0; i < part_bytes; ++i) raw[at + i] = data_byte(b, l, p, i);
      auto encoded_bytes = gpudirect::encode_chunk(params, geometry, raw, encoded);
      if (!encoded_bytes.ok()) return fail(3, encoded_bytes.status().to_string());
      if (Status st = gpudirect::decode_chunk(std::span(encoded).first(*encoded_bytes), decoded); !st.ok())
        return fail(3, st.to_string());
      at = 0;
      for (uint32_t l = 0; l < desc.num_layers; ++l)
        for (uint32_t b = first; b < first + blocks_per_chunk; ++b)
          for (uint32_t p = 0; p < layout->parts(); ++p, at += part_bytes)
            expected_part[part_index(b, l, p)].assign(
                decoded.begin() + static_cast<ptrdiff_t>(at),
                decoded.begin() + static_cast<ptrdiff_t>(at + part_bytes));
    }
  }
  auto expected_byte = [&](uint32_t b, uint32_t l, uint32_t p, uint64_t i) {
    const uint64_t k = part_index(b, l, p);
    return k < expected_part.size() && !expected_part[k].empty() ? expected_part[k][i]
                                                                 : data_byte(b, l, p, i);
  };
  // A block holds what `store` wrote iff it is in a loaded chunk; everything else stays poisoned.
  auto check_layer = [&](uint32_t layer, uint32_t loaded_blocks, bool want_loaded) -> std::string {
    for (uint32_t b = 0; b < blocks; ++b) {
      for (uint32_t p = 0; p < layout->parts(); ++p) {
        const protocol::ByteExtent e = layout->extent(ids[b], static_cast<protocol::KvPart>(p));
        const uint8_t* at = pool[layer].data() + e.offset;
        const bool loaded = want_loaded && b < loaded_blocks;
        for (uint64_t i = 0; i < e.length; ++i) {
          const uint8_t want = loaded ? expected_byte(b, layer, p, i) : kPoison;
          if (at[i] != want) {
            return "layer " + std::to_string(layer) + " block " + std::to_string(b) + " part " +
                   std::to_string(p) + " byte " + std::to_string(i) + ": " +
                   (loaded ? "wrong data" : "changed though not loaded");
          }
        }
      }
    }
    return "";
  };
  uint32_t expected_blocks = expect >= 0 ? static_cast<uint32_t>(expect) / desc.block_tokens : 0;
  auto on_layer = [&](uint32_t l) {
    reported.push_back(l);
    if (order_problem.empty() && expect >= 0) {
      if (Status s = download(l); !s.ok()) order_problem = s.to_string();
      if (order_problem.empty()) order_problem = check_layer(l, expected_blocks, true);
      // In host memory the next layer is copied only after this call; on the GPU it may be in flight.
      if (order_problem.empty() && !on_gpu && l + 1 < desc.num_layers)
        order_problem = check_layer(l + 1, 0, false);
      if (!order_problem.empty()) order_problem = "at on_layer(" + std::to_string(l) + "): " + order_problem;
    }
  };
  auto loaded =
      args.count("layers") ? connector->load_layers(tokens, ids, on_layer) : connector->load(tokens, ids);
  if (args.count("expect-fail")) {
    if (loaded.ok())
      return fail(
          1, "the load succeeded (" + std::to_string(loaded->chunks) + " chunks); a refusal was expected");
    if (loaded.status().code() != ErrorCode::kVerifyFailed) {
      return fail(1, "the load failed, but not with a checksum refusal: " + loaded.status().to_string());
    }
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      if (Status s = download(l); !s.ok()) return fail(3, s.to_string());
      if (std::string problem = check_layer(l, 0, false); !problem.empty()) {
        return fail(1, "after the refused load: " + problem);
      }
    }
    std::printf("load refused: %s; every block still poisoned\n", loaded.status().to_string().c_str());
    return 0;
  }
  if (!loaded.ok()) return fail(3, loaded.status().to_string());
  if (expect >= 0 && static_cast<int64_t>(loaded->tokens) != expect) {
    return fail(1,
                "loaded " + std::to_string(loaded->tokens) + " tokens, expected " + std::to_string(expect));
  }
  const uint32_t loaded_blocks = loaded->chunks * blocks_per_chunk;
  for (uint32_t l = 0; l < desc.num_layers; ++l) {
    if (Status s = download(l); !s.ok()) return fail(3, s.to_string());
    if (std::string problem = check_layer(l, loaded_blocks, true); !problem.empty()) return fail(1, problem);
  }
  if (args.count("layers")) {
    if (!order_problem.empty()) return fail(1, order_problem);
    for (uint32_t l = 0; l < reported.size() || l < desc.num_layers; ++l) {
      if (l >= reported.size() || reported[l] != l) return fail(1, "layers reported out of order or missing");
    }
  }
  std::printf("load: %u chunks, %llu tokens, %llu bytes; every block verified%s%s\n", loaded->chunks,
              static_cast<unsigned long long>(loaded->tokens), static_cast<unsigned long long>(loaded->bytes),
              args.count("layers") ? ", layers reported in order as each completed" : "",
              on_gpu ? (" (GPU " + std::to_string(connector->device()) + " memory)").c_str() : "");
  return 0;
}
