// kvfabric-engine: a CPU reference engine process for prefill/decode disaggregation.
//   kvfabric-engine decode --listen HOST:PORT   keeps a paged KV pool that peers may write, takes
//       each stream a prefill engine sends straight into the pool's blocks (its own block manager
//       picks them, shuffled), and continues every request once all its layers are in: it
//       recomputes the prompt's last position (the first generated token) from the received KV
//       and decodes --new tokens, printing "request R tokens: ...". Serves until SIGTERM/SIGINT.
//   kvfabric-engine prefill --connect HOST:PORT computes a seeded prompt layer by layer and
//       streams each layer's KV to the decode engine as soon as that layer is written (with
//       --no-stream: after the whole prefill), then prints the tokens one engine gives on its own
//       ("reference tokens: ..."), so a test can compare the two.
// Both sides move the KV through the engine connector (KvConnector: send_kv_to + save_kv_layer on
// the prefill side, listen + take_received on the decode side).
// Both sides must use the same --shape and --seed (the weights). Exit codes: 0 ok, 1 a failed
// request or engine error (printed), 2 usage.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "kvf/engines/kv_connector.h"
#include "kvf/engines/reference_model.h"
#include "kvf/engines/synthetic_prompt.h"
#include "kvf/gpudirect/memory_region.h"

namespace {

using namespace kvf;
using Clock = std::chrono::steady_clock;

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

std::atomic<bool> g_stop{false};
void on_signal(int) {
  g_stop = true;
}

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

int fail(const std::string& what) {
  std::fprintf(stderr, "kvfabric-engine: %s\n", what.c_str());
  return kFailed;
}

// The pool's layers back to back in one host allocation (as the connector's PD needs); the
// connector registers it with UCX, as it would a real engine's cache. The view the model reads.
struct KvPool {
  gpudirect::MemoryRegion region;
  engines::KvCacheView view;
};

Result<KvPool> make_pool(const engines::ModelShape& shape, uint32_t blocks) {
  auto layout = protocol::KvLayout::create(shape.kv_layout_desc(blocks));
  if (!layout.ok()) return layout.status();
  auto region = gpudirect::MemoryRegion::allocate_host(nullptr, layout->layer_bytes() * shape.layers);
  if (!region.ok()) return region.status();
  KvPool pool{std::move(region.value()), {layout.value(), {}}};
  for (uint32_t l = 0; l < shape.layers; ++l)
    pool.view.layers.push_back(pool.region.data() + l * layout->layer_bytes());
  return pool;
}

// The request's context on the wire: prompt length, the prompt's last token, tokens to generate.
std::vector<uint8_t> encode_context(uint32_t prompt_tokens, uint32_t last_token, uint32_t n_new) {
  std::vector<uint8_t> out(12);
  std::memcpy(out.data(), &prompt_tokens, 4);
  std::memcpy(out.data() + 4, &last_token, 4);
  std::memcpy(out.data() + 8, &n_new, 4);
  return out;
}

// Free blocks of the decode engine's pool, handed out shuffled (as a real engine's allocator ends
// up after a while). Called from the receiver's threads.
class BlockManager {
 public:
  explicit BlockManager(uint32_t blocks) : free_(blocks) {
    std::iota(free_.begin(), free_.end(), 0u);
    std::shuffle(free_.begin(), free_.end(), std::mt19937(11));
  }
  std::vector<uint32_t> allocate(uint32_t n) {
    std::lock_guard lock(mutex_);
    if (n > free_.size()) return {};
    std::vector<uint32_t> out(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    return out;
  }
  void release(const std::vector<uint32_t>& blocks) {
    std::lock_guard lock(mutex_);
    free_.insert(free_.end(), blocks.begin(), blocks.end());
  }

 private:
  std::mutex mutex_;
  std::vector<uint32_t> free_;
};

// The request's context: prompt length, the prompt's last token, tokens to generate.
bool decode_context(const std::vector<uint8_t>& context, uint32_t* prompt_tokens, uint32_t* last_token,
                    uint32_t* n_new) {
  if (context.size() != 12) return false;
  std::memcpy(prompt_tokens, context.data(), 4);
  std::memcpy(last_token, context.data() + 4, 4);
  std::memcpy(n_new, context.data() + 8, 4);
  return *prompt_tokens != 0 && *n_new != 0;
}

int run_decode(const cxxopts::ParseResult& args, const engines::ReferenceModel& model) {
  const engines::ModelShape& shape = model.shape();
  const uint32_t pool_blocks = args["pool-blocks"].as<uint32_t>();
  auto pool = make_pool(shape, pool_blocks);
  if (!pool.ok()) return fail("KV pool: " + pool.status().to_string());
  BlockManager blocks(pool_blocks);

  // The engine connector takes the streams straight into the pool's blocks (its block manager
  // picks them) and lists each request once every layer is in.
  engines::KvConnectorOptions options;
  options.name = "kvfabric-engine-decode";
  options.listen = args["listen"].as<std::string>();
  options.memory = engines::LayerMemory::kHost;
  options.allocate_blocks = [&blocks](engines::RequestId, uint32_t n) { return blocks.allocate(n); };
  options.release_blocks = [&blocks](engines::RequestId, std::vector<uint32_t> b) { blocks.release(b); };
  auto connector = engines::KvConnector::create(options);
  if (!connector.ok()) return fail(connector.status().to_string());
  if (Status s = connector.value()->register_kv_caches(pool->view); !s.ok()) return fail(s.to_string());
  const std::string host = options.listen.substr(0, options.listen.rfind(':'));
  std::printf("kvfabric-engine decode listening on %s:%u (%s, pool of %u blocks)\n", host.c_str(),
              connector.value()->listen_port(), shape.to_string().c_str(), pool_blocks);
  std::fflush(stdout);
  while (!g_stop) {
    const engines::FinishedRequests finished = connector.value()->get_finished();
    if (finished.receiving.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    for (engines::RequestId id : finished.receiving) {
      auto kv = connector.value()->take_received(id);
      if (!kv.ok()) continue;
      uint32_t prompt_tokens = 0, last_token = 0, n_new = 0;
      const auto started = Clock::now();
      std::vector<uint32_t> tokens;
      Status status = decode_context(kv->context, &prompt_tokens, &last_token, &n_new)
                          ? Status::Ok()
                          : Status(ErrorCode::kMalformed, "a stream without a request context");
      // The first token: the prompt's last position again, over the KV that arrived (it rewrites
      // that position's K/V with the same values).
      for (uint32_t i = 0; status.ok() && i < n_new; ++i) {
        const uint32_t position = prompt_tokens - 1 + i;
        auto next = model.decode_step(position, i == 0 ? last_token : tokens.back(), kv->blocks, pool->view);
        if (!next.ok()) {
          status = next.status();
          break;
        }
        tokens.push_back(*next);
      }
      blocks.release(kv->blocks);
      if (!status.ok()) {
        std::printf("request %llu FAILED: %s\n", static_cast<unsigned long long>(id),
                    status.to_string().c_str());
      } else {
        std::printf("request %llu tokens:", static_cast<unsigned long long>(id));
        for (uint32_t t : tokens) std::printf(" %u", t);
        std::printf(
            "\nrequest %llu: %u-token prompt's KV in %u blocks, last layer %.2f ms after the offer; %u "
            "tokens "
            "decoded in %.2f ms\n",
            static_cast<unsigned long long>(id), prompt_tokens, static_cast<uint32_t>(kv->blocks.size()),
            kv->layer_arrival_ms.empty() ? 0.0 : kv->layer_arrival_ms.back(), n_new, ms_since(started));
      }
      std::fflush(stdout);
    }
  }
  std::printf("kvfabric-engine decode: stopping\n");
  return kOk;
}

int run_prefill(const cxxopts::ParseResult& args, const engines::ReferenceModel& model) {
  const engines::ModelShape& shape = model.shape();
  const uint32_t prompt_tokens = args["prompt-tokens"].as<uint32_t>();
  const uint32_t n_new = args["new"].as<uint32_t>();
  if (prompt_tokens == 0 || n_new == 0) return fail("--prompt-tokens and --new must be at least 1");
  const bool stream = args.count("no-stream") == 0;
  const std::vector<uint32_t> prompt =
      engines::synthetic_prompt(prompt_tokens, shape.vocab, args["prompt-seed"].as<uint64_t>());

  // Blocks for the prompt and what decode will append (the decode engine writes those itself,
  // into the blocks it was given: they travel too, so its table covers the whole request).
  const uint64_t positions = uint64_t{prompt_tokens} + n_new - 1;
  const auto request_blocks =
      static_cast<uint32_t>((positions + shape.block_tokens - 1) / shape.block_tokens);
  const uint32_t pool_blocks = request_blocks * 2;
  auto pool = make_pool(shape, pool_blocks);
  if (!pool.ok()) return fail("KV pool: " + pool.status().to_string());
  std::vector<uint32_t> table(request_blocks);
  for (uint32_t b = 0; b < request_blocks; ++b) table[b] = pool_blocks - 1 - 2 * b;  // scattered

  // The engine connector sends each layer to the decode engine as soon as save_kv_layer says it
  // is written, while the prefill computes the next.
  engines::KvConnectorOptions options;
  options.name = "kvfabric-engine-prefill";
  options.memory = engines::LayerMemory::kHost;
  auto connector = engines::KvConnector::create(options);
  if (!connector.ok()) return fail(connector.status().to_string());
  engines::KvConnector& c = *connector.value();
  if (Status s = c.register_kv_caches(pool->view); !s.ok()) return fail(s.to_string());
  const engines::RequestId id = args["request-id"].as<uint64_t>();
  if (auto m = c.get_num_new_matched_tokens(id, prompt, 0); !m.ok()) return fail(m.status().to_string());
  if (Status s = c.update_state_after_alloc(id, table, 0); !s.ok()) return fail(s.to_string());
  if (Status s = c.send_kv_to(id, args["connect"].as<std::string>(),
                              encode_context(prompt_tokens, prompt.back(), n_new));
      !s.ok()) {
    return fail("stream: " + s.to_string());
  }
  const auto started = Clock::now();
  Status save_error;
  auto first = model.prefill(prompt, table, pool->view, [&](uint32_t layer) {
    if (!stream) return;
    if (Status s = c.save_kv_layer(id, layer); !s.ok() && save_error.ok()) save_error = s;
  });
  const double prefill_ms = ms_since(started);
  for (uint32_t l = 0; !stream && l < shape.layers; ++l) {
    if (Status s = c.save_kv_layer(id, l); !s.ok() && save_error.ok()) save_error = s;
  }
  if (!first.ok()) {
    (void)c.abort(id);  // the stream ends before any unsaved layer; the decode engine is told
    return fail("prefill: " + first.status().to_string());
  }
  if (!save_error.ok()) return fail("save_kv_layer: " + save_error.to_string());
  Status sent = c.wait_for_send(id);
  const double streamed_ms = ms_since(started);
  if (!sent.ok()) return fail("stream: " + sent.to_string());
  (void)c.request_finished(id);
  std::printf(
      "request %llu: %u-token prompt, %u blocks (%.0f KiB of KV), prefill %.2f ms, last layer landed %.2f ms "
      "after the prefill started (%s)\n",
      static_cast<unsigned long long>(id), prompt_tokens, request_blocks,
      static_cast<double>(pool->view.layout.block_bytes()) * request_blocks * shape.layers / 1024, prefill_ms,
      streamed_ms, stream ? "layers streamed during the prefill" : "streamed after the prefill");

  // What one engine with prefill and decode in one place gives, for comparison.
  auto reference = model.generate(prompt, n_new);
  if (!reference.ok()) return fail("reference generation: " + reference.status().to_string());
  std::printf("reference tokens:");
  for (uint32_t t : reference.value()) std::printf(" %u", t);
  std::printf("\n");
  return kOk;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-engine", "CPU reference engine for prefill/decode disaggregation");
  cli.positional_help("prefill|decode");
  cli.add_options()                                                                                       //
      ("role", "prefill or decode", cxxopts::value<std::string>())                                        //
      ("listen", "decode: HOST:PORT to serve on (port 0: any)", cxxopts::value<std::string>())            //
      ("connect", "prefill: the decode engine's HOST:PORT", cxxopts::value<std::string>())                //
      ("shape", "tiny", cxxopts::value<std::string>()->default_value("tiny"))                             //
      ("seed", "the weights' seed (both engines)", cxxopts::value<uint64_t>()->default_value("1"))        //
      ("pool-blocks", "decode: KV blocks in the pool", cxxopts::value<uint32_t>()->default_value("512"))  //
      ("prompt-tokens", "prefill: prompt length", cxxopts::value<uint32_t>()->default_value("100"))       //
      ("prompt-seed", "prefill: the prompt's seed", cxxopts::value<uint64_t>()->default_value("7"))       //
      ("new", "prefill: tokens the decode engine generates",
       cxxopts::value<uint32_t>()->default_value("8"))                                             //
      ("request-id", "prefill: the request's id", cxxopts::value<uint64_t>()->default_value("1"))  //
      ("no-stream", "prefill: send the KV after the whole prefill instead of layer by layer")      //
      ("v,verbose", "log the fabric's info messages")                                              //
      ("h,help", "print this help");
  cli.parse_positional({"role"});
  const auto args = cli.parse(argc, argv);
  if (args.count("help") != 0 || args.count("role") == 0) {
    std::cout << cli.help() << '\n';
    return args.count("help") != 0 ? kOk : kUsage;
  }
  spdlog::set_level(args.count("verbose") != 0 ? spdlog::level::info : spdlog::level::warn);
  const std::string role = args["role"].as<std::string>();
  if (role != "prefill" && role != "decode") {
    std::cerr << "kvfabric-engine: the role is prefill or decode, not '" << role << "'\n";
    return kUsage;
  }
  if ((role == "decode") != (args.count("listen") != 0) ||
      (role == "prefill") != (args.count("connect") != 0)) {
    std::cerr << "kvfabric-engine: decode takes --listen, prefill takes --connect\n";
    return kUsage;
  }
  if (args["shape"].as<std::string>() != "tiny") {
    std::cerr
        << "kvfabric-engine: --shape: only tiny runs on the CPU (the Llama-3-8B shape is the GPU engine's)\n";
    return kUsage;
  }
  auto model = engines::ReferenceModel::create(engines::ModelShape::tiny(), args["seed"].as<uint64_t>());
  if (!model.ok()) return fail("model: " + model.status().to_string());
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  return role == "decode" ? run_decode(args, model.value()) : run_prefill(args, model.value());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // cxxopts reports bad options by throwing
    std::cerr << "kvfabric-engine: " << e.what() << '\n';
    return kUsage;
  }
}
