// kvfabric-reference-generate: runs the CPU reference engine on a synthetic prompt and prints the
// generated tokens and how long the prefill and each decode step took. The prompt's tokens derive
// from --seed, so two runs (or two machines) with the same arguments must print the same tokens.
// Exit codes: 0 ok, 2 usage, 3 an engine error (printed).
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/engines/host_kv_pool.h"
#include "kvf/engines/reference_model.h"
#include "kvf/engines/synthetic_prompt.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

constexpr int kOk = 0;
constexpr int kUsage = 2;
constexpr int kEngineError = 3;

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

int engine_error(const char* what, const Status& s) {
  std::cerr << "kvfabric-reference-generate: " << what << ": " << s.to_string() << '\n';
  return kEngineError;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-reference-generate",
                       "greedy generation with the CPU reference engine (seeded random weights)");
  cli.add_options()                                                                              //
      ("prompt-tokens", "prompt length", cxxopts::value<uint32_t>()->default_value("100"), "N")  //
      ("new", "tokens to generate", cxxopts::value<uint32_t>()->default_value("16"), "M")        //
      ("seed", "weights and prompt", cxxopts::value<uint64_t>()->default_value("1"), "S")        //
      ("shape", "tiny (llama3-8b is the GPU engine's)",
       cxxopts::value<std::string>()->default_value("tiny"))  //
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
