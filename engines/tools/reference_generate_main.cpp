// kvfabric-reference-generate: runs the CPU reference engine (or, with --gpu N, the GPU one on
// GPU N) on a synthetic prompt and prints the generated tokens and how long the prefill and each
// decode step took. The prompt's tokens derive from --seed, so two runs (or two machines) with the
// same arguments must print the same tokens (the GPU engine's may differ from the CPU's where bf16
// rounding tips a near tie). Exit codes: 0 ok, 1 no GPU engine here (built without CUDA, no GPU),
// 2 usage, 3 an engine error (printed).
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/engines/gpu_reference_model.h"
#include "kvf/engines/host_kv_pool.h"
#include "kvf/engines/reference_model.h"
#include "kvf/engines/synthetic_prompt.h"
#include "kvf/gpudirect/cuda_memory.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

constexpr int kOk = 0;
constexpr int kNoGpu = 1;
constexpr int kUsage = 2;
constexpr int kEngineError = 3;

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

int engine_error(const char* what, const Status& s) {
  std::cerr << "kvfabric-reference-generate: " << what << ": " << s.to_string() << '\n';
  return kEngineError;
}

// The GPU engine: weights generated on GPU `device`, a KV pool there (one cudaMalloc, layer after
// layer), a prefill of the prompt and n_new - 1 decode steps, each timed.
int run_gpu(const engines::ModelShape& shape, int device, uint32_t prompt_tokens, uint32_t n_new,
            uint64_t seed) {
  engines::GpuModelOptions options;
  options.device = device;
  options.max_batch_tokens = prompt_tokens;
  options.max_context = prompt_tokens + n_new - 1;
  auto started = Clock::now();
  auto model = engines::GpuReferenceModel::create(shape, seed, options);
  if (!model.ok()) {
    if (model.status().code() == ErrorCode::kUnavailable) {
      std::cerr << "kvfabric-reference-generate: --gpu: " << model.status().message() << '\n';
      return kNoGpu;
    }
    return engine_error("create on the GPU", model.status());
  }
  const double create_ms = ms_since(started);
  engines::GpuReferenceModel& gpu = *model.value();

  const uint64_t positions = uint64_t{prompt_tokens} + n_new - 1;
  const auto blocks = static_cast<uint32_t>((positions + shape.block_tokens - 1) / shape.block_tokens);
  auto layout = protocol::KvLayout::create(shape.kv_layout_desc(blocks));
  if (!layout.ok()) return engine_error("KV layout", layout.status());
  auto pool = gpudirect::DeviceBuffer::allocate(device, layout->layer_bytes() * shape.layers);
  if (!pool.ok()) return engine_error("KV pool on the GPU", pool.status());
  engines::KvCacheView kv{*layout, {}};
  for (uint32_t l = 0; l < shape.layers; ++l)
    kv.layers.push_back(static_cast<uint8_t*>(pool->data()) + l * layout->layer_bytes());
  std::vector<uint32_t> table(blocks);
  for (uint32_t b = 0; b < blocks; ++b) table[b] = blocks - 1 - b;  // not in order, as engines allocate
  const std::vector<uint32_t> prompt = engines::synthetic_prompt(prompt_tokens, shape.vocab, seed);

  // Each call synchronizes the model's stream before it returns: host time is GPU time. The first
  // prefill also loads cuBLAS's and the model's kernels (lazily, on first launch), so the prompt
  // is prefilled twice (the same bits both times) and the second is the one reported.
  started = Clock::now();
  auto cold = gpu.prefill(prompt, table, kv);
  if (!cold.ok()) return engine_error("prefill", cold.status());
  const double cold_ms = ms_since(started);
  started = Clock::now();
  auto first = gpu.prefill(prompt, table, kv);
  if (!first.ok()) return engine_error("prefill", first.status());
  const double prefill_ms = ms_since(started);
  std::vector<uint32_t> generated{*first};
  double first_step_ms = 0;
  started = Clock::now();
  for (uint32_t i = 1; i < n_new; ++i) {
    const auto step_started = Clock::now();
    auto next = gpu.decode_step(prompt_tokens + i - 1, generated.back(), table, kv);
    if (!next.ok()) return engine_error("decode", next.status());
    if (i == 1) first_step_ms = ms_since(step_started);
    generated.push_back(*next);
  }
  const double decode_ms = ms_since(started);

  std::printf("shape: %s, seed %llu, GPU %d (bf16, %.1f GiB of weights and workspace)\n",
              shape.to_string().c_str(), static_cast<unsigned long long>(seed), device,
              static_cast<double>(gpu.device_bytes()) / (uint64_t{1} << 30));
  std::printf("weights generated on the GPU in %.1f ms (create, workspace included)\n", create_ms);
  std::printf("prefill of %u tokens %.2f ms (the first run, loading kernels, %.2f ms), first token %u\n",
              prompt_tokens, prefill_ms, cold_ms, generated.front());
  std::printf("decode %.3f ms per token (%u steps; the first %.3f ms)\n",
              n_new > 1 ? decode_ms / (n_new - 1) : 0.0, n_new - 1, first_step_ms);
  std::printf("tokens:");
  for (const uint32_t t : generated) std::printf(" %u", t);
  std::printf("\n");
  return kOk;
}

int run(int argc, char** argv) {
  cxxopts::Options cli(
      "kvfabric-reference-generate",
      "greedy generation with the CPU reference engine, or the GPU one (seeded random weights)");
  cli.add_options()                                                                              //
      ("prompt-tokens", "prompt length", cxxopts::value<uint32_t>()->default_value("100"), "N")  //
      ("new", "tokens to generate", cxxopts::value<uint32_t>()->default_value("16"), "M")        //
      ("seed", "weights and prompt", cxxopts::value<uint64_t>()->default_value("1"), "S")        //
      ("shape", "tiny, or llama3-8b (the GPU engine's)",
       cxxopts::value<std::string>()->default_value("tiny"))                                          //
      ("gpu", "run the GPU reference engine on this GPU (bf16, cuBLAS)", cxxopts::value<int>(), "N")  //
      ("h,help", "print this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::cout << cli.help() << '\n';
    return kOk;
  }
  const uint32_t prompt_tokens = args["prompt-tokens"].as<uint32_t>();
  const uint32_t n_new = args["new"].as<uint32_t>();
  const uint64_t seed = args["seed"].as<uint64_t>();
  const std::string shape_name = args["shape"].as<std::string>();
  engines::ModelShape shape;
  if (shape_name == "tiny") {
    shape = engines::ModelShape::tiny();
  } else if (shape_name == "llama3-8b") {
    shape = engines::ModelShape::llama3_8b();
  } else {
    std::cerr << "kvfabric-reference-generate: --shape: '" << shape_name << "' is not tiny or llama3-8b\n";
    return kUsage;
  }
  if (prompt_tokens == 0 || n_new == 0) {
    std::cerr << "kvfabric-reference-generate: --prompt-tokens and --new must be at least 1\n";
    return kUsage;
  }

  if (args.count("gpu")) return run_gpu(shape, args["gpu"].as<int>(), prompt_tokens, n_new, seed);

  auto started = Clock::now();
  auto model = engines::ReferenceModel::create(shape, seed);
  if (!model.ok()) return engine_error("create", model.status());
  const double create_ms = ms_since(started);

  const uint64_t positions = uint64_t{prompt_tokens} + n_new - 1;
  const auto blocks = static_cast<uint32_t>((positions + shape.block_tokens - 1) / shape.block_tokens);
  auto pool = engines::HostKvPool::create(shape.kv_layout_desc(blocks));
  if (!pool.ok()) return engine_error("KV pool", pool.status());
  std::vector<uint32_t> table(blocks);
  for (uint32_t b = 0; b < blocks; ++b) table[b] = blocks - 1 - b;  // not in order, as engines allocate
  const std::vector<uint32_t> prompt = engines::synthetic_prompt(prompt_tokens, shape.vocab, seed);

  started = Clock::now();
  auto first = model->prefill(prompt, table, pool->view());
  if (!first.ok()) return engine_error("prefill", first.status());
  const double prefill_ms = ms_since(started);
  std::vector<uint32_t> generated{*first};
  started = Clock::now();
  for (uint32_t i = 1; i < n_new; ++i) {
    auto next = model->decode_step(prompt_tokens + i - 1, generated.back(), table, pool->view());
    if (!next.ok()) return engine_error("decode", next.status());
    generated.push_back(*next);
  }
  const double decode_ms = ms_since(started);

  std::printf("shape: %s, seed %llu\n", shape.to_string().c_str(), static_cast<unsigned long long>(seed));
  std::printf("tokens:");
  for (const uint32_t t : generated) std::printf(" %u", t);
  std::printf("\ncreate %.1f ms, prefill of %u tokens %.2f ms, decode %.3f ms per token (%u steps)\n",
              create_ms, prompt_tokens, prefill_ms, n_new > 1 ? decode_ms / (n_new - 1) : 0.0, n_new - 1);
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // cxxopts reports bad options by throwing
    std::cerr << "kvfabric-reference-generate: " << e.what() << '\n';
    return kUsage;
  }
}
