// kvfabric-codec-bench: the KV codecs' throughput, compression ratio and error on one chunk shape.
// Default: a Llama-3-8B chunk (32 layers, K and V, 16 blocks x 16 tokens = 256 tokens, 1024
// channels = 8 KV heads x 128 dims, bf16: 32 MiB raw) of synthetic KV-like values (--data normal)
// or a file's bytes (--data file --file PATH, its first raw_bytes bytes).
// For each codec: encode and decode of whole chunks on --threads threads at once (each thread its
// own chunk; 1 by default: the per-core figure), GB/s of raw bytes, medians of --rounds; each round
// also times memcpy of the same raw bytes on the same threads, so every figure has its anchor from
// the same minutes of the same machine. Two clocks: wall (all threads together) and per core (raw
// bytes per CPU-second of the working threads, which stays a core's rate on a machine shared with
// other work, where wall time is not). Then ratio = raw / encoded bytes, and the relative error
// ||x - x'|| / ||x|| of K and V from compare_chunks (with the header's own estimates in --json).
//   kvfabric-codec-bench [--codecs int8,fp8,...] [--layers 32] [--blocks 16] [--block-tokens 16]
//                        [--channels 1024] [--parts 2] [--group 32] [--residual 0] [--keep 0.5]
//                        [--zstd-level 1] [--rounds 7] [--round-seconds 0.1] [--threads 1]
//                        [--data normal|file] [--file PATH] [--seed 1] [--json FILE]
// The codecs run through a CodecBackend (codec_bench.h); this file has the CPU one, and a GPU one
// can live in its own file behind an option that picks it. Progress goes to stderr, the table to
// stdout. Exit: 0 ok, 1 a codec failed, 2 usage.
#include <time.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "codec_bench.h"
#include "kvf/gpudirect/kv_codec_math.h"
#include "perf_util.h"

namespace kvf::perf {

void fill_kv_like(const protocol::KvChunkGeometry& g, uint64_t seed, std::span<uint8_t> raw) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint32_t tokens = g.tokens();
  const uint64_t row_bytes = uint64_t{g.channels} * 2;
  std::vector<float> mean(g.channels), spread(g.channels), token_spread(tokens);
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t part = 0; part < g.parts; ++part) {
      const bool keys = part == 0;
      for (uint32_t c = 0; c < g.channels; ++c) {
        const bool outlier = c % 32 == 5;
        mean[c] = keys ? normal(rng) * (outlier ? 1.0f : 0.3f) : 0.0f;
        spread[c] = std::exp(0.1f * normal(rng)) * (keys && outlier ? 1.5f : 1.0f);
      }
      for (uint32_t t = 0; t < tokens; ++t)
        token_spread[t] = keys ? 1.0f : 0.5f * std::exp(0.2f * normal(rng));
      for (uint32_t t = 0; t < tokens; ++t) {
        const uint64_t block = t / g.block_tokens;
        const uint64_t at =
            ((uint64_t{layer} * g.blocks + block) * g.parts + part) * g.block_tokens * row_bytes +
            (t % g.block_tokens) * row_bytes;
        for (uint32_t c = 0; c < g.channels; ++c) {
          const float x = mean[c] + spread[c] * token_spread[t] * normal(rng);
          const uint16_t b = codec_math::float_to_bf16(x);
          std::memcpy(raw.data() + at + 2ull * c, &b, 2);
        }
      }
    }
  }
}

}  // namespace kvf::perf

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "kvfabric-codec-bench: %s\n", message.c_str());
  return code;
}

// The CPU codecs (gpudirect/kv_codec.h) over host buffers.
class CpuBackend final : public perf::CodecBackend {
 public:
  std::string name() const override { return "cpu"; }
  Status prepare(const protocol::KvCodecParams& params, const protocol::KvChunkGeometry& geometry,
                 std::span<const uint8_t> raw) override {
    auto max = gpudirect::max_encoded_bytes(params, geometry);
    if (!max.ok()) return max.status();
    params_ = params;
    geometry_ = geometry;
    raw_.assign(raw.begin(), raw.end());
    copy_.assign(raw.size(), 0);
    decoded_.assign(raw.size(), 0);
    encoded_.assign(max.value(), 0);  // written once here, so no timed round takes the page faults
    encoded_bytes_ = 0;
    return Status::Ok();
  }
  Result<uint64_t> encode() override {
    auto n = gpudirect::encode_chunk(params_, geometry_, raw_, encoded_);
    if (n.ok()) encoded_bytes_ = n.value();
    return n;
  }
  Status decode() override {
    return gpudirect::decode_chunk(std::span<const uint8_t>(encoded_.data(), encoded_bytes_), decoded_);
  }
  Status anchor() override {
    std::memcpy(copy_.data(), raw_.data(), raw_.size());
    return Status::Ok();
  }
  Result<std::vector<uint8_t>> encoded_copy() override {
    return std::vector<uint8_t>(encoded_.begin(), encoded_.begin() + static_cast<ptrdiff_t>(encoded_bytes_));
  }
  Result<std::vector<uint8_t>> decoded_copy() override { return decoded_; }

 private:
  protocol::KvCodecParams params_;
  protocol::KvChunkGeometry geometry_;
  std::vector<uint8_t> raw_, copy_, decoded_, encoded_;
  uint64_t encoded_bytes_ = 0;
};

enum class Op { kEncode, kDecode, kAnchor };

Status run_op(perf::CodecBackend& backend, Op op) {
  switch (op) {
    case Op::kEncode:
      return backend.encode().status();
    case Op::kDecode:
      return backend.decode();
    case Op::kAnchor:
      return backend.anchor();
  }
  return Status::Ok();
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

struct RoundTime {
  double wall = 0;  // from the common start until the last thread finished
  double cpu = 0;   // the threads' CPU seconds, summed: the work's cost even where others share the cores
};

// Runs `op` `reps` times on every backend at once, one thread each, from a common start.
Result<RoundTime> timed_round(std::vector<std::unique_ptr<perf::CodecBackend>>& backends, Op op, int reps) {
  std::vector<Status> results(backends.size());
  std::vector<double> cpu(backends.size());
  const auto work = [&](size_t i) {
    const double cpu_start = thread_cpu_seconds();
    for (int r = 0; r < reps && results[i].ok(); ++r) results[i] = run_op(*backends[i], op);
    cpu[i] = thread_cpu_seconds() - cpu_start;
  };
  Clock::time_point start;
  if (backends.size() == 1) {
    start = Clock::now();
    work(0);
  } else {
    std::barrier sync(static_cast<ptrdiff_t>(backends.size()) + 1);
    std::vector<std::thread> threads;
    for (size_t i = 0; i < backends.size(); ++i) {
      threads.emplace_back([&, i] {
        sync.arrive_and_wait();
        work(i);
      });
    }
    start = Clock::now();
    sync.arrive_and_wait();
    for (auto& t : threads) t.join();
  }
  RoundTime time;
  time.wall = std::chrono::duration<double>(Clock::now() - start).count();
  for (size_t i = 0; i < backends.size(); ++i) {
    if (!results[i].ok()) return results[i];
    time.cpu += cpu[i];
  }
  return time;
}

// Repetitions that make a round take about `target` seconds, from one round of one.
Result<int> calibrate(std::vector<std::unique_ptr<perf::CodecBackend>>& backends, Op op, double target) {
  auto once = timed_round(backends, op, 1);
  if (!once.ok()) return once.status();
  return static_cast<int>(std::clamp(std::ceil(target / std::max(once->wall, 1e-9)), 1.0, 1e6));
}

struct CodecResult {
  std::string codec;
  double encode_gbps = 0, decode_gbps = 0, memcpy_gbps = 0;  // wall clock, all threads together
  // Raw bytes per CPU-second of the threads: one core's rate, whatever else shares the machine.
  double encode_core_gbps = 0, decode_core_gbps = 0, memcpy_core_gbps = 0;
  uint64_t encoded_bytes = 0;
  double ratio = 0;
  double key_error = 0, value_error = 0, max_abs = 0;   // compare_chunks
  double header_key_error = 0, header_value_error = 0;  // the encoder's own estimates
};

Result<CodecResult> bench_codec(const protocol::KvCodecParams& params,
                                const protocol::KvChunkGeometry& geometry, std::span<const uint8_t> raw,
                                unsigned threads, int rounds, double round_seconds) {
  const std::string name(protocol::codec_name(params.codec));
  std::vector<std::unique_ptr<perf::CodecBackend>> backends;
  for (unsigned i = 0; i < threads; ++i) {
    backends.push_back(std::make_unique<CpuBackend>());
    if (Status s = backends.back()->prepare(params, geometry, raw); !s.ok()) return s;
  }
  std::fprintf(stderr, "%s: warm-up", name.c_str());
  CodecResult r;
  r.codec = name;
  // The first encode and decode (untimed) give the ratio and errors, and warm caches and pages.
  auto n = backends[0]->encode();
  if (!n.ok()) return n.status();
  if (Status s = backends[0]->decode(); !s.ok()) return s;
  r.encoded_bytes = n.value();
  r.ratio = static_cast<double>(geometry.raw_bytes()) / static_cast<double>(n.value());
  auto encoded = backends[0]->encoded_copy();
  auto decoded = backends[0]->decoded_copy();
  if (!encoded.ok()) return encoded.status();
  if (!decoded.ok()) return decoded.status();
  auto header = protocol::read_chunk_header(encoded.value());
  if (!header.ok()) return header.status();
  r.header_key_error = header->key_error;
  r.header_value_error = header->value_error;
  auto stats = gpudirect::compare_chunks(geometry, raw, decoded.value());
  if (!stats.ok()) return stats.status();
  r.key_error = stats->key_relative;
  r.value_error = stats->value_relative;
  r.max_abs = stats->max_abs;

  const Op ops[] = {Op::kAnchor, Op::kEncode, Op::kDecode};
  int reps[3];
  for (int i = 0; i < 3; ++i) {
    auto k = calibrate(backends, ops[i], round_seconds);
    if (!k.ok()) return k.status();
    reps[i] = k.value();
  }
  std::fprintf(stderr, ", rounds");
  std::vector<double> gbps[3], core_gbps[3];
  const double bytes = static_cast<double>(geometry.raw_bytes()) * threads;
  for (int round = 0; round < rounds; ++round) {
    for (int i = 0; i < 3; ++i) {  // anchor, encode, decode: alternating, so drift hits all three
      auto time = timed_round(backends, ops[i], reps[i]);
      if (!time.ok()) return time.status();
      gbps[i].push_back(bytes * reps[i] / time->wall / 1e9);
      core_gbps[i].push_back(bytes * reps[i] / std::max(time->cpu, 1e-9) / 1e9);
    }
    std::fprintf(stderr, " %d", round + 1);
  }
  std::fprintf(stderr, "\n");
  r.memcpy_gbps = perf::percentile(gbps[0], 50);
  r.encode_gbps = perf::percentile(gbps[1], 50);
  r.decode_gbps = perf::percentile(gbps[2], 50);
  r.memcpy_core_gbps = perf::percentile(core_gbps[0], 50);
  r.encode_core_gbps = perf::percentile(core_gbps[1], 50);
  r.decode_core_gbps = perf::percentile(core_gbps[2], 50);
  return r;
}

Result<std::vector<protocol::KvCodec>> parse_codecs(const std::string& list) {
  std::vector<protocol::KvCodec> out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = list.find(',', start);
    const std::string item =
        list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto codec = protocol::parse_codec(item);
    if (!codec.ok()) return codec.status();
    out.push_back(codec.value());
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-codec-bench", "KV codec throughput, ratio and error, beside memcpy.");
  // clang-format off
  options.add_options()
      ("codecs", "codecs to run", cxxopts::value<std::string>()->default_value("identity,zstd,lz4,int8,fp8,int4,int2,drop"))
      ("layers", "layers per chunk", cxxopts::value<uint32_t>()->default_value("32"))
      ("parts", "2 (K and V) or 1 (MLA latent)", cxxopts::value<uint32_t>()->default_value("2"))
      ("blocks", "blocks per chunk", cxxopts::value<uint32_t>()->default_value("16"))
      ("block-tokens", "tokens per block", cxxopts::value<uint32_t>()->default_value("16"))
      ("channels", "channels per token (kv_heads x head_dim)", cxxopts::value<uint32_t>()->default_value("1024"))
      ("group", "int4/int2: KIVI group", cxxopts::value<uint32_t>()->default_value("32"))
      ("residual", "int4/int2: last tokens kept in bf16", cxxopts::value<uint32_t>()->default_value("0"))
      ("keep", "drop: fraction of tokens kept", cxxopts::value<float>()->default_value("0.5"))
      ("zstd-level", "zstd level", cxxopts::value<int>()->default_value("1"))
      ("rounds", "timed rounds (medians reported)", cxxopts::value<int>()->default_value("7"))
      ("round-seconds", "about how long each timed round runs", cxxopts::value<double>()->default_value("0.1"))
      ("threads", "chunks coded at once, one thread each (aggregate GB/s)", cxxopts::value<unsigned>()->default_value("1"))
      ("data", "normal (synthetic KV-like) or file", cxxopts::value<std::string>()->default_value("normal"))
      ("file", "--data file: raw chunk bytes (its first raw_bytes are used)", cxxopts::value<std::string>())
      ("seed", "--data normal: generator seed", cxxopts::value<uint64_t>()->default_value("1"))
      ("json", "also write the results to FILE", cxxopts::value<std::string>())
      ("h,help", "this help");
  // clang-format on
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    return fail(2, e.what());
  }
  if (args.count("help") != 0) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  protocol::KvChunkGeometry geometry;
  geometry.layers = args["layers"].as<uint32_t>();
  geometry.parts = args["parts"].as<uint32_t>();
  geometry.blocks = args["blocks"].as<uint32_t>();
  geometry.block_tokens = args["block-tokens"].as<uint32_t>();
  geometry.channels = args["channels"].as<uint32_t>();
  if (Status s = geometry.validate(); !s.ok()) return fail(2, s.message());
  auto codecs = parse_codecs(args["codecs"].as<std::string>());
  if (!codecs.ok()) return fail(2, codecs.status().message());
  const unsigned threads = args["threads"].as<unsigned>();
  const int rounds = args["rounds"].as<int>();
  const double round_seconds = args["round-seconds"].as<double>();
  if (threads == 0 || threads > 1024) return fail(2, "--threads must be in 1..1024");
  if (rounds < 1) return fail(2, "--rounds must be at least 1");
  if (!(round_seconds > 0)) return fail(2, "--round-seconds must be positive");

  std::vector<uint8_t> raw(geometry.raw_bytes());
  const std::string data = args["data"].as<std::string>();
  if (data == "normal") {
    perf::fill_kv_like(geometry, args["seed"].as<uint64_t>(), raw);
  } else if (data == "file") {
    if (args.count("file") == 0) return fail(2, "--data file needs --file PATH");
    const std::string path = args["file"].as<std::string>();
    std::ifstream f(path, std::ios::binary);
    if (!f) return fail(2, "cannot open " + path);
    f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    if (static_cast<uint64_t>(f.gcount()) != raw.size()) {
      return fail(2, path + " has fewer than the chunk's " + std::to_string(raw.size()) + " bytes");
    }
  } else {
    return fail(2, "--data must be normal or file");
  }

  protocol::KvCodecParams base;
  base.group = args["group"].as<uint32_t>();
  base.residual_tokens = args["residual"].as<uint32_t>();
  base.keep_fraction = args["keep"].as<float>();
  base.zstd_level = args["zstd-level"].as<int>();

  const double mib = static_cast<double>(geometry.raw_bytes()) / (1 << 20);
  std::printf(
      "chunk: %u layers x %u parts x %u blocks x %u tokens x %u channels, bf16 = %.1f MiB (%s data); "
      "%u thread%s (cpu)\nGB/s of raw bytes, medians of %d rounds: wall = all threads together by the clock; "
      "per core = bytes per CPU-second of the threads (one core's rate, on a shared machine too)\n",
      geometry.layers, geometry.parts, geometry.blocks, geometry.block_tokens, geometry.channels, mib,
      data.c_str(), threads, threads == 1 ? "" : "s", rounds);
  nlohmann::json json;
  json["geometry"] = {{"layers", geometry.layers},     {"parts", geometry.parts},
                      {"blocks", geometry.blocks},     {"block_tokens", geometry.block_tokens},
                      {"channels", geometry.channels}, {"raw_bytes", geometry.raw_bytes()}};
  json["threads"] = threads;
  json["rounds"] = rounds;
  json["data"] = data;
  json["backend"] = "cpu";
  std::vector<CodecResult> results;
  std::vector<std::string> failures;
  for (protocol::KvCodec codec : codecs.value()) {
    protocol::KvCodecParams params = base;
    params.codec = codec;
    auto r = bench_codec(params, geometry, raw, threads, rounds, round_seconds);
    if (r.ok()) {
      results.push_back(r.value());
    } else {  // e.g. a lossy codec and a file holding inf or NaN: the others still run
      std::fprintf(stderr, "\n");
      failures.push_back(std::string(protocol::codec_name(codec)) + ": " + r.status().to_string());
      json["failures"].push_back(failures.back());
    }
  }
  std::printf("%-9s %8s %8s %8s %8s %8s %8s %8s %8s %7s %9s %9s\n", "", "wall", "", "", "", "", "per core",
              "", "", "", "", "");
  std::printf("%-9s %8s %8s %8s %8s %8s %8s %8s %8s %7s %9s %9s\n", "codec", "encode", "decode", "memcpy",
              "enc/cpy", "dec/cpy", "encode", "decode", "memcpy", "ratio", "K error", "V error");
  for (const CodecResult& r : results) {
    std::printf("%-9s %8.2f %8.2f %8.2f %8.3f %8.3f %8.2f %8.2f %8.2f %7.3f %9.2e %9.2e\n", r.codec.c_str(),
                r.encode_gbps, r.decode_gbps, r.memcpy_gbps, r.encode_gbps / r.memcpy_gbps,
                r.decode_gbps / r.memcpy_gbps, r.encode_core_gbps, r.decode_core_gbps, r.memcpy_core_gbps,
                r.ratio, r.key_error, r.value_error);
    json["results"].push_back({{"codec", r.codec},
                               {"encode_gbps", r.encode_gbps},
                               {"decode_gbps", r.decode_gbps},
                               {"memcpy_gbps", r.memcpy_gbps},
                               {"encode_core_gbps", r.encode_core_gbps},
                               {"decode_core_gbps", r.decode_core_gbps},
                               {"memcpy_core_gbps", r.memcpy_core_gbps},
                               {"encoded_bytes", r.encoded_bytes},
                               {"ratio", r.ratio},
                               {"key_error", r.key_error},
                               {"value_error", r.value_error},
                               {"max_abs_error", r.max_abs},
                               {"header_key_error", r.header_key_error},
                               {"header_value_error", r.header_value_error}});
  }
  if (args.count("json") != 0) {
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), json); !s.ok())
      return fail(1, s.message());
  }
  for (const std::string& f : failures) std::fprintf(stderr, "kvfabric-codec-bench: %s\n", f.c_str());
  return failures.empty() ? 0 : 1;
}
