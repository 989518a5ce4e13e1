// kvfabric-codec-quality: what each KV codec does to the reference engine (issue 6, item 2). For
// each of --prompts synthetic prompts the engine computes the KV of a --prefix-chunks-chunk prefix;
// every chunk of it is encoded and decoded by each codec (the CPU codec, gpudirect/kv_codec.h) and
// written back into a copy of the cache; then the engine decodes --steps teacher-forced tokens
// after the prefix on the original cache and on each decoded one. Reported per codec:
//   ratio            raw / encoded bytes
//   K, V error       ||x - x'|| / ||x|| over the chunks (and the encoder's own estimate beside it)
//   attention error  ||o - o'|| / ||o|| of every layer's attention output at the last prefix
//                    position, the queries being the model's own keys of the following tokens
//   agreement        the fraction of the --steps next tokens (argmax) equal to the original run's
// and, for the placement bench, a profiles file (--profiles-out): size ratio, quality = agreement.
//   kvfabric-codec-quality [--gpu N --shape llama3-8b] [--prompts 32 --prefix-chunks 4 --steps 16]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/engines/engine_model.h"
#include "kvf/engines/reference_kernels.h"
#include "kvf/engines/synthetic_prompt.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/protocol/chunk_key.h"
#include "perf_util.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

struct CodecCase {
  std::string name;
  protocol::KvCodecParams params;
};

// "int8", "int4:r=32", "int2:g=64", "drop:keep=0.25" (protocol::parse_codec_spec).
CodecCase parse_case(const std::string& spec) {
  auto params = protocol::parse_codec_spec(spec);
  if (!params.ok()) throw std::runtime_error(params.status().message());
  return CodecCase{spec, params.value()};
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  // Codec specs are ';'-separated, since commas belong to one codec's options ("int4:r=32,g=64").
  while (start <= s.size()) {
    const size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

// The engine's cache on the host, whatever memory the engine uses.
struct HostCache {
  protocol::KvLayout layout;
  std::vector<std::vector<uint8_t>> layers;
};

HostCache copy_to_host(const engines::KvPool& pool) {
  HostCache h{pool.layout(), {}};
  for (uint8_t* layer : pool.view().layers) {
    std::vector<uint8_t> bytes(pool.layout().layer_bytes());
    if (Status s = pool.device() < 0 ? (std::memcpy(bytes.data(), layer, bytes.size()), Status::Ok())
                                     : gpudirect::copy_sync(bytes.data(), layer, bytes.size());
        !s.ok()) {
      throw std::runtime_error("copying the cache to the host: " + s.message());
    }
    h.layers.push_back(std::move(bytes));
  }
  return h;
}

void copy_from_host(const HostCache& h, const engines::KvPool& pool) {
  for (size_t l = 0; l < h.layers.size(); ++l) {
    uint8_t* layer = pool.view().layers[l];
    if (Status s = pool.device() < 0
                       ? (std::memcpy(layer, h.layers[l].data(), h.layers[l].size()), Status::Ok())
                       : gpudirect::copy_sync(layer, h.layers[l].data(), h.layers[l].size());
        !s.ok()) {
      throw std::runtime_error("copying the cache to the engine: " + s.message());
    }
  }
}

// Chunk `chunk` (blocks [chunk * blocks_per_chunk, ...), block ids = positions / block_tokens) in
// the store's byte order, and back.
void gather_chunk(const HostCache& h, uint32_t chunk, uint32_t blocks_per_chunk, std::vector<uint8_t>& out) {
  const uint32_t parts = h.layout.parts();
  const uint64_t part_bytes = h.layout.part_bytes();
  out.resize(uint64_t{h.layout.desc().num_layers} * blocks_per_chunk * parts * part_bytes);
  uint8_t* dst = out.data();
  for (const auto& layer : h.layers) {
    for (uint32_t b = 0; b < blocks_per_chunk; ++b) {
      for (uint32_t p = 0; p < parts; ++p) {
        const auto e = h.layout.extent(chunk * blocks_per_chunk + b, static_cast<protocol::KvPart>(p));
        std::memcpy(dst, layer.data() + e.offset, e.length);
        dst += e.length;
      }
    }
  }
}

void scatter_chunk(HostCache& h, uint32_t chunk, uint32_t blocks_per_chunk, const std::vector<uint8_t>& in) {
  const uint32_t parts = h.layout.parts();
  const uint8_t* src = in.data();
  for (auto& layer : h.layers) {
    for (uint32_t b = 0; b < blocks_per_chunk; ++b) {
      for (uint32_t p = 0; p < parts; ++p) {
        const auto e = h.layout.extent(chunk * blocks_per_chunk + b, static_cast<protocol::KvPart>(p));
        std::memcpy(layer.data() + e.offset, src, e.length);
        src += e.length;
      }
    }
  }
}

// Every layer's attention output at `position` for queries = the keys at `query_positions`
// (repeated over each KV head's query heads), on the host copy of the cache.
std::vector<float> attention_outputs(const HostCache& h, const engines::ModelShape& shape,
                                     std::span<const uint32_t> block_table, uint64_t position,
                                     const std::vector<std::vector<float>>& queries) {
  const uint32_t group = shape.q_heads / shape.kv_heads;
  std::vector<float> out;
  std::vector<float> q(uint64_t{shape.q_heads} * shape.head_dim);
  std::vector<float> o(q.size());
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (const auto& key_row : queries) {
      for (uint32_t head = 0; head < shape.q_heads; ++head) {
        const uint32_t kv = head / group;
        std::copy_n(
            key_row.begin() + uint64_t{l} * shape.kv_heads * shape.head_dim + uint64_t{kv} * shape.head_dim,
            shape.head_dim, q.begin() + uint64_t{head} * shape.head_dim);
      }
      engines::reference::paged_attention(q.data(), shape.q_heads, position, h.layers[l].data(), h.layout,
                                          block_table, o.data());
      out.insert(out.end(), o.begin(), o.end());
    }
  }
  return out;
}

// The keys (all layers, all KV heads) of the token at `position`, as floats.
std::vector<float> key_row(const HostCache& h, const engines::ModelShape& shape,
                           std::span<const uint32_t> block_table, uint64_t position) {
  std::vector<float> row;
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (uint32_t kv = 0; kv < shape.kv_heads; ++kv) {
      const uint8_t* p = engines::reference::kv_slot(h.layers[l].data(), h.layout, block_table, position, kv,
                                                     protocol::KvPart::kKey);
      for (uint32_t d = 0; d < shape.head_dim; ++d) {
        uint16_t bits;
        std::memcpy(&bits, p + 2ull * d, 2);
        row.push_back(engines::reference::from_bf16(bits));
      }
    }
  }
  return row;
}

double relative(const std::vector<float>& ref, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(ref[i]) - got[i]) * (double(ref[i]) - got[i]);
    den += double(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

struct CodecTally {
  uint64_t raw = 0, encoded = 0;
  double k_num = 0, k_den = 0, v_num = 0, v_den = 0;
  std::vector<double> key_estimates;  // per chunk, the encoder's K error
  double attention_error_sum = 0;
  uint64_t attention_samples = 0;
  uint64_t agree = 0, steps = 0;
  std::vector<double> prompt_agreement;
  double encode_seconds = 0, decode_seconds = 0;
};

double log_sigma(const std::vector<double>& v) {
  std::vector<double> logs;
  for (double x : v) {
    if (x > 0) logs.push_back(std::log(x));
  }
  if (logs.size() < 2) return 0.0;
  const double mean = std::accumulate(logs.begin(), logs.end(), 0.0) / static_cast<double>(logs.size());
  double var = 0;
  for (double x : logs) var += (x - mean) * (x - mean);
  return std::sqrt(var / static_cast<double>(logs.size() - 1));
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-codec-quality",
                           "What each KV codec does to the reference engine's outputs.");
  options.add_options()("shape", "tiny or llama3-8b", cxxopts::value<std::string>()->default_value("tiny"))(
      "gpu", "GPU to run the engine on (-1: the CPU)", cxxopts::value<int>()->default_value("-1"))(
      "prompts", "prompts (contexts)", cxxopts::value<uint32_t>()->default_value("32"))(
      "prefix-chunks", "chunks of 256 tokens in each prompt's compressed prefix",
      cxxopts::value<uint32_t>()->default_value("2"))("steps",
                                                      "teacher-forced next tokens compared after the prefix",
                                                      cxxopts::value<uint32_t>()->default_value("32"))(
      "codecs",
      "codecs, ';'-separated, each name[:key=value,...] (r: residual tokens, g: group, keep: drop fraction)",
      cxxopts::value<std::string>()->default_value(
          "identity;zstd;lz4;int8;fp8;int4;int4:r=32;int2;int2:r=64;drop:keep=0.5"))(
      "seed", "weights and prompts", cxxopts::value<uint64_t>()->default_value("1"))(
      "decode-gbps", "the decode speed written into the profiles (raw GB/s on the GPU; 0: free)",
      cxxopts::value<double>()->default_value("0"))("profiles-out",
                                                    "write codec profiles for kvfabric-placement-bench here",
                                                    cxxopts::value<std::string>())(
      "json", "write the results here", cxxopts::value<std::string>())("h,help", "this help");
  try {
    const auto args = options.parse(argc, argv);
    if (args.count("help")) {
      std::cout << options.help() << "\n";
      return 0;
    }
    const std::string shape_name = args["shape"].as<std::string>();
    if (shape_name != "tiny" && shape_name != "llama3-8b")
      throw std::runtime_error("--shape is tiny or llama3-8b");
    const engines::ModelShape shape =
        shape_name == "tiny" ? engines::ModelShape::tiny() : engines::ModelShape::llama3_8b();
    const int gpu = args["gpu"].as<int>();
    const uint32_t prompts = args["prompts"].as<uint32_t>();
    const uint32_t prefix_chunks = args["prefix-chunks"].as<uint32_t>();
    const uint32_t steps = args["steps"].as<uint32_t>();
    const uint64_t seed = args["seed"].as<uint64_t>();
    if (prompts == 0 || prefix_chunks == 0 || steps == 0)
      throw std::runtime_error("--prompts, --prefix-chunks and --steps must be positive");
    std::vector<CodecCase> cases;
    for (const std::string& spec : split(args["codecs"].as<std::string>(), ';')) {
      if (!spec.empty()) cases.push_back(parse_case(spec));
    }

    const uint32_t chunk_tokens = protocol::kDefaultChunkTokens;
    const uint32_t blocks_per_chunk = chunk_tokens / shape.block_tokens;
    const uint32_t prefix = prefix_chunks * chunk_tokens;
    const uint32_t total = prefix + steps + 1;
    const uint32_t blocks = (total + shape.block_tokens - 1) / shape.block_tokens;
    auto model = engines::EngineModel::create(shape, seed, gpu, total);
    if (!model.ok()) throw std::runtime_error("engine: " + model.status().message());
    auto reference_pool = engines::KvPool::create(shape.kv_layout_desc(blocks), gpu, 0xFF);
    auto codec_pool = engines::KvPool::create(shape.kv_layout_desc(blocks), gpu, 0xFF);
    if (!reference_pool.ok() || !codec_pool.ok()) throw std::runtime_error("cannot allocate the KV pools");
    std::vector<uint32_t> table(blocks);
    std::iota(table.begin(), table.end(), 0u);
    const protocol::KvChunkGeometry geometry{
        shape.layers, 2, blocks_per_chunk, shape.block_tokens, shape.kv_heads * shape.head_dim, 2};
    std::vector<CodecTally> tallies(cases.size());
    std::fprintf(stderr, "%s on %s: %u prompts, %u-token prefix, %u steps, %zu codecs\n",
                 shape.to_string().c_str(), gpu < 0 ? "the CPU" : ("GPU " + std::to_string(gpu)).c_str(),
                 prompts, prefix, steps, cases.size());

    std::vector<uint8_t> raw, encoded, decoded;
    for (uint32_t p = 0; p < prompts; ++p) {
      const std::vector<uint32_t> tokens = engines::synthetic_prompt(total, shape.vocab, seed * 7919 + p);
      // The original run: prefix, then teacher-forced steps; its predictions are the reference.
      auto first = (*model)->prefill_from(0, std::span(tokens).first(prefix), table, reference_pool->view());
      if (!first.ok()) throw std::runtime_error("prefill: " + first.status().message());
      const HostCache prefix_cache = copy_to_host(*reference_pool);
      std::vector<uint32_t> reference_next;
      for (uint32_t s = 0; s < steps; ++s) {
        auto next = (*model)->decode_step(prefix + s, tokens[prefix + s], table, reference_pool->view());
        if (!next.ok()) throw std::runtime_error("decode: " + next.status().message());
        reference_next.push_back(*next);
      }
      const HostCache full_cache = copy_to_host(*reference_pool);
      std::vector<std::vector<float>> queries;
      for (uint32_t s = 0; s < std::min(steps, 4u); ++s)
        queries.push_back(key_row(full_cache, shape, table, prefix + s));
      const std::vector<float> reference_attention =
          attention_outputs(prefix_cache, shape, table, prefix - 1, queries);

      for (size_t c = 0; c < cases.size(); ++c) {
        CodecTally& t = tallies[c];
        HostCache cache = prefix_cache;
        for (uint32_t chunk = 0; chunk < prefix_chunks; ++chunk) {
          gather_chunk(prefix_cache, chunk, blocks_per_chunk, raw);
          auto bound = gpudirect::max_encoded_bytes(cases[c].params, geometry);
          if (!bound.ok()) throw std::runtime_error(cases[c].name + ": " + bound.status().message());
          encoded.resize(*bound);
          const auto t0 = Clock::now();
          auto n = gpudirect::encode_chunk(cases[c].params, geometry, raw, encoded);
          const auto t1 = Clock::now();
          if (!n.ok()) throw std::runtime_error(cases[c].name + ": " + n.status().message());
          decoded.assign(raw.size(), 0xA5);
          if (Status s = gpudirect::decode_chunk(std::span(encoded).first(*n), decoded); !s.ok()) {
            throw std::runtime_error(cases[c].name + " decode: " + s.message());
          }
          const auto t2 = Clock::now();
          t.encode_seconds += std::chrono::duration<double>(t1 - t0).count();
          t.decode_seconds += std::chrono::duration<double>(t2 - t1).count();
          t.raw += raw.size();
          t.encoded += *n;
          auto header = protocol::read_chunk_header(std::span(encoded).first(*n));
          if (header.ok()) t.key_estimates.push_back(header->key_error);
          auto err = gpudirect::compare_chunks(geometry, raw, decoded);
          if (!err.ok()) throw std::runtime_error(err.status().message());
          // Weighted back into sums so the figure is over all chunks, not a mean of ratios. In the
          // store's order a chunk alternates K and V every block_tokens x channels values.
          double k2 = 0, v2 = 0;
          for (uint64_t i = 0; i < raw.size() / 2; ++i) {
            const uint64_t part = (i / (uint64_t{geometry.block_tokens} * geometry.channels)) % 2;
            uint16_t bits;
            std::memcpy(&bits, raw.data() + 2 * i, 2);
            const double x = engines::reference::from_bf16(bits);
            (part == 0 ? k2 : v2) += x * x;
          }
          t.k_num += err->key_relative * err->key_relative * k2;
          t.k_den += k2;
          t.v_num += err->value_relative * err->value_relative * v2;
          t.v_den += v2;
          scatter_chunk(cache, chunk, blocks_per_chunk, decoded);
        }
        const std::vector<float> got = attention_outputs(cache, shape, table, prefix - 1, queries);
        t.attention_error_sum += relative(reference_attention, got);
        t.attention_samples += 1;
        copy_from_host(cache, *codec_pool);
        uint64_t agree = 0;
        for (uint32_t s = 0; s < steps; ++s) {
          auto next = (*model)->decode_step(prefix + s, tokens[prefix + s], table, codec_pool->view());
          if (!next.ok()) throw std::runtime_error("decode: " + next.status().message());
          agree += *next == reference_next[s] ? 1 : 0;
        }
        t.agree += agree;
        t.steps += steps;
        t.prompt_agreement.push_back(static_cast<double>(agree) / steps);
      }
      std::fprintf(stderr, "prompt %u/%u done\n", p + 1, prompts);
    }

    std::printf("%s, %u prompts x %u-token prefix (%u chunks), %u teacher-forced steps each\n",
                shape.to_string().c_str(), prompts, prefix, prefix_chunks, steps);
    std::printf("%-18s %7s %9s %9s %9s %11s %11s %10s %8s %8s\n", "codec", "ratio", "K err", "V err", "K est",
                "est sigma", "attn err", "agreement", "enc GB/s", "dec GB/s");
    nlohmann::json results = nlohmann::json::array();
    nlohmann::json profiles = nlohmann::json::array();
    for (size_t c = 0; c < cases.size(); ++c) {
      const CodecTally& t = tallies[c];
      const double ratio = static_cast<double>(t.raw) / static_cast<double>(t.encoded);
      const double k_err = t.k_den > 0 ? std::sqrt(t.k_num / t.k_den) : 0;
      const double v_err = t.v_den > 0 ? std::sqrt(t.v_num / t.v_den) : 0;
      const double k_est = t.key_estimates.empty()
                               ? 0
                               : std::accumulate(t.key_estimates.begin(), t.key_estimates.end(), 0.0) /
                                     static_cast<double>(t.key_estimates.size());
      const double attn =
          t.attention_error_sum / static_cast<double>(std::max<uint64_t>(1, t.attention_samples));
      const double agreement =
          static_cast<double>(t.agree) / static_cast<double>(std::max<uint64_t>(1, t.steps));
      const double enc = static_cast<double>(t.raw) / t.encode_seconds / 1e9;
      const double dec = static_cast<double>(t.raw) / t.decode_seconds / 1e9;
      std::printf("%-18s %7.2f %9.5f %9.5f %9.5f %11.3f %11.5f %9.2f%% %8.2f %8.2f\n", cases[c].name.c_str(),
                  ratio, k_err, v_err, k_est, log_sigma(t.key_estimates), attn, agreement * 100, enc, dec);
      results.push_back({{"codec", cases[c].name},
                         {"ratio", ratio},
                         {"key_error", k_err},
                         {"value_error", v_err},
                         {"key_estimate", k_est},
                         {"estimate_log_sigma", log_sigma(t.key_estimates)},
                         {"attention_error", attn},
                         {"agreement", agreement},
                         {"agreement_samples", t.steps},
                         {"cpu_encode_gbps", enc},
                         {"cpu_decode_gbps", dec}});
      profiles.push_back({{"name", cases[c].name},
                          {"codec", std::string(protocol::codec_name(cases[c].params.codec))},
                          {"size_ratio", 1.0 / ratio},
                          {"quality", agreement},
                          {"decode_gbps", args["decode-gbps"].as<double>()}});
    }
    if (args.count("json")) {
      const nlohmann::json out{{"shape", shape.to_string()},
                               {"prompts", prompts},
                               {"prefix_tokens", prefix},
                               {"steps", steps},
                               {"results", results}};
      if (Status s = perf::write_json_file(args["json"].as<std::string>(), out); !s.ok())
        throw std::runtime_error(s.message());
    }
    if (args.count("profiles-out")) {
      const nlohmann::json out{{"source", "kvfabric-codec-quality " + shape.to_string()},
                               {"profiles", profiles}};
      if (Status s = perf::write_json_file(args["profiles-out"].as<std::string>(), out); !s.ok())
        throw std::runtime_error(s.message());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvfabric-codec-quality: %s\n", e.what());
    return 2;
  }
}
