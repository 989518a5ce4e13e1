// kvfabric-codec-bench-gpu: the GPU KV codecs (kv_codec_cuda.h) on a Llama-3-8B-shaped request, against
// a device-to-device copy of the same raw bytes, in one run on one GPU.
//   kvfabric-codec-bench-gpu [--codecs identity,int8,fp8,int4,int2] [--rounds 11] [--iters 5]
//                            [--layers 32 --kv-heads 8 --head-dim 128 --block-tokens 16]
//                            [--tokens 8192 --chunk-tokens 256] [--layout flash_attention]
//                            [--group 32 --residual 0] [--device 0] [--no-verify] [--json FILE]
// The request (default 8192 tokens = 32 chunks of 256 = 1 GiB of bf16 K and V) lies in shuffled
// blocks of a paged pool twice its size. For each codec, every round times, with CUDA events around
// --iters back-to-back calls on one stream: encode (encode_paged_chunks_cuda: the paged blocks ->
// the encoded batch, one call for all chunks), decode (decode_paged_chunks_cuda: the encoded batch ->
// other shuffled blocks of the pool) and the anchor, one cudaMemcpyAsync device-to-device of the
// raw bytes, the anchor first in odd rounds and last in even ones. Reported: medians over rounds of
// the per-call time, and TB/s counting the bytes read plus the bytes written (encode: raw in,
// encoded out; decode: encoded in, raw out; the anchor: raw in, raw out), so the ratio to the anchor
// is how close a codec gets to moving its bytes at copy speed.
// Before timing, chunk 0 is checked against the CPU codec (encoded bytes equal but for the header's
// error floats; decoded bytes equal): --no-verify skips that.
// Exit: 0 measured (and verified), 1 failed, 2 bad usage, 77 no CUDA device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "../perf_util.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_cuda.h"
#include "kvf/gpudirect/kv_codec_math.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/kv_layout.h"

namespace {

using namespace kvf;
using namespace kvf::protocol;

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitSkip = 77;

#define BENCH_CUDA(call)                                                                                 \
  do {                                                                                                   \
    if (cudaError_t bench_err_ = (call); bench_err_ != cudaSuccess) {                                    \
      std::fprintf(stderr, "kvfabric-codec-bench-gpu: %s: %s\n", #call, cudaGetErrorString(bench_err_)); \
      std::exit(kExitFailed);                                                                            \
    }                                                                                                    \
  } while (0)

void check(const Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "kvfabric-codec-bench-gpu: %s: %s\n", what.c_str(), s.to_string().c_str());
    std::exit(kExitFailed);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// KV-like bf16: roughly normal values (a sum of uniforms) with a per-channel scale, a few outlier
// channels. Cheap: a gigabyte of it is made from one layer's worth.
std::vector<uint8_t> kv_like(uint64_t rows, uint32_t channels, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> scale(channels);
  for (float& s : scale) s = unit(rng) < 0.05f ? 8.0f + 8.0f * unit(rng) : 0.25f + unit(rng);
  std::vector<uint8_t> out(rows * channels * 2);
  uint64_t x = seed | 1;
  auto next = [&x] {  // xorshift64*: 4 uniforms in [0, 1) per call
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * 0x2545F4914F6CDD1Dull;
  };
  for (uint64_t r = 0; r < rows; ++r) {
    for (uint32_t c = 0; c < channels; ++c) {
      const uint64_t u = next();
      float sum = 0;
      for (int k = 0; k < 4; ++k) sum += static_cast<float>((u >> (16 * k)) & 0xffff) / 65536.0f;
      const uint16_t b = codec_math::float_to_bf16((sum - 2.0f) * 1.7f * scale[c]);
      std::memcpy(out.data() + 2 * (r * channels + c), &b, 2);
    }
  }
  return out;
}

struct Row {
  std::string codec;
  uint64_t encoded_bytes = 0;  // the whole batch
  double encode_ms = 0, decode_ms = 0, anchor_ms = 0;
  double encode_tbps = 0, decode_tbps = 0, anchor_tbps = 0;
  std::vector<double> encode_runs, decode_runs, anchor_runs;  // ms per call, per round
};

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options(
      "kvfabric-codec-bench-gpu",
      "The GPU KV codecs (encode from / decode into paged blocks) against a device-to-device "
      "copy of the raw bytes.\nExit: 0 ok, 1 failed, 2 bad usage, 77 no CUDA device.");
  // clang-format off
  options.add_options()
      ("codecs", "comma-separated fixed-rate codecs", cxxopts::value<std::string>()->default_value("identity,int8,fp8,int4,int2"))
      ("rounds", "timed rounds (medians are reported)", cxxopts::value<int>()->default_value("11"))
      ("iters", "back-to-back calls per timed step", cxxopts::value<int>()->default_value("5"))
      ("layers", "layers", cxxopts::value<uint32_t>()->default_value("32"))
      ("kv-heads", "KV heads", cxxopts::value<uint32_t>()->default_value("8"))
      ("head-dim", "head dimension", cxxopts::value<uint32_t>()->default_value("128"))
      ("block-tokens", "tokens per paged block", cxxopts::value<uint32_t>()->default_value("16"))
      ("tokens", "tokens of the request", cxxopts::value<uint32_t>()->default_value("8192"))
      ("chunk-tokens", "tokens per chunk", cxxopts::value<uint32_t>()->default_value("256"))
      ("layout", "flash_attention | flash_infer | mla", cxxopts::value<std::string>()->default_value("flash_attention"))
      ("group", "KIVI group", cxxopts::value<uint32_t>()->default_value("32"))
      ("residual", "KIVI residual tokens", cxxopts::value<uint32_t>()->default_value("0"))
      ("device", "CUDA device", cxxopts::value<int>()->default_value("0"))
      ("no-verify", "skip the check of chunk 0 against the CPU codec")
      ("json", "also write the results as JSON to FILE", cxxopts::value<std::string>())
      ("h,help", "this help");
  // clang-format on
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvfabric-codec-bench-gpu: %s\n", e.what());
    return kExitUsage;
  }
  if (args.count("help") != 0) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  const int rounds = args["rounds"].as<int>();
  const int iters = args["iters"].as<int>();
  const int device = args["device"].as<int>();
  const bool verify = args.count("no-verify") == 0;
  Result<KvLayoutKind> kind = parse_layout_kind(args["layout"].as<std::string>());
  if (!kind.ok() || rounds < 1 || iters < 1) {
    std::fprintf(stderr, "kvfabric-codec-bench-gpu: bad --layout, --rounds or --iters\n");
    return kExitUsage;
  }
  const uint32_t block_tokens = args["block-tokens"].as<uint32_t>();
  const uint32_t tokens = args["tokens"].as<uint32_t>();
  const uint32_t chunk_tokens = args["chunk-tokens"].as<uint32_t>();
  if (block_tokens == 0 || chunk_tokens == 0 || chunk_tokens % block_tokens != 0 ||
      tokens % chunk_tokens != 0) {
    std::fprintf(stderr,
                 "kvfabric-codec-bench-gpu: --tokens must be whole chunks, --chunk-tokens whole blocks\n");
    return kExitUsage;
  }

  // The paged pool: twice the request's blocks, one allocation with the layers one after another.
  const uint32_t request_blocks = tokens / block_tokens;
  const uint32_t bpc = chunk_tokens / block_tokens;
  const uint32_t chunks = tokens / chunk_tokens;
  KvLayoutDesc desc{*kind,
                    args["layers"].as<uint32_t>(),
                    2 * request_blocks,
                    block_tokens,
                    *kind == KvLayoutKind::kMla ? 1u : args["kv-heads"].as<uint32_t>(),
                    args["head-dim"].as<uint32_t>(),
                    2};
  Result<KvLayout> layout = KvLayout::create(desc);
  if (!layout.ok()) {
    std::fprintf(stderr, "kvfabric-codec-bench-gpu: %s\n", layout.status().to_string().c_str());
    return kExitUsage;
  }
  const uint32_t parts = layout->parts();
  const uint32_t channels = desc.kv_heads * desc.head_dim;
  const KvChunkGeometry geo{desc.num_layers, parts, bpc, block_tokens, channels, 2};
  const uint64_t raw_total = geo.raw_bytes() * chunks;
  const uint64_t layer_bytes = layout->layer_bytes();

  std::vector<KvCodecParams> codecs;
  uint64_t max_encoded = 0;
  for (const std::string& name : split(args["codecs"].as<std::string>())) {
    Result<KvCodec> c = parse_codec(name);
    KvCodecParams p;
    if (c.ok()) {
      p.codec = *c;
      p.group = args["group"].as<uint32_t>();
      p.residual_tokens = args["residual"].as<uint32_t>();
    }
    std::string why;
    if (!c.ok()) {
      why = c.status().to_string();
    } else if (!codec_is_fixed_rate(p.codec)) {
      why = "not fixed-rate: the GPU codes identity, int8, fp8, int4 and int2";
    } else if (Status s = validate_codec(p, geo); !s.ok()) {
      why = s.to_string();
    }
    if (!why.empty()) {
      std::fprintf(stderr, "kvfabric-codec-bench-gpu: codec '%s': %s\n", name.c_str(), why.c_str());
      return kExitUsage;
    }
    codecs.push_back(p);
    max_encoded = std::max(max_encoded, fixed_encoded_bytes(p, geo) * chunks);
  }

  const gpudirect::CudaAvailability& cuda = gpudirect::cuda_availability();
  if (cuda.device_count == 0) {
    std::printf("SKIP: %s\n", cuda.reason.c_str());
    return kExitSkip;
  }
  BENCH_CUDA(cudaSetDevice(device));

  uint8_t* pool = nullptr;
  uint8_t* encoded = nullptr;
  uint8_t* anchor_src = nullptr;
  uint8_t* anchor_dst = nullptr;
  BENCH_CUDA(cudaMalloc(&pool, layer_bytes * desc.num_layers));
  BENCH_CUDA(cudaMalloc(&encoded, max_encoded));
  BENCH_CUDA(cudaMalloc(&anchor_src, raw_total));
  BENCH_CUDA(cudaMalloc(&anchor_dst, raw_total));
  {
    const std::vector<uint8_t> data = kv_like(layer_bytes / (2ull * channels), channels, 0x6b766663);
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      BENCH_CUDA(cudaMemcpy(pool + l * layer_bytes, data.data(), layer_bytes, cudaMemcpyHostToDevice));
    }
    BENCH_CUDA(cudaMemset(anchor_src, 0, raw_total));  // the anchor's bytes: what they hold does not matter
  }
  std::vector<void*> bases;
  for (uint32_t l = 0; l < desc.num_layers; ++l) bases.push_back(pool + l * layer_bytes);
  std::vector<uint32_t> perm(desc.num_blocks);
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(42));
  const std::vector<uint32_t> src_ids(perm.begin(), perm.begin() + request_blocks);
  const std::vector<uint32_t> dst_ids(perm.begin() + request_blocks, perm.end());
  const gpudirect::PagedChunks src{desc, bases, src_ids, bpc};
  const gpudirect::PagedChunks dst{desc, bases, dst_ids, bpc};

  cudaStream_t stream = nullptr;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  // Milliseconds per call of `iters` back-to-back calls of f on the stream.
  auto timed = [&](const auto& f) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < iters; ++i) f();
    BENCH_CUDA(cudaEventRecord(stop, stream));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    return static_cast<double>(ms) / iters;
  };
  auto anchor = [&] {
    BENCH_CUDA(cudaMemcpyAsync(anchor_dst, anchor_src, raw_total, cudaMemcpyDeviceToDevice, stream));
  };

  // The host copy of chunk i's raw bytes in store order, read from blocks `ids` of the pool.
  auto gather_chunk = [&](const std::vector<uint32_t>& ids, uint32_t i) {
    std::vector<uint8_t> raw(geo.raw_bytes());
    uint64_t at = 0;
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      for (uint32_t b = 0; b < bpc; ++b) {
        for (uint32_t p = 0; p < parts; ++p) {
          const ByteExtent e = layout->extent(ids[i * bpc + b], static_cast<KvPart>(p));
          BENCH_CUDA(cudaMemcpy(raw.data() + at, pool + l * layer_bytes + e.offset, e.length,
                                cudaMemcpyDeviceToHost));
          at += e.length;
        }
      }
    }
    return raw;
  };

  std::printf(
      "kvfabric-codec-bench-gpu: %s, %u layers x %u parts x %u channels, %u tokens = %u chunks of %u in "
      "shuffled %u-token blocks, %.3f GiB raw; medians of %d rounds of %d calls\n",
      std::string(layout_kind_name(desc.kind)).c_str(), desc.num_layers, parts, channels, tokens, chunks,
      chunk_tokens, block_tokens, static_cast<double>(raw_total) / (1ull << 30), rounds, iters);
  std::vector<Row> rows;
  bool verified = true;
  for (const KvCodecParams& p : codecs) {
    const std::string name(codec_name(p.codec));
    const uint64_t chunk_bytes = fixed_encoded_bytes(p, geo);
    Row row;
    row.codec = name;
    row.encoded_bytes = chunk_bytes * chunks;
    auto encode = [&] {
      check(gpudirect::encode_paged_chunks_cuda(p, src, encoded, stream), name + " encode");
    };
    auto decode = [&] {
      check(gpudirect::decode_paged_chunks_cuda(p, dst, encoded, stream), name + " decode");
    };
    encode();
    decode();
    BENCH_CUDA(cudaStreamSynchronize(stream));
    if (verify) {
      // Chunk 0: GPU bytes vs the CPU codec's, and its GPU decode vs the CPU's.
      const std::vector<uint8_t> raw = gather_chunk(src_ids, 0);
      std::vector<uint8_t> cpu(chunk_bytes);
      Result<uint64_t> n = gpudirect::encode_chunk(p, geo, raw, cpu);
      check(n.status(), name + " CPU encode");
      std::vector<uint8_t> gpu(chunk_bytes);
      BENCH_CUDA(cudaMemcpy(gpu.data(), encoded, chunk_bytes, cudaMemcpyDeviceToHost));
      Result<KvChunkHeader> h = read_chunk_header(gpu);
      check(h.status(), name + ": the GPU's chunk 0 header");
      std::fill(gpu.begin() + 40, gpu.begin() + 48, uint8_t{0});
      std::vector<uint8_t> cpu_masked = cpu;
      std::fill(cpu_masked.begin() + 40, cpu_masked.begin() + 48, uint8_t{0});
      std::vector<uint8_t> cpu_decoded(geo.raw_bytes());
      check(gpudirect::decode_chunk(cpu, cpu_decoded), name + " CPU decode");
      const bool enc_ok = gpu == cpu_masked;
      const bool dec_ok = gather_chunk(dst_ids, 0) == cpu_decoded;
      std::printf(
          "verify %-8s chunk 0: encoded bytes %s the CPU's, decoded bytes %s the CPU's (errors K %.5f V "
          "%.5f)\n",
          name.c_str(), enc_ok ? "equal" : "DIFFER FROM", dec_ok ? "equal" : "DIFFER FROM",
          static_cast<double>(h->key_error), static_cast<double>(h->value_error));
      verified = verified && enc_ok && dec_ok;
    }
    timed(encode);  // warm-up
    timed(decode);
    timed(anchor);
    for (int r = 0; r < rounds; ++r) {
      if (r % 2 == 0) row.anchor_runs.push_back(timed(anchor));
      row.encode_runs.push_back(timed(encode));
      row.decode_runs.push_back(timed(decode));
      if (r % 2 == 1) row.anchor_runs.push_back(timed(anchor));
    }
    row.encode_ms = median(row.encode_runs);
    row.decode_ms = median(row.decode_runs);
    row.anchor_ms = median(row.anchor_runs);
    const double moved = static_cast<double>(raw_total + row.encoded_bytes);
    row.encode_tbps = moved / (row.encode_ms * 1e-3) / 1e12;
    row.decode_tbps = moved / (row.decode_ms * 1e-3) / 1e12;
    row.anchor_tbps = 2.0 * static_cast<double>(raw_total) / (row.anchor_ms * 1e-3) / 1e12;
    rows.push_back(row);
  }

  std::printf(
      "\n| codec | ratio | encode ms | encode TB/s | decode ms | decode TB/s | d2d copy TB/s | encode/copy | "
      "decode/copy |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.2fx | %.3f | %.3f | %.3f | %.3f | %.3f | %.2f | %.2f |\n", r.codec.c_str(),
                static_cast<double>(raw_total) / static_cast<double>(r.encoded_bytes), r.encode_ms,
                r.encode_tbps, r.decode_ms, r.decode_tbps, r.anchor_tbps, r.encode_tbps / r.anchor_tbps,
                r.decode_tbps / r.anchor_tbps);
  }
  std::printf("(TB/s = 1e12 bytes/s of bytes read + bytes written; ratio = raw / encoded bytes)\n");
  if (!verified) std::printf("VERIFY FAILED: a GPU codec's bytes differ from the CPU codec's (see above)\n");

  if (args.count("json") != 0) {
    nlohmann::json out;
    out["shape"] = {{"layout", std::string(layout_kind_name(desc.kind))},
                    {"layers", desc.num_layers},
                    {"parts", parts},
                    {"channels", channels},
                    {"block_tokens", block_tokens},
                    {"tokens", tokens},
                    {"chunk_tokens", chunk_tokens},
                    {"chunks", chunks},
                    {"raw_bytes", raw_total},
                    {"rounds", rounds},
                    {"iters", iters}};
    out["verified"] = verify ? nlohmann::json(verified) : nlohmann::json(nullptr);
    out["results"] = nlohmann::json::array();
    for (const Row& r : rows) {
      out["results"].push_back({{"codec", r.codec},
                                {"encoded_bytes", r.encoded_bytes},
                                {"encode_ms", r.encode_ms},
                                {"encode_tbps", r.encode_tbps},
                                {"decode_ms", r.decode_ms},
                                {"decode_tbps", r.decode_tbps},
                                {"anchor_ms", r.anchor_ms},
                                {"anchor_tbps", r.anchor_tbps},
                                {"encode_runs_ms", r.encode_runs},
                                {"decode_runs_ms", r.decode_runs},
                                {"anchor_runs_ms", r.anchor_runs}});
    }
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), out); !s.ok()) {
      std::fprintf(stderr, "kvfabric-codec-bench-gpu: %s\n", s.message().c_str());
      return kExitFailed;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  cudaFree(pool);
  cudaFree(encoded);
  cudaFree(anchor_src);
  cudaFree(anchor_dst);
  return verified ? 0 : kExitFailed;
}
