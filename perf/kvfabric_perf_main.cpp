// kvfabric-perf: measures kvfabric's data path between two processes.
//   kvfabric-perf server --listen HOST:PORT
//   kvfabric-perf client --connect HOST:PORT --mode bw|lat|layers [--sizes 4K,64K,1M,4M] [--iters N]
//                        [--layers L --blocks B --block-bytes S --shuffle --verify] [--json FILE]
//   kvfabric-perf local --mem cuda:N --mode gather|scatter [--layers ... --shuffle --verify --copy ...]
//   kvfabric-perf codec --codec int8|fp8 [--row-bytes R --block-bytes S --iters N]
// bw: one-sided puts of each size back to back (a window in flight), flushed at the end, like
// ucx_perftest's ucp_put_bw. lat: put + flush round trips. layers: a KV request of L layers of B
// blocks (K and V of S bytes each) streamed layer by layer into the server's blocks (shuffled
// when asked) through the TransferScheduler, every byte checked by the server with --verify.
// GPU: --transport cuda_ipc on both sides, --mem cuda:N (the server's blocks / the client's source
// on GPU N); layers mode then moves the blocks GPU to GPU (--copy picks kernel or copy engines).
// Compressed layers: --transport ucx_staged --codec identity|int8|fp8 on both sides (the same
// codec and --row-bytes): the client streams random bf16 KV, encoded per token row in the staging
// slots; the server lands it in a poisoned pool of its own and checks every block against the CPU
// codec's decode of the client's values (codec_stream_check.h); the client waits for that check
// after each request and fails on any difference.
#include <algorithm>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <numeric>
#include <random>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "codec_stream_check.h"
#include "concurrent_streams_run.h"
#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/cuda_ipc_transport.h"
#include "kvf/fabric/multi_transport.h"
#include "kvf/fabric/staged_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/stream_receiver.h"
#include "kvf/fabric/stream_sender.h"
#include "kvf/fabric/topology.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/fabric/version.h"
#include "local_copy_run.h"
#include "overlap_run.h"
#include "perf_util.h"

namespace {

using namespace kvf;
using namespace kvf::fabric;
using Clock = std::chrono::steady_clock;

int fail(const std::string& message) {
  std::fprintf(stderr, "kvfabric-perf: %s\n", message.c_str());
  return 1;
}

PeerFailureDetection peer_failure_option(const cxxopts::ParseResult& args) {
  std::string v = args["peer-errors"].as<std::string>();
  return v == "on"    ? PeerFailureDetection::kOn
         : v == "off" ? PeerFailureDetection::kOff
                      : PeerFailureDetection::kAuto;
}

struct Setup {
  std::shared_ptr<gpudirect::UcxContext> ucx;
  std::unique_ptr<Transport> transport;
  BufferPlacement memory;  // where this side's KV buffers live
};

// "host" or "cuda:N".
Result<BufferPlacement> parse_memory(const std::string& text) {
  if (text == "host") return BufferPlacement{};
  if (text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.size() < 9 &&
      text.find_first_not_of("0123456789", 5) == std::string::npos) {
    return BufferPlacement{true, std::stoi(text.substr(5))};
  }
  return Status(ErrorCode::kInvalidArgument, "--mem must be host or cuda:N, got '" + text + "'");
}

// One transport of the kind named.
Result<std::unique_ptr<Transport>> make_one_transport(const cxxopts::ParseResult& args,
                                                      const std::string& kind,
                                                      const std::shared_ptr<gpudirect::UcxContext>& ucx,
                                                      const BufferPlacement& memory) {
  UcxTransportOptions options;
  options.max_outstanding_puts = args["window"].as<size_t>();
  options.peer_failure = peer_failure_option(args);
  const std::string mapped_copy = args["mapped-copy"].as<std::string>();
  if (mapped_copy != "on" && mapped_copy != "off")
    return Status(ErrorCode::kInvalidArgument, "--mapped-copy must be on or off, not '" + mapped_copy + "'");
  options.copy_into_mapped_regions = mapped_copy == "on";
  if (kind == "ucx") {
    auto transport = UcxTransport::create(ucx, options);
    if (!transport.ok()) return transport.status();
    return std::unique_ptr<Transport>(std::move(transport.value()));
  }
  auto codec = protocol::parse_codec(args["codec"].as<std::string>());
  if (!codec.ok()) return Status(ErrorCode::kInvalidArgument, "--codec: " + codec.status().message());
  if (codec.value() != protocol::KvCodec::kIdentity && kind != "ucx_staged") {
    return Status(ErrorCode::kInvalidArgument, "--codec " + args["codec"].as<std::string>() +
                                                   " needs --transport ucx_staged (the transport that "
                                                   "encodes its staging slots), not " +
                                                   kind);
  }
  if (kind == "ucx_staged") {
    StagedTransportOptions staged;
    staged.device = memory.gpu ? memory.device : -1;
    staged.ucx = options;
    staged.codec = codec.value();
    staged.row_bytes = args["row-bytes"].as<uint32_t>();
    staged.workers = args["staging-workers"].as<uint32_t>();
    auto slot =
        perf::parse_size(args.count("staging-bytes") != 0 ? args["staging-bytes"].as<std::string>() : "32M");
    auto limit = perf::parse_size(args["staging-limit"].as<std::string>());
    if (!slot || *slot == 0 || !limit) {
      return Status(ErrorCode::kInvalidArgument, "--staging-bytes / --staging-limit: bad size");
    }
    staged.slot_bytes = *slot;
    staged.slots = args["staging-slots"].as<uint32_t>();
    staged.receive_limit = *limit;
    auto transport = StagedTransport::create(ucx, staged);
    if (!transport.ok()) return transport.status();
    return std::unique_ptr<Transport>(std::move(transport.value()));
  }
  if (kind == "cuda_ipc" || kind == "nccl") {
    if (!memory.gpu) {
      return Status(ErrorCode::kInvalidArgument,
                    "--transport " + kind + " moves GPU memory: add --mem cuda:N");
    }
    CudaIpcTransportOptions cuda;
    cuda.device = memory.device;
    cuda.ucx = options;
    cuda.streams = args["streams"].as<uint32_t>();
    cuda.resident_plans = args["resident-plans"].as<bool>();
    if (args.count("staging-bytes") != 0) {  // else the transport's default
      auto staging = perf::parse_size(args["staging-bytes"].as<std::string>());
      if (!staging || *staging == 0) {
        return Status(ErrorCode::kInvalidArgument,
                      "--staging-bytes: bad size '" + args["staging-bytes"].as<std::string>() + "'");
      }
      cuda.staging_bytes = *staging;
    }
    cuda.staging_remote_slots = args["staging-slots"].as<uint32_t>();
    cuda.staging_copy_streams = args["staging-copy-streams"].as<uint32_t>();
    cuda.copy_kernel_blocks = args["copy-kernel-blocks"].as<uint32_t>();
    const std::string handover = args["staging-handover"].as<std::string>();
    if (handover != "on" && handover != "off") {
      return Status(ErrorCode::kInvalidArgument,
                    "--staging-handover must be on or off, not '" + handover + "'");
    }
    cuda.staging_handover = handover == "on";
    cuda.staging_copy_overlap_hint = args["staging-copy-hint"].as<bool>();
    cuda.staging_copies_ahead = args["staging-ahead"].as<uint32_t>();
    if (cuda.staging_copy_streams == 0 || cuda.staging_copy_streams > 4) {
      return Status(ErrorCode::kInvalidArgument, "--staging-copy-streams must be 1..4");
    }
    if (cuda.staging_remote_slots == 0 || cuda.staging_remote_slots > 64) {
      return Status(ErrorCode::kInvalidArgument, "--staging-slots must be 1..64");
    }
    auto limit = perf::parse_size(args["staging-limit"].as<std::string>());
    if (!limit) {
      return Status(ErrorCode::kInvalidArgument,
                    "--staging-limit: bad size '" + args["staging-limit"].as<std::string>() + "'");
    }
    cuda.staging_receive_limit = *limit;
    std::string copy = args["copy"].as<std::string>();
    if (copy == "kernel") {
      cuda.copy = CudaCopyMethod::kKernel;
    } else if (copy == "ce") {
      cuda.copy = CudaCopyMethod::kCopyEngine;
    } else if (copy == "ce1") {
      cuda.copy = CudaCopyMethod::kCopyEnginePerCopy;
    } else if (copy == "staged") {
      cuda.copy = CudaCopyMethod::kStaged;
    } else if (copy == "adaptive") {
      cuda.copy = CudaCopyMethod::kAdaptive;
    } else if (copy != "auto") {
      return Status(ErrorCode::kInvalidArgument,
                    "--copy must be auto, kernel, ce, ce1, staged or adaptive, got '" + copy + "'");
    }
    cuda.adaptive_stages_same_gpu = args["adaptive-same-gpu"].as<bool>();
    if (cuda.adaptive_stages_same_gpu && cuda.copy != CudaCopyMethod::kAdaptive) {
      return Status(ErrorCode::kInvalidArgument, "--adaptive-same-gpu needs --copy adaptive");
    }
    if (kind == "nccl") cuda.copy = CudaCopyMethod::kNccl;  // --copy does not apply
    auto transport = CudaIpcTransport::create(ucx, cuda);
    if (!transport.ok()) return transport.status();
    return std::unique_ptr<Transport>(std::move(transport.value()));
  }
  return Status(ErrorCode::kInvalidArgument,
                "--transport must be ucx, cuda_ipc or nccl, or a comma list of them "
                "in order of preference, got '" +
                    kind + "'");
}

// --transport as given, or else the topology's transports.preference ("local", the in-process
// test transport, left out), so peers choose per pair as the topology prefers.
Result<std::string> transport_list(const cxxopts::ParseResult& args) {
  if (args.count("transport") != 0 || args.count("topology") == 0) return args["transport"].as<std::string>();
  const std::string file = args["topology"].as<std::string>();
  TopologyLoad load = load_topology_file(file);
  if (!load.topology) {
    std::string problems;
    for (const TopologyProblem& p : load.problems) problems += "\n  " + p.to_string();
    return Status(ErrorCode::kInvalidArgument, "--topology " + file + " is not valid:" + problems);
  }
  std::string kinds;
  for (TransportKind kind : load.topology->transport_preference) {
    if (kind == TransportKind::kLocal) continue;
    kinds += (kinds.empty() ? "" : ",") + std::string(transport_kind_name(kind));
  }
  if (kinds.empty()) {
    return Status(ErrorCode::kInvalidArgument,
                  "--topology " + file + ": transports.preference names no transport between processes");
  }
  return kinds;
}

// --transport KIND, or a comma list (most preferred first): each peer then gets the first that
// both sides offer and that connects. Kinds this machine cannot run are left out, with the reason.
Result<Setup> make_transport(const cxxopts::ParseResult& args) {
  auto memory = parse_memory(args["mem"].as<std::string>());
  if (!memory.ok()) return memory.status();
  auto ucx = gpudirect::UcxContext::create();
  if (!ucx.ok()) return ucx.status();
  auto listed = transport_list(args);
  if (!listed.ok()) return listed.status();
  const std::string kinds = listed.value();
  if (kinds.find(',') == std::string::npos) {
    auto transport = make_one_transport(args, kinds, ucx.value(), memory.value());
    if (!transport.ok()) return transport.status();
    return Setup{ucx.value(), std::move(transport.value()), memory.value()};
  }
  std::vector<std::unique_ptr<Transport>> inner;
  std::string skipped;
  for (size_t at = 0; at <= kinds.size();) {
    const size_t comma = std::min(kinds.find(',', at), kinds.size());
    const std::string kind = kinds.substr(at, comma - at);
    at = comma + 1;
    if ((kind == "cuda_ipc" || kind == "nccl") && !memory->gpu) {
      skipped += (skipped.empty() ? "" : "; ") + kind + ": this side's buffers are host memory";
      continue;  // GPU transports have nothing to move here; a peer offering them gets the next
    }
    auto transport = make_one_transport(args, kind, ucx.value(), memory.value());
    if (transport.ok()) {
      inner.push_back(std::move(transport.value()));
    } else if (transport.status().code() == ErrorCode::kUnavailable) {
      spdlog::warn("--transport: {} left out: {}", kind, transport.status().message());
      skipped += (skipped.empty() ? "" : "; ") + kind + ": " + transport.status().message();
    } else {
      return transport.status();  // a misspelt kind or a bad option is the user's to fix
    }
  }
  if (inner.empty())
    return Status(ErrorCode::kUnavailable, "--transport " + kinds + ": none can run here (" + skipped + ")");
  auto multi = MultiTransport::create(std::move(inner));
  if (!multi.ok()) return multi.status();
  return Setup{ucx.value(), std::move(multi.value()), memory.value()};
}

int run_server(const cxxopts::ParseResult& args) {
  auto hp = parse_host_port(args["listen"].as<std::string>());
  if (!hp.ok()) return fail("--listen: " + hp.status().message());
  auto setup = make_transport(args);
  if (!setup.ok()) return fail(setup.status().to_string());

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before threads start, so they inherit it

  StreamReceiverOptions options;
  options.name = "kvfabric-perf-server";
  options.buffers = setup->memory;
  options.max_request_bytes = perf::parse_size(args["max-bytes"].as<std::string>()).value_or(16ull << 30);
  // --codec: streams land in a pool of this server's own that it checks against the codec.
  std::unique_ptr<perf::CodecVerifyServer> checker;
  if (args.count("codec") != 0) {
    if (setup->memory.gpu) return fail("--codec: the server's pool is host memory (leave out --mem)");
    auto layout = perf::layers_layout(args["layers"].as<uint32_t>(), args["blocks"].as<uint32_t>(),
                                      args["block-bytes"].as<std::string>());
    if (!layout.ok()) return fail(layout.status().message());
    const auto codec = protocol::parse_codec(args["codec"].as<std::string>()).value();  // checked above
    auto started = perf::CodecVerifyServer::start(setup->ucx, layout->desc(), codec,
                                                  args["row-bytes"].as<uint32_t>(), hp->first);
    if (!started.ok()) return fail("--codec: " + started.status().to_string());
    checker = std::move(started.value());
    options.pool = checker->pool();
    options.name = perf::codec_server_name(checker->info());
    options.retire_grace = std::chrono::milliseconds(3000);  // a failed stream's pool comes back sooner
  }
  options.on_stream_done = [checker = checker.get()](const StreamReport& r) {
    double last_ms = r.layer_arrival_ns.empty() ? 0 : static_cast<double>(r.layer_arrival_ns.back()) / 1e6;
    if (r.status.ok()) {
      std::printf("stream %llu from %s: %llu bytes in %u layers, last layer at %.1f ms after the offer, %s\n",
                  static_cast<unsigned long long>(r.request_id), r.peer.c_str(),
                  static_cast<unsigned long long>(r.bytes), r.layers, last_ms,
                  r.verified ? ("every byte verified (" + std::to_string(r.bytes_verified) + ")").c_str()
                             : "not verified");
    } else {
      std::printf("stream %llu from %s FAILED: %s\n", static_cast<unsigned long long>(r.request_id),
                  r.peer.c_str(), r.status.to_string().c_str());
    }
    std::fflush(stdout);
    if (checker != nullptr) checker->stream_done(r);
  };
  auto receiver = StreamReceiver::start(setup->ucx, *setup->transport, hp->first, hp->second, options);
  if (!receiver.ok()) return fail(receiver.status().to_string());
  std::printf("kvfabric-perf server %s listening on %s:%u (Ctrl-C to stop)\n", std::string(version()).c_str(),
              hp->first.c_str(), receiver.value()->port());
  if (checker) {
    std::printf(
        "codec %s, rows of %u bytes: streams land in a poisoned pool of %u layers x %u blocks, checked "
        "against the CPU codec (answers on port %u)\n",
        std::string(protocol::codec_name(checker->info().codec)).c_str(), checker->info().row_bytes,
        args["layers"].as<uint32_t>(), args["blocks"].as<uint32_t>(), checker->port());
  }
  std::fflush(stdout);
  int sig = 0;
  sigwait(&signals, &sig);
  std::printf("kvfabric-perf server: stopping on signal %d\n", sig);
  return 0;
}

struct Measurement {
  std::string mode;
  uint64_t bytes = 0;
  uint64_t iters = 0;
  double seconds = 0;
  double gbps = 0;
  double p50_us = 0;
  double p99_us = 0;
  std::string codec;                    // layers with --codec
  std::vector<double> request_seconds;  // layers: every request
};

Result<protocol::RunResult> request_target(PeerLink& link, protocol::RunMode mode, uint64_t bytes,
                                           uint64_t iters, uint64_t run_id) {
  protocol::RunRequest req{run_id, mode, bytes, static_cast<uint32_t>(iters)};
  if (Status s = link.control().send(req); !s.ok()) return s;
  auto m = link.expect(std::chrono::seconds(60));
  if (!m.ok()) return m.status();
  auto* r = std::get_if<protocol::RunResult>(&m.value());
  if (r == nullptr) return Status(ErrorCode::kMalformed, "expected RunResult");
  if (r->code != ErrorCode::kOk) return Status(r->code, "server refused the run: " + r->message);
  return *r;
}

// Waits for Completions from another thread, with a deadline. The state is shared so that a
// completion arriving after a timed-out wait has something valid to write to.
class Waiter {
 public:
  explicit Waiter(std::chrono::milliseconds timeout) : timeout_(timeout), state_(std::make_shared<State>()) {}
  Completion completion() {
    return [state = state_](const Status& s) {
      std::lock_guard lock(state->m);
      state->status = s;
      state->done = true;
      state->cv.notify_all();
    };
  }
  // Waits for the completion. With `alive`, asks it every 100 ms whether to go on waiting: over
  // shared memory a dead server's target stays mapped here and puts keep "succeeding", so a long
  // run would only end long after the server did.
  Status wait(const std::function<Status()>& alive = {}) {
    const auto deadline = Clock::now() + timeout_;
    std::unique_lock lock(state_->m);
    while (!state_->done) {
      const auto now = Clock::now();
      if (now >= deadline) {
        return Status(ErrorCode::kTimeout, "no completion within " + std::to_string(timeout_.count()) +
                                               " ms (is the server still there?)");
      }
      const auto slice = std::min<Clock::duration>(deadline - now, std::chrono::milliseconds(100));
      if (state_->cv.wait_for(lock, slice, [&] { return state_->done; })) break;
      if (alive) {
        lock.unlock();
        Status s = alive();
        lock.lock();
        if (!s.ok()) return s;
      }
    }
    state_->done = false;
    return state_->status;
  }
  // True when the completion comes within the timeout, whatever its status.
  bool completes() {
    std::unique_lock lock(state_->m);
    return state_->cv.wait_for(lock, timeout_, [&] { return state_->done; });
  }

 private:
  struct State {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    Status status;
  };
  std::chrono::milliseconds timeout_;
  std::shared_ptr<State> state_;
};

// Puts of `size` bytes, the i-th at offset (i * size) % footprint of a target of `footprint`
// bytes (footprint = size: the same bytes every time, as ucx_perftest does; a large footprint
// moves data through DRAM rather than cache, like a real KV stream).
Result<Measurement> run_bw_or_lat(Setup& setup, PeerLink& link, bool latency, uint64_t size,
                                  uint64_t footprint, uint64_t iters, uint64_t run_id,
                                  std::chrono::milliseconds timeout) {
  footprint = std::max(footprint, size) / size * size;
  auto target = request_target(link, latency ? protocol::RunMode::kLatency : protocol::RunMode::kBandwidth,
                               footprint, iters, run_id);
  if (!target.ok()) return target.status();
  auto remote = setup.transport->import_region(link.peer(), target->target);
  if (!remote.ok()) return remote.status();
  auto local = gpudirect::MemoryRegion::allocate_host(setup.ucx, footprint);
  if (!local.ok()) return local.status();
  fill_pattern(local->data(), footprint & ~7ull, PatternKey{run_id, 0, 0, 0});
  const uint64_t slots = footprint / size;
  auto op_at = [&](uint64_t i) {
    uint64_t offset = (i % slots) * size;
    return PutOp{local->data() + offset, &local.value(), remote.value(), offset, size};
  };
  Waiter waiter(timeout);
  // The server is still there while its control connection is: nothing may arrive on it during a
  // run, and it ends (EOF) when the server dies.
  auto server_there = [&link]() -> Status {
    auto message = link.control().receive(std::chrono::milliseconds(1));
    if (message.ok()) return Status(ErrorCode::kMalformed, "unexpected message from the server during a run");
    if (message.status().code() == ErrorCode::kTimeout) return Status::Ok();
    return Status(message.status().code(),
                  "the server went away during the run: " + message.status().message());
  };
  Measurement m;
  m.mode = latency ? "lat" : "bw";
  m.bytes = size;
  m.iters = iters;
  if (!latency) {
    // Warm-up (registration caches, connection lanes), then the timed run.
    for (int pass = 0; pass < 2; ++pass) {
      // The warm-up touches the whole footprint once, so first-touch page faults stay out.
      uint64_t n = pass == 0 ? std::max<uint64_t>({1, iters / 10, slots}) : iters;
      std::vector<PutOp> ops;
      ops.reserve(n);
      for (uint64_t i = 0; i < n; ++i) ops.push_back(op_at(i));
      auto t0 = Clock::now();
      Waiter puts_done(timeout);
      setup.transport->put(link.peer(), std::move(ops), puts_done.completion());
      setup.transport->flush(link.peer(), waiter.completion());
      if (Status s = waiter.wait(server_there); !s.ok()) {
        // The puts still in flight read `local`: end them (the peer is closed) and let them
        // finish before it is freed; if they do not within the timeout, it is left allocated.
        setup.transport->disconnect(link.peer());
        if (!puts_done.completes())
          new gpudirect::MemoryRegion(std::move(local.value()));  // leaked, see above
        return s;
      }
      m.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    m.gbps = static_cast<double>(size * iters) / m.seconds / 1e9;
  } else {
    std::vector<double> us;
    us.reserve(iters);
    for (uint64_t i = 0; i < iters + iters / 10 + 1; ++i) {
      auto t0 = Clock::now();
      setup.transport->put(link.peer(), {op_at(i)}, nullptr);
      setup.transport->flush(link.peer(), waiter.completion());
      if (Status s = waiter.wait(); !s.ok()) return s;
      if (i > iters / 10) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    m.seconds = std::accumulate(us.begin(), us.end(), 0.0) / 1e6;
    m.gbps = static_cast<double>(size * us.size()) / m.seconds / 1e9;
    m.p50_us = perf::percentile(us, 50);
    m.p99_us = perf::percentile(us, 99);
  }
  // Over shared memory the target is mapped here, so puts "succeed" even after the server died:
  // only a run whose server is still there at the end counts.
  if (Status s = server_there(); !s.ok()) return s;
  return m;
}

// --timeline: where one request's time went. The layers' completions come a copy apart once the
// pipeline runs; what the first completion takes beyond one step is the fill (setup, the first
// copy's start), and what the request takes beyond its last completion's step is the drain.
void print_request_timeline(const fabric::PatternStreamOutcome& outcome) {
  if (outcome.layer_done_s.empty()) return;
  std::vector<double> done = outcome.layer_done_s;
  std::sort(done.begin(), done.end());
  std::vector<double> steps;
  for (size_t i = 1; i < done.size(); ++i) steps.push_back(done[i] - done[i - 1]);
  const double step = steps.empty() ? 0.0 : perf::percentile(steps, 50);
  const double last_handed = *std::max_element(outcome.layer_ready_s.begin(), outcome.layer_ready_s.end());
  std::printf(
      "    timeline (us from the request's start, at %.1f us on the steady clock): last layer handed over "
      "%.1f; first layer remotely complete %.1f, last %.1f; step between completions median %.1f, max "
      "%.1f; layers x step %.1f\n",
      std::chrono::duration<double, std::micro>(outcome.start.time_since_epoch()).count(), last_handed * 1e6,
      done.front() * 1e6, done.back() * 1e6, step * 1e6,
      steps.empty() ? 0.0 : *std::max_element(steps.begin(), steps.end()) * 1e6,
      step * static_cast<double>(done.size()) * 1e6);
}

int run_client(const cxxopts::ParseResult& args) {
  auto hp = parse_host_port(args["connect"].as<std::string>());
  if (!hp.ok()) return fail("--connect: " + hp.status().message());
  std::string mode = args["mode"].as<std::string>();
  if (mode != "bw" && mode != "lat" && mode != "layers")
    return fail("--mode must be bw, lat or layers, got '" + mode + "'");
  auto sizes = perf::parse_size_list(args["sizes"].as<std::string>());
  if (!sizes.ok()) return fail("--sizes: " + sizes.status().message());
  uint64_t iters_arg = args["iters"].as<uint64_t>();
  auto footprint_arg = perf::parse_size(args["footprint"].as<std::string>());
  if (!footprint_arg) return fail("--footprint: bad size '" + args["footprint"].as<std::string>() + "'");
  const uint64_t footprint = *footprint_arg;

  auto setup = make_transport(args);
  if (!setup.ok()) return fail(setup.status().to_string());
  if (setup->memory.gpu && mode != "layers") {
    return fail("--mem " + setup->memory.to_string() +
                ": GPU memory is measured in layers mode (--mode layers)");
  }
  auto link = PeerLink::connect(*setup->transport, hp->first, hp->second, "kvfabric-perf-client",
                                std::chrono::seconds(10));
  if (!link.ok()) return fail(link.status().to_string());
  if (auto* multi = dynamic_cast<MultiTransport*>(setup->transport.get()); multi != nullptr) {
    std::printf("transport: %s (this side offers %s)\n",
                std::string(multi->chosen(link.value()->peer())).c_str(), std::string(multi->name()).c_str());
  }
  // --codec: the server must run the same codec and rows, and says so (and where it answers
  // checks) in its name.
  std::optional<perf::CodecServerInfo> codec_server;
  const auto my_codec = protocol::parse_codec(args["codec"].as<std::string>());
  if (!my_codec.ok()) return fail("--codec: " + my_codec.status().message());
  const uint32_t row_bytes = args["row-bytes"].as<uint32_t>();
  if (args.count("codec") != 0) {
    if (mode != "layers") return fail("--codec is measured in layers mode (--mode layers)");
    codec_server = perf::parse_codec_server_name(link.value()->remote_name());
    if (!codec_server) {
      return fail("the server at " + args["connect"].as<std::string>() +
                  " was not started with --codec (it checks raw patterns only): start it with --transport "
                  "ucx_staged --codec " +
                  args["codec"].as<std::string>());
    }
    if (codec_server->codec != my_codec.value() || codec_server->row_bytes != row_bytes) {
      return fail("codec mismatch: the server runs --codec " +
                  std::string(protocol::codec_name(codec_server->codec)) + " --row-bytes " +
                  std::to_string(codec_server->row_bytes) + ", this client --codec " +
                  std::string(protocol::codec_name(my_codec.value())) + " --row-bytes " +
                  std::to_string(row_bytes) + ": start both with the same");
    }
  }

  std::vector<Measurement> results;
  uint64_t run_id = static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  if (mode == "bw" || mode == "lat") {
    std::printf("%-6s %12s %10s %10s %10s %10s\n", "mode", "bytes", "iters", "GB/s", "p50_us", "p99_us");
    for (uint64_t size : sizes.value()) {
      uint64_t iters = iters_arg != 0
                           ? iters_arg
                           : (mode == "bw" ? std::clamp<uint64_t>((1ull << 30) / size, 50, 100000) : 2000);
      auto m = run_bw_or_lat(setup.value(), *link.value(), mode == "lat", size, footprint, iters, ++run_id,
                             std::chrono::milliseconds(args["timeout-ms"].as<uint64_t>()));
      if (!m.ok()) return fail("size " + std::to_string(size) + ": " + m.status().to_string());
      std::printf("%-6s %12llu %10llu %10.3f %10.1f %10.1f\n", m->mode.c_str(),
                  static_cast<unsigned long long>(m->bytes), static_cast<unsigned long long>(m->iters),
                  m->gbps, m->p50_us, m->p99_us);
      std::fflush(stdout);
      results.push_back(m.value());
    }
  } else {
    auto layout = perf::layers_layout(args["layers"].as<uint32_t>(), args["blocks"].as<uint32_t>(),
                                      args["block-bytes"].as<std::string>());
    if (!layout.ok()) return fail(layout.status().message());
    const protocol::KvLayoutDesc& desc = layout->desc();
    const uint64_t block_bytes = layout->part_bytes();
    uint64_t total = layout->layer_bytes() * desc.num_layers;
    auto source = setup->memory.gpu
                      ? gpudirect::MemoryRegion::allocate_cuda(setup->ucx, setup->memory.device, total)
                      : gpudirect::MemoryRegion::allocate_host(setup->ucx, total);
    if (!source.ok()) return fail(source.status().to_string());
    uint64_t iters = iters_arg != 0 ? iters_arg : 3;
    TransferSchedulerOptions scheduler_options;
    scheduler_options.layer_timeout = std::chrono::milliseconds(args["timeout-ms"].as<uint64_t>());
    if (const std::string inflight_arg = args["inflight"].as<std::string>(); inflight_arg != "auto") {
      auto inflight = perf::parse_size(inflight_arg);
      if (!inflight || *inflight == 0)
        return fail("--inflight: bad size '" + inflight_arg + "' (or say auto)");
      scheduler_options.max_inflight_bytes = *inflight;
    }
    TransferScheduler scheduler(*setup->transport, scheduler_options);
    // --shuffle-source: the request's blocks lie in the sender's pool in a shuffled order too (as
    // an engine's do after a while), so staged puts gather instead of copying runs.
    std::vector<uint32_t> source_blocks;
    if (args["shuffle-source"].as<bool>()) {
      if (codec_server || args.count("compute") != 0)
        return fail("--shuffle-source: not with --codec or --compute");
      source_blocks.resize(desc.num_blocks);
      std::iota(source_blocks.begin(), source_blocks.end(), 0u);
      std::shuffle(source_blocks.begin(), source_blocks.end(), std::mt19937_64(0x50c4ce));
    }
    // --source-runs N: the blocks lie in N runs of consecutive blocks, the runs in a shuffled order
    // (an engine that allocated a request in a few pieces): staged puts then send several long runs
    // straight from the pool (nccl: that many sends of one group) instead of one.
    if (const uint32_t runs = args["source-runs"].as<uint32_t>(); runs > 1) {
      if (!source_blocks.empty()) return fail("--source-runs: not with --shuffle-source");
      if (codec_server || args.count("compute") != 0)
        return fail("--source-runs: not with --codec or --compute");
      if (runs > desc.num_blocks)
        return fail("--source-runs: " + std::to_string(runs) + " runs of " + std::to_string(desc.num_blocks) +
                    " blocks");
      std::vector<uint32_t> order(runs);
      std::iota(order.begin(), order.end(), 0u);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(0x7275e5));
      const uint32_t per_run = (desc.num_blocks + runs - 1) / runs;
      for (uint32_t r : order) {
        for (uint32_t b = r * per_run; b < std::min(desc.num_blocks, (r + 1) * per_run); ++b)
          source_blocks.push_back(b);
      }
    }
    if (args.count("compute") != 0) {
      if (args["compute"].as<std::string>() != "llama8b") return fail("--compute: only llama8b is known");
      if (!setup->memory.gpu) return fail("--compute runs on a GPU: add --mem cuda:N");
      auto f = perf::run_overlap(*link.value(), *setup->transport, scheduler, source.value(), layout.value(),
                                 setup->memory.device, args["tokens"].as<uint32_t>(), iters,
                                 args["shuffle"].as<bool>(), run_id);
      if (!f.ok()) return fail("overlap run: " + f.status().to_string());
      std::printf(
          "overlap: request alone %.1f GB/s (%.1f us a layer); compute alone %.2f ms, with transfers %.2f ms "
          "(%+.2f%%); tail from the last layer's compute to its LayerReady %.1f us = %.2f x one layer's "
          "transfer\n",
          f->transfer_gbps, f->layer_transfer_us, f->compute_alone_ms, f->compute_with_transfer_ms,
          f->slowdown_pct, f->tail_us, f->tail_ratio);
      if (args.count("json") != 0) {
        nlohmann::json j;
        j["results"] = nlohmann::json::array({{{"mode", "overlap"},
                                               {"bytes", total},
                                               {"iters", iters},
                                               {"gbps", f->transfer_gbps},
                                               {"layer_transfer_us", f->layer_transfer_us},
                                               {"compute_alone_ms", f->compute_alone_ms},
                                               {"compute_with_transfer_ms", f->compute_with_transfer_ms},
                                               {"slowdown_pct", f->slowdown_pct},
                                               {"tail_us", f->tail_us},
                                               {"tail_ratio", f->tail_ratio}}});
        if (Status s = perf::write_json_file(args["json"].as<std::string>(), j); !s.ok())
          return fail(s.message());
      }
      return 0;
    }
    const uint32_t concurrent = args["concurrent"].as<uint32_t>();
    if (concurrent == 0 || concurrent > 16) return fail("--concurrent must be 1..16");
    if (concurrent > 1 && codec_server)
      return fail("--concurrent: the codec check runs one stream at a time; leave --codec out");
    std::printf(
        "layers: %u layers x %u blocks x 2 x %llu bytes = %.1f MiB per request, %s, %s%s\n", desc.num_layers,
        desc.num_blocks, static_cast<unsigned long long>(block_bytes), static_cast<double>(total) / (1 << 20),
        args["shuffle"].as<bool>() ? "shuffled" : "in order",
        codec_server ? ("codec " + std::string(protocol::codec_name(codec_server->codec)) +
                        ", every block checked by the server against the CPU codec's decode")
                           .c_str()
        : args["verify"].as<bool>() ? "verified"
                                    : "unverified",
        concurrent > 1 ? (", " + std::to_string(concurrent) + " request streams at once").c_str() : "");
    Measurement m;
    m.mode = "layers";
    m.bytes = total;
    m.codec = codec_server ? std::string(protocol::codec_name(codec_server->codec)) : "";
    if (concurrent > 1) {
      std::vector<std::unique_ptr<PeerLink>> links;
      links.push_back(std::move(link.value()));
      std::vector<gpudirect::MemoryRegion> sources;
      sources.push_back(std::move(source.value()));
      for (uint32_t s = 1; s < concurrent; ++s) {
        auto more = PeerLink::connect(*setup->transport, hp->first, hp->second,
                                      "kvfabric-perf-client-" + std::to_string(s), std::chrono::seconds(10));
        if (!more.ok()) return fail("stream " + std::to_string(s) + ": " + more.status().to_string());
        links.push_back(std::move(more.value()));
        auto src = setup->memory.gpu
                       ? gpudirect::MemoryRegion::allocate_cuda(setup->ucx, setup->memory.device, total)
                       : gpudirect::MemoryRegion::allocate_host(setup->ucx, total);
        if (!src.ok()) return fail("stream " + std::to_string(s) + "'s source: " + src.status().to_string());
        sources.push_back(std::move(src.value()));
      }
      auto f = perf::run_concurrent_streams(links, *setup->transport, scheduler, sources, layout.value(),
                                            iters, args["verify"].as<bool>(), args["shuffle"].as<bool>(),
                                            source_blocks, run_id,
                                            std::chrono::milliseconds(args["timeout-ms"].as<uint64_t>() * 2));
      if (!f.ok()) return fail(f.status().to_string());
      m.iters = f->request_seconds.size();
      m.request_seconds = f->request_seconds;
      m.seconds = f->seconds;  // all streams' requests, first start to last end
      m.gbps = f->aggregate_gbps;
      std::printf("  %llu requests in %.3f s: aggregate %.3f GB/s; a request took %.3f s (median)%s\n",
                  static_cast<unsigned long long>(m.iters), f->seconds, f->aggregate_gbps,
                  perf::percentile(f->request_seconds, 50),
                  args["verify"].as<bool>()
                      ? (", receiver verified " + std::to_string(f->bytes_verified) + " bytes").c_str()
                      : "");
    } else {
      std::vector<double> seconds;
      // --fill-once: every request sends the same pattern, filled before the first; otherwise each
      // request is filled anew, which on a GPU leaves it idle for milliseconds between requests.
      const bool fill_once = args["fill-once"].as<bool>();
      const uint64_t first_seed = run_id;
      for (uint64_t it = 0; it < iters; ++it) {
        uint64_t seed = fill_once ? first_seed : run_id + it;
        for (uint32_t l = 0; l < desc.num_layers && (it == 0 || !fill_once); ++l) {
          const Status st = codec_server
                                ? perf::fill_kv_layer(source.value(), layout.value(), l, seed, row_bytes)
                                : fill_layer_pattern(source.value(), layout.value(), l, seed, source_blocks);
          if (!st.ok()) return fail("filling layer " + std::to_string(l) + ": " + st.to_string());
        }
        PatternStreamOptions options;
        options.request_id = ++run_id;
        options.seed = seed;
        // With a codec the server checks the blocks itself (against the codec, not the raw pattern).
        options.verify = args["verify"].as<bool>() && !codec_server;
        options.shuffle = args["shuffle"].as<bool>();
        options.source_blocks = source_blocks;
        options.timeout = std::chrono::milliseconds(args["timeout-ms"].as<uint64_t>() * 2);
        if (codec_server) options.context = perf::seed_context(seed);
        auto outcome = send_pattern_stream(*link.value(), *setup->transport, scheduler, source.value(),
                                           layout.value(), options);
        if (!outcome.ok()) return fail("stream " + std::to_string(it) + ": " + outcome.status().to_string());
        seconds.push_back(outcome->seconds);
        std::string checked;
        if (codec_server) {
          std::string message;
          if (Status s = perf::query_codec_check(
                  hp->first, codec_server->verify_port, options.request_id,
                  std::chrono::milliseconds(args["timeout-ms"].as<uint64_t>() * 4), &message);
              !s.ok()) {
            return fail("stream " + std::to_string(it) + ": the server's codec check: " + s.to_string());
          }
          checked = ", server: " + message;
        } else if (options.verify) {
          checked = ", receiver verified " + std::to_string(outcome->result.bytes_verified) + " bytes";
        }
        std::printf("  request %llu/%llu: %.3f s, %.3f GB/s%s\n", static_cast<unsigned long long>(it + 1),
                    static_cast<unsigned long long>(iters), outcome->seconds,
                    static_cast<double>(total) / outcome->seconds / 1e9, checked.c_str());
        if (args["timeline"].as<bool>()) print_request_timeline(outcome.value());
        std::fflush(stdout);
        if (options.verify && outcome->result.bytes_verified != total) {
          return fail("receiver verified " + std::to_string(outcome->result.bytes_verified) + " of " +
                      std::to_string(total) + " bytes");
        }
      }
      m.iters = iters;
      m.request_seconds = seconds;
      m.seconds = perf::percentile(seconds, 50);
      m.gbps = static_cast<double>(total) / m.seconds / 1e9;
    }
    std::printf("%-6s %12s %10s %10s\n%-6s %12llu %10llu %10.3f\n", "mode", "bytes", "iters", "GB/s",
                "layers", static_cast<unsigned long long>(total), static_cast<unsigned long long>(m.iters),
                m.gbps);
    results.push_back(m);
  }
  if (args.count("json") != 0) {
    nlohmann::json out;
    out["results"] = nlohmann::json::array();
    for (const auto& m : results) {
      nlohmann::json r = {{"mode", m.mode}, {"bytes", m.bytes},   {"iters", m.iters},  {"seconds", m.seconds},
                          {"gbps", m.gbps}, {"p50_us", m.p50_us}, {"p99_us", m.p99_us}};
      if (!m.codec.empty()) r["codec"] = m.codec;
      if (!m.request_seconds.empty()) r["request_seconds"] = m.request_seconds;
      out["results"].push_back(std::move(r));
    }
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), out); !s.ok())
      return fail(s.message());
  }
  return 0;
}

// kvfabric-perf codec --codec int8|fp8 [--row-bytes R] [--block-bytes S]: the row codec's speed on
// one thread, encode and decode, over 256 MiB of random KV values in runs of one block part.
int run_codec_speed(const cxxopts::ParseResult& args) {
  auto codec = protocol::parse_codec(args["codec"].as<std::string>());
  if (!codec.ok()) return fail("--codec: " + codec.status().message());
  auto run = perf::parse_size(args["block-bytes"].as<std::string>());
  if (!run) return fail("--block-bytes: bad size");
  const uint32_t row_bytes = args["row-bytes"].as<uint32_t>();
  const uint64_t iters = std::max<uint64_t>(args["iters"].as<uint64_t>(), 1);
  auto speed =
      perf::measure_row_codec(codec.value(), row_bytes, 256ull << 20, *run, static_cast<uint32_t>(iters));
  if (!speed.ok()) return fail(speed.status().to_string());
  std::printf(
      "row codec %s, rows of %u bytes, runs of %llu bytes, one thread, best of %llu passes over 256 MiB: "
      "encode %.2f GB/s, decode %.2f GB/s (raw bytes per second of CPU time; memcpy %.2f GB/s)\n",
      std::string(protocol::codec_name(codec.value())).c_str(), row_bytes,
      static_cast<unsigned long long>(*run), static_cast<unsigned long long>(iters), speed->encode_gbps,
      speed->decode_gbps, speed->memcpy_gbps);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-perf",
                           "Measures kvfabric's data path between two processes.\n"
                           "  kvfabric-perf server --listen HOST:PORT\n"
                           "  kvfabric-perf client --connect HOST:PORT --mode bw|lat|layers ...");
  // clang-format off
  options.add_options()
      ("role", "server, client, local or codec (the row codec's speed on one thread)", cxxopts::value<std::string>())
      ("listen", "server: HOST:PORT to listen on", cxxopts::value<std::string>()->default_value("127.0.0.1:18515"))
      ("connect", "client: the server's HOST:PORT", cxxopts::value<std::string>()->default_value("127.0.0.1:18515"))
      ("mode", "client: bw | lat | layers; local: gather | scatter", cxxopts::value<std::string>()->default_value("bw"))
      ("sizes", "bw/lat message sizes", cxxopts::value<std::string>()->default_value("4K,64K,1M,4M"))
      ("iters", "iterations per size (0: automatic); layers: requests", cxxopts::value<uint64_t>()->default_value("0"))
      ("layers", "layers mode: layers per request", cxxopts::value<uint32_t>()->default_value("32"))
      ("blocks", "layers mode: blocks per layer", cxxopts::value<uint32_t>()->default_value("512"))
      ("block-bytes", "layers mode: bytes of K (and of V) per block", cxxopts::value<std::string>()->default_value("32K"))
      ("shuffle", "layers mode: scatter into shuffled receiver blocks", cxxopts::value<bool>()->default_value("false"))
      ("shuffle-source", "layers mode: send from shuffled blocks of this side's pool too (default: in order)", cxxopts::value<bool>()->default_value("false"))
      ("source-runs", "layers mode: send from N runs of consecutive blocks of this side's pool, in a shuffled order (default 1: in order)", cxxopts::value<uint32_t>()->default_value("1"))
      ("verify", "layers mode: the receiver checks every byte", cxxopts::value<bool>()->default_value("false"))
      ("footprint", "bw/lat: spread the puts over a target this large (0: one message's size, "
       "as ucx_perftest)", cxxopts::value<std::string>()->default_value("0"))
      ("timeout-ms", "client: a layer (or bw/lat flush) not complete by then fails the run",
       cxxopts::value<uint64_t>()->default_value("30000"))
      ("peer-errors", "auto | on | off: UCX watches the peer (auto: remote hosts only; on a same-host peer "
       "UCX 1.13 then falls back to tcp)", cxxopts::value<std::string>()->default_value("auto"))
      ("window", "puts in flight per peer", cxxopts::value<size_t>()->default_value("64"))
      ("mapped-copy", "ucx: puts into a same-host peer's shared-memory region as a memcpy (on) or through UCX (off)", cxxopts::value<std::string>()->default_value("on"))
      ("transport", "ucx | cuda_ipc (same host, GPU memory) | nccl (GPU memory, NCCL send/recv of staged layers; same or other host) | ucx_staged (gather -> one UCX put per slot -> the receiver scatters; host or GPU memory, any host), or a comma list in order of preference (e.g. cuda_ipc,ucx): each peer uses the first both sides offer", cxxopts::value<std::string>()->default_value("ucx"))
      ("topology", "without --transport: the transports (and their order) of FILE's transports.preference", cxxopts::value<std::string>())
      ("mem", "host | cuda:N: where this side's KV blocks live", cxxopts::value<std::string>()->default_value("host"))
      ("copy", "cuda_ipc and local: auto | kernel | ce (copy engines, batched) | ce1 (copy engines, one call each) | staged (cuda_ipc: gather, one copy-engine copy into the receiver's staging, the receiver scatters) | adaptive (cuda_ipc: staged while earlier puts to the peer are still copying and the data is ready, direct otherwise)", cxxopts::value<std::string>()->default_value("auto"))
      ("adaptive-same-gpu", "cuda_ipc --copy adaptive: stage between processes on one GPU too (a test knob; there staging only adds copies)", cxxopts::value<bool>()->default_value("false"))
      ("compute", "client layers mode: run GPU prefill compute (llama8b) while streaming: the overlap run",
       cxxopts::value<std::string>())
      ("tokens", "--compute: prompt tokens", cxxopts::value<uint32_t>()->default_value("8192"))
      ("resident-plans", "cuda_ipc: upload a request's extents once, launch layers by base address",
       cxxopts::value<bool>()->default_value("false"))
      ("streams", "cuda_ipc: CUDA streams the copies go round-robin over", cxxopts::value<uint32_t>()->default_value("1"))
      ("fill-once", "layers mode: fill the source once and send the same pattern in every request (the GPU then does not sit idle between requests while the host makes the next pattern)", cxxopts::value<bool>()->default_value("false"))
      ("timeline", "layers mode: per request, when the first and last layers were handed over and remotely complete, and the median step between completions (where a request's time goes beyond its layers' copies)", cxxopts::value<bool>()->default_value("false"))
      ("concurrent", "layers mode: request streams at once, each on its own connection and source (the aggregate is the sustained bandwidth)", cxxopts::value<uint32_t>()->default_value("1"))
      ("inflight", "layers mode: bytes the scheduler keeps in flight (auto: 128M, or what the transport asks for: staged cuda_ipc and nccl two rounds of the receiver's slots)", cxxopts::value<std::string>()->default_value("auto"))
      ("staging-bytes", "staged copies: bytes per staging slot (default: cuda_ipc --copy staged and nccl 64M, ucx_staged 32M)", cxxopts::value<std::string>())
      ("staging-slots", "staged copies: slots the sender asks of the receiver (ucx_staged: and keeps itself)", cxxopts::value<uint32_t>()->default_value("4"))
      ("staging-copy-streams", "cuda_ipc staged copies: streams each chunk's copy is split over", cxxopts::value<uint32_t>()->default_value("1"))
      ("staging-copy-hint", "cuda_ipc staged copies: issue them with cudaMemcpyFlagPreferOverlapWithCompute (an experiment)", cxxopts::value<bool>()->default_value("false"))
      ("staging-ahead", "cuda_ipc --copy staged: staged copies launched ahead of the copy engines, at most; layers queued behind them share a slot-sized copy (0: no limit)", cxxopts::value<uint32_t>()->default_value("0"))
      ("staging-handover", "cuda_ipc staged copies: hand receiver slots back on the GPUs (on) or with the receiver's answers (off)", cxxopts::value<std::string>()->default_value("off"))
      ("copy-kernel-blocks", "cuda_ipc and nccl: thread blocks a copy kernel launches at most (0: automatic: all that fit; nccl: one per SM, leaving room for NCCL's kernels)", cxxopts::value<uint32_t>()->default_value("0"))
      ("codec", "ucx_staged: identity | int8 | fp8: encode KV per token row in the staging slots (host memory; "
       "client and server must agree). Layers mode then streams random bf16 values and the server checks every "
       "block against the CPU codec's decode (a server with --codec takes only such clients)",
       cxxopts::value<std::string>()->default_value("identity"))
      ("row-bytes", "--codec: bytes of one token row (KV heads x head dim x 2; Llama-3-8B: 8 x 128 x 2)",
       cxxopts::value<uint32_t>()->default_value("2048"))
      ("staging-workers", "ucx_staged: threads that copy, encode and decode slots (0: the progress thread)",
       cxxopts::value<uint32_t>()->default_value("1"))
      ("staging-limit", "staging receiver: the most memory all senders' slots may take (GPU memory for cuda_ipc/nccl, host for ucx_staged)", cxxopts::value<std::string>()->default_value("1G"))
      ("max-bytes", "server: largest buffer a client may ask for", cxxopts::value<std::string>()->default_value("16G"))
      ("json", "client: write results as JSON to FILE", cxxopts::value<std::string>())
      ("v,verbose", "log more")
      ("version", "print the version")
      ("h,help", "print help");
  // clang-format on
  options.parse_positional({"role"});
  options.positional_help("server|client|local");
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
  if (args.count("version") != 0) {
    std::printf("kvfabric-perf %s\n", std::string(version()).c_str());
    return 0;
  }
  spdlog::set_level(args.count("verbose") != 0 ? spdlog::level::info : spdlog::level::warn);
  if (args.count("role") == 0) return fail("say server, client, local or codec (see --help)");
  if (std::string pe = args["peer-errors"].as<std::string>(); pe != "auto" && pe != "on" && pe != "off") {
    return fail("--peer-errors must be auto, on or off, got '" + pe + "'");
  }
  std::string role = args["role"].as<std::string>();
  if (role == "server") return run_server(args);
  if (role == "client") return run_client(args);
  if (role == "local") return perf::run_local_copy(args);
  if (role == "codec") return run_codec_speed(args);
  return fail("unknown role '" + role + "': say server, client, local or codec");
}
