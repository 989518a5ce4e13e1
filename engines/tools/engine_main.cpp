// kvfabric-engine: a reference engine process for prefill/decode disaggregation, on the CPU (tiny
// shape) or on one GPU (--gpu N; tiny or the Llama-3-8B shape, bf16 with cuBLAS).
//   kvfabric-engine --topology FILE --engine NAME   the engine the topology names, as a service: its
//       role, model and GPU from the topology, requests over HTTP/JSON on its port (engine_service.h;
//       examples/pd_demo drives a prefill and a decode engine this way). On the CPU the reference
//       engine runs the tiny shape (a Llama-3-8B layout needs a GPU), and says so.
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
// With GPU caches the connector streams GPU to GPU over cuda_ipc (both engines on one host), each
// layer once the event recorded after its K/V writes has passed, while the prefill computes on.
// Both sides must use the same --shape and --seed (the weights). Exit codes: 0 ok, 1 a failed
// request or engine error (printed), 2 usage.
#include <algorithm>
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

#include "block_manager.h"
#include "engine_service.h"
#include "kvf/engines/engine_model.h"
#include "kvf/engines/kv_connector.h"
#include "kvf/engines/synthetic_prompt.h"
#include "kvf/fabric/topology.h"
#include "request_context.h"

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

// The pool's layers back to back in one allocation, host or GPU (as the connector's PD needs); the
// connector registers it, as it would a real engine's cache. Poisoned: unwritten KV reads as NaN.
Result<engines::KvPool> make_pool(const engines::ModelShape& shape, uint32_t blocks, int device) {
  return engines::KvPool::create(shape.kv_layout_desc(blocks), device, 0xFF);
}

int run_decode(const cxxopts::ParseResult& args, engines::EngineModel& model) {
  const engines::ModelShape& shape = model.shape();
  const uint32_t pool_blocks = args["pool-blocks"].as<uint32_t>();
  auto pool = make_pool(shape, pool_blocks, model.device());
  if (!pool.ok()) return fail("KV pool: " + pool.status().to_string());
  engines::BlockManager blocks(pool_blocks);

  // The engine connector takes the streams straight into the pool's blocks (its block manager
  // picks them) and lists each request once every layer is in.
  engines::KvConnectorOptions options;
  options.name = "kvfabric-engine-decode";
  options.listen = args["listen"].as<std::string>();
  options.memory = model.device() < 0 ? engines::LayerMemory::kHost : engines::LayerMemory::kCuda;
  options.allocate_blocks = [&blocks](engines::RequestId, uint32_t n) { return blocks.allocate(n); };
  options.release_blocks = [&blocks](engines::RequestId, std::vector<uint32_t> b) { blocks.release(b); };
  auto connector = engines::KvConnector::create(options);
  if (!connector.ok()) return fail(connector.status().to_string());
  if (Status s = connector.value()->register_kv_caches(pool->view()); !s.ok()) return fail(s.to_string());
  const std::string host = options.listen.substr(0, options.listen.rfind(':'));
  std::printf("kvfabric-engine decode listening on %s:%u (%s, pool of %u blocks on %s)\n", host.c_str(),
              connector.value()->listen_port(), shape.to_string().c_str(), pool_blocks,
              model.device() < 0 ? "the CPU" : ("cuda:" + std::to_string(model.device())).c_str());
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
      engines::RequestContext context;
      const auto started = Clock::now();
      std::vector<uint32_t> tokens;
      Status status = engines::RequestContext::decode(kv->context, &context)
                          ? Status::Ok()
                          : Status(ErrorCode::kMalformed, "a stream without a request context");
      // The first token: the prompt's last position again, over the KV that arrived (it rewrites
      // that position's K/V with the same values).
      for (uint32_t i = 0; status.ok() && i < context.n_new; ++i) {
        const uint32_t position = context.prompt_tokens - 1 + i;
        auto next = model.decode_step(position, i == 0 ? context.last_token : tokens.back(), kv->blocks,
                                      pool->view());
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
            static_cast<unsigned long long>(id), context.prompt_tokens,
            static_cast<uint32_t>(kv->blocks.size()),
            kv->layer_arrival_ms.empty() ? 0.0 : kv->layer_arrival_ms.back(), context.n_new,
            ms_since(started));
      }
      std::fflush(stdout);
    }
  }
  std::printf("kvfabric-engine decode: stopping\n");
  return kOk;
}

// How one request's KV goes: layer by layer during the prefill, or all after it.
enum class Mode { kStreamed, kAfter };

struct Timing {
  double prefill_ms = 0;  // the first token known at the prefill engine
  double landed_ms = 0;   // the decode engine holds every layer
};

// One request through the prefill and the connector's stream to the decode engine.
class PrefillEngine {
 public:
  PrefillEngine(engines::EngineModel& model, engines::KvPool& pool, engines::KvConnector& connector,
                std::string peer)
      : model_(model), pool_(pool), c_(connector), peer_(std::move(peer)) {}

  Result<Timing> run(engines::RequestId id, Mode mode, const std::vector<uint32_t>& prompt,
                     const std::vector<uint32_t>& table, uint32_t n_new) {
    const uint32_t layers = model_.shape().layers;
    {
      if (auto m = c_.get_num_new_matched_tokens(id, prompt, 0); !m.ok()) return m.status();
      if (Status s = c_.update_state_after_alloc(id, table, 0); !s.ok()) return s;
      if (Status s = c_.send_kv_to(
              id, peer_,
              engines::RequestContext{static_cast<uint32_t>(prompt.size()), prompt.back(), n_new}.encode());
          !s.ok()) {
        return Status(s.code(), "stream: " + s.message());
      }
    }
    const auto started = Clock::now();
    Status save_error;
    auto first = model_.prefill_from(0, prompt, table, pool_.view(), [&](uint32_t layer, void* stream) {
      if (mode != Mode::kStreamed) return;
      Status s = stream != nullptr ? c_.save_kv_layer(id, layer, stream) : c_.save_kv_layer(id, layer);
      if (!s.ok() && save_error.ok()) save_error = s;
    });
    Timing t;
    t.prefill_ms = ms_since(started);
    // After the prefill every layer is complete (it synchronizes before returning the token).
    for (uint32_t l = 0; mode == Mode::kAfter && l < layers; ++l) {
      if (Status s = c_.save_kv_layer(id, l); !s.ok() && save_error.ok()) save_error = s;
    }
    if (!first.ok() || !save_error.ok()) {
      (void)c_.abort(id);  // the stream ends before any unsaved layer; the decode engine is told
      (void)c_.request_finished(id);
      return !first.ok() ? Status(first.status().code(), "prefill: " + first.status().message())
                         : Status(save_error.code(), "save_kv_layer: " + save_error.message());
    }
    Status sent = c_.wait_for_send(id);
    t.landed_ms = ms_since(started);
    (void)c_.request_finished(id);
    if (!sent.ok()) return Status(sent.code(), "stream: " + sent.message());
    return t;
  }

 private:
  engines::EngineModel& model_;
  engines::KvPool& pool_;
  engines::KvConnector& c_;
  std::string peer_;
};

int run_prefill(const cxxopts::ParseResult& args, engines::EngineModel& model) {
  const engines::ModelShape& shape = model.shape();
  const uint32_t prompt_tokens = args["prompt-tokens"].as<uint32_t>();
  const uint32_t n_new = args["new"].as<uint32_t>();
  if (prompt_tokens == 0 || n_new == 0) return fail("--prompt-tokens and --new must be at least 1");
  const std::vector<uint32_t> prompt =
      engines::synthetic_prompt(prompt_tokens, shape.vocab, args["prompt-seed"].as<uint64_t>());

  // Blocks for the prompt and what decode will append (the decode engine writes those itself,
  // into the blocks it was given: they travel too, so its table covers the whole request).
  const uint64_t positions = uint64_t{prompt_tokens} + n_new - 1;
  const auto request_blocks =
      static_cast<uint32_t>((positions + shape.block_tokens - 1) / shape.block_tokens);
  const uint32_t pool_blocks = request_blocks * 2;
  auto pool = make_pool(shape, pool_blocks, model.device());
  if (!pool.ok()) return fail("KV pool: " + pool.status().to_string());
  std::vector<uint32_t> table(request_blocks);
  for (uint32_t b = 0; b < request_blocks; ++b) table[b] = pool_blocks - 1 - 2 * b;  // scattered

  // The engine connector sends each layer to the decode engine as soon as save_kv_layer says it
  // is written, while the prefill computes the next.
  engines::KvConnectorOptions options;
  options.name = "kvfabric-engine-prefill";
  options.memory = model.device() < 0 ? engines::LayerMemory::kHost : engines::LayerMemory::kCuda;
  auto connector = engines::KvConnector::create(options);
  if (!connector.ok()) return fail(connector.status().to_string());
  if (Status s = connector.value()->register_kv_caches(pool->view()); !s.ok()) return fail(s.to_string());
  PrefillEngine engine(model, pool.value(), *connector.value(), args["connect"].as<std::string>());
  const double kv_mib =
      static_cast<double>(pool->layout().block_bytes()) * request_blocks * shape.layers / (1024.0 * 1024.0);

  const engines::RequestId id = args["request-id"].as<uint64_t>();
  const Mode mode = args.count("no-stream") != 0 ? Mode::kAfter : Mode::kStreamed;
  auto t = engine.run(id, mode, prompt, table, n_new);
  if (!t.ok()) return fail(t.status().to_string());
  std::printf(
      "request %llu: %u-token prompt, %u blocks (%.1f MiB of KV), prefill %.2f ms, last layer landed %.2f ms "
      "after "
      "the prefill started (%s)\n",
      static_cast<unsigned long long>(id), prompt_tokens, request_blocks, kv_mib, t->prefill_ms, t->landed_ms,
      mode == Mode::kStreamed ? "layers streamed during the prefill" : "streamed after the prefill");

  // What one engine with prefill and decode in one place gives, for comparison.
  auto reference = model.generate(prompt, n_new, table, pool->view());
  if (!reference.ok()) return fail("reference generation: " + reference.status().to_string());
  std::printf("reference tokens:");
  for (uint32_t token : reference.value()) std::printf(" %u", token);
  std::printf("\n");
  return kOk;
}

// --topology FILE --engine NAME: the engine's settings from the topology, then its service.
int run_from_topology(const cxxopts::ParseResult& args) {
  const std::string file = args["topology"].as<std::string>();
  fabric::TopologyLoad load = fabric::load_topology_file(file);
  if (!load.topology) {
    for (const auto& p : load.problems) std::fprintf(stderr, "%s\n", p.to_string().c_str());
    return kUsage;
  }
  const fabric::Topology& t = *load.topology;
  const std::string name = args["engine"].as<std::string>();
  const fabric::EngineSpec* engine = t.find_engine(name);
  if (engine == nullptr) {
    std::string names;
    for (const auto& e : t.engines) names += (names.empty() ? "" : ", ") + e.name;
    std::fprintf(stderr, "kvfabric-engine: %s names no engine '%s' (engines: %s)\n", file.c_str(),
                 name.c_str(), names.c_str());
    return kUsage;
  }
  const fabric::NodeSpec* node = t.find_node(engine->node);
  const fabric::ModelSpec* model = t.find_model(engine->model);
  engines::EngineServiceOptions o;
  o.name = engine->name;
  o.role = std::string(fabric::engine_role_name(engine->role));
  o.model_name = engine->model;
  o.seed = args["seed"].as<uint64_t>();
  o.device = args.count("gpu") != 0 ? args["gpu"].as<int>() : engine->gpu.value_or(-1);
  o.host = node->address;
  o.port = engine->port;
  o.pool_blocks = engine->kv_blocks != 0 ? engine->kv_blocks : model->layout.num_blocks;
  const engines::ModelShape llama = engines::ModelShape::llama3_8b(), tiny = engines::ModelShape::tiny();
  const auto& l = model->layout;
  auto shape_matches = [&](const engines::ModelShape& m) {
    return l.num_layers == m.layers && l.kv_heads == m.kv_heads && l.head_dim == m.head_dim &&
           l.block_tokens == m.block_tokens;
  };
  if (o.device >= 0 && shape_matches(llama)) {
    o.shape = llama;
  } else if (shape_matches(tiny) || o.device < 0) {
    o.shape = tiny;
    if (!shape_matches(tiny))
      std::printf(
          "kvfabric-engine %s: no GPU: the CPU reference engine runs the tiny shape (%s), not model %s's\n",
          o.name.c_str(), tiny.to_string().c_str(), o.model_name.c_str());
  } else {
    std::fprintf(
        stderr,
        "kvfabric-engine: model %s's layout (%u layers, %u KV heads of dim %u) is neither the tiny nor the "
        "Llama-3-8B shape the reference engine runs\n",
        o.model_name.c_str(), l.num_layers, l.kv_heads, l.head_dim);
    return kUsage;
  }
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  return engines::run_engine_service(o, g_stop);
}

int run(int argc, char** argv) {
  cxxopts::Options cli("kvfabric-engine", "Reference engine (CPU or GPU) for prefill/decode disaggregation");
  cli.positional_help("prefill|decode");
  cli.add_options()                                                                                       //
      ("role", "prefill or decode", cxxopts::value<std::string>())                                        //
      ("listen", "decode: HOST:PORT to serve on (port 0: any)", cxxopts::value<std::string>())            //
      ("connect", "prefill: the decode engine's HOST:PORT", cxxopts::value<std::string>())                //
      ("shape", "tiny | llama3-8b (GPU only)", cxxopts::value<std::string>()->default_value("tiny"))      //
      ("gpu", "run on this GPU (default: the CPU)", cxxopts::value<int>()->default_value("-1"))           //
      ("seed", "the weights' seed (both engines)", cxxopts::value<uint64_t>()->default_value("1"))        //
      ("pool-blocks", "decode: KV blocks in the pool", cxxopts::value<uint32_t>()->default_value("512"))  //
      ("prompt-tokens", "prefill: prompt length", cxxopts::value<uint32_t>()->default_value("100"))       //
      ("prompt-seed", "prefill: the prompt's seed", cxxopts::value<uint64_t>()->default_value("7"))       //
      ("new", "prefill: tokens the decode engine generates",
       cxxopts::value<uint32_t>()->default_value("8"))                                             //
      ("request-id", "prefill: the request's id", cxxopts::value<uint64_t>()->default_value("1"))  //
      ("no-stream", "prefill: send the KV after the whole prefill instead of layer by layer")      //
      ("topology", "serve the engine --engine names in this topology (HTTP/JSON)",
       cxxopts::value<std::string>())                                                  //
      ("engine", "with --topology: the engine's name", cxxopts::value<std::string>())  //
      ("v,verbose", "log the fabric's info messages")                                  //
      ("h,help", "print this help");
  cli.parse_positional({"role"});
  const auto args = cli.parse(argc, argv);
  spdlog::set_level(args.count("verbose") != 0 ? spdlog::level::info : spdlog::level::warn);
  if (args.count("topology") != 0 || args.count("engine") != 0) {
    if (args.count("topology") == 0 || args.count("engine") == 0 || args.count("role") != 0) {
      std::cerr << "kvfabric-engine: --topology FILE --engine NAME go together, without a role\n";
      return kUsage;
    }
    return run_from_topology(args);
  }
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
  const std::string shape_name = args["shape"].as<std::string>();
  const int gpu = args["gpu"].as<int>();
  if (shape_name != "tiny" && shape_name != "llama3-8b") {
    std::cerr << "kvfabric-engine: --shape is tiny or llama3-8b, not '" << shape_name << "'\n";
    return kUsage;
  }
  if (shape_name == "llama3-8b" && gpu < 0) {
    std::cerr << "kvfabric-engine: --shape llama3-8b runs on a GPU only: add --gpu N\n";
    return kUsage;
  }
  const engines::ModelShape shape =
      shape_name == "tiny" ? engines::ModelShape::tiny() : engines::ModelShape::llama3_8b();
  const uint32_t max_tokens =
      std::max<uint32_t>(args["prompt-tokens"].as<uint32_t>() + args["new"].as<uint32_t>(), 256);
  const auto loading = Clock::now();
  auto model = engines::EngineModel::create(shape, args["seed"].as<uint64_t>(), gpu, max_tokens);
  if (!model.ok()) return fail("model: " + model.status().to_string());
  if (gpu >= 0)
    std::printf("model on cuda:%d (%s) in %.0f ms\n", gpu, shape.to_string().c_str(), ms_since(loading));
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  return role == "decode" ? run_decode(args, *model.value()) : run_prefill(args, *model.value());
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
