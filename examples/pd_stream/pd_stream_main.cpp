// kvfabric-pd-stream: the PD streaming demo on a topology file. A decode-side process grants its
// KV blocks (shuffled, as a paged allocator hands them out); a prefill-side process "computes"
// each layer of a request (fills it with data) and saves it at once, so layer l streams over UCX
// while layer l+1 is computed. The decode side checks every byte and prints per-layer timing.
//   kvfabric-pd-stream --topology FILE                  both sides (decode in a child process)
//   kvfabric-pd-stream --topology FILE --role decode    one side each, e.g. on two hosts
//   kvfabric-pd-stream --topology FILE --role prefill
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <future>
#include <thread>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "kvf/fabric/stream_receiver.h"
#include "kvf/fabric/stream_sender.h"
#include "kvf/fabric/topology.h"
#include "kvf/fabric/ucx_transport.h"

extern char** environ;

namespace {

using namespace kvf;
using namespace kvf::fabric;
using Clock = std::chrono::steady_clock;

int fail(const std::string& message) {
  std::fprintf(stderr, "kvfabric-pd-stream: %s\n", message.c_str());
  return 1;
}

struct Plan {
  Topology topology;
  const EngineSpec* prefill = nullptr;
  const EngineSpec* decode = nullptr;
  const NodeSpec* decode_node = nullptr;
  protocol::KvLayoutDesc layout;  // num_blocks = the request's blocks
  uint32_t tokens = 0;
};

Result<Plan> make_plan(const cxxopts::ParseResult& args) {
  std::string file = args["topology"].as<std::string>();
  auto load = load_topology_file(file);
  if (!load.topology) {
    std::string all;
    for (const auto& p : load.problems) all += "\n  " + p.to_string();
    return Status(ErrorCode::kInvalidArgument, "invalid topology:" + all);
  }
  Plan plan;
  plan.topology = std::move(*load.topology);
  auto pick = [&](const std::string& name, EngineRole role) -> const EngineSpec* {
    if (!name.empty()) return plan.topology.find_engine(name);
    for (const auto& e : plan.topology.engines) {
      if (e.role == role || e.role == EngineRole::kBoth) return &e;
    }
    return nullptr;
  };
  plan.prefill = pick(args["prefill"].as<std::string>(), EngineRole::kPrefill);
  plan.decode = pick(args["decode"].as<std::string>(), EngineRole::kDecode);
  if (plan.prefill == nullptr)
    return Status(ErrorCode::kNotFound, file + ": no prefill engine (or the one named)");
  if (plan.decode == nullptr)
    return Status(ErrorCode::kNotFound, file + ": no decode engine (or the one named)");
  if (plan.prefill->model != plan.decode->model) {
    return Status(ErrorCode::kInvalidArgument,
                  "engines " + plan.prefill->name + " and " + plan.decode->name + " serve different models");
  }
  const ModelSpec* model = plan.topology.find_model(plan.prefill->model);
  plan.decode_node = plan.topology.find_node(plan.decode->node);
  plan.layout = model->layout;
  plan.tokens = args["tokens"].as<uint32_t>();
  if (plan.tokens == 0) return Status(ErrorCode::kInvalidArgument, "--tokens must be positive");
  plan.layout.num_blocks = (plan.tokens + plan.layout.block_tokens - 1) / plan.layout.block_tokens;
  uint32_t pool = plan.decode->kv_blocks != 0 ? plan.decode->kv_blocks : model->layout.num_blocks;
  if (plan.layout.num_blocks > pool) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(plan.tokens) + " tokens need " +
                                                   std::to_string(plan.layout.num_blocks) + " blocks; " +
                                                   plan.decode->name + " has " + std::to_string(pool));
  }
  if (!plan.topology.ucx_tls.empty()) setenv("UCX_TLS", plan.topology.ucx_tls.c_str(), 0);  // the user's wins
  return plan;
}

int run_decode(const Plan& plan, const std::string& listen_host) {
  auto ucx = gpudirect::UcxContext::create();
  if (!ucx.ok()) return fail(ucx.status().to_string());
  auto transport = UcxTransport::create(ucx.value());
  if (!transport.ok()) return fail(transport.status().to_string());
  std::promise<StreamReport> done;
  StreamReceiverOptions options;
  options.name = plan.decode->name;
  options.on_stream_done = [&](const StreamReport& r) { done.set_value(r); };
  auto receiver =
      StreamReceiver::start(ucx.value(), *transport.value(), listen_host, plan.decode->port, options);
  if (!receiver.ok()) return fail(receiver.status().to_string());
  std::printf("[decode %s] listening on %s:%u for one request\n", plan.decode->name.c_str(),
              listen_host.c_str(), plan.decode->port);
  std::fflush(stdout);
  StreamReport r = done.get_future().get();
  if (!r.status.ok()) return fail("[decode] request failed: " + r.status.to_string());
  auto layout = protocol::KvLayout::create(plan.layout);
  const double layer_mib = static_cast<double>(layout->layer_bytes()) / (1 << 20);
  std::printf(
      "[decode %s] request %llu from %s: per layer (arrival after the grant, GB/s since the previous)\n",
      plan.decode->name.c_str(), static_cast<unsigned long long>(r.request_id), r.peer.c_str());
  uint64_t previous = 0;
  for (size_t l = 0; l < r.layer_arrival_ns.size(); ++l) {
    uint64_t t = r.layer_arrival_ns[l];
    double gap_s = static_cast<double>(t - std::min(t, previous)) / 1e9;
    // Announcements that land together (< 0.5 ms apart) say nothing about the link's rate.
    if (l > 0 && gap_s < 5e-4) {
      std::printf("  layer %2zu  %9.2f ms  (with the previous)\n", l, static_cast<double>(t) / 1e6);
    } else {
      std::printf("  layer %2zu  %9.2f ms  %7.2f GB/s\n", l, static_cast<double>(t) / 1e6,
                  gap_s > 0 ? static_cast<double>(layout->layer_bytes()) / gap_s / 1e9 : 0.0);
    }
    previous = t;
  }
  double total_s = static_cast<double>(r.layer_arrival_ns.back()) / 1e9;
  // The layers arrive as prefill computes them, so the pace is the compute's, not the link's:
  // the prefill side reports how far behind its compute the last layer landed.
  std::printf("[decode %s] %u layers x %.1f MiB = %.1f MiB, the last %.1f ms after the grant (streamed while "
              "prefill computed); every byte verified: %s\n",
              plan.decode->name.c_str(), r.layers, layer_mib, static_cast<double>(r.bytes) / (1 << 20),
              total_s * 1e3, r.verified && r.bytes_verified == r.bytes ? "yes" : "NO");
  std::fflush(stdout);
  return r.verified && r.bytes_verified == r.bytes ? 0 : 1;
}

int run_prefill(const Plan& plan, const cxxopts::ParseResult& args) {
  auto ucx = gpudirect::UcxContext::create();
  if (!ucx.ok()) return fail(ucx.status().to_string());
  auto transport = UcxTransport::create(ucx.value());
  if (!transport.ok()) return fail(transport.status().to_string());
  auto layout = protocol::KvLayout::create(plan.layout);
  if (!layout.ok()) return fail(layout.status().to_string());
  auto source =
      gpudirect::MemoryRegion::allocate_host(ucx.value(), layout->layer_bytes() * plan.layout.num_layers);
  if (!source.ok()) return fail(source.status().to_string());

  // The decode side may still be starting: retry the connection for a while.
  Result<std::unique_ptr<PeerLink>> link = Status(ErrorCode::kPeerLost, "not tried");
  auto deadline = Clock::now() + std::chrono::seconds(args["connect-timeout-s"].as<uint32_t>());
  do {
    link = PeerLink::connect(*transport.value(), plan.decode_node->address, plan.decode->port,
                             plan.prefill->name, std::chrono::seconds(5));
    if (link.ok() || Clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  } while (true);
  if (!link.ok()) return fail("cannot reach " + plan.decode->name + ": " + link.status().to_string());

  TransferScheduler scheduler(*transport.value());
  PatternStreamOptions options;
  options.request_id = 1;
  options.seed = args["seed"].as<uint64_t>();
  Status compute_status;
  options.before_layer = [&](uint32_t layer) -> void* {
    // This layer's "compute"; host memory, so the layer is ready when the call returns.
    Status s = fill_layer_pattern(source.value(), layout.value(), layer, options.seed);
    if (!s.ok() && compute_status.ok()) compute_status = s;
    return nullptr;
  };
  std::printf("[prefill %s] request of %u tokens (%u blocks, %.1f MiB of KV) -> %s at %s:%u\n",
              plan.prefill->name.c_str(), plan.tokens, plan.layout.num_blocks,
              static_cast<double>(layout->layer_bytes() * plan.layout.num_layers) / (1 << 20),
              plan.decode->name.c_str(), plan.decode_node->address.c_str(), plan.decode->port);
  std::fflush(stdout);
  auto outcome = send_pattern_stream(*link.value(), *transport.value(), scheduler, source.value(),
                                     layout.value(), options);
  if (!outcome.ok()) return fail("[prefill] " + outcome.status().to_string());
  if (!compute_status.ok()) return fail("[prefill] filling the layers: " + compute_status.to_string());
  double last_compute = outcome->layer_ready_s.back();
  double last_done = outcome->layer_done_s.back();
  std::printf(
      "[prefill %s] last layer computed at %.1f ms, remotely complete at %.1f ms: %.1f ms after compute\n",
      plan.prefill->name.c_str(), last_compute * 1e3, last_done * 1e3, (last_done - last_compute) * 1e3);
  std::printf("[prefill %s] decode verified %llu bytes\n", plan.prefill->name.c_str(),
              static_cast<unsigned long long>(outcome->result.bytes_verified));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-pd-stream",
                           "PD streaming demo: prefill streams a request's KV layer by layer "
                           "into a decode process, which verifies every byte.");
  options.add_options()("topology", "topology YAML",
                        cxxopts::value<std::string>()->default_value("examples/topologies/local.yaml"))(
      "role", "both | prefill | decode", cxxopts::value<std::string>()->default_value("both"))(
      "prefill", "prefill engine name (default: the first prefill engine)",
      cxxopts::value<std::string>()->default_value(""))(
      "decode", "decode engine name (default: the first decode engine)",
      cxxopts::value<std::string>()->default_value(""))("tokens", "prompt length in tokens",
                                                        cxxopts::value<uint32_t>()->default_value("8192"))(
      "seed", "data seed", cxxopts::value<uint64_t>()->default_value("2026"))(
      "listen", "decode: address to listen on (default: the node's address)",
      cxxopts::value<std::string>()->default_value(""))(
      "connect-timeout-s", "prefill: keep trying to reach decode this long",
      cxxopts::value<uint32_t>()->default_value("20"))("h,help", "print help");
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    return fail(std::string(e.what()) + " (see --help)");
  }
  if (args.count("help") != 0) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  spdlog::set_level(spdlog::level::warn);
  auto plan = make_plan(args);
  if (!plan.ok()) return fail(plan.status().message());
  std::string role = args["role"].as<std::string>();
  std::string listen = args["listen"].as<std::string>();
  if (listen.empty()) listen = plan->decode_node->address;
  if (role == "decode") return run_decode(plan.value(), listen);
  if (role == "prefill") return run_prefill(plan.value(), args);
  if (role != "both") return fail("--role must be both, prefill or decode");

  // Both: the decode side runs as a child process (separate address spaces, as in production).
  std::vector<std::string> child_args = {argv[0],
                                         "--role",
                                         "decode",
                                         "--topology",
                                         args["topology"].as<std::string>(),
                                         "--decode",
                                         plan->decode->name,
                                         "--prefill",
                                         plan->prefill->name,
                                         "--tokens",
                                         std::to_string(plan->tokens),
                                         "--listen",
                                         listen};
  std::vector<char*> cargv;
  for (auto& a : child_args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  pid_t child = 0;
  if (posix_spawn(&child, "/proc/self/exe", nullptr, nullptr, cargv.data(), environ) != 0) {
    return fail("cannot start the decode process");
  }
  int rc = run_prefill(plan.value(), args);
  int status = 0;
  if (rc != 0) kill(child, SIGTERM);
  waitpid(child, &status, 0);
  int child_rc = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  if (rc == 0 && child_rc == 0) std::printf("PD stream demo: OK\n");
  return rc != 0 ? rc : child_rc;
}
